"""The review after a run: which volume goes into which slice view, and the layouts that show them.

MRML only (no NumPy, SimpleITK, Qt or ``slicer.app``): light enough for the module to register the layouts at
Slicer's startup (:func:`register_review_layouts`), so that a scene saved while a review was shown gets its views
back in a new session. The widget switches the layout; tested against real MRML in ``Testing/test_mrml.py``.

The review uses slice views of its own, never Red/Yellow/Green. vtkMRMLLayoutLogic applies a layout's
``action="default"`` view properties (label, colour, view group) only when it creates a view
(CreateMissingViews → ApplyProperties); Red/Yellow/Green always exist, so a layout naming them could not
label them, and whatever the review set on them (orientation, linking, volumes) would stay after it.
Views with their own singleton tags are created once, with their labels and colours, in their own view
group (linked scrolling stays among them); the user's views are not touched.
"""

from __future__ import annotations

from .errors import CTMRIError

#: role → (singleton tag / layout name, view label, view colour)
REVIEW_VIEWS = {
    "reference": ("CTMRIReference", "MRI", "#4A90D9"),
    "ct": ("CTMRIInputCT", "CT", "#9A9A9A"),
    "synthetic": ("CTMRISynthetic", "sMRI", "#E5A23C"),
    "difference": ("CTMRIDifference", "Diff", "#C94FC9"),
    "uncertainty": ("CTMRIUncertainty", "Unc", "#3CB371"),
}
#: The review views' view group (Red/Yellow/Green and the 3D view are in group 0).
REVIEW_VIEW_GROUP = 86
#: Layout ids: this base plus one bit per role shown (far from Slicer's built-in ids, which are < 1000).
REVIEW_LAYOUT_BASE = 86500
_ROLE_BITS = {role: 1 << i for i, role in enumerate(REVIEW_VIEWS)}


def review_plan(outputs: dict, reference_node=None, ct_node=None) -> list[dict]:
    """Which volume goes into which review view, left to right.

    With a reference MRI: reference MRI | synthetic MRI | difference map (| uncertainty). Without: CT |
    synthetic MRI (| uncertainty). Each entry: role, view (its singleton tag), label, background node.
    """
    entries = []
    if reference_node is not None:
        entries.append(("reference", reference_node))
    elif ct_node is not None:
        entries.append(("ct", ct_node))
    entries.append(("synthetic", outputs["synthetic_mri"]))
    for role, key in (("difference", "difference"), ("uncertainty", "uncertainty")):
        if outputs.get(key) is not None:
            entries.append((role, outputs[key]))
    return [
        {"role": role, "view": REVIEW_VIEWS[role][0], "label": REVIEW_VIEWS[role][1], "background": node}
        for role, node in entries
    ]


def review_layout_id(plan: list[dict]) -> int:
    """The layout id of a plan: one per set of roles, so each id always means the same views."""
    return REVIEW_LAYOUT_BASE + sum(_ROLE_BITS[entry["role"]] for entry in plan)


def _view_xml(role: str) -> str:
    tag, label, colour = REVIEW_VIEWS[role]
    # orientation without an action: applied when the view is made and each time the layout is shown again
    return (
        f'<item><view class="vtkMRMLSliceNode" singletontag="{tag}">'
        '<property name="orientation">Axial</property>'
        f'<property name="viewlabel" action="default">{label}</property>'
        f'<property name="viewcolor" action="default">{colour}</property>'
        f'<property name="viewgroup" action="default">{REVIEW_VIEW_GROUP}</property>'
        "</view></item>"
    )


def review_layout_xml(plan: list[dict]) -> str:
    """A Slicer layout description of the plan's own views, all axial: one row, or 2×2 for four views."""
    views = [_view_xml(entry["role"]) for entry in plan]
    if len(views) == 4:
        rows = [views[:2], views[2:]]
        inner = "\n".join(f' <item><layout type="horizontal">{"".join(row)}</layout></item>' for row in rows)
        return '<layout type="vertical">\n' + inner + "\n</layout>"
    return '<layout type="horizontal">\n' + "\n".join(f" {v}" for v in views) + "\n</layout>"


def register_review_layout(layout_node, plan: list[dict]) -> int:
    """Add (or update) the plan's layout description in ``layout_node``; return its id (to switch to)."""
    layout_id = review_layout_id(plan)
    xml = review_layout_xml(plan)
    if layout_node.IsLayoutDescription(layout_id):
        layout_node.SetLayoutDescription(layout_id, xml)
    else:
        layout_node.AddLayoutDescription(layout_id, xml)
    return layout_id


def review_role_sets() -> list[tuple]:
    """Every set of roles :func:`review_plan` can give: the reference MRI, the CT or neither first, then the
    synthetic MRI, with or without a difference and an uncertainty map (12 layouts)."""
    return [first + ("synthetic",) + difference + uncertainty
            for first in (("reference",), ("ct",), ())
            for difference in ((), ("difference",))
            for uncertainty in ((), ("uncertainty",))]


def register_review_layouts(layout_node) -> list[int]:
    """Register every review layout (at Slicer's startup): a scene saved while one was shown asks for its id
    when it is loaded in a new session, before any synthesis has registered it. Returns the ids."""
    return [register_review_layout(layout_node, [{"role": role} for role in roles]) for roles in review_role_sets()]


def apply_review_plan(scene, plan: list[dict]) -> list:
    """Show each plan entry's volume in its own review view: background only, axial, linked.

    Only this module's review view nodes (slice and slice-composite nodes with its singleton tags) are
    changed, never data nodes or other views. Views that do not exist yet (the layout was not shown) are
    skipped. Returns the composite nodes set.
    """
    done = []
    for entry in plan:
        if entry["view"] not in {tag for tag, _, _ in REVIEW_VIEWS.values()}:
            raise CTMRIError(f"not a review view of this module: {entry['view']}")
        composite = scene.GetSingletonNode(entry["view"], "vtkMRMLSliceCompositeNode")
        if composite is None:
            continue
        composite.SetBackgroundVolumeID(entry["background"].GetID())
        composite.SetForegroundVolumeID(None)
        composite.SetLabelVolumeID(None)
        composite.SetLinkedControl(True)  # these views are alone in their view group: linked among themselves
        slice_node = scene.GetSingletonNode(entry["view"], "vtkMRMLSliceNode")
        if slice_node is not None:
            slice_node.SetOrientation("Axial")
        done.append(composite)
    return done
