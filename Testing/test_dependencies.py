"""What the Slicer module installs and refuses (CTtoMRISynthesisLib/dependencies.py; plain Python, no Slicer).

The minimum PyTorch is checked against what the inference code really uses, and the versions Slicer's
Pythons can install: 2.8 is the newest for Python 3.9 (Slicer 5.6 / 5.8).
"""

from __future__ import annotations

import ast
import re
import sys

import pytest

from conftest import REPO
from CTtoMRISynthesisLib import dependencies

LIB = REPO / "CTtoMRISynthesis" / "CTtoMRISynthesisLib"


@pytest.mark.parametrize("numpy_version, minimum", [
    ("1.26.1", "2.0"),  # Slicer 5.6
    ("1.26.4", "2.0"),  # Slicer 5.8
    ("2.0.2", "2.4"),  # Slicer 5.10
    ("2.3.5", "2.4"),
    (None, "2.0"),
])
def test_minimum_torch_follows_numpy(numpy_version, minimum) -> None:
    assert dependencies.minimum_torch(numpy_version) == minimum


@pytest.mark.parametrize("version", ["2.0.0", "2.2.2", "2.4.1+cpu", "2.8.0+cu126", "2.13.0", "3.0", "2.0.0a0+git1234"])
def test_usable_torch_versions_pass_beside_numpy_1(version: str) -> None:
    """Slicer 5.6 / 5.8: up to 2.8 (Python 3.9), 2.2.2 on macOS (x86_64) – all must be accepted."""
    assert dependencies.torch_problem(version, dependencies.minimum_torch("1.26.1")) is None


@pytest.mark.parametrize("version, numpy_version", [("1.13.1", "1.26.1"), ("2.3.1+cu121", "2.0.2"), ("2.2.2", "2.0.2")])
def test_old_torch_is_refused_with_what_to_do(version: str, numpy_version: str) -> None:
    minimum = dependencies.minimum_torch(numpy_version)
    message = dependencies.torch_problem(version, minimum)
    assert message.startswith(f"PyTorch {version} is installed, but this module needs PyTorch {minimum} or newer")
    assert "PyTorch Utils" in message and f"'>={minimum}'" in message and "restart" in message
    assert ("NumPy 2" in message) == numpy_version.startswith("2")


@pytest.mark.parametrize("version", [None, "", "not-a-version"])
def test_unreadable_torch_version_is_refused(version) -> None:
    message = dependencies.torch_problem(version)
    assert message is not None and "PyTorch Utils" in message


def test_version_reading_without_packaging(monkeypatch) -> None:
    """The fallback parser (where `packaging` is missing) reaches the same decisions."""
    monkeypatch.setitem(sys.modules, "packaging", None)  # makes `import packaging...` raise ImportError
    monkeypatch.setitem(sys.modules, "packaging.version", None)
    assert dependencies.torch_problem("2.8.0+cu126", "2.4") is None
    assert dependencies.torch_problem("2.3.1", "2.4") is not None
    assert dependencies.torch_problem("2.4", "2.4") is None
    assert dependencies.minimum_torch("2.0.2") == "2.4" and dependencies.minimum_torch("1.26.1") == "2.0"


def test_install_requirement_matches_the_minimum() -> None:
    assert dependencies.torch_requirement() == ">=" + dependencies.MINIMUM_TORCH
    assert dependencies.torch_requirement("2.4") == ">=2.4"
    assert dependencies.torch_problem(dependencies.MINIMUM_TORCH) is None


