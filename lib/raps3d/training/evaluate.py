"""The paper's Table 1 protocol on held-out volumes, through the predictor's real interaction path.

For each structure: (1) one 2D box, the tight box of the reference on its largest slice; (2) one positive point at
the structure's centre (maximum of the distance transform in mm; of equally deep voxels, the one nearest the
centroid). Then 3 corrective clicks, each at the centre of the largest error region (positive in a region of missed
voxels, negative in a region of wrongly added ones; the two kinds are separate regions), as edits of the same object.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_model
from ..engine import Engine
from ..predictor import ImageState, InteractiveObject
from .clicks import centre_point, corrective_click, largest_slice_box
from .data import Case, lidc_cases, openkbp_cases

EDITS = 3


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / s) if s else 1.0


def evaluate_structure(image: ImageState, reference: np.ndarray, prompt: str) -> tuple[list[float], list[float]]:
    """Dice after the first prompt and after each edit, and the seconds each interaction took."""
    obj = InteractiveObject(image)
    t = time.perf_counter()
    if prompt == "box":
        z, a, b = largest_slice_box(reference)
        result = obj.add_box(z, a, b)
    else:
        result = obj.add_point(tuple(centre_point(reference, image.spacing)))
    seconds = [time.perf_counter() - t]
    mask = result.full_mask().astype(bool)
    dices = [dice(mask, reference)]
    for _ in range(EDITS):
        click = corrective_click(mask, reference, image.spacing)
        if click is None:
            dices.append(dices[-1])
            continue
        t = time.perf_counter()
        result = obj.add_point(tuple(click[0]), positive=click[1])
        seconds.append(time.perf_counter() - t)
        mask = result.full_mask().astype(bool)
        dices.append(dice(mask, reference))
    return dices, seconds


def evaluate(engine: Engine, cases: list[Case]) -> list[dict]:
    rows = []
    for case in cases:
        image = ImageState(engine, case.volume, case.spacing)
        for name, structure in sorted(case.structures.items()):
            reference = structure.full()
            for prompt in ("box", "point"):
                dices, seconds = evaluate_structure(image, reference, prompt)
                rows.append({"dataset": case.dataset, "case": case.name, "structure": name, "prompt": prompt,
                             "dice": dices, "seconds": seconds})
    return rows


def summarise(rows: list[dict]) -> dict:
    """Mean Dice per (dataset, structure, prompt) and overall per prompt, after 0..EDITS edits."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["structure"], r["prompt"])].append(r["dice"])
        groups[("all", "all", r["prompt"])].append(r["dice"])
        groups[(r["dataset"], "all", r["prompt"])].append(r["dice"])
    table = {" / ".join(k): np.mean(v, axis=0).round(4).tolist() + [len(v)] for k, v in sorted(groups.items())}
    seconds = [s for r in rows for s in r["seconds"]]
    first = [r["seconds"][0] for r in rows]
    edits = [s for r in rows for s in r["seconds"][1:]]
    return {"dice": table, "seconds_first_median": float(np.median(first)),
            "seconds_edit_median": float(np.median(edits)) if edits else None, "interactions": len(seconds)}


def format_table(summary: dict) -> str:
    lines = [f"{'dataset / structure / prompt':48s} {'n':>4s} " + " ".join(f"{f'{k} edits':>8s}" for k in range(EDITS + 1))]
    for key, values in summary["dice"].items():
        *d, n = values
        lines.append(f"{key:48s} {n:4d} " + " ".join(f"{v:8.3f}" for v in d))
    lines.append(f"median seconds: first prompt {summary['seconds_first_median']:.3f}, "
                 f"edit {summary['seconds_edit_median']:.3f} ({summary['interactions']} interactions)")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, values in summary["dice"].items():
        if key.split(" / ")[1] == "all":
            ax.plot(range(EDITS + 1), values[:-1], marker="o", label=key.replace(" / all", ""))
    ax.set_xlabel("corrective clicks")
    ax.set_ylabel("mean Dice")
    ax.set_xticks(range(EDITS + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None, default_model: str | None = None) -> None:
    p = argparse.ArgumentParser(description="Evaluate a Raps-3D checkpoint with the paper's protocol.")
    p.add_argument("--model", required=default_model is None, default=default_model,
                   help="checkpoint" + (f" (default {default_model})" if default_model else ""))
    p.add_argument("--openkbp", type=int, default=None, help="number of OpenKBP validation patients (default all)")
    p.add_argument("--lidc", type=int, default=None, help="number of held-out LIDC nodules (default all)")
    p.add_argument("--out", help="write rows and summary as JSON here (and a plot beside it)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    cases = openkbp_cases("validation", args.openkbp) + lidc_cases(True, args.lidc)
    rows = evaluate(Engine(model), cases)
    summary = summarise(rows)
    print(format_table(summary))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
        plot(summary, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
