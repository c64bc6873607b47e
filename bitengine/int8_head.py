"""Smaller / faster 16-bit heads for decode: int8 head (and embeddings), fast fp16 CPU head.

On small models the 16-bit head is a large share of the bytes read per decoded token (TinyLlama
shape: 131 MB of fp16 head vs 242 MB of 2-bit linear weights), and decode is memory-bound.
  - quantize_head_int8(model): lm_head -> Int8Linear, per-row int8 weights with an fp32 scale
    (W ~= scale[n] * W_q[n, :], scale multiplies; W_q in [-127, 127]); activations stay float, so
    the only error is the weight rounding. Halves the head bytes.
  - quantize_head_int8(model, embeddings=True) also stores the token embeddings as int8 rows.
  - use_cpu_half_head(model) / use_cpu_half_dense(model): keep the head's (every dense layer's) fp16 weights (the
    loader's default on the CPU); nn.DenseLinear runs a float16 weight under float32 activations through the F16C
    kernel instead of torch's fp16 GEMV (~2x slower).
On CPU both run `torch.ops.bitengine.dense_linear_cpu` (csrc/cpu). On CUDA the int8 head runs
`torch.ops.bitengine.int8_linear` (kernels/int8_linear.py, Triton: int8 weights read as they are, never
dequantized to a float copy). Elsewhere, or without the extension / triton, the modules fall back to plain
PyTorch (which dequantizes the weight every call) with the same numbers up to fp32 summation order.
Int8Embedding gathers only the looked-up rows on every device.
This module does not load or convert checkpoints; the loader decides when to call it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .graph_session import release_graphs

PAD = 32  # the dense kernels want K padded to a multiple of 32 (zeros)


def _kernel_ready(t: torch.Tensor) -> bool:
    if t.device.type != "cpu":
        return False
    from .backends import cpu

    return cpu._C is not None


_GPU_READY: dict[int, bool] = {}  # CUDA device index -> the Triton int8 kernel runs there


def _gpu_kernel_ready(t: torch.Tensor) -> bool:
    """True on a CUDA device where the triton backend could run (triton importable, compute capability
    >= 8.0); decided once per device. A plain dict, not functools.cache, so torch.compile traces it."""
    if t.device.type != "cuda":
        return False
    ready = _GPU_READY.get(t.device.index)  # a CUDA tensor's device always has its index
    if ready is None:
        from .backends import triton as triton_backend

        ready = triton_backend.TritonBackend().unavailable_reason(t.device) is None
        _GPU_READY[t.device.index] = ready
    return ready


def _pad_cols(w: torch.Tensor) -> torch.Tensor:
    pad = (-w.shape[1]) % PAD
    return F.pad(w, (0, pad)).contiguous() if pad else w.contiguous()


def _streamed(w: torch.Tensor) -> torch.Tensor:
    """w itself, or on the CPU with the C++ kernels its copy in 2 MB pages (large_pages_copy_cpu):
    a head is read whole every decode step, and reads faster from large pages."""
    return torch.ops.bitengine.large_pages_copy_cpu(w) if _kernel_ready(w) else w


def int8_rows(w: torch.Tensor):
    """float [N, K] -> (int8 [N, K] in [-127, 127], float32 scale [N]) with w ~= scale[:, None] * q.

    Works in row chunks so a large head (128k x 4096 on a GPU) never needs a whole float32 copy."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    rows = max(1, (1 << 26) // max(1, w.shape[1]))  # <= 256 MB of float32 per chunk
    for r0 in range(0, w.shape[0], rows):
        wf = w[r0:r0 + rows].float()
        s = wf.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q[r0:r0 + rows] = (wf / s[:, None]).round().clamp(-127, 127).to(torch.int8)
        scale[r0:r0 + rows] = s
    return q, scale


