"""The arithmetic identities the CUDA kernels' quantization prologue relies on (csrc/cuda/gemv_common.cuh:
quantize_value, norm_word), checked on the CPU in IEEE float32, which is what the GPU's FADD / FMUL compute.

The kernels compare bit for bit with the reference on the GPU (tests/test_gpu_kernels.py); these tests pin down why
the cheaper instructions give those bits, over every float32 where the rounding can go wrong."""

from __future__ import annotations

import numpy as np
import torch

MAGIC = np.float32(12582912.0)  # 1.5 * 2**23
MAGIC_BITS = 0x4B400000


def quantize_value(c: np.ndarray) -> np.ndarray:
    """quantize_value's steps on c = v * a: clamp (fmaxf / fminf return the other operand for a NaN), add 1.5 * 2^23,
    read the integer off the low bits."""
    clamped = np.fmin(np.fmax(c, np.float32(-128.0)), np.float32(127.0)).astype(np.float32)
    return (clamped + MAGIC).astype(np.float32).view(np.int32) - MAGIC_BITS


def rint_clamp(c: np.ndarray) -> np.ndarray:
    """The previous code: clamp(rint(c), -128, 127) (rint: half to even; a NaN falls to -128 through fmaxf)."""
    return np.fmin(np.fmax(np.rint(c), np.float32(-128.0)), np.float32(127.0)).astype(np.int32)


def test_magic_rounding_equals_rint_every_float_near_the_range():
    # every float32 of magnitude in [2^-2, 2^8) (both signs): all halves, near-halves and both clamp edges; below
    # 2^-2 everything rounds to 0 and above 2^8 everything clamps, sampled below
    mantissas = np.arange(1 << 23, dtype=np.uint32)
    for exponent in range(-2, 8):
        for sign in (0, 1):
            bits = (np.uint32(sign) << 31) | (np.uint32(127 + exponent) << 23) | mantissas
            c = bits.view(np.float32)
            np.testing.assert_array_equal(quantize_value(c), rint_clamp(c), err_msg=f"exponent {exponent} sign {sign}")


def test_magic_rounding_small_large_and_special_values():
    rng = np.random.default_rng(0)
    tiny = (rng.standard_normal(1 << 20) * rng.choice([1e-30, 1e-8, 1e-3, 0.2], 1 << 20)).astype(np.float32)
    large = (rng.standard_normal(1 << 16) * 1e6).astype(np.float32)
    special = np.array([0.0, -0.0, 0.5, -0.5, 1.5, -1.5, 126.5, 127.5, -127.5, -128.5, 127.49999, -128.49998,
                        np.inf, -np.inf, np.nan, np.finfo(np.float32).max, -np.finfo(np.float32).max,
                        np.finfo(np.float32).tiny, 1e-45], dtype=np.float32)
    for c in (tiny, large, special):
        np.testing.assert_array_equal(quantize_value(c), rint_clamp(c))
    assert quantize_value(np.array([np.nan], dtype=np.float32))[0] == -128


def _exact_in_float32(dtype: torch.dtype, n: int) -> None:
    g = torch.Generator().manual_seed(1)
    # magnitudes from tiny to huge, so the exponents spread; the 16-bit rounding of the draws is the point
    a = (torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 6)).to(dtype)
    b = (torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 6)).to(dtype)
    p32 = a.float() * b.float()
    p64 = a.double() * b.double()
    normal = (p64.abs() >= torch.finfo(torch.float32).tiny) & torch.isfinite(p64.float())
    assert normal.sum() > n // 2
    # the float32 product of two 16-bit values is exact, so rounding it to 16 bits is the single rounding of the exact
    # product: the 16-bit multiply (__hmul2) norm_word uses for T(weight * n)
    assert torch.equal(p32[normal].double(), p64[normal])
    assert torch.equal((a[normal] * b[normal]), p32[normal].to(dtype))


def test_16bit_products_are_exact_in_float32():
    _exact_in_float32(torch.float16, 1 << 20)
    _exact_in_float32(torch.bfloat16, 1 << 20)
