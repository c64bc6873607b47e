"""L2 prefetch plan of the CUDA decode step: which weights each C++ GEMV asks L2 to fetch when it is done.

A batch-1 decode step is a chain of memory-bound GEMVs with latency-bound kernels between them (RoPE and
cache writes, attention, the MLP's gating): while those run, the DRAM idles, and every GEMV starts cold,
paying its ramp-up before its weight stream reaches full speed. So each C++ GEMV, once its warps have issued
their own last weight loads, asks L2 for the weights of the next ternary layer of the step (one bulk
prefetch per warp, csrc/cuda/gemv_common.cuh: prefetch_l2_slice). The next layer then reads them from L2.
A prefetch is a hint: the outputs are the same bits with or without it.

The plan is a plain attribute `l2_prefetch` on each ternary layer the step runs (the fused q/k/v and
gate/up layers where fused): the next layer's kernel weight buffer (`weight_i2w`), or None. The backend
passes it to the C++ GEMV (backends/cuda.py); Triton calls ignore it. The last layer's down projection
prefetches nothing (the head comes next, and it is larger than L2).

BITENGINE_L2_PREFETCH (read when a plan is made: at load, fusion and adapter changes):
  "next" (default): every layer prefetches the next one;
  "gaps": only across the kernels between GEMVs (q/k/v -> o_proj over attention, gate/up -> down_proj
          over the gating), not between back-to-back GEMVs;
  "0": no prefetch.
"""

from __future__ import annotations

import os

from .nn import BitLinear

MODES = ("next", "gaps", "0")
MODE = os.environ.get("BITENGINE_L2_PREFETCH", "next")


def decode_order(model) -> list[BitLinear]:
    """The ternary layers in the order a decode step runs them: per decoder layer q/k/v (or the fused
    layer), o_proj, gate/up (or the fused layer), down_proj. Non-ternary projections are left out."""
    order = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        groups = [[attn.fused] if attn.fused is not None else [attn.q_proj, attn.k_proj, attn.v_proj],
                  [attn.o_proj],
                  [mlp.fused] if mlp.fused is not None else [mlp.gate_proj, mlp.up_proj],
                  [mlp.down_proj]]
        order += [m for group in groups for m in group if isinstance(m, BitLinear)]
    return order


def _target(layer: BitLinear) -> bool:
    return layer.backend is not None and layer.backend.name == "cuda" and getattr(layer, "weight_i2w", None) is not None


def plan(model, mode: str | None = None) -> int:
    """Set `l2_prefetch` on every ternary layer of the model (None where there is nothing to prefetch);
    returns how many layers prefetch."""
    mode = MODE if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"BITENGINE_L2_PREFETCH must be one of {', '.join(MODES)}, got {mode!r}")
    order = decode_order(model)
    after_gap = {id(m) for layer in model.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)}
    count = 0
    for cur, nxt in zip(order, order[1:] + [None]):
        target = None
        if mode != "0" and nxt is not None and _target(cur) and _target(nxt):
            if mode == "next" or id(nxt) in after_gap:
                target = nxt.weight_i2w
        cur.l2_prefetch = target
        count += target is not None
    return count
