"""How much of the first prompt's error is the choice of the zoom-in region?

For each held-out structure, the first prompt (the evaluation protocol's 2D box or centre point) is answered twice:
through the predictor (zoom-out, maybe the intermediate view, zoom-in on the region it derives), and by one zoom-in
decode on the region the reference itself gives (its bounding box plus the predictor's margin), which no real
prompt can know. Prints mean Dice per structure for both, and the share of the reference inside the predictor's
region.

    python bench/bench_region_oracle.py [--model model/raps3d_lite.pt] [--openkbp N] [--lidc N]
"""

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from raps3d.checkpoint import load_model
from raps3d.engine import Engine
from raps3d.geometry import Box, Frame, logits_to_mask
from raps3d.predictor import ImageState, InteractiveObject
from raps3d.roi import margins, min_size
from raps3d.training.clicks import centre_point, largest_slice_box
from raps3d.training.data import lidc_cases, openkbp_cases
from raps3d.training.evaluate import dice


def reference_region(reference: np.ndarray, spacing, shape) -> Box:
    where = np.argwhere(reference)
    low, high = where.min(0).astype(float), where.max(0).astype(float)
    return Box.from_extent(low, high, margins(high - low, spacing), min_size(spacing, shape), shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "model" / "raps3d_lite.pt"))
    p.add_argument("--openkbp", type=int, default=10, help="OpenKBP validation patients")
    p.add_argument("--lidc", type=int, default=20, help="held-out LIDC nodules")
    args = p.parse_args()
    model, _ = load_model(args.model)
    engine = Engine(model)
    rows = defaultdict(list)
    for case in openkbp_cases("validation", args.openkbp) + lidc_cases(True, args.lidc):
        image = ImageState(engine, case.volume, case.spacing)
        for name, structure in sorted(case.structures.items()):
            reference = structure.full()
            region = reference_region(reference, image.spacing, image.shape)
            frame = Frame(region, engine.config.input_shape)
            features = engine.encode(case.volume, frame)
            for kind in ("box", "point"):
                obj = InteractiveObject(image)
                if kind == "box":
                    result = obj.add_box(*largest_slice_box(reference))
                else:
                    result = obj.add_point(tuple(centre_point(reference, image.spacing)))
                coords, labels = obj.prompts.coords_labels()  # the prompt as the predictor encoded it
                logits, _ = engine.decode(features, frame.to_frame(coords), labels, None, kind == "point")
                oracle = np.zeros(reference.shape, bool)
                oracle[region.slices] = logits_to_mask(logits, region.size, threshold=engine.mask_threshold)
                inside = reference[result.roi.slices].sum() / reference.sum()
                row = (dice(result.full_mask().astype(bool), reference), dice(oracle, reference), inside)
                rows[(case.dataset, name, kind)].append(row)
                rows[("all", "all", kind)].append(row)
    print(f"{'dataset / structure / prompt':40s} {'n':>4s} {'predictor':>9s} {'ref. region':>11s} {'ref. inside':>11s}")
    for key, values in sorted(rows.items()):
        v = np.mean(values, axis=0)
        print(f"{' / '.join(key):40s} {len(values):4d} {v[0]:9.3f} {v[1]:11.3f} {v[2]:11.3f}")


if __name__ == "__main__":
    main()
