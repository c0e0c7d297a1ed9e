"""Active learning: scoring stores a per-image uncertainty in the datastore; the strategy returns the least certain
unlabeled image, and never an image that cannot be read."""

from __future__ import annotations

import time

import pytest
import requests

from conftest import BAD_IMAGES

SCORING = "raps3d_uncertainty"
STRATEGY = "raps3d_uncertain"


def _image_infos(server) -> dict:
    objects = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    return {image_id: obj["image"]["info"] for image_id, obj in objects.items()}


def _next(server, client: str) -> dict:
    r = requests.post(f"{server.url}/activelearning/{STRATEGY}", json={"client_id": client}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def scores(server) -> dict:
    r = requests.post(f"{server.url}/scoring/{SCORING}", params={"run_sync": "true"}, timeout=600)
    assert r.status_code == 200, r.text
    summary = r.json()
    assert set(summary["failed"]) == set(BAD_IMAGES)
    return summary["scored"]


def test_scoring_stores_an_uncertainty_per_readable_image(server, scores):
    infos = _image_infos(server)
    assert {"phantom_01", "phantom_02", "phantom_03"} <= set(scores)
    for image_id, score in scores.items():
        assert 0.0 <= score <= 1.0
        assert infos[image_id][SCORING] == score
        details = infos[image_id][f"{SCORING}_details"]
        assert len(details["seed_ijk"]) == 3 and details["weights"].startswith("untrained")
    for image_id in BAD_IMAGES:
        assert infos[image_id][SCORING] is None and infos[image_id][f"{SCORING}_details"]["error"]


def test_the_score_is_one_minus_the_predicted_iou_at_the_automatic_click(server, scores):
    """The library's own answer for the same model, image and click: uncertainty, not confidence, and the click in
    viewer order [i, j, k] of the file (the model sees the phantom with its slices reversed)."""
    import sys

    import torch

    from conftest import APP_DIR, SAMPLE_IMAGES

    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))
    from lib.auto_prompt import soft_tissue_seed
    from lib.images import read_for_model
    from lib.model_service import UNTRAINED_CONFIG, UNTRAINED_SEED
    from raps3d import Engine, ImageState, InteractiveObject
    from raps3d.modeling import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(UNTRAINED_SEED)  # the weights the test server runs (it has no checkpoint)
        model = build_model(UNTRAINED_CONFIG)
    details = _image_infos(server)["phantom_01"][f"{SCORING}_details"]
    volume, geometry, orientation = read_for_model(str(SAMPLE_IMAGES / "phantom_01.nii.gz"))
    seed = soft_tissue_seed(volume, geometry.model_spacing)
    assert (orientation.order, orientation.flips) == ((0, 1, 2), (0,))
    assert details["seed_ijk"] == [seed[2], seed[1], volume.shape[0] - 1 - seed[0]]
    result = InteractiveObject(ImageState(Engine(model), volume, geometry.model_spacing)).add_point(seed)
    assert 0.0 < result.iou < 1.0
    assert scores["phantom_01"] == pytest.approx(1.0 - result.iou, abs=1e-4)


def test_strategy_returns_the_least_certain_images_first_and_skips_unreadable_ones(server, scores):
    ranked = sorted(scores, key=lambda image_id: -scores[image_id])
    first = _next(server, "annotator-1")
    assert first["id"] == ranked[0] and first["reason"] == "highest uncertainty"
    assert first[SCORING] == scores[ranked[0]]
    # Handed out a moment ago: the next annotator gets the next one.
    second = _next(server, "annotator-2")
    assert second["id"] == ranked[1]
    for n in range(len(scores) + 2):
        assert _next(server, f"annotator-{n + 3}")["id"] not in BAD_IMAGES
    # Every image is out now: later annotators get the one handed out longest ago, so two of them in a row get two
    # different images (hand-outs are stamped to the second).
    time.sleep(1.1)
    late = _next(server, "late-1")
    time.sleep(1.1)
    assert _next(server, "late-2")["id"] != late["id"]
    assert "every candidate was handed out recently" in late["reason"]


