"""Apply the shipping rule of the model card (rounds 9 and 9b) to a candidate evaluated by evaluate_ensemble.sh.

    python experiments/shipping_rule.py OUT [--shipped-report model_weights/report]

OUT is the folder `experiments/evaluate_ensemble.sh` wrote with `SHIPPED=1` (and `BENCH=1` for (f)). The rule,
written down before round 9's numbers existed and kept since, compares the candidate with the shipped model:

(a) Harvard leave-one-patient-out: MAE <= shipped + 0.3 (the members' seed spread), SSIM in head >= shipped - 0.005;
(b) CSF / brain on each real HU CT series >= the shipped model's;
(c) CSF / brain (Otsu masks) on the other hospital's 8-bit CTs: lower than the shipped model's on at most half;
(d) uncertainty, nested Spearman with |error|: mean >= shipped - 0.01, lowest patient >= 0.05;
(e) robustness: the largest change in the head <= 1.2 x the shipped model's largest;
(f) aim 5: the 256-slice CT end to end < 60 s, the 512 x 512 x 300 CT under 4 GB peak RSS.

It reads what the evaluation wrote (OUT/report/summary.json, OUT/external.txt, OUT/external_shipped.txt,
OUT/bench_pipeline.txt) and the shipped model's report summary, prints one row per condition and exits 0 when every
condition holds, 1 when one fails or was not run, 2 when an input is missing or unreadable. The numbers are
compared as the files print them (2 decimals for the external CTs), so the verdict is the one a reader of
those files gets.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class RuleInputError(Exception):
    """An input file is missing or not in the format the evaluation writes."""


@dataclass
class Check:
    name: str
    shipped: str
    candidate: str
    limit: str
    ok: bool | None  # None: not run


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table in `text`, each as a list of rows keyed by the header cells."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.match(r"^\|(\s*-+\s*\|)+\s*$", lines[i + 1]):
            header = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                rows.append(dict(zip(header, cells)))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def table_with(text: str, column: str, source: Path) -> list[dict[str, str]]:
    """The first table of `text` having a column whose header starts with `column`."""
    for rows in markdown_tables(text):
        if rows and any(k.startswith(column) for k in rows[0]):
            return rows
    raise RuleInputError(f"{source}: no table with a column '{column}…'; was it written by the evaluation?")


def cell(row: dict[str, str], column: str) -> str:
    return next(v for k, v in row.items() if k.startswith(column))


def read_text(path: Path, hint: str) -> str:
    if not path.is_file():
        raise RuleInputError(f"{path} is missing: {hint}")
    return path.read_text(encoding="utf-8")


def external(path: Path, hint: str) -> tuple[dict[str, float], dict[str, float]]:
    """CSF / brain per CT (Otsu masks) and the robustness changes per (CT, variant) of an external_ct.py output."""
    text = read_text(path, hint)
    csf = {r["CT"]: float(cell(r, "CSF / brain (aim")) for r in table_with(text, "CSF / brain (aim", path)}
    robust = {f"{r['CT']}: {r['variant']}": float(cell(r, "MAE in head")) for r in table_with(text, "MAE in head", path)}
    return csf, robust


def report_numbers(report: Path) -> tuple[float, float, float, float]:
    """From a `ctmri report` summary.json: the model's mean foreground MAE and SSIM in the head, and the mean and
    lowest Spearman of its uncertainty map with |error| over the held-out patients (report.md's "Mean Spearman …
    lowest …" line, from the same rows, at its 3 decimals)."""
    path = report / "summary.json"
    try:
        data = json.loads(read_text(path, "run `ctmri report` (evaluate_ensemble.sh does)"))
        model = data["summary"]["model"]
        mae, ssim_fg = float(model["mae"]["mean"]), float(model["ssim_foreground"]["mean"])
        rhos = [r.get("unc_spearman") for r in data["rows"] if r["method"] == "model" and r["held_out"]]
    except (ValueError, KeyError, TypeError):
        raise RuleInputError(f"{path}: not a `ctmri report` summary (no summary.model.mae / ssim_foreground)") from None
    if not rhos or any(r is None for r in rhos):
        raise RuleInputError(f"{path}: no uncertainty Spearman on every held-out patient; the report needs a model "
                             "with an uncertainty map (`ctmri report --attach`) that is not constant on any patient")
    return mae, ssim_fg, round(sum(rhos) / len(rhos), 3), round(min(rhos), 3)


def bench(path: Path) -> tuple[float, float] | None:
    """(total seconds of the 256-slice case, peak RSS MB of the 512 x 512 x 300 case), None if not benchmarked."""
    if not path.is_file():
        return None
    rows = table_with(path.read_text(encoding="utf-8"), "stage", path)
    columns = list(rows[0])
    by_stage = {r[columns[0]].strip("*"): r for r in rows}
    try:
        seconds = float(cell(by_stage["total (s)"], "volume256"))
        rss = float(cell(by_stage["peak RSS (MB)"], "large"))
    except (KeyError, StopIteration, ValueError):
        raise RuleInputError(f"{path}: needs the volume256 and large cases (bench_pipeline.py's default)") from None
    return seconds, rss


def checks(out: Path, shipped_report: Path, mae_slack: float = 0.3, ssim_slack: float = 0.005,
           spearman_slack: float = 0.01, spearman_floor: float = 0.05, robust_factor: float = 1.2) -> list[Check]:
    """The six conditions, (a) to (f), for the candidate in `out` against the shipped model."""
    hint = "rerun experiments/evaluate_ensemble.sh with SHIPPED=1"
    mae_s, ssim_s, rho_s, low_s = report_numbers(shipped_report)
    mae_c, ssim_c, rho_c, low_c = report_numbers(out / "report")
    csf_c, rob_c = external(out / "external.txt", "run experiments/evaluate_ensemble.sh")
    csf_s, rob_s = external(out / "external_shipped.txt", hint)
    if set(csf_c) != set(csf_s) or set(rob_c) != set(rob_s):
        raise RuleInputError("external.txt and external_shipped.txt list different CTs or variants; run both in one evaluation")
    hu = [ct for ct in csf_s if "HU" in ct]
    eight_bit = [ct for ct in csf_s if ct not in hu]
    if not hu or not eight_bit:  # external_ct.py names the HU series "real HU CT, …" and the others "… (8-bit)"
        raise RuleInputError("external.txt: expected rows of real HU CT series and of 8-bit CTs; were the CTs renamed?")
    lower = [ct for ct in eight_bit if csf_c[ct] < csf_s[ct]]
    worst_s, worst_c = max(rob_s.values()), max(rob_c.values())
    speed = bench(out / "bench_pipeline.txt")
    fmt = lambda values: " / ".join(f"{v:.2f}" for v in values)  # noqa: E731
    return [
        Check("(a) Harvard MAE; SSIM in head", f"{mae_s:.2f}; {ssim_s:.3f}", f"{mae_c:.2f}; {ssim_c:.3f}",
              f"≤ {mae_s + mae_slack:.2f}; ≥ {ssim_s - ssim_slack:.3f}",
              mae_c <= mae_s + mae_slack and ssim_c >= ssim_s - ssim_slack),
        Check("(b) CSF / brain, HU series", fmt(csf_s[c] for c in hu), fmt(csf_c[c] for c in hu), "≥ shipped on each",
              all(csf_c[c] >= csf_s[c] for c in hu)),
        Check("(c) CSF / brain, 8-bit CTs (Otsu)", fmt(csf_s[c] for c in eight_bit), fmt(csf_c[c] for c in eight_bit),
              f"lower on ≤ {len(eight_bit) // 2} of {len(eight_bit)} (is {len(lower)})",
              len(lower) <= len(eight_bit) // 2),
        Check("(d) uncertainty Spearman mean; lowest", f"{rho_s:.3f}; {low_s:.3f}", f"{rho_c:.3f}; {low_c:.3f}",
              f"≥ {rho_s - spearman_slack:.3f}; ≥ {spearman_floor:.3f}",
              rho_c >= rho_s - spearman_slack and low_c >= spearman_floor),
        Check("(e) robustness, largest change", f"{worst_s:.2f}", f"{worst_c:.2f}", f"≤ {robust_factor * worst_s:.2f}",
              worst_c <= robust_factor * worst_s),
        Check("(f) aim 5: 256 slices (s); 512²×300 RSS (MB)", "–",
              "not run (BENCH=1)" if speed is None else f"{speed[0]:.1f}; {speed[1]:.0f}", "< 60; < 4096",
              None if speed is None else speed[0] < 60 and speed[1] < 4096),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder evaluate_ensemble.sh wrote (with SHIPPED=1)")
    parser.add_argument("--shipped-report", type=Path, default=ROOT / "model_weights" / "report")
    args = parser.parse_args(argv)
    try:
        rows = checks(args.out, args.shipped_report)
    except RuleInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("| condition | shipped | candidate | limit | holds |\n|---|---|---|---|---|")
    for c in rows:
        print(f"| {c.name} | {c.shipped} | {c.candidate} | {c.limit} | {'–' if c.ok is None else 'yes' if c.ok else '**no**'} |")
    passed = all(c.ok for c in rows)
    failed = [c.name.split(" ")[0] for c in rows if c.ok is False]
    not_run = [c.name.split(" ")[0] for c in rows if c.ok is None]
    print("\nship: " + ("yes, every condition holds" if passed else "no: " + "; ".join(
        part for part in (f"fails {', '.join(failed)}" if failed else "", f"not run {', '.join(not_run)}" if not_run else "") if part)))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
