"""Experiment: do the Harvard CT / MRI slice pairs line up, and is their misalignment a lever? Issue 11, aim 1.

The pairs are "already co-registered" (the data's SOURCE.md: a CT bone mask follows the MRI's skull), but the
metrics punish even one pixel (the real MRI shifted 1 px scores MAE 13.6). For every pair this registers the CT
slice to its MRI slice with the product's own rigid registration (``registration.register`` on the slice as a
one-slice volume, default settings: the identity is kept unless mutual information improves enough) and
prints, per patient, the mean displacement over the MRI head (pixels; the pictures carry no spacing, so 1 px
is 1 "mm" here), the largest, how many slices moved, and the median translation.

``--run RUN`` (a ``ctmri train --cv loo`` folder holding each fold's ``pred_P.npz``) also scores its held-out
predictions and the lookup table (fit on the other patients less ``--exclude-from-training``) as given and
after moving each slice by its registration, which is what ``ctmri synthesize --mri`` does before it scores:
if misalignment were a large part of the error, the model's MAE over the table's would fall.

``--write DIR`` writes a copy of the pairs with each CT slice resampled onto its MRI slice (linear, rounded to
8 bits; the MRI files linked), to train on realigned pairs (``ctmri train --data DIR``). A slice whose
registration moves the head by more than ``--max-shift`` pixels on average is written as given: on patient 32's
top slices (a large lesion, a small head section) the registration lands 5-18 px away, visibly wrong, where
every other slice of every patient moves by at most 3.9 px.

    python experiments/pair_alignment.py [--data DIR] [--run RUN] [--exclude-from-training 2]
        [--write DIR [--max-shift 4]]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "CTtoMRISynthesis"))

from CTtoMRISynthesisLib import registration  # noqa: E402
from CTtoMRISynthesisLib.intensity import CTWindow  # noqa: E402
from CTtoMRISynthesisLib.metrics import compute_metrics  # noqa: E402
from CTtoMRISynthesisLib.training.discovery import discover  # noqa: E402
from CTtoMRISynthesisLib.training.report import fit_lookup_table, predict_lookup_table  # noqa: E402

HARVARD = ROOT.parent / "shared" / "data" / "harvard_aanlib_ct_mri_2d"
SCORES = ("mae", "ssim", "ssim_foreground")


def as_volume(slice_2d: np.ndarray) -> sitk.Image:
    """A 2D slice as the one-slice volume the registration takes (spacing 1)."""
    return sitk.JoinSeries(sitk.GetImageFromArray(np.ascontiguousarray(slice_2d, dtype=np.float32)))


def register_slices(case) -> list[sitk.Transform]:
    """The product's rigid CT→MRI registration of each slice pair (MRI point → CT point)."""
    return [registration.register(as_volume(case.mri[s]), as_volume(case.ct[s]), "rigid").transform
            for s in range(case.slices)]


def moved(volume: np.ndarray, case, transforms: list) -> np.ndarray:
    """Each slice of ``volume`` (on the CT's grid) resampled onto its MRI slice by that slice's transform, as the
    pipeline resamples the CT (``registration.resample_to``: linear, 0 outside)."""
    out = np.zeros_like(volume, dtype=np.float32)
    for s, transform in enumerate(transforms):
        on_mri = registration.resample_to(as_volume(volume[s]), as_volume(case.mri[s]), transform)
        out[s] = sitk.GetArrayFromImage(on_mri)[0]
    return out


def displacement(case, s: int, transform: sitk.Transform) -> float:
    """Mean displacement (px) of slice ``s``'s MRI head points under ``transform``."""
    fixed = as_volume(case.mri[s])
    return registration.mean_displacement_mm(transform, sitk.Euler3DTransform(), fixed,
                                             sitk.Cast(fixed > 0, sitk.sitkUInt8))


def displacement_row(case, transforms: list, disp: list) -> dict:
    """Mean / max displacement over the MRI head, slices moved, median translation (x, y) in pixels."""
    shifts = np.asarray([t.GetParameters()[3:5] for t in transforms])
    return {"slices": case.slices, "moved": int(np.sum(np.asarray(disp) > 0)), "disp_mean": float(np.mean(disp)),
            "disp_max": float(np.max(disp)), "tx_median": float(np.median(shifts[:, 0])),
            "ty_median": float(np.median(shifts[:, 1]))}


