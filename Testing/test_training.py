"""Trainer: pair discovery (2D slice folders and registered 3D cases), patient-level splits, training
that lowers the loss and writes a loadable weights file, resume, torchrun/DDP on CPU, and the report.

Everything runs on synthetic head phantoms (``phantoms.py``: Harvard-like slice folders of four patients,
a 3D CT/MR case with a known motion) with tiny models and few steps, so it needs no licensed data and stays
well under two minutes on two cores; discovery of the real Harvard folder is checked too where it is there.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CTtoMRISynthesisLib.errors import CTMRIError
from CTtoMRISynthesisLib.intensity import CTWindow
from CTtoMRISynthesisLib.training import discovery, split
from CTtoMRISynthesisLib.training.dataset import Augment, SliceDataset
from CTtoMRISynthesisLib.training.loop import TrainSettings, train

REPO = Path(__file__).resolve().parents[1]
WINDOW = CTWindow(45.0, 120.0)
# Discovery, splits and the baselines need no PyTorch and run in the Slicer-stack CI jobs too (.ci/run);
# the main job has torch, so there these never skip.
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")


def _tiny_settings(**kw) -> TrainSettings:
    values = dict(epochs=2, base=4, context=1, lr=3e-3, num_workers=0, max_steps=3, device="cpu",
                  augment=Augment(enabled=False), threads=1, window=WINDOW)
    values.update(kw)
    return TrainSettings(**values)


@pytest.fixture(scope="module")
def harvard_cases(harvard_dir):
    return discovery.discover([harvard_dir], WINDOW)


@pytest.fixture(scope="module")
def cases(phantom_slices):
    """Four synthetic patients "2", "16", "20", "28" (6 slices each) in the Harvard layout and naming."""
    return discovery.discover([phantom_slices], WINDOW)


@pytest.fixture(scope="module")
def small_2d_dir(phantom_slices, tmp_path_factory) -> Path:
    """Two patients, five slices each, copied into the 2D layout (for torchrun and the CLI)."""
    root = tmp_path_factory.mktemp("small2d")
    for sub in ("CT", "MRI"):
        (root / sub).mkdir()
    names = sorted(p.name for p in (phantom_slices / "CT").glob("16*.png"))[:5]
    names += sorted(p.name for p in (phantom_slices / "CT").glob("28*.png"))[:5]
    for name in names:
        for sub in ("CT", "MRI"):
            shutil.copyfile(phantom_slices / sub / name, root / sub / name)
    return root


# ------------------------------------------------------------------------------------------ discovery
def test_discover_2d_slice_folders(cases, phantom_slices):
    ids = [c.case_id for c in cases]
    # "2004.png" (case 2) and "20005.png" (case 20) are different patients: the slice number is the
    # last three digits, so they are not merged by their shared first two characters.
    assert ids == ["2", "16", "20", "28"]
    assert sum(c.slices for c in cases) == 24
    case16 = cases[1]
    assert case16.ct.shape == case16.mri.shape == (6, 256, 256)
    assert case16.slice_names[0] == "16003.png" and case16.slice_names[-1] == "16008.png"
    assert cases[0].slice_names[:2] == ["2004.png", "2005.png"]
    assert cases[2].slice_names[:2] == ["20005.png", "20006.png"]
    for c in cases:
        assert c.ct.dtype == np.float32 and 0 <= c.ct.min() and c.ct.max() == 255
        assert c.mri.min() == 0 and c.mri.max() == 255
    # Slices are stacked in slice order: each is the PNG of its name, unchanged (8-bit min-max is the identity).
    from phantoms import read_slice_case

    np.testing.assert_array_equal(cases[1].mri, read_slice_case(phantom_slices, "16", "MRI"))


def test_discover_first_two_characters_rule_on_slice_folders(phantom_slices):
    found = discovery.discover([phantom_slices], WINDOW, case_rule="first2")
    assert [c.case_id for c in found] == ["16", "20", "28"]
    assert {c.case_id: c.slices for c in found}["20"] == 12  # "2…" and "20…" merged


def test_discover_2d_harvard(harvard_cases):
    ids = [c.case_id for c in harvard_cases]
    # "2004.png" (case 2) and "20005.png" (case 20) are different patients: the slice number is the
    # last three digits, so they are not merged by their shared first two characters.
    assert ids == ["2", "16", "20", "28", "32", "33", "34", "41"]
    assert sum(c.slices for c in harvard_cases) == 147
    case16 = harvard_cases[1]
    assert case16.ct.shape == case16.mri.shape == (18, 256, 256)
    assert case16.slice_names[0] == "16003.png" and case16.slice_names[-1] == "16020.png"
    case2 = harvard_cases[0]
    assert case2.slice_names[:2] == ["2004.png", "2005.png"]
    for c in harvard_cases:
        assert c.ct.dtype == np.float32 and 0 <= c.ct.min() and c.ct.max() == 255
        assert c.mri.min() == 0 and c.mri.max() == 255


def test_discover_first_two_characters_rule(harvard_dir):
    cases = discovery.discover([harvard_dir], WINDOW, case_rule="first2")
    assert [c.case_id for c in cases] == ["16", "20", "28", "32", "33", "34", "41"]
    assert {c.case_id: c.slices for c in cases}["20"] == 37


def test_discover_refuses_unpaired_and_empty(tmp_path, phantom_slices):
    for sub in ("CT", "MRI"):
        (tmp_path / sub).mkdir()
    shutil.copyfile(phantom_slices / "CT" / "16005.png", tmp_path / "CT" / "16005.png")
    with pytest.raises(CTMRIError, match="no partner"):
        discovery.discover([tmp_path], WINDOW)
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(CTMRIError, match="no paired data"):
        discovery.discover([empty], WINDOW)


def test_discover_refuses_other_names_and_sizes_and_reads_16bit_pictures_as_their_8bit_values(tmp_path, phantom_slices):
    """Three silent or ugly outcomes of the 2D layout: names without a 3-digit slice number were grouped by
    their first two characters (``scanA.png`` and ``scanB.png``: one patient "sc"); one slice of another size
    among many was a traceback from stacking; an 8-bit CT saved as 16-bit PNG (×257) was read as HU + 1024."""
    def copy(names: dict, root: Path) -> Path:
        for sub in ("CT", "MRI"):
            (root / sub).mkdir(parents=True)
            for new, old in names.items():
                shutil.copyfile(phantom_slices / sub / old, root / sub / new)
        return root

    badly_named = copy({"scanA.png": "16005.png", "scanB.png": "28005.png"}, tmp_path / "names")
    with pytest.raises(CTMRIError, match=r"slice 'scanA': a 2D slice file is named <case id><three-digit"):
        discovery.discover([badly_named], WINDOW)
    assert [c.case_id for c in discovery.discover([badly_named], WINDOW, case_rule="first2")] == ["sc"]
    sized = copy({"16005.png": "16005.png", "16006.png": "16006.png"}, tmp_path / "sizes")
    small = sitk.GetArrayFromImage(sitk.ReadImage(str(sized / "MRI" / "16006.png")))[:200, :180]
    sitk.WriteImage(sitk.GetImageFromArray(small), str(sized / "MRI" / "16006.png"))
    with pytest.raises(CTMRIError, match=r"16006.png is 180×200 pixels; the 2D layout needs 256×256"):
        discovery.discover([sized], WINDOW)
    wide = copy({"16005.png": "16005.png", "16006.png": "16006.png"}, tmp_path / "wide")
    for png in (wide / "CT").iterdir():
        eight = sitk.GetArrayFromImage(sitk.ReadImage(str(png)))
        sitk.WriteImage(sitk.GetImageFromArray(eight.astype(np.uint16) * 257), str(png))
    case = discovery.discover([wide], WINDOW)[0]
    same = discovery.discover([copy({"16005.png": "16005.png", "16006.png": "16006.png"}, tmp_path / "8bit")], WINDOW)[0]
    assert sitk.ReadImage(str(wide / "CT" / "16005.png")).GetPixelID() == sitk.sitkUInt16
    np.testing.assert_allclose(case.ct, same.ct, atol=1e-3)
    assert "saved as 16 bits" in case.info["ct"]


def test_discover_3d_registers_and_caches(tmp_path):
    """A SynthRAD-style case of a phantom head: the MR (T2-like) on its own grid, the CT (in HU, with a head
    holder) on another grid covering the whole head, the head turned 6° and shifted ~9 mm. Discovery must
    register the CT onto the MR's model grid (as the true motion would put it) and cache the result."""
    import phantoms

    head = phantoms.Head.patient(9, holder=True)
    mr = phantoms.mri_t2(phantoms.grid((128, 128, 24), (1.6, 1.6, 4.0)), head, seed=91)
    motion = phantoms.rigid((0.0, 0.0, 6.0), (7.0, -5.0, 0.0))
    ct = phantoms.ct_hu(phantoms.grid((160, 160, 64), (1.4, 1.4, 3.0)), head, motion, seed=92)
    case_dir = tmp_path / "data" / "patientA"
    case_dir.mkdir(parents=True)
    sitk.WriteImage(mr, str(case_dir / "mr.mha"))
    sitk.WriteImage(ct, str(case_dir / "ct.nii.gz"))

    cache = tmp_path / "cache"
    window = CTWindow(200.0, 2400.0)
    found = discovery.discover([tmp_path / "data"], window, size=64, cache_dir=cache)
    assert len(found) == 1
    case = found[0]
    assert case.case_id == "patientA" and case.source == "3d-registered"
    assert case.ct.shape == case.mri.shape == (24, 64, 64)
    assert case.info["cached"] is False and len(list(cache.glob("*.npz"))) == 1
    # Registered: on the MR's 64² model grid the CT is what resampling it through the true motion gives (the
    # motion maps MR points to CT points); resampled without registration it is far from that.
    from CTtoMRISynthesisLib.geometry import model_grid
    from CTtoMRISynthesisLib.intensity import normalise_ct

    grid = model_grid(mr, 64)

    def on_grid(transform: sitk.Transform) -> np.ndarray:
        moved = sitk.Resample(ct, grid, transform, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
        return normalise_ct(sitk.GetArrayFromImage(moved), window)[0]

    truth, before = on_grid(motion), on_grid(sitk.Transform())
    inside = phantoms.labels_on(grid, head) != phantoms.AIR
    error, error_before = (np.abs(a - truth)[inside].mean() for a in (case.ct, before))
    # (measured on this case: the true motion shifted 1 mm left-right gives an error of 5.5 and a correlation
    # of 0.93, 2 mm 10.7 and 0.80; 2 mm along z, across the 4-mm slices, 3.7 and 0.96; unregistered, 33)
    assert error < 0.25 * error_before, (error, error_before)
    assert np.corrcoef(case.ct[inside], truth[inside])[0, 1] > 0.9
    again = discovery.discover([tmp_path / "data"], window, size=64, cache_dir=cache)[0]
    assert again.info["cached"] is True
    np.testing.assert_array_equal(again.ct, case.ct)


# ---------------------------------------------------------------------------------------------- split
def test_cross_validation_is_patient_level(cases):
    ids = [c.case_id for c in cases]
    for folds in (0, 3):
        splits = split.cross_validation(ids, folds, seed=1)
        held = [c for s in splits for c in s.test_cases]
        assert sorted(held) == sorted(ids)  # every patient held out exactly once
        for s in splits:
            assert not set(s.train_cases) & set(s.test_cases)
            assert sorted(s.train_cases + s.test_cases) == sorted(ids)
    assert len(split.cross_validation(ids, 0)) == len(ids)
    with pytest.raises(CTMRIError, match="both train and test"):
        split.Split("bad", ["16", "20"], [], ["20"]).check()
    # The slices of a split's training patients never include a held-out patient's slice.
    s = split.cross_validation(ids, 0)[2]
    ds = SliceDataset([c for c in cases if c.case_id in s.train_cases], context=1)
    assert set(ds.case_of_slice) == set(s.train_cases) and s.test_cases[0] not in ds.case_of_slice


@needs_torch
def test_augmentation_is_deterministic_and_paired(cases):
    ds = SliceDataset(cases[1:2], context=1, augment=Augment(), seed=3)
    ds.set_epoch(2)
    x1, y1 = ds[4]
    x2, y2 = ds[4]
    assert x1.shape == (3, 256, 256) and y1.shape == (1, 256, 256)
    assert np.array_equal(x1.numpy(), x2.numpy()) and np.array_equal(y1.numpy(), y2.numpy())
    ds.set_epoch(3)
    x3, _ = ds[4]
    assert not np.array_equal(x1.numpy(), x3.numpy())
    # CT and MRI moved together: MRI signal where the CT is air is as rare as without augmentation
    # (scalp fat is air-dark in the brain-windowed CT, so it is not zero even then).
    def mismatch(x, y):
        return ((y[0] > 0.1) & (x[1] == 0)).mean()

    plain = SliceDataset(cases[1:2], context=1)
    before = mismatch(*(a.numpy() for a in plain[4]))
    assert abs(mismatch(x1.numpy(), y1.numpy()) - before) < 0.03



def test_narrower_window_stretches_about_the_tissue_median():
    from CTtoMRISynthesisLib.training.dataset import narrower_window

    ct = np.zeros((3, 16, 16), np.float32)  # air 0
    ct[:, 2:14, 2:14] = 100 / 255  # brain tissue
    ct[:, 6:9, 6:9] = 50 / 255  # CSF
    ct[:, 2, 2:14] = 1.0  # saturated bone
    out = np.clip(narrower_window(ct, 1.5), 0.0, 1.0)
    np.testing.assert_allclose(out[:, 10, 10], 100 / 255, atol=1e-6)  # the pivot: tissue stays
    np.testing.assert_allclose(out[:, 7, 7], 25 / 255, atol=1e-6)  # CSF 50 → 100 − 1.5 · 50
    assert (out[:, 2, 2:14] == 1.0).all()  # bone stays saturated
    np.testing.assert_array_equal(narrower_window(np.zeros_like(ct), 1.5), 0.0)  # no tissue: unchanged


@needs_torch
def test_contrast_augmentation_darkens_csf_keeps_air_and_mri(cases):
    """``Augment.contrast`` (``--aug-contrast``): another, narrower window of the same slice; with 0 every
    item is what it was before the option existed (its random draw is only made when asked)."""
    base = dict(rotate_deg=0, scale=0, flip_prob=0, intensity_scale=0, intensity_shift=0)
    plain = SliceDataset(cases[1:2], context=1, augment=Augment(**base), seed=3)
    narrow = SliceDataset(cases[1:2], context=1, augment=Augment(**base, contrast=0.5), seed=3)
    scanner = dict(base, gamma=0.2, blur=1.0, noise=0.03)
    before = SliceDataset(cases[1:2], context=1, augment=Augment(**scanner), seed=3)
    unchanged = SliceDataset(cases[1:2], context=1, augment=Augment(**scanner, contrast=0.0), seed=3)
    darkened = 0
    for i in range(len(plain)):
        x0, y0 = (a.numpy() for a in plain[i])
        x1, y1 = (a.numpy() for a in narrow[i])
        np.testing.assert_array_equal(y0, y1)
        assert not x1[x0 == 0].any()
        np.testing.assert_array_equal(before[i][0].numpy(), unchanged[i][0].numpy())
        tissue = x0[1][(x0[1] > 0.05) & (x0[1] < 0.95)]
        if tissue.size > 1000:
            dark = (x0[1] > 0.05) & (x0[1] < np.quantile(tissue, 0.1))
            assert x1[1][dark].mean() < x0[1][dark].mean()  # the darkest soft tissue (CSF) darker still
            darkened += 1
    assert darkened > len(plain) // 2


# ------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trained(cases, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    chosen = [c for c in cases if c.case_id in ("16", "28")]
    settings = _tiny_settings(epochs=3)
    result = train(chosen, settings, out, val_cases=[cases[2]], command="test", progress_bar=False)
    return out, result, chosen


@needs_torch
def test_training_lowers_loss_and_writes_loadable_weights(trained):
    from CTtoMRISynthesisLib.weights import load_model, sha256_of

    out, result, _ = trained
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    with open(out / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert set(rows[0]) >= {"epoch", "loss", "val_mae", "val_ssim", "lr", "seconds"}
    assert float(rows[-1]["lr"]) < float(rows[0]["lr"])  # decaying learning rate
    loaded = load_model(out / "model.safetensors")
    assert (out / "model.safetensors.sha256").read_text().split()[0] == sha256_of(out / "model.safetensors")
    cfg = loaded.config
    assert cfg["format_version"] == 1 and cfg["model"]["in_channels"] == 3
    assert cfg["preprocessing"]["context_slices"] == 1 and cfg["preprocessing"]["size"] == 256
    assert cfg["preprocessing"]["ct_window"] == {"level": 45.0, "width": 120.0}
    assert cfg["split"]["train_cases"] == ["16", "28"]
    assert cfg["training"]["loss"] == "mse" and cfg["training"]["seed"] == 0
    assert cfg["training"]["command"] == "test" and cfg["training"]["seconds"] > 0
    assert cfg["metrics"]["val_cases"] == ["20"] and cfg["metrics"]["val_mae"] > 0


@needs_torch
def test_resume_continues_and_matches_a_straight_run(trained, tmp_path):
    import torch

    out, result, cases = trained
    # Three epochs interrupted after two, then resumed: the same weights as the straight run (CPU determinism).
    part = tmp_path / "part"
    stopped = train(cases, _tiny_settings(epochs=3, stop_after=2), part, val_cases=[], command="test", progress_bar=False)
    assert stopped.get("stopped") and not (part / "model.safetensors").exists() and (part / "checkpoint.pt").exists()
    resumed = train(cases, _tiny_settings(epochs=3), part, val_cases=[], resume=True, command="test", progress_bar=False)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    with open(part / "log.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3
    from CTtoMRISynthesisLib.weights import read_weights_file

    a = read_weights_file(out / "model.safetensors")["state_dict"]
    b = read_weights_file(part / "model.safetensors")["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@needs_torch
def test_checkpoint_every_validates_and_saves_at_milestones_and_resume_redoes_the_rest(cases, tmp_path):
    """--checkpoint-every N: validation and checkpoint every N epochs, after the last and when stopping; a run
    resumed from such a checkpoint redoes the epochs after it, and its log holds each epoch once."""
    import torch

    chosen = [c for c in cases if c.case_id in ("16", "28")]
    out = tmp_path / "every"
    res = train(chosen, _tiny_settings(epochs=5, checkpoint_every=2), out, val_cases=[cases[2]], command="t", progress_bar=False)
    validated = [h["epoch"] for h in res["history"] if h["val_mae"] is not None]
    assert validated == [2, 4, 5]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 4  # 0-based: after the last epoch
    part = tmp_path / "part"
    train(chosen, _tiny_settings(epochs=3, checkpoint_every=2, stop_after=2), part, command="t", progress_bar=False)
    with open(part / "log.csv", "a") as fh:  # epoch 3 ran, then the machine went away before a checkpoint
        fh.write("3,0.5,,,,0.001,1.0\n")
    train(chosen, _tiny_settings(epochs=3, checkpoint_every=2), part, resume=True, command="t", progress_bar=False)
    with open(part / "log.csv") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1", "2", "3"]
    with pytest.raises(CTMRIError, match="checkpoint-every"):
        _tiny_settings(checkpoint_every=0).check()


def test_drop_patients_is_seeded_and_leaves_someone_to_train_on():
    ids = ["16", "20", "28", "32", "33"]
    kept, dropped = split.drop_random(ids, 2, "1:fold 1")
    assert kept + dropped != ids and sorted(kept + dropped) == sorted(ids) and len(dropped) == 2
    assert split.drop_random(ids, 2, "1:fold 1") == (kept, dropped)  # the same draw for the same seed
    assert kept == [c for c in ids if c in kept]  # order kept
    assert {tuple(split.drop_random(ids, 1, f"{s}:fold 1")[1]) for s in range(20)} != {tuple(dropped[:1])}
    for n in (5, -1):
        with pytest.raises(CTMRIError, match="--drop-patients"):
            split.drop_random(ids, n, "0")


@needs_torch
def test_cv_with_dropped_patients_records_them_and_never_drops_the_held_out(phantom_slices, tmp_path):
    import phantoms
    from CTtoMRISynthesisLib.cli import main as ctmri
    from CTtoMRISynthesisLib.weights import read_config

    run = tmp_path / "bag"
    assert ctmri(phantoms.tiny_train_args(phantom_slices, run, "--cv", "loo", "--only-folds", "2", "--drop-patients",
                                          "1", "--seed", "3", max_steps=1)) == 0
    rec = read_config(run / "fold02" / "model.safetensors")["split"]
    assert rec["test_cases"] == ["16"] and len(rec["dropped_cases"]) == 1 and len(rec["train_cases"]) == 2
    assert "16" not in rec["dropped_cases"] and not set(rec["dropped_cases"]) & set(rec["train_cases"])
    assert (run / "fold02" / "fold.json").exists()


@needs_torch
def test_resume_refuses_other_patients_or_another_recipe_and_keeps_a_finished_run(phantom_slices, tmp_path, capsys):
    """--resume used to check only the architecture: a run stopped after training on every patient resumed with
    --test-cases 28 recorded 28 as held out although it had trained on it; another --lr was taken; and a finished
    run resumed under another split or name was saved again over its model file."""
    import phantoms
    from CTtoMRISynthesisLib.cli import main as ctmri

    run = tmp_path / "run"
    assert ctmri(phantoms.tiny_train_args(phantom_slices, run, "--stop-after", "1", epochs=2, max_steps=1)) == 0
    for extra, said in ((["--test-cases", "28"], "train_cases"), (["--lr", "0.01"], "lr: 0.001 vs 0.01"),
                        (["--seed", "1"], "seed: 0 vs 1")):
        capsys.readouterr()
        assert ctmri(phantoms.tiny_train_args(phantom_slices, run, "--resume", *extra, epochs=2, max_steps=1)) == 2
        err = capsys.readouterr().err
        assert "was made with different settings or patients" in err and said in err, err
    assert ctmri(phantoms.tiny_train_args(phantom_slices, run, "--resume", "--workers", "0", epochs=2, max_steps=1)) == 0
    model = (run / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert ctmri(phantoms.tiny_train_args(phantom_slices, run, "--resume", "--test-cases", "28", epochs=2,
                                          max_steps=1)) == 2
    assert ctmri(phantoms.tiny_train_args(phantom_slices, run, "--resume", epochs=2, max_steps=1)) == 0
    assert (run / "model.safetensors").read_bytes() == model, "a finished run is kept as it is"


@needs_torch
def test_cross_validation_keeps_only_folds_of_its_own_recipe_and_refuses_a_single_runs_split(phantom_slices,
                                                                                           tmp_path, capsys):
    """A fold finished by another recipe used to be kept on --resume and reported under the new recipe's name;
    --test-cases / --val-cases with --cv were silently ignored (the patient was trained on in other folds)."""
    import phantoms
    from CTtoMRISynthesisLib.cli import main as ctmri

    cv = tmp_path / "cv"
    assert ctmri(phantoms.tiny_train_args(phantom_slices, cv, "--cv", "loo", "--only-folds", "1", max_steps=1)) == 0
    capsys.readouterr()
    assert ctmri(phantoms.tiny_train_args(phantom_slices, cv, "--cv", "loo", "--only-folds", "1", "--resume",
                                          "--loss", "l1", max_steps=1)) == 2
    assert "loss: mse vs l1" in capsys.readouterr().err
    assert ctmri(phantoms.tiny_train_args(phantom_slices, cv, "--cv", "loo", "--only-folds", "1", "--resume",
                                          max_steps=1)) == 0
    assert "already done" in capsys.readouterr().out
    for option in ("--test-cases", "--val-cases"):
        assert ctmri(phantoms.tiny_train_args(phantom_slices, tmp_path / "other", "--cv", "loo", option, "28")) == 2
        assert "with --cv each fold holds out its own" in capsys.readouterr().err
    assert not (tmp_path / "other" / "fold01").exists()


@needs_torch
def test_a_global_batch_that_does_not_split_across_the_processes_is_refused(phantom_slices, tmp_path, capsys,
                                                                         monkeypatch):
    """3 processes and --batch-size 4 trained on 3 slices a step while the model recorded 4."""
    from CTtoMRISynthesisLib.cli import main as ctmri
    from CTtoMRISynthesisLib.training.loop import Dist, check_batch_divides

    check_batch_divides(4, Dist(0, 2, 0))
    check_batch_divides(5, Dist(0, 1, 0))
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    import phantoms

    assert ctmri(phantoms.tiny_train_args(phantom_slices, tmp_path / "run")) == 2
    assert "--batch-size 4 is the global batch, split across the 3 processes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "refused before anything is read or made"


@needs_torch
def test_train_never_trains_over_a_run_without_resume(phantom_slices, tmp_path, capsys):
    """A forgotten --resume must not retrain a finished run (or a fold) from scratch over its checkpoint and model:
    refused before any training, naming the folder; a fold not yet trained in the same folder is free."""
    import phantoms
    from CTtoMRISynthesisLib.cli import main as ctmri

    run = tmp_path / "run"
    assert ctmri(phantoms.tiny_train_args(phantom_slices, run, max_steps=1)) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert ctmri(phantoms.tiny_train_args(phantom_slices, run, max_steps=1)) == 2
    assert f"{run} holds a training run already (checkpoint.pt, model.safetensors): pass --resume" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    cv = tmp_path / "cv"
    assert ctmri(phantoms.tiny_train_args(phantom_slices, cv, "--cv", "loo", "--only-folds", "2", max_steps=1)) == 0
    capsys.readouterr()
    assert ctmri(phantoms.tiny_train_args(phantom_slices, cv, "--cv", "loo", "--only-folds", "1", "2", max_steps=1)) == 2
    assert f"{cv / 'fold02'} holds a training run already" in capsys.readouterr().err
    assert not (cv / "fold01").exists()  # refused before fold 1 trained
    assert ctmri(phantoms.tiny_train_args(phantom_slices, cv, "--cv", "loo", "--only-folds", "1", max_steps=1)) == 0


@needs_torch
def test_save_replaces_only_a_model_file_and_is_refused_with_cv(phantom_slices, tmp_path, capsys):
    """``--save`` over an existing file that is not a model replaced it after training; with ``--cv`` it was
    silently ignored. Both refused before anything is trained."""
    import phantoms
    from CTtoMRISynthesisLib.cli import main as ctmri

    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes")
    assert ctmri(phantoms.tiny_train_args(phantom_slices, tmp_path / "run", "--save", str(notes), max_steps=1)) == 2
    assert f"--save: {notes} exists and is not a ctmri model file" in capsys.readouterr().err
    assert ctmri(phantoms.tiny_train_args(phantom_slices, tmp_path / "cv", "--cv", "loo", "--save",
                                          str(tmp_path / "m.safetensors"), max_steps=1)) == 2
    assert "with --cv there is one model per fold" in capsys.readouterr().err
    assert ctmri(phantoms.tiny_train_args(phantom_slices, tmp_path / "run", "--save",
                                          str(notes / "m.safetensors"), max_steps=1)) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert notes.read_text() == "my notes" and not (tmp_path / "run").exists() and not (tmp_path / "cv").exists()


def test_exclude_from_training_removes_only_those_and_says_so():
    kept, rec = split.exclude(["2", "20", "28"], ["2"], {"mode": "fold 2", "train_cases": ["2", "20", "28"]})
    assert kept == ["20", "28"] and rec["train_cases"] == kept and rec["excluded_from_training"] == ["2"]
    assert split.exclude(["20", "28"], ["2"], {"mode": "fold 1"})[1]["excluded_from_training"] == []
    with pytest.raises(CTMRIError, match="leaves no training patients"):
        split.exclude(["2"], ["2"], {"mode": "fold 3"})
    with pytest.raises(CTMRIError, match=r"unknown patient id\(s\) \['7'\]"):
        split.check_known(["7"], ["2", "16"], "--exclude-from-training")


@needs_torch
def test_cv_whose_exclusions_empty_a_fold_is_refused_before_any_fold_trains(phantom_slices, tmp_path, capsys):
    """``--cv loo --exclude-from-training 2 16 20``: the fold holding out 28 has nobody to train on; it failed
    only when fold 4 came, after folds 1-3 had trained."""
    import phantoms
    from CTtoMRISynthesisLib.cli import main as ctmri

    cv = tmp_path / "cv"
    assert ctmri(phantoms.tiny_train_args(phantom_slices, cv, "--cv", "loo", "--exclude-from-training", "2", "16",
                                          "20", max_steps=1)) == 2
    assert "leaves no training patients in leave-one-patient-out: fold 4 of 4" in capsys.readouterr().err
    assert not (cv / "fold01").exists()


@needs_torch
def test_cv_excluding_a_patient_still_holds_it_out_and_scores_it(phantom_slices, tmp_path):
    import phantoms
    from CTtoMRISynthesisLib.cli import main as ctmri
    from CTtoMRISynthesisLib.weights import read_config

    run = tmp_path / "t2only"
    assert ctmri(phantoms.tiny_train_args(phantom_slices, run, "--cv", "loo", "--only-folds", "1", "2",
                                          "--exclude-from-training", "2", max_steps=1)) == 0
    own = read_config(run / "fold01" / "model.safetensors")["split"]  # patient 2 held out: trained on the rest
    assert own["test_cases"] == ["2"] and own["train_cases"] == ["16", "20", "28"]
    other = read_config(run / "fold02" / "model.safetensors")["split"]
    assert other["test_cases"] == ["16"] and other["train_cases"] == ["20", "28"]
    assert other["excluded_from_training"] == ["2"]
    assert (run / "fold01" / "pred_2.npz").exists()  # scored like every other patient
    assert ctmri(phantoms.tiny_train_args(phantom_slices, tmp_path / "bad", "--exclude-from-training", "7")) == 2
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_torch
def test_torchrun_two_ranks_on_cpu(small_2d_dir, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "CTtoMRISynthesisLib.training", "train", "--data", str(small_2d_dir), "--out", str(out),
        "--base", "4", "--epochs", "2", "--max-steps", "2", "--batch-size", "4", "--workers", "0",
        "--threads", "1", "--device", "cpu", "--no-progress", "--no-augment",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    logs = {p.name: p.read_text() for p in (out / "ranks").glob("rank*.log")}
    assert set(logs) == {"rank0.log", "rank1.log"}
    for name, text in logs.items():
        lines = text.strip().splitlines()
        assert len(lines) == 2 and all("/2 epoch" in line for line in lines), text
    # Rank 0 alone wrote the run's files: one checkpoint, one model, one log, and it says who wrote it.
    import torch

    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert files == ["checkpoint.pt", "log.csv", "model.safetensors", "model.safetensors.sha256"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["rank"] == 0 and ckpt["world_size"] == 2
    from CTtoMRISynthesisLib.weights import load_model

    cfg = load_model(out / "model.safetensors").config
    assert cfg["training"]["processes"] == 2 and cfg["split"]["train_cases"] == ["16", "28"]
    with open(out / "log.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 2


# --------------------------------------------------------------------------------------------- report
@needs_torch
def test_report_writes_tables_and_montages(trained, phantom_slices, tmp_path):
    from skimage.io import imread

    from CTtoMRISynthesisLib.training.commands import add_report_arguments, run_report

    out, _, _ = trained
    small = tmp_path / "data"
    for sub in ("CT", "MRI"):
        (small / sub).mkdir(parents=True)
        for name in ["16005.png", "16006.png", "16007.png", "20006.png", "20007.png", "20008.png"]:
            shutil.copyfile(phantom_slices / sub / name, small / sub / name)
    import argparse

    parser = argparse.ArgumentParser()
    add_report_arguments(parser)
    args = parser.parse_args(["--data", str(small), "--weights", str(out / "model.safetensors"), "--out", str(tmp_path / "rep"), "--device", "cpu"])
    assert run_report(args) == 0
    rep = tmp_path / "rep"
    md = (rep / "report.md").read_text()
    assert "Dong et al. 2020" in md and "lookup table" in md and "constant" in md and "73.68" in md
    assert "no (trained on)" in md  # patient 16 was a training patient of this model: flagged
    with open(rep / "per_patient.csv") as fh:
        rows = list(csv.DictReader(fh))
    methods = ("model", "lookup_table", "constant", "ref_shift1", "ref_blur1", "ref_own_lookup")
    assert {(r["patient"], r["method"]) for r in rows} == {(p, m) for p in ("16", "20") for m in methods}
    for r in rows:
        assert 0 <= float(r["mae"]) <= 255 and -1 <= float(r["ssim"]) <= 1 and r["mae_bone"] != ""
    summary = json.loads((rep / "summary.json").read_text())["summary"]
    assert summary["model"]["mae"]["n"] == 2
    # Reference rows see the reference MRI: a one-pixel blur of the truth is far closer than any baseline.
    assert summary["ref_blur1"]["mae"]["max"] < summary["lookup_table"]["mae"]["min"]
    assert "Reachability: the real MRI itself, shifted by one pixel" in md
    image = imread(rep / "montage_20.png")
    assert image.dtype == np.uint8 and image.shape == (3 * 256 + 2 * 3, 4 * 256 + 3 * 3)
    # The summary can be attached to a weights file's config; the file stays loadable and checksummed.
    from CTtoMRISynthesisLib.training.report import attach_cv_metrics
    from CTtoMRISynthesisLib.weights import load_model, read_weights_file, sha256_of

    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(out / "model.safetensors", copy)
    (tmp_path / "copy.safetensors.sha256").write_text(f"{sha256_of(copy)}  copy.safetensors\n")
    tensors_before = read_weights_file(copy)["state_dict"]
    attach_cv_metrics(copy, rep, command="test")
    cv = load_model(copy).config["metrics"]["cross_validation"]
    assert cv["summary"]["model"]["mae"]["n"] == 2 and set(cv["per_patient"]) == {"16", "20"}
    tensors_after = read_weights_file(copy)["state_dict"]  # only the config changed
    assert set(tensors_after) == set(tensors_before)
    assert all(tensors_after[k].dtype == v.dtype and (tensors_after[k] == v).all() for k, v in tensors_before.items())
    # Column 2 of the first row is the reference MRI slice, unchanged.
    case20 = [c for c in discovery.discover([small], WINDOW) if c.case_id == "20"][0]
    np.testing.assert_array_equal(image[:256, 256 + 3: 512 + 3], np.clip(case20.mri[0], 0, 255).astype(np.uint8))

    # A report replaces its own folder's files (also one a version before the marker wrote), never a project's own.
    (rep / ".ctmri-report").unlink()
    assert run_report(args) == 0
    project = tmp_path / "project"
    project.mkdir()
    (project / "report.md").write_text("# Our project\n")
    args = parser.parse_args(["--data", str(small), "--weights", str(out / "model.safetensors"), "--out", str(project)])
    assert run_report(args) == 2
    assert sorted(p.name for p in project.iterdir()) == ["report.md"]
    assert (project / "report.md").read_text() == "# Our project\n"


def test_reference_predictions_are_the_real_mri_shifted_blurred_and_own_lookup(cases):
    from CTtoMRISynthesisLib.intensity import head_mask
    from CTtoMRISynthesisLib.training.report import fit_lookup_table, predict_lookup_table, reference_predictions

    case = cases[0]
    refs = reference_predictions(case)
    np.testing.assert_array_equal(refs["ref_shift1"][:, :, :-1], case.mri[:, :, 1:])
    assert refs["ref_blur1"][~head_mask(case.ct)].max() == 0.0
    inside = head_mask(case.ct)
    assert 0 < np.abs(refs["ref_blur1"] - case.mri)[inside].mean() < 20  # blurred, not replaced
    np.testing.assert_array_equal(refs["ref_own_lookup"], predict_lookup_table(fit_lookup_table([case]), case.ct))


def test_lookup_table_baseline_on_known_mapping(cases):
    from CTtoMRISynthesisLib.training.report import fit_lookup_table, predict_lookup_table

    case = cases[1]
    fake = discovery.Case("x", case.ct, np.where(case.ct > 10, 255.0 - case.ct, 0.0).astype(np.float32), "test")
    table = fit_lookup_table([fake])
    assert abs(table[100] - 155.0) < 1e-6 and abs(table[200] - 55.0) < 1e-6
    pred = predict_lookup_table(table, case.ct)
    assert pred[case.ct <= 1].max() == 0.0  # 0 outside the head


def test_grow_in_plane_is_a_diamond_within_each_slice():
    from CTtoMRISynthesisLib.intensity import grow_in_plane

    mask = np.zeros((3, 9, 9), dtype=bool)
    mask[1, 4, 4] = True
    grown = grow_in_plane(mask, 2)
    assert not grown[0].any() and not grown[2].any()  # never across slices
    yy, xx = np.nonzero(grown[1])
    assert len(yy) == 13 and (np.abs(yy - 4) + np.abs(xx - 4)).max() == 2  # the 4-neighbourhood, twice
    copy = grow_in_plane(mask, 0)
    np.testing.assert_array_equal(copy, mask)
    assert copy is not mask
    with pytest.raises(ValueError, match="-1 pixels"):
        grow_in_plane(mask, -1)


def test_window_in_place_is_the_expression_it_replaced():
    """CTWindow.apply on float32 (the pipeline's path, in place for memory) gives bit for bit the float32 expression
    it replaced; other dtypes keep their float64 path; normalise_ct never changes the user's array."""
    from CTtoMRISynthesisLib.intensity import CTWindow, normalise_ct

    rng = np.random.default_rng(1)
    hu = rng.uniform(-1100, 2000, (3, 17, 19)).astype(np.float32)
    hu[0, 0, :3] = (-15.0, 105.0, 45.0)  # the window's ends and level
    for window in (CTWindow(45.0, 120.0), CTWindow(40.0, 80.0), CTWindow(47.3, 97.1)):
        low = window.level - window.width / 2.0
        want = (np.clip((hu - low) / window.width, 0.0, 1.0) * 255.0).astype(np.float32)
        got = window.apply(hu)
        assert got.dtype == np.float32 and got is not hu
        np.testing.assert_array_equal(got, want)
        as_int = hu.astype(np.int16)
        np.testing.assert_array_equal(window.apply(as_int),
                                      (np.clip((as_int - low) / window.width, 0.0, 1.0) * 255.0).astype(np.float32))
    assert tuple(CTWindow(45.0, 120.0).apply(hu)[0, 0, :3]) == (0.0, 255.0, 127.5)
    # a window made of NumPy scalars (not JSON's or argparse's floats) and a single value still give float32
    np.testing.assert_array_equal(CTWindow(np.float64(45.0), np.float64(120.0)).apply(hu), CTWindow(45.0, 120.0).apply(hu))
    assert CTWindow(np.float64(45.0), np.float64(120.0)).apply(hu).dtype == np.float32
    assert float(CTWindow(45.0, 120.0).apply(np.float32(45.0))) == 127.5
    offset = (hu + 1024.0).clip(0, None)
    before = offset.copy()
    out, info = normalise_ct(offset, CTWindow(45.0, 120.0))
    assert info["ct_path"] == "hu+1024"
    np.testing.assert_array_equal(offset, before)  # the input is not changed
    np.testing.assert_array_equal(out, CTWindow(45.0, 120.0).apply(before - 1024.0))


def test_fill_holes_in_plane_is_scipys_fill_per_slice():
    """The head mask's hole filling (one labelling of the background) gives exactly what scipy's
    binary_fill_holes gives with the in-plane structure, which it replaced for speed: on random masks (many holes,
    some touching the edge or a slice's corner)."""
    from scipy import ndimage

    from CTtoMRISynthesisLib.intensity import fill_holes_in_plane, in_plane_structure

    rng = np.random.default_rng(0)
    ring = np.zeros((2, 7, 7), dtype=bool)
    ring[:, 1:6, 1:6] = True
    ring[:, 2:5, 2:5] = False  # a hole in each slice
    ring[1, 3, 1] = False  # the second slice's hole opened to the slice's edge: not a hole any more
    filled = fill_holes_in_plane(ring)
    assert filled[0, 3, 3] and not filled[1, 3, 3] and not filled[1, 0, 0]
    masks = [ring, rng.random((5, 40, 33)) < 0.55, rng.random((1, 9, 64)) < 0.7, np.ones((2, 4, 4), bool),
             np.zeros((2, 4, 4), bool), rng.random((3, 1, 12)) < 0.5]
    for mask in masks:
        want = ndimage.binary_fill_holes(mask, structure=in_plane_structure())
        np.testing.assert_array_equal(fill_holes_in_plane(mask), want)
    assert fill_holes_in_plane(np.zeros((0, 4, 4), bool)).shape == (0, 4, 4)
    with pytest.raises(ValueError, match="z, y, x"):
        fill_holes_in_plane(np.zeros((4, 4), bool))


def test_head_mask_fills_the_phantom_heads_as_before(cases):
    """head_mask on the phantom CTs: the largest object with its in-plane holes filled, as scipy's fill made it."""
    from scipy import ndimage

    from CTtoMRISynthesisLib.intensity import head_mask, in_plane_structure, largest_component

    for case in cases:
        want = ndimage.binary_fill_holes(largest_component(case.ct > 10.0), structure=in_plane_structure())
        got = head_mask(case.ct)
        np.testing.assert_array_equal(got, want)
        assert (got & ~(case.ct > 10.0)).any()  # something was filled (the brain window's dark CSF, fat)


def test_lookup_table_with_a_grown_mask_learns_and_scores_the_rim(cases):
    """Compared with a model whose output mask is grown (model card, round 16), the table gets the same mask: it
    is fitted on the rim too (the scalp, CT 0 in the brain window) and predicts there."""
    from CTtoMRISynthesisLib.intensity import grow_in_plane, head_mask
    from CTtoMRISynthesisLib.training.report import fit_lookup_table, predict_lookup_table

    case = cases[1]
    head = head_mask(case.ct)
    rim = grow_in_plane(head, 2) & ~head
    assert rim.any() and case.ct[rim].max() <= 10  # the rim is what the CT head mask leaves out
    fake = discovery.Case("x", case.ct, np.where(rim, 200.0, np.where(head, 50.0, 0.0)).astype(np.float32), "test")
    plain, grown = fit_lookup_table([fake]), fit_lookup_table([fake], grow_px=2)
    low = int(np.rint(case.ct[rim]).min())
    assert grown[low] > plain[low] + 50  # the rim's bright values enter the table only with the grown mask
    assert predict_lookup_table(plain, case.ct)[rim].max() == 0.0
    pred = predict_lookup_table(grown, case.ct, grow_px=2)
    assert pred[rim].min() > 0 and pred[~grow_in_plane(head, 2)].max() == 0.0


# ------------------------------------------------------------------------------- lookup-table residual
@needs_torch
def test_lookup_residual_model_adds_the_table_of_the_centre_slice():
    import torch

    from CTtoMRISynthesisLib.model import UNet, UNetConfig

    net = UNet(UNetConfig(in_channels=3, base=4, lookup_residual=True)).eval()
    torch.nn.init.zeros_(net.head.weight)
    torch.nn.init.zeros_(net.head.bias)
    net.set_lookup(torch.linspace(1.0, 0.0, 256))  # an inverting table
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        out = net(x)
    expected = 1.0 - torch.round(x[:, 1:2] * 255) / 255  # the centre channel, not its neighbours
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="256 values"):
        net.set_lookup(torch.zeros(10))


@needs_torch
def test_lookup_blur_is_a_normalised_gaussian_and_the_fit_uses_it(cases):
    import torch
    from scipy import ndimage

    from CTtoMRISynthesisLib.model import UNet, UNetConfig, gaussian_blur
    from CTtoMRISynthesisLib.training.report import fit_lookup_table

    case = cases[0]
    x = torch.from_numpy(case.ct[:3, None] / 255.0)
    blurred = gaussian_blur(x, 1.0)
    # Away from the border it is scipy's Gaussian (same sigma, same 3-sigma radius).
    ref = ndimage.gaussian_filter(case.ct[:3] / 255.0, sigma=(0, 1, 1), truncate=3.0)
    np.testing.assert_allclose(blurred[:, 0, 5:-5, 5:-5].numpy(), ref[:, 5:-5, 5:-5], atol=1e-5)
    assert torch.equal(gaussian_blur(x, 0.0), x)
    const = torch.full((1, 1, 16, 16), 0.4)
    torch.testing.assert_close(gaussian_blur(const, 2.0), const)  # weights sum to 1, edges replicated
    # The model indexes its table with the blurred centre slice: the fit on blurred CT agrees with it.
    net = UNet(UNetConfig(in_channels=1, base=4, lookup_residual=True, lookup_sigma=1.0)).eval()
    torch.nn.init.zeros_(net.head.weight)
    torch.nn.init.zeros_(net.head.bias)
    table = fit_lookup_table([case], sigma=1.0)
    assert not np.allclose(table, fit_lookup_table([case]))
    net.set_lookup(table / 255.0)
    with torch.inference_mode():
        out = net(x.float())[:, 0].numpy() * 255.0
    index = np.clip(np.rint(blurred[:, 0].numpy() * 255.0), 0, 255).astype(int)
    np.testing.assert_allclose(out, table[index], atol=1e-3)


@needs_torch
def test_lookup_residual_training_stores_the_training_patients_table(cases, tmp_path):
    from CTtoMRISynthesisLib.training.report import fit_lookup_table
    from CTtoMRISynthesisLib.weights import load_model

    cases = [c for c in cases if c.case_id in ("16", "28")]
    settings = _tiny_settings(epochs=1, lookup_residual=True, lookup_sigma=1.0)
    train(cases, settings, tmp_path / "run", command="test", progress_bar=False)
    loaded = load_model(tmp_path / "run" / "model.safetensors")
    assert loaded.config["model"]["lookup_residual"] is True and loaded.config["model"]["lookup_sigma"] == 1.0
    np.testing.assert_allclose(loaded.net.lookup.numpy(), fit_lookup_table(cases, sigma=1.0) / 255.0, atol=1e-6)
    # Resuming that run with the plain model is refused (another architecture).
    plain = _tiny_settings(epochs=2)
    with pytest.raises(CTMRIError, match="lookup_residual"):
        train(cases, plain, tmp_path / "run", resume=True, command="test", progress_bar=False)


# ------------------------------------------------------------------------------- CT standardisation
def test_standardise_ct_maps_the_brain_median_and_keeps_air_and_bone(cases):
    from CTtoMRISynthesisLib.intensity import brain_median, standardise_ct

    case20 = {c.case_id: c for c in cases}["20"]  # the brightly windowed CT (brain median 158, as Harvard case 20 ~154)
    before = brain_median(case20.ct)
    assert 140 < before < 170
    out, note = standardise_ct(case20.ct, 105.0)
    assert "mapped to 105" in note["ct_standardise"]
    # The same brain voxels now have median 105 (re-measuring on the mapped CT samples other voxels,
    # as the air and bone cut-offs then fall elsewhere).
    sample = (case20.ct > 10) & (case20.ct < 200)
    assert abs(np.median(out[sample]) - 105.0) < abs(np.median(case20.ct[sample]) - 105.0) / 5
    assert np.all(out[case20.ct == 0] == 0) and np.all(out[case20.ct == 255] == 255)
    order = np.argsort(case20.ct.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= 0)  # monotone: no contrast inverted
    empty = np.zeros((2, 32, 32), np.float32)
    same, note = standardise_ct(empty, 105.0)
    assert same is empty and "skipped" in note["ct_standardise"]


@needs_torch
def test_ct_standardise_is_applied_in_training_and_at_inference(cases, tmp_path):
    from CTtoMRISynthesisLib.intensity import head_mask, standardise_ct
    from CTtoMRISynthesisLib.synthesis import predict_slices
    from CTtoMRISynthesisLib.weights import load_model

    cases = [c for c in cases if c.case_id in ("16", "20")]
    from CTtoMRISynthesisLib.training.dataset import as_network_sees

    ds = SliceDataset(as_network_sees(cases, 105.0), context=0)
    np.testing.assert_allclose(ds.inputs[: cases[0].slices, 0], standardise_ct(cases[0].ct, 105.0)[0] / 255.0, atol=1e-6)
    train(cases, _tiny_settings(epochs=1, ct_standardise=105.0), tmp_path / "run", command="test", progress_bar=False)
    loaded = load_model(tmp_path / "run" / "model.safetensors")
    assert loaded.config["preprocessing"]["ct_standardise"] == 105.0
    ct = cases[1].ct[:4]
    info = {}
    got = predict_slices(loaded.net, ct, context=1, ct_standardise=105.0, info=info)
    plain = predict_slices(loaded.net, standardise_ct(ct, 105.0)[0], context=1, mask_output=False)
    plain[~head_mask(ct)] = 0.0  # the mask comes from the CT as given
    np.testing.assert_allclose(got, plain, atol=1e-4)
    assert "mapped to 105" in info["ct_standardise"]
    # and metrics.json's record of what was done to the CT says so
    from CTtoMRISynthesisLib.pipeline import synthesize

    result = synthesize(sitk.GetImageFromArray(ct.astype(np.float32)), None, model=loaded)
    assert "mapped to 105" in result.normalisation["ct_standardise"]


@needs_torch
def test_lookup_table_is_fit_on_the_standardised_ct_when_both_are_asked(cases, tmp_path):
    from CTtoMRISynthesisLib.training.dataset import as_network_sees
    from CTtoMRISynthesisLib.training.report import fit_lookup_table
    from CTtoMRISynthesisLib.weights import load_model

    cases = [c for c in cases if c.case_id in ("16", "20")]
    settings = _tiny_settings(epochs=1, lookup_residual=True, ct_standardise=105.0)
    train(cases, settings, tmp_path / "run", command="test", progress_bar=False)
    table = load_model(tmp_path / "run" / "model.safetensors").net.lookup.numpy()
    np.testing.assert_allclose(table, fit_lookup_table(as_network_sees(cases, 105.0)) / 255.0, atol=1e-6)
    assert not np.allclose(table, fit_lookup_table(cases) / 255.0, atol=1e-3)


def test_resuming_a_checkpoint_older_than_a_setting_names_the_difference(tmp_path):
    from CTtoMRISynthesisLib.training.loop import _check_resumable

    old = {"base": 4, "levels": 5, "norm": "batch", "context": 1, "loss": "mse", "batch_size": 16, "seed": 0,
           "size": 256}  # written before lookup_residual existed
    _check_resumable(old, _tiny_settings(batch_size=16), tmp_path / "checkpoint.pt")  # same recipe: fine
    with pytest.raises(CTMRIError, match="lookup_residual: False vs True"):
        _check_resumable(old, _tiny_settings(batch_size=16, lookup_residual=True), tmp_path / "checkpoint.pt")
