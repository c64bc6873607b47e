// AVX2 (+FMA, F16C) kernels over the i256 layout (kernels.h). Compiled for AVX2 with a target
// pragma so one build runs anywhere: they are only called after cpu_has_avx2() said yes.
// Tiles of MT tokens x NR rows share each weight unpack (prefill) and each activation load.
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "kernels.h"

namespace bitengine_cpu {

namespace {

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

inline int64_t hsum_epi64(__m256i v) {
  __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi64(s, _mm_unpackhi_epi64(s, s));
  return _mm_cvtsi128_si64(s);
}

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Decode streams the weights from DRAM once: ask for them kPrefetchBlocks blocks (2 KB of a
// 4-row group) ahead, so the loads overlap the unpacking instead of alternating with it.
// (Measured 2026-11-28 on this noisy VM: 8 blocks at best ~10% faster than none, within noise.)
#ifndef BITENGINE_PREFETCH_BLOCKS
#define BITENGINE_PREFETCH_BLOCKS 8
#endif
constexpr int64_t kPrefetchBlocks = BITENGINE_PREFETCH_BLOCKS;
template <int NR>
inline void prefetch_ahead(const uint8_t* w, int64_t t) {
  if (kPrefetchBlocks == 0) return;
  const char* p = (const char*)(w + (t + kPrefetchBlocks) * kBlockStride);
  for (int r = 0; r < NR; ++r) _mm_prefetch(p + r * kBlockBytes, _MM_HINT_T0);
}

// Codes (0..2) of the 32 weights k = 64 i + 32 h + j from the block half loaded in v.
template <int I>
inline __m256i codes(__m256i v) {
  return _mm256_and_si256(_mm256_srli_epi16(v, 2 * I), _mm256_set1_epi8(3));
}

// ---- W1.58A8, dot variant: maddubs(u8 code, s8 x) -> int16 pairs (|.| <= 2*2*127), summed over
// one block (8 steps, |.| <= 4064) before widening; sum x*(c-1) = sum x*c - sum x.
template <int MT, int NR>
void a8_dot_tile(const uint8_t* w, const int8_t* x, int64_t xs, int64_t nblk,
                 int32_t* res) {
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256i acc[MT][NR];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_si256();
  for (int64_t t = 0; t < nblk; ++t) {
    __m256i acc16[MT][NR];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < NR; ++r) acc16[m][r] = _mm256_setzero_si256();
    const int8_t* xb = x + t * kBlockK;
    prefetch_ahead<NR>(w, t);
    for (int h = 0; h < 2; ++h) {
      __m256i wv[NR];
      for (int r = 0; r < NR; ++r)
        wv[r] = _mm256_loadu_si256((const __m256i*)(w + r * kBlockBytes + t * kBlockStride + 32 * h));
      auto step = [&](auto ic) {
        constexpr int I = decltype(ic)::value;
        __m256i c[NR];
        for (int r = 0; r < NR; ++r) c[r] = codes<I>(wv[r]);
        for (int m = 0; m < MT; ++m) {
          const __m256i xv = _mm256_loadu_si256((const __m256i*)(xb + m * xs + 64 * I + 32 * h));
          for (int r = 0; r < NR; ++r)
            acc16[m][r] = _mm256_add_epi16(acc16[m][r], _mm256_maddubs_epi16(c[r], xv));
        }
      };
      step(std::integral_constant<int, 0>{});
      step(std::integral_constant<int, 1>{});
      step(std::integral_constant<int, 2>{});
      step(std::integral_constant<int, 3>{});
    }
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < NR; ++r)
        acc[m][r] = _mm256_add_epi32(acc[m][r], _mm256_madd_epi16(acc16[m][r], ones16));
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) res[m * NR + r] = hsum_epi32(acc[m][r]);
}

// ---- W1.58A8, add-only variant: s = sign(x, c - 1) is +x, 0 or -x (|x| <= 127 after
// quantization, so negation never overflows); psadbw against 0 adds the bytes of s + 128.
template <int MT, int NR>
void a8_add_tile(const uint8_t* w, const int8_t* x, int64_t xs, int64_t nblk,
                 int32_t* res) {
  const __m256i one8 = _mm256_set1_epi8(1), bias8 = _mm256_set1_epi8((char)0x80);
  const __m256i zero = _mm256_setzero_si256();
  __m256i acc[MT][NR];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = zero;
  for (int64_t t = 0; t < nblk; ++t) {
    const int8_t* xb = x + t * kBlockK;
    prefetch_ahead<NR>(w, t);
    for (int h = 0; h < 2; ++h) {
      __m256i wv[NR];
      for (int r = 0; r < NR; ++r)
        wv[r] = _mm256_loadu_si256((const __m256i*)(w + r * kBlockBytes + t * kBlockStride + 32 * h));
      auto step = [&](auto ic) {
        constexpr int I = decltype(ic)::value;
        __m256i sgn[NR];
        for (int r = 0; r < NR; ++r) sgn[r] = _mm256_sub_epi8(codes<I>(wv[r]), one8);
        for (int m = 0; m < MT; ++m) {
          const __m256i xv = _mm256_loadu_si256((const __m256i*)(xb + m * xs + 64 * I + 32 * h));
          for (int r = 0; r < NR; ++r) {
            const __m256i s = _mm256_xor_si256(_mm256_sign_epi8(xv, sgn[r]), bias8);
            acc[m][r] = _mm256_add_epi64(acc[m][r], _mm256_sad_epu8(s, zero));
          }
        }
      };
      step(std::integral_constant<int, 0>{});
      step(std::integral_constant<int, 1>{});
      step(std::integral_constant<int, 2>{});
      step(std::integral_constant<int, 3>{});
    }
  }
  const int64_t offset = 128 * kBlockK * nblk;  // every byte carried +128
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) res[m * NR + r] = (int32_t)(hsum_epi64(acc[m][r]) - offset);
}

