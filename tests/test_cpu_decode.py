"""cpu_decode: the decoder layers in C++ (csrc/cpu/decode_layer.cpp) against the model's own PyTorch step.

Both decoders start every step from the same KV cache (the eager one's, copied over), so each
step is compared on its own: A16 layers differ only in float summation order (RMSNorm, exp,
softmax), so logits and the new cache slot agree to 1e-5; A8 layers quantize activations, and a
last-bit difference in front of the quantizer can move one int8 code by one step, so their
bound is looser (1e-2 relative) and most steps must still agree to 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from tinymodels import make_llama, make_packed_bitnet

import bitengine
from bitengine import cpu_decode, fuse
from bitengine.generate import Decoder

cpu = pytest.importorskip("bitengine.backends.cpu")
pytestmark = pytest.mark.skipif(cpu._C is None, reason="C++ CPU extension not built")


@pytest.fixture(params=cpu.available_isas() if cpu._C is not None else [])
def isa(request):
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa("auto")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _model(tmp_path, act_bits=8, bitnet=False, **overrides):
    if bitnet:
        make_packed_bitnet(tmp_path / "src", "autobitlinear", **overrides)
        bitengine.convert(tmp_path / "src", tmp_path / "dst", progress=False)
    else:
        make_llama(tmp_path / "src", **overrides)
        bitengine.convert(tmp_path / "src", tmp_path / "dst", act_bits=act_bits, progress=False)
    return bitengine.load(tmp_path / "dst", backend="cpu")


def _add_adapters(model, rank=3, seed=0):
    """Random LoRA factors on every projection (float32), then the fused layers' side paths rebuilt."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                lin = getattr(parent, n)
                lin.lora_A = torch.randn(rank, lin.in_features, generator=g) * 0.1
                lin.lora_B = torch.randn(lin.out_features, rank, generator=g) * 0.1
    fuse.refresh(model)


def _compare(model, prompts, steps=6, act_bits=16):
    """Prefill a left-padded batch, then `steps` greedy decode steps, each run by both decoders from
    the eager cache. Returns the per-step relative logit errors."""
    b, t = len(prompts), max(map(len, prompts))
    pad = [t - len(p) for p in prompts]
    ids = torch.tensor([[0] * n + p for n, p in zip(pad, prompts)])
    offset = torch.tensor(pad)
    slots = torch.arange(t + steps)
    errs = []
    with torch.no_grad():
        eager = model.new_cache(b, max_seq=t + steps)
        eager.valid.copy_(slots[None] >= offset[:, None])
        positions = (slots[:t][None] - offset[:, None]).clamp(min=0)
        logits = model(ids, cache=eager, input_pos=slots[:t], position_ids=positions, kv_len=t, last_only=True)[:, -1]
        fast = model.new_cache(b, max_seq=t + steps)
        layers = cpu_decode.plan(model)
        assert layers is not None, model.__dict__.get("_fast_decode_reason")
        d_eager, d_fast = Decoder(model, eager, offset), cpu_decode.FastCpuDecoder(model, fast, offset, layers)
        for i in range(steps):
            for a, c in zip(fast.buffers(), eager.buffers()):
                a.copy_(c)
            tok = logits.argmax(-1, keepdim=True)
            got = d_fast(tok, t + i)
            logits = d_eager(tok, t + i)
            assert got.shape == logits.shape == (b, model.config.vocab_size)
            errs.append(_rel(got, logits))
            for a, c in zip(fast.k + fast.v, eager.k + eager.v):  # the new slot, written by both
                assert _rel(a[:, :, t + i], c[:, :, t + i]) < (1e-5 if act_bits == 16 else 1e-2)
    return errs


