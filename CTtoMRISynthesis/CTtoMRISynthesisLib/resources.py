"""Where the shipped files live: the model (``model_weights/``) and the demo's sample case.

Three layouts carry them, looked at in this order:

- a source checkout, or ``pip install -e .``: ``<repo>/model_weights/`` and
  ``<repo>/CTtoMRISynthesis/Resources/SampleData/``;
- the installed Slicer extension: CMake copies both beside the module, under ``Resources/``;
- a wheel (``pip install .``): the package alone lands in ``site-packages``, so pyproject's
  ``[tool.setuptools.data-files]`` installs the model and the sample under ``<prefix>/share/ctmri/``, the prefix
  being where that installation put its data (read from its RECORD: a venv's, ``/usr/local`` on Debian's system
  Python, the user base for ``pip install --user``, a ``--prefix`` given to pip).
"""

from __future__ import annotations

import functools
import sysconfig
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SHARE = Path("share") / "ctmri"
DISTRIBUTION = "ctmri-synthesis"  # pyproject's [project] name
SAMPLE_FILES = ("ct.nrrd", "mri.nrrd")


@functools.lru_cache(maxsize=None)  # an installation does not move while it runs; its RECORD is read once
def data_prefixes() -> tuple:
    """The prefixes under which pip put this installation's data files (``<prefix>/share/ctmri``), without
    duplicates: read from the installation's own RECORD first (right for a venv, Debian's ``/usr/local``,
    Homebrew, ``--prefix``, ``--root`` and ``--user`` alike), then the data path of the install scheme whose
    site-packages holds this package. Another installation's files (an older ``pip install --user``, say) are
    never taken for this one's."""
    found = _recorded_prefixes()
    for scheme in sysconfig.get_scheme_names():
        try:
            paths = sysconfig.get_paths(scheme)
            if Path(paths["purelib"]).resolve() == PACKAGE_DIR.parent:
                found.append(Path(paths["data"]))
        except Exception:  # a scheme this platform cannot expand
            continue
    return tuple(dict.fromkeys(found))  # a tuple: the cached value cannot be changed by a caller


def _recorded_prefixes() -> list:
    """The prefix of the ``share/ctmri`` files listed in this package's RECORD (only if that record is this copy's)."""
    try:
        from importlib.metadata import distribution

        dist = distribution(DISTRIBUTION)
        if Path(dist.locate_file(f"{PACKAGE_DIR.name}/__init__.py")).resolve().parent != PACKAGE_DIR:
            return []  # another copy of the package (e.g. an older install beside this checkout)
        for entry in dist.files or ():  # RECORD paths are relative to site-packages: ../../../share/ctmri/…
            if SHARE.as_posix() in entry.as_posix():
                path = Path(dist.locate_file(entry)).resolve()
                while path.name != SHARE.name:
                    path = path.parent
                return [path.parent.parent]
    except Exception:  # not installed by pip (a checkout, Slicer's module paths) or a record we cannot read
        pass
    return []


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
    """The first candidate that exists (a folder: holding every file in ``wanted``); else the first that exists
    at all (an incomplete copy, which an error message should name); else the first one."""
    for candidate in candidates:
        if candidate.exists() and all((candidate / name).is_file() for name in wanted):
            return candidate
    return next((c for c in candidates if c.exists()), candidates[0])


def not_installed(what: str, candidates: list) -> str:
    """The error text for a shipped file found in none of its places: where it was looked for, what to do."""
    looked = "; ".join(str(c) for c in candidates)
    return (f"{what} is not installed here (looked in: {looked}). Install the package from a checkout of the "
            "repository (`pip install .` or `pip install -e .` in the folder holding pyproject.toml and "
            "model_weights/), which installs it too")
