"""Unpaired CT in training: CTs with no MRI (other scanners, other hospitals) that adapt the model to them.

``ctmri train --unpaired-ct PATH …`` adds, at every step, a few slices of these CTs to the paired batch
(one forward pass, so batch norm sees both) and two terms to the paired loss:

- **consistency**: each unpaired slice is rendered twice with the same geometry (flip, rotation, scale),
  once plain and once through the trainer's CT window and scanner augmentation; the synthetic MRI of the
  second must equal that of the first (held fixed), inside the head: squared difference, 0..1 scale.
- **T2 prior**: the plain rendering's synthetic MRI, inside the head, must have the grey-level
  distribution of the training patients' MRI inside their heads: the mean squared difference of the two
  distributions' quantiles (a 1D Wasserstein-2 distance). It asks only that the output be as contrasted
  as a T2 is, not where: no CSF or tissue mask enters it, so the CT-derived masks that score CSF contrast
  (``experiments/external_ct.py``) stay independent of it. Where the network puts the bright and dark
  values is left to what the paired data taught it.

Why: an MSE fit regresses ambiguous voxels towards an average grey, and on CT from elsewhere the model
gives CSF only ~1.4 × brain tissue where a T2 gives ~1.7 (model card, "On CT the model never saw").
These terms use the foreign CTs themselves, without an MRI of them.

What was measured (`model_weights/RECIPES.md`, round 7; not in the shipped model): the prior alone
raises CSF contrast on most foreign CTs, but it holds each batch of slices to a T2's usual share of bright
voxels, so a head with a large CSF-filled cyst gets the cyst dark — a wrong contrast where it matters
most. The consistency term flattens the contrast (two renderings agree most easily on a grey field) and
is off by default. Both are options for research, not a recipe to adopt without checking such heads.
``by_ct`` (``--unpaired-prior-by-ct``, round 8) asks each batch for the training MRI's grey levels given its
own CT grey levels instead; it did not save the cyst either: a narrow clinical brain window puts CSF at the
near-black CT levels that are air (dark on T2) in the training CT.

An unpaired path is a folder of 2D slices (PNG etc., stacked in the order of the numbers in their names,
as one patient's CT), a volume file or a DICOM folder (as ``ctmri synthesize`` reads them). Each CT is
normalised and put on the model's axial grid exactly as inference does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import CTMRIError
from ..intensity import CTWindow, head_mask, normalise_ct
from .dataset import Augment, _affine, ct_appearance, draw_geometry, draw_window

QUANTILES = np.linspace(0.005, 0.995, 100)  # where the two grey-level distributions are compared


@dataclass(frozen=True)
class UnpairedSettings:
    """The unpaired CTs and the weights of their two loss terms (recorded in the weights config)."""

    paths: tuple = ()
    batch: int = 4  # unpaired slices added to each step
    consistency: float = 0.0  # weight of the consistency term (measured: it flattens the contrast; off)
    prior: float = 1.0  # weight of the T2 prior term
    by_ct: bool = False  # the prior's target: the training MRI given each CT grey level, mixed as the batch's CT

    @property
    def enabled(self) -> bool:
        return bool(self.paths) and (self.consistency > 0 or self.prior > 0)

    def check(self) -> "UnpairedSettings":
        if self.batch < 1 or self.consistency < 0 or self.prior < 0:
            raise CTMRIError("--unpaired-batch must be positive, --unpaired-consistency and --unpaired-prior ≥ 0")
        return self


def read_unpaired_ct(path: str | Path):
    """A CT without MRI as a SimpleITK image: a folder of 2D slices stacked in the order of their numbers
    (``pictures.py``, spacing 1 mm), a volume file or a DICOM folder, as ``ctmri synthesize --ct`` reads them."""
    from ..dicom import read_input

    path = Path(path)
    if not path.exists():
        raise CTMRIError(f"--unpaired-ct {path}: no such file or folder")
    return read_input(path, "unpaired CT")[0]


def on_model_grid(image, window: CTWindow, size: int) -> np.ndarray:
    """The CT normalised to 0..255 and resampled onto the model's axial grid, as inference does it."""
    import SimpleITK as sitk

    from .. import geometry

    ct255, _ = normalise_ct(sitk.GetArrayFromImage(image), window)
    grid = geometry.model_grid(image, size)
    resampled = geometry.resample(geometry.array_on_grid(ct255, image), grid, None, default_value=0.0)
    return sitk.GetArrayFromImage(resampled).astype(np.float32)


