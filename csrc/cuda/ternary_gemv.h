// The W1.58A8 decode GEMV's entry points per activation dtype (ternary_gemv_kernels.cuh; one translation unit each:
// ternary_gemv_f16.cu, ternary_gemv_bf16.cu, ternary_gemv_f32.cu), called by ternary_gemv.cpp. Arguments as
// ternary_gemv_a8_cuda_checked there documents them; y: the [M, N] output in x's dtype. Return the launch's CUDA status.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <cuda_runtime_api.h>

namespace bitengine_cuda {

#define BITENGINE_GEMV_PARAMS                                                                              \
  const at::Tensor &x, const at::Tensor &w, const at::Tensor &scale, int K, const c10::optional<at::Tensor> &bias, \
      const c10::optional<at::Tensor> &norm_weight, double eps, const c10::optional<at::Tensor> &residual, int act, \
      int version, int rows_per_warp, bool pdl, at::Tensor &y

cudaError_t gemv_a8_f16(BITENGINE_GEMV_PARAMS);
cudaError_t gemv_a8_bf16(BITENGINE_GEMV_PARAMS);
cudaError_t gemv_a8_f32(BITENGINE_GEMV_PARAMS);

}  // namespace bitengine_cuda
