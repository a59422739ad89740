"""Learned uncertainty: a small network that predicts, voxel by voxel, how far the synthetic MRI is from the
real one (the expected |real − synthetic|, grey levels on the 0..255 scale).

Why (issue 11, aim 4): the ensemble members' SD alone tracks the held-out error only weakly (Spearman 0.107 on
average over the Harvard patients held out by cross-validation). Where the error is large also depends on
the prediction itself: its brightness, its edges and its local texture. This module learns that from the
errors the cross-validated ensemble made on patients it had not seen (the fold models' saved predictions),
so it learns the errors the shipped model will make on a new patient, not its training residuals.

Per voxel, in-plane only (slices are independent, so a volume is processed in slabs and memory stays small),
from the synthetic MRI ``mean`` and the ensemble's ``spread`` (members' SD), both on the model grid:

- ``spread`` and ``spread_blur{s}`` (Gaussian σ = s px): model disagreement here and around,
- ``grad{s}``: the magnitude of the Gaussian-derivative gradient of ``mean`` (edges at scale s),
- ``local_sd{s}``: the SD of ``mean`` in an s × s window (texture),
- ``intensity``: ``mean`` itself (e.g. CSF-bright predictions are where CT says least about T2),
- ``depth`` / ``depth_rel``: the distance (px) to the nearest voxel outside the head, and that over the slice's
  largest (where in the head: scalp and skull, whose T2 the CT hardly shows, lie at its edge),
- ``ct``, ``ct_grad{s}``, ``ct_local_sd{s}``: the CT on the model grid, windowed to 0..255 (before a model file's
  own grain matching or standardisation, the same at fitting and at inference), its edges and texture
  (needs the CT: ``predict(..., ct=...)``).

Which of them a model uses is recorded in its config (``features``); the shipped one's are ``FEATURES``.

A multilayer perceptron (two hidden ReLU layers) maps the standardised features to the error over the
patient's mean error (so every patient weighs the same), trained with an L1 loss (the conditional median);
``scale`` (the training patients' mean in-head error) brings it back to grey levels. Inference is plain
numpy, so reading and applying the model needs no PyTorch; fitting needs PyTorch.

Stored in the model file beside the U-Nets (tensors ``error_model.*``, config section ``error_model``).

    python -m CTtoMRISynthesisLib.error_model --data DIR --from-cv RUN [RUN ...] --weights IN.safetensors --out OUT.safetensors

prints the error model's leave-one-patient-out Spearman (fit on the other patients' held-out errors,
tested on the patient's own) and writes OUT: IN's tensors and config plus the error model fit on everyone.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import CTMRIError

PREFIX = "error_model."
FEATURES = ("spread", "spread_blur1", "spread_blur2", "spread_blur4", "grad1", "grad2", "grad4",
            "local_sd3", "local_sd7", "intensity")
SLAB = 16  # slices per feature block: bounds the memory of the feature stack (16 × 256² × 10 × 4 B = 42 MB)
ROWS = 1 << 16  # voxels through the perceptron at a time
MAX_THREADS = 4  # slabs computed at once: about 0.1 GB each at the peak of a 256 × 256 slab
MAX_ERROR = 127.5  # the same cap as synthesis.MAX_SPREAD: an error map on 0..255 beyond half the range says nothing more


def _depth(head: np.ndarray) -> np.ndarray:
    """Per slice, each voxel's distance (px) to the nearest voxel outside ``head``."""
    from scipy import ndimage

    out = np.zeros(head.shape, dtype=np.float32)
    for k, mask in enumerate(head.astype(bool)):
        if mask.any():
            # padded so that a head touching the slice's border has its edge there, not beyond it
            out[k] = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return out


def _relative(depth: np.ndarray) -> np.ndarray:
    """``depth`` over each slice's largest (0 where a slice has no head)."""
    deepest = depth.max(axis=(1, 2), keepdims=True)
    return np.divide(depth, deepest, out=np.zeros_like(depth), where=deepest > 0)


