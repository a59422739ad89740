"""DICOM studies in: which series a folder holds, which one to take, and its volume.

In: :func:`list_series` reads the headers of every file under a folder (pydicom) and describes each
series (number, modality, image type, plane, slices, spacing, uniformity); :func:`choose_series` takes
one by the stated rule (or by number/UID); :func:`read_series` reads its pixels (SimpleITK/GDCM, which
decodes the compressed transfer syntaxes scanners write) onto a regular grid. Slice geometry comes from
ImagePositionPatient/ImageOrientationPatient: a gantry tilt (slices sheared along the stack) or
non-uniform spacing is resampled onto a regular grid; missing slices, mixed orientations and repeated
positions are refused — never a silently warped volume.

Out: :mod:`dicom_out` writes the outputs as DICOM series.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import CTMRIError

#: a stack is uniform when every slice lies within this of a regular grid (mm, or fraction of the step,
#: whichever is larger): scanners often round ImagePositionPatient to 0.1 mm
POSITION_TOLERANCE_MM = 0.08
POSITION_TOLERANCE_FRACTION = 0.02
#: slices closer than this (mm) share one position
SAME_POSITION_MM = 0.01
#: in-plane drift of a slice's origin (pixels) above which the stack counts as sheared (gantry tilt); below
#: it, the position rounding above is not mistaken for a tilt (it misplaces a slice by at most half a pixel)
SHEAR_TOLERANCE_PIXELS = 0.5
#: a series whose slice normal is further than this from every patient axis is "oblique"
OBLIQUE_DEGREES = 30.0
#: what an input is (the ``what`` of the readers) → the DICOM Modality it should have, and the option choosing its
#: series (``ctmri synthesize``/``evaluate``); an input without one (training's unpaired CT) is told to give the
#: folder of one series
MODALITY_OF = {"CT": "CT", "MRI": "MR", "reference MRI": "MR", "prediction": "MR", "unpaired CT": "CT"}
FLAG_OF = {"CT": "--ct-series", "MRI": "--mri-series", "reference MRI": "--ref-series", "prediction": "--pred-series"}


def _option(what: str, option: Optional[str] = None, fallback: Optional[str] = None) -> Optional[str]:
    """What chooses this input's series, in the caller's terms: ``option`` when the caller names it (``batch``:
    the manifest's column), else the command-line option (``FLAG_OF``), else ``fallback``."""
    return option or FLAG_OF.get(what) or fallback


def _is_flag(chooser: str) -> bool:
    """Whether what chooses a series is a command-line option (``--ct-series``), not a manifest's column."""
    return chooser.startswith("--")


def _leave_out(what: str, option: Optional[str]) -> str:
    """How to stop asking for a series: an option is left out, a manifest's column left empty."""
    return "leave the option out" if _is_flag(_option(what, option, "--")) else "leave it empty"


def _choose_with(what: str, option: Optional[str] = None) -> str:
    """How the user chooses a series for this input: its option, or a folder holding only that series."""
    flag = _option(what, option)
    if not flag:
        return "a folder holding only that series"
    return f"{flag} NUMBER or UID" if _is_flag(flag) else f"{flag} (a series number or UID)"


# ----------------------------------------------------------------------------------------- listing


@dataclass
class SliceFile:
    """One image file of a series: where it is and where its slice lies."""

    path: Path
    position: Optional[Tuple[float, float, float]]
    orientation: Optional[Tuple[float, ...]]
    instance: Optional[int]
    rows: int = 0
    columns: int = 0
    frames: int = 1
    thickness: Optional[float] = None
    image_type: Tuple[str, ...] = ()
    short_by: int = 0  # bytes an uncompressed file lacks of its pixels alone (cut short in copying); 0: not known short
    damage: str = ""  # why a tag this reader needs could not be decoded (a damaged file); "": none


@dataclass
class Series:
    """One DICOM series (by SeriesInstanceUID) and what its headers say about its geometry."""

    uid: str
    number: Optional[int]
    modality: str
    image_type: Tuple[str, ...]
    description: str
    study_uid: str
    rows: int
    columns: int
    pixel_spacing: Optional[Tuple[float, float]]  # DICOM order: (between rows, between columns)
    thickness: Optional[float]
    header: object  # the first file's pydicom Dataset (no pixels): patient, study, frame of reference
    files: List[SliceFile] = field(default_factory=list)
    # Filled by _analyse:
    plane: str = "unknown"
    steps: List[float] = field(default_factory=list)  # distances between consecutive slices (mm)
    uniform: bool = False
    spacing: Optional[float] = None  # the regular step of a uniform stack (mm)
    shear_degrees: float = 0.0
    sheared: bool = False
    problem: Optional[str] = None  # why it cannot be read as one volume (None: it can)
    notes: List[str] = field(default_factory=list)

    @property
    def slices(self) -> int:
        return sum(f.frames for f in self.files)

    @property
    def step(self) -> Optional[float]:
        """The slice step: the regular one of a uniform stack, else the median step (mm)."""
        if self.spacing:
            return self.spacing
        return float(np.median(self.steps)) if self.steps else None

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type or self.plane == "localizer"

    @property
    def is_original_primary(self) -> bool:
        return tuple(self.image_type[:2]) == ("ORIGINAL", "PRIMARY")

    @property
    def is_reformat(self) -> bool:
        return "REFORMATTED" in self.image_type or "MPR" in self.image_type

    @property
    def effective_thickness(self) -> Optional[float]:
        """SliceThickness, or the slice step where the header does not give it."""
        return self.thickness if self.thickness else self.step

    @property
    def needs_resampling(self) -> bool:
        return self.problem is None and (self.sheared or (len(self.steps) > 1 and not self.uniform))

    def label(self) -> str:
        """'series 3' or, without a number, the UID."""
        return f"series {self.number}" if self.number is not None else f"series {self.uid}"

    def short(self) -> str:
        """One phrase: modality, plane, slices and spacing (for choice messages)."""
        thick = self.effective_thickness
        spacing = f" of {thick:g} mm" if thick else ""
        return f"{self.modality} {self.plane}, {self.slices} slices{spacing}"


def list_series(folder: str | Path, what: str = "image", empty_ok: bool = False) -> List[Series]:
    """Every image series in ``folder`` (recursively), sorted by study, then series number.

    Reads headers only. Files that are not DICOM (or hold no image, e.g. a DICOMDIR) are skipped.
    Raises CTMRIError when the folder holds no DICOM image at all, unless ``empty_ok`` (then []).
    """
    folder = Path(folder)
    if _is_dicomdir(folder):
        raise CTMRIError(_dicomdir_message(folder, what))
    if folder.exists() and not folder.is_dir():
        raise CTMRIError(f"{folder} is a file, not a folder: give the folder that holds the {what} series")
    if not folder.is_dir():
        raise CTMRIError(f"{what} folder not found: {folder}; check the path")
    groups: Dict[str, Series] = {}
    unreadable: List[Tuple[Path, str]] = []
    for path in _files_under(folder):
        header = _read_header(path)
        if isinstance(header, _Unreadable):
            unreadable.append((path, header.reason))
            continue
        if header is None:
            continue
        damage = _undecodable(header)
        try:
            uid = str(header.get("SeriesInstanceUID", "") or "")
        except Exception:  # noqa: BLE001 - the UID itself damaged
            uid = ""
        if not uid:
            continue  # its series unknown (a folder of only such files is said to hold damaged DICOM files)
        if damage:
            groups.setdefault(uid, _damaged_series(uid)).files.append(SliceFile(path, None, None, None, damage=damage))
            continue
        series = groups.get(uid)
        if series is None or all(f.damage for f in series.files):  # (a good file's header, not a damaged one's)
            series = groups[uid] = _new_series(uid, header, series.files if series is not None else [])
        series.files.append(_slice_file(path, header))
    if unreadable:  # its series cannot be known: a slice silently left out could be any series' end slice
        path, reason = unreadable[0]
        raise CTMRIError(f"{len(unreadable)} file(s) in {folder} are marked as DICOM but cannot be read, e.g. "
                         f"{path.relative_to(folder)} ({reason}); copy the study again from its source, or move "
                         "the damaged file(s) out of the folder")
    if not groups and empty_ok:
        return []
    if not groups:
        from .volumes import no_dicom_error

        raise no_dicom_error(folder, what)
    listed = list(groups.values())
    for series in listed:
        if all(f.damage for f in series.files):  # only damaged files: nothing to describe it by
            series.problem = _damage_problem(series.files)
            series.notes.append("damaged files")
            continue
        # A series may carry an odd image (e.g. a reformat's reference image): describe it by most of its files.
        series.image_type = _most_common([f.image_type for f in series.files])
        series.thickness = _most_common([f.thickness for f in series.files])
        _analyse(series)
    listed.sort(key=lambda s: (s.study_uid, s.number if s.number is not None else 1 << 30, s.uid))
    return listed


def _most_common(values: list):
    counts: Dict[object, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return max(counts, key=lambda v: counts[v])


def _files_under(folder: Path):
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            yield Path(root) / name


@dataclass
class _Unreadable:
    """What :func:`_read_header` gives for a file marked as DICOM whose header cannot be read."""

    reason: str


def _reason(exc: Exception) -> str:
    """An exception as "Type: its first line", for a message naming what could not be read."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


def _dcmread(path: Path, **options):
    """``pydicom.dcmread`` without pydicom 2.x's notices on reading a DICOMDIR (its DicomDir class is deprecated),
    which a study from a CD or a PACS export holds beside its images: noise in Slicer's console, nothing to act on."""
    import warnings

    import pydicom

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*'DicomDir' class is deprecated")
        warnings.filterwarnings("ignore", message=".*'Media Storage Directory Storage'")
        return pydicom.dcmread(str(path), **options)


def _read_header(path: Path):
    """The file's pydicom header without pixels, or None when it is not a DICOM image."""
    from .volumes import marked_as_dicom

    try:
        header = _dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds (an unknown VR: NotImplementedError)
        if marked_as_dicom(path):  # a DICOM file that cannot be read: one of the study's slices, perhaps
            return _Unreadable(_reason(exc))
        return None
    if "Rows" not in header or "SeriesInstanceUID" not in header:
        return None  # DICOMDIR, structured reports, presentation states...
    return header


#: the tags read from every file (pydicom decodes an element only when it is first used, so a damaged one is found
#: here, where it can be said which file it is, not as a traceback later)
_NEEDED_TAGS = ("SeriesInstanceUID", "SeriesNumber", "Modality", "ImageType", "SeriesDescription", "StudyInstanceUID",
                "Rows", "Columns", "PixelSpacing", "SliceThickness", "ImagePositionPatient", "ImageOrientationPatient",
                "InstanceNumber", "NumberOfFrames", "BitsAllocated", "SamplesPerPixel", "FrameOfReferenceUID",
                "PositionReferenceIndicator", "PatientPosition")


#: what the derived series copy from the source's header (:mod:`dicom_out`): read here too, so that a damaged
#: one is named at reading, not found when the outputs are written
PATIENT_TAGS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
)
STUDY_TAGS = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription",
)


