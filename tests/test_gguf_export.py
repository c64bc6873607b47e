"""GGUF export: TQ2_0 / TQ1_0 encoders against gguf.quants (the oracle), the file read back by
bitengine's GGUF source, and llama.cpp (llama-cpp-python) running it next to bitengine.

llama.cpp quantizes activations per 256-block (Q8_K) and keeps its KV cache in fp16, bitengine per
token (A8) in fp32, so the two differ by rounding; a random model is chaotic, so agreement is
measured teacher-forced (both predict the next token of bitengine's greedy sequence) over 32 steps.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from serving_fixtures import bitengine_checkpoint

import bitengine
from bitengine.formats.gguf import GGUFSource
from bitengine.formats.gguf_export import block_scales, encode_tq1_0, encode_tq2_0, export_gguf
from bitengine.quant import absmean_quantize, dequantize

Q = gguf.GGMLQuantizationType
PROMPTS = ["the cat is on it", "we be up to it", "an apple", "hello world of the"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return bitengine_checkpoint(tmp_path_factory.mktemp("gguf"), hidden=256, intermediate=512, heads=4,
                                kv_heads=2, layers=2)


@pytest.mark.parametrize("encode,qtype", [(encode_tq2_0, Q.TQ2_0), (encode_tq1_0, Q.TQ1_0)])
@pytest.mark.parametrize("scale", ["tensor", "channel", "group:256", "group:512"])
def test_encoders_match_gguf_quants(encode, qtype, scale):
    """Bytes equal gguf's reference quantizer run on the dequantized weight (d = each block's absmax = its scale)."""
    torch.manual_seed(0)
    n, k = 6, 1024
    kind, g = (scale.split(":")[0], int(scale.split(":")[1])) if ":" in scale else (scale, 0)
    w_q, s = absmean_quantize(torch.randn(n, k), kind, g)
    w = dequantize(w_q, s).numpy()
    d = block_scales(s, n, k)
    ours = encode((w_q + 1).to(torch.uint8).numpy(), d)
    want = gguf.quants.quantize(w, qtype)
    assert ours.shape == want.shape and np.array_equal(ours, want)
    back = gguf.quants.dequantize(ours, qtype)
    assert np.allclose(back, w, rtol=1e-3, atol=0)  # fp16 d: relative rounding <= 2^-11


def test_block_scales_refuse_split_blocks():
    assert block_scales(torch.ones(4, 2), 4, 256) is None  # groups of 128 split a 256-block


def test_file_reads_back_as_the_same_model(ckpt, tmp_path):
    """bitengine's GGUF reader (which un-permutes q/k) gets the checkpoint's weights back."""
    out = tmp_path / "m.gguf"
    types = export_gguf(ckpt, out, type="tq2_0", log=lambda *a: None)
    assert types["blk.0.attn_q.weight"] == "TQ2_0" and types["token_embd.weight"] == "F16"
    assert types["blk.1.ffn_norm.weight"] == "F32"
    model = bitengine.load(ckpt, backend="reference")
    src = dict(GGUFSource(out).tensors())
    for name, mod in model.named_modules():
        if isinstance(mod, bitengine.nn.BitLinear):
            want = dequantize(bitengine.quant.unpack_ternary(mod.weight_packed, mod.in_features), mod.weight_scale)
            assert torch.allclose(src[f"{name}.weight"].float(), want, rtol=1e-3, atol=0), name
    assert torch.equal(src["model.embed_tokens.weight"].float(), model.model.embed_tokens.weight)
    r = gguf.GGUFReader(out)
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_TQ2_0
    assert len(r.fields["tokenizer.ggml.merges"].contents()) > 10
    assert "im_start" in r.fields["tokenizer.chat_template"].contents()


def test_rows_not_multiple_of_256_fall_back(tmp_path):
    small = bitengine_checkpoint(tmp_path, hidden=64, intermediate=96, layers=1)
    lines = []
    types = export_gguf(small, tmp_path / "s.gguf", type="tq1_0", log=lines.append)
    assert types["blk.0.attn_q.weight"] == "Q8_0" and "TQ1_0" not in types.values()
    assert any("not a multiple of 256" in line and "Q8_0" in line for line in lines)


def test_bad_type_rejected(ckpt, tmp_path):
    with pytest.raises(ValueError, match="tq2_0 or tq1_0"):
        export_gguf(ckpt, tmp_path / "x.gguf", type="q4_0")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
def test_llama_cpp_agrees_with_bitengine(ckpt, tmp_path, qtype):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install llama-cpp-python)")
    out = tmp_path / f"m-{qtype}.gguf"
    export_gguf(ckpt, out, type=qtype, log=lambda *a: None)
    model = bitengine.load(ckpt)  # W1.58A8, the CPU kernels
    llm = llama_cpp.Llama(str(out), n_ctx=128, n_threads=2, verbose=False, logits_all=True)
    agree = []
    for prompt in PROMPTS:
        ids = model.tokenizer(prompt)["input_ids"]
        ref = model.generate(input_ids=ids, max_new_tokens=32, ignore_eos=True)
        llm.reset()
        llm.eval(ids + ref)
        pred = np.asarray(llm.scores[len(ids) - 1: len(ids) + 31]).argmax(-1)
        agree.append(float((pred == np.asarray(ref)).mean()))
        assert pred[0] == ref[0], prompt  # the first token (no history of rounding yet) agrees
    print(f"{qtype}: llama.cpp agrees with bitengine on {agree} of 32 teacher-forced steps")
    assert np.mean(agree) >= 0.9 and min(agree) >= 0.8, agree


def test_llama3_pretokenizer_detected(ckpt, tmp_path):
    """A Llama-3 style split regex in tokenizer.json becomes tokenizer.ggml.pre = llama-bpe (else 'default')."""
    import json
    import shutil

    from bitengine.formats.gguf_export import _LLAMA3_PRE

    copy = tmp_path / "ck"
    shutil.copytree(ckpt, copy)
    spec = json.loads((copy / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_PRE + r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+"}, "behavior": "Isolated",
         "invert": False}, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (copy / "tokenizer.json").write_text(json.dumps(spec))
    for folder, want in ((ckpt, "default"), (copy, "llama-bpe")):
        out = tmp_path / f"{want}.gguf"
        export_gguf(folder, out, log=lambda *a: None)
        assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == want
