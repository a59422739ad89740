"""Draw the extension/module icon (128×128 PNG): a schematic axial head, CT on the left half, MRI on the right.

Purely synthetic (ellipses and sines); no patient data is used. Run from the repository root:
``python Resources/Icons/make_icons.py``; it writes ``Resources/Icons/CTtoMRISynthesis.png`` and
``CTtoMRISynthesis/Resources/Icons/CTtoMRISynthesis.png``.
"""

from pathlib import Path

import numpy as np
from PIL import Image

SIZE, SUPER = 128, 4


def draw() -> Image.Image:
    n = SIZE * SUPER
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / SUPER  # pixel coordinates of the final icon
    cx, cy = 64.0, 66.0
    r = np.sqrt(((x - cx) / 46.0) ** 2 + ((y - cy) / 56.0) ** 2)  # 1 on the outer head outline
    angle = np.arctan2(y - cy, x - cx)
    left = x < cx

    scalp = r <= 1.0
    skull = (r > 0.86) & (r <= 0.95)
    brain = r <= 0.86
    # two crescent ventricles near the centre
    vx, vy = np.abs(x - cx), y - cy
    ventricles = (((vx - 7) / 5.0) ** 2 + (vy / 13.0) ** 2 <= 1.0) & ~(((vx - 4) / 4.0) ** 2 + (vy / 10.0) ** 2 <= 1.0)

    gray = np.zeros((n, n))
    alpha = np.zeros((n, n))
    # CT (left): bright bone, flat grey brain, dark ventricles
    ct = np.where(scalp, 95.0, 0.0)
    ct = np.where(brain, 120.0, ct)
    ct = np.where(skull, 250.0, ct)
    ct = np.where(brain & ventricles, 60.0, ct)
    # T2 MRI (right): dark bone, bright scalp fat, folded cortex, bright CSF
    # white matter darker inside, a grey-matter band at the rim, bright CSF in the sulci between gyri
    wobble = 0.08 * np.sin(5 * angle + 1.0)
    cortex = r > 0.62 + wobble
    sulci = cortex & (np.sin(24 * angle + 2.5 * np.sin(3 * angle)) > 0.75) & (r > 0.68 + wobble)
    folds = np.where(cortex, 165.0, 105.0)
    folds = np.where(sulci, 235.0, folds)
    mr = np.where(scalp, 200.0, 0.0)
    mr = np.where(brain, folds, mr)
    mr = np.where(skull, 25.0, mr)
    mr = np.where(brain & ventricles, 245.0, mr)
    gray = np.where(left, ct, mr)
    alpha = np.where(scalp, 255.0, 0.0)

    rgb = np.repeat(gray[..., None], 3, axis=2)
    # a thin accent line where the CT turns into MRI
    seam = (np.abs(x - cx) < 1.0) & (r <= 1.04)
    rgb[seam] = (255, 140, 0)
    alpha[seam] = 255.0
    rgba = np.dstack([rgb, alpha]).reshape(SIZE, SUPER, SIZE, SUPER, 4).mean(axis=(1, 3))
    return Image.fromarray(np.clip(rgba + 0.5, 0, 255).astype(np.uint8), "RGBA")


def main() -> None:
    repo = Path(__file__).resolve().parents[2]
    icon = draw()
    for target in (repo / "Resources" / "Icons" / "CTtoMRISynthesis.png",
                   repo / "CTtoMRISynthesis" / "Resources" / "Icons" / "CTtoMRISynthesis.png"):
        target.parent.mkdir(parents=True, exist_ok=True)
        icon.save(target, optimize=True)
        print(target)


if __name__ == "__main__":
    main()
