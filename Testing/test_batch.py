"""`ctmri batch`: manifest checks, per-case outputs equal to `synthesize`, failures, resume, shards, jobs, Ctrl-C.

Runs without the shared data: the cases are the in-repository sample (Visible Human CT + MR, 8 slices)
and variants written to tmp_path (a cropped copy, a file that is not an image), with the shipped model.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CTtoMRISynthesisLib import batch
from CTtoMRISynthesisLib.batch import Case, parse_shard, read_manifest, shard_cases
from CTtoMRISynthesisLib.cli import main
from CTtoMRISynthesisLib.demo import sample_paths
from CTtoMRISynthesisLib.errors import CTMRIError
from CTtoMRISynthesisLib.weights import default_weights_path, sha256_of

FAST = ["--registration", "none", "--device", "cpu", "--quiet"]  # the sample's MR is already on the CT grid
IMAGES = ("synthetic_mri.nrrd", "ct_registered.nrrd", "difference.nrrd")


def write_manifest(path: Path, rows, header: str = "id,ct,mri") -> Path:
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A cohort folder: the sample (ct/mri), a cropped copy (6 slices), a file that is not an image."""
    pytest.importorskip("torch")
    assert default_weights_path().is_file(), "the shipped model must be in the repository"
    folder = tmp_path_factory.mktemp("cohort")
    paths = sample_paths()
    shutil.copy(paths["ct"], folder / "ct.nrrd")
    shutil.copy(paths["mri"], folder / "mri.nrrd")
    (folder / "crop").mkdir()
    for name in ("ct", "mri"):
        image = sitk.ReadImage(str(paths[name]))
        sitk.WriteImage(image[:, :, 1:7], str(folder / "crop" / f"{name}.nrrd"), True)
    (folder / "broken.nrrd").write_bytes(b"NRRD0004\nthis is not an image\n")
    write_manifest(folder / "cases.csv", [("a", "ct.nrrd", "mri.nrrd"), ("b", "crop/ct.nrrd", ""),
                                          ("bad", "broken.nrrd", "mri.nrrd")])
    return folder


@pytest.fixture(scope="module")
def jobs1(cohort: Path, tmp_path_factory) -> tuple:
    """The cohort run once with --jobs 1: (exit code, output folder)."""
    out = tmp_path_factory.mktemp("batch") / "out"
    code = main(["batch", "--manifest", str(cohort / "cases.csv"), "--out-dir", str(out), *FAST])
    return code, out


def read_summary(out: Path) -> dict:
    with open(out / "summary.csv", newline="") as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}


