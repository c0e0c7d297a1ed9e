"""Prints the paper's Table 1 protocol for a checkpoint on the held-out data (OpenKBP validation, held-out LIDC):
mean Dice after a 2D box or one centre point, then after each of 3 corrective clicks, and seconds per interaction.

    python bench/bench_evaluation.py [--model model/raps3d_lite.pt] [--openkbp N] [--lidc N] [--out runs/eval.json]

With --out, the rows and summary are written as JSON and the Dice-against-clicks plot beside it (PNG).
"""

import sys
from pathlib import Path

from raps3d.training.evaluate import main

if __name__ == "__main__":
    main(sys.argv[1:], default_model=str(Path(__file__).resolve().parents[1] / "model" / "raps3d_lite.pt"))
