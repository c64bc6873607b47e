"""The int4 head on the GPU (int4_head.Int4Linear): `bitengine::int4_linear`, exactly int4_head's numerics.

At M = 1 (batch-1 decode) the C++ GEMV (csrc/cuda/int4_gemv.cu) where the extension is built: it quantizes x to int8
in each block's shared memory and streams the packed weights with dp4a. Otherwise (more rows: batched decode, or no
extension) x is quantized once (act_quant.quantize_activations_int8, the ternary kernels' front end) and a Triton
GEMM runs the int8 tensor cores: per group of 128 weights, the low nibbles of the group's 64 bytes dot the first 16
activations of each 32 and the high nibbles the next 16 (int4_head's chunk layout), the two int32 dot products are
exact, and the group's scale multiplies their sum in float32. Both equal int4_head.int4_linear_reference (float64)
up to float32 summation order. The weight is never unpacked to memory.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..int4_head import GROUP
from .act_quant import quantize_activations_int8
from .gemv import INTERPRET
from .tiling import grouped_tile

# BITENGINE_CUDA_INT4_HEAD=0 sends M = 1 to the Triton GEMM too (for comparison)
CUDA_GEMV = os.environ.get("BITENGINE_CUDA_INT4_HEAD", "1") != "0"
CUDA_MAX_K = 32768  # int4_gemv.cu keeps x as int8 in shared memory (K_pad bytes)


@triton.jit
def _int4_gemm_kernel(xq_ptr, stride_xm, a_ptr, w_ptr, stride_wn, s_ptr, stride_sn, b_ptr, y_ptr, stride_ym, M, N,
                      GROUPS, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      GROUP_M: tl.constexpr, GROUP_K: tl.constexpr):
    offs_m, offs_n, m_mask, n_mask = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    byte = tl.arange(0, GROUP_K // 2)  # the group's 64 bytes: chunk byte // 16, byte byte % 16 of it
    k_lo = 32 * (byte // 16) + byte % 16  # the activation under each byte's low nibble; its high nibble's is + 16
    x_rows = xq_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + byte[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g in range(0, GROUPS):
        w = tl.load(w_rows + g * (GROUP_K // 2), mask=n_mask[:, None], other=0).to(tl.int8, bitcast=True)  # [BN, 64]
        lo = (w << 4) >> 4  # arithmetic shifts: the low nibble sign-extended
        hi = w >> 4
        xl = tl.load(x_rows + g * GROUP_K + k_lo[None, :], mask=m_mask[:, None], other=0)  # int8 [BM, 64]
        xh = tl.load(x_rows + g * GROUP_K + 16 + k_lo[None, :], mask=m_mask[:, None], other=0)
        d = tl.dot(xl, tl.trans(lo)) + tl.dot(xh, tl.trans(hi))  # int32 [BM, BN], exact
        s = tl.load(s_ptr + offs_n.to(tl.int64) * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
        acc += d.to(tl.float32) * s[None, :]
    a = tl.load(a_ptr + offs_m, mask=m_mask, other=1.0)
    y = acc / a[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def _check(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
           in_features: int) -> None:
    if x.dim() != 2 or x.stride(-1) != 1 or x.shape[1] != in_features:
        raise ValueError(f"expected a row-major [M, {in_features}] activation, got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"activation must be float16/bfloat16/float32, got {x.dtype}")
    kp = -(-in_features // GROUP) * GROUP
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != kp // 2 or not packed.is_contiguous():
        raise ValueError(f"packed weight must be contiguous uint8 [N, {kp // 2}], got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    n = packed.shape[0]
    if scale.dtype != torch.float16 or tuple(scale.shape) != (n, kp // GROUP) or not scale.is_contiguous():
        raise ValueError(f"scale must be contiguous float16 [{n}, {kp // GROUP}], got {scale.dtype} "
                         f"{tuple(scale.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous float32 [{n}], got {bias.dtype} {tuple(bias.shape)}")


def int4_gemm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              in_features: int) -> torch.Tensor:
    """x [M, K] float -> y [M, N] in x's dtype, through the int8 tensor cores (any M)."""
    _check(x, packed, scale, bias, in_features)
    m, n = x.shape[0], packed.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    xq, a = quantize_activations_int8(x, packed.shape[1] // 8)  # int8 [M, K_pad], zero past K
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    cfg = {"BLOCK_M": block_m, "BLOCK_N": 64, "GROUP_M": 8, "num_warps": 4}
    if not INTERPRET:
        cfg["num_stages"] = 3
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _int4_gemm_kernel[grid](xq, xq.stride(0), a, packed, packed.stride(0), scale, scale.stride(0),
                            bias if bias is not None else a, y, y.stride(0), m, n, packed.shape[1] // (GROUP // 2),
                            HAS_BIAS=bias is not None, GROUP_K=GROUP, **cfg)
    return y


def cuda_gemv_ext(x: torch.Tensor, packed: torch.Tensor):
    """bitengine._C_cuda when its int4 GEMV applies (M = 1 on CUDA, built with it, a 16-byte aligned weight with
    K_pad <= CUDA_MAX_K), else None."""
    if not (CUDA_GEMV and x.is_cuda and x.dim() == 2 and x.shape[0] == 1):
        return None
    from ..backends import cuda as cuda_backend

    ext = cuda_backend._C_cuda
    if ext is None or not hasattr(ext, "int4_gemv"):
        return None
    aligned = packed.data_ptr() % 16 == 0 and packed.stride(0) % 16 == 0
    return ext if aligned and 0 < packed.shape[1] * 2 <= CUDA_MAX_K else None


@torch.library.custom_op("bitengine::int4_linear", mutates_args=())
def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                in_features: int) -> torch.Tensor:
    """bitengine::int4_linear(x [..., K], packed uint8 [N, K_pad/2], scale f16 [N, K_pad/128], bias f32 [N]?,
    in_features) -> [..., N] in x's dtype: the C++ GEMV at M = 1 where it applies, else the Triton GEMM."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    ext = cuda_gemv_ext(x2, packed)
    if ext is not None:
        _check(x2, packed, scale, bias, in_features)  # validated here: an error inside the extension aborts
        return ext.int4_gemv(x2, packed, scale, in_features, bias).reshape(*lead, packed.shape[0])
    return int4_gemm(x2, packed, scale, bias, in_features).reshape(*lead, packed.shape[0])


@int4_linear.register_fake
def _(x, packed, scale, bias, in_features):
    return x.new_empty(*x.shape[:-1], packed.shape[0])
