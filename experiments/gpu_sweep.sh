#!/usr/bin/env bash
# Issue 11 on a lent GPU machine, in one call: several leave-one-patient-out cross-validations and
# all-patients models trained side by side (one process per fold, SLOTS at a time, in priority order),
# then their reports, the ensembles' scores (experiments/ensemble_cv.py) and compact copies of what came out.
#
#   OUT=/some/dir DATA=.devdata/harvard_aanlib_ct_mri_2d bash experiments/gpu_sweep.sh
#
# Every run is the shipped recipe (model_weights/README.md) with only --base, --epochs, --seed and
# --drop-patients changed, so the runs compare width, length and ensembles. Jobs not started by
# START_BY seconds are skipped and runs still training at KILL_AT are stopped (--resume continues them),
# so the call ends inside the device's 10-minute limit. TINY=1 runs the same plan in seconds on a CPU
# (1 epoch of 1 step, base 4) to check the script before spending GPU time; ONLY='b8e60|bag1' runs only
# those recipes. TRAIN_OPTS adds options to every training (the shipped recipe since round 5:
# TRAIN_OPTS='--exclude-from-training 2'; since round 10 also '--context 0 --aug-noise 0.045'). PREDS='b8e60 b32e60'
# brings those runs' predictions back one file each (else two archives); REPORT_S caps each report's seconds.
# ERRMODEL='m4:b8e60,bag1,bag2,bag3' also runs experiments/error_model_cv.py on those ensembles (ERRMODEL_SEEDS,
# ERRMODEL_SETS comma-separated), and REPORTS='b8e60' limits the per-run reports to the runs that regex matches.
# ENSEMBLES='two:b8e60,b8e60s1 one:b8e60' names the ensembles scored by experiments/ensemble_cv.py (else a fixed list).
# SimpleITK is carried in .whl/ (experiments/device_site.sh). Stop 41's call, its time and
# what it gave: model_weights/report/evaluation/round17_width_gpu.txt.
set -u
T0=$(date +%s)
OUT=${OUT:?set OUT to the folder that collects the results}
DATA=${DATA:-.devdata/harvard_aanlib_ct_mri_2d}
WORK=${WORK:-/tmp/sweep}
PY=${PY:-python3}
SLOTS=${SLOTS:-16}
START_BY=${START_BY:-280}
KILL_AT=${KILL_AT:-380}
TINY=${TINY:-0}
DEVICE=${DEVICE:-cuda}
FOLDS=${FOLDS:-8}  # leave-one-patient-out folds per run: the Harvard data has 8 patients
mkdir -p "$WORK/logs" "$OUT"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
. experiments/device_site.sh  # SimpleITK and pydicom carried in .whl/, and the library, on PYTHONPATH
use_device_site "$PY" || exit 3
{ nproc --all; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null; } | tee "$WORK/logs/machine.txt"
$PY -c "import torch, SimpleITK, skimage, safetensors, scipy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'SimpleITK', SimpleITK.Version_VersionString())" \
  | tee -a "$WORK/logs/machine.txt" || exit 4

COMMON="--context 1 --lr 2e-3 --lr-min 1e-5 --lr-schedule cosine --loss mse+gaussian --aug-intensity 0.1 0.04
 --aug-gamma 0.2 --aug-blur 1.0 --aug-noise 0.03 --ct-window 45 120 --workers 0 --no-progress --threads 1
 --checkpoint-every 10 --resume --device $DEVICE ${TRAIN_OPTS:-}"
if [ "$TINY" = 1 ]; then EXTRA="--max-steps 1"; else EXTRA=""; fi
e() { if [ "$TINY" = 1 ]; then echo 1; else echo "$1"; fi; }
b() { if [ "$TINY" = 1 ]; then echo 4; else echo "$1"; fi; }

