"""Is the Hounsfield window a lever for issue 11's aim 2b (CSF ≥ 1.6 × brain tissue on the real HU CT)?

The shipped model sees a HU CT through the window of its config (level 45, width 120 HU: chosen from textbook HU
values, model card "Preprocessing"), so that it looks like the training CT, which is display-windowed 8-bit.
This script checks that choice against the data instead of the textbook, and measures what another window does:

1. Landmarks: on each Harvard patient's 8-bit CT, the median CT value in CSF and in brain tissue (the strict
   masks of ``contrast.tissue_masks``: the darkest 10 % of the intracranial CT, and its 40th–90th percentile);
   their median over the patients is the target. On the real HU study the same masks (found on the CT as the
   shipped window shows it) give the HU values of its CSF and brain landmarks.
2. The matched window: the one linear HU → 0..255 map that sends the study's two landmarks onto the targets
   (two equations, two unknowns: level and width). It is a rule fixed before any synthesis is looked at: the
   window that makes this scanner's CT look like the training CT in CSF and brain, nothing tuned on the output.
3. For the shipped window, the matched one (from each series, and their mean), and a clinical brain window
   (40 / 80), each series is synthesised with the shipped model and scored as ``external_ct.py`` scores it: CSF
   (0–15 HU) over brain tissue (25–45 HU) in the synthetic MRI, masks from the HU CT (not from the window).

    python experiments/hu_window.py [--data ../shared/data] [--weights FILE]

Numbers only; the CT and its outputs have no open licence and are not committed.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "CTtoMRISynthesis"))
sys.path.insert(0, str(ROOT / "experiments"))

from external_ct import contrast, dicom_axial_series, masks_hu  # noqa: E402

from CTtoMRISynthesisLib.contrast import tissue_masks  # noqa: E402
from CTtoMRISynthesisLib.intensity import CTWindow  # noqa: E402
from CTtoMRISynthesisLib.pipeline import synthesize  # noqa: E402
from CTtoMRISynthesisLib.training.discovery import discover  # noqa: E402
from CTtoMRISynthesisLib.weights import default_weights_path, load_model  # noqa: E402

CLINICAL_BRAIN = (40.0, 80.0)


def landmarks(ct255: np.ndarray, values: np.ndarray) -> tuple:
    """Median of ``values`` in the strict CSF and brain masks found on ``ct255`` (same grid)."""
    masks = tissue_masks(ct255)
    return float(np.median(values[masks["csf"]])), float(np.median(values[masks["brain"]]))


def harvard_targets(data: Path, window: CTWindow) -> list:
    """[(patient, CSF landmark, brain landmark)] of the Harvard training CTs (0..255)."""
    rows = []
    for case in discover([data / "harvard_aanlib_ct_mri_2d"], window):
        ct = case.ct.astype(np.float32)
        rows.append((case.case_id, *landmarks(ct, ct)))
    return rows


def matched_window(hu_landmarks: tuple, targets: tuple) -> CTWindow:
    """The window mapping the HU landmarks (CSF, brain) linearly onto the 0..255 targets."""
    (h_csf, h_brain), (t_csf, t_brain) = hu_landmarks, targets
    width = 255.0 * (h_brain - h_csf) / (t_brain - t_csf)
    low = h_csf - t_csf * width / 255.0
    return CTWindow(level=low + width / 2.0, width=width)


def synthesise_with(model, image: sitk.Image, window: CTWindow) -> np.ndarray:
    """The synthetic MRI of ``image`` with the model's HU window replaced by ``window`` (in memory only)."""
    model = copy.copy(model)
    model.config = copy.deepcopy(model.config)
    model.config["preprocessing"]["ct_window"] = {"level": window.level, "width": window.width}
    result = synthesize(image, None, model=model, device="cpu")
    return sitk.GetArrayFromImage(result.synthetic_mri).astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--weights", default=str(default_weights_path()))
    args = parser.parse_args()
    data = Path(args.data)
    model = load_model(args.weights)
    shipped = CTWindow(**model.config["preprocessing"]["ct_window"])

    rows = harvard_targets(data, shipped)
    print("| Harvard patient | CT in CSF (strict mask) | CT in brain tissue |\n|---|---|---|")
    for patient, csf, brain in rows:
        print(f"| {patient} | {csf:.1f} | {brain:.1f} |")
    target = (float(np.median([r[1] for r in rows])), float(np.median([r[2] for r in rows])))
    print(f"| median (the target) | {target[0]:.1f} | {target[1]:.1f} |\n")

    series = [(n, image, sitk.GetArrayFromImage(image).astype(np.float32)) for n, _, image in
              dicom_axial_series(data / "real_hu_head_ct_dicom" / "DICOM")]
    print("| HU series | HU in CSF (strict mask, shipped window) | HU in brain tissue | as the shipped window shows "
          "them (0..255) | matched window (level / width HU) |\n|---|---|---|---|---|")
    matched = {}
    for number, image, hu in series:
        hu_marks = landmarks(shipped.apply(hu), hu)
        shown = tuple(float(shipped.apply(np.array([v]))[0]) for v in hu_marks)
        matched[number] = matched_window(hu_marks, target)
        print(f"| {number} ({image.GetSpacing()[2]:g} mm) | {hu_marks[0]:.1f} | {hu_marks[1]:.1f} | "
              f"{shown[0]:.1f} / {shown[1]:.1f} | {matched[number].level:.1f} / {matched[number].width:.1f} |")
    mean = CTWindow(level=float(np.mean([w.level for w in matched.values()])),
                    width=float(np.mean([w.width for w in matched.values()])))
    windows = {"shipped": shipped, **{f"matched on series {n}": w for n, w in matched.items()},
               "matched, mean of the series": mean, "clinical brain window": CTWindow(*CLINICAL_BRAIN)}

    print("\n| window | level / width (HU) | " + " | ".join(f"CSF / brain, series {n}" for n, _, _ in series)
          + " |\n|---|---|" + "---|" * len(series))
    for name, window in windows.items():
        cells = []
        for _, image, hu in series:
            syn = synthesise_with(model, image, window)
            cells.append(f"{contrast(syn, masks_hu(hu, image.GetSpacing()[0]))['csf_over_brain']:.2f}")
        print(f"| {name} | {window.level:.1f} / {window.width:.1f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
