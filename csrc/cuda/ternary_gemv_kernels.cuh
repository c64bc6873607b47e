// W1.58A8 decode GEMV (M = 1) in CUDA C++: y[N] = s * (x_q . W_q[n]) / a (+ bias) (+ residual), where x_q is x, or
// RMSNorm(x) * norm_weight (the layer's input norm, fused), quantized to int8.
//
// Weights: i2w layout (bitengine/kernels/layout.py): int32 [N, KW], KW % 16 == 0, 16 weights per
// word, weight 16w + 4j + b at bits 8b + 2j, code = w + 1. So word & (0x03030303 << 2j) holds the
// codes of 4 consecutive weights, each times 4^j, as bytes, and one dp4a against 4 int8 activations sums
// 4^j * x_q * code (DotAcc in gemv_common.cuh keeps one sum per j and scales it back at the end).
// The code offset is removed once: sum x_q (c - 1) = sum x_q c - sum x_q.
//
// One persistent launch does everything (no separate quantization or norm kernel):
//   0. each warp issues the loads of its first weight rows;
//   1. every block quantizes x (per-token absmax, exactly quant.quantize_activations: IEEE reciprocal,
//      rint half-to-even, clamp) into shared memory, with sum(x_q); x is read once, with 16-byte
//      loads all in flight together, and kept in registers between the passes; with a norm weight,
//      the block first applies the RMSNorm (one more block reduction), so the decode step needs no norm kernel;
//   2. each warp streams R weight rows with 16-byte non-caching loads, U of them in flight per row,
//      and reduces with shuffles; blocks stride over row groups;
//   3. the epilogue adds bias and the residual stream (the decode step's `h + linear(...)`) where given, or, for the
//      MLP's fused gate/up layer (rows interleaved gate, up), applies the gating act(gate) * up (store_gated).
// x_q words sit in shared memory permuted so that lane l's four words of a 16-byte weight load are
// read conflict-free (see xq_slot).
//
// Calls with M > 1 tokens go to the tensor-core kernel (ternary_mma_kernels.cuh, included here; `run` dispatches).
//
// This header holds the kernels and their launchers; each of ternary_gemv_{f16,bf16,f32}.cu includes it once and
// instantiates one dtype (anonymous namespace: each translation unit has its own copy), so the three compile in
// parallel; ternary_gemv.cpp picks one by x's dtype. Only ATen's tensor and CUDA-context headers here, not
// torch/extension.h: its parse dominated the compile time (bench/results/cuda_build_units_2026-12-02.txt).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <algorithm>
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gemv_common.cuh"
#include "ternary_gemv.h"
#include "ternary_mma_kernels.cuh"

namespace {

using namespace bitengine_cuda;

// R rows per warp, U 16-byte loads per row in flight per lane. The first row group's loads are issued
// before the activation quantization, so its latency overlaps the weight stream.
template <typename T, int R, int U>
__global__ void __launch_bounds__(kThreads) ternary_gemv_a8_kernel(
    const T* __restrict__ x, const int* __restrict__ w, long long stride_w, const float* __restrict__ scale,
    int per_channel, const T* __restrict__ bias, const T* __restrict__ norm_w, float eps, const T* __restrict__ residual,
    T* __restrict__ y, int N, int K, int KW, int act) {
  extern __shared__ int4 xq[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kw4 = KW / 4;  // 16-byte vectors per row
  const int row_step = gridDim.x * kWarps * R;
  int row0 = (blockIdx.x * kWarps + warp) * R;
  uint4 wv[U][R];
  auto load_rows = [&](int first_row, int v0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint4* row = reinterpret_cast<const uint4*>(w + static_cast<long long>(min(first_row + r, N - 1)) * stride_w);
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (v0 + 32 * u < kw4) wv[u][r] = load_stream(row + v0 + 32 * u);
    }
  };
  if (row0 < N) load_rows(row0, lane);
  wait_for_previous_grid();
  allow_next_grid();
  float a;
  int xsum;
  quantize_to_shared(x, norm_w, eps, K, KW, xq, a, xsum);
  for (; row0 < N; row0 += row_step) {
    DotAcc acc[R];
    for (int v0 = lane; v0 < kw4; v0 += 32 * U) {
      if (v0 != lane) load_rows(row0, v0);  // the first step's loads were issued earlier
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = v0 + 32 * u;
        if (v < kw4) accumulate_vector(acc, wv[u], xq, v);
      }
    }
    store_rows<T, R>(acc, row0, lane, xsum, a, scale, per_channel, bias, residual, y, N, act);
    if (row0 + row_step < N) load_rows(row0 + row_step, lane);  // next row group's first step
  }
}

