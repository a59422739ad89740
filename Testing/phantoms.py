"""Synthetic head phantoms, so that the tests run on a fresh clone without the licensed data.

A phantom is defined analytically in millimetres (nested ellipsoids: scalp, skull, a CSF rim, grey and
white matter; two unequal ventricles, two eyes, a frontal sinus; optionally a head holder below and behind
the head), and is *evaluated* on any grid: points of each voxel are mapped into the head's frame and
labelled there. So a CT and an MRI of the same head can lie on different grids (spacing, size, direction)
with a known rigid motion between them, and the truth of a registration is known exactly — no resampling
of one image into another.

Intensities: the CT in Hounsfield units (air −1000, skull 1000, brain ≈ 30, CSF ≈ 5), the "MRI" T2-like
(CSF bright, grey matter brighter than white, skull dark, background exactly 0); each voxel the mean over
its volume (partial volume: thick slices do not alias thin structures), blurred slightly, with a little
seeded noise, so that they are deterministic but not piecewise constant.

Plain functions; the fixtures that use them are in ``conftest.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

AIR, SCALP, SKULL, CSF_RIM, GREY, WHITE, VENTRICLE, HOLDER, EYE, SINUS = range(10)

#: CT values (HU) of each label: skull ≈ cortical bone, brain ≈ 30, CSF ≈ 5, a plastic head holder.
CT_HU = {AIR: -1000.0, SCALP: 40.0, SKULL: 1000.0, CSF_RIM: 8.0, GREY: 38.0, WHITE: 25.0, VENTRICLE: 5.0,
         HOLDER: 200.0, EYE: 12.0, SINUS: -1000.0}
#: T2-like MRI values: CSF bright, grey > white, skull dark, air (and the holder, which gives no signal) 0.
T2 = {AIR: 0.0, SCALP: 100.0, SKULL: 15.0, CSF_RIM: 220.0, GREY: 130.0, WHITE: 85.0, VENTRICLE: 235.0,
      HOLDER: 0.0, EYE: 240.0, SINUS: 0.0}
#: T1-like MRI values: CSF dark, white > grey, scalp fat bright (a reference the synthetic T2 must not be taken for).
T1 = {AIR: 0.0, SCALP: 200.0, SKULL: 15.0, CSF_RIM: 35.0, GREY: 110.0, WHITE: 150.0, VENTRICLE: 30.0,
      HOLDER: 0.0, EYE: 40.0, SINUS: 0.0}

#: The CT window of the test models (level, width in HU), the one the shipped model uses too.
WINDOW = (45.0, 140.0)


@dataclass(frozen=True)
class Head:
    """An ellipsoidal head in its own frame (mm, LPS axes: x to the left, y posterior, z superior).

    Besides the nested shells it has features that fix its position along every axis, as a real head's
    anatomy does (a bare ellipsoid cut by the slab of an MRI barely changes when shifted along z): two
    eyes in front and low (bright in T2), an air-filled frontal sinus in the bone above them, and two
    unequal ventricles.
    """

    semi_axes: tuple = (72.0, 92.0, 88.0)  # outer surface of the scalp
    scalp_mm: float = 5.0
    skull_mm: float = 7.0
    csf_rim_mm: float = 2.0
    white_inset_mm: float = 10.0  # grey matter thickness
    # (centre, semi-axes) of the ventricles: the left one larger and both anterior of the centre, so that
    # no rotation or mirror of the head maps it onto itself (a registration has one right answer).
    ventricles: tuple = (((-11.0, -8.0, 14.0), (6.5, 22.0, 11.0)), ((10.0, -5.0, 12.0), (4.5, 16.0, 8.0)))
    eyes: tuple = (((-31.0, -70.0, -34.0), 12.0), ((31.0, -70.0, -34.0), 12.0))  # (centre, radius)
    sinus: tuple = ((0.0, -82.0, -8.0), (14.0, 4.0, 8.0))  # (centre, semi-axes)
    holder: bool = False  # a curved plastic shell below/behind the head, separate from it (CT only)

    @classmethod
    def patient(cls, seed: int, holder: bool = False) -> "Head":
        """Another patient: head size and shape and ventricle size drawn from ``seed``."""
        rng = np.random.default_rng(seed)
        scale = rng.uniform(0.9, 1.05, 3)
        grow = rng.uniform(0.75, 1.35)
        ventricles = tuple(
            (tuple(np.multiply(c, scale)), tuple(np.multiply(a, grow))) for c, a in cls.ventricles
        )
        eyes = tuple((tuple(np.multiply(c, scale)), r) for c, r in cls.eyes)
        sinus = (tuple(np.multiply(cls.sinus[0], scale)), cls.sinus[1])
        return cls(semi_axes=tuple(np.multiply(cls.semi_axes, scale)), ventricles=ventricles, eyes=eyes,
                   sinus=sinus, holder=holder)


def _inside(points: np.ndarray, semi_axes: Sequence[float], centre: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    q = (points - np.asarray(centre)) / np.asarray(semi_axes)
    return np.einsum("...i,...i->...", q, q) <= 1.0


def labels_at(points: np.ndarray, head: Head = Head()) -> np.ndarray:
    """Label of each point (…, 3) given in the head's frame (mm)."""
    axes = np.asarray(head.semi_axes, dtype=float)
    labels = np.full(points.shape[:-1], AIR, dtype=np.uint8)
    if head.holder:
        # A cylindrical shell about the head's z axis, 12..16 mm outside the head, behind it only.
        radius = np.hypot(points[..., 0] / axes[0] * axes[1], points[..., 1])
        shell = (radius > axes[1] + 12) & (radius < axes[1] + 16) & (points[..., 1] > 0.35 * axes[1])
        labels[shell & (np.abs(points[..., 2]) < 0.9 * axes[2])] = HOLDER
    depth = 0.0
    for label, thickness in ((SCALP, 0.0), (SKULL, head.scalp_mm), (CSF_RIM, head.skull_mm),
                             (GREY, head.csf_rim_mm), (WHITE, head.white_inset_mm)):
        depth += thickness
        labels[_inside(points, axes - depth)] = label
    for centre, semi in head.ventricles:
        labels[_inside(points, semi, centre)] = VENTRICLE
    labels[_inside(points, head.sinus[1], head.sinus[0])] = SINUS
    for centre, radius in head.eyes:
        labels[_inside(points, (radius,) * 3, centre)] = EYE
    return labels


