"""How far apart are different patients' CTs, as ``ctmri train --unpaired-ct`` compares them with the paired ones?

``training/unpaired.check_not_paired`` refuses an unpaired CT with a slice closer than ``SAME_SLICE_MAE`` (block-mean
MAE, grey levels, model grid) to a slice of a paired patient: a held-out patient's CT must not be trained on as
unpaired data. This prints, for each of the 14 real CTs here (the 8 Harvard patients, each read from a folder of
its own slices as an unpaired CT would be, and the other hospital's 6), the distance to every Harvard patient and
to the other clinical CTs: the diagonal (a patient against itself) and the smallest distance between two
different patients bound the threshold. Numbers only; no image is written.

    python experiments/unpaired_overlap.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "CTtoMRISynthesis"))

from CTtoMRISynthesisLib.intensity import CTWindow  # noqa: E402
from CTtoMRISynthesisLib.training import discovery  # noqa: E402
from CTtoMRISynthesisLib.training.unpaired import (  # noqa: E402
    SAME_SLICE_MAE,
    closest_paired_slice,
    on_model_grid,
    read_unpaired_ct,
)

WINDOW = CTWindow(45.0, 120.0)  # the shipped model's training window


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args(argv)
    harvard = Path(args.data) / "harvard_aanlib_ct_mri_2d"
    cases = discovery.discover([harvard], WINDOW)
    volumes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:  # one folder per patient, as a user would give it to --unpaired-ct
            folder = Path(tmp) / f"harvard_{case.case_id}"
            folder.mkdir()
            for name in case.slice_names:
                shutil.copy(harvard / "CT" / name, folder / name)
            volumes[f"harvard {case.case_id}"] = on_model_grid(read_unpaired_ct(folder), WINDOW, 256)
    for folder in sorted((Path(args.data) / "clinical_ct_t1_flair_2d" / "CT").iterdir()):
        volumes[f"clinical {folder.name}"] = on_model_grid(read_unpaired_ct(folder), WINDOW, 256)
    columns = [f"H{c.case_id}" for c in cases] + ["C" + name[-2:] for name in volumes if name.startswith("clinical")]
    references = cases + [discovery.Case(name, v, v, "unpaired") for name, v in volumes.items() if name.startswith("clinical")]
    print(f"block-mean MAE (grey levels, 8 × 8 px blocks, closest pair of slices); threshold SAME_SLICE_MAE = {SAME_SLICE_MAE:g}")
    print(f"{'unpaired CT':<22}" + "".join(f"{c:>7}" for c in columns))
    same, different = [], []
    for name, volume in volumes.items():
        row = []
        for reference in references:
            distance = closest_paired_slice(volume, [reference])[0]
            own = reference.case_id == name or f"harvard {reference.case_id}" == name
            (same if own else different).append(distance)
            row.append(distance)
        print(f"{name:<22}" + "".join(f"{d:>7.1f}" for d in row))
    print(f"a patient against itself: max {max(same):.1f}; two different patients: min {min(different):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
