// Device helpers of the CUDA decode GEMVs (ternary_gemv.cu; read_probe.cu uses the streaming load): dtype conversion,
// streaming loads, programmatic dependent launch, the dp4a word dot product and the fused int8 quantization of x.
#pragma once

#include <cstdint>
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

}  // namespace bitengine_cuda
