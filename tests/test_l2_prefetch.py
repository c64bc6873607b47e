"""The L2 prefetch plan of the CUDA decode step (bitengine/l2_prefetch.py), on any machine: which layer prefetches
whose weights in each mode. The kernel side (the prefetch never changes a GEMV's output, also chained in a CUDA
graph) runs on the device: tests/test_gpu_kernels.py, tests/test_gpu_model.py."""

from __future__ import annotations

import pytest
import torch
from tinymodels import make_llama

import bitengine
from bitengine.l2_prefetch import decode_order, plan

pytestmark = pytest.mark.skipif(bitengine.backends.availability("cpu")["cpu"] is not None,
                                reason="C++ CPU kernels not built")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("l2")
    make_llama(root / "hf", tokenizer=False)
    bitengine.convert(root / "hf", root / "a8", progress=False)
    return root / "a8"


class _FakeCuda:  # plan() only asks a layer's backend for its name and the layer for its kernel buffer
    name = "cuda"


def _as_cuda(model):
    for i, m in enumerate(decode_order(model)):
        m.backend = _FakeCuda()
        m.weight_i2w = torch.full((1,), i)
    return decode_order(model)


@pytest.mark.parametrize("fuse", [True, False])
def test_decode_order(ckpt, fuse):
    model = bitengine.load(ckpt, backend="cpu", fuse=fuse)
    expected = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if fuse:
            expected += [attn.fused, attn.o_proj, mlp.fused, mlp.down_proj]
        else:
            expected += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    assert decode_order(model) == expected


def test_cpu_model_prefetches_nothing(ckpt):
    model = bitengine.load(ckpt, backend="cpu")
    assert all(m.l2_prefetch is None for m in decode_order(model))


def test_modes(ckpt):
    model = bitengine.load(ckpt, backend="cpu")
    order = _as_cuda(model)
    assert plan(model, "next") == len(order) - 1
    assert [m.l2_prefetch for m in order[:-1]] == [m.weight_i2w for m in order[1:]]
    assert order[-1].l2_prefetch is None  # the last down projection: the head comes next
    # gaps: q/k/v -> o_proj (over attention) and gate/up -> down_proj (over the gating) only
    assert plan(model, "gaps") == 2 * model.config.num_layers
    for layer in model.model.layers:
        assert layer.self_attn.fused.l2_prefetch is layer.self_attn.o_proj.weight_i2w
        assert layer.mlp.fused.l2_prefetch is layer.mlp.down_proj.weight_i2w
        assert layer.self_attn.o_proj.l2_prefetch is None and layer.mlp.down_proj.l2_prefetch is None
    assert plan(model, "0") == 0 and all(m.l2_prefetch is None for m in order)
    with pytest.raises(ValueError, match="BITENGINE_L2_PREFETCH must be one of"):
        plan(model, "all")


def test_only_cuda_layers_take_part(ckpt):
    """A layer prefetches only when it and the next layer both run on the cuda backend (its kernel buffer is what
    the C++ GEMV reads)."""
    model = bitengine.load(ckpt, backend="cpu")
    order = _as_cuda(model)
    del order[1].weight_i2w  # o_proj of layer 0 without a kernel buffer
    plan(model, "next")
    assert order[0].l2_prefetch is None and order[1].l2_prefetch is None
    assert order[2].l2_prefetch is order[3].weight_i2w
