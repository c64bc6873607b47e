"""torch.library custom ops over the Triton kernels, so torch.compile and CUDA graphs see through them.

bitengine::ternary_linear(x, words, scale, in_features, act_bits, bias=None, lora_A=None, lora_B=None) -> y
    x: float16/bfloat16/float32 [..., K]; words: int32 [N, KW] (i2w, layout.py); scale: float32
    [1] | [N] | [N, K/G] (multiplies); act_bits 8 or 16; bias: [N] or None. y: [..., N], x's dtype.
    lora_A [R, K] / lora_B [N, R] (float, scaling folded into B) or None: the LoRA side path
    y += (x @ A^T) @ B^T, with h = x @ A^T one float32 matmul before the kernel and h @ B^T added to
    the kernel's float32 accumulator in its epilogue (after the ternary scale, before bias and cast).
    Dispatch by M = prod(x.shape[:-1]) and layer settings only:
      A8: M <= 4, or M <= 16 with N * K < GEMV_MAX_NK; A16: M == 1
                                            decode GEMV (gemv.py; dp4a-bound beyond that)
      M >= DECODED_MIN_M, tensor/channel scale, A8 or fp16/bf16 A16
                                            decoded-scratch GEMM (gemm_decoded.py)
      otherwise                             in-register-decode GEMM (gemm.py)
"""

from __future__ import annotations

import torch

from . import decode_attention as _decode
from .gemm import ternary_gemm
from .gemm_decoded import ternary_gemm_decoded
from .gemv import ternary_gemv_a8, ternary_gemv_a16

GEMV_MAX_NK = 4_000_000
DECODED_MIN_M = 128


def use_gemv(m: int, n: int, k: int, act_bits: int = 8) -> bool:
    """From bench/results/gpu_kernels_NVIDIA_H200_2026-11-28 (M = 16): the A8 GEMV beats the tensor-core
    GEMM only on small layers (640 x 2560: 14.6 vs 21.9 us; 2560 x 2560: 29.7 vs 22.4 us); M <= 4 stays
    on the GEMV (not measured). The A16 GEMV is for M = 1 only (M = 16: 4-7x slower than the GEMM)."""
    if act_bits == 16:
        return m == 1
    return m <= 4 or (m <= 16 and n * k < GEMV_MAX_NK)


@torch.library.custom_op("bitengine::ternary_linear", mutates_args=())
def ternary_linear(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, in_features: int, act_bits: int,
                   bias: torch.Tensor | None = None, lora_A: torch.Tensor | None = None,
                   lora_B: torch.Tensor | None = None) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, K)
    lora = {"lora_A": lora_A, "lora_B": lora_B}
    if use_gemv(x2.shape[0], words.shape[0], in_features, act_bits):
        if act_bits == 8:
            y = ternary_gemv_a8(x2, words, scale, in_features, bias, **lora)
        elif act_bits == 16:
            y = ternary_gemv_a16(x2, words, scale, in_features, bias, **lora)
        else:
            raise ValueError(f"act_bits must be 8 or 16, got {act_bits}")
    elif x2.shape[0] >= DECODED_MIN_M and scale.dim() <= 1 and (
            act_bits == 8 or x2.dtype in (torch.float16, torch.bfloat16)):
        y = ternary_gemm_decoded(x2, words, scale, in_features, act_bits, bias, **lora)
    else:
        y = ternary_gemm(x2, words, scale, in_features, act_bits, bias, **lora)
    return y.reshape(*lead, words.shape[0])


@ternary_linear.register_fake
def _(x, words, scale, in_features, act_bits, bias=None, lora_A=None, lora_B=None):
    return x.new_empty(*x.shape[:-1], words.shape[0])


@torch.library.custom_op("bitengine::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     input_pos: torch.Tensor) -> torch.Tensor:
    """One-token attention over the cache (decode_attention.py): q (B, H, 1, D), k/v (B, Hkv, S, D), bool mask
    broadcastable to (B, 1, 1, S), input_pos (1,) or (B, 1) -> (B, H, 1, D). The Triton kernel on CUDA where it
    pays for decode_attention.VARIANT (decode_attention.kernel_pays; unless decode_attention.ENABLED is False; both
    read at each call), else scaled_dot_product_attention on the same inputs."""
    if _decode.ENABLED and q.is_cuda:
        n_sm = _decode.sm_count(q.device)
        if _decode.kernel_pays(q.shape[0], q.shape[1], k.shape[1], k.shape[2], n_sm):
            return _decode.decode_attention(q, k, v, mask, input_pos, n_sm)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1]).contiguous()


@decode_attention.register_fake
def _(q, k, v, mask, input_pos):
    return q.new_empty(q.shape)
