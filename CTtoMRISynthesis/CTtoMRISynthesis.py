"""CTtoMRISynthesis: a 3D Slicer module that turns a head CT into a synthetic brain MRI (2D U-Net).

Thin by design: the widget turns GUI / parameter-node state into one call, and the node-level work
lives in ``CTtoMRISynthesisLib/mrml.py`` (tested outside Slicer against real MRML). Heavy packages
(torch, scikit-image) are imported only when a synthesis runs, after they were installed on request.
"""

import logging
from typing import Annotated, Optional, Union

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer import vtkMRMLLinearTransformNode, vtkMRMLScalarVolumeNode, vtkMRMLTableNode, vtkMRMLVectorVolumeNode


#
# CTtoMRISynthesis
#


class CTtoMRISynthesis(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CT to MRI Synthesis")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Image Synthesis")]
        self.parent.dependencies = []
        self.parent.contributors = ["CTtoMRISynthesis contributors"]
        self.parent.helpText = _(
            """
Synthesize a brain MRI from a head CT with a 2D U-Net, slice by slice.
Optionally give the patient's real MRI: the CT is then registered to it and a difference map and
metrics (MAE, SSIM, PSNR) are made. The synthetic MRI is a research result, not a diagnostic image.
See the <a href="https://github.com/ctmri/SlicerCTtoMRISynthesis">extension documentation</a>.
"""
        )
        self.parent.acknowledgementText = _(
            """
Method after Dong et al. 2020 (CT to MRI synthesis with a U-Net). Uses PyTorch, SimpleITK and scikit-image.
The shipped model was trained on "The Whole Brain Atlas" (K. A. Johnson and J. A. Becker, Harvard Medical School;
no open licence stated: research use). The sample case is from the Visible Human Project, courtesy of the
U.S. National Library of Medicine.
"""
        )
        # A scene saved while a review was shown asks for its layout when it is loaded in a new session, before
        # any synthesis has registered it: register them all once Slicer is up (not at each module entry).
        slicer.app.connect("startupCompleted()", registerReviewLayouts)
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerReviewLayouts() -> None:
    """Register the review layouts (CTtoMRISynthesisLib/review.py: light, no NumPy/SimpleITK) at startup."""
    from CTtoMRISynthesisLib import review

    layoutManager = slicer.app.layoutManager()
    if layoutManager is not None:  # no layout manager when Slicer runs without its main window
        review.register_review_layouts(layoutManager.layoutLogic().GetLayoutNode())


def registerSampleData() -> None:
    """List the shipped sample case (CT + MR) in the Sample Data module. Its files are read from this installation
    and checked against their sha256 (CTtoMRISynthesisLib/demo.py): nothing is downloaded."""
    import os

    import SampleData
    from CTtoMRISynthesisLib import demo
    from CTtoMRISynthesisLib.errors import CTMRIError

    try:
        source = demo.slicer_sample_source()
    except CTMRIError as exc:  # an incomplete installation: the module still works on the user's own images
        logging.warning(f"CT to MRI Synthesis: the sample case is not listed in Sample Data: {exc}")
        return
    icon = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "Icons", "CTtoMRISynthesis.png")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(thumbnailFileName=icon, **source)


#
# Parameter node
#


