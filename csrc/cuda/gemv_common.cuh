// Helpers of the CUDA decode kernels (the GEMV, ternary_gemv_kernels.cuh; the tensor-core kernel for a few tokens,
// ternary_mma_kernels.cuh; read_probe.cu uses the streaming load): dtype conversion, streaming loads, programmatic
// dependent launch, the dp4a word dot product, the fused int8 quantization of x, the epilogues, and (host side) the
// per-call inputs and the shared-memory opt-in.
#pragma once

#include <cstdint>

#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace bitengine_cuda {

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

// dp4a of unsigned bytes a (codes, possibly shifted up in their byte) with signed bytes b (x_q).
__device__ __forceinline__ int dp4a_us(unsigned a, int b, int c) {
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// The dot product of one row's codes with x_q, in four partial sums: weight j of each byte (bits 2j, 2j + 1) is
// masked in place, not shifted down, so its products come out times 4^j and go to their own sum, scaled back
// once at the end (exactly: each sum is a multiple of 4^j). One AND and one dp4a per 4 weights, instead of a
// shift, an AND and a dp4a (the integer pipe was the busiest in ncu).
struct DotAcc {
  int s[4] = {0, 0, 0, 0};
  __device__ __forceinline__ void add(unsigned w, int4 x) {
    s[0] = dp4a_us(w & kLaneMask, x.x, s[0]);
    s[1] = dp4a_us(w & (kLaneMask << 2), x.y, s[1]);
    s[2] = dp4a_us(w & (kLaneMask << 4), x.z, s[2]);
    s[3] = dp4a_us(w & (kLaneMask << 6), x.w, s[3]);
  }
  __device__ __forceinline__ int total() const { return s[0] + (s[1] >> 2) + (s[2] >> 4) + (s[3] >> 6); }
};

// The optional per-call inputs, in x's dtype (null when absent): bias [N], the input RMSNorm's weight [K] (and eps),
// the residual [M, N] added to the output; act: 0, or the gating of an interleaved gate/up layer (store_gated: 1 SiLU,
// 2 squared ReLU; y has N / 2 outputs).
template <typename T>
struct Extras {
  const T* bias;
  const T* norm_w;
  float eps;
  const T* residual;
  int act;
};

// Launch `kernel` on the current stream with kThreads threads per block, as a programmatic dependent launch (see
// wait_for_previous_grid) where `pdl` asks for it and the GPU has it (sm_90+).
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), int grid, size_t smem, bool pdl, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = at::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl && at::cuda::getCurrentDeviceProperties()->major >= 9 ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

// Opt `kernel` in to `dynamic` bytes of dynamic shared memory where its static arrays plus those pass the 48 KB a
// launch gets without opting in (a launch over that fails with "invalid argument"; the opt-in is per kernel, so a
// check on the dynamic size alone passed whenever an earlier call with a larger K had opted in: flaky).
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, size_t dynamic) {
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess || attr.sharedSizeBytes + dynamic <= 48 * 1024) return err;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dynamic));
}

// R rows' 16-byte weight vectors w[r] at vector index v (64 weights each) against the 4 x_q words there.
template <int R>
__device__ __forceinline__ void accumulate_vector(DotAcc (&acc)[R], const uint4 (&w)[R], const int4* xq, int v) {
  const int4 x0 = xq[xq_slot(4 * v)], x1 = xq[xq_slot(4 * v + 1)];
  const int4 x2 = xq[xq_slot(4 * v + 2)], x3 = xq[xq_slot(4 * v + 3)];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    acc[r].add(w[r].x, x0);
    acc[r].add(w[r].y, x1);
    acc[r].add(w[r].z, x2);
    acc[r].add(w[r].w, x3);
  }
}

// One word of x: its 16 values in x's own type, packed (8 registers for 16-bit types), so the prologue holds x
// between its passes at half the registers of floats.
template <typename T>
struct XWord {
  uint4 raw[sizeof(T)];
  __device__ __forceinline__ float get(int j) const { return to_float(reinterpret_cast<const T*>(raw)[j]); }
  __device__ __forceinline__ void set(int j, float v) { reinterpret_cast<T*>(raw)[j] = from_float<T>(v); }
};

