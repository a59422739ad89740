"""The paper's Table 1 for our model: per-patient MAE, SSIM, PSNR, with baselines, as Markdown + CSV,
plus a PNG montage per patient (CT | real MRI | synthetic MRI | difference).

Two ways in:
- :func:`write_cv_report` after ``train --cv``: each patient's numbers come from the fold in which it was
  held out (its prediction is saved by :func:`evaluate_fold` as ``foldNN/pred_<id>.npz``).
- :func:`report_model` (``ctmri report --data DIR --weights FILE --out DIR``): one model on every
  patient of ``DIR``; patients the model was trained on are marked as such in every table.

Every metric comes from :mod:`metrics` (foreground MAE, the paper's SSIM, PSNR, bone/soft-tissue MAE).
Baselines, computed the same way on the same patients and fit on the same training patients as the
model they sit beside:
- **lookup table**: for each CT value 0..255 the mean MRI value over the training patients' head
  voxels (CT head mask), values never seen interpolated; 0 outside the head mask;
- **constant**: the training patients' mean MRI intensity inside the head, 0 outside.

Reference rows (not methods: each one *sees the held-out patient's real MRI*) bound what the metrics can
reward on this data, so that a target can be judged against what is reachable at all:
- **real MRI, shifted 1 px**: the true image, misregistered by one pixel (left-right);
- **real MRI, blurred σ 1 px**: the true image under a Gaussian blur of sigma one pixel, inside the CT
  head mask (a synthesis right in everything but the finest detail);
- **lookup table fit on the patient itself**: the best pointwise CT→MRI grey-level mapping for that
  patient (knows its MRI scale).
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import CTMRIError
from ..intensity import grow_in_plane, head_mask

PAPER = {
    "method": "Dong et al. 2020 (paper, Table 1)",
    "mae": {"mean": 73.68, "sd": 10.99, "min": 47.81, "max": 122.08},
    "ssim": {"mean": 0.91, "sd": None, "min": 0.74, "max": 0.95},
}
BASELINES = ("lookup_table", "constant")
REFERENCES = ("ref_shift1", "ref_blur1", "ref_own_lookup")
METHODS = ("model",) + BASELINES + REFERENCES
METHOD_NAMES = {
    "model": "U-Net (ours)",
    "lookup_table": "baseline: CT→MRI grey-level lookup table",
    "constant": "baseline: constant (mean head intensity)",
    "ref_shift1": "reference (sees the real MRI): real MRI shifted 1 px",
    "ref_blur1": "reference (sees the real MRI): real MRI blurred, Gaussian σ 1 px",
    "ref_own_lookup": "reference (sees the real MRI): lookup table fit on the patient itself",
}
METRIC_KEYS = ("mae", "ssim", "psnr", "ssim_foreground", "mae_whole", "mae_bone", "mae_soft_tissue")
METRIC_NAMES = {
    "mae": "MAE (foreground)",
    "ssim": "SSIM",
    "psnr": "PSNR (dB)",
    "ssim_foreground": "SSIM in head",
    "mae_whole": "MAE (whole slice)",
    "mae_bone": "MAE bone",
    "mae_soft_tissue": "MAE soft tissue",
}
UNCERTAINTY_KEYS = ("unc_spearman", "unc_err_top10", "unc_err_rest", "unc_mean")
# Issue 11's aims, set against the reference rows (the old SSIM > 0.91 aim was shown unreachable here)
AIM_MAE_RATIO = 0.85  # mean foreground MAE ≤ this × the lookup table's
AIM_MAE_BEATS = 7  # ... and below the lookup table's on at least this many of 8 patients
AIM_SSIM_FOREGROUND = 0.30
AIM_SSIM_OVER_LOOKUP = 0.03
AIM_UNC_SPEARMAN_MEAN, AIM_UNC_SPEARMAN_MIN = 0.3, 0.2


# ------------------------------------------------------------------------------------------ baselines
def fit_lookup_table(cases, threshold: float = 10.0, sigma: float = 0.0, grow_px: int = 0) -> np.ndarray:
    """Mean MRI per CT grey value (0..255) over the head voxels of ``cases``; unseen values interpolated.

    With ``sigma`` > 0 the CT is first blurred in-plane as the lookup-residual model does
    (:func:`model.gaussian_blur`); the baseline rows use the plain CT. ``grow_px``: the head mask grown
    in-plane by that many pixels (:func:`intensity.grow_in_plane`), to compare with a model whose output
    mask is grown the same way.
    """
    sums = np.zeros(256)
    counts = np.zeros(256)
    for case in cases:
        mask = _head(case.ct, threshold, grow_px)
        ct = _blurred(case.ct, sigma) if sigma > 0 else case.ct
        idx = np.clip(np.rint(ct[mask]), 0, 255).astype(np.int64)
        sums += np.bincount(idx, weights=case.mri[mask].astype(np.float64), minlength=256)
        counts += np.bincount(idx, minlength=256)
    seen = counts > 0
    if not seen.any():
        raise ValueError("no head voxels to fit the lookup table on")
    values = np.arange(256)
    return np.interp(values, values[seen], sums[seen] / counts[seen])


def _blurred(ct: np.ndarray, sigma: float) -> np.ndarray:
    import torch

    from ..model import gaussian_blur

    with torch.inference_mode():
        blurred = gaussian_blur(torch.from_numpy(np.ascontiguousarray(ct, dtype=np.float32))[:, None] / 255.0, sigma)
    return blurred[:, 0].numpy() * 255.0


def _head(ct: np.ndarray, threshold: float, grow_px: int) -> np.ndarray:
    """The baselines' mask: the CT head mask, grown in-plane by ``grow_px`` pixels."""
    mask = head_mask(ct, threshold)
    return grow_in_plane(mask, grow_px) if grow_px else mask


