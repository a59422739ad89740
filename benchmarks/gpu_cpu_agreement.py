"""Does the GPU path give the CPU's synthetic MRI? The shipped model on every Harvard patient, once per device.

On a GPU the networks run under fp16 autocast (``synthesis``), on the CPU in float32, so the two synthetic MRIs
differ a little; this says how much, where a clinician would look (inside the head) and in the scores the model
card quotes (MAE, SSIM in head, the uncertainty's Spearman with the error). One row per patient: mean and
largest |GPU − CPU| of the synthetic MRI and of the uncertainty in the head (grey levels, 0..255), the share of
head voxels that differ by more than 1 grey level, and each device's MAE and in-head SSIM against the real MRI,
with the seconds each device took for the patient (model loaded beforehand, first patient with warm-up).
Numbers only; the data's images are not written anywhere.

    python benchmarks/gpu_cpu_agreement.py [--data DIR] [--device cuda] [--against cpu] [--cases ID ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "CTtoMRISynthesis"))


def compare(case, loaded: dict, devices: tuple) -> dict:
    """One patient's row: both devices' predictions, their differences in the head, each one's scores."""
    from CTtoMRISynthesisLib.training.report import evaluate, predict_case, uncertainty_quality

    preds, seconds = {}, {}
    for device in devices:
        start = time.perf_counter()
        preds[device] = predict_case(loaded[device], case, device)
        seconds[device] = time.perf_counter() - start
    a, b = (preds[d] for d in devices)
    head = a.head & b.head
    d_syn = np.abs(a.mean - b.mean)[head]
    d_unc = np.abs(a.spread - b.spread)[head]
    row = {"case": case.case_id, "slices": case.ct.shape[0], "syn mean |Δ|": float(d_syn.mean()),
           "syn max |Δ|": float(d_syn.max()), "> 1 grey level %": float(100 * (d_syn > 1).mean()),
           "unc mean |Δ|": float(d_unc.mean()), "unc max |Δ|": float(d_unc.max())}
    for device in devices:
        scores = evaluate(case.mri, preds[device].mean, case.ct, 200.0)
        quality = uncertainty_quality(case.mri, preds[device].mean, preds[device].spread, preds[device].head)
        row[f"MAE {device}"] = scores["mae"]
        row[f"SSIM in head {device}"] = scores["ssim_foreground"]
        row[f"Spearman {device}"] = quality["unc_spearman"]
        row[f"s {device}"] = seconds[device]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "harvard_aanlib_ct_mri_2d"))
    parser.add_argument("--device", default="cuda", help="the device checked (default cuda)")
    parser.add_argument("--against", default="cpu", help="the device it is compared with (default cpu)")
    parser.add_argument("--cases", nargs="*", help="patient ids (default: every patient)")
    args = parser.parse_args()

    import torch

    from CTtoMRISynthesisLib.intensity import CTWindow
    from CTtoMRISynthesisLib.training.discovery import discover
    from CTtoMRISynthesisLib.weights import default_weights_path, load_model

    for flag, device in (("--device", args.device), ("--against", args.against)):
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"error: {flag} {device}, but this machine has no CUDA GPU: run it where there is one",
                  file=sys.stderr)
            return 2
    devices = (args.device, args.against)
    loaded = {device: load_model(default_weights_path(), device=device) for device in devices}
    cases = [c for c in discover([args.data], CTWindow(45, 120)) if not args.cases or c.case_id in args.cases]
    if not cases:
        print(f"error: no patients found in {args.data}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"shipped model {default_weights_path().name}; {args.device} ({name}) against {args.against}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    rows = [compare(case, loaded, devices) for case in cases]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|---" * len(keys) + "|")
    for row in rows:
        print("| " + " | ".join(v if isinstance(v, str) else "–" if v is None else f"{v:.4g}" for v in row.values()) + " |")
    for device in devices:
        mae = np.mean([r[f"MAE {device}"] for r in rows])
        ssim = np.mean([r[f"SSIM in head {device}"] for r in rows])
        known = [r[f"Spearman {device}"] for r in rows if r[f"Spearman {device}"] is not None]
        rho = f"{np.mean(known):.4f}" if known else "–"  # None: a constant map (a model without a spread)
        print(f"{device}: mean MAE {mae:.3f}, SSIM in head {ssim:.4f}, uncertainty Spearman {rho}, "
              f"{sum(r[f's {device}'] for r in rows):.1f} s for {sum(r['slices'] for r in rows)} slices")
    worst = max(r["syn max |Δ|"] for r in rows)
    print(f"largest |{args.device} − {args.against}| of the synthetic MRI in any head: {worst:.3f} grey levels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