def _undecodable(header) -> str:
    """"TAG: reason" for the first tag this reader needs that the file's header cannot decode, else ""."""
    meta = getattr(header, "file_meta", None)
    for where, keywords in ((meta, ("TransferSyntaxUID",)), (header, _NEEDED_TAGS + PATIENT_TAGS + STUDY_TAGS)):
        for keyword in keywords if where is not None else ():
            try:
                where.get(keyword)
            except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a damaged element
                return f"{keyword}: {_reason(exc)}"
    return ""


def _damaged_series(uid: str) -> Series:
    """A series known so far only from damaged files (its good files, if any, fill it in)."""
    from pydicom.dataset import Dataset

    return Series(uid=uid, number=None, modality="", image_type=(), description="", study_uid="", rows=0, columns=0,
                  pixel_spacing=None, thickness=None, header=Dataset())


def _image_type(header) -> Tuple[str, ...]:
    """The ImageType values, upper case (``ORIGINAL``, ``PRIMARY``, ``AXIAL``, ``LOCALIZER``, …)."""
    return tuple(str(v).upper() for v in multi_values(header.get("ImageType")))


def _new_series(uid: str, header, files: Optional[List[SliceFile]] = None) -> Series:
    spacing = _floats(header.get("PixelSpacing"))
    return Series(
        uid=uid,
        number=_int(header.get("SeriesNumber")),
        modality=str(header.get("Modality", "") or ""),
        image_type=_image_type(header),
        description=str(header.get("SeriesDescription", "") or ""),
        study_uid=str(header.get("StudyInstanceUID", "") or ""),
        rows=int(header.Rows),
        columns=int(header.get("Columns", 0) or 0),
        pixel_spacing=(spacing[0], spacing[1]) if spacing and len(spacing) == 2 and min(spacing) > 0 else None,
        thickness=_float(header.get("SliceThickness")),
        header=header,
        files=list(files or []),
    )


