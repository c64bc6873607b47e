// One whole decoder layer (Llama / BitNet) for one new token per row, in C++: the CPU decode
// step's fast path (bitengine/cpu_decode.py builds one DecodeLayer per layer and calls them).
//
// Why: at batch 1 a TinyLlama-shape decode step spends ~20 ms in the ternary kernels but ~14 ms
// around them when the layer runs as PyTorch ops (eager or torch.compile: per-op dispatch,
// SDPA's setup for a one-token query, dynamo's per-call checks; profiled 2026-11-28). Here the
// glue between the four matmuls is a few plain loops, and attention is one kernel per head.
//
// Same math as model.DecoderLayer.forward (float32 throughout):
//   h = rmsnorm(x) * w_in; q|k|v = qkv(h); rotary on q and k (x*cos + roll(x, hd/2)*sin_signed,
//   products and sum rounded separately, as the eager ops do); k, v written to cache slot `pos`;
//   y = softmax(q.k / sqrt(hd) over the allowed slots) v per head (GQA: head j reads KV head
//   j / (H / n_kv)); [y = rmsnorm(y) * w_attn_sub]; x1 = x + o(y); h = rmsnorm(x1) * w_post;
//   g|u = gate_up(h); a = silu(g) * u (or relu(g)^2 * u); [a = rmsnorm(a) * w_ffn_sub];
//   out = x1 + down(a).
// forward(): the linears are ternary_linear_cpu itself (quantization, scales, bias and LoRA side
// path as there); decode_step(): the same kernels and epilogue on raw pointers (RawLinear), all
// layers of a step in one parallel region (phase_runner.h), the same bits. Not bit-identical to the
// eager layer: RMSNorm's sum, exp and softmax's order differ in
// the last bits, which can flip single int8 activation roundings of A8 layers (tests bound it).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "kernels.h"
#include "phase_runner.h"
#include "ternary_ops.h"

namespace bitengine_cpu {
namespace {

// One ternary projection as BitLinear holds it (backends/cpu.py): repacked weight, float32 scale,
// bias, LoRA factors (+ int8 scales), in/out features, activation bits.
using LinearSpec = std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
                              c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
                              int64_t, int64_t, int64_t>;

struct Linear {
  LinearSpec s;
  int64_t in() const { return std::get<7>(s); }
  int64_t out() const { return std::get<8>(s); }
  at::Tensor operator()(const at::Tensor& x, int64_t variant) const {
    return ternary_linear_cpu(x, std::get<0>(s), std::get<1>(s), std::get<2>(s), std::get<7>(s), std::get<8>(s),
                              std::get<9>(s), variant, std::get<3>(s), std::get<4>(s), std::get<5>(s),
                              std::get<6>(s));
  }
};

constexpr int64_t kChunkRows = 128;  // output rows per work item (as ternary_ops.cpp's kRowChunk)

// Activations of one linear call, prepared once (serially) and read by every row chunk.
struct Acts {
  std::vector<int8_t> xq;                // A8: int8 codes [M, Kp], zero padded
  std::vector<float> xp, a, xsf;         // A16: x in the kernels' lane order [M, Kp]; A8: 127/absmax; A16: sum x
  std::vector<int32_t> xs;               // A8: sum of codes per token
};

// One Linear as raw pointers for the step runner: per-tensor or per-channel scale, no LoRA (other
// layers run through forward(), i.e. ternary_linear_cpu). Same kernels and the same epilogue as
// ternary_linear_cpu's (ternary_ops.cpp), so the outputs are the same bits.
struct RawLinear {
  const uint8_t* w = nullptr;
  int64_t gs = 0, K = 0, N = 0, Kp = 0, nblk = 0, act_bits = 8;
  const float* scale = nullptr;
  bool per_channel = false;
  const float* bias = nullptr;

  int64_t chunks() const { return (N + kChunkRows - 1) / kChunkRows; }

