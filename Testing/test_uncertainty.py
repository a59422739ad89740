"""Issue 11: the uncertainty map, the Laplace-likelihood loss, the head mask without head holders and the
CT "scanner" augmentation. Runs without the licensed data (phantoms, a model trained here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

torch = pytest.importorskip("torch")

import phantoms  # noqa: E402
from CTtoMRISynthesisLib import geometry  # noqa: E402
from CTtoMRISynthesisLib.cli import main as ctmri  # noqa: E402
from CTtoMRISynthesisLib.intensity import head_mask, largest_component  # noqa: E402
from CTtoMRISynthesisLib.model import MIN_LAPLACE_SCALE, UNet, UNetConfig, laplace_scale  # noqa: E402
from CTtoMRISynthesisLib.synthesis import MAX_SPREAD, predict_volume  # noqa: E402
from CTtoMRISynthesisLib.training.dataset import Augment, SliceDataset  # noqa: E402
from CTtoMRISynthesisLib.training.loop import laplace_nll  # noqa: E402
from CTtoMRISynthesisLib.training.report import uncertainty_quality  # noqa: E402


@pytest.fixture(scope="module")
def laplace_weights(phantom_slices: Path, tmp_path_factory) -> Path:
    """A real two-output (location + Laplace scale) model, trained by `ctmri train --loss laplace`."""
    out = tmp_path_factory.mktemp("laplace")
    code = ctmri(phantoms.tiny_train_args(phantom_slices, out / "run", "--loss", "laplace", "--aug-gamma", "0.2",
                                          "--aug-blur", "1", "--aug-noise", "0.03", "--save", str(out / "laplace.safetensors"),
                                          epochs=2, max_steps=3))
    assert code == 0
    return out / "laplace.safetensors"


def test_laplace_nll_is_the_likelihood_and_pulls_to_the_median() -> None:
    mu, raw, y = 0.3, 0.5, 0.7
    pred = torch.tensor([mu, raw]).view(1, 2, 1, 1)
    b = float(torch.nn.functional.softplus(torch.tensor(raw))) + MIN_LAPLACE_SCALE
    assert float(laplace_nll(pred, torch.tensor([[[[y]]]]))) == pytest.approx(abs(y - mu) / b + np.log(b), rel=1e-5)
    # one location fit to skewed samples ends at their median, not their mean (what an L1 metric rewards)
    samples = torch.tensor([0.0, 0.1, 0.2, 0.9, 1.0, 0.15, 0.12]).view(-1, 1, 1, 1)
    loc = torch.zeros(1, requires_grad=True)
    scale = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([loc, scale], lr=0.02)
    for _ in range(1500):
        pred = torch.cat([loc, scale]).view(1, 2, 1, 1).expand(len(samples), 2, 1, 1)
        loss = laplace_nll(pred, samples)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loc.detach()) == pytest.approx(float(samples.median()), abs=0.02)
    assert abs(float(loc.detach()) - float(samples.mean())) > 0.1


def test_flip_spread_of_a_one_output_model_is_the_sd_of_the_two_predictions() -> None:
    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=1, base=4)).eval()
    ct = np.zeros((2, 64, 64), np.float32)
    ct[:, 8:56, 12:50] = np.linspace(40, 200, 38, dtype=np.float32)  # not symmetric: the flip changes the input
    pred = predict_volume(net, ct, flip_tta=True)
    with torch.inference_mode():
        x = torch.from_numpy(ct[:, None] / 255.0)
        a = net(x)[:, 0].numpy() * 255
        b = torch.flip(net(torch.flip(x, dims=[-1])), dims=[-1])[:, 0].numpy() * 255
    head = pred.head
    np.testing.assert_allclose(pred.mean[head], np.clip((a + b) / 2, 0, 255)[head], atol=1e-3)
    np.testing.assert_allclose(pred.spread[head], np.minimum(np.abs(a - b) / 2, MAX_SPREAD)[head], atol=1e-3)
    assert not pred.spread[~head].any() and not pred.mean[~head].any()
    assert not predict_volume(net, ct, flip_tta=False).spread.any(), "nothing to spread without flip or a scale"


def test_spread_of_a_laplace_model_includes_its_own_scale(laplace_weights: Path) -> None:
    from CTtoMRISynthesisLib.weights import load_model

    loaded = load_model(laplace_weights)
    assert loaded.config["model"]["out_channels"] == 2 and loaded.config["preprocessing"]["flip_tta"] is True
    ct = np.zeros((3, 256, 256), np.float32)
    ct[:, 40:220, 50:200] = 100.0
    pred = predict_volume(loaded.net, ct, context=1, flip_tta=False)
    with torch.inference_mode():
        x = torch.from_numpy(np.stack([ct[[0, 0, 1]], ct[[0, 1, 2]], ct[[1, 2, 2]]]) / 255.0)
        b = laplace_scale(loaded.net(x)[:, 1]).numpy()
    expected = np.minimum(np.sqrt(2.0) * b * 255.0, MAX_SPREAD)
    np.testing.assert_allclose(pred.spread[pred.head], expected[pred.head], rtol=1e-4, atol=1e-3)
    assert pred.spread[pred.head].min() > 0


def test_synthesize_writes_the_uncertainty_map(laplace_weights: Path, phantom_hu_ct: sitk.Image, tmp_path: Path) -> None:
    """uncertainty.nrrd: on the reference grid, ≥ 0, zero outside the head; metrics.json has its mean in the head."""
    ct_path = tmp_path / "ct.nrrd"
    sitk.WriteImage(phantom_hu_ct, str(ct_path))
    out = tmp_path / "out"
    assert ctmri(["synthesize", "--ct", str(ct_path), "--out-dir", str(out), "--weights", str(laplace_weights), "--quiet"]) == 0
    unc = sitk.ReadImage(str(out / "uncertainty.nrrd"))
    syn = sitk.ReadImage(str(out / "synthetic_mri.nrrd"))
    assert geometry.same_grid(unc, phantom_hu_ct) and geometry.same_grid(unc, syn)
    u, s = sitk.GetArrayFromImage(unc), sitk.GetArrayFromImage(syn)
    assert u.min() >= 0 and u.max() <= MAX_SPREAD
    hu = sitk.GetArrayFromImage(phantom_hu_ct).astype(np.float32) - 1024.0  # stored as HU + 1024
    outside = ~largest_component(hu > -300)
    assert not u[outside].any() and not s[outside].any(), "nothing outside the head's largest object"
    inside = u > 0  # a Laplace model's spread is positive wherever it synthesises
    assert inside.sum() > 0.3 * (~outside).sum()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["uncertainty_mean"] == pytest.approx(float(u[inside].mean()), rel=1e-3)


def test_a_model_with_no_spread_to_give_writes_no_uncertainty(phantom_hu_ct: sitk.Image, tmp_path: Path) -> None:
    """One output channel, no flip, no ensemble, no error model: no uncertainty.nrrd and no uncertainty_mean,
    rather than a map of zeros that reads as "certain everywhere" (what such a model used to give)."""
    weights = phantoms.train_tiny_model(tmp_path / "no_flip.safetensors", steps=5, flip_tta=False)
    ct_path = tmp_path / "ct.nrrd"
    sitk.WriteImage(phantom_hu_ct, str(ct_path))
    out = tmp_path / "out"
    assert ctmri(["synthesize", "--ct", str(ct_path), "--out-dir", str(out), "--weights", str(weights), "--quiet"]) == 0
    assert not (out / "uncertainty.nrrd").exists() and (out / "synthetic_mri.nrrd").is_file()
    assert "uncertainty_mean" not in json.loads((out / "metrics.json").read_text())


def test_head_holder_gets_no_signal(phantom_hu_ct: sitk.Image, tiny_weights: Path) -> None:
    """The phantom's head holder is a separate object: the synthetic MRI is zero on it (issue 11, aim 2)."""
    from CTtoMRISynthesisLib.pipeline import synthesize

    hu = sitk.GetArrayFromImage(phantom_hu_ct).astype(np.float32) - 1024.0
    objects = hu > -300
    head = largest_component(objects)
    holder = objects & ~head
    assert holder.sum() > 1000, "the phantom has a head holder apart from the head"
    syn = sitk.GetArrayFromImage(synthesize(phantom_hu_ct, None, weights=tiny_weights, device="cpu").synthetic_mri)
    assert syn[head].mean() > 10
    assert float(syn[~head].sum()) <= 0.005 * float(syn.sum())
    assert not syn[holder].any()


