"""DICOM studies in and derived DICOM series out (dicom.py and dicom_out.py, `ctmri series`, `synthesize --dicom`).

Most tests build small DICOM studies with pydicom in ``tmp_path``: an analytic head phantom in HU
(scalp, skull, brain, two unequal ventricles) sampled at each slice's true physical pixel centres, so
the right answer for any geometry (tilted, sheared, unevenly spaced) is known exactly. The data tests at
the end run on the real scanner study ``real_hu_head_ct_dicom`` (copies in ``tmp_path``, never the
shared files).
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, generate_uid

from conftest import data_root, require
from CTtoMRISynthesisLib import dicom, dicom_out
from CTtoMRISynthesisLib.version import version_string
from CTtoMRISynthesisLib.errors import CTMRIError
from CTtoMRISynthesisLib.outputs import save_outputs
from CTtoMRISynthesisLib.pipeline import SynthesisResult

STUDY_UID = "1.2.826.0.1.3680043.8.498.1000001"
FOR_UID = "1.2.826.0.1.3680043.8.498.1000002"
SHA = "ab" * 32  # a sha256-shaped weights checksum


# ------------------------------------------------------------------------------------ the phantom


def head_hu(points: np.ndarray) -> np.ndarray:
    """HU of an ellipsoidal head centred at the origin (LPS, mm), at points (..., 3)."""

    def inside(centre, axes):
        return ((((points - np.asarray(centre, float)) / np.asarray(axes, float)) ** 2).sum(-1)) <= 1.0

    hu = np.full(points.shape[:-1], -1000.0)
    hu[inside((0, 0, 0), (76, 96, 90))] = 40.0  # scalp
    hu[inside((0, 0, 0), (71, 91, 85))] = 1000.0  # skull
    hu[inside((0, 0, 0), (64, 84, 78))] = 35.0  # brain
    hu[inside((-12, -8, 10), (7, 20, 10))] = 5.0  # left ventricle, larger: no symmetry to hide a flip
    hu[inside((10, -5, 10), (5, 15, 8))] = 5.0
    return hu


def pixel_points(position, row, col, size, pixel) -> np.ndarray:
    """Physical centres (rows, cols, 3) of a slice's pixels; ``pixel`` is (between rows, between columns)."""
    rows, cols = size
    j, i = np.mgrid[0:rows, 0:cols]
    return (np.asarray(position, float) + i[..., None] * pixel[1] * np.asarray(row, float)
            + j[..., None] * pixel[0] * np.asarray(col, float))


def write_series(folder: Path, positions, *, number: int, row=(1, 0, 0), col=(0, 1, 0), size=(64, 64),
                 pixel=(4.0, 4.0), modality="CT", image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                 thickness=None, study_uid=STUDY_UID, description="", instances=None, tilt=None,
                 for_uid=FOR_UID, extra=None) -> str:
    """Write one series (one file per slice, CT stored as HU + 1024 with intercept −1024); its UID. ``extra``:
    attributes set last (another patient, a character set, …)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    for k, position in enumerate(positions):
        hu = head_hu(pixel_points(position, row, col, size, pixel))
        ds = Dataset()
        ds.SOPClassUID = dicom_out.CT_IMAGE_STORAGE if modality == "CT" else dicom_out.MR_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Head", "PH001", "", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study_uid, "20240101", "120000", "1"
        ds.AccessionNumber = ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, series_uid, number
        ds.SeriesDescription = description
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator, ds.PatientPosition = for_uid, "", "HFS"
        ds.ImageType = list(image_type)
        ds.InstanceNumber = instances[k] if instances is not None else k + 1
        ds.ImagePositionPatient = [dicom_out._ds(v) for v in position]
        ds.ImageOrientationPatient = [dicom_out._ds(v) for v in tuple(row) + tuple(col)]
        ds.PixelSpacing = [float(pixel[0]), float(pixel[1])]
        if thickness is not None:
            ds.SliceThickness = thickness
        if tilt is not None:
            ds.GantryDetectorTilt = tilt
        ds.Rows, ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.rint(hu + 1024).astype("<i2").tobytes()
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = dicom_out.EXPLICIT_VR_LITTLE_ENDIAN
        dicom_out._save(ds, folder / f"s{number}_{k:03d}.dcm")
    return series_uid


def axial(count: int, step: float, size=(64, 64), pixel=(4.0, 4.0)) -> list:
    """Slice positions of an axial stack centred on the head."""
    z0 = -(count - 1) * step / 2
    corner = (-(size[1] - 1) * pixel[1] / 2, -(size[0] - 1) * pixel[0] / 2)
    return [(corner[0], corner[1], z0 + k * step) for k in range(count)]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A scanner-like study: scout (in a subfolder), thick and thin axial CT, a coronal reformat, a text file."""
    root = tmp_path_factory.mktemp("study")
    write_series(root / "scout", [(0.0, -126.0, 126.0)], number=1, row=(0, 1, 0), col=(0, 0, -1),
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), thickness=200.0)
    write_series(root, axial(12, 8.0), number=2, thickness=8.0, description="Head 8mm")
    write_series(root, axial(24, 4.0), number=3, thickness=4.0, description="Head 4mm")
    coronal = [(-126.0, -60.0 + 4.0 * k, 90.0) for k in range(30)]
    write_series(root, coronal, number=601, row=(1, 0, 0), col=(0, 0, -1), size=(46, 64), thickness=4.0,
                 image_type=("DERIVED", "SECONDARY", "REFORMATTED"), description="Cor MPR")
    (root / "README.txt").write_text("not a DICOM file\n")
    return root


def copy_series(study: Path, number: int, target: Path) -> list:
    """Copy one series' files to ``target``; their new paths, in slice order."""
    target.mkdir()
    files = sorted(study.glob(f"s{number}_*.dcm"))
    return [Path(shutil.copy(f, target / f.name)) for f in files]


def by_number(series: list) -> dict:
    return {s.number: s for s in series}


# ---------------------------------------------------------------------------------- listing, choice


def test_list_describes_every_series(study: Path) -> None:
    listed = by_number(dicom.list_series(study))
    assert sorted(listed) == [1, 2, 3, 601]
    assert listed[1].plane == "localizer" and listed[1].problem is not None
    assert (listed[2].plane, listed[2].slices, listed[2].step, listed[2].uniform) == ("axial", 12, 8.0, True)
    assert (listed[3].plane, listed[3].slices, listed[3].step, listed[3].thickness) == ("axial", 24, 4.0, 4.0)
    assert (listed[601].plane, listed[601].slices, listed[601].is_reformat) == ("coronal", 30, True)
    assert listed[3].pixel_spacing == (4.0, 4.0) and listed[3].description == "Head 4mm"


def test_rule_takes_the_thinnest_original_axial_series(study: Path) -> None:
    choice = dicom.choose_series(dicom.list_series(study), "CT", folder=study)
    assert choice.series.number == 3
    assert "thinnest" in choice.reason
    for why in ("1 (localizer)", "2 (thicker slices (8 mm))", "601 (reformat)"):
        assert why in choice.reason
    assert choice.provenance()["number"] == 3 and choice.provenance()["uid"] == choice.series.uid