// Runs NR-row tiles (NR divides 4, so a tile never leaves its 4-row group) over all rows; the runner loops over tokens inside,
// so a tile's weights stay in L1 while every token passes over them.
template <int NR, typename F>
inline void run_rows(F&& f, int64_t nrows, int64_t M) {
  for (int64_t r = 0; r < nrows; r += NR) f.template call<NR>(r, M);  // nrows: a multiple of 4
}

template <bool ADD>
struct A8Runner {
  const uint8_t* w; int64_t ws; const int8_t* xq; int64_t xs; const int32_t* xsum; int64_t sums;
  int64_t nblk; int32_t* out; int64_t os;
  template <int NR>
  void call(int64_t r0, int64_t M) const {
    int32_t res[4 * NR];
    int64_t m = 0;
    auto emit = [&](int mt) {
      for (int i = 0; i < mt; ++i)
        for (int r = 0; r < NR; ++r)
          out[(m + i) * os + r0 + r] = res[i * NR + r] - (ADD ? 0 : xsum[(m + i) * sums]);
    };
    const uint8_t* wr = tile_rows(w, ws, r0);
    for (; m + 4 <= M; m += 4) {
      if (ADD) a8_add_tile<4, NR>(wr, xq + m * xs, xs, nblk, res);
      else a8_dot_tile<4, NR>(wr, xq + m * xs, xs, nblk, res);
      emit(4);
    }
    for (; m < M; ++m) {
      if (ADD) a8_add_tile<1, NR>(wr, xq + m * xs, xs, nblk, res);
      else a8_dot_tile<1, NR>(wr, xq + m * xs, xs, nblk, res);
      emit(1);
    }
  }
};