def mtimes(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------------------------------
# Manifest, shards (no synthesis)


def test_manifest_paths_are_relative_to_the_csv(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    absolute = tmp_path / "elsewhere" / "ct.nrrd"
    # Byte-order mark, upper-case header, spaces, blank lines, a missing trailing mri field: all as spreadsheets write.
    (folder / "m.csv").write_text(f"\ufeffID, CT ,MRI\n\np-01 , scans/ct.nrrd, scans/mr.nrrd\nP2,{absolute},\n"
                                  "p3,x.nrrd\n", encoding="utf-8")
    cases = read_manifest(folder / "m.csv")
    assert [c.id for c in cases] == ["p-01", "P2", "p3"]
    assert cases[0].ct == folder / "scans" / "ct.nrrd" and cases[0].mri == folder / "scans" / "mr.nrrd"
    assert cases[1].ct == absolute and cases[1].mri is None and cases[2].mri is None
    assert [c.line for c in cases] == [3, 4, 5]
    assert cases[0].ct_entry == "scans/ct.nrrd" and cases[1].ct_entry == str(absolute)


def test_manifest_separated_by_semicolons_as_european_spreadsheets_save_csv(tmp_path: Path) -> None:
    """Excel where the decimal separator is a comma saves CSV with semicolons (and CRLF, a byte-order mark);
    such a manifest is read as it is, and a comma is then an ordinary character of a path."""
    (tmp_path / "m.csv").write_bytes("\ufeffid;ct;mri\r\np1;scans/ct, v2.nrrd;scans/mr.nrrd\r\np2;x.nrrd;\r\n".encode())
    cases = read_manifest(tmp_path / "m.csv")
    assert [c.id for c in cases] == ["p1", "p2"]
    assert cases[0].ct == tmp_path / "scans" / "ct, v2.nrrd" and cases[1].mri is None
    (tmp_path / "bad.csv").write_text("id;ct;mri\na;x;y;z\n")
    with pytest.raises(CTMRIError, match="4 fields but the header has 3; quote paths that contain semicolons"):
        read_manifest(tmp_path / "bad.csv")


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty"),
        ("id,ct,mri\n", "no cases"),
        ("id,mri\na,x.nrrd\n", "missing column.*ct"),
        ("id,ct,mr\na,x.nrrd,y.nrrd\n", "unknown column.*'mr'"),
        ("a,ct.nrrd,mri.nrrd\n", "unknown column"),  # no header line
        ("id\tct\tmri\na\tx.nrrd\t\n", "separated by commas or semicolons, not tabs"),
        ("id,ct,mri\na,x.nrrd,\nA,y.nrrd,\n", "line 3: id 'A' already used on line 2"),
        ("id,ct,mri\n../up,x.nrrd,\n", "line 2: id '../up' is not a safe folder name"),
        ("id,ct,mri\na/b,x.nrrd,\n", "not a safe folder name"),
        ("id,ct,mri\n.hidden,x.nrrd,\n", "not a safe folder name"),
        ("id,ct,mri\nname.,x.nrrd,\n", "not a safe folder name"),
        ("id,ct,mri\nCON,x.nrrd,\n", "reserved name"),
        ("id,ct,mri\nsummary.csv,x.nrrd,\n", "reserved name"),
        ("id,ct,mri\n,x.nrrd,\n", "line 2: the id is empty"),
        ("id,ct,mri\na,,y.nrrd\n", "line 2: case 'a' has no ct path"),
        ("id,ct,mri\na,x,y,z\n", "line 2: 4 fields but the header has 3"),
    ],
)
def test_manifest_errors_say_what_to_fix(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "m.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CTMRIError, match=message):
        read_manifest(path)


def test_manifest_missing_or_not_text(tmp_path: Path) -> None:
    with pytest.raises(CTMRIError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")
    with pytest.raises(CTMRIError, match="is a folder; give a CSV file"):  # it said "not found"
        read_manifest(tmp_path)
    (tmp_path / "latin1.csv").write_bytes("id,ct,mri\nb\xe9b\xe9,x.nrrd,\n".encode("latin-1"))
    with pytest.raises(CTMRIError, match="not UTF-8"):
        read_manifest(tmp_path / "latin1.csv")


def test_shards_are_disjoint_covering_balanced_and_order_independent() -> None:
    cases = [Case(f"c{k:02d}", Path("x"), None, k) for k in (7, 3, 11, 0, 5, 9, 1, 2, 10, 4, 8, 6, 12)]
    for count in range(1, 6):
        shards = [shard_cases(cases, i, count) for i in range(1, count + 1)]
        ids = [c.id for shard in shards for c in shard]
        assert sorted(ids) == sorted(c.id for c in cases), "every case in exactly one shard"
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        for shard in shards:  # manifest order kept within a shard
            assert [c.line for c in shard] == [c.line for c in cases if c in shard]
        reordered = [shard_cases(cases[::-1], i, count) for i in range(1, count + 1)]
        assert [{c.id for c in s} for s in reordered] == [{c.id for c in s} for s in shards]
    assert parse_shard("2/5") == (2, 5) and parse_shard(None) == (1, 1)
    for bad in ("0/3", "4/3", "1", "a/b", "1/0", "-1/2"):
        with pytest.raises(CTMRIError, match="give I/N"):
            parse_shard(bad)


def test_inputs_inside_a_case_folder_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cases = [Case("a", out / "a" / "synthetic_mri.nrrd", None, 2), Case("b", tmp_path / "ct.nrrd", None, 3)]
    with pytest.raises(CTMRIError, match="lies inside the output folder"):
        batch.check_inputs_outside_outputs(cases, out)
    batch.check_inputs_outside_outputs(cases[1:], out)  # beside the case folders is fine


def test_an_out_dir_holding_the_users_report_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    """A project folder given as --out-dir with its own report.md: the cohort summary would overwrite it."""
    paths = sample_paths()
    manifest = write_manifest(tmp_path / "cases.csv", [("a", str(paths["ct"]), "")])
    project = tmp_path / "project"
    project.mkdir()
    (project / "report.md").write_text("my notes\n")
    assert main(["batch", "--manifest", str(manifest), "--out-dir", str(project), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already holds report.md, not written by ctmri batch" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in project.iterdir()) == ["report.md"]
    assert (project / "report.md").read_text() == "my notes\n"
    (project / batch.STATE_DIR).mkdir()  # a cohort folder: its summary files are the batch's own
    batch.check_summary_files_free(project)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_batch_that_cannot_start_leaves_no_cohort_folder(cohort: Path, tmp_path: Path, capsys, monkeypatch,
                                                          jobs: str) -> None:
    """A damaged model file or a device the machine lacks: exit 2 before any work, as the README says, and no
    empty cohort folder (.ctmri-batch/) left behind, which used to be made first."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same meaning on a machine with a GPU
    damaged = tmp_path / "model.safetensors"
    data = bytearray(default_weights_path().read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    shutil.copy(str(default_weights_path()) + ".sha256", str(damaged) + ".sha256")
    for extra, message in ((["--device", "cuda"], "no CUDA GPU is available"), (["--weights", str(damaged)], "sha256")):
        out = tmp_path / "out"
        args = ["batch", "--manifest", str(cohort / "cases.csv"), "--out-dir", str(out), "--jobs", jobs,
                "--registration", "none", "--quiet", *extra]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "error:" in err and message in err, err
        assert not out.exists(), "nothing made"


def test_folder_fingerprint_changes_with_its_files(tmp_path: Path) -> None:
    folder = tmp_path / "dicom"
    folder.mkdir()
    (folder / "1.dcm").write_bytes(b"a" * 10)
    first = batch.input_fingerprint(folder)
    assert first["files"] == 1 and first["size"] == 10
    assert batch.input_fingerprint(folder) == first
    (folder / "2.dcm").write_bytes(b"b")
    assert batch.input_fingerprint(folder) != first
    second = batch.input_fingerprint(folder)
    stat = (folder / "1.dcm").stat()
    (folder / "1.dcm").write_bytes(b"c" * 10)  # rewritten in place: same name and size, a new time
    os.utime(folder / "1.dcm", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert batch.input_fingerprint(folder) != second
    assert batch.input_fingerprint(tmp_path / "gone.nrrd")["missing"] is True


def test_worker_threads_divide_the_cores() -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert batch.worker_threads(1) == cores
    assert batch.worker_threads(cores) == 1 and batch.worker_threads(cores * 4) == 1


def test_concurrent_merges_end_with_every_record(tmp_path: Path) -> None:
    """Two shards merging while records appear: the last merge includes all (no lock)."""
    cases = [Case(f"c{k}", tmp_path / "x", None, k) for k in range(40)]
    (tmp_path / batch.STATE_DIR).mkdir()
    expected = {c.id: {"ct": c.id} for c in cases}

    def shard(part: list) -> None:
        for case in part:
            batch.write_json_atomic(batch.record_path(tmp_path, case.id), {
                "id": case.id, "status": "error", "message": "m", "seconds": 0.0, "made_from": expected[case.id]})
            batch.merge_summary(tmp_path, cases, expected, {})

    threads = [threading.Thread(target=shard, args=(cases[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(read_summary(tmp_path)) == sorted(c.id for c in cases)
    assert not list(tmp_path.rglob(".partial-*")) and not list(tmp_path.rglob("*.tmp")), "no temporary files left"


# --------------------------------------------------------------------------------------------------
# Runs on the sample


@pytest.mark.skipif(os.name != "posix", reason="whether a process lives is asked with signal 0 (POSIX)")
def test_a_record_half_written_by_a_killed_run_is_removed_by_the_next_batch(cohort: Path, tmp_path: Path) -> None:
    """A worker killed outright while writing its record (or a summary) left it under its temporary name for good.
    The next batch into the folder removes such files when they are this machine's and their process is gone; one
    of a live process or of another machine (a shard on another node of a shared disk) stays."""
    import socket

    manifest = write_manifest(tmp_path / "cases.csv", [("s1", str(cohort / "crop" / "ct.nrrd"), "")])
    out = tmp_path / "out"
    (out / batch.STATE_DIR).mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = socket.gethostname()
    stale = [out / batch.STATE_DIR / f".partial-{host}-{gone.pid}-1a2b3c4d.tmp", out / f".partial-{host}-{gone.pid}-9f.tmp"]
    kept = [out / batch.STATE_DIR / f".partial-{host}-{os.getpid()}-live.tmp",
            out / batch.STATE_DIR / f".partial-othernode-{gone.pid}-x9.tmp"]
    for path in stale + kept:
        path.write_text('{"id": "s1", "status": "o', encoding="utf-8")  # cut short
    from CTtoMRISynthesisLib.case import CaseOptions

    assert batch.run_batch(manifest, out, CaseOptions(registration="none", device="cpu"), progress=False).exit_code == 0
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)
    assert read_summary(out)["s1"]["status"] == "ok"


def test_cases_equal_synthesize_and_a_failure_is_recorded(jobs1, cohort: Path, tmp_path: Path) -> None:
    code, out = jobs1
    assert code == batch.EXIT_CASES_FAILED, "a failed case makes the exit status non-zero"
    rows = read_summary(out)
    assert list(rows) == ["a", "b", "bad"]
    assert rows["a"]["status"] == "ok" and float(rows["a"]["mae"]) > 0 and float(rows["a"]["ssim"]) > 0
    assert rows["b"]["status"] == "ok" and rows["b"]["mae"] == "", "no MRI, no metrics"
    assert rows["bad"]["status"] == "error" and "broken.nrrd" in rows["bad"]["message"]
    assert "\n" not in rows["bad"]["message"] and not (out / "bad").exists(), "nothing written for a failed case"
    assert set(json.loads((out / "summary.json").read_text())["cases"][0]) >= {"id", "status", "message", "seconds"}

    # Each case folder holds exactly what `ctmri synthesize` writes for that case, with the same content.
    for case, ct, mri in (("a", "ct.nrrd", "mri.nrrd"), ("b", "crop/ct.nrrd", None)):
        alone = tmp_path / case
        args = ["synthesize", "--ct", str(cohort / ct), "--out-dir", str(alone), *FAST]
        assert main(args + (["--mri", str(cohort / mri)] if mri else [])) == 0
        assert sorted(p.name for p in (out / case).iterdir()) == sorted(p.name for p in alone.iterdir())
        for name in IMAGES:
            if (alone / name).exists():
                a, b = sitk.ReadImage(str(out / case / name)), sitk.ReadImage(str(alone / name))
                assert a.GetSize() == b.GetSize() and a.GetOrigin() == b.GetOrigin()
                np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        batch_metrics = json.loads((out / case / "metrics.json").read_text())
        alone_metrics = json.loads((alone / "metrics.json").read_text())
        assert batch_metrics["made_from"]["ct"] == {"path": ct, "size": (cohort / ct).stat().st_size,
                                                    "mtime_ns": (cohort / ct).stat().st_mtime_ns}
        for key in ("mae", "ssim", "psnr", "mae_whole", "ssim_foreground", "per_slice", "weights"):
            assert batch_metrics.get(key) == alone_metrics.get(key)

    report = (out / "report.md").read_text()
    assert "| mae |" in report and "1 failed" in report and "| bad | error |" in report
    # the mean uncertainty is over both ok cases, the scores over the one with an MRI: the heading says so
    assert "uncertainty_mean over every case whose model gives one" in report and "with an MRI (" not in report
    assert [line.split("|")[-2].strip() for line in report.splitlines()
            if line.startswith(("| mae |", "| uncertainty_mean |"))] == ["1", "2"]


def test_resume_skips_complete_cases_and_redoes_changed_ones(cohort: Path, tmp_path: Path, capsys, tiny_weights) -> None:
    work = tmp_path / "in"
    work.mkdir()
    for name in ("ct.nrrd", "mri.nrrd"):
        shutil.copy(cohort / name, work / name)
    shutil.copy(cohort / "crop" / "ct.nrrd", work / "ct_crop.nrrd")
    manifest = write_manifest(work / "cases.csv", [("a", "ct.nrrd", "mri.nrrd"), ("b", "ct_crop.nrrd", "")])
    out = tmp_path / "out"
    run = ["batch", "--manifest", str(manifest), "--out-dir", str(out), *FAST]
    assert main(run) == 0
    before = {c: mtimes(out / c) for c in ("a", "b")}

    capsys.readouterr()
    assert main(run) == 0
    assert "2 already complete, 0 to run" in capsys.readouterr().out
    assert {c: mtimes(out / c) for c in ("a", "b")} == before, "finished cases are not rewritten"

    # The same cohort mounted elsewhere (another node of a cluster; times kept): still complete.
    moved = tmp_path / "mounted_elsewhere"
    shutil.copytree(work, moved)  # copy2: sizes and modification times kept
    assert main(["batch", "--manifest", str(moved / "cases.csv"), *run[3:]]) == 0
    assert "2 already complete, 0 to run" in capsys.readouterr().out

    # A changed input (new content, so new size/mtime) redoes that case only.
    image = sitk.ReadImage(str(work / "ct_crop.nrrd"))
    sitk.WriteImage(image[:, :, 1:], str(work / "ct_crop.nrrd"), True)
    assert main(run) == 0
    assert mtimes(out / "a") == before["a"]
    assert mtimes(out / "b") != before["b"]
    assert sitk.ReadImage(str(out / "b" / "synthetic_mri.nrrd")).GetSize()[2] == 5

    # An incomplete case (its metrics.json, moved in last, missing) is redone.
    (out / "a" / "metrics.json").unlink()
    capsys.readouterr()
    assert main(run) == 0
    assert "1 already complete, 1 to run" in capsys.readouterr().out
    assert (out / "a" / "metrics.json").is_file()

    # A changed option that changes outputs redoes all; how a case runs (--batch-size) does not.
    capsys.readouterr()
    assert main(run + ["--batch-size", "2"]) == 0
    assert "0 to run" in capsys.readouterr().out
    assert main(run + ["--allow-disjoint"]) == 0  # a registration option: only the case with an MRI is redone
    assert "1 already complete, 1 to run" in capsys.readouterr().out
    assert json.loads((out / "a" / "metrics.json").read_text())["made_from"]["options"]["allow_disjoint"] is True
    assert "allow_disjoint" not in json.loads((out / "b" / "metrics.json").read_text())["made_from"]["options"]

    # Another model redoes all (its sha256 is in made_from; --weights itself is not an output option).
    assert main(run + ["--allow-disjoint", "--weights", str(tiny_weights)]) == 0
    assert "0 already complete, 2 to run" in capsys.readouterr().out
    record = json.loads((out / "a" / "metrics.json").read_text())
    assert record["weights"]["sha256"] == record["made_from"]["weights_sha256"] == sha256_of(tiny_weights)

    # A changed input that now fails: the case is an error, its folder keeps the earlier run's files untouched, and
    # the message says whose files they are (else they pass for this run's).
    (work / "ct_crop.nrrd").write_bytes(b"NRRD0004\nthis is not an image\n")
    kept = mtimes(out / "b")
    assert main(run + ["--allow-disjoint", "--weights", str(tiny_weights)]) == 1
    row = read_summary(out)["b"]
    assert row["status"] == "error" and "the files in b/ are an earlier run's, kept as they were" in row["message"]
    assert mtimes(out / "b") == kept


def test_dicom_outputs_like_synthesize_and_resumed(cohort: Path, tmp_path: Path, capsys) -> None:
    """--dicom: each case folder also holds synthesize --dicom's series; a rerun keeps them as they are."""
    pytest.importorskip("pydicom")
    manifest = write_manifest(tmp_path / "cases.csv", [("a", str(cohort / "ct.nrrd"), str(cohort / "mri.nrrd"))])
    out = tmp_path / "out"
    run = ["batch", "--manifest", str(manifest), "--out-dir", str(out), "--dicom", *FAST]
    assert main(run) == 0
    alone = tmp_path / "alone"
    assert main(["synthesize", "--ct", str(cohort / "ct.nrrd"), "--mri", str(cohort / "mri.nrrd"),
                 "--out-dir", str(alone), "--dicom", *FAST]) == 0

    def tree(folder: Path) -> list:
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))

    assert tree(out / "a") == tree(alone) and (out / "a" / "dicom").is_dir()
    before = {str(p): p.stat().st_mtime_ns for p in (out / "a").rglob("*")}
    capsys.readouterr()
    assert main(run) == 0
    assert "1 already complete, 0 to run" in capsys.readouterr().out
    assert {str(p): p.stat().st_mtime_ns for p in (out / "a").rglob("*")} == before
    (out / "a" / "dicom").rename(tmp_path / "dicom_moved_away")  # an output gone: the case is redone
    assert main(run) == 0
    assert (out / "a" / "dicom").is_dir()


def test_a_ctrl_c_held_while_a_case_is_saved_stops_after_that_case(cohort: Path, tmp_path: Path, capsys,
                                                                  monkeypatch) -> None:
    """Ctrl-C during a case's final renames is held so that the case is whole; it used to be dropped there, and
    the batch went on to the next case. Now the case is kept and the batch stops (130), the next one not run."""
    manifest = write_manifest(tmp_path / "cases.csv", [("a", str(cohort / "crop" / "ct.nrrd"), ""),
                                                       ("b", str(cohort / "crop" / "ct.nrrd"), "")])
    out = tmp_path / "out"
    real_replace = os.replace
    sent = []

    def replace_with_ctrl_c(src, dst):
        if not sent and Path(dst).parent == out / "a":
            sent.append(dst)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between the case's renames
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_with_ctrl_c)
    assert main(["batch", "--manifest", str(manifest), "--out-dir", str(out), *FAST]) == 130
    monkeypatch.setattr(os, "replace", real_replace)
    assert sent and (out / "a" / "metrics.json").is_file() and not (out / "b").exists()
    assert "interrupted" in capsys.readouterr().err


def test_a_model_that_is_not_the_weights_the_batch_hashed_runs_no_case(cohort: Path, tmp_path: Path,
                                                                       tiny_weights: Path) -> None:
    """The batch hashes its weights file when it starts (``made_from``) and loads it after; a file replaced in
    between gives a model that is not the one every record would name: the case is refused, nothing written."""
    from CTtoMRISynthesisLib.case import CaseOptions
    from CTtoMRISynthesisLib.weights import load_model

    case = read_manifest(write_manifest(tmp_path / "cases.csv", [("a", str(cohort / "crop" / "ct.nrrd"), "")]))[0]
    options = CaseOptions(weights=str(default_weights_path()), device="cpu", registration="none")
    expected = batch.made_from(case, options, sha256_of(default_weights_path()))
    (tmp_path / "out" / batch.STATE_DIR).mkdir(parents=True)  # a cohort folder, as the batch makes it first
    record = batch.process_case(case, tmp_path / "out", options, expected, model=load_model(tiny_weights))
    assert record["status"] == "error" and "replaced after the batch started" in record["message"]
    assert not (tmp_path / "out" / "a").exists()


def test_failed_case_is_retried_on_rerun(cohort: Path, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "cases.csv", [("a", str(cohort / "ct.nrrd"), str(tmp_path / "mri.nrrd"))])
    out = tmp_path / "out"
    run = ["batch", "--manifest", str(manifest), "--out-dir", str(out), *FAST]
    assert main(run) == 1
    assert read_summary(out)["a"]["status"] == "error" and "MRI not found" in read_summary(out)["a"]["message"]
    shutil.copy(cohort / "mri.nrrd", tmp_path / "mri.nrrd")  # the user fixes the input
    assert main(run) == 0
    assert read_summary(out)["a"]["status"] == "ok"


def test_a_case_folder_holding_the_users_file_fails_that_case_only(cohort: Path, tmp_path: Path) -> None:
    """A case's folder goes through synthesize's rule: a file of the user's named like an output (here their own
    metrics.json in OUT/a/) fails that case with the reason, untouched; the other case runs."""
    manifest = write_manifest(tmp_path / "cases.csv", [("a", str(cohort / "crop" / "ct.nrrd"), ""),
                                                       ("b", str(cohort / "crop" / "ct.nrrd"), "")])
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "metrics.json").write_text('{"my": "notes"}\n')
    assert main(["batch", "--manifest", str(manifest), "--out-dir", str(out), *FAST]) == 1
    summary = read_summary(out)
    assert summary["a"]["status"] == "error" and "was not written by ctmri" in summary["a"]["message"]
    assert summary["b"]["status"] == "ok"
    assert sorted(p.name for p in (out / "a").iterdir()) == ["metrics.json"]
    assert (out / "a" / "metrics.json").read_text() == '{"my": "notes"}\n'


