"""The Raps-3D app over a real DICOMweb server (a test Orthanc): listing, fetching and decoding series (JPEG 2000 and
other transfer syntaxes), refusing series that would be distorted volumes, labels aligned with the series, and
``final`` labels written back to the server as DICOM SEG that reference the series and hold the saved voxels.

Requests are what OHIF sends (image = SeriesInstanceUID, NRRD replies); see test_slicer_client.py for 3D Slicer's.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import requests
import SimpleITK as sitk

from conftest import APP_DIR, DATA_ROOT, ROOT
from dicomweb_fixtures import need_series, transfer_syntax_files

OHIF_PARAMS = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False,
               "restore_label_idx": False}
TS_NAMES = sorted(transfer_syntax_files(DATA_ROOT)) or ["(data folder absent)"]
REFERENCE_SLICE = "LittleEndianExplicit"  # the uncompressed encoding of the transfer-syntax test slice


def _like(array: np.ndarray, image: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def _nrrd_geometry(header) -> tuple:
    directions = np.asarray(header["space directions"], float)  # rows: the i, j, k axis vectors (LPS)
    spacing = np.linalg.norm(directions, axis=1)
    return (tuple(int(n) for n in header["sizes"]), spacing, np.asarray(header["space origin"], float),
            (directions / spacing[:, None]).T)  # columns: axis directions, as ITK's direction matrix


def _served_image(srv, series_uid: str, tmp_path) -> sitk.Image:
    """The volume the app segments: MONAI Label's conversion of the series, downloaded from the server."""
    r = requests.get(f"{srv.url}/datastore/image", params={"image": series_uid}, timeout=120)
    assert r.status_code == 200, f"{r.status_code}: {r.text[:300]}"
    return srv.image_from_bytes(r.content, ".nii.gz", tmp_path)


def _ohif_infer(srv, series_uid: str, params: dict):
    r = srv.infer(series_uid, {**params, **OHIF_PARAMS}, output="image")
    assert r.status_code == 200, f"{r.status_code}: {r.text[:500]}\n{srv.log_tail()}"
    return srv.nrrd_label(r.content)


# -- the DICOMweb server and the app's start ------------------------------------------------------------------------
def test_test_orthanc_serves_dicomweb_and_requires_credentials(orthanc):
    qido = f"{orthanc.dicomweb}/series"
    assert requests.get(qido, timeout=30).status_code == 401
    series = requests.get(qido, auth=orthanc.auth, timeout=30).json()
    uids = {s["0020000E"]["Value"][0] for s in series}
    assert {s.series_uid for s in orthanc.series.values()} <= uids
    phantom = orthanc.series["phantom"]
    assert phantom.files == 48 and phantom.transfer_syntax == "1.2.840.10008.1.2.1"


def test_server_started_over_dicomweb_without_downloading_anything(dicomweb_server):
    info = requests.get(f"{dicomweb_server.url}/info/", timeout=30).json()
    assert info["models"]["raps3d"]["type"] == "deepgrow"
    log = dicomweb_server.log.read_text(errors="replace")
    assert "DICOMweb studies" in log and "dcmqi-1.2.4" not in log and "Downloading" not in log
    assert not (APP_DIR / "bin" / "itkimage2segimage").exists()  # dcmqi comes from the Python package, not a download


def test_next_sample_lists_the_series_of_the_server(dicomweb_server, orthanc):
    ct_series = {s.series_uid for s in orthanc.series.values()}
    seen = set()
    for strategy in ("first", "random", "raps3d_uncertain"):
        r = requests.post(f"{dicomweb_server.url}/activelearning/{strategy}", json={}, timeout=120)
        assert r.status_code == 200, f"{strategy}: {r.status_code} {r.text[:300]}"
        seen.add(r.json()["id"])
    assert seen and seen <= ct_series


def test_unknown_series_is_404_not_500(dicomweb_server):
    r = dicomweb_server.infer("1.2.3.4.5.6.7.8.9", {"foreground": [[1, 1, 1]]})
    assert r.status_code == 404 and "not on the DICOMweb server" in r.json()["detail"]


def test_the_proxy_forwards_dicomweb_paths_only(dicomweb_server, orthanc):
    url = f"{dicomweb_server.url}/proxy/dicom"
    phantom = orthanc.series["phantom"]
    r = requests.get(f"{url}/qido/studies", params={"StudyInstanceUID": phantom.study_uid}, timeout=30)
    assert r.status_code == 200 and [s["0020000D"]["Value"][0] for s in r.json()] == [phantom.study_uid]
    # Percent-encoded traversal would reach the PACS's own REST API (here Orthanc's /system) with its credentials.
    for method, path in (("GET", "qido/..%2F..%2Fsystem"), ("GET", "wado/..%2Fdicom-web%2Fstudies"),
                         ("GET", "stow/..%2F..%2Fsystem"), ("POST", "stow/..%2F..%2Ftools%2Freset"),
                         ("GET", "..%2Fsystem"), ("GET", "qido/studies%3Flimit=1")):
        r = requests.request(method, f"{url}/{path}", timeout=30)
        assert r.status_code == 400 and r.json()["detail"] == "not a DICOMweb resource path", (method, path, r.text)
    # OHIF's rejection note is a coded value with a caret: forwarded (this server has no such service: 404).
    r = requests.post(f"{url}/qido/studies/{phantom.study_uid}/reject/113001%5EDCM", timeout=30)
    assert r.status_code == 404, r.text


