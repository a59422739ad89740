"""CTtoMRISynthesis.py's Logic, run outside Slicer: the console API and the panel's background path.

slicer-core has MRML but not the application pieces the module file imports at file scope (qt,
slicer.i18n, slicer.ScriptedLoadableModule, slicer.parameterNodeWrapper). Those are replaced here by
minimal stand-ins, only for the import; everything the Logic does then runs for real: MRML nodes,
mrml.run_on_nodes, the worker process, loading its outputs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")

import phantoms  # noqa: E402
from conftest import REPO, new_scene  # noqa: E402

MODULE_PY = REPO / "CTtoMRISynthesis" / "CTtoMRISynthesis.py"


class _Base:
    def __init__(self, *args, **kwargs):
        pass


@pytest.fixture()
def module(monkeypatch):
    """Import CTtoMRISynthesis.py with stand-ins for the Slicer application modules."""
    qt = types.ModuleType("qt")
    qt.QTimer = type("QTimer", (), {})
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleWidget"):
        setattr(slm, name, type(name, (_Base,), {}))
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = lambda choices: tuple(choices)
    for name, stub in {"qt": qt, "slicer.i18n": i18n, "slicer.ScriptedLoadableModule": slm,
                       "slicer.parameterNodeWrapper": pnw}.items():
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, stub)
    spec = importlib.util.spec_from_file_location("CTtoMRISynthesis_under_test", MODULE_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def scene(monkeypatch):
    scene = new_scene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    return scene


@pytest.fixture(scope="module")
def case():
    """A synthetic patient (phantoms.py): 8-bit windowed CT and T2-like MRI, 16 slices of 256×256."""
    images = []
    for array in phantoms.slice_pair(seed=28, slices=16, first_z=-35.0):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.9, 0.9, 5.0))
        images.append(image)
    return images


def _node(image, name):
    from CTtoMRISynthesisLib import mrml

    return mrml.add_volume_node(slicer.mrmlScene, image, name)


def test_console_process_returns_the_output_nodes(module, scene, case, tiny_weights) -> None:
    ct, mri = _node(case[0], "CT28"), _node(case[1], "MR28")
    outputs = module.CTtoMRISynthesisLogic().process(ct, mri, device="cpu", registration="none",
                                                     weightsPath=str(tiny_weights))
    assert set(outputs) - {"uncertainty"} == {"synthetic_mri", "ct_registered", "difference", "transform", "table"}
    assert outputs["synthetic_mri"].GetName() == "CT28 synthetic MRI"
    assert scene.IsNodePresent(outputs["table"])
    assert module.CTtoMRISynthesisLogic._weights(tiny_weights) == str(tiny_weights)


def test_console_process_shows_the_results_only_when_asked(module, scene, case, tiny_weights, monkeypatch) -> None:
    """``process(..., showResults=True)`` brings up the review as the button does; by default the layout is left."""
    shown: list = []
    monkeypatch.setattr(module.CTtoMRISynthesisLogic, "showResults",
                        staticmethod(lambda outputs, mri=None, ct=None: shown.append((outputs["synthetic_mri"], mri, ct))))
    ct, mri = _node(case[0], "CT28"), _node(case[1], "MR28")
    logic = module.CTtoMRISynthesisLogic()
    logic.process(ct, mri, device="cpu", registration="none", weightsPath=str(tiny_weights))
    assert shown == []
    outputs = logic.process(ct, mri, device="cpu", registration="none", weightsPath=str(tiny_weights), showResults=True)
    assert shown == [(outputs["synthetic_mri"], mri, ct)]


def test_console_process_refuses_disjoint_images_unless_allowed(module, scene, case, tiny_weights) -> None:
    from CTtoMRISynthesisLib import mrml
    from CTtoMRISynthesisLib.errors import CTMRIError

    far = sitk.Image(case[1])
    far.SetOrigin((1000.0, 0.0, 0.0))
    ct, mri = _node(case[0], "CT28"), _node(far, "MR28 far")
    logic = module.CTtoMRISynthesisLogic()
    before = scene.GetNumberOfNodes()
    with pytest.raises(CTMRIError, match="allowDisjoint=True"):
        logic.process(ct, mri, device="cpu", weightsPath=str(tiny_weights))
    assert scene.GetNumberOfNodes() == before
    outputs = logic.process(ct, mri, device="cpu", weightsPath=str(tiny_weights), allowDisjoint=True)
    assert mrml.summary_of(outputs)["registration"]["overlap"] > 0.9


def test_empty_weights_box_means_the_shipped_model(module, tiny_weights, monkeypatch, tmp_path) -> None:
    from CTtoMRISynthesisLib.errors import CTMRIError

    monkeypatch.setenv("CTMRI_WEIGHTS", str(tiny_weights))  # stands in for the shipped file
    for empty in (Path("."), Path(""), None, ""):  # what the path box and the console give for "none"
        assert module.CTtoMRISynthesisLogic._weights(empty) is None
    monkeypatch.setenv("CTMRI_WEIGHTS", str(tmp_path / "missing.safetensors"))
    with pytest.raises(CTMRIError, match="untick Shipped model and choose a model file under Options"):
        module.CTtoMRISynthesisLogic._weights(Path("."))


def test_the_panel_model_choice(module, tiny_weights, monkeypatch) -> None:
    """Shipped model ticked: the shipped file whatever the box holds; unticked: the box's file, never "."."""
    from CTtoMRISynthesisLib.errors import CTMRIError
    from CTtoMRISynthesisLib.weights import default_weights_path

    logic = module.CTtoMRISynthesisLogic
    monkeypatch.setenv("CTMRI_WEIGHTS", str(tiny_weights))  # stands in for the shipped file
    assert default_weights_path() == tiny_weights
    for box in ("", ".", "/elsewhere/model.safetensors"):
        assert logic.weightsForRun(True, box) is None
    assert logic.weightsForRun(False, f"  {tiny_weights} ") == str(tiny_weights)
    for empty in ("", ".", "  ", None):
        with pytest.raises(CTMRIError, match="No model file is chosen.*tick Shipped model"):
            logic.weightsForRun(False, empty)
    assert logic.displayedWeightsPath(".") == "" and logic.displayedWeightsPath("") == ""
    assert logic.displayedWeightsPath(str(tiny_weights)) == str(tiny_weights)


