"""Intensity normalisation: the paper's per-volume min-max to 0..255, with a Hounsfield window for CT.

The training CT (Harvard AANLIB) is already brain-windowed 8-bit. A user's CT is usually in Hounsfield
units; it is mapped through the window stored in the weights config so that it looks like the
training CT, then used as is (the window already spans 0..255). Which path was taken is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
        """``hu`` mapped onto 0..255, float32 (a new array: ``hu`` is not changed)."""
        hu = np.asarray(hu)
        width = float(self.width)  # Python floats, so that float32 input stays float32 arithmetic under NumPy 2
        low = float(self.level) - width / 2.0
        if hu.dtype != np.float32 or hu.ndim == 0:  # (integers and float64 are computed in float64)
            return np.asarray((np.clip((hu - low) / width, 0.0, 1.0) * 255.0), dtype=np.float32)
        # the same float32 arithmetic in one array: on a 512 × 512 × 300 CT the expression above makes four
        # 0.3-GB temporaries (1.3 s on 2 cores)
        out = hu - low
        out /= width
        np.clip(out, 0.0, 1.0, out=out)
        out *= 255.0
        return out


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


# Padding outside the scanner's field of view: one value far below everything else (e.g. -2000 stored,
# -3024 HU), covering at least this share of the voxels and at least PADDING_GAP below the next value.
PADDING_MIN_FRACTION = 0.001
PADDING_GAP = 200.0


def classify_ct(array: np.ndarray) -> str:
    """'windowed8bit' for an already display-windowed 0..255 CT, 'hu' for Hounsfield, 'hu+1024' when offset.

    Anything within 0..255 is a windowed CT, whole numbers or not: a head CT in HU always has air near
    -1000, and an 8-bit CT that was resampled (linear interpolation, e.g. ``ct_registered.nrrd``) is no
    longer whole numbers. The padding value of the scan-field corners is left out before looking for the
    +1024 offset: a CT stored without its rescale intercept has air near 0, whatever its padding.
    """
    low, high = float(array.min()), float(array.max())
    if low >= 0 and (high <= 255 or _is_8bit_widened(array, high)):
        return "windowed8bit"
    # No negative value at all (padding aside) but bone-like highs: stored as HU + 1024 (missing intercept).
    if _lowest_but_padding(array, low) >= -10 and high > 1000:
        return "hu+1024"
    return "hu"


def _is_8bit_widened(array: np.ndarray, high: float) -> bool:
    """An 8-bit picture saved as 16 bits (a PNG or TIFF export: every value ×257, 255 → 65535), which would
    otherwise read as HU + 1024. Min-max to 0..255 treats it as the 8-bit picture it is. A CT in HU + 1024
    has all its values multiples of 257 by chance with a vanishing probability; a strided sample is tested
    first, so a large HU volume costs almost nothing."""
    if high > 65535 or high <= 255:
        return False
    flat = array.reshape(-1)
    sample = flat[:: max(1, flat.size // 100_000)]
    return bool(np.all(np.mod(sample, 257) == 0) and np.all(np.mod(flat, 257) == 0))


def _lowest_but_padding(array: np.ndarray, low: float) -> float:
    """The lowest value once a padding value (see PADDING_GAP) is left out; ``low`` when there is none."""
    at_low = array == low
    count = int(np.count_nonzero(at_low))
    if count == array.size or count < PADDING_MIN_FRACTION * array.size:
        return low
    next_low = float(array[~at_low].min())
    return next_low if next_low - low >= PADDING_GAP else low


# Modality check thresholds, measured on the shared data (fraction of head/body voxels):
#   8-bit brain-windowed CT (Harvard, 7 cases): 26-34 % of the head saturated at >= 250;
#   8-bit T2 MRI (same cases): 0.1-3.1 %.
#   HU CT (Visible Human): 18 % of the body > 300 HU, 47 % at -150..150 HU;
#   MRIs read as "HU" (Visible Human MR, RIRE T1): <= 0.15 % "bone", <= 5 % "soft tissue".
SATURATED_MIN_FRACTION = 0.08
BONE_MIN_FRACTION = 0.01
SOFT_TISSUE_MIN_FRACTION = 0.20


def ct_likeness(array: np.ndarray) -> tuple[bool, str]:
    """Whether a volume's intensities look like a head CT, and the evidence in words.

    A heuristic on intensity statistics, for warnings only (never to refuse an input):
    an 8-bit display-windowed CT has its bone saturated white (a large fraction of the head at the top
    of the range), an MRI almost none; a CT in Hounsfield units (also stored +1024) has most of the
    body at soft-tissue values and a bone-dense tail above 300 HU, an MRI's arbitrary units do not.
    """
    kind = classify_ct(array)
    if kind == "windowed8bit":
        # a windowed CT stored as 0..1 (min-max scaled on the way) is read at that scale; min-max puts it back
        high = float(array.max())
        top = 1.0 if 0.0 < high <= 1.0 else 65535.0 if high > 255 else 255.0  # 65535: 8 bits saved as 16
        head = int(np.count_nonzero(array > 10 * top / 255))
        if head == 0:
            return False, "nothing above the background"
        saturated = np.count_nonzero(array >= 250 * top / 255) / head
        if saturated >= SATURATED_MIN_FRACTION:
            return True, f"{saturated:.0%} of the head is saturated white, like bone in a CT brain window"
        if top == 1.0:
            return False, (f"all values within 0..1 and only {saturated:.1%} of the head at the top, as in a CT in "
                           "Hounsfield units someone normalised to 0..1, not a windowed one")
        return False, (
            f"only {saturated:.1%} of the head is saturated white, where a brain-windowed CT shows its bone "
            f"(>= {SATURATED_MIN_FRACTION:.0%})"
        )
    offset = HU_OFFSET if kind == "hu+1024" else 0.0
    if kind == "hu" and float(array.min()) > -500:
        return False, (
            f"values {float(array.min()):g}..{float(array.max()):g} with nothing below -500, so no air as in a "
            "CT in Hounsfield units, and not 8-bit windowed either"
        )
    body = int(np.count_nonzero(array > -500 + offset))
    if body == 0:
        return False, "no voxel above -500 HU (no body at all)"
    bone = np.count_nonzero(array > 300 + offset) / body
    soft = np.count_nonzero((array > -150 + offset) & (array < 150 + offset)) / body
    units = "HU (stored +1024)" if offset else "HU"
    evidence = f"{soft:.0%} of the body at soft-tissue values and {bone:.1%} bone-dense, read as {units}"
    if bone >= BONE_MIN_FRACTION and soft >= SOFT_TISSUE_MIN_FRACTION:
        return True, evidence
    return False, f"{evidence}; a head CT has >= {SOFT_TISSUE_MIN_FRACTION:.0%} and >= {BONE_MIN_FRACTION:.0%}"


def modality_warnings(ct: np.ndarray, mri: np.ndarray | None = None) -> list[str]:
    """Warnings when the CT does not look like a CT or the MRI looks like one (a likely swap)."""
    ct_ok, ct_evidence = ct_likeness(ct)
    mri_is_ct, mri_evidence = ct_likeness(mri) if mri is not None else (False, "")
    if not ct_ok and mri_is_ct:
        return [
            f"the CT and the reference MRI look swapped (the CT input: {ct_evidence}; the MRI input: "
            f"{mri_evidence}); give the CT as the CT and the MRI as the reference, or the results are meaningless"
        ]
    warnings = []
    if not ct_ok:
        warnings.append(
            f"the CT input does not look like a CT ({ct_evidence}); give the CT in Hounsfield units or as an 8-bit "
            "brain-windowed export (if it is an MRI, the CT instead): a synthetic MRI made from anything else is "
            "meaningless"
        )
    if mri_is_ct:
        warnings.append(reference_is_ct_warning(mri_evidence))
    return warnings


def reference_is_ct_warning(evidence: str) -> str:
    """The warning for a reference MRI whose intensities look like a CT's (``ct_likeness``'s evidence)."""
    return (f"the reference MRI looks like a CT ({evidence}); check that it is the MRI: the difference map "
            "and metrics are meaningless otherwise")


def normalise_ct(array: np.ndarray, window: CTWindow) -> tuple[np.ndarray, dict]:
    """CT voxels → 0..255 the way the model was trained; returns the array and what was done."""
    check_finite(array, "CT")
    kind = classify_ct(array)
    if kind == "windowed8bit":
        out = minmax_255(array, "CT")
        widened = " saved as 16 bits (×257)" if float(array.max()) > 255 else ""
        info = {"ct_path": kind, "description": f"8-bit windowed CT{widened}: per-volume min-max to 0..255"}
    else:
        hu = array.astype(np.float32)  # a copy: the user's array is never changed
        if kind == "hu+1024":
            hu -= HU_OFFSET
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


BRAIN_EROSION = 15  # pixels of the 256-pixel model grid (~13 mm) between the skull and the "brain" sample
BRAIN_RANGE = (10.0, 200.0)  # CT values (0..255) kept in that sample: not air, not bone


def brain_median(ct255: np.ndarray, threshold: float = 10.0) -> Optional[float]:
    """Median CT value (0..255) of the brain: head mask eroded in-plane, values inside BRAIN_RANGE.

    Falls back to the whole head when erosion leaves nothing (small or thin images); None without a head.
    """
    from scipy import ndimage

    mask = head_mask(ct255, threshold)
    inner = ndimage.binary_erosion(mask, in_plane_structure(), iterations=BRAIN_EROSION)
    lo, hi = BRAIN_RANGE
    for region in (inner, mask):
        sample = ct255[region & (ct255 > lo) & (ct255 < hi)]
        if sample.size:
            return float(np.median(sample))
    return None


def standardise_ct(ct255: np.ndarray, target: float) -> tuple[np.ndarray, dict]:
    """Map the CT's brain median to ``target`` with a piecewise-linear [0, median, 255] → [0, target, 255].

    Air stays 0 and saturated bone 255; the values in between are stretched or compressed so that CTs
    windowed differently (the training data's are) look alike. Returns the array and what was done.
    """
    median = brain_median(ct255)
    if median is None or not 0.0 < median < 255.0:
        return ct255, {"ct_standardise": f"skipped: no brain found to measure (target {target:g})"}
    out = np.interp(ct255, [0.0, median, 255.0], [0.0, float(target), 255.0]).astype(np.float32)
    return out, {"ct_standardise": f"brain median {median:.1f} mapped to {target:g}"}


def head_mask(ct255: np.ndarray, threshold: float = 10.0) -> np.ndarray:
    """Head region of a normalised (z, y, x) CT: the largest connected object above ``threshold``, holes
    filled slice by slice.

    Outside the head the synthetic MRI is set to 0, as the reference MRI's background is 0; a faint
    grey background costs a lot of whole-slice SSIM for nothing. Only the largest 3D object is kept
    (face-connected): head holders, tables, pillows and the scan-field edge are separate objects in a
    clinical CT, and nothing is to be synthesised on them.
    """
    return fill_holes_in_plane(largest_component(ct255 > threshold))


def grow_in_plane(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` (z, y, x) grown within each axial slice by ``pixels`` steps of the 4-neighbourhood (a diamond of
    that radius); 0 gives a copy. Used to take the T2-bright scalp, which the brain-windowed CT shows as 0 like
    air, into the head (model card, round 16)."""
    from scipy import ndimage

    if pixels < 0:
        raise ValueError(f"cannot grow a mask by {pixels} pixels")
    if pixels == 0:
        return mask.astype(bool, copy=True)
    return ndimage.binary_dilation(mask, in_plane_structure(), iterations=int(pixels))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected object of a boolean volume (all False when there is none)."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask.copy()
    # counted over the object voxels only: bincount widens its input to int64, and over the whole volume that
    # copy (630 MB for a 512 × 512 × 300 CT) took 1.3 of the 1.8 s on 2 cores
    sizes = np.bincount(labels[mask], minlength=count + 1)
    return labels == int(np.argmax(sizes[1:])) + 1


def fill_holes_in_plane(mask: np.ndarray) -> np.ndarray:
    """``mask`` (z, y, x) with the holes of each axial slice filled: what
    ``ndimage.binary_fill_holes(mask, structure=in_plane_structure())`` gives, in one labelling of the background
    instead of a dilation repeated until nothing moves (4 s against 0.7 s on a 512 × 512 × 300 CT on 2 cores).
    A hole is a background object (4-connected within its slice) that does not touch the slice's edge."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"fill_holes_in_plane takes a (z, y, x) mask, got shape {mask.shape}")
    if not mask.size:
        return mask.copy()
    labels, count = ndimage.label(~mask, structure=in_plane_structure())
    reaches_edge = np.zeros(count + 1, dtype=bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        reaches_edge[edge] = True
    reaches_edge[0] = True  # label 0 is the mask itself
    return mask | ~reaches_edge[labels]


def in_plane_structure() -> np.ndarray:
    """3D structuring element that connects voxels within an axial slice only (4-neighbourhood)."""
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    return structure
