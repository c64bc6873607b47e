// Portable scalar kernels: the twin every SIMD path is tested against (besides the PyTorch
// reference), the fallback on CPUs without AVX2, and the path for scale groups that are not a
// multiple of the 256-weight block. Add-only: each weight selects +x, 0 or -x.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace bitengine_cpu {

namespace {
inline int code_at(const uint8_t* row, int64_t k) {  // row: tile_rows(...)
  const int64_t t = k / kBlockK, r = k % kBlockK;
  return (row[t * kBlockStride + r % 64] >> (2 * (r / 64))) & 3;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h >> 15) << 31;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400));
      bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
}  // namespace

void a8_scalar_range(const uint8_t* w, int64_t w_stride, int64_t nrows, const int8_t* xq,
                     int64_t x_stride, int64_t M, int64_t k0, int64_t k1, int32_t* out,
                     int64_t out_stride) {
  for (int64_t r = 0; r < nrows; ++r) {
    const uint8_t* row = tile_rows(w, w_stride, r);
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* x = xq + m * x_stride;
      int32_t acc = 0;
      for (int64_t k = k0; k < k1; ++k) {
        const int c = code_at(row, k);
        acc += c == 2 ? x[k] : (c == 0 ? -x[k] : 0);
      }
      out[m * out_stride + r] = acc;
    }
  }
}

void a16_scalar_range(const uint8_t* w, int64_t w_stride, int64_t nrows, const float* xp,
                      int64_t x_stride, int64_t M, int64_t k0, int64_t k1, float* out,
                      int64_t out_stride) {
  for (int64_t r = 0; r < nrows; ++r) {
    const uint8_t* row = tile_rows(w, w_stride, r);
    for (int64_t m = 0; m < M; ++m) {
      const float* x = xp + m * x_stride;
      float acc = 0.f;
      for (int64_t k = k0; k < k1; ++k) {
        const int c = code_at(row, k);
        const float v = x[(k / kBlockK) * kBlockK + a16_perm_index(k % kBlockK)];
        acc += c == 2 ? v : (c == 0 ? -v : 0.f);
      }
      out[m * out_stride + r] = acc;
    }
  }
}

void int8_rows_scalar(const int8_t* w, int64_t w_stride, int64_t nrows, const float* x,
                      int64_t x_stride, int64_t M, int64_t kpad, float* out, int64_t out_stride) {
  for (int64_t r = 0; r < nrows; ++r)
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < kpad; ++k) acc += x[m * x_stride + k] * (float)w[r * w_stride + k];
      out[m * out_stride + r] = acc;
    }
}

void half_rows_scalar(const uint16_t* w, int64_t w_stride, int64_t nrows, const float* x,
                      int64_t x_stride, int64_t M, int64_t kpad, float* out, int64_t out_stride) {
  for (int64_t r = 0; r < nrows; ++r)
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < kpad; ++k)
        acc += x[m * x_stride + k] * half_to_float(w[r * w_stride + k]);
      out[m * out_stride + r] = acc;
    }
}

namespace {
inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float factor_at(const void* p, int ft, int64_t i) {
  switch (ft) {
    case kFactorF16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    case kFactorBF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    case kFactorI8: return (float)static_cast<const int8_t*>(p)[i];
    default: return static_cast<const float*>(p)[i];
  }
}
}  // namespace

void int4_rows_scalar(const uint8_t* w, int64_t ws, const uint16_t* scale, int64_t ss, int64_t nrows,
                      const int8_t* xq, int64_t xs, const int32_t* xsum, int64_t M, int64_t kpad, float* out,
                      int64_t os) {
  (void)xsum;  // the scalar twin sign-extends the nibbles itself
  const int64_t groups = kpad / 128;
  for (int64_t r = 0; r < nrows; ++r)
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        int32_t s = 0;
        for (int64_t c = 0; c < 4; ++c)
          for (int64_t b = 0; b < 16; ++b) {
            const int byte = w[r * ws + g * 64 + c * 16 + b];
            const int lo = (byte & 15) - ((byte & 8) << 1), hi = (byte >> 4) - ((byte & 128) >> 3);
            const int64_t k = g * 128 + c * 32 + b;
            s += lo * xq[m * xs + k] + hi * xq[m * xs + k + 16];
          }
        acc += half_to_float(scale[r * ss + g]) * (float)s;
      }
      out[m * os + r] = acc;
    }
}

float quantize_row_scalar(const float* x, int64_t K, int64_t gsize, int8_t* q, int32_t* gsum) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  // Not 127 / amax: torch evaluates `127.0 / tensor` as reciprocal(tensor) * 127, which differs
  // in the last bit for ~25% of inputs, and then flips rint ties on 16-bit inputs.
  const float a = (1.f / std::max(amax, 1e-5f)) * 127.f;
  for (int64_t g = 0; g * gsize < K; ++g) {
    int32_t s = 0;
    for (int64_t k = g * gsize; k < (g + 1) * gsize; ++k) {
      const float v = std::min(std::max(std::nearbyint(x[k] * a), -128.f), 127.f);
      q[k] = (int8_t)v;
      s += (int32_t)v;
    }
    gsum[g] = s;
  }
  return a;
}

void lora_down_scalar(const void* A, int ft, int64_t r, int64_t K, const float* x, int64_t xs,
                      int64_t M, const float* hscale, float* h, int64_t hs) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < r; ++j) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += x[m * xs + k] * factor_at(A, ft, j * K + k);
      h[m * hs + j] = hscale ? acc * hscale[j] : acc;
    }
}

void lora_up_scalar(const void* B, int ft, int64_t nrows, int64_t r, const float* h, int64_t hs,
                    int64_t M, float* out, int64_t os) {
  for (int64_t n = 0; n < nrows; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t j = 0; j < r; ++j) acc += h[m * hs + j] * factor_at(B, ft, n * r + j);
      out[m * os + n] += acc;
    }
}

}  // namespace bitengine_cpu

namespace bitengine_cpu {
void attend_head_scalar(const float* q, const float* k, const float* v, int64_t S, int64_t hd,
                        const uint8_t* allowed, float scale, float* scores, float* out) {
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    if (!allowed[s]) continue;
    float d = 0.f;
    for (int64_t i = 0; i < hd; ++i) d += q[i] * k[s * hd + i];
    scores[s] = d * scale;
    mx = std::max(mx, scores[s]);
  }
  float total = 0.f;
  for (int64_t i = 0; i < hd; ++i) out[i] = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    if (!allowed[s]) continue;
    const float p = std::exp(scores[s] - mx);
    total += p;
    for (int64_t i = 0; i < hd; ++i) out[i] += p * v[s * hd + i];
  }
  for (int64_t i = 0; i < hd; ++i) out[i] /= total;
}

bool cpu_has_avx2() {
  // libgcc's cpu model checks both cpuid and the OS-enabled ymm state (xgetbv).
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
}  // namespace bitengine_cpu
