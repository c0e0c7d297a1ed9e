"""Bad requests get a 4xx with a clear message, change no session, and the server keeps working."""

from __future__ import annotations

import pytest

from conftest import BAD_IMAGES

IMAGE = "phantom_03"
CLICK = [80, 64, 24]


@pytest.mark.parametrize("params,fragment", [
    ({"foreground": [[80, 64]]}, "three numbers [i, j, k]"),
    ({"foreground": [[80, "x", 3]]}, "must be a number"),
    ({"foreground": [[1000, 64, 24]]}, "lies outside the image of size [160, 128, 48]"),
    ({"foreground": [[80, 64, -1]]}, "lies outside"),
    ({"foreground": "80, 64, 24"}, "must be a list of points"),
    ({}, "no prompt"),
    ({"label": "liver"}, "no prompt"),
    ({"background": [CLICK]}, "background points alone cannot make an object"),
    ({"box": {"slice": 24, "corners": [[60, 40], [60, 90]]}}, "has no area"),
    ({"box": {"slice": 99, "corners": [[60, 40], [90, 90]]}}, "outside the image's 48 slices"),
    ({"box": [60, 40, 90, 90]}, "'box' must be"),
    ({"roi": [1, 2, 3]}, "'roi' must be"),
    ({"roi": [60, 90, 40, 90, 24, 24], "box": {"slice": 24, "corners": [[60, 40], [90, 90]]}}, "not both"),
    ({"foreground": [CLICK], "result_extension": ".png"}, "result_extension '.png' is not supported"),
    ({"foreground": [CLICK], "result_dtype": "complex64"}, "result_dtype 'complex64' is not supported"),
    ({"foreground": [CLICK], "reset": True, "undo": True}, "either 'reset' or 'undo'"),
    ({"foreground": [CLICK], "reset": "yes please"}, "'reset' must be true or false, got 'yes please'"),
    ({"foreground": [CLICK], "undo": [1]}, "'undo' must be true or false"),
    ({"foreground": [CLICK], "client_id": ["alice"]}, "'client_id' must be a name, got ['alice']"),
    ({"foreground": [CLICK], "label": {"name": "liver"}}, "'label' must be a name, got {'name': 'liver'}"),
    ({"foreground": [CLICK], "label": "L" * 201}, "'label' must be at most 200 characters, got 201"),
    ({"foreground": [CLICK], "client_id": "c" * 300}, "'client_id' must be at most 200 characters, got 300"),
    ({"foreground": [CLICK] * 100, "background": [[1, 1, 1]] * 29}, "at most 128 points per object, got 129"),
])
def test_malformed_prompts_are_400(server, params, fragment):
    r = server.infer(IMAGE, {"client_id": "bad-prompts", **params})
    assert r.status_code == 400, r.text
    assert fragment in r.json()["detail"]


def test_a_label_upload_and_dicom_seg_output_are_400_before_anything_runs(server):
    """Neither is used by Raps-3D; MONAI Label took both: a label upload named the object after the server's
    temporary copy (a new object, the whole encoder, on every click), and a failed DICOM SEG reply left the label in
    the temporary folder."""
    scratch = server.log.parent / "tmp"
    before = set(scratch.iterdir())
    r = server.infer(IMAGE, {"foreground": [CLICK]}, files={"label": ("l.bin", bytes(160 * 128 * 48))})
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("Raps-3D takes no 'label' upload")
    r = server.infer(IMAGE, {"foreground": [CLICK], "label_info": [{"name": "liver"}]}, output="dicom_seg")
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("output 'dicom_seg' is not offered")
    assert set(scratch.iterdir()) <= before  # nothing new (an earlier request's folder may go meanwhile)


def test_unknown_model_or_strategy_is_404_naming_what_there_is(server):
    import requests

    r = server.infer(IMAGE, {"foreground": [CLICK]}, model="segvol")
    assert r.status_code == 404 and r.json()["detail"] == "no model 'segvol'; there is 'raps3d'", r.text
    r = requests.post(f"{server.url}/activelearning/most_uncertain", json={}, timeout=60)
    assert r.status_code == 404, r.text
    assert r.json()["detail"].startswith("no strategy 'most_uncertain'; there is ") and "'raps3d_uncertain'" in r.text


def test_params_nested_too_deeply_are_400(server):
    import requests

    r = requests.post(f"{server.url}/infer/raps3d", params={"image": IMAGE},
                      data={"params": "[" * 100000 + "]" * 100000}, timeout=60)
    assert r.status_code == 400 and r.json()["detail"] == "params is nested too deeply", r.text


def test_unknown_image_is_404(server):
    r = server.infer("no_such_image", {"foreground": [CLICK]})
    assert r.status_code == 404
    assert r.json()["detail"] == "image 'no_such_image' is not in the datastore"


def test_a_request_without_an_image_is_400_saying_how_to_give_one(server):
    r = server.infer("", {"foreground": [CLICK]})
    assert r.status_code == 400 and r.json()["detail"].startswith("no image: name one of the datastore's images")
    import json

    import requests

    r = requests.post(f"{server.url}/infer/raps3d", params={"session_id": "gone"},
                      data={"params": json.dumps({"foreground": [CLICK]})}, timeout=60)
    assert r.status_code == 400 and "(session 'gone' is not one)" in r.json()["detail"], r.text