# --------------------------------------------------------------------------------------------- grids


def grid(size: Sequence[int], spacing: Sequence[float], centre: Sequence[float] = (0.0, 0.0, 0.0),
         direction: Optional[Sequence[float]] = None) -> sitk.Image:
    """An empty float32 image whose voxel grid is centred on ``centre`` (mm)."""
    image = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    image.SetSpacing([float(s) for s in spacing])
    if direction is not None:
        image.SetDirection([float(d) for d in direction])
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    half = (np.asarray(size, dtype=float) - 1) / 2 * np.asarray(spacing, dtype=float)
    image.SetOrigin(tuple(np.asarray(centre, dtype=float) - d @ half))
    return image


def rigid(angles_deg: Sequence[float] = (0.0, 0.0, 0.0), shift_mm: Sequence[float] = (0.0, 0.0, 0.0),
          centre: Sequence[float] = (0.0, 0.0, 0.0)) -> sitk.Euler3DTransform:
    """A rigid motion: rotations about x, y, z (degrees) about ``centre``, then a shift (mm)."""
    motion = sitk.Euler3DTransform()
    motion.SetCenter([float(c) for c in centre])
    motion.SetRotation(*(float(np.deg2rad(a)) for a in angles_deg))
    motion.SetTranslation([float(s) for s in shift_mm])
    return motion


def axis_angle_motion(centre: Sequence[float], axis: Sequence[float], degrees: float,
                      shift: Sequence[float]) -> sitk.VersorRigid3DTransform:
    """A rigid motion: ``degrees`` about ``axis`` through ``centre``, then ``shift`` (mm)."""
    motion = sitk.VersorRigid3DTransform()
    motion.SetCenter(tuple(centre))
    axis = np.asarray(axis, dtype=float)
    motion.SetRotation(tuple(axis / np.linalg.norm(axis)), math.radians(degrees))
    motion.SetTranslation(tuple(float(s) for s in shift))
    return motion


def displaced(image: sitk.Image, motion: sitk.Transform, pad: Sequence[int]) -> sitk.Image:
    """``image``'s content moved by ``motion`` (so ``motion(p)`` is where p's content went), on a grid padded by
    ``pad`` voxels on each side so that it stays inside, as a CT usually covers more than the MRI. Float32."""
    grid = sitk.ConstantPad(image, pad, pad, 0)
    return sitk.Resample(image, grid, motion.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def image_centre(image: sitk.Image) -> tuple:
    """The physical point at the centre of ``image``'s voxel grid."""
    return image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])


