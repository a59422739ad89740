"""experiments/shipping_rule.py: the model card's rule (a)-(f), on files in the formats the evaluation writes.

The shipped model's own report (model_weights/report) is the Harvard / uncertainty side of both models here, so
(a) and (d) hold exactly; the external-CT and benchmark files are small stand-ins written in the formats of
external_ct.py and bench_pipeline.py (the real ones come from licensed data and minutes of CPU).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_REPORT = ROOT / "model_weights" / "report"


def load_rule():
    spec = importlib.util.spec_from_file_location("shipping_rule", ROOT / "experiments" / "shipping_rule.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


rule = load_rule()

CTS = ["real HU CT, series 2 (5 mm slices)", "real HU CT, series 3 (2.5 mm slices)",
       "clinical CT Patient_01 (8-bit)", "clinical CT Patient_02 (8-bit)", "clinical CT Patient_03 (8-bit)"]


def external_txt(csf: list[float], noise: list[float]) -> str:
    """An external_ct.py output: the CSF table, then the robustness table (one variant per CT)."""
    lines = ["model: x", "", "| CT | CSF voxels | brain voxels | CSF / brain (aim ≥ 1.6) | CSF / brain, strict masks (8-bit) "
             "| signal outside the head (aim ≤ 0.5 %) |", "|---|---|---|---|---|---|"]
    lines += [f"| {ct} | 100 | 1000 | {v:.2f} | – | 0.00 % |" for ct, v in zip(CTS, csf)]
    lines += ["", "CSF / brain: min 1, median 1", "", "| CT | variant | MAE in head vs original output | share of its mean |",
              "|---|---|---|---|"]
    lines += [f"| {ct} | noise | {v:.2f} | 1.0 % |" for ct, v in zip(CTS, noise)]
    return "\n".join(lines) + "\n"


BENCH = """Machine: x; OMP_WAIT_POLICY=(unset)
Model: x

### ctmri synthesize, stage times and peak memory