def test_background_run_then_load_gives_the_same_nodes(module, scene, case, tiny_weights, tmp_path, monkeypatch) -> None:
    """What the panel does: write inputs, run the worker process, poll it, load its outputs."""
    from CTtoMRISynthesisLib import worker

    app = types.SimpleNamespace(temporaryPath=str(tmp_path))
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer.util, "startupEnvironment", lambda: dict(os.environ))
    logic = module.CTtoMRISynthesisLogic()
    monkeypatch.setattr(logic, "pythonExecutable", lambda: sys.executable)
    ct, mri = _node(case[0], "CT28"), _node(case[1], "MR28")
    before = slicer.util.arrayFromVolume(ct).copy()

    run = logic.startBackgroundRun(ct, mri, device="cpu", registration="none", weightsPath=tiny_weights)
    assert run.wait(timeout=300) == 0, (run.error, run.log[-10:])
    # the run leaves one core to Slicer's window
    assert run.proc.args[run.proc.args.index("--threads") + 1] == str(worker.threads_beside_the_gui())
    outputs = logic.loadBackgroundResults(run, ct)
    run.cleanup()
    assert not run.folder.exists()
    assert set(outputs) - {"uncertainty"} == {"synthetic_mri", "ct_registered", "difference", "transform", "table"}
    assert np.array_equal(slicer.util.arrayFromVolume(ct), before)

    direct = logic.process(ct, mri, device="cpu", registration="none", weightsPath=tiny_weights)
    for key in ("synthetic_mri", "difference"):
        np.testing.assert_allclose(slicer.util.arrayFromVolume(outputs[key]),
                                   slicer.util.arrayFromVolume(direct[key]), atol=1e-3)
    parameters = types.SimpleNamespace()
    logic.storeOutputs(parameters, outputs)
    assert parameters.syntheticVolume is outputs["synthetic_mri"] and parameters.metricsTable is outputs["table"]