  void prepare(const float* x, int64_t M, Acts& act, bool avx2) const {
    if (act_bits == 8) {
      act.xq.assign(M * Kp, 0);
      act.a.resize(M);
      act.xs.resize(M);
      const QuantizeRow quant = avx2 ? quantize_row_avx2 : quantize_row_scalar;
      for (int64_t m = 0; m < M; ++m) act.a[m] = quant(x + m * K, K, K, act.xq.data() + m * Kp, act.xs.data() + m);
    } else {
      act.xp.assign(M * Kp, 0.f);
      act.xsf.resize(M);
      for (int64_t m = 0; m < M; ++m) {
        double sum = 0;
        for (int64_t k = 0; k < K; ++k) {
          act.xp[m * Kp + (k / kBlockK) * kBlockK + a16_perm_index(k % kBlockK)] = x[m * K + k];
          sum += x[m * K + k];
        }
        act.xsf[m] = (float)sum;
      }
    }
  }

  // Rows [c * kChunkRows, ...) of y [M, N]; scratch: M * kChunkRows words.
  void chunk(int64_t c, int64_t M, const Acts& act, bool avx2, int64_t variant, float* y, void* scratch) const {
    const int64_t r0 = c * kChunkRows, nr = std::min(kChunkRows, N - r0);
    const int64_t nrp = (nr + kGroupRows - 1) / kGroupRows * kGroupRows;
    const uint8_t* wc = w + (r0 / kGroupRows) * gs;
    if (act_bits == 8) {
      int32_t* acc = static_cast<int32_t*>(scratch);
      if (avx2) (variant == 1 ? a8_avx2_dot : a8_avx2_add)(wc, gs, nrp, act.xq.data(), Kp, act.xs.data(), 1, M,
                                                         nblk, acc, kChunkRows);
      else a8_scalar_range(wc, gs, nr, act.xq.data(), Kp, M, 0, K, acc, kChunkRows);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t r = 0; r < nr; ++r) {
          const float v = (float)acc[m * kChunkRows + r] * scale[per_channel ? r0 + r : 0];
          y[m * N + r0 + r] = v / act.a[m] + (bias ? bias[r0 + r] : 0.f);
        }
    } else {
      float* acc = static_cast<float*>(scratch);
      if (avx2) (variant == 1 ? a16_avx2_dot : a16_avx2_add)(wc, gs, nrp, act.xp.data(), Kp, act.xsf.data(), 1, M,
                                                           nblk, acc, kChunkRows);
      else a16_scalar_range(wc, gs, nr, act.xp.data(), Kp, M, 0, K, acc, kChunkRows);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t r = 0; r < nr; ++r) {
          const float v = 0.f + acc[m * kChunkRows + r] * scale[per_channel ? r0 + r : 0];
          y[m * N + r0 + r] = v + (bias ? bias[r0 + r] : 0.f);
        }
    }
  }
};

// The RawLinear of a Linear, or none (ok = false) when it has group scales or a LoRA side path.
// bias_f32 keeps the float32 copy of the bias alive.
RawLinear raw_linear(const Linear& l, at::Tensor& bias_f32, bool& ok) {
  RawLinear r;
  const at::Tensor& w = std::get<0>(l.s);
  const at::Tensor& scale = std::get<1>(l.s);
  const int64_t blocks = (l.in() + kBlockK - 1) / kBlockK, rows = (l.out() + kGroupRows - 1) / kGroupRows * kGroupRows;
  TORCH_CHECK(w.dtype() == at::kByte && w.dim() == 2 && w.is_contiguous() && w.size(0) == rows &&
                  w.size(1) == blocks * kBlockBytes,
              "DecodeLayer: repacked weight for ", l.in(), " -> ", l.out(), " must be contiguous uint8 [", rows, ", ",
              blocks * kBlockBytes, "], got ", w.dtype(), " ", w.sizes());
  ok = !std::get<3>(l.s).has_value() && scale.dtype() == at::kFloat && scale.is_contiguous() &&
       (scale.numel() == 1 || (scale.dim() == 1 && scale.size(0) == l.out()));
  if (!ok) return r;
  r.w = w.data_ptr<uint8_t>();
  r.gs = kGroupRows * w.size(1);
  r.K = l.in();
  r.N = l.out();
  r.nblk = (r.K + kBlockK - 1) / kBlockK;
  r.Kp = r.nblk * kBlockK;
  r.act_bits = std::get<9>(l.s);
  r.scale = scale.data_ptr<float>();
  r.per_channel = scale.numel() > 1;
  if (std::get<2>(l.s).has_value()) {
    bias_f32 = std::get<2>(l.s)->to(at::kFloat).contiguous();
    r.bias = bias_f32.data_ptr<float>();
  }
  return r;
}

