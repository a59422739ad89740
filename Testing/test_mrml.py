"""Node-level synthesis against REAL MRML (the slicer-core wheel): geometry, untouched inputs,
all-or-nothing outputs, the transform node, and the metrics table against `ctmri synthesize`.

Expected geometry is never computed with the formula under test: it comes from SimpleITK's own
``TransformContinuousIndexToPhysicalPoint`` (LPS) with x and y negated (RAS).
"""

from __future__ import annotations

import json
import math
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

import phantoms  # noqa: E402
from conftest import new_scene  # noqa: E402
from CTtoMRISynthesisLib import mrml, review  # noqa: E402
from CTtoMRISynthesisLib.cli import main as cli_main  # noqa: E402
from CTtoMRISynthesisLib.errors import CancelledError, CTMRIError  # noqa: E402

CASE = "16"  # a synthetic patient (phantoms.py) like Harvard case 16: 18 slices of 256×256


def case_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The patient's 8-bit windowed CT and T2-like MRI (uint8 (18, 256, 256), co-registered; no licensed data)."""
    return phantoms.slice_pair(seed=16, slices=18, first_z=-40.0)
SPACING = (0.9, 0.9, 5.0)


# ------------------------------------------------------------------------------------------------
# helpers


def expected_ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """IJKToRAS from SimpleITK's own index→point mapping (independent of mrml's formula)."""
    origin = np.array(image.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, 0.0)))
    columns = [np.array(image.TransformContinuousIndexToPhysicalPoint(tuple(e))) - origin for e in np.eye(3)]
    lps = np.eye(4)
    lps[:3, :3] = np.column_stack(columns)
    lps[:3, 3] = origin
    lps[:2, :] *= -1.0  # LPS → RAS
    return lps


def node_matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def node_from_image(image: sitk.Image, name: str):
    """A new scalar volume node filled like Slicer's file readers do (not via mrml): voxels, then
    spacing, origin and axis directions set one by one, RAS = LPS with x and y negated."""
    node = slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(image), None, name)
    node.SetSpacing(*image.GetSpacing())
    ox, oy, oz = image.GetOrigin()
    node.SetOrigin(-ox, -oy, oz)
    d = np.array(image.GetDirection()).reshape(3, 3)
    node.SetIJKToRASDirections(*(-d[0]), *(-d[1]), *d[2])  # row-major: RAS rows of the direction matrix
    np.testing.assert_allclose(node_matrix(node), expected_ijk_to_ras(image), atol=1e-9)  # independent check
    return node


def load_node(path: Path, name: str):
    """A real file read with SimpleITK, filled into a new scalar volume node."""
    return node_from_image(sitk.ReadImage(str(path)), name)


def expected_keys(base: set, outputs: dict) -> set:
    """``base`` plus "uncertainty" when the pipeline's model estimated its spread (metrics.json then has
    ``uncertainty_mean``): the nodes follow the result."""
    return set(base) | ({"uncertainty"} if mrml.summary_of(outputs).get("uncertainty_mean") is not None else set())


def scene_state(scene) -> list[tuple]:
    return [
        (scene.GetNthNode(i).GetID(), scene.GetNthNode(i).GetClassName(), scene.GetNthNode(i).GetName())
        for i in range(scene.GetNumberOfNodes())
    ]


def input_fingerprint(node) -> tuple:
    array = slicer.util.arrayFromVolume(node)
    display = node.GetDisplayNode()
    return (
        array.dtype.str,
        array.shape,
        array.tobytes(),
        node_matrix(node).tobytes(),
        node.GetName(),
        node.GetTransformNodeID(),
        display.GetID() if display else None,
        node.GetNumberOfDisplayNodes(),
        tuple(sorted(node.GetAttributeNames() or ())),
    )


def reorient(image: sitk.Image, kind: str) -> sitk.Image:
    """The same real voxels re-expressed with another direction (no resampling)."""
    if kind == "flipped":
        return sitk.Flip(image, (True, False, True))  # same physical content, negative x/z axes
    if kind == "permuted":
        return sitk.PermuteAxes(image, (2, 0, 1))  # same physical content, i is now the slice axis
    if kind == "oblique":
        out = sitk.Image(image)
        rotation = sitk.VersorTransform((1.0, 2.0, 0.5), math.radians(25.0))
        out.SetDirection(tuple(np.array(rotation.GetMatrix()).reshape(3, 3).ravel()))
        out.SetOrigin((12.5, -40.0, 7.25))
        return out
    if kind == "left-handed":
        out = sitk.Image(image)
        out.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))  # determinant −1
        return out
    raise ValueError(kind)


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def case_files(tmp_path_factory) -> tuple[Path, Path]:
    """The synthetic patient as CT and MRI .nrrd files (the same files the CLI reads)."""
    folder = tmp_path_factory.mktemp("mrml_case")
    paths = []
    for modality, array in zip(("CT", "MRI"), case_arrays()):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(SPACING)
        image.SetOrigin((-115.0, -115.0, -40.0))
        path = folder / f"{modality.lower()}.nrrd"
        sitk.WriteImage(image, str(path))
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def rire_image(phantom_mr: sitk.Image) -> sitk.Image:
    """A RIRE-like synthetic MR head (int16, 256×256×26 at 1.25×1.25×4 mm)."""
    return phantom_mr


@pytest.fixture(scope="module")
def run_with_mri(case_files, tiny_weights, tmp_path_factory):
    """One node-level run (rigid registration) shared by the read-only checks below."""
    scene = new_scene()
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = scene
    try:
        ct_node = load_node(case_files[0], "CT16")
        mri_node = load_node(case_files[1], "MR16")
        before = {"ct": input_fingerprint(ct_node), "mri": input_fingerprint(mri_node)}
        nodes_before = scene_state(scene)
        fractions = []
        outputs = mrml.run_on_nodes(
            scene, ct_node, mri_node, weights=tiny_weights, device="cpu", registration="rigid",
            progress=lambda f, m: fractions.append(f),
        )
    finally:
        slicer.mrmlScene = previous
    return {"scene": scene, "ct": ct_node, "mri": mri_node, "outputs": outputs, "before": before,
            "nodes_before": nodes_before, "fractions": fractions}


# ------------------------------------------------------------------------------------------------
# geometry: SimpleITK image <-> node


@pytest.mark.parametrize("kind", ["as-read", "flipped", "permuted", "oblique", "left-handed"])
def test_volume_geometry_round_trip(scene, rire_image, kind) -> None:
    image = rire_image if kind == "as-read" else reorient(rire_image, kind)
    expected = expected_ijk_to_ras(image)
    np.testing.assert_allclose(mrml.ijk_to_ras_of_image(image), expected, atol=1e-9)

    node = mrml.add_volume_node(scene, image, "added")  # image → node
    np.testing.assert_allclose(node_matrix(node), expected, atol=1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(image))

    back = mrml.image_from_volume_node(node_from_image(image, "filled"), "MRI")  # node → image
    assert back.GetSize() == image.GetSize()
    assert back.GetPixelID() == image.GetPixelID()
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    # a voxel lands on the same physical point both ways
    index = (17, 200, 9) if kind != "permuted" else (9, 17, 200)
    ras = node_matrix(node) @ np.array([*index, 1.0])
    lps = image.TransformIndexToPhysicalPoint(index)
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-6)


