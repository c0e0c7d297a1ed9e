"""The app's parts in-process, without a server: prompt parsing, the label writers, options, the model service,
the interaction logic and the automatic click."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import raps3d

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "raps3d"
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

from lib import interaction  # noqa: E402
from lib.auto_prompt import soft_tissue_seed  # noqa: E402
from lib.images import (Geometry, ImageReadError, check_label_values, image_key, read_geometry,  # noqa: E402
                        read_image, read_label_on_grid)
from lib.label_writers import LabelFormat, LabelFormatError, write_label  # noqa: E402
from lib.model_service import ModelService, fallback_warning, load_served  # noqa: E402
from lib.options import DEFAULT_MODEL_PATH, AppOptions  # noqa: E402
from lib.prompts import PromptFormatError, parse_prompts  # noqa: E402

SIZE = (160, 128, 48)  # (i, j, k)
SAMPLE_IMAGES = APP_DIR.parents[1] / "sample-data" / "images"


# -- prompts ----------------------------------------------------------------------------------------------------------
def test_points_are_converted_from_ijk_to_zyx():
    prompts = parse_prompts({"foreground": [[10, 20, 30]], "background": [[1, 2, 3]]}, SIZE)
    assert prompts.points == (((30.0, 20.0, 10.0), True), ((3.0, 2.0, 1.0), False))
    assert prompts.box is None


def test_a_fractional_click_counts_in_the_voxel_that_holds_it():
    # Voxel n spans n - 0.5 to n + 0.5: a click in the outer half of an edge voxel is in the image.
    prompts = parse_prompts({"foreground": [[-0.3, 20, 47.4]], "background": [[159.49, 0.2, 0]]}, SIZE)
    assert prompts.points == (((47.0, 20.0, 0.0), True), ((0.0, 0.2, 159.0), False))
    for outside in ([-0.5, 20, 10], [159.5, 20, 10], [10, 20, 47.5]):  # open at both ends, alike when reversed
        with pytest.raises(PromptFormatError, match="lies outside the image"):
            parse_prompts({"foreground": [outside]}, SIZE)
    # Halves go up for boxes too (round() would take 24.5 to 24, 25.5 to 26).
    assert parse_prompts({"box": {"slice": 24.5, "corners": [[10, 20], [30, 40]]}}, SIZE).box.k == 25
    assert parse_prompts({"box": {"slice": 25.5, "corners": [[10.5, 20], [30, 40]]}}, SIZE).box.to_library() == (
        26, (20, 11), (40, 30))


@pytest.mark.parametrize("roi,expected", [
    ([60, 100, 40, 90, 24, 24], (24, "roi")),
    ([100, 60, 90, 40, 24, 24], (24, "roi")),
    ([60, 100, 40, 90, 20, 30], (25, "roi_middle_slice")),
    ([60, 100, 40, 90, 31, 20], (25, "roi_middle_slice")),
    ([60, 100, 40, 90, -10, 100], (23, "roi_middle_slice")),  # clipped to slices 0..47 first
])
def test_slicer_roi_becomes_a_2d_box(roi, expected):
    box = parse_prompts({"roi": roi}, SIZE).box
    assert (box.k, box.source) == expected
    assert (box.i0, box.j0, box.i1, box.j1) == (60, 40, 100, 90)
    assert box.to_library() == (expected[0], (40, 60), (90, 100))


def test_an_roi_on_a_ct_stored_as_sagittal_slices_becomes_a_box_on_the_models_axial_slice():
    from raps3d import Reorientation

    # Stored as sagittal slices (k runs to the left), rows (j) from head to feet, columns (i) to the back: the
    # model's slice axis is j, its rows i, its columns k. A Slicer ROI drawn on an axial view is thin along j.
    sagittal = Reorientation.from_direction((0, 0, 1, 1, 0, 0, 0, -1, 0))
    size = (128, 48, 160)  # (i, j, k)
    box = parse_prompts({"roi": [40, 90, 24, 24, 100, 60]}, size, sagittal).box
    assert box.to_library() == (24, (40, 60), (90, 100)) and box.source == "roi"
    assert box.as_reply(sagittal, size[::-1]) == {"roi": [40, 90, 24, 24, 60, 100], "source": "roi"}
    thick = parse_prompts({"roi": [40, 90, 20, 31, 60, 100]}, size, sagittal).box
    assert (thick.k, thick.source) == (25, "roi_middle_slice")
    assert parse_prompts({"foreground": [[10, 20, 30]]}, size, sagittal).points == (((20.0, 10.0, 30.0), True),)
    with pytest.raises(PromptFormatError, match="the roi's slices j 50..60 lie outside the image's 48 slices"):
        parse_prompts({"roi": [40, 90, 50, 60, 60, 100]}, size, sagittal)
    with pytest.raises(PromptFormatError, match=r"the box \(k 60..60, i 40..90\) has no area.*spans j 20..31 but "
                                                r"is flat within the axial plane.*draw it on an axial view"):
        parse_prompts({"roi": [40, 90, 20, 31, 60, 60]}, size, sagittal)  # drawn on a sagittal view
    with pytest.raises(PromptFormatError, match=r"has no area; draw a box at least two voxels wide and high$"):
        parse_prompts({"roi": [40, 90, 20, 31, -5, 0.3]}, size, sagittal)  # wide, but clipped to the image's edge
    with pytest.raises(PromptFormatError, match="this image is stored as sagittal slices.*send the box as an 'roi'"):
        parse_prompts({"box": {"slice": 3, "corners": [[10, 10], [20, 20]]}}, size, sagittal)


def test_a_box_on_an_axial_ct_with_rows_and_columns_swapped_is_taken_on_its_slice():
    from raps3d import Reorientation

    # A decubitus scan: axial slices (k towards the head), rows (i) towards the back, columns (j) to the right.
    decubitus = Reorientation.from_direction((0, -1, 0, 1, 0, 0, 0, 0, 1))
    size = (100, 80, 30)  # (i, j, k)
    box = parse_prompts({"box": {"slice": 10, "corners": [[20, 30], [40, 50]]}}, size, decubitus).box
    # Model slice 29 - 10, rows from i, columns from j reversed (79 - 50 .. 79 - 30).
    assert box.to_library() == (19, (20, 29), (40, 49)) and box.source == "box"
    assert box.as_reply(decubitus, size[::-1]) == {"slice": 10, "corners": [[20, 30], [40, 50]], "source": "box"}


def test_a_box_poking_out_of_the_slice_is_clipped():
    box = parse_prompts({"box": {"slice": 3, "corners": [[-5, 10], [500, 20]]}}, SIZE).box
    assert (box.i0, box.j0, box.i1, box.j1) == (0, 10, 159, 20)


@pytest.mark.parametrize("params,fragment", [
    ({"foreground": [[1, 2, 3, 4]]}, "must be three numbers [i, j, k]"),
    ({"foreground": [[True, 2, 3]]}, "coordinate must be a number, got True"),
    ({"foreground": [[float("nan"), 2, 3]]}, "coordinate must be finite, got nan"),
    ({"foreground": [[160, 0, 0]]}, "[160, 0, 0] lies outside the image of size [160, 128, 48]"),
    ({"roi": [0, 10, 0, 10, 60, 70]}, "slices k 60..70 lie outside the image's 48 slices"),
    ({"box": {"slice": 1}}, "'box' must be {\"slice\": k"),
    ({"foreground": [[10**400, 2, 3]]}, "coordinate must be finite"),  # too large for a float
    ({"roi": [0, 10, 0, 10, 0, 10**400]}, "an roi coordinate must be finite"),
])
def test_malformed_prompts_raise(params, fragment):
    with pytest.raises(PromptFormatError) as raised:
        parse_prompts(params, SIZE)
    assert fragment in str(raised.value)


# -- label writers ----------------------------------------------------------------------------------------------------
GEOMETRY = Geometry((7, 5, 4), (0.7, 0.8, 2.5), (-10.25, 3.5, 100.0),
                    (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))


def _mask_and_box():
    rng = np.random.default_rng(0)
    start, stop = (1, 1, 2), (3, 4, 6)
    return rng.integers(0, 2, size=(2, 3, 4), dtype=np.uint8), start, stop


@pytest.mark.parametrize("fmt", [LabelFormat(".nrrd"), LabelFormat(".nrrd", "uint16", True), LabelFormat(".nii.gz"),
                                 LabelFormat(".nii", "float32")])
def test_label_writers_keep_voxels_and_geometry(tmp_path, fmt):
    mask, start, stop = _mask_and_box()
    path = write_label(fmt, mask, start, stop, GEOMETRY, str(tmp_path))
    assert path.endswith(fmt.extension)
    label = sitk.ReadImage(path)
    assert label.GetSize() == GEOMETRY.size
    np.testing.assert_allclose(label.GetSpacing(), GEOMETRY.spacing, rtol=1e-6)
    np.testing.assert_allclose(label.GetOrigin(), GEOMETRY.origin, rtol=1e-6)
    np.testing.assert_allclose(label.GetDirection(), GEOMETRY.direction, atol=1e-6)
    expected = np.zeros(GEOMETRY.shape_zyx, np.uint8)
    expected[1:3, 1:4, 2:6] = mask
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), expected)
    assert sitk.GetArrayFromImage(label).dtype == np.dtype(fmt.dtype)


def test_raw_nrrd_header_is_exact_for_pynrrd(tmp_path):
    mask, start, stop = _mask_and_box()
    path = write_label(LabelFormat(".nrrd"), mask, start, stop, GEOMETRY, str(tmp_path))
    data, header = nrrd.read(path)  # pynrrd: index order (i, j, k)
    assert data.shape == GEOMETRY.size
    direction = np.asarray(GEOMETRY.direction).reshape(3, 3)
    np.testing.assert_array_equal(header["space directions"], (direction * GEOMETRY.spacing).T)
    np.testing.assert_array_equal(header["space origin"], GEOMETRY.origin)
    assert data[2:6, 1:4, 1:3].transpose(2, 1, 0).tolist() == mask.tolist()


def test_an_empty_label(tmp_path):
    for fmt in (LabelFormat(".nrrd"), LabelFormat(".nrrd", compress=True), LabelFormat(".nii.gz")):
        path = write_label(fmt, None, None, None, GEOMETRY, str(tmp_path))
        label = sitk.ReadImage(path)
        assert not sitk.GetArrayFromImage(label).any()
        # Still the image's grid: a viewer overlays it like any other label.
        assert label.GetSize() == GEOMETRY.size
        np.testing.assert_allclose(label.GetSpacing(), GEOMETRY.spacing, rtol=1e-6)
        np.testing.assert_allclose(label.GetOrigin(), GEOMETRY.origin, rtol=1e-6)
        np.testing.assert_allclose(label.GetDirection(), GEOMETRY.direction, atol=1e-6)


@pytest.mark.parametrize("params,ok", [
    ({}, LabelFormat(".nii.gz", "uint8", False)),
    ({"result_extension": "nrrd", "result_dtype": "uint8", "result_compress": "false"}, LabelFormat(".nrrd")),
    ({"result_extension": ".NRRD", "result_compress": True}, LabelFormat(".nrrd", "uint8", True)),
    ({"result_extension": ".mha"}, None), ({"result_dtype": "bool"}, None),
])
def test_label_format_from_params(params, ok):
    if ok is None:
        with pytest.raises(LabelFormatError):
            LabelFormat.from_params(params)
    else:
        assert LabelFormat.from_params(params) == ok


# -- images -----------------------------------------------------------------------------------------------------------
def test_read_image_gives_zyx_voxels_and_itk_geometry(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 1024
    image = Geometry((6, 5, 4), (0.5, 0.6, 3.0), (1.0, 2.0, 3.0), (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    path = str(tmp_path / "ct.nii.gz")
    sitk.WriteImage(image.apply_to(sitk.GetImageFromArray(array)), path)
    volume, geometry = read_image(path)
    np.testing.assert_array_equal(volume, array)
    assert volume.flags.c_contiguous and geometry.size == (6, 5, 4) and geometry.shape_zyx == (4, 5, 6)
    key = image_key(path)
    assert image_key(path) == key
    (tmp_path / "ct.nii.gz").write_bytes(b"changed")
    assert image_key(path) != key  # a changed file is a new image
    with pytest.raises(ImageReadError, match="cannot read 'ct.nii.gz'"):
        read_image(path)


def test_an_image_rewritten_with_its_old_size_and_modification_time_is_a_new_image(tmp_path):
    path = str(tmp_path / "ct.nii")  # uncompressed: new voxels keep the file size
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 5, 6), -1000, np.int16)), path)
    key, st = image_key(path), os.stat(path)
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 5, 6), 40, np.int16)), path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the old modification time, as cp -p or rsync -a keep it
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    assert image_key(path) != key
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "1.dcm").write_bytes(b"a" * 10)
    key = image_key(str(folder))
    assert image_key(str(folder)) == key
    st = os.stat(folder / "1.dcm")
    (folder / "1.dcm").write_bytes(b"b" * 10)
    os.utime(folder / "1.dcm", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert image_key(str(folder)) != key


def test_images_that_are_not_ct_in_hounsfield_units_are_refused(tmp_path):
    path = str(tmp_path / "t1.nii.gz")
    mr_like = np.random.default_rng(0).integers(0, 1200, (8, 16, 16)).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(mr_like), path)
    with pytest.raises(ImageReadError, match=r"'t1.nii.gz' does not look like CT in Hounsfield units: its lowest "
                                             r"value is \d+"):
        read_image(path)
    sitk.WriteImage(sitk.GetImageFromArray(mr_like - 1024), path)  # the same values shifted to HU: accepted
    assert read_image(path)[0].min() < -250
    # A zero background (an MR, a CT stored without its rescale) is not a display window's bottom: the general advice.
    with_background = mr_like.copy()
    with_background[:, :8] = 0
    sitk.WriteImage(sitk.GetImageFromArray(with_background), path)
    with pytest.raises(ImageReadError, match="convert the image to HU") as refused:
        read_image(path)
    assert "display window" not in str(refused.value)


def _sample_series_copy(folder: Path, **tags) -> Path:
    import pydicom

    source = Path(__file__).resolve().parents[1] / "sample-data" / "dicom" / "phantom_01"
    folder.mkdir()
    for path in sorted(source.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for name, value in tags.items():
            setattr(ds, name, value)
        ds.save_as(folder / path.name)
    return folder


def test_dicom_series_of_another_modality_or_with_malformed_positions_are_refused(tmp_path):
    with pytest.raises(ImageReadError, match="the DICOM series is MR, not CT"):
        read_image(str(_sample_series_copy(tmp_path / "mr", Modality="MR")))
    with pytest.raises(ImageReadError, match="malformed Image Position/Orientation"):
        read_image(str(_sample_series_copy(tmp_path / "bad", ImageOrientationPatient=[1, 0, 0, 0, 1])))


def _nrrd_header(size, data_file: str | None = None) -> bytes:
    lines = ["NRRD0004", "type: int16", "dimension: 3", f"sizes: {' '.join(map(str, size))}",
             "space: left-posterior-superior", "space directions: (1,0,0) (0,1,0) (0,0,1)",
             "space origin: (0,0,0)", "endian: little", "encoding: raw"]
    if data_file is not None:
        lines.append(f"data file: {data_file}")
    return ("\n".join(lines) + "\n\n").encode()


def test_huge_images_and_headers_naming_data_elsewhere_are_refused_before_reading(tmp_path):
    # 92 bytes that declare 8 GiB of voxels: refused from the header, nothing allocated.
    bomb = tmp_path / "bomb.nrrd"
    bomb.write_bytes(_nrrd_header((2048, 2048, 1024)))
    with pytest.raises(ImageReadError, match=r"'bomb.nrrd' is 2048 x 2048 x 1024 = 4,294,967,296 voxels, more than "
                                             r"the 536,870,912 this server opens"):
        read_image(str(bomb))
    # A header whose data is some other file of the server (any file it can read would become an image).
    for target in ("/dev/zero", "../secret.raw", "LIST"):
        for line_end in (b"\n", b"\r\n", b"\r"):  # ITK's reader ends a line at any of them
            detached = tmp_path / "detached.nhdr"
            detached.write_bytes(_nrrd_header((64, 64, 8), target).replace(b"\n", line_end))
            with pytest.raises(ImageReadError, match="names a data file outside its folder"):
                read_image(str(detached))
    # Comments that push the data file beyond what is scanned are no way round; nor is a label instead of an image.
    padded = tmp_path / "padded.nhdr"
    header = _nrrd_header((64, 64, 8), "../secret.raw")
    padded.write_bytes(header.replace(b"endian", b"# padding\n" * 120_000 + b"endian"))
    with pytest.raises(ImageReadError, match="has a header longer than 1024 KiB"):
        read_image(str(padded))
    with pytest.raises(ImageReadError, match="'bomb.nrrd' is 2048 x 2048 x 1024"):
        read_label_on_grid(str(bomb), Geometry((64, 64, 8), (1.0,) * 3, (0.0,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    # Data beside its header is read.
    volume = np.random.default_rng(0).integers(-1000, 400, (8, 64, 64)).astype("<i2")
    (tmp_path / "beside.raw").write_bytes(volume.tobytes())
    beside = tmp_path / "beside.nhdr"
    beside.write_bytes(_nrrd_header((64, 64, 8), "beside.raw"))
    np.testing.assert_array_equal(read_image(str(beside))[0], volume)


def _enhanced_ct_file(path: Path, positions, spacing=(0.7, 0.7), frames=None, intercepts=None) -> np.ndarray:
    """A multi-frame (enhanced) CT file, one frame per position (LPS, mm), frame n holding -1000 + n HU unless
    ``frames`` (HU) are given; returns the frames in HU as stored. With ``intercepts`` (one, or one per frame) the
    frames are stored as unsigned values with that rescale intercept in the functional groups only."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def item(**tags):
        ds = Dataset()
        for name, value in tags.items():
            setattr(ds, name, value)
        return ds

    if frames is None:
        frames = (np.arange(len(positions), dtype=np.int16)[:, None, None] - 1000) * np.ones((1, 10, 12), np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.dataset.FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "enhanced", 1
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.NumberOfFrames, ds.Rows, ds.Columns = len(positions), frames.shape[1], frames.shape[2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, int(intercepts is None)
    shared = item(PixelMeasuresSequence=Sequence([item(PixelSpacing=list(spacing), SliceThickness=2.0)]),
                  PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]))
    per_frame = [item(PlanePositionSequence=Sequence([item(ImagePositionPatient=[float(v) for v in p])]))
                 for p in positions]
    stored = frames
    if intercepts is not None:
        each = np.broadcast_to(np.asarray(intercepts, np.float64), (len(positions),))
        groups = [shared] if np.ndim(intercepts) == 0 else per_frame
        for group, intercept in zip(groups, each):
            group.PixelValueTransformationSequence = Sequence([item(RescaleIntercept=float(intercept),
                                                                    RescaleSlope=1.0, RescaleType="HU")])
        stored = (frames - each[:, None, None]).astype(np.uint16)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = stored.tobytes()
    ds.save_as(str(path), write_like_original=False)
    return frames


