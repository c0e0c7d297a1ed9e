"""Writing a reply label with the image's exact geometry, in the format a viewer asks for.

NRRD is written directly: a text header plus the raw voxels. A (z, y, x) C-contiguous array already has NRRD's
raw layout for sizes (i, j, k), so nothing is transposed. Where the mask is zero outside a region of interest, only
the slab of slices holding that region is written; the rest of the file is left as a sparse run of zeros.
NIfTI goes through SimpleITK, so its header carries the same ITK geometry.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .images import Geometry

EXTENSIONS = (".nrrd", ".nii.gz", ".nii")
# numpy dtype -> NRRD type name
NRRD_TYPES = {"uint8": "uint8", "int8": "int8", "uint16": "uint16", "int16": "int16", "uint32": "uint32",
              "int32": "int32", "float32": "float", "float64": "double"}


class LabelFormatError(ValueError):
    """The requested reply format is not supported."""


@dataclass(frozen=True)
class LabelFormat:
    extension: str = ".nii.gz"
    dtype: str = "uint8"
    compress: bool = False  # NRRD only: gzip encoding (.nii.gz is always compressed, .nii never)

    @staticmethod
    def from_params(params: dict) -> "LabelFormat":
        ext = params.get("result_extension") or ".nii.gz"
        ext = str(ext).lower()
        ext = ext if ext.startswith(".") else "." + ext
        if ext not in EXTENSIONS:
            raise LabelFormatError(f"result_extension {ext!r} is not supported; use one of {list(EXTENSIONS)}")
        dtype = str(params.get("result_dtype") or "uint8").lower()
        if dtype not in NRRD_TYPES:
            raise LabelFormatError(f"result_dtype {dtype!r} is not supported; use one of {sorted(NRRD_TYPES)}")
        compress = params.get("result_compress", False)
        if isinstance(compress, str):
            compress = compress.strip().lower() in ("1", "true", "yes")
        return LabelFormat(ext, dtype, bool(compress))


def _num(v: float) -> str:
    # repr gives the shortest text that parses back to the same float64: geometry survives exactly.
    return repr(float(v))


def nrrd_header(geometry: Geometry, dtype: str, gzip: bool) -> bytes:
    d = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    axes = [d[:, a] * geometry.spacing[a] for a in range(3)]  # column a = direction of axis a, scaled
    lines = [
        "NRRD0004",
        f"type: {NRRD_TYPES[dtype]}",
        "dimension: 3",
        "space: left-posterior-superior",
        "sizes: " + " ".join(str(n) for n in geometry.size),
        "space directions: " + " ".join("(" + ",".join(_num(c) for c in v) + ")" for v in axes),
        "kinds: domain domain domain",
        "endian: little",
        f"encoding: {'gzip' if gzip else 'raw'}",
        "space origin: (" + ",".join(_num(c) for c in geometry.origin) + ")",
    ]
    return ("\n".join(lines) + "\n\n").encode("ascii")


def _slab(mask_roi: np.ndarray, start, stop, shape, dtype: np.dtype) -> np.ndarray:
    """The slices start[0]..stop[0] of the full label, zero outside the region."""
    z0, y0, x0 = start
    z1, y1, x1 = stop
    slab = np.zeros((z1 - z0, shape[1], shape[2]), dtype=dtype)
    slab[:, y0:y1, x0:x1] = mask_roi
    return slab


def write_nrrd(path: str, mask_roi: np.ndarray, start, stop, geometry: Geometry, dtype: str = "uint8",
               gzip: bool = False) -> None:
    """Write the label that is ``mask_roi`` over the box ``start..stop`` (z, y, x, half-open) and zero elsewhere."""
    shape = geometry.shape_zyx
    np_dtype = np.dtype(dtype).newbyteorder("<")
    header = nrrd_header(geometry, dtype, gzip)
    plane = shape[1] * shape[2] * np_dtype.itemsize
    with open(path, "wb") as f:
        f.write(header)
        if not gzip:
            f.truncate(len(header) + plane * shape[0])  # zeros everywhere, without writing them
            if mask_roi is not None and mask_roi.size:
                f.seek(len(header) + plane * start[0])
                f.write(memoryview(_slab(mask_roi, start, stop, shape, np_dtype)).cast("B"))
            return
        # gzip: stream slabs through one compressor (level 1: the label is mostly zeros, speed matters more).
        comp = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        zero_plane = np.zeros((1, shape[1], shape[2]), dtype=np_dtype)
        z_lo, z_hi = (start[0], stop[0]) if mask_roi is not None and mask_roi.size else (shape[0], shape[0])
        for _ in range(z_lo):
            f.write(comp.compress(memoryview(zero_plane).cast("B")))
        if z_hi > z_lo:
            f.write(comp.compress(memoryview(_slab(mask_roi, start, stop, shape, np_dtype)).cast("B")))
        for _ in range(shape[0] - z_hi):
            f.write(comp.compress(memoryview(zero_plane).cast("B")))
        f.write(comp.flush())


def write_nifti(path: str, mask_roi: np.ndarray, start, stop, geometry: Geometry, dtype: str = "uint8") -> None:
    full = np.zeros(geometry.shape_zyx, dtype=np.dtype(dtype))
    if mask_roi is not None and mask_roi.size:
        full[tuple(slice(a, b) for a, b in zip(start, stop))] = mask_roi
    image = geometry.apply_to(sitk.GetImageFromArray(full, isVector=False))
    sitk.WriteImage(image, path, useCompression=path.endswith(".gz"), compressionLevel=1)


def write_label(fmt: LabelFormat, mask_roi: np.ndarray | None, start, stop, geometry: Geometry,
                directory: str = "") -> str:
    """Write the label to a new temporary file (its name ends with the format's extension) and return its path.
    ``mask_roi`` None means an empty label."""
    fd, path = tempfile.mkstemp(suffix=fmt.extension, prefix="raps3d_", dir=directory or None)
    os.close(fd)
    try:
        if fmt.extension == ".nrrd":
            write_nrrd(path, mask_roi, start, stop, geometry, fmt.dtype, fmt.compress)
        else:
            write_nifti(path, mask_roi, start, stop, geometry, fmt.dtype)
    except BaseException:
        os.unlink(path)
        raise
    return path