| stage (s) | small 256×256×18 (cpu) | volume256 256×256×256 (cpu) | large 512×512×300 (cpu) |
|---|---|---|---|
| read | 0.01 | 0.1 | 0.5 |
| **total (s)** | 8.1 | {seconds} | 54 |
| peak RSS (MB) | 676 | 1.31e+03 | {rss} |
"""

SHIPPED_CSF = [1.40, 1.37, 1.21, 1.21, 1.34]
SHIPPED_NOISE = [3.27, 9.42, 0.5, 0.6, 2.0]


def candidate(tmp_path: Path, csf: list[float], noise: list[float], bench: tuple | None = (38.0, 3360)) -> Path:
    out = tmp_path / "eval"
    shutil.copytree(SHIPPED_REPORT, out / "report")
    (out / "external.txt").write_text(external_txt(csf, noise), encoding="utf-8")
    (out / "external_shipped.txt").write_text(external_txt(SHIPPED_CSF, SHIPPED_NOISE), encoding="utf-8")
    if bench:
        (out / "bench_pipeline.txt").write_text(BENCH.format(seconds=bench[0], rss=bench[1]), encoding="utf-8")
    return out


def verdicts(out: Path) -> dict[str, bool | None]:
    return {c.name[:3]: c.ok for c in rule.checks(out, SHIPPED_REPORT)}


def test_a_better_candidate_passes_every_condition(tmp_path, capsys):
    out = candidate(tmp_path, [1.52, 1.44, 1.26, 1.20, 1.65], [1.9, 8.41, 0.5, 0.6, 3.0])
    assert verdicts(out) == {k: True for k in ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)"]}
    assert rule.main([str(out), "--shipped-report", str(SHIPPED_REPORT)]) == 0
    assert "ship: yes" in capsys.readouterr().out


def test_each_condition_fails_on_its_own_measure(tmp_path):
    # one HU series below the shipped model's contrast: (b); lower on 2 of 3 8-bit CTs: (c);
    # largest change 11.74 > 1.2 x 9.42: (e); the 512-slice case over 4 GB: (f)
    out = candidate(tmp_path, [1.51, 1.36, 1.20, 1.20, 1.46], [4.21, 11.74, 0.5, 0.6, 2.0], bench=(38.0, 4200))
    assert verdicts(out) == {"(a)": True, "(b)": False, "(c)": False, "(d)": True, "(e)": False, "(f)": False}


def test_ties_count_as_not_lower_and_the_robustness_limit_is_inclusive(tmp_path):
    out = candidate(tmp_path, SHIPPED_CSF, [3.0, 1.2 * 9.42, 0.5, 0.6, 2.0])
    assert verdicts(out) == {k: True for k in ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)"]}


def test_without_a_benchmark_f_is_not_run_and_the_candidate_is_not_shipped(tmp_path, capsys):
    out = candidate(tmp_path, [1.52, 1.44, 1.26, 1.20, 1.65], [1.9, 8.41, 0.5, 0.6, 3.0], bench=None)
    assert verdicts(out)["(f)"] is None
    assert rule.main([str(out), "--shipped-report", str(SHIPPED_REPORT)]) == 1
    assert "not run (f)" in capsys.readouterr().out


@pytest.mark.parametrize("missing", ["external_shipped.txt", "report/summary.json"])
def test_a_missing_input_is_an_error_saying_what_to_run(tmp_path, capsys, missing):
    out = candidate(tmp_path, SHIPPED_CSF, SHIPPED_NOISE)
    (out / missing).unlink()
    assert rule.main([str(out), "--shipped-report", str(SHIPPED_REPORT)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and missing.split("/")[-1] in err


def test_external_files_of_different_cts_are_refused(tmp_path):
    out = candidate(tmp_path, SHIPPED_CSF, SHIPPED_NOISE)
    (out / "external.txt").write_text(external_txt(SHIPPED_CSF[:4], SHIPPED_NOISE[:4]), encoding="utf-8")
    with pytest.raises(rule.RuleInputError, match="different CTs"):
        rule.checks(out, SHIPPED_REPORT)


def test_external_files_without_hu_rows_are_refused(tmp_path):
    out = candidate(tmp_path, SHIPPED_CSF, SHIPPED_NOISE)
    for name in ("external.txt", "external_shipped.txt"):
        text = (out / name).read_text(encoding="utf-8").replace("real HU CT", "real CT")
        (out / name).write_text(text, encoding="utf-8")
    with pytest.raises(rule.RuleInputError, match="real HU CT series"):
        rule.checks(out, SHIPPED_REPORT)


def test_a_report_summary_of_another_shape_is_an_error_not_a_traceback(tmp_path):
    out = candidate(tmp_path, SHIPPED_CSF, SHIPPED_NOISE)
    (out / "report" / "summary.json").write_text('{"summary": {"model": {"mae": {"mean": 37.0}}}}', encoding="utf-8")
    with pytest.raises(rule.RuleInputError, match="not a `ctmri report` summary"):
        rule.checks(out, SHIPPED_REPORT)


def test_a_report_without_uncertainty_on_every_patient_is_an_error(tmp_path):
    out = candidate(tmp_path, SHIPPED_CSF, SHIPPED_NOISE)
    path = out / "report" / "summary.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    next(r for r in data["rows"] if r["method"] == "model")["unc_spearman"] = None  # a constant map on that patient
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(rule.RuleInputError, match="uncertainty Spearman on every held-out patient"):
        rule.checks(out, SHIPPED_REPORT)


def test_the_later_tables_of_external_ct_do_not_enter_the_rule(tmp_path):
    """external_ct.py also prints the HU study's two reconstructions against each other and, for a model with
    grain matching, each CT's grain: neither is a variant of (e) nor a CSF row of (b)/(c)."""
    out = candidate(tmp_path, SHIPPED_CSF, SHIPPED_NOISE)
    extra = ("\n| same scan, two reconstructions | MAE in head between the two outputs | share of its mean |\n|---|---|---|\n"
             "| real HU CT, 2.5 mm slices against 5 mm | 99.00 | 50.0 % |\n"
             "\n| CT | variant | noise grain | target | blurred by (px) |\n|---|---|---|---|---|\n"
             f"| {CTS[0]} | as given | 4.97 | 8.27 | 0 |\n")
    with open(out / "external.txt", "a", encoding="utf-8") as fh:
        fh.write(extra)
    assert verdicts(out) == {k: True for k in ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)"]}
