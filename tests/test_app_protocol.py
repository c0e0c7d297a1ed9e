"""The Raps-3D app through the real MONAI Label server: what viewers send, what they get back, session state."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

IMAGE = "phantom_01"  # 160 x 128 x 48 voxels (i, j, k)
CLICK = [80, 64, 24]


def _label(server, image, params):
    """The reply label as an array indexed [i, j, k], and the reply params (MONAI Label's multipart reply)."""
    r = server.infer_ok(image, {**params, "result_extension": ".nrrd", "result_dtype": "uint8",
                                "result_compress": False}, output=None)
    reply, content, filename = server.multipart(r)
    assert filename.endswith(".nrrd")
    data, _ = server.nrrd_label(content)
    return data, reply


def test_info_lists_the_interactive_model(server):
    import requests

    info = requests.get(f"{server.url}/info/", timeout=30).json()
    model = info["models"]["raps3d"]
    assert model["type"] == "deepgrow"
    assert model["dimension"] == 3
    assert model["labels"] == ["liver", "spleen", "right_kidney", "left_kidney", "aorta"]
    assert info["labels"] == model["labels"]
    # The test server has no checkpoint: the app still serves, and says loudly that the model is untrained.
    assert model["model_trained"] is False
    assert "UNTRAINED" in model["description"] and "UNTRAINED" in info["description"]
    assert "raps3d_uncertain" in info["strategies"] and "raps3d_uncertainty" in info["scoring"]


def test_clicks_then_an_edit_inside_the_roi_reuses_the_cached_session(server):
    base = {"label": "liver", "client_id": "edit-test"}
    first = server.infer_ok(IMAGE, {**base, "foreground": [CLICK]}).json()
    assert first["cache"] == "new_object" and first["cache_hit"] is False
    assert first["label_names"] == {"liver": 1}
    i0, i1, j0, j1, k0, k1 = first["roi"]
    assert 0 <= i0 <= CLICK[0] <= i1 < 160 and 0 <= j0 <= CLICK[1] <= j1 < 128 and 0 <= k0 <= CLICK[2] <= k1 < 48
    assert first["timings"]["model_zoom_in_encode"] > 0

    inside = [(i0 + i1) // 2 + 1, (j0 + j1) // 2 - 1, (k0 + k1) // 2]
    edit = server.infer_ok(IMAGE, {**base, "foreground": [CLICK], "background": [inside]}).json()
    assert edit["cache"] == "edit"
    assert edit["cache_hit"] is True  # decoder only: no encoder pass
    assert edit["prompts"] == {"foreground": 1, "background": 1}

    again = server.infer_ok(IMAGE, {**base, "foreground": [CLICK], "background": [inside]}).json()
    assert again["cache"] == "repeat"


def test_a_different_prompt_set_starts_a_new_object(server):
    base = {"label": "spleen", "client_id": "new-object-test"}
    server.infer_ok(IMAGE, {**base, "foreground": [CLICK]})
    other = server.infer_ok(IMAGE, {**base, "foreground": [[40, 70, 20]]}).json()
    assert other["cache"] == "new_object"
    assert other["timings"]["model_zoom_out_cached"] is True  # the image's zoom-out features are shared


def test_undo_explicit_and_by_resending_fewer_clicks(server):
    base = {"label": "aorta", "client_id": "undo-test"}
    one, one_reply = _label(server, IMAGE, {**base, "foreground": [CLICK]})
    two_params = {**base, "foreground": [CLICK, [84, 60, 24]]}
    two, _ = _label(server, IMAGE, two_params)
    assert (two != one).sum() > 100  # the second click changed the mask: undoing it must show

    undone, undone_reply = _label(server, IMAGE, {**base, "undo": True})
    assert undone_reply["cache"] == "undo" and undone_reply["roi"] == one_reply["roi"]
    np.testing.assert_array_equal(undone, one)

    server.infer_ok(IMAGE, two_params)  # redo the second click: an edit again
    by_viewer, reply = _label(server, IMAGE, {**base, "foreground": [CLICK]})  # the viewer dropped the last click
    assert reply["cache"] == "undo"
    np.testing.assert_array_equal(by_viewer, one)


def test_reset_clears_the_object(server):
    base = {"label": "left_kidney", "client_id": "reset-test"}
    server.infer_ok(IMAGE, {**base, "foreground": [CLICK]})
    r = server.infer_ok(IMAGE, {**base, "reset": True, "result_extension": ".nrrd"}, output="image")
    data, _ = server.nrrd_label(r.content)
    assert data.shape == (160, 128, 48) and not data.any()
    r = server.infer(IMAGE, {**base, "undo": True})
    assert r.status_code == 409 and "nothing to undo" in r.json()["detail"]


def test_slicer_roi_one_slice_thick_and_reversed_pairs(server):
    roi = [60, 100, 40, 90, 24, 24]
    forward, reply = _label(server, IMAGE, {"roi": roi, "label": "liver", "client_id": "roi-a"})
    assert reply["box"] == {"slice": 24, "corners": [[60, 40], [100, 90]], "source": "roi"}
    reversed_roi = [100, 60, 90, 40, 24, 24]  # Slicer maps RAS corners to i, j, k: pairs may come reversed
    backward, reply_b = _label(server, IMAGE, {"roi": reversed_roi, "label": "liver", "client_id": "roi-b"})
    assert reply_b["box"] == reply["box"]
    np.testing.assert_array_equal(backward, forward)


def test_a_thick_roi_uses_its_middle_slice(server):
    _, reply = _label(server, IMAGE, {"roi": [60, 100, 90, 40, 30, 20], "label": "liver", "client_id": "roi-c"})
    assert reply["box"] == {"slice": 25, "corners": [[60, 40], [100, 90]], "source": "roi_middle_slice"}


def test_explicit_2d_box_equals_the_same_one_slice_roi(server):
    box = {"slice": 24, "corners": [[100, 90], [60, 40]]}
    by_box, reply = _label(server, IMAGE, {"box": box, "label": "liver", "client_id": "box-a"})
    assert reply["box"] == {"slice": 24, "corners": [[60, 40], [100, 90]], "source": "box"}
    by_roi, _ = _label(server, IMAGE, {"roi": [60, 100, 40, 90, 24, 24], "label": "liver", "client_id": "box-b"})
    np.testing.assert_array_equal(by_box, by_roi)
    # A click added to the box is an edit of the same object.
    edit = server.infer_ok(IMAGE, {"box": box, "foreground": [[80, 65, 24]], "label": "liver",
                                   "client_id": "box-a"}).json()
    assert edit["cache"] == "edit"


def test_two_clients_on_one_image_never_share_state(server):
    a = [CLICK, [84, 62, 24]]
    b = [[40, 70, 20]]
    # Reference: client A's two steps alone.
    server.infer_ok(IMAGE, {"foreground": a[:1], "label": "liver", "client_id": "solo"})
    solo, _ = _label(server, IMAGE, {"foreground": a, "label": "liver", "client_id": "solo"})

    server.infer_ok(IMAGE, {"foreground": a[:1], "label": "liver", "client_id": "alice"})
    bob = server.infer_ok(IMAGE, {"foreground": b, "label": "liver", "client_id": "bob"}).json()
    assert bob["cache"] == "new_object"
    alice, alice_reply = _label(server, IMAGE, {"foreground": a, "label": "liver", "client_id": "alice"})
    np.testing.assert_array_equal(alice, solo)
    bob_edit = server.infer_ok(IMAGE, {"foreground": b, "background": [[30, 60, 20]], "label": "liver",
                                       "client_id": "bob"}).json()
    assert bob_edit["cache"] == "edit"
    assert alice_reply["client_id"] == "alice" and bob_edit["client_id"] == "bob"


def test_labels_of_one_client_are_separate_objects(server):
    base = {"client_id": "two-labels"}
    server.infer_ok(IMAGE, {**base, "label": "liver", "foreground": [CLICK]})
    spleen = server.infer_ok(IMAGE, {**base, "label": "spleen", "foreground": [[40, 70, 20]]}).json()
    assert spleen["cache"] == "new_object" and spleen["label_names"] == {"spleen": 1}
    liver = server.infer_ok(IMAGE, {**base, "label": "liver", "foreground": [CLICK]}).json()
    assert liver["cache"] == "repeat"


def test_every_output_mode_sends_the_same_label(server, tmp_path):
    import SimpleITK as sitk

    from conftest import SAMPLE_IMAGES

    params = {"foreground": [CLICK], "label": "liver", "client_id": "output-modes"}
    assert server.infer_ok(IMAGE, params, output="json").json()["label_names"] == {"liver": 1}
    reply, content, filename = server.multipart(server.infer_ok(IMAGE, params, output=None))
    assert reply["label_names"] == {"liver": 1} and filename.endswith(".nii.gz")
    image_only = server.infer_ok(IMAGE, params, output="image").content  # the default format, .nii.gz
    ct = sitk.ReadImage(str(SAMPLE_IMAGES / f"{IMAGE}.nii.gz"))
    labels = [server.image_from_bytes(data, ".nii.gz", tmp_path) for data in (content, image_only)]
    for label in labels:  # on the image's grid
        assert label.GetSize() == ct.GetSize() and label.GetOrigin() == pytest.approx(ct.GetOrigin())
        assert label.GetSpacing() == pytest.approx(ct.GetSpacing())
    voxels = [sitk.GetArrayFromImage(label) for label in labels]
    assert voxels[0].sum() > 0 and set(np.unique(voxels[0])) == {0, 1}
    np.testing.assert_array_equal(voxels[0], voxels[1])


def test_a_raw_label_reply_is_gzip_encoded_for_clients_that_accept_it(server):
    """OHIF asks for a raw NRRD of the whole volume on every click; on the wire it goes gzip-encoded to clients that
    accept it, and decodes to the same bytes."""
    import requests

    params = {"foreground": [CLICK], "label": "liver", "client_id": "encoding", "result_extension": ".nrrd",
              "result_dtype": "uint8", "result_compress": False}

    def post(accept: str, output: str | None):
        query = {"image": IMAGE, **({"output": output} if output else {})}
        r = requests.post(f"{server.url}/infer/raps3d", params=query, data={"params": json.dumps(params)},
                          headers={"Accept-Encoding": accept}, timeout=300, stream=True)
        wire = r.raw.read(decode_content=False)
        assert r.status_code == 200, wire[:300]
        return r.headers, wire

    plain_headers, plain = post("identity", "image")
    assert "content-encoding" not in plain_headers and len(plain) > 160 * 128 * 48  # header + one byte a voxel
    for accept in ("gzip, deflate, br", "br;q=1.0, gzip;q=0.8", "*"):  # a browser, a picky client, anything
        headers, wire = post(accept, "image")
        assert headers["content-encoding"] == "gzip" and len(wire) < len(plain) / 20, (accept, len(wire))
        assert headers["content-disposition"].startswith('attachment; filename="raps3d_')
        assert headers["content-disposition"].endswith('.nrrd"')
        assert gzip.decompress(wire) == plain
    headers, wire = post("gzip;q=0, identity", "image")
    assert "content-encoding" not in headers and wire == plain
    # MONAI Label's multipart reply (params and label together, as 3D Slicer asks): encoded too.
    r = server.infer_ok(IMAGE, params, output=None)  # requests accepts gzip and decodes it
    assert r.headers["content-encoding"] == "gzip"
    reply, content, _ = server.multipart(r)
    assert reply["label"] == "liver" and content == plain
    # An already compressed label goes as it is.
    compressed = requests.post(f"{server.url}/infer/raps3d", params={"image": IMAGE, "output": "image"},
                               data={"params": json.dumps({**params, "result_extension": ".nii.gz"})},
                               headers={"Accept-Encoding": "gzip"}, timeout=300)
    assert compressed.status_code == 200 and "content-encoding" not in compressed.headers


def test_accept_encoding_is_read_as_http_defines_it():
    import sys

    from conftest import APP_DIR

    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))
    from lib.reply_encoding import accepts_gzip

    assert accepts_gzip("gzip") and accepts_gzip("deflate, GZIP;q=0.5") and accepts_gzip("*;q=0.1")
    assert not accepts_gzip(None) and not accepts_gzip("") and not accepts_gzip("identity")
    assert not accepts_gzip("gzip;q=0") and not accepts_gzip("gzip;q=zero") and not accepts_gzip("br, deflate")
    assert not accepts_gzip("gzip;q=0, *") and not accepts_gzip("*;q=0")  # named gzip decides over *


