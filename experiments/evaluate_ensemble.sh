#!/usr/bin/env bash
# A candidate ensemble through every measure of the model card (round 5's steps, as rounds 6 and 9 ran them),
# each measure's output in its own text file, so that a new recipe is judged against the shipped model the
# same way every time.
#
#   OUT=DIR CV="RUN/cv_m1 RUN/cv_bag1 RUN/cv_bag2 RUN/cv_bag3" \
#   FINALS="RUN/m1/model.safetensors RUN/bag1/model.safetensors ..." bash experiments/evaluate_ensemble.sh
#
# CV: the members' finished `ctmri train --cv loo` runs; FINALS: the same members' all-patients model files,
# in the same order (member 1 first). Writes OUT/ctmri_unet.safetensors (the ensemble + its error model + the
# cross-validated record: what would be shipped), OUT/report/ and OUT/*.txt. SHIPPED=1 also reruns
# external_ct.py on the shipped model (OUT/external_shipped.txt), BENCH=1 times the candidate end to end
# (aim 5; run it on a quiet machine). With SHIPPED=1 the shipping rule (experiments/shipping_rule.py) is applied
# last (OUT/rule.txt). DRY=1 prints the commands only. Never writes outside OUT.
set -eu
OUT=${OUT:?set OUT to a new folder for the results}
CV=${CV:?set CV to the members\' cross-validation runs}
FINALS=${FINALS:?set FINALS to the members\' all-patients model files}
DATA=${DATA:-../shared/data/harvard_aanlib_ct_mri_2d}
EXCLUDE=${EXCLUDE:-2}   # patients the members never trained on (patient 2: FLAIR/PD-like MRI)
PY=${PY:-python}
DRY=${DRY:-0}
read -r -a cv <<< "$CV"
read -r -a finals <<< "$FINALS"
if [ "${#cv[@]}" != "${#finals[@]}" ]; then
  echo "error: CV has ${#cv[@]} runs and FINALS ${#finals[@]} files; give one of each per member" >&2; exit 2
fi
names=()
for i in "${!cv[@]}"; do names+=("member$((i + 1))=${cv[$i]}"); done

run() {  # run one step, its output into OUT/$1 (or print it with DRY=1)
  local log=$1; shift
  echo "+ $* > $OUT/$log"
  [ "$DRY" = 1 ] && return 0
  "$@" > "$OUT/$log" 2>&1 || { echo "error: that step failed; see $OUT/$log" >&2; exit 1; }
}

[ "$DRY" = 1 ] || mkdir -p "$OUT"
run ensemble.txt $PY -m CTtoMRISynthesisLib.weights ensemble "$OUT/ensemble.safetensors" "${finals[@]}"
run error_model.txt $PY -m CTtoMRISynthesisLib.error_model --data "$DATA" --from-cv "${cv[@]}" \
  --weights "$OUT/ensemble.safetensors" --exclude-from-training $EXCLUDE --out "$OUT/ctmri_unet.safetensors"
run report.txt ctmri report --data "$DATA" --from-cv "${cv[@]}" --out "$OUT/report" --attach "$OUT/ctmri_unet.safetensors"
run members.txt $PY experiments/compare_cv.py "${names[@]}"
run external.txt $PY experiments/external_ct.py --weights "$OUT/ctmri_unet.safetensors"
if [ "${SHIPPED:-0}" = 1 ]; then run external_shipped.txt $PY experiments/external_ct.py; fi
run error_model_cv.txt $PY experiments/error_model_cv.py "${cv[@]}" --exclude-from-training $EXCLUDE
run csf_contrast_cv.txt $PY experiments/csf_contrast_cv.py "${cv[@]}"
run contrast_tradeoff.txt $PY experiments/contrast_tradeoff.py "${cv[@]}" --not-t2 $EXCLUDE
if [ "${BENCH:-0}" = 1 ]; then
  run bench_pipeline.txt $PY benchmarks/bench_pipeline.py --weights "$OUT/ctmri_unet.safetensors"
fi
if [ "${SHIPPED:-0}" = 1 ]; then  # the rule (a)-(f) against the shipped model; exit 1 (a condition fails) is a verdict, not an error
  echo "+ $PY experiments/shipping_rule.py $OUT > $OUT/rule.txt"
  if [ "$DRY" != 1 ]; then $PY experiments/shipping_rule.py "$OUT" > "$OUT/rule.txt" 2>&1 || true; cat "$OUT/rule.txt"; fi
fi
echo "done: $OUT (compare with the shipped model's rows in model_weights/README.md)"
