"""One case from files to an output folder: what ``ctmri synthesize`` does, callable from ``batch`` too.

Reads the CT (and optional MRI), runs :func:`pipeline.synthesize`, writes the outputs with
:func:`pipeline.save_outputs` and returns the run's summary (the content of ``metrics.json``).
Keeping this out of ``cli.py`` lets cohorts (``batch.py``) run exactly the same path per case.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .pipeline import SynthesisResult


@dataclass
class CaseOptions:
    """The ``synthesize`` options that change what a case produces (or how it is run)."""

    weights: Optional[str] = None
    device: str = "auto"
    registration: str = "rigid"
    allow_disjoint: bool = False
    batch_size: Optional[int] = None


def run_case(
    ct_path: str | Path,
    mri_path: str | Path | None,
    out_dir: str | Path,
    options: CaseOptions,
    *,
    model=None,
    progress: Optional[Callable[[float, str], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
    provenance: Optional[dict] = None,
) -> tuple[SynthesisResult, dict]:
    """Synthesise one case into ``out_dir``; return the result and {kind: written path}.

    ``model`` (a loaded :class:`weights.LoadedModel`) lets a caller that runs many cases load it once.
    Raises :class:`CTMRIError` for anything the user can fix; nothing is left half-written.
    ``provenance`` is merged into the result's provenance before writing (batch's ``made_from``), so it
    lands in ``metrics.json``, which is moved into place last.
    """
    from .pipeline import check_out_dir, save_outputs, synthesize
    from .volumes import read_volume

    check_out_dir(out_dir)  # before minutes of work, not after
    ct = read_volume(ct_path, "CT")
    mri = read_volume(mri_path, "MRI") if mri_path else None
    result = synthesize(
        ct, mri, weights=options.weights, model=model, device=options.device,
        registration=options.registration, allow_disjoint=options.allow_disjoint,
        batch_size=options.batch_size, progress=progress, cancel=cancel,
    )
    result.provenance.update(provenance or {})
    paths = save_outputs(result, out_dir)
    return result, paths