// ---- W1.58A16. Word q of a block holds 16 codes; lane l of the low (high) half gets the code at
// bit 2l (16 + 2l), which x_perm lines up with. "add": shift each code bit to the sign bit and
// blend x in (no multiplies): sum x*c = sum_bit0 x + 2 sum_bit1 x. "dot": codes to float, FMA.
// MT tokens x NR rows per tile: the unpacked codes / masks of a word serve all MT tokens.
template <bool ADD, int MT, int NR>
void a16_tile(const uint8_t* w, const float* x, int64_t xs, int64_t nblk, float* res) {
  const __m256i lane2 = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i sh0lo = _mm256_sub_epi32(_mm256_set1_epi32(31), lane2);  // bit 2l -> 31
  const __m256i sh1lo = _mm256_sub_epi32(_mm256_set1_epi32(30), lane2);  // bit 2l+1 -> 31
  const __m256i sh0hi = _mm256_sub_epi32(_mm256_set1_epi32(15), lane2);  // bit 16+2l -> 31
  const __m256i sh1hi = _mm256_sub_epi32(_mm256_set1_epi32(14), lane2);
  const __m256i shrlo = lane2, shrhi = _mm256_add_epi32(lane2, _mm256_set1_epi32(16));
  const __m256i mask3 = _mm256_set1_epi32(3);
  const __m256 zero = _mm256_setzero_ps();
  __m256 acc0[MT][NR], acc1[MT][NR];  // dot: acc1 unused (both halves go to acc0)
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) acc0[m][r] = acc1[m][r] = zero;
  for (int64_t t = 0; t < nblk; ++t) {
    for (int q = 0; q < 16; ++q) {
      for (int r = 0; r < NR; ++r) {
        const __m256i word =
            _mm256_set1_epi32(*(const int32_t*)(w + r * kBlockBytes + t * kBlockStride + 4 * q));
        if (ADD) {
          const __m256 b0lo = _mm256_castsi256_ps(_mm256_sllv_epi32(word, sh0lo));
          const __m256 b1lo = _mm256_castsi256_ps(_mm256_sllv_epi32(word, sh1lo));
          const __m256 b0hi = _mm256_castsi256_ps(_mm256_sllv_epi32(word, sh0hi));
          const __m256 b1hi = _mm256_castsi256_ps(_mm256_sllv_epi32(word, sh1hi));
          for (int m = 0; m < MT; ++m) {
            const __m256 xlo = _mm256_loadu_ps(x + m * xs + t * kBlockK + 16 * q);
            const __m256 xhi = _mm256_loadu_ps(x + m * xs + t * kBlockK + 16 * q + 8);
            acc0[m][r] = _mm256_add_ps(acc0[m][r], _mm256_blendv_ps(zero, xlo, b0lo));
            acc1[m][r] = _mm256_add_ps(acc1[m][r], _mm256_blendv_ps(zero, xlo, b1lo));
            acc0[m][r] = _mm256_add_ps(acc0[m][r], _mm256_blendv_ps(zero, xhi, b0hi));
            acc1[m][r] = _mm256_add_ps(acc1[m][r], _mm256_blendv_ps(zero, xhi, b1hi));
          }
        } else {
          const __m256 clo = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(word, shrlo), mask3));
          const __m256 chi = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(word, shrhi), mask3));
          for (int m = 0; m < MT; ++m) {
            const __m256 xlo = _mm256_loadu_ps(x + m * xs + t * kBlockK + 16 * q);
            const __m256 xhi = _mm256_loadu_ps(x + m * xs + t * kBlockK + 16 * q + 8);
            acc0[m][r] = _mm256_fmadd_ps(xhi, chi, _mm256_fmadd_ps(xlo, clo, acc0[m][r]));
          }
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r)
      res[m * NR + r] = ADD ? hsum_ps(acc0[m][r]) + 2.f * hsum_ps(acc1[m][r]) : hsum_ps(acc0[m][r]);
}

template <bool ADD>
struct A16Runner {
  const uint8_t* w; int64_t ws; const float* xp; int64_t xs; const float* xsum; int64_t sums;
  int64_t nblk; float* out; int64_t os;
  template <int NR>
  void call(int64_t r0, int64_t M) const {
    constexpr int MT = 4;
    float res[MT * NR];
    const uint8_t* wr = tile_rows(w, ws, r0);
    auto emit = [&](int64_t m0, int mt) {
      for (int i = 0; i < mt; ++i)
        for (int r = 0; r < NR; ++r) out[(m0 + i) * os + r0 + r] = res[i * NR + r] - xsum[(m0 + i) * sums];
    };
    int64_t m = 0;
    for (; m + MT <= M; m += MT) {
      a16_tile<ADD, MT, NR>(wr, xp + m * xs, xs, nblk, res);
      emit(m, MT);
    }
    for (; m < M; ++m) {
      a16_tile<ADD, 1, NR>(wr, xp + m * xs, xs, nblk, res);
      emit(m, 1);
    }
  }
};

