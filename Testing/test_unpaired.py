"""Unpaired CT in training (``training/unpaired.py``, ``ctmri train --unpaired-ct``): reading CTs without
MRI as inference would, drawing reproducible plain/augmented renderings, the consistency and T2-prior terms,
and a training run that records them and refuses to resume with other unpaired settings.

Reading and drawing need no PyTorch (they run in the Slicer-stack CI jobs too); the loss terms and training
need it. The real clinical CT slices are used where the shared data is there (never committed).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CTtoMRISynthesisLib.errors import CTMRIError
from CTtoMRISynthesisLib.intensity import CTWindow, classify_ct, head_mask
from CTtoMRISynthesisLib.training import discovery
from CTtoMRISynthesisLib.training.dataset import Augment
from CTtoMRISynthesisLib.training.unpaired import (
    QUANTILES,
    SAME_SLICE_MAE,
    UnpairedSettings,
    UnpairedSource,
    check_not_paired,
    closest_paired_slice,
    mri_quantiles,
    on_model_grid,
    read_unpaired_ct,
)

from conftest import require

WINDOW = CTWindow(45.0, 120.0)
SCANNER = Augment(intensity_scale=0.1, intensity_shift=0.04, gamma=0.2, blur=1.0, noise=0.03)
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")


def _disc_slices(folder: Path, count: int) -> list:
    """``count`` 8-bit RGB slices ``CT_PNG (k).png``, k = 1..count, each a disc of grey level 10·k + 20."""
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:64, :80]
    disc = (yy - 32) ** 2 + (xx - 40) ** 2 < 24**2
    levels = []
    for k in range(1, count + 1):
        grey = np.where(disc, 10 * k + 20, 0).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(np.stack([grey] * 3, axis=-1), isVector=True), str(folder / f"CT_PNG ({k}).png"))
        levels.append(10 * k + 20)
    return levels


def test_slice_folder_is_stacked_in_number_order_and_stays_8_bit(tmp_path):
    levels = _disc_slices(tmp_path / "Patient_x", 12)  # "(10)" sorts before "(2)" as text
    image = read_unpaired_ct(tmp_path / "Patient_x")
    array = sitk.GetArrayFromImage(image)
    assert array.dtype == np.uint8 and array.shape == (12, 64, 80)
    assert [int(s.max()) for s in array] == levels
    assert classify_ct(array) == "windowed8bit"  # read as an 8-bit window, not as Hounsfield units
    grid = on_model_grid(image, WINDOW, 256)
    assert grid.shape == (12, 256, 256) and grid.dtype == np.float32
    assert 0.0 <= grid.min() and grid.max() <= 255.0 and grid[-1].max() == pytest.approx(255.0)  # min-max per volume
    assert grid[:, 0, :].max() == 0.0  # padded to square with air


def test_volume_file_in_hounsfield_units_goes_through_the_window(tmp_path):
    hu = np.full((4, 40, 40), -1000.0, np.float32)
    hu[:, 8:32, 8:32] = 30.0  # brain tissue
    hu[:, 16:24, 16:24] = 8.0  # CSF
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.5, 0.5, 2.5))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    grid = on_model_grid(read_unpaired_ct(tmp_path / "ct.nrrd"), WINDOW, 256)
    assert grid.shape == (4, 256, 256)
    centre = grid[:, 128, 128]
    tissue = grid[:, 128, 80]
    np.testing.assert_allclose(centre, (8.0 + 15.0) / 120.0 * 255.0, atol=0.5)  # level 45, width 120
    np.testing.assert_allclose(tissue, (30.0 + 15.0) / 120.0 * 255.0, atol=0.5)


def test_missing_or_empty_unpaired_path_is_refused_with_the_flag(tmp_path):
    with pytest.raises(CTMRIError, match="--unpaired-ct .*no such file"):
        read_unpaired_ct(tmp_path / "nowhere")
    with pytest.raises(CTMRIError):
        UnpairedSettings(paths=("x",), batch=0).check()


def test_slice_reader_takes_grey_from_rgba_and_refuses_colour(tmp_path):
    """The trainer's slice reader follows inference's rule (``volumes.as_scalar_3d``): grey stored as RGB(A), any
    alpha, is its grey; real colour is refused, not averaged."""
    grey = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))
    alpha = np.full_like(grey, 255)
    alpha[0, :] = 238  # the other hospital's screenshots: a semi-transparent frame
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([grey, grey, grey, alpha], -1), isVector=True), str(tmp_path / "g.png"))
    read = discovery._read_slice(tmp_path / "g.png")
    assert read.dtype == np.float32 and read.shape == grey.shape
    np.testing.assert_array_equal(read, grey)
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([grey, grey // 2, grey], -1), isVector=True), str(tmp_path / "c.png"))
    with pytest.raises(CTMRIError, match="c.png has 3 components per voxel .*give a single-channel grayscale"):
        discovery._read_slice(tmp_path / "c.png")


def test_real_clinical_ct_folder_reads_as_inference_sees_it(data_dir):
    folder = require(data_dir / "clinical_ct_t1_flair_2d" / "CT" / "Patient_03")
    files = sorted(folder.glob("*.png"))
    image = read_unpaired_ct(folder)
    array = sitk.GetArrayFromImage(image)
    assert array.shape[0] == len(files) == 12 and array.dtype == np.uint8
    first = discovery._read_slice(folder / "CT_PNG (1).png")
    np.testing.assert_array_equal(array[0], np.round(first).astype(np.uint8))  # "(1)" is the first slice
    grid = on_model_grid(image, WINDOW, 256)
    assert grid.shape == (12, 256, 256) and head_mask(grid).mean() > 0.2


def test_mri_quantiles_are_the_training_mri_inside_the_ct_head(cases_2d):
    q = mri_quantiles(cases_2d, 10.0)
    assert q.shape == QUANTILES.shape and np.all(np.diff(q) >= 0) and 0.0 <= q[0] and q[-1] <= 1.0
    pooled = np.concatenate([c.mri[head_mask(c.ct, 10.0)] for c in cases_2d])
    np.testing.assert_allclose(q, np.quantile(pooled, QUANTILES) / 255.0, rtol=1e-6)


@pytest.fixture(scope="module")
def cases_2d(phantom_slices):
    return discovery.discover([phantom_slices], WINDOW)


def _source(cases, **kw) -> UnpairedSource:
    volumes = [c.ct for c in cases[:2]]
    return UnpairedSource(volumes, mri_quantiles(cases, 10.0), UnpairedSettings(paths=("p",), **kw), 1, SCANNER, 5, 10.0)


def test_renderings_are_reproducible_share_geometry_and_differ_in_appearance(cases_2d):
    pytest.importorskip("torch")  # the augmentation's rotation uses torch's grid_sample
    source = _source(cases_2d, batch=3)
    plain, augmented = source.batch(epoch=2, step=4)
    again_plain, again_augmented = source.batch(epoch=2, step=4)
    other, _ = source.batch(epoch=2, step=5)
    assert plain.shape == augmented.shape == (3, 3, 256, 256)
    assert np.array_equal(plain.numpy(), again_plain.numpy()) and np.array_equal(augmented.numpy(), again_augmented.numpy())
    assert not np.array_equal(plain.numpy(), other.numpy())
    p, a = plain.numpy(), augmented.numpy()
    assert not a[p == 0].any()  # same geometry: the plain rendering's air stays exactly 0 in the augmented one
    assert (a > 0).sum() > 0.95 * (p > 0).sum()  # and the head is where it was (a dark window may clip a few voxels)
    assert np.abs(p - a)[p > 0].mean() > 0.005  # another window and scanner inside the head


@needs_torch
def test_consistency_and_prior_terms(cases_2d):
    import torch

    source = _source(cases_2d, batch=2)
    plain, _ = source.batch(epoch=0, step=0)
    head = plain[:, 1:2] > 10 / 255
    n = int(head.sum())
    # A prediction whose in-head values are distributed exactly as the target: prior ≈ 0.
    values = np.interp(np.linspace(0, 1, n), QUANTILES, source.target).astype(np.float32)
    matched = torch.zeros(2, 1, 256, 256)
    matched[head] = torch.from_numpy(np.random.default_rng(0).permutation(values))
    flat = torch.full((2, 1, 256, 256), float(np.median(source.target)))
    c0, p_matched = source.losses(matched, matched.clone(), plain)
    _, p_flat = source.losses(flat, flat, plain)
    assert float(c0) == 0.0 and float(p_matched) < 1e-4 < float(p_flat)  # a flat grey field is penalised
    # Consistency pulls the augmented rendering's prediction only; the plain one is the fixed target.
    pred_plain = flat.clone().requires_grad_(True)
    pred_aug = (flat + 0.1).requires_grad_(True)
    consistency, _ = source.losses(pred_plain, pred_aug, plain)
    assert float(consistency.detach()) == pytest.approx(0.01, rel=1e-5)
    consistency.backward()
    assert pred_plain.grad is None or float(pred_plain.grad.abs().sum()) == 0.0
    assert float(pred_aug.grad.abs().sum()) > 0


@needs_torch
def test_training_with_unpaired_ct_records_it_and_refuses_other_unpaired_settings_on_resume(cases_2d, tmp_path):
    from CTtoMRISynthesisLib.training.loop import TrainSettings, train
    from CTtoMRISynthesisLib.weights import read_config

    _disc_slices(tmp_path / "foreign", 6)
    unpaired = UnpairedSettings(paths=(str(tmp_path / "foreign"),), batch=2)
    settings = dict(epochs=2, base=4, context=1, lr=3e-3, num_workers=0, max_steps=2, device="cpu",
                    augment=SCANNER, threads=1, window=WINDOW, stop_after=1)
    run = tmp_path / "run"
    train(cases_2d[:2], TrainSettings(**settings, unpaired=unpaired), run, command="test", progress_bar=False)
    log = (run / "ranks" / "rank0.log").read_text()
    assert "unpaired consistency" in log and "prior" in log
    with pytest.raises(CTMRIError, match="unpaired"):
        train(cases_2d[:2], TrainSettings(**settings, unpaired=UnpairedSettings(paths=unpaired.paths, prior=2.0)), run,
              resume=True, command="test", progress_bar=False)
    settings["stop_after"] = 0
    train(cases_2d[:2], TrainSettings(**settings, unpaired=unpaired), run, resume=True, command="test", progress_bar=False)
    record = read_config(run / "model.safetensors")["training"]["unpaired"]
    assert record["paths"] == list(unpaired.paths) and record["slices"] == [6] and record["prior_weight"] == 1.0
    # Inference needs nothing of it: the model file is an ordinary one.
    assert json.dumps(read_config(run / "model.safetensors")["preprocessing"])


def test_mri_given_ct_is_the_training_mri_per_ct_grey_level(cases_2d):
    from CTtoMRISynthesisLib.training.unpaired import CT_BINS, mri_given_ct

    given = mri_given_ct(cases_2d, 10.0)
    assert given.shape == (CT_BINS, 256) and np.allclose(given.sum(axis=1), 1.0, atol=1e-5)
    ct = np.concatenate([c.ct[head_mask(c.ct, 10.0)] for c in cases_2d])
    mri = np.concatenate([c.mri[head_mask(c.ct, 10.0)] for c in cases_2d])
    busiest = np.bincount((ct * CT_BINS / 256).astype(int), minlength=CT_BINS).argmax()
    in_bin = (ct * CT_BINS / 256).astype(int) == busiest
    assert given[busiest] @ np.arange(256) == pytest.approx(np.round(mri[in_bin]).mean(), abs=0.01)
    empty = np.bincount((ct * CT_BINS / 256).astype(int), minlength=CT_BINS) == 0
    if empty.any():  # a CT grey level the training heads never have: the pooled MRI distribution
        np.testing.assert_allclose(given[np.argmax(empty)], np.bincount(np.round(mri).astype(int), minlength=256) / mri.size, atol=1e-6)


@needs_torch
def test_ct_conditioned_target_follows_the_batch_ct():
    """Two CT bins: dark CT → MRI bright (grey 200), mid CT → MRI grey 100. A batch with 30 % dark voxels
    asks for 30 % bright ones, a batch through a cyst with 60 % for 60 %: the prior follows the head's own
    CSF volume instead of one share for every batch."""
    import torch

    from CTtoMRISynthesisLib.training.unpaired import CT_BINS, conditioned_quantiles

    given = torch.zeros(CT_BINS, 256)
    given[:, 100] = 1.0
    given[2, 100], given[2, 200] = 0.0, 1.0  # CT 8..11 (0..255) is CSF-like
    for dark_share in (0.3, 0.6):
        ct = torch.cat([torch.full((int(1000 * dark_share),), 9 / 255), torch.full((1000 - int(1000 * dark_share),), 120 / 255)])
        target = conditioned_quantiles(ct, given).numpy() * 255
        np.testing.assert_allclose(np.mean(target > 150), dark_share, atol=0.011)
        assert set(np.round(target).astype(int)) == {100, 200}


@needs_torch
def test_ct_conditioned_prior_term(cases_2d):
    """With ``by_ct`` the prior is ~0 for a prediction distributed as the batch's own conditioned target
    and not for one distributed as the pooled target."""
    import torch

    from CTtoMRISynthesisLib.training.unpaired import conditioned_quantiles, mri_given_ct

    given = mri_given_ct(cases_2d, 10.0)
    source = UnpairedSource([c.ct for c in cases_2d[:2]], mri_quantiles(cases_2d, 10.0),
                            UnpairedSettings(paths=("p",), batch=2, by_ct=True), 1, SCANNER, 5, 10.0, given)
    plain, _ = source.batch(epoch=0, step=0)
    head = plain[:, 1:2] > 10 / 255
    target = conditioned_quantiles(plain[:, 1:2][head], torch.from_numpy(given)).numpy()
    n = int(head.sum())
    rng = np.random.default_rng(0)

    def spread(quantiles):
        prediction = torch.zeros(2, 1, 256, 256)
        prediction[head] = torch.from_numpy(rng.permutation(np.interp(np.linspace(0, 1, n), QUANTILES, quantiles)).astype(np.float32))
        return prediction

    _, p_own = source.losses(spread(target), spread(target), plain)
    _, p_pooled = source.losses(spread(source.target), spread(source.target), plain)
    assert float(p_own) < 2e-4 and float(p_pooled) > 5 * float(p_own)


def test_an_unpaired_checkpoint_from_before_by_ct_still_resumes(tmp_path):
    from dataclasses import asdict

    from CTtoMRISynthesisLib.training.loop import TrainSettings, _check_resumable

    settings = TrainSettings(unpaired=UnpairedSettings(paths=("a",)))
    saved = json.loads(json.dumps(asdict(settings), default=str))
    del saved["unpaired"]["by_ct"]  # as the round-7 checkpoints were written
    _check_resumable(saved, settings, tmp_path)
    with pytest.raises(CTMRIError, match="unpaired"):
        _check_resumable(saved, TrainSettings(unpaired=UnpairedSettings(paths=("a",), by_ct=True)), tmp_path)


@needs_torch
def test_ctmri_train_flags_reach_the_model_file(phantom_slices, tmp_path):
    """``--unpaired-prior-by-ct`` and ``--aug-contrast`` from the command line into the weights config."""
    import phantoms
    from CTtoMRISynthesisLib.cli import main as ctmri
    from CTtoMRISynthesisLib.weights import read_config

    _disc_slices(tmp_path / "foreign", 4)
    run = tmp_path / "run"
    assert ctmri(phantoms.tiny_train_args(phantom_slices, run, "--aug-contrast", "0.3", "--unpaired-ct",
                                          str(tmp_path / "foreign"), "--unpaired-prior-by-ct", "--unpaired-batch", "2")) == 0
    training = read_config(run / "model.safetensors")["training"]
    assert training["augmentation"]["contrast"] == 0.3
    assert training["unpaired"]["prior_by_ct"] is True and training["unpaired"]["batch"] == 2


def test_a_paired_patients_ct_given_as_unpaired_ct_is_refused(phantom_slices, tmp_path, capsys):
    """``--unpaired-ct`` naming the CT of a patient of ``--data`` (held out in a cross-validation, its CT would be
    trained on) is refused before any fold trains; other patients' CTs pass. Needs no PyTorch: refused first."""
    from CTtoMRISynthesisLib.cli import main as ctmri
    import phantoms

    (tmp_path / "p28").mkdir()
    for path in sorted((phantom_slices / "CT").glob("28???.png")):
        (tmp_path / "p28" / path.name).write_bytes(path.read_bytes())
    _disc_slices(tmp_path / "foreign", 4)
    code = ctmri(phantoms.tiny_train_args(phantom_slices, tmp_path / "run", "--cv", "loo", "--unpaired-ct",
                                         str(tmp_path / "foreign"), str(tmp_path / "p28")))
    err = capsys.readouterr().err
    assert code == 2 and "repeats the CT of patient 28 of --data" in err and "leave that path out" in err, err
    assert not (tmp_path / "run").exists()
    cases = discovery.discover([phantom_slices], WINDOW)
    others = [c for c in cases if c.case_id != "28"]
    check_not_paired(UnpairedSettings(paths=(str(tmp_path / "p28"),)), others, WINDOW, 256)  # 28 not paired: fine


def test_the_same_patient_threshold_on_real_ct(harvard_dir, data_dir, tmp_path):
    """The real patients: a Harvard patient's own CT folder is found (distance 0) and named; the other
    hospital's CTs stay far above SAME_SLICE_MAE from every Harvard patient."""
    cases = discovery.discover([harvard_dir], WINDOW)
    (tmp_path / "p32").mkdir()
    for path in sorted((harvard_dir / "CT").glob("32???.png")):
        (tmp_path / "p32" / path.name).write_bytes(path.read_bytes())
    assert closest_paired_slice(on_model_grid(read_unpaired_ct(tmp_path / "p32"), WINDOW, 256), cases) == (0.0, "32")
    clinical = require(data_dir / "clinical_ct_t1_flair_2d" / "CT" / "Patient_01")
    distance, _ = closest_paired_slice(on_model_grid(read_unpaired_ct(clinical), WINDOW, 256), cases)
    assert distance > 3 * SAME_SLICE_MAE