def _slice_file(path: Path, header) -> SliceFile:
    position = _floats(header.get("ImagePositionPatient"))
    orientation = _floats(header.get("ImageOrientationPatient"))
    return SliceFile(
        path=path,
        position=tuple(position) if position and len(position) == 3 else None,
        orientation=tuple(orientation) if orientation and len(orientation) == 6 else None,
        instance=_int(header.get("InstanceNumber")),
        rows=int(header.get("Rows", 0) or 0),
        columns=int(header.get("Columns", 0) or 0),
        frames=_int(header.get("NumberOfFrames")) or 1,
        thickness=_float(header.get("SliceThickness")),
        image_type=_image_type(header),
        short_by=_bytes_missing(path, header),
    )


#: transfer syntaxes whose pixel data has a known size (uncompressed); compressed files are not measured
_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def _bytes_missing(path: Path, header) -> int:
    """How many bytes an uncompressed file lacks of its pixel data alone (a lower bound on the cut: the header's
    bytes come on top), so that `ctmri series` and the series rule see a file cut short in copying as the reader
    does; 0 when it is long enough, compressed, or the tags to tell are missing."""
    meta = getattr(header, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    bits = _int(header.get("BitsAllocated"))
    if syntax not in _UNCOMPRESSED or not bits:
        return 0
    needed = (int(header.get("Rows", 0) or 0) * int(header.get("Columns", 0) or 0) * (bits // 8)
              * (_int(header.get("SamplesPerPixel")) or 1) * (_int(header.get("NumberOfFrames")) or 1))
    try:
        return max(0, needed - path.stat().st_size)
    except OSError:
        return 0


def multi_values(value) -> list:
    """A DICOM element's value as a list: its values when it has several, else [value] ([] for None)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


def _float(value) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _floats(value) -> Optional[List[float]]:
    numbers = [_float(v) for v in multi_values(value)]
    return numbers if numbers and all(n is not None for n in numbers) else None


def _int(value) -> Optional[int]:
    number = _float(value)
    return int(number) if number is not None else None


# ---------------------------------------------------------------------------------------- geometry


def _damage_problem(files: List[SliceFile]) -> str:
    damaged = [f for f in files if f.damage]
    return (f"{len(damaged)} of its {len(files)} files are damaged, e.g. {damaged[0].path.name} ({damaged[0].damage}); "
            "copy the series again")


def _valid_orientation(orientation: Sequence[float]) -> bool:
    """Two unit directions at right angles (to the rounding headers use); all zeros or parallel ones are not."""
    row, col = np.array(orientation[:3], dtype=float), np.array(orientation[3:], dtype=float)
    return (bool(np.isfinite(orientation).all()) and abs(np.linalg.norm(row) - 1) < 0.01
            and abs(np.linalg.norm(col) - 1) < 0.01 and abs(float(np.dot(row, col))) < 0.01)


#: at most this many images in another orientation than the rest are named, so that the user can leave them out
_STRAYS_NAMED = 3


def _strays(files: Sequence, orientations: list, plane: str) -> str:
    """When a few images lie in another orientation than all the others (a reformat series with its reference image,
    as scanners write them), which they are and how to read the rest: ``""`` otherwise."""
    usual = _most_common(orientations)
    strays = [f.path.name for f, o in zip(files, orientations) if o != usual]
    if len(strays) > _STRAYS_NAMED or len(strays) * 2 >= len(files):
        return ""
    return (f"; the {len(strays)} image{'s' if len(strays) > 1 else ''} in another orientation: {', '.join(strays)}. To "
            f"read the other {len(files) - len(strays)} ({plane}) as a volume, copy them into a folder of their own "
            f"without {'them' if len(strays) > 1 else 'it'} and give that folder")


def _analyse(series: Series) -> None:
    """Fill plane, sorted files, steps, uniformity, shear and (if any) the reason it cannot be read."""
    files = series.files
    if any(f.damage for f in files):
        series.problem = _damage_problem(files)
        series.notes.append("damaged files")
        return
    if "LOCALIZER" in series.image_type:
        series.plane = "localizer"
        series.problem = "it is a localizer (scout), not a volume"
        series.notes.append("scout: not a volume")
        return
    if any(f.frames > 1 for f in files):
        series.problem = (
            "it is a multi-frame (enhanced) DICOM, which ctmri does not read; convert it to NIfTI (e.g. with "
            "dcm2niix) and give the .nii.gz"
        )
        series.notes.append("multi-frame")
        return
    if any(f.position is None or f.orientation is None for f in files) or series.pixel_spacing is None:
        series.problem = "its images lack position, orientation or pixel spacing tags, so their geometry is unknown"
        series.notes.append("no geometry tags")
        return
    bad = next((f for f in files if not _valid_orientation(f.orientation)), None)
    if bad is not None:
        series.problem = (f"the ImageOrientationPatient of its images is not two perpendicular unit directions (e.g. "
                          f"{bad.path.name}: {', '.join(f'{v:g}' for v in bad.orientation)}), so their geometry is unknown")
        series.notes.append("bad orientation tags")
        return
    orientations = [_rounded(f.orientation) for f in files]
    if len(set(orientations)) > 1:
        planes = [_plane_name(_axes(o)[2]) for o in orientations]
        series.plane = _most_common(planes)
        counts = ", ".join(f"{planes.count(p)} {p}" for p in sorted(set(planes), key=planes.count, reverse=True))
        series.problem = (
            f"its images lie in different orientations ({counts}: a localizer or several stacks in one series)"
            + _strays(files, orientations, series.plane)
        )
        series.notes.append(f"mixed orientations ({counts})")
        return
    if len({(f.rows, f.columns) for f in files}) > 1:
        series.problem = "its images have different sizes"
        series.notes.append("mixed image sizes")
        return
    short = [f for f in files if f.short_by > 0]
    if short:
        series.problem = (f"{len(short)} of its files are cut short, e.g. {short[0].path.name} lacks at least "
                          f"{short[0].short_by} bytes of its pixels (copy the series again completely)")
        series.notes.append("files cut short")
        return
    row, col, normal = _axes(files[0].orientation)
    series.plane = _plane_name(normal)
    files.sort(key=lambda f: float(np.dot(f.position, normal)))
    series.steps = [float(v) for v in np.diff([np.dot(f.position, normal) for f in files])]
    if series.steps and min(series.steps) < SAME_POSITION_MM:
        same = sum(1 for s in series.steps if s < SAME_POSITION_MM) + 1
        series.problem = (
            f"{same} of its images share a slice position (several acquisitions, echoes or phases in one series)"
        )
        series.notes.append("repeated positions")
        return
    series.uniform = _is_uniform(series.steps)
    if series.uniform:  # the regular grid's step (not any one rounded step)
        series.spacing = _fitted_step(series.steps)
    if not series.uniform and len(series.steps) > 1:
        missing = _missing_slices(series, files)
        if missing:
            series.problem = missing
            series.notes.append("missing slices")
            return
        series.notes.append(f"non-uniform steps {min(series.steps):.3g}-{max(series.steps):.3g} mm")
    _find_shear(series, row, col, normal)
    if series.needs_resampling:
        series.notes.append("resampled on reading")


def _find_shear(series: Series, row: np.ndarray, col: np.ndarray, normal: np.ndarray) -> None:
    """Mark a stack whose slice origins drift in-plane (gantry tilt) and measure the tilt angle."""
    files = series.files
    offsets = _inplane_offsets(series, row, col)
    if len(files) < 2 or float(np.abs(offsets - offsets[0]).max()) <= SHEAR_TOLERANCE_PIXELS:
        return
    series.sheared = True
    span = np.array(files[-1].position) - np.array(files[0].position)
    along = float(np.dot(span, normal))
    across = float(np.linalg.norm(span - along * normal))
    series.shear_degrees = math.degrees(math.atan2(across, along))
    series.notes.append(f"gantry tilt/shear {series.shear_degrees:.1f}°")


def _rounded(orientation: Sequence[float]) -> tuple:
    return tuple(round(v, 3) for v in orientation)


def _axes(orientation: Sequence[float]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column directions (made orthonormal: headers round them) and the slice normal."""
    row = np.array(orientation[:3], dtype=float)
    col = np.array(orientation[3:], dtype=float)
    row /= np.linalg.norm(row)
    col -= np.dot(col, row) * row
    col /= np.linalg.norm(col)
    return row, col, np.cross(row, col)


def _plane_name(normal: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(normal)))
    angle = math.degrees(math.acos(min(1.0, abs(float(normal[axis])))))
    if angle > OBLIQUE_DEGREES:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _tolerance(step: float) -> float:
    return max(POSITION_TOLERANCE_MM, POSITION_TOLERANCE_FRACTION * step)


def _fitted_step(steps: Sequence[float]) -> float:
    """The regular grid's step: first to last slice over the slice count (rounding errors averaged out)."""
    return float(sum(steps) / len(steps))


def _is_uniform(steps: Sequence[float]) -> bool:
    """Every slice within the tolerance of the best-fitting regular grid."""
    if not steps:
        return False
    depths = np.concatenate([[0.0], np.cumsum(steps)])
    index = np.arange(len(depths))
    slope, offset = np.polyfit(index, depths, 1)
    return float(np.abs(depths - (offset + slope * index)).max()) <= _tolerance(float(slope))


def _missing_slices(series: Series, files: List[SliceFile]) -> Optional[str]:
    """A message when the stack has holes where slices were lost, else None.

    A step that is a whole multiple (≥ 2) of the usual one is a lost slice when the instance numbers
    skip there too (files went missing), or, without usable instance numbers, when the steps on both
    sides are the usual one. A series that changes its spacing on purpose (numbers consecutive) is not.
    """
    median = float(np.median(series.steps))
    numbers = [f.instance for f in files]
    numbered = None not in numbers and len(set(numbers)) == len(numbers) and _monotonic(numbers)
    holes = []
    for i, step in enumerate(series.steps):
        ratio = step / median
        if ratio < 1.5 or abs(ratio - round(ratio)) > 0.25:  # loose: rounded positions make steps uneven
            continue
        if numbered:
            lost = abs(numbers[i + 1] - numbers[i]) > 1
        else:
            near = [series.steps[j] for j in (i - 1, i + 1) if 0 <= j < len(series.steps)]
            lost = all(abs(s - median) <= _tolerance(median) for s in near)
        if lost:
            holes.append((i, int(round(ratio)) - 1))
    if not holes:
        return None
    count = sum(n for _, n in holes)
    where = ", ".join(
        f"between {_depth(series, files[i]):.2f} and {_depth(series, files[i + 1]):.2f} mm" for i, _ in holes[:3]
    )
    return (
        f"{count} slice{'s' if count > 1 else ''} missing ({where}; the other slices are {median:g} mm apart)"
    )


def _monotonic(numbers: List[int]) -> bool:
    diffs = np.diff(numbers)
    return bool(np.all(diffs > 0) or np.all(diffs < 0))


def _depth(series: Series, file: SliceFile) -> float:
    return float(np.dot(file.position, _axes(file.orientation)[2]))


def _inplane_offsets(series: Series, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Each slice's origin in pixels along (row, column) directions: equal for a straight stack."""
    dy, dx = series.pixel_spacing
    positions = np.array([f.position for f in series.files])
    return np.stack([positions @ row / dx, positions @ col / dy], axis=1)


# ------------------------------------------------------------------------------------------ choice


@dataclass
class Choice:
    """The series taken for an input and why."""

    series: Series
    reason: str
    folder: Path
    others: List[Series] = field(default_factory=list)

    def message(self, what: str) -> str:
        """The line printed for the user."""
        s = self.series
        text = f"{what}: DICOM {s.label()} ({s.short()}) — {self.reason}"
        if s.needs_resampling:
            text += f"; {', '.join(n for n in s.notes if n != 'resampled on reading')}: resampled onto a regular grid"
        return text

    def provenance(self) -> dict:
        """What ``metrics.json`` records under ``ct_series`` / ``mri_series``."""
        s = self.series
        return {
            "number": s.number,
            "uid": s.uid,
            "description": s.description,
            "modality": s.modality,
            "image_type": "\\".join(s.image_type),
            "slices": s.slices,
            "reason": self.reason,
            "resampled": ", ".join(n for n in s.notes if n != "resampled on reading") if s.needs_resampling else None,
            "folder": str(self.folder),
        }


def choose_series(
    series: List[Series], what: str, requested: Optional[str] = None, folder: str | Path = ".",
    option: Optional[str] = None,
) -> Choice:
    """The series to read for ``what`` ('CT' or 'MRI'): ``requested`` (number or UID) or by the rule.
    ``option`` names, in the messages, what the user sets to choose one (default: ``FLAG_OF[what]``).

    The rule: modality CT (MR for the MRI), ImageType ORIGINAL\\PRIMARY, axial, uniformly spaced and
    readable; among those the thinnest slices, ties → more slices. Localizers and reformats never.
    A folder holding a single series gives that series (as before), unless it cannot be read.
    """
    folder = Path(folder)
    if requested is not None and str(requested).strip():
        return _requested(series, what, str(requested).strip(), folder, option)
    if len(series) == 1:
        only = series[0]
        _check_readable(only, what, folder, option)
        _check_not_the_other_modality(only, what, folder, option)
        return Choice(only, "the only series in the folder", folder)
    modality = MODALITY_OF.get(what, what)
    rejected = {s.uid: _rejection(s, modality) for s in series}
    candidates = [s for s in series if rejected[s.uid] is None]
    other = {"CT": "MR", "MR": "CT"}.get(modality)
    if other is not None and all(s.modality == other for s in series):  # choosing one of them would be refused too
        raise CTMRIError(
            f"{what} folder {folder} holds only {other} series ({len(series)}, Modality {other}), no {modality}: "
            f"give the {what}'s own folder (see `ctmri series {folder}`)"
        )
    if not candidates:
        raise CTMRIError(
            f"{what} folder {folder} holds {len(series)} DICOM series and none is an original axial {modality} "
            f"series with uniform spacing ({_listing(series, rejected)}); choose one with "
            f"{_choose_with(what, option)} (see `ctmri series {folder}`)"
        )
    studies = {s.study_uid for s in candidates}
    if len(studies) > 1:
        raise CTMRIError(
            f"{what} folder {folder} holds {modality} series of {len(studies)} different studies; give one "
            f"study's folder, or choose a series with {_choose_with(what, option)} "
            f"(see `ctmri series {folder}`)"
        )
    candidates.sort(key=lambda s: (round(s.effective_thickness or 1e9, 3), -s.slices, s.number or 0))
    best = candidates[0]
    for s in candidates[1:]:
        if round(s.effective_thickness or 1e9, 3) > round(best.effective_thickness or 1e9, 3):
            rejected[s.uid] = f"thicker slices ({s.effective_thickness:g} mm)"
        else:
            rejected[s.uid] = f"fewer slices ({s.slices})"
    others = [s for s in series if s is not best]
    reason = f"the thinnest uniformly spaced ORIGINAL/PRIMARY axial {modality} series"
    if others:
        reason += f"; not taken: {_listing(others, rejected)}"
    return Choice(best, reason, folder, others)


def _rejection(series: Series, modality: str) -> Optional[str]:
    """Why the rule does not take this series (None: it is a candidate)."""
    if any(f.damage for f in series.files):
        return "damaged files"
    if series.is_localizer:
        return "localizer"
    if series.is_reformat:
        return "reformat"
    if series.modality != modality:
        return f"modality {series.modality or 'unknown'}"
    if not series.is_original_primary:
        return f"not ORIGINAL/PRIMARY ({'/'.join(series.image_type[:2]) or 'no ImageType'})"
    if series.plane != "axial":
        return series.plane
    if series.problem is not None:
        return "cannot be read as one volume"
    if not series.uniform:
        return "non-uniform slice spacing" if len(series.steps) > 1 else "a single slice"
    return None


def _listing(series: List[Series], why: Dict[str, Optional[str]]) -> str:
    return ", ".join(f"{s.number if s.number is not None else s.uid} ({why.get(s.uid) or s.short()})" for s in series)


def _requested(series: List[Series], what: str, requested: str, folder: Path, option: Optional[str]) -> Choice:
    matches = [s for s in series if s.uid == requested]
    if not matches and requested.lstrip("+-").isdigit():
        matches = [s for s in series if s.number == int(requested)]
    flag = _option(what, option, "--ct-series")
    if not matches:
        there = ", ".join(
            f"{s.number if s.number is not None else '-'} ({s.modality} {s.plane}, {s.slices} slices, {s.uid})"
            for s in series
        )
        raise CTMRIError(  # the advice before the listing, which can be long (a summary line keeps its start)
            f"{what} series {requested} is not in {folder}; give to {flag} one of the numbers or UIDs it holds: "
            f"{there}"
        )
    if len(matches) > 1:
        uids = ", ".join(s.uid for s in matches)
        raise CTMRIError(
            f"series number {requested} names {len(matches)} series in {folder} ({uids}); give the "
            f"SeriesInstanceUID to {flag} instead"
        )
    chosen = matches[0]
    _check_readable(chosen, what, folder, option)
    _check_not_the_other_modality(chosen, what, folder, option)
    how = f"{flag} {requested}" if _is_flag(flag) else f"{flag} ({requested})"
    return Choice(chosen, f"chosen with {how}", folder, [s for s in series if s is not chosen])


def _check_not_the_other_modality(series: Series, what: str, folder: Path, option: Optional[str] = None) -> None:
    """A CT series given as the MRI, or an MR series as the CT (its Modality says so): refused before any work,
    rather than run in full for a 'looks swapped' warning at the end. Other modalities are left to the user."""
    other = {"CT": "MR", "MR": "CT"}.get(MODALITY_OF.get(what, ""))
    if other is not None and series.modality == other:
        kind = "an MR" if other == "MR" else "a CT"
        raise CTMRIError(
            f"the {what} DICOM {series.label()} in {folder} is {kind} series (Modality {other}); give the {what}: "
            f"another folder, or another series with {_choose_with(what, option)} (see `ctmri series {folder}`)"
        )


def _check_readable(series: Series, what: str, folder: Path, option: Optional[str] = None) -> None:
    if series.problem is not None:
        raise CTMRIError(
            f"cannot read {what} DICOM {series.label()} in {folder}: {series.problem}; "
            f"{'copy the series again completely, or ' if 'missing' in series.problem else ''}"
            f"choose another series with {_choose_with(what, option)} (see `ctmri series {folder}`)"
        )


# ----------------------------------------------------------------------------------------- reading


def read_series(series: Series, what: str = "image") -> sitk.Image:
    """The series as a 3D image with its physical geometry, on a regular grid.

    A straight, uniformly spaced stack is returned as stored (no interpolation). A sheared stack
    (gantry tilt) or non-uniform spacing is resampled (linear) onto a regular grid in the slices' own
    orientation: in-plane it covers every slice, along the normal it steps by the smallest spacing.
    """
    if series.problem is not None:
        raise CTMRIError(f"cannot read {what} DICOM {series.label()}: {series.problem}")
    planes = _read_pixels(series, what)
    row, col, normal = _axes(series.files[0].orientation)
    dy, dx = series.pixel_spacing
    if series.needs_resampling:
        return _regularise(series, planes, row, col, normal)
    array = np.stack(planes)
    image = sitk.GetImageFromArray(array)
    step = series.spacing or series.effective_thickness or 1.0
    image.SetSpacing((float(dx), float(dy), float(step)))
    image.SetOrigin(tuple(float(v) for v in series.files[0].position))
    image.SetDirection(tuple(float(v) for v in np.stack([row, col, normal], axis=1).ravel()))
    return image


def _read_pixels(series: Series, what: str) -> List[np.ndarray]:
    """Each file's (rows, columns) pixels, rescaled (GDCM applies slope/intercept), in stack order."""
    planes = []
    reader = sitk.ImageFileReader()
    for file in series.files:
        reader.SetFileName(str(file.path))
        try:
            array = sitk.GetArrayFromImage(reader.Execute())
        except RuntimeError as exc:
            raise CTMRIError(
                f"cannot read {what} DICOM file {file.path}: {str(exc).strip().splitlines()[-1]}; copy the series again"
            ) from exc
        array = np.squeeze(array)
        if array.shape != (series.rows, series.columns):
            raise CTMRIError(
                f"cannot read {what} DICOM {series.label()}: {file.path.name} holds {array.shape} pixels where the "
                f"series has {series.rows}×{series.columns} (colour or mixed sizes); choose another series"
            )
        planes.append(array)
    dtypes = {p.dtype for p in planes}
    if len(dtypes) > 1:  # e.g. one slice rescaled to float: keep every value exactly
        planes = [p.astype(np.float32) for p in planes]
    return planes


def _regularise(series: Series, planes: List[np.ndarray], row, col, normal) -> sitk.Image:
    """Resample slices lying on parallel planes (sheared and/or unevenly spaced) onto a regular grid.

    Every output plane lies between two input planes; each is sampled (bilinearly) at the output's
    in-plane points and the two are blended linearly by distance. An output plane that coincides
    with an input plane reproduces it exactly (up to the in-plane shift).
    """
    dy, dx = series.pixel_spacing
    positions = np.array([f.position for f in series.files], dtype=float)
    depth = positions @ normal
    u, v = positions @ row, positions @ col
    step = float(min(series.steps))
    count = int(math.floor((depth[-1] - depth[0]) / step + 1e-3)) + 1
    i0, j0 = math.floor((u.min() - u[0]) / dx + 1e-6), math.floor((v.min() - v[0]) / dy + 1e-6)
    i1, j1 = math.ceil((u.max() - u[0]) / dx - 1e-6), math.ceil((v.max() - v[0]) / dy - 1e-6)
    size = (series.columns + i1 - i0, series.rows + j1 - j0)
    plane_origin = (u[0] + i0 * dx, v[0] + j0 * dy)
    pad = float(min(float(p.min()) for p in planes))
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing((dx, dy))
    grid.SetOrigin(plane_origin)
    cache: Dict[int, np.ndarray] = {}

    def shifted(k: int) -> np.ndarray:
        if k not in cache:
            if len(cache) > 2:  # the walk only ever needs the two planes around the current depth
                cache.clear()
            cache[k] = _place(planes[k], (u[k] - plane_origin[0]) / dx, (v[k] - plane_origin[1]) / dy, grid, pad)
        return cache[k]

    out = np.empty((count, size[1], size[0]), dtype=np.float32)
    for k in range(count):
        z = depth[0] + k * step
        below = int(np.clip(np.searchsorted(depth, z + 1e-6, side="right") - 1, 0, len(depth) - 2))
        w = float(np.clip((z - depth[below]) / (depth[below + 1] - depth[below]), 0.0, 1.0))
        out[k] = shifted(below) if w < 1e-6 else (1 - w) * shifted(below) + w * shifted(below + 1)
    image = sitk.GetImageFromArray(out)
    image.SetSpacing((float(dx), float(dy), step))
    origin = plane_origin[0] * row + plane_origin[1] * col + depth[0] * normal
    image.SetOrigin(tuple(float(c) for c in origin))
    image.SetDirection(tuple(float(c) for c in np.stack([row, col, normal], axis=1).ravel()))
    return image


def _place(plane: np.ndarray, di: float, dj: float, grid: sitk.Image, pad: float) -> np.ndarray:
    """``plane`` put on ``grid`` (2D) at an offset of (di, dj) pixels: copied when the offset is whole
    (no interpolation, exact values), else resampled bilinearly."""
    if abs(di - round(di)) < 1e-6 and abs(dj - round(dj)) < 1e-6:
        out = np.full(grid.GetSize()[::-1], pad, dtype=np.float32)
        i, j = int(round(di)), int(round(dj))
        out[j : j + plane.shape[0], i : i + plane.shape[1]] = plane
        return out
    image = sitk.GetImageFromArray(plane.astype(np.float32))
    image.SetSpacing(grid.GetSpacing())
    image.SetOrigin((grid.GetOrigin()[0] + di * grid.GetSpacing()[0], grid.GetOrigin()[1] + dj * grid.GetSpacing()[1]))
    return sitk.GetArrayFromImage(sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, pad))


def read_input(path: str | Path, what: str, requested: Optional[str] = None,
               picture_spacing: Optional[Sequence[float]] = None,
               option: Optional[str] = None) -> Tuple[sitk.Image, Optional[object]]:
    """An input volume: a DICOM folder through the chooser, a folder of 2D pictures through :mod:`pictures`
    (``picture_spacing``: (in-plane, between slices) mm, else assumed), anything else through
    ``volumes.read_volume``. ``requested`` chooses a DICOM series; ``option`` is what the user sets to give it,
    as messages name it (default: the command-line option, ``FLAG_OF[what]``).

    Returns the image and where it came from: the :class:`Choice` for a DICOM folder, the
    :class:`pictures.PictureStack` for pictures, None for a file. Both records have ``message(what)`` and
    ``provenance()``.
    """
    from .volumes import as_scalar_3d, read_volume

    path = Path(path)
    if path.is_dir():
        series = list_series(path, what, empty_ok=True)
        if not series:
            return _read_picture_folder(path, what, requested, picture_spacing, option)
        choice = choose_series(series, what, requested, path, option)
        return as_scalar_3d(read_series(choice.series, what), f"{what} {path.name}"), choice
    if requested is not None and str(requested).strip():
        raise CTMRIError(
            f"{_option(what, option, '--ct-series')} chooses a series in a DICOM folder, but the {what} {path} is a "
            f"file; give the DICOM folder, or {_leave_out(what, option)}"
        )
    _check_lone_dicom_file(path, what)
    return read_volume(path, what), None


#: the SOP class of a DICOMDIR (Media Storage Directory Storage)
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


def _is_dicomdir(path: Path) -> bool:
    """Whether a file is a DICOMDIR: named so (the standard's file name) or of its SOP class."""
    if not path.is_file():
        return False
    if path.name.upper() == "DICOMDIR":
        return True
    try:
        meta = _dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
    except Exception:  # noqa: BLE001 - not DICOM at all: the volume reader decides
        return False
    return str(getattr(meta, "MediaStorageSOPClassUID", "")) == _DICOMDIR_CLASS


def _dicomdir_message(path: Path, what: str) -> str:
    given = path if what == "DICOM" else f"the {what} {path}"  # `ctmri series` reads "DICOM", not a CT or an MRI
    return (f"{given} is a DICOMDIR, the index of a DICOM study, not an image; give its folder "
            f"{path.parent} instead (`ctmri series {path.parent}` lists the series in it)")


def _check_lone_dicom_file(path: Path, what: str) -> None:
    """Refuse one DICOM file given for a volume when it is a localizer, or one slice of a series whose other
    slices lie beside it: read alone it would be synthesized as a single slice, with no word about the rest."""
    if _is_dicomdir(path):  # what a clinician picks first on a CD or a PACS export; it holds no image
        raise CTMRIError(_dicomdir_message(path, what))
    header = _read_header(path) if path.is_file() else None
    if header is None or isinstance(header, _Unreadable):
        return  # not a DICOM image: the volume reader decides
    if "LOCALIZER" in _image_type(header):
        raise CTMRIError(f"the {what} {path} is a localizer (scout) image, not a slice of a volume; give the folder "
                         f"of the study instead (see `ctmri series {path.parent}`)")
    uid = str(header.get("SeriesInstanceUID", ""))
    siblings = sum(1 for other in path.parent.iterdir() if other != path and other.is_file()
                   and _series_uid_of(other) == uid)
    if siblings:
        number = header.get("SeriesNumber")
        raise CTMRIError(
            f"the {what} {path.name} is one slice of a DICOM series of {siblings + 1} files"
            f"{f' (series {number})' if number is not None else ''} in {path.parent}; give that folder to read the "
            f"whole series (`ctmri series {path.parent}` lists what it holds), or, for this slice alone, copy it into "
            "a folder of its own and give that")


def _series_uid_of(path: Path) -> Optional[str]:
    """A file's SeriesInstanceUID, read without the rest of its header; None when it is not DICOM."""
    try:
        return str(_dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                   .get("SeriesInstanceUID", ""))
    except Exception:  # noqa: BLE001 - any file that is not readable DICOM is simply not a sibling
        return None


def about_source(source: Optional[object], what: str) -> Tuple[str, dict, List[str]]:
    """What a run records of an input that :func:`read_input` read from a folder: its kind (``"series"`` or
    ``"pictures"``), its provenance, and the warnings its user must see (pictures: the spacing assumed, numbers
    missing). ``source`` is the record :func:`read_input` returned (None for a file: nothing to record)."""
    from .pictures import PictureStack

    if source is None:
        return "", {}, []
    pictures = isinstance(source, PictureStack)
    return ("pictures" if pictures else "series"), source.provenance(), (source.warnings(what) if pictures else [])


def picture_spacing_unused(picture_spacing: Optional[Sequence[float]], sources: Sequence[Optional[object]],
                           option: str = "--picture-spacing", why: str = "no input is a folder of pictures") -> List[str]:
    """The warning for a spacing ``option`` given when none of ``sources`` is a folder of pictures (else none)."""
    from .pictures import PictureStack

    if picture_spacing and not any(isinstance(s, PictureStack) for s in sources):
        return [f"{option} was given, but {why}: it was not used"]
    return []


def _read_picture_folder(path: Path, what: str, requested: Optional[str], spacing, option: Optional[str]):
    from .pictures import picture_files, read_pictures
    from .volumes import no_dicom_error

    if not picture_files(path):
        raise no_dicom_error(path, what)
    if requested is not None and str(requested).strip():
        raise CTMRIError(f"{_option(what, option, '--ct-series')} chooses a DICOM series, but the {what} folder {path} "
                         f"holds pictures, not DICOM; {_leave_out(what, option)}")
    return read_pictures(path, what, spacing)  # already one grey component per voxel, 3D, not empty


# -------------------------------------------------------------------------------------------- table


def format_table(series: List[Series]) -> str:
    """A readable table of the series, grouped by study."""
    header = ("series", "modality", "image type", "description", "plane", "slices", "in-plane mm",
              "step mm", "thick mm", "uniform", "notes", "SeriesInstanceUID")
    lines = []
    studies: Dict[str, List[Series]] = {}
    for s in series:
        studies.setdefault(s.study_uid, []).append(s)
    for study_uid, members in studies.items():
        first = members[0].header
        lines.append(
            f"study {study_uid or '(no StudyInstanceUID)'}  patient {first.get('PatientID', '') or '-'}  "
            f"date {first.get('StudyDate', '') or '-'}  ({len(members)} series)"
        )
        rows = [header] + [_row(s) for s in members]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for r in rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _row(s: Series) -> tuple:
    in_plane = f"{s.pixel_spacing[1]:.3g}×{s.pixel_spacing[0]:.3g}" if s.pixel_spacing else "-"
    step = "-" if not s.steps else (f"{s.step:.3g}" if s.uniform else f"{min(s.steps):.3g}-{max(s.steps):.3g}")
    uniform = "-" if not s.steps else ("yes" if s.uniform else "no")
    notes = "; ".join(s.notes) or ("" if s.problem is None else s.problem)
    return (
        str(s.number) if s.number is not None else "-", s.modality or "-", "\\".join(s.image_type) or "-",
        s.description or "-", s.plane, str(s.slices), in_plane, step,
        f"{s.thickness:.3g}" if s.thickness else "-", uniform, notes or "-", s.uid,
    )


def describe_folder(folder: str | Path) -> str:
    """``ctmri series DIR``: the table, then which series --ct / --mri would take and why; for a folder of
    pictures and no DICOM, how they would be stacked (:func:`pictures.describe_pictures`)."""
    folder = Path(folder)
    series = list_series(folder, "DICOM", empty_ok=True)
    if not series:
        from .pictures import describe_pictures, picture_files
        from .volumes import no_dicom_error

        if picture_files(folder):
            return describe_pictures(folder)
        raise no_dicom_error(folder, "DICOM")
    lines = [format_table(series)]
    for what, option in (("CT", "--ct"), ("MRI", "--mri")):  # synthesize's inputs
        if not any(s.modality == MODALITY_OF[what] for s in series):
            continue
        try:
            choice = choose_series(series, what, None, folder)
        except CTMRIError as exc:
            lines.append(f"{option} {folder} would stop: {exc}")
            continue
        lines.append(f"{option} {folder} takes {choice.series.label()} ({choice.series.short()}): {choice.reason}")
    return "\n".join(lines).rstrip() + "\n"


def patient_mismatch(ct_source, mri_source) -> Optional[str]:
    """Why a CT and an MRI read from DICOM look like two patients' (PatientID, PatientName or PatientBirthDate
    differing where both headers record it); None when they agree, or either is not DICOM."""
    if not isinstance(ct_source, Choice) or not isinstance(mri_source, Choice):
        return None
    for keyword in ("PatientID", "PatientName", "PatientBirthDate"):
        ct_value, mri_value = (" ".join(str(s.series.header.get(keyword, "") or "").replace("^", " ").upper().split())
                               for s in (ct_source, mri_source))
        if ct_value and mri_value and ct_value != mri_value:
            return f"the CT's and the MRI's DICOM headers name two patients (their {keyword} differs)"
    return None