def _check(errs, act_bits):
    if act_bits == 16:
        assert max(errs) < 1e-5, errs
    else:
        assert max(errs) < 1e-2 and sorted(errs)[len(errs) // 2] < 1e-5, errs


PROMPTS = [[5, 60, 7, 80, 9, 11, 3], [3, 4, 200], [17]]


@pytest.mark.parametrize("act_bits", [8, 16])
def test_llama_layers_match_eager(tmp_path, isa, act_bits):
    model = _model(tmp_path, act_bits)
    _check(_compare(model, PROMPTS, act_bits=act_bits), act_bits)


@pytest.mark.parametrize("case", ["bias", "window", "lora", "bitnet", "mha"])
def test_variants_match_eager(tmp_path, case):
    act_bits = 16
    if case == "bias":
        model = _model(tmp_path, act_bits, attention_bias=True, mlp_bias=True)
    elif case == "bitnet":  # relu2 MLP, attention and MLP sub-norms, A8 (the checkpoint's own)
        model, act_bits = _model(tmp_path, bitnet=True), 8
    elif case == "mha":  # no GQA, head_dim 32, odd sizes
        model = _model(tmp_path, act_bits, hidden_size=96, intermediate_size=200, num_attention_heads=3,
                       num_key_value_heads=3)
    else:
        model = _model(tmp_path, act_bits)
        if case == "window":  # slots outside the window are masked (the mask comes from CausalLM._mask)
            model.config.sliding_window = 3
        else:  # adapters: every layer runs through ternary_linear_cpu (DecodeLayer.forward)
            _add_adapters(model)
            assert not any(layer.direct for layer in cpu_decode.plan(model))
    _check(_compare(model, PROMPTS, steps=5, act_bits=act_bits), act_bits)


@pytest.mark.parametrize("act_bits,kernel", [(8, "dot"), (8, "add"), (16, "dot"), (16, "add")])
def test_one_region_step_equals_layer_by_layer(tmp_path, isa, act_bits, kernel):
    """decode_step (all layers in one parallel region, raw kernels) against DecodeLayer.forward (each
    linear through ternary_linear_cpu): the same kernels and epilogue, so the same bits."""
    model = _model(tmp_path, act_bits, attention_bias=True, num_hidden_layers=3)
    layers = cpu_decode.plan(model)
    assert all(layer.direct for layer in layers)
    cpu.set_kernel(kernel)
    try:
        b, slot = 3, 5
        g = torch.Generator().manual_seed(1)
        caches = [model.new_cache(b, max_seq=8) for _ in range(2)]
        for buf in caches[0].buffers():
            if buf.dtype == torch.float32:
                buf.copy_(torch.randn(buf.shape, generator=g))
        for a, c in zip(caches[1].buffers(), caches[0].buffers()):
            a.copy_(c)
        x = torch.randn(b, 64, generator=g)
        cos, sin = torch.randn(b, 16, generator=g), torch.randn(b, 16, generator=g)
        allowed = torch.rand(b, slot + 1, generator=g) < 0.7
        allowed[:, slot] = True
        variant = cpu.KERNELS[kernel]
        slots = torch.tensor([slot, 2, 4])  # each row's token goes to its own slot
        y = x
        for i, layer in enumerate(layers):
            y = layer.forward(y, caches[0].k[i], caches[0].v[i], cos, sin, allowed, slots, slot + 1, variant)
        z = cpu._C.decode_step(layers, x, caches[1].k, caches[1].v, cos, sin, allowed, slots, slot + 1, variant)
        assert torch.equal(y, z)
        assert all(torch.equal(a, c) for a, c in zip(caches[1].k + caches[1].v, caches[0].k + caches[0].v))
    finally:
        cpu.set_kernel("dot")


@pytest.mark.parametrize("act_bits", [8, 16])
def test_rows_at_their_own_slots_match_eager(tmp_path, act_bits):
    """decode_rows (the server's continuous batch: each row at its own slot = rotary position, kv_len the
    longest row's) against the model's forward with input_pos (B, 1), from the same cache."""
    model = _model(tmp_path, act_bits)
    layers = cpu_decode.plan(model)
    g = torch.Generator().manual_seed(2)
    caches = [model.new_cache(3, max_seq=12) for _ in range(2)]
    for buf in caches[0].buffers():
        if buf.dtype == torch.float32:
            buf.copy_(torch.randn(buf.shape, generator=g))
    for a, c in zip(caches[1].buffers(), caches[0].buffers()):
        a.copy_(c)
    tokens = torch.tensor([[7], [100], [3]])
    slots = torch.tensor([9, 0, 4])
    with torch.no_grad():
        want = model(tokens, cache=caches[0], input_pos=slots[:, None], position_ids=slots[:, None],
                     kv_len=10)[:, -1]
        got = cpu_decode.decode_rows(model, layers, caches[1], tokens, slots)
    _check([_rel(got[i], want[i]) for i in range(3)], act_bits)
    for a, c in zip(caches[1].k + caches[1].v, caches[0].k + caches[0].v):
        for row, s in enumerate(slots.tolist()):
            assert _rel(a[row, :, s], c[row, :, s]) < 1e-2


def test_generate_uses_cpp_layers_and_agrees(tmp_path, monkeypatch):
    model = _model(tmp_path, 16)
    prompts = [[5, 60, 7, 80, 9], [3, 4, 200]]
    fast = model.generate(input_ids=prompts, max_new_tokens=8, ignore_eos=True)
    assert model.__dict__.get("_fast_decode_reason") is None
    monkeypatch.setenv("BITENGINE_CPU_FAST_DECODE", "0")
    assert cpu_decode.plan(model) is None
    assert model.generate(input_ids=prompts, max_new_tokens=8, ignore_eos=True) == fast


def test_models_that_do_not_qualify(tmp_path):
    make_llama(tmp_path / "src")
    bitengine.convert(tmp_path / "src", tmp_path / "dst", progress=False)
    ref = bitengine.load(tmp_path / "dst", backend="reference")
    assert cpu_decode.plan(ref) is None and "not fused" in ref.__dict__["_fast_decode_reason"]
    bf16 = bitengine.load(tmp_path / "dst", backend="cpu", dtype="bf16")
    assert cpu_decode.plan(bf16) is None and "float32" in bf16.__dict__["_fast_decode_reason"]
    # still generates, through the PyTorch layers
    assert len(bf16.generate(input_ids=[3, 4], max_new_tokens=3, ignore_eos=True)) == 3


def test_bad_inputs_raise(tmp_path):
    model = _model(tmp_path, 8)
    layer = cpu_decode.plan(model)[0]
    cache = model.new_cache(1, max_seq=8)
    x, cs = torch.randn(1, 64), torch.randn(1, 16)
    ok, at3 = torch.ones(1, 4, dtype=torch.bool), torch.tensor([3])
    layer.forward(x, cache.k0, cache.v0, cs, cs, ok, at3, 4, 1)
    with pytest.raises(RuntimeError, match="x must be"):
        layer.forward(torch.randn(1, 65), cache.k0, cache.v0, cs, cs, ok, at3, 4, 1)
    with pytest.raises(RuntimeError, match="does not fit"):
        layer.forward(x, cache.k0, cache.v0, cs, cs, torch.ones(1, 9, dtype=torch.bool), torch.tensor([8]), 9, 1)
    with pytest.raises(RuntimeError, match="outside kv_len"):
        layer.forward(x, cache.k0, cache.v0, cs, cs, ok, torch.tensor([4]), 4, 1)
    with pytest.raises(RuntimeError, match="pos must be"):
        layer.forward(x, cache.k0, cache.v0, cs, cs, ok, torch.tensor([3, 3]), 4, 1)
    with pytest.raises(RuntimeError, match="allowed"):
        layer.forward(x, cache.k0, cache.v0, cs, cs, ok[:, :3], at3, 4, 1)
    with pytest.raises(RuntimeError, match="caches"):
        layer.forward(x, cache.k0[:, :1].contiguous(), cache.v0, cs, cs, ok, at3, 4, 1)
