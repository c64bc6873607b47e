// Raw-pointer CPU kernels for bitengine (no torch headers: the ISA-specific files are compiled with
// `#pragma GCC target`, and torch's inline code must never be compiled for a wider ISA than the
// machine running it).
//
// Repacked ternary layout "i256" (made at load time by ternary_repack_cpu from the on-disk "k4"):
//   rows in groups of 4 (N padded to a multiple of 4 with zero rows); per row ceil(K / 256)
//   blocks of 64 bytes; in block t, bits 2i..2i+1 of byte b hold the code (w + 1, so 0 -> -1,
//   1 -> 0, 2 -> +1) of weight k = 256 t + 64 i + b. Padding past K is code 1 (weight 0).
//   Byte order: [row group][block t][row in group][64 bytes], so one group reads as one
//   contiguous stream (short rows of 512 bytes would defeat the hardware prefetchers).
//   2 bits per weight, same size as k4 up to the padding.
//   Why: one 32/64-byte load, a 16-bit shift by 2i and a mask give the codes for consecutive k,
//   so int8 activations are read contiguously.
// A16 kernels read one 32-bit word q of a block and shift lane l by 2l (and 16 + 2l): lane l gets
// the code of k = 256 t + 64 (l % 4) + 4 q + l / 4. The driver permutes x to that order once per
// call ("x_perm", see a16_perm_index), so the weights need no second layout.
#pragma once
#include <cstdint>

