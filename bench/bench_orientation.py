"""How much the model depends on the voxel order it is shown: the paper's protocol on held-out CT shown in the model's
orientation (as the server shows every image, ``raps3d.orientation``), with one axis reversed, and as coronal or
sagittal slices (as the server showed files stored that way before it reoriented volumes: a DICOM series' slices, a
NIfTI file's rows and columns, a reformatted series). A box is drawn on the slices shown. Prints mean Dice after the
first prompt and after 3 corrective clicks, per dataset and prompt.

    python bench/bench_orientation.py [--openkbp 8] [--lidc 60] [--model model/raps3d_lite.pt]
"""

import argparse
from pathlib import Path

import numpy as np

from raps3d.checkpoint import load_model
from raps3d.engine import Engine
from raps3d.training.data import Case, lidc_cases, openkbp_cases
from raps3d.training.evaluate import evaluate

# (axis order, axes reversed): the shown array's axis a is the model's axis order[a].
VIEWS = {"model's orientation": ((0, 1, 2), ()), "slices reversed": ((0, 1, 2), (0,)),
         "rows reversed": ((0, 1, 2), (1,)), "columns reversed": ((0, 1, 2), (2,)),
         "coronal slices": ((1, 0, 2), ()), "sagittal slices": ((2, 0, 1), ())}


def shown(cases: list[Case], order: tuple, axes: tuple) -> list[Case]:
    """The cases with the axes of the volume and of every structure put in ``order``, then ``axes`` reversed."""
    if order == (0, 1, 2) and not axes:
        return cases

    def arrange(array):
        return np.ascontiguousarray(np.flip(array.transpose(order), axes))

    return [Case(c.name, c.dataset, arrange(c.volume), tuple(c.spacing[a] for a in order),
                 {k: arrange(s.full()) for k, s in c.structures.items()}) for c in cases]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "model" / "raps3d_lite.pt"))
    p.add_argument("--openkbp", type=int, default=8, help="OpenKBP validation patients")
    p.add_argument("--lidc", type=int, default=60, help="held-out LIDC nodules")
    args = p.parse_args()
    engine = Engine(load_model(args.model)[0])
    datasets = {"openkbp": openkbp_cases("validation", args.openkbp), "lidc": lidc_cases(True, args.lidc)}
    if not any(datasets.values()):
        raise SystemExit("no held-out cases found (set RAPS3D_DATA to the data folder)")
    print(f"{'data':8s} {'shown':20s} {'box first':>9s} {'box +3':>7s} {'point first':>11s} {'point +3':>8s}")
    for name, cases in datasets.items():
        for view, (order, axes) in VIEWS.items():
            rows = evaluate(engine, shown(cases, order, axes))
            figures = []
            for prompt in ("box", "point"):
                dice = np.mean([r["dice"] for r in rows if r["prompt"] == prompt], axis=0)
                figures += [dice[0], dice[-1]]
            print(f"{name:8s} {view:20s} {figures[0]:9.3f} {figures[1]:7.3f} {figures[2]:11.3f} {figures[3]:8.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
