"""A folder of 2D pictures read as one volume (``pictures.py``): order, spacing, the grey rule, refusals, and the
same synthetic MRI as the same voxels given as a volume file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import phantoms
from CTtoMRISynthesisLib import dicom, pictures
from CTtoMRISynthesisLib.errors import CTMRIError


@pytest.fixture(scope="module")
def ct_stack() -> np.ndarray:
    """A phantom 8-bit CT of 12 slices, 256 × 256."""
    return phantoms.slice_pair(seed=41, slices=12, first_z=-30.0)[0]


def test_natural_order_spacing_assumed_and_recorded(ct_stack, tmp_path: Path) -> None:
    folder = phantoms.write_pictures(tmp_path / "ct", ct_stack)
    (folder / "notes.txt").write_text("not a picture")
    image, stack = pictures.read_pictures(folder, "CT")
    array = sitk.GetArrayFromImage(image)
    assert array.dtype == np.uint8  # 8-bit stays 8-bit: normalise_ct reads it as a windowed CT, not HU
    np.testing.assert_array_equal(array, ct_stack)  # CT_PNG (2) before CT_PNG (10)
    assert image.GetSpacing() == (1.0, 1.0, 1.0) and image.GetOrigin() == (0.0, 0.0, 0.0)
    assert stack.files[:3] == ["CT_PNG (1).png", "CT_PNG (2).png", "CT_PNG (3).png"]
    assert not stack.spacing_given and stack.gaps == []
    assert "12 pictures" in stack.message("CT") and "(assumed)" in stack.message("CT")
    assert any("record no spacing" in w for w in stack.warnings("CT"))
    record = stack.provenance()
    assert record["spacing_assumed"] is True and record["files"] == 12 and record["last"] == "CT_PNG (12).png"


def test_given_spacing_and_grey_rgba_screenshots(ct_stack, tmp_path: Path) -> None:
    folder = phantoms.write_pictures(tmp_path / "ct", ct_stack, rgba=True)
    image, stack = pictures.read_pictures(folder, "CT", (0.45, 5.0))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ct_stack)  # alpha ignored, grey kept
    assert image.GetSpacing() == pytest.approx((0.45, 0.45, 5.0))
    assert stack.spacing_given and stack.warnings("CT") == []
    assert "0.45 mm in-plane, 5 mm between slices (given)" in stack.message("CT")


def test_16bit_hounsfield_pictures_keep_their_values(phantom_hu_ct, tmp_path: Path) -> None:
    """A CT exported as 16-bit PNGs of HU + 1024 (as some datasets are) stays 16-bit with its values, so the
    pipeline takes its Hounsfield path, not the 8-bit windowed one; an 8-bit CT saved as 16 bits (every value
    ×257) takes the windowed path (it was read as HU + 1024)."""
    from CTtoMRISynthesisLib.intensity import classify_ct

    stored = sitk.GetArrayFromImage(phantom_hu_ct)
    assert stored.max() > 255
    folder = phantoms.write_pictures(tmp_path / "hu", stored.astype(np.uint16), name="IM{}.png")
    image, _ = pictures.read_pictures(folder, "CT")
    array = sitk.GetArrayFromImage(image)
    assert array.dtype == np.uint16
    np.testing.assert_array_equal(array, stored)
    assert classify_ct(array) == "hu+1024"
    widened = phantoms.write_pictures(tmp_path / "x257", (np.clip(stored, 0, 255) // 1).astype(np.uint16) * 257,
                                      name="IM{}.png")  # an 8-bit export saved as 16 bits: 255 -> 65535
    image, _ = pictures.read_pictures(widened, "CT")
    assert sitk.GetArrayFromImage(image).max() > 255 and classify_ct(sitk.GetArrayFromImage(image)) == "windowed8bit"


@pytest.mark.parametrize("spacing", [(0.0, 5.0), (1.0, float("nan")), (-1.0, 2.0)])
def test_bad_spacing_refused(spacing, ct_stack, tmp_path: Path) -> None:
    with pytest.raises(CTMRIError, match="--picture-spacing takes two positive numbers"):
        pictures.read_pictures(phantoms.write_pictures(tmp_path / "ct", ct_stack[:2]), "CT", spacing)


def test_missing_numbers_warned(ct_stack, tmp_path: Path) -> None:
    folder = phantoms.write_pictures(tmp_path / "ct", ct_stack[:4], numbers=[1, 2, 4, 5])
    _, stack = pictures.read_pictures(folder, "CT")
    assert stack.gaps == [3] and stack.missing == 1
    assert any("skip 3" in w for w in stack.warnings("CT"))


def test_huge_numbers_are_counted_not_listed(ct_stack, tmp_path: Path) -> None:
    folder = phantoms.write_pictures(tmp_path / "ct", ct_stack[:2], name="IMG_{}.png", numbers=[1, 10**15])
    _, stack = pictures.read_pictures(folder, "CT")
    assert stack.gaps == list(range(2, 10)) and stack.missing == 10**15 - 2
    assert stack.provenance()["missing_numbers"] == 10**15 - 2


def test_several_scans_in_one_folder_warned(ct_stack, tmp_path: Path) -> None:
    """Harvard's layout: <patient><3-digit slice> for every patient in one folder."""
    folder = phantoms.write_pictures(tmp_path / "ct", ct_stack[:4], name="{}.png", numbers=[2004, 2005, 16003, 16004])
    _, stack = pictures.read_pictures(folder, "CT")
    assert stack.gaps == list(range(2006, 2014)) and stack.missing == 16004 - 2004 + 1 - 4
    assert any("may hold more than one scan" in w for w in stack.warnings("CT"))


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("colour", r"CT picture CT_PNG \(2\)\.png has 3 components per voxel"),
        ("size", r"the pictures differ in size \(CT_PNG \(1\)\.png 256×256, CT_PNG \(2\)\.png 256×128\)"),
        ("same-number", r"carry the same slice number"),
        ("damaged", r"cannot read CT picture .*damaged"),
        ("empty", r"holds no 2D pictures"),
        ("unnumbered", r"CT_last\.png carries no slice number among files that do"),  # was stacked first
        ("depths", r"the pictures differ in bit depth \(CT_PNG \(1\)\.png 8-bit unsigned integer, CT_PNG \(2\)\.png "
                   r"16-bit unsigned integer\)"),
    ],
)
def test_refusals(problem, expected, ct_stack, tmp_path: Path) -> None:
    folder = phantoms.write_pictures(tmp_path / "ct", ct_stack[:3])
    if problem == "colour":
        plane = ct_stack[1]
        colour = np.dstack([plane, plane // 2, plane])
        sitk.WriteImage(sitk.GetImageFromArray(colour, isVector=True), str(folder / "CT_PNG (2).png"))
    elif problem == "size":
        sitk.WriteImage(sitk.GetImageFromArray(ct_stack[1, :128]), str(folder / "CT_PNG (2).png"))
    elif problem == "same-number":
        sitk.WriteImage(sitk.GetImageFromArray(ct_stack[1]), str(folder / "MR_PNG (2).png"))
    elif problem == "unnumbered":
        sitk.WriteImage(sitk.GetImageFromArray(ct_stack[1]), str(folder / "CT_last.png"))
    elif problem == "depths":  # one slice exported again as 16 bits (x257): it was stacked as a Hounsfield CT
        sitk.WriteImage(sitk.GetImageFromArray(ct_stack[1].astype(np.uint16) * 257), str(folder / "CT_PNG (2).png"))
    elif problem == "damaged":
        (folder / "CT_PNG (2).png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    else:
        for path in folder.iterdir():
            path.unlink()
    with pytest.raises(CTMRIError, match=expected):
        pictures.read_pictures(folder, "CT")


def test_read_input_takes_picture_folders(ct_stack, tmp_path: Path) -> None:
    folder = phantoms.write_pictures(tmp_path / "ct", ct_stack)
    image, source = dicom.read_input(folder, "CT", picture_spacing=(0.9, 5.0))
    assert isinstance(source, pictures.PictureStack) and image.GetSpacing() == pytest.approx((0.9, 0.9, 5.0))
    with pytest.raises(CTMRIError, match="--ct-series chooses a DICOM series, but the CT folder .* holds pictures"):
        dicom.read_input(folder, "CT", "3")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CTMRIError, match="holds no DICOM series and no 2D pictures .* directly in it"):
        dicom.read_input(empty, "CT")


def test_registration_needs_real_spacing() -> None:
    assumed = pictures.PictureStack(Path("ct"), ["1.png", "2.png"], (1.0, 1.0), spacing_given=False)
    given = pictures.PictureStack(Path("ct"), ["1.png", "2.png"], (0.5, 5.0), spacing_given=True)
    with pytest.raises(CTMRIError, match="record no spacing, and registering CT and MRI needs their real sizes"):
        pictures.check_registration([assumed, None], "rigid")
    pictures.check_registration([assumed, assumed], "none")
    pictures.check_registration([given, None], "similarity")
    # one picture is registered in its plane, as the same picture given as a file is: its slice step plays no part
    one = pictures.PictureStack(Path("ct"), ["1.png"], (1.0, 1.0), spacing_given=False)
    pictures.check_registration([one, one], "rigid")


def test_8bit_conversion_and_names() -> None:
    assert pictures.as_8bit(np.array([-3.0, 0.4, 127.5, 254.6, 300.0]), "synthetic_mri").tolist() == [0, 0, 128, 255, 255]
    assert pictures.as_8bit(np.array([-255.0, -1.0, 0.0, 1.0, 254.0]), "difference").tolist() == [0, 128, 128, 128, 255]
    stack = pictures.PictureStack(Path("ct"), ["a (1).jpg", "a (2).jpg"], (1.0, 1.0), spacing_given=False)
    assert pictures.picture_names(2, stack) == ["a (1).png", "a (2).png"]
    assert pictures.picture_names(3, stack) == ["slice_0001.png", "slice_0002.png", "slice_0003.png"]
    assert pictures.picture_names(1, None) == ["slice_0001.png"]


# ---------------------------------------------------------------------------------------- end to end


def test_cli_picture_folder_gives_the_volume_files_synthetic_mri(ct_stack, tiny_weights: Path, tmp_path: Path) -> None:
    """The same voxels as pictures and as a .nrrd of the same spacing: the same synthetic MRI, read back by
    SimpleITK; the source and the assumption are in metrics.json; the pictures are left as they were."""
    from CTtoMRISynthesisLib.cli import main

    folder = phantoms.write_pictures(tmp_path / "ct", ct_stack, rgba=True)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    volume = sitk.GetImageFromArray(ct_stack)
    sitk.WriteImage(volume, str(tmp_path / "ct.nrrd"))  # spacing 1, as assumed for the pictures
    common = ["--weights", str(tiny_weights), "--device", "cpu", "--quiet"]
    assert main(["synthesize", "--ct", str(folder), "--out-dir", str(tmp_path / "a"), "--pictures", *common]) == 0
    assert main(["synthesize", "--ct", str(tmp_path / "ct.nrrd"), "--out-dir", str(tmp_path / "b"), "--pictures",
                 *common]) == 0
    a = sitk.ReadImage(str(tmp_path / "a" / "synthetic_mri.nrrd"))
    b = sitk.ReadImage(str(tmp_path / "b" / "synthetic_mri.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert a.GetSize() == (256, 256, 12) and a.GetSpacing() == b.GetSpacing()
    summary = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert summary["ct_pictures"]["spacing_assumed"] is True and summary["ct_pictures"]["files"] == 12
    assert any("record no spacing" in w for w in summary["warnings"])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # pictures out, read back with Pillow: named after the input pictures (the volume file's: slice_0001.png …),
    # each the rounded 0..255 slice in the input's own orientation (the uncertainty doubled, for viewing)
    from PIL import Image

    for kind, gain in (("synthetic_mri", 1), ("uncertainty", 2)):
        volume = gain * sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a" / f"{kind}.nrrd"))).astype(np.float64)
        written = tmp_path / "a" / "pictures" / kind
        assert sorted(p.name for p in written.iterdir()) == sorted(p.name for p in folder.iterdir())
        for k in (0, 5, 11):
            plane = np.asarray(Image.open(written / f"CT_PNG ({k + 1}).png"))
            assert plane.dtype == np.uint8
            np.testing.assert_array_equal(plane, np.clip(np.round(volume[k]), 0, 255))
    assert (tmp_path / "a" / "pictures" / ".ctmri-output").is_file()
    assert sorted(p.name for p in (tmp_path / "b" / "pictures" / "synthetic_mri").iterdir())[:2] == [
        "slice_0001.png", "slice_0002.png"]
    assert main(["synthesize", "--ct", str(folder), "--out-dir", str(tmp_path / "a"), *common]) == 0
    assert not (tmp_path / "a" / "pictures").exists()  # a run without --pictures leaves no stale pictures


def test_dicom_outputs_need_the_pictures_real_size(ct_stack, tiny_weights: Path, tmp_path: Path, capsys) -> None:
    """DICOM outputs carry the pixel size a viewer measures with: from pictures whose size was only assumed (a
    folder without --picture-spacing, a single picture file) they are refused before any work, saying what to
    give; with --picture-spacing the series carry that size (read back by pydicom)."""
    import pydicom

    from CTtoMRISynthesisLib.cli import main

    folder = phantoms.write_pictures(tmp_path / "ct", ct_stack)
    common = ["--weights", str(tiny_weights), "--device", "cpu", "--quiet", "--dicom"]
    capsys.readouterr()
    assert main(["synthesize", "--ct", str(folder), "--out-dir", str(tmp_path / "a"), *common]) == 2
    said = capsys.readouterr().err
    assert "record no pixel size" in said and "--picture-spacing IN_PLANE SLICE" in said, said
    assert main(["synthesize", "--ct", str(folder / "CT_PNG (3).png"), "--out-dir", str(tmp_path / "b"), *common]) == 2
    assert "put it in a folder of its own" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert main(["synthesize", "--ct", str(folder), "--picture-spacing", "0.45", "5", "--out-dir", str(tmp_path / "c"),
                 *common]) == 0
    first = pydicom.dcmread(sorted((tmp_path / "c" / "dicom" / "synthetic_mri").glob("*.dcm"))[0])
    assert [float(v) for v in first.PixelSpacing] == [0.45, 0.45] and float(first.SpacingBetweenSlices) == 5.0
    assert main(["synthesize", "--ct", str(folder), "--out-dir", str(tmp_path / "d"), "--weights", str(tiny_weights),
                 "--device", "cpu", "--quiet"]) == 0  # without --dicom the assumed size is only warned about
    # with an MRI the outputs lie on the MRI's grid: MRI pictures of assumed size are refused, a CT's are not
    volume = sitk.GetImageFromArray(ct_stack)
    sitk.WriteImage(volume, str(tmp_path / "ct.nrrd"))
    mri = phantoms.write_pictures(tmp_path / "mri", ct_stack, name="MR ({}).png")
    capsys.readouterr()
    assert main(["synthesize", "--ct", str(tmp_path / "ct.nrrd"), "--mri", str(mri), "--registration", "none",
                 "--out-dir", str(tmp_path / "e"), *common]) == 2
    said = capsys.readouterr().err
    assert "the MRI pictures in" in said and "--mri-picture-spacing" in said, said
    assert main(["synthesize", "--ct", str(folder), "--mri", str(tmp_path / "ct.nrrd"), "--registration", "none",
                 "--out-dir", str(tmp_path / "f"), *common]) == 0  # on the .nrrd's grid: its size is real


def test_cli_paired_picture_folders(tiny_weights: Path, tmp_path: Path, capsys) -> None:
    """A paired 2D dataset's CT and MRI folders: registering them with an assumed spacing is refused with what to
    do and nothing written; aligned as they are (--registration none) they are scored; a given spacing lands on
    the outputs' grid."""
    from CTtoMRISynthesisLib.cli import main

    ct, mri = phantoms.slice_pair(seed=43, slices=6, first_z=-20.0)
    ct_dir, mri_dir = phantoms.write_pictures(tmp_path / "CT", ct), phantoms.write_pictures(tmp_path / "MRI", mri, name="MR_PNG ({}).png")
    common = ["--weights", str(tiny_weights), "--device", "cpu", "--quiet"]
    out = tmp_path / "out"
    assert main(["synthesize", "--ct", str(ct_dir), "--mri", str(mri_dir), "--out-dir", str(out), *common]) == 2
    assert "record no spacing, and registering CT and MRI needs their real sizes" in capsys.readouterr().err
    assert not out.exists()
    assert main(["synthesize", "--ct", str(ct_dir), "--mri", str(mri_dir), "--registration", "none",
                 "--picture-spacing", "0.9", "5", "--out-dir", str(out), "--pictures", *common]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["mri_pictures"]["spacing_assumed"] is False and np.isfinite(summary["mae"])
    difference = sitk.ReadImage(str(out / "difference.nrrd"))
    assert difference.GetSpacing() == pytest.approx((0.9, 0.9, 5.0))
    # the outputs lie on the MRI's grid: named after the MRI pictures; the difference halved around 128
    written = out / "pictures" / "difference"
    assert sorted(p.name for p in written.iterdir()) == sorted(p.name for p in mri_dir.iterdir())
    plane = sitk.GetArrayFromImage(sitk.ReadImage(str(written / "MR_PNG (3).png")))
    expected = np.clip(np.round(128 + sitk.GetArrayFromImage(difference)[2].astype(np.float64) / 2), 0, 255)
    np.testing.assert_array_equal(plane, expected)
    # the uncertainty doubled (at most 127.5 grey levels: twice fills the picture's range), for viewing
    spread = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "uncertainty.nrrd")))[2].astype(np.float64)
    shown = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "pictures" / "uncertainty" / "MR_PNG (3).png")))
    assert spread.max() > 0
    np.testing.assert_array_equal(shown, np.clip(np.round(2 * spread), 0, 255))
    assert sorted(p.name for p in (out / "pictures").iterdir()) == [".ctmri-output", "difference", "synthetic_mri",
                                                                   "uncertainty"]
    # evaluate on the two folders of pictures: the synthesis's own metrics, but for the 8-bit rounding
    assert main(["evaluate", "--pred", str(out / "pictures" / "synthetic_mri"), "--ref", str(mri_dir),
                 "--json", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["mae"] == pytest.approx(summary["mae"], abs=0.3)
    assert evaluated["ssim"] == pytest.approx(summary["ssim"], abs=0.01)


def test_mri_pictures_with_their_own_pixel_size(tiny_weights: Path, tmp_path: Path, capsys) -> None:
    """CT and MRI pictures exported at different pixel sizes (another viewer or field of view): --mri-picture-spacing
    gives the MRI its own, so that registration sees both heads at their real size; with the CT's spacing for both
    the MRI's head would be half its size. A spacing for an MRI that is not pictures is said to be unused."""
    from CTtoMRISynthesisLib.cli import main

    ct, mri = phantoms.slice_pair(seed=44, slices=6, first_z=-20.0)
    half = mri.reshape(6, 128, 2, 128, 2).mean(axis=(2, 4)).round().astype(np.uint8)  # 2 × 2 pixels → 1
    ct_dir, mri_dir = phantoms.write_pictures(tmp_path / "CT", ct), phantoms.write_pictures(tmp_path / "MRI", half)
    common = ["--ct", str(ct_dir), "--mri", str(mri_dir), "--weights", str(tiny_weights), "--device", "cpu", "--quiet"]
    out = tmp_path / "out"
    assert main(["synthesize", *common, "--picture-spacing", "0.9", "5", "--mri-picture-spacing", "1.8", "5",
                 "--out-dir", str(out)]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert sitk.ReadImage(str(out / "synthetic_mri.nrrd")).GetSpacing() == pytest.approx((1.8, 1.8, 5.0))
    assert summary["ct_pictures"]["spacing_assumed"] is False and summary["mri_pictures"]["spacing_assumed"] is False
    # the heads lie on each other: the registration moved the CT by about the half pixel of the 2 × 2 means only
    moved = np.linalg.norm(sitk.ReadTransform(str(out / "transform.tfm")).TransformPoint((0.0, 0.0, -7.5)) -
                           np.array((0.0, 0.0, -7.5)))
    assert moved < 2.0, moved
    assert "not used" not in capsys.readouterr().err
    # the same spacing for both: the MRI's head is read at half its size, and no rigid motion lays the heads on
    # each other (refused, nothing written)
    same = tmp_path / "same"
    assert main(["synthesize", *common, "--picture-spacing", "0.9", "5", "--out-dir", str(same)]) == 2
    assert "of the MRI's head lies inside the CT" in capsys.readouterr().err and not same.exists()
    # an MRI that is not a folder of pictures: the option is said to be unused
    nrrd = tmp_path / "mri.nrrd"
    image = sitk.GetImageFromArray(half)
    image.SetSpacing((1.8, 1.8, 5.0))
    sitk.WriteImage(image, str(nrrd))
    main(["synthesize", "--ct", str(ct_dir), "--mri", str(nrrd), "--weights", str(tiny_weights), "--device", "cpu",
          "--quiet", "--picture-spacing", "0.9", "5", "--mri-picture-spacing", "1.8", "5", "--registration", "none",
          "--out-dir", str(tmp_path / "file")])
    assert "--mri-picture-spacing was given, but no MRI given is a folder of pictures: it was not used" in \
        capsys.readouterr().err
    # a wrong one is refused by its own name
    assert main(["synthesize", *common, "--mri-picture-spacing", "0", "5", "--out-dir", str(tmp_path / "bad")]) == 2
    assert "--mri-picture-spacing takes two positive numbers" in capsys.readouterr().err


def test_batch_manifest_with_a_picture_folder(ct_stack, tiny_weights: Path, tmp_path: Path) -> None:
    """``ctmri batch`` takes picture folders like DICOM folders; --picture-spacing and --pictures are part of what
    a case is made from, so changing them redoes the case."""
    from CTtoMRISynthesisLib.cli import main

    phantoms.write_pictures(tmp_path / "p1", ct_stack[:6])
    (tmp_path / "cases.csv").write_text("id,ct,mri\np1,p1/,\n")
    args = ["batch", "--manifest", str(tmp_path / "cases.csv"), "--out-dir", str(tmp_path / "cohort"),
            "--weights", str(tiny_weights), "--device", "cpu", "--quiet"]
    assert main(args) == 0
    first = json.loads((tmp_path / "cohort" / "p1" / "metrics.json").read_text())
    assert first["ct_pictures"]["spacing_mm"] == {"in_plane": 1.0, "between_slices": 1.0}
    assert main(args + ["--picture-spacing", "0.5", "2", "--pictures"]) == 0
    assert len(list((tmp_path / "cohort" / "p1" / "pictures" / "synthetic_mri").glob("CT_PNG (*).png"))) == 6
    second = json.loads((tmp_path / "cohort" / "p1" / "metrics.json").read_text())
    assert second["ct_pictures"]["spacing_mm"] == {"in_plane": 0.5, "between_slices": 2.0}
    assert sitk.ReadImage(str(tmp_path / "cohort" / "p1" / "synthetic_mri.nrrd")).GetSpacing() == pytest.approx((0.5, 0.5, 2.0))


def test_series_describes_a_picture_folder(ct_stack, tmp_path: Path, capsys) -> None:
    """``ctmri series`` on a folder of pictures says how synthesize would stack them (count, size, depth, order), the
    spacing to give, and what the numbers say; a folder with neither DICOM nor pictures is still an error."""
    from CTtoMRISynthesisLib.cli import main

    folder = phantoms.write_pictures(tmp_path / "ct", ct_stack[:4], numbers=[1, 2, 3, 5])
    assert main(["series", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"pictures in {folder}: 4 files of 256×256, 8-bit" in out
    assert "CT_PNG (1).png, CT_PNG (2).png, CT_PNG (3).png … CT_PNG (5).png" in out
    assert "give --picture-spacing IN_PLANE SLICE (mm), else 1 mm is assumed" in out
    assert "numbers skip 4:" in out
    (tmp_path / "empty").mkdir()
    assert main(["series", str(tmp_path / "empty")]) == 2
    assert "holds no DICOM series and no 2D pictures (.png, .jpg, .tif, .bmp) directly in it" in capsys.readouterr().err
