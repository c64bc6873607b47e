"""Prompt forwards replayed from CUDA graphs (prefill_graph.py) and generate()'s kept session (graph_session.py) on a
CUDA device: a replay gives the eager padded forward's logits and cache bit for bit, one graph serves every prompt
length of its bucket, a second generate() call captures nothing and gives the first call's tokens (and eager
decoding's), and a generate() streaming while another runs keeps its own cache."""

from __future__ import annotations

import os

import pytest
import torch
from tinymodels import make_llama

import bitengine
from bitengine.graph_session import release_graphs
from bitengine.prefill_graph import GraphPrefill

os.environ.setdefault("BITENGINE_TUNE", "0")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SHAPE = dict(vocab_size=512, hidden_size=384, intermediate_size=1056, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_prefill_graph")
    make_llama(root / "hf", tokenizer=False, **SHAPE)
    bitengine.convert(root / "hf", root / "a8", progress=False)
    bitengine.convert(root / "hf", root / "fp16", weights="fp16", progress=False)
    return root


def _prompt(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, t - n:] = torch.randint(3, SHAPE["vocab_size"], (n,), generator=g)
    pad = torch.tensor([t - n for n in lengths])
    return ids.cuda(), pad.cuda()


def _cache(model, b, pad):
    cache = model.new_cache(b, 256)
    cache.valid.copy_(torch.arange(256, device="cuda")[None] >= pad[:, None])
    return cache


@pytest.mark.parametrize("ckpt", ["a8", "fp16"])
@pytest.mark.parametrize("compiled", [False, True])
def test_replay_equals_eager_padded_forward(world, ckpt, compiled):
    """Same kernels on the same shapes: the logits and the prompt's cache slots bit for bit; two prompt lengths of
    one bucket (40 and 57 tokens, bucket 64) replay one graph; 65 tokens capture a second one."""
    model = bitengine.load(world / ckpt, device="cuda")
    if compiled:
        model.compile_layers()
    graph_cache = _cache(model, 2, torch.zeros(2, dtype=torch.long, device="cuda"))
    prefill = GraphPrefill(model, graph_cache)
    assert prefill.graphs
    for n, (lengths, seed) in enumerate([([40, 33], 1), ([57, 57], 2), ([65, 12], 3)]):
        ids, pad = _prompt(lengths, seed)
        graph_cache.valid.copy_(torch.arange(256, device="cuda")[None] >= pad[:, None])
        eager_cache = _cache(model, 2, pad)
        t = ids.shape[1]
        positions = (torch.arange(t, device="cuda")[None] - pad[:, None]).clamp(min=0)
        with torch.no_grad():
            want = GraphPrefill(model, eager_cache, graphs=False)(ids, positions)
            got = prefill(ids, positions)
            again = prefill(ids, positions)  # a replay only
        assert torch.equal(got, want) and torch.equal(again, want), (lengths, (got - want).abs().max())
        for a, c in zip(eager_cache.k + eager_cache.v, graph_cache.k + graph_cache.v):
            assert torch.equal(a[:, :, :t], c[:, :, :t])
        assert sorted(prefill.captured) == ([64] if n < 2 else [64, 128])


@pytest.mark.parametrize("ckpt", ["a8", "fp16"])
def test_generate_keeps_its_session(world, ckpt):
    model = bitengine.load(world / ckpt, device="cuda")
    kw = dict(input_ids=[list(range(5, 40)), list(range(7, 20))], max_new_tokens=20, ignore_eos=True)
    first = model.generate(**kw)
    session = model.__dict__["_graph_session"]
    decoder, captured = session._decoder, dict(session.prefill.captured)
    second = model.generate(**kw)
    assert model.__dict__["_graph_session"] is session and session._decoder is decoder
    assert session.prefill.captured == captured  # nothing captured again
    assert first == second == model.generate(cuda_graph=False, **kw)
    other = dict(input_ids=[list(range(9, 60)), list(range(3, 30))], max_new_tokens=20, ignore_eos=True)
    assert model.generate(**other) == model.generate(cuda_graph=False, **other)  # same bucket, another prompt
    assert model.__dict__["_graph_session"] is session
    release_graphs(model)
    assert "_graph_session" not in model.__dict__


def test_interleaved_streams_keep_their_own_cache(world):
    model = bitengine.load(world / "a8", device="cuda")
    a = dict(input_ids=list(range(5, 30)), max_new_tokens=12, ignore_eos=True)
    b = dict(input_ids=list(range(40, 52)), max_new_tokens=12, ignore_eos=True)
    want_a, want_b = model.generate(**a), model.generate(**b)
    sa, sb = model.generate(stream=True, **a), model.generate(stream=True, **b)
    got_a, got_b = [], []
    for x, y in zip(sa, sb):
        got_a.append(x)
        got_b.append(y)
    got_a += list(sa)
    got_b += list(sb)
    assert got_a == want_a and got_b == want_b


def test_compiled_generate_twice(world):
    model = bitengine.load(world / "a8", device="cuda")
    kw = dict(input_ids=list(range(5, 30)), max_new_tokens=24, ignore_eos=True)
    eager = model.generate(cuda_graph=False, **kw)
    first = model.generate(compile=True, **kw)
    assert model.generate(compile=True, **kw) == first
    # compiled layers round differently from eager ones (inductor fuses the norms, rotary and glue), so greedy tokens
    # of random weights may part at a near-tie; the strict checks are the line above (the kept session gives the
    # same tokens twice) and test_gpu_model.py's compiled-vs-eager logits; this one only says the two still agree
    assert sum(x == y for x, y in zip(eager, first)) >= 20, (eager, first)
