"""SegVol weight import, tested on checkpoints written in SegVol's two released layouts (random values)."""

import pytest
import torch

from raps3d import CheckpointError
from raps3d.modeling import build_model
from raps3d.segvol import load_segvol_encoder

# SegVol's ViT was written for MONAI 0.9: these are its tensors (no cross-attention norms).
SEGVOL_KEY_COUNT = 137


@pytest.fixture(scope="module")
def model():
    return build_model("segvol")


def segvol_tensors(model, drop_cross_attn=True):
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) for k, v in model.image_encoder.vit.state_dict().items()
             if not (drop_cross_attn and "norm_cross_attn" in k)}
    assert len(state) == SEGVOL_KEY_COUNT
    return state


@pytest.mark.parametrize("container,prefix", [("state_dict", "model.encoder."), ("model", "module.image_encoder.")])
def test_both_segvol_layouts_load_every_tensor(model, tmp_path, container, prefix):
    tensors = segvol_tensors(model)
    payload = {container: {prefix + k: v for k, v in tensors.items()}}
    payload[container]["model.decoder.some_head.weight"] = torch.zeros(3)  # other parts of SegVol are ignored
    path = tmp_path / "segvol.ckpt"
    torch.save(payload, path)
    report = load_segvol_encoder(model, path)
    assert report["loaded"] == SEGVOL_KEY_COUNT
    assert all("norm_cross_attn" in k for k in report["missing_allowed"]) and len(report["missing_allowed"]) == 24
    loaded = model.image_encoder.vit.state_dict()
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k
    assert tensors["patch_embedding.position_embeddings"].shape == (1, 2048, 768)


def test_mismatches_are_named(model, tmp_path):
    tensors = segvol_tensors(model)
    tensors["patch_embedding.position_embeddings"] = torch.zeros(1, 1024, 768)
    del tensors["blocks.3.attn.qkv.weight"]
    tensors["blocks.12.attn.qkv.weight"] = torch.zeros(2304, 768)
    path = tmp_path / "bad.pth"
    torch.save({"model": {"module.image_encoder." + k: v for k, v in tensors.items()}}, path)
    with pytest.raises(CheckpointError) as err:
        load_segvol_encoder(model, path)
    text = str(err.value)
    assert "blocks.3.attn.qkv.weight" in text and "blocks.12.attn.qkv.weight" in text
    assert "position_embeddings: checkpoint (1, 1024, 768) vs model (1, 2048, 768)" in text


def test_unreadable_or_foreign_files(model, tmp_path):
    bad = tmp_path / "garbage.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_segvol_encoder(model, bad)
    other = tmp_path / "other.pth"
    torch.save({"weights": {"x": torch.zeros(1)}}, other)
    with pytest.raises(CheckpointError, match="neither SegVol layout"):
        load_segvol_encoder(model, other)
    with pytest.raises(CheckpointError, match="no SegVol checkpoint"):
        load_segvol_encoder(model, tmp_path / "missing.ckpt")
