"""The `ctmri` command: outputs read back by a second reader, errors as one line, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import phantoms
from CTtoMRISynthesisLib.cli import main


@pytest.fixture(scope="module")
def case_files(tmp_path_factory) -> tuple[Path, Path]:
    """A synthetic patient (phantom) as an 8-bit windowed CT and a T2 MRI .nrrd volume (256×256×17)."""
    folder = tmp_path_factory.mktemp("case33")
    paths = []
    for modality, array in zip(("CT", "MRI"), phantoms.slice_pair(seed=33, slices=17, first_z=-40.0)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.9, 0.9, 5.0))
        path = folder / f"{modality.lower()}.nrrd"
        sitk.WriteImage(image, str(path))
        paths.append(path)
    return paths[0], paths[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "CTtoMRISynthesisLib.cli", *args], capture_output=True, text=True)


def test_synthesize_with_mri_writes_readable_outputs(case_files, tiny_weights: Path, tmp_path: Path, capsys) -> None:
    ct, mri = case_files
    before = {p: p.read_bytes() for p in (ct, mri)}
    out = tmp_path / "out"
    code = main(["synthesize", "--ct", str(ct), "--mri", str(mri), "--out-dir", str(out),
                 "--weights", str(tiny_weights), "--registration", "none", "--device", "cpu", "--quiet"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["synthetic_mri.nrrd", "uncertainty.nrrd", "ct_registered.nrrd", "difference.nrrd", "transform.tfm",
         "metrics.json", ".ctmri-manifest.json"])
    assert sorted(json.loads((out / ".ctmri-manifest.json").read_text())["files"]) == sorted(
        p.name for p in out.iterdir() if not p.name.startswith("."))  # the list of what the run wrote
    mri_image = sitk.ReadImage(str(mri))
    for name in ("synthetic_mri.nrrd", "ct_registered.nrrd", "difference.nrrd"):
        image = sitk.ReadImage(str(out / name))  # a second reader: SimpleITK from disk
        assert image.GetSize() == mri_image.GetSize()
        np.testing.assert_allclose(image.GetSpacing(), mri_image.GetSpacing())
    sitk.ReadTransform(str(out / "transform.tfm"))
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("mae", "ssim", "psnr", "mae_whole", "ssim_foreground", "per_slice", "registration", "device", "seconds"):
        assert key in metrics
    assert metrics["device"] == "cpu" and metrics["registration"]["mode"] == "none"
    # what the registration decided is printed, as the demo does (it was only inside metrics.json)
    assert "registration: none, overlap 100% of the MRI head" in capsys.readouterr().out
    assert [row["index"] for row in metrics["per_slice"]] == list(range(17))
    assert {p: p.read_bytes() for p in (ct, mri)} == before, "inputs untouched"

    # `evaluate` on the written synthetic MRI reproduces the same numbers.
    code = main(["evaluate", "--pred", str(out / "synthetic_mri.nrrd"), "--ref", str(mri), "--json", str(tmp_path / "e.json")])
    assert code == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    for key in ("mae", "ssim", "psnr", "mae_whole", "ssim_foreground"):
        assert evaluated[key] == pytest.approx(metrics[key], rel=1e-5)
    # ... but never into the run's own record (its metrics.json, or the list of its files), which it replaced
    for record in ("metrics.json", ".ctmri-manifest.json"):
        kept = (out / record).read_bytes()
        assert main(["evaluate", "--pred", str(out / "synthetic_mri.nrrd"), "--ref", str(mri),
                     "--json", str(out / record)]) == 2
        assert (out / record).read_bytes() == kept
    assert (out / "evaluation.json").exists() is False and main([
        "evaluate", "--pred", str(out / "synthetic_mri.nrrd"), "--ref", str(mri), "--json", str(out / "evaluation.json")]) == 0
    # ... nor into a copy of that record elsewhere: it is the run's account (registration, model, times), not ours
    (tmp_path / "run_record.json").write_bytes((out / "metrics.json").read_bytes())
    assert main(["evaluate", "--pred", str(out / "synthetic_mri.nrrd"), "--ref", str(mri),
                 "--json", str(tmp_path / "run_record.json")]) == 2
    assert (tmp_path / "run_record.json").read_bytes() == (out / "metrics.json").read_bytes()


def test_synthesize_without_mri(case_files, tiny_weights: Path, tmp_path: Path, capsys) -> None:
    ct, _ = case_files
    out = tmp_path / "out"
    assert main(["synthesize", "--ct", str(ct), "--out-dir", str(out), "--weights", str(tiny_weights), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        ".ctmri-manifest.json", "metrics.json", "synthetic_mri.nrrd", "uncertainty.nrrd"]
    assert "mae" not in json.loads((out / "metrics.json").read_text())
    assert capsys.readouterr().err == "", "--quiet prints no progress"


def test_synthesize_into_a_log_prints_progress_lines(case_files, tiny_weights: Path, tmp_path: Path) -> None:
    """Run by a script or a scheduler (stderr not a terminal), synthesize printed no progress at all: a long case
    looked hung in its log. It now prints plain lines, a few a stage, from start to done."""
    ct, _ = case_files
    done = run_cli("synthesize", "--ct", str(ct), "--out-dir", str(tmp_path / "out"), "--weights", str(tiny_weights),
                   "--device", "cpu")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if " % " in line]
    assert "\r" not in done.stderr and 5 <= len(lines) <= 40, done.stderr
    assert "% synthesise" in done.stderr and lines[-1].endswith("100 % done")
    percents = [int(line.split(" s ", 1)[1].split("%")[0]) for line in lines]
    assert percents == sorted(percents), "the percentages only grow"


def test_evaluate_json_never_replaces_an_image_and_fails_before_the_work(case_files, tmp_path: Path, capsys) -> None:
    """``--json`` naming the reference MRI (a slip) used to overwrite it with the metrics; a --json in a missing
    folder failed with a traceback after the work. Both are refused first, in one line, the inputs untouched;
    PSNR of identical images prints as such (it is null in the JSON)."""
    _, mri = case_files
    before = mri.read_bytes()
    for target, message in ((mri, "give a file name ending in .json"), (tmp_path / "no" / "e.json", "does not exist")):
        assert main(["evaluate", "--pred", str(mri), "--ref", str(mri), "--json", str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --json") and message in err[0], err
    assert mri.read_bytes() == before
    assert main(["evaluate", "--pred", str(mri), "--ref", str(mri), "--pred-scale", "minmax",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert "PSNR inf (identical)" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["psnr"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json"]  # no temporary file beside it


def test_evaluate_json_replaces_only_an_earlier_evaluate_result(case_files, tmp_path: Path, capsys) -> None:
    """``--json`` over a user's own ``.json`` (here their notes, a JSON of theirs with an ``mae`` key, a link to
    an evaluation) used to overwrite it without a word; now refused before the work, in one line saying what to
    do, the file as it was. An earlier ``evaluate`` result is still replaced, whole, as a rerun expects."""
    ct, mri = case_files
    theirs = {"notes.json": "my notes, not JSON\n", "mine.json": json.dumps({"mae": 12.5, "who": "me"}) + "\n"}
    for name, text in theirs.items():
        (tmp_path / name).write_text(text)
    assert main(["evaluate", "--pred", str(mri), "--ref", str(mri), "--json", str(tmp_path / "e.json")]) == 0
    (tmp_path / "link.json").symlink_to(tmp_path / "e.json")
    evaluation = (tmp_path / "e.json").read_bytes()
    capsys.readouterr()
    for name in (*theirs, "link.json"):
        assert main(["evaluate", "--pred", str(ct), "--ref", str(mri), "--json", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is not an earlier `ctmri evaluate` result" in err[0] and "choose another name" in err[0], err
    assert {name: (tmp_path / name).read_text() for name in theirs} == theirs
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "e.json").read_bytes() == evaluation
    # an earlier result is replaced by the new one (the CT scored, not the MRI against itself), no temporary left
    assert main(["evaluate", "--pred", str(ct), "--ref", str(mri), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["mae"] > json.loads(evaluation)["mae"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "link.json", "mine.json", "notes.json"]


def test_evaluate_warns_when_the_reference_is_a_ct(case_files, capsys) -> None:
    """A CT file given as --ref was scored without a word (synthesize warns about the same slip); now warned on
    the console, and the real MRI is not."""
    ct, mri = case_files
    for reference, warned in ((ct, True), (mri, False)):
        assert main(["evaluate", "--pred", str(mri), "--ref", str(reference)]) == 0
        err = capsys.readouterr().err
        assert ("warning: the reference MRI looks like a CT (" in err) is warned, err


def test_evaluate_refuses_a_prediction_that_misses_the_reference(case_files, tmp_path: Path, capsys) -> None:
    """Another patient's MRI, another space or a wrong spacing: the prediction's grid covers little of the
    reference's head. That used to be scored with zeros for the missing part, exit 0 (another patient's MRI
    scored better than the right one); below half it is refused, and a partial cover is said."""
    _, mri = case_files
    image = sitk.ReadImage(str(mri))
    size_x = image.GetSize()[0] * image.GetSpacing()[0]
    for shift, covered in ((0.8, None), (0.3, "covers")):
        moved = sitk.Image(image)
        moved.SetOrigin((shift * size_x, 0.0, 0.0))
        sitk.WriteImage(moved, str(tmp_path / "moved.nrrd"))
        code = main(["evaluate", "--pred", str(tmp_path / "moved.nrrd"), "--ref", str(mri)])
        err = capsys.readouterr().err
        if covered is None:
            assert code == 2 and "error: the prediction covers only" in err and "at least 50% is needed" in err, err
        else:
            assert code == 0 and "resampled onto the reference grid (it covers" in err, err


def test_evaluate_warns_about_a_prediction_off_the_0_255_scale(case_files, tmp_path: Path, capsys) -> None:
    """A CT in Hounsfield units given as --pred scored MAE 520 and PSNR -11.8 dB without a word: it is scored as
    asked, with a warning in the output and the JSON; --pred-scale minmax (or a 0..255 prediction) has none."""
    _, mri = case_files
    image = sitk.ReadImage(str(mri), sitk.sitkFloat32)
    sitk.WriteImage(image * 8.0 - 1000.0, str(tmp_path / "hu.nrrd"))
    assert main(["evaluate", "--pred", str(tmp_path / "hu.nrrd"), "--ref", str(mri), "--json", str(tmp_path / "e.json")]) == 0
    err = capsys.readouterr().err
    assert "warning: the prediction's values run from -1000 to" in err and "--pred-scale minmax" in err, err
    assert "outside the 0..255 scale" in json.loads((tmp_path / "e.json").read_text())["warnings"][0]
    assert main(["evaluate", "--pred", str(tmp_path / "hu.nrrd"), "--ref", str(mri), "--pred-scale", "minmax"]) == 0
    assert main(["evaluate", "--pred", str(mri), "--ref", str(mri)]) == 0
    assert "warning" not in capsys.readouterr().err
    sitk.WriteImage(image / 255.0, str(tmp_path / "unit.nrrd"))  # a network's 0..1 output: scored as near-black
    assert main(["evaluate", "--pred", str(tmp_path / "unit.nrrd"), "--ref", str(mri)]) == 0
    assert "as a 0..1 image, where the metrics assume 0..255" in capsys.readouterr().err


def test_evaluate_pred_scale_minmax_scales_the_prediction(rire_mr_path: Path, capsys) -> None:
    """The real RIRE T1 (values up to ~1600) against itself: the reference is min-max scaled, so only with
    --pred-scale minmax do the two agree exactly (MAE 0, PSNR infinite); as-is it is scored off scale, and said."""
    argv = ["evaluate", "--pred", str(rire_mr_path), "--ref", str(rire_mr_path)]
    assert main([*argv, "--pred-scale", "minmax"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("MAE 0.00") and "PSNR inf (identical)" in captured.out and captured.err == "", captured
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert not captured.out.startswith("MAE 0.00") and "outside the 0..255 scale" in captured.err


def test_evaluate_says_what_it_read_and_an_assumed_spacing(tmp_path: Path, capsys) -> None:
    """Folders of pictures: the stacking line for each, the '1 mm assumed' warning that --help promises, and
    the JSON's record of both (it had none)."""
    _, mri = phantoms.slice_pair(seed=3, slices=4, first_z=0.0)
    phantoms.write_pictures(tmp_path / "ref", mri, name="MR ({}).png")
    phantoms.write_pictures(tmp_path / "pred", mri, name="syn ({}).png")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                 "--json", str(tmp_path / "e.json")]) == 0
    err = capsys.readouterr().err
    assert "note: prediction: 4 pictures from" in err and "note: reference MRI: 4 pictures from" in err
    assert "warning: the reference MRI pictures record no spacing: 1 mm was assumed" in err
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["inputs"]["reference_MRI"]["spacing_assumed"] is True and len(record["warnings"]) == 2
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                 "--picture-spacing", "0.9", "5"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_picture_spacing_no_input_uses_is_said(case_files, tiny_weights: Path, tmp_path: Path, capsys) -> None:
    """``--picture-spacing`` with volume files (which carry their own spacing) is ignored: both commands say so,
    synthesize in metrics.json too (evaluate said nothing before)."""
    ct, mri = case_files
    assert main(["evaluate", "--pred", str(mri), "--ref", str(mri), "--picture-spacing", "0.5", "2",
                 "--json", str(tmp_path / "e.json")]) == 0
    said = "--picture-spacing was given, but no input is a folder of pictures: it was not used"
    assert f"warning: {said}" in capsys.readouterr().err
    assert json.loads((tmp_path / "e.json").read_text())["warnings"] == [said]
    assert main(["synthesize", "--ct", str(ct), "--weights", str(tiny_weights), "--out-dir", str(tmp_path / "o"),
                 "--picture-spacing", "0.5", "2"]) == 0
    assert said in json.loads((tmp_path / "o" / "metrics.json").read_text())["warnings"]


