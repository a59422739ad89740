"""`ctmri demo` and the sample case shipped in the repository (CTtoMRISynthesis/Resources/SampleData)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, data_root
from CTtoMRISynthesisLib import geometry
from CTtoMRISynthesisLib.cli import main
from CTtoMRISynthesisLib.demo import SAMPLE_DIR, run_demo, sample_paths
from CTtoMRISynthesisLib.intensity import classify_ct
from CTtoMRISynthesisLib.outputs import OUTPUT_FILES, OUTPUT_MANIFEST

SAMPLE_BUDGET_BYTES = 1_500_000


def test_sample_dir_is_in_the_repository() -> None:
    assert SAMPLE_DIR == REPO / "CTtoMRISynthesis" / "Resources" / "SampleData"
    assert (SAMPLE_DIR / "SOURCE.md").is_file(), "the sample's attribution must ship with it"
    assert (SAMPLE_DIR / "make_sample.py").is_file()


def test_sample_files_exist_are_small_and_read_back() -> None:
    paths = sample_paths()
    total = sum(p.stat().st_size for p in paths.values())
    assert total < SAMPLE_BUDGET_BYTES, f"sample is {total} bytes"
    ct = sitk.ReadImage(str(paths["ct"]))
    mri = sitk.ReadImage(str(paths["mri"]))
    assert ct.GetSize() == (256, 256, 8) and ct.GetPixelID() == sitk.sitkInt16
    assert geometry.same_grid(ct, mri, tol=1e-6), "the MR ships resampled onto the CT's grid"
    ct_array = sitk.GetArrayFromImage(ct)
    mri_array = sitk.GetArrayFromImage(mri)
    # Stored as HU + 1024 (no negative values, bone above 1000): the demo runs the Hounsfield path.
    assert classify_ct(ct_array) == "hu+1024"
    # The MR's background is exactly 0 and its head is there on every slice.
    assert mri_array.min() == 0 and mri_array.max() > 300
    head_fraction = (mri_array > 0).mean(axis=(1, 2))
    assert np.all(head_fraction > 0.02) and np.all(head_fraction < 0.3)
    # Same anatomy on the same grid: the CT's head (> -124 HU) lies inside the MR's head.
    ct_head = ct_array > 900
    assert (mri_array[ct_head] > 0).mean() > 0.9


def _load_make_sample():
    spec = importlib.util.spec_from_file_location("make_sample", SAMPLE_DIR / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_sample_rebuilds_the_shipped_files(vh_dir: Path, tmp_path: Path) -> None:
    """The script is the recipe: rerunning it on the shared data gives the shipped sample."""
    make_sample = _load_make_sample()
    assert make_sample.main(["--data", str(data_root()), "--out", str(tmp_path)]) == 0
    for name in ("ct.nrrd", "mri.nrrd"):
        shipped = sitk.ReadImage(str(SAMPLE_DIR / name))
        rebuilt = sitk.ReadImage(str(tmp_path / name))
        assert geometry.same_grid(shipped, rebuilt, tol=1e-6)
        difference = np.abs(sitk.GetArrayFromImage(shipped).astype(float) - sitk.GetArrayFromImage(rebuilt))
        assert difference.mean() < 1.0, f"{name} differs from the shipped file by {difference.mean():.2f} on average"


def test_run_demo_writes_outputs_and_prints_metrics(tiny_weights: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("CTMRI_WEIGHTS", str(tiny_weights))
    out = tmp_path / "demo"
    before = {p: p.read_bytes() for p in sample_paths().values()}
    assert run_demo(out, device="cpu") == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUT_FILES.values(), OUTPUT_MANIFEST])
    mri = sitk.ReadImage(str(sample_paths()["mri"]))
    for name in ("synthetic_mri.nrrd", "ct_registered.nrrd", "difference.nrrd"):
        image = sitk.ReadImage(str(out / name))
        assert geometry.same_grid(image, mri, tol=1e-4)
    synthetic = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "synthetic_mri.nrrd")))
    assert synthetic.max() > 0, "the model produced something inside the head"

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["normalisation"]["ct_path"] == "hu+1024"
    assert metrics["device"] == "cpu"
    for key in ("mae", "ssim", "psnr"):
        assert np.isfinite(metrics[key])
    registration = metrics["registration"]
    assert registration["mode"] == "rigid" and registration["overlap"] > 0.9
    # The sample ships aligned: registration may refine it by a voxel or two, not move it away.
    transform = sitk.ReadTransform(str(out / "transform.tfm"))
    corners = [mri.TransformIndexToPhysicalPoint((i, j, k)) for i in (0, 255) for j in (0, 255) for k in (0, 7)]
    moved = [np.linalg.norm(np.subtract(transform.TransformPoint(p), p)) for p in corners]
    assert max(moved) < 5.0, f"registration moved the aligned sample by up to {max(moved):.1f} mm"

    printed = capsys.readouterr().out
    for text in ("MAE", "SSIM", "PSNR", "hu+1024", "device cpu", str(out.resolve())):
        assert text in printed
    # what the registration decided, whole (it was once cut off mid-word at 80 characters), without the optimiser's wording
    line = next(line for line in printed.splitlines() if line.startswith("registration:"))
    decided = str(registration.get("stop_condition", "")).split(" (optimiser:")[0]
    assert line.endswith(decided) and "(optimiser:" not in line
    assert {p: p.read_bytes() for p in before} == before, "the shipped sample is never modified"


def test_demo_without_weights_says_so_in_one_error_line(tmp_path: Path, monkeypatch, capsys) -> None:
    missing = tmp_path / "nowhere" / "ctmri_unet.safetensors"
    monkeypatch.setenv("CTMRI_WEIGHTS", str(missing))
    out = tmp_path / "demo"
    assert main(["demo", "--out-dir", str(out), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "weights" in lines[0] and str(missing) in lines[0]
    assert not out.exists(), "nothing is written when the model is missing"


# registerCustomSampleDataSource's parameters in Slicer's SampleData.py (the same in 5.6, 5.8 and 5.10)
SAMPLE_DATA_PARAMETERS = {"category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader",
                          "thumbnailFileName", "loadFileType", "loadFiles", "loadFileProperties", "checksums"}


def test_the_sample_is_listed_in_slicers_sample_data_from_its_own_files(tmp_path: Path) -> None:
    """The module lists the shipped sample in Slicer's Sample Data module. Done here as Sample Data does it
    (``SampleDataLogic.downloadFile``: urllib's ``urlretrieve`` of each address into its cache, then the checksum
    of the copy): the addresses are the installation's own files, and the checksums are theirs."""
    import hashlib
    import urllib.request

    from CTtoMRISynthesisLib import demo
    from CTtoMRISynthesisLib.weights import sha256_of

    source = demo.slicer_sample_source()
    assert set(source) <= SAMPLE_DATA_PARAMETERS
    assert source["nodeNames"] == ["SampleCT", "SampleMRI"] and source["sampleName"] == demo.SLICER_SAMPLE_NAME
    assert all(len(source[key]) == 2 for key in ("uris", "fileNames", "loadFileType", "checksums"))
    for uri, name, checksum in zip(source["uris"], source["fileNames"], source["checksums"]):
        assert uri.startswith("file://"), "a file of this installation: nothing is downloaded"
        copy = tmp_path / name
        urllib.request.urlretrieve(uri, str(copy))
        algo, digest = checksum.split(":")
        assert hashlib.new(algo.lower(), copy.read_bytes()).hexdigest() == digest
    for kind, path in sample_paths().items():  # a rebuilt sample must come with its new checksums
        assert sha256_of(path) == demo.SAMPLE_SHA256[kind], f"update demo.SAMPLE_SHA256[{kind!r}]"


def test_the_sample_is_not_listed_from_an_incomplete_installation(tmp_path: Path) -> None:
    """A missing file is the usual clear error (the module then logs it and lists nothing) rather than a listed
    sample that fails when clicked."""
    from CTtoMRISynthesisLib import demo
    from CTtoMRISynthesisLib.errors import CTMRIError

    (tmp_path / "ct.nrrd").write_bytes((SAMPLE_DIR / "ct.nrrd").read_bytes())
    with pytest.raises(CTMRIError, match="mri.nrrd not found"):
        demo.slicer_sample_source(tmp_path)
