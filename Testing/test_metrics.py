"""Tests for CTtoMRISynthesisLib.metrics: hand-computed values, scikit-image agreement, validation, a T2 slice
(synthetic phantom; the real Harvard slice too where the data is available)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import phantoms
from CTtoMRISynthesisLib.errors import CTMRIError
from CTtoMRISynthesisLib.metrics import (
    MIN_INPLANE,
    bone_soft_tissue_mae,
    compute_metrics,
    foreground_mask,
    summarize,
    to_jsonable,
)

PAPER_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)


def _phantom(shape=(3, 32, 32), seed=0) -> np.ndarray:
    """A head-like volume: a textured disk on an exactly-zero background."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    yy, xx = np.mgrid[:y, :x]
    disk = (yy - y / 2 + 0.5) ** 2 + (xx - x / 2 + 0.5) ** 2 < (min(y, x) * 0.35) ** 2
    vol = np.zeros(shape)
    for k in range(z):
        vol[k][disk] = rng.uniform(40, 220, size=int(disk.sum()))
    return vol


# ---------------------------------------------------------------- hand-computed values


def test_hand_computed_mae_and_foreground():
    ref = np.zeros((16, 16))
    ref[6:10, 6:10] = 100.0  # 16 foreground pixels
    syn = ref.copy()
    syn[6:10, 6:10] += 10.0  # error 10 on every foreground pixel
    syn[0, :8] = 5.0  # error 5 on 8 background pixels
    m = compute_metrics(ref, syn)
    assert m["foreground_voxels"] == 16
    assert m["mae"] == pytest.approx(10.0, abs=1e-12)
    assert m["mae_whole"] == pytest.approx((16 * 10 + 8 * 5) / 256, abs=1e-12)
    assert len(m["per_slice"]) == 1
    s0 = m["per_slice"][0]
    assert s0["index"] == 0 and s0["foreground_voxels"] == 16
    assert s0["mae"] == pytest.approx(10.0) and s0["mae_whole"] == pytest.approx(200 / 256)
    assert set(m) == {"mae", "ssim", "psnr", "mae_whole", "ssim_foreground", "foreground_voxels", "foreground",
                      "per_slice"}
    assert m["foreground"] == "reference > 0"
    assert set(s0) == {"index", "foreground_voxels", "mae", "ssim", "ssim_foreground", "mae_whole"}


def test_foreground_mask_is_ref_positive_when_the_background_is_zero():
    ref = np.zeros((5, 5))
    ref[1:4, 1:4] = [[0, 1, 255], [0, 0, 3], [9, 9, 9]]
    np.testing.assert_array_equal(foreground_mask(ref), ref > 0)


def test_a_noisy_background_is_not_foreground_and_a_slice_is_a_one_slice_volume():
    """A scanner's MRI has noise, not zeros, around the head: ``ref > 0`` was then nearly the whole volume and the
    "in-head" MAE the whole-volume one (halved on a real T2 with faint noise). Its head is found instead;
    a reference whose background is exactly 0 keeps the paper's ``ref > 0``."""
    rng = np.random.default_rng(3)
    clean = _phantom((4, 64, 64))
    clean = np.where(clean > 0, clean / 2 + 100, 0.0)  # tissue 120..210, well above the noise
    noisy = clean + np.where(clean > 0, 0.0, rng.rayleigh(3.0, clean.shape))
    syn = np.where(clean > 0, clean + 10.0, 0.0)
    m = compute_metrics(noisy, syn)
    head = clean > 0
    assert m["foreground"] == "the reference's head (Otsu threshold, largest object, holes filled per slice)"
    assert m["foreground_voxels"] == int(head.sum())
    assert m["mae"] == pytest.approx(10.0, abs=1e-9)
    assert compute_metrics(clean, syn)["mae"] == pytest.approx(10.0) and compute_metrics(clean, syn)["foreground"] == "reference > 0"
    hole = clean.copy()
    hole[:, 30:34, 30:34] = 0.0  # dark bone or air inside the head, no noise: the paper's rule, as before
    assert foreground_mask(hole).sum() == int(head.sum()) - 4 * 16
    one = compute_metrics(clean[0], syn[:1])  # a (y, x) reference against a (1, y, x) prediction
    assert one["mae"] == pytest.approx(10.0)
    with pytest.raises(CTMRIError, match="data type bool"):
        compute_metrics(clean > 0, syn > 0)


