"""Noise-grain matching (CTtoMRISynthesisLib/grain.py) on the synthetic phantom CT: the measure, the blur it
chooses, the model-file key, and what predict_volume does with it. Numpy/SciPy only, except the last test."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from CTtoMRISynthesisLib.errors import CTMRIError
from CTtoMRISynthesisLib.grain import CAP_KEY, FILTER_KEY, KEY, grain, match_grain, set_target, training_target
from CTtoMRISynthesisLib.weights import read_config, read_weights_file, sha256_of


@pytest.fixture(scope="module")
def ct255(phantom_pair) -> np.ndarray:
    """The Harvard-like phantom CT (z, 256, 256) on 0..255, float32."""
    return sitk.GetArrayFromImage(phantom_pair[0]).astype(np.float32)


def _grainy(ct: np.ndarray, sd: float, seed: int = 0) -> np.ndarray:
    """The CT with spatially correlated noise (grains of ~1.5 px) added inside the head, clipped to 0..255."""
    from scipy import ndimage

    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(ct.shape), (0, 1.5, 1.5))
    noise *= sd / noise.std()
    return np.clip(np.where(ct > 10, ct + noise, ct), 0, 255).astype(np.float32)


def test_grain_rises_with_noise_and_falls_with_blur(ct255) -> None:
    from scipy import ndimage

    clean, noisy = grain(ct255), grain(_grainy(ct255, 20.0))
    assert clean is not None and noisy > 2 * clean
    assert grain(ndimage.gaussian_filter(_grainy(ct255, 20.0), (0, 1.5, 1.5))) < noisy


def test_a_ct_at_or_below_the_target_is_left_exactly_as_it_was(ct255) -> None:
    out, note = match_grain(ct255, grain(ct255) + 0.5)
    assert out is ct255 and note["ct_grain_blur_px"] == 0.0
    assert match_grain(ct255, None) == (ct255, {})  # a model file without the key: nothing measured or done


def test_a_grainier_ct_is_blurred_down_to_the_target(ct255) -> None:
    target = grain(_grainy(ct255, 12.0))  # reachable from SD 20 within the largest blur
    noisy = _grainy(ct255, 20.0, seed=1)
    out, note = match_grain(noisy, target)
    assert 0.25 <= note["ct_grain_blur_px"] <= 2.0 and note["ct_grain"] > target
    assert out.shape == noisy.shape and out.dtype == np.float32
    assert grain(out) == pytest.approx(target, rel=0.15)  # interpolated between the tried blurs
    assert not np.array_equal(noisy, out) and noisy.max() <= 255  # the input array is not modified
    grainier = _grainy(ct255, 30.0, seed=1)
    stronger, stronger_note = match_grain(grainier, target)
    assert stronger_note["ct_grain_blur_px"] > note["ct_grain_blur_px"]
    assert grain(stronger) < grain(grainier)


def test_the_cap_limits_a_large_blur_and_leaves_a_smaller_one_exactly_as_it_was(ct255) -> None:
    target = grain(_grainy(ct255, 12.0))
    noisy = _grainy(ct255, 30.0, seed=1)
    free, free_note = match_grain(noisy, target)
    assert free_note["ct_grain_blur_px"] > 0.6 and "ct_grain_blur_capped" not in free_note
    capped, capped_note = match_grain(noisy, target, max_blur=0.5)
    assert capped_note["ct_grain_blur_px"] == 0.5 and capped_note["ct_grain_blur_capped"] is True
    assert grain(free) < grain(capped) < grain(noisy)  # capped: less blurred, so grainier than the free blur
    # a cap above the blur the CT needs changes nothing (so a capped model treats such CTs as the uncapped one)
    loose, loose_note = match_grain(noisy, target, max_blur=free_note["ct_grain_blur_px"] + 0.5)
    assert loose_note == free_note and np.array_equal(loose, free)


def _speckled(ct: np.ndarray, share: float, seed: int = 0) -> np.ndarray:
    """The CT with isolated grains (single pixels ±40) on ``share`` of its head's pixels, as a noisy 8-bit export."""
    rng = np.random.default_rng(seed)
    hit = (ct > 10) & (rng.random(ct.shape) < share)
    return np.clip(ct + hit * rng.choice([-40.0, 40.0], ct.shape), 0, 255).astype(np.float32)


