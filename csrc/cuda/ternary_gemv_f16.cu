// The decode GEMV's kernels for __half activations (see ternary_gemv_kernels.cuh).
#include "ternary_gemv_kernels.cuh"

namespace bitengine_cuda {

cudaError_t gemv_a8_f16(BITENGINE_GEMV_PARAMS) {
  return run<__half>(x, w, scale, K, bias, norm_weight, eps, residual, act, version, rows_per_warp, pdl, y);
}

}  // namespace bitengine_cuda
