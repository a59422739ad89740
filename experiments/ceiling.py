"""Experiment: how far can any CT→MRI method go on the Harvard pairs? Reference rows for the report.

For every patient, metrics (core library: foreground MAE, whole-slice SSIM, SSIM in head) of
predictions that *know* something about the real MRI, so none of them is a method; they bound what the
metrics can reward:

- ``oracle_constant``: the patient's own mean MRI inside the CT head mask (knows the patient's scale),
- ``oracle_lut``: a CT→MRI grey-level lookup table fit on the patient itself (best pointwise mapping),
- ``mri_blur_s``: the real MRI blurred by a Gaussian of sigma s pixels, inside the CT head mask
  (a perfect but blurry synthesis: what a model that gets everything but fine detail right scores),
- ``mri_shift_p``: the real MRI shifted p pixels left (a perfect synthesis, slightly misregistered).

    python experiments/ceiling.py [DATA]    # DATA defaults to ../shared/data
"""
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from CTtoMRISynthesisLib.intensity import CTWindow, head_mask
from CTtoMRISynthesisLib.metrics import compute_metrics
from CTtoMRISynthesisLib.training.discovery import discover
from CTtoMRISynthesisLib.training.report import reference_predictions

DATA = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "data")
cases = discover([DATA / "harvard_aanlib_ct_mri_2d"], CTWindow(45, 120))


def score(case, syn):
    m = compute_metrics(case.mri, syn)
    return m["mae"], m["ssim"], m["ssim_foreground"]


rows = {}
for case in cases:
    mask = head_mask(case.ct)
    refs = reference_predictions(case)  # the report's rows: own lookup table, blur σ 1 px, shift 1 px
    r = {}
    r["oracle_constant"] = score(case, np.where(mask, float(case.mri[mask].mean()), 0.0))
    r["oracle_lut"] = score(case, refs["ref_own_lookup"])
    r["mri_blur_1"] = score(case, refs["ref_blur1"])
    for s in (2, 4):
        blurred = ndimage.gaussian_filter(case.mri, sigma=(0, s, s))
        r[f"mri_blur_{s}"] = score(case, np.where(mask, blurred, 0.0))
    r["mri_shift_1"] = score(case, refs["ref_shift1"])
    r["mri_shift_2"] = score(case, np.roll(case.mri, -2, axis=2))
    rows[case.case_id] = r
    fg = case.mri > 0
    print(f"patient {case.case_id}: MRI head mean {case.mri[fg].mean():.1f} median {np.median(case.mri[fg]):.1f}; "
          + "; ".join(f"{k} {v[0]:.1f}/{v[1]:.3f}/{v[2]:.3f}" for k, v in r.items()), flush=True)

print("\nmean over patients: foreground MAE | SSIM | SSIM in head")
for key in next(iter(rows.values())):
    vals = np.array([rows[c][key] for c in rows])
    print(f"{key:16s} {vals[:, 0].mean():6.2f} | {vals[:, 1].mean():.3f} | {vals[:, 2].mean():.3f}"
          f"   (SSIM min {vals[:, 1].min():.3f})")
