"""Linear layers of a loaded bitengine model.

BitLinear holds a ternary weight exactly as the checkpoint stores it (`weight_packed`, uint8
[N, ceil(K/4)], layout k4; `weight_scale`, float32 [1] | [N] | [N, K/G], multiplies) and runs
its matmul through the backend chosen at load time (backends/). DenseLinear is the 16-bit
layer used for kept modules and for `--weights fp16` checkpoints (the FP16 baseline).

Both carry an optional low-rank side path (LoRA adapters, lora.py): `y += (x @ A^T) @ B^T`,
with the adapters' scaling already folded into B, so one path serves any number of stacked
adapters (their factors are concatenated along the rank).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quant import packed_cols


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 (as transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-5, dtype=torch.float16, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused op instead of six; identical math when nothing needs upcasting
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class _AdapterPath:
    """Mixin: the fused low-rank side path shared by BitLinear and DenseLinear."""

    lora_A: torch.Tensor | None
    lora_B: torch.Tensor | None

    def _init_adapter(self) -> None:
        self.lora_A = None  # (r_total, K), compute dtype (int8 when lora_A_scale is set)
        self.lora_B = None  # (N, r_total), scaling folded in (int8 when lora_B_scale is set)
        self.lora_A_scale = None  # float32 (r_total,) each: absmax scales of int8 factors per rank component
        self.lora_B_scale = None  # (rows of A, columns of B; multiply)

    def _adapter_delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_A_scale is None:
            return F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        # int8 factors: both scales act on the rank-r intermediate, so the factors are only cast, never
        # rescaled; float32 because x @ A_q^T (|A_q| <= 127) can leave the fp16 range
        h = F.linear(x.float(), self.lora_A.float()) * (self.lora_A_scale * self.lora_B_scale)
        return F.linear(h, self.lora_B.float()).to(x.dtype)


class BitLinear(nn.Module, _AdapterPath):
    """y = W1.58 linear(x) (+ bias) (+ adapter path); see quant.py for the number formats."""

    def __init__(self, in_features: int, out_features: int, *, act_bits: int = 8, scale_shape=(1,),
                 bias: bool = False, input_norm_eps: float | None = None, dtype=torch.float16, device=None):
        super().__init__()
        if act_bits not in (8, 16):
            raise ValueError(f"act_bits must be 8 or 16, got {act_bits}")
        self.in_features = in_features
        self.out_features = out_features
        self.act_bits = act_bits
        self.register_buffer(
            "weight_packed", torch.empty(out_features, packed_cols(in_features), dtype=torch.uint8, device=device)
        )
        self.register_buffer("weight_scale", torch.empty(*scale_shape, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        # transformers' bitnet `use_rms_norm`: a learned RMSNorm on the input of every BitLinear
        self.rms_norm = RMSNorm(in_features, input_norm_eps, dtype, device) if input_norm_eps else None
        self.backend = None  # set by prepare()
        self._init_adapter()

    @property
    def group_size(self) -> int:
        """Inputs per scale group (0 when the scale is per tensor or per channel)."""
        return self.in_features // self.weight_scale.shape[1] if self.weight_scale.dim() == 2 else 0

    def prepare(self, backend) -> None:
        """Bind a backend and let it repack the weights into its kernel layout."""
        self.backend = backend
        backend.prepare(self)

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual + linear(norm(x)), norm and residual optional (the decode step passes the layer's input norm
        and the residual stream). A backend with `linear_fused` (CUDA) may run all of it in one kernel; it
        returns None where it does not apply, and the steps run one by one."""
        eager_adapter = self.lora_A is not None and not self.backend.fuses_adapter(self)
        if (norm is not None or residual is not None) and self.rms_norm is None and not eager_adapter:
            fused = getattr(self.backend, "linear_fused", None)
            y = fused(x, self, norm, residual) if fused is not None else None
            if y is not None:
                return y
        if norm is not None:
            x = norm(x)
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        y = self.backend.linear(x, self)  # includes the side path when the backend fuses it
        if eager_adapter:
            y = y + self._adapter_delta(x)
        return y if residual is None else y + residual

    def extra_repr(self) -> str:
        scale = {1: "tensor"}.get(self.weight_scale.numel(), "channel" if self.weight_scale.dim() == 1 else
                                  f"group:{self.group_size}")
        return (f"in={self.in_features}, out={self.out_features}, W1.58A{self.act_bits}, scale={scale}, "
                f"backend={getattr(self.backend, 'name', None)}")


class DenseLinear(nn.Module, _AdapterPath):
    """A 16-bit linear layer (kept modules, fp16 checkpoints, the head)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, dtype=torch.float16, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.bias = None
        self._init_adapter()

    def prepare(self, backend) -> None:
        pass

    def forward(self, x: torch.Tensor, norm: RMSNorm | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """residual + linear(norm(x)) (norm and residual optional), as BitLinear."""
        if norm is not None:
            x = norm(x)
        y = _dense_linear(x, self.weight, self.bias)
        if self.lora_A is not None:
            y = y + self._adapter_delta(x)
        return y if residual is None else y + residual


def _dense_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear, except a float16 weight under float32 activations on the CPU (what the loader keeps there, see
    loader.cpu_keeps_half): the C++ F16C kernel, float32 sums of the float16 values, no float32 copy of the weight."""
    if w.dtype == torch.float16 and x.dtype == torch.float32 and x.device.type == "cpu":
        if w.shape[1] % 32 == 0 and w.is_contiguous() and cpu_kernels_built():
            return torch.ops.bitengine.dense_linear_cpu(x, w, None, b, w.shape[1])
        return F.linear(x, w.float(), None if b is None else b.float())
    return F.linear(x, w, b)


def cpu_kernels_built() -> bool:
    from .backends import cpu

    return cpu._C is not None
