"""Memory a train task holds per labelled CT, and the time to draw a training sample from it.

A real abdominal CT (TotalSegmentator's example, stored as 32-bit integers) and nine of its organ labels, resampled
to 512 x 512 x 300, are read the way the app's train task reads a saved label: the image compacted to int16 and each
label kept as its bounding box. Prints what that holds against full-volume masks in the file's own type (how the
cases were held before: "as read"), and the time to draw a sample (zoom-out and zoom-in, box or point prompts).

    python bench/bench_training_memory.py [--samples 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from raps3d.modeling import build_model
from raps3d.training.data import TOTALSEG_NAMES, Case, Structure, data_root, read_zyx
from raps3d.training.sampling import compact_volume, make_sample

LARGE_SHAPE = (300, 512, 512)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=200)
    args = p.parse_args()
    folder = data_root() / "totalsegmentator"
    ct, spacing = read_zyx(folder / "example_ct.nii.gz")
    label = read_zyx(folder / "example_seg_fast_force_split.nii.gz")[0]
    factors = [n / s for n, s in zip(LARGE_SHAPE, ct.shape)]
    volume = ndimage.zoom(ct, factors, order=1)  # the file's own type (int32)
    label = ndimage.zoom(label, factors, order=0)
    spacing = tuple(s / f for s, f in zip(spacing, factors))

    t = time.perf_counter()
    structures = {name: Structure.from_mask(label == value) for value, name in TOTALSEG_NAMES.items()
                  if (label == value).any()}
    case = Case("example_ct", "totalsegmentator", compact_volume(volume), spacing, structures)
    read_s = time.perf_counter() - t
    boxes = sum(s.crop.nbytes for s in structures.values())

    config = build_model("lite").config
    rng = np.random.default_rng(0)
    names = sorted(structures)
    t = time.perf_counter()
    drawn = 0
    while drawn < args.samples:
        drawn += make_sample(case, names[drawn % len(names)], config, rng) is not None
    sample_s = (time.perf_counter() - t) / args.samples

    mb = 1e6
    print(f"CT {'x'.join(map(str, volume.shape[::-1]))} ({volume.dtype}), {len(structures)} labels; MB held per case:")
    print(f"{'':<12s} {'image':>8s} {'labels':>8s} {'total':>8s}")
    for what, image, labels in (("now", case.volume.nbytes, boxes),  # int16; bounding boxes
                                ("as read", volume.nbytes, len(structures) * volume.size)):  # full-volume masks
        print(f"{what:<12s} {image / mb:8.0f} {labels / mb:8.0f} {(image + labels) / mb:8.0f}")
    print(f"labels -> structures: {read_s:.2f} s; one training sample: {sample_s * 1000:.0f} ms "
          f"(mean of {args.samples}; 35 % zoom-out, half box and half point prompts)")


if __name__ == "__main__":
    main()
