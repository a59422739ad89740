#!/usr/bin/env bash
# The figures the README quotes from its own example commands, run as written there (CPU, the shipped model):
# the quick start's `ctmri demo` line, and the example of an MRI that is another patient's (README, "Install and
# run"). Output: model_weights/report/evaluation/readme_examples.txt.
#
#   bash experiments/readme_examples.sh > model_weights/report/evaluation/readme_examples.txt
set -euo pipefail
CTMRI=${CTMRI:-.venv/bin/ctmri}
DATA=${DATA:-../shared/data}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
echo "# $(date -u +%Y-%m-%dT%H:%MZ), $($CTMRI --version), $(nproc) CPUs"
echo "## ctmri demo --device cpu"
$CTMRI demo --out-dir "$OUT/demo" --device cpu --quiet 2>&1 | grep -E "^MAE|^device" | sed -E 's/, [0-9.]+ s$//'
echo "## ctmri synthesize --ct $DATA/real_hu_head_ct_dicom --ct-series 2 --mri $DATA/rire_training_001_mr_t1_only/training_001_mr_T1.mha"
$CTMRI synthesize --ct "$DATA/real_hu_head_ct_dicom" --ct-series 2 \
  --mri "$DATA/rire_training_001_mr_t1_only/training_001_mr_T1.mha" --out-dir "$OUT/two" --device cpu --quiet 2>&1 \
  | grep -E "^MAE|^warning" | cut -c1-200
