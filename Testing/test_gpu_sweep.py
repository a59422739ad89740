"""experiments/gpu_sweep.sh, the one call a lent GPU machine gets in a session, run in its TINY mode on the CPU.

A lent GPU is rare and its minutes few: a script that hangs or brings nothing back loses them (stop 41's first
call waited on its own GPU logger after training, until its time limit). Here the whole plan runs on phantom
slices (4 patients, 4 folds, 1 step each) with an ``nvidia-smi`` whose ``dmon`` never ends, as the real one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _never_ending_dmon(folder: Path) -> Path:
    """A fake ``nvidia-smi``: ``dmon`` writes its process id and then runs until killed; anything else fails."""
    folder.mkdir()
    fake = folder / "nvidia-smi"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = dmon ]; then echo $$ > "{folder}/dmon.pid"; exec sleep 100000; fi\nexit 1\n')
    fake.chmod(0o755)
    return folder


def _gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") if Path(f"/proc/{pid}/stat").exists() else open(os.devnull) as stat:
            if ") Z " in stat.read():  # a zombie is a finished process not yet reaped
                return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux" or shutil.which("bash") is None, reason="the script runs on Linux bash")
def test_sweep_ends_and_brings_back_what_it_trained(phantom_slices: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    fake = _never_ending_dmon(tmp_path / "bin")
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "TINY": "1", "DEVICE": "cpu",
           "SLOTS": "2", "FOLDS": "4", "FINALS": "0", "BENCH": "0", "OUT": str(out), "WORK": str(tmp_path / "work"),
           "DATA": str(phantom_slices), "PY": sys.executable, "PREDS": "b8e60", "RECIPES": "b8e60 1 4 0 0",
           "TRAIN_OPTS": "--context 0", "ERRMODEL": "m:b8e60 gone:b8e60,bag9", "ERRMODEL_SETS": "shipped,spread only",
           "ENSEMBLES": "one:b8e60 gone2:b8e60,bag9"}
    done = subprocess.run(["bash", "experiments/gpu_sweep.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "all over at" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert "complete: " in done.stdout and "b8e60" in done.stdout.split("complete: ", 1)[1].splitlines()[0]
    # the error model's nested scoring ran on the complete run, its whole table shown; an ensemble naming a run
    # that is not there is said to be incomplete, not attempted
    assert "### errmodel_m_s0.txt" in done.stdout and "| map | 2 | 16 | 20 | 28 | mean | lowest |" in done.stdout
    assert "| spread only |" in done.stdout and "error model gone: not every run is complete" in done.stdout
    # the GPU logger ran and was stopped with the training, not waited for
    assert _gone(int((fake / "dmon.pid").read_text())), "the dmon logger was left running"
    # what comes back: the training records as soon as training ends, the reports, one predictions file per run
    with tarfile.open(out / "early.tgz") as early:
        assert sum(n.endswith("/fold.json") for n in early.getnames()) == 4
    with tarfile.open(out / "results.tgz") as results:
        assert "b8e60/report/summary.csv" in results.getnames()
        # the ensembles named in ENSEMBLES: the complete one scored, the one naming a missing run skipped
        assert "logs/ens_one.txt" in results.getnames() and "logs/ens_gone2.txt" not in results.getnames()
    assert "mean: MAE" in done.stdout
    with np.load(out / "preds_b8e60.npz") as preds:
        assert sorted(k for k in preds.files if k.startswith("syn_")) == ["syn_16", "syn_2", "syn_20", "syn_28"]
        assert preds["syn_2"].dtype == np.uint8 and preds["syn_2"].shape == (6, 256, 256)