def test_linear_parent_transform_is_read_in_world_coordinates(scene, rire_image) -> None:
    node = node_from_image(rire_image, "moved")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    to_parent = np.eye(4)
    to_parent[:3, :3] = np.array(sitk.VersorTransform((0, 0, 1), math.radians(10)).GetMatrix()).reshape(3, 3)
    to_parent[:3, 3] = (5.0, -3.0, 12.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(to_parent))
    node.SetAndObserveTransformNodeID(transform.GetID())
    image = mrml.image_from_volume_node(node, "CT")
    world = to_parent @ expected_ijk_to_ras(rire_image)
    np.testing.assert_allclose(expected_ijk_to_ras(image), world, atol=1e-9)
    assert node.GetTransformNodeID() == transform.GetID()  # the input keeps its transform


@pytest.mark.parametrize("case", ["colour", "two-component", "labelmap", "empty", "sequence", "nonlinear", "none", "model"])
def test_unsuitable_nodes_are_refused(scene, rire_image, case) -> None:
    array = sitk.GetArrayFromImage(rire_image)
    if case == "colour":  # red, green and blue differ: real colour, not a grey screenshot
        grey = (array // 16).astype(np.uint8)
        node = slicer.util.addVolumeFromArray(np.stack([grey, grey // 2, grey // 3], axis=-1), nodeClassName="vtkMRMLVectorVolumeNode")
        message = "3 components per voxel .*give a single-channel grayscale CT"
    elif case == "two-component":  # e.g. a displacement field: never grey
        node = slicer.util.addVolumeFromArray(np.stack([array] * 2, axis=-1), nodeClassName="vtkMRMLVectorVolumeNode")
        message = "2 components per voxel"
    elif case == "labelmap":
        node = slicer.util.addVolumeFromArray((array > 100).astype(np.uint8), nodeClassName="vtkMRMLLabelMapVolumeNode")
        message = "label map"
    elif case == "empty":
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
        message = "no voxels"
    elif case == "sequence":
        node = slicer.util.addVolumeFromArray(array, name="frame")
        sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "4D")
        for t in range(3):
            frame = slicer.vtkMRMLScalarVolumeNode()
            frame.SetAndObserveImageData(node.GetImageData())
            sequence.SetDataNodeAtValue(frame, str(t))
        scene.RegisterNodeClass(slicer.vtkMRMLSequenceBrowserNode())  # Slicer's Sequences module does this
        browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "browser")
        browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
        browser.AddProxyNode(node, sequence, False)
        message = "3-frame sequence"
    elif case == "nonlinear":
        node = slicer.util.addVolumeFromArray(array, name="warped")
        grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
        node.SetAndObserveTransformNodeID(grid.GetID())
        message = "non-linear"
    elif case == "none":
        node, message = None, "no CT volume"
    else:
        node = scene.AddNewNodeByClass("vtkMRMLModelNode", "a model")
        message = "not a volume"
    with pytest.raises(CTMRIError, match=message):
        mrml.image_from_volume_node(node, "CT")


# ------------------------------------------------------------------------------------------------
# the node-level synthesis


def test_run_adds_named_outputs_on_the_mri_grid(run_with_mri, case_files) -> None:
    outputs, scene = run_with_mri["outputs"], run_with_mri["scene"]
    base = "CT16"
    assert set(outputs) == expected_keys({"ct_registered", "synthetic_mri", "difference", "transform", "table"}, outputs)
    assert outputs["ct_registered"].GetName() == f"{base} registered"
    assert outputs["synthetic_mri"].GetName() == f"{base} synthetic MRI"
    assert outputs["difference"].GetName() == f"{base} difference"
    assert outputs["table"].GetName() == f"{base} synthesis metrics"
    assert outputs["transform"].IsA("vtkMRMLLinearTransformNode")
    for node in outputs.values():
        assert scene.IsNodePresent(node)
    # every output volume is on the grid of the MRI file as SimpleITK reads it
    mri_file = sitk.ReadImage(str(case_files[1]))
    for key in ("ct_registered", "synthetic_mri", "difference"):
        node = outputs[key]
        np.testing.assert_allclose(node_matrix(node), expected_ijk_to_ras(mri_file), atol=1e-9)
        assert slicer.util.arrayFromVolume(node).shape == sitk.GetArrayFromImage(mri_file).shape
        assert node.GetParentTransformNode() is None
    synthetic = slicer.util.arrayFromVolume(outputs["synthetic_mri"])
    assert 0.0 <= synthetic.min() and synthetic.max() <= 255.0 and synthetic.std() > 1.0
    # difference = MRI − synthetic, on the 0..255 scale
    mri255 = sitk.GetArrayFromImage(mri_file).astype(np.float32)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(outputs["difference"]), mri255 - synthetic, atol=1e-3)
    # progress went from 0 to 1 without going back
    fractions = run_with_mri["fractions"]
    assert fractions[-1] == 1.0 and all(b >= a - 1e-9 for a, b in zip(fractions, fractions[1:]))


def test_inputs_are_byte_identical_afterwards(run_with_mri) -> None:
    assert input_fingerprint(run_with_mri["ct"]) == run_with_mri["before"]["ct"]
    assert input_fingerprint(run_with_mri["mri"]) == run_with_mri["before"]["mri"]
    # and nothing that existed before was removed or renamed
    after = {entry[0]: entry for entry in scene_state(run_with_mri["scene"])}
    for entry in run_with_mri["nodes_before"]:
        assert after[entry[0]] == entry


def test_difference_display_is_diverging_and_symmetric(run_with_mri) -> None:
    display = run_with_mri["outputs"]["difference"].GetDisplayNode()
    assert not display.GetAutoWindowLevel()
    assert display.GetLevel() == 0.0 and display.GetWindow() > 0
    lower, upper = display.GetLevel() - display.GetWindow() / 2, display.GetLevel() + display.GetWindow() / 2
    assert lower == -upper
    colours = display.GetColorNode()
    assert colours is not None and colours.GetAttribute(mrml.ROLE_ATTRIBUTE) == "difference colormap"
    lut = colours.GetLookupTable()
    first, middle, last = lut.GetTableValue(0), lut.GetTableValue(128), lut.GetTableValue(255)
    assert first[2] > first[0] and last[0] > last[2]  # blue for negative, red for positive
    assert max(middle[:3]) < 0.1  # dark at zero


def test_table_matches_the_cli_metrics_json(run_with_mri, case_files, tiny_weights, tmp_path) -> None:
    out = tmp_path / "cli"
    code = cli_main(["synthesize", "--ct", str(case_files[0]), "--mri", str(case_files[1]), "--out-dir", str(out),
                     "--weights", str(tiny_weights), "--device", "cpu", "--registration", "rigid", "--quiet"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    table = run_with_mri["outputs"]["table"]
    rows = mrml.table_rows(table)
    assert len(rows) == 1 + len(metrics["per_slice"])
    columns = {title: key for title, key, _, _ in mrml.TABLE_COLUMNS}

    def same(a, b):
        return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9))

    volume = rows[0]
    assert volume["Scope"] == "volume" and volume["Slice"] is None and volume["Foreground voxels"] == metrics["foreground_voxels"]
    for title, key in columns.items():
        assert same(volume[title], metrics[key]), title
    for row, entry in zip(rows[1:], metrics["per_slice"]):
        assert row["Scope"] == "slice" and row["Slice"] == entry["index"]  # a number: sorts and plots as one
        assert row["Foreground voxels"] == entry["foreground_voxels"]
        for title, key in columns.items():
            if key != "psnr":
                assert same(row[title], entry[key]), (entry["index"], title)
    # the full metrics.json content travels with the table (timings aside, identical)
    summary = json.loads(table.GetAttribute(mrml.SUMMARY_ATTRIBUTE))
    volatile = {"seconds", "stage_seconds", "registration"}
    assert {k: v for k, v in summary.items() if k not in volatile} == {k: v for k, v in metrics.items() if k not in volatile}
    # registration: the same transform (its iteration count and timing may differ between runs)
    for key in ("mode", "transform_type"):
        assert summary["registration"][key] == metrics["registration"][key]
    for key in ("matrix", "translation"):
        np.testing.assert_allclose(summary["registration"][key], metrics["registration"][key], atol=1e-6)

    # The module's background path (worker output folder → nodes) gives the same nodes.
    scene = new_scene()
    from_folder = mrml.add_outputs_from_folder(scene, out, "CT16")
    assert set(from_folder) == set(run_with_mri["outputs"])
    for key in ("ct_registered", "synthetic_mri", "difference"):
        a, b = from_folder[key], run_with_mri["outputs"][key]
        assert a.GetName() == b.GetName()
        np.testing.assert_allclose(node_matrix(a), node_matrix(b), atol=1e-9)
        np.testing.assert_allclose(slicer.util.arrayFromVolume(a), slicer.util.arrayFromVolume(b), atol=1e-4)
    assert mrml.table_rows(from_folder["table"]) == rows or all(
        all(same(x[k], y[k]) if isinstance(x[k], float) or x[k] is None else x[k] == y[k] for k in x)
        for x, y in zip(mrml.table_rows(from_folder["table"]), rows)
    )


def test_transform_node_maps_like_the_sitk_transform(scene) -> None:
    transform = sitk.Similarity3DTransform()
    transform.SetCenter((10.0, -20.0, 30.0))
    transform.SetRotation((0.3, -0.5, 0.8), math.radians(17.0))
    transform.SetTranslation((4.0, -7.5, 2.25))
    transform.SetScale(1.05)
    node = mrml.add_transform_node(scene, transform, "reg")
    rng = np.random.default_rng(0)
    to_parent, from_parent = node.GetTransformToParent(), node.GetTransformFromParent()
    for mri_lps in rng.uniform(-150, 150, size=(20, 3)):
        ct_lps = np.array(transform.TransformPoint(tuple(mri_lps)))
        mri_ras = mri_lps * [-1, -1, 1]
        ct_ras = ct_lps * [-1, -1, 1]
        # FromParent = the ITK transform (MRI → CT); ToParent moves a CT point onto the MRI
        np.testing.assert_allclose(from_parent.TransformPoint(mri_ras), ct_ras, atol=1e-6)
        np.testing.assert_allclose(to_parent.TransformPoint(ct_ras), mri_ras, atol=1e-6)


def test_transform_node_as_parent_of_the_ct_reproduces_the_registered_ct(scene, case_files, tiny_weights) -> None:
    """End to end: a CT shifted by a known amount; the transform node, used as the CT's parent, puts it on the MRI."""
    ct_file, mri_file = (sitk.ReadImage(str(p)) for p in case_files)
    shift_lps = np.array([6.0, -4.0, 0.0])  # mm
    moved = sitk.Image(ct_file)
    moved.SetOrigin(tuple(np.array(ct_file.GetOrigin()) + shift_lps))  # the head moved by +shift
    ct_node = node_from_image(moved, "moved CT")
    mri_node = node_from_image(mri_file, "MRI")
    outputs = mrml.run_on_nodes(scene, ct_node, mri_node, weights=tiny_weights, device="cpu", registration="rigid")
    transform_node = outputs["transform"]
    # The node holds exactly the transform the registration reported (MRI → CT, LPS), in RAS.
    # (How close that is to the applied shift is the registration's business: test_registration.py.)
    registration = mrml.summary_of(outputs)["registration"]
    for mri_lps in np.random.default_rng(1).uniform(-100, 100, size=(10, 3)):
        ct_lps = np.array(registration["matrix"]) @ mri_lps + np.array(registration["translation"])
        mri_ras, ct_ras = mri_lps * [-1, -1, 1], ct_lps * [-1, -1, 1]
        np.testing.assert_allclose(transform_node.GetTransformToParent().TransformPoint(ct_ras), mri_ras, atol=1e-6)

    # a clone of the CT under the transform node, read in world coordinates and resampled onto the MRI
    # grid with no further transform, equals the pipeline's registered CT
    clone = node_from_image(moved, "clone")
    clone.SetAndObserveTransformNodeID(transform_node.GetID())
    hardened = mrml.image_from_volume_node(clone, "CT")
    on_mri = sitk.Resample(sitk.Cast(hardened, sitk.sitkFloat32), mri_file, sitk.Transform(), sitk.sitkLinear,
                           float(sitk.GetArrayViewFromImage(moved).min()), sitk.sitkFloat32)
    registered = slicer.util.arrayFromVolume(outputs["ct_registered"])
    inside = sitk.GetArrayFromImage(sitk.Resample(sitk.Image(hardened.GetSize(), sitk.sitkUInt8) + 1, mri_file,
                                                  sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    np.testing.assert_allclose(sitk.GetArrayFromImage(on_mri)[inside], registered[inside], atol=0.05)


@pytest.fixture(scope="module")
def plain_run(case_files, tiny_weights):
    scene = new_scene()
    ct_file, mri_file = (sitk.ReadImage(str(p)) for p in case_files)
    previous, slicer.mrmlScene = getattr(slicer, "mrmlScene", None), scene
    try:
        return mrml.run_on_nodes(scene, node_from_image(ct_file, "plain CT"), node_from_image(mri_file, "plain MRI"),
                                 weights=tiny_weights, device="cpu", registration="none")
    finally:
        slicer.mrmlScene = previous


@pytest.mark.parametrize(
    "ct_axes, mri_axes",
    [
        pytest.param((1, 0, 2), (1, 0, 2), id="in-plane"),
        pytest.param((1, 0, 2), (2, 1, 0), id="through-plane"),  # the MRI's k axis runs left-right
    ],
)
def test_reoriented_inputs_give_the_same_physical_result(scene, case_files, tiny_weights, plain_run, ct_axes, mri_axes) -> None:
    """Flipped + permuted copies of the real CT/MRI: outputs on their own grids, same anatomy."""
    ct_file, mri_file = (sitk.ReadImage(str(p)) for p in case_files)
    plain = plain_run
    odd_ct = sitk.PermuteAxes(sitk.Flip(ct_file, (True, False, False)), ct_axes)
    odd_mri = sitk.PermuteAxes(sitk.Flip(mri_file, (False, True, True)), mri_axes)
    odd = mrml.run_on_nodes(scene, node_from_image(odd_ct, "odd CT"), node_from_image(odd_mri, "odd MRI"),
                            weights=tiny_weights, device="cpu", registration="none")
    np.testing.assert_allclose(node_matrix(odd["synthetic_mri"]), expected_ijk_to_ras(odd_mri), atol=1e-9)
    back = sitk.Resample(mrml.image_from_volume_node(odd["synthetic_mri"], "result"), mri_file, sitk.Transform(),
                         sitk.sitkNearestNeighbor, 0.0)
    np.testing.assert_allclose(sitk.GetArrayFromImage(back), slicer.util.arrayFromVolume(plain["synthetic_mri"]), atol=1e-3)
    assert math.isclose(mrml.summary_of(odd)["mae"], mrml.summary_of(plain)["mae"], rel_tol=1e-6)


def colour_node_read_by_slicer(scene, image: sitk.Image, channels: int, path: Path):
    """A grey image saved as RGB(A) (red = green = blue, opaque) and read back by Slicer's own volume reader
    into a vector volume node, as Slicer loads a PNG screenshot."""
    grey = sitk.GetArrayFromImage(image)
    stack = [grey] * 3 + ([np.full_like(grey, 255)] if channels == 4 else [])
    colour = sitk.GetImageFromArray(np.stack(stack, axis=-1), isVector=True)
    colour.CopyInformation(image)
    sitk.WriteImage(colour, str(path))
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "screenshot")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert node.GetImageData().GetNumberOfScalarComponents() == channels
    return node


@pytest.mark.parametrize("channels", [3, 4])
def test_grey_stored_as_colour_is_read_as_its_grey(scene, rire_image, channels, tmp_path) -> None:
    """The node-level twin of the CLI's rule (``volumes.as_scalar_3d``): the grey, on the same geometry."""
    grey = sitk.Cast(sitk.RescaleIntensity(rire_image, 0, 255), sitk.sitkUInt8)
    node = colour_node_read_by_slicer(scene, grey, channels, tmp_path / "colour.nrrd")
    before = input_fingerprint(node)
    image = mrml.image_from_volume_node(node, "CT")
    assert image.GetNumberOfComponentsPerPixel() == 1 and image.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(grey))
    np.testing.assert_allclose(expected_ijk_to_ras(image), expected_ijk_to_ras(grey), atol=1e-9)
    assert input_fingerprint(node) == before  # the colour node is only read


def test_a_grey_screenshot_node_gives_the_plain_result(scene, case_files, tiny_weights, plain_run, tmp_path) -> None:
    """End to end from a colour node holding the CT's grey: the same synthetic MRI and metrics as the scalar CT."""
    ct_file, mri_file = (sitk.ReadImage(str(p)) for p in case_files)
    ct_node = colour_node_read_by_slicer(scene, ct_file, 3, tmp_path / "ct_rgb.nrrd")
    outputs = mrml.run_on_nodes(scene, ct_node, node_from_image(mri_file, "plain MRI"), weights=tiny_weights,
                                device="cpu", registration="none")
    np.testing.assert_allclose(slicer.util.arrayFromVolume(outputs["synthetic_mri"]),
                               slicer.util.arrayFromVolume(plain_run["synthetic_mri"]), atol=1e-3)
    assert math.isclose(mrml.summary_of(outputs)["mae"], mrml.summary_of(plain_run)["mae"], rel_tol=1e-6)


def test_a_picture_stack_at_slicers_1mm_is_not_registered(scene, case_files, tiny_weights, tmp_path) -> None:
    """A stack Slicer loaded from PNG slices has 1 mm spacing (pictures record none) and its storage node names the
    first picture: registering it to an MRI is refused, as the command line refuses a picture folder without
    --picture-spacing; with its real spacing set, with Registration none, one slice or no MRI it goes on.
    (slicer-core reads no PNG, so the stack is read from NRRD and its storage node then names the PNG it would
    have come from: the node state the check reads.)"""
    ct_file, mri_file = (sitk.ReadImage(str(p)) for p in case_files)
    stack = sitk.GetImageFromArray(sitk.GetArrayFromImage(ct_file))  # spacing 1, origin 0, as Slicer gives pictures
    sitk.WriteImage(stack, str(tmp_path / "stack.nrrd"))
    ct_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT_PNG (1)")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "stack.nrrd"))
    assert storage.ReadData(ct_node) == 1
    ct_node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(tmp_path / "CT_PNG (1).png"))
    mri_node = node_from_image(mri_file, "MRI")
    before = scene.GetNumberOfNodes()
    with pytest.raises(CTMRIError, match=r"'CT_PNG \(1\)' was loaded from 2D pictures .*Volume Information"):
        mrml.run_on_nodes(scene, ct_node, mri_node, weights=tiny_weights, device="cpu", registration="rigid")
    assert scene.GetNumberOfNodes() == before
    mrml.check_picture_spacing(ct_node, mri_node, "none")
    mrml.check_picture_spacing(ct_node, None, "rigid")
    ct_node.SetSpacing(25.4 / 72, 25.4 / 72, 1.0)  # a TIFF stack at 72 dpi, as ITK reads its resolution tag
    with pytest.raises(CTMRIError, match="was loaded from 2D pictures"):
        mrml.check_picture_spacing(ct_node, mri_node, "rigid")
    for real in ((0.9, 0.9, 5.0), (0.488281, 0.488281, 1.0), (1.0, 1.0, 2.5)):
        ct_node.SetSpacing(*real)
        mrml.check_picture_spacing(ct_node, mri_node, "rigid")
    ct_node.SetSpacing(1.0, 1.0, 1.0)
    storage.SetFileName(str(tmp_path / "stack.nrrd"))
    mrml.check_picture_spacing(ct_node, mri_node, "rigid")  # a volume file: its spacing is its own