def test_panel_run_with_disjoint_images_names_the_option_and_the_option_runs(module, scene, case, tiny_weights,
                                                                           tmp_path, monkeypatch) -> None:
    """An MRI in unrelated scanner coordinates through the background worker: refused naming the panel's option;
    with it (allowDisjoint, as the panel's checkbox sets it) the run starts from aligned centres and succeeds."""
    from CTtoMRISynthesisLib import mrml

    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path)), raising=False)
    monkeypatch.setattr(slicer.util, "startupEnvironment", lambda: dict(os.environ))
    logic = module.CTtoMRISynthesisLogic()
    monkeypatch.setattr(logic, "pythonExecutable", lambda: sys.executable)
    far = sitk.Image(case[1])
    far.SetOrigin((1000.0, 0.0, 0.0))
    ct, mri = _node(case[0], "CT28"), _node(far, "MR28 far")

    refused = logic.startBackgroundRun(ct, mri, device="cpu", weightsPath=tiny_weights)
    assert refused.wait(timeout=300) != 0
    assert "do not overlap" in refused.error and "Options > Unrelated scanner coordinates" in refused.error
    refused.cleanup()

    run = logic.startBackgroundRun(ct, mri, device="cpu", weightsPath=tiny_weights, allowDisjoint=True)
    assert "--allow-disjoint" in run.proc.args
    assert run.wait(timeout=300) == 0, (run.error, run.log[-10:])
    outputs = logic.loadBackgroundResults(run, ct)
    run.cleanup()
    assert mrml.summary_of(outputs)["registration"]["overlap"] > 0.9


def test_the_panel_passes_its_disjoint_option_to_the_run(widget, monkeypatch) -> None:
    """The Options checkbox (parameter allowDisjoint) reaches startBackgroundRun, ticked or not."""
    import contextlib

    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(widget.logic, "weightsForRun", lambda shipped, path: None)
    monkeypatch.setattr(widget.logic, "setupPythonRequirements", lambda askConfirmation, status=None: None)
    calls = []
    monkeypatch.setattr(widget.logic, "startBackgroundRun", lambda *args, **kwargs: calls.append(kwargs) or "run")
    monkeypatch.setattr(widget, "_updateButtons", lambda: None)
    widget.ui.weightsPathLineEdit.currentPath = ""
    for ticked in (True, False):
        widget._run = None
        p = widget._parameterNode
        p.ctVolume, p.mriVolume, p.device, p.registration, p.allowDisjoint = "ct", "mri", "cpu", "rigid", ticked
        widget.onApplyButton()
        assert widget._run == "run", widget.ui.statusLabel.text
        assert calls[-1]["allowDisjoint"] is ticked


def test_background_run_refuses_a_bad_input_before_starting(module, scene, tmp_path, monkeypatch) -> None:
    from CTtoMRISynthesisLib.errors import CTMRIError

    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path)), raising=False)
    logic = module.CTtoMRISynthesisLogic()
    label = slicer.util.addVolumeFromArray(np.ones((3, 8, 8), np.uint8), nodeClassName="vtkMRMLLabelMapVolumeNode")
    with pytest.raises(CTMRIError, match="label map"):
        logic.startBackgroundRun(label, None)
    assert not list(tmp_path.iterdir()), "the temporary folder was removed"
    # a stack loaded from PNG slices at Slicer's 1 mm, to be registered to an MRI: refused before anything starts
    stack = slicer.util.addVolumeFromArray(np.ones((3, 8, 8), np.uint8))
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path.parent / "CT (1).png"))
    stack.SetAndObserveStorageNodeID(storage.GetID())
    mri = slicer.util.addVolumeFromArray(np.ones((3, 8, 8), np.uint8))
    with pytest.raises(CTMRIError, match="was loaded from 2D pictures"):
        logic.startBackgroundRun(stack, mri, registration="rigid")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# dependencies: the PyTorch check before a run (PyTorchUtils is a Slicer extension: a stand-in here)


