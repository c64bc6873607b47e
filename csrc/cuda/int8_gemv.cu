// The int8 head's decode GEMV (M = 1): y[n] = scale[n] * sum_k W[n, k] * x[k] (+ bias[n]), W int8 per-row
// (bitengine/int8_head.py), x float16 / bfloat16 / float32 used as given (no activation quantization), float32 sums.
//
// Why not the Triton GEMV (kernels/int8_linear.py): on an H200 it reads the head at half the read probe's speed
// (bench/results/bench_head_sweep_NVIDIA_H200_2026-12-02.md: 32000 x 4096 68 us, probe 35 us; 128256 x 2560 165 vs 78;
// its best swept config 65 / 149). This kernel keeps 2 rows x 8 16-byte loads in flight per lane (256 bytes; 128 KB
// per SM at 2 blocks of 8 warps) and never converts integers with I2F (a quarter-rate instruction): a byte b becomes
// the float 2^23 + (b + 128) by one byte permute (the float's exponent bits come from a constant), and one FADD
// takes 2^23 + 128 off, exactly.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <algorithm>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Optional.h>

#include "gemv_common.cuh"

namespace {

using namespace bitengine_cuda;

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kRows = 2;  // rows per warp at a time
constexpr int kLoads = 8;  // 16-byte loads per lane per row per pass: a pass covers 32 * 8 * 16 = 4096 bytes of a row

// The four signed bytes of w times x[0..3], added to acc. 0x4B000000 | u (u < 256) is the float 2^23 + u; the
// selector 0x754i puts byte i of u in the low byte, zeros above it and 0x4B on top.
__device__ __forceinline__ float dot4(unsigned w, float4 x, float acc) {
  const unsigned u = w ^ 0x80808080u;  // each byte b -> b + 128, as unsigned
  constexpr float kBias = 8388608.0f + 128.0f;
  acc = fmaf(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540)) - kBias, x.x, acc);
  acc = fmaf(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7541)) - kBias, x.y, acc);
  acc = fmaf(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7542)) - kBias, x.z, acc);
  acc = fmaf(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7543)) - kBias, x.w, acc);
  return acc;
}

// x staged once per block in shared memory as float, zero past K, in four planes of float4: plane q holds
// x[16c + 4q .. 16c + 4q + 3] at slot c, so the lanes of a warp, which read chunks c0 + lane, read 16 consecutive
// bytes each (no bank conflicts). x chunk by chunk (64 bytes apart per lane) was a 4-way conflict: the int8 GEMV
// ran at ~60% of the read probe (bench_head_NVIDIA_H200_2026-12-02), and slower still when each row reread x
// (bench_head_int8v2_...); with the planes, 78-90% (bench_head_planes_...).
template <typename T>
__device__ __forceinline__ void stage_x(const T* __restrict__ x, float* xs, int K, int chunks) {
  for (int k = threadIdx.x; k < chunks * 16; k += kThreads) {
    const int c = k >> 4, q = (k >> 2) & 3, j = k & 3;
    xs[(q * chunks + c) * 4 + j] = k < K ? to_float(x[k]) : 0.0f;
  }
  __syncthreads();
}

// One lane's part of a pass over a row: chunks c0 + u * 32 + lane (u < kLoads), 16 bytes each.
__device__ __forceinline__ void load_pass(uint4 (&v)[kLoads], const int8_t* __restrict__ row, int c0, int chunks,
                                          int lane, bool valid) {
#pragma unroll
  for (int u = 0; u < kLoads; ++u) {
    const int c = c0 + u * 32 + lane;
    v[u] = (valid && c < chunks) ? load_stream(reinterpret_cast<const uint4*>(row) + c) : make_uint4(0, 0, 0, 0);
  }
}

// acc[r] += the lane's pass over row r; each x float4 is read from shared memory once for all R rows.
template <int R>
__device__ __forceinline__ void dot_pass(const uint4 (&v)[R][kLoads], const float4* xs4, int c0, int chunks, int lane,
                                         float (&acc)[R]) {
#pragma unroll
  for (int u = 0; u < kLoads; ++u) {
    const int c = c0 + u * 32 + lane;
    if (c >= chunks) break;
    const float4 x0 = xs4[c], x1 = xs4[chunks + c], x2 = xs4[2 * chunks + c], x3 = xs4[3 * chunks + c];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      acc[r] = dot4(v[r][u].x, x0, acc[r]);
      acc[r] = dot4(v[r][u].y, x1, acc[r]);
      acc[r] = dot4(v[r][u].z, x2, acc[r]);
      acc[r] = dot4(v[r][u].w, x3, acc[r]);
    }
  }
}