// y[m] = x[m] * (1 / sqrt(mean(x[m]^2) + eps)) * w, rows of length D (sum of squares in double).
void rmsnorm_rows(const float* x, const float* w, int64_t M, int64_t D, float eps, float* y) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * D;
    double ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += (double)xr[i] * xr[i];
    const float rstd = 1.f / std::sqrt((float)(ss / D) + eps);
    for (int64_t i = 0; i < D; ++i) y[m * D + i] = (xr[i] * rstd) * w[i];
  }
}

at::Tensor rmsnorm(const at::Tensor& x, const at::Tensor& w, float eps) {
  auto y = at::empty_like(x);
  rmsnorm_rows(x.data_ptr<float>(), w.data_ptr<float>(), x.size(0), x.size(1), eps, y.data_ptr<float>());
  return y;
}

// In place: v = v * cos + roll(v, hd/2) * sin_signed for one head vector (see model.apply_rope).
void rope(float* v, const float* cos, const float* sin, int64_t hd, float* tmp) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < hd; ++i) {
    const float a = v[i] * cos[i], b = v[(i + half) % hd] * sin[i];
    tmp[i] = a + b;
  }
  std::copy(tmp, tmp + hd, v);
}

// a[i] = silu(g[i]) * u[i] (or relu(g[i])^2 * u[i]) for i in [i0, i1) of one row.
void gated_act(const float* g, const float* u, int64_t i0, int64_t i1, bool relu2, float* a) {
  for (int64_t i = i0; i < i1; ++i) {
    const float act = relu2 ? std::max(g[i], 0.f) * std::max(g[i], 0.f) : g[i] / (1.f + std::exp(-g[i]));
    a[i] = act * u[i];
  }
}

void check_f32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dtype() == at::kFloat && t.is_contiguous(), "DecodeLayer: ", what,
              " must be contiguous float32, got ", t.dtype(), " ", t.sizes());
}

// Buffers of one decode step run by decode_step (all layers share them).
struct StepBuffers {
  std::vector<float> h, qkv, y, proj, gu, act;  // norm output, q|k|v, attention, o/down output, gate|up, MLP
  Acts acts;
  std::vector<std::vector<char>> scratch;  // per thread: a row chunk's accumulators, attention scores
};