def test_without_mri_only_the_synthetic_mri_is_added(scene, case_files, tiny_weights) -> None:
    ct_file = sitk.ReadImage(str(case_files[0]))
    ct_node = node_from_image(ct_file, "CT only")
    outputs = mrml.run_on_nodes(scene, ct_node, None, weights=tiny_weights, device="cpu")
    assert set(outputs) == expected_keys({"synthetic_mri"}, outputs)
    np.testing.assert_allclose(node_matrix(outputs["synthetic_mri"]), expected_ijk_to_ras(ct_file), atol=1e-9)
    summary = mrml.summary_of(outputs)
    assert summary["device"] == "cpu" and "mae" not in summary
    text = mrml.metrics_panel_text(summary)
    assert text["mae"] == "-" and text["device"] == "cpu" and text["time"].endswith(" s")


def test_outputs_are_gathered_in_a_folder_in_the_ct_study(scene, case_files, tiny_weights) -> None:
    """The outputs sit in "<CT> synthesis" inside the CT's study (Data module); removing them removes it."""
    ct_node, mri_node = load_node(case_files[0], "CT"), load_node(case_files[1], "MRI")
    sh = slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 33")
    study = sh.CreateStudyItem(patient, "Study")
    for node in (ct_node, mri_node):
        sh.CreateItem(study, node)
    outputs = mrml.run_on_nodes(scene, ct_node, mri_node, weights=tiny_weights, device="cpu", registration="none")
    folders = {sh.GetItemParent(sh.GetItemByDataNode(node)) for node in outputs.values()}
    assert len(folders) == 1
    folder = folders.pop()
    assert sh.GetItemName(folder) == "CT synthesis" and sh.GetItemParent(folder) == study
    assert sh.GetNumberOfItemChildren(folder) == len(outputs) == len(
        expected_keys({"ct_registered", "synthetic_mri", "difference", "transform", "table"}, outputs))
    assert sh.GetItemParent(sh.GetItemByDataNode(ct_node)) == study  # the input stays where it was
    mrml.remove_outputs(scene, outputs)
    assert sh.GetItemChildWithName(study, "CT synthesis") == 0
    assert all(node.GetScene() is None for node in outputs.values())


