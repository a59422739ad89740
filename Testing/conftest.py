"""Shared pytest fixtures: where the real data lives, and a skip-or-fail rule for when it is absent.

The data folder is ``$CTMRI_DATA`` or ``<repo>/../shared/data``. Tests needing it skip with a reason
on a machine without it, except under ``CTMRI_REQUIRE_DATA=1`` (set by ``.ci/run``), where they fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import phantoms

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


@pytest.fixture()
def scene():
    """A fresh real MRML scene (slicer-core), registered as ``slicer.mrmlScene`` for the test."""
    slicer = pytest.importorskip("slicer")
    previous = getattr(slicer, "mrmlScene", None)
    new = new_scene()
    slicer.mrmlScene = new
    yield new
    slicer.mrmlScene = previous


def new_scene():
    """A real MRML scene as Slicer's application has it: with its subject-hierarchy node.

    (Slicer creates that node at startup; plain slicer-core does not, and the module's outputs are
    filed in it, so a scene without one would gain it on the first run.)
    """
    import slicer

    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)
    return scene


def read_harvard_case(harvard: Path, case: str, modality: str):
    """A Harvard case's slices of one modality stacked into a (z, 256, 256) uint8 array."""
    import numpy as np
    import SimpleITK as sitk

    # A name is <case><3-digit slice>: "2004" is case 2, "20005" case 20 (a prefix glob would mix them).
    files = sorted(f for f in (harvard / modality).glob("*.png") if f.stem[:-3] == case)
    return np.stack([sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in files])


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A real (if small) model: a base-4 U-Net trained for a few dozen steps on phantom slice pairs.

    Needs no licensed data and keeps the tests independent of the shipped model; it is trained, saved
    and loaded through the same weights format as any other model (:func:`phantoms.train_tiny_model`).
    """
    pytest.importorskip("torch")  # absent only in the Slicer-stack CI jobs (.ci/run)
    return phantoms.train_tiny_model(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


# ------------------------------------------------------------------------------------------------
# Synthetic phantoms (Testing/phantoms.py): what runs on a fresh clone without the licensed data.
# Session-scoped and shared: tests must not modify them in place (SimpleITK operations return copies).


@pytest.fixture(scope="session")
def phantom_pair():
    """A Harvard-like co-registered pair of one synthetic patient as volumes: 8-bit windowed CT and T2 MRI
    (uint8, background 0), 256×256×20 at 0.9×0.9×5 mm, from below the ventricles to above them."""
    ct, mri = phantoms.slice_pair(seed=7, slices=20, first_z=-45.0)
    return phantoms.volume(ct), phantoms.volume(mri)


@pytest.fixture(scope="session")
def phantom_mr():
    """A RIRE-like 3D MR head: 256×256×26 at 1.25×1.25×4 mm, int16, the T2-like phantom ×4 (0..about 950)."""
    import SimpleITK as sitk

    reference = phantoms.grid((256, 256, 26), (1.25, 1.25, 4.0), centre=(2.0, -3.0, 5.0))
    return sitk.Cast(phantoms.mri_t2(reference, phantoms.Head.patient(3), seed=31) * 4.0, sitk.sitkInt16)


@pytest.fixture(scope="session")
def phantom_hu_ct():
    """A Visible-Human-like CT: 512×512×8 at 0.49×0.49×1 mm through the ventricles, stored as HU + 1024
    (int16, air about 24, no negative value), with a head holder behind the head."""
    reference = phantoms.grid((512, 512, 8), (0.48828125, 0.48828125, 1.0), centre=(0.0, 5.0, 12.0))
    return phantoms.stored_plus_1024(phantoms.ct_hu(reference, phantoms.Head.patient(5, holder=True), seed=51))


@pytest.fixture(scope="session")
def phantom_slices(tmp_path_factory) -> Path:
    """Harvard-like 2D training data: ``CT/`` and ``MRI/`` PNG slices of four synthetic patients, named
    ``<case><3-digit slice>`` as the Harvard folder is: cases "2" (``2004.png``…) and "20" (``20005.png``…)
    share their first two characters but are different patients. 6 slices each; case "20" is windowed
    brightly (its brain near 150 of 255, as Harvard case 20)."""
    cases = {
        "2": (phantoms.slice_pair(seed=2, slices=6, first_z=-10.0), 4),
        "16": (phantoms.slice_pair(seed=16, slices=6, first_z=-15.0), 3),
        "20": (phantoms.slice_pair(seed=20, slices=6, first_z=-5.0, window=(15.0, 100.0)), 5),
        "28": (phantoms.slice_pair(seed=28, slices=6, first_z=-20.0), 3),
    }
    root = tmp_path_factory.mktemp("phantom_slices")
    for case_id, (pair, first) in cases.items():
        phantoms.write_slice_folders(root, {case_id: pair}, first_slice=first)
    return root