class DecodeLayer {
 public:
  DecodeLayer(at::Tensor in_norm, at::Tensor post_norm, c10::optional<at::Tensor> attn_sub_norm,
              c10::optional<at::Tensor> ffn_sub_norm, double eps, LinearSpec qkv, LinearSpec o,
              LinearSpec gate_up, LinearSpec down, int64_t heads, int64_t kv_heads, int64_t head_dim,
              bool relu2)
      : in_norm_(in_norm), post_norm_(post_norm), eps_((float)eps), qkv_{qkv}, o_{o}, gate_up_{gate_up},
        down_{down}, H_(heads), KV_(kv_heads), hd_(head_dim), relu2_(relu2) {
    if (attn_sub_norm.has_value()) attn_sub_norm_ = *attn_sub_norm;
    if (ffn_sub_norm.has_value()) ffn_sub_norm_ = *ffn_sub_norm;
    D_ = in_norm_.numel();
    I_ = gate_up_.out() / 2;
    TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim % 2 == 0,
                "DecodeLayer: heads=", heads, ", kv_heads=", kv_heads, ", head_dim=", head_dim);
    TORCH_CHECK(qkv_.in() == D_ && qkv_.out() == (H_ + 2 * KV_) * hd_, "DecodeLayer: qkv is ", qkv_.in(), " -> ",
                qkv_.out(), ", expected ", D_, " -> ", (H_ + 2 * KV_) * hd_);
    TORCH_CHECK(o_.in() == H_ * hd_ && o_.out() == D_, "DecodeLayer: o_proj is ", o_.in(), " -> ", o_.out());
    TORCH_CHECK(gate_up_.in() == D_ && gate_up_.out() % 2 == 0, "DecodeLayer: gate_up is ", gate_up_.in(),
                " -> ", gate_up_.out());
    TORCH_CHECK(down_.in() == I_ && down_.out() == D_, "DecodeLayer: down_proj is ", down_.in(), " -> ", down_.out());
    check_f32(in_norm_, "input norm weight");
    check_f32(post_norm_, "post-attention norm weight");
    if (attn_sub_norm_.defined()) check_f32(attn_sub_norm_, "attention sub-norm weight");
    if (ffn_sub_norm_.defined()) check_f32(ffn_sub_norm_, "MLP sub-norm weight");
    TORCH_CHECK(post_norm_.numel() == D_ && (!attn_sub_norm_.defined() || attn_sub_norm_.numel() == H_ * hd_) &&
                    (!ffn_sub_norm_.defined() || ffn_sub_norm_.numel() == I_),
                "DecodeLayer: norm weights do not match hidden ", D_, ", attention ", H_ * hd_, ", intermediate ", I_);
    bool ok[4];
    raw_[0] = raw_linear(qkv_, bias_[0], ok[0]);
    raw_[1] = raw_linear(o_, bias_[1], ok[1]);
    raw_[2] = raw_linear(gate_up_, bias_[2], ok[2]);
    raw_[3] = raw_linear(down_, bias_[3], ok[3]);
    direct_ = ok[0] && ok[1] && ok[2] && ok[3];
  }

  // True when decode_step can run this layer (no group scales, no LoRA side path).
  bool direct() const { return direct_; }

  // x float32 [B, D] -> the layer's output [B, D], through ternary_linear_cpu (any scale, LoRA).
  // kc, vc: this layer's cache (B, n_kv, S, hd) float32; pos: int64 [B], the slot each row's token
  // is written to (< kv_len); cos, sin: float32 [B, hd] (CausalLM.rope for each row's position);
  // allowed: bool [B, kv_len], the slots each row attends to (CausalLM._mask).
  at::Tensor forward(const at::Tensor& x, at::Tensor kc, at::Tensor vc, const at::Tensor& cos,
                     const at::Tensor& sin, const at::Tensor& allowed, const at::Tensor& pos, int64_t kv_len,
                     int64_t variant) const {
    check(x, kc, vc, cos, sin, allowed, pos, kv_len);
    const int64_t B = x.size(0);
    at::Tensor qkv = qkv_(rmsnorm(x, in_norm_, eps_), variant);  // (B, (H + 2 n_kv) hd)
    rope_and_store(qkv.data_ptr<float>(), B, kc, vc, cos, sin, pos);
    auto y = at::empty({B, H_ * hd_}, at::kFloat);
    const AttendHead head = kernels_use_avx2() ? attend_head_avx2 : attend_head_scalar;
    const int nt = (int)std::min<int64_t>(kernel_threads(), B * H_);
#pragma omp parallel num_threads(nt)
    {
      std::vector<float> scores(kv_len);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < B * H_; ++t)
        attend(head, t, qkv.data_ptr<float>(), kc, vc, kv_len, allowed, scores.data(), y.data_ptr<float>());
    }
    if (attn_sub_norm_.defined()) y = rmsnorm(y, attn_sub_norm_, eps_);
    at::Tensor x1 = x + o_(y, variant);
    at::Tensor gu = gate_up_(rmsnorm(x1, post_norm_, eps_), variant);  // (B, 2 I): gate | up
    auto a = at::empty({B, I_}, at::kFloat);
    const float* gp = gu.data_ptr<float>();
    float* ap = a.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) gated_act(gp + b * 2 * I_, gp + b * 2 * I_ + I_, 0, I_, relu2_, ap + b * I_);
    if (ffn_sub_norm_.defined()) a = rmsnorm(a, ffn_sub_norm_, eps_);
    return x1 + down_(a, variant);
  }

  void check(const at::Tensor& x, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& cos,
             const at::Tensor& sin, const at::Tensor& allowed, const at::Tensor& pos, int64_t kv_len) const {
    check_f32(x, "x");
    TORCH_CHECK(x.dim() == 2 && x.size(1) == D_, "DecodeLayer: x must be [B, ", D_, "], got ", x.sizes());
    const int64_t B = x.size(0);
    check_f32(kc, "key cache");
    check_f32(vc, "value cache");
    TORCH_CHECK(kc.dim() == 4 && kc.size(0) == B && kc.size(1) == KV_ && kc.size(3) == hd_ && vc.sizes() == kc.sizes(),
                "DecodeLayer: caches must be [", B, ", ", KV_, ", S, ", hd_, "], got ", kc.sizes(), " and ", vc.sizes());
    TORCH_CHECK(pos.dtype() == at::kLong && pos.is_contiguous() && pos.numel() == B,
                "DecodeLayer: pos must be contiguous int64 [B=", B, "], got ", pos.dtype(), " ", pos.sizes());
    TORCH_CHECK(kv_len <= kc.size(2), "DecodeLayer: kv_len ", kv_len, " does not fit a cache of ", kc.size(2), " slots");
    for (int64_t b = 0; b < B; ++b) {
      const int64_t p = pos.data_ptr<int64_t>()[b];
      TORCH_CHECK(0 <= p && p < kv_len, "DecodeLayer: row ", b, " slot ", p, " is outside kv_len ", kv_len);
    }
    check_f32(cos, "cos");
    check_f32(sin, "sin");
    TORCH_CHECK(cos.numel() == B * hd_ && sin.numel() == B * hd_, "DecodeLayer: cos/sin must be [B, hd]");
    TORCH_CHECK(allowed.dtype() == at::kBool && allowed.is_contiguous() && allowed.numel() == B * kv_len,
                "DecodeLayer: allowed must be contiguous bool [B, kv_len=", kv_len, "], got ", allowed.sizes());
  }

  int64_t max_width() const { return std::max({D_, I_, qkv_.out(), 2 * I_}); }

  // The same layer as forward(), on raw buffers, inside decode_step's parallel region (driver
  // thread; every loop over rows or heads is a phase of `run`). x [B, D] is updated in place.
  void run_direct(PhaseRunner& run, StepBuffers& buf, float* x, int64_t B, at::Tensor& kc, at::Tensor& vc,
                  const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& allowed, const at::Tensor& pos,
                  int64_t kv_len, int64_t variant, bool avx2) const {
    rmsnorm_rows(x, in_norm_.data_ptr<float>(), B, D_, eps_, buf.h.data());
    linear(run, buf, raw_[0], buf.h.data(), B, buf.qkv.data(), variant, avx2);
    rope_and_store(buf.qkv.data(), B, kc, vc, cos, sin, pos);
    const AttendHead head = avx2 ? attend_head_avx2 : attend_head_scalar;
    run.parallel(B * H_, [&](int64_t t) {
      float* scores = reinterpret_cast<float*>(buf.scratch[omp_get_thread_num()].data());
      attend(head, t, buf.qkv.data(), kc, vc, kv_len, allowed, scores, buf.y.data());
    });
    const float* y = buf.y.data();
    if (attn_sub_norm_.defined()) {
      rmsnorm_rows(y, attn_sub_norm_.data_ptr<float>(), B, H_ * hd_, eps_, buf.h.data());
      y = buf.h.data();
    }
    linear(run, buf, raw_[1], y, B, buf.proj.data(), variant, avx2);
    for (int64_t i = 0; i < B * D_; ++i) x[i] = x[i] + buf.proj[i];
    rmsnorm_rows(x, post_norm_.data_ptr<float>(), B, D_, eps_, buf.h.data());
    linear(run, buf, raw_[2], buf.h.data(), B, buf.gu.data(), variant, avx2);
    constexpr int64_t kActItems = 8;  // exp over the intermediate size: worth two threads
    const int64_t per = (I_ + kActItems - 1) / kActItems;
    run.parallel(B * kActItems, [&](int64_t t) {
      const int64_t b = t / kActItems, i0 = (t % kActItems) * per, i1 = std::min(I_, i0 + per);
      const float* g = buf.gu.data() + b * 2 * I_;
      if (i0 < i1) gated_act(g, g + I_, i0, i1, relu2_, buf.act.data() + b * I_);
    });
    const float* a = buf.act.data();
    if (ffn_sub_norm_.defined()) {
      rmsnorm_rows(a, ffn_sub_norm_.data_ptr<float>(), B, I_, eps_, buf.h.data());
      a = buf.h.data();
    }
    linear(run, buf, raw_[3], a, B, buf.proj.data(), variant, avx2);
    for (int64_t i = 0; i < B * D_; ++i) x[i] = x[i] + buf.proj[i];
  }

 private:
  static void linear(PhaseRunner& run, StepBuffers& buf, const RawLinear& l, const float* in, int64_t B, float* out,
                     int64_t variant, bool avx2) {
    l.prepare(in, B, buf.acts, avx2);
    run.parallel(l.chunks(), [&](int64_t c) {
      l.chunk(c, B, buf.acts, avx2, variant, out, buf.scratch[omp_get_thread_num()].data());
    });
  }

  // Rotary embedding on the q and k heads of each row of qkv (B, (H + 2 n_kv) hd), then row b's k
  // and v into cache slot pos[b].
  void rope_and_store(float* qkv, int64_t B, at::Tensor& kc, at::Tensor& vc, const at::Tensor& cos,
                      const at::Tensor& sin, const at::Tensor& pos) const {
    const int64_t row = (H_ + 2 * KV_) * hd_, S = kc.size(2);
    float* kcp = kc.data_ptr<float>();
    float* vcp = vc.data_ptr<float>();
    std::vector<float> tmp(hd_);
    for (int64_t b = 0; b < B; ++b) {
      float* r = qkv + b * row;
      for (int64_t j = 0; j < H_ + KV_; ++j)
        rope(r + j * hd_, cos.data_ptr<float>() + b * hd_, sin.data_ptr<float>() + b * hd_, hd_, tmp.data());
      for (int64_t j = 0; j < KV_; ++j) {
        const int64_t slot = ((b * KV_ + j) * S + pos.data_ptr<int64_t>()[b]) * hd_;
        std::copy(r + (H_ + j) * hd_, r + (H_ + j + 1) * hd_, kcp + slot);
        std::copy(r + (H_ + KV_ + j) * hd_, r + (H_ + KV_ + j + 1) * hd_, vcp + slot);
      }
    }
  }

  // Query head t = b * H + h of qkv against its KV head (GQA: h / (H / n_kv)) -> y[b, h].
  void attend(AttendHead head, int64_t t, const float* qkv, const at::Tensor& kc, const at::Tensor& vc,
              int64_t kv_len, const at::Tensor& allowed, float* scores, float* y) const {
    const int64_t b = t / H_, h = t % H_, j = h / (H_ / KV_), S = kc.size(2);
    const int64_t base = (b * KV_ + j) * S * hd_;
    head(qkv + b * (H_ + 2 * KV_) * hd_ + h * hd_, kc.data_ptr<float>() + base, vc.data_ptr<float>() + base, kv_len,
         hd_, reinterpret_cast<const uint8_t*>(allowed.data_ptr<bool>()) + b * kv_len, 1.f / std::sqrt((float)hd_),
         scores, y + b * H_ * hd_ + h * hd_);
  }

  at::Tensor in_norm_, post_norm_, attn_sub_norm_, ffn_sub_norm_;
  float eps_;
  Linear qkv_, o_, gate_up_, down_;
  int64_t H_, KV_, hd_, D_ = 0, I_ = 0;
  bool relu2_;
  RawLinear raw_[4];
  at::Tensor bias_[4];
  bool direct_ = false;
};

