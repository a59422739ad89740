"""The ``ctmri`` command: synthesize | evaluate | series | batch | train | report | demo.

Heavy imports (torch, SimpleITK) happen inside the commands so that ``ctmri --help`` is instant.
Errors a user can cause print one line ``error: …`` and exit 2; Ctrl-C exits 130 leaving no output.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

EXIT_ERROR = 2
EXIT_CANCELLED = 130


def cmd_synthesize(args: argparse.Namespace) -> int:
    from .case import CaseOptions, run_case
    from .interrupts import sigterm_as_interrupt
    from .progress import progress_for

    options = CaseOptions(
        weights=args.weights, device=args.device, registration=args.registration,
        allow_disjoint=args.allow_disjoint, batch_size=args.batch_size,
        dicom=args.dicom, ct_series=args.ct_series, mri_series=args.mri_series,
        picture_spacing=args.picture_spacing, mri_picture_spacing=args.mri_picture_spacing, pictures=args.pictures,
    )
    progress, close = progress_for(args.quiet)
    try:
        with sigterm_as_interrupt():  # a kill or a scheduler's stop takes Ctrl-C's path: nothing half-made, exit 130
            result, paths = run_case(args.ct, args.mri, args.out_dir, options, progress=progress, notify=print)
    finally:
        close()
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"CT intensities: {result.normalisation.get('description')}")
    if result.registration:
        from .registration import summary_line

        print(summary_line(result.registration))
    if result.metrics is not None:
        from .metrics import foreground_words

        m = result.metrics
        print(f"MAE {m['mae']:.2f}  SSIM {m['ssim']:.4f}  PSNR {m['psnr']:.2f} dB  "
              f"(0..255 scale, foreground = {foreground_words(m.get('foreground'))})")
    print(f"device {result.device}, {result.seconds:.1f} s; wrote {', '.join(p.name for p in paths.values())} to {args.out_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import check_json_target, evaluate_files, summary_line, write_json

    target = check_json_target(args.json)  # before the work, not after it
    metrics, notes, warnings = evaluate_files(args.pred, args.ref, args.pred_scale, args.picture_spacing,
                                              args.pred_series, args.ref_series)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(summary_line(metrics))
    if target is not None:
        write_json(check_json_target(args.json), metrics)  # again: a file of the user's may have appeared meanwhile
    return 0


def cmd_series(args: argparse.Namespace) -> int:
    from .dicom import describe_folder

    print(describe_folder(args.folder), end="")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    import dataclasses

    from .batch import run_batch
    from .case import CaseOptions

    # Every synthesize option batch offers has a CaseOptions field of the same name.
    names = {f.name for f in dataclasses.fields(CaseOptions)}
    options = CaseOptions(**{k: v for k, v in vars(args).items() if k in names})
    outcome = run_batch(args.manifest, args.out_dir, options, jobs=args.jobs, shard=args.shard,
                        progress=False if args.quiet else None)
    return outcome.exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.out_dir, device=args.device, quiet=args.quiet)


def _add_picture_spacing(p: argparse.ArgumentParser, why: str = "") -> None:
    p.add_argument("--picture-spacing", type=float, nargs=2, metavar=("IN_PLANE", "SLICE"),
                   help="pixel size and slice step in mm of inputs given as folders of 2D pictures, which record "
                        f"neither (default: 1 mm assumed, said in a warning{why})")


def _slices_per_batch(text: str) -> int:
    """``--batch-size``: a whole number >= 1 (0 and negatives were silently replaced by the default or by 1)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of slices >= 1, or leave it out for the default")
    return value


