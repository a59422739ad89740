"""Ensembles of cross-validation runs: is the mean of several models better, and does their spread say where
the error is? Issue 11, aims 1 and 4.

Every RUN is a finished ``ctmri train --cv loo`` folder over the same patients (same recipe with another
``--seed``, or ``--drop-patients`` for bagging, or another recipe). For each held-out patient the members'
saved predictions (``foldNN/pred_<id>.npz``, made by the fold that held the patient out) are averaged, and
the ensemble is scored like the report scores one model, against the lookup table fit on the patient's
seven training patients. Candidate uncertainty maps, each scored by the report's ``uncertainty_quality``
(Spearman with |real − synthetic| over head voxels, error in the most uncertain 10 %):

- ``members``: the SD of the members' predictions (model disagreement),
- ``own``: the RMS of the members' own spreads (σ and flip, as one model writes it),
- ``combined``: sqrt(own² + members²), what an ensemble would write as ``uncertainty.nrrd``,
- ``grad``: the gradient magnitude of the ensemble's prediction (edges; a trivial map, for comparison),
- ``members+grad``: the mean of the two maps' within-patient percentile ranks.

And one oracle check (it sees the real MRI, so it is not a method): the ensemble's prediction rescaled
linearly (least squares over the head) to the patient's real MRI — how much of the error is the patient's
global MRI scale, and does the members' SD track what is left?

    python experiments/ensemble_cv.py RUN [RUN ...] [--data DIR] [--json OUT.json]

Numbers only; the data's images are not written anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "CTtoMRISynthesis"))

MAPS = ("members", "own", "combined", "grad", "members+grad")


def member_predictions(runs: list[Path], case_id: str, cases) -> tuple[np.ndarray, np.ndarray]:
    """(members, z, y, x) predictions and own spreads (0 where not saved) of one held-out patient, one per run."""
    from CTtoMRISynthesisLib.training.report import held_out_predictions

    syn, spread, _ = held_out_predictions(runs, case_id, cases)
    if len(syn) != len(runs):
        raise SystemExit(f"patient {case_id} is held out in {len(syn)} of the {len(runs)} runs; every run must hold it out")
    return np.stack(syn), np.stack([np.zeros_like(a) if s is None else s for a, s in zip(syn, spread)])


def percentile_rank(values: np.ndarray) -> np.ndarray:
    """Within-array ranks scaled to 0..1 (ties get their mean rank), for combining maps of different units."""
    from scipy.stats import rankdata

    return (rankdata(values.ravel()) / values.size).reshape(values.shape).astype(np.float32)


def oracle_rescale(mri: np.ndarray, mean: np.ndarray, members_sd: np.ndarray, head: np.ndarray) -> dict:
    """In-head MAE before/after fitting a·prediction + b to the real MRI, and Spearman(members' SD, error after)."""
    from scipy.stats import spearmanr

    y, x = mri.astype(np.float32)[head], mean[head]
    a, b = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1), y, rcond=None)[0]
    after = np.abs(y - (a * x + b))
    rho = spearmanr(members_sd[head], after).statistic if float(np.ptp(members_sd[head])) > 0 else None
    return {"a": float(a), "b": float(b), "mae_head": float(np.abs(y - x).mean()), "mae_head_after": float(after.mean()),
            "members_spearman_after": None if rho is None else float(rho)}


