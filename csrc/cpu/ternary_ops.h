// What ternary_ops.cpp shares with the other torch-facing files of the CPU extension
// (decode_layer.cpp): the linear op itself and the runtime settings it runs under.
#pragma once
#include <torch/extension.h>

namespace bitengine_cpu {

// torch.ops.bitengine.ternary_linear_cpu (documented at its definition).
at::Tensor ternary_linear_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                              const c10::optional<at::Tensor>& bias, int64_t K, int64_t N,
                              int64_t act_bits, int64_t variant, const c10::optional<at::Tensor>& lora_A,
                              const c10::optional<at::Tensor>& lora_B,
                              const c10::optional<at::Tensor>& lora_A_scale,
                              const c10::optional<at::Tensor>& lora_B_scale);

int kernel_threads();     // the thread count the kernels use (set_num_threads / torch's)
bool kernels_use_avx2();  // the ISA setting (BITENGINE_CPU_ISA / set_isa) picked AVX2

void bind_decode_layer(pybind11::module_& m);  // decode_layer.cpp: the DecodeLayer class

}  // namespace bitengine_cpu