def write_realigned(cases, transforms: dict, displacements: dict, data: Path, out: Path, max_shift: float) -> None:
    """The pairs with each CT slice moved onto its MRI slice (unless it would move by more than ``max_shift``
    px: kept as given), under the original file names."""
    (out / "CT").mkdir(parents=True, exist_ok=True)
    (out / "MRI").mkdir(parents=True, exist_ok=True)
    kept = []
    for case in cases:
        accepted = []
        for s, transform in enumerate(transforms[case.case_id]):
            if displacements[case.case_id][s] > max_shift:
                kept.append(case.slice_names[s])
                transform = sitk.Euler3DTransform()
            accepted.append(transform)
        ct = moved(case.ct, case, accepted)
        for s, name in enumerate(case.slice_names):
            sitk.WriteImage(sitk.GetImageFromArray(np.clip(np.rint(ct[s]), 0, 255).astype(np.uint8)),
                            str(out / "CT" / name))
            link = out / "MRI" / name
            if not link.exists():
                link.symlink_to((data / "MRI" / name).resolve())
    print(f"kept as given (registration moved them by more than {max_shift} px): {', '.join(kept) or 'none'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=HARVARD)
    ap.add_argument("--run", type=Path, help="a cross-validation run with pred_P.npz per fold")
    ap.add_argument("--exclude-from-training", nargs="*", default=["2"], metavar="ID")
    ap.add_argument("--write", type=Path, metavar="DIR", help="write the realigned pairs here")
    ap.add_argument("--max-shift", type=float, default=4.0, metavar="PX",
                    help="with --write: keep a slice as given when its registration moves it more than this")
    args = ap.parse_args()

    # The raw 0..255 CT, as the lookup table and the trainer's cache see it with the shipped window.
    cases = discover([args.data], CTWindow(45, 120))
    transforms = {c.case_id: register_slices(c) for c in cases}
    displacements = {c.case_id: [displacement(c, s, t) for s, t in enumerate(transforms[c.case_id])] for c in cases}
    print("patient  slices  moved  mean px  max px  median tx  median ty")
    for case in cases:
        r = displacement_row(case, transforms[case.case_id], displacements[case.case_id])
        print(f"{case.case_id:>7}  {r['slices']:6d}  {r['moved']:5d}  {r['disp_mean']:7.2f}  {r['disp_max']:6.2f}  "
              f"{r['tx_median']:9.2f}  {r['ty_median']:9.2f}")
    if args.write:
        write_realigned(cases, transforms, displacements, args.data, args.write, args.max_shift)
        print(f"realigned pairs written to {args.write}")
    if args.run:
        score_run(cases, transforms, args.run, set(args.exclude_from_training))


def score_run(cases, transforms: dict, run: Path, excluded: set) -> None:
    """Held-out predictions and the lookup table, scored as given and after the per-slice registration."""
    preds = {f.stem[len("pred_"):]: np.load(f)["syn"] for f in sorted(run.glob("fold*/pred_*.npz"))}
    rows = []
    print("\npatient  model MAE (registered)  lookup MAE (registered)  model SSIM in head (registered)  "
          "lookup SSIM in head (registered)")
    for case in cases:
        if case.case_id not in preds:
            continue
        table = fit_lookup_table([c for c in cases if c.case_id != case.case_id and c.case_id not in excluded])
        given = {"model": preds[case.case_id], "lookup": predict_lookup_table(table, case.ct)}
        row = {}
        for name, volume in given.items():
            for how, v in (("given", volume), ("registered", moved(volume, case, transforms[case.case_id]))):
                m = compute_metrics(case.mri, v)
                row.update({(name, how, k): float(m[k]) for k in SCORES})
        rows.append(row)
        print(f"{case.case_id:>7}  {row['model', 'given', 'mae']:6.2f} ({row['model', 'registered', 'mae']:6.2f})"
              f"{'':9}  {row['lookup', 'given', 'mae']:6.2f} ({row['lookup', 'registered', 'mae']:6.2f})"
              f"{'':10}  {row['model', 'given', 'ssim_foreground']:.3f} ({row['model', 'registered', 'ssim_foreground']:.3f})"
              f"{'':18}  {row['lookup', 'given', 'ssim_foreground']:.3f} ({row['lookup', 'registered', 'ssim_foreground']:.3f})")
    for how in ("given", "registered"):
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k[1] == how}
        beats = sum(r["model", how, "mae"] < r["lookup", how, "mae"] for r in rows)
        print(f"{how:>10}: model MAE {mean['model', how, 'mae']:.2f}, lookup {mean['lookup', how, 'mae']:.2f}, "
              f"ratio {mean['model', how, 'mae'] / mean['lookup', how, 'mae']:.3f}, below the table on {beats}/{len(rows)}; "
              f"SSIM {mean['model', how, 'ssim']:.3f} vs {mean['lookup', how, 'ssim']:.3f}; SSIM in head "
              f"{mean['model', how, 'ssim_foreground']:.3f} vs {mean['lookup', how, 'ssim_foreground']:.3f}")


if __name__ == "__main__":
    main()
