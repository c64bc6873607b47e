"""The greedy argmax kernel (kernels/argmax.py) against torch.argmax: first index of the maximum, NaN first.

The kernel tests run on a GPU (marked gpu) and, on the CPU, in a child process under TRITON_INTERPRET=1 (the
interpreter must be on before triton is first imported), started by test_kernels_under_interpreter."""

import os
import subprocess
import sys

import pytest
import torch

from bitengine.kernels import argmax as argmax_kernel
from bitengine.kernels.gemv import INTERPRET

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

def kernel_test(fn):
    return pytest.mark.gpu(pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET,
                                              reason="needs CUDA or TRITON_INTERPRET=1")(fn))


@pytest.mark.skipif(DEVICE != "cpu" or INTERPRET, reason="the CPU's way to run the kernel tests")
def test_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                           os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=600,
                          check=False, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and " passed" in proc.stdout and "skipped" not in proc.stdout, \
        proc.stdout[-4000:] + proc.stderr[-2000:]


def _check(x):
    got = argmax_kernel.argmax_rows(x)
    assert got.dtype == torch.long and got.shape == (x.shape[0],)
    assert torch.equal(got.cpu(), x.float().cpu().argmax(-1)), (got, x.float().argmax(-1))


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,v", [(1, 1), (1, 100), (3, 4096), (2, 4097), (2, 3 * 4096 + 5)])
def test_matches_torch(monkeypatch, b, v, dtype):
    monkeypatch.setattr(argmax_kernel, "BLOCK", 4096 if v > 4096 * 3 else 64)  # several pieces per row, small
    g = torch.Generator().manual_seed(v)
    _check(torch.randn(b, v, generator=g).to(dtype).to(DEVICE))


@kernel_test
@pytest.mark.parametrize("b,v", [(1, 32000), (8, 128256)])
def test_real_vocabularies(b, v):
    """Llama-2's and Llama-3's vocabularies at the real piece size, the maximum planted in a late piece."""
    x = torch.randn(b, v, generator=torch.Generator().manual_seed(b)).half()
    x[0, v - 3] = 30.0
    _check(x.to(DEVICE))


@kernel_test
def test_ties_nan_inf_and_strided_rows(monkeypatch):
    monkeypatch.setattr(argmax_kernel, "BLOCK", 64)
    x = torch.zeros(6, 300)
    x[0, [7, 70, 299]] = 5.0  # ties across pieces: the first
    x[1, [100, 101]] = 5.0  # ties inside a piece
    x[2] = float("-inf")  # all -inf: index 0
    x[3, [5, 200]] = float("nan")  # NaN wins, first NaN
    x[3, 10] = float("inf")
    x[4, [3, 250]] = float("inf")
    x[5, 299] = 1.0  # the last element
    _check(x.to(DEVICE))
    wide = torch.randn(4, 400).to(DEVICE)
    _check(wide[:, 50:350])  # row stride 400, unit stride along V


@kernel_test
def test_rejects_bad_input():
    with pytest.raises(ValueError, match="unit stride"):
        argmax_kernel.argmax_rows(torch.zeros(3, 4, device=DEVICE).t())
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        argmax_kernel.argmax_rows(torch.zeros(2, 4, dtype=torch.int32, device=DEVICE))
