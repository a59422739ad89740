"""Would smoothing the CT in-plane before the network help? A probe of an inference-only change.

Looked at as pictures, the shipped (context 0) model turns dark grains of CT noise in the white matter of
noisy 8-bit CTs into small bright spots. A Gaussian blur of the CT before the network (in-plane, σ in pixels
of the model's 256 × 256 grid, so σ × width / 256 of a larger CT's own pixels) would damp them. This measures what it would cost or gain, with no retraining:

- Harvard, cross-validated: each held-out patient predicted by the fold models of the given runs that
  held it out (their mean, flip averaging as at inference, masked with the unblurred CT's head mask), MAE
  and SSIM (whole slice and in the head) per σ; σ 0 reproduces the runs' report;
- the external CTs of ``external_ct.py``: CSF / brain tissue of the shipped model's output (Otsu or HU
  masks; strict masks for 8-bit CT), masks always from the CT as given.

    python experiments/input_smoothing.py RUN [RUN ...] [--sigmas 0 0.5 1] [--weights FILE] [--data DIR]

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


def blurred(ct: np.ndarray, sigma: float) -> np.ndarray:
    """The CT blurred in-plane by ``sigma`` pixels (unchanged for 0), float32."""
    from scipy import ndimage

    ct = ct.astype(np.float32)
    return ndimage.gaussian_filter(ct, sigma=(0, sigma, sigma)) if sigma > 0 else ct


def held_out_fold_models(runs: list[Path], case_id: str) -> list:
    """The model of each run's fold that held ``case_id`` out."""
    from CTtoMRISynthesisLib.training.report import fold_model
    from CTtoMRISynthesisLib.weights import load_model, read_config

    models = []
    for run in runs:
        for fold in sorted(run.glob("fold*")):
            if read_config(fold_model(fold))["split"]["test_cases"] == [case_id]:  # the header only
                models.append(load_model(fold_model(fold)))
                break
        else:
            raise SystemExit(f"no fold of {run} holds patient {case_id} out alone")
    return models


def harvard(runs: list[Path], data: str, sigmas: list[float]) -> None:
    from CTtoMRISynthesisLib.intensity import CTWindow, head_mask
    from CTtoMRISynthesisLib.synthesis import predict_volume, preprocessing_options
    from CTtoMRISynthesisLib.training.discovery import discover
    from CTtoMRISynthesisLib.training.report import evaluate

    cases = sorted(discover([data], CTWindow(45, 120)), key=lambda c: int(c.case_id))
    scores = {s: [] for s in sigmas}
    for case in cases:
        models = held_out_fold_models(runs, case.case_id)
        head = head_mask(case.ct)
        for sigma in sigmas:
            ct = blurred(case.ct, sigma)
            preds = []
            for loaded in models:
                options = dict(preprocessing_options(loaded.config["preprocessing"]), mask_output=False)
                preds.append(predict_volume(loaded.net, ct, **options).mean)
            syn = np.where(head, np.mean(preds, axis=0), 0.0).astype(np.float32)
            r = evaluate(case.mri, syn, case.ct, 200.0)
            scores[sigma].append((r["mae"], r["ssim"], r["ssim_foreground"]))
    ids = ", ".join(c.case_id for c in cases)
    print(f"| CT blur σ (px) | MAE | SSIM | SSIM in head | MAE per patient ({ids}) |")
    print("|---|---|---|---|---|")
    for sigma in sigmas:
        v = np.array(scores[sigma])
        print(f"| {sigma:g} | {v[:, 0].mean():.2f} | {v[:, 1].mean():.3f} | {v[:, 2].mean():.3f} | "
              + " ".join(f"{x:.1f}" for x in v[:, 0]) + " |")


def external(weights: str | None, data: Path, sigmas: list[float]) -> None:
    import SimpleITK as sitk
    from external_ct import _syn, _with_array, contrast, external_cts

    from CTtoMRISynthesisLib.weights import default_weights_path, load_model

    model = load_model(weights or default_weights_path())
    print("\n| external CT | " + " | ".join(f"CSF / brain (strict), σ {s:g}" for s in sigmas) + " |")
    print("|---" * (len(sigmas) + 1) + "|")
    for name, image, masks, _ in external_cts(data):
        array = sitk.GetArrayFromImage(image)
        per_pixel = array.shape[-1] / 256.0  # σ is given on the model's grid
        cells = []
        for sigma in sigmas:
            smooth = image if sigma == 0 else _with_array(image, blurred(array, sigma * per_pixel).astype(array.dtype))
            c = contrast(_syn(model, smooth), masks)
            strict = c["csf_over_brain_strict"]
            cells.append(f"{c['csf_over_brain']:.2f}" + ("" if np.isnan(strict) else f" ({strict:.2f})"))
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished `ctmri train --cv loo` runs (the ensemble's members)")
    parser.add_argument("--sigmas", nargs="+", type=float, default=[0.0, 0.5, 1.0])
    parser.add_argument("--weights", help="model for the external CTs (default: the shipped model)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    harvard(args.runs, str(Path(args.data) / "harvard_aanlib_ct_mri_2d"), args.sigmas)
    external(args.weights, Path(args.data), args.sigmas)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
