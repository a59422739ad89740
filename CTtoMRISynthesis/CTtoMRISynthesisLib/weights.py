"""Model files: a config (architecture, preprocessing, provenance) plus tensors, checked before loading.

A weights file ``NAME.pt`` is a ``torch.save`` of ``{"format": ..., "config": <JSON-able dict>,
"state_dict": <tensors>}``. It is read with ``torch.load(weights_only=True)``, which refuses anything
but tensors and plain containers, so a file cannot run code when loaded. Before that, its sha256 is
compared with the one recorded beside it in ``NAME.pt.sha256``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CTMRIError

FORMAT = "ctmri-unet-v1"
SHIPPED_NAME = "ctmri_unet.pt"

#: ``torch.load(weights_only=True)`` is only safe from this PyTorch on: before 2.6 it could run code
#: (CVE-2025-32434), before 2.10 its unpickler could corrupt memory (CVE-2026-24747, GHSA-63cw-57p8-fm3p).
MIN_SAFE_TORCH = (2, 10)


@dataclass
class LoadedModel:
    """A ready-to-run model with the config it was trained under."""

    net: Any  # torch.nn.Module (kept untyped here so importing this module stays cheap)
    config: dict
    path: Path | None

    @property
    def in_channels(self) -> int:
        return int(self.config["model"]["in_channels"])

    @property
    def size(self) -> int:
        return int(self.config["preprocessing"]["size"])


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_path(path: str | Path) -> Path:
    return Path(str(path) + ".sha256")


def default_weights_path() -> Path:
    """The shipped model: ``$CTMRI_WEIGHTS``, else ``model_weights/`` of the repository/extension."""
    env = os.environ.get("CTMRI_WEIGHTS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    candidates = [
        here.parent.parent / "model_weights" / SHIPPED_NAME,  # source checkout / editable install
        here.parent / "Resources" / "model_weights" / SHIPPED_NAME,  # installed Slicer extension
    ]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return candidates[0]


def save_weights(path: str | Path, net: Any, config: dict) -> str:
    """Write ``net``'s tensors and ``config`` to ``path`` plus its ``.sha256``; return the digest.

    Written to a temporary name first and renamed, so a crash never leaves a half-written model.
    """
    import torch

    json.dumps(config)  # the config must be plain JSON data: fail here, not at load time
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "config": config, "state_dict": state}, tmp)
    digest = sha256_of(tmp)
    os.replace(tmp, path)
    checksum_path(path).write_text(f"{digest}  {path.name}\n")
    return digest


def _recorded_checksum(path: Path) -> str:
    sidecar = checksum_path(path)
    if not sidecar.exists():
        raise CTMRIError(
            f"no checksum file {sidecar.name} beside {path}: a model is only loaded when its sha256 is "
            "recorded; use the shipped weights or a file written by `ctmri train`"
        )
    text = sidecar.read_text().split()
    if not text or len(text[0]) != 64:
        raise CTMRIError(f"{sidecar} does not hold a sha256 digest; rewrite it or retrain")
    return text[0].lower()


def read_weights_file(path: str | Path, verify: bool = True) -> dict:
    """Read a weights file safely (checksum, then ``weights_only`` load) and return its raw dict."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CTMRIError(f"weights file not found: {path}; pass --weights with an existing .pt file")
    if verify:
        expected = _recorded_checksum(path)
        actual = sha256_of(path)
        if actual != expected:
            raise CTMRIError(
                f"weights file {path.name} does not match its recorded sha256 (expected {expected[:12]}…, "
                f"got {actual[:12]}…): the file is corrupt or was altered; restore it from the repository"
            )
    _check_torch_is_safe(torch.__version__)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CTMRIError(
            f"{path.name} is not a loadable weights file ({type(exc).__name__}); it may hold code, which is "
            "never executed: use a file written by `ctmri train`"
        ) from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CTMRIError(f"{path.name} is not a CTtoMRISynthesis weights file (format {FORMAT!r} expected)")
    return blob


def _check_torch_is_safe(version: str) -> None:
    """Refuse to unpickle anything with a PyTorch whose ``weights_only`` loader has known flaws."""
    import re

    match = re.match(r"(\d+)\.(\d+)", str(version))
    if match is None or (int(match.group(1)), int(match.group(2))) < MIN_SAFE_TORCH:
        minimum = ".".join(map(str, MIN_SAFE_TORCH))
        raise CTMRIError(
            f"PyTorch {version} cannot load model files safely (its weights_only loader can run code: "
            f"CVE-2025-32434, CVE-2026-24747); update PyTorch to {minimum} or later"
        )


def load_model(path: str | Path | None = None, device: str = "cpu", verify: bool = True) -> LoadedModel:
    """Load a model file (default: the shipped one) onto ``device`` in eval mode."""
    from .model import UNet, UNetConfig

    path = Path(path) if path is not None else default_weights_path()
    blob = read_weights_file(path, verify=verify)
    config = blob["config"]
    try:
        net = UNet(UNetConfig.from_dict(config["model"]))
        net.load_state_dict(blob["state_dict"], strict=True)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CTMRIError(
            f"{path.name} does not match the U-Net its config describes ({str(exc).splitlines()[0]}); "
            "the file is from another model or version: retrain or use the shipped weights"
        ) from exc
    for key in ("preprocessing",):
        if key not in config:
            raise CTMRIError(f"{path.name} has no {key!r} section in its config; retrain with `ctmri train`")
    net.eval().to(device)
    return LoadedModel(net=net, config=config, path=path)
