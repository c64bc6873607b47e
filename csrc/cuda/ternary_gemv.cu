// W1.58A8 decode GEMV (M = 1) in CUDA C++: y[N] = s * (x_q . W_q[n]) / a (+ bias).
//
// Weights: i2w layout (bitengine/kernels/layout.py): int32 [N, KW], KW % 16 == 0, 16 weights per
// word, weight 16w + 4j + b at bits 8b + 2j, code = w + 1. So (word >> 2j) & 0x03030303 holds the
// codes of 4 consecutive weights as bytes, and one dp4a against 4 int8 activations sums x_q * code.
// The code offset is removed once: sum x_q (c - 1) = sum x_q c - sum x_q.
//
// One persistent launch does everything (no separate quantization kernel):
//   0. each warp issues the loads of its first weight rows;
//   1. every block quantizes x (per-token absmax, exactly quant.quantize_activations: IEEE reciprocal,
//      rint half-to-even, clamp) into shared memory, with sum(x_q); x is read once, with 16-byte
//      loads all in flight together, and kept in registers between the two passes;
//   2. each warp streams R weight rows with 16-byte non-caching loads, U of them in flight per row,
//      and reduces with shuffles; blocks stride over row groups.
// x_q words sit in shared memory permuted so that lane l's four words of a 16-byte weight load are
// read conflict-free (see xq_slot).

#include <ATen/cuda/CUDAContext.h>
#include <algorithm>
#include <cstdint>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr unsigned kLaneMask = 0x03030303u;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// Activation word wi (16 int8 values) lives at slot: chunk of 128 words, then (wi % 4) * 32 + (wi / 4) % 32,
// so the 32 lanes reading word 4*l + e of one chunk hit 32 consecutive 16-byte slots.
__device__ __forceinline__ int xq_slot(int wi) { return (wi >> 7) * 128 + (wi & 3) * 32 + ((wi >> 2) & 31); }

// Programmatic dependent launch (Hopper+): the kernel may start while the kernel before it in the stream is
// still finishing; it issues its first weight loads (weights never depend on earlier kernels), then waits
// for the previous grid (griddepcontrol.wait) before reading x, and lets the next kernel launch right after
// (that kernel waits for this grid's completion before reading y). Both instructions are no-ops when the
// launch did not ask for it.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ int dot_word(unsigned w, int4 x, int acc) {
  acc = __dp4a(static_cast<int>(w & kLaneMask), x.x, acc);
  acc = __dp4a(static_cast<int>((w >> 2) & kLaneMask), x.y, acc);
  acc = __dp4a(static_cast<int>((w >> 4) & kLaneMask), x.z, acc);
  acc = __dp4a(static_cast<int>((w >> 6) & kLaneMask), x.w, acc);
  return acc;
}

// The 16 activations of word wi as floats (zeros past K): 16-byte vector loads for whole words
// (a row starts 16-byte aligned and a word is 32 or 64 bytes), bounds-checked scalars for the tail.
template <typename T>
__device__ __forceinline__ void load_word(const T* __restrict__ x, int wi, int K, float (&v)[16]) {
  const int k0 = wi * 16;
  if (k0 + 16 <= K) {
    constexpr int kPerVec = 16 / sizeof(T);
    const uint4* p = reinterpret_cast<const uint4*>(x + k0);
#pragma unroll
    for (int i = 0; i < 16 / kPerVec; ++i) {
      const uint4 raw = __ldg(p + i);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < kPerVec; ++j) v[i * kPerVec + j] = to_float(e[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 16; ++j) v[j] = k0 + j < K ? to_float(x[k0 + j]) : 0.f;
  }
}

__device__ __forceinline__ int4 pack_word(const float (&v)[16], float a, int& sum) {
  int packed[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    unsigned word = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int q = static_cast<int>(fminf(fmaxf(rintf(__fmul_rn(v[j * 4 + b], a)), -128.f), 127.f));
      sum += q;
      word |= (static_cast<unsigned>(q) & 0xffu) << (8 * b);
    }
    packed[j] = static_cast<int>(word);
  }
  return make_int4(packed[0], packed[1], packed[2], packed[3]);
}

