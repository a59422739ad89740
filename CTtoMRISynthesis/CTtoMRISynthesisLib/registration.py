"""Rigid (or similarity) CT→MRI registration with SimpleITK.

Fixed image = MRI, moving image = CT. The result is an ITK-convention transform: it maps points
of the MRI's physical space to the CT's, so ``sitk.Resample(ct, mri, transform)`` puts the CT on
the MRI grid.

Method: Mattes mutual information (works across modalities) over the MRI's head plus a margin,
random sampling with a fixed seed, three resolution levels (shrink 4, 2, 1; smoothing 2, 1, 0
mm), regular-step gradient descent, linear interpolation; the coarsest level is also started
from ±10° turns and the best start kept; the optimum's quarter and half turns about head–foot are
then scored, and one taken only if its MI is 20 % better (a CT turned in the axial plane; a
smaller gain is warned about); an optimum is applied only if its MI beats the identity's by 1 %
(so already-aligned pairs are left alone).

What the choices rest on (shared data: the RIRE T1 volume moved by a known 12° / 15.6 mm; Harvard
CT/T2-MR slices with the CT turned 10° or 20° and shifted 15 px; ten aligned Harvard pairs):

- Coordinates are divided by the head's RMS radius during optimisation, so a radian and a unit
  of shift move head points alike and the parameter scales are all near 1. Regular-step
  gradient descent normalises its step by the *scaled* gradient's length; with scales of 1 and
  ~5000 (mm against radians) a step meant as millimetres was taken in radians as soon as the
  translation had converged (seen: the angle jumping from 0.05 to 0.84 rad in one step).
- Scales from the head (mean squared shift of head points per unit parameter) rather than ITK's
  ``SetOptimizerScalesFromPhysicalShift`` (image corners): same accuracy, 4.4 s of CPU on the
  RIRE case instead of 7.9 s.
- The metric mask is the head grown by 8 mm (head only: 3 of 12 CT/MR runs failed).
- Extra coarse starts turned ±10°: at 20° they cut CT/MR failures from 4 of 12 to 2 of 12 (no
  difference at 10°); they cost about 1.4 s of the RIRE case's 4.4 s (``start_angles_deg=()``).
- Relaxation 0.8 rather than ITK's 0.5 (0.5: 1 of 10 CT/MR runs failed, 0 with 0.8).
- ITK runs single-threaded inside registration (see :func:`_single_threaded`): same inputs,
  same transform, to the last bit.

One-slice volumes (2D images the reader turned into 3D) are registered in 2D in the fixed slice's
plane and the result is lifted to an equivalent 3D transform (rotation about the slice normal):
shrinking or smoothing a single slice along z is meaningless. Thin slabs (e.g. an 8 mm CT) are
registered with in-plane rotation only (:func:`_slab_constraints`).

Plain Python: SimpleITK and NumPy only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import CancelledError, CTMRIError
from .geometry import same_grid

ProgressCallback = Callable[[float, str], None]
CancelCallback = Callable[[], bool]

MODES = ("rigid", "similarity", "none")

DEFAULT_SHRINK_FACTORS: tuple[int, ...] = (4, 2, 1)
DEFAULT_SMOOTHING_SIGMAS_MM: tuple[float, ...] = (2.0, 1.0, 0.0)
DEFAULT_SAMPLING_PERCENTAGE = 0.05
DEFAULT_MIN_SAMPLES = 10000
DEFAULT_ITERATIONS = 200
DEFAULT_HISTOGRAM_BINS = 50
DEFAULT_LEARNING_RATE = 8.0
DEFAULT_RELAXATION = 0.8
DEFAULT_MIN_STEP = 1e-3
DEFAULT_MIN_OVERLAP = 0.5
DEFAULT_START_ANGLES_DEG: tuple[float, ...] = (10.0,)
DEFAULT_TURNS_DEG: tuple[float, ...] = (90.0, 180.0, 270.0)
#: A turn is taken only for this relative MI gain, a smaller one is only warned about: the aligned top slice of Harvard
#: pair 33023 (small, nearly round) looks 14 % better turned by 180°, a phantom truly turned by 180° only 5 %
#: (test_registration); the turns taken on the turned Harvard pairs gained 20.6–316 % (experiments/turned_ct.py)
DEFAULT_TURN_MIN_GAIN = 0.2
DEFAULT_MASK_MARGIN_MM = 8.0
DEFAULT_MIN_IMPROVEMENT = 0.01

#: Histogram bins per level are capped so that each joint-histogram bin gets about this many samples.
_SAMPLES_PER_JOINT_BIN = 10.0

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}


@dataclass
class RegistrationResult:
    """What :func:`register` found.

    ``transform`` maps fixed (MRI) physical points to moving (CT) physical points. ``metric`` is
    the Mattes MI (ITK sign: lower is better) of the returned transform over the MRI head, all
    voxels (in-plane halved on large images), not the optimiser's random sample; ``overlap`` is
    the fraction of the MRI head whose mapped points fall inside the CT.
    """

    transform: sitk.Transform
    mode: str
    metric: Optional[float]
    iterations: int
    stop_condition: str
    seconds: float
    overlap: float
    warnings: list = dataclasses.field(default_factory=list)  # e.g. a CT found turned against the MRI

    def to_dict(self) -> dict:
        """A JSON-able summary; the transform as type, parameters, centre, matrix and translation."""
        tx = self.transform
        matrix, translation = _affine_of(tx)
        return {
            "mode": self.mode,
            "metric": None if self.metric is None else float(self.metric),
            "iterations": int(self.iterations),
            "stop_condition": self.stop_condition,
            "seconds": float(self.seconds),
            "overlap": float(self.overlap),
            "warnings": list(self.warnings),
            "transform_type": tx.GetName(),
            "parameters": [float(v) for v in tx.GetParameters()],
            "fixed_parameters": [float(v) for v in tx.GetFixedParameters()],
            "center": [float(v) for v in getattr(tx, "GetCenter", lambda: ())()],
            "matrix": matrix.tolist(),
            "translation": translation.tolist(),
        }


def summary_line(record: dict) -> str:
    """The console's line for a registration (``RegistrationResult.to_dict()``, as in ``metrics.json``): what was
    decided, without the optimiser's own wording (that stays in the JSON). ``ctmri synthesize`` printed none, so a
    slab left unregistered ("kept the identity") was said only inside metrics.json."""
    outcome = _in_words(str(record.get("stop_condition", "")).split(" (optimiser:")[0])
    return (f"registration: {record.get('mode')}, overlap {record.get('overlap', 0.0):.0%} of the MRI head, "
            f"{record.get('seconds', 0.0):.1f} s; {outcome}")


def _in_words(stop: str) -> str:
    """ITK's stop condition, which reads like a failure when the optimiser simply converged, in plain words."""
    if stop.startswith("RegularStepGradientDescentOptimizerv4: Step too small"):
        return "converged"
    if stop.startswith("RegularStepGradientDescentOptimizerv4: Maximum number of iterations"):
        return "stopped at the iteration limit (it may lie short of the optimum: look at the registered CT)"
    return stop


