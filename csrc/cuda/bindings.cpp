// pybind11 bindings of bitengine._C_cuda (built by setup.py when torch has CUDA and nvcc exists).
//
// Call these through bitengine.backends.cuda.ternary_gemv_a8, which checks every input in Python first
// (check_gemv_inputs): on the GPU machine an exception thrown here (a failing TORCH_CHECK) crashed the process
// with a segmentation fault instead of raising RuntimeError, with the ABI flag set (setup.py) and without;
// cause not found (bench/results/gpu_tests_NVIDIA_H200_2026-12-02.log). The checks below stay as the last line
// (same rules); the nvcc-compiled side only returns CUDA errors.
#include <cuda_runtime_api.h>
#include <torch/extension.h>

// The nvcc-compiled side returns CUDA errors instead of throwing.
torch::Tensor ternary_gemv_a8_cuda_checked(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                                           int64_t in_features, const c10::optional<torch::Tensor>& bias,
                                           const c10::optional<torch::Tensor>& norm_weight, double eps,
                                           const c10::optional<torch::Tensor>& residual, int64_t act,
                                           int64_t version, int64_t rows_per_warp, bool pdl, cudaError_t* err);
cudaError_t read_probe_cuda(torch::Tensor buf, torch::Tensor out);
cudaError_t int8_gemv_cuda(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                           const c10::optional<torch::Tensor>& bias, int K, torch::Tensor& y);
constexpr int64_t kInt8GemvMaxK = 12288;  // int8_gemv.cu: x as float in 48 KB of shared memory
cudaError_t int4_gemv_cuda(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                           const c10::optional<torch::Tensor>& bias, int K, torch::Tensor& y);
constexpr int64_t kInt4GemvMaxK = 32768;  // int4_gemv.cu: x as int8 in shared memory (Kp bytes)
// ternary_mma_kernels.cuh (M > 1): 8 tokens' x_q rows (mma_row_bytes) and 8 KB for the static arrays in 227 KB
constexpr int64_t kMmaMaxK = 27904;
inline bool mma_fits(int64_t kw) { return 8 * (((kw / 4 + 3) / 4 * 4 + 1) * 64) + 8192 <= 227 * 1024; }

