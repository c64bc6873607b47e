// W1.58A8 linear for a few tokens (2 <= M <= 32 per launch; batched decode) on the int8 tensor cores: y[M, N] =
// s * (x_q . W_q[n]) / a_m (+ bias) (+ residual), with per-token int8 quantization of x (or of RMSNorm(x) * norm_weight)
// exactly as the M = 1 GEMV (ternary_gemv_kernels.cuh) and quant.quantize_activations do it per row: once for all
// blocks in a small kernel in front (quantize_rows_kernel, programmatic dependent launch; each block copies the int8
// rows into shared memory), or (version 1, for comparison) inside every block.
//
// Why not the M = 1 kernel's dp4a loop: every weight word would cost 4 dp4a per token (32 at M = 8); the Triton
// kernels that served these calls before (a dp4a GEMV and a tensor-core GEMM) ran 2-4x slower than cuBLAS FP16 at
// M = 16 (bench/results/gpu_kernels_NVIDIA_H200_2026-11-28). Here one mma.m16n8k32 (u8 codes x s8 x_q) takes
// 16 rows x 32 inputs x 8 tokens, and the weight side costs one shift and one AND per 4 weights: the codes c = w + 1
// in {0, 1, 2} are the A operand as they sit in the i2w word (bits 2j of each byte, shifted down), with the offset
// removed once per output: sum x_q (c - 1) = sum x_q c - sum x_q. No multiply on the weight side.
//
// Layout, per warp and mma (m16n8k32 fragments, g = lane / 4, t = lane % 4; PTX ISA "Matrix Fragments for
// mma.m16n8k32"): A row g / g + 8 are weight rows g / g + 8 of a 16-row group, B column g is token g (8 per n-tile).
// Lane (g, t) loads the 16-byte weight vector 4q + t of rows g and g + 8 (a "quad" q = 4 vectors = 256 inputs); word
// e of that vector, shifted by 2j and masked, holds the codes of inputs 64v + 16e + 4j + b (b = byte), and the same
// lane reads those 4 x_q bytes of token g from shared memory: A and B k-slots match by construction, so any
// assignment of inputs to k-slots is fine as long as both sides use it. Per quad and n-tile: 2 word pairs x 4 j = 8 mma.
//
// Work split: a block's 8 warps take (8 / ksplit) row groups at a time, ksplit warps per group splitting its quads
// (the host picks ksplit so small N still fills the GPU); partial sums meet in shared memory (integers: exact in any
// order). Weight tiles (U quads) are double-buffered across the warp's whole sequence, so the next group's first
// loads are in flight during a group's reduction and epilogue. Programmatic dependent launch as the M = 1 kernel: the
// first weight loads are issued before waiting for the previous grid.
#pragma once

#include <algorithm>
#include <cstdint>

#include <ATen/ops/empty.h>
#include <ATen/cuda/CUDAContext.h>

#include "gemv_common.cuh"
#include "token_quantize.cuh"