def test_a_second_run_gets_its_own_names(scene, case_files, tiny_weights) -> None:
    """Running twice on one CT gives "CT synthetic MRI (2)" and a folder "CT synthesis (2)", not a second
    "CT synthetic MRI" that getNode cannot tell from the first; the first run's nodes are left as they were."""
    ct_node, mri_node = load_node(case_files[0], "CT"), load_node(case_files[1], "MRI")
    first = mrml.run_on_nodes(scene, ct_node, mri_node, weights=tiny_weights, device="cpu", registration="none")
    first_names = {key: node.GetName() for key, node in first.items()}
    second = mrml.run_on_nodes(scene, ct_node, mri_node, weights=tiny_weights, device="cpu", registration="none")
    assert {key: node.GetName() for key, node in first.items()} == first_names
    assert {key: node.GetName() for key, node in second.items()} == {key: f"{name} (2)" for key, name in first_names.items()}
    sh = slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)
    folder_of = {run: sh.GetItemName(sh.GetItemParent(sh.GetItemByDataNode(outputs["synthetic_mri"])))
                 for run, outputs in (("first", first), ("second", second))}
    assert folder_of == {"first": "CT synthesis", "second": "CT synthesis (2)"}
    for node in first.values():  # a name of the first run taken by the user's own node: the next run skips it
        if node.GetName() == "CT difference":
            node.SetName("CT difference (3)")
    third = mrml.run_on_nodes(scene, ct_node, None, weights=tiny_weights, device="cpu")
    assert third["synthetic_mri"].GetName() == "CT synthetic MRI (4)"
    assert len({node.GetName() for node in scene.GetNodesByClass("vtkMRMLScalarVolumeNode")}) == \
        scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")


