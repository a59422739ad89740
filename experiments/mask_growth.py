"""Experiment: does a CT head mask widened into the scalp help? (It does not, much: see the closing note.)

Uses the fold models of a leave-one-patient-out run (`ctmri train ... --cv loo --out RUN`): for each
held-out patient, predicts without the output mask, then applies the head mask grown by 0/4/8/12 pixels,
or none, and prints MAE/SSIM (core-library metrics).

    python experiments/mask_growth.py RUN [DATA]
"""
import json, sys
from pathlib import Path
import numpy as np
from scipy import ndimage
import SimpleITK as sitk
def read_harvard_case(h, case, mod):
    fs = sorted(f for f in (h / mod).glob('*.png') if f.stem[:-3] == case)
    return np.stack([sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in fs])
from CTtoMRISynthesisLib.weights import load_model
from CTtoMRISynthesisLib.training.report import fold_model
from CTtoMRISynthesisLib.synthesis import predict_slices
from CTtoMRISynthesisLib.intensity import head_mask
from CTtoMRISynthesisLib.metrics import compute_metrics
RUN = Path(sys.argv[1])
H = Path(sys.argv[2] if len(sys.argv) > 2 else Path(__file__).resolve().parents[1].parent / 'shared' / 'data') / 'harvard_aanlib_ct_mri_2d'
rows = []
for fold in sorted(RUN.glob('fold*')):
    info = json.loads((fold / 'fold.json').read_text())
    case = info['split']['test_cases'][0]
    m = load_model(fold_model(fold))
    ct = read_harvard_case(H, case, 'CT').astype(np.float32)
    mr = read_harvard_case(H, case, 'MRI').astype(np.float32)
    raw = predict_slices(m.net, ct, context=m.config['preprocessing']['context_slices'], mask_output=False)
    base = head_mask(ct)
    res = {'case': case, 'missed_fg': float(((mr > 0) & ~base).sum() / (mr > 0).sum())}
    st = np.zeros((3, 3, 3), bool); st[1] = ndimage.generate_binary_structure(2, 1)
    for grow in (0, 4, 8, 12):
        mask = ndimage.binary_dilation(base, st, iterations=grow) if grow else base
        syn = np.where(mask, raw, 0)
        mt = compute_metrics(mr, syn)
        res[f'mae_g{grow}'] = round(mt['mae'], 2); res[f'ssim_g{grow}'] = round(mt['ssim'], 4)
    mt = compute_metrics(mr, raw); res['mae_nomask'] = round(mt['mae'], 2); res['ssim_nomask'] = round(mt['ssim'], 4)
    rows.append(res); print(res, flush=True)
for k in [k for k in rows[0] if k != 'case']:
    print(k, round(float(np.mean([r[k] for r in rows])), 4))
