"""Ternary weight quantization (absmean), int8 activation quantization and 2-bit packing.

These are the numerical definitions every backend must reproduce; `reference.py` builds the
reference linear layer on top of them and every kernel is tested against that.

Weights (BitNet b1.58, arXiv:2402.17764): per tensor `s = max(mean(|W|), 1e-5)`,
`W_q = clamp(round(W / s), -1, 1)`, and the layer computes `y = s * (x @ W_q^T)`.
Options: one scale per output channel (row), or one per group of `G` inputs along K.
The stored scale always MULTIPLIES: `W ~= scale * W_q`.

Activations (W1.58A8): per token `a = 127 / max(max|x|, 1e-5)`, `x_q = clamp(round(x * a), -128, 127)`
in float32, rounding half to even; then `y = (x_q @ W_q^T) * s / a`.

Packed layout "k4" (format version 1), the on-disk layout of every ternary weight:
    packed: uint8 [N, ceil(K / 4)]; byte j of row n holds weights k = 4j .. 4j+3;
    weight 4j + i sits in bits 2i..2i+1 (i = 0 is the least significant pair);
    the 2-bit code is w + 1, so 0 -> -1, 1 -> 0, 2 -> +1 (3 never occurs: loaders reject it).
    When K is not a multiple of 4 the last byte is padded with code 1 (weight 0), which adds
    nothing to any sum, so kernels may read the padding as real weights.
"""

from __future__ import annotations

import torch

EPS = 1e-5
PACK_LAYOUT = "k4"
WEIGHTS_PER_BYTE = 4


def packed_cols(in_features: int) -> int:
    """Bytes per packed row for `in_features` weights (four weights per byte, rounded up)."""
    return (in_features + WEIGHTS_PER_BYTE - 1) // WEIGHTS_PER_BYTE


def parse_scale_granularity(spec: str) -> tuple[str, int]:
    """'tensor' | 'channel' | 'group:N' -> (kind, group_size); group_size is 0 unless kind is group."""
    if spec in ("tensor", "channel"):
        return spec, 0
    if spec.startswith("group:"):
        try:
            size = int(spec.split(":", 1)[1])
        except ValueError:
            size = -1
        if size <= 0 or size % WEIGHTS_PER_BYTE:
            raise ValueError(f"scale granularity {spec!r}: group size must be a positive multiple of 4")
        return "group", size
    raise ValueError(f"scale granularity {spec!r}: expected 'tensor', 'channel' or 'group:N'")


def absmean_quantize(w: torch.Tensor, granularity: str = "tensor", group_size: int = 0):
    """Ternarize a weight matrix with absmean scales.

    w: float [N, K]. Returns (w_q int8 [N, K] in {-1, 0, 1}, scale float32) where scale is
    [1] (tensor), [N] (channel) or [N, K // group_size] (group), and W ~= scale * w_q.
    Computed in float32 like the BitNet reference code.
    """
    if w.dim() != 2:
        raise ValueError(f"absmean_quantize expects a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    wf = w.float()
    if granularity == "tensor":
        scale = wf.abs().mean().clamp(min=EPS).reshape(1)
        expanded = scale
    elif granularity == "channel":
        scale = wf.abs().mean(dim=1).clamp(min=EPS)  # (N,)
        expanded = scale[:, None]
    elif granularity == "group":
        if group_size <= 0 or k % group_size:
            raise ValueError(f"in_features {k} is not a multiple of the scale group size {group_size}")
        scale = wf.reshape(n, k // group_size, group_size).abs().mean(dim=2).clamp(min=EPS)  # (N, G)
        expanded = scale.repeat_interleave(group_size, dim=1)
    else:
        raise ValueError(f"unknown scale granularity {granularity!r}")
    w_q = (wf / expanded).round().clamp(-1, 1).to(torch.int8)
    return w_q, scale.contiguous()


def expand_scale(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Broadcast a tensor/channel/group scale to a float32 [N, K] matrix."""
    scale = scale.float()
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(n, k)
    if scale.dim() == 1:
        return scale[:, None].expand(n, k)
    group = k // scale.shape[1] if k % scale.shape[1] == 0 else None
    if group is None:
        raise ValueError(f"scale shape {tuple(scale.shape)} does not divide in_features {k}")
    return scale.repeat_interleave(group, dim=1)


def dequantize(w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 W = scale * w_q for any scale granularity."""
    n, k = w_q.shape
    return w_q.float() * expand_scale(scale, n, k)


def quantize_activations(x: torch.Tensor):
    """Per-token absmax int8 quantization: returns (x_q as float32 integers, a float32 [..., 1]).

    x_q holds integer values in [-128, 127] (kept as float32 so reference matmuls stay exact:
    every partial sum of |x_q| * |w_q| is below 2^24 for K < 131072). Dequantize with x_q / a.
    """
    xf = x.float()
    a = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    x_q = (xf * a).round().clamp(-128, 127)
    return x_q, a


def pack_ternary(w_q: torch.Tensor) -> torch.Tensor:
    """int [N, K] ternary -> uint8 [N, ceil(K/4)] in layout k4 (see module docstring)."""
    if w_q.dim() != 2:
        raise ValueError(f"pack_ternary expects a 2-D tensor, got shape {tuple(w_q.shape)}")
    n, k = w_q.shape
    codes = (w_q.to(torch.int16) + 1).to(torch.uint8)
    if ((codes > 2).any()):
        raise ValueError("pack_ternary: values outside {-1, 0, 1}")
    pad = packed_cols(k) * WEIGHTS_PER_BYTE - k
    if pad:
        codes = torch.cat([codes, torch.ones(n, pad, dtype=torch.uint8, device=codes.device)], dim=1)
    codes = codes.reshape(n, -1, WEIGHTS_PER_BYTE)  # (N, K/4, 4)
    packed = codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)
    return packed.contiguous()


def unpack_codes(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [N, ceil(K/4)] -> uint8 codes [N, K] in {0, 1, 2} (padding dropped)."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & 3  # (N, K/4, 4)
    return codes.reshape(packed.shape[0], -1)[:, :in_features]


def unpack_ternary(packed: torch.Tensor, in_features: int, dtype=torch.int8) -> torch.Tensor:
    """uint8 [N, ceil(K/4)] -> [N, K] ternary values in `dtype`."""
    return unpack_codes(packed, in_features).to(dtype) - 1


def check_packed_codes(packed: torch.Tensor, in_features: int) -> None:
    """Raise ValueError if a packed tensor holds the unused code 3 or non-zero padding."""
    codes = unpack_codes(packed, packed.shape[1] * WEIGHTS_PER_BYTE)
    if (codes == 3).any():
        raise ValueError("packed ternary weight holds the invalid 2-bit code 3")
    if (codes[:, in_features:] != 1).any():
        raise ValueError("packed ternary weight has non-zero padding past in_features")
