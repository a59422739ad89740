"""The learned uncertainty (error_model.py): features that are in-plane and slab-independent, a fit that
finds where the error is when there is something to find (and not when there is not), a model file that
carries it and loads it back, synthesis and the CV report that use it, and the shipped model that has one.

Fitting data here are synthetic images (no licensed data); the shipped file's recorded numbers come from
``python -m CTtoMRISynthesisLib.error_model`` on the Harvard CV runs (model_weights/README.md).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import spearmanr

import phantoms
from CTtoMRISynthesisLib.error_model import (FEATURES, PREFIX, ErrorModel, Sample, attach, features, from_state,
                                             split_state)
from CTtoMRISynthesisLib.errors import CTMRIError
from CTtoMRISynthesisLib.weights import read_config, read_weights_file, save_state, sha256_of

# Features and inference are numpy only and also run in the Slicer-stack CI jobs (.ci/run); fitting needs PyTorch.
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")
ROOT = Path(__file__).resolve().parent.parent


def _sample(seed: int, error_at_edges: bool = True, z: int = 4, n: int = 64) -> Sample:
    """A smooth 'synthetic MRI' of blobs; the 'real MRI' differs from it by noise that is large at the
    blobs' edges (``error_at_edges``) or the same everywhere."""
    rng = np.random.default_rng(seed)
    mean = ndimage.gaussian_filter((rng.random((z, n // 8, n // 8)) > 0.5).repeat(8, 1).repeat(8, 2) * 150.0 + 50.0,
                                   (0, 1.5, 1.5)).astype(np.float32)
    edge = np.hypot(ndimage.sobel(mean, 1), ndimage.sobel(mean, 2))
    sd = 2.0 + (40.0 * edge / edge.max() if error_at_edges else 10.0)
    real = mean + rng.normal(0.0, 1.0, mean.shape).astype(np.float32) * sd
    head = np.zeros(mean.shape, bool)
    head[:, 4:-4, 4:-4] = True
    spread = np.abs(rng.normal(3.0, 1.0, mean.shape)).astype(np.float32)
    return Sample(f"p{seed}", mean, spread, real.astype(np.float32), head)


def _tiny_error_model(names=FEATURES, hidden: int = 4) -> ErrorModel:
    rng = np.random.default_rng(0)
    widths = [len(names), hidden, hidden, 1]
    layers = [(rng.normal(0, 0.3, (a, b)).astype(np.float32), rng.normal(0, 0.1, b).astype(np.float32))
              for a, b in zip(widths[:-1], widths[1:])]
    return ErrorModel(layers, np.zeros(len(names), np.float32), np.full(len(names), 50.0, np.float32), 30.0, names)


def test_features_are_in_plane_slab_independent_and_flat_where_the_image_is():
    """Each slice's features depend on that slice only (so slabs can be processed apart), and a constant
    image has no gradient or texture: the gradient is in-plane (scipy's gaussian_gradient_magnitude with σ 0
    along z would return the image itself as a z "derivative")."""
    s = _sample(1, z=20)  # more slices than one slab
    whole = features(s.mean, s.spread, s.head)
    apart = np.concatenate([features(s.mean[i:i + 1], s.spread[i:i + 1], s.head[i:i + 1]) for i in range(20)])
    assert whole.shape == (int(s.head.sum()), len(FEATURES)) and np.allclose(whole, apart, atol=1e-4)
    flat = np.full((2, 32, 32), 120.0, np.float32)
    f = features(flat, np.zeros_like(flat), np.ones(flat.shape, bool))
    named = dict(zip(FEATURES, f.T))
    assert all(np.abs(named[n]).max() < 1e-3 for n in FEATURES if n.startswith(("grad", "local_sd")))
    assert np.allclose(named["intensity"], 120.0)
    with pytest.raises(CTMRIError, match="one"):
        features(flat, np.zeros((1, 32, 32), np.float32), np.ones(flat.shape, bool))


def test_depth_measures_the_distance_to_the_head_edge_per_slice():
    """``depth``: 1 px on the head's edge voxels, growing inward, per slice (a slice's own edge, not its
    neighbour's); a head that fills the slice has its edge at the border; ``depth_rel`` is 1 at each slice's
    deepest voxel; a slice without head gives nothing."""
    yy, xx = np.mgrid[:41, :41]
    head = np.zeros((3, 41, 41), bool)
    head[0] = (yy - 20) ** 2 + (xx - 20) ** 2 <= 15**2  # a disc of radius 15
    head[1] = True  # the head fills the slice
    zeros = np.zeros(head.shape, np.float32)
    depth, rel = features(zeros, zeros, head, ("depth", "depth_rel")).T
    disc = head[0][head[0]].size
    d0, r0 = depth[:disc], rel[:disc]
    inside = np.zeros((41, 41), np.float32)
    inside[head[0]] = d0
    # the disc's nearest outside voxel from the centre is (1, 15) px away (16 px straight along an axis)
    assert inside[20, 5] == 1.0 and inside[20, 20] == pytest.approx(np.hypot(1, 15)) and d0.min() == 1.0
    assert r0.max() == 1.0 and r0[np.argmax(d0)] == 1.0 and r0.min() == pytest.approx(1 / np.hypot(1, 15))
    full = np.zeros((41, 41), np.float32)
    full[head[1]] = depth[disc:]
    assert full[0, 20] == 1.0 and full[20, 20] == 21.0, "a head that fills the slice ends at the border"
    assert depth.size == head.sum(), "slice 2 has no head and contributes no rows"


def test_ct_features_need_the_ct_on_the_prediction_grid():
    """The CT features read the windowed CT on the model grid; without it (or on another grid) the error is clear, and
    they are the CT's own intensity, edges and texture."""
    mean = np.full((2, 32, 32), 100.0, np.float32)
    head = np.ones(mean.shape, bool)
    names = ("intensity", "ct", "ct_grad1", "ct_local_sd3")
    with pytest.raises(CTMRIError, match="need the CT"):
        features(mean, mean, head, names)
    with pytest.raises(CTMRIError, match="need the CT"):
        features(mean, mean, head, names, ct=np.zeros((2, 16, 16), np.float32))
    ct = np.zeros(mean.shape, np.float32)
    ct[:, :, 16:] = 200.0  # a vertical edge in the CT only
    f = dict(zip(names, features(mean, mean, head, names, ct=ct).T))
    assert np.allclose(f["intensity"], 100.0) and set(np.unique(f["ct"])) == {0.0, 200.0}
    at_edge = (np.zeros((2, 32, 32), bool))
    at_edge[:, :, 15:17] = True
    assert f["ct_grad1"][at_edge[head]].min() > 10 and f["ct_grad1"][~at_edge[head]].min() < f["ct_grad1"].max() / 2
    assert f["ct_local_sd3"][at_edge[head]].min() > 50 and f["ct_local_sd3"][:, ].min() == 0.0
    with pytest.raises(CTMRIError, match="unknown error-model feature 'ct_sharpness'"):
        features(mean, mean, head, ("ct_sharpness",), ct=ct)


def test_inference_is_zero_outside_the_head_nonnegative_and_capped():
    model = _tiny_error_model()
    s = _sample(2)
    out = model.predict(s.mean, s.spread, s.head)
    assert out.shape == s.mean.shape and out.dtype == np.float32
    assert not out[~s.head].any() and out.min() >= 0.0 and out.max() <= 127.5
    assert np.allclose(out[s.head], model.expected_error(features(s.mean, s.spread, s.head)))


def test_threads_and_row_blocks_do_not_change_the_map(monkeypatch):
    """The map is computed in slabs (several at once with ``threads``) and the perceptron in blocks of rows (for
    memory). The number of threads changes no voxel: 1, 3 and 8 threads give the same bits. Slabs and blocks
    change at most float32 rounding: three slabs and blocks of 1,000 rows against one slab and one block. BLAS may
    multiply a block of fewer rows with another kernel. OpenBLAS 0.3.23 (NumPy 1.26.1, Slicer 5.6's) on a Xeon VM
    gave up to 4.8e-7 grey levels for blocks below ~6,500 rows. A slab's failure in a thread reaches the caller."""
    import CTtoMRISynthesisLib.error_model as em

    model = _tiny_error_model()
    s = _sample(3, z=5, n=64)
    whole = model.predict(s.mean, s.spread, s.head)
    monkeypatch.setattr(em, "SLAB", 2)  # 3 slabs of the 5 slices
    monkeypatch.setattr(em, "ROWS", 1000)  # 3,136 head voxels a slice: blocks that end mid-slice
    one_thread = model.predict(s.mean, s.spread, s.head, threads=1)
    np.testing.assert_allclose(one_thread, whole, rtol=0, atol=1e-5)  # the map is 0..127.5 grey levels
    for threads in (3, 8):
        np.testing.assert_array_equal(model.predict(s.mean, s.spread, s.head, threads=threads), one_thread)
    # the slabs do run in several threads (each slab's features held up a little, so that one thread cannot take all)
    import threading
    import time

    seen: set = set()
    features_of = em.features

    def slow_features(*args, **kwargs):
        seen.add(threading.get_ident())
        time.sleep(0.05)
        return features_of(*args, **kwargs)

    monkeypatch.setattr(em, "features", slow_features)
    np.testing.assert_array_equal(model.predict(s.mean, s.spread, s.head, threads=3), one_thread)
    assert len(seen) > 1
    seen.clear()
    model.predict(s.mean, s.spread, s.head)
    assert seen == {threading.get_ident()}  # one thread by default: the caller's
    with pytest.raises(CTMRIError, match="must be one"):
        model.predict(s.mean, s.spread, s.head[:, :, :-1], threads=3)


def test_file_round_trip_needs_no_torch_and_refuses_broken_error_models(tmp_path):
    """The error model's tensors and config go into a model file beside the network's and come back equal;
    a file whose error model does not fit its features, or tensors without config, is refused clearly."""
    model = _tiny_error_model()
    source = tmp_path / "net.safetensors"
    save_state(source, {"w": np.ones(3, np.float32)}, {"model": {}, "preprocessing": {}})
    before = sha256_of(source)
    out = tmp_path / "with.safetensors"
    attach(source, out, model)
    assert sha256_of(source) == before, "the input model file is never modified"
    blob = read_weights_file(out, framework="numpy")
    unet, error = split_state(blob["state_dict"])
    assert list(unet) == ["w"] and all(k.startswith(PREFIX) for k in error)
    again = from_state(blob["config"]["error_model"], error)
    s = _sample(3)
    assert np.array_equal(again.predict(s.mean, s.spread, s.head), model.predict(s.mean, s.spread, s.head))
    broken = dict(error)
    broken[PREFIX + "weight1"] = np.ones((3, 4), np.float32)
    with pytest.raises(CTMRIError, match="error model"):
        from_state(blob["config"]["error_model"], broken)
    with pytest.raises(CTMRIError, match="error model"):
        from_state({k: v for k, v in blob["config"]["error_model"].items() if k != "features"}, error)
    # a feature this version does not know (a newer file) is refused when the file is read, not after synthesis
    for name in ("ct_sharpness", 7):
        renamed = dict(blob["config"]["error_model"], features=["spread"] * (len(model.names) - 1) + [name])
        with pytest.raises(CTMRIError, match=f"unknown error-model feature {name!r}.*newer CTtoMRISynthesis"):
            from_state(renamed, error)


def test_cli_refuses_a_misspelt_feature_before_reading_anything(tmp_path, capsys):
    """``--features`` with a name no feature has: one error naming the known ones, before the CV runs (here
    missing) or the weights are read."""
    from CTtoMRISynthesisLib.error_model import main as error_model_main

    out = tmp_path / "out.safetensors"
    args = ["--data", str(tmp_path / "no-data"), "--from-cv", str(tmp_path / "no-run"), "--weights",
            str(tmp_path / "no.safetensors"), "--out", str(out), "--features", "spread", "ct_grd1"]
    assert error_model_main(args) == 2
    err = capsys.readouterr().err
    assert "unknown error-model feature 'ct_grd1'" in err and "ct_grad<px>" in err and not out.exists()


@needs_torch
def test_fit_finds_where_the_error_is_and_only_when_it_is_there():
    """Fit on three samples, test on a fourth: where the error grows at edges the map ranks voxels by error
    (Spearman well above 0); where the error is the same everywhere it cannot, and does not pretend to."""
    from CTtoMRISynthesisLib.error_model import fit

    for at_edges, check in ((True, lambda r: r > 0.3), (False, lambda r: abs(r) < 0.1)):
        train = [_sample(seed, at_edges) for seed in (10, 11, 12)]
        model = fit(train, hidden=16, steps=300, batch=1024)
        test = _sample(13, at_edges)
        rho = spearmanr(model.predict(test.mean, test.spread, test.head)[test.head],
                        np.abs(test.real - test.mean)[test.head]).statistic
        assert check(rho), f"error at edges: {at_edges}; Spearman {rho:.3f}"
    assert model.info["trained_on"] == ["p10", "p11", "p12"] and model.scale > 0


@needs_torch
def test_fit_uses_the_ct_and_the_depth_when_the_error_lies_there():
    """Where the error follows the CT (large where the CT is dark, which the prediction does not show) or lies
    at the head's edge, a fit with those features ranks it on a patient it has not seen; without them it
    cannot."""
    from CTtoMRISynthesisLib.error_model import fit

    def sample(seed: int, cause: str) -> Sample:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:64, :64]
        head = np.broadcast_to((yy - 32) ** 2 + (xx - 32) ** 2 <= 28**2, (4, 64, 64)).copy()
        mean = np.full(head.shape, 120.0, np.float32)  # a flat prediction: nothing in it says where the error is
        ct = ndimage.gaussian_filter(rng.random(head.shape), (0, 4, 4)).astype(np.float32) * 255
        sd = np.where(ct < np.median(ct), 40.0, 3.0) if cause == "ct" else np.where(features(
            mean, mean, head, ("depth",)).reshape(-1) < 5, 40.0, 3.0)
        real = mean.copy()
        real[head] += (rng.normal(0.0, 1.0, int(head.sum())) * (sd[head] if cause == "ct" else sd)).astype(np.float32)
        return Sample(f"p{seed}", mean, np.ones(head.shape, np.float32), real, head, ct)

    # each cause with the inputs that carry it, and "blind" with the other cause's inputs: they vary from voxel
    # to voxel too, but say nothing about this error
    carriers = {"ct": ("intensity", "ct", "ct_local_sd3"), "depth": ("intensity", "depth", "depth_rel")}
    for cause, blind_to in (("ct", "depth"), ("depth", "ct")):
        train, test = [sample(seed, cause) for seed in (20, 21, 22)], sample(23, cause)
        err = np.abs(test.real - test.mean)[test.head]
        rho, blind = (spearmanr(test.predict_with(fit(train, names=carriers[c], hidden=16, steps=300, batch=1024))[test.head],
                                err).statistic for c in (cause, blind_to))
        assert rho > 0.4 and abs(blind) < 0.1, f"{cause}: Spearman {rho:.3f}, blind to it {blind:.3f}"


@needs_torch
def test_loaded_model_carries_its_error_model_into_synthesis(tmp_path, monkeypatch):
    """load_model keeps the U-Net's tensors strict and builds the error model beside it; the pipeline then
    writes the error map as the uncertainty (its own timed stage), with the same synthetic MRI, and the
    report's prediction of a case applies it the same way."""
    from types import SimpleNamespace

    import SimpleITK as sitk

    from CTtoMRISynthesisLib.pipeline import synthesize
    from CTtoMRISynthesisLib.synthesis import predict_volume, preprocessing_options
    from CTtoMRISynthesisLib.training.report import predict_case
    from CTtoMRISynthesisLib.weights import load_model

    plain = phantoms.train_tiny_model(tmp_path / "tiny.safetensors", steps=5)
    model = _tiny_error_model()
    attach(plain, tmp_path / "with.safetensors", model)
    loaded, bare = load_model(tmp_path / "with.safetensors"), load_model(plain)
    assert bare.error_model is None and loaded.error_model is not None
    ct = np.clip(ndimage.gaussian_filter(np.random.default_rng(0).random((3, 64, 64)) * 255, 3), 0, 255).astype(np.float32)
    ct[:, 20:44, 20:44] = 200.0
    without = predict_volume(bare.net, ct, **preprocessing_options(bare.config["preprocessing"]))
    with_map = predict_case(loaded, SimpleNamespace(ct=ct))
    assert np.array_equal(with_map.mean, without.mean)
    assert np.allclose(with_map.spread, model.predict(without.mean, without.spread, without.head))
    assert not with_map.spread[~with_map.head].any()

    image = sitk.GetImageFromArray(ct.astype(np.uint8))  # an 8-bit windowed CT
    image.SetSpacing((0.9, 0.9, 5.0))
    import torch

    asked: list = []
    predict = type(loaded.error_model).predict
    monkeypatch.setattr(type(loaded.error_model), "predict",
                        lambda self, *a, threads=1, **k: asked.append(threads) or predict(self, *a, threads=threads, **k))
    a, b = synthesize(image, None, model=loaded, device="cpu"), synthesize(image, None, model=bare, device="cpu")
    assert asked == [torch.get_num_threads()]  # the error map gets the CPU threads PyTorch was given
    assert "error map" in a.stage_seconds and "error map" not in b.stage_seconds
    assert np.array_equal(sitk.GetArrayFromImage(a.synthetic_mri), sitk.GetArrayFromImage(b.synthetic_mri))
    unc = sitk.GetArrayFromImage(a.uncertainty)
    assert not np.allclose(unc, sitk.GetArrayFromImage(b.uncertainty)) and unc.min() >= 0.0
    assert a.uncertainty_mean == pytest.approx(float(unc[unc > 0].mean()), rel=0.05)

    save_state(tmp_path / "orphan.safetensors", {**read_weights_file(plain, framework="numpy")["state_dict"],
                                                 PREFIX + "feature_mean": np.zeros(10, np.float32)}, read_config(plain))
    with pytest.raises(CTMRIError, match="error-model tensors but no"):
        load_model(tmp_path / "orphan.safetensors")


@needs_torch
def test_synthesis_and_the_report_give_the_error_model_the_ct_the_network_saw(tmp_path):
    """An error model with CT and depth features: the pipeline and the report's case prediction hand it the
    windowed CT on the model grid (the network's input), so its map is the one computed from that CT."""
    from types import SimpleNamespace

    import SimpleITK as sitk

    from CTtoMRISynthesisLib.pipeline import synthesize
    from CTtoMRISynthesisLib.synthesis import predict_volume, preprocessing_options
    from CTtoMRISynthesisLib.training.report import predict_case
    from CTtoMRISynthesisLib.weights import load_model

    plain = phantoms.train_tiny_model(tmp_path / "tiny.safetensors", steps=5)
    names = FEATURES + ("depth", "depth_rel", "ct", "ct_grad1", "ct_local_sd3")
    weight = np.zeros((len(names), 1), np.float32)
    weight[names.index("ct"), 0] = weight[names.index("depth"), 0] = 0.01  # error = 0.3 × (CT + depth): never all 0
    model = ErrorModel([(weight, np.zeros(1, np.float32))], np.zeros(len(names), np.float32),
                       np.ones(len(names), np.float32), 30.0, names)
    attach(plain, tmp_path / "with.safetensors", model)
    loaded, bare = load_model(tmp_path / "with.safetensors"), load_model(plain)
    size = int(bare.config["preprocessing"]["size"])
    ct = np.round(ndimage.gaussian_filter(np.random.default_rng(1).random((3, size, size)), (0, 3, 3)) * 200 + 20)
    ct = ct.astype(np.float32)
    ct[:, size // 4:-size // 4, size // 4:-size // 4] = 255.0
    ct[:, :4] = 0.0  # 0 and 255 present: the pipeline's per-volume min-max leaves this CT as it is
    without = predict_volume(bare.net, ct, **preprocessing_options(bare.config["preprocessing"]))
    expected = model.predict(without.mean, without.spread, without.head, ct)
    assert expected.max() > 10 and np.allclose(predict_case(loaded, SimpleNamespace(ct=ct)).spread, expected)

    image = sitk.GetImageFromArray(ct.astype(np.uint8))  # already on the model grid: resampling keeps it
    got = sitk.GetArrayFromImage(synthesize(image, None, model=loaded, device="cpu").uncertainty)
    assert np.allclose(got, expected, atol=1e-3)

    # a model file that blurs a grainy CT before its network (grain matching): the error model still gets the CT
    # as windowed, the one it was fit on (cv_samples' case.ct), not the network's blurred copy
    config = read_config(tmp_path / "with.safetensors")
    config["preprocessing"].update(ct_grain_target=0.01, ct_grain_max_blur_px=2.0)
    save_state(tmp_path / "grain.safetensors", read_weights_file(tmp_path / "with.safetensors")["state_dict"], config)
    grainy = load_model(tmp_path / "grain.safetensors")
    result = synthesize(image, None, model=grainy, device="cpu")
    assert result.normalisation.get("ct_grain_blur_px", 0) > 0, "the network saw a blurred CT"
    blurred = predict_volume(grainy.net, ct, **preprocessing_options(config["preprocessing"]))
    expected = model.predict(blurred.mean, blurred.spread, blurred.head, ct)
    assert np.allclose(sitk.GetArrayFromImage(result.uncertainty), expected, atol=1e-3)
    assert np.allclose(predict_case(grainy, SimpleNamespace(ct=ct)).spread, expected)


@needs_torch
def test_cv_report_scores_the_error_model_refit_without_each_patient(phantom_slices, tmp_path):
    """``ctmri report --from-cv RUN RUN --attach FILE`` with an error model in FILE: each held-out patient's
    uncertainty is the error model fit on the other patients' held-out errors (nested leave-one-out)."""
    import csv

    from CTtoMRISynthesisLib.cli import main as ctmri
    from CTtoMRISynthesisLib.error_model import cross_validated_maps, cv_samples
    from CTtoMRISynthesisLib.intensity import CTWindow
    from CTtoMRISynthesisLib.training.discovery import discover
    from CTtoMRISynthesisLib.training.report import uncertainty_quality

    runs = phantoms.tiny_cv_runs(phantom_slices, tmp_path)
    model_file = next(runs[0].glob("fold*/model.safetensors"))
    cases = discover([phantom_slices], CTWindow(45.0, 120.0))
    samples = cv_samples(runs, cases)
    recipe = {"hidden": 8, "steps": 30, "seed": 0}
    attach(model_file, tmp_path / "with.safetensors", _tiny_error_model())
    config = read_config(tmp_path / "with.safetensors")
    config["error_model"].update(recipe, excluded_from_training=["2"])  # as recorded by the CLI's option
    save_state(tmp_path / "with.safetensors", read_weights_file(tmp_path / "with.safetensors")["state_dict"], config)
    out = tmp_path / "report"
    assert ctmri(["report", "--data", str(phantom_slices), "--from-cv", *map(str, runs), "--out", str(out),
                  "--attach", str(tmp_path / "with.safetensors")]) == 0
    maps = cross_validated_maps(samples, exclude=("2",), **recipe)
    with open(out / "per_patient.csv") as fh:
        rows = {r["patient"]: r for r in csv.DictReader(fh) if r["method"] == "model"}
    for s in samples:
        expected = uncertainty_quality(s.real, s.mean, maps[s.case_id], s.head)
        assert float(rows[s.case_id]["unc_mean"]) == pytest.approx(expected["unc_mean"], rel=1e-4)
    assert "nested leave-one-out" in (out / "report.md").read_text()


@needs_torch
def test_cli_fits_without_excluded_patients_and_still_scores_them(phantom_slices, tmp_path, capsys):
    """``--exclude-from-training 2``: patient 2's errors teach no fit (neither the file's error model nor the
    nested ones of the other patients), patient 2 still gets its nested Spearman; both are on record."""
    from CTtoMRISynthesisLib.ensemble import combine
    from CTtoMRISynthesisLib.error_model import main as error_model_main

    runs = phantoms.tiny_cv_runs(phantom_slices, tmp_path)
    ensemble = tmp_path / "ens.safetensors"
    combine([next(r.glob("fold*/model.safetensors")) for r in runs], ensemble)
    out = tmp_path / "with.safetensors"
    args = ["--data", str(phantom_slices), "--from-cv", *map(str, runs), "--weights", str(ensemble), "--steps", "20"]
    assert error_model_main(args + ["--out", str(out), "--exclude-from-training", "2"]) == 0
    recipe = read_config(out)["error_model"]
    assert recipe["trained_on"] == ["16", "20", "28"] and recipe["excluded_from_training"] == ["2"]
    assert sorted(recipe["cv_spearman"]) == ["16", "2", "20", "28"]
    assert "fit on 3 patients" in capsys.readouterr().out
    assert error_model_main(args + ["--out", str(tmp_path / "bad.safetensors"), "--exclude-from-training", "9"]) == 2
    assert "unknown patient id(s) ['9']" in capsys.readouterr().err and not (tmp_path / "bad.safetensors").exists()
    ensemble_bytes = ensemble.read_bytes()
    assert error_model_main(args + ["--out", str(ensemble)]) == 2  # --out = --weights: refused before the fits
    assert "--out " + str(ensemble) + " is the model file it is made from" in capsys.readouterr().err
    assert ensemble.read_bytes() == ensemble_bytes


@needs_torch
def test_unfinished_repeated_or_mixed_cv_runs_are_refused_and_one_run_does_not_crash(phantom_slices, tmp_path, capsys):
    """``report --from-cv`` took one fold of two as "Cross-validated results" (and ``--attach`` wrote it into the
    model's config); ``error_model`` took the same run twice and a k-fold run with a leave-one-out one, and
    crashed (TypeError) after its fits when the runs' predictions did not differ."""
    import shutil

    from CTtoMRISynthesisLib.cli import main as ctmri
    from CTtoMRISynthesisLib.error_model import main as error_model_main

    run = phantoms.tiny_cv_runs(phantom_slices, tmp_path, seeds=(0,))[0]
    model_file = next(run.glob("fold*/model.safetensors"))
    attached = tmp_path / "attach.safetensors"
    shutil.copy(model_file, attached)
    shutil.copy(str(model_file) + ".sha256", str(attached) + ".sha256")
    before = attached.read_bytes()
    half = tmp_path / "half"
    assert ctmri(phantoms.tiny_train_args(phantom_slices, half, "--cv", "kfold", "--folds", "2", "--only-folds", "1")) == 0
    capsys.readouterr()
    assert ctmri(["report", "--data", str(phantom_slices), "--from-cv", str(half), "--out", str(tmp_path / "r"),
                  "--attach", str(attached)]) == 2
    assert f"{half} is an unfinished cross-validation: fold(s) [2] of 2 are not trained" in capsys.readouterr().err
    assert attached.read_bytes() == before and not (tmp_path / "r" / "report.md").exists()
    loo = tmp_path / "loo"
    assert ctmri(phantoms.tiny_train_args(phantom_slices, loo, "--cv", "loo", "--only-folds", "1")) == 0
    shutil.rmtree(loo / "fold01" / "ranks", ignore_errors=True)
    base = ["--data", str(phantom_slices), "--weights", str(model_file), "--steps", "5"]
    for runs, said in (([run, run], "named more than once"), ([run, loo], "unfinished cross-validation"),
                       ([half], "unfinished cross-validation")):
        capsys.readouterr()
        assert error_model_main(base + ["--from-cv", *map(str, runs), "--out", str(tmp_path / "e.safetensors")]) == 2
        assert said in capsys.readouterr().err
    for k in range(2, 5):  # the leave-one-out run finished (4 patients): a complete run of another scheme
        shutil.copytree(loo / "fold01", loo / f"fold{k:02d}")
        record = json.loads((loo / f"fold{k:02d}" / "fold.json").read_text())
        record["split"]["mode"] = f"leave-one-patient-out: fold {k} of 4"
        (loo / f"fold{k:02d}" / "fold.json").write_text(json.dumps(record))
        (loo / f"fold{k:02d}" / "model.safetensors").unlink()
    assert error_model_main(base + ["--from-cv", str(run), str(loo), "--out", str(tmp_path / "e.safetensors")]) == 2
    assert "different schemes" in capsys.readouterr().err
    assert error_model_main(base + ["--from-cv", str(run), "--out", str(tmp_path / "e.safetensors")]) == 0
    assert "members' SD n/a (a constant map)" in capsys.readouterr().out


def test_out_replaces_only_a_model_file_and_is_checked_before_anything_is_read(tmp_path, capsys):
    """``--out`` naming an existing file of another kind replaced it after minutes of fits: refused first."""
    from CTtoMRISynthesisLib.error_model import main as error_model_main

    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes")
    missing = str(tmp_path / "missing")  # nothing else is read before --out is checked
    assert error_model_main(["--data", missing, "--from-cv", missing, "--weights", missing, "--out", str(notes)]) == 2
    assert f"--out: {notes} exists and is not a ctmri model file" in capsys.readouterr().err
    assert notes.read_text() == "my notes"
    assert error_model_main(["--data", missing, "--from-cv", missing, "--weights", missing,
                             "--out", str(tmp_path / "e.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: before anything is read
        error_model_main(["--data", missing, "--from-cv", missing, "--weights", missing, "--out", str(notes),
                          "--steps", "0"])
    assert "--steps: 0: give at least 1" in capsys.readouterr().err


def test_shipped_model_has_an_error_model_with_its_cross_validated_record():
    """The shipped file's error model: the features this code computes, fit on the 7 Harvard T2 patients
    (patient 2, FLAIR/PD-like, excluded), with its leave-one-patient-out Spearman recorded for all 8 (the
    numbers in model_weights/README.md)."""
    weights = ROOT / "model_weights" / "ctmri_unet.safetensors"
    config = read_config(weights)["error_model"]
    assert config["features"] == list(FEATURES) and len(config["trained_on"]) == 7
    rho = config["cv_spearman"]
    assert sorted(rho) == sorted(config["trained_on"] + ["2"]) and all(-1 <= v <= 1 for v in rho.values())
    blob = read_weights_file(weights, framework="numpy")
    model = from_state(config, split_state(blob["state_dict"])[1])
    assert model.scale > 0 and len(model.layers) == 3
