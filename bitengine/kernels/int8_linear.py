"""Int8-weight linear layer on the GPU (the int8 head, int8_head.Int8Linear): y = (x @ W_q^T) * scale[n] (+ bias).

W_q: int8 [N, K_pad] per-row weights (int8_head.int8_rows: W ~= scale[n] * W_q[n, :], scale multiplies,
|W_q| <= 127, columns past K zero), scale float32 [N], bias float32 [N] or None; x float16/bfloat16/float32
[M, K] used as given (no activation quantization). At M = 1 the op runs the C++ GEMV (csrc/cuda/int8_gemv.cu)
where the extension is built and it applies (cuda_gemv_ext); otherwise two Triton kernels, chosen by M only:
  `int8_gemv` (M <= GEMV_MAX_M, decode): a bandwidth kernel. Each program streams BLOCK_N weight rows
      in BLOCK_K-byte runs (wide, coalesced int8 loads), converts them to float32 in registers and does
      one FMA per weight against the float32 activations; at M = 1 the products are kept per (row, k
      lane) and reduced once after the loop. The weight is read once: 1 byte per weight, half the fp16 head.
  `int8_gemm` (larger M, e.g. prefill logits): tl.dot on the tensor cores with the int8 tile converted
      to x's dtype (integers |q| <= 127 are exact in fp16 and bf16; float32 x uses IEEE float32 dots),
      float32 accumulation; programs grouped by GROUP_M row tiles so a weight tile is reused from L2.
Both apply scale (and bias) once per output in float32 and cast to x's dtype, so they equal the plain
PyTorch twin `int8_linear_reference` up to float32 summation order. The fp16 weight is never materialized.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .gemv import INTERPRET
from .tiling import column_tile, grouped_tile

GEMV_MAX_M = 4  # not yet swept on a GPU: beyond a few rows the tensor-core GEMM should win
# At M = 1 the C++ GEMV (csrc/cuda/int8_gemv.cu, bitengine._C_cuda.int8_gemv) where it is built and applies: this
# Triton GEMV reads a head at about half the read probe's speed (bench/results/bench_head_sweep_NVIDIA_H200_2026-12-02),
# the C++ one at 78-90% (bench_head_planes_NVIDIA_H200_2026-12-02: 43 / 102 / 134 us at the 7B / BitNet-2B / 8B heads).
# BITENGINE_CUDA_INT8_HEAD=0 keeps the Triton GEMV (for comparison).
CUDA_GEMV = os.environ.get("BITENGINE_CUDA_INT8_HEAD", "1") != "0"
CUDA_MAX_K = 12288  # int8_gemv.cu keeps x as float in 48 KB of shared memory


def int8_linear_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                          in_features: int) -> torch.Tensor:
    """The plain PyTorch twin (dequantizes the whole weight: the test oracle, not a fast path)."""
    y = torch.nn.functional.linear(x.float(), weight[:, :in_features].float()) * scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@triton.jit
def _epilogue(acc, s_ptr, b_ptr, y_ptr, stride_ym, offs_m, offs_n, M, N, HAS_BIAS: tl.constexpr):
    """y = acc * scale[n] (+ bias[n]); acc float32 [BM, BN]."""
    n_mask = offs_n < N
    acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _int8_gemv_kernel(x_ptr, stride_xm, w_ptr, stride_wn, s_ptr, b_ptr, y_ptr, stride_ym, M, N, K,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m, offs_n, m_mask, n_mask = column_tile(M, N, BLOCK_M, BLOCK_N)
    rows_x = offs_m.to(tl.int64) * stride_xm
    rows_w = offs_n.to(tl.int64) * stride_wn
    acc3 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        w = tl.load(w_ptr + rows_w[:, None] + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
        w = w.to(tl.float32)  # (BN, BK)
        x = tl.load(x_ptr + rows_x[:, None] + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        x = x.to(tl.float32)  # (BM, BK)
        if BLOCK_M == 1:  # one FMA per weight, reduced after the loop
            acc3 += w * x
        else:
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if BLOCK_M == 1:
        acc += tl.sum(acc3, axis=1)[None, :]
    _epilogue(acc, s_ptr, b_ptr, y_ptr, stride_ym, offs_m, offs_n, M, N, HAS_BIAS)


@triton.jit
def _int8_gemm_kernel(x_ptr, stride_xm, w_ptr, stride_wn, s_ptr, b_ptr, y_ptr, stride_ym, M, N, K,
                      HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    offs_m, offs_n, m_mask, n_mask = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & (k < K)[None, :], other=0.0)
        w = tl.load(w_cols + k[:, None], mask=(k < K)[:, None] & n_mask[None, :], other=0)  # (BK, BN), K-major
        if IEEE:
            acc = tl.dot(x, w.to(tl.float32), acc, input_precision="ieee")
        else:
            # via float32: exact either way (the interpreter gets a direct int8 -> bf16 cast wrong)
            acc = tl.dot(x, w.to(tl.float32).to(x_ptr.dtype.element_ty), acc)
    _epilogue(acc, s_ptr, b_ptr, y_ptr, stride_ym, offs_m, offs_n, M, N, HAS_BIAS)


def int8_gemv_config(m: int, k: int) -> dict:
    """Guesses, not yet swept on a GPU: the 3-D (M, N, K) product tile stays <= 8192 elements,
    512-byte weight runs per row (all of a 2560-wide row in five steps)."""
    bm = max(1, triton.next_power_of_2(m))
    bk = max(32, min(triton.next_power_of_2(k), 512))
    bn = max(4, 8192 // (bm * bk)) if bm > 1 else max(4, 4096 // bk)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4}


def int8_gemm_config(m: int) -> dict:
    """The ternary GEMM's tile shapes (gemm.py) for fp16 operands; not yet swept for this kernel."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    return {"BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4 if bm <= 64 else 8,
            "num_stages": 4}


