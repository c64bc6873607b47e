"""Ternary GEMV for decode (M <= 16): y[M, N] = W1.58 linear of x[M, K], weights in i2w (layout.py).

W1.58A8 (`ternary_gemv_a8`): int8 activations against 2-bit codes c = w + 1 in {0, 1, 2} with
`dp4a`: per 32-bit weight word, four `(word >> 2j) & 0x03030303` masks each give four int8 lanes,
so 16 weights cost 4 shifts/masks and 4 dp4a, no multiply on the weight side. The code offset is
removed once per row: sum_k x_q * (c - 1) = sum_k x_q * c - sum_k x_q (the second sum is one more
dp4a per activation word against 0x01010101, shared by all rows of a program).
Activation quantization is either a separate pre-pass (act_quant.py) or fused (FUSED=True): each
program finds max|x| of its rows and quantizes x on the fly, saving a launch at small M * K.

W1.58A16 (`ternary_gemv_a16`): codes become floats c - 1 through the exponent trick
bits(0x4B000000 | c) = 2^23 + c, then one FMA per weight; accumulated in float32.

Both: one program per BLOCK_N rows and all M (<= BLOCK_M) activations, looping over K in blocks of
BLOCK_KW words; scales per tensor [1], per channel [N] (applied once per output) or per group
[N, K/G] with G % 16 == 0 (applied once per word and output); optional bias; any N, K (masks);
optional LoRA side path in the shared epilogue (`_scale_epilogue`, also used by the GEMMs): float32
h = x @ A^T computed before the launch, sum_r h[m, r] * B[n, r] added to the accumulator.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .act_quant import quant_scale, quantize_activations_int8, round_half_even
from .pdl import INTERPRET
from .tiling import column_tile


@triton.jit
def dp4a(a, b, c, USE_ASM: tl.constexpr):
    """c + sum_i byte_i(a) * signed_byte_i(b), elementwise on int32; a's bytes must be < 128."""
    if USE_ASM:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:  # the interpreter has no inline asm: the same function in plain integer ops
        for i in tl.static_range(4):
            c += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
        return c


@triton.jit
def _dot_words(w, x0, x1, x2, x3, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
               USE_ASM: tl.constexpr):
    """sum over each word's 16 weights of x_q * code: w int32 (BN, BKW), x_j int32 (BM, BKW) -> (BM, BN, BKW)."""
    d = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KW), dtype=tl.int32)
    d = dp4a(tl.broadcast_to((w & 0x03030303)[None, :, :], (BLOCK_M, BLOCK_N, BLOCK_KW)),
             tl.broadcast_to(x0[:, None, :], (BLOCK_M, BLOCK_N, BLOCK_KW)), d, USE_ASM)
    d = dp4a(tl.broadcast_to(((w >> 2) & 0x03030303)[None, :, :], (BLOCK_M, BLOCK_N, BLOCK_KW)),
             tl.broadcast_to(x1[:, None, :], (BLOCK_M, BLOCK_N, BLOCK_KW)), d, USE_ASM)
    d = dp4a(tl.broadcast_to(((w >> 4) & 0x03030303)[None, :, :], (BLOCK_M, BLOCK_N, BLOCK_KW)),
             tl.broadcast_to(x2[:, None, :], (BLOCK_M, BLOCK_N, BLOCK_KW)), d, USE_ASM)
    d = dp4a(tl.broadcast_to(((w >> 6) & 0x03030303)[None, :, :], (BLOCK_M, BLOCK_N, BLOCK_KW)),
             tl.broadcast_to(x3[:, None, :], (BLOCK_M, BLOCK_N, BLOCK_KW)), d, USE_ASM)
    return d