def test_a_gzip_reply_holds_no_open_file_between_chunks(tmp_path):
    """A client that goes away mid-reply leaves the generator unfinished: the label file, deleted after the reply,
    must not be held open by it (its disk space would stay in use)."""
    import gzip
    import os
    import sys

    from conftest import APP_DIR

    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))
    from lib.reply_encoding import CHUNK, _gzip_file

    path = tmp_path / "label.nrrd"
    content = os.urandom(CHUNK) * 2 + b"\0" * (CHUNK // 2)  # random: every chunk yields output at once
    path.write_bytes(content)

    def open_on_label():
        return [fd for fd in os.listdir("/proc/self/fd")
                if os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(path)]

    chunks = _gzip_file(str(path))
    first = next(chunks)
    assert first and open_on_label() == []
    assert gzip.decompress(first + b"".join(chunks)) == content


def test_the_reply_label_is_the_library_prediction_placed_at_its_voxels(server):
    """What the server sends is the library's mask for the same prompt, model and image, voxel for voxel (a label
    mirrored, shifted or transposed on its way out would differ). The library sees the image in the model's
    orientation (slices from head to feet: this phantom's are stored the other way)."""
    import sys

    import torch

    from conftest import APP_DIR, SAMPLE_IMAGES

    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))
    from lib.images import read_for_model
    from lib.model_service import UNTRAINED_CONFIG, UNTRAINED_SEED
    from raps3d import Engine, ImageState, InteractiveObject
    from raps3d.modeling import build_model

    volume, geometry, orientation = read_for_model(str(SAMPLE_IMAGES / f"{IMAGE}.nii.gz"))
    assert (orientation.order, orientation.flips) == ((0, 1, 2), (0,))
    shape = geometry.shape_zyx
    (z, y0, x0), (_, y1, x1) = orientation.box((24, 40, 60), (25, 91, 111), shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(UNTRAINED_SEED)  # the weights the test server runs (it has no checkpoint)
        model = build_model(UNTRAINED_CONFIG)
    image = ImageState(Engine(model), volume, geometry.model_spacing)
    for params, prompt in (({"foreground": [CLICK]}, lambda o: o.add_point(orientation.point(CLICK[::-1], shape))),
                           ({"roi": [60, 110, 40, 90, 24, 24]}, lambda o: o.add_box(z, (y0, x0), (y1 - 1, x1 - 1)))):
        # In the file's voxel order, then (z, y, x) -> [i, j, k]
        expected = orientation.volume_back(prompt(InteractiveObject(image)).full_mask()).transpose(2, 1, 0)
        assert 1000 < expected.sum() < expected.size / 2, expected.sum()  # a real, partial mask
        label, _ = _label(server, IMAGE, {**params, "label": "liver", "client_id": f"library-{sorted(params)[0]}"})
        assert label.shape == expected.shape
        disagree = int((label.astype(bool) != expected.astype(bool)).sum())
        assert disagree <= 0.001 * expected.sum(), (params, disagree, int(expected.sum()))


def test_an_image_uploaded_with_every_click_keeps_its_session(server, tmp_path):
    """MITK uploads the image it shows with each click (as the request's ``file``, no image id, no client id):
    the second click on the same image is an edit of the first one's object, on the image already open."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(server.image_path("phantom_02")))
    voxels = sitk.GetArrayFromImage(image)
    voxels[0, 0, 0] += 1  # content no other test uploads
    copy = sitk.GetImageFromArray(voxels)
    copy.CopyInformation(image)
    sitk.WriteImage(copy, str(tmp_path / "post_from_mitk.nii.gz"))
    content = (tmp_path / "post_from_mitk.nii.gz").read_bytes()

    def click(points):
        files = {"file": ("post_from_mitk.nii.gz", content, "application/octet-stream")}
        r = server.infer("", {"foreground": points, "background": []}, output=None, files=files)
        assert r.status_code == 200, r.text[:300]
        return server.multipart(r)[0]

    first = click([[80, 64, 24]])
    assert first["cache"] == "new_object" and not first["image_cached"]
    second = click([[80, 64, 24], [84, 60, 24]])
    assert second["cache"] == "edit" and second["image_cached"]
    assert click([[80, 64, 24]])["cache"] == "undo"  # MITK's point removal: the object's step before


def test_a_session_rebuilt_from_a_request_gives_the_mask_of_the_clicks_sent_one_at_a_time(server):
    """A request whose session is gone (evicted, expired, or another annotator's under the same client id) is
    replayed one prompt at a time: the same mask as the clicks sent one per request, and undo goes back one click."""
    clicks = [CLICK, [84, 60, 24], [76, 70, 26]]
    base = {"label": "replayed"}
    steps = []
    for n in range(1, 4):
        label, reply = _label(server, IMAGE, {**base, "client_id": "one-at-a-time", "foreground": clicks[:n]})
        assert reply["cache"] == ("new_object" if n == 1 else "edit")
        steps.append(label)
    assert (steps[2] != steps[1]).sum() > 100 and (steps[1] != steps[0]).sum() > 100
    at_once, reply = _label(server, IMAGE, {**base, "client_id": "all-at-once", "foreground": clicks})
    assert reply["cache"] == "new_object" and reply["timings"]["model_steps"] == 3
    assert 0 < reply["timings"]["model_total"] <= reply["timings"]["interact"]
    np.testing.assert_array_equal(at_once, steps[2])
    undone, reply = _label(server, IMAGE, {**base, "client_id": "all-at-once", "undo": True})
    assert reply["cache"] == "undo"
    np.testing.assert_array_equal(undone, steps[1])
    # A box and a click: the box first, then the click as an edit.
    box = {"slice": 24, "corners": [[60, 40], [100, 90]]}
    _label(server, IMAGE, {**base, "client_id": "box-then-click", "box": box})
    edited, reply = _label(server, IMAGE, {**base, "client_id": "box-then-click", "box": box, "foreground": [CLICK]})
    assert reply["cache"] == "edit"
    together, _ = _label(server, IMAGE, {**base, "client_id": "box-and-click", "box": box, "foreground": [CLICK]})
    np.testing.assert_array_equal(together, edited)


def test_clicks_added_together_are_edits_one_click_at_a_time(server):
    """A viewer that sends several new clicks in one request (OHIF when Run is pressed after a few clicks) gets the
    mask of those clicks sent one per request, and undo goes back one click, as on a rebuilt session."""
    clicks = [CLICK, [84, 60, 24], [76, 70, 26]]
    base = {"label": "added-together"}
    one_by_one = [_label(server, IMAGE, {**base, "client_id": "single-clicks", "foreground": clicks[:n]})[0]
                  for n in range(1, 4)]
    _label(server, IMAGE, {**base, "client_id": "clicks-together", "foreground": clicks[:1]})
    together, reply = _label(server, IMAGE, {**base, "client_id": "clicks-together", "foreground": clicks})
    assert reply["cache"] == "edit" and reply["timings"]["model_steps"] == 2
    assert reply["prompts"] == {"foreground": 3, "background": 0}
    np.testing.assert_array_equal(together, one_by_one[2])
    undone, reply = _label(server, IMAGE, {**base, "client_id": "clicks-together", "undo": True})
    assert reply["cache"] == "undo" and reply["prompts"] == {"foreground": 2, "background": 0}
    np.testing.assert_array_equal(undone, one_by_one[1])


def test_reset_with_prompts_starts_the_object_anew_from_them(server):
    base = {"label": "reset-and-start", "client_id": "reset-start"}
    fresh, _ = _label(server, IMAGE, {**base, "client_id": "reset-start-fresh", "foreground": [[84, 60, 24]]})
    _label(server, IMAGE, {**base, "foreground": [CLICK]})
    anew, reply = _label(server, IMAGE, {**base, "reset": True, "foreground": [[84, 60, 24]]})
    assert reply["cache"] == "new_object" and reply["prompts"] == {"foreground": 1, "background": 0}
    np.testing.assert_array_equal(anew, fresh)
    undone = server.infer_ok(IMAGE, {**base, "undo": True}).json()  # back to before the new first click
    assert undone["cache"] == "undo" and undone["roi"] is None
    r = server.infer(IMAGE, {**base, "undo": True})  # the reset left the earlier click nothing to undo to
    assert r.status_code == 409 and "nothing to undo" in r.json()["detail"]


def test_segments_that_name_no_object_keep_their_sessions_apart(server):
    """OHIF's point prompts send each segment's clicks and no label: switching to another segment and back edits
    the first segment's session (its first click tells it apart) instead of rebuilding it."""
    base = {"client_id": "unnamed-segments"}
    a = [CLICK, [84, 60, 24], [76, 70, 26]]
    b = [[40, 70, 20]]
    server.infer_ok(IMAGE, {**base, "foreground": a[:1]})
    two, reply = _label(server, IMAGE, {**base, "foreground": a[:2]})
    assert reply["cache"] == "edit" and reply["label_names"] == {"object": 1}
    other = server.infer_ok(IMAGE, {**base, "foreground": b}).json()
    assert other["cache"] == "new_object" and other["label"] == "object"
    three, reply = _label(server, IMAGE, {**base, "foreground": a})
    assert reply["cache"] == "edit" and reply["cache_hit"] is True
    undone, reply = _label(server, IMAGE, {**base, "undo": True})  # the latest segment's last click
    assert reply["cache"] == "undo" and reply["prompts"] == {"foreground": 2, "background": 0}
    np.testing.assert_array_equal(undone, two)
    fresh, _ = _label(server, IMAGE, {"client_id": "unnamed-fresh", "foreground": a})
    np.testing.assert_array_equal(three, fresh)


def test_an_object_named_like_the_unnamed_ones_is_not_taken_for_one(server):
    """A label 'object' (the name replies give unnamed objects) keeps its own session: an undo or reset that names
    no object does not reach it."""
    base = {"client_id": "named-object"}
    server.infer_ok(IMAGE, {**base, "label": "object", "foreground": [CLICK]})
    server.infer_ok(IMAGE, {**base, "label": "object", "foreground": [CLICK, [84, 60, 24]]})
    r = server.infer(IMAGE, {**base, "undo": True})
    assert r.status_code == 409 and r.json()["detail"].startswith("nothing to undo"), r.text
    assert server.infer_ok(IMAGE, {**base, "reset": True}).json()["cache"] == "reset"
    reply = server.infer_ok(IMAGE, {**base, "label": "object", "foreground": [CLICK, [84, 60, 24]]}).json()
    assert reply["cache"] == "repeat", reply


def test_a_client_keeps_a_bounded_number_of_unnamed_objects_per_image(server):
    import sys

    from conftest import APP_DIR

    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))
    from lib.infers.raps3d import MAX_UNNAMED_OBJECTS

    base = {"client_id": "many-unnamed"}
    firsts = [[60 + 4 * n, 50 + 3 * (n % 4), 24] for n in range(MAX_UNNAMED_OBJECTS + 1)]
    for first in firsts:
        assert server.infer_ok(IMAGE, {**base, "foreground": [first]}).json()["cache"] == "new_object"
    # The latest MAX_UNNAMED_OBJECTS are kept; the oldest was dropped, so its click is a new object again.
    assert server.infer_ok(IMAGE, {**base, "foreground": [firsts[1]]}).json()["cache"] == "repeat"
    assert server.infer_ok(IMAGE, {**base, "foreground": [firsts[0]]}).json()["cache"] == "new_object"


