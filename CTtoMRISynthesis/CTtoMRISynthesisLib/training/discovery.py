"""Finding paired CT/MRI training data — every supported layout, in this one place.

Layouts (a data argument may be any of them; several arguments are combined):

(a) **2D slice folders**: ``DIR/CT/*.png`` and ``DIR/MRI/*.png`` with the same file names (the layout of
    the Harvard AANLIB pairs). A file name is ``<case><slice>``: the slice number is the last three
    digits of the stem, the case id the rest (``16005`` → case ``16``, ``2004`` → case ``2``); other names
    are refused. The slices of a case are stacked in slice-number order into a (z, H, W) volume. A CT slice
    saved as 16 bits is read as Hounsfield units + 1024, unless it is an 8-bit picture widened ×257
    (:func:`intensity.classify_ct`).

    Why not "the first two characters": in the shared Harvard folder ``2004.png`` … ``2022.png`` and
    ``20005.png`` … ``20022.png`` share the prefix ``20`` but are two different patients (different
    anatomy, and a different MR contrast); ``case_rule="first2"`` gives the two-character rule anyway.

(b) **3D cases** (SynthRAD layout): ``DIR/<case>/ct.*`` and ``DIR/<case>/mr.*`` (or ``DIR`` itself being
    such a case folder). The CT is registered rigidly to the MR (:func:`registration.register`), then both
    are resampled onto the model's ``size``×``size`` axial grid of the MR (:func:`geometry.model_grid`).
    Registration is slow, so the two arrays are cached as ``.npz`` under ``cache_dir``, keyed by the
    files' path, size and modification time and by the grid size.

Every case ends as a :class:`Case` with ``ct`` and ``mri`` (z, size, size) float32 arrays normalised
exactly as inference normalises them (:func:`intensity.normalise_ct` with the model's CT window, and the
paper's per-volume min-max for the MRI).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from ..errors import CTMRIError
from ..intensity import CTWindow, normalise_ct, normalise_mri
from ..volumes import PICTURE_SUFFIXES, as_grey

VOLUME_PATTERN = re.compile(r"^(ct|mr|mri)\.(nii\.gz|nii|mha|mhd|nrrd|nhdr)$", re.IGNORECASE)
CACHE_VERSION = 1

Progress = Optional[Callable[[float, str], None]]


@dataclass
class Case:
    """One patient: CT and MRI on the same (z, size, size) grid, both 0..255 float32."""

    case_id: str
    ct: np.ndarray
    mri: np.ndarray
    source: str  # "2d-slices" or "3d-registered"
    slice_names: list = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def slices(self) -> int:
        return int(self.ct.shape[0])


def case_id_of(stem: str, rule: str = "slice3") -> str:
    """Case id of a 2D slice file stem (see the module docstring for the rules)."""
    if rule == "first2":
        return stem[:2]
    if rule != "slice3":
        raise CTMRIError(f"unknown case-id rule {rule!r}; use 'slice3' or 'first2'")
    if len(stem) > 3 and stem[-3:].isdigit():
        return stem[:-3]
    # Falling back to the first two characters merged different patients into one without a word.
    raise CTMRIError(f"slice {stem!r}: a 2D slice file is named <case id><three-digit slice number> (16005.png: "
                     "case 16, slice 5); rename the slices so, or pass --case-rule first2 if every patient's "
                     "files start with two characters of their own")


def _slice_key(stem: str) -> tuple:
    tail = stem[-3:]
    return (int(tail) if tail.isdigit() else 0, stem)


def _read_slice(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise CTMRIError(f"cannot read slice {path}; is it a damaged image file?") from exc
    # the rule inference applies: grey stored as RGB(A) is its grey, colour is refused
    array = sitk.GetArrayFromImage(as_grey(image, f"slice {path}"))
    if array.ndim != 2:
        raise CTMRIError(f"slice {path} is not a 2D grey image (shape {array.shape})")
    return array.astype(np.float32)


def _read_sized_slice(path: Path, size: int) -> np.ndarray:
    """A slice of the 2D layout, which must be ``size``×``size`` (checked per file: one slice of another size
    among many was a traceback from stacking them)."""
    array = _read_slice(path)
    if array.shape != (size, size):
        raise CTMRIError(f"slice {path} is {array.shape[1]}×{array.shape[0]} pixels; the 2D layout needs "
                         f"{size}×{size} slices, CT and MRI alike (resample it, or leave it out of both folders)")
    return array


def is_2d_layout(folder: Path) -> bool:
    return (folder / "CT").is_dir() and (folder / "MRI").is_dir()


def _volume_files(folder: Path) -> tuple[Optional[Path], Optional[Path]]:
    ct = mr = None
    for entry in sorted(folder.iterdir()):
        match = VOLUME_PATTERN.match(entry.name)
        if match and entry.is_file():
            if match.group(1).lower() == "ct":
                ct = entry
            else:
                mr = entry
    return ct, mr


def is_3d_case(folder: Path) -> bool:
    ct, mr = _volume_files(folder)
    return ct is not None and mr is not None


def discover_2d(
    folder: Path, window: CTWindow, size: int = 256, case_rule: str = "slice3"
) -> list[Case]:
    """Layout (a): paired slice folders → one :class:`Case` per case id."""
    ct_dir, mri_dir = folder / "CT", folder / "MRI"
    names = {p.name for p in ct_dir.iterdir() if p.suffix.lower() in PICTURE_SUFFIXES}
    mri_names = {p.name for p in mri_dir.iterdir() if p.suffix.lower() in PICTURE_SUFFIXES}
    if not names:
        raise CTMRIError(f"{ct_dir} holds no image slices (.png etc.)")
    unpaired = sorted(names ^ mri_names)
    if unpaired:
        raise CTMRIError(
            f"{len(unpaired)} slice(s) in {folder} have no partner of the same name in CT/ and MRI/, "
            f"e.g. {unpaired[:3]}; every CT slice needs the MRI slice of the same name"
        )
    groups: dict[str, list[str]] = {}
    for name in sorted(names):  # the first badly named file is the same one on every run
        groups.setdefault(case_id_of(Path(name).stem, case_rule), []).append(name)
    cases = []
    for case_id in sorted(groups, key=lambda c: (len(c), c)):
        files = sorted(groups[case_id], key=lambda n: _slice_key(Path(n).stem))
        ct = np.stack([_read_sized_slice(ct_dir / n, size) for n in files])
        mri = np.stack([_read_sized_slice(mri_dir / n, size) for n in files])
        ct255, ct_info = normalise_ct(ct, window)
        cases.append(
            Case(
                case_id=case_id,
                ct=ct255.astype(np.float32),
                mri=normalise_mri(mri).astype(np.float32),
                source="2d-slices",
                slice_names=files,
                info={"folder": str(folder), "ct": ct_info["description"]},
            )
        )
    return cases


def _cache_key(ct: Path, mr: Path, size: int) -> str:
    parts = [f"v{CACHE_VERSION}", str(size)]
    for p in (ct, mr):
        st = p.stat()
        parts += [str(p.resolve()), str(st.st_size), str(st.st_mtime_ns)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def register_3d_case(ct_path: Path, mr_path: Path, size: int = 256, progress: Progress = None) -> dict:
    """Register CT → MR (rigid), resample both onto the MR's model grid; raw intensities (HU for CT)."""
    import SimpleITK as sitk

    from ..geometry import model_grid, resample
    from ..registration import register
    from ..volumes import read_volume

    ct = read_volume(ct_path, "CT")
    mr = read_volume(mr_path, "MRI")
    result = register(mr, ct, mode="rigid", progress=progress)
    grid = model_grid(mr, size)
    ct_grid = resample(ct, grid, result.transform)  # padding: the CT's minimum (air)
    mr_grid = resample(mr, grid, None, default_value=0.0)
    return {
        "ct": sitk.GetArrayFromImage(ct_grid).astype(np.float32),
        "mri": sitk.GetArrayFromImage(mr_grid).astype(np.float32),
        "transform": list(result.transform.GetParameters()),
        "transform_type": result.transform.GetName(),
        "registration_metric": float(result.metric) if result.metric is not None else float("nan"),
    }


