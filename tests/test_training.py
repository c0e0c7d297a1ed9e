"""The training loop on real CT: it runs, resumes, writes loadable fp16 checkpoints atomically, and learns."""

import numpy as np
import pytest
import torch

from raps3d import load_model
from raps3d.checkpoint import read_checkpoint
from raps3d.modeling import build_model
from raps3d.training.clicks import centre_point, corrective_click, largest_slice_box
from raps3d.training.data import openkbp_cases
from raps3d.training.train import TrainConfig, resume_state_path, train

from library_fixtures import real_ct


@pytest.fixture(scope="module")
def cases():
    real_ct("openkbp/train/pt_100_ct.nii.gz")  # skips when the data folder is absent
    return openkbp_cases("train", limit=2)


def test_train_resume_and_checkpoint(cases, tmp_path):
    torch.manual_seed(0)
    model = build_model("lite")
    out = tmp_path / "m.pt"
    losses = []
    meta = train(model, cases, out, TrainConfig(steps=4, batch_size=2, log_every=2, save_every=2),
                 progress=losses.append)
    assert meta["train_state"]["step"] == 4 and [e["step"] for e in losses] == [2, 4]
    assert all(np.isfinite(e["loss"]) for e in losses)
    payload = read_checkpoint(out)
    assert all(v.dtype == torch.float16 for v in payload["state_dict"].values() if v.is_floating_point())
    loaded, meta2 = load_model(out)
    assert meta2["train_state"]["step"] == 4
    after, earlier = [], [dict(e) for e in meta2["train_state"]["history"]]
    seconds_before = meta2["train_state"]["seconds"]
    resumed = train(loaded, cases, out, TrainConfig(steps=6, batch_size=2, log_every=2, save_every=2),
                    resume=meta2["train_state"], progress=after.append)
    assert [e["step"] for e in after] == [6]  # it went on from step 4, it did not start again
    history = resumed["train_state"]["history"]
    assert len(history) == 3 and history[:2] == earlier
    assert resumed["train_state"]["seconds"] > seconds_before
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no scratch files
    # What a run killed while saving leaves behind goes with the next run that writes the same checkpoint.
    stale = [tmp_path / ".m.pt.k1ll3d.tmp", tmp_path / ".m.pt.resume.k1ll3d.tmp"]
    other = tmp_path / ".other.pt.k1ll3d.tmp"
    for path in (*stale, other):
        path.write_bytes(b"half a checkpoint")
    train(loaded, cases, out, TrainConfig(steps=7, batch_size=2, log_every=2, save_every=7),
          resume=resumed["train_state"])
    assert not any(path.exists() for path in stale) and other.exists()


def _adam_step(state: dict) -> int:
    return int(next(iter(state["optimizer"]["state"].values()))["step"])


def test_exact_resume_keeps_fp32_weights_and_adam_moments(cases, tmp_path):
    torch.manual_seed(0)
    model = build_model("lite")
    out = tmp_path / "m.pt"
    cfg = TrainConfig(steps=3, batch_size=2, log_every=1, save_every=3)
    train(model, cases, out, cfg, keep_resume_state=True)
    state = torch.load(resume_state_path(out), weights_only=True)
    assert state["step"] == 3 and _adam_step(state) == 3
    fp32 = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(state["model"][k], v) for k, v in fp32.items())

    loaded, meta2 = load_model(out)  # fp16 round trip: not the weights training had
    assert any(not torch.equal(loaded.state_dict()[k], v) for k, v in fp32.items() if v.is_floating_point())
    train(loaded, cases, out, cfg, resume=meta2["train_state"], keep_resume_state=True)  # no step left: restore only
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in fp32.items())
    train(loaded, cases, out, TrainConfig(steps=4, batch_size=2, log_every=1, save_every=4),
          resume=meta2["train_state"], keep_resume_state=True)
    resumed = torch.load(resume_state_path(out), weights_only=True)
    assert resumed["step"] == 4 and _adam_step(resumed) == 4  # the moments went on, they did not restart at 0
    assert resumed["optimizer"]["param_groups"][0]["lr"] == 0.0  # the schedule ends at step 4, as if never stopped

    # A resume state of another step (a run killed between its two writes) is not used: moments restart.
    stale = dict(resumed, step=2)
    torch.save(stale, resume_state_path(out))
    loaded, meta3 = load_model(out)
    train(loaded, cases, out, TrainConfig(steps=5, batch_size=2, log_every=1, save_every=5),
          resume=meta3["train_state"], keep_resume_state=True)
    assert _adam_step(torch.load(resume_state_path(out), weights_only=True)) == 1

    # Nor is one of the same step saved with another checkpoint (another run's files copied beside this one).
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    train(build_model("lite"), cases, other, TrainConfig(steps=5, batch_size=2, log_every=1, save_every=5),
          keep_resume_state=True)
    torch.save(torch.load(resume_state_path(other), weights_only=True), resume_state_path(out))
    loaded, meta4 = load_model(out)
    assert meta4["train_state"]["step"] == 5
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    train(loaded, cases, out, TrainConfig(steps=5, batch_size=2, log_every=1, save_every=5),
          resume=meta4["train_state"], keep_resume_state=True)  # no step left: restore only
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in before.items())  # the other run's weights unused


