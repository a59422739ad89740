"""The background synthesis: a worker process and the plain-Python handle the Slicer module drives.

Why a process: a synthesis takes seconds to minutes; run in Slicer's GUI thread it would freeze the
application, and a Python thread would still contend for the GIL and could not be stopped at once.
So the module writes the input volumes to a temporary folder, starts this file as a script with
Slicer's Python (``PythonSlicer worker.py --ct … --out-dir …``), reads its progress lines on a timer,
and loads the outputs (:func:`mrml.add_outputs_from_folder`) when it succeeded.

Protocol (stdout, one line each; anything else is log text)::

    PROGRESS <fraction 0..1> <step>
    DONE <output folder>
    ERROR <one-line message>
    CANCELLED

Exit status: 0 done, 2 a user-fixable error (``CTMRIError``), 130 cancelled, 1 a bug.

Cancel: :meth:`WorkerRun.cancel` first creates the cancel file; a watchdog thread in the worker sees it
within 0.1 s and ends the process at once (``os._exit``, even in the middle of a batch), and the
pipeline's own cancel check sees it too. If the process is still alive after a second, the whole
process tree is killed: ``PythonSlicer`` is a launcher that runs the real interpreter as a child, so
killing only the launcher would leave the work running. For that the worker is started in its own
process group (POSIX) / with a new process group and ``taskkill /T``, run without a console window
(Windows); ``psutil`` is used when it is installed. Outputs are written by ``outputs.save_outputs``
(all or nothing) inside the run's temporary folder, which :meth:`WorkerRun.cleanup` removes: a cancel
leaves no files behind.

This file uses only the standard library at import time; the worker imports the pipeline when it runs.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

EXIT_OK, EXIT_BUG, EXIT_ERROR, EXIT_CANCELLED = 0, 1, 2, 130
CANCEL_POLL_S = 0.1


# --------------------------------------------------------------------------------------------------
# The worker (runs in the background process)


def _say(kind: str, text: str = "") -> None:
    line = f"{kind} {' '.join(str(text).split())}".rstrip()  # one line, whatever the message holds
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _watch_cancel_file(path: Path) -> None:
    """Exit the process as soon as ``path`` exists (daemon thread)."""
    while True:
        if path.exists():
            _say("CANCELLED")
            os._exit(EXIT_CANCELLED)
        time.sleep(CANCEL_POLL_S)


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(description="CTtoMRISynthesis background worker (used by the Slicer module)")
    parser.add_argument("--ct", required=True)
    parser.add_argument("--mri")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--weights")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--registration", default="rigid")
    parser.add_argument("--allow-disjoint", action="store_true",
                        help="CT and MRI in unrelated scanner coordinates: start from aligned centres")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--cancel-file", help="the run stops as soon as this file exists")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for PyTorch, ITK and NumPy (default: their own choice, every core)")
    return parser


def available_cores() -> int:
    """The CPUs this process may run on (a SLURM allocation's or taskset's too; every CPU where that cannot be asked)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def physical_cores() -> Optional[int]:
    """The physical cores among the CPUs this process may run on (hyperthreads of one core count once), as PyTorch
    counts cores for its own default; None where that cannot be told (then the CPUs are counted)."""
    if hasattr(os, "sched_getaffinity"):  # Linux: the topology files of the CPUs this process may use
        siblings = set()
        for cpu in os.sched_getaffinity(0):
            try:
                siblings.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
            except OSError:
                return None
        return len(siblings) or None
    try:  # macOS, Windows: psutil where it is installed
        import psutil
    except ImportError:
        return None
    return psutil.cpu_count(logical=False)


def threads_beside_the_gui() -> int:
    """Threads for a run started from Slicer: every physical core this process may use but one, left to Slicer's
    window (a run on all of them makes the views stutter while it works; on hyperthreads it gains little and leaves
    no core free); at least one."""
    return max(1, min(available_cores(), physical_cores() or available_cores()) - 1)


def limit_threads(threads: int) -> str:
    """Before NumPy, SimpleITK and PyTorch start their thread pools: each gets ``threads`` (this worker's
    ``--threads``; each ``ctmri batch --jobs`` worker's share of the cores). Returns what the libraries now use."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return f"PyTorch {torch.get_num_threads()}, ITK {sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cancel_file = Path(args.cancel_file) if args.cancel_file else None
    if cancel_file is not None:
        threading.Thread(target=_watch_cancel_file, args=(cancel_file,), daemon=True).start()
    _say("PROGRESS", "0.0000 starting")
    _import_the_package_not_this_folder()
    from CTtoMRISynthesisLib.errors import CancelledError, CTMRIError

    try:
        _synthesise(args, cancel_file)
    except CancelledError:
        _say("CANCELLED")
        return EXIT_CANCELLED
    except CTMRIError as exc:
        _say("ERROR", str(exc))
        return EXIT_ERROR
    except MemoryError:
        _say("ERROR", "out of memory; use a smaller batch, the CPU device, or a smaller volume")
        return EXIT_ERROR
    except Exception as exc:  # a bug: keep the traceback in the log, one clear line for the user
        import traceback

        traceback.print_exc(file=sys.stdout)
        _say("ERROR", f"unexpected {type(exc).__name__}: {exc}")
        return EXIT_BUG
    _say("DONE", args.out_dir)
    return EXIT_OK


def _import_the_package_not_this_folder() -> None:
    """Run as a script, Python puts this folder first on sys.path; the package's own modules (metrics, model, …)
    must not shadow anything there, so they are imported only as CTtoMRISynthesisLib.*, from the folder above."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    if str(here.parent) not in sys.path:
        sys.path.insert(0, str(here.parent))


