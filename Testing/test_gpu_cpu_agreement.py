"""benchmarks/gpu_cpu_agreement.py, the record behind "the GPU gives the CPU's synthetic MRI"
(README, "Speed and memory"; benchmarks/README.md).

Its GPU row needs a GPU (a lent one ran it); here it runs CPU against CPU, which must agree exactly and score each
patient as the report does, and it refuses CUDA on a machine without one, saying where to run it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_cpu_agreement.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_cpu_against_cpu_agrees_exactly_and_scores_each_patient(phantom_slices: Path) -> None:
    pytest.importorskip("torch")
    done = run("--data", str(phantom_slices), "--device", "cpu", "--against", "cpu", "--cases", "16", "28")
    assert done.returncode == 0, done.stderr
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| 16 ") or line.startswith("| 28 ")]
    assert len(rows) == 2
    for row in rows:
        assert row[2:7] == ["0", "0", "0", "0", "0"], row  # synthetic MRI and uncertainty: mean, max, share > 1
        assert 0 < float(row[7]) < 255  # the MAE against the phantom's MRI
    assert "largest |cpu − cpu| of the synthetic MRI in any head: 0.000 grey levels" in done.stdout


def test_cuda_on_a_machine_without_one_says_so() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    for args in (("--device", "cuda"), ("--device", "cpu", "--against", "cuda")):  # either side, before any work
        done = run(*args)
        assert done.returncode == 2 and "this machine has no CUDA GPU: run it where there is one" in done.stderr, args
