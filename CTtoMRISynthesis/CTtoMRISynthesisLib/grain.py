"""Noise grain: bring a CT that is grainier than any training CT down to their level before the network.

Why: the shipped members see one CT slice (context 0), so the noise of a CT reaches them unaveraged. On
the noisy 8-bit CTs of another hospital, dark grains of noise in the white matter come out of the network as
small bright (CSF-like) spots, and the CSF/brain contrast drops. Measured on the model's 256 × 256 grid with
:func:`grain`, those CTs are 1.3–1.6 × grainier than the grainiest training CT, while the real scanner's HU CT
(through the 45/120 window) is within the training range.

The Gaussian blur (the default filter) is not used by the shipped model: measured as round 11 (``model_weights/RECIPES.md``), it raised the
CSF contrast on all six of those CTs and changed nothing on the training patients or the HU CT, but a HU CT
with added correlated noise, blurred by it, moved further from the clean CT's output than without it, which
the shipping rule's robustness condition does not allow; capped at 1 px (round 12) it kept the CSF gain and
still moved too far (11.87 against the limit 11.62).

:func:`grain` is the robust SD (1.4826 × median absolute deviation) of a band-pass of the CT, the difference
of Gaussian blurs of σ 1 and 3 px in-plane, over the soft tissue well inside the head (per slice: the head
filled and eroded by 15 px, the CT blurred by 2 px between 30 and 180 of 255): the noise at the scale of
the grains the network reacts to, with bone edges and the scalp left out.

:func:`match_grain` leaves a CT at or below ``target`` as it is; a grainier one is blurred in-plane with the
Gaussian σ that brings it to ``target`` (interpolated between the σ of :data:`SIGMAS`; the largest, if
none does), but never more than ``max_blur`` px when a cap is given (round 12: a CT whose noise is coarser
than the grains, such as thin-slice HU noise, would otherwise be blurred until its anatomy goes). ``target``
is the grain of the grainiest CT the model trained on, recorded in the weights config
(``preprocessing.ct_grain_target``, and the cap as ``preprocessing.ct_grain_max_blur_px``) by::

    python -m CTtoMRISynthesisLib.grain set WEIGHTS.safetensors --data DIR [--exclude-from-training ID ...] [--max-blur PX]

which rewrites the config only (same tensors; the .sha256 is rewritten). A model file without the key is
applied as before. The training CTs themselves are never blurred: by construction none is above the target.

``--filter median`` (``preprocessing.ct_grain_filter``, rounds 21 / 21b) matches the grain with an in-plane
3 × 3 median instead of the blur: a grainier CT becomes ``CT + a · (median(CT) − CT)``, with the share ``a`` in
0..1 the smallest that brings its grain to the target (interpolated between :data:`SHARES`; 1, the full median, if
none does). A median removes isolated grains and keeps edges and structures wider than its window.
``--filter median35`` (round 22) goes on where the full 3 × 3 median is not enough: the CT's 3 × 3 median is
then moved towards its 5 × 5 median by the smallest share that reaches the target (1 if none does). A CT that the
3 × 3 median brings to the target comes out exactly as with ``median``.

:func:`describe` says what a note records was done, for warnings and tables alike.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import numpy as np

from .errors import CTMRIError

BAND = (1.0, 3.0)  # px on the model grid: the Gaussian blurs whose difference is the grain band
SIGMAS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)  # blurs tried, smallest first
MAX_SLICES = 32  # slices (evenly spread) the estimate looks at: in-plane only, so a sample of slices is exact per slice
MIN_VOXELS = 2000  # fewer soft-tissue voxels than this: no estimate (a tiny or non-head image)
KEY = "ct_grain_target"
CAP_KEY = "ct_grain_max_blur_px"
FILTER_KEY = "ct_grain_filter"
FILTERS = ("gaussian", "median", "median35")
SHARES = (0.25, 0.5, 0.75, 1.0)  # shares of a median tried, smallest first
MEDIAN_SIZES = {"median": (3,), "median35": (3, 5)}  # px, in-plane: the medians tried in turn
SHARE_KEYS = {3: "ct_grain_median_share", 5: "ct_grain_median5_share"}  # the note's key for each median's share


def _blur(ct: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(ct.astype(np.float32), sigma=(0, sigma, sigma))


def soft_tissue(ct255: np.ndarray) -> np.ndarray:
    """Boolean (z, H, W): soft tissue well inside the head, slice by slice (see the module docstring)."""
    from scipy import ndimage

    from .intensity import fill_holes_in_plane

    head = fill_holes_in_plane(ct255 > 10.0)
    inner = ndimage.binary_erosion(head, structure=np.ones((1, 31, 31), bool))
    smooth = _blur(ct255, 2.0)
    return inner & (smooth > 30.0) & (smooth < 180.0)


def _sample(ct255: np.ndarray) -> np.ndarray:
    if ct255.ndim != 3:
        raise CTMRIError(f"expected a (z, H, W) CT array, got shape {ct255.shape}")
    step = max(1, int(np.ceil(ct255.shape[0] / MAX_SLICES)))
    return ct255[::step].astype(np.float32)


def _band_sd(ct: np.ndarray, tissue: np.ndarray) -> Optional[float]:
    values = (_blur(ct, BAND[0]) - _blur(ct, BAND[1]))[tissue]
    if values.size < MIN_VOXELS:
        return None
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def grain(ct255: np.ndarray) -> Optional[float]:
    """The CT's noise grain on the 0..255 scale (None when there is too little soft tissue to tell)."""
    ct = _sample(ct255)
    return _band_sd(ct, soft_tissue(ct))


