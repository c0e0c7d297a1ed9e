"""The training and validation cases in one compact file, to train where the data folder or its image readers are
not at hand (a GPU node, say).

Intensities are stored as 8 bits over the HU range that training can see (``augmented_hu_range``: every window
clips what lies beyond it); a step is under 7 HU, below CT noise. Structures are stored as packed bits.

    python -m raps3d.training.packed --out runs/cases.npz
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .data import Case, data_root, training_cases, validation_cases
from .sampling import augmented_hu_range

# v2: volumes in the model's orientation (``raps3d.orientation``); v1 files hold them as stored, and are refused.
FORMAT = "raps3d-packed-cases-v2"
LEVELS = 255


def _quantize(volume: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = (np.clip(volume.astype(np.float32), lo, hi) - lo) * (LEVELS / (hi - lo))
    return np.rint(scaled).astype(np.uint8)


def _dequantize(q: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.rint(q.astype(np.float32) * ((hi - lo) / LEVELS) + lo).astype(np.int16)


def save_packed(path: str | Path, splits: dict[str, list[Case]]) -> Path:
    """Write ``{split name: cases}`` to ``path`` (a compressed .npz)."""
    lo, hi = augmented_hu_range()
    arrays, index = {}, []
    for split, cases in splits.items():
        for case in cases:
            i = len(index)
            names = sorted(case.structures)
            arrays[f"volume_{i}"] = _quantize(case.volume, lo, hi)
            arrays[f"masks_{i}"] = np.packbits(np.stack([case.structures[n].full() for n in names]).astype(bool))
            index.append({"split": split, "name": case.name, "dataset": case.dataset, "shape": case.volume.shape,
                          "spacing": case.spacing, "structures": names})
    header = {"format": FORMAT, "hu_range": [lo, hi], "cases": index}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, header=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
    return path


def load_packed(path: str | Path) -> dict[str, list[Case]]:
    """The cases of a file written by ``save_packed``, as ``{split name: cases}``."""
    with np.load(path) as f:
        header = json.loads(f["header"].tobytes())
        if header.get("format") == "raps3d-packed-cases-v1":
            raise ValueError(f"{path} holds the volumes as their files store them, from before training read them in "
                             "the model's orientation; pack the data again "
                             "(python -m raps3d.training.packed --out FILE)")
        if header.get("format") != FORMAT:
            raise ValueError(f"{path} is not a packed case file ({FORMAT!r} expected)")
        lo, hi = header["hu_range"]
        splits: dict[str, list[Case]] = {}
        for i, entry in enumerate(header["cases"]):
            shape = tuple(entry["shape"])
            names = entry["structures"]
            bits = np.unpackbits(f[f"masks_{i}"], count=len(names) * int(np.prod(shape))).astype(bool)
            masks = bits.reshape(len(names), *shape)
            case = Case(entry["name"], entry["dataset"], _dequantize(f[f"volume_{i}"], lo, hi),
                        tuple(entry["spacing"]), {n: masks[k] for k, n in enumerate(names)})
            splits.setdefault(entry["split"], []).append(case)
    return splits


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Pack the data folder's training and validation cases into one file.")
    p.add_argument("--out", required=True, help="file to write (.npz)")
    p.add_argument("--limit", type=int, default=None, help="at most this many cases per dataset")
    args = p.parse_args(argv)
    t = time.perf_counter()
    out = save_packed(args.out, {"training": training_cases(args.limit), "validation": validation_cases(args.limit)})
    print(f"packed {data_root()} into {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