// Word wi of x (zeros past K): 16-byte vector loads for whole words (a row starts 16-byte aligned and a word is
// 32 or 64 bytes), bounds-checked scalars for the tail.
template <typename T>
__device__ __forceinline__ XWord<T> load_word(const T* __restrict__ x, int wi, int K) {
  XWord<T> w;
  const int k0 = wi * 16;
  if (k0 + 16 <= K) {
    const uint4* p = reinterpret_cast<const uint4*>(x + k0);
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(T)); ++i) w.raw[i] = __ldg(p + i);
  } else {
#pragma unroll
    for (int j = 0; j < 16; ++j) w.set(j, k0 + j < K ? to_float(x[k0 + j]) : 0.f);
  }
  return w;
}

// clamp(rint(v * a), -128, 127) as an int, on the FMA and integer pipes: the clamp first (the same result: rint is
// monotone and the bounds are integers; a NaN product gives -128 either way, as fmaxf returns the other operand),
// then round half to even by adding 1.5 * 2^23 (exact for |c| < 2^22: the sum's unit in the last place is 1) and
// reading the integer off the float's low bits. rintf + the float-to-int conversion (FRND + F2I) ran on the
// conversion pipe, 16 results per clock per SM (an eighth of the float pipe's rate), and every block of the GEMV
// quantizes all of x: with 2-4 blocks per SM that pipe, not memory, set the prologue's length (bench/GPU_LOG.md,
// ninth part).
__device__ __forceinline__ int quantize_value(float v, float a) {
  const float c = fminf(fmaxf(__fmul_rn(v, a), -128.f), 127.f);
  return __float_as_int(__fadd_rn(c, 12582912.f)) - 0x4B400000;
}

