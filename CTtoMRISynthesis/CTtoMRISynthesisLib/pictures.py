"""A folder of 2D pictures (exported PNG/JPEG/TIFF slices) read as one volume.

Slices exported from a viewer, or a 2D dataset's one-patient folder (``CT (1).png`` … ``CT (24).png``), record
neither where each slice lies nor how far apart the pixels and slices are. This module stacks them in the
order of the numbers in their names (``CT (2).png`` before ``CT (10).png``) and gives the stack a spacing: the
one the user states (``--picture-spacing IN_PLANE SLICE``) or, failing that, 1 mm, said in a warning and
recorded (``ct_pictures`` / ``mri_pictures`` in ``metrics.json``), as Slicer does when it loads such a series.

The synthetic MRI does not depend on that spacing (the model grid is fitted to the field of view,
``geometry.model_grid``); its physical size and a registration to an MRI do, so registering a stack whose
spacing was assumed is refused (:func:`check_registration`). Each picture is read as ``ctmri synthesize`` reads
one: a grey image saved as RGB(A) is its grey, real colour is refused naming the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import CTMRIError
from .volumes import PICTURE_SUFFIXES, as_grey

#: Spacing given to a stack whose real spacing was not stated (mm, in-plane and between slices), as Slicer's
#: and ITK's readers do for pictures.
ASSUMED_SPACING_MM = 1.0


def number_key(path: Path) -> tuple:
    """Natural order of slice files: ``CT (2).png`` before ``CT (10).png``; names without numbers by name."""
    return tuple(int(n) for n in re.findall(r"\d+", path.stem)), path.name


def picture_files(folder: str | Path) -> List[Path]:
    """The 2D pictures directly in ``folder``, in natural order (sub-folders are not searched)."""
    folder = Path(folder)
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICTURE_SUFFIXES), key=number_key)


@dataclass
class PictureStack:
    """Where a picture-stack volume came from and what was assumed; printed and recorded like a DICOM choice."""

    folder: Path
    files: List[str]
    spacing: Tuple[float, float]  # (in-plane mm, between slices mm)
    spacing_given: bool
    gaps: List[int] = field(default_factory=list)  # the first slice numbers missing from the run (at most 8)
    missing: int = 0  # how many numbers the run misses in all

    def message(self, what: str) -> str:
        """The line printed for the user."""
        first, last = self.files[0], self.files[-1]
        names = f"{first} … {last}" if len(self.files) > 1 else first
        how = "given" if self.spacing_given else "assumed"
        return (f"{what}: {len(self.files)} pictures from {self.folder} stacked in the order of the numbers in their "
                f"names ({names}); spacing {self.spacing[0]:g} mm in-plane, {self.spacing[1]:g} mm between slices "
                f"({how})")

    def warnings(self, what: str) -> List[str]:
        """What the user must know about the outputs (recorded with the run's other warnings)."""
        out = []
        if not self.spacing_given:
            out.append(f"the {what} pictures record no spacing: {ASSUMED_SPACING_MM:g} mm was assumed, so the "
                       "physical sizes read from them (and written into outputs made from them) are not the patient's (give "
                       "--picture-spacing IN_PLANE SLICE)")
        return out + self.order_warnings(what)

    def order_warnings(self, what: str) -> List[str]:
        """What the file numbers say about the stack: several scans in one folder, or slices missing."""
        out = []
        if self.missing > len(self.files):
            out.append(f"the {what} pictures' numbers run from {self.first_last[0]} to {self.first_last[1]} with only "
                       f"{len(self.files)} files: the folder may hold more than one scan, stacked as one (give one "
                       "folder per scan)")
        elif self.gaps:
            more = f" and {self.missing - len(self.gaps)} more" if self.missing > len(self.gaps) else ""
            out.append(f"the {what} pictures' numbers skip {', '.join(map(str, self.gaps))}{more}: slices missing from the folder "
                       "are missing from the volume, and the slices on either side are stacked as neighbours")
        return out

    @property
    def first_last(self) -> Tuple[int, int]:
        """The last number in the first and the last file name (the run the gaps are counted in)."""
        keys = [number_key(Path(name))[0] for name in (self.files[0], self.files[-1])]
        return keys[0][-1] if keys[0] else 0, keys[1][-1] if keys[1] else 0

    def provenance(self) -> dict:
        """What ``metrics.json`` records under ``ct_pictures`` / ``mri_pictures``."""
        return {
            "folder": str(self.folder),
            "files": len(self.files),
            "first": self.files[0],
            "last": self.files[-1],
            "order": "numbers in the file names",
            "spacing_mm": {"in_plane": self.spacing[0], "between_slices": self.spacing[1]},
            "spacing_assumed": not self.spacing_given,
            "missing_numbers": self.missing,
        }


def _missing_numbers(files: Sequence[Path], shown: int = 8) -> Tuple[List[int], int]:
    """The first ``shown`` numbers absent from the run, and how many are absent, when every name carries the same
    count of numbers and only the last varies (else none). Counted, not listed: names may carry huge numbers."""
    keys = [number_key(p)[0] for p in files]
    if not keys or not keys[0] or len({len(k) for k in keys}) != 1 or len({k[:-1] for k in keys}) != 1:
        return [], 0
    present = sorted({k[-1] for k in keys})
    first: List[int] = []
    for low, high in zip(present, present[1:]):
        first.extend(range(low + 1, min(high, low + 1 + shown - len(first))))
    return first[:shown], present[-1] - present[0] + 1 - len(present)


def _check_one_scan(files: Sequence[Path], folder: Path, what: str) -> None:
    """Two files with the same numbers (``CT (1).png`` and ``MR (1).png``, or a .png and a .jpg of one slice)
    mean the folder holds more than one scan, or copies: stacking them would interleave them."""
    unnumbered = [p.name for p in files if not number_key(p)[0]]
    if unnumbered and len(unnumbered) < len(files):  # it was stacked first without a word
        raise CTMRIError(f"{what} folder {folder}: {unnumbered[0]} carries no slice number among files that do, so "
                         "its place in the stack is unknown; number it like the others, or move it out")
    seen: dict = {}
    for path in files:
        key = number_key(path)[0]
        if key and key in seen:
            raise CTMRIError(f"{what} folder {folder}: {seen[key]} and {path.name} carry the same slice number; one "
                             "folder must hold one scan's slices, one file each (move the others out)")
        seen.setdefault(key, path.name)


def check_spacing(spacing: Optional[Sequence[float]], option: str = "--picture-spacing") -> Optional[Tuple[float, float]]:
    """``option`` as (in-plane, between slices) mm; refuses what is not two positive finite numbers."""
    if spacing is None:
        return None
    values = tuple(float(v) for v in spacing)
    if len(values) != 2 or not all(np.isfinite(v) and v > 0 for v in values):
        raise CTMRIError(f"{option} takes two positive numbers, the pixel size and the slice step in mm "
                         f"(e.g. 0.45 5); got {' '.join(str(v) for v in spacing)}")
    return values


def read_picture(path: Path, what: str) -> sitk.Image:
    """One picture as a 2D grey image; refuses colour, multi-page and damaged files naming the file."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise CTMRIError(f"cannot read {what} picture {path}: the file is damaged or not a picture; replace it or "
                         "remove it from the folder") from exc
    image = as_grey(image, f"{what} picture {path.name}")
    if image.GetDimension() == 3 and image.GetSize()[2] == 1:
        image = image[:, :, 0]
    if image.GetDimension() != 2:
        raise CTMRIError(f"{what} picture {path} is not a 2D picture (size {image.GetSize()}); a folder of pictures "
                         "must hold one slice per file")
    return image


def read_pictures(folder: str | Path, what: str = "image",
                  spacing: Optional[Sequence[float]] = None) -> Tuple[sitk.Image, PictureStack]:
    """The pictures of ``folder`` as one 3D volume (slice k = the k-th file in natural order) and its record.

    8-bit pictures stay 8-bit (what tells ``intensity.normalise_ct`` that a CT is display-windowed, not HU).
    The volume's origin is 0 and its axes are the pictures' rows, columns and file order.
    """
    folder = Path(folder)
    files = picture_files(folder)
    if not files:
        raise CTMRIError(f"{what} folder {folder} holds no 2D pictures ({', '.join(PICTURE_SUFFIXES)})")
    given = check_spacing(spacing)
    _check_one_scan(files, folder, what)
    planes = [read_picture(p, what) for p in files]
    sizes = {p.GetSize() for p in planes}
    if len(sizes) != 1:
        odd, other = next((f.name, p) for f, p in zip(files, planes) if p.GetSize() != planes[0].GetSize())
        raise CTMRIError(f"{what} folder {folder}: the pictures differ in size ({files[0].name} "
                         f"{planes[0].GetSize()[0]}×{planes[0].GetSize()[1]}, {odd} "
                         f"{other.GetSize()[0]}×{other.GetSize()[1]}); one folder must hold "
                         "one scan's slices, all the same size")
    types = {p.GetPixelID() for p in planes}
    if len(types) != 1:  # np.stack would widen 8-bit slices to 16 bits: read as Hounsfield units, black
        odd, other = next((f.name, p) for f, p in zip(files, planes) if p.GetPixelID() != planes[0].GetPixelID())
        raise CTMRIError(f"{what} folder {folder}: the pictures differ in bit depth ({files[0].name} "
                         f"{planes[0].GetPixelIDTypeAsString()}, {odd} {other.GetPixelIDTypeAsString()}); one scan's "
                         "slices share one: export "
                         "them again alike, or move the odd ones out")
    image = sitk.GetImageFromArray(np.stack([sitk.GetArrayFromImage(p) for p in planes]))
    in_plane, between = given or (ASSUMED_SPACING_MM, ASSUMED_SPACING_MM)
    image.SetSpacing((in_plane, in_plane, between))
    gaps, missing = _missing_numbers(files)
    record = PictureStack(folder=folder, files=[p.name for p in files], spacing=(in_plane, between),
                          spacing_given=given is not None, gaps=gaps, missing=missing)
    return image, record


def describe_pictures(folder: str | Path) -> str:
    """``ctmri series DIR`` for a folder of pictures: how they would be stacked, their size and depth, and what
    the user should know (the spacing to give, numbers missing, several scans in one folder)."""
    image, stack = read_pictures(folder)
    width, height, slices = image.GetSize()
    depth = "8-bit (a windowed CT or an MRI)" if image.GetPixelID() == sitk.sitkUInt8 else (
        f"{image.GetPixelIDTypeAsString()} (values kept: a CT stored as HU + 1024 takes the Hounsfield path)")
    lines = [f"pictures in {stack.folder}: {slices} files of {width}×{height}, {depth}, no DICOM",
             f"--ct {stack.folder} (or --mri) stacks them as one scan in the order of the numbers in their names: "
             f"{', '.join(stack.files[:3])}{' … ' + stack.files[-1] if slices > 3 else ''}",
             "spacing: pictures record none; give --picture-spacing IN_PLANE SLICE (mm), else "
             f"{ASSUMED_SPACING_MM:g} mm is assumed (enough for synthesis alone; registering to an MRI needs the real one)"]
    lines += [f"note: {w}" for w in stack.order_warnings("folder's")]
    return "\n".join(lines) + "\n"


def check_registration(sources: Sequence[Optional[PictureStack]], registration: str) -> None:
    """Registering to an MRI needs true sizes: refuse when a picture stack's spacing was only assumed. One picture
    is registered in its plane, where the made-up slice step plays no part: as a single picture file is, it is
    registered (a folder holding one picture was refused where the picture itself was taken)."""
    assumed = [s for s in sources if isinstance(s, PictureStack) and not s.spacing_given and len(s.files) > 1]
    if assumed and registration != "none":
        raise CTMRIError(
            f"the pictures in {assumed[0].folder} record no spacing, and registering CT and MRI needs their real "
            "sizes: give --picture-spacing IN_PLANE SLICE (mm), or --registration none if the CT and MRI pictures "
            "are already aligned slice by slice (as in a paired 2D dataset); --registration similarity does not "
            "replace the spacing (its one scale cannot correct a slice step that was made up)"
        )


def check_dicom_output(source: Optional[PictureStack], path: str | Path, what: str, flag: str) -> None:
    """DICOM outputs carry their grid's pixel size, which a viewer measures lengths with: refuse to write them on
    the grid of pictures whose size was only assumed (a folder without ``flag``, or a single picture file, whose
    reader makes up 1 mm too). ``source``, ``path``: the input the outputs lie on (the MRI's, else the CT's)."""
    single = source is None and Path(path).is_file() and Path(path).suffix.lower() in PICTURE_SUFFIXES
    if not single and not (isinstance(source, PictureStack) and not source.spacing_given):
        return
    where = f"the {what} picture {path}" if single else f"the {what} pictures in {source.folder}"
    how = (f"put it in a folder of its own and give {flag} IN_PLANE SLICE (mm)" if single
           else f"give their real size with {flag} IN_PLANE SLICE (mm)")
    raise CTMRIError(
        f"{where} record no pixel size ({ASSUMED_SPACING_MM:g} mm would be assumed), and the DICOM outputs, which lie "
        f"on its grid, would carry that made-up size: a viewer would measure lengths with it. To write DICOM, {how}; "
        "or run without --dicom (the other outputs do not depend on it)")


# ------------------------------------------------------------------------------------------- pictures out

#: ``OUT/pictures/<kind>/``: what ``--pictures`` writes (outputs.OUTPUT_FOLDERS)
PICTURES_FOLDER = "pictures"
#: the output volumes written as pictures, and how each becomes 8 bits, for viewing (the .nrrd files keep the values):
#: the synthetic MRI is on the 0..255 scale already (rounded); the uncertainty, an expected error of at most 127.5
#: grey levels (25-60 in a head), is doubled so that it does not open as a nearly black picture; the signed
#: difference is halved around mid-grey (128 = no difference)
PICTURE_KINDS = {"synthetic_mri": (0.0, 1.0), "uncertainty": (0.0, 2.0), "difference": (128.0, 0.5)}


def as_8bit(array: np.ndarray, kind: str) -> np.ndarray:
    """An output volume's voxels as 8-bit grey levels, as :data:`PICTURE_KINDS` says."""
    offset, scale = PICTURE_KINDS[kind]
    return np.clip(np.round(offset + scale * np.asarray(array, np.float64)), 0, 255).astype(np.uint8)


def picture_names(slices: int, reference: Optional[object]) -> List[str]:
    """One PNG name per slice: the reference pictures' own names when the outputs lie on a picture stack's grid
    (slice k ↔ file k, so outputs sit beside their inputs one to one), else ``slice_0001.png`` …"""
    if isinstance(reference, PictureStack) and len(reference.files) == slices:
        return [Path(name).stem + ".png" for name in reference.files]
    return [f"slice_{k + 1:04d}.png" for k in range(slices)]


def picture_writer(result, reference: Optional[object] = None):
    """A writer for :func:`outputs.save_outputs`: ``pictures/<kind>/`` 8-bit PNGs, one per slice of each output
    volume in :data:`PICTURE_KINDS` (slice k of the volume as stored, rows and columns as in the volume, so a
    picture stack comes back in its own orientation). Returns {"pictures": "pictures"}."""

    def write(tmp: Path) -> dict:
        from .volumes import write_volume

        for kind, image in result.output_images().items():
            if kind not in PICTURE_KINDS:
                continue  # the registered CT keeps its own values: it is in ct_registered.nrrd
            folder = Path(tmp) / PICTURES_FOLDER / kind
            folder.mkdir(parents=True)
            planes = as_8bit(sitk.GetArrayFromImage(image), kind)
            for plane, name in zip(planes, picture_names(len(planes), reference)):
                write_volume(sitk.GetImageFromArray(plane), folder / name)
        return {PICTURES_FOLDER: PICTURES_FOLDER}

    return write