# ----------------------------------------------------------------------------------------------
# Public helpers
# ----------------------------------------------------------------------------------------------


def foreground_mask(image: sitk.Image) -> sitk.Image:
    """Head mask (uint8, 1 = head) of a 2D or 3D image: Otsu threshold, holes filled per slice.

    Otsu separates air from tissue on MRI and on CT (in HU or display-windowed); filling holes
    slice by slice brings back dark skull and CSF inside the head, which Otsu leaves out on T1.
    """
    image = _as_float(image, "image")
    a = sitk.GetArrayViewFromImage(image)
    if a.size == 0 or float(a.max()) == float(a.min()):
        raise CTMRIError("the image is empty or constant; it has no head to find")
    mask = sitk.Cast(sitk.OtsuThreshold(image, 0, 1), sitk.sitkUInt8)
    if mask.GetDimension() == 3:
        # Slice by slice along the last index axis, on plain arrays (slices of a permuted or
        # oblique volume do not share a physical plane, which JoinSeries would refuse).
        planes = sitk.GetArrayFromImage(mask)
        for k in range(planes.shape[0]):
            filled_plane = sitk.BinaryFillhole(sitk.GetImageFromArray(planes[k]), False, 1)
            planes[k] = sitk.GetArrayFromImage(filled_plane)  # a copy: a view would outlive its image
        filled = sitk.GetImageFromArray(planes)
        filled.CopyInformation(mask)
        return filled
    return sitk.BinaryFillhole(mask, False, 1)


def resample_to(
    moving: sitk.Image,
    reference: sitk.Image,
    transform: Optional[sitk.Transform] = None,
    *,
    interpolator: str = "linear",
    default_value: float = 0.0,
) -> sitk.Image:
    """``moving`` on ``reference``'s grid through ``transform`` (reference → moving points).

    The output is float32 whatever the input type. Use ``interpolator="nearest"`` for masks and
    labels (values stay exactly the input's).
    """
    if interpolator not in _INTERPOLATORS:
        raise ValueError(f"interpolator must be one of {sorted(_INTERPOLATORS)}, got {interpolator!r}")
    if transform is None:
        transform = sitk.Transform(reference.GetDimension(), sitk.sitkIdentity)
    return sitk.Resample(
        _as_float(moving, "moving image"),
        reference,
        transform,
        _INTERPOLATORS[interpolator],
        float(default_value),
        sitk.sitkFloat32,
    )


def mean_displacement_mm(
    t1: sitk.Transform,
    t2: sitk.Transform,
    reference: sitk.Image,
    mask: Optional[sitk.Image] = None,
) -> float:
    """Mean of |t1(p) − t2(p)| over the physical points p of ``reference``'s voxels.

    With ``mask`` (resampled by nearest neighbour onto the reference grid if it is on another)
    only voxels where mask > 0 count. Units are the images' physical units (mm).
    """
    dist = np.linalg.norm(_displacements(t1, reference) - _displacements(t2, reference), axis=-1)
    if mask is not None:
        if not same_grid(mask, reference):
            mask = resample_to(mask, reference, interpolator="nearest")
        inside = sitk.GetArrayViewFromImage(mask) > 0
        if not inside.any():
            raise ValueError("the mask has no voxel > 0 on the reference grid")
        dist = dist[inside]
    return float(dist.mean())