def test_the_frames_of_a_multi_frame_ct_get_the_series_checks(tmp_path):
    def folder_with(name, positions):
        folder = tmp_path / name
        folder.mkdir()
        _enhanced_ct_file(folder / "frames.dcm", positions)
        return str(folder)

    # Evenly spaced frames, stored along the slice normal or against it: every frame is placed at its position.
    for name, step in (("ascending", 2.0), ("descending", -2.0)):
        positions = [(-5.0, 7.0, 50.0 + step * n) for n in range(6)]
        volume, geometry = read_image(folder_with(name, positions))
        grid = geometry.apply_to(sitk.Image(list(geometry.size), sitk.sitkUInt8))
        for k in range(volume.shape[0]):
            frame = int(volume[k, 0, 0]) + 1000
            np.testing.assert_allclose(grid.TransformIndexToPhysicalPoint((0, 0, k)), positions[frame], atol=1e-4)
    # A missing frame and a tilted stack would be distorted volumes (the reader would even fall back to 1 mm
    # spacing for the first): refused like the same series stored as one file per slice.
    missing = [(-5.0, 7.0, 50.0 + 2.0 * n) for n in (0, 1, 2, 4, 5)]
    with pytest.raises(ImageReadError, match=r"uneven slice spacing \(gaps from 2.00 to 4.00 mm"):
        read_image(folder_with("missing", missing))
    tilted = [(-5.0, 7.0 + 2.0 * n * np.tan(np.radians(20)), 50.0 + 2.0 * n) for n in range(6)]
    with pytest.raises(ImageReadError, match=r"gantry-tilted \(slices sheared by 20.0 degrees"):
        read_image(folder_with("tilted", tilted))
    shuffled = [(-5.0, 7.0, 50.0 + 2.0 * n) for n in (0, 3, 1, 4, 2, 5)]  # evenly spaced once sorted
    with pytest.raises(ImageReadError, match="frames of the multi-frame DICOM file are not stored in slice order"):
        read_image(folder_with("shuffled", shuffled))
    # Beside two slices of another series, the 6-frame file is still the volume read (frames count, not files).
    beside = Path(folder_with("beside", [(-5.0, 7.0, 50.0 + 2.0 * n) for n in range(6)]))
    sample = Path(__file__).resolve().parents[1] / "sample-data" / "dicom" / "phantom_01"
    for path in sorted(sample.glob("*.dcm"))[:2]:
        shutil.copy(path, beside)
    assert read_image(str(beside))[0].shape == (6, 10, 12)


