"""The Python input checks in front of the C++ GEMV (backends/cuda.py check_gemv_inputs), on any machine: every
rule raises ValueError with one line naming the input, and valid inputs fail only on the device rule here (CPU
tensors). The GPU side (tests/test_gpu_kernels.py::test_cuda_gemv_bad_input_raises) runs them through the real
extension."""

from __future__ import annotations

import pytest
import torch

from bitengine.backends.cuda import check_gemv_inputs

K, N = 64, 8


def _inputs(**change):
    kw = dict(x=torch.randn(1, K, dtype=torch.half), w=torch.zeros(N, 16, dtype=torch.int32),
              scale=torch.ones(1), in_features=K)
    kw.update(change)
    return kw


@pytest.mark.parametrize("change,words", [
    (dict(x=torch.randn(1, K, dtype=torch.float64)), "x must be float16"),
    (dict(x=torch.randn(1, K + 1, dtype=torch.half)), "x must be a contiguous [M, 64]"),
    (dict(x=torch.randn(K, dtype=torch.half)), "x must be a contiguous [M, 64]"),
    (dict(x=torch.randn(3, 60, dtype=torch.half), in_features=60), "M > 1 needs in_features <= 27904 and rows of x"),
    (dict(x=torch.randn(2, 27920, dtype=torch.half), in_features=27920, w=torch.zeros(N, 1760, dtype=torch.int32)),
     "M > 1 needs in_features <= 27904"),
    (dict(x=torch.randn(3, K, dtype=torch.half), residual=torch.ones(N, dtype=torch.half)), "residual must be a "
     "contiguous [24] tensor"),
    (dict(x=torch.randn(2, K, dtype=torch.half), w=torch.zeros(N, 1760, dtype=torch.int32)), "KW 1760 words is too "
     "wide"),
    (dict(x=torch.randn(K, 2, dtype=torch.half).t()[:1]), "x must be a contiguous"),
    (dict(w=torch.zeros(N, 16, dtype=torch.int64)), "w must be i2w int32"),
    (dict(w=torch.zeros(N, 8, dtype=torch.int32)), "w must be i2w int32"),
    (dict(in_features=300, x=torch.randn(1, 300, dtype=torch.half)), "KW * 16 >= in_features (300)"),
    (dict(scale=torch.ones(3)), "scale must be float32 [1] or [N] (N = 8)"),
    (dict(scale=torch.ones(1, dtype=torch.float64)), "scale must be float32"),
    (dict(version=4), "version must be 1, 2 or 3"),
    (dict(rows_per_warp=3), "rows_per_warp 1, 2 or 4"),
    (dict(norm_eps=-1.0), "norm_eps must be >= 0"),
    (dict(bias=torch.ones(N)), "bias must be a contiguous [8] tensor in x's dtype"),
    (dict(bias=torch.ones(N - 1, dtype=torch.half)), "bias must be a contiguous [8]"),
    (dict(norm_weight=torch.ones(K - 1, dtype=torch.half)), "norm_weight must be a contiguous [64]"),
    (dict(residual=torch.ones(N, dtype=torch.bfloat16)), "residual must be a contiguous [8] tensor in x's dtype"),
    (dict(w=torch.zeros(N, 17, dtype=torch.int32)[:, :16]), "w must be i2w int32"),  # row stride not 16-byte
    (dict(w=torch.zeros(N, 12816, dtype=torch.int32), x=torch.randn(1, 205056, dtype=torch.half),
          in_features=205056), "too large for the CUDA GEMV"),
    (dict(act=3), "act must be 0, 1 (silu) or 2 (relu2)"),
    (dict(act=1, w=torch.zeros(N - 1, 16, dtype=torch.int32)), "a gating act needs an even N"),
    (dict(act=2, residual=torch.ones(N, dtype=torch.half)), "and no residual"),
])
def test_each_rule_raises_one_line(change, words):
    with pytest.raises(ValueError) as e:
        check_gemv_inputs(**_inputs(**change))
    msg = str(e.value)
    assert words in msg and "\n" not in msg and msg.startswith("ternary_gemv_a8: "), msg


def test_valid_inputs_fail_only_on_the_device():
    with pytest.raises(ValueError, match="every tensor must be on one CUDA device"):
        check_gemv_inputs(**_inputs(bias=torch.ones(N, dtype=torch.half), norm_weight=torch.ones(K, dtype=torch.half),
                                    residual=torch.ones(N, dtype=torch.half)))


def test_which_token_counts_take_the_tensor_core_kernel():
    """M > 1 goes to the C++ tensor-core kernel up to MAX_MMA_M tokens and MAX_MMA_K inputs, with each row of x in
    whole 16-byte vectors (its loads); M = 1 is the GEMV's."""
    from bitengine.backends.cuda import MAX_MMA_K, MAX_MMA_M, mma_takes

    half, f32 = torch.float16, torch.float32
    assert mma_takes(2, 4096, half) and mma_takes(MAX_MMA_M, 4096, half) and mma_takes(3, 1000, f32)
    assert not mma_takes(1, 4096, half) and not mma_takes(MAX_MMA_M + 1, 4096, half)
    assert mma_takes(8, MAX_MMA_K, half) and not mma_takes(8, MAX_MMA_K + 8, half)
    assert not mma_takes(8, 1004, half) and mma_takes(8, 1004, f32) and not mma_takes(8, 1002, f32)
    assert not mma_takes(8, 4096, torch.float64)  # not a dtype the kernels take
