"""The int4 head on a CUDA device (marker `gpu`): the C++ GEMV (csrc/cuda/int4_gemv.cu) and the Triton GEMM
(kernels/int4_linear.py) against int4_head's float64 reference at real heads and awkward widths, the op's dispatch,
a CUDA graph, torch.compile, and a model loaded with head="int4" decoding the same tokens eagerly and from its graph."""

from __future__ import annotations

import os

import pytest
import torch

from bitengine.int4_head import Int4Linear, int4_linear_reference

os.environ.setdefault("BITENGINE_TUNE", "0")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}  # the output's rounding, float32 sums


def _ext():
    from bitengine.backends import cuda as cuda_backend

    return cuda_backend._C_cuda


def _head(n, k, bias, seed):
    g = torch.Generator().manual_seed(seed)
    return Int4Linear(torch.randn(n, k, generator=g) * 0.02, torch.randn(n, generator=g) if bias else None).cuda()


def _check(y, ref, dtype, what):
    assert y.dtype == dtype and y.shape == ref.shape, (what, y.dtype, y.shape)
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < TOL[dtype], f"{what}: rel. err {err:.2e}"


@pytest.mark.parametrize("n,k", [(128256, 2560), (32000, 4096), (128256, 4096), (1000, 333), (77, 4100), (33, 20000),
                                 (5, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_gemv_equals_reference(n, k, dtype):
    """Both row paths of the GEMV (K_pad <= 4096: four rows per warp; longer: two) with and without bias."""
    from bitengine.kernels import int4_linear

    ext = _ext()
    if ext is None or not hasattr(ext, "int4_gemv"):
        pytest.skip("bitengine._C_cuda not built with the int4 GEMV")
    for bias in (True, False):
        head = _head(n, k, bias, seed=n + k)
        w, s, b = head.weight_int4, head.weight_scale, head.bias
        x = torch.randn(1, k, device="cuda").to(dtype)
        ref = int4_linear_reference(x.double(), w, s, b, k)
        assert int4_linear.cuda_gemv_ext(x, w) is ext
        _check(ext.int4_gemv(x, w, s, k, b), ref, dtype, f"cuda int4 gemv {n}x{k} bias={bias}")
        _check(torch.ops.bitengine.int4_linear(x, w, s, b, k), ref, dtype, f"int4 op {n}x{k} bias={bias}")


@pytest.mark.parametrize("n,k", [(128256, 2560), (32000, 4096), (1000, 333)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_gemm_equals_reference(n, k, dtype):
    from bitengine.kernels.int4_linear import int4_gemm

    head = _head(n, k, True, seed=7)
    w, s, b = head.weight_int4, head.weight_scale, head.bias
    for m in (1, 2, 8, 17, 32, 100):
        x = torch.randn(m, k, device="cuda").to(dtype)
        ref = int4_linear_reference(x.double(), w, s, b, k)
        _check(int4_gemm(x, w, s, b, k), ref, dtype, f"int4 gemm {n}x{k} m={m}")
        _check(torch.ops.bitengine.int4_linear(x, w, s, b, k), ref, dtype, f"int4 op {n}x{k} m={m}")


def test_module_graph_compile_and_memory():
    """Int4Linear runs the kernels without a float copy of the weight, inside a CUDA graph and compiled."""
    head = _head(128256, 2560, False, seed=3)
    x = torch.randn(1, 1, 2560, device="cuda", dtype=torch.float16)
    head(x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    y = head(x)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 16 * 2**20
    ref = lambda x: int4_linear_reference(x.double(), head.weight_int4, head.weight_scale, None, 2560)  # noqa: E731
    _check(y, ref(x), torch.float16, "Int4Linear")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = head(x)
    x.copy_(torch.randn(1, 1, 2560, device="cuda", dtype=torch.float16))
    graph.replay()
    _check(static_y, ref(x), torch.float16, "Int4Linear graph")
    compiled = torch.compile(head, fullgraph=True)
    x8 = torch.randn(8, 2560, device="cuda", dtype=torch.float16)
    _check(compiled(x8), ref(x8), torch.float16, "Int4Linear compiled")


def test_model_with_int4_head_graph_equals_eager(tmp_path):
    """A model loaded with head="int4": CUDA-graph decoding gives the eager loop's tokens, and its logits stay near
    the 16-bit head's (int4 rounds coarsely: the bound is loose on purpose; the README has the perplexity)."""
    from tinymodels import make_llama

    import bitengine

    make_llama(tmp_path / "hf", tokenizer=True, vocab_size=512, hidden_size=384, intermediate_size=1056,
               num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512)
    bitengine.convert(tmp_path / "hf", tmp_path / "a8", scale="channel", progress=False)
    ids = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    fp = bitengine.load(tmp_path / "a8", device="cuda")
    model = bitengine.load(tmp_path / "a8", device="cuda", head="int4")
    with torch.no_grad():
        ref, got = fp(ids.cuda()).double(), model(ids.cuda()).double()
    assert float((got - ref).norm() / ref.norm()) < 0.15
    prompt = list(range(5, 20))
    graph = model.generate(input_ids=prompt, max_new_tokens=12, ignore_eos=True)
    eager = model.generate(input_ids=prompt, max_new_tokens=12, ignore_eos=True, cuda_graph=False)
    assert graph == eager
