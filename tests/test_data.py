"""How label maps become training and evaluation targets."""

import numpy as np
from scipy import ndimage

from raps3d.training.data import openkbp_cases, split_dose_levels

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
    ptv63 = case.structures["PTV63"]
    assert _largest_piece_fraction(ptv63) > 0.95
    assert np.array_equal(ptv63, label >= 2)
    assert np.array_equal(case.structures["PTV70"], label == 3)