def given_path(text: str) -> str:
    """An argparse type for paths: an empty one (an unset shell variable, ``--out-dir "$OUT"``) would mean the
    current folder, which then became a results folder; refused instead."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset variable?); give a file or folder name")
    return text


def _add_batch_size(p: argparse.ArgumentParser) -> None:
    from .synthesis import default_batch_size  # numpy only: --help stays fast

    p.add_argument("--batch-size", type=_slices_per_batch, default=None,
                   help=f"slices per batch (default: {default_batch_size('cpu')} CPU, {default_batch_size('cuda')} GPU)")


def _add_picture_options(p: argparse.ArgumentParser) -> None:
    _add_picture_spacing(p, "; needed to register such a CT to an MRI")
    p.add_argument("--mri-picture-spacing", type=float, nargs=2, metavar=("IN_PLANE", "SLICE"),
                   help="the same for an MRI given as a folder of pictures whose pixel size differs from the CT's "
                        "(pictures exported from another viewer or field of view; default: --picture-spacing)")
    p.add_argument("--pictures", action="store_true",
                   help="also write the synthetic MRI, uncertainty and difference as 8-bit PNG slices "
                        "(OUT/pictures/<kind>/, named after the input pictures when the outputs lie on their grid)")


def build_parser() -> argparse.ArgumentParser:
    from .evaluate import PRED_SCALES  # light: the heavy imports of evaluate are inside its functions

    parser = argparse.ArgumentParser(
        prog="ctmri", description="Synthesise a brain MRI from a head CT with a U-Net (CTtoMRISynthesis)."
    )
    from .version import version_string

    # what metrics.json (software) and the DICOM outputs (SoftwareVersions) record, to be quoted with a result
    parser.add_argument("--version", action="version", version=f"ctmri {version_string()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synthesize", help="CT (+ optional MRI) → synthetic MRI, difference map, metrics")
    p.add_argument("--ct", type=given_path, required=True, help="CT volume: .nrrd, .nii(.gz), .mha/.mhd, .png, a DICOM folder "
                   "or a folder of 2D pictures (one slice each, stacked in the order of the numbers in their names)")
    p.add_argument("--mri", type=given_path, help="reference MRI of the same patient (enables registration and metrics)")
    p.add_argument("--out-dir", type=given_path, required=True, help="folder for the outputs (created if missing; only files an earlier run wrote are replaced, a file of "
                   "yours named like an output makes the run stop first)")
    p.add_argument("--weights", type=given_path, help="model file (default: the shipped model_weights/ctmri_unet.safetensors)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--registration", default="rigid", choices=["rigid", "similarity", "none"],
                   help="CT→MRI registration: rigid (default), similarity (adds scale) or none (already aligned)")
    p.add_argument("--allow-disjoint", action="store_true",
                   help="CT and MRI do not overlap at all (unrelated scanner coordinates): start the registration "
                        "from aligned centres instead of refusing")
    _add_batch_size(p)
    p.add_argument("--ct-series", metavar="N|UID", help="series number or SeriesInstanceUID to take when --ct is a "
                   "DICOM folder with several series (default: chosen by the rule; see `ctmri series`)")
    p.add_argument("--mri-series", metavar="N|UID", help="the same for --mri")
    p.add_argument("--dicom", action="store_true", help="also write every output volume as a DICOM series "
                   "(OUT/dicom/<kind>/, one file per slice; in the CT's study when the CT is DICOM)")
    _add_picture_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress (a bar on a terminal, else plain lines)")
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser("series", help="list the DICOM series of a folder and which one --ct/--mri would take (or how "
                       "a folder of pictures would be stacked)")
    p.add_argument("folder", help="folder searched recursively for DICOM files (e.g. a scanner's study export)")
    p.set_defaults(func=cmd_series)

    p = sub.add_parser("evaluate", help="metrics of a synthetic MRI against a reference MRI")
    p.add_argument("--pred", type=given_path, required=True, help="synthetic MRI (0..255, e.g. synthetic_mri.nrrd, or a folder of "
                   "pictures such as OUT/pictures/synthetic_mri)")
    p.add_argument("--ref", type=given_path, required=True, help="reference MRI (min-max scaled to 0..255 as in the paper): a file, a "
                   "DICOM folder or a folder of pictures")
    p.add_argument("--pred-scale", default="as-is", choices=PRED_SCALES,
                   help="use the prediction's values as they are (default) or min-max scale them too")
    p.add_argument("--json", type=given_path, help="also write the metrics to this JSON file (new, or an earlier "
                   "`ctmri evaluate` result, which is replaced; any other existing file is refused)")
    p.add_argument("--ref-series", metavar="N|UID", help="series number or SeriesInstanceUID to take when --ref is a "
                   "DICOM folder with several series (default: chosen by the rule; see `ctmri series`)")
    p.add_argument("--pred-series", metavar="N|UID", help="the same for --pred (e.g. 9001, the synthetic MRI of "
                   "`ctmri synthesize --dicom` in OUT/dicom)")
    _add_picture_spacing(p)
    p.set_defaults(func=cmd_evaluate)

    try:
        from .training import commands as training_commands
    except ImportError:  # the trainer is optional for inference-only installs
        training_commands = None
    if training_commands is not None:
        p = sub.add_parser("train", help="train a model on paired CT/MRI data")
        training_commands.add_train_arguments(p)
        p.set_defaults(func=training_commands.run_train)
        p = sub.add_parser("report", help="per-patient evaluation table, baselines and montages")
        training_commands.add_report_arguments(p)
        p.set_defaults(func=training_commands.run_report)

    p = sub.add_parser("batch", help="a cohort from a manifest CSV: one folder per case, resumable, shardable",
                       description="Run `synthesize` on every case of a manifest (CSV columns id,ct,mri; mri may be "
                                   "empty; paths relative to the CSV). Writes OUT/<id>/, OUT/summary.csv, "
                                   "summary.json and report.md. A rerun skips finished cases. Exit status: 0 all "
                                   "cases ok, 1 some case failed (see summary.csv), 2 the batch could not run, "
                                   "130 interrupted.")
    p.add_argument("--manifest", type=given_path, required=True, help="CSV with columns id,ct,mri (id: the case's folder name)")
    p.add_argument("--out-dir", type=given_path, required=True, help="folder for the case folders and the summary (shared by shards)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes on this machine (default 1); each gets "
                                                       "cores/N threads and loads the model once")
    p.add_argument("--shard", metavar="I/N", help="run only shard I of N (1-based), e.g. from a SLURM job array")
    p.add_argument("--dicom", action="store_true", help="also write the outputs as DICOM series (as synthesize --dicom)")
    p.add_argument("--weights", type=given_path, help="model file (default: the shipped model)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--registration", default="rigid", choices=["rigid", "similarity", "none"],
                   help="CT→MRI registration for the cases with an MRI (as synthesize)")
    p.add_argument("--allow-disjoint", action="store_true", help="as synthesize --allow-disjoint")
    _add_batch_size(p)
    _add_picture_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar (one line per case is still printed)")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("demo", help="run the whole pipeline on the sample case shipped in the repository")
    p.add_argument("--out-dir", type=given_path, default="ctmri_demo_output", help="where to write the outputs")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--quiet", action="store_true", help="no progress (a bar on a terminal, else plain lines)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import CancelledError, CTMRIError

    args = build_parser().parse_args(argv)
    if args.command == "train":
        # As in `python -m CTtoMRISynthesisLib.training`: on a shared CPU, spinning OpenMP threads made
        # training steps 2-3x slower. Must be set before torch is first imported.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        return int(args.func(args) or 0)
    except CancelledError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return EXIT_CANCELLED
    except CTMRIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
