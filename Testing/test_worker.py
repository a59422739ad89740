"""The background worker the Slicer module runs: a real subprocess on real files, progress, errors,
and cancel (the process ends within a second or two and no file is left behind)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import phantoms
from CTtoMRISynthesisLib import worker
from CTtoMRISynthesisLib.worker import WorkerRun


@pytest.fixture(scope="module")
def case_images() -> tuple[sitk.Image, sitk.Image]:
    """A synthetic patient (phantoms.py): 8-bit windowed CT and T2-like MRI, 18 slices of 256×256."""
    images = []
    for array in phantoms.slice_pair(seed=16, slices=18, first_z=-40.0):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.9, 0.9, 5.0))
        images.append(image)
    return images[0], images[1]


def _prepared(tmp_path: Path, ct: sitk.Image, mri: sitk.Image | None) -> WorkerRun:
    run = WorkerRun(tmp_path)
    sitk.WriteImage(ct, str(run.ct_path))
    if mri is not None:
        sitk.WriteImage(mri, str(run.mri_path))
    return run


def test_worker_run_writes_outputs_and_reports_progress(case_images, tiny_weights, tmp_path) -> None:
    run = _prepared(tmp_path, *case_images)
    fractions, steps = [], []
    run.start(sys.executable, has_mri=True, weights=tiny_weights, device="cpu", registration="rigid", threads=1)
    deadline = time.monotonic() + 300
    while run.poll():
        fractions.append(run.fraction)
        steps.append(run.step)
        assert time.monotonic() < deadline, "worker took too long"
        time.sleep(0.05)
    assert run.returncode == 0 and run.succeeded, (run.error, run.log[-20:])
    assert sorted(p.name for p in run.out_dir.iterdir()) == sorted(
        ["synthetic_mri.nrrd", "ct_registered.nrrd", "difference.nrrd", "uncertainty.nrrd", "transform.tfm", "metrics.json",
         ".ctmri-manifest.json"])
    assert run.fraction == 1.0 and all(b >= a for a, b in zip(fractions, fractions[1:]))
    assert any(s.startswith("register") for s in steps) and any(s.startswith("synthes") for s in steps)
    assert json.loads((run.out_dir / "metrics.json").read_text())["device"] == "cpu"
    assert any(line.startswith("DONE ") for line in run.log)
    assert "threads: PyTorch 1, ITK 1" in run.log  # --threads applied in the worker
    run.cleanup()
    assert not run.folder.exists()


def test_worker_reports_a_user_error_in_one_line(tmp_path, tiny_weights) -> None:
    constant = sitk.Image([32, 32, 3], sitk.sitkInt16) + 5
    run = _prepared(tmp_path, constant, None)
    run.start(sys.executable, has_mri=False, weights=tiny_weights, device="cpu")
    assert run.wait(timeout=120) == worker.EXIT_ERROR
    assert not run.succeeded and "constant" in run.error and "\n" not in run.error
    assert not run.out_dir.exists()
    run.cleanup()
    assert not run.folder.exists()


def test_cancel_stops_the_worker_fast_and_leaves_nothing(case_images, tiny_weights, tmp_path) -> None:
    run = _prepared(tmp_path, *case_images)
    run.start(sys.executable, has_mri=True, weights=tiny_weights, device="cpu", registration="rigid")
    deadline = time.monotonic() + 120
    while run.poll() and run.fraction < 0.03:  # wait until it is really working (registering)
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert run.running, run.log
    run.cancel()  # stops the process (no timing asserted here: speed belongs in benchmarks/)
    assert run.finished and run.cancelled and not run.succeeded
    assert run.proc.poll() is not None
    assert not run.out_dir.exists()
    run.cleanup()
    assert not run.folder.exists()
    assert not list(tmp_path.iterdir()), "no temporary file left beside the run either"


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_kill_process_tree_also_kills_the_launchers_child(tmp_path) -> None:
    """PythonSlicer is a launcher that runs the interpreter as a child; cancel must stop both."""
    pid_file = tmp_path / "child.pid"
    launcher = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "child.wait()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher], start_new_session=True)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    worker.kill_process_tree(proc)
    proc.wait(timeout=5)
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        # a killed child stays a zombie until reaped by init; check its state
        status = Path(f"/proc/{child}/status")
        if status.exists() and "State:\tZ" in status.read_text():
            break
        time.sleep(0.05)
    else:
        pytest.fail("the launcher's child survived")


def test_threads_leave_one_core_to_slicer(monkeypatch) -> None:
    """A run started from Slicer takes every core it may use but one (the window keeps one), at least one; the
    cores are those this process may run on (a cpuset), not the machine's."""
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity to ask on this platform")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(worker, "physical_cores", lambda: None)  # not known: the CPUs are counted
    assert worker.available_cores() == 4 and worker.threads_beside_the_gui() == 3
    monkeypatch.setattr(worker, "physical_cores", lambda: 2)  # two cores with two hyperthreads each: one left free
    assert worker.threads_beside_the_gui() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    assert worker.threads_beside_the_gui() == 1


