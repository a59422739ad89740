"""Reliability matrix (issue 7): every row through the CLI and, where it applies, the node-level Slicer path.

Each row gives either a correct result (checked against an independent expectation) or exactly one
``error:`` line / one-line ``CTMRIError`` that says what to do. After every row, on both paths:

- the input files are byte-identical (sha256 of every input file, the weights file and its checksum);
- the input nodes are byte-identical (voxel bytes, dtype, IJKToRAS, name, attributes, parent transform)
  and no node that existed before was changed or removed;
- on failure no output file, temporary folder or node is left (the work folder / scene is as before);
- on success exactly the expected files / nodes were added, and the CLI and the node path agree voxel
  for voxel.

The rows are listed in ``Testing/README.md``. Rows sharing the uniform harness are the parameters of
:func:`test_matrix`; rows needing their own set-up (Ctrl-C, out of memory, unwritable folder, disk
full, repeated runs) are their own tests below it. Inputs are synthetic head phantoms (``phantoms.py``), so
the matrix runs without the licensed data: a Harvard-like pair (8-bit windowed CT and T2 MRI, 6 slices
through the ventricles) and a Visible-Human-like CT (HU + 1024, 8 slices of 512², with a head holder); the
model is the really trained ``tiny_weights`` of conftest.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
torch = pytest.importorskip("torch")

import phantoms  # noqa: E402
from conftest import new_scene  # noqa: E402
from CTtoMRISynthesisLib import mrml, outputs, pipeline, synthesis  # noqa: E402
from CTtoMRISynthesisLib import weights as weights_module  # noqa: E402
from CTtoMRISynthesisLib.cli import main as cli_main  # noqa: E402
from CTtoMRISynthesisLib.errors import CancelledError, CTMRIError  # noqa: E402
from CTtoMRISynthesisLib.intensity import head_mask  # noqa: E402
from CTtoMRISynthesisLib.weights import LoadedModel, checksum_path, load_model, sha256_of  # noqa: E402

SPACING = (0.9, 0.9, 5.0)
ORIGIN = (-115.0, -115.0, -40.0)
# what a run leaves in --out-dir: its outputs and the list of them (outputs.OUTPUT_MANIFEST)
ALL_OUTPUTS = {"synthetic_mri.nrrd", "uncertainty.nrrd", "ct_registered.nrrd", "difference.nrrd", "transform.tfm",
               "metrics.json", outputs.OUTPUT_MANIFEST}
CT_ONLY_OUTPUTS = {"synthetic_mri.nrrd", "uncertainty.nrrd", "metrics.json", outputs.OUTPUT_MANIFEST}
# an error message must say what to do: one of these verbs
ADVICE = re.compile(r"\b(give|check|choose|copy|use|restore|retrain|fix|free|load|put|close|harden|resample|select|pass|update)\b", re.I)
INT32_MIN, INT32_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max


# ------------------------------------------------------------------------------------------------
# data


def image(array: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=None) -> sitk.Image:
    out = sitk.GetImageFromArray(np.ascontiguousarray(array))
    out.SetSpacing(spacing)
    out.SetOrigin(origin)
    if direction is not None:
        out.SetDirection(direction)
    return out


class Data:
    """The inputs (phantoms) and reference results, computed once per module (module-scoped fixture)."""

    def __init__(self, vh: sitk.Image, weights: Path) -> None:
        self.weights = weights
        # 6 axial slices of a synthetic patient with brain, skull and ventricles, as uint8 (6, 256, 256)
        self.ct8, self.mr8 = phantoms.slice_pair(seed=16, slices=6, first_z=0.0)
        self.ct = image(self.ct8)
        self.mri = image(self.mr8)
        self.vh = vh  # int16, HU + 1024, 512×512×8
        self.vh_stored = sitk.GetArrayFromImage(vh)  # (8, 512, 512), air ≈ 0, water ≈ 1024
        self.model = load_model(weights)
        self._cache: dict = {}

    def reference(self, key: str, ct: sitk.Image, mri: Optional[sitk.Image] = None) -> pipeline.SynthesisResult:
        """The pipeline's own result for an input (one call per key), to compare the rows against."""
        if key not in self._cache:
            self._cache[key] = pipeline.synthesize(ct, mri, model=self.model, device="cpu", registration="none")
        return self._cache[key]

    def vh_like(self, array: np.ndarray) -> sitk.Image:
        out = sitk.GetImageFromArray(np.ascontiguousarray(array))
        out.CopyInformation(self.vh)
        return out

    @property
    def window(self) -> dict:
        return self.model.config["preprocessing"]["ct_window"]


@pytest.fixture(scope="module")
def data(phantom_hu_ct: sitk.Image, tiny_weights: Path) -> Data:
    return Data(phantom_hu_ct, tiny_weights)


# ------------------------------------------------------------------------------------------------
# nodes and fingerprints


def node_matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def node_from_image(scene, img: sitk.Image, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A volume node filled the way Slicer's readers fill one: voxels, then spacing, origin, directions."""
    slicer.mrmlScene = scene
    node = slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(img), None, name, nodeClassName=class_name)
    node.SetSpacing(*img.GetSpacing()[:3])
    ox, oy, oz = img.GetOrigin()[:3]
    node.SetOrigin(-ox, -oy, oz)
    d = np.array(img.GetDirection()).reshape(img.GetDimension(), img.GetDimension())[:3, :3]
    node.SetIJKToRASDirections(*(-d[0]), *(-d[1]), *d[2])
    return node


def sequence_proxy_node(scene, frames: list[sitk.Image], name: str):
    """A 4D volume as Slicer holds it: a sequence of 3D frames shown through a proxy volume node."""
    node = node_from_image(scene, frames[0], name)
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", f"{name} sequence")
    for t, frame_image in enumerate(frames):
        frame = slicer.vtkMRMLScalarVolumeNode()
        data = vtk.vtkImageData()
        data.DeepCopy(node_from_image(scene, frame_image, f"{name} frame {t}").GetImageData())
        frame.SetAndObserveImageData(data)
        sequence.SetDataNodeAtValue(frame, str(t))
    scene.RegisterNodeClass(slicer.vtkMRMLSequenceBrowserNode())  # what Slicer's Sequences module does
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", f"{name} browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.AddProxyNode(node, sequence, False)
    return node


def node_fingerprint(node) -> tuple:
    array = slicer.util.arrayFromVolume(node)
    display = node.GetDisplayNode()
    return (
        node.GetClassName(),
        array.dtype.str,
        array.shape,
        hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(),
        node_matrix(node).tobytes(),
        node.GetName(),
        node.GetTransformNodeID(),
        display.GetID() if display else None,
        tuple(sorted((k, node.GetAttribute(k)) for k in (node.GetAttributeNames() or ()))),
    )


def scene_state(scene) -> list[tuple]:
    out = []
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        out.append((node.GetID(), node.GetClassName(), node.GetName(), node.GetMTime() if node.IsA("vtkMRMLVolumeNode") else 0))
    return out


def file_hashes(paths) -> dict:
    out = {}
    for path in paths:
        path = Path(path)
        if path.is_dir():
            out.update(file_hashes(sorted(path.rglob("*"))))
        elif path.exists():
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ------------------------------------------------------------------------------------------------
# the uniform harness


@dataclass
class Case:
    """One row's inputs and what must come out."""

    ct: Any  # sitk.Image (written to .nrrd for the CLI, filled into a node) or a Path (file rows)
    mri: Any = None
    weights: Optional[Path] = None  # default: the tiny trained model
    registration: str = "none"
    ct_node: Optional[Callable] = None  # scene -> node; default: node from the ct image
    mri_node: Optional[Callable] = None
    error: Any = None  # substring (or {"cli": ..., "node": ...}) of the one expected error message
    warnings: tuple = ()  # substrings of the expected warnings (success rows); none other allowed
    check: Optional[Callable] = None  # check(outcome) for success rows
    node_path: Optional[bool] = None  # None: applies when the CT is an image
    patches: tuple = ()  # (object, attribute, value) set for the row (monkeypatch), e.g. an old torch version

    def expected_error(self, path: str) -> Optional[str]:
        return self.error.get(path) if isinstance(self.error, dict) else self.error


