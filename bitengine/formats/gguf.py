"""Read Llama-architecture GGUF files (llama.cpp's format) as a bitengine source.

Tensors are dequantized to float with the `gguf` package (`gguf.quants.dequantize`: F32, F16, BF16,
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, the IQ types, TQ1_0/TQ2_0), one tensor at a time from
the memory-mapped file, and renamed to Hugging Face parameter names. llama.cpp's converter permutes
the rows of attn_q / attn_k (rotary pairs interleaved instead of split in halves); that is undone
here exactly as transformers' `LlamaTensorProcessor._reverse_permute_weights` does.

Not here: writing GGUF, non-llama architectures (rejected), or keeping llama.cpp's ternary types
(TQ1_0/TQ2_0 have one scale per 256 weights, not per tensor, so they are dequantized like the rest).
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

import numpy as np
import torch

from . import SourceError

# GGUF tensor name (without ".weight") -> HF parameter name; {i} is the layer index.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens.weight",
    "output_norm": "model.norm.weight",
    "output": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
    "attn_norm": "input_layernorm.weight",
    "ffn_norm": "post_attention_layernorm.weight",
}
# What the gguf reader raises on bad bytes (bad magic, truncation -> numpy reshape, bad enum, bad UTF-8).
_READ_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, OSError)
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
# Llama 3.1 / 3.2 rope scaling constants; GGUF stores only the resulting per-frequency factors.
_LLAMA3_LOW, _LLAMA3_HIGH, _LLAMA3_CTX = 1.0, 4.0, 8192


def _fast_reader_class():
    """gguf.GGUFReader, slicing a plain ndarray view of its memmap instead of the memmap itself.

    The stock reader slices the np.memmap once per metadata value; the memmap subclass's per-slice
    overhead dominates parsing a vocabulary (SmolLM2's 98k tokenizer strings: ~6 s -> ~1.2 s). Same
    bytes, same fields and tensors; only `_get` is replaced.
    """
    import gguf

    class FastGGUFReader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            count = int(count)
            arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return FastGGUFReader


@contextlib.contextmanager
def _fast_reader_in_transformers():
    """transformers' GGUF tokenizer loading calls `from gguf import GGUFReader` (twice per load): serve the fast one."""
    import gguf

    original = gguf.GGUFReader
    gguf.GGUFReader = _fast_reader_class()
    try:
        yield
    finally:
        gguf.GGUFReader = original


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: (n_head, 2, hd/2, ...) stored as (n_head, hd/2, 2, ...).

    `w` is [n_head * head_dim, ...] (a weight or a bias); pass num_kv_heads for attn_k.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class GGUFSource:
    """A Llama GGUF file as a source for `bitengine convert` (interface: bitengine.formats)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        try:
            import gguf  # noqa: F401 -- an optional dependency: say so before anything else
        except ImportError:
            raise SourceError(f"{self.path}: reading GGUF needs the gguf package (pip install gguf)") from None
        try:
            self._reader = _fast_reader_class()(self.path)
        except _READ_ERRORS as e:
            raise SourceError(f"{self.path}: not a readable GGUF file, truncated or corrupt ({_one_line(e)})") from None
        arch = self._field("general.architecture")
        if arch != "llama":
            raise SourceError(f"{self.path}: unsupported GGUF architecture {arch!r} (supported: llama)")
        self._check_extent()
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.config = self._build_config()
        self._plan = self._plan_tensors()  # [(hf_name, ReaderTensor, expected torch shape)]
        types = sorted({t.tensor_type.name for t in self._reader.tensors})
        self.bytes_total = int(sum(int(t.n_bytes) for t in self._reader.tensors))
        self.description = {"format": "gguf", "path": str(self.path), "tensor_types": types,
                            "name": self._field("general.name")}

    # ---- metadata -------------------------------------------------------------------------
    def _field(self, key: str, default=None):
        f = self._reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except _READ_ERRORS as e:
            raise SourceError(f"{self.path}: unreadable metadata field {key!r} ({_one_line(e)})") from None

    def _need_int(self, key: str) -> int:
        v = self._field(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise SourceError(f"{self.path}: metadata field {key!r} missing or not a positive integer (got {v!r})")
        return v

    def _check_extent(self) -> None:
        size = self.path.stat().st_size
        for t in self._reader.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise SourceError(f"{self.path}: tensor {t.name} extends past the end of the file "
                                  f"({int(t.data_offset) + int(t.n_bytes)} > {size} bytes): file truncated?")

    def _build_config(self) -> dict:
        hidden = self._need_int("llama.embedding_length")
        heads = self._need_int("llama.attention.head_count")
        kv = self._field("llama.attention.head_count_kv", heads)
        if not isinstance(kv, int) or kv <= 0 or heads % kv:
            raise SourceError(f"{self.path}: llama.attention.head_count_kv {kv!r} must be a positive divisor "
                              f"of head_count {heads} (per-layer head counts are not supported)")
        head_dim = self._field("llama.attention.key_length", hidden // heads)
        for key in ("llama.attention.value_length", "llama.rope.dimension_count"):
            v = self._field(key, head_dim)
            if v != head_dim:
                raise SourceError(f"{self.path}: {key} {v} differs from head_dim {head_dim} (not supported)")
        emb = self._tensors.get("token_embd.weight")
        vocab = self._field("llama.vocab_size") or (int(emb.shape[1]) if emb is not None else None)
        if vocab is None:
            tokens = self._reader.fields.get("tokenizer.ggml.tokens")
            vocab = len(tokens.data) if tokens is not None else None
        if not vocab:
            raise SourceError(f"{self.path}: cannot tell the vocabulary size (no llama.vocab_size, no token_embd)")
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": self._need_int("llama.feed_forward_length"),
            "num_hidden_layers": self._need_int("llama.block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": head_dim,
            # float32 in the file: print 1e-05, not 9.999999747378752e-06
            "rms_norm_eps": float(str(np.float32(self._field("llama.attention.layer_norm_rms_epsilon", 1e-5)))),
            "rope_theta": float(str(np.float32(self._field("llama.rope.freq_base", 10000.0)))),
            "max_position_embeddings": int(self._field("llama.context_length", 4096)),
            "vocab_size": int(vocab),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "hidden_act": "silu",
            "torch_dtype": self._dtype_name(),
        }
        for key, hf in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
            v = self._field(f"tokenizer.ggml.{key}_token_id")
            if v is not None:
                cfg[hf] = int(v)
        scaling = self._rope_scaling(head_dim, cfg["rope_theta"])
        if scaling:
            cfg["rope_scaling"] = scaling
        return cfg

    def _dtype_name(self) -> str:
        kinds = {t.tensor_type.name for t in self._reader.tensors if len(t.shape) > 1}
        return {frozenset({"F16"}): "float16", frozenset({"BF16"}): "bfloat16"}.get(frozenset(kinds), "float32")

    def _rope_scaling(self, head_dim: int, theta: float) -> dict | None:
        """None, or llama3 scaling recovered from the rope_freqs tensor (checked against the llama3 formula)."""
        kind = self._field("llama.rope.scaling.type", "none")
        if kind not in ("none", None):
            raise SourceError(f"{self.path}: unsupported rope scaling {kind!r} (supported: none, llama3 rope_freqs)")
        t = self._tensors.get("rope_freqs.weight")
        if t is None:
            return None
        import gguf

        got = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
        factor = float(got.max())
        inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2) / head_dim))
        want = _llama3_factors(inv_freq, factor, _LLAMA3_LOW, _LLAMA3_HIGH, _LLAMA3_CTX)
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4):
            raise SourceError(f"{self.path}: tensor rope_freqs.weight does not match llama3 rope scaling "
                              f"(factor {factor}, low 1, high 4, context 8192): not supported")
        return {"rope_type": "llama3", "factor": factor, "low_freq_factor": _LLAMA3_LOW,
                "high_freq_factor": _LLAMA3_HIGH, "original_max_position_embeddings": _LLAMA3_CTX}

    # ---- tensors --------------------------------------------------------------------------
    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
        q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
        shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
        if not c["tie_word_embeddings"]:
            shapes["lm_head.weight"] = (v, h)
        per_layer = {"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                     "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                     "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
                     "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
        for n in range(c["num_hidden_layers"]):
            shapes.update({f"model.layers.{n}.{k}": s for k, s in per_layer.items()})
        return shapes

    def _hf_name(self, name: str) -> str | None:
        if name == "rope_freqs.weight":
            return None  # folded into config["rope_scaling"]
        if name.endswith(".weight") and name[: -len(".weight")] in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[name[: -len(".weight")]]
        m = _LAYER_RE.fullmatch(name)
        if m and m.group(2) in _LAYER_NAMES:
            return f"model.layers.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}"
        raise SourceError(f"{self.path}: tensor {name}: not a Llama parameter bitengine knows")

    def _plan_tensors(self) -> list:
        import gguf

        expected = self._expected_shapes()
        plan = []
        for t in self._reader.tensors:
            hf = self._hf_name(t.name)
            if hf is None:
                continue
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists the fastest dim first
            if hf not in expected:
                raise SourceError(f"{self.path}: tensor {t.name}: unexpected for this config (layer out of range?)")
            if shape != expected[hf]:
                raise SourceError(f"{self.path}: tensor {t.name}: shape {list(shape)}, expected {list(expected[hf])}")
            if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) \
                    and t.tensor_type not in gguf.quants._type_traits:
                raise SourceError(f"{self.path}: tensor {t.name}: type {t.tensor_type.name} cannot be dequantized "
                                  f"by gguf {getattr(gguf, '__version__', '')}".rstrip())
            plan.append((hf, t, expected[hf]))
        missing = sorted(set(expected) - {hf for hf, _, _ in plan})
        if missing:
            raise SourceError(f"{self.path}: missing tensor for {missing[0]}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return plan

    def tensor_names(self) -> list[str]:
        return [hf for hf, _, _ in self._plan]

    def tensors(self):
        """Yield (hf_name, float tensor) one at a time: F16 stays float16, BF16 bfloat16, the rest float32."""
        import gguf

        c = self.config
        for hf, t, shape in self._plan:
            try:
                if t.tensor_type == gguf.GGMLQuantizationType.F16:
                    arr = np.array(t.data, dtype=np.float16)
                elif t.tensor_type == gguf.GGMLQuantizationType.F32:
                    arr = np.array(t.data, dtype=np.float32)
                else:
                    arr = gguf.quants.dequantize(t.data, t.tensor_type)
                arr = arr.reshape(shape)
            except (*_READ_ERRORS, NotImplementedError) as e:
                raise SourceError(f"{self.path}: tensor {t.name}: cannot dequantize {t.tensor_type.name} "
                                  f"({_one_line(e)})") from None
            if hf.endswith("q_proj.weight"):
                arr = reverse_permute(arr, c["num_attention_heads"])
            elif hf.endswith("k_proj.weight"):
                arr = reverse_permute(arr, c["num_key_value_heads"])
            value = torch.from_numpy(np.ascontiguousarray(arr))
            if t.tensor_type == gguf.GGMLQuantizationType.BF16:
                value = value.to(torch.bfloat16)  # exact: BF16 dequantizes to float32 by a 16-bit shift
            # A float32 sum is ~20x faster than isfinite().all(); only if it is not finite look element-wise.
            if not bool(torch.isfinite(value.sum(dtype=torch.float32))) and not bool(torch.isfinite(value).all()):
                raise SourceError(f"{self.path}: tensor {t.name}: contains NaN or Inf")
            yield hf, value

    # ---- tokenizer ------------------------------------------------------------------------
    def save_tokenizer(self, dst_dir: str | Path) -> None:
        """Write HF tokenizer files (tokenizer.json, tokenizer_config.json, chat template) from the GGUF metadata.

        transformers builds the tokenizer; its special tokens are then reset from the GGUF ids,
        because transformers 5.x maps eos to the bos token for SmolLM2-style files. The files are
        kept in memory per (file, size, mtime), so converting one GGUF twice in a process (fp16 and
        ternary) builds the tokenizer once.
        """
        st = self.path.stat()
        key = (str(self.path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _TOKENIZER_FILES:
            _TOKENIZER_FILES.clear()  # one entry is enough for the fp16 + ternary pattern
            _TOKENIZER_FILES[key] = self._build_tokenizer_files()
        dst_dir = Path(dst_dir)
        dst_dir.mkdir(parents=True, exist_ok=True)
        for name, data in _TOKENIZER_FILES[key].items():
            (dst_dir / name).write_bytes(data)

    def _build_tokenizer_files(self) -> dict[str, bytes]:
        import tempfile

        if self._field("tokenizer.ggml.model") is None:
            raise SourceError(f"{self.path}: no tokenizer in the GGUF metadata (tokenizer.ggml.model missing)")
        try:
            from transformers import AutoTokenizer

            with _fast_reader_in_transformers():
                tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except Exception as e:  # noqa: BLE001 -- transformers' converters raise many types; report any in one line
            raise SourceError(f"{self.path}: cannot build a tokenizer from the GGUF metadata ({_one_line(e)})") from None
        tokens = self._reader.fields["tokenizer.ggml.tokens"]
        for key, attr in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token"), ("unknown", "unk_token")):
            idx = self._field(f"tokenizer.ggml.{key}_token_id")
            if idx is not None and 0 <= idx < len(tokens.data):
                setattr(tok, attr, tokens.contents(int(idx)))
        template = self._field("tokenizer.chat_template")
        if template and not getattr(tok, "chat_template", None):
            tok.chat_template = template
        with tempfile.TemporaryDirectory() as tmp:
            tok.save_pretrained(tmp)
            return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


_TOKENIZER_FILES: dict[tuple, dict[str, bytes]] = {}


def _llama3_factors(inv_freq: np.ndarray, factor: float, low: float, high: float, old_ctx: int) -> np.ndarray:
    """llama.cpp's rope_freqs for llama3 scaling: the divisor of each rotary frequency (convert_hf_to_gguf.py)."""
    out = []
    for f in inv_freq:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out)