def test_a_ct_series_reformatted_as_coronal_or_sagittal_slices_reaches_the_model_as_its_axial_twin(tmp_path):
    """The sample series written again as coronal and as sagittal DICOM slices (as a PACS holds reformats): read and
    reoriented, the model gets the same voxels and spacing as from the axial series."""
    import pydicom
    from pydicom.uid import generate_uid

    from lib.images import read_for_model

    axial = Path(__file__).resolve().parents[1] / "sample-data" / "dicom" / "phantom_01"
    template = pydicom.dcmread(sorted(axial.glob("*.dcm"))[0])
    volume, geometry = read_image(str(axial))  # (z: inferior to superior, y: to the back, x: to the left)
    (x0, y0, z0), (sx, sy, sz) = geometry.origin, geometry.spacing
    top = z0 + sz * (volume.shape[0] - 1)
    down = volume[::-1]  # rows from head to feet
    plans = {  # name: (slices, their positions, row and column direction, pixel spacing (rows, columns))
        "coronal": ([down[:, n, :] for n in range(volume.shape[1])],
                    [(x0, y0 + sy * n, top) for n in range(volume.shape[1])], [1, 0, 0, 0, 0, -1], [sz, sx]),
        "sagittal": ([down[:, :, m] for m in range(volume.shape[2])],
                     [(x0 + sx * m, y0, top) for m in range(volume.shape[2])], [0, 1, 0, 0, 0, -1], [sz, sy]),
    }
    seen, _, _ = read_for_model(str(axial))
    for name, (slices, positions, orientation, spacing) in plans.items():
        folder = tmp_path / name
        folder.mkdir()
        series = generate_uid()
        for n, (pixels, position) in enumerate(zip(slices, positions)):
            ds = template.copy()
            ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber, ds.ImageOrientationPatient = n + 1, orientation
            ds.ImagePositionPatient, ds.PixelSpacing = [float(v) for v in position], spacing
            ds.Rows, ds.Columns = pixels.shape
            ds.PixelData = np.ascontiguousarray(pixels, dtype=np.int16).tobytes()
            ds.save_as(folder / f"{n:03d}.dcm")
        model_volume, model_geometry, reorientation = read_for_model(str(folder))
        assert reorientation.order != (0, 1, 2), name
        np.testing.assert_array_equal(model_volume, seen, err_msg=name)
        assert model_geometry.model_spacing == pytest.approx(geometry.model_spacing), name


def test_a_multi_frame_ct_sent_alone_gets_the_series_checks(tmp_path):
    shuffled = [(-5.0, 7.0, 50.0 + 2.0 * n) for n in (0, 3, 1, 4, 2, 5)]
    _enhanced_ct_file(tmp_path / "frames.dcm", shuffled)
    with pytest.raises(ImageReadError, match="frames of the multi-frame DICOM file are not stored in slice order"):
        read_image(str(tmp_path / "frames.dcm"))
    _enhanced_ct_file(tmp_path / "ordered.dcm", [(-5.0, 7.0, 50.0 + 2.0 * n) for n in range(6)])
    assert read_image(str(tmp_path / "ordered.dcm"))[0].shape == (6, 10, 12)


def test_a_functional_group_rescale_is_applied_once_whatever_the_reader_did(tmp_path):
    positions = [(-5.0, 7.0, 50.0 + 2.0 * n) for n in range(6)]
    hu = np.full((6, 10, 12), 40, np.int16)
    hu[:, :3] = -1000  # air in every frame
    _enhanced_ct_file(tmp_path / "air.dcm", positions, frames=hu, intercepts=-1024.0)
    np.testing.assert_array_equal(read_image(str(tmp_path / "air.dcm"))[0], hu)
    # Without air (a soft-tissue reconstruction): the values stay as they are, so the image is refused as not
    # CT-like; it used to get -1024 a second time (lowest value -1124) and pass as a CT.
    soft_tissue = np.where(np.arange(12) % 2, 40, -100).astype(np.int16) * np.ones((6, 10, 1), np.int16)
    _enhanced_ct_file(tmp_path / "no_air.dcm", positions, frames=soft_tissue, intercepts=-1024.0)
    with pytest.raises(ImageReadError, match="its lowest value is -100,"):
        read_image(str(tmp_path / "no_air.dcm"))
    # A rescale that differs between frames: the reader would apply the first frame's to all.
    _enhanced_ct_file(tmp_path / "mixed.dcm", positions, frames=hu, intercepts=[-1024.0] * 3 + [-2048.0] * 3)
    with pytest.raises(ImageReadError, match="have different rescale slopes or intercepts"):
        read_image(str(tmp_path / "mixed.dcm"))


def _assert_reads_as(folder: Path, source: Path) -> None:
    """``folder`` reads as the same voxels and geometry as the series ``source``."""
    volume, geometry = read_image(str(folder))
    expected, expected_geometry = read_image(str(source))
    np.testing.assert_array_equal(volume, expected)
    assert geometry == expected_geometry


def test_a_ct_exported_with_a_larger_segmentation_series_reads_the_ct(tmp_path):
    import pydicom

    sample = Path(__file__).resolve().parents[1] / "sample-data" / "dicom" / "phantom_01"
    folder = tmp_path / "study"
    shutil.copytree(sample, folder)
    count = len(list(folder.glob("*.dcm")))
    # A SEG of two segments over every slice: more frames than the CT has slices.
    _enhanced_ct_file(folder / "seg.dcm", [(0.0, 0.0, 2.0 * n) for n in range(2 * count)])
    seg = pydicom.dcmread(folder / "seg.dcm")
    seg.Modality, seg.SOPClassUID = "SEG", "1.2.840.10008.5.1.4.1.1.66.4"
    seg.save_as(folder / "seg.dcm")
    _assert_reads_as(folder, sample)


def test_a_malformed_number_of_frames_is_a_clear_error(tmp_path):
    import pydicom

    sample = Path(__file__).resolve().parents[1] / "sample-data" / "dicom" / "phantom_01"
    folder = tmp_path / "series"
    shutil.copytree(sample, folder)
    first = sorted(folder.glob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    ds.NumberOfFrames = 987
    ds.save_as(first)
    data = first.read_bytes()
    assert data.count(b"987 ") == 1
    first.write_bytes(data.replace(b"987 ", b"abc "))  # pydicom does not write such a value itself
    with pytest.raises(ImageReadError, match=r"malformed NumberOfFrames \('abc'\)"):
        read_image(str(folder))


def test_a_series_of_one_frame_enhanced_ct_files_reads_their_positions_from_the_functional_groups(tmp_path):
    import pydicom

    folder = tmp_path / "split"
    folder.mkdir()
    positions = [(-5.0, 7.0, 50.0 + 2.0 * n) for n in range(6)]
    for n, position in enumerate(positions):  # a multi-frame CT split into one file per frame
        _enhanced_ct_file(folder / f"{n}.dcm", [position], frames=np.full((1, 10, 12), -1000 + n, np.int16))
        ds = pydicom.dcmread(folder / f"{n}.dcm")
        ds.SeriesInstanceUID, ds.InstanceNumber = "1.2.826.0.1.3680043.2.1.77", n + 1
        ds.save_as(folder / f"{n}.dcm")
    volume, geometry = read_image(str(folder))
    assert volume.shape == (6, 10, 12) and geometry.spacing[2] == pytest.approx(2.0)
    assert [int(v) for v in volume[:, 0, 0]] == [-1000 + n for n in range(6)]


def test_a_series_folder_holding_a_copy_of_one_of_its_files_reads_as_the_series(tmp_path):
    sample = Path(__file__).resolve().parents[1] / "sample-data" / "dicom" / "phantom_01"
    folder = tmp_path / "exported"
    shutil.copytree(sample, folder)
    first = sorted(folder.glob("*.dcm"))[5]
    shutil.copy(first, folder / "copy_of_a_slice.dcm")  # an export that wrote one instance twice
    _assert_reads_as(folder, sample)


def test_a_series_whose_slices_lack_positions_is_refused(tmp_path):
    import pydicom

    sample = Path(__file__).resolve().parents[1] / "sample-data" / "dicom" / "phantom_01"
    for name, unplaced in (("none", None), ("one", 1)):  # the reader would stack them 1 mm apart, or around a gap
        folder = tmp_path / name
        shutil.copytree(sample, folder)
        files = sorted(folder.glob("*.dcm"))
        for path in files[:unplaced] if unplaced else files:
            ds = pydicom.dcmread(path)
            del ds.ImagePositionPatient
            ds.save_as(path)
        count = unplaced or len(files)
        with pytest.raises(ImageReadError, match=f"{count} of the {len(files)} slices of the DICOM series have no "
                                                 "Image Position"):
            read_image(str(folder))


def test_a_sheared_grid_is_refused_and_a_crlf_nrrd_header_is_read(tmp_path):
    volume = np.full((8, 16, 16), -1000, np.int16)
    sheared = tmp_path / "sheared.nrrd"
    header = _nrrd_header((16, 16, 8)).replace(b"(0,0,1)", b"(0,0.35,0.94)")  # slices stacked along a tilt
    sheared.write_bytes(header + volume.tobytes())
    with pytest.raises(ImageReadError, match="axes that are not perpendicular"):
        read_image(str(sheared))
    # Header lines ending in CRLF, and more than the header limit of voxels after it.
    big = np.full((80, 128, 128), -1000, np.int16)
    crlf = tmp_path / "crlf.nrrd"
    crlf.write_bytes(_nrrd_header((128, 128, 80)).replace(b"\n", b"\r\n") + big.tobytes())
    assert crlf.stat().st_size > 2 * (1 << 20)
    np.testing.assert_array_equal(read_image(str(crlf))[0], big)


def test_of_two_equally_large_series_in_a_folder_the_one_checked_is_the_one_read(tmp_path):
    import pydicom

    source = sorted((Path(__file__).resolve().parents[1] / "sample-data" / "dicom" / "phantom_01").glob("*.dcm"))
    straight_uid, tilted_uid = "1.2.826.0.1.3680043.2.1.8", "1.2.826.0.1.3680043.2.1.9"
    for straight_prefix, tilted_prefix in (("a_", "b_"), ("b_", "a_")):  # file names do not decide
        folder = tmp_path / f"straight_{straight_prefix}"
        folder.mkdir()
        for n, path in enumerate(source):
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = straight_uid
            ds.save_as(folder / f"{straight_prefix}{path.name}")
            ds.SeriesInstanceUID, ds.SOPInstanceUID = tilted_uid, pydicom.uid.generate_uid()
            ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1]) + n,
                                       float(ds.ImagePositionPatient[2])]
            ds.save_as(folder / f"{tilted_prefix}{path.name}")
        # The straight series has the first UID: it is checked, read, and equals the sample series.
        volume, geometry = read_image(str(folder))
        expected, expected_geometry = read_image(str(source[0].parent))
        np.testing.assert_array_equal(volume, expected)
        assert geometry == expected_geometry
        from lib.images import read_geometry

        assert read_geometry(str(folder)) == expected_geometry
    # With the UIDs the other way round the tilted series is the one read, so the folder is refused.
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = straight_uid if ds.SeriesInstanceUID == tilted_uid else tilted_uid
        ds.save_as(path)
    with pytest.raises(ImageReadError, match="gantry-tilted"):
        read_image(str(folder))


