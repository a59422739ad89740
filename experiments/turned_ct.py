"""Experiment: a CT turned by a quarter or half turn against its MRI, and the registration's turn check.

A CT exported from another viewer (pictures) or with a wrong orientation header can lie turned by 90°, 180° or
270° in the axial plane against its MRI. The coarse level's extra starts (±10°) cannot reach that; since stop 40
the registration also scores quarter turns of its optimum and optimises from the best one when it is clearly better
(``registration._unless_a_turn_is_better``; a turn better by less than 20 % of MI is only warned about). This
measures both sides of that on the 147 Harvard CT / T2 slice
pairs: every pair registered as it is (does the check ever move a pair it should leave alone?) and with its CT
turned exactly (about the slice centre, by whole quarter turns: no interpolation), with the check and without it
(``--without-check``: ``register(turns_deg=())``, the behaviour before). A turned pair counts as recovered when the
found transform lies within 2 px (mean over the MRI head) of the pair's own registration composed with the turn;
an unturned pair is counted as within 2 px of the atlas's alignment (the identity) or not, as before the check.

    python experiments/turned_ct.py [--data DIR] [--turns 0 90 180 270] [--without-check] [--patients 16 20]

Numbers only; one line per patient and turn, then the totals.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "CTtoMRISynthesis"))

from CTtoMRISynthesisLib import registration  # noqa: E402
from CTtoMRISynthesisLib.intensity import CTWindow  # noqa: E402
from CTtoMRISynthesisLib.training.discovery import discover  # noqa: E402

HARVARD = ROOT.parent / "shared" / "data" / "harvard_aanlib_ct_mri_2d"
RECOVERED_PX = 2.0


def as_volume(slice_2d: np.ndarray) -> sitk.Image:
    """A 2D slice as the one-slice volume the registration takes (spacing 1)."""
    return sitk.JoinSeries(sitk.GetImageFromArray(np.ascontiguousarray(slice_2d, dtype=np.float32)))


def turn(image: sitk.Image, degrees: float) -> tuple[sitk.Image, sitk.Transform]:
    """``image`` turned about its centre by ``degrees`` (a multiple of 90: exact), and the resampling transform
    (turned image point -> original image point)."""
    motion = sitk.Euler3DTransform()
    motion.SetCenter(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    motion.SetRotation(0.0, 0.0, math.radians(degrees))
    return sitk.Resample(image, image, motion, sitk.sitkNearestNeighbor, 0.0), motion


def turn_gain(stop_condition: str) -> float | None:
    """The relative MI gain a turn made, read from the registration's stop condition (None: no turn)."""
    found = re.match(r"turned by [0-9.]+° in the axial plane: that optimum's MI (-?[0-9.]+) beats the first one's "
                     r"(-?[0-9.]+)", stop_condition)
    if not found:
        return None
    turned, first = float(found.group(1)), float(found.group(2))
    return (first - turned) / abs(first)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HARVARD))
    parser.add_argument("--turns", nargs="+", type=float, default=[0.0, 90.0, 180.0, 270.0])
    parser.add_argument("--without-check", action="store_true", help="no quarter turns tried (the behaviour before)")
    parser.add_argument("--patients", nargs="*", help="only these patients (default: all)")
    args = parser.parse_args()
    options = {"turns_deg": ()} if args.without_check else {}

    cases = [c for c in discover([args.data], CTWindow(45, 120)) if not args.patients or c.case_id in args.patients]
    totals = {t: [0, 0, 0, 0] for t in args.turns}  # recovered, slices, turned by the check, warned (kept)
    gains: dict = {True: [], False: []}  # MI gains of the turns made, when right / when wrong
    for case in cases:
        counts = {t: [0, 0, 0] for t in args.turns}
        for s in range(case.slices):
            mri, ct = as_volume(case.mri[s]), as_volume(case.ct[s])
            head = registration.foreground_mask(mri)
            own = registration.register(mri, ct, **options)
            for t in args.turns:
                if t == 0:  # as it is: kept within 2 px of the atlas's alignment?
                    result, expected = own, sitk.Euler3DTransform()
                else:  # turned CT point q shows original CT point motion(q): expected, motion^-1 after own
                    moving, motion = turn(ct, t)
                    result = registration.register(mri, moving, **options)
                    expected = sitk.CompositeTransform([motion.GetInverse(), own.transform])
                error = registration.mean_displacement_mm(result.transform, expected, mri, head)
                counts[t][0] += error < RECOVERED_PX
                counts[t][1] += result.stop_condition.startswith("turned by")
                counts[t][2] += any("orientation was kept as given" in w for w in result.warnings)
                gain = turn_gain(result.stop_condition)
                if gain is not None:
                    gains[bool(t != 0 and error < RECOVERED_PX)].append(gain)
        for t in args.turns:
            recovered, checked, warned = counts[t]
            totals[t][0] += recovered
            totals[t][1] += case.slices
            totals[t][2] += checked
            totals[t][3] += warned
            what = "within 2 px of the atlas alignment" if t == 0 else "recovered"
            print(f"patient {case.case_id}, CT turned {t:g}°: {what} {recovered} of {case.slices}, "
                  f"turned by the check {checked}, warned about {warned}", flush=True)
    label = "without the turn check" if args.without_check else "with the turn check"
    print(f"\n{label}:")
    for t, (recovered, n, checked, warned) in totals.items():
        what = "within 2 px of the atlas alignment" if t == 0 else "recovered"
        print(f"  CT turned {t:g}°: {what} {recovered} of {n} ({recovered / max(n, 1):.0%}); turned by the check "
              f"{checked}; kept and warned about (a turn better by less than 20 %) {warned}")
    for right, values in gains.items():
        if values:
            q = np.percentile(values, [0, 5, 50, 100])
            print(f"  MI gain of the turns made, {'recovered' if right else 'not recovered or unturned'}: n {len(values)}, "
                  f"min {q[0]:.1%}, 5th percentile {q[1]:.1%}, median {q[2]:.1%}, max {q[3]:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