def _check(x, weight, scale, bias, in_features):
    if x.dim() != 2 or x.stride(-1) != 1 or x.shape[1] != in_features:
        raise ValueError(f"expected a row-major [M, {in_features}] activation, got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"activation must be float16/bfloat16/float32, got {x.dtype}")
    if weight.dtype != torch.int8 or weight.dim() != 2 or weight.shape[1] < in_features or weight.stride(1) != 1:
        raise ValueError(f"weight must be row-major int8 [N, >= {in_features}], got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    n = weight.shape[0]
    if scale.dtype != torch.float32 or tuple(scale.shape) != (n,) or not scale.is_contiguous():
        raise ValueError(f"scale must be contiguous float32 [{n}], got {scale.dtype} {tuple(scale.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous [{n}], got {tuple(bias.shape)}")


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              in_features: int, config: dict | None = None) -> torch.Tensor:
    """Decode GEMV. x: float16/bfloat16/float32 [M, K] row-major (any M; meant for M <= GEMV_MAX_M).
    weight: int8 [N, >= K] row-major; scale: float32 [N] (multiplies); bias: [N] or None.
    Returns y [M, N] in x's dtype."""
    _check(x, weight, scale, bias, in_features)
    m, n = x.shape[0], weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    cfg = dict(config or int8_gemv_config(m, in_features))
    if cfg["BLOCK_M"] < m:
        raise ValueError(f"BLOCK_M {cfg['BLOCK_M']} < M {m}: the GEMV keeps all rows in one program")
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _int8_gemv_kernel[grid](x, x.stride(0), weight, weight.stride(0), scale, bias if bias is not None else scale,
                            y, y.stride(0), m, n, in_features, HAS_BIAS=bias is not None, **cfg)
    return y


def int8_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              in_features: int, config: dict | None = None) -> torch.Tensor:
    """Tensor-core GEMM for many rows; same arguments and result as int8_gemv."""
    _check(x, weight, scale, bias, in_features)
    m, n = x.shape[0], weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    cfg = dict(config or int8_gemm_config(m))
    if INTERPRET:
        cfg.pop("num_stages", None)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _int8_gemm_kernel[grid](x, x.stride(0), weight, weight.stride(0), scale, bias if bias is not None else scale,
                            y, y.stride(0), m, n, in_features, HAS_BIAS=bias is not None,
                            IEEE=x.dtype == torch.float32, **cfg)
    return y


def cuda_gemv_ext(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """bitengine._C_cuda when its int8 GEMV applies to this call (M = 1 on CUDA, the extension built with it,
    a 16-byte aligned int8 weight with Kp % 16 == 0 and Kp <= CUDA_MAX_K, a float32 bias or none), else None."""
    if not (CUDA_GEMV and x.is_cuda and x.dim() == 2 and x.shape[0] == 1):
        return None
    if bias is not None and bias.dtype != torch.float32:
        return None
    from ..backends import cuda as cuda_backend

    ext = cuda_backend._C_cuda
    if ext is None or not hasattr(ext, "int8_gemv"):
        return None
    kp = weight.shape[1] if weight.dim() == 2 else 0
    aligned = weight.stride(-1) == 1 and weight.stride(0) % 16 == 0 and weight.data_ptr() % 16 == 0
    return ext if weight.dtype == torch.int8 and aligned and kp % 16 == 0 and 0 < kp <= CUDA_MAX_K else None


@torch.library.custom_op("bitengine::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                in_features: int) -> torch.Tensor:
    """bitengine::int8_linear(x [..., K], weight int8 [N, K_pad], scale f32 [N], bias [N]?, in_features) -> [..., N]
    in x's dtype; at M = 1 the C++ GEMV where it applies (cuda_gemv_ext), else the Triton GEMV for M <= GEMV_MAX_M
    rows and the tensor-core GEMM beyond (by shape only)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
    ext = cuda_gemv_ext(x2, weight, bias)
    if ext is not None:
        _check(x2, weight, scale, bias, in_features)
        return ext.int8_gemv(x2, weight, scale, in_features, bias).reshape(*lead, weight.shape[0])
    kernel = int8_gemv if x2.shape[0] <= GEMV_MAX_M else int8_gemm
    return kernel(x2, weight, scale, bias, in_features).reshape(*lead, weight.shape[0])


@int8_linear.register_fake
def _(x, weight, scale, bias, in_features):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