def test_shards_write_one_folder_and_merge_one_summary(cohort: Path, tmp_path: Path) -> None:
    rows = [("a", "ct.nrrd", "mri.nrrd"), ("b", "crop/ct.nrrd", ""), ("c", "crop/ct.nrrd", "crop/mri.nrrd")]
    manifest = write_manifest(tmp_path / "cases.csv", [(i, str(cohort / ct), str(cohort / m) if m else "")
                                                        for i, ct, m in rows])
    out = tmp_path / "out"
    run = ["batch", "--manifest", str(manifest), "--out-dir", str(out), *FAST]
    assert main(run + ["--shard", "2/2"]) == 0
    first = json.loads((out / "summary.json").read_text())
    assert [r["id"] for r in first["cases"]] == ["b"] and first["not_run"] == ["a", "c"]
    assert first["not_in_manifest"] == []  # another shard's cases are this manifest's: not named as foreign
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["b"]
    assert main(run + ["--shard", "1/2"]) == 0
    merged = read_summary(out)
    assert list(merged) == ["a", "b", "c"] and {r["status"] for r in merged.values()} == {"ok"}
    assert json.loads((out / "summary.json").read_text())["not_run"] == []
    assert "3 ok" in (out / "report.md").read_text() and "without a result" not in (out / "report.md").read_text()


