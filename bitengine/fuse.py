"""Fused projections: q/k/v and gate/up run as one ternary matmul each.

A decode step at batch 1 is a string of small GEMVs; every call pays a launch (GPU) or a dispatch
and a thread fork (CPU), and every call quantizes the same activations again. q, k and v (and
gate and up) read the same input, so their weights are concatenated along the outputs at load
time and run as one BitLinear; the outputs are split after. This is exact: the per-token
activation quantization of the shared input is the same, the codes are the same, and the scales
become per output channel (a per-tensor scale repeated over its layer's rows), so every output is
the same integer sum times the same float.

What the fused layer holds: the backend's kernel layout of the concatenated weight, the scales,
the bias, and one LoRA side path assembled from the members' (factors concatenated along the
rank, B block-diagonal). What the members keep: their checkpoint tensors (`weight_packed`, the
on-disk layout, which adapters merge into and `state_dict()` returns) and their adapter factors;
their own kernel layouts are dropped, so fusion costs no memory. Members are not called any more;
the fused layer is a plain attribute of the parent, outside the module tree, so names, state
dicts and adapter targeting see only the checkpoint's modules.

On the cuda backend the gate/up layer's rows are interleaved (gate 0, up 0, gate 1, ...): the C++ decode GEMV
then has each gate row next to its up row and writes act(gate) * up in its epilogue (FusedLinear.gated), so the
decode step runs no gating kernel; other calls split the output by stride.

Fusion applies when the members share backend, input size, activation bits and scale granularity
(per tensor or per channel mix freely; groups must match), have no per-linear input norm
(BitNet's `use_rms_norm`) and the backend's kernels take them. `refresh(model)` rebuilds what is
stale after adapters are applied, switched or removed (lora/apply.py calls it).
"""

from __future__ import annotations

import logging

import torch

from .nn import BitLinear

log = logging.getLogger("bitengine")

GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
ATTR = "fused"  # the parent's attribute holding the FusedLinear (or None)


class FusedLinear(BitLinear):
    """A BitLinear over the concatenation of its members' rows; forward returns the split outputs.

    interleaved (gate/up on the cuda backend): the two members' rows alternate (gate 0, up 0, gate 1, ...), so
    the C++ decode GEMV finds each gate row next to its up row and applies the MLP's gating in its epilogue
    (`gated`): one kernel writes act(gate) * up and the step needs no gating kernel. Other calls split the
    output by stride."""

    def __init__(self, members: list[BitLinear], interleaved: bool = False):
        first = members[0]
        n = sum(m.out_features for m in members)
        scale = first.weight_scale
        scale_shape = (n, scale.shape[1]) if scale.dim() == 2 else (n,)
        dev = scale.device
        bias_dtype = next((m.bias.dtype for m in members if m.bias is not None), None)
        with torch.device("meta"):
            super().__init__(first.in_features, n, act_bits=first.act_bits, scale_shape=scale_shape,
                             bias=bias_dtype is not None, dtype=bias_dtype or torch.float16)
        self.sizes = [m.out_features for m in members]
        # the concatenated checkpoint layout is only an input to prepare(); it is dropped after
        self.weight_packed = torch.cat([m.weight_packed.to(dev) for m in members])
        self.weight_scale = torch.cat([m.weight_scale.expand(m.out_features, *scale_shape[1:]) for m in members])
        self.weight_scale = self.weight_scale.float().contiguous()
        if bias_dtype is not None:
            self.bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=bias_dtype,
                                                                                   device=dev) for m in members])
        # which member tensors this was built from: refresh() rebuilds when any of them is replaced
        self.sources = [(m.weight_packed, m.weight_scale, m.bias) for m in members]
        self.interleaved = interleaved
        self.row_order = None  # the concatenated rows' new order (interleaved only)
        if interleaved:
            if len(members) != 2 or members[0].out_features != members[1].out_features:
                raise ValueError("fuse: interleaving takes two members of the same size")
            half = members[0].out_features
            self.row_order = torch.stack([torch.arange(half), torch.arange(half) + half], 1).reshape(-1).to(dev)
            self.weight_packed = self.weight_packed[self.row_order]
            self.weight_scale = self.weight_scale[self.row_order].contiguous()
            if self.bias is not None:
                self.bias = self.bias[self.row_order]

    def joint(self, x: torch.Tensor, norm=None) -> torch.Tensor:
        """The members' outputs side by side (..., sum of out_features), of norm(x) when a norm is given."""
        return super().forward(x, norm)

    def forward(self, x: torch.Tensor, norm=None) -> list[torch.Tensor]:
        y = self.joint(x, norm)
        if self.interleaved:
            return [y[..., 0::2], y[..., 1::2]]
        return y.split(self.sizes, dim=-1)

    def gated(self, x: torch.Tensor, norm, act: str) -> torch.Tensor | None:
        """act(gate) * up of norm(x) in one kernel (act "silu" or "relu2"), or None where the backend has no such
        kernel for this call (the caller then gates the outputs of forward)."""
        fn = getattr(self.backend, "linear_gated", None) if self.interleaved else None
        return fn(x, self, norm, act) if fn is not None else None


