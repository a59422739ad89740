"""The Slicer module's files, checked without Slicer: the .ui is valid Designer XML holding every
widget the Python names, CMake lists every Python file, and CTtoMRISynthesis.py follows the
Extensions Index rules (no heavy imports and no code at file scope)."""

from __future__ import annotations

import ast
import re
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "CTtoMRISynthesis"
MODULE_PY = MODULE / "CTtoMRISynthesis.py"
UI = MODULE / "Resources" / "UI" / "CTtoMRISynthesis.ui"
LIB = MODULE / "CTtoMRISynthesisLib"

# What a scripted module may import at file scope: the standard library and what Slicer itself provides.
SLICER_PROVIDED = {"qt", "ctk", "vtk", "slicer"}


def ui_widgets() -> dict[str, str]:
    root = ET.parse(UI).getroot()  # raises on malformed XML
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def module_tree() -> ast.Module:
    return ast.parse(MODULE_PY.read_text(), filename=str(MODULE_PY))


def test_ui_is_designer_xml_with_a_qmrmlwidget_root() -> None:
    root = ET.parse(UI).getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == root.findtext("class")
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = set(ui_widgets().values())
    standard = {c for c in used if c.startswith("Q")}
    assert used - standard <= declared, f"custom widgets not declared: {used - standard - declared}"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"
    for connection in root.iter("connection"):  # MRML combo boxes get the scene
        assert connection.findtext("receiver") in names


def test_every_widget_the_python_names_exists_in_the_ui() -> None:
    widgets = ui_widgets()
    named = {
        node.attr
        for node in ast.walk(module_tree())
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "self"
    }
    assert named, "expected self.ui.<widget> uses"
    missing = sorted(named - set(widgets))
    assert not missing, f"CTtoMRISynthesis.py uses widgets missing from the .ui: {missing}"
    for required in ("ctSelector", "mriSelector", "applyButton", "progressBar", "deviceComboBox", "registrationComboBox",
                     "weightsPathLineEdit", "shippedModelCheckBox", "maeValueLabel", "ssimValueLabel", "psnrValueLabel", "timeValueLabel",
                     "deviceValueLabel"):
        assert required in widgets


def test_parameter_names_in_the_ui_match_the_parameter_node() -> None:
    root = ET.parse(UI).getroot()
    bound = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("class")
    tree = module_tree()
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CTtoMRISynthesisParameterNode")
    assert any(isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in wrapper.decorator_list)
    fields = {s.target.id: ast.unparse(s.annotation) for s in wrapper.body if isinstance(s, ast.AnnAssign)}
    assert set(bound) <= set(fields), f"parameters bound in the .ui but not in the parameter node: {set(bound) - set(fields)}"
    # parameterNodeWrapper's GUI connectors need these pairings
    assert bound["ctVolume"] == bound["mriVolume"] == "qMRMLNodeComboBox"
    assert bound["device"] == bound["registration"] == "QComboBox"
    assert "Choice(" in fields["device"] and "Choice(" in fields["registration"]
    # the model choice: an explicit checkbox; the path box is not bound (it never emits for an empty box, and a
    # pathlib.Path parameter shows "." for none), the widget keeps the plain-text parameter in step with it
    assert bound["useShippedModel"] == "QCheckBox" and fields["useShippedModel"] == "bool"
    assert "weightsPath" not in bound and fields["weightsPath"] == "str"
    defaults = {s.target.id: ast.literal_eval(s.value) for s in wrapper.body
                if isinstance(s, ast.AnnAssign) and s.value is not None and s.target.id in ("useShippedModel", "weightsPath")}
    assert defaults == {"useShippedModel": True, "weightsPath": ""}
    # the choices are the ones the pipeline accepts
    from CTtoMRISynthesisLib.pipeline import REGISTRATION_MODES
    from CTtoMRISynthesisLib.synthesis import DEVICES

    def choices(annotation: str) -> list:
        return ast.literal_eval(re.search(r"Choice\((\[.*?\])\)", annotation).group(1))

    assert choices(fields["registration"]) == list(REGISTRATION_MODES)
    assert choices(fields["device"]) == list(DEVICES)


def test_volume_selectors_offer_grey_and_colour_volumes() -> None:
    """The CT and MRI boxes list plain grey volumes and colour volumes (a PNG screenshot loaded by Slicer), nothing
    else: the parameter node's hint sets the box's node types in Slicer; the .ui says the same for Designer."""
    wrapper = next(n for n in module_tree().body if isinstance(n, ast.ClassDef) and n.name == "CTtoMRISynthesisParameterNode")
    hints = {s.target.id: s.annotation for s in wrapper.body if isinstance(s, ast.AnnAssign)}
    for field in ("ctVolume", "mriVolume"):
        members = [ast.unparse(e) for e in hints[field].slice.elts]
        assert ast.unparse(hints[field].value) == "Union" and members[-1] == "None"  # None: the wrapper's "no node"
        node_types = members[:-1]
        assert node_types == ["vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode"]
    root = ET.parse(UI).getroot()
    for name in ("ctSelector", "mriSelector"):
        box = next(w for w in root.iter("widget") if w.get("name") == name)
        props = {p.get("name"): p for p in box.findall("property")}
        assert [s.text for s in props["nodeTypes"].iter("string")] == node_types
        assert props["showChildNodeTypes"].findtext("bool") == "false"  # no label maps, tensors or DWI