namespace bitengine_cpu {

constexpr int64_t kBlockK = 256;     // weights per i256 block
constexpr int64_t kBlockBytes = 64;  // bytes per i256 block of one row
constexpr int64_t kGroupRows = 4;    // rows interleaved block by block
constexpr int64_t kBlockStride = kGroupRows * kBlockBytes;  // from block t to t + 1 of a row

// First byte of row r (relative to a 4-aligned base) in a matrix whose row groups are
// `group_stride` bytes apart (= 4 * 64 * blocks per row).
inline const uint8_t* tile_rows(const uint8_t* w, int64_t group_stride, int64_t r) {
  return w + (r / kGroupRows) * group_stride + (r % kGroupRows) * kBlockBytes;
}

// Position in x_perm of weight offset r (0..255) inside a block, for the A16 kernels.
inline int64_t a16_perm_index(int64_t r) {
  const int64_t i = r / 64, b = r % 64;  // r = 64 i + b, b = 4 q + byte
  return (b / 4) * 16 + (b % 4) * 4 + i;
}

// Sum over blocks [0, nblk) of one scale group for nrows (a multiple of 4) rows x M tokens.
//   w:    block 0 of row 0 (4-aligned); w_stride: bytes between row groups (tile_rows)
//   xq:   int8 activations of token m at xq + m * x_stride, in natural k order, zero padded
//   xsum: per token sum of xq over the same range (used by the dot variant's correction)
//   out:  int32 [M, nrows] at out + m * out_stride + r; exact sum_k xq[m, k] * w[r, k]
using A8Kernel = void (*)(const uint8_t* w, int64_t w_stride, int64_t nrows, const int8_t* xq,
                          int64_t x_stride, const int32_t* xsum, int64_t xsum_stride, int64_t M,
                          int64_t nblk, int32_t* out, int64_t out_stride);
// Same for float activations in x_perm order; out float [M, nrows] = sum_k x[m, k] * w[r, k].
using A16Kernel = void (*)(const uint8_t* w, int64_t w_stride, int64_t nrows, const float* xp,
                           int64_t x_stride, const float* xsum, int64_t xsum_stride, int64_t M,
                           int64_t nblk, float* out, int64_t out_stride);
// Dense rows (head): out[m, r] = sum_k x[m, k] * w[r, k] in fp32; w int8 or fp16 bits, K padded
// to a multiple of 32 with zeros (both x and w).
using Int8Kernel = void (*)(const int8_t* w, int64_t w_stride, int64_t nrows, const float* x,
                            int64_t x_stride, int64_t M, int64_t kpad, float* out, int64_t out_stride);
using HalfKernel = void (*)(const uint16_t* w, int64_t w_stride, int64_t nrows, const float* x,
                            int64_t x_stride, int64_t M, int64_t kpad, float* out, int64_t out_stride);

// Portable scalar kernels. The scalar ternary kernels also serve any group size (multiple of 4):
// they take a k range [k0, k1) instead of whole blocks.
void a8_scalar_range(const uint8_t* w, int64_t w_stride, int64_t nrows, const int8_t* xq,
                     int64_t x_stride, int64_t M, int64_t k0, int64_t k1, int32_t* out,
                     int64_t out_stride);
void a16_scalar_range(const uint8_t* w, int64_t w_stride, int64_t nrows, const float* xp,
                      int64_t x_stride, int64_t M, int64_t k0, int64_t k1, float* out,
                      int64_t out_stride);
void int8_rows_scalar(const int8_t* w, int64_t w_stride, int64_t nrows, const float* x,
                      int64_t x_stride, int64_t M, int64_t kpad, float* out, int64_t out_stride);
void half_rows_scalar(const uint16_t* w, int64_t w_stride, int64_t nrows, const float* x,
                      int64_t x_stride, int64_t M, int64_t kpad, float* out, int64_t out_stride);

// AVX2 (+FMA, F16C) kernels; "dot" uses maddubs on the codes (w + 1) with a sum(x) correction,
// "add" is multiplication-free: sign(x, w) selects +x / 0 / -x and psadbw adds the bytes.
void a8_avx2_dot(const uint8_t*, int64_t, int64_t, const int8_t*, int64_t, const int32_t*, int64_t,
                 int64_t, int64_t, int32_t*, int64_t);
void a8_avx2_add(const uint8_t*, int64_t, int64_t, const int8_t*, int64_t, const int32_t*, int64_t,
                 int64_t, int64_t, int32_t*, int64_t);
// A16: "add" blends x by each code bit (sum x*c = sum_bit0 x + 2 sum_bit1 x, minus sum x), no
// multiplies; "dot" converts codes to float and uses FMA.
void a16_avx2_add(const uint8_t*, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                  int64_t, int64_t, float*, int64_t);
void a16_avx2_dot(const uint8_t*, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                  int64_t, int64_t, float*, int64_t);
void int8_rows_avx2(const int8_t*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float*,
                    int64_t);
void half_rows_avx2(const uint16_t*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t,
                    float*, int64_t);

// The int4 head (bitengine/int4_head.py): w uint8 rows of kpad / 2 bytes (stride ws) in its chunk layout (byte b of a
// 16-byte chunk c: weight 32c + b in the low nibble, 32c + 16 + b in the high one, 4-bit two's complement), scale
// float16 bits [rows, kpad / 128] (stride ss); xq int8 tokens [M, kpad] (stride xs, zero past K), xsum[m * groups + g]
// the sum of token m's xq over group g. out[m * os + r] = sum over groups g, in order, of scale[r, g] * (the group's
// exact integer dot product), float32. Both twins compute the same integers (the sums over g may round differently).
using Int4Kernel = void (*)(const uint8_t* w, int64_t ws, const uint16_t* scale, int64_t ss, int64_t nrows,
                            const int8_t* xq, int64_t xs, const int32_t* xsum, int64_t M, int64_t kpad, float* out,
                            int64_t os);
void int4_rows_scalar(const uint8_t*, int64_t, const uint16_t*, int64_t, int64_t, const int8_t*, int64_t,
                      const int32_t*, int64_t, int64_t, float*, int64_t);
void int4_rows_avx2(const uint8_t*, int64_t, const uint16_t*, int64_t, int64_t, const int8_t*, int64_t,
                    const int32_t*, int64_t, int64_t, float*, int64_t);

// Per-token int8 activation quantization (quant.quantize_activations): returns a = 127 / max(max|x|,
// 1e-5) (computed as reciprocal(.) * 127, as torch does), writes q[k] = clamp(rint(x[k] * a), -128,
// 127) for k < K and gsum[g] = sum of q over [g * gsize, (g + 1) * gsize). Both twins give the same bits.
using QuantizeRow = float (*)(const float* x, int64_t K, int64_t gsize, int8_t* q, int32_t* gsum);
float quantize_row_scalar(const float* x, int64_t K, int64_t gsize, int8_t* q, int32_t* gsum);
float quantize_row_avx2(const float* x, int64_t K, int64_t gsize, int8_t* q, int32_t* gsum);

// LoRA side path (the ternary op's epilogue). Factor element types; fp32 accumulation throughout.
enum FactorType : int { kFactorF32 = 0, kFactorF16 = 1, kFactorBF16 = 2, kFactorI8 = 3 };
// Down projection: h[m * hs + j] = hscale[j] * sum_k x[m * xs + k] * A[j * K + k] for j < r
// (hscale null: 1). A: r x K row-major, elements of type ft.
using LoraDownKernel = void (*)(const void* A, int ft, int64_t r, int64_t K, const float* x,
                                int64_t xs, int64_t M, const float* hscale, float* h, int64_t hs);
// Up projection, accumulated: out[m * os + n] += sum_j h[m * hs + j] * B[n * r + j] for n < nrows
// (B points at row 0 of the range; B: rows x r row-major, elements of type ft).
using LoraUpKernel = void (*)(const void* B, int ft, int64_t nrows, int64_t r, const float* h,
                              int64_t hs, int64_t M, float* out, int64_t os);
void lora_down_scalar(const void*, int, int64_t, int64_t, const float*, int64_t, int64_t,
                      const float*, float*, int64_t);
void lora_up_scalar(const void*, int, int64_t, int64_t, const float*, int64_t, int64_t, float*,
                    int64_t);
void lora_down_avx2(const void*, int, int64_t, int64_t, const float*, int64_t, int64_t,
                    const float*, float*, int64_t);
void lora_up_avx2(const void*, int, int64_t, int64_t, const float*, int64_t, int64_t, float*,
                  int64_t);

// One query head against the cached keys/values of its KV head (decode attention, one token):
//   q: hd floats; k, v: S x hd (row s = slot s); allowed: S bytes (0: masked out, never read);
//   scores: S floats of scratch; out: hd floats = softmax(scale * q.k_s over allowed s) @ v.
// At least one slot must be allowed (the decode step always allows the token's own slot).
using AttendHead = void (*)(const float* q, const float* k, const float* v, int64_t S, int64_t hd,
                            const uint8_t* allowed, float scale, float* scores, float* out);
void attend_head_scalar(const float*, const float*, const float*, int64_t, int64_t, const uint8_t*,
                        float, float*, float*);
void attend_head_avx2(const float*, const float*, const float*, int64_t, int64_t, const uint8_t*,
                      float, float*, float*);

bool cpu_has_avx2();  // AVX2 + FMA + F16C, checked with cpuid (and OS support for ymm state)

}  // namespace bitengine_cpu
