"""Where a NIfTI file places its volume: its two transforms (qform and sform) must agree.

A NIfTI-1 header carries two voxel-to-world transforms, each with a code saying whether it is set. Readers choose
between them differently: ITK (3D Slicer, MITK, this server) takes the qform unless the sform's code is 1 or the
qform is unset, and falls back to the qform when the sform is sheared; nibabel (and the tools built on it) takes the
sform whenever it is set. Where both are set and place the volume differently, a viewer of the one kind shows the
server's label away from the anatomy a viewer of the other kind shows: such a file is refused rather than guessed at.
"""

from __future__ import annotations

import os

import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def transform_disagreement_mm(path: str) -> tuple[float, float] | None:
    """For a NIfTI file with both transforms set: how far apart (mm) they put the volume's corners, and its smallest
    voxel spacing (mm) to judge that by. None for other files, and for NIfTI files with one transform or none (every
    reader then agrees, or has nothing to choose)."""
    if not path.lower().endswith(NIFTI_SUFFIXES) or not os.path.isfile(path):
        return None
    import nibabel

    try:
        header = nibabel.load(path).header  # the header only: voxels are read lazily, never here
        if not isinstance(header, nibabel.Nifti1Header):
            return None
        qform, qform_code = header.get_qform(coded=True)
        sform, sform_code = header.get_sform(coded=True)
    except Exception:  # not NIfTI-1 as nibabel reads it: ITK's reading says what is wrong with it
        return None
    if not qform_code or not sform_code or qform is None or sform is None:
        return None
    shape = tuple(header.get_data_shape()[:3]) + (1, 1, 1)  # a 2D file has fewer axes: ITK's reading says so
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)])
    apart = np.linalg.norm(corners @ (qform - sform).T, axis=1).max()
    spacing = np.abs(np.asarray(header.get_zooms()[:3], dtype=np.float64))
    return float(apart), float(spacing.min())
