"""The training loop: the paper's U-Net, Adam with a decaying learning rate, batch 16, a loader with
workers, a CSV log per epoch, checkpoints, ``--resume``, model selection, determinism on CPU, AMP on
CUDA, and DistributedDataParallel when launched by ``torchrun``.

One call of :func:`train` trains one model on the slices of some patients and writes, in ``out_dir``:
``log.csv`` (one row per epoch), ``checkpoint.pt`` (everything needed to resume: a torch file of this
run's own, read back with ``weights_only=True``), ``model.safetensors`` (+ ``.sha256``; the selected
model as a weights file :func:`weights.load_model` accepts) and, when a validation set selects the
model, ``best.safetensors``. Under torchrun every rank appends a line per epoch to
``ranks/rank<k>.log``; only rank 0 writes everything else.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..intensity import CTWindow
from .dataset import Augment, SliceDataset, as_network_sees
from .unpaired import UnpairedSettings, build_source

LOSSES = ("mse", "l1", "l1+ssim", "laplace", "mse+gaussian")
SCHEDULES = ("cosine", "exponential", "constant")
SELECTIONS = ("last", "best")
MODEL_FILE = "model.safetensors"  # the run's selected model (weights.py format, + .sha256)
BEST_FILE = "best.safetensors"  # the best validation epoch, when a validation set selects it
LOG_FIELDS = ["epoch", "loss", "val_mae", "val_ssim", "val_ssim_foreground", "lr", "seconds"]

CT_NORMALISATION = (
    "8-bit display-windowed CT (as the training data): per-volume min-max to 0..255; Hounsfield CT: "
    "clipped to the ct_window (level ± width/2) and mapped linearly to 0..255; CT stored as HU+1024 is "
    "shifted first"
)


@dataclass
class TrainSettings:
    """Everything that defines a training run; recorded in the weights config."""

    epochs: int = 30
    batch_size: int = 16  # global batch: split across ranks under DDP
    lr: float = 1e-3
    lr_min: float = 1e-5
    schedule: str = "cosine"  # per-epoch decay from lr to lr_min
    gamma: float = 0.9  # per-epoch factor of the exponential schedule
    loss: str = "mse"
    ssim_weight: float = 0.5  # weight of (1 - SSIM) in the "l1+ssim" loss
    base: int = 16
    levels: int = 5
    norm: str = "batch"
    lookup_residual: bool = False  # U-Net output added to a CT→MRI lookup table fit on the training cases
    lookup_sigma: float = 0.0  # blur (pixels) of the CT slice indexing that table
    context: int = 1
    augment: Augment = field(default_factory=Augment)
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    amp: bool = True  # on CUDA only
    select: str = "last"
    mask_output: bool = True
    flip_tta: bool = True  # inference averages the prediction with that of the left-right flipped CT
    ct_standardise: Optional[float] = None  # map each CT's brain median to this value (intensity.standardise_ct)
    head_threshold: float = 10.0
    size: int = 256
    window: CTWindow = field(default_factory=lambda: CTWindow(45.0, 120.0))
    name: str = "ctmri_unet"
    threads: int = 0  # torch CPU threads; 0 = all cores (divided between ranks)
    max_steps: int = 0  # stop each epoch after this many steps (smoke tests); 0 = full epochs
    stop_after: int = 0  # leave the run after this epoch (checkpointed, to be resumed); 0 = run to the end
    unpaired: UnpairedSettings = field(default_factory=UnpairedSettings)  # CTs without MRI (training/unpaired.py)
    checkpoint_every: int = 1  # validate and checkpoint every N epochs (and after the last); a wide net's
    # checkpoint with Adam's state is ~90 MB, and dozens of runs sharing a GPU machine would write it every epoch

    def check(self) -> "TrainSettings":
        from ..errors import CTMRIError

        if self.loss not in LOSSES:
            raise CTMRIError(f"--loss must be one of {LOSSES}")
        if self.schedule not in SCHEDULES:
            raise CTMRIError(f"--lr-schedule must be one of {SCHEDULES}")
        if self.select not in SELECTIONS:
            raise CTMRIError(f"--select must be one of {SELECTIONS}")
        if self.epochs < 1 or self.batch_size < 1 or self.base < 1 or self.context < 0:
            raise CTMRIError("--epochs, --batch-size and --base must be positive, --context non-negative")
        if self.checkpoint_every < 1:
            raise CTMRIError("--checkpoint-every must be at least 1 (epochs)")
        self.unpaired.check()
        return self


# ----------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def check_batch_divides(batch_size: int, dist: "Dist") -> None:
    """The global batch (``--batch-size``, recorded in the model) must split evenly across torchrun's processes:
    3 processes would otherwise take 1 slice each of a batch of 4, and the record would say 4."""
    from ..errors import CTMRIError

    if dist.active and batch_size % dist.world:
        raise CTMRIError(
            f"--batch-size {batch_size} is the global batch, split across the {dist.world} processes torchrun "
            f"started: give a multiple of {dist.world} (e.g. {dist.world * max(1, round(batch_size / dist.world))})"
        )


def dist_from_env() -> Dist:
    """The process's place under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(dist: Dist, device: str) -> str:
    """Join the process group (NCCL on GPU, gloo on CPU); return this rank's device."""
    import torch
    import torch.distributed as td

    if not dist.active:
        return device
    if device.startswith("cuda"):
        torch.cuda.set_device(dist.local_rank)
        device = f"cuda:{dist.local_rank}"
        backend = "nccl"
    else:
        backend = "gloo"
    if not td.is_initialized():
        td.init_process_group(backend=backend, init_method="env://")
    return device


