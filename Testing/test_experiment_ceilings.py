"""The ceiling experiments behind issue 11's unmet aims: what they train on and what they score.

experiments/slice_split.py (aim 1) trains on the held-out patient's even slices and scores its odd slices, on
purpose; experiments/error_model_cv.py's ``--half-split`` and ``--transfer-matrix`` (aim 4) fit error models on
one half of a patient, or on one patient alone. A slip here (an odd slice in training, a patient scored by a
model fit on itself where the table says "other") would make a ceiling look higher than it is.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is not installed")


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_halves_split_a_patient_into_alternate_slices_that_never_overlap(phantom_slices):
    from CTtoMRISynthesisLib.intensity import CTWindow
    from CTtoMRISynthesisLib.training.discovery import discover

    split = load("slice_split")
    case = discover([phantom_slices], CTWindow(45, 120))[0]
    even, odd = split.halves(case)
    assert (even.case_id, odd.case_id) == (f"{case.case_id}:even", f"{case.case_id}:odd")
    assert even.slices + odd.slices == case.slices and abs(even.slices - odd.slices) <= 1
    assert set(even.slice_names).isdisjoint(odd.slice_names)
    assert even.slice_names == case.slice_names[0::2] and odd.slice_names == case.slice_names[1::2]
    np.testing.assert_array_equal(odd.mri, case.mri[1::2])
    np.testing.assert_array_equal(even.ct, case.ct[0::2])


def test_blocks_layout_leaves_a_slice_between_training_and_test():
    split = load("slice_split")
    for n in (6, 7, 16, 21):
        train, test = split.split_indices(n, "blocks")
        assert test.min() - train.max() == 2 and test.max() == n - 1 and train.min() == 0  # one slice of gap
        assert len(test) >= len(train) >= n // 2 - 1
    with pytest.raises(SystemExit, match="unknown layout"):
        split.split_indices(6, "random")


@needs_torch
def test_slice_split_model_trains_on_the_even_slices_and_never_on_the_odd_ones(phantom_slices, tmp_path):
    from CTtoMRISynthesisLib.intensity import CTWindow
    from CTtoMRISynthesisLib.training.discovery import discover
    from CTtoMRISynthesisLib.weights import read_config

    split = load("slice_split")
    cases = discover([phantom_slices], CTWindow(45, 120))
    held = next(c for c in cases if c.case_id == "16")
    argv = ["--epochs", "1", "--max-steps", "1", "--base", "4", "--device", "cpu", "--workers", "0", "--threads", "1"]
    record = read_config(split.train_seen(held, cases, {"2"}, argv, tmp_path / "seen"))["split"]
    assert sorted(record["train_cases"]) == ["16:even", "20", "28"]  # never 2 (excluded), never 16 itself
    assert record["test_cases"] == ["16:odd"]
    record = read_config(split.train_seen(held, cases, {"2"}, argv, tmp_path / "own", own_only=True))["split"]
    assert record["train_cases"] == ["16:even"] and record["test_cases"] == ["16:odd"]


def test_error_model_half_split_keeps_the_halves_apart():
    from CTtoMRISynthesisLib.error_model import Sample

    cv = load("error_model_cv")
    z = np.arange(7, dtype=np.float32)[:, None, None] * np.ones((7, 4, 4), np.float32)
    sample = Sample("p", z, z + 100, z + 200, np.ones(z.shape, bool))
    even, odd = cv.half(sample, 0), cv.half(sample, 1)
    assert even.mean[:, 0, 0].tolist() == [0, 2, 4, 6] and odd.mean[:, 0, 0].tolist() == [1, 3, 5]
    assert odd.real[:, 0, 0].tolist() == [201, 203, 205] and odd.spread[:, 0, 0].tolist() == [101, 103, 105]


@needs_torch
def test_transfer_matrix_scores_each_fit_on_every_patient_and_best_other_skips_itself(capsys):
    """Two patients whose error grows at edges and one whose error is the same everywhere: a map fit on an
    edge patient ranks the other edge patient's error, the flat patient's fit ranks nothing, and the
    "best other" of a column is never its own (in-sample) diagonal."""
    sys.path.insert(0, str(ROOT / "Testing"))
    from test_error_model import _sample

    cv = load("error_model_cv")
    samples = [_sample(10, True), _sample(11, True), _sample(12, False)]
    cv.print_transfer_matrix(samples, argparse.Namespace(steps=300, seed=0, exclude_from_training=[]))
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    matrix = {r[0].strip(): [float(v) for v in r[1:]] for r in rows[1:]}
    assert matrix["p10"][1] > 0.3 and matrix["p11"][0] > 0.3  # edge patient → edge patient
    assert abs(matrix["p12"][0]) < 0.15  # a fit on uniform error learns no ranking
    best = matrix["best other (never an excluded patient)"]
    assert best[0] == pytest.approx(max(matrix["p11"][0], matrix["p12"][0]), abs=1e-3)
    assert best[2] == pytest.approx(max(matrix["p10"][2], matrix["p11"][2]), abs=1e-3)


def _cv_output(rows: dict, seed: int) -> str:
    """Text as error_model_cv.py prints its table: {set: (per-patient values)}."""
    lines = [f"4 runs: …; fits never on ['2']; error-model seed {seed}", "| map | 2 | 16 | mean | lowest |",
             "|---|---|---|---|---|"]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {np.mean(values):.3f} | {min(values):.3f} |")
    return "\n".join(lines) + "\n"


def test_round15_rule_needs_the_gain_for_both_seeds_and_keeps_the_lowest_patient(tmp_path, capsys):
    """A set passes only with mean ≥ shipped + 0.02 and lowest ≥ shipped's − 0.01 for both seeds; of several,
    the highest mean; aim 4 needs mean ≥ 0.3 and lowest ≥ 0.2 for both."""
    rule = load("error_features_rule")
    shipped = (0.20, 0.30)  # mean 0.25, lowest 0.20
    seed0 = {"shipped": shipped, "shipped + depth": (0.22, 0.33), "shipped + ct": (0.19, 0.40),
             "shipped + depth + ct": (0.20, 0.34)}
    seed1 = dict(seed0, **{"shipped + depth + ct": (0.20, 0.31)})  # +0.005 only with seed 1
    files = [tmp_path / "s0.txt", tmp_path / "s1.txt"]
    for seed, (path, rows) in enumerate(zip(files, (seed0, seed1))):
        path.write_text(_cv_output(rows, seed))
    assert rule.main([str(f) for f in files] + ["--patients", "2"]) == 0
    out = capsys.readouterr().out
    assert "not the recorded 0.242" in out  # the shipped row here has mean 0.25
    # depth: +0.025 on the mean, lowest up: passes; ct: +0.045 but its lowest falls by 0.01 (0.19): passes at the
    # limit and wins on the mean; depth + ct fails on seed 1
    assert "Verdict: 'shipped + ct' replaces the shipped error model" in out and "aim 4 not met" in out
    seed1["shipped + ct"] = (0.18, 0.40)  # lowest 0.02 below: fails on seed 1
    files[1].write_text(_cv_output(seed1, 1))
    assert rule.main([str(f) for f in files] + ["--patients", "2"]) == 0
    assert "Verdict: 'shipped + depth' replaces" in capsys.readouterr().out
    for rows in (seed0, seed1):
        rows["shipped + depth"] = (0.25, 0.45)  # mean 0.35, lowest 0.25: aim 4
    for seed, (path, rows) in enumerate(zip(files, (seed0, seed1))):
        path.write_text(_cv_output(rows, seed))
    lines, best, aim = rule.verdict([rule.read_rows(f, seed, 2) for seed, f in enumerate(files)])
    assert best == "shipped + depth" and aim
    assert rule.main([str(f) for f in files]) == 2 and "scores 2 patients, not 8" in capsys.readouterr().err
    assert rule.main([str(files[1]), str(files[0]), "--patients", "2"]) == 2  # the seeds swapped
    assert "error-model seed 0" in capsys.readouterr().err
    files[0].write_text(_cv_output({"shipped": shipped}, 0))
    assert rule.main([str(f) for f in files] + ["--patients", "2"]) == 2 and "no row for" in capsys.readouterr().err


@needs_torch
def test_round15_rule_reads_what_error_model_cv_prints(phantom_slices, tmp_path, monkeypatch, capsys):
    """error_model_cv.py's sets of the rule run on CV runs (the CT and depth features included) and the rule
    reads its table."""
    import phantoms

    runs = phantoms.tiny_cv_runs(phantom_slices, tmp_path)
    cv, rule = load("error_model_cv"), load("error_features_rule")
    monkeypatch.setattr(sys, "argv", ["error_model_cv.py", *map(str, runs), "--data", str(phantom_slices), "--steps", "20",
                                      "--no-ceiling", "--exclude-from-training", "2", "--seed", "1",
                                      "--sets", "shipped", *rule.CANDIDATES])
    assert cv.main() == 0
    (tmp_path / "s1.txt").write_text(capsys.readouterr().out)
    rows = rule.read_rows(tmp_path / "s1.txt", seed=1, patients=4)
    assert set(rows) >= {"shipped", *rule.CANDIDATES} and all(-1 <= m <= 1 for m, _ in rows.values())


def test_round15_recorded_verdict_is_what_the_rule_gives_on_the_recorded_tables(capsys):
    """The committed round-15 tables, read by the rule as it stands, give the verdict the model card records
    (no set passes, exit 1): a change to the rule script that would turn that verdict is caught here."""
    rule = load("error_features_rule")
    folder = ROOT / "model_weights" / "report" / "evaluation"
    tables = [str(folder / f"round15_error_features_seed{k}.txt") for k in (0, 1)]
    assert rule.main(tables) == 1
    out = capsys.readouterr().out
    assert "Verdict: no set passes; the shipped error model stays." in out
    assert out.strip() in (folder / "round15_rule.txt").read_text()  # the recorded output is this output


@needs_torch
def test_bright_share_counts_brain_voxels_as_bright_as_the_csf_median() -> None:
    """experiments/bright_spots.py: the share of brain-tissue voxels at least as bright as the median in CSF; nan
    without either tissue."""
    spots = load("bright_spots")
    syn = np.array([[10.0, 20.0, 30.0, 40.0, 100.0, 120.0, 200.0]])
    csf = np.array([[False, False, False, False, True, True, True]])
    brain = ~csf
    assert spots.bright_share(syn, csf, brain) == 0.0  # CSF median 120: no brain voxel reaches it
    syn[0, 3] = 150.0
    assert spots.bright_share(syn, csf, brain) == 0.25
    assert np.isnan(spots.bright_share(syn, np.zeros_like(csf), brain))


@needs_torch
def test_fine_texture_rises_with_speckles_and_ignores_smooth_ramps() -> None:
    """bright_spots.fine_texture: 0 on a smooth ramp (its own median), larger with isolated bright pixels."""
    spots = load("bright_spots")
    ramp = np.tile(np.linspace(50, 150, 64, dtype=np.float32), (3, 64, 1))
    brain = np.ones(ramp.shape, bool)
    assert spots.fine_texture(ramp, brain) < 0.1  # (only its border columns, where the median reflects)
    speckled = ramp.copy()
    rng = np.random.default_rng(0)
    speckled[rng.random(ramp.shape) < 0.3] += 40.0
    assert spots.fine_texture(speckled, brain) > 5.0
    assert np.isnan(spots.fine_texture(ramp, np.zeros_like(brain)))