def _synthesise(args, cancel_file: Optional[Path]) -> None:
    """Read the inputs, run the pipeline with progress lines and the cancel file, write the outputs."""
    if args.threads:
        # first: the imports below start NumPy's thread pool; log text (the protocol's other lines name their kind)
        print(f"threads: {limit_threads(args.threads)}", flush=True)
    from CTtoMRISynthesisLib.outputs import save_outputs
    from CTtoMRISynthesisLib.pipeline import synthesize
    from CTtoMRISynthesisLib.volumes import read_volume

    ct = read_volume(args.ct, "CT")
    mri = read_volume(args.mri, "MRI") if args.mri else None
    result = synthesize(
        ct,
        mri,
        weights=args.weights,
        device=args.device,
        registration=args.registration,
        allow_disjoint=args.allow_disjoint,
        batch_size=args.batch_size,
        progress=lambda fraction, step: _say("PROGRESS", f"{min(max(float(fraction), 0.0), 1.0):.4f} {step}"),
        cancel=(lambda: cancel_file.exists()) if cancel_file is not None else None,
    )
    _say("PROGRESS", "1.0000 writing outputs")
    save_outputs(result, args.out_dir)


# --------------------------------------------------------------------------------------------------
# The handle (runs in Slicer's GUI process; plain Python, no Qt: the module polls it on a QTimer)