def test_psnr_hand_computed_and_matches_skimage():
    ref = _phantom()
    syn = ref + 5.0  # mse 25 everywhere
    m = compute_metrics(ref, syn)
    assert m["psnr"] == pytest.approx(10 * math.log10(255.0**2 / 25.0), abs=1e-9)
    assert m["psnr"] == pytest.approx(peak_signal_noise_ratio(ref, syn, data_range=255))


def test_uint8_inputs_do_not_wrap_around():
    ref = np.full((12, 12), 10, dtype=np.uint8)
    syn = np.full((12, 12), 30, dtype=np.uint8)  # uint8 10 - 30 would wrap to 236
    m = compute_metrics(ref, syn)
    assert m["mae"] == pytest.approx(20.0)
    m_float = compute_metrics(ref.astype(float), syn.astype(float))
    assert m["ssim"] == pytest.approx(m_float["ssim"]) and m["psnr"] == pytest.approx(m_float["psnr"])


def test_inputs_are_not_modified():
    ref = _phantom((2, 16, 16))
    syn = ref + 3.0
    ref_before, syn_before = ref.copy(), syn.copy()
    compute_metrics(ref, syn)
    np.testing.assert_array_equal(ref, ref_before)
    np.testing.assert_array_equal(syn, syn_before)


def test_2d_input_is_one_slice():
    vol = _phantom((1, 24, 24))
    syn = vol * 0.9
    m2 = compute_metrics(vol[0], syn[0])
    m3 = compute_metrics(vol, syn)
    assert to_jsonable(m2) == to_jsonable(m3)


# ---------------------------------------------------------------- identity and SSIM agreement


def test_identical_volumes():
    ref = _phantom()
    m = compute_metrics(ref, ref.copy())
    assert m["mae"] == 0.0 and m["mae_whole"] == 0.0
    assert m["ssim"] == pytest.approx(1.0) and m["ssim_foreground"] == pytest.approx(1.0)
    assert m["psnr"] == float("inf")
    j = to_jsonable(m)
    assert j["psnr"] is None
    json.dumps(j, allow_nan=False)  # strict JSON must accept it


def test_ssim_matches_direct_skimage_per_slice():
    ref = _phantom((4, 40, 36), seed=1)
    rng = np.random.default_rng(2)
    syn = np.clip(ref + rng.normal(0, 20, ref.shape), 0, 255)
    m = compute_metrics(ref, syn)
    fg = ref > 0
    direct = [structural_similarity(ref[k], syn[k], **PAPER_SSIM) for k in range(ref.shape[0])]
    maps = [structural_similarity(ref[k], syn[k], full=True, **PAPER_SSIM)[1] for k in range(ref.shape[0])]
    assert m["ssim"] == pytest.approx(float(np.mean(direct)), abs=1e-12)
    for k in range(ref.shape[0]):
        assert m["per_slice"][k]["ssim"] == pytest.approx(direct[k], abs=1e-12)
        assert m["per_slice"][k]["ssim_foreground"] == pytest.approx(float(maps[k][fg[k]].mean()), abs=1e-12)
        assert m["per_slice"][k]["mae"] == pytest.approx(float(np.abs(ref[k] - syn[k])[fg[k]].mean()))
    # Voxel-weighted over the whole volume, not a mean of slice means.
    all_fg_values = np.concatenate([maps[k][fg[k]] for k in range(ref.shape[0])])
    assert m["ssim_foreground"] == pytest.approx(float(all_fg_values.mean()), abs=1e-12)
    assert 0.0 < m["ssim_foreground"] < 1.0


def test_ssim_foreground_is_voxel_weighted_across_slices():
    ref = np.zeros((2, 20, 20))
    ref[0, 2:18, 2:18] = 120.0  # large foreground
    ref[1, 9:11, 9:11] = 120.0  # tiny foreground
    syn = ref.copy()
    syn[1] = 0.0  # only the tiny slice is wrong
    m = compute_metrics(ref, syn)
    a, b = m["per_slice"][0], m["per_slice"][1]
    expected = (a["ssim_foreground"] * a["foreground_voxels"] + b["ssim_foreground"] * b["foreground_voxels"]) / (
        a["foreground_voxels"] + b["foreground_voxels"]
    )
    assert m["ssim_foreground"] == pytest.approx(expected)
    assert m["ssim_foreground"] != pytest.approx((a["ssim_foreground"] + b["ssim_foreground"]) / 2)


