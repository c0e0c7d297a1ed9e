"""Refusing DICOM series that are not CT or would become distorted volumes.

A DICOM series becomes a volume (ITK's series reader, used by MONAI Label and here) on the assumption that its
slices are parallel, evenly spaced and stacked along the slice normal. A gantry-tilted CT breaks the last one
(slice positions move along the table, not along the normal: the volume is sheared), and missing slices or a
variable slice spacing break the second; ITK only logs a warning and returns a distorted volume, on which a
segmentation would be wrong. Such series, and series of another modality (MR, PET, ...), are refused with a
message saying why, before anything is segmented.

An enhanced (multi-frame) CT file may keep its rescale to Hounsfield units only in its functional groups, which
ITK's reader applies for some transfer syntaxes and not for others; ``functional_group_rescale`` finds it and
``stored_value_range`` gives the stored values, so that the caller can tell whether to apply it.

Sources checked: a folder of DICOM files (a local DICOM study), the folder MONAI Label's DICOMweb datastore keeps
beside each series it converted to NIfTI (``<SeriesInstanceUID>/`` next to ``<SeriesInstanceUID>.nii.gz``), and a
single (multi-frame) DICOM file.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict

import numpy as np

# Tags read from each file (headers only).
_TAGS = ["SeriesInstanceUID", "SOPInstanceUID", "Modality", "ImageOrientationPatient", "ImagePositionPatient",
         "PixelSpacing", "NumberOfFrames", "GantryDetectorTilt", "RescaleSlope", "RescaleIntercept",
         "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"]
_NIFTI_SUFFIXES = (".nii.gz", ".nii", ".nrrd")

ORIENTATION_TOLERANCE = 1e-3  # direction cosines
SHEAR_TOLERANCE_PIXELS = 0.5  # in-plane drift of the slice positions, first to last slice, in pixels
SPACING_TOLERANCE = 0.05  # relative deviation of a slice gap from the median gap
SPACING_TOLERANCE_MM = 0.01


class SeriesError(ValueError):
    """The series is not CT, or cannot be stacked into a volume without distortion."""


def source_series_folder(path: str) -> str | None:
    """The DICOM folder an image comes from: ``path`` itself when it is a folder, else the folder MONAI Label's
    DICOMweb datastore keeps beside the converted file (same name, the series UID, holding that series)."""
    if os.path.isdir(path):
        return path
    for suffix in _NIFTI_SUFFIXES:
        if path.endswith(suffix):
            folder = path[: -len(suffix)]
            if os.path.isdir(folder):
                uid = os.path.basename(folder)
                headers = _read_headers(folder, ["SeriesInstanceUID"])  # only this tag: the rest is read later
                if any(str(h.get("SeriesInstanceUID", "")) == uid for h in headers):
                    return folder
    return None


def _read_headers(folder: str, tags: list[str] = _TAGS) -> list:
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file():
            continue
        try:
            headers.append(pydicom.dcmread(entry.path, stop_before_pixels=True, specific_tags=tags))
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
    return headers


def dicom_file_headers(path: str) -> list:
    """[the header] of a single DICOM file (a multi-frame CT sent alone), so that it is checked as a series; [] for
    any other file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not os.path.isfile(path):
        return []
    try:
        return [pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)]
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return []


