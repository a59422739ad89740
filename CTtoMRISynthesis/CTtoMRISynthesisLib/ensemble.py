"""Ensembles: several model files of one architecture and preprocessing made into one model file.

Why (issue 11, measured by leave-one-patient-out cross-validation, ``model_weights/README.md``): the mean
of U-Nets trained on different patients (``ctmri train --drop-patients 1 --seed K``) is closer to the
held-out patients' real MRI than its members on average, and where those members disagree the error is larger
(Spearman ≈ 0.1: weak, but the only map tried that never ran against the error; each member's own σ head
did). At inference (:func:`synthesis.predict_volume`) every member runs with its own flip averaging; the
synthetic MRI is the members' mean and the uncertainty map their SD (or, with an error model added by
:mod:`error_model`, the error it predicts from that SD and the prediction). Combining drops any error model
of the members: it was fit to one model's errors, not the ensemble's.

The file is an ordinary model file (:mod:`weights`): tensors ``members.<i>.<name>`` and a config that is
the members' shared one with ``model.members`` = their number, ``training`` holding a value where all
members agree and the list of values where they differ, ``split.train_cases`` the union of the patients
they saw (and ``split.excluded_from_training`` those every member excluded), and ``ensemble``: each member's file name, sha256, training, split and metrics.

    python -m CTtoMRISynthesisLib.weights ensemble OUT.safetensors MEMBER.safetensors MEMBER.safetensors [...]
    python -m CTtoMRISynthesisLib.weights member ENSEMBLE.safetensors K OUT.safetensors   # member K (1-based) back

Taking a member back out (:func:`extract`) gives the model file it was made from, tensors and the config's
training, split and metrics alike (the file's name and date aside): one network, a quarter of the time,
without the ensemble's uncertainty map; and a way to measure one member of a shipped ensemble.

Combining reads and writes tensors with numpy: it needs no PyTorch.
"""

from __future__ import annotations

import copy
from pathlib import Path

from .error_model import split_state
from .errors import CTMRIError
from .weights import check_model_target, read_config, read_weights_file, save_state

#: config sections that must be equal in every member: the same network applied the same way
SHARED = ("model", "preprocessing")


def _merged(values: list):
    """One value where all members agree, else the list of their values (in member order)."""
    return values[0] if all(v == values[0] for v in values) else values


def ensemble_config(configs: list[dict], names: list[str], digests: list[str]) -> dict:
    """The ensemble file's config from its members' configs (see the module docstring)."""
    first = configs[0]
    for section in SHARED:
        for name, config in zip(names[1:], configs[1:]):
            if config.get(section) != first.get(section):
                keys = sorted(k for k in set(first.get(section, {})) | set(config.get(section, {}))
                              if first.get(section, {}).get(k) != config.get(section, {}).get(k))
                raise CTMRIError(f"{name} differs from {names[0]} in its {section} ({', '.join(keys)}): "
                                 "an ensemble's members must be the same network applied the same way")
    config = copy.deepcopy(first)
    config.pop("error_model", None)  # fit to one model's errors, not the ensemble's: refit it (error_model.py)
    config["model"]["members"] = len(configs)
    trainings = [c.get("training", {}) for c in configs]
    keys = list(dict.fromkeys(k for t in trainings for k in t))
    config["training"] = {k: _merged([t.get(k) for t in trainings]) for k in keys}
    seen = [c.get("split", {}).get("train_cases", []) for c in configs]
    union = list(dict.fromkeys(cid for cases in seen for cid in cases))
    config["split"] = {"mode": f"ensemble of {len(configs)}", "train_cases": union, "val_cases": [], "test_cases": []}
    # patients every member was told never to train on (ctmri train --exclude-from-training) stay on record
    excluded = [set(c.get("split", {}).get("excluded_from_training", [])) for c in configs]
    never = [cid for cid in dict.fromkeys(c for e in excluded for c in sorted(e)) if all(cid in e for e in excluded)]
    if never:
        config["split"]["excluded_from_training"] = never
    config["metrics"] = {}
    config["ensemble"] = [
        {"file": name, "sha256": digest, "training": c.get("training"), "split": c.get("split"), "metrics": c.get("metrics")}
        for name, digest, c in zip(names, digests, configs)
    ]
    return config


def combine(member_paths: list, out_path) -> dict:
    """Write the ensemble of ``member_paths`` (each checked against its .sha256) to ``out_path``; return its config."""
    if len(member_paths) < 2:
        raise CTMRIError("an ensemble needs at least two member model files")
    _check_found(member_paths, "member model file")
    _check_target(out_path, member_paths)
    blobs = [read_weights_file(p, framework="numpy") for p in member_paths]
    names = [Path(p).name for p in member_paths]
    config = ensemble_config([b["config"] for b in blobs], names, [b["sha256"] for b in blobs])
    tensors = {f"members.{i}.{key}": value for i, b in enumerate(blobs)
               for key, value in split_state(b["state_dict"])[0].items()}
    save_state(out_path, tensors, config)
    return config


def _check_found(paths: list, what: str) -> None:
    """Name every missing input file at once (the generic message of a missing model speaks of --weights)."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise CTMRIError(f"{what}(s) not found: {', '.join(missing)}; check the path(s)")


def _check_target(out_path, member_paths: list) -> None:
    """Refuse to write the ensemble over one of its members, or over a model of its own: the slip
    ``ensemble RUN1/model.safetensors RUN2/model.safetensors RUN3/model.safetensors`` (the ensemble's name
    forgotten) would replace RUN1's model, hours of training, with an ensemble of the other two."""
    out = Path(out_path)
    if out.exists() and any(out.resolve() == Path(p).resolve() for p in member_paths):
        raise CTMRIError(f"{out} is one of the members; give the ensemble a file name of its own")
    check_model_target(out, "the ensemble's file")  # no other kind of file is replaced
    if out.exists() and not read_config(out, verify=False).get("ensemble"):
        raise CTMRIError(f"{out} is a model of its own, not an ensemble, and would be replaced: the ensemble's file name "
                         "comes first (ensemble OUT.safetensors MEMBER.safetensors …); give a new name, or move it away")


def extract(ensemble_path, index: int, out_path) -> dict:
    """Write member ``index`` (1-based) of the ensemble ``ensemble_path`` as a model file of its own; return its config."""
    _check_found([ensemble_path], "ensemble model file")
    check_model_target(out_path, "the member's file", source=ensemble_path)
    blob = read_weights_file(ensemble_path, framework="numpy")
    config = blob["config"]
    members = config.get("ensemble") or []
    if not members:
        raise CTMRIError(f"{ensemble_path} is not an ensemble (no members in its config)")
    if not 1 <= index <= len(members):
        raise CTMRIError(f"{ensemble_path} has members 1 to {len(members)}; there is no member {index}")
    prefix = f"members.{index - 1}."
    tensors = {k[len(prefix):]: v for k, v in split_state(blob["state_dict"])[0].items() if k.startswith(prefix)}
    record = members[index - 1]
    out = {k: copy.deepcopy(v) for k, v in config.items() if k not in ("ensemble", "error_model", "training", "split", "metrics")}
    out["model"].pop("members", None)
    out.update({"training": record.get("training") or {}, "split": record.get("split") or {},
                "metrics": record.get("metrics") or {},
                "extracted_from": {"file": Path(ensemble_path).name, "sha256": blob["sha256"], "member": index,
                                   "member_file": record.get("file"), "member_sha256": record.get("sha256")}})
    save_state(out_path, tensors, out)
    return out
