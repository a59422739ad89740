"""Readers: every supported format gives the same voxels and physical geometry; bad files are refused."""

from __future__ import annotations

import locale
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CTtoMRISynthesisLib.errors import CTMRIError
from CTtoMRISynthesisLib.intensity import check_finite
from CTtoMRISynthesisLib.volumes import as_scalar_3d, read_volume


@pytest.fixture(scope="module")
def mr(phantom_mr: sitk.Image) -> sitk.Image:
    """A RIRE-like int16 MR head (synthetic, no licensed data): 256×256×26 at 1.25×1.25×4 mm."""
    return phantom_mr


@pytest.fixture(scope="module")
def mr_path(mr: sitk.Image, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mr") / "mr.mha"
    sitk.WriteImage(mr, str(path))
    return path


@pytest.mark.parametrize("suffix", [".nrrd", ".nii", ".nii.gz", ".mha", ".mhd"])
def test_file_formats_round_trip(mr: sitk.Image, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"volume{suffix}"
    sitk.WriteImage(mr, str(path))
    image = read_volume(path)
    assert image.GetSize() == mr.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), mr.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), mr.GetOrigin(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(mr))


def _write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """Write a volume as a CT DICOM series with the position/orientation tags a reader needs."""
    folder.mkdir()
    image = sitk.Cast(image, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    orientation = "\\".join(str(v) for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7]))
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        for tag, value in [
            ("0008|0060", "CT"),
            ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.1"),
            ("0020|000d", "1.2.826.0.1.3680043.2.1125.1.2"),
            ("0020|0037", orientation),
            ("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k))))),
            ("0020|0013", str(k + 1)),
            ("0018|0050", str(image.GetSpacing()[2])),
        ]:
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)


def test_dicom_folder(mr: sitk.Image, tmp_path: Path) -> None:
    # GDCM's writer switches the process locale to "C"; put it back so later tests decode UTF-8 as usual.
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_series(mr, tmp_path / "dicom")
        image = read_volume(tmp_path / "dicom")
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    assert image.GetSize() == mr.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), mr.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), mr.GetOrigin(), atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(mr))


def test_png_is_a_one_slice_volume(phantom_slices: Path) -> None:
    image = read_volume(phantom_slices / "CT" / "2006.png")
    assert image.GetDimension() == 3 and image.GetSize() == (256, 256, 1)
    direct = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom_slices / "CT" / "2006.png")))
    assert direct.max() == 255 and direct.min() == 0, "a windowed CT slice: air 0, bone 255"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image)[0], direct)


def test_input_file_is_not_modified(mr_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "in.mha"
    shutil.copy(mr_path, copy)
    before = copy.read_bytes()
    read_volume(copy)
    assert copy.read_bytes() == before


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.nrrd", None, "not found"),
        ("empty.nrrd", b"", "empty"),
        ("text.nrrd", b"this is not an image\n", "cannot read"),
        ("volume.xyz", b"abc", "cannot read"),
    ],
    ids=["missing", "zero-bytes", "text-as-nrrd", "unsupported-format"],
)
def test_bad_files(tmp_path: Path, name: str, content, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CTMRIError, match=message):
        read_volume(path)


def test_an_unreadable_file_says_itks_reason(tmp_path: Path) -> None:
    """A zero spacing and a .mhd whose data file is missing were both only "damaged": ITK's own last line is
    now in the message (the other cases of test_bad_files keep theirs)."""
    header = "NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 2 2\nspacings: 0 1 1\nencoding: raw\n\n"
    (tmp_path / "zero.nrrd").write_bytes(header.encode() + bytes(8))
    with pytest.raises(CTMRIError, match=r"damaged \(ITK: .*spacing \(0\) invalid\)"):
        read_volume(tmp_path / "zero.nrrd")
    sitk.WriteImage(sitk.Image(4, 4, 4, sitk.sitkUInt8), str(tmp_path / "a.mhd"))
    (tmp_path / "a.raw").unlink()
    with pytest.raises(CTMRIError, match=r"damaged \(ITK: .*No such file or directory\)"):
        read_volume(tmp_path / "a.mhd")


def test_truncated_nii_gz(mr: sitk.Image, tmp_path: Path) -> None:
    path = tmp_path / "v.nii.gz"
    sitk.WriteImage(mr, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CTMRIError, match="cannot read"):
        read_volume(path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_is_refused_in_every_format(mr: sitk.Image, tmp_path: Path, suffix: str, bad: float) -> None:
    """NaN/Inf voxels are refused in NIfTI too, whose ITK reader hands them over as 0 (in a CT: water); the same
    floats without them (float64 this time) are read as stored."""
    array = sitk.GetArrayFromImage(mr).astype(np.float32)
    array[3, 10:20, 5] = bad
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(mr)
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image, str(path))
    if suffix != ".nrrd":
        assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all(), "ITK no longer hides them"
    with pytest.raises(CTMRIError, match="NaN or infinite"):
        check_finite(sitk.GetArrayViewFromImage(read_volume(path, "CT")), "CT")  # (.nrrd: the pipeline's check)
    array[3, 10:20, 5] = 0.0
    clean = sitk.GetImageFromArray(array.astype(np.float64))
    clean.CopyInformation(mr)
    sitk.WriteImage(clean, str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(path)), array)