def barrier(dist: Dist) -> None:
    if dist.active:
        import torch.distributed as td

        td.barrier()


# ---------------------------------------------------------------------------------------------- losses
def _gaussian_1d(device, dtype, sigma: float = 1.5, radius: int = 5):
    import torch

    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _local_means(maps, g):
    """Gaussian-weighted local means of a (N, C, H, W) stack: separable depthwise 11-tap convolution
    ('valid' borders, as scikit-image crops them) — ~20× cheaper on CPU than a dense 11×11 kernel."""
    import torch.nn.functional as F

    c = maps.shape[1]
    k = g.numel()
    out = F.conv2d(maps, g.view(1, 1, k, 1).expand(c, 1, k, 1).contiguous(), groups=c)
    return F.conv2d(out, g.view(1, 1, 1, k).expand(c, 1, 1, k).contiguous(), groups=c)


def make_loss(settings: TrainSettings):
    """The training loss on 0..1 images. MSE is the paper's; L1 and L1 + (1 − SSIM) are options.

    The SSIM term is a differentiable training objective only (Gaussian σ 1.5 window, as the paper's
    metric); every reported number comes from :mod:`metrics`.
    """
    import torch
    import torch.nn.functional as F

    if settings.loss == "mse":
        return F.mse_loss
    if settings.loss == "l1":
        return F.l1_loss
    if settings.loss == "laplace":
        return laplace_nll
    if settings.loss == "mse+gaussian":
        return mse_and_gaussian_scale
    c1, c2 = 0.01**2, 0.03**2
    weight = settings.ssim_weight

    def l1_ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, y = pred.float(), target.float()
        g = _gaussian_1d(x.device, x.dtype)
        mu_x, mu_y, xx, yy, xy = _local_means(torch.cat([x, y, x * x, y * y, x * y], dim=1), g).unbind(1)
        sxx, syy, sxy = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
        ssim = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
        return (1 - weight) * F.l1_loss(x, y) + weight * (1 - ssim.mean())

    return l1_ssim


def laplace_nll(pred, target):
    """Negative log-likelihood of a Laplace distribution whose location and scale the network predicts.

    ``pred`` is (N, 2, H, W): channel 0 the location μ (the synthetic MRI, 0..1), channel 1 the raw scale,
    mapped by :func:`model.laplace_scale` to b > 0. ``|y − μ| / b + log b`` per pixel, averaged: the
    location is pulled towards the conditional median (what the MAE metric rewards) and b learns how far
    off it tends to be, which is the per-voxel uncertainty (a Laplace's SD is √2·b).
    """
    import torch

    from ..model import laplace_scale

    mu, b = pred[:, :1], laplace_scale(pred[:, 1:2])
    return (torch.abs(target - mu) / b + torch.log(b)).mean()


