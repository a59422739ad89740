"""Compare finished cross-validation runs of different recipes on the same held-out patients.

Reads each run's ``report/per_patient.csv`` (written by ``ctmri train --cv …`` or
``ctmri report --from-cv RUN``) and prints, per recipe: mean foreground MAE and SSIM over the held-out
patients, and on how many patients the model beats the lookup-table baseline of its own folds.

    python experiments/compare_cv.py NAME=RUN [NAME=RUN ...]
"""
import csv
import sys
from pathlib import Path

import numpy as np


def load(run: Path) -> dict:
    rows = {}
    with open(run / "report" / "per_patient.csv") as fh:
        for r in csv.DictReader(fh):
            rows[(r["patient"], r["method"])] = {k: float(r[k]) for k in ("mae", "ssim", "ssim_foreground")}
    return rows


runs = {arg.split("=", 1)[0]: load(Path(arg.split("=", 1)[1])) for arg in sys.argv[1:]}
patients = sorted({p for rows in runs.values() for p, m in rows if m == "model"}, key=int)
print(f"{'recipe':14s} {'MAE':>6s} {'SSIM':>6s} {'SSIM in head':>12s}  beats lookup (MAE / SSIM)  per patient MAE")
for name, rows in runs.items():
    m = np.array([[rows[(p, 'model')][k] for k in ('mae', 'ssim', 'ssim_foreground')] for p in patients])
    lut = np.array([[rows[(p, 'lookup_table')][k] for k in ('mae', 'ssim')] for p in patients])
    wins = f"{int((m[:, 0] < lut[:, 0]).sum())}/{len(patients)} / {int((m[:, 1] > lut[:, 1]).sum())}/{len(patients)}"
    print(f"{name:14s} {m[:, 0].mean():6.2f} {m[:, 1].mean():6.3f} {m[:, 2].mean():12.3f}  {wins:>25s}  "
          + " ".join(f"{v:.1f}" for v in m[:, 0]))
first = next(iter(runs.values()))
for method in ("lookup_table", "constant"):
    v = np.array([[first[(p, method)][k] for k in ("mae", "ssim", "ssim_foreground")] for p in patients])
    print(f"{method:14s} {v[:, 0].mean():6.2f} {v[:, 1].mean():6.3f} {v[:, 2].mean():12.3f}  "
          f"{'':>25s}  " + " ".join(f"{x:.1f}" for x in v[:, 0]))
print("patients:", " ".join(patients))
