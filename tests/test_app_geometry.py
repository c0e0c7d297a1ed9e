"""Reply labels carry the image's exact geometry, in NRRD (as OHIF and 3D Slicer ask) and NIfTI alike."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import SimpleITK as sitk

from conftest import real_ct_path

# (image id, a click [i, j, k] well inside the body)
CASES = [
    ("phantom_02", [80, 64, 24]),  # 0.9 x 0.9 x 3 mm
    ("example_ct", [60, 50, 56]),  # real CT, 3 mm, direction diag(-1, -1, 1)
    ("openkbp_pt_201", [64, 64, 64]),  # real CT, 5.4 x 5.4 x 3 mm, direction diag(1, 1, -1)
]


def _assert_same_geometry(label: sitk.Image, image: sitk.Image):
    assert label.GetSize() == image.GetSize()
    np.testing.assert_allclose(label.GetSpacing(), image.GetSpacing(), rtol=1e-7)
    np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin(), rtol=1e-7, atol=1e-6)
    np.testing.assert_allclose(label.GetDirection(), image.GetDirection(), atol=1e-7)


@pytest.mark.parametrize("image_id,click", CASES, ids=[c[0] for c in CASES])
def test_nrrd_and_nifti_replies_have_the_image_geometry(server, tmp_path, image_id, click):
    if image_id != "phantom_02":
        real_ct_path(image_id)  # skips when the data folder is absent
    image = sitk.ReadImage(str(server.image_path(image_id)))
    params = {"foreground": [click], "label": "liver", "client_id": "geometry"}

    # OHIF: raw uint8 NRRD, output=image.
    r = server.infer_ok(image_id, {**params, "result_extension": ".nrrd", "result_dtype": "uint8",
                                   "result_compress": False}, output="image")
    voxels, header = server.nrrd_label(r.content)
    assert header["encoding"] == "raw" and header["type"] == "uint8"
    assert list(header["sizes"]) == list(image.GetSize()) and voxels.shape == image.GetSize()
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    # NRRD's space directions are the axis vectors: column a of the direction matrix times spacing a.
    np.testing.assert_allclose(np.asarray(header["space directions"]), (direction * image.GetSpacing()).T,
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(header["space origin"], image.GetOrigin(), rtol=1e-12)
    assert header["space"] == "left-posterior-superior"
    _assert_same_geometry(server.image_from_bytes(r.content, ".nrrd", tmp_path), image)

    # Default (.nii.gz), multipart: the same voxels.
    reply, content, filename = server.multipart(server.infer_ok(image_id, params, output=None))
    assert reply["cache"] == "repeat" and filename.endswith(".nii.gz")
    nifti = server.image_from_bytes(content, ".nii.gz", tmp_path)
    _assert_same_geometry(nifti, image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(nifti).transpose(2, 1, 0), voxels)

    # The mask lies inside the reported ROI (i, j, k, inclusive), and the click's voxel is inside too.
    i0, i1, j0, j1, k0, k1 = reply["roi"]
    outside = voxels.copy()
    outside[i0:i1 + 1, j0:j1 + 1, k0:k1 + 1] = 0
    assert not outside.any()
    assert i0 <= click[0] <= i1 and j0 <= click[1] <= j1 and k0 <= click[2] <= k1


def test_compressed_nrrd_and_other_dtypes_hold_the_same_voxels(server):
    params = {"foreground": [[80, 64, 24]], "label": "liver", "client_id": "formats"}
    raw, _ = server.nrrd_label(server.infer_ok("phantom_02", {**params, "result_extension": ".nrrd"},
                                               output="image").content)
    packed, header = server.nrrd_label(server.infer_ok("phantom_02", {
        **params, "result_extension": ".nrrd", "result_compress": True, "result_dtype": "int16"},
        output="image").content)
    assert header["encoding"] == "gzip" and packed.dtype == np.int16
    np.testing.assert_array_equal(packed, raw)


def test_the_same_ct_stored_in_another_voxel_order_gets_the_same_label(server, tmp_path):
    """The model sees every image in one anatomical orientation: a CT whose file stores its slices, rows or columns
    the other way round (a DICOM series against a NIfTI export, say), or as sagittal or coronal slices (a
    reformatted series), gets the same label, at the same physical voxels, for the same click, box and roi placed on
    the same anatomy (fractional corners and a roi with two middle slices included: both are rounded in the model's
    orientation). A 'box' lies on one of the file's slices: on sagittal or coronal slices it is refused."""
    image = sitk.ReadImage(str(server.image_path("phantom_02")))
    size = image.GetSize()
    click, box = [70, 60, 20], {"slice": 20, "corners": [[55.5, 45], [95, 80.5]]}
    roi = [55.5, 95.5, 45, 80.5, 18, 23]  # six slices: two middle ones

    def stored(order, flip_ijk, point):  # a position [i, j, k] of the image, in the stored copy
        permuted = [point[o] for o in order]
        return [size[o] - 1 - p if f else p for p, o, f in zip(permuted, order, flip_ijk)]

    def back(voxels, order, flip_ijk):  # a label [i, j, k] of the copy, in the image's voxel order
        return np.flip(voxels, [a for a in range(3) if flip_ijk[a]]).transpose(np.argsort(order))

    def labels(image_id, order, flip_ijk):
        low, high = stored(order, flip_ijk, roi[0::2]), stored(order, flip_ijk, roi[1::2])
        prompts = {"click": {"foreground": [stored(order, flip_ijk, click)]},
                   "roi": {"roi": [v for pair in zip(low, high) for v in pair]}}
        if order == (0, 1, 2):
            prompts["box"] = {"box": {"slice": stored(order, flip_ijk, [0, 0, box["slice"]])[2],
                                      "corners": [stored(order, flip_ijk, c + [0])[:2] for c in box["corners"]]}}
        out = {}
        for name, params in prompts.items():
            r = server.infer_ok(image_id, {**params, "client_id": f"orientation-{name}", "label": image_id,
                                           "result_extension": ".nrrd", "result_dtype": "uint8",
                                           "result_compress": False}, output="image")
            out[name] = back(server.nrrd_label(r.content)[0], order, flip_ijk)
        return out

    reference = labels("phantom_02", (0, 1, 2), (False, False, False))
    assert all(100 < r.sum() < r.size / 2 for r in reference.values()), {k: int(r.sum()) for k, r in reference.items()}
    listing = f"{server.url}/datastore/"
    sagittal, coronal = (1, 2, 0), (0, 2, 1)  # the copy's axis a is the image's axis order[a]
    for order, flip_ijk in [((0, 1, 2), (False, False, True)), ((0, 1, 2), (True, True, False)),
                            ((0, 1, 2), (True, True, True)), (sagittal, (False, True, False)),
                            (coronal, (True, False, True))]:
        copy = sitk.Flip(sitk.PermuteAxes(image, order), flip_ijk)  # the same physical voxels, stored otherwise
        assert copy.GetDirection() != image.GetDirection()
        path = tmp_path / "copy.nii.gz"
        sitk.WriteImage(copy, str(path))
        image_id = f"phantom_02_stored_{''.join(map(str, order))}_{''.join('ijk'[a] for a in range(3) if flip_ijk[a])}"
        r = requests.put(f"{server.url}/datastore/image", params={"image": image_id},
                         files={"file": ("copy.nii.gz", path.read_bytes(), "application/octet-stream")},
                         data={"params": "{}"}, timeout=60)
        assert r.status_code == 200, r.text
        try:
            got = labels(image_id, order, flip_ijk)
            for name, label in got.items():
                np.testing.assert_array_equal(label, reference[name], err_msg=f"{image_id} {name}")
            if order != (0, 1, 2):
                assert set(got) == {"click", "roi"}
                r = server.infer(image_id, {"box": {"slice": 20, "corners": [[10, 10], [30, 30]]}})
                plane = "sagittal" if order == sagittal else "coronal"
                assert r.status_code == 400 and f"this image is stored as {plane} slices" in r.json()["detail"], \
                    r.text
        finally:
            requests.delete(listing, params={"id": image_id}, timeout=60)
