"""The shipped default model really segments CT: Dice against reference masks on held-out real CT, through the
predictor's interaction path (the paper's protocol: a 2D box on the largest slice, then corrective clicks)."""

from pathlib import Path

import numpy as np
import pytest

from raps3d import Engine, ImageState, load_model
from raps3d.training.data import data_root, lidc_cases, openkbp_cases
from raps3d.training.evaluate import evaluate_structure

MODEL = Path(__file__).resolve().parents[1] / "model" / "raps3d_lite.pt"
# Measured for the shipped checkpoint (see model/README.md): on the first 8 held-out nodules, box Dice 0.85 and
# point Dice 0.85 (0.87 after 3 corrective clicks); box Dice 0.74 on the parotid glands of the first 3 OpenKBP
# validation patients; on the brainstem of those patients, point Dice 0.70 (0.21 before the predictor looked at an
# intermediate scale when the zoom-out mask misses a small structure). The bounds leave room for small numerical
# changes.
MIN_NODULE_BOX_DICE = 0.75
MIN_NODULE_POINT_DICE = 0.75
MIN_NODULE_POINT_DICE_AFTER_EDITS = 0.78
MIN_PAROTID_BOX_DICE = 0.62
MIN_BRAINSTEM_POINT_DICE = 0.55
# On the 15 organs of the three sample phantoms (synthetic, unlike the training CT): box Dice 0.44 first, 0.52 after
# 3 corrective clicks; an untrained model of the same configuration (seed 0) scores 0.12 and 0.15.
MIN_PHANTOM_BOX_DICE = 0.36
MIN_PHANTOM_BOX_DICE_AFTER_EDITS = 0.44


def _dices(engine, cases, structures=None, prompt="box"):
    """Dice after the first prompt and after each of 3 corrective clicks: (structures, 4)."""
    dices = []
    for case in cases:
        image = ImageState(engine, case.volume, case.spacing)
        for name, reference in sorted(case.structures.items()):
            if structures and name not in structures:
                continue
            d, seconds = evaluate_structure(image, reference.full(), prompt)
            assert len(d) == 4 and len(seconds) >= 1
            dices.append(d)
    return np.array(dices)


@pytest.fixture(scope="module")
def engine():
    assert MODEL.exists(), f"the shipped checkpoint {MODEL.name} is missing from model/"
    return Engine(load_model(MODEL)[0])


def test_held_out_lidc_nodules_from_a_box(engine):
    if not (data_root() / "lidc").exists():
        pytest.skip(f"real CT not found under {data_root()} (set RAPS3D_DATA)")
    dices = _dices(engine, lidc_cases(validation=True, limit=8))[:, 0]
    assert len(dices) == 8 and np.mean(dices) >= MIN_NODULE_BOX_DICE, dices


def test_held_out_lidc_nodules_from_a_point_and_corrective_clicks(engine):
    if not (data_root() / "lidc").exists():
        pytest.skip(f"real CT not found under {data_root()} (set RAPS3D_DATA)")
    dices = _dices(engine, lidc_cases(validation=True, limit=8), prompt="point")
    assert len(dices) == 8 and dices[:, 0].mean() >= MIN_NODULE_POINT_DICE, dices
    assert dices[:, 3].mean() >= MIN_NODULE_POINT_DICE_AFTER_EDITS, dices


def test_held_out_parotid_glands_from_a_box(engine):
    if not (data_root() / "openkbp" / "validation").exists():
        pytest.skip(f"real CT not found under {data_root()} (set RAPS3D_DATA)")
    dices = _dices(engine, openkbp_cases("validation", limit=3), {"LeftParotid", "RightParotid"})[:, 0]
    assert len(dices) == 6 and np.mean(dices) >= MIN_PAROTID_BOX_DICE, dices


def test_held_out_brainstem_from_a_point(engine):
    # The brainstem hardly shows in the zoom-out view of a head-and-neck CT: this is the intermediate pass's case.
    if not (data_root() / "openkbp" / "validation").exists():
        pytest.skip(f"real CT not found under {data_root()} (set RAPS3D_DATA)")
    dices = _dices(engine, openkbp_cases("validation", limit=3), {"Brainstem"}, prompt="point")[:, 0]
    assert len(dices) == 3 and np.mean(dices) >= MIN_BRAINSTEM_POINT_DICE, dices


def test_the_sample_phantoms_organs_from_a_box(engine):
    """Always runs (no data folder needed): the shipped checkpoint segments the synthetic phantoms the server ships
    with. They are unlike its training CT, so the bar is low, but a checkpoint that does not load as trained falls
    well below it. (Their slices reversed score about the same: orientation is checked on real CT.)"""
    import json

    from raps3d.training.data import read_zyx, split_labels

    sample = Path(__file__).resolve().parents[1] / "sample-data"
    names = {value: name for name, value in json.loads((sample / "labels.json").read_text()).items()}
    dices = []
    for i in (1, 2, 3):
        volume, spacing = read_zyx(sample / "images" / f"phantom_0{i}.nii.gz")
        reference = read_zyx(sample / "reference" / f"phantom_0{i}_seg.nii.gz")[0]
        image = ImageState(engine, volume, spacing)
        for mask in split_labels(reference, names).values():
            dices.append(evaluate_structure(image, mask, "box")[0])
    dices = np.array(dices)
    assert dices.shape == (15, 4)
    assert dices[:, 0].mean() >= MIN_PHANTOM_BOX_DICE and dices[:, 3].mean() >= MIN_PHANTOM_BOX_DICE_AFTER_EDITS, dices


def test_model_card_matches_the_checkpoint(engine):
    card = (MODEL.parent / "README.md").read_text()
    meta = load_model(MODEL)[1]
    assert f"{meta['train_state']['step']} steps" in card
    for word in ("Data", "Command", "Hardware", "Evaluation"):
        assert word in card
    # the commands the checkpoint records appear in the card as they were run (line continuations aside)
    commands = " ".join(card.replace("\\\n", " ").split())
    assert meta["command"].removeprefix(".venv/bin/") in commands
    assert meta["calibration"]["command"] in commands
    assert f"({meta['calibration']['mask_threshold']:g})" in card
