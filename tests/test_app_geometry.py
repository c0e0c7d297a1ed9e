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
    the other way round (a DICOM series against a NIfTI export, say) gets the same label, at the same physical
    voxels, for the same click, box and roi placed on the same anatomy (fractional corners and a roi with two middle
    slices included: both are rounded in the model's orientation)."""
    image = sitk.ReadImage(str(server.image_path("phantom_02")))
    size = image.GetSize()
    click, box = [70, 60, 20], {"slice": 20, "corners": [[55.5, 45], [95, 80.5]]}
    roi = [55.5, 95.5, 45, 80.5, 18, 23]  # six slices: two middle ones

    def stored(flip_ijk, point):  # a voxel [i, j, k] of the image, in the flipped copy
        return [n - 1 - p if f else p for p, n, f in zip(point, size, flip_ijk)]

    def labels(image_id, flip_ijk):
        out = []
        low, high = stored(flip_ijk, roi[0::2]), stored(flip_ijk, roi[1::2])
        for name, params in (("click", {"foreground": [stored(flip_ijk, click)]}),
                             ("box", {"box": {"slice": stored(flip_ijk, [0, 0, box["slice"]])[2],
                                              "corners": [stored(flip_ijk, c + [0])[:2] for c in box["corners"]]}}),
                             ("roi", {"roi": [v for pair in zip(low, high) for v in pair]})):
            r = server.infer_ok(image_id, {**params, "client_id": f"orientation-{name}", "label": image_id,
                                           "result_extension": ".nrrd", "result_dtype": "uint8",
                                           "result_compress": False}, output="image")
            voxels = server.nrrd_label(r.content)[0]
            out.append(np.flip(voxels, [a for a in range(3) if flip_ijk[a]]))  # back to the image's voxel order
        return out

    reference = labels("phantom_02", (False, False, False))
    assert all(100 < r.sum() < r.size / 2 for r in reference), [int(r.sum()) for r in reference]  # partial masks
    listing = f"{server.url}/datastore/"
    for flip_ijk in [(False, False, True), (True, True, False), (True, True, True)]:
        copy = sitk.Flip(image, flip_ijk)  # the same physical voxels, stored in another order
        assert copy.GetDirection() != image.GetDirection()
        path = tmp_path / "copy.nii.gz"
        sitk.WriteImage(copy, str(path))
        image_id = "phantom_02_flipped_" + "".join("ijk"[a] for a in range(3) if flip_ijk[a])
        r = requests.put(f"{server.url}/datastore/image", params={"image": image_id},
                         files={"file": ("copy.nii.gz", path.read_bytes(), "application/octet-stream")},
                         data={"params": "{}"}, timeout=60)
        assert r.status_code == 200, r.text
        try:
            for got, want in zip(labels(image_id, flip_ijk), reference):
                np.testing.assert_array_equal(got, want)
        finally:
            requests.delete(listing, params={"id": image_id}, timeout=60)
