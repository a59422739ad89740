"""experiments/fingerprint.py, the check that a refactoring changed nothing: its premise is that two runs of the
same code give identical files. Checked on the part that trains and reports (the one with the most moving parts:
training, CV folds, report files); the others are deterministic by the same means (seeds, one ITK thread)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fingerprint():
    spec = importlib.util.spec_from_file_location("fingerprint", ROOT / "experiments" / "fingerprint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_runs_give_identical_files_and_a_part_records_what_it_made(tmp_path, capsys):
    pytest.importorskip("torch")
    fingerprint = _fingerprint()
    assert fingerprint.main(["report", "--out", str(tmp_path / "a.json")]) == 0
    assert fingerprint.main(["report", "--out", str(tmp_path / "b.json")]) == 0
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    report = json.loads((tmp_path / "a.json").read_text())["report"]
    assert set(report) == {"single", "ensemble"}
    assert "| **U-Net (ours)** |" in report["ensemble"]["report.md"]
    with pytest.raises(SystemExit):
        fingerprint.main(["nonsense", "--out", str(tmp_path / "c.json")])
    assert "unknown part(s) ['nonsense']" in capsys.readouterr().err


def test_every_part_is_described():
    fingerprint = _fingerprint()
    for part in fingerprint.PARTS:
        assert f"``{part}``" in fingerprint.__doc__