def test_series_command_prints_the_table_and_the_choice(study: Path, capsys) -> None:
    from CTtoMRISynthesisLib import cli

    assert cli.main(["series", str(study)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(f"study {STUDY_UID}  patient PH001  date 20240101  (4 series)")
    assert lines[1].split()[:4] == ["series", "modality", "image", "type"]
    row3 = next(line for line in lines if line.startswith("3 "))
    assert row3.split()[:9] == ["3", "CT", "ORIGINAL\\PRIMARY\\AXIAL", "Head", "4mm", "axial", "24", "4×4", "4"]
    assert "localizer" in next(line for line in lines if line.startswith("1 "))
    assert f"--ct {study} takes series 3" in out


def test_ties_go_to_more_slices(tmp_path: Path) -> None:
    write_series(tmp_path, axial(30, 3.0), number=4, thickness=3.0)
    write_series(tmp_path, axial(40, 3.0), number=5, thickness=3.0)
    write_series(tmp_path, axial(20, 3.0), number=6, thickness=3.0)
    choice = dicom.choose_series(dicom.list_series(tmp_path), "CT", folder=tmp_path)
    assert choice.series.number == 5
    assert "4 (fewer slices (30))" in choice.reason and "6 (fewer slices (20))" in choice.reason


def test_mri_takes_the_mr_series(tmp_path: Path) -> None:
    write_series(tmp_path, axial(40, 3.0), number=3, thickness=3.0)
    write_series(tmp_path, axial(20, 5.0), number=7, modality="MR", image_type=("ORIGINAL", "PRIMARY", "M"))
    listed = dicom.list_series(tmp_path)
    assert dicom.choose_series(listed, "MRI").series.number == 7
    ct = dicom.choose_series(listed, "CT")
    assert ct.series.number == 3 and "7 (modality MR)" in ct.reason


def test_series_command_says_what_ct_and_mri_take_and_nothing_else(tmp_path: Path, capsys) -> None:
    """One line for --ct and one for --mri (the readers' other inputs, evaluate's and training's, are not
    synthesize's options); a file given as the folder is named as a file."""
    from CTtoMRISynthesisLib import cli

    write_series(tmp_path, axial(40, 3.0), number=3, thickness=3.0)
    write_series(tmp_path, axial(20, 5.0), number=7, modality="MR", image_type=("ORIGINAL", "PRIMARY", "M"))
    assert cli.main(["series", str(tmp_path)]) == 0
    choices = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("--")]
    assert choices == ["--ct", "--mri"]
    a_file = next(tmp_path.glob("*.dcm"))
    assert cli.main(["series", str(a_file)]) == 2
    assert f"{a_file} is a file, not a folder: give the folder that holds" in capsys.readouterr().err


def test_a_file_cut_short_is_seen_from_the_headers(tmp_path: Path, capsys) -> None:
    """A slice file cut short in copying: `ctmri series` listed the series as fine and the rule took it, then
    reading failed. Its size against its pixels (uncompressed files) tells it from the headers: the rule passes
    over the series, and asked for by number it is refused saying to copy it again."""
    from CTtoMRISynthesisLib import cli

    write_series(tmp_path, axial(12, 8.0), number=2, thickness=8.0)
    write_series(tmp_path, axial(24, 4.0), number=3, thickness=4.0)
    cut = sorted(tmp_path.glob("s3_*.dcm"))[5]
    cut.write_bytes(cut.read_bytes()[:4000])  # 64 × 64 × 2 bytes of pixels: at least 4,192 missing
    assert cli.main(["series", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "files cut short" in printed and "--ct " + str(tmp_path) + " takes series 2" in printed, printed
    with pytest.raises(CTMRIError, match=r"1 of its files are cut short, e.g. s3_005.dcm lacks at least \d+ bytes.*"
                                         r"copy the series again completely"):
        dicom.choose_series(dicom.list_series(tmp_path), "CT", "3", folder=tmp_path)


def _damage_vr(path: Path, tag: bytes, vr: bytes) -> None:
    """Replace the value representation of the (explicit VR, little endian) element ``tag`` with an unknown one."""
    data = path.read_bytes()
    at = data.index(tag + vr)
    path.write_bytes(data[: at + 4] + b"Q@" + data[at + 6:])


@pytest.mark.parametrize("where", ["image tag", "file meta"])
def test_a_damaged_slice_file_is_named_not_a_traceback(tmp_path: Path, capsys, where: str) -> None:
    """One byte wrong in one slice file's header: pydicom decodes an element only when first used, so reading
    went on and failed later with a traceback (exit 1), or, in the file meta, the slice was silently left out. The
    file is named, with what to do, by `ctmri series` and by a run (exit 2)."""
    from CTtoMRISynthesisLib import cli

    write_series(tmp_path, axial(12, 8.0), number=2, thickness=8.0)
    write_series(tmp_path, axial(24, 4.0), number=3, thickness=4.0)
    damaged = sorted(tmp_path.glob("s3_*.dcm"))[23]  # the top slice: leaving it out would go unnoticed
    if where == "image tag":
        _damage_vr(damaged, b"\x28\x00\x10\x00", b"US")  # Rows
        expected = r"1 of its 24 files are damaged, e.g. s3_023.dcm \(Rows: .*\); copy the series again"
        assert cli.main(["series", str(tmp_path)]) == 0
        printed = capsys.readouterr().out
        assert "damaged files" in printed and "--ct " + str(tmp_path) + " takes series 2" in printed, printed
        assert "3 (damaged files)" in printed, printed
        with pytest.raises(CTMRIError, match=expected):
            dicom.choose_series(dicom.list_series(tmp_path), "CT", "3", folder=tmp_path)
    else:
        _damage_vr(damaged, b"\x02\x00\x10\x00", b"UI")  # TransferSyntaxUID
        expected = r"1 file\(s\) in .* are marked as DICOM but cannot be read, e.g. s3_023.dcm \(.*\); copy the study"
        assert cli.main(["series", str(tmp_path)]) == 2
        assert re.search(expected, capsys.readouterr().err)
    assert cli.main(["synthesize", "--ct", str(tmp_path), "--ct-series", "3", "--out-dir", str(tmp_path / "out")]) == 2
    assert re.search(expected, capsys.readouterr().err) and not (tmp_path / "out").exists()
    if where == "image tag":
        for other in sorted(tmp_path.glob("s3_*.dcm"))[:23]:  # every file of the series damaged: still listed
            _damage_vr(other, b"\x28\x00\x10\x00", b"US")
        assert cli.main(["series", str(tmp_path)]) == 0
        printed = capsys.readouterr().out
        assert "(damaged files)" in printed and "takes series 2" in printed, printed


@pytest.mark.parametrize("orientation", [(0, 0, 0, 0, 0, 0), (1, 0, 0, 1, 0, 0)])
def test_a_series_with_a_degenerate_orientation_is_unreadable_not_a_crash(tmp_path: Path, orientation) -> None:
    """ImageOrientationPatient all zeros, or two parallel directions: the geometry is unknown. It crashed the
    listing of the whole study (a NaN slice step); now that series alone is unreadable and the rule takes another."""
    write_series(tmp_path, axial(12, 8.0), number=2, thickness=8.0)
    write_series(tmp_path, axial(24, 4.0), number=3, thickness=4.0, row=orientation[:3], col=orientation[3:])
    series = by_number(dicom.list_series(tmp_path))
    assert "not two perpendicular unit directions" in series[3].problem and "bad orientation tags" in series[3].notes
    assert dicom.choose_series(list(series.values()), "CT", folder=tmp_path).series.number == 2


def test_a_folder_of_damaged_or_fake_dicom_files_says_so(tmp_path: Path) -> None:
    """A folder whose .dcm files are not DICOM, or whose DICOM-marked files have no readable image header, is not
    'a folder holding no DICOM': the message says what was found and to copy it again."""
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "a.dcm").write_text("not a DICOM file")
    with pytest.raises(CTMRIError, match=r"no readable DICOM series: 1 \.dcm file\(s\) are not DICOM at all, e\.g\. a\.dcm"):
        dicom.read_input(tmp_path / "fake", "CT")
    write_series(tmp_path / "cut", axial(3, 8.0), number=2)
    for path in (tmp_path / "cut").iterdir():
        path.write_bytes(path.read_bytes()[:300])  # the marker and part of the file meta, no image header
    with pytest.raises(CTMRIError, match=r"no readable DICOM series: 3 file\(s\) marked as DICOM could not be read"):
        dicom.read_input(tmp_path / "cut", "CT")


def test_a_series_of_the_other_modality_is_refused_before_any_work(tmp_path: Path) -> None:
    """A CT series asked for as the MRI (or an MRI folder holding only a CT) used to run in full and end with a
    'looks like a CT' warning; its Modality says so at once."""
    write_series(tmp_path / "both", axial(40, 3.0), number=3, thickness=3.0)
    write_series(tmp_path / "both", axial(20, 5.0), number=7, modality="MR", image_type=("ORIGINAL", "PRIMARY", "M"))
    write_series(tmp_path / "ct_only", axial(20, 3.0), number=2, thickness=3.0)
    listed = dicom.list_series(tmp_path / "both")
    for what, number, message in (("MRI", "3", "is a CT series (Modality CT); give the MRI"),
                                  ("CT", "7", "is an MR series (Modality MR); give the CT")):
        with pytest.raises(CTMRIError, match=message.replace("(", r"\(").replace(")", r"\)")):
            dicom.choose_series(listed, what, number, folder=tmp_path / "both")
    with pytest.raises(CTMRIError, match="--mri-series"):
        dicom.choose_series(dicom.list_series(tmp_path / "ct_only"), "MRI", folder=tmp_path / "ct_only")
    assert dicom.choose_series(dicom.list_series(tmp_path / "ct_only"), "CT").series.number == 2
    # several CT series given as the MRI: said so at once, not "choose one with --mri-series" (which is refused next)
    write_series(tmp_path / "ct_only", axial(10, 6.0), number=4, thickness=6.0)
    with pytest.raises(CTMRIError, match=r"holds only CT series \(2, Modality CT\), no MR: give the MRI's own folder"):
        dicom.choose_series(dicom.list_series(tmp_path / "ct_only"), "MRI", folder=tmp_path / "ct_only")


def test_localizers_and_reformats_are_never_chosen(tmp_path: Path) -> None:
    write_series(tmp_path, [(0.0, -126.0, 126.0)], number=1, row=(0, 1, 0), col=(0, 0, -1),
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    write_series(tmp_path, axial(40, 3.0), number=600, image_type=("DERIVED", "SECONDARY", "REFORMATTED"))
    with pytest.raises(CTMRIError) as err:
        dicom.choose_series(dicom.list_series(tmp_path), "CT", folder=tmp_path)
    message = str(err.value)
    assert "none is an original axial CT series" in message and "--ct-series" in message
    assert "1 (localizer)" in message and "600 (reformat)" in message


def test_series_of_two_studies_are_not_mixed(tmp_path: Path) -> None:
    write_series(tmp_path / "a", axial(40, 3.0), number=3, study_uid="1.2.3.4.1")
    write_series(tmp_path / "b", axial(40, 3.0), number=3, study_uid="1.2.3.4.2")
    with pytest.raises(CTMRIError, match="2 different studies; give one study's folder"):
        dicom.choose_series(dicom.list_series(tmp_path), "CT", folder=tmp_path)


def test_explicit_choice_by_number_and_uid(study: Path) -> None:
    listed = dicom.list_series(study)
    assert dicom.choose_series(listed, "CT", "2").series.number == 2
    uid = by_number(listed)[601].uid
    chosen = dicom.choose_series(listed, "CT", uid)
    assert chosen.series.number == 601 and "--ct-series" in chosen.reason
    image = dicom.read_series(chosen.series, "CT")  # a reformat can be read when asked for by name
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3)[:, 2], (0, 1, 0), atol=1e-9)


def test_unknown_series_lists_what_is_there(study: Path) -> None:
    with pytest.raises(CTMRIError) as err:
        dicom.choose_series(dicom.list_series(study), "MRI", "9", folder=study)
    message = str(err.value)
    assert message.startswith(f"MRI series 9 is not in {study}; give to --mri-series one of the numbers or UIDs it holds: 1 (CT localizer")
    for number in ("2 (CT axial, 12 slices", "3 (CT axial, 24 slices", "601 (CT coronal, 30 slices"):
        assert number in message
    assert "--mri-series" in message


def test_series_option_on_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkInt16), str(path))
    with pytest.raises(CTMRIError, match="--ct-series chooses a series in a DICOM folder"):
        dicom.read_input(path, "CT", "3")