def _median(ct: np.ndarray, size: int, threads: int = 1) -> np.ndarray:
    """The in-plane ``size`` × ``size`` median of every slice. Being in-plane, slabs of slices are filtered side by
    side in ``threads`` threads (SciPy's filter releases the GIL), the same numbers as one call: a 5 × 5 median of a
    256-slice CT takes ~10 s on one core."""
    from concurrent.futures import ThreadPoolExecutor

    from scipy import ndimage

    ct = ct.astype(np.float32)
    out = np.empty_like(ct)
    bounds = np.linspace(0, len(ct), max(1, min(int(threads), len(ct))) + 1).astype(int)  # ≥ 1 slab: an empty CT too

    def slab(start: int, stop: int) -> None:
        ndimage.median_filter(ct[start:stop], size=(1, size, size), output=out[start:stop])

    with ThreadPoolExecutor(len(bounds) - 1) as pool:
        list(pool.map(slab, bounds[:-1], bounds[1:]))  # list(): a slab's error is raised here
    return out


def match_grain(ct255: np.ndarray, target: Optional[float], max_blur: Optional[float] = None,
                method: str = "gaussian", threads: int = 1) -> tuple[np.ndarray, dict]:
    """(the CT, brought down to ``target``'s grain if it is grainier: blurred in-plane, by at most ``max_blur`` px,
    or with ``method="median"`` moved towards its 3 × 3 median, with ``"median35"`` then on towards its 5 × 5 median
    where the full 3 × 3 is not enough; what was measured and done). ``threads``: for the medians."""
    if target is None:
        return ct255, {}
    if method not in FILTERS:
        raise CTMRIError(f"unknown grain filter {method!r} in the model file; this version knows {', '.join(FILTERS)}")
    sample = _sample(ct255)
    tissue = soft_tissue(sample)  # from the CT as given, so every blur is measured on the same voxels
    measured = _band_sd(sample, tissue)
    note = {"ct_grain": measured, "ct_grain_target": float(target)}
    sizes = MEDIAN_SIZES.get(method, ())
    note.update({"ct_grain_filter": method, **{SHARE_KEYS[size]: 0.0 for size in sizes}} if sizes
                else {"ct_grain_blur_px": 0.0})
    if measured is None or measured <= target:
        return ct255, note
    if sizes:
        shares = _shares_for(sample, tissue, measured, float(target), sizes, threads)
        note.update({SHARE_KEYS[size]: share for size, share in zip(sizes, shares)})
        return _towards_medians(ct255.astype(np.float32), sizes[:len(shares)], shares[-1], threads), note
    chosen = _sigma_for(sample, tissue, measured, float(target))
    if max_blur is not None and chosen > max_blur:
        chosen = float(max_blur)
        note["ct_grain_blur_capped"] = True
    note["ct_grain_blur_px"] = chosen
    return _blur(ct255, chosen), note


