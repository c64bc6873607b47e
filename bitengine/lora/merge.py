"""Merging LoRA deltas into weights: 16-bit (exact) and ternary (re-rounded), and the convert hook.

The delta of a module is `sum_i weight_i * scaling_i * B_i @ A_i`, computed in float32.

Ternary merge (`requant`):
  - "grid" (default): codes re-rounded on the layer's own scale grid,
    `q' = clamp(round((s*q + delta) / s), -1, 1)`, scale kept. The stored scale is the absmean of
    the latent weights the checkpoint was made from, so this is the absmean quantizer applied to
    the merged latent weights with the latent scale; a zero delta leaves the layer bit-identical.
  - "absmean": re-run absmean (same granularity) on `s*q + delta`. mean|s*q| is s times the
    fraction of non-zero codes, so this shrinks the scale (and every output) even for a zero
    delta; kept for comparison only.
Either way a ternary step is about s ~ mean|W|, far larger than a typical LoRA update, so most
of a small delta rounds away: apply.py measures how much of the adapter's effect survives.
"""

from __future__ import annotations

import torch

from ..quant import (
    absmean_quantize,
    dequantize,
    expand_scale,
    pack_ternary,
    unpack_ternary,
)
from .peft_format import ModuleFactors, normalize_adapters, read_adapter, resolve


def delta_weight(factors: list[ModuleFactors], device=None) -> torch.Tensor:
    """float32 [N, K] = sum_i coef_i * (B_i @ A_i) (PEFT's get_delta_weight, times the stacking weight)."""
    delta = None
    for f in factors:
        d = (f.B.to(device) @ f.A.to(device)) * f.coef
        delta = d if delta is None else delta + d
    return delta


def granularity_of(scale: torch.Tensor, in_features: int) -> tuple[str, int]:
    """('tensor' | 'channel' | 'group', group_size) of a stored weight_scale."""
    if scale.numel() == 1:
        return "tensor", 0
    if scale.dim() == 1:
        return "channel", 0
    return "group", in_features // scale.shape[1]


def merge_ternary(packed: torch.Tensor, scale: torch.Tensor, in_features: int, delta: torch.Tensor,
                  requant: str = "grid") -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(packed', scale', stats) for W' = dequant(packed, scale) + delta, re-ternarized (see module docstring).

    packed uint8 [N, ceil(K/4)] (k4), scale float32 [1] | [N] | [N, K/G] (multiplies), delta float32 [N, K].
    stats: `survival` = <dW_q, delta> / |delta|^2 (the share of the delta the new codes carry) and
    `flipped` = fraction of codes that changed.
    """
    q = unpack_ternary(packed, in_features, torch.float32)  # (N, K)
    n, k = q.shape
    w = dequantize(q, scale)
    merged = w + delta
    if requant == "grid":
        s = expand_scale(scale, n, k)
        q2 = (merged / s).round().clamp(-1, 1)
        new_scale = scale
    elif requant == "absmean":
        gran, gs = granularity_of(scale, in_features)
        q2, new_scale = absmean_quantize(merged, gran, gs)
        q2 = q2.float()
    else:
        raise ValueError(f"requant must be 'grid' or 'absmean', got {requant!r}")
    dw = dequantize(q2, new_scale) - w
    den = delta.pow(2).sum().clamp(min=1e-30)
    stats = {"survival": float((dw * delta).sum() / den), "flipped": float((q2 != q).float().mean()),
             "residual": float((dw - delta).pow(2).sum().sqrt() / den.sqrt())}
    return pack_ternary(q2.to(torch.int8)), new_scale.float().contiguous(), stats


def merge_hook(adapters, cfg):
    """For `convert(..., adapters=[...])`: fn(module_name, W16) -> float32 W + delta (W itself when untargeted).

    Everything is validated here against `cfg` (a ModelConfig), before convert writes anything. The
    head is refused: convert does not route it through the hook (and it is often tied to the embeddings).
    """
    from ..model import expected_shapes
    from .peft_format import AdapterError

    shapes, linears = expected_shapes(cfg)
    linear_shapes = {m: shapes[f"{m}.weight"] for m in linears}
    all_shapes = dict(linear_shapes, lm_head=shapes.get("lm_head.weight", shapes["model.embed_tokens.weight"]))
    loaded = [read_adapter(p, w) for p, w in normalize_adapters(adapters)]
    factors = resolve(loaded, all_shapes, num_layers=cfg.num_layers)
    if "lm_head" in factors:
        raise AdapterError(f"{factors['lm_head'][0].source}: targets lm_head, which convert does not merge; "
                           "load the adapter at run time (fused) instead")
    pending = set(factors)

    def hook(module_name: str, weight: torch.Tensor) -> torch.Tensor:
        fs = factors.get(module_name)
        if not fs:
            return weight
        pending.discard(module_name)
        return weight.float() + delta_weight(fs, weight.device)

    hook.pending = pending  # modules not yet merged (empty after a complete conversion)
    hook.factors = factors
    return hook
