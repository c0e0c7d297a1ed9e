"""The training loop: batches of simulated interactions, Dice + BCE + IoU-head loss, resumable, atomic publishing.

Each step: encode a batch of zoom-out/zoom-in samples, decode their first prompt, then simulate 0-4 corrective
clicks (the centre of the largest error region, with the previous logits as mask prompt), and back-propagate the loss
of the first and the last prediction.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..checkpoint import remove_stale_writes, save_atomic, save_model
from ..modeling import NEGATIVE, POSITIVE, Raps3D
from .clicks import corrective_click
from .data import Case
from .sampling import Sample, make_sample


# How often each dataset is drawn (a dataset not named here: weight 1).
DATASET_WEIGHTS = {"openkbp": 0.45, "lidc": 0.3, "totalsegmentator": 0.25}


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.01
    max_clicks: int = 4
    warmup: int = 50
    seed: int = 0
    log_every: int = 10
    save_every: int = 100
    workers: int = 0  # processes drawing samples while the model trains (0: draw them between steps)
    mid_zoom_fraction: float = 0.0  # share of samples in the predictor's intermediate view (taken from zoom-in's)
    bf16: bool = False  # forward pass under bfloat16 autocast (faster on GPUs that have it); weights stay fp32
    fresh_lr_scale: float = 10.0  # learning rate factor of parameters new to a fine-tuned model (train's fresh)
    freeze: tuple[str, ...] = ()  # parameters whose names start with one of these are not trained


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice + BCE per item: logits and target (B, M, ...) -> (B, M)."""
    prob = logits.sigmoid().flatten(2)
    t = target.flatten(2)
    dice = 1 - (2 * (prob * t).sum(-1) + 1) / (prob.sum(-1) + t.sum(-1) + 1)
    bce = F.binary_cross_entropy_with_logits(logits.flatten(2), t, reduction="none").mean(-1)
    return dice + bce


def hard_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred = (logits > 0).flatten(2).float()
    t = target.flatten(2)
    inter = (pred * t).sum(-1)
    union = pred.sum(-1) + t.sum(-1) - inter
    return inter / union.clamp(min=1)


def prediction_loss(model_out: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's rule for several outputs: train only the best one; the IoU head learns every output's real IoU.
    Also returns the output the IoU head picks, as the predictor does: the mask the next click corrects."""
    logits, iou_pred = (x.float() for x in model_out)  # losses in fp32 also under autocast
    t = target[:, None].expand_as(logits).float()
    seg = segmentation_loss(logits, t)
    best = seg.argmin(1)
    rows = torch.arange(len(best))
    iou_loss = F.mse_loss(iou_pred, hard_iou(logits.detach(), t))
    return seg[rows, best].mean() + iou_loss, logits[rows, iou_pred.detach().argmax(1)].detach()


def pick_samples(cases: list[Case], n: int, config, rng: np.random.Generator, dataset_weights: dict,
                 mid_zoom_fraction: float = 0.0) -> list[Sample]:
    by_dataset: dict[str, list[Case]] = {}
    for c in cases:
        by_dataset.setdefault(c.dataset, []).append(c)
    names = sorted(by_dataset)
    weights = np.array([dataset_weights.get(d, 1.0) for d in names], dtype=np.float64)
    weights /= weights.sum()
    out = []
    while len(out) < n:
        group = by_dataset[names[rng.choice(len(names), p=weights)]]
        case = group[rng.integers(len(group))]
        structure = sorted(case.structures)[rng.integers(len(case.structures))]
        sample = make_sample(case, structure, config, rng, mid_zoom_fraction=mid_zoom_fraction)
        if sample is not None:
            out.append(sample)
    return out


class SampleStream(torch.utils.data.IterableDataset):
    """Endless batches of samples, batch ``first``, ``first + 1``, ... Each batch is drawn from a random stream of
    its own number, so a run resumed at a step draws the batches the uninterrupted run would have, with or without
    worker processes (the data loader takes their batches in turn)."""

    def __init__(self, cases: list[Case], config, batch_size: int, seed: list[int], dataset_weights: dict,
                 mid_zoom_fraction: float = 0.0, first: int = 0):
        self.cases, self.config, self.batch_size = cases, config, batch_size
        self.seed, self.dataset_weights, self.mid_zoom_fraction = seed, dataset_weights, mid_zoom_fraction
        self.first = first

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        index, stride = (worker.id, worker.num_workers) if worker else (0, 1)
        for number in itertools.count(self.first + index, stride):
            rng = np.random.default_rng([*self.seed, number])
            yield pick_samples(self.cases, self.batch_size, self.config, rng, self.dataset_weights,
                               self.mid_zoom_fraction)


def _as_is(batch):
    return batch


def sample_batches(stream: SampleStream, workers: int):
    """Iterate ``stream`` here, or in ``workers`` forked processes (they share the cases' memory)."""
    if workers == 0:
        return iter(stream)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_as_is,
                                         prefetch_factor=4, multiprocessing_context="fork")
    return iter(loader)


def collate_prompts(coords: list[np.ndarray], labels: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(c) for c in coords)
    c = np.zeros((len(coords), n, 3), np.float32)
    lab = np.full((len(coords), n), -1, np.int64)
    for i, (ci, li) in enumerate(zip(coords, labels)):
        c[i, :len(ci)] = ci
        lab[i, :len(li)] = li
    return torch.from_numpy(c), torch.from_numpy(lab)


def grid_to_input(points: np.ndarray, mask_shape, input_shape) -> np.ndarray:
    """Decoder-grid voxel -> network input coordinates (the same align_corners=False convention as frames)."""
    return (points + 0.5) * np.asarray(input_shape) / np.asarray(mask_shape) - 0.5


@functools.lru_cache(maxsize=1)
def _click_pool() -> ThreadPoolExecutor:
    """Threads for the simulated clicks of a batch: scipy's labelling and distance transform release the GIL."""
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="clicks")