@parameterNodeWrapper
class CTtoMRISynthesisParameterNode:
    """Inputs, options and outputs, stored in the scene so the GUI and a saved scene agree.

    ctVolume - the CT to synthesise from.
    mriVolume - optional reference MRI (registration, difference map and metrics).
    device, registration - options passed to the pipeline.
    allowDisjoint - the CT and MRI come from scanners with unrelated coordinates (no overlap at all): the
        registration starts from aligned centres instead of refusing (off by default: for one patient's CT and MRI
        from one hospital, no overlap means a wrong pair).
    useShippedModel - True: the model shipped with the extension; False: the file in weightsPath.
    weightsPath - the model file chosen in the panel ("" for none). Plain text kept in step with the path box
        by the widget, not bound to it: ctkPathLineEdit emits currentPathChanged only for a path its filters
        accept (never for an empty box), and a pathlib.Path parameter would show "." for "none".
    syntheticVolume, registeredVolume, differenceVolume, uncertaintyVolume, registrationTransform,
        metricsTable - outputs (uncertaintyVolume: when the model estimates its per-voxel spread).
    """

    # The CT and MRI boxes offer grey volumes and colour volumes, as Slicer loads a PNG screenshot of a grey CT (read as
    # its grey; real colour is refused with a message). Slicer's node-box connector takes its node types from the hint;
    # None must be in the Union for the "no node" default (checked with the wrappers of Slicer 5.6.2 and 5.10.0).
    ctVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode, None]
    mriVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode, None]
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    registration: Annotated[str, Choice(["rigid", "similarity", "none"])] = "rigid"
    allowDisjoint: bool = False
    useShippedModel: bool = True
    weightsPath: str = ""
    syntheticVolume: vtkMRMLScalarVolumeNode
    registeredVolume: vtkMRMLScalarVolumeNode
    differenceVolume: vtkMRMLScalarVolumeNode
    uncertaintyVolume: vtkMRMLScalarVolumeNode
    registrationTransform: vtkMRMLLinearTransformNode
    metricsTable: vtkMRMLTableNode


#
# Widget
#


class CTtoMRISynthesisWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. The synthesis runs in a background PythonSlicer process (CTtoMRISynthesisLib/worker.py)
    so that Slicer never freezes; a QTimer reads its progress, and Cancel stops it at once."""

    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None  # worker.WorkerRun while a synthesis runs
        self._starting = False  # while a run starts (packages may install: pip_install lets clicks through)
        self._runInputs = None
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CTtoMRISynthesis.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CTtoMRISynthesisLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollWorker)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.showResultsButton.connect("clicked(bool)", self.onShowResults)
        self.ui.weightsPathLineEdit.connect("currentPathChanged(QString)", self.onWeightsPathChanged)
        self.ui.progressBar.hide()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._stopRun(cancel=True)
        self.removeObservers()

    def onReload(self) -> None:
        """Developer mode's Reload: the library is read again too (Slicer re-reads only this file, so an edit
        in CTtoMRISynthesisLib would otherwise need a restart). The background runs start fresh processes."""
        import sys

        for name in [n for n in sys.modules if n == "CTtoMRISynthesisLib" or n.startswith("CTtoMRISynthesisLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:
            self._stopRun(cancel=True)
            self.ui.statusLabel.text = _("Cancelled: the scene was closed; nothing was added.")
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        from CTtoMRISynthesisLib import mrml

        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.ctVolume:
            # not a label map (also a vtkMRMLScalarVolumeNode, but the selector cannot show it), not the MRI
            ctNode = mrml.default_ct_node(slicer.mrmlScene, exclude=[self._parameterNode.mriVolume])
            if ctNode:
                self._parameterNode.ctVolume = ctNode

    def setParameterNode(self, inputParameterNode: Optional[CTtoMRISynthesisParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            # the path box is not bound (see the parameter node): show the stored path ("" for none)
            weightsPath = CTtoMRISynthesisLogic.displayedWeightsPath(self._parameterNode.weightsPath)
            self.ui.weightsPathLineEdit.currentPath = weightsPath
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()
            self._showMetrics()

    def _updateButtons(self, caller=None, event=None) -> None:
        running = self._run is not None
        if self._starting:
            self.ui.applyButton.enabled = False
        elif running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the synthesis; nothing is added to the scene.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Synthesize MRI")
            p = self._parameterNode
            ready = bool(p and p.ctVolume)
            self.ui.applyButton.toolTip = _("Synthesize an MRI from the CT.") if ready else _("Select a CT volume.")
            self.ui.applyButton.enabled = ready
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.optionsCollapsibleButton.enabled = not running
        self.ui.weightsPathLineEdit.enabled = bool(self._parameterNode and not self._parameterNode.useShippedModel)
        self.ui.showResultsButton.enabled = bool(
            not running and self._parameterNode and self._parameterNode.syntheticVolume
        )

    def onWeightsPathChanged(self, path: str) -> None:
        """The path box accepted a path (it emits only for existing files its filter accepts)."""
        if self._parameterNode and self._parameterNode.weightsPath != path:
            self._parameterNode.weightsPath = path

    # -- running --------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self._run is not None:
            self.onCancel()
            return
        if self._starting:  # a second click while the first one installs packages: that run is starting already
            return
        self._starting = True
        self._updateButtons()
        try:
            self._startRun()
        finally:
            self._starting = False
            self._updateButtons()

    def _startRun(self) -> None:
        """Check the model, install what is missing (after asking), start the background run; errors are shown."""
        p = self._parameterNode
        try:
            # shows the error (details under "Show details"), then re-raises: caught below, so that a user's
            # error (no model file, PyTorch declined, a label map as CT) leaves no traceback in the console
            with slicer.util.tryWithErrorDisplay(_("Failed to start the synthesis."), waitCursor=True):
                # the box's text as it stands (a path typed but not accepted by the box never reached p.weightsPath)
                weights = self.logic.weightsForRun(p.useShippedModel, self.ui.weightsPathLineEdit.currentPath)
                self.logic.setupPythonRequirements(askConfirmation=True, status=self._showStatusNow)
                self._run = self.logic.startBackgroundRun(
                    p.ctVolume, p.mriVolume, device=p.device, registration=p.registration, weightsPath=weights,
                    allowDisjoint=p.allowDisjoint,
                )
        except Exception as exc:
            self.ui.statusLabel.text = _("Not started: ") + str(exc)
            return
        self._runInputs = (p.ctVolume, p.mriVolume)
        self.ui.progressBar.value = 0
        self.ui.progressBar.format = _("starting") + " (%p%)"
        self.ui.progressBar.show()
        self.ui.statusLabel.text = _("Running in the background; Slicer stays usable.")
        self._updateButtons()
        self._timer.start()

    def _showStatusNow(self, text: str) -> None:
        """The status line, painted at once (before a step that keeps Slicer busy, e.g. an installation)."""
        self.ui.statusLabel.text = text
        slicer.app.processEvents()

    def onPollWorker(self) -> None:
        run = self._run
        if run is None:
            self._timer.stop()
            return
        run.poll()
        self.ui.progressBar.value = int(round(100 * run.fraction))
        self.ui.progressBar.format = f"{run.step} (%p%)"
        if not run.finished:
            return
        self._timer.stop()
        ctNode, mriNode = self._runInputs
        try:
            self.ui.statusLabel.text = self._finishRun(run, ctNode, mriNode)
        finally:
            self._stopRun(cancel=False)
            self._showMetrics()

    def _finishRun(self, run, ctNode, mriNode) -> str:
        """Add the results of a finished run (or report why there are none); return the status line.

        Runs from the poll timer, where a raised error would reach only the Python console: every error is
        shown to the user instead, and a result that cannot be loaded leaves the scene as it was.
        """
        if not run.succeeded:
            if run.cancelled:
                return _("Cancelled; nothing was added.")
            slicer.util.errorDisplay(_("Synthesis failed: ") + str(run.error), detailedText="\n".join(run.log[-200:]))
            return _("Failed: ") + str(run.error)
        outputs = {}
        try:
            outputs = self.logic.loadBackgroundResults(run, ctNode, mriNode)  # all or nothing
            self.logic.storeOutputs(self._parameterNode, outputs)
        except Exception as exc:
            from CTtoMRISynthesisLib import mrml

            mrml.remove_outputs(slicer.mrmlScene, outputs)
            self._showError(_("Failed to load the results; nothing was added."), exc)
            return _("Failed to load the results; nothing was added: ") + str(exc)
        if not self.parent.isEntered:  # the user went to another module meanwhile: leave their layout alone
            slicer.util.showStatusMessage(_("CT to MRI synthesis done."), 5000)
            return _("Done. Show side by side displays the results.")
        try:
            self.logic.showResults(outputs, mriNode, ctNode)
        except Exception as exc:
            self._showError(_("The results were added but could not be shown side by side."), exc)
            return _("Done, but the results could not be shown side by side: ") + str(exc)
        return _("Done.")

    @staticmethod
    def _showError(message: str, exc: BaseException) -> None:
        """An error dialog with the traceback under "Show details" (not in the console)."""
        import traceback

        slicer.util.errorDisplay(f"{message}\n\n{exc}", detailedText=traceback.format_exc())

    def onCancel(self) -> None:
        self._stopRun(cancel=True)
        self.ui.statusLabel.text = _("Cancelled; nothing was added.")

    def _stopRun(self, cancel: bool) -> None:
        if self._timer is not None:
            self._timer.stop()
        run, self._run, self._runInputs = self._run, None, None
        if run is not None:
            if cancel:
                run.cancel()
            run.cleanup()
        if hasattr(self, "ui"):
            self.ui.progressBar.hide()
            self._updateButtons()

    # -- results --------------------------------------------------------------------------------

    def _showMetrics(self) -> None:
        from CTtoMRISynthesisLib import mrml

        node = self._parameterNode.syntheticVolume if self._parameterNode else None
        text = mrml.metrics_panel_text(mrml.summary_of({"synthetic_mri": node}) if node else {})
        self.ui.maeValueLabel.text = text["mae"]
        self.ui.ssimValueLabel.text = text["ssim"]
        self.ui.psnrValueLabel.text = text["psnr"]
        self.ui.timeValueLabel.text = text["time"]
        self.ui.deviceValueLabel.text = text["device"]
        self.ui.uncertaintyValueLabel.text = text["uncertainty"]
        # e.g. a likely CT/MRI swap or a GPU→CPU fallback: the user must see it; replaced, never appended
        self.ui.warningsLabel.text = text["warnings"]
        self.ui.warningsLabel.visible = bool(text["warnings"])

    def onShowResults(self) -> None:
        from CTtoMRISynthesisLib import mrml

        p = self._parameterNode
        if p and p.syntheticVolume:
            outputs = {"synthetic_mri": p.syntheticVolume, "difference": p.differenceVolume,
                       "uncertainty": p.uncertaintyVolume}
            # the result's own CT and MRI, not whatever the boxes select now (a result of an older version: those)
            ctNode, mriNode = mrml.run_inputs(p.syntheticVolume) or (p.ctVolume, p.mriVolume)
            self.logic.showResults(outputs, mriNode, ctNode)


#
# Logic
#


class InstallError(Exception):
    """A required Python package is missing and was not installed."""


class CTtoMRISynthesisLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, callable from scripts.

    Console use (synchronous, blocks until done)::

        logic = slicer.util.getModuleLogic("CTtoMRISynthesis")  # or CTtoMRISynthesisLogic()
        outputs = logic.process(ctNode, mriNode)  # dict of the new output nodes
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return CTtoMRISynthesisParameterNode(super().getParameterNode())

    # -- dependencies ---------------------------------------------------------------------------

    def setupPythonRequirements(self, askConfirmation: bool = True, status=None) -> None:
        """Make sure what the synthesis needs is installed, asking first; raise ``InstallError`` if not.

        PyTorch comes through the PyTorch extension (``PyTorchUtils`` picks a build for the GPU/CPU);
        an installed PyTorch older than ``dependencies.minimum_torch(numpy.__version__)`` is refused with what
        to do. The other packages (``dependencies.PIP_REQUIREMENTS``) are installed with ``slicer.util.pip_install``,
        Slicer's own NumPy and SciPy held at their versions. An installation that fails (no internet, a proxy)
        raises ``InstallError`` saying so. ``status(text)``, if given, is told before an installation starts
        (it runs in this thread: Slicer does not respond until it ends).
        """
        import numpy

        from CTtoMRISynthesisLib import dependencies

        minimum = dependencies.minimum_torch(numpy.__version__)  # NumPy 2 (Slicer 5.10) needs a newer PyTorch
        problem = dependencies.torch_problem(self._torchVersion(askConfirmation, minimum, status), minimum)
        if problem:
            raise InstallError(problem)
        missing = dependencies.missing_requirements()
        if missing:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("CT to MRI Synthesis needs these Python packages, which will now be downloaded and installed:")
                + "\n" + "\n".join(missing),
                _("Install Python packages"),
            ):
                raise InstallError(dependencies.packages_not_installed_message(missing))
            arguments = dependencies.pip_arguments(missing)
            self._tellInstalling(status, ", ".join(missing))
            try:
                slicer.util.pip_install(arguments)
            except Exception as exc:
                how = f"from Slicer's Python console: slicer.util.pip_install({arguments!r})"
                raise InstallError(dependencies.install_failed_message(", ".join(missing), exc, how)) from exc
            missing = dependencies.missing_requirements()
            if missing:
                raise InstallError(dependencies.packages_not_installed_message(missing))

    @staticmethod
    def _tellInstalling(status, what: str) -> None:
        if status is not None:
            status(_("Installing {what}: this can take several minutes, and Slicer does not respond until it is done.")
                   .format(what=what))

    @staticmethod
    def _torchVersion(askConfirmation: bool, minimum: str, status=None) -> str:
        """The version of the PyTorch Slicer has, installing it through PyTorchUtils (after asking) if absent.

        As SlicerTotalSegmentator does: ``torchLogic.torch.__version__``. Without the PyTorch extension a
        PyTorch installed otherwise (e.g. pip from the Python console) is accepted if it is new enough.
        """
        import importlib.util

        from CTtoMRISynthesisLib import dependencies

        try:
            import PyTorchUtils
        except ModuleNotFoundError as exc:
            if importlib.util.find_spec("torch") is None:
                raise InstallError(dependencies.NO_PYTORCH_EXTENSION) from exc
            import torch

            return torch.__version__
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            CTtoMRISynthesisLogic._tellInstalling(status, "PyTorch")
            try:
                torch = torchLogic.installTorch(
                    askConfirmation=askConfirmation, torchVersionRequirement=dependencies.torch_requirement(minimum)
                )
            except Exception as exc:
                how = "in the PyTorch Utils module (Modules > Utilities > PyTorch Utils)"
                raise InstallError(dependencies.install_failed_message("PyTorch", exc, how)) from exc
            if torch is None:
                raise InstallError(dependencies.TORCH_NOT_INSTALLED)
        return torchLogic.torch.__version__

    # -- synchronous (console, tests) ------------------------------------------------------------

    def process(self, ctNode, mriNode=None, device: str = "auto", registration: str = "rigid", weightsPath=None,
                progress=None, cancel=None, allowDisjoint: bool = False, askConfirmation: bool = True,
                showResults: bool = False) -> dict:
        """Synthesize an MRI from ``ctNode`` and add the results as new nodes; synchronous.

        Does everything the "Synthesize MRI" button does, but in this thread (Slicer is busy until it
        returns), through ``CTtoMRISynthesisLib.mrml.run_on_nodes`` and the same pipeline as the
        ``ctmri`` command. Missing packages are installed first (after asking, unless ``askConfirmation`` is
        False: a script run without anyone at the screen).

        :param ctNode: the CT volume node (only read).
        :param mriNode: optional reference MRI volume node (only read): enables registration,
            the difference map and the metrics table.
        :param device: "auto", "cpu", "cuda" or "mps".
        :param registration: "rigid", "similarity" or "none".
        :param allowDisjoint: CT and MRI in unrelated scanner coordinates that do not overlap at all: start
            the registration from aligned centres instead of refusing.
        :param weightsPath: a model file; None for the model shipped with the extension.
        :param progress: optional ``progress(fraction, step)`` callback; ``cancel``: optional callable
            returning True to stop (nothing is added then).
        :param askConfirmation: False installs missing Python packages (PyTorch, scikit-image, safetensors)
            without the confirmation dialog.
        :param showResults: True also shows them side by side in the review's linked views, as the button does.
        :return: dict of the new nodes: "synthetic_mri", and with an MRI also "ct_registered",
            "difference", "transform" and "table"; "uncertainty" when the model estimates its spread.
            Raises ``CTMRIError`` (a message saying what to do) on bad input; the scene is then unchanged.
        """
        from CTtoMRISynthesisLib import mrml

        self.setupPythonRequirements(askConfirmation=askConfirmation)
        outputs = mrml.run_on_nodes(
            slicer.mrmlScene, ctNode, mriNode, weights=self._weights(weightsPath), device=device,
            registration=registration, allow_disjoint=allowDisjoint, progress=progress, cancel=cancel,
        )
        summary = mrml.summary_of(outputs)
        logging.info(f"CT to MRI synthesis done in {summary.get('seconds')} s on {summary.get('device')}")
        if showResults:
            self.showResults(outputs, mriNode, ctNode)
        return outputs

    @staticmethod
    def displayedWeightsPath(weightsPath) -> str:
        """What the path box shows for a stored path: "" for none (also "." from scenes saved by older versions)."""
        text = str(weightsPath or "").strip()
        return "" if text == "." else text

    @staticmethod
    def weightsForRun(useShippedModel: bool, weightsPath) -> Optional[str]:
        """The panel's model choice as the pipeline takes it: None for the shipped model (checked to exist),
        else the chosen file; no file chosen raises ``CTMRIError`` saying what to do."""
        if useShippedModel:
            return CTtoMRISynthesisLogic._weights(None)
        path = CTtoMRISynthesisLogic.displayedWeightsPath(weightsPath)
        if not path:
            from CTtoMRISynthesisLib.errors import CTMRIError

            raise CTMRIError(_("No model file is chosen: choose one under Options > Model file, or tick "
                               "Shipped model."))
        return path

    @staticmethod
    def _weights(weightsPath):
        """The weights file to use: the given path, or None for the shipped model (checked to exist)."""
        weightsPath = CTtoMRISynthesisLogic.displayedWeightsPath(weightsPath)
        if weightsPath:
            return weightsPath
        from CTtoMRISynthesisLib.errors import CTMRIError
        from CTtoMRISynthesisLib.weights import default_weights_path

        if not default_weights_path().is_file():
            raise CTMRIError(
                _("The model shipped with the extension was not found ({path}); untick Shipped model and choose "
                  "a model file under Options, or reinstall the extension.").format(path=default_weights_path())
            )
        return None

    # -- background (the panel) -------------------------------------------------------------------

    @staticmethod
    def pythonExecutable() -> str:
        """Slicer's console Python (``PythonSlicer``), which runs the worker with Slicer's packages."""
        import shutil

        executable = shutil.which("PythonSlicer")
        if not executable:
            raise RuntimeError(_("PythonSlicer was not found next to Slicer; reinstall Slicer."))
        return executable

    def startBackgroundRun(self, ctNode, mriNode=None, device="auto", registration="rigid", weightsPath=None,
                           allowDisjoint: bool = False):
        """Write the inputs to a temporary folder and start the worker; returns its ``WorkerRun``."""
        from CTtoMRISynthesisLib import mrml
        from CTtoMRISynthesisLib.worker import WorkerRun, threads_beside_the_gui

        mrml.check_picture_spacing(ctNode, mriNode, registration)
        run = WorkerRun(slicer.app.temporaryPath)
        try:
            mrml.write_node_for_worker(ctNode, run.ct_path, "CT")
            if mriNode is not None:
                mrml.write_node_for_worker(mriNode, run.mri_path, "MRI")
            run.start(
                self.pythonExecutable(), has_mri=mriNode is not None, env=slicer.util.startupEnvironment(),
                weights=self._weights(weightsPath), device=device, registration=registration,
                allow_disjoint=allowDisjoint, threads=threads_beside_the_gui(),
            )
        except Exception:
            run.cleanup()
            raise
        return run

    def loadBackgroundResults(self, run, ctNode, mriNode=None) -> dict:
        """Add the nodes of a finished background run (same nodes as :meth:`process`)."""
        from CTtoMRISynthesisLib import mrml

        return mrml.add_outputs_from_folder(slicer.mrmlScene, run.out_dir, ctNode.GetName(), ctNode, mriNode)

    @staticmethod
    def storeOutputs(parameterNode, outputs: dict) -> None:
        if parameterNode is None:
            return
        parameterNode.syntheticVolume = outputs.get("synthetic_mri")
        parameterNode.registeredVolume = outputs.get("ct_registered")
        parameterNode.differenceVolume = outputs.get("difference")
        parameterNode.uncertaintyVolume = outputs.get("uncertainty")
        parameterNode.registrationTransform = outputs.get("transform")
        parameterNode.metricsTable = outputs.get("table")

    @staticmethod
    def showResults(outputs: dict, mriNode=None, ctNode=None) -> None:
        """Reference MRI | synthetic MRI | difference (| uncertainty) in linked axial views of this module's own
        (CT | synthetic MRI without an MRI); the user's Red/Yellow/Green views are left as they are."""
        from CTtoMRISynthesisLib import review

        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        plan = review.review_plan(outputs, mriNode, ctNode)
        layoutId = review.register_review_layout(layoutManager.layoutLogic().GetLayoutNode(), plan)
        layoutManager.setLayout(layoutId)  # creates the review views the first time, with labels and colours
        review.apply_review_plan(slicer.mrmlScene, plan)
        for entry in plan:
            sliceWidget = layoutManager.sliceWidget(entry["view"])
            if sliceWidget is not None:
                sliceWidget.sliceLogic().FitSliceToAll()


