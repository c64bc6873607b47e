"""Apply, stack, switch and remove LoRA adapters on a loaded CausalLM.

fused (default): every targeted BitLinear / DenseLinear gets one low-rank side path
`y += (x @ A^T) @ B^T` (nn.py) with the adapters' factors concatenated along the rank and each
adapter's weight * scaling folded into its columns of B: exact, any number of adapters, one path.
With adapter_dtype="int8" the factors are stored int8 with absmax scales per rank component (rows
of A, columns of B: r_total floats each, so about half the memory of fp16 factors), dequantized
on the fly; the error this adds is measured and reported.

merge: the delta is added to the weights: DenseLinear exactly, BitLinear by re-rounding the
ternary codes (merge.py), after which the layer runs at base speed. How much of the adapter's
effect survives is measured on a probe batch and reported.

The original tensors of merged layers are kept, so `remove_adapters` / `set_adapters` restore the
base bit-exactly without reloading. Every adapter is validated before the model is touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..fuse import refresh as refresh_fused
from ..graph_session import release_graphs
from ..nn import BitLinear, DenseLinear
from .merge import delta_weight, merge_ternary
from .peft_format import ModuleFactors, normalize_adapters, read_adapter, resolve

log = logging.getLogger("bitengine")

MODES = ("fused", "merge")
ADAPTER_DTYPES = (None, "int8")
PROBE_TOKENS = 32


@dataclass
class AdapterState:
    """What is applied to a model now (model.lora_state)."""

    mode: str
    adapters: list[tuple[str, float]]
    originals: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # merged layers' own tensors
    report: dict = field(default_factory=dict)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: layer} of every BitLinear / DenseLinear (the layers adapters can target)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (BitLinear, DenseLinear))}


def apply_adapters(model, adapters, mode: str = "fused", adapter_dtype: str | None = None, *,
                   requant: str = "grid", report: bool | None = None) -> dict:
    """Replace whatever adapters `model` has with `adapters` ([dir | (dir, weight), ...]); return the report.

    mode: "fused" | "merge"; adapter_dtype: None (the model's compute dtype) | "int8" (fused only);
    requant: ternary merge rule, "grid" | "absmean" (merge.py). report: measure on a probe batch
    (default: for merge and int8, where the result is not exact). The report is also stored in
    `model.lora_state.report` and logged. Raises AdapterError / FileNotFoundError (one line)
    before changing anything.
    """
    release_graphs(model)  # generate()'s captured graphs hold the old weights' and side paths' addresses
    if mode not in MODES:
        raise ValueError(f"adapter mode must be one of {', '.join(MODES)}, got {mode!r}")
    if adapter_dtype not in ADAPTER_DTYPES:
        raise ValueError(f"adapter_dtype must be None or 'int8', got {adapter_dtype!r}")
    if mode == "merge" and adapter_dtype:
        raise ValueError("adapter_dtype='int8' applies to fused adapters only (merge adds the delta to the weights)")
    specs = normalize_adapters(adapters)
    if not specs:
        remove_adapters(model)
        return {}
    layers = linear_layers(model)
    shapes = {n: (m.out_features, m.in_features) for n, m in layers.items()}
    loaded = [read_adapter(p, w) for p, w in specs]
    factors = resolve(loaded, shapes, num_layers=model.config.num_layers, base_weight=lambda n: _base_weight(model, n))
    # validated: compute the new layer state off-model, then swap it in
    dtype = getattr(model, "compute_dtype", None) or model.activation_dtype
    if mode == "fused":
        new = {n: _stack(fs, dtype, _device(layers[n]), adapter_dtype) for n, fs in factors.items()}
    else:
        current = getattr(model, "lora_state", None)
        originals = current.originals if current is not None else {}
        new = {n: _merged_tensors(layers[n], originals.get(n, {}), fs, requant) for n, fs in factors.items()}
    remove_adapters(model)
    want_report = report if report is not None else (mode == "merge" or adapter_dtype is not None)
    probe = _probe_ids(model) if want_report else None
    base_logits = _logits(model, probe) if want_report else None
    exact_logits = None
    if want_report and (mode == "merge" or adapter_dtype):
        _set_fused(layers, {n: _stack(fs, dtype, _device(layers[n]), None) for n, fs in factors.items()})
        refresh_fused(model)
        exact_logits = _logits(model, probe)
        _clear_fused(layers)
    state = AdapterState(mode, [(str(p), w) for p, w in specs])
    if mode == "fused":
        _set_fused(layers, new)
    else:
        for n, tensors in new.items():
            state.originals[n] = _swap(layers[n], tensors)
    _after_swaps(model)
    model.lora_state = state
    state.report = _summary(loaded, factors, mode, adapter_dtype, new)
    if adapter_dtype == "int8":
        errs = [_int8_factor_error(factors[n], new[n]) for n in sorted(new)]
        state.report["int8_factor_error_mean"] = sum(errs) / len(errs)
        state.report["int8_factor_error_max"] = max(errs)
    if want_report:
        got = _logits(model, probe)
        state.report["logits"] = _compare(base_logits, got if exact_logits is None else exact_logits, got)
    log.info("bitengine adapters: %s", _one_line(state.report))
    return state.report


def set_adapters(model, adapters, mode: str | None = None, adapter_dtype: str | None = None, **kw) -> dict:
    """Switch to another set of adapters (mode defaults to the current one); [] removes them all."""
    current = getattr(model, "lora_state", None)
    return apply_adapters(model, adapters, mode or (current.mode if current else "fused"), adapter_dtype, **kw)


def remove_adapters(model) -> None:
    """Back to the base model, bit-exactly: side paths dropped, merged layers' own tensors restored."""
    release_graphs(model)
    state = getattr(model, "lora_state", None)
    layers = linear_layers(model)
    _clear_fused(layers)
    if state is not None:
        for n, tensors in state.originals.items():
            _swap(layers[n], tensors)
    _after_swaps(model)
    model.lora_state = None


def _base_weight(model, name: str):
    """The model's own 16-bit weight of `name` (head or embeddings), or None."""
    try:
        m = model.get_submodule(name)
    except AttributeError:
        return None
    state = getattr(model, "lora_state", None)
    if state is not None and name in state.originals:
        return state.originals[name].get("weight")
    w = getattr(m, "weight", None)
    return w if isinstance(w, torch.Tensor) and w.is_floating_point() else None


def _device(layer) -> torch.device:
    return layer.weight_scale.device if isinstance(layer, BitLinear) else layer.weight.device


def _stack(fs: list[ModuleFactors], dtype, device, adapter_dtype) -> dict:
    """Concatenate factors along the rank: A (r_total, K), B (N, r_total) with coef folded in (float32 math)."""
    a = torch.cat([f.A for f in fs], 0)
    b = torch.cat([f.B * f.coef for f in fs], 1)
    if adapter_dtype == "int8":
        qa, sa = int8_rows(a)  # per rank component: rows of A
        qb, sb = int8_rows(b.t())  # and columns of B
        qb, sa, sb = qb.t().contiguous(), sa.reshape(-1), sb.reshape(-1)  # scales (r_total,)
        return {"lora_A": qa.to(device), "lora_B": qb.to(device), "lora_A_scale": sa.to(device),
                "lora_B_scale": sb.to(device)}
    return {"lora_A": a.to(device, dtype), "lora_B": b.to(device, dtype), "lora_A_scale": None, "lora_B_scale": None}


def int8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8: (q int8 [R, C], scale float32 [R, 1]) with t ~= q * scale."""
    scale = (t.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
    return (t / scale).round().clamp(-127, 127).to(torch.int8), scale.float()


def _int8_factor_error(fs: list[ModuleFactors], q: dict) -> float:
    """|x A_q^T B_q^T - x A^T B^T| / |x A^T B^T| for Gaussian x (16 rows): the error int8 storage adds to one side path."""
    exact = _stack(fs, torch.float32, "cpu", None)
    x = torch.randn(16, exact["lora_A"].shape[1], generator=torch.Generator().manual_seed(0))
    ref = (x @ exact["lora_A"].T) @ exact["lora_B"].T
    a = q["lora_A"].cpu().float() * q["lora_A_scale"].cpu()[:, None]
    b = q["lora_B"].cpu().float() * q["lora_B_scale"].cpu()
    return float(((x @ a.T) @ b.T - ref).norm() / ref.norm().clamp(min=1e-30))


def _set_fused(layers: dict, new: dict) -> None:
    for n, tensors in new.items():
        for k, v in tensors.items():
            setattr(layers[n], k, v)


def _clear_fused(layers: dict) -> None:
    for m in layers.values():
        m.lora_A = m.lora_B = m.lora_A_scale = m.lora_B_scale = None


def _merged_tensors(layer, base: dict, fs: list[ModuleFactors], requant: str) -> dict:
    """The merged layer's new tensors (plus `stats` for the report), computed without touching the layer.

    base: the layer's own tensors when it is merged now (AdapterState.originals), else {}."""
    if isinstance(layer, DenseLinear):
        w = base.get("weight", layer.weight)
        delta = delta_weight(fs, w.device)
        new_w = (w.float() + delta).to(w.dtype)
        dw = new_w.float() - w.float()
        return {"weight": new_w, "stats": {"survival": float((dw * delta).sum() / delta.pow(2).sum().clamp(min=1e-30)),
                                           "flipped": None}}
    packed, scale = base.get("weight_packed", layer.weight_packed), base.get("weight_scale", layer.weight_scale)
    packed = packed.to(scale.device)  # k4 may sit on the host (GPU models)
    delta = delta_weight(fs, packed.device)
    packed, scale, stats = merge_ternary(packed, scale, layer.in_features, delta, requant)
    return {"weight_packed": packed, "weight_scale": scale, "stats": stats}


def _swap(layer, tensors: dict) -> dict:
    """Install `tensors` on the layer (re-preparing its backend); return the tensors it had."""
    old = {}
    for k, v in tensors.items():
        if k == "stats":
            continue
        old[k] = getattr(layer, k)
        if isinstance(layer, DenseLinear) and k == "weight":
            layer.weight = nn.Parameter(v, requires_grad=False)  # a new tensor: a tied head unties, the embedding stays
        else:
            setattr(layer, k, v)  # buffers: assign, never write into (they may be mmap'd from the checkpoint)
    if isinstance(layer, BitLinear) and layer.backend is not None:
        dev = layer.weight_scale.device
        if layer.weight_packed.device != dev:  # GPU models keep k4 on the host (loader.checkpoint_layout_to_host)
            layer.weight_packed = layer.weight_packed.to(dev)
        layer.prepare(layer.backend)
    return old


def _after_swaps(model) -> None:
    """Weights or side paths changed: k4 back to the host where the loader keeps it, fused projections rebuilt."""
    from ..loader import checkpoint_layout_to_host

    checkpoint_layout_to_host(model)
    refresh_fused(model)


def _probe_ids(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    t = min(PROBE_TOKENS, model.max_seq)
    ids = torch.randint(0, model.config.vocab_size, (1, t), generator=g)
    return ids.to(model.device)


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(ids).double().cpu()


def _compare(base: torch.Tensor, exact: torch.Tensor, got: torch.Tensor) -> dict:
    """How much of the exact adapter's change of the logits `got` reproduces."""
    effect = exact - base
    change = got - base
    den = effect.pow(2).sum().clamp(min=1e-300)
    return {
        "adapter_effect": float(effect.norm() / base.norm()),  # |L_exact - L_base| / |L_base|
        "applied_effect": float(change.norm() / base.norm()),  # |L_got - L_base| / |L_base|
        "survival": float((change * effect).sum() / den),  # share of the exact change reproduced (1 = all)
        "error_vs_effect": float((got - exact).norm() / den.sqrt()),  # |L_got - L_exact| / |L_exact - L_base|
        "error": float((got - exact).norm() / exact.norm()),  # |L_got - L_exact| / |L_exact|
    }


def _summary(loaded, factors: dict, mode: str, adapter_dtype, new: dict) -> dict:
    rep = {
        "mode": mode, "adapter_dtype": adapter_dtype or "compute",
        "adapters": [{"path": str(a.path), "weight": a.weight, "r": a.config["r"],
                      "lora_alpha": a.config.get("lora_alpha", 8), "use_rslora": bool(a.config.get("use_rslora")),
                      "base_model": a.base_model, "qlora_base": a.qlora_hint,
                      "modules": sum(1 for fs in factors.values() for f in fs if f.source == a.path)} for a in loaded],
        "modules": len(factors),
        "max_rank_total": max(sum(f.A.shape[0] for f in fs) for fs in factors.values()),
    }
    if mode == "fused":
        rep["adapter_bytes"] = sum(t.numel() * t.element_size() for d in new.values() for t in d.values()
                                   if t is not None)
    else:
        stats = [d["stats"] for d in new.values()]
        surv = [s["survival"] for s in stats]
        flipped = [s["flipped"] for s in stats if s["flipped"] is not None]
        rep["weight_survival_mean"] = sum(surv) / len(surv)
        rep["weight_survival_min"] = min(surv)
        if flipped:
            rep["codes_flipped"] = sum(flipped) / len(flipped)
    return rep


def _one_line(rep: dict) -> str:
    s = f"{rep['mode']} {len(rep['adapters'])} adapter(s) on {rep['modules']} modules, rank <= {rep['max_rank_total']}"
    if "adapter_bytes" in rep:
        s += f", {rep['adapter_bytes'] / 2**20:.1f} MiB ({rep['adapter_dtype']})"
    if "int8_factor_error_mean" in rep:
        s += f", int8 factor error {rep['int8_factor_error_mean']:.2%} (max {rep['int8_factor_error_max']:.2%})"
    if "weight_survival_mean" in rep:
        s += f", weight-level survival {rep['weight_survival_mean']:.1%}"
    lg = rep.get("logits")
    if lg:
        s += (f"; probe logits: adapter changes them by {lg['adapter_effect']:.2%}, applied {lg['applied_effect']:.2%}, "
              f"survival {lg['survival']:.1%}, error {lg['error_vs_effect']:.1%} of the effect")
    return s
