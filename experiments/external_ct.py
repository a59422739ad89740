"""Synthetic MRI on CT the model never saw: is it T2-like, is it confined to the head, is it robust?

Issue 11, aims 2 and 3, measured on the external data in ``../shared/data`` (internal use only: nothing
this script makes may be committed except the numbers it prints):

- ``real_hu_head_ct_dicom``: both ORIGINAL/PRIMARY axial series (5 mm and 2.5 mm) of a real scanner's
  head CT in Hounsfield units, with its head holder;
- ``clinical_ct_t1_flair_2d``: the CT slices of 6 patients from another hospital (8-bit screenshots of a
  narrow, noisy brain window; stacked per patient, no spacing).

**CSF / brain ratio** (aim 2: T2 makes CSF brighter than brain tissue; real T2 gives 1.3–2.3, median 1.7 on
the Harvard pairs): mean synthetic MRI in CSF over mean synthetic MRI in brain tissue, masks from the CT:
- intracranial = inside the skull (bone filled per axial slice, minus the bone), eroded ~3 mm from it;
- HU CT: CSF = intracranial voxels at 0..15 HU, brain tissue = 25..45 HU (the issue's definition);
- 8-bit CT (no HU): the CT smoothed by a Gaussian of 2 px, then split inside the intracranial mask by
  Otsu's threshold (per patient): below = CSF, above = brain tissue. Bone = 250 or above (saturated).
  Also ``strict``: CSF = the darkest 10 % of the intracranial mask (CT smoothed by 1 px), brain tissue =
  its 40th–90th percentile. On the Harvard pairs the real T2 gives median 1.20 with the Otsu masks (they
  count partial-volume sulci as CSF) and 1.66 with the strict ones (``csf_contrast_cv.py``), so the aim's
  1.6 can only be read against the strict masks on 8-bit CT.

**Outside the head** (aim 2, ≤ 0.5 %): the share of the synthetic MRI's total signal lying outside the
head's largest connected component (HU CT > −300 HU; 8-bit CT > 10), holes filled per slice.

**Robustness** (aim 3): the same CT made another way — re-windowed / exported as an 8-bit brain window,
with the noise of thinner slices (white and correlated), reconstructed smoother (Gaussian blur) — and the
mean absolute difference between the two synthetic MRIs inside the head (0..255 scale), also as a share
of the original's mean in the head. And one pair made by the scanner itself: the HU study's 2.5-mm series
against its 5-mm series (same scan, same frame of reference, thinner slices: more noise, less partial
volume), the 2.5-mm output interpolated at the 5-mm slices' positions and compared inside both heads (its own
table, so that the shipping rule's "largest change", condition (e), still reads the variants above only).

**Reference row** (``--lookup``): the CT→MRI grey-level lookup table fit on the Harvard T2 patients (the
cross-validation's baseline: mean MRI per CT grey level, ``training/report.py``), applied to each CT as
normalised for the model, twice: on the CT's own grid, and on the model's 256×256 axial grid and back (the
path the network's input and output take, ``pipeline.synthesize``). The first shows what the training
pairs' CT→T2 relation gives on these CTs when each voxel is judged by its CT grey level alone; the second
what is left of it at the method's in-plane resolution (a 0.49 mm, 512² CT is seen at ~1 mm).

    python experiments/external_ct.py [--weights FILE] [--data ../shared/data] [--no-robustness] [--lookup | --lookup-only]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "CTtoMRISynthesis"))

from CTtoMRISynthesisLib.contrast import intracranial, ratio, tissue_masks  # noqa: E402
from CTtoMRISynthesisLib.grain import short as grain_short  # noqa: E402
from CTtoMRISynthesisLib.intensity import head_mask  # noqa: E402
from CTtoMRISynthesisLib.pipeline import synthesize  # noqa: E402
from CTtoMRISynthesisLib.weights import load_model  # noqa: E402

HU_CSF, HU_BRAIN = (0.0, 15.0), (25.0, 45.0)
EROSION_MM = 3.0


def masks_hu(hu: np.ndarray, spacing_xy: float) -> dict:
    head = head_mask(hu, -300.0)
    brain_box = intracranial(hu > 300.0, head, int(round(EROSION_MM / spacing_xy)))
    return {"head": head, "csf": brain_box & (hu >= HU_CSF[0]) & (hu <= HU_CSF[1]),
            "brain": brain_box & (hu >= HU_BRAIN[0]) & (hu <= HU_BRAIN[1])}


def masks_8bit(ct: np.ndarray) -> dict:
    """The Otsu masks, and the strict ones of ``contrast.tissue_masks`` (the product's reference check)."""
    from skimage.filters import threshold_otsu

    strict = tissue_masks(ct)
    head, brain_box = strict["head"], strict["intracranial"]
    smooth = ndimage.gaussian_filter(ct.astype(np.float32), sigma=(0, 2, 2))
    values = smooth[brain_box]
    cut = threshold_otsu(values) if values.size else 0.0
    return {"head": head, "csf": brain_box & (smooth < cut), "brain": brain_box & (smooth >= cut), "otsu": cut,
            "csf_strict": strict["csf"], "brain_strict": strict["brain"]}


def contrast(syn: np.ndarray, masks: dict) -> dict:
    total = float(syn.sum())
    csf, brain = masks["csf"], masks["brain"]
    strict = ratio(syn, masks["csf_strict"], masks["brain_strict"]) if "csf_strict" in masks else float("nan")
    return {"csf_voxels": int(csf.sum()), "brain_voxels": int(brain.sum()), "csf_over_brain": ratio(syn, csf, brain),
            "csf_over_brain_strict": strict, "outside_share": float(syn[~masks["head"]].sum() / total) if total > 0 else 0.0}


def robustness(model, image: sitk.Image, head: np.ndarray, variants: dict, base: np.ndarray,
               grains: Optional[dict] = None) -> dict:
    """{variant: (MAE in head vs the original's synthetic MRI, as a share of its mean in the head)}; ``grains``,
    if given, gets {variant: the grain note of :func:`_syn`}."""
    out = {}
    ref = base[head]
    for name, make in variants.items():
        note: dict = {}
        syn = _syn(model, make(image), note)
        if grains is not None and note:
            grains[name] = note
        diff = float(np.abs(syn[head] - ref).mean())
        out[name] = (diff, diff / max(float(ref.mean()), 1e-6))
    return out


def series_pair(syntheses: list) -> Optional[tuple]:
    """(MAE in head between the syntheses of the HU study's thinnest and thickest axial series, the thick one's
    mean there, their slice thicknesses), the thin output interpolated onto the thick one's grid; None
    without two series. ``syntheses``: [(CT image, its synthetic MRI array on the CT's grid)] of the series."""
    if len(syntheses) < 2:
        return None
    (thin, thin_syn), (thick, thick_syn) = (min(syntheses, key=lambda t: t[0].GetSpacing()[2]),
                                            max(syntheses, key=lambda t: t[0].GetSpacing()[2]))
    on_thick = sitk.Resample(_with_array(thin, thin_syn), thick, sitk.Transform(), sitk.sitkLinear, 0.0)
    a, b = thick_syn, sitk.GetArrayFromImage(on_thick).astype(np.float32)
    head = (a > 0) & (b > 0)
    return float(np.abs(a - b)[head].mean()), float(a[head].mean()), thin.GetSpacing()[2], thick.GetSpacing()[2]


def _syn(model, image: sitk.Image, grain: Optional[dict] = None) -> np.ndarray:
    """The synthetic MRI of ``image``; ``grain``, if given, receives what the pipeline measured and did about the
    CT's noise grain (grain.py; nothing for a model without grain matching)."""
    result = synthesize(image, None, model=model, device="cpu")
    if grain is not None:
        grain.update({k: v for k, v in result.normalisation.items() if k.startswith("ct_grain")})
    return sitk.GetArrayFromImage(result.synthetic_mri).astype(np.float32)


def _with_array(image: sitk.Image, array: np.ndarray) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def hu_variants(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def noisy(image, correlated=False):
        a = sitk.GetArrayFromImage(image).astype(np.float32)
        noise = rng.standard_normal(a.shape).astype(np.float32)
        if correlated:
            noise = ndimage.gaussian_filter(noise, sigma=(0, 1.5, 1.5))
            noise /= noise.std()
        return _with_array(image, a + 12.0 * noise * (a > -500))  # ~12 HU: a thin-slice brain CT's noise

    def smooth(image):
        sigma = 0.75 / image.GetSpacing()[0]  # 0.75 mm in-plane: a softer reconstruction kernel
        return _with_array(image, ndimage.gaussian_filter(sitk.GetArrayFromImage(image).astype(np.float32), (0, sigma, sigma)))

    def exported(image, level=40.0, width=80.0):
        a = sitk.GetArrayFromImage(image).astype(np.float32)  # an 8-bit export in a brain window W80/L40
        return _with_array(image, np.clip((a - (level - width / 2)) / width * 255.0, 0, 255).astype(np.uint8))

    return {"white noise 12 HU": noisy, "correlated noise 12 HU": lambda im: noisy(im, True),
            "smoother kernel (0.75 mm blur)": smooth, "8-bit export W80/L40": exported}


def _as_8bit(array: np.ndarray) -> np.ndarray:
    return np.clip(np.round(array), 0, 255).astype(np.uint8)


def bit8_variants(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def rewindow(image, gain=1.15, shift=-10.0):
        a = sitk.GetArrayFromImage(image).astype(np.float32)
        return _with_array(image, _as_8bit(np.where(a > 0, a * gain + shift, 0)))

    def noisy(image):
        a = sitk.GetArrayFromImage(image).astype(np.float32)
        return _with_array(image, _as_8bit(np.where(a > 0, a + 6.0 * rng.standard_normal(a.shape), 0)))

    def smooth(image):
        return _with_array(image, _as_8bit(ndimage.gaussian_filter(sitk.GetArrayFromImage(image).astype(np.float32), (0, 1.0, 1.0))))

    # an 8-bit CT stays 8-bit (as another export of it would be): a float array would be read as Hounsfield units
    return {"re-windowed (x1.15 − 10)": rewindow, "noise SD 6": noisy, "blur 1 px": smooth}


def dicom_axial_series(folder: Path) -> list:
    """[(series number, description, image)] of the ORIGINAL/PRIMARY axial series of a DICOM folder."""
    reader = sitk.ImageSeriesReader()
    found = []
    for uid in reader.GetGDCMSeriesIDs(str(folder)):
        files = reader.GetGDCMSeriesFileNames(str(folder), uid)
        info = sitk.ImageFileReader()
        info.SetFileName(files[0])
        info.ReadImageInformation()
        tag = lambda k: info.GetMetaData(k).strip() if info.HasMetaDataKey(k) else ""  # noqa: E731
        kind = tag("0008|0008").upper()
        if "ORIGINAL" in kind and "PRIMARY" in kind and "LOCALIZER" not in kind and len(files) > 3:
            reader.SetFileNames(files)
            found.append((tag("0020|0011"), tag("0008|103e"), reader.Execute()))
    return sorted(found, key=lambda t: int(t[0] or 0))


def clinical_cases(folder: Path) -> list:
    """[(patient, image)]: each patient's CT slices stacked in the order of the numbers in their names, 8-bit,
    spacing 1, by the trainer's reader of unpaired CT folders (grey stored as RGB(A) read as its grey, as
    inference reads it; a slice whose channels differ is refused)."""
    from CTtoMRISynthesisLib.training.unpaired import read_unpaired_ct

    return [(patient.name, read_unpaired_ct(patient)) for patient in sorted(p for p in folder.iterdir() if p.is_dir())]


def external_cts(data: Path):
    """(name, image, masks from the CT, robustness variants) of every external CT, HU series first."""
    for number, description, image in dicom_axial_series(data / "real_hu_head_ct_dicom" / "DICOM"):
        masks = masks_hu(sitk.GetArrayFromImage(image).astype(np.float32), image.GetSpacing()[0])
        detail = f"{description + ', ' if description else ''}{image.GetSpacing()[2]:g} mm slices"
        yield f"real HU CT, series {number} ({detail})", image, masks, hu_variants()
    for patient, image in clinical_cases(data / "clinical_ct_t1_flair_2d" / "CT"):
        yield f"clinical CT {patient} (8-bit)", image, masks_8bit(sitk.GetArrayFromImage(image)), bit8_variants()


def lookup_rows(data: Path, not_t2: list, size: int = 256) -> None:
    """The reference row: the lookup table of the Harvard T2 patients on every external CT."""
    from CTtoMRISynthesisLib.intensity import CTWindow, normalise_ct
    from CTtoMRISynthesisLib.training import discovery
    from CTtoMRISynthesisLib.training.report import fit_lookup_table, predict_lookup_table

    window = CTWindow(45.0, 120.0)  # the shipped model's --ct-window
    cases = [c for c in discovery.discover([data / "harvard_aanlib_ct_mri_2d"], window) if c.case_id not in not_t2]
    table = fit_lookup_table(cases)
    print(f"\nlookup table fit on Harvard patients {', '.join(c.case_id for c in cases)} (reference, not a method)")
    print("\n| CT | CSF / brain, CT's grid | strict masks (8-bit) | CSF / brain, model grid | strict masks (8-bit) |")
    print("|---|---|---|---|---|")
    for name, image, masks, _ in external_cts(data):
        ct255, _ = normalise_ct(sitk.GetArrayFromImage(image), window)
        cells = []
        for lookup in (predict_lookup_table(table, ct255), _lookup_on_model_grid(table, image, window, size)):
            c = contrast(lookup * masks["head"], masks)
            strict = "–" if np.isnan(c["csf_over_brain_strict"]) else f"{c['csf_over_brain_strict']:.2f}"
            cells += [f"{c['csf_over_brain']:.2f}", strict]
        print(f"| {name} | {' | '.join(cells)} |")


def _lookup_on_model_grid(table: np.ndarray, image: sitk.Image, window, size: int) -> np.ndarray:
    """The lookup table applied where the network works: the CT put on the model grid as inference does
    (``training.unpaired.on_model_grid``), looked up, resampled back onto the CT's grid (linear, as
    ``pipeline.synthesize``)."""
    from CTtoMRISynthesisLib import geometry
    from CTtoMRISynthesisLib.training.report import predict_lookup_table
    from CTtoMRISynthesisLib.training.unpaired import on_model_grid

    grid = geometry.model_grid(image, size)
    looked_up = predict_lookup_table(table, on_model_grid(image, window, size))
    back = geometry.resample(geometry.array_on_grid(looked_up, grid), image, None, default_value=0.0)
    return sitk.GetArrayFromImage(back).astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="model file (default: the shipped model)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--no-robustness", action="store_true")
    parser.add_argument("--lookup", action="store_true", help="also the Harvard T2 patients' lookup table (reference rows)")
    parser.add_argument("--lookup-only", action="store_true", help="only the lookup table's reference rows (no model)")
    parser.add_argument("--not-t2", nargs="*", default=["2"], metavar="ID",
                        help="Harvard patients left out of the lookup table (default 2: FLAIR/PD-like MRI)")
    args = parser.parse_args()
    data = Path(args.data)
    if args.lookup_only:
        lookup_rows(data, args.not_t2)
        return 0
    model = load_model(args.weights)
    print(f"model: {model.path}")
    print("\n| CT | CSF voxels | brain voxels | CSF / brain (aim ≥ 1.6) | CSF / brain, strict masks (8-bit) | "
          "signal outside the head (aim ≤ 0.5 %) |")
    print("|---|---|---|---|---|---|")
    rows, robust, grains, hu_syntheses = [], [], [], []
    for name, image, masks, variants in external_cts(data):
        note: dict = {}
        syn = _syn(model, image, note)
        if note:
            grains.append((name, "as given", note))
        if name.startswith("real HU CT"):
            hu_syntheses.append((image, syn))
        c = contrast(syn, masks)
        rows.append((name, c))
        strict = "–" if np.isnan(c["csf_over_brain_strict"]) else f"{c['csf_over_brain_strict']:.2f}"
        print(f"| {name} | {c['csf_voxels']} | {c['brain_voxels']} | {c['csf_over_brain']:.2f} | {strict} | "
              f"{100 * c['outside_share']:.2f} % |")
        if not args.no_robustness:
            variant_grains: dict = {}
            robust.append((name, robustness(model, image, masks["head"], variants, syn, variant_grains)))
            grains += [(name, variant, note) for variant, note in variant_grains.items()]
    ratios = [c["csf_over_brain"] for _, c in rows if np.isfinite(c["csf_over_brain"])]
    print(f"\nCSF / brain: min {min(ratios):.2f}, median {np.median(ratios):.2f}; on ≥ 1.6: {sum(r >= 1.6 for r in ratios)} of "
          f"{len(ratios)}; outside the head: max {100 * max(c['outside_share'] for _, c in rows):.2f} %")
    if robust:
        print("\n| CT | variant | MAE in head vs original output | share of its mean |")
        print("|---|---|---|---|")
        for name, res in robust:
            for variant, (mae, share) in res.items():
                print(f"| {name} | {variant} | {mae:.2f} | {100 * share:.1f} % |")
    pair = None if args.no_robustness else series_pair(hu_syntheses)
    if pair is not None:
        mae, mean, thin, thick = pair
        print("\n| same scan, two reconstructions | MAE in head between the two outputs | share of its mean |")
        print("|---|---|---|")
        print(f"| real HU CT, {thin:g} mm slices against {thick:g} mm | {mae:.2f} | {100 * mae / max(mean, 1e-6):.1f} % |")
    if grains:  # a model with grain matching (grain.py): what each CT measured and what was done to it
        print("\n| CT | variant | noise grain | target | done to the CT |")
        print("|---|---|---|---|---|")
        for name, variant, note in grains:
            measured = "–" if note["ct_grain"] is None else f"{note['ct_grain']:.2f}"
            print(f"| {name} | {variant} | {measured} | {note['ct_grain_target']:.2f} | {grain_short(note)} |")
    if args.lookup:
        lookup_rows(data, args.not_t2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
