"""Which learned error map tracks the held-out error best? Issue 11, aim 4: the record behind the shipped
error model (CTtoMRISynthesisLib/error_model.py).

For each feature set below, the error model is fit on the other patients' held-out errors and scored on the
patient's own (nested leave-one-patient-out over the CV runs' predictions), by the report's
``uncertainty_quality``: the Spearman correlation between the map and |real − synthetic| over head voxels.
Rows:

- ``shipped``: every feature of ``error_model.FEATURES`` (spread, its blurs, gradients, local SD, intensity),
- ``no intensity``: the same without the prediction's own brightness,
- ``intensity only``: the brightness alone (does the map only learn "bright = wrong"?),
- ``spread only``: the members' SD and its blurs (the ensemble's disagreement, learned),
- ``members' SD``: the raw SD, unfitted (what shipped before);
- round 15 (its rule: ``report/evaluation/round15_error_features_rule_written_first.md``, applied by
  ``experiments/error_features_rule.py``): ``shipped + depth`` (where the voxel lies in the head: ``depth``,
  ``depth_rel``), ``shipped + ct`` (the windowed CT: ``ct``, ``ct_grad1``, ``ct_local_sd3``) and both.

And a ceiling for context (not methods: they see the real MRI). ``knows local scale σ``: the real local RMS
error (Gaussian-weighted over σ px in-plane, head voxels only) as the map, scored (a) against the real
|error| and (b) against an |error| drawn half-normal around that same scale, i.e. the best any map of the
error's scale at that resolution could do if the error were pure noise around it: |error| varies around its
own scale, so even a perfect scale map scores well below 1. ``fit on the patient's own errors``: the shipped
feature set fit to the scored patient's own errors (in-sample), i.e. about the best these features of this
ensemble's output can rank that patient's error; below the aim there, no error model on them reaches it.
Out of sample within the patient (``--half-split``): the map fit on the patient's even slices alone, and on
the other patients plus those even slices, each scored on the patient's odd slices (whose neighbours it has
seen), beside the shipped nested map scored on the same odd slices: does the relation learned on one half of
a patient hold on the other half, where it does not hold from one patient to the next?
``--transfer-matrix`` prints a second table: the map fit on one patient's errors alone (row), scored on every
patient (column), and per column the best row other than the patient itself: if no single training
patient's relation ranks a patient's error, the relation that patient needs is not in the training set.

    python experiments/error_model_cv.py RUN [RUN ...] [--data DIR] [--steps 3000] [--seed 0] [--sets shipped ...]
        [--exclude-from-training ID ...]

Numbers only; the data's images are not written anywhere. About 1 min per feature set on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "CTtoMRISynthesis"))

from CTtoMRISynthesisLib.error_model import FEATURES  # noqa: E402  (numpy only; the sets below extend it)

SETS = {
    "shipped": None,  # error_model.FEATURES
    "no intensity": ("spread", "spread_blur1", "spread_blur2", "spread_blur4", "grad1", "grad2", "grad4",
                     "local_sd3", "local_sd7"),
    "intensity only": ("intensity",),
    "spread only": ("spread", "spread_blur1", "spread_blur2", "spread_blur4"),
    # round 15 (rule: report/evaluation/round15_error_features_rule_written_first.md)
    "shipped + depth": FEATURES + ("depth", "depth_rel"),
    "shipped + ct": FEATURES + ("ct", "ct_grad1", "ct_local_sd3"),
    "shipped + depth + ct": FEATURES + ("depth", "depth_rel", "ct", "ct_grad1", "ct_local_sd3"),
}


def local_rms_error(sample, sigma: float) -> np.ndarray:
    """The real error's local RMS over head voxels (Gaussian weights of σ px in-plane), at the head voxels."""
    from scipy import ndimage

    head = sample.head.astype(np.float32)
    err2 = (sample.real.astype(np.float32) - sample.mean) ** 2 * head
    weight = np.maximum(ndimage.gaussian_filter(head, (0, sigma, sigma)), 1e-3)
    return np.sqrt(ndimage.gaussian_filter(err2, (0, sigma, sigma)) / weight)[sample.head]


def half(sample, start: int):
    """The sample's even (``start`` 0) or odd (1) slices as a sample of their own."""
    from CTtoMRISynthesisLib.error_model import Sample

    cut = slice(start, None, 2)
    return Sample(sample.case_id, sample.mean[cut], sample.spread[cut], sample.real[cut], sample.head[cut],
                  None if sample.ct is None else sample.ct[cut])


def half_split_rows(samples: list, nested_maps, args) -> dict:
    """Rows scored on each patient's odd slices: the nested map (if given) and two fits that saw its even slices."""
    from CTtoMRISynthesisLib.error_model import fit
    from CTtoMRISynthesisLib.training.report import uncertainty_quality

    rho = lambda s, m: uncertainty_quality(s.real, s.mean, m, s.head)["unc_spearman"]
    rows = {}
    if nested_maps is not None:
        rows["shipped, scored on the odd slices only"] = [rho(half(s, 1), nested_maps[s.case_id][1::2]) for s in samples]
    own, with_others = [], []
    for s in samples:
        even, odd = half(s, 0), half(s, 1)
        others = [o for o in samples if o is not s and o.case_id not in args.exclude_from_training]
        own.append(rho(odd, odd.predict_with(fit([even, even], steps=args.steps, seed=args.seed))))
        with_others.append(rho(odd, odd.predict_with(fit(others + [even], steps=args.steps, seed=args.seed))))
        print(f"half split {s.case_id}: done", file=sys.stderr, flush=True)
    rows["ceiling: fit on the patient's even slices, scored on its odd slices"] = own
    rows["ceiling: fit on the other patients and the patient's even slices, scored on its odd slices"] = with_others
    return rows


