"""Reading and writing volumes: any format SimpleITK reads, checked, as a 3D scalar image.

A 2D image (e.g. a PNG slice) becomes a one-slice volume. 4D, multi-component (RGB), empty and
unreadable inputs are refused with a message that says what to do. Inputs are only ever read.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .errors import CTMRIError, shortened


def read_volume(path: str | Path, what: str = "image") -> sitk.Image:
    """Read a file or DICOM folder as a 3D scalar image with its physical geometry."""
    path = Path(path)
    if not path.exists():
        raise CTMRIError(f"{what} not found: {path}; check the path")
    if path.is_dir():
        image = _read_dicom_folder(path, what)
    else:
        if path.stat().st_size == 0:
            raise CTMRIError(f"{what} file {path} is empty (0 bytes); give a complete image file")
        if not os.access(path, os.R_OK):
            raise CTMRIError(f"cannot read {what} {path}: no permission to read it; check its permissions")
        if path.suffix == ".gz":
            _check_gzip_complete(path, what)  # (a .nii.gz's voxels are checked for NaN in the same pass)
        if path.suffix.lower() == ".nii":
            _check_nifti_complete(path, what)
            with open(path, "rb") as stream:
                _check_nifti_finite(stream, path, what)
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise CTMRIError(
                f"cannot read {what} {path}: not an image SimpleITK can read, or the file is damaged ({_itk_reason(exc)}); "
                "give a .nrrd, .nii/.nii.gz, .mha/.mhd or .png file or a DICOM folder, and copy it again if it was cut short"
            ) from exc
    return as_scalar_3d(image, f"{what} {path.name}")


def _itk_reason(exc: Exception, limit: int = 160) -> str:
    """ITK's own reason, its last line (a zero spacing, a missing .raw beside a .mhd, an unknown format), shortened."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    return "ITK: " + shortened(reason, limit)


def _check_gzip_complete(path: Path, what: str) -> None:
    """ITK reads a truncated .gz without complaint (the missing voxels come back as zeros): check first."""
    try:
        with gzip.open(path, "rb") as stream:
            if path.name.lower().endswith(".nii.gz"):
                _check_nifti_finite(stream, path, what)
            while stream.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise CTMRIError(
            f"cannot read {what} {path}: the compressed file is truncated or damaged ({exc}); copy it again"
        ) from exc


