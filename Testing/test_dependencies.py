"""What the Slicer module installs and refuses (CTtoMRISynthesisLib/dependencies.py; plain Python, no Slicer).

The minimum PyTorch is checked against what the inference code really uses, and the versions Slicer's
Pythons can install: 2.8 is the newest for Python 3.9 (Slicer 5.6 / 5.8).
"""

from __future__ import annotations

import ast
import sys

import pytest

from conftest import REPO
from CTtoMRISynthesisLib import dependencies

LIB = REPO / "CTtoMRISynthesis" / "CTtoMRISynthesisLib"


@pytest.mark.parametrize("version", ["2.4.0", "2.4.1+cpu", "2.8.0+cu126", "2.8.0", "2.13.0", "3.0", "2.4.0a0+git1234"])
def test_usable_torch_versions_pass(version: str) -> None:
    assert dependencies.torch_problem(version) is None


@pytest.mark.parametrize("version", ["2.3.1", "2.0.0+cpu", "1.13.1", "2.3.1+cu121"])
def test_old_torch_is_refused_with_what_to_do(version: str) -> None:
    message = dependencies.torch_problem(version)
    assert message.startswith(f"PyTorch {version} is installed, but this module needs PyTorch 2.4 or newer")
    assert "PyTorch Utils" in message and "'>=2.4'" in message and "restart" in message


@pytest.mark.parametrize("version", [None, "", "not-a-version"])
def test_unreadable_torch_version_is_refused(version) -> None:
    message = dependencies.torch_problem(version)
    assert message is not None and "PyTorch Utils" in message


def test_version_reading_without_packaging(monkeypatch) -> None:
    """The fallback parser (where `packaging` is missing) reaches the same decisions."""
    monkeypatch.setitem(sys.modules, "packaging", None)  # makes `import packaging...` raise ImportError
    monkeypatch.setitem(sys.modules, "packaging.version", None)
    assert dependencies.torch_problem("2.8.0+cu126") is None
    assert dependencies.torch_problem("2.3.1") is not None
    assert dependencies.torch_problem("2.4") is None


def test_install_requirement_matches_the_minimum() -> None:
    assert dependencies.torch_requirement() == ">=" + dependencies.MINIMUM_TORCH
    assert dependencies.torch_problem(dependencies.MINIMUM_TORCH) is None


def test_missing_requirements_are_found_without_importing() -> None:
    present = dependencies.missing_requirements()
    assert present == [], f"this environment lacks {present}"
    requirements = [("json", "json-is-stdlib"), ("ctmri_no_such_module_xyz", "no-such-package>=1")]
    assert dependencies.missing_requirements(requirements) == ["no-such-package>=1"]
    assert "safetensors" in {module for module, _ in dependencies.PIP_REQUIREMENTS}
    text = dependencies.packages_not_installed_message(["scikit-image>=0.21", "safetensors>=0.4"])
    assert "slicer.util.pip_install(['scikit-image>=0.21', 'safetensors>=0.4'])" in text


def _torch_attributes_used(path) -> set:
    """Names used as ``torch.<name>`` (first level) in a library file."""
    tree = ast.parse(path.read_text())
    return {
        node.attr for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch"
    }


def test_minimum_torch_covers_what_the_inference_code_uses() -> None:
    """No torch API the inference path uses is newer than ``MINIMUM_TORCH``.

    The table lists first-level torch names added after PyTorch 2.0, with the release that added them
    (PyTorch release notes / pull requests); the code's use of ``torch.OutOfMemoryError`` is what sets 2.4.
    """
    introduced = {
        "OutOfMemoryError": (2, 4),  # pytorch/pytorch#121702
        "get_default_device": (2, 3),
        "uint16": (2, 3), "uint32": (2, 3), "uint64": (2, 3),
        "float8_e4m3fn": (2, 1), "float8_e5m2": (2, 1),
        "export": (2, 1),
    }
    minimum = tuple(int(p) for p in dependencies.MINIMUM_TORCH.split("."))
    used = set()
    for name in ("synthesis.py", "model.py", "weights.py", "pipeline.py"):
        used |= _torch_attributes_used(LIB / name)
    assert "OutOfMemoryError" in used or minimum < (2, 4), "the reason for 2.4 went away: lower MINIMUM_TORCH"
    for name in sorted(used & set(introduced)):
        assert introduced[name] <= minimum, f"torch.{name} needs PyTorch {introduced[name]}, above MINIMUM_TORCH"
