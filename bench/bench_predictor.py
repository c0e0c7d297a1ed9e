"""Latency of the Raps-3D predictor on real CT and on a large volume, for each model configuration.

Prints, per volume and configuration: the first prediction (zoom-out + zoom-in, on an image never seen before),
an edit inside the zoom-in region, an edit outside it; median and range over repeats; peak resident memory; and,
measured in the same run, the ratio against a SegVol-style sliding-window zoom-in and against an edit that re-encodes
(no feature cache). Every time includes pre-processing (resampling) and post-processing (the full-size mask).

    python bench/bench_predictor.py [--configs lite segvol] [--repeats 5] [--model model/raps3d_lite.pt]

The large volume is a real CT resampled to 512 x 512 x 300 (x, y, z). The 'segvol' configuration runs with random
weights and an empty-mask decoder (the region of interest then comes from the prompt alone): its figures are timings
only. CPU threads: torch's default unless --threads is given.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]

from raps3d import Engine, ImageState, InteractiveObject, load_model  # noqa: E402
from raps3d.modeling import build_model  # noqa: E402
from raps3d.sliding_window import sliding_window_zoom_in  # noqa: E402
from raps3d.training.clicks import centre_point, largest_slice_box  # noqa: E402
from raps3d.training.data import data_root, read_zyx  # noqa: E402

LARGE_SHAPE = (300, 512, 512)


def volumes() -> dict:
    ts = data_root() / "totalsegmentator"
    ct, spacing = read_zyx(ts / "example_ct.nii.gz")
    liver = read_zyx(ts / "example_seg_fast_force_split.nii.gz")[0] == 5
    factors = [n / s for n, s in zip(LARGE_SHAPE, ct.shape)]
    large = ndimage.zoom(ct.astype(np.int16), factors, order=1)
    large_liver = ndimage.zoom(liver.astype(np.uint8), factors, order=0).astype(bool)
    large_spacing = tuple(sp / f for sp, f in zip(spacing, factors))
    return {"abdomen CT 122x101x112": (ct, spacing, liver), "CT resampled 512x512x300": (large, large_spacing, large_liver)}


def make_engine(config: str, model_path: str | None) -> Engine:
    if config == "lite" and model_path and Path(model_path).exists():
        return Engine(load_model(model_path)[0])
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        for mlp in model.mask_decoder.hypernetworks:  # empty masks: ROI from the prompt (timing only)
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.zero_()
    return Engine(model)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def stat(xs):
    return f"{statistics.median(xs):8.3f} [{min(xs):.3f}-{max(xs):.3f}]"


def bench_volume(engine: Engine, volume, spacing, reference, repeats: int) -> dict:
    z, a, b = largest_slice_box(reference)
    low = max(z - 2, 0)  # a slab of up to 5 slices around the box's slice
    centre = tuple(centre_point(reference[low:z + 3]) + np.array([low, 0, 0]))
    buffer = np.zeros(volume.shape, np.uint8)
    first, inside, outside, no_cache, sliding = [], [], [], [], []
    for r in range(repeats):
        image = ImageState(engine, volume, spacing)  # never seen: the zoom-out pass runs
        obj = InteractiveObject(image)
        t, _ = timed(lambda: obj.add_box(z, a, b).full_mask(buffer))
        first.append(t)
        zoom_out = obj.result.timings["zoom_out_encode"] + obj.result.timings["zoom_out_decode"]
        roi = obj.result.roi
        near = (min(max(centre[0], roi.start[0]), roi.stop[0] - 1), centre[1], centre[2])
        inside.append(timed(lambda: obj.add_point(near, positive=True).update(buffer))[0])
        assert obj.result.cache_hit
        far = tuple(min(s + 6, n - 1) if s + 6 < n else max(a0 - 6, 0)
                    for s, a0, n in zip(roi.stop, roi.start, volume.shape))
        # A positive click beyond the region grows it (a negative one there changes nothing: the mask is empty).
        outside.append(timed(lambda: obj.add_point(far, positive=True).update(buffer))[0])
        plain = InteractiveObject(image, use_cache=False)
        plain.add_box(z, a, b)
        no_cache.append(timed(lambda: plain.add_point(near, positive=True).update(buffer))[0])
        if r == 0:  # a SegVol-style first prediction: the same zoom-out, then windows at native resolution
            sliding.append(zoom_out + timed(lambda: sliding_window_zoom_in(obj, obj.prompts, roi))[0])
    return {"first": first, "inside": inside, "outside": outside, "no_cache": no_cache, "sliding": sliding}


def run_config(config: str, repeats: int, model_path: str | None, threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    engine = make_engine(config, model_path)
    for name, (volume, spacing, reference) in volumes().items():
        reps = repeats if config == "lite" else max(1, repeats // 3)
        res = bench_volume(engine, volume, spacing, reference, reps)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        edit_speedup = statistics.median(res["no_cache"]) / statistics.median(res["inside"])
        sw_ratio = res["sliding"][0] / statistics.median(res["first"])
        print(f"| {config:6s} | {name:26s} | {stat(res['first'])} | {stat(res['inside'])} | {stat(res['outside'])} "
              f"| {sw_ratio:6.1f}x | {edit_speedup:6.1f}x | {peak:7.0f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["lite", "segvol"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default=str(ROOT / "model" / "raps3d_lite.pt"))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not (data_root() / "totalsegmentator" / "example_ct.nii.gz").exists():
        sys.exit(f"real CT not found under {data_root()} (set RAPS3D_DATA)")
    if args.child:
        run_config(args.child, args.repeats, args.model, args.threads)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads() if not args.threads else args.threads} threads, "
          f"device cpu; seconds: median [min-max] over repeats (segvol: repeats/3)")
    print("| config | volume                     | first prediction (s)     | edit inside ROI (s)      "
          "| edit outside ROI (s)     | sliding-window first / first | no-cache edit / edit | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for config in args.configs:  # one process per configuration, so peak memory is its own
        subprocess.run([sys.executable, __file__, "--child", config, "--repeats", str(args.repeats),
                        "--model", args.model, "--threads", str(args.threads)], check=True)


if __name__ == "__main__":
    main()
