"""Experiment: a ceiling for issue 11's aim 1 — models that have already seen part of the held-out patient.

Leave-one-patient-out asks a model trained on 6–7 patients to predict a new one. This experiment makes the
task strictly easier: for each patient P, a member of the shipped recipe is trained on the other patients
(less ``--exclude-from-training``) **plus P's even slices**, and scored on P's odd slices, each of which has
its two neighbours in training. That is the slice-level split the project otherwise forbids: its leak is the
point. If even this model stays above 0.85 × the lookup table, a patient-level model of this recipe family
cannot be expected to reach aim 1 on this data.

Scored on P's test slices, side by side (core library metrics via ``report.evaluate``):

- ``seen``: the model above (one member, its recipe given after ``--``),
- ``own``: trained on P's training slices alone, no other patient (a run made with ``--own-only``; given as
  ``--own-out DIR`` beside a ``seen`` run; give it more ``--epochs``: it has ~1/13 of the slices per epoch),
- ``lopo``: the same member recipe's leave-one-patient-out fold model (``--lopo RUN``: its ``pred_P.npz``; optional),
- ``ensemble``: the mean of several such runs' held-out predictions (``--ensemble RUN ...``: the shipped
  model's cross-validation, if given),
- ``lookup``: the lookup table fit on the other patients less the excluded (the denominator of aim 1),
- ``lookup_seen`` / ``lookup_own``: the lookup table fit on those patients plus P's training slices / on
  P's training slices alone (what the leak gives a pointwise grey-level map, which cannot memorise anatomy).

``--layout blocks`` trains on P's first half (less its last slice) and tests on its second half instead: no
test slice then has a neighbour in training, so what ``own`` keeps there is P's own CT→MRI relation rather
than its anatomy next door.

    python experiments/slice_split.py --out DIR [--lopo RUN] [--ensemble RUN ...] [--own-only | --own-out DIR]
        [--layout alternate|blocks] [--patients P ...] [--data DIR] -- <ctmri train options: --epochs, ...>

Training resumes where it stopped (``--resume`` is implied); ``--patients`` trains only those (two
processes can share the patients between them); the table is printed once every patient's model exists,
or with ``--report-only`` for those that do (of ``--patients``, if given).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "CTtoMRISynthesis"))

METHODS = ("seen", "own", "lopo", "ensemble", "lookup_own", "lookup_seen", "lookup")
LAYOUTS = {"alternate": ("even", "odd"), "blocks": ("first", "rest")}


def split_indices(n: int, layout: str = "alternate") -> tuple:
    """(training, test) slice indices of one patient: even / odd slices (``alternate``: each test slice has its
    neighbours in training), or the first half less its last slice / the second half (``blocks``: one slice of
    gap, so no test slice has a training neighbour; the halves hold different anatomy)."""
    if layout == "alternate":
        return np.arange(0, n, 2), np.arange(1, n, 2)
    if layout == "blocks":
        return np.arange(0, n // 2 - 1), np.arange(n // 2, n)
    raise SystemExit(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")


def halves(case, layout: str = "alternate"):
    """(training part, test part) of one patient as two cases; slices are in anatomical order."""
    part = lambda idx, tag: replace(case, case_id=f"{case.case_id}:{tag}", ct=case.ct[idx], mri=case.mri[idx],
                                    slice_names=[case.slice_names[i] for i in idx] if case.slice_names else [])
    (train_idx, test_idx), (train_tag, test_tag) = split_indices(case.slices, layout), LAYOUTS[layout]
    return part(train_idx, train_tag), part(test_idx, test_tag)


def train_seen(case, cases, excluded: set, train_argv: list, out: Path, own_only: bool = False,
               layout: str = "alternate") -> Path:
    """Train (or resume) the member that sees ``case``'s training part (with ``own_only``, nothing else);
    return its model file."""
    from CTtoMRISynthesisLib.training.commands import add_train_arguments, settings_from_args
    from CTtoMRISynthesisLib.training.loop import train

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["--data", "unused", "--out", str(out)] + train_argv)
    settings = settings_from_args(args)
    settings.select = "last"  # the test slices are logged, never used to pick an epoch
    seen, test = halves(case, layout)
    others = [] if own_only else [c for c in cases if c.case_id != case.case_id and c.case_id not in excluded]
    train_cases = others + [seen]
    mode = f"slice-split ceiling, {layout} (leaky on purpose)" + (", the patient's own slices only" if own_only else "")
    split = {"mode": mode, "train_cases": [c.case_id for c in train_cases], "val_cases": [test.case_id],
             "test_cases": [test.case_id], "seed": settings.seed}
    result = train(train_cases, settings, out, val_cases=[test], split=split, resume=True,
                   command="experiments/slice_split.py " + " ".join(train_argv), progress_bar=False)
    return Path(result["weights"])


def held_out_mean(runs: list, case_id: str) -> np.ndarray:
    """Mean of the runs' leave-one-out predictions of one patient (each run's fold that held it out)."""
    preds = [np.load(f)["syn"] for run in runs for f in sorted(Path(run).glob(f"fold*/pred_{case_id}.npz"))]
    if len(preds) != len(runs):
        raise SystemExit(f"patient {case_id}: {len(preds)} held-out predictions in {len(runs)} runs")
    return np.mean(preds, axis=0)


def score_patient(case, cases, excluded: set, models: dict, lopo: Path | None, ensemble: list,
                  layout: str) -> dict:
    """Every method's metrics on ``case``'s test slices; ``models``: {column: model file} of this experiment."""
    from CTtoMRISynthesisLib.training.report import evaluate, fit_lookup_table, predict_case, predict_lookup_table
    from CTtoMRISynthesisLib.weights import load_model

    seen, test = halves(case, layout)
    test_idx = split_indices(case.slices, layout)[1]
    others = [c for c in cases if c.case_id != case.case_id and c.case_id not in excluded]
    preds = {name: predict_case(load_model(path), test).mean for name, path in models.items()}
    if lopo:
        preds["lopo"] = held_out_mean([lopo], case.case_id)[test_idx]
    if ensemble:
        preds["ensemble"] = held_out_mean(ensemble, case.case_id)[test_idx]
    preds["lookup_own"] = predict_lookup_table(fit_lookup_table([seen]), test.ct)
    preds["lookup_seen"] = predict_lookup_table(fit_lookup_table(others + [seen]), test.ct)
    preds["lookup"] = predict_lookup_table(fit_lookup_table(others), test.ct)
    return {name: evaluate(test.mri, syn, test.ct, 200.0) for name, syn in preds.items()}


def print_table(scores: dict) -> None:
    """Per patient and mean: each method's MAE / lookup, MAE, SSIM in the head and whole-slice SSIM."""
    methods = [m for m in METHODS if all(m in s for s in scores.values())]
    print("Each patient's test slices (its other slices in the training of `seen`, `own` and `lookup_own` / "
          "`lookup_seen`). MAE / lookup is the foreground MAE over the lookup table's fit on the other patients "
          "(aim 1's ratio).\n")
    print("| patient | " + " | ".join(f"{m}: MAE / lookup" for m in methods) + " | "
          + " | ".join(f"{m}: SSIM head" for m in methods) + " |")
    print("|---|" + "---|" * (2 * len(methods)))
    ratio = {m: [] for m in methods}
    for pid, s in scores.items():
        cells = []
        for m in methods:
            ratio[m].append(s[m]["mae"] / s["lookup"]["mae"])
            cells.append(f"{ratio[m][-1]:.3f}")
        cells += [f"{s[m]['ssim_foreground']:.3f}" for m in methods]
        print(f"| {pid} | " + " | ".join(cells) + " |")
    mean = lambda m, k: float(np.mean([s[m][k] for s in scores.values()]))
    print("| mean | " + " | ".join(f"{np.mean(ratio[m]):.3f}" for m in methods) + " | "
          + " | ".join(f"{mean(m, 'ssim_foreground'):.3f}" for m in methods) + " |")
    print("\n| method | mean MAE | mean MAE / lookup | below the lookup table on | mean SSIM in head | "
          "mean whole-slice SSIM | whole-slice SSIM − lookup's |")
    print("|---|---|---|---|---|---|---|")
    for m in methods:
        below = sum(r < 1.0 for r in ratio[m])
        print(f"| {m} | {mean(m, 'mae'):.2f} | {np.mean(ratio[m]):.3f} | {below} of {len(ratio[m])} | "
              f"{mean(m, 'ssim_foreground'):.3f} | {mean(m, 'ssim'):.3f} | {mean(m, 'ssim') - mean('lookup', 'ssim'):+.3f} |")