def test_another_manifest_into_the_same_folder_keeps_and_names_the_first_ones_cases(cohort: Path, tmp_path: Path,
                                                                                    capsys) -> None:
    out = tmp_path / "out"
    first = write_manifest(tmp_path / "first.csv", [("a", str(cohort / "crop/ct.nrrd"), "")])
    second = write_manifest(tmp_path / "second.csv", [("b", str(cohort / "crop/ct.nrrd"), "")])
    assert main(["batch", "--manifest", str(first), "--out-dir", str(out), *FAST]) == 0
    assert "batch: 1 case in " in capsys.readouterr().out  # not "1 cases"
    before = {p: p.stat().st_mtime_ns for p in (out / "a").iterdir()}
    record = batch.record_path(out, "a").read_bytes()
    capsys.readouterr()
    assert main(["batch", "--manifest", str(second), "--out-dir", str(out), *FAST]) == 0
    err = capsys.readouterr().err
    # the second manifest's summary is its own, and says the first one's case is there
    summary = json.loads((out / "summary.json").read_text())
    assert [r["id"] for r in summary["cases"]] == ["b"] and summary["not_in_manifest"] == ["a"]
    report = (out / "report.md").read_text()
    assert "not in this manifest (1)" in report and "`a`" in report
    assert "note: 1 case in " in err and "not in this manifest (a)" in err
    # and nothing of the first manifest's case was touched
    assert {p: p.stat().st_mtime_ns for p in (out / "a").iterdir()} == before
    assert batch.record_path(out, "a").read_bytes() == record
    # a stray file in the records folder is not a case; an id differing only in case is the same case
    (out / batch.STATE_DIR / "notes by me.json").write_text("{}")
    assert batch.cases_not_in_manifest(out, [Case("A", tmp_path / "x", None, 2), Case("b", tmp_path / "x", None, 3)]) == []
    # run again with the first manifest: it summarises its case again, and names the second's
    assert main(["batch", "--manifest", str(first), "--out-dir", str(out), *FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["id"] for r in summary["cases"]] == ["a"] and summary["not_in_manifest"] == ["b"]


def test_a_long_error_is_kept_whole_in_the_summary_and_cut_on_the_console(cohort: Path, tmp_path: Path,
                                                                          capsys) -> None:
    deep = tmp_path.joinpath(*["a_folder_with_a_rather_long_name_as_exports_get"] * 8)
    deep.mkdir(parents=True)
    shutil.copy(cohort / "broken.nrrd", deep / "broken.nrrd")
    manifest = write_manifest(tmp_path / "cases.csv", [("long", str(deep / "broken.nrrd"), "")])
    out = tmp_path / "out"
    assert main(["batch", "--manifest", str(manifest), "--out-dir", str(out), *FAST]) == 1
    message = read_summary(out)["long"]["message"]
    assert len(message) > batch.CONSOLE_LIMIT and not message.endswith("…"), message
    assert json.loads(batch.record_path(out, "long").read_text())["message"] == message
    line = next(li for li in capsys.readouterr().out.splitlines() if li.startswith("error long"))
    assert line.endswith("… (whole message in summary.csv)") and len(line) < batch.CONSOLE_LIMIT + 40


def test_jobs_2_gives_the_results_of_jobs_1(jobs1, cohort: Path, tmp_path: Path) -> None:
    _, out1 = jobs1
    out2 = tmp_path / "out"
    assert main(["batch", "--manifest", str(cohort / "cases.csv"), "--out-dir", str(out2), "--jobs", "2", *FAST]) == 1
    rows1, rows2 = read_summary(out1), read_summary(out2)
    assert list(rows2) == list(rows1)
    for case in rows1:
        assert rows2[case]["status"] == rows1[case]["status"] and rows2[case]["message"] == rows1[case]["message"]
        for metric in ("mae", "ssim", "psnr", "mae_whole", "ssim_foreground"):
            if rows1[case][metric]:
                assert float(rows2[case][metric]) == pytest.approx(float(rows1[case][metric]), rel=1e-4)
    # Worker processes (not this one; which worker takes which case is up to the pool), each with half the cores.
    runners = [json.loads(batch.record_path(out2, case).read_text())["runner"] for case in rows2]
    assert 1 <= len({r["pid"] for r in runners}) <= 2 and os.getpid() not in {r["pid"] for r in runners}
    assert {r["torch_threads"] for r in runners} == {batch.worker_threads(2)}
    for case in ("a", "b"):
        assert sorted(p.name for p in (out2 / case).iterdir()) == sorted(p.name for p in (out1 / case).iterdir())
        # One thread per worker instead of two: float sums may round differently, nothing more.
        np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(out2 / case / "synthetic_mri.nrrd"))),
                                   sitk.GetArrayFromImage(sitk.ReadImage(str(out1 / case / "synthetic_mri.nrrd"))),
                                   atol=1e-2)


