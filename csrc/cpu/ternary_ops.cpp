// torch ops for the CPU kernels: input checks, per-token activation quantization, threading over
// output rows, scale/bias epilogue, runtime ISA dispatch. Registered as `bitengine::*_cpu`
// (TORCH_LIBRARY_FRAGMENT), so torch.compile sees them (fake impls: bitengine/backends/cpu.py).
//
// Settings: ISA = BITENGINE_CPU_ISA (auto | scalar | avx2) at import or set_isa(); threads =
// set_num_threads(n) (0: torch.get_num_threads()).
#include <ATen/Parallel.h>
#include <omp.h>
#include <sys/mman.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "kernels.h"
#include "ternary_ops.h"

namespace bitengine_cpu {
namespace {

enum Isa : int { kScalar = 0, kAvx2 = 1 };
const char* kIsaNames[] = {"scalar", "avx2"};
// Output rows per work item: long contiguous weight streams per thread. Decode step of the kernel
// bench (2 threads): 32 rows 25 ms, 128 rows 18 ms, 256 rows 21 ms (k/v_proj then use one thread).
constexpr int64_t kRowChunk = 128;

int g_forced_isa = -1;  // -1: best available
int g_threads = 0;      // 0: at::get_num_threads()

int best_isa() { return cpu_has_avx2() ? kAvx2 : kScalar; }
int active_isa() { return g_forced_isa >= 0 ? g_forced_isa : best_isa(); }
int num_threads() { return g_threads > 0 ? g_threads : at::get_num_threads(); }

void set_isa(const std::string& name) {
  if (name == "auto" || name.empty()) { g_forced_isa = -1; return; }
  for (int i = 0; i <= kAvx2; ++i)
    if (name == kIsaNames[i]) {
      TORCH_CHECK(i <= best_isa(), "BITENGINE_CPU_ISA=", name, ": this CPU does not support it");
      g_forced_isa = i;
      return;
    }
  TORCH_CHECK(false, "unknown CPU ISA '", name, "'; expected auto, scalar or avx2");
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (int i = 0; i <= best_isa(); ++i) out.push_back(kIsaNames[i]);
  return out;
}

int64_t nblocks(int64_t K) { return (K + kBlockK - 1) / kBlockK; }

int64_t padded_rows(int64_t N) { return (N + kGroupRows - 1) / kGroupRows * kGroupRows; }

void check_weight(const at::Tensor& w, int64_t K, int64_t N) {
  TORCH_CHECK(w.dtype() == at::kByte && w.dim() == 2 && w.is_contiguous(),
              "repacked weight must be contiguous uint8 [ceil(N/4)*4, ceil(K/256)*64], got ", w.sizes());
  TORCH_CHECK(w.size(1) == nblocks(K) * kBlockBytes, "repacked weight has ", w.size(1),
              " bytes per row; in_features=", K, " needs ", nblocks(K) * kBlockBytes);
  TORCH_CHECK(w.size(0) == padded_rows(N), "repacked weight has ", w.size(0), " rows; out_features=", N,
              " needs ", padded_rows(N));
}

// Scale granularity: groups = 1 for tensor/channel scales, K / group_size for [N, K/G] scales.
struct ScaleView {
  const float* p; int64_t groups, per_row;  // per_row: 0 (tensor), 1 (channel), groups (group)
  float at(int64_t n, int64_t g) const { return p[n * per_row + g * (per_row > 1)]; }
};

ScaleView scale_view(const at::Tensor& scale, int64_t N, int64_t K) {
  TORCH_CHECK(scale.dtype() == at::kFloat && scale.is_contiguous(), "scale must be contiguous float32");
  if (scale.numel() == 1) return {scale.data_ptr<float>(), 1, 0};
  if (scale.dim() == 1) {
    TORCH_CHECK(scale.size(0) == N, "per-channel scale has ", scale.size(0), " entries, expected ", N);
    return {scale.data_ptr<float>(), 1, 1};
  }
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && K % scale.size(1) == 0 &&
                  (K / scale.size(1)) % 4 == 0,
              "group scale must be [N, K/G] with G a multiple of 4, got ", scale.sizes(), " for K=", K);
  return {scale.data_ptr<float>(), scale.size(1), scale.size(1)};
}

// Flattens x to float32 [M, K] (a copy only when the dtype or layout asks for it).
at::Tensor as_float_rows(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.size(-1) == K, "input has ", x.size(-1), " features, layer expects ", K);
  return x.reshape({-1, K}).to(at::kFloat).contiguous();
}