// Version 2 (the default, rows_per_warp = 0): the same arithmetic, organised for bytes in flight.
// A warp walks a flat sequence of tiles (R rows x U 16-byte vectors per lane of one K chunk) and issues
// tile t + 1's loads before it computes tile t (two register buffers), so the memory system always has
// two tiles per warp to work on; register use is capped for 4 blocks (32 warps) per SM; rows are split
// so that every block gets the same number of row groups (no tail round for a few blocks).
template <typename T, int R, int U>
__global__ void __launch_bounds__(kThreads, 4) ternary_gemv_a8_v2_kernel(
    const T* __restrict__ x, const int* __restrict__ w, long long stride_w, const float* __restrict__ scale,
    int per_channel, const T* __restrict__ bias, const T* __restrict__ norm_w, float eps, const T* __restrict__ residual,
    T* __restrict__ y, int N, int K, int KW, int act) {
  extern __shared__ int4 xq[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kw4 = KW / 4;                          // 16-byte vectors per row
  const int chunks = (kw4 + 32 * U - 1) / (32 * U);  // K chunks per row group
  const int row_step = gridDim.x * kWarps * R;
  int row0 = (blockIdx.x * kWarps + warp) * R;
  int chunk = 0;
  uint4 buf[2][U][R];
  auto load_tile = [&](uint4 (&b)[U][R], int first_row, int c) {
    const int v0 = c * 32 * U + lane;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint4* row = reinterpret_cast<const uint4*>(w + static_cast<long long>(min(first_row + r, N - 1)) * stride_w);
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (v0 + 32 * u < kw4) b[u][r] = load_stream(row + v0 + 32 * u);
    }
  };
  if (row0 < N) load_tile(buf[0], row0, 0);
  wait_for_previous_grid();
  allow_next_grid();
  // x words in registers: 1 per thread (register cap)
  float a;
  int xsum;
  quantize_to_shared<T, 1>(x, norm_w, eps, K, KW, xq, a, xsum);
  DotAcc acc[R];
  // one tile: accumulate, and at the end of a row group write its outputs; returns false when done
  auto step = [&](uint4 (&cur)[U][R], uint4 (&nxt)[U][R]) -> bool {
    if (row0 >= N) return false;
    int nrow = row0, nchunk = chunk + 1;
    if (nchunk == chunks) { nchunk = 0; nrow += row_step; }
    if (nrow < N) load_tile(nxt, nrow, nchunk);  // in flight while this tile is computed
    const int v0 = chunk * 32 * U + lane;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = v0 + 32 * u;
      if (v < kw4) accumulate_vector(acc, cur[u], xq, v);
    }
    if (chunk == chunks - 1) {
      store_rows<T, R>(acc, row0, lane, xsum, a, scale, per_channel, bias, residual, y, N, act);
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = DotAcc();
    }
    row0 = nrow;
    chunk = nchunk;
    return true;
  };
  while (step(buf[0], buf[1]) && step(buf[1], buf[0])) {
  }
}

// Version 3 (the engine's default since 2026-12-03: BitNet-2B-4T batch 1 1230 vs 1170 tok/s with version 2, one run):
// version 2's double-buffered tiles with a warp's lanes split into groups of kGroupLanes, one row per group, for short
// rows. Version 2 gives a row all 32 lanes, U = 2 vectors each (one K chunk of 64 16-byte vectors); a K = 2560 row has
// 40 vectors, so 24 of the 64 load and dp4a slots idle (62.5% used; at K <= 2048 in the gated 2-row kernel, half). Here
// 8 lanes take a row, U vectors each (U * 8 >= the row's vectors; K = 2560: U = 5, every slot used), and a warp works
// on 4 rows per tile, 2560 bytes at K = 2560 against version 2's 1280. Why: in the 66d0dec kernel run the GEMV at K =
// 2560 streams at 2.17 TB/s at the margin (time against packed bytes over BitNet-2B-4T's five shapes) against 3.25 TB/s
// at K = 4096 and 3.8-4.0 TB/s for the read probe at both. x_q reads: the 8 lanes of a group read 8 consecutive
// vectors' words (xq_slot: consecutive slots, conflict-free), the 4 groups the same ones (broadcast). The group's sum:
// 3 shuffles; a gated layer's (gate, up) pair sits in groups (0, 1) and (2, 3), the up sum moved over by one shuffle.
constexpr int kGroupLanes = 8;