def test_an_enhanced_ct_file_gets_the_rescale_its_functional_groups_hold(tmp_path):
    from conftest import DATA_ROOT

    source = DATA_ROOT / "dicom" / "transfer_syntaxes" / "CT0012.fragmented_no_bot_jpeg_baseline.51.dcm"
    if not source.is_file():
        pytest.skip(f"the enhanced CT test file is not under {DATA_ROOT} (set RAPS3D_DATA to the data folder)")
    import pydicom

    series_uid = str(pydicom.dcmread(source, stop_before_pixels=True).SeriesInstanceUID)
    folder = tmp_path / series_uid
    folder.mkdir()
    shutil.copy(source, folder)
    stored = sitk.ReadImage(str(source))  # as ITK decodes it: no rescale applied
    assert stored.GetSize() == (512, 512, 2) and sitk.GetArrayFromImage(stored).min() > -250
    in_hu = sitk.GetArrayFromImage(stored).astype(np.int16) - 1024  # its shared functional group's intercept
    # A local folder of one multi-frame file, and the layout of MONAI Label's DICOMweb cache: the series converted
    # to NIfTI beside the folder of its files (named by the series UID).
    sitk.WriteImage(stored, str(tmp_path / f"{series_uid}.nii.gz"))
    for path in (folder, tmp_path / f"{series_uid}.nii.gz"):
        volume, geometry = read_image(str(path))
        assert volume.dtype == np.int16 and geometry.size == (512, 512, 2)
        np.testing.assert_array_equal(volume, in_hu)
    # The same file anywhere else (no series folder beside it) keeps its stored values, refused as not CT.
    sitk.WriteImage(stored, str(tmp_path / "elsewhere.nii.gz"))
    with pytest.raises(ImageReadError, match="does not look like CT in Hounsfield units"):
        read_image(str(tmp_path / "elsewhere.nii.gz"))