def _pytorch_utils(monkeypatch, version: Optional[str], install_returns=True) -> list:
    """A stand-in for the PyTorch extension's ``PyTorchUtils`` with torch ``version`` installed (None: absent).

    Returns the list of ``installTorch`` calls (their keyword arguments)."""
    calls: list = []

    class PyTorchUtilsLogic:
        torch = types.SimpleNamespace(__version__=version)

        @staticmethod
        def torchInstalled():
            return version is not None

        def installTorch(self, **kwargs):
            calls.append(kwargs)
            return self.torch if install_returns else None

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    return calls


def test_requirements_pass_with_this_environment(module, monkeypatch) -> None:
    """Here everything is installed (torch 2.13, scikit-image, scipy, safetensors): nothing to ask or install."""
    installs: list = []
    monkeypatch.setattr(slicer.util, "pip_install", installs.append, raising=False)
    module.CTtoMRISynthesisLogic().setupPythonRequirements(askConfirmation=False)
    assert installs == []


def test_old_torch_in_slicer_is_refused_with_instructions(module, monkeypatch) -> None:
    import numpy

    from CTtoMRISynthesisLib import dependencies

    minimum = dependencies.minimum_torch(numpy.__version__)
    calls = _pytorch_utils(monkeypatch, "1.13.1+cu117")
    with pytest.raises(module.InstallError,
                       match=rf"PyTorch 1.13.1\+cu117 is installed, but this module needs PyTorch {minimum}") as info:
        module.CTtoMRISynthesisLogic().setupPythonRequirements(askConfirmation=False)
    assert "PyTorch Utils" in str(info.value)
    assert calls == [], "an installed PyTorch is never replaced without the user"


@pytest.mark.parametrize("version", ["2.8.0+cu126", "2.4.0"])
def test_torch_that_python_39_can_have_is_accepted(module, monkeypatch, version) -> None:
    """Slicer 5.6/5.8 (Python 3.9) can install at most PyTorch 2.8: that must be enough (with any NumPy)."""
    calls = _pytorch_utils(monkeypatch, version)
    module.CTtoMRISynthesisLogic().setupPythonRequirements(askConfirmation=False)
    assert calls == [], "accepted: PyTorch is not installed again"


def test_missing_torch_is_installed_with_the_real_minimum(module, monkeypatch) -> None:
    from CTtoMRISynthesisLib import dependencies

    calls = _pytorch_utils(monkeypatch, None, install_returns=False)
    with pytest.raises(module.InstallError, match="PyTorch is needed"):
        module.CTtoMRISynthesisLogic().setupPythonRequirements(askConfirmation=True)
    import numpy

    minimum = dependencies.minimum_torch(numpy.__version__)
    assert calls == [{"askConfirmation": True, "torchVersionRequirement": ">=" + minimum}]


def test_console_process_can_install_without_the_dialog(module, scene, case, tiny_weights, monkeypatch) -> None:
    """``process(..., askConfirmation=False)`` (a script, nobody at the screen): PyTorch and the missing packages
    are installed without a dialog; by default the dialog is shown."""
    from CTtoMRISynthesisLib import dependencies

    import torch

    for ask in (False, True):
        calls = _pytorch_utils(monkeypatch, None)
        monkeypatch.setattr(sys.modules["PyTorchUtils"].PyTorchUtilsLogic, "torch",
                            types.SimpleNamespace(__version__=torch.__version__))
        missing = [["safetensors>=0.4"], []]
        monkeypatch.setattr(dependencies, "missing_requirements", lambda *a, **k: missing.pop(0))
        asked: list = []
        monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: asked.append(a) or True,
                            raising=False)
        installed: list = []
        monkeypatch.setattr(slicer.util, "pip_install", installed.append, raising=False)
        ct = _node(case[0], "CT28")
        kwargs = {} if ask else {"askConfirmation": False}
        outputs = module.CTtoMRISynthesisLogic().process(ct, None, device="cpu", weightsPath=str(tiny_weights),
                                                         **kwargs)
        assert "synthetic_mri" in outputs
        assert [c["askConfirmation"] for c in calls] == [ask]
        assert bool(asked) is ask and installed and installed[0][0] == "safetensors>=0.4"


