#!/bin/bash
# One device call for an A/B of two codes in the same run (so clock, card and driver are shared): "new" is the
# working tree, "base" a folder made from the base commit and left untracked in the repo root, so the device copy
# carries it:
#   git archive <base-commit> bitengine csrc setup.py bench | tar -x -C base_ab
# Both extensions are built in parallel; then, for each side, the kernel bench (KERNEL_ARGS; skipped when unset) and
# the end-to-end A/B (AB_ARGS, bench_e2e.py arguments), run twice in the order base, new, base, new so a drift of the
# card shows as a difference between the two rounds; then gpu_run.sh's STEPS for the new code (e.g. "e2e tests" with
# E2E_ARGS / TEST_ARGS / TEST_TIMEOUT; it sees the same DEADLINE_S, counted from its own start).
# The A/B's files go into one archive, $OUT/ab_results.tar.gz (made before gpu_run.sh's steps), beside gpu_run.sh's
# own files in $OUT (the device tool returns at most 8 files). From the repo root on the device machine:
#   BASE=base_ab BASE_COMMIT=<sha> BITENGINE_COMMIT=<sha> AB_ARGS='--plan ... --batches 1,8 --prefills=' bash bench/gpu_ab.sh
set -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=16
OUT=${OUT:-/tmp/bitengine_out}
BASE=${BASE:-base_ab}
W="$OUT/ab"
mkdir -p "$W"
T0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - T0 )) s"; }
[ -d "$BASE/bitengine" ] || { echo "gpu_ab.sh: base folder '$BASE' has no bitengine/ (see the header)"; exit 2; }
stamp build
(cd "$BASE" && python setup.py build_ext --inplace > "$W/build_base.log" 2>&1) &
python setup.py build_ext --inplace > "$W/build_new.log" 2>&1
wait
dir_of() { if [ "$1" = base ]; then echo "$BASE"; else echo .; fi; }
commit_of() { if [ "$1" = base ]; then echo "${BASE_COMMIT:-base}"; else echo "${BITENGINE_COMMIT:-new}"; fi; }
for side in base new; do
  (cd "$(dir_of $side)" && python -c "import bitengine._C_cuda as c; print('$side: cuda extension ok', c.__file__)") 2>&1 | tail -1
done
if [ -n "${KERNEL_ARGS+x}" ]; then
  for side in base new; do
    stamp "kernels $side"
    (cd "$(dir_of $side)" && BITENGINE_COMMIT=$(commit_of $side) timeout "${BENCH_TIMEOUT:-150}" \
      python bench/bench_kernels.py --out "$W/kernels_$side" $KERNEL_ARGS 2>&1 | tail -40)
  done
fi
if [ -n "${AB_ARGS:-}" ]; then
  for round in 1 2; do
    for side in base new; do
      stamp "e2e $side round $round"
      (cd "$(dir_of $side)" && BITENGINE_COMMIT=$(commit_of $side) timeout "${AB_TIMEOUT:-150}" \
        python bench/bench_e2e.py --out "$W/e2e_${side}_$round" $AB_ARGS 2>&1 | grep -E "^\| [a-z]" | grep -v "^| model")
    done
  done
fi
# archived before the further steps, so a call cut by its time limit still brings the A/B back as one file
tar -czf "$OUT/ab_results.tar.gz" -C "$OUT" ab && rm -rf "$W"
stamp "steps of gpu_run.sh"
[ -n "${STEPS:-}" ] && bash bench/gpu_run.sh
stamp done