def test_physical_cores_count_hyperthreads_once(tmp_path, monkeypatch) -> None:
    """On Linux the cores are read from the topology of the CPUs this process may use: two hyperthreads of one
    core (the same sibling list) count once; on this machine the count is between 1 and the CPUs."""
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity to ask on this platform")
    assert 1 <= worker.physical_cores() <= worker.available_cores()
    real_read = Path.read_text
    siblings = {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"}

    def topology(path, *args, **kwargs):
        if "thread_siblings_list" in str(path):
            return siblings[int(str(path).split("/cpu")[-1].split("/")[0])] + "\n"
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(Path, "read_text", topology)
    assert worker.physical_cores() == 2 and worker.threads_beside_the_gui() == 1


def test_worker_threads_option_limits_torch_itk_and_numpy() -> None:
    """``--threads N``: PyTorch, ITK and the BLAS behind NumPy (told before they start) each get N threads."""
    pytest.importorskip("torch")  # (the worker runs only where PyTorch is: Slicer's stacks here have none)
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[1]); from CTtoMRISynthesisLib import worker; "
        "print(worker.limit_threads(1)); import torch, SimpleITK as s; "
        "print(torch.get_num_threads(), s.ProcessObject.GetGlobalDefaultNumberOfThreads(), os.environ['OMP_NUM_THREADS'])"
    )
    out = subprocess.run([sys.executable, "-c", code, str(Path(worker.__file__).parents[1])],
                         capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["PyTorch 1, ITK 1", "1 1 1"]


def test_worker_script_imports_only_the_standard_library() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import CTtoMRISynthesisLib.worker; "
        "heavy = {'numpy', 'SimpleITK', 'torch', 'skimage', 'slicer'} & set(sys.modules); print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(Path(worker.__file__).parents[1])],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_protocol_lines_are_parsed(tmp_path) -> None:
    run = WorkerRun(tmp_path)
    for line in ["PROGRESS 0.2500 register", "something else", "PROGRESS oops", "ERROR bad thing: do X", "CANCELLED"]:
        run._handle(line)
    assert run.fraction == 0.25 and run.step == "register"
    assert run.error == "bad thing: do X" and run.cancelled
    assert "something else" in run.log
    run.cleanup()
    assert not run.folder.exists()
    np.testing.assert_equal(worker.EXIT_CANCELLED, 130)


class _StartupInfo:
    """Stands in for ``subprocess.STARTUPINFO``, which exists only on Windows (same fields, same defaults)."""

    def __init__(self) -> None:
        self.dwFlags = 0
        self.wShowWindow = 0


def test_taskkill_runs_without_a_console_window_on_windows(monkeypatch) -> None:
    """The kwargs built for Windows: a hidden STARTUPINFO and CREATE_NO_WINDOW (documented Win32 values)."""
    monkeypatch.setattr(subprocess, "STARTUPINFO", _StartupInfo, raising=False)
    command, options = worker.taskkill_call(4321, platform="nt")
    assert command == ["taskkill", "/F", "/T", "/PID", "4321"]
    assert options["capture_output"] is True and options["check"] is False
    info = options["startupinfo"]
    assert info.dwFlags & 0x00000001, "STARTF_USESHOWWINDOW"
    assert info.wShowWindow == 0, "SW_HIDE"
    assert options["creationflags"] & 0x08000000, "CREATE_NO_WINDOW"
    # the worker itself: hidden console (its interpreter child shares it) in its own process group
    started = worker.hidden_window_options("nt", new_process_group=True)
    assert started["startupinfo"].wShowWindow == 0 and started["startupinfo"].dwFlags & 0x00000001
    assert started["creationflags"] == 0x00000200, "CREATE_NEW_PROCESS_GROUP, and not CREATE_NO_WINDOW"


def test_no_windows_options_elsewhere() -> None:
    assert worker.hidden_window_options("posix", no_console=True) == {}
    command, options = worker.taskkill_call(12, platform="posix")
    assert options == {"capture_output": True, "check": False}
    if os.name != "nt":
        assert worker.hidden_window_options() == {}
