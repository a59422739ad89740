"""Cross-validation runs as if their fold models matched the CT grain (CTtoMRISynthesisLib/grain.py).

The fold models of finished ``ctmri train --cv loo`` runs were saved without ``preprocessing.ct_grain_target``.
This makes a copy of each run (fold models linked, not copied) whose held-out predictions are made with
grain matching, the target of each fold taken from the CTs of every patient but the held-out one (the
training patients of the ensemble that fold belongs to; nested: the held-out patient's CT never sets it),
and writes each copy's report. The copies then go through every measure of the
model card like any run (``experiments/evaluate_ensemble.sh`` with ``CV`` = the copies).

    python experiments/grain_cv.py RUN [RUN ...] --out DIR [--data DIR] [--exclude-from-training 2] [--filter median]

Numbers only (``DIR/<run>/foldNN/fold.json`` records each fold's target, measured grain and blur).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "CTtoMRISynthesis"))

from CTtoMRISynthesisLib.grain import FILTERS, short  # noqa: E402


def copy_fold(fold: Path, out: Path, cases: list, target_for, method: str = "gaussian") -> dict:
    """Link ``fold``'s model into ``out`` and save its held-out predictions made with grain matching, the
    target ``target_for(held-out ids)``, by the blur or (``method="median"``, round 21) the 3 × 3 median (``"median35"``: then the 5 × 5)."""
    from CTtoMRISynthesisLib.grain import FILTER_KEY, KEY
    from CTtoMRISynthesisLib.metrics import to_jsonable
    from CTtoMRISynthesisLib.training.report import evaluate, fold_model, predict_case
    from CTtoMRISynthesisLib.weights import load_model

    out.mkdir(parents=True, exist_ok=True)
    model = fold_model(fold)
    for name in (model.name, model.name + ".sha256"):
        if not (out / name).exists():
            (out / name).symlink_to((fold / name).resolve())
    loaded = load_model(model)
    split = loaded.config["split"]
    target = target_for(tuple(split["test_cases"]))
    loaded.config["preprocessing"][KEY] = target
    if method != "gaussian":
        loaded.config["preprocessing"][FILTER_KEY] = method
    record = {"split": split, "ct_grain_target": target, "cases": {}, "grain": {}}
    for cid in split["test_cases"]:
        case = next(c for c in cases if c.case_id == cid)
        info: dict = {}
        pred = predict_case(loaded, case, info=info)
        np.savez_compressed(out / f"pred_{cid}.npz", syn=pred.mean.astype(np.float32), spread=pred.spread.astype(np.float32))
        record["cases"][cid] = evaluate(case.mri, pred.mean, case.ct, 200.0)
        record["grain"][cid] = {k: v for k, v in info.items() if k.startswith("ct_grain")}
    (out / "fold.json").write_text(json.dumps(to_jsonable(record), indent=1))
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "harvard_aanlib_ct_mri_2d"))
    parser.add_argument("--exclude-from-training", nargs="*", default=["2"], metavar="ID")
    parser.add_argument("--filter", choices=FILTERS, default="gaussian",
                        help="how a grainier CT is brought down (grain.py): the blur, a share of its 3x3 median, or "
                             "that and then of its 5x5 median (median35)")
    args = parser.parse_args()

    from CTtoMRISynthesisLib.grain import training_target
    from CTtoMRISynthesisLib.intensity import CTWindow
    from CTtoMRISynthesisLib.training.discovery import discover
    from CTtoMRISynthesisLib.training.report import write_cv_report

    cases = discover([args.data], CTWindow(45, 120))
    targets: dict = {}

    def target_for(held_out: tuple) -> float:
        # the ensemble's target comes from all its training patients (the members' union): every patient
        # but the held-out one(s), whatever a member's bagging dropped; the same for every run's fold
        if held_out not in targets:
            rest = [c for c in cases if c.case_id not in held_out]
            targets[held_out] = training_target(rest, tuple(args.exclude_from_training))
        return targets[held_out]

    print("| run | fold | held out | target | its grain | done to the CT |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        copy = args.out / run.name
        for fold in sorted(run.glob("fold*")):
            record = copy_fold(fold, copy / fold.name, cases, target_for, args.filter)
            for cid, note in record["grain"].items():
                print(f"| {run.name} | {fold.name} | {cid} | {record['ct_grain_target']:.2f} | {note['ct_grain']:.2f} | "
                      f"{short(note)} |", flush=True)
        write_cv_report(copy, cases, command=f"experiments/grain_cv.py {run}", out_dir=copy / "report")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
