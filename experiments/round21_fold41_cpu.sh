#!/usr/bin/env bash
# Round 21b (model_weights/report/evaluation/round21b_rule_written_first.md), on the 2 CPU cores: the four shipped
# members' leave-patient-41-out fold (fold 8 of 8), each trained by the round-10 recipe exactly as
# experiments/gpu_sweep.sh trains it (same options but --threads 2, --device cpu and a checkpoint every 5 epochs: none changes what is learnt). About 45 min.
#
#   OUT=/some/dir bash experiments/round21_fold41_cpu.sh      (from the repository root, with .venv made)
set -u
OUT=${OUT:?set OUT to the folder for the four runs}
DATA=${DATA:-../shared/data/harvard_aanlib_ct_mri_2d}
COMMON="--context 1 --lr 2e-3 --lr-min 1e-5 --lr-schedule cosine --loss mse+gaussian --aug-intensity 0.1 0.04
 --aug-gamma 0.2 --aug-blur 1.0 --aug-noise 0.03 --ct-window 45 120 --workers 0 --no-progress --threads 2
 --checkpoint-every 5 --resume --device cpu --exclude-from-training 2 --context 0 --aug-noise 0.045"
while read -r name epochs base seed drop; do
  t=$(date +%s)
  .venv/bin/python -m CTtoMRISynthesisLib.training train --data $DATA --out $OUT/$name --cv loo --only-folds 8 \
    --epochs $epochs --base $base --seed $seed --drop-patients $drop $COMMON > $OUT/${name}_fold8.log 2>&1
  echo "done $name rc $? in $(( $(date +%s) - t )) s"
done <<'R'
b8e60 60 8 0 0
bag1 40 8 1 1
bag2 40 8 2 1
bag3 40 8 3 1
R