// ---- dense rows (head): a tile of NR rows x MT tokens, so each converted weight vector serves MT tokens and each x
// vector NR rows (one token at a time, a weight vector was loaded and converted once per token: at 512 tokens that
// took 1.35-1.66x the time of torch's float32 F.linear, 0.94-1.10x now: bench/results/cpu_dense_f16c_*2026-12-03.md).
// One accumulator per (row, token), k ascending, then one horizontal
// sum: every output has the same bits whatever M is and wherever its token sits in the batch (the server decodes a
// row alone and in a batch; greedy tokens must not depend on that).
template <typename Load, int NR, int MT>
void dense_tile(Load load, int64_t ws, const float* x, int64_t xs, int64_t kpad, float* out, int64_t os) {
  __m256 acc[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < MT; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kpad; k += 8) {  // kpad is a multiple of 32
    __m256 w[NR];
    for (int r = 0; r < NR; ++r) w[r] = load(r * ws + k);
    for (int t = 0; t < MT; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * xs + k);
      for (int r = 0; r < NR; ++r) acc[r][t] = _mm256_fmadd_ps(xv, w[r], acc[r][t]);
    }
  }
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < NR; ++r) out[t * os + r] = hsum_ps(acc[r][t]);
}

template <typename Load, int NR>
void dense_tokens(Load load, int64_t ws, const float* x, int64_t xs, int64_t M, int64_t kpad, float* out,
                  int64_t os) {
  constexpr int kMT = 8 / NR;  // 4 rows x 2 tokens, or 1 row x 8 tokens: at most 13 ymm registers
  int64_t m = 0;
  for (; m + kMT <= M; m += kMT) dense_tile<Load, NR, kMT>(load, ws, x + m * xs, xs, kpad, out + m * os, os);
  for (; m < M; ++m) dense_tile<Load, NR, 1>(load, ws, x + m * xs, xs, kpad, out + m * os, os);
}

// The tokens in blocks of kDenseTokens (their x rows stay in cache while the chunk's rows stream past), each block
// over all rows in tiles of 4.
constexpr int64_t kDenseTokens = 16;

template <typename Load>
void dense_rows(Load make, int64_t ws, int64_t nrows, const float* x, int64_t xs, int64_t M,
                int64_t kpad, float* out, int64_t os) {
  for (int64_t m0 = 0; m0 < M; m0 += kDenseTokens) {
    const int64_t mb = std::min(kDenseTokens, M - m0);
    const float* xb = x + m0 * xs;
    float* ob = out + m0 * os;
    int64_t r = 0;
    for (; r + 4 <= nrows; r += 4) dense_tokens<decltype(make(r)), 4>(make(r), ws, xb, xs, mb, kpad, ob + r, os);
    for (; r < nrows; ++r) dense_tokens<decltype(make(r)), 1>(make(r), ws, xb, xs, mb, kpad, ob + r, os);
  }
}

// ---- LoRA side path: 8 factor elements of type FT as floats, and one for the tails.
template <int FT>
inline __m256 load8_factor(const void* p, int64_t i) {
  if constexpr (FT == kFactorF16) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + i)));
  } else if constexpr (FT == kFactorBF16) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)p + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  } else if constexpr (FT == kFactorI8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)((const int8_t*)p + i))));
  } else {
    return _mm256_loadu_ps((const float*)p + i);
  }
}

template <int FT>
inline float load1_factor(const void* p, int64_t i) {
  if constexpr (FT == kFactorF16) {
    return _cvtsh_ss(((const uint16_t*)p)[i]);
  } else if constexpr (FT == kFactorBF16) {
    return _mm_cvtss_f32(_mm_castsi128_ps(_mm_cvtsi32_si128((int)((uint32_t)((const uint16_t*)p)[i] << 16))));
  } else if constexpr (FT == kFactorI8) {
    return (float)((const int8_t*)p)[i];
  } else {
    return ((const float*)p)[i];
  }
}