def mse_and_gaussian_scale(pred, target):
    """The paper's MSE for the synthetic MRI (channel 0) plus a Gaussian likelihood that teaches channel 1,
    σ, how far that prediction tends to be off: ``(y − μ)² / (2σ²) + log σ`` with μ held fixed (detached).

    The synthesis is trained exactly as with ``mse`` (the likelihood cannot pull the prediction towards
    where it is easy, as a joint likelihood would), and σ becomes the expected error at each pixel: the
    uncertainty map.
    """
    import torch
    import torch.nn.functional as F

    from ..model import laplace_scale

    mu, sigma = pred[:, :1], laplace_scale(pred[:, 1:2])
    nll = (target - mu.detach()) ** 2 / (2 * sigma**2) + torch.log(sigma)
    return F.mse_loss(mu, target) + nll.mean()


# ------------------------------------------------------------------------------------------- helpers
def _lr_at(settings: TrainSettings, epoch: int) -> float:
    """Learning rate of (0-based) ``epoch``."""
    if settings.schedule == "constant":
        return settings.lr
    if settings.schedule == "exponential":
        return max(settings.lr_min, settings.lr * settings.gamma**epoch)
    t = epoch / max(1, settings.epochs - 1)
    return settings.lr_min + 0.5 * (settings.lr - settings.lr_min) * (1 + math.cos(math.pi * t))