template <typename T>
__device__ __forceinline__ int4 pack_word(const XWord<T>& v, float a, int& sum) {
  int packed[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    unsigned word = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int q = quantize_value(v.get(j * 4 + b), a);
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

template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// Pairs of 16-bit values, for the prologue's packed arithmetic.
template <typename T> struct Pair;
template <> struct Pair<__half> {
  using type = __half2;
  static __device__ __forceinline__ float2 to_float2(type v) { return __half22float2(v); }
  static __device__ __forceinline__ type from_float2(float a, float b) { return __floats2half2_rn(a, b); }
};
template <> struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(type v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ type from_float2(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

// The optional input RMSNorm, as bitengine.nn.RMSNorm computes it: n = T(x * rsqrt(mean(x^2) + eps)) in float32,
// then T(weight * n) (a float32 x and weight round nowhere, as F.rms_norm). The result is a T again: it replaces
// the word in place. For 16-bit T in pairs: two roundings per instruction, and T(weight * n) as one 16-bit multiply
// (the float32 product of two 16-bit values is exact, so rounding it once is the 16-bit multiply's own rounding).
template <typename T>
__device__ __forceinline__ void norm_word(const XWord<T>& g, float r, XWord<T>& v) {
  if constexpr (sizeof(T) == 2) {
    using P = Pair<T>;
    auto* pv = reinterpret_cast<typename P::type*>(v.raw);
    const auto* pg = reinterpret_cast<const typename P::type*>(g.raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float2 f = P::to_float2(pv[i]);
      pv[i] = __hmul2(pg[i], P::from_float2(__fmul_rn(f.x, r), __fmul_rn(f.y, r)));
    }
  } else {
#pragma unroll
    for (int j = 0; j < 16; ++j) v.set(j, __fmul_rn(g.get(j), round_to<T>(__fmul_rn(v.get(j), r))));
  }
}

// The sum of v over the block, in every thread. One barrier: `red` (kWarps floats) must not be written again in this
// launch (quantize_to_shared gives each of its reductions its own array, so no second barrier guards a reuse).
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < kWarps; ++i) total += red[i];
  return total;
}

template <typename T>
__device__ __forceinline__ float sum_squares(const XWord<T>& v, float acc) {
#pragma unroll
  for (int j = 0; j < 16; ++j) acc = __fmaf_rn(v.get(j), v.get(j), acc);
  return acc;
}

// max(acc, max |v|); for 16-bit T on pairs (abs and max are exact in any precision; __hmax2 returns the other
// operand for a NaN, as fmaxf does), converted once.
template <typename T>
__device__ __forceinline__ float abs_max(const XWord<T>& v, float acc) {
  if constexpr (sizeof(T) == 2) {
    const auto* p = reinterpret_cast<const typename Pair<T>::type*>(v.raw);
    auto m = __habs2(p[0]);
#pragma unroll
    for (int i = 1; i < 8; ++i) m = __hmax2(m, __habs2(p[i]));
    const float2 f = Pair<T>::to_float2(m);
    return fmaxf(acc, fmaxf(f.x, f.y));
  } else {
#pragma unroll
    for (int j = 0; j < 16; ++j) acc = fmaxf(acc, fabsf(v.get(j)));
    return acc;
  }
}

// Where quantize_to_shared puts x_q word wi: xq_slot by default (the ternary GEMV's permutation); the int4 head's
// GEMV passes its own (int4_gemv.cu).
struct XqSlot {
  __device__ __forceinline__ int operator()(int wi) const { return xq_slot(wi); }
};

// x (or RMSNorm(x) * norm_w when norm_w is given) quantized to int8 into shared memory, exactly as
// quant.quantize_activations does on those values; a_out the scale, xsum_out sum(x_q), both in every thread.
// Three block reductions (sum of squares, absmax, sum of x_q), one barrier each: each has its own shared array, and
// the last one's barrier is also the one that makes xq visible to the block (these barriers sit on the prologue's
// critical path, between the x loads and the first dot products).
template <typename T, int RegWords = kRegWords, typename Slot = XqSlot>
__device__ void quantize_to_shared(const T* __restrict__ x, const T* __restrict__ norm_w, float eps, int K, int KW,
                                   int4* xq, float& a_out, int& xsum_out, Slot slot = Slot()) {
  __shared__ float red_ss[kWarps], red_max[kWarps];
  __shared__ int red_i[kWarps];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  XWord<T> v[RegWords];
#pragma unroll
  for (int i = 0; i < RegWords; ++i) {  // all loads issued before any use
    const int wi = tid + i * kThreads;
    if (wi < KW) {
      v[i] = load_word(x, wi, K);
    } else {
#pragma unroll
      for (int j = 0; j < static_cast<int>(sizeof(T)); ++j) v[i].raw[j] = make_uint4(0, 0, 0, 0);
    }
  }
  // the norm weight's first word is loaded with x, so the norm does not wait for it after the reduction
  XWord<T> g0;
  if (norm_w != nullptr && tid < KW) g0 = load_word(norm_w, tid, K);
  float r = 0.f;  // the RMSNorm factor
  if (norm_w != nullptr) {
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < RegWords; ++i) ss = sum_squares(v[i], ss);
    for (int wi = tid + RegWords * kThreads; wi < KW; wi += kThreads) ss = sum_squares(load_word(x, wi, K), ss);
    ss = block_sum(ss, red_ss);
    r = rsqrtf(__fadd_rn(__fdiv_rn(ss, static_cast<float>(K)), eps));
#pragma unroll
    for (int i = 0; i < RegWords; ++i)
      if (tid + i * kThreads < KW) norm_word(i == 0 ? g0 : load_word(norm_w, tid + i * kThreads, K), r, v[i]);
  }
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < RegWords; ++i) amax = abs_max(v[i], amax);
  for (int wi = tid + RegWords * kThreads; wi < KW; wi += kThreads) {
    XWord<T> t = load_word(x, wi, K);
    if (norm_w != nullptr) norm_word(load_word(norm_w, wi, K), r, t);
    amax = abs_max(t, amax);
  }
  for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (lane == 0) red_max[warp] = amax;
  __syncthreads();
  amax = red_max[0];
#pragma unroll
  for (int i = 1; i < kWarps; ++i) amax = fmaxf(amax, red_max[i]);
  const float a = __fmul_rn(__frcp_rn(fmaxf(amax, 1e-5f)), 127.f);  // as torch: 127 * (1 / amax)
  int sum = 0;
#pragma unroll
  for (int i = 0; i < RegWords; ++i) {
    const int wi = tid + i * kThreads;
    if (wi < KW) xq[slot(wi)] = pack_word(v[i], a, sum);
  }
  for (int wi = tid + RegWords * kThreads; wi < KW; wi += kThreads) {
    XWord<T> t = load_word(x, wi, K);
    if (norm_w != nullptr) norm_word(load_word(norm_w, wi, K), r, t);
    xq[slot(wi)] = pack_word(t, a, sum);
  }
  for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) red_i[warp] = sum;
  __syncthreads();  // also publishes xq
  int total = 0;