def _fusable(members: list) -> str | None:
    """None if the members can run as one layer, else why not."""
    if not all(isinstance(m, BitLinear) for m in members):
        return "not all ternary"
    first = members[0]
    if first.backend is None or any(m.backend is not first.backend for m in members):
        return "different backends"
    if first.backend.name == "reference":
        return "reference backend (no kernel layout to fuse; it stays the unfused oracle)"
    if any(m.in_features != first.in_features or m.act_bits != first.act_bits for m in members):
        return "different input sizes or activation bits"
    if any(m.rms_norm is not None for m in members):
        return "per-linear input norms"
    if any(not getattr(m, "_kernel_ok", True) for m in members):
        return "a member runs on the reference path"
    groups = {m.weight_scale.shape[1] if m.weight_scale.dim() == 2 else 0 for m in members}
    if len(groups) > 1:
        return "different scale groups"
    if len({m.bias.dtype for m in members if m.bias is not None}) > 1:
        return "different bias dtypes"
    return None


def _members(parent, names) -> list:
    return [getattr(parent, n, None) for n in names]


def fuse_projections(model) -> int:
    """Fuse every q/k/v and gate/up group of a loaded model that qualifies; returns how many groups."""
    count, skipped = 0, set()
    for layer in model.model.layers:
        for pname, names in GROUPS.items():
            parent = getattr(layer, pname)
            members = _members(parent, names)
            reason = _fusable(members) if None not in members else "missing members"
            if reason:
                skipped.add(f"{'/'.join(names)}: {reason}")
                object.__setattr__(parent, ATTR, None)
                continue
            count += _build(parent, members, pname)
    if skipped:
        log.debug("bitengine: projections not fused: %s", "; ".join(sorted(skipped)))
    model.fused_groups = count
    return count


def _build(parent, members: list, pname: str, interleave: bool | None = None) -> bool:
    """Fuse members into parent's fused layer. interleave None: gate/up interleaved where the backend gates in its
    GEMV's epilogue (the C++ CPU decode reads the plain layout); a rebuild keeps the layout the model loaded with."""
    if interleave is None:
        interleave = (pname == "mlp" and getattr(members[0].backend, "gates_interleaved", False)
                      and members[0].out_features == members[1].out_features)
    fused = FusedLinear(members, interleaved=interleave)
    fused.prepare(members[0].backend)
    if not getattr(fused, "_kernel_ok", True):  # cannot happen when every member runs on the kernels; be safe
        object.__setattr__(parent, ATTR, None)
        return False
    fused.weight_packed = None  # the members keep the checkpoint layout
    for m in members:  # their kernel layouts are the fused layer's now
        for name in ("weight_i2w", "weight_cpu"):
            m._buffers.pop(name, None)
    fused.eval()
    object.__setattr__(parent, ATTR, fused)
    _set_side_path(fused, members)
    return True


def refresh(model) -> None:
    """Rebuild fused layers whose members' tensors were replaced (merged adapters) and every fused side path."""
    if not getattr(model, "fused_groups", 0):
        return
    for layer in model.model.layers:
        for pname, names in GROUPS.items():
            parent = getattr(layer, pname)
            fused = getattr(parent, ATTR, None)
            if fused is None:
                continue
            members = _members(parent, names)
            current = [(m.weight_packed, m.weight_scale, m.bias) for m in members]
            if any(a is not b for old, new in zip(fused.sources, current) for a, b in zip(old, new)):
                _build(parent, members, pname, fused.interleaved)
            else:
                _set_side_path(fused, members)


def _set_side_path(fused: FusedLinear, members: list) -> None:
    """One side path for the group: A = members' A stacked along the rank, B block-diagonal
    (member i's B in its own rows and rank columns), per-rank int8 scales stacked like A."""
    with_path = [m for m in members if m.lora_A is not None]
    if not with_path:
        fused.lora_A = fused.lora_B = fused.lora_A_scale = fused.lora_B_scale = None
        return
    if len({m.lora_A_scale is None for m in with_path}) > 1:
        raise ValueError("fused projections: members mix int8 and 16-bit adapter factors")
    ref = with_path[0].lora_B
    b = ref.new_zeros(fused.out_features, sum(m.lora_A.shape[0] for m in with_path))
    row = col = 0
    for m in members:
        if m.lora_A is not None:
            r = m.lora_A.shape[0]
            b[row:row + m.out_features, col:col + r] = m.lora_B
            col += r
        row += m.out_features
    if fused.row_order is not None:  # B's rows follow the fused layer's rows
        b = b[fused.row_order.to(b.device)]
    fused.lora_A, fused.lora_B = torch.cat([m.lora_A for m in with_path]).contiguous(), b
    if with_path[0].lora_A_scale is not None:
        fused.lora_A_scale = torch.cat([m.lora_A_scale for m in with_path])
        fused.lora_B_scale = torch.cat([m.lora_B_scale for m in with_path])
    else:
        fused.lora_A_scale = fused.lora_B_scale = None


def fused_layers(model) -> list[FusedLinear]:
    """The model's fused layers (they live outside the module tree: count their memory from here)."""
    out = []
    for layer in model.model.layers:
        for pname in GROUPS:
            fused = getattr(getattr(layer, pname), ATTR, None)
            if fused is not None:
                out.append(fused)
    return out