def test_one_file_of_a_series_or_a_localizer_file_is_refused(tmp_path: Path) -> None:
    """One slice file given for a volume: read alone it was synthesized as a single slice without a word (one of
    a 24-slice series), and a localizer file as a 'CT' of its own. Both are refused saying what to give; the same
    slice copied into a folder of its own is read, as a file and as a folder."""
    write_series(tmp_path / "study", axial(24, 4.0), number=3, thickness=4.0)
    write_series(tmp_path / "study", [(-126.0, 0.0, 126.0)], number=1, row=(1, 0, 0), col=(0, 0, -1),
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), size=(64, 64))
    one = sorted((tmp_path / "study").glob("s3_*.dcm"))[10]
    with pytest.raises(CTMRIError, match=r"s3_010.dcm is one slice of a DICOM series of 24 files \(series 3\) in "
                                         r".*give that folder to read the whole series"):
        dicom.read_input(one, "CT")
    with pytest.raises(CTMRIError, match=r"is a localizer \(scout\) image, not a slice of a volume"):
        dicom.read_input(tmp_path / "study" / "s1_000.dcm", "CT")
    (tmp_path / "alone").mkdir()
    shutil.copy(one, tmp_path / "alone" / one.name)
    for given in (tmp_path / "alone" / one.name, tmp_path / "alone"):
        assert dicom.read_input(given, "CT")[0].GetSize() == (64, 64, 1)


def test_a_dicomdir_file_is_refused_naming_its_folder(tmp_path: Path) -> None:
    """The DICOMDIR of a CD or PACS export is what a clinician picks first; it holds no image, and was refused
    as 'not an image SimpleITK can read, or the file is damaged … copy it again'. It is now named for what it
    is, with its folder to give instead, which reads the study (also under another file name)."""
    from pydicom.fileset import FileSet

    write_series(tmp_path / "export", axial(6, 4.0), number=3, thickness=4.0)
    media = FileSet()
    for f in sorted((tmp_path / "export").glob("*.dcm")):
        media.add(str(f))
    media.write(str(tmp_path / "cd"))
    index = tmp_path / "cd" / "DICOMDIR"
    renamed = shutil.copy(index, tmp_path / "index.dcm")
    for given in (index, Path(renamed)):
        with pytest.raises(CTMRIError, match=rf"the CT {re.escape(str(given))} is a DICOMDIR, the index of a DICOM "
                                             rf"study, not an image; give its folder {re.escape(str(given.parent))}"):
            dicom.read_input(given, "CT")
    assert dicom.read_input(tmp_path / "cd", "CT")[0].GetSize() == (64, 64, 6)
    with pytest.raises(CTMRIError, match=rf"^{re.escape(str(index))} is a DICOMDIR, .* give its folder"):
        dicom.describe_folder(index)  # `ctmri series cd/DICOMDIR` said "is a file, not a folder"


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CTMRIError, match="holds no DICOM series and no 2D pictures .* directly in it"):
        dicom.read_input(tmp_path, "CT")


def test_folder_of_exported_pictures(tmp_path: Path) -> None:
    """A viewer's PNG export of a CT (as the other hospital's here): ``read_input`` (synthesize, batch) stacks it
    (``pictures.py``); the readers that take only volumes name the pictures and the way out."""
    from CTtoMRISynthesisLib.pictures import PictureStack
    from CTtoMRISynthesisLib.volumes import read_volume

    for k in (1, 2, 10):
        sitk.WriteImage(sitk.Image([8, 8], sitk.sitkUInt8), str(tmp_path / f"CT_PNG ({k}).png"))
    image, source = dicom.read_input(tmp_path, "CT")
    assert isinstance(source, PictureStack) and image.GetSize() == (8, 8, 3) and source.gaps == list(range(3, 10)) and source.missing == 7
    expected = r"no DICOM series but 3 2D pictures \(\.png\).*`ctmri synthesize`, `batch` or `evaluate`.*real spacing"
    with pytest.raises(CTMRIError, match=expected):
        read_volume(tmp_path, "CT")
    with pytest.raises(CTMRIError, match=expected):
        dicom.list_series(tmp_path, "CT")


# ------------------------------------------------------------------------------------------ reading


def gdcm_read(folder: Path, series_uid: str) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series_uid))
    return reader.Execute()


def test_read_matches_gdcm_and_the_phantom(study: Path) -> None:
    image, choice = dicom.read_input(study, "CT")
    reference = gdcm_read(study, choice.series.uid)
    assert image.GetSize() == reference.GetSize() == (64, 64, 24)
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(reference))
    truth = np.rint(head_hu(physical_points(image)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), truth)  # HU, after the rescale


def physical_points(image: sitk.Image) -> np.ndarray:
    """Physical centres (z, y, x, 3) of every voxel of ``image``."""
    nx, ny, nz = image.GetSize()
    k, j, i = np.mgrid[0:nz, 0:ny, 0:nx]
    d = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    return np.array(image.GetOrigin()) + np.stack([i, j, k], -1) @ d.T


def test_positions_rounded_to_a_tenth_of_a_mm_are_a_regular_stack(tmp_path: Path) -> None:
    # 0.625 mm slices whose positions the scanner rounded to 0.1 mm (steps 0.6 / 0.7), x and y too:
    # neither uneven spacing nor a tilt, so read as stored, on the regular 0.625 mm grid.
    rng = np.random.default_rng(3)
    positions = [(round(-126.0 + rng.uniform(-0.04, 0.04), 1), -126.0, round(-10.0 + 0.625 * k, 1))
                 for k in range(24)]
    write_series(tmp_path, positions, number=3)
    series = dicom.list_series(tmp_path)[0]
    assert sorted({round(s, 3) for s in series.steps}) == [0.6, 0.7]
    assert series.uniform and not series.sheared and not series.needs_resampling and series.notes == []
    image, _ = dicom.read_input(tmp_path, "CT")
    assert image.GetSize()[2] == 24 and abs(image.GetSpacing()[2] - 0.625) < 0.01