def stored_value_range(header) -> tuple[float, float] | None:
    """Lowest and highest stored pixel value (before any rescale) of the file ``header`` was read from, where they
    can be read without a decoder (uncompressed little-endian pixel data); None otherwise."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        ds = pydicom.dcmread(header.filename)
        if ds.file_meta.TransferSyntaxUID not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            return None
        bits, signed = int(ds.BitsAllocated), int(ds.PixelRepresentation) == 1
        if bits not in (8, 16, 32) or int(ds.get("SamplesPerPixel", 1)) != 1:
            return None
        count = frame_count(ds) * int(ds.Rows) * int(ds.Columns)
        values = np.frombuffer(ds.PixelData, dtype=np.dtype(f"<{'i' if signed else 'u'}{bits // 8}"), count=count)
    except (AttributeError, TypeError, ValueError, OSError, EOFError, SeriesError):
        return None
    return (float(values.min()), float(values.max())) if values.size else None


def frame_count(header) -> int:
    """NumberOfFrames of a file (1 when absent); SeriesError when it is not a whole number."""
    value = header.get("NumberOfFrames", 1) or 1
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SeriesError(f"a DICOM file has a malformed NumberOfFrames ({str(value)[:20]!r})") from None


def series_headers(folder: str) -> list:
    """The headers of the series in ``folder`` that is read as its volume: of the CT series (a study exported with
    its segmentation holds a SEG series too, which can have more frames than the CT has slices), else of all, the
    one with the most slices (frames of a multi-frame file count), of equally large ones the first by UID
    (``images`` reads that same series and files, so what is checked is what is segmented). A file holding an
    instance an earlier file (by name) holds is left out."""
    by_series = defaultdict(list)
    seen = set()
    for header in _read_headers(folder):
        instance = str(header.get("SOPInstanceUID", "") or "")
        if instance and instance in seen:  # the same instance twice (a copy under another name): read once
            continue
        seen.add(instance)
        by_series[str(header.get("SeriesInstanceUID", ""))].append(header)

    def is_ct(item) -> bool:
        return all(str(h.get("Modality", "") or "").strip().upper() == "CT" for h in item[1])

    def slices(item) -> int:
        return sum(frame_count(h) for h in item[1])

    candidates = [item for item in sorted(by_series.items()) if is_ct(item)] or sorted(by_series.items())
    return max(candidates, key=slices)[1] if candidates else []


def stacking_order(headers: list) -> list[str] | None:
    """The files of single-frame ``headers`` ordered as the reader stacks a series: by position along the slice
    normal, ascending. None where a file has no position or orientation (the reader's own order is kept then)."""
    planes = [_file_planes(h) for h in headers]
    if any(len(p) != 1 for p in planes):
        return None
    orientation = np.array([float(v) for v in planes[0][0][0]])
    if orientation.shape != (6,):
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    along = [float(np.dot([float(v) for v in p[0][1]], normal)) for p in planes]
    return [h.filename for _, h in sorted(zip(along, headers), key=lambda pair: pair[0])]


def check_series(headers: list) -> None:
    """Raises SeriesError when the series of ``headers`` is not CT (by its Modality) or would be a distorted
    volume: slices of different orientations, gantry tilt (sheared stack), several slices at one position, uneven
    slice gaps, slices without position tags, or position tags that cannot be read. The frames of a multi-frame
    file count as its slices."""
    if not headers:
        return
    modalities = {str(h.get("Modality", "") or "").strip().upper() for h in headers} - {""}
    if modalities - {"CT"}:
        raise SeriesError(f"the DICOM series is {'/'.join(sorted(modalities))}, not CT: Raps-3D segments CT images "
                          "(its model reads Hounsfield units)")
    try:
        _check_stack(headers)
    except SeriesError:
        raise
    except (ValueError, TypeError, AttributeError):
        raise SeriesError("the DICOM series has malformed Image Position/Orientation (Patient) or Pixel Spacing "
                          "values: its slices cannot be placed in space") from None


def functional_group_rescale(headers: list) -> tuple[float, float] | None:
    """(slope, intercept) of a series that is one multi-frame file keeping its rescale only in its functional groups
    (shared, or the same for every frame); None otherwise (rescale in the main header, or none at all). SeriesError
    for a rescale that differs between frames: the reader would apply the first frame's to all."""
    if len(headers) != 1 or frame_count(headers[0]) < 2:
        return None
    header = headers[0]
    if header.get("RescaleIntercept") is not None or header.get("RescaleSlope") is not None:
        return None  # the main header's rescale is applied by the reader
    groups = list(header.get("SharedFunctionalGroupsSequence", [])) + list(
        header.get("PerFrameFunctionalGroupsSequence", []))
    found = set()
    for group in groups:
        for item in group.get("PixelValueTransformationSequence", []):
            try:
                found.add((float(item.get("RescaleSlope", 1.0)), float(item.get("RescaleIntercept", 0.0))))
            except (TypeError, ValueError):
                raise SeriesError("the multi-frame DICOM file has a malformed rescale slope or intercept") from None
    if len(found) > 1:
        raise SeriesError("the frames of the multi-frame DICOM file have different rescale slopes or intercepts, "
                          "which the reader cannot apply frame by frame; convert it to single-frame slices")
    return found.pop() if found else None


def _group_value(groups: list, sequence: str, keyword: str):
    """``keyword`` from the first item of functional group ``sequence`` in the first of ``groups`` that has it."""
    for group in groups:
        items = group.get(sequence) if group is not None else None
        if items and items[0].get(keyword) is not None:
            return items[0].get(keyword)
    return None


def _file_planes(h) -> list[tuple]:
    """(ImageOrientationPatient, ImagePositionPatient, PixelSpacing) of each slice of one file, in stored order: one
    for a single-frame file, one per frame of a multi-frame file (from its per-frame functional groups, else its
    shared ones; a one-frame enhanced file, split from a multi-frame one, keeps its position there too). Slices
    without position or orientation are left out."""
    top = (h.get("ImageOrientationPatient"), h.get("ImagePositionPatient"), h.get("PixelSpacing"))
    per_frame = list(h.get("PerFrameFunctionalGroupsSequence") or [])
    shared = list(h.get("SharedFunctionalGroupsSequence") or [None])[:1]
    single = frame_count(h) == 1
    if single and not per_frame and shared == [None]:
        planes = [top]
    else:
        planes = []
        for frame in per_frame or ([None] if single else []):
            groups = [frame] + shared
            # A multi-frame file's position must be per frame (the reader stacks its frames 1 mm apart otherwise).
            planes.append((_group_value(groups, "PlaneOrientationSequence", "ImageOrientationPatient") or top[0],
                           _group_value(groups, "PlanePositionSequence", "ImagePositionPatient")
                           or (top[1] if single else None),
                           _group_value(groups, "PixelMeasuresSequence", "PixelSpacing") or top[2]))
    return [p for p in planes if p[0] is not None and p[1] is not None]


def _check_stack(headers: list) -> None:
    # Frames of a multi-frame file are checked like the files of a series: ITK stacks them the same way.
    per_file = [_file_planes(h) for h in headers]
    slices = [plane for planes in per_file for plane in planes]
    total = sum(frame_count(h) for h in headers)
    if total >= 2 and len(slices) < total:
        # The reader would stack them 1 mm apart (or around the unplaced ones): a volume of the wrong size.
        raise SeriesError(f"{total - len(slices)} of the {total} slices of the DICOM series have no Image Position "
                          "or Orientation (Patient): they cannot be placed in space")
    if len(slices) < 2:
        return

    orientations = np.array([[float(v) for v in orientation] for orientation, _, _ in slices])
    if orientations.shape[1] != 6:
        raise ValueError("ImageOrientationPatient needs 6 values")
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        raise SeriesError("the DICOM series mixes slices of different orientations (e.g. a localizer or "
                          "several stacks in one series); it is not one volume")
    row, col = orientations[0, :3], orientations[0, 3:]
    normal = np.cross(row, col)
    if not np.linalg.norm(normal) > 1e-6:  # zero or parallel direction cosines (NaN included)
        raise ValueError("ImageOrientationPatient has no slice normal")
    normal /= np.linalg.norm(normal)

    # ITK stacks the frames of a multi-frame file as they are stored (it sorts only files): they must go one way.
    for frames in per_file:
        stored = np.diff([np.array([float(v) for v in position]) @ normal for _, position, _ in frames])
        if len(stored) and not ((stored > 0).all() or (stored < 0).all()):
            raise SeriesError("the frames of the multi-frame DICOM file are not stored in slice order: stacked as "
                              "stored, its anatomy would be scrambled. Convert it to a series of slices first")

    positions = np.array([[float(v) for v in position] for _, position, _ in slices])
    depth = positions @ normal
    order = np.argsort(depth)
    positions, depth = positions[order], depth[order]
    gaps = np.diff(depth)
    if gaps.min() < SPACING_TOLERANCE_MM:
        same = int(np.sum(gaps < SPACING_TOLERANCE_MM)) + 1
        raise SeriesError(f"the DICOM series has {same} slices at the same position: it holds more than one "
                          "volume (e.g. several phases or reconstructions); split it into one series each")

    in_plane = (positions - positions[0]) - np.outer(depth - depth[0], normal)
    drift = float(np.linalg.norm(in_plane, axis=1).max())
    pixel = min((float(v) for v in slices[0][2] or [1.0, 1.0]), default=1.0)
    if drift > SHEAR_TOLERANCE_PIXELS * pixel:
        tilt = math.degrees(math.atan2(drift, float(depth[-1] - depth[0])))
        stated = headers[0].get("GantryDetectorTilt")
        stated = f"; Gantry/Detector Tilt {float(stated):g} degrees" if stated not in (None, "") else ""
        raise SeriesError(
            f"the DICOM series is gantry-tilted (slices sheared by {tilt:.1f} degrees{stated}): stacked as a regular "
            "volume its anatomy would be distorted. Resample it to an orthogonal grid first (tilt correction, e.g. "
            "in dcm2niix or 3D Slicer) and segment that")

    median = float(np.median(gaps))
    if np.abs(gaps - median).max() > SPACING_TOLERANCE * median + SPACING_TOLERANCE_MM:
        raise SeriesError(
            f"the DICOM series has uneven slice spacing (gaps from {gaps.min():.2f} to {gaps.max():.2f} mm: missing "
            "slices or a variable-spacing acquisition): stacked as a regular volume it would be distorted. Resample "
            "it to even spacing first")