at::Tensor finish(const at::Tensor& y, const at::Tensor& x, int64_t N) {
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.to(x.scalar_type()).reshape(shape);
}

// Per token: a = 127 / max(max|x|, 1e-5), xq = clamp(rint(x * a), -128, 127) (quant.py), zero
// padding to Kp; xsum[m, g] = sum of xq over group g (for the dot kernels' correction). The AVX2
// twin gives the same bits (kernels.h); at decode it is most of the per-call work besides the
// weights (the scalar loop calls libm's nearbyint per element).
void quantize_tokens(const float* x, int64_t M, int64_t K, int64_t Kp, int64_t groups, int8_t* xq,
                     float* a, int32_t* xsum) {
  const QuantizeRow quant = active_isa() == kAvx2 ? quantize_row_avx2 : quantize_row_scalar;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      a[m] = quant(x + m * K, K, K / groups, xq + m * Kp, xsum + m * groups);
      std::memset(xq + m * Kp + K, 0, Kp - K);
    }
  });
}

// Runs `body(r0, nr, nr_padded)` over chunks of kRowChunk rows on num_threads() threads. Dynamic
// scheduling: on a shared machine one thread is often descheduled for a time slice, and the
// others then take over its chunks instead of waiting at the barrier (static halves did, 2-5x
// slower under load). Each chunk is still one contiguous stretch of weights. nr: real rows (for
// the epilogue), nr_padded: rows up to the next multiple of 4 (what the kernels compute).
// OpenMP, not a pool of our own (tried 2026-11-28: claim-based chunks with spinning or with
// futex-sleeping workers): torch's ops run on the same libgomp team, and a second set of threads
// competing with libgomp's spinning workers for 2 cores made whole-model decode 5x slower in some
// runs. Known limit: while another process keeps a core busy, libgomp's default spin-waiting makes
// every parallel region wait up to a time slice for the descheduled worker (0.7-1.2 s per
// 154-linear decode step, against ~33 ms with OMP_WAIT_POLICY=passive or with one thread).
template <typename F>
void for_row_chunks(int64_t N, F&& body) {
  const int64_t chunks = (N + kRowChunk - 1) / kRowChunk;
  const int nt = (int)std::min<int64_t>(num_threads(), chunks);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t r0 = c * kRowChunk, nr = std::min(kRowChunk, N - r0);
    body(r0, nr, padded_rows(nr));
  }
}

// The LoRA side path of one call: factors A (r, K) and B (N, r), float32 / float16 / bfloat16, or
// int8 with per-rank-component scales (A's rows, B's columns; both multiply). h = x @ A^T (fp32,
// [M, r], int8: times A_scale * B_scale) is computed once per call; each row chunk's epilogue then
// adds h @ B[rows]^T to its fp32 outputs before the final cast.
struct LoraPath {
  at::Tensor a, b, hscale, h;  // contiguous factors, fp32 scale product (int8 only), h [M, r]
  int ft = kFactorF32;
  int64_t r = 0;
  bool active() const { return a.defined(); }
  const void* b_rows(int64_t r0) const {  // row r0 of B
    return static_cast<const uint8_t*>(b.data_ptr()) + r0 * r * b.element_size();
  }
};

int factor_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFactorF32;
    case at::kHalf: return kFactorF16;
    case at::kBFloat16: return kFactorBF16;
    case at::kChar: return kFactorI8;
    default: TORCH_CHECK(false, "LoRA factors must be float32, float16, bfloat16 or int8, got ", t.scalar_type());
  }
  return -1;
}