# -- decoding and geometry ------------------------------------------------------------------------------------------
def test_uncompressed_phantom_series_matches_its_nifti_twin(dicomweb_server, orthanc, tmp_path):
    phantom = orthanc.series["phantom"]
    label, header = _ohif_infer(dicomweb_server, phantom.series_uid, {"foreground": [[80, 64, 24]], "label": "liver"})
    twin = sitk.ReadImage(str(ROOT / "sample-data" / "images" / "phantom_01.nii.gz"))
    size, spacing, origin, direction = _nrrd_geometry(header)
    assert size == twin.GetSize() == label.shape
    np.testing.assert_allclose(spacing, twin.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(origin, twin.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(direction.ravel(), twin.GetDirection(), atol=1e-6)
    served = _served_image(dicomweb_server, phantom.series_uid, tmp_path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(served), sitk.GetArrayFromImage(twin))
    assert label[80, 64, 24] in (0, 1) and set(np.unique(label)) <= {0, 1}


def test_jpeg2000_series_decodes_and_the_label_is_aligned_with_the_reference(dicomweb_server, orthanc, tmp_path):
    j2k = need_series(orthanc, "j2k", DATA_ROOT)
    assert j2k.transfer_syntax == "1.2.840.10008.1.2.4.90" and j2k.files == 20  # JPEG 2000 lossless, as stored
    reference_path = DATA_ROOT / "totalsegmentator" / "example_seg_dicom.nii.gz"
    if not reference_path.exists():
        pytest.skip(f"{reference_path} not found")
    # The reference is stored in another axis order (j flipped): compare on the same LPS-ordered grid.
    reference = sitk.DICOMOrient(sitk.ReadImage(str(reference_path)), "LPS")

    label, header = _ohif_infer(dicomweb_server, j2k.series_uid, {"foreground": [[300, 200, 10]], "label": "liver"})
    size, spacing, origin, direction = _nrrd_geometry(header)
    assert size == reference.GetSize() == label.shape == (512, 512, 20)
    np.testing.assert_allclose(spacing, reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(origin, reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(direction.ravel(), reference.GetDirection(), atol=1e-6)

    # The voxels are the series' (decoded here: the test Orthanc cannot transcode JPEG 2000) and line up with the
    # reference labels: liver and spleen hold soft tissue, the aorta contrast-filled blood, the corners air.
    served = _served_image(dicomweb_server, j2k.series_uid, tmp_path)
    assert served.GetSize() == reference.GetSize()
    np.testing.assert_allclose(served.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    hu = sitk.GetArrayFromImage(served).astype(np.float32)
    classes = sitk.GetArrayFromImage(reference)
    direct = sitk.ImageSeriesReader()
    direct.SetFileNames(direct.GetGDCMSeriesFileNames(str(j2k.source)))
    np.testing.assert_array_equal(hu, sitk.GetArrayFromImage(direct.Execute()))  # lossless: the stored values
    for name, value, low, high in (("liver", 5, 30, 200), ("spleen", 1, 30, 200), ("aorta", 52, 100, 500)):
        inside = hu[classes == value]
        assert inside.size > 500, name
        assert low < np.median(inside) < high, f"{name}: median {np.median(inside)} HU"
    assert np.median(hu[:, :20, :20]) < -900  # air in a corner


@pytest.mark.parametrize("name", TS_NAMES)
def test_transfer_syntax_series_decodes_to_the_stored_values(dicomweb_server, orthanc, name, tmp_path):
    series = need_series(orthanc, f"ts:{name}", DATA_ROOT)
    label, header = _ohif_infer(dicomweb_server, series.series_uid, {"foreground": [[256, 256, 1]]})
    assert label.shape == (512, 512, 3) and tuple(header["sizes"]) == (512, 512, 3)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(header["space directions"], float), axis=1)[2], 2.5,
                               atol=1e-3)
    volume = sitk.GetArrayFromImage(_served_image(dicomweb_server, series.series_uid, tmp_path)).astype(np.float64)
    assert volume.shape == (3, 512, 512)
    if name.endswith("_J2KR"):  # a vendor's own JPEG 2000 slice: the values GDCM decodes from the file itself
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(str(series.source))
        expected = sitk.GetArrayFromImage(reader.Execute())[0].astype(np.float64)
    else:  # the same slice, uncompressed, decoded without any codec (pydicom, raw pixels, rescaled to HU)
        import pydicom

        ds = pydicom.dcmread(orthanc.series[f"ts:{REFERENCE_SLICE}"].source)
        expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert expected.std() > 100  # a real CT slice, not a flat image
    for k in range(3):
        if series.lossless:
            np.testing.assert_array_equal(volume[k], expected, err_msg=f"{name} slice {k}")
        else:  # lossy JPEG / JPEG-LS / JPEG 2000: close, not equal
            error = np.abs(volume[k] - expected)
            assert error.mean() < 25 and np.corrcoef(volume[k].ravel(), expected.ravel())[0, 1] > 0.9999, name


def test_multiframe_enhanced_ct_jpeg_file_decodes_and_is_segmented_in_hounsfield_units(dicomweb_server, orthanc,
                                                                                       tmp_path):
    series = need_series(orthanc, "multiframe_jpeg", DATA_ROOT)
    volume = sitk.GetArrayFromImage(_served_image(dicomweb_server, series.series_uid, tmp_path))
    assert volume.shape == (2, 512, 512) and volume.std() > 50
    # The file keeps its rescale (intercept -1024) in the enhanced CT's functional groups, which the conversion does
    # not apply (no air below -250); the app applies it, so the image is segmented rather than refused as not CT.
    assert volume.min() > -250
    # Segmented (this server's model is untrained: the mask's content is not checked here; the rescaled values are,
    # in the unit tests), with the series' geometry.
    label, header = _ohif_infer(dicomweb_server, series.series_uid, {"foreground": [[205, 280, 1]]})
    assert label.shape == (512, 512, 2) and set(np.unique(label)) <= {0, 1}
    spacing = np.linalg.norm(np.asarray(header["space directions"], float), axis=1)
    np.testing.assert_allclose(spacing, [0.38867, 0.38867, 10.0], atol=1e-4)


def test_gantry_tilted_series_is_refused_with_the_reason(dicomweb_server, orthanc):
    series = need_series(orthanc, "gantry_tilt", DATA_ROOT)
    r = dicomweb_server.infer(series.series_uid, {"foreground": [[256, 256, 10]]})
    assert r.status_code == 422, r.text[:300]
    detail = r.json()["detail"]
    assert "gantry-tilted" in detail and "18.5 degrees" in detail and "Resample" in detail


def test_series_with_a_missing_slice_is_refused_with_the_reason(dicomweb_server, orthanc):
    series = orthanc.series["phantom_missing_slice"]
    r = dicomweb_server.infer(series.series_uid, {"foreground": [[80, 64, 24]]})
    assert r.status_code == 422, r.text[:300]
    assert "uneven slice spacing" in r.json()["detail"] and "3.00 to 6.00 mm" in r.json()["detail"]


def test_scoring_records_a_refused_series_and_scores_the_others(dicomweb_server, orthanc):
    missing, phantom = orthanc.series["phantom_missing_slice"], orthanc.series["phantom_unlabelled"]
    # Scoring at start fetches nothing (see below): a viewer opens both series first.
    assert requests.get(f"{dicomweb_server.url}/datastore/image", params={"image": phantom.series_uid},
                        timeout=120).status_code == 200
    assert dicomweb_server.infer(missing.series_uid, {"foreground": [[80, 64, 24]]}).status_code == 422
    # rescore: a pass after an earlier test's hand-out may have scored them already
    r = requests.post(f"{dicomweb_server.url}/scoring/raps3d_uncertainty", params={"run_sync": "true"},
                      json={"rescore": True}, timeout=900)
    assert r.status_code == 200, r.text[:300]
    summary = r.json()
    assert "uneven slice spacing" in summary["failed"][missing.series_uid]
    assert 0.0 <= summary["scored"][phantom.series_uid] <= 1.0  # the pass went on past the refused series
    r = requests.get(f"{dicomweb_server.url}/datastore/", params={"output": "all"}, timeout=60)
    info = r.json()["objects"][missing.series_uid]["image"]["info"]
    assert info["raps3d_uncertainty"] is None and "uneven slice spacing" in info["raps3d_uncertainty_details"]["error"]


# -- final labels as DICOM SEG --------------------------------------------------------------------------------------
def _seg_of(orthanc, study_uid: str, before: set) -> tuple[list, "object"]:
    import pydicom

    new = [s for s in orthanc.find("Series", {"Modality": "SEG", "StudyInstanceUID": study_uid}) if s not in before]
    assert len(new) == 1, f"expected one new SEG series in the study, found {new}"
    instances = orthanc.get_json(f"/series/{new[0]}/instances")
    assert len(instances) == 1
    return new, pydicom.dcmread(__import__("io").BytesIO(orthanc.instance_file(instances[0]["ID"])))


def test_final_label_is_written_to_the_server_as_dicom_seg_with_the_same_voxels(dicomweb_server, orthanc, tmp_path):
    import pydicom_seg

    j2k = need_series(orthanc, "j2k", DATA_ROOT)
    label, header = _ohif_infer(dicomweb_server, j2k.series_uid, {"foreground": [[300, 200, 10]], "label": "liver",
                                                                   "client_id": "seg-test"})
    assert 0 < label.sum() < label.size
    before = set(orthanc.find("Series", {"Modality": "SEG"}))

    # Saved as OHIF and 3D Slicer save: the reply label, the segment names in label_info.
    label_file = tmp_path / "label.nrrd"
    import nrrd

    nrrd.write(str(label_file), label, header, index_order="F")
    r = requests.put(f"{dicomweb_server.url}/datastore/label", params={"image": j2k.series_uid, "tag": "final"},
                     data={"params": json.dumps({"label_info": [{"name": "liver", "idx": 1}]})},
                     files={"label": ("label.nrrd", label_file.read_bytes())}, timeout=300)
    assert r.status_code == 200, f"{r.status_code}: {r.text[:300]}\n{dicomweb_server.log_tail()}"
    assert r.json()["image"] == j2k.series_uid

    _, seg = _seg_of(orthanc, j2k.study_uid, before)
    assert seg.Modality == "SEG" and seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.StudyInstanceUID == j2k.study_uid
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == j2k.series_uid
    ct_sops = {str(i["MainDicomTags"]["SOPInstanceUID"])
               for i in orthanc.get_json(f"/series/{orthanc.series_id(j2k.series_uid)}/instances")}
    referenced_sops = {str(item.ReferencedSOPInstanceUID) for item in referenced.ReferencedInstanceSequence}
    assert referenced_sops == ct_sops
    frame_sources = {str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
                     for f in seg.PerFrameFunctionalGroupsSequence}
    assert frame_sources <= ct_sops
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["liver"]

    # Decoded back (pydicom-seg), on the label's grid: the same voxels.
    decoded = pydicom_seg.MultiClassReader().read(seg).image
    saved = sitk.ReadImage(str(label_file))
    on_grid = sitk.Resample(decoded, saved, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_grid), sitk.GetArrayFromImage(saved))
    np.testing.assert_allclose(decoded.GetSpacing(), saved.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(decoded.GetDirection(), saved.GetDirection(), atol=1e-6)


def test_training_reads_final_labels_back_from_the_server(dicomweb_server, orthanc, tmp_path):
    from test_app_training import wait_for_training

    phantom = orthanc.series["phantom"]
    # The liver, on part of its slices. (MONAI Label's SEG writer keeps empty frames, so the label reads back on the
    # series' grid; SEGs of writers that skip them read back smaller, which training resamples: see the unit tests.)
    reference = sitk.ReadImage(str(ROOT / "sample-data" / "reference" / "phantom_01_seg.nii.gz"))
    partial = (sitk.GetArrayFromImage(reference) == 1).astype(np.uint8)
    partial[30:] = 0
    label_file = tmp_path / "label.nii.gz"
    sitk.WriteImage(_like(partial, reference), str(label_file))
    r = requests.put(f"{dicomweb_server.url}/datastore/label", params={"image": phantom.series_uid, "tag": "final"},
                     data={"params": json.dumps({"label_info": [{"name": "liver", "idx": 1}]})},
                     files={"label": ("label.nii.gz", label_file.read_bytes())}, timeout=300)
    assert r.status_code == 200, f"{r.status_code}: {r.text[:300]}\n{dicomweb_server.log_tail()}"
    # A trial run (publish: never): the labels come back from the server as SEG series, converted to label maps.
    r = requests.post(f"{dicomweb_server.url}/train/raps3d", json={"steps": 2, "batch_size": 2, "publish": "never"},
                      timeout=60)
    assert r.status_code == 200, r.text
    task = wait_for_training(dicomweb_server)
    stats = requests.get(f"{dicomweb_server.url}/info/", timeout=30).json()["train_stats"]["raps3d"]
    assert task["status"] == "DONE" and stats["status"] == "FINISHED", (task, stats, dicomweb_server.log_tail())
    assert phantom.series_uid in set(stats["train_images"]) | set(stats["val_images"]), stats
    assert stats["skipped_images"] == {} and stats["epoch"] == 2 and stats["published"] is False
    assert stats["message"].startswith("a trial run (publish: never): nothing published: validation Dice ")


def test_empty_final_label_is_refused_with_400(dicomweb_server, orthanc, tmp_path):
    phantom = orthanc.series["phantom"]
    twin = sitk.ReadImage(str(ROOT / "sample-data" / "images" / "phantom_01.nii.gz"))
    empty = sitk.Image(twin.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(twin)
    path = tmp_path / "empty.nii.gz"
    sitk.WriteImage(empty, str(path))
    before = set(orthanc.find("Series", {"Modality": "SEG"}))
    r = requests.put(f"{dicomweb_server.url}/datastore/label", params={"image": phantom.series_uid, "tag": "final"},
                     data={"params": json.dumps({"label_info": [{"name": "liver"}]})},
                     files={"label": ("label.nii.gz", path.read_bytes())}, timeout=120)
    assert r.status_code == 400 and "empty" in r.json()["detail"]
    assert set(orthanc.find("Series", {"Modality": "SEG"})) == before


def test_a_final_label_is_written_on_the_series_grid_and_one_off_the_series_is_422(dicomweb_server, orthanc,
                                                                                    tmp_path):
    import pydicom_seg

    phantom = orthanc.series["phantom"]
    reference = sitk.ReadImage(str(ROOT / "sample-data" / "reference" / "phantom_01_seg.nii.gz"))  # the series' grid
    liver = sitk.Cast(reference == 1, sitk.sitkUInt8)

    def put(image: sitk.Image, name: str):
        sitk.WriteImage(image, str(tmp_path / name))
        return requests.put(f"{dicomweb_server.url}/datastore/label", params={"image": phantom.series_uid,
                                                                              "tag": "final"},
                            data={"params": json.dumps({"label_info": [{"name": "liver", "idx": 1}]})},
                            files={"label": (name, (tmp_path / name).read_bytes())}, timeout=300)

    before = set(orthanc.find("Series", {"Modality": "SEG"}))
    # The liver's voxels with their position lost (origin 0, 1 mm voxels): refused as the local datastore refuses it,
    # where it became a SEG of no slice of the series.
    lost = sitk.GetImageFromArray(sitk.GetArrayFromImage(liver))
    r = put(lost, "lost.nii.gz")
    assert r.status_code == 422, f"{r.status_code}: {r.text[:300]}"
    assert r.json()["detail"] == "the label cannot be saved: the label lies outside its image"
    # Refused by its header (lengths in metres): the message says "the label", not the server's temporary name.
    import nibabel

    metres = nibabel.Nifti1Image(np.ones((8, 8, 4), np.uint8), np.eye(4))
    metres.header.set_xyzt_units(xyz="meter")
    nibabel.save(metres, str(tmp_path / "metres.nii.gz"))
    r = requests.put(f"{dicomweb_server.url}/datastore/label", params={"image": phantom.series_uid, "tag": "final"},
                     data={"params": json.dumps({"label_info": [{"name": "liver", "idx": 1}]})},
                     files={"label": ("metres.nii.gz", (tmp_path / "metres.nii.gz").read_bytes())}, timeout=300)
    assert r.status_code == 422, f"{r.status_code}: {r.text[:300]}"
    assert r.json()["detail"].startswith("the label cannot be saved: the label has voxels of 1000 x 1000 x 1000 mm")
    assert set(orthanc.find("Series", {"Modality": "SEG"})) == before

    # The liver drawn on a coarser grid (2 mm more in-plane per voxel): written on the series' own grid, every
    # frame on a slice of the series (the writer took the label's grid: frames of another size, spacing, position).
    coarse_grid = sitk.Image([n // 2 for n in reference.GetSize()[:2]] + [reference.GetSize()[2]], sitk.sitkUInt8)
    coarse_grid.SetSpacing([2 * s for s in reference.GetSpacing()[:2]] + [reference.GetSpacing()[2]])
    coarse_grid.SetOrigin(reference.GetOrigin())
    coarse_grid.SetDirection(reference.GetDirection())
    coarse = sitk.Resample(liver, coarse_grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    r = put(coarse, "coarse.nii.gz")
    assert r.status_code == 200, f"{r.status_code}: {r.text[:300]}\n{dicomweb_server.log_tail()}"
    _, seg = _seg_of(orthanc, phantom.study_uid, before)
    assert (int(seg.Rows), int(seg.Columns)) == (reference.GetSize()[1], reference.GetSize()[0])
    ct_sops = {str(i["MainDicomTags"]["SOPInstanceUID"])
               for i in orthanc.get_json(f"/series/{orthanc.series_id(phantom.series_uid)}/instances")}
    assert {str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            for f in seg.PerFrameFunctionalGroupsSequence} <= ct_sops
    decoded = pydicom_seg.MultiClassReader().read(seg).image
    np.testing.assert_allclose(decoded.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    on_series = sitk.Resample(decoded, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    expected = sitk.Resample(coarse, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_series), sitk.GetArrayFromImage(expected))


def test_a_series_dcmqi_cannot_write_a_seg_for_gets_a_422_that_says_why(dicomweb_server, orthanc, tmp_path):
    """An anonymiser that blanks the Frame of Reference UID: dcmqi writes no SEG, and MONAI Label went on to send
    the missing file (a 422 naming a temporary path)."""
    series = orthanc.series["phantom_blank_frame"]
    reference = sitk.ReadImage(str(ROOT / "sample-data" / "reference" / "phantom_01_seg.nii.gz"))
    sitk.WriteImage(sitk.Cast(reference == 1, sitk.sitkUInt8), str(tmp_path / "label.nii.gz"))
    before = set(orthanc.find("Series", {"Modality": "SEG"}))
    r = requests.put(f"{dicomweb_server.url}/datastore/label", params={"image": series.series_uid, "tag": "final"},
                     data={"params": json.dumps({"label_info": [{"name": "liver"}]})},
                     files={"label": ("label.nii.gz", (tmp_path / "label.nii.gz").read_bytes())}, timeout=300)
    assert r.status_code == 422, f"{r.status_code}: {r.text[:300]}"
    assert r.json()["detail"] == (
        f"the label cannot be written as DICOM SEG: itkimage2segimage wrote none for series {series.series_uid!r} "
        "(its reason is in the server's log). It needs every instance of the series to hold its SOP Class, SOP "
        "Instance and Series Instance UIDs, and a Frame of Reference UID that is not empty, which some anonymisers "
        "blank")
    assert set(orthanc.find("Series", {"Modality": "SEG"})) == before


def test_final_label_of_an_unknown_series_is_404(dicomweb_server, tmp_path):
    path = tmp_path / "label.nii.gz"
    sitk.WriteImage(sitk.Image(8, 8, 4, sitk.sitkUInt8) + 1, str(path))
    r = requests.put(f"{dicomweb_server.url}/datastore/label", params={"image": "1.2.3.4.5.999", "tag": "final"},
                     data={"params": json.dumps({"label_info": [{"name": "liver"}]})},
                     files={"label": ("label.nii.gz", path.read_bytes())}, timeout=120)
    assert r.status_code == 404, r.text[:300]
    assert r.json()["detail"] == "series '1.2.3.4.5.999' is not on the DICOMweb server"


def test_local_dicom_folders_get_the_same_geometry_checks(tmp_path):
    """The same refusal when a DICOM folder is read directly (a local studies folder), without any server."""
    import shutil
    import sys

    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))
    from lib.images import ImageReadError, read_image

    phantom = ROOT / "sample-data" / "dicom" / "phantom_01"
    volume, geometry = read_image(str(phantom))
    assert volume.shape == (48, 128, 160) and geometry.spacing == pytest.approx((0.9, 0.9, 3.0))
    gapped = tmp_path / "gapped"
    gapped.mkdir()
    for i, path in enumerate(sorted(phantom.glob("*.dcm"))):
        if i not in (20, 21):
            shutil.copy(path, gapped / path.name)
    with pytest.raises(ImageReadError, match=r"uneven slice spacing \(gaps from 3.00 to 9.00 mm"):
        read_image(str(gapped))


def test_a_local_gantry_tilted_folder_is_refused():
    import sys

    tilted = DATA_ROOT / "dicom" / "gantry_tilt_ge"
    if not tilted.is_dir():
        pytest.skip(f"the gantry-tilted series needs the data folder {DATA_ROOT} (set RAPS3D_DATA)")
    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))
    from lib.images import ImageReadError, read_image

    with pytest.raises(ImageReadError, match="gantry-tilted"):
        read_image(str(tilted))


def test_one_process_at_a_time_fetches_a_series_into_the_cache(orthanc, tmp_path):
    """The server and its scoring subprocess share the cache: a fetch waits while another holds the series."""
    import sys
    import threading

    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))
    from dicomweb_client.session_utils import create_session_from_user_pass
    from lib import dicomweb

    phantom = orthanc.series["phantom"]
    client = dicomweb.StoredSyntaxClient(url=orthanc.dicomweb, session=create_session_from_user_pass(*orthanc.auth))
    store = dicomweb.Raps3DDICOMWebDatastore(client=client, search_filter={"Modality": "CT"},
                                             cache_path=str(tmp_path))
    image_dir = os.path.realpath(os.path.join(store._datastore.image_path(), phantom.series_uid))
    got = {}
    with dicomweb.series_lock(image_dir):  # another process fetching this series
        worker = threading.Thread(target=lambda: got.update(path=store.get_image_uri(phantom.series_uid)))
        worker.start()
        worker.join(2.0)
        assert worker.is_alive() and not os.path.exists(image_dir)  # waiting, nothing written
    worker.join(120)
    assert not worker.is_alive()
    assert got["path"] == image_dir + ".nii.gz"  # the cached file beside the series folder
    volume = sitk.GetArrayFromImage(sitk.ReadImage(got["path"]))
    assert volume.shape == (48, 128, 160) and len(os.listdir(image_dir)) == 48


def test_scoring_fetches_only_series_already_in_the_cache_unless_asked(orthanc, tmp_path):
    """Scoring runs at start: fetching every series would download the hospital's whole CT archive."""
    import sys

    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))
    from dicomweb_client.session_utils import create_session_from_user_pass
    from lib import dicomweb
    from lib.model_service import ModelService
    from lib.options import AppOptions
    from lib.scoring.uncertainty import Raps3DUncertainty

    client = dicomweb.StoredSyntaxClient(url=orthanc.dicomweb, session=create_session_from_user_pass(*orthanc.auth))
    store = dicomweb.Raps3DDICOMWebDatastore(client=client, search_filter={"Modality": "CT"},
                                             cache_path=str(tmp_path))
    options = AppOptions(model_path=tmp_path / "absent.pt", trained_model_path=tmp_path / "tuned.pt", device="cpu")
    scoring = Raps3DUncertainty(ModelService(options))
    missing = orthanc.series["phantom_missing_slice"].series_uid
    listed = set(store.get_unlabeled_images())
    assert missing in listed and len(listed) > 1
    summary = scoring({}, store)
    assert set(summary["not_fetched"]) == listed and not summary["scored"] and not summary["failed"]
    assert not set(os.listdir(store._datastore.image_path())) & listed  # nothing downloaded
    store.get_image_uri(missing)  # a viewer opened the series
    summary = scoring({}, store)
    assert set(summary["not_fetched"]) == listed - {missing} and "uneven slice spacing" in summary["failed"][missing]
    summary = scoring({"fetch": True}, store)  # asked for: every series is fetched
    assert summary["not_fetched"] == [] and summary["unchanged"] == [missing]
    assert set(summary["scored"]) | set(summary["failed"]) == listed - {missing}


