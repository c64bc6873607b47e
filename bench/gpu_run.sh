#!/bin/bash
# One device call: build the package (CUDA extension included), run the GPU tests, run the kernel bench.
# Usage on the device machine, from the repo root: bash bench/gpu_run.sh [bench_kernels.py args]
# Everything worth keeping lands in $OUT (at most 8 files come back).
set -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=16
OUT=${OUT:-/tmp/bitengine_out}
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - T0 )) s"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/env.txt" 2>&1
python -c "import torch, triton, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__)" >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
stamp build
echo "nvcc: $(which nvcc) CUDA_HOME=${CUDA_HOME:-unset}" > "$OUT/build.log"
python setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
grep -iE "error|could not build|nvcc:" "$OUT/build.log" | head -30
python -c "import bitengine._C_cuda as c; print('cuda extension ok', c.__file__)" 2>&1 | tail -1
stamp tests
timeout "${TEST_TIMEOUT:-240}" python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_kernels.py ${TEST_ARGS:-} 2>&1 \
  | tee "$OUT/tests.log" | grep -E "passed|failed|FAILED|Error" | tail -25
stamp bench
timeout "${BENCH_TIMEOUT:-300}" python bench/bench_kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -60
stamp done
