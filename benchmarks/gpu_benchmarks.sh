#!/usr/bin/env bash
# The product's speed on a lent GPU machine, in one call: the end-to-end pipeline (bench_pipeline.py) and
# cohorts (`ctmri batch`, bench_batch.py) on CUDA, and batch on the machine's CPUs for comparison.
#
#   OUT=/some/dir CTMRI_DATA=.devdata bash benchmarks/gpu_benchmarks.sh
#
# Each step has its own time limit (STEP_S seconds; PIPELINE_S for the pipeline) and writes its table to
# OUT as soon as it ends, so a step that overruns costs only its own limit and the others still report.
# STEPS lists what runs, in order: pipeline, and batch_DEVICE_JOBS (batch_cuda_2, batch_cpu_4,8: `ctmri batch` over the
# 8 Harvard patients with those --jobs). DEVICE=cpu runs the cuda steps on the CPU, to check the script here first.
# SimpleITK and pydicom, which the GPU machine's image lacks, travel in .whl/ (experiments/device_site.sh).
set -u
OUT=${OUT:?set OUT to the folder that collects the results}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
STEP_S=${STEP_S:-150}
PIPELINE_S=${PIPELINE_S:-120}
STEPS=${STEPS:-"pipeline batch_cuda_2 batch_cuda_1 batch_cpu_4,8"}
for s in $STEPS; do  # every step checked before any runs: a typo in the second must not cost the first's minutes
  [[ $s == pipeline || $s =~ ^batch_(cuda|cpu|mps)_[0-9]+(,[0-9]+)*$ ]] || {
    echo "unknown step $s (pipeline, or batch_DEVICE_JOBS such as batch_cuda_2 or batch_cpu_4,8)" >&2; exit 2; }
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "$DEVICE" = cpu ]; then  # a check on this machine, which has its own packages
  export PYTHONPATH="$PWD/CTtoMRISynthesis${PYTHONPATH:+:$PYTHONPATH}"
else
  . experiments/device_site.sh && use_device_site "$PY" || exit 3  # SimpleITK and pydicom carried in .whl/
fi
{ date -u; nproc --all; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  $PY -c "import torch, SimpleITK; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'SimpleITK', SimpleITK.Version_VersionString())"
} 2>&1 | tee "$OUT/machine.txt"
grep -q "^torch .* SimpleITK " "$OUT/machine.txt" || { echo "torch or SimpleITK does not import (see $OUT/machine.txt)" >&2; exit 4; }

step() {  # NAME LIMIT COMMAND...: run it under its limit, its output into OUT/NAME.txt, its time after
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $* (limit ${limit} s)" | tee "$OUT/$name.txt"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$name.txt"
}

for s in $STEPS; do
  case $s in
    pipeline) step pipeline "$PIPELINE_S" $PY benchmarks/bench_pipeline.py --cases small volume256 large --device "$DEVICE" ;;
    batch_*)  # batch_DEVICE_JOBS[,JOBS...]: the 8 Harvard patients through `ctmri batch`; cuda means $DEVICE
      dev=${s#batch_}; dev=${dev%_*}; [ "$dev" = cuda ] && dev=$DEVICE
      jobs=${s##*_}
      step "${s//,/-}" "$STEP_S" $PY benchmarks/bench_batch.py --cohort harvard --cases 8 --jobs ${jobs//,/ } --device "$dev" ;;
  esac
done
