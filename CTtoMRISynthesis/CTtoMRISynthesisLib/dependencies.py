"""What the Slicer module needs installed, and what to tell the user when it is not (plain Python).

The module (``CTtoMRISynthesis.py``) asks before installing anything: PyTorch through the PyTorch
extension (``PyTorchUtils``), the other packages with ``slicer.util.pip_install``. The decisions and the
messages live here so that they can be tested without Slicer.

Which PyTorch: the weights are safetensors files (tensors only, nothing unpickled), so no PyTorch version
is needed for safety; what the inference code uses is all in PyTorch 2.0 (``inference_mode``,
``autocast(device_type=...)``, ``channels_last``, ``torch.backends.mps``, ``torch.cuda.OutOfMemoryError``;
``torch.OutOfMemoryError`` of 2.4 only where it exists). The NumPy beside it sets the other bound:
PyTorch ≤ 2.2 is built against NumPy 1.x and cannot exchange arrays with NumPy 2 (pytorch/pytorch#107302);
2.4 is taken as the first built for NumPy 2. So:

- Slicer 5.6 / 5.8 (Python 3.9, NumPy 1.26): PyTorch 2.0 – 2.8 (2.8 is the newest for Python 3.9); on
  macOS, where Slicer runs as x86_64, 2.2.2 is the newest there is.
- Slicer 5.10 (Python 3.12, NumPy 2.0.2): PyTorch 2.4 or newer (none for macOS x86_64).
"""

from __future__ import annotations

import importlib.util
import re
from typing import Callable, Iterable, Optional, Sequence, Tuple

#: The oldest PyTorch the library runs with beside NumPy 1.x, and beside NumPy 2 (see the module docstring).
MINIMUM_TORCH = "2.0"
MINIMUM_TORCH_NUMPY2 = "2.4"

#: Packages the library needs beyond what Slicer ships: (import name, pip requirement).
#: scipy ships with Slicer (5.6: 1.11.3), so it is only installed where it is missing. The upper bounds are
#: the first releases newer than those tested (``.ci/run`` runs the library with scikit-image 0.24 and 0.26,
#: safetensors 0.7 and 0.8): a first use inside Slicer, where a broken install is hard to mend, gets a release
#: that was tested, not the newest. A package already installed is used as it is (only its import is checked).
PIP_REQUIREMENTS: Tuple[Tuple[str, str], ...] = (
    ("skimage", "scikit-image>=0.21,<0.27"),
    ("scipy", "scipy"),
    ("safetensors", "safetensors>=0.4,<0.9"),
)

NO_PYTORCH_EXTENSION = (
    "This module needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, restart Slicer, "
    "then click Synthesize MRI again (PyTorch itself is then installed after asking)."
)
TORCH_NOT_INSTALLED = (
    "PyTorch is needed to synthesize an MRI and was not installed. Click Synthesize MRI again and confirm the "
    "installation, or install it in the PyTorch Utils module (Modules > Utilities > PyTorch Utils)."
)
PACKAGES_NOT_INSTALLED = (
    "The required Python packages were not installed: {packages}. Click Synthesize MRI again and confirm, or "
    "install them from Slicer's Python console: slicer.util.pip_install({quoted})"
)


def minimum_torch(numpy_version: Optional[str] = None) -> str:
    """The oldest usable PyTorch beside this NumPy (``numpy.__version__``; None: NumPy 1.x)."""
    release = _release(numpy_version) if numpy_version else None
    return MINIMUM_TORCH_NUMPY2 if release is not None and release[0] >= 2 else MINIMUM_TORCH


def torch_requirement(minimum: str = MINIMUM_TORCH) -> str:
    """The version requirement given to ``PyTorchUtilsLogic.installTorch`` (e.g. ``">=2.0"``)."""
    return f">={minimum}"


def _release(version: str) -> Optional[tuple]:
    """The release numbers of a version string, e.g. "2.8.0+cu126" → (2, 8, 0); None if unreadable.

    ``packaging`` (shipped with Slicer 5.6 and later) does the parsing; the fallback reads the leading
    numbers, so that this module also works where ``packaging`` is missing.
    """
    try:
        from packaging.version import InvalidVersion, Version

        try:
            return tuple(Version(version).release)
        except InvalidVersion:
            return None
    except ImportError:
        match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
        return tuple(int(part) for part in match.group(1).split(".")) if match else None


