"""python -m raps3d.training: train (or continue training) a Raps-3D model on the real CT data folder."""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, init_model, load_model
from ..modeling import build_model
from .data import data_root, training_cases, validation_cases
from .packed import load_packed
from .train import DATASET_WEIGHTS, TrainConfig, train
from .validation import fixed_samples, quick_dice


def parse_weights(text: str) -> dict[str, float]:
    """'openkbp=0.6,lidc=0.3' -> {'openkbp': 0.6, 'lidc': 0.3}"""
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not name.strip() or weight < 0:
            raise SystemExit(f"--dataset-weights: expected name=weight (weight >= 0), got {part!r}")
        weights[name.strip()] = weight
    if not weights or sum(weights.values()) <= 0:
        raise SystemExit("--dataset-weights: at least one dataset needs a positive weight")
    return weights


def weights_for(weights: dict[str, float] | None, datasets: set[str]) -> dict[str, float]:
    """The draw weight of each dataset in the training data: the defaults, or the weights given, where a dataset
    left out is not drawn and a name that matches no dataset (most likely misspelt) is an error."""
    if weights is None:
        return {d: DATASET_WEIGHTS.get(d, 1.0) for d in sorted(datasets)}
    unknown = sorted(set(weights) - datasets)
    if unknown:
        raise SystemExit(f"--dataset-weights: no training case from {', '.join(unknown)} (the training data hold "
                         f"{', '.join(sorted(datasets))})")
    resolved = {d: weights.get(d, 0.0) for d in sorted(datasets)}
    if sum(resolved.values()) <= 0:
        raise SystemExit("--dataset-weights: at least one dataset of the training data needs a positive weight")
    return resolved


