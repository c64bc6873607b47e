// The decode GEMV's kernels for __nv_bfloat16 activations (see ternary_gemv_kernels.cuh).
#include "ternary_gemv_kernels.cuh"

namespace bitengine_cuda {

cudaError_t gemv_a8_bf16(BITENGINE_GEMV_PARAMS) {
  return run<__nv_bfloat16>(x, w, scale, K, bias, norm_weight, eps, residual, act, version, rows_per_warp, pdl, y);
}

}  // namespace bitengine_cuda
