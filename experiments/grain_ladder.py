"""The noise grain each median leaves on the external CTs: the input side of round 22, no synthesis.

For every CT that ``external_ct.py`` reads, put on the model grid as inference does (the shipped 45 / 120 HU window
for HU CT), :func:`grain.grain` of the CT as given and after in-plane filters: the 3 × 3 median, the 3 × 3 median
applied two and three times, the 5 × 5 median, and the 3 × 3 median followed by a 0.5 px Gaussian blur; all measured
on the soft tissue of the CT as given, as ``grain.match_grain`` does. Round 22 (``model_weights/RECIPES.md``) read
this table before choosing its next filter (the 5 × 5 median: the first here to reach the training target 8.27 on
all six 8-bit CTs). Numbers only (the images have no open licence).

    python experiments/grain_ladder.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from external_ct import ROOT, external_cts  # noqa: E402

from CTtoMRISynthesisLib import grain  # noqa: E402
from CTtoMRISynthesisLib.intensity import CTWindow  # noqa: E402
from CTtoMRISynthesisLib.training.unpaired import on_model_grid  # noqa: E402


def filters(ct: np.ndarray) -> dict:
    """{filter name: the filtered CT} for the filters of the table, from the (sampled) CT on the model grid."""
    once = grain._median(ct, 3)
    twice = grain._median(once, 3)
    return {"as given": ct, "3 × 3 median": once, "3 × 3 median twice": twice, "3 × 3 median three times":
            grain._median(twice, 3), "5 × 5 median": grain._median(ct, 5),
            "3 × 3 median, then blur 0.5 px": ndimage.gaussian_filter(once, (0, 0.5, 0.5))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    header = None
    for name, image, _, _ in external_cts(args.data):
        sample = grain._sample(on_model_grid(image, CTWindow(45.0, 120.0), 256))
        tissue = grain.soft_tissue(sample)
        row = {label: grain._band_sd(filtered, tissue) for label, filtered in filters(sample).items()}
        if header is None:
            header = list(row)
            print(f"| CT | {' | '.join(header)} |\n|---|{'---|' * len(header)}")
        print(f"| {name} | {' | '.join('–' if v is None else f'{v:.2f}' for v in row.values())} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