def test_missing_slice_is_refused(study: Path, tmp_path: Path) -> None:
    files = copy_series(study, 3, tmp_path / "ct")
    files[17].unlink()
    listed = dicom.list_series(tmp_path / "ct")
    assert listed[0].problem.startswith("1 slice missing (between")
    assert "missing slices" in dicom._row(listed[0])[10]
    with pytest.raises(CTMRIError) as err:
        dicom.read_input(tmp_path / "ct", "CT")
    assert "1 slice missing" in str(err.value) and "copy the series again completely" in str(err.value)


def test_repeated_positions_are_refused(study: Path, tmp_path: Path) -> None:
    files = copy_series(study, 3, tmp_path / "ct")
    twin = pydicom.dcmread(str(files[5]))
    twin.SOPInstanceUID = twin.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    twin.InstanceNumber = 99
    twin.save_as(str(tmp_path / "ct" / "twin.dcm"))
    with pytest.raises(CTMRIError, match="2 of its images share a slice position"):
        dicom.read_input(tmp_path / "ct", "CT")


def test_sheared_stack_is_resampled_onto_the_true_geometry(tmp_path: Path) -> None:
    # Slices 4 mm apart, each shifted 2 mm (one pixel) further along y: a gantry tilt of 26.6°, as
    # scanners that keep the image plane axial record it. Truth: the phantom at every output voxel.
    positions = [(-126.0, -126.0 + 2.0 * k, -60.0 + 4.0 * k) for k in range(31)]
    uid = write_series(tmp_path, positions, number=3, pixel=(2.0, 2.0), size=(128, 128), tilt=26.6)
    series = dicom.list_series(tmp_path)[0]
    assert series.sheared and series.uniform and abs(series.shear_degrees - math.degrees(math.atan(0.5))) < 1e-6
    image, _ = dicom.read_input(tmp_path, "CT")
    assert image.GetSize() == (128, 128 + 30, 31) and image.GetSpacing() == (2.0, 2.0, 4.0)
    array, truth = sitk.GetArrayFromImage(image), np.rint(head_hu(physical_points(image)))
    covered = np.zeros(array.shape, bool)
    for k in range(31):  # where slice k's pixels are (shifted by k rows)
        covered[k, k : k + 128, :] = True
    np.testing.assert_array_equal(array[covered], truth[covered])
    assert np.all(array[~covered] == -1000)  # padded with the lowest value (air), not invented
    naive = gdcm_read(tmp_path, uid)  # what ignoring the shear gives: a warped head
    naive_truth = np.rint(head_hu(physical_points(naive)))
    assert np.mean(sitk.GetArrayFromImage(naive) != naive_truth) > 0.05


def test_tilted_image_planes_are_placed_correctly(tmp_path: Path) -> None:
    # GE-style gantry tilt: image planes tilted 15° about x, slices stacked along the table (z).
    tilt = math.radians(15.0)
    col = (0.0, math.cos(tilt), math.sin(tilt))
    positions = [(-126.0, -126.0 * math.cos(tilt), -60.0 + 3.0 * k) for k in range(41)]
    uid = write_series(tmp_path, positions, number=3, col=col, tilt=15.0)
    series = dicom.list_series(tmp_path)[0]
    assert series.sheared and series.plane == "axial"
    assert abs(series.shear_degrees - 15.0) < 1e-6
    image, choice = dicom.read_input(tmp_path, "CT")
    message = choice.message("CT")
    assert "gantry tilt/shear 15.0°" in message and "resampled onto a regular grid" in message
    assert choice.provenance()["resampled"].startswith("gantry tilt/shear 15.0°")
    np.testing.assert_allclose(image.GetSpacing()[2], 3.0 * math.cos(tilt), atol=1e-9)
    # Truth: the phantom at every output voxel. The planes coincide with the input planes; each is
    # shifted in-plane by a fraction of a pixel (bilinear), so only edge voxels differ. Ignoring the
    # tilt (GDCM's plain series reading) misplaces the head: measured 108 HU mean error and the skull
    # 14.6 mm off, against 11.8 HU and 0.5 mm here (4 mm pixels, a 7 mm thick skull).
    array, truth = sitk.GetArrayFromImage(image), head_hu(physical_points(image))
    naive = gdcm_read(tmp_path, uid)
    naive_array, naive_truth = sitk.GetArrayFromImage(naive), head_hu(physical_points(naive))
    error, naive_error = np.abs(array - truth).mean(), np.abs(naive_array - naive_truth).mean()
    assert error < 0.2 * naive_error
    skull_shift = np.linalg.norm(centroid(image, array > 500) - centroid(image, truth > 500))
    naive_shift = np.linalg.norm(centroid(naive, naive_array > 500) - centroid(naive, naive_truth > 500))
    assert skull_shift < 1.0 < 10.0 < naive_shift


def centroid(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    return physical_points(image)[mask].mean(axis=0)


def test_uneven_spacing_is_resampled_to_the_finest_step(tmp_path: Path) -> None:
    # 3 mm slices at the base, 6 mm above (numbered consecutively: made so, not slices lost).
    depths = [-60.0 + 3.0 * k for k in range(20)] + [-3.0 + 6.0 * k for k in range(1, 11)]
    positions = [(-126.0, -126.0, z) for z in depths]
    write_series(tmp_path, positions, number=3)
    series = dicom.list_series(tmp_path)[0]
    assert not series.uniform and series.problem is None and series.needs_resampling
    assert dicom._row(series)[7:10] == ("3-6", "-", "no")
    image, _ = dicom.read_input(tmp_path, "CT")
    assert image.GetSize()[2] == 40 and image.GetSpacing()[2] == 3.0
    array = sitk.GetArrayFromImage(image)
    truth = np.rint(head_hu(physical_points(image)))
    on_a_slice = [k for k in range(40) if np.isclose(-60.0 + 3.0 * k, depths).any()]
    between = [k for k in range(40) if k not in on_a_slice]
    assert len(on_a_slice) == 30 and len(between) == 10
    np.testing.assert_array_equal(array[on_a_slice], truth[on_a_slice])
    for k in between:  # halfway between two 6 mm slices: their mean
        np.testing.assert_allclose(array[k], (array[k - 1] + array[k + 1]) / 2, atol=1e-3)
    # As one of several series, the rule passes it over.
    write_series(tmp_path, axial(20, 6.0), number=2)
    choice = dicom.choose_series(dicom.list_series(tmp_path), "CT")
    assert choice.series.number == 2 and "3 (non-uniform slice spacing)" in choice.reason


# ------------------------------------------------------------------------------------------ writing


def grid_image(array: np.ndarray, spacing, origin, direction) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def oblique_result() -> SynthesisResult:
    """A result on an anisotropic, oblique grid (sx ≠ sy, rotated): row/column mix-ups cannot pass."""
    rng = np.random.default_rng(0)
    a = math.radians(20.0)
    direction = (math.cos(a), -math.sin(a), 0.0, math.sin(a), math.cos(a), 0.0, 0.0, 0.0, 1.0)
    spacing, origin = (0.8, 1.1, 3.0), (-30.0, -40.0, 12.5)
    shape = (7, 48, 40)
    syn = rng.uniform(0, 255, shape)
    syn[:, :4] = 0.0
    diff = rng.uniform(-255, 255, shape)
    unc = rng.uniform(0, 12, shape)
    ct = rng.uniform(-1024, 3071, shape)
    return SynthesisResult(
        synthetic_mri=grid_image(syn, spacing, origin, direction),
        difference=grid_image(diff, spacing, origin, direction),
        uncertainty=grid_image(unc, spacing, origin, direction),
        ct_registered=grid_image(ct, spacing, origin, direction),
        weights={"file": "model.safetensors", "sha256": SHA},
    )


def read_back(folder: Path) -> tuple:
    """The series in ``folder`` read by SimpleITK (GDCM) and its pydicom datasets."""
    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    assert len(ids) == 1
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), ids[0]))
    return reader.Execute(), [pydicom.dcmread(str(p)) for p in sorted(folder.iterdir())]


def assert_same_volume(written: sitk.Image, nrrd: sitk.Image, tolerance: float) -> None:
    assert written.GetSize() == nrrd.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), nrrd.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(written.GetOrigin(), nrrd.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), nrrd.GetDirection(), atol=1e-6)
    delta = np.abs(sitk.GetArrayFromImage(written).astype(np.float64) - sitk.GetArrayFromImage(nrrd))
    assert delta.max() <= tolerance


def pydicom_volume(datasets: list) -> np.ndarray:
    """Rescaled pixels stacked in slice order (along the IOP normal), as pydicom gives them."""
    normal = np.cross(*np.array(datasets[0].ImageOrientationPatient, float).reshape(2, 3))
    ordered = sorted(datasets, key=lambda ds: float(np.dot(np.array(ds.ImagePositionPatient, float), normal)))
    return np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in ordered])