def test_a_label_on_its_own_grid_is_put_on_the_image_grid(tmp_path):
    geometry = Geometry((6, 5, 8), (0.5, 0.6, 3.0), (1.0, 2.0, 3.0), (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    full = np.zeros((8, 5, 6), np.uint8)
    full[3:5, 1:4, 2:5] = 2
    # As a SEG reads back: only slices 3-4, its origin at slice 3 (3 mm slices along +z).
    part = sitk.GetImageFromArray(full[3:5].copy())
    part.SetSpacing(geometry.spacing)
    part.SetDirection(geometry.direction)
    part.SetOrigin((1.0, 2.0, 3.0 + 3 * 3.0))
    sitk.WriteImage(part, str(tmp_path / "part.nii.gz"))
    np.testing.assert_array_equal(read_label_on_grid(str(tmp_path / "part.nii.gz"), geometry), full)
    sitk.WriteImage(geometry.apply_to(sitk.GetImageFromArray(full)), str(tmp_path / "same.nii.gz"))
    np.testing.assert_array_equal(read_label_on_grid(str(tmp_path / "same.nii.gz"), geometry), full)
    part.SetOrigin((1.0, 2.0, 300.0))  # far beyond the image
    sitk.WriteImage(part, str(tmp_path / "outside.nii.gz"))
    with pytest.raises(ImageReadError, match="lies outside its image"):
        read_label_on_grid(str(tmp_path / "outside.nii.gz"), geometry)
    # An image saved as a label is not a label map: negative values, fractions, thousands of values.
    sitk.WriteImage(geometry.apply_to(sitk.GetImageFromArray(full.astype(np.int16) - 1000)), str(tmp_path / "ct.nii.gz"))
    with pytest.raises(ImageReadError, match=re.escape("the label 'ct.nii.gz' holds negative values (down to -1000)")):
        read_label_on_grid(str(tmp_path / "ct.nii.gz"), geometry)
    for bad, reason in [(np.full((4, 5, 6), 0.5, np.float32), "values that are not whole numbers"),
                        (np.arange(1200, dtype=np.int16).reshape(10, 10, 12), "holds 1199 different structure values"),
                        (np.full((4, 5, 6), 70000, np.int32), "holds values up to 70000")]:
        with pytest.raises(ImageReadError, match=reason):
            check_label_values(bad, "label.nii.gz")
    check_label_values(np.arange(1001, dtype=np.float32).reshape(7, 11, 13), "label.nii.gz")  # 1000 values: fine
    # A label file is named as its image is: the message says it is the label that could not be read.
    (tmp_path / "corrupt.nii.gz").write_bytes(b"not a label")
    with pytest.raises(ImageReadError, match=r"^cannot read 'corrupt.nii.gz' as a label map: "):
        read_label_on_grid(str(tmp_path / "corrupt.nii.gz"), geometry)


def test_a_label_partly_outside_its_image_is_refused_with_how_much_is_outside(tmp_path):
    geometry = Geometry((40, 30, 20), (1.0, 1.0, 2.0), (10.0, 20.0, 30.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    full = np.zeros((20, 30, 40), np.uint8)
    full[5:10, 10:20, 30:40] = 1  # 500 voxels, up to the image's last column
    # Shifted along x (mm): 0.4 keeps the same voxels, 3 pushes 3 columns out.
    for shift, outside in [(0.0, 0), (0.4, 0), (3.0, 150)]:
        label = sitk.GetImageFromArray(full)
        label.SetSpacing(geometry.spacing)
        label.SetOrigin((10.0 + shift, 20.0, 30.0))
        sitk.WriteImage(label, str(tmp_path / "label.nii.gz"))
        if outside:
            with pytest.raises(ImageReadError, match=f"^{outside} of the 500 labelled voxels of the label "
                                                     "'label.nii.gz' lie outside its image"):
                read_label_on_grid(str(tmp_path / "label.nii.gz"), geometry)
        else:
            np.testing.assert_array_equal(read_label_on_grid(str(tmp_path / "label.nii.gz"), geometry), full)
    # On a 3 mm grid that covers the image, a structure reaching its last column: the coarse voxels' centres lie
    # beyond it, but they cover it, and resampling takes them.
    coarse = np.zeros((7, 10, 14), np.uint8)
    coarse[2:4, 3:6, 10:14] = 1
    label = sitk.GetImageFromArray(coarse)
    label.SetSpacing((3.0, 3.0, 6.0))
    label.SetOrigin((11.0, 21.0, 32.0))
    sitk.WriteImage(label, str(tmp_path / "coarse.nii.gz"))
    on_grid = read_label_on_grid(str(tmp_path / "coarse.nii.gz"), geometry)
    assert on_grid[:, :, 39].any()
    # At half the resolution, every labelled voxel inside: put on the image's grid (its 2 mm voxels cover 2 x 2).
    half = sitk.GetImageFromArray(full[:, ::2, ::2].copy())
    half.SetSpacing((2.0, 2.0, 2.0))
    half.SetOrigin((10.5, 20.5, 30.0))
    sitk.WriteImage(half, str(tmp_path / "half.nii.gz"))
    np.testing.assert_array_equal(read_label_on_grid(str(tmp_path / "half.nii.gz"), geometry), full)


def _nifti(path, qform, sform, units="mm", qform_code=1, sform_code=1):
    import nibabel

    data = np.full((30, 30, 20), -1000, np.int16)
    data[10:20, 10:20, 5:15] = 40
    image = nibabel.Nifti1Image(data, None)
    image.set_qform(qform, code=qform_code)
    image.set_sform(sform, code=sform_code)
    image.header.set_xyzt_units(xyz=units)
    nibabel.save(image, str(path))
    return str(path)


def test_a_nifti_file_whose_two_transforms_disagree_or_whose_unit_is_wrong_is_refused(tmp_path):
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 20.0)
    shifted = affine.copy()
    shifted[0, 3] += 12.0
    sheared = affine.copy()
    sheared[:3, :3] = affine[:3, :3] @ np.array([[1, 0.2, 0], [0, 1, 0], [0, 0, 1]])
    within = affine.copy()
    within[0, 3] += 0.3  # under half the smallest voxel: rounding, as between a quaternion and a matrix
    # Readers agree: one transform set, or both the same (to within rounding).
    for name, sform, sform_code in [("same", affine, 1), ("only_qform", shifted, 0), ("within", within, 2)]:
        read_image(_nifti(tmp_path / f"{name}.nii.gz", affine, sform, sform_code=sform_code))
    for name, sform, sform_code, apart in [("shifted", shifted, 2, "12.0"), ("sheared", sheared, 1, "4.6")]:
        path = _nifti(tmp_path / f"{name}.nii.gz", affine, sform, sform_code=sform_code)
        with pytest.raises(ImageReadError, match=re.escape(f"'{name}.nii.gz' holds two transforms (NIfTI qform and "
                                                           f"sform) that place it up to {apart} mm apart")):
            read_image(path)
    for units, spacing in [("meter", "800 x 800 x 2500"), ("micron", "0.0008 x 0.0008 x 0.0025")]:
        path = _nifti(tmp_path / f"{units}.nii.gz", affine, affine, units=units)
        with pytest.raises(ImageReadError, match=re.escape(f"has voxels of {spacing} mm, outside the 0.01-100 mm")):
            read_image(path)
    # A 4D file is refused as 4D whatever its time step (not as voxels of 2000 mm).
    import nibabel

    image = nibabel.Nifti1Image(np.full((30, 30, 20, 3), -1000, np.int16), affine)
    image.header.set_zooms((0.8, 0.8, 2.5, 2000.0))
    nibabel.save(image, str(tmp_path / "4d.nii.gz"))
    with pytest.raises(ImageReadError, match="the image is 4D"):
        read_image(str(tmp_path / "4d.nii.gz"))
    # A label is held to the same: it would land elsewhere than the viewer shows it.
    label = _nifti(tmp_path / "label.nii.gz", affine, shifted, sform_code=2)
    with pytest.raises(ImageReadError, match="holds two transforms"):
        read_label_on_grid(label, read_geometry(str(tmp_path / "same.nii.gz")))


def test_a_dicom_series_folder_reads_like_its_nifti():
    sample = Path(__file__).resolve().parents[1] / "sample-data"
    from_dicom, g_dicom = read_image(str(sample / "dicom" / "phantom_01"))
    from_nifti, g_nifti = read_image(str(sample / "images" / "phantom_01.nii.gz"))
    np.testing.assert_array_equal(from_dicom, from_nifti)
    assert g_dicom.size == g_nifti.size
    np.testing.assert_allclose(g_dicom.spacing, g_nifti.spacing, rtol=1e-5)
    np.testing.assert_allclose(g_dicom.origin, g_nifti.origin, atol=1e-4)


def test_expired_sessions_are_removed_also_those_made_before_a_restart(tmp_path):
    """MONAI Label's cleanup does nothing while its process holds no session: after a restart, the CT images 3D
    Slicer uploaded before it stayed on disk for good."""
    import json
    import time

    from lib.session_route import remove_expired_sessions
    from monailabel.utils.sessions import Sessions

    store = tmp_path / "sessions"
    now = time.time()

    def made(session_id: str, last_access: float, record: bool = True, image: bool = True):
        folder = store / session_id
        folder.mkdir(parents=True)
        if image:
            (folder / "ct.nii.gz").write_bytes(b"ct")
        if record:
            (folder / "meta.info").write_text(json.dumps({
                "name": session_id, "path": str(folder), "image": str(folder / "ct.nii.gz"), "meta": {},
                "create_ts": int(last_access), "last_access_ts": int(last_access), "expiry": 600}))
        return folder

    old = made("expired", now - 3600)
    fresh = made("fresh", now - 60)
    being_made = made("being-made", now, record=False)  # its record not written yet
    stale = made("no-record", now, record=False)
    os.utime(stale, (now - 7200, now - 7200))
    dangling = made("dangling", now - 60, image=False)
    sessions = Sessions(str(store), expiry=3600)  # a new process: none of them in memory
    assert remove_expired_sessions(sessions, now) == 3
    assert not old.exists() and not stale.exists() and not dangling.exists()
    assert fresh.exists() and being_made.exists()


def test_an_index_refresh_that_meets_the_file_watcher_is_tried_again_and_never_raises(caplog):
    """MONAI Label's file watcher reconciles the index in its own thread, without a lock: a refresh run meanwhile
    can fail with "dictionary changed size during iteration" (a label removal answered 500 once, its file gone)."""
    from lib import datastore_index

    class Racing:  # a datastore whose reconciliation meets the watcher ``fails`` times
        def __init__(self, fails):
            self.fails, self.calls = fails, 0

        def refresh(self):
            self.calls += 1
            if self.calls <= self.fails:
                raise RuntimeError("dictionary changed size during iteration")

    once = Racing(fails=2)
    datastore_index.refresh(once)
    assert once.calls == 3
    always = Racing(fails=99)
    with caplog.at_level("WARNING"):
        datastore_index.refresh(always)
    assert always.calls == datastore_index.REFRESH_ATTEMPTS
    assert "the datastore index could not be refreshed (dictionary changed size during iteration)" in caplog.text


# -- options ----------------------------------------------------------------------------------------------------------
def test_options_from_conf_then_environment_then_defaults():
    assert AppOptions.from_conf({}, {}).model_path == DEFAULT_MODEL_PATH
    opts = AppOptions.from_conf({"max_images": "2", "labels": "a, b"}, {"RAPS3D_MAX_IMAGES": "9",
                                                                         "RAPS3D_DEVICE": "cpu"})
    assert (opts.max_images, opts.device, opts.labels) == (2, "cpu", ("a", "b"))
    with pytest.raises(ValueError, match="max_objects"):
        AppOptions.from_conf({"max_objects": "many"}, {})
    for device in ("tpu", "cudax", "cuda:abc"):
        with pytest.raises(ValueError, match="must be auto, cpu, cuda or cuda:N"):
            AppOptions.from_conf({"device": device}, {})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch finds no CUDA GPU here"):
            AppOptions.from_conf({"device": "cuda"}, {})
    with pytest.raises(ValueError, match="idle_seconds"):
        AppOptions.from_conf({"idle_seconds": "nan"}, {})
    with pytest.raises(ValueError, match="result_dir"):
        AppOptions.from_conf({"result_dir": "/nonexistent/folder"}, {})


def test_a_conf_key_that_is_no_option_is_named_in_a_warning(caplog):
    opts = AppOptions.from_conf({"devcie": "cpu", "max_images": "3"}, {})
    assert opts.max_images == 3 and opts.device == "auto"
    warnings = [r.getMessage() for r in caplog.records if "--conf" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("Raps-3D: --conf 'devcie' is not one of the app's options (bf16, device,")


# -- DICOMweb errors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("error, status, detail", [
    (OSError(28, "No space left on device"), 507,
     "the server cannot write its DICOMweb cache for '1.2.3': No space left on device; nothing is wrong with the "
     "series"),
    (PermissionError(13, "Permission denied"), 500,
     "the server cannot write its DICOMweb cache for '1.2.3': Permission denied; nothing is wrong with the series"),
    (RuntimeError("ITK ERROR: GDCMImageIO\nunsupported transfer syntax"), 422,
     "series '1.2.3' cannot be converted: unsupported transfer syntax"),
])
def test_a_full_or_read_only_cache_is_not_blamed_on_the_series(error, status, detail):
    from fastapi import HTTPException

    from lib.dicomweb import http_errors

    with pytest.raises(HTTPException) as e:
        with http_errors("1.2.3", "send series", "series '1.2.3' cannot be converted"):
            raise error
    assert (e.value.status_code, e.value.detail) == (status, detail)


# -- active learning --------------------------------------------------------------------------------------------------
def test_scoring_retries_a_passing_failure_remembers_an_unreadable_image_and_survives_a_removed_one(tmp_path,
                                                                                                   monkeypatch,
                                                                                                   caplog):
    from monailabel.datastore.local import LocalDatastore

    from lib.scoring.uncertainty import DETAILS_KEY, SCORE_KEY, Raps3DUncertainty

    studies = tmp_path / "studies"
    studies.mkdir()
    for name in ("phantom_01", "phantom_02"):
        shutil.copy(SAMPLE_IMAGES / f"{name}.nii.gz", studies)
    (studies / "broken.nii.gz").write_bytes(b"not an image")
    datastore = LocalDatastore(str(studies))
    options = AppOptions(model_path=tmp_path / "absent.pt", trained_model_path=tmp_path / "tuned.pt", device="cpu")
    scoring = Raps3DUncertainty(ModelService(options))
    score, failures = Raps3DUncertainty._score, []

    def out_of_memory_once(engine, path):
        if "phantom_02" in path and not failures:
            failures.append(path)
            raise RuntimeError("CUDA out of memory")
        return score(engine, path)

    monkeypatch.setattr(Raps3DUncertainty, "_score", staticmethod(out_of_memory_once))
    first = scoring({}, datastore)
    assert list(first["scored"]) == ["phantom_01"]
    assert first["failed"]["phantom_02"] == "RuntimeError: CUDA out of memory"
    assert "cannot read 'broken.nii.gz' as an image" in first["failed"]["broken"]
    assert DETAILS_KEY not in datastore.get_image_info("phantom_02")  # nothing remembered: not the file's fault
    assert "cannot read" in datastore.get_image_info("broken")[DETAILS_KEY]["error"]
    second = scoring({}, datastore)
    assert list(second["scored"]) == ["phantom_02"] and second["unchanged"] == ["broken", "phantom_01"]
    assert 0.0 <= datastore.get_image_info("phantom_02")[SCORE_KEY] <= 1.0
    # A score computed the way of an earlier version (before images were shown in the model's orientation, say)
    # is computed again.
    old = dict(datastore.get_image_info("phantom_01")[DETAILS_KEY])
    del old["version"]
    datastore.update_image_info("phantom_01", {DETAILS_KEY: old})
    third = scoring({}, datastore)
    assert list(third["scored"]) == ["phantom_01"] and third["unchanged"] == ["broken", "phantom_02"]
    # Nothing changed: a pass (one per hand-out, by default) does not load the model at all.
    caplog.clear()
    with caplog.at_level("WARNING"):
        fourth = Raps3DUncertainty(ModelService(options))({}, datastore)
    assert fourth["scored"] == {} and fourth["unchanged"] == ["broken", "phantom_01", "phantom_02"]
    assert "UNTRAINED" not in caplog.text  # the untrained fallback says so loudly whenever it is loaded
    # An image removed from the datastore while it is scored: the pass goes on with the others.
    def removed_meanwhile(engine, path):
        if "phantom_01" in path:
            datastore.remove_image("phantom_01")
        return score(engine, path)

    monkeypatch.setattr(Raps3DUncertainty, "_score", staticmethod(removed_meanwhile))
    fifth = scoring({"rescore": True}, datastore)
    assert "removed from the datastore meanwhile" in fifth["failed"]["phantom_01"]
    assert list(fifth["scored"]) == ["phantom_02"]


def test_a_scoring_pass_writes_its_scores_together_over_what_the_server_wrote_meanwhile(tmp_path, monkeypatch):
    """A scoring process (MONAI Label runs each pass in one) wrote its own copy of the datastore's index with each
    score, undoing what the server recorded meanwhile, such as a hand-out."""
    from monailabel.datastore.local import LocalDatastore

    from lib import datastore_index
    from lib.scoring.uncertainty import SCORE_KEY, Raps3DUncertainty

    studies = tmp_path / "studies"
    studies.mkdir()
    for name in ("phantom_01", "phantom_02", "phantom_03"):
        shutil.copy(SAMPLE_IMAGES / f"{name}.nii.gz", studies)
    scoring_copy = LocalDatastore(str(studies), auto_reload=False)  # the scoring process's
    server_copy = LocalDatastore(str(studies), auto_reload=False)  # the server's, on the same folder
    options = AppOptions(model_path=tmp_path / "absent.pt", trained_model_path=tmp_path / "tuned.pt", device="cpu")
    score, writes = Raps3DUncertainty._score, []

    def server_hands_out_meanwhile(engine, path):
        if "phantom_02" in path:
            server_copy.update_image_info("phantom_01", {"strategy": {"raps3d_uncertain": {"ts": 123}}})
        return score(engine, path)

    monkeypatch.setattr(Raps3DUncertainty, "_score", staticmethod(server_hands_out_meanwhile))
    monkeypatch.setattr(datastore_index, "FLUSH_SECONDS", 600.0)
    write = scoring_copy._update_datastore_file
    monkeypatch.setattr(scoring_copy, "_update_datastore_file", lambda *a, **k: (writes.append(1), write(*a, **k)))
    summary = Raps3DUncertainty(ModelService(options))({}, scoring_copy)
    assert sorted(summary["scored"]) == ["phantom_01", "phantom_02", "phantom_03"] and len(writes) == 1
    stored = LocalDatastore(str(studies), auto_reload=False)
    assert stored.get_image_info("phantom_01")["strategy"]["raps3d_uncertain"]["ts"] == 123
    assert all(0.0 <= stored.get_image_info(name)[SCORE_KEY] <= 1.0 for name in summary["scored"])


def test_scoring_with_a_broken_fine_tuned_file_keeps_the_scores_of_the_base_that_serves(tmp_path):
    from monailabel.datastore.local import LocalDatastore

    from lib.scoring.uncertainty import DETAILS_KEY, Raps3DUncertainty

    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(SAMPLE_IMAGES / "phantom_01.nii.gz", studies)
    base, tuned = tmp_path / "base.pt", tmp_path / "tuned.pt"
    torch.manual_seed(1)
    raps3d.save_model(raps3d.modeling.build_model("lite"), base)
    tuned.write_bytes(b"a fine-tuned file that does not load")
    datastore = LocalDatastore(str(studies))
    options = AppOptions(model_path=base, trained_model_path=tuned, device="cpu")
    first = Raps3DUncertainty(ModelService(options))({}, datastore)  # each pass a fresh process, as MONAI Label runs it
    assert list(first["scored"]) == ["phantom_01"]
    assert datastore.get_image_info("phantom_01")[DETAILS_KEY]["weights"].startswith("base.pt:")
    second = Raps3DUncertainty(ModelService(options))({}, datastore)
    assert second["scored"] == {} and second["unchanged"] == ["phantom_01"]


# -- model service ----------------------------------------------------------------------------------------------------
def test_model_service_falls_back_loads_and_reloads(tmp_path, caplog):
    path = tmp_path / "model.pt"
    service = ModelService(AppOptions(model_path=path, trained_model_path=tmp_path / "tuned.pt", device="cpu"))
    assert service.expected_status().trained is False  # nothing loaded yet: a cheap look at the file
    with caplog.at_level("WARNING"):
        status = service.status()
    assert status.trained is False and "UNTRAINED" in status.warning and "UNTRAINED" in caplog.text
    untrained_store = service.store()

    torch.manual_seed(1)
    raps3d.save_model(raps3d.modeling.build_model("lite"), path)
    assert service.expected_status().trained is True
    status = service.status()
    assert status.trained and status.warning is None and status.config == "lite"
    assert service.store() is not untrained_store  # new weights: sessions start over
    trained_engine = service.engine()

    path.write_bytes(b"a half-written or foreign file")
    assert service.engine() is trained_engine  # a bad file does not replace working weights
    assert service.store() is service.store()

    # A fine-tuned checkpoint, once published, is served instead of the base; removed, the base is served again.
    tuned = tmp_path / "tuned.pt"
    raps3d.save_model(raps3d.modeling.build_model("lite"), tuned)
    assert service.status().path == str(tuned) and service.engine() is not trained_engine
    torch.manual_seed(1)
    raps3d.save_model(raps3d.modeling.build_model("lite"), path)
    tuned.unlink()
    assert service.status().path == str(path) and service.status().trained


def test_a_fine_tuned_checkpoint_that_cannot_be_loaded_leaves_the_base_serving(tmp_path):
    base, tuned = tmp_path / "model.pt", tmp_path / "tuned.pt"
    torch.manual_seed(1)
    raps3d.save_model(raps3d.modeling.build_model("lite"), base)
    raps3d.save_model(raps3d.modeling.build_model("lite"), tuned)
    tuned.write_bytes(tuned.read_bytes()[:5000])  # a truncated copy
    options = AppOptions(model_path=base, trained_model_path=tuned, device="cpu")
    status = ModelService(options).status()
    assert status.trained and status.path == str(base)
    assert status.warning.startswith("WARNING: the fine-tuned checkpoint 'tuned.pt' cannot be loaded (")
    assert "serving the base model 'model.pt' instead" in status.warning and str(tmp_path) not in status.warning
    model, _, path, failure = load_served(options)  # what the train task starts from
    assert path == base and status.warning == fallback_warning(options, failure)
    expected = raps3d.load_model(base)[0].state_dict()
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())

    # Serving as the fallback, the base is still watched: a new base file is loaded.
    service = ModelService(options)
    engine = service.engine()
    torch.manual_seed(2)
    raps3d.save_model(raps3d.modeling.build_model("lite"), base)
    assert service.engine() is not engine and service.status().path == str(base)

    # A fine-tuned file that stops loading while it serves (a copy still being written over it) does not replace
    # the weights in use, nor drop the sessions; the status says why.
    raps3d.save_model(raps3d.modeling.build_model("lite"), tuned)
    engine, store = service.engine(), service.store()
    assert service.status().path == str(tuned) and service.status().warning is None
    tuned.write_bytes(tuned.read_bytes()[:5000])
    assert service.engine() is engine and service.store() is store
    assert service.status().warning.startswith("WARNING: the checkpoint 'tuned.pt' changed and cannot be loaded (")

    # Back to the base as the fallback; the base breaks while it serves: it keeps serving, and the warning names it.
    service = ModelService(options)
    engine = service.engine()
    assert service.status().path == str(base)
    good_base = base.read_bytes()
    base.write_bytes(good_base[:5000])
    assert service.engine() is engine
    assert service.status().warning.startswith("WARNING: the checkpoint 'model.pt' changed and cannot be loaded (")
    base.write_bytes(good_base)
    engine = service.engine()  # the base is loaded again (the broken fine-tuned file still there: with the warning)
    assert service.status().warning.startswith("WARNING: the fine-tuned checkpoint 'tuned.pt' cannot be loaded")
    # The broken fine-tuned file removed, as the warning asks: the base serves on, and the warning goes.
    tuned.unlink()
    assert service.engine() is engine and service.status().warning is None and service.status().path == str(base)

    # Neither loads: both reasons, without the server's folders; random weights serve until a base loads.
    raps3d.save_model(raps3d.modeling.build_model("lite"), tuned)
    tuned.write_bytes(tuned.read_bytes()[:5000])
    base.write_bytes(b"not a checkpoint either")
    service = ModelService(options)
    status = service.status()
    assert not status.trained and "tuned.pt is not a readable" in status.warning
    assert "and the base checkpoint: model.pt is not a readable" in status.warning
    assert str(tmp_path) not in status.warning
    base.write_bytes(good_base)
    assert service.status().trained and service.status().path == str(base)


def test_a_model_that_could_not_be_set_up_is_tried_again(tmp_path, monkeypatch):
    import lib.model_service as model_service

    base = tmp_path / "model.pt"
    raps3d.save_model(raps3d.modeling.build_model("lite"), base)
    service = ModelService(AppOptions(model_path=base, trained_model_path=tmp_path / "tuned.pt", device="cpu"))
    engine = service.engine()
    raps3d.save_model(raps3d.modeling.build_model("lite"), tmp_path / "tuned.pt")
    with monkeypatch.context() as m:
        m.setattr(model_service.raps3d, "Engine", lambda *a, **k: (_ for _ in ()).throw(MemoryError("no memory")))
        with pytest.raises(MemoryError):
            service.engine()
    assert service.engine() is not engine and service.status().path == str(tmp_path / "tuned.pt")


def test_idle_sessions_are_dropped_while_no_request_comes(tmp_path):
    import time

    # Idle for 6 s: long enough that a first click on a busy machine (a few seconds) is not idle time itself.
    options = AppOptions(model_path=tmp_path / "absent.pt", trained_model_path=tmp_path / "tuned.pt", device="cpu",
                         idle_seconds=6.0)
    service = ModelService(options)  # the sweeper runs while the service lives
    store = service.store()
    image = store.image("img", lambda: (_volume(), (1.0, 1.0, 1.0)))
    store.new_object(("client", "img", "liver"), image).add_point((12, 24, 28))
    assert store.stats()["images"] == 1 and store.stats()["objects"] == 1
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and store.stats()["images"]:  # stats() itself expires nothing
        time.sleep(0.1)
    assert store.stats() == {"images": 0, "objects": 0, "image_bytes": 0}


def test_a_model_service_that_is_gone_leaves_no_sweeper_holding_its_model(tmp_path):
    import gc
    import time
    import weakref

    options = AppOptions(model_path=tmp_path / "absent.pt", trained_model_path=tmp_path / "tuned.pt", device="cpu",
                         idle_seconds=2.0)
    service = ModelService(options)
    model = weakref.ref(service.engine().model)
    sweeper = service._sweeper
    del service
    for _ in range(50):  # the sweeper may be in the middle of a sweep, holding the store for a moment
        gc.collect()
        if model() is None:
            break
        time.sleep(0.1)
    assert model() is None
    sweeper.join(10)  # it wakes every 0.5 s
    assert not sweeper.is_alive()


def test_model_service_reports_an_unreadable_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"not a checkpoint")
    status = ModelService(AppOptions(model_path=path, trained_model_path=tmp_path / "tuned.pt", device="cpu")).status()
    assert not status.trained and "Loading it failed: model.pt is not" in status.warning
    assert str(tmp_path) not in status.warning


