"""Inference speed of the U-Net against the device's measured peak.

For the shipped model and for the paper's width (base 64), on every available device: FLOPs per
256×256 slice (FlopCounterMode), slices/s at several batch sizes, achieved GFLOP/s and % of the peak
measured in the same run (fp32 matmul on CPU, fp16 matmul on GPU), the time for a 256-slice volume,
and side-by-side variants: channels-last on/off, torch.compile, CPU threads, GPU fp32/fp16/bf16.

    python benchmarks/bench_inference.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_time, flops_per_call, machine, matmul_peak_gflops, print_table  # noqa: E402

from CTtoMRISynthesisLib.model import UNet, UNetConfig, for_inference  # noqa: E402
from CTtoMRISynthesisLib.weights import default_weights_path, load_model  # noqa: E402

SIZE = 256


def models() -> list[tuple[str, torch.nn.Module]]:
    out = []
    path = default_weights_path()
    if path.exists():
        loaded = load_model(path)
        model = loaded.config["model"]
        members = f"{model['members']} × " if model.get("members") else ""  # an ensemble runs every member
        out.append((f"shipped ({members}base {model['base']})", loaded.net))
    else:
        print(f"note: no shipped weights at {path}; benchmarking the paper width only", file=sys.stderr)
    out.append(("paper (base 64)", UNet(UNetConfig(base=64)).eval()))
    return out


def throughput(net, device: str, batch: int, *, channels_last: bool, dtype: torch.dtype | None,
               compiled: bool = False, repeats: int = 3) -> float:
    """Slices per second for batches of ``batch`` slices."""
    in_ch = net.config.in_channels
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(device=device, memory_format=fmt)
    run = torch.compile(net) if compiled else net
    x = torch.rand(batch, in_ch, SIZE, SIZE, device=device).contiguous(memory_format=fmt)

    def call():
        with torch.inference_mode(), torch.autocast(device_type=device, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            return run(x)

    return batch / best_time(call, repeats=repeats, sync=device == "cuda")


def bench_device(device: str, quick: bool) -> None:
    peak_dtype = torch.float16 if device == "cuda" else torch.float32
    peak = matmul_peak_gflops(device, peak_dtype, n=2048 if quick else 4096)
    print(f"\nDevice {device}: measured peak {peak:.0f} GFLOP/s ({peak_dtype} matmul)")
    batches = [1, 2, 4, 16] if quick else [1, 2, 4, 8, 16, 32]
    if device == "cuda":
        batches = [16, 64, 128]
    amp = torch.float16 if device == "cuda" else None
    for name, net in models():
        # Re-measure the peak beside each model: another process on a shared machine lowers it, and
        # the best of the measurements is the machine's real ceiling.
        peak = max(peak, matmul_peak_gflops(device, peak_dtype, n=2048 if quick else 4096))
        example = torch.zeros(1, net.config.in_channels, SIZE, SIZE)
        flops = flops_per_call(net.cpu(), example)
        rows = []
        for batch in batches:
            rate = throughput(net, device, batch, channels_last=True, dtype=amp)
            achieved = rate * flops / 1e9
            rows.append([batch, rate, achieved, 100 * achieved / peak, 256 / rate])
        print_table(f"{name} on {device}: {flops / 1e9:.2f} GFLOP per slice, channels-last"
                    f", peak {peak:.0f} GFLOP/s"
                    f"{', fp16 autocast' if amp else ', fp32'}",
                    ["batch", "slices/s", "GFLOP/s", "% of peak", "256-slice volume (s)"], rows)
        best = max(batches, key=lambda b: b if device == "cuda" else -abs(b - 16))
        variants = [["channels-last", throughput(net, device, best, channels_last=True, dtype=amp)],
                    ["batch norms folded into the convolutions (what synthesis runs: model.for_inference)",
                     throughput(for_inference(net), device, best, channels_last=True, dtype=amp)],
                    ["contiguous (NCHW)", throughput(net, device, best, channels_last=False, dtype=amp)]]
        if device == "cuda":
            variants += [["fp32", throughput(net, device, best, channels_last=True, dtype=None)],
                         ["bf16 autocast", throughput(net, device, best, channels_last=True, dtype=torch.bfloat16)]]
        if not quick and (device == "cuda" or net.config.base <= 16):  # compiling base 64 on CPU takes minutes
            try:
                variants.append(["torch.compile", throughput(net, device, best, channels_last=True, dtype=amp, compiled=True)])
            except Exception as exc:  # compile needs a C++ toolchain; report instead of failing
                variants.append([f"torch.compile failed: {type(exc).__name__}", float("nan")])
        if device == "cpu":
            threads = torch.get_num_threads()
            for n in sorted({1, threads}):
                torch.set_num_threads(n)
                variants.append([f"{n} thread(s)", throughput(net, device, best, channels_last=True, dtype=None)])
            torch.set_num_threads(threads)
        print_table(f"{name} on {device}, batch {best}: variants",
                    ["variant", "slices/s"], [[v, r] for v, r in variants])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes, no torch.compile")
    parser.add_argument("--device", choices=["cpu", "cuda"], action="append",
                        help="benchmark only this device (repeatable; default: the CPU and CUDA if there is one)")
    args = parser.parse_args()
    print(f"Machine: {machine()}")
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--device cuda: this PyTorch sees no CUDA device")
    for device in devices:
        bench_device(device, args.quick)


if __name__ == "__main__":
    main()
