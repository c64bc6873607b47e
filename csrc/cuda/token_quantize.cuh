// Per-token int8 quantization of activations by a whole block, for the tensor-core kernel (ternary_mma_kernels.cuh):
// quantize_tokens (RMSNorm optional, then quant.quantize_activations' per-row absmax and rounding, several tokens at a
// time) and quantize_rows_kernel, which runs it once per token in front of the tensor-core kernel and writes the int8
// rows to global memory for every block of that kernel to copy in.
#pragma once

#include <cstdint>

#include "gemv_common.cuh"

namespace {

using namespace bitengine_cuda;

// Per-token partial results of every thread combined over the block, in place: a warp shuffle tree, then the warps
// in order (a fixed order, so float sums come out the same on every call). red: kTok x kWarps scratch.
template <int kTok, typename V, typename Op>
__device__ __forceinline__ void block_reduce_tokens(V (&v)[kTok], V (*red)[kWarps], Op op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < kTok; ++j) {
    V s = v[j];
    for (int o = 16; o; o >>= 1) s = op(s, __shfl_xor_sync(0xffffffffu, s, o));
    if (lane == 0) red[j][warp] = s;
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kTok; ++j) {
    V t = red[j][0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) t = op(t, red[j][w]);
    v[j] = t;
  }
  __syncthreads();  // red may be reused
}

// The M token rows x[M, K] (or RMSNorm(x) * norm_w) quantized by the whole block, kTok tokens at a time (into the
// tensor-core kernel's shared-memory rows for version 1, into global memory in quantize_rows_kernel): thread tid takes
// words tid, tid + 256, ... of each of them, so every load of a pass is in flight at once (K <= 4096: one word per
// thread and token, kept in registers between the passes: one memory round trip in all), and per-token sums meet in
// shared memory (block_reduce_tokens). The same steps and roundings as quantize_to_shared (bitengine.nn.RMSNorm, then
// quant.quantize_activations' per-row absmax, IEEE reciprocal, rint half-to-even, clamp). Written for few tokens in
// the tensor-core kernel, where one warp per token (quantize_token) leaves most warps waiting and took most of the
// kernel's time (bench/results/gpu_mma_breakdown_69b0b90_NVIDIA_H200_2026-12-02, M = 2: ~5 us at K = 4096, ~14 us at
// K = 11008).
// store_word(m, wi, q): x_q word wi (16 bytes) of token m; store_token(m, a, sum): its scale and code sum (thread 0).
template <int kTok, typename T, typename StoreWord, typename StoreToken>
__device__ void quantize_tokens(const T* __restrict__ x, int M, const T* __restrict__ norm_w, float eps, int K, int KW,
                                int kw4, StoreWord store_word, StoreToken store_token) {
  __shared__ float red_f[kTok][kWarps];
  __shared__ int red_i[kTok][kWarps];
  const int tid = threadIdx.x;
  const bool norm = norm_w != nullptr, first = tid < KW;
  const int words = (kw4 + 3) / 4 * 16;  // through the last quad: zeros past KW
  auto add = [](auto a, auto b) { return a + b; };
  for (int m0 = 0; m0 < M; m0 += kTok) {  // the same count in every thread: the reductions' barriers
    const T* xt = x + static_cast<long long>(m0) * K;
    const int mt = min(kTok, M - m0);
    XWord<T> v0[kTok], g0;  // word tid of each token and of the norm weight
#pragma unroll
    for (int j = 0; j < kTok; ++j)
      if (j < mt && first) v0[j] = load_word(xt + static_cast<long long>(j) * K, tid, K);
    if (norm && first) g0 = load_word(norm_w, tid, K);
    float r[kTok];  // RMSNorm factors
    if (norm) {
      float ss[kTok];
#pragma unroll
      for (int j = 0; j < kTok; ++j) ss[j] = j < mt && first ? sum_squares(v0[j], 0.f) : 0.f;
      for (int wi = tid + kThreads; wi < KW; wi += kThreads)
#pragma unroll
        for (int j = 0; j < kTok; ++j)
          if (j < mt) ss[j] = sum_squares(load_word(xt + static_cast<long long>(j) * K, wi, K), ss[j]);
      block_reduce_tokens<kTok>(ss, red_f, add);
#pragma unroll
      for (int j = 0; j < kTok; ++j) {
        r[j] = rsqrtf(__fadd_rn(__fdiv_rn(ss[j], static_cast<float>(K)), eps));
        if (j < mt && first) norm_word(g0, r[j], v0[j]);
      }
    }
    // word wi (>= kThreads) of token j as the kernel quantizes it
    auto word = [&](int j, int wi, const XWord<T>& g) {
      XWord<T> t = load_word(xt + static_cast<long long>(j) * K, wi, K);
      if (norm) norm_word(g, r[j], t);
      return t;
    };
    float amax[kTok];
#pragma unroll
    for (int j = 0; j < kTok; ++j) amax[j] = j < mt && first ? abs_max(v0[j], 0.f) : 0.f;
    for (int wi = tid + kThreads; wi < KW; wi += kThreads) {
      XWord<T> g;
      if (norm) g = load_word(norm_w, wi, K);
#pragma unroll
      for (int j = 0; j < kTok; ++j)
        if (j < mt) amax[j] = abs_max(word(j, wi, g), amax[j]);
    }
    block_reduce_tokens<kTok>(amax, red_f, [](float a, float b) { return fmaxf(a, b); });
    float a[kTok];
    int sum[kTok];
#pragma unroll
    for (int j = 0; j < kTok; ++j) {
      a[j] = __fmul_rn(__frcp_rn(fmaxf(amax[j], 1e-5f)), 127.f);  // as torch: 127 * (1 / amax)
      sum[j] = 0;
    }
    for (int wi = tid; wi < words; wi += kThreads) {
      XWord<T> g;
      if (norm && wi >= kThreads && wi < KW) g = load_word(norm_w, wi, K);
#pragma unroll
      for (int j = 0; j < kTok; ++j) {
        if (j >= mt) continue;
        int4 q = make_int4(0, 0, 0, 0);
        if (wi < KW) q = pack_word(wi == tid ? v0[j] : word(j, wi, g), a[j], sum[j]);
        store_word(m0 + j, wi, q);
      }
    }
    block_reduce_tokens<kTok>(sum, red_i, add);
    if (tid == 0)
#pragma unroll
      for (int j = 0; j < kTok; ++j)
        if (j < mt) store_token(m0 + j, a[j], sum[j]);
  }
}

