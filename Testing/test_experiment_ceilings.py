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
