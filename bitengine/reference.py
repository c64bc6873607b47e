"""Plain-PyTorch twins of every kernel: the test oracle and the fallback backend.

`ternary_linear_reference` defines what every ternary linear kernel computes (see quant.py for the
number formats). It unpacks the weights and runs float matmuls on integer-valued operands, which
is exact for the A8 integer accumulation (all partial sums stay below 2^24).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import quantize_activations, unpack_ternary


def _grouped(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """sum_g (x[:, g] @ w_q[:, g]^T) * scale[:, g]; x float32 [M, K], w_q float32 [N, K]."""
    n, k = w_q.shape
    groups = scale.shape[1]
    gs = k // groups
    xg = x.reshape(-1, groups, gs).transpose(0, 1)  # (G, M, gs)
    wg = w_q.reshape(n, groups, gs).permute(1, 2, 0)  # (G, gs, N)
    partial = torch.bmm(xg, wg)  # (G, M, N): exact integer sums for A8
    return (partial * scale.t()[:, None, :]).sum(0)


def ternary_linear_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    in_features: int,
    act_bits: int = 8,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = W1.58 linear of x.

    x: float [..., K]; packed: uint8 [N, ceil(K/4)] (layout k4); scale: float32 [1], [N] or
    [N, K/G] (multiplies); act_bits: 8 (per-token int8 activations) or 16 (activations as given).
    Returns [..., N] in x's dtype. Computed in float32.
    """
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, layer expects {in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    w_q = unpack_ternary(packed, in_features, torch.float32)
    if act_bits == 8:
        xs, a = quantize_activations(x2)
    elif act_bits == 16:
        xs, a = x2.float(), None
    else:
        raise ValueError(f"act_bits must be 8 or 16, got {act_bits}")
    scale = scale.float()
    if scale.dim() == 2:
        y = _grouped(xs, w_q, scale)
    else:
        y = F.linear(xs, w_q) * scale  # scale [1] or [N] broadcasts over the last dim
    if a is not None:
        y = y / a
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, -1)


def ternary_accumulate_reference(x_q: torch.Tensor, packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 [M, N] = x_q @ W_q^T for int8 x_q [M, K]: the integer core kernels must match exactly."""
    w_q = unpack_ternary(packed, in_features, torch.int64)
    return (x_q.to(torch.int64) @ w_q.t()).to(torch.int32)
