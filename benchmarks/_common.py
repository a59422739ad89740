"""Shared helpers for the benchmark scripts: timing, peak measurement, FLOP counting, table printing."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch


def machine() -> str:
    """One line naming the machine a table was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}; {torch.get_num_threads()} torch threads; {gpu}; torch {torch.__version__}"


def require_data(data: Path, needs: str) -> None:
    """Stop with one line saying what to do when the real data this benchmark measures on is not there."""
    if not data.is_dir():
        sys.exit(f"error: this benchmark measures on {needs} in the real data folder {data}, which is not there; "
                 "set CTMRI_DATA to the data folder (see ../shared/data/README.md)")


def best_time(fn: Callable[[], object], repeats: int = 3, sync: bool = False) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call (seconds)."""
    fn()
    if sync:
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak_gflops(device: str, dtype: torch.dtype, n: int = 4096) -> float:
    """Measured peak: a large square matmul (2·n³ FLOPs) on ``device`` in ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = best_time(lambda: a @ b, repeats=5, sync=device == "cuda")
    return 2 * n**3 / seconds / 1e9


def flops_per_call(module: torch.nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward call, counted by PyTorch's FlopCounterMode (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        module(example)
    return counter.get_total_flops()


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    """A Markdown table on stdout."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |")
