"""Geometry: canonical axial orientation and the model's 256×256 in-plane grid, and back.

The model is 2D and sees axial slices as the training PNGs show them: rows run anterior→posterior and
columns patient right→left (LPS index order). Any input direction (flipped, permuted, oblique) is first
re-expressed in that order without resampling (``DICOMOrient``), then resampled in-plane onto a square
grid of ``size``×``size`` pixels that covers the whole field of view; slices are kept as they are.
Everything is done in physical space, so the result is put back on the reference grid exactly.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

CANONICAL = "LPS"  # index i → patient left, j → posterior, k → superior: axial slices along k


def canonical_axial(image: sitk.Image) -> sitk.Image:
    """The same voxels re-indexed so that k is the (closest) superior axis; no interpolation."""
    return sitk.DICOMOrient(image, CANONICAL)


def model_grid(reference: sitk.Image, size: int) -> sitk.Image:
    """An empty float32 image: ``size``×``size`` in-plane, square pixels, covering ``reference``'s slices.

    The grid shares the canonical reference's direction and slice positions; in-plane it spans the
    larger of the two in-plane extents, centred on the reference. A reference that is already
    ``size``×``size`` with square pixels gives exactly its own grid (no interpolation at all).

    A reference acquired in coronal or sagittal slices has, once re-indexed, "axial slices" one in-plane
    pixel apart (a 512-pixel coronal CT: 512 axial slices 0.5 mm apart). Those are spread to about the grid's
    in-plane spacing, first and last slice kept (:func:`axial_steps`): finer would only repeat the network
    on rows that its own pixels cannot tell apart, at twice the time or more.
    """
    ref = canonical_axial(reference)
    nx, ny, nz = ref.GetSize()
    sx, sy, sz = ref.GetSpacing()
    fov = max(nx * sx, ny * sy)
    spacing = fov / size
    if not _acquired_axial(reference):
        nz, sz = axial_steps(nz, sz, spacing)
    direction = np.array(ref.GetDirection()).reshape(3, 3)
    # Centre of the reference's in-plane extent (voxel corners), in index units of the reference.
    centre_index = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0, 0.0])
    centre = np.array(ref.GetOrigin()) + direction @ (centre_index * np.array([sx, sy, sz]))
    offset = np.array([(size - 1) / 2.0 * spacing, (size - 1) / 2.0 * spacing, 0.0])
    origin = centre - direction @ offset
    grid = sitk.Image([size, size, nz], sitk.sitkFloat32)
    grid.SetSpacing((spacing, spacing, sz))
    grid.SetDirection(ref.GetDirection())
    if nx == ny == size and np.isclose(sx, sy):
        grid.SetOrigin(ref.GetOrigin())  # exactly the reference's own grid
        grid.SetSpacing((sx, sy, sz))
    else:
        grid.SetOrigin(tuple(float(v) for v in origin))
    return grid


def _acquired_axial(image: sitk.Image) -> bool:
    """Is the image's own slice axis (its third index) the one closest to superior-inferior?"""
    direction = np.abs(np.array(image.GetDirection()).reshape(3, 3))
    return int(np.argmax(direction[2])) == 2  # row 2: each index axis's component along z (superior)


def axial_steps(nz: int, sz: float, step: float) -> tuple[int, float]:
    """(number, spacing) of slices over the span of ``nz`` slices ``sz`` apart (the same first and last), the
    fewest that are at most ``step`` apart; unchanged when the slices are at least ``step`` apart already."""
    if nz <= 1 or sz >= step * (1 - 1e-6):
        return nz, sz
    n = int(np.ceil((nz - 1) * sz / step - 1e-6)) + 1
    return n, (nz - 1) * sz / (n - 1)


def resample(
    image: sitk.Image,
    grid: sitk.Image,
    transform: sitk.Transform | None = None,
    interpolator: int = sitk.sitkLinear,
    default_value: float | None = None,
) -> sitk.Image:
    """``image`` resampled (float32) onto ``grid``'s voxels; outside it takes ``default_value``.

    ``transform`` maps grid points to ``image`` points (ITK convention). The default fill is the image's
    minimum, so that padding looks like background (air in CT, 0 in MRI).
    """
    if default_value is None:
        default_value = float(sitk.GetArrayViewFromImage(image).min())
    if same_grid(image, grid) and transform is None:
        if image.GetPixelID() == sitk.sitkFloat32:
            return sitk.Image(image)  # shares the buffer until either is written (SimpleITK copy-on-write)
        return sitk.Cast(image, sitk.sitkFloat32)
    return sitk.Resample(
        sitk.Cast(image, sitk.sitkFloat32),
        grid,
        transform if transform is not None else sitk.Transform(),
        interpolator,
        float(default_value),
        sitk.sitkFloat32,
    )


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-6) -> bool:
    """True if both images have the same size, spacing, origin and direction."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def array_on_grid(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """A (z, y, x) array as an image with ``grid``'s geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.CopyInformation(grid)
    return image