def _filtered(kind: str, s: int, image: np.ndarray) -> np.ndarray:
    """``image`` blurred (``blur``), its gradient magnitude (``grad``) or its s × s local SD (``local_sd``)."""
    from scipy import ndimage

    if kind == "blur":
        return ndimage.gaussian_filter(image, (0, s, s))
    if kind == "grad":
        # per axis: gaussian_gradient_magnitude with σ 0 along z would add the unfiltered image as a z "derivative"
        return np.hypot(ndimage.gaussian_filter(image, (0, s, s), order=(0, 1, 0)),
                        ndimage.gaussian_filter(image, (0, s, s), order=(0, 0, 1)))
    local_mean = ndimage.uniform_filter(image, (1, s, s))
    return np.sqrt(np.maximum(ndimage.uniform_filter(image * image, (1, s, s)) - local_mean**2, 0.0))


# Filtered features: (name prefix, the image it filters, the filter); the CT's before the prediction's, since
# "grad"/"local_sd" are the endings of "ct_grad"/"ct_local_sd".
_FILTERED = (("spread_blur", "spread", "blur"), ("ct_grad", "ct", "grad"), ("ct_local_sd", "ct", "local_sd"),
             ("grad", "mean", "grad"), ("local_sd", "mean", "local_sd"))
_PLAIN = ("spread", "intensity", "ct", "depth", "depth_rel")


def _parse(name: str) -> tuple:
    """``(name,)`` for a plain feature, ``(image, filter, s)`` for a filtered one; an unknown name is refused."""
    if isinstance(name, str):  # (a model file's config is JSON: anything may stand there)
        if name in _PLAIN:
            return (name,)
        for prefix, image, kind in _FILTERED:
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                return image, kind, int(name[len(prefix):])
    raise CTMRIError(f"unknown error-model feature {name!r} (known: {', '.join(_PLAIN)}, and "
                     f"{', '.join(p + '<px>' for p, _, _ in _FILTERED)}); a model file naming it needs a newer CTtoMRISynthesis")


def check_features(names) -> tuple:
    """``names`` as a tuple, each a known feature: checked before any work, not on the first slab."""
    for name in names:
        _parse(name)
    return tuple(names)


def _feature(parsed: tuple, mean: np.ndarray, spread: np.ndarray, head: np.ndarray, ct: Optional[np.ndarray],
             cache: dict) -> np.ndarray:
    """One feature (as ``_parse`` gives it) of a (z, H, W) slab, filtered in-plane only (σ 0 along z); ``cache``
    keeps what two features share (the depth) for the slab."""
    def depth() -> np.ndarray:
        if "depth" not in cache:
            cache["depth"] = _depth(head)
        return cache["depth"]

    images = {"spread": lambda: spread, "intensity": lambda: mean, "mean": lambda: mean, "ct": lambda: ct,
              "depth": depth, "depth_rel": lambda: _relative(depth())}
    if len(parsed) == 1:
        return images[parsed[0]]()
    image, kind, s = parsed
    return _filtered(kind, s, images[image]())


def features(mean: np.ndarray, spread: np.ndarray, head: np.ndarray, names=FEATURES,
             ct: Optional[np.ndarray] = None) -> np.ndarray:
    """(number of head voxels, len(names)) float32: the features of the head voxels of a (z, H, W) volume,
    in the order of ``head``'s voxels. ``ct`` (the CT on the same grid, 0..255) only for the CT features."""
    if not (mean.shape == spread.shape == head.shape) or mean.ndim != 3:
        raise CTMRIError(f"error model: mean {mean.shape}, spread {spread.shape} and head {head.shape} must be one (z, H, W) shape")
    parsed = [_parse(n) for n in names]  # an unknown name is refused before any work
    on_ct = [n for n, p in zip(names, parsed) if p[0] == "ct"]  # the CT itself and what is filtered from it
    if on_ct and (ct is None or ct.shape != mean.shape):
        raise CTMRIError(f"error model: features {on_ct} need the CT on the prediction's "
                         f"grid {mean.shape}, got {None if ct is None else ct.shape}")
    blocks = []
    for start in range(0, mean.shape[0], SLAB):
        part = slice(start, start + SLAB)
        m, s, h = (np.asarray(a[part], dtype=np.float32) for a in (mean, spread, head))
        c = np.asarray(ct[part], dtype=np.float32) if on_ct else None
        h, cache = h.astype(bool), {}
        blocks.append(np.stack([_feature(q, m, s, h, c, cache)[h] for q in parsed], axis=1))
    return np.concatenate(blocks).astype(np.float32, copy=False) if blocks else np.zeros((0, len(names)), np.float32)


