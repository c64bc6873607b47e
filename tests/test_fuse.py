"""Fused projections (bitengine/fuse.py): q/k/v and gate/up as one ternary matmul, exact.

Compared with the same checkpoint loaded unfused, on the C++ CPU backend (the GPU backends run the
same fusion; tests/test_gpu_kernels.py covers them on the device)."""

from __future__ import annotations

import pytest
import torch
from test_lora import _peft_adapter
from tinymodels import make_llama

import bitengine
from bitengine.cpu_decode import _why_not
from bitengine.lora import apply_adapters, remove_adapters, set_adapters

pytestmark = pytest.mark.skipif(bitengine.backends.availability("cpu")["cpu"] is not None,
                                reason="C++ CPU kernels not built")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuse")
    base = make_llama(root / "hf", tokenizer=False, attention_bias=True)  # biases: fused too
    for name, kw in {"tensor": {}, "channel": {"scale": "channel"}, "group": {"scale": "group:32"},
                     "a16": {"act_bits": 16}}.items():
        bitengine.convert(root / "hf", root / name, progress=False, **kw)
    _peft_adapter(base, root / "a", seed=1)
    _peft_adapter(base, root / "b", seed=2, r=2, lora_alpha=3, target_modules=["q_proj", "up_proj"])
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"root": root, "ids": ids}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).double()


@pytest.mark.parametrize("ckpt", ["tensor", "channel", "group", "a16"])
def test_fused_equals_unfused(world, ckpt):
    path, ids = world["root"] / ckpt, world["ids"]
    fused = bitengine.load(path, backend="cpu")
    plain = bitengine.load(path, backend="cpu", fuse=False)
    assert fused.fused_groups == 2 * fused.config.num_layers and plain.fused_groups == 0
    attn = fused.model.layers[0].self_attn
    assert attn.fused is not None and attn.fused.sizes == [64, 32, 32]
    assert not hasattr(attn.q_proj, "weight_cpu")  # the members' kernel layouts are dropped
    assert plain.model.layers[0].self_attn.fused is None
    assert torch.equal(_logits(fused, ids), _logits(plain, ids))
    # state dicts: only the checkpoint's tensors, unchanged by fusion
    sd_f, sd_p = fused.state_dict(), plain.state_dict()
    assert sd_f.keys() == sd_p.keys() and all(torch.equal(sd_f[k], sd_p[k]) for k in sd_p)


def test_fused_side_path_and_switching(world):
    r, ids = world["root"], world["ids"]
    adapters = [(r / "a", 0.7), (r / "b", 1.5)]
    fused = bitengine.load(r / "channel", backend="cpu")
    plain = bitengine.load(r / "channel", backend="cpu", fuse=False)
    base = _logits(fused, ids)
    for mode in ("fused", "merge", "fused"):
        apply_adapters(fused, adapters, mode=mode)
        apply_adapters(plain, adapters, mode=mode)
        got, want = _logits(fused, ids), _logits(plain, ids)
        assert (got - want).norm() / want.norm() < 1e-6, mode
        assert not torch.equal(got, base)
    set_adapters(fused, [r / "b"], adapter_dtype="int8")
    set_adapters(plain, [r / "b"], adapter_dtype="int8")
    assert (_logits(fused, ids) - _logits(plain, ids)).norm() / _logits(plain, ids).norm() < 1e-6
    remove_adapters(fused)
    assert torch.equal(_logits(fused, ids), base)
    assert fused.model.layers[0].mlp.fused.lora_A is None


@pytest.mark.parametrize("ckpt", ["channel", "group"])
def test_interleaved_gate_up(world, ckpt, monkeypatch):
    """Gate/up fused with interleaved rows (the layout the cuda backend's gated GEMV reads; forced here on the CPU
    backend): rows, scales, bias and the fused adapter side path permuted alike, so logits match the unfused model's,
    with adapters fused, merged and removed."""
    r, ids = world["root"], world["ids"]
    monkeypatch.setattr(type(bitengine.backends.get("cpu")), "gates_interleaved", True, raising=False)
    fused = bitengine.load(r / ckpt, backend="cpu")
    monkeypatch.undo()
    plain = bitengine.load(r / ckpt, backend="cpu", fuse=False)
    mlp = fused.model.layers[0].mlp
    assert mlp.fused.interleaved and not fused.model.layers[0].self_attn.fused.interleaved
    assert "interleaved" in (_why_not(fused) or "")  # the C++ CPU decode reads the plain layout: eager steps
    g, u = mlp.fused(torch.randn(3, mlp.fused.in_features))
    assert g.shape == u.shape == (3, mlp.gate_proj.out_features)
    # the same integer sums and scales; only F.silu differs in the last float bit on strided halves (no SIMD path)
    close = lambda: (_logits(fused, ids) - _logits(plain, ids)).norm() / _logits(plain, ids).norm() < 1e-6  # noqa: E731
    assert close()
    adapters = [(r / "a", 0.7), (r / "b", 1.5)]
    for mode in ("fused", "merge"):
        apply_adapters(fused, adapters, mode=mode)
        apply_adapters(plain, adapters, mode=mode)
        got, want = _logits(fused, ids), _logits(plain, ids)
        assert (got - want).norm() / want.norm() < 1e-6, mode
        assert fused.model.layers[0].mlp.fused.interleaved, mode  # rebuilt after the merge, still interleaved
    remove_adapters(fused)
    remove_adapters(plain)
    assert close()


def test_mlp_takes_the_gated_kernel(world, monkeypatch):
    """MLP.forward hands an interleaved gate/up layer to its backend's linear_gated (the CUDA GEMV's gating epilogue)
    and uses what it returns; where that returns None, the gating runs after the fused layer. Here a Python stand-in
    on the CPU backend computes the same ops, so the logits are equal and the calls are counted."""
    import torch.nn.functional as F

    r, ids = world["root"], world["ids"]
    cpu = type(bitengine.backends.get("cpu"))
    monkeypatch.setattr(cpu, "gates_interleaved", True, raising=False)
    model = bitengine.load(r / "channel", backend="cpu")
    base = _logits(model, ids)
    calls = []

    def linear_gated(self, x, layer, norm, act):
        calls.append(act)
        g, u = layer(x, norm)
        return F.silu(g) * u

    monkeypatch.setattr(cpu, "linear_gated", linear_gated, raising=False)
    assert torch.equal(_logits(model, ids), base)
    assert calls == ["silu"] * model.config.num_layers
    # its result is what the down projection gets
    monkeypatch.setattr(cpu, "linear_gated", lambda self, x, layer, norm, act: linear_gated(self, x, layer, norm, act) * 0,
                        raising=False)
    assert not torch.equal(_logits(model, ids), base)
    monkeypatch.setattr(cpu, "linear_gated", lambda self, *args: None, raising=False)
    assert torch.equal(_logits(model, ids), base)


def test_reference_backend_stays_unfused(world):
    model = bitengine.load(world["root"] / "tensor", backend="reference")
    assert model.fused_groups == 0 and model.model.layers[0].mlp.fused is None