def _datastore(orthanc, tmp_path, monkeypatch, cache: str = "cache"):
    """The app's DICOMweb datastore on the test server, in-process, with its own temporary folder (returned too)."""
    import sys
    import tempfile

    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))
    from dicomweb_client.session_utils import create_session_from_user_pass
    from lib import dicomweb

    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("PATH", os.environ.get("PATH", ""))  # restored after the test
    dicomweb.expose_dcmqi_tools()  # the DICOM SEG writer, as the server finds it
    client = dicomweb.StoredSyntaxClient(url=orthanc.dicomweb, session=create_session_from_user_pass(*orthanc.auth))
    store = dicomweb.Raps3DDICOMWebDatastore(client=client, search_filter={"Modality": "CT"},
                                             cache_path=str(tmp_path / cache))
    return store, scratch


def test_a_series_fetched_for_the_first_time_gets_the_series_checks_and_leaves_no_copy_behind(orthanc, tmp_path,
                                                                                              monkeypatch):
    """MONAI Label answers a first fetch with a temporary conversion; read there, the series checks (next to the
    DICOM folder) were skipped, and a copy of the patient's images stayed in the temporary folder (also when the
    request failed after the conversion)."""
    from fastapi import HTTPException

    store, scratch = _datastore(orthanc, tmp_path, monkeypatch)  # puts the app on the import path
    from lib.images import ImageReadError, read_image

    missing = orthanc.series["phantom_missing_slice"].series_uid
    path = store.get_image_uri(missing)
    assert path == os.path.realpath(os.path.join(store._datastore.image_path(), missing + ".nii.gz"))
    with pytest.raises(ImageReadError, match="uneven slice spacing \\(gaps from 3.00 to 6.00 mm"):
        read_image(path)
    assert os.listdir(scratch) == []  # nor a lock file, which anyone could take there

    # A failure after the conversion (the server's look-up of the series' details) leaves no copy behind either, nor
    # the series' folder.
    phantom = orthanc.series["phantom"].series_uid

    def unreachable(series_id):
        raise requests.ConnectionError("the DICOMweb server went away")

    monkeypatch.setattr(store, "_dicom_info", unreachable)
    with pytest.raises(requests.ConnectionError):
        store.get_image_uri(phantom)
    assert os.listdir(scratch) == [] and not store.is_cached(phantom)
    assert not os.path.exists(os.path.join(store._datastore.image_path(), phantom))

    # Ids name folders of the cache: anything but a UID is refused before a path is made of it.
    victim = tmp_path / "victim"
    victim.mkdir()
    for image_id in (f"no-such-dir/../../../{victim.name}", "../victim", "1.2.3/../../victim", "1.2." + "3" * 70):
        with pytest.raises(HTTPException) as refused:
            store.get_image_uri(image_id)
        assert refused.value.status_code == 404 and "is not a DICOM series UID" in refused.value.detail
    assert victim.is_dir()


