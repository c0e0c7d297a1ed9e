"""The paper's protocol on anatomy the shipped model was not trained on: abdominal organs of a CT it never saw.

TotalSegmentator's example DICOM series (Siemens, 20 slices of 2 mm, upper abdomen, JPEG 2000) with its reference
label map, which is stored with the row axis flipped and is put on the series' grid first. Training saw abdominal
organs in two volumes only (see model/README.md), so this measures how far the model carries beyond its data. Prints
mean Dice per structure after the first prompt (a 2D box, a centre point) and after each of 3 corrective clicks.

    python bench/bench_unseen_anatomy.py [--model model/raps3d_lite.pt]
"""

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from raps3d.checkpoint import load_model
from raps3d.engine import Engine
from raps3d.orientation import Reorientation
from raps3d.predictor import ImageState
from raps3d.training.data import TOTALSEG_NAMES, data_root
from raps3d.training.evaluate import EDITS, evaluate_structure

SERIES = "totalsegmentator/example_ct_dicom"
REFERENCE = "totalsegmentator/example_seg_dicom.nii.gz"


def read_series_and_reference() -> tuple[np.ndarray, tuple, np.ndarray]:
    """CT voxels (z, y, x) in HU, spacing (z, y, x) in mm, and the reference labels on the CT's grid, in the model's
    orientation as the server gives it (the series' slices reversed)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(data_root() / SERIES)))
    ct = reader.Execute()
    labels = sitk.Resample(sitk.ReadImage(str(data_root() / REFERENCE)), ct, sitk.Transform(),
                           sitk.sitkNearestNeighbor, 0)
    orientation = Reorientation.from_direction(ct.GetDirection())
    return (orientation.volume(sitk.GetArrayFromImage(ct)), orientation.spacing(ct.GetSpacing()[::-1]),
            orientation.volume(sitk.GetArrayFromImage(labels)))


def evaluate_unseen(model_path: str, verbose: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Dice after the first prompt and each edit, per prompt ("box", "point") and organ, with the organs' mean under
    "mean"."""
    volume, spacing, labels = read_series_and_reference()
    image = ImageState(Engine(load_model(model_path)[0]), volume, spacing)
    figures = {"box": {}, "point": {}}
    if verbose:
        print(f"{'structure':20s} {'voxels':>8s} {'prompt':6s} " + " ".join(f"{k} edits" for k in range(EDITS + 1)))
    for value, name in TOTALSEG_NAMES.items():
        reference = labels == value
        if reference.sum() < 100:  # not in this slab
            continue
        for prompt in ("box", "point"):
            dices, _ = evaluate_structure(image, reference, prompt)
            figures[prompt][name] = np.asarray(dices)
            if verbose:
                print(f"{name:20s} {int(reference.sum()):8d} {prompt:6s} " + " ".join(f"{d:7.3f}" for d in dices))
    for per_organ in figures.values():
        per_organ["mean"] = np.mean(list(per_organ.values()), axis=0)
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "model" / "raps3d_lite.pt"))
    args = p.parse_args()
    if not (data_root() / SERIES).is_dir():
        raise SystemExit(f"{data_root() / SERIES} not found (set RAPS3D_DATA)")
    for prompt, per_organ in evaluate_unseen(args.model).items():
        print(f"{'mean':20s} {'':8s} {prompt:6s} " + " ".join(f"{d:7.3f}" for d in per_organ["mean"]))


if __name__ == "__main__":
    main()
