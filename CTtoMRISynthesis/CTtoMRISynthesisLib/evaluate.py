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
    MRI) and its folder must exist.
    """
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
    return target


def evaluate_files(pred: str, ref: str, pred_scale: str = "as-is",
                   picture_spacing: Optional[Sequence[float]] = None) -> Tuple[dict, List[str]]:
    """The metrics of the prediction ``pred`` against the reference MRI ``ref`` (JSON-ready), and notes for the user."""
    import SimpleITK as sitk

    from . import geometry
    from .dicom import read_input
    from .intensity import minmax_255, normalise_mri
    from .metrics import to_jsonable
    from .pipeline import check_image, evaluate_images

    if pred_scale not in PRED_SCALES:
        raise CTMRIError(f"--pred-scale {pred_scale}: choose one of {', '.join(PRED_SCALES)}")
    reference = check_image(read_input(ref, "reference MRI", picture_spacing=picture_spacing)[0], "reference MRI")
    prediction = check_image(read_input(pred, "prediction", picture_spacing=picture_spacing)[0], "prediction")
    ref255 = geometry.array_on_grid(normalise_mri(sitk.GetArrayFromImage(reference)), reference)
    pred_array = sitk.GetArrayFromImage(prediction).astype("float32")
    if pred_scale == "minmax":
        pred_array = minmax_255(pred_array, "prediction")
    pred255 = geometry.array_on_grid(pred_array, prediction)
    notes = []
    if not geometry.same_grid(pred255, ref255, tol=1e-4):
        notes.append("the prediction is on another grid; resampled onto the reference grid")
        pred255 = geometry.resample(pred255, ref255, None, default_value=0.0)
    return to_jsonable(evaluate_images(ref255, pred255)), notes


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
