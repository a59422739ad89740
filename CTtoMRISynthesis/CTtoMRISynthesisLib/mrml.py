"""MRML nodes in, MRML nodes out: the node-level side of the synthesis (the only file importing ``slicer``).

It needs only MRML classes and ``slicer.util`` array helpers (what the ``slicer-core`` wheel provides):
no ``slicer.app``, no Qt. Everything image-scientific goes through :func:`pipeline.synthesize`.

Geometry conventions (checked numerically in ``Testing/test_mrml.py``):

- Slicer volume nodes are RAS, SimpleITK images are LPS. With ``F = diag(-1, -1, 1, 1)``::

      IJKToRAS = F @ [[Direction @ diag(Spacing), Origin], [0, 0, 0, 1]]

  ``arrayFromVolume`` and ``sitk.GetArrayFromImage`` are both (k, j, i), so voxels are copied as they are;
  any direction (flipped, permuted, oblique, left-handed) is kept exactly, nothing is resampled.
- A volume under a *linear* parent transform is read in world coordinates (as Slicer shows it): its
  IJKToRAS is composed with the parent's ToWorld matrix. A non-linear parent transform is refused.
- The registration transform from the pipeline maps MRI points to CT points (ITK "resampling"
  convention, LPS). The transform node stores exactly that in RAS as its *FromParent* matrix,
  ``F @ A @ F``, so its *ToParent* matrix moves the CT onto the MRI: applied as the parent of the
  (untransformed) CT node, the CT lines up with the MRI. Saved from Slicer as .tfm, it is the same
  transform as the CLI's ``transform.tfm``.

Outputs are new nodes only, added after the synthesis succeeded; if adding them fails, the ones
already added are removed again, so the scene is left as it was. Input nodes are only read. The outputs
are filed in a subject-hierarchy folder beside the CT; a bare MRML scene without a subject-hierarchy node
(Slicer itself always has one) gets one on the first successful run.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import SimpleITK as sitk

from .errors import CTMRIError
from .volumes import as_scalar_3d

#: RAS ↔ LPS (its own inverse).
FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Attribute marking nodes this module made (value: the role), and the one holding metrics.json's content.
ROLE_ATTRIBUTE = "CTtoMRISynthesis.role"
SUMMARY_ATTRIBUTE = "CTtoMRISynthesis.summary"
#: node reference roles, on a run's synthetic MRI, to the CT and the reference MRI it was made from (MRML references:
#: kept in saved scenes, renumbered with the nodes); INPUTS_ATTRIBUTE says they were recorded (no MRI: no reference)
INPUT_CT_ROLE, INPUT_MRI_ROLE, INPUTS_ATTRIBUTE = "CTtoMRISynthesisInputCT", "CTtoMRISynthesisInputMRI", "CTtoMRISynthesis.inputs"
DIFFERENCE_COLOR_NAME = "CTtoMRISynthesis difference (blue-black-red)"
UNCERTAINTY_COLOR_NAME = "CTtoMRISynthesis uncertainty (cubehelix)"

OUTPUT_KEYS = ("ct_registered", "synthetic_mri", "difference", "uncertainty", "transform", "table")

# Table columns: (title, metrics.json key, unit, description)
TABLE_COLUMNS = (
    ("MAE", "mae", "0..255", "mean absolute error over foreground voxels (reference MRI > 0, or its head when its background is noise)"),
    ("SSIM", "ssim", "", "structural similarity (Wang 2004, Gaussian sigma 1.5), whole slice"),
    ("SSIM foreground", "ssim_foreground", "", "SSIM map averaged over foreground voxels"),
    ("PSNR", "psnr", "dB", "peak signal-to-noise ratio, data range 255 (volume only)"),
    ("MAE whole", "mae_whole", "0..255", "mean absolute error over all voxels"),
)
# Columns added only when metrics.json has the value (a model that estimates its own spread).
OPTIONAL_TABLE_COLUMNS = (
    ("Uncertainty mean", "uncertainty_mean", "0..255", "mean per-voxel spread of the prediction inside the head"),
)


def _slicer():
    import slicer

    return slicer


def _scene(scene=None):
    if scene is not None:
        return scene
    scene = getattr(_slicer(), "mrmlScene", None)
    if scene is None:
        raise CTMRIError("no MRML scene: pass one, or set slicer.mrmlScene")
    return scene


def _vtk_matrix(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _np_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Geometry: SimpleITK image (LPS) <-> IJKToRAS matrix


def ijk_to_ras_of_image(image: sitk.Image) -> np.ndarray:
    """The 4×4 IJKToRAS matrix of a 3D SimpleITK image."""
    if image.GetDimension() != 3:
        raise CTMRIError(f"expected a 3D image, got {image.GetDimension()}D")
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction @ np.diag(np.array(image.GetSpacing(), dtype=np.float64))
    ijk_to_lps[:3, 3] = image.GetOrigin()
    return FLIP @ ijk_to_lps


def geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray, what: str = "volume") -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) in SimpleITK's LPS convention from an IJKToRAS matrix.

    Refuses matrices whose axes are not orthogonal (sheared, e.g. by a non-rigid parent transform)
    or have zero length: a SimpleITK image cannot represent them.
    """
    m = FLIP @ np.asarray(ijk_to_ras, dtype=np.float64)
    columns = m[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if not np.all(np.isfinite(m)) or np.any(spacing <= 0):
        raise CTMRIError(f"the {what} has an invalid voxel-to-world matrix (zero or non-finite spacing)")
    direction = columns / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise CTMRIError(
            f"the {what}'s voxel axes are not orthogonal (sheared by its transform); harden the transform "
            "and resample the volume (Transforms module) first"
        )
    return tuple(float(v) for v in spacing), tuple(float(v) for v in m[:3, 3]), tuple(float(v) for v in direction.ravel())


def ijk_to_world_of_node(node) -> np.ndarray:
    """IJKToRAS of a volume node in world coordinates (including a linear parent transform)."""
    import vtk

    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    matrix = _np_matrix(ijk_to_ras)
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise CTMRIError(
                f"volume '{node.GetName()}' is under a non-linear transform ('{parent.GetName()}'); harden "
                "the transform (Transforms module) or remove it first"
            )
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        matrix = _np_matrix(to_world) @ matrix
    return matrix


def node_geometry(node, what: str = "volume") -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) of a volume node in world coordinates, LPS (SimpleITK's convention).

    Without a parent transform the node's own spacing, origin and directions are used as stored, so
    they come back bit for bit as the file reader set them (no rounding through a matrix and its
    column norms: results of a registration can depend on the last bit). Under a linear parent
    transform the world IJKToRAS matrix is decomposed instead.
    """
    import vtk

    if node.GetParentTransformNode() is not None:
        return geometry_from_ijk_to_ras(ijk_to_world_of_node(node), what)
    directions = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(directions)
    direction = FLIP[:3, :3] @ _np_matrix(directions)[:3, :3]
    spacing = np.array(node.GetSpacing(), dtype=np.float64)
    origin = np.array(node.GetOrigin(), dtype=np.float64) * np.array([-1.0, -1.0, 1.0])
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0) and np.all(np.isfinite(origin))):
        raise CTMRIError(f"the {what} has an invalid geometry (spacing {tuple(spacing)}, origin {tuple(origin)})")
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise CTMRIError(f"the {what} has non-orthogonal voxel axes; resample it (Resample Scalar Volume) first")
    return tuple(float(v) for v in spacing), tuple(float(v) for v in origin), tuple(float(v) for v in direction.ravel())


# --------------------------------------------------------------------------------------------------
# Volume node -> SimpleITK image


def _is_colour_node(node) -> bool:
    """A plain vector volume node: how Slicer loads an RGB(A) file such as a PNG screenshot of a grey CT."""
    return node.GetClassName() == "vtkMRMLVectorVolumeNode"


def _check_volume_node(node, what: str) -> None:
    slicer = _slicer()
    if node is None:
        raise CTMRIError(f"no {what} volume selected; choose a volume")
    if not node.IsA("vtkMRMLVolumeNode"):
        raise CTMRIError(f"'{node.GetName()}' ({node.GetClassName()}) is not a volume; choose a {what} volume")
    name = node.GetName()
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise CTMRIError(
            f"'{name}' is a label map (segment labels, not intensities); choose the {what} image itself"
        )
    colour = _is_colour_node(node)
    if not node.IsA("vtkMRMLScalarVolumeNode") or (node.IsA("vtkMRMLTensorVolumeNode") and not colour):
        raise CTMRIError(
            f"'{name}' is a {node.GetClassName()} (vector or tensor image); give a single-channel grayscale {what}"
        )
    image_data = node.GetImageData()
    if image_data is None:
        raise CTMRIError(f"'{name}' has no voxels (an empty volume node); load the {what} image into it")
    dims = image_data.GetDimensions()
    if min(dims) < 1 or image_data.GetNumberOfPoints() == 0 or image_data.GetPointData().GetScalars() is None:
        raise CTMRIError(f"'{name}' has no voxels (size {tuple(dims)}); load the {what} image into it")
    components = image_data.GetNumberOfScalarComponents()
    if components not in ((3, 4) if colour else (1,)):
        raise CTMRIError(
            f"'{name}' has {components} components per voxel (colour or vector image); give a "
            f"single-channel grayscale {what}"
        )
    scene = node.GetScene()
    if scene is not None and hasattr(slicer, "vtkMRMLSequenceBrowserNode"):
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
            browser = scene.GetNthNodeByClass(i, "vtkMRMLSequenceBrowserNode")
            sequence = browser.GetSequenceNode(node) if browser.IsProxyNodeID(node.GetID()) else None
            if sequence is not None and sequence.GetNumberOfDataNodes() > 1:
                raise CTMRIError(
                    f"'{name}' shows one frame of a {sequence.GetNumberOfDataNodes()}-frame sequence (4D); "
                    f"give a single 3D {what} (e.g. clone the current frame in the Data module)"
                )


def image_from_volume_node(node, what: str = "volume") -> sitk.Image:
    """A SimpleITK copy of a scalar volume node, with its physical (world) geometry in LPS.

    Voxel values and type are copied unchanged; the node is only read. A colour (RGB/RGBA vector) node whose
    red, green and blue are equal, such as a PNG screenshot of a grey CT, gives its grey, as the same file does
    on the command line (:func:`volumes.as_scalar_3d`). Refuses (``CTMRIError``) real colour, label maps,
    other vector/tensor volumes, empty nodes, frames of 4D sequences and volumes under non-linear transforms.
    """
    slicer = _slicer()
    _check_volume_node(node, what)
    array = np.array(slicer.util.arrayFromVolume(node), copy=True)  # (k, j, i[, c]), a copy: never a view
    spacing, origin, direction = node_geometry(node, f"{what} '{node.GetName()}'")
    colour = _is_colour_node(node)
    image = sitk.GetImageFromArray(array, isVector=colour)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    # the same rule as for files: grey stored as RGB(A) is read as grey, real colour is refused
    return as_scalar_3d(image, f"{what} '{node.GetName()}'") if colour else image


# --------------------------------------------------------------------------------------------------
# SimpleITK image / transform / metrics -> new nodes


@contextlib.contextmanager
def _new_node(scene, class_name: str, name: str) -> Iterator:
    """A new node of ``class_name`` for the caller to fill, removed again (with its display and storage nodes)
    if filling it fails: it is in the scene from its creation on, so a failure while its voxels are copied
    (memory) would otherwise leave a half-made node that no caller knows of."""
    node = scene.AddNewNodeByClass(class_name, name)
    try:
        yield node
    except BaseException:
        _remove_nodes(scene, [node])
        raise


def add_volume_node(scene, image: sitk.Image, name: str, role: Optional[str] = None):
    """Add a new scalar volume node holding ``image`` (voxels copied, geometry converted to RAS); all or nothing."""
    slicer = _slicer()
    image = image if image.GetDimension() == 3 else sitk.JoinSeries(image)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CTMRIError(f"cannot make a scalar volume from a {image.GetNumberOfComponentsPerPixel()}-component image")
    with _new_node(scene, "vtkMRMLScalarVolumeNode", name) as node:
        # spacing, origin and directions set one by one (as Slicer's readers do): exact, no matrix round trip
        directions = np.eye(4)
        directions[:3, :3] = FLIP[:3, :3] @ np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        node.SetIJKToRASDirectionMatrix(_vtk_matrix(directions))
        node.SetSpacing(*image.GetSpacing())
        origin = image.GetOrigin()
        node.SetOrigin(-origin[0], -origin[1], origin[2])
        slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
        node.CreateDefaultDisplayNodes()
        if role:
            node.SetAttribute(ROLE_ATTRIBUTE, role)
    return node


def affine_of_transform(transform: sitk.Transform) -> np.ndarray:
    """The 4×4 LPS matrix of a 3D affine SimpleITK transform (of any class, composites included).

    Found by mapping the origin and the unit points, then checked on other points; a transform that
    is not affine (e.g. a displacement field) raises ``CTMRIError``.
    """
    if transform.GetDimension() != 3:
        raise CTMRIError(f"expected a 3D transform, got {transform.GetDimension()}D")
    t = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    a = np.column_stack([np.array(transform.TransformPoint(tuple(e))) - t for e in np.eye(3)])
    probes = np.array([[100.0, -50.0, 30.0], [-120.0, 80.0, -60.0], [7.0, 13.0, 200.0]])
    for p in probes:
        if not np.allclose(transform.TransformPoint(tuple(p)), a @ p + t, atol=1e-4 * (1 + np.abs(p).max())):
            raise CTMRIError("the registration transform is not linear; only rigid/similarity/affine transforms become a transform node")
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = a, t
    return matrix


def ras_matrix_of_transform(transform: sitk.Transform) -> np.ndarray:
    """The ITK transform (LPS, MRI point → CT point) as a 4×4 RAS matrix (still MRI point → CT point)."""
    return FLIP @ affine_of_transform(transform) @ FLIP


def add_transform_node(scene, transform: sitk.Transform, name: str):
    """A new linear transform node whose ToParent matrix moves the CT onto the MRI.

    ``transform`` maps MRI points to CT points (ITK, LPS); it is stored as the node's FromParent
    matrix in RAS, the convention Slicer uses for ITK transforms it reads from files.
    """
    matrix = ras_matrix_of_transform(transform)
    with _new_node(scene, "vtkMRMLLinearTransformNode", name) as node:
        node.SetMatrixTransformFromParent(_vtk_matrix(matrix))
        node.SetAttribute(ROLE_ATTRIBUTE, "transform")
    return node


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def add_metrics_table(scene, summary: dict, name: str):
    """A new table node: one row for the whole volume, then one row per axial slice.

    Columns: Scope ("volume" / "slice"), Slice (index in canonical axial order, inferior → superior, a number;
    empty (NaN) for the volume row), Foreground voxels, then MAE, SSIM, SSIM foreground, PSNR, MAE whole
    (NaN where a value does not exist: slices without foreground, PSNR per slice), and Uncertainty mean
    when metrics.json has ``uncertainty_mean``. The node's ``CTtoMRISynthesis.summary`` attribute holds the
    whole metrics.json content.
    """
    import vtk

    columns = TABLE_COLUMNS + tuple(c for c in OPTIONAL_TABLE_COLUMNS if summary.get(c[1]) is not None)
    per_slice = summary.get("per_slice") or []
    rows = [("volume", None, summary.get("foreground_voxels"), {k: summary.get(k) for _, k, _, _ in columns})]
    for entry in per_slice:
        values = {k: entry.get(k) for _, k, _, _ in columns}
        rows.append(("slice", entry["index"], entry.get("foreground_voxels"), values))

    table = vtk.vtkTable()
    scope = vtk.vtkStringArray()
    scope.SetName("Scope")
    index = vtk.vtkDoubleArray()  # numeric (a text column sorted "10" before "2" and could not be plotted); NaN: none
    index.SetName("Slice")
    voxels = vtk.vtkIntArray()
    voxels.SetName("Foreground voxels")
    numeric = []
    for title, _, _, _ in columns:
        column = vtk.vtkDoubleArray()
        column.SetName(title)
        numeric.append(column)
    for row_scope, row_index, row_voxels, values in rows:
        scope.InsertNextValue(row_scope)
        index.InsertNextValue(_nan(row_index))
        voxels.InsertNextValue(int(row_voxels or 0))
        for column, (_, key, _, _) in zip(numeric, columns):
            column.InsertNextValue(_nan(values[key]))
    for column in (scope, index, voxels, *numeric):
        table.AddColumn(column)

    summary_json = json.dumps(summary)
    with _new_node(scene, "vtkMRMLTableNode", name) as node:
        node.SetAndObserveTable(table)
        node.SetUseColumnTitleAsColumnHeader(True)
        node.SetColumnDescription("Slice", "axial slice index in canonical (LPS) order, inferior to superior")
        node.SetColumnDescription("Foreground voxels", "voxels where the reference MRI > 0 (its head when its background is noise)")
        for title, _, unit, description in columns:
            node.SetColumnDescription(title, description)
            if unit:
                node.SetColumnUnitLabel(title, unit)
        node.SetLocked(True)
        node.SetAttribute(ROLE_ATTRIBUTE, "metrics")
        node.SetAttribute(SUMMARY_ATTRIBUTE, summary_json)
    return node


def table_rows(table_node) -> list[dict]:
    """The rows of a metrics table node as dicts (column title → value; NaN → None)."""
    table = table_node.GetTable()
    out = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c in range(table.GetNumberOfColumns()):
            column = table.GetColumn(c)
            value = column.GetValue(r)
            if isinstance(value, float) and value != value:
                value = None
            row[column.GetName()] = value
        out.append(row)
    return out


def _colour_table(scene, created: list, role: str, name: str, colours) -> "object":
    """Our 256-entry colour table of ``role``: reused if the scene has it, else made once from
    ``colours(i) -> (label, r, g, b)`` and appended to ``created`` (so a failed run can remove it)."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
        if node.GetAttribute(ROLE_ATTRIBUTE) == role:
            return node
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    created.append(node)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    for i in range(256):
        label, r, g, b = colours(i)
        node.SetColor(i, label, float(r), float(g), float(b), 1.0)
    return node


def _add_map_node(scene, created: list, image: sitk.Image, name: str, role: str, colormap_of, window: float,
                  level: float):
    """A volume node for a derived map (difference, uncertainty), shown with the colour table that
    ``colormap_of(scene, created)`` finds or makes, at ``window``/``level``."""
    node = add_volume_node(scene, image, name, role)
    created.append(node)
    colormap = colormap_of(scene, created)
    if node.GetDisplayNode() is not None:
        node.GetDisplayNode().SetAndObserveColorNodeID(colormap.GetID())
        _set_window(node, window, level)
    return node


def _difference_colormap(scene, created: list):
    """The diverging colour table for difference maps: reuse ours if the scene has it, else make it.

    Blue (negative: synthetic brighter than the MRI) → black (0) → red (positive: synthetic darker),
    256 entries. Black at zero keeps the background (both images 0) dark like the slice views.
    """
    blue, red = np.array([0.25, 0.55, 1.0]), np.array([1.0, 0.3, 0.2])

    def colour(i: int):
        x = (i - 127.5) / 127.5  # -1 .. 1
        rgb = (blue if x < 0 else red) * abs(x) ** 0.8
        return (f"{x * 100:+.0f}%", *rgb)

    return _colour_table(scene, created, "difference colormap", DIFFERENCE_COLOR_NAME, colour)


def cubehelix(fraction: float, start: float = 0.5, rotations: float = -1.5, hue: float = 1.2) -> tuple:
    """Colour of D. A. Green's cubehelix scheme (2011) at ``fraction`` 0..1: brightness rises monotonically
    from black to white while the hue turns, so the map reads as an ordered quantity, also in grey print."""
    angle = 2.0 * np.pi * (start / 3.0 + 1.0 + rotations * fraction)
    amplitude = hue * fraction * (1.0 - fraction) / 2.0
    cos, sin = np.cos(angle), np.sin(angle)
    rgb = (
        fraction + amplitude * (-0.14861 * cos + 1.78277 * sin),
        fraction + amplitude * (-0.29227 * cos - 0.90649 * sin),
        fraction + amplitude * (1.97294 * cos),
    )
    return tuple(float(min(max(c, 0.0), 1.0)) for c in rgb)


def _uncertainty_colormap(scene, created: list):
    """The sequential colour table for uncertainty maps: reuse ours if the scene has it, else make it once.

    Black at 0 (no spread, and everywhere outside the head) rising to white at the window's top.
    """
    return _colour_table(scene, created, "uncertainty colormap", UNCERTAINTY_COLOR_NAME,
                         lambda i: (f"{i / 2.55:.0f}%", *cubehelix(i / 255.0)))


def uncertainty_window(uncertainty: sitk.Image) -> float:
    """Top of the uncertainty display window: the 99.5th percentile of the values > 0 (at least 1)."""
    values = sitk.GetArrayViewFromImage(uncertainty)
    values = values[values > 0]
    if values.size == 0:
        return 1.0
    return float(max(1.0, np.ceil(np.percentile(values, 99.5))))


def difference_window(difference: sitk.Image) -> float:
    """Half-width of a display window symmetric around 0 (99.5th percentile of |difference| ≠ 0, ≥ 1)."""
    values = np.abs(sitk.GetArrayViewFromImage(difference))
    values = values[values > 0]
    if values.size == 0:
        return 1.0
    return float(max(1.0, np.ceil(np.percentile(values, 99.5))))


def _set_window(node, window: float, level: float) -> None:
    display = node.GetDisplayNode()
    if display is not None:
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(float(window), float(level))


def add_result_nodes(
    scene,
    *,
    synthetic_mri: sitk.Image,
    summary: dict,
    base_name: str,
    ct_registered: Optional[sitk.Image] = None,
    difference: Optional[sitk.Image] = None,
    uncertainty: Optional[sitk.Image] = None,
    transform: Optional[sitk.Transform] = None,
    ct_node=None,
    mri_node=None,
) -> dict:
    """Add the output nodes of one synthesis; all or nothing.

    Returns ``{"synthetic_mri": node, and where available "ct_registered", "difference", "uncertainty",
    "transform", "table"}``. The uncertainty node gets its own sequential colour table (made once per scene,
    like the difference map's diverging one). On any error every node added here is removed again and the error is raised.
    ``ct_node`` (the input CT, only read) gives the registered CT its window/level, and the outputs are
    gathered in a subject-hierarchy folder "<base_name> synthesis" beside it (in its patient/study),
    so they show up with the patient in the Data module. Names already taken (an earlier run) get " (k)"
    after them, the same k for the whole run (:func:`_run_names`). The synthetic MRI refers to ``ct_node`` and
    ``mri_node`` (:func:`run_inputs`), so that its review can be shown again whatever the panel selects later.
    """
    scene = _scene(scene)
    base_name = output_base_name(base_name, ct_node)
    ct_display = ct_node.GetDisplayNode() if ct_node is not None and hasattr(ct_node, "GetDisplayNode") else None
    created: list = []
    outputs: dict = {}
    summary_json = json.dumps(summary)
    name = _run_names(scene, base_name, ct_node)
    try:
        if ct_registered is not None:
            node = add_volume_node(scene, ct_registered, name("registered"), "ct_registered")
            created.append(node)
            outputs["ct_registered"] = node
            if ct_display is not None and node.GetDisplayNode() is not None and not ct_display.GetAutoWindowLevel():
                _set_window(node, ct_display.GetWindow(), ct_display.GetLevel())
        node = add_volume_node(scene, synthetic_mri, name("synthetic MRI"), "synthetic_mri")
        created.append(node)
        outputs["synthetic_mri"] = node
        node.SetAttribute(SUMMARY_ATTRIBUTE, summary_json)
        _refer_to_inputs(scene, node, ct_node, mri_node)
        _set_window(node, 255.0, 127.5)  # the model's 0..255 scale
        if difference is not None:
            half = difference_window(difference)
            outputs["difference"] = _add_map_node(scene, created, difference, name("difference"), "difference",
                                                  _difference_colormap, 2.0 * half, 0.0)
        if uncertainty is not None:
            top = uncertainty_window(uncertainty)  # 0 (black) .. top (white)
            outputs["uncertainty"] = _add_map_node(scene, created, uncertainty, name("uncertainty"), "uncertainty",
                                                   _uncertainty_colormap, top, top / 2.0)
        if transform is not None:
            node = add_transform_node(scene, transform, name("registration"))
            created.append(node)
            outputs["transform"] = node
        if summary.get("mae") is not None or summary.get("per_slice"):
            node = add_metrics_table(scene, summary, name("synthesis metrics"))
            created.append(node)
            outputs["table"] = node
        _gather_in_folder(scene, list(outputs.values()), name("synthesis"), ct_node)  # not the shared colours
    except BaseException:
        _remove_nodes(scene, created)
        raise
    return outputs


def _refer_to_inputs(scene, synthetic, ct_node, mri_node) -> None:
    for role, node in ((INPUT_CT_ROLE, ct_node), (INPUT_MRI_ROLE, mri_node)):
        if node is not None and node.GetScene() is scene:
            synthetic.SetNodeReferenceID(role, node.GetID())
    synthetic.SetAttribute(INPUTS_ATTRIBUTE, "CT and MRI" if mri_node is not None else "CT")


def run_inputs(synthetic) -> Optional[tuple]:
    """(CT node, reference MRI node or None) a synthetic MRI node was made from, or None when it does not say (a
    node of an older version): the review of a result shows its own inputs, not what the panel selects now."""
    if synthetic is None or not synthetic.GetAttribute(INPUTS_ATTRIBUTE):
        return None
    return synthetic.GetNodeReference(INPUT_CT_ROLE), synthetic.GetNodeReference(INPUT_MRI_ROLE)


def output_base_name(base_name: Optional[str], ct_node=None) -> str:
    """What a run's outputs are named after: ``base_name``, else the CT node's name, else "CT" (a CT node
    without a name, or one of spaces only, would give names like " synthetic MRI")."""
    for candidate in (base_name, ct_node.GetName() if ct_node is not None else None):
        if candidate and candidate.strip():
            return candidate
    return "CT"


#: What each output of a run is called after "<base_name> " (the folder is "synthesis").
_OUTPUT_LABELS = ("registered", "synthetic MRI", "difference", "uncertainty", "registration", "synthesis metrics")


def _run_names(scene, base_name: str, ct_node=None) -> Callable[[str], str]:
    """Names for one run's outputs: "<base_name> <label>", or "<base_name> <label> (k)" with the smallest k ≥ 2
    that no node (nor an outputs folder beside the CT) already has, the same k for every output of the run.

    A second run on the same CT then gets "CT synthetic MRI (2)" instead of a second "CT synthetic MRI", which
    ``getNode`` could not tell from the first.
    """
    sh = _existing_hierarchy(scene)
    parent = sh.GetSceneItemID() if sh is not None else 0
    if sh is not None and ct_node is not None and ct_node.GetScene() is scene and sh.GetItemByDataNode(ct_node):
        parent = sh.GetItemParent(sh.GetItemByDataNode(ct_node))

    def taken(tag: str) -> bool:
        if any(scene.GetFirstNodeByName(f"{base_name} {label}{tag}") is not None for label in _OUTPUT_LABELS):
            return True
        return bool(sh is not None and sh.GetItemChildWithName(parent, f"{base_name} synthesis{tag}"))

    k = 1
    while taken("" if k == 1 else f" ({k})"):
        k += 1
    tag = "" if k == 1 else f" ({k})"
    return lambda label: f"{base_name} {label}{tag}"


def _existing_hierarchy(scene):
    """The scene's subject-hierarchy node, or None (unlike Slicer's getter, this never creates one)."""
    return scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode")


def _gather_in_folder(scene, nodes, folder_name: str, ct_node=None) -> int:
    """Put ``nodes`` in a new subject-hierarchy folder under ``ct_node``'s parent item; return the folder id.

    Slicer's subject-hierarchy logic files new nodes at the scene level by itself; plain MRML (slicer-core)
    does not, so an item is created for a node that has none.
    """
    sh = _slicer().vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)
    if sh is None:
        return 0
    parent = sh.GetSceneItemID()
    if ct_node is not None and ct_node.GetScene() is scene:
        ct_item = sh.GetItemByDataNode(ct_node)
        if ct_item:
            parent = sh.GetItemParent(ct_item)
    folder = sh.CreateFolderItem(parent, folder_name)
    try:
        for node in nodes:
            item = sh.GetItemByDataNode(node)
            if item:
                sh.SetItemParent(item, folder)
            else:
                sh.CreateItem(folder, node)
    except BaseException:
        sh.RemoveItem(folder, False, False)
        raise
    return folder


