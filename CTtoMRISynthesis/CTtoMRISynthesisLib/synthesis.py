"""Batched slice-by-slice prediction: device choice, inference mode, AMP, channels-last, progress, cancel.

Input is the normalised CT on the model grid as a (z, size, size) float32 array in 0..255; output is
the synthetic MRI on the same grid, 0..255. Slices go through the network in batches with no Python
work per slice; between batches the progress callback is told and the cancel check is asked.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .errors import CancelledError, CTMRIError
from .intensity import head_mask

Progress = Optional[Callable[[float, str], None]]
Cancel = Optional[Callable[[], bool]]

DEVICES = ("auto", "cpu", "cuda", "mps")


def choose_device(name: str = "auto") -> str:
    """'auto' → CUDA, then Apple MPS, then CPU; an explicit device must exist."""
    import torch

    if name not in DEVICES:
        raise CTMRIError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CTMRIError("device 'cuda' requested but no CUDA GPU is available; use --device auto or cpu")
    if name == "mps" and not has_mps:
        raise CTMRIError("device 'mps' requested but Apple MPS is not available; use --device auto or cpu")
    return name


def default_batch_size(device: str) -> int:
    """Batch that keeps the CPU's cores busy without large memory; bigger on a GPU."""
    return 64 if device == "cuda" else 16


def stack_context(volume: np.ndarray, context: int) -> np.ndarray:
    """(z, H, W) → (z, 2·context+1, H, W): each slice with its neighbours, edges repeated."""
    if context == 0:
        return volume[:, None]
    z = volume.shape[0]
    index = np.clip(np.arange(z)[:, None] + np.arange(-context, context + 1)[None, :], 0, z - 1)
    return volume[index]


def predict_slices(
    net,
    ct255: np.ndarray,
    *,
    context: int = 0,
    mask_output: bool = True,
    device: str = "cpu",
    batch_size: int | None = None,
    progress: Progress = None,
    cancel: Cancel = None,
) -> np.ndarray:
    """Run ``net`` over every axial slice of ``ct255`` (z, H, W) and return 0..255 float32 (z, H, W)."""
    import torch

    if ct255.ndim != 3:
        raise CTMRIError(f"expected a (z, H, W) CT array, got shape {ct255.shape}")
    batch_size = batch_size or default_batch_size(device)
    inputs = stack_context(ct255.astype(np.float32) / 255.0, context)
    out = np.empty(ct255.shape, dtype=np.float32)
    cuda = device.startswith("cuda")
    memory_format = torch.channels_last  # faster for convolutions on both CPU (oneDNN) and GPU
    net = net.to(device=device, memory_format=memory_format).eval()
    n = ct255.shape[0]
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            if cancel is not None and cancel():
                raise CancelledError()
            stop = min(start + batch_size, n)
            batch = torch.from_numpy(inputs[start:stop]).to(device, non_blocking=True)
            batch = batch.contiguous(memory_format=memory_format)
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=cuda):
                pred = net(batch)
            out[start:stop] = pred[:, 0].float().mul_(255.0).clamp_(0.0, 255.0).cpu().numpy()
            if progress is not None:
                progress(stop / n, f"synthesised {stop}/{n} slices")
    if mask_output:
        out[~head_mask(ct255)] = 0.0
    return out