def test_a_result_refers_to_the_nodes_it_was_made_from(scene, loaded, tiny_weights) -> None:
    """The synthetic MRI refers (MRML node references) to its CT and reference MRI, or to the CT alone."""
    ct_node, mri_node = loaded
    with_mri = mrml.run_on_nodes(scene, ct_node, mri_node, weights=tiny_weights, device="cpu", registration="none")
    assert mrml.run_inputs(with_mri["synthetic_mri"]) == (ct_node, mri_node)
    alone = mrml.run_on_nodes(scene, ct_node, None, weights=tiny_weights, device="cpu")
    assert mrml.run_inputs(alone["synthetic_mri"]) == (ct_node, None)


@pytest.mark.parametrize("ct_name", ["", "  "])
def test_a_ct_without_a_name_gives_outputs_named_after_ct(scene, loaded, case_files, tiny_weights, tmp_path,
                                                          ct_name) -> None:
    """A CT node without a name (a script's AddNewNodeByClass) gives "CT synthetic MRI", not " synthetic MRI", on
    both paths: the console's run_on_nodes and the panel's results loaded from the background run's folder."""
    ct_node, _ = loaded
    ct_node.SetName(ct_name)
    outputs = mrml.run_on_nodes(scene, ct_node, None, weights=tiny_weights, device="cpu")
    assert outputs["synthetic_mri"].GetName() == "CT synthetic MRI"
    out = tmp_path / "run"
    assert cli_main(["synthesize", "--ct", str(case_files[0]), "--out-dir", str(out),
                     "--weights", str(tiny_weights), "--device", "cpu", "--quiet"]) == 0
    loaded_back = mrml.add_outputs_from_folder(scene, out, ct_node.GetName(), ct_node)
    assert loaded_back["synthetic_mri"].GetName() == "CT synthetic MRI (2)"


# ------------------------------------------------------------------------------------------------
# failures and cancel leave the scene as it was


@pytest.fixture()
def loaded(scene, case_files):
    return load_node(case_files[0], "CT"), load_node(case_files[1], "MRI")


def _assert_unchanged(scene, before_state, nodes, before_prints) -> None:
    assert scene_state(scene) == before_state
    for node, fingerprint in zip(nodes, before_prints):
        assert input_fingerprint(node) == fingerprint


def test_constant_ct_fails_and_leaves_the_scene(scene, loaded, tiny_weights) -> None:
    ct_node, mri_node = loaded
    constant = slicer.util.addVolumeFromArray(np.full((4, 32, 32), 7, np.int16), np.eye(4), "constant")
    state, prints = scene_state(scene), [input_fingerprint(n) for n in (constant, mri_node)]
    with pytest.raises(CTMRIError, match="constant"):
        mrml.run_on_nodes(scene, constant, mri_node, weights=tiny_weights, device="cpu")
    _assert_unchanged(scene, state, (constant, mri_node), prints)


def test_bad_weights_checksum_fails_and_leaves_the_scene(scene, loaded, tiny_weights, tmp_path) -> None:
    ct_node, mri_node = loaded
    bad = tmp_path / "tampered.safetensors"
    shutil.copy(tiny_weights, bad)
    shutil.copy(str(tiny_weights) + ".sha256", str(bad) + ".sha256")
    data = bytearray(bad.read_bytes())
    data[-100] ^= 0xFF
    bad.write_bytes(bytes(data))
    state, prints = scene_state(scene), [input_fingerprint(n) for n in loaded]
    with pytest.raises(CTMRIError, match="sha256"):
        mrml.run_on_nodes(scene, ct_node, mri_node, weights=bad, device="cpu")
    _assert_unchanged(scene, state, loaded, prints)


def test_cancel_mid_run_leaves_the_scene(scene, loaded, tiny_weights) -> None:
    ct_node, mri_node = loaded
    state, prints = scene_state(scene), [input_fingerprint(n) for n in loaded]
    seen = []

    def progress(fraction, message):
        seen.append(fraction)

    def cancel():
        return bool(seen) and seen[-1] >= 0.4  # during the synthesis stage

    with pytest.raises(CancelledError):
        mrml.run_on_nodes(scene, ct_node, mri_node, weights=tiny_weights, device="cpu", registration="none",
                          progress=progress, cancel=cancel)
    assert 0.36 <= max(seen) < 1.0
    _assert_unchanged(scene, state, loaded, prints)