LoraPath lora_path(const c10::optional<at::Tensor>& A, const c10::optional<at::Tensor>& B,
                   const c10::optional<at::Tensor>& A_scale, const c10::optional<at::Tensor>& B_scale,
                   int64_t K, int64_t N) {
  LoraPath lp;
  const bool has_a = A.has_value() && A->defined(), has_b = B.has_value() && B->defined();
  TORCH_CHECK(has_a == has_b, "lora_A and lora_B must be given together");
  if (!has_a) return lp;
  TORCH_CHECK(A->dim() == 2 && A->size(1) == K, "lora_A must be [r, in_features=", K, "], got ", A->sizes());
  lp.r = A->size(0);
  TORCH_CHECK(B->dim() == 2 && B->size(0) == N && B->size(1) == lp.r, "lora_B must be [out_features=", N,
              ", r=", lp.r, "], got ", B->sizes());
  TORCH_CHECK(A->scalar_type() == B->scalar_type(), "lora_A is ", A->scalar_type(), " but lora_B is ",
              B->scalar_type());
  lp.ft = factor_type(*A);
  const bool has_as = A_scale.has_value() && A_scale->defined(), has_bs = B_scale.has_value() && B_scale->defined();
  if (lp.ft == kFactorI8) {
    TORCH_CHECK(has_as && has_bs && A_scale->numel() == lp.r && B_scale->numel() == lp.r,
                "int8 LoRA factors need lora_A_scale and lora_B_scale with r=", lp.r, " entries each");
    lp.hscale = (A_scale->to(at::kFloat).reshape({-1}) * B_scale->to(at::kFloat).reshape({-1})).contiguous();
  } else {
    TORCH_CHECK(!has_as && !has_bs, "lora_A_scale / lora_B_scale only go with int8 factors, got ",
                A->scalar_type());
  }
  lp.a = A->contiguous();
  lp.b = B->contiguous();
  return lp;
}

// h = x @ A^T for x float32 [M, K]: threads over tokens, or over rank components when M is small.
void lora_down(LoraPath& lp, const float* x, int64_t M, int64_t K) {
  lp.h = at::empty({M, lp.r}, at::kFloat);
  const LoraDownKernel down = active_isa() == kAvx2 ? lora_down_avx2 : lora_down_scalar;
  const char* A = static_cast<const char*>(lp.a.data_ptr());
  const int64_t esz = lp.a.element_size(), r = lp.r;
  const float* hs = lp.hscale.defined() ? lp.hscale.data_ptr<float>() : nullptr;
  float* h = lp.h.data_ptr<float>();
  const int nt = M * r * K >= (1 << 18) ? num_threads() : 1;  // below: a few microseconds
  if (M >= nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t m = 0; m < M; ++m) down(A, lp.ft, r, K, x + m * K, K, 1, hs, h + m * r, r);
  } else {
    const int64_t per = (r + nt - 1) / nt;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int t = 0; t < nt; ++t) {
      const int64_t j0 = t * per, nj = std::min(per, r - j0);
      if (nj > 0) down(A + j0 * K * esz, lp.ft, nj, K, x, K, M, hs ? hs + j0 : nullptr, h + j0, r);
    }
  }
}

// Epilogue of one row chunk: y[m, r0 + n] += h[m] . B[r0 + n] for n < nr.
void lora_up(const LoraPath& lp, int64_t r0, int64_t nr, int64_t M, float* y, int64_t N) {
  const LoraUpKernel up = active_isa() == kAvx2 ? lora_up_avx2 : lora_up_scalar;
  up(lp.b_rows(r0), lp.ft, nr, lp.r, lp.h.data_ptr<float>(), lp.r, M, y + r0, N);
}

