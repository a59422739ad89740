"""Derived DICOM series out: every output volume of a run as a DERIVED\\SECONDARY series (MR; CT for the
registered CT), one file per slice (pydicom), in the CT's study when the CT came from DICOM.

:func:`dicom_writer` is what ``ctmri synthesize --dicom`` (and ``batch --dicom``) hands to
:func:`outputs.save_outputs`, so the series are committed with the other outputs, all or nothing. Reading
DICOM (which series a folder holds, which one to take) is :mod:`dicom`.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .dicom import PATIENT_TAGS, STUDY_TAGS, Choice, multi_values

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
#: ASCII only: a PACS without UTF-8 support showed the em dash of an earlier text as "â€”" in the safety words
NOT_FOR_DIAGNOSIS = "Synthetic MRI - not for diagnosis"
#: kind → (modality, SeriesDescription, series number). The registered CT holds CT values (HU), so it
#: is written as a CT series: an MR label would give it MR window presets and hanging protocols.
OUTPUT_SERIES = {
    "synthetic_mri": ("MR", NOT_FOR_DIAGNOSIS, 9001),
    "difference": ("MR", f"{NOT_FOR_DIAGNOSIS} (difference MRI - sMRI)", 9002),
    "uncertainty": ("MR", f"{NOT_FOR_DIAGNOSIS} (uncertainty)", 9003),
    "ct_registered": ("CT", "CT resampled onto the MRI grid - not for diagnosis", 9004),
}
DICOM_FOLDER = "dicom"
#: OUTPUT_SERIES's numbers move up by multiples of this until none repeats a series number of the study they join
SERIES_NUMBER_STEP = 10


@dataclass
class OutputContext:
    """What every written series shares: patient and study, frame of reference, provenance text."""

    common: object  # pydicom Dataset with the patient, study, equipment and frame-of-reference attributes
    thickness: Optional[float]
    derivation: str
    #: the registered CT's values → (RescaleIntercept, RescaleType): HU as they are, HU + 1024 shifted
    #: back to HU, anything else (an 8-bit windowed CT) "US": never labelled HU when it is not
    ct_rescale: Tuple[float, str] = (0.0, "US")
    #: (ratios, methods) when a source's pixels were lossy-compressed: a derived image must say so too
    lossy: Optional[Tuple[list, list]] = None
    #: added to OUTPUT_SERIES's numbers (:func:`_series_offset`)
    series_offset: int = 0


def output_context(result, ct_source: Optional[Choice], reference_source: Optional[Choice]) -> OutputContext:
    """The shared attributes: the CT's patient and study when the CT came from DICOM (else the DICOM MRI's, else a
    new study),
    and the reference grid's frame of reference (the MRI's when given, else the CT's) when it came from
    DICOM (else a new one)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    from .version import version_string

    now = datetime.datetime.now()
    version = version_string()
    ds = Dataset()
    # the CT's patient and study; a CT from a volume file has none, and then a DICOM MRI's are the patient's
    # (it was an anonymous new study on the MRI's frame of reference)
    patient = ct_source if ct_source is not None else reference_source
    for keyword in PATIENT_TAGS + STUDY_TAGS:
        if patient is not None and keyword in patient.series.header:
            setattr(ds, keyword, patient.series.header.data_element(keyword).value)
    if not ds.get("StudyInstanceUID"):  # type 1: a new study without DICOM input, or for a series lacking one
        ds.StudyInstanceUID = generate_uid()
    if patient is None:
        ds.StudyDate, ds.StudyTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        ds.StudyDescription = NOT_FOR_DIAGNOSIS
        ds.StudyID = "CTMRI"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "StudyID", "AccessionNumber", "ReferringPhysicianName"):  # type 2: present, may be empty
        if keyword not in ds:
            setattr(ds, keyword, "")
    reference = reference_source.series.header if reference_source is not None else None
    ds.FrameOfReferenceUID = (
        str(reference.FrameOfReferenceUID) if reference is not None and reference.get("FrameOfReferenceUID")
        else generate_uid()
    )
    ds.PositionReferenceIndicator = str(reference.get("PositionReferenceIndicator", "") or "") if reference else ""
    ds.PatientPosition = str(reference.get("PatientPosition", "") or "") if reference else ""
    if not _deidentified(patient):
        ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    # else none: a de-identified study's dates were removed or shifted, and today's date beside them would tell
    # the shift (all three are optional here: Type 3, and Content Date/Time only for temporally related images)
    sha = (result.weights or {}).get("sha256")
    ds.Manufacturer = "CTtoMRISynthesis (research software)"
    ds.ManufacturerModelName = "ctmri"
    versions = [f"ctmri {version}"] + ([str(sha)] if sha else [])
    if sha and (sum(map(len, versions)) + len(versions) - 1) % 2:
        # an odd length gets a pad space at its end, which would make the 64-character sha 65 long, beyond LO's limit
        # (readers warn); a space after the first value is insignificant in LO and keeps the sha at 64
        versions[0] += " "
    ds.SoftwareVersions = versions  # LO: a sha256 is exactly 64
    derivation = (
        f"Synthetic MRI predicted from CT by a U-Net (ctmri {version}; weights "
        f"{(result.weights or {}).get('file') or 'unknown'}, sha256 {sha or 'unknown'}). Not for diagnosis."
    )
    thickness = reference_source.series.thickness if reference_source is not None else None
    ct_rescale = {"hu": (0.0, "HU"), "hu+1024": (-1024.0, "HU")}.get(
        str((result.normalisation or {}).get("ct_path")), (0.0, "US")
    )
    texts = [str(e.value) for e in ds.iterall() if e.VR != "SQ"] + [derivation]
    if not all(text.isascii() for text in texts):
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, only when a copied name (or the weights' file name) needs it
    return OutputContext(common=ds, thickness=thickness, derivation=derivation, ct_rescale=ct_rescale,
                         lossy=_lossy([s for s in (ct_source, reference_source if reference_source is not ct_source else None)
                                       if s is not None]),
                         series_offset=_series_offset((ct_source, reference_source), str(ds.StudyInstanceUID)))


def _series_offset(sources, study_uid: str) -> int:
    """0, or the smallest multiple of :data:`SERIES_NUMBER_STEP` that keeps OUTPUT_SERIES's numbers off every series
    number the input folders show in the study the outputs join (say an earlier run's series, imported into it: two
    series 9001 would look like one in a viewer's list)."""
    taken = set()
    for source in sources:
        if source is None:
            continue
        for series in [source.series, *source.others]:
            if series.study_uid == study_uid and series.number is not None:
                taken.add(int(series.number))
    numbers = [number for _, _, number in OUTPUT_SERIES.values()]
    offset = 0
    while any(number + offset in taken for number in numbers):
        offset += SERIES_NUMBER_STEP
    return offset


def _deidentified(source: Optional[Choice]) -> bool:
    """Whether the series the outputs join says it was de-identified or its dates changed: PatientIdentityRemoved
    YES, a DeidentificationMethod, or LongitudinalTemporalInformationModified MODIFIED / REMOVED."""
    if source is None:
        return False
    header = source.series.header
    return (str(header.get("PatientIdentityRemoved", "") or "").upper() == "YES"
            or bool(str(header.get("DeidentificationMethod", "") or "").strip())
            or str(header.get("LongitudinalTemporalInformationModified", "") or "").upper() in ("MODIFIED", "REMOVED"))


def _lossy(sources: list) -> Optional[Tuple[list, list]]:
    """(ratios, methods) when a source series says its pixels were lossy-compressed (LossyImageCompression "01"):
    once set the flag may never be reset in a derived image (PS3.3 C.7.6.1.1.5); None otherwise."""
    ratios, methods, lossy = [], [], False
    for source in sources:
        header = source.series.header
        if str(header.get("LossyImageCompression", "") or "").strip() == "01":
            lossy = True
            for keyword, values in (("LossyImageCompressionRatio", ratios), ("LossyImageCompressionMethod", methods)):
                value = header.get(keyword)
                values += [str(v) for v in multi_values(None if value == "" else value)]
    return (ratios, methods) if lossy else None


def write_image_series(image: sitk.Image, folder: Path, kind: str, context: OutputContext) -> int:
    """Write one 3D image as a DERIVED\\SECONDARY series, one file per slice; returns the file count."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    modality = OUTPUT_SERIES[kind][0]
    array = sitk.GetArrayViewFromImage(image)
    slope = _slope_for(array)
    stored = np.clip(np.rint(np.asarray(array, dtype=np.float64) / slope), -32768, 32767).astype("<i2")
    series = _series_dataset(image, kind, context, slope, array)
    sop_class = MR_IMAGE_STORAGE if modality == "MR" else CT_IMAGE_STORAGE
    direction = np.array(image.GetDirection()).reshape(3, 3)
    normal = np.cross(direction[:, 0], direction[:, 1])
    folder.mkdir(parents=True)
    for k in range(stored.shape[0]):
        ds = Dataset()
        ds.update(series)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        position = np.array(image.TransformIndexToPhysicalPoint((0, 0, k)))
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SliceLocation = _ds(float(position @ normal))
        ds.PixelData = stored[k].tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = EXPLICIT_VR_LITTLE_ENDIAN
        _save(ds, folder / f"IM{k + 1:05d}.dcm")
    return int(stored.shape[0])


def _series_dataset(image: sitk.Image, kind: str, context: OutputContext, slope: float, array) -> object:
    """The attributes every slice of one output series shares."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    modality, description, number = OUTPUT_SERIES[kind]
    ds = Dataset()
    ds.update(context.common)
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = number + context.series_offset
    ds.SeriesDescription = description
    ds.ImageLaterality = "U"  # the head is unpaired (and with ImageLaterality, Laterality is not required)
    ds.BodyPartExamined = "HEAD"
    # Value 3 is required: CT's is AXIAL (it is a transverse stack), MR's "OTHER" (none of the defined maps).
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL" if modality == "CT" else "OTHER"]
    ds.DerivationDescription = context.derivation
    ds.ImageComments = f"{description}. {context.derivation}"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "01" if context.lossy else "00"
    if context.lossy and context.lossy[0]:
        ds.LossyImageCompressionRatio = context.lossy[0]
    if context.lossy and context.lossy[1]:
        ds.LossyImageCompressionMethod = context.lossy[1]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    sx, sy, sz = image.GetSpacing()
    ds.ImageOrientationPatient = [_ds(v) for v in list(direction[:, 0]) + list(direction[:, 1])]
    ds.PixelSpacing = [_ds(sy), _ds(sx)]  # DICOM: between rows (y), then between columns (x)
    ds.SliceThickness = _ds(context.thickness or sz)
    ds.SpacingBetweenSlices = _ds(sz)
    ds.Rows, ds.Columns = int(image.GetSize()[1]), int(image.GetSize()[0])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    intercept, ds.RescaleType = context.ct_rescale if modality == "CT" else (0.0, "US")
    ds.RescaleIntercept, ds.RescaleSlope = _ds(intercept), _ds(slope)
    low, high = float(np.min(array)), float(np.max(array))
    if kind == "difference":  # signed: centre the window on 0
        low, high = -max(abs(low), abs(high)), max(abs(low), abs(high))
    if modality == "CT" and ds.RescaleType == "HU":
        low, high = -160.0, 240.0  # a brain window (level 40, width 400 HU)
    ds.WindowCenter, ds.WindowWidth = _ds((low + high) / 2), _ds(max(high - low, 1.0))
    if modality == "MR":
        # MR Image module: "RM" (research mode) says honestly that no MR sequence made these pixels.
        ds.ScanningSequence, ds.SequenceVariant = "RM", "NONE"
        ds.ScanOptions = ds.MRAcquisitionType = ds.EchoTime = ds.EchoTrainLength = ""
        ds.RepetitionTime = ""
    else:
        ds.KVP = ""
        ds.AcquisitionNumber = ""
    return ds


def _slope_for(array) -> float:
    """A power-of-two rescale slope (exact in a DS string) so that the values fit int16 with 15 bits.

    0..255 images get 1/128 (steps of 0.008 grey levels); HU images 1/8 HU; never finer than 2^-12.
    """
    peak = float(np.max(np.abs(array))) if array.size else 0.0
    if peak <= 0:
        return 1.0
    return float(2.0 ** max(-12, math.ceil(math.log2(peak / 32767.0))))


def _ds(value: float) -> str:
    """A decimal string (DS, at most 16 characters) as precise as it allows."""
    value = float(value) + 0.0  # + 0.0: never "-0"
    for digits in range(15, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"{value} cannot be written as a DICOM decimal string")


def _save(ds, path: Path) -> None:
    """Write a DICOM file with preamble and file meta (pydicom 2.4 on Slicer 5.6, and 3.x)."""
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    else:  # pydicom 2.x needs the encoding stated on the dataset
        ds.is_little_endian, ds.is_implicit_VR = True, False
        pydicom.dcmwrite(str(path), ds, write_like_original=False)


def dicom_writer(
    result, ct_source: Optional[Choice] = None, reference_source: Optional[Choice] = None
) -> Callable[[Path], Dict[str, str]]:
    """A writer for :func:`outputs.save_outputs`: ``dicom/<kind>/`` series of every output volume.

    Called with the run's temporary folder (so the series are committed with the other outputs, all
    or nothing); returns {"dicom": "dicom"}.
    """

    def write(tmp: Path) -> Dict[str, str]:
        context = output_context(result, ct_source, reference_source)
        for kind, image in result.output_images().items():
            write_image_series(image, Path(tmp) / DICOM_FOLDER / kind, kind, context)
        return {DICOM_FOLDER: DICOM_FOLDER}

    return write