def test_the_median_brings_isolated_grains_down_to_the_target_and_leaves_a_quiet_ct(ct255) -> None:
    """``method="median"`` (round 21): a CT grainier than the target moves towards its 3 × 3 median just enough
    (the share interpolated, so it grows with the grain); one at or below the target is left exactly as it was;
    the median, unlike the blur, leaves the phantom's edges where they were."""
    from scipy import ndimage

    quiet, note = match_grain(ct255, grain(ct255) + 0.5, method="median")
    assert quiet is ct255 and note == {"ct_grain": grain(ct255), "ct_grain_target": grain(ct255) + 0.5,
                                       "ct_grain_filter": "median", "ct_grain_median_share": 0.0}
    target = grain(_speckled(ct255, 0.02))
    noisy = _speckled(ct255, 0.06, seed=1)
    out, note = match_grain(noisy, target, method="median")
    assert 0.0 < note["ct_grain_median_share"] < 1.0 and note["ct_grain"] > target
    assert grain(out) == pytest.approx(target, rel=0.15) and out.dtype == np.float32
    noisier, noisier_note = match_grain(_speckled(ct255, 0.12, seed=1), target, method="median")
    assert noisier_note["ct_grain_median_share"] > note["ct_grain_median_share"]
    blurred, _ = match_grain(noisy, target)  # the Gaussian blur to the same grain
    edges = ndimage.morphological_gradient(ct255, size=(1, 3, 3)) > 60  # the phantom's tissue boundaries
    assert np.abs(out - ct255)[edges].mean() < np.abs(blurred - ct255)[edges].mean()
    with pytest.raises(CTMRIError, match="unknown grain filter"):
        match_grain(noisy, target, method="bilateral")


def test_too_little_soft_tissue_means_no_estimate_and_no_change() -> None:
    tiny = np.zeros((3, 40, 40), np.float32)
    tiny[:, 10:30, 10:30] = 100.0
    assert grain(tiny) is None
    out, note = match_grain(tiny, 1.0)
    assert out is tiny and note["ct_grain"] is None and note["ct_grain_blur_px"] == 0.0


def test_the_target_is_the_grainiest_training_ct_and_excluded_patients_do_not_count(ct255) -> None:
    from types import SimpleNamespace

    cases = [SimpleNamespace(case_id="a", ct=ct255), SimpleNamespace(case_id="b", ct=_grainy(ct255, 20.0))]
    assert training_target(cases) == pytest.approx(grain(cases[1].ct))
    assert training_target(cases, exclude=("b",)) == pytest.approx(grain(ct255))


def test_set_target_rewrites_the_config_only(tmp_path) -> None:
    from conftest import REPO

    weights = tmp_path / "model.safetensors"
    for suffix in ("", ".sha256"):
        shutil.copy(REPO / "model_weights" / ("ctmri_unet.safetensors" + suffix), str(weights) + suffix)
    before = read_weights_file(weights, framework="numpy")["state_dict"]
    set_target(weights, 8.2683)
    assert read_config(weights)["preprocessing"][KEY] == 8.268  # read back through the checksum check
    after = read_weights_file(weights, framework="numpy")["state_dict"]
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert (tmp_path / "model.safetensors.sha256").read_text().split()[0] == sha256_of(weights)
    assert CAP_KEY not in read_config(weights)["preprocessing"]
    set_target(weights, 8.2683, max_blur=1.0)  # the cap is recorded beside the target, and removed when not given
    assert read_config(weights)["preprocessing"][CAP_KEY] == 1.0
    set_target(weights, 8.2683)
    assert CAP_KEY not in read_config(weights)["preprocessing"]
    with pytest.raises(CTMRIError, match="max-blur"):
        set_target(weights, 8.2683, max_blur=0.0)
    set_target(weights, 8.2683, method="median")  # the filter is recorded when it is not the blur, removed else
    assert read_config(weights)["preprocessing"][FILTER_KEY] == "median"
    with pytest.raises(CTMRIError, match="no blur to cap"):
        set_target(weights, 8.2683, max_blur=1.0, method="median")
    set_target(weights, 8.2683)
    assert FILTER_KEY not in read_config(weights)["preprocessing"]


def test_set_refuses_an_unknown_excluded_patient_and_leaves_the_file(tmp_path, phantom_slices, capsys) -> None:
    """``grain set --exclude-from-training 9`` (a typo for 2) counted every patient without a word."""
    from conftest import REPO
    from CTtoMRISynthesisLib.grain import main as grain_main

    weights = tmp_path / "model.safetensors"
    for suffix in ("", ".sha256"):
        shutil.copy(REPO / "model_weights" / ("ctmri_unet.safetensors" + suffix), str(weights) + suffix)
    before = weights.read_bytes()
    assert grain_main(["set", str(weights), "--data", str(phantom_slices), "--exclude-from-training", "9"]) == 2
    assert "--exclude-from-training: unknown patient id(s) ['9']" in capsys.readouterr().err
    assert weights.read_bytes() == before