def _nifti_header(header: bytes) -> Optional[dict]:
    """The fields of a NIfTI-1 or NIfTI-2 header (either byte order) that locate its voxels; None if not one."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:  # NIfTI-1
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            offset = struct.unpack(endian + "f", header[108:112])[0]
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:  # NIfTI-2
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None  # not a NIfTI header SimpleITK would accept either: its reader will say so
    rank = int(dims[0])
    if not 1 <= rank <= 7 or bitpix <= 0 or not offset == offset:
        return None
    voxels = 1
    for n in dims[1 : rank + 1]:
        voxels *= max(int(n), 1)
    return {"endian": endian, "datatype": int(datatype), "offset": int(offset), "voxels": voxels,
            "bytes": voxels * int(bitpix) // 8}


#: NIfTI datatype codes of the floating-point voxel types that can hold NaN or Inf (FLOAT32, FLOAT64)
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _check_nifti_finite(stream, path: Path, what: str) -> None:
    """ITK's NIfTI reader turns NaN and Inf voxels into 0 (in a CT, water) without a word, so the check every
    other format gets after reading cannot see them: look at the stored floats themselves, in chunks, from
    ``stream`` (the file, or its decompressed stream, at its start)."""
    header = _nifti_header(stream.read(540))
    if header is None or header["datatype"] not in _NIFTI_FLOATS:
        return
    dtype = np.dtype(header["endian"] + _NIFTI_FLOATS[header["datatype"]])
    stream.seek(header["offset"])
    left, chunk = header["bytes"], (1 << 24) // dtype.itemsize * dtype.itemsize
    while left > 0:
        data = stream.read(min(chunk, left))
        if not data:
            return  # cut short: the completeness checks say so
        left -= len(data)
        values = np.frombuffer(data[: len(data) // dtype.itemsize * dtype.itemsize], dtype)
        if not np.isfinite(values).all():
            raise CTMRIError(f"the {what} image {path.name} contains NaN or infinite values (which the NIfTI "
                             "reader would silently turn into 0); fix or mask them and retry")


def _check_nifti_complete(path: Path, what: str) -> None:
    """ITK reads an uncompressed .nii cut short without complaint (the missing voxels come back as
    zeros or garbage): check that the file holds all the voxels its header promises."""
    with open(path, "rb") as stream:
        header = _nifti_header(stream.read(540))
    if header is None:
        return
    expected = header["offset"] + header["bytes"]
    actual = path.stat().st_size
    if actual < expected:
        raise CTMRIError(
            f"cannot read {what} {path}: the file is truncated ({actual} of the {expected} bytes its header "
            "promises); copy it again"
        )


#: 2D picture formats: slices exported from a viewer, with no position or spacing between them.
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def no_dicom_error(folder: Path, what: str) -> CTMRIError:
    """The error for a folder without DICOM images; it says what to do when the folder holds exported pictures."""
    pictures = [p.suffix.lower() for p in Path(folder).iterdir() if p.suffix.lower() in PICTURE_SUFFIXES]
    if pictures:
        return CTMRIError(
            f"{what} folder {folder} holds no DICOM series but {len(pictures)} 2D pictures ({', '.join(sorted(set(pictures)))}), "
            "which this command does not read as a volume; give it to `ctmri synthesize`, `batch` or `evaluate` (they "
            "stack such a folder as one scan, see --picture-spacing), or give a volume file (.nrrd, .nii.gz) made from "
            "them with the scan's real spacing"
        )
    damaged, named = _unreadable_dicom_files(Path(folder))
    if damaged or named:
        found = "; ".join(part for part in (
            f"{len(damaged)} file(s) marked as DICOM could not be read, e.g. {damaged[0].name}" if damaged else "",
            f"{len(named)} .dcm file(s) are not DICOM at all, e.g. {named[0].name}" if named else "") if part)
        return CTMRIError(f"{what} folder {folder} holds no readable DICOM series: {found} (damaged or cut short in "
                          "copying?); copy the series again from its source")
    return CTMRIError(f"{what} folder {folder} holds no DICOM series and no 2D pictures (.png, .jpg, .tif, .bmp) "
                      "directly in it; give an image file, a DICOM folder, or the folder that holds the pictures "
                      "themselves (subfolders are not searched for pictures)")


def marked_as_dicom(path: Path) -> bool:
    """Whether the file carries the DICOM marker ("DICM" after the 128-byte preamble)."""
    try:
        with open(path, "rb") as stream:
            return stream.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _unreadable_dicom_files(folder: Path) -> tuple:
    """Files under ``folder`` that carry the DICOM marker ("DICM" at byte 128) and files named ``*.dcm`` without
    it: in a folder where no DICOM image could be read, these are what was meant to be read."""
    damaged, named = [], []
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = Path(root) / name
            if marked_as_dicom(path):
                damaged.append(path)
            elif path.suffix.lower() == ".dcm":
                named.append(path)
    return damaged, named


def _read_dicom_folder(folder: Path, what: str) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise no_dicom_error(folder, what)
    if len(series) > 1:
        raise CTMRIError(
            f"{what} folder {folder} holds {len(series)} DICOM series; put one series per folder"
        )
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise CTMRIError(f"cannot read the DICOM series in {folder}: {exc}".splitlines()[0]) from exc


def grey_of_rgb(image: sitk.Image) -> Optional[sitk.Image]:
    """The grey image an RGB(A) image holds when its red, green and blue are equal everywhere (a screenshot or
    PNG export of a grey CT/MRI); None for anything else.

    An alpha channel is ignored: it says how a viewer blends the picture, not what was scanned. Real screenshots
    carry one (a quarter of the other hospital's CT PNGs here: alpha below 255 on the one-pixel frame and on
    burnt-in text), and the trainer's slice reader ignores it too.
    """
    if image.GetNumberOfComponentsPerPixel() not in (3, 4):
        return None
    # copies, not views: a view of a temporary channel image would outlive its memory
    channels = sitk.GetArrayFromImage(image)
    if not (np.array_equal(channels[..., 0], channels[..., 1]) and np.array_equal(channels[..., 0], channels[..., 2])):
        return None
    return sitk.VectorIndexSelectionCast(image, 0)  # keeps the image's geometry


def as_grey(image: sitk.Image, what: str = "image") -> sitk.Image:
    """``image`` if it has one component, its grey if it is grey stored as RGB(A); refuses anything else."""
    if image.GetNumberOfComponentsPerPixel() == 1:
        return image
    grey = grey_of_rgb(image)
    if grey is None:
        raise CTMRIError(
            f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector "
            "image); give a single-channel grayscale CT/MRI (a grey image saved as RGB, with red, green and "
            "blue equal, is read as grey)"
        )
    return grey


def as_scalar_3d(image: sitk.Image, what: str = "image") -> sitk.Image:
    """Check that ``image`` is one-component 2D/3D with voxels (or grey stored as RGB, taken as its grey),
    and return it as 3D."""
    image = as_grey(image, what)
    dim = image.GetDimension()
    if dim == 4:
        size = image.GetSize()
        if size[3] != 1:
            raise CTMRIError(f"{what} is 4D ({size[3]} time points or volumes); give a single 3D volume")
        image = image[:, :, :, 0]
    elif dim == 2:
        image = sitk.JoinSeries(image)
    elif dim != 3:
        raise CTMRIError(f"{what} is {dim}D; give a 2D slice or a 3D volume")
    if 0 in image.GetSize():
        raise CTMRIError(f"{what} has no voxels (size {image.GetSize()}); give a non-empty image")
    return image


def write_volume(image: sitk.Image, path: str | Path) -> None:
    """Write with compression; raises CTMRIError (not a traceback) when the disk refuses."""
    try:
        sitk.WriteImage(image, str(path), True)
    except RuntimeError as exc:
        raise CTMRIError(
            f"cannot write {Path(path).name}: {str(exc).strip().splitlines()[-1]}; free disk space or choose "
            "another output folder"
        ) from exc


def describe(image: sitk.Image) -> dict:
    """Size, spacing, origin and direction as JSON-able lists."""
    return {
        "size": list(image.GetSize()),
        "spacing": [float(v) for v in image.GetSpacing()],
        "origin": [float(v) for v in image.GetOrigin()],
        "direction": [float(v) for v in image.GetDirection()],
    }


def array_of(image: sitk.Image) -> np.ndarray:
    """A float32 (z, y, x) copy of the voxels."""
    return sitk.GetArrayFromImage(image).astype(np.float32, copy=False)


def is_writable_dir(path: Path) -> bool:
    """True if ``path`` (or its nearest existing parent) can be written."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    return os.access(probe, os.W_OK)