def test_slices_without_foreground_are_skipped():
    ref = _phantom((3, 24, 24), seed=3)
    ref[1] = 0.0
    syn = ref * 0.8
    syn[1, :3, :3] = 50.0  # error on the empty slice counts for mae_whole only
    m = compute_metrics(ref, syn)
    empty = m["per_slice"][1]
    assert empty["foreground_voxels"] == 0
    assert empty["mae"] is None and empty["ssim"] is None and empty["ssim_foreground"] is None
    assert empty["mae_whole"] == pytest.approx(9 * 50.0 / (24 * 24))
    expected = np.mean([structural_similarity(ref[k], syn[k], **PAPER_SSIM) for k in (0, 2)])
    assert m["ssim"] == pytest.approx(float(expected))
    assert m["foreground_voxels"] == int((ref > 0).sum())
    json.dumps(to_jsonable(m), allow_nan=False)


def test_all_zero_prediction_scores_well_below_one():
    ref = _phantom((2, 48, 48), seed=4)
    m = compute_metrics(ref, np.zeros_like(ref))
    assert m["ssim"] < 0.8  # whole slice: the matching zero background props it up, but not to 1
    assert m["ssim_foreground"] < 0.05  # inside the head there is no structure at all
    assert m["ssim_foreground"] < m["ssim"]
    assert m["mae"] == pytest.approx(float(ref[ref > 0].mean()))


def test_mae_whole_versus_mae():
    ref = _phantom((2, 20, 20), seed=5)
    fg = ref > 0
    # Errors only inside the head: mae_whole is mae diluted by the foreground fraction.
    syn = ref + np.where(fg, 7.0, 0.0)
    m = compute_metrics(ref, syn)
    assert m["mae"] == pytest.approx(7.0)
    assert m["mae_whole"] == pytest.approx(7.0 * fg.mean())
    assert m["mae_whole"] < m["mae"]
    # Errors only in the background: invisible to mae, visible to mae_whole.
    syn = ref + np.where(fg, 0.0, 3.0)
    m = compute_metrics(ref, syn)
    assert m["mae"] == 0.0
    assert m["mae_whole"] == pytest.approx(3.0 * (~fg).mean())


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "ref, syn, words",
    [
        (np.ones((2, 16, 16)), np.ones((2, 16, 17)), "resample"),
        (np.ones((16, 16)), np.ones((2, 16, 16)), "differ"),
        (np.where(np.eye(16) > 0, np.nan, 1.0), np.ones((16, 16)), "NaN"),
        (np.ones((16, 16)), np.where(np.eye(16) > 0, np.inf, 1.0), "infinite"),
        (np.zeros((2, 16, 16)), np.ones((2, 16, 16)), "no foreground"),
        (np.ones((2, 10, 16)), np.ones((2, 10, 16)), f"{MIN_INPLANE}x{MIN_INPLANE}"),
        (np.ones((16, 6)), np.ones((16, 6)), "window cannot fit"),
        (np.ones(16), np.ones(16), "(z, y, x)"),
        (np.ones((1, 2, 16, 16)), np.ones((1, 2, 16, 16)), "(z, y, x)"),
        (np.ones((16, 16), dtype=complex), np.ones((16, 16), dtype=complex), "real-valued"),
        (np.ones((0, 16, 16)), np.ones((0, 16, 16)), "empty"),
    ],
)
def test_validation_errors(ref, syn, words):
    with pytest.raises(CTMRIError) as info:
        compute_metrics(ref, syn)
    assert words in str(info.value)


def test_minimum_slice_size_is_the_ssim_window():
    assert MIN_INPLANE == 11
    compute_metrics(np.ones((11, 11)), np.ones((11, 11)))  # exactly the window: accepted
    with pytest.raises(CTMRIError):
        compute_metrics(np.ones((11, 10)), np.ones((11, 10)))


# ---------------------------------------------------------------- bone / soft tissue