def test_cancel_after_the_last_stage_still_adds_nothing(scene, loaded, tiny_weights) -> None:
    """Cancel pressed once the synthesis has finished (progress at 1.0), before the nodes are added: the run is
    cancelled and nothing is added (the check between the two could be deleted unnoticed)."""
    ct_node, mri_node = loaded
    state, prints = scene_state(scene), [input_fingerprint(n) for n in loaded]
    seen = []
    with pytest.raises(CancelledError):
        mrml.run_on_nodes(scene, ct_node, mri_node, weights=tiny_weights, device="cpu", registration="none",
                          progress=lambda fraction, message: seen.append(fraction),
                          cancel=lambda: bool(seen) and seen[-1] >= 1.0)
    assert max(seen) == 1.0
    _assert_unchanged(scene, state, loaded, prints)


def test_error_while_adding_nodes_removes_the_ones_added(scene, loaded, tiny_weights, monkeypatch) -> None:
    ct_node, mri_node = loaded
    state, prints = scene_state(scene), [input_fingerprint(n) for n in loaded]

    def broken(*args, **kwargs):
        raise MemoryError("no room for the table")

    monkeypatch.setattr(mrml, "add_metrics_table", broken)
    with pytest.raises(MemoryError):
        mrml.run_on_nodes(scene, ct_node, mri_node, weights=tiny_weights, device="cpu", registration="none")
    _assert_unchanged(scene, state, loaded, prints)


@pytest.mark.parametrize("fails", ["volume voxels", "transform matrix", "table column"])
def test_error_while_filling_a_node_removes_it_too(scene, loaded, tiny_weights, monkeypatch, fails) -> None:
    """A failure after a node is in the scene but before it is filled (memory while its voxels are copied) removes
    that node as well as the ones added before it: the helpers add each node to the scene first."""
    ct_node, mri_node = loaded
    state, prints = scene_state(scene), [input_fingerprint(n) for n in loaded]
    calls: list = []

    def fail_on(real, when):
        def wrapped(*args, **kwargs):
            calls.append(1)
            if when(len(calls)):
                raise MemoryError(f"no room ({fails})")
            return real(*args, **kwargs)
        return wrapped

    slicer = mrml._slicer()
    if fails == "volume voxels":  # the second volume (the synthetic MRI) fails while its voxels are copied
        monkeypatch.setattr(slicer.util, "updateVolumeFromArray", fail_on(slicer.util.updateVolumeFromArray,
                                                                          lambda n: n == 2))
    elif fails == "transform matrix":  # _vtk_matrix is called once per volume, then for the transform node
        real_add = mrml.add_transform_node

        def add_transform(*args, **kwargs):
            monkeypatch.setattr(mrml, "_vtk_matrix", fail_on(mrml._vtk_matrix, lambda n: True))
            return real_add(*args, **kwargs)
        monkeypatch.setattr(mrml, "add_transform_node", add_transform)
    else:  # a column's description is set on the table node after it is in the scene; a number is refused there
        monkeypatch.setattr(mrml, "TABLE_COLUMNS", mrml.TABLE_COLUMNS[:-1] + (mrml.TABLE_COLUMNS[-1][:3] + (5,),))
    with pytest.raises((MemoryError, TypeError)):
        mrml.run_on_nodes(scene, ct_node, mri_node, weights=tiny_weights, device="cpu", registration="rigid")
    _assert_unchanged(scene, state, loaded, prints)


# ------------------------------------------------------------------------------------------------
# review views and panel text


def _view_state(scene, tag: str) -> tuple:
    """What a slice view shows and how: orientation, label, colour, view group, volumes, linking."""
    slice_node = scene.GetSingletonNode(tag, "vtkMRMLSliceNode")
    composite = scene.GetSingletonNode(tag, "vtkMRMLSliceCompositeNode")
    return (
        slice_node.GetOrientation(), slice_node.GetLayoutLabel(), tuple(round(c, 4) for c in slice_node.GetLayoutColor()),
        slice_node.GetViewGroup(), composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID(),
        composite.GetLinkedControl(),
    )


def _rgb(hex_colour: str) -> tuple:
    return tuple(round(int(hex_colour[i:i + 2], 16) / 255.0, 4) for i in (1, 3, 5))


@pytest.fixture()
def review_scene(scene):
    """A scene laid out as Slicer does it: a real vtkMRMLLayoutLogic (Red/Yellow/Green made by it, the
    conventional layout), a slice logic per view as the application's slice widgets have (they make the
    composite nodes), the user's CT in Red; and a result's nodes."""
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)
    layout_node = layout_logic.GetLayoutNode()
    layout_node.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView)
    slice_logics = {}

    def make_slice_logics():
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
            node = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
            if node.GetLayoutName() not in slice_logics:
                logic = slicer.vtkMRMLSliceLogic()
                logic.SetMRMLScene(scene)
                logic.SetSliceNode(node)
                slice_logics[node.GetLayoutName()] = logic

    make_slice_logics()
    arrays = list(case_arrays())
    ct = mrml.add_volume_node(scene, sitk.GetImageFromArray(arrays[0]), "CT16")
    mri = mrml.add_volume_node(scene, sitk.GetImageFromArray(arrays[1]), "MR16")
    outputs = {
        name: mrml.add_volume_node(scene, sitk.GetImageFromArray(arrays[1].astype(np.float32)), f"CT16 {name}", name)
        for name in ("synthetic_mri", "difference", "uncertainty")
    }
    red = scene.GetSingletonNode("Red", "vtkMRMLSliceCompositeNode")
    red.SetBackgroundVolumeID(ct.GetID())
    yield types.SimpleNamespace(scene=scene, layout_node=layout_node, layout_logic=layout_logic, ct=ct, mri=mri,
                                outputs=outputs, make_slice_logics=make_slice_logics)
    slice_logics.clear()  # teardown: drop the logics before the scene


def test_review_layout_uses_its_own_views_and_leaves_the_users_views(review_scene) -> None:
    import xml.etree.ElementTree as ET

    r = review_scene
    scene = r.scene
    user_views = {tag: _view_state(scene, tag) for tag in ("Red", "Yellow", "Green")}
    assert user_views["Red"][0] == "Axial" and user_views["Yellow"][0] == "Sagittal"

    plan = review.review_plan(r.outputs, r.mri, r.ct)
    assert [(e["role"], e["background"].GetID()) for e in plan] == [
        ("reference", r.mri.GetID()), ("synthetic", r.outputs["synthetic_mri"].GetID()),
        ("difference", r.outputs["difference"].GetID()), ("uncertainty", r.outputs["uncertainty"].GetID()),
    ]
    root = ET.fromstring(review.review_layout_xml(plan))
    tags = [v.get("singletontag") for v in root.iter("view")]
    assert tags == ["CTMRIReference", "CTMRISynthetic", "CTMRIDifference", "CTMRIUncertainty"]
    assert not set(tags) & {"Red", "Yellow", "Green"}
    assert len(root.findall("./item/layout")) == 2, "four views: two rows of two"

    layout_id = review.register_review_layout(r.layout_node, plan)
    assert layout_id == review.review_layout_id(plan) > 1000
    r.layout_node.SetViewArrangement(layout_id)  # what layoutManager.setLayout does
    r.make_slice_logics()  # the application makes a slice widget (and its composite node) per new view
    assert len(review.apply_review_plan(scene, plan)) == 4

    for entry in plan:
        tag, label, colour = review.REVIEW_VIEWS[entry["role"]]
        state = _view_state(scene, tag)
        assert state[:4] == ("Axial", label, _rgb(colour), review.REVIEW_VIEW_GROUP), "labels and colours apply"
        assert state[4] == entry["background"].GetID() and state[5] is None and state[6]
    assert {tag: _view_state(scene, tag) for tag in user_views} == user_views, "Red/Yellow/Green untouched"

    # Back to the user's layout and to the review again: the same views, re-oriented, nothing else changed.
    n_slice_nodes = scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")
    scene.GetSingletonNode("CTMRISynthetic", "vtkMRMLSliceNode").SetOrientation("Sagittal")
    r.layout_node.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView)
    assert {tag: _view_state(scene, tag) for tag in user_views} == user_views
    assert review.register_review_layout(r.layout_node, plan) == layout_id
    r.layout_node.SetViewArrangement(layout_id)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSliceNode") == n_slice_nodes, "views made once"
    assert scene.GetSingletonNode("CTMRISynthetic", "vtkMRMLSliceNode").GetOrientation() == "Axial"
    assert scene.GetSingletonNode("CTMRISynthetic", "vtkMRMLSliceNode").GetLayoutLabel() == "sMRI"


