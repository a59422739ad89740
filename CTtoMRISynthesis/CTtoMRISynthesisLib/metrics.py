"""Image-similarity metrics for synthetic MRI against a reference MRI.

Conventions (see DESIGN.md):
- Arrays are (z, y, x) on the 0..255 scale (float or int); z indexes axial slices. A 2D (y, x) array
  is treated as a single slice.
- Foreground (where ``mae`` and ``ssim_foreground`` look, and which slices count for ``ssim``): ``ref > 0``
  when the reference's background is exactly 0, as in the training data (the paper, Dong et al. 2020,
  excludes the zero background from the MAE); otherwise (a scanner's MRI, whose background is noise) the
  reference's head: Otsu threshold, the largest object, holes filled per slice (:func:`foreground_mask`).
- SSIM is Wang et al. 2004 as the paper uses it: 2D, per axial slice, Gaussian window sigma 1.5
  (an 11x11 window in scikit-image), population covariance, K1=0.01, K2=0.03, data range 255.
  It is computed by scikit-image, never re-implemented here.

Minimum slice size: scikit-image's Gaussian SSIM with sigma 1.5 uses an 11x11 window and refuses
smaller images, so every slice must be at least 11x11 in-plane. Shrinking the window for small slices
would silently report a different metric, so a smaller slice is an error instead.

Plain numpy, SciPy and scikit-image only: no torch, no SimpleITK, so the CLI and the tests can import it cheaply.
scikit-image is imported where SSIM and PSNR are computed: writing a result (``to_jsonable``) must work in a Slicer
that has not installed it yet (the self-test's review, ``review_check.py``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import numpy as np

from .errors import CTMRIError

DATA_RANGE = 255.0
SSIM_SIGMA = 1.5
# scikit-image: radius = int(truncate * sigma + 0.5) with truncate 3.5 -> 5, window = 2 * 5 + 1 = 11.
SSIM_WINDOW = 2 * int(3.5 * SSIM_SIGMA + 0.5) + 1
MIN_INPLANE = SSIM_WINDOW

__all__ = [
    "DATA_RANGE",
    "SSIM_SIGMA",
    "SSIM_WINDOW",
    "MIN_INPLANE",
    "foreground_mask",
    "foreground_rule",
    "foreground_words",
    "compute_metrics",
    "bone_soft_tissue_mae",
    "summarize",
    "to_jsonable",
]


def _as_volume(array: Any, name: str) -> np.ndarray:
    """Return ``array`` as a float64 (z, y, x) volume, checking dimensionality and finiteness."""
    a = np.asarray(array)
    if a.dtype.kind not in "iuf":  # not bool: a mask is no image
        raise CTMRIError(
            f"{name} has data type {a.dtype}; pass a real-valued image array on the 0..255 scale."
        )
    if a.ndim == 2:
        a = a[np.newaxis]  # one axial slice
    if a.ndim != 3:
        raise CTMRIError(
            f"{name} has {a.ndim} dimensions (shape {a.shape}); pass a (z, y, x) volume or a (y, x) slice."
        )
    if a.size == 0:
        raise CTMRIError(f"{name} is empty (shape {a.shape}); pass an image with at least one slice.")
    a = a.astype(np.float64, copy=False)
    if not np.all(np.isfinite(a)):
        raise CTMRIError(
            f"{name} contains NaN or infinite values; fix or clip the image (0..255) before computing metrics."
        )
    return a


def _check_pair(ref: Any, syn: Any, need_ssim: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Validate a reference/synthetic pair; return (ref, syn, foreground, its rule) as float64 volumes + mask."""
    r = _as_volume(ref, "reference MRI")
    s = _as_volume(syn, "synthetic MRI")
    if r.shape != s.shape:  # compared as volumes: a (y, x) slice is a (1, y, x) volume
        raise CTMRIError(
            f"reference shape {np.shape(ref)} and synthetic shape {np.shape(syn)} differ; resample the synthetic "
            "MRI onto the reference MRI grid before computing metrics."
        )
    if need_ssim and (r.shape[1] < MIN_INPLANE or r.shape[2] < MIN_INPLANE):
        raise CTMRIError(
            f"slices are {r.shape[1]}x{r.shape[2]} pixels in-plane, too small for the {SSIM_WINDOW}x{SSIM_WINDOW} "
            f"Gaussian SSIM window (sigma {SSIM_SIGMA}); the SSIM window cannot fit. Use slices of at least "
            f"{MIN_INPLANE}x{MIN_INPLANE} pixels, or check that the array axes are (z, y, x)."
        )
    fg, rule = _foreground(r)
    if not fg.any():
        raise CTMRIError(
            "the reference MRI has no foreground voxels (no value > 0); metrics are computed inside the head "
            "only. Check that the reference is the MRI, on the 0..255 scale, and not an empty or masked-out image."
        )
    return r, s, fg, rule


