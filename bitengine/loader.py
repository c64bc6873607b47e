"""Load a bitengine checkpoint into a ready-to-run CausalLM.

The model is built on the meta device; every tensor in the files is checked (name, dtype, shape)
against what the config implies before any is read, then assigned without copies on the CPU
(`load_state_dict(assign=True)`). Finally the backend is chosen (backends/) and lets each
BitLinear repack its weights for its kernels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import backends
from .config import ModelConfig
from .formats.checkpoint import CheckpointError, CheckpointReader
from .fuse import fuse_projections
from .model import CausalLM, dense_linear, expected_shapes, rope_inv_freq
from .nn import BitLinear
from .quant import check_packed_codes, packed_cols

_16BIT = {"F16", "BF16", "F32"}


def _default_dtype(device: torch.device, stored: str) -> torch.dtype:
    if device.type == "cpu":
        return torch.float32  # CPU half-precision matmuls are slow or missing; kernels take fp32 activations
    return torch.bfloat16 if stored == "bfloat16" else torch.float16

HEADS = (None, "fp16", "int8", "int8+embeddings", "int4")  # load(head=...): how the output head is stored


def cpu_keeps_half(device: torch.device, dtype: torch.dtype, head: str | None, backend: str, block: dict) -> str:
    """Which dense float16 weights stay float16 on the CPU and run through the C++ F16C kernel (nn._dense_linear):
    "all" (the head and every dense layer, e.g. a `--weights fp16` checkpoint's) by default under the C++ backend,
    "head" for head="fp16" under another backend, "" otherwise. Only where the kernels are built, activations are
    float32 and the checkpoint's 16-bit weights are float16 (bfloat16 ones would round); per layer, rows need no
    padding (int8_head._to_half; a tied head is the embedding itself). The same float16 values with float32 sums as a
    float32 copy, at half the bytes (ternary SmolLM2 decode on 2 cores: 49.8 -> 91.0 tok/s,
    bench/results/cpu_head_ternary_smollm2_f16default_2026-12-03.json; the kernel at 0.14-1.10x float32 F.linear's
    time from 1 to 512 tokens, cpu_dense_f16c_2026-12-03.md). Elsewhere they are loaded in `dtype`."""
    if head not in (None, "fp16") or device.type != "cpu" or dtype != torch.float32:
        return ""
    if block.get("dtype", "float16") != "float16":
        return ""
    from .nn import cpu_kernels_built

    if not cpu_kernels_built():
        return ""
    return "all" if backend == "cpu" else "head" if head == "fp16" else ""


def load(path, device="cpu", backend: str | None = None, dtype: torch.dtype | str | None = None,
         max_seq: int | None = None, adapters=None, adapter_mode: str = "fused", adapter_dtype: str | None = None,
         head: str | None = None, verify_codes: bool = True, fuse: bool = True):
    """Load the checkpoint folder `path` onto `device` and return a CausalLM (with `.tokenizer`).

    backend: "auto" (default, or $BITENGINE_BACKEND), "reference", "cpu", "triton", "cuda".
    dtype: compute dtype for activations and 16-bit weights (default fp32 on CPU, the checkpoint's
    16-bit type on CUDA). max_seq: KV-cache length limit (default: the model's context length).
    adapters / adapter_mode / adapter_dtype: LoRA adapters applied at load time, [dir or (dir, weight)],
    "fused" or "merge", factors in 16-bit or "int8" (see bitengine.lora).
    head: None keeps the 16-bit head: in `dtype`, except on the CPU under the C++ backend, where float16 dense weights
    (the head, a tied embedding with it, the layers of a float16 checkpoint) stay float16 and run through the F16C
    kernel (the checkpoint's values, float32 sums, half the bytes; see cpu_keeps_half); "fp16" does that for the head
    under any CPU backend; "int8" stores
    it as per-row int8 (and "int8+embeddings" the embeddings too), a large share of decode bytes on small models
    (see bitengine.int8_head); "int4" as group-wise int4 (a quarter of the bytes, much coarser: see
    bitengine.int4_head).
    fuse: run q/k/v and gate/up as one ternary matmul each (exact; see bitengine.fuse).
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(h for h in HEADS if h)}, got {head!r}")
    device = torch.device(device)
    reader = CheckpointReader(path)
    cfg = ModelConfig.from_hf(reader.config, str(reader.path / "config.json"))
    block = reader.block
    if isinstance(dtype, str):
        dtype = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                 "fp32": torch.float32, "float32": torch.float32}[dtype]
    dtype = dtype or _default_dtype(device, block.get("dtype", "float16"))
    act_bits = int(block.get("act_bits", 8))

    shapes, linears = expected_shapes(cfg)
    ternary = {m for m in linears + ["lm_head"] if f"{m}.weight_packed" in reader.index}
    _validate(reader, shapes, ternary)
    chosen = backends.select(device, backend)
    keep_half = cpu_keeps_half(device, dtype, head, chosen.name, block)

    with torch.device("meta"):
        model = CausalLM(cfg, dense_linear, max_seq=max_seq)
        for name in ternary:
            dense = model.get_submodule(name)
            scale_shape = reader.meta[f"{name}.weight_scale"][1]
            bit = BitLinear(dense.in_features, dense.out_features, act_bits=act_bits, scale_shape=scale_shape,
                            bias=dense.bias is not None,
                            input_norm_eps=cfg.rms_norm_eps if cfg.linear_input_norm else None)
            model.set_submodule(name, bit)

    state = {}
    for name in reader.index:
        t = reader.tensor(name)
        if t.is_floating_point() and not name.endswith(".weight_scale"):
            t = t.to(dtype)
        if name.endswith(".weight_packed") and verify_codes:
            try:
                check_packed_codes(t, model.get_submodule(name[: -len(".weight_packed")]).in_features)
            except ValueError as e:
                raise CheckpointError(f"{reader.index[name]}: {name}: {e}") from None
        state[name] = t.to(device)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:  # _validate should have caught these; keep the invariant explicit
        raise CheckpointError(f"{reader.path}: state mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    if keep_half:  # back to the checkpoint's float16 values (exact), in 2 MB pages
        from .int8_head import use_cpu_half_dense, use_cpu_half_head

        if keep_half == "all":
            use_cpu_half_dense(model)
        else:
            use_cpu_half_head(model)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    model.eval()

    for m in model.modules():
        if isinstance(m, BitLinear):
            m.prepare(chosen)
    checkpoint_layout_to_host(model)  # before fusing, so the fused layers record the host tensors as their sources
    model.fused_groups = fuse_projections(model) if fuse else 0
    model.backend_name = chosen.name
    model.checkpoint_path = reader.path
    model.bitengine_config = block
    model.compute_dtype = dtype
    model.tokenizer = _tokenizer(reader.path)
    if head in ("int8", "int8+embeddings"):
        from .int8_head import quantize_head_int8

        quantize_head_int8(model, embeddings=head == "int8+embeddings")
    elif head == "int4":
        from .int4_head import quantize_head_int4

        quantize_head_int4(model)
    if adapters:
        from .lora import apply_adapters

        apply_adapters(model, adapters, mode=adapter_mode, adapter_dtype=adapter_dtype)
    return model


def checkpoint_layout_to_host(model) -> int:
    """Move the checkpoint layout (k4 `weight_packed`) of every BitLinear that runs on a GPU kernel to host
    memory; returns the bytes freed on the device.

    The GPU kernels read only their own layout (i2w, made by prepare()); k4 is what state_dict(),
    adapter merging and re-preparing start from, none of them on the decode path, so the device holds
    one copy of each ternary weight instead of two (Llama-2-7B: 1.5 GiB less). Layers that run on the
    reference path (kernel_ok False) keep k4 on the device: it is what they read."""
    freed = 0
    for m in model.modules():
        if isinstance(m, BitLinear) and getattr(m, "_kernel_ok", False) and m.weight_packed.device.type != "cpu":
            freed += m.weight_packed.nbytes
            m.weight_packed = m.weight_packed.cpu()
    return freed


def _validate(reader: CheckpointReader, shapes: dict, ternary: set) -> None:
    """Every expected tensor present with the right dtype and shape, and nothing else."""
    expected: dict[str, tuple[set, tuple]] = {}
    for name, shape in shapes.items():
        module = name.rsplit(".", 1)[0]
        if module in ternary and name == f"{module}.weight":
            n, k = shape
            expected[f"{module}.weight_packed"] = ({"U8"}, (n, packed_cols(k)))
            scale_shape = reader.meta.get(f"{module}.weight_scale", (None, None))[1]
            ok = scale_shape in ((1,), (n,)) or (scale_shape is not None and len(scale_shape) == 2
                                                 and scale_shape[0] == n and scale_shape[1] > 0 and k % scale_shape[1] == 0)
            expected[f"{module}.weight_scale"] = ({"F32"}, scale_shape if ok else ("[1], [N] or [N, K/G]",))
        else:
            expected[name] = (_16BIT, shape)
    for name, (dtypes, shape) in expected.items():
        if name not in reader.meta:
            raise CheckpointError(f"{reader.path}: missing tensor {name}")
        dt, got = reader.meta[name]
        if dt not in dtypes:
            raise CheckpointError(f"{reader.index[name]}: tensor {name} has dtype {dt}, expected {'/'.join(sorted(dtypes))}")
        if got != shape:
            raise CheckpointError(f"{reader.index[name]}: tensor {name} has shape {list(got)}, expected {list(shape)}")
    extra = sorted(set(reader.meta) - set(expected))
    if extra:
        raise CheckpointError(f"{reader.index[extra[0]]}: unexpected tensor {extra[0]}")


def _tokenizer(path: Path):
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
