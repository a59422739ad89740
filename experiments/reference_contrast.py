"""Calibration of the product's "is the reference MRI T2-weighted?" warning (``contrast.py``) on real pairs.

For each real CT / MRI pair here, the reference MRI's CSF / brain tissue ratio as ``ctmri synthesize --mri``
measures it: CSF and brain tissue found on the CT (0..255 as the model sees it) brought onto the MRI's grid,
the MRI min-max scaled to 0..255. Pairs:

- the 8 Harvard patients, CT and MRI as given (co-registered): 7 T2, patient 2 FLAIR/PD-like;
- the 6 clinical patients of another hospital (``clinical_ct_t1_flair_2d``), their CT registered to their T1
  and to their FLAIR by the product's own similarity registration (pictures stacked per patient, spacing
  0.45 mm in-plane and 5 mm between slices given as ``--picture-spacing`` would).

Each row says whether the warning fires (ratio below ``contrast.T2_MIN_RATIO``). Numbers only; the data's
images are not written anywhere.

    python experiments/reference_contrast.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "CTtoMRISynthesis"))

from CTtoMRISynthesisLib import geometry, registration  # noqa: E402
from CTtoMRISynthesisLib.contrast import T2_MIN_RATIO, reference_csf_over_brain  # noqa: E402
from CTtoMRISynthesisLib.dicom import read_input  # noqa: E402
from CTtoMRISynthesisLib.intensity import CTWindow, normalise_ct, normalise_mri  # noqa: E402
from CTtoMRISynthesisLib.training.discovery import discover  # noqa: E402

WINDOW = CTWindow(45, 120)  # the shipped model's CT window (only the 8-bit path is taken here)
CLINICAL_SPACING = (0.45, 5.0)


def row(source: str, patient: str, weighting: str, value, note: str = "") -> None:
    shown = "–" if value is None else f"{value:.2f}"
    warned = "–" if value is None else ("yes" if value < T2_MIN_RATIO else "no")
    print(f"| {source} | {patient} | {weighting} | {shown} | {warned} | {note} |", flush=True)


def harvard(data: Path) -> None:
    for case in discover([data / "harvard_aanlib_ct_mri_2d"], WINDOW):
        value = reference_csf_over_brain(case.ct.astype(np.float32), normalise_mri(case.mri.astype(np.float32)))
        row("Harvard", case.case_id, "FLAIR/PD-like" if case.case_id == "2" else "T2", value, "as given")


def clinical(data: Path) -> None:
    folder = data / "clinical_ct_t1_flair_2d"
    for patient in sorted(p.name for p in (folder / "CT").iterdir()):
        ct, _ = read_input(folder / "CT" / patient, "CT", picture_spacing=CLINICAL_SPACING)
        ct255 = geometry.array_on_grid(normalise_ct(sitk.GetArrayFromImage(ct), WINDOW)[0], ct)
        for weighting in ("T1", "FLAIR"):
            mri, _ = read_input(folder / weighting / patient, "MRI", picture_spacing=CLINICAL_SPACING)
            found = registration.register(mri, ct, "similarity")
            on_mri = geometry.resample(ct255, mri, found.transform, default_value=0.0)
            value = reference_csf_over_brain(sitk.GetArrayFromImage(on_mri), normalise_mri(sitk.GetArrayFromImage(mri)))
            row("clinical", patient, weighting, value, f"registered (similarity), overlap {found.overlap:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    print(f"warning below CSF / brain = {T2_MIN_RATIO:g} (contrast.T2_MIN_RATIO)\n")
    print("| data | patient | reference MRI | CSF / brain | warned | pair |")
    print("|---|---|---|---|---|---|")
    harvard(args.data)
    clinical(args.data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