@pytest.mark.filterwarnings("error:The value length")  # no value beyond its VR's length (the pad)
def test_every_output_volume_becomes_a_series_in_the_ct_study(study: Path, tmp_path: Path) -> None:
    _, choice = dicom.read_input(study, "CT")
    result = oblique_result()
    out = tmp_path / "out"
    paths = save_outputs(result, out, extra_writer=dicom_out.dicom_writer(result, choice, choice))
    assert paths["dicom"] == out / "dicom"
    assert sorted(p.name for p in (out / "dicom").iterdir()) == sorted([*result.output_images(), ".ctmri-output"])
    all_uids = []
    for kind, image in result.output_images().items():
        nrrd = sitk.ReadImage(str(out / f"{kind}.nrrd"))
        written, datasets = read_back(out / "dicom" / kind)
        assert len(datasets) == image.GetSize()[2]  # one file per slice
        # ±1 grey level is the requirement; the power-of-two rescale keeps far finer steps.
        assert_same_volume(written, nrrd, tolerance=0.5 * float(datasets[0].RescaleSlope) + 1e-6)
        values = pydicom_volume(datasets)
        assert np.abs(values - sitk.GetArrayFromImage(nrrd)).max() <= 0.5 * float(datasets[0].RescaleSlope) + 1e-6
        first = datasets[0]
        modality = "CT" if kind == "ct_registered" else "MR"
        assert first.Modality == modality
        assert first.SOPClassUID == (dicom_out.CT_IMAGE_STORAGE if modality == "CT" else dicom_out.MR_IMAGE_STORAGE)
        assert list(first.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "not for diagnosis" in first.SeriesDescription
        if modality == "MR":
            assert first.SeriesDescription.startswith("Synthetic MRI - not for diagnosis")
        assert "SpecificCharacterSet" not in first and first.LossyImageCompression == "00"  # all ASCII; not lossy
        assert first.StudyInstanceUID == STUDY_UID and first.FrameOfReferenceUID == FOR_UID
        assert (str(first.PatientName), first.PatientID, first.PatientSex) == ("Phantom^Head", "PH001", "O")
        assert [v.strip() for v in first.SoftwareVersions] == [f"ctmri {version_string()}", SHA]
        assert SHA in first.DerivationDescription and "Not for diagnosis" in first.DerivationDescription
        assert [float(v) for v in first.PixelSpacing] == [1.1, 0.8]  # between rows (y), between columns (x)
        assert float(first.SliceThickness) == 4.0  # the CT series' own thickness
        assert float(first.SpacingBetweenSlices) == 3.0
        assert first.PixelRepresentation == 1 and float(first.RescaleIntercept) == 0.0
        if kind == "difference":
            assert float(first.WindowCenter) == 0.0 and values.min() < 0  # signed values kept
        assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
        assert [ds.InstanceNumber for ds in datasets] == list(range(1, len(datasets) + 1))
        all_uids += [first.SeriesInstanceUID] + [ds.SOPInstanceUID for ds in datasets]
        for ds in datasets:
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert len(all_uids) == len(set(all_uids))  # new and unique
    assert all(UID(u).is_valid for u in all_uids + [STUDY_UID, FOR_UID])
    assert choice.series.uid not in all_uids


def test_what_the_ct_says_of_itself_is_carried_on(tmp_path: Path) -> None:
    """Lossy compression, once in a source, must be said by every image derived from it (it was always "00");
    a CT without StudyInstanceUID gave series without one (type 1); UTF-8 was declared for every file, for the
    em dash of the descriptions alone, and is now declared only for a name that needs it."""
    extra = {"SpecificCharacterSet": "ISO_IR 100", "PatientName": "Müller^Jürgen", "LossyImageCompression": "01",
             "LossyImageCompressionRatio": "10", "LossyImageCompressionMethod": "ISO_10918_1"}
    write_series(tmp_path / "ct", axial(6, 4.0), number=3, thickness=4.0, study_uid="", extra=extra)
    _, choice = dicom.read_input(tmp_path / "ct", "CT")
    result = oblique_result()
    save_outputs(result, tmp_path / "out", extra_writer=dicom_out.dicom_writer(result, choice, choice))
    _, datasets = read_back(tmp_path / "out" / "dicom" / "synthetic_mri")
    first = datasets[0]
    assert first.LossyImageCompression == "01" and float(first.LossyImageCompressionRatio) == 10.0
    assert first.LossyImageCompressionMethod == "ISO_10918_1"
    assert first.SpecificCharacterSet == "ISO_IR 192" and str(first.PatientName) == "Müller^Jürgen"
    assert UID(first.StudyInstanceUID).is_valid and len({ds.StudyInstanceUID for ds in datasets}) == 1


def test_a_ct_and_an_mri_of_two_patients_are_said_and_never_filed_together(study: Path, tmp_path: Path,
                                                                          capsys) -> None:
    """Another patient's MRI was taken without a word, and with --dicom its difference map was filed in the CT
    patient's study under the CT's name."""
    from CTtoMRISynthesisLib import cli

    mr = tmp_path / "mr"
    write_series(mr, axial(6, 4.0), number=5, modality="MR", study_uid=generate_uid(),
                 extra={"PatientID": "OTHER-999", "PatientName": "Other^Patient"})
    _, ct_choice = dicom.read_input(study, "CT")
    _, mr_choice = dicom.read_input(mr, "MRI")
    assert dicom.patient_mismatch(ct_choice, mr_choice) == ("the CT's and the MRI's DICOM headers name two patients "
                                                            "(their PatientID differs)")
    assert dicom.patient_mismatch(ct_choice, ct_choice) is None and dicom.patient_mismatch(ct_choice, None) is None
    code = cli.main(["synthesize", "--ct", str(study), "--mri", str(mr), "--out-dir", str(tmp_path / "out"),
                     "--dicom", "--quiet"])
    assert code == 2 and "name two patients (their PatientID differs): --dicom would file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ct_path, intercept, rescale_type", [("hu", 0, "HU"), ("hu+1024", -1024, "HU"),
                                                             ("windowed8bit", 0, "US")])
def test_registered_ct_is_labelled_hu_only_when_it_is(tmp_path: Path, ct_path, intercept, rescale_type) -> None:
    result = oblique_result()
    result.normalisation = {"ct_path": ct_path}
    out = tmp_path / "out"
    save_outputs(result, out, extra_writer=dicom_out.dicom_writer(result))
    written, datasets = read_back(out / "dicom" / "ct_registered")
    assert (float(datasets[0].RescaleIntercept), datasets[0].RescaleType) == (intercept, rescale_type)
    nrrd = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ct_registered.nrrd")))
    assert np.abs(sitk.GetArrayFromImage(written) - (nrrd + intercept)).max() <= 0.0625 + 1e-4  # slope 1/8
    # a viewer opens a Hounsfield CT in a brain window (level 40, width 400 HU), not stretched over its range;
    # an 8-bit CT over its own values
    window = (float(datasets[0].WindowCenter), float(datasets[0].WindowWidth))
    values = sitk.GetArrayFromImage(written)
    # (the 8-bit window is the volume's range before quantisation: within the slope, 1/8, of the stored values')
    expected = (40.0, 400.0) if rescale_type == "HU" else ((values.min() + values.max()) / 2, np.ptp(values))
    assert window == pytest.approx(expected, abs=0.0625 + 1e-4)


def test_without_a_dicom_ct_the_series_go_into_a_new_study(tmp_path: Path) -> None:
    result = oblique_result()
    out = tmp_path / "out"
    save_outputs(result, out, extra_writer=dicom_out.dicom_writer(result, None, None))
    firsts = [read_back(out / "dicom" / kind)[1][0] for kind in result.output_images()]
    assert len({ds.StudyInstanceUID for ds in firsts}) == 1  # one new study for all
    assert len({ds.FrameOfReferenceUID for ds in firsts}) == 1
    assert firsts[0].StudyInstanceUID != STUDY_UID and UID(firsts[0].StudyInstanceUID).is_valid
    assert UID(firsts[0].FrameOfReferenceUID).is_valid and firsts[0].PatientID == ""


