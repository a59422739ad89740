"""Can the synthetic MRI be given T2's CSF contrast after the fact, and what does that cost? Issue 11, aims 1
and 2 against each other.

The ensemble predicts an average brightness where CT cannot tell (CSF/brain 1.37 on the held-out Harvard
patients with the strict masks, real T2 1.66). A monotone remapping keeps the prediction's order of voxels
but gives its head the grey-level distribution of real T2: for each held-out patient, the prediction's
in-head ranks are mapped to the mean in-head quantiles of the *other* patients' real MRIs (no peeking), and
blended with the prediction by α (0 = as shipped, 1 = fully remapped). Each row: MAE (foreground), SSIM,
SSIM in head and the median strict CSF/brain ratio over the 8 held-out patients.

    python experiments/contrast_tradeoff.py RUN [RUN ...] [--data DIR] [--external] [--not-t2 2]

``--not-t2 ID`` keeps a patient whose MRI is another sequence (Harvard patient 2, FLAIR/PD-like) out of
every reference distribution; it is still remapped and scored.

``--external`` also applies the same remapping (reference: all the patients' real T2) to the shipped model's
synthetic MRI of the external CTs of ``experiments/external_ct.py`` and prints their CSF/brain ratios
(masks from the CT, as there) for α 0, 0.5 and 1: would such a step reach aim 2 on CT from elsewhere?

Numbers only; the data's images are not written anywhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "CTtoMRISynthesis"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

QUANTILES = np.linspace(0.0, 1.0, 257)
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def remapped(pred: np.ndarray, head: np.ndarray, reference_quantiles: np.ndarray) -> np.ndarray:
    """``pred`` with its in-head values replaced by the reference quantile of their rank (order kept)."""
    out = pred.copy()
    values = pred[head]
    ranks = np.argsort(np.argsort(values, kind="stable"), kind="stable") / max(values.size - 1, 1)
    out[head] = np.interp(ranks, QUANTILES, reference_quantiles)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished `ctmri train --cv loo` run folders (the ensemble)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "harvard_aanlib_ct_mri_2d"))
    parser.add_argument("--external", action="store_true", help="also the external CTs (needs ../shared/data)")
    parser.add_argument("--not-t2", nargs="+", default=[], metavar="ID", help="patients left out of the T2 references")
    args = parser.parse_args()

    from external_ct import masks_8bit, ratio

    from CTtoMRISynthesisLib.error_model import cv_samples
    from CTtoMRISynthesisLib.intensity import CTWindow
    from CTtoMRISynthesisLib.training.discovery import discover
    from CTtoMRISynthesisLib.training.report import evaluate

    cases = discover([args.data], CTWindow(45, 120))
    samples = cv_samples(args.runs, cases)
    quantiles = {s.case_id: np.quantile(s.real[s.head].astype(np.float32), QUANTILES) for s in samples
                 if s.case_id not in args.not_t2}
    rows, real_ratios = {a: [] for a in ALPHAS}, []
    for case, s in zip(cases, samples):
        reference = np.mean([q for cid, q in quantiles.items() if cid != s.case_id], axis=0)
        mapped = remapped(s.mean, s.head, reference)
        masks = masks_8bit(case.ct)
        real_ratios.append(ratio(case.mri.astype(np.float32), masks["csf_strict"], masks["brain_strict"]))
        for a in ALPHAS:
            p = (1 - a) * s.mean + a * mapped
            e = evaluate(case.mri, p, case.ct, 200.0)
            rows[a].append((e["mae"], e["ssim"], e["ssim_foreground"], ratio(p, masks["csf_strict"], masks["brain_strict"])))
    real = np.median(real_ratios)
    print(f"{len(args.runs)} runs; real MRI's strict CSF/brain median {real:.2f}")
    print("| α (share remapped to T2's distribution) | MAE | SSIM | SSIM in head | CSF/brain strict, median |")
    print("|---|---|---|---|---|")
    for a, values in rows.items():
        v = np.array(values)
        print(f"| {a:.2f} | {v[:, 0].mean():.2f} | {v[:, 1].mean():.3f} | {v[:, 2].mean():.3f} | {np.median(v[:, 3]):.2f} |")
    if args.external:
        external(np.mean(list(quantiles.values()), axis=0), Path(args.data).parent)
    return 0


def external(reference_quantiles: np.ndarray, data: Path) -> None:
    """CSF/brain of the shipped model's output on the external CTs, as is and remapped (α 0.5, 1)."""
    from external_ct import _syn, external_cts, ratio

    from CTtoMRISynthesisLib.weights import load_model

    model = load_model()
    print("\n| external CT | CSF / brain, α 0 (shipped) | α 0.5 | α 1 | strict masks (8-bit), α 0 / 0.5 / 1 |")
    print("|---|---|---|---|---|")
    for name, image, masks, _ in external_cts(data):
        syn = _syn(model, image)
        mapped = remapped(syn, masks["head"], reference_quantiles)
        outs = [(1 - a) * syn + a * mapped for a in (0.0, 0.5, 1.0)]
        plain = " | ".join(f"{ratio(o, masks['csf'], masks['brain']):.2f}" for o in outs)
        strict = (" / ".join(f"{ratio(o, masks['csf_strict'], masks['brain_strict']):.2f}" for o in outs)
                  if "csf_strict" in masks else "–")
        print(f"| {name} | {plain} | {strict} |")


if __name__ == "__main__":
    raise SystemExit(main())