#: Where the metrics look, as recorded in ``metrics.json`` (``foreground``).
FOREGROUND_NONZERO = "reference > 0"
FOREGROUND_HEAD = "the reference's head (Otsu threshold, largest object, holes filled per slice)"
#: Share of the slices' edge pixels (first and last row and column) that must be exactly 0 for ``ref > 0`` to mean
#: "the head": the edges lie in the background, which is noise in a scanner's MRI and 0 in a masked one.
ZERO_BACKGROUND_MIN = 0.9


def foreground_words(rule: Optional[str]) -> str:
    """The console's short name of a foreground rule (``metrics["foreground"]``; older results have none)."""
    return "the MRI's head" if rule == FOREGROUND_HEAD else "MRI > 0"


def foreground_mask(ref: Any) -> np.ndarray:
    """Boolean mask of foreground voxels (see :func:`foreground_rule`)."""
    return _foreground(np.asarray(ref))[0]


def foreground_rule(ref: Any) -> str:
    """Which rule :func:`foreground_mask` takes for this reference: :data:`FOREGROUND_NONZERO` when the background
    is exactly 0 (the training MRIs, a masked or skull-stripped MRI), else :data:`FOREGROUND_HEAD`. With a
    noisy background ``ref > 0`` is nearly the whole volume: the "in-head" MAE became the whole-volume MAE."""
    return _foreground(np.asarray(ref))[1]


def _foreground(ref: np.ndarray) -> tuple[np.ndarray, str]:
    volume = ref.reshape((1,) * (3 - ref.ndim) + ref.shape) if ref.ndim < 3 else ref
    if min(volume.shape[1:]) < MIN_INPLANE:  # too small to have a background around the head (and for SSIM)
        return ref > 0, FOREGROUND_NONZERO
    border = np.concatenate([volume[:, 0].ravel(), volume[:, -1].ravel(), volume[:, :, 0].ravel(), volume[:, :, -1].ravel()])
    if np.count_nonzero(border == 0) >= ZERO_BACKGROUND_MIN * border.size:
        return ref > 0, FOREGROUND_NONZERO
    head = _head(volume)
    if not head.any():  # a constant image has no head to find
        return ref > 0, FOREGROUND_NONZERO
    return head.reshape(ref.shape), FOREGROUND_HEAD


def _head(volume: np.ndarray) -> np.ndarray:
    """The head of a (z, y, x) reference: above its Otsu threshold, the largest object, holes filled per slice
    (the rule registration.foreground_mask applies to images, plus the largest object); empty when constant."""
    from skimage.filters import threshold_otsu

    from .intensity import fill_holes_in_plane, largest_component

    if float(volume.max()) == float(volume.min()):
        return np.zeros(volume.shape, dtype=bool)
    head = largest_component(volume > threshold_otsu(volume))
    return fill_holes_in_plane(head)


def _ssim_slice(ref2d: np.ndarray, syn2d: np.ndarray) -> tuple[float, np.ndarray]:
    """Paper-parameter SSIM of one slice: (mean SSIM as scikit-image reports it, full SSIM map)."""
    from skimage.metrics import structural_similarity

    mssim, smap = structural_similarity(
        ref2d,
        syn2d,
        gaussian_weights=True,
        sigma=SSIM_SIGMA,
        use_sample_covariance=False,
        data_range=DATA_RANGE,
        full=True,
    )
    return float(mssim), smap


def _psnr(ref: np.ndarray, syn: np.ndarray) -> float:
    """PSNR over the whole volume; ``inf`` for identical images (without numpy's divide-by-zero warning)."""
    if np.array_equal(ref, syn):
        return float("inf")
    from skimage.metrics import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(ref, syn, data_range=DATA_RANGE))


