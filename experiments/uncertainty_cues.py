"""Which per-voxel map tracks the error of a held-out patient? Issue 11, aim 4, on a finished CV run.

For every fold of a ``ctmri train --cv`` run (models with a second, Gaussian-σ output) and its held-out
patient, the Spearman correlation over the head voxels between |real − synthetic| and:
- ``sigma``: the model's own σ; ``sigma+flip``: the shipped map, sqrt(σ² + flip variance);
- ``flip``: the disagreement of the prediction and its mirror image's alone;
- ``grad_pred`` / ``ct_grad``: the gradient magnitude of the prediction / of the CT (edges);
- ``refit``: σ's 1×1 head refit for 300 Adam steps (rate 10⁻², batches of 16 slices, head voxels only) on
  the fold's *training* patients' frozen features, the Gaussian likelihood of their residuals.

    python experiments/uncertainty_cues.py RUN [--data ../shared/data/harvard_aanlib_ct_mri_2d]

Numbers only; the data's images are not written anywhere.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "CTtoMRISynthesis"))


def refit_sigma(net, cases, steps: int = 300, lr: float = 1e-2, seed: int = 0):
    """A copy of σ's 1×1 head fitted on frozen last-decoder features of ``cases`` (Gaussian likelihood)."""
    import torch

    from CTtoMRISynthesisLib.intensity import head_mask
    from CTtoMRISynthesisLib.model import laplace_scale
    from CTtoMRISynthesisLib.synthesis import stack_context

    feats, mus, ys, heads = [], [], [], []
    captured = {}
    hook = net.decoders[-1].register_forward_hook(lambda mod, inp, out: captured.__setitem__("f", out.detach()))
    for case in cases:
        x = torch.from_numpy(stack_context(case.ct.astype(np.float32) / 255.0, net.config.in_channels // 2))
        with torch.no_grad():
            out = net(x)
        feats.append(captured["f"])
        mus.append(out[:, :1])
        ys.append(torch.from_numpy(case.mri.astype(np.float32)[:, None] / 255.0))
        heads.append(torch.from_numpy(head_mask(case.ct)[:, None]))
    hook.remove()
    f, mu, y, h = (torch.cat(t) for t in (feats, mus, ys, heads))
    head = torch.nn.Conv2d(f.shape[1], 1, 1)
    with torch.no_grad():
        head.weight.copy_(net.head.weight[1:])
        head.bias.copy_(net.head.bias[1:])
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(f), (16,), generator=generator)
        s = laplace_scale(head(f[idx]))
        nll = (y[idx] - mu[idx]) ** 2 / (2 * s**2) + torch.log(s)
        loss = nll[h[idx]].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def sigma_of(case) -> np.ndarray:
        x = torch.from_numpy(stack_context(case.ct.astype(np.float32) / 255.0, net.config.in_channels // 2))
        hook2 = net.decoders[-1].register_forward_hook(lambda mod, inp, out: captured.__setitem__("f", out.detach()))
        with torch.no_grad():
            net(x)
            value = laplace_scale(head(captured["f"]))[:, 0].numpy() * 255.0
        hook2.remove()
        return value

    return sigma_of


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished `ctmri train --cv` run folder")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "harvard_aanlib_ct_mri_2d"))
    args = parser.parse_args()

    import torch
    from scipy import ndimage

    from CTtoMRISynthesisLib.intensity import CTWindow, head_mask
    from CTtoMRISynthesisLib.synthesis import predict_volume
    from CTtoMRISynthesisLib.training.discovery import discover
    from CTtoMRISynthesisLib.training.report import uncertainty_quality
    from CTtoMRISynthesisLib.weights import load_model

    torch.set_num_threads(1)
    names = ["sigma", "sigma+flip", "flip", "grad_pred", "ct_grad", "refit"]
    rows = []
    cases = None
    for fold in sorted(Path(args.run).glob("fold*")):
        model = load_model(fold / "model.safetensors")
        pre = model.config["preprocessing"]
        if cases is None:
            found = discover([args.data], CTWindow(**pre["ct_window"]), int(pre["size"]), Path(args.run) / "cache", "slice3")
            cases = {c.case_id: c for c in found}
        train = [cases[c] for c in model.config["split"]["train_cases"]]
        sigma_of = refit_sigma(model.net, train)
        for cid in model.config["split"]["test_cases"]:
            case = cases[cid]
            head = head_mask(case.ct)
            own = predict_volume(model.net, case.ct, context=int(pre["context_slices"]), flip_tta=False)
            shipped = predict_volume(model.net, case.ct, context=int(pre["context_slices"]), flip_tta=True)
            maps = {
                "sigma": own.spread,
                "sigma+flip": shipped.spread,
                "flip": np.sqrt(np.maximum(shipped.spread**2 - own.spread**2, 0.0)),
                "grad_pred": np.hypot(*np.gradient(ndimage.gaussian_filter(shipped.mean, (0, 1, 1)), axis=(1, 2))),
                "ct_grad": np.hypot(*np.gradient(ndimage.gaussian_filter(case.ct.astype(np.float32), (0, 1, 1)), axis=(1, 2))),
                "refit": sigma_of(case),
            }
            rho = {k: uncertainty_quality(case.mri, shipped.mean, v, head)["unc_spearman"] for k, v in maps.items()}
            rows.append((cid, rho))
            print(f"| {cid} | " + " | ".join("–" if rho[k] is None else f"{rho[k]:.3f}" for k in names) + " |", flush=True)
    print("| mean | " + " | ".join(f"{np.mean([r[k] or 0.0 for _, r in rows]):.3f}" for k in names) + " |")
    print("(columns: patient | " + " | ".join(names) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
