"""Terminal progress bars for the command-line tools (``ctmri synthesize``, ``demo``, ``batch``).

Kept apart from ``cli.py`` so that library modules (``demo``, ``case``, ``batch``) can show progress
without importing the argument parser (which imports them).
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Tuple

ProgressFn = Optional[Callable[[float, str], None]]


def progress_bar(enabled: bool) -> Tuple[ProgressFn, Callable[[], None]]:
    """A tqdm bar driven by ``progress(fraction, message)`` and its ``close``; (None, no-op) when disabled."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=1000, unit="‰", bar_format="{l_bar}{bar}| {elapsed}<{remaining}", file=sys.stderr)

    def progress(fraction: float, message: str) -> None:
        bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
        bar.set_description_str(message[:40])
        bar.refresh()

    return progress, bar.close
