"""The "triton" backend: Triton ternary kernels on CUDA GPUs (bitengine/kernels).

prepare() repacks the k4 weight into the i2w layout (kernels/layout.py) as a non-persistent
buffer `weight_i2w`; the checkpoint layout (`weight_packed`) is left untouched here (the loader then
moves it to host memory: loader.checkpoint_layout_to_host, so the GPU holds one 2-bit copy). Layers whose
scale groups the kernels cannot take (group size not a multiple of 32) keep running on the reference path;
prepare() logs which.
LoRA adapters with float factors are computed by the kernels (the `lora_A` / `lora_B` arguments of
bitengine::ternary_linear, added in the epilogue); int8 factors stay on BitLinear's eager path.
"""

from __future__ import annotations

import logging

import torch

from . import register

log = logging.getLogger("bitengine")


def kernel_support(layer) -> str | None:
    """None if the Triton kernels take this layer's scale layout, else the reason."""
    scale = layer.weight_scale
    if scale.dim() == 2:
        group = layer.in_features // scale.shape[1]
        if group % 32:
            return f"scale group size {group} is not a multiple of 32"
    return None


def prepare_i2w(layer) -> bool:
    """Attach `weight_i2w` (int32 [N, KW]) to a layer; False when its scales force the reference path."""
    from ..kernels.layout import k4_to_i2w

    reason = kernel_support(layer)
    if reason:
        log.warning("bitengine: %s stays on the reference path: %s", layer.extra_repr(), reason)
        layer._kernel_ok = False
        return False
    layer.register_buffer("weight_i2w", k4_to_i2w(layer.weight_packed, layer.in_features), persistent=False)
    layer._kernel_ok = True
    return True


def reference_linear(x, layer):
    from ..reference import ternary_linear_reference

    return ternary_linear_reference(x, layer.weight_packed, layer.weight_scale, layer.in_features,
                                    layer.act_bits, layer.bias)


class TritonBackend:
    name = "triton"

    def unavailable_reason(self, device: torch.device) -> str | None:
        if torch.device(device).type != "cuda":
            return "runs on CUDA devices only"
        if not torch.cuda.is_available():
            return "torch has no usable CUDA device"
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return f"triton is not importable ({e})"
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 0):
            return f"needs compute capability 8.0 or newer (int8 tensor cores), device has {major}.{minor}"
        return None

    def prepare(self, layer) -> None:
        prepare_i2w(layer)

    def fuses_adapter(self, layer) -> bool:
        """16-bit (or float32) LoRA factors run in the kernels' epilogue; int8 factors (lora_A_scale set)
        and layers on the reference path leave the side path to BitLinear's eager matmuls."""
        return (getattr(layer, "lora_A", None) is not None and layer.lora_A_scale is None
                and layer.lora_A.is_floating_point() and getattr(layer, "_kernel_ok", False))

    def linear(self, x: torch.Tensor, layer) -> torch.Tensor:
        if not layer._kernel_ok:
            return reference_linear(x, layer)
        from ..kernels import ops  # noqa: F401  (registers torch.ops.bitengine.ternary_linear)

        fused = self.fuses_adapter(layer)
        return torch.ops.bitengine.ternary_linear(x, layer.weight_i2w, layer.weight_scale, layer.in_features,
                                                  layer.act_bits, layer.bias, layer.lora_A if fused else None,
                                                  layer.lora_B if fused else None)


register(TritonBackend())