def test_bf16_autocast_trains_fp32_weights(cases, tmp_path):
    torch.manual_seed(0)
    model = build_model("lite")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses, dtypes = [], set()
    hook = model.mask_decoder.register_forward_hook(lambda module, args, out: dtypes.add(out[0].dtype))
    train(model, cases, tmp_path / "m.pt", TrainConfig(steps=2, batch_size=2, log_every=1, save_every=2, bf16=True),
          progress=losses.append)
    hook.remove()
    assert dtypes == {torch.bfloat16}  # the forward pass ran under autocast
    assert len(losses) == 2 and all(np.isfinite(e["loss"]) and e["loss"] > 0 for e in losses)
    after = model.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it learned something, in fp32
    assert load_model(tmp_path / "m.pt")[1]["train_state"]["step"] == 2


def test_simulated_clicks_follow_the_protocol():
    ref = np.zeros((10, 30, 30), bool)
    ref[2:8, 5:25, 5:20] = True
    z, (y0, x0), (y1, x1) = largest_slice_box(ref)
    assert 2 <= z < 8 and (y0, x0, y1, x1) == (5, 5, 24, 19)
    c = centre_point(ref).astype(int)
    assert ref[tuple(c)] and c[0] in (4, 5)  # deepest inside: as far as can be from the top and bottom faces
    pred = ref.copy()
    pred[:, :, 12:] = False  # missed the right part: a positive click there
    point, positive = corrective_click(pred, ref)
    assert positive and not pred[tuple(point.astype(int))] and ref[tuple(point.astype(int))]
    pred = ref.copy()
    pred[0:2, 0:10, 0:10] = True  # a false positive block: a negative click there
    point, positive = corrective_click(pred, ref)
    assert not positive and point[0] < 2
    assert corrective_click(ref, ref) is None


def test_centre_point_matches_the_full_grid_distance_transform():
    from scipy import ndimage
    rng = np.random.default_rng(7)
    for i in range(20):
        mask = ndimage.binary_dilation(rng.random((12, 20, 24)) > 0.97, iterations=int(rng.integers(1, 4)))
        mask[:, :, :int(rng.integers(0, 10))] = False  # some masks touch the grid's edge, some do not
        if not mask.any():
            continue
        spacing = (2.5, 0.7, 0.7) if i % 2 else None
        full = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
        point = centre_point(mask, spacing).astype(int)
        assert mask[tuple(point)] and full[tuple(point)] == full.max()


def test_centre_point_of_a_tube_is_its_middle_and_depth_is_measured_in_mm():
    tube = np.zeros((40, 9, 9), bool)
    tube[5:36, 4, 4] = True  # every voxel equally deep: the middle one, not the first
    assert tuple(centre_point(tube).astype(int)) == (20, 4, 4)
    slab = np.zeros((7, 30, 30), bool)
    slab[1:6, 5:25, 5:25] = True  # 5 slices of 2.5 mm (12.5 mm) by 20 x 20 voxels of 0.7 mm (14 mm)
    z, y, x = centre_point(slab, spacing=(2.5, 0.7, 0.7)).astype(int)
    assert z == 3 and 14 <= y <= 15 and 14 <= x <= 15


