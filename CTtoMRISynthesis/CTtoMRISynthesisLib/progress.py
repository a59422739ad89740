"""Progress for ``ctmri synthesize`` and ``demo``: a bar on a terminal, plain lines in a log file or a
scheduler's output (where a bar's carriage returns are unreadable). ``batch`` has its own overall bar.

Kept apart from ``cli.py`` so that library modules (``demo``) can show progress without importing the
argument parser (which imports them).
"""

from __future__ import annotations

import re
import sys
import time
from typing import Callable, Optional, Tuple

ProgressFn = Optional[Callable[[float, str], None]]


def progress_bar(enabled: bool, stream=None) -> Tuple[ProgressFn, Callable[[], None]]:
    """A tqdm bar on ``stream`` (stderr by default) driven by ``progress(fraction, message)`` and its ``close``;
    (None, no-op) when disabled."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=1000, unit="‰", bar_format="{l_bar}{bar}| {elapsed}<{remaining}", file=stream or sys.stderr)

    def progress(fraction: float, message: str) -> None:
        bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
        bar.set_description_str(message[:40])
        bar.refresh()

    return progress, bar.close


def progress_lines(stream=None, step: float = 0.1, quiet_s: float = 15.0) -> Tuple[ProgressFn, Callable[[], None]]:
    """``progress(fraction, message)`` printing one line (``"  12 s  40 % register"``) when a stage is first
    seen, the total passes the next ``step``, or ``quiet_s`` seconds passed since the last line: a log gets a
    line or two a stage, not one per batch of slices, and never looks hung for long. A stream that can no longer
    be written (a closed pipe: ``ctmri synthesize … | head``) ends the lines, never the run."""
    stream = stream or sys.stderr
    start = time.monotonic()
    seen: set = set()
    state = {"next": 0.0, "last": start, "broken": False}

    def progress(fraction: float, message: str) -> None:
        if state["broken"]:
            return
        now, fraction = time.monotonic(), min(max(float(fraction), 0.0), 1.0)
        stage = re.sub(r"[\d.]+", "#", message)  # "synthesised 12/256 slices" and "… 24/256 …" are one stage
        if stage in seen and fraction < state["next"] and now - state["last"] < quiet_s:
            return
        seen.add(stage)
        state["next"], state["last"] = (int(fraction / step + 1e-9) + 1) * step, now
        try:
            print(f"{now - start:5.0f} s {int(100 * fraction):3d} % {message}", file=stream, flush=True)
        except (OSError, ValueError):  # a closed pipe or file: the run goes on without its lines
            state["broken"] = True

    return progress, lambda: None


def progress_for(quiet: bool, stream=None) -> Tuple[ProgressFn, Callable[[], None]]:
    """Nothing when ``quiet`` or there is no stream (stderr closed); a bar when ``stream`` (stderr by default)
    is a terminal; plain lines otherwise."""
    stream = stream or sys.stderr
    if quiet or stream is None:
        return None, lambda: None
    if stream.isatty():
        return progress_bar(True, stream)
    return progress_lines(stream)