def decode_by_prompt_count(model: Raps3D, features, coords: list[np.ndarray], labels: list[np.ndarray],
                           logits_prev: torch.Tensor, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder pass per group of samples with as many prompts (a box has two corners, a point one; a sample
    that needed no click has one fewer): padding would add "not a point" tokens that the decoder attends to, which
    the predictor never sends. Outputs in the samples' order."""
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(coords):
        groups.setdefault(len(c), []).append(i)
    order, logits, iou = [], [], []
    for idx in groups.values():
        c, lab = collate_prompts([coords[i] for i in idx], [labels[i] for i in idx])
        out = model.decode(features.map(lambda t: t[idx]), c.to(dev), lab.to(dev), logits_prev[idx][:, None], False)
        order += idx
        logits.append(out[0])
        iou.append(out[1])
    inverse = torch.argsort(torch.tensor(order)).to(dev)
    return torch.cat(logits)[inverse], torch.cat(iou)[inverse]


def train_step(model: Raps3D, samples: list[Sample], rng: np.random.Generator, max_clicks: int
               ) -> tuple[torch.Tensor, dict]:
    cfg = model.config
    dev = next(model.parameters()).device
    image = torch.from_numpy(np.stack([s.image for s in samples]))[:, None].to(dev)
    target = torch.from_numpy(np.stack([s.target for s in samples])).to(dev)
    features = model.encode(image)
    # Point-only and box samples need different output heads: decode the two groups separately.
    groups = [[i for i, s in enumerate(samples) if s.multimask == m] for m in (True, False)]
    first_loss, logits_prev = 0.0, torch.zeros(len(samples), *cfg.mask_shape, device=dev)
    for multimask, idx in zip((True, False), groups):
        if not idx:
            continue
        c, lab = collate_prompts([samples[i].coords for i in idx], [samples[i].labels for i in idx])
        selected = features.map(lambda t: t[idx])
        loss, best = prediction_loss(model.decode(selected, c.to(dev), lab.to(dev), None, multimask), target[idx])
        first_loss = first_loss + loss * len(idx) / len(samples)
        logits_prev[idx] = best
    coords = [s.coords.copy() for s in samples]
    labels = [s.labels.copy() for s in samples]
    n_clicks = int(rng.integers(0, max_clicks + 1))
    if n_clicks == 0:
        return first_loss, {"first": float(first_loss.detach()), "clicks": 0}
    for k in range(n_clicks):
        pred = (logits_prev > 0).cpu().numpy()
        clicks = _click_pool().map(corrective_click, list(pred), [s.target for s in samples])
        for i, click in enumerate(clicks):
            if click is not None:
                point, positive = click
                coords[i] = np.concatenate([coords[i], grid_to_input(point, cfg.mask_shape, cfg.input_shape)[None]])
                labels[i] = np.append(labels[i], POSITIVE if positive else NEGATIVE)
        last = k == n_clicks - 1
        with torch.set_grad_enabled(last):
            feats = features if last else features.map(torch.Tensor.detach)
            out = decode_by_prompt_count(model, feats, coords, labels, logits_prev, dev)
        if last:
            edit_loss, _ = prediction_loss(out, target)
        else:
            logits_prev = out[0][:, 0].detach()
    return first_loss + edit_loss, {"first": float(first_loss.detach()), "edit": float(edit_loss.detach()),
                                    "clicks": n_clicks}


def resume_state_path(out_path: str | Path) -> Path:
    """Where a run keeps what an exact resume needs beyond its fp16 checkpoint: fp32 weights, AdamW's moments."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".resume")


def _restore_resume_state(model: Raps3D, opt: torch.optim.Optimizer, path: Path, step: int, lr: float,
                          token: str | None = None) -> None:
    """Loads the resume state saved with the checkpoint being resumed: its step, and (from checkpoints that record
    one) the token both were saved with, must match, or the state is another run's (a copied or renamed file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
    except Exception as e:  # truncated or foreign file: the checkpoint alone still allows a resume
        print(f"ignoring {path}: {e}", flush=True)
        state = None
    if state and token is not None and state.get("token") != token:
        print(f"ignoring {path}: it was saved with another checkpoint than the one resumed", flush=True)
        state = None
    if not state or state.get("step") != step:
        print(f"no resume state for step {step} at {path}: continuing from the checkpoint's fp16 weights with "
              "fresh AdamW moments", flush=True)
        return
    try:
        opt.load_state_dict(state["optimizer"])
    except ValueError as e:  # other parameters trained than in the stopped run (another --freeze)
        print(f"not using {path}: {e}; continuing from the checkpoint's fp16 weights with fresh AdamW moments",
              flush=True)
        return
    model.load_state_dict(state["model"])
    for group in opt.param_groups:  # this run's learning rate and schedule, not the stored ones
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group.pop("initial_lr", None)


def _world() -> tuple[int, int]:
    """(rank, world size) of a torch.distributed run, (0, 1) otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _average_gradients(model: Raps3D, world: int) -> None:
    """Data parallelism: every process trains on its own samples; gradients are averaged before each step."""
    if world == 1:
        return
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def parameter_groups(model: Raps3D, fresh, cfg: TrainConfig) -> list[dict]:
    """The trained parameters (all but ``cfg.freeze``) in groups: those new to a fine-tuned model (layers its
    starting checkpoint lacked) learn ``fresh_lr_scale`` times faster, as they start from nothing."""
    fresh = set(fresh)
    params = {}
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(tuple(cfg.freeze)))
        if p.requires_grad:
            params[name] = p
    if not params:
        raise ValueError(f"--freeze {' '.join(cfg.freeze)} leaves nothing to train")
    groups = [{"params": [p for n, p in params.items() if n not in fresh], "lr_scale": 1.0}]
    if fresh & params.keys():
        groups.append({"params": [p for n, p in params.items() if n in fresh], "lr_scale": cfg.fresh_lr_scale})
    for group in groups:
        group["lr"] = cfg.lr * group["lr_scale"]
    return groups


def train(model: Raps3D, cases: list[Case], out_path: str | Path, cfg: TrainConfig,
          validate: Callable[[Raps3D], float] | None = None, resume: dict | None = None,
          dataset_weights: dict | None = None, progress: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None, meta: dict | None = None,
          keep_resume_state: bool = False, fresh: Collection[str] = ()) -> dict:
    """Train ``model`` in place; checkpoints (fp16) go to ``out_path`` every ``save_every`` steps and at the end.

    ``resume`` is a previous run's ``meta['train_state']``: the step count, schedule and history continue.
    ``fresh`` names parameters the starting checkpoint lacked: they learn ``cfg.fresh_lr_scale`` times faster.
    With ``keep_resume_state`` each save also writes the fp32 weights and AdamW's moments beside the checkpoint
    (``resume_state_path``), and a resumed run that finds them for its step continues exactly; without them it
    continues from the fp16 weights with fresh moments.
    Returns the final metadata (also stored in the checkpoint).
    Inside a torch.distributed process group each process draws its own samples, gradients are averaged, and only
    rank 0 validates, reports and writes checkpoints (the batch size is per process).
    """
    rank, world = _world()
    step0, elapsed0, history = 0, 0.0, []
    if resume:
        step0 = resume["step"]
        elapsed0 = resume.get("seconds", 0.0)
        history = resume.get("history", [])
    weights = dataset_weights or DATASET_WEIGHTS
    # Every step's randomness (its samples, then its clicks) comes from streams numbered by the step: a resumed run
    # goes on as the uninterrupted one would have.
    stream = SampleStream(cases, model.config, cfg.batch_size, [cfg.seed, rank, 1], weights, cfg.mid_zoom_fraction,
                          first=step0 + 1)
    batches = sample_batches(stream, cfg.workers)
    torch.manual_seed(cfg.seed)
    if world > 1:  # start every process from rank 0's weights
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    opt = torch.optim.AdamW(parameter_groups(model, fresh, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state_path = resume_state_path(out_path)
    if rank == 0:  # the one writer of these files: what a killed run left half-written goes
        remove_stale_writes(out_path)
        remove_stale_writes(state_path)
    if resume and keep_resume_state:
        _restore_resume_state(model, opt, state_path, step0, cfg.lr, resume.get("resume_token"))

    def schedule(s: int) -> float:  # linear warm-up, then cosine decay to 0 at cfg.steps
        s += step0
        return min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    meta = dict(meta or {})
    lead = rank == 0
    device_type = next(model.parameters()).device.type
    t0, running, waited = time.perf_counter(), [], 0.0
    model.train()
    step = step0
    for step in range(step0 + 1, cfg.steps + 1):
        t_wait = time.perf_counter()
        samples = next(batches)
        waited += time.perf_counter() - t_wait
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, info = train_step(model, samples, np.random.default_rng([cfg.seed, rank, 2, step]), cfg.max_clicks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _average_gradients(model, world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running.append(float(loss.detach()))
        if lead and (step % cfg.log_every == 0 or step == cfg.steps):
            # sample_wait: seconds per step spent waiting for samples (the rest is the model and the clicks)
            entry = {"step": step, "loss": float(np.mean(running)), "lr": sched.get_last_lr()[0],
                     "seconds": elapsed0 + time.perf_counter() - t0, "sample_wait": waited / len(running)}
            running, waited = [], 0.0
            if validate is not None and (step % cfg.save_every == 0 or step == cfg.steps):
                model.eval()
                entry["val_dice"] = validate(model)
                model.train()
            history.append(entry)
            print(json.dumps(entry), flush=True)
            if progress:
                progress(entry)
        stop = bool(should_stop and should_stop())
        if lead and (step % cfg.save_every == 0 or step == cfg.steps or stop):
            meta["train_state"] = {"step": step, "seconds": elapsed0 + time.perf_counter() - t0, "history": history}
            if keep_resume_state:  # first, so that a checkpoint never names a step its resume state lacks
                token = meta["train_state"]["resume_token"] = uuid.uuid4().hex  # pairs the two files
                save_atomic({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                             "token": token}, state_path)
            save_model(model, out_path, meta)
        if stop:
            break
    model.eval()
    meta["train_state"] = {**meta.get("train_state", {}), "step": step,
                           "seconds": elapsed0 + time.perf_counter() - t0, "history": history}
    return meta