def hardware_summary(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (CUDA), torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def model_config(settings: TrainSettings):
    """The U-Net architecture a run trains (stored in its weights config)."""
    from ..model import UNetConfig

    return UNetConfig(
        in_channels=2 * settings.context + 1, out_channels=2 if settings.loss in ("laplace", "mse+gaussian") else 1,
        scale="gaussian" if settings.loss == "mse+gaussian" else "laplace", base=settings.base, levels=settings.levels, norm=settings.norm,
        lookup_residual=settings.lookup_residual, lookup_sigma=settings.lookup_sigma if settings.lookup_residual else 0.0,
    )


def build_config(
    settings: TrainSettings,
    split: dict,
    data: dict,
    metrics: dict,
    training_extra: dict,
) -> dict:
    """The weights config (schema: see weights.py / the model card)."""
    model = model_config(settings)
    return {
        "format_version": 1,
        "name": settings.name,
        "created": _dt.date.today().isoformat(),
        "model": model.to_dict(),
        "preprocessing": {
            "size": settings.size,
            "context_slices": settings.context,
            "ct_window": {"level": float(settings.window.level), "width": float(settings.window.width)},
            "ct_normalisation": CT_NORMALISATION,
            "mri_normalisation": "per-volume min-max to 0..255",
            "input_scaling": "ct255/255 in, mri255/255 out",
            "mask_output": bool(settings.mask_output),
            "flip_tta": bool(settings.flip_tta),
            "head_mask": "largest connected object of CT > head_threshold, holes filled per slice",
            "ct_standardise": settings.ct_standardise,
            "head_threshold": settings.head_threshold,
        },
        "training": {
            "epochs": settings.epochs,
            "batch_size": settings.batch_size,
            "optimizer": "Adam (betas 0.9, 0.999)",
            "lr": settings.lr,
            "lr_schedule": (
                f"{settings.schedule} per epoch from {settings.lr:g} to {settings.lr_min:g}"
                if settings.schedule == "cosine"
                else f"exponential x{settings.gamma:g} per epoch (floor {settings.lr_min:g})"
                if settings.schedule == "exponential"
                else "constant"
            ),
            "loss": settings.loss
            if settings.loss != "l1+ssim"
            else f"{1 - settings.ssim_weight:g}*L1 + {settings.ssim_weight:g}*(1-SSIM) (Gaussian sigma 1.5)",
            "augmentation": settings.augment.to_dict(),
            "seed": settings.seed,
            "selection": settings.select,
            "num_workers": settings.num_workers,
            **training_extra,
        },
        "split": split,
        "data": data,
        "metrics": metrics,
    }


def _mean_metrics(cases, net, settings: TrainSettings, device: str) -> dict:
    """Mean foreground MAE / SSIM over ``cases`` of ``net`` (all slices, output masked as at inference)."""
    from ..metrics import compute_metrics
    from ..synthesis import predict_slices

    rows = []
    for case in cases:
        syn = predict_slices(net, case.ct, context=settings.context, mask_output=settings.mask_output,
                             ct_standardise=settings.ct_standardise, device=device)
        m = compute_metrics(case.mri, syn)
        rows.append(m)
    return {
        "val_mae": float(np.mean([r["mae"] for r in rows])),
        "val_ssim": float(np.mean([r["ssim"] for r in rows])),
        "val_ssim_foreground": float(np.mean([r["ssim_foreground"] for r in rows])),
    }


# Settings added after checkpoints already existed: an older checkpoint was made with these values.
_SAVED_DEFAULTS = {"lookup_residual": False, "lookup_sigma": 0.0, "ct_standardise": None,
                   "unpaired": json.loads(json.dumps(asdict(UnpairedSettings())))}


#: Settings that say how a run goes, not what it learns: they may change across ``--resume`` (epochs may grow).
_RUN_ONLY = ("epochs", "num_workers", "device", "threads", "stop_after", "checkpoint_every", "amp")


def split_ids(train_cases, val_cases) -> dict:
    """The patients a run trains and validates on, as its checkpoint records them."""
    return {"train_cases": sorted(c.case_id for c in train_cases), "val_cases": sorted(c.case_id for c in val_cases)}


def _check_resumable(saved: dict, settings: TrainSettings, path: Path, saved_split: Optional[dict] = None,
                     split: Optional[dict] = None) -> None:
    """Refuse to resume (or keep) a checkpoint made with another recipe or on other patients: every setting but
    :data:`_RUN_ONLY`, and the training and validation patients (checkpoints record them since stop 34)."""
    from ..errors import CTMRIError

    now = json.loads(json.dumps(asdict(settings), default=str))
    then = {**_SAVED_DEFAULTS, **saved}  # a key an older checkpoint lacks had its default value then
    then["unpaired"] = {**_SAVED_DEFAULTS["unpaired"], **then["unpaired"]}  # so had an unpaired setting added later
    differ = [f"{k}: {then[k]} vs {now[k]}" for k in now if k not in _RUN_ONLY and k in then and then[k] != now[k]]
    if saved_split is not None and split is not None:
        differ += [f"{k}: {saved_split.get(k)} vs {split[k]}" for k in split if saved_split.get(k) != split[k]]
    if differ:
        raise CTMRIError(
            f"{path} was made with different settings or patients ({'; '.join(differ)}); use another --out folder "
            "or the original settings"
        )


def check_same_run(run_dir: Path, settings: TrainSettings, split: dict) -> None:
    """Refuse ``run_dir`` when its checkpoint was made with another recipe or on other patients (nothing to
    check without a checkpoint)."""
    import torch

    path = Path(run_dir) / "checkpoint.pt"
    if path.exists():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        _check_resumable(ckpt.get("settings", {}), settings, path, ckpt.get("split"), split)


def _log_row(row: dict) -> list:
    """One epoch's ``log.csv`` row (LOG_FIELDS order; floats to 6 significant digits, None empty)."""
    return ["" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in LOG_FIELDS]


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- train
@dataclass
class _Progress:
    """What carries over from epoch to epoch, and through a checkpoint across ``--resume``."""

    history: list = field(default_factory=list)  # one log row per epoch done
    best: dict = field(default_factory=lambda: {"val_mae": float("inf"), "epoch": None})
    best_state: Optional[dict] = None  # the best validation epoch's tensors (``select == "best"``)
    start_epoch: int = 0  # 0-based: the first epoch still to run


@dataclass
class _Run:
    """The objects one training process works with (built by :func:`_prepare`)."""

    settings: TrainSettings
    out_dir: Path
    dist: Dist
    device: str
    net: object  # the U-Net itself: validated, checkpointed and saved
    model: object  # what the steps run: ``net``, or its DistributedDataParallel wrapper
    optimizer: object
    scaler: object
    loss_fn: object
    dataset: SliceDataset
    sampler: object  # DistributedSampler under torchrun, else None
    unpaired: object  # unpaired.UnpairedSource, or None
    unpaired_record: Optional[dict]
    split: dict  # split_ids: the patients trained and validated on, recorded in the checkpoint

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    @property
    def log_path(self) -> Path:
        return self.out_dir / "log.csv"


@dataclass
class _EpochSums:
    """One epoch's steps on this rank: loss summed over slices, and the unpaired terms over steps."""

    total: float = 0.0
    count: int = 0
    steps: int = 0
    unpaired_terms: np.ndarray = field(default_factory=lambda: np.zeros(2))  # consistency, prior

    def unpaired_note(self, unpaired) -> str:
        if unpaired is None:
            return ""
        mean = self.unpaired_terms / max(1, self.steps)
        return f" unpaired consistency {mean[0]:.6f} prior {mean[1]:.6f}"


def _set_up_process(settings: TrainSettings, out_dir: Path) -> tuple:
    """This process's place under torchrun, its device and threads, and the run folders; ``(dist, device)``."""
    import torch

    from ..synthesis import choose_device

    dist = dist_from_env()
    device = init_distributed(dist, choose_device(settings.device))
    if not device.startswith("cuda"):
        cores = os.cpu_count() or 1
        torch.set_num_threads(settings.threads or max(1, cores // (dist.world if dist.active else 1)))
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif settings.threads:  # the augmentation runs on the CPU: many runs sharing one GPU machine share its cores
        torch.set_num_threads(settings.threads)
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    barrier(dist)
    (out_dir / "ranks").mkdir(parents=True, exist_ok=True)
    return dist, device


def _build_network(seen, settings: TrainSettings, device: str):
    """The U-Net (its lookup table fit first when it has one), on ``device`` in channels-last."""
    import torch

    from ..model import UNet

    net = UNet(model_config(settings))
    if settings.lookup_residual:
        from .report import fit_lookup_table

        # fit on the CT the network indexes the table with (standardised, when asked)
        net.set_lookup(fit_lookup_table(seen, settings.head_threshold, settings.lookup_sigma) / 255.0)
    return net.to(device=device, memory_format=torch.channels_last)


def _resume(run_dir: Path, ckpt_path: Path, settings: TrainSettings, net, optimizer, scaler, dist: Dist,
            split: dict) -> _Progress:
    """Load a checkpoint made with the same recipe on the same patients into ``net`` and ``optimizer``; the
    progress it carries."""
    import torch

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    _check_resumable(ckpt.get("settings", {}), settings, ckpt_path, ckpt.get("split"), split)
    net.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler") and scaler.is_enabled():  # fp16 on CUDA: the loss scale it had reached, not a restart
        scaler.load_state_dict(ckpt["scaler"])
    progress = _Progress(history=list(ckpt["history"]), best=dict(ckpt["best"]), best_state=ckpt.get("best_model"),
                         start_epoch=int(ckpt["epoch"]) + 1)
    if dist.main:
        print(f"resuming {run_dir} at epoch {progress.start_epoch + 1} of {settings.epochs}", flush=True)
    return progress


def _distribute(net, dataset, settings: TrainSettings, dist: Dist, cuda: bool) -> tuple:
    """Under torchrun: each rank's share of the slices and the DDP-wrapped network; ``(model, sampler)``."""
    if not dist.active:
        return net, None
    import torch
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=settings.seed)
    if cuda:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[dist.local_rank] if cuda else None)
    return model, sampler


def _prepare(train_cases, settings: TrainSettings, out_dir: Path, resume: bool, val_cases=()) -> tuple:
    """Everything a run needs before its first epoch; ``(run, progress)``. The order of the seeded steps
    (network initialisation, then the data's augmentation streams) is what makes CPU runs reproducible."""
    import torch

    dist, device = _set_up_process(settings, out_dir)
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    seen = as_network_sees(train_cases, settings.ct_standardise)  # what the network trains on
    net = _build_network(seen, settings, device)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.lr)
    loss_fn = make_loss(settings)
    scaler = torch.amp.GradScaler("cuda", enabled=device.startswith("cuda") and settings.amp)
    progress = _Progress()
    ckpt_path = out_dir / "checkpoint.pt"
    if resume and ckpt_path.exists():
        progress = _resume(out_dir, ckpt_path, settings, net, optimizer, scaler, dist, split_ids(train_cases, val_cases))
    dataset = SliceDataset(seen, settings.context, settings.augment, settings.seed)
    unpaired, unpaired_record = build_source(settings.unpaired, seen, settings.window, settings.size, settings.context,
                                             settings.augment, settings.seed, settings.head_threshold)
    model, sampler = _distribute(net, dataset, settings, dist, device.startswith("cuda"))
    run = _Run(settings, out_dir, dist, device, net, model, optimizer, scaler, loss_fn, dataset, sampler, unpaired,
               unpaired_record, split_ids(train_cases, val_cases))
    return run, progress