def print_transfer_matrix(samples: list, args) -> None:
    """Spearman of the map fit on one patient's errors (row) on each patient (column); last row: best other."""
    from CTtoMRISynthesisLib.error_model import fit
    from CTtoMRISynthesisLib.training.report import uncertainty_quality

    ids = [s.case_id for s in samples]
    matrix = np.zeros((len(samples), len(samples)))
    for i, a in enumerate(samples):
        model = fit([a, a], steps=args.steps, seed=args.seed)  # fit() wants two samples; one patient twice weighs as once
        for j, b in enumerate(samples):
            matrix[i, j] = uncertainty_quality(b.real, b.mean, b.predict_with(model), b.head)["unc_spearman"]
        print(f"transfer matrix: row {a.case_id} done", file=sys.stderr, flush=True)
    print("Fit on one patient's errors alone (row), scored on each patient (column); the diagonal is in-sample.")
    print("| fit on \\ scored on | " + " | ".join(ids) + " |")
    print("|---" * (len(ids) + 1) + "|")
    for i, a in enumerate(ids):
        print(f"| {a} | " + " | ".join(f"{v:.3f}" for v in matrix[i]) + " |")
    usable = [i for i, a in enumerate(ids) if a not in args.exclude_from_training]
    best = [max(matrix[i, j] for i in usable if i != j) for j in range(len(ids))]
    print("| best other (never an excluded patient) | " + " | ".join(f"{v:.3f}" for v in best) + " |\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished `ctmri train --cv loo` run folders (the ensemble)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "harvard_aanlib_ct_mri_2d"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0, help="the fits' seed (the shipped error model: 0)")
    parser.add_argument("--sets", nargs="*", choices=list(SETS), default=list(SETS), help="feature sets to fit (none: only the other rows)")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the ceiling rows")
    parser.add_argument("--half-split", action="store_true",
                        help="add the rows fit on the patient's even slices and scored on its odd slices")
    parser.add_argument("--transfer-matrix", action="store_true",
                        help="also print the table of maps fit on one patient and scored on each")
    parser.add_argument("--exclude-from-training", nargs="+", default=[], metavar="ID",
                        help="never fit on these patients' errors (they are still scored), as the CLI's option")
    args = parser.parse_args()

    from scipy.stats import spearmanr

    from CTtoMRISynthesisLib.error_model import cross_validated_maps, cv_samples, fit
    from CTtoMRISynthesisLib.intensity import CTWindow
    from CTtoMRISynthesisLib.training.discovery import discover
    from CTtoMRISynthesisLib.training.report import uncertainty_quality

    samples = cv_samples(args.runs, discover([args.data], CTWindow(45, 120)))
    ids = [s.case_id for s in samples]
    table = {"members' SD": [uncertainty_quality(s.real, s.mean, s.spread, s.head)["unc_spearman"] for s in samples]}
    nested = {}
    for name in args.sets:
        maps = cross_validated_maps(samples, names=SETS[name] or FEATURES, steps=args.steps, seed=args.seed,
                                    exclude=tuple(args.exclude_from_training))
        table[name] = [uncertainty_quality(s.real, s.mean, maps[s.case_id], s.head)["unc_spearman"] for s in samples]
        nested[name] = maps
        print(f"{name}: done", file=sys.stderr, flush=True)

    if args.half_split:
        table.update(half_split_rows(samples, nested.get("shipped"), args))

    if not args.no_ceiling:
        # fit() wants two patients' rows; the same patient twice weighs its voxels as once
        table["ceiling: error model fit on the patient's own errors"] = [
            uncertainty_quality(s.real, s.mean, s.predict_with(fit([s, s], steps=args.steps, seed=args.seed)),
                                s.head)["unc_spearman"] for s in samples]
    rng = np.random.default_rng(0)
    for sigma in () if args.no_ceiling else (1, 2, 4, 8):
        real, drawn = [], []
        for s in samples:
            scale = local_rms_error(s, sigma)
            err = np.abs(s.real.astype(np.float32) - s.mean)[s.head]
            real.append(spearmanr(scale, err).statistic)
            drawn.append(spearmanr(scale, np.abs(scale * rng.standard_normal(scale.size))).statistic)
        table[f"ceiling: knows local scale σ {sigma} px, real |error|"] = real
        table[f"ceiling: knows local scale σ {sigma} px, half-normal |error|"] = drawn

    if args.transfer_matrix:
        print_transfer_matrix(samples, args)
    print(f"{len(args.runs)} runs: " + ", ".join(str(r) for r in args.runs)
          + (f"; fits never on {args.exclude_from_training}" if args.exclude_from_training else "")
          + f"; error-model seed {args.seed}")
    print("| map | " + " | ".join(ids) + " | mean | lowest |")
    print("|---" * (len(ids) + 3) + "|")
    for name, values in table.items():  # None: a constant map (e.g. members that agree everywhere) ranks nothing
        known = [v for v in values if v is not None]
        summary = f"{np.mean(known):.3f} | {min(known):.3f}" if known else "– | –"
        print(f"| {name} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in values) + f" | {summary} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