def _remove_empty_folders(scene, folders) -> None:
    sh = _existing_hierarchy(scene)
    if sh is None:
        return
    for folder in folders:
        if folder and sh.GetItemDataNode(folder) is None and sh.GetNumberOfItemChildren(folder) == 0:
            sh.RemoveItem(folder, False, False)


def _remove_nodes(scene, nodes) -> None:
    sh = _existing_hierarchy(scene)
    for node in reversed(nodes):
        if node is None or node.GetScene() is None:
            continue
        item = sh.GetItemByDataNode(node) if sh is not None else 0
        if item:  # Slicer's subject-hierarchy logic would drop it with the node; plain MRML does not
            sh.RemoveItem(item, False, False)
        if node.IsA("vtkMRMLDisplayableNode"):
            for i in reversed(range(node.GetNumberOfDisplayNodes())):
                display = node.GetNthDisplayNode(i)
                if display is not None and display.GetScene() is not None:
                    scene.RemoveNode(display)
        if node.IsA("vtkMRMLStorableNode"):
            storage = node.GetStorageNode()
            if storage is not None and storage.GetScene() is not None:
                scene.RemoveNode(storage)
        scene.RemoveNode(node)


def remove_outputs(scene, outputs: dict) -> None:
    """Remove the nodes of a previous result (e.g. before re-running) and their emptied folder; the colour
    table stays."""
    scene = _scene(scene)
    nodes = [n for k, n in outputs.items() if k in OUTPUT_KEYS or k == "synthetic_mri"]
    sh = _existing_hierarchy(scene)
    folders = set()
    if sh is not None:
        for node in nodes:
            item = sh.GetItemByDataNode(node) if node is not None else 0
            if item:
                folders.add(sh.GetItemParent(item))
        folders.discard(sh.GetSceneItemID())
    _remove_nodes(scene, nodes)
    _remove_empty_folders(scene, folders)


