"""Ternary GEMM with in-register weight decode (short prompts, group scales) on the tensor cores.

y[M, N] = W1.58 linear of x[M, K].

Each program computes a BLOCK_M x BLOCK_N tile. Per K step it loads BLOCK_KW i2w words per
output column, decodes them in registers to signed codes w = c - 1 in {-1, 0, 1} (one shift and
mask per weight, amortized over BLOCK_M rows) and feeds `tl.dot`:
  A8:  int8 x_q (act_quant.py pre-pass) x int8 codes -> int32 accumulation (exact), then
       y = acc * s / a: the integer tensor cores at twice the FP16 rate;
  A16: x (fp16/bf16) x codes in x's dtype (exact) -> float32 accumulation, y = acc * s.
Scales: tensor [1] / channel [N] applied once per output; group [N, K/G] applied once per K step
and output, which needs BLOCK_K = 16 * BLOCK_KW to divide G (G % 32 == 0 for A8, % 16 for A16).
Programs are ordered in groups of GROUP_M row-tiles so a weight tile is reused from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .act_quant import quantize_activations_int8
from .gemv import INTERPRET, _scale_epilogue, lora_operands, scale_mode
from .tiling import grouped_tile


@triton.jit
def _gemm_kernel(x_ptr, stride_xm, a_ptr, w_ptr, stride_wn, s_ptr, stride_sn, b_ptr, y_ptr, stride_ym,
                 h_ptr, stride_hm, lb_ptr, stride_lbn, R, M, N, K, KW,
                 A8: tl.constexpr, SCALE_MODE: tl.constexpr, GROUP_W: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_LORA: tl.constexpr,
                 IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                 GROUP_M: tl.constexpr):
    offs_m, offs_n, m_mask, n_mask = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows_x = offs_m.to(tl.int64) * stride_xm
    rows_w = offs_n.to(tl.int64) * stride_wn
    i16 = tl.arange(0, 16)
    shifts = 8 * (i16 % 4) + 2 * (i16 // 4)  # natural order of the 16 weights in a word
    BLOCK_K: tl.constexpr = BLOCK_KW * 16
    if A8 and SCALE_MODE != 2:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kw0 in range(0, KW, BLOCK_KW):
        kw = kw0 + tl.arange(0, BLOCK_KW)
        w = tl.load(w_ptr + rows_w[None, :] + kw[:, None], mask=(kw < KW)[:, None] & n_mask[None, :], other=0)
        c = (w[:, None, :] >> shifts[None, :, None]) & 3  # (BKW, 16, BN)
        c = tl.reshape(c, [BLOCK_K, BLOCK_N]) - 1
        k = kw0 * 16 + tl.arange(0, BLOCK_K)
        if A8:  # x_q int8 [M, 16 * KW], zero past K
            x = tl.load(x_ptr + rows_x[:, None] + k[None, :], mask=m_mask[:, None] & (k < KW * 16)[None, :], other=0)
            if SCALE_MODE == 2:
                part = tl.dot(x, c.to(tl.int8), out_dtype=tl.int32)
            else:
                acc = tl.dot(x, c.to(tl.int8), acc, out_dtype=tl.int32)
        else:
            x = tl.load(x_ptr + rows_x[:, None] + k[None, :], mask=m_mask[:, None] & (k < K)[None, :], other=0.0)
            wv = c.to(x_ptr.dtype.element_ty)
            if SCALE_MODE == 2:
                if IEEE:
                    part = tl.dot(x, wv, input_precision="ieee")
                else:
                    part = tl.dot(x, wv)
            else:
                if IEEE:
                    acc = tl.dot(x, wv, acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, wv, acc)
        if SCALE_MODE == 2:  # this K step lies inside one scale group
            sc = tl.load(s_ptr + offs_n.to(tl.int64) * stride_sn + kw0 // GROUP_W, mask=n_mask, other=0.0)
            acc += part.to(tl.float32) * sc[None, :]
    if A8:
        a = tl.load(a_ptr + offs_m, mask=m_mask, other=1.0)
    else:
        a = offs_m
    _scale_epilogue(acc.to(tl.float32), a, s_ptr, b_ptr, y_ptr, stride_ym, offs_m, offs_n, M, N,
                    h_ptr, stride_hm, lb_ptr, stride_lbn, R, SCALE_MODE, HAS_BIAS, A8, HAS_LORA)


def gemm_config(m: int, n: int, group_w: int = 0, a8: bool = True) -> dict:
    """Tile shapes (best of a sweep on an H200, 2026-11-28): 128 x 128, K step 128 (A8) / 64 (A16).
    Short inputs take 16-row tiles (32 for A8); A16 uses only the 16- and 128-row tiles that were
    compiled and checked on that card."""
    if m <= 16:
        bm = 16
    elif m <= 32 and a8:
        bm = 32
    else:
        bm = 128
    bkw = 8 if a8 else 4
    if group_w:
        while group_w % bkw:
            bkw //= 2
    return {"BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_KW": bkw, "GROUP_M": 8, "num_warps": 4 if a8 else 8,
            "num_stages": 4}


def ternary_gemm(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, in_features: int, act_bits: int = 8,
                 bias: torch.Tensor | None = None, config: dict | None = None,
                 lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None) -> torch.Tensor:
    """W1.58 prefill GEMM (+ LoRA side path).

    x: float16/bfloat16/float32 [M, K], row-major. words: int32 [N, KW] (i2w, layout.py).
    scale: float32 [1] | [N] | [N, K/G] (multiplies). act_bits: 8 (per-token int8, exact integer
    accumulation) or 16 (x as given; float32 inputs use IEEE float32 dot products). bias: [N] or None.
    lora_A [R, K] / lora_B [N, R]: optional float factors; adds (x @ A^T) @ B^T in float32 before the bias.
    Returns y [M, N] in x's dtype, equal to reference.ternary_linear_reference.
    """
    if x.dim() != 2 or x.stride(-1) != 1 or x.shape[1] != in_features:
        raise ValueError(f"expected a row-major [M, {in_features}] activation, got {tuple(x.shape)}")
    if words.dtype != torch.int32 or words.dim() != 2 or words.shape[1] * 16 < in_features:
        raise ValueError(f"weight must be i2w int32 [N, >= K/16], got {words.dtype} {tuple(words.shape)}")
    if act_bits not in (8, 16):
        raise ValueError(f"act_bits must be 8 or 16, got {act_bits}")
    mode, group_w, stride_sn = scale_mode(scale, words.shape[0], in_features)
    m, n, kw = x.shape[0], words.shape[0], words.shape[1]
    a8 = act_bits == 8
    cfg = dict(config or gemm_config(m, n, group_w if mode == 2 else 0, a8))
    if mode == 2 and (group_w % cfg["BLOCK_KW"] or cfg["BLOCK_KW"] * 16 < (32 if a8 else 16)):
        raise ValueError(f"group size {16 * group_w} needs a K step dividing it (>= 32 for A8): not supported here")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if a8:
        xin, a = quantize_activations_int8(x, kw)
    else:
        xin, a = x, scale
    h, stride_hm, lb, stride_lbn, r, has_lora = lora_operands(x, n, lora_A, lora_B, scale)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    if INTERPRET:
        cfg.pop("num_stages", None)
    _gemm_kernel[grid](xin, xin.stride(0), a, words, words.stride(0), scale, stride_sn,
                       bias if bias is not None else scale, y, y.stride(0), h, stride_hm, lb, stride_lbn, r,
                       m, n, in_features, kw,
                       A8=a8, SCALE_MODE=mode, GROUP_W=max(group_w, 1), HAS_BIAS=bias is not None, HAS_LORA=has_lora,
                       IEEE=x.dtype == torch.float32, **cfg)
    return y
