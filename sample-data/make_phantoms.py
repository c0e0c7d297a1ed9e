#!/usr/bin/env python3
"""Generate the synthetic abdominal CT phantoms shipped in ``sample-data/``.

The output is fully deterministic: every phantom is drawn from its own seeded
random generator and no timestamps or random UIDs are written, so running the
script twice gives identical voxel data (and byte-identical DICOM files).

Usage::

    python sample-data/make_phantoms.py              # writes next to this script
    python sample-data/make_phantoms.py --out /some/dir

Layout written under ``--out``::

    labels.json                         {"liver": 1, ...}
    images/phantom_0N.nii.gz            int16 Hounsfield units
    reference/phantom_0N_seg.nii.gz     uint8 label map, same geometry
    dicom/phantom_01/slice_XXX.dcm      phantom_01 as a CT DICOM series

Only numpy and SimpleITK are used for the volumes; pydicom writes the DICOM
series.

Geometry: SimpleITK (LPS) convention, identity direction, so index x grows
towards the patient's left, y towards posterior and z towards superior.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# ----------------------------------------------------------------------------
# Fixed parameters (the tests import these)
# ----------------------------------------------------------------------------
SIZE = (160, 128, 48)  # (x, y, z) voxels
SPACING = (0.9, 0.9, 3.0)  # mm
ORIGIN = (-72.0, -58.0, -350.0)  # mm, LPS, centre of the first voxel
N_PHANTOMS = 3
BASE_SEED = 3000

LABELS = {
    "liver": 1,
    "spleen": 2,
    "right_kidney": 3,
    "left_kidney": 4,
    "aorta": 5,
}

HU = {
    "air": -1000,
    "fat": -100,
    "soft_tissue": 40,
    "lung": -800,
    "liver": 60,
    "spleen": 50,
    "kidney": 150,
    "aorta": 200,
    "bone": 700,
    "disc": 80,
}
NOISE_SIGMA = 10.0

DICOM_CASE = "phantom_01"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
UID_ENTROPY = "raps3d-sample-data"


def case_name(index: int) -> str:
    return f"phantom_{index:02d}"


# ----------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------
def _grid():
    """Normalised coordinates in [-1, 1] along each axis, arrays shaped (z, y, x)."""
    nx, ny, nz = SIZE
    w, v, u = np.meshgrid(
        np.linspace(-1.0, 1.0, nz),
        np.linspace(-1.0, 1.0, ny),
        np.linspace(-1.0, 1.0, nx),
        indexing="ij",
    )
    return u, v, w


def _bumps(rng, u, v, w, amplitude, n_terms=3):
    """Smooth, low-frequency random field used to deform a surface."""
    field = np.zeros_like(u)
    for _ in range(n_terms):
        k = rng.normal(size=3)
        k *= rng.uniform(2.0, 5.0) / np.linalg.norm(k)
        phase = rng.uniform(0.0, 2.0 * np.pi)
        field += (amplitude / n_terms) * np.sin(k[0] * u + k[1] * v + k[2] * w + phase)
    return field


def _ellipsoid(rng, grid, center, radii, rot_deg=0.0, jitter=0.03, deform=0.08):
    """Randomly perturbed, rotated (about z) and smoothly deformed ellipsoid mask."""
    u, v, w = grid
    c = np.asarray(center, float) + rng.uniform(-jitter, jitter, 3)
    r = np.asarray(radii, float) * rng.uniform(0.92, 1.08, 3)
    theta = np.deg2rad(rot_deg + rng.uniform(-8.0, 8.0))
    du, dv, dw = u - c[0], v - c[1], w - c[2]
    ru = np.cos(theta) * du + np.sin(theta) * dv
    rv = -np.sin(theta) * du + np.cos(theta) * dv
    d = np.sqrt((ru / r[0]) ** 2 + (rv / r[1]) ** 2 + (dw / r[2]) ** 2)
    return d <= 1.0 + _bumps(rng, u, v, w, deform)


def _cylinder(rng, grid, center, radii, tilt=(0.0, 0.0), jitter=0.02, deform=0.05):
    """Elliptic cylinder along z (optionally tilted), perturbed like _ellipsoid."""
    u, v, w = grid
    c = np.asarray(center, float) + rng.uniform(-jitter, jitter, 2)
    r = np.asarray(radii, float) * rng.uniform(0.94, 1.06, 2)
    d = np.sqrt(((u - c[0] - tilt[0] * w) / r[0]) ** 2 + ((v - c[1] - tilt[1] * w) / r[1]) ** 2)
    return d, 1.0 + _bumps(rng, u, v, w, deform)


def _smooth_inplane(a):
    """[1, 2, 1] / 4 binomial filter along x and y (soft, partial-volume-like edges)."""
    for axis in (1, 2):
        p = np.pad(a, [(1, 1) if ax == axis else (0, 0) for ax in range(3)], mode="edge")
        lo = np.take(p, np.arange(0, a.shape[axis]), axis=axis)
        mid = np.take(p, np.arange(1, a.shape[axis] + 1), axis=axis)
        hi = np.take(p, np.arange(2, a.shape[axis] + 2), axis=axis)
        a = 0.25 * lo + 0.5 * mid + 0.25 * hi
    return a


def make_phantom(seed: int):
    """Return (hu, labels) numpy arrays shaped (z, y, x): int16 and uint8."""
    rng = np.random.default_rng(seed)
    grid = _grid()
    u, v, w = grid
    nz = SIZE[2]

    hu = np.full(u.shape, HU["air"], dtype=np.float64)
    lab = np.zeros(u.shape, dtype=np.uint8)

    # Body outline (slightly wider towards the top), fat layer, soft tissue.
    d_body, edge = _cylinder(rng, grid, (0.0, 0.02), (0.90, 0.76), deform=0.04)
    d_body = d_body / (1.0 + 0.03 * w)
    body = d_body <= edge
    fat_ratio = rng.uniform(0.84, 0.89)
    inner = d_body <= fat_ratio * edge
    hu[body] = HU["fat"]
    hu[inner] = HU["soft_tissue"]

    # Lung bases (upper slices only, posterior-lateral).
    for side in (-1.0, 1.0):
        lung = _ellipsoid(rng, grid, (0.45 * side, 0.15, 1.15), (0.34, 0.50, 0.55), rot_deg=-15 * side)
        lung &= inner
        hu[lung] = HU["lung"]

    def paint(mask, value, label):
        mask = mask & inner
        hu[mask] = value
        lab[mask] = label

    # Solid organs (patient's right = negative x).
    paint(_ellipsoid(rng, grid, (-0.38, 0.00, 0.35), (0.42, 0.55, 0.45), rot_deg=-10), HU["liver"], LABELS["liver"])
    paint(_ellipsoid(rng, grid, (0.55, 0.30, 0.45), (0.18, 0.28, 0.30), rot_deg=30), HU["spleen"], LABELS["spleen"])
    paint(
        _ellipsoid(rng, grid, (-0.32, 0.45, -0.15), (0.14, 0.20, 0.33), rot_deg=20, deform=0.05),
        HU["kidney"],
        LABELS["right_kidney"],
    )
    paint(
        _ellipsoid(rng, grid, (0.33, 0.45, -0.05), (0.14, 0.20, 0.33), rot_deg=-20, deform=0.05),
        HU["kidney"],
        LABELS["left_kidney"],
    )

    # Aorta: round tube just left of the midline, anterior to the spine.
    d_ao, edge_ao = _cylinder(rng, grid, (0.06, 0.12), (0.08, 0.10), tilt=(0.02, -0.02), deform=0.03)
    paint(d_ao <= edge_ao, HU["aorta"], LABELS["aorta"])

    # Spine: vertebral bodies separated by discs, plus a posterior element.
    d_vb, edge_vb = _cylinder(rng, grid, (0.0, 0.46), (0.15, 0.18), jitter=0.01, deform=0.03)
    d_sp, edge_sp = _cylinder(rng, grid, (0.0, 0.70), (0.05, 0.10), jitter=0.01, deform=0.03)
    period = 9  # slices (27 mm)
    phase = int(rng.integers(0, period))
    disc_slices = ((np.arange(nz) + phase) % period) < 2
    disc = np.broadcast_to(disc_slices[:, None, None], u.shape)
    vb = (d_vb <= edge_vb) & inner
    hu[vb & ~disc] = HU["bone"]
    hu[vb & disc] = HU["disc"]
    lab[vb] = 0
    sp = (d_sp <= edge_sp) & body & ~disc
    hu[sp] = HU["bone"]
    lab[sp] = 0

    hu = _smooth_inplane(hu)
    hu += rng.normal(0.0, NOISE_SIGMA, size=hu.shape)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return hu, lab


# ----------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------
def to_image(array: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return img


def _ds(value: float) -> str:
    """Decimal String representation (at most 16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def write_dicom_series(hu: np.ndarray, folder: Path, name: str) -> None:
    """Write ``hu`` (z, y, x) int16 as an uncompressed CT series, one file per slice."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def uid(*parts) -> str:
        return generate_uid(entropy_srcs=[UID_ENTROPY, name, *map(str, parts)])

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.dcm"):
        old.unlink()

    study_uid, series_uid, frame_uid = uid("study"), uid("series"), uid("frame-of-reference")
    nz, ny, nx = hu.shape
    sx, sy, sz = SPACING
    ox, oy, oz = ORIGIN

    for k in range(nz):
        sop_uid = uid("instance", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "RAPS3D_SAMPLE"

        filename = folder / f"slice_{k + 1:03d}.dcm"
        ds = FileDataset(str(filename), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian = True
        ds.is_implicit_VR = False

        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber = f"RAPS3D{name[-2:]}"
        ds.Modality = "CT"
        ds.Manufacturer = "Raps-3D synthetic phantom"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic abdominal CT phantom"
        ds.SeriesDescription = "Axial 3.0 mm"
        ds.PatientName = f"Phantom^{name[-2:]}"
        ds.PatientID = name.upper()
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "ABDOMEN"
        ds.SliceThickness = _ds(sz)
        ds.SpacingBetweenSlices = _ds(sz)
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(ox), _ds(oy), _ds(oz + k * sz)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(oz + k * sz)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.PixelSpacing = [_ds(sy), _ds(sx)]  # row spacing (y), column spacing (x)
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1  # signed: stored value == HU
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(hu[k], dtype="<i2").tobytes()
        ds.save_as(str(filename), write_like_original=False)


def generate(out: Path) -> None:
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "reference").mkdir(parents=True, exist_ok=True)
    with open(out / "labels.json", "w") as f:
        json.dump(LABELS, f, indent=2)
        f.write("\n")

    for i in range(1, N_PHANTOMS + 1):
        name = case_name(i)
        hu, lab = make_phantom(BASE_SEED + i)
        sitk.WriteImage(to_image(hu), str(out / "images" / f"{name}.nii.gz"), useCompression=True)
        sitk.WriteImage(to_image(lab), str(out / "reference" / f"{name}_seg.nii.gz"), useCompression=True)
        if name == DICOM_CASE:
            write_dicom_series(hu, out / "dicom" / name, name)
        print(f"wrote {name}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.path.dirname(os.path.abspath(__file__))),
        help="output folder (default: the folder of this script)",
    )
    args = parser.parse_args(argv)
    generate(args.out)


if __name__ == "__main__":
    main()