# -- interaction ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def session_store():
    torch.manual_seed(0)
    return raps3d.SessionStore(raps3d.Engine(raps3d.modeling.build_model("lite")), 2, 8, 3600)


def _volume():
    rng = np.random.default_rng(3)
    return rng.integers(-200, 300, size=(24, 48, 56)).astype(np.int16)


def test_edit_repeat_undo_and_new_object(session_store):
    size = (56, 48, 24)
    image = session_store.image("vol", lambda: (_volume(), (3.0, 1.0, 1.0)))
    key = ("client", "vol", "liver")
    first = interaction.apply_prompts(session_store, key, image, parse_prompts({"foreground": [[20, 20, 12]]}, size))
    assert first.mode == "new_object"
    two = parse_prompts({"foreground": [[20, 20, 12]], "background": [[22, 21, 12]]}, size)
    assert interaction.apply_prompts(session_store, key, image, two).mode == "edit"
    assert interaction.apply_prompts(session_store, key, image, two).mode == "repeat"
    # Foreground and background lists lose the click order: any order of the same prompts is the same set.
    three = parse_prompts({"foreground": [[20, 20, 12], [18, 19, 12]], "background": [[22, 21, 12]]}, size)
    assert interaction.apply_prompts(session_store, key, image, three).mode == "edit"
    back = interaction.apply_prompts(session_store, key, image, two)
    assert back.mode == "undo"
    other = parse_prompts({"foreground": [[30, 30, 10]]}, size)
    assert interaction.apply_prompts(session_store, key, image, other).mode == "new_object"


def test_a_rejected_first_prompt_leaves_no_session(session_store):
    image = session_store.image("vol", lambda: (_volume(), (3.0, 1.0, 1.0)))
    key = ("client", "vol", "spleen")
    with pytest.raises(raps3d.PromptError):
        interaction.apply_prompts(session_store, key, image, parse_prompts({"background": [[5, 5, 5]]},
                                                                           (56, 48, 24)))
    assert session_store.find_object(key) is None


def _fail_at_call(monkeypatch, n: int) -> list:
    """Makes the ``n``-th ``InteractiveObject.interact`` call from now on fail (as out of memory would)."""
    interact, calls = raps3d.InteractiveObject.interact, []

    def failing(self, points=(), box=None):
        calls.append(points)
        if len(calls) == n:
            raise RuntimeError("out of memory")
        return interact(self, points, box)

    monkeypatch.setattr(raps3d.InteractiveObject, "interact", failing)
    return calls


def test_a_new_object_that_fails_halfway_leaves_the_session_it_would_replace(session_store, monkeypatch):
    image = session_store.image("vol", lambda: (_volume(), (3.0, 1.0, 1.0)))
    key, size = ("client", "vol", "aorta"), (56, 48, 24)
    first = interaction.apply_prompts(session_store, key, image, parse_prompts({"foreground": [[20, 20, 12]]}, size))
    obj = session_store.find_object(key)
    _fail_at_call(monkeypatch, 2)
    other = parse_prompts({"foreground": [[30, 30, 12], [31, 29, 12], [29, 31, 12]]}, size)  # another first click
    with pytest.raises(RuntimeError):
        interaction.apply_prompts(session_store, key, image, other)
    assert session_store.find_object(key) is obj and obj.result is first.result
    assert obj.previous_prompts == raps3d.Prompts()  # its undo history is intact too