def test_a_ct_from_a_file_with_a_dicom_mri_goes_into_the_mri_patients_study(tmp_path: Path) -> None:
    """The outputs lie on the MRI's grid and frame of reference; they were an anonymous new study beside it."""
    mr_uid = generate_uid()
    write_series(tmp_path / "mr", axial(6, 4.0), number=5, modality="MR", study_uid=mr_uid,
                 extra={"PatientID": "MR-7", "PatientName": "Mr^Patient"})
    _, mr_choice = dicom.read_input(tmp_path / "mr", "MRI")
    result = oblique_result()
    save_outputs(result, tmp_path / "out", extra_writer=dicom_out.dicom_writer(result, None, mr_choice))
    first = read_back(tmp_path / "out" / "dicom" / "synthetic_mri")[1][0]
    assert (first.StudyInstanceUID, first.PatientID, str(first.PatientName)) == (mr_uid, "MR-7", "Mr^Patient")
    assert first.FrameOfReferenceUID == FOR_UID


def test_left_handed_grid_is_written_in_physical_space(tmp_path: Path) -> None:
    # A grid whose slices run downwards (det −1): readers sort by position; the voxels stay where they are.
    array = np.random.default_rng(1).uniform(0, 255, (6, 20, 24))
    image = grid_image(array, (1.0, 1.5, 2.5), (10.0, -5.0, 30.0), (1, 0, 0, 0, 1, 0, 0, 0, -1))
    result = SynthesisResult(synthetic_mri=image, weights={})
    out = tmp_path / "out"
    save_outputs(result, out, extra_writer=dicom_out.dicom_writer(result))
    written, datasets = read_back(out / "dicom" / "synthetic_mri")
    assert datasets[0].SoftwareVersions.strip() == f"ctmri {version_string()}"  # one value: no checksum claimed
    back = sitk.Resample(written, image, sitk.Transform(), sitk.sitkNearestNeighbor, -1.0)
    assert np.abs(sitk.GetArrayFromImage(back) - sitk.GetArrayFromImage(image)).max() <= 1 / 256 + 1e-5


def test_dicom_outputs_are_all_or_nothing(tmp_path: Path, monkeypatch) -> None:
    import errno

    result = oblique_result()
    out = tmp_path / "out"
    save_outputs(result, out, extra_writer=dicom_out.dicom_writer(result))  # an earlier, complete run
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_save, calls = dicom_out._save, []

    def disk_full_at_the_tenth_file(ds, path):
        calls.append(path)
        if len(calls) == 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(ds, path)

    monkeypatch.setattr(dicom_out, "_save", disk_full_at_the_tenth_file)
    with pytest.raises(CTMRIError, match="No space left on device; free disk space"):
        save_outputs(result, out, extra_writer=dicom_out.dicom_writer(result))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the earlier run untouched, no partial series, no temporary folder
    monkeypatch.undo()
    save_outputs(result, out)  # a run without --dicom replaces the folder's run, DICOM included
    assert not (out / "dicom").exists()


def test_a_dicom_folder_of_the_users_in_out_dir_is_never_touched(tmp_path: Path) -> None:
    """``OUT/dicom/`` that ctmri did not write (say the patient's own study, next to where the outputs go) is left
    as it is by a run without DICOM output, and a run with DICOM output is refused before it writes anything;
    the folders ctmri writes carry a marker, and only those are replaced or removed."""
    result = oblique_result()
    out = tmp_path / "patient"
    users = out / "dicom" / "series1"
    users.mkdir(parents=True)
    (users / "IM0001.dcm").write_bytes(b"the user's scan")
    save_outputs(result, out)
    assert (users / "IM0001.dcm").read_bytes() == b"the user's scan" and (out / "synthetic_mri.nrrd").exists()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(CTMRIError, match=r"dicom exists and was not written by ctmri .*choose another --out-dir"):
        save_outputs(result, out, extra_writer=dicom_out.dicom_writer(result))
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    ours = tmp_path / "other"
    save_outputs(result, ours, extra_writer=dicom_out.dicom_writer(result))
    assert (ours / "dicom" / ".ctmri-output").is_file()
    save_outputs(result, ours, extra_writer=dicom_out.dicom_writer(result))  # ours: replaced
    save_outputs(result, ours)  # ours: removed by a run without DICOM output
    assert not (ours / "dicom").exists()


def test_synthesize_never_deletes_the_study_it_reads_from_out_dir(study: Path, tmp_path: Path, capsys) -> None:
    """The layout ``patient/dicom/`` (the scan) with ``--out-dir patient``: the run used to move ``dicom/`` aside
    as an earlier output and delete it with its temporary folder."""
    pytest.importorskip("torch")
    from CTtoMRISynthesisLib import cli

    patient = tmp_path / "patient"
    shutil.copytree(study, patient / "dicom")
    before = {p.relative_to(patient): p.read_bytes() for p in patient.rglob("*") if p.is_file()}
    assert cli.main(["synthesize", "--ct", str(patient / "dicom"), "--out-dir", str(patient), "--quiet"]) == 0
    after = {p.relative_to(patient): p.read_bytes() for p in patient.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k.parts[0] == "dicom"} == before
    code = cli.main(["synthesize", "--ct", str(patient / "dicom"), "--out-dir", str(patient), "--dicom", "--quiet"])
    assert code == 2 and "not written by ctmri" in capsys.readouterr().err
    assert {p.relative_to(patient): p.read_bytes() for p in patient.rglob("*") if p.is_file()} == after


def test_a_deidentified_study_gets_no_real_dates(tmp_path: Path) -> None:
    """A study whose dates were shifted or removed (PatientIdentityRemoved YES) gets derived series without
    today's date (which would tell the shift), and dciodvfy still finds no error; another study gets today's."""
    import datetime

    result = oblique_result()
    markers = [{"PatientIdentityRemoved": "YES", "DeidentificationMethod": "Dates modified"},
               {"DeidentificationMethod": "Basic Profile"}, {"LongitudinalTemporalInformationModified": "MODIFIED"},
               {}]
    for k, extra in enumerate(markers):
        deidentified = bool(extra)
        write_series(tmp_path / f"ct{k}", axial(6, 4.0), number=3, thickness=4.0, extra=extra)
        _, choice = dicom.read_input(tmp_path / f"ct{k}", "CT")
        out = tmp_path / f"out{k}"
        save_outputs(result, out, extra_writer=dicom_out.dicom_writer(result, choice, choice))
        first = pydicom.dcmread(sorted((out / "dicom" / "synthetic_mri").iterdir())[0])
        dates = [first.get(k) for k in ("SeriesDate", "ContentDate", "InstanceCreationDate", "SeriesTime",
                                         "ContentTime", "InstanceCreationTime")]
        if deidentified:
            assert dates == [None] * 6 and first.StudyDate == "20240101", extra
        else:
            assert dates[0] == datetime.date.today().strftime("%Y%m%d") and all(dates)
        if shutil.which("dciodvfy") and k in (0, 3):  # (the other two sources lack the rest of their profile)
            report = subprocess.run(["dciodvfy", str(sorted((out / "dicom" / "synthetic_mri").iterdir())[0])],
                                    capture_output=True, text=True).stderr
            assert not [line for line in report.splitlines() if line.startswith("Error")], report


def test_series_numbers_keep_off_those_the_study_already_has(tmp_path: Path) -> None:
    """An earlier run's series imported into the CT's study (9001, 9003): the new ones move up by 10 (9011…), and
    by 20 when those are taken too; numbers of another study do not count."""
    result = oblique_result()
    write_series(tmp_path / "study", axial(6, 4.0), number=3, thickness=4.0)
    write_series(tmp_path / "study", axial(6, 4.0), number=9002, thickness=4.0, study_uid="1.2.3.4.5")  # other study
    numbers = []
    for round_, taken in enumerate(((), (9001, 9003), (9014,))):
        for number in taken:
            write_series(tmp_path / "study", axial(6, 4.0), number=number, thickness=4.0, modality="MR")
        _, choice = dicom.read_input(tmp_path / "study", "CT", "3")
        out = tmp_path / f"out{round_}"
        save_outputs(result, out, extra_writer=dicom_out.dicom_writer(result, choice, choice))
        numbers.append(sorted(int(pydicom.dcmread(sorted((out / "dicom" / kind).iterdir())[0]).SeriesNumber)
                              for kind in result.output_images()))
    assert numbers == [[9001, 9002, 9003, 9004], [9011, 9012, 9013, 9014], [9021, 9022, 9023, 9024]]


