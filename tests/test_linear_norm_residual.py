"""BitLinear / DenseLinear forward(x, norm, residual) = residual + linear(norm(x)), the form the decoder layer
uses so that the CUDA decode GEMV can fuse the norm and the residual add (backends/cuda.py linear_fused).

On backends without `linear_fused` it is the three steps, bit for bit; a backend's fused call is taken only where
it applies (it returns a tensor) and never when an adapter's side path runs eagerly (the fused kernel has none)."""

from __future__ import annotations

import pytest
import torch

from bitengine import backends
from bitengine.nn import BitLinear, DenseLinear, RMSNorm
from bitengine.quant import absmean_quantize, pack_ternary

K, N = 64, 48


def _bitlinear(backend_name):
    layer = BitLinear(K, N, scale_shape=(N,))
    w_q, scale = absmean_quantize(torch.randn(N, K, generator=torch.Generator().manual_seed(0)), "channel", 0)
    layer.weight_packed.copy_(pack_ternary(w_q))
    layer.weight_scale.copy_(scale.reshape(N))
    layer.prepare(backends.get(backend_name))
    return layer


def _norm():
    norm = RMSNorm(K, 1e-5)
    norm.weight.data = torch.rand(K, generator=torch.Generator().manual_seed(1)).half() + 0.5
    return norm


def _inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(1, 3, K, generator=g).half(), torch.randn(1, 3, N, generator=g).half()


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_bitlinear_steps_bit_for_bit(backend_name):
    if backends.availability("cpu")[backend_name] is not None:
        pytest.skip(f"{backend_name} backend not available")
    layer, norm = _bitlinear(backend_name), _norm()
    x, r = _inputs()
    with torch.no_grad():
        assert torch.equal(layer(x, norm, r), layer(norm(x)) + r)
        assert torch.equal(layer(x, norm), layer(norm(x)))
        assert torch.equal(layer(x, residual=r), layer(x) + r)


def test_denselinear_steps_bit_for_bit():
    layer = DenseLinear(K, N, bias=True)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    layer.half()
    norm = _norm()
    x, r = _inputs()
    with torch.no_grad():
        assert torch.equal(layer(x, norm, r), layer(norm(x)) + r)


class _FusingBackend:
    """The reference backend plus a linear_fused that marks its output (and counts its calls)."""

    def __init__(self, applies):
        self.inner, self.applies, self.calls = backends.get("reference"), applies, 0
        self.name = "fusing"

    def prepare(self, layer):
        self.inner.prepare(layer)

    def fuses_adapter(self, layer):
        return False

    def linear(self, x, layer):
        return self.inner.linear(x, layer)

    def linear_fused(self, x, layer, norm, residual):
        self.calls += 1
        return torch.full((*x.shape[:-1], layer.out_features), 7.0, dtype=x.dtype) if self.applies else None


def test_fused_call_taken_only_where_it_applies():
    layer, norm = _bitlinear("reference"), _norm()
    x, r = _inputs()
    with torch.no_grad():
        fusing = _FusingBackend(applies=True)
        layer.backend = fusing
        assert (layer(x, norm, r) == 7).all() and fusing.calls == 1
        assert not (layer(x) == 7).all() and fusing.calls == 1  # nothing to fuse: the plain path
        declining = _FusingBackend(applies=False)
        layer.backend = declining
        assert torch.equal(layer(x, norm, r), layer.backend.inner.linear(norm(x), layer) + r) and declining.calls == 1
        layer.backend = fusing  # an eager adapter side path: never the fused kernel
        layer.lora_A, layer.lora_B = torch.zeros(2, K, dtype=torch.half), torch.zeros(N, 2, dtype=torch.half)
        try:
            assert not (layer(x, norm, r) == 7).all() and fusing.calls == 1
        finally:
            layer.lora_A = layer.lora_B = None
