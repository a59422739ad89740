"""Model files: tensors plus a config (architecture, preprocessing, provenance), checked before loading.

A weights file ``NAME.safetensors`` is a `safetensors <https://github.com/huggingface/safetensors>`_
file: a JSON header listing each tensor's name, dtype, shape and byte range, then the raw tensor bytes.
Its header metadata holds ``{"format": "ctmri-unet-v2", "config": <the config as JSON>}``. Reading it
parses JSON and copies bytes; nothing is unpickled, so a model file cannot run code whatever the
installed PyTorch (no version gate is needed: any PyTorch the rest of the library runs on will do).
Before anything is parsed, the file's sha256 is compared with the one recorded beside it in
``NAME.safetensors.sha256``; the bytes that were checked are the bytes that are parsed (read once).

Files of the old format (``ctmri-unet-v1``: a ``torch.save`` pickle, ``NAME.pt``) are refused with the
command that converts them once: ``python -m CTtoMRISynthesisLib.weights convert OLD.pt NEW.safetensors``.
That converter is the only code here that unpickles, with ``torch.load(weights_only=True)``, and only
on a PyTorch whose weights-only unpickler has no known code-execution flaw (2.10 or later).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from .errors import CTMRIError, shortened
from .resources import first_present, model_candidates, not_installed

FORMAT = "ctmri-unet-v2"
SHIPPED_NAME = "ctmri_unet.safetensors"
SUFFIX = ".safetensors"

#: The pickle format this project wrote before (read only by :func:`convert_legacy`).
LEGACY_FORMAT = "ctmri-unet-v1"
#: ``torch.load(weights_only=True)`` could run code before 2.6 (CVE-2025-32434) and its unpickler could
#: corrupt memory before 2.10 (CVE-2026-24747): the one-off legacy conversion refuses older PyTorch.
LEGACY_MIN_TORCH = (2, 10)

_PICKLE_MAGIC = (b"PK\x03\x04",) + tuple(bytes([0x80, p]) for p in range(2, 6))  # torch.save's zip; a raw pickle
_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header (bytes)


@dataclass
class LoadedModel:
    """A ready-to-run model with the config it was trained under."""

    net: Any  # torch.nn.Module (kept untyped here so importing this module stays cheap)
    config: dict
    path: Path | None
    error_model: Any = None  # error_model.ErrorModel when the file carries one (its uncertainty map)
    sha256: Optional[str] = None  # of the bytes this model was built from (not of the file as it is later)

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
    return first_present(model_candidates(SHIPPED_NAME))


def missing_weights_message(path: Path, instead: str = "pass --weights with a model file, or set CTMRI_WEIGHTS "
                            "to one") -> str:
    """Why ``path`` cannot be loaded, and what to do: the shipped model's places when it was the default
    (``instead``: the other ways to give a model, as the caller offers them)."""
    env = os.environ.get("CTMRI_WEIGHTS")
    if env and Path(path) == Path(env):  # leaving --weights out takes this variable, not the shipped model
        return (f"weights file not found: {path}, named by CTMRI_WEIGHTS; set it to an existing {SUFFIX} file, "
                "or unset it to use the shipped model")
    candidates = model_candidates(SHIPPED_NAME)
    if not env and Path(path) in candidates:
        return not_installed("the shipped model", candidates) + f"; or {instead}"
    return f"weights file not found: {path}; pass --weights with an existing {SUFFIX} file " \
           "(or leave it out to use the shipped model)"


# ------------------------------------------------------------------------------------------ writing


def save_weights(path: str | Path, net: Any, config: dict) -> str:
    """Write ``net``'s tensors and ``config`` to ``path`` (``.safetensors``) plus its ``.sha256``; return
    the digest."""
    return save_state(path, net.state_dict(), config)


def check_not_an_input(target: str | Path, source: str | Path, flag: str = "the target") -> None:
    """Refuse to write a model file over the model file it is made from: the input would be lost (a slip such
    as ``member ENS 1 ENS`` or ``--out`` = ``--weights``); say to write a new name. Checked before any work."""
    target, source = Path(target), Path(source)
    if target.exists() and source.exists() and target.resolve() == source.resolve():
        raise CTMRIError(f"{flag} {target} is the model file it is made from, which would be replaced; "
                         "give a new file name (then move it over the old one if that is what you want)")


def check_model_target(target: str | Path, flag: str = "the target", source: str | Path | None = None) -> None:
    """Refuse, before any work, a model file name whose writing would lose something or fail late.

    Only a ctmri model file (or nothing) may be replaced: an existing file of another kind (an image, a
    document, a checkpoint) is refused, as is ``source`` itself (:func:`check_not_an_input`), a folder, a name
    not ending in ``.safetensors`` or one under a file. ``flag``: the option the messages name."""
    target = Path(target)
    if target.suffix != SUFFIX:
        raise CTMRIError(f"{flag} {target}: a model file name must end in {SUFFIX}; choose e.g. "
                         f"{target.with_suffix(SUFFIX).name}")
    if source is not None:
        check_not_an_input(target, source, flag)
    if target.is_dir():
        raise CTMRIError(f"{flag} {target} is a folder; give a file name ending in {SUFFIX}")
    parent = next((p for p in target.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise CTMRIError(f"{flag} {target} cannot be written: {parent} is a file, not a folder; choose another name")
    for path, what in ((target, "a ctmri model file"), (checksum_path(target), "a sha256 record")):
        if (path.exists() or path.is_symlink()) and not (_is_model_file(path) if path == target else _is_checksum_file(path)):
            raise CTMRIError(f"{flag}: {path} exists and is not {what}, and would be replaced; give a new file "
                             "name, or move that file away first")


def _is_model_file(path: Path) -> bool:
    """Whether ``path`` is a file with a ctmri model header (only the header is read; not checksum-verified)."""
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            size = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
            if not 2 <= size <= _MAX_HEADER:
                return False
            data = prefix + handle.read(size)
        _config_from_header(_header(data, path), path)
    except (OSError, CTMRIError):
        return False
    return True


def _is_checksum_file(path: Path) -> bool:
    """Whether ``path`` holds a sha256 record as :func:`save_state` writes it (small, a 64-hex-digit first word)."""
    try:
        if not path.is_file() or path.stat().st_size > 1000:
            return False
        return _digest_in(path.read_text()) is not None
    except (OSError, UnicodeDecodeError):
        return False


def _digest_in(text: str) -> Optional[str]:
    """The sha256 digest a checksum file's text starts with (64 hex digits, lower-cased), else None."""
    words = text.split()
    return words[0].lower() if words and re.fullmatch(r"[0-9a-fA-F]{64}", words[0]) else None


