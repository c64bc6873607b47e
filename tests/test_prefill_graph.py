"""prefill_graph.py and graph_session.py on the CPU: the padded prompt forward that the CUDA graphs replay (run
eagerly here) gives the unpadded forward's logits and cache, CausalLM.forward's last_index, the bucket and cache
length rules, and when generate()'s kept session is reused, replaced, bypassed (a call still streaming) and released
(adapters changed). The captured graphs themselves: tests/test_gpu_prefill_graph.py."""

from __future__ import annotations

import pytest
import torch
from test_lora import _peft_adapter
from tinymodels import make_llama

import bitengine
from bitengine.graph_session import CAPACITY_STEP, cache_capacity, release_graphs, session_for
from bitengine.lora import apply_adapters
from bitengine.prefill_graph import GraphPrefill

SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefill_graph")
    base = make_llama(root / "hf", tokenizer=False, dtype=torch.float32, **SHAPE)
    bitengine.convert(root / "hf", root / "bit", progress=False)
    _peft_adapter(base, root / "lora", seed=1, r=4)
    return root


@pytest.fixture(scope="module")
def model(world):
    return bitengine.load(world / "bit", device="cpu", dtype=torch.float32)


def _left_padded(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, t - n:] = torch.randint(3, vocab, (n,), generator=g)
    pad = torch.tensor([t - n for n in lengths])
    return ids, pad