template <typename T>
__device__ __forceinline__ void store_group_row(const DotAcc& acc, int row0, int group, int t, int xsum, float a,
                                                const float* __restrict__ scale, int per_channel,
                                                const T* __restrict__ bias, const T* __restrict__ residual,
                                                T* __restrict__ y, int N, int act) {
  int s = acc.total();
#pragma unroll
  for (int o = kGroupLanes / 2; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);  // xor < 8: within the group
  const int n = row0 + group;
  if (act != 0) {  // rows interleaved gate, up; row0 is a multiple of 4, so groups 0 and 2 hold gate rows
    const int u = __shfl_down_sync(0xffffffffu, s, kGroupLanes);
    if (t == 0 && !(group & 1) && n < N)
      store_gated(s, u, xsum, scale[per_channel ? n : 0], scale[per_channel ? n + 1 : 0], a, bias, y, n, act);
    return;
  }
  if (t == 0 && n < N) store_output(s, xsum, scale[per_channel ? n : 0], a, bias, residual, y, n);
}

template <typename T, int U>
__global__ void __launch_bounds__(kThreads, 4) ternary_gemv_a8_v3_kernel(
    const T* __restrict__ x, const int* __restrict__ w, long long stride_w, const float* __restrict__ scale,
    int per_channel, const T* __restrict__ bias, const T* __restrict__ norm_w, float eps, const T* __restrict__ residual,
    T* __restrict__ y, int N, int K, int KW, int act) {
  constexpr int G = 32 / kGroupLanes;  // rows per warp and tile
  extern __shared__ int4 xq[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = lane / kGroupLanes, t = lane % kGroupLanes;
  const int kw4 = KW / 4;  // 16-byte vectors per row (<= kGroupLanes * U: dispatch_version)
  const int row_step = gridDim.x * kWarps * G;
  int row0 = (blockIdx.x * kWarps + warp) * G;  // warp-uniform; this lane's row is row0 + group
  uint4 buf[2][U];
  auto load_tile = [&](uint4 (&b)[U], int first_row) {
    const uint4* row = reinterpret_cast<const uint4*>(w + static_cast<long long>(min(first_row + group, N - 1)) * stride_w);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (t + kGroupLanes * u < kw4) b[u] = load_stream(row + t + kGroupLanes * u);
  };
  if (row0 < N) load_tile(buf[0], row0);
  wait_for_previous_grid();
  allow_next_grid();
  float a;
  int xsum;
  quantize_to_shared<T, 1>(x, norm_w, eps, K, KW, xq, a, xsum);
  // one tile (this lane's row of the warp's G): the next tile's loads first, then the dot product and the outputs;
  // returns false when the warp is done (row0 is warp-uniform, so every lane takes the shuffles together)
  auto step = [&](uint4 (&cur)[U], uint4 (&nxt)[U]) -> bool {
    if (row0 >= N) return false;
    const int nrow = row0 + row_step;
    if (nrow < N) load_tile(nxt, nrow);
    DotAcc acc;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = t + kGroupLanes * u;
      if (v < kw4) {
        const int4 x0 = xq[xq_slot(4 * v)], x1 = xq[xq_slot(4 * v + 1)];
        const int4 x2 = xq[xq_slot(4 * v + 2)], x3 = xq[xq_slot(4 * v + 3)];
        acc.add(cur[u].x, x0);
        acc.add(cur[u].y, x1);
        acc.add(cur[u].z, x2);
        acc.add(cur[u].w, x3);
      }
    }
    store_group_row<T>(acc, row0, group, t, xsum, a, scale, per_channel, bias, residual, y, N, act);
    row0 = nrow;
    return true;
  };
  while (step(buf[0], buf[1]) && step(buf[1], buf[0])) {
  }
}

// One launcher for all versions. The grid is persistent (at most the blocks that fit at once); `balanced`
// (version 2) sizes it so every block gets the same number of row groups instead of filling every slot.
// Returns the first CUDA error (the caller, bindings.cpp, raises it; see there why not here).
template <typename T, typename Kernel>
cudaError_t launch_gemv(Kernel kernel, int rows_per_block, bool balanced, const at::Tensor& x, const at::Tensor& w,
                        const at::Tensor& scale, const Extras<T>& e, at::Tensor& y, int K, bool pdl) {
  const int N = w.size(0), KW = w.size(1);
  const size_t smem = static_cast<size_t>((KW + 127) / 128) * 128 * sizeof(int4);
  cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
  if (err != cudaSuccess) return err;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int row_groups = (N + rows_per_block - 1) / rows_per_block;
  const int slots = prop->multiProcessorCount * std::max(per_sm, 1);
  int grid = std::max(1, std::min(row_groups, slots));
  if (balanced) {
    const int rounds = (row_groups + slots - 1) / slots;  // row groups per block
    grid = std::max(1, (row_groups + rounds - 1) / rounds);
  }
  return launch_kernel(kernel, grid, smem, pdl, reinterpret_cast<const T*>(x.data_ptr()),
                       static_cast<const int*>(w.data_ptr<int>()), static_cast<long long>(w.stride(0)),
                       static_cast<const float*>(scale.data_ptr<float>()), scale.numel() > 1 ? 1 : 0, e.bias,
                       e.norm_w, e.eps, e.residual, reinterpret_cast<T*>(y.data_ptr()), N, K, KW, e.act);
}