at::Tensor ternary_a8(const at::Tensor& x2, const at::Tensor& w, const ScaleView& sv, int64_t K,
                      int64_t N, int64_t variant, const float* bias, const LoraPath& lp) {
  const int64_t M = x2.size(0), nblk = nblocks(K), Kp = nblk * kBlockK, G = sv.groups;
  const int64_t gsize = K / G, gs = kGroupRows * w.size(1);  // bytes per 4-row group
  const bool simd = active_isa() == kAvx2 && (G == 1 || gsize % kBlockK == 0);
  const A8Kernel kern = variant == 1 ? a8_avx2_dot : a8_avx2_add;
  auto xq = at::empty({M, Kp}, at::kChar);
  auto a = at::empty({M}, at::kFloat);
  auto xsum = at::empty({M, G}, at::kInt);
  quantize_tokens(x2.data_ptr<float>(), M, K, Kp, G, xq.data_ptr<int8_t>(), a.data_ptr<float>(),
                  xsum.data_ptr<int32_t>());
  auto y = at::empty({M, N}, at::kFloat);
  const int8_t* q = xq.data_ptr<int8_t>();
  const float* ap = a.data_ptr<float>();
  const int32_t* xs = xsum.data_ptr<int32_t>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  for_row_chunks(N, [&](int64_t r0, int64_t nr, int64_t nrp) {
    std::vector<int32_t> acc(M * kRowChunk);
    const uint8_t* wc = wp + (r0 / kGroupRows) * gs;
    std::vector<float> part(G > 1 ? M * kRowChunk : 0, 0.f);
    for (int64_t g = 0; g < G; ++g) {
      if (simd) {
        const int64_t b0 = g * gsize / kBlockK, nb = G == 1 ? nblk : gsize / kBlockK;
        kern(wc + b0 * kBlockStride, gs, nrp, q + b0 * kBlockK, Kp, xs + g, G, M, nb,
             acc.data(), kRowChunk);
      } else {
        a8_scalar_range(wc, gs, nr, q, Kp, M, g * gsize, (g + 1) * gsize, acc.data(), kRowChunk);
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t r = 0; r < nr; ++r) {
          const float v = (float)acc[m * kRowChunk + r] * sv.at(r0 + r, g);
          if (G == 1) yp[m * N + r0 + r] = v / ap[m] + (bias ? bias[r0 + r] : 0.f);
          else part[m * kRowChunk + r] += v;
        }
    }
    if (G > 1)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t r = 0; r < nr; ++r)
          yp[m * N + r0 + r] = part[m * kRowChunk + r] / ap[m] + (bias ? bias[r0 + r] : 0.f);
     if (lp.active()) lora_up(lp, r0, nr, M, yp, N);
  });
  return y;
}

at::Tensor ternary_a16(const at::Tensor& x2, const at::Tensor& w, const ScaleView& sv, int64_t K,
                       int64_t N, int64_t variant, const float* bias, const LoraPath& lp) {
  const int64_t M = x2.size(0), nblk = nblocks(K), Kp = nblk * kBlockK, G = sv.groups;
  const int64_t gsize = K / G, gs = kGroupRows * w.size(1);  // bytes per 4-row group
  const bool simd = active_isa() == kAvx2 && (G == 1 || gsize % kBlockK == 0);
  const A16Kernel kern = variant == 1 ? a16_avx2_dot : a16_avx2_add;
  // x in the A16 lane order (kernels.h), zero padded; xsum[m, g] accumulated in double because
  // the kernels subtract it from sum x*(w+1).
  auto xp = at::zeros({M, Kp}, at::kFloat);
  auto xsum = at::empty({M, G}, at::kFloat);
  const float* x = x2.data_ptr<float>();
  float* xpp = xp.data_ptr<float>();
  float* xsp = xsum.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t k = 0; k < K; ++k)
        xpp[m * Kp + (k / kBlockK) * kBlockK + a16_perm_index(k % kBlockK)] = x[m * K + k];
      for (int64_t g = 0; g < G; ++g) {
        double s = 0;
        for (int64_t k = g * gsize; k < (g + 1) * gsize; ++k) s += x[m * K + k];
        xsp[m * G + g] = (float)s;
      }
    }
  });
  auto y = at::empty({M, N}, at::kFloat);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  for_row_chunks(N, [&](int64_t r0, int64_t nr, int64_t nrp) {
    std::vector<float> acc(M * kRowChunk), part(M * kRowChunk, 0.f);
    const uint8_t* wc = wp + (r0 / kGroupRows) * gs;
    for (int64_t g = 0; g < G; ++g) {
      if (simd) {
        const int64_t b0 = g * gsize / kBlockK, nb = G == 1 ? nblk : gsize / kBlockK;
        kern(wc + b0 * kBlockStride, gs, nrp, xpp + b0 * kBlockK, Kp, xsp + g, G, M, nb,
             acc.data(), kRowChunk);
      } else {
        a16_scalar_range(wc, gs, nr, xpp, Kp, M, g * gsize, (g + 1) * gsize, acc.data(), kRowChunk);
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t r = 0; r < nr; ++r) part[m * kRowChunk + r] += acc[m * kRowChunk + r] * sv.at(r0 + r, g);
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < nr; ++r)
        yp[m * N + r0 + r] = part[m * kRowChunk + r] + (bias ? bias[r0 + r] : 0.f);
     if (lp.active()) lora_up(lp, r0, nr, M, yp, N);
  });
  return y;
}

}  // namespace

