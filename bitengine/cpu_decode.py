"""The CPU decode step with every decoder layer in C++ (csrc/cpu/decode_layer.cpp).

A decode step at batch 1 on the CPU is ~90 small ternary GEMVs plus ~30 small PyTorch ops per
layer around them. Run as PyTorch ops (eager, or one torch.compile graph) those ops cost about as
much again as the ternary kernels' non-memory work: dispatch, SDPA's setup for a one-token query, dynamo's
checks per call. Here each layer is one call into C++ (the same ternary_linear_cpu kernels, the
glue as plain loops, attention one kernel per head); embedding, rotary tables, mask, final norm and
head stay the model's own PyTorch code, once per step.

Used by generate() on the CPU (no compile needed); `BITENGINE_CPU_FAST_DECODE=0` or
generate(..., compile=True) runs the model's own forward instead. Applies when every layer runs on
the cpu backend with fused q/k/v and gate/up (fuse.py), float32 activations and cache, and any
adapters fused into the kernels; otherwise `plan()` says why not and the eager step runs.
Not bit-identical to the eager step (RMSNorm, exp and softmax sum in another order): float
outputs agree to ~1e-7 relative, and A8 layers can flip single int8 activation roundings (tests
bound both).
"""

from __future__ import annotations

import logging
import os

import torch

from .nn import BitLinear

log = logging.getLogger("bitengine")


def enabled() -> bool:
    return os.environ.get("BITENGINE_CPU_FAST_DECODE", "1") != "0"


def _linear_spec(layer: BitLinear):
    """The tuple csrc/cpu/decode_layer.cpp's LinearSpec takes."""
    lora = (layer.lora_A, layer.lora_B, layer.lora_A_scale, layer.lora_B_scale) if layer.lora_A is not None \
        else (None, None, None, None)
    return (layer.weight_cpu, layer.weight_scale, layer.bias, *lora, layer.in_features, layer.out_features,
            layer.act_bits)


def _why_not(model) -> str | None:
    from .backends import cpu as cpu_backend

    if cpu_backend._C is None or not hasattr(cpu_backend._C, "DecodeLayer"):
        return "the C++ CPU extension is not built"
    if model.device.type != "cpu":
        return f"the model is on {model.device}"
    if model.activation_dtype != torch.float32:
        return f"activations are {model.activation_dtype}, not float32"
    cfg = model.config
    if cfg.hidden_act not in ("silu", "relu2"):
        return f"activation {cfg.hidden_act}"
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if attn.fused is None or mlp.fused is None:
            return f"layer {i}: q/k/v or gate/up are not fused"
        if getattr(mlp.fused, "interleaved", False):
            return f"layer {i}: gate/up rows interleaved (the cuda backend's layout)"
        for lin in (attn.fused, attn.o_proj, mlp.fused, mlp.down_proj):
            if not isinstance(lin, BitLinear) or getattr(lin.backend, "name", None) != "cpu":
                return f"layer {i}: a projection does not run on the cpu backend"
            if lin.rms_norm is not None:
                return f"layer {i}: per-linear input norms"
            if lin.lora_A is not None and not lin.backend.fuses_adapter(lin):
                return f"layer {i}: an adapter the kernels do not take"
        norms = [layer.input_layernorm, layer.post_attention_layernorm, attn.attn_sub_norm, mlp.ffn_sub_norm]
        if any(n is not None and n.weight.dtype != torch.float32 for n in norms):
            return f"layer {i}: a norm weight is not float32"
    return None


def plan(model) -> list | None:
    """One C++ DecodeLayer per decoder layer, or None (with the reason logged once) when the model
    does not qualify. Built per generate() call, so adapters applied in between are picked up."""
    reason = None if enabled() else "BITENGINE_CPU_FAST_DECODE=0"
    reason = reason or _why_not(model)
    if reason:
        if model.__dict__.get("_fast_decode_reason") != reason:
            model.__dict__["_fast_decode_reason"] = reason
            log.info("bitengine: CPU decode runs the model's PyTorch layers (%s)", reason)
        return None
    model.__dict__.pop("_fast_decode_reason", None)
    from .backends import cpu as cpu_backend

    cfg = model.config
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        sub = (attn.attn_sub_norm.weight if attn.attn_sub_norm is not None else None,
               mlp.ffn_sub_norm.weight if mlp.ffn_sub_norm is not None else None)
        layers.append(cpu_backend._C.DecodeLayer(
            layer.input_layernorm.weight, layer.post_attention_layernorm.weight, *sub, cfg.rms_norm_eps,
            _linear_spec(attn.fused), _linear_spec(attn.o_proj), _linear_spec(mlp.fused), _linear_spec(mlp.down_proj),
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_act == "relu2"))
    return layers