// Words of x each thread keeps in registers between the absmax and the quantization (version 1: K <= 16384;
// version 2 keeps 1, K <= 4096); words beyond that are loaded twice (from L2).
constexpr int kRegWords = 4;

template <typename T, int RegWords = kRegWords>
__device__ void quantize_to_shared(const T* __restrict__ x, int K, int KW, int4* xq, float* a_out, int* xsum_out) {
  __shared__ float red_f[kWarps];
  __shared__ int red_i[kWarps];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float v[RegWords][16];
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < RegWords; ++i) {  // all loads issued before any use
    const int wi = tid + i * kThreads;
    if (wi < KW) {
      load_word(x, wi, K, v[i]);
    } else {
#pragma unroll
      for (int j = 0; j < 16; ++j) v[i][j] = 0.f;
    }
  }
#pragma unroll
  for (int i = 0; i < RegWords; ++i)
#pragma unroll
    for (int j = 0; j < 16; ++j) amax = fmaxf(amax, fabsf(v[i][j]));
  for (int wi = tid + RegWords * kThreads; wi < KW; wi += kThreads) {
    float t[16];
    load_word(x, wi, K, t);
#pragma unroll
    for (int j = 0; j < 16; ++j) amax = fmaxf(amax, fabsf(t[j]));
  }
  for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (lane == 0) red_f[warp] = amax;
  __syncthreads();
  amax = red_f[0];
#pragma unroll
  for (int i = 1; i < kWarps; ++i) amax = fmaxf(amax, red_f[i]);
  const float a = __fmul_rn(__frcp_rn(fmaxf(amax, 1e-5f)), 127.f);  // as torch: 127 * (1 / amax)
  int sum = 0;
#pragma unroll
  for (int i = 0; i < RegWords; ++i) {
    const int wi = tid + i * kThreads;
    if (wi < KW) xq[xq_slot(wi)] = pack_word(v[i], a, sum);
  }
  for (int wi = tid + RegWords * kThreads; wi < KW; wi += kThreads) {
    float t[16];
    load_word(x, wi, K, t);
    xq[xq_slot(wi)] = pack_word(t, a, sum);
  }
  for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) red_i[warp] = sum;
  __syncthreads();
  if (tid == 0) {
    int total = 0;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) total += red_i[i];
    *xsum_out = total;
    *a_out = a;
  }
  __syncthreads();
}