def test_the_console_line_of_a_case_with_metrics_keeps_its_warnings(capsys) -> None:
    """A case whose reference is a CT got only "ok … MAE 102.70 SSIM 0.5173" on the console, its warning in the
    summary alone, while its numbers enter the cohort's mean."""
    reporter = batch._Reporter(total=1, bar=False)
    reporter.case_done({"id": "p1", "status": "ok", "seconds": 1.2, "metrics": {"mae": 102.7, "ssim": 0.5173},
                        "message": "the reference MRI looks like a CT"})
    assert capsys.readouterr().out == "ok    p1  1.2 s  MAE 102.70 SSIM 0.5173; the reference MRI looks like a CT\n"


def _children(pid: int) -> list:
    """The process ids of ``pid``'s children (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through Linux /proc")
@pytest.mark.parametrize("other_worker", ["running", "stuck"])
def test_a_worker_killed_mid_batch_loses_no_case(cohort: Path, tmp_path: Path, other_worker: str) -> None:
    """A worker killed outright (the kernel's out-of-memory killer, a kill -9) broke the pool, and every case not
    finished by then, started or not, was recorded as "the worker process died". Now the cases not started go on in
    a new pool and those the dead worker may have held are run again one at a time: every case ends ok.

    "stuck": the other worker cannot act on the pool's SIGTERM (stopped here; in a real run, blocked forever on a
    queue lock the killed worker held when it died, which made a clean-clone CI run hang for 300 s): the batch
    still ends, and that worker's case is run again too."""
    rows = [(f"w{k}", str(cohort / "ct.nrrd"), str(cohort / "mri.nrrd")) for k in range(6)]
    manifest = write_manifest(tmp_path / "cases.csv", rows)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "CTtoMRISynthesisLib.cli", "batch", "--manifest", str(manifest),
               "--out-dir", str(out), "--jobs", "2", *FAST]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list(out.glob(batch.STATE_DIR + "/w*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)  # the first case has finished: both workers are up and busy
    workers = [pid for pid in _children(proc.pid)
               if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
    assert len(workers) == 2, f"expected two worker processes, found {workers}"
    if other_worker == "stuck":
        os.kill(workers[1], signal.SIGSTOP)
    os.kill(workers[0], signal.SIGKILL)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        for pid in workers[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # a hang's stopped worker must not outlive the test
        proc.kill()
    assert proc.returncode == 0, stdout + stderr
    assert "note: a worker process died" in stdout
    rows = read_summary(out)
    assert sorted(rows) == [f"w{k}" for k in range(6)] and {r["status"] for r in rows.values()} == {"ok"}, rows
    assert not list(out.rglob(".partial-*"))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through Linux /proc")
def test_ctrl_c_then_a_dead_worker_still_ends_the_batch(cohort: Path, tmp_path: Path) -> None:
    """Ctrl-C, then a worker dies while the batch is stopping, and the other cannot act on the pool's SIGTERM
    (stopped here; in a real run, blocked on a lock the dead one held): the shutdown waited for it forever. Now the
    batch kills it, stops as interrupted, and keeps no half-written case."""
    rows = [(f"c{k}", str(cohort / "ct.nrrd"), str(cohort / "mri.nrrd")) for k in range(6)]
    manifest = write_manifest(tmp_path / "cases.csv", rows)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "CTtoMRISynthesisLib.cli", "batch", "--manifest", str(manifest),
               "--out-dir", str(out), "--jobs", "2", *FAST]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 180
    while not list(out.glob(batch.STATE_DIR + "/c*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    workers = [pid for pid in _children(proc.pid)
               if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
    assert len(workers) == 2, f"expected two worker processes, found {workers}"
    os.kill(workers[1], signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)  # the parent is stopping the batch when the other worker dies
    os.kill(workers[0], signal.SIGKILL)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(workers[1], signal.SIGKILL)
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in stderr, stdout + stderr


@pytest.mark.slow
@pytest.mark.parametrize("jobs, stop", [("2", "ctrl-c"), ("1", "sigterm")])
def test_stop_is_clean_leaving_only_complete_cases(cohort: Path, tmp_path: Path, jobs: str, stop: str) -> None:
    """Ctrl-C at a terminal (SIGINT to the whole process group) while two workers run cases, or a
    scheduler's SIGTERM (SLURM at the time limit) to a one-job batch."""
    rows = [(f"r{k}", str(cohort / "ct.nrrd"), str(cohort / "mri.nrrd")) for k in range(8)]
    manifest = write_manifest(tmp_path / "cases.csv", rows)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "CTtoMRISynthesisLib.cli", "batch", "--manifest", str(manifest),
               "--out-dir", str(out), "--jobs", jobs, *FAST]
    # SIG_DFL in the child: a runner started in the background (`cmd &` in a script) passes SIGINT on ignored,
    # and a Python started with SIGINT ignored never raises KeyboardInterrupt (measured: rc 0 instead of 130)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(out.glob(batch.STATE_DIR + "/r*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)  # wait until the first case has finished
    if stop == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr  # stopped after the first of 8 cases: most were still to come
    assert "interrupted" in stderr and "rerun the same command to resume" in stderr
    finished = {r["id"] for r in json.loads((out / "summary.json").read_text())["cases"]}
    assert finished, "the case finished before Ctrl-C is kept"
    for case in (out / f"r{k}" for k in range(8)):
        if case.name in finished:
            assert (case / "metrics.json").is_file() and (case / "synthetic_mri.nrrd").is_file()
        else:
            assert not case.exists(), f"half-written case folder {case.name}: {list(case.iterdir())}"
    assert not list(out.rglob(".partial-*")) and not list(out.rglob("*.tmp"))
    # What was kept is complete: a rerun with the same command skips it.
    from CTtoMRISynthesisLib.case import CaseOptions

    options = CaseOptions(registration="none", device="cpu")
    sha = sha256_of(default_weights_path())
    for case in read_manifest(manifest):
        if case.id in finished:
            assert batch.complete_record(out, case, batch.made_from(case, options, sha)) is not None


def test_mri_picture_spacing_is_part_of_made_from_only_when_it_matters(tmp_path: Path) -> None:
    """Given, it changes a case with an MRI (redo it); not given, made_from is what it was before the option
    existed, so that a cohort finished by an earlier version is not redone after an upgrade."""
    from CTtoMRISynthesisLib.case import CaseOptions

    (tmp_path / "ct.nrrd").write_bytes(b"x")
    (tmp_path / "mri.nrrd").write_bytes(b"y")
    paired = Case("a", tmp_path / "ct.nrrd", tmp_path / "mri.nrrd", 2)
    alone = Case("b", tmp_path / "ct.nrrd", None, 3)
    plain, own = CaseOptions(), CaseOptions(mri_picture_spacing=(1.8, 5.0))
    assert "mri_picture_spacing" not in batch.made_from(paired, plain, "sha")["options"]
    assert batch.made_from(paired, own, "sha")["options"]["mri_picture_spacing"] == [1.8, 5.0]
    assert batch.made_from(alone, own, "sha") == batch.made_from(alone, plain, "sha")


def test_series_taken_names_a_series_without_a_number_by_its_uid() -> None:
    assert batch.series_taken({"ct_series": {"number": 3, "uid": "1.2"}}) == "CT 3"
    assert batch.series_taken({"ct_series": {"number": 3}, "mri_series": {"number": None, "uid": "1.2.3"}}) == \
        "CT 3, MRI UID 1.2.3"
    assert batch.series_taken({"ct_pictures": {"files": 6}}) == ""  # pictures and files: no series