def predict_lookup_table(table: np.ndarray, ct: np.ndarray, threshold: float = 10.0, grow_px: int = 0) -> np.ndarray:
    out = table[np.clip(np.rint(ct), 0, 255).astype(np.int64)].astype(np.float32)
    out[~_head(ct, threshold, grow_px)] = 0.0
    return out


def fit_constant(cases, threshold: float = 10.0) -> float:
    total, n = 0.0, 0
    for case in cases:
        mask = head_mask(case.ct, threshold)
        total += float(case.mri[mask].sum())
        n += int(mask.sum())
    return total / max(1, n)


def predict_constant(value: float, ct: np.ndarray, threshold: float = 10.0) -> np.ndarray:
    return np.where(head_mask(ct, threshold), np.float32(value), np.float32(0.0)).astype(np.float32)


# ------------------------------------------------------------------------------------------ evaluation
def evaluate(ref: np.ndarray, syn: np.ndarray, ct: np.ndarray, bone_threshold: float) -> dict:
    """Whole-volume metrics of one patient (per-slice entries dropped) plus bone / soft-tissue MAE."""
    from ..metrics import bone_soft_tissue_mae, compute_metrics

    m = compute_metrics(ref, syn)
    m.pop("per_slice", None)
    m.update(bone_soft_tissue_mae(ref, syn, ct, bone_threshold))
    return m


def predict_case(loaded, case, device: str = "cpu", info: Optional[dict] = None):
    """The model's :class:`synthesis.Prediction` (synthetic MRI and its spread) of one patient, as at inference;
    ``info`` receives what :func:`synthesis.predict_volume` reports."""
    from ..error_model import apply
    from ..synthesis import predict_volume, preprocessing_options

    prediction = predict_volume(loaded.net, case.ct, **preprocessing_options(loaded.config["preprocessing"]), device=device,
                                info=info)
    return apply(getattr(loaded, "error_model", None), prediction, case.ct)


def uncertainty_quality(ref: np.ndarray, syn: np.ndarray, spread: np.ndarray, head: np.ndarray) -> dict:
    """Does the uncertainty say something true? Over head voxels: Spearman correlation between the spread
    and the absolute error, and the mean absolute error in the most uncertain 10 % of voxels vs the rest."""
    from scipy.stats import spearmanr

    err = np.abs(ref.astype(np.float32) - syn.astype(np.float32))[head]
    unc = spread.astype(np.float32)[head]
    if err.size < 10 or float(unc.max()) == float(unc.min()):
        return {"unc_spearman": None, "unc_err_top10": None, "unc_err_rest": None, "unc_mean": float(unc.mean()) if unc.size else None}
    rho = spearmanr(unc, err).statistic
    top, rest = _top_tenth_errors(unc, err)
    return {"unc_spearman": float(rho), "unc_err_top10": top, "unc_err_rest": rest, "unc_mean": float(unc.mean())}


def _top_tenth_errors(unc: np.ndarray, err: np.ndarray) -> tuple[float, float]:
    """Mean error in the most uncertain tenth of the voxels and in the rest. Voxels tied at the cut share the
    places left in the tenth (their mean error fills them): exactly a tenth, whatever the ties, and no voxel
    picked by its position (a map of few levels would otherwise give a "top 10 %" of 3 %, or of any order)."""
    n = max(1, int(round(unc.size / 10)))
    order = np.sort(unc)
    cut = order[-n]  # the value of the n-th largest
    above, tied = unc > cut, unc == cut
    places = n - int(above.sum())  # 1 .. tied.sum()
    top_sum = float(err[above].sum()) + places * float(err[tied].mean())
    rest_n = unc.size - n
    rest = (float(err.sum()) - top_sum) / rest_n if rest_n else float("nan")
    return top_sum / n, rest


def fold_model(fold_dir) -> Path:
    """A fold's model file: ``model.safetensors``; an old run's ``model.pt`` when only that exists (loading
    it then says how to convert it)."""
    from .loop import MODEL_FILE

    fold_dir = Path(fold_dir)
    legacy = fold_dir / "model.pt"
    return legacy if legacy.exists() and not (fold_dir / MODEL_FILE).exists() else fold_dir / MODEL_FILE


def evaluate_fold(fold_dir, cases, bone_threshold: float = 200.0, device: str = "cpu") -> dict:
    """Predict a finished fold's held-out patients with its model; save predictions and ``fold.json``."""
    from ..metrics import to_jsonable
    from ..weights import load_model

    fold_dir = Path(fold_dir)
    loaded = load_model(fold_model(fold_dir), device=device)
    by_id = {c.case_id: c for c in cases}
    out = {"split": loaded.config["split"], "cases": {}}
    for cid in loaded.config["split"]["test_cases"]:
        case = by_id[cid]
        pred = predict_case(loaded, case, device)
        np.savez_compressed(fold_dir / f"pred_{cid}.npz", syn=pred.mean.astype(np.float32),
                            spread=pred.spread.astype(np.float32))
        out["cases"][cid] = evaluate(case.mri, pred.mean, case.ct, bone_threshold)
    (fold_dir / "fold.json").write_text(json.dumps(to_jsonable(out), indent=1))
    return out