def test_a_series_labelled_through_this_server_is_no_longer_unlabelled(orthanc, tmp_path, monkeypatch):
    from dicomweb_fixtures import upload_as_new_series

    store, _ = _datastore(orthanc, tmp_path, monkeypatch)
    series = upload_as_new_series(orthanc, "labelled_here", ROOT / "sample-data" / "dicom" / "phantom_01")
    try:
        assert series.series_uid in store.get_unlabeled_images()  # MONAI Label keeps the list of labelled series
        reference = sitk.ReadImage(str(ROOT / "sample-data" / "reference" / "phantom_01_seg.nii.gz"))
        liver = (sitk.GetArrayFromImage(reference) == 1).astype(np.uint8)
        sitk.WriteImage(_like(liver, reference), str(tmp_path / "label.nii.gz"))
        store.get_image_uri(series.series_uid)
        store.save_label(series.series_uid, str(tmp_path / "label.nii.gz"), "final",
                         {"label_info": [{"name": "liver"}]})

        assert series.series_uid not in store.get_unlabeled_images()
        assert orthanc.series["phantom_missing_slice"].series_uid in store.get_unlabeled_images()
    finally:  # the other tests share this server and count its series
        for study in orthanc.find("Study", {"StudyInstanceUID": series.study_uid}):
            orthanc.request("DELETE", f"/studies/{study}")


