"""The one path from CT (and optional MRI) to synthetic MRI, difference map and metrics.

The CLI, the Slicer Logic and the tests all call :func:`synthesize`, on SimpleITK images (and
``outputs.save_outputs`` to write a result into a folder, all or nothing). Steps: register CT→MRI (if an MRI
is given) → normalise the CT as the weights file says → resample onto the model's 256×256 axial grid →
predict all slices in batches → put the result back on the reference grid → difference = MRI − synthetic
(0..255) → metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk

from . import geometry
from .contrast import reference_csf_over_brain, reference_warnings
from .errors import CTMRIError
from .intensity import CTWindow, check_finite, ct_likeness, modality_warnings, normalise_ct, normalise_mri
from .volumes import as_scalar_3d

Progress = Optional[Callable[[float, str], None]]
Cancel = Optional[Callable[[], bool]]

REGISTRATION_MODES = ("rigid", "similarity", "none")


@dataclass
class SynthesisResult:
    """Everything one synthesis produces. Images are on the reference grid (MRI's, or the CT's)."""

    synthetic_mri: sitk.Image
    ct_registered: Optional[sitk.Image] = None  # CT (original values) resampled onto the MRI grid
    difference: Optional[sitk.Image] = None  # reference MRI (0..255) − synthetic MRI, float32
    uncertainty: Optional[sitk.Image] = None  # per-voxel spread of the prediction, 0..255 scale, 0 outside the head
    transform: Optional[sitk.Transform] = None  # maps MRI physical points to CT points (ITK convention)
    metrics: Optional[dict] = None
    registration: Optional[dict] = None
    normalisation: dict = field(default_factory=dict)
    device: str = "cpu"
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    #: where the inputs came from and how the run was asked for (e.g. ``ct_series``, ``made_from``);
    #: callers above the pipeline (DICOM input, batch) fill it; it is written into ``metrics.json``.
    provenance: dict = field(default_factory=dict)
    uncertainty_mean: Optional[float] = None  # mean of the uncertainty over the head, 0..255
    #: the reference MRI's CSF / brain tissue ratio, tissues from the registered CT (contrast.py); with an MRI
    reference_csf_over_brain: Optional[float] = None
    #: the axial grid the network ran on: {"size": [x, y, slices], "spacing_mm": [x, y, slice step]}
    model_grid: Optional[dict] = None

    def output_images(self) -> dict:
        """{kind: image} of every volume this result holds (synthetic MRI first), for writers of all kinds."""
        images = {
            "synthetic_mri": self.synthetic_mri, "ct_registered": self.ct_registered,
            "difference": self.difference, "uncertainty": self.uncertainty,
        }
        return {kind: image for kind, image in images.items() if image is not None}

    def summary(self) -> dict:
        """The content of ``metrics.json``: metrics (when an MRI was given) and how they were made."""
        from .metrics import to_jsonable
        from .version import software

        out: dict = {}
        if self.metrics is not None:
            out.update(self.metrics)
            out["reference_csf_over_brain"] = self.reference_csf_over_brain
        if self.uncertainty is not None:
            out["uncertainty_mean"] = self.uncertainty_mean
        out.update(
            registration=self.registration,
            device=self.device,
            seconds=round(self.seconds, 3),
            stage_seconds={k: round(v, 3) for k, v in self.stage_seconds.items()},
            normalisation=self.normalisation,
            model_grid=self.model_grid,
            weights=self.weights,
            software=software(),
            warnings=list(self.warnings),
        )
        out.update(self.provenance)
        return to_jsonable(out)


class _Stages:
    """Times named stages and maps their local progress onto the overall 0..1 range."""

    def __init__(self, progress: Progress, cancel: Cancel) -> None:
        self.progress, self.cancel, self.seconds = progress, cancel, {}

    def run(self, name: str, start: float, end: float, fn: Callable, *args, **kwargs):
        from .errors import CancelledError

        if self.cancel is not None and self.cancel():
            raise CancelledError()
        self.report(start, name)
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        self.report(end, name)
        return result

    def sub(self, start: float, end: float) -> Progress:
        if self.progress is None:
            return None
        return lambda f, msg: self.progress(start + (end - start) * float(f), msg)

    def report(self, fraction: float, message: str) -> None:
        if self.progress is not None:
            self.progress(fraction, message)


def check_image(image: sitk.Image, what: str) -> sitk.Image:
    """Scalar 3D with finite, non-constant voxels; returns the 3D image."""
    image = as_scalar_3d(image, what)
    array = sitk.GetArrayViewFromImage(image)
    if array.size == 1:
        raise CTMRIError(
            f"the {what} has a single voxel (value {float(array.flat[0]):g}); give the whole {what} volume"
        )
    check_finite(array, what)  # on the view itself: a float64 copy of a clinical CT would cost gigabytes
    if float(array.min()) == float(array.max()):
        raise CTMRIError(
            f"the {what} is constant (all voxels = {float(array.min()):g}); it holds no anatomy: check that the "
            f"right {what} was chosen"
        )
    return image


#: a label map or mask (a segmentation) holds a handful of whole-number values, a head scan many more: the real
#: images here have 983–2661 (3D), 203–256 (the other hospital's 8-bit slices) and, the fewest, 39 (one Harvard
#: slice, an atlas quantised to few grey levels; test_pipeline's test_no_real_image_here_is_taken_for_a_label_map
#: checks them all). A CT with no more distinct values than this is refused
LABEL_MAP_MAX_VALUES = 16
#: voxels looked at first, evenly strided, so that a real image (hundreds of values in any sample) costs milliseconds
_LABEL_SAMPLE = 1_000_000


def check_not_label_map(image: sitk.Image) -> sitk.Image:
    """The CT, unless it holds at most ``LABEL_MAP_MAX_VALUES`` distinct whole numbers, none negative: a label map
    or mask given as the CT, which would otherwise be read as an 8-bit CT (a 0/255 mask: all bone, no warning).
    (Negative values are HU: a noise-free CT phantom of a few tissues is not refused. The MRI is not checked: a
    reference of few grey levels, such as a test phantom's, is scored as it is.)"""
    flat = sitk.GetArrayViewFromImage(image).reshape(-1)
    if np.unique(flat[:: max(1, flat.size // _LABEL_SAMPLE)]).size > LABEL_MAP_MAX_VALUES:
        return image
    values = np.unique(flat)  # only for the rare image whose sample has few values
    if values.size > LABEL_MAP_MAX_VALUES or values[0] < 0 or not np.array_equal(values, np.round(values)):
        return image
    shown = ", ".join(f"{v:g}" for v in values[:8]) + (", …" if values.size > 8 else "")
    raise CTMRIError(f"the CT holds only {values.size} distinct values ({shown}): a label map or mask (a "
                     "segmentation), not a CT; give the CT scan itself (in Hounsfield units or a windowed export)")


#: the fewest voxels along each of a CT's two largest axes: a head CT slice has hundreds (the model works on
#: 256 × 256); fewer is a thumbnail, an icon or a mistake, and the synthesis would be meaningless
MIN_CT_SIDE = 16


def _check_ct_size(ct: sitk.Image) -> sitk.Image:
    """The CT, if it has at least ``MIN_CT_SIDE`` voxels along its two largest axes (one slice of a 2D picture
    counts: its third axis is 1)."""
    sides = sorted(ct.GetSize(), reverse=True)[:2]
    if min(sides) < MIN_CT_SIDE:
        raise CTMRIError(
            f"the CT is {' × '.join(map(str, ct.GetSize()))} voxels, too small to be a head CT (a slice of one has "
            f"hundreds of voxels a side; the model works on 256 × 256): give the CT volume itself, not a thumbnail")
    return ct


def _check_scorable(mri: sitk.Image) -> sitk.Image:
    """The MRI, if its axial slices (those the metrics score) are large enough to be scored against (the SSIM
    window must fit), checked before any work rather than after it."""
    from .metrics import MIN_INPLANE

    # the axial slices are across the axis closest to head–foot (as geometry.canonical_axial orders them),
    # whatever the order the file stores them in: a sagittal localiser has few voxels left–right
    direction = np.array(mri.GetDirection()).reshape(3, 3)
    superior = int(np.argmax(np.abs(direction[2])))
    width, height = (n for axis, n in enumerate(mri.GetSize()) if axis != superior)
    if min(width, height) < MIN_INPLANE:
        raise CTMRIError(
            f"the MRI's axial slices are {width} × {height} voxels, too small to compare a synthetic MRI with (the "
            f"SSIM needs at least {MIN_INPLANE} × {MIN_INPLANE}): give the patient's MRI volume, not a thumbnail or "
            "a localiser, or synthesize without an MRI")
    return mri


def synthesize(
    ct: sitk.Image,
    mri: Optional[sitk.Image] = None,
    *,
    weights: str | Path | None = None,
    model=None,
    device: str = "auto",
    registration: str = "rigid",
    allow_disjoint: bool = False,
    batch_size: Optional[int] = None,
    progress: Progress = None,
    cancel: Cancel = None,
) -> SynthesisResult:
    """Synthesise an MRI from ``ct``; with ``mri``, also register, difference and evaluate.

    ``weights`` is a model file (default: the shipped one) unless a loaded ``model`` is passed.
    ``registration`` is 'rigid' (default), 'similarity' or 'none'; ``allow_disjoint`` lets it start
    from aligned centres when CT and MRI do not overlap at all (unrelated scanner coordinates) instead
    of refusing. ``progress(fraction, message)``
    is told how far it is; ``cancel()`` returning True stops it with ``CancelledError``.
    Inputs are never modified.
    """
    from .synthesis import choose_device
    from .weights import load_model

    if registration not in REGISTRATION_MODES:
        raise CTMRIError(f"unknown registration {registration!r}; choose one of {', '.join(REGISTRATION_MODES)}")
    t_start = time.perf_counter()
    stages = _Stages(progress, cancel)
    ct = _check_ct_size(check_not_label_map(check_image(ct, "CT")))
    mri = _check_scorable(check_image(mri, "MRI")) if mri is not None else None
    device = choose_device(device)
    if model is None:
        model = stages.run("load model", 0.0, 0.02, load_model, weights, device)
    result = _new_result(ct, mri, model, device)
    if mri is not None:
        reg = stages.run(
            "register", 0.02, 0.3, _register, mri, ct, registration, allow_disjoint, stages.sub(0.02, 0.3), cancel
        )
        result.transform, result.registration = reg.transform, reg.to_dict()
        result.warnings.extend(reg.warnings)
        result.ct_registered = stages.run("resample CT", 0.3, 0.32, geometry.resample, ct, mri, result.transform)
    ct_axial = _synthesise_on_reference(result, ct, mri if mri is not None else ct, model, stages, batch_size, cancel)
    if mri is not None:
        mri255 = geometry.array_on_grid(normalise_mri(sitk.GetArrayFromImage(mri)), mri)
        result.difference = sitk.Subtract(mri255, result.synthetic_mri)
        result.metrics = stages.run("metrics", 0.93, 0.97, evaluate_images, mri255, result.synthetic_mri)
        stages.run("reference check", 0.97, 1.0, _check_reference, result, ct_axial, mri, mri255)
    result.stage_seconds = stages.seconds
    result.seconds = time.perf_counter() - t_start
    stages.report(1.0, "done")
    return result


def _new_result(ct: sitk.Image, mri: Optional[sitk.Image], model, device: str) -> SynthesisResult:
    """A result that names the model file and carries the inputs' modality warnings (a likely swap)."""
    from .weights import sha256_of

    result = SynthesisResult(synthetic_mri=None, device=device)  # type: ignore[arg-type]
    result.warnings.extend(
        modality_warnings(
            sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(mri) if mri is not None else None
        )
    )
    result.weights = {"file": model.path.name if model.path else None, "name": model.config.get("name")}
    # the digest of the bytes the model was loaded from: a batch loads it once for all its cases, and the file
    # could have been replaced since (hashing it again per case would name the new file, not the model run)
    digest = getattr(model, "sha256", None) or (sha256_of(model.path) if model.path is not None else None)
    if digest is not None:
        result.weights["sha256"] = digest
    return result


def _synthesise_on_reference(result: SynthesisResult, ct: sitk.Image, reference: sitk.Image, model, stages: "_Stages",
                             batch_size: Optional[int], cancel: Cancel) -> sitk.Image:
    """The CT normalised as the model was trained, resampled (through the registration, if any) onto the
    model's grid, synthesised, and the synthetic MRI and its uncertainty brought onto ``reference``'s grid.
    Returns the normalised CT (0..255) on the reference grid in axial slices (canonical orientation)."""
    from .error_model import apply as apply_error_model
    from .synthesis import cpu_threads, gives_spread, predict_volume, preprocessing_options

    prep = model.config["preprocessing"]
    ct255, result.normalisation = stages.run("normalise", 0.32, 0.34, normalise_ct, sitk.GetArrayFromImage(ct),
                                             CTWindow(**prep["ct_window"]))
    ct255_image = geometry.array_on_grid(ct255, ct)
    grid = geometry.model_grid(reference, int(prep["size"]))
    result.model_grid = {"size": list(grid.GetSize()), "spacing_mm": [round(v, 4) for v in grid.GetSpacing()]}
    ct_grid = stages.run("resample to model grid", 0.34, 0.36, geometry.resample, ct255_image, grid, result.transform,
                         default_value=0.0)
    run_info: dict = {}
    grid_ct = sitk.GetArrayFromImage(ct_grid)  # windowed, on the model grid: the network's input and the error model's
    prediction = stages.run(
        "synthesise", 0.36, 0.88, predict_volume, model.net, grid_ct,
        **preprocessing_options(prep), device=result.device, batch_size=batch_size, progress=stages.sub(0.36, 0.88),
        cancel=cancel, info=run_info,
    )
    if model.error_model is not None:  # the uncertainty map (error_model.py), its own stage to be timed
        prediction = stages.run("error map", 0.88, 0.9, apply_error_model, model.error_model, prediction, grid_ct,
                                threads=cpu_threads())
    result.warnings.extend(run_info.get("warnings", []))
    # what was done to the CT before the network beyond the window (grain matching, brain-median standardisation)
    result.normalisation.update({k: v for k, v in run_info.items() if k.startswith(("ct_grain", "ct_standardise"))})
    result.device = run_info.get("device", result.device)
    if model.error_model is None and not gives_spread(model.net, preprocessing_options(prep)["flip_tta"]):
        prediction.spread = None  # no map rather than a map of zeros that would read as "certain everywhere"
    result.synthetic_mri, result.uncertainty, head, ct_axial = stages.run(
        "resample to reference", 0.9, 0.93, _to_reference, prediction, grid, reference, ct255_image,
        result.transform, prep.get("mask_output", True),
    )
    if result.uncertainty is not None:
        result.uncertainty_mean = _mean_in_head(result.uncertainty, head)
    return ct_axial


def _check_reference(result: SynthesisResult, ct_axial: sitk.Image, mri: sitk.Image, mri255: sitk.Image) -> None:
    """Is the reference T2-weighted like the synthetic MRI (``contrast.py``)? Its CSF / brain tissue ratio, both
    tissues found on the CT on its grid (``ct_axial``: in axial slices, as the MRI is read here), recorded, and a
    warning below the T2 range (not for a CT given as the MRI: that has its own warning)."""
    result.reference_csf_over_brain = reference_csf_over_brain(
        sitk.GetArrayFromImage(ct_axial), sitk.GetArrayFromImage(geometry.canonical_axial(mri255)))
    if not ct_likeness(sitk.GetArrayViewFromImage(mri))[0]:
        result.warnings.extend(reference_warnings(result.reference_csf_over_brain))


def _to_reference(prediction, grid: sitk.Image, reference: sitk.Image, ct255: sitk.Image,
                  transform: Optional[sitk.Transform], mask: bool) -> tuple:
    """The synthetic MRI and its uncertainty moved from the model grid onto the reference grid, both set to 0
    outside the head as seen at the reference grid's own resolution (the CT's largest object there), so that
    interpolation from the coarser model grid cannot leave a rim of signal outside the head. Returns
    (synthetic MRI, uncertainty, head mask (z, y, x) of the reference grid or None when not masked, the CT on the
    reference grid in axial slices: the reference check reads it too)."""
    from .intensity import head_mask

    # In axial slices whatever the reference's voxel order (head_mask fills holes slice by slice).
    canonical = geometry.canonical_axial(geometry.resample(ct255, reference, transform, default_value=0.0))
    head = None
    if mask:
        axial = geometry.array_on_grid(head_mask(sitk.GetArrayViewFromImage(canonical)).astype(np.uint8), canonical)
        order = sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(reference.GetDirection())
        head = sitk.GetArrayFromImage(sitk.DICOMOrient(axial, order)).astype(bool)
    images = []
    for array in (prediction.mean, prediction.spread):
        if array is None:  # a model with no spread to give (synthesis.gives_spread)
            images.append(None)
            continue
        image = geometry.resample(geometry.array_on_grid(array, grid), reference, None, default_value=0.0)
        if head is not None:
            values = sitk.GetArrayFromImage(image)
            values[~head] = 0.0
            image = geometry.array_on_grid(values, reference)
        images.append(image)
    return images[0], images[1], head, canonical


def _mean_in_head(uncertainty: sitk.Image, head: Optional[np.ndarray]) -> Optional[float]:
    """Mean uncertainty over the head voxels of the reference grid (all voxels when unmasked); None if none."""
    values = sitk.GetArrayViewFromImage(uncertainty)
    if head is None:
        return float(values.mean())
    return float(values[head].mean()) if head.any() else None


def _register(mri, ct, mode, allow_disjoint, progress, cancel):
    from .registration import register

    return register(mri, ct, mode, allow_disjoint=allow_disjoint, progress=progress, cancel=cancel)


def evaluate_images(reference255: sitk.Image, synthetic: sitk.Image) -> dict:
    """Metrics of two 0..255 images on the same grid, over axial slices (canonical orientation)."""
    from .metrics import compute_metrics

    if not geometry.same_grid(reference255, synthetic, tol=1e-4):
        raise CTMRIError("the two images are not on the same voxel grid; resample one onto the other first")
    ref = sitk.GetArrayFromImage(geometry.canonical_axial(reference255))
    syn = sitk.GetArrayFromImage(geometry.canonical_axial(synthetic))
    return compute_metrics(ref, syn)