def test_an_edit_that_fails_halfway_is_undone_whole(session_store, monkeypatch):
    image = session_store.image("vol", lambda: (_volume(), (3.0, 1.0, 1.0)))
    key, size = ("client", "vol", "aorta"), (56, 48, 24)
    clicks = [[20, 20, 12], [18, 19, 12], [22, 22, 12], [21, 18, 12]]
    first = interaction.apply_prompts(session_store, key, image, parse_prompts({"foreground": clicks[:1]}, size))
    obj = session_store.find_object(key)
    calls = _fail_at_call(monkeypatch, 3)
    with pytest.raises(RuntimeError):
        interaction.apply_prompts(session_store, key, image, parse_prompts({"foreground": clicks}, size))
    assert len(calls) == 3  # two clicks were added, one step each, before the third failed
    assert session_store.find_object(key) is obj and obj.prompts == first.prompts
    np.testing.assert_array_equal(obj.result.full_mask(), first.result.full_mask())
    monkeypatch.undo()
    again = interaction.apply_prompts(session_store, key, image, parse_prompts({"foreground": clicks}, size))
    assert again.mode == "edit" and again.prompts.points == tuple(parse_prompts({"foreground": clicks}, size).points)


def test_a_request_that_comes_while_the_object_is_built_waits_and_edits_it(session_store, monkeypatch):
    import threading
    import time

    image = session_store.image("vol", lambda: (_volume(), (3.0, 1.0, 1.0)))
    key, size = ("client", "vol", "aorta"), (56, 48, 24)
    clicks = [[20, 20, 12], [18, 19, 12]]
    interact, started = raps3d.InteractiveObject.interact, threading.Event()

    def slow(self, points=(), box=None):
        started.set()
        time.sleep(0.3)
        return interact(self, points, box)

    monkeypatch.setattr(raps3d.InteractiveObject, "interact", slow)
    outcomes = {}
    first = threading.Thread(target=lambda: outcomes.__setitem__("first", interaction.apply_prompts(
        session_store, key, image, parse_prompts({"foreground": clicks[:1]}, size))))
    first.start()
    assert started.wait(30)  # the first request is building the object
    second = interaction.apply_prompts(session_store, key, image, parse_prompts({"foreground": clicks}, size))
    first.join(30)
    assert outcomes["first"].mode == "new_object" and second.mode == "edit"
    assert session_store.find_object(key).prompts.points == second.prompts.points and len(second.prompts.points) == 2


def test_a_failed_edit_leaves_a_full_undo_history_whole(session_store, monkeypatch):
    image = session_store.image("vol", lambda: (_volume(), (3.0, 1.0, 1.0)))
    key, size = ("client", "vol", "full-history"), (56, 48, 24)
    clicks = [[20 + i % 5, 20 + i % 7, 12] for i in range(raps3d.predictor.UNDO_STEPS + 2)]
    interaction.apply_prompts(session_store, key, image, parse_prompts({"foreground": clicks}, size))
    obj = session_store.find_object(key)
    before = (obj.prompts, obj.previous_prompts, len(obj._history))
    _fail_at_call(monkeypatch, 2)
    more = clicks + [[30, 30, 12], [31, 31, 12]]
    with pytest.raises(RuntimeError):
        interaction.apply_prompts(session_store, key, image, parse_prompts({"foreground": more}, size))
    assert (obj.prompts, obj.previous_prompts, len(obj._history)) == before


# -- automatic click ---------------------------------------------------------------------------------------------------
def test_soft_tissue_seed_lands_in_the_brightest_soft_tissue():
    volume = np.full((40, 80, 80), -1000, np.int16)
    volume[10:30, 10:70, 10:70] = 30  # soft tissue
    volume[15:25, 40:60, 45:65] = 180  # an enhancing organ
    z, y, x = soft_tissue_seed(volume, (3.0, 1.0, 1.0))
    assert 15 <= z < 25 and 40 <= y < 60 and 45 <= x < 65
    assert soft_tissue_seed(np.full((10, 10, 10), -1000, np.int16), (1, 1, 1)) == (5, 5, 5)


def test_training_options_are_checked_and_typed():
    from lib.trainers.raps3d import training_options

    defaults = {"steps": 200, "batch_size": 4, "lr": 5e-5, "val_split": 0.2, "seed": 0, "publish": "if_better",
                "freeze_image_encoder": True}
    cfg = training_options({"steps": "30", "lr": "1e-4", "publish": "never", "model": "raps3d"}, defaults)
    assert cfg == {"steps": 30, "batch_size": 4, "lr": 1e-4, "val_split": 0.2, "seed": 0, "publish": "never",
                   "freeze_image_encoder": True}
    assert type(cfg["steps"]) is int and type(cfg["lr"]) is float
    for raw, value in [(False, False), ("false", False), (" True ", True), ("FALSE", False), (1, True), ("no", False)]:
        assert training_options({"freeze_image_encoder": raw}, defaults)["freeze_image_encoder"] is value
    for request, message in [({"lr": "fast"}, "lr must be a number, got 'fast'"),
                             ({"steps": 2.5}, "steps must be a whole number, got 2.5"),
                             ({"steps": 0}, "steps must be from 1 to 100000, got 0"),
                             ({"steps": 1e12}, "steps must be from 1 to 100000, got 1000000000000.0"),
                             ({"batch_size": 512}, "batch_size must be from 1 to 64, got 512"),
                             ({"batch_size": True}, "batch_size must be a whole number, got True"),
                             ({"lr": float("nan")}, "lr must be a number, got nan"),
                             ({"val_split": 1}, "val_split must be from 0.0 to 0.9, got 1"),
                             ({"seed": "inf"}, "seed must be a whole number, got 'inf'"),
                             ({"seed": 2**63}, f"seed must be from 0 to {2**31 - 1}, got {2**63}"),
                             ({"steps": 10**400}, f"steps must be a whole number, got {10**400}"),
                             ({"publish": "yes"}, "publish must be 'if_better', 'always' or 'never', got 'yes'"),
                             ({"freeze_image_encoder": 2}, "freeze_image_encoder must be true or false, got 2"),
                             ({"freeze_image_encoder": "maybe"},
                              "freeze_image_encoder must be true or false, got 'maybe'")]:
        with pytest.raises(ValueError) as e:
            training_options(request, defaults)
        assert str(e.value) == message


def test_the_validation_split_keeps_each_image_on_its_side_as_images_are_added():
    from raps3d.training.data import Case
    from lib.trainers.raps3d import split_by_image

    def cases(n):
        return [Case(f"image_{i:03d}", "datastore", np.zeros((2, 2, 2)), (1, 1, 1)) for i in range(n)]

    seen_in_training = set()
    for n in range(2, 60):
        train, val = split_by_image(cases(n), 0.2, seed=0)
        names_train, names_val = {c.name for c in train}, {c.name for c in val}
        assert names_train and names_val and not names_train & names_val and len(train) + len(val) == n
        if n > 20:  # past the smallest sets (where one side is filled from the other), sides are fixed
            assert not names_val & seen_in_training
            seen_in_training |= names_train
    assert 0.1 < len(val) / 59 < 0.3
    assert {c.name for c in split_by_image(cases(40), 0.2, seed=1)[1]} != \
        {c.name for c in split_by_image(cases(40), 0.2, seed=0)[1]}
    one = cases(1)
    assert split_by_image(one, 0.2, 0) == (one, one)
    train, val = split_by_image(cases(2), 0.9, 0)  # would be all validation: one image is left to train on
    assert len(train) == 1 and len(val) == 1


def test_training_scores_a_model_at_its_own_mask_threshold_and_stats_stay_json(tmp_path):
    import json

    from raps3d.training.sampling import Sample
    from lib.trainers.raps3d import _alive, _write_json, served_dice, training_devices

    target = np.zeros((4, 8, 8), bool)
    target[1:3, 2:6, 2:6] = True
    sample = Sample(np.zeros((4, 8, 8), np.float32), target, np.zeros((1, 3), np.float32), np.ones(1, np.int64),
                    False)

    class ExactMask(torch.nn.Module):  # logit +1 on the target, -1 elsewhere
        def __init__(self, threshold):
            super().__init__()
            self.register_buffer("mask_threshold", torch.tensor(threshold))
            self.scale = torch.nn.Parameter(torch.ones(()))

        def encode(self, image):
            return image

        def decode(self, feats, coords, labels, mask_prompt, multimask):
            return torch.from_numpy(target)[None, None].float() * 2 - 1, torch.ones(1, 1)

    assert served_dice(ExactMask(0.0), [sample]) == 1.0
    assert served_dice(ExactMask(1.5), [sample]) == 0.0  # nothing above the served threshold
    assert served_dice(ExactMask(-2.0), [sample]) == pytest.approx(2 * 32 / (32 + 256))

    assert training_devices("cpu") == ("cpu", 0)
    if not torch.cuda.is_available():
        assert training_devices("auto") == ("cpu", 0)

    path = tmp_path / "stats.json"  # served in /info, where NaN is not JSON
    _write_json(path, {"loss": float("nan"), "val_dice": float("inf"), "steps": [1.0, float("-inf")]})
    assert json.loads(path.read_text()) == {"loss": None, "val_dice": None, "steps": [1.0, None]}

    from lib.trainers.raps3d import _process_start

    host, started = __import__("socket").gethostname(), _process_start(os.getpid())
    assert _alive(os.getpid(), host, started) and _alive(os.getpid(), host)  # (stats written before the check)
    assert not _alive(os.getpid(), host, started - 100)  # the pid now belongs to a later process


def test_the_train_task_keeps_each_label_as_its_bounding_box_and_wide_images_as_int16(tmp_path):
    from monailabel.datastore.local import LocalDatastore

    from lib.trainers.raps3d import Raps3DTrain

    studies = tmp_path / "studies"
    studies.mkdir()
    volume = np.full((40, 96, 96), -1000, np.int32)  # stored as 32-bit, as some exports are
    volume[5:35, 20:80, 20:80] = 40
    label = np.zeros(volume.shape, np.uint8)
    label[10:20, 30:50, 30:40] = 1
    label[25:30, 60:70, 60:75] = 4
    label[0, 0, 0] = 7  # one voxel: too small to train on
    for array, path in ((volume, studies / "ct_01.nii.gz"), (label, tmp_path / "ct_01_label.nii.gz")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.8, 0.8, 2.5))
        sitk.WriteImage(image, str(path))
    # A second image whose label marks nothing: counted as labelled by the datastore, so listed as skipped.
    sitk.WriteImage(sitk.ReadImage(str(studies / "ct_01.nii.gz")), str(studies / "ct_02.nii.gz"))
    empty = sitk.GetImageFromArray(np.zeros(volume.shape, np.uint8))
    empty.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(empty, str(tmp_path / "ct_02_label.nii.gz"))
    datastore = LocalDatastore(str(studies))
    datastore.save_label("ct_01", str(tmp_path / "ct_01_label.nii.gz"), "final", {})
    datastore.save_label("ct_02", str(tmp_path / "ct_02_label.nii.gz"), "final", {})
    task = Raps3DTrain(AppOptions(model_path=tmp_path / "absent.pt", trained_model_path=tmp_path / "tuned.pt",
                                  device="cpu"))

    (case,), skipped = task._cases(datastore)

    assert skipped == {"ct_02": "its label holds no structure of at least 20 voxels"}
    assert case.name == "ct_01" and case.spacing == pytest.approx((2.5, 0.8, 0.8))
    assert case.volume.dtype == np.int16  # air clipped to below the widest training window, the rest as it was
    # In the model's orientation, as inference sees the image: the file's slices run from feet to head, reversed.
    assert np.array_equal(case.volume, np.clip(volume, -606, None)[::-1]) and case.volume.min() == -606
    assert sorted(case.structures) == ["label_1", "label_4"]
    assert case.structures["label_1"].crop.shape == (10, 20, 10)
    assert case.structures["label_4"].crop.shape == (5, 10, 15)
    for value in (1, 4):
        assert np.array_equal(case.structures[f"label_{value}"].full(), label[::-1] == value)


