"""Model files: checksum verified before loading, tensors only, clear errors on any mismatch."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from CTtoMRISynthesisLib.errors import CTMRIError
from CTtoMRISynthesisLib.model import UNet, UNetConfig
from CTtoMRISynthesisLib.weights import checksum_path, load_model, save_weights, sha256_of

CONFIG = {"model": UNetConfig(base=2, levels=3).to_dict(), "preprocessing": {"size": 256, "ct_window": {"level": 45, "width": 140}}}


@pytest.fixture()
def small_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.pt"
    save_weights(path, UNet(UNetConfig(base=2, levels=3)), CONFIG)
    return path


def test_round_trip_gives_identical_tensors(small_file: Path) -> None:
    loaded = load_model(small_file)
    blob = torch.load(small_file, weights_only=True)
    for key, value in loaded.net.state_dict().items():
        assert torch.equal(value, blob["state_dict"][key])
    assert loaded.config == CONFIG
    assert checksum_path(small_file).read_text().split()[0] == sha256_of(small_file)


def test_altered_file_is_refused(small_file: Path) -> None:
    data = bytearray(small_file.read_bytes())
    data[-100] ^= 0xFF
    small_file.write_bytes(bytes(data))
    with pytest.raises(CTMRIError, match="does not match its recorded sha256"):
        load_model(small_file)


def test_missing_checksum_and_missing_file(small_file: Path, tmp_path: Path) -> None:
    checksum_path(small_file).unlink()
    with pytest.raises(CTMRIError, match="no checksum file"):
        load_model(small_file)
    with pytest.raises(CTMRIError, match="not found"):
        load_model(tmp_path / "nope.pt")


def test_other_architecture_is_refused(small_file: Path, tmp_path: Path) -> None:
    """Tensors of one U-Net under the config of another: a clear error, not a crash."""
    blob = torch.load(small_file, weights_only=True)
    blob["config"]["model"]["base"] = 4
    other = tmp_path / "other.pt"
    torch.save(blob, other)
    checksum_path(other).write_text(sha256_of(other) + "  other.pt\n")
    with pytest.raises(CTMRIError, match="does not match the U-Net"):
        load_model(other)


class _Exploit:
    """Unpickling this would create a marker file (what a malicious model file could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as handle:
        pickle.dump({"format": "ctmri-unet-v1", "config": CONFIG, "state_dict": _Exploit(marker)}, handle)
    # Even with a correct checksum beside it, the loader must not execute the payload.
    checksum_path(evil).write_text(sha256_of(evil) + "  evil.pt\n")
    with pytest.raises(CTMRIError, match="never executed"):
        load_model(evil)
    assert not marker.exists()
    # And the same file through torch.save's zip format.
    evil_zip = tmp_path / "evil_zip.pt"
    torch.save({"format": "ctmri-unet-v1", "config": CONFIG, "state_dict": _Exploit(marker)}, evil_zip)
    checksum_path(evil_zip).write_text(sha256_of(evil_zip) + "  evil_zip.pt\n")
    with pytest.raises(CTMRIError, match="never executed"):
        load_model(evil_zip)
    assert not marker.exists()


def test_not_a_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "dict.pt"
    torch.save({"hello": torch.zeros(2)}, path)
    checksum_path(path).write_text(sha256_of(path) + "  dict.pt\n")
    with pytest.raises(CTMRIError, match="not a CTtoMRISynthesis weights file"):
        load_model(path)


def test_no_half_written_file_on_failure(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        save_weights(tmp_path / "bad.pt", UNet(UNetConfig(base=2, levels=3)), {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_shipped_path_default(monkeypatch, small_file: Path) -> None:
    monkeypatch.setenv("CTMRI_WEIGHTS", str(small_file))
    assert load_model(None).path == small_file
    shutil.copy(small_file, small_file.with_name("copy.pt"))  # a copy without its checksum is refused
    with pytest.raises(CTMRIError, match="no checksum"):
        load_model(small_file.with_name("copy.pt"))
