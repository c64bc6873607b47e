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
// The linears are ternary_linear_cpu itself (quantization, scales, bias and LoRA side path as
// there). Not bit-identical to the eager layer: RMSNorm's sum, exp and softmax's order differ in
// the last bits, which can flip single int8 activation roundings of A8 layers (tests bound it).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "kernels.h"
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

void check_f32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dtype() == at::kFloat && t.is_contiguous(), "DecodeLayer: ", what,
              " must be contiguous float32, got ", t.dtype(), " ", t.sizes());
}

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
  }

  // x float32 [B, D] -> the layer's output [B, D]. kc, vc: this layer's cache (B, n_kv, S, hd)
  // float32, written at slot `pos`; cos, sin: float32 [B, hd] (CausalLM.rope for each row's
  // position); allowed: bool [B, kv_len], the slots each row attends to (CausalLM._mask).
  at::Tensor forward(const at::Tensor& x, at::Tensor kc, at::Tensor vc, const at::Tensor& cos,
                     const at::Tensor& sin, const at::Tensor& allowed, int64_t pos, int64_t kv_len,
                     int64_t variant) const {
    check_f32(x, "x");
    TORCH_CHECK(x.dim() == 2 && x.size(1) == D_, "DecodeLayer: x must be [B, ", D_, "], got ", x.sizes());
    const int64_t B = x.size(0);
    check_f32(kc, "key cache");
    check_f32(vc, "value cache");
    TORCH_CHECK(kc.dim() == 4 && kc.size(0) == B && kc.size(1) == KV_ && kc.size(3) == hd_ && vc.sizes() == kc.sizes(),
                "DecodeLayer: caches must be [", B, ", ", KV_, ", S, ", hd_, "], got ", kc.sizes(), " and ", vc.sizes());
    const int64_t S = kc.size(2);
    TORCH_CHECK(0 <= pos && pos < kv_len && kv_len <= S, "DecodeLayer: slot ", pos, " and kv_len ", kv_len,
                " do not fit a cache of ", S, " slots");
    check_f32(cos, "cos");
    check_f32(sin, "sin");
    TORCH_CHECK(cos.numel() == B * hd_ && sin.numel() == B * hd_, "DecodeLayer: cos/sin must be [B, hd]");
    TORCH_CHECK(allowed.dtype() == at::kBool && allowed.is_contiguous() && allowed.numel() == B * kv_len,
                "DecodeLayer: allowed must be contiguous bool [B, kv_len=", kv_len, "], got ", allowed.sizes());

    // attention block
    at::Tensor qkv = qkv_(rmsnorm(x, in_norm_, eps_), variant);  // (B, (H + 2 n_kv) hd)
    float* qp = qkv.data_ptr<float>();
    const int64_t row = qkv.size(1);
    float* kcp = kc.data_ptr<float>();
    float* vcp = vc.data_ptr<float>();
    std::vector<float> tmp(hd_);
    for (int64_t b = 0; b < B; ++b) {
      float* r = qp + b * row;
      for (int64_t j = 0; j < H_ + KV_; ++j) rope(r + j * hd_, cos.data_ptr<float>() + b * hd_,
                                                   sin.data_ptr<float>() + b * hd_, hd_, tmp.data());
      for (int64_t j = 0; j < KV_; ++j) {
        const int64_t slot = ((b * KV_ + j) * S + pos) * hd_;
        std::copy(r + (H_ + j) * hd_, r + (H_ + j + 1) * hd_, kcp + slot);
        std::copy(r + (H_ + KV_ + j) * hd_, r + (H_ + KV_ + j + 1) * hd_, vcp + slot);
      }
    }
    auto y = at::empty({B, H_ * hd_}, at::kFloat);
    attend(qp, row, kcp, vcp, S, kv_len, reinterpret_cast<const uint8_t*>(allowed.data_ptr<bool>()), B,
           y.data_ptr<float>());
    if (attn_sub_norm_.defined()) y = rmsnorm(y, attn_sub_norm_, eps_);
    at::Tensor x1 = x + o_(y, variant);

    // MLP block
    at::Tensor gu = gate_up_(rmsnorm(x1, post_norm_, eps_), variant);  // (B, 2 I): gate | up
    auto a = at::empty({B, I_}, at::kFloat);
    const float* gp = gu.data_ptr<float>();
    float* ap = a.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < I_; ++i) {
        const float g = gp[b * 2 * I_ + i], u = gp[b * 2 * I_ + I_ + i];
        const float act = relu2_ ? std::max(g, 0.f) * std::max(g, 0.f) : g / (1.f + std::exp(-g));
        ap[b * I_ + i] = act * u;
      }
    if (ffn_sub_norm_.defined()) a = rmsnorm(a, ffn_sub_norm_, eps_);
    return x1 + down_(a, variant);
  }

 private:
  // y[b, h] = attention of query head h of row b over slots [0, kv_len), heads spread over threads.
  void attend(const float* q, int64_t qrow, const float* kc, const float* vc, int64_t S, int64_t kv_len,
              const uint8_t* allowed, int64_t B, float* y) const {
    const AttendHead head = kernels_use_avx2() ? attend_head_avx2 : attend_head_scalar;
    const float scale = 1.f / std::sqrt((float)hd_);
    const int64_t tasks = B * H_, group = H_ / KV_;
    const int nt = (int)std::min<int64_t>(kernel_threads(), tasks);
#pragma omp parallel num_threads(nt)
    {
      std::vector<float> scores(kv_len);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tasks; ++t) {
        const int64_t b = t / H_, h = t % H_, j = h / group;
        const int64_t base = (b * KV_ + j) * S * hd_;
        head(q + b * qrow + h * hd_, kc + base, vc + base, kv_len, hd_, allowed + b * kv_len, scale,
             scores.data(), y + b * H_ * hd_ + h * hd_);
      }
    }
  }

  at::Tensor in_norm_, post_norm_, attn_sub_norm_, ffn_sub_norm_;
  float eps_;
  Linear qkv_, o_, gate_up_, down_;
  int64_t H_, KV_, hd_, D_ = 0, I_ = 0;
  bool relu2_;
};

}  // namespace

void bind_decode_layer(pybind11::module_& m) {
  pybind11::class_<DecodeLayer>(m, "DecodeLayer",
                                "One decoder layer for one new token per row (csrc/cpu/decode_layer.cpp)")
      .def(pybind11::init<at::Tensor, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>, double,
                          LinearSpec, LinearSpec, LinearSpec, LinearSpec, int64_t, int64_t, int64_t, bool>())
      .def("forward", &DecodeLayer::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace bitengine_cpu