@pytest.mark.parametrize("image_id,fragment", [
    ("corrupt", "cannot read 'corrupt.nii.gz' as an image"),
    ("flat2d", "the image is 2D"),
    ("rgb", "3 values per voxel"),
    ("nan", "NaN or infinite"),
    ("oneslice", "single slice"),
    ("mr", "'mr.nii.gz' does not look like CT in Hounsfield units"),
])
def test_images_that_are_not_ct_volumes_are_422(server, image_id, fragment):
    assert image_id in BAD_IMAGES
    r = server.infer(image_id, {"foreground": [[1, 1, 0]]})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert fragment in detail
    assert str(server.studies) not in detail  # no server folders in messages


def test_an_uploaded_file_that_is_not_an_image_is_422(server):
    files = {"file": ("upload.nii.gz", b"definitely not a NIfTI file", "application/octet-stream")}
    r = server.infer("", {"foreground": [[1, 1, 1]]}, files=files)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("cannot read the uploaded file as an image: ")
    # Whether the image was uploaded is the server's to say: a client's claim in params is dropped.
    r = server.infer("corrupt", {"foreground": [[1, 1, 0]], "raps3d_uploaded_image": True})
    assert r.status_code == 422 and r.json()["detail"].startswith("cannot read 'corrupt.nii.gz' as an image"), r.text


def test_a_ct_clipped_to_a_display_window_is_422_saying_how_to_send_it(server, tmp_path):
    """MITK uploads the image as its display window shows it: with a soft-tissue window, air is clipped to -160."""
    import numpy as np
    import SimpleITK as sitk

    from conftest import SAMPLE_IMAGES

    image = sitk.ReadImage(str(SAMPLE_IMAGES / f"{IMAGE}.nii.gz"))
    clipped = sitk.GetImageFromArray(np.clip(sitk.GetArrayFromImage(image), -160, 240).astype(np.int16))
    clipped.CopyInformation(image)
    sitk.WriteImage(clipped, str(tmp_path / "post_from_mitk.nii.gz"))
    files = {"file": ("post_from_mitk.nii.gz", (tmp_path / "post_from_mitk.nii.gz").read_bytes(),
                      "application/octet-stream")}
    r = server.infer("", {"foreground": [CLICK]}, files=files)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith("the uploaded file does not look like CT in Hounsfield units: its lowest value is "
                             "-160") and "as in a CT clipped to a display window" in detail
    assert "send it unclipped, or with a window that starts at or below -250 HU" in detail


def test_undo_without_a_session_is_409(server):
    r = server.infer(IMAGE, {"undo": True, "client_id": "never-seen", "label": "liver"})
    assert r.status_code == 409
    assert "nothing to undo" in r.json()["detail"] and "never-seen" in r.json()["detail"]


def test_a_rejected_request_leaves_the_session_as_it_was_and_the_server_working(server):
    base = {"client_id": "after-errors", "label": "liver"}
    first = server.infer(IMAGE, {**base, "foreground": [CLICK]})
    assert first.status_code == 200
    for bad in ({**base, "foreground": [CLICK, [1, 2]]}, {**base, "foreground": [CLICK, [9999, 1, 1]]}):
        assert server.infer(IMAGE, bad).status_code == 400
    assert server.infer("corrupt", {**base, "foreground": [[1, 1, 0]]}).status_code == 422
    edit = server.infer(IMAGE, {**base, "foreground": [CLICK, [82, 66, 24]]})
    assert edit.status_code == 200 and edit.json()["cache"] == "edit"


def test_a_refused_request_keeps_the_undo_history_and_a_refused_reset_resets_nothing(server):
    base = {"client_id": "refused-keeps", "label": "liver"}
    one = server.infer_ok(IMAGE, {**base, "foreground": [CLICK]}).json()
    two = server.infer_ok(IMAGE, {**base, "foreground": [CLICK], "background": [[40, 50, 24]]}).json()
    assert two["cache"] == "edit"
    for refused in ({**base, "background": [[40, 50, 24]]},  # the viewer dropped the foreground click
                    {**base, "reset": True, "background": [[40, 50, 24]]}):
        r = server.infer(IMAGE, refused)
        assert r.status_code == 400 and "background points alone" in r.json()["detail"]
    undone = server.infer_ok(IMAGE, {**base, "undo": True}).json()
    assert undone["cache"] == "undo" and undone["roi"] == one["roi"]
    assert undone["prompts"] == {"foreground": 1, "background": 0}


def test_a_label_name_that_is_not_a_name_is_400(server):
    for label in (["liver"], {"name": "liver"}, True):
        r = server.infer(IMAGE, {"client_id": "label-names", "label": label, "foreground": [CLICK]})
        assert r.status_code == 400 and "'label' must be" in r.json()["detail"], (label, r.text)


def test_a_refused_upload_leaves_no_copy_in_the_temporary_folder(server):
    from conftest import SAMPLE_IMAGES

    scratch = server.log.parent / "tmp"  # the server's TMPDIR
    before = set(scratch.iterdir())
    ct = (SAMPLE_IMAGES / f"{IMAGE}.nii.gz").read_bytes()
    for files, params, status in (
            ({"file": ("upload.nii.gz", ct, "application/octet-stream")}, {"foreground": [[9999, 1, 1]]}, 400),
            ({"file": ("upload.nii.gz", b"not a NIfTI file", "application/octet-stream")},
             {"foreground": [[1, 1, 1]]}, 422)):
        r = server.infer("", params, files=files)
        assert r.status_code == status, r.text
        left = set(scratch.iterdir()) - before  # (an earlier reply's files may be removed meanwhile)
        assert not left, f"an upload of a refused request was left behind: {sorted(p.name for p in left)}"