def at_least(low, kind=int):
    """An argparse type: a number of ``kind`` no smaller than ``low`` (a clear usage error otherwise)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'whole ' if kind is int else ''}number, got {text!r}")
        if not (value >= low and math.isfinite(value)):  # also refuses NaN and infinity
            raise argparse.ArgumentTypeError(f"must be a finite number of at least {low}, got {text}")
        return value
    return parse


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", help="model configuration (lite or segvol) of a new model (default lite), or, with "
                                    "--init, the configuration to fine-tune the checkpoint into (it may add the "
                                    "detail path the checkpoint lacks)")
    p.add_argument("--out", required=True, help="checkpoint to write (and to resume from with --resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue from --out if it exists (exactly, with the fp32 weights and AdamW state that "
                        "each save keeps beside it in OUT.resume)")
    p.add_argument("--init", help="start from the weights of this checkpoint (fine-tuning)")
    p.add_argument("--steps", type=at_least(1), default=2000, help="total steps (a resumed run continues up to this)")
    p.add_argument("--batch-size", type=at_least(1), default=4)
    p.add_argument("--lr", type=at_least(1e-12, float), default=1e-4)
    p.add_argument("--limit", type=at_least(1), default=None, help="use at most this many cases per dataset")
    p.add_argument("--val-samples", type=at_least(0), default=48, help="0: no validation")
    p.add_argument("--threads", type=at_least(0), default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--save-every", type=at_least(1), default=100)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (change it when fine-tuning a model again)")
    p.add_argument("--packed", help="read the cases from this file (written by raps3d.training.packed) instead of "
                                     "the data folder; --limit then applies when packing")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a GPU when there is one)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass (GPU or CPU)")
    p.add_argument("--workers", type=at_least(0), default=0, help="processes drawing training samples (0: none)")
    p.add_argument("--mid-zoom-fraction", type=at_least(0.0, float), default=0.0,
                   help="share of samples in the predictor's intermediate view, a cube around the structure "
                        "(taken from the zoom-in share; 0 draws the same samples as before this option)")
    p.add_argument("--fresh-lr-scale", type=at_least(0.0, float), default=TrainConfig.fresh_lr_scale,
                   help="learning-rate factor of layers the --init checkpoint lacks")
    p.add_argument("--freeze", nargs="*", default=[], metavar="PREFIX",
                   help="do not train parameters whose names start with these (e.g. image_encoder.)")
    p.add_argument("--dataset-weights",
                   help="how often each dataset is drawn, as name=weight pairs; datasets left out are not drawn "
                        "(default: " + ",".join(f"{k}={v}" for k, v in DATASET_WEIGHTS.items()) + ")")
    args = p.parse_args(argv)
    weights = parse_weights(args.dataset_weights) if args.dataset_weights is not None else None
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.mid_zoom_fraction > 1:
        p.error(f"--mid-zoom-fraction: must be at most 1, got {args.mid_zoom_fraction}")
    out = Path(args.out)
    resume, fresh = None, []
    if args.resume and out.exists():
        try:
            model, meta = load_model(out)
        except CheckpointError as e:
            raise SystemExit(f"--resume: {e}; remove it (or give another --out) to start again") from None
        resume, fresh = meta.get("train_state"), meta.get("fresh", [])
        if resume and resume["step"] >= args.steps:
            raise SystemExit(f"--resume: {out} is at step {resume['step']} already; give --steps above it to train "
                             "on")
        print(f"resuming from {out} at step {resume['step'] if resume else 0}", flush=True)
    elif args.init:
        try:
            if args.config:
                model, fresh = init_model(args.init, args.config)
                meta = {"init": str(args.init), "fresh": fresh}
            else:
                model, meta = load_model(args.init)
                meta = {"init": str(args.init)}
        except CheckpointError as e:
            raise SystemExit(f"--init: {e}") from None
    else:
        model, meta = build_model(args.config or "lite"), {}
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the ViT's matrix products: TF32 is ample for training
    model.to(device)
    t = time.perf_counter()
    if args.packed:
        if not Path(args.packed).is_file():
            raise SystemExit(f"--packed: no file at {args.packed}")
        try:
            splits = load_packed(args.packed)
        except (OSError, ValueError, KeyError) as e:  # not an archive, or not one that packed wrote
            raise SystemExit(f"--packed: cannot read {args.packed} as packed cases ({type(e).__name__}: {e})") \
                from None
        cases, val = splits.get("training", []), splits.get("validation", [])
        source = args.packed
    else:
        if not data_root().is_dir():
            raise SystemExit(f"no data folder at {data_root()}: set RAPS3D_DATA, or train from --packed cases")
        cases, val = training_cases(args.limit), validation_cases(args.limit)
        source = data_root()
    print(f"data from {source}: {len(cases)} training cases, {len(val)} validation cases, "
          f"loaded in {time.perf_counter() - t:.0f} s; training on {device}", flush=True)
    weights = weights_for(weights, {c.dataset for c in cases})
    val_samples = fixed_samples(val, model.config, args.val_samples)
    meta.update({
        "data": {"training": sorted({c.dataset for c in cases}), "training_cases": len(cases),
                 "validation_cases": len(val), "dataset_weights": weights},
        "command": "python -m raps3d.training " + " ".join(argv or __import__("sys").argv[1:]),
        "hardware": (torch.cuda.get_device_name(device) if device.type == "cuda" else
                     f"{platform.processor() or platform.machine()} CPU, torch threads {torch.get_num_threads()}"),
    })
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, save_every=args.save_every,
                      seed=args.seed, workers=args.workers, mid_zoom_fraction=args.mid_zoom_fraction,
                      bf16=args.bf16, fresh_lr_scale=args.fresh_lr_scale,
                      freeze=tuple(args.freeze))
    meta = train(model, cases, out, cfg, validate=(lambda m: quick_dice(m, val_samples)) if val_samples else None,
                 resume=resume, dataset_weights=weights, meta=meta, keep_resume_state=True, fresh=fresh)
    print(json.dumps(meta["train_state"]["history"][-1]), flush=True)


if __name__ == "__main__":
    main()
