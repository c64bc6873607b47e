"""Perplexity and speed measurements for `bitengine eval`, the demo and the tests.

Works for any causal LM whose `model(input_ids)` returns logits (B, T, V), or an object with
`.logits` (a transformers model), or a plain callable doing either. Not a benchmark harness: the
kernel benchmarks live in bench/.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import io
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def zen_of_python() -> str:
    """The Zen of Python (PEP 20), the text of the standard library's `this` module, ROT13-decoded.

    It ships with every Python 3 install and has not changed since Python 2.2, so perplexities on it
    are comparable across machines; with SmolLM2's tokenizer it is 203 tokens.
    """
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the text
        import this
    return codecs.decode(this.s, "rot13")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    out = getattr(out, "logits", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != ids.shape:
        raise ValueError(f"model(input_ids {tuple(ids.shape)}) must return logits (B, T, V); "
                         f"got {type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
    return out


def encode(tokenizer, text) -> list[int]:
    """Token ids of `text` with the tokenizer's default special tokens (list, 1-D tensor or str)."""
    if isinstance(text, torch.Tensor):
        return text.reshape(-1).tolist()
    if isinstance(text, (list, tuple)):
        return [int(t) for t in text]
    if tokenizer is None:
        raise ValueError("perplexity of a string needs a tokenizer (or pass token ids)")
    return list(tokenizer(text)["input_ids"])


@torch.inference_mode()
def perplexity(model, tokenizer, text, max_len: int = 1024, stride: int | None = None,
               max_tokens: int | None = None, device: str | torch.device | None = None) -> dict:
    """Perplexity exp(mean NLL) of `text` (str, or token ids) under `model`, as a JSON-ready dict.

    Returns {"perplexity", "mean_nll" (nats per predicted token), "tokens" (predicted tokens: the
    text's length minus the first), "seconds" (forward passes), "tokens_per_s" (their throughput)}.
    Texts longer than `max_len` are scored in windows of `max_len` tokens moved by `stride`
    (default max_len // 2; stride < max_len): every token but the first is predicted exactly once,
    the later windows' targets with at least max_len - stride tokens of context (transformers'
    "perplexity of fixed-length models" recipe).
    `max_tokens` keeps only the text's first tokens. Logits are taken in float32; the NLL is summed
    in float64. str text is encoded with the tokenizer's default special tokens.
    """
    ids = encode(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    stride = stride or max(1, max_len // 2)
    if max_len < 2 or not 0 < stride < max_len:
        raise ValueError(f"need max_len >= 2 and 0 < stride < max_len; got max_len {max_len}, stride {stride}")
    if device is None:
        p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = p.device if p is not None else "cpu"
    all_ids = torch.tensor(ids, dtype=torch.long, device=device)
    n = len(ids)
    nll, seconds = 0.0, 0.0
    scored_to, end = 1, min(max_len, n)  # targets [scored_to, end) in this window; token 0 is never a target
    while scored_to < n:
        begin = max(0, end - max_len)  # < scored_to because stride < max_len: every target has context
        t0 = time.perf_counter()
        logits = _logits(model, all_ids[begin:end][None])[0].float()  # (T, V)
        seconds += time.perf_counter() - t0
        preds = logits[scored_to - 1 - begin:end - 1 - begin]  # position j-1 predicts token j
        nll += float(F.cross_entropy(preds, all_ids[scored_to:end], reduction="sum").double())
        scored_to, end = end, min(end + stride, n)
    count = n - 1
    mean = nll / count
    return {"perplexity": math.exp(mean), "mean_nll": mean, "tokens": count, "seconds": seconds,
            "tokens_per_s": count / seconds if seconds > 0 else None}


@dataclasses.dataclass
class SpeedResult:
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float


@torch.inference_mode()
def generation_speed(model, prompt_ids: list[int], new_tokens: int = 32, repeats: int = 1) -> SpeedResult:
    """Prefill and decode tokens/s of a bitengine model (`model.generate(input_ids=..., ignore_eos=True)`).

    Timed as: t1 = one generated token (prefill plus one step), tN = `new_tokens` tokens;
    decode rate = (N - 1) / (tN - t1), prefill rate = prompt tokens / t1. A first untimed run warms
    up allocations and any lazy kernel setup; the best of `repeats` runs is kept.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to time decoding, got {new_tokens}")

    def timed(n: int) -> float:
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(input_ids=list(prompt_ids), max_new_tokens=n, temperature=0, ignore_eos=True)
            best = min(best, time.perf_counter() - t0)
            assert len(out) == n, f"generate returned {len(out)} tokens, asked for {n}"
        return best

    timed(2)  # warm-up
    t1, tn = timed(1), timed(new_tokens)
    return SpeedResult(prompt_tokens=len(prompt_ids), new_tokens=new_tokens,
                       prefill_tokens_per_s=len(prompt_ids) / t1,
                       decode_tokens_per_s=(new_tokens - 1) / max(tn - t1, 1e-9))


def weight_bytes(path: str | Path) -> dict[str, int]:
    """Bytes of the tensors in a checkpoint folder's *.safetensors, by kind (read from the headers only).

    Kinds: "embeddings" (embed_tokens, lm_head), "linear" (weights of the layers' linear modules:
    packed ternary or 16-bit), "scales" (ternary scales), "other" (norms, biases), and "total".
    """
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    sizes = {"embeddings": 0, "linear": 0, "scales": 0, "other": 0}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 -- safe_open is not a Mapping
                sl = st.get_slice(name)
                n = math.prod(sl.get_shape()) * _dtype_bytes(sl.get_dtype())
                sizes[_kind(name)] += n
    sizes["total"] = sum(sizes.values())
    return sizes


def _kind(name: str) -> str:
    """Tensor names of formats/checkpoint.py: M.weight_packed + M.weight_scale (ternary) or M.weight (16-bit)."""
    if "embed_tokens" in name or name.startswith("lm_head."):
        return "embeddings"
    if name.endswith(".weight_scale"):
        return "scales"
    if name.endswith(".weight_packed") or ("_proj." in name and name.endswith(".weight")):
        return "linear"
    return "other"


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _dtype_bytes(name: str) -> int:
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown safetensors dtype {name!r}")
    return _DTYPE_BYTES[name]