def describe(note: dict) -> Optional[str]:
    """What a :func:`match_grain` note says was done to the CT, in words for a user; None when nothing was."""
    if note.get(SHARE_KEYS[5]):
        return f"moved the whole way to its 3 × 3 median and {note[SHARE_KEYS[5]]:.0%} of the way on to its 5 × 5 median"
    if note.get(SHARE_KEYS[3]):
        return f"moved {note[SHARE_KEYS[3]]:.0%} of the way to its 3 × 3 median"
    if note.get("ct_grain_blur_px"):
        return (f"blurred in-plane by {note['ct_grain_blur_px']:g} px"
                + (" (the most the model file allows)" if note.get("ct_grain_blur_capped") else ""))
    return None


def short(note: dict) -> str:
    """The same for a table cell: ``median 3×3 0.27``, ``median 3×3 1, 5×5 0.4``, ``blur 1.2 px (cap)`` or ``none``."""
    if note.get(SHARE_KEYS[3]):
        fifth = f", 5×5 {note[SHARE_KEYS[5]]:g}" if note.get(SHARE_KEYS[5]) else ""
        return f"median 3×3 {note[SHARE_KEYS[3]]:g}{fifth}"
    if note.get("ct_grain_blur_px"):
        return f"blur {note['ct_grain_blur_px']:g} px" + (" (cap)" if note.get("ct_grain_blur_capped") else "")
    return "none"


def _sigma_for(sample: np.ndarray, tissue: np.ndarray, measured: float, target: float) -> float:
    """The blur that brings the grain to ``target``: interpolated between the two :data:`SIGMAS` around it,
    so that the blur, and the output, change smoothly with the CT's grain (the largest if none is enough)."""
    return _step_to_target(SIGMAS, lambda sigma: _band_sd(_blur(sample, sigma), tissue), measured, target, 2)


def _towards_medians(ct: np.ndarray, sizes: tuple, last_share: float, threads: int = 1) -> np.ndarray:
    """``ct`` taken the whole way to the median of each of ``sizes`` but the last, then ``last_share`` of the way
    from there to the last one's median (every median is of ``ct`` itself, not of the previous step)."""
    start = _median(ct, sizes[-2], threads) if len(sizes) > 1 else ct
    return start + np.float32(last_share) * (_median(ct, sizes[-1], threads) - start)


def _shares_for(sample: np.ndarray, tissue: np.ndarray, measured: float, target: float, sizes: tuple,
                threads: int = 1) -> list:
    """The share of each median in turn (:data:`MEDIAN_SIZES`) that brings the grain to ``target``, interpolated
    between :data:`SHARES` (so that the output changes smoothly with the CT's grain): the next median is tried only
    when the full one before it is not enough; 1 for the last if even it is not."""
    shares, start, level = [], sample, measured
    for size in sizes:
        median = _median(sample, size, threads)
        shares.append(_step_to_target(
            SHARES, lambda share: _band_sd(start + np.float32(share) * (median - start), tissue), level, target, 3))
        start, level = median, _band_sd(median, tissue)
        if shares[-1] < 1.0 or level <= target:
            break
    return shares