// exp(x) for x <= 0 (Cephes expf: range reduction by ln 2, degree-6 polynomial; ~1e-7 relative).
inline __m256 exp_nonpos_ps(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// Sums of 4 vectors in one: lane i = hsum(v[i]).
inline __m128 hsum4_ps(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// Dot products of 4 factor rows (R = 4) or one (R = 1), the first at element `base`, `stride`
// elements apart, with a float vector x of length len. The 4-row form shares each x load.
template <int FT, int R>
inline void factor_dots(const void* p, int64_t base, int64_t stride, const float* x, int64_t len,
                        float* res) {
  __m256 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= len; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    for (int i = 0; i < R; ++i) acc[i] = _mm256_fmadd_ps(xv, load8_factor<FT>(p, base + i * stride + k), acc[i]);
  }
  float tail[R] = {};
  for (; k < len; ++k)
    for (int i = 0; i < R; ++i) tail[i] += x[k] * load1_factor<FT>(p, base + i * stride + k);
  if constexpr (R == 4) {
    _mm_storeu_ps(res, _mm_add_ps(hsum4_ps(acc[0], acc[1], acc[2], acc[3]), _mm_loadu_ps(tail)));
  } else {
    res[0] = hsum_ps(acc[0]) + tail[0];
  }
}

template <int FT>
void lora_down_t(const void* A, int64_t r, int64_t K, const float* x, int64_t xs, int64_t M,
                 const float* hscale, float* h, int64_t hs) {
  float res[4];
  for (int64_t m = 0; m < M; ++m) {
    int64_t j = 0;
    for (; j + 4 <= r; j += 4) {
      factor_dots<FT, 4>(A, j * K, K, x + m * xs, K, res);
      for (int i = 0; i < 4; ++i) h[m * hs + j + i] = hscale ? res[i] * hscale[j + i] : res[i];
    }
    for (; j < r; ++j) {
      factor_dots<FT, 1>(A, j * K, K, x + m * xs, K, res);
      h[m * hs + j] = hscale ? res[0] * hscale[j] : res[0];
    }
  }
}

template <int FT>
void lora_up_t(const void* B, int64_t nrows, int64_t r, const float* h, int64_t hs, int64_t M,
               float* out, int64_t os) {
  float res[4];
  for (int64_t m = 0; m < M; ++m) {
    int64_t n = 0;
    for (; n + 4 <= nrows; n += 4) {
      factor_dots<FT, 4>(B, n * r, r, h + m * hs, r, res);
      for (int i = 0; i < 4; ++i) out[m * os + n + i] += res[i];
    }
    for (; n < nrows; ++n) {
      factor_dots<FT, 1>(B, n * r, r, h + m * hs, r, res);
      out[m * os + n] += res[0];
    }
  }
}

}  // namespace

void a8_avx2_dot(const uint8_t* w, int64_t ws, int64_t nrows, const int8_t* xq, int64_t xs,
                 const int32_t* xsum, int64_t sums, int64_t M, int64_t nblk, int32_t* out,
                 int64_t os) {
  A8Runner<false> f{w, ws, xq, xs, xsum, sums, nblk, out, os};
  if (M >= 4) run_rows<2>(f, nrows, M);
  else run_rows<4>(f, nrows, M);
}

void a8_avx2_add(const uint8_t* w, int64_t ws, int64_t nrows, const int8_t* xq, int64_t xs,
                 const int32_t* xsum, int64_t sums, int64_t M, int64_t nblk, int32_t* out,
                 int64_t os) {
  A8Runner<true> f{w, ws, xq, xs, xsum, sums, nblk, out, os};
  if (M >= 4) run_rows<2>(f, nrows, M);
  else run_rows<4>(f, nrows, M);
}

void a16_avx2_add(const uint8_t* w, int64_t ws, int64_t nrows, const float* xp, int64_t xs,
                  const float* xsum, int64_t sums, int64_t M, int64_t nblk, float* out, int64_t os) {
  A16Runner<true> f{w, ws, xp, xs, xsum, sums, nblk, out, os};
  if (M >= 4) run_rows<1>(f, nrows, M);  // 4 tokens x 1 row: 8 accumulators + 4 masks
  else run_rows<2>(f, nrows, M);
}

void a16_avx2_dot(const uint8_t* w, int64_t ws, int64_t nrows, const float* xp, int64_t xs,
                  const float* xsum, int64_t sums, int64_t M, int64_t nblk, float* out, int64_t os) {
  A16Runner<false> f{w, ws, xp, xs, xsum, sums, nblk, out, os};
  if (M >= 4) run_rows<2>(f, nrows, M);  // 4 tokens x 2 rows: 8 accumulators + 4 codes
  else run_rows<4>(f, nrows, M);
}

