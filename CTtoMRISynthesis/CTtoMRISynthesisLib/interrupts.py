"""Ctrl-C and a scheduler's stop (SIGTERM): held while outputs are moved into place, or turned into Ctrl-C's
clean path for a whole run (``ctmri synthesize``, ``ctmri batch``)."""

from __future__ import annotations

import contextlib

#: the signals that arrived while a commit held them (see :func:`stop_requested_while_saving`)
_HELD_SIGNALS: list = []


@contextlib.contextmanager
def signals_held():
    """Hold Ctrl-C (SIGINT) and a stop request (SIGTERM) in the main thread for the duration: the work they guard
    is whole (a few renames and the removal of the temporary folder). One that arrives is recorded, not acted on:
    a caller with more work after it (batch's next case) asks :func:`stop_requested_while_saving`."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            saved[sig] = signal.signal(sig, lambda signum, frame: _HELD_SIGNALS.append(signum))
    except (ValueError, OSError):  # not in the main interpreter / signals unavailable
        pass
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def stop_requested_while_saving() -> bool:
    """Whether a Ctrl-C or SIGTERM arrived while outputs were being committed (held then); clears the record."""
    arrived = bool(_HELD_SIGNALS)
    _HELD_SIGNALS.clear()
    return arrived


class sigterm_as_interrupt:
    """Turn SIGTERM (a scheduler's stop, e.g. SLURM at the time limit; ``kill``) into KeyboardInterrupt, so that it
    takes Ctrl-C's clean path: nothing half-made left, exit 130 (``ctmri synthesize`` and ``batch``)."""

    def __enter__(self):
        import signal

        def interrupt(signum, frame):
            raise KeyboardInterrupt

        try:
            self.saved = signal.signal(signal.SIGTERM, interrupt)
        except (ValueError, OSError):  # not the main thread
            self.saved = None
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self.saved is not None:
            signal.signal(signal.SIGTERM, self.saved)
