"""Is the reference MRI T2-weighted? CSF against brain tissue, with both tissues found on the CT.

The shipped model makes T2-weighted images (CSF bright). Scored against a T1 or a FLAIR (CSF dark) the
difference map and the metrics show how two contrasts differ, not the model's error. The check: on the
reference grid, CSF and brain tissue are taken from the registered CT (0..255 as the model sees it), and
the reference MRI's mean in CSF is divided by its mean in brain tissue.

Masks (the ``strict`` ones of ``experiments/external_ct.py``, which measures issue 11's aim 2 with them):
intracranial = inside the skull (bone, CT ≥ 250, filled per axial slice, minus the bone), eroded 6 px;
CSF = its darkest 10 % on the CT smoothed by 1 px, brain tissue = its 40th–90th percentile.

Calibration (``python experiments/reference_contrast.py``, ``model_weights/report/evaluation/
reference_contrast.txt``): the real T2 of the 7 Harvard T2 patients gives 1.32–2.15; patient 2's
FLAIR/PD-like MRI 0.90; the 6 clinical patients' T1 0.13–0.73 and FLAIR 0.75–0.95, but 1.76 for one FLAIR
(a large cyst). :data:`T2_MIN_RATIO` lies in the gap; a ratio that cannot be measured (no skull in the
field of view, e.g. the top of the head) gives no warning.

Plain NumPy / SciPy on (z, y, x) arrays in axial slices.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .intensity import fill_holes_in_plane, head_mask, in_plane_structure

#: Below this CSF / brain ratio the reference MRI is said not to look T2-weighted (see the module docstring).
T2_MIN_RATIO = 1.1
BONE = 250.0  # 0..255 CT: bone is saturated in the brain window the model uses
ERODE_PX = 6


def intracranial(bone: np.ndarray, head: np.ndarray, erosion_px: int) -> np.ndarray:
    """Inside the skull (``bone`` filled per axial slice, minus the bone, within ``head``), eroded in-plane."""
    from scipy import ndimage

    inside = fill_holes_in_plane(bone) & ~bone & head
    return ndimage.binary_erosion(inside, in_plane_structure(), iterations=max(1, erosion_px))


def tissue_masks(ct255: np.ndarray) -> dict:
    """``head``, ``intracranial``, ``csf`` and ``brain`` (the strict masks) of a 0..255 CT (z, y, x)."""
    from scipy import ndimage

    head = head_mask(ct255, 10.0)
    box = intracranial(ct255 >= BONE, head, ERODE_PX)
    fine = ndimage.gaussian_filter(ct255.astype(np.float32), sigma=(0, 1, 1))
    low, b1, b2 = np.percentile(fine[box], [10, 40, 90]) if box.any() else (0.0, 0.0, 0.0)
    return {"head": head, "intracranial": box, "csf": box & (fine <= low), "brain": box & (fine >= b1) & (fine <= b2)}


def ratio(image: np.ndarray, csf: np.ndarray, brain: np.ndarray) -> float:
    """Mean of ``image`` in CSF over its mean in brain tissue (nan where a mask is empty or the tissue dark)."""
    ok = csf.any() and brain.any() and image[brain].mean() > 0
    return float(image[csf].mean() / image[brain].mean()) if ok else float("nan")


def reference_csf_over_brain(ct255: np.ndarray, mri255: np.ndarray) -> Optional[float]:
    """The reference MRI's CSF / brain tissue ratio, tissues from the CT on the same grid; None if unmeasurable."""
    masks = tissue_masks(ct255)
    value = ratio(mri255.astype(np.float32), masks["csf"], masks["brain"])
    return None if math.isnan(value) else value


def reference_warnings(csf_over_brain: Optional[float]) -> list:
    """A warning when the reference MRI does not look T2-weighted (CSF not brighter than brain tissue)."""
    if csf_over_brain is None or csf_over_brain >= T2_MIN_RATIO:
        return []
    return [
        f"the reference MRI does not look T2-weighted: its CSF is {csf_over_brain:.2f} × as bright as brain tissue "
        f"(CSF and brain tissue found on the registered CT; T2 gives more than {T2_MIN_RATIO:g}), as on a T1 or a "
        "FLAIR. The synthetic MRI is T2-weighted, so the difference map and the metrics show how two contrasts "
        "differ, not the model's error"
    ]