// Repacked weights live in 32 MB slabs of 2 MB pages. A decode step streams every weight byte
// once; with 4 KB pages that is a TLB miss per 4 KB (a two-level walk under virtualization), and
// THP is often "madvise" only. 2 MB pages read ~10-20% faster here (stream and kernel loops,
// 2026-11-28). One slab holds many layers, so the 2 MB rounding is paid per slab (at most one
// partly used page), not per tensor; a slab is freed with its last tensor. Small weights (tests,
// tiny models) take ordinary memory.
struct Slab {
  uint8_t* base;
  int64_t size, used = 0, refs = 1;  // refs: live tensors, + 1 while it is the current slab
};
std::mutex g_slab_mu;
Slab* g_slab = nullptr;

void release_slab(Slab* s) {  // with g_slab_mu held
  if (--s->refs == 0) {
    std::free(s->base);
    delete s;
  }
}

at::Tensor weight_bytes(int64_t bytes) {
  constexpr int64_t kHuge = 2 << 20, kSlab = 16 * kHuge, kAlign = 4096;
  if (bytes < kHuge / 4) return at::empty({bytes}, at::kByte);
  const int64_t need = (bytes + kAlign - 1) / kAlign * kAlign;
  std::lock_guard<std::mutex> lock(g_slab_mu);
  if (!g_slab || g_slab->size - g_slab->used < need) {
    const int64_t size = std::max(kSlab, (need + kHuge - 1) / kHuge * kHuge);
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, kHuge, size) == 0, "out of memory allocating ", size, " bytes");
#ifdef MADV_HUGEPAGE
    madvise(p, size, MADV_HUGEPAGE);  // advice only: where refused, small pages
#endif
    if (g_slab) release_slab(g_slab);
    g_slab = new Slab{static_cast<uint8_t*>(p), size};
  }
  Slab* s = g_slab;
  uint8_t* ptr = s->base + s->used;
  s->used += need;
  ++s->refs;
  return at::from_blob(ptr, {bytes}, [s](void*) {
    std::lock_guard<std::mutex> l(g_slab_mu);
    release_slab(s);
  }, at::TensorOptions().dtype(at::kByte));
}

// ---------------------------------------------------------------------------------------------
// Public ops.

