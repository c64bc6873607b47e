#!/bin/bash
# One device call: build the CUDA extension, then the steps named in STEPS (default: kernels e2e tests; also
# "adapters", "profile", "attention", "head", "ncu", "sweep", "server"), in that order, so a slow step cuts the later ones. From the repo root on the device machine:
#   BITENGINE_COMMIT=<commit> bash bench/gpu_run.sh
# with the commit taken from your local checkout: the device machine's copy of .git can be stale (one run printed an
# older commit than the code it ran).
# Everything worth keeping lands in $OUT (at most 8 files come back). DEADLINE_S bounds the whole call;
# the e2e step gets what is left of it (minus E2E_RESERVE_S) unless E2E_TIMEOUT is smaller.
set -o pipefail
export PYTHONUNBUFFERED=1 MAX_JOBS=16
OUT=${OUT:-/tmp/bitengine_out}
DEADLINE_S=${DEADLINE_S:-570}
STEPS=${STEPS-kernels e2e tests}  # unset: the default steps; set but empty (STEPS=""): build only
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - T0 )) s"; }
left() { echo $(( DEADLINE_S - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python -c "import torch, triton, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__)"
} > "$OUT/build.log" 2>&1
stamp build
echo "nvcc: $(which nvcc) CUDA_HOME=${CUDA_HOME:-unset}" >> "$OUT/build.log"
python setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
head -3 "$OUT/build.log"
grep -iE "error|could not build|nvcc:" "$OUT/build.log" | head -30
python -c "import bitengine._C_cuda as c; print('cuda extension ok', c.__file__)" 2>&1 | tail -1
for step in $STEPS; do
  stamp "$step"
  case $step in
    kernels)
      timeout "${BENCH_TIMEOUT:-150}" python bench/bench_kernels.py --out "$OUT" ${KERNEL_ARGS:-} 2>&1 | tail -75 ;;
    e2e)
      T=$(( $(left) - ${E2E_RESERVE_S:-0} )); [ "$T" -gt "${E2E_TIMEOUT:-170}" ] && T=${E2E_TIMEOUT:-170}
      timeout "$T" python bench/bench_e2e.py --out "$OUT" ${E2E_ARGS:-} 2>&1 | grep -v '^{' | tail -60 ;;
    server)  # the OpenAI server under load (bench/bench_server.py): decode graphs, then the same engine eagerly
      # the bare device image lacks the server's stack (fastapi, uvicorn; httpx for the clients): install it from
      # wheels carried in .whl/ (pip download for the device's Python, README "GPU runs"), never from the network
      python -c "import fastapi, uvicorn, httpx" 2>/dev/null || \
        python -m pip install -q --no-index --find-links .whl --root-user-action=ignore fastapi uvicorn httpx 2>&1 | tail -3
      for mode in ${SERVER_MODES:-graph eager}; do
        timeout "${SERVER_TIMEOUT:-150}" python bench/bench_server.py --device cuda --clients 16 --max-batch 16 \
          --duration "${SERVER_DURATION:-20}" $([ $mode = eager ] && echo --no-cuda-graph) ${SERVER_ARGS:-} \
          --out "$OUT/server_gpu_$mode" 2>&1 | tail -30
      done ;;
    sweep)  # the A8 prefill linear at M = 2048: its three kernels alone and a wider GEMM tile grid (bench/sweep_prefill_gemm.py)
      timeout "${SWEEP_TIMEOUT:-200}" python bench/sweep_prefill_gemm.py --out "$OUT" ${SWEEP_ARGS:-} 2>&1 | tail -25 ;;
    head)  # LM head (cuBLAS fp16 vs the int8 head's configs) and greedy argmax at real vocabularies
      timeout "${HEAD_TIMEOUT:-150}" python bench/bench_head.py --out "$OUT" ${HEAD_ARGS:-} 2>&1 | grep -v '^{' | tail -30 ;;
    attention)
      timeout "${ATTN_TIMEOUT:-90}" python bench/bench_decode_attention.py --out "$OUT" 2>&1 | tail -22 ;;
    profile)
      timeout "${PROFILE_TIMEOUT:-120}" python bench/profile_gpu_decode.py --out "$OUT/gpu_decode_profile" ${PROFILE_ARGS:-} 2>&1 | tail -12 ;;
    ncu)  # Nsight Compute counters of the decode kernels (bench/ncu_kernels.py); needs a Firecracker machine
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      timeout "${NCU_TIMEOUT:-150}" "${NCU:-ncu}" --clock-control none --profile-from-start off ${NCU_ARGS:---section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats --section ComputeWorkloadAnalysis} python bench/ncu_kernels.py > "$OUT/ncu.txt" 2>&1
      grep -E "launch [0-9]+:|Duration|DRAM Throughput|^  [a-z_]+.*\(" "$OUT/ncu.txt" | head -60 ;;
    adapters)
      timeout "${ADAPTERS_TIMEOUT:-90}" python bench/bench_adapters.py --device cuda --out "$OUT/adapters_gpu.json" 2>&1 | tail -15 ;;
    tests)
      T=$(left); [ "$T" -gt "${TEST_TIMEOUT:-170}" ] && T=${TEST_TIMEOUT:-170}
      if [ "$T" -gt 20 ]; then
        # TEST_K: one -k expression (may hold spaces); TEST_ARGS is split on spaces ("-v" prints each result as it
        # comes, so a step cut by its timeout still shows which tests failed)
        # the model tests first: they are the slowest (inductor compiles), and at the end of the list the step's
        # time limit cut them in every call of 2026-12-03 (bench/results/gpu_tests_*_2026-12-03.log)
        timeout "$T" python -m pytest -rf -p no:cacheprovider -m gpu ${TEST_FILES:-tests/test_gpu_model.py tests/test_decode_attention.py \
          tests/test_gpu_kernels.py tests/test_argmax.py tests/test_gpu_prefill_graph.py tests/test_gpu_server_graphs.py tests/test_gpu_int4_head.py} ${TEST_K:+-k "$TEST_K"} ${TEST_ARGS:-} > "$OUT/tests.log" 2>&1
        grep -E "^FAILED|^ERROR|passed|failed" "$OUT/tests.log" | tail -20
      fi ;;
  esac
done
stamp done