def main() -> int:
    argv = sys.argv[1:]
    train_argv = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lopo", type=Path, help="the same member recipe's `ctmri train --cv loo` run (optional column)")
    parser.add_argument("--ensemble", type=Path, nargs="*", default=[], help="cross-validation runs of the shipped ensemble")
    parser.add_argument("--patients", nargs="*", default=None, help="train (or, with --report-only, score) only these patients")
    parser.add_argument("--exclude-from-training", nargs="*", default=["2"])
    parser.add_argument("--own-only", action="store_true", help="train on the patient's own training slices alone")
    parser.add_argument("--own-out", type=Path, help="a --own-only run's folder (same layout), scored as the `own` column")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="alternate",
                        help="alternate: train on even slices, test on odd; blocks: first half (less one slice) / second half")
    parser.add_argument("--report-only", action="store_true", help="score the patients whose model exists; train nothing")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "harvard_aanlib_ct_mri_2d"))
    args = parser.parse_args(own)

    from CTtoMRISynthesisLib.intensity import CTWindow
    from CTtoMRISynthesisLib.training.discovery import discover
    from CTtoMRISynthesisLib.training.loop import MODEL_FILE

    cases = discover([args.data], CTWindow(45, 120))
    excluded = set(args.exclude_from_training)
    todo = [c for c in cases if args.patients is None or c.case_id in args.patients]
    if not args.report_only:
        for case in todo:
            print(f"patient {case.case_id}: training on {'' if args.own_only else 'the others and '}its "
                  f"{len(split_indices(case.slices, args.layout)[0])} {LAYOUTS[args.layout][0]} slices", flush=True)
            train_seen(case, cases, excluded, train_argv, args.out / f"patient_{case.case_id}", args.own_only, args.layout)
    runs = {"own" if args.own_only else "seen": args.out, **({"own": args.own_out} if args.own_out else {})}
    model = lambda run, pid: run / f"patient_{pid}" / MODEL_FILE
    scored = todo if args.report_only else cases  # a training process shares the patients: it reports all or none
    done = {c.case_id: c for c in scored if all(model(run, c.case_id).exists() for run in runs.values())}
    if not args.report_only and len(done) < len(cases):
        print(f"{len(done)} of {len(cases)} patients trained; the table is printed once all are (or --report-only)")
        return 0
    scores = {pid: score_patient(c, cases, excluded, {k: model(run, pid) for k, run in runs.items()}, args.lopo,
                                 args.ensemble, args.layout) for pid, c in done.items()}
    print_table(scores)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
