"""How programs map to output tiles. grouped_tile, the tensor-core GEMMs (gemm.py, gemm_decoded.py, int8_linear.py):
groups of GROUP_M row tiles per column of tiles, so the weight tile one program reads is reused from L2 by the
next GROUP_M - 1 programs."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output rows and columns, and which of them exist: (offs_m, offs_n, m_mask, n_mask)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def column_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The GEMVs' order (gemv.py, int8_linear.py): every program takes all M (<= BLOCK_M) rows and one BLOCK_N
    slice of the outputs: (offs_m, offs_n, m_mask, n_mask)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N
