#!/bin/bash
# One device call: build the CUDA extension, kernel bench, end-to-end bench, GPU tests (in that order, so
# a slow step cuts the tests, not the measurements). From the repo root on the device machine:
#   BITENGINE_COMMIT=$(git rev-parse HEAD) bash bench/gpu_run.sh
# Everything worth keeping lands in $OUT (at most 8 files come back). DEADLINE_S bounds the whole call.
set -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=16
OUT=${OUT:-/tmp/bitengine_out}
DEADLINE_S=${DEADLINE_S:-570}
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - T0 )) s"; }
left() { echo $(( DEADLINE_S - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/env.txt" 2>&1
python -c "import torch, triton, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__)" >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
stamp build
echo "nvcc: $(which nvcc) CUDA_HOME=${CUDA_HOME:-unset}" > "$OUT/build.log"
python setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
grep -iE "error|could not build|nvcc:" "$OUT/build.log" | head -30
python -c "import bitengine._C_cuda as c; print('cuda extension ok', c.__file__)" 2>&1 | tail -1
stamp bench_kernels
[ "${SKIP_KERNELS:-0}" = 1 ] || timeout "${BENCH_TIMEOUT:-150}" python bench/bench_kernels.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -75
stamp bench_e2e
[ "${SKIP_E2E:-0}" = 1 ] || timeout "${E2E_TIMEOUT:-170}" python bench/bench_e2e.py --out "$OUT" ${E2E_ARGS:-} 2>&1 | tee "$OUT/e2e.log" | grep -v '^{' | tail -40
stamp tests
T=$(left); [ "$T" -gt "${TEST_TIMEOUT:-170}" ] && T=${TEST_TIMEOUT:-170}
if [ "$T" -gt 20 ]; then
  timeout "$T" python -m pytest -v -rf -p no:cacheprovider -m gpu ${TEST_FILES:-tests/test_gpu_kernels.py tests/test_gpu_model.py} ${TEST_ARGS:-} > "$OUT/tests.log" 2>&1
  grep -E "PASSED|FAILED|ERROR|SKIPPED" "$OUT/tests.log" | awk '{print $NF}' | sort | uniq -c
  grep -E "FAILED|^E  " "$OUT/tests.log" | head -30
  tail -3 "$OUT/tests.log"
fi
stamp done
