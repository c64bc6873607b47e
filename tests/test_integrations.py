"""transformers drop-in (integrations.transformers.to_bitengine) and torch.compile of the bitengine model.

The drop-in must compute what bitengine computes: transformers' generate() on the converted model
gives bitengine.generate()'s greedy tokens for the same checkpoint.
"""

from __future__ import annotations

import os

import pytest
import torch
from serving_fixtures import bitengine_checkpoint

import bitengine
from bitengine.integrations.transformers import to_bitengine
from bitengine.nn import BitLinear

transformers = pytest.importorskip("transformers")
PROMPTS = ["the cat is", "we be up to it"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("integ")
    bitengine_checkpoint(r)
    return r


def _hf(root):
    return transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_transformers_generate_matches_bitengine(root, backend):
    if backend == "cpu" and bitengine.backends.availability("cpu")["cpu"]:
        pytest.skip("cpu kernels not built")
    hf = to_bitengine(_hf(root), checkpoint=root / "be", backend=backend)
    n_bit = sum(isinstance(m, BitLinear) for m in hf.modules())
    assert n_bit == 2 * 7 and not any(isinstance(m, torch.nn.Linear) for m in hf.model.layers.modules())
    ref = bitengine.load(root / "be", backend=backend)
    tok = ref.tokenizer
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = hf.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert out == ref.generate(input_ids=ids[0].tolist(), max_new_tokens=20), prompt


def test_pipeline_runs_on_bitengine_kernels(root):
    hf = to_bitengine(_hf(root), checkpoint=root / "be")
    ref = bitengine.load(root / "be")
    pipe = transformers.pipeline("text-generation", model=hf, tokenizer=ref.tokenizer)
    out = pipe("the cat is", max_new_tokens=12, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert out == ref.generate("the cat is", max_new_tokens=12)


@pytest.mark.parametrize("scale", ["tensor", "channel"])
def test_own_weights_quantized_like_convert(root, scale):
    """From the model's own weights: the same codes and scales `bitengine convert` writes (absmean in fp32)."""
    hf = to_bitengine(_hf(root), scale=scale, act_bits=16)
    out = root / f"be-{scale}"
    if not out.exists():
        bitengine.convert(root / "hf", out, scale=scale, act_bits=16, progress=False)
    reader = bitengine.formats.checkpoint.CheckpointReader(out)
    for name, m in hf.named_modules():
        if isinstance(m, BitLinear):
            assert m.act_bits == 16
            assert torch.equal(m.weight_packed, reader.tensor(f"{name}.weight_packed")), name
            assert torch.equal(m.weight_scale, reader.tensor(f"{name}.weight_scale")), name
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(hf(ids).logits).all()


def test_rejects_what_it_cannot_convert(root):
    with pytest.raises(ValueError, match="weights must be"):
        to_bitengine(_hf(root), weights="fp16")
    with pytest.raises(ValueError, match="decoder layers"):
        to_bitengine(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="does not match"):
        to_bitengine(other, checkpoint=root / "be")


def _compile_check(model, compiler: str):
    """Prefill into a cache, then a continuous-batching decode step (per-row slots (B, 1)): compiled == eager."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    ids = torch.tensor([[5, 60, 7, 80, 9], [3, 4, 200, 6, 1]])
    pos = torch.arange(5)
    with torch.inference_mode():
        c_eager, c_comp = model.new_cache(batch=2, max_seq=16), model.new_cache(batch=2, max_seq=16)
        want = model(ids, cache=c_eager, input_pos=pos, kv_len=5)
        assert torch.allclose(compiled(ids, cache=c_comp, input_pos=pos, kv_len=5), want, atol=1e-4, rtol=1e-4)
        nxt, slots = torch.tensor([[11], [12]]), torch.tensor([[5], [3]])  # row 1 rewrites its slot 3
        kw = {"input_pos": slots, "position_ids": slots}
        want = model(nxt, cache=c_eager, **kw)
        assert torch.allclose(compiled(nxt, cache=c_comp, **kw), want, atol=1e-4, rtol=1e-4)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(c_comp.k, c_eager.k))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_torch_compile_fullgraph_traces_whole_model(root, backend):
    """fullgraph=True: dynamo captures the whole forward (no graph breaks) through the backend's ops."""
    if backend == "cpu" and bitengine.backends.availability("cpu")["cpu"]:
        pytest.skip("cpu kernels not built")
    _compile_check(bitengine.load(root / "be", backend=backend), "aot_eager")


@pytest.mark.skipif(not os.environ.get("BITENGINE_TEST_INDUCTOR"),
                    reason="inductor's C++ codegen takes ~1-2 min per graph on 2 cores; set BITENGINE_TEST_INDUCTOR=1")
def test_torch_compile_inductor_matches_eager(root):
    _compile_check(bitengine.load(root / "be", backend="reference"), "inductor")
