// The int4 head's decode GEMV (M = 1): y[n] = sum_g scale[n, g] * (q[n, g] . x_q[g]) / a (+ bias[n]), with x quantized
// per token to int8 (x_q, a: quant.quantize_activations, as every ternary linear's input) and q the head's group-wise
// int4 weights (bitengine/int4_head.py: groups of 128, float16 scales, 32 weights per 16-byte chunk, the low nibbles
// under activations 32c .. 32c + 15, the high nibbles under the next 16, 4-bit two's complement).
//
// Why: the head is read whole every decode step; int4 halves the int8 head's bytes (BitNet-2B-4T's 128256 x 2560 head:
// ~102 us of a ~0.81 ms step as int8 on an H200). Half the bytes per weight means twice the weights per byte, so the
// arithmetic per byte must stay small: each block quantizes x into shared memory once (quantize_to_shared, as the
// ternary GEMV), and a 4-byte weight word costs one shift, two ANDs and two dp4a: (w << 4) & 0xF0F0F0F0 and
// w & 0xF0F0F0F0 are the low and high nibbles times 16 as signed bytes, so no offset or sign extension is needed; the
// chunk's int32 sum (16 times the exact dot product) meets its group scale in one FFMA.
// Layout in shared memory: x_q word wi (16 activations) at (wi & 1) * chunks + wi / 2, so chunk c's two words sit in
// two planes at slot c and the lanes of a warp, which read chunks c0 + lane, read consecutive 16-byte slots.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <algorithm>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Optional.h>

#include "gemv_common.cuh"