// R rows per warp, U 16-byte loads per row in flight per lane. The first row group's loads are issued
// before the activation quantization, so its latency overlaps the weight stream.
template <typename T, int R, int U>
__global__ void __launch_bounds__(kThreads) ternary_gemv_a8_kernel(
    const T* __restrict__ x, const int* __restrict__ w, long long stride_w, const float* __restrict__ scale,
    int per_channel, const T* __restrict__ bias, T* __restrict__ y, int N, int K, int KW) {
  extern __shared__ int4 xq[];
  __shared__ float a_s;
  __shared__ int xsum_s;
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
  quantize_to_shared(x, K, KW, xq, &a_s, &xsum_s);
  const float a = a_s;
  const int xsum = xsum_s;
  for (; row0 < N; row0 += row_step) {
    int acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0;
    for (int v0 = lane; v0 < kw4; v0 += 32 * U) {
      if (v0 != lane) load_rows(row0, v0);  // the first step's loads were issued earlier
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int v = v0 + 32 * u;
        if (v < kw4) {
          const int4 x0 = xq[xq_slot(4 * v)], x1 = xq[xq_slot(4 * v + 1)];
          const int4 x2 = xq[xq_slot(4 * v + 2)], x3 = xq[xq_slot(4 * v + 3)];
#pragma unroll
          for (int r = 0; r < R; ++r) {
            acc[r] = dot_word(wv[u][r].x, x0, acc[r]);
            acc[r] = dot_word(wv[u][r].y, x1, acc[r]);
            acc[r] = dot_word(wv[u][r].z, x2, acc[r]);
            acc[r] = dot_word(wv[u][r].w, x3, acc[r]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      int s = acc[r];
      for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      const int n = row0 + r;
      if (lane == 0 && n < N) {
        const float sc = scale[per_channel ? n : 0];
        float out = __fdiv_rn(__fmul_rn(static_cast<float>(s - xsum), sc), a);
        if (bias) out = __fadd_rn(out, to_float(bias[n]));
        y[n] = from_float<T>(out);
      }
    }
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
    int per_channel, const T* __restrict__ bias, T* __restrict__ y, int N, int K, int KW) {
  extern __shared__ int4 xq[];
  __shared__ float a_s;
  __shared__ int xsum_s;
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
  quantize_to_shared<T, 1>(x, K, KW, xq, &a_s, &xsum_s);  // x words in registers: 1 per thread (register cap)
  const float a = a_s;
  const int xsum = xsum_s;
  int acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0;
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
      if (v < kw4) {
        const int4 x0 = xq[xq_slot(4 * v)], x1 = xq[xq_slot(4 * v + 1)];
        const int4 x2 = xq[xq_slot(4 * v + 2)], x3 = xq[xq_slot(4 * v + 3)];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          acc[r] = dot_word(cur[u][r].x, x0, acc[r]);
          acc[r] = dot_word(cur[u][r].y, x1, acc[r]);
          acc[r] = dot_word(cur[u][r].z, x2, acc[r]);
          acc[r] = dot_word(cur[u][r].w, x3, acc[r]);
        }
      }
    }
    if (chunk == chunks - 1) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        int s = acc[r];
        for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        acc[r] = 0;
        const int n = row0 + r;
        if (lane == 0 && n < N) {
          const float sc = scale[per_channel ? n : 0];
          float out = __fdiv_rn(__fmul_rn(static_cast<float>(s - xsum), sc), a);
          if (bias) out = __fadd_rn(out, to_float(bias[n]));
          y[n] = from_float<T>(out);
        }
      }
    }
    row0 = nrow;
    chunk = nchunk;
    return true;
  };
  while (step(buf[0], buf[1]) && step(buf[1], buf[0])) {
  }
}

// One launcher for both versions. The grid is persistent (at most the blocks that fit at once); `balanced`
// (version 2) sizes it so every block gets the same number of row groups instead of filling every slot.
template <typename T, typename Kernel>
void launch_gemv(Kernel kernel, int rows_per_block, bool balanced, const torch::Tensor& x, const torch::Tensor& w,
                 const torch::Tensor& scale, const T* bias, torch::Tensor& y, int K, bool pdl) {
  const int N = w.size(0), KW = w.size(1);
  const size_t smem = static_cast<size_t>((KW + 127) / 128) * 128 * sizeof(int4);
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int row_groups = (N + rows_per_block - 1) / rows_per_block;
  const int slots = prop->multiProcessorCount * std::max(per_sm, 1);
  int grid = std::max(1, std::min(row_groups, slots));
  if (balanced) {
    const int rounds = (row_groups + slots - 1) / slots;  // row groups per block
    grid = std::max(1, (row_groups + rounds - 1) / rounds);
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = at::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl && prop->major >= 9 ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, reinterpret_cast<const T*>(x.data_ptr()),
                                    static_cast<const int*>(w.data_ptr<int>()), static_cast<long long>(w.stride(0)),
                                    static_cast<const float*>(scale.data_ptr<float>()), scale.numel() > 1 ? 1 : 0, bias,
                                    reinterpret_cast<T*>(y.data_ptr()), N, K, KW));
}

template <typename T, int R, int U>
void launch(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale, const T* bias,
            torch::Tensor& y, int K, bool pdl) {
  launch_gemv<T>(ternary_gemv_a8_kernel<T, R, U>, kWarps * R, false, x, w, scale, bias, y, K, pdl);
}

template <typename T, int R, int U>
void launch_v2(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale, const T* bias,
               torch::Tensor& y, int K, bool pdl) {
  launch_gemv<T>(ternary_gemv_a8_v2_kernel<T, R, U>, kWarps * R, true, x, w, scale, bias, y, K, pdl);
}

