// The W1.58A8 decode GEMV (M = 1) of bitengine._C_cuda: the entry point bindings.cpp calls, dispatching on x's dtype
// to the kernels (ternary_gemv_kernels.cuh, one nvcc translation unit per dtype). Host code only: compiled by the C++
// compiler.
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "ternary_gemv.h"

// Inputs validated by the caller (bindings.cpp: its checks throw from host-compiled code; see there). x: float16 /
// bfloat16 / float32 [1, K] contiguous, 16-byte aligned; w: int32 [N, KW] i2w; scale: float32 [1] or [N]; bias: [N] in
// x's dtype or None; norm_weight: [K] in x's dtype, 16-byte aligned, or None (then x is quantized as given; else
// RMSNorm(x, eps) * norm_weight); residual: [N] in x's dtype or None (added to the output); act: 0, or 1 (SiLU) / 2
// (squared ReLU) for an interleaved gate/up layer (N even, no residual), then y is [1, N / 2] = act(gate) * up;
// version 1 (rows_per_warp 1, 2, 4 rows per warp), 2 (version 2 up to K = 4096, version 1 beyond) or 3 (the
// lane-group kernel up to K = 2560, else as 2; the engine's default); pdl: launch as a
// programmatic dependent launch on sm_90+ (see wait_for_previous_grid). Versions and PDL give bit-identical outputs.
// Returns y [1, N] (or [1, N / 2]) in x's dtype; *err: the launch's CUDA status.
torch::Tensor ternary_gemv_a8_cuda_checked(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                                           int64_t in_features, const c10::optional<torch::Tensor>& bias,
                                           const c10::optional<torch::Tensor>& norm_weight, double eps,
                                           const c10::optional<torch::Tensor>& residual, int64_t act,
                                           int64_t version, int64_t rows_per_warp, bool pdl, cudaError_t* err) {
  c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({x.size(0), act ? w.size(0) / 2 : w.size(0)}, x.options());
  const int K = static_cast<int>(in_features);
  const int v = static_cast<int>(version), r = static_cast<int>(rows_per_warp), a = static_cast<int>(act);
  switch (x.scalar_type()) {
    case at::kHalf:
      *err = bitengine_cuda::gemv_a8_f16(x, w, scale, K, bias, norm_weight, eps, residual, a, v, r, pdl, y);
      break;
    case at::kBFloat16:
      *err = bitengine_cuda::gemv_a8_bf16(x, w, scale, K, bias, norm_weight, eps, residual, a, v, r, pdl, y);
      break;
    default:
      *err = bitengine_cuda::gemv_a8_f32(x, w, scale, K, bias, norm_weight, eps, residual, a, v, r, pdl, y);
      break;
  }
  return y;
}
