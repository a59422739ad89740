"""One case from files to an output folder: what ``ctmri synthesize`` does, callable from ``batch`` too.

Reads the CT (and optional MRI), runs :func:`pipeline.synthesize`, writes the outputs with
:func:`outputs.save_outputs` and returns the run's summary (the content of ``metrics.json``).
Keeping this out of ``cli.py`` lets cohorts (``batch.py``) run exactly the same path per case.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

from .errors import CTMRIError
from .pipeline import SynthesisResult


@dataclass
class CaseOptions:
    """The ``synthesize`` options that change what a case produces (or how it is run)."""

    weights: Optional[str] = None
    device: str = "auto"
    registration: str = "rigid"
    allow_disjoint: bool = False
    batch_size: Optional[int] = None
    dicom: bool = False  # also write OUT/dicom/<kind>/ series (dicom_out.py)
    pictures: bool = False  # also write OUT/pictures/<kind>/ 8-bit PNG slices (pictures.py)
    ct_series: Optional[str] = None  # series number or UID when the CT is a DICOM folder (None: by the rule)
    mri_series: Optional[str] = None
    picture_spacing: Optional[Tuple[float, float]] = None  # (in-plane, between slices) mm of picture folders
    # the MRI's, when its pictures have another pixel size than the CT's (two exports); None: picture_spacing
    mri_picture_spacing: Optional[Tuple[float, float]] = None

    @property
    def mri_spacing(self) -> Optional[Tuple[float, float]]:
        """The spacing an MRI given as a folder of pictures is read with."""
        return self.mri_picture_spacing or self.picture_spacing


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
    notify: Optional[Callable[[str], None]] = None,
    series_chosen_with: Optional[dict] = None,
) -> tuple[SynthesisResult, dict]:
    """Synthesise one case into ``out_dir``; return the result and {kind: written path}.

    ``model`` (a loaded :class:`weights.LoadedModel`) lets a caller that runs many cases load it once.
    Raises :class:`CTMRIError` for anything the user can fix; nothing is left half-written.
    ``provenance`` is merged into the result's provenance before writing (batch's ``made_from``), so it
    lands in ``metrics.json``, which is moved into place last. A DICOM folder is read through
    :mod:`dicom`'s series choice, a folder of 2D pictures as one stack (:mod:`pictures`); ``notify(line)`` is
    told which series or pictures were taken and why (also recorded as ``ct_series`` / ``mri_series`` or
    ``ct_pictures`` / ``mri_pictures`` in ``metrics.json``). ``options.dicom`` / ``options.pictures`` add
    ``dicom/`` / ``pictures/`` to the outputs. ``series_chosen_with`` ({"CT": …, "MRI": …}) names, in the
    messages, what the caller's user sets to choose a series (default: ``--ct-series`` / ``--mri-series``).
    """
    from .outputs import OUTPUT_FOLDERS, check_inputs_kept, check_out_dir, save_outputs
    from .pipeline import synthesize

    # before minutes of work, not after
    check_out_dir(out_dir, [OUTPUT_FOLDERS[k] for k in ("dicom", "pictures") if getattr(options, k)])
    check_inputs_kept(out_dir, [ct_path, mri_path])
    if options.mri_series and not mri_path:
        raise CTMRIError("--mri-series chooses a series of the MRI folder; give --mri too, or leave it out")
    (ct, ct_source), (mri, mri_source) = _read_inputs(ct_path, mri_path, options, notify, series_chosen_with or {})
    result = synthesize(
        ct, mri, weights=options.weights, model=model, device=options.device,
        registration=options.registration, allow_disjoint=options.allow_disjoint,
        batch_size=options.batch_size, progress=progress, cancel=cancel,
    )
    _record_sources(result, ct_source, mri_source, options)
    result.provenance.update(provenance or {})
    # The outputs lie on the reference grid: the MRI's when one was given, else the CT's.
    writers = _extra_writers(result, ct_source, mri_source if mri_path else ct_source, options)
    paths = save_outputs(result, out_dir, extra_writer=_all_of(writers) if writers else None)
    return result, paths


def _read_inputs(ct_path, mri_path, options: CaseOptions, notify: Optional[Callable[[str], None]],
                 chosen_with: dict) -> tuple:
    """((CT image, its source), (MRI image or None, its source)): files, DICOM folders (a series chosen, said
    through ``notify``) or folders of pictures; two sources that cannot be registered are refused."""
    from .dicom import patient_mismatch, read_input
    from .pictures import check_dicom_output, check_registration, check_spacing

    check_spacing(options.mri_picture_spacing, "--mri-picture-spacing")  # by its own name, before any reading

    ct, ct_source = read_input(ct_path, "CT", options.ct_series, options.picture_spacing, chosen_with.get("CT"))
    if ct_source is not None and notify is not None:
        notify(ct_source.message("CT"))
    mri, mri_source = (read_input(mri_path, "MRI", options.mri_series, options.mri_spacing, chosen_with.get("MRI"))
                       if mri_path else (None, None))
    if mri_source is not None and notify is not None:
        notify(mri_source.message("MRI"))
    if mri is not None:
        check_registration([ct_source, mri_source], options.registration)
    if options.dicom:  # the outputs lie on the MRI's grid when there is one, else on the CT's
        check_dicom_output(*((mri_source, mri_path, "MRI", "--mri-picture-spacing (or --picture-spacing)") if mri_path
                             else (ct_source, ct_path, "CT", "--picture-spacing")))
    two_patients = patient_mismatch(ct_source, mri_source)
    if two_patients and options.dicom:  # before any work: the DICOM outputs would be filed in the CT's study
        raise CTMRIError(f"{two_patients}: --dicom would file outputs made from that MRI in the CT patient's study; "
                         "check that both are this patient's scans, or run without --dicom")
    return (ct, ct_source), (mri, mri_source)


def _record_sources(result: SynthesisResult, ct_source, mri_source, options: CaseOptions) -> None:
    """Which series or pictures were read (``ct_series``, ``mri_pictures``, …) and what the user must know
    about pictures (their assumed spacing; a --picture-spacing that was not used)."""
    from .dicom import about_source, patient_mismatch, picture_spacing_unused

    two_patients = patient_mismatch(ct_source, mri_source)
    if two_patients:
        result.warnings.append(f"{two_patients}: if they are, the difference map and the metrics compare two "
                               "patients' images, not the synthesis with its truth")
    for what, source in (("ct", ct_source), ("mri", mri_source)):
        kind, provenance, warnings = about_source(source, what.upper())
        if kind:
            result.provenance[f"{what}_{kind}"] = provenance  # ct_series, mri_pictures, …
        result.warnings.extend(warnings)
    # --picture-spacing is the CT's, and the MRI's unless --mri-picture-spacing gives that one
    mri_own = options.mri_picture_spacing is not None
    if mri_own:
        result.warnings.extend(picture_spacing_unused(options.picture_spacing, (ct_source,), "--picture-spacing",
                                                      "the CT is not a folder of pictures (the MRI's spacing is "
                                                      "--mri-picture-spacing)"))
    else:
        result.warnings.extend(picture_spacing_unused(options.picture_spacing, (ct_source, mri_source)))
    result.warnings.extend(picture_spacing_unused(options.mri_picture_spacing, (mri_source,), "--mri-picture-spacing",
                                                  "no MRI given is a folder of pictures"))


def _extra_writers(result: SynthesisResult, ct_source, reference_source, options: CaseOptions) -> list:
    """The writers of ``dicom/`` and ``pictures/`` when asked. Only a DICOM source has headers (patient,
    study, frame of reference) for the DICOM outputs to inherit."""
    from .dicom import Choice
    from .dicom_out import dicom_writer
    from .pictures import picture_writer

    writers = []
    if options.dicom:
        ct_dicom, reference_dicom = (s if isinstance(s, Choice) else None for s in (ct_source, reference_source))
        writers.append(dicom_writer(result, ct_dicom, reference_dicom))
    if options.pictures:
        writers.append(picture_writer(result, reference_source))
    return writers


def _all_of(writers: list) -> Callable[[Path], dict]:
    """One extra writer for :func:`outputs.save_outputs` that runs each of ``writers`` in turn."""

    def write(tmp: Path) -> dict:
        written: dict = {}
        for writer in writers:
            written.update(writer(tmp))
        return written

    return write
