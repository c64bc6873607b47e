"""Write a bitengine checkpoint as a llama.cpp GGUF file with ternary TQ2_0 / TQ1_0 weights.

Ternary linear weights are re-encoded from the packed codes, with no float round trip
(ggml-common.h, blocks of QK_K = 256 weights along a row):
    TQ2_0  qs[64] + fp16 d = 66 bytes (2.0625 bits/weight): weight g*128 + i*32 + j of a block sits
           in bits 2i..2i+1 of qs[g*32 + j] as code q + 1 -- the same code bitengine stores.
    TQ1_0  qs[48] + qh[4] + fp16 d = 54 bytes (1.6875 bits/weight): codes in base 3, five per byte
           (four in qh), each byte stored as ceil(v * 256 / 243) so a multiply-shift reads a trit.
    Both: w = d * q (d multiplies). bitengine's scale multiplies too, so each block's d is the scale
    that covers it: the tensor scale, the row's channel scale, or the group scale when the group is a
    multiple of 256 (d is fp16 in the file: a relative rounding of at most 2^-11).
Tensors whose rows are not a multiple of 256 (or whose groups split a block) are dequantized and
written as Q8_0 (rows a multiple of 32) or F16, and reported. Embeddings and the head are F16,
norms F32; attn_q / attn_k rows are permuted into llama.cpp's rotary layout (inverse of
formats/gguf.py's reverse_permute). The tokenizer must be a byte-level BPE ("gpt2" in llama.cpp).

Not here: the BitNet architecture (sub-norms, relu2) or SentencePiece tokenizers (rejected).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..quant import dequantize, unpack_codes
from .checkpoint import CheckpointReader
from .gguf import _GLOBAL_NAMES, _LAYER_NAMES

QK_K = 256
TQ2_0_BYTES, TQ1_0_BYTES = 66, 54
_HF_TO_GGUF = {v.removesuffix(".weight"): k for k, v in _GLOBAL_NAMES.items()}
_HF_LAYER_TO_GGUF = {v.removesuffix(".weight"): k for k, v in _LAYER_NAMES.items()}
_LLAMA3_PRE = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


def encode_tq2_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """codes uint8 [N, K] in {0,1,2} (w + 1), d float [N, K/256] -> TQ2_0 bytes uint8 [N, K/256 * 66]."""
    n, k = codes.shape
    q = codes.reshape(n, k // QK_K, 2, 4, 32).astype(np.uint8)  # (N, blocks, half, shift, j)
    qs = q[:, :, :, 0] | (q[:, :, :, 1] << 2) | (q[:, :, :, 2] << 4) | (q[:, :, :, 3] << 6)  # (N, blocks, 2, 32)
    dh = d.astype(np.float16).reshape(n, -1, 1).view(np.uint8)  # (N, blocks, 2)
    out = np.concatenate([qs.reshape(n, -1, 64), dh], axis=-1)
    assert out.shape[-1] == TQ2_0_BYTES
    return out.reshape(n, -1)


def encode_tq1_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """codes uint8 [N, K] in {0,1,2}, d float [N, K/256] -> TQ1_0 bytes uint8 [N, K/256 * 54]."""
    n, k = codes.shape
    c = codes.reshape(n * (k // QK_K), QK_K).astype(np.uint16)
    pow5 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)
    qs0 = (c[:, :160].reshape(-1, 5, 32) * pow5[None, :, None]).sum(1)  # 32 bytes: trit n of byte j = code[n*32 + j]
    qs1 = (c[:, 160:240].reshape(-1, 5, 16) * pow5[None, :, None]).sum(1)  # 16 bytes
    qh = (c[:, 240:].reshape(-1, 4, 4) * pow5[None, :4, None]).sum(1)  # 4 bytes, 4 trits each
    v = np.concatenate([qs0, qs1, qh], axis=-1)
    q = ((v * 256 + 242) // 243).astype(np.uint8)  # ceil(v * 256 / 243)
    dh = d.astype(np.float16).reshape(-1, 1).view(np.uint8)
    out = np.concatenate([q, dh], axis=-1)
    assert out.shape[-1] == TQ1_0_BYTES
    return out.reshape(n, -1)


def block_scales(scale: torch.Tensor, n: int, k: int) -> np.ndarray | None:
    """Each 256-block's d (float32 [N, K/256]) for a bitengine scale, or None if a block has several scales."""
    s = scale.float()
    if s.numel() == 1 or s.dim() == 1:
        return s.reshape(-1, 1).expand(n, k // QK_K).numpy().copy()
    group = k // s.shape[1]
    if group % QK_K:
        return None
    return s.repeat_interleave(group // QK_K, dim=1).numpy()


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation (rotate-half pairs -> interleaved pairs) on rows; works on [N, ...] and [N]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    module, _, kind = hf.rpartition(".")
    if module in _HF_TO_GGUF:
        return f"{_HF_TO_GGUF[module]}.{kind}"
    _, _, i, rest = module.split(".", 3)
    return f"blk.{i}.{_HF_LAYER_TO_GGUF[rest]}.{kind}"


def export_gguf(checkpoint_dir, out_path, type: str = "tq2_0", force: bool = False, log=print) -> dict:  # noqa: A002
    """Write the bitengine checkpoint at `checkpoint_dir` to `out_path` as a llama GGUF (atomically).

    type: "tq2_0" or "tq1_0" for the ternary weights; force: overwrite an existing file.
    Returns {gguf tensor name: type name}. Raises ValueError / FileExistsError (one line) before
    writing anything for what llama.cpp could not run.
    """
    import gguf

    qtype = {"tq2_0": gguf.GGMLQuantizationType.TQ2_0, "tq1_0": gguf.GGMLQuantizationType.TQ1_0}.get(type)
    if qtype is None:
        raise ValueError(f"--type must be tq2_0 or tq1_0, got {type!r}")
    reader = CheckpointReader(checkpoint_dir)
    cfg = ModelConfig.from_hf(reader.config, str(reader.path / "config.json"))
    if cfg.arch != "llama" or cfg.linear_input_norm or cfg.sliding_window or cfg.hidden_act != "silu":
        raise ValueError(f"{reader.path}: GGUF export supports the Llama architecture only "
                         f"(arch {cfg.arch}, act {cfg.hidden_act}, sliding_window {cfg.sliding_window})")
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise FileExistsError(f"{out_path}: already exists (use --force to overwrite)")
    tmp = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), "llama")
    try:
        _write_metadata(w, gguf, cfg, reader, qtype)
        types = _write_tensors(w, gguf, cfg, reader, qtype, log)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    log(f"wrote {out_path} ({out_path.stat().st_size / 1e6:.1f} MB): "
        + ", ".join(f"{n} x {t}" for t, n in sorted(counts.items())))
    return types


