"""`ctmri batch` throughput: cases per minute with --jobs 1 vs --jobs 2 (or any list) on this machine.

Builds a cohort in a temporary folder and runs the real command (`python -m CTtoMRISynthesisLib.cli batch`)
once per job count, into a fresh output folder each time, timing the whole command (start-up, model
loading and worker start included: what a user waits for). Cohorts:

  sample   — N copies of the in-repository sample (Visible Human CT + MR, 256×256×8), no shared data needed
  harvard  — the 8 Harvard AANLIB patients as CT + MRI volumes (256×256×~18), from the shared data

    python benchmarks/bench_batch.py [--cohort sample|harvard] [--cases 8] [--jobs 1 2] [--registration rigid]

Prints the load average before and after each run: on a shared machine the numbers move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CTMRI_DATA", REPO.parent / "shared" / "data"))
SAMPLE = REPO / "CTtoMRISynthesis" / "Resources" / "SampleData"


def make_cohort(kind: str, count: int, folder: Path) -> Path:
    """Write the cohort's volumes and its manifest; return the manifest path."""
    rows = []
    if kind == "sample":
        for name in ("ct.nrrd", "mri.nrrd"):
            shutil.copy(SAMPLE / name, folder / name)
        rows = [(f"case{k:03d}", "ct.nrrd", "mri.nrrd") for k in range(count)]
    else:
        import numpy as np
        import SimpleITK as sitk

        harvard = DATA / "harvard_aanlib_ct_mri_2d"
        # A slice is <patient><3-digit slice>.png: "2004" is patient 2, "20005" patient 20.
        patients = sorted({f.stem[:-3] for f in (harvard / "CT").glob("*.png")}, key=int)[:count]
        for patient in patients:
            for modality in ("CT", "MRI"):
                files = sorted(f for f in (harvard / modality).glob("*.png") if f.stem[:-3] == patient)
                image = sitk.GetImageFromArray(np.stack([sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in files]))
                image.SetSpacing((0.9, 0.9, 5.0))
                sitk.WriteImage(image, str(folder / f"p{patient}_{modality.lower()}.nrrd"), True)
            rows.append((f"p{patient}", f"p{patient}_ct.nrrd", f"p{patient}_mri.nrrd"))
    manifest = folder / "cases.csv"
    manifest.write_text("id,ct,mri\n" + "".join(",".join(r) + "\n" for r in rows))
    return manifest


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def run(manifest: Path, out: Path, jobs: int, registration: str, device: str) -> dict:
    """Time one `ctmri batch` run; return wall seconds, cases, failures and the mean seconds per case."""
    command = [sys.executable, "-m", "CTtoMRISynthesisLib.cli", "batch", "--manifest", str(manifest),
               "--out-dir", str(out), "--jobs", str(jobs), "--registration", registration, "--device", device,
               "--quiet"]
    before = load()
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode not in (0, 1):
        raise SystemExit(f"batch failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    summary = json.loads((out / "summary.json").read_text())
    seconds = [c["seconds"] for c in summary["cases"] if c["seconds"] is not None]
    return {"jobs": jobs, "wall": wall, "cases": len(summary["cases"]), "failed": summary["error"],
            "case_mean": sum(seconds) / max(1, len(seconds)), "load_before": before, "load_after": load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", choices=["sample", "harvard"], default="sample")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--registration", default="rigid", choices=["rigid", "similarity", "none"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from _common import machine, print_table

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"Machine: {machine()}; {cores} usable cores", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = make_cohort(args.cohort, args.cases, tmp)
        for jobs in args.jobs:
            results.append(run(manifest, tmp / f"out_jobs{jobs}", jobs, args.registration, args.device))
            r = results[-1]  # each run's line as soon as it ends: a run stopped by a time limit still leaves these
            print(f"--jobs {jobs}: {r['cases']} cases, {r['failed']} failed, {r['wall']:.1f} s "
                  f"({60 * r['cases'] / r['wall']:.1f} cases/min), load {r['load_before']} -> {r['load_after']}",
                  flush=True)
    base = results[0]["wall"]
    rows = [[r["jobs"], r["cases"], r["failed"], r["wall"], 60 * r["cases"] / r["wall"], base / r["wall"],
             r["case_mean"], r["load_before"], r["load_after"]] for r in results]
    print_table(
        f"ctmri batch, {args.cohort} cohort, registration {args.registration}, device {args.device}",
        ["--jobs", "cases", "failed", "wall (s)", "cases/min", "speed-up", "s per case (in its worker)",
         "load before", "load after"],
        rows,
    )


if __name__ == "__main__":
    main()