def test_a_failed_package_installation_says_what_to_check(module, monkeypatch) -> None:
    """No internet or a proxy: pip's own error becomes an InstallError saying what to check; pip was given
    Slicer's NumPy and SciPy to keep, and the status line was told before the (blocking) installation."""
    import subprocess

    from CTtoMRISynthesisLib import dependencies

    monkeypatch.setattr(dependencies, "missing_requirements", lambda *a, **k: ["scikit-image>=0.21"])
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: True, raising=False)
    given: list = []

    def pip_install(arguments):
        given.append(arguments)
        raise subprocess.CalledProcessError(1, ["pip", "install", *arguments])

    monkeypatch.setattr(slicer.util, "pip_install", pip_install, raising=False)
    said: list = []
    with pytest.raises(module.InstallError, match=r"Installing scikit-image>=0.21 failed: Command .* returned non-zero "
                       r"exit status 1\. Check the internet connection .* slicer\.util\.pip_install\(\["):
        module.CTtoMRISynthesisLogic().setupPythonRequirements(askConfirmation=True, status=said.append)
    import numpy

    assert given == [["scikit-image>=0.21", f"numpy=={numpy.__version__}", *given[0][2:]]]
    assert said and said[0].startswith("Installing scikit-image>=0.21: this can take several minutes")


def test_a_failed_pytorch_installation_says_what_to_check(module, monkeypatch) -> None:
    calls = _pytorch_utils(monkeypatch, None)

    def refused(self, **kwargs):
        calls.append(kwargs)
        raise OSError("Could not fetch URL https://download.pytorch.org/whl/: connection error")

    monkeypatch.setattr(sys.modules["PyTorchUtils"].PyTorchUtilsLogic, "installTorch", refused)
    with pytest.raises(module.InstallError, match=r"Installing PyTorch failed: Could not fetch URL .* Check the "
                       r"internet connection .* in the PyTorch Utils module"):
        module.CTtoMRISynthesisLogic().setupPythonRequirements(askConfirmation=True)
    assert len(calls) == 1


def test_the_self_test_skips_without_installing(module, scene, monkeypatch) -> None:
    """Slicer's test harness answers the install dialog with OK by itself: the self-test must not reach the
    installation (a download of PyTorch on a build machine); it checks the review, which needs no PyTorch, then
    says what is missing and stops."""
    from CTtoMRISynthesisLib import dependencies

    monkeypatch.setattr(dependencies, "not_installed", lambda *a, **k: ["torch"])
    monkeypatch.setattr(module.CTtoMRISynthesisLogic, "process",
                        lambda *a, **k: pytest.fail("the self-test ran the synthesis"))
    test = module.CTtoMRISynthesisTest()
    said: list = []
    test.delayDisplay = said.append
    test.test_ReviewOfAFinishedRun = lambda: said.append("review checked")
    test.runTest()
    assert said == ["review checked", "Synthesis skipped: not installed: torch. Click Synthesize MRI once (it asks "
                    "before installing), then run the test again."]


def test_the_self_tests_review_runs_on_real_nodes(module, scene, tmp_path, monkeypatch) -> None:
    """The self-test's review of a finished run (what it checks in Slicer without PyTorch), on real MRML: the
    sample loaded as nodes (Slicer's loadVolume needs the application: stood in for), the stand-in result written
    and loaded as the panel loads a run, its nodes checked; the layout manager is absent here, so no views."""
    from CTtoMRISynthesisLib import mrml

    sample = MODULE_PY.parent / "Resources" / "SampleData"
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path), layoutManager=lambda: None),
                        raising=False)
    test = module.CTtoMRISynthesisTest()
    test.delayDisplay = lambda text: None
    test._sample = lambda: tuple(mrml.add_volume_node(scene, sitk.ReadImage(str(sample / f"{kind}.nrrd")), name)
                                 for kind, name in (("ct", "SampleCT"), ("mri", "SampleMRI")))
    test.assertEqual = lambda a, b, msg=None: None if a == b else pytest.fail(f"{a!r} != {b!r} {msg or ''}")
    test.assertIsNotNone = lambda a, msg=None: None if a is not None else pytest.fail(f"None: {msg}")
    test.assertIn = lambda a, b, msg=None: None if a in b else pytest.fail(f"{a!r} not in {b!r}")
    test.assertTrue = lambda a, msg=None: None if a else pytest.fail(f"not true: {msg}")
    before = scene.GetNumberOfNodes()
    test.test_ReviewOfAFinishedRun()
    names = {scene.GetNthNode(k).GetName() for k in range(scene.GetNumberOfNodes())}
    assert {"SampleCT synthetic MRI", "SampleCT difference", "SampleCT uncertainty"} <= names
    assert scene.GetNumberOfNodes() > before and list(tmp_path.iterdir()) == []  # its temporary folder removed


