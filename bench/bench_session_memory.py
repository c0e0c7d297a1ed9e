"""Memory of one interactive object as clicks accumulate, and the cost of undo.

On a real CT resampled to 512 x 512 x 300 (as in bench_predictor.py), one object gets a box on the liver and then
corrective clicks (the evaluation protocol's: the centre of the largest error region; a random liver voxel once the
mask has none left). Prints the process's resident memory (after freed memory is handed back) after some of the
clicks, and how long an undo takes
(the undo history keeps low-resolution logits; the mask is rebuilt on undo).

    python bench/bench_session_memory.py [--clicks 40] [--model model/raps3d_lite.pt]
"""

from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

import numpy as np

from bench_predictor import volumes
from raps3d import Engine, ImageState, InteractiveObject, load_model
from raps3d.training.clicks import corrective_click, largest_slice_box


def resident_mb() -> float:
    """Resident memory after the C allocator has handed freed memory back: the click simulation's full-volume
    temporaries, freed but kept mapped by glibc, would otherwise read as memory the object holds."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the reading includes what the allocator keeps
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "model" / "raps3d_lite.pt"))
    p.add_argument("--clicks", type=int, default=40)
    args = p.parse_args()
    volume, spacing, liver = volumes()["CT resampled 512x512x300"]
    engine = Engine(load_model(args.model)[0])
    obj = InteractiveObject(ImageState(engine, volume, spacing))
    rng = np.random.default_rng(0)
    inside = np.argwhere(liver)
    result = obj.add_box(*largest_slice_box(liver))
    rows = [(1, resident_mb())]
    for n in range(2, args.clicks + 1):
        click = corrective_click(result.full_mask().astype(bool), liver)
        point, positive = click if click is not None else (inside[rng.integers(len(inside))], True)
        t = time.perf_counter()
        result = obj.add_point(tuple(int(c) for c in point), positive=positive)
        edit_s = time.perf_counter() - t
        if n in (10, 20, 40) or n == args.clicks:
            rows.append((n, resident_mb()))
    t = time.perf_counter()
    obj.undo()
    undo_s = time.perf_counter() - t
    print(f"{'interactions':>12s} {'resident MB':>11s}")
    for n, mb in rows:
        print(f"{n:12d} {mb:11.0f}")
    print(f"last edit: {edit_s:.3f} s; undo: {undo_s:.3f} s (mask rebuilt from the stored logits); "
          f"region {'x'.join(map(str, result.roi.size))} voxels")


if __name__ == "__main__":
    main()