def test_model_file_box_accepts_the_model_files_the_library_writes() -> None:
    """The path box's name filter lets the shipped model's kind of file through (else it never emits)."""
    from CTtoMRISynthesisLib import weights

    root = ET.parse(UI).getroot()
    box = next(w for w in root.iter("widget") if w.get("name") == "weightsPathLineEdit")
    filters = [s.text for p in box.findall("property") if p.get("name") == "nameFilters" for s in p.iter("string")]
    suffix = Path(weights.SHIPPED_NAME).suffix
    assert any(f"*{suffix}" in f for f in filters), (filters, weights.SHIPPED_NAME)
    enabled = [p.findtext("bool") for p in box.findall("property") if p.get("name") == "enabled"]
    assert enabled == ["false"], "disabled while Shipped model is ticked (the default)"


def _file_scope_imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    return names


def test_module_file_has_no_heavy_imports_and_no_code_at_file_scope() -> None:
    if not hasattr(sys, "stdlib_module_names"):  # Python 3.10+; the Slicer-stack job on 3.9 cannot run this check
        pytest.skip("needs sys.stdlib_module_names (Python 3.10+); the main CI job runs it")
    tree = module_tree()
    stdlib = set(sys.stdlib_module_names)
    for name in _file_scope_imports(tree):
        assert name in stdlib or name in SLICER_PROVIDED, f"file-scope import of {name!r} in CTtoMRISynthesis.py"
    for node in tree.body:
        allowed = (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef)
        is_docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        assert isinstance(node, allowed) or is_docstring, f"code at file scope, line {node.lineno}: {ast.unparse(node)[:60]}"
    source = MODULE_PY.read_text()
    assert "pip_install(\"torch" not in source and "pip_install('torch" not in source, "torch comes through PyTorchUtils"
    assert "installTorch(" in source and "PyTorchUtils" in source
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"CTtoMRISynthesis", "CTtoMRISynthesisWidget", "CTtoMRISynthesisLogic", "CTtoMRISynthesisTest"} <= classes


def test_review_layouts_are_registered_at_startup() -> None:
    """The module class connects Slicer's startupCompleted() to the functions that register every review layout and
    list the sample in Sample Data (test_mrml: a saved review is restored only then); not at file scope, not at
    each module entry."""
    tree = module_tree()
    module_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CTtoMRISynthesis")
    init = next(n for n in module_class.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    connects = [ast.unparse(c) for c in ast.walk(init) if isinstance(c, ast.Call) and ast.unparse(c.func) == "slicer.app.connect"]
    assert connects == ["slicer.app.connect('startupCompleted()', registerReviewLayouts)",
                        "slicer.app.connect('startupCompleted()', registerSampleData)"], connects
    register = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "registerReviewLayouts")
    assert "review.register_review_layouts(layoutManager.layoutLogic().GetLayoutNode())" in ast.unparse(register)


def test_logic_process_signature_and_docstring() -> None:
    tree = module_tree()
    logic = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CTtoMRISynthesisLogic")
    process = next(n for n in logic.body if isinstance(n, ast.FunctionDef) and n.name == "process")
    args = [a.arg for a in process.args.args]
    assert args[:6] == ["self", "ctNode", "mriNode", "device", "registration", "weightsPath"]
    defaults = [ast.literal_eval(d) for d in process.args.defaults[:4]]
    assert defaults == [None, "auto", "rigid", None]
    doc = ast.get_docstring(process)
    assert "synchronous" in doc.lower() and "run_on_nodes" in doc
    assert "run_on_nodes" in ast.unparse(process)


def test_library_files_keep_the_walls() -> None:
    """Only mrml.py imports slicer; nothing in the library imports qt, ctk or the module file."""
    for path in LIB.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add((node.module or "").split(".")[0])
        assert not imported & {"qt", "ctk", "CTtoMRISynthesis"}, path
        if path.name != "mrml.py":
            assert "slicer" not in imported, f"{path.relative_to(REPO)} imports slicer; only mrml.py may"
    worker_tree = ast.parse((LIB / "worker.py").read_text())
    if hasattr(sys, "stdlib_module_names"):  # Python 3.10+: checked by the main CI job, not the 3.9 one
        assert _file_scope_imports(worker_tree) <= set(sys.stdlib_module_names) | {"__future__"}