@dataclass
class Outcome:
    path: str  # "cli" or "node"
    synthetic: Optional[sitk.Image] = None
    summary: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    stdout: str = ""
    outputs: dict = field(default_factory=dict)  # node path: the output nodes
    code: Optional[int] = None  # CLI exit status (runtime rows)
    err: str = ""  # CLI stderr (runtime rows)
    error: Optional[str] = None  # node-level error message (runtime rows)


def run_cli_case(case: Case, weights: Path, tmp: Path, capsys) -> Outcome:
    inputs = tmp / "in"
    inputs.mkdir(exist_ok=True)

    def as_file(value, name):
        if value is None or isinstance(value, Path):
            return value
        path = inputs / f"{name}.nrrd"
        sitk.WriteImage(value, str(path))
        return path

    ct, mri = as_file(case.ct, "ct"), as_file(case.mri, "mri")
    watched = [p for p in (ct, mri, weights, checksum_path(weights)) if p is not None]
    before = file_hashes(watched)
    work = tmp / "work"
    work.mkdir()
    out = work / "out"
    argv = ["synthesize", "--ct", str(ct), "--out-dir", str(out), "--weights", str(weights),
            "--registration", case.registration, "--device", "cpu", "--quiet"]
    if mri is not None:
        argv[3:3] = ["--mri", str(mri)]
    capsys.readouterr()
    code = cli_main(argv)
    captured = capsys.readouterr()
    assert file_hashes(watched) == before, "input files must be byte-identical"
    assert set(before) == set(file_hashes(watched))
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err
    expected = case.expected_error("cli")
    if expected is not None:
        assert code == 2, captured.err
        assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
        assert expected in lines[0], lines[0]
        assert ADVICE.search(lines[0]), f"the message does not say what to do: {lines[0]}"
        assert captured.out == ""
        assert listing(work) == [], "no output or temporary file may remain"
        return Outcome("cli")
    assert code == 0, captured.err
    warnings = [line[len("warning: "):] for line in lines if line.startswith("warning: ")]
    assert len(warnings) == len(lines), f"only warning lines on stderr: {captured.err}"
    expected_files = ALL_OUTPUTS if mri is not None else CT_ONLY_OUTPUTS
    assert listing(work) == sorted(["out", *(f"out/{name}" for name in expected_files)])
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["warnings"] == warnings
    return Outcome("cli", sitk.ReadImage(str(out / "synthetic_mri.nrrd")), summary, warnings, captured.out)


def run_node_case(case: Case, weights: Path, scene) -> Outcome:
    ct_node = case.ct_node(scene) if case.ct_node else node_from_image(scene, case.ct, "CT")
    mri_node = None
    if case.mri_node is not None:
        mri_node = case.mri_node(scene)
    elif case.mri is not None:
        mri_node = node_from_image(scene, case.mri, "MRI")
    inputs = [n for n in (ct_node, mri_node) if n is not None]
    prints = [node_fingerprint(n) for n in inputs]
    state = scene_state(scene)
    before = file_hashes([weights, checksum_path(weights)])
    expected = case.expected_error("node")
    try:
        outputs = mrml.run_on_nodes(scene, ct_node, mri_node, weights=weights, device="cpu",
                                    registration=case.registration)
    except CTMRIError as exc:
        if expected is None:
            raise
        message = str(exc)
        assert "\n" not in message and expected in message, message
        assert ADVICE.search(message), f"the message does not say what to do: {message}"
        assert scene_state(scene) == state, "no node may be added, removed or modified"
        outputs = None
    else:
        assert expected is None, f"expected an error containing {expected!r}"
    assert [node_fingerprint(n) for n in inputs] == prints, "input nodes must be byte-identical"
    assert file_hashes([weights, checksum_path(weights)]) == before
    if outputs is None:
        return Outcome("node")
    after = scene_state(scene)
    assert after[: len(state)] == state, "nodes that existed before are unchanged"
    output_ids = set()
    for node in outputs.values():
        output_ids.add(node.GetID())
        if node.IsA("vtkMRMLDisplayableNode"):
            output_ids.update(node.GetNthDisplayNodeID(i) for i in range(node.GetNumberOfDisplayNodes()))
    added = {entry[0] for entry in after[len(state):]}
    colour = {entry[0] for entry in after[len(state):] if entry[1] == "vtkMRMLColorTableNode"}
    assert added - colour == output_ids
    with_mri = {"ct_registered", "difference", "transform", "table"} if mri_node else set()
    expected_keys = {"synthetic_mri", "uncertainty"} | with_mri
    assert set(outputs) == expected_keys
    summary = mrml.summary_of(outputs)
    synthetic = mrml.image_from_volume_node(outputs["synthetic_mri"], "result")
    return Outcome("node", synthetic, summary, list(summary.get("warnings", [])), outputs=outputs)


def check_warnings(outcome: Outcome, expected: tuple) -> None:
    assert len(outcome.warnings) == len(expected), outcome.warnings
    for text in expected:
        assert any(text in w for w in outcome.warnings), (text, outcome.warnings)


def same_image(a: sitk.Image, b: sitk.Image, atol: float = 0.0) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-9)
    if atol == 0.0:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    else:
        np.testing.assert_allclose(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b), atol=atol)


def run_row(case: Case, data: Data, tmp: Path, capsys) -> list[Outcome]:
    """The row through the CLI, then (where it applies) through nodes; the checks common to all rows."""
    weights = case.weights or data.weights
    outcomes = [run_cli_case(case, weights, tmp, capsys)]
    node_path = case.node_path if case.node_path is not None else not isinstance(case.ct, Path)
    if node_path:
        previous = getattr(slicer, "mrmlScene", None)
        scene = new_scene()
        slicer.mrmlScene = scene
        try:
            outcomes.append(run_node_case(case, weights, scene))
        finally:
            slicer.mrmlScene = previous
    if case.error is None:
        for outcome in outcomes:
            check_warnings(outcome, case.warnings)
            assert outcome.summary["device"] == "cpu"
            if case.check is not None:
                case.check(outcome)
        if len(outcomes) == 2:  # the CLI and the node path give the same image, voxel for voxel
            same_image(outcomes[0].synthetic, outcomes[1].synthetic)
            for key in ("mae", "ssim", "psnr"):
                assert outcomes[0].summary.get(key) == outcomes[1].summary.get(key)
            assert outcomes[0].summary["normalisation"] == outcomes[1].summary["normalisation"]
    return outcomes


# ------------------------------------------------------------------------------------------------
# the rows


ROWS: dict[str, Callable[[Data, Path], Case]] = {}


def row(name: str):
    def register(build):
        ROWS[name] = build
        return build

    return register


def _text(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _saved(img: sitk.Image, path: Path, compress: bool = False) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), compress)
    return path.read_bytes()


# --- files (CLI only: a file that cannot be read never becomes a node)


@row("files/missing")
def _(d: Data, tmp: Path) -> Case:
    return Case(ct=tmp / "in" / "no_such_ct.nrrd", error="CT not found")