def compute_metrics(ref: Any, syn: Any) -> dict[str, Any]:
    """Compare a synthetic MRI with the reference MRI, both (z, y, x) or (y, x) on the 0..255 scale.

    Returns a dict with keys ``mae``, ``ssim``, ``psnr``, ``mae_whole``, ``ssim_foreground``,
    ``foreground_voxels``, ``foreground`` (the rule that found them, :func:`foreground_rule`) and ``per_slice``
    (one entry per slice, ``None`` where a slice has no foreground). ``psnr`` is ``inf`` for identical images; pass the result through
    :func:`to_jsonable` before writing JSON. Raises :class:`CTMRIError` for unusable input.
    """
    r, s, fg, rule = _check_pair(ref, syn, need_ssim=True)
    absdiff = np.abs(r - s)

    # Per-slice sums in one vectorised pass; a 256x256x300 volume costs a few array ops, not a loop.
    fg_counts = fg.sum(axis=(1, 2))
    whole_maes = absdiff.mean(axis=(1, 2))
    mae_whole = float(absdiff.mean())
    absdiff *= fg  # in place (absdiff is our own temporary): background errors drop out of the foreground MAE
    fg_err_sums = absdiff.sum(axis=(1, 2))
    n_fg = int(fg_counts.sum())

    per_slice: list[dict[str, Any]] = []
    slice_ssims: list[float] = []
    ssim_fg_sum = 0.0  # sum of SSIM-map values over all foreground voxels (voxel-weighted volume mean)
    for k in range(r.shape[0]):
        count = int(fg_counts[k])
        entry: dict[str, Any] = {
            "index": k,
            "foreground_voxels": count,
            "mae": None,
            "ssim": None,
            "ssim_foreground": None,
            "mae_whole": float(whole_maes[k]),
        }
        if count > 0:
            # Slices outside the head carry no information about the synthesis and would inflate SSIM.
            mssim, smap = _ssim_slice(r[k], s[k])
            fg_map_sum = float(smap[fg[k]].sum())
            ssim_fg_sum += fg_map_sum
            slice_ssims.append(mssim)
            entry["mae"] = float(fg_err_sums[k] / count)
            entry["ssim"] = mssim
            entry["ssim_foreground"] = fg_map_sum / count
        per_slice.append(entry)

    return {
        "mae": float(fg_err_sums.sum() / n_fg),
        "ssim": float(np.mean(slice_ssims)),
        "psnr": _psnr(r, s),
        "mae_whole": mae_whole,
        "ssim_foreground": ssim_fg_sum / n_fg,
        "foreground_voxels": n_fg,
        "foreground": rule,
        "per_slice": per_slice,
    }


def bone_soft_tissue_mae(ref: Any, syn: Any, ct: Any, bone_threshold: float) -> dict[str, Any]:
    """Foreground MAE split by tissue class from the CT: bone where ``ct > bone_threshold``, else soft tissue.

    Returns ``mae_bone``, ``mae_soft_tissue`` (``None`` for a class with no voxels), ``bone_voxels``
    and ``soft_voxels``. ``ct`` must be on the same grid as ``ref``; the threshold is in the CT's units.
    """
    r, s, fg, _ = _check_pair(ref, syn, need_ssim=False)
    ct_shape = np.shape(ct)
    if ct_shape != np.shape(ref):
        raise CTMRIError(
            f"CT shape {ct_shape} and reference MRI shape {np.shape(ref)} differ; use the CT registered and "
            "resampled onto the reference MRI grid."
        )
    c = _as_volume(ct, "CT")
    if not math.isfinite(float(bone_threshold)):
        raise CTMRIError(f"bone threshold {bone_threshold!r} is not a finite number; pass a CT value such as 200.")
    absdiff = np.abs(r - s)
    bone = fg & (c > bone_threshold)
    soft = fg & ~bone  # ct <= threshold inside the foreground

    def _mae(mask: np.ndarray) -> Optional[float]:
        n = int(mask.sum())
        return float(absdiff[mask].sum() / n) if n else None

    return {
        "mae_bone": _mae(bone),
        "mae_soft_tissue": _mae(soft),
        "bone_voxels": int(bone.sum()),
        "soft_voxels": int(soft.sum()),
    }


def summarize(values: Iterable[float]) -> dict[str, Any]:
    """Mean, sample SD (ddof=1; 0.0 for a single value), min, max and n of a list of numbers."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise CTMRIError("no values to summarize; pass at least one number (e.g. one metric per patient).")
    n = int(v.size)
    return {
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if n > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "n": n,
    }


def to_jsonable(metrics: Any) -> Any:
    """Copy of ``metrics`` safe for strict JSON: inf/NaN become ``None``, numpy scalars/arrays become Python."""
    if isinstance(metrics, dict):
        return {str(k): to_jsonable(v) for k, v in metrics.items()}
    if isinstance(metrics, (list, tuple)):
        return [to_jsonable(v) for v in metrics]
    if isinstance(metrics, np.ndarray):
        return to_jsonable(metrics.tolist())
    if isinstance(metrics, (bool, np.bool_)):
        return bool(metrics)
    if isinstance(metrics, (int, np.integer)):
        return int(metrics)
    if isinstance(metrics, (float, np.floating)):
        f = float(metrics)
        return f if math.isfinite(f) else None
    return metrics