def test_median35_is_the_median_wherever_the_3x3_is_enough(ct255) -> None:
    """``method="median35"`` (round 22) only adds a step after the full 3 × 3 median: a CT the 3 × 3 median brings
    to the target comes out bit for bit as with ``"median"`` (so the CTs round 21b judged keep its outputs)."""
    target = grain(_speckled(ct255, 0.02))
    noisy = _speckled(ct255, 0.06, seed=1)
    three, three_note = match_grain(noisy, target, method="median")
    ladder, ladder_note = match_grain(noisy, target, method="median35")
    assert 0.0 < three_note["ct_grain_median_share"] < 1.0 and np.array_equal(ladder, three)
    assert ladder_note == {**three_note, "ct_grain_filter": "median35", "ct_grain_median5_share": 0.0}
    quiet, note = match_grain(ct255, grain(ct255) + 0.5, method="median35")
    assert quiet is ct255 and note["ct_grain_median_share"] == note["ct_grain_median5_share"] == 0.0


def test_median35_goes_on_to_the_5x5_median_where_the_full_3x3_is_not_enough(ct255) -> None:
    """Coarse grains (~1.5 px, wider than a 3 × 3 window's reach) that the full 3 × 3 median leaves above the target:
    ``median35`` moves on from the 3 × 3 median towards the 5 × 5 one, by a share that grows with the grain and
    brings it near the target, where ``median`` stops at the full 3 × 3 median, grainier."""
    from scipy import ndimage

    noisy = _grainy(ct255, 20.0, seed=1)
    full3 = ndimage.median_filter(noisy, size=(1, 3, 3))
    full5 = ndimage.median_filter(noisy, size=(1, 5, 5))
    assert grain(full5) < grain(full3)
    target = (grain(full3) + 2 * grain(full5)) / 3  # beyond the 3 × 3 median, within reach of the 5 × 5 one
    three, three_note = match_grain(noisy, target, method="median")
    out, note = match_grain(noisy, target, method="median35")
    assert three_note["ct_grain_median_share"] == 1.0 and np.allclose(three, full3)
    assert note["ct_grain_median_share"] == 1.0 and 0.0 < note["ct_grain_median5_share"] <= 1.0
    assert grain(out) == pytest.approx(target, rel=0.1) and grain(out) < grain(three)
    share = note["ct_grain_median5_share"]
    assert np.allclose(out, full3 + share * (full5 - full3), atol=1e-3)  # from the 3 × 3 median towards the 5 × 5
    _, grainier = match_grain(_grainy(ct255, 30.0, seed=1), target, method="median35")
    assert grainier["ct_grain_median5_share"] > share
    _, beyond = match_grain(noisy, grain(full5) / 2, method="median35")  # out of reach: the full 5 × 5 median
    assert beyond["ct_grain_median_share"] == beyond["ct_grain_median5_share"] == 1.0


@pytest.mark.parametrize("threads", [1, 3, 64, 0])
def test_the_median_in_threads_is_the_median_of_one_call(ct255, threads) -> None:
    """Slabs of slices filtered side by side give exactly one call's numbers, for any number of threads (more
    threads than slices too; at least one, and one for an empty CT)."""
    from scipy import ndimage

    from CTtoMRISynthesisLib.grain import _median

    noisy = _grainy(ct255[:20], 20.0)
    for size in (3, 5):
        assert np.array_equal(_median(noisy, size, threads), ndimage.median_filter(noisy, size=(1, size, size)))
    assert _median(noisy[:0], 3, threads).shape == (0, *noisy.shape[1:])


def test_describe_and_short_say_what_each_filter_did() -> None:
    from CTtoMRISynthesisLib.grain import describe, short

    base = {"ct_grain": 12.0, "ct_grain_target": 8.27}
    assert describe({**base, "ct_grain_blur_px": 0.0}) is None and short({**base, "ct_grain_median_share": 0.0}) == "none"
    assert describe({**base, "ct_grain_median_share": 0.27}) == "moved 27% of the way to its 3 × 3 median"
    assert short({**base, "ct_grain_median_share": 0.27, "ct_grain_median5_share": 0.0}) == "median 3×3 0.27"
    both = {**base, "ct_grain_median_share": 1.0, "ct_grain_median5_share": 0.4}
    assert describe(both) == "moved the whole way to its 3 × 3 median and 40% of the way on to its 5 × 5 median"
    assert short(both) == "median 3×3 1, 5×5 0.4"
    capped = {**base, "ct_grain_blur_px": 0.5, "ct_grain_blur_capped": True}
    assert describe(capped) == "blurred in-plane by 0.5 px (the most the model file allows)"
    assert short(capped) == "blur 0.5 px (cap)"


