"""A 4-bit head for decode: group-wise int4 weights, a quarter of the fp16 head's bytes.

Why: a batch-1 decode step reads the whole head (on the CPU too: csrc/cpu has its kernel, int4_linear_cpu). On
BitNet-2B-4T's shape the int8 head (128256 x 2560 bytes) takes ~102 us of a ~0.81 ms step on an H200
(bench/GPU_LOG.md); half the bytes should take about half the time. The cost is accuracy: int4 weights round far more
coarsely than int8 (bench/bench_cpu_int8_head.py measures the perplexity of each head on a real model), which is why
it is an option (`load(..., head="int4")`, `--head int4`), never the default.

Format (in memory only: the head is quantized at load time from the checkpoint's 16-bit weights):
  - groups of GROUP = 128 consecutive weights of a row, K padded with zeros to a multiple of GROUP;
  - scale[n, g] = float16(max |w| over the group / 7), and q = clamp(round(w / scale), -7, 7) (symmetric; a group
    whose scale is 0 in float16 is all zeros);
  - packed uint8 [N, K_pad / 2], 32 weights per 16 bytes ("chunk" c covers weights 32c .. 32c + 31): byte b of the
    chunk holds q[32c + b] in its low nibble and q[32c + 16 + b] in its high nibble, as 4-bit two's complement.
    So the low nibbles of a 16-byte chunk pair with the 16 activations 32c .. 32c + 15 and the high nibbles with the
    next 16: the CUDA GEMV reads each as one 16-byte word of int8 activations (csrc/cuda/int4_gemv.cu), and
    (byte << 4) & 0xF0 / byte & 0xF0 are the nibbles times 16 as signed bytes, ready for dp4a.
Numerics (the kernels and `int4_linear_reference` alike): the activations are quantized per row to int8 as every
ternary linear's are (quant.quantize_activations: x_q, a), each group's integer dot product is exact, and
y[n] = sum_g scale[n, g] * (q[n, g] . x_q[g]) / a (+ bias): float32 sums in the kernels, float64 in the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from .graph_session import release_graphs
from .quant import quantize_activations

GROUP = 128  # weights per scale (GPTQ / AWQ's usual group); K pads to a multiple of it
QMAX = 7


def padded_k(k: int) -> int:
    return -(-k // GROUP) * GROUP


def int4_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (packed uint8 [N, K_pad / 2], scale float16 [N, K_pad / GROUP]); see the module docstring.

    Works in row chunks, so a 128k-row head never needs a whole float32 copy."""
    if w.dim() != 2 or w.shape[1] == 0:
        raise ValueError(f"int4_groups expects a 2-D weight with K > 0, got shape {tuple(w.shape)}")
    n, k = w.shape
    kp = padded_k(k)
    packed = torch.empty(n, kp // 2, dtype=torch.uint8, device=w.device)
    scale = torch.empty(n, kp // GROUP, dtype=torch.float16, device=w.device)
    rows = max(1, (1 << 25) // kp)  # <= 128 MB of float32 per chunk
    for r0 in range(0, n, rows):
        wf = torch.nn.functional.pad(w[r0:r0 + rows].float(), (0, kp - k)).reshape(-1, kp // GROUP, GROUP)
        s = (wf.abs().amax(dim=2) / QMAX).to(torch.float16)
        sf = s.float()[..., None]
        q = torch.where(sf > 0, (wf / sf).round(), torch.zeros_like(wf)).clamp(-QMAX, QMAX).to(torch.int8)
        packed[r0:r0 + rows] = pack_int4(q.reshape(-1, kp))
        scale[r0:r0 + rows] = s
    return packed, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K_pad] in [-8, 7], K_pad % 32 == 0 -> uint8 [N, K_pad / 2] in the chunk layout above."""
    n, kp = q.shape
    c = q.reshape(n, kp // 32, 2, 16).to(torch.uint8) & 15  # (row, chunk, half, byte)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, kp // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K_pad / 2] -> int8 [N, K_pad], the inverse of pack_int4."""
    n, half = packed.shape
    b = packed.reshape(n, half // 16, 1, 16)
    nib = torch.cat([b & 15, b >> 4], dim=2).to(torch.int16)  # (row, chunk, half, byte)
    return (nib - ((nib & 8) << 1)).to(torch.int8).reshape(n, half * 2)


def int4_linear_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                          in_features: int) -> torch.Tensor:
    """The plain PyTorch twin of the kernels, in float64 (exact group dot products): x [..., K] -> [..., N] in x's
    dtype. Unpacks the whole weight: a test oracle and the CPU fallback, not a fast path."""
    lead = x.shape[:-1]
    x_q, a = quantize_activations(x.reshape(-1, in_features))
    kp, m = packed.shape[1] * 2, x_q.shape[0]
    groups = kp // GROUP
    xq = torch.nn.functional.pad(x_q.double(), (0, kp - in_features)).reshape(m, groups, GROUP).transpose(0, 1)
    out = []
    rows = max(1, (1 << 24) // max(kp, groups * m))  # bounds the unpacked chunk and the per-group products
    for r0 in range(0, packed.shape[0], rows):
        q = unpack_int4(packed[r0:r0 + rows]).double().reshape(-1, groups, GROUP).permute(1, 2, 0)  # (G, 128, rows)
        dots = torch.bmm(xq, q)  # (G, M, rows): exact integers in float64
        out.append((dots * scale[r0:r0 + rows].double().t()[:, None, :]).sum(0))
    y = torch.cat(out, dim=1) / a.double()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype).reshape(*lead, packed.shape[0])


class Int4Linear(nn.Module):
    """y = int4 head (see the module docstring): the GPU op where it runs (`bitengine::int4_linear`), the C++ CPU op
    where the CPU kernels are built (`bitengine::int4_linear_cpu`, csrc/cpu), else the float64 reference."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        packed, scale = int4_groups(weight.detach())
        self.register_buffer("weight_int4", packed)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and _gpu_ready(x):
            from .kernels import int4_linear  # noqa: F401  (registers torch.ops.bitengine.int4_linear)

            return torch.ops.bitengine.int4_linear(x, self.weight_int4, self.weight_scale, self.bias,
                                                   self.in_features)
        if _cpu_ready(x):
            return torch.ops.bitengine.int4_linear_cpu(x, self.weight_int4, self.weight_scale, self.bias,
                                                       self.in_features)
        return int4_linear_reference(x, self.weight_int4, self.weight_scale, self.bias, self.in_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 groups of {GROUP} + fp16 scales"


def _cpu_ready(x: torch.Tensor) -> bool:
    from .int8_head import _kernel_ready  # the C++ CPU kernels are built and x is on the CPU

    return _kernel_ready(x)


def _gpu_ready(x: torch.Tensor) -> bool:
    from .int8_head import _gpu_kernel_ready  # the same condition as the int8 head's Triton kernels

    return _gpu_kernel_ready(x)


def quantize_head_int4(model: nn.Module, head: str = "lm_head") -> list[str]:
    """Replace the 16-bit head (a module called `head` with a 2-D float weight) by an Int4Linear in place; returns
    the replaced names. ValueError if there is none, or if the head is already quantized (requantizing int8 rows
    would round twice)."""
    from .int8_head import Int8Linear, _replace, _weight_and_bias

    release_graphs(model)  # generate()'s captured graphs read the old head's weights

    def make(m):
        if isinstance(m, Int4Linear):
            return None
        if isinstance(m, Int8Linear):
            raise ValueError("quantize_head_int4: the head is already int8; load the 16-bit head to make an int4 one")
        w, b = _weight_and_bias(m)
        if not w.is_floating_point():
            raise ValueError(f"quantize_head_int4: {head} has a {w.dtype} weight, not a 16/32-bit one")
        return Int4Linear(w, b)

    done = _replace(model, head, make)
    if not done and not any(isinstance(m, Int4Linear) for m in model.modules()):
        raise ValueError(f"quantize_head_int4: no module named {head!r} in {type(model).__name__}")
    return done