def run_layers(model, layers: list, ks: list, vs: list, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               allowed: torch.Tensor, slots: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Embedding, the C++ layers, final norm and head for one token per row -> logits (B, V) float32.

    tokens (B, 1); cos, sin float32 (B, hd); allowed bool (B, kv_len); slots int64 (B,): where each
    row's token goes in ks / vs (the layers' (B, n_kv, S, hd) caches)."""
    from .backends import cpu as cpu_backend

    b = tokens.shape[0]
    x = model.model.embed_tokens(tokens).view(b, -1).float()  # (B, D)
    variant = cpu_backend.KERNELS[cpu_backend.kernel()]
    if all(layer.direct for layer in layers):  # all layers in one parallel region (csrc/cpu/phase_runner.h)
        x = cpu_backend._C.decode_step(layers, x, ks, vs, cos, sin, allowed, slots, kv_len, variant)
    else:  # group scales or adapters: each layer through ternary_linear_cpu
        for layer, k, v in zip(layers, ks, vs):
            x = layer.forward(x, k, v, cos, sin, allowed, slots, kv_len, variant)
    return model.lm_head(model.model.norm(x)).float()


def decode_rows(model, layers: list, cache, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """One token per row, each at its own cache slot, which is also its rotary position (the server's
    continuous batch: generate's left padding is FastCpuDecoder's job). tokens (B, 1), slots int64 (B,);
    cache: a KVCache or a view of its rows. Returns logits (B, V) float32."""
    b = tokens.shape[0]
    kv_len = int(slots.max()) + 1
    pos = slots.view(b, 1)
    cos, sin = (c.reshape(b, -1).contiguous() for c in model.rope(pos))
    allowed = model._mask(b, 1, pos, cache, kv_len, tokens.device).reshape(b, kv_len).contiguous()
    ks = [getattr(cache, f"k{i}") for i in range(len(layers))]
    vs = [getattr(cache, f"v{i}") for i in range(len(layers))]
    return run_layers(model, layers, ks, vs, tokens, cos, sin, allowed, slots.contiguous(), kv_len)


class FastCpuDecoder:
    """generate()'s one-token decode step over `plan(model)`: (tokens (B, 1), slot) -> logits (B, V) float32.

    Same interface and cache as generate.Decoder (slots attended: 0..slot, like the eager CPU step)."""

    def __init__(self, model, cache, position_offset: torch.Tensor, layers: list):
        self.model, self.cache, self.offset, self.layers = model, cache, position_offset, layers
        self.ks, self.vs = cache.k, cache.v
        # rotary tables for every slot, computed once instead of ~10 small ops per step: (S, B, hd)
        slots = torch.arange(cache.max_seq)
        cos, sin = model.rope(slots[None] - position_offset[:, None])  # (B, 1, S, hd)
        self.cos, self.sin = (t[:, 0].transpose(0, 1).contiguous() for t in (cos, sin))
        self.slots = torch.empty(cache.batch, dtype=torch.long)

    def __call__(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        model, cache = self.model, self.cache
        b = tokens.shape[0]
        if model.config.sliding_window:
            allowed = model._mask(b, 1, torch.tensor([slot]), cache, slot + 1, tokens.device).reshape(b, -1).contiguous()
        else:  # what _mask gives without a window: the valid slots up to this one, and this one
            allowed = cache.valid[:, :slot + 1].clone()
            allowed[:, slot] = True
        return run_layers(model, self.layers, self.ks, self.vs, tokens, self.cos[slot], self.sin[slot], allowed,
                          self.slots.fill_(slot), slot + 1)