@row("files/nrrd-header-cut")
def _(d: Data, tmp: Path) -> Case:
    content = _saved(d.ct, tmp / "src" / "ct.nrrd")
    header_end = content.index(b"\n\n")
    return Case(ct=_text(tmp / "in" / "ct.nrrd", content[: header_end // 2]), error="cannot read CT")


@row("files/nrrd-header-broken")
def _(d: Data, tmp: Path) -> Case:
    content = _saved(d.ct, tmp / "src" / "ct.nrrd")
    broken = re.sub(rb"sizes: [0-9 ]+", b"sizes: 256 25x", content, count=1)
    assert broken != content
    return Case(ct=_text(tmp / "in" / "ct.nrrd", broken), error="cannot read CT")


@row("files/nrrd-data-cut")
def _(d: Data, tmp: Path) -> Case:
    content = _saved(d.ct, tmp / "src" / "ct.nrrd", compress=True)
    return Case(ct=_text(tmp / "in" / "ct.nrrd", content[: len(content) * 2 // 3]), error="cannot read CT")


@row("files/nii.gz-cut-in-half")
def _(d: Data, tmp: Path) -> Case:
    content = _saved(d.ct, tmp / "src" / "ct.nii.gz")
    return Case(ct=_text(tmp / "in" / "ct.nii.gz", content[: len(content) // 2]), error="truncated")


@row("files/nii-cut")
def _(d: Data, tmp: Path) -> Case:
    """Uncompressed NIfTI cut short: ITK reads it without complaint (missing voxels = 0); must be refused."""
    content = _saved(d.ct, tmp / "src" / "ct.nii")
    return Case(ct=_text(tmp / "in" / "ct.nii", content[: len(content) * 3 // 4]), error="truncated")


@row("files/text-named-nrrd")
def _(d: Data, tmp: Path) -> Case:
    return Case(ct=_text(tmp / "in" / "ct.nrrd", b"Patient notes: CT to follow.\n"), error="cannot read CT")


@row("files/zero-bytes")
def _(d: Data, tmp: Path) -> Case:
    return Case(ct=_text(tmp / "in" / "ct.nrrd", b""), error="empty (0 bytes)")


@row("files/unsupported-format")
def _(d: Data, tmp: Path) -> Case:
    content = _saved(d.ct, tmp / "src" / "ct.nrrd")
    return Case(ct=_text(tmp / "in" / "ct.xyz", content), error="supported")


@row("files/folder-without-dicom")
def _(d: Data, tmp: Path) -> Case:
    folder = tmp / "in" / "series"
    _text(folder / "readme.txt", b"no images here\n")
    return Case(ct=folder, error="no DICOM series")


@row("files/picture-folder")
def _(d: Data, tmp: Path) -> Case:
    """A folder of the CT's slices as RGBA screenshots, spacing not given: read in the numbers' order with 1 mm
    assumed and said; the synthetic MRI has the same voxels as the CT volume's (the model grid follows the field
    of view, not the spacing)."""
    reference = d.reference("plain", d.ct)

    def check(outcome: Outcome) -> None:
        assert outcome.synthetic.GetSpacing() == (1.0, 1.0, 1.0) and outcome.synthetic.GetOrigin() == (0.0, 0.0, 0.0)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(outcome.synthetic),
                                      sitk.GetArrayFromImage(reference.synthetic_mri))
        assert outcome.summary["ct_pictures"]["spacing_assumed"] is True

    folder = phantoms.write_pictures(tmp / "in" / "pictures", d.ct8, "CT ({}).png", rgba=True)
    return Case(ct=folder, warnings=("record no spacing",), check=check)


@row("files/picture-folder-colour")
def _(d: Data, tmp: Path) -> Case:
    colour = np.stack([d.ct8, d.ct8 // 2, d.ct8], axis=-1)
    folder = phantoms.write_pictures(tmp / "in" / "pictures", colour, "CT ({}).png")
    return Case(ct=folder, error="CT picture CT (1).png has 3 components per voxel")


@row("files/mri-unreadable")
def _(d: Data, tmp: Path) -> Case:
    return Case(ct=d.ct, mri=_text(tmp / "in" / "mri.nrrd", b"NRRD0004\ntype: garbage\n\n"), error="cannot read MRI",
                node_path=False)


# --- content


@row("content/4d")
def _(d: Data, tmp: Path) -> Case:
    frames = [d.ct, image(np.roll(d.ct8, 1, axis=0)), image(np.roll(d.ct8, 2, axis=0))]
    four_d = sitk.JoinSeries(frames)
    return Case(ct=four_d, ct_node=lambda scene: sequence_proxy_node(scene, frames, "CT 4D"),
                error={"cli": "is 4D (3 time points", "node": "3-frame sequence (4D)"})


@row("content/rgb")
def _(d: Data, tmp: Path) -> Case:
    rgb = np.stack([d.ct8, d.ct8 // 2, d.ct8 // 3], axis=-1)
    rgb_image = sitk.GetImageFromArray(rgb, isVector=True)
    rgb_image.SetSpacing(SPACING)
    return Case(ct=rgb_image, ct_node=lambda scene: node_from_image(scene, rgb_image, "RGB", "vtkMRMLVectorVolumeNode"),
                error="give a single-channel grayscale CT")


@row("content/grey-rgba-screenshot")
def _(d: Data, tmp: Path) -> Case:
    """The CT's grey stored as RGBA with a semi-transparent frame (the other hospital's screenshots): file and
    colour node both give exactly the grey CT's result and metrics."""
    alpha = np.full_like(d.ct8, 255)
    alpha[:, [0, -1], :] = alpha[:, :, [0, -1]] = 238
    rgba = sitk.GetImageFromArray(np.stack([d.ct8, d.ct8, d.ct8, alpha], axis=-1), isVector=True)
    rgba.CopyInformation(d.ct)
    return Case(ct=rgba, mri=d.mri, ct_node=lambda scene: node_from_image(scene, rgba, "RGBA", "vtkMRMLVectorVolumeNode"),
                check=_matches_reference(d.reference("plain+mri", d.ct, d.mri), metrics=True))


@row("content/single-voxel")
def _(d: Data, tmp: Path) -> Case:
    return Case(ct=image(np.full((1, 1, 1), 40, np.int16)), error="single voxel")


@row("content/tiny-ct")
def _(d: Data, tmp: Path) -> Case:
    """A 3 × 3 × 3 'CT' (an icon, a mistake): refused, not synthesised with a warning."""
    return Case(ct=image((np.arange(27).reshape(3, 3, 3) * 40 - 100).astype(np.int16)), error="too small to be a head CT")


@row("content/constant")
def _(d: Data, tmp: Path) -> Case:
    return Case(ct=image(np.full(d.ct8.shape, 40, np.int16)), error="constant")


@row("content/nan-ct")
def _(d: Data, tmp: Path) -> Case:
    array = d.ct8.astype(np.float32)
    array[2, 100:110, 100:110] = np.nan
    return Case(ct=image(array), error="NaN or infinite values")


@row("content/inf-mri")
def _(d: Data, tmp: Path) -> Case:
    array = d.mr8.astype(np.float32)
    array[3, 50, 60] = np.inf
    return Case(ct=d.ct, mri=image(array), error="the MRI image contains NaN or infinite values")


@row("content/mri-thumbnail")
def _(d: Data, tmp: Path) -> Case:
    """An MRI of 8 × 8-voxel slices (a thumbnail, a localiser): too small to score, refused before any work."""
    factor = -(-max(d.mr8.shape[1:]) // 8)
    thumbnail = sitk.Shrink(d.mri, (factor, factor, 1))
    assert max(thumbnail.GetSize()[:2]) <= 8
    return Case(ct=d.ct, mri=thumbnail, error="too small to compare a synthetic MRI with")


def _matches_reference(reference: pipeline.SynthesisResult, metrics: bool = False):
    def check(outcome: Outcome) -> None:
        same_image(outcome.synthetic, reference.synthetic_mri)
        if metrics:
            for key in ("mae", "ssim", "psnr", "mae_whole", "ssim_foreground"):
                assert math.isclose(outcome.summary[key], reference.metrics[key], rel_tol=1e-6, abs_tol=1e-9), key

    return check


@row("content/uint16-65535-mri")
def _(d: Data, tmp: Path) -> Case:
    """An MRI spanning all of uint16 (0..65535): same min-max scale, so the same metrics as the 8-bit MRI."""
    mri16 = d.mr8.astype(np.uint16) * np.uint16(257)
    assert mri16.max() == 65535
    return Case(ct=d.ct, mri=image(mri16), check=_matches_reference(d.reference("plain+mri", d.ct, d.mri), metrics=True))


@row("content/int32-extremes-mri")
def _(d: Data, tmp: Path) -> Case:
    """An MRI spanning all of int32 (INT32_MIN..INT32_MAX): must not overflow; same metrics as the 8-bit MRI."""
    mri32 = (INT32_MIN + d.mr8.astype(np.int64) * ((2**32 - 1) // 255)).astype(np.int32)
    assert mri32.min() == INT32_MIN and mri32.max() == INT32_MAX
    return Case(ct=d.ct, mri=image(mri32), check=_matches_reference(d.reference("plain+mri", d.ct, d.mri), metrics=True))


@row("content/uint16-65535-ct")
def _(d: Data, tmp: Path) -> Case:
    """A HU+1024 CT as uint16 with scanner padding at 65535: the window saturates it exactly as a 3000."""
    ct16 = d.vh_stored.astype(np.uint16)
    ct16[:, :40, :] = 65535
    same = d.vh_stored.astype(np.uint16)
    same[:, :40, :] = 3000
    reference = d.reference("vh-pad3000", d.vh_like(same))
    assert reference.normalisation["ct_path"] == "hu+1024"
    return Case(ct=d.vh_like(ct16), check=_matches_reference(reference))


@row("content/int32-extremes-ct")
def _(d: Data, tmp: Path) -> Case:
    """A HU CT as int32 with INT32_MIN padding and INT32_MAX specks: same result as -1024 / 3000 HU."""
    hu = d.vh_stored.astype(np.int32) - 1024
    extreme, same = hu.copy(), hu.copy()
    extreme[:, :, :40], same[:, :, :40] = INT32_MIN, -1024
    extreme[:, 300:303, 300:303], same[:, 300:303, 300:303] = INT32_MAX, 3000
    reference = d.reference("vh-hu-extremes", d.vh_like(same))
    assert reference.normalisation["ct_path"] == "hu"
    return Case(ct=d.vh_like(extreme), check=_matches_reference(reference))


def _ct_path(path: str, text: str, reference: pipeline.SynthesisResult, exact: bool = True):
    def check(outcome: Outcome) -> None:
        assert outcome.summary["normalisation"]["ct_path"] == path
        if outcome.path == "cli":
            assert f"CT intensities: {text}" in outcome.stdout, outcome.stdout
        if exact:
            same_image(outcome.synthetic, reference.synthetic_mri)
        else:  # rounded to 8 bits: the same image but for rounding, and a few voxels at the head's edge
            same_image(outcome.synthetic, reference.synthetic_mri, atol=255)
            diff = np.abs(sitk.GetArrayFromImage(outcome.synthetic) - sitk.GetArrayFromImage(reference.synthetic_mri))
            assert diff.mean() < 0.5 and np.mean(diff > 8) < 1e-3, (diff.mean(), np.mean(diff > 8))

    return check


@row("content/ct-hounsfield")
def _(d: Data, tmp: Path) -> Case:
    """A HU CT (signed): the window path; identical to the same CT stored as HU + 1024."""
    stored = d.reference("vh-stored", d.vh)  # the file as it is: HU + 1024
    assert stored.normalisation["ct_path"] == "hu+1024"
    hu = d.vh_like((d.vh_stored.astype(np.int32) - 1024).astype(np.int16))
    return Case(ct=hu, check=_ct_path("hu", "Hounsfield CT: window level", stored))


@row("content/ct-8bit-windowed")
def _(d: Data, tmp: Path) -> Case:
    """The same CT windowed to 8 bits by the model's own window: the pass-through path, about the same image."""
    w = d.window
    low = w["level"] - w["width"] / 2
    hu = d.vh_stored.astype(np.float64) - 1024
    windowed = np.round(np.clip((hu - low) / w["width"], 0, 1) * 255).astype(np.uint8)
    assert windowed.min() == 0 and windowed.max() == 255
    stored = d.reference("vh-stored", d.vh)
    return Case(ct=d.vh_like(windowed), check=_ct_path("windowed8bit", "8-bit windowed CT", stored, exact=False))


@row("content/mri-given-as-ct")
def _(d: Data, tmp: Path) -> Case:
    return Case(ct=d.mri, warnings=("the CT input does not look like a CT",))


@row("content/ct-and-mri-swapped")
def _(d: Data, tmp: Path) -> Case:
    return Case(ct=d.mri, mri=d.ct, warnings=("look swapped",))


@row("content/ct-given-as-mri")
def _(d: Data, tmp: Path) -> Case:
    hu = d.vh_like((d.vh_stored.astype(np.int32) - 1024).astype(np.int16))
    return Case(ct=hu, mri=d.vh, warnings=("the reference MRI looks like a CT",))


# --- geometry


def _same_physical_result(reference: pipeline.SynthesisResult, atol: float = 1e-3):
    """The row's result, resampled (nearest) onto the reference grid, equals the reference result."""

    def check(outcome: Outcome) -> None:
        back = sitk.Resample(outcome.synthetic, reference.synthetic_mri, sitk.Transform(), sitk.sitkNearestNeighbor, -1.0)
        np.testing.assert_allclose(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(reference.synthetic_mri), atol=atol)
        if reference.metrics is not None:
            for key in ("mae", "ssim", "mae_whole"):
                assert math.isclose(outcome.summary[key], reference.metrics[key], rel_tol=1e-5), key

    return check


@row("geometry/flipped")
def _(d: Data, tmp: Path) -> Case:
    flip = (True, True, True)
    return Case(ct=sitk.Flip(d.ct, flip), mri=sitk.Flip(d.mri, flip),
                check=_same_physical_result(d.reference("plain+mri", d.ct, d.mri)))


@row("geometry/permuted")
def _(d: Data, tmp: Path) -> Case:
    order = (2, 0, 1)  # the slice axis becomes i
    return Case(ct=sitk.PermuteAxes(d.ct, order), mri=sitk.PermuteAxes(d.mri, (1, 2, 0)),
                check=_same_physical_result(d.reference("plain+mri", d.ct, d.mri)))


@row("geometry/oblique")
def _(d: Data, tmp: Path) -> Case:
    """Same voxels in a frame tilted 20°: slices are taken along the image's own axes; same voxels out."""
    rotation = sitk.VersorTransform((0.2, 0.3, 1.0), math.radians(20.0))
    direction = tuple(np.array(rotation.GetMatrix()))
    ct, mri = sitk.Image(d.ct), sitk.Image(d.mri)
    for img in (ct, mri):
        img.SetDirection(direction)
    reference = d.reference("plain+mri", d.ct, d.mri)

    def check(outcome: Outcome) -> None:
        np.testing.assert_allclose(outcome.synthetic.GetDirection(), direction, atol=1e-9)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(outcome.synthetic), sitk.GetArrayFromImage(reference.synthetic_mri))
        assert math.isclose(outcome.summary["mae"], reference.metrics["mae"], rel_tol=1e-9)

    return Case(ct=ct, mri=mri, check=check)


def _close_to(reference: pipeline.SynthesisResult, ct: sitk.Image, min_correlation: float):
    """Same head on another grid. The synthetic head lies exactly where the input CT's head is (Dice of the
    non-zero output against the CT's head mask, on the input grid: a shift, flip or scale error fails this)
    and its contrast agrees with the reference result (Pearson correlation inside the head; the tiny test
    model is not scale-invariant: a 10 % change of pixel size alone gives about 0.8)."""

    def check(outcome: Outcome) -> None:
        syn = sitk.GetArrayFromImage(outcome.synthetic)
        assert syn.min() >= 0 and syn.max() <= 255
        head_ct = head_mask(sitk.GetArrayFromImage(ct).astype(np.float32))
        dice = 2 * np.count_nonzero(head_ct & (syn > 0)) / (np.count_nonzero(head_ct) + np.count_nonzero(syn > 0))
        assert dice >= 0.95, dice
        ref = sitk.GetArrayFromImage(sitk.Resample(reference.synthetic_mri, outcome.synthetic, sitk.Transform(),
                                                   sitk.sitkLinear, 0.0))
        head = (ref > 0) | (syn > 0)
        corr = np.corrcoef(ref[head], syn[head])[0, 1]
        assert corr >= min_correlation, corr

    return check


@row("geometry/anisotropic-spacing")
def _(d: Data, tmp: Path) -> Case:
    """The head resampled to 0.9 × 1.8 × 5 mm voxels (256 × 128 in-plane): output on that grid, same anatomy."""
    grid = sitk.Image([256, 128, d.ct.GetDepth()], sitk.sitkUInt8)
    grid.SetSpacing((0.9, 1.8, 5.0))
    grid.SetOrigin((ORIGIN[0], ORIGIN[1] + 0.45, ORIGIN[2]))
    ct = sitk.Resample(d.ct, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkUInt8)
    mri = sitk.Resample(d.mri, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkUInt8)
    reference = d.reference("plain+mri", d.ct, d.mri)

    def check(outcome: Outcome) -> None:
        same_grid = outcome.synthetic.GetSize() == (256, 128, 6) and np.allclose(outcome.synthetic.GetSpacing(), (0.9, 1.8, 5.0))
        assert same_grid
        _close_to(reference, ct, 0.85)(outcome)

    return Case(ct=ct, mri=mri, check=check)


@row("geometry/non-256-in-plane")
def _(d: Data, tmp: Path) -> Case:
    """A 200 × 232 crop (physical positions kept): resampled to the 256² model grid and back."""
    ct, mri = d.ct[28:228, 12:244, :], d.mri[28:228, 12:244, :]
    reference = d.reference("plain+mri", d.ct, d.mri)

    def check(outcome: Outcome) -> None:
        assert outcome.synthetic.GetSize() == (200, 232, 6)
        np.testing.assert_allclose(outcome.synthetic.GetOrigin(), ct.GetOrigin(), atol=1e-9)
        _close_to(reference, ct, 0.7)(outcome)

    return Case(ct=ct, mri=mri, check=check)


@row("geometry/no-overlap")
def _(d: Data, tmp: Path) -> Case:
    far = sitk.Image(d.ct)
    far.SetOrigin((ORIGIN[0] + 1000.0, ORIGIN[1], ORIGIN[2]))
    return Case(ct=far, mri=d.mri, registration="rigid", error="do not overlap")


# --- model


def _tampered(d: Data, tmp: Path) -> Path:
    bad = tmp / "models" / "tampered.safetensors"
    bad.parent.mkdir(parents=True, exist_ok=True)
    content = bytearray(d.weights.read_bytes())
    content[len(content) // 2] ^= 0x01
    bad.write_bytes(bytes(content))
    shutil.copy(checksum_path(d.weights), checksum_path(bad))
    return bad


@row("model/sha256-mismatch")
def _(d: Data, tmp: Path) -> Case:
    return Case(ct=d.ct, mri=d.mri, weights=_tampered(d, tmp), error="does not match its recorded sha256")


@row("model/checksum-missing")
def _(d: Data, tmp: Path) -> Case:
    bare = tmp / "models" / "bare.safetensors"
    bare.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(d.weights, bare)
    return Case(ct=d.ct, weights=bare, error="no checksum file")


@row("model/other-architecture")
def _(d: Data, tmp: Path) -> Case:
    blob = weights_module.read_weights_file(d.weights)
    blob["config"]["model"]["base"] = 8  # tensors of a base-4 U-Net, config of a base-8 one
    other = tmp / "models" / "other.safetensors"
    weights_module.save_state(other, blob["state_dict"], blob["config"])
    return Case(ct=d.ct, mri=d.mri, weights=other, error="does not match the U-Net")


class _Payload:
    """Unpickling this runs ``os.system`` (what a malicious model file does): it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@row("model/pickle-payload")
def _(d: Data, tmp: Path) -> Case:
    marker = tmp / "PAYLOAD_RAN"
    evil = tmp / "models" / "evil.pt"
    evil.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": "ctmri-unet-v1", "config": d.model.config, "state_dict": _Payload(marker)}  # the old format
    torch.save(blob, evil)  # torch's own zip format, with a correct checksum beside it
    checksum_path(evil).write_text(f"{sha256_of(evil)}  evil.pt\n")
    # Control: the payload is live. A plain (unsafe) load would run it and create the marker.
    probe = tmp / "control" / "PAYLOAD_RAN"
    probe.parent.mkdir()
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()

    def never_ran(outcome=None) -> None:
        assert not marker.exists(), "the payload ran"

    return Case(ct=d.ct, mri=d.mri, weights=evil, error="never unpickled", check=never_ran)


@row("model/missing-weights")
def _(d: Data, tmp: Path) -> Case:
    return Case(ct=d.ct, mri=d.mri, weights=tmp / "models" / "gone.safetensors", error="weights file not found")


@row("model/older-torch-version")
def _(d: Data, tmp: Path) -> Case:
    """An older PyTorch (2.8, the newest Python 3.9 has) runs the model: nothing is unpickled, so nothing
    gates on the version, and the result is the same."""
    opened = []
    real_load = torch.load

    def watched_load(*args, **kwargs):
        opened.append(args)
        return real_load(*args, **kwargs)

    same = _matches_reference(d.reference("plain+mri", d.ct, d.mri), metrics=True)

    def check(outcome) -> None:
        assert opened == [], "torch.load was called"
        same(outcome)

    return Case(ct=d.ct, mri=d.mri, check=check,
                patches=((torch, "__version__", "2.8.0"), (torch, "load", watched_load)))


@pytest.mark.parametrize("name", list(ROWS))
def test_matrix(name: str, data: Data, tmp_path: Path, capsys, monkeypatch) -> None:
    case = ROWS[name](data, tmp_path)
    for target, attribute, value in case.patches:
        monkeypatch.setattr(target, attribute, value)
    run_row(case, data, tmp_path, capsys)
    if case.error is not None and case.check is not None:
        case.check()


# ------------------------------------------------------------------------------------------------
# runtime rows with their own set-up


CANCEL_DRIVER = textwrap.dedent(
    """
    import sys, time
    import CTtoMRISynthesisLib.synthesis as synthesis
    original = synthesis.predict_volume

    def slow_predict(*args, **kwargs):
        outer = kwargs.get("progress")

        def progress(fraction, message):
            if outer is not None:
                outer(fraction, message)
            print("BATCH-DONE", flush=True, file=sys.stderr)
            time.sleep(0.5)  # a slow machine: keeps the run going while the test presses Ctrl-C

        kwargs.update(progress=progress, batch_size=1)
        return original(*args, **kwargs)

    synthesis.predict_volume = slow_predict
    from CTtoMRISynthesisLib.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _input_files(data: Data, tmp_path: Path) -> tuple[Path, Path]:
    """The row's CT and MRI written as ``tmp_path/in/ct.nrrd`` and ``mri.nrrd`` (what the CLI rows read)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    ct, mri = inputs / "ct.nrrd", inputs / "mri.nrrd"
    sitk.WriteImage(data.ct, str(ct))
    sitk.WriteImage(data.mri, str(mri))
    return ct, mri


def test_cancel_cli_ctrl_c_and_node_cancel(data: Data, tmp_path: Path, scene) -> None:
    """runtime/cancel: Ctrl-C (SIGINT) or a stop request (SIGTERM) to a running `ctmri synthesize` exits 130 with
    one error line and writes nothing; the node-level cancel callback (what the Logic's Cancel uses) leaves the scene as it was."""
    ct, mri = _input_files(data, tmp_path)
    watched = [ct, mri, data.weights, checksum_path(data.weights)]
    before = file_hashes(watched)
    for stop in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C; a kill or a scheduler's stop (it left .partial-*)
        work = tmp_path / f"work_{stop.name}"
        work.mkdir()
        process = subprocess.Popen(
            [sys.executable, "-c", CANCEL_DRIVER, "synthesize", "--ct", str(ct), "--mri", str(mri), "--out-dir",
             str(work / "out"), "--weights", str(data.weights), "--registration", "none", "--device", "cpu", "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
            # SIGINT as at a terminal, even where the test runner itself was started with it ignored (`cmd &`)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 120
            line = ""
            while "BATCH-DONE" not in line:
                line = process.stderr.readline()
                assert line or process.poll() is None, "the run ended before the synthesis started"
                assert time.monotonic() < deadline
            process.send_signal(stop)  # mid-synthesis
            out, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
        lines = [x for x in err.strip().splitlines() if x != "BATCH-DONE"]
        assert process.returncode == 130, err
        assert lines == ["error: interrupted; no output was written"], err
        assert listing(work) == [], "nothing written"
        assert file_hashes(watched) == before

    # node level: the cancel callback, asked between batches, stops it mid-synthesis
    ct_node, mri_node = node_from_image(scene, data.ct, "CT"), node_from_image(scene, data.mri, "MRI")
    prints, state = [node_fingerprint(n) for n in (ct_node, mri_node)], scene_state(scene)
    seen: list = []
    with pytest.raises(CancelledError) as info:
        mrml.run_on_nodes(scene, ct_node, mri_node, weights=data.weights, device="cpu", registration="none",
                          batch_size=1, progress=lambda f, m: seen.append((f, m)),
                          cancel=lambda: any(m.startswith("synthesised 2/") for _, m in seen))
    assert "no output was written" in str(info.value)
    assert any(m.startswith("synthesised 2/") for _, m in seen) and not any(m.startswith("synthesised 3/") for _, m in seen)
    assert scene_state(scene) == state and [node_fingerprint(n) for n in (ct_node, mri_node)] == prints


def test_cancel_while_writing_outputs(data: Data, tmp_path: Path, capsys, monkeypatch) -> None:
    """runtime/cancel-while-saving: Ctrl-C while the files are written leaves nothing; Ctrl-C during the final
    renames, or while the temporary folder is removed after them, is held until they are done, so the folder
    is whole (never half of each run) and nothing temporary is left."""
    ct, mri = _input_files(data, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    argv = ["synthesize", "--ct", str(ct), "--mri", str(mri), "--out-dir", str(work / "out"), "--weights",
            str(data.weights), "--registration", "none", "--device", "cpu", "--quiet"]
    real_write = outputs.write_volume
    calls = []

    def interrupted_write(img, path):
        calls.append(path)
        if len(calls) == 2:
            real_write(img, path)  # the second file is complete, then Ctrl-C
            raise KeyboardInterrupt
        real_write(img, path)

    monkeypatch.setattr(outputs, "write_volume", interrupted_write)
    capsys.readouterr()
    assert cli_main(argv) == 130
    assert capsys.readouterr().err.strip() == "error: interrupted; no output was written"
    assert listing(work) == []
    monkeypatch.setattr(outputs, "write_volume", real_write)

    real_replace = os.replace
    renames = []

    def replace_with_ctrl_c(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between two renames
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_with_ctrl_c)
    assert cli_main(argv) == 0
    monkeypatch.setattr(os, "replace", real_replace)
    assert listing(work) == sorted(["out", *(f"out/{n}" for n in ALL_OUTPUTS)])

    # Ctrl-C while the temporary folder (the earlier outputs set aside in it) is removed, the new outputs in
    # place: it used to escape there, leave ".partial-*" for good and say that no output was written
    real_rmtree = shutil.rmtree

    def rmtree_with_ctrl_c(path, *args, **kwargs):
        if Path(path).name.startswith(".partial-"):
            os.kill(os.getpid(), signal.SIGINT)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree_with_ctrl_c)
    assert cli_main(argv) == 0
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert listing(work) == sorted(["out", *(f"out/{n}" for n in ALL_OUTPUTS)])


class OOMNet(torch.nn.Module):
    """Wraps a real network; raises ``torch.cuda.OutOfMemoryError`` as a too-small GPU would.

    ``max_batch``: batches larger than this run out of memory (any device). ``gpu_too_small``: on
    "cuda" even one slice runs out. ``.to(device=...)`` records the device but keeps the weights on the
    CPU: this machine has no GPU, so "cuda" is simulated (see ``simulate_cuda``).
    """

    def __init__(self, net, max_batch: Optional[int] = None, gpu_too_small: bool = False) -> None:
        super().__init__()
        self.net, self.max_batch, self.gpu_too_small = net, max_batch, gpu_too_small
        self.on = "cpu"
        self.calls: list = []

    def to(self, *args, **kwargs):
        device = kwargs.pop("device", None)
        if args and isinstance(args[0], (str, torch.device)):
            device, args = args[0], args[1:]
        if device is not None:
            self.on = str(device)
        self.net.to(*args, **kwargs)
        return self

    def forward(self, x):
        self.calls.append((self.on, int(x.shape[0])))
        if (self.gpu_too_small and self.on.startswith("cuda")) or (self.max_batch is not None and x.shape[0] > self.max_batch):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB (simulated)")
        return self.net(x)


def simulate_cuda(monkeypatch) -> None:
    """Make the pipeline believe it runs on CUDA while tensors stay on this CPU-only machine."""
    monkeypatch.setattr(synthesis, "choose_device", lambda name="auto": "cuda")
    monkeypatch.setattr(synthesis, "_batch_to", lambda batch, device, fmt: torch.from_numpy(batch).contiguous(memory_format=fmt))


def _oom_case(data: Data, tmp_path: Path, capsys, monkeypatch, wrapper: OOMNet, device: str) -> list[Outcome]:
    """Run CT + MRI through the CLI (load_model replaced to hand out the wrapped net) and the node path."""
    model = LoadedModel(net=wrapper, config=data.model.config, path=data.weights)
    monkeypatch.setattr(weights_module, "load_model", lambda path=None, device="cpu", verify=True: model)
    ct, mri = _input_files(data, tmp_path)
    before = file_hashes([ct, mri])
    work = tmp_path / "work"
    work.mkdir()
    capsys.readouterr()
    code = cli_main(["synthesize", "--ct", str(ct), "--mri", str(mri), "--out-dir", str(work / "out"),
                     "--weights", str(data.weights), "--registration", "none", "--device", device, "--quiet"])
    captured = capsys.readouterr()
    assert file_hashes([ct, mri]) == before
    outcomes = [Outcome("cli", stdout=captured.out, code=code, err=captured.err)]
    if code == 0:
        outcomes[0].synthetic = sitk.ReadImage(str(work / "out" / "synthetic_mri.nrrd"))
        outcomes[0].summary = json.loads((work / "out" / "metrics.json").read_text())
        outcomes[0].warnings = outcomes[0].summary["warnings"]
        assert captured.err.strip().splitlines() == [f"warning: {w}" for w in outcomes[0].warnings]
    else:
        assert listing(work) == []
    scene = new_scene()
    previous, slicer.mrmlScene = getattr(slicer, "mrmlScene", None), scene
    try:
        ct_node, mri_node = node_from_image(scene, data.ct, "CT"), node_from_image(scene, data.mri, "MRI")
        prints, state = [node_fingerprint(n) for n in (ct_node, mri_node)], scene_state(scene)
        try:
            outputs = mrml.run_on_nodes(scene, ct_node, mri_node, model=model, device=device, registration="none")
        except CTMRIError as exc:
            assert scene_state(scene) == state
            outcome = Outcome("node", error=str(exc))
        else:
            summary = mrml.summary_of(outputs)
            outcome = Outcome("node", mrml.image_from_volume_node(outputs["synthetic_mri"], "r"), summary, summary["warnings"])
        assert [node_fingerprint(n) for n in (ct_node, mri_node)] == prints
    finally:
        slicer.mrmlScene = previous
    outcomes.append(outcome)
    return outcomes


def test_out_of_memory_halves_the_batch(data: Data, tmp_path: Path, capsys, monkeypatch) -> None:
    """runtime/oom-smaller-batch: out of memory for batches > 1 → halved until it fits, with a warning."""
    wrapper = OOMNet(data.model.net, max_batch=1)
    outcomes = _oom_case(data, tmp_path, capsys, monkeypatch, wrapper, "cpu")
    reference = data.reference("plain+mri", data.ct, data.mri)
    for outcome in outcomes:
        assert outcome.summary["device"] == "cpu"
        # The CPU default batch is 2 (synthesis.default_batch_size): 2 fails, 1 fits.
        assert len(outcome.warnings) == 1 and "with 2 slices per batch; finished with 1 per batch" in outcome.warnings[0], outcome.warnings
        same_image(outcome.synthetic, reference.synthetic_mri, atol=1e-3)  # batching does not change the result
    # CLI, then nodes: 2 fails at once, then 6 × 1 fit, each slice and its mirror image (flip test-time augmentation)
    assert [size for _, size in wrapper.calls] == ([2] + [1] * 12) * 2


def test_out_of_memory_falls_back_to_the_cpu(data: Data, tmp_path: Path, capsys, monkeypatch) -> None:
    """runtime/oom-cpu-fallback: a (simulated) GPU too small even for one slice → the CPU finishes, with a
    warning and device "cpu" in the result."""
    simulate_cuda(monkeypatch)
    wrapper = OOMNet(data.model.net, gpu_too_small=True)
    outcomes = _oom_case(data, tmp_path, capsys, monkeypatch, wrapper, "cuda")
    reference = data.reference("plain+mri", data.ct, data.mri)
    for outcome in outcomes:
        assert outcome.summary["device"] == "cpu"
        assert len(outcome.warnings) == 1 and "synthesised on the CPU" in outcome.warnings[0], outcome.warnings
        same_image(outcome.synthetic, reference.synthetic_mri, atol=1e-3)
    on_gpu = [size for device, size in wrapper.calls if device == "cuda"]
    assert on_gpu == [6, 3, 1, 6, 3, 1]  # CLI then nodes: 6 → 3 → 1 slice per batch, then the CPU
    assert wrapper.on == "cpu"


def test_out_of_memory_everywhere_is_one_error(data: Data, tmp_path: Path, capsys, monkeypatch) -> None:
    """runtime/oom-everywhere: even one slice does not fit on the CPU → one error line, nothing written."""
    wrapper = OOMNet(data.model.net, max_batch=0)  # every batch fails
    cli, node = _oom_case(data, tmp_path, capsys, monkeypatch, wrapper, "cpu")
    assert cli.code == 2 and cli.err.strip().splitlines() == [cli.err.strip()]
    assert cli.err.startswith("error: out of memory even with one slice per batch on the CPU")
    assert node.error.startswith("out of memory even with one slice per batch on the CPU")


def _no_work_allowed(monkeypatch) -> None:
    """Make reading an input or synthesising fail the test: what a refusal "before any work" must not reach."""
    from CTtoMRISynthesisLib import dicom

    def forbidden(*args, **kwargs):
        raise AssertionError("the run read its input or synthesised before refusing")

    monkeypatch.setattr(dicom, "read_input", forbidden)
    monkeypatch.setattr(pipeline, "synthesize", forbidden)


@pytest.mark.parametrize("kind", ["under-a-file", "name-too-long", "is-a-file", "no-permission"])
def test_unwritable_output_folder(kind: str, data: Data, tmp_path: Path, capsys, monkeypatch) -> None:
    """runtime/unwritable-out-dir: refused before any work with one error line; nothing written anywhere.

    Runs as root here, where permission bits do not stop writes: the folder is made unwritable in ways
    that hold for root too (a path through a regular file, a name longer than the file system allows,
    an existing file as the folder). "no-permission" uses chmod; as root, which writes through permission bits
    (and CI runs as root), os.access answers for the locked folder as it would for a user.
    """
    inputs = tmp_path / "in"
    inputs.mkdir()
    ct = inputs / "ct.nrrd"
    sitk.WriteImage(data.ct, str(ct))
    work = tmp_path / "work"
    work.mkdir()
    blocker = work / "a_file"
    blocker.write_text("keep me\n")
    if kind == "under-a-file":
        out, message = blocker / "out", "is a file, not a folder"
    elif kind == "name-too-long":
        out, message = work / ("x" * 300), "longer than"
    elif kind == "is-a-file":
        out, message = blocker, "is an existing file"
    else:
        locked = work / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out, message = locked / "out", "no permission"
        if os.geteuid() == 0:  # root (CI) writes through permission bits: answer as the kernel does for a user
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if Path(path) == locked and mode & os.W_OK
                                else real_access(path, mode, *a, **k))
    before = file_hashes([ct, data.weights, blocker])
    state = listing(work)
    capsys.readouterr()
    with monkeypatch.context() as patched:
        _no_work_allowed(patched)
        code = cli_main(["synthesize", "--ct", str(ct), "--out-dir", str(out), "--weights", str(data.weights),
                         "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert ADVICE.search(err)
    assert listing(work) == state and file_hashes([ct, data.weights, blocker]) == before
    if kind == "no-permission" and os.geteuid() != 0:
        (work / "locked").chmod(0o700)


def test_disk_full_leaves_no_partial_file(data: Data, tmp_path: Path, capsys, monkeypatch, scene) -> None:
    """runtime/disk-full: the image writer fails with ENOSPC half-way through the second file, or a rename into
    the folder fails during the final commit. No partial file or temporary folder remains and the previous run's
    outputs in the folder are as they were. Node-level
    counterpart: resources running out while the output nodes are added removes the ones already added."""
    ct, mri = _input_files(data, tmp_path)
    out = tmp_path / "work" / "out"
    argv = ["synthesize", "--ct", str(ct), "--mri", str(mri), "--out-dir", str(out), "--weights", str(data.weights),
            "--registration", "none", "--device", "cpu", "--quiet"]
    assert cli_main(argv) == 0  # a previous, complete run
    previous = file_hashes([out])
    inputs_before = file_hashes([ct, mri])
    real_write = sitk.WriteImage
    calls = []

    def disk_full(img, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            whole = str(path).replace(".nrrd", ".whole.nrrd")
            real_write(img, whole, *args, **kwargs)
            content = Path(whole).read_bytes()
            os.unlink(whole)
            Path(path).write_bytes(content[: len(content) // 2])  # the disk filled up half-way
            raise RuntimeError(f"Exception thrown in SimpleITK ImageFileWriter_Execute: {os.strerror(errno.ENOSPC)}")
        return real_write(img, path, *args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", disk_full)
    capsys.readouterr()
    code = cli_main(argv)
    err = capsys.readouterr().err
    monkeypatch.setattr(sitk, "WriteImage", real_write)
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err and "free disk space" in err, err
    assert len(calls) == 2
    assert file_hashes([out]) == previous, "the previous outputs are untouched, nothing partial added"
    assert listing(out.parent) == sorted(["out", *(f"out/{n}" for n in ALL_OUTPUTS)])
    assert file_hashes([ct, mri]) == inputs_before

    # a disk-full OSError from the metrics file (plain Python write) is handled the same way
    real_write_text = Path.write_text

    def full_write_text(self, text, *args, **kwargs):
        if self.name == "metrics.json":
            real_write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_write_text)
    code = cli_main(argv)
    err = capsys.readouterr().err
    monkeypatch.setattr(Path, "write_text", real_write_text)
    assert code == 2 and "No space left on device" in err and err.count("\n") == 1, err
    assert file_hashes([out]) == previous
    assert listing(out.parent) == sorted(["out", *(f"out/{n}" for n in ALL_OUTPUTS)])

    # a rename into the folder fails half-way through the commit (the earlier outputs already set aside in the
    # temporary folder, one new output moved in): the new one is taken out, the earlier ones are put back
    real_replace = os.replace
    into_out = []

    def replace_fails_second(src, dst):
        if Path(dst).parent == out and ".partial-" in str(src) and ".previous" not in str(src):
            into_out.append(dst)
            if len(into_out) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_fails_second)
    code = cli_main(argv)
    err = capsys.readouterr().err
    monkeypatch.setattr(os, "replace", real_replace)
    assert code == 2 and "No space left on device" in err and err.count("\n") == 1, err
    assert len(into_out) == 2
    assert file_hashes([out]) == previous, "the earlier outputs are back, byte for byte"
    assert listing(out.parent) == sorted(["out", *(f"out/{n}" for n in ALL_OUTPUTS)])

    # node level: no room for the third output node
    ct_node, mri_node = node_from_image(scene, data.ct, "CT"), node_from_image(scene, data.mri, "MRI")
    prints, state = [node_fingerprint(n) for n in (ct_node, mri_node)], scene_state(scene)
    real_add = mrml.add_volume_node
    added = []

    def add_until_full(*args, **kwargs):
        added.append(1)
        if len(added) == 3:
            raise MemoryError("no room for another volume")
        return real_add(*args, **kwargs)

    monkeypatch.setattr(mrml, "add_volume_node", add_until_full)
    with pytest.raises(MemoryError):
        mrml.run_on_nodes(scene, ct_node, mri_node, weights=data.weights, device="cpu", registration="none")
    assert len(added) == 3
    assert scene_state(scene) == state and [node_fingerprint(n) for n in (ct_node, mri_node)] == prints


def test_reused_output_folder_never_mixes_runs(data: Data, tmp_path: Path, capsys) -> None:
    """runtime/out-dir-reused: a CT-only run into a folder holding a CT + MRI run removes the old difference
    map, registered CT and transform: the folder holds one run, never parts of two."""
    ct, mri = _input_files(data, tmp_path)
    out = tmp_path / "out"
    common = ["--out-dir", str(out), "--weights", str(data.weights), "--registration", "none", "--device", "cpu", "--quiet"]
    assert cli_main(["synthesize", "--ct", str(ct), "--mri", str(mri), *common]) == 0
    (out / "my_notes.txt").write_text("not an output: stays\n")
    assert cli_main(["synthesize", "--ct", str(ct), *common]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*CT_ONLY_OUTPUTS, "my_notes.txt"])
    assert "mae" not in json.loads((out / "metrics.json").read_text())


def test_users_files_named_like_outputs_are_never_touched(data: Data, tmp_path: Path, capsys, monkeypatch) -> None:
    """runtime/out-dir-users-files: an --out-dir holding files of the user's named like ctmri's outputs (the CT
    being read is their own ``ct_registered.nrrd``; their ``metrics.json``; a ``transform.tfm`` put into a folder
    ctmri wrote) is refused before any work, every file as it was; a folder an earlier version wrote (its outputs
    and its ``metrics.json``, no list of them) is still replaced as that run's outputs."""
    patient = tmp_path / "patient"
    patient.mkdir()
    ct, mri = patient / "ct_registered.nrrd", tmp_path / "mri.nrrd"
    sitk.WriteImage(data.ct, str(ct))
    sitk.WriteImage(data.mri, str(mri))
    common = ["--weights", str(data.weights), "--registration", "none", "--device", "cpu", "--quiet"]

    def refused(out: Path, name: str, *inputs: str) -> None:
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        with monkeypatch.context() as patched:
            _no_work_allowed(patched)
            assert cli_main(["synthesize", "--ct", str(ct), *inputs, "--out-dir", str(out), *common]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"{out / name} exists and was not written by ctmri" in lines[0], lines
        assert ADVICE.search(lines[0])
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before

    refused(patient, "ct_registered.nrrd")  # the input itself: a CT-only run used to delete it
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "metrics.json").write_text('{"my": "lab notes"}\n')
    refused(theirs, "metrics.json", "--mri", str(mri))

    out = tmp_path / "out"
    assert cli_main(["synthesize", "--ct", str(ct), "--out-dir", str(out), *common]) == 0
    (out / "transform.tfm").write_text("the user's own transform\n")  # not in the run's list
    refused(out, "transform.tfm", "--mri", str(mri))
    (out / "transform.tfm").unlink()
    (out / outputs.OUTPUT_MANIFEST).unlink()  # as a version before the list left its folder
    assert cli_main(["synthesize", "--ct", str(ct), "--mri", str(mri), "--out-dir", str(out), *common]) == 0
    assert listing(out) == sorted(ALL_OUTPUTS)
    assert cli_main(["synthesize", "--ct", str(ct), "--out-dir", str(out), *common]) == 0
    assert listing(out) == sorted(CT_ONLY_OUTPUTS)  # the CT + MRI run's extra files were its own: removed
    capsys.readouterr()


def test_an_earlier_runs_output_given_as_input_is_kept(data: Data, tmp_path: Path, capsys, monkeypatch) -> None:
    """runtime/out-dir-own-outputs-as-input: the CT read is an output of an earlier run in the same --out-dir (its
    ``ct_registered.nrrd``, its ``dicom/ct_registered`` series), which this run would replace or remove: a rerun
    used to delete the very file it read. Refused before the input is read, every file as it was."""
    ct, mri = _input_files(data, tmp_path)
    out = tmp_path / "out"
    common = ["--out-dir", str(out), "--weights", str(data.weights), "--registration", "none", "--device", "cpu", "--quiet"]
    assert cli_main(["synthesize", "--ct", str(ct), "--mri", str(mri), "--dicom", *common]) == 0
    capsys.readouterr()
    for given in (out / "ct_registered.nrrd", out / "dicom" / "ct_registered", out / "." / "difference.nrrd"):
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        with monkeypatch.context() as patched:
            _no_work_allowed(patched)
            assert cli_main(["synthesize", "--ct", str(given), *common]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"the input {given} is an output of an earlier run in {out}" in lines[0], lines
        assert ADVICE.search(lines[0])
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    kept = tmp_path / "kept.nrrd"  # copied out, as the message says: it runs
    shutil.copy(out / "ct_registered.nrrd", kept)
    assert cli_main(["synthesize", "--ct", str(kept), *common]) == 0
    assert listing(out) == sorted(CT_ONLY_OUTPUTS)


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_twenty_runs_keep_memory_flat_and_outputs_identical(data: Data, tmp_path: Path, capsys) -> None:
    """load/20-runs: 20 CLI runs and 20 node-level runs in one process (4 slices each): identical outputs
    every time, and resident memory after the warm-up grows by less than a small bound."""
    if not Path("/proc/self/statm").exists():
        pytest.skip("resident memory is read from /proc/self/statm (Linux)")
    ct_img, mri_img = data.ct[:, :, :4], data.mri[:, :, :4]
    inputs = tmp_path / "in"
    inputs.mkdir()
    ct, mri = inputs / "ct.nrrd", inputs / "mri.nrrd"
    sitk.WriteImage(ct_img, str(ct))
    sitk.WriteImage(mri_img, str(mri))
    out = tmp_path / "out"
    argv = ["synthesize", "--ct", str(ct), "--mri", str(mri), "--out-dir", str(out), "--weights", str(data.weights),
            "--registration", "none", "--device", "cpu", "--quiet"]
    scene = new_scene()
    previous_scene, slicer.mrmlScene = getattr(slicer, "mrmlScene", None), scene
    volatile = {"seconds", "stage_seconds", "registration"}
    rss = []
    first_files = first_nodes = None
    try:
        ct_node, mri_node = node_from_image(scene, ct_img, "CT"), node_from_image(scene, mri_img, "MRI")
        state = scene_state(scene)
        for i in range(20):
            assert cli_main(argv) == 0
            files = {name: (out / name).read_bytes() for name in ALL_OUTPUTS - {"metrics.json"}}
            summary = {k: v for k, v in json.loads((out / "metrics.json").read_text()).items() if k not in volatile}
            outputs = mrml.run_on_nodes(scene, ct_node, mri_node, weights=data.weights, device="cpu", registration="none")
            nodes = {k: slicer.util.arrayFromVolume(outputs[k]).tobytes() for k in ("synthetic_mri", "ct_registered", "difference")}
            nodes["table"] = mrml.table_rows(outputs["table"])
            mrml.remove_outputs(scene, outputs)
            del outputs
            if first_files is None:
                first_files, first_summary, first_nodes = files, summary, nodes
            else:
                assert files == first_files and summary == first_summary and nodes == first_nodes, f"run {i} differs"
            assert [e[:3] for e in scene_state(scene) if e[1] != "vtkMRMLColorTableNode"] == [e[:3] for e in state]
            gc.collect()
            rss.append(_rss_mb())
        capsys.readouterr()
    finally:
        slicer.mrmlScene = previous_scene
    growth = rss[-1] - rss[4]  # after 5 warm-up runs (caches, allocator pools)
    print(f"RSS after each run (MB): {[round(v, 1) for v in rss]}; growth after warm-up {growth:.1f} MB")
    assert growth < 12, f"memory grew by {growth:.1f} MB over 15 runs: {rss}"


# ------------------------------------------------------------------------------------------------
# the list in Testing/README.md stays the list that runs

SPECIAL_ROWS = {
    "runtime/cancel": test_cancel_cli_ctrl_c_and_node_cancel,
    "runtime/cancel-while-saving": test_cancel_while_writing_outputs,
    "runtime/oom-smaller-batch": test_out_of_memory_halves_the_batch,
    "runtime/oom-cpu-fallback": test_out_of_memory_falls_back_to_the_cpu,
    "runtime/oom-everywhere": test_out_of_memory_everywhere_is_one_error,
    "runtime/unwritable-out-dir": test_unwritable_output_folder,
    "runtime/disk-full": test_disk_full_leaves_no_partial_file,
    "runtime/out-dir-reused": test_reused_output_folder_never_mixes_runs,
    "runtime/out-dir-users-files": test_users_files_named_like_outputs_are_never_touched,
    "runtime/out-dir-own-outputs-as-input": test_an_earlier_runs_output_given_as_input_is_kept,
    "load/20-runs": test_twenty_runs_keep_memory_flat_and_outputs_identical,
}


def test_readme_lists_every_row() -> None:
    readme = (Path(__file__).parent / "README.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\| `([a-z0-9./-]+)` \|", readme, flags=re.M)
    assert sorted(listed) == sorted([*ROWS, *SPECIAL_ROWS]), "Testing/README.md and the matrix differ"
    assert f"**{len(ROWS) + len(SPECIAL_ROWS)} rows**" in readme
    for name, test in SPECIAL_ROWS.items():
        assert test.__doc__.strip().startswith(name + ":"), name
