"""Content checks for the offline sample data in ``sample-data/``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample-data"
GENERATOR = SAMPLE / "make_phantoms.py"
CASES = ["phantom_01", "phantom_02", "phantom_03"]
EXPECTED_LABELS = {"liver": 1, "spleen": 2, "right_kidney": 3, "left_kidney": 4, "aorta": 5}
# Plausible voxel counts per label for a 160 x 128 x 48 volume at 0.9 x 0.9 x 3 mm.
VOXEL_RANGES = {
    1: (20_000, 120_000),  # liver
    2: (2_000, 20_000),  # spleen
    3: (1_500, 12_000),  # right kidney
    4: (1_500, 12_000),  # left kidney
    5: (2_000, 15_000),  # aorta
}
MEAN_HU = {1: (40, 80), 2: (30, 70), 3: (110, 180), 4: (110, 180), 5: (150, 230)}


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_phantoms", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _read(path: Path):
    img = sitk.ReadImage(str(path))
    return img, sitk.GetArrayFromImage(img)


def test_layout_and_labels_json():
    # images/ is served as the studies folder: it must hold only the volumes
    # (MONAI Label's own runtime state, written there when serving, is ignored).
    runtime = {"labels", "datastore_v2.json", ".lock"}
    images = sorted(p.name for p in (SAMPLE / "images").iterdir() if p.name not in runtime)
    assert images == [f"{c}.nii.gz" for c in CASES], "images/ must hold only the studies"
    labels = json.loads((SAMPLE / "labels.json").read_text())
    assert labels == EXPECTED_LABELS
    assert labels == gen.LABELS
    shipped = [SAMPLE / "labels.json", *(SAMPLE / "images").glob("*.nii.gz")]
    shipped += [*(SAMPLE / "reference").glob("*"), *(SAMPLE / "dicom").rglob("*.dcm")]
    total = sum(p.stat().st_size for p in shipped)
    assert total < 6.5 * 1024 * 1024


@pytest.mark.parametrize("case", CASES)
def test_image_geometry_and_hu(case):
    img, hu = _read(SAMPLE / "images" / f"{case}.nii.gz")
    assert img.GetPixelID() == sitk.sitkInt16
    assert img.GetSize() == gen.SIZE == (160, 128, 48)
    np.testing.assert_allclose(img.GetSpacing(), (0.9, 0.9, 3.0), atol=1e-3)
    np.testing.assert_allclose(img.GetOrigin(), gen.ORIGIN, atol=1e-3)
    assert any(abs(o) > 1 for o in img.GetOrigin())
    np.testing.assert_allclose(img.GetDirection(), np.eye(3).ravel(), atol=1e-6)

    assert hu.min() >= -1024 and hu.max() < 1500
    # Air in the corners (outside the body ellipse).
    corners = np.concatenate([hu[:, :10, :10].ravel(), hu[:, -10:, -10:].ravel(), hu[:, :10, -10:].ravel()])
    assert corners.mean() < -900
    assert corners.max() < -900 + 5 * 10
    # Some body fat, lungs in the upper slices only, bone present.
    assert ((hu > -150) & (hu < -60)).sum() > 10_000
    # (inside a central ellipse, away from the partial-volume skin edge)
    y, x = np.mgrid[0 : hu.shape[1], 0 : hu.shape[2]]
    central = ((x - 79.5) / 55) ** 2 + ((y - 63.5) / 40) ** 2 < 1
    lung_like = (hu > -900) & (hu < -600) & central
    assert lung_like[-8:].sum() > 5_000
    assert lung_like[:10].sum() < 200
    assert (hu > 500).sum() > 2_000


@pytest.mark.parametrize("case", CASES)
def test_reference_labels(case):
    img, hu = _read(SAMPLE / "images" / f"{case}.nii.gz")
    seg, lab = _read(SAMPLE / "reference" / f"{case}_seg.nii.gz")
    assert seg.GetPixelID() == sitk.sitkUInt8
    assert seg.GetSize() == img.GetSize()
    np.testing.assert_allclose(seg.GetSpacing(), img.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(seg.GetOrigin(), img.GetOrigin(), atol=1e-6)
    assert set(np.unique(lab).tolist()) == {0, 1, 2, 3, 4, 5}

    for label, (lo, hi) in VOXEL_RANGES.items():
        mask = lab == label
        assert lo <= mask.sum() <= hi, (label, int(mask.sum()))
        mean = float(hu[mask].mean())
        assert MEAN_HU[label][0] <= mean <= MEAN_HU[label][1], (label, mean)
    assert abs(float(hu[lab == 1].mean()) - 60) <= 20
    # Liver is the largest organ; aorta spans (nearly) every slice.
    counts = np.bincount(lab.ravel(), minlength=6)
    assert counts[1] == counts[1:].max()
    assert (lab == 5).any(axis=(1, 2)).mean() > 0.9
    # Anatomical side (LPS: x grows towards the patient's left).
    xs = {k: np.nonzero(lab == k)[2].mean() for k in range(1, 6)}
    assert xs[1] < xs[5] < xs[2]  # liver right, spleen left of the aorta
    assert xs[3] < xs[4]  # right kidney on the patient's right


def test_dicom_series_matches_nifti():
    folder = SAMPLE / "dicom" / "phantom_01"
    ref, ref_arr = _read(SAMPLE / "images" / "phantom_01.nii.gz")
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    assert len(series) == 1
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    assert len(files) == ref.GetSize()[2]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    img = reader.Execute()
    arr = sitk.GetArrayFromImage(img)

    assert arr.shape == ref_arr.shape
    np.testing.assert_array_equal(arr.astype(np.int32), ref_arr.astype(np.int32))
    np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6)


def test_dicom_headers():
    pydicom = pytest.importorskip("pydicom")
    files = sorted((SAMPLE / "dicom" / "phantom_01").glob("*.dcm"))
    headers = [pydicom.dcmread(str(f)) for f in files]
    first = headers[0]
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    assert first.Modality == "CT"
    assert first.PatientID
    assert len({h.StudyInstanceUID for h in headers}) == 1
    assert len({h.SeriesInstanceUID for h in headers}) == 1
    assert len({h.SOPInstanceUID for h in headers}) == len(headers)
    assert all(h.file_meta.MediaStorageSOPInstanceUID == h.SOPInstanceUID for h in headers)
    assert float(first.RescaleSlope) == 1.0 and float(first.SliceThickness) == pytest.approx(3.0)
    assert float(first.SpacingBetweenSlices) == pytest.approx(3.0)
    assert [float(x) for x in first.PixelSpacing] == pytest.approx([0.9, 0.9])
    assert first.BitsAllocated == 16 and first.PixelRepresentation == 1  # signed: HU stored as is
    zs = sorted(float(h.ImagePositionPatient[2]) for h in headers)
    np.testing.assert_allclose(np.diff(zs), 3.0, atol=1e-4)


def test_generator_is_deterministic(tmp_path):
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(tmp_path)], check=True, capture_output=True)
    assert json.loads((tmp_path / "labels.json").read_text()) == EXPECTED_LABELS
    for case in CASES:
        for sub, name in (("images", f"{case}.nii.gz"), ("reference", f"{case}_seg.nii.gz")):
            new_img, new = _read(tmp_path / sub / name)
            old_img, old = _read(SAMPLE / sub / name)
            assert new_img.GetPixelID() == old_img.GetPixelID()
            np.testing.assert_array_equal(new, old)
            assert new_img.GetSpacing() == old_img.GetSpacing()
            assert new_img.GetOrigin() == old_img.GetOrigin()
    new_dcm = sorted((tmp_path / "dicom" / "phantom_01").glob("*.dcm"))
    old_dcm = sorted((SAMPLE / "dicom" / "phantom_01").glob("*.dcm"))
    assert [p.name for p in new_dcm] == [p.name for p in old_dcm]
    for a, b in zip(new_dcm, old_dcm):
        assert a.read_bytes() == b.read_bytes(), a.name