@dataclass
class ErrorModel:
    """The fitted perceptron: ``layers`` [(weight (in, out), bias (out,)), …], input standardisation and scale."""

    layers: list
    feature_mean: np.ndarray
    feature_sd: np.ndarray
    scale: float
    names: tuple = FEATURES
    info: dict = field(default_factory=dict)

    def expected_error(self, x: np.ndarray) -> np.ndarray:
        """Predicted |real − synthetic| (grey levels, 0..MAX_ERROR) for rows of features, ROWS at a time (the
        hidden layers of a whole slab's million rows would take 0.25 GB)."""
        out = np.empty(len(x), dtype=np.float32)
        for start in range(0, len(x), ROWS):
            h = (x[start:start + ROWS] - self.feature_mean) / self.feature_sd
            for i, (w, b) in enumerate(self.layers):
                h = h @ w + b
                if i < len(self.layers) - 1:
                    np.maximum(h, 0.0, out=h)
            out[start:start + ROWS] = np.clip(h[:, 0] * self.scale, 0.0, MAX_ERROR)
        return out

    def predict(self, mean: np.ndarray, spread: np.ndarray, head: np.ndarray, ct: Optional[np.ndarray] = None,
                threads: int = 1) -> np.ndarray:
        """The (z, H, W) map of predicted error: 0 outside ``head``; slab by slab to keep memory small.
        ``ct``: the CT on the same grid (0..255), needed only by a model with CT features. ``threads`` slabs at a
        time (at most MAX_THREADS): SciPy's filters, most of the time, release the GIL; each slab is computed
        alone, so the map does not depend on the count."""
        out = np.zeros(mean.shape, dtype=np.float32)

        def slab(start: int) -> None:
            part = slice(start, start + SLAB)
            h = np.asarray(head[part], dtype=bool)
            if h.any():
                block = out[part]
                block[h] = self.expected_error(features(mean[part], spread[part], h, self.names,
                                                        None if ct is None else ct[part]))

        starts = range(0, mean.shape[0], SLAB)
        threads = max(1, min(int(threads), MAX_THREADS, len(starts)))
        if threads == 1:
            for start in starts:
                slab(start)
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(slab, starts))  # list(): a slab's exception is raised here
        return out

    def tensors(self) -> dict:
        """The model as named float32 arrays for a model file (``error_model.*``)."""
        arrays = {"feature_mean": self.feature_mean, "feature_sd": self.feature_sd}
        for i, (w, b) in enumerate(self.layers):
            arrays[f"weight{i}"], arrays[f"bias{i}"] = w, b
        return {PREFIX + k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}

    def config(self) -> dict:
        return {"features": list(self.names), "scale": self.scale, "layers": len(self.layers), **self.info}


def apply(model: Optional[ErrorModel], prediction, ct: Optional[np.ndarray] = None, threads: int = 1):
    """A :class:`synthesis.Prediction` with its spread replaced by ``model``'s error map (unchanged without one);
    ``ct`` is the CT the prediction was made from, on its grid (0..255); ``threads`` as in :meth:`ErrorModel.predict`."""
    if model is not None:
        prediction.spread = model.predict(prediction.mean, prediction.spread, prediction.head, ct, threads=threads)
    return prediction


def from_state(config: dict, state: dict) -> ErrorModel:
    """Rebuild the error model from a model file's ``error_model`` config and its ``error_model.*`` tensors."""
    def array(name: str) -> np.ndarray:
        value = state[PREFIX + name]
        return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)

    try:
        names = check_features(config["features"])
        layers = [(array(f"weight{i}"), array(f"bias{i}")) for i in range(int(config["layers"]))]
        model = ErrorModel(layers, array("feature_mean"), array("feature_sd"), float(config["scale"]), names,
                           {k: v for k, v in config.items() if k not in ("features", "scale", "layers")})
        widths = [len(names)] + [w.shape[1] for w, _ in layers]
        ok = all(w.shape == (widths[i], widths[i + 1]) and b.shape == (widths[i + 1],) for i, (w, b) in enumerate(layers))
        if not ok or widths[-1] != 1 or model.feature_mean.shape != (len(names),) or model.feature_sd.shape != (len(names),):
            raise ValueError(f"layer shapes {[w.shape for w, _ in layers]} do not fit {len(names)} features and one output")
    except (KeyError, ValueError, TypeError) as exc:
        raise CTMRIError(f"the model file's error model is incomplete or inconsistent ({exc}); use the shipped weights "
                         "or refit it with `python -m CTtoMRISynthesisLib.error_model`") from exc
    return model