namespace {

using namespace bitengine_cuda;

constexpr int kGroupRows = 16;  // weight rows per mma tile (A's M)
constexpr int kMmaU = 2;        // quads per weight tile (2 x 2 x 16 bytes per lane in flight per tile)

// Shared-memory bytes of one token's x_q row: the row's 64-byte vectors rounded up to whole quads (zeros past K), plus
// one, so the row stride is an odd multiple of 64 bytes (see xq_offset).
__host__ __device__ inline int mma_row_bytes(int kw4) { return ((kw4 + 3) / 4 * 4 + 1) * 64; }

// Offset of chunk c (x_q word 4v + c, 16 bytes) of vector v in a token's row: chunks rotated by v, so the lanes t = 0..3
// of a quarter warp, reading chunk c of vectors 4q + t, hit four different 16-byte bank groups, and with the odd row
// stride (64 mod 128) its two tokens g, g + 1 the other four: B-fragment reads without bank conflicts.
__device__ __forceinline__ int xq_offset(int v, int c) { return v * 64 + 16 * ((c + v) & 3); }

__device__ __forceinline__ void mma_u8s8(int (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, int b0,
                                         int b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ int component(const int4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

// One token's row x[K] (or RMSNorm(x) * norm_w) quantized into its shared-memory row by one warp: the same steps and
// roundings as quantize_to_shared (bitengine.nn.RMSNorm, then quant.quantize_activations' per-row absmax, IEEE
// reciprocal, rint half-to-even, clamp), warp reductions instead of block ones. Each pass loads kChunk words per lane
// at once (meant as one memory round trip per chunk; against the first version's one word at a time it made no
// measurable difference end to end: gpu_e2e_mma_0109a1d vs gpu_e2e_mma_01f8479). x comes from L2 once and mostly from
// L1 after that. The prologue for M > kBlockTokens (see there); with fewer tokens most warps would wait.
template <typename T>
__device__ void quantize_token(const T* __restrict__ x, const T* __restrict__ norm_w, float eps, int K, int KW,
                               int kw4, char* row, float* a_out, int* xsum_out) {
  constexpr int kChunk = 8 / sizeof(T) > 0 ? 8 / sizeof(T) : 1;  // 4 words (32 registers) for 16-bit x, 2 for float
  const int lane = threadIdx.x & 31;
  const bool norm = norm_w != nullptr;
  float r = 0.f;
  // fn(wi, word) for words wi = lane, lane + 32, ... < limit (zeros at and past KW), loaded a chunk at a time;
  // with `normed`, each word as RMSNorm gives it (the factor r must be known)
  auto each_word = [&](int limit, bool normed, auto fn) {
    for (int w0 = lane; w0 < limit; w0 += 32 * kChunk) {
      XWord<T> v[kChunk], gw[kChunk];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const int wi = w0 + 32 * i;
        if (wi < KW) {
          v[i] = load_word(x, wi, K);
          if (normed) gw[i] = load_word(norm_w, wi, K);
        }
      }
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const int wi = w0 + 32 * i;
        if (wi < KW && normed) norm_word(gw[i], r, v[i]);
        if (wi < limit) fn(wi, v[i]);
      }
    }
  };
  if (norm) {
    float ss = 0.f;
    each_word(KW, false, [&](int, const XWord<T>& v) { ss = sum_squares(v, ss); });
    for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    r = rsqrtf(__fadd_rn(__fdiv_rn(ss, static_cast<float>(K)), eps));
  }
  float amax = 0.f;
  each_word(KW, norm, [&](int, const XWord<T>& v) { amax = abs_max(v, amax); });
  for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float a = __fmul_rn(__frcp_rn(fmaxf(amax, 1e-5f)), 127.f);  // as torch: 127 * (1 / amax)
  int sum = 0;
  each_word((kw4 + 3) / 4 * 16, norm, [&](int wi, const XWord<T>& v) {  // through the last quad: zeros past KW
    const int4 q = wi < KW ? pack_word(v, a, sum) : make_int4(0, 0, 0, 0);
    *reinterpret_cast<int4*>(row + xq_offset(wi >> 2, wi & 3)) = q;
  });
  for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) {
    *a_out = a;
    *xsum_out = sum;
  }
}

// Tokens the block-wide prologue takes in one pass (words kept in registers: 32 registers either way). The kernel
// runs it for M <= kBlockTokens and one warp per token (quantize_token) beyond: bench/results/
// gpu_kernels_mma_prologue_659d72c_NVIDIA_H200_2026-12-03 (block-wide for every M) against gpu_kernels_mma_01f8479_
// NVIDIA_H200_2026-12-02 (one warp per token; an earlier call, cuBLAS within 8% between the two), 7B shapes, us:
// M = 2 o 9.44 -> 6.84, gate/up 18.56 -> 17.04, down 20.47 -> 13.38; M = 8 down 28.60 -> 31.11, BitNet-2B qkv 9.20 ->
// 10.22, M = 16 all 3-23% slower (at M >= 8 every warp has a token of its own, and the block version adds barriers
// and passes).
// Even so the prologue is most of the kernel from 4 tokens on (bench/results/gpu_mma_breakdown_2fc551e_NVIDIA_H200_
// 2026-12-03: 7B down at M = 16 45.3 us, 11.8 without it), since every block quantizes all M tokens itself: now the
// tokens are quantized once in front (quantize_rows_kernel) and this prologue runs only as version 1.
template <typename T>
constexpr int kBlockTokens = sizeof(T) == 4 ? 2 : 4;

__device__ __forceinline__ void copy_async_16(char* shared, const char* global) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(global) : "memory");
}