namespace {

// A [n] tensor in x's dtype on x's device (bias, norm weight, residual), or none.
void check_vector(const c10::optional<torch::Tensor>& t, const torch::Tensor& x, int64_t n, const char* name) {
  if (!t) return;
  TORCH_CHECK(t->is_cuda() && t->device() == x.device() && t->numel() == n && t->scalar_type() == x.scalar_type() &&
                  t->is_contiguous(),
              "ternary_gemv_a8: ", name, " must be a contiguous [", n, "] tensor in x's dtype on x's device, got ",
              t->sizes(), " ", t->scalar_type());
}

torch::Tensor ternary_gemv_a8(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t in_features,
                              c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> norm_weight,
                              double norm_eps, c10::optional<torch::Tensor> residual, int64_t act,
                              int64_t version, int64_t rows_per_warp, bool pdl) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda() && scale.is_cuda() && x.device() == w.device() && x.device() == scale.device(),
              "ternary_gemv_a8: x, w and scale must be on one CUDA device");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "ternary_gemv_a8: x must be float16, bfloat16 or float32, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(1) == in_features && x.is_contiguous(),
              "x must be a contiguous [M, ", in_features, "] tensor, got ", x.sizes());
  const int64_t m = x.size(0);
  TORCH_CHECK(m == 1 || ((in_features * x.element_size()) % 16 == 0 && mma_fits(w.size(1))),
              "ternary_gemv_a8: M > 1 needs rows of x in whole 16-byte vectors and in_features <= ", kMmaMaxK);
  TORCH_CHECK(w.scalar_type() == at::kInt && w.dim() == 2 && w.stride(1) == 1 && w.size(1) % 16 == 0 &&
                  w.size(1) * 16 >= in_features && w.stride(0) % 4 == 0,
              "w must be i2w int32 [N, KW] with KW % 16 == 0 and KW * 16 >= in_features, got ", w.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && (scale.numel() == 1 || scale.numel() == w.size(0)),
              "scale must be float32 [1] or [N] (N = ", w.size(0), "), got ", scale.sizes());
  TORCH_CHECK((w.size(1) + 127) / 128 * 128 * 16 <= 200 * 1024, "in_features ", in_features,
              " too large for the CUDA GEMV");
  TORCH_CHECK(version >= 1 && version <= 3, "version must be 1, 2 or 3, got ", version);
  TORCH_CHECK(rows_per_warp == 1 || rows_per_warp == 2 || rows_per_warp == 4, "rows_per_warp must be 1, 2 or 4, got ",
              rows_per_warp);
  check_vector(bias, x, w.size(0), "bias");
  check_vector(norm_weight, x, in_features, "norm_weight");
  check_vector(residual, x, m * w.size(0), "residual");
  TORCH_CHECK(norm_eps >= 0, "ternary_gemv_a8: norm_eps must be >= 0, got ", norm_eps);
  TORCH_CHECK(act >= 0 && act <= 2 && (act == 0 || (w.size(0) % 2 == 0 && !residual)),
              "ternary_gemv_a8: act must be 0, 1 (silu) or 2 (relu2); a gating act needs an even N and no residual");
  // the kernels read x and the norm weight with 16-byte loads
  if (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16) x = x.clone();
  if (norm_weight && reinterpret_cast<uintptr_t>(norm_weight->data_ptr()) % 16) norm_weight = norm_weight->clone();
  cudaError_t err = cudaSuccess;
  auto y = ternary_gemv_a8_cuda_checked(x, w, scale, in_features, bias, norm_weight, norm_eps, residual, act,
                                        version, rows_per_warp, pdl, &err);
  TORCH_CHECK(err == cudaSuccess, "ternary_gemv_a8: CUDA launch failed: ", cudaGetErrorString(err));
  return y;
}

void read_probe(torch::Tensor buf, torch::Tensor out) {
  TORCH_CHECK(buf.is_cuda() && buf.is_contiguous() && out.is_cuda() && out.numel() >= 1 &&
                  out.element_size() == 4 && out.device() == buf.device(),
              "read_probe: buf a contiguous CUDA tensor, out a 4-byte CUDA tensor on its device");
  TORCH_CHECK((buf.numel() * buf.element_size()) % 16 == 0 && reinterpret_cast<uintptr_t>(buf.data_ptr()) % 16 == 0,
              "read_probe: buf must be 16-byte aligned and a multiple of 16 bytes");
  const cudaError_t err = read_probe_cuda(buf, out);
  TORCH_CHECK(err == cudaSuccess, "read_probe: CUDA launch failed: ", cudaGetErrorString(err));
}

// The int8 head's GEMV (int8_gemv.cu); kernels/int8_linear.py checks the same rules first.
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t in_features,
                        c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda() && scale.is_cuda() && x.device() == w.device() && x.device() == scale.device(),
              "int8_gemv: x, w and scale must be on one CUDA device");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "int8_gemv: x must be float16, bfloat16 or float32, got ", x.scalar_type());
  TORCH_CHECK(x.numel() == in_features && x.is_contiguous(), "int8_gemv: x must be a contiguous [1, ", in_features,
              "] tensor, got ", x.sizes());
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2 && w.stride(1) == 1 && w.size(1) % 16 == 0 &&
                  w.stride(0) % 16 == 0 && w.size(1) >= in_features && w.size(1) <= kInt8GemvMaxK &&
                  reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
              "int8_gemv: w must be 16-byte aligned row-major int8 [N, Kp], Kp % 16 == 0, in_features <= Kp <= ",
              kInt8GemvMaxK, ", got ", w.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == w.size(0) && scale.is_contiguous(),
              "int8_gemv: scale must be contiguous float32 [", w.size(0), "]");
  TORCH_CHECK(!bias || (bias->is_cuda() && bias->device() == x.device() && bias->scalar_type() == at::kFloat &&
                        bias->numel() == w.size(0) && bias->is_contiguous()),
              "int8_gemv: bias must be contiguous float32 [", w.size(0), "] on x's device");
  auto y = torch::empty({1, w.size(0)}, x.options());
  if (w.size(0) == 0) return y;
  const cudaError_t err = int8_gemv_cuda(x, w, scale, bias, static_cast<int>(in_features), y);
  TORCH_CHECK(err == cudaSuccess, "int8_gemv: CUDA launch failed: ", cudaGetErrorString(err));
  return y;
}

