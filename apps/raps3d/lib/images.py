"""Opening CT images: voxels in the library's (z, y, x) order plus the geometry needed to write labels back.

Images are read with SimpleITK, the same ITK reader MONAI's LoadImage uses, so voxel ``[i, j, k]`` of a viewer is
``volume[k, j, i]`` here, and the geometry (LPS spacing, origin, direction) is what viewers read from the image.
SimpleITK's array is already (k, j, i) = (z, y, x) and C-contiguous: no transpose or copy is needed afterwards.
``read_for_model`` then reorders and reverses axes, into a copy, to give the model's orientation
(``raps3d.orientation``); what the model sees is then no longer ``volume[k, j, i]``.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from raps3d.orientation import Reorientation

from .dicom_series import (SeriesError, check_series, dicom_file_headers, functional_group_rescale, series_headers,
                           source_series_folder, stacking_order, stored_value_range)
from .nifti_transforms import transform_disagreement_mm


class ImageReadError(ValueError):
    """The file cannot be read as a single-channel 3D CT image (corrupt, not an image, 2D, RGB, not CT, ...)."""


# Largest image opened: 512 x 512 x 2048 voxels (a 1 GiB int16 volume). A file's header says how large it is; without
# a limit, a small upload declaring a huge size would make the server allocate gigabytes.
MAX_VOXELS = 512 * 512 * 2048
# Header keys that name a separate data file (NRRD, MetaImage): such a header could read any file of the server.
# Headers are read up to their end, which must come within HEADER_LIMIT bytes.
HEADER_LIMIT = 1 << 20
_DETACHED_DATA = re.compile(rb"^\s*(data ?file|ElementDataFile)\s*[:=]\s*(.*?)\s*$", re.IGNORECASE | re.MULTILINE)

# A label map numbers its structures 1, 2, ...; more values than this is not an annotation (an image saved as a label,
# say: thousands of HU values).
MAX_LABEL_VALUES = 1000

# Every CT of the body holds air or lung (-1000 to -700 HU) somewhere; an image whose lowest value is above this is
# not in Hounsfield units (MR, PET, a normalised or shifted CT), and the model's intensity window would misread it.
LOWEST_HU_AT_MOST = -250.0
# Air outside the body fills a large share of any body CT: when that many voxels sit at a negative lowest value above
# air, the image was clipped (to a viewer's display window) rather than not being CT.
CLIPPED_SHARE = 0.05
# A window starting at 0 or above (a brain window, 0 to 80 HU) is told from a zero background by its top: bone is
# clipped to it, where an MR or a raw CT has few voxels at exactly its highest value.
CLIPPED_TOP_SHARE = 0.005
# Largest deviation of the direction matrix from perpendicular axes (|D^T D - I|): about 0.06 degrees, half a voxel
# over 512 voxels; files written with rounded direction cosines stay well inside it.
SHEAR_TOLERANCE = 1e-3
# Voxel sizes (mm) a CT can have: a file outside this range has its length unit wrong (NIfTI's xyzt_units in metres
# gives voxels a thousand times too large, in micrometres a thousand times too small), and the model would see an
# image a thousand times too large or small.
SPACING_RANGE_MM = (0.01, 100.0)


@dataclass(frozen=True)
class Geometry:
    """ITK image geometry, axes in (i, j, k) order; ``direction`` is the row-major 3x3 matrix whose columns are the
    axis directions in LPS."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return self.size[::-1]

    @property
    def orientation(self) -> Reorientation:
        """From the stored (z, y, x) array into the model's orientation."""
        return Reorientation.from_direction(self.direction)

    @property
    def model_spacing(self) -> tuple[float, float, float]:
        """Spacing (mm) along the model's (z, y, x) axes."""
        return self.orientation.spacing(self.spacing[::-1])

    @staticmethod
    def of(image: sitk.Image) -> "Geometry":
        return Geometry(tuple(int(n) for n in image.GetSize()), tuple(float(s) for s in image.GetSpacing()),
                        tuple(float(o) for o in image.GetOrigin()), tuple(float(d) for d in image.GetDirection()))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def image_key(path: str, by_content: bool = False) -> tuple:
    """Identity of an image file (or DICOM folder) as it is now: a changed file gets a new key, so cached voxels
    and sessions of its previous content are never reused. The change time is part of it: copies that keep the
    modification time (``cp -p``, ``rsync -a``) still change it.

    ``by_content``: a file a request uploads (MITK sends the image with every click) is written by MONAI Label to a new
    temporary file each time: it is known by its content, so that the next click on the same image finds its session
    and the image already open, instead of opening one more copy and pushing other annotators' images out of the
    cache."""
    real = os.path.realpath(path)
    if by_content and os.path.isfile(real):
        digest = hashlib.sha1()
        with open(real, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return "upload", digest.hexdigest(), os.path.getsize(real)
    if os.path.isdir(real):
        entries = sorted((e.name, _stamp(e.stat())) for e in os.scandir(real) if e.is_file())
        return real, hashlib.sha1(repr(entries).encode()).hexdigest(), len(entries)  # the same in every process
    return real, _stamp(os.stat(real))


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _itk_reason(error: RuntimeError, path: str) -> str:
    """The last line of ITK's message (what it could not parse), without the server's folders."""
    text = str(error).strip()
    line = text.splitlines()[-1] if text else "unknown error"
    return line.replace(os.path.realpath(path), os.path.basename(path)).replace(path, os.path.basename(path))


def _read_sitk(path: str, header_only: bool = False, series_uid: str | None = None, keep: list | None = None):
    """``keep``: for a folder, the files of the series to read, in stacking order (others are left out), where
    they are not all the files the reader lists (a duplicate left out)."""
    if os.path.isdir(path):
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(path)
        if not series:
            raise ImageReadError(f"the folder {os.path.basename(path)!r} holds no DICOM series")
        if series_uid not in series:
            # Callers pass the series whose headers they checked (``series_headers``); without one: the series
            # with the most files, of equally large ones the first by UID.
            series_uid = max(sorted(series), key=lambda s: len(reader.GetGDCMSeriesFileNames(path, s)))
        files = reader.GetGDCMSeriesFileNames(path, series_uid)
        if keep is not None and {os.path.realpath(f) for f in files} != {os.path.realpath(f) for f in keep}:
            files = keep  # the reader's list holds a duplicate, and its order is then by file name
        if len(files) == 1:  # one multi-frame file: read as a volume (the series reader would add a 4th axis)
            return sitk.ReadImage(files[0])
        reader.SetFileNames(files)
        return reader.Execute()
    if header_only:
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        return reader
    return sitk.ReadImage(path)


def _check(dimension: int, components: int, pixel_type: str, size) -> None:
    if components != 1:
        raise ImageReadError(f"the image has {components} values per voxel ({pixel_type}, e.g. RGB); "
                             "Raps-3D segments single-channel CT volumes")
    if dimension != 3:
        raise ImageReadError(f"the image is {dimension}D (size {list(size)}); Raps-3D segments 3D CT volumes")


def check_header(path: str, what: str = "an image") -> None:
    """Refuses, from the header before any voxel is read, an image larger than MAX_VOXELS, a header whose data file
    lies elsewhere than beside it (an absolute path or one leading up: ``data file: /dev/zero``), voxels of a size no
    CT has (a NIfTI file's length unit wrong) and a NIfTI file whose two transforms place it differently. ``what``
    the file should be, for messages."""
    if os.path.isdir(path):
        return  # a DICOM series: as large as its files
    if path.lower().endswith((".nrrd", ".nhdr", ".mhd", ".mha")):
        with open(path, "rb") as f:
            raw = f.read(HEADER_LIMIT + 1)
        # ITK's readers end a line at LF, CRLF or a lone CR: all read here as LF, or a key on a line of its own
        # would escape the check below.
        head = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        nrrd = path.lower().endswith((".nrrd", ".nhdr"))
        ended = b"\n\n" in head if nrrd else b"ElementDataFile" in head  # NRRD: a blank line; MetaImage: its last key
        if not ended and len(raw) > HEADER_LIMIT:
            raise ImageReadError(f"{os.path.basename(path)!r} has a header longer than {HEADER_LIMIT // 1024} KiB")
        if nrrd:
            head = head.split(b"\n\n", 1)[0]
        for match in _DETACHED_DATA.finditer(head):
            target = match.group(2).decode(errors="replace")
            listed = target.upper().startswith("LIST")  # file names follow the header: not checked, refused
            if listed or (target.upper() != "LOCAL" and (os.path.isabs(target)
                                                         or ".." in target.replace("\\", "/").split("/"))):
                raise ImageReadError(f"{os.path.basename(path)!r} names a data file outside its folder "
                                     f"({target[:80]!r}); send the image with its data")
    geometry = read_geometry(path, what)
    size, name = geometry.size, os.path.basename(path)
    voxels = int(np.prod(size, dtype=np.int64))
    if voxels > MAX_VOXELS:
        raise ImageReadError(f"{name!r} is {' x '.join(map(str, size))} = {voxels:,} voxels, more "
                             f"than the {MAX_VOXELS:,} this server opens (512 x 512 x 2048)")
    if not all(SPACING_RANGE_MM[0] <= s <= SPACING_RANGE_MM[1] for s in geometry.spacing[:3]):  # not time
        spacing = " x ".join(f"{s:g}" for s in geometry.spacing[:3])
        raise ImageReadError(f"{name!r} has voxels of {spacing} mm, outside the {SPACING_RANGE_MM[0]:g}-"
                             f"{SPACING_RANGE_MM[1]:g} mm of any CT: its length unit is likely wrong (as in a NIfTI "
                             "file whose xyzt_units say metres or micrometres where it means millimetres)")
    disagreement = transform_disagreement_mm(path)
    if disagreement is not None and disagreement[0] > 0.5 * disagreement[1]:
        raise ImageReadError(f"{name!r} holds two transforms (NIfTI qform and sform) that place it up to "
                             f"{disagreement[0]:.1f} mm apart, so viewers disagree on where it lies (each reader "
                             "chooses one by its own rule): write it with one transform, or with the two equal")


def read_image(path: str) -> tuple[np.ndarray, Geometry]:
    """Voxels (z, y, x) in the file's own data type, and the image geometry. An image from a DICOM series that would
    be a distorted volume (gantry tilt, uneven slice gaps) is refused; an enhanced CT file's rescale that only its
    functional groups hold is applied. What its header alone shows (``check_header``: too large, a data file
    elsewhere, voxel sizes no CT has, NIfTI transforms that disagree) is refused before any voxel is read."""
    check_header(path)
    folder = source_series_folder(path)
    series_uid = None
    try:
        # A series folder (or the one the DICOMweb cache keeps beside a converted file), or one DICOM file.
        headers = series_headers(folder) if folder is not None else dicom_file_headers(path)
        check_series(headers)
        rescale = functional_group_rescale(headers)
    except SeriesError as e:
        raise ImageReadError(str(e)) from None
    keep = None
    if folder is not None and headers:
        series_uid = str(headers[0].get("SeriesInstanceUID", ""))
        if os.path.isdir(path):
            keep = stacking_order(headers)  # the files checked (a duplicate left out), as the reader stacks them
    try:
        image = _read_sitk(path, series_uid=series_uid, keep=keep)
    except ImageReadError:
        raise
    except RuntimeError as e:
        raise ImageReadError(f"cannot read {os.path.basename(path)!r} as an image: {_itk_reason(e, path)}") from None
    _check(image.GetDimension(), image.GetNumberOfComponentsPerPixel(), image.GetPixelIDTypeAsString(),
           image.GetSize())
    if "complex" in image.GetPixelIDTypeAsString():
        raise ImageReadError(f"unsupported pixel type {image.GetPixelIDTypeAsString()}")
    _check_perpendicular(image.GetDirection(), os.path.basename(path))
    volume = sitk.GetArrayFromImage(image)
    if rescale is not None and volume.size and not _reader_rescaled(volume, *rescale, headers[0]):
        volume = _apply_rescale(volume, *rescale)
    _check_hounsfield(volume, os.path.basename(path))
    return volume, Geometry.of(image)


def read_for_model(path: str) -> tuple[np.ndarray, Geometry, Reorientation]:
    """``read_image``, with the voxels in the model's anatomical orientation (``raps3d.orientation``; their spacing
    is ``geometry.model_spacing``), and the reorientation, which maps prompts from the file's voxel order and masks
    back to it."""
    volume, geometry = read_image(path)
    orientation = geometry.orientation
    return orientation.volume(volume), geometry, orientation


def _reader_rescaled(volume: np.ndarray, slope: float, intercept: float, header) -> bool:
    """Whether the reader already applied a multi-frame file's functional-group rescale (it does for some transfer
    syntaxes, not for others): told from the file's stored values where they can be read, else from whether the
    values already hold air."""
    low, high = float(volume.min()), float(volume.max())
    stored = stored_value_range(header)
    if stored is not None:
        if (low, high) == stored:
            return False
        rescaled = sorted(v * slope + intercept for v in stored)
        if max(abs(low - rescaled[0]), abs(high - rescaled[1])) <= abs(slope) / 2 + 1e-6:
            return True
    return low <= LOWEST_HU_AT_MOST


def _check_perpendicular(direction, name: str) -> None:
    """A sheared grid (axes not perpendicular: a gantry tilt kept in an NRRD's space directions) is refused: a NIfTI
    label would be written on a perpendicular grid, on other voxels."""
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if np.abs(matrix.T @ matrix - np.eye(3)).max() > SHEAR_TOLERANCE:
        raise ImageReadError(f"{name!r} has axes that are not perpendicular (a sheared grid, as from a gantry tilt): "
                             "resample it onto a perpendicular grid first")


def _apply_rescale(volume: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """``volume * slope + intercept``, as int16 where that holds the values exactly (CT's usual type), else float32."""
    values = volume.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    as_int = values.astype(np.int16)
    if slope == int(slope) and intercept == int(intercept) and np.array_equal(as_int, values):
        return as_int
    return values


def _check_hounsfield(volume: np.ndarray, name: str) -> None:
    if volume.size == 0 or min(volume.shape) < 2:
        return  # not a volume: the library says so
    lowest = float(volume.min())
    if np.isfinite(lowest) and lowest > LOWEST_HU_AT_MOST:
        reason = (f"{name!r} does not look like CT in Hounsfield units: its lowest value is {lowest:g}, where a CT "
                  f"has air or lung (below {LOWEST_HU_AT_MOST:g} HU). ")
        share = float(np.count_nonzero(volume == lowest)) / volume.size
        at_top = float(np.count_nonzero(volume == volume.max())) / volume.size
        if share >= CLIPPED_SHARE and (lowest < 0 or at_top >= CLIPPED_TOP_SHARE):
            # MITK uploads the image as its display window shows it: everything below the window's bottom set to it,
            # and everything above its top (bone) to that. A zero background alone (MR, a CT stored without its
            # rescale) is not a window's bottom.
            raise ImageReadError(reason + f"{share:.0%} of its voxels hold exactly that value, as in a CT clipped "
                                 "to a display window (MITK sends the image as its window shows it): send it "
                                 f"unclipped, or with a window that starts at or below {LOWEST_HU_AT_MOST:g} HU (a "
                                 "lung or bone window)")
        raise ImageReadError(reason + "Raps-3D segments CT; convert the image to HU (rescale slope and intercept) or "
                             "use a CT series")


def read_label_on_grid(path: str, geometry: Geometry) -> np.ndarray:
    """A label map (z, y, x) on the voxel grid of the image with ``geometry``: resampled (nearest neighbour, 0
    outside) where the file has its own grid, as a DICOM SEG read back does (it covers only the labelled slices).
    Refused by its header as an image is (``check_header``), and when labelled voxels lie outside the image."""
    check_header(path, "a label map")  # its name is the image's: say which file failed
    try:
        label = sitk.ReadImage(path)
    except RuntimeError as e:
        raise ImageReadError(f"cannot read the label {os.path.basename(path)!r}: {_itk_reason(e, path)}") from None
    if label.GetDimension() != 3 or label.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(f"the label {os.path.basename(path)!r} is not a 3D label map")
    if Geometry.of(label) != geometry:
        reference = geometry.apply_to(sitk.Image(list(geometry.size), label.GetPixelID()))
        resampled = sitk.Resample(label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                  label.GetPixelID())
        if sitk.GetArrayViewFromImage(label).any() and not sitk.GetArrayViewFromImage(resampled).any():
            raise ImageReadError(f"the label {os.path.basename(path)!r} lies outside its image")
        outside, labelled = _labelled_outside(label, reference)
        if outside:
            raise ImageReadError(f"{outside:,} of the {labelled:,} labelled voxels of the label "
                                 f"{os.path.basename(path)!r} lie outside its image: it was drawn on another grid, "
                                 "or its position was lost (save it on the image's own grid)")
        label = resampled
    array = sitk.GetArrayFromImage(label)
    check_label_values(array, os.path.basename(path))
    return array


def _labelled_outside(label: sitk.Image, image: sitk.Image) -> tuple[int, int]:
    """How many labelled voxels of ``label`` lie wholly outside the grid of ``image`` (nothing of them is within
    half an image voxel of its edge), of how many. Resampling onto the image drops those without a word; a label
    that lost its position (or belongs to another image) partly overlapping the image is the usual cause. Read slice
    by slice: no copy of the label is made."""
    array = sitk.GetArrayViewFromImage(label)  # (z, y, x)
    labelled = int(np.count_nonzero(array))
    if not labelled:
        return 0, 0
    to_image = _index_map(label, image)
    # The image spans -0.5 to size - 0.5 in its voxel indices; a label voxel reaches half its own extent along each
    # axis from its centre (a coarse voxel whose centre lies beyond the edge still covers the image's last voxels).
    half_extent = 0.5 * np.abs(to_image[:, :3]).sum(axis=1)
    low, high = -0.5 - half_extent, np.asarray(image.GetSize(), np.float64) - 0.5 + half_extent

    def outside(ijk: np.ndarray) -> np.ndarray:
        index = ijk @ to_image[:, :3].T + to_image[:, 3]
        return np.any((index <= low) | (index >= high), axis=1)

    slices, rows, columns = [], np.zeros(array.shape[1], bool), np.zeros(array.shape[2], bool)
    for k, plane in enumerate(array):  # the labelled box, in one pass
        if plane.any():
            slices.append(k)
            rows |= plane.any(axis=1)
            columns |= plane.any(axis=0)
    rows, columns = np.flatnonzero(rows), np.flatnonzero(columns)
    corners = np.array([(i, j, k) for i in (columns[0], columns[-1]) for j in (rows[0], rows[-1])
                        for k in (slices[0], slices[-1])], np.float64)
    if not outside(corners).any():
        return 0, labelled  # the image's box is convex: the labelled box inside it, every labelled voxel is
    count = 0
    for k in slices:
        j, i = np.nonzero(array[k])
        count += int(np.count_nonzero(outside(np.stack([i, j, np.full_like(i, k)], axis=1).astype(np.float64))))
    return count, labelled


def _index_map(source: sitk.Image, target: sitk.Image) -> np.ndarray:
    """The 3 x 4 affine map from voxel indices (i, j, k) of ``source`` to continuous voxel indices of ``target``."""
    def to_world(image):
        direction = np.asarray(image.GetDirection(), np.float64).reshape(3, 3)
        return direction * np.asarray(image.GetSpacing(), np.float64), np.asarray(image.GetOrigin(), np.float64)

    (m_source, o_source), (m_target, o_target) = to_world(source), to_world(target)
    inverse = np.linalg.inv(m_target)
    return np.concatenate([inverse @ m_source, (inverse @ (o_source - o_target))[:, None]], axis=1)


def check_label_values(label: np.ndarray, name: str) -> None:
    """ImageReadError unless ``label`` numbers its structures with whole numbers from 0, at most MAX_LABEL_VALUES of
    them (an image saved as a label has negative values, fractions or thousands of values)."""
    if label.size == 0:
        return
    low, high = label.min(), label.max()
    if low < 0:
        raise ImageReadError(f"the label {name!r} holds negative values (down to {low:g}): it looks like an image, "
                             "not a label map (0 for background, 1, 2, ... for structures)")
    if label.dtype.kind == "f" and (not np.isfinite(high) or
                                    not all(np.array_equal(plane, np.floor(plane)) for plane in label)):
        raise ImageReadError(f"the label {name!r} holds values that are not whole numbers: a label map numbers its "
                             "structures 1, 2, ...")
    if high > 65535:
        raise ImageReadError(f"the label {name!r} holds values up to {high:g}; a label map's are at most 65535")
    count = len(label_values(label) - {0})
    if count > MAX_LABEL_VALUES:
        raise ImageReadError(f"the label {name!r} holds {count} different structure values, more than the "
                             f"{MAX_LABEL_VALUES} a label map is taken to have: it looks like an image, not a label map")


def same_grid(a: Geometry, b: Geometry) -> bool:
    """The same voxel grid, to within the rounding of file formats (1e-4 mm, 1e-4 in the direction cosines)."""
    return a.size == b.size and all(np.allclose(x, y, rtol=0, atol=1e-4) for x, y in (
        (a.spacing, b.spacing), (a.origin, b.origin), (a.direction, b.direction)))


def label_values(label: np.ndarray) -> set[int]:
    """The values a label map holds (whole numbers from 0 up, as ``check_label_values`` makes sure), read slice by
    slice: no full-size copy."""
    if label.size == 0:
        return set()
    present = np.zeros(int(label.max()) + 1, dtype=bool)
    for plane in label.reshape(len(label), -1):
        present[plane.astype(np.int64)] = True
    return set(np.flatnonzero(present).tolist())


def read_geometry(path: str, what: str = "an image") -> Geometry:
    """The geometry alone (reads only the header of a file)."""
    try:
        series = series_headers(path) if os.path.isdir(path) else []
        info = _read_sitk(path, header_only=True,
                          series_uid=str(series[0].get("SeriesInstanceUID", "")) if series else None)
    except SeriesError as e:
        raise ImageReadError(str(e)) from None
    except RuntimeError as e:
        raise ImageReadError(f"cannot read {os.path.basename(path)!r} as {what}: {_itk_reason(e, path)}") from None
    if isinstance(info, sitk.Image):
        return Geometry.of(info)
    return Geometry(tuple(int(n) for n in info.GetSize()), tuple(float(s) for s in info.GetSpacing()),
                    tuple(float(o) for o in info.GetOrigin()), tuple(float(d) for d in info.GetDirection()))


class GeometryCache:
    """Geometry of recently opened images, by image key (a few numbers each; bounded anyway)."""

    def __init__(self, max_entries: int = 256):
        self.max_entries = max_entries
        self._items: dict[tuple, Geometry] = {}
        self._lock = threading.Lock()

    def put(self, key: tuple, geometry: Geometry) -> None:
        with self._lock:
            self._items.pop(key, None)
            self._items[key] = geometry
            while len(self._items) > self.max_entries:
                self._items.pop(next(iter(self._items)))

    def get(self, key: tuple, path: str) -> Geometry:
        with self._lock:
            geometry = self._items.get(key)
        if geometry is None:
            geometry = read_geometry(path)
            self.put(key, geometry)
        return geometry