def kill_process_tree(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and every process it started (the launcher's interpreter child included)."""
    if proc.poll() is not None and os.name != "nt":
        # The launcher has gone; its process group may still hold the interpreter.
        _killpg(proc)
        return
    try:
        import psutil  # not a requirement; used when present

        try:
            parent = psutil.Process(proc.pid)
            for child in parent.children(recursive=True):
                child.kill()
            parent.kill()
        except psutil.NoSuchProcess:
            pass
    except ImportError:
        pass
    if os.name == "nt":
        command, options = taskkill_call(proc.pid)
        subprocess.run(command, **options)
    else:
        _killpg(proc)
    if proc.poll() is None:
        proc.kill()


# Windows constants (documented values; the subprocess module defines them only on Windows).
STARTF_USESHOWWINDOW, SW_HIDE = 0x00000001, 0
CREATE_NEW_PROCESS_GROUP, CREATE_NO_WINDOW = 0x00000200, 0x08000000


def hidden_window_options(platform: Optional[str] = None, *, no_console: bool = False,
                          new_process_group: bool = False) -> dict:
    """Keyword arguments for ``subprocess`` that keep a console window from flashing up on Windows.

    Slicer is a GUI application without a console: a console program it starts (PythonSlicer, taskkill)
    would get a new console window. A STARTUPINFO with ``SW_HIDE`` hides that window; ``no_console``
    (CREATE_NO_WINDOW) gives the process no console at all (right for taskkill, which starts nothing; not for
    the PythonSlicer launcher, whose interpreter child would then get a visible console of its own).
    ``platform`` defaults to ``os.name``; on other systems the result is empty.
    """
    if (platform or os.name) != "nt":
        return {}
    info = subprocess.STARTUPINFO()
    info.dwFlags |= getattr(subprocess, "STARTF_USESHOWWINDOW", STARTF_USESHOWWINDOW)
    info.wShowWindow = getattr(subprocess, "SW_HIDE", SW_HIDE)
    flags = 0
    if no_console:
        flags |= getattr(subprocess, "CREATE_NO_WINDOW", CREATE_NO_WINDOW)
    if new_process_group:
        flags |= getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", CREATE_NEW_PROCESS_GROUP)
    return {"startupinfo": info, "creationflags": flags}


def taskkill_call(pid: int, platform: Optional[str] = None) -> tuple[list, dict]:
    """The ``subprocess.run`` call that kills process ``pid`` and its children on Windows, without a window."""
    options = dict(capture_output=True, check=False)
    options.update(hidden_window_options(platform, no_console=True))
    return ["taskkill", "/F", "/T", "/PID", str(int(pid))], options


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # started with start_new_session: pgid == pid
    except (ProcessLookupError, PermissionError, OSError):
        pass


class WorkerRun:
    """One background synthesis: its temporary folder, process, progress, cancel and clean-up.

    Typical use (what the Slicer widget does)::

        run = WorkerRun(temp_root)
        write the CT (and MRI) to run.ct_path (run.mri_path)
        run.start(python, has_mri=True, weights=..., device=..., registration=..., env=...)
        every 200 ms: run.poll(); show run.fraction and run.step; when run.finished: ...
        run.succeeded → load run.out_dir; run.error → show it; always run.cleanup()
    """

    def __init__(self, temp_root: Optional[str | Path] = None) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="CTtoMRISynthesis-", dir=temp_root))
        self.ct_path = self.folder / "input_ct.nrrd"
        self.mri_path = self.folder / "input_mri.nrrd"
        self.out_dir = self.folder / "output"
        self.cancel_path = self.folder / "cancel"
        self.proc: Optional[subprocess.Popen] = None
        self.fraction = 0.0
        self.step = "waiting"
        self.error: Optional[str] = None
        self.log: list[str] = []
        self.returncode: Optional[int] = None
        self.cancelled = False
        self.started_at: Optional[float] = None
        self._lines: queue.Queue = queue.Queue()
        self._reader: Optional[threading.Thread] = None

    def command(self, python: str, *, has_mri: bool, weights=None, device="auto", registration="rigid",
                allow_disjoint: bool = False, batch_size=None, threads=None) -> list[str]:
        cmd = [str(python), str(Path(__file__).resolve()), "--ct", str(self.ct_path), "--out-dir", str(self.out_dir),
               "--device", device, "--registration", registration, "--cancel-file", str(self.cancel_path)]
        if has_mri:
            cmd += ["--mri", str(self.mri_path)]
        if weights:
            cmd += ["--weights", str(weights)]
        if allow_disjoint:
            cmd += ["--allow-disjoint"]
        if batch_size:
            cmd += ["--batch-size", str(int(batch_size))]
        if threads:
            cmd += ["--threads", str(int(threads))]
        return cmd

    def start(self, python: str = sys.executable, *, has_mri: bool, env: Optional[dict] = None, **options) -> None:
        """Start the worker (non-blocking). ``env``: the environment (Slicer: its startup environment)."""
        if self.proc is not None:
            raise RuntimeError("this run was already started")
        kwargs: dict = {}
        if os.name == "nt":  # a hidden console (shared with the launcher's child), its own process group
            kwargs.update(hidden_window_options(new_process_group=True))
        else:
            kwargs.update(start_new_session=True)  # own process group: the whole tree can be killed
        environment = dict(os.environ if env is None else env)
        environment["PYTHONUNBUFFERED"] = "1"
        environment.setdefault("PYTHONIOENCODING", "utf-8")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(python, has_mri=has_mri, **options),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, encoding="utf-8", errors="replace", env=environment, **kwargs,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\r\n"))
        self.proc.stdout.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.returncode is None

    @property
    def finished(self) -> bool:
        return self.returncode is not None

    @property
    def succeeded(self) -> bool:
        return self.returncode == EXIT_OK and not self.cancelled and self.error is None

    def poll(self) -> bool:
        """Read what the worker said since the last call (never blocks); True while it runs."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            self._handle(line)
        if self.proc is not None and self.returncode is None:
            code = self.proc.poll()
            if code is not None and (self._reader is None or not self._reader.is_alive()):
                while not self._lines.empty():
                    self._handle(self._lines.get_nowait())
                self.returncode = code
                if code == EXIT_CANCELLED or self.cancelled:
                    self.cancelled = True
                elif code != EXIT_OK and self.error is None:
                    self.error = f"the synthesis process ended with status {code}; see the log for details"
        return self.running

    def _handle(self, line: str) -> None:
        kind, _, rest = line.partition(" ")
        if kind == "PROGRESS":
            value, _, step = rest.partition(" ")
            try:
                self.fraction = float(value)
                self.step = step or self.step
                return
            except ValueError:
                pass
        elif kind == "ERROR":
            self.error = rest
        elif kind == "CANCELLED":
            self.cancelled = True
        elif kind == "DONE":
            self.step = "done"
        self.log.append(line)

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Block until the worker ends (tests and scripts); returns its exit status (None on timeout)."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if end is not None and time.monotonic() > end:
                return None
            time.sleep(0.05)
        return self.returncode

    def cancel(self, grace_s: float = 1.0) -> None:
        """Stop the worker: cancel file first, then kill its whole process tree after ``grace_s``."""
        self.cancelled = True
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                kill_process_tree(self.proc)  # a launcher that already ended may leave its child
            self.poll()
            return
        try:
            self.cancel_path.touch()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        kill_process_tree(self.proc)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if self._reader is not None:
            self._reader.join(timeout=2)
        self.poll()

    def cleanup(self) -> None:
        """Remove the temporary folder (inputs, outputs, partial files). Cancels a run still going."""
        if self.proc is not None and self.proc.poll() is None:
            self.cancel()
        for _ in range(20):  # Windows may hold files of a just-killed process for a moment
            shutil.rmtree(self.folder, ignore_errors=True)
            if not self.folder.exists():
                return
            time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