def test_a_final_label_read_back_from_the_server_is_converted_once(orthanc, tmp_path, monkeypatch):
    store, scratch = _datastore(orthanc, tmp_path, monkeypatch)
    from lib.images import read_image, read_label_on_grid

    phantom = orthanc.series["phantom"]
    _, geometry = read_image(store.get_image_uri(phantom.series_uid))
    reference = sitk.ReadImage(str(ROOT / "sample-data" / "reference" / "phantom_01_seg.nii.gz"))
    liver = (sitk.GetArrayFromImage(reference) == 1).astype(np.uint8)
    sitk.WriteImage(_like(liver, reference), str(tmp_path / "label.nii.gz"))
    before = set(orthanc.find("Series", {"Modality": "SEG"}))
    store.save_label(phantom.series_uid, str(tmp_path / "label.nii.gz"), "final", {"label_info": [{"name": "liver"}]})
    _, seg = _seg_of(orthanc, phantom.study_uid, before)

    # Read back as training reads it, by a server that did not write it: fetched, converted to a label map, kept;
    # the second time, the kept file.
    store, scratch = _datastore(orthanc, tmp_path, monkeypatch, cache="another_server")
    store.get_image_uri(phantom.series_uid)  # as the datastore's list of labelled images does first
    path = store.get_label_uri(str(seg.SeriesInstanceUID), "final", phantom.series_uid)
    assert os.path.isfile(path)
    np.testing.assert_array_equal(read_label_on_grid(path, geometry), liver)
    converted_at = os.stat(path).st_mtime_ns
    assert store.get_label_uri(str(seg.SeriesInstanceUID), "final", phantom.series_uid) == path
    assert os.stat(path).st_mtime_ns == converted_at and os.listdir(scratch) == []