def load_3d_case(
    folder: Path,
    window: CTWindow,
    size: int = 256,
    cache_dir: Optional[Path] = None,
    progress: Progress = None,
) -> Case:
    """Layout (b): one case folder with ``ct.*`` and ``mr.*`` → a registered, cached :class:`Case`."""
    ct_path, mr_path = _volume_files(folder)
    if ct_path is None or mr_path is None:
        raise CTMRIError(f"{folder} needs both a ct.* and an mr.* volume (e.g. ct.nii.gz, mr.nii.gz)")
    cache_file = None
    arrays = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"{folder.name}-{_cache_key(ct_path, mr_path, size)}.npz"
        if cache_file.exists():
            with np.load(cache_file) as blob:
                arrays = {"ct": blob["ct"], "mri": blob["mri"], "meta": json.loads(str(blob["meta"]))}
    cached = arrays is not None
    if arrays is None:
        reg = register_3d_case(ct_path, mr_path, size, progress)
        meta = {k: reg[k] for k in ("transform", "transform_type", "registration_metric")}
        arrays = {"ct": reg["ct"], "mri": reg["mri"], "meta": meta}
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            # one temporary name per process: under torchrun every rank registers the case and writes the same
            # content, and a shared temporary name let one rank rename it away under another (FileNotFoundError)
            tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp.npz")
            np.savez_compressed(tmp, ct=arrays["ct"], mri=arrays["mri"], meta=json.dumps(meta))
            os.replace(tmp, cache_file)
    ct255, ct_info = normalise_ct(arrays["ct"], window)
    return Case(
        case_id=folder.name,
        ct=ct255.astype(np.float32),
        mri=normalise_mri(arrays["mri"]).astype(np.float32),
        source="3d-registered",
        slice_names=[f"{folder.name}:{k}" for k in range(arrays["ct"].shape[0])],
        info={
            "folder": str(folder),
            "ct": ct_info["description"],
            "cached": cached,
            "cache_file": str(cache_file) if cache_file else None,
            **arrays["meta"],
        },
    )


