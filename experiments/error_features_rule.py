"""Apply round 15's rule (new error-model inputs, issue 11 aim 4) to two runs of experiments/error_model_cv.py.

    python experiments/error_features_rule.py SEED0.txt SEED1.txt

Each file is what `error_model_cv.py RUN/b8e60 RUN/bag1 RUN/bag2 RUN/bag3 --exclude-from-training 2 --no-ceiling
--sets "shipped" "shipped + depth" "shipped + ct" "shipped + depth + ct" --seed K` printed, K = 0 and 1. The rule,
written before the results (model_weights/report/evaluation/round15_error_features_rule_written_first.md):

- a set replaces the shipped error model only if, for both seeds, its mean nested Spearman is at least the
  shipped set's + 0.02 and its lowest patient at least the shipped set's lowest − 0.01; of several, the highest
  mean over the two seeds;
- aim 4 is met only if that set's mean is >= 0.3 and its lowest >= 0.2, for both seeds.

Numbers are compared as the files print them (3 decimals). Prints one row per set and seed and the verdict;
exits 0 when a set passes, 1 when none does, 2 when a file is missing or lacks a row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shipping_rule import markdown_tables  # noqa: E402  (the same table reader as the shipping rule)

REFERENCE = "shipped"
CANDIDATES = ("shipped + depth", "shipped + ct", "shipped + depth + ct")
GAIN, SLACK = 0.02, 0.01  # mean must rise by GAIN; the lowest patient may fall by at most SLACK
AIM_MEAN, AIM_LOWEST = 0.3, 0.2


class RuleInputError(Exception):
    """A file is missing or lacks a row the rule needs."""


def read_rows(path: Path) -> dict:
    """{set name: (mean, lowest)} from one error_model_cv.py output."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise RuleInputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    rows = {}
    for table in markdown_tables(text):
        for row in table:
            if "map" in row and "mean" in row and "lowest" in row:
                rows[row["map"]] = (float(row["mean"]), float(row["lowest"]))
    missing = [name for name in (REFERENCE, *CANDIDATES) if name not in rows]
    if missing:
        raise RuleInputError(f"{path} has no row for {missing}; run error_model_cv.py with those --sets")
    return rows


def verdict(runs: list) -> tuple:
    """(lines to print, the winning set or None, whether aim 4 is met) for the runs' rows (one dict per seed)."""
    lines = ["| set | seed | mean | lowest | mean ≥ shipped + 0.02 | lowest ≥ shipped's − 0.01 | aim 4 |",
             "|---|---|---|---|---|---|---|"]
    passing = {}
    for name in CANDIDATES:
        ok_all, aim_all, means = True, True, []
        for seed, rows in enumerate(runs):
            mean, lowest = rows[name]
            ref_mean, ref_lowest = rows[REFERENCE]
            gain = round(mean - ref_mean, 3) >= GAIN
            floor = round(lowest - ref_lowest, 3) >= -SLACK
            aim = mean >= AIM_MEAN and lowest >= AIM_LOWEST
            lines.append(f"| {name} | {seed} | {mean:.3f} | {lowest:.3f} | {'yes' if gain else 'no'} "
                         f"({ref_mean:.3f}) | {'yes' if floor else 'no'} ({ref_lowest:.3f}) | {'yes' if aim else 'no'} |")
            ok_all &= gain and floor
            aim_all &= aim
            means.append(mean)
        if ok_all:
            passing[name] = (sum(means) / len(means), aim_all)
    if not passing:
        return lines + ["", "Verdict: no set passes; the shipped error model stays."], None, False
    best = max(passing, key=lambda n: passing[n][0])
    aim = passing[best][1]
    return lines + ["", f"Verdict: '{best}' replaces the shipped error model (mean over the seeds "
                        f"{passing[best][0]:.3f}); aim 4 {'met' if aim else 'not met'}."], best, aim


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs=2, type=Path, help="error_model_cv.py's output with --seed 0, then --seed 1")
    args = parser.parse_args(argv)
    try:
        runs = [read_rows(path) for path in args.runs]
    except RuleInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lines, best, _ = verdict(runs)
    print("\n".join(lines))
    return 0 if best else 1


if __name__ == "__main__":
    raise SystemExit(main())