def _padded(release: tuple, length: int = 3) -> tuple:
    return tuple(release) + (0,) * max(0, length - len(release))


def torch_problem(version: Optional[str], minimum: str = MINIMUM_TORCH) -> Optional[str]:
    """Why the installed PyTorch cannot be used, with what to do; None if it is new enough.

    ``minimum``: from :func:`minimum_torch`. A pre-release of the minimum (e.g. "2.4.0a0") counts as the
    minimum: only the release numbers are compared, as a development build of 2.4 has what 2.4 has.
    """
    how = (
        f"Open the PyTorch Utils module (Modules > Utilities > PyTorch Utils), uninstall PyTorch and restart "
        f"Slicer; then click Synthesize MRI again and confirm: PyTorch {torch_requirement(minimum)} is installed. "
        f"(In PyTorch Utils you can also install it yourself with the version requirement "
        f"'{torch_requirement(minimum)}'.)"
    )
    if not version:
        return "The installed PyTorch does not report its version; it may be damaged. " + how
    release, wanted = _release(str(version)), _release(minimum)
    if release is None:
        return f"Cannot read the installed PyTorch version ({version!r}); it may be damaged. " + how
    if _padded(release) < _padded(wanted):
        why = " beside Slicer's NumPy 2" if minimum == MINIMUM_TORCH_NUMPY2 else ""
        return f"PyTorch {version} is installed, but this module needs PyTorch {minimum} or newer{why}. " + how
    return None


def missing_requirements(
    requirements: Iterable[Tuple[str, str]] = PIP_REQUIREMENTS,
    find_spec: Callable[[str], object] = importlib.util.find_spec,
) -> list:
    """The pip requirements whose module cannot be imported (found without importing it)."""
    return [requirement for module, requirement in requirements if find_spec(module) is None]


#: Packages Slicer ships that an install must never replace (a newer NumPy or SciPy under Slicer's own modules).
KEEP_AS_INSTALLED = ("numpy", "scipy")

INSTALL_FAILED = (
    "Installing {what} failed: {error}. Check the internet connection (and proxy settings, if any), then click "
    "Synthesize MRI again; or install it yourself {how}"
)


def not_installed(
    requirements: Iterable[Tuple[str, str]] = PIP_REQUIREMENTS,
    find_spec: Callable[[str], object] = importlib.util.find_spec,
) -> list:
    """Everything the synthesis needs that is not importable, PyTorch included (found without importing it)."""
    torch = ["torch"] if find_spec("torch") is None else []
    return torch + missing_requirements(requirements, find_spec)


def pip_arguments(missing: Sequence[str], installed_version: Optional[Callable[[str], str]] = None) -> list:
    """What to give ``slicer.util.pip_install``: the ``missing`` requirements, plus ``==`` the installed version of
    each package in :data:`KEEP_AS_INSTALLED` not among them, so that pip picks versions that work with Slicer's own
    NumPy and SciPy instead of upgrading them."""
    if installed_version is None:
        from importlib.metadata import version as installed_version
    installing = {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower() for requirement in missing}
    pins = []
    for package in KEEP_AS_INSTALLED:
        if package in installing:
            continue
        try:
            pins.append(f"{package}=={installed_version(package)}")
        except Exception:  # not installed (importlib.metadata.PackageNotFoundError): nothing to keep
            pass
    return list(missing) + pins


def install_failed_message(what: str, error: BaseException, how: str) -> str:
    """The message for an installation that was agreed to but failed (no internet, a proxy, pip's own error)."""
    text = str(error).strip().rstrip(".")  # the message ends the sentence itself
    return INSTALL_FAILED.format(what=what, error=text or type(error).__name__, how=how)


def packages_not_installed_message(missing: Sequence[str]) -> str:
    """The message for a declined (or failed) installation of ``missing``."""
    return PACKAGES_NOT_INSTALLED.format(packages=", ".join(missing), quoted=repr(list(missing)))
