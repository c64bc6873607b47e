// The W1.58A8 decode GEMV (M = 1) and tensor-core kernel (M > 1) of bitengine._C_cuda: the entry point bindings.cpp
// calls, dispatching on x's dtype to the kernels (ternary_gemv_kernels.cuh, one nvcc translation unit per dtype). Host
// code only: compiled by the C++ compiler.
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "ternary_gemv.h"

// Inputs validated by the caller (bindings.cpp: its checks throw from host-compiled code; see there). x: float16 /
// bfloat16 / float32 [M, K] contiguous, 16-byte aligned (rows too when M > 1); w: int32 [N, KW] i2w; scale: float32 [1]
// or [N]; bias: [N] in x's dtype or None; norm_weight: [K] in x's dtype, 16-byte aligned, or None (then x is quantized
// as given; else RMSNorm(x, eps) * norm_weight); residual: [M, N] in x's dtype or None (added to the output); act: 0,
// or 1 (SiLU) / 2 (squared ReLU) for an interleaved gate/up layer (N even, no residual), then y is [M, N / 2] =
// act(gate) * up. M = 1: the GEMV, version 1 (rows_per_warp 1, 2, 4 rows per warp) or 2 (version 2 up to K = 4096,
// version 1 beyond); M > 1: the tensor-core kernel, mma_variant 0..3 (launch_mma). pdl: launch as a programmatic
// dependent launch on sm_90+ (see wait_for_previous_grid). Versions, variants and PDL give bit-identical outputs.
// Returns y [M, N] (or [M, N / 2]) in x's dtype; *err: the launch's CUDA status.
torch::Tensor ternary_gemv_a8_cuda_checked(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                                           int64_t in_features, const c10::optional<torch::Tensor>& bias,
                                           const c10::optional<torch::Tensor>& norm_weight, double eps,
                                           const c10::optional<torch::Tensor>& residual, int64_t act,
                                           int64_t version, int64_t rows_per_warp, int64_t mma_variant, bool pdl,
                                           cudaError_t* err) {
  c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({x.size(0), act ? w.size(0) / 2 : w.size(0)}, x.options());
  const int K = static_cast<int>(in_features);
  const int v = static_cast<int>(version), r = static_cast<int>(rows_per_warp), a = static_cast<int>(act);
  const int mv = static_cast<int>(mma_variant);
  switch (x.scalar_type()) {
    case at::kHalf:
      *err = bitengine_cuda::gemv_a8_f16(x, w, scale, K, bias, norm_weight, eps, residual, a, v, r, mv, pdl, y);
      break;
    case at::kBFloat16:
      *err = bitengine_cuda::gemv_a8_bf16(x, w, scale, K, bias, norm_weight, eps, residual, a, v, r, mv, pdl, y);
      break;
    default:
      *err = bitengine_cuda::gemv_a8_f32(x, w, scale, K, bias, norm_weight, eps, residual, a, v, r, mv, pdl, y);
      break;
  }
  return y;
}