def reference_predictions(case) -> dict:
    """The reference rows' images for one patient (see the module docstring); each uses the real MRI."""
    from scipy import ndimage

    mask = head_mask(case.ct)
    blurred = ndimage.gaussian_filter(case.mri.astype(np.float32), sigma=(0, 1, 1))
    return {
        "ref_shift1": np.roll(case.mri, -1, axis=2),
        "ref_blur1": np.where(mask, blurred, np.float32(0.0)),
        "ref_own_lookup": predict_lookup_table(fit_lookup_table([case]), case.ct),
    }


def _baseline_rows(case, train_cases, bone_threshold: float) -> dict:
    """Baseline rows (fit on ``train_cases``) and reference rows (from the patient's own MRI)."""
    table = fit_lookup_table(train_cases)
    const = fit_constant(train_cases)
    rows = {
        "lookup_table": evaluate(case.mri, predict_lookup_table(table, case.ct), case.ct, bone_threshold),
        "constant": evaluate(case.mri, predict_constant(const, case.ct), case.ct, bone_threshold),
    }
    for name, syn in reference_predictions(case).items():
        rows[name] = evaluate(case.mri, syn, case.ct, bone_threshold)
    return rows


# --------------------------------------------------------------------------------------------- output
def montage(ct: np.ndarray, mri: np.ndarray, syn: np.ndarray, n: int = 4) -> np.ndarray:
    """uint8 image: one row per chosen slice, columns CT | MRI | synthetic MRI | difference (MRI − sMRI).

    The difference column is mid-grey (128) for 0, brighter where the synthetic MRI is too dark and
    darker where it is too bright, at half scale (±255 → ±127).
    """
    has_fg = np.flatnonzero((mri > 0).any(axis=(1, 2)))
    if has_fg.size == 0:
        has_fg = np.arange(ct.shape[0])
    picks = has_fg[np.unique(np.linspace(0, has_fg.size - 1, min(n, has_fg.size)).round().astype(int))]
    gap = 3
    rows = []
    for k in picks:
        diff = np.clip(128.0 + (mri[k].astype(np.float32) - syn[k]) / 2.0, 0, 255)
        tiles = [np.clip(ct[k], 0, 255), np.clip(mri[k], 0, 255), np.clip(syn[k], 0, 255), diff]
        spacer = np.full((ct.shape[1], gap), 255.0)
        row = np.concatenate(sum(([t, spacer] for t in tiles), [])[:-1], axis=1)
        rows.append(row)
        rows.append(np.full((gap, row.shape[1]), 255.0))
    return np.concatenate(rows[:-1], axis=0).astype(np.uint8)


def save_png(path: Path, image: np.ndarray) -> None:
    from skimage.io import imsave

    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(str(path), image, check_contrast=False)


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _digits(key: str) -> int:
    return 3 if key.startswith("ssim") else 2


def summarise_rows(rows: list[dict]) -> dict:
    """{method: {metric: summarize(...)}} over patients."""
    from ..metrics import summarize

    out: dict = {}
    for method in METHODS:
        mrows = [r for r in rows if r["method"] == method]
        if not mrows:
            continue
        out[method] = {}
        for key in METRIC_KEYS:
            values = [r[key] for r in mrows if r.get(key) is not None and math.isfinite(r[key])]
            out[method][key] = summarize(values) if values else None
    return out


#: the files a report writes into its folder (besides ``montage_<case>.png``); a folder holding one of them that no
#: report wrote is refused by :func:`check_report_folder`, so that a project folder's own report.md is never replaced
REPORT_FILES = ("report.md", "summary.csv", "summary.json", "per_patient.csv")
REPORT_MARKER = ".ctmri-report"
#: the first lines of the report.md files this module writes (a folder of a version before the marker)
REPORT_TITLES = ("# Cross-validated results (Table 1 of Dong et al. 2020", "# Report: one model on paired data")


def check_report_folder(out_dir: Path) -> None:
    """Refuse, writing nothing, an ``--out`` holding report files that no ``ctmri report`` wrote."""
    if (out_dir / REPORT_MARKER).is_file():
        return
    theirs = [name for name in REPORT_FILES if (out_dir / name).exists() or (out_dir / name).is_symlink()]
    if theirs and not _our_report_md(out_dir / "report.md"):
        raise CTMRIError(f"{out_dir} already holds {', '.join(theirs)}, not written by ctmri report, which the report "
                         "would replace: choose another --out, or move them away")


def _our_report_md(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().startswith(REPORT_TITLES)
    except (OSError, UnicodeDecodeError):
        return False


def write_tables(rows: list[dict], out_dir: Path, title: str, preamble: list[str], montages: dict) -> list[Path]:
    """per_patient.csv, summary.csv and report.md from per-(patient, method) metric rows."""
    from ..metrics import to_jsonable

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_MARKER).write_text("Written by ctmri report; the next report into this folder replaces its files.\n")
    per_patient = _write_per_patient_csv(rows, out_dir / "per_patient.csv")
    summary = summarise_rows(rows)
    summary_csv = _write_summary_csv(summary, out_dir / "summary.csv")
    patients = list(dict.fromkeys(r["patient"] for r in rows))  # in the rows' order
    get = {(r["patient"], r["method"]): r for r in rows}
    md = [f"# {title}", ""] + preamble + [""]
    md += _summary_table(summary)
    md += _per_patient_table(patients, get)
    md += [""] + _aims_lines(summary, patients, get) + [""]
    md += _uncertainty_lines(patients, get)
    md += _observations(summary)
    md += _montage_lines(montages)
    md.append("")
    report_md = out_dir / "report.md"
    report_md.write_text("\n".join(md))
    (out_dir / "summary.json").write_text(json.dumps(to_jsonable({"summary": summary, "rows": rows}), indent=1))
    return [report_md, per_patient, summary_csv]