#pragma unroll
  for (int i = 0; i < kWarps; ++i) total += red_i[i];
  xsum_out = total;
  a_out = a;
}

// One output: s * (dot - sum x_q) / a (+ bias), rounded to T, (+ residual, rounded again: as y + residual in torch).
template <typename T>
__device__ __forceinline__ void store_output(int dot, int xsum, float sc, float a, const T* __restrict__ bias,
                                             const T* __restrict__ residual, T* __restrict__ y, int n) {
  float out = __fdiv_rn(__fmul_rn(static_cast<float>(dot - xsum), sc), a);
  if (bias) out = __fadd_rn(out, to_float(bias[n]));
  if (residual) out = __fadd_rn(round_to<T>(out), to_float(residual[n]));
  y[n] = from_float<T>(out);
}

// The MLP's gating in the gate/up GEMV's epilogue (act 1: SiLU, 2: squared ReLU), for rows n (gate) and n + 1 (up)
// of the interleaved fused layer (bitengine/fuse.py): y[n / 2] = act(g) * u, each step rounded to T as the eager
// model does it (g and u are the layer's T outputs, F.silu(g) / F.relu(g).square() a T, times u a T). SiLU as ATen's
// kernel, g / (1 + exp(-g)) in float, but exp here is the fast-math one (its error grows with |g|): 16-bit outputs at
// most one step of T from torch's, float32 ones within ~1e-5 (tests/test_gpu_kernels.py test_cuda_gemv_gated).
template <typename T>
__device__ __forceinline__ void store_gated(int dot_g, int dot_u, int xsum, float sc_g, float sc_u, float a,
                                            const T* __restrict__ bias, T* __restrict__ y, int n, int act) {
  float g = __fdiv_rn(__fmul_rn(static_cast<float>(dot_g - xsum), sc_g), a);
  float u = __fdiv_rn(__fmul_rn(static_cast<float>(dot_u - xsum), sc_u), a);
  if (bias) {
    g = __fadd_rn(g, to_float(bias[n]));
    u = __fadd_rn(u, to_float(bias[n + 1]));
  }
  g = round_to<T>(g);
  u = round_to<T>(u);
  float h;
  if (act == 1) {
    h = round_to<T>(__fdiv_rn(g, __fadd_rn(1.f, __expf(-g))));
  } else {
    const float r = g < 0.f ? 0.f : g;  // NaN stays NaN, as F.relu
    h = round_to<T>(__fmul_rn(r, r));
  }
  y[n >> 1] = from_float<T>(__fmul_rn(h, u));
}

// The outputs of one row group (rows row0 .. row0 + R - 1) from each lane's partial dot products: summed over the
// warp and written by lane 0. act 0: one output per row (store_output); act 1 / 2 (R = 2 only, rows interleaved gate,
// up, row0 even): one per pair (store_gated), no residual. Only R = 2 carries the gating: in the 4-row kernel its
// code cost spills at the 64-register cap (dispatch_version sends gated calls to 2-row kernels).
template <typename T, int R>
__device__ __forceinline__ void store_rows(const DotAcc (&acc)[R], int row0, int lane, int xsum, float a,
                                           const float* __restrict__ scale, int per_channel, const T* __restrict__ bias,
                                           const T* __restrict__ residual, T* __restrict__ y, int N, int act) {
  auto warp_sum = [](int v) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
  };
  if constexpr (R == 2) {
    if (act != 0) {
      const int g = warp_sum(acc[0].total()), u = warp_sum(acc[1].total());
      if (lane == 0 && row0 < N)
        store_gated(g, u, xsum, scale[per_channel ? row0 : 0], scale[per_channel ? row0 + 1 : 0], a, bias, y, row0,
                    act);
      return;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {  // one row at a time: fewer live registers than reducing all first
    const int s = warp_sum(acc[r].total()), n = row0 + r;
    if (lane == 0 && n < N) store_output(s, xsum, scale[per_channel ? n : 0], a, bias, residual, y, n);
  }
}

}  // namespace bitengine_cuda