def _cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, variable
    return [line.split("#")[0].strip() for line in match.group(1).splitlines() if line.split("#")[0].strip()]


def test_module_cmake_lists_every_python_file_and_resource() -> None:
    text = (MODULE / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text
    assert re.search(r"SCRIPTS \$\{MODULE_PYTHON_SCRIPTS\}", text)
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    assert scripts[0] == "${MODULE_NAME}.py" and "${MODULE_LIB_SCRIPTS}" in scripts
    # expand the file(GLOB ...) patterns the way CMake does (relative to the module folder)
    glob_block = re.search(r"file\(GLOB MODULE_LIB_SCRIPTS(.*?)\)", text, re.S).group(1)
    patterns = re.findall(r"\$\{CMAKE_CURRENT_SOURCE_DIR\}/(\S+)", glob_block)
    assert "RELATIVE ${CMAKE_CURRENT_SOURCE_DIR}" in glob_block
    covered = {"CTtoMRISynthesis.py"}
    for pattern in patterns:
        covered |= {str(p.relative_to(MODULE)) for p in MODULE.glob(pattern.replace("${MODULE_NAME}", "CTtoMRISynthesis"))}
    on_disk = {"CTtoMRISynthesis.py"} | {str(p.relative_to(MODULE)) for p in LIB.rglob("*.py")}
    assert on_disk <= covered, f"Python files the extension would not install (add a glob): {sorted(on_disk - covered)}"
    resources = {s.replace("${MODULE_NAME}", "CTtoMRISynthesis") for s in _cmake_list(text, "MODULE_PYTHON_RESOURCES")}
    assert resources == {"Resources/UI/CTtoMRISynthesis.ui", "Resources/Icons/CTtoMRISynthesis.png"}
    for resource in resources:
        assert (MODULE / resource).is_file()
    # the shipped model is installed where weights.default_weights_path() looks in an installed extension
    assert "model_weights" in text and "Resources/model_weights" in text
    from CTtoMRISynthesisLib import resources, weights

    installed = MODULE.resolve() / "Resources" / "model_weights" / weights.SHIPPED_NAME
    assert installed in resources.model_candidates(weights.SHIPPED_NAME)


def test_extension_installs_the_shipped_model_file() -> None:
    """The model-file glob in the module's CMakeLists matches the shipped model and its checksum file."""
    import fnmatch

    from CTtoMRISynthesisLib import weights

    block = re.search(r"file\(GLOB MODULE_MODEL_FILES(.*?)\)", (MODULE / "CMakeLists.txt").read_text(), re.S).group(1)
    patterns = [Path(p).name for p in re.findall(r"\.\./model_weights/(\S+)", block)]
    for name in (weights.SHIPPED_NAME, weights.checksum_path(weights.SHIPPED_NAME).name):
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), (name, patterns)


def test_extension_cmake_and_license() -> None:
    text = (REPO / "CMakeLists.txt").read_text()
    fields = dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', text))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert fields.get(key), key
    assert fields["EXTENSION_CATEGORY"] == "Image Synthesis"
    assert fields["EXTENSION_DEPENDS"] == "PyTorch"
    assert "add_subdirectory(CTtoMRISynthesis)" in text
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text


@pytest.mark.parametrize("path", [MODULE / "Resources/Icons/CTtoMRISynthesis.png", REPO / "Resources/Icons/CTtoMRISynthesis.png"])
def test_icons_are_128_pngs(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)


def test_readme_layout_names_every_module() -> None:
    """The README's Layout table is where a newcomer looks for the room of a capability: it names every module."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):readme.index("## Licence and data")]
    named = set(re.findall(r"`([a-z_]+)/?`", layout))
    modules = {p.stem for p in LIB.glob("*.py") if p.stem != "__init__"} | {"training"}
    assert modules - named == set(), f"README's Layout does not name {sorted(modules - named)}"


def test_readme_explains_its_development_words_before_using_them() -> None:
    """"round 10", "stop 34", "issue 11's aims" name where a measurement comes from; a newcomer met them in the
    install notes and the results with no word of what they are. One paragraph explains them where the results
    begin (the quick start and the install notes need none of them): every use comes after it, and it says what
    each is and where it is recorded."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.find("**Words used below.**")
    results = readme.index("## Results")
    assert results < start < results + 100, "no explanation of the development words where the results begin"
    glossary = readme[start:readme.index("\n\n", start)]
    for word, explained in (("round", "*round*"), ("stop", "*stop*"), ("issue", "*issue 11*"), ("aim", "aim 1")):
        first = re.search(rf"\b{word} \d", readme, re.IGNORECASE)
        assert first is None or first.start() > start, f"README uses {first.group()!r} before explaining it"
        assert explained in glossary, f"the explanation does not say what {word!r} is"
    assert "model_weights/RECIPES.md" in glossary  # where the rounds are recorded
