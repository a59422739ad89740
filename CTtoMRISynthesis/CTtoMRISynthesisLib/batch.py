"""``ctmri batch``: a cohort of cases from a manifest, one output folder each; resumable, shardable, parallel.

A manifest is a CSV with columns ``id,ct,mri`` (``mri`` may be empty; paths relative to the CSV's
folder). Each case runs through :func:`case.run_case` (exactly what ``ctmri synthesize`` does) into
``OUT/<id>/``. Beside the case folders:

- ``OUT/.ctmri-batch/<id>.json``: the case's record (status, one-line message, seconds, metrics, the
  files written, and ``made_from``), written atomically when the case ends;
- ``OUT/summary.csv``, ``OUT/summary.json`` and ``OUT/report.md``: merged from all records on disk.

Resume: ``made_from`` (the inputs' manifest path + size + mtime, the options that change outputs, the weights'
sha256) is written into the case's ``metrics.json`` (moved into place last by ``save_outputs``) and
into its record. A case is skipped when both agree with what this run would make it from and its files
are there; anything else (an error, an interrupted case, a changed input or option) is redone.
Inputs are identified by path + size + mtime, not by a content hash: hashing a cohort of CT volumes or
DICOM folders would read every byte again on every rerun (minutes per shard), while a rewritten file
gets a new mtime. A touched file is redone; only a different file with the same size and mtime is missed.

Shards: ``--shard I/N`` takes every N-th case of the ids in sorted order (balanced to within one case,
the same on every machine). Shards write disjoint case folders and records; each merges the summary
from all records on disk and repeats the merge until the records it read are unchanged after writing,
so the last shard to finish always leaves a complete summary, without a file lock (NFS may not honour one).

``--jobs N``: N worker processes (spawn), each with cores // N torch and ITK threads, each loading the
model once. Ctrl-C (or SIGTERM from a scheduler) stops cleanly: a case in progress is discarded
(``save_outputs`` is all or nothing), finished cases are kept, the summary is merged, exit 130.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence

from .errors import CancelledError, CTMRIError, shortened

if TYPE_CHECKING:  # only for type hints: keeps the worker's first import free of numpy/torch
    from .case import CaseOptions

MANIFEST_COLUMNS = ("id", "ct", "mri", "ct_series", "mri_series")  # the series columns: optional, as --ct-series
STATE_DIR = ".ctmri-batch"
SUMMARY_CSV, SUMMARY_JSON, REPORT_MD = "summary.csv", "summary.json", "report.md"
METRIC_COLUMNS = ("mae", "ssim", "psnr", "ssim_foreground", "mae_whole", "uncertainty_mean")
ALWAYS_COLUMNS = ("id", "status", "message", "seconds")
#: CaseOptions fields that change how a case is run, not what it produces: not part of ``made_from``.
RUN_ONLY_OPTIONS = ("weights", "device", "batch_size")  # (weights: its sha256 is recorded instead)
MRI_ONLY_OPTIONS = ("registration", "allow_disjoint", "mri_picture_spacing")  # they change nothing without an MRI
#: what the user sets to choose a case's DICOM series, as a case's messages name it (synthesize: --ct-series …)
SERIES_CHOSEN_WITH = {"CT": "the manifest's ct_series column", "MRI": "the manifest's mri_series column"}
EXIT_OK, EXIT_CASES_FAILED = 0, 1

_ID_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,126}[A-Za-z0-9_-])?\Z")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)}
_RESERVED_IDS = {SUMMARY_CSV, SUMMARY_JSON, REPORT_MD}


# --------------------------------------------------------------------------------------------------
# Manifest and shards


@dataclass(frozen=True)
class Case:
    """One manifest row: an id (its output folder's name), its input paths (CSV-relative ones resolved against
    the CSV's folder) and the paths as written in the manifest (what ``made_from`` records)."""

    id: str
    ct: Path
    mri: Optional[Path]
    line: int
    ct_entry: str = ""
    mri_entry: str = ""
    ct_series: str = ""  # the DICOM series to take (number or UID), as --ct-series; "" = by the rule
    mri_series: str = ""

    def options(self, options: "CaseOptions") -> "CaseOptions":
        """The batch's options with this case's own series choice (the manifest's ct_series / mri_series)."""
        return dataclasses.replace(options, ct_series=self.ct_series or None, mri_series=self.mri_series or None)


def read_manifest(path: str | Path) -> list:
    """The cases of a manifest CSV (columns ``id,ct,mri``), validated; CTMRIError saying what to fix."""
    path = Path(path)
    if path.is_dir():
        raise CTMRIError(f"the manifest {path} is a folder; give a CSV file with columns id,ct,mri")
    if not path.is_file():
        raise CTMRIError(f"manifest not found: {path}; give a CSV file with columns id,ct,mri")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often prepend a byte-order mark
    except UnicodeDecodeError as exc:
        raise CTMRIError(f"manifest {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV") from exc
    except OSError as exc:
        raise CTMRIError(f"cannot read manifest {path}: {exc.strerror or exc}") from exc
    delimiter = _delimiter(text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        raise CTMRIError(f"manifest {path} line {reader.line_num}: not valid CSV ({exc})") from exc
    rows = [(n, [cell.strip() for cell in row]) for n, row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise CTMRIError(f"manifest {path} is empty; its first line must be the header id,ct,mri")
    columns = _header(path, rows[0][1])
    cases: list = []
    seen: dict = {}  # lower-cased id -> line: case-insensitive file systems would merge 'P1' and 'p1'
    for line, row in rows[1:]:
        if len(row) > len(columns):
            raise CTMRIError(f"manifest {path} line {line}: {len(row)} fields but the header has {len(columns)}; "
                             f"quote paths that contain {'semicolons' if delimiter == ';' else 'commas'}")
        values = dict(zip(columns, row + [""] * (len(columns) - len(row))))
        case_id = values["id"]
        _check_id(path, line, case_id)
        if case_id.lower() in seen:
            raise CTMRIError(f"manifest {path} line {line}: id {case_id!r} already used on line "
                             f"{seen[case_id.lower()]} (ids must be unique, ignoring case); rename one")
        seen[case_id.lower()] = line
        if not values["ct"]:
            raise CTMRIError(f"manifest {path} line {line}: case {case_id!r} has no ct path")
        mri = values.get("mri", "")
        if values.get("mri_series") and not mri:
            raise CTMRIError(f"manifest {path} line {line}: case {case_id!r} has an mri_series but no mri path")
        cases.append(Case(case_id, _input_path(path, values["ct"]), _input_path(path, mri) if mri else None, line,
                          ct_entry=values["ct"], mri_entry=mri, ct_series=values.get("ct_series", ""),
                          mri_series=values.get("mri_series", "")))
    if not cases:
        raise CTMRIError(f"manifest {path} has a header but no cases; add one line per case: id,ct,mri")
    return cases


def _delimiter(text: str) -> str:
    """``;`` when the header line is separated by semicolons and holds no comma (what spreadsheets write as CSV
    where the decimal separator is a comma, e.g. Excel in most of Europe), else ``,``."""
    header = next((line for line in text.splitlines() if line.strip()), "")
    return ";" if ";" in header and "," not in header else ","


def _header(path: Path, row: list) -> list:
    columns = [cell.lower() for cell in row]
    unknown = [c for c in columns if c not in MANIFEST_COLUMNS]
    missing = [c for c in ("id", "ct") if c not in columns]
    if unknown or missing or len(set(columns)) != len(columns):
        problem = (f"unknown column(s) {', '.join(map(repr, unknown))}" if unknown else
                   f"missing column(s) {', '.join(missing)}" if missing else "a repeated column")
        tabs = " (columns are separated by commas or semicolons, not tabs)" if any("\t" in c for c in row) else ""
        raise CTMRIError(f"manifest {path}: {problem} in the header {','.join(row)!r}{tabs}; "
                         "the first line must be id,ct,mri (mri optional; ct_series and mri_series may follow)")
    return columns


def _check_id(path: Path, line: int, case_id: str) -> None:
    """An id names a folder: refuse what is unsafe or unportable as a folder name, saying why."""
    where = f"manifest {path} line {line}"
    if not case_id:
        raise CTMRIError(f"{where}: the id is empty; give every case an id (its output folder's name)")
    if not _ID_PATTERN.match(case_id):
        raise CTMRIError(
            f"{where}: id {case_id!r} is not a safe folder name; use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit and not ending with '.'"
        )
    if case_id.lower() in _RESERVED_IDS or case_id.split(".")[0].upper() in _WINDOWS_RESERVED:
        raise CTMRIError(f"{where}: id {case_id!r} is a reserved name (the batch's own files, or a device name "
                         "on Windows); rename the case")


def _input_path(manifest: Path, value: str) -> Path:
    """A manifest path: absolute as given (``~`` expanded), else relative to the manifest's folder."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else manifest.parent / path


def parse_shard(text: Optional[str]) -> tuple:
    """``'I/N'`` (1-based) → (I, N); ``None`` → (1, 1)."""
    if text is None:
        return 1, 1
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise CTMRIError(f"--shard {text!r}: give I/N with 1 <= I <= N, e.g. --shard 3/10 "
                         "(SLURM: --shard ${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT} with --array=1-N)")
    return int(match.group(1)), int(match.group(2))


def shard_cases(cases: Sequence, index: int, count: int) -> list:
    """Shard ``index`` of ``count``: every ``count``-th case of the ids in sorted order, kept in manifest order.

    Sorted ids (not manifest order) so that reordering the manifest moves no case between shards; round
    robin (not a hash) so that shards differ by at most one case even for small cohorts.
    """
    ordered = sorted(c.id for c in cases)
    mine = {case_id for k, case_id in enumerate(ordered) if k % count == index - 1}
    return [c for c in cases if c.id in mine]


def check_inputs_outside_outputs(cases: Sequence, out_dir: Path) -> None:
    """Refuse inputs inside a case folder or the batch's state folder: writing outputs could replace them."""
    out = out_dir.resolve()
    owned = {(out / c.id) for c in cases} | {out / STATE_DIR}
    for case in cases:
        for path in (case.ct, case.mri):
            if path is None:
                continue
            resolved = path.resolve()
            inside = next((p for p in (resolved, *resolved.parents) if p in owned), None)
            if inside is not None:
                raise CTMRIError(
                    f"case {case.id!r}: input {path} lies inside the output folder {inside}, which the batch "
                    "writes into; move the input or choose another --out-dir"
                )


# --------------------------------------------------------------------------------------------------
# What a case is made from, and its record


def input_fingerprint(path: Optional[Path], entry: str = "") -> Optional[dict]:
    """The manifest's path (``entry``) + size + mtime of a file; for a folder (DICOM), a digest of its listing.

    The path as the manifest writes it, not the absolute one: shards on machines that mount the cohort
    at different places must agree on what a case was made from.
    """
    if path is None:
        return None
    absolute = os.path.abspath(path)
    named = entry or str(path)
    try:
        st = os.stat(absolute)
    except OSError:
        return {"path": named, "missing": True}
    if not os.path.isdir(absolute):
        return {"path": named, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    digest, files, size = hashlib.sha256(), 0, 0
    for root, dirs, names in os.walk(absolute):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            try:
                fst = os.stat(full)
            except OSError:
                continue
            digest.update(f"{os.path.relpath(full, absolute)}\0{fst.st_size}\0{fst.st_mtime_ns}\n".encode())
            files, size = files + 1, size + fst.st_size
    return {"path": named, "files": files, "size": size, "listing_sha256": digest.hexdigest()}


def made_from(case: Case, options: "CaseOptions", weights_sha256: str) -> dict:
    """What a case's outputs depend on: inputs, the options that change outputs, the model."""
    chosen = {k: v for k, v in dataclasses.asdict(case.options(options)).items() if k not in RUN_ONLY_OPTIONS}
    if case.mri is None:  # nothing is registered: a rerun with other registration options need not redo the case
        for name in MRI_ONLY_OPTIONS:
            chosen.pop(name, None)
    if chosen.get("mri_picture_spacing") is None:  # absent from records made before the option: still current
        chosen.pop("mri_picture_spacing", None)
    record = {"ct": input_fingerprint(case.ct, case.ct_entry), "mri": input_fingerprint(case.mri, case.mri_entry),
              "options": chosen, "weights_sha256": weights_sha256}
    return json.loads(json.dumps(record, default=str))  # as it will read back from JSON, for comparison


def record_path(out_dir: Path, case_id: str) -> Path:
    return out_dir / STATE_DIR / f"{case_id}.json"


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a unique temporary name beside ``path`` and rename it over ``path``."""
    _write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _write_text_atomic(path: Path, text: str) -> None:
    from .outputs import partial_prefix

    # named as save_outputs' temporary folders, so that the next batch removes one a killed worker left
    tmp = path.with_name(f"{partial_prefix()}{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def _read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def complete_record(out_dir: Path, case: Case, expected: dict) -> Optional[dict]:
    """The case's record if it finished ``ok`` from exactly ``expected`` and its files are all there."""
    record = _read_json(record_path(out_dir, case.id))
    if not record or record.get("status") != "ok" or record.get("made_from") != expected:
        return None
    folder = out_dir / case.id
    metrics = _read_json(folder / "metrics.json")
    if not metrics or metrics.get("made_from") != expected:
        return None
    if not all((folder / name).exists() for name in record.get("files", [])):
        return None
    return record


#: Longest case line on the console; the record and the summary keep the whole message, whose end often says
#: what to do (a long path or a library's text before it could push that past any cut).
CONSOLE_LIMIT = 400


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def series_taken(provenance: dict) -> str:
    """Which DICOM series a case read ("CT 3, MRI 5"; "" for files): a cohort's reviewer checks that every case
    took the series meant (the rule takes the thinnest original axial one; the manifest's columns may override)."""
    taken = []
    for what in ("ct", "mri"):
        series = provenance.get(f"{what}_series")
        if isinstance(series, dict):  # a series without a number (it is optional in DICOM) by its UID
            number = series.get("number")
            taken.append(f"{what.upper()} {number if number is not None else 'UID ' + str(series.get('uid'))}")
    return ", ".join(taken)


def _check_model_is_the_batchs(model, expected: dict) -> None:
    """The model loaded to run the cases is the weights file the batch hashed when it started (``made_from``
    names it); a file replaced in between would make every case's record name a model that did not run."""
    loaded = getattr(model, "sha256", None)
    if loaded is not None and loaded != expected.get("weights_sha256"):
        raise CTMRIError(f"the weights file was replaced after the batch started (sha256 "
                         f"{str(expected.get('weights_sha256'))[:12]}… when the batch started, {loaded[:12]}… when "
                         "loaded); run the batch again")


def process_case(case: Case, out_dir: Path, options: "CaseOptions", expected: dict, *, model=None,
                 cancel: Optional[Callable[[], bool]] = None, runner: Optional[dict] = None) -> dict:
    """Run one case into ``out_dir/<id>``, write and return its record; a failure is recorded, not raised.

    Only a cancel (CancelledError, KeyboardInterrupt) propagates; it leaves the case folder as it was.
    ``runner`` (process id, threads) is recorded as where the case ran.
    """
    import traceback

    from .case import run_case

    start = time.perf_counter()
    record: dict = {"id": case.id, "ct": str(case.ct), "mri": str(case.mri) if case.mri else None}
    notes: list = []  # e.g. which DICOM series was taken and why
    try:
        _check_model_is_the_batchs(model, expected)
        result, paths = run_case(case.ct, case.mri, out_dir / case.id, case.options(options), model=model,
                                 cancel=cancel, provenance={"made_from": expected}, notify=notes.append,
                                 series_chosen_with=SERIES_CHOSEN_WITH)
    except CancelledError:
        raise
    except CTMRIError as exc:
        record.update(status="error", message=_one_line(str(exc)))
    except Exception as exc:  # noqa: BLE001 - one case's bug must not stop a cohort; the traceback is kept
        record.update(status="error", message=_one_line(f"unexpected {type(exc).__name__}: {exc} "
                                                        "(a bug? traceback in the case's record)"),
                      traceback=traceback.format_exc())
    else:
        summary = result.summary()
        record.update(status="ok", message="; ".join(_one_line(w) for w in result.warnings),
                      metrics={k: summary[k] for k in METRIC_COLUMNS if k in summary},
                      series=series_taken(result.provenance), files=sorted(p.name for p in paths.values()))
    if record["status"] == "error" and (out_dir / case.id / "metrics.json").is_file():
        # a failed run changes nothing in the case's folder: what is there is an earlier run's, said so here
        record["message"] += (f" (the files in {case.id}/ are an earlier run's, kept as they were: its metrics.json "
                              "says what made them)")
    record.update(seconds=round(time.perf_counter() - start, 3), notes=notes, made_from=expected,
                  finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), host=socket.gethostname(), runner=runner or {})
    try:
        write_json_atomic(record_path(out_dir, case.id), record)
    except OSError as exc:
        raise CTMRIError(f"cannot write the record of case {case.id!r} in {out_dir / STATE_DIR}: "
                         f"{exc.strerror or exc}; free disk space and rerun (finished cases are kept)") from exc
    return record


# --------------------------------------------------------------------------------------------------
# Worker processes (--jobs N)

_WORKER: dict = {}


def worker_threads(jobs: int) -> int:
    """Threads per worker so that ``jobs`` workers fill the cores this process may use (SLURM's cpuset too)."""
    from .worker import available_cores

    return max(1, available_cores() // max(1, jobs))


def _init_worker(threads: int, weights: str, device: str, cancel_flag, started) -> None:
    """Runs once in each worker: ignore Ctrl-C (the parent decides), divide the threads, load the model.
    ``cancel_flag``: a shared byte the parent sets to stop the cases in progress; ``started``: the writing end of a
    pipe each case's id is sent on as it begins (which cases a dead worker may have held). Neither takes a lock: a
    worker killed while holding a lock shared with the others would leave them blocked on it forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: _WORKER.__setitem__("stop", True))
    # Before torch/numpy load their thread pools (the worker imported only this module so far).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin on shared cores
    from .worker import limit_threads

    limit_threads(threads)
    from .synthesis import choose_device
    from .weights import load_model

    _WORKER.setdefault("stop", False)  # (a SIGTERM during start-up has set it already)
    _WORKER.update(cancel=cancel_flag, started=started, model=load_model(weights, choose_device(device)))


def _runner() -> dict:
    import torch

    return {"pid": os.getpid(), "torch_threads": torch.get_num_threads()}


def _worker_cancelled() -> bool:
    return bool(_WORKER.get("stop")) or bool(_WORKER["cancel"].value)


def _run_in_worker(case: Case, out_dir: Path, options: "CaseOptions", expected: dict) -> dict:
    _WORKER["started"].send(case.id)  # one write of a few bytes (< PIPE_BUF): whole, never interleaved
    try:
        return process_case(case, out_dir, options, expected, model=_WORKER["model"], cancel=_worker_cancelled,
                            runner=_runner())
    except CancelledError:
        return {"id": case.id, "status": "cancelled"}


# --------------------------------------------------------------------------------------------------
# Summary and report


@dataclass
class Summary:
    """The merged summary: one row per case that has a current record, and the ids still without one."""

    rows: list
    columns: list
    not_run: list
    stats: dict = field(default_factory=dict)
    # cases of another manifest run into the same folder: kept as they are, not summarised here
    not_in_manifest: list = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for row in self.rows if row["status"] == status)


def merge_summary(out_dir: Path, cases: Sequence, expected: dict, about: dict, attempts: int = 20) -> Summary:
    """Write ``summary.csv``, ``summary.json`` and ``report.md`` from all records on disk; return the summary.

    Several shards may merge at once: each write is atomic (rename), and the merge is repeated until the
    records read before writing are still the records on disk after writing, so the last writer always
    leaves a summary that includes every finished case.
    """
    summary = None
    for _ in range(attempts):
        snapshot = _read_records(out_dir, cases)
        summary = _build_summary(out_dir, cases, expected, snapshot)
        _write_summary(out_dir, summary, about)
        if _read_records(out_dir, cases) == snapshot:
            break
    return summary


def _read_records(out_dir: Path, cases: Sequence) -> dict:
    raw = {}
    for case in cases:
        try:
            raw[case.id] = record_path(out_dir, case.id).read_bytes()
        except OSError:
            raw[case.id] = None
    return raw


def _build_summary(out_dir: Path, cases: Sequence, expected: dict, raw: dict) -> Summary:
    rows, not_run = [], []
    for case in cases:
        record = None
        if raw.get(case.id) is not None:
            try:
                record = json.loads(raw[case.id])
            except ValueError:
                record = None
        # A record made from other inputs/options/weights is not a result of this configuration.
        current = (isinstance(record, dict) and record.get("status") in ("ok", "error")
                   and record.get("made_from") == expected[case.id]
                   and (record["status"] == "error" or (out_dir / case.id / "metrics.json").is_file()))
        if not current:
            not_run.append(case.id)
            continue
        row = {"id": case.id, "status": record["status"], "message": record.get("message", ""),
               "seconds": record.get("seconds"), "series": record.get("series") or ""}
        row.update((record.get("metrics") or {}))
        rows.append(row)
    present = [m for m in METRIC_COLUMNS if m != "uncertainty_mean" or any(m in r for r in rows)]
    columns = list(ALWAYS_COLUMNS) + (["series"] if any(row["series"] for row in rows) else []) + present
    rows = [{c: row.get(c) for c in columns} for row in rows]
    return Summary(rows=rows, columns=columns, not_run=not_run, stats=_metric_stats(rows, present),
                   not_in_manifest=cases_not_in_manifest(out_dir, cases))


def cases_not_in_manifest(out_dir: Path, cases: Sequence) -> list:
    """Ids with a batch record in ``out_dir`` that this manifest does not list (another manifest was run into the
    same folder). The summary is this manifest's, so it says they are there rather than dropping them unsaid."""
    listed = {case.id.lower() for case in cases}  # ids differing in case only are one folder on some disks
    try:
        records = sorted((out_dir / STATE_DIR).glob("*.json"))
    except OSError:
        return []
    return [r.stem for r in records if r.stem.lower() not in listed and _ID_PATTERN.fullmatch(r.stem)]


def _metric_stats(rows: list, metrics: Iterable[str]) -> dict:
    """Mean, sample SD (n−1), min, max and n of each metric over the ok cases that have it."""
    stats = {}
    for metric in metrics:
        values = [float(r[metric]) for r in rows if r["status"] == "ok" and isinstance(r.get(metric), (int, float))
                  and math.isfinite(r[metric])]
        if not values:
            continue
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        stats[metric] = {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "n": len(values)}
    return stats


def _write_summary(out_dir: Path, summary: Summary, about: dict) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=summary.columns, lineterminator="\n")
    writer.writeheader()
    for row in summary.rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    _write_text_atomic(out_dir / SUMMARY_CSV, buffer.getvalue())
    write_json_atomic(out_dir / SUMMARY_JSON, {
        **about, "cases_in_manifest": len(summary.rows) + len(summary.not_run),
        "ok": summary.count("ok"), "error": summary.count("error"), "not_run": summary.not_run,
        "metric_stats": summary.stats, "columns": summary.columns, "cases": summary.rows,
        "not_in_manifest": summary.not_in_manifest,
    })
    _write_text_atomic(out_dir / REPORT_MD, render_report(summary, about))


def _fmt(value, digits: int = 4) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def render_report(summary: Summary, about: dict) -> str:
    """The cohort report (Markdown): counts, mean/SD of each metric, and the per-case table."""
    total = len(summary.rows) + len(summary.not_run)
    lines = [
        "# Batch report", "",
        f"Manifest `{about.get('manifest')}`; weights sha256 `{str(about.get('weights_sha256'))[:16]}…`; "
        f"options `{json.dumps(about.get('options', {}), sort_keys=True)}`.", "",
        f"{total} cases: **{summary.count('ok')} ok**, **{summary.count('error')} failed**"
        + (f", {len(summary.not_run)} without a result yet." if summary.not_run else "."), "",
    ]
    if summary.stats:
        lines += ["## Metrics over the ok cases (0..255 scale; the scores over those with an MRI, foreground = MRI > 0, or "
                  "its head where its background is noise; uncertainty_mean over every case whose model gives one: n "
                  "says how many)", "",
                  "| metric | mean | SD | min | max | n |", "|---|---|---|---|---|---|"]
        for metric, s in summary.stats.items():
            lines.append(f"| {metric} | {_fmt(s['mean'])} | {_fmt(s['sd'])} | {_fmt(s['min'])} | "
                         f"{_fmt(s['max'])} | {s['n']} |")
        lines += ["", "SD is the sample standard deviation (n − 1); – where n = 1.", ""]
    columns = [c for c in summary.columns if c != "message"] + ["message"]
    lines += ["## Cases", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in summary.rows:
        cells = [_fmt(row.get(c)).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    if summary.not_run:
        lines += ["", f"## Without a result yet ({len(summary.not_run)})", "",
                  "Not run with these inputs, options and weights (another shard, interrupted, or not started): "
                  + ", ".join(f"`{i}`" for i in summary.not_run)]
    if summary.not_in_manifest:
        lines += ["", f"## In this folder but not in this manifest ({len(summary.not_in_manifest)})", "",
                  "Cases with results in this folder that this manifest does not list (another manifest's, or rows "
                  "since removed), left as they are and not summarised here (give each manifest its own --out-dir): "
                  + ", ".join(f"`{i}`" for i in summary.not_in_manifest)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class BatchOutcome:
    """What one ``ctmri batch`` invocation did (this shard) and the merged summary (all shards)."""

    ran: list = field(default_factory=list)  # records of the cases run now
    skipped: list = field(default_factory=list)  # ids already complete
    summary: Optional[Summary] = None

    @property
    def failed(self) -> list:
        return [r["id"] for r in self.ran if r.get("status") == "error"]

    @property
    def exit_code(self) -> int:
        return EXIT_CASES_FAILED if self.failed else EXIT_OK


class _Reporter:
    """One line per finished case (to stdout) and, on a terminal, an overall bar: done, failed, time left."""

    def __init__(self, total: int, bar: bool) -> None:
        self.failed = 0
        self.bar = None
        if bar and total:
            from tqdm import tqdm

            # tqdm writes the postfix as ", 0 failed": "3/10 cases, 0 failed |███   | 00:42<01:38 left"
            self.bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True,
                            bar_format="{n_fmt}/{total_fmt} cases{postfix} |{bar}| {elapsed}<{remaining} left")
            self.bar.set_postfix_str("0 failed")

    def case_done(self, record: dict) -> None:
        if record["status"] == "error":
            self.failed += 1
        metrics = record.get("metrics") or {}
        detail = (f"MAE {metrics['mae']:.2f} SSIM {metrics['ssim']:.4f}" if metrics.get("mae") is not None
                  and metrics.get("ssim") is not None else "")
        # the warnings of a case with metrics too (a reference that is a CT, not T2-weighted): they say what the
        # numbers are worth, and the summary's mean takes such a case in
        series = f"series {record['series']}" if record.get("series") else ""
        said = "; ".join(part for part in (series, detail, record.get("message") or "") if part)
        line = f"{record['status']:5s} {record['id']}  {record.get('seconds') or 0:.1f} s  {said}".rstrip()
        if len(line) > CONSOLE_LIMIT:
            line = shortened(line, CONSOLE_LIMIT) + f" (whole message in {SUMMARY_CSV})"
        self._print(line)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.failed} failed")
            self.bar.update(1)

    def note(self, text: str) -> None:
        """A line about the batch itself (not a case), e.g. a worker that died."""
        self._print(f"note: {text}")

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def check_summary_files_free(out_dir: Path) -> None:
    """Refuse an ``--out-dir`` holding a ``summary.csv``, ``summary.json`` or ``report.md`` that no batch wrote.

    A cohort folder is a batch's once it holds ``STATE_DIR`` (made before the first case runs); before that, such
    files are the user's (say a project folder given as ``--out-dir``) and the merge would overwrite them.
    """
    if (out_dir / STATE_DIR).is_dir():
        return
    theirs = [name for name in (SUMMARY_CSV, SUMMARY_JSON, REPORT_MD) if (out_dir / name).exists()]
    if theirs:
        raise CTMRIError(
            f"{out_dir} already holds {', '.join(theirs)}, not written by ctmri batch (there is no {STATE_DIR}/ "
            "beside it), which the cohort summary would replace: choose another --out-dir, or move them away"
        )


def run_batch(manifest: str | Path, out_dir: str | Path, options: "CaseOptions", *, jobs: int = 1,
              shard: Optional[str] = None, progress: Optional[bool] = None) -> BatchOutcome:
    """Run (this shard of) a manifest into ``out_dir``; print one line per case; merge the summary.

    Returns the outcome (``exit_code`` 1 if a case of this shard failed). Raises CTMRIError for a bad
    manifest/option/weights before any case runs, and CancelledError after a clean stop on Ctrl-C/SIGTERM.
    """
    if jobs < 1:
        raise CTMRIError(f"--jobs {jobs}: give a number of worker processes >= 1")
    out_dir = Path(out_dir)
    index, count = parse_shard(shard)
    cases, weights, weights_sha = _checked_before_any_case(manifest, out_dir, options)
    expected = {c.id: made_from(c, options, weights_sha) for c in cases}
    mine = shard_cases(cases, index, count)
    outcome = BatchOutcome()
    todo = []
    for case in mine:
        if complete_record(out_dir, case, expected[case.id]) is not None:
            outcome.skipped.append(case.id)
        else:
            todo.append(case)
    if todo:
        _check_the_run_can_start(weights, options)
    _make_cohort_folder(out_dir)
    shard_note = f" (shard {index}/{count}: {_cases(len(mine))})" if count > 1 else ""
    print(f"batch: {_cases(len(cases))} in {manifest}{shard_note}; {len(outcome.skipped)} already complete, "
          f"{len(todo)} to run with {min(jobs, max(1, len(todo)))} job(s)", flush=True)

    reporter = _Reporter(len(todo), sys.stderr.isatty() if progress is None else progress)
    interrupted = False
    try:
        if todo:
            runner = _run_here if jobs == 1 or len(todo) == 1 else _run_pool
            runner(todo, out_dir, options, expected, weights, min(jobs, len(todo)), outcome, reporter)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        reporter.close()
    about = {"manifest": str(manifest), "weights": str(weights), "weights_sha256": weights_sha,
             "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "weights"}}
    with _signals_held():  # a second Ctrl-C must not cut the summary short
        _remove_leftovers(out_dir)  # of a worker that died in this run
        outcome.summary = merge_summary(out_dir, cases, expected, about)
    _print_end(out_dir, outcome)
    if interrupted:
        raise CancelledError(
            f"interrupted: {len(outcome.ran)} case(s) finished in this run and were kept, the case(s) in progress "
            f"were discarded; the summary covers what is done; rerun the same command to resume"
        )
    return outcome


def _checked_before_any_case(manifest: str | Path, out_dir: Path, options: "CaseOptions") -> tuple[list, Path, str]:
    """The checks that can refuse the whole batch (manifest, folders, the weights file there):
    (cases, weights path, its sha256). Nothing is written."""
    from .outputs import check_writable
    from .weights import default_weights_path, missing_weights_message, sha256_of

    cases = read_manifest(manifest)
    check_inputs_outside_outputs(cases, out_dir)
    check_writable(out_dir)  # each case's folder is checked for files of the user's by its own run
    check_summary_files_free(out_dir)
    weights = Path(options.weights) if options.weights else default_weights_path()
    if not weights.is_file():
        raise CTMRIError(missing_weights_message(weights))
    return cases, weights, sha256_of(weights)


def _check_the_run_can_start(weights: Path, options: "CaseOptions") -> None:
    """Before the cohort folder is made: a damaged or foreign model file (its sha256, its format and config)
    and a device this machine lacks refuse the batch, rather than leave an empty cohort folder behind."""
    from .synthesis import choose_device
    from .weights import read_config

    read_config(weights)
    choose_device(options.device)


def _make_cohort_folder(out_dir: Path) -> None:
    """``out_dir`` becomes a cohort folder (``STATE_DIR``), the mark that its summary files are the batch's; the
    temporary files that a killed run of this machine left there are removed."""
    try:
        (out_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CTMRIError(f"cannot create {out_dir / STATE_DIR}: {exc.strerror or exc}; choose a writable --out-dir") from exc
    _remove_leftovers(out_dir)


def _remove_leftovers(out_dir: Path) -> None:
    """Remove the records and summaries that a run of this machine killed outright (a worker, or a batch before
    this one) left half-written under their temporary names (:func:`outputs.remove_stale_partials`)."""
    from .outputs import remove_stale_partials

    for folder in (out_dir, out_dir / STATE_DIR):
        remove_stale_partials(folder)


def _run_here(todo, out_dir, options, expected, weights, jobs, outcome, reporter) -> None:
    """``--jobs 1``: in this process, the model loaded once. SIGTERM stops like Ctrl-C."""
    from .interrupts import sigterm_as_interrupt, stop_requested_while_saving
    from .synthesis import choose_device
    from .weights import load_model

    model = load_model(weights, choose_device(options.device))
    stop_requested_while_saving()  # forget any from before this run
    with sigterm_as_interrupt():
        for case in todo:
            record = process_case(case, out_dir, options, expected[case.id], model=model, runner=_runner())
            outcome.ran.append(record)
            reporter.case_done(record)
            if stop_requested_while_saving():  # held while the case's outputs were moved in: it is complete, stop
                raise KeyboardInterrupt


def _run_pool(todo, out_dir, options, expected, weights, jobs, outcome, reporter) -> None:
    """``--jobs N``: N spawned workers; Ctrl-C/SIGTERM set a shared flag that cancels cases in progress.

    A worker that dies (killed, out of memory) breaks its pool, and every case not finished with it. The cases
    not yet started go on in a new pool; those that were in progress are run again one at a time, each in a pool of
    its own, so that a case which kills its worker by itself is found and recorded, and the others are not lost."""
    from .weights import load_model

    load_model(weights, "cpu")  # a bad weights file is one clear error here, not one per case in the workers
    waiting, alone = list(todo), []
    while waiting or alone:
        if alone:
            cases, width = [alone.pop(0)], 1
        else:
            cases, width, waiting = waiting, jobs, []
        unfinished, started = _pool_pass(cases, out_dir, options, expected, weights, width, outcome, reporter)
        if not unfinished:
            continue
        in_progress = [case for case in unfinished if case.id in started]
        if width == 1 or not in_progress:  # died alone, or before any case began (its start-up): nothing to retry
            for case in unfinished:
                _record_died(case, out_dir, expected, outcome, reporter, alone=case in in_progress)
            continue
        reporter.note(f"a worker process died; {len(in_progress)} case(s) it may have been running "
                      f"({', '.join(c.id for c in in_progress)}) are run again one at a time")
        alone += in_progress
        waiting += [case for case in unfinished if case.id not in started]


def _pool_pass(cases, out_dir, options, expected, weights, jobs, outcome, reporter) -> tuple[list, set]:
    """One pool of ``jobs`` workers over ``cases``: (cases left unfinished because a worker died, ids of the
    cases that had begun by then)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    cancel_flag = context.RawValue("b", 0)
    started, started_writer = context.Pipe(duplex=False)
    init = (worker_threads(jobs), str(weights), options.device, cancel_flag, started_writer)
    # The submits start the workers; with Ctrl-C ignored here at that moment, they start with it ignored
    # (an ignored signal stays ignored across exec, and Python then installs no handler): a Ctrl-C while
    # a worker imports torch would otherwise kill it and break the pool instead of stopping cleanly.
    with _signals_held():
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker, initargs=init)
        futures = {pool.submit(_run_in_worker, case, out_dir, options, expected[case.id]): case for case in cases}
    taken: set = set()
    unfinished: list = []
    begun: set = set()

    def drain() -> None:  # read as cases begin and finish, so that the pipe never fills
        while started.poll():
            begun.add(started.recv())

    def take(future) -> None:
        drain()
        taken.add(future)
        try:
            record = future.result()
        except BrokenProcessPool:  # the watcher below ends the other workers
            unfinished.append(futures[future])
            return
        if record["status"] != "cancelled":
            outcome.ran.append(record)
            reporter.case_done(record)

    from .interrupts import sigterm_as_interrupt

    with contextlib.closing(started), contextlib.closing(started_writer), _ended_if_it_breaks(pool):
        try:
            with sigterm_as_interrupt():
                for future in as_completed(futures):
                    take(future)
        except BaseException:
            # Ctrl-C, SIGTERM, or an error that ends the batch: cases in progress stop at their next cancel
            # check and discard their outputs; cases not started are dropped.
            cancel_flag.value = 1
            with _signals_held():
                pool.shutdown(wait=True, cancel_futures=True)
                for future in futures:  # cases that finished while the others were stopping are kept
                    if future not in taken and future.done() and not future.cancelled():
                        try:
                            take(future)
                        except Exception:  # noqa: BLE001 - the error that ended the batch is the one to report
                            pass
            raise
        pool.shutdown(wait=True)
        drain()
    return unfinished, begun


class _ended_if_it_breaks:
    """For the pool's whole life: once a worker dies and breaks it, end the others (:func:`_end_the_other_workers`),
    whether the main thread is reading results or waiting in a shutdown after Ctrl-C (a watcher thread)."""

    def __init__(self, pool) -> None:
        import threading

        self.pool, self.done = pool, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.done.wait(0.2):
            if getattr(self.pool, "_broken", False):
                _end_the_other_workers(self.pool)
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def _end_the_other_workers(pool) -> None:
    """A worker died and broke the pool: kill the others now. The pool sends them SIGTERM and waits for them to
    exit, but a worker turns SIGTERM into "stop at the next cancel check" (a scheduler's SIGTERM must not leave
    half-written cases), and one blocked on a lock of the pool's queues that the dead worker held never gets there:
    the pool, and the batch, waited forever. Their cases count as in progress and are run again one at a time."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):  # CPython 3.9-3.13 keep them here
        with contextlib.suppress(OSError, ValueError):  # already ended, or already reaped
            process.kill()


def _record_died(case: Case, out_dir: Path, expected: dict, outcome, reporter, alone: bool) -> None:
    """A case whose worker died, recorded as its error."""
    why = ("the worker process died while running this case alone (out of memory?); give the machine more memory "
           "or run this case by itself" if alone else
           "the worker process died before it began this case (killed, or out of memory?); rerun to retry, with fewer --jobs")
    record = {"id": case.id, "status": "error", "seconds": None, "made_from": expected[case.id], "message": why}
    write_json_atomic(record_path(out_dir, case.id), record)
    outcome.ran.append(record)
    reporter.case_done(record)


class _signals_held:
    """Ignore Ctrl-C and SIGTERM for the duration (main thread only)."""

    def __enter__(self):
        self.saved = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.saved[sig] = signal.signal(sig, signal.SIG_IGN)
            except (ValueError, OSError):  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def _cases(n: int) -> str:
    return f"{n} case" if n == 1 else f"{n} cases"


def _listed(ids: Sequence, shown: int = 5) -> str:
    """The first ``shown`` ids, and how many more."""
    more = f", … {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more


def _print_end(out_dir: Path, outcome: BatchOutcome) -> None:
    summary = outcome.summary
    ran_ok = sum(1 for r in outcome.ran if r["status"] == "ok")
    print(f"this run: {ran_ok} ok, {len(outcome.failed)} failed, {len(outcome.skipped)} skipped (already complete)")
    if summary is not None:
        pending = f", {len(summary.not_run)} without a result yet" if summary.not_run else ""
        print(f"summary: {summary.count('ok')} ok, {summary.count('error')} failed{pending} -> "
              f"{out_dir / SUMMARY_CSV}, {SUMMARY_JSON}, {REPORT_MD}")
        if summary.not_in_manifest:
            print(f"note: {_cases(len(summary.not_in_manifest))} in {out_dir} not in this manifest "
                  f"({_listed(summary.not_in_manifest)}): left as they are, not in this summary", file=sys.stderr)
    if outcome.failed:
        print(f"failed: {', '.join(outcome.failed)} (messages in {out_dir / SUMMARY_CSV})", file=sys.stderr)
