"""The mask threshold: stored with the weights, used by the predictor, chosen on training cases."""

import subprocess
import sys

import pytest
import torch

from raps3d import Engine, ImageState, InteractiveObject, load_model, save_model
from raps3d.checkpoint import read_checkpoint
from raps3d.modeling import build_model
from raps3d.training.data import data_root

from library_fixtures import real_ct


def test_threshold_travels_with_the_checkpoint_and_older_checkpoints_load_with_zero(tmp_path):
    model = build_model("lite")
    model.mask_threshold.fill_(-1.5)
    save_model(model, tmp_path / "m.pt")
    loaded, _ = load_model(tmp_path / "m.pt")
    assert float(loaded.mask_threshold) == -1.5 and Engine(loaded).mask_threshold == -1.5
    payload = read_checkpoint(tmp_path / "m.pt")
    del payload["state_dict"]["mask_threshold"]  # a checkpoint written before the threshold existed
    torch.save(payload, tmp_path / "old.pt")
    assert float(load_model(tmp_path / "old.pt")[0].mask_threshold) == 0.0


def test_predictor_masks_grow_as_the_threshold_is_lowered():
    volume, spacing = real_ct("totalsegmentator/example_ct.nii.gz")
    torch.manual_seed(0)
    engine = Engine(build_model("lite"))
    masks = []
    for t in (0.0, -1.0):
        engine.mask_threshold = t
        r = InteractiveObject(ImageState(engine, volume, spacing)).add_point((56, 50, 60))
        masks.append(r.full_mask().astype(bool))
    assert masks[1].sum() > masks[0].sum() and not (masks[0] & ~masks[1]).any()


def test_calibration_command_stores_the_best_threshold(tmp_path):
    if not (data_root() / "openkbp" / "train").exists() or not (data_root() / "lidc").exists():
        pytest.skip(f"real CT not found under {data_root()} (set RAPS3D_DATA)")
    torch.manual_seed(0)
    save_model(build_model("lite"), tmp_path / "in.pt")
    out = tmp_path / "out.pt"
    run = subprocess.run([sys.executable, "-m", "raps3d.training.calibrate", "--model", str(tmp_path / "in.pt"),
                          "--out", str(out), "--openkbp", "1", "--lidc", "2", "--candidates", "0,-2"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    model, meta = load_model(out)
    cal = meta["calibration"]
    assert set(cal["scores"]) == {"0.0", "-2.0"} and cal["mask_threshold"] in (0.0, -2.0)
    best = max(cal["scores"], key=lambda k: (cal["scores"][k], float(k)))
    assert float(model.mask_threshold) == cal["mask_threshold"] == float(best)
    assert len(cal["cases"]) == 3 and all(0 <= s <= 1 for s in cal["scores"].values())
    # A stored score is the protocol's score of that threshold on those cases, computed again here.
    from raps3d.training.calibrate import score
    from raps3d.training.data import lidc_cases, openkbp_cases
    from raps3d.training.evaluate import evaluate

    engine = Engine(load_model(tmp_path / "in.pt")[0])
    engine.mask_threshold = -2.0
    cases = openkbp_cases("train", 1) + lidc_cases(False, 2)
    assert [c.name for c in cases] == cal["cases"]
    assert score(evaluate(engine, cases)) == pytest.approx(cal["scores"]["-2.0"], abs=2e-3)
    before = load_model(tmp_path / "in.pt")[0].state_dict()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "mask_threshold")  # only the threshold
