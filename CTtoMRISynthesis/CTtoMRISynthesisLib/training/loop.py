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


def _check_resumable(saved: dict, settings: TrainSettings, path: Path) -> None:
    """Refuse to resume a checkpoint made with another model or data recipe (epochs may grow)."""
    from ..errors import CTMRIError

    now = json.loads(json.dumps(asdict(settings), default=str))
    keys = ("base", "levels", "norm", "lookup_residual", "lookup_sigma", "ct_standardise", "context", "loss",
            "batch_size", "seed", "size", "unpaired")
    then = {**_SAVED_DEFAULTS, **saved}  # a key an older checkpoint lacks had its default value then
    then["unpaired"] = {**_SAVED_DEFAULTS["unpaired"], **then["unpaired"]}  # so had an unpaired setting added later
    differ = [k for k in keys if k in then and then[k] != now[k]]
    if differ:
        raise CTMRIError(
            f"{path} was made with different settings ({', '.join(f'{k}: {then[k]} vs {now[k]}' for k in differ)}); "
            "use another --out folder or the original settings"
        )


def _log_row(row: dict) -> list:
    """One epoch's ``log.csv`` row (LOG_FIELDS order; floats to 6 significant digits, None empty)."""
    return ["" if row.get(k) is None else (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in LOG_FIELDS]


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- train
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
    import torch
    from torch.utils.data import DataLoader

    from ..model import UNet, count_parameters
    from ..synthesis import choose_device
    from ..weights import save_weights

    settings.check()
    out_dir = Path(out_dir)
    dist = dist_from_env()
    device = init_distributed(dist, choose_device(settings.device))
    cuda = device.startswith("cuda")
    if not cuda:
        cores = os.cpu_count() or 1
        threads = settings.threads or max(1, cores // (dist.world if dist.active else 1))
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif settings.threads:  # the augmentation runs on the CPU: many runs sharing one GPU machine share its cores
        torch.set_num_threads(settings.threads)
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    barrier(dist)
    (out_dir / "ranks").mkdir(parents=True, exist_ok=True)

    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    seen = as_network_sees(train_cases, settings.ct_standardise)  # what the network trains on
    net = UNet(model_config(settings))
    if settings.lookup_residual:
        from .report import fit_lookup_table

        # fit on the CT the network indexes the table with (standardised, when asked)
        net.set_lookup(fit_lookup_table(seen, settings.head_threshold, settings.lookup_sigma) / 255.0)
    net = net.to(device=device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.lr)
    loss_fn = make_loss(settings)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and settings.amp)

    history: list[dict] = []
    best = {"val_mae": float("inf"), "epoch": None}
    best_state = None
    start_epoch = 0
    ckpt_path = out_dir / "checkpoint.pt"
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        _check_resumable(ckpt.get("settings", {}), settings, ckpt_path)
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        history = list(ckpt["history"])
        best = dict(ckpt["best"])
        best_state = ckpt.get("best_model")
        start_epoch = int(ckpt["epoch"]) + 1
        if dist.main:
            print(f"resuming {out_dir} at epoch {start_epoch + 1} of {settings.epochs}", flush=True)

    dataset = SliceDataset(seen, settings.context, settings.augment, settings.seed)
    unpaired, unpaired_record = build_source(settings.unpaired, seen, settings.window, settings.size, settings.context,
                                             settings.augment, settings.seed, settings.head_threshold)
    sampler = None
    if dist.active:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=settings.seed)
        if cuda:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[dist.local_rank] if cuda else None)
    else:
        model = net
    per_rank_batch = max(1, settings.batch_size // dist.world)

    start_time = time.time()
    log_path = out_dir / "log.csv"
    if dist.main:  # on resume, the log restarts from the checkpoint's history (epochs after it are redone)
        with open(log_path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(LOG_FIELDS)
            for h in history:
                writer.writerow(_log_row(h))
    seconds_before = float(sum(h["seconds"] for h in history))

    for epoch in range(start_epoch, settings.epochs):
        t0 = time.time()
        lr = _lr_at(settings, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        dataset.set_epoch(epoch)
        generator = torch.Generator().manual_seed(settings.seed * 1000 + epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = DataLoader(
            dataset,
            batch_size=per_rank_batch,
            shuffle=sampler is None,
            sampler=sampler,
            generator=generator if sampler is None else None,
            num_workers=settings.num_workers,
            pin_memory=cuda,
            drop_last=False,
        )
        model.train()
        total, count, steps = 0.0, 0, 0
        unpaired_terms = np.zeros(2)  # consistency, prior: summed over the epoch's steps
        bar = None
        if progress_bar and dist.main:
            from tqdm import tqdm

            bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{settings.epochs}", leave=False, mininterval=2.0)
        for x, y in loader:
            n = x.shape[0]
            if unpaired is not None:  # one forward pass: batch norm sees the paired and unpaired slices together
                plain, augmented = unpaired.batch(epoch, steps, dist.rank)
                x = torch.cat([x, plain, augmented])
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=cuda and settings.amp):
                pred = model(x)
            loss = loss_fn(pred[:n].float(), y)
            if unpaired is not None:
                extra, terms = unpaired.loss(pred[n:].float(), x[n : n + plain.shape[0]])
                loss = loss + extra
                unpaired_terms += terms
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += float(loss.detach()) * n
            count += n
            steps += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total / count:.4f}")
            if settings.max_steps and steps >= settings.max_steps:
                break
        if bar is not None:
            bar.close()
        epoch_loss = total / max(1, count)
        if dist.active:  # mean over ranks
            import torch.distributed as td

            t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
            td.all_reduce(t)
            epoch_loss = float(t[0] / max(1.0, float(t[1])))
        with open(out_dir / "ranks" / f"rank{dist.rank}.log", "a") as fh:
            unpaired_note = "" if unpaired is None else (
                f" unpaired consistency {unpaired_terms[0] / max(1, steps):.6f} prior {unpaired_terms[1] / max(1, steps):.6f}")
            fh.write(f"rank {dist.rank}/{dist.world} epoch {epoch + 1} steps {steps} slices {count} loss {total / max(1, count):.6f}"
                     f"{unpaired_note}\n")

        row = {"epoch": epoch + 1, "loss": epoch_loss, "val_mae": None, "val_ssim": None, "val_ssim_foreground": None, "lr": lr}
        stopping = bool(settings.stop_after and epoch + 1 >= settings.stop_after)
        milestone = (epoch + 1) % settings.checkpoint_every == 0 or epoch + 1 == settings.epochs or stopping
        if val_cases and dist.main and milestone:
            row.update(_mean_metrics(val_cases, net, settings, device))
            net.train()
        row["seconds"] = time.time() - t0
        history.append(row)
        if dist.main:
            improved = row["val_mae"] is not None and row["val_mae"] < best["val_mae"]
            if improved:
                best = {"val_mae": row["val_mae"], "val_ssim": row["val_ssim"], "epoch": epoch + 1}
                best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            with open(log_path, "a", newline="") as fh:
                csv.writer(fh).writerow(_log_row(row))
            if milestone:
                state = {
                    "epoch": epoch,
                    "rank": dist.rank,
                    "world_size": dist.world,
                    "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "history": history,
                    "best": best,
                    "settings": json.loads(json.dumps(asdict(settings), default=str)),
                }
                if best_state is not None and settings.select == "best":
                    state["best_model"] = best_state
                _atomic_torch_save(state, ckpt_path)
            message = f"epoch {epoch + 1}/{settings.epochs} loss {epoch_loss:.5f} lr {lr:.2e} {row['seconds']:.1f}s"
            message += unpaired_note
            if row["val_mae"] is not None:
                message += f" | held-out MAE {row['val_mae']:.2f} SSIM {row['val_ssim']:.4f} (fg {row['val_ssim_foreground']:.4f})"
            print(message, flush=True)
        barrier(dist)
        if settings.stop_after and epoch + 1 >= settings.stop_after and epoch + 1 < settings.epochs:
            if dist.main:
                print(f"stopped after epoch {epoch + 1}; continue with --resume", flush=True)
            return {"weights": None, "history": history, "best": best, "stopped": True}

    result = {"weights": out_dir / MODEL_FILE, "history": history, "best": best}
    if dist.main:
        seconds = seconds_before + (time.time() - start_time) if start_epoch < settings.epochs else seconds_before
        selected_epoch = settings.epochs
        if settings.select == "best" and best_state is not None:
            net.load_state_dict(best_state)
            selected_epoch = best["epoch"]
        last = history[-1] if history else {}
        metrics = {
            "selected_epoch": selected_epoch,
            "selection": settings.select,
            "final_train_loss": last.get("loss"),
        }
        if val_cases:
            chosen = next((h for h in history if h["epoch"] == selected_epoch), last)
            metrics.update(
                {
                    "val_cases": [c.case_id for c in val_cases],
                    "val_mae": chosen.get("val_mae"),
                    "val_ssim": chosen.get("val_ssim"),
                    "val_ssim_foreground": chosen.get("val_ssim_foreground"),
                }
            )
        extra = {
            "device": device,
            "hardware": hardware_summary(device),
            "processes": dist.world,
            "threads_per_process": None if cuda else torch.get_num_threads(),
            "amp": bool(cuda and settings.amp),
            "seconds": round(seconds, 1),
            "seconds_per_epoch": round(float(np.mean([h["seconds"] for h in history])), 2) if history else None,
            "parameters": count_parameters(net),
            "command": command,
            **({"unpaired": unpaired_record} if unpaired_record else {}),
        }
        config = build_config(
            settings,
            split or {"mode": "all", "train_cases": [c.case_id for c in train_cases], "val_cases": [], "test_cases": [], "seed": settings.seed},
            data or {},
            metrics,
            extra,
        )
        save_weights(out_dir / MODEL_FILE, net, config)
        if settings.select == "best" and best_state is not None:
            save_weights(out_dir / BEST_FILE, net, config)
        result["config"] = config
    barrier(dist)
    return result