template <typename T>
void dispatch_rows(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale, const T* bias,
                   torch::Tensor& y, int K, int rows_per_warp, bool pdl) {
  if (rows_per_warp == 0) {  // auto: version 2 up to K = 4096, version 1 beyond
    // bench/results/gpu_kernels_NVIDIA_H200_2026-11-28 (cuda_a8 = version 2, cuda_a8_v1): version 2 is 2-20%
    // faster up to K = 4096 (one K chunk per row, x held in registers) and 2-22% slower on longer rows
    // (K = 6912 .. 14336: x read twice, and two K chunks per row above K = 8192), where version 1 keeps x in registers.
    const int kw4 = static_cast<int>(w.size(1)) / 4;
    if (kw4 <= 32) launch_v2<T, 4, 1>(x, w, scale, bias, y, K, pdl);
    else if (kw4 <= 64) launch_v2<T, 2, 2>(x, w, scale, bias, y, K, pdl);
    else if (w.size(0) <= 8192) launch<T, 1, 8>(x, w, scale, bias, y, K, pdl);
    else launch<T, 2, 4>(x, w, scale, bias, y, K, pdl);
    return;
  }
  switch (rows_per_warp) {
    case 1: launch<T, 1, 8>(x, w, scale, bias, y, K, pdl); break;
    case 2: launch<T, 2, 4>(x, w, scale, bias, y, K, pdl); break;
    default: launch<T, 4, 2>(x, w, scale, bias, y, K, pdl); break;
  }
}

}  // namespace

// x: float16/bfloat16/float32 [1, K] (or [K]) contiguous; w: int32 [N, KW] i2w, KW % 16 == 0, KW * 16 >= K;
// scale: float32 [1] or [N] (multiplies); bias: [N] in x's dtype or None; rows_per_warp: 0 (auto: version 2,
// pipelined tiles shaped by K, up to K = 4096; version 1 beyond) or 1, 2, 4 (version 1 with that many rows per warp);
// pdl: launch as a programmatic dependent launch on sm_90+ (see wait_for_previous_grid).
// Returns y [1, N] in x's dtype.
torch::Tensor ternary_gemv_a8_cuda(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t in_features,
                                   c10::optional<torch::Tensor> bias, int64_t rows_per_warp, bool pdl) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda() && scale.is_cuda(), "ternary_gemv_a8_cuda: tensors must be on CUDA");
  TORCH_CHECK(x.numel() == in_features && x.is_contiguous(), "x must be a contiguous [1, ", in_features,
              "] tensor, got ", x.sizes());
  TORCH_CHECK(w.scalar_type() == at::kInt && w.dim() == 2 && w.stride(1) == 1 && w.size(1) % 16 == 0 &&
                  w.size(1) * 16 >= in_features && w.stride(0) % 4 == 0,
              "w must be i2w int32 [N, KW] with KW % 16 == 0, got ", w.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && (scale.numel() == 1 || scale.numel() == w.size(0)),
              "scale must be float32 [1] or [N], got ", scale.sizes());
  const int64_t smem = (w.size(1) + 127) / 128 * 128 * 16;
  TORCH_CHECK(smem <= 200 * 1024, "in_features ", in_features, " too large for the CUDA GEMV");
  c10::cuda::CUDAGuard guard(x.device());
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16) x = x.clone();  // the kernel reads x with 16-byte loads
  auto y = torch::empty({1, w.size(0)}, x.options());
  if (bias) TORCH_CHECK(bias->numel() == w.size(0) && bias->scalar_type() == x.scalar_type(), "bias must be [N] in x's dtype");
  const int K = static_cast<int>(in_features);
  switch (x.scalar_type()) {
    case at::kHalf:
      dispatch_rows<__half>(x, w, scale, bias ? reinterpret_cast<const __half*>(bias->data_ptr()) : nullptr, y, K,
                            rows_per_warp, pdl);
      break;
    case at::kBFloat16:
      dispatch_rows<__nv_bfloat16>(x, w, scale,
                                   bias ? reinterpret_cast<const __nv_bfloat16*>(bias->data_ptr()) : nullptr, y, K,
                                   rows_per_warp, pdl);
      break;
    case at::kFloat:
      dispatch_rows<float>(x, w, scale, bias ? bias->data_ptr<float>() : nullptr, y, K, rows_per_warp, pdl);
      break;
    default:
      TORCH_CHECK(false, "ternary_gemv_a8_cuda: unsupported dtype ", x.scalar_type());
  }
  return y;
}