def _step_to_target(steps: tuple, grain_at, measured: float, target: float, digits: int) -> float:
    """The smallest filter strength (0 = none, :data:`SIGMAS` or :data:`SHARES` tried in order, ``grain_at(step)``
    the grain it leaves) that brings the grain from ``measured`` to ``target``, interpolated linearly between the
    two steps around it and rounded to ``digits``; the last step if none is enough."""
    previous = (0.0, measured)
    for step in steps:
        value = grain_at(step)
        if value <= target:
            s0, v0 = previous
            return round(s0 + (v0 - target) / max(v0 - value, 1e-6) * (step - s0), digits)
        previous = (step, value)
    return steps[-1]


def training_target(cases, exclude=()) -> float:
    """The grain of the grainiest CT among ``cases`` (training cases with ``.ct`` on the model grid)."""
    skip = set(exclude)
    values = [grain(c.ct) for c in cases if c.case_id not in skip]
    values = [v for v in values if v is not None]
    if not values:
        raise CTMRIError("no training CT had enough soft tissue to measure its grain; check --data")
    return max(values)


def set_target(weights, target: float, max_blur: Optional[float] = None, method: str = "gaussian") -> dict:
    """Write ``target`` (and the cap ``max_blur``, if given; the filter, if not the blur) into a model file's
    ``preprocessing`` (tensors unchanged; file and .sha256 rewritten)."""
    from .weights import read_weights_file, save_state

    if max_blur is not None and not max_blur > 0:
        raise CTMRIError(f"--max-blur must be a positive number of pixels, not {max_blur}")
    if max_blur is not None and method != "gaussian":
        raise CTMRIError("--max-blur caps the blur; the median has no blur to cap: leave one of them out")
    blob = read_weights_file(weights, framework="numpy")
    config = blob["config"]
    config["preprocessing"][KEY] = round(float(target), 3)
    config["preprocessing"].pop(CAP_KEY, None)
    config["preprocessing"].pop(FILTER_KEY, None)
    if max_blur is not None:
        config["preprocessing"][CAP_KEY] = round(float(max_blur), 3)
    if method != "gaussian":
        config["preprocessing"][FILTER_KEY] = method
    save_state(weights, blob["state_dict"], config)
    return config


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m CTtoMRISynthesisLib.grain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    put = sub.add_parser("set", help="record the training CTs' grain in a model file")
    put.add_argument("weights")
    put.add_argument("--data", nargs="+", required=True, help="the training data folder(s), as given to ctmri train")
    put.add_argument("--exclude-from-training", nargs="*", default=[], metavar="ID")
    put.add_argument("--case-rule", choices=["slice3", "first2"], default="slice3")
    put.add_argument("--max-blur", type=float, default=None, metavar="PX",
                     help="blur a grainier CT by at most PX pixels of the model grid (default: no cap)")
    put.add_argument("--filter", choices=FILTERS, default="gaussian",
                     help="how a grainier CT is brought down: a Gaussian blur (default), a share of its 3x3 median "
                          "(median), or that and then a share of its 5x5 median where the 3x3 is not enough (median35)")
    args = parser.parse_args(argv)
    from .intensity import CTWindow
    from .training.discovery import discover
    from .training.split import check_known
    from .weights import read_config

    try:
        window = read_config(args.weights)["preprocessing"]["ct_window"]
        cases = discover(args.data, CTWindow(window["level"], window["width"]), case_rule=args.case_rule)
        check_known(args.exclude_from_training, [c.case_id for c in cases], "--exclude-from-training")  # a typo
        target = training_target(cases, args.exclude_from_training)
        set_target(args.weights, target, args.max_blur, args.filter)
    except CTMRIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.weights}: {KEY} = {target:.3f} (the grainiest of the {len(cases)} CTs in --data"
          + (f", less {', '.join(args.exclude_from_training)})" if args.exclude_from_training else ")")
          + (f"; {CAP_KEY} = {args.max_blur:g}" if args.max_blur is not None else "")
          + (f"; {FILTER_KEY} = {args.filter}" if args.filter != "gaussian" else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
