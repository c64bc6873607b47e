"""Llama-family checkpoints: transformers is the oracle for the fp16 path and the BitNet formulas
applied to transformers' weights are the oracle for the ternary path."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from tinymodels import make_llama

import bitengine
from bitengine.formats.checkpoint import CheckpointReader
from bitengine.quant import absmean_quantize, dequantize, parse_scale_granularity, quantize_activations


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def ternary_reference(hf_model, act_bits: int, scale: str = "tensor", keep=()):
    """transformers' model with every decoder linear replaced by the BitNet b1.58 formulas."""
    ref = copy.deepcopy(hf_model)
    kind, gs = parse_scale_granularity(scale)
    for name, mod in ref.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head" and not any(name.endswith(k) for k in keep):
            w_q, s = absmean_quantize(mod.weight.float(), kind, gs)
            w_deq = dequantize(w_q, s).double().to(mod.weight.dtype)

            def fwd(x, w_deq=w_deq):
                if act_bits == 8:
                    x_q, a = quantize_activations(x)
                    x = (x_q.double() / a.double()).to(x.dtype)
                return F.linear(x, w_deq)
            mod.forward = fwd
    return ref


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    model = make_llama(d / "src", shard="60KB")  # bf16, GQA (4 heads / 2 kv), untied, sharded
    assert (d / "src" / "model.safetensors.index.json").exists()
    return d, model


def test_fp16_matches_transformers(llama):
    d, hf = llama
    bitengine.convert(d / "src", d / "fp16", weights="fp16", progress=False)
    model = bitengine.load(d / "fp16", dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 23))
    with torch.no_grad():
        assert rel(model(ids), hf(ids).logits) < 1e-3
    prompt = torch.randint(3, 256, (1, 7))
    want = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, 7:].tolist()
    got = model.generate(input_ids=prompt, max_new_tokens=32, ignore_eos=True)
    assert got == want


def test_fp16_checkpoint_layers_stay_float16_on_cpu(llama):
    """On the CPU under the C++ backend a float16 checkpoint's dense layers and head stay float16 (the F16C kernel,
    half the bytes); the reference backend keeps float32 copies; the logits agree to float32 summation order."""
    from bitengine.nn import DenseLinear, cpu_kernels_built

    d, _ = llama
    if not (d / "fp16").exists():
        bitengine.convert(d / "src", d / "fp16", weights="fp16", progress=False)
    fast, ref = bitengine.load(d / "fp16", backend="cpu"), bitengine.load(d / "fp16", backend="reference")
    dense = {n: m.weight.dtype for n, m in fast.named_modules() if isinstance(m, DenseLinear)}
    assert len(dense) > 8 and "lm_head" in dense
    assert set(dense.values()) == {torch.float16 if cpu_kernels_built() else torch.float32}
    assert {m.weight.dtype for m in ref.modules() if isinstance(m, DenseLinear)} == {torch.float32}
    ids = torch.randint(0, 256, (2, 23))
    with torch.no_grad():
        assert rel(fast(ids), ref(ids)) < 1e-5


@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("scale", ["tensor", "channel", "group:32"])
def test_ternary_matches_bitnet_formulas(llama, act_bits, scale):
    d, hf = llama
    dst = d / f"tern{act_bits}_{scale.replace(':', '')}"
    bitengine.convert(d / "src", dst, act_bits=act_bits, scale=scale, progress=False)
    model = bitengine.load(dst, dtype=torch.float64, backend="reference")
    # float64 on both sides so int8 activation rounding sees the same inputs
    ref = ternary_reference(hf.double(), act_bits, scale)
    hf.float()
    ids = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        assert rel(model(ids), ref(ids).logits) < 1e-3


def test_checkpoint_contents(llama):
    d, _ = llama
    bitengine.convert(d / "src", d / "t", progress=False, keep=["down_proj"])
    r = CheckpointReader(d / "t")
    b = r.block
    assert b["format_version"] == 1 and b["packing"] == "k4" and b["act_bits"] == 8 and b["scale"] == "tensor"
    assert b["source"]["format"] == "hf-safetensors"
    assert r.meta["model.layers.0.self_attn.q_proj.weight_packed"] == ("U8", (64, 16))
    assert r.meta["model.layers.0.self_attn.k_proj.weight_scale"] == ("F32", (1,))
    assert r.meta["model.layers.1.mlp.down_proj.weight"][0] == "F16"  # kept
    assert r.meta["lm_head.weight"][0] == "F16" and r.meta["model.embed_tokens.weight"][0] == "F16"
    assert "model.layers.1.mlp.down_proj" in b["kept_modules"]
    assert (d / "t" / "tokenizer.json").exists()
    conv = b["conversion"]
    assert conv["total_bytes_after"] < conv["total_bytes_before"]
    assert 0.3 < conv["relative_quantization_error"]["q_proj"] < 0.7  # absmean on Gaussian weights


@pytest.mark.parametrize("variant", ["tied_mqa_bin_fp32", "llama3_rope_fp16", "mistral"])
def test_llama_family_variants(tmp_path, variant):
    if variant == "tied_mqa_bin_fp32":
        hf = make_llama(tmp_path / "src", dtype=torch.float32, safetensors=False, tie_word_embeddings=True,
                        num_key_value_heads=1)
        assert list((tmp_path / "src").glob("pytorch_model*.bin"))
    elif variant == "llama3_rope_fp16":
        hf = make_llama(tmp_path / "src", dtype=torch.float16, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}, rope_theta=500000.0)
    else:
        hf = make_llama(tmp_path / "src", num_key_value_heads=4)
        cfg = json.loads((tmp_path / "src" / "config.json").read_text())
        cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=16, head_dim=16)
        (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
        from transformers import MistralForCausalLM

        hf = MistralForCausalLM.from_pretrained(str(tmp_path / "src"), dtype=torch.float32).eval()
    bitengine.convert(tmp_path / "src", tmp_path / "dst", weights="fp16", progress=False)
    model = bitengine.load(tmp_path / "dst", dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 40))  # longer than the sliding window / original context
    with torch.no_grad():
        assert rel(model(ids), hf(ids).logits) < 1e-3


def test_1bitllm_latent_llama(tmp_path):
    """1bitLLM-style checkpoints: Llama modules with latent weights, architectures ["BitnetForCausalLM"]."""
    hf = make_llama(tmp_path / "src", tokenizer=False)
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg.update(architectures=["BitnetForCausalLM"], weight_bits=1, input_bits=8)
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    bitengine.convert(tmp_path / "src", tmp_path / "dst", progress=False)
    model = bitengine.load(tmp_path / "dst", dtype=torch.float64, backend="reference")
    ref = ternary_reference(hf.double(), 8)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert rel(model(ids), ref(ids).logits) < 1e-3