def test_validator_accepts_the_written_files(tmp_path: Path) -> None:
    """dciodvfy (Debian's dicom3tools) finds no errors; its warnings are the Modality LUT in MR images."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")
    result = oblique_result()
    out = tmp_path / "out"
    save_outputs(result, out, extra_writer=dicom_out.dicom_writer(result))
    for kind in result.output_images():
        path = sorted((out / "dicom" / kind).iterdir())[0]
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True).stderr
        assert not [line for line in report.splitlines() if line.startswith("Error")], report


# --------------------------------------------------------------------------- the command, end to end


@pytest.mark.filterwarnings("error:The value length")  # no value beyond its VR's length (the pad)
def test_synthesize_from_a_study_writes_dicom(study: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("torch")
    from CTtoMRISynthesisLib import cli

    out = tmp_path / "out"
    assert cli.main(["synthesize", "--ct", str(study), "--out-dir", str(out), "--dicom", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("CT: DICOM series 3 (CT axial, 24 slices of 4 mm) — the thinnest")
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["ct_series"]["number"] == 3 and summary["ct_series"]["description"] == "Head 4mm"
    nrrd = sitk.ReadImage(str(out / "synthetic_mri.nrrd"))
    written, datasets = read_back(out / "dicom" / "synthetic_mri")
    assert_same_volume(written, nrrd, tolerance=1.0)
    assert np.abs(pydicom_volume(datasets) - sitk.GetArrayFromImage(nrrd)).max() <= 1.0
    assert datasets[0].StudyInstanceUID == STUDY_UID and datasets[0].FrameOfReferenceUID == FOR_UID
    assert list(datasets[0].SoftwareVersions)[1] == summary["weights"]["sha256"]
    assert sorted(p.name for p in (out / "dicom").iterdir()) == [".ctmri-output", "synthetic_mri", "uncertainty"]


def test_batch_takes_each_cases_series_from_the_manifest(study: Path, tmp_path: Path, capsys) -> None:
    """The manifest's optional ct_series / mri_series columns are batch's --ct-series / --mri-series, per case
    (before, a study the rule could not choose in failed with advice naming --ct-series, which batch lacks):
    recorded in made_from, so another choice redoes the case; a series not there is that case's error, in the
    manifest's terms."""
    pytest.importorskip("torch")
    from CTtoMRISynthesisLib import cli

    manifest = tmp_path / "cases.csv"
    as_file = tmp_path / "ct.nrrd"
    sitk.WriteImage(dicom.read_input(study, "CT")[0], str(as_file))
    manifest.write_text(f"id,ct,mri,ct_series\nrule,{study},,\nthick,{study},,2\nnone,{study},,42\n"
                        f"ct-as-mri,{study},{study},\nfile,{as_file},,3\n")
    out = tmp_path / "cohort"
    assert cli.main(["batch", "--manifest", str(manifest), "--out-dir", str(out), "--quiet"]) == 1
    console = capsys.readouterr().out
    # which series each case took is in the summary and on its console line, not only in its own folder
    with open(out / "summary.csv", newline="") as handle:
        taken = {row["id"]: row["series"] for row in csv.DictReader(handle)}
    assert taken == {"rule": "CT 3", "thick": "CT 2", "none": "", "ct-as-mri": "", "file": ""}, taken
    assert any(li.startswith("ok    thick") and "series CT 2" in li for li in console.splitlines()), console
    records = {case: json.loads((out / case / "metrics.json").read_text()) for case in ("rule", "thick")}
    assert records["rule"]["ct_series"]["number"] == 3 and records["thick"]["ct_series"]["number"] == 2
    assert records["thick"]["made_from"]["options"]["ct_series"] == "2"
    assert sitk.ReadImage(str(out / "thick" / "synthetic_mri.nrrd")).GetSize()[2] == 12
    with open(out / "summary.csv", newline="") as handle:
        failed = {row["id"]: row for row in csv.DictReader(handle)}["none"]
    assert failed["status"] == "error" and "series 42 is not in" in failed["message"]
    assert "the manifest's ct_series column" in failed["message"] and "--ct-series" not in failed["message"]
    with open(out / "summary.csv", newline="") as handle:  # a study of CT series only as the MRI: said at once
        failed = {row["id"]: row for row in csv.DictReader(handle)}["ct-as-mri"]["message"]
    assert "holds only CT series" in failed and "give the MRI's own folder" in failed, failed
    assert "--mri-series" not in failed
    with open(out / "summary.csv", newline="") as handle:  # a series asked of a file: the column is left empty
        failed = {row["id"]: row for row in csv.DictReader(handle)}["file"]["message"]
    assert "the manifest's ct_series column chooses a series in a DICOM folder" in failed and "leave it empty" in failed
    manifest.write_text(f"id,ct,mri_series\nx,{study},5\n")
    assert cli.main(["batch", "--manifest", str(manifest), "--out-dir", str(out), "--quiet"]) == 2
    assert "has an mri_series but no mri path" in capsys.readouterr().err


