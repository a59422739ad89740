"""End-to-end `ctmri synthesize` cost: stage times and peak memory, for a small and a clinical-size CT.

Cases (each run in a fresh subprocess so that its peak RSS is its own):
  small    — Harvard case 20 (18 slices; CT + MRI, 256×256), with rigid registration
  large    — the Visible Human CT resampled to 512×512×300 (real values, anatomy stretched in z), no MRI
  volume256 — the same CT resampled to 256×256×256, no MRI (the 256-slice end-to-end target)
  noisy256 — volume256 with white noise of 25 HU SD added (seeded): grainier than any training CT, so a model
             with grain matching (grain.py) filters it, the slowest path of that step

    python benchmarks/bench_pipeline.py [--cases small large volume256 noisy256] [--device auto] [--weights FILE]
                                        [--batch-size N [N ...]]

--weights times a candidate model file (default: the shipped model), e.g. before shipping it (aim 5);
--batch-size times each case with each number of slices per batch (default: the pipeline's own choice).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CTMRI_DATA", REPO.parent / "shared" / "data"))


def make_inputs(case: str, folder: Path) -> tuple[Path, Path | None]:
    """Write the case's input files (so that reading them is part of the measurement)."""
    import numpy as np
    import SimpleITK as sitk

    if case == "small":
        harvard = DATA / "harvard_aanlib_ct_mri_2d"
        paths = []
        for modality in ("CT", "MRI"):
            files = sorted(f for f in (harvard / modality).glob("*.png") if f.stem[:-3] == "20")
            image = sitk.GetImageFromArray(np.stack([sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in files]))
            image.SetSpacing((0.9, 0.9, 5.0))
            paths.append(folder / f"{modality.lower()}.nrrd")
            sitk.WriteImage(image, str(paths[-1]), True)
        return paths[0], paths[1]
    ct = sitk.ReadImage(str(DATA / "visible_human_head_ct_mr" / "vm_head_ct.mha"))
    size = (512, 512, 300) if case == "large" else (256, 256, 256)
    spacing = [ct.GetSize()[i] * ct.GetSpacing()[i] / size[i] for i in range(3)]
    big = sitk.Resample(ct, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), spacing, ct.GetDirection(), 0.0, sitk.sitkInt16)
    if case == "noisy256":
        noise = np.random.default_rng(0).normal(0.0, 25.0, size[::-1])
        noisy = sitk.GetImageFromArray(np.round(sitk.GetArrayFromImage(big) + noise).astype(np.int16))
        noisy.CopyInformation(big)
        big = noisy
    path = folder / "ct.nrrd"
    sitk.WriteImage(big, str(path), True)
    return path, None


def run_case(case: str, device: str, weights: str | None = None, batch_size: int | None = None) -> dict:
    """Runs inside the subprocess: read → synthesize → write, timed; returns the stage table."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ct_path, mri_path = make_inputs(case, tmp)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        import torch

        from CTtoMRISynthesisLib.outputs import save_outputs
        from CTtoMRISynthesisLib.pipeline import synthesize
        from CTtoMRISynthesisLib.volumes import read_volume

        t0 = time.perf_counter()
        ct = read_volume(ct_path, "CT")
        mri = read_volume(mri_path, "MRI") if mri_path else None
        read_s = time.perf_counter() - t0
        result = synthesize(ct, mri, weights=weights, device=device, batch_size=batch_size)
        t1 = time.perf_counter()
        save_outputs(result, tmp / "out")
        write_s = time.perf_counter() - t1
        stages = {"read": read_s, **result.stage_seconds, "write": write_s}
        gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        return {
            "case": case,
            "size": list(ct.GetSize()),
            "device": result.device,
            "batch_size": batch_size,
            "stages": stages,
            "total": sum(stages.values()),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_mb": rss_before / 1024,
            "gpu_peak_mb": gpu_peak,
            "grain": {k: v for k, v in result.normalisation.items() if k.startswith("ct_grain")},
        }


def case_line(result: dict) -> str:
    """One line for a finished case: its total, its slowest stage and its peak memory."""
    slowest = max(result["stages"], key=result["stages"].get)
    gpu = f", GPU max allocated {result['gpu_peak_mb']:.0f} MB" if result["gpu_peak_mb"] else ""
    from CTtoMRISynthesisLib.grain import short as grain_short

    grain = result.get("grain") or {}
    matched = (f", CT grain {grain['ct_grain']:.2f} (target {grain['ct_grain_target']:.2f}; {grain_short(grain)})"
               if grain.get("ct_grain") is not None else "")
    return (f"{result['case']} {'×'.join(map(str, result['size']))} ({result['device']}): "
            f"{result['total']:.2f} s, slowest stage {slowest} {result['stages'][slowest]:.2f} s, "
            f"peak RSS {result['peak_rss_mb']:.0f} MB{gpu}{matched}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["small", "volume256", "large"],
                        choices=["small", "volume256", "large", "noisy256"],
                        help="which volumes to time (default: small, volume256, large)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--weights", help="model file to time (default: the shipped model)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[None], metavar="N",
                        help="slices per batch to time (default: the pipeline's own choice)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child, args.device, args.weights, args.batch_size[0])))
        return
    from _common import machine, print_table, require_data

    require_data(DATA, "a Harvard CT/T2 pair and the Visible Human CT")
    # OpenMP threads that spin while idle can cost time on a shared machine; the children inherit this
    print(f"Machine: {machine()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"Model: {args.weights or 'the shipped model'}")
    results = []
    weights = ["--weights", args.weights] if args.weights else []
    for case in args.cases:
        for batch in args.batch_size:
            batch_args = ["--batch-size", str(batch)] if batch else []
            out = subprocess.run([sys.executable, __file__, "--child", case, "--device", args.device, *weights,
                                  *batch_args], capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(case_line(results[-1]), flush=True)  # a run stopped by a time limit still leaves this
    stages = list(dict.fromkeys(s for r in results for s in r["stages"]))
    rows = [[s] + [r["stages"].get(s, 0.0) for r in results] for s in stages]
    rows.append(["**total (s)**"] + [r["total"] for r in results])
    rows.append(["peak RSS (MB)"] + [r["peak_rss_mb"] for r in results])
    if any(r["gpu_peak_mb"] for r in results):
        rows.append(["GPU max allocated (MB)"] + [r["gpu_peak_mb"] or 0.0 for r in results])
    header = ["stage (s)"] + [f"{r['case']} {'×'.join(map(str, r['size']))} ({r['device']}"
                              + (f", batch {r['batch_size']})" if r["batch_size"] else ")") for r in results]
    print_table("ctmri synthesize, stage times and peak memory", header, rows)


if __name__ == "__main__":
    main()