#: Mean |difference| (grey levels, of 8 × 8-pixel block means on the model grid) below which an unpaired CT slice is
#: taken for a paired patient's slice. On the real data (``python experiments/unpaired_overlap.py``) a patient's
#: own CT slices give 0.0, any two of the 14 patients (Harvard 8, the other hospital's 6) at least 11.2.
SAME_SLICE_MAE = 4.0


def _blocks(volume: np.ndarray, block: int = 8) -> np.ndarray:
    """(z, H/block, W/block) block means: insensitive to noise and sub-block shifts, cheap to compare."""
    z, h, w = volume.shape
    h, w = h - h % block, w - w % block
    return volume[:, :h, :w].reshape(z, h // block, block, w // block, block).mean(axis=(2, 4))


def closest_paired_slice(volume: np.ndarray, cases) -> tuple:
    """(distance, case id) of the paired patient whose CT comes closest to any slice of ``volume`` (both on the
    model grid, 0..255): the smallest block-mean MAE over all pairs of slices."""
    ours = _blocks(volume)
    best = (float("inf"), "")
    for case in cases:
        theirs = _blocks(np.asarray(case.ct, np.float32))
        if theirs.shape[1:] != ours.shape[1:]:
            continue
        distance = float(np.abs(ours[:, None] - theirs[None]).mean(axis=(2, 3)).min())
        best = min(best, (distance, case.case_id))
    return best


def check_not_paired(settings: UnpairedSettings, cases, window: CTWindow, size: int) -> None:
    """Refuse an unpaired CT that repeats a paired patient's CT (any slice within :data:`SAME_SLICE_MAE`): in a
    cross-validation, or with --test-cases, it would put a held-out patient's CT into training."""
    if not settings.enabled:
        return
    for path in settings.paths:
        distance, case_id = closest_paired_slice(on_model_grid(read_unpaired_ct(path), window, size), cases)
        if distance < SAME_SLICE_MAE:
            raise CTMRIError(
                f"--unpaired-ct {path} repeats the CT of patient {case_id} of --data (a slice {distance:.1f} grey "
                "levels from one of its slices): a paired patient cannot be unpaired data too (held out, its CT "
                "would be trained on); leave that path out"
            )


CT_BINS = 64  # CT grey levels (0..255) of the CT-conditioned prior, 4 levels a bin


def mri_given_ct(cases, head_threshold: float) -> np.ndarray:
    """P(MRI grey level | CT bin) of the training patients inside their CT head masks: a (CT_BINS, 256) array
    whose rows sum to 1; a CT bin no training voxel falls in takes the pooled MRI distribution."""
    joint = np.zeros((CT_BINS, 256))
    for case in cases:
        head = head_mask(case.ct, head_threshold)
        ct_bin = np.clip(case.ct[head] * CT_BINS / 256.0, 0, CT_BINS - 1).astype(int)
        mri = np.clip(np.round(case.mri[head]), 0, 255).astype(int)
        np.add.at(joint, (ct_bin, mri), 1.0)
    if joint.sum() == 0:
        raise CTMRIError("the training patients have no head voxels to take the MRI's grey-level distribution from")
    pooled = joint.sum(axis=0) / joint.sum()
    rows = joint.sum(axis=1, keepdims=True)
    return np.where(rows > 0, joint / np.maximum(rows, 1.0), pooled).astype(np.float32)


def conditioned_quantiles(ct01, given_ct):
    """The target quantiles (0..1) for one batch under the CT-conditioned prior: the mixture of the
    training MRI's distributions given each CT bin, weighted by how many of the batch's head voxels
    (``ct01``, their CT on the 0..1 scale) fall in that bin. A batch through a large cyst has many CT-dark
    voxels, so its target has as many T2-bright ones: the prior follows each head's own CSF volume."""
    import torch

    bins = torch.clamp((ct01 * 255.0 * CT_BINS / 256.0).long(), 0, CT_BINS - 1)
    weights = torch.bincount(bins, minlength=CT_BINS).to(given_ct.dtype)
    cdf = torch.cumsum(weights / weights.sum() @ given_ct, 0)
    q = torch.as_tensor(QUANTILES, dtype=cdf.dtype, device=cdf.device)
    level = torch.searchsorted(cdf.contiguous(), q).clamp(max=255).to(cdf.dtype)  # first grey level reaching q
    return level / 255.0


def mri_quantiles(cases, head_threshold: float) -> np.ndarray:
    """Quantiles (0..1 scale) of the training patients' MRI inside their CT head masks: the T2 prior."""
    values = [case.mri[head_mask(case.ct, head_threshold)] for case in cases]
    pooled = np.concatenate([v for v in values if v.size]) if values else np.zeros(0)
    if pooled.size == 0:
        raise CTMRIError("the training patients have no head voxels to take the MRI's grey-level distribution from")
    return (np.quantile(pooled, QUANTILES) / 255.0).astype(np.float32)


class UnpairedSource:
    """Draws unpaired slices for each step and scores the synthetic MRI the network makes of them."""

    def __init__(self, volumes: Sequence[np.ndarray], target_quantiles: np.ndarray, settings: UnpairedSettings,
                 context: int, augment: Augment, seed: int, head_threshold: float,
                 given_ct: np.ndarray | None = None) -> None:
        from ..synthesis import stack_context

        if not volumes:
            raise CTMRIError("no unpaired CT slices to train on")
        self.inputs = np.concatenate([stack_context(v / 255.0, context) for v in volumes]).astype(np.float32)
        self.target = target_quantiles
        self.given_ct = given_ct  # (CT_BINS, 256) for the CT-conditioned prior (settings.by_ct), else None
        self.settings = settings
        self.augment = augment
        self.seed = int(seed)
        self.threshold = head_threshold / 255.0
        self.centre = context  # the slice's own channel

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def batch(self, epoch: int, step: int, rank: int = 0):
        """(plain, augmented) renderings of ``settings.batch`` slices, (n, C, H, W) tensors each; drawn
        from ``(seed, epoch, step, rank)`` only, so that a run is reproducible and resumable."""
        import torch

        rng = np.random.default_rng((self.seed, epoch, step, rank, 7))
        plain, augmented = [], []
        for index in rng.integers(0, len(self), self.settings.batch):
            flip, angle, scale = draw_geometry(rng, self.augment)
            x = _affine(self.inputs[index], angle, scale, flip)
            plain.append(np.where(x > 0, np.clip(x, 0.0, 1.0), 0.0))
            augmented.append(ct_appearance(x, rng, self.augment, *draw_window(rng, self.augment)))
        as_tensor = lambda arrays: torch.from_numpy(np.ascontiguousarray(np.stack(arrays), dtype=np.float32))  # noqa: E731
        return as_tensor(plain), as_tensor(augmented)

    def losses(self, pred_plain, pred_augmented, plain):
        """(consistency, prior) of the synthetic MRI (channel 0, 0..1) of the two renderings."""
        import torch

        head = plain[:, self.centre : self.centre + 1] > self.threshold
        mu_plain, mu_aug = pred_plain[:, :1], pred_augmented[:, :1]
        zero = mu_plain.sum() * 0.0
        if not bool(head.any()):
            return zero, zero
        consistency = ((mu_aug - mu_plain.detach())[head] ** 2).mean()
        q = torch.as_tensor(QUANTILES, dtype=mu_plain.dtype, device=mu_plain.device)
        if self.settings.by_ct:
            given_ct = torch.as_tensor(self.given_ct, dtype=mu_plain.dtype, device=mu_plain.device)
            target = conditioned_quantiles(plain[:, self.centre : self.centre + 1][head], given_ct)
        else:
            target = torch.as_tensor(self.target, dtype=mu_plain.dtype, device=mu_plain.device)
        prior = ((torch.quantile(mu_plain[head], q) - target) ** 2).mean()
        return consistency, prior

    def loss(self, pred, plain):
        """The weighted sum of both terms; ``pred`` = the network's output on ``cat([plain, augmented])``."""
        n = plain.shape[0]
        consistency, prior = self.losses(pred[:n], pred[n:], plain)
        return self.settings.consistency * consistency + self.settings.prior * prior, (float(consistency.detach()), float(prior.detach()))


def build_source(settings: UnpairedSettings, train_cases, window: CTWindow, size: int, context: int,
                 augment: Augment, seed: int, head_threshold: float):
    """The :class:`UnpairedSource` of a run (None without unpaired CTs) and its record for the config."""
    if not settings.enabled:
        return None, None
    volumes = [on_model_grid(read_unpaired_ct(p), window, size) for p in settings.paths]
    given_ct = mri_given_ct(train_cases, head_threshold) if settings.by_ct else None
    source = UnpairedSource(volumes, mri_quantiles(train_cases, head_threshold), settings, context, augment, seed,
                            head_threshold, given_ct)
    record = {"paths": [str(p) for p in settings.paths], "slices": [int(v.shape[0]) for v in volumes],
              "batch": settings.batch, "consistency_weight": settings.consistency, "prior_weight": settings.prior,
              "prior_by_ct": settings.by_ct,
              "terms": "consistency (plain vs augmented rendering, MSE in head) + T2 prior (Wasserstein-2 of "
                       "in-head grey levels to the training MRI's" + (", given the batch's CT grey levels)" if settings.by_ct else ")")}
    return source, record
