#!/usr/bin/env python
"""Build the sample case of ``ctmri demo`` (``ct.nrrd`` + ``mri.nrrd``) from the Visible Human files.

Input: ``visible_human_head_ct_mr/vm_head_ct.mha`` and ``vm_head_mri.mha`` in the shared data folder
(``$CTMRI_DATA``, else ``<repo>/../shared/data``; or ``--data``). Both are the NLM Visible Male head:
the CT is an 8-slice slab (512×512, 0.488 mm, 1 mm apart) at the skull vertex, stored as HU + 1024;
the MR is T1-like, 256×256×33 at 1.016×1.016×5 mm. They lie in unrelated physical coordinates.

What it does (deterministic, rerunnable; see SOURCE.md beside this file):

1. Head masks (largest connected component per slice, holes filled): CT > 900 (≈ -124 HU),
   MR > 100 (its background is 0..15, scalp 300..600).
2. Height (z): the CT slab's per-slice head cross-section areas are looked up in the MR's
   per-slice area profile near the vertex (linear between slice centres); z-offset = median.
   Intensity-based registration is NOT used for z: with 5-mm MR slices a linear interpolation
   between slice centres models the slab poorly, and Mattes MI put the CT 4 mm higher than the
   areas (and the vertex-scalp test below) allow.
3. In-plane (x, y): start from the head-mask centroids, then SimpleITK Mattes mutual information,
   translation in x and y only (z held), CT = fixed image restricted to its dilated head mask,
   MR = moving. Rotations are left out: an 8-mm slab against 5-mm slices does not determine them
   (free rigid runs gave 3–5° tilts that changed with the sampling seed and scored worse MI).
4. ``ct.nrrd``: the CT slab, 2×2 block-averaged to 256×256 at 0.977 mm, int16, values kept as
   stored (HU + 1024), geometry as in the source.
   ``mri.nrrd``: the MR resampled onto the same grid through the found translation: linear
   in-plane, and along z each CT slice takes the 5-mm MR slice (slab) that contains it (the MR
   value of a thick slice is an average over that slab; blending neighbouring slices is not).
   Outside the MR's head (> 40, largest component, holes filled, grown by 2 voxels) the
   background noise is set to 0, as in the training MRIs, so that the metrics' foreground
   (MRI > 0) is the head. int16, compressed.

Usage: python make_sample.py [--data DIR] [--out DIR] [--check-png FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
CT_NAME, MR_NAME = "vm_head_ct.mha", "vm_head_mri.mha"
CT_HEAD_THRESHOLD = 900.0  # stored value (HU + 1024): about -124 HU, soft tissue and bone
MR_HEAD_THRESHOLD = 100.0
MR_BACKGROUND_THRESHOLD = 40.0  # above the MR's background noise (p99 of a corner ≈ 14)
SEED = 20240611


def data_dir(arg: str | None) -> Path:
    root = Path(arg) if arg else Path(os.environ.get("CTMRI_DATA", REPO.parent / "shared" / "data"))
    folder = root / "visible_human_head_ct_mr"
    if not (folder / CT_NAME).exists() or not (folder / MR_NAME).exists():
        sys.exit(f"error: {folder} does not hold {CT_NAME} and {MR_NAME}; set CTMRI_DATA or pass --data")
    return folder


def head_mask_2d(slice_: np.ndarray, threshold: float) -> np.ndarray:
    """Largest connected component above ``threshold``, holes filled."""
    mask = slice_ > threshold
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)


def head_masks(array: np.ndarray, threshold: float) -> np.ndarray:
    return np.stack([head_mask_2d(s, threshold) for s in array])


def z_offset_from_areas(ct: sitk.Image, ct_mask: np.ndarray, mr: sitk.Image, mr_mask: np.ndarray) -> tuple[float, list]:
    """z_mr - z_ct for the slab, matching head cross-section areas (mm²) near the vertex."""
    ct_area = ct_mask.sum(axis=(1, 2)) * ct.GetSpacing()[0] * ct.GetSpacing()[1]
    mr_area = mr_mask.sum(axis=(1, 2)) * mr.GetSpacing()[0] * mr.GetSpacing()[1]
    mr_z = mr.GetOrigin()[2] + mr.GetSpacing()[2] * np.arange(mr.GetSize()[2])
    ct_z = ct.GetOrigin()[2] + ct.GetSpacing()[2] * np.arange(ct.GetSize()[2])
    # The vertex part of the MR: from the slice of largest area upwards the area only decreases.
    top = int(np.argmax(mr_area))
    z_top, a_top = mr_z[top:], mr_area[top:]
    if np.any(np.diff(a_top) >= 0):
        keep = np.concatenate([[True], np.minimum.accumulate(np.diff(a_top)) < 0])
        z_top, a_top = z_top[keep], a_top[keep]
    # np.interp needs increasing x: areas decrease with z, so interpolate on reversed arrays.
    z_at = np.interp(ct_area, a_top[::-1], z_top[::-1])
    offsets = z_at - ct_z
    return float(np.median(offsets)), [round(float(v), 2) for v in offsets]


def inplane_translation(ct: sitk.Image, ct_mask: np.ndarray, mr: sitk.Image, mr_mask: np.ndarray, dz: float) -> tuple[np.ndarray, dict]:
    """(dx, dy, dz) with p_mr = p_ct + shift: centroid start, then Mattes MI over x and y only."""
    zz, yy, xx = np.nonzero(ct_mask)
    centre_ct = np.array(ct.TransformContinuousIndexToPhysicalPoint((xx.mean(), yy.mean(), zz.mean())))
    # MR head centroid at the slab's height (linear between the two nearest MR slices).
    k = (centre_ct[2] + dz - mr.GetOrigin()[2]) / mr.GetSpacing()[2]
    k0 = int(np.floor(k))
    centres = []
    for kk in (k0, k0 + 1):
        y, x = np.nonzero(mr_mask[kk])
        centres.append(np.array(mr.TransformContinuousIndexToPhysicalPoint((x.mean(), y.mean(), float(kk)))))
    centre_mr = (1 - (k - k0)) * centres[0] + (k - k0) * centres[1]
    start = np.array([centre_mr[0] - centre_ct[0], centre_mr[1] - centre_ct[1], dz])

    mask = ndimage.binary_dilation(ct_mask, structure=np.ones((1, 11, 11), bool))  # ≈ 2.5 mm margin
    mask_image = sitk.GetImageFromArray(mask.astype(np.uint8))
    mask_image.CopyInformation(ct)
    tx = sitk.TranslationTransform(3, tuple(float(v) for v in start))
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.2, SEED)
    method.SetMetricFixedMask(mask_image)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, 300, relaxationFactor=0.6)
    method.SetOptimizerScales([1.0, 1.0, 1.0])
    method.SetOptimizerWeights([1.0, 1.0, 0.0])  # z is held at the area-matched value
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(tx, inPlace=True)
    method.Execute(sitk.Cast(ct, sitk.sitkFloat32), sitk.Cast(mr, sitk.sitkFloat32))
    shift = np.array(tx.GetOffset())
    info = {
        "centroid_start_mm": [round(float(v), 2) for v in start],
        "mi_result_mm": [round(float(v), 2) for v in shift],
        "mi_value": round(float(method.GetMetricValue()), 4),
        "stop": method.GetOptimizerStopConditionDescription(),
    }
    return shift, info


def sample_ct(ct: sitk.Image) -> sitk.Image:
    """2×2 in-plane block mean → 256×256, int16, same slices; values as stored (HU + 1024)."""
    a = sitk.GetArrayFromImage(ct).astype(np.float64)
    nz, ny, nx = a.shape
    b = a.reshape(nz, ny // 2, 2, nx // 2, 2).mean(axis=(2, 4))
    out = sitk.GetImageFromArray(np.round(b).astype(np.int16))
    sx, sy, sz = ct.GetSpacing()
    out.SetSpacing((2 * sx, 2 * sy, sz))
    direction = np.array(ct.GetDirection()).reshape(3, 3)
    # The block's centre: half an original voxel from the first voxel centre along x and y.
    origin = np.array(ct.GetOrigin()) + direction @ np.array([0.5 * sx, 0.5 * sy, 0.0])
    out.SetOrigin(tuple(float(v) for v in origin))
    out.SetDirection(ct.GetDirection())
    return out


def sample_mr(mr: sitk.Image, grid: sitk.Image, shift: np.ndarray) -> sitk.Image:
    """MR on ``grid`` (CT frame): linear in-plane, the containing 5-mm slice along z; int16."""
    # Step 1: in-plane resampling at the MR's own slice heights (no blending across slices).
    mid = sitk.Image([grid.GetSize()[0], grid.GetSize()[1], mr.GetSize()[2]], sitk.sitkFloat32)
    mid.SetSpacing((grid.GetSpacing()[0], grid.GetSpacing()[1], mr.GetSpacing()[2]))
    mid.SetDirection(grid.GetDirection())
    mid.SetOrigin((grid.GetOrigin()[0], grid.GetOrigin()[1], mr.GetOrigin()[2] - shift[2]))
    in_plane = sitk.TranslationTransform(3, tuple(float(v) for v in shift))
    stack = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(mr, sitk.sitkFloat32), mid, in_plane, sitk.sitkLinear, 0.0))
    # Step 2: each CT slice takes the MR slice whose 5-mm slab contains it.
    grid_z = grid.GetOrigin()[2] + grid.GetSpacing()[2] * np.arange(grid.GetSize()[2])
    k = np.round((grid_z + shift[2] - mr.GetOrigin()[2]) / mr.GetSpacing()[2]).astype(int)
    if k.min() < 0 or k.max() >= mr.GetSize()[2]:
        raise SystemExit("error: the CT slab maps outside the MR's slices; the alignment failed")
    mr_grid = np.clip(stack[k], 0, None)
    # Background noise (values 1..20 around the head) set to 0, as in the training MRIs, so that the
    # metrics' foreground (MRI > 0) is the head: per slice, the head mask grown by 2 voxels.
    keep = np.stack([head_mask_2d(s, MR_BACKGROUND_THRESHOLD) for s in mr_grid])
    keep = ndimage.binary_dilation(keep, structure=np.ones((1, 5, 5), bool))
    out = sitk.GetImageFromArray(np.round(np.where(keep, mr_grid, 0.0)).astype(np.int16))
    out.CopyInformation(grid)
    return out, [int(v) for v in k]


def check_png(ct: sitk.Image, mr: sitk.Image, path: Path) -> None:
    """Rows: CT (soft-tissue window), MR, MR with the CT's head and bone outlines in colour."""
    from skimage import io
    from skimage.segmentation import find_boundaries

    c = sitk.GetArrayFromImage(ct).astype(np.float32)
    m = sitk.GetArrayFromImage(mr).astype(np.float32)
    head = head_masks(c, CT_HEAD_THRESHOLD)
    ys, xs = np.nonzero(head.any(axis=0))
    crop = (slice(max(ys.min() - 10, 0), ys.max() + 10), slice(max(xs.min() - 10, 0), xs.max() + 10))

    def grey(a, lo, hi):
        g = (np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)

    rows = [[], [], []]
    for z in range(c.shape[0]):
        rows[0].append(grey(c[z], 800, 1300)[crop])
        rows[1].append(grey(m[z], 0, 600)[crop])
        over = grey(m[z], 0, 600)
        over[find_boundaries(head[z])] = (255, 0, 0)  # CT head outline
        over[find_boundaries(c[z] > 1500)] = (0, 255, 0)  # CT bone outline (≈ 476 HU)
        rows[2].append(over[crop])
    image = np.vstack([np.hstack(r) for r in rows])
    io.imsave(str(path), np.kron(image, np.ones((2, 2, 1), np.uint8)), check_contrast=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="shared data folder (default: $CTMRI_DATA or <repo>/../shared/data)")
    parser.add_argument("--out", default=str(HERE), help="where to write ct.nrrd and mri.nrrd (default: here)")
    parser.add_argument("--check-png", help="also write an overlay PNG (CT outlines on the MR) for a visual check")
    args = parser.parse_args(argv)
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)  # deterministic and light on a shared machine

    folder = data_dir(args.data)
    ct = sitk.ReadImage(str(folder / CT_NAME))
    mr = sitk.ReadImage(str(folder / MR_NAME))
    ct_mask = head_masks(sitk.GetArrayFromImage(ct), CT_HEAD_THRESHOLD)
    mr_mask = head_masks(sitk.GetArrayFromImage(mr), MR_HEAD_THRESHOLD)

    dz, per_slice = z_offset_from_areas(ct, ct_mask, mr, mr_mask)
    shift, info = inplane_translation(ct, ct_mask, mr, mr_mask, dz)
    out_ct = sample_ct(ct)
    out_mr, mr_slices = sample_mr(mr, out_ct, shift)
    print(f"z offset from head areas (per CT slice): {per_slice} → median {dz:.2f} mm")
    print(f"in-plane: centroid start {info['centroid_start_mm']}, Mattes MI {info['mi_result_mm']} "
          f"(MI {info['mi_value']}; {info['stop'][:60]})")
    print(f"CT→MR translation (mm): {[round(float(v), 2) for v in shift]}; MR slices used per CT slice: {mr_slices}")

    for image, what in ((out_ct, "CT"), (out_mr, "MR")):
        image.SetMetaData("ctmri_sample", f"Visible Human Male head {what}; built by make_sample.py, see SOURCE.md")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(out_ct, str(out / "ct.nrrd"), True)
    sitk.WriteImage(out_mr, str(out / "mri.nrrd"), True)
    for name in ("ct.nrrd", "mri.nrrd"):
        print(f"wrote {out / name} ({(out / name).stat().st_size / 1024:.0f} KiB)")
    if args.check_png:
        check_png(out_ct, out_mr, Path(args.check_png))
        print(f"wrote {args.check_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
