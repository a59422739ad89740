"""Could ctmri tell that a folder of pictures is stacked out of slice order? Tried, not shipped.

A folder of exported slices is stacked in the order of the numbers in the file names (``pictures.py``). When the
names do not number the slices in order (a PACS export named by instance UID, two scans interleaved), the volume
is scrambled and nothing in a PNG says so. The check tried here counts the slices whose most similar slice (mean
absolute difference at a quarter of the resolution, within ``--window`` positions) is not a neighbour, and would
warn above a fraction of the slices. This script prints that fraction for every real slice stack here, in its own
order, shuffled (``--shuffles`` random orders: the minimum and the median) and with one pair of slices three apart
swapped; then the same for the test suite's head phantoms.

Stacks: the CT, T1 and FLAIR folders of ``clinical_ct_t1_flair_2d`` (6 patients each), the CT and MRI slices of
each of the 8 Harvard patients (``harvard_aanlib_ct_mri_2d``) and the axial series of the real HU study
(``real_hu_head_ct_dicom``). Numbers only; no image is written.

Why it was not shipped: on the real stacks the in-order and shuffled fractions separate, but the phantoms (heads
symmetric above and below their widest slice) look out of order in their own order, so a head scanned over a
symmetric range could be warned about wrongly; and the shipped model synthesises each slice alone, with its output
pictures named after its input pictures (``--pictures``), so a misordered folder still gives each slice its right
synthetic MRI: only the stacked volume is scrambled, which the user sees at once in any 3D view.

    python experiments/picture_order.py [--data ../shared/data] [--shuffles 20] [--window 6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "CTtoMRISynthesis"))

from CTtoMRISynthesisLib.pictures import read_pictures  # noqa: E402
from CTtoMRISynthesisLib.dicom import list_series, read_input  # noqa: E402


def unlike_neighbours(stack: np.ndarray, window: int) -> int:
    """How many slices have, within ``window`` positions, a most similar slice that is not a neighbour (ties go
    to the neighbour, so identical slices never count)."""
    small = np.stack([_pooled(plane) for plane in stack])
    count = 0
    for k in range(len(small)):
        near = [j for j in range(max(0, k - window), min(len(small), k + window + 1)) if j != k]
        distance = {j: float(np.abs(small[k] - small[j]).mean()) for j in near}
        count += abs(min(distance, key=lambda j: (distance[j], abs(j - k))) - k) > 1
    return count


def _pooled(plane: np.ndarray, factor: int = 4) -> np.ndarray:
    """4 × 4 means: the anatomy, not the noise."""
    h, w = (plane.shape[0] // factor) * factor, (plane.shape[1] // factor) * factor
    return plane[:h, :w].astype(np.float32).reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def real_stacks(data: Path) -> Dict[str, np.ndarray]:
    """Every real slice stack here, in slice order, as (z, y, x) arrays."""
    stacks = {}
    clinical = data / "clinical_ct_t1_flair_2d"
    for kind in ("CT", "T1", "FLAIR"):
        for folder in sorted(p for p in (clinical / kind).iterdir() if p.is_dir()):
            stacks[f"clinical {kind} {folder.name}"] = sitk.GetArrayFromImage(read_pictures(folder, kind)[0])
    harvard = data / "harvard_aanlib_ct_mri_2d"
    for sub in ("CT", "MRI"):
        by_case: Dict[str, list] = {}
        for path in sorted((harvard / sub).glob("*.png")):  # <case><3-digit slice>.png, as training/discovery reads it
            by_case.setdefault(path.stem[:-3], []).append(path)
        for case, files in sorted(by_case.items(), key=lambda item: int(item[0])):
            planes = [sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in files]
            stacks[f"harvard {sub} {case}"] = np.stack([p[..., 0] if p.ndim == 3 else p for p in planes])
    study = data / "real_hu_head_ct_dicom"
    for series in list_series(study, "CT"):
        if series.problem is None and series.plane == "axial" and series.is_original_primary and series.slices >= 6:
            image, _ = read_input(study, "CT", series.uid)
            stacks[f"HU study series {series.number}"] = sitk.GetArrayFromImage(image)
    return stacks


def phantom_stacks() -> Dict[str, np.ndarray]:
    """The test suite's head phantoms (``Testing/phantoms.py``), 8-bit CT, as slice stacks."""
    sys.path.insert(0, str(ROOT / "Testing"))
    import phantoms

    return {f"phantom seed {seed}, {n} slices": phantoms.slice_pair(seed=seed, slices=n, first_z=z)[0]
            for seed, n, z in ((41, 12, -30.0), (0, 12, -20.0), (3, 20, -45.0))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--shuffles", type=int, default=20)
    parser.add_argument("--window", type=int, default=6)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    def fraction(stack: np.ndarray) -> float:
        return unlike_neighbours(stack, args.window) / len(stack)

    print(f"fraction of slices whose most similar slice within {args.window} is not a neighbour")
    print(f"{'stack':30s} {'slices':>6s} {'in order':>8s} {'shuffled min':>12s} {'median':>6s} {'one swap':>8s}")
    rows: Dict[str, list] = {"real": [], "phantom": []}
    for kind, stacks in (("real", real_stacks(args.data)), ("phantom", phantom_stacks())):
        for name, stack in stacks.items():
            shuffled = [fraction(stack[rng.permutation(len(stack))]) for _ in range(args.shuffles)]
            swapped = stack.copy()
            k = len(stack) // 2
            swapped[[k, k + 3]] = swapped[[k + 3, k]]
            rows[kind].append((fraction(stack), min(shuffled)))
            print(f"{name:30s} {len(stack):6d} {rows[kind][-1][0]:8.2f} {min(shuffled):12.2f} "
                  f"{np.median(shuffled):6.2f} {fraction(swapped):8.2f}")
    for kind, values in rows.items():
        print(f"{kind}: in order at most {max(v[0] for v in values):.2f}; shuffled at least {min(v[1] for v in values):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