// NT n-tiles of 8 tokens (M <= 8 * NT; NT = 4 needs all of an SM's shared memory for its 32 rows: one block per SM,
// and up to 255 registers). x: [M, K] rows, residual / y: [M, N] (y [M, N / 2] with a gating act).
template <typename T, int NT>
__global__ void __launch_bounds__(kThreads, NT > 2 ? 1 : 2) ternary_mma_kernel(
    const T* __restrict__ x, int M, const int* __restrict__ w, long long stride_w, const float* __restrict__ scale,
    int per_channel, const T* __restrict__ bias, const T* __restrict__ norm_w, float eps, const T* __restrict__ residual,
    T* __restrict__ y, int N, int K, int KW, int act, int ksplit, const char* __restrict__ xq_in,
    const float* __restrict__ a_in, const int* __restrict__ xsum_in) {
  extern __shared__ int4 smem[];
  char* xq = reinterpret_cast<char*>(smem);
  __shared__ float a_s[8 * NT];
  __shared__ int xsum_s[8 * NT];
  __shared__ int red[kWarps][4 * NT][32];  // partial sums of the ksplit warps of a row group
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int kw4 = KW / 4, quads = (kw4 + 3) / 4, rs = mma_row_bytes(kw4);
  const int slots = kWarps / ksplit, slot = warp / ksplit, part = warp % ksplit;
  const int groups = (N + kGroupRows - 1) / kGroupRows;
  const int per_round = gridDim.x * slots;
  const int rounds = (groups + per_round - 1) / per_round;
  const int my_quads = quads > part ? (quads - part + ksplit - 1) / ksplit : 0;
  const int tiles = ((quads + ksplit - 1) / ksplit + kMmaU - 1) / kMmaU;  // the same for every warp (barriers)
  auto group_of = [&](int round) { return round * per_round + blockIdx.x * slots + slot; };

  uint4 buf[2][kMmaU][2];
  auto load_tile = [&](uint4 (&b)[kMmaU][2], int round, int tile) {
    const int group = group_of(round);
    if (group >= groups) return;
    const int r0 = group * kGroupRows + g;
    const uint4* row0 = reinterpret_cast<const uint4*>(w + static_cast<long long>(min(r0, N - 1)) * stride_w);
    const uint4* row1 = reinterpret_cast<const uint4*>(w + static_cast<long long>(min(r0 + 8, N - 1)) * stride_w);
#pragma unroll
    for (int u = 0; u < kMmaU; ++u) {
      const int qi = tile * kMmaU + u, v = 4 * (part + qi * ksplit) + t;
      if (qi < my_quads && v < kw4) {
        b[u][0] = load_stream(row0 + v);
        b[u][1] = load_stream(row1 + v);
      } else {  // code 0 against x_q 0 (the row's zero padding): adds nothing
        b[u][0] = make_uint4(0, 0, 0, 0);
        b[u][1] = make_uint4(0, 0, 0, 0);
      }
    }
  };
  if (tiles > 0) load_tile(buf[0], 0, 0);
  wait_for_previous_grid();
  allow_next_grid();
  if (xq_in != nullptr) {  // rows quantized by quantize_rows_kernel: copied in, every copy in flight at once
    const int words = quads * 16;
    for (int i = threadIdx.x; i < M * words; i += kThreads) {
      const int m = i / words, wi = i - m * words;
      copy_async_16(xq + m * rs + xq_offset(wi >> 2, wi & 3), xq_in + m * mma_global_row_bytes(kw4) + 16 * wi);
    }
    if (threadIdx.x < M) {
      a_s[threadIdx.x] = __ldcg(a_in + threadIdx.x);
      xsum_s[threadIdx.x] = __ldcg(xsum_in + threadIdx.x);
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
  } else if (M <= kBlockTokens<T>) {  // block-uniform
    quantize_tokens<kBlockTokens<T>>(
        x, M, norm_w, eps, K, KW, kw4,
        [&](int m, int wi, int4 q) { *reinterpret_cast<int4*>(xq + m * rs + xq_offset(wi >> 2, wi & 3)) = q; },
        [&](int m, float av, int sum) {
          a_s[m] = av;
          xsum_s[m] = sum;
        });
  } else {
    for (int m = warp; m < M; m += kWarps)
      quantize_token(x + static_cast<long long>(m) * K, norm_w, eps, K, KW, kw4, xq + m * rs, &a_s[m], &xsum_s[m]);
  }
  __syncthreads();

  int acc[NT][4] = {};
  auto compute = [&](const uint4 (&b)[kMmaU][2], int round, int tile) {
    if (group_of(round) >= groups) return;
#pragma unroll
    for (int u = 0; u < kMmaU; ++u) {
      const int qi = tile * kMmaU + u;
      if (qi >= my_quads) break;  // warp-uniform
      const int v = 4 * (part + qi * ksplit) + t;
      const unsigned wg[4] = {b[u][0].x, b[u][0].y, b[u][0].z, b[u][0].w};
      const unsigned wh[4] = {b[u][1].x, b[u][1].y, b[u][1].z, b[u][1].w};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const char* xr = xq + (8 * nt + g) * rs;
        int4 xc[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) xc[e] = *reinterpret_cast<const int4*>(xr + xq_offset(v, e));
#pragma unroll
        for (int p = 0; p < 2; ++p)
#pragma unroll
          for (int j = 0; j < 4; ++j)
            mma_u8s8(acc[nt], (wg[2 * p] >> (2 * j)) & kLaneMask, (wh[2 * p] >> (2 * j)) & kLaneMask,
                     (wg[2 * p + 1] >> (2 * j)) & kLaneMask, (wh[2 * p + 1] >> (2 * j)) & kLaneMask,
                     component(xc[2 * p], j), component(xc[2 * p + 1], j));
      }
    }
  };
  // The row group's outputs: the ksplit warps' sums meet in shared memory (every warp reaches both barriers), then
  // its first warp writes them. Accumulator i of n-tile nt: row g (i < 2) or g + 8, token 8 nt + 2 t + (i & 1).
  auto finish = [&](int round) {
    const int group = group_of(round);
    if (ksplit > 1) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[warp][nt * 4 + i][lane] = acc[nt][i];
      __syncthreads();
      if (part == 0)
        for (int p = 1; p < ksplit; ++p)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[nt][i] += red[warp + p][nt * 4 + i][lane];
      __syncthreads();
    }
    if (part == 0 && group < groups) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = group * kGroupRows + g + (i >= 2 ? 8 : 0), m = 8 * nt + 2 * t + (i & 1);
          if (act == 0) {
            if (row < N && m < M)
              store_output(acc[nt][i], xsum_s[m], scale[per_channel ? row : 0], a_s[m], bias,
                           residual ? residual + static_cast<long long>(m) * N : nullptr,
                           y + static_cast<long long>(m) * N, row);
          } else {  // rows interleaved gate, up: the up row (g odd) sits in lane ^ 4
            const int up = __shfl_xor_sync(0xffffffffu, acc[nt][i], 4);
            if ((g & 1) == 0 && row < N && m < M)
              store_gated(acc[nt][i], up, xsum_s[m], scale[per_channel ? row : 0], scale[per_channel ? row + 1 : 0],
                          a_s[m], bias, y + static_cast<long long>(m) * (N / 2), row, act);
          }
        }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = 0;
  };
  int round = 0, tile = 0;
  auto step = [&](uint4 (&cur)[kMmaU][2], uint4 (&nxt)[kMmaU][2]) -> bool {
    if (round >= rounds) return false;
    int nround = round, ntile = tile + 1;
    if (ntile == tiles) {
      ntile = 0;
      ++nround;
    }
    if (nround < rounds) load_tile(nxt, nround, ntile);  // in flight during this tile (and the group's epilogue)
    compute(cur, round, tile);
    if (tile == tiles - 1) finish(round);
    round = nround;
    tile = ntile;
    return true;
  };
  while (step(buf[0], buf[1]) && step(buf[1], buf[0])) {
  }
}

