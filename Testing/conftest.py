"""Shared pytest fixtures: where the real data lives, and a skip-or-fail rule for when it is absent.

The data folder is ``$CTMRI_DATA`` or ``<repo>/../shared/data``. Tests needing it skip with a reason
on a machine without it, except under ``CTMRI_REQUIRE_DATA=1`` (set by ``.ci/run``), where they fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """The shared data folder (may not exist)."""
    return Path(os.environ.get("CTMRI_DATA", REPO.parent / "shared" / "data"))


def require(path: Path) -> Path:
    """Return ``path`` if it exists; otherwise skip (or fail under CTMRI_REQUIRE_DATA=1)."""
    if path.exists():
        return path
    message = f"real data not found at {path} (set CTMRI_DATA to the shared data folder)"
    if os.environ.get("CTMRI_REQUIRE_DATA") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require(data_root())


@pytest.fixture(scope="session")
def harvard_dir(data_dir: Path) -> Path:
    return require(data_dir / "harvard_aanlib_ct_mri_2d")


@pytest.fixture(scope="session")
def rire_mr_path(data_dir: Path) -> Path:
    return require(data_dir / "rire_training_001_mr_t1_only" / "training_001_mr_T1.mha")


@pytest.fixture(scope="session")
def vh_dir(data_dir: Path) -> Path:
    return require(data_dir / "visible_human_head_ct_mr")
