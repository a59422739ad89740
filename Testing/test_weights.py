"""Model files: safetensors with the config in its metadata, checksum verified before parsing, no pickle.

The format tests at the top need no PyTorch (they write files with ``safetensors.numpy`` and read them
with ``framework="numpy"``), so the Slicer-stack CI jobs without torch run them too; the rest import
torch through ``pytest.importorskip``.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from CTtoMRISynthesisLib.errors import CTMRIError
from CTtoMRISynthesisLib.weights import (
    FORMAT,
    SHIPPED_NAME,
    check_model_target,
    checksum_path,
    copy_model,
    default_weights_path,
    read_config,
    read_weights_file,
    save_state,
    sha256_of,
)

SHIPPED = REPO / "model_weights" / SHIPPED_NAME
CONFIG = {"model": {"base": 2, "levels": 3}, "preprocessing": {"size": 256, "ct_window": {"level": 45, "width": 140}}}
TENSORS = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "a.count": np.array(7, dtype=np.int64)}


def _with_checksum(path: Path) -> Path:
    checksum_path(path).write_text(f"{sha256_of(path)}  {path.name}\n")
    return path


def _raw_safetensors(path: Path, metadata) -> Path:
    """A valid safetensors file with arbitrary metadata (what another tool could write)."""
    from safetensors.numpy import save_file

    save_file(TENSORS, str(path), metadata=metadata)
    return _with_checksum(path)


# --------------------------------------------------------------------------- format (no torch needed)


def test_round_trip_without_torch(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    digest = save_state(path, TENSORS, CONFIG)
    assert checksum_path(path).read_text() == f"{digest}  m.safetensors\n" and digest == sha256_of(path)
    blob = read_weights_file(path, framework="numpy")
    assert blob["config"] == CONFIG and blob["format"] == FORMAT and blob["sha256"] == digest
    assert set(blob["state_dict"]) == set(TENSORS)
    for key, value in TENSORS.items():
        assert blob["state_dict"][key].dtype == value.dtype
        np.testing.assert_array_equal(blob["state_dict"][key], value)
    assert read_config(path) == CONFIG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.safetensors.sha256"]


def test_checksum_mismatch_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_state(path, TENSORS, CONFIG)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one tensor byte: the file still parses, only the checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(CTMRIError, match=r"does not match its recorded sha256.*copy it again from where it came from"):
        read_weights_file(path, framework="numpy")
    path.write_bytes(b"\xff" * 100)  # garbage: still the checksum message, the header is never read
    with pytest.raises(CTMRIError, match="does not match its recorded sha256"):
        read_config(path)


def test_missing_checksum_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_state(path, TENSORS, CONFIG)
    checksum_path(path).unlink()
    with pytest.raises(CTMRIError, match="no checksum file m.safetensors.sha256"):
        read_weights_file(path, framework="numpy")
    checksum_path(path).write_text("not a digest\n")
    with pytest.raises(CTMRIError, match="does not hold a sha256 digest"):
        read_config(path)
    checksum_path(path).write_text("z" * 64 + "  m.safetensors\n")  # 64 characters, not hex digits
    with pytest.raises(CTMRIError, match="does not hold a sha256 digest"):
        read_config(path)
    with pytest.raises(CTMRIError, match="weights file not found"):
        read_config(tmp_path / "nope.safetensors")


@pytest.mark.parametrize(
    "content, why",
    [
        (b"", "only 0 bytes"),
        (b"hello, I am a text file that is not a model at all", "no valid header length"),
        (struct.pack("<Q", 5) + b"{nope" + b"\0" * 8, "header is not JSON"),
        (struct.pack("<Q", 2) + b"[]" + b"\0" * 8, "not a JSON object"),
        # a header whose tensor points past the end of the file: the safetensors library refuses it
        (lambda: _lying_header(), "SafetensorError"),
    ],
)
def test_a_file_that_is_not_safetensors_is_refused(tmp_path: Path, content, why: str) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(content() if callable(content) else content)
    _with_checksum(path)
    with pytest.raises(CTMRIError, match=f"not a safetensors model file.*{why}"):
        read_weights_file(path, framework="numpy")


def _lying_header() -> bytes:
    header = json.dumps({"__metadata__": {"format": FORMAT, "config": json.dumps(CONFIG)},
                         "w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 16


def test_other_safetensors_and_metadata_without_config_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CTMRIError, match="not a CTtoMRISynthesis model"):
        read_weights_file(_raw_safetensors(tmp_path / "other.safetensors", None), framework="numpy")
    with pytest.raises(CTMRIError, match="not a CTtoMRISynthesis model .format 'ctmri-unet-v1'"):
        read_config(_raw_safetensors(tmp_path / "v1.safetensors", {"format": "ctmri-unet-v1", "config": "{}"}))
    for name, metadata in [("none", {"format": FORMAT}), ("text", {"format": FORMAT, "config": "not json"}),
                           ("list", {"format": FORMAT, "config": "[1, 2]"}),
                           ("nomodel", {"format": FORMAT, "config": json.dumps({"preprocessing": {}})})]:
        with pytest.raises(CTMRIError, match="holds no model config in its metadata"):
            read_weights_file(_raw_safetensors(tmp_path / f"{name}.safetensors", metadata), framework="numpy")


def test_pickles_are_refused_without_unpickling(tmp_path: Path) -> None:
    """An old-format (pickle) file gets the conversion command; its payload never runs."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as handle:
        pickle.dump({"format": "ctmri-unet-v1", "config": CONFIG, "state_dict": _Exploit(marker)}, handle)
    _with_checksum(evil)  # even with a correct checksum beside it
    with pytest.raises(CTMRIError, match="never unpickled.*weights convert .*evil.pt .*evil.safetensors"):
        read_weights_file(evil, framework="numpy")
    assert not marker.exists()


