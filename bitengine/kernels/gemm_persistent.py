"""The prefill GEMM of gemm_decoded.py as a persistent kernel fed by TMA (Hopper and later).

Same operands and result as gemm_decoded._gemm_dense_kernel (x_q int8 or x 16-bit [M, K'], the decoded weight
[N, KP], the same epilogue), but one program per SM walks the output tiles in the grouped order, and the operand
tiles come through tensor descriptors (the copy engine writes shared memory; no address arithmetic or masks in
the K loop, zeros past the tensors' edges). Why: at M = 2048 on the K = 2560 shapes the one-tile-per-program
kernel trails cuBLAS FP16 (0.58-0.96x in gpu_kernels_next4_08c3a2a_...); a grid of 132 programs also removes the
tail wave of a few hundred tiles, and `flatten` lets one tile's epilogue overlap the next tile's loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .gemv import _scale_epilogue, _sm_count
from .tiling import grouped_tile_index


@triton.jit
def _gemm_persistent_kernel(x_desc, w_desc, a_ptr, s_ptr, b_ptr, y_ptr, stride_ym, h_ptr, stride_hm, lb_ptr,
                            stride_lbn, R, M, N, KP,
                            A8: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                            HAS_LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(KP, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
        pid_m, pid_n = grouped_tile_index(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if A8:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for ki in range(k_tiles):
            x = x_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])  # (BN, BK): rows of the decoded weight
            if A8:
                acc = tl.dot(x, w.T, acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(x, w.T, acc)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if A8:
            a = tl.load(a_ptr + offs_m, mask=offs_m < M, other=1.0)
        else:
            a = offs_m
        _scale_epilogue(acc.to(tl.float32), a, s_ptr, b_ptr, y_ptr, stride_ym, offs_m, offs_n, M, N,
                        h_ptr, stride_hm, lb_ptr, stride_lbn, R, SCALE_MODE, HAS_BIAS, A8, HAS_LORA)


def takes(xin: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the tensor descriptors can address these operands: 16-byte aligned bases and row strides, unit
    column stride (a 16-bit x whose K is not a multiple of 8, or an offset view, goes to the pointer kernel)."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
               for t in (xin, w))


def gemm_persistent(xin, a, w, scale, bias, y, lora: tuple, config: tuple) -> torch.Tensor:
    """y[M, N] = epilogue(xin @ w^T): xin int8 (A8, with a the per-row multipliers) or 16-bit, w the decoded weight
    [N, KP] in xin's dtype. lora: lora_operands()'s (h, stride_hm, B, stride_bn, R, HAS_LORA).
    config: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, programs per SM); two programs per SM where two fit
    in shared memory overlap one's epilogue with the other's loads (what made 3 stages win in the dense kernel)."""
    bm, bn, bk, warps, stages, per_sm = config
    m, n = xin.shape[0], w.shape[0]
    h, stride_hm, lb, stride_lbn, r, has_lora = lora
    programs = min(per_sm * _sm_count(xin.device), triton.cdiv(m, bm) * triton.cdiv(n, bn))
    x_desc = TensorDescriptor(xin, list(xin.shape), list(xin.stride()), [bm, bk])
    w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [bn, bk])
    _gemm_persistent_kernel[(programs,)](
        x_desc, w_desc, a, scale, bias if bias is not None else scale, y, y.stride(0), h, stride_hm, lb, stride_lbn,
        r, m, n, w.shape[1], A8=xin.dtype == torch.int8, SCALE_MODE=0 if scale.numel() == 1 else 1,
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
        num_warps=warps, num_stages=stages)
    return y