def split_state(state: dict) -> tuple:
    """(the U-Net tensors, the error model's tensors) of a model file's state."""
    unet = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    return unet, {k: v for k, v in state.items() if k.startswith(PREFIX)}


@dataclass
class Sample:
    """One patient's held-out prediction and truth, for fitting: (z, H, W) arrays on the model grid."""

    case_id: str
    mean: np.ndarray
    spread: np.ndarray
    real: np.ndarray
    head: np.ndarray
    ct: Optional[np.ndarray] = None  # the windowed CT on the model grid (0..255), for the CT features

    def predict_with(self, model: "ErrorModel") -> np.ndarray:
        """``model``'s error map of this sample."""
        return model.predict(self.mean, self.spread, self.head, self.ct)


def _rows(sample: Sample, names) -> tuple:
    """(features, error over the patient's mean error) of a sample's head voxels, and that mean error."""
    x = features(sample.mean, sample.spread, sample.head, names, sample.ct)
    err = np.abs(sample.real.astype(np.float32) - sample.mean.astype(np.float32))[sample.head]
    scale = float(err.mean())
    return x, err / max(scale, 1e-6), scale


def fit(samples: list, names=FEATURES, hidden: int = 32, steps: int = 3000, batch: int = 4096,
        seed: int = 0) -> ErrorModel:
    """Fit the perceptron (Adam, L1 loss on the per-patient-normalised error) to the samples' head voxels."""
    import torch

    if len(samples) < 2:
        raise CTMRIError("fitting an error model needs the held-out predictions of at least two patients")
    rows = [_rows(s, names) for s in samples]
    x = np.concatenate([r[0] for r in rows])
    y = np.concatenate([r[1] for r in rows]).astype(np.float32)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy((x - mu) / sd), torch.from_numpy(y)
    net = torch.nn.Sequential(torch.nn.Linear(len(names), hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                              torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        pick = torch.randint(0, len(xt), (batch,), generator=generator)
        loss = (net(xt[pick])[:, 0] - yt[pick]).abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    linear = [m for m in net if isinstance(m, torch.nn.Linear)]
    layers = [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy()) for m in linear]
    scale = float(np.mean([r[2] for r in rows]))
    info = {"trained_on": [s.case_id for s in samples], "hidden": hidden, "steps": steps, "seed": seed, "loss": "l1"}
    return ErrorModel(layers, mu.astype(np.float32), sd.astype(np.float32), scale, tuple(names), info)


def cross_validated_maps(samples: list, exclude=(), **options) -> dict:
    """{case_id: predicted error map} where each patient's map comes from a model fit on the other patients only
    (never on those in ``exclude``, which still get a map)."""
    return {s.case_id: s.predict_with(fit([o for o in samples if o is not s and o.case_id not in exclude], **options))
            for s in samples}


def cv_samples(run_dirs: list, cases) -> list:
    """One :class:`Sample` per patient from finished cross-validation runs: the mean of the runs' held-out
    predictions, their SD as the spread (as an ensemble of those runs predicts), the real MRI and the head."""
    from .intensity import head_mask
    from .training.report import held_out_predictions

    samples = []
    for case in cases:
        syns, _, _ = held_out_predictions(run_dirs, case.case_id, cases)
        if len(syns) != len(run_dirs):
            raise CTMRIError(f"patient {case.case_id} is held out in {len(syns)} of the {len(run_dirs)} runs; "
                             "every run must hold every patient out once (`ctmri train --cv loo`)")
        stack = np.stack(syns)
        samples.append(Sample(case.case_id, stack.mean(0), stack.std(0) if len(syns) > 1 else np.zeros_like(stack[0]),
                              case.mri, head_mask(case.ct), case.ct))
    return samples


def attach(weights_in, out, model: ErrorModel) -> str:
    """Write ``out``: the tensors and config of ``weights_in`` plus ``model``; return its sha256."""
    from .weights import check_model_target, read_weights_file, save_state

    check_model_target(out, "--out", source=weights_in)
    blob = read_weights_file(weights_in, framework="numpy")
    tensors, _ = split_state(blob["state_dict"])
    config = dict(blob["config"])
    config["error_model"] = model.config()
    return save_state(out, {**tensors, **model.tensors()}, config)


def _positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (``--steps 0`` fit nothing, after reading every run)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give at least 1")
    return value


def _shown(rho: Optional[float]) -> str:
    """A Spearman correlation for the console; "n/a" where the map is constant over the head (e.g. the SD of
    runs whose predictions do not differ), which ranks nothing."""
    return "n/a (a constant map)" if rho is None else f"{rho:.3f}"


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m CTtoMRISynthesisLib.error_model", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, nargs="+", help="the dataset folder(s) the CV runs were trained on")
    parser.add_argument("--from-cv", required=True, nargs="+", help="finished `ctmri train --cv loo` run folders (the ensemble's recipe)")
    parser.add_argument("--weights", required=True, help="the model file to add the error model to (not modified)")
    parser.add_argument("--out", required=True, help="the model file to write (.safetensors, with its .sha256)")
    parser.add_argument("--steps", type=_positive_int, default=3000, help="optimiser steps per fit (default 3000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", nargs="+", default=list(FEATURES), metavar="NAME",
                        help=f"the error model's inputs (default: {' '.join(FEATURES)}; also depth, depth_rel, ct, "
                             "ct_grad1, ct_local_sd3, …: see the module's docstring)")
    parser.add_argument("--exclude-from-training", nargs="+", default=[], metavar="ID",
                        help="patients whose errors are never fit (e.g. an MRI of another sequence than the target, "
                             "where the errors say nothing about this model's); their maps are still scored")
    args = parser.parse_args(argv)
    from .intensity import CTWindow
    from .training.discovery import discover
    from .training.report import check_finished_cv, uncertainty_quality
    from .weights import check_model_target, read_config

    try:
        check_model_target(args.out, "--out", source=args.weights)  # before the fits, not after them
        names = check_features(args.features)  # a misspelt name, before the CV runs are read
        check_finished_cv(args.from_cv)
        window = CTWindow(**read_config(args.weights)["preprocessing"]["ct_window"])
        samples = cv_samples(args.from_cv, discover(args.data, window))
        excluded = args.exclude_from_training
        unknown = sorted(set(excluded) - {s.case_id for s in samples})
        if unknown:
            raise CTMRIError(f"--exclude-from-training: unknown patient id(s) {unknown}; the data has "
                             f"{[s.case_id for s in samples]}")
        maps = cross_validated_maps(samples, exclude=excluded, names=names, steps=args.steps, seed=args.seed)
        rho = {}
        for s in samples:
            rho[s.case_id] = uncertainty_quality(s.real, s.mean, maps[s.case_id], s.head)["unc_spearman"]
            members = uncertainty_quality(s.real, s.mean, s.spread, s.head)["unc_spearman"]
            print(f"patient {s.case_id}: Spearman(error model, |error|) {_shown(rho[s.case_id])}; members' SD {_shown(members)}")
        values = [v for v in rho.values() if v is not None]
        print(f"mean {_shown(np.mean(values) if values else None)}, lowest {_shown(min(values, default=None))} "
              "(leave-one-patient-out)")
        model = fit([s for s in samples if s.case_id not in excluded], names=names, steps=args.steps, seed=args.seed)
        if excluded:
            model.info["excluded_from_training"] = list(excluded)
        model.info["cv_spearman"] = rho
        model.info["cv_runs"] = [str(r) for r in args.from_cv]
        digest = attach(args.weights, args.out, model)
    except CTMRIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (sha256 {digest}): {args.weights} plus an error model fit on {len(model.info['trained_on'])} patients")
    return 0


if __name__ == "__main__":
    sys.exit(main())
