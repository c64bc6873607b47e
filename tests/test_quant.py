"""quant.py and reference.py: the number formats every kernel is tested against."""

import pytest
import torch

from bitengine.quant import (
    absmean_quantize,
    check_packed_codes,
    dequantize,
    pack_ternary,
    parse_scale_granularity,
    quantize_activations,
    unpack_ternary,
)
from bitengine.reference import ternary_accumulate_reference, ternary_linear_reference


@pytest.mark.parametrize("n,k", [(1, 1), (3, 4), (5, 7), (17, 130), (64, 4096)])
def test_pack_roundtrip_bit_exact(n, k):
    w_q = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    packed = pack_ternary(w_q)
    assert packed.dtype == torch.uint8 and packed.shape == (n, (k + 3) // 4)
    assert torch.equal(unpack_ternary(packed, k), w_q)
    assert torch.equal(pack_ternary(unpack_ternary(packed, k)), packed)
    check_packed_codes(packed, k)


def test_pack_layout_documented():
    # weights 4j+i sit in bits 2i..2i+1 of byte j, code = w + 1
    w_q = torch.tensor([[-1, 0, 1, 1, 0]], dtype=torch.int8)
    packed = pack_ternary(w_q)
    assert packed.tolist() == [[0b10100100, 0b01010101]]  # second byte: weight 0 then padding (code 1)


def test_invalid_codes_rejected():
    with pytest.raises(ValueError, match="code 3"):
        check_packed_codes(torch.tensor([[0xFF]], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="padding"):
        check_packed_codes(torch.tensor([[0b00000000]], dtype=torch.uint8), 3)
    with pytest.raises(ValueError):
        pack_ternary(torch.tensor([[2]]))


def test_absmean_matches_bitnet_formula():
    w = torch.randn(33, 96)
    w_q, s = absmean_quantize(w)
    ref_s = w.abs().mean().clamp(min=1e-5)
    assert torch.allclose(s, ref_s.reshape(1))
    assert torch.equal(w_q, (w / ref_s).round().clamp(-1, 1).to(torch.int8))
    w_q, s = absmean_quantize(w, "channel")
    assert s.shape == (33,) and torch.allclose(s, w.abs().mean(1))
    w_q, s = absmean_quantize(w, "group", 32)
    assert s.shape == (33, 3)
    assert torch.allclose(s[:, 1], w[:, 32:64].abs().mean(1))
    assert torch.equal(w_q[:, 32:64], (w[:, 32:64] / s[:, 1:2]).round().clamp(-1, 1).to(torch.int8))
    with pytest.raises(ValueError):
        absmean_quantize(w, "group", 64)


def test_scale_spec_parsing():
    assert parse_scale_granularity("group:128") == ("group", 128)
    for bad in ("group:0", "group:6", "rows", "group:x"):
        with pytest.raises(ValueError):
            parse_scale_granularity(bad)


def test_activation_quant_formula():
    x = torch.randn(5, 40) * 3
    x_q, a = quantize_activations(x)
    assert torch.allclose(a, 127 / x.abs().amax(-1, keepdim=True))
    assert x_q.abs().max() <= 128 and torch.equal(x_q, x_q.round())
    assert (x_q.abs().amax(-1) == 127).all()


@pytest.mark.parametrize("gran,gs", [("tensor", 0), ("channel", 0), ("group", 8)])
@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_reference_linear_against_float64(gran, gs, act_bits, m):
    n, k = 19, 40
    w = torch.randn(n, k)
    w_q, s = absmean_quantize(w, gran, gs)
    packed = pack_ternary(w_q)
    x = torch.randn(m, k)
    bias = torch.randn(n)
    y = ternary_linear_reference(x, packed, s, k, act_bits, bias)
    w64 = dequantize(w_q, s).double()
    if act_bits == 8:
        x_q, a = quantize_activations(x)
        x64 = x_q.double() / a.double()
    else:
        x64 = x.double()
    ref = x64 @ w64.t() + bias.double()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6


def test_integer_accumulation_exact():
    x_q = torch.randint(-128, 128, (7, 300), dtype=torch.int8)
    w_q = torch.randint(-1, 2, (11, 300), dtype=torch.int8)
    acc = ternary_accumulate_reference(x_q, pack_ternary(w_q), 300)
    assert torch.equal(acc, (x_q.int() @ w_q.int().t()))
