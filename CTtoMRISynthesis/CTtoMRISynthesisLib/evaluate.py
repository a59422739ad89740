"""``ctmri evaluate``: a synthetic MRI scored against the real one, from files, as the pipeline scores it.

Both inputs are read as ``ctmri synthesize`` reads its own (a volume file, a DICOM folder through the series
choice, a folder of pictures); the reference is min-max scaled to 0..255 as in the paper, the prediction taken
as it is (or scaled the same way) and resampled onto the reference grid when it lies on another. The metrics
are :func:`pipeline.evaluate_images`'s, so a synthetic MRI written by ``synthesize`` scores the same here.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .errors import CTMRIError

PRED_SCALES = ("as-is", "minmax")


def check_json_target(path: Optional[str]) -> Optional[Path]:
    """Refuse, before any work, a ``--json`` path that could not be written or would replace an image.

    The name must end in ``.json`` (so that a slip such as ``--json mri.nii.gz`` never overwrites the reference
    MRI), its folder must exist, and it must not be a file a ``synthesize`` run wrote (its ``metrics.json`` holds
    the run's registration, model and times, and ``batch`` reads it to know the case is done). An existing file
    is replaced only when it is an earlier ``evaluate`` result (:func:`is_evaluate_result`), as ``synthesize``
    replaces only its own outputs: a ``.json`` of the user's was silently overwritten.
    """
    from .outputs import is_run_output

    if path is None:
        return None
    target = Path(path)
    if target.suffix.lower() != ".json":
        raise CTMRIError(f"--json {path}: give a file name ending in .json for the metrics (e.g. metrics.json)")
    folder = target.parent  # Path("x.json").parent is Path("."), the current folder
    if not folder.is_dir():
        raise CTMRIError(f"--json {path}: the folder {folder} does not exist; create it or choose another path")
    if target.is_dir():
        raise CTMRIError(f"--json {path} is a folder; give a file name ending in .json")
    if is_run_output(target):
        raise CTMRIError(f"--json {path} is the record a `ctmri synthesize` run wrote into {folder} (its registration, "
                         "model and times); write the evaluation beside it under another name, e.g. evaluation.json")
    if (target.exists() or target.is_symlink()) and not is_evaluate_result(target):
        raise CTMRIError(f"--json {path} exists and is not an earlier `ctmri evaluate` result (only those are "
                         "replaced, so that no file of yours is lost): choose another name, or move it away")
    return target


#: Keys every metrics record of ``evaluate`` has had since its first version (:func:`metrics.compute_metrics`).
_RESULT_KEYS = frozenset({"mae", "ssim", "psnr", "mae_whole", "ssim_foreground", "foreground_voxels", "per_slice"})
#: Keys of a ``synthesize`` run's ``metrics.json`` (:func:`outputs._written_by_ctmri`), which holds the metrics
#: too: a copy of that record elsewhere is the run's account (registration, model, times), not ours to replace.
_RUN_RECORD_KEYS = frozenset({"stage_seconds", "normalisation", "weights"})


def is_evaluate_result(path: Path) -> bool:
    """Whether ``path`` is a file an earlier ``ctmri evaluate --json`` wrote, told by its content (a JSON object
    with the metrics' keys and a per-slice list, none of a ``synthesize`` record's). A link is not: replacing
    it would replace the link, and the name could be a user's way to the file."""
    import json

    if path.is_symlink() or not path.is_file():
        return False
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON: not a file we wrote
        return False
    return (isinstance(content, dict) and _RESULT_KEYS <= content.keys() and isinstance(content["per_slice"], list)
            and not _RUN_RECORD_KEYS & content.keys())


#: Least share of the reference MRI's head the prediction must cover to be scored (registration asks the same).
MIN_COVERAGE = 0.5


def evaluate_files(pred: str, ref: str, pred_scale: str = "as-is", picture_spacing: Optional[Sequence[float]] = None,
                   pred_series: Optional[str] = None, ref_series: Optional[str] = None) -> Tuple[dict, List[str], List[str]]:
    """The metrics of the prediction ``pred`` against the reference MRI ``ref`` (JSON-ready), notes and warnings.
    ``pred_series`` / ``ref_series``: the series to take (number or UID) where that input is a DICOM folder.

    The metrics carry ``inputs`` (which series or pictures were read, the pictures' spacing and whether it was
    assumed) and ``warnings`` when there are any. A prediction covering less than :data:`MIN_COVERAGE` of the
    reference's head (another patient, another space, a wrong spacing) is refused rather than scored.
    """
    import SimpleITK as sitk

    from . import geometry
    from .dicom import read_input
    from .intensity import ct_likeness, minmax_255, normalise_mri, reference_is_ct_warning
    from .metrics import to_jsonable
    from .pipeline import check_image, evaluate_images

    if pred_scale not in PRED_SCALES:
        raise CTMRIError(f"--pred-scale {pred_scale}: choose one of {', '.join(PRED_SCALES)}")
    reference, ref_source = read_input(ref, "reference MRI", ref_series, picture_spacing)
    prediction, pred_source = read_input(pred, "prediction", pred_series, picture_spacing)
    reference, prediction = check_image(reference, "reference MRI"), check_image(prediction, "prediction")
    notes, warnings, inputs = _about_sources({"prediction": pred_source, "reference MRI": ref_source},
                                            picture_spacing)
    looks_like_ct, evidence = ct_likeness(sitk.GetArrayViewFromImage(reference))
    if looks_like_ct:  # (synthesize says the same; a DICOM CT series as --ref is refused by its Modality)
        warnings.append(reference_is_ct_warning(evidence))
    ref255 = geometry.array_on_grid(normalise_mri(sitk.GetArrayFromImage(reference)), reference)
    pred_array = sitk.GetArrayFromImage(prediction).astype("float32")
    if pred_scale == "minmax":
        pred_array = minmax_255(pred_array, "prediction")
    warnings.extend(_off_scale(pred_array))
    pred255 = geometry.array_on_grid(pred_array, prediction)
    if not geometry.same_grid(pred255, ref255, tol=1e-4):
        covered = _head_covered(ref255, pred255)
        notes.append("the prediction is on another grid; resampled onto the reference grid"
                     + ("" if covered >= 0.999 else f" (it covers {covered:.0%} of the reference's head; the rest "
                                                    "counts as 0)"))
        pred255 = geometry.resample(pred255, ref255, None, default_value=0.0)
    metrics = to_jsonable(evaluate_images(ref255, pred255))
    if inputs:
        metrics["inputs"] = inputs
    if warnings:
        metrics["warnings"] = warnings
    return metrics, notes, warnings


def _about_sources(sources: dict, picture_spacing=None) -> Tuple[List[str], List[str], dict]:
    """What was read for each input (a DICOM series, a folder of pictures): the lines to print, the warnings
    (pictures' assumed spacing, numbers missing, a --picture-spacing not used) and the record for the JSON."""
    from .dicom import about_source, picture_spacing_unused

    notes, warnings, inputs = [], [], {}
    for what, source in sources.items():
        kind, provenance, source_warnings = about_source(source, what)
        if kind:
            notes.append(source.message(what))
            inputs[what.replace(" ", "_")] = provenance
        warnings.extend(source_warnings)
    warnings.extend(picture_spacing_unused(picture_spacing, list(sources.values())))
    return notes, warnings, inputs


def _off_scale(pred_array) -> List[str]:
    """A prediction that is not on the 0..255 scale the metrics assume (a CT in Hounsfield units given as --pred,
    a model's 0..1 output): scored as asked, with a warning saying what its values are."""
    low, high = float(pred_array.min()), float(pred_array.max())
    if low < -0.5 or high > 255.5:
        return [f"the prediction's values run from {low:.4g} to {high:.4g}, outside the 0..255 scale the metrics "
                "assume: give the synthetic MRI (0..255), or --pred-scale minmax for a prediction on another scale"]
    if 0 < high <= 1.0:  # a network's 0..1 output: scored on 0..255 it is nearly black (MAE ~ the MRI's mean)
        return [f"the prediction's values run from {low:.4g} to {high:.4g}, as a 0..1 image, where the metrics assume "
                "0..255: give the synthetic MRI (0..255), or --pred-scale minmax for a prediction on another scale"]
    return []


def _head_covered(ref255, pred255) -> float:
    """The share of the reference's foreground (where the metrics look) that lies inside the prediction's grid;
    below :data:`MIN_COVERAGE` the two are refused, since zeros would be scored in place of the missing part."""
    import SimpleITK as sitk

    from .registration import overlap_fraction

    import numpy as np

    from .metrics import foreground_mask

    head = sitk.GetImageFromArray(foreground_mask(sitk.GetArrayViewFromImage(ref255)).astype(np.uint8))
    head.CopyInformation(ref255)
    covered = overlap_fraction(head, pred255, sitk.Transform(3, sitk.sitkIdentity))
    if covered < MIN_COVERAGE:
        raise CTMRIError(
            f"the prediction covers only {covered:.0%} of the reference MRI's head in physical space (at least "
            f"{MIN_COVERAGE:.0%} is needed to score it): they are not one patient's images in one space, or a spacing "
            "is wrong (folders of pictures: give --picture-spacing). The synthetic MRI of 'ctmri synthesize --mri' "
            "lies on that MRI's own grid."
        )
    return covered


def summary_line(metrics: dict) -> str:
    """The one line ``ctmri evaluate`` prints (PSNR is None in the JSON when the images are identical)."""
    psnr = "inf (identical)" if metrics["psnr"] is None else f"{metrics['psnr']:.2f} dB"
    return (f"MAE {metrics['mae']:.2f}  SSIM {metrics['ssim']:.4f}  PSNR {psnr}  "
            f"MAE(whole) {metrics['mae_whole']:.2f}  SSIM(foreground) {metrics['ssim_foreground']:.4f}")


def write_json(target: Path, content: dict) -> None:
    """Write ``content`` to ``target`` whole or not at all (batch's atomic writer: a temporary file beside it,
    renamed into place); a failure is a CTMRIError saying what to do."""
    from .batch import write_json_atomic

    try:
        write_json_atomic(target, content)
    except OSError as exc:
        raise CTMRIError(f"cannot write --json {target}: {exc.strerror or exc}; choose another path") from exc