def test_bone_soft_tissue_hand_computed():
    ref = np.array([[0, 10, 20], [30, 40, 50]], dtype=float)
    syn = np.array([[5, 12, 26], [30, 36, 60]], dtype=float)
    ct = np.array([[900, 900, 100], [900, 50, 300]], dtype=float)
    out = bone_soft_tissue_mae(ref, syn, ct, bone_threshold=200)
    # bone (ct > 200, ref > 0): errors 2, 0, 10; soft (ct <= 200): errors 6, 4; (0, 0) is background.
    assert out == {"mae_bone": pytest.approx(4.0), "mae_soft_tissue": pytest.approx(5.0), "bone_voxels": 3, "soft_voxels": 2}
    # The threshold itself counts as soft tissue.
    out = bone_soft_tissue_mae(ref, syn, ct, bone_threshold=300)
    assert out["bone_voxels"] == 2 and out["soft_voxels"] == 3
    assert out["mae_bone"] == pytest.approx(1.0) and out["mae_soft_tissue"] == pytest.approx(20 / 3)


def test_bone_soft_tissue_empty_class_and_errors():
    ref = np.array([[0, 10], [20, 30]], dtype=float)
    syn = ref + 1
    out = bone_soft_tissue_mae(ref, syn, np.zeros_like(ref), bone_threshold=100)
    assert out["mae_bone"] is None and out["bone_voxels"] == 0
    assert out["mae_soft_tissue"] == pytest.approx(1.0) and out["soft_voxels"] == 3
    with pytest.raises(CTMRIError, match="CT shape"):
        bone_soft_tissue_mae(ref, syn, np.zeros((3, 3)), 100)
    with pytest.raises(CTMRIError, match="NaN"):
        bone_soft_tissue_mae(ref, syn, np.full_like(ref, np.nan), 100)
    with pytest.raises(CTMRIError, match="no foreground"):
        bone_soft_tissue_mae(np.zeros_like(ref), syn, ref, 100)


# ---------------------------------------------------------------- summarize and JSON


def test_summarize_matches_numpy():
    values = [0.71, 0.64, 0.80, 0.77, 0.69]
    s = summarize(values)
    assert s["mean"] == pytest.approx(np.mean(values))
    assert s["sd"] == pytest.approx(np.std(values, ddof=1))
    assert s["min"] == 0.64 and s["max"] == 0.80 and s["n"] == 5
    assert summarize([3.5]) == {"mean": 3.5, "sd": 0.0, "min": 3.5, "max": 3.5, "n": 1}
    with pytest.raises(CTMRIError):
        summarize([])


def test_to_jsonable_converts_nonfinite_and_numpy():
    out = to_jsonable({"a": np.float32(1.5), "b": [np.inf, -np.inf, np.nan], "c": np.int64(3), "d": (None, "x")})
    assert out == {"a": 1.5, "b": [None, None, None], "c": 3, "d": [None, "x"]}
    assert type(out["c"]) is int
    json.dumps(out, allow_nan=False)


# ---------------------------------------------------------------- a T2 slice: phantom, and real data


def _t2_slice(source: str, request) -> np.ndarray:
    """A 256×256 T2 MRI slice with an exactly-zero background: the phantom's, or Harvard's 2004.png."""
    if source == "phantom":
        _, mri = phantoms.slice_pair(seed=4, slices=1, first_z=10.0)
        return mri[0].astype(np.float64)
    skimage_io = pytest.importorskip("skimage.io")
    return skimage_io.imread(str(request.getfixturevalue("harvard_dir") / "MRI" / "2004.png")).astype(np.float64)


@pytest.mark.parametrize("source", ["phantom", "harvard"])
def test_mri_slice_self_and_blurred(source: str, request):
    from skimage.filters import gaussian

    mri = _t2_slice(source, request)
    assert mri.shape == (256, 256)
    same = compute_metrics(mri, mri.copy())
    assert same["ssim"] == pytest.approx(1.0) and same["mae"] == 0.0
    assert to_jsonable(same)["psnr"] is None

    blurred = gaussian(mri, sigma=2.0, preserve_range=True)
    m = compute_metrics(mri, blurred)
    assert m["mae"] > 0.0 and m["mae_whole"] > 0.0
    assert 0.0 < m["ssim"] < 0.99
    assert m["ssim_foreground"] < m["ssim"]  # the exact zero background lifts whole-slice SSIM
    assert 10.0 < m["psnr"] < 60.0
    assert m["foreground_voxels"] == int((mri > 0).sum()) > 1000
    # Paper parameters, checked against scikit-image directly on the slice.
    assert m["ssim"] == pytest.approx(structural_similarity(mri, blurred, **PAPER_SSIM), abs=1e-12)