// The rows of x given as x_q rows (quantize_rows_kernel's xq / a / xsum at this chunk's first token), or null: the
// kernel quantizes x itself.
struct QuantizedRows {
  const char* xq;
  const float* a;
  const int* xsum;
};

template <typename T, int NT>
cudaError_t launch_mma_chunk(const T* x, int M, const at::Tensor& w, const at::Tensor& scale, const T* residual,
                             const Extras<T>& e, T* y, int K, bool pdl, const QuantizedRows& rows) {
  const int N = w.size(0), KW = w.size(1), kw4 = KW / 4, quads = (kw4 + 3) / 4;
  auto kernel = ternary_mma_kernel<T, NT>;
  const size_t smem = static_cast<size_t>(8 * NT) * mma_row_bytes(kw4);
  cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
  if (err != cudaSuccess) return err;
  const int slots_total = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * std::max(per_sm, 1);
  const int groups = (N + kGroupRows - 1) / kGroupRows;
  // warps per row group: enough groups x warps to give every warp slot of the GPU work, at most one quad per warp
  int ksplit = 1;
  while (ksplit < kWarps && groups * ksplit < slots_total * kWarps && quads >= 2 * ksplit) ksplit *= 2;
  const int slots = kWarps / ksplit;
  const int blocks_needed = (groups + slots - 1) / slots;
  const int rounds = (blocks_needed + slots_total - 1) / slots_total;
  const int grid = std::max(1, (blocks_needed + rounds - 1) / rounds);  // every block the same number of rounds
  return launch_kernel(kernel, grid, smem, pdl, x, M, static_cast<const int*>(w.data_ptr<int>()),
                       static_cast<long long>(w.stride(0)), static_cast<const float*>(scale.data_ptr<float>()),
                       scale.numel() > 1 ? 1 : 0, e.bias, e.norm_w, e.eps, residual, y, N, K, KW, e.act, ksplit,
                       rows.xq, rows.a, rows.xsum);
}