def _write_metadata(w, gguf, cfg: ModelConfig, reader: CheckpointReader, qtype) -> None:
    w.add_name(reader.path.name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0 if qtype == gguf.GGMLQuantizationType.TQ2_0
                    else gguf.LlamaFileType.MOSTLY_TQ1_0)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    _write_tokenizer(w, gguf, cfg, reader.path)


def _write_tokenizer(w, gguf, cfg: ModelConfig, path: Path) -> None:
    """Byte-level BPE vocabulary ("gpt2"), merges, special ids and chat template from the HF tokenizer files."""
    tj = path / "tokenizer.json"
    if not tj.exists():
        raise ValueError(f"{path}: no tokenizer.json; GGUF export needs a byte-level BPE tokenizer")
    spec = json.loads(tj.read_text())
    if spec.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ValueError(f"{tj}: only byte-level BPE tokenizers can be exported (llama.cpp 'gpt2' model)")
    vocab = dict(spec["model"]["vocab"])
    special = set()
    for t in spec.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        if t.get("special"):
            special.add(t["id"])
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.USER_DEFINED if i not in by_id or by_id[i] not in spec["model"]["vocab"] else
                     gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe" if any(_LLAMA3_PRE in r for r in _strings(spec.get("pre_tokenizer"))) else "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(path, load_merges=True, n_vocab=cfg.vocab_size).add_to_gguf(w)


def _strings(node) -> list[str]:
    """Every string inside a parsed JSON value (the pre-tokenizer's split regexes, among others)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        node = list(node.values())
    return [s for v in node for s in _strings(v)] if isinstance(node, list) else []


def _write_tensors(w, gguf, cfg: ModelConfig, reader: CheckpointReader, qtype, log) -> dict[str, str]:
    Q = gguf.GGMLQuantizationType
    encode = encode_tq2_0 if qtype == Q.TQ2_0 else encode_tq1_0
    types, fallback = {}, []
    heads = {"self_attn.q_proj": cfg.num_heads, "self_attn.k_proj": cfg.num_kv_heads}
    for name in sorted(reader.index):
        module, _, kind = name.rpartition(".")
        n_head = next((h for m, h in heads.items() if module.endswith(m)), None)
        if kind == "weight_scale":
            continue
        if kind == "weight_packed":
            packed, scale = reader.tensor(name), reader.tensor(f"{module}.weight_scale")
            n = packed.shape[0]
            k = _in_features(cfg, module)
            d = block_scales(scale, n, k) if k % QK_K == 0 else None
            gname = _gguf_name(f"{module}.weight")
            if d is None:
                arr = dequantize(unpack_codes(packed, k).to(torch.int8) - 1, scale).numpy()
                arr = permute_rows(arr, n_head) if n_head else arr
                t = Q.Q8_0 if k % 32 == 0 else Q.F16
                w.add_tensor(gname, gguf.quants.quantize(arr, t) if t == Q.Q8_0 else arr.astype(np.float16),
                             raw_dtype=t if t == Q.Q8_0 else None)
                fallback.append(f"{gname} [{n}x{k}] as {t.name}")
            else:
                codes = unpack_codes(packed, k).numpy()
                if n_head:
                    codes, d = permute_rows(codes, n_head), permute_rows(d, n_head)
                w.add_tensor(gname, encode(codes, d), raw_dtype=qtype)
                t = qtype
            types[gname] = t.name
            continue
        arr = reader.tensor(name).float().numpy()
        if n_head:
            arr = permute_rows(arr, n_head)
        gname = _gguf_name(name)
        if arr.ndim == 1:  # norms, biases
            w.add_tensor(gname, arr.astype(np.float32))
            types[gname] = "F32"
        else:
            w.add_tensor(gname, arr.astype(np.float16))
            types[gname] = "F16"
    if fallback:
        log(f"rows not a multiple of {QK_K}: {len(fallback)} ternary tensor(s) written as Q8_0/F16: "
            + "; ".join(fallback[:4]) + (" ..." if len(fallback) > 4 else ""))
    if cfg.rope_scaling:
        from ..model import rope_inv_freq

        plain = ModelConfig(**{**cfg.__dict__, "rope_scaling": None})
        factors = (rope_inv_freq(plain) / rope_inv_freq(cfg)).numpy().astype(np.float32)
        w.add_tensor("rope_freqs.weight", factors)
        types["rope_freqs.weight"] = "F32"
    return types


def _in_features(cfg: ModelConfig, module: str) -> int:
    if module.endswith("o_proj"):
        return cfg.num_heads * cfg.head_dim
    if module.endswith("down_proj"):
        return cfg.intermediate_size
    return cfg.hidden_size
