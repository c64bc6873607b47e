"""GGUFSource against transformers: small random Llama models written as GGUF with the `gguf` package.

The writer below does what llama.cpp's convert_hf_to_gguf.py does for Llama: q/k rows permuted,
norms in F32, linear and embedding weights in the requested type, a small byte-level BPE tokenizer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from bitengine.config import ModelConfig
from bitengine.formats import SourceError, open_source
from bitengine.formats.gguf import GGUFSource

gguf = pytest.importorskip("gguf")

Q = gguf.GGMLQuantizationType
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i s"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _byte_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def tiny_vocab() -> list[str]:
    return SPECIAL + _byte_tokens() + ["Ġt", "he", "Ġthe", "is"]


def random_llama(heads=4, kv_heads=2, tie=False, seed=0, layers=2):
    """A random LlamaForCausalLM (fp32) whose vocabulary is tiny_vocab()."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tiny_vocab()), hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64 // heads, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (rotary halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf: str) -> str:
    if hf in _NAMES:
        return _NAMES[hf]
    _, _, i, *rest = hf.split(".")
    return f"blk.{i}.{_LAYER['.'.join(rest[:-1])]}.weight"


def write_gguf(model, path, qtype=Q.F32, arch="llama", tensor_hook=None, meta_hook=None, tokenizer=True):
    """Write `model` as a llama.cpp-style GGUF file.

    tensor_hook(gguf_name, array) -> [(name, array), ...] lets a test rename, drop, add or corrupt tensors;
    meta_hook(writer) adds metadata.
    """
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c.vocab_size)
    if tokenizer:
        vocab = tiny_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(vocab)
        w.add_token_types([3 if t in SPECIAL else 1 for t in vocab])
        w.add_token_merges(MERGES)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
        w.add_add_bos_token(False)
        w.add_chat_template(TEMPLATE)
    if meta_hook:
        meta_hook(w)
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and c.tie_word_embeddings:
            continue
        arr = t.detach().float().numpy()
        if ".q_proj." in hf:
            arr = llama_cpp_permute(arr, c.num_attention_heads)
        elif ".k_proj." in hf:
            arr = llama_cpp_permute(arr, c.num_key_value_heads)
        for name, out in tensor_hook(gguf_name(hf), arr) if tensor_hook else [(gguf_name(hf), arr)]:
            if out.ndim == 1 or qtype == Q.F32:
                w.add_tensor(name, out.astype(np.float32))
            elif qtype == Q.F16:
                w.add_tensor(name, out.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(out, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_all(src) -> dict[str, torch.Tensor]:
    return dict(src.tensors())


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_f32_is_exact(tmp_path, heads, kv_heads):
    model = random_llama(heads=heads, kv_heads=kv_heads)
    src = GGUFSource(write_gguf(model, tmp_path / "m.gguf"))
    got = read_all(src)
    want = model.state_dict()
    assert src.tensor_names() == list(got) and set(got) == set(want)
    for name, t in got.items():
        assert t.dtype == torch.float32 and torch.equal(t, want[name]), name
    cfg = src.config
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (heads, kv_heads, 64 // heads)
    assert cfg["tie_word_embeddings"] is False and cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 10000.0
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    ModelConfig.from_hf(cfg, where=str(src.path))  # the engine accepts what the source describes


@pytest.mark.parametrize("qtype,max_rel", [(Q.F16, 1e-3), (Q.BF16, 1e-2), (Q.Q8_0, 1e-2), (Q.Q4_0, 0.2),
                                           (Q.Q4_1, 0.15)])
def test_quantized_matches_gguf_roundtrip(tmp_path, qtype, max_rel):
    """Each weight equals gguf's own quantize->dequantize of the unpermuted HF weight (blocks run along rows,
    so the q/k row permutation commutes with quantization), and stays within the type's error."""
    model = random_llama()
    got = read_all(GGUFSource(write_gguf(model, tmp_path / "m.gguf", qtype)))
    for name, w in model.state_dict().items():
        if w.ndim == 1:
            assert torch.equal(got[name], w), name
            continue
        arr = w.numpy()
        want = arr.astype(np.float16) if qtype == Q.F16 else gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype)
        assert torch.equal(got[name].float(), torch.from_numpy(np.asarray(want, dtype=np.float32))), name
        rel = ((got[name].float() - w).norm() / w.norm()).item()
        assert rel < max_rel, (name, rel)


def test_matches_transformers_gguf_loader(tmp_path):
    """transformers' own GGUF loader (an independent reader and un-permutation) gives the same weights."""
    model = random_llama(tie=True)
    path = write_gguf(model, tmp_path / "m.gguf", Q.Q8_0)
    src = GGUFSource(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    sd = hf.state_dict()
    assert src.config["tie_word_embeddings"] is True and "lm_head.weight" not in src.tensor_names()
    assert hf.config.tie_word_embeddings
    for name, t in src.tensors():
        assert torch.equal(t, sd[name]), name


def test_tokenizer_roundtrip(tmp_path):
    src = GGUFSource(write_gguf(random_llama(), tmp_path / "m.gguf"))
    src.save_tokenizer(tmp_path / "tok")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    ids = tok("the theis x").input_ids
    assert tok.convert_tokens_to_ids("Ġthe") in ids and tok.decode(ids) == "the theis x"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"
    GGUFSource(src.path).save_tokenizer(tmp_path / "again")  # served from the per-process cache
    for f in (tmp_path / "tok").iterdir():
        assert (tmp_path / "again" / f.name).read_bytes() == f.read_bytes()


def test_open_source_picks_gguf(tmp_path):
    path = write_gguf(random_llama(), tmp_path / "m.gguf")
    assert isinstance(open_source(path), GGUFSource) and isinstance(open_source(tmp_path), GGUFSource)


def test_llama3_rope_freqs(tmp_path):
    """llama.cpp stores Llama 3.1 rope scaling as a rope_freqs tensor; it comes back as config rope_scaling."""
    from bitengine.formats.gguf import _llama3_factors

    inv = 1.0 / (10000.0 ** (np.arange(0, 16, 2) / 16))  # head_dim 16: wavelengths 6 .. 19869, all 3 regions
    good = _llama3_factors(inv, 8.0, 1.0, 4.0, 8192).astype(np.float32)
    assert good.min() == 1.0 and good.max() == 8.0 and ((good > 1) & (good < 8)).any()
    model = random_llama()
    src = GGUFSource(write_gguf(model, tmp_path / "a.gguf", tensor_hook=_with_extra("rope_freqs.weight", good)))
    sc = src.config["rope_scaling"]
    assert sc == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in src.tensor_names() and len(read_all(src)) == len(model.state_dict())
    assert ModelConfig.from_hf(src.config).rope_scaling["factor"] == 8.0
    bad = np.full(8, 2.0, dtype=np.float32)
    with pytest.raises(SourceError, match="rope_freqs"):
        GGUFSource(write_gguf(model, tmp_path / "b.gguf", tensor_hook=_with_extra("rope_freqs.weight", bad)))


def _with_extra(name, value):
    """A tensor_hook that writes one more tensor after output_norm."""
    def hook(n, arr):
        return [(n, arr), (name, value)] if n == "output_norm.weight" else [(n, arr)]
    return hook


# ---- bad input: one line, naming the file (and the tensor or field) -------------------------------

def _one_line_error(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, msg


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    return write_gguf(random_llama(), tmp_path_factory.mktemp("g") / "m.gguf", Q.Q8_0)


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.99])
def test_truncated(tmp_path, good_gguf, keep):
    data = good_gguf.read_bytes()
    bad = tmp_path / "t.gguf"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(SourceError) as e:
        GGUFSource(bad)
    _one_line_error(e, bad)


def test_not_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(SourceError) as e:
        GGUFSource(bad)
    _one_line_error(e, bad, "not a readable GGUF")
    bad.write_bytes(b"")
    with pytest.raises(SourceError):
        GGUFSource(bad)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        GGUFSource(tmp_path / "nope.gguf")


def test_unsupported_architecture(tmp_path):
    path = write_gguf(random_llama(), tmp_path / "q.gguf", arch="qwen2")
    with pytest.raises(SourceError) as e:
        GGUFSource(path)
    _one_line_error(e, path, "qwen2", "llama")


def test_shape_mismatch(tmp_path):
    def hook(n, arr):
        return [(n, arr[:, :32] if n == "blk.1.ffn_up.weight" else arr)]
    path = write_gguf(random_llama(), tmp_path / "s.gguf", tensor_hook=hook)
    with pytest.raises(SourceError) as e:
        GGUFSource(path)
    _one_line_error(e, path, "blk.1.ffn_up.weight", "[96, 32]", "[96, 64]")


def test_missing_and_unknown_tensor(tmp_path):
    def drop(n, arr):
        return [] if n == "blk.0.attn_v.weight" else [(n, arr)]
    path = write_gguf(random_llama(), tmp_path / "m.gguf", tensor_hook=drop)
    with pytest.raises(SourceError) as e:
        GGUFSource(path)
    _one_line_error(e, path, "model.layers.0.self_attn.v_proj.weight")

    def extra(n, arr):
        return [(n.replace("blk.1.ffn_up", "blk.1.ffn_up_exps"), arr)]
    path = write_gguf(random_llama(), tmp_path / "u.gguf", tensor_hook=extra)
    with pytest.raises(SourceError) as e:
        GGUFSource(path)
    _one_line_error(e, path, "blk.1.ffn_up_exps.weight")


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # quantizing the NaN
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0])
def test_nan_weight(tmp_path, qtype):
    def hook(n, arr):
        if n == "blk.1.attn_output.weight":
            arr = arr.copy()
            arr[3, 5] = np.nan
        return [(n, arr)]
    path = write_gguf(random_llama(), tmp_path / "n.gguf", qtype, tensor_hook=hook)
    src = GGUFSource(path)
    with pytest.raises(SourceError) as e:
        read_all(src)
    _one_line_error(e, path, "blk.1.attn_output.weight", "NaN")


def test_unsupported_rope_scaling(tmp_path):
    def meta(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    path = write_gguf(random_llama(), tmp_path / "y.gguf", meta_hook=meta)
    with pytest.raises(SourceError) as e:
        GGUFSource(path)
    _one_line_error(e, path, "yarn")


def test_no_tokenizer(tmp_path):
    path = write_gguf(random_llama(), tmp_path / "n.gguf", tokenizer=False)
    src = GGUFSource(path)
    assert src.config["vocab_size"] == len(tiny_vocab())
    with pytest.raises(SourceError) as e:
        src.save_tokenizer(tmp_path / "tok")
    _one_line_error(e, path, "tokenizer")