// Per group of 128 weights (64 bytes, two 32-byte halves of two chunks each): the nibbles become unsigned codes
// c = v + 8 (the 4-bit two's complement v with its sign bit flipped), so one maddubs takes codes x int8 tokens with no
// saturation (2 * 15 * 128 < 2^15), and 8 * sum(xq) over the group takes the offset off: the same integer as the scalar
// twin's. In a 32-byte half, the low nibbles pair with tokens [0, 16) of each chunk and the high ones with [16, 32):
// two 128-bit lane permutes of the half's 64 tokens line them up.
void int4_rows_avx2(const uint8_t* w, int64_t ws, const uint16_t* scale, int64_t ss, int64_t nrows,
                    const int8_t* xq, int64_t xs, const int32_t* xsum, int64_t M, int64_t kpad, float* out,
                    int64_t os) {
  const int64_t groups = kpad / 128;
  const __m256i nib = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8(0x08), ones = _mm256_set1_epi16(1);
  for (int64_t r = 0; r < nrows; ++r) {
    const uint8_t* wr = w + r * ws;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* xm = xq + m * xs;
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        __m256i s32 = _mm256_setzero_si256();
        for (int h = 0; h < 2; ++h) {
          const __m256i b = _mm256_loadu_si256((const __m256i*)(wr + g * 64 + h * 32));
          const __m256i lo = _mm256_xor_si256(_mm256_and_si256(b, nib), flip);
          const __m256i hi = _mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), nib), flip);
          const int8_t* xh = xm + g * 128 + h * 64;
          const __m256i x0 = _mm256_loadu_si256((const __m256i*)xh), x1 = _mm256_loadu_si256((const __m256i*)(xh + 32));
          const __m256i xlo = _mm256_permute2x128_si256(x0, x1, 0x20), xhi = _mm256_permute2x128_si256(x0, x1, 0x31);
          const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
          s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(p16, ones));
        }
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
        t = _mm_hadd_epi32(t, t);
        t = _mm_hadd_epi32(t, t);
        const int32_t s = _mm_cvtsi128_si32(t) - 8 * xsum[m * groups + g];
        acc += _cvtsh_ss(scale[r * ss + g]) * (float)s;
      }
      out[m * os + r] = acc;
    }
  }
}

void int8_rows_avx2(const int8_t* w, int64_t ws, int64_t nrows, const float* x, int64_t xs,
                    int64_t M, int64_t kpad, float* out, int64_t os) {
  dense_rows([w, ws](int64_t r0) {
    const int8_t* p = w + r0 * ws;
    return [p](int64_t off) {
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + off))));
    };
  }, ws, nrows, x, xs, M, kpad, out, os);
}

void half_rows_avx2(const uint16_t* w, int64_t ws, int64_t nrows, const float* x, int64_t xs,
                    int64_t M, int64_t kpad, float* out, int64_t os) {
  dense_rows([w, ws](int64_t r0) {
    const uint16_t* p = w + r0 * ws;
    return [p](int64_t off) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + off))); };
  }, ws, nrows, x, xs, M, kpad, out, os);
}

}  // namespace bitengine_cpu

namespace bitengine_cpu {

void lora_down_avx2(const void* A, int ft, int64_t r, int64_t K, const float* x, int64_t xs,
                    int64_t M, const float* hscale, float* h, int64_t hs) {
  switch (ft) {
    case kFactorF16: return lora_down_t<kFactorF16>(A, r, K, x, xs, M, hscale, h, hs);
    case kFactorBF16: return lora_down_t<kFactorBF16>(A, r, K, x, xs, M, hscale, h, hs);
    case kFactorI8: return lora_down_t<kFactorI8>(A, r, K, x, xs, M, hscale, h, hs);
    default: return lora_down_t<kFactorF32>(A, r, K, x, xs, M, hscale, h, hs);
  }
}

void lora_up_avx2(const void* B, int ft, int64_t nrows, int64_t r, const float* h, int64_t hs,
                  int64_t M, float* out, int64_t os) {
  switch (ft) {
    case kFactorF16: return lora_up_t<kFactorF16>(B, nrows, r, h, hs, M, out, os);
    case kFactorBF16: return lora_up_t<kFactorBF16>(B, nrows, r, h, hs, M, out, os);
    case kFactorI8: return lora_up_t<kFactorI8>(B, nrows, r, h, hs, M, out, os);
    default: return lora_up_t<kFactorF32>(B, nrows, r, h, hs, M, out, os);
  }
}

}  // namespace bitengine_cpu

