"""Geometry: any direction matrix gives the same result in physical space as the canonical one.

On a RIRE-like synthetic MR head (``phantom_mr``: 256×256×26 at 1.25×1.25×4 mm); nothing here depends on
real anatomy, so no licensed data is needed.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from CTtoMRISynthesisLib import geometry


def reexpress(image: sitk.Image, kind: str) -> sitk.Image:
    """The same physical object with another voxel order / direction, without resampling voxels."""
    if kind == "flipped":
        return sitk.Flip(image, [True, False, True])
    if kind == "permuted":
        return sitk.PermuteAxes(image, [1, 2, 0])
    if kind == "oblique":
        # Rotate the grid 20° about an oblique axis; voxels resampled onto it (the only case that interpolates).
        rotation = sitk.VersorTransform((0.3, 0.2, 0.93), np.deg2rad(20))
        centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])
        rotation.SetCenter(centre)
        matrix = np.array(rotation.GetMatrix()).reshape(3, 3) @ np.array(image.GetDirection()).reshape(3, 3)
        grid = sitk.Image(image.GetSize(), sitk.sitkFloat32)
        grid.SetSpacing(image.GetSpacing())
        grid.SetDirection(tuple(matrix.ravel()))
        grid.SetOrigin(tuple(np.array(centre) - matrix @ (np.array([(s - 1) / 2 for s in image.GetSize()]) * image.GetSpacing())))
        return sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    raise ValueError(kind)


def values_at_points(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    """Voxel values of ``image`` at physical points that lie on its voxel centres."""
    array = sitk.GetArrayViewFromImage(image)
    out = []
    for p in points:
        i, j, k = image.TransformPhysicalPointToIndex(tuple(float(v) for v in p))
        out.append(float(array[k, j, i]))
    return np.array(out)


@pytest.fixture(scope="module")
def head(phantom_mr: sitk.Image) -> sitk.Image:
    return sitk.Cast(phantom_mr, sitk.sitkFloat32)


def test_canonical_keeps_physical_space(head: sitk.Image) -> None:
    for kind in ("flipped", "permuted"):
        other = reexpress(head, kind)
        canonical = geometry.canonical_axial(other)
        assert geometry.same_grid(canonical, geometry.canonical_axial(head), tol=1e-4)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(canonical), sitk.GetArrayFromImage(head))


def test_model_grid_of_a_256_square_image_is_its_own_grid(head: sitk.Image) -> None:
    grid = geometry.model_grid(head, 256)
    assert geometry.same_grid(grid, head)


def test_model_grid_covers_field_of_view(head: sitk.Image) -> None:
    small = sitk.Resample(head, [200, 160, head.GetDepth()], sitk.Transform(), sitk.sitkLinear, head.GetOrigin(),
                          (1.6, 2.0, 4.0), head.GetDirection())
    grid = geometry.model_grid(small, 256)
    assert grid.GetSize() == (256, 256, small.GetDepth())
    assert np.isclose(grid.GetSpacing()[0], max(200 * 1.6, 160 * 2.0) / 256)
    # Centres coincide.
    centre = lambda im: np.array(im.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in im.GetSize()]))
    np.testing.assert_allclose(centre(grid)[:2], centre(small)[:2], atol=1e-6)


@pytest.mark.parametrize("kind", ["flipped", "permuted", "oblique"])
def test_round_trip_through_model_grid_in_physical_space(head: sitk.Image, kind: str) -> None:
    """Image → model grid → back to its own grid: same values at the same physical points."""
    image = reexpress(head, kind)
    grid = geometry.model_grid(image, 256)
    on_grid = geometry.resample(image, grid)
    back = geometry.resample(on_grid, image, default_value=0.0)
    a = sitk.GetArrayFromImage(image)
    b = sitk.GetArrayFromImage(back)
    inside = a > 50
    # Two linear interpolations at most; values agree closely inside the head.
    assert np.median(np.abs(a[inside] - b[inside])) < 1e-3
    # And physically: sample both orientations at the same random head points.
    rng = np.random.default_rng(0)
    k, j, i = np.nonzero(sitk.GetArrayFromImage(head) > 200)
    pick = rng.choice(len(k), 50, replace=False)
    points = np.array([head.TransformIndexToPhysicalPoint((int(i[p]), int(j[p]), int(k[p]))) for p in pick])
    if kind != "oblique":
        np.testing.assert_allclose(values_at_points(back, points), values_at_points(head, points), atol=1e-3)


def coronal(image: sitk.Image, rows_mm: float = 0.5, slices: int = 10) -> sitk.Image:
    """``image`` resampled onto coronal slices 20 mm apart, ``rows_mm`` apart from top to bottom in-plane."""
    import phantoms

    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])
    grid = phantoms.grid((256, int(round(100 / rows_mm)), slices), (1.0, rows_mm, 20.0), centre,
                         direction=(1, 0, 0, 0, 0, 1, 0, -1, 0))  # i: left, j: inferior, k: posterior
    return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def test_model_grid_of_a_coronal_image_spreads_its_axial_rows_to_the_pixel_spacing(head: sitk.Image) -> None:
    """A coronal CT's rows, 0.5 mm apart, are not run through the axial model one by one: the grid's slices lie
    at its in-plane spacing (1 mm here), over the same top and bottom, and the round trip keeps the values."""
    image = coronal(head)
    grid = geometry.model_grid(image, 256)
    canonical = geometry.canonical_axial(image)
    assert canonical.GetSpacing()[2] == pytest.approx(0.5) and canonical.GetSize()[2] == 200
    assert grid.GetSize() == (256, 256, 101)  # 99.5 mm in steps of at most 1 mm
    assert grid.GetSpacing()[2] == pytest.approx(199 * 0.5 / 100) and grid.GetSpacing()[2] <= grid.GetSpacing()[0]
    for k in (0, canonical.GetSize()[2] - 1):  # first and last rows kept
        g = grid.TransformIndexToPhysicalPoint((0, 0, 0 if k == 0 else grid.GetSize()[2] - 1))
        c = canonical.TransformIndexToPhysicalPoint((0, 0, k))
        assert g[2] == pytest.approx(c[2], abs=1e-6)
    back = geometry.resample(geometry.resample(image, grid), image, default_value=0.0)
    a, b = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(back)
    inside = a > 50
    assert np.median(np.abs(a[inside] - b[inside])) < 0.02 * np.median(a[inside])


def test_model_grid_keeps_the_slices_of_an_axial_image_however_thin(head: sitk.Image) -> None:
    """Thin axial slices are the scanner's own: each is kept (only re-indexed coronal/sagittal rows are spread)."""
    thin = sitk.Resample(head, [256, 256, 60], sitk.Transform(), sitk.sitkLinear, head.GetOrigin(),
                         (1.25, 1.25, 0.5), head.GetDirection())
    grid = geometry.model_grid(thin, 256)
    assert grid.GetSize()[2] == 60 and grid.GetSpacing()[2] == pytest.approx(0.5)
    assert geometry.model_grid(coronal(head, rows_mm=2.0), 256).GetSize()[2] == 50  # rows coarser than 1 mm: kept


def test_axial_steps() -> None:
    assert geometry.axial_steps(11, 0.5, 1.0) == (6, pytest.approx(1.0))
    assert geometry.axial_steps(10, 0.5, 1.0) == (6, pytest.approx(0.9))
    assert geometry.axial_steps(10, 2.0, 1.0) == (10, 2.0)
    assert geometry.axial_steps(1, 0.5, 1.0) == (1, 0.5)
