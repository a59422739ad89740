"""``python -m CTtoMRISynthesisLib.training train|report ...`` until the ``ctmri`` CLI wires them in."""

from __future__ import annotations

import argparse
import os
import sys

# On a shared, oversubscribed CPU, OpenMP threads that spin while waiting made training steps 2-3x
# slower here; passive waiting costs nothing when the cores are free. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .commands import add_report_arguments, add_train_arguments, run_report, run_train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m CTtoMRISynthesisLib.training")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_arguments(sub.add_parser("train", help="train a model (or run cross-validation)"))
    add_report_arguments(sub.add_parser("report", help="Table-1 style report of a model on paired data"))
    args = parser.parse_args(argv)
    return run_train(args) if args.command == "train" else run_report(args)


if __name__ == "__main__":
    sys.exit(main())
