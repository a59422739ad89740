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
def tiny_weights(harvard_dir: Path, tmp_path_factory) -> Path:
    """A real (if small) model: a base-4 U-Net trained for a few dozen steps on real Harvard pairs.

    Keeps the core tests independent of the shipped model; it is trained, saved and loaded through
    the same weights format as any other model.
    """
    import numpy as np
    import torch

    from CTtoMRISynthesisLib.model import UNet, UNetConfig
    from CTtoMRISynthesisLib.weights import save_weights

    torch.manual_seed(0)
    ct = np.concatenate([read_harvard_case(harvard_dir, c, "CT") for c in ("16", "20")]).astype(np.float32)
    mr = np.concatenate([read_harvard_case(harvard_dir, c, "MRI") for c in ("16", "20")]).astype(np.float32)
    x = torch.from_numpy(ct[:, None] / 255.0)
    y = torch.from_numpy(mr[:, None] / 255.0)
    config = UNetConfig(base=4)
    net = UNet(config)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        idx = torch.randint(0, len(x), (8,), generator=generator)
        loss = torch.nn.functional.mse_loss(net(x[idx]), y[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_weights(
        path,
        net,
        {
            "format_version": 1,
            "name": "test-tiny",
            "model": config.to_dict(),
            "preprocessing": {
                "size": 256,
                "context_slices": 0,
                "ct_window": {"level": 45.0, "width": 140.0},
                "mask_output": True,
                "head_threshold": 10,
            },
            "training": {"steps": 30, "final_loss": float(loss.detach())},
        },
    )
    return path