def test_synthesize_with_an_unknown_series_stops_before_work(study: Path, tmp_path: Path, capsys) -> None:
    from CTtoMRISynthesisLib import cli

    out = tmp_path / "out"
    code = cli.main(["synthesize", "--ct", str(study), "--ct-series", "42", "--out-dir", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: CT series 42 is not in {study}; give to --ct-series one of the numbers or UIDs it holds: 1 (CT localizer")
    assert not out.exists()


def test_synthesize_with_an_mri_writes_difference_and_registered_ct(study: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from CTtoMRISynthesisLib import cli

    ct, _ = dicom.read_input(study, "CT")
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    mri = grid_image(np.where(hu > 500, 20.0, np.where(hu > 20, 120.0, np.where(hu > -500, 230.0, 0.0))),
                     ct.GetSpacing(), ct.GetOrigin(), ct.GetDirection())
    sitk.WriteImage(mri, str(tmp_path / "mri.nrrd"))
    out = tmp_path / "out"
    assert cli.main(["synthesize", "--ct", str(study), "--ct-series", "2", "--mri", str(tmp_path / "mri.nrrd"),
                     "--registration", "none", "--out-dir", str(out), "--dicom", "--quiet"]) == 0
    assert json.loads((out / "metrics.json").read_text())["ct_series"]["number"] == 2
    kinds = sorted(p.name for p in (out / "dicom").iterdir() if p.name != ".ctmri-output")
    assert {"ct_registered", "difference", "synthetic_mri"} <= set(kinds)
    assert kinds == sorted(p.stem for p in out.glob("*.nrrd"))  # every output volume, nothing else
    for kind in kinds:
        written, datasets = read_back(out / "dicom" / kind)
        assert_same_volume(written, sitk.ReadImage(str(out / f"{kind}.nrrd")), tolerance=1.0)
        assert datasets[0].StudyInstanceUID == STUDY_UID  # the CT's study...
        assert datasets[0].FrameOfReferenceUID != FOR_UID  # ...on the MRI's grid, whose frame is not known
    assert read_back(out / "dicom" / "ct_registered")[1][0].Modality == "CT"


def test_synthesize_with_a_dicom_mri_uses_its_frame_of_reference(study: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("torch")
    from CTtoMRISynthesisLib import cli

    mr_for = "1.2.826.0.1.3680043.8.498.1000003"
    write_series(tmp_path / "mr", axial(10, 8.0), number=5, modality="MR", for_uid=mr_for,
                 study_uid="1.2.826.0.1.3680043.8.498.1000004", image_type=("ORIGINAL", "PRIMARY", "M"))
    write_series(tmp_path / "mr" / "scout", [(0.0, -126.0, 126.0)], number=1, modality="MR", for_uid=mr_for,
                 study_uid="1.2.826.0.1.3680043.8.498.1000004", row=(0, 1, 0), col=(0, 0, -1),
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    out = tmp_path / "out"
    assert cli.main(["synthesize", "--ct", str(study), "--mri", str(tmp_path / "mr"), "--registration", "none",
                     "--out-dir", str(out), "--dicom", "--quiet"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("CT: DICOM series 3") and printed[1].startswith("MRI: DICOM series 5")
    summary = json.loads((out / "metrics.json").read_text())
    assert (summary["ct_series"]["number"], summary["mri_series"]["number"]) == (3, 5)
    first = read_back(out / "dicom" / "synthetic_mri")[1][0]
    assert first.StudyInstanceUID == STUDY_UID  # the CT's study, on the MRI's grid and frame of reference
    assert first.FrameOfReferenceUID == mr_for and first.Rows == 64
    assert len(list((out / "dicom" / "synthetic_mri").iterdir())) == 10  # the MRI's 10 slices

    # evaluate reads both DICOM folders: the reference's MR series by the rule (every MR series used to be
    # rejected there as "modality MR"), the prediction's among the outputs' series with --pred-series, which
    # the error names (it used to advise --ct-series, which evaluate does not have)
    capsys.readouterr()
    ref = ["--ref", str(tmp_path / "mr")]
    assert cli.main(["evaluate", "--pred", str(out / "dicom"), *ref]) == 2
    err = capsys.readouterr().err
    assert "choose one with --pred-series NUMBER or UID" in err and "--ct-series" not in err, err
    assert cli.main(["evaluate", "--pred", str(out / "dicom"), "--pred-series", "9001", *ref,
                     "--json", str(tmp_path / "d.json")]) == 0
    assert cli.main(["evaluate", "--pred", str(out / "synthetic_mri.nrrd"), *ref, "--json", str(tmp_path / "n.json")]) == 0
    from_dicom, from_nrrd = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("d", "n"))
    assert from_dicom["inputs"]["prediction"]["number"] == 9001 and from_dicom["inputs"]["reference_MRI"]["number"] == 5
    assert abs(from_dicom["mae"] - from_nrrd["mae"]) < 0.01  # the series holds the volume to 1/256 of a grey level
    assert cli.main(["evaluate", "--pred", str(out / "dicom"), "--pred-series", "9004", *ref]) == 2
    assert "is a CT series (Modality CT); give the prediction" in capsys.readouterr().err


# ------------------------------------------------------------------------ the real scanner study


@pytest.fixture(scope="module")
def real_study() -> Path:
    return require(data_root() / "real_hu_head_ct_dicom")


def real_series_files(real_study: Path, number: int) -> list:
    """The files of one series of the real study, in slice order (from the headers)."""
    series = by_number(dicom.list_series(real_study))[number]
    return [f.path for f in series.files]


def test_a_reformat_with_a_stray_image_names_it_and_the_rest_reads(real_study: Path, tmp_path: Path) -> None:
    """The real study's coronal and sagittal reformats each hold one image in another orientation (as scanners add
    a reference image to a reformat): the series is refused naming that file, and the others, copied into a folder
    of their own as the message says, read as a volume in their plane."""
    listed = by_number(dicom.list_series(real_study))
    for number, plane, count in ((601, "coronal", 110), (602, "sagittal", 88)):
        problem = listed[number].problem
        named = re.search(r"the 1 image in another orientation: (\S+)\. To read the other (\d+) \((\w+)\) as a "
                          r"volume, copy them into a folder of their own without it", problem)
        assert named and (int(named.group(2)), named.group(3)) == (count, plane), problem
        folder = tmp_path / str(number)
        folder.mkdir()
        for f in listed[number].files:
            if f.path.name != named.group(1):
                shutil.copy(f.path, folder / f.path.name)
        image, choice = dicom.read_input(folder, "CT")
        assert (choice.series.plane, choice.series.slices, image.GetSize()[2]) == (plane, count, count)


def test_real_study_listing_and_choice(real_study: Path) -> None:
    listed = by_number(dicom.list_series(real_study))
    assert sorted(listed) == [1, 2, 3, 601, 602]
    assert [listed[n].slices for n in (1, 2, 3, 601, 602)] == [2, 34, 67, 111, 89]
    assert listed[1].plane == "localizer" and listed[2].plane == listed[3].plane == "axial"
    assert (listed[601].plane, listed[602].plane) == ("coronal", "sagittal")
    assert listed[3].uniform and listed[3].step == 2.5 and not listed[3].sheared
    choice = dicom.choose_series(list(listed.values()), "CT", folder=real_study)
    assert choice.series.number == 3
    image = dicom.read_series(choice.series, "CT")
    reference = gdcm_read(real_study / "DICOM", choice.series.uid)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(reference))


def test_real_study_with_a_slice_dropped_is_refused(real_study: Path, tmp_path: Path) -> None:
    files = real_series_files(real_study, 3)
    (tmp_path / "ct").mkdir()
    for path in files[:30] + files[31:]:
        shutil.copy(path, tmp_path / "ct" / path.name)
    with pytest.raises(CTMRIError, match=r"1 slice missing .* copy the series again completely"):
        dicom.read_input(tmp_path / "ct", "CT")


def test_real_study_with_tilt_tags_is_resampled(real_study: Path, tmp_path: Path) -> None:
    # Each slice moved one pixel further posterior than the last (as a tilted gantry records it) and
    # the tilt written in GantryDetectorTilt: slice k must come out shifted by exactly k rows.
    files = real_series_files(real_study, 3)
    (tmp_path / "ct").mkdir()
    originals = []
    for k, path in enumerate(files):
        ds = pydicom.dcmread(str(path))
        pixel = float(ds.PixelSpacing[0])
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [dicom_out._ds(x), dicom_out._ds(y + k * pixel), dicom_out._ds(z)]
        ds.GantryDetectorTilt = dicom_out._ds(math.degrees(math.atan(pixel / 2.5)))
        ds.save_as(str(tmp_path / "ct" / path.name))
        originals.append(path)
    image, choice = dicom.read_input(tmp_path / "ct", "CT")
    assert "gantry tilt/shear 11.1°" in choice.message("CT")  # atan(0.488281 / 2.5)
    plain = sitk.GetArrayFromImage(dicom.read_input(real_study, "CT", "3")[0]).astype(np.float32)
    array = sitk.GetArrayFromImage(image)
    assert array.shape == (67, 512 + 66, 512)
    for k in (0, 20, 66):
        np.testing.assert_array_equal(array[k, k : k + 512], plain[k])  # whole-pixel shifts: copied exactly


def test_real_study_with_uneven_spacing_is_resampled(real_study: Path, tmp_path: Path) -> None:
    # Every other slice of the upper half removed and the rest renumbered: 2.5 mm below, 5 mm above.
    files = real_series_files(real_study, 3)
    kept = files[:34] + files[35::2]
    (tmp_path / "ct").mkdir()
    for number, path in enumerate(kept, start=1):
        ds = pydicom.dcmread(str(path))
        ds.InstanceNumber = number
        ds.save_as(str(tmp_path / "ct" / path.name))
    image, choice = dicom.read_input(tmp_path / "ct", "CT")
    assert "non-uniform steps 2.5-5 mm" in choice.message("CT")
    plain = sitk.GetArrayFromImage(dicom.read_input(real_study, "CT", "3")[0]).astype(np.float32)
    array = sitk.GetArrayFromImage(image)
    assert array.shape == (66, 512, 512)  # the top slice was dropped: 66 positions of 2.5 mm remain
    np.testing.assert_array_equal(array[:34], plain[:34])
    np.testing.assert_array_equal(array[35::2], plain[35:66:2])
    # The dropped slices come back as the mean of their neighbours, which resembles what was there
    # (measured: correlation 0.99 mid-head down to 0.77 near the vertex, where the skull's section
    # changes fastest): interpolation, honestly labelled "resampled", not invented anatomy.
    correlations = []
    for k in range(34, 65, 2):
        np.testing.assert_allclose(array[k], (plain[k - 1] + plain[k + 1]) / 2, atol=1e-3)
        head = plain[k] > -300
        correlations.append(np.corrcoef(array[k][head], plain[k][head])[0, 1])
    assert min(correlations) > 0.7 and max(correlations) > 0.98


@pytest.mark.slow
def test_real_study_synthesize_dicom(real_study: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("torch")
    from CTtoMRISynthesisLib import cli

    out = tmp_path / "out"
    assert cli.main(["synthesize", "--ct", str(real_study), "--out-dir", str(out), "--dicom", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("CT: DICOM series 3 (CT axial, 67 slices of 2.5 mm)")
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["ct_series"]["number"] == 3
    original = pydicom.dcmread(str(real_series_files(real_study, 3)[0]), stop_before_pixels=True)
    nrrd = sitk.ReadImage(str(out / "synthetic_mri.nrrd"))
    written, datasets = read_back(out / "dicom" / "synthetic_mri")
    assert_same_volume(written, nrrd, tolerance=1.0)
    assert np.abs(pydicom_volume(datasets) - sitk.GetArrayFromImage(nrrd)).max() <= 1.0
    first = datasets[0]
    assert first.StudyInstanceUID == original.StudyInstanceUID
    assert first.FrameOfReferenceUID == original.FrameOfReferenceUID
    assert (first.PatientID, first.PatientIdentityRemoved) == (original.PatientID, "YES")
    assert "SeriesDate" not in first and "ContentDate" not in first  # its dates were shifted: no real date beside them
    uids = [ds.SOPInstanceUID for ds in datasets] + [first.SeriesInstanceUID]
    assert len(set(uids)) == len(uids) and all(UID(u).is_valid for u in uids)
    if shutil.which("dciodvfy"):
        report = subprocess.run(["dciodvfy", str(sorted((out / "dicom" / "synthetic_mri").iterdir())[0])],
                                capture_output=True, text=True).stderr
        assert not [line for line in report.splitlines() if line.startswith("Error")], report