namespace bitengine_cpu {

// Same bits as quantize_row_scalar: max ignores NaN the same way (max_ps(v, acc) keeps acc),
// round_ps(nearest) is rint in the default rounding mode, the products are the same IEEE products.
float quantize_row_avx2(const float* x, int64_t K, int64_t gsize, int8_t* q, int32_t* gsum) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m0 = _mm256_setzero_ps(), m1 = m0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    m0 = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + k), absmask), m0);
    m1 = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + k + 8), absmask), m1);
  }
  m0 = _mm256_max_ps(m0, m1);
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m0), _mm256_extractf128_ps(m0, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  float amax = _mm_cvtss_f32(h);
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float a = (1.f / std::max(amax, 1e-5f)) * 127.f;
  const __m256 av = _mm256_set1_ps(a), lo = _mm256_set1_ps(-128.f), hi = _mm256_set1_ps(127.f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  auto quant8 = [&](const float* p) {
    const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(p), av),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
  };
  for (int64_t g = 0; g * gsize < K; ++g) {
    const int64_t k1 = (g + 1) * gsize;
    __m256i sum = _mm256_setzero_si256();
    k = g * gsize;
    for (; k + 32 <= k1; k += 32) {
      const __m256i i0 = quant8(x + k), i1 = quant8(x + k + 8), i2 = quant8(x + k + 16), i3 = quant8(x + k + 24);
      sum = _mm256_add_epi32(sum, _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
      // packs work per 128-bit lane: bytes come out as [i0 lo, i1 lo, i2 lo, i3 lo, i0 hi, ...] in
      // 4-byte pieces; the permute puts them back in k order
      const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
      _mm256_storeu_si256((__m256i*)(q + k), _mm256_permutevar8x32_epi32(b, perm));
    }
    int32_t s = hsum_epi32(sum);
    for (; k < k1; ++k) {
      const float v = std::min(std::max(std::nearbyint(x[k] * a), -128.f), 127.f);
      q[k] = (int8_t)v;
      s += (int32_t)v;
    }
    gsum[g] = s;
  }
  return a;
}

}  // namespace bitengine_cpu

namespace bitengine_cpu {

// attend_head (kernels.h): dot products with two FMA chains, exp 8 slots at a time (masked
// slots hold -inf and get p = 0), then out += p_s v_s over the allowed slots.
void attend_head_avx2(const float* q, const float* k, const float* v, int64_t S, int64_t hd,
                      const uint8_t* allowed, float scale, float* scores, float* out) {
  float mx = -INFINITY;
  const int64_t hd8 = hd / 8 * 8;
  for (int64_t s = 0; s < S; ++s) {
    if (!allowed[s]) { scores[s] = -INFINITY; continue; }
    const float* ks = k + s * hd;
    __m256 a = _mm256_setzero_ps(), b = a;
    int64_t i = 0;
    for (; i + 16 <= hd8; i += 16) {
      a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(ks + i), a);
      b = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), _mm256_loadu_ps(ks + i + 8), b);
    }
    for (; i < hd8; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(ks + i), a);
    float d = hsum_ps(_mm256_add_ps(a, b));
    for (; i < hd; ++i) d += q[i] * ks[i];
    scores[s] = d * scale;
    mx = std::max(mx, scores[s]);
  }
  const __m256 vmx = _mm256_set1_ps(mx), ninf = _mm256_set1_ps(-INFINITY);
  __m256 tot = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + 8 <= S; s += 8) {
    const __m256 x = _mm256_loadu_ps(scores + s);
    const __m256 p = _mm256_andnot_ps(_mm256_cmp_ps(x, ninf, _CMP_EQ_OQ), exp_nonpos_ps(_mm256_sub_ps(x, vmx)));
    _mm256_storeu_ps(scores + s, p);
    tot = _mm256_add_ps(tot, p);
  }
  float total = hsum_ps(tot);
  for (; s < S; ++s) {
    scores[s] = allowed[s] ? std::exp(scores[s] - mx) : 0.f;
    total += scores[s];
  }
  for (int64_t i = 0; i < hd; ++i) out[i] = 0.f;
  for (s = 0; s < S; ++s) {
    if (!allowed[s]) continue;
    const __m256 p = _mm256_set1_ps(scores[s]);
    const float* vs = v + s * hd;
    int64_t i = 0;
    for (; i < hd8; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(vs + i), _mm256_loadu_ps(out + i)));
    for (; i < hd; ++i) out[i] += scores[s] * vs[i];
  }
  const float inv = 1.f / total;
  for (int64_t i = 0; i < hd; ++i) out[i] *= inv;
}

}  // namespace bitengine_cpu