def test_a_series_converted_by_another_process_keeps_what_the_server_recorded_meanwhile(orthanc, tmp_path,
                                                                                          monkeypatch):
    """A scoring process (``fetch``) converting a series wrote the datastore index from the copy it read at start,
    undoing what the server recorded since, such as a hand-out."""
    server_copy, _ = _datastore(orthanc, tmp_path, monkeypatch)
    scoring_copy, _ = _datastore(orthanc, tmp_path, monkeypatch)  # the same cache and index, read now
    # Its file watcher would reload the index a moment after the server writes it: the write below must not depend
    # on that moment (a busy process, or a pass converting while the server records, comes in between).
    scoring_copy._observer.stop()
    scoring_copy._observer.join(timeout=10)
    phantom = orthanc.series["phantom"].series_uid
    other = orthanc.series["phantom_missing_slice"].series_uid
    server_copy.get_image_uri(phantom)
    server_copy.update_image_info(phantom, {"strategy": {"raps3d_uncertain": {"ts": 123}}})
    scoring_copy.get_image_uri(other)  # converted here: the index written by this process
    reread, _ = _datastore(orthanc, tmp_path, monkeypatch)
    assert reread.get_image_info(phantom)["strategy"]["raps3d_uncertain"]["ts"] == 123
    assert reread.is_cached(other)


