"""Where the shipped files live: the model (``model_weights/``) and the demo's sample case.

Three layouts carry them, looked at in this order:

- a source checkout, or ``pip install -e .``: ``<repo>/model_weights/`` and
  ``<repo>/CTtoMRISynthesis/Resources/SampleData/``;
- the installed Slicer extension: CMake copies both beside the module, under ``Resources/``;
- a wheel (``pip install .``): the package alone lands in ``site-packages``, so pyproject's
  ``[tool.setuptools.data-files]`` installs the model and the sample under ``<prefix>/share/ctmri/``
  (``sys.prefix`` for a virtual environment or system install, the user base for ``pip install --user``).
"""

from __future__ import annotations

import site
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SHARE = Path("share") / "ctmri"
SAMPLE_FILES = ("ct.nrrd", "mri.nrrd")


def data_prefixes() -> list:
    """The prefixes under which a wheel's data files may have been installed (without duplicates)."""
    prefixes = [Path(sys.prefix)]
    try:
        prefixes.append(Path(site.getuserbase()))
    except Exception:  # an embedded Python (Slicer's) may not define a user base
        pass
    return list(dict.fromkeys(prefixes))


def model_candidates(name: str) -> list:
    """Every place the shipped model file ``name`` may be, in the order they are tried."""
    return [
        PACKAGE_DIR.parent.parent / "model_weights" / name,  # source checkout / editable install
        PACKAGE_DIR.parent / "Resources" / "model_weights" / name,  # installed Slicer extension
        *(prefix / SHARE / "model_weights" / name for prefix in data_prefixes()),  # pip install .
    ]


def sample_candidates() -> list:
    """Every folder the demo's sample case may be in, in the order they are tried."""
    return [
        PACKAGE_DIR.parent / "Resources" / "SampleData",  # source checkout and Slicer extension alike
        *(prefix / SHARE / "SampleData" for prefix in data_prefixes()),  # pip install .
    ]


def first_present(candidates: list, wanted: tuple = ()) -> Path:
    """The first candidate that exists (a folder: holding every file in ``wanted``); else the first one,
    so that an error message names where the file belongs."""
    for candidate in candidates:
        if candidate.exists() and all((candidate / name).is_file() for name in wanted):
            return candidate
    return candidates[0]


def not_installed(what: str, candidates: list) -> str:
    """The error text for a shipped file found in none of its places: where it was looked for, what to do."""
    looked = "; ".join(str(c) for c in candidates)
    return (f"{what} is not installed here (looked in: {looked}). Install the package from a checkout of the "
            "repository (`pip install .` or `pip install -e .` in the folder holding pyproject.toml and "
            "model_weights/), which installs it too")
