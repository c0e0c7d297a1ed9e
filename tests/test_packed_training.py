"""Packed case files and the training command's GPU-node options (packed data, device, sample-drawing workers),
on real CT."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raps3d import load_model, save_model
from raps3d.modeling import CONFIGS, Raps3D, build_model
from raps3d.training.data import lidc_cases, openkbp_cases
from raps3d.training.packed import LEVELS, load_packed, save_packed
from raps3d.training.sampling import augmented_hu_range
from raps3d.training.train import SampleStream, resume_state_path, sample_batches

from library_fixtures import real_ct

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def splits():
    real_ct("openkbp/train/pt_100_ct.nii.gz")  # skips when the data folder is absent
    return {"training": openkbp_cases("train", limit=2), "validation": lidc_cases(validation=True, limit=3)}


@pytest.fixture(scope="module")
def packed(splits, tmp_path_factory):
    return save_packed(tmp_path_factory.mktemp("packed") / "cases.npz", splits)


def test_packed_cases_keep_masks_exactly_and_intensities_within_a_step(splits, packed):
    loaded = load_packed(packed)
    lo, hi = augmented_hu_range()
    step = (hi - lo) / LEVELS
    assert lo < -500 and hi > 1000 and step < 7  # wider than the HU window, finer than CT noise
    assert {k: [c.name for c in v] for k, v in loaded.items()} == {k: [c.name for c in v] for k, v in splits.items()}
    for original, copy in zip(splits["training"] + splits["validation"], loaded["training"] + loaded["validation"]):
        assert copy.dataset == original.dataset and copy.spacing == pytest.approx(original.spacing)
        assert copy.volume.shape == original.volume.shape and sorted(copy.structures) == sorted(original.structures)
        for name, structure in original.structures.items():
            assert np.array_equal(copy.structures[name].full(), structure.full()), name
        expected = np.clip(original.volume.astype(np.float32), lo, hi)
        assert np.abs(copy.volume - expected).max() <= step / 2 + 0.5  # rounding to the level, then to whole HU
    assert packed.stat().st_size < sum(c.volume.nbytes for c in splits["training"]) / 4


def test_a_foreign_file_is_refused(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, header=np.frombuffer(b'{"format": "x"}', np.uint8))
    with pytest.raises(ValueError, match="not a packed case file"):
        load_packed(path)
    # A file packed before volumes were read in the model's orientation: its cases would train upside down.
    np.savez(path, header=np.frombuffer(b'{"format": "raps3d-packed-cases-v1"}', np.uint8))
    with pytest.raises(ValueError, match="from before training read them in the model's orientation; pack the data"):
        load_packed(path)


def test_sample_workers_draw_different_samples(splits):
    config = build_model("lite").config
    stream = SampleStream(splits["training"], config, 2, [0, 0, 0, 1], {"openkbp": 1.0})
    batches = sample_batches(stream, workers=2)
    first, second = next(batches), next(batches)  # one batch from each worker
    assert len(first) == len(second) == 2 and first[0].image.shape == tuple(config.input_shape)
    assert not np.array_equal(first[0].image, second[0].image)


def _training_command(*args: str) -> subprocess.CompletedProcess:
    """``python -m raps3d.training ARGS`` in a fresh process that sees only the library."""
    return subprocess.run([sys.executable, "-m", "raps3d.training", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(ROOT / "lib"), "PATH": "/usr/bin:/bin"})


def test_training_command_on_a_packed_file(packed, tmp_path):
    out = tmp_path / "model.pt"
    done = _training_command("--packed", str(packed), "--out", str(out), "--steps", "4", "--batch-size", "2",
                             "--workers", "2", "--device", "cpu", "--save-every", "2", "--val-samples", "2",
                             "--threads", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 training cases, 3 validation cases" in done.stdout and "training on cpu" in done.stdout
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["step"] == 4 and 0 <= last["val_dice"] <= 1
    model, meta = load_model(out)
    assert meta["train_state"]["step"] == 4 and "CPU" in meta["hardware"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_training_command_adds_the_detail_path_to_a_checkpoint_without_it(packed, tmp_path):
    plain = Raps3D(dataclasses.replace(CONFIGS["lite"], detail_levels=0))
    save_model(plain, tmp_path / "plain.pt")
    out = tmp_path / "detailed.pt"
    done = _training_command("--packed", str(packed), "--init", str(tmp_path / "plain.pt"), "--config", "lite",
                             "--out", str(out), "--steps", "3", "--batch-size", "2", "--device", "cpu",
                             "--save-every", "3", "--val-samples", "2", "--threads", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    model, meta = load_model(out)
    assert model.config.detail_levels == 2 and meta["init"] == str(tmp_path / "plain.pt")
    assert sorted(meta["fresh"]) == sorted(n for n, _ in model.named_parameters() if n.startswith("detail_encoder."))
    # The detail projections started at zero and were trained.
    assert all(p.abs().max() > 0 for p in model.detail_encoder.projections.parameters())
    # The run's exact-resume state keeps the faster rate of the new layers as a parameter group of its own.
    state = torch.load(resume_state_path(out), weights_only=True)
    assert [g["lr_scale"] for g in state["optimizer"]["param_groups"]] == [1.0, 10.0]


def test_training_command_explains_a_missing_packed_file(tmp_path):
    done = _training_command("--packed", str(tmp_path / "none.npz"), "--out", str(tmp_path / "m.pt"))
    assert done.returncode != 0 and "--packed: no file at" in done.stderr
