"""Per-token int8 activation quantization on the GPU (the A8 front end of the ternary kernels).

Same numbers as quant.quantize_activations: per row `a = 127 / max(max|x|, 1e-5)` in float32,
computed the way torch evaluates `127.0 / t` (reciprocal, then multiply: two IEEE roundings),
`x_q = clamp(rint(x * a), -128, 127)` with rounding half to even.
Rounding uses the 1.5 * 2^23 trick, exact for |v| < 2^22; it needs the multiply and the add kept
apart, so kernels that quantize are launched with enable_fp_fusion=False.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import WEIGHTS_PER_WORD

_RNE_MAGIC = 12582912.0  # 1.5 * 2**23


@triton.jit
def round_half_even(v):
    """rint for |v| < 2**22 (caller must disable fp fusion so v*a is rounded before this add)."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def quant_scale(amax):
    """a = 127 / max(amax, 1e-5) as torch computes it: round(round(1 / amax) * 127)."""
    return tl.div_rn(tl.full(amax.shape, 1.0, tl.float32), tl.maximum(amax, 1e-5)) * 127.0


@triton.jit
def _act_quant_kernel(x_ptr, stride_xm, q_ptr, stride_qm, a_ptr, K, KQ, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    a = quant_scale(tl.max(amax, axis=0))
    tl.store(a_ptr + row, a)
    for k0 in range(0, KQ, BLOCK):
        k = k0 + offs
        x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(round_half_even(x * a), -128.0), 127.0)
        tl.store(q_ptr + row * stride_qm + k, q.to(tl.int8), mask=k < KQ)


@triton.jit
def _act_quant_rows_kernel(x_ptr, stride_xm, q_ptr, stride_qm, a_ptr, M, K, KQ, ROWS: tl.constexpr,
                           BLOCK: tl.constexpr):
    """ROWS whole rows per program, each read once into registers (BLOCK >= KQ): the two-pass loop above reads a
    row twice and pays a row's load latency twice per program; at M = 2048 it was 7-30 us of the prefill linear
    (gpu_prefill_sweep_..._2026-12-03), next to a 30-130 us GEMM."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = tl.arange(0, BLOCK)
    r_mask = rows < M
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + offs[None, :],
                mask=r_mask[:, None] & (offs < K)[None, :], other=0.0).to(tl.float32)
    a = quant_scale(tl.max(tl.abs(x), axis=1))
    tl.store(a_ptr + rows, a, mask=r_mask)
    q = tl.minimum(tl.maximum(round_half_even(x * a[:, None]), -128.0), 127.0)
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * stride_qm + offs[None, :], q.to(tl.int8),
             mask=r_mask[:, None] & (offs < KQ)[None, :])


# rows of up to this many (padded) features are quantized by _act_quant_rows_kernel, longer ones by the loop
ROW_KERNEL_MAX = 16384


def quantize_activations_int8(x: torch.Tensor, words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize rows of x for the ternary kernels.

    x: float16/bfloat16/float32 [M, K], last dim contiguous. words: the weight's i2w row length KW.
    Returns (x_q int8 [M, 16*KW], zero past K; a float32 [M], the multiplier: x ~= x_q / a).
    """
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"expected a 2-D row-major activation, got shape {tuple(x.shape)} strides {x.stride()}")
    m, k = x.shape
    kq = words * WEIGHTS_PER_WORD
    if kq < k:
        raise ValueError(f"weight rows hold {kq} weights, activation has {k} features")
    q = torch.empty(m, kq, dtype=torch.int8, device=x.device)
    a = torch.empty(m, dtype=torch.float32, device=x.device)
    if m and kq <= ROW_KERNEL_MAX:
        block = triton.next_power_of_2(kq)
        rows = min(max(1, 8192 // block), triton.next_power_of_2(m))
        _act_quant_rows_kernel[(triton.cdiv(m, rows),)](x, x.stride(0), q, q.stride(0), a, m, k, kq, ROWS=rows,
                                                        BLOCK=block, num_warps=16 if block > 8192 else 8,
                                                        enable_fp_fusion=False)
    elif m:
        block = min(triton.next_power_of_2(kq), 4096)
        _act_quant_kernel[(m,)](x, x.stride(0), q, q.stride(0), a, k, kq, BLOCK=block, num_warps=4,
                                enable_fp_fusion=False)
    return q, a
