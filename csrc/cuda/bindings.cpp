// pybind11 bindings of bitengine._C_cuda (built by setup.py when torch has CUDA and nvcc exists).
#include <torch/extension.h>

torch::Tensor ternary_gemv_a8_cuda(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t in_features,
                                   c10::optional<torch::Tensor> bias, int64_t rows_per_warp, bool pdl);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bitengine CUDA kernels: W1.58A8 decode GEMV on the i2w weight layout";
  m.def("ternary_gemv_a8", &ternary_gemv_a8_cuda, "y[1, N] = W1.58A8 linear of x[1, K] (fused quantization)",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("in_features"), py::arg("bias") = py::none(),
        py::arg("rows_per_warp") = 1, py::arg("pdl") = false);
}