def test_largest_component_and_head_mask() -> None:
    mask = np.zeros((3, 20, 20), bool)
    mask[:, 2:12, 2:12] = True  # head
    mask[:, 15:18, 2:18] = True  # holder (smaller, separate)
    mask[1, 5:8, 5:8] = False  # a hole in one slice
    kept = largest_component(mask)
    assert kept[:, 2:12, 2:12].sum() == mask[:, 2:12, 2:12].sum() and not kept[:, 15:18].any()
    ct = np.where(mask, 100.0, 0.0).astype(np.float32)
    head = head_mask(ct)
    assert head[1, 5:8, 5:8].all() and not head[:, 15:18].any()
    assert not largest_component(np.zeros((2, 4, 4), bool)).any()
    flipped = mask[:, ::-1]  # the holder now comes first in scan order (label 1), the head second
    np.testing.assert_array_equal(largest_component(flipped), kept[:, ::-1])
    speck = mask.copy()
    speck[0, 0, 0] = True  # a third, one-voxel object labelled first
    np.testing.assert_array_equal(largest_component(speck), kept)


def test_scanner_augmentation_is_seeded_keeps_air_and_changes_the_ct(phantom_slices: Path) -> None:
    from CTtoMRISynthesisLib.intensity import CTWindow
    from CTtoMRISynthesisLib.training.discovery import discover

    cases = discover([phantom_slices], CTWindow(45.0, 140.0), 256, phantom_slices / "cache", "slice3")
    plain = SliceDataset(cases, 1, Augment(rotate_deg=0, scale=0, flip_prob=0, intensity_scale=0, intensity_shift=0), 0)
    aug = Augment(rotate_deg=0, scale=0, flip_prob=0, intensity_scale=0, intensity_shift=0, gamma=0.3, blur=1.5, noise=0.05)
    ds = SliceDataset(cases, 1, aug, 0)
    again = SliceDataset(cases, 1, aug, 0)
    changed = 0
    for i in range(len(ds)):
        x, y = ds[i]
        x0, y0 = plain[i]
        np.testing.assert_array_equal(x.numpy(), again[i][0].numpy())  # same seed, epoch, index: same item
        np.testing.assert_array_equal(y.numpy(), y0.numpy())  # the MRI is never changed
        assert not x.numpy()[x0.numpy() == 0].any(), "air stays exactly 0"
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        changed += bool(np.abs(x.numpy() - x0.numpy()).mean() > 1e-3)
    assert changed >= len(ds) // 2


