"""The network's parts: the detail path (image features at the mask's resolution) and checkpoints of models with and
without it."""

import dataclasses

import pytest
import torch

from raps3d import CheckpointError, load_model, save_model
from raps3d.checkpoint import init_model
from raps3d.modeling import CONFIGS, ModelConfig, Raps3D, build_model
from raps3d.modeling.detail_encoder import DetailEncoder
from raps3d.training.train import TrainConfig, parameter_groups

LITE = CONFIGS["lite"]
WITHOUT_DETAIL = dataclasses.replace(LITE, detail_levels=0)


def _prompts(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    coords = torch.rand(batch, 2, 3, generator=g) * (torch.tensor(LITE.input_shape) - 1)
    return coords, torch.tensor([[2, 3]] * batch)


def test_detail_features_match_the_decoders_last_stages():
    model = build_model("lite").eval()
    with torch.no_grad():
        feats = model.encode(torch.rand(1, 1, *LITE.input_shape))
    assert feats.embedding.shape == (1, LITE.prompt_dim, *LITE.grid_shape)
    assert [tuple(d.shape[2:]) for d in feats.detail] == LITE.upscale_shapes[-2:] == [(32, 32, 32), (32, 64, 64)]
    assert [d.shape[1] for d in feats.detail] == [16, 16]
    assert LITE.mask_shape == (32, 64, 64)


def test_a_model_given_the_detail_path_starts_with_the_outputs_of_the_one_it_came_from(tmp_path):
    torch.manual_seed(0)
    plain = Raps3D(WITHOUT_DETAIL).eval()
    assert plain.detail_encoder is None
    save_model(plain, tmp_path / "plain.pt", half=False)
    model, fresh = init_model(tmp_path / "plain.pt", "lite")
    model.eval()
    assert fresh and all(name.startswith("detail_encoder.") for name in fresh)
    assert set(fresh) == {n for n, _ in model.detail_encoder.named_parameters(prefix="detail_encoder")}
    image = torch.rand(2, 1, *LITE.input_shape)
    coords, labels = _prompts()
    with torch.no_grad():
        before, iou_before = plain(image, coords, labels)
        after, iou_after = model(image, coords, labels)
        assert torch.equal(before, after) and torch.equal(iou_before, iou_after)
        # The path is wired in: once its projections are not zero, the masks change.
        for projection in model.detail_encoder.projections:
            projection.bias.fill_(0.5)
        changed, _ = model(image, coords, labels)
    assert (changed - before).abs().max() > 1e-3


def test_features_shared_by_several_prompt_sets_give_each_its_own_mask():
    model = build_model("lite").eval()
    for projection in model.detail_encoder.projections:
        torch.nn.init.normal_(projection.weight, std=0.1)
    coords, labels = _prompts(3)
    with torch.no_grad():
        feats = model.encode(torch.rand(1, 1, *LITE.input_shape))
        shared, _ = model.decode(feats, coords, labels)
        one_by_one = torch.cat([model.decode(feats, coords[i:i + 1], labels[i:i + 1])[0] for i in range(3)])
    assert torch.allclose(shared, one_by_one, atol=1e-5)
    # The prompts matter: other prompt sets, other masks.
    assert (shared[0] - shared[1]).abs().max() > 1e-3 and (shared[1] - shared[2]).abs().max() > 1e-3


def test_checkpoints_with_and_without_detail_load_as_they_were_saved(tmp_path):
    torch.manual_seed(0)
    plain, detailed = Raps3D(WITHOUT_DETAIL), build_model("lite")
    save_model(plain, tmp_path / "plain.pt")
    save_model(detailed, tmp_path / "detailed.pt")
    assert load_model(tmp_path / "plain.pt")[0].config.detail_levels == 0
    loaded = load_model(tmp_path / "detailed.pt")[0]
    assert loaded.config == LITE and loaded.detail_encoder is not None
    # A configuration stored before the field existed reads as a model without the detail path.
    stored = WITHOUT_DETAIL.to_dict()
    del stored["detail_levels"]
    assert ModelConfig.from_dict(stored) == WITHOUT_DETAIL


def test_a_checkpoint_that_does_not_fit_the_configuration_is_refused_with_the_names(tmp_path):
    save_model(build_model("lite"), tmp_path / "lite.pt")
    with pytest.raises(CheckpointError, match="differs from 'lite' in width, mlp_dim;"):
        init_model(tmp_path / "lite.pt", dataclasses.replace(LITE, width=128, mlp_dim=512))
    # Every weight would fit here, but split into other attention heads the model computes something else.
    with pytest.raises(CheckpointError, match="differs from 'lite' in heads, decoder_heads;"):
        init_model(tmp_path / "lite.pt", dataclasses.replace(LITE, heads=LITE.heads // 2,
                                                             decoder_heads=LITE.decoder_heads // 2))
    # Only the detail path may be missing: a checkpoint lacking any other part is refused.
    model = Raps3D(WITHOUT_DETAIL)
    payload_path = save_model(model, tmp_path / "plain.pt")
    payload = torch.load(payload_path, weights_only=True)
    del payload["state_dict"]["mask_decoder.iou_token.weight"]
    torch.save(payload, payload_path)
    with pytest.raises(CheckpointError, match="missing .*mask_decoder.iou_token.weight"):
        init_model(payload_path, "lite")


def test_detail_levels_must_halve_or_keep_each_axis():
    with pytest.raises(ValueError, match="cannot follow"):
        DetailEncoder((32, 128, 128), [(32, 32, 32)], [16])  # a stride of 4 in-plane
    with pytest.raises(ValueError, match="detail_levels"):
        Raps3D(dataclasses.replace(LITE, detail_levels=4))


def test_parameters_new_to_a_fine_tuned_model_learn_faster():
    model = build_model("lite")
    fresh = [n for n, _ in model.named_parameters() if n.startswith("detail_encoder.")]
    groups = parameter_groups(model, fresh, TrainConfig(lr=2e-4, fresh_lr_scale=10.0))
    assert [g["lr"] for g in groups] == [2e-4, pytest.approx(2e-3)]
    assert len(groups[1]["params"]) == len(fresh)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert len(parameter_groups(model, [], TrainConfig(lr=2e-4))) == 1