@pytest.mark.parametrize("value", ["0", "-3", "four"])
def test_batch_size_below_one_is_refused(case_files, tmp_path: Path, capsys, value: str) -> None:
    """0 used to mean the default and a negative number 1, silently."""
    ct, _ = case_files
    for command in (["synthesize", "--ct", str(ct), "--out-dir", str(tmp_path / "out")],
                    ["batch", "--manifest", str(tmp_path / "m.csv"), "--out-dir", str(tmp_path / "cohort")]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--batch-size", value])
        assert exit_info.value.code == 2
        assert "give a whole number of slices >= 1" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [
    ["synthesize", "--ct", "ct.nrrd", "--out-dir", ""],
    ["synthesize", "--ct", "", "--out-dir", "out"],
    ["evaluate", "--pred", " ", "--ref", "r.nrrd"],
    ["batch", "--manifest", "m.csv", "--out-dir", ""],
    ["train", "--data", "d", "--out", ""],
    ["report", "--data", "", "--out", "r"],
])
def test_an_empty_path_is_refused_before_anything(command, tmp_path: Path, capsys, monkeypatch) -> None:
    """``--out-dir "$OUT"`` with OUT unset meant the current folder, which became a results (or cohort) folder;
    ``--ct ""`` searched the whole current folder for DICOM."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert exit_info.value.code == 2
    assert "an empty path (an unset variable?); give a file or folder name" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["train", "--data", "DATA", "--out", "FILE"],
                                     ["report", "--data", "DATA", "--out", "FILE"]])
def test_train_and_report_refuse_a_file_as_out_before_the_work(command, case_files, tmp_path: Path, capsys) -> None:
    """A file given as --out: a traceback (FileExistsError), after 41 s of work for report; now one error line
    first, as synthesize and batch say it, the file untouched."""
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    argv = [str(target) if a == "FILE" else str(tmp_path / "nowhere") if a == "DATA" else a for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: the output folder {target} is an existing file; choose a folder for --out"], err
    assert target.read_text() == "mine\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_help_is_fast_and_lists_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("synthesize", "evaluate", "demo"):
        assert command in result.stdout


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("missing-ct", "CT not found"),
        ("text-ct", "cannot read CT"),
        ("rgb-ct", "components"),
        ("constant-ct", "constant"),
        ("nan-ct", "NaN"),
        ("bad-weights", "does not match its recorded sha256"),
        ("missing-weights", "weights file not found"),
    ],
)
def test_user_errors_are_one_line_and_leave_nothing(problem, expected, case_files, tiny_weights, tmp_path: Path) -> None:
    ct, _ = case_files
    weights = tiny_weights
    if problem == "missing-ct":
        ct = tmp_path / "nope.nrrd"
    elif problem == "text-ct":
        ct = tmp_path / "text.nrrd"
        ct.write_text("not an image")
    elif problem == "rgb-ct":
        ct = tmp_path / "rgb.png"
        colour = np.zeros((32, 32, 3), np.uint8)
        colour[..., 0] = 200  # red: a colour image, not grey saved as RGB (which is read as grey)
        sitk.WriteImage(sitk.GetImageFromArray(colour, isVector=True), str(ct))
    elif problem in ("constant-ct", "nan-ct"):
        array = np.full((4, 32, 32), 5.0, dtype=np.float32)
        if problem == "nan-ct":
            array[0, 0, 0] = np.nan
            array[1] = 100
        ct = tmp_path / f"{problem}.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(array), str(ct))
    elif problem == "bad-weights":
        weights = tmp_path / "w.safetensors"
        data = bytearray(tiny_weights.read_bytes())
        data[-50] ^= 1
        weights.write_bytes(bytes(data))
        (tmp_path / "w.safetensors.sha256").write_text(tiny_weights.with_name(tiny_weights.name + ".sha256").read_text())
    elif problem == "missing-weights":
        weights = tmp_path / "none.safetensors"
    out = tmp_path / "out"
    result = run_cli("synthesize", "--ct", str(ct), "--out-dir", str(out), "--weights", str(weights), "--quiet")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; permission bits do not stop it")
def test_unwritable_out_dir(case_files, tiny_weights, tmp_path: Path) -> None:
    ct, _ = case_files
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    result = run_cli("synthesize", "--ct", str(ct), "--out-dir", str(locked / "out"), "--weights", str(tiny_weights), "--quiet")
    assert result.returncode == 2 and result.stderr.startswith("error: ")


def test_out_dir_that_is_a_file(case_files, tiny_weights, tmp_path: Path) -> None:
    ct, _ = case_files
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("synthesize", "--ct", str(ct), "--out-dir", str(blocker / "out"), "--weights", str(tiny_weights), "--quiet")
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert blocker.read_text() == "x"


def test_disjoint_ct_and_mri_are_refused_unless_allowed(case_files, tiny_weights: Path, tmp_path: Path, capsys) -> None:
    """An MRI with scanner coordinates 1 m away: refused with the flag to use; with it, aligned by centres."""
    ct, mri = case_files
    far = sitk.ReadImage(str(mri))
    far.SetOrigin(tuple(np.add(far.GetOrigin(), (1000.0, 0.0, 0.0))))
    far_path = tmp_path / "far_mri.nrrd"
    sitk.WriteImage(far, str(far_path))
    args = ["synthesize", "--ct", str(ct), "--mri", str(far_path), "--weights", str(tiny_weights), "--device", "cpu",
            "--quiet"]
    assert main(args + ["--out-dir", str(tmp_path / "refused")]) == 2
    assert "--allow-disjoint for ctmri synthesize or batch" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
    assert main(args + ["--out-dir", str(tmp_path / "out"), "--allow-disjoint"]) == 0
    registration = json.loads((tmp_path / "out" / "metrics.json").read_text())["registration"]
    assert registration["overlap"] > 0.9
    # The CT lands on the MRI: the centre translation undoes the 1 m shift (within a few millimetres).
    offset = np.asarray(sitk.ReadTransform(str(tmp_path / "out" / "transform.tfm")).TransformPoint(far.TransformContinuousIndexToPhysicalPoint((128, 128, 8))))
    expected = np.asarray(far.TransformContinuousIndexToPhysicalPoint((128, 128, 8))) - (1000.0, 0.0, 0.0)
    assert np.linalg.norm(offset - expected) < 5.0


def test_progress_lines_stay_few_on_a_long_case() -> None:
    """A 300-slice case reports each batch of slices; the log gets a line per tenth, not one per batch."""
    import io

    from CTtoMRISynthesisLib.progress import progress_for, progress_lines

    stream = io.StringIO()  # not a terminal
    progress, close = progress_for(False, stream)
    progress(0.0, "load model")
    for stop in range(2, 301, 2):
        progress(0.2 + 0.7 * stop / 300, f"synthesised {stop}/300 slices")
    progress(1.0, "done")
    close()
    lines = stream.getvalue().splitlines()
    assert 8 <= len(lines) <= 12 and lines[0].endswith("0 % load model") and lines[-1].endswith("100 % done"), lines
    assert progress_for(True, io.StringIO())[0] is None
    # a slow stage still shows life: with no quiet time allowed, every call is a line
    stream = io.StringIO()
    chatty, _ = progress_lines(stream, quiet_s=0.0)
    for stop in range(2, 21, 2):
        chatty(0.5, f"synthesised {stop}/20 slices")
    assert len(stream.getvalue().splitlines()) == 10


def test_version_is_the_one_dicom_outputs_record() -> None:
    from CTtoMRISynthesisLib import __version__
    from CTtoMRISynthesisLib.version import version_string

    done = run_cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"ctmri {version_string()}", done.stdout + done.stderr
    assert done.stdout.strip().startswith(f"ctmri {__version__}")


def test_a_closed_progress_pipe_does_not_stop_the_run(case_files, tiny_weights: Path, tmp_path: Path) -> None:
    """`ctmri synthesize … 2>&1 | head -2`: once the reader has gone, writing a progress line failed (a broken pipe)
    and the run stopped with no outputs. The lines end there; the run goes on and writes its outputs."""
    ct, _ = case_files
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-m", "CTtoMRISynthesisLib.cli", "synthesize", "--ct", str(ct),
                              "--out-dir", str(out), "--weights", str(tiny_weights), "--device", "cpu"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    child.stderr.close()  # the reader is gone before the first line
    assert child.wait(timeout=600) == 0
    assert (out / "synthetic_mri.nrrd").is_file() and (out / "metrics.json").is_file()