// k4 uint8 [N, ceil(K/4)] -> i256 uint8 [ceil(N/4)*4, ceil(K/256)*64] (kernels.h: rows in
// groups of 4, interleaved per block), padding code 1 (weight 0), padding rows all zero weights.
// Large outputs come from the 2 MB-page slabs (weight_bytes).
at::Tensor ternary_repack_cpu(const at::Tensor& packed, int64_t K) {
  TORCH_CHECK(packed.dtype() == at::kByte && packed.dim() == 2, "packed weight must be uint8 [N, ceil(K/4)]");
  TORCH_CHECK(packed.size(1) == (K + 3) / 4, "packed weight has ", packed.size(1),
              " bytes per row; in_features=", K, " needs ", (K + 3) / 4);
  auto src = packed.contiguous();
  const int64_t N = src.size(0), cols = src.size(1), ws = nblocks(K) * kBlockBytes;
  auto out = weight_bytes(padded_rows(N) * ws).view({padded_rows(N), ws});
  out.fill_(0x55);  // code 1 (weight 0) in all four slots
  const uint8_t* s = src.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  const int64_t gs = kGroupRows * ws;
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      uint8_t* row = o + (n / kGroupRows) * gs + (n % kGroupRows) * kBlockBytes;
      for (int64_t k = 0; k < K; ++k) {
        const int code = (s[n * cols + k / 4] >> (2 * (k % 4))) & 3;
        const int64_t t = k / kBlockK, r = k % kBlockK, shift = 2 * (r / 64);
        uint8_t& byte = row[t * kBlockStride + r % 64];
        byte = (uint8_t)((byte & ~(3 << shift)) | (code << shift));
      }
    }
  });
  return out;
}

// y [..., N] = W1.58 linear of x [..., K] (float32/bfloat16/float16), same numbers as
// reference.ternary_linear_reference. w: ternary_repack_cpu output (N = out_features); scale float32 [1] | [N] |
// [N, K/G] (multiplies); bias [N] or None; act_bits 8 | 16; variant 0 = add-only, 1 = dot.
// Optional LoRA side path, y += (x @ A^T) @ B^T in fp32 before the cast (LoraPath): lora_A [r, K],
// lora_B [N, r] float32/float16/bfloat16, or int8 with lora_A_scale / lora_B_scale float32 [r].
at::Tensor ternary_linear_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                              const c10::optional<at::Tensor>& bias, int64_t K, int64_t N,
                              int64_t act_bits, int64_t variant, const c10::optional<at::Tensor>& lora_A,
                              const c10::optional<at::Tensor>& lora_B,
                              const c10::optional<at::Tensor>& lora_A_scale,
                              const c10::optional<at::Tensor>& lora_B_scale) {
  check_weight(w, K, N);
  TORCH_CHECK(act_bits == 8 || act_bits == 16, "act_bits must be 8 or 16, got ", act_bits);
  TORCH_CHECK(variant == 0 || variant == 1, "variant must be 0 (add) or 1 (dot), got ", variant);
  const ScaleView sv = scale_view(scale, N, K);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "bias has ", bias->numel(), " entries, expected ", N);
    b = bias->to(at::kFloat).contiguous();
  }
  LoraPath lp = lora_path(lora_A, lora_B, lora_A_scale, lora_B_scale, K, N);
  const at::Tensor x2 = as_float_rows(x, K);
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  if (lp.active()) lora_down(lp, x2.data_ptr<float>(), x2.size(0), K);
  at::Tensor y = act_bits == 8 ? ternary_a8(x2, w, sv, K, N, variant, bp, lp)
                               : ternary_a16(x2, w, sv, K, N, variant, bp, lp);
  return finish(y, x, N);
}

// A copy of a CPU tensor (same dtype, shape, values) in the 2 MB-page slabs, for weights that
// every decode step streams whole (the 16-bit and int8 heads): 10-15% faster to read there
// (int8 32000 x 2048 head kernel, interleaved runs, 2026-11-28).
at::Tensor large_pages_copy_cpu(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "large_pages_copy_cpu takes a CPU tensor, got ", t.device());
  const at::Tensor src = t.contiguous();
  at::Tensor out = weight_bytes(src.nbytes()).view(src.scalar_type()).view(src.sizes());
  out.copy_(src);
  return out;
}

