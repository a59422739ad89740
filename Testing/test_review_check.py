"""The stand-in result the in-Slicer self-test checks the review with where PyTorch is not installed
(``review_check.py``): written and loaded as a finished run's outputs, with none of the packages installed on first use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import phantoms
from conftest import REPO
from CTtoMRISynthesisLib import review_check

SAMPLE = REPO / "CTtoMRISynthesis" / "Resources" / "SampleData"


def test_the_stand_in_needs_none_of_the_packages_installed_on_first_use(tmp_path: Path) -> None:
    """Without PyTorch, scikit-image and safetensors (Slicer before its first run; they are blocked here) the
    stand-in is made and written as a run's outputs, on the MRI's grid; without scikit-image it has no metrics."""
    code = (
        "import sys, json\n"
        "for name in ('torch', 'skimage', 'safetensors'): sys.modules[name] = None  # as if not installed\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import SimpleITK as sitk\n"
        "from CTtoMRISynthesisLib import review_check\n"
        "from CTtoMRISynthesisLib.outputs import save_outputs\n"
        "written = save_outputs(review_check.stand_in_result(sitk.ReadImage(sys.argv[2])), sys.argv[3])\n"
        "import importlib.util\n"
        "if importlib.util.find_spec('slicer'): from CTtoMRISynthesisLib import mrml, review  # what loads it\n"
        "print(json.dumps(sorted(written)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "CTtoMRISynthesis"), str(SAMPLE / "mri.nrrd"),
                          str(tmp_path / "out")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["difference", "metrics", "synthetic_mri", "transform", "uncertainty"]
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "mae" not in summary and review_check.NOT_A_SYNTHESIS in summary["warnings"]
    mri = sitk.ReadImage(str(SAMPLE / "mri.nrrd"))
    synthetic = sitk.ReadImage(str(tmp_path / "out" / "synthetic_mri.nrrd"))
    assert synthetic.GetSize() == mri.GetSize() and np.allclose(synthetic.GetSpacing(), mri.GetSpacing())


def test_the_stand_in_is_labelled_and_its_maps_agree() -> None:
    """Difference = MRI (0..255) − stand-in, uncertainty = |difference| ≥ 0; the metrics, with scikit-image, as a
    run computes them; it names itself a stand-in wherever a result names its model."""
    mri = sitk.GetImageFromArray(phantoms.slice_pair(seed=16, slices=6, first_z=-20.0)[1].astype(np.float32))
    result = review_check.stand_in_result(mri)
    reference = 255.0 * (sitk.GetArrayFromImage(mri) - sitk.GetArrayFromImage(mri).min()) / np.ptp(sitk.GetArrayFromImage(mri))
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.difference),
                               reference - sitk.GetArrayFromImage(result.synthetic_mri), atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.uncertainty),
                                  np.abs(sitk.GetArrayFromImage(result.difference)))
    assert np.abs(sitk.GetArrayFromImage(result.difference)).max() > 1.0  # the maps have something to show
    assert 0.0 < result.metrics["mae"] < 50.0 and result.metrics["per_slice"]
    assert result.weights["name"] == review_check.NOT_A_SYNTHESIS and result.summary()["device"] == "none"


def test_the_stand_in_loads_as_a_finished_run(tmp_path: Path) -> None:
    """Loaded as the panel loads a finished run (real MRML): every node of a run with an MRI, the table included."""
    pytest.importorskip("slicer")
    from conftest import new_scene
    from CTtoMRISynthesisLib import mrml
    from CTtoMRISynthesisLib.outputs import save_outputs

    scene = new_scene()
    mri = sitk.ReadImage(str(SAMPLE / "mri.nrrd"))
    ct_node = mrml.add_volume_node(scene, sitk.ReadImage(str(SAMPLE / "ct.nrrd")), "SampleCT")
    mri_node = mrml.add_volume_node(scene, mri, "SampleMRI")
    save_outputs(review_check.stand_in_result(mri), tmp_path / "out")
    outputs = mrml.add_outputs_from_folder(scene, tmp_path / "out", "SampleCT", ct_node, mri_node)
    assert set(outputs) == {"synthetic_mri", "difference", "uncertainty", "transform", "table"}
    assert mrml.summary_of(outputs)["weights"]["name"] == review_check.NOT_A_SYNTHESIS