# name | epochs | base | seed | drop : one line per recipe, in priority order
# (RECIPES in the environment replaces this list; FINALS=0 trains no all-patients models, BENCH=0 skips the timings)
RECIPES=${RECIPES:-"b16e60 $(e 60) $(b 16) 0 0
b8e60 $(e 60) $(b 8) 0 0
bag1 $(e 40) $(b 8) 1 1
bag2 $(e 40) $(b 8) 2 1
bag3 $(e 40) $(b 8) 3 1
bag4 $(e 40) $(b 8) 4 1
b32e60 $(e 60) $(b 32) 0 0"}

jobs_file="$WORK/jobs.txt"
: > "$jobs_file"
while read -r name epochs base seed drop; do  # the all-patients model first, then the folds
  [ "$name" = b32e60 ] || [ "${FINALS:-1}" = 0 ] || echo "final $name $epochs $base $seed $drop" >> "$jobs_file"
  for k in $(seq 1 "$FOLDS"); do echo "$k $name $epochs $base $seed $drop" >> "$jobs_file"; done
done <<< "$(grep -E "^(${ONLY:-[a-z0-9]+}) " <<< "$RECIPES")"

run_job() {  # FOLD|final NAME EPOCHS BASE SEED DROP
  local k=$1 name=$2 epochs=$3 base=$4 seed=$5 drop=$6
  if [ $(( $(date +%s) - T0 )) -gt "$START_BY" ]; then echo "skipped $name $k (time)"; return 0; fi
  local args="--epochs $epochs --base $base --seed $seed --drop-patients $drop $COMMON $EXTRA"
  local t=$(date +%s)
  if [ "$k" = final ]; then
    $PY -m CTtoMRISynthesisLib.training train --data "$DATA" --out "$WORK/final_$name" $args > "$WORK/logs/final_$name.log" 2>&1
  else
    $PY -m CTtoMRISynthesisLib.training train --data "$DATA" --out "$WORK/$name" --cv loo --only-folds "$k" $args \
      > "$WORK/logs/${name}_fold$k.log" 2>&1
  fi
  echo "done $name $k rc $? in $(( $(date +%s) - t )) s at $(( $(date +%s) - T0 )) s"
}
export -f run_job
export T0 START_BY WORK DATA PY COMMON EXTRA

if command -v nvidia-smi > /dev/null; then  # the GPU's load and memory through the training, every 10 s
  nvidia-smi dmon -s um -d 10 > "$WORK/logs/dmon.txt" 2>&1 & dmon=$!
fi
( xargs -P "$SLOTS" -L 1 bash -c 'run_job "$@"' _ < "$jobs_file" ) 2>&1 | tee "$WORK/logs/jobs.log" &
pool=$!
while kill -0 "$pool" 2>/dev/null; do
  if [ $(( $(date +%s) - T0 )) -gt "$KILL_AT" ]; then
    echo "KILL_AT reached: stopping the runs still training"; pkill -f "CTtoMRISynthesisLib.training train"; break
  fi
  sleep 5
done
wait "$pool"  # the pool only: a bare wait would also wait for nvidia-smi dmon, which never ends
echo "training phase over at $(( $(date +%s) - T0 )) s"
[ -n "${dmon:-}" ] && kill "$dmon" 2>/dev/null
# the training records first, so that a call stopped later still brings back what was trained
( cd "$WORK" && tar czf "$OUT/early.tgz" logs jobs.txt $(ls -d */fold[0-9]*/log.csv */fold[0-9]*/fold.json 2>/dev/null) )
if [ "$TINY" != 1 ] && [ "${BENCH:-1}" = 1 ]; then  # the CUDA inference path, timed, beside the reports
  ( timeout "${BENCH_S:-90}" $PY benchmarks/bench_inference.py --quick --device cuda > "$WORK/logs/bench_inference.txt" 2>&1
    timeout 60 $PY -m CTtoMRISynthesisLib.cli demo --out-dir "$WORK/demo" --device cuda > "$WORK/logs/demo_cuda.txt" 2>&1 ) &
  bench=$!
fi

complete_run() { [ "$(ls "$WORK/$1"/fold[0-9]*/fold.json 2>/dev/null | wc -l)" = "$FOLDS" ]; }
# the error model's nested cross-validation (experiments/error_model_cv.py, issue 11's aim 4) of each ensemble
# in ERRMODEL ('NAME:RUN,RUN,... ...'), once per seed in ERRMODEL_SEEDS, beside the reports below
epids=(); IFS=, read -ra esets <<< "${ERRMODEL_SETS:-shipped}"  # comma-separated: set names hold spaces
for spec in ${ERRMODEL:-}; do
  name=${spec%%:*}; runs=${spec#*:}; ok=1
  for r in ${runs//,/ }; do complete_run "$r" || ok=0; done
  [ "$ok" = 1 ] || { echo "error model $name: not every run is complete"; continue; }
  for seed in ${ERRMODEL_SEEDS:-0}; do
    OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 timeout "${ERRMODEL_S:-240}" $PY experiments/error_model_cv.py \
      $(printf "$WORK/%s " ${runs//,/ }) --data "$DATA" --exclude-from-training ${ERRMODEL_EXCLUDE:-2} \
      --sets "${esets[@]}" --no-ceiling --seed "$seed" $( [ "$TINY" = 1 ] && echo --steps 2 ) \
      > "$WORK/logs/errmodel_${name}_s$seed.txt" 2>&1 &
    epids+=($!)
  done
done

# reports of every complete cross-validation (those matching REPORTS, a regex), side by side
complete=(); pids=()
for run in "$WORK"/*/; do
  run=${run%/}; complete_run "$(basename "$run")" || continue
  complete+=("$run")
  [[ "$(basename "$run")" =~ ^(${REPORTS:-.*})$ ]] || continue
  timeout "${REPORT_S:-150}" $PY -m CTtoMRISynthesisLib.training report --data "$DATA" --from-cv "$run" --out "$run/report" > "$WORK/logs/report_$(basename "$run").log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
echo "complete: ${complete[*]:-none}"
ensemble() {  # NAME RUN...
  local name=$1; shift
  for r in "$@"; do complete_run "$r" || return 0; done
  timeout "${REPORT_S:-150}" $PY experiments/ensemble_cv.py $(printf "$WORK/%s " "$@") --data "$DATA" --json "$WORK/logs/ens_$name.json" \
    > "$WORK/logs/ens_$name.txt" 2>&1 && cat "$WORK/logs/ens_$name.txt"
}
# NAME:RUN,RUN,... each; ENSEMBLES in the environment replaces the list, ENSEMBLES= (empty) scores none (an ensemble
# whose runs are not all complete is skipped, so the list may name runs a call did not train)
ENSEMBLES=${ENSEMBLES-"bag4:bag1,bag2,bag3,bag4 bag4_b8:bag1,bag2,bag3,bag4,b8e60 widths:b8e60,b16e60,b32e60
 b16:b16e60 b8:b8e60 b8seeds:b8e60,b8e60s1 wide:b32e60,b64e60 members4:b8e60,bag1,bag2,bag3
 members8:b8e60,bag1,bag2,bag3,bag4,bag5,bag6,bag7 b8_b32_b64:b8e60,b32e60,b64e60"}
pids=()
for spec in $ENSEMBLES; do
  runs=${spec#*:}
  ensemble "${spec%%:*}" ${runs//,/ } & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for p in "${epids[@]}"; do wait "$p"; done
for f in "$WORK"/logs/errmodel_*.txt; do [ -f "$f" ] && { echo "### $(basename "$f")"; sed -n '/ runs: /,$p' "$f"; }; done

[ -n "${bench:-}" ] && wait "$bench"

# what comes back: numbers, compact predictions (uint8), the all-patients models
$PY - "$WORK" <<'EOF'
import sys, numpy as np
from pathlib import Path
work = Path(sys.argv[1]); (work / "preds").mkdir(exist_ok=True)
for run in sorted(p for p in work.iterdir() if p.is_dir() and list(p.glob("fold[0-9]*/pred_*.npz"))):
    arrays = {}
    for f in sorted(run.glob("fold[0-9]*/pred_*.npz")):
        with np.load(f) as b:
            cid = f.stem[len("pred_"):]
            arrays[f"syn_{cid}"] = np.clip(np.rint(b["syn"]), 0, 255).astype(np.uint8)
            if not run.name.startswith("bag"):  # 16 MiB a file comes back: the bags' σ is scored on the machine
                arrays[f"spread2_{cid}"] = np.clip(np.rint(b["spread"] * 2), 0, 255).astype(np.uint8)
    np.savez_compressed(work / "preds" / f"{run.name}.npz", **arrays)
EOF
( cd "$WORK" && for m in final_*/model.safetensors.sha256; do [ -f "$m" ] && echo "${m%%/*} $(cat "$m")"; done > logs/final_sha256.txt )
cd "$WORK" && tar czf "$OUT/results.tgz" logs jobs.txt $(ls -d */report/*.md */report/*.csv */fold[0-9]*/log.csv */fold[0-9]*/fold.json final_*/log.csv 2>/dev/null)
# one file per run (a file brings back at most 16 MiB; a run's predictions are about 5 MiB compressed)
if [ -n "${PREDS:-}" ]; then for r in $PREDS; do [ -f "preds/$r.npz" ] && cp "preds/$r.npz" "$OUT/preds_$r.npz"; done
else tar czf "$OUT/preds_a.tgz" $(ls preds/*.npz | grep -v /bag)
  tar czf "$OUT/preds_b.tgz" $(ls preds/bag*.npz 2>/dev/null) 2>/dev/null; fi
for m in final_*/model.safetensors; do [ -f "$m" ] && cp "$m" "$OUT/${m%%/*}.safetensors"; done
cd "$OUT" && ls final_b8e60.safetensors final_bag*.safetensors >/dev/null 2>&1 && tar cf models_b8.tar final_b8e60.safetensors final_bag*.safetensors && rm -f final_b8e60.safetensors final_bag*.safetensors
ls -la "$OUT"
echo "all over at $(( $(date +%s) - T0 )) s"
