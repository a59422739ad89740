"""Experiment: the output mask grown into the scalp, on an ensemble's cross-validation (issue 11, aim 1).

The synthetic MRI is set to 0 outside the CT head mask (largest object of CT > 10, holes filled per slice). In
the brain-windowed training CT, fat is 0 like air, so that mask stops at the skull and the T2-bright scalp is
scored as an error of every method (5–19 % of the MRI foreground). The network is trained on whole slices and
predicts the scalp from context; the lookup table cannot (CT 0 is air and fat alike). This re-predicts each
held-out patient with the fold models of finished ``ctmri train --cv loo`` runs (the ensemble: the mean of the
runs' predictions, each with the flip of the model files' config), without the mask, then applies the head
mask grown in-plane by each of ``--grow`` pixels (or none) and scores it as the report does. Baselines: the
report's lookup table (fit on the other patients less ``--exclude-from-training``, masked by the CT head mask as
always), and the same table fitted and masked with each grown mask, so that the model is also compared with a
baseline given the same mask (a grown mask lets the table score the scalp too). The real MRI shifted 1 px (the
report's reference row) is also shown under the same masks, since the report leaves it unmasked while every
method is masked. With no RUN, only the baselines' rows.

    python experiments/mask_growth.py [RUN ...] [--data DIR] [--grow 0 2 4 8] [--exclude-from-training 2]

Numbers only; prints one table per mask and a summary against the lookup table (aim 1's terms): "MAE / table"
against the report's table, "/ same-mask table" against the table with the row's own mask.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "CTtoMRISynthesis"))


def raw_ensemble(runs: list, case, cases) -> np.ndarray:
    """Mean over the runs of the unmasked prediction of the fold that held ``case`` out."""
    from CTtoMRISynthesisLib.synthesis import predict_volume, preprocessing_options
    from CTtoMRISynthesisLib.training.report import fold_model, held_out_folds
    from CTtoMRISynthesisLib.weights import load_model

    predictions = []
    for fold in held_out_folds(runs, case.case_id, cases):
        loaded = load_model(fold_model(fold))
        options = {**preprocessing_options(loaded.config["preprocessing"]), "mask_output": False}
        predictions.append(predict_volume(loaded.net, case.ct, **options).mean)
    if len(predictions) != len(runs):
        raise SystemExit(f"patient {case.case_id} is held out in {len(predictions)} of {len(runs)} runs")
    return np.mean(predictions, axis=0)


def grown(head: np.ndarray, pixels) -> np.ndarray:
    """``head`` grown in-plane by ``pixels`` (4-neighbourhood steps); None: everything."""
    from CTtoMRISynthesisLib.intensity import grow_in_plane

    return np.ones_like(head) if pixels is None else grow_in_plane(head, pixels)


def score(ref: np.ndarray, syn: np.ndarray) -> dict:
    from CTtoMRISynthesisLib.metrics import compute_metrics

    m = compute_metrics(ref, syn)
    return {"mae": m["mae"], "ssim": m["ssim"], "ssim_fg": m["ssim_foreground"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="finished cross-validations (none: baselines only)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "harvard_aanlib_ct_mri_2d"))
    parser.add_argument("--grow", nargs="+", default=["0", "2", "4", "6", "8", "none"],
                        help="pixels of growth of the output mask (model grid), or 'none' for no mask")
    parser.add_argument("--exclude-from-training", nargs="*", default=["2"], metavar="ID")
    args = parser.parse_args()

    from CTtoMRISynthesisLib.intensity import CTWindow, head_mask
    from CTtoMRISynthesisLib.training.discovery import discover
    from CTtoMRISynthesisLib.training.report import (check_finished_cv, fit_lookup_table, predict_lookup_table)

    if args.runs:
        check_finished_cv(args.runs)
    growths = [None if g == "none" else int(g) for g in args.grow]
    cases = discover([args.data], CTWindow(45, 120))
    rows: dict = {}  # (method, growth) -> {patient: scores}
    for case in cases:
        raw = raw_ensemble(args.runs, case, cases) if args.runs else None
        head = head_mask(case.ct)
        train = [c for c in cases if c.case_id != case.case_id and c.case_id not in args.exclude_from_training]
        shifted = np.roll(case.mri, -1, axis=2)
        for g in growths:
            mask = grown(head, g)
            if g is not None:  # the table fitted and applied with this mask (the report's row: g = 0)
                rows.setdefault(("lookup table", g), {})[case.case_id] = score(
                    case.mri, predict_lookup_table(fit_lookup_table(train, grow_px=g), case.ct, grow_px=g))
            if raw is not None:
                rows.setdefault(("model", g), {})[case.case_id] = score(case.mri, np.where(mask, raw, 0.0))
            rows.setdefault(("real MRI shifted 1 px", g), {})[case.case_id] = score(
                case.mri, np.where(mask, shifted, 0.0))
        shown = "model" if raw is not None else "lookup table"
        print(f"patient {case.case_id}, {shown}: " + ", ".join(
            f"grow {g}: {rows[(shown, g)][case.case_id]['mae']:.2f}" for g in growths if (shown, g) in rows), flush=True)

    ids = [c.case_id for c in cases]
    label = {None: "no mask"}

    def means(per: dict) -> dict:
        return {k: float(np.mean([per[i][k] for i in ids])) for k in ("mae", "ssim", "ssim_fg")}

    lut = rows[("lookup table", 0)]
    print("\n| method | output mask | MAE | SSIM | SSIM in head | MAE / table | below the table | SSIM − table's "
          "| MAE / same-mask table | SSIM in head − same-mask table's |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (method, g), per in sorted(rows.items(), key=lambda item: (99 if item[0][1] is None else item[0][1])):
        mean, lut_mean = means(per), means(lut)
        same = rows.get(("lookup table", g))
        vs_same = (f"{mean['mae'] / means(same)['mae']:.3f} | {mean['ssim_fg'] - means(same)['ssim_fg']:+.3f}"
                   if same else "– | –")
        below = sum(per[i]["mae"] < lut[i]["mae"] for i in ids)
        where = label.get(g, f"CT head + {g} px" if g else "CT head")
        print(f"| {method} | {where} | {mean['mae']:.2f} | {mean['ssim']:.3f} | {mean['ssim_fg']:.3f} | "
              f"{mean['mae'] / lut_mean['mae']:.3f} | {below} of {len(ids)} | {mean['ssim'] - lut_mean['ssim']:+.3f} "
              f"| {vs_same} |")
    shown = "model" if args.runs else "lookup table"
    print(f"\nper patient, {shown} MAE by mask (the report's lookup table):")
    for i in ids:
        print(f"  {i}: " + ", ".join(f"{label.get(g, g)}: {rows[(shown, g)][i]['mae']:.2f}"
                                     for g in growths if (shown, g) in rows) + f" ({lut[i]['mae']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
