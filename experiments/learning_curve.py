"""How does the held-out error fall with the number of training patients? Issue 11, aim 1.

Each RUN is a ``ctmri train --cv loo`` folder made with ``--drop-patients N`` (the fold's 7 training
patients less N drawn at random), so each held-out patient is predicted by a model that saw 7 − N
patients. For every run: the model's mean foreground MAE, SSIM and SSIM in the head over the held-out
patients it has, the lookup table fit on the *same* training patients, and the model's MAE over the
lookup table fit on all 7 (the ratio issue 11's aim 1 asks to bring to 0.85). Numbers from each fold's
``fold.json`` (written by the trainer) and ``report/per_patient.csv`` (``ctmri report --from-cv``).

    python experiments/learning_curve.py RUN [RUN ...] [--data DIR]

A slope read off this table says how many more patients a recipe would need, if the trend held.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "CTtoMRISynthesis"))


def run_rows(run: Path) -> tuple[int, dict, dict]:
    """(training patients, {patient: model metrics}, {patient: lookup-table metrics on the same patients})."""
    model, sizes = {}, set()
    for fold in sorted(run.glob("fold*/fold.json")):
        record = json.loads(fold.read_text())
        sizes.add(len(record["split"]["train_cases"]))
        model.update(record["cases"])
    lookup = {}
    report = run / "report" / "per_patient.csv"
    if report.exists():
        with open(report) as fh:
            lookup = {r["patient"]: {k: float(r[k]) for k in ("mae", "ssim", "ssim_foreground")}
                      for r in csv.DictReader(fh) if r["method"] == "lookup_table"}
    if len(sizes) != 1:
        raise SystemExit(f"{run}: folds trained on different numbers of patients {sorted(sizes)}")
    return sizes.pop(), model, lookup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "harvard_aanlib_ct_mri_2d"))
    args = parser.parse_args()

    from CTtoMRISynthesisLib.intensity import CTWindow
    from CTtoMRISynthesisLib.training.discovery import discover
    from CTtoMRISynthesisLib.training.report import evaluate, fit_lookup_table, predict_lookup_table

    cases = {c.case_id: c for c in discover([args.data], CTWindow(45, 120))}
    lookup7 = {}
    for cid, case in cases.items():
        table = fit_lookup_table([c for k, c in cases.items() if k != cid])
        lookup7[cid] = evaluate(case.mri, predict_lookup_table(table, case.ct), case.ct, 200.0)["mae"]

    print("| run | training patients | held-out patients | MAE model | MAE lookup (same patients) | "
          "MAE model / lookup on 7 | SSIM model | SSIM lookup (same) | SSIM in head model |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        n, model, lookup = run_rows(run)
        ids = sorted(model, key=list(cases).index)
        mean = lambda key, rows: float(np.mean([rows[i][key] for i in ids])) if all(i in rows for i in ids) else None
        ratio = float(np.mean([model[i]["mae"] / lookup7[i] for i in ids]))
        fmt = lambda v, d=2: "–" if v is None else f"{v:.{d}f}"
        print(f"| {run.name} | {n} | {len(ids)} | {fmt(mean('mae', model))} | {fmt(mean('mae', lookup))} | {ratio:.3f} | "
              f"{fmt(mean('ssim', model), 3)} | {fmt(mean('ssim', lookup), 3)} | {fmt(mean('ssim_foreground', model), 3)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