# ------------------------------------------------------------------------------------------------
# the panel's reactions (Qt is not here: its labels and buttons are stood in for by plain attributes)


class _QtStandIn:
    """A label / button / progress bar: the attributes the widget sets, and show/hide."""

    def __init__(self) -> None:
        self.text, self.toolTip, self.format, self.value, self.enabled, self.visible = "", "", "", 0, True, True

    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False


class _Ui:
    def __getattr__(self, name):
        widget = _QtStandIn()
        setattr(self, name, widget)
        return widget


@pytest.fixture()
def widget(module, scene, monkeypatch):
    """The module's widget object, its Qt parts stood in for; errorDisplay records what the user would see."""
    shown: list = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: shown.append((text, kwargs)))
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(layoutManager=lambda: None), raising=False)
    w = module.CTtoMRISynthesisWidget()
    w.ui = _Ui()
    w.logic = module.CTtoMRISynthesisLogic()
    w._timer = types.SimpleNamespace(stop=lambda: None, start=lambda: None)
    w._parameterNode = types.SimpleNamespace(ctVolume=None, syntheticVolume=None, useShippedModel=True)
    w.parent = types.SimpleNamespace(isEntered=True)  # the module is shown
    w.shown = shown
    return w


def test_reload_reads_the_library_again(widget, module, monkeypatch) -> None:
    """Slicer's Reload re-reads the module file only: the widget drops the library's modules first, so that the
    reloaded module imports them afresh (an edit in CTtoMRISynthesisLib is seen without restarting Slicer)."""
    importlib.import_module("CTtoMRISynthesisLib.metrics")  # a submodule loaded, as after a run

    library = {n: m for n, m in sys.modules.items() if n.split(".")[0] == "CTtoMRISynthesisLib"}
    seen: list = []

    def base_reload(self) -> None:  # Slicer's own onReload (slicer.util.reloadScriptedModule) at that moment
        seen.append(sorted(n for n in sys.modules if n.split(".")[0] == "CTtoMRISynthesisLib"))
        import CTtoMRISynthesisLib.metrics as fresh
        seen.append(fresh is not library["CTtoMRISynthesisLib.metrics"])

    monkeypatch.setattr(module.ScriptedLoadableModuleWidget, "onReload", base_reload, raising=False)
    try:
        widget.onReload()
    finally:  # the other tests keep the library objects they imported
        for name in [n for n in sys.modules if n.split(".")[0] == "CTtoMRISynthesisLib"]:
            del sys.modules[name]
        sys.modules.update(library)
    assert seen == [[], True]


def _finished_run(tmp_path, outputs_from=None):
    """A WorkerRun whose process ended with status 0; its output folder as given (copied) or empty."""
    import shutil

    from CTtoMRISynthesisLib.worker import WorkerRun

    run = WorkerRun(tmp_path)
    if outputs_from is not None:
        shutil.copytree(outputs_from, run.out_dir)
    run.returncode = 0
    return run


def test_results_that_cannot_be_loaded_are_reported_not_raised(widget, scene, case, tmp_path) -> None:
    ct = _node(case[0], "CT28")
    run = _finished_run(tmp_path)
    run.out_dir.mkdir()
    (run.out_dir / "metrics.json").write_text("{}")
    (run.out_dir / "synthetic_mri.nrrd").write_bytes(b"NRRD0004\nnot a volume\n")
    widget._run, widget._runInputs = run, (ct, None)
    widget.ui.statusLabel.text = "Running in the background; Slicer stays usable."
    before = scene.GetNumberOfNodes()

    widget.onPollWorker()  # raises nothing: the timer's slot must not leave a traceback in the console

    assert widget.ui.statusLabel.text.startswith("Failed to load the results; nothing was added: ")
    assert len(widget.shown) == 1 and widget.shown[0][0].startswith("Failed to load the results")
    assert "Traceback" in widget.shown[0][1]["detailedText"], "the details are in the dialog"
    assert scene.GetNumberOfNodes() == before, "the scene is as it was"
    assert widget._run is None and not run.folder.exists()
    assert widget.ui.applyButton.text == "Synthesize MRI" and not widget.ui.progressBar.visible