class Int8Linear(nn.Module):
    """y = (x @ W_q^T) * scale (+ bias); W_q int8 [N, ceil(K/32)*32] zero padded, scale fp32 [N]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scale = int8_rows(weight)
        self.register_buffer("weight_int8", _streamed(_pad_cols(q)))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _kernel_ready(x):
            return torch.ops.bitengine.dense_linear_cpu(x, self.weight_int8, self.weight_scale, self.bias,
                                                        self.in_features)
        if _gpu_kernel_ready(x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
            from .kernels import int8_linear  # noqa: F401  (registers torch.ops.bitengine.int8_linear)

            return torch.ops.bitengine.int8_linear(x, self.weight_int8, self.weight_scale, self.bias,
                                                   self.in_features)
        w = self.weight_int8[:, : self.in_features].float()
        y = F.linear(x.float(), w) * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 rows + fp32 scale"


class Int8Embedding(nn.Module):
    """Token embeddings as int8 rows with an fp32 scale per row; returns `dtype` vectors."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        q, scale = int8_rows(weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.weight_int8[ids].float() * self.weight_scale[ids, None]).to(self.dtype)


def _replace(model: nn.Module, suffix: str, make) -> list[str]:
    done = []
    for name, module in list(model.named_modules()):
        if name == suffix or name.endswith("." + suffix):
            new = make(module)
            if new is None:
                continue
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], new)
            done.append(name)
    return done


def _weight_and_bias(module: nn.Module):
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"cannot requantize {type(module).__name__}: no 2-D weight")
    return w.detach(), getattr(module, "bias", None)


def quantize_head_int8(model: nn.Module, head: str = "lm_head", embeddings: bool = False,
                       embeddings_name: str = "embed_tokens") -> list[str]:
    """Replace the 16-bit head (a DenseLinear / nn.Linear called `head`) by an Int8Linear in place.

    With embeddings=True also replace the nn.Embedding called `embeddings_name` by an
    Int8Embedding. Tied weights are fine: each gets its own int8 copy. Returns the replaced
    module names; ValueError if no head was found.
    """
    release_graphs(model)  # generate()'s captured graphs read the old head's weights

    def make_head(m):
        if isinstance(m, (Int8Linear,)):
            return None
        w, b = _weight_and_bias(m)
        return Int8Linear(w, b)

    done = _replace(model, head, make_head)
    if not done and not any(isinstance(m, Int8Linear) for m in model.modules()):
        raise ValueError(f"quantize_head_int8: no module named {head!r} in {type(model).__name__}")
    if embeddings:
        def make_emb(m):
            if not isinstance(m, nn.Embedding):
                return None
            return Int8Embedding(m.weight.detach(), m.weight.dtype)

        done += _replace(model, embeddings_name, make_emb)
    return done


def use_cpu_half_head(model: nn.Module) -> bool:
    """The head's weight (and a tied embedding's, the same tensor) as float16 in 2 MB pages, so nn._dense_linear runs
    it through the C++ F16C kernel (float32 sums; torch's float16 matmul on the CPU is ~2x slower and a float32 copy
    reads twice the bytes). Exact when the weight holds float16 values (a float16 checkpoint's head). Returns False,
    changing nothing, where it does not apply: no dense head, not on the CPU, the kernels not built, or a row length
    that is not a multiple of 32."""
    m = getattr(model, "lm_head", None)
    return _to_half(model, m) if m is not None else False


def use_cpu_half_dense(model: nn.Module) -> list[str]:
    """use_cpu_half_head for every dense linear layer of the model (the head, and the layers of a `--weights fp16`
    checkpoint or kept 16-bit modules): what load() does by default on the CPU (loader.cpu_keeps_half). The F16C
    kernel against torch's float32 F.linear on the same values: 0.14-0.81x the time at 1-64 tokens, 0.94-1.10x at 512
    (bench/results/cpu_dense_f16c_2026-12-03.md). Returns the names of the layers converted."""
    from .nn import DenseLinear

    return [name for name, m in list(model.named_modules()) if isinstance(m, DenseLinear) and _to_half(model, m)]


def _to_half(model: nn.Module, m: nn.Module) -> bool:
    from .nn import DenseLinear

    if not isinstance(m, DenseLinear) or m.in_features % PAD or not _kernel_ready(m.weight):
        return False
    release_graphs(model)  # captured graphs read the old weight
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    tied = getattr(emb, "weight", None) is m.weight
    m.weight = nn.Parameter(_streamed(m.weight.detach().to(torch.float16).contiguous()), requires_grad=False)
    if tied:
        emb.weight = m.weight
    return True