def test_uncertainty_quality_tells_an_informative_map_from_a_random_one() -> None:
    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 255, (4, 32, 32)).astype(np.float32)
    err = rng.gamma(2.0, 10.0, ref.shape).astype(np.float32)
    syn = ref + err
    head = np.ones(ref.shape, bool)
    good = uncertainty_quality(ref, syn, err + rng.normal(0, 5, ref.shape).astype(np.float32), head)
    random = uncertainty_quality(ref, syn, rng.uniform(0, 1, ref.shape).astype(np.float32), head)
    assert good["unc_spearman"] > 0.8 and abs(random["unc_spearman"]) < 0.05
    assert good["unc_err_top10"] > 2 * good["unc_err_rest"]
    flat = uncertainty_quality(ref, syn, np.ones(ref.shape, np.float32), head)
    assert flat["unc_spearman"] is None, "a constant map says nothing"


def test_the_most_uncertain_tenth_is_a_tenth_whatever_the_ties() -> None:
    """A map of a few levels ties at the 90th percentile: the voxels tied there share the places left in the tenth
    (their mean error), so the "top 10 %" is never 5 % (everything above the cut) nor voxels picked by position."""
    err = np.arange(100, dtype=np.float32)  # error = the voxel's index
    unc = np.zeros(100, np.float32)
    unc[80:90] = 1.0  # tied at the cut
    unc[95:] = 2.0    # 5 voxels above it
    q = uncertainty_quality(np.zeros((1, 1, 100), np.float32), err.reshape(1, 1, 100), unc.reshape(1, 1, 100),
                            np.ones((1, 1, 100), bool))
    top = (err[95:].sum() + 5 * err[80:90].mean()) / 10  # the 5 above, and 5 places at the tied voxels' mean
    assert q["unc_err_top10"] == pytest.approx(top)
    assert q["unc_err_rest"] == pytest.approx((err.sum() - 10 * top) / 90)
    halves = np.repeat([0.0, 1.0], 50).astype(np.float32)  # half the voxels tied at the top: none picked by position
    q = uncertainty_quality(np.zeros((1, 1, 100), np.float32), err[::-1].reshape(1, 1, 100).copy(),
                            halves.reshape(1, 1, 100), np.ones((1, 1, 100), bool))
    assert q["unc_err_top10"] == pytest.approx(err[:50].mean())  # the tied half's mean error (24.5), not 10 of them
    assert q["unc_err_rest"] == pytest.approx((err.sum() - 10 * err[:50].mean()) / 90)