// Tokens per launch: 32 where their x_q rows fit in shared memory next to the static arrays (only with the rows
// quantized in front: 32 rows quantized in every block, one block per SM, was not tried), else 16 where they fit, else
// 8 (the host wrapper checks that 8 fit); larger M runs as several launches over chunks of tokens, each reading the
// weights once.
inline int mma_chunk_tokens(int KW, bool in_front) {
  const long long row = mma_row_bytes(KW / 4);
  if (in_front && 32 * row + 20 * 1024 <= 227L * 1024) return 32;
  return 16 * row + 16 * 1024 <= 227L * 1024 ? 16 : 8;
}

// From how many tokens the rows are quantized once in front (quantize_rows_kernel) rather than in every block:
// bench/results/gpu_kernels_mma_front_3e90439_NVIDIA_H200_2026-12-03 (cuda_a8 in front, cuda_a8_inblock in every
// block; us): M = 2 7B o 7.06 / 6.92, gate/up 16.22 / 16.58, down 11.61 / 13.97, BitNet-2B qkv 5.84 / 6.25; M = 16
// o 11.62 / 19.68, gate/up 23.70 / 33.02, down 21.29 / 44.70.
constexpr int kQuantizeInFrontFromM = 2;

// version 1: every block quantizes its tokens itself (the kernel before quantize_rows_kernel; for comparison), else
// from kQuantizeInFrontFromM tokens on the rows are quantized once in front, and every launch copies them in.
template <typename T>
cudaError_t launch_mma(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const Extras<T>& e,
                       at::Tensor& y, int K, int version, bool pdl) {
  const int M = x.size(0), N = w.size(0), KW = w.size(1), n_out = e.act ? N / 2 : N;
  const bool in_front = version != 1 && M >= kQuantizeInFrontFromM;
  const int chunk = mma_chunk_tokens(KW, in_front);
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  T* yp = reinterpret_cast<T*>(y.data_ptr());
  at::Tensor quantized;  // x_q rows, then a[M], then xsum[M]; freed (stream-ordered) when the launches are queued
  QuantizedRows rows{nullptr, nullptr, nullptr};
  const long long row_bytes = mma_global_row_bytes(KW / 4);
  if (in_front) {
    quantized = at::empty({M * row_bytes + 8LL * M}, x.options().dtype(at::kByte));
    char* base = reinterpret_cast<char*>(quantized.data_ptr());
    float* a = reinterpret_cast<float*>(base + M * row_bytes);
    int* xsum = reinterpret_cast<int*>(a + M);
    rows = {base, a, xsum};
    const cudaError_t err = launch_kernel(quantize_rows_kernel<T>, M, 0, pdl, xp, e.norm_w, e.eps, K, KW, base, a, xsum);
    if (err != cudaSuccess) return err;
  }
  for (int m0 = 0; m0 < M; m0 += chunk) {
    const int mc = std::min(chunk, M - m0);
    const T* res = e.residual ? e.residual + static_cast<long long>(m0) * N : nullptr;
    const T* xc = xp + static_cast<long long>(m0) * K;
    T* yc = yp + static_cast<long long>(m0) * n_out;
    const QuantizedRows rc = rows.xq ? QuantizedRows{rows.xq + m0 * row_bytes, rows.a + m0, rows.xsum + m0} : rows;
    const cudaError_t err = mc <= 8    ? launch_mma_chunk<T, 1>(xc, mc, w, scale, res, e, yc, K, pdl, rc)
                            : mc <= 16 ? launch_mma_chunk<T, 2>(xc, mc, w, scale, res, e, yc, K, pdl, rc)
                                       : launch_mma_chunk<T, 4>(xc, mc, w, scale, res, e, yc, K, pdl, rc);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace
