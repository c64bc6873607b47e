"""Greedy decoding's argmax over the vocabulary, for GPU logits (B, V): two small Triton kernels.

Why not torch.argmax: it reduces each row in one thread block, so over a 128k vocabulary at batch 1 it runs on one
SM (34 us per step for BitNet-2B-4T's 128256 logits on an H200, bench/results/gpu_decode_profile.md, 2.7% of the
step; 10 us for Llama-2-7B's 32000). Here stage 1 splits each row into BLOCK-wide pieces, one program each (many
SMs), and writes each piece's maximum and where it is; stage 2 reduces a row's pieces.

Same answer as torch.argmax, which is the test oracle: the first index of the maximum; NaN counts as larger than
everything (torch returns the first NaN's index), so a row with a NaN gives its first NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # logits per stage-1 program: 32 programs per row at a 128k vocabulary, 8 at 32k


@triton.jit
def _first_max(v, idx, big):
    """(the maximum of v, the smallest idx where v holds it); NaN in v beats every number."""
    nan = v != v
    any_nan = tl.max(nan.to(tl.int32), axis=0) > 0
    m = tl.max(v, axis=0)
    first_nan = tl.min(tl.where(nan, idx, big), axis=0)
    first_max = tl.min(tl.where(v == m, idx, big), axis=0)
    return tl.where(any_nan, float("nan"), m), tl.where(any_nan, first_nan, first_max)


@triton.jit
def _argmax_blocks_kernel(x_ptr, stride_x, part_v_ptr, part_i_ptr, V, n_parts, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    part = tl.program_id(1)
    offs = part * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    # masked lanes hold -inf; they can only tie with a row of -inf, and their indices (>= V) lose the tie
    m, i = _first_max(v, offs, 2147483647)
    tl.store(part_v_ptr + row * n_parts + part, m)
    tl.store(part_i_ptr + row * n_parts + part, i)


@triton.jit
def _argmax_parts_kernel(part_v_ptr, part_i_ptr, out_ptr, n_parts, PARTS: tl.constexpr):
    row = tl.program_id(0)
    p = tl.arange(0, PARTS)
    mask = p < n_parts
    v = tl.load(part_v_ptr + row * n_parts + p, mask=mask, other=float("-inf"))
    i = tl.load(part_i_ptr + row * n_parts + p, mask=mask, other=2147483647)
    # pieces are in index order, so the smallest index among the maximal pieces is the row's first maximum
    _, best = _first_max(v, i, 2147483647)
    tl.store(out_ptr + row, best.to(tl.int64))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) for CUDA logits (B, V) float16/bfloat16/float32 with unit stride along V.
    Returns int64 (B,). Capturable in a CUDA graph (no host sync, fixed launches for fixed shapes)."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"argmax_rows: expected (B, V) logits with unit stride along V, got {tuple(logits.shape)} "
                         f"strides {logits.stride()}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"argmax_rows: logits must be float16/bfloat16/float32, got {logits.dtype}")
    b, v = logits.shape
    if v == 0 or v >= 2**31 - 1:
        raise ValueError(f"argmax_rows: vocabulary size {v} out of range")
    out = torch.empty(b, dtype=torch.long, device=logits.device)
    if b == 0:
        return out
    n_parts = triton.cdiv(v, BLOCK)
    part_v = torch.empty(b, n_parts, dtype=torch.float32, device=logits.device)
    part_i = torch.empty(b, n_parts, dtype=torch.int32, device=logits.device)
    _argmax_blocks_kernel[(b, n_parts)](logits, logits.stride(0), part_v, part_i, v, n_parts, BLOCK=BLOCK,
                                        num_warps=8)
    _argmax_parts_kernel[(b,)](part_v, part_i, out, n_parts, PARTS=max(2, triton.next_power_of_2(n_parts)),
                               num_warps=1)
    return out