def _slice_points(image: sitk.Image, k: float, offset: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
    """Physical points (y, x, 3) at continuous index (i + offset[0], j + offset[1], k) of slice ``k``."""
    nx, ny = image.GetSize()[:2]
    d = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    j, i = np.mgrid[0:ny, 0:nx].astype(float)
    ijk = np.stack([i + offset[0], j + offset[1], np.full_like(i, k)], axis=-1)
    return np.asarray(image.GetOrigin()) + ijk @ d.T


def _head_points(points: np.ndarray, back: Optional[sitk.Transform]) -> np.ndarray:
    return points if back is None else _transform_points(back, points)


def labels_on(reference: sitk.Image, head: Head = Head(), motion: Optional[sitk.Transform] = None) -> np.ndarray:
    """Labels (z, y, x) of ``head`` at the voxel centres of ``reference``'s grid, the head moved by ``motion``.

    ``motion`` maps a point of the head (as an unmoved image shows it) to where it is now, the way
    ``registration.register(fixed, moving)`` reports its result: an image made with ``motion`` registered
    to one made without should give ``motion`` back.
    """
    back = motion.GetInverse() if motion is not None else None
    out = np.empty(reference.GetSize()[::-1], dtype=np.uint8)
    for k in range(reference.GetDepth()):
        out[k] = labels_at(_head_points(_slice_points(reference, k), back), head)
    return out


def values_on(reference: sitk.Image, values: dict, head: Head = Head(), motion: Optional[sitk.Transform] = None,
              step_mm: float = 1.5) -> np.ndarray:
    """Label ``values`` averaged over each voxel of ``reference`` (z, y, x float32): partial volume.

    Each voxel is sampled on a sub-grid no coarser than ``step_mm``, so a thick slice shows the mean of what
    it covers, as a scanner's does, instead of aliasing thin structures (a 7-mm skull in 4-mm slices).
    """
    lookup = np.zeros(max(values) + 1, dtype=np.float32)
    for label, value in values.items():
        lookup[label] = value
    counts = [max(1, int(np.ceil(s / step_mm))) for s in reference.GetSpacing()]
    offsets = [(np.arange(n) + 0.5) / n - 0.5 for n in counts]
    back = motion.GetInverse() if motion is not None else None
    out = np.zeros(reference.GetSize()[::-1], dtype=np.float32)
    for k in range(reference.GetDepth()):
        for dk in offsets[2]:
            for dj in offsets[1]:
                for di in offsets[0]:
                    points = _head_points(_slice_points(reference, k + dk, (di, dj)), back)
                    out[k] += lookup[labels_at(points, head)]
    return out / float(np.prod(counts))


def _transform_points(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    """``transform`` applied to an (…, 3) array: vectorised for matrix transforms, point by point otherwise."""
    if hasattr(transform, "GetMatrix"):
        matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
        return points @ matrix.T + np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    flat = points.reshape(-1, 3)
    return np.array([transform.TransformPoint(tuple(p)) for p in flat]).reshape(points.shape)


# ----------------------------------------------------------------------------------------- intensities


def _blurred_noisy(array: np.ndarray, spacing: Sequence[float], blur_mm: float, noise: float, seed: int) -> np.ndarray:
    """``array`` blurred by a Gaussian of ``blur_mm`` (the scanner's resolution) plus seeded Gaussian noise."""
    from scipy import ndimage

    if blur_mm > 0:
        array = ndimage.gaussian_filter(array, sigma=[blur_mm / s for s in spacing[::-1]], mode="nearest")
    if noise > 0:
        array = array + np.random.default_rng(seed).normal(0.0, noise, array.shape).astype(np.float32)
    return array.astype(np.float32)


def _image_like(array: np.ndarray, reference: sitk.Image, pixel: int) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(reference)
    return sitk.Cast(out, pixel) if out.GetPixelID() != pixel else out


def ct_hu(reference: sitk.Image, head: Head = Head(), motion: Optional[sitk.Transform] = None,
          noise_hu: float = 6.0, blur_mm: float = 0.5, seed: int = 0) -> sitk.Image:
    """A head CT in Hounsfield units (int16, −1024..) on ``reference``'s grid."""
    hu = _blurred_noisy(values_on(reference, CT_HU, head, motion), reference.GetSpacing(), blur_mm, noise_hu, seed)
    return _image_like(np.clip(np.round(hu), -1024, 3071).astype(np.int16), reference, sitk.sitkInt16)


def mri_t2(reference: sitk.Image, head: Head = Head(), motion: Optional[sitk.Transform] = None,
           noise: float = 3.0, blur_mm: float = 0.5, seed: int = 1, pixel: int = sitk.sitkFloat32,
           weighting: Optional[dict] = None) -> sitk.Image:
    """A T2-like MRI on ``reference``'s grid: background exactly 0, the head ≥ 1 (so "MRI > 0" is the head);
    ``weighting=T1`` for a T1-like one."""
    clean = values_on(reference, weighting or T2, head, motion)
    values = _blurred_noisy(clean, reference.GetSpacing(), blur_mm, noise, seed)
    values = np.where(clean > 0, np.clip(values, 1.0, 255.0), 0.0).astype(np.float32)  # air and holder: no signal
    if pixel != sitk.sitkFloat32:
        values = np.round(values)
    return _image_like(values, reference, pixel)


def windowed_8bit(ct: sitk.Image, level: float = WINDOW[0], width: float = WINDOW[1]) -> sitk.Image:
    """A HU CT display-windowed to uint8 (bone saturated at 255, air at 0), as the Harvard CTs are."""
    hu = sitk.GetArrayFromImage(ct).astype(np.float64)
    low = level - width / 2.0
    out = np.round(np.clip((hu - low) / width, 0.0, 1.0) * 255.0).astype(np.uint8)
    return _image_like(out, ct, sitk.sitkUInt8)


def stored_plus_1024(ct: sitk.Image) -> sitk.Image:
    """A HU CT stored without its rescale intercept (air ≈ 24, water 1024), as the Visible Human CT is."""
    stored = sitk.GetArrayFromImage(ct).astype(np.int32) + 1024
    return _image_like(np.clip(stored, 0, 32767).astype(np.int16), ct, sitk.sitkInt16)


# ------------------------------------------------------------------------------------- ready-made cases


def slice_grid(slices: int, size: int = 256, spacing: float = 0.9, slice_mm: float = 5.0,
               first_z: float = -20.0) -> sitk.Image:
    """Axial slices of a head from ``first_z`` up (mm), ``size``² at ``spacing`` mm, in the head's frame."""
    centre_z = first_z + (slices - 1) * slice_mm / 2
    return grid((size, size, slices), (spacing, spacing, slice_mm), (0.0, 0.0, centre_z))


def slice_pair(seed: int = 0, slices: int = 12, first_z: float = -20.0, window: Sequence[float] = WINDOW,
               head: Optional[Head] = None) -> tuple[np.ndarray, np.ndarray]:
    """A co-registered (CT, MRI) pair of uint8 (z, 256, 256) stacks, like a Harvard AANLIB case.

    The CT is windowed to 8 bits (brain near 100, bone 255), the MRI is T2-like 0..255 (its maximum 255)
    with background 0.
    ``seed`` is the patient (head shape and noise); ``window`` = (level, width) in HU.
    """
    head = head or Head.patient(seed)
    reference = slice_grid(slices, first_z=first_z)
    ct = windowed_8bit(ct_hu(reference, head, seed=seed), *window)
    mri = sitk.GetArrayFromImage(mri_t2(reference, head, seed=seed + 1000))
    # Stretched to the whole 0..255, as the Harvard MRIs are (the head stays >= 1, the background 0).
    mri8 = np.round(mri * (255.0 / float(mri.max()))).astype(np.uint8)
    return sitk.GetArrayFromImage(ct), mri8


def volume(array: np.ndarray, spacing: Sequence[float] = (0.9, 0.9, 5.0), origin: Sequence[float] = (0.0, 0.0, 0.0),
           direction: Optional[Sequence[float]] = None) -> sitk.Image:
    """A (z, y, x) array as an image with the given geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    if direction is not None:
        image.SetDirection([float(d) for d in direction])
    return image


def write_slice_folders(root: Path, cases: dict, first_slice: int = 1) -> Path:
    """Write ``{case_id: (ct, mri)}`` uint8 stacks as ``root/CT/<case><NNN>.png`` + ``root/MRI/…``.

    The layout and names of the Harvard AANLIB pairs: the slice number is the last three digits.
    """
    for sub in ("CT", "MRI"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for case_id, stacks in cases.items():
        for sub, stack in zip(("CT", "MRI"), stacks):
            for k, plane in enumerate(stack):
                sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(plane)),
                                str(root / sub / f"{case_id}{first_slice + k:03d}.png"))
    return root


def write_pictures(folder: Path, stack: np.ndarray, name: str = "CT_PNG ({}).png", numbers=None,
                   rgba: bool = False) -> Path:
    """Each slice of ``stack`` ((z, y, x) grey, or (z, y, x, 3) colour) as one picture ``name.format(number)``,
    numbered from 1 (or by ``numbers``), written in scrambled order (a reader must not rely on the disk's);
    ``rgba`` stores grey slices as grey RGBA with a translucent one-pixel frame, as real screenshots are."""
    folder.mkdir(parents=True, exist_ok=True)
    numbers = list(numbers or range(1, len(stack) + 1))
    for k in np.random.default_rng(0).permutation(len(stack)):
        plane = stack[k]
        if rgba:
            alpha = np.full(plane.shape, 255, np.uint8)
            alpha[[0, -1], :] = 28
            plane = np.dstack([plane, plane, plane, alpha])
        image = sitk.GetImageFromArray(np.ascontiguousarray(plane), isVector=plane.ndim == 3)
        sitk.WriteImage(image, str(folder / name.format(numbers[k])))
    return folder


def read_slice_case(root: Path, case_id: str, modality: str) -> np.ndarray:
    """One case's slices of ``root/<modality>/`` stacked in slice order (uint8 (z, H, W))."""
    files = sorted(f for f in (root / modality).glob("*.png") if f.stem[:-3] == case_id)
    return np.stack([sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in files])


# ------------------------------------------------------------------------------------------ tiny model


def tiny_train_args(data, out, *extra: str, epochs: int = 1, max_steps: int = 2) -> list:
    """`ctmri train` arguments for a seconds-long run: a base-4 U-Net, ``epochs`` of ``max_steps`` steps of 4
    slices, no DataLoader workers, one thread, no progress bar; ``extra`` adds options (e.g. ``--cv loo``)."""
    return ["train", "--data", str(data), "--out", str(out), "--base", "4", "--epochs", str(epochs),
            "--max-steps", str(max_steps), "--batch-size", "4", "--workers", "0", "--threads", "1", "--no-progress",
            *extra]


def tiny_cv_runs(data, root: Path, seeds: Sequence[int] = (0, 1), extra: Sequence[str] = ()) -> list:
    """Seconds-long 2-fold cross-validation runs of ``data``, one per seed (``root/run<seed>``): the
    CV-runs input of an ensemble's report or an error model's fit; ``extra`` adds training options."""
    from CTtoMRISynthesisLib.cli import main as ctmri

    runs = [Path(root) / f"run{seed}" for seed in seeds]
    for seed, run in zip(seeds, runs):
        assert ctmri(tiny_train_args(data, run, "--cv", "kfold", "--folds", "2", "--seed", str(seed), *extra)) == 0
    return runs


def train_tiny_model(path: Path, steps: int = 60, seed: int = 0, flip_tta: bool = True) -> Path:
    """A real (if small) model: a base-4 U-Net trained for ``steps`` Adam steps on phantom slice pairs.

    Two synthetic patients, windowed CT → T2, batches of 96² random crops of the 256² slices (a seventh of
    the cost of whole slices, same pixel scale; measured: crops of 96² gave a model whose output changes
    far less with the pixel size than 128² crops did, which the geometry rows of the reliability matrix
    need), one thread (deterministic, and fast on a shared CPU). Saved with
    the same weights format as any model, under the shipped model's preprocessing (256², no context, CT
    window 45/140 HU, output masked to the head). A few seconds on two cores.
    """
    import torch

    from CTtoMRISynthesisLib.model import UNet, UNetConfig
    from CTtoMRISynthesisLib.weights import save_weights

    pairs = [slice_pair(patient, 8, first_z=-25.0 + 3 * patient) for patient in (0, 1)]
    x = torch.from_numpy(np.concatenate([ct for ct, _ in pairs]).astype(np.float32)[:, None] / 255.0)
    y = torch.from_numpy(np.concatenate([mri for _, mri in pairs]).astype(np.float32)[:, None] / 255.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        config = UNetConfig(base=4)
        net = UNet(config)
        optimiser = torch.optim.Adam(net.parameters(), lr=5e-3)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (8,), generator=generator)
            top, left = torch.randint(0, 256 - 96 + 1, (2,), generator=generator).tolist()
            window = (idx, slice(None), slice(top, top + 96), slice(left, left + 96))
            loss = torch.nn.functional.mse_loss(net(x[window]), y[window])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    save_weights(
        path,
        net,
        {
            "format_version": 1,
            "name": "test-tiny-phantom",
            "model": config.to_dict(),
            "preprocessing": {
                "size": 256,
                "context_slices": 0,
                "ct_window": {"level": WINDOW[0], "width": WINDOW[1]},
                "mask_output": True,
                "head_threshold": 10,
                "flip_tta": flip_tta,  # its uncertainty map: the disagreement of the slice's and its mirror's predictions
            },
            "training": {"steps": steps, "final_loss": float(loss.detach()), "data": "Testing/phantoms.py"},
        },
    )
    return path