def _write_per_patient_csv(rows: list[dict], path: Path) -> Path:
    """One line per (patient, method): every metric, 6 significant digits, empty where not measured."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient", "slices", "held_out", "method"] + list(METRIC_KEYS) + list(UNCERTAINTY_KEYS))
        for r in rows:
            w.writerow([r["patient"], r["slices"], r["held_out"], r["method"]] + [
                "" if r.get(k) is None else f"{r[k]:.6g}" for k in METRIC_KEYS + UNCERTAINTY_KEYS])
    return path


def _write_summary_csv(summary: dict, path: Path) -> Path:
    """Mean, SD, min, max and n per method and metric, the paper's own rows first."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "metric", "mean", "sd", "min", "max", "n"])
        for metric in ("mae", "ssim"):
            p = PAPER[metric]
            w.writerow([PAPER["method"], metric, p["mean"], "" if p["sd"] is None else p["sd"], p["min"], p["max"], 19])
        for method, stats in summary.items():
            for key, s in stats.items():
                if s:
                    w.writerow([METHOD_NAMES[method], key, f"{s['mean']:.6g}", f"{s['sd']:.6g}", f"{s['min']:.6g}",
                                f"{s['max']:.6g}", s["n"]])
    return path


def _summary_table(summary: dict) -> list[str]:
    """The report's first table: the paper's row, then each method's mean (SD) [min – max] per metric."""
    md = ["## Summary over patients: mean (SD) [min – max]", ""]
    md += ["| method | " + " | ".join(METRIC_NAMES[k] for k in METRIC_KEYS) + " |",
           "|---|" + "---|" * len(METRIC_KEYS)]
    paper_cells = []
    for k in METRIC_KEYS:
        p = PAPER.get(k)
        if p:
            sd = f" ({p['sd']:.2f})" if p["sd"] is not None else ""
            paper_cells.append(f"{p['mean']:.{_digits(k)}f}{sd} [{p['min']:.{_digits(k)}f} – {p['max']:.{_digits(k)}f}]")
        else:
            paper_cells.append("–")
    md.append(f"| {PAPER['method']} (19 patients, T1, its own data) | " + " | ".join(paper_cells) + " |")
    for method, stats in summary.items():
        cells = []
        for k in METRIC_KEYS:
            s = stats.get(k)
            d = _digits(k)
            cells.append("–" if not s else f"{s['mean']:.{d}f} ({s['sd']:.{d}f}) [{s['min']:.{d}f} – {s['max']:.{d}f}]")
        name = f"**{METHOD_NAMES[method]}**" if method == "model" else METHOD_NAMES[method]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    return md + _closed_row(summary)