@pytest.mark.parametrize("lengths", [[1], [5], [16], [17], [40], [7, 3, 12]])
def test_padded_prefill_equals_unpadded(model, lengths):
    """Logits of every row's last token and the cache slots of the prompt: as the unpadded forward (same kernels per
    token on the CPU reference path: the padding only adds rows of the matmuls and keys no prompt token sees)."""
    ids, pad = _left_padded(lengths, SHAPE["vocab_size"])
    b, t = ids.shape
    slots = torch.arange(48)
    positions = (torch.arange(t)[None] - pad[:, None]).clamp(min=0)
    caches = []
    for _ in range(2):
        cache = model.new_cache(b, 48)
        cache.valid.copy_(slots[None] >= pad[:, None])
        caches.append(cache)
    with torch.no_grad():
        want = model(ids, cache=caches[0], input_pos=torch.arange(t), position_ids=positions, kv_len=t,
                     last_only=True)[:, -1].float()
        prefill = GraphPrefill(model, caches[1], bucket=16)
        assert not prefill.graphs  # off CUDA: the padded forward, eagerly
        got = prefill(ids, positions)
    assert got.shape == (b, SHAPE["vocab_size"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for r in range(b):  # the prompt's own slots (padding rows' slots hold what each path wrote for token 0)
        for kv in ("k", "v"):
            for a, c in zip(getattr(caches[0], kv), getattr(caches[1], kv)):
                torch.testing.assert_close(c[r, :, pad[r]:t], a[r, :, pad[r]:t], rtol=1e-5, atol=1e-5)


def test_last_index_selects_one_token(model):
    ids = torch.randint(3, SHAPE["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        one = model(ids, last_index=torch.tensor([4]))
    assert one.shape == (2, 1, SHAPE["vocab_size"])
    torch.testing.assert_close(one[:, 0], full[:, 4])


def test_bucket_lengths_and_bad_input(model):
    prefill = GraphPrefill(model, model.new_cache(1, 100), bucket=32)
    assert [prefill.bucket_len(t) for t in (1, 32, 33, 64, 97, 100)] == [32, 32, 64, 64, 100, 100]
    ids = torch.ones(1, 101, dtype=torch.long)
    with pytest.raises(ValueError, match="does not fit the cache's 100 slots"):
        prefill(ids, ids)
    with pytest.raises(ValueError, match=r"must be \(1, T\)"):
        prefill(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="bucket must be >= 1"):
        GraphPrefill(model, model.new_cache(1, 8), bucket=0)
    with pytest.raises(ValueError, match="need a CUDA cache"):
        GraphPrefill(model, model.new_cache(1, 8), graphs=True)


def test_cache_capacity_rounds_up_within_the_context(model):
    assert cache_capacity(model, 1) == CAPACITY_STEP
    assert cache_capacity(model, CAPACITY_STEP + 1) == 2 * CAPACITY_STEP
    assert cache_capacity(model, model.max_seq) == model.max_seq  # never past the context


def test_session_reuse_replace_busy_release(world):
    model = bitengine.load(world / "bit", device="cpu", dtype=torch.float32)
    first = session_for(model, 2, 40, compile=False)
    assert first.cache.max_seq == CAPACITY_STEP and first.cache.batch == 2
    assert session_for(model, 2, 200, compile=False) is first  # same batch, same rounded length: kept
    second = session_for(model, 2, CAPACITY_STEP + 1, compile=False)  # longer: replaced
    assert second is not first and model.__dict__["_graph_session"] is second
    assert session_for(model, 1, 40, compile=False) is not second  # another batch size: replaced
    kept = model.__dict__["_graph_session"]
    kept.busy = True  # a generate() still streaming on it: the next call gets its own, not kept
    other = session_for(model, 1, 40, compile=False)
    assert other is not kept and model.__dict__["_graph_session"] is kept
    kept.busy = False
    release_graphs(model)
    assert "_graph_session" not in model.__dict__


def test_session_start_sets_padding_mask(model):
    session = session_for(model, 2, 10, compile=False)
    session.start([3, 0])
    assert session.offset.tolist() == [3, 0]
    assert session.cache.valid[0, :4].tolist() == [False, False, False, True]
    assert bool(session.cache.valid[1].all()) and bool(session.cache.valid[0, 3:].all())
    release_graphs(model)


def test_adapters_release_the_session(world):
    model = bitengine.load(world / "bit", device="cpu", dtype=torch.float32)
    session_for(model, 1, 10, compile=False)
    apply_adapters(model, [world / "lora"])
    assert "_graph_session" not in model.__dict__
    session_for(model, 1, 10, compile=False)
    bitengine.lora.remove_adapters(model)
    assert "_graph_session" not in model.__dict__


def test_int8_head_releases_the_session(world):
    from bitengine.int8_head import quantize_head_int8

    model = bitengine.load(world / "bit", device="cpu", dtype=torch.float32)
    session_for(model, 1, 10, compile=False)
    quantize_head_int8(model)
    assert "_graph_session" not in model.__dict__


def test_generate_through_a_kept_session(world, monkeypatch):
    """generate()'s session path, run on the CPU with eager stand-ins for the graphs (the padded prompt forward, the
    full-cache eager step): the tokens of the plain CPU path, and the second call reuses the session."""
    from bitengine import generate as generate_module
    from bitengine.graph_session import GraphSession

    model = bitengine.load(world / "bit", device="cpu", dtype=torch.float32)
    kw = dict(input_ids=[list(range(5, 30)), list(range(40, 47))], max_new_tokens=10, ignore_eos=True)
    want = model.generate(**kw)
    assert "_graph_session" not in model.__dict__  # the CPU path keeps nothing
    monkeypatch.setattr(generate_module, "_keeps_session", lambda device, cuda_graph: cuda_graph is not False)
    monkeypatch.setattr(GraphSession, "decoder", lambda self: generate_module.Decoder(
        self.model, self.cache, self.offset, full_cache=True))
    first = model.generate(**kw)
    session = model.__dict__["_graph_session"]
    assert not session.busy and session.cache.batch == 2
    assert model.generate(**kw) == first == want
    assert model.__dict__["_graph_session"] is session
    assert model.generate(input_ids=list(range(9, 20)), max_new_tokens=4, ignore_eos=True) == \
        model.generate(input_ids=list(range(9, 20)), max_new_tokens=4, ignore_eos=True, cuda_graph=False)
    assert model.__dict__["_graph_session"] is not session  # batch 1: replaced
