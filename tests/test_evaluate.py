"""bitengine.evaluate: perplexity against transformers' own loss, windowing, the fixed text."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from bitengine.evaluate import perplexity, zen_of_python


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg).eval()


class CumulativeMeanLM(torch.nn.Module):
    """A fast causal toy LM: logits at t depend on the mean embedding of tokens 0..t (so context matters)."""

    def __init__(self, vocab=97, dim=16):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.out = torch.nn.Parameter(torch.randn(dim, vocab, generator=g))

    def forward(self, x):
        h = self.emb[x].cumsum(1) / torch.arange(1, x.shape[1] + 1)[:, None]  # (B, T, D)
        return h @ self.out  # (B, T, V)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (61,), generator=torch.Generator().manual_seed(1)).tolist()


def test_full_context_equals_transformers_loss(tiny, ids):
    with torch.no_grad():
        loss = tiny(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    r = perplexity(tiny, None, ids, max_len=64)
    assert r["tokens"] == len(ids) - 1
    assert r["mean_nll"] == pytest.approx(loss, rel=1e-6) and r["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)
    # a plain callable returning logits works the same
    r2 = perplexity(lambda x: tiny(x).logits, None, torch.tensor(ids), max_len=64)
    assert r2["mean_nll"] == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("max_len,stride", [(16, 8), (16, 15), (16, 1), (7, 3), (2, 1), (60, 59)])
def test_windows_score_every_token_once(ids, max_len, stride):
    """Against a brute-force oracle: token j scored in the window that first reaches it, with that window's context."""
    tiny = CumulativeMeanLM()
    r = perplexity(tiny, None, ids, max_len=max_len, stride=stride)
    assert r["tokens"] == len(ids) - 1
    nll, end = 0.0, min(max_len, len(ids))
    with torch.no_grad():
        for j in range(1, len(ids)):
            while j >= end:
                end = min(end + stride, len(ids))
            begin = max(0, end - max_len)
            assert j - begin >= min(j, max_len - stride)  # context guarantee
            logits = tiny(torch.tensor([ids[begin:j]]))[0, -1]
            nll -= torch.log_softmax(logits.double(), -1)[ids[j]].item()
    assert r["mean_nll"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)


def test_max_tokens_and_bad_args(tiny, ids):
    assert perplexity(tiny, None, ids, max_len=64, max_tokens=10)["tokens"] == 9
    with pytest.raises(ValueError, match="stride"):
        perplexity(tiny, None, ids, max_len=16, stride=16)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(tiny, None, ids[:1])
    with pytest.raises(ValueError, match="logits"):
        perplexity(lambda x: x, None, ids)


def test_zen_of_python_is_fixed():
    text = zen_of_python()
    assert text.startswith("The Zen of Python, by Tim Peters") and len(text) == 856
    assert text.rstrip().endswith("Namespaces are one honking great idea -- let's do more of those!")
