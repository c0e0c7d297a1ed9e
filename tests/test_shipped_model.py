"""The shipped default model really segments CT: Dice against reference masks on held-out real CT, through the
predictor's interaction path (the paper's protocol: a 2D box on the largest slice, then corrective clicks)."""

from pathlib import Path

import numpy as np
import pytest

from raps3d import Engine, ImageState, load_model
from raps3d.training.data import data_root, lidc_cases
from raps3d.training.evaluate import evaluate_structure

MODEL = Path(__file__).resolve().parents[1] / "model" / "raps3d_lite.pt"
# Measured for the shipped checkpoint on 40 held-out nodules: box 0.74, after 3 edits 0.72 (see model/README.md);
# the bound leaves room for the smaller sample here.
MIN_BOX_DICE = 0.55


@pytest.fixture(scope="module")
def engine():
    if not MODEL.exists():
        pytest.skip("no shipped checkpoint")
    return Engine(load_model(MODEL)[0])


def test_held_out_lidc_nodules_from_a_box(engine):
    if not (data_root() / "lidc").exists():
        pytest.skip(f"real CT not found under {data_root()} (set RAPS3D_DATA)")
    cases = lidc_cases(validation=True, limit=8)
    dices = []
    for case in cases:
        image = ImageState(engine, case.volume, case.spacing)
        d, seconds = evaluate_structure(image, case.structures["nodule"], "box")
        assert len(d) == 4 and len(seconds) >= 1
        dices.append(d[0])
    assert np.mean(dices) >= MIN_BOX_DICE, dices


def test_model_card_matches_the_checkpoint(engine):
    card = (MODEL.parent / "README.md").read_text()
    meta = load_model(MODEL)[1]
    assert f"{meta['train_state']['step']} steps" in card
    for word in ("Data", "Command", "Hardware", "Evaluation"):
        assert word in card
