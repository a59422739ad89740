"""``ctmri demo``: the whole pipeline on the sample case shipped in the repository.

The sample (``CTtoMRISynthesis/Resources/SampleData/``: ``ct.nrrd`` + ``mri.nrrd``) is the NLM Visible
Human Male: an 8-mm CT slab at the skull vertex (stored as HU + 1024, so the Hounsfield path of the CT
normalisation runs) and the same subject's T1-like MR, aligned to it once by ``make_sample.py`` (see
``SOURCE.md`` there). The demo registers (rigid), synthesises with the shipped weights, writes the
outputs with :func:`outputs.save_outputs` and prints the metrics. No network, no shared data needed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from .errors import CTMRIError
from .resources import first_present, not_installed, sample_candidates

SAMPLE_FILES = {"ct": "ct.nrrd", "mri": "mri.nrrd"}
SAMPLE_DIR = first_present(sample_candidates(), tuple(SAMPLE_FILES.values()))
#: sha256 of the shipped files: Slicer's Sample Data module checks the copy it loads against them (a test ties them
#: to the files, so that a rebuilt sample cannot ship with stale checksums).
SAMPLE_SHA256 = {"ct": "5daf80588253ea8fea89c92e039c6f23533220155c9dd1ebf73358fb320d153e",
                 "mri": "dd8e765d06dbbfca3d3dda3cb4f48113b389e0de4d0e03bfdd31079106a71697"}
#: The sample's name in Slicer's Sample Data module (``SampleData.SampleDataLogic().downloadSamples(...)``) and
#: its nodes' names there.
SLICER_SAMPLE_NAME = "Visible Human head CT + MR"  # also the button's label (no separate description there)
SLICER_NODE_NAMES = {"ct": "SampleCT", "mri": "SampleMRI"}
#: The sample's MR was aligned to the CT offline; rigid registration is still run (it stays within
#: about 1–2 mm of that alignment on this sample) so that the demo shows the whole pipeline.
DEMO_REGISTRATION = "rigid"


def sample_paths(folder: Optional[Path] = None) -> dict:
    """{'ct': path, 'mri': path} of the shipped sample; CTMRIError if a file is missing."""
    default = folder is None
    folder = Path(folder) if folder is not None else SAMPLE_DIR
    paths = {kind: folder / name for kind, name in SAMPLE_FILES.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing and default and not any(c.is_dir() for c in sample_candidates()):
        raise CTMRIError(not_installed("the demo's sample case (ct.nrrd, mri.nrrd)", sample_candidates()))
    if missing and folder != sample_candidates()[0]:  # an installed copy (a wheel's share/ctmri): no git there
        raise CTMRIError(f"the sample case is incomplete: {', '.join(missing)} not found in {folder}; reinstall the "
                         "package from a checkout of the repository (pip install .)")
    if missing:
        raise CTMRIError(
            f"the sample case is incomplete: {', '.join(missing)} not found in {folder}; restore it from the "
            "repository (git checkout -- CTtoMRISynthesis/Resources/SampleData) or rebuild it with make_sample.py there"
        )
    return paths


def slicer_sample_source(folder: Optional[Path] = None) -> dict:
    """Keyword arguments of Slicer's ``SampleData.SampleDataLogic.registerCustomSampleDataSource`` that list the
    shipped sample (CT and MR) in the Sample Data module. The addresses are this installation's files
    (``file://``): Sample Data copies them into its cache and checks their sha256, so nothing is downloaded and
    a damaged copy is refused. CTMRIError if a file is missing (as :func:`sample_paths`)."""
    paths = sample_paths(folder)
    kinds = list(SAMPLE_FILES)
    return {
        "category": "CT to MRI Synthesis",
        "sampleName": SLICER_SAMPLE_NAME,
        # abspath, not resolve(): on Windows resolve() turns a mapped network drive into \\server\share, whose
        # file://server/... address urllib cannot open
        "uris": [Path(os.path.abspath(paths[kind])).as_uri() for kind in kinds],
        # names in Slicer's shared download cache: prefixed, so that no other sample's ct.nrrd is taken for ours
        "fileNames": [f"CTtoMRISynthesis-sample-{SAMPLE_FILES[kind]}" for kind in kinds],
        "nodeNames": [SLICER_NODE_NAMES[kind] for kind in kinds],
        "loadFileType": ["VolumeFile"] * len(kinds),
        "checksums": [f"SHA256:{SAMPLE_SHA256[kind]}" for kind in kinds],
    }


def _weights_or_error() -> Path:
    """The shipped model's path (or ``$CTMRI_WEIGHTS``); CTMRIError saying where it was looked for."""
    from .weights import default_weights_path, missing_weights_message

    path = default_weights_path()
    if not path.is_file():  # the demo has no --weights: the variable is its only other way to a model
        raise CTMRIError(missing_weights_message(path, instead="set CTMRI_WEIGHTS to a model file (`ctmri train` "
                                                 "makes one; see model_weights/README.md)"))
    return path


def run_demo(out_dir: str | Path = "ctmri_demo_output", device: str = "auto", quiet: bool = False) -> int:
    """Run the sample through :func:`pipeline.synthesize`, write the outputs to ``out_dir``, print a summary.

    Returns 0. Errors a user can cause (missing weights or sample, unwritable folder, unavailable
    device) raise :class:`CTMRIError`, which the CLI prints as one ``error:`` line.
    """
    from .outputs import save_outputs
    from .pipeline import synthesize
    from .progress import progress_for
    from .volumes import read_volume

    paths = sample_paths()
    weights = _weights_or_error()
    out_dir = Path(out_dir)
    ct = read_volume(paths["ct"], "sample CT")
    mri = read_volume(paths["mri"], "sample MRI")
    print(f"sample: Visible Human Male head (NLM), CT slab {'×'.join(map(str, ct.GetSize()))} + T1-like MR, "
          f"from {SAMPLE_DIR}")
    print(f"weights: {weights}")

    progress, close = progress_for(quiet)
    try:
        result = synthesize(ct, mri, weights=weights, device=device, registration=DEMO_REGISTRATION, progress=progress)
    finally:
        close()
    written = save_outputs(result, out_dir)

    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    norm = result.normalisation
    print(f"CT intensities: {norm.get('ct_path')} — {norm.get('description')}")
    if result.registration:
        from .registration import summary_line

        print(summary_line(result.registration))
    m = result.metrics or {}
    if m:
        from .metrics import foreground_words

        print(f"MAE {m['mae']:.2f}  SSIM {m['ssim']:.4f}  PSNR {m['psnr']:.2f} dB  (0..255 scale, foreground = "
              f"{foreground_words(m.get('foreground'))}; in-head SSIM {m.get('ssim_foreground', float('nan')):.4f})")
    print(f"device {result.device}, {result.seconds:.1f} s")
    print("note: the sample is the top 8 mm of the head (scalp and skull cap, almost no brain) and the MR was "
          "resampled from 5-mm slices; the numbers show that the pipeline runs, not how well the model does on brain slices "
          "(see model_weights/README.md for that)")
    print(f"wrote {', '.join(p.name for p in written.values())} to {out_dir.resolve()}")
    return 0
