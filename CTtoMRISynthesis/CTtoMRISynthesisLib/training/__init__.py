"""Headless trainer: pair discovery (2D slice folders and 3D SynthRAD-style cases, with a registration
cache), patient-level splits, the training loop (single process or DDP under torchrun), and the
Table-1 style report. Entry points for the CLI are in :mod:`.commands`.

Importing this package is cheap: torch is only imported by the modules that train or predict.
"""

from __future__ import annotations

__all__ = ["discovery", "dataset", "split", "loop", "report", "commands"]