def _start_log(run: _Run, history: list) -> None:
    """A new ``log.csv``; on resume it restarts from the checkpoint's history (epochs after it are redone)."""
    if not run.dist.main:
        return
    with open(run.log_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(LOG_FIELDS)
        for row in history:
            writer.writerow(_log_row(row))


def _loader(run: _Run, epoch: int):
    """This epoch's batches: shuffled by a generator seeded per epoch (or by the DDP sampler's epoch)."""
    import torch
    from torch.utils.data import DataLoader

    run.dataset.set_epoch(epoch)
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(run.settings.seed * 1000 + epoch)
    return DataLoader(
        run.dataset,
        batch_size=max(1, run.settings.batch_size // run.dist.world),
        shuffle=run.sampler is None,
        sampler=run.sampler,
        generator=generator if run.sampler is None else None,
        num_workers=run.settings.num_workers,
        pin_memory=run.cuda,
        drop_last=False,
    )


def _step(run: _Run, x, y, epoch: int, sums: _EpochSums) -> float:
    """One optimiser step on a batch (plus the unpaired slices, when training with them); its loss."""
    import torch

    n = x.shape[0]
    if run.unpaired is not None:  # one forward pass: batch norm sees the paired and unpaired slices together
        plain, augmented = run.unpaired.batch(epoch, sums.steps, run.dist.rank)
        x = torch.cat([x, plain, augmented])
    x = x.to(run.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    y = y.to(run.device, non_blocking=True)
    run.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=run.cuda and run.settings.amp):
        pred = run.model(x)
    loss = run.loss_fn(pred[:n].float(), y)
    if run.unpaired is not None:
        extra, terms = run.unpaired.loss(pred[n:].float(), x[n : n + plain.shape[0]])
        loss = loss + extra
        sums.unpaired_terms += terms
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return float(loss.detach())


def _train_epoch(run: _Run, epoch: int, progress_bar: bool) -> _EpochSums:
    """One epoch of steps on this rank (at most ``max_steps``), with a progress bar on rank 0."""
    loader = _loader(run, epoch)
    run.model.train()
    sums = _EpochSums()
    bar = None
    if progress_bar and run.dist.main:
        from tqdm import tqdm

        bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{run.settings.epochs}", leave=False, mininterval=2.0)
    for x, y in loader:
        n = x.shape[0]
        sums.total += _step(run, x, y, epoch, sums) * n
        sums.count += n
        sums.steps += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{sums.total / sums.count:.4f}")
        if run.settings.max_steps and sums.steps >= run.settings.max_steps:
            break
    if bar is not None:
        bar.close()
    return sums


def _epoch_loss(run: _Run, sums: _EpochSums) -> float:
    """The epoch's mean loss per slice, over all ranks under torchrun."""
    if not run.dist.active:
        return sums.total / max(1, sums.count)
    import torch
    import torch.distributed as td

    t = torch.tensor([sums.total, float(sums.count)], dtype=torch.float64, device=run.device)
    td.all_reduce(t)
    return float(t[0] / max(1.0, float(t[1])))


def _write_rank_log(run: _Run, epoch: int, sums: _EpochSums) -> None:
    """Every rank's own line per epoch in ``ranks/rank<k>.log`` (what each process did under torchrun)."""
    with open(run.out_dir / "ranks" / f"rank{run.dist.rank}.log", "a") as fh:
        fh.write(f"rank {run.dist.rank}/{run.dist.world} epoch {epoch + 1} steps {sums.steps} slices {sums.count} "
                 f"loss {sums.total / max(1, sums.count):.6f}{sums.unpaired_note(run.unpaired)}\n")


def _save_checkpoint(run: _Run, epoch: int, progress: _Progress) -> None:
    """Everything needed to resume after ``epoch`` (0-based), written whole or not at all."""
    state = {
        "epoch": epoch,
        "rank": run.dist.rank,
        "world_size": run.dist.world,
        "model": {k: v.detach().cpu() for k, v in run.net.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),  # {} when disabled (CPU, or --no-amp)
        "history": progress.history,
        "best": progress.best,
        "settings": json.loads(json.dumps(asdict(run.settings), default=str)),
        "split": run.split,
    }
    if progress.best_state is not None and run.settings.select == "best":
        state["best_model"] = progress.best_state
    _atomic_torch_save(state, run.checkpoint_path)


def _record_epoch(run: _Run, row: dict, epoch: int, milestone: bool, progress: _Progress, note: str) -> None:
    """Rank 0: the best epoch so far, the log row, the checkpoint at milestones, and the console line."""
    improved = row["val_mae"] is not None and row["val_mae"] < progress.best["val_mae"]
    if improved:
        progress.best = {"val_mae": row["val_mae"], "val_ssim": row["val_ssim"], "epoch": epoch + 1}
        progress.best_state = {k: v.detach().cpu().clone() for k, v in run.net.state_dict().items()}
    with open(run.log_path, "a", newline="") as fh:
        csv.writer(fh).writerow(_log_row(row))
    if milestone:
        _save_checkpoint(run, epoch, progress)
    message = f"epoch {epoch + 1}/{run.settings.epochs} loss {row['loss']:.5f} lr {row['lr']:.2e} {row['seconds']:.1f}s"
    message += note
    if row["val_mae"] is not None:
        message += f" | held-out MAE {row['val_mae']:.2f} SSIM {row['val_ssim']:.4f} (fg {row['val_ssim_foreground']:.4f})"
    print(message, flush=True)


def _run_epoch(run: _Run, epoch: int, val_cases, progress: _Progress, progress_bar: bool) -> None:
    """Train one epoch, validate at milestones (every ``checkpoint_every`` epochs, the last, when stopping)
    and record it."""
    t0 = time.time()
    settings = run.settings
    lr = _lr_at(settings, epoch)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    sums = _train_epoch(run, epoch, progress_bar)
    loss = _epoch_loss(run, sums)
    _write_rank_log(run, epoch, sums)
    row = {"epoch": epoch + 1, "loss": loss, "val_mae": None, "val_ssim": None, "val_ssim_foreground": None, "lr": lr}
    stopping = bool(settings.stop_after and epoch + 1 >= settings.stop_after)
    milestone = (epoch + 1) % settings.checkpoint_every == 0 or epoch + 1 == settings.epochs or stopping
    if val_cases and run.dist.main and milestone:
        row.update(_mean_metrics(val_cases, run.net, settings, run.device))
        run.net.train()
    row["seconds"] = time.time() - t0
    progress.history.append(row)
    if run.dist.main:
        _record_epoch(run, row, epoch, milestone, progress, sums.unpaired_note(run.unpaired))


def _final_metrics(settings: TrainSettings, history: list, selected_epoch: int, val_cases) -> dict:
    """The ``metrics`` of the weights config: the selected epoch and, with a validation set, its scores."""
    last = history[-1] if history else {}
    metrics = {"selected_epoch": selected_epoch, "selection": settings.select, "final_train_loss": last.get("loss")}
    if val_cases:
        chosen = next((h for h in history if h["epoch"] == selected_epoch), last)
        metrics.update({"val_cases": [c.case_id for c in val_cases], "val_mae": chosen.get("val_mae"),
                        "val_ssim": chosen.get("val_ssim"), "val_ssim_foreground": chosen.get("val_ssim_foreground")})
    return metrics


def _save_model(run: _Run, train_cases, val_cases, progress: _Progress, seconds: float, split, data, command) -> dict:
    """Rank 0: the selected epoch's network and its config as ``model.safetensors`` (and ``best.safetensors``
    when a validation set selected it); the config."""
    import torch

    from ..model import count_parameters
    from ..weights import save_weights

    settings, net, history = run.settings, run.net, progress.history
    selected_epoch = settings.epochs
    if settings.select == "best" and progress.best_state is not None:
        net.load_state_dict(progress.best_state)
        selected_epoch = progress.best["epoch"]
    extra = {
        "device": run.device,
        "hardware": hardware_summary(run.device),
        "processes": run.dist.world,
        "threads_per_process": None if run.cuda else torch.get_num_threads(),
        "amp": bool(run.cuda and settings.amp),
        "seconds": round(seconds, 1),
        "seconds_per_epoch": round(float(np.mean([h["seconds"] for h in history])), 2) if history else None,
        "parameters": count_parameters(net),
        "command": command,
        **({"unpaired": run.unpaired_record} if run.unpaired_record else {}),
    }
    split = split or {"mode": "all", "train_cases": [c.case_id for c in train_cases], "val_cases": [],
                      "test_cases": [], "seed": settings.seed}
    config = build_config(settings, split, data or {}, _final_metrics(settings, history, selected_epoch, val_cases), extra)
    save_weights(run.out_dir / MODEL_FILE, net, config)
    if settings.select == "best" and progress.best_state is not None:
        save_weights(run.out_dir / BEST_FILE, net, config)
    return config


def train(
    train_cases,
    settings: TrainSettings,
    out_dir: str | Path,
    *,
    val_cases=(),
    split: Optional[dict] = None,
    data: Optional[dict] = None,
    resume: bool = False,
    command: str = "",
    progress_bar: bool = True,
) -> dict:
    """Train one model; return ``{"weights": path, "config": ..., "history": [...]}`` (rank 0's view).

    ``val_cases`` are evaluated after every epoch (logged); with ``settings.select == "best"`` the
    epoch with the lowest validation MAE is the one saved as ``model.safetensors``, otherwise the last epoch.
    """
    settings.check()
    check_batch_divides(settings.batch_size, dist_from_env())
    out_dir = Path(out_dir)
    run, progress = _prepare(train_cases, settings, out_dir, resume, val_cases)
    start_time = time.time()
    _start_log(run, progress.history)
    seconds_before = float(sum(h["seconds"] for h in progress.history))
    for epoch in range(progress.start_epoch, settings.epochs):
        _run_epoch(run, epoch, val_cases, progress, progress_bar)
        barrier(run.dist)
        if settings.stop_after and epoch + 1 >= settings.stop_after and epoch + 1 < settings.epochs:
            if run.dist.main:
                print(f"stopped after epoch {epoch + 1}; continue with --resume", flush=True)
            return {"weights": None, "history": progress.history, "best": progress.best, "stopped": True}

    result = {"weights": out_dir / MODEL_FILE, "history": progress.history, "best": progress.best}
    if run.dist.main:
        ran = progress.start_epoch < settings.epochs
        if not ran and (out_dir / MODEL_FILE).exists():  # a finished run resumed: kept as it is, not saved again
            from ..weights import read_config

            result["config"] = read_config(out_dir / MODEL_FILE)
        else:
            seconds = seconds_before + (time.time() - start_time) if ran else seconds_before
            result["config"] = _save_model(run, train_cases, val_cases, progress, seconds, split, data, command)
    barrier(run.dist)
    return result