// The warp's sum of acc, scaled (+ bias) and written by lane 0 to y[n].
template <typename T>
__device__ __forceinline__ void finish_row(float acc, long long n, const float* __restrict__ scale,
                                           const float* __restrict__ bias, T* __restrict__ y, int lane) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) {
    float out = acc * scale[n];
    if (bias != nullptr) out += bias[n];
    y[n] = from_float<T>(out);
  }
}

// Grid-stride over groups of kWarps * kRows rows; each warp loads all of a pass over its kRows rows, then computes
// it. (A software-pipelined version, one row per warp with the next pass in flight during the arithmetic, was no
// faster: bench_head_planes_NVIDIA_H200_2026-12-02, v2 column; removed.)
// w: [N, Kp] int8 with row stride stride_w bytes (a multiple of 16, as Kp); chunks = Kp / 16.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) int8_gemv_kernel(
    const T* __restrict__ x, const int8_t* __restrict__ w, long long stride_w, const float* __restrict__ scale,
    const float* __restrict__ bias, T* __restrict__ y, int N, int K, int chunks) {
  extern __shared__ float4 xs4[];
  stage_x(x, reinterpret_cast<float*>(xs4), K, chunks);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long step = static_cast<long long>(gridDim.x) * kWarps * kRows;
  for (long long row0 = (static_cast<long long>(blockIdx.x) * kWarps + warp) * kRows; row0 < N; row0 += step) {
    float acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
    for (int c0 = 0; c0 < chunks; c0 += 32 * kLoads) {
      uint4 v[kRows][kLoads];
#pragma unroll
      for (int r = 0; r < kRows; ++r) load_pass(v[r], w + (row0 + r) * stride_w, c0, chunks, lane, row0 + r < N);
      dot_pass<kRows>(v, xs4, c0, chunks, lane, acc);
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (row0 + r < N) finish_row(acc[r], row0 + r, scale, bias, y, lane);  // warp-uniform condition
    }
  }
}

template <typename T>
cudaError_t launch(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const float* bias, int K,
                   at::Tensor& y) {
  const int N = static_cast<int>(w.size(0)), chunks = static_cast<int>(w.size(1) / 16);
  const size_t smem = static_cast<size_t>(chunks) * 16 * sizeof(float);
  auto kernel = int8_gemv_kernel<T>;
  const int rows_per_block = kWarps * kRows;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  int per_sm = 0;
  cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
  if (err != cudaSuccess) return err;
  const long long groups = (static_cast<long long>(N) + rows_per_block - 1) / rows_per_block;
  const int grid = static_cast<int>(std::max(1LL, std::min<long long>(groups, 1LL * std::max(1, per_sm) *
                                                                          prop->multiProcessorCount)));
  kernel<<<grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x.data_ptr()), static_cast<const int8_t*>(w.data_ptr()), w.stride(0),
      scale.data_ptr<float>(), bias, reinterpret_cast<T*>(y.data_ptr()), N, K, chunks);
  return cudaGetLastError();
}

}  // namespace

// Validated by bindings.cpp (and before it by kernels/int8_linear.py): x [1, K] contiguous float16 / bfloat16 /
// float32; w int8 [N, Kp] row-major, 16-byte aligned, Kp a multiple of 16 and at most kInt8GemvMaxK (its float copy of
// x lives in 48 KB of shared memory), columns past K zero; scale float32 [N]; bias float32 [N] or None; y [1, N] in
// x's dtype.
cudaError_t int8_gemv_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& bias, int K, at::Tensor& y) {
  c10::cuda::CUDAGuard guard(x.device());
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  switch (x.scalar_type()) {
    case at::kHalf: return launch<__half>(x, w, scale, b, K, y);
    case at::kBFloat16: return launch<__nv_bfloat16>(x, w, scale, b, K, y);
    default: return launch<float>(x, w, scale, b, K, y);
  }
}