def test_loaded_results_and_warnings_in_their_own_label(widget, scene, case, tiny_weights, tmp_path) -> None:
    """A run's outputs are added; its warnings go to their own label, replaced (not appended) at each refresh."""
    from CTtoMRISynthesisLib.outputs import save_outputs
    from CTtoMRISynthesisLib.pipeline import synthesize

    ct, mri = _node(case[0], "CT28"), _node(case[1], "MR28")
    result = synthesize(case[0], case[1], weights=tiny_weights, device="cpu", registration="none")
    result.warnings = ["the CT looks like an MRI"]
    save_outputs(result, tmp_path / "made")
    run = _finished_run(tmp_path, tmp_path / "made")
    widget._run, widget._runInputs = run, (ct, mri)

    widget.onPollWorker()

    assert widget.ui.statusLabel.text == "Done." and widget.shown == []
    assert widget._parameterNode.syntheticVolume.GetName() == "CT28 synthetic MRI"
    for _ in range(3):  # module entry, scene close, another run: the same warnings, once
        widget._showMetrics()
    assert widget.ui.warningsLabel.text == "Warning: the CT looks like an MRI" and widget.ui.warningsLabel.visible
    assert widget.ui.statusLabel.text == "Done."
    widget._parameterNode.syntheticVolume = None  # e.g. a new scene
    widget._showMetrics()
    assert widget.ui.warningsLabel.text == "" and not widget.ui.warningsLabel.visible


def test_show_side_by_side_shows_the_results_own_inputs(widget, scene, case, tiny_weights, tmp_path,
                                                        monkeypatch) -> None:
    """*Show side by side* after the boxes were changed (another MRI chosen, or none) shows the result with the CT
    and MRI it was made from, not with what the boxes select now; a synthetic MRI that does not record them (an
    older version's) is shown with the selection, as before."""
    from CTtoMRISynthesisLib import mrml
    from CTtoMRISynthesisLib.outputs import save_outputs
    from CTtoMRISynthesisLib.pipeline import synthesize

    ct, mri, other = _node(case[0], "CT28"), _node(case[1], "MR28"), _node(case[1], "another MRI")
    save_outputs(synthesize(case[0], case[1], weights=tiny_weights, device="cpu", registration="none"),
                 tmp_path / "made")
    widget._run, widget._runInputs = _finished_run(tmp_path, tmp_path / "made"), (ct, mri)
    widget.onPollWorker()
    shown = []
    monkeypatch.setattr(widget.logic, "showResults", lambda outputs, m, c: shown.append((m, c)))
    p = widget._parameterNode
    for selected in (other, None):
        p.mriVolume = selected
        widget.onShowResults()
    assert shown == [(mri, ct), (mri, ct)]
    p.syntheticVolume.RemoveAttribute(mrml.INPUTS_ATTRIBUTE)
    p.mriVolume = other
    widget.onShowResults()
    assert shown[-1] == (other, p.ctVolume)


def test_results_of_a_run_that_ends_elsewhere_leave_the_layout_alone(widget, scene, case, tiny_weights, tmp_path,
                                                                     monkeypatch) -> None:
    """The user went to another module while the run went on: the results are added, but the layout is not
    switched under them; the status says how to show the results."""
    from CTtoMRISynthesisLib.outputs import save_outputs
    from CTtoMRISynthesisLib.pipeline import synthesize

    ct = _node(case[0], "CT28")
    save_outputs(synthesize(case[0], None, weights=tiny_weights, device="cpu"), tmp_path / "made")
    widget._run, widget._runInputs = _finished_run(tmp_path, tmp_path / "made"), (ct, None)
    widget.parent.isEntered = False
    monkeypatch.setattr(widget.logic, "showResults", lambda *a: pytest.fail("the layout was switched"))
    told: list = []
    monkeypatch.setattr(slicer.util, "showStatusMessage", lambda text, ms=0: told.append(text), raising=False)

    widget.onPollWorker()

    assert widget.ui.statusLabel.text == "Done. Show side by side displays the results."
    assert widget._parameterNode.syntheticVolume.GetName() == "CT28 synthetic MRI"
    assert told == ["CT to MRI synthesis done."]


