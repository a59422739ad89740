"""In-memory slice dataset with augmentation.

Each item is one axial slice: input ``(2·context+1, H, W)`` = the CT slice and its neighbours divided
by 255, target ``(1, H, W)`` = the MRI slice divided by 255 (the scaling the weights config records).

Augmentation (all parameters recorded in the weights config by :meth:`Augment.to_dict`):
- left-right flip with probability ``flip_prob`` (anatomically plausible; no anterior-posterior flip),
- a small in-plane rotation (± ``rotate_deg``) and isotropic scale (1 ± ``scale``) about the image
  centre, the same for CT and MRI, bilinear, zero padding,
- CT intensity jitter: ``ct·a + b`` with a in 1 ± ``intensity_scale`` and b in ± ``intensity_shift``,
  clipped to 0..1 (makes the model tolerant of slightly different CT windows),
- optional CT "scanner" changes (off by default, on for the shipped recipe): a gamma curve
  (|log γ| ≤ ``gamma``), a Gaussian blur of σ ≤ ``blur`` pixels (smoother kernels, thicker slices) and
  additive noise of SD ≤ ``noise`` (0..1 scale), white or, half of the time, spatially correlated (as
  the noise of thin slices after reconstruction), so that the same head imaged another way gives
  nearly the same synthetic MRI. The air stays exactly 0.
- optional narrower CT windows (``contrast``, off by default): the CT's contrast stretched about the
  slice's soft-tissue median by a factor in 1 … 1 + ``contrast``, as a narrow clinical brain window
  shows the same head: CSF towards black, bone saturated. Without it the darkest grey levels inside a
  training skull are air (dark on T2), while another hospital's narrow window puts CSF, and a
  CSF-filled cyst, there. Measured (model card, round 8): with ``contrast`` 0.5 the network tolerates such
  windows but gives CSF no more brightness on other hospitals' CT; not in the shipped recipe.

Randomness is drawn from ``numpy.random.default_rng((seed, epoch, index))``, so an item's augmentation
depends only on the seed, epoch and index — the same with 0 or 4 loader workers, on resume, and under
DDP, which makes training deterministic on CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np

from ..intensity import standardise_ct
from ..synthesis import stack_context


@dataclass(frozen=True)
class Augment:
    enabled: bool = True
    flip_prob: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    intensity_scale: float = 0.05
    intensity_shift: float = 0.02
    gamma: float = 0.0  # max |log gamma| of a gamma curve on the CT
    blur: float = 0.0  # max Gaussian sigma (pixels) of a CT blur
    noise: float = 0.0  # max SD (0..1 scale) of additive CT noise
    contrast: float = 0.0  # max extra contrast (factor 1 … 1 + contrast) about the soft-tissue median

    def to_dict(self) -> dict:
        return asdict(self)


NO_AUGMENT = Augment(enabled=False)


def _affine(arrays: np.ndarray, angle_deg: float, scale: float, flip: bool) -> np.ndarray:
    """Rotate/scale (C, H, W) arrays about the image centre (bilinear, zero padding), then flip left-right.

    torch's ``grid_sample`` on one item: a few milliseconds, several times faster than scipy here.
    """
    import torch
    import torch.nn.functional as F

    a = math.radians(angle_deg)
    theta = torch.tensor(
        [[math.cos(a) / scale, -math.sin(a) / scale, 0.0], [math.sin(a) / scale, math.cos(a) / scale, 0.0]],
        dtype=torch.float32,
    )[None]
    src = torch.from_numpy(np.ascontiguousarray(arrays, dtype=np.float32))[None]
    grid = F.affine_grid(theta, list(src.shape), align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    if flip:
        out = torch.flip(out, dims=[-1])
    return out.numpy()


def _scanner_change(x: np.ndarray, rng: np.random.Generator, aug: Augment) -> np.ndarray:
    """Gamma, blur and noise on CT channels (C, H, W) in 0..1, as another scanner or window might give."""
    from scipy import ndimage

    if aug.gamma > 0:
        x = np.power(x, float(np.exp(rng.uniform(-aug.gamma, aug.gamma))))
    if aug.blur > 0:
        sigma = float(rng.uniform(0.0, aug.blur))
        if sigma > 0.2:
            x = ndimage.gaussian_filter(x, sigma=(0.0, sigma, sigma))
    if aug.noise > 0:
        noise = rng.standard_normal(x.shape).astype(np.float32)
        if rng.random() < 0.5:  # correlated: blurred white noise brought back to unit SD
            noise = ndimage.gaussian_filter(noise, sigma=(0.0, 1.0, 1.0))
            noise /= max(float(noise.std()), 1e-6)
        x = x + float(rng.uniform(0.0, aug.noise)) * noise
    return x


def narrower_window(x: np.ndarray, factor: float) -> np.ndarray:
    """CT channels (C, H, W, 0..1) with their contrast stretched by ``factor`` about the soft-tissue median
    of the middle channel (values strictly between 5 % and 95 %: neither air nor saturated bone), as a
    narrower window centred on the brain would show them; not clipped (the caller clips)."""
    middle = x[x.shape[0] // 2]
    tissue = middle[(middle > 0.05) & (middle < 0.95)]
    if tissue.size == 0:
        return x
    pivot = float(np.median(tissue))
    return pivot + (x - pivot) * factor


def ct_appearance(x: np.ndarray, rng: np.random.Generator, aug: Augment, gain: float, shift: float) -> np.ndarray:
    """The CT channels (C, H, W, 0..1) as another window (``x·gain + shift``; with ``aug.contrast`` also
    narrower, :func:`narrower_window`) and, when asked, another scanner (:func:`_scanner_change`, drawing
    from ``rng``) would show them; the air stays exactly 0."""
    head = x > 0
    if aug.contrast > 0:  # drawn only when asked, so that recipes without it keep their random streams
        x = np.clip(narrower_window(x, 1.0 + float(rng.uniform(0.0, aug.contrast))), 0.0, 1.0)
    out = np.clip(x * gain + shift, 0.0, 1.0)
    if aug.gamma > 0 or aug.blur > 0 or aug.noise > 0:
        out = np.clip(_scanner_change(out, rng, aug), 0.0, 1.0)
    return np.where(head, out, 0.0).astype(np.float32)


def draw_geometry(rng: np.random.Generator, aug: Augment) -> tuple:
    """(flip, angle in degrees, scale) of one item, drawn in the order every item draws them."""
    flip = bool(rng.random() < aug.flip_prob)
    angle = float(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
    scale = float(1.0 + rng.uniform(-aug.scale, aug.scale))
    return flip, angle, scale


def draw_window(rng: np.random.Generator, aug: Augment) -> tuple:
    """(gain, shift) of the CT window jitter, drawn after :func:`draw_geometry`."""
    return (float(1.0 + rng.uniform(-aug.intensity_scale, aug.intensity_scale)),
            float(rng.uniform(-aug.intensity_shift, aug.intensity_shift)))


def as_network_sees(cases, ct_standardise: Optional[float] = None) -> list:
    """The cases with their CT as the network gets it: standardised (:func:`intensity.standardise_ct`)
    when ``ct_standardise`` is set, else unchanged. Training data and the lookup table are built from these."""
    if ct_standardise is None:
        return list(cases)
    return [replace(case, ct=standardise_ct(case.ct, ct_standardise)[0]) for case in cases]


class SliceDataset:
    """A torch-style map dataset (``__len__``/``__getitem__``) over the slices of some cases."""

    def __init__(self, cases, context: int = 0, augment: Augment = NO_AUGMENT, seed: int = 0) -> None:
        if not cases:
            raise ValueError("no cases to train on")
        self.context = int(context)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        inputs, targets, owners = [], [], []
        for case in cases:
            inputs.append(stack_context(case.ct.astype(np.float32) / 255.0, self.context))
            targets.append(case.mri.astype(np.float32)[:, None] / 255.0)
            owners += [case.case_id] * case.slices
        self.inputs = np.concatenate(inputs)
        self.targets = np.concatenate(targets)
        self.case_of_slice = owners

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __getitem__(self, index: int):
        import torch

        x, y = self.inputs[index], self.targets[index]
        aug = self.augment
        if aug.enabled:
            rng = np.random.default_rng((self.seed, self.epoch, int(index)))
            flip, angle, scale = draw_geometry(rng, aug)
            gain, shift = draw_window(rng, aug)
            both = _affine(np.concatenate([x, y]), angle, scale, flip)
            x, y = ct_appearance(both[:-1], rng, aug, gain, shift), both[-1:]
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