@triton.jit
def _scale_epilogue(acc, a, s_ptr, b_ptr, y_ptr, stride_ym, offs_m, offs_n, M, N,
                    h_ptr, stride_hm, lb_ptr, stride_lbn, R,
                    SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, A8: tl.constexpr, HAS_LORA: tl.constexpr):
    """y = acc * s (/ a for A8) (+ h @ B^T) (+ bias); acc float32 [BM, BN] (group scales already applied).

    LoRA side path: h float32 [M, R] (= x @ A^T, computed before the kernel), B [N, R] (16-bit, scaling
    folded in); R rank-1 updates in float32, negligible next to the K loop (R <= 64 or so)."""
    n_mask = offs_n < N
    if SCALE_MODE == 0:
        acc = acc * tl.load(s_ptr)
    elif SCALE_MODE == 1:
        acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if A8:
        acc = acc / a[:, None]
    if HAS_LORA:
        h_rows = h_ptr + offs_m.to(tl.int64) * stride_hm
        b_rows = lb_ptr + offs_n.to(tl.int64) * stride_lbn
        m_mask = offs_m < M
        for r in range(R):
            hr = tl.load(h_rows + r, mask=m_mask, other=0.0)
            br = tl.load(b_rows + r, mask=n_mask, other=0.0).to(tl.float32)
            acc += hr[:, None] * br[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _x_word(x_ptr, rows_x, kw, J: tl.constexpr, m_mask, KW):
    """int32 (BM, BKW): word 4 kw + J of the int8 x_q rows, i.e. inputs 16 kw + 4J .. 16 kw + 4J + 3."""
    return tl.load(x_ptr + rows_x[:, None] + (kw * 4 + J)[None, :], mask=m_mask[:, None] & (kw < KW)[None, :],
                   other=0)


@triton.jit
def _gemv_a8_kernel(x_ptr, stride_xm, a_ptr, w_ptr, stride_wn, s_ptr, stride_sn, b_ptr, y_ptr, stride_ym,
                    h_ptr, stride_hm, lb_ptr, stride_lbn, R, M, N, K, KW,
                    SCALE_MODE: tl.constexpr, GROUP_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                    FUSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_KW: tl.constexpr, USE_ASM: tl.constexpr):
    offs_m, offs_n, m_mask, n_mask = column_tile(M, N, BLOCK_M, BLOCK_N)
    rows_x = offs_m.to(tl.int64) * stride_xm
    rows_w = offs_n.to(tl.int64) * stride_wn
    i16 = tl.arange(0, 16)
    # The first weight tile is requested before the absmax pass, and each step requests the next tile
    # before computing, so the weight stream never waits on the activation work.
    kw = tl.arange(0, BLOCK_KW)
    w_next = tl.load(w_ptr + rows_w[:, None] + kw[None, :], mask=n_mask[:, None] & (kw < KW)[None, :], other=0)
    if FUSED:  # x: float [M, K]; first pass: per-row absmax
        amax = tl.zeros([BLOCK_M, BLOCK_KW * 16], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_KW * 16):
            k = k0 + tl.arange(0, BLOCK_KW * 16)
            x = tl.load(x_ptr + rows_x[:, None] + k[None, :], mask=m_mask[:, None] & (k < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        a = quant_scale(tl.max(amax, axis=1))  # (BM,)
    else:  # x: int8 x_q [M, 16 * KW] viewed as int32 words [M, 4 * KW]
        a = tl.load(a_ptr + offs_m, mask=m_mask, other=1.0)
    # M = 1: accumulate per (column, word) and reduce once after the loop (no cross-thread traffic
    # inside it); larger M reduces every step to bound registers.
    acc_dtype = tl.float32 if SCALE_MODE == 2 else tl.int32
    acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_KW], dtype=acc_dtype)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    xs2 = tl.zeros([BLOCK_M, BLOCK_KW], dtype=tl.int32)
    for kw0 in range(0, KW, BLOCK_KW):
        kw = kw0 + tl.arange(0, BLOCK_KW)
        w = w_next
        kw_next = kw + BLOCK_KW
        w_next = tl.load(w_ptr + rows_w[:, None] + kw_next[None, :], mask=n_mask[:, None] & (kw_next < KW)[None, :],
                         other=0)
        if FUSED:  # quantize a (BM, BKW, 16) block once, then split it into the four words
            k3 = kw[None, :, None] * 16 + i16[None, None, :]
            x = tl.load(x_ptr + rows_x[:, None, None] + k3, mask=m_mask[:, None, None] & (k3 < K), other=0.0)
            q = round_half_even(x.to(tl.float32) * a[:, None, None])
            q = tl.minimum(tl.maximum(q, -128.0), 127.0).to(tl.int32)
            q = (q & 0xFF) << (8 * (i16 % 4))[None, None, :]
            xw = tl.sum(tl.reshape(q, [BLOCK_M, BLOCK_KW, 4, 4]), axis=3)  # bytes never overlap: sum == or
            even, odd = tl.split(tl.reshape(xw, [BLOCK_M, BLOCK_KW, 2, 2]))  # trailing 4 = (j // 2, j % 2)
            x0, x2 = tl.split(even)
            x1, x3 = tl.split(odd)
        else:  # int8 x_q [M, 16 KW] viewed as int32: word 4 kw + j
            x0 = _x_word(x_ptr, rows_x, kw, 0, m_mask, KW)
            x1 = _x_word(x_ptr, rows_x, kw, 1, m_mask, KW)
            x2 = _x_word(x_ptr, rows_x, kw, 2, m_mask, KW)
            x3 = _x_word(x_ptr, rows_x, kw, 3, m_mask, KW)
        d = _dot_words(w, x0, x1, x2, x3, BLOCK_M, BLOCK_N, BLOCK_KW, USE_ASM)  # (BM, BN, BKW)
        ones = tl.full([BLOCK_M, BLOCK_KW], 0x01010101, tl.int32)
        xs = dp4a(ones, x0, tl.zeros([BLOCK_M, BLOCK_KW], dtype=tl.int32), USE_ASM)
        xs = dp4a(ones, x1, xs, USE_ASM)
        xs = dp4a(ones, x2, xs, USE_ASM)
        xs = dp4a(ones, x3, xs, USE_ASM)  # (BM, BKW): sum of x_q over each word's 16 inputs
        if SCALE_MODE == 2:
            sc = tl.load(s_ptr + offs_n.to(tl.int64)[:, None] * stride_sn + (kw // GROUP_W)[None, :],
                         mask=n_mask[:, None] & (kw < KW)[None, :], other=0.0)
            part = (d - xs[:, None, :]).to(tl.float32) * sc[None, :, :]
        else:
            part = d
            xs2 += xs
        if BLOCK_M == 1:
            acc3 += part
        else:
            acc += tl.sum(part, axis=2)
    if BLOCK_M == 1:
        acc += tl.sum(acc3, axis=2)
    if SCALE_MODE == 2:
        acc = acc.to(tl.float32)
    else:
        acc = (acc - tl.sum(xs2, axis=1)[:, None]).to(tl.float32)
    _scale_epilogue(acc, a, s_ptr, b_ptr, y_ptr, stride_ym, offs_m, offs_n, M, N, h_ptr, stride_hm, lb_ptr,
                    stride_lbn, R, SCALE_MODE, HAS_BIAS, True, HAS_LORA)


@triton.jit
def _gemv_a16_kernel(x_ptr, stride_xm, w_ptr, stride_wn, s_ptr, stride_sn, b_ptr, y_ptr, stride_ym,
                     h_ptr, stride_hm, lb_ptr, stride_lbn, R, M, N, K, KW,
                     SCALE_MODE: tl.constexpr, GROUP_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    offs_m, offs_n, m_mask, n_mask = column_tile(M, N, BLOCK_M, BLOCK_N)
    rows_x = offs_m.to(tl.int64) * stride_xm
    rows_w = offs_n.to(tl.int64) * stride_wn
    i16 = tl.arange(0, 16)
    shifts = 8 * (i16 % 4) + 2 * (i16 // 4)  # natural order of the 16 weights in a word
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kw0 in range(0, KW, BLOCK_KW):
        kw = kw0 + tl.arange(0, BLOCK_KW)
        w = tl.load(w_ptr + rows_w[:, None] + kw[None, :], mask=n_mask[:, None] & (kw < KW)[None, :], other=0)
        c = (w[:, :, None] >> shifts[None, None, :]) & 3
        wf = (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388609.0  # exactly c - 1
        wf = tl.reshape(wf, [BLOCK_N, BLOCK_KW * 16])
        k = kw0 * 16 + tl.arange(0, BLOCK_KW * 16)
        x = tl.load(x_ptr + rows_x[:, None] + k[None, :], mask=m_mask[:, None] & (k < K)[None, :], other=0.0)
        p = x.to(tl.float32)[:, None, :] * wf[None, :, :]  # (BM, BN, BK)
        if SCALE_MODE == 2:
            sc = tl.load(s_ptr + offs_n.to(tl.int64)[:, None] * stride_sn + (kw // GROUP_W)[None, :],
                         mask=n_mask[:, None] & (kw < KW)[None, :], other=0.0)
            pw = tl.sum(tl.reshape(p, [BLOCK_M, BLOCK_N, BLOCK_KW, 16]), axis=3)
            acc += tl.sum(pw * sc[None, :, :], axis=2)
        else:
            acc += tl.sum(p, axis=2)
    _scale_epilogue(acc, acc, s_ptr, b_ptr, y_ptr, stride_ym, offs_m, offs_n, M, N, h_ptr, stride_hm, lb_ptr,
                    stride_lbn, R, SCALE_MODE, HAS_BIAS, False, HAS_LORA)


def scale_mode(scale: torch.Tensor, n: int, k: int) -> tuple[int, int, int]:
    """(mode, words per group, row stride) for a scale: 0 tensor [1], 1 channel [N], 2 group [N, K/G]."""
    if scale.dtype != torch.float32:
        raise ValueError(f"scale must be float32, got {scale.dtype}")
    if scale.numel() == 1:
        return 0, 1, 0
    if scale.dim() == 1 and scale.shape[0] == n:
        return 1, 1, 0
    if scale.dim() == 2 and scale.shape[0] == n and k % scale.shape[1] == 0:
        group = k // scale.shape[1]
        if group % 16:
            raise ValueError(f"group size {group} is not a multiple of 16: no ternary GPU kernel for it")
        return 2, group // 16, scale.stride(0)
    raise ValueError(f"scale shape {tuple(scale.shape)} does not fit a [{n}, {k}] weight")


def lora_operands(x: torch.Tensor, n: int, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
                  dummy: torch.Tensor) -> tuple:
    """Kernel arguments (h, stride_hm, B, stride_bn, R, HAS_LORA) of the LoRA epilogue.

    lora_A: float [R, K], lora_B: float [N, R] (16-bit or float32, scaling folded into B; int8 factors
    stay on BitLinear's eager path). h = x @ A^T is one small float32 matmul before the kernel, so the
    kernel only adds R rank-1 updates to its float32 accumulator."""
    if lora_A is None and lora_B is None:
        return dummy, 0, dummy, 0, 0, False
    if lora_A is None or lora_B is None:
        raise ValueError("lora_A and lora_B must be given together")
    r = lora_A.shape[0]
    if (lora_A.dim() != 2 or lora_A.shape[1] != x.shape[1] or lora_B.dim() != 2
            or tuple(lora_B.shape) != (n, r)):
        raise ValueError(f"LoRA factors A {tuple(lora_A.shape)} / B {tuple(lora_B.shape)} do not fit "
                         f"x {tuple(x.shape)} and {n} outputs (expected A [r, K], B [N, r])")
    if not (lora_A.is_floating_point() and lora_B.is_floating_point()):
        raise ValueError(f"fused LoRA takes float factors, got {lora_A.dtype} / {lora_B.dtype}")
    h = torch.nn.functional.linear(x.float(), lora_A.float())  # (M, R) float32
    b = lora_B if lora_B.stride(-1) == 1 else lora_B.contiguous()
    return h, h.stride(0), b, b.stride(0), r, r > 0


def _sm_count(device) -> int:
    if INTERPRET or device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def gemv_config(m: int, n: int, kw: int, n_sm: int, a16: bool = False) -> dict:
    """Block sizes from a sweep on an H200 (2026-11-28): at M = 1, 8-16 rows x 256 words per program
    (all of K in one or two steps, so every load is issued up front); more rows per program as M grows
    only while there are >= 4 programs per SM; the 3-D (M, N, words) tile stays <= 8192 elements."""
    bm = max(1, triton.next_power_of_2(m))
    bn = 8 if bm == 1 else 4
    while bn < 16 and bm == 1 and triton.cdiv(n, bn * 2) >= 4 * n_sm:
        bn *= 2
    budget = 8192 if not a16 else 8192 // 16
    bkw = max(8, min(triton.next_power_of_2(kw), 256, budget // (bm * bn)))
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KW": bkw, "num_warps": 4}


def _check(x, words, scale, in_features):
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"expected a 2-D row-major activation, got shape {tuple(x.shape)}")
    if x.shape[1] != in_features:
        raise ValueError(f"activation has {x.shape[1]} features, weight has {in_features}")
    if words.dtype != torch.int32 or words.dim() != 2 or words.shape[1] * 16 < in_features:
        raise ValueError(f"weight must be i2w int32 [N, >= K/16], got {words.dtype} {tuple(words.shape)}")
    if x.shape[0] > 16:
        raise ValueError(f"ternary GEMV takes M <= 16 rows, got {x.shape[0]}")
    return scale_mode(scale, words.shape[0], in_features)


def ternary_gemv_a8(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, in_features: int,
                    bias: torch.Tensor | None = None, fused: bool | None = None, config: dict | None = None,
                    lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None):
    """W1.58A8 decode GEMV (+ LoRA side path).

    x: float16/bfloat16/float32 [M, K], M <= 16, row-major. words: int32 [N, KW] (i2w, layout.py).
    scale: float32 [1] | [N] | [N, K/G] (multiplies; G % 16 == 0). bias: [N] or None.
    fused: quantize activations inside the GEMV (default: when M * K <= 16384).
    lora_A [R, K], lora_B [N, R]: float factors; adds (x @ A^T) @ B^T (unquantized x, float32) before the bias.
    Returns y [M, N] in x's dtype, equal to reference.ternary_linear_reference(..., act_bits=8) (+ LoRA).
    """
    mode, group_w, stride_sn = _check(x, words, scale, in_features)
    m, n, kw = x.shape[0], words.shape[0], words.shape[1]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if fused is None:
        fused = m * in_features <= 16384
    cfg = dict(config or gemv_config(m, n, kw, _sm_count(x.device)))
    if fused:
        cfg["BLOCK_KW"] = min(cfg["BLOCK_KW"], max(8, 4096 // (16 * cfg["BLOCK_M"])))
        xin, a, stride_xm = x, y, x.stride(0)  # `a` is unused when fused
    else:
        q, a = quantize_activations_int8(x, kw)
        xin, stride_xm = q.view(torch.int32), q.shape[1] // 4
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    h, stride_hm, lb, stride_lbn, r, has_lora = lora_operands(x, n, lora_A, lora_B, scale)
    _gemv_a8_kernel[grid](xin, stride_xm, a, words, words.stride(0), scale, stride_sn,
                          bias if bias is not None else scale, y, y.stride(0), h, stride_hm, lb, stride_lbn, r,
                          m, n, in_features, kw,
                          SCALE_MODE=mode, GROUP_W=group_w, HAS_BIAS=bias is not None, HAS_LORA=has_lora,
                          FUSED=fused,
                          USE_ASM=not INTERPRET, enable_fp_fusion=False, **cfg)
    return y


def ternary_gemv_a16(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, in_features: int,
                     bias: torch.Tensor | None = None, config: dict | None = None,
                     lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None):
    """W1.58A16 decode GEMV: y = scale * (x @ W_q^T) (+ (x @ A^T) @ B^T) (+ bias), x used as given.

    x: float16/bfloat16/float32 [M, K], M <= 16. words: int32 [N, KW] (i2w). scale: float32
    [1] | [N] | [N, K/G] (G % 16 == 0). lora_A [R, K] / lora_B [N, R]: optional float factors.
    Returns y [M, N] in x's dtype (float32 accumulation).
    """
    mode, group_w, stride_sn = _check(x, words, scale, in_features)
    m, n, kw = x.shape[0], words.shape[0], words.shape[1]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    cfg = dict(config or gemv_config(m, n, kw, _sm_count(x.device), a16=True))
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    h, stride_hm, lb, stride_lbn, r, has_lora = lora_operands(x, n, lora_A, lora_B, scale)
    _gemv_a16_kernel[grid](x, x.stride(0), words, words.stride(0), scale, stride_sn,
                           bias if bias is not None else scale, y, y.stride(0), h, stride_hm, lb, stride_lbn, r,
                           m, n, in_features, kw,
                           SCALE_MODE=mode, GROUP_W=group_w, HAS_BIAS=bias is not None, HAS_LORA=has_lora, **cfg)
    return y