// Bytes of one token's x_q row in global memory (quantize_rows_kernel): its words in order through the last quad.
__host__ __device__ inline long long mma_global_row_bytes(int kw4) { return (kw4 + 3) / 4 * 256LL; }

// Every token quantized once, for all blocks of the tensor-core kernels behind it: block m takes token m (the
// block-wide prologue, one token per block) and writes its x_q row (mma_global_row_bytes, zeros past K), its scale
// a[m] and its code sum xsum[m]. Why: with the quantization inside the tensor-core kernel every block (up to 2 per SM)
// quantized all M tokens itself, and from 4 tokens on that was most of the kernel's time (bench/results/
// gpu_mma_breakdown_2fc551e_NVIDIA_H200_2026-12-03: 7B down at M = 16 45.3 us, 11.8 without it). Same steps and
// roundings as in the kernel: the tensor-core kernel's outputs do not depend on which side quantized (x_q, a and the
// sums are the same integers and floats; with RMSNorm the sum of squares may be added in another order).
template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_rows_kernel(const T* __restrict__ x, const T* __restrict__ norm_w,
                                                                 float eps, int K, int KW, char* __restrict__ xq,
                                                                 float* __restrict__ a, int* __restrict__ xsum) {
  wait_for_previous_grid();  // x may be the previous kernel's output
  allow_next_grid();         // the tensor-core kernel may start its weight loads; it waits for this grid's end
  const int m = blockIdx.x, kw4 = KW / 4;
  char* row = xq + m * mma_global_row_bytes(kw4);
  quantize_tokens<1>(
      x + static_cast<long long>(m) * K, 1, norm_w, eps, K, KW, kw4,
      [&](int, int wi, int4 q) { *reinterpret_cast<int4*>(row + 16 * wi) = q; },
      [&](int, float av, int sum) {
        a[m] = av;
        xsum[m] = sum;
      });
}

}  // namespace
