"""False bright spots: how much of the brain tissue a synthetic MRI makes as bright as CSF, on the external CTs.

The other hospital's noisy 8-bit CTs come out with T2-bright speckles in the white matter (README, "On CT the model
never saw"; rounds 11, 12 and 21 in ``model_weights/RECIPES.md`` match the CT's grain to fight them). Measured here
for each model given, on every external CT that ``external_ct.py`` reads: the share of brain-tissue voxels whose
synthetic MRI is at least as bright as the median of the synthetic MRI in CSF. The tissues come from the CT, as in
``external_ct.py``: on HU CT brain tissue is 25..45 HU and CSF 0..15 HU inside the skull; on 8-bit CT the strict
masks of ``contrast.tissue_masks`` (inside the skull, the smoothed CT's 40th–90th percentile and its darkest 10 %).
Sulci and partial volume count too, so a clean CT does not give 0: compare models on the same CT, and CTs with
each other. Second table, the speckles themselves: the synthetic MRI's fine texture in brain tissue, the mean
absolute difference from its own 5 × 5 in-plane median, in grey levels (a robust SD would ignore sparse spots;
compare models on one CT: the outputs' pixel sizes differ between CTs). Numbers only (the images have no open licence).

    python experiments/bright_spots.py [--weights FILE ...] [--data ../shared/data] [--reference]

``--reference`` adds what a real T2 gives with the same 8-bit masks: the Harvard T2 patients' own MRIs (patient 2,
FLAIR/PD-like, left out), each measured against the strict masks of its registered 8-bit CT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from external_ct import ROOT, _syn, external_cts  # noqa: E402

from CTtoMRISynthesisLib.weights import load_model  # noqa: E402


def bright_share(syn: np.ndarray, csf: np.ndarray, brain: np.ndarray) -> float:
    """The share of ``brain`` voxels at least as bright as the median of ``syn`` in ``csf`` (nan if a mask is empty)."""
    if not csf.any() or not brain.any():
        return float("nan")
    return float((syn[brain] >= np.median(syn[csf])).mean())


def fine_texture(syn: np.ndarray, brain: np.ndarray) -> float:
    """Mean |``syn`` minus its 5 × 5 in-plane median| over ``brain`` (nan if empty): speckles raise it."""
    from scipy import ndimage

    if not brain.any():
        return float("nan")
    return float(np.abs(syn - ndimage.median_filter(syn, size=(1, 5, 5)))[brain].mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", nargs="+", default=[None], help="model files (default: the shipped model)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--reference", action="store_true", help="also the Harvard T2 patients' real MRIs")
    args = parser.parse_args()
    models = [load_model(w) for w in args.weights]
    names = [str(w) if w else "shipped model" for w in args.weights]
    print("share of brain-tissue voxels at least as bright as the synthetic MRI's median in CSF (masks from the CT)\n")
    print("| CT | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    textures = []
    for name, image, masks, _variants in external_cts(args.data):
        csf, brain = (masks["csf_strict"], masks["brain_strict"]) if "csf_strict" in masks else (masks["csf"], masks["brain"])
        syntheses = [_syn(model, image) for model in models]
        shares = [bright_share(syn, csf, brain) for syn in syntheses]
        textures.append((name, [fine_texture(syn, brain) for syn in syntheses]))
        print(f"| {name} | " + " | ".join(f"{100 * s:.1f} %" for s in shares) + " |", flush=True)
    print("\nfine texture in brain tissue: mean |synthetic MRI - its 5 x 5 median| (grey levels)\n")
    print("| CT | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for name, values in textures:
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    if args.reference:
        reference_rows(args.data / "harvard_aanlib_ct_mri_2d")
    return 0


def reference_rows(folder: Path) -> None:
    """The same share for the real T2 of each Harvard T2 patient, masks from its own 8-bit CT."""
    from CTtoMRISynthesisLib.contrast import tissue_masks
    from CTtoMRISynthesisLib.intensity import CTWindow
    from CTtoMRISynthesisLib.training.discovery import discover

    print("\n| Harvard patient (real T2, masks from its CT) | share |")
    print("|---|---|")
    for case in discover([str(folder)], CTWindow(45, 120)):
        if case.case_id == "2":  # FLAIR/PD-like, not T2
            continue
        masks = tissue_masks(case.ct)
        share = bright_share(case.mri.astype(np.float32), masks["csf"], masks["brain"])
        print(f"| {case.case_id} | {100 * share:.1f} % |")


if __name__ == "__main__":
    raise SystemExit(main())