def test_review_without_an_mri(review_scene) -> None:
    r = review_scene
    outputs = {"synthetic_mri": r.outputs["synthetic_mri"]}
    plan = review.review_plan(outputs, None, r.ct)
    assert [(e["role"], e["label"]) for e in plan] == [("ct", "CT"), ("synthetic", "sMRI")]
    assert review.review_layout_id(plan) != review.review_layout_id(review.review_plan(r.outputs, r.mri, r.ct))
    r.layout_node.SetViewArrangement(review.register_review_layout(r.layout_node, plan))
    r.make_slice_logics()
    review.apply_review_plan(r.scene, plan)
    assert _view_state(r.scene, "CTMRIInputCT")[:2] == ("Axial", "CT")
    assert r.scene.GetSingletonNode("CTMRIReference", "vtkMRMLSliceNode") is None, "only the views shown are made"
    with pytest.raises(CTMRIError, match="not a review view"):
        review.apply_review_plan(r.scene, [{"view": "Red", "background": r.ct}])


def _layout_scene():
    """A bare scene with Slicer's layout logic, in the conventional layout, as at the application's start."""
    scene = new_scene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    logic = slicer.vtkMRMLLayoutLogic()
    logic.SetMRMLScene(scene)
    logic.GetLayoutNode().SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView)
    return scene, logic


def test_a_saved_review_gets_its_views_back_in_a_new_session(review_scene, tmp_path: Path) -> None:
    """The layout descriptions are not saved with a scene: loaded in a new session before any run, a scene
    saved during a review asked for an unknown layout (no views; vtkMRMLLayoutNode "Can't find layout").
    The module registers every review layout at startup (register_review_layouts); each plan's id is among them."""
    r = review_scene
    plan = review.review_plan(r.outputs, r.mri, r.ct)
    r.layout_node.SetViewArrangement(review.register_review_layout(r.layout_node, plan))
    r.scene.SetURL(str(tmp_path / "review.mrml"))
    assert r.scene.Commit()
    shown = {}
    for registered in (False, True):
        scene, logic = _layout_scene()
        ids = review.register_review_layouts(logic.GetLayoutNode()) if registered else []
        scene.SetURL(str(tmp_path / "review.mrml"))
        assert scene.Import()
        node = logic.GetLayoutNode()
        assert node.GetViewArrangement() == review.review_layout_id(plan)
        views = logic.GetViewNodes()
        shown[registered] = sorted(views.GetItemAsObject(i).GetLayoutName() for i in range(views.GetNumberOfItems()))
    assert shown[False] == [], "the failure this guards against: without registration the layout has no views"
    assert shown[True] == sorted(e["view"] for e in plan)
    assert len(set(ids)) == 12 and all(node.IsLayoutDescription(i) for i in ids)
    outputs = dict(r.outputs)
    for reference, ct in ((r.mri, r.ct), (None, r.ct), (None, None)):  # every plan a run can make has its id
        for drop in ((), ("uncertainty",), ("difference",), ("difference", "uncertainty")):
            kept = {k: v for k, v in outputs.items() if k not in drop}
            assert review.review_layout_id(review.review_plan(kept, reference, ct)) in ids


def test_the_review_module_is_light_enough_for_startup() -> None:
    """review.py is imported at Slicer's startup: standard library and the errors module only."""
    import ast

    tree = ast.parse(Path(review.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "") + ("." * n.level) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "errors."}, imported


def test_metrics_panel_text(run_with_mri) -> None:
    summary = mrml.summary_of(run_with_mri["outputs"])
    text = mrml.metrics_panel_text(summary)
    assert text["mae"] == f"{summary['mae']:.2f} (0..255)"
    assert text["ssim"] == f"{summary['ssim']:.4f}"
    assert text["psnr"] == f"{summary['psnr']:.2f} dB"
    assert text["device"] == "cpu"


