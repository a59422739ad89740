"""Batched slice-by-slice prediction: device choice, inference mode, AMP, channels-last, progress, cancel.

Input is the normalised CT on the model grid as a (z, size, size) float32 array in 0..255; output is
the synthetic MRI on the same grid, 0..255. Slices go through the network in batches with no Python
work per slice; between batches the progress callback is told and the cancel check is asked. When memory
runs out (``torch.cuda.OutOfMemoryError`` and its MPS/CPU equivalents) the batch is halved and retried; a
GPU too small even for one slice hands the rest to the CPU. Both are reported as warnings.

Uncertainty: :func:`predict_volume` also returns a per-voxel spread (0..255 scale, 0 outside the head).
It adds what the model says of itself — a model trained with a likelihood predicts a scale per pixel: a
Laplace b (variance 2·b²) or a Gaussian σ (variance σ²) — and, with left-right flip test-time
augmentation, the variance of the two predictions: ``spread = sqrt(mean(variance) + var(predictions))``. A one-channel model without flip
has no spread to give (zeros). An ensemble gives its members' SD; a model file with an error model
(:mod:`error_model`) turns that into the predicted absolute error, which tracks the real error better.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .errors import CancelledError, CTMRIError
from .grain import describe as describe_grain, match_grain
from .intensity import head_mask, standardise_ct

Progress = Optional[Callable[[float, str], None]]
Cancel = Optional[Callable[[], bool]]

DEVICES = ("auto", "cpu", "cuda", "mps")
_CHOOSE_ANOTHER_DEVICE = "choose the device auto or cpu (--device; in Slicer, Options > Device)"
MAX_SPREAD = 127.5  # the largest SD a quantity confined to 0..255 can have


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
        raise CTMRIError(f"device 'cuda' requested but no CUDA GPU is available; {_CHOOSE_ANOTHER_DEVICE}")
    if name == "mps" and not has_mps:
        raise CTMRIError(f"device 'mps' requested but Apple MPS is not available; {_CHOOSE_ANOTHER_DEVICE}")
    return name


def default_batch_size(device: str) -> int:
    """Slices per batch: 2 on a CPU, 64 on a GPU.

    On the CPU, small batches keep the activations in cache. bench_inference.py --quick, shipped ensemble, 2 cores:
    18.0 slices/s with batch 2 against 15.5 (batch 1), 12.3 (4) and 11.6 (16) on an AMD EPYC VM; on the Intel Xeon
    VM of benchmarks/README.md's tables 22.1 (batch 1) against 17.7 (4). End to end, bench_pipeline.py --cases volume256
    --batch-size 4 2 1 4 2 1 (EPYC): synthesis 28.2 / 31.2 s with batch 2, 30.6 / 31.9 with 1, 36.1 / 35.0 with 4.
    """
    return 64 if device == "cuda" else 2


def stack_context(volume: np.ndarray, context: int) -> np.ndarray:
    """(z, H, W) → (z, 2·context+1, H, W): each slice with its neighbours, edges repeated."""
    if context == 0:
        return volume[:, None]
    z = volume.shape[0]
    index = np.clip(np.arange(z)[:, None] + np.arange(-context, context + 1)[None, :], 0, z - 1)
    return volume[index]


def _is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the RuntimeError MPS and the CPU allocator raise when memory runs out."""
    import torch

    # torch.OutOfMemoryError exists from PyTorch 2.4; torch.cuda.OutOfMemoryError (its older name) since 1.13
    if isinstance(exc, getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _batch_to(batch: np.ndarray, device: str, memory_format):
    """A numpy batch as a tensor on ``device`` (one place, so tests can simulate a GPU on a CPU machine)."""
    import torch

    return torch.from_numpy(batch).to(device, non_blocking=True).contiguous(memory_format=memory_format)


def _free_device_memory(device: str) -> None:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device == "mps" and getattr(torch, "mps", None) is not None and hasattr(torch.mps, "empty_cache"):
        torch.mps.empty_cache()


def preprocessing_options(prep: dict) -> dict:
    """:func:`predict_slices` keyword arguments recorded in a weights config's ``preprocessing`` (one place,
    so every caller applies a model the way it was trained; older files lack the newer keys)."""
    return {
        "context": int(prep.get("context_slices", 0)),
        "mask_output": bool(prep.get("mask_output", True)),
        "ct_standardise": prep.get("ct_standardise"),
        "ct_grain_target": prep.get("ct_grain_target"),
        "ct_grain_max_blur": prep.get("ct_grain_max_blur_px"),
        "ct_grain_filter": prep.get("ct_grain_filter", "gaussian"),
        "flip_tta": bool(prep.get("flip_tta", False)),
    }


@dataclass
class Prediction:
    """A volume's synthetic MRI and the spread of that prediction, both (z, H, W) float32 on 0..255."""

    mean: np.ndarray
    spread: Optional[np.ndarray]  # None once the pipeline finds the model has none to give (gives_spread)
    head: np.ndarray  # bool (z, H, W): where the output may be non-zero


def _mean_and_variance(stack):
    """Mean and (population) variance over the first dimension of a short stack of predictions.

    Written out because ``Tensor.var(0)`` over a leading dimension of 2–4 took as long as a network pass on
    the CPU (54 ms for a batch of four 256² slices, against 1 ms this way; torch 2.13).
    """
    mean = stack.mean(0)
    return mean, (stack - mean).square().mean(0)


def _flip_outputs(net, batch, flip_tta: bool):
    """(1 or 2, N, C, H, W): the network's output for the batch and, with flip TTA, for its mirror image
    (flipped back)."""
    import torch

    outputs = [net(batch)]
    if flip_tta:
        outputs.append(torch.flip(net(torch.flip(batch, dims=[-1])), dims=[-1]))
    return torch.stack(outputs)


def _predict_batch(net, batch, flip_tta: bool):
    """(mean, spread) of one batch on the 0..1 scale: flip TTA and the model's own scale (if any) combined.

    An ensemble (``net.members``): the mean of its members' predictions (each flip-averaged) and, as the
    spread, their SD: the members' disagreement, the one map found to track the held-out error (ensemble.py).
    """
    import torch

    from .model import VARIANCE_PER_SCALE2, laplace_scale

    members = getattr(net, "members", None)
    if members is not None:
        # each member's flip-averaged prediction within 0..1 first, as each one alone would give it (and as
        # cross-validated); the members' own scales are not used, so they are not computed
        mus = torch.stack([_flip_outputs(member, batch, flip_tta)[:, :, 0].float().mean(0) for member in members])
        mean, variance = _mean_and_variance(mus.clamp(0.0, 1.0))
        return mean, variance.sqrt()

    outputs = _flip_outputs(net, batch, flip_tta)
    mean, variance = _mean_and_variance(outputs[:, :, 0].float())
    if outputs[0].shape[1] > 1:
        scales = laplace_scale(outputs[:, :, 1])
        per_scale2 = VARIANCE_PER_SCALE2[getattr(getattr(net, "config", None), "scale", "laplace")]
        variance = variance + (per_scale2 * scales**2).mean(0)
    return mean, variance.sqrt()


def gives_spread(net, flip_tta: bool) -> bool:
    """Whether :func:`_predict_batch` has a spread to give for ``net``: an ensemble's members, the model's own scale
    channel, or flip TTA. A one-channel single model without flip gives zeros, which say nothing."""
    config = getattr(net, "config", None)
    return (getattr(net, "members", None) is not None or int(getattr(config, "out_channels", 1)) > 1
            or bool(flip_tta))


def predict_slices(net, ct255: np.ndarray, **kwargs) -> np.ndarray:
    """The synthetic MRI alone: :func:`predict_volume`'s ``mean`` (same arguments)."""
    return predict_volume(net, ct255, **kwargs).mean


def predict_volume(
    net,
    ct255: np.ndarray,
    *,
    context: int = 0,
    mask_output: bool = True,
    ct_standardise: Optional[float] = None,
    ct_grain_target: Optional[float] = None,
    ct_grain_max_blur: Optional[float] = None,
    ct_grain_filter: str = "gaussian",
    flip_tta: bool = False,
    device: str = "cpu",
    batch_size: int | None = None,
    progress: Progress = None,
    cancel: Cancel = None,
    info: Optional[dict] = None,
) -> Prediction:
    """Run ``net`` over every axial slice of ``ct255`` (z, H, W): the synthetic MRI and its spread, 0..255.

    Out of memory: the batch is halved and the same slices tried again; on a GPU that fails even with
    one slice per batch, the rest is done on the CPU. Each step is announced through ``progress`` and
    summarised in ``info`` (when a dict is given): ``info["device"]`` and ``info["batch_size"]`` as
    finally used, ``info["warnings"]`` (list of messages). ``ct_standardise`` (from the weights config)
    maps the CT's brain median to that value first (:func:`intensity.standardise_ct`); before that,
    ``ct_grain_target`` blurs a CT grainier than the training CTs down to their grain
    (:func:`grain.match_grain`; by at most ``ct_grain_max_blur`` px when given; ``ct_grain_filter="median"``: a
    share of its 3 × 3 median instead; ``"median35"``: then of its 5 × 5 median where the 3 × 3 is not enough);
    the output mask is always taken from the CT as given. A model file's error model, if any, is applied afterwards
    (:func:`error_model.apply`).
    """
    if ct255.ndim != 3:
        raise CTMRIError(f"expected a (z, H, W) CT array, got shape {ct255.shape}")
    info = {} if info is None else info
    info.setdefault("warnings", [])
    network_ct = _as_trained(ct255, ct_grain_target, ct_grain_max_blur, ct_standardise, info, ct_grain_filter)
    runner = _Batches(net, device, max(1, int(batch_size or default_batch_size(device))), flip_tta, info["warnings"])
    out, spread = runner.run(stack_context(network_ct.astype(np.float32) / 255.0, context), progress, cancel)
    info["device"], info["batch_size"] = runner.device, runner.batch_size
    head = head_mask(ct255) if mask_output else np.ones(out.shape, dtype=bool)  # from the CT as given
    out[~head] = 0.0
    spread[~head] = 0.0
    return Prediction(mean=out, spread=spread, head=head)


def cpu_threads() -> int:
    """The CPU threads this process may use: PyTorch's setting, which a batch worker sets to its share of the
    cores and Slicer leaves at the machine's count (the grain matching's medians and the error map use it)."""
    import torch

    return torch.get_num_threads()


def _as_trained(ct255: np.ndarray, grain_target: Optional[float], grain_max_blur: Optional[float],
                standardise: Optional[float], info: dict, grain_filter: str = "gaussian") -> np.ndarray:
    """The CT as the model file asks the network to see it: its grain matched, then its brain median
    standardised (each only when the file records it); what was done goes into ``info``."""
    if grain_target is not None:
        ct255, note = match_grain(ct255, grain_target, grain_max_blur, grain_filter, threads=cpu_threads())
        info.update(note)
        done = describe_grain(note)
        if done:
            info["warnings"].append(
                f"the CT is grainier than the CTs the model was trained on (noise grain {note['ct_grain']:.1f} "
                f"against at most {note['ct_grain_target']:.1f}): {done} before synthesis")
    if standardise is not None:
        ct255, note = standardise_ct(ct255, standardise)
        info.update(note)
    return ct255


class _Batches:
    """The network run over a volume's slices in batches, stepping down when memory runs out: half the
    batch and the same slices again; on a GPU that fails with one slice, the rest on the CPU."""

    def __init__(self, net, device: str, batch_size: int, flip_tta: bool, notes: list):
        import torch

        from .model import for_inference

        self.memory_format = torch.channels_last  # faster for convolutions on both CPU (oneDNN) and GPU
        # batch norms folded into their convolutions, on a copy: the caller's network (a training run's) is unchanged
        self.net = for_inference(net).to(device=device, memory_format=self.memory_format)
        self.device, self.batch_size, self.flip_tta, self.notes = device, batch_size, flip_tta, notes

    def run(self, inputs: np.ndarray, progress: Progress, cancel: Cancel) -> tuple[np.ndarray, np.ndarray]:
        """(synthetic MRI, spread), each (z, H, W) float32 on 0..255, of the stacked inputs (z, C, H, W)."""
        import torch

        n = inputs.shape[0]
        first_device, first_batch = self.device, min(self.batch_size, max(n, 1))
        out = np.empty((n, *inputs.shape[2:]), dtype=np.float32)
        spread = np.empty_like(out)
        start = 0
        with torch.inference_mode():
            while start < n:
                if cancel is not None and cancel():
                    raise CancelledError()
                stop = min(start + self.batch_size, n)
                if not self._predict(inputs, start, stop, out, spread):
                    self._step_down(start, stop, n, progress)
                    continue
                start = stop
                if progress is not None:
                    progress(stop / n, f"synthesised {stop}/{n} slices")
        if self.device == first_device and self.batch_size < first_batch:
            self.notes.append(
                f"out of {self.device} memory with {first_batch} slices per batch; finished with {self.batch_size} "
                f"per batch (--batch-size {self.batch_size} starts there)"
            )
        return out, spread

    def _predict(self, inputs: np.ndarray, start: int, stop: int, out: np.ndarray, spread: np.ndarray) -> bool:
        """Slices ``start:stop`` into ``out`` and ``spread``; False when memory ran out."""
        import torch

        try:
            batch = _batch_to(inputs[start:stop], self.device, self.memory_format)
            cuda = self.device.startswith("cuda") and torch.cuda.is_available()
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=cuda):
                pred, pred_spread = _predict_batch(self.net, batch, self.flip_tta)
            out[start:stop] = pred.mul_(255.0).clamp_(0.0, 255.0).cpu().numpy()
            # an SD of values confined to 0..255 cannot exceed half that range
            spread[start:stop] = pred_spread.mul_(255.0).clamp_(0.0, MAX_SPREAD).cpu().numpy()
        except (RuntimeError, MemoryError) as exc:
            if not (isinstance(exc, MemoryError) or _is_out_of_memory(exc)):
                raise
            return False  # freed by the caller, once this frame (and the tensors the exception holds) is gone
        return True

    def _step_down(self, start: int, stop: int, n: int, progress: Progress) -> None:
        """After running out of memory on slices ``start:stop``: a smaller batch, or the CPU, or an error."""
        _free_device_memory(self.device)
        if stop - start > 1:
            self.batch_size = max(1, (stop - start) // 2)
            if progress is not None:
                progress(start / n, f"out of memory on {self.device}: retrying with {self.batch_size} slices per batch")
            return
        if self.device == "cpu":
            raise CTMRIError(
                "out of memory even with one slice per batch on the CPU; close other programs or use a "
                "machine with more memory"
            )
        self.notes.append(
            f"out of {self.device} memory even with one slice per batch; the remaining slices "
            f"({start}..{n - 1}) were synthesised on the CPU (slower)"
        )
        self.device, self.batch_size = "cpu", default_batch_size("cpu")
        self.net = self.net.to(device="cpu", memory_format=self.memory_format)
        if progress is not None:
            progress(start / n, "out of GPU memory: continuing on the CPU")