def test_a_hand_out_that_fetches_its_series_does_not_hold_up_other_requests(orthanc, tmp_path):
    """Over DICOMweb a hand-out fetches and converts the chosen series; meanwhile the server answers other requests
    (MONAI Label's next-sample route did it on the event loop, so every request waited for it)."""
    from conftest import running_server

    env = {"MONAI_LABEL_DICOMWEB_USERNAME": orthanc.auth[0], "MONAI_LABEL_DICOMWEB_PASSWORD": orthanc.auth[1],
           "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "empty-cache")}
    with running_server(tmp_path, orthanc.dicomweb, tmp_path / "no-checkpoint-here.pt", extra_env=env) as srv:
        reply, finished, info_status, info_done = srv.info_while(
            lambda: requests.post(f"{srv.url}/activelearning/raps3d_uncertain", json={"client_id": "a"}, timeout=300),
            "Active Learning Request")  # once the server has started on it
        assert info_status == 200 and reply.status_code == 200 and reply.json().get("id"), srv.log_tail()
        assert (tmp_path / "empty-cache").is_dir()  # the hand-out fetched its series into the cache
        assert info_done < finished, "/info waited for the hand-out to fetch its series"


def test_active_learning_sets_aside_a_series_that_cannot_be_fetched_and_hands_out_the_next(orthanc, tmp_path,
                                                                                          monkeypatch, caplog):
    """A CT series without pixel data cannot be converted; named so that it comes first while nothing is scored, it
    used to fail every next-sample request (a bare 500)."""
    import pydicom
    from dicomweb_fixtures import _encode

    store, _ = _datastore(orthanc, tmp_path, monkeypatch)
    from lib.activelearning.uncertain import MostUncertain

    broken_uid, study_uid = "1.2.1.9999.1", "1.2.1.9999.2"
    for i, path in enumerate(sorted((ROOT / "sample-data" / "dicom" / "phantom_01").glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        del ds.PixelData
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, broken_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.1.9999.3.{i + 1}"
        orthanc.upload(_encode(ds))
    try:
        strategy = MostUncertain()
        assert min(store.get_unlabeled_images()) == broken_uid
        first = strategy.next_fetchable({"strategy": "raps3d_uncertain"}, store)
        assert first["id"] != broken_uid and os.path.isfile(first["path"])
        assert f"{broken_uid} set aside for 3600 s: the series cannot be converted to a volume" in caplog.text
        # Set aside: not tried again; and the first is handed out, so the next goes to another series.
        assert strategy({"strategy": "raps3d_uncertain"}, store)["id"] not in (broken_uid, first["id"])
    finally:  # the other tests share this server and count its series
        for study in orthanc.find("Study", {"StudyInstanceUID": study_uid}):
            orthanc.request("DELETE", f"/studies/{study}")


def test_a_pacs_that_goes_away_gets_a_502_that_says_so(tmp_path):
    """The PACS stops while the server runs (a restart, a network cut): a click on a series not fetched yet, the
    viewer's images through the proxy and a hand-out each get a 502 naming the DICOMweb server, not a bare 500."""
    from conftest import running_server
    from dicomweb_fixtures import running_orthanc, upload_folder

    pacs = running_orthanc(tmp_path / "pacs")
    orthanc = pacs.__enter__()
    stopped = False
    try:
        series = upload_folder(orthanc, "phantom", ROOT / "sample-data" / "dicom" / "phantom_01")
        env = {"MONAI_LABEL_DICOMWEB_USERNAME": orthanc.auth[0], "MONAI_LABEL_DICOMWEB_PASSWORD": orthanc.auth[1],
               "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache")}
        (tmp_path / "server").mkdir()
        with running_server(tmp_path / "server", orthanc.dicomweb, tmp_path / "no-checkpoint-here.pt",
                            extra_env=env) as srv:
            pacs.__exit__(None, None, None)
            stopped = True
            click = srv.infer(series.series_uid, {"foreground": [[80, 64, 24]]})
            assert click.status_code == 502, click.text
            assert click.json()["detail"].startswith("the DICOMweb server cannot be reached"), click.text
            proxied = requests.get(f"{srv.url}/proxy/dicom/qido/studies", timeout=60)
            assert proxied.status_code == 502 and proxied.json()["detail"].startswith("DICOMweb server: "), proxied.text
            hand_out = requests.post(f"{srv.url}/activelearning/raps3d_uncertain", json={"client_id": "a"},
                                     timeout=120)
            assert hand_out.status_code == 502, hand_out.text
            assert hand_out.json()["detail"].startswith("the DICOMweb server cannot be reached"), hand_out.text
    finally:
        if not stopped:
            pacs.__exit__(None, None, None)