def test_screenshot_script_renders_the_outputs(tiny_weights, tmp_path, monkeypatch) -> None:
    """Resources/Screenshots/make_screenshot.py: a real run on nodes, drawn to a PNG (VTK offscreen or PIL)."""
    import importlib.util

    from conftest import REPO

    script = REPO / "Resources" / "Screenshots" / "make_screenshot.py"
    sample = REPO / "CTtoMRISynthesis" / "Resources" / "SampleData"
    if not (sample / "ct.nrrd").exists():
        pytest.skip("the shipped sample case is not in this checkout")
    spec = importlib.util.spec_from_file_location("make_screenshot", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(slicer, "mrmlScene", getattr(slicer, "mrmlScene", None), raising=False)  # the script sets its own
    from PIL import Image

    out = tmp_path / "shot.png"
    assert module.main(["--weights", str(tiny_weights), "--device", "cpu", "--out", str(out)]) == 0
    with Image.open(out) as picture:
        assert picture.size == (3 * module.PANEL, module.PANEL + module.CAPTION_H)
        pixels = np.asarray(picture.convert("RGB"))
    panels = [pixels[: module.PANEL, i * module.PANEL:(i + 1) * module.PANEL] for i in range(3)]
    assert all(p.std() > 5 for p in panels), "each panel shows an image"
    assert panels[2][..., 0].max() > 150 or panels[2][..., 2].max() > 150, "difference panel is in colour"
    # the no-OpenGL fallback draws the same layout
    rgb = np.zeros((40, 30, 3), np.uint8)
    rgb[10:30, 5:25] = 200
    module.render_pil([rgb] * 3, ["a", "b", "c"], "caption", [1.0] * 3, tmp_path / "pil.png")
    with Image.open(tmp_path / "pil.png") as picture:
        assert picture.size == (3 * module.PANEL, module.PANEL + module.CAPTION_H)


def test_metrics_panel_shows_warnings() -> None:
    text = mrml.metrics_panel_text({"mae": 1.0, "warnings": ["the CT looks like an MRI", "fell back to CPU"]})
    assert text["warnings"] == "Warning: the CT looks like an MRI\nWarning: fell back to CPU"
    assert mrml.metrics_panel_text({"mae": 1.0})["warnings"] == ""


# ------------------------------------------------------------------------------------------------
# the panel's default CT


def test_default_ct_skips_label_maps_the_mri_outputs_and_hidden_nodes(scene) -> None:
    ct_array, mri_array = case_arrays()
    assert mrml.default_ct_node(scene) is None
    label = slicer.util.addVolumeFromArray((ct_array > 100).astype(np.uint8), name="brain mask",
                                           nodeClassName="vtkMRMLLabelMapVolumeNode")
    assert label.IsA("vtkMRMLScalarVolumeNode"), "why GetFirstNodeByClass returned label maps"
    assert scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode") is label
    assert mrml.default_ct_node(scene) is None
    mri = slicer.util.addVolumeFromArray(mri_array, name="MR16")
    hidden = slicer.util.addVolumeFromArray(ct_array, name="hidden")
    hidden.SetHideFromEditors(True)
    output = mrml.add_volume_node(scene, sitk.GetImageFromArray(mri_array), "CT16 synthetic MRI", "synthetic_mri")
    ct = slicer.util.addVolumeFromArray(ct_array, name="CT16")
    assert mrml.default_ct_node(scene) is mri, "the first selectable scalar volume"
    assert mrml.default_ct_node(scene, exclude=[mri]) is ct, "not the node chosen as MRI"
    assert mrml.default_ct_node(scene, exclude=[None, mri, ct]) is None
    assert output.GetAttribute(mrml.ROLE_ATTRIBUTE) == "synthetic_mri"


# ------------------------------------------------------------------------------------------------
# the uncertainty map (issue 11): a result whose `uncertainty` is set


@pytest.fixture(scope="module")
def result_with_uncertainty(case_files, tiny_weights):
    """A real run's result: the pipeline's own uncertainty map (the tiny model's scale and flip disagreement) and
    its mean in the head as metrics.json's ``uncertainty_mean``. (A stand-in map made here when the pipeline had
    none would hide a pipeline that stopped making one.)"""
    from CTtoMRISynthesisLib.pipeline import synthesize

    ct, mri = (sitk.ReadImage(str(path)) for path in case_files)
    result = synthesize(ct, mri, weights=tiny_weights, device="cpu", registration="none")
    assert result.uncertainty is not None and result.uncertainty_mean > 0
    return result


def _luminance(rgb) -> float:
    return 0.30 * rgb[0] + 0.59 * rgb[1] + 0.11 * rgb[2]  # the weights cubehelix is built on


def _check_uncertainty_node(scene, outputs, result, base: str) -> None:
    node = outputs["uncertainty"]
    assert node.GetName() == f"{base} uncertainty" and node.GetAttribute(mrml.ROLE_ATTRIBUTE) == "uncertainty"
    assert scene.IsNodePresent(node)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(result.uncertainty))
    np.testing.assert_allclose(node_matrix(node), node_matrix(outputs["synthetic_mri"]), atol=1e-9)
    colours = node.GetDisplayNode().GetColorNode()
    assert colours.GetName() == mrml.UNCERTAINTY_COLOR_NAME and colours.GetNumberOfColors() == 256
    assert colours.GetAttribute(mrml.ROLE_ATTRIBUTE) == "uncertainty colormap"
    table = [colours.GetLookupTable().GetTableValue(i)[:3] for i in range(256)]
    assert table[0] == (0.0, 0.0, 0.0), "black where there is no spread (and outside the head)"
    lum = [_luminance(c) for c in table]
    assert all(b >= a - 1e-3 for a, b in zip(lum, lum[1:])) and lum[-1] > 0.95, "sequential: brightness rises"
    display = node.GetDisplayNode()
    top = mrml.uncertainty_window(result.uncertainty)
    assert not display.GetAutoWindowLevel() and display.GetWindow() == pytest.approx(top)
    assert display.GetLevel() == pytest.approx(top / 2)
    summary = mrml.summary_of(outputs)
    assert summary["uncertainty_mean"] == pytest.approx(result.summary()["uncertainty_mean"])
    assert mrml.metrics_panel_text(summary)["uncertainty"] == f"{summary['uncertainty_mean']:.2f} (0..255)"
    volume_row = mrml.table_rows(outputs["table"])[0]
    assert volume_row["Scope"] == "volume" and volume_row["Uncertainty mean"] == pytest.approx(summary["uncertainty_mean"])
    sh = slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)
    folder = sh.GetItemParent(sh.GetItemByDataNode(outputs["synthetic_mri"]))
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == folder and sh.GetItemName(folder) == f"{base} synthesis"


def test_uncertainty_node_is_added_coloured_and_removed_with_the_outputs(scene, case_files, result_with_uncertainty,
                                                                         tiny_weights) -> None:
    ct_node, mri_node = load_node(case_files[0], "CT16"), load_node(case_files[1], "MR16")
    before = scene_state(scene)  # the node path runs for real: its result must be the file path's
    outputs = mrml.run_on_nodes(scene, ct_node, mri_node, weights=tiny_weights, device="cpu", registration="none")
    assert set(outputs) == {"ct_registered", "synthetic_mri", "difference", "uncertainty", "transform", "table"}
    _check_uncertainty_node(scene, outputs, result_with_uncertainty, "CT16")
    colour_id = outputs["uncertainty"].GetDisplayNode().GetColorNodeID()

    again = mrml.run_on_nodes(scene, ct_node, mri_node, weights=tiny_weights, device="cpu", registration="none")
    assert again["uncertainty"].GetDisplayNode().GetColorNodeID() == colour_id, "the colour table is made once"
    mrml.remove_outputs(scene, again)
    mrml.remove_outputs(scene, outputs)
    assert all(node.GetScene() is None for node in outputs.values())
    colour = scene.GetNodeByID(colour_id)
    assert colour is not None, "the shared colour table stays"
    left = [state for state in scene_state(scene) if state not in before]
    assert {cls for _, cls, _ in left} == {"vtkMRMLColorTableNode"}, left


def test_uncertainty_from_the_worker_folder(scene, case_files, result_with_uncertainty, tmp_path) -> None:
    """What the panel loads: save_outputs writes uncertainty.nrrd, add_outputs_from_folder adds the same node."""
    from CTtoMRISynthesisLib.outputs import OUTPUT_FILES, save_outputs

    save_outputs(result_with_uncertainty, tmp_path / "out")
    assert (tmp_path / "out" / OUTPUT_FILES["uncertainty"]).is_file()
    ct_node = load_node(case_files[0], "CT16")
    outputs = mrml.add_outputs_from_folder(scene, tmp_path / "out", "CT16", ct_node)
    _check_uncertainty_node(scene, outputs, result_with_uncertainty, "CT16")
    n_before = scene.GetNumberOfNodes()
    mrml.remove_outputs(scene, outputs)
    assert outputs["uncertainty"].GetScene() is None and scene.GetNumberOfNodes() < n_before
    plan = review.review_plan(outputs, None, ct_node)
    assert [e["role"] for e in plan] == ["ct", "synthetic", "difference", "uncertainty"]