def test_corrective_click_keeps_missed_and_wrongly_added_voxels_apart():
    ref = np.zeros((10, 20, 30), bool)
    ref[2:8, 5:15, 6:10] = True
    pred = np.zeros_like(ref)
    pred[2:8, 5:15, 10:14] = True  # the same plate beside it, touching: one blob of errors, of two kinds
    point, positive = corrective_click(pred, ref)
    assert positive and point[2] in (7, 8)  # the middle of the missed plate, not the seam between the two
    pred[2:8, 5:15, 10:16] = True  # now the wrongly added part is the larger
    point, positive = corrective_click(pred, ref)
    assert not positive and point[2] in (12, 13)


def _distributed_worker(rank, world, port, cases, out, result_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different initial weights: rank 0's must win
        model = build_model("lite")
        train(model, cases, out, TrainConfig(steps=2, batch_size=1, log_every=1, save_every=2, seed=0))
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, result_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_data_parallel_training_keeps_processes_in_step(cases, tmp_path):
    """torch.distributed (gloo on the CPU; nccl on GPUs): same weights everywhere after each step."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_distributed_worker, args=(2, port, cases, tmp_path / "m.pt", tmp_path), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    assert load_model(tmp_path / "m.pt")[1]["train_state"]["step"] == 2  # written once, by rank 0


def test_dataset_weights_are_parsed_and_checked():
    from raps3d.training.__main__ import parse_weights, weights_for

    assert parse_weights("openkbp=0.6, lidc=0.3,totalsegmentator=0.1") == {
        "openkbp": 0.6, "lidc": 0.3, "totalsegmentator": 0.1}
    for bad in ("openkbp", "openkbp=x", "=1", "openkbp=-1", "openkbp=0,lidc=0", ""):
        with pytest.raises(SystemExit, match="--dataset-weights"):
            parse_weights(bad)
    present = {"lidc", "openkbp", "totalsegmentator"}
    assert weights_for(None, present) == {"lidc": 0.3, "openkbp": 0.45, "totalsegmentator": 0.25}
    assert weights_for(None, {"lidc", "site"}) == {"lidc": 0.3, "site": 1.0}
    # A dataset left out is not drawn (it used to be drawn with weight 1, half the samples here).
    assert weights_for({"openkbp": 0.6, "lidc": 0.4}, present) == {"lidc": 0.4, "openkbp": 0.6,
                                                                      "totalsegmentator": 0.0}
    with pytest.raises(SystemExit, match="no training case from openkpb \\(the training data hold lidc, "):
        weights_for({"openkpb": 1.0}, present)
    with pytest.raises(SystemExit, match="needs a positive weight"):
        weights_for({"openkbp": 0.0}, {"openkbp", "site"})


def test_the_training_command_refuses_bad_arguments_with_a_clear_message(tmp_path, monkeypatch, capsys):
    from raps3d import save_model
    from raps3d.training.__main__ import main

    out = str(tmp_path / "m.pt")
    for argv, message in [(["--steps", "0"], "--steps: must be a finite number of at least 1, got 0"),
                          (["--steps", "-5"], "--steps: must be a finite number of at least 1, got -5"),
                          (["--batch-size", "0"], "--batch-size: must be a finite number of at least 1, got 0"),
                          (["--save-every", "0"], "--save-every: must be a finite number of at least 1, got 0"),
                          (["--lr", "-1"], "--lr: must be a finite number of at least 1e-12, got -1"),
                          (["--lr", "nan"], "--lr: must be a finite number of at least 1e-12, got nan"),
                          (["--lr", "inf"], "--lr: must be a finite number of at least 1e-12, got inf"),
                          (["--steps", "x"], "--steps: expected a whole number, got 'x'"),
                          (["--mid-zoom-fraction", "2"], "--mid-zoom-fraction: must be at most 1, got 2.0")]:
        with pytest.raises(SystemExit) as e:
            main(["--out", out, *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    trained = tmp_path / "trained.pt"
    save_model(build_model("lite"), trained, {"train_state": {"step": 3, "history": []}})
    monkeypatch.setenv("RAPS3D_DATA", str(tmp_path / "no-data-here"))
    for argv, message in [(["--out", str(junk), "--resume"], "--resume: " + f"{junk} is not a readable"),
                          (["--out", str(trained), "--resume", "--steps", "3"],
                           f"--resume: {trained} is at step 3 already; give --steps above it"),
                          (["--out", out, "--init", str(junk)], f"--init: {junk} is not a readable"),
                          (["--out", out, "--packed", str(junk)], f"--packed: cannot read {junk} as packed cases"),
                          (["--out", out], f"no data folder at {tmp_path / 'no-data-here'}: set RAPS3D_DATA")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert str(e.value).startswith(message), str(e.value)
    assert not (tmp_path / "m.pt").exists()


def test_intermediate_view_samples_are_cubes_around_the_structure(cases):
    from raps3d.roi import MID_ZOOM_MM
    from raps3d.training.sampling import make_sample, mid_zoom_box

    case = cases[0]
    structure = case.structures["Brainstem"]
    mask = structure.full()
    rng = np.random.default_rng(0)
    expected = np.minimum(np.ceil(MID_ZOOM_MM / np.asarray(case.spacing)), mask.shape).astype(int)
    boxes = [mid_zoom_box(structure, case.spacing, rng) for _ in range(20)]
    for box in boxes:
        assert box.size == tuple(expected) and mask[box.slices].any()
    assert len({b.start for b in boxes}) > 5  # the cube moves around the structure
    config = build_model("lite").config
    sample = make_sample(case, "Brainstem", config, rng, zoom_out_fraction=0.0, mid_zoom_fraction=1.0)
    assert sample is not None and sample.target.shape == config.mask_shape and sample.target.any()
    # the brainstem fills a small part of the cube (it fills most of a zoom-in crop)
    assert sample.target.mean() < 0.1


def test_box_samples_keep_the_low_corner_first_after_flips(cases):
    from raps3d.modeling import BOX_MAX, BOX_MIN
    from raps3d.training.sampling import make_sample

    config = build_model("lite").config
    rng = np.random.default_rng(1)
    samples = [make_sample(cases[0], "LeftParotid", config, rng, box_fraction=1.0) for _ in range(40)]
    samples = [s for s in samples if s is not None]
    assert len(samples) > 30
    for s in samples:
        assert s.labels.tolist() == [BOX_MIN, BOX_MAX]
        low, high = s.coords
        # the predictor always sends the low corner typed BOX_MIN; a left-right flip must not swap their meaning
        assert low[0] == high[0] and low[1] <= high[1] and low[2] <= high[2], s.coords
        # the box still frames the target on its slice (target at half the in-plane resolution of the input)
        z = int(round(low[0]))
        cols = np.flatnonzero(s.target[max(z - 1, 0):z + 2].any((0, 1)))
        centre = (cols.mean() + 0.5) * 2 - 0.5
        assert low[2] - 2 <= centre <= high[2] + 2


def test_frozen_parameters_stay_as_they_were_and_the_rest_trains(cases, tmp_path):
    torch.manual_seed(0)
    model = build_model("lite")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "m.pt"
    train(model, cases, out, TrainConfig(steps=2, batch_size=2, save_every=2, freeze=("image_encoder.",)),
          keep_resume_state=True)
    after = model.state_dict()
    frozen = [k for k in before if k.startswith("image_encoder.")]
    trained = [k for k in before if k.startswith(("mask_decoder.", "detail_encoder."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    # Resuming with every parameter trained: the stopped run's AdamW state does not fit, so the moments restart.
    loaded, meta = load_model(out)
    train(loaded, cases, out, TrainConfig(steps=3, batch_size=2, save_every=3), resume=meta["train_state"],
          keep_resume_state=True)
    assert _adam_step(torch.load(resume_state_path(out), weights_only=True)) == 1
    assert all(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ValueError, match="leaves nothing to train"):
        train(model, cases, tmp_path / "n.pt", TrainConfig(steps=1, batch_size=2, freeze=("",)))


class _FixedMasks(torch.nn.Module):
    """Decodes three candidate masks per sample, the one with the highest predicted IoU being ``chosen``: a model
    whose outputs quick_dice must turn into known Dice values."""

    def __init__(self, candidates, iou):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.candidates, self.iou = candidates, iou

    def encode(self, image):
        return image

    def decode(self, feats, coords, labels, mask_prompt, multimask):
        return self.candidates[None].float() * 2 - 1, self.iou[None]


def test_quick_dice_scores_the_mask_the_model_is_most_sure_of():
    from raps3d.training.sampling import Sample
    from raps3d.training.validation import quick_dice

    target = np.zeros((4, 8, 8), bool)
    target[1:3, 2:6, 2:6] = True  # 32 voxels
    half = target.copy()
    half[2] = False  # 16 of them
    sample = Sample(np.zeros((4, 8, 8), np.float32), target, np.zeros((1, 3), np.float32), np.ones(1, np.int64),
                    True)
    masks = torch.from_numpy(np.stack([np.zeros_like(target), target, half]))
    assert quick_dice(_FixedMasks(masks, torch.tensor([0.1, 0.9, 0.5])), [sample]) == 1.0
    assert quick_dice(_FixedMasks(masks, torch.tensor([0.9, 0.1, 0.5])), [sample]) == 0.0
    assert quick_dice(_FixedMasks(masks, torch.tensor([0.1, 0.5, 0.9])), [sample]) == pytest.approx(2 * 16 / 48)
    # The mean over samples.
    assert quick_dice(_FixedMasks(masks, torch.tensor([0.1, 0.5, 0.9])), [sample, sample]) == pytest.approx(2 / 3)
    # Logits are -1 outside a mask and +1 inside: a threshold of 1 or more keeps nothing, below -1 everything.
    assert quick_dice(_FixedMasks(masks, torch.tensor([0.1, 0.9, 0.5])), [sample], threshold=1.0) == 0.0
    assert quick_dice(_FixedMasks(masks, torch.tensor([0.1, 0.9, 0.5])), [sample], threshold=-1.5) == \
        pytest.approx(2 * 32 / (32 + 256))
    with pytest.raises(ValueError, match="no validation sample"):
        quick_dice(_FixedMasks(masks, torch.tensor([0.1, 0.9, 0.5])), [])


def test_a_resumed_run_ends_with_the_weights_of_the_uninterrupted_one(cases, tmp_path):
    """Samples and clicks come from random streams numbered by the step: stopping and resuming changes nothing."""
    cfg = TrainConfig(steps=4, batch_size=2, log_every=1, save_every=2, warmup=1)
    torch.manual_seed(0)
    whole = build_model("lite")
    train(whole, cases, tmp_path / "whole.pt", cfg, keep_resume_state=True)
    torch.manual_seed(0)
    halves = build_model("lite")
    stopped = train(halves, cases, tmp_path / "halves.pt", cfg, keep_resume_state=True, should_stop=lambda: True)
    assert stopped["train_state"]["step"] == 1
    loaded, meta = load_model(tmp_path / "halves.pt")
    train(loaded, cases, tmp_path / "halves.pt", cfg, resume=meta["train_state"], keep_resume_state=True)
    a = torch.load(resume_state_path(tmp_path / "whole.pt"), weights_only=True)["model"]
    b = torch.load(resume_state_path(tmp_path / "halves.pt"), weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_corrective_decodes_see_no_padding_prompts():
    """Samples with different numbers of prompts (a box's two corners and a point; one that needed no click) are
    decoded as each would be alone, as the predictor decodes them."""
    from raps3d.modeling import BOX_MAX, BOX_MIN, NEGATIVE, POSITIVE
    from raps3d.training.train import collate_prompts, decode_by_prompt_count

    torch.manual_seed(0)
    model = build_model("lite").eval()
    shape = tuple(model.config.input_shape)
    with torch.no_grad():
        features = model.encode(torch.rand(3, 1, *shape))
        coords = [np.array([[10.0, 40, 40], [20, 80, 90], [15, 60, 60]]), np.array([[16.0, 64, 64]]),
                  np.array([[12.0, 50, 70], [14, 52, 72]])]
        labels = [np.array([BOX_MIN, BOX_MAX, NEGATIVE]), np.array([POSITIVE]), np.array([POSITIVE, NEGATIVE])]
        previous = torch.randn(3, *model.config.mask_shape)
        logits, iou = decode_by_prompt_count(model, features, coords, labels, previous, "cpu")
        for i in range(3):
            c, lab = collate_prompts([coords[i]], [labels[i]])
            alone = model.decode(features.map(lambda t: t[i:i + 1]), c, lab, previous[i:i + 1, None], False)
            torch.testing.assert_close(logits[i], alone[0][0])
            torch.testing.assert_close(iou[i], alone[1][0])