def save_state(path: str | Path, tensors: Mapping[str, Any], config: dict) -> str:
    """Write named tensors (torch tensors or numpy arrays) and ``config`` as a model file; return its sha256.

    Written to a temporary name first and renamed, so a crash never leaves a half-written model.
    """
    path = Path(path)
    if path.suffix != SUFFIX:
        raise CTMRIError(f"a model file name must end in {SUFFIX} (got {path.name}); choose e.g. "
                         f"{path.with_suffix(SUFFIX).name}")
    metadata = {"format": FORMAT, "config": json.dumps(config)}  # plain JSON data only: fails here, not at load
    blob = _serialise(tensors, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(blob).hexdigest()
    _write_atomically(path, blob)
    _write_atomically(checksum_path(path), f"{digest}  {path.name}\n".encode())
    return digest


def copy_model(source: str | Path, target: str | Path) -> str:
    """Copy a model file (checked against its .sha256 first) and its checksum to ``target``, written to a
    temporary name and renamed like every model file; return the digest."""
    source, target = Path(source), Path(target)
    data, digest = _read_checked_bytes(source, verify=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(target, data)
    _write_atomically(checksum_path(target), f"{digest}  {target.name}\n".encode())
    return digest


def _serialise(tensors: Mapping[str, Any], metadata: dict) -> bytes:
    """safetensors bytes of the tensors (torch or numpy; torch only imported when given torch tensors)."""
    if all(hasattr(value, "__array_interface__") for value in tensors.values()):
        from safetensors.numpy import save as save_numpy

        return save_numpy({k: _contiguous_array(v) for k, v in tensors.items()}, metadata=metadata)
    from safetensors.torch import save as save_torch

    return save_torch({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


def _contiguous_array(value: Any) -> Any:
    import numpy as np

    return np.ascontiguousarray(value)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ------------------------------------------------------------------------------------------ reading


def _recorded_checksum(path: Path) -> str:
    sidecar = checksum_path(path)
    if not sidecar.exists():
        raise CTMRIError(
            f"no checksum file {sidecar.name} beside {path}: a model is only loaded when its sha256 is "
            "recorded; use the shipped weights or a file written by `ctmri train`"
        )
    digest = _digest_in(sidecar.read_text())
    if digest is None:
        raise CTMRIError(f"{sidecar} does not hold a sha256 digest; rewrite it or retrain")
    return digest


def _read_checked_bytes(path: Path, verify: bool) -> tuple[bytes, str]:
    """The file's bytes and their sha256, after comparing it with the recorded one (the same bytes get parsed)."""
    if not path.is_file():
        raise CTMRIError(missing_weights_message(path))
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if verify:
        expected = _recorded_checksum(path)
        if actual != expected:
            raise CTMRIError(
                f"weights file {path.name} does not match its recorded sha256 (expected {expected[:12]}…, "
                f"got {actual[:12]}…): the file is corrupt or was altered; copy it again from where it came from (the "
                "shipped model: model_weights/ in the repository or the extension; your own: its ctmri train --out folder)"
            )
    return data, actual


def _header_size(data: bytes) -> int:
    """The length of a safetensors JSON header (the first 8 bytes, little-endian), 0 if implausible."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 10 else 0
    return size if 2 <= size <= min(_MAX_HEADER, len(data) - 8) else 0


def _is_pickle(data: bytes) -> bool:
    """A torch.save zip or a raw pickle (checked after safetensors: a header of 128 bytes also starts 0x80)."""
    return not (_header_size(data) and data[8:9] == b"{") and data.startswith(_PICKLE_MAGIC)


def _legacy_refusal(path: Path) -> CTMRIError:
    target = path.with_suffix(SUFFIX)
    return CTMRIError(
        f"{path.name} is a PyTorch pickle file (the old {LEGACY_FORMAT} format), which is never unpickled "
        f"here (pickled code could run); convert it once with `python -m CTtoMRISynthesisLib.weights convert "
        f"{path} {target}` (needs PyTorch 2.10 or later) and use the {SUFFIX} file it writes"
    )


def _not_safetensors(path: Path, why: str) -> CTMRIError:
    return CTMRIError(f"{path.name} is not a safetensors model file ({why}); use a {SUFFIX} file written by "
                      "`ctmri train`, or the shipped weights")


def _header(data: bytes, path: Path) -> dict:
    """The safetensors JSON header (8-byte little-endian length, then JSON), checked for shape, not trust."""
    if _is_pickle(data):
        raise _legacy_refusal(path)
    if len(data) < 10:
        raise _not_safetensors(path, f"only {len(data)} bytes")
    size = _header_size(data)
    if not size:
        raise _not_safetensors(path, "no valid header length")
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _not_safetensors(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "its header is not a JSON object")
    return header


def _config_from_header(header: dict, path: Path) -> dict:
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise CTMRIError(f"{path.name} is a safetensors file but not a CTtoMRISynthesis model (format {found!r}, "
                         f"{FORMAT!r} expected); use a file written by `ctmri train`, or the shipped weights")
    try:
        config = json.loads(metadata["config"])
    except (KeyError, TypeError, ValueError):
        config = None
    if not isinstance(config, dict) or "model" not in config:
        raise CTMRIError(f"{path.name} holds no model config in its metadata (architecture and preprocessing); "
                         "retrain with `ctmri train` or restore the file")
    return config


def read_config(path: str | Path, verify: bool = True) -> dict:
    """A model file's config, checksum verified, without reading its tensors (and without PyTorch)."""
    path = Path(path)
    data, _ = _read_checked_bytes(path, verify)
    return _config_from_header(_header(data, path), path)


def read_weights_file(path: str | Path, verify: bool = True, framework: str = "pt") -> dict:
    """Read a model file safely: checksum, then the safetensors header and tensors (no unpickling).

    Returns ``{"format", "config", "state_dict", "sha256"}`` with torch tensors (``framework="pt"``) or numpy
    arrays (``"numpy"``, which needs no PyTorch); ``sha256`` is that of the bytes read.
    """
    from safetensors import SafetensorError

    path = Path(path)
    data, digest = _read_checked_bytes(path, verify)
    config = _config_from_header(_header(data, path), path)
    if framework == "numpy":
        from safetensors.numpy import load as load_tensors
    elif framework == "pt":
        from safetensors.torch import load as load_tensors
    else:
        raise ValueError(f"framework must be 'pt' or 'numpy', not {framework!r}")
    try:
        state = load_tensors(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        detail = (str(exc).splitlines() or [""])[0]
        raise _not_safetensors(path, f"{type(exc).__name__}: {detail}") from exc
    return {"format": FORMAT, "config": config, "state_dict": state, "sha256": digest}


def load_model(path: str | Path | None = None, device: str = "cpu", verify: bool = True) -> LoadedModel:
    """Load a model file (default: the shipped one) onto ``device`` in eval mode."""
    from .error_model import from_state, split_state
    from .model import UNet, UNetConfig, UNetEnsemble

    path = Path(path) if path is not None else default_weights_path()
    blob = read_weights_file(path, verify=verify)
    config = blob["config"]
    unet_state, error_state = split_state(blob["state_dict"])
    if error_state and "error_model" not in config:
        raise CTMRIError(f"{path.name} carries error-model tensors but no 'error_model' config; use the shipped "
                         "weights or refit it with `python -m CTtoMRISynthesisLib.error_model`")
    error_model = from_state(config["error_model"], error_state) if "error_model" in config else None
    try:
        architecture = dict(config["model"])
        members = int(architecture.pop("members", 1))  # an ensemble file (ensemble.py): members.<i>.<tensor>
        unet_config = UNetConfig.from_dict(architecture)
        net = UNetEnsemble(unet_config, members) if members > 1 else UNet(unet_config)
        net.load_state_dict(unet_state, strict=True)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CTMRIError(
            f"{path.name} does not match the U-Net its config describes ({_first_detail(exc)}); "
            "the file is from another model or version: retrain or use the shipped weights"
        ) from exc
    for key in ("preprocessing",):
        if key not in config:
            raise CTMRIError(f"{path.name} has no {key!r} section in its config; retrain with `ctmri train`")
    net.eval().to(device)
    return LoadedModel(net=net, config=config, path=path, error_model=error_model, sha256=blob["sha256"])


def _first_detail(exc: BaseException, limit: int = 200) -> str:
    """The first informative line of an error (load_state_dict's first line is only a heading)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    line = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
    return shortened(line, limit)


# ------------------------------------------------------------------------------ old format, converted


def _check_torch_can_unpickle(version: str) -> None:
    """Refuse to unpickle with a PyTorch whose ``weights_only`` loader has known flaws (conversion only)."""
    match = re.match(r"(\d+)\.(\d+)", str(version))
    if match is None or (int(match.group(1)), int(match.group(2))) < LEGACY_MIN_TORCH:
        minimum = ".".join(map(str, LEGACY_MIN_TORCH))
        raise CTMRIError(
            f"PyTorch {version} cannot unpickle old model files safely (its weights_only loader can run code: "
            f"CVE-2025-32434, CVE-2026-24747); convert the file with PyTorch {minimum} or later (any machine), "
            f"then use the {SUFFIX} file here"
        )


def convert_legacy(source: str | Path, target: str | Path) -> str:
    """Convert an old ``ctmri-unet-v1`` pickle (with its ``.sha256``) to a model file; return the new sha256.

    The tensors are written unchanged (checked: the new file reads back bit-identical) with the same config.
    """
    import torch

    source, target = Path(source), Path(target)
    if target.suffix != SUFFIX:
        raise CTMRIError(f"the converted file's name must end in {SUFFIX}; choose e.g. {source.with_suffix(SUFFIX).name}")
    if target.exists():
        raise CTMRIError(f"{target} already exists; choose another name or remove it first")
    check_model_target(target, "the converted file")  # its .sha256 name free, no file in the way
    data, _ = _read_checked_bytes(source, verify=True)
    if not _is_pickle(data):
        raise CTMRIError(f"{source.name} is not an old PyTorch model file, so there is nothing to convert; "
                         "use it with --weights as it is")
    _check_torch_can_unpickle(torch.__version__)
    try:
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign pickle can fail in any way; none of its code runs
        raise CTMRIError(f"{source.name} is not a loadable old model file ({type(exc).__name__}); it may hold "
                         "code, which is never executed: use a file written by `ctmri train`") from exc
    ok = isinstance(blob, dict) and blob.get("format") == LEGACY_FORMAT and isinstance(blob.get("config"), dict)
    state = blob.get("state_dict") if ok else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CTMRIError(f"{source.name} is not a CTtoMRISynthesis model file (format {LEGACY_FORMAT!r} expected); "
                         "use a file written by `ctmri train`")
    digest = save_state(target, state, blob["config"])
    written = read_weights_file(target)
    same = written["config"] == blob["config"] and set(written["state_dict"]) == set(state) and all(
        written["state_dict"][k].dtype == v.dtype and torch.equal(written["state_dict"][k], v) for k, v in state.items()
    )
    if not same:  # never expected; a converted file that differs must not be left to be used
        target.unlink()
        checksum_path(target).unlink()
        raise CTMRIError(f"converting {source.name} did not reproduce its tensors; keep using the old file and report this")
    return digest


def main(argv: Optional[list] = None) -> int:
    """``python -m CTtoMRISynthesisLib.weights convert OLD.pt NEW.safetensors`` or
    ``… ensemble OUT.safetensors MEMBER.safetensors MEMBER.safetensors …`` or ``… member ENSEMBLE K OUT``
    (:mod:`ensemble`)."""
    parser = argparse.ArgumentParser(prog="python -m CTtoMRISynthesisLib.weights",
                                     description="CTtoMRISynthesis model files")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert an old .pt model (with its .pt.sha256) to .safetensors")
    convert.add_argument("source", help="old model file (ctmri-unet-v1, torch.save)")
    convert.add_argument("target", help=f"new model file ({SUFFIX}); its .sha256 is written beside it")
    ensemble = commands.add_parser("ensemble", help="make member model files into one ensemble model file")
    ensemble.add_argument("target", help=f"the ensemble model file to write ({SUFFIX}); its .sha256 beside it")
    ensemble.add_argument("members", nargs="+", help=f"member model files ({SUFFIX}, each with its .sha256)")
    member = commands.add_parser("member", help="write one member of an ensemble model file as a model file of its own")
    member.add_argument("source", help=f"the ensemble model file ({SUFFIX}, with its .sha256)")
    member.add_argument("index", type=int, help="which member, 1-based (the order of the ensemble's config)")
    member.add_argument("target", help=f"the model file to write ({SUFFIX}); its .sha256 beside it")
    args = parser.parse_args(argv)
    try:
        if args.command == "member":
            from .ensemble import extract

            config = extract(args.source, args.index, args.target)
            print(f"wrote {args.target}: member {args.index} of {args.source}, trained on "
                  f"{', '.join(config['split'].get('train_cases', []))}")
        elif args.command == "ensemble":
            from .ensemble import combine

            config = combine(args.members, args.target)
            print(f"wrote {args.target}: {config['model']['members']} members, trained on "
                  f"{', '.join(config['split']['train_cases'])}")
        else:
            digest = convert_legacy(args.source, args.target)
            print(f"wrote {args.target} (sha256 {digest}): the same tensors and config as {args.source}")
    except CTMRIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
