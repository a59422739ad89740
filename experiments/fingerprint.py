"""A fingerprint of what the code computes, to show that a refactoring changed nothing: run it before and after
the change and compare the two files (``cmp`` or ``diff``).

Each part runs one path of the library on fixed inputs and records what it produced, exactly (digests of arrays
and tensors, transform parameters to the last bit, console lines and progress messages), less what varies from
run to run by nature (wall times, temporary paths). Two runs of the same code give identical files (checked for
every part); so does SimpleITK 2.2.1 (Slicer 5.6) against ours for ``registration``.

- ``train``: ``training.loop.train`` six ways (validation with best-epoch selection, stop and resume,
  ``checkpoint_every``, lookup residual, unpaired CT, torchrun with 2 ranks on the CPU): log rows, tensors,
  configs, rank logs, files;
- ``cli-train``: eight ``ctmri train`` calls (cross-validation with exclusion and drop, stop and resume with
  ``--only-folds``, refusals, a single run with ``--val-cases`` and ``--save``): exit codes, output, files;
- ``registration``: ``registration.register`` on the real RIRE T1 volume moved by known motions, Harvard CT/MRI
  slices aligned and moved (rigid, similarity), the shipped Visible Human slab, disjoint images, a cancel;
- ``inference``: ``synthesis.predict_volume`` with the shipped model on real HU CT slices, five option sets;
- ``pipeline``: ``pipeline.synthesize`` on the shipped sample (CT + MRI, CT only, registration none);
- ``report``: ``training.report.write_cv_report`` of a tiny cross-validation and of an ensemble of two: every file.

``train``, ``cli-train`` and ``report`` use the test suite's phantoms; ``registration`` and ``inference`` the real
data (``--data``, default ``../shared/data``; Harvard, RIRE and the HU study). Used for the refactorings of stop 32
(loop, registration, synthesis, pipeline, commands, report: identical before and after). No image is written
outside a temporary folder.

    python experiments/fingerprint.py [PART ...] --out before.json     # then, after the change:
    python experiments/fingerprint.py [PART ...] --out after.json && cmp before.json after.json
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing"))
import phantoms  # noqa: E402
from phantoms import axis_angle_motion, displaced, image_centre  # noqa: E402

SAMPLE = REPO / "CTtoMRISynthesis" / "Resources" / "SampleData"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def tensors_digest(path: Path) -> tuple[str, str]:
    """(digest of a model file's tensors, its config less timings as JSON): the file itself holds wall times."""
    from CTtoMRISynthesisLib.weights import read_weights_file

    blob = read_weights_file(path, framework="numpy")
    h = hashlib.sha256()
    for key in sorted(blob["state_dict"]):
        h.update(key.encode())
        h.update(np.ascontiguousarray(blob["state_dict"][key]).tobytes())
    config = dict(blob["config"])
    config["training"] = {k: v for k, v in config.get("training", {}).items()
                          if k not in ("seconds", "seconds_per_epoch", "hardware")}
    return h.hexdigest()[:16], json.dumps(config, sort_keys=True, default=str)


def phantom_data(root: Path, ids=("16", "20", "28"), slices: int = 5) -> Path:
    """Harvard-like slice folders of a few phantom patients."""
    for case_id, first in zip(ids, (3, 5, 3, 2)):
        pair = phantoms.slice_pair(seed=int(case_id), slices=slices, first_z=-15.0)
        phantoms.write_slice_folders(root, {case_id: pair}, first_slice=first)
    return root


def run_folder(out: Path) -> dict:
    """Log rows (less seconds), files, model tensors and configs, rank logs of a training run folder."""
    rows = []
    if (out / "log.csv").exists():
        with open(out / "log.csv") as fh:
            rows = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    models = {f: tensors_digest(out / f) for f in files if f.endswith(".safetensors")}
    ranks = {p.name: p.read_text() for p in sorted((out / "ranks").glob("*.log"))} if (out / "ranks").exists() else {}
    return {"log": rows, "files": files, "models": models, "ranks": ranks}


def plain(result) -> object:
    """A train() result as JSON data, its wall times dropped."""
    data = json.loads(json.dumps({k: v for k, v in (result or {}).items() if k != "config"}, default=str))
    for row in data.get("history", []):
        row.pop("seconds", None)
    return data


# ------------------------------------------------------------------------------------------------- parts
def part_train(tmp: Path, data_dir: Path) -> dict:
    from CTtoMRISynthesisLib.intensity import CTWindow
    from CTtoMRISynthesisLib.training import discovery
    from CTtoMRISynthesisLib.training.dataset import Augment
    from CTtoMRISynthesisLib.training.loop import TrainSettings, train
    from CTtoMRISynthesisLib.training.unpaired import UnpairedSettings

    window = CTWindow(45.0, 120.0)
    cases = discovery.discover([phantom_data(tmp / "data")], window)
    train_cases, val_cases = cases[:2], cases[2:]

    def settings(**kw) -> TrainSettings:
        values = dict(epochs=3, base=4, context=1, lr=3e-3, num_workers=0, max_steps=2, batch_size=4, device="cpu",
                      augment=Augment(), threads=1, window=window)
        return TrainSettings(**{**values, **kw})

    quiet = dict(command="fingerprint", progress_bar=False)
    out = {"best": plain(train(train_cases, settings(select="best"), tmp / "a", val_cases=val_cases, **quiet))}
    out["best_files"] = run_folder(tmp / "a")
    out["stopped"] = plain(train(train_cases, settings(stop_after=1), tmp / "b", **quiet))
    out["resumed"] = plain(train(train_cases, settings(), tmp / "b", resume=True, **quiet))
    out["resumed_files"] = run_folder(tmp / "b")
    out["every"] = plain(train(train_cases, settings(epochs=4, checkpoint_every=2), tmp / "c", val_cases=val_cases,
                               **quiet))
    out["every_files"] = run_folder(tmp / "c")
    train(train_cases, settings(lookup_residual=True, context=0), tmp / "d", **quiet)
    out["lookup_files"] = run_folder(tmp / "d")
    phantoms.write_pictures(tmp / "unpaired", phantoms.slice_pair(seed=5, slices=4)[0])
    unpaired = UnpairedSettings(paths=(str(tmp / "unpaired"),), consistency=0.3, prior=1.0, batch=2)
    train(train_cases, settings(unpaired=unpaired), tmp / "e", **quiet)
    out["unpaired_files"] = run_folder(tmp / "e")
    out["torchrun_files"] = run_folder(_torchrun(tmp))
    return out


def _torchrun(tmp: Path) -> Path:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    small = phantom_data(tmp / "small", ids=("16", "28"), slices=4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "CTtoMRISynthesisLib.training", "train",
           "--data", str(small), "--out", str(tmp / "ddp"), "--base", "4", "--epochs", "2", "--max-steps", "2",
           "--batch-size", "4", "--workers", "0", "--threads", "1", "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return tmp / "ddp"


def part_cli_train(tmp: Path, data_dir: Path) -> dict:
    from CTtoMRISynthesisLib.cli import main as ctmri

    data = phantom_data(tmp / "data", ids=("16", "20", "28", "33"), slices=4)
    args = phantoms.tiny_train_args
    calls = {
        "cv": args(data, tmp / "cv", "--cv", "kfold", "--folds", "2", "--exclude-from-training", "33",
                   "--drop-patients", "1", epochs=2),
        "cv_stop": args(data, tmp / "cvs", "--cv", "loo", "--stop-after", "1", epochs=2),
        "cv_resume": args(data, tmp / "cvs", "--cv", "loo", "--resume", "--only-folds", "1", "2", epochs=2),
        "cv_again": args(data, tmp / "cv", "--cv", "kfold", "--folds", "2", epochs=2),
        "cv_bad_fold": args(data, tmp / "cvb", "--cv", "kfold", "--folds", "2", "--only-folds", "5"),
        "single": args(data, tmp / "one", "--val-cases", "20", "--save", str(tmp / "saved" / "m.safetensors"), epochs=2),
        "single_again": args(data, tmp / "one"),
        "bad_save": args(data, tmp / "two", "--save", str(tmp / "m.pt")),
    }
    out = {}
    for name, argv in calls.items():
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = ctmri(argv)
        out[name] = {"exit": code, "out": _no_times(stdout.getvalue()), "err": _no_times(stderr.getvalue())}
    out["files"] = {p.relative_to(tmp).as_posix(): (tensors_digest(p)[0] if p.suffix == ".safetensors" else "file")
                    for p in sorted(tmp.rglob("*"))
                    if p.is_file() and not {"data", "cache"} & set(p.relative_to(tmp).parts)}
    return out


def _no_times(text: str) -> str:
    return re.sub(r"[0-9.]+s\b", "Ts", text)


def part_registration(tmp: Path, data_dir: Path) -> dict:
    from CTtoMRISynthesisLib import registration as reg
    from CTtoMRISynthesisLib.errors import CancelledError, CTMRIError

    out: dict = {}

    def run(name: str, fixed, moving, mode: str = "rigid", **kw) -> None:
        messages: list = []
        try:
            r = reg.register(fixed, moving, mode, progress=lambda f, m: messages.append(f"{f:.6f} {m}"), **kw)
            out[name] = {"parameters": [repr(p) for p in r.transform.GetParameters()],
                         "fixed_parameters": [repr(p) for p in r.transform.GetFixedParameters()],
                         "type": r.transform.GetName(), "metric": repr(r.metric), "iterations": r.iterations,
                         "stop": r.stop_condition, "overlap": repr(r.overlap)}
        except (CTMRIError, CancelledError) as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        out[name]["progress"] = messages

    mr = sitk.ReadImage(str(data_dir / "rire_training_001_mr_t1_only" / "training_001_mr_T1.mha"), sitk.sitkFloat32)
    centre = image_centre(mr)
    run("rire_12deg", mr, displaced(mr, axis_angle_motion(centre, (1, 2, 3), 12, (12, -8, 6)), (10, 10, 8)))
    run("rire_20deg_one_start", mr,
        displaced(mr, axis_angle_motion(centre, (1, 2, 3), 20, (20, -12, 10)), (14, 14, 10)), start_angles_deg=())
    small = axis_angle_motion(centre, (1, 2, 3), 6, (5, 0, 3))
    run("rire_similarity_moments", mr, displaced(mr, small, (10, 10, 8)), "similarity", initializer="moments",
        scales="physical_shift")
    run("rire_none", mr, displaced(mr, small, (10, 10, 8)), "none")
    harvard = data_dir / "harvard_aanlib_ct_mri_2d"
    for name in sorted(p.name for p in (harvard / "MRI").glob("*.png"))[::30]:
        mri, ct = (sitk.JoinSeries(sitk.Cast(sitk.ReadImage(str(harvard / sub / name)), sitk.sitkFloat32))
                   for sub in ("MRI", "CT"))
        run(f"harvard_{name}_aligned", mri, ct)
        turn = sitk.Euler3DTransform()
        turn.SetCenter(image_centre(mri))
        turn.SetRotation(0, 0, math.radians(10))
        turn.SetTranslation((15, -5, 0))
        turned = sitk.Resample(ct, ct, turn.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        run(f"harvard_{name}_moved", mri, turned)
        run(f"harvard_{name}_moved_similarity", mri, turned, "similarity")
    ct = sitk.ReadImage(str(SAMPLE / "ct.nrrd"), sitk.sitkFloat32)
    mri = sitk.ReadImage(str(SAMPLE / "mri.nrrd"), sitk.sitkFloat32)
    run("sample_slab", mri, ct)
    run("sample_slab_similarity", mri, ct, "similarity")
    far = sitk.Image(ct)
    far.SetOrigin(tuple(o + 1000 for o in ct.GetOrigin()))
    run("sample_disjoint", mri, far)
    run("sample_disjoint_allowed", mri, far, allow_disjoint=True, min_overlap=0.0)
    calls = [0]

    def cancel() -> bool:
        calls[0] += 1
        return calls[0] > 5

    try:
        reg.register(mr, displaced(mr, small, (10, 10, 8)), cancel=cancel)
        out["cancel"] = "not cancelled"
    except CancelledError:
        out["cancel"] = f"cancelled at call {calls[0]}"
    return out


def part_inference(tmp: Path, data_dir: Path) -> dict:
    from scipy import ndimage

    from CTtoMRISynthesisLib.dicom import read_input
    from CTtoMRISynthesisLib.intensity import CTWindow, normalise_ct
    from CTtoMRISynthesisLib.synthesis import predict_volume
    from CTtoMRISynthesisLib.weights import load_model

    model = load_model()
    image, _ = read_input(str(data_dir / "real_hu_head_ct_dicom"), "CT")
    ct255, _ = normalise_ct(sitk.GetArrayFromImage(image)[30:36], CTWindow(**model.config["preprocessing"]["ct_window"]))
    ct255 = ndimage.zoom(ct255, (1, 0.5, 0.5), order=1)  # 256² slices: quick, still the real CT
    options = {"plain": {}, "flip": {"flip_tta": True}, "standardised": {"ct_standardise": 105.0},
               "grain": {"ct_grain_target": 2.0, "ct_grain_max_blur": 1.0, "flip_tta": True},
               "unmasked_batch_4": {"mask_output": False, "batch_size": 4}}
    out = {}
    for name, kw in options.items():
        messages, info = [], {}
        p = predict_volume(model.net, ct255, progress=lambda f, m: messages.append(f"{f:.4f} {m}"), info=info, **kw)
        out[name] = {"mean": digest(p.mean.tobytes()), "spread": digest(p.spread.tobytes()),
                     "head": digest(p.head.tobytes()), "info": json.loads(json.dumps(info, default=str)),
                     "progress": messages}
    return out


def part_pipeline(tmp: Path, data_dir: Path) -> dict:
    from CTtoMRISynthesisLib.pipeline import synthesize

    ct, mri = (sitk.ReadImage(str(SAMPLE / name)) for name in ("ct.nrrd", "mri.nrrd"))

    def image(im) -> object:
        if im is None:
            return None
        return [digest(sitk.GetArrayViewFromImage(im).tobytes()), im.GetOrigin(), im.GetSpacing(), im.GetDirection()]

    out = {}
    for name, inputs, kw in (("ct_mri", (ct, mri), {}), ("ct_only", (ct,), {}),
                             ("registration_none", (ct, mri), {"registration": "none"})):
        messages: list = []
        r = synthesize(*inputs, device="cpu", progress=lambda f, m: messages.append(f"{f:.4f} {m}"), **kw)
        out[name] = {"synthetic_mri": image(r.synthetic_mri), "uncertainty": image(r.uncertainty),
                     "difference": image(r.difference), "ct_registered": image(r.ct_registered),
                     "metrics": r.metrics, "warnings": r.warnings, "uncertainty_mean": r.uncertainty_mean,
                     "normalisation": json.loads(json.dumps(r.normalisation, default=str)),
                     "registration": {k: v for k, v in (r.registration or {}).items() if k != "seconds"},
                     "stages": sorted(r.stage_seconds), "weights": r.weights, "device": r.device, "progress": messages}
    return json.loads(json.dumps(out, default=str))


def part_report(tmp: Path, data_dir: Path) -> dict:
    from CTtoMRISynthesisLib.intensity import CTWindow
    from CTtoMRISynthesisLib.training import discovery
    from CTtoMRISynthesisLib.training.report import write_cv_report

    data = phantom_data(tmp / "data", slices=4)
    runs = phantoms.tiny_cv_runs(data, tmp, seeds=(0, 1))
    cases = discovery.discover([data], CTWindow(45.0, 120.0))
    out = {}
    for name, run in (("single", runs[0]), ("ensemble", runs)):
        folder = tmp / f"report_{name}"
        write_cv_report(run, cases, command="fingerprint", out_dir=folder)
        out[name] = {p.name: (p.read_text() if p.suffix in (".md", ".csv", ".json") else digest(p.read_bytes()))
                     for p in sorted(folder.iterdir())}
    return out


PARTS = {"train": part_train, "cli-train": part_cli_train, "registration": part_registration,
         "inference": part_inference, "pipeline": part_pipeline, "report": part_report}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"what to fingerprint (default all): {', '.join(PARTS)}")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"),
                        help="the shared data folder (registration, inference)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose among {', '.join(PARTS)}")
    result = {}
    for part in args.parts or list(PARTS):
        tmp = Path(tempfile.mkdtemp(prefix=f"fingerprint-{part}-"))
        try:
            text = json.dumps(PARTS[part](tmp, Path(args.data)), sort_keys=True, default=str)
            result[part] = json.loads(text.replace(str(tmp), "TMP"))  # temporary paths differ from run to run
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"{part}: done", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