def test_predict_volume_blurs_a_grainy_ct_says_so_and_masks_with_the_ct_as_given(tiny_weights, ct255,
                                                                                  monkeypatch) -> None:
    import torch

    import CTtoMRISynthesisLib.grain as grain_module
    from CTtoMRISynthesisLib.synthesis import predict_volume
    from CTtoMRISynthesisLib.weights import load_model

    net = load_model(tiny_weights).net
    noisy = _grainy(ct255[8:12], 20.0)
    info: dict = {}
    matched = predict_volume(net, noisy, ct_grain_target=grain(ct255[8:12]), info=info)
    plain = predict_volume(net, noisy)
    assert info["ct_grain_blur_px"] > 0 and any("grainier" in w for w in info["warnings"])
    assert np.array_equal(matched.head, plain.head)  # the output mask comes from the CT as given
    info = {}
    asked: list = []
    median_of = grain_module._median
    monkeypatch.setattr(grain_module, "_median",
                        lambda ct, size, threads=1: asked.append(threads) or median_of(ct, size, threads))
    median = predict_volume(net, noisy, ct_grain_target=grain(ct255[8:12]), ct_grain_filter="median", info=info)
    assert info["ct_grain_median_share"] > 0 and any("3 × 3 median" in w for w in info["warnings"])
    # the medians get the CPU threads PyTorch was given (a batch worker's share of the cores), as the error map does
    assert asked and set(asked) == {torch.get_num_threads()}
    assert not np.array_equal(median.mean, plain.mean) and np.array_equal(median.head, plain.head)
    assert not np.allclose(matched.mean, plain.mean)


def test_synthesize_records_the_grain_and_warns_when_it_blurs(tiny_weights, phantom_pair, tmp_path) -> None:
    from CTtoMRISynthesisLib.pipeline import synthesize

    weights = tmp_path / "grain.safetensors"
    for suffix in ("", ".sha256"):
        shutil.copy(str(tiny_weights) + suffix, str(weights) + suffix)
    clean = sitk.GetArrayFromImage(phantom_pair[0]).astype(np.float32)
    set_target(weights, grain(clean))
    noisy = sitk.GetImageFromArray(_grainy(clean, 20.0).astype(np.uint8))
    noisy.CopyInformation(phantom_pair[0])
    result = synthesize(noisy, None, weights=weights, device="cpu")
    note = result.summary()["normalisation"]
    assert note["ct_grain"] > note["ct_grain_target"] and note["ct_grain_blur_px"] > 0
    assert any("grainier" in w for w in result.warnings)
    assert "ct_grain" not in synthesize(noisy, None, weights=tiny_weights, device="cpu").summary()["normalisation"]
    set_target(weights, grain(clean), max_blur=0.1)  # a cap below that blur: used, recorded and said
    capped = synthesize(noisy, None, weights=weights, device="cpu")
    assert capped.summary()["normalisation"]["ct_grain_blur_px"] == 0.1
    assert capped.summary()["normalisation"]["ct_grain_blur_capped"] is True
    assert any("the most the model file allows" in w for w in capped.warnings)
    set_target(weights, grain(clean), method="median")  # round 21: the model file's filter reaches the pipeline
    median = synthesize(noisy, None, weights=weights, device="cpu")
    note = median.summary()["normalisation"]
    assert note["ct_grain_filter"] == "median" and note["ct_grain_median_share"] > 0 and "ct_grain_blur_px" not in note
    assert any("3 × 3 median" in w for w in median.warnings)
    set_target(weights, grain(clean), method="median35")  # round 22: the 5 × 5 step reaches the pipeline too
    ladder = synthesize(noisy, None, weights=weights, device="cpu")
    note = ladder.summary()["normalisation"]
    assert note["ct_grain_filter"] == "median35" and note["ct_grain_median_share"] == 1.0
    assert note["ct_grain_median5_share"] > 0 and any("5 × 5 median" in w for w in ladder.warnings)


def test_the_shipped_model_matches_grain_by_the_median_as_its_card_says() -> None:
    """Round 22 ships the median grain matching (3 × 3, then 5 × 5): the shipped file's config carries it, with the
    target the model card states, and (where the training data is here) that target is the grainiest T2 training CT's."""
    from conftest import REPO, data_root, require
    from CTtoMRISynthesisLib.weights import default_weights_path

    pre = read_config(default_weights_path())["preprocessing"]
    assert pre[FILTER_KEY] == "median35" and CAP_KEY not in pre
    card = (REPO / "model_weights" / "README.md").read_text()
    assert f"`ct_grain_target` {pre[KEY]:.3f}" in card and "`ct_grain_filter` `median35`" in card
    harvard = require(data_root() / "harvard_aanlib_ct_mri_2d")
    from CTtoMRISynthesisLib.intensity import CTWindow
    from CTtoMRISynthesisLib.training.discovery import discover

    assert pre[KEY] == pytest.approx(training_target(discover([str(harvard)], CTWindow(45, 120)), ("2",)), abs=1e-3)