template <typename T, int R, int U>
cudaError_t launch(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const Extras<T>& e,
                   at::Tensor& y, int K, bool pdl) {
  return launch_gemv<T>(ternary_gemv_a8_kernel<T, R, U>, kWarps * R, false, x, w, scale, e, y, K, pdl);
}

template <typename T, int R, int U>
cudaError_t launch_v2(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const Extras<T>& e,
                      at::Tensor& y, int K, bool pdl) {
  return launch_gemv<T>(ternary_gemv_a8_v2_kernel<T, R, U>, kWarps * R, true, x, w, scale, e, y, K, pdl);
}

template <typename T, int U>
cudaError_t launch_v3(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const Extras<T>& e,
                      at::Tensor& y, int K, bool pdl) {
  return launch_gemv<T>(ternary_gemv_a8_v3_kernel<T, U>, kWarps * (32 / kGroupLanes), true, x, w, scale, e, y, K, pdl);
}

template <typename T>
cudaError_t dispatch_version(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                             const Extras<T>& e, at::Tensor& y, int K, int version, int rows_per_warp, bool pdl) {
  if (version == 3) {  // the lane-group kernel where a row fits 8 lanes x 4 or 5 vectors (K <= 2560), else as 2
    const int kw4 = static_cast<int>(w.size(1)) / 4;
    if (kw4 <= kGroupLanes * 4) return launch_v3<T, 4>(x, w, scale, e, y, K, pdl);
    if (kw4 <= kGroupLanes * 5) return launch_v3<T, 5>(x, w, scale, e, y, K, pdl);
    version = 2;
  }
  if (version == 2) {  // auto: version 2 up to K = 4096, version 1 beyond
    // bench/results/gpu_kernels_NVIDIA_H200_2026-11-28 (cuda_a8 = version 2, cuda_a8_v1): version 2 is 2-20%
    // faster up to K = 4096 (one K chunk per row, x held in registers) and 2-22% slower on longer rows
    // (K = 6912 .. 14336: x read twice, and two K chunks per row above K = 8192), where version 1 keeps x in registers.
    const int kw4 = static_cast<int>(w.size(1)) / 4;
    if (kw4 <= 32 && !e.act) return launch_v2<T, 4, 1>(x, w, scale, e, y, K, pdl);  // gating: 2-row kernels only
    if (kw4 <= 64) return launch_v2<T, 2, 2>(x, w, scale, e, y, K, pdl);
    // Beyond K = 4096 two rows per warp at every N (gpu_kernels_NVIDIA_H200_2026-12-02, fee83a9, cuda_a8_v1_r2 vs
    // the former 1 row per warp for N <= 8192): 2560x6912 4.74 vs 5.41 us, 4096x11008 7.29 vs 7.71, 4096x14336 8.15
    // vs 8.75, 3200x10240 6.53 vs 6.89 (four rows: 5.00, 7.33, 8.54, 6.55).
    return launch<T, 2, 4>(x, w, scale, e, y, K, pdl);
  }
  switch (e.act ? 2 : rows_per_warp) {  // version 1 (the gating runs in 2-row kernels, see store_rows)
    case 1: return launch<T, 1, 8>(x, w, scale, e, y, K, pdl);
    case 2: return launch<T, 2, 4>(x, w, scale, e, y, K, pdl);
    default: return launch<T, 4, 2>(x, w, scale, e, y, K, pdl);
  }
}

template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t ? reinterpret_cast<const T*>(t->data_ptr()) : nullptr;
}

template <typename T>
cudaError_t run(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int K,
                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& norm_weight, double eps,
                const c10::optional<at::Tensor>& residual, int act, int version, int rows_per_warp, bool pdl,
                at::Tensor& y) {
  const Extras<T> e{ptr_or_null<T>(bias), ptr_or_null<T>(norm_weight), static_cast<float>(eps),
                    ptr_or_null<T>(residual), act};
  if (x.size(0) > 1) return launch_mma<T>(x, w, scale, e, y, K, version, pdl);  // a few tokens: the tensor-core kernel
  return dispatch_version<T>(x, w, scale, e, y, K, version, rows_per_warp, pdl);
}

}  // namespace