def uncertainty_maps(syn: np.ndarray, spread: np.ndarray, mean: np.ndarray, head: np.ndarray) -> dict:
    from scipy import ndimage

    members = syn.std(axis=0)
    own = np.sqrt((spread**2).mean(axis=0))
    grad = np.hypot(ndimage.sobel(mean, axis=1), ndimage.sobel(mean, axis=2))
    both = np.zeros_like(mean)
    both[head] = (percentile_rank(members[head]) + percentile_rank(grad[head])) / 2
    return {"members": members, "own": own, "combined": np.sqrt(own**2 + members**2), "grad": grad,
            "members+grad": both}


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _mean_min(values: list) -> dict:
    """Mean and minimum over patients; None when a map is constant on some patient (one member: no spread)."""
    if any(v is None for v in values):
        return {"mean": None, "min": None}
    return {"mean": float(np.mean(values)), "min": float(min(values))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished `ctmri train --cv loo` run folders")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "harvard_aanlib_ct_mri_2d"))
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()

    from CTtoMRISynthesisLib.intensity import CTWindow, head_mask
    from CTtoMRISynthesisLib.training.discovery import discover
    from CTtoMRISynthesisLib.training.report import (evaluate, fit_lookup_table, predict_lookup_table,
                                                     uncertainty_quality)

    cases = discover([args.data], CTWindow(45, 120))
    rows = []
    for case in cases:
        syn, spread = member_predictions(args.runs, case.case_id, cases)
        mean = syn.mean(axis=0)
        head = head_mask(case.ct)
        others = [c for c in cases if c.case_id != case.case_id]
        lookup = evaluate(case.mri, predict_lookup_table(fit_lookup_table(others), case.ct), case.ct, 200.0)
        row = {"patient": case.case_id, "ensemble": evaluate(case.mri, mean, case.ct, 200.0), "lookup": lookup,
               "members_mae": [evaluate(case.mri, s, case.ct, 200.0)["mae"] for s in syn]}
        row["uncertainty"] = {name: uncertainty_quality(case.mri, mean, m, head)
                              for name, m in uncertainty_maps(syn, spread, mean, head).items()}
        row["oracle_rescale"] = oracle_rescale(case.mri, mean, syn.std(axis=0), head)
        rows.append(row)

    print(f"{len(args.runs)} members: " + ", ".join(str(r) for r in args.runs))
    print("| patient | MAE ensemble | MAE members | MAE lookup | ratio | SSIM ens | SSIM lookup | SSIM in head | "
          + " | ".join(f"ρ {m}" for m in MAPS) + " |")
    print("|---" * (8 + len(MAPS)) + "|")
    for r in rows:
        e, lk = r["ensemble"], r["lookup"]
        print(f"| {r['patient']} | {e['mae']:.2f} | {' '.join(f'{v:.1f}' for v in r['members_mae'])} | {lk['mae']:.2f} "
              f"| {e['mae'] / lk['mae']:.3f} | {e['ssim']:.3f} | {lk['ssim']:.3f} | {e['ssim_foreground']:.3f} | "
              + " | ".join(_fmt(r["uncertainty"][m]["unc_spearman"]) for m in MAPS) + " |")

    print("\noracle (sees the real MRI): prediction rescaled a·x + b to the patient's MRI over the head")
    for r in rows:
        o = r["oracle_rescale"]
        print(f"patient {r['patient']}: a {o['a']:.2f} b {o['b']:+.1f}; in-head MAE {o['mae_head']:.1f} -> "
              f"{o['mae_head_after']:.1f}; Spearman(members' SD, error after) {_fmt(o['members_spearman_after'])}")

    def mean_of(get) -> float:
        return float(np.mean([get(r) for r in rows]))

    ratio = mean_of(lambda r: r["ensemble"]["mae"] / r["lookup"]["mae"])
    summary = {
        "members": [str(r) for r in args.runs],
        "mae": mean_of(lambda r: r["ensemble"]["mae"]), "mae_lookup": mean_of(lambda r: r["lookup"]["mae"]),
        "mae_ratio_mean": ratio, "mae_below_lookup": sum(r["ensemble"]["mae"] < r["lookup"]["mae"] for r in rows),
        "ssim": mean_of(lambda r: r["ensemble"]["ssim"]), "ssim_lookup": mean_of(lambda r: r["lookup"]["ssim"]),
        "ssim_foreground": mean_of(lambda r: r["ensemble"]["ssim_foreground"]),
        "spearman": {m: _mean_min([r["uncertainty"][m]["unc_spearman"] for r in rows]) for m in MAPS},
    }
    print(f"\nmean: MAE {summary['mae']:.2f} vs lookup {summary['mae_lookup']:.2f} (ratio of means "
          f"{summary['mae'] / summary['mae_lookup']:.3f}, mean of ratios {ratio:.3f}; lower on "
          f"{summary['mae_below_lookup']}/{len(rows)}); SSIM {summary['ssim']:.3f} vs {summary['ssim_lookup']:.3f} "
          f"({summary['ssim'] - summary['ssim_lookup']:+.3f}); SSIM in head {summary['ssim_foreground']:.3f}")
    print("Spearman(map, |error|), mean [min]: " + "; ".join(
        f"{m} {_fmt(v['mean'])} [{_fmt(v['min'])}]" for m, v in summary["spearman"].items()))
    if args.json:
        from CTtoMRISynthesisLib.metrics import to_jsonable

        args.json.write_text(json.dumps(to_jsonable({"summary": summary, "patients": rows}), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
