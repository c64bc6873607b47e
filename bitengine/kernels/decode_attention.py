"""One-token (decode) attention over a KV cache, split along the keys (flash-decoding), in Triton.

Why: at T = 1 the model's scaled_dot_product_attention goes to a cuDNN flash kernel tiled for long
queries (64 x 64 blocks, one block per head) plus an inductor kernel turning the boolean mask into an
additive one: ~8 us per layer on an H200 (bench/results/gpu_decode_profile.md), and it reads every
cache slot, written or not. Here each program takes one query head and one slice of the slots, reads
only slots up to the token's own position (the causal bound: a decode token sees no later slot), and
keeps an online softmax; a second small kernel merges the slices. One slice = one kernel.
(Folding the merge into the attention kernel, the last program of each kv head merging its group's slices after an
atomic count, was measured slower end to end: 7B batch 1 745 vs 784 tok/s, BitNet-2B 930 vs 945,
bench/results/gpu_e2e_fused_merge_ab_659d72c_NVIDIA_H200_2026-12-03; branch exp/attn-fused-merge.)
The default variant ("grouped", see VARIANT) runs one program per kv head and slice instead: the query group
padded to 16 rows, q.K^T and p.V with tl.dot, so K/V are read once per kv head and the loads are pipelined.

decode_attention(q, k, v, mask, input_pos) -> y
    q: (B, H, 1, D); k, v: (B, Hkv, S, D) (any strides along B, Hkv, S; D contiguous), H % Hkv == 0
    (grouped-query attention: head h reads kv head h // (H / Hkv)); mask: bool, broadcastable to
    (B, 1, 1, S): True = attend; input_pos: int64 (1,) or (B, 1), the slot of each row's token (slots
    after it are never read); softmax scale 1 / sqrt(D), as scaled_dot_product_attention's default.
    y: (B, H, 1, D) in q's dtype. float32 accumulation whatever the cache dtype.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from .pdl import pdl_launch, wait_for_previous_grid

BLOCK_S = 64
# The CUDA decode step uses this kernel where it pays (kernel_pays; ops.decode_attention); BITENGINE_DECODE_ATTENTION=0,
# or setting ENABLED to False, sends it back to scaled_dot_product_attention (read at each call, so at each CUDA-graph
# capture).
ENABLED = os.environ.get("BITENGINE_DECODE_ATTENTION", "1") != "0"
# Which kernel: "grouped" (the default: tl.dot over a kv head's query group) or "split" (one program per query head;
# BITENGINE_DECODE_ATTENTION_KERNEL=split, bench_e2e's "+split"). bench/results/gpu_decode_attention_grouped_NVIDIA_H200_
# 2026-12-02 (H200, fp16, head_dim 128, commit b962aa4): the grouped kernel (grouped_b64) is faster than the split one
# in all 18 cases (5.0 vs 5.9 us for Llama-2-7B at 192 slots, batch 1; 8.5 vs 19.6 us for BitNet-2B-4T at 4096 slots),
# and end to end (gpu_e2e_grouped_combo_ab_NVIDIA_H200_2026-12-02, batch 1) 7B 634 -> 682 tok/s, BitNet-2B-4T 741 -> 782.
VARIANT = os.environ.get("BITENGINE_DECODE_ATTENTION_KERNEL", "grouped")
# Programmatic dependent launch of the attention kernels (pdl.py; the C++ GEMV after the attention issues its first
# weight loads, then waits): on unless BITENGINE_PDL=0 or BITENGINE_ATTENTION_PDL=0 (bench_e2e's "+noattnpdl"); read
# at each launch, so at each CUDA-graph capture.
PDL = os.environ.get("BITENGINE_ATTENTION_PDL", "1") != "0"
# The grouped kernel's limit (kernel_pays): at most this many key blocks per program. Measured: faster than
# scaled_dot_product_attention with up to 13 blocks per program (Llama-3-8B shape, batch 8, 4096 slots: 40 vs 44 us),
# slower with 32 (Llama-2-7B shape, batch 8, 4096 slots all visible: 157 vs 130 us, where cuDNN reads the cache at
# ~4 TB/s).
GROUPED_MAX_BLOCKS = 16
# finite "minus infinity" for the running max, so a slice with no visible slot gives weight 0, not NaN
NEG = tl.constexpr(-1.0e30)


@triton.jit
def _slice_bounds(pos_ptr, k_ptr, v_ptr, b, kvh, sl, stride_pb, stride_kb, stride_kh, stride_vb, stride_vh, S, SLICE):
    """Slots [start, stop) of slice sl that row b's token may see (never one after its own position), and the
    K / V base pointers of (b, kv head)."""
    end = tl.minimum(tl.load(pos_ptr + b * stride_pb) + 1, S)
    start = sl * SLICE
    stop = tl.minimum(start + SLICE, end)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
    return start, stop, k_base, v_base


@triton.jit
def _load_block(m_ptr, k_base, v_base, b, s0, stop, offs_d, d_mask, stride_mb, stride_ms, stride_ks, stride_vs,
                BLOCK_S: tl.constexpr):
    """Slots s0 .. s0 + BLOCK_S (none at or past stop): their mask bits, K and V rows (K and V requested together,
    so V does not wait for the scores)."""
    offs_s = s0 + tl.arange(0, BLOCK_S)
    s_mask = offs_s < stop
    visible = tl.load(m_ptr + b.to(tl.int64) * stride_mb + offs_s * stride_ms, mask=s_mask, other=0) != 0
    kv_mask = s_mask[:, None] & d_mask[None, :]
    k = tl.load(k_base + offs_s[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_s[:, None].to(tl.int64) * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    return visible, k, v


@triton.jit
def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, m_ptr, pos_ptr, o_ptr, part_ptr,
                        stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                        stride_mb, stride_ms, stride_pb, stride_ob, stride_oh,
                        H, S, GROUP, SLICE, N_SLICES, sm_scale,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, SINGLE: tl.constexpr,
                        PDL: tl.constexpr = False):
    wait_for_previous_grid(PDL)
    bh = tl.program_id(0)
    sl = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    q = q * sm_scale
    start, stop, k_base, v_base = _slice_bounds(pos_ptr, k_ptr, v_ptr, b, kvh, sl, stride_pb, stride_kb, stride_kh,
                                                stride_vb, stride_vh, S, SLICE)
    m_i = tl.full([1], NEG, tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(start, stop, BLOCK_S):
        visible, k, v = _load_block(m_ptr, k_base, v_base, b, s0, stop, offs_d, d_mask, stride_mb, stride_ms,
                                    stride_ks, stride_vs, BLOCK_S)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)  # (BLOCK_S,)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new)  # 0 where not visible
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    if SINGLE:
        out = acc / l_i
        tl.store(o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
                 mask=d_mask)
    else:  # partial (m, l, acc[D]) of this slice, merged by _merge_kernel
        base = part_ptr + (bh.to(tl.int64) * N_SLICES + sl) * (BLOCK_D + 2)
        tl.store(base + tl.arange(0, 1), m_i)
        tl.store(base + 1 + tl.arange(0, 1), l_i)
        tl.store(base + 2 + offs_d, acc)


@triton.jit
def _merge_kernel(part_ptr, o_ptr, stride_ob, stride_oh, H, N_SLICES, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_previous_grid(PDL)
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_n = tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_SLICES
    offs_d = tl.arange(0, BLOCK_D)
    rows = part_ptr + (bh.to(tl.int64) * N_SLICES + offs_n) * (BLOCK_D + 2)
    m = tl.load(rows, mask=n_mask, other=NEG)
    l_part = tl.load(rows + 1, mask=n_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp(m - m_max)  # 0 for slices that saw no visible slot (m = NEG), 1 for the largest
    l_sum = tl.sum(w * l_part, axis=0)
    acc = tl.load(rows[:, None] + 2 + offs_d[None, :], mask=n_mask[:, None] & (offs_d < D)[None, :], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / l_sum
    tl.store(o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
             mask=offs_d < D)


@triton.jit
def _decode_attn_grouped_kernel(q_ptr, k_ptr, v_ptr, m_ptr, pos_ptr, o_ptr, part_ptr,
                                stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                                stride_mb, stride_ms, stride_pb, stride_ob, stride_oh,
                                H, HKV, S, GROUP, SLICE, N_SLICES, sm_scale,
                                D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
                                SINGLE: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = False):
    """The `grouped` variant: one program per (kv head, slice) takes all GROUP query heads of that kv head as the rows
    of a BLOCK_H x D tile (padded to 16 for tl.dot), so q.K^T and p.V run as matrix products on the tensor cores
    (fewer instructions per slot than the split kernel's reductions, and loads Triton can pipeline) and each K/V
    block is read once per kv head instead of once per query head. Same inputs, outputs and partials layout."""
    wait_for_previous_grid(PDL)
    bk = tl.program_id(0)
    sl = tl.program_id(1)
    b = bk // HKV
    kvh = bk % HKV
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)
    start, stop, k_base, v_base = _slice_bounds(pos_ptr, k_ptr, v_ptr, b, kvh, sl, stride_pb, stride_kb, stride_kh,
                                                stride_vb, stride_vh, S, SLICE)
    m_i = tl.full([BLOCK_H], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for s0 in range(start, stop, BLOCK_S):
        visible, k, v = _load_block(m_ptr, k_base, v_base, b, s0, stop, offs_d, d_mask, stride_mb, stride_ms,
                                    stride_ks, stride_vs, BLOCK_S)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(visible[None, :], scores * sm_scale, float("-inf"))  # (BLOCK_H, BLOCK_S)
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])  # 0 where not visible
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    if SINGLE:
        out = acc / l_i[:, None]
        tl.store(o_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])
    else:  # per query head, the split kernel's partials layout, merged by _merge_kernel
        base = part_ptr + ((b.to(tl.int64) * H + heads) * N_SLICES + sl) * (BLOCK_D + 2)  # (BLOCK_H,)
        tl.store(base, m_i, mask=h_mask)
        tl.store(base + 1, l_i, mask=h_mask)
        tl.store(base[:, None] + 2 + offs_d[None, :], acc, mask=h_mask[:, None] & d_mask[None, :])


def slicing(batch_heads: int, s: int, n_sm: int, block_s: int = BLOCK_S) -> tuple[int, int]:
    """(slots per slice, slices): enough programs for ~2 per SM, slices a multiple of block_s, at most 64."""
    blocks = triton.cdiv(s, block_s)
    want = max(1, min(blocks, 64, triton.cdiv(2 * n_sm, max(batch_heads, 1))))
    per = triton.cdiv(blocks, want)
    return per * block_s, triton.cdiv(blocks, per)


def kernel_pays(batch: int, heads: int, kv_heads: int, s: int, n_sm: int, variant: str | None = None) -> bool:
    """Whether the model's decode step should use the kernel `variant` (default VARIANT) for a cache of s slots, or
    scaled_dot_product_attention. Grouped: up to GROUPED_MAX_BLOCKS key blocks per program (see there; measured in
    bench/results/gpu_decode_attention_grouped_NVIDIA_H200_2026-12-02). Split: when the split leaves every program one
    block of slots: bench/results/gpu_decode_attention_NVIDIA_H200_2026-12-02 (H200, fp16, head_dim 128), at 192
    slots and batch 1, 5.7-5.9 us vs 9.3-10.1 us for scaled_dot_product_attention; with 8 and more blocks per program
    (4096 slots, all visible) 1.4-4.8x slower than it (the loop over blocks is latency-bound); at batch 8 and 192
    slots (two blocks per program) from 7% faster to 18% slower. Static per shape, so a CUDA graph captures one choice."""
    if (variant or VARIANT) == "grouped":
        return slicing(batch * kv_heads, s, n_sm)[0] <= GROUPED_MAX_BLOCKS * BLOCK_S
    return slicing(batch * heads, s, n_sm)[0] == BLOCK_S


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     input_pos: torch.Tensor, n_sm: int = 132, block_s: int = BLOCK_S,
                     num_warps: int = 4, variant: str | None = None) -> torch.Tensor:
    """See the module docstring; n_sm sizes the split (programs ~ 2 per SM), block_s / num_warps the tiles;
    variant "split" (one program per query head and slice) or "grouped" (per kv head and slice, tl.dot;
    _decode_attn_grouped_kernel), default VARIANT."""
    variant = variant or VARIANT
    if variant not in ("split", "grouped"):
        raise ValueError(f"decode attention variant must be 'split' or 'grouped', got {variant!r}")
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"decode attention takes one query token: q (B, H, 1, D), got {tuple(q.shape)}")
    b, h, _, d = q.shape
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or h % k.shape[1]:
        raise ValueError(f"k/v must be (B, Hkv, S, D) with H % Hkv == 0; q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    s = k.shape[2]
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v must be contiguous along head_dim")
    m = mask.expand(b, 1, 1, s).view(torch.uint8)[:, 0, 0, :]  # (B, S), strides kept (no copy)
    pos = input_pos.reshape(-1)
    if pos.numel() not in (1, b):
        raise ValueError(f"input_pos must hold 1 or B = {b} positions, got {tuple(input_pos.shape)}")
    y = torch.empty(b, h, 1, d, dtype=q.dtype, device=q.device)
    pdl = pdl_launch(q.device, PDL)
    hkv = k.shape[1]
    grouped = variant == "grouped"
    # the grouped kernel's programs are per kv head; tl.dot wants every tile dimension >= 16
    slice_s, n_slices = slicing(b * (hkv if grouped else h), s, n_sm, block_s)
    block_d = triton.next_power_of_2(d) if not grouped else max(16, triton.next_power_of_2(d))
    single = n_slices == 1
    part = y if single else torch.empty(b * h * n_slices * (block_d + 2), dtype=torch.float32, device=q.device)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
               m.stride(0), m.stride(1), 0 if pos.numel() == 1 else pos.stride(0), y.stride(0), y.stride(1))
    if grouped:
        if k.dtype != v.dtype:
            raise ValueError(f"the grouped decode attention needs one K/V dtype, got {k.dtype} and {v.dtype}")
        _decode_attn_grouped_kernel[(b * hkv, n_slices)](
            q, k, v, m, pos, y, part, *strides, h, hkv, s, h // hkv, slice_s, n_slices, 1.0 / math.sqrt(d),
            D=d, BLOCK_D=block_d, BLOCK_S=block_s, BLOCK_H=max(16, triton.next_power_of_2(h // hkv)),
            SINGLE=single, IEEE=k.dtype == torch.float32, num_warps=num_warps, **pdl)
    else:
        _decode_attn_kernel[(b * h, n_slices)](
            q, k, v, m, pos, y, part, *strides, h, s, h // hkv, slice_s, n_slices, 1.0 / math.sqrt(d),
            D=d, BLOCK_D=block_d, BLOCK_S=block_s, SINGLE=single, num_warps=num_warps, **pdl)
    if not single:
        _merge_kernel[(b * h,)](part, y, y.stride(0), y.stride(1), h, n_slices, D=d, BLOCK_D=block_d,
                                BLOCK_N=max(2, triton.next_power_of_2(n_slices)), num_warps=4, **pdl)
    return y


def sm_count(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