def _small_datastore(folder, labelled: bool = True):
    """A local datastore of one small CT, with a 'final' label unless told otherwise."""
    from monailabel.datastore.local import LocalDatastore

    studies = folder / "studies"
    studies.mkdir()
    volume = np.full((24, 48, 48), -1000, np.int16)
    volume[4:20, 10:40, 10:40] = 40
    label = np.zeros(volume.shape, np.uint8)
    label[8:16, 16:32, 16:30] = 1
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(studies / "ct_01.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(label), str(folder / "label.nii.gz"))
    datastore = LocalDatastore(str(studies))
    if labelled:
        datastore.save_label("ct_01", str(folder / "label.nii.gz"), "final", {})
    return datastore


def _small_train_task(folder):
    import lib.trainers.raps3d as trainer

    return trainer.Raps3DTrain(AppOptions(model_path=folder / "absent.pt", device="cpu", torch_threads=2,
                                          trained_model_path=folder / "model" / "tuned.pt"))


def test_a_run_that_diverges_publishes_nothing_and_says_so(tmp_path, monkeypatch):
    import json

    import torch

    import lib.trainers.raps3d as trainer

    datastore, task = _small_datastore(tmp_path), _small_train_task(tmp_path)
    fit = trainer._fit

    def fit_that_diverges(*args):
        fit(*args)
        model, meta = trainer.load_model(task._scratch)
        with torch.no_grad():
            next(model.mask_decoder.parameters()).fill_(float("nan"))
        trainer.save_model(model, task._scratch, meta, half=False)

    monkeypatch.setattr(trainer, "_fit", fit_that_diverges)
    with pytest.raises(ValueError, match=r"training diverged \(weights or validation Dice not finite\)"):
        task({"steps": 1, "batch_size": 1, "publish": "always"}, datastore)
    stats = json.loads(task.stats_path.read_text())
    assert stats["status"] == "FAILED" and "training diverged" in stats["error"]
    assert stats["message"] == "training failed; the served model is unchanged"
    assert not task.publish_path.exists() and not task._scratch.exists()


def test_a_run_waits_for_no_other_process_holding_its_files(tmp_path):
    """A run that outlived a restarted server still writes the stats, candidate and model: a second run refuses to
    start, and writes nothing over the first one's record."""
    import fcntl
    import json

    datastore, task = _small_datastore(tmp_path), _small_train_task(tmp_path)
    task.stats_path.parent.mkdir(parents=True)
    task.stats_path.write_text(json.dumps({"status": "RUNNING", "pid": 1}))
    assert not task.run_in_progress()
    held = os.open(task._lock_path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the other process's run holds it
        assert task.run_in_progress()
        with pytest.raises(RuntimeError, match=r"another training run still holds \.tuned\.train\.lock"):
            task({"steps": 1, "batch_size": 1}, datastore)
        assert json.loads(task.stats_path.read_text()) == {"status": "RUNNING", "pid": 1}
    finally:
        os.close(held)
    assert not task.run_in_progress()


def test_a_run_whose_server_stopped_stops_and_says_so(tmp_path, monkeypatch):
    """MONAI Label starts a run as its child; killed, the server leaves it training alone, its reports going nowhere."""
    import json
    import subprocess
    import sys

    import lib.trainers.raps3d as trainer

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    datastore, task = _small_datastore(tmp_path), _small_train_task(tmp_path)
    monkeypatch.setattr(trainer.os, "getppid", lambda: gone.pid)
    with pytest.raises(trainer.ServerStopped, match="the server that started this training run stopped"):
        task({"steps": 2, "batch_size": 1, "publish": "always"}, datastore)
    stats = json.loads(task.stats_path.read_text())
    assert stats["status"] == "STOPPED" and stats["epoch"] == 0, stats
    assert stats["message"] == "training stopped: the server that started it stopped; the served model is unchanged"
    assert not task.publish_path.exists() and not task._scratch.exists()


def test_a_run_without_labels_says_so(tmp_path):
    import json

    datastore, task = _small_datastore(tmp_path, labelled=False), _small_train_task(tmp_path)
    with pytest.raises(ValueError, match="no image has a saved 'final' label to train on"):
        task({"steps": 1, "batch_size": 1}, datastore)
    assert json.loads(task.stats_path.read_text())["status"] == "FAILED" and not task.publish_path.exists()
    empty = tmp_path / "empty.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((24, 48, 48), np.uint8)), str(empty))
    datastore.save_label("ct_01", str(empty), "final", {})
    with pytest.raises(ValueError, match=r"^none of the images with a saved 'final' label can be trained on "
                                         r"\(skipped: \{'ct_01': 'its label holds no structure of at least 20 "):
        task({"steps": 1, "batch_size": 1}, datastore)
    assert json.loads(task.stats_path.read_text())["status"] == "FAILED" and not task.publish_path.exists()


def test_a_run_that_fills_the_disk_still_records_why_it_failed(tmp_path, monkeypatch):
    import errno
    import json

    import lib.trainers.raps3d as trainer

    datastore, task = _small_datastore(tmp_path), _small_train_task(tmp_path)
    save_model, write_json = trainer.save_model, trainer._write_json

    def publish_on_a_full_disk(model, path, *args, **kwargs):
        if path == task.publish_path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_model(model, path, *args, **kwargs)

    def write_while_there_is_room(path, stats):  # the candidate file takes the last room on the disk
        if task._scratch.exists() and stats.get("status") == "FAILED":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_json(path, stats)

    monkeypatch.setattr(trainer, "save_model", publish_on_a_full_disk)
    monkeypatch.setattr(trainer, "_write_json", write_while_there_is_room)
    with pytest.raises(OSError, match="No space left on device"):
        task({"steps": 1, "batch_size": 1, "publish": "always"}, datastore)
    stats = json.loads(task.stats_path.read_text())
    assert stats["status"] == "FAILED" and "No space left on device" in stats["error"]
    assert not task._scratch.exists() and not task.publish_path.exists()


def test_the_train_task_says_when_it_cannot_write_its_model_folder(tmp_path, monkeypatch):
    from lib.trainers.raps3d import Raps3DTrain

    (tmp_path / "a_file").write_text("not a folder")
    task = Raps3DTrain(AppOptions(model_path=tmp_path / "absent.pt", device="cpu",
                                  trained_model_path=tmp_path / "a_file" / "model" / "tuned.pt"))
    with pytest.raises(OSError, match=r"^the train task cannot write the folder of trained_model_path \('model'\): "
                                      r"Not a directory"):
        task.check_can_publish()
    fine = Raps3DTrain(AppOptions(model_path=tmp_path / "absent.pt", device="cpu",
                                  trained_model_path=tmp_path / "model" / "tuned.pt"))
    fine.check_can_publish()
    assert (tmp_path / "model").is_dir() and not list((tmp_path / "model").iterdir())
    from collections import namedtuple

    # A full disk: an empty test file can still be made there, but no checkpoint.
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    with pytest.raises(OSError, match=r"\('model'\) has 1 MiB free; a training run needs about 256 MiB there"):
        fine.check_can_publish()


def test_info_shows_the_run_monai_label_launched_until_its_process_reports(tmp_path, monkeypatch):
    import datetime
    import json
    import socket

    from monailabel.utils.async_tasks import utils as async_tasks

    from lib.trainers.raps3d import Raps3DTrain, _process_start

    task = Raps3DTrain(AppOptions(model_path=tmp_path / "absent.pt", device="cpu",
                                  trained_model_path=tmp_path / "model" / "tuned.pt"))
    task.stats_path.parent.mkdir()
    earlier = {"name": "raps3d", "status": "FINISHED", "start_ts": 1000.0, "published": True, "message": "published"}
    task.stats_path.write_text(json.dumps(earlier))
    now = datetime.datetime.today().strftime("%Y-%m-%d %H:%M:%S")
    runs = []
    monkeypatch.setitem(async_tasks.background_tasks, "train", runs)
    assert task.stats() == earlier  # nothing launched since
    runs.append({"id": "1", "status": "SUBMITTED", "start_ts": now})
    assert task.stats()["status"] == "RUNNING" and task.stats()["message"] == "starting"
    runs[-1]["status"] = "ERROR"  # it ended before its process wrote anything
    assert task.stats()["status"] == "FAILED" and "ended before it reported" in task.stats()["message"]
    runs[-1]["status"] = "DONE"
    assert task.stats() == earlier
    # A run that is going (its process alive) is shown even while another one waits in MONAI Label's queue.
    going = {"name": "raps3d", "status": "RUNNING", "start_ts": 1000.0, "pid": os.getpid(),
             "host": socket.gethostname(), "process_start": _process_start(os.getpid()), "epoch": 120}
    task.stats_path.write_text(json.dumps(going))
    runs.append({"id": "2", "status": "SUBMITTED", "start_ts": now})
    assert task.stats() == going


def test_a_publication_keeps_the_model_it_replaces_only_when_that_one_loads(tmp_path):
    from lib.trainers.raps3d import keep_previous, previous_path

    served = tmp_path / "tuned.pt"
    keep_previous(served)  # nothing served yet: nothing kept
    assert not previous_path(served).exists()
    raps3d.save_model(raps3d.modeling.build_model("lite"), served)
    keep_previous(served)
    kept = previous_path(served).read_bytes()
    assert previous_path(served).name == "tuned.previous.pt" and kept == served.read_bytes()
    served.write_bytes(served.read_bytes()[:5000])  # the served file broken: the good previous one stays
    keep_previous(served)
    assert previous_path(served).read_bytes() == kept
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_a_ct_clipped_to_a_window_that_starts_at_zero_gets_the_window_advice(tmp_path):
    # A brain window (0 to 80 HU): air and fat clipped to 0, bone to 80; an MR's zero background has no such top.
    path = str(tmp_path / "post_from_mitk.nii.gz")
    ct = np.full((8, 32, 32), -1000, np.int16)
    ct[:, 4:28, 4:28] = 35  # brain
    ct[:, 4:28, 4:6] = 900  # skull
    sitk.WriteImage(sitk.GetImageFromArray(np.clip(ct, 0, 80)), path)
    with pytest.raises(ImageReadError, match="as in a CT clipped to a display window"):
        read_image(path)