def test_closing_the_scene_during_a_run_cancels_it_and_says_so(widget, monkeypatch) -> None:
    stopped: list = []
    widget._run = types.SimpleNamespace(cancel=lambda: stopped.append("cancel"), cleanup=lambda: stopped.append("cleanup"))
    widget._runInputs = (None, None)
    widget.ui.statusLabel.text = "Running in the background; Slicer stays usable."
    widget._parameterNode = None
    widget.onSceneStartClose(None, None)
    assert stopped == ["cancel", "cleanup"] and widget._run is None
    assert widget.ui.statusLabel.text == "Cancelled: the scene was closed; nothing was added."
    widget.ui.statusLabel.text = "Done."
    widget.onSceneStartClose(None, None)  # no run: the last status stays
    assert widget.ui.statusLabel.text == "Done."


def test_failed_and_cancelled_runs_say_so(widget, case, tmp_path) -> None:
    ct = _node(case[0], "CT28")
    run = _finished_run(tmp_path)
    run.returncode, run.error = 2, "the CT is constant"
    widget._run, widget._runInputs = run, (ct, None)
    widget.onPollWorker()
    assert widget.ui.statusLabel.text == "Failed: the CT is constant" and len(widget.shown) == 1
    run = _finished_run(tmp_path)
    run.returncode, run.cancelled = 130, True
    widget._run, widget._runInputs = run, (ct, None)
    widget.onPollWorker()
    assert widget.ui.statusLabel.text == "Cancelled; nothing was added." and len(widget.shown) == 1


def test_a_second_click_while_packages_install_starts_no_second_run(widget, monkeypatch) -> None:
    """slicer.util.pip_install processes GUI events while it runs, so a second click on Synthesize reached
    onApplyButton inside the first click's installation and started a second run; the first was then never
    cancelled nor cleaned up. The button is disabled while a run starts and a click then does nothing."""
    import contextlib

    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(widget.logic, "weightsForRun", lambda shipped, path: None)
    widget.ui.weightsPathLineEdit.currentPath = ""
    p = widget._parameterNode
    p.ctVolume, p.mriVolume, p.device, p.registration, p.allowDisjoint = "ct", None, "cpu", "rigid", False
    started, enabled_while_installing = [], []

    def install(askConfirmation, status=None):
        enabled_while_installing.append(widget.ui.applyButton.enabled)
        widget.onApplyButton()  # the click Qt delivers during the installation

    monkeypatch.setattr(widget.logic, "setupPythonRequirements", install)
    monkeypatch.setattr(widget.logic, "startBackgroundRun", lambda *a, **k: started.append("run") or "run")
    widget.onApplyButton()
    assert started == ["run"] and widget._run == "run" and enabled_while_installing == [False]
    assert widget.ui.applyButton.enabled and widget.ui.applyButton.text == "Cancel"


def test_a_run_that_cannot_start_says_why_without_raising(widget, scene, monkeypatch, tmp_path) -> None:
    """E.g. no model file chosen: the dialog (via tryWithErrorDisplay) and the status line; nothing raised."""
    import contextlib

    shown = widget.shown

    @contextlib.contextmanager
    def try_with_error_display(message, waitCursor=False):  # Slicer's: show the error, then re-raise
        try:
            yield
        except Exception as exc:
            shown.append((f"{message}\n\n{exc}", {}))
            raise

    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", try_with_error_display)
    widget._parameterNode.useShippedModel = False
    widget.ui.weightsPathLineEdit.currentPath = ""
    widget.onApplyButton()
    assert widget.ui.statusLabel.text.startswith("Not started: No model file is chosen")
    assert len(shown) == 1 and widget._run is None