def overlap_fraction(fixed_mask: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """Fraction of ``fixed_mask`` voxels whose transformed point lies inside ``moving``'s extent."""
    # Resampling an all-ones copy of the moving grid (nearest, default 0) marks exactly the points
    # ITK counts as inside the moving image: right for any transform, and done in C++.
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    inside = sitk.Resample(ones, fixed_mask, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    m = sitk.GetArrayViewFromImage(fixed_mask) > 0
    n = int(m.sum())
    return float((sitk.GetArrayViewFromImage(inside)[m] > 0).sum() / n) if n else 0.0


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    mode: str = "rigid",
    *,
    progress: Optional[ProgressCallback] = None,
    cancel: Optional[CancelCallback] = None,
    seed: int = 42,
    sampling_percentage: float = DEFAULT_SAMPLING_PERCENTAGE,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    shrink_factors: Sequence[int] = DEFAULT_SHRINK_FACTORS,
    smoothing_sigmas_mm: Sequence[float] = DEFAULT_SMOOTHING_SIGMAS_MM,
    iterations: int = DEFAULT_ITERATIONS,
    histogram_bins: int = DEFAULT_HISTOGRAM_BINS,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    relaxation: float = DEFAULT_RELAXATION,
    min_step: float = DEFAULT_MIN_STEP,
    scales: str = "head",
    initializer: str = "geometry",
    start_angles_deg: Sequence[float] = DEFAULT_START_ANGLES_DEG,
    turns_deg: Sequence[float] = DEFAULT_TURNS_DEG,
    turn_min_gain: float = DEFAULT_TURN_MIN_GAIN,
    mask_margin_mm: float = DEFAULT_MASK_MARGIN_MM,
    min_improvement: float = DEFAULT_MIN_IMPROVEMENT,
    min_overlap: float = DEFAULT_MIN_OVERLAP,
    allow_disjoint: bool = False,
) -> RegistrationResult:
    """Find the transform mapping MRI (``fixed``) physical points onto the CT (``moving``).

    ``mode``: "rigid" (rotation + translation), "similarity" (plus one isotropic scale, for
    images without true spacing such as screenshots) or "none" (identity; overlap still checked).

    Settings (defaults chosen on the shared data; see the module docstring):

    - ``sampling_percentage`` of the metric-mask voxels per level, but at least ``min_samples``;
      ``histogram_bins`` at most (fewer on small samples);
    - ``shrink_factors`` / ``smoothing_sigmas_mm``: one entry per level, coarse to fine;
    - regular-step gradient descent: at most ``iterations`` per level; the first step moves head
      points by about ``learning_rate`` mm at the coarsest level (less in proportion at finer
      levels), each change of direction multiplies it by ``relaxation``, and a level stops when
      it falls below ``min_step`` (same units);
    - ``start_angles_deg``: extra coarse-level starts turned by ± each angle (about the slice
      normal in 2D, each axis in 3D); ``()`` for a single start (faster, less robust);
    - ``turns_deg``: turns (about the slice normal in 2D, head–foot in 3D) of the optimum scored
      once it is found, optimised from when its MI beats the optimum's by ``turn_min_gain``
      (relative) before and after (:func:`_unless_a_turn_is_better`); ``()`` for none;
    - ``scales``: "head" or "physical_shift" (ITK's estimate from the image corners);
    - ``initializer``: "geometry" (centres of the image extents) or "moments" (centroids of the
      head masks), see :func:`_initial_transform`;
    - ``mask_margin_mm``: the metric looks at the MRI head grown by this much;
    - ``min_improvement``: relative MI gain needed to move away from an overlapping identity;
    - ``min_overlap``: least fraction of the MRI head that must end up inside the CT;
    - ``allow_disjoint``: accept images whose extents do not overlap at all and let the
      initialiser bring them together (a best effort: the centres of two unrelated fields of
      view need not be the same anatomy).

    Raises :class:`CTMRIError` for empty/constant images, images that do not overlap, or a result
    covering less than ``min_overlap`` of the MRI head; :class:`CancelledError` when ``cancel()``
    returns True (checked at every optimiser iteration).
    """
    start = time.perf_counter()
    if mode not in MODES:
        raise CTMRIError(f"unknown registration mode {mode!r}; use one of: {', '.join(MODES)}")
    settings = _Settings(
        progress=progress,
        cancel=cancel,
        seed=int(seed),
        sampling_percentage=float(sampling_percentage),
        min_samples=int(min_samples),
        shrink_factors=tuple(int(s) for s in shrink_factors),
        smoothing_sigmas_mm=tuple(float(s) for s in smoothing_sigmas_mm),
        iterations=int(iterations),
        histogram_bins=int(histogram_bins),
        learning_rate=float(learning_rate),
        relaxation=float(relaxation),
        min_step=float(min_step),
        scales=scales,
        initializer=initializer,
        start_angles_deg=tuple(float(a) for a in start_angles_deg),
        turns_deg=tuple(float(a) for a in turns_deg),
        turn_min_gain=float(turn_min_gain),
        mask_margin_mm=float(mask_margin_mm),
        min_improvement=float(min_improvement),
    ).check()
    fixed, moving, fixed_mask = _prepared(fixed, moving)
    _report(progress, 0.0, "registration: checking overlap")
    _check_cancel(cancel)

    identity = _identity_like(mode, _physical_center(fixed))
    identity_overlap = overlap_fraction(fixed_mask, moving, identity)
    if identity_overlap == 0.0 and not allow_disjoint:
        raise CTMRIError(
            "the CT and the MRI do not overlap in physical space (no part of the MRI's head lies inside "
            "the CT). Check that they are the same patient and the same body region; if they come from "
            "scanners with unrelated coordinate systems, allow centre alignment (--allow-disjoint for ctmri "
            "synthesize or batch; in Slicer, Options > Unrelated scanner coordinates, or "
            "logic.process(..., allowDisjoint=True))."
        )
    if mode == "none":
        result = RegistrationResult(identity, mode, None, 0, "no registration requested (identity)", 0.0, identity_overlap)
    else:
        settings.identity_usable = identity_overlap > 0.0
        transform, metric, its, stop = _register_2d_or_3d(fixed, moving, fixed_mask, mode, settings)
        result = RegistrationResult(transform, mode, metric, its, stop, 0.0, overlap_fraction(fixed_mask, moving, transform),
                                    list(settings.warnings))
    result.seconds = time.perf_counter() - start
    _check_final_overlap(result.overlap, min_overlap)
    _report(progress, 1.0, f"registration done: {result.stop_condition}")
    return result


# ----------------------------------------------------------------------------------------------
# Internals
# ----------------------------------------------------------------------------------------------


@dataclass
class _Settings:
    """The optimiser's settings as :func:`register` documents them (checked, typed), and its callbacks."""

    progress: Optional[ProgressCallback]
    cancel: Optional[CancelCallback]
    seed: int
    sampling_percentage: float
    min_samples: int
    shrink_factors: tuple
    smoothing_sigmas_mm: tuple
    iterations: int
    histogram_bins: int
    learning_rate: float
    relaxation: float
    min_step: float
    scales: str
    initializer: str
    start_angles_deg: tuple
    turns_deg: tuple
    turn_min_gain: float
    mask_margin_mm: float
    min_improvement: float
    identity_usable: bool = True  # whether the identity overlaps at all (the safety net compares with it)
    warnings: list = dataclasses.field(default_factory=list)  # what the user should know about the result

    def check(self) -> "_Settings":
        """Programming errors (not the user's input), hence ValueError."""
        if self.initializer not in ("geometry", "moments"):
            raise ValueError(f"initializer must be 'geometry' or 'moments', got {self.initializer!r}")
        if self.scales not in ("head", "physical_shift"):
            raise ValueError(f"scales must be 'head' or 'physical_shift', got {self.scales!r}")
        if not self.shrink_factors or len(self.shrink_factors) != len(self.smoothing_sigmas_mm):
            raise ValueError("shrink_factors and smoothing_sigmas_mm need the same, non-zero length")
        if not 0.0 < self.sampling_percentage <= 1.0:
            raise ValueError("sampling_percentage must be in (0, 1]")
        if not 0.0 < self.relaxation < 1.0:
            raise ValueError("relaxation must be in (0, 1)")
        return self


def _prepared(fixed: sitk.Image, moving: sitk.Image) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """Both images as float, checked to have content, and the MRI's head mask."""
    fixed = _as_float(fixed, "MRI (fixed image)")
    moving = _as_float(moving, "CT (moving image)")
    _check_content(fixed, "MRI (fixed image)")
    _check_content(moving, "CT (moving image)")
    fixed_mask = foreground_mask(fixed)
    if not sitk.GetArrayViewFromImage(fixed_mask).any():
        raise CTMRIError("no head was found in the MRI (nothing above its Otsu threshold); check the MRI")
    return fixed, moving, fixed_mask


#: ITK's recursive Gaussian smoothing (every pyramid level) needs this many voxels along each axis it smooths
MIN_VOXELS_PER_AXIS = 4


def _check_size(image: sitk.Image, what: str) -> None:
    """Refuse an image too small to register (it used to end in an ITK traceback): fewer than 4 voxels in-plane,
    or 2–3 slices (one slice is registered in its plane)."""
    size = image.GetSize()
    if min(size[:2]) < MIN_VOXELS_PER_AXIS or 1 < size[2] < MIN_VOXELS_PER_AXIS:
        raise CTMRIError(
            f"the {what} is {' × '.join(map(str, size))} voxels: registration needs at least {MIN_VOXELS_PER_AXIS} "
            "along each axis, or a single slice; give more slices, or choose registration 'none' if the CT and "
            "MRI are already aligned"
        )


def _register_2d_or_3d(fixed, moving, fixed_mask, mode: str, settings: _Settings) -> tuple[sitk.Transform, float, int, str]:
    """One-slice images in their plane (:func:`_register_2d`); volumes in 3D, thin slabs in-plane only."""
    _check_size(fixed, "MRI (fixed image)")
    _check_size(moving, "CT (moving image)")
    if fixed.GetSize()[2] == 1 or moving.GetSize()[2] == 1:
        return _register_2d(fixed, moving, fixed_mask, mode, settings)
    frozen, note = _slab_constraints(fixed, moving)
    transform, metric, its, stop = _optimise(fixed, moving, fixed_mask, _new_transform(3, mode), settings, frozen=frozen)
    return transform, metric, its, note + stop


def _check_final_overlap(overlap: float, min_overlap: float) -> None:
    if overlap < min_overlap:
        raise CTMRIError(
            f"after registration only {overlap:.0%} of the MRI's head lies inside the CT (at least "
            f"{min_overlap:.0%} is needed). Check that the CT and the MRI show the same patient and region; if they "
            "are already aligned, use registration 'none'; if the CT covers only part of the MRI's head on purpose, "
            "crop the MRI to the region the CT covers."
        )


def _register_2d(fixed, moving, fixed_mask, mode, settings: _Settings) -> tuple[sitk.Transform, float, int, str]:
    """Register two one-slice volumes in the fixed slice's plane, then lift the result to 3D."""
    if fixed.GetSize()[2] != 1 or moving.GetSize()[2] != 1:
        raise CTMRIError(
            "one image is a single slice and the other a volume; give both as volumes, or both as "
            "matching single slices"
        )
    origin_f = np.array(fixed.GetOrigin())
    frame = _direction(fixed)  # columns u, v, n: the fixed slice's axes and normal (orthonormal)
    u, v, n = frame[:, 0], frame[:, 1], frame[:, 2]
    dir_m = _direction(moving)
    if abs(n @ dir_m[:, 0]) > 1e-3 or abs(n @ dir_m[:, 1]) > 1e-3:
        raise CTMRIError(
            "the CT slice and the MRI slice are not parallel in physical space; a 2D registration "
            "needs both in the same plane (reslice one to match the other)"
        )
    delta = np.array(moving.GetOrigin()) - origin_f

    # Both slices in the fixed slice's in-plane coordinates (origin at the fixed origin, axes u, v):
    # then the 2D transform is exactly the in-plane part of the 3D one.
    def plane_image(image: sitk.Image, origin, direction) -> sitk.Image:
        out = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(image)[0])
        out.SetSpacing(image.GetSpacing()[:2])
        out.SetOrigin(tuple(float(x) for x in origin))
        out.SetDirection(tuple(float(x) for x in direction))
        return out

    f2 = plane_image(fixed, (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    m2 = plane_image(
        moving,
        (u @ delta, v @ delta),
        (u @ dir_m[:, 0], u @ dir_m[:, 1], v @ dir_m[:, 0], v @ dir_m[:, 1]),
    )
    mask2 = plane_image(fixed_mask, (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    t2, metric, its, stop = _optimise(f2, m2, mask2, _new_transform(2, mode), settings)

    # Lift: with q = frame^T (p - origin_f), the 2D affine acts on (q_u, q_v); the normal gets the
    # plane-to-plane offset and, for a similarity, the same scale (a valid isotropic 3D similarity).
    a2, b2 = _affine_of(t2)
    a3 = np.eye(3)
    a3[:2, :2] = a2
    if mode == "similarity":
        a3[2, 2] = math.sqrt(abs(np.linalg.det(a2)))
    b3 = np.array([b2[0], b2[1], n @ delta])
    matrix = frame @ a3 @ frame.T
    offset = origin_f + frame @ b3 - matrix @ origin_f
    tx3 = _new_transform(3, mode)
    center = _physical_center(fixed)
    tx3.SetCenter(tuple(float(c) for c in center))
    tx3.SetMatrix(tuple(float(x) for x in matrix.ravel()), 1e-6)
    tx3.SetTranslation(tuple(float(x) for x in offset + matrix @ center - center))
    return tx3, metric, its, stop


def _optimise(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image,
    transform: sitk.Transform,
    settings: _Settings,
    frozen: Optional[dict] = None,
) -> tuple[sitk.Transform, float, int, str]:
    """Multi-resolution MI optimisation: (transform, metric, iterations, stop condition).

    Each level is its own ImageRegistrationMethod run on images smoothed and shrunk here,
    starting where the previous level ended, so that the first step can shrink with the level
    (SimpleITK's built-in pyramid restarts every level with the same step) and the coarsest
    level can be run from several starting rotations, keeping the best.
    """
    # Keep at least two voxels along every axis at the coarsest level (an 8-slice slab shrunk by
    # 8 would be one slice).
    smallest = min(fixed.GetSize())
    shrink = [max(1, min(int(f), smallest // 2)) for f in settings.shrink_factors]

    initial = _initial_transform(fixed, moving, fixed_mask, transform, settings.initializer)
    if frozen and frozen.get("translation") and settings.identity_usable:
        # An MRI slab: the shift across it is frozen, so the centring must not make one up. Lining up the centres
        # of an MRI of the top of the head and a whole-head CT moved the CT 36 mm, for good, and the safety net then
        # kept the identity, in-plane motion and all. The scanner coordinates, which overlap, are kept instead.
        shift = list(initial.GetTranslation())
        for axis in frozen["translation"]:
            shift[axis] = 0.0
        initial.SetTranslation(tuple(shift))
    _center_on_head(initial, fixed_mask)
    # The metric looks at the head plus a margin of air: inside the head alone rotation is
    # sharper (a 6° turn of the CT/MR slice 2010 costs 19 % of MI there, 2 % over the whole
    # image), but the head's outline pins the translation (head only, 3 of 12 CT/MR runs on six
    # slices ended 5-31 px off; with the 8 mm margin none did).
    metric_mask = _grown(fixed_mask, settings.mask_margin_mm)
    space = _HeadUnits.of(fixed, moving, fixed_mask, metric_mask)
    current = _rescaled_transform(initial, 1.0 / space.unit)
    parameter_scales = (_head_scales(_rescaled(fixed_mask, space.unit), current, settings.seed)
                        if settings.scales == "head" else None)
    weights = _parameter_weights(current, frozen) if frozen else None
    rotation_axes = None
    if frozen and frozen.get("rotation"):
        rotation_axes = [np.eye(3)[a] for a in range(3) if a not in frozen["rotation"]]
    total = {"iterations": 0}
    pyramid = _Pyramid(space, shrink, parameter_scales, weights)
    start = current  # the start as the descent saw it (head units; ``initial`` differs from it in the last bits)
    current, stop = pyramid.descend(current, settings, total, _start_rotations(current, settings.start_angles_deg, rotation_axes))
    current = _rescaled_transform(current, space.unit)
    metric = None  # the optimum's MI over the head, when the turn check has measured it
    turn_axis = _turn_axis(current, rotation_axes)
    if turn_axis is not None and settings.turns_deg:
        current, stop, metric, warnings = _unless_a_turn_is_better(
            fixed, moving, metric_mask, current, _rescaled_transform(start, space.unit), stop, pyramid, turn_axis,
            settings, total)
        settings.warnings.extend(warnings)
    return _unless_the_identity_is_as_good(fixed, moving, metric_mask, current, transform, settings, total, stop, metric)


@dataclass
class _Pyramid:
    """The levels of one registration (coarse to fine) in head units, and a descent through them."""

    space: "_HeadUnits"
    shrink: list
    scales: Optional[list]
    weights: Optional[list]

    def descend(self, current: sitk.Transform, settings: _Settings, total: dict,
                start_rotations: list) -> tuple[sitk.Transform, str]:
        """Optimise level by level from ``current`` (the coarsest also from ``start_rotations`` of it, the
        best start kept); the transform (head units) and the last level's stop condition."""
        stop = ""
        for level, (factor, sigma) in enumerate(zip(self.shrink, settings.smoothing_sigmas_mm)):
            images = self.space.level(factor, sigma)
            percentage, bins = _level_sampling(images[0], self.space.mask_fraction, settings)
            ratio = factor / self.shrink[0]  # first and minimum step in proportion to the level's voxels
            run = _Level(*images, bins=bins, percentage=percentage, seed=settings.seed + level,
                         learning_rate=settings.learning_rate * ratio / self.space.unit,
                         min_step=settings.min_step * ratio / self.space.unit, scales=self.scales, weights=self.weights)
            starts = [current] + ([_rotated(current, r) for r in start_rotations] if level == 0 else [])
            value, current, stop = _best_start(run, starts, settings, total, level, len(self.shrink))
            if not math.isfinite(value):
                break  # every start diverged: finer levels cannot recover; the checks after decide
        return current, stop


def _turn_axis(transform: sitk.Transform, rotation_axes: Optional[list]) -> Optional[np.ndarray]:
    """The axis quarter turns are tried about: the slice normal in 2D, head–foot (physical z) in 3D when the
    registration may rotate about it (a slab registered in-plane: its own normal); None otherwise."""
    if transform.GetDimension() == 2:
        return np.array([0.0, 0.0, 1.0])
    z = np.array([0.0, 0.0, 1.0])
    if rotation_axes is None or any(np.allclose(a, z) for a in rotation_axes):
        return z
    return None


def _unless_a_turn_is_better(fixed, moving, metric_mask, current, start, stop: str, pyramid: _Pyramid, axis: np.ndarray,
                             settings: _Settings, total: dict) -> tuple[sitk.Transform, str, float, list]:
    """The optimum, or a quarter turn of it when that is clearly better; its stop condition, MI and warnings. ``start``:
    the descent's physical starting transform (centred on the MRI head). A CT turned by 90°, 180° or
    270° in the axial plane against its MRI (pictures exported from another viewer, a wrong orientation header)
    lies beyond the ±10° starts, and the descent ended at a wrong optimum with no word (Harvard pairs turned by a
    quarter or half turn: 0 of 147 recovered, MAE 39–47 against 29; ``experiments/turned_ct.py``).

    Each turn of the optimum (about the MRI head's centre) and each turn that lays the MRI head's centre on the
    CT head's (the optimum from a turned CT can have wandered off sideways, so that its own turns miss) is scored
    as it is; the best, if its MI beats the optimum's at all (``min_improvement``), is optimised from (every level,
    no extra starts, no progress reports: the bar does not go back). It replaces the optimum only when its MI is
    better by ``turn_min_gain`` (20 %); a smaller gain is ambiguous and only warned about: a nearly round head
    section scores almost alike turned, and an aligned top slice of a Harvard pair once looked 14 % better turned by
    180°, while a phantom turned by 180° truly was, by 5 %."""
    bins = settings.histogram_bins
    found = _metric_at(fixed, moving, metric_mask, current, bins)
    if not math.isfinite(found):
        return current, stop, found, []
    ct_centre = _head_centroid(foreground_mask(moving))
    better = []
    for degrees in settings.turns_deg:
        candidates = [_rotated(current, (axis, math.radians(degrees)))]
        if ct_centre is not None:
            centred = _rotated(start, (axis, math.radians(degrees)))
            centred.SetTranslation(tuple(float(x) for x in ct_centre - np.array(centred.GetCenter())))
            candidates.append(centred)
        for turned in candidates:
            value = _metric_at(fixed, moving, metric_mask, turned, bins)
            if value < found - settings.min_improvement * abs(found):
                better.append((value, degrees, turned))
    if not better:
        return current, stop, found, []
    _, degrees, turned = min(better, key=lambda item: item[0])
    quiet = dataclasses.replace(settings, progress=None)
    refined, refined_stop = pyramid.descend(_rescaled_transform(turned, 1.0 / pyramid.space.unit), quiet, total, [])
    refined = _rescaled_transform(refined, pyramid.space.unit)
    value = _metric_at(fixed, moving, metric_mask, refined, bins)
    gain = (found - value) / abs(found)
    if gain >= settings.turn_min_gain:
        return refined, (f"turned by {degrees:g}° in the axial plane: that optimum's MI {value:.4f} beats the first "
                         f"one's {found:.4f}; check the CT's orientation against the MRI's (optimiser: {refined_stop})"), value, [
            f"the CT lay turned by {degrees:g}° in the axial plane against the MRI (mutual information {gain:.0%} better "
            "turned); it was registered turned: check the CT's orientation, and the registered CT over the MRI"]
    if gain < settings.min_improvement:
        return current, stop, found, []
    return current, stop, found, [
        f"the CT turned by {degrees:g}° in the axial plane matches the MRI about as well ({gain:.0%} better mutual "
        f"information, less than the {settings.turn_min_gain:.0%} a turn needs): the orientation was kept as given, "
        "but it is uncertain; look at the registered CT over the MRI"]


@dataclass
class _HeadUnits:
    """The images in "head units": all coordinates divided by the head's RMS radius (``unit``, mm).

    A radian of rotation and a unit of translation then move head points by about the same amount, so
    every parameter scale is close to 1. That matters: regular-step gradient descent divides the
    gradient by the scales but normalises the step by the *scaled* gradient's length, so with scales of
    1 and ~5000 (mm vs radians) a step of "2" became 2 radians whenever the translation had converged
    (seen: the angle jumping 0.05 -> 0.84 rad in one step).
    """

    unit: float
    fixed: sitk.Image
    moving: sitk.Image
    mask: sitk.Image  # the metric mask
    mask_fraction: float  # of the fixed image's voxels

    @classmethod
    def of(cls, fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, metric_mask: sitk.Image) -> "_HeadUnits":
        unit = _head_radius(fixed_mask)
        fixed_n, moving_n, mask_n = (_rescaled(im, unit) for im in (fixed, moving, metric_mask))
        return cls(unit, fixed_n, moving_n, mask_n, float(sitk.GetArrayViewFromImage(metric_mask).mean()))

    def level(self, factor: int, sigma_mm: float) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
        """(fixed, moving, mask) of one pyramid level: smoothed by ``sigma_mm``, shrunk by ``factor``."""
        fixed, moving = self.fixed, self.moving
        if sigma_mm > 0:
            fixed = sitk.SmoothingRecursiveGaussian(fixed, sigma_mm / self.unit)
            moving = sitk.SmoothingRecursiveGaussian(moving, sigma_mm / self.unit)
        mask = self.mask
        if factor > 1:
            fixed = sitk.Shrink(fixed, [factor] * fixed.GetDimension())
            mask = sitk.Shrink(self.mask, [factor] * fixed.GetDimension())
            # The moving image is shrunk to about the same voxel size (after smoothing): same
            # accuracy, less to interpolate (RIRE: 3.4 s of CPU instead of 3.9 s).
            target = min(fixed.GetSpacing())
            moving_factors = [
                max(1, min(int(target / sp), n // 2)) for sp, n in zip(moving.GetSpacing(), moving.GetSize())
            ]
            if max(moving_factors) > 1:
                moving = sitk.Shrink(moving, moving_factors)
        return fixed, moving, mask


def _level_sampling(fixed_level: sitk.Image, mask_fraction: float, settings: _Settings) -> tuple[float, int]:
    """The fraction of a level's voxels the metric samples, and its histogram bins."""
    # Coarse levels have few head voxels: a plain percentage would leave a few hundred
    # samples, too few for a 50-bin joint histogram. Each level gets at least min_samples.
    n_head = mask_fraction * float(np.prod(fixed_level.GetSize()))
    percentage = min(1.0, max(settings.sampling_percentage, settings.min_samples / max(n_head, 1.0)))
    # Histogram bins to match the sample: 50x50 joint bins filled by the ~1,700 samples of a
    # coarse 2D level are mostly empty, which biases MI (with 50 bins throughout, aligned
    # Harvard pairs moved up to 2.8 px instead of 2.2 px).
    bins = min(settings.histogram_bins, max(16, int(math.sqrt(percentage * n_head / _SAMPLES_PER_JOINT_BIN))))
    return percentage, bins


@dataclass
class _Level:
    """One pyramid level's images and optimiser settings (steps in head units)."""

    fixed: sitk.Image
    moving: sitk.Image
    mask: sitk.Image
    bins: int
    percentage: float
    seed: int
    learning_rate: float
    min_step: float
    scales: Optional[list]
    weights: Optional[list]


def _best_start(run: _Level, starts: list, settings: _Settings, total: dict, level: int,
                n_levels: int) -> tuple[float, sitk.Transform, str]:
    """Optimise from each start at this level; (metric, transform, stop condition) of the best."""
    best = None
    for i, start in enumerate(starts):
        candidate = _clone(start)
        label = f"registration level {level + 1}/{n_levels}" + (f", start {i + 1}/{len(starts)}" if len(starts) > 1 else "")
        span = ((level + i / len(starts)) / n_levels, (level + (i + 1) / len(starts)) / n_levels)
        value, stop = _run_level(run, candidate, settings, total, span, label)
        # Same level images and the same samples for every start: the values compare.
        if best is None or value < best[0]:
            best = (value, candidate, stop)
    return best


def _unless_the_identity_is_as_good(fixed, moving, metric_mask, current, transform, settings: _Settings, total: dict,
                                    stop: str, metric: Optional[float] = None) -> tuple[sitk.Transform, float, int, str]:
    """The optimum, or the identity when the optimum is not clearly better (the safety net). ``metric``: the
    optimum's MI over the head when it is known already (measured here otherwise)."""
    # Registering an already-aligned pair must not make it worse. Compare the metric
    # (all voxels of the metric mask, not the optimiser's sample) at the optimum and at the
    # identity (when that overlaps at all); move only on a clear gain. On the shipped 8-mm slab
    # the optimiser turned the CT by 2.3° (1.2 mm mean over the head, 10 mm at the corners) for
    # a 0.9 % gain, although MI varies by under 0.4 % between 0° and 4° there: the data do not
    # determine that turn. Real corrections gain far
    # more (the known 10° / 15 px CT/MR motion: 80-90 %; the 3D RIRE motion: 400 %).
    if metric is None:
        metric = _metric_at(fixed, moving, metric_mask, current, settings.histogram_bins)
    if settings.identity_usable:
        identity = _new_transform(fixed.GetDimension(), transform.GetName())
        identity.SetCenter(current.GetCenter())
        metric_identity = _metric_at(fixed, moving, metric_mask, identity, settings.histogram_bins)
        if not math.isfinite(metric_identity) and not math.isfinite(metric):
            raise CTMRIError(_DIVERGED)
        gain = (metric_identity - metric) / max(abs(metric_identity), 1e-12)  # MI is negative: lower is better
        if gain < settings.min_improvement or not math.isfinite(metric):
            return identity, metric_identity, total["iterations"], (
                f"kept the identity: the optimum's MI {metric:.4f} is not {settings.min_improvement:.0%} better than "
                f"the identity's {metric_identity:.4f} (optimiser: {stop})"
            )
    if not math.isfinite(metric):
        raise CTMRIError(_DIVERGED)
    return current, metric, total["iterations"], stop


_DIVERGED = (
    "the registration failed: the optimiser moved the CT off the MRI. Check that the CT and the MRI show "
    "the same patient and region; if they are already aligned, use registration 'none'."
)


def _run_level(
    run: _Level,
    transform: sitk.Transform,
    settings: _Settings,
    total: dict,
    span: tuple[float, float],
    label: str,
) -> tuple[float, str]:
    """One regular-step gradient descent run at one resolution; updates ``transform`` in place."""
    method = _mattes_method(run.bins, run.mask)
    method.SetMetricSamplingStrategy(method.RANDOM)
    # The fixed seed makes the random sample, hence the result, reproducible.
    method.SetMetricSamplingPercentage(run.percentage, run.seed)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=run.learning_rate,
        minStep=run.min_step,
        numberOfIterations=settings.iterations,
        relaxationFactor=settings.relaxation,
        # MI gradients are small numbers; stop on the step length, not on the gradient size.
        gradientMagnitudeTolerance=1e-10,
    )
    if run.scales is not None:
        method.SetOptimizerScales(run.scales)
    else:
        method.SetOptimizerScalesFromPhysicalShift()
    if run.weights is not None:
        method.SetOptimizerWeights(run.weights)  # 0 freezes a parameter (thin slabs)
    method.SetShrinkFactorsPerLevel([1])
    method.SetSmoothingSigmasPerLevel([0.0])
    method.SetInitialTransform(transform, inPlace=True)
    cancel, iterations = settings.cancel, settings.iterations
    cancelled = []

    def on_iteration() -> None:
        total["iterations"] += 1
        if cancel is not None and cancel():
            cancelled.append(True)
            method.StopRegistration()
            return
        it = method.GetOptimizerIteration()
        fraction = span[0] + (span[1] - span[0]) * min(1.0, (it + 1) / max(1, iterations))
        _report(settings.progress, min(0.99, fraction), f"{label}, iteration {it + 1}, MI {method.GetMetricValue():.4f}")

    method.AddCommand(sitk.sitkIterationEvent, on_iteration)
    _check_cancel(cancel)
    try:
        with _single_threaded():
            method.Execute(run.fixed, run.moving)
    except RuntimeError as exc:
        if cancelled:
            raise CancelledError() from None
        if "outside moving image" not in str(exc):
            raise
        # The optimiser walked the images apart (ITK: "All samples map outside moving image
        # buffer"): this start failed; the caller compares it as infinitely bad.
        return math.inf, "diverged: the images stopped overlapping"
    if cancelled:
        raise CancelledError()
    return float(method.GetMetricValue()), method.GetOptimizerStopConditionDescription()


def _slab_constraints(fixed: sitk.Image, moving: sitk.Image) -> tuple[Optional[dict], str]:
    """Which motions a thin slab cannot determine, as {"rotation": axes, "translation": axes}.

    A slab (extent along its slice normal under a fifth of its in-plane extent, e.g. an 8-mm CT
    slab) does not determine tilts: on the shipped 8-slice sample (aligned), free 3D registration
    tilted it by 4.7° and moved head points by 9.5 mm on average, leaving 44 % of the head
    overlapping: MI over fewer points was "better". So rotations are kept
    about the slab normal only; if the MRI itself is the slab, the shift along the normal is
    fixed too (there is nothing beyond the slab to match).
    """
    for image, is_fixed in ((fixed, True), (moving, False)):
        direction = _direction(image)
        extents = np.array(image.GetSize()) * np.array(image.GetSpacing())
        if extents[2] < 0.2 * min(extents[0], extents[1]):
            axis = int(np.argmax(np.abs(direction[:, 2])))  # physical axis nearest the normal
            others = tuple(a for a in range(3) if a != axis)
            which = "MRI" if is_fixed else "CT"
            note = f"thin {which} slab ({extents[2]:.0f} mm): in-plane rotation only"
            if is_fixed:
                return {"rotation": others, "translation": (axis,)}, note + ", no shift across the slab; "
            return {"rotation": others, "translation": ()}, note + "; "
    return None, ""


def _parameter_weights(transform: sitk.Transform, frozen: dict) -> list[float]:
    """Optimiser weights: 0 for the frozen rotation axes and translations, 1 elsewhere."""
    weights = [1.0] * len(transform.GetParameters())
    # Euler3D: (rx, ry, rz, tx, ty, tz); Similarity3D: (versor x, y, z, tx, ty, tz, scale).
    for axis in frozen.get("rotation", ()):
        weights[axis] = 0.0
    for axis in frozen.get("translation", ()):
        weights[3 + axis] = 0.0
    return weights


def _start_rotations(
    transform: sitk.Transform, angles_deg: tuple[float, ...], axes: Optional[list] = None
) -> list[tuple[np.ndarray, float]]:
    """Extra coarse-level starts: ± each angle about the slice normal (2D) or each axis (3D)."""
    if axes is None:
        axes = [np.array([0.0, 0.0, 1.0])] if transform.GetDimension() == 2 else list(np.eye(3))
    return [(axis, math.radians(sign * a)) for a in angles_deg if a for axis in axes for sign in (1, -1)]


def _rotated(transform: sitk.Transform, axis_angle: tuple[np.ndarray, float]) -> sitk.Transform:
    """``transform`` preceded by a rotation about its centre (the head centroid)."""
    axis, angle = axis_angle
    out = _clone(transform)
    dim = transform.GetDimension()
    if dim == 2:
        r = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    else:
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        r = np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)
    matrix, _ = _affine_of(transform)
    c = np.array(transform.GetCenter())
    # T'(p) = T(R(p - c) + c): same centre, matrix A R, translation unchanged.
    out.SetMatrix(tuple(float(x) for x in (matrix @ r).ravel()), 1e-6)
    out.SetTranslation(tuple(float(x) for x in np.array(transform.TransformPoint(tuple(c))) - c))
    return out


def _initial_transform(
    fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, transform: sitk.Transform, initializer: str
) -> sitk.Transform:
    """The starting transform from ``CenteredTransformInitializer``.

    GEOMETRY (default) aligns the centres of the two images' extents: no motion at all for images
    that share a grid (the shared test pairs, and the project's demo sample), and independent of
    intensities. MOMENTS aligns centres of mass; it is computed on the Otsu head masks, not on raw
    values, because a CT in HU has negative "mass" (-1000) in the air. It can bring disjoint
    images together, but a CT's couch or a larger field of view pulls its centroid away from the
    head, so it is offered, not the default.
    """
    if initializer == "moments":
        f = sitk.Cast(fixed_mask, sitk.sitkFloat32)
        m = sitk.Cast(foreground_mask(moving), sitk.sitkFloat32)
        kind = sitk.CenteredTransformInitializerFilter.MOMENTS
    else:
        f, m = fixed, moving
        kind = sitk.CenteredTransformInitializerFilter.GEOMETRY
    # SimpleITK 2.2/2.3 (Slicer 5.6/5.8) return a base sitk.Transform here, without GetCenter & co.;
    # Downcast() gives the concrete Euler/Similarity type on every version.
    return sitk.CenteredTransformInitializer(f, m, transform, kind).Downcast()


def _head_centroid(mask: sitk.Image) -> Optional[np.ndarray]:
    """Physical centroid of a head mask (label 1); None when it is empty."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    return np.array(stats.GetCentroid(1)) if stats.HasLabel(1) else None


def _center_on_head(transform: sitk.Transform, fixed_mask: sitk.Image) -> None:
    """Move the rotation centre to the head centroid, keeping the mapping unchanged."""
    new_c = _head_centroid(fixed_mask)
    if new_c is None:
        return
    old_c = np.array(transform.GetCenter())
    matrix, _ = _affine_of(transform)
    # T(p) = A(p - c) + c + t: the same map about c' needs t' = t + (A - I)(c' - c).
    t = np.array(transform.GetTranslation()) + (matrix - np.eye(len(new_c))) @ (new_c - old_c)
    transform.SetCenter(tuple(float(x) for x in new_c))
    transform.SetTranslation(tuple(float(x) for x in t))


def _grown(mask: sitk.Image, margin_mm: float) -> sitk.Image:
    """``mask`` dilated by about ``margin_mm`` (a ball in voxels per axis; one-voxel axes kept)."""
    if margin_mm <= 0:
        return mask
    radius = [0 if n == 1 else max(1, int(round(margin_mm / sp))) for sp, n in zip(mask.GetSpacing(), mask.GetSize())]
    return sitk.BinaryDilate(mask, radius, sitk.sitkBall, 0, 1)


def _head_radius(fixed_mask: sitk.Image, n_points: int = 5000) -> float:
    """RMS distance (mm) of head voxels from the head centroid (a deterministic subsample)."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(fixed_mask) > 0)[:, ::-1]
    idx = idx[:: max(1, len(idx) // n_points)]
    points = np.array([fixed_mask.TransformIndexToPhysicalPoint([int(i) for i in row]) for row in idx])
    radius = float(np.sqrt(np.mean(np.sum((points - points.mean(axis=0)) ** 2, axis=1))))
    return max(radius, 1e-3)


def _rescaled(image: sitk.Image, factor: float) -> sitk.Image:
    """A copy of ``image`` with its physical coordinates divided by ``factor`` (voxels unchanged)."""
    out = sitk.Image(image)
    out.SetOrigin(tuple(o / factor for o in image.GetOrigin()))
    out.SetSpacing(tuple(sp / factor for sp in image.GetSpacing()))
    return out


def _rescaled_transform(transform: sitk.Transform, factor: float) -> sitk.Transform:
    """The transform expressed in coordinates multiplied by ``factor`` (angles/scale unchanged)."""
    out = _clone(transform)
    out.SetCenter(tuple(c * factor for c in transform.GetCenter()))
    out.SetTranslation(tuple(t * factor for t in transform.GetTranslation()))
    return out


def _head_scales(fixed_mask: sitk.Image, transform: sitk.Transform, seed: int, n_points: int = 500) -> list[float]:
    """Per parameter: mean squared shift of head points for a unit change (finite differences).

    Like ITK's physical-shift scales, but measured where the images carry information (the head)
    rather than at the image corners.
    """
    idx = np.argwhere(sitk.GetArrayViewFromImage(fixed_mask) > 0)[:, ::-1]  # (x, y[, z]) order
    if len(idx) > n_points:
        idx = idx[np.random.default_rng(seed).choice(len(idx), n_points, replace=False)]
    points = [fixed_mask.TransformIndexToPhysicalPoint([int(i) for i in row]) for row in idx]
    base = np.array([transform.TransformPoint(p) for p in points])
    params = np.array(transform.GetParameters())
    probe = _clone(transform)
    eps = 1e-4
    out = []
    for i in range(len(params)):
        moved = params.copy()
        moved[i] += eps
        probe.SetParameters(tuple(moved))
        shifted = np.array([probe.TransformPoint(p) for p in points])
        out.append(max(float(np.mean(np.sum((shifted - base) ** 2, axis=1))) / eps**2, 1e-12))
    return out


def _mattes_method(bins: int, mask: sitk.Image) -> sitk.ImageRegistrationMethod:
    """A registration method with the masked Mattes MI metric that both optimising and evaluating use.

    Image gradients are taken by central differences at the sampled points only, instead of gradient
    images of both whole volumes at every run (same accuracy here, less setup per run; an evaluation
    needs no gradient at all).
    """
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    method.SetMetricFixedMask(mask)
    method.MetricUseFixedImageGradientFilterOff()
    method.MetricUseMovingImageGradientFilterOff()
    method.SetInterpolator(sitk.sitkLinear)
    return method


def _metric_at(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image, transform: sitk.Transform, bins: int) -> float:
    """Mattes MI of ``transform`` over the head voxels (no random sampling, no pyramid)."""
    # MetricEvaluate uses every voxel; halving large in-plane sizes makes it 4x cheaper while
    # still using far more points than the optimiser's sample.
    factors = [2 if (d < 2 and n >= 128) else 1 for d, n in enumerate(fixed.GetSize())]
    if any(f > 1 for f in factors):
        fixed, mask = sitk.Shrink(fixed, factors), sitk.Shrink(mask, factors)
    evaluator = _mattes_method(bins, mask)
    evaluator.SetInitialTransform(_clone(transform), inPlace=False)
    try:
        with _single_threaded():
            return float(evaluator.MetricEvaluate(fixed, moving))
    except RuntimeError as exc:
        if "outside moving image" in str(exc):
            return math.inf  # no overlap at all: worse than any real value
        raise


@contextlib.contextmanager
def _single_threaded():
    """Run ITK single-threaded inside the block (restoring the previous default after).

    With two threads the same inputs gave different transforms from run to run (the aligned CT/MR
    slice 16010: translations 0.6-1.1 px apart), presumably from the order in which ITK adds
    the threads' contributions to the Mattes histogram; the registration method's own thread
    setting did not help. One thread makes every run identical (checked across processes).
    """
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _new_transform(dim: int, kind: str) -> sitk.Transform:
    """A fresh identity transform: rigid (Euler) or similarity, 2D or 3D. ``kind`` is a mode or an ITK name."""
    similarity = "imilarity" in kind
    if dim == 2:
        return sitk.Similarity2DTransform() if similarity else sitk.Euler2DTransform()
    return sitk.Similarity3DTransform() if similarity else sitk.Euler3DTransform()


def _identity_like(mode: str, center) -> sitk.Transform:
    """The identity as the 3D transform type ``mode`` returns, centred on ``center``."""
    tx = _new_transform(3, mode)
    tx.SetCenter(tuple(float(c) for c in center))
    return tx


def _clone(transform: sitk.Transform) -> sitk.Transform:
    """A deep copy of the same concrete transform type."""
    return type(transform)(transform)


def _as_float(image: sitk.Image, name: str) -> sitk.Image:
    if not isinstance(image, sitk.Image):
        raise TypeError(f"the {name} must be a SimpleITK image, got {type(image).__name__}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CTMRIError(
            f"the {name} has {image.GetNumberOfComponentsPerPixel()} components per pixel; "
            "convert it to a single-channel (grey) image first"
        )
    return image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)


def _check_content(image: sitk.Image, name: str) -> None:
    if image.GetDimension() != 3:
        raise CTMRIError(f"the {name} must be 3D (a 2D image is read as a one-slice volume), got {image.GetDimension()}D")
    a = sitk.GetArrayViewFromImage(image)
    if a.size == 0:
        raise CTMRIError(f"the {name} is empty")
    if not np.isfinite(a).all():
        raise CTMRIError(f"the {name} contains NaN or infinite values; check the file")
    if float(a.max()) == float(a.min()):
        raise CTMRIError(
            f"the {name} is constant (every voxel is {float(a.min()):g}); check that the right file or volume was chosen"
        )


def _check_cancel(cancel: Optional[CancelCallback]) -> None:
    if cancel is not None and cancel():
        raise CancelledError()


def _report(progress: Optional[ProgressCallback], fraction: float, message: str) -> None:
    if progress is not None:
        progress(float(fraction), message)


def _direction(image: sitk.Image) -> np.ndarray:
    d = image.GetDimension()
    return np.array(image.GetDirection(), dtype=float).reshape(d, d)


def _physical_center(image: sitk.Image) -> np.ndarray:
    size = np.array(image.GetSize(), dtype=float)
    return np.array(image.TransformContinuousIndexToPhysicalPoint(tuple((size - 1.0) / 2.0)))


def _affine_of(tx: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with tx(p) = A p + b, probed at d + 1 points: exact for any affine transform."""
    dim = tx.GetDimension()
    b = np.array(tx.TransformPoint(tuple([0.0] * dim)))
    a = np.empty((dim, dim))
    for i in range(dim):
        e = [0.0] * dim
        e[i] = 1.0
        a[:, i] = np.array(tx.TransformPoint(tuple(e))) - b
    return a, b


def _displacements(tx: sitk.Transform, reference: sitk.Image) -> np.ndarray:
    """tx(p) − p for every voxel of ``reference``, as a (z, y, x, 3) array."""
    field = sitk.TransformToDisplacementField(
        tx,
        sitk.sitkVectorFloat64,
        reference.GetSize(),
        reference.GetOrigin(),
        reference.GetSpacing(),
        reference.GetDirection(),
    )
    return sitk.GetArrayFromImage(field)