// int32 [M, N] = x_q @ W^T for int8 x_q [M, K] (values in [-127, 127] for the add variant, as
// quantize_activations produces): the integer core, compared exactly with the reference.
at::Tensor ternary_accumulate_cpu(const at::Tensor& x_q, const at::Tensor& w, int64_t K, int64_t N,
                                  int64_t variant) {
  check_weight(w, K, N);
  TORCH_CHECK(x_q.dtype() == at::kChar && x_q.dim() == 2 && x_q.size(1) == K, "x_q must be int8 [M, K]");
  const int64_t M = x_q.size(0), Np = w.size(0), nblk = nblocks(K), Kp = nblk * kBlockK;
  const int64_t gs = kGroupRows * w.size(1);
  auto xp = at::zeros({M, Kp}, at::kChar);
  xp.narrow(1, 0, K).copy_(x_q);
  auto xsum = x_q.to(at::kInt).sum(1, false, at::kInt).contiguous();
  auto out = at::empty({M, Np}, at::kInt);
  const bool simd = active_isa() == kAvx2;
  const A8Kernel kern = variant == 1 ? a8_avx2_dot : a8_avx2_add;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int8_t* q = xp.data_ptr<int8_t>();
  int32_t* op = out.data_ptr<int32_t>();
  for_row_chunks(N, [&](int64_t r0, int64_t nr, int64_t nrp) {
    const uint8_t* wc = wp + (r0 / kGroupRows) * gs;
    if (simd) kern(wc, gs, nrp, q, Kp, xsum.data_ptr<int32_t>(), 1, M, nblk, op + r0, Np);
    else a8_scalar_range(wc, gs, nr, q, Kp, M, 0, K, op + r0, Np);
  });
  return out.narrow(1, 0, N).contiguous();
}

// Dense heads: y [..., N] = (x @ W^T) * w_scale + bias, W int8 [N, Kpad] (per-row fp32 scale,
// multiplies) or float16 [N, Kpad] (w_scale None), Kpad = K rounded up to 32, zero padded.
at::Tensor dense_linear_cpu(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& w_scale,
                            const c10::optional<at::Tensor>& bias, int64_t K) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == (K + 31) / 32 * 32,
              "dense weight must be contiguous [N, ceil(K/32)*32], got ", w.sizes(), " for K=", K);
  const bool is_int8 = w.dtype() == at::kChar;
  TORCH_CHECK(is_int8 || w.dtype() == at::kHalf, "dense weight must be int8 or float16");
  const int64_t N = w.size(0), kpad = w.size(1);
  const at::Tensor x2 = as_float_rows(x, K);
  const int64_t M = x2.size(0);
  auto xp = kpad == K ? x2 : at::constant_pad_nd(x2, {0, kpad - K});
  auto y = at::empty({M, N}, at::kFloat);
  const float* xpp = xp.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool simd = active_isa() == kAvx2;
  for_row_chunks(N, [&](int64_t r0, int64_t nr, int64_t) {
    if (is_int8) {
      const int8_t* wp = w.data_ptr<int8_t>() + r0 * kpad;
      (simd ? int8_rows_avx2 : int8_rows_scalar)(wp, kpad, nr, xpp, kpad, M, kpad, yp + r0, N);
    } else {
      const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::Half>()) + r0 * kpad;
      (simd ? half_rows_avx2 : half_rows_scalar)(wp, kpad, nr, xpp, kpad, M, kpad, yp + r0, N);
    }
  });
  if (w_scale.has_value() && w_scale->defined()) y.mul_(w_scale->to(at::kFloat));
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  return finish(y, x, N);
}