def discover(
    paths: Iterable[str | Path],
    window: CTWindow,
    size: int = 256,
    cache_dir: Optional[str | Path] = None,
    case_rule: str = "slice3",
    progress: Progress = None,
) -> list[Case]:
    """All cases under ``paths`` (each a 2D slice folder, a 3D case folder, or a folder of 3D cases)."""
    cases: list[Case] = []
    for raw in paths:
        folder = Path(raw)
        if not folder.is_dir():
            raise CTMRIError(f"training data folder not found: {folder}")
        if is_2d_layout(folder):
            cases += discover_2d(folder, window, size, case_rule)
        elif is_3d_case(folder):
            cases.append(load_3d_case(folder, window, size, cache_dir, progress))
        else:
            subs = [p for p in sorted(folder.iterdir()) if p.is_dir() and is_3d_case(p)]
            if not subs:
                raise CTMRIError(
                    f"no paired data found in {folder}: expected CT/ and MRI/ slice folders with the same "
                    "file names, or case folders each holding ct.* and mr.* volumes"
                )
            for sub in subs:
                cases.append(load_3d_case(sub, window, size, cache_dir, progress))
    seen: dict[str, int] = {}
    for case in cases:
        if case.case_id in seen:
            raise CTMRIError(f"case id {case.case_id!r} found twice; case ids must be unique across --data folders")
        seen[case.case_id] = 1
    return cases


def describe(cases: list[Case]) -> dict:
    """The 'data' summary of a weights config."""
    return {
        "cases": len(cases),
        "slices": int(sum(c.slices for c in cases)),
        "case_slices": {c.case_id: c.slices for c in cases},
        "sources": sorted({c.info.get("folder", "") for c in cases}),
    }