// The int4 head's GEMV (int4_gemv.cu); kernels/int4_linear.py checks the same rules first.
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t in_features,
                        c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda() && scale.is_cuda() && x.device() == w.device() && x.device() == scale.device(),
              "int4_gemv: x, w and scale must be on one CUDA device");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "int4_gemv: x must be float16, bfloat16 or float32, got ", x.scalar_type());
  TORCH_CHECK(x.numel() == in_features && x.is_contiguous() && in_features > 0,
              "int4_gemv: x must be a contiguous [1, ", in_features, "] tensor, got ", x.sizes());
  const int64_t kp = (in_features + 127) / 128 * 128;
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous() && w.size(1) * 2 == kp &&
                  kp <= kInt4GemvMaxK && reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0,
              "int4_gemv: w must be 16-byte aligned contiguous uint8 [N, ", kp / 2, "] with ", kp, " <= ",
              kInt4GemvMaxK, ", got ", w.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.dim() == 2 && scale.size(0) == w.size(0) &&
                  scale.size(1) == kp / 128 && scale.is_contiguous(),
              "int4_gemv: scale must be contiguous float16 [", w.size(0), ", ", kp / 128, "]");
  TORCH_CHECK(!bias || (bias->is_cuda() && bias->device() == x.device() && bias->scalar_type() == at::kFloat &&
                        bias->numel() == w.size(0) && bias->is_contiguous()),
              "int4_gemv: bias must be contiguous float32 [", w.size(0), "] on x's device");
  auto y = torch::empty({1, w.size(0)}, x.options());
  if (w.size(0) == 0) return y;
  const cudaError_t err = int4_gemv_cuda(x, w, scale, bias, static_cast<int>(in_features), y);
  TORCH_CHECK(err == cudaSuccess, "int4_gemv: CUDA launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bitengine CUDA kernels: W1.58A8 decode GEMV on the i2w weight layout, the int8 and int4 heads' GEMVs";
  m.def("ternary_gemv_a8", &ternary_gemv_a8,
        "y[M, N] = W1.58A8 linear of x[M, K] (or of RMSNorm(x) * norm_weight) (+ bias) (+ residual), or with act 1 / 2 "
        "act(gate) * up of an interleaved gate/up layer (y[M, N / 2]); fused per-token quantization; M > 1 on the "
        "tensor cores",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("in_features"), py::arg("bias") = py::none(),
        py::arg("norm_weight") = py::none(), py::arg("norm_eps") = 0.0, py::arg("residual") = py::none(),
        py::arg("act") = 0, py::arg("version") = 2, py::arg("rows_per_warp") = 1, py::arg("pdl") = false);
  m.def("int8_gemv", &int8_gemv, "y[1, N] = (x[1, K] @ W_q^T) * scale (+ bias): the int8 head's decode GEMV",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("in_features"), py::arg("bias") = py::none());
  m.def("int4_gemv", &int4_gemv,
        "y[1, N] = the int4 head's decode GEMV of x[1, K] (group-wise int4 weights, x quantized to int8 per token)",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("in_features"), py::arg("bias") = py::none());
  m.def("read_probe", &read_probe, "read a buffer once at full speed (bandwidth ceiling for the benchmarks)",
        py::arg("buf"), py::arg("out"));
}