// All layers of one decode step in one parallel region (PhaseRunner): x float32 [B, D] -> the last
// layer's output. Every layer must be direct(); ks / vs: the layers' caches; the rest as forward().
at::Tensor decode_step(const std::vector<DecodeLayer*>& layers, const at::Tensor& x, std::vector<at::Tensor> ks,
                       std::vector<at::Tensor> vs, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& allowed, const at::Tensor& pos, int64_t kv_len, int64_t variant) {
  TORCH_CHECK(!layers.empty() && ks.size() == layers.size() && vs.size() == layers.size(),
              "decode_step: ", layers.size(), " layers, ", ks.size(), " key and ", vs.size(), " value caches");
  int64_t width = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    TORCH_CHECK(layers[i]->direct(), "decode_step: layer ", i, " has group scales or adapters; use forward()");
    layers[i]->check(x, ks[i], vs[i], cos, sin, allowed, pos, kv_len);
    width = std::max(width, layers[i]->max_width());
  }
  const int64_t B = x.size(0);
  auto out = x.clone();
  StepBuffers buf;
  for (auto* v : {&buf.h, &buf.qkv, &buf.y, &buf.proj, &buf.gu, &buf.act}) v->resize(B * width);
  const int nt = std::max(1, kernel_threads());
  const size_t scratch = std::max<int64_t>(B * kChunkRows, kv_len) * sizeof(float);
  buf.scratch.assign(nt, std::vector<char>(scratch));
  const bool avx2 = kernels_use_avx2();
  PhaseRunner run;
  float* xp = out.data_ptr<float>();
  {
    pybind11::gil_scoped_release nogil;
#pragma omp parallel num_threads(nt)
    {
      if (omp_get_thread_num() == 0) {
        for (size_t i = 0; i < layers.size(); ++i)
          layers[i]->run_direct(run, buf, xp, B, ks[i], vs[i], cos, sin, allowed, pos, kv_len, variant, avx2);
        run.finish();
      } else {
        run.worker();
      }
    }
  }
  return out;
}

}  // namespace

void bind_decode_layer(pybind11::module_& m) {
  pybind11::class_<DecodeLayer>(m, "DecodeLayer",
                                "One decoder layer for one new token per row (csrc/cpu/decode_layer.cpp)")
      .def(pybind11::init<at::Tensor, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>, double,
                          LinearSpec, LinearSpec, LinearSpec, LinearSpec, int64_t, int64_t, int64_t, bool>())
      .def_property_readonly("direct", &DecodeLayer::direct)
      .def("forward", &DecodeLayer::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("decode_step", &decode_step, "all layers of a decode step in one parallel region (decode_layer.cpp)");
}

}  // namespace bitengine_cpu