def _per_patient_table(patients: list, get: dict) -> list[str]:
    """The model against the baselines and the shifted real MRI, patient by patient."""
    md = ["", "## Per patient", ""]
    md += ["| patient | slices | held out | MAE model | MAE lookup | MAE constant | model/lookup MAE | SSIM model | "
           "SSIM lookup | SSIM constant | SSIM real MRI shifted 1 px | PSNR model | SSIM in head model | "
           "SSIM in head lookup | MAE bone / soft model |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in patients:
        m, lut, con = get.get((p, "model")), get.get((p, "lookup_table")), get.get((p, "constant"))
        shift = get.get((p, "ref_shift1"))
        if m is None:
            continue
        ratio = m["mae"] / lut["mae"] if lut else None
        md.append(
            f"| {p} | {m['slices']} | {'yes' if m['held_out'] else '**no (trained on)**'} | {_fmt(m['mae'])} | "
            f"{_fmt(lut and lut['mae'])} | {_fmt(con and con['mae'])} | {_fmt(ratio)} | {_fmt(m['ssim'], 3)} | "
            f"{_fmt(lut and lut['ssim'], 3)} | {_fmt(con and con['ssim'], 3)} | {_fmt(shift and shift['ssim'], 3)} | "
            f"{_fmt(m['psnr'])} | {_fmt(m['ssim_foreground'], 3)} | {_fmt(lut and lut['ssim_foreground'], 3)} | "
            f"{_fmt(m['mae_bone'])} / {_fmt(m['mae_soft_tissue'])} |"
        )
    return md


def _observations(summary: dict) -> list[str]:
    """What the reference rows say about reachability, and the paper's bone / soft-tissue observation."""
    md = []
    reach = summary.get("ref_shift1", {}).get("ssim") if summary.get("ref_shift1") else None
    if reach:
        md += [f"Reachability: the real MRI itself, shifted by one pixel, scores SSIM {reach['mean']:.3f} "
               f"[{reach['min']:.3f} – {reach['max']:.3f}] (the paper's 0.91 is above it on every patient here); "
               "the reference rows above see the real MRI and are not methods.", ""]
    if summary.get("model") and summary["model"].get("mae_bone"):
        b, s = summary["model"]["mae_bone"], summary["model"].get("mae_soft_tissue")
        md += [f"Bone vs soft tissue (the paper's observation; bone = CT above the threshold): model MAE "
               f"{b['mean']:.2f} in bone vs {s['mean']:.2f} in soft tissue (means over patients).", ""]
    return md


def _montage_lines(montages: dict) -> list[str]:
    if not montages:
        return []
    md = ["## Montages", "", "Columns: CT | real MRI | synthetic MRI | difference (MRI − sMRI, mid-grey = 0, "
          "half scale); rows: slices evenly spread over the patient.", ""]
    return md + [f"- patient {p}: ![{p}]({Path(path).name})" for p, path in montages.items()]


def _closed_row(summary: dict) -> list[str]:
    """One table row: per metric, the fraction of the distance from the lookup table to the real MRI shifted
    1 px that the model closes (0 = no better than the table, 1 = as good as the shifted real MRI)."""
    model, lut, ref = summary.get("model"), summary.get("lookup_table"), summary.get("ref_shift1")
    if not (model and lut and ref):
        return []
    cells = []
    for k in METRIC_KEYS:
        a, b, c = model.get(k), lut.get(k), ref.get(k)
        if not (a and b and c) or c["mean"] == b["mean"]:
            cells.append("–")
        else:
            cells.append(f"{(a['mean'] - b['mean']) / (c['mean'] - b['mean']):.2f}")
    return ["| fraction of the distance lookup table → real MRI shifted 1 px closed by the model | " + " | ".join(cells) + " |"]


def _aims_lines(summary: dict, patients: list, get: dict) -> list[str]:
    """Issue 11's aims on these held-out patients, each with its number and met / not met."""
    model, lut = summary.get("model"), summary.get("lookup_table")
    if not (model and lut):
        return []
    ratio = model["mae"]["mean"] / lut["mae"]["mean"]
    beats = sum(1 for p in patients if get.get((p, "model")) and get.get((p, "lookup_table"))
                and get[(p, "model")]["mae"] < get[(p, "lookup_table")]["mae"])
    ssim_fg = model["ssim_foreground"]["mean"] if model.get("ssim_foreground") else float("nan")
    gain = model["ssim"]["mean"] - lut["ssim"]["mean"]
    yes = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731
    return [
        "Aims (issue 11), over the held-out patients:",
        f"- mean foreground MAE / lookup table's = {ratio:.3f} (aim ≤ {AIM_MAE_RATIO}) and lower than the table's on "
        f"{beats} of {len(patients)} patients (aim ≥ {AIM_MAE_BEATS}): {yes(ratio <= AIM_MAE_RATIO and beats >= AIM_MAE_BEATS)}",
        f"- mean SSIM in the head = {ssim_fg:.3f} (aim ≥ {AIM_SSIM_FOREGROUND}): {yes(ssim_fg >= AIM_SSIM_FOREGROUND)}",
        f"- whole-slice SSIM − lookup table's = {gain:+.3f} (aim ≥ +{AIM_SSIM_OVER_LOOKUP}): {yes(gain >= AIM_SSIM_OVER_LOOKUP)}",
    ]


def _uncertainty_lines(patients: list, get: dict) -> list[str]:
    """The uncertainty map's check: Spearman with the absolute error, and the error where it is highest."""
    rows = [(p, get.get((p, "model"))) for p in patients]
    rows = [(p, m) for p, m in rows if m and m.get("unc_mean") is not None]
    if not rows:
        return []
    md = ["## Uncertainty map", "",
          "Over the head voxels of each held-out patient: Spearman correlation between the predicted spread and "
          "|real − synthetic|, and the mean absolute error in the 10 % most uncertain voxels against the rest "
          "('–': the map is constant there and says nothing).", "",
          "| patient | Spearman | MAE most uncertain 10 % | MAE other 90 % | mean spread |", "|---|---|---|---|---|"]
    for p, m in rows:
        md.append(f"| {p} | {_fmt(m['unc_spearman'], 3)} | {_fmt(m['unc_err_top10'])} | {_fmt(m['unc_err_rest'])} | "
                  f"{_fmt(m['unc_mean'])} |")
    rhos = [m["unc_spearman"] for _, m in rows]
    if any(r is None for r in rhos):
        return md + ["", "Spearman aim: **not met** (a constant map on some patient).", ""]
    ok = float(np.mean(rhos)) >= AIM_UNC_SPEARMAN_MEAN and min(rhos) >= AIM_UNC_SPEARMAN_MIN
    md += ["", f"Mean Spearman {np.mean(rhos):.3f} (aim ≥ {AIM_UNC_SPEARMAN_MEAN}), lowest {min(rhos):.3f} (aim ≥ "
           f"{AIM_UNC_SPEARMAN_MIN} on each patient): **{'met' if ok else 'not met'}**.", ""]
    return md


def _rows_for(case, results: dict, held_out: bool) -> list[dict]:
    rows = []
    for method in METHODS:
        m = results[method]
        rows.append({"patient": case.case_id, "slices": case.slices, "held_out": held_out, "method": method,
                     **{k: m.get(k) for k in METRIC_KEYS + UNCERTAINTY_KEYS if k in m or k in METRIC_KEYS}})
    return rows


_FOLD_MODE = re.compile(r"(?P<scheme>.+): fold \d+ of (?P<folds>\d+)$")


def _fold_mode(fold_dir: Path) -> Optional[str]:
    """A finished fold's split mode ("leave-one-patient-out: fold 2 of 8"): from its fold.json, else from its
    model (trained, not yet evaluated); None while the fold is not trained."""
    record = fold_dir / "fold.json"
    if record.is_file():
        return json.loads(record.read_text()).get("split", {}).get("mode")
    return _read_split(fold_dir).get("mode") if fold_model(fold_dir).exists() else None


def check_finished_cv(run_dirs: list) -> None:
    """Refuse cross-validation runs that are unfinished, named twice, or of different schemes, before any work:
    a report or an error model of some folds would read as that of every patient (the summary says
    "cross-validated"), and a leave-one-out run mixed with a k-fold one is not one recipe's ensemble."""
    runs = [Path(r) for r in run_dirs]
    named_twice = sorted({str(r) for r in runs if sum(o.resolve() == r.resolve() for o in runs) > 1})
    if named_twice:
        raise CTMRIError(f"{', '.join(named_twice)} named more than once; name each cross-validation run once")
    schemes = {}
    for run in runs:
        by_fold = {fold.name: _fold_mode(fold) for fold in sorted(run.glob("fold[0-9]*"))}  # each read once
        modes = {m for m in by_fold.values() if m}
        parsed = {(m["scheme"], int(m["folds"])) for m in map(_FOLD_MODE.match, modes) if m}
        if not parsed:
            raise CTMRIError(f"{run} holds no finished fold (foldNN/ with its model or fold.json); train it with "
                             f"`ctmri train --cv loo --out {run}` (add --resume to continue one)")
        if len(parsed) > 1:
            raise CTMRIError(f"{run} holds folds of different cross-validations ({', '.join(sorted(modes))}); "
                             "one folder holds one cross-validation")
        (scheme, folds), = parsed
        missing = [k for k in range(1, folds + 1) if not by_fold.get(f"fold{k:02d}")]
        if missing:
            raise CTMRIError(f"{run} is an unfinished cross-validation: fold(s) {missing} of {folds} are not trained; "
                             f"finish them (`ctmri train … --out {run} --cv … --resume`, the options it was started "
                             "with) before a report or an error model of it")
        schemes[run] = f"{scheme}, {folds} folds"
    if len(set(schemes.values())) > 1:
        raise CTMRIError("the runs are cross-validations of different schemes ("
                         + "; ".join(f"{r}: {s}" for r, s in schemes.items())
                         + "); an ensemble's runs are one recipe's, with the same scheme")


def held_out_folds(run_dirs: list, case_id: str, cases, bone_threshold: float = 200.0) -> list:
    """The fold folder of each CV run folder that holds a patient out (runs that do not are skipped); a fold
    whose prediction is not saved yet is evaluated first, so each returned fold has ``pred_<id>.npz``."""
    folds = []
    for run_dir in run_dirs:
        hits = [f for f in sorted(Path(run_dir).glob("fold*")) if (f / f"pred_{case_id}.npz").exists()
                or (fold_model(f).exists() and case_id in _read_split(f).get("test_cases", []))]
        if not hits:
            continue
        if len(hits) > 1:
            from ..errors import CTMRIError

            raise CTMRIError(f"{run_dir}: patient {case_id} is held out by {len(hits)} folds; one run holds each patient out once")
        if not (hits[0] / f"pred_{case_id}.npz").exists():
            evaluate_fold(hits[0], cases, bone_threshold)
        folds.append(hits[0])
    return folds


def held_out_predictions(run_dirs: list, case_id: str, cases, bone_threshold: float = 200.0) -> tuple:
    """A held-out patient's saved predictions in each CV run folder that holds it out: (synthetic MRIs,
    spreads (None where not saved), fold folders), one per such run; a fold's prediction is made first if
    only its model is there."""
    syns, spreads = [], []
    folds = held_out_folds(run_dirs, case_id, cases, bone_threshold)
    for fold in folds:
        with np.load(fold / f"pred_{case_id}.npz") as blob:
            syns.append(blob["syn"].astype(np.float32))
            spreads.append(blob["spread"].astype(np.float32) if "spread" in blob.files else None)
    return syns, spreads, folds


def _held_out_prediction(run_dirs: list, case_id: str, cases, bone_threshold: float):
    """(synthetic MRI, spread, fold folders) of a held-out patient: its fold's saved prediction, or with several
    runs their ensemble — the mean of the runs' predictions, and their SD as the spread (as :mod:`ensemble`)."""
    syns, spreads, folds = held_out_predictions(run_dirs, case_id, cases, bone_threshold)
    if not syns:
        return None, None, []
    if len(syns) == 1:
        return syns[0], spreads[0], folds
    stack = np.stack(syns)
    return stack.mean(0), stack.std(0), folds


def _read_split(fold_dir: Path) -> dict:
    from ..weights import read_config

    return read_config(fold_model(fold_dir)).get("split", {})


def _never_trained_on(fold_configs: list) -> set:
    """Patients some fold excluded from training (``--exclude-from-training``) and no fold trained on. A fold
    that holds such a patient out records no exclusion of it, so one fold's record alone can miss it."""
    splits = [c.get("split", {}) for c in fold_configs]
    excluded = {cid for s in splits for cid in s.get("excluded_from_training", [])}
    return excluded - {cid for s in splits for cid in s.get("train_cases", [])}


def write_cv_report(run_dir, cases, command: str = "", bone_threshold: float = 200.0,
                    out_dir: Optional[Path] = None, montage_slices: int = 4, config: Optional[dict] = None) -> list[Path]:
    """Report of a finished cross-validation run folder (``foldNN/`` with its model and predictions).

    ``run_dir`` may be a list of such folders over the same patients: the report is then that of their
    ensemble (each held-out patient's prediction averaged over the runs, their SD as the uncertainty), and
    each patient's baselines are fit on all the other patients (leave-one-out) less those the runs
    excluded from training (``--exclude-from-training``). ``config`` (e.g. the
    ensemble file's) describes the model where the runs' fold model files are not at hand.
    """
    from ..errors import CTMRIError

    runs = [Path(r) for r in (run_dir if isinstance(run_dir, (list, tuple)) else [run_dir])]
    out_dir = Path(out_dir) if out_dir else runs[0] / "report"
    rows, montages, fold_lines = [], {}, []
    excluded_seen: set = set()
    samples = _ensemble_samples(runs, cases, config)
    error_maps = _cross_validated_error_maps(samples, config)
    for case in cases:
        held_out = _held_out_case(runs, case, cases, samples, error_maps, bone_threshold)
        if held_out is None:
            continue
        syn, spread, folds, fold_configs = held_out
        config = config or (fold_configs[0] if fold_configs else None)
        train, line, excluded = _baseline_patients(runs, case, cases, folds, fold_configs)
        fold_lines.append(line)
        excluded_seen |= excluded
        results = {"model": evaluate(case.mri, syn, case.ct, bone_threshold)}
        if spread is not None:
            results["model"].update(uncertainty_quality(case.mri, syn, spread, head_mask(case.ct)))
        results.update(_baseline_rows(case, train, bone_threshold))
        rows += _rows_for(case, results, held_out=True)
        montages[case.case_id] = out_dir / f"montage_{case.case_id}.png"
        save_png(montages[case.case_id], montage(case.ct, case.mri, syn, montage_slices))
    if not rows:
        raise CTMRIError(f"{', '.join(map(str, runs))} hold no finished folds")
    if config is None:
        raise CTMRIError("the runs hold predictions but no fold model files: pass the model's config (--attach FILE)")
    order = {c.case_id: i for i, c in enumerate(cases)}
    rows.sort(key=lambda r: (order.get(r["patient"], 0), METHODS.index(r["method"])))
    preamble = _model_preamble(config, command, bone_threshold)
    preamble += ["", _cv_description(runs, config, bool(error_maps), excluded_seen), ""]
    preamble += list(dict.fromkeys(fold_lines))  # k-fold: one line per fold, not per patient
    return write_tables(rows, out_dir, "Cross-validated results (Table 1 of Dong et al. 2020, for this model)",
                        preamble, montages)


def _held_out_case(runs: list, case, cases, samples: dict, error_maps: dict, bone_threshold: float):
    """(synthetic MRI, uncertainty, folds, their model configs) of ``case`` where the runs held it out; None
    when no finished fold did."""
    from ..weights import read_config

    if case.case_id in samples:  # already loaded for the error maps: do not read the predictions twice
        syn, spread = samples[case.case_id].mean, error_maps[case.case_id]
        folds = held_out_folds(runs, case.case_id, cases, bone_threshold)
    else:
        syn, spread, folds = _held_out_prediction(runs, case.case_id, cases, bone_threshold)
    if syn is None:
        return None
    return syn, spread, folds, [read_config(fold_model(f)) for f in folds if fold_model(f).exists()]


def _baseline_patients(runs: list, case, cases, folds: list, fold_configs: list) -> tuple[list, str, set]:
    """The patients ``case``'s baselines are fit on (those its models could learn from), its line for the
    report's list of folds, and the patients the runs never trained on."""
    if len(runs) == 1 and fold_configs:
        by_id = {c.case_id: c for c in cases}
        split, tr = fold_configs[0]["split"], fold_configs[0]["training"]
        line = (f"- {folds[0].name}: held out {', '.join(split['test_cases'])}; "
                f"{tr['epochs']} epochs in {tr['seconds'] / 60:.1f} min")
        return [by_id[c] for c in split["train_cases"] if c in by_id], line, set()
    excluded = _never_trained_on(fold_configs)
    train = [c for c in cases if c.case_id != case.case_id and c.case_id not in excluded]
    line = (f"- patient {case.case_id}: mean of {len(folds)} held-out predictions ("
            + ", ".join(f"{f.parent.name}/{f.name}" for f in folds) + ")")
    return train, line, excluded


def _cv_description(runs: list, config: dict, learned_error_maps: bool, excluded: set) -> str:
    """How the report's numbers were made: one run's folds, or an ensemble of runs."""
    if len(runs) > 1:
        uncertainty = ("the uncertainty the model file's error model refit on the other patients' held-out errors "
                       "(nested leave-one-out, error_model.py)" if learned_error_maps else "the uncertainty their SD")
        what = ("Cross-validation (leave-one-patient-out), ensemble of " + ", ".join(str(r) for r in runs) +
                ": each patient's prediction is the mean of the runs' predictions made by the fold that held it out, "
                f"{uncertainty}; baselines are fit on the other patients"
                + (f" less {', '.join(sorted(excluded))} (excluded from the models' training). " if excluded else ". "))
    else:
        what = (f"Cross-validation ({config['split']['mode'].split(':')[0]}): each patient's numbers come from "
                "the fold in which it was held out; baselines are fit on that fold's training patients. ")
    return what + "Each fold keeps its last epoch (the held-out patient never selects a model)."


def _ensemble_samples(runs: list, cases, config: Optional[dict]) -> dict:
    """{patient: error_model.Sample} of the runs' ensemble when ``config`` (the shipped file's) has an error
    model and the runs are its ensemble's CV; else {} (the report then uses the runs' own spread)."""
    if not (config or {}).get("error_model") or len(runs) < 2:
        return {}
    from ..error_model import cv_samples

    return {s.case_id: s for s in cv_samples(runs, cases)}


def _cross_validated_error_maps(samples: dict, config: Optional[dict]) -> dict:
    """{patient: error map}, each patient's from the recipe in ``config`` fit without that patient; {} when
    there are no samples."""
    if not samples:
        return {}
    from ..error_model import cross_validated_maps

    recipe = config["error_model"]
    # the recipe recorded in the file; what it does not record falls back to fit()'s own defaults
    options = {k: int(recipe[k]) for k in ("hidden", "steps", "seed") if k in recipe}
    return cross_validated_maps(list(samples.values()), names=tuple(recipe["features"]),
                                exclude=tuple(recipe.get("excluded_from_training", ())), **options)


def _lookup_words(model: dict) -> str:
    if not model.get("lookup_residual"):
        return ""
    sigma = float(model.get("lookup_sigma", 0.0))
    blur = f" of the CT blurred by a Gaussian of σ {sigma:g} px" if sigma > 0 else ""
    return f", output = training-patient lookup table{blur} + U-Net residual"


def _model_preamble(config: dict, command: str, bone_threshold: float) -> list[str]:
    m, pre, tr = config["model"], config["preprocessing"], config["training"]
    augmentation = tr["augmentation"] if isinstance(tr["augmentation"], list) else [tr["augmentation"]]
    members = f"ensemble of {m['members']} U-Nets (each: " if m.get("members") else "U-Net, "
    return [
        f"Command: `{command}`" if command else "",
        "",
        f"Model: {members}{m['levels']} levels, base {m['base']} channels, {m['in_channels']} input channel(s) "
        f"(context {pre['context_slices']}), {tr.get('parameters', '?')} parameters"
        f"{_lookup_words(m)}; "
        f"loss {tr['loss']}; "
        f"{tr['epochs']} epochs, batch {tr['batch_size']}, Adam lr {tr['lr']:g} ({tr['lr_schedule']}); "
        f"augmentation {'on' if any(a.get('enabled') for a in augmentation) else 'off'}"
        f"{')' if m.get('members') else ''}; output masked outside the head: {pre['mask_output']}.",
        "",
        "Metrics (metrics.py): MAE over foreground voxels (reference MRI > 0), 0..255 scale; SSIM = mean over "
        "slices of whole-slice SSIM (Wang 2004, Gaussian σ 1.5, data range 255), as the paper; SSIM in head = "
        "SSIM map averaged over foreground voxels only; PSNR over the whole volume; bone = CT (0..255) > "
        f"{bone_threshold:g}. The paper's numbers are for its own 19 patients (T1 MRI), not this data.",
    ]


def report_model(data, weights, out_dir: Path, device: str = "auto", bone_threshold: float = 200.0,
                 case_rule: str = "slice3", cache=None, command: str = "", montage_slices: int = 4) -> list[Path]:
    """One model on every patient in ``data`` (``ctmri report``)."""
    from ..intensity import CTWindow
    from ..synthesis import choose_device
    from ..weights import load_model
    from .discovery import discover

    device = choose_device(device)
    loaded = load_model(weights, device=device)
    config = loaded.config
    pre = config["preprocessing"]
    out_dir = Path(out_dir)
    cases = discover(data, CTWindow(**pre["ct_window"]), int(pre["size"]), cache or out_dir / "cache", case_rule)
    trained_on = set(config.get("split", {}).get("train_cases", []))
    fit_on = [c for c in cases if c.case_id in trained_on]
    rows, montages = [], {}
    for case in cases:
        pred = predict_case(loaded, case, device)
        syn = pred.mean
        held_out = case.case_id not in trained_on
        # Baselines learn from the same patients as the model; without any of them here, from the others.
        train = fit_on or [c for c in cases if c.case_id != case.case_id]
        results = {"model": evaluate(case.mri, syn, case.ct, bone_threshold)}
        results["model"].update(uncertainty_quality(case.mri, syn, pred.spread, head_mask(case.ct)))
        results.update(_baseline_rows(case, train, bone_threshold))
        rows += _rows_for(case, results, held_out)
        path = out_dir / f"montage_{case.case_id}.png"
        save_png(path, montage(case.ct, case.mri, syn, montage_slices))
        montages[case.case_id] = path
    preamble = _model_preamble(config, command, bone_threshold) + [
        "", f"Weights: `{loaded.path}`. Baselines are fit on the patients the model was trained on "
        f"({', '.join(sorted(fit_on_ids)) if (fit_on_ids := [c.case_id for c in fit_on]) else 'none here: leave-one-out over the data'}). "
        "Patients marked 'no (trained on)' were seen in training: their numbers are not a test."]
    return write_tables(rows, out_dir, "Report: one model on paired data", preamble, montages)


def attach_cv_metrics(weights, report_dir, command: str = "") -> dict:
    """Copy a cross-validation report's summary into a weights file's ``config["metrics"]``.

    For the all-patients model, whose recipe the cross-validation measured: the tensors are unchanged,
    the config gains ``metrics.cross_validation`` and the file (and its .sha256) is rewritten.
    """
    from ..weights import read_weights_file, save_state

    blob = read_weights_file(weights, framework="numpy")  # tensors passed through byte for byte
    config = blob["config"]
    data = json.loads((Path(report_dir) / "summary.json").read_text())
    summary = {
        method: {k: v for k, v in stats.items() if k in METRIC_KEYS}
        for method, stats in data["summary"].items()
    }
    per_patient = {
        r["patient"]: {k: r[k] for k in ("mae", "ssim", "psnr", "ssim_foreground")}
        for r in data["rows"] if r["method"] == "model"
    }
    config.setdefault("metrics", {})["cross_validation"] = {
        "what": "held-out patients of a cross-validation of this recipe (each from the fold that held it out)",
        "summary": summary,
        "per_patient": per_patient,
        "command": command,
    }
    save_state(weights, blob["state_dict"], config)
    return config
