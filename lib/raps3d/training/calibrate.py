"""Choose a checkpoint's mask threshold on training cases, with the evaluation protocol.

A model trained with Dice + BCE on small structures tends to under-segment: the logit that best separates its
masks from the background can lie below 0. This command runs the paper's protocol (a box and a point, then corrective
clicks) on training volumes for a few candidate thresholds and stores the one with the best mean Dice in the
checkpoint. Only training cases are used, so the held-out evaluation stays untouched. Training from a checkpoint
(``--init``, the app's train task) keeps its threshold: run this again after a long training run.

    python -m raps3d.training.calibrate --model model/raps3d_lite.pt --out model/raps3d_lite.pt
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from ..checkpoint import load_model, save_model
from ..engine import Engine
from .data import Case, lidc_cases, openkbp_cases
from .evaluate import evaluate

CANDIDATES = (0.0, -0.75, -1.5, -2.25, -3.0)


def score(rows: list[dict]) -> float:
    """Mean Dice after the first prompt and after the last edit, over every structure and prompt type."""
    return float(np.mean([[r["dice"][0], r["dice"][-1]] for r in rows]))


def calibrate(engine: Engine, cases: list[Case], candidates=CANDIDATES) -> tuple[float, dict]:
    """The best threshold and each candidate's score."""
    scores = {}
    for t in candidates:
        engine.mask_threshold = float(t)
        scores[float(t)] = round(score(evaluate(engine, cases)), 4)
        print(json.dumps({"threshold": t, "score": scores[float(t)]}), flush=True)
    best = max(scores, key=lambda t: (scores[t], t))  # ties go to the threshold nearer 0
    return best, scores


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Store in a checkpoint the mask threshold that scores best on training "
                                            "cases (box and point prompts, then corrective clicks).")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="where to write the calibrated checkpoint (may be --model)")
    p.add_argument("--openkbp", type=int, default=8, help="OpenKBP training patients to use")
    p.add_argument("--lidc", type=int, default=30, help="LIDC training nodules to use")
    p.add_argument("--candidates", default=",".join(str(c) for c in CANDIDATES),
                   help="comma-separated logit thresholds to try")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    candidates = [float(c) for c in args.candidates.split(",")]
    model, meta = load_model(args.model)
    cases = openkbp_cases("train", args.openkbp) + lidc_cases(False, args.lidc)
    if not cases:
        raise SystemExit("no training cases found: set RAPS3D_DATA to the real CT folder")
    best, scores = calibrate(Engine(model), cases, candidates)
    model.mask_threshold.fill_(best)
    command = " ".join(["python -m raps3d.training.calibrate", *(sys.argv[1:] if argv is None else argv)])
    meta = {**meta, "calibration": {"mask_threshold": best, "scores": {str(k): v for k, v in scores.items()},
                                    "cases": [c.name for c in cases], "command": command}}
    save_model(model, args.out, meta)
    print(json.dumps({"mask_threshold": best, "out": args.out}))


if __name__ == "__main__":
    main()