def test_scoring_in_a_subprocess_as_monai_label_runs_it(server, scores):
    """MONAI Label's default: the app is rebuilt in a subprocess, which scores and writes the datastore; the
    server picks the new infos up. Scored again (``rescore``), the untrained model gives the same scores."""
    before = _image_infos(server)["phantom_01"][f"{SCORING}_details"]["ts"]
    time.sleep(1.1)  # the stored timestamp has a resolution of one second
    r = requests.post(f"{server.url}/scoring/{SCORING}", json={"rescore": True}, timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 300
    while True:
        status = requests.get(f"{server.url}/scoring/", timeout=30).json()
        if status["status"] not in ("SUBMITTED", "RUNNING"):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status["status"] == "DONE", status
    deadline = time.monotonic() + 30  # the server reloads the datastore file when it changes
    while _image_infos(server)["phantom_01"][f"{SCORING}_details"]["ts"] == before:
        assert time.monotonic() < deadline, "the server did not pick up the subprocess's scores"
        time.sleep(0.5)
    infos = _image_infos(server)
    for image_id, score in scores.items():
        assert infos[image_id][SCORING] == pytest.approx(score, abs=1e-5)


def _scored_phantoms(tmp_path):
    """A local datastore of three phantoms scored 0.9, 0.5 and 0.1 (its file watcher off), its folder, and the
    strategy class."""
    import shutil
    import sys

    from monailabel.datastore.local import LocalDatastore

    from conftest import APP_DIR, SAMPLE_IMAGES

    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))
    from lib.activelearning.uncertain import MostUncertain

    studies = tmp_path / "studies"
    studies.mkdir()
    for name in ("phantom_01", "phantom_02", "phantom_03"):
        shutil.copy(SAMPLE_IMAGES / f"{name}.nii.gz", studies / f"{name}.nii.gz")
    datastore = LocalDatastore(str(studies), auto_reload=False)
    for name, score in (("phantom_01", 0.9), ("phantom_02", 0.5), ("phantom_03", 0.1)):
        datastore.update_image_info(name, {SCORING: score})
    return datastore, studies, MostUncertain


def test_strategy_never_hands_out_an_image_with_a_final_label(tmp_path):
    """The most uncertain image is left out once it is labelled, however high its score; with every image
    labelled there is nothing to hand out."""
    from conftest import ROOT

    datastore, studies, MostUncertain = _scored_phantoms(tmp_path)
    reference = ROOT / "sample-data" / "reference"
    strategy = MostUncertain(reserve_seconds=0.0)
    assert strategy({"strategy": STRATEGY}, datastore)["id"] == "phantom_01"
    datastore.save_label("phantom_01", str(reference / "phantom_01_seg.nii.gz"), "final", {})
    assert strategy({"strategy": STRATEGY}, datastore)["id"] == "phantom_02"
    for name in ("phantom_02", "phantom_03"):
        datastore.save_label(name, str(reference / f"{name}_seg.nii.gz"), "final", {})
    assert strategy({"strategy": STRATEGY}, datastore) is None


def test_malformed_image_info_written_by_a_client_does_not_stop_the_strategy(tmp_path):
    """Any client may write image info (PUT /datastore/image/info); one bad record answered every next-sample request
    with a 500."""
    datastore, studies, MostUncertain = _scored_phantoms(tmp_path)
    datastore.update_image_info("phantom_01", {"strategy": "oops"})
    datastore.update_image_info("phantom_02", {"strategy": {STRATEGY: {"ts": "soon"}}, SCORING: float("inf"),
                                               f"{SCORING}_details": "text"})
    datastore.update_image_info("phantom_03", {"strategy": {STRATEGY: "yesterday"}})
    strategy = MostUncertain(reserve_seconds=600.0)
    handed = [strategy.next_fetchable({"strategy": STRATEGY}, datastore)["id"] for _ in range(3)]
    # phantom_02's infinite score counts as none: after the scored ones.
    assert handed == ["phantom_01", "phantom_03", "phantom_02"]


def test_quick_hand_outs_go_to_different_images_and_a_missing_file_is_set_aside(tmp_path):
    """The strategy keeps its own hand-out times, exact: MONAI Label's record in the datastore is to the second, and
    a scoring process writing the datastore can undo it. A file removed behind the datastore's back is not handed
    out."""
    datastore, studies, MostUncertain = _scored_phantoms(tmp_path)
    strategy = MostUncertain(reserve_seconds=600.0)
    request = {"strategy": STRATEGY}
    handed = [strategy.next_fetchable(request, datastore)["id"] for _ in range(3)]
    assert handed == ["phantom_01", "phantom_02", "phantom_03"]  # within a second, nothing in the datastore
    again = strategy.next_fetchable(request, datastore)
    assert again["id"] == "phantom_01" and "every candidate was handed out recently" in again["reason"]

    # MONAI Label's datastore lists images by iterating a dict that an image added meanwhile changes: listed again.
    listing, failures = datastore.get_unlabeled_images, []

    def changed_once(*args):
        if not failures:
            failures.append(1)
            raise RuntimeError("dictionary changed size during iteration")
        return listing(*args)

    datastore.get_unlabeled_images = changed_once
    assert strategy.next_fetchable(request, datastore)["id"] == "phantom_02" and failures

    (studies / "phantom_01.nii.gz").unlink()
    fresh = MostUncertain(reserve_seconds=600.0)
    assert fresh.next_fetchable(request, datastore)["id"] == "phantom_02"
    assert "phantom_01" in fresh._set_aside
