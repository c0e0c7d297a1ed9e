"""How label maps become training and evaluation targets."""

import numpy as np
from scipy import ndimage

from raps3d.geometry import Box, resample_box
from raps3d.modeling import build_model
from raps3d.training.data import Case, Structure, label_structures, openkbp_cases, split_dose_levels
from raps3d.training.sampling import augmented_hu_range, compact_volume, make_sample

from library_fixtures import real_ct

DOSE_NAMES = {1: "PTV56", 2: "PTV63", 3: "PTV70"}


def _largest_piece_fraction(mask: np.ndarray) -> float:
    pieces, _ = ndimage.label(mask, np.ones((3, 3, 3)))
    return np.bincount(pieces.ravel())[1:].max() / mask.sum()


def test_each_dose_level_holds_the_higher_doses_inside_it():
    label = np.zeros((12, 12, 12), np.uint8)
    label[1:11, 1:11, 1:11] = 1  # PTV56 encloses PTV70, whose value replaced it in the middle
    label[4:8, 4:8, 4:8] = 3  # no PTV63 for this patient

    targets = split_dose_levels(label, DOSE_NAMES)

    assert sorted(targets) == ["PTV56", "PTV70"]  # a missing dose level gets no target
    assert targets["PTV56"].sum() == 10**3  # the whole block, not a hollow shell
    assert targets["PTV70"].sum() == 4**3


def test_openkbp_targets_are_one_object_where_the_label_map_left_pieces():
    label, _ = real_ct("openkbp/train/pt_1_ptv.nii.gz")
    stored = label == 2
    assert _largest_piece_fraction(stored) < 0.5  # PTV70 overwrote most of PTV63, leaving pieces around it

    (case,) = openkbp_cases("train", limit=1)
    assert case.name == "pt_1"
    ptv63 = case.structures["PTV63"].full()
    assert _largest_piece_fraction(ptv63) > 0.95
    assert np.array_equal(ptv63, label >= 2)
    assert np.array_equal(case.structures["PTV70"].full(), label == 3)


def test_a_structure_keeps_only_its_bounding_box_and_reads_back_exactly():
    mask = np.zeros((64, 128, 128), bool)
    mask[10:14, 20:30, 40:45] = True
    mask[12, 25, 44] = False  # a hole, kept
    mask[13, 29, 40] = True

    structure = Structure.from_mask(mask)

    assert structure.crop.shape == (4, 10, 5) and structure.crop.nbytes == 200  # the volume's mask: 1 MB
    assert structure.box == Box((10, 20, 40), (14, 30, 45)) and structure.count == mask.sum()
    assert np.array_equal(structure.full(), mask)
    assert np.array_equal(structure.voxels(), np.argwhere(mask))  # the same order: samples drawn stay the same
    for box in (Box((0, 0, 0), (64, 128, 128)), Box((12, 25, 42), (40, 100, 100)), Box((0, 0, 0), (11, 21, 41)),
                Box((30, 0, 0), (64, 128, 128))):
        assert np.array_equal(structure.in_box(box), mask[box.slices]), box
        for shape in ((32, 64, 64), (3, 5, 7)):  # a training target, read without the frame-sized mask
            assert np.array_equal(structure.resample(box, shape), resample_box(mask.astype(np.float32), box, shape))
    assert structure.within(Box((30, 0, 0), (64, 128, 128))) is None
    assert structure.within(Box((12, 0, 0), (64, 22, 128))) == Box((12, 20, 40), (14, 22, 45))

    empty = Structure.from_mask(np.zeros((4, 5, 6), bool))
    assert empty.count == 0 and empty.full().shape == (4, 5, 6) and not empty.full().any()


def test_cases_store_full_masks_as_structures():
    mask = np.zeros((8, 8, 8), bool)
    mask[2:4, 2:4, 2:4] = True
    case = Case("c", "site", np.zeros((8, 8, 8), np.int16), (1, 1, 1), {"organ": mask})
    assert isinstance(case.structures["organ"], Structure) and case.structures["organ"].crop.shape == (2, 2, 2)
    assert np.array_equal(case.structures["organ"].full(), mask)


def test_wide_volumes_are_kept_as_int16_without_changing_what_training_sees():
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1500, 2500, (24, 40, 40))
    hu[:, :3] = -3024  # outside the scanner's field of view
    mask = np.zeros(hu.shape, bool)
    mask[8:16, 12:28, 12:28] = True
    config = build_model("lite").config
    for wide in (np.rint(hu).astype(np.int32), hu.astype(np.float32)):
        compact = compact_volume(wide)
        assert compact.dtype == np.int16 and compact.nbytes * 2 == wide.nbytes
        lo, hi = augmented_hu_range()
        assert compact.min() >= np.floor(lo) and compact.max() <= np.ceil(hi)
        assert np.abs(compact - np.clip(wide, lo, hi)).max() <= 1.0
        for seed in range(6):
            a = make_sample(Case("c", "site", wide, (2.0, 1.0, 1.0), {"s": mask}), "s", config,
                            np.random.default_rng(seed))
            b = make_sample(Case("c", "site", compact, (2.0, 1.0, 1.0), {"s": mask}), "s", config,
                            np.random.default_rng(seed))
            assert np.array_equal(a.target, b.target) and np.array_equal(a.coords, b.coords)
            # whole HU: within half an HU over the narrowest augmented window (1350 HU wide)
            assert np.abs(a.image - b.image).max() <= 0.5 / 1350 + 1e-6
    int16 = np.zeros((4, 4, 4), np.int16)
    assert compact_volume(int16) is int16  # a CT's own type is kept as it is


def test_label_maps_become_one_structure_per_value_however_they_are_stored():
    rng = np.random.default_rng(0)
    label = np.zeros((20, 30, 40), np.int64)
    label[2:9, 3:12, 5:30] = 1
    label[10:18, 20:28, 1:6] = 4  # values need not be consecutive
    label[rng.random(label.shape) < 0.002] = 7  # scattered voxels: a box that spans the volume
    label[0, 0, 0] = 300
    expected = {v: label == v for v in (1, 4, 7, 300)}
    for stored in (label.astype(np.uint16), label.astype(np.int32), label, label.astype(np.float32),
                   np.where(label == 300, -1, label)):  # a negative value is read value by value
        structures = label_structures(stored)
        names = {float(v) for v in structures}
        assert names == ({1.0, 4.0, 7.0, -1.0} if stored.min() < 0 else {1.0, 4.0, 7.0, 300.0}), stored.dtype
        for value, structure in structures.items():
            mask = expected[300 if value == -1 else int(value)]
            assert np.array_equal(structure.full(), mask)
            assert structure.crop.shape == Structure.from_mask(mask).crop.shape  # the value's own box
