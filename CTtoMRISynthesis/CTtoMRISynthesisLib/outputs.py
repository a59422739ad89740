"""The output folder of a run, written all or nothing.

Which files and folders a run owns (its manifest, the marker of its ``dicom/`` and ``pictures/`` folders), the checks
made before any work (a folder that cannot be written, a file of the user's named like an output, an input that an
earlier run wrote there), and :func:`save_outputs`: every file written into a temporary folder inside ``--out-dir``,
then moved into place together, Ctrl-C held meanwhile (``interrupts.py``), the earlier run's outputs put back if the
move fails. ``synthesize``, ``batch``, the DICOM and picture writers and the Slicer worker all write through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import SimpleITK as sitk

from .errors import CTMRIError
from .interrupts import signals_held
from .volumes import write_volume

if TYPE_CHECKING:  # only for the type hints: the pipeline imports nothing from here
    from .pipeline import SynthesisResult

OUTPUT_FILES = {
    "synthetic_mri": "synthetic_mri.nrrd",
    "ct_registered": "ct_registered.nrrd",
    "difference": "difference.nrrd",
    "uncertainty": "uncertainty.nrrd",
    "transform": "transform.tfm",
    "metrics": "metrics.json",
}
#: folders an extra writer of save_outputs may add (e.g. DICOM series); replaced like the files above, but only
#: when they carry OUTPUT_MARKER: a folder of that name the user made (say the study's own ``dicom/``) is never
#: touched, and a run that would write one there is refused
OUTPUT_FOLDERS = {"dicom": "dicom", "pictures": "pictures"}
OUTPUT_MARKER = ".ctmri-output"
#: the list of OUTPUT_FILES the last run wrote into its --out-dir; only a file it lists is ever replaced or
#: removed, so a file of the user's that happens to share a name (their own ``ct_registered.nrrd`` or
#: ``metrics.json``, perhaps the very CT being read) is never touched
OUTPUT_MANIFEST = ".ctmri-manifest.json"


def _ours(folder: Path) -> bool:
    """True for an output folder an earlier run wrote (it carries the marker), never for anything else."""
    return folder.is_dir() and not folder.is_symlink() and (folder / OUTPUT_MARKER).is_file()


def _our_files(out_dir: Path) -> set:
    """Names of OUTPUT_FILES that an earlier run wrote into ``out_dir``, and so may be replaced or removed.

    Read from OUTPUT_MANIFEST; a damaged one lists nothing (nothing is then replaced: the safe side). A folder
    without one but with an earlier version's ``metrics.json`` (written before the manifest existed) counts
    as that version's output folder: its files of those names are its outputs.
    """
    manifest = out_dir / OUTPUT_MANIFEST
    if manifest.is_file() and not manifest.is_symlink():
        try:
            listed = json.loads(manifest.read_text())["files"]
            return {name for name in listed if name in OUTPUT_FILES.values()}
        except (OSError, ValueError, KeyError, TypeError):
            return set()
    if _written_by_ctmri(out_dir / OUTPUT_FILES["metrics"]):
        return {name for name in OUTPUT_FILES.values() if (out_dir / name).is_file()}
    return set()


def is_run_output(path: str | Path) -> bool:
    """Whether ``path`` is a file an earlier run wrote into its folder (or that run's list of them)."""
    path = Path(path)
    return (path.name == OUTPUT_MANIFEST and path.is_file()) or path.name in _our_files(path.parent)


def _written_by_ctmri(metrics: Path) -> bool:
    """True for a ``metrics.json`` an earlier ctmri wrote (:meth:`SynthesisResult.summary` always has these keys)."""
    if not metrics.is_file() or metrics.is_symlink():
        return False
    try:
        content = json.loads(metrics.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and {"stage_seconds", "normalisation", "weights"} <= content.keys()


def check_outputs_free(out_dir: str | Path, folders=()) -> set:
    """Refuse, writing nothing, when ``out_dir`` holds a file of the user's named like one of OUTPUT_FILES,
    or a file or folder of theirs named like one of ``folders`` (names of OUTPUT_FOLDERS) this run would write.

    All output file names count, not only those this run writes: an earlier run's files that this run does
    not produce are removed (the folder never mixes two runs), and a user's file must not be mistaken for one.
    Returns the names of OUTPUT_FILES an earlier run wrote there (:func:`_our_files`).
    """
    out_dir = Path(out_dir)
    ours = _our_files(out_dir)
    for name in OUTPUT_FILES.values():
        path = out_dir / name
        if (path.exists() or path.is_symlink()) and name not in ours:
            raise CTMRIError(
                f"{path} exists and was not written by ctmri, whose outputs use that name: choose another "
                "--out-dir, or move it away"
            )
    for name in folders:
        path = out_dir / name
        if (path.exists() or path.is_symlink()) and not _ours(path):
            raise CTMRIError(
                f"{path} exists and was not written by ctmri (it would be replaced by the {name} outputs): choose "
                "another --out-dir, or move it away"
            )
    return ours


def check_out_dir(out_dir: str | Path, folders=()) -> None:
    """Fail early, before any work, when a run cannot write its outputs into ``out_dir``.

    Writes nothing. :func:`check_writable`, then :func:`check_outputs_free` (a file or folder of the user's
    where this run would write its files or one of ``folders``, names of OUTPUT_FOLDERS).
    """
    check_writable(out_dir)
    check_outputs_free(out_dir, folders)


def check_inputs_kept(out_dir: str | Path, inputs) -> None:
    """Refuse, writing nothing, when an input is an earlier run's output in ``out_dir`` (its
    ``ct_registered.nrrd``, its ``dicom/ct_registered`` series): this run replaces or removes those, and would
    delete the very file it reads. ``inputs``: paths (None skipped)."""
    out_dir = Path(out_dir)
    replaced = [out_dir / name for name in _our_files(out_dir)]
    replaced += [out_dir / name for name in OUTPUT_FOLDERS.values() if _ours(out_dir / name)]
    for given in inputs:
        if given is None or str(given) == "":
            continue
        path = _resolved(Path(given))
        for output in replaced:
            target = _resolved(output)
            if path == target or target in path.parents:
                raise CTMRIError(
                    f"the input {given} is an output of an earlier run in {out_dir}, which this run replaces or "
                    "removes: copy it out of that folder first, or choose another --out-dir"
                )


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except OSError:  # a loop of links, say: compared as written
        return path.absolute()


def check_writable(out_dir: str | Path, flag: str = "--out-dir") -> None:
    """Fail early when ``out_dir`` obviously cannot be created or written.

    Writes nothing. Catches an output folder that is an existing file or lies under one, a folder name
    longer than the file system allows, (for users other than root) a folder without write permission.
    Anything else (a full disk, a read-only mount) still fails cleanly in :func:`save_outputs`. ``flag``: the
    option the messages name (training and reports write into ``--out``).
    """
    out_dir = Path(out_dir)
    for part in out_dir.parts:
        if len(os.fsencode(part)) > 255:  # NAME_MAX of every common file system
            raise CTMRIError(
                f"cannot create the output folder: the name {part[:24]}... is longer than the 255 bytes file "
                f"systems allow; choose a shorter {flag}"
            )
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise CTMRIError(f"the output folder {out_dir} is an existing file; choose a folder for {flag}")
        existing = _nearest_existing(out_dir)
        if not existing.is_dir():
            raise CTMRIError(
                f"cannot create the output folder {out_dir}: {existing} is a file, not a folder; choose another {flag}"
            )
    except OSError as exc:  # e.g. a path too long as a whole, a broken mount
        raise CTMRIError(f"cannot use {out_dir} as the output folder: {exc.strerror or exc}; choose another {flag}") from exc
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CTMRIError(f"cannot write in {existing} (no permission); choose a writable {flag}")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def save_outputs(
    result: SynthesisResult, out_dir: str | Path, extra_writer: Optional[Callable[[Path], dict]] = None
) -> dict:
    """Write the result's files into ``out_dir``; all or nothing, nothing written anywhere else.

    ``extra_writer(tmp)`` (optional) writes more outputs into the temporary folder and returns
    {kind: name} of what it wrote there (names from ``OUTPUT_FOLDERS``); they are committed with the rest.

    Files are written into a temporary folder inside ``out_dir`` and moved into place only when all
    were written, so a failure or cancel never leaves half-written outputs; the temporary folder, and
    ``out_dir`` itself if this call created it, are removed on failure. Output files of an earlier run
    that this run does not produce (e.g. ``difference.nrrd`` of a run with an MRI) are removed, so the
    folder never mixes two runs; if moving in fails, the earlier files are put back. Ctrl-C during the
    few renames is held until they are done. Returns {kind: path}.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    existing = _nearest_existing(out_dir)
    tmp = None
    written: dict = {}
    try:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(out_dir)
            tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(), dir=out_dir))
        except OSError as exc:
            raise CTMRIError(f"cannot create {out_dir}: {exc.strerror or exc}; choose a writable --out-dir") from exc
        written = _write_all(result, tmp, extra_writer)
        # metrics.json moved in last: a folder with it is a finished run (batch's resume reads it)
        names = [name for name in written.values() if name != OUTPUT_FILES["metrics"]]
        _commit(tmp, out_dir, names + [OUTPUT_MANIFEST, OUTPUT_FILES["metrics"]])
        tmp = None  # removed by _commit, Ctrl-C held: the outputs are in place
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp = None
        _remove_created_folders(out_dir, existing)
        if isinstance(exc, OSError):
            raise CTMRIError(
                f"cannot write outputs to {out_dir}: {exc.strerror or exc}; free disk space or choose another --out-dir"
            ) from exc
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return {kind: out_dir / name for kind, name in written.items()}


def partial_prefix() -> str:
    """The name prefix of a temporary folder or file (the rest of the name without ``-``): ``.partial-<host>-<pid>-``,
    so that a later run can tell one left by a process killed outright (kill -9, the out-of-memory killer) from one
    still being written (``ctmri batch``'s records and summaries too, written beside their final names)."""
    return f".partial-{socket.gethostname()}-{os.getpid()}-"


def remove_stale_partials(out_dir: Path) -> list:
    """Remove the temporary folders and files that runs on this machine left behind when killed outright (their
    process is gone); return their names. Only on POSIX, where signal 0 asks whether a process lives (on Windows
    os.kill would end it). One of another machine, of a live process, or without that name is left alone."""
    if os.name != "posix":
        return []
    removed = []
    for folder in Path(out_dir).glob(".partial-*"):
        parts = folder.name[len(".partial-"):].rsplit("-", 2)
        if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # alive (or not ours to signal): still being written
        except ProcessLookupError:
            pass
        except OSError:
            continue
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
        else:
            folder.unlink(missing_ok=True)
        removed.append(folder.name)
    return removed


def _write_all(result: SynthesisResult, tmp: Path, extra_writer: Optional[Callable[[Path], dict]]) -> dict:
    """Every output file of ``result``, the extra writer's folders (marked as ours), ``metrics.json`` and the
    list of the files into the temporary folder ``tmp``; {kind: name} of what was written."""
    written: dict = {}
    for kind, image in result.output_images().items():
        write_volume(image, tmp / OUTPUT_FILES[kind])
        written[kind] = OUTPUT_FILES[kind]
    if result.transform is not None:
        try:
            sitk.WriteTransform(result.transform, str(tmp / OUTPUT_FILES["transform"]))
        except RuntimeError as exc:
            raise CTMRIError(
                f"cannot write {OUTPUT_FILES['transform']}: {str(exc).strip().splitlines()[-1]}; free disk "
                "space or choose another --out-dir"
            ) from exc
        written["transform"] = OUTPUT_FILES["transform"]
    if extra_writer is not None:
        extra = extra_writer(tmp)
        for name in extra.values():
            if name in OUTPUT_FOLDERS.values():  # marks it as ours, so that a later run may replace it
                (tmp / name / OUTPUT_MARKER).write_text(
                    "Written by ctmri (CTtoMRISynthesis). The next ctmri run into the folder above replaces or "
                    "removes this folder.\n")
        written.update(extra)
    (tmp / OUTPUT_FILES["metrics"]).write_text(json.dumps(result.summary(), indent=2) + "\n")
    written["metrics"] = OUTPUT_FILES["metrics"]
    files = [name for name in written.values() if name in OUTPUT_FILES.values()]
    (tmp / OUTPUT_MANIFEST).write_text(json.dumps(
        {"written_by": "ctmri (CTtoMRISynthesis); the next run into this folder replaces or removes these",
         "files": files}, indent=2) + "\n")
    return written


def _remove_created_folders(out_dir: Path, existing: Path) -> None:
    """Remove ``out_dir`` and the parents created for it (up to ``existing``), where they are empty."""
    folder = out_dir
    while folder != existing and folder != folder.parent:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _commit(tmp: Path, out_dir: Path, names: list) -> None:
    """Move ``names`` from ``tmp`` into ``out_dir``, replacing this module's earlier outputs, then remove ``tmp``
    (with the earlier outputs set aside in it); all or nothing, Ctrl-C held throughout."""
    previous = tmp / ".previous"
    previous.mkdir()
    set_aside: list = []  # earlier outputs moved into `previous`
    moved: list = []  # new outputs moved into out_dir
    with signals_held():
        try:
            # checked before the run too, but minutes have passed
            ours = check_outputs_free(out_dir, [n for n in names if n in OUTPUT_FOLDERS.values()])
            for name in sorted(ours) + [OUTPUT_MANIFEST]:
                if (out_dir / name).exists() or (out_dir / name).is_symlink():
                    os.replace(out_dir / name, previous / name)
                    set_aside.append(name)
            for name in OUTPUT_FOLDERS.values():
                if _ours(out_dir / name):  # a folder of the user's with that name stays where it is
                    os.replace(out_dir / name, previous / name)
                    set_aside.append(name)
            for name in names:
                os.replace(tmp / name, out_dir / name)
                moved.append(name)
            # still held: a Ctrl-C here used to leave the temporary folder (the earlier outputs in it) behind,
            # and say that no output was written although the new ones were in place
            shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            for name in moved:
                with contextlib.suppress(OSError):
                    if (out_dir / name).is_dir() and not (out_dir / name).is_symlink():
                        shutil.rmtree(out_dir / name)  # an output folder (OUTPUT_FOLDERS)
                    else:
                        os.unlink(out_dir / name)
            for name in set_aside:
                with contextlib.suppress(OSError):
                    os.replace(previous / name, out_dir / name)
            raise