def test_cv_folds_split_over_jobs_then_one_report_with_aims_and_uncertainty(phantom_slices: Path, tmp_path: Path) -> None:
    """--only-folds runs part of a cross-validation (one job of a cluster array); the job that completes the
    set writes the report, which states the issue's aims and checks the uncertainty map per held-out patient."""
    run = tmp_path / "cv"
    common = phantoms.tiny_train_args(phantom_slices, run, "--cv", "kfold", "--folds", "2", "--loss", "laplace", "--resume")
    assert ctmri(common + ["--only-folds", "2"]) == 0
    assert (run / "fold02" / "fold.json").exists() and not (run / "fold01").exists()
    assert not (run / "report").exists(), "no report while a fold is missing"
    assert ctmri(common + ["--only-folds", "3"]) == 2  # there is no fold 3: a clear error
    assert ctmri(common + ["--only-folds", "1"]) == 0
    md = (run / "report" / "report.md").read_text()
    assert "Aims (issue 11)" in md and "fraction of the distance lookup table" in md
    assert "## Uncertainty map" in md and "Spearman" in md
    with np.load(next((run / "fold01").glob("pred_*.npz"))) as blob:
        assert blob["spread"].shape == blob["syn"].shape and blob["spread"].max() > 0


def test_laplace_scale_starts_near_what_it_learns() -> None:
    """The scale channel starts at b ≈ 0.1 (25 grey levels): from softplus(0) ≈ 0.7, a few hundred Adam steps
    left it large and flat. The location channel keeps PyTorch's own initialisation."""
    net = UNet(UNetConfig(in_channels=3, out_channels=2, base=4))
    assert float(laplace_scale(net.head.bias[1:].detach())) == pytest.approx(0.1 + MIN_LAPLACE_SCALE, rel=1e-4)
    assert abs(float(net.head.bias[0])) < 1.0


def test_mse_plus_gaussian_trains_the_image_by_mse_and_sigma_by_likelihood() -> None:
    """The image channel gets exactly the MSE gradient (the likelihood sees it detached); σ gets the Gaussian
    likelihood's, which vanishes where σ equals the error, and a model built for it reports SD = σ."""
    from CTtoMRISynthesisLib.training.loop import mse_and_gaussian_scale

    target = torch.tensor([0.2, 0.8]).view(2, 1, 1, 1)
    mu = torch.tensor([0.5, 0.5]).view(2, 1, 1, 1).requires_grad_(True)
    raw = torch.zeros(2, 1, 1, 1, requires_grad=True)
    mse_and_gaussian_scale(torch.cat([mu, raw], 1), target).backward()
    expected_mu_grad = torch.autograd.grad(torch.nn.functional.mse_loss(mu, target), mu)[0]
    assert torch.allclose(mu.grad, expected_mu_grad)
    # d/dσ [(e²)/(2σ²) + log σ] = 0 at σ = |e|: a raw scale giving σ = 0.3 = |error| has no gradient
    raw_at = torch.log(torch.expm1(torch.tensor(0.3 - MIN_LAPLACE_SCALE))).view(1, 1, 1, 1).expand(2, 1, 1, 1).clone().requires_grad_(True)
    mse_and_gaussian_scale(torch.cat([mu.detach(), raw_at], 1), target).backward()
    assert float(raw_at.grad.abs().max()) < 1e-6
    net = UNet(UNetConfig(in_channels=1, out_channels=2, scale="gaussian", base=4)).eval()
    ct = np.zeros((1, 32, 32), np.float32)
    ct[:, 4:28, 4:28] = 120.0
    pred = predict_volume(net, ct, flip_tta=False)
    with torch.inference_mode():
        sigma = laplace_scale(net(torch.from_numpy(ct[:, None] / 255.0))[:, 1]).numpy() * 255.0
    np.testing.assert_allclose(pred.spread[pred.head], np.minimum(sigma, MAX_SPREAD)[pred.head], rtol=1e-4)
    # the scale is read from the features without training them: its likelihood never reaches the U-Net
    out = net.train()(torch.rand(2, 1, 32, 32))
    sigma = laplace_scale(out[:, 1:2])
    nll = ((torch.rand(2, 1, 32, 32) - out[:, :1].detach()) ** 2 / (2 * sigma**2) + torch.log(sigma)).mean()
    grads = torch.autograd.grad(nll, [p for p in net.encoders.parameters()] + [net.head.weight], allow_unused=True)
    assert all(g is None or not g.any() for g in grads[:-1]) and grads[-1][1:].abs().sum() > 0
    with pytest.raises(ValueError, match="scale"):
        UNet(UNetConfig(out_channels=2, scale="cauchy"))