namespace {

using namespace bitengine_cuda;

struct PlaneSlot {
  int chunks;
  __device__ __forceinline__ int operator()(int wi) const { return (wi & 1) * chunks + (wi >> 1); }
};

// 16 times the dot product of a chunk's 32 int4 weights with its 32 int8 activations (lo: the first 16, hi: the next).
__device__ __forceinline__ int chunk_dot(uint4 w, int4 lo, int4 hi) {
  int s = 0;
  s = __dp4a(static_cast<int>((w.x << 4) & 0xF0F0F0F0u), lo.x, s);
  s = __dp4a(static_cast<int>(w.x & 0xF0F0F0F0u), hi.x, s);
  s = __dp4a(static_cast<int>((w.y << 4) & 0xF0F0F0F0u), lo.y, s);
  s = __dp4a(static_cast<int>(w.y & 0xF0F0F0F0u), hi.y, s);
  s = __dp4a(static_cast<int>((w.z << 4) & 0xF0F0F0F0u), lo.z, s);
  s = __dp4a(static_cast<int>(w.z & 0xF0F0F0F0u), hi.z, s);
  s = __dp4a(static_cast<int>((w.w << 4) & 0xF0F0F0F0u), lo.w, s);
  s = __dp4a(static_cast<int>(w.w & 0xF0F0F0F0u), hi.w, s);
  return s;
}

// R rows per warp at a time, U 16-byte loads per lane per row in flight (a pass covers 32 * U chunks of a row).
// Grid-stride over groups of kWarps * R rows, as the int8 head's GEMV (int8_gemv.cu).
// w: uint8 [N, chunks * 16] row-major; scale: float16 [N, chunks / 4].
template <typename T, int R, int U>
__global__ void __launch_bounds__(kThreads, 2) int4_gemv_kernel(
    const T* __restrict__ x, const uint8_t* __restrict__ w, const __half* __restrict__ scale,
    const float* __restrict__ bias, T* __restrict__ y, int N, int K, int chunks) {
  extern __shared__ int4 xs[];  // 2 * chunks words: the two planes
  const PlaneSlot slot{chunks};
  const int KW = (K + 15) / 16;
  for (int wi = KW + threadIdx.x; wi < 2 * chunks; wi += kThreads) xs[slot(wi)] = make_int4(0, 0, 0, 0);
  float a;
  int xsum;
  quantize_to_shared<T>(x, nullptr, 0.f, K, KW, xs, a, xsum, slot);  // its last barrier publishes the zeros too
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, groups = chunks / 4;
  const long long step = static_cast<long long>(gridDim.x) * kWarps * R;
  for (long long row0 = (static_cast<long long>(blockIdx.x) * kWarps + warp) * R; row0 < N; row0 += step) {
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
    for (int c0 = 0; c0 < chunks; c0 += 32 * U) {
      uint4 v[R][U];
      float s[R][U];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const long long n = row0 + r;
        const uint4* row = reinterpret_cast<const uint4*>(w + n * chunks * 16);
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int c = c0 + u * 32 + lane;
          const bool valid = n < N && c < chunks;
          v[r][u] = valid ? load_stream(row + c) : make_uint4(0, 0, 0, 0);
          s[r][u] = valid ? __half2float(scale[n * groups + c / 4]) : 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = c0 + u * 32 + lane;
        if (c >= chunks) break;
        const int4 lo = xs[c], hi = xs[chunks + c];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] = fmaf(static_cast<float>(chunk_dot(v[r][u], lo, hi)), s[r][u], acc[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float t = acc[r];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
      const long long n = row0 + r;
      if (lane == 0 && n < N) {
        float out = __fdiv_rn(t * 0.0625f, a);  // the dp4a sums carry the nibbles times 16
        if (bias != nullptr) out += bias[n];
        y[n] = from_float<T>(out);
      }
    }
  }
}

template <typename T, int R, int U>
cudaError_t launch(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const float* bias, int K,
                   at::Tensor& y) {
  const int N = static_cast<int>(w.size(0)), chunks = static_cast<int>(w.size(1) / 16);
  const size_t smem = static_cast<size_t>(chunks) * 2 * sizeof(int4);
  auto kernel = int4_gemv_kernel<T, R, U>;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  int per_sm = 0;
  cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
  if (err != cudaSuccess) return err;
  const long long groups = (static_cast<long long>(N) + kWarps * R - 1) / (kWarps * R);
  const int grid = static_cast<int>(std::max(1LL, std::min<long long>(groups, 1LL * std::max(1, per_sm) *
                                                                          prop->multiProcessorCount)));
  kernel<<<grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x.data_ptr()), static_cast<const uint8_t*>(w.data_ptr()),
      reinterpret_cast<const __half*>(scale.data_ptr()), bias, reinterpret_cast<T*>(y.data_ptr()), N, K, chunks);
  return cudaGetLastError();
}

// Rows of up to 128 chunks (K <= 4096: the 7B, 8B and BitNet-2B-4T heads) four per warp, four loads each; longer rows
// two per warp, eight loads each: 64 16-byte loads in flight per lane either way.
template <typename T>
cudaError_t dispatch(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const float* bias, int K,
                     at::Tensor& y) {
  if (w.size(1) / 16 <= 128) return launch<T, 4, 4>(x, w, scale, bias, K, y);
  return launch<T, 2, 8>(x, w, scale, bias, K, y);
}

}  // namespace

// Validated by bindings.cpp (and before it by kernels/int4_linear.py): x [1, K] contiguous float16 / bfloat16 /
// float32; w uint8 [N, Kp / 2] contiguous, 16-byte aligned, Kp = K rounded up to 128 and at most kInt4GemvMaxK;
// scale float16 [N, Kp / 128] contiguous; bias float32 [N] or None; y [1, N] in x's dtype.
cudaError_t int4_gemv_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& bias, int K, at::Tensor& y) {
  c10::cuda::CUDAGuard guard(x.device());
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  switch (x.scalar_type()) {
    case at::kHalf: return dispatch<__half>(x, w, scale, b, K, y);
    case at::kBFloat16: return dispatch<__nv_bfloat16>(x, w, scale, b, K, y);
    default: return dispatch<float>(x, w, scale, b, K, y);
  }
}