# --------------------------------------------------------------------------------------------------
# The node-level synthesis


def run_on_nodes(
    scene,
    ct_node,
    mri_node=None,
    *,
    weights=None,
    model=None,
    device: str = "auto",
    registration: str = "rigid",
    allow_disjoint: bool = False,
    batch_size: Optional[int] = None,
    progress: Optional[Callable[[float, str], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
    base_name: Optional[str] = None,
) -> dict:
    """Synthesise an MRI from a CT volume node (and evaluate against an MRI node); add the outputs.

    Runs :func:`pipeline.synthesize` (the same path as ``ctmri synthesize``) on copies of the
    nodes' voxels in world coordinates, then adds NEW nodes only if everything succeeded:
    "<CT> registered" and "<CT> difference" (with a reference MRI), "<CT> synthetic MRI",
    "<CT> uncertainty" (when the model estimates its spread), "<CT> registration" (linear transform; its
    ToParent moves the CT onto the MRI) and the table "<CT> synthesis metrics". Inputs are never modified.
    On an error or a cancel (``cancel()`` returning True) it raises ``CTMRIError`` / ``CancelledError`` and
    the scene is as it was.

    Returns ``{"synthetic_mri": node, "ct_registered": node, "difference": node, "transform": node,
    "table": node}`` (the last four only with an MRI), plus "uncertainty" when the result has one. The
    synthetic MRI node's ``CTtoMRISynthesis.summary`` attribute holds the content of metrics.json (device,
    time, metrics).
    """
    from .pipeline import synthesize

    scene = _scene(scene)
    check_picture_spacing(ct_node, mri_node, registration)
    ct = image_from_volume_node(ct_node, "CT")
    mri = image_from_volume_node(mri_node, "MRI") if mri_node is not None else None
    result = synthesize(
        ct, mri, weights=weights, model=model, device=device, registration=registration,
        allow_disjoint=allow_disjoint, batch_size=batch_size, progress=progress, cancel=cancel,
    )
    if cancel is not None and cancel():
        from .errors import CancelledError

        raise CancelledError()
    return add_result_nodes(
        scene,
        synthetic_mri=result.synthetic_mri,
        ct_registered=result.ct_registered,
        difference=result.difference,
        uncertainty=getattr(result, "uncertainty", None),
        transform=result.transform,
        summary=result.summary(),
        base_name=base_name,
        ct_node=ct_node,
        mri_node=mri_node,
    )


def add_outputs_from_folder(scene, folder, base_name: str, ct_node=None, mri_node=None) -> dict:
    """Add the output nodes from a folder written by ``outputs.save_outputs`` (the background worker, the CLI).

    Same nodes, names and all-or-nothing rule as :func:`run_on_nodes`.
    """
    from .outputs import OUTPUT_FILES
    from .volumes import read_volume

    folder = Path(folder)
    metrics_path = folder / OUTPUT_FILES["metrics"]
    synthetic_path = folder / OUTPUT_FILES["synthetic_mri"]
    if not metrics_path.exists() or not synthetic_path.exists():
        raise CTMRIError(f"no complete synthesis result in {folder}; run the synthesis again")
    summary = json.loads(metrics_path.read_text())

    def optional_volume(kind):
        path = folder / OUTPUT_FILES[kind]
        return read_volume(path, kind) if path.exists() else None

    transform_path = folder / OUTPUT_FILES["transform"]
    transform = sitk.ReadTransform(str(transform_path)) if transform_path.exists() else None
    return add_result_nodes(
        scene,
        synthetic_mri=read_volume(synthetic_path, "synthetic MRI"),
        ct_registered=optional_volume("ct_registered"),
        difference=optional_volume("difference"),
        uncertainty=optional_volume("uncertainty") if "uncertainty" in OUTPUT_FILES else None,
        transform=transform,
        summary=summary,
        base_name=base_name,
        ct_node=ct_node,
        mri_node=mri_node,
    )


def check_picture_spacing(ct_node, mri_node, registration: str) -> None:
    """Refuse to register a volume Slicer loaded from a series of 2D pictures and left at 1 mm spacing.

    Pictures (PNG, JPEG, …) record no spacing, so Slicer's reader gives such a stack 1 mm between slices and 1 mm
    in-plane (or, for a TIFF with a resolution tag, 25.4 mm / its dots per inch), and a rigid registration to a
    real MRI would then fit the wrong head size. The command line refuses a picture folder
    whose spacing was not given (``pictures.check_registration``); this is the same rule for nodes, told by the
    node's storage file. One picture (a single slice) is registered in its plane, as on the command line.
    """
    from .volumes import PICTURE_SUFFIXES

    if mri_node is None or registration == "none":
        return
    for what, node in (("CT", ct_node), ("MRI", mri_node)):
        storage = node.GetStorageNode() if node is not None else None
        file_name = storage.GetFileName() if storage is not None else None
        if not file_name or Path(file_name).suffix.lower() not in PICTURE_SUFFIXES:
            continue
        image_data = node.GetImageData()
        slices = image_data.GetDimensions()[2] if image_data is not None else 0
        if slices > 1 and _reader_spacing(node.GetSpacing()):
            raise CTMRIError(
                f"the {what} volume '{node.GetName()}' was loaded from 2D pictures ({Path(file_name).name} …), which "
                "record no spacing, so Slicer made one up (1 mm, or a TIFF's dots per inch); registering it to the MRI needs the real spacing: set it "
                "in the Volumes module (Volume Information → Image Spacing), or choose Registration: none if CT and "
                "MRI are already aligned slice by slice"
            )


def _reader_spacing(spacing) -> bool:
    """True for the spacing a picture reader makes up: 1 mm between slices, and in-plane 1 mm or 25.4 mm over a
    whole number of dots per inch (a TIFF's resolution tag), the same along rows and columns."""
    if abs(spacing[2] - 1.0) > 1e-9 or abs(spacing[0] - spacing[1]) > 1e-9 or spacing[0] <= 0:
        return False
    dpi = 25.4 / spacing[0]
    return abs(spacing[0] - 1.0) < 1e-9 or abs(dpi - round(dpi)) < 1e-6 * dpi


def write_node_for_worker(node, path, what: str) -> Path:
    """Write a volume node's voxels with world geometry to ``path`` (.nrrd), for the background worker."""
    image = image_from_volume_node(node, what)
    path = Path(path)
    try:
        sitk.WriteImage(image, str(path), False)  # uncompressed: fast, read back at once
    except RuntimeError as exc:
        raise CTMRIError(f"cannot write {path}: {str(exc).strip().splitlines()[-1]}") from exc
    return path


# --------------------------------------------------------------------------------------------------
# The panel's default input


def default_ct_node(scene, exclude=()):
    """The volume the panel preselects as CT: the first plain scalar volume in the scene, or None.

    Only nodes the CT selector can show qualify: exactly ``vtkMRMLScalarVolumeNode`` (its subclasses, label
    maps above all, are not listed there), not hidden from editors, not an output of this module, and not one
    of ``exclude`` (e.g. the node chosen as MRI).
    """
    excluded = {node.GetID() for node in exclude if node is not None}
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        if (
            node.GetClassName() == "vtkMRMLScalarVolumeNode"
            and not node.GetHideFromEditors()
            and node.GetAttribute(ROLE_ATTRIBUTE) is None
            and node.GetID() not in excluded
        ):
            return node
    return None


# --------------------------------------------------------------------------------------------------
# The metrics panel (the review's views and layouts: review.py)


def summary_of(outputs: dict) -> dict:
    """The metrics.json content stored on a result's synthetic MRI node."""
    node = outputs.get("synthetic_mri")
    text = node.GetAttribute(SUMMARY_ATTRIBUTE) if node is not None else None
    return json.loads(text) if text else {}


def metrics_panel_text(summary: dict) -> dict:
    """Text for the module's metrics panel: mae, ssim, psnr, time, device, uncertainty (mean in the head; "-"
    where unknown), and warnings (one per line; "" when there are none: e.g. a likely CT/MRI swap or a CPU fallback)."""

    def fmt(key, pattern):
        value = summary.get(key)
        return pattern.format(value) if isinstance(value, (int, float)) else "-"

    psnr = summary.get("psnr")
    if psnr is None and summary.get("mae") == 0:
        psnr_text = "∞ (identical)"
    else:
        psnr_text = fmt("psnr", "{:.2f} dB")
    return {
        "mae": fmt("mae", "{:.2f} (0..255)"),
        "ssim": fmt("ssim", "{:.4f}"),
        "psnr": psnr_text,
        "time": fmt("seconds", "{:.1f} s"),
        "device": str(summary.get("device") or "-"),
        "uncertainty": fmt("uncertainty_mean", "{:.2f} (0..255)"),
        "warnings": "\n".join(f"Warning: {w}" for w in summary.get("warnings") or []),
    }