#
# Test
#


class CTtoMRISynthesisTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test on the sample case shipped in Resources/SampleData.

    The node-level code is tested in depth outside Slicer (Testing/test_mrml.py); this checks, inside the
    application, the review of a finished run (nodes, colour tables, table, views, layout; needs no PyTorch) and,
    where PyTorch is installed, the Logic with the shipped model.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from CTtoMRISynthesisLib import dependencies

        self.setUp()
        self.test_ReviewOfAFinishedRun()
        # A test never installs packages (the module would, after asking, and in testing mode Slicer answers OK
        # by itself): without them the synthesis is skipped, saying what to do, rather than downloading PyTorch.
        missing = dependencies.not_installed()
        if missing:
            self.delayDisplay("Synthesis skipped: not installed: " + ", ".join(missing)
                              + ". Click Synthesize MRI once (it asks before installing), then run the test again.")
            return
        self.setUp()
        self.test_ProcessWithReference()
        self.setUp()
        self.test_ProcessWithoutReference()

    def _sample(self):
        """The sample case shipped with the module, loaded as a user loads it: from the Sample Data module, which
        reads it from this installation (no download: the self-test must run offline)."""
        import SampleData
        from CTtoMRISynthesisLib import demo

        registerSampleData()  # as at startup (registering twice is a no-op); a test may run before startupCompleted
        nodes = SampleData.SampleDataLogic().downloadSamples(demo.SLICER_SAMPLE_NAME)
        self.assertEqual([n.GetName() for n in nodes if hasattr(n, "GetName")], ["SampleCT", "SampleMRI"], nodes)
        ctNode, mriNode = nodes
        return ctNode, mriNode

    def test_ReviewOfAFinishedRun(self):
        """A finished run's outputs loaded as the panel loads them, then the review shown: needs no PyTorch, since
        the outputs are a stand-in written by the library (``review_check.py``: the sample MRI smoothed), not a
        synthesis."""
        import shutil
        import tempfile
        import types
        from pathlib import Path

        import numpy as np

        from CTtoMRISynthesisLib import mrml, review, review_check
        from CTtoMRISynthesisLib.outputs import save_outputs

        self.delayDisplay("Loading the shipped sample case and a stand-in result")
        ctNode, mriNode = self._sample()
        mriBefore = slicer.util.arrayFromVolume(mriNode).copy()
        folder = Path(tempfile.mkdtemp(prefix="CTtoMRISynthesis-selftest-", dir=slicer.app.temporaryPath))
        try:
            save_outputs(review_check.stand_in_result(mrml.image_from_volume_node(mriNode, "MRI")), folder / "out")
            outputs = CTtoMRISynthesisLogic().loadBackgroundResults(types.SimpleNamespace(out_dir=folder / "out"),
                                                                    ctNode, mriNode)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.assertEqual(outputs["synthetic_mri"].GetName(), "SampleCT synthetic MRI")
        for key in ("difference", "uncertainty"):
            self.assertIsNotNone(outputs[key].GetDisplayNode().GetColorNode(), key)
        self.assertIn(review_check.NOT_A_SYNTHESIS, mrml.summary_of(outputs)["warnings"])
        self.assertTrue(np.array_equal(mriBefore, slicer.util.arrayFromVolume(mriNode)))
        CTtoMRISynthesisLogic.showResults(outputs, mriNode, ctNode)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None:  # (a test run without the main window has none)
            for entry in review.review_plan(outputs, mriNode, ctNode):
                sliceWidget = layoutManager.sliceWidget(entry["view"])
                self.assertIsNotNone(sliceWidget, entry["view"])
                composite = sliceWidget.sliceLogic().GetSliceCompositeNode()
                self.assertEqual(composite.GetBackgroundVolumeID(), entry["background"].GetID())
        self.delayDisplay("Test passed")

    def test_ProcessWithReference(self):
        import numpy as np

        self.delayDisplay("Loading the shipped sample case")
        ctNode, mriNode = self._sample()
        ctBefore = slicer.util.arrayFromVolume(ctNode).copy()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        self.delayDisplay("Synthesizing (this takes a while on a CPU)")
        outputs = CTtoMRISynthesisLogic().process(ctNode, mriNode)
        for key in ("synthetic_mri", "ct_registered", "difference", "transform", "table"):
            self.assertIn(key, outputs)
        self.assertEqual(outputs["synthetic_mri"].GetName(), "SampleCT synthetic MRI")
        synthetic = slicer.util.arrayFromVolume(outputs["synthetic_mri"])
        self.assertEqual(synthetic.shape, slicer.util.arrayFromVolume(mriNode).shape)
        self.assertGreaterEqual(float(synthetic.min()), 0.0)
        self.assertLessEqual(float(synthetic.max()), 255.0)
        self.assertTrue(np.array_equal(ctBefore, slicer.util.arrayFromVolume(ctNode)))
        self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.assertGreater(outputs["table"].GetTable().GetNumberOfRows(), 1)
        CTtoMRISynthesisLogic.showResults(outputs, mriNode, ctNode)
        self.delayDisplay("Test passed")

    def test_ProcessWithoutReference(self):
        ctNode, _mri = self._sample()
        outputs = CTtoMRISynthesisLogic().process(ctNode, None, registration="none")
        self.assertEqual(set(outputs) - {"uncertainty"}, {"synthetic_mri"})
        self.delayDisplay("Test passed")
