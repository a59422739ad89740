"""Compare finished cross-validation runs of different recipes on the same held-out patients.

Reads each run's ``report/per_patient.csv`` (written by ``ctmri train --cv …`` or
``ctmri report --from-cv RUN``) and prints, per recipe: mean foreground MAE and SSIM over the held-out
patients, and on how many patients the model beats the lookup-table baseline of its own folds.

    python experiments/compare_cv.py NAME=RUN [NAME=RUN ...]
"""
from __future__ import annotations

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
print("| recipe | MAE | SSIM | SSIM in head | MAE < lookup table | SSIM > lookup table | MAE per patient (" + ", ".join(patients) + ") |")
print("|---|---|---|---|---|---|---|")


def row(name: str, rows: dict, method: str, lut: np.ndarray | None) -> str:
    v = np.array([[rows[(p, method)][k] for k in ("mae", "ssim", "ssim_foreground")] for p in patients])
    wins = ("–", "–") if lut is None else (f"{int((v[:, 0] < lut[:, 0]).sum())}/{len(patients)}",
                                          f"{int((v[:, 1] > lut[:, 1]).sum())}/{len(patients)}")
    return (f"| {name} | {v[:, 0].mean():.2f} | {v[:, 1].mean():.3f} | {v[:, 2].mean():.3f} | {wins[0]} | {wins[1]} | "
            + " ".join(f"{x:.1f}" for x in v[:, 0]) + " |")


for name, rows in runs.items():
    lut = np.array([[rows[(p, "lookup_table")][k] for k in ("mae", "ssim")] for p in patients])
    print(row(name, rows, "model", lut))
first = next(iter(runs.values()))
for method in ("lookup_table", "constant"):
    print(row(f"baseline: {method.replace('_', ' ')}", first, method, None))
