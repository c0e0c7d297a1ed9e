"""Labelled CT cases for training and evaluation: each structure of a label map is one binary target.

The real CT folder is found through one setting: the RAPS3D_DATA environment variable (default: ``data`` in the
``shared`` folder beside the project).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..geometry import Box, box_taps, interpolate_taps
from ..orientation import Reorientation

PROJECT_ROOT = Path(__file__).resolve().parents[3]
MIN_STRUCTURE_VOXELS = 20


def data_root() -> Path:
    return Path(os.environ.get("RAPS3D_DATA", PROJECT_ROOT.parent / "shared" / "data"))


@dataclass(frozen=True, eq=False)
class Structure:
    """A binary mask of a volume, kept as the part inside its bounding box.

    A structure is usually a small part of its CT: as a full-volume mask, each label of a 512 x 512 x 300 CT would
    hold 79 MB, and a train task reads every saved label of every image at once.
    """

    start: tuple  # (z, y, x) of the bounding box's first voxel
    crop: np.ndarray  # bool, the mask inside its bounding box
    shape: tuple  # the volume's

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> "Structure":
        mask = np.asarray(mask, dtype=bool)
        found = ndimage.find_objects(mask.view(np.uint8))  # a view: no second full-size array
        if not found:
            return cls((0, 0, 0), np.zeros((0, 0, 0), bool), mask.shape)
        bounds = found[0]
        return cls(tuple(s.start for s in bounds), mask[bounds].copy(), mask.shape)

    @property
    def count(self) -> int:
        return int(self.crop.sum())

    @property
    def box(self) -> Box:
        """The bounding box (the structure must not be empty)."""
        return Box(self.start, tuple(a + n for a, n in zip(self.start, self.crop.shape)))

    def voxels(self) -> np.ndarray:
        """(N, 3) voxel indices of the structure, in the order ``np.argwhere`` gives for the full mask."""
        return np.argwhere(self.crop) + np.asarray(self.start)

    def in_box(self, box: Box) -> np.ndarray:
        """The mask over ``box`` of the volume (False where the structure is not)."""
        out = np.zeros(box.size, bool)
        inside = self.within(box)
        if inside is not None:
            where = tuple(slice(a - b, c - b) for a, b, c in zip(inside.start, box.start, inside.stop))
            out[where] = self.part(inside)
        return out

    def full(self) -> np.ndarray:
        """The mask over the whole volume."""
        return self.in_box(Box((0, 0, 0), self.shape))

    def part(self, box: Box) -> np.ndarray:
        """The mask over ``box``, a box inside the bounding box (a view of ``crop``)."""
        return self.crop[tuple(slice(a - s, b - s) for a, b, s in zip(box.start, box.stop, self.start))]

    def within(self, box: Box) -> Box | None:
        """The part of the bounding box inside ``box`` (None when they do not meet)."""
        start = np.maximum(box.start, self.start)
        stop = np.minimum(box.stop, np.asarray(self.start) + self.crop.shape)
        return Box(tuple(map(int, start)), tuple(map(int, stop))) if (stop > start).all() else None

    def resample(self, box: Box, shape) -> np.ndarray:
        """``resample_box(self.full().astype(np.float32), box, shape)``, reading only the voxels it needs."""
        index, weights = box_taps(box, shape)
        local = [i - s for i, s in zip(index, self.start)]
        inside = [(i >= 0) & (i < n) for i, n in zip(local, self.crop.shape)]
        block = np.zeros([len(i) for i in index], np.float32)
        if all(f.any() for f in inside):
            block[np.ix_(*inside)] = self.crop[np.ix_(*(i[f] for i, f in zip(local, inside)))]
        return interpolate_taps(block, weights)


def label_structures(label: np.ndarray) -> dict:
    """{value: Structure} of each non-zero value of a label map. A map of whole numbers from 0 is read once (every
    value's bounding box in one pass, then each value's mask inside its box only); other maps value by value."""
    if label.dtype.kind in "iu" and label.size and 0 <= label.min() and label.max() <= 65535:
        return {value: Structure(tuple(s.start for s in bounds), label[bounds] == value, label.shape)
                for value, bounds in enumerate(ndimage.find_objects(label), start=1) if bounds is not None}
    return {value: Structure.from_mask(label == value) for value in np.unique(label) if value != 0}


@dataclass
class Case:
    """One CT volume (z, y, x) with its structures as {name: Structure}; full binary masks (z, y, x) given here are
    stored as Structures."""

    name: str
    dataset: str
    volume: np.ndarray
    spacing: tuple
    structures: dict = field(default_factory=dict)

    def __post_init__(self):
        self.structures = {k: v if isinstance(v, Structure) else Structure.from_mask(v)
                           for k, v in self.structures.items()}


def read_zyx(path: Path) -> tuple[np.ndarray, tuple]:
    """Voxels (z, y, x) in the model's orientation (``raps3d.orientation``: as the server shows them to the model)
    and its spacing (z, y, x). An image and its label map are reoriented alike where they share a direction matrix,
    as every file here does."""
    import SimpleITK as sitk  # here, so that packed data (training.packed) trains where no image reader is installed

    image = sitk.ReadImage(str(path))
    orientation = Reorientation.from_direction(image.GetDirection())
    return (orientation.volume(sitk.GetArrayFromImage(image)),
            orientation.spacing(tuple(float(s) for s in reversed(image.GetSpacing()))))


def split_labels(label: np.ndarray, names: dict[int, str], prefix: str = "", at_least: bool = False
                 ) -> dict[str, np.ndarray]:
    """{name: binary mask} of each named value that is present; with ``at_least``, a mask holds every voxel of that
    value or above."""
    out = {}
    for value, name in names.items():
        mask = label == value
        if at_least and mask.any():
            mask = label >= value
        if mask.sum() >= MIN_STRUCTURE_VOXELS:
            out[prefix + name] = mask
    return out


def split_dose_levels(label: np.ndarray, names: dict[int, str]) -> dict[str, np.ndarray]:
    """Treatment targets from a label map whose values rise with the prescribed dose (1 PTV56, 2 PTV63, 3 PTV70).

    Such a map keeps one value per voxel, so where targets overlapped only the highest dose is left, and a
    lower-dose target that enclosed a higher one survives as a thin shell or as dozens of specks. Nested dose
    levels are the rule (every such fragment touches a higher-dose target, and the union is one object), so each
    target present is rebuilt as its own voxels plus those of every higher dose; a patient without a dose level
    still has no target for it.
    """
    return split_labels(label, names, at_least=True)


def openkbp_cases(split: str, limit: int | None = None) -> list[Case]:
    folder = data_root() / "openkbp" / split
    names = json.loads((folder / "labels.json").read_text())
    cts = sorted(folder.glob("pt_*_ct.nii.gz"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))[:limit]
    cases = []
    for ct in cts:
        volume, spacing = read_zyx(ct)
        structures = {}
        for kind, split_map in (("oar", split_labels), ("ptv", split_dose_levels)):
            path = ct.with_name(ct.name.replace("_ct.", f"_{kind}."))
            if path.exists():
                structures.update(split_map(read_zyx(path)[0], {int(k): v for k, v in names[kind].items()}))
        if structures:
            cases.append(Case(ct.name.split("_ct")[0], "openkbp", volume, spacing, structures))
    return cases


def lidc_patient(path: Path) -> str:
    return path.name.split("_R_")[0]


def lidc_cases(validation: bool, limit: int | None = None) -> list[Case]:
    """LIDC nodule crops; every 5th patient (by id) is held out for validation."""
    folder = data_root() / "lidc"
    files = sorted((folder / "image").glob("*.nii.gz"))
    patients = sorted({lidc_patient(p) for p in files})
    held_out = set(patients[::5])
    cases = []
    for path in files:
        if (lidc_patient(path) in held_out) != validation:
            continue
        mask_path = folder / "nodule_mask" / path.name
        if not mask_path.exists():
            continue
        volume, spacing = read_zyx(path)
        mask = read_zyx(mask_path)[0] > 0
        if min(volume.shape) < 2 or mask.sum() < MIN_STRUCTURE_VOXELS:
            continue
        cases.append(Case(path.name.replace(".nii.gz", ""), "lidc", volume, spacing, {"nodule": mask}))
        if limit and len(cases) >= limit:
            break
    return cases


TOTALSEG_NAMES = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach",
                  7: "pancreas", 52: "aorta", 63: "inferior_vena_cava"}


def totalsegmentator_cases() -> list[Case]:
    folder = data_root() / "totalsegmentator"
    cases = []
    ct = folder / "example_ct.nii.gz"
    if ct.exists():
        volume, spacing = read_zyx(ct)
        label = read_zyx(folder / "example_seg_fast_force_split.nii.gz")[0]
        cases.append(Case("example_ct", "totalsegmentator", volume, spacing, split_labels(label, TOTALSEG_NAMES)))
    cta = folder / "chest_cta_aorta_ct.nii.gz"
    if cta.exists():
        volume, spacing = read_zyx(cta)
        aorta = read_zyx(folder / "chest_cta_aorta_masks" / "aorta.nii.gz")[0] > 0
        cases.append(Case("chest_cta", "totalsegmentator", volume, spacing, {"aorta": aorta}))
    return cases


def training_cases(limit: int | None = None) -> list[Case]:
    return openkbp_cases("train", limit) + lidc_cases(False, limit) + totalsegmentator_cases()


def validation_cases(limit: int | None = None) -> list[Case]:
    return openkbp_cases("validation", limit) + lidc_cases(True, limit)
