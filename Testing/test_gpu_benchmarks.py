"""benchmarks/gpu_benchmarks.sh, the product's speed in one call of a lent GPU machine, checked on the CPU.

A step that overruns its limit must cost only that limit, leave its record (what ran, its exit status) and let the
next steps run: stop 42 lost two calls to a benchmark that printed nothing before its limit. Here each step gets a
1-s limit and a stand-in python that takes a minute, so every step is stopped; an unknown step anywhere in the list is
refused before anything runs, and a machine whose python cannot import torch and SimpleITK stops before the steps.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform != "linux" or shutil.which("timeout") is None,
                                reason="the script runs on Linux bash with coreutils' timeout")


def _slow_python(folder: Path, imports: bool = True) -> Path:
    """A stand-in for python: answers the script's import check at once (or fails it, as a machine without
    SimpleITK would), and runs every benchmark for 60 s (so that each step meets its limit whatever this machine's
    speed or data)."""
    folder.mkdir(parents=True)
    fake = folder / "python"
    answer = 'echo "torch (stand-in) cuda False SimpleITK (stand-in)"; exit 0' if imports else \
        'echo "ModuleNotFoundError: No module named SimpleITK"; exit 1'
    fake.write_text(f'#!/bin/sh\nif [ "$1" = -c ]; then {answer}; fi\nexec sleep 60\n')
    fake.chmod(0o755)
    return fake


def _run(tmp_path: Path, steps: str, imports: bool = True) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "DEVICE": "cpu", "STEP_S": "1", "PIPELINE_S": "1", "STEPS": steps,
           "PY": str(_slow_python(tmp_path / "bin", imports))}
    done = subprocess.run(["bash", "benchmarks/gpu_benchmarks.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    return done, out


def test_every_step_is_stopped_at_its_limit_recorded_and_the_next_one_runs(tmp_path: Path) -> None:
    done, out = _run(tmp_path, "pipeline batch_cuda_2 batch_cpu_4,8")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "torch (stand-in)" in (out / "machine.txt").read_text()
    for name, command in (("pipeline", "bench_pipeline.py --cases small volume256 large --device cpu"),
                          ("batch_cuda_2", "bench_batch.py --cohort harvard --cases 8 --jobs 2 --device cpu"),
                          ("batch_cpu_4-8", "bench_batch.py --cohort harvard --cases 8 --jobs 4 8 --device cpu")):
        record = (out / f"{name}.txt").read_text()
        assert command in record.splitlines()[0], record
        assert f"== {name}: exit 124 after" in record.splitlines()[-1], record  # 124: stopped by its limit


def test_an_unknown_step_is_refused_before_any_step_runs(tmp_path: Path) -> None:
    for steps in ("pipline", "pipeline pipline batch_cpu_2", "pipeline batch_cpu_", "batch__2"):
        done, out = _run(tmp_path / steps.replace(" ", "+"), steps)
        bad = next(s for s in steps.split() if s not in ("pipeline", "batch_cpu_2"))
        assert done.returncode == 2 and f"unknown step {bad} " in done.stderr, (steps, done.stderr)
        assert not out.exists(), steps  # nothing ran, not even the first step


def test_a_machine_without_simpleitk_stops_before_the_steps(tmp_path: Path) -> None:
    done, out = _run(tmp_path, "pipeline", imports=False)
    assert done.returncode == 4 and "does not import" in done.stderr
    assert not (out / "pipeline.txt").exists()
