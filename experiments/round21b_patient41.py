"""Round 21b: what the 3 × 3 median grain matching changes on Harvard, where it touches only patient 41.

The rule, written before these numbers: ``model_weights/report/evaluation/round21b_rule_written_first.md``.
Scores patient 41's held-out prediction by the four-member ensemble of fold-8 runs twice, as shipped (``--plain``:
the trainer's saved predictions) and with the median (``--median``: the copies ``experiments/grain_cv.py
--filter median`` made), and carries the change over to round 10's recorded eight-patient figures.

    python experiments/round21b_patient41.py --plain RUN/b8e60 RUN/bag1 RUN/bag2 RUN/bag3 \\
        --median MED/b8e60 MED/bag1 MED/bag2 MED/bag3 [--data DIR] [--weights model_weights/ctmri_unet.safetensors]

Numbers only; no image is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "CTtoMRISynthesis"))

PATIENT = "41"
# Round 10's recorded eight-patient figures (RECIPES.md, round 11's table; report/evaluation/error_model_cv.txt)
RECORDED = {"mae": 37.19, "ssim_foreground": 0.252, "rho_mean": 0.242, "rho_lowest_other": 0.062, "rho_41": 0.324}
LIMITS = {"mae": 37.49, "ssim_foreground": 0.247, "rho_mean": 0.232, "rho_lowest": 0.050}
PATIENTS = 8


def score(run_dirs: list, case, error_model) -> dict:
    """The ensemble's foreground MAE and SSIM in the head for the patient, and the Spearman of the shipped error
    model's map (from the ensemble's mean and members' SD, as the shipped file makes it) with the error."""
    from CTtoMRISynthesisLib.error_model import Sample
    from CTtoMRISynthesisLib.intensity import head_mask
    from CTtoMRISynthesisLib.training.report import evaluate, held_out_predictions, uncertainty_quality

    syns, _, folds = held_out_predictions(run_dirs, case.case_id, [case])
    if len(syns) != len(run_dirs):
        raise SystemExit(f"patient {case.case_id} is held out in {len(syns)} of the {len(run_dirs)} runs")
    stack = np.stack(syns)
    sample = Sample(case.case_id, stack.mean(0), stack.std(0), case.mri, head_mask(case.ct), case.ct)
    metrics = evaluate(case.mri, sample.mean, case.ct, 200.0)
    quality = uncertainty_quality(case.mri, sample.mean, sample.predict_with(error_model), sample.head)
    return {"mae": metrics["mae"], "ssim_foreground": metrics["ssim_foreground"], "rho": quality["unc_spearman"],
            "folds": [str(f) for f in folds]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", nargs="+", type=Path, required=True)
    parser.add_argument("--median", nargs="+", type=Path, required=True)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "harvard_aanlib_ct_mri_2d"))
    parser.add_argument("--weights", type=Path, default=ROOT / "model_weights" / "ctmri_unet.safetensors")
    args = parser.parse_args()

    from CTtoMRISynthesisLib.intensity import CTWindow
    from CTtoMRISynthesisLib.training.discovery import discover
    from CTtoMRISynthesisLib.weights import load_model

    case = next(c for c in discover([args.data], CTWindow(45, 120)) if c.case_id == PATIENT)
    error_model = load_model(args.weights).error_model
    plain, median = score(args.plain, case, error_model), score(args.median, case, error_model)
    delta = {k: median[k] - plain[k] for k in ("mae", "ssim_foreground", "rho")}

    print(f"patient {PATIENT}, the {len(args.plain)}-member ensemble of fold 8 (CPU-trained), shipped error model of "
          f"{args.weights.name}")
    print("| prediction | foreground MAE | SSIM in head | uncertainty Spearman |")
    print("|---|---|---|---|")
    for name, row in (("as shipped", plain), ("3 × 3 median", median)):
        print(f"| {name} | {row['mae']:.3f} | {row['ssim_foreground']:.4f} | {row['rho']:.4f} |")
    print(f"| change | {delta['mae']:+.3f} | {delta['ssim_foreground']:+.4f} | {delta['rho']:+.4f} |")
    judged = {
        "mae": RECORDED["mae"] + delta["mae"] / PATIENTS,
        "ssim_foreground": RECORDED["ssim_foreground"] + delta["ssim_foreground"] / PATIENTS,
        "rho_mean": RECORDED["rho_mean"] + delta["rho"] / PATIENTS,
        "rho_lowest": min(RECORDED["rho_lowest_other"], RECORDED["rho_41"] + delta["rho"]),
    }
    print()
    print("| condition | recorded (round 10) | judged | limit | holds |")
    print("|---|---|---|---|---|")
    rows = (("(a) Harvard ensemble MAE", "mae", RECORDED["mae"], "≤"),
            ("(a) Harvard SSIM in head", "ssim_foreground", RECORDED["ssim_foreground"], "≥"),
            ("(d) uncertainty Spearman, mean", "rho_mean", RECORDED["rho_mean"], "≥"),
            ("(d) uncertainty Spearman, lowest", "rho_lowest", RECORDED["rho_lowest_other"], "≥"))
    holds = []
    for label, key, recorded, sign in rows:
        holds.append(judged[key] <= LIMITS[key] if sign == "≤" else judged[key] >= LIMITS[key])
        print(f"| {label} | {recorded:.3f} | {judged[key]:.4f} | {sign} {LIMITS[key]:.3f} | {'yes' if holds[-1] else 'no'} |")
    print(f"\n(a) and (d) {'hold' if all(holds) else 'do not hold'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