def test_a_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path: Path) -> None:
    """A 640-byte header's length begins 0x80 0x02, as a protocol-2 pickle does: read as the model it is."""
    path = tmp_path / "m.safetensors"
    for pad in range(0, 800, 8):  # safetensors pads the header to a multiple of 8
        config = {**CONFIG, "note": "x" * pad}
        save_state(path, TENSORS, config)
        if path.read_bytes()[:2] == b"\x80\x02":
            break
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert read_weights_file(path, framework="numpy")["config"] == config


def test_no_half_written_file_on_failure(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        save_state(tmp_path / "bad.safetensors", TENSORS, {"x": object()})
    with pytest.raises(CTMRIError, match="must end in .safetensors"):
        save_state(tmp_path / "bad.pt", TENSORS, CONFIG)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rename_leaves_no_temporary_file(tmp_path: Path) -> None:
    """The model file is written beside its place and renamed; when the rename fails (here the name is taken by a
    folder) the temporary file goes too (the other failures happen before anything is written)."""
    taken = tmp_path / "model.safetensors"
    (taken / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        save_state(taken, TENSORS, CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_digest_written_in_capitals_is_the_same_digest(tmp_path: Path) -> None:
    """Some tools (PowerShell's Get-FileHash) write the sha256 in capitals."""
    path = tmp_path / "m.safetensors"
    digest = save_state(path, TENSORS, CONFIG)
    checksum_path(path).write_text(f"{digest.upper()}  m.safetensors\n")
    assert read_weights_file(path, framework="numpy")["sha256"] == digest


def test_a_model_config_without_preprocessing_is_refused_at_load(tiny_weights: Path, tmp_path: Path) -> None:
    """Without its preprocessing section (the CT window, the grid) the model would fail later with a KeyError."""
    pytest.importorskip("torch")
    from CTtoMRISynthesisLib.weights import load_model

    blob = read_weights_file(tiny_weights, framework="numpy")
    config = {k: v for k, v in blob["config"].items() if k != "preprocessing"}
    save_state(tmp_path / "m.safetensors", blob["state_dict"], config)
    with pytest.raises(CTMRIError, match="has no 'preprocessing' section in its config; retrain"):
        load_model(tmp_path / "m.safetensors", "cpu")


def test_copy_checks_the_source_and_writes_the_copy_with_its_checksum(tmp_path: Path) -> None:
    """``ctmri train --save``: the copy reads back as the same model; a source that no longer matches its
    .sha256 is refused and nothing is written."""
    source = tmp_path / "run" / "model.safetensors"
    digest = save_state(source, TENSORS, CONFIG)
    assert copy_model(source, tmp_path / "out" / "m.safetensors") == digest
    copied = read_weights_file(tmp_path / "out" / "m.safetensors", framework="numpy")
    assert copied["sha256"] == digest and copied["config"] == CONFIG
    assert checksum_path(tmp_path / "out" / "m.safetensors").read_text() == f"{digest}  m.safetensors\n"
    source.write_bytes(source.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CTMRIError, match="does not match its recorded sha256"):
        copy_model(source, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists() and not checksum_path(tmp_path / "bad.safetensors").exists()


def test_a_model_file_is_written_only_over_a_model_file(tmp_path: Path) -> None:
    """``train --save``, ``weights ensemble``/``member`` and ``error_model --out`` replaced any file of the name
    given (an image, a report, the checksum of another file) without a word: only a ctmri model file, or
    nothing, may be replaced; a safetensors file of another tool is not one."""
    check_model_target(tmp_path / "new.safetensors", "--save")  # nothing there: fine
    model = tmp_path / "old.safetensors"
    save_state(model, TENSORS, CONFIG)
    check_model_target(model, "--save")  # a model file of ours: may be replaced
    image = tmp_path / "ct.safetensors"
    image.write_bytes(b"\x5c\x01\x00\x00" + bytes(400))  # e.g. a NIfTI header under a wrong name
    foreign = _raw_safetensors(tmp_path / "other.safetensors", {"format": "pt"})
    (tmp_path / "stray.safetensors.sha256").write_text("my notes\n")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder.safetensors").mkdir()
    for target, said in ((image, "exists and is not a ctmri model file"), (foreign, "is not a ctmri model file"),
                         (tmp_path / "stray.safetensors", "is not a sha256 record"),
                         (tmp_path / "afile" / "m.safetensors", "is a file, not a folder"),
                         (tmp_path / "folder.safetensors", "is a folder"),
                         (tmp_path / "m.pt", "must end in .safetensors"),
                         (model, "is the model file it is made from")):
        with pytest.raises(CTMRIError, match=said):
            check_model_target(target, "--save", source=model if target == model else None)


def test_shipped_model_file_and_its_config_without_torch(monkeypatch) -> None:
    """The shipped file is where default_weights_path() looks, checksummed, and describes itself."""
    monkeypatch.delenv("CTMRI_WEIGHTS", raising=False)
    assert default_weights_path() == SHIPPED
    assert SHIPPED.read_bytes()[8:9] == b"{"  # safetensors, not a pickle
    config = read_config(SHIPPED)
    assert config["model"]["in_channels"] == 1 and config["preprocessing"]["size"] == 256
    assert config["metrics"]["cross_validation"]["summary"]["model"]["mae"]["n"] == 8
    arrays = read_weights_file(SHIPPED, framework="numpy")["state_dict"]
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    members = config["model"].get("members", 1)  # the shipped model is an ensemble (ensemble.py)
    assert members == len(config["ensemble"]) == 4 and all(len(m["sha256"]) == 64 for m in config["ensemble"])
    # since round 5: no member trained on patient 2, whose MRI is FLAIR/PD-like, not T2 (model_weights/README.md)
    assert config["split"]["excluded_from_training"] == ["2"] and "2" not in config["split"]["train_cases"]
    assert all("2" not in m["split"]["train_cases"] for m in config["ensemble"])
    assert config["error_model"]["excluded_from_training"] == ["2"] and "2" not in config["error_model"]["trained_on"]
    total = sum(a.size for k, a in arrays.items() if not k.endswith(buffers) and k.startswith("members."))
    assert total == members * config["training"]["parameters"]  # "parameters" is each member's count
    # besides the members, only the error model (error_model.py): 10 → 32 → 32 → 1 and its standardisation
    others = {k: a.size for k, a in arrays.items() if not k.startswith("members.")}
    assert all(k.startswith("error_model.") for k in others) and sum(others.values()) == 1441 + 20


def test_readme_names_the_patients_the_shipped_model_was_trained_on() -> None:
    """Metrics of the shipped model on the Harvard pictures it was trained on are in-sample (optimistic), and no
    warning can tell such pictures reliably (a file name is not the data; ``evaluate`` does not know the model):
    the README says so near the quick start, naming exactly the training patients of the model file's config."""
    config = read_config(SHIPPED)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.find("**Scores on the training data are in-sample.**")
    assert 0 < start < readme.index("### A folder of exported slices"), "no in-sample note in the quick start"
    note = " ".join(readme[start:readme.index("\n\n", start)].split())
    named = re.search(r"of patients ([0-9, and]+) \(", note)
    assert named is not None, note
    assert sorted(re.findall(r"\d+", named.group(1)), key=int) == sorted(config["split"]["train_cases"], key=int)
    for case in config["split"]["excluded_from_training"]:
        assert f"Patient {case} was not trained on" in note


def _ours_row(markdown: str) -> str:
    """The "**U-Net (ours)**" row of a cross-validation summary table."""
    rows = [line for line in markdown.splitlines() if line.startswith("| **U-Net (ours)** |")]
    assert len(rows) == 1, "exactly one summary row for the model"
    return rows[0]


def test_model_card_and_readme_describe_the_shipped_file() -> None:
    """Card header (size, sha256) and both results tables match the file and its report, so that a
    retrained model cannot ship with the previous model's numbers."""
    card = (REPO / "model_weights" / "README.md").read_text(encoding="utf-8")
    header = next(line for line in card.splitlines() if line.startswith("| file |"))
    digest = (SHIPPED.parent / (SHIPPED.name + ".sha256")).read_text().split()[0]
    assert f"({SHIPPED.stat().st_size:,} bytes)" in header and f"`{digest[:8]}…`" in header, header
    report = (REPO / "model_weights" / "report" / "report.md").read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert _ours_row(card) == _ours_row(readme) == _ours_row(report)
    mae = read_config(SHIPPED)["metrics"]["cross_validation"]["summary"]["model"]["mae"]["mean"]
    assert f"| **U-Net (ours)** | {mae:.2f} (" in _ours_row(report)


class _Exploit:
    """Unpickling this would create a marker file (what a malicious model file could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ------------------------------------------------------------------------------------ with torch


@pytest.fixture()
def torch():
    return pytest.importorskip("torch")


@pytest.fixture()
def small_file(tmp_path: Path, torch) -> Path:
    from CTtoMRISynthesisLib.model import UNet, UNetConfig
    from CTtoMRISynthesisLib.weights import save_weights

    path = tmp_path / "m.safetensors"
    torch.manual_seed(0)
    save_weights(path, UNet(UNetConfig(base=2, levels=3)), {**CONFIG, "model": UNetConfig(base=2, levels=3).to_dict()})
    return path


def test_round_trip_gives_identical_tensors(small_file: Path, torch) -> None:
    from CTtoMRISynthesisLib.weights import load_model

    loaded = load_model(small_file)
    stored = read_weights_file(small_file)["state_dict"]
    state = loaded.net.state_dict()
    assert set(state) == set(stored)
    for key, value in state.items():
        assert value.dtype == stored[key].dtype and torch.equal(value, stored[key])
    assert loaded.config["preprocessing"] == CONFIG["preprocessing"] and loaded.path == small_file


def test_tensor_shape_mismatch_is_refused(small_file: Path, tmp_path: Path, torch) -> None:
    """Tensors of one U-Net under the config of another: a clear error, not a crash."""
    from CTtoMRISynthesisLib.weights import load_model

    blob = read_weights_file(small_file)
    config = json.loads(json.dumps(blob["config"]))
    config["model"]["base"] = 4
    other = tmp_path / "other.safetensors"
    save_state(other, blob["state_dict"], config)
    with pytest.raises(CTMRIError, match="does not match the U-Net its config describes.*size mismatch"):
        load_model(other)
    state = dict(blob["state_dict"])
    state.pop(sorted(state)[0])
    save_state(other, state, blob["config"])
    with pytest.raises(CTMRIError, match="does not match the U-Net.*Missing key"):
        load_model(other)


def test_shipped_weights_load_when_torch_reports_2_8(monkeypatch, torch) -> None:
    """PyTorch 2.8 is the newest Python 3.9 (Slicer 5.6/5.8) can have: nothing gates on the version."""
    from CTtoMRISynthesisLib.weights import load_model

    calls = []
    monkeypatch.setattr(torch, "__version__", "2.8.0")
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a))  # nothing may unpickle
    monkeypatch.delenv("CTMRI_WEIGHTS", raising=False)
    loaded = load_model(None)
    assert loaded.path == SHIPPED and calls == []
    x = torch.rand(2, loaded.in_channels, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y = loaded.net(x)
    assert y.shape == (2, loaded.config["model"]["out_channels"], 64, 64) and bool(torch.isfinite(y).all())


def test_shipped_path_default(monkeypatch, small_file: Path) -> None:
    from CTtoMRISynthesisLib.weights import load_model

    monkeypatch.setenv("CTMRI_WEIGHTS", str(small_file))
    assert load_model(None).path == small_file
    copy = small_file.with_name("copy.safetensors")
    shutil.copy(small_file, copy)  # a copy without its checksum is refused
    with pytest.raises(CTMRIError, match="no checksum"):
        load_model(copy)


# ------------------------------------------------------------------------- converting the old format


def _legacy_file(path: Path, torch, state, config) -> Path:
    torch.save({"format": "ctmri-unet-v1", "config": config, "state_dict": state}, path)
    return _with_checksum(path)


def test_convert_old_pt_gives_the_same_tensors(small_file: Path, tmp_path: Path, torch) -> None:
    from CTtoMRISynthesisLib.weights import load_model, main

    blob = read_weights_file(small_file)
    old = _legacy_file(tmp_path / "old.pt", torch, blob["state_dict"], blob["config"])
    with pytest.raises(CTMRIError, match="never unpickled.*convert"):
        load_model(old)
    new = tmp_path / "new.safetensors"
    assert main(["convert", str(old), str(new)]) == 0
    converted = read_weights_file(new)
    assert converted["config"] == blob["config"]
    for key, value in blob["state_dict"].items():
        assert torch.equal(converted["state_dict"][key], value) and converted["state_dict"][key].dtype == value.dtype
    assert load_model(new).config == blob["config"]
    assert main(["convert", str(old), str(new)]) == 2  # never overwrites


def test_convert_refuses_old_torch_and_payloads(small_file: Path, tmp_path: Path, torch, monkeypatch, capsys) -> None:
    from CTtoMRISynthesisLib.weights import convert_legacy, main

    blob = read_weights_file(small_file)
    old = _legacy_file(tmp_path / "old.pt", torch, blob["state_dict"], blob["config"])
    with monkeypatch.context() as patch:
        patch.setattr(torch, "__version__", "2.8.0")
        with pytest.raises(CTMRIError, match="PyTorch 2.8.0 cannot unpickle old model files safely.*2.10 or later"):
            convert_legacy(old, tmp_path / "new.safetensors")
    marker = tmp_path / "pwned"
    evil = _legacy_file(tmp_path / "evil.pt", torch, _Exploit(marker), blob["config"])
    assert main(["convert", str(evil), str(tmp_path / "evil.safetensors")]) == 2
    assert "never executed" in capsys.readouterr().err and not marker.exists()
    assert not (tmp_path / "evil.safetensors").exists()
    with pytest.raises(CTMRIError, match="nothing to convert"):
        convert_legacy(small_file, tmp_path / "again.safetensors")
