"""What the app's train task does for anatomy the shipped model hardly knows: a site saves corrected labels, fine-tunes
through the real MONAI Label server, and the paper's protocol runs on an abdominal CT that neither model trained on.

The site's labelled CTs are TotalSegmentator's example abdomen CT (its reference organs as the final label: spleen,
kidneys, gallbladder, liver, stomach, pancreas, aorta, inferior vena cava) and its chest CT angiography (the aorta).
``POST /train/raps3d`` fine-tunes the shipped model on the abdominal CT and validates on the chest CTA (the train
task holds one of two images out; ``publish: always``, so the figures below are measured whatever that validation
says); the evaluation is ``bench_unseen_anatomy``'s: TotalSegmentator's example DICOM
series (upper abdomen, its own frame of reference), six organs, one 2D box or one point then 3 corrective clicks,
with the shipped model and with the published one. Prints the table, the run's wall time and its own validation.

    python bench/bench_fine_tune.py [--steps 400] [--batch-size 4] [--threads 2] [--freeze true]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import SimpleITK as sitk

from bench_http import ROOT, start_server
from bench_unseen_anatomy import SERIES, evaluate_unseen
from raps3d.training.data import TOTALSEG_NAMES, data_root

SITE_LABELS = {  # image id -> (CT, label map, {value in the map: value kept})
    "abdomen_ct": ("totalsegmentator/example_ct.nii.gz", "totalsegmentator/example_seg_fast_force_split.nii.gz",
                   {v: v for v in TOTALSEG_NAMES}),
    "chest_cta": ("totalsegmentator/chest_cta_aorta_ct.nii.gz", "totalsegmentator/chest_cta_aorta_masks/aorta.nii.gz",
                  {1: 52}),
}


def site_datastore(studies: Path, labels: Path) -> None:
    """The site's CTs in ``studies`` and their corrected label maps in ``labels``."""
    for image_id, (ct, label, keep) in SITE_LABELS.items():
        shutil.copy(data_root() / ct, studies / f"{image_id}.nii.gz")
        source = sitk.ReadImage(str(data_root() / label))
        values = sitk.GetArrayFromImage(source)
        kept = np.zeros(values.shape, np.uint8)
        for value, new in keep.items():
            kept[values == value] = new
        out = sitk.GetImageFromArray(kept)
        out.CopyInformation(source)
        sitk.WriteImage(out, str(labels / f"{image_id}.nii.gz"), True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--freeze", default="true", help="freeze_image_encoder (true: the train task's default)")
    p.add_argument("--model", default=str(ROOT / "model" / "raps3d_lite.pt"))
    args = p.parse_args()
    if not (data_root() / SERIES).is_dir() or not all((data_root() / ct).exists() for ct, _, _ in
                                                      SITE_LABELS.values()):
        raise SystemExit(f"TotalSegmentator's example data not found under {data_root()} (set RAPS3D_DATA)")

    print("shipped model on the unseen series ...", flush=True)
    before = evaluate_unseen(args.model, verbose=False)
    with tempfile.TemporaryDirectory(prefix="raps3d_fine_tune_") as tmp:
        work = Path(tmp)
        studies, labels = work / "studies", work / "labels"
        studies.mkdir()
        labels.mkdir()
        site_datastore(studies, labels)
        process, url = start_server(studies, work, args.model, args.threads)
        try:
            for image_id in SITE_LABELS:
                with open(labels / f"{image_id}.nii.gz", "rb") as f:
                    r = requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": "final"},
                                     files={"label": (f"{image_id}.nii.gz", f)}, timeout=120)
                r.raise_for_status()
            body = {"steps": args.steps, "batch_size": args.batch_size, "publish": "always",
                    "freeze_image_encoder": args.freeze.lower() == "true"}
            start = time.monotonic()
            r = requests.post(f"{url}/train/raps3d", json=body, timeout=60)
            r.raise_for_status()
            print(f"training {json.dumps(body)} ...", flush=True)
            while True:
                time.sleep(5)
                status = requests.get(f"{url}/train/", timeout=30).json().get("status")
                if status not in ("SUBMITTED", "QUEUED", "RUNNING"):
                    break
            wall = time.monotonic() - start
            stats = requests.get(f"{url}/info/", timeout=30).json()["train_stats"]["raps3d"]
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        published = work / "no_fine_tuned_model.pt"  # where bench_http's server publishes
        if not published.exists():
            raise SystemExit(f"nothing was published: {json.dumps(stats)[:2000]}")
        print("fine-tuned model on the unseen series ...", flush=True)
        after = evaluate_unseen(str(published), verbose=False)

    print(f"\nFine-tuning through the train task: {args.steps} steps of batch {args.batch_size}, "
          f"freeze_image_encoder {args.freeze}, {args.threads} torch threads: {wall:.0f} s "
          f"(status {status}; the run's validation Dice {stats.get('baseline_dice')} -> {stats.get('val_dice')}, "
          f"skipped {stats.get('skipped_images')})")
    print("Unseen abdominal DICOM series, Dice after the first prompt and after 3 edits (shipped -> fine-tuned)")
    print(f"{'organ':20s} {'box first':>17s} {'box +3':>15s} {'point first':>17s} {'point +3':>15s}")
    for organ in before["box"]:
        cells = [f"{before[p][organ][i]:.3f} -> {after[p][organ][i]:.3f}" for p in ("box", "point") for i in (0, -1)]
        print(f"{organ:20s} " + " ".join(f"{c:>16s}" for c in cells))


if __name__ == "__main__":
    main()
