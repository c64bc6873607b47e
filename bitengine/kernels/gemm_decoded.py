"""Long-prompt prefill (large M): decode the ternary weight once per call, then a pipelined tensor-core GEMM.

At large M the in-register decode of gemm.py is paid once per row tile (M / BLOCK_M times per weight)
and sits on the critical path between loads and MMAs. Here one memory-bound pass expands the
weight to a dense scratch [N, 16*KW] of exact values w in {-1, 0, 1}:
  A8:  int8 scratch; the GEMM is int8 x_q x int8 w -> int32 (exact), y = acc * s / a;
  A16: scratch in x's dtype (fp16/bf16; +-1 and 0 are exact), fp32 accumulation, y = acc * s.
The scratch costs N * K bytes (A8) or 2 N K bytes (A16) of transient memory (the caching allocator
reuses it across layers) and one write + read of it; the GEMM streams both operands through the
software pipeline with no work between loads and MMAs. Per-tensor / per-channel scales only
(group scales go to gemm.py). Block shapes are autotuned per (N, K, M bucket) on first use.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .act_quant import quantize_activations_int8
from .gemv import INTERPRET, _scale_epilogue, lora_operands
from .tiling import grouped_tile


@triton.jit
def _decode_kernel(w_ptr, stride_wn, out_ptr, stride_on, N, KW, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kw = tl.program_id(1) * BLOCK_KW + tl.arange(0, BLOCK_KW)
    mask = (offs_n < N)[:, None] & (kw < KW)[None, :]
    w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + kw[None, :], mask=mask, other=0)
    i16 = tl.arange(0, 16)
    shifts = 8 * (i16 % 4) + 2 * (i16 // 4)
    v = ((w[:, :, None] >> shifts[None, None, :]) & 3) - 1  # (BN, BKW, 16): weight 16 kw + i
    ptrs = out_ptr + offs_n.to(tl.int64)[:, None, None] * stride_on + kw[None, :, None] * 16 + i16[None, None, :]
    tl.store(ptrs, v.to(out_ptr.dtype.element_ty), mask=mask[:, :, None])


def decode_weight(words: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """int32 [N, KW] (i2w) -> dense [N, 16 * KW] of w in {-1, 0, 1} (zero past K) in `dtype` (into `out` if given:
    a contiguous [N, 16 * KW] tensor of that dtype)."""
    n, kw = words.shape
    if out is None:
        out = torch.empty(n, kw * 16, dtype=dtype, device=words.device)
    elif out.shape != (n, kw * 16) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"decode_weight: out must be a contiguous {dtype} [{n}, {kw * 16}], got {out.dtype} "
                         f"{tuple(out.shape)}")
    grid = (triton.cdiv(n, 16), triton.cdiv(kw, 32))
    _decode_kernel[grid](words, words.stride(0), out, out.stride(0), n, kw, BLOCK_N=16, BLOCK_KW=32, num_warps=4)
    return out


# The weight's decode and the tokens' quantization do not depend on each other, and at prefill sizes neither keeps
# the card's bandwidth busy alone (2048 x 2560: 4.2 us for 8 MB and 6.6 us for 16 MB, gpu_prefill_sweep_pdl_2767a3a_...):
# with OVERLAP the decode runs on a side stream while the quantization runs on the caller's, and the GEMM waits for
# both (BITENGINE_PREFILL_OVERLAP=0, or setting OVERLAP to False, runs them one after the other).
OVERLAP = os.environ.get("BITENGINE_PREFILL_OVERLAP", "1") != "0"


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(index: int) -> torch.cuda.Stream | None:
    """The device's side stream, made on first use; None while a CUDA graph is being captured and none exists yet
    (no stream is created inside a capture: the call then runs sequentially)."""
    if index not in _SIDE_STREAMS:
        if torch.cuda.is_current_stream_capturing():
            return None
        _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    return _SIDE_STREAMS[index]


def _decode_and_quantize(x: torch.Tensor, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w int8 decoded, x_q, a) for the A8 GEMM, the decode overlapped with the quantization on CUDA (OVERLAP).

    The scratch is allocated on the caller's stream, so under graph capture it comes from the graph's pool and it is
    only reused after the GEMM (which runs on that stream after the join); the side stream first waits for the
    caller's, so it never writes a block that an earlier kernel of the caller still reads."""
    n, kw = words.shape
    side = None
    if OVERLAP and x.is_cuda and not INTERPRET:
        side = _side_stream(x.device.index if x.device.index is not None else torch.cuda.current_device())
    if side is None:
        w = decode_weight(words, torch.int8)
        return (w, *quantize_activations_int8(x, kw))
    w = torch.empty(n, kw * 16, dtype=torch.int8, device=x.device)
    caller = torch.cuda.current_stream(x.device)
    side.wait_stream(caller)
    with torch.cuda.stream(side):
        decode_weight(words, torch.int8, out=w)
    xin, a = quantize_activations_int8(x, kw)
    caller.wait_stream(side)
    return w, xin, a


def _configs():
    """Autotune candidates; BITENGINE_TUNE=0 uses one fixed tile (tests, where tuning costs more than it saves)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4)]
    # tiles whose shared memory lets two programs share an SM (int8: 3 x (128 + 128) x 128 B = 96 KB; fp16 at
    # BLOCK_K 64 the same): 128 x 128 x 128, 8 warps, 3 stages won the M = 2048 sweep on seven of eight shapes
    # (gpu_prefill_sweep_run1_d658fe6_..._2026-12-03; the GEMM in 0.80-0.90x the time of the tile the old candidate
    # list tuned to); the smaller ones are for short prompts and few output columns (the 640-row k / v: 64 x 64)
    shapes = [(128, 128, 128, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 128, 8, 3),
              (128, 64, 128, 8, 3), (64, 64, 128, 4, 4), (128, 256, 128, 8, 3), (64, 128, 64, 4, 4)]
    if os.environ.get("BITENGINE_TUNE") == "0":
        # one tile that fits both operand widths: 4 stages x (128x64 + 64x128) x 2 bytes = 128 KB of shared
        # memory for fp16 (the first candidate above needs 288 KB in fp16; the autotuner prunes it there)
        shapes = [(128, 128, 64, 4, 4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


@triton.autotune(configs=_configs(), key=["N", "KP", "M_BUCKET", "A8"])
@triton.jit
def _gemm_dense_kernel(x_ptr, stride_xm, a_ptr, w_ptr, stride_wn, s_ptr, b_ptr, y_ptr, stride_ym,
                       h_ptr, stride_hm, lb_ptr, stride_lbn, R, M, N, K, KP, M_BUCKET,
                       A8: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    offs_m, offs_n, m_mask, n_mask = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    if A8:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, KP, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & (k < K)[None, :], other=0)
        w = tl.load(w_cols + k[:, None], mask=(k < KP)[:, None] & n_mask[None, :], other=0)  # (BK, BN), K-major
        if A8:
            acc = tl.dot(x, w, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(x, w, acc)
    if A8:
        a = tl.load(a_ptr + offs_m, mask=m_mask, other=1.0)
    else:
        a = offs_m
    _scale_epilogue(acc.to(tl.float32), a, s_ptr, b_ptr, y_ptr, stride_ym, offs_m, offs_n, M, N,
                    h_ptr, stride_hm, lb_ptr, stride_lbn, R, SCALE_MODE, HAS_BIAS, A8, HAS_LORA)


def ternary_gemm_decoded(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, in_features: int,
                         act_bits: int = 8, bias: torch.Tensor | None = None,
                         lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None) -> torch.Tensor:
    """W1.58 prefill GEMM through a decoded scratch weight (+ LoRA side path).

    x: float16/bfloat16 (A8 also float32) [M, K], row-major. words: int32 [N, KW] (i2w).
    scale: float32 [1] | [N] (multiplies). act_bits 8 or 16. bias: [N] or None.
    lora_A [R, K] / lora_B [N, R]: optional float factors; adds (x @ A^T) @ B^T in float32 before the bias.
    Returns y [M, N] in x's dtype, equal to reference.ternary_linear_reference.
    """
    if x.dim() != 2 or x.stride(-1) != 1 or x.shape[1] != in_features:
        raise ValueError(f"expected a row-major [M, {in_features}] activation, got {tuple(x.shape)}")
    if scale.numel() != 1 and scale.dim() != 1:
        raise ValueError(f"decoded GEMM takes tensor or channel scales, got shape {tuple(scale.shape)}")
    if act_bits == 16 and x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"A16 decoded GEMM needs float16/bfloat16 activations, got {x.dtype}")
    m, n = x.shape[0], words.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    a8 = act_bits == 8
    if a8:
        w, xin, a = _decode_and_quantize(x, words)
        k_eff = xin.shape[1]
    else:
        w = decode_weight(words, x.dtype)
        xin, a, k_eff = x, scale, in_features
    mode = 0 if scale.numel() == 1 else 1
    h, stride_hm, lb, stride_lbn, r, has_lora = lora_operands(x, n, lora_A, lora_B, scale)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _gemm_dense_kernel[grid](xin, xin.stride(0), a, w, w.stride(0), scale, bias if bias is not None else scale,
                             y, y.stride(0), h, stride_hm, lb, stride_lbn, r,
                             m, n, k_eff, w.shape[1], min(triton.next_power_of_2(m), 4096),
                             A8=a8, SCALE_MODE=mode, HAS_BIAS=bias is not None, HAS_LORA=has_lora)
    return y
