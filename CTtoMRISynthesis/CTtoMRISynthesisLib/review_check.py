"""A finished run's outputs for checking the module's review where no synthesis can run (no PyTorch yet: Slicer's
extension build machines, a Slicer before its first Synthesize MRI).

The in-Slicer self-test writes it as a run would (``outputs.save_outputs``) and loads it as the panel loads a
finished run: the nodes, their colour tables and windows, the subject-hierarchy folder, the metrics table and the
review's own views and layout are then checked in the real application, which the tests outside Slicer
(``slicer-core``, no Qt, no layout manager) cannot do. It is **not a synthesis**: its "synthetic MRI" is the reference
MRI smoothed, so that the difference and uncertainty maps have something to show, and it says so in its warnings
and its ``weights`` entry. NumPy and SimpleITK only (scikit-image, when installed, for the metrics table).
"""

from __future__ import annotations

import SimpleITK as sitk

from . import geometry
from .intensity import normalise_mri
from .pipeline import SynthesisResult, evaluate_images

#: what the stand-in says it is, wherever a result names its model
NOT_A_SYNTHESIS = "stand-in for a synthesis (the reference MRI smoothed), made to check the review, not a synthesis"
#: the smoothing of the reference MRI that plays the synthetic MRI (mm)
SMOOTHING_MM = 2.0


def stand_in_result(mri: sitk.Image) -> SynthesisResult:
    """A result on ``mri``'s grid as a run with that MRI gives one: "synthetic MRI" (the MRI, 0..255, smoothed),
    difference, uncertainty (|difference|), an identity registration and, where scikit-image is installed, the
    metrics (without it, none: the review then has no table, as a run without an MRI)."""
    mri255 = geometry.array_on_grid(normalise_mri(sitk.GetArrayFromImage(mri)), mri)
    synthetic = sitk.Cast(sitk.SmoothingRecursiveGaussian(mri255, SMOOTHING_MM), sitk.sitkFloat32)
    difference = sitk.Subtract(mri255, synthetic)
    try:
        metrics = evaluate_images(mri255, synthetic)
    except ImportError:  # scikit-image (the SSIM) is installed with PyTorch, on the first run
        metrics = None
    transform = sitk.Euler3DTransform()
    return SynthesisResult(
        synthetic_mri=synthetic, difference=difference, uncertainty=sitk.Abs(difference), transform=transform,
        metrics=metrics, registration={"mode": "none", "stand_in": True}, device="none",
        weights={"file": None, "name": NOT_A_SYNTHESIS}, warnings=[NOT_A_SYNTHESIS],
    )