// The int4 head (bitengine/int4_head.py): y [..., N] = (sum_g scale[n, g] * q[n, g] . xq[g]) / a (+ bias), x quantized
// per token to int8 (a = 127 / max|x|, as every ternary linear's input), w uint8 [N, Kpad / 2], scale float16
// [N, Kpad / 128], Kpad = K rounded up to 128. The same numbers as int4_linear_reference up to float32 sums.
at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& bias, int64_t K) {
  const int64_t kpad = (K + 127) / 128 * 128, groups = kpad / 128;
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.dtype() == at::kByte && w.size(1) == kpad / 2,
              "int4 weight must be contiguous uint8 [N, ", kpad / 2, "], got ", w.sizes(), " for K=", K);
  const int64_t N = w.size(0);
  TORCH_CHECK(scale.dim() == 2 && scale.is_contiguous() && scale.dtype() == at::kHalf && scale.size(0) == N &&
                  scale.size(1) == groups,
              "int4 scale must be contiguous float16 [", N, ", ", groups, "], got ", scale.sizes());
  const at::Tensor x2 = as_float_rows(x, K);
  const int64_t M = x2.size(0);
  auto xq = at::zeros({M, kpad}, at::kChar);
  auto a = at::empty({M}, at::kFloat);
  auto xsum = at::empty({M, groups}, at::kInt);
  const QuantizeRow quant = active_isa() == kAvx2 ? quantize_row_avx2 : quantize_row_scalar;
  std::vector<int32_t> unused(1);
  for (int64_t m = 0; m < M; ++m) {
    int8_t* q = xq.data_ptr<int8_t>() + m * kpad;
    a.data_ptr<float>()[m] = quant(x2.data_ptr<float>() + m * K, K, K, q, unused.data());
    for (int64_t g = 0; g < groups; ++g) {
      int32_t t = 0;
      for (int64_t k = g * 128; k < (g + 1) * 128; ++k) t += q[k];
      xsum.data_ptr<int32_t>()[m * groups + g] = t;
    }
  }
  auto y = at::empty({M, N}, at::kFloat);
  const Int4Kernel kern = active_isa() == kAvx2 ? int4_rows_avx2 : int4_rows_scalar;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  for_row_chunks(N, [&](int64_t r0, int64_t nr, int64_t) {
    kern(wp + r0 * (kpad / 2), kpad / 2, sp + r0 * groups, groups, nr, xq.data_ptr<int8_t>(), kpad,
         xsum.data_ptr<int32_t>(), M, kpad, y.data_ptr<float>() + r0, N);
  });
  y.div_(a.unsqueeze(1));
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  return finish(y, x, N);
}

int kernel_threads() { return num_threads(); }
bool kernels_use_avx2() { return active_isa() == kAvx2; }

}  // namespace bitengine_cpu

TORCH_LIBRARY_FRAGMENT(bitengine, m) {
  m.def("ternary_repack_cpu(Tensor packed, int in_features) -> Tensor");
  m.def("ternary_linear_cpu(Tensor x, Tensor w, Tensor scale, Tensor? bias, int in_features, int out_features, int act_bits, int variant, Tensor? lora_A=None, Tensor? lora_B=None, Tensor? lora_A_scale=None, Tensor? lora_B_scale=None) -> Tensor");
  m.def("ternary_accumulate_cpu(Tensor x_q, Tensor w, int in_features, int out_features, int variant) -> Tensor");
  m.def("dense_linear_cpu(Tensor x, Tensor w, Tensor? w_scale, Tensor? bias, int in_features) -> Tensor");
  m.def("int4_linear_cpu(Tensor x, Tensor w, Tensor scale, Tensor? bias, int in_features) -> Tensor");
  m.def("large_pages_copy_cpu(Tensor t) -> Tensor");
}

TORCH_LIBRARY_IMPL(bitengine, CPU, m) {
  m.impl("ternary_repack_cpu", &bitengine_cpu::ternary_repack_cpu);
  m.impl("ternary_linear_cpu", &bitengine_cpu::ternary_linear_cpu);
  m.impl("ternary_accumulate_cpu", &bitengine_cpu::ternary_accumulate_cpu);
  m.impl("dense_linear_cpu", &bitengine_cpu::dense_linear_cpu);
  m.impl("int4_linear_cpu", &bitengine_cpu::int4_linear_cpu);
  m.impl("large_pages_copy_cpu", &bitengine_cpu::large_pages_copy_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace bitengine_cpu;
  m.doc() = "bitengine CPU kernels; the ops live in torch.ops.bitengine.*_cpu";
  m.def("set_isa", &set_isa, "force an ISA: auto | scalar | avx2");
  m.def("isa", [] { return std::string(kIsaNames[active_isa()]); });
  m.def("available_isas", &available_isas);
  m.def("set_num_threads", [](int n) { g_threads = std::max(0, n); }, "0: torch.get_num_threads()");
  m.def("num_threads", &num_threads);
  bind_decode_layer(m);
  if (const char* env = std::getenv("BITENGINE_CPU_ISA")) set_isa(env);
}
