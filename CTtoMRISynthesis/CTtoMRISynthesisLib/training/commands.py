"""Command-line entry points of the trainer (``ctmri train``) and of the report (``ctmri report``).

``add_*_arguments`` fill an argparse parser; ``run_*`` take the parsed namespace and return an exit code.
Heavy imports (torch) happen inside ``run_*`` so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import CTMRIError

DEFAULT_WINDOW = (45.0, 120.0)  # chosen from the training CT, see model_weights/README.md


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["ctmri"] + sys.argv[1:]) if sys.argv else ""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import given_path

    p = parser
    p.add_argument("--data", type=given_path, nargs="+", required=True, metavar="DIR",
                   help="paired data: CT/ + MRI/ slice folders, or folders of 3D cases holding ct.* and mr.*")
    p.add_argument("--out", type=given_path, required=True, metavar="DIR", help="run folder: log.csv, checkpoint.pt, model.safetensors, …")
    p.add_argument("--save", type=given_path, metavar="FILE", help="also copy the final model (+ .sha256) to FILE, e.g. model_weights/ctmri_unet.safetensors")
    p.add_argument("--cache", type=given_path, metavar="DIR", help="cache of registered 3D cases (default: OUT/cache)")
    p.add_argument("--case-rule", choices=["slice3", "first2"], default="slice3",
                   help="2D case id: the file stem without its 3-digit slice number (default), or its first two characters")
    split = p.add_argument_group("split (patients only, never slices)")
    split.add_argument("--cv", choices=["none", "loo", "kfold"], default="none",
                       help="cross-validation: leave-one-patient-out or k-fold; writes the Table-1 report")
    split.add_argument("--folds", type=int, default=5, help="k for --cv kfold")
    split.add_argument("--only-folds", type=int, nargs="+", metavar="K", default=None,
                       help="with --cv: run only these folds (1-based), e.g. one per job of a cluster array; the "
                            "report is written by the run that finds every fold done")
    split.add_argument("--drop-patients", type=int, default=0, metavar="N",
                       help="train on the patients of the split (or fold) less N drawn at random with --seed (bagging: "
                            "members that saw different patients disagree where the fit depends on who was seen)")
    split.add_argument("--exclude-from-training", nargs="+", default=[], metavar="ID",
                       help="patients never trained on, e.g. one whose MRI is another sequence than the target; "
                            "with --cv they are still held out in their own fold and scored")
    split.add_argument("--val-cases", nargs="*", default=[], metavar="ID", help="validation patients (select the best epoch)")
    split.add_argument("--test-cases", nargs="*", default=[], metavar="ID", help="test patients, never trained on")
    model = p.add_argument_group("model and training")
    model.add_argument("--name", default="ctmri_unet")
    model.add_argument("--base", type=int, default=16, help="channels of the first U-Net level (paper: 64)")
    model.add_argument("--levels", type=int, default=5)
    model.add_argument("--lookup-residual", action="store_true",
                       help="learn the residual over a CT→MRI grey-level lookup table fit on the training patients "
                            "(not in the paper; the table is stored in the weights)")
    model.add_argument("--lookup-sigma", type=float, default=0.0, metavar="PIXELS",
                       help="with --lookup-residual: blur the CT slice by a Gaussian of this sigma before the lookup")
    model.add_argument("--context", type=int, default=1, help="neighbouring slices each side as extra input channels")
    model.add_argument("--epochs", type=int, default=30)
    model.add_argument("--batch-size", type=int, default=16)
    model.add_argument("--lr", type=float, default=1e-3)
    model.add_argument("--lr-min", type=float, default=1e-5)
    model.add_argument("--lr-schedule", choices=["cosine", "exponential", "constant"], default="cosine")
    model.add_argument("--gamma", type=float, default=0.9, help="per-epoch factor of the exponential schedule")
    model.add_argument("--loss", choices=["mse", "l1", "l1+ssim", "laplace", "mse+gaussian"], default="mse",
                       help="paper: mse; laplace = Laplace likelihood with a predicted per-pixel scale; mse+gaussian "
                            "= the paper's MSE for the image plus a Gaussian likelihood teaching a second output the "
                            "expected error (both give the uncertainty map)")
    model.add_argument("--ssim-weight", type=float, default=0.5)
    model.add_argument("--no-augment", action="store_true")
    model.add_argument("--rotate", type=float, default=10.0, help="augmentation: max rotation, degrees")
    model.add_argument("--scale", type=float, default=0.1, help="augmentation: max relative scale change")
    model.add_argument("--aug-intensity", nargs=2, type=float, metavar=("GAIN", "SHIFT"), default=[0.05, 0.02],
                       help="augmentation: CT x(1±GAIN) + (±SHIFT) on the 0..1 scale (another window)")
    model.add_argument("--aug-gamma", type=float, default=0.0, metavar="LOG",
                       help="augmentation: CT gamma curve with |log gamma| up to LOG")
    model.add_argument("--aug-blur", type=float, default=0.0, metavar="PIXELS",
                       help="augmentation: CT Gaussian blur of sigma up to PIXELS (smoother reconstructions)")
    model.add_argument("--aug-noise", type=float, default=0.0, metavar="SD",
                       help="augmentation: CT noise of SD up to this (0..1 scale), white or correlated")
    model.add_argument("--aug-contrast", type=float, default=0.0, metavar="C",
                       help="augmentation: CT contrast stretched about the soft-tissue median by a factor up to 1 + C "
                            "(narrower brain windows, CSF towards black, as other hospitals' 8-bit CTs); default 0")
    model.add_argument("--no-flip-tta", action="store_true",
                       help="record that inference must not average the left-right flipped prediction")
    model.add_argument("--select", choices=["last", "best"], default=None,
                       help="model kept: last epoch, or best validation MAE (default: best with --val-cases, else last)")
    model.add_argument("--ct-window", nargs=2, type=float, metavar=("LEVEL", "WIDTH"), default=list(DEFAULT_WINDOW),
                       help="Hounsfield window that makes a HU CT look like the training CT (recorded for inference)")
    model.add_argument("--ct-standardise", type=float, default=None, metavar="TARGET",
                       help="map each CT's brain median to TARGET (0..255) before the network, in training and "
                            "at inference (recorded in the weights); for CTs windowed differently per patient")
    model.add_argument("--no-mask-output", action="store_true", help="do not zero the synthetic MRI outside the head")
    unpaired = p.add_argument_group("unpaired CT (no MRI): adapting to other scanners and hospitals (training/unpaired.py)")
    unpaired.add_argument("--unpaired-ct", type=given_path, nargs="+", default=[], metavar="PATH",
                          help="CTs without MRI, each a folder of one CT's 2D slices, a volume file or a DICOM folder; "
                               "a few of their slices join every step with a T2-prior term (and a consistency term if "
                               "--unpaired-consistency is above 0)")
    unpaired.add_argument("--unpaired-batch", type=int, default=4, metavar="N", help="unpaired slices per step on each process (torchrun: each process draws its own)")
    unpaired.add_argument("--unpaired-consistency", type=float, default=0.0, metavar="W",
                          help="weight of the consistency term (plain vs augmented rendering of the same slice; "
                               "default 0: measured, it flattens the synthetic MRI's contrast, model card round 7)")
    unpaired.add_argument("--unpaired-prior", type=float, default=1.0, metavar="W",
                          help="weight of the T2 prior (in-head grey levels distributed as the training MRI's)")
    unpaired.add_argument("--unpaired-prior-by-ct", action="store_true",
                          help="the T2 prior's target follows each batch's CT: the training MRI's grey levels given "
                               "each CT grey level, mixed as the batch's own CT histogram (a head with more CSF "
                               "gets more T2-bright voxels) instead of one distribution for every batch")
    run = p.add_argument_group("running")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--workers", type=int, default=4, help="DataLoader worker processes (paper: 4)")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    run.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    run.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: all cores)")
    run.add_argument("--max-steps", type=int, default=0, help="at most this many steps per epoch (smoke tests)")
    run.add_argument("--stop-after", type=int, default=0, metavar="EPOCH",
                     help="leave after this epoch (checkpointed); continue later with --resume")
    run.add_argument("--checkpoint-every", type=int, default=1, metavar="N",
                     help="validate and checkpoint every N epochs and after the last (a resumed run redoes the epochs since)")
    run.add_argument("--resume", action="store_true", help="continue from OUT's checkpoints; finished folds are kept "
                     "(without it, an OUT or fold folder that holds a run is refused)")
    run.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    run.add_argument("--bone-threshold", type=float, default=200.0, help="report: bone = CT (0..255) above this")


def settings_from_args(args) -> "object":
    from ..intensity import CTWindow
    from .dataset import Augment
    from .loop import TrainSettings
    from .unpaired import UnpairedSettings

    augment = Augment(
        enabled=not args.no_augment, rotate_deg=args.rotate, scale=args.scale,
        intensity_scale=args.aug_intensity[0], intensity_shift=args.aug_intensity[1],
        gamma=args.aug_gamma, blur=args.aug_blur, noise=args.aug_noise, contrast=args.aug_contrast,
    )
    select = args.select or ("best" if args.val_cases else "last")
    return TrainSettings(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_min=args.lr_min,
        schedule=args.lr_schedule, gamma=args.gamma, loss=args.loss, ssim_weight=args.ssim_weight,
        base=args.base, levels=args.levels, lookup_residual=args.lookup_residual,
        lookup_sigma=args.lookup_sigma, context=args.context, augment=augment, seed=args.seed,
        num_workers=args.workers, device=args.device, amp=not args.no_amp, select=select,
        mask_output=not args.no_mask_output, ct_standardise=args.ct_standardise, window=CTWindow(*args.ct_window), name=args.name,
        threads=args.threads, max_steps=args.max_steps, stop_after=args.stop_after, flip_tta=not args.no_flip_tta,
        checkpoint_every=args.checkpoint_every,
        unpaired=UnpairedSettings(tuple(str(Path(u).resolve()) for u in args.unpaired_ct), args.unpaired_batch,
                                  args.unpaired_consistency, args.unpaired_prior, args.unpaired_prior_by_ct),
    ).check()


def _data_summary(cases, args) -> dict:
    from .discovery import describe

    summary = describe(cases)
    summary["licence"] = (
        "Harvard AANLIB (The Whole Brain Atlas, Johnson & Becker) via github.com/xianming-gu/"
        "Havard-Medical-Image-Fusion-Datasets: no open licence stated; research/test use only"
        if any("harvard" in s.lower() for s in summary["sources"])
        else "see the data's own terms"
    )
    summary["case_rule"] = args.case_rule
    return summary


#: what a training run leaves in its folder; a folder holding one is a run, continued only with --resume
RUN_FILES = ("checkpoint.pt", "model.safetensors")


def check_run_free(run_dir: Path) -> None:
    """Refuse to train into a folder that holds a run: without --resume it would be trained again from scratch
    over its checkpoint and model, hours of work lost to a forgotten flag."""
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found:
        raise CTMRIError(f"{run_dir} holds a training run already ({', '.join(found)}): pass --resume to continue it "
                         "(a finished run is kept as it is), or choose another --out")


@dataclass
class _TrainJob:
    """What every training run of one ``ctmri train`` call shares: the patients, the settings, the record."""

    args: argparse.Namespace
    settings: object  # loop.TrainSettings
    cases: list
    data: dict  # the data summary recorded in each model file
    command: str
    excluded: list  # --exclude-from-training

    @property
    def ids(self) -> list:
        return [c.case_id for c in self.cases]

    def patients(self, train_ids, split_record: dict) -> tuple:
        """The patients a run really trains on (less --exclude-from-training, less --drop-patients drawn with
        the seed) and the split record saying so."""
        from . import split as splits

        args = self.args
        if self.excluded:
            train_ids, split_record = splits.exclude(train_ids, self.excluded, split_record)
        if args.drop_patients:
            train_ids, dropped = splits.drop_random(train_ids, args.drop_patients, f"{args.seed}:{split_record.get('mode')}")
            split_record = {**split_record, "train_cases": train_ids, "dropped_cases": dropped}
        return train_ids, split_record

    def check_kept(self, train_ids, val_ids, split_record: dict, run_dir: Path) -> None:
        """A finished run kept on --resume must be this recipe on these patients (its checkpoint says)."""
        from .loop import check_same_run

        train_ids, _ = self.patients(train_ids, split_record)
        check_same_run(run_dir, self.settings, {"train_cases": sorted(train_ids), "val_cases": sorted(val_ids)})

    def train(self, train_ids, val_ids, split_record: dict, run_dir: Path) -> dict:
        """One training run on these patients, validated on those (the CV fold or the single split)."""
        from .loop import train

        args, by_id = self.args, {c.case_id: c for c in self.cases}
        train_ids, split_record = self.patients(train_ids, split_record)
        return train(
            [by_id[c] for c in train_ids], self.settings, run_dir,
            val_cases=[by_id[c] for c in val_ids], split=split_record, data=self.data,
            resume=args.resume, command=self.command, progress_bar=not args.no_progress,
        )


def _check_save(args) -> None:
    """``--save`` makes sense for a single run only, and may replace only a ctmri model file."""
    from ..weights import check_model_target

    if args.cv != "none":
        raise CTMRIError("--save copies a single run's model; with --cv there is one model per fold (foldNN/"
                         "model.safetensors): leave --save out, or train the model to ship without --cv")
    check_model_target(args.save, "--save")


def run_train(args) -> int:
    from . import split as splits
    from .discovery import discover
    from ..outputs import check_writable
    from .loop import check_batch_divides, dist_from_env
    from .unpaired import check_not_paired

    try:
        settings = settings_from_args(args)
        check_batch_divides(settings.batch_size, dist_from_env())  # before the data is read, not after
        check_writable(args.out, "--out")
        if args.save:  # before training, not after it
            _check_save(args)
        out = Path(args.out)
        cases = discover(args.data, settings.window, settings.size, Path(args.cache) if args.cache else out / "cache",
                         args.case_rule)
        ids = [c.case_id for c in cases]
        check_not_paired(settings.unpaired, cases, settings.window, settings.size)  # before any fold trains
        job = _TrainJob(args, settings, cases, _data_summary(cases, args), _command_line(),
                        splits.check_known(args.exclude_from_training, ids, "--exclude-from-training"))
        if dist_from_env().main:
            print(f"{len(cases)} patients, {job.data['slices']} slices: "
                  + ", ".join(f"{c.case_id} ({c.slices})" for c in cases), flush=True)
        return _run_cross_validation(job, out) if args.cv != "none" else _run_single(job, out)
    except CTMRIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist_from_env().active:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()


def _run_cross_validation(job: _TrainJob, out: Path) -> int:
    """``--cv``: each chosen fold trained in ``out/foldNN`` and scored; the report once every fold is done."""
    from . import split as splits
    from .loop import dist_from_env
    from .report import write_cv_report

    args, main = job.args, dist_from_env().main
    if args.val_cases or args.test_cases:  # a fold's held-out patient is its test and validation set
        raise CTMRIError("--val-cases and --test-cases choose the patients of a single run; with --cv each fold "
                         "holds out its own: leave them out, or use --exclude-from-training to never train on some")
    folds = splits.cross_validation(job.ids, 0 if args.cv == "loo" else args.folds, args.seed)
    job.settings.select = "last"  # the held-out patient is logged, never used to pick an epoch
    chosen = set(args.only_folds or range(1, len(folds) + 1))
    unknown = sorted(chosen - set(range(1, len(folds) + 1)))
    if unknown:
        raise CTMRIError(f"--only-folds {unknown}: this cross-validation has folds 1..{len(folds)}; choose among them")
    for k in sorted(chosen):  # every chosen fold, before the first trains
        job.patients(folds[k - 1].train_cases, folds[k - 1].to_dict())  # some left after exclusions and drops
        if not args.resume:
            check_run_free(out / f"fold{k:02d}")
    for k, fold in enumerate(folds, start=1):
        if k in chosen and not _run_fold(job, k, fold, len(folds), out / f"fold{k:02d}"):
            return 0  # stopped (--stop-after): continue with --resume
    missing = [k for k in range(1, len(folds) + 1) if not (out / f"fold{k:02d}" / "fold.json").exists()]
    if main and missing:
        print(f"folds {missing} are not done yet; the report is written once every fold is", flush=True)
    elif main:
        paths = write_cv_report(out, job.cases, command=job.command, bone_threshold=args.bone_threshold)
        print("report: " + ", ".join(str(p) for p in paths), flush=True)
    return 0


def _run_fold(job: _TrainJob, k: int, fold, n_folds: int, fold_dir: Path) -> bool:
    """Train and score fold ``k`` (kept when done and resuming); False when the run stopped before the end."""
    from .loop import dist_from_env
    from .report import evaluate_fold

    args, main = job.args, dist_from_env().main
    if args.resume and (fold_dir / "fold.json").exists():
        job.check_kept(fold.train_cases, fold.test_cases, fold.to_dict(), fold_dir)
        if main:
            print(f"fold {k}/{n_folds} already done ({fold.test_cases}); kept", flush=True)
        return True
    if main:
        shown = [c for c in fold.train_cases if c not in job.excluded]
        print(f"fold {k}/{n_folds}: held out {fold.test_cases}, training on {shown}"
              + (f" (never on {job.excluded})" if job.excluded else "")
              + (f" less {args.drop_patients} drawn with the seed" if args.drop_patients else ""), flush=True)
    if job.train(fold.train_cases, fold.test_cases, fold.to_dict(), fold_dir).get("stopped"):
        return False
    if main:
        from ..synthesis import choose_device

        evaluate_fold(fold_dir, job.cases, bone_threshold=args.bone_threshold, device=choose_device(args.device))
    return True


def _run_single(job: _TrainJob, out: Path) -> int:
    """One model on the training patients (all, or less ``--val-cases``/``--test-cases``); ``--save`` copies it."""
    from . import split as splits
    from .loop import dist_from_env

    args = job.args
    if args.val_cases or args.test_cases:
        split = splits.holdout(job.ids, args.val_cases, args.test_cases, seed=args.seed)
    else:
        split = splits.all_cases(job.ids, args.seed)
    if not args.resume:
        check_run_free(out)
    result = job.train(split.train_cases, split.val_cases, split.to_dict(), out)
    if result.get("stopped") or not dist_from_env().main:
        return 0
    if args.save:
        from ..weights import copy_model

        copy_model(result["weights"], args.save)
        print(f"saved {Path(args.save)}", flush=True)
    print(f"model: {result['weights']}", flush=True)
    return 0


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import given_path

    p = parser
    p.add_argument("--data", type=given_path, nargs="+", required=True, metavar="DIR", help="paired data (as for train)")
    p.add_argument("--weights", type=given_path, metavar="FILE", help="model file (default: the shipped model)")
    p.add_argument("--out", type=given_path, required=True, metavar="DIR", help="report folder (Markdown, CSV, PNG montages); one holding another report.md, "
                   "summary.csv, summary.json or per_patient.csv is refused")
    p.add_argument("--cache", type=given_path, metavar="DIR", help="cache of registered 3D cases (default: OUT/cache)")
    p.add_argument("--case-rule", choices=["slice3", "first2"], default="slice3")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--bone-threshold", type=float, default=200.0, help="bone = CT (0..255) above this")
    p.add_argument("--from-cv", metavar="DIR", nargs="+",
                   help="rebuild the report of a finished `train --cv` run folder instead; several folders: the "
                        "report of their ensemble (mean prediction, SD as the uncertainty; see ensemble.py)")
    p.add_argument("--attach", metavar="FILE",
                   help="with --from-cv: write the cross-validated summary into this weights file's config "
                        "(metrics.cross_validation; the all-patients model or ensemble of the same recipe); its "
                        "config describes the model where the runs keep predictions but no fold model files")


def run_report(args) -> int:
    from .report import check_report_folder, report_model, write_cv_report
    from .discovery import discover
    from ..intensity import CTWindow
    from ..outputs import check_writable

    try:
        check_writable(args.out, "--out")  # before the work, not after it
        check_report_folder(Path(args.out))
        if args.from_cv:
            from .report import check_finished_cv, fold_model
            from ..weights import read_config

            runs = [Path(r) for r in args.from_cv]
            check_finished_cv(runs)
            fold0 = [m for r in runs for m in map(fold_model, sorted(r.glob("fold*"))) if m.exists()]
            if not fold0 and not args.attach:
                raise CTMRIError(f"{', '.join(args.from_cv)} hold no fold*/model.safetensors; run `ctmri train --cv loo` "
                                 "first (or, for predictions only, name the model with --attach)")
            attached = read_config(args.attach) if args.attach else None
            cfg = read_config(fold0[0]) if fold0 else attached
            window = CTWindow(**cfg["preprocessing"]["ct_window"])
            cases = discover(args.data, window, 256, args.cache or Path(args.out) / "cache", args.case_rule)
            paths = write_cv_report(runs if len(runs) > 1 else runs[0], cases, command=_command_line(),
                                    bone_threshold=args.bone_threshold, out_dir=Path(args.out),
                                    config=attached if len(runs) > 1 or not fold0 else None)
            if args.attach:
                from .report import attach_cv_metrics

                attach_cv_metrics(args.attach, Path(args.out), command=_command_line())
                paths.append(Path(args.attach))
        else:
            paths = report_model(args.data, args.weights, Path(args.out), device=args.device,
                                 bone_threshold=args.bone_threshold, case_rule=args.case_rule,
                                 cache=args.cache, command=_command_line())
        for p in paths:
            print(p)
        return 0
    except CTMRIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