def test_nan_in_a_big_endian_nifti_is_refused(tmp_path: Path) -> None:
    """A NIfTI-1 written big-endian (as old SPM/Analyze tools did) is read with its own byte order."""
    array = np.arange(4 * 5 * 6, dtype=">f4").reshape(4, 5, 6)
    array[1, 2, 3] = np.nan
    header = bytearray(352)
    header[0:4] = (348).to_bytes(4, "big")
    header[40:56] = np.array([3, 6, 5, 4, 1, 1, 1, 1], ">i2").tobytes()
    header[70:74] = np.array([16, 32], ">i2").tobytes()  # FLOAT32, 32 bits
    header[76:108] = np.array([1, 1, 1, 1, 0, 0, 0, 0], ">f4").tobytes()  # pixdim
    header[108:112] = np.array([352], ">f4").tobytes()  # vox_offset
    header[112:116] = np.array([1], ">f4").tobytes()  # scl_slope
    header[344:348] = b"n+1\0"
    path = tmp_path / "big.nii"
    path.write_bytes(bytes(header) + array.tobytes())
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[1, 2, 3] == 0, "ITK reads it, NaN as 0"
    with pytest.raises(CTMRIError, match="NaN or infinite"):
        read_volume(path, "CT")


def _rgb_png(grey: np.ndarray, path: Path, tint: bool = False, alpha: np.ndarray | None = None) -> Path:
    channels = [grey, grey, np.clip(grey.astype(int) + 1, 0, 255).astype(np.uint8) if tint else grey]
    if alpha is not None:
        channels.append(alpha)
    sitk.WriteImage(sitk.GetImageFromArray(np.stack(channels, axis=-1), isVector=True), str(path))
    return path


def test_a_grey_image_saved_as_rgb_is_read_as_its_grey(phantom_slices: Path, tmp_path: Path) -> None:
    """A screenshot or PNG export of a grey CT (red = green = blue, as the other hospital's CTs here are stored)
    gives exactly the voxels of the grey PNG, whatever its transparency; a real colour image is refused."""
    grey_png = phantom_slices / "CT" / "2006.png"
    grey = sitk.GetArrayFromImage(sitk.ReadImage(str(grey_png)))
    expected = sitk.GetArrayFromImage(read_volume(grey_png))
    as_rgb = read_volume(_rgb_png(grey, tmp_path / "rgb.png"))
    assert as_rgb.GetNumberOfComponentsPerPixel() == 1 and as_rgb.GetSize() == (256, 256, 1)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(as_rgb), expected)
    opaque = read_volume(_rgb_png(grey, tmp_path / "rgba.png", alpha=np.full_like(grey, 255)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(opaque), expected)
    with pytest.raises(CTMRIError, match="components per voxel"):
        read_volume(_rgb_png(grey, tmp_path / "tinted.png", tint=True))
    # as the other hospital's screenshots: alpha 238 on the one-pixel frame (and lower on burnt-in text)
    framed = np.full_like(grey, 255)
    framed[[0, -1], :] = framed[:, [0, -1]] = 238
    ramp = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    for name, alpha in (("framed", framed), ("ramp", ramp)):
        transparent = read_volume(_rgb_png(grey, tmp_path / f"{name}.png", alpha=alpha))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(transparent), expected)
    with pytest.raises(CTMRIError, match="components per voxel"):
        read_volume(_rgb_png(grey, tmp_path / "tinted-rgba.png", tint=True, alpha=framed))


def test_rgb_and_4d_are_refused() -> None:
    rgb = sitk.GetImageFromArray(np.stack([np.zeros((8, 8)), np.ones((8, 8)), np.zeros((8, 8))], -1).astype(np.uint8),
                                 isVector=True)
    with pytest.raises(CTMRIError, match="components"):
        as_scalar_3d(rgb)
    with pytest.raises(CTMRIError, match="components"):
        as_scalar_3d(sitk.Image([8, 8], sitk.sitkVectorFloat32, 2))  # a 2-vector (e.g. a displacement) is never grey
    four_d = sitk.Image([8, 8, 8, 3], sitk.sitkFloat32)
    with pytest.raises(CTMRIError, match="4D"):
        as_scalar_3d(four_d)
    one_volume = sitk.Image([8, 8, 8, 1], sitk.sitkFloat32)
    assert as_scalar_3d(one_volume).GetSize() == (8, 8, 8)
