"""Intensity normalisation: the paper's per-volume min-max to 0..255, with a Hounsfield window for CT.

The training CT (Harvard AANLIB) is already brain-windowed 8-bit. A user's CT is usually in Hounsfield
units; it is mapped through the window stored in the weights config so that it looks like the
training CT, then used as is (the window already spans 0..255). Which path was taken is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import CTMRIError

# CT stored without its rescale intercept: air ≈ 0 and water ≈ 1024 instead of -1000 and 0.
HU_OFFSET = 1024.0


@dataclass(frozen=True)
class CTWindow:
    """Hounsfield window mapping [level - width/2, level + width/2] linearly onto 0..255."""

    level: float
    width: float

    def apply(self, hu: np.ndarray) -> np.ndarray:
        low = self.level - self.width / 2.0
        return (np.clip((hu - low) / self.width, 0.0, 1.0) * 255.0).astype(np.float32)


def check_finite(array: np.ndarray, what: str) -> None:
    """Refuse NaN/Inf and empty arrays with a message saying what to do."""
    if array.size == 0:
        raise CTMRIError(f"the {what} image is empty (no voxels); load a non-empty volume")
    if not np.isfinite(array).all():
        raise CTMRIError(f"the {what} image contains NaN or infinite values; fix or mask them and retry")


def minmax_255(array: np.ndarray, what: str = "image") -> np.ndarray:
    """The paper's Eq. 1: (x - min) / (max - min) * 255, per volume."""
    check_finite(array, what)
    low, high = float(array.min()), float(array.max())
    if high - low <= 0:
        raise CTMRIError(f"the {what} image is constant (all voxels = {low:g}); it holds no anatomy to use")
    return ((array.astype(np.float64) - low) * (255.0 / (high - low))).astype(np.float32)


def classify_ct(array: np.ndarray) -> str:
    """'windowed8bit' for an already display-windowed 0..255 CT, 'hu' for Hounsfield, 'hu+1024' when offset."""
    low, high = float(array.min()), float(array.max())
    if low >= 0 and high <= 255 and np.array_equal(array, np.round(array)):
        return "windowed8bit"
    # No negative value at all but bone-like highs: stored as HU + 1024 (missing rescale intercept).
    if low >= -10 and high > 1000:
        return "hu+1024"
    return "hu"


def normalise_ct(array: np.ndarray, window: CTWindow) -> tuple[np.ndarray, dict]:
    """CT voxels → 0..255 the way the model was trained; returns the array and what was done."""
    check_finite(array, "CT")
    kind = classify_ct(array)
    if kind == "windowed8bit":
        out = minmax_255(array, "CT")
        info = {"ct_path": kind, "description": "8-bit windowed CT: per-volume min-max to 0..255"}
    else:
        hu = array.astype(np.float32) - (HU_OFFSET if kind == "hu+1024" else 0.0)
        out = window.apply(hu)
        info = {
            "ct_path": kind,
            "description": (
                f"Hounsfield CT{' stored with +1024 offset (subtracted)' if kind == 'hu+1024' else ''}: "
                f"window level {window.level:g} / width {window.width:g} HU to 0..255"
            ),
            "window": {"level": window.level, "width": window.width},
        }
        if float(out.max()) == float(out.min()):
            raise CTMRIError(
                "the CT is constant after the Hounsfield window: it is not a head CT in HU "
                "(check the file, or give an 8-bit windowed CT)"
            )
    return out, info


def normalise_mri(array: np.ndarray) -> np.ndarray:
    """Reference MRI → 0..255 by per-volume min-max (the paper's Eq. 1)."""
    return minmax_255(array, "MRI")


def head_mask(ct255: np.ndarray, threshold: float = 10.0) -> np.ndarray:
    """Head region of a normalised (z, y, x) CT: above ``threshold``, holes filled slice by slice.

    Outside the head the synthetic MRI is set to 0, as the reference MRI's background is 0; a faint
    grey background costs a lot of whole-slice SSIM for nothing.
    """
    from scipy import ndimage

    mask = ct255 > threshold
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)  # fill holes within each axial slice only
    return ndimage.binary_fill_holes(mask, structure=in_plane)