def test_session_is_taken_as_the_client_id(server):
    base = {"label": "alias", "foreground": [CLICK]}
    reply = server.infer_ok(IMAGE, {**base, "session": "by-session-name"}).json()
    assert reply["client_id"] == "by-session-name" and reply["cache"] == "new_object"
    reply = server.infer_ok(IMAGE, {**base, "client_id": "by-session-name"}).json()
    assert reply["cache"] == "repeat"


def test_replay_takes_the_box_or_first_point_then_one_point_per_step():
    import sys

    from conftest import APP_DIR

    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))
    from lib.interaction import MAX_REPLAY_STEPS, replay_steps
    from lib.prompts import parse_prompts

    size = (160, 128, 48)
    prompts = parse_prompts({"foreground": [[1, 2, 3], [4, 5, 6]], "background": [[7, 8, 9]]}, size)
    assert replay_steps(prompts) == [((((3.0, 2.0, 1.0), True),), None), ((((6.0, 5.0, 4.0), True),), None),
                                     ((((9.0, 8.0, 7.0), False),), None)]
    prompts = parse_prompts({"box": {"slice": 4, "corners": [[10, 20], [30, 40]]}, "background": [[7, 8, 9]]}, size)
    assert replay_steps(prompts) == [((), (4, (20, 10), (40, 30))), ((((9.0, 8.0, 7.0), False),), None)]
    many = parse_prompts({"foreground": [[i, i, 1] for i in range(100)]}, size)
    steps = replay_steps(many)
    # The earliest points after the first go together: the latest stay one per step, for undo.
    assert len(steps) == MAX_REPLAY_STEPS and len(steps[1][0]) == 100 - MAX_REPLAY_STEPS + 1
    assert all(len(points) == 1 for points, _ in steps[:1] + steps[2:])
    assert [p for points, _ in steps for p in points] == list(many.points)