def test_missing_requirements_are_found_without_importing() -> None:
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
    """No torch API the inference path uses (as ``torch.<name>``) is newer than ``MINIMUM_TORCH``.

    The table lists first-level torch names added after PyTorch 2.0, with the release that added them
    (PyTorch release notes / pull requests). Newer APIs are used only through ``getattr`` with a fallback.
    """
    introduced = {
        "OutOfMemoryError": (2, 4),  # pytorch/pytorch#121702; torch.cuda.OutOfMemoryError is the 2.0 name
        "get_default_device": (2, 3),
        "uint16": (2, 3), "uint32": (2, 3), "uint64": (2, 3),
        "float8_e4m3fn": (2, 1), "float8_e5m2": (2, 1),
        "export": (2, 1),
    }
    minimum = tuple(int(p) for p in dependencies.MINIMUM_TORCH.split("."))
    used = set()
    for name in ("synthesis.py", "model.py", "weights.py", "pipeline.py"):
        used |= _torch_attributes_used(LIB / name)
    assert "cuda" in used, "the scan sees the library's torch uses"
    for name in sorted(used & set(introduced)):
        assert introduced[name] <= minimum, f"torch.{name} needs PyTorch {introduced[name]}, above MINIMUM_TORCH"


def test_pip_arguments_hold_slicers_numpy_and_scipy() -> None:
    """pip is given Slicer's own NumPy and SciPy as ==, so that a newer scikit-image cannot upgrade them under
    Slicer; a package being installed (SciPy where it is missing) is not held, one not installed is skipped."""
    versions = {"numpy": "2.0.2", "scipy": "1.13.1"}

    def installed(package: str) -> str:
        if package not in versions:
            from importlib.metadata import PackageNotFoundError

            raise PackageNotFoundError(package)
        return versions[package]

    assert dependencies.pip_arguments(["scikit-image>=0.21", "safetensors>=0.4"], installed) == [
        "scikit-image>=0.21", "safetensors>=0.4", "numpy==2.0.2", "scipy==1.13.1"]
    assert dependencies.pip_arguments(["scipy"], installed) == ["scipy", "numpy==2.0.2"]
    del versions["scipy"]
    assert dependencies.pip_arguments(["safetensors>=0.4"], installed) == ["safetensors>=0.4", "numpy==2.0.2"]
    import numpy  # this environment's real versions, read by importlib.metadata

    assert f"numpy=={numpy.__version__}" in dependencies.pip_arguments(["safetensors>=0.4"])


def test_not_installed_names_pytorch_too() -> None:
    absent = {"torch", "skimage"}
    found = dependencies.not_installed(find_spec=lambda name: None if name in absent else object())
    assert found == ["torch", "scikit-image>=0.21,<0.27"]
    assert dependencies.not_installed(find_spec=lambda name: object()) == []


def test_the_packages_installed_in_slicer_are_the_tested_releases() -> None:
    """Each pip requirement the module installs admits every release ``.ci/run`` tests the library with (its
    Slicer jobs pin them) and stops before the next minor release after the newest of them."""
    pinned: dict = {}
    for name, version in re.findall(r"\b(scikit-image|safetensors)==([0-9.]+)", (REPO / ".ci" / "run").read_text()):
        pinned.setdefault(name, set()).add(tuple(int(v) for v in version.split(".")))
    requirements = {req.split(">=")[0]: req for _, req in dependencies.PIP_REQUIREMENTS if ">=" in req}
    assert set(pinned) == set(requirements) - {"scipy"}
    for name, versions in pinned.items():
        low, high = (tuple(int(v) for v in bound.split(".")) for bound in
                     re.fullmatch(rf"{name}>=([0-9.]+),<([0-9.]+)", requirements[name]).groups())
        assert all(low <= v < high for v in versions), (name, versions)
        assert high == (max(versions)[0], max(versions)[1] + 1), (name, high, max(versions))


def test_a_failed_installation_says_what_to_check() -> None:
    message = dependencies.install_failed_message("PyTorch", OSError("Connection refused"), "in PyTorch Utils")
    assert message.startswith("Installing PyTorch failed: Connection refused. Check the internet connection")
    assert message.endswith("or install it yourself in PyTorch Utils")
    assert "failed: RuntimeError." in dependencies.install_failed_message("x", RuntimeError(""), "somehow")
