"""BitNet checkpoints: transformers' packed format (both linear_class conventions) imported with no
re-quantization and compared with transformers' own BitNetForCausalLM; latent BitNet weights."""

import json

import pytest
import torch
from tinymodels import make_packed_bitnet

import bitengine
from bitengine.formats.hf import unpack_transformers_bitnet
from bitengine.quant import absmean_quantize, unpack_ternary


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_unpack_matches_transformers():
    from transformers.integrations.bitnet import pack_weights

    w_q = torch.randint(-1, 2, (24, 10), dtype=torch.int8)
    assert torch.equal(unpack_transformers_bitnet(pack_weights(w_q.clone()), 24), w_q)


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
def test_packed_bitnet_matches_transformers(tmp_path, linear_class):
    from transformers import BitNetForCausalLM

    latent = make_packed_bitnet(tmp_path / "src", linear_class)
    bitengine.convert(tmp_path / "src", tmp_path / "dst", progress=False)
    # imported, not re-quantized: codes and scales are the source's
    from safetensors import safe_open

    with safe_open(str(tmp_path / "dst" / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.1.mlp.down_proj.weight_packed")
        scale = f.get_tensor("model.layers.1.mlp.down_proj.weight_scale")
    w_q, s = absmean_quantize(latent.model.layers[1].mlp.down_proj.weight.float())
    assert torch.equal(unpack_ternary(packed, w_q.shape[1]), w_q)
    assert torch.allclose(scale, s.bfloat16().float() if linear_class == "autobitlinear" else 1 / (1 / s).bfloat16().float())

    hf = BitNetForCausalLM.from_pretrained(str(tmp_path / "src"), dtype=torch.float32).eval()
    model = bitengine.load(tmp_path / "dst", dtype=torch.float32, backend="reference")
    ids = torch.randint(0, 256, (2, 21))
    with torch.no_grad():
        # the same formulas in fp32: only float rounding differs (well inside bf16 noise, ~1e-2)
        assert rel(model(ids), hf(ids).logits) < 1e-4
    assert model.model.layers[0].mlp.ffn_sub_norm is not None and model.config.hidden_act == "relu2"


def test_latent_bitnet_is_quantized_with_absmean(tmp_path):
    """BitNetForCausalLM with 16-bit latent weights (no quantization_config): absmean at conversion."""
    latent = make_packed_bitnet(tmp_path / "packed", "autobitlinear")
    latent.save_pretrained(str(tmp_path / "src"))
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    assert "quantization_config" not in cfg
    bitengine.convert(tmp_path / "src", tmp_path / "dst", progress=False)
    bitengine.convert(tmp_path / "packed", tmp_path / "dst_packed", progress=False)
    from bitengine.formats.checkpoint import CheckpointReader

    a, b = CheckpointReader(tmp_path / "dst"), CheckpointReader(tmp_path / "dst_packed")
    for name in a.meta:
        if name.endswith("weight_packed"):
            assert torch.equal(a.tensor(name), b.tensor(name)), name  # identical ternary codes
        elif name.endswith("weight_scale"):  # the packed file stored the scale in bf16
            assert torch.allclose(a.tensor(name), b.tensor(name), rtol=2**-8, atol=0), name
    model = bitengine.load(tmp_path / "dst", dtype=torch.float32, backend="reference")
    assert model.config.arch == "bitnet"
