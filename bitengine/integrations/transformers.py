"""Run a loaded transformers causal LM on bitengine's ternary kernels.

`to_bitengine(hf_model)` swaps every nn.Linear inside the decoder layers (`model.model.layers`:
attention and MLP projections) for a bitengine BitLinear, in place, so transformers' own
`generate()`, pipelines and training-free tooling keep working on top of bitengine's backends.
The weights come either from the model itself (absmean ternarization, like `bitengine convert`)
or from a bitengine checkpoint; with a checkpoint, every other tensor (embeddings, norms, head) is
taken from it too, so the result computes what `bitengine.load(checkpoint)` computes.

Not here: the head and embeddings stay transformers modules (16-bit), and nothing is trained.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import backends
from ..formats.checkpoint import CheckpointError, CheckpointReader
from ..nn import BitLinear
from ..quant import absmean_quantize, check_packed_codes, pack_ternary, parse_scale_granularity


def to_bitengine(hf_model: nn.Module, *, weights: str = "ternary", act_bits: int = 8, scale: str = "tensor",
                 checkpoint=None, backend: str | None = None) -> nn.Module:
    """Replace the decoder layers' nn.Linear modules of `hf_model` with BitLinear; returns the same model.

    weights: "ternary" (the only kind; kept for symmetry with `bitengine convert`).
    act_bits / scale: activation bits (8 or 16) and absmean scale granularity ("tensor", "channel",
    "group:N") when quantizing the model's own weights; ignored with `checkpoint`, whose settings win.
    checkpoint: a bitengine checkpoint folder of the same architecture to take all weights from.
    backend: bitengine backend ("auto" by default: the CPU kernels on CPU, Triton/CUDA on GPUs).
    """
    if weights != "ternary":
        raise ValueError(f"weights must be 'ternary', got {weights!r}")
    if act_bits not in (8, 16):
        raise ValueError(f"act_bits must be 8 or 16, got {act_bits}")
    layers = getattr(getattr(hf_model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(hf_model).__name__}: expected a causal LM with decoder layers at .model.layers "
                         "(Llama family)")
    param = next(hf_model.parameters())
    device, dtype = param.device, param.dtype
    chosen = backends.select(device, backend)
    linears = [f"model.layers.{i}.{n}" for i, layer in enumerate(layers)
               for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    if checkpoint is not None:
        reader = CheckpointReader(checkpoint)
        act_bits = int(reader.block.get("act_bits", 8))
        _load_dense_from(hf_model, reader, set(linears), dtype)
    else:
        reader = None
        granularity, group = parse_scale_granularity(scale)
    for name in linears:
        lin = hf_model.get_submodule(name)
        if reader is not None:
            if f"{name}.weight_packed" not in reader.index:
                _copy(lin.weight, reader, f"{name}.weight", dtype)  # a module the checkpoint kept in 16 bits
                continue
            packed = reader.tensor(f"{name}.weight_packed")
            w_scale = reader.tensor(f"{name}.weight_scale").float()
            try:
                check_packed_codes(packed, lin.in_features)
            except ValueError as e:
                raise CheckpointError(f"{reader.index[name + '.weight_packed']}: {name}: {e}") from None
        else:
            w_q, w_scale = absmean_quantize(lin.weight.detach(), granularity, group)
            packed = pack_ternary(w_q)
        bit = BitLinear(lin.in_features, lin.out_features, act_bits=act_bits, scale_shape=tuple(w_scale.shape),
                        bias=lin.bias is not None, dtype=dtype, device=device)
        bit.weight_packed.copy_(packed)
        bit.weight_scale.copy_(w_scale)
        if lin.bias is not None:
            bias = reader.tensor(f"{name}.bias") if reader is not None and f"{name}.bias" in reader.index else lin.bias
            bit.bias.copy_(bias.detach())
        bit.prepare(chosen)
        hf_model.set_submodule(name, bit)
    hf_model.bitengine_backend = chosen.name
    return hf_model


def _copy(dst: torch.Tensor, reader: CheckpointReader, name: str, dtype) -> None:
    if name not in reader.index:
        raise CheckpointError(f"{reader.path}: missing tensor {name}")
    src = reader.tensor(name)
    if tuple(src.shape) != tuple(dst.shape):
        raise CheckpointError(f"{reader.index[name]}: tensor {name} has shape {list(src.shape)}, "
                              f"the model has {list(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src.to(dtype))


def _load_dense_from(hf_model: nn.Module, reader: CheckpointReader, linears: set[str], dtype) -> None:
    """Embeddings, norms, head and biases from the checkpoint (everything that is not a ternary linear)."""
    cfg = hf_model.config
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
        if reader.config.get(key) != getattr(cfg, key, None):
            raise ValueError(f"{reader.path}: checkpoint {key}={reader.config.get(key)} does not match the model's "
                             f"{getattr(cfg, key, None)}")
    params = dict(hf_model.named_parameters())
    params.update(dict(hf_model.named_buffers()))
    for name, t in params.items():
        module = name.rsplit(".", 1)[0]
        if module in linears or (name == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False)):
            continue
        if t.is_floating_point():
            if name in reader.index:
                _copy(t, reader, name, dtype)
            elif not name.endswith("inv_freq") and not name.startswith("model.rotary_emb"):
                raise CheckpointError(f"{reader.path}: missing tensor {name}")
