"""Ensembles (ensemble.py): member files made into one model file, applied as the mean of the members'
predictions with their SD as the uncertainty, through the same loading, synthesis and report paths as one
model; mismatched or tampered members refused. The shipped model is such an ensemble.

Members are tiny phantom-trained models (``phantoms.train_tiny_model``, different seeds): no licensed data.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import phantoms
from CTtoMRISynthesisLib.ensemble import combine
from CTtoMRISynthesisLib.errors import CTMRIError
from CTtoMRISynthesisLib.weights import checksum_path, read_config, read_weights_file, save_state, sha256_of
from CTtoMRISynthesisLib.weights import main as weights_main

# Combining is numpy only and also runs in the Slicer-stack CI jobs (.ci/run); the rest needs PyTorch.
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")


def test_combining_needs_no_torch_and_merges_the_members_records(tmp_path):
    """Members as plain numpy model files (what a Slicer-stack Python can write and read): tensors renamed
    ``members.<i>.``, training values kept where equal and listed where not, the patients seen united."""
    paths = []
    members = [(0, ["16", "20", "28"], ["2", "7"]), (1, ["16", "28"], ["2"])]
    for i, (seed, seen, excluded) in enumerate(members):
        config = {"model": {"base": 4, "in_channels": 3}, "preprocessing": {"size": 256, "context_slices": 1},
                  "training": {"seed": seed, "loss": "mse"},
                  "split": {"train_cases": seen, "excluded_from_training": excluded}}
        paths.append(tmp_path / f"m{i}.safetensors")
        save_state(paths[-1], {"w": np.full(3, float(i), np.float32)}, config)
    config = combine(paths, tmp_path / "ens.safetensors")
    assert config["model"] == {"base": 4, "in_channels": 3, "members": 2}
    assert config["training"] == {"seed": [0, 1], "loss": "mse"}
    assert config["split"]["train_cases"] == ["16", "20", "28"] and config["metrics"] == {}
    assert config["split"]["excluded_from_training"] == ["2"]  # what every member excluded
    tensors = read_weights_file(tmp_path / "ens.safetensors", framework="numpy")["state_dict"]
    assert sorted(tensors) == ["members.0.w", "members.1.w"] and tensors["members.1.w"].tolist() == [1.0] * 3
    assert [m["sha256"] for m in read_config(tmp_path / "ens.safetensors")["ensemble"]] == [sha256_of(p) for p in paths]


def test_the_ensemble_is_never_written_over_a_member_or_a_model_of_its_own(tmp_path, capsys):
    """The slip ``ensemble RUN1/model RUN2/model RUN3/model`` (the ensemble's name forgotten) would replace RUN1's
    model with an ensemble of the other two: refused, every file as it was; an earlier ensemble is replaced."""
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"run{i}" / "model.safetensors")
        save_state(paths[-1], {"w": np.full(3, float(i), np.float32)}, {"model": {"base": 4}, "split": {}})
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert weights_main(["ensemble", *map(str, paths)]) == 2
    assert "is a model of its own, not an ensemble, and would be replaced" in capsys.readouterr().err
    with pytest.raises(CTMRIError, match="is one of the members"):
        combine(paths, paths[1])
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    combine(paths[:2], tmp_path / "ens.safetensors")
    combine(paths, tmp_path / "ens.safetensors")  # an ensemble's file: replaced
    assert read_config(tmp_path / "ens.safetensors")["model"]["members"] == 3
    image = tmp_path / "ct.safetensors"  # any other file of the name given: refused, as it was
    image.write_bytes(b"not a model")
    assert weights_main(["ensemble", str(image), *map(str, paths)]) == 2
    assert "exists and is not a ctmri model file" in capsys.readouterr().err
    assert weights_main(["member", str(tmp_path / "ens.safetensors"), "1", str(image)]) == 2
    assert "exists and is not a ctmri model file" in capsys.readouterr().err
    assert image.read_bytes() == b"not a model" and not checksum_path(image).exists()
    assert weights_main(["ensemble", str(tmp_path / "e.safetensors"), str(paths[0]), "run9/model.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "member model file(s) not found: run9/model.safetensors" in err and "--weights" not in err


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("members")
    return [phantoms.train_tiny_model(root / f"m{seed}.safetensors", steps=20, seed=seed) for seed in (0, 1, 2)]


@pytest.fixture(scope="module")
def ensemble_file(members, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ensemble") / "ens.safetensors"
    combine(members, out)
    return out


@needs_torch
def test_ensemble_predicts_the_members_mean_and_their_sd_as_uncertainty(members, ensemble_file):
    from CTtoMRISynthesisLib.model import UNetEnsemble
    from CTtoMRISynthesisLib.synthesis import predict_volume
    from CTtoMRISynthesisLib.weights import load_model

    ct, _ = phantoms.slice_pair(seed=5, slices=4, first_z=-10.0)
    loaded = load_model(ensemble_file)
    assert isinstance(loaded.net, UNetEnsemble) and len(loaded.net.members) == 3
    pred = predict_volume(loaded.net, ct.astype(np.float32), flip_tta=True)
    singles = [predict_volume(load_model(m).net, ct.astype(np.float32), flip_tta=True).mean for m in members]
    stack = np.stack(singles)
    np.testing.assert_allclose(pred.mean, stack.mean(0), atol=1e-3)
    np.testing.assert_allclose(pred.spread[pred.head], stack.std(0)[pred.head], atol=1e-3)
    assert pred.spread[pred.head].max() > 0.5  # the members do disagree somewhere
    assert not pred.mean[~pred.head].any() and not pred.spread[~pred.head].any()


@needs_torch
def test_ensemble_config_keeps_each_members_provenance(members, ensemble_file):
    config = read_config(ensemble_file)
    assert config["model"]["members"] == 3
    assert [e["sha256"] for e in config["ensemble"]] == [sha256_of(m) for m in members]
    assert [e["file"] for e in config["ensemble"]] == [m.name for m in members]
    assert config["preprocessing"] == read_config(members[0])["preprocessing"]
    assert config["split"]["mode"] == "ensemble of 3"
    tensors = read_weights_file(ensemble_file, framework="numpy")["state_dict"]
    assert {k.split(".")[1] for k in tensors} == {"0", "1", "2"}
    one = read_weights_file(members[1], framework="numpy")["state_dict"]
    for key, value in one.items():  # member 1's tensors byte for byte
        np.testing.assert_array_equal(tensors[f"members.1.{key}"], value)


@needs_torch
def test_members_must_match_and_be_intact(members, tmp_path):
    blob = read_weights_file(members[1], framework="numpy")
    other = dict(blob["config"], preprocessing=dict(blob["config"]["preprocessing"], context_slices=1))
    odd = tmp_path / "odd.safetensors"
    save_state(odd, blob["state_dict"], other)
    with pytest.raises(CTMRIError, match="preprocessing.*context_slices"):
        combine([members[0], odd], tmp_path / "x.safetensors")
    with pytest.raises(CTMRIError, match="at least two"):
        combine(members[:1], tmp_path / "x.safetensors")
    tampered = tmp_path / "t.safetensors"
    data = bytearray(members[2].read_bytes())
    data[-5] ^= 0xFF
    tampered.write_bytes(bytes(data))
    Path(str(tampered) + ".sha256").write_text(Path(str(members[2]) + ".sha256").read_text())
    with pytest.raises(CTMRIError, match="sha256|checksum"):
        combine([members[0], tampered], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    assert weights_main(["ensemble", str(tmp_path / "y.safetensors"), str(members[0])]) == 2
    assert weights_main(["ensemble", str(tmp_path / "y.safetensors"), str(members[0]), str(members[1])]) == 0
    from CTtoMRISynthesisLib.weights import load_model

    assert load_model(tmp_path / "y.safetensors").config["model"]["members"] == 2


@needs_torch
def test_cv_report_of_several_runs_is_their_ensemble(phantom_slices, tmp_path):
    """``ctmri report --from-cv RUN RUN``: each held-out patient's prediction is the mean of the runs',
    the uncertainty their SD; the report's numbers are those of that mean."""
    import csv

    from CTtoMRISynthesisLib.cli import main as ctmri
    from CTtoMRISynthesisLib.intensity import CTWindow
    from CTtoMRISynthesisLib.metrics import compute_metrics
    from CTtoMRISynthesisLib.training.discovery import discover

    runs = phantoms.tiny_cv_runs(phantom_slices, tmp_path)
    out = tmp_path / "report"
    assert ctmri(["report", "--data", str(phantom_slices), "--from-cv", *map(str, runs), "--out", str(out)]) == 0
    case = discover([phantom_slices], CTWindow(45.0, 120.0))[0]
    syn = []
    for run in runs:
        with np.load(next(run.glob(f"fold*/pred_{case.case_id}.npz"))) as blob:
            syn.append(blob["syn"])
    expected = compute_metrics(case.mri, np.mean(syn, axis=0))["mae"]
    with open(out / "per_patient.csv") as fh:
        row = next(r for r in csv.DictReader(fh) if r["patient"] == case.case_id and r["method"] == "model")
    assert float(row["mae"]) == pytest.approx(expected, rel=1e-4)
    assert row["unc_spearman"] not in ("", None)
    assert "ensemble of" in (out / "report.md").read_text()


@needs_torch
def test_cv_report_baselines_leave_out_what_the_runs_excluded(phantom_slices, tmp_path):
    """Runs trained with ``--exclude-from-training 2``: the ensemble report still scores patient 2, and fits
    every patient's lookup table on the other patients less patient 2 (the models never saw it either)."""
    import csv

    from CTtoMRISynthesisLib.cli import main as ctmri
    from CTtoMRISynthesisLib.intensity import CTWindow
    from CTtoMRISynthesisLib.metrics import compute_metrics
    from CTtoMRISynthesisLib.training.discovery import discover
    from CTtoMRISynthesisLib.training.report import fit_lookup_table, predict_lookup_table

    runs = phantoms.tiny_cv_runs(phantom_slices, tmp_path, extra=("--exclude-from-training", "2"))
    out = tmp_path / "report"
    assert ctmri(["report", "--data", str(phantom_slices), "--from-cv", *map(str, runs), "--out", str(out)]) == 0
    cases = {c.case_id: c for c in discover([phantom_slices], CTWindow(45.0, 120.0))}
    with open(out / "per_patient.csv") as fh:
        rows = {(r["patient"], r["method"]): r for r in csv.DictReader(fh)}
    assert ("2", "model") in rows  # scored, though no model trained on it
    for held in cases:  # each fold's record alone would not do: a fold holding 2 out records no exclusion
        others = [c for k, c in cases.items() if k not in (held, "2")]
        expected = compute_metrics(cases[held].mri, predict_lookup_table(fit_lookup_table(others), cases[held].ct))
        assert float(rows[(held, "lookup_table")]["mae"]) == pytest.approx(expected["mae"], rel=1e-4)
    with_2 = fit_lookup_table([c for k, c in cases.items() if k != "16"])
    assert float(rows[("16", "lookup_table")]["mae"]) != pytest.approx(
        compute_metrics(cases["16"].mri, predict_lookup_table(with_2, cases["16"].ct))["mae"], rel=1e-4)
    assert "less 2 (excluded from the models' training)" in (out / "report.md").read_text()


def test_a_member_taken_back_out_is_the_file_it_was_made_from(tmp_path, capsys):
    """``weights member ENS K OUT``: member K's tensors and its training, split and metrics records; numpy
    only (Slicer-stack jobs too); a file that is not an ensemble, or a member that is not there, refused."""
    paths = []
    for i in range(3):
        config = {"model": {"base": 4, "in_channels": 3}, "preprocessing": {"size": 256, "context_slices": 1},
                  "training": {"seed": i, "loss": "mse"}, "split": {"train_cases": ["16", "20", "28"][: i + 1]},
                  "metrics": {"val_mae": 40.0 + i}}
        paths.append(tmp_path / f"m{i}.safetensors")
        save_state(paths[-1], {"w": np.full(3, float(i), np.float32), "b": np.arange(2, dtype=np.int64) + i}, config)
    combine(paths, tmp_path / "ens.safetensors")
    assert weights_main(["member", str(tmp_path / "ens.safetensors"), "2", str(tmp_path / "back.safetensors")]) == 0
    assert "member 2" in capsys.readouterr().out
    back = read_weights_file(tmp_path / "back.safetensors", framework="numpy")  # its .sha256 was written and matches
    original = read_weights_file(paths[1], framework="numpy")
    assert sorted(back["state_dict"]) == ["b", "w"]
    for key, value in original["state_dict"].items():
        np.testing.assert_array_equal(back["state_dict"][key], value)
    for section in ("model", "preprocessing", "training", "split", "metrics"):
        assert back["config"][section] == original["config"][section]
    assert back["config"]["extracted_from"]["member_sha256"] == sha256_of(paths[1])
    assert weights_main(["member", str(tmp_path / "ens.safetensors"), "4", str(tmp_path / "x.safetensors")]) == 2
    assert "members 1 to 3" in capsys.readouterr().err
    assert weights_main(["member", str(paths[0]), "1", str(tmp_path / "y.safetensors")]) == 2
    assert "not an ensemble" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
    ensemble_bytes = (tmp_path / "ens.safetensors").read_bytes()
    assert weights_main(["member", str(tmp_path / "ens.safetensors"), "1", str(tmp_path / "ens.safetensors")]) == 2
    assert "is the model file it is made from" in capsys.readouterr().err  # the slip that would lose the ensemble
    assert (tmp_path / "ens.safetensors").read_bytes() == ensemble_bytes


@needs_torch
def test_the_shipped_models_first_member_predicts_as_a_model_of_its_own(tmp_path):
    """Member 1 of the shipped ensemble, taken out, loads as a single U-Net of the shipped architecture."""
    from CTtoMRISynthesisLib.ensemble import extract
    from CTtoMRISynthesisLib.weights import default_weights_path, load_model

    config = extract(default_weights_path(), 1, tmp_path / "member1.safetensors")
    loaded = load_model(tmp_path / "member1.safetensors")
    assert type(loaded.net).__name__ == "UNet" and "members" not in config["model"]
    assert config["split"]["train_cases"] == read_config(default_weights_path())["ensemble"][0]["split"]["train_cases"]


@needs_torch
def test_for_inference_folds_the_batch_norms_on_a_copy_with_the_same_output():
    """model.for_inference (what synthesis runs): every batch norm folded into its convolution, the output the
    same to float rounding, on a copy: the network given keeps its batch norms, tensors and training mode (a
    training run predicts its validation patients with it and trains on)."""
    import torch

    from CTtoMRISynthesisLib.model import UNet, UNetConfig, UNetEnsemble, for_inference

    torch.manual_seed(0)
    for net in (UNet(UNetConfig(base=4, levels=3)), UNetEnsemble(UNetConfig(base=4, levels=3), 2)):
        for module in net.modules():  # batch norms that do something: learnt statistics and affine parameters
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.2, 0.2)
        net.train()
        before = {k: v.clone() for k, v in net.state_dict().items()}
        folded = for_inference(net)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        assert not folded.training and net.training
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
        x = torch.rand(3, 1, 32, 32)
        with torch.inference_mode():
            want, got = net.eval()(x), folded(x)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), float((got - want).abs().max())
    wrapper = torch.nn.Sequential(UNet(UNetConfig(base=4, levels=3))).train()  # not one of ours: run as given
    assert for_inference(wrapper) is wrapper and not wrapper.training
