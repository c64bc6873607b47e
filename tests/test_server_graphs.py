"""The server's decode step over (rows, slot bucket) views and its prompts through per-row padded prefills
(bitengine/server/graphs.py), on the CPU: the views run eagerly (graphs=False) and must give the engine's plain eager
step (rows [0, hi), attention bounded by kv_len) and plain prefill, and the engine driven through them must give
generate()'s greedy tokens. The CUDA graph replay of the same views is
tests/test_gpu_server_graphs.py."""

from __future__ import annotations

import threading

import pytest
import torch
from serving_fixtures import bitengine_checkpoint

import bitengine
from bitengine.server.engine import Engine, Request, SamplingParams
from bitengine.server.graphs import CacheView, DecodeGraphs, PrefillGraphs


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return bitengine.load(bitengine_checkpoint(tmp_path_factory.mktemp("server_graphs")))


def _prefill(model, cache, prompts):
    """Each prompt into its own row (as Engine._admit): returns each row's next cache slot."""
    for row, ids in enumerate(prompts):
        t = len(ids)
        pos = torch.arange(t)
        model(torch.tensor([ids]), cache=CacheView(cache, row, row + 1), input_pos=pos, position_ids=pos[None],
              kv_len=t, last_only=True)
    return [len(p) for p in prompts]


def test_views_match_the_plain_step(model):
    """Three rows at different lengths, decoded across a bucket edge (bucket 8): the view step's logits are the plain
    step's (kv_len = highest slot + 1 over all slots), and it writes the same K / V."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 2, 7)]
    with torch.inference_mode():
        plain, viewed = model.new_cache(batch=3, max_seq=64), model.new_cache(batch=3, max_seq=64)
        slots = _prefill(model, plain, prompts)
        _prefill(model, viewed, prompts)
        graphs = DecodeGraphs(model, viewed, bucket=8, graphs=False)
        tokens = [11, 12, 13]
        for _ in range(6):  # highest slot 7 .. 12: views of 8 and then 16 slots
            pos = torch.tensor(slots)[:, None]
            want = model(torch.tensor(tokens)[:, None], cache=CacheView(plain, 0, 3), input_pos=pos,
                         position_ids=pos, kv_len=max(slots) + 1)[:, -1].float()
            got = graphs(tokens, slots)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            tokens = got.argmax(-1).tolist()
            slots = [s + 1 for s in slots]
        for i in range(plain.num_layers):
            torch.testing.assert_close(viewed.k[i][:, :, :13], plain.k[i][:, :, :13], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(viewed.v[i][:, :, :13], plain.v[i][:, :, :13], rtol=1e-6, atol=1e-6)


def test_slot_count_and_bad_input(model):
    cache = model.new_cache(batch=2, max_seq=40)
    graphs = DecodeGraphs(model, cache, bucket=16, graphs=False)
    assert [graphs.slot_count(n) for n in (1, 16, 17, 33, 40)] == [16, 16, 32, 40, 40]
    with pytest.raises(ValueError, match="tokens"):
        graphs([1, 2, 3], [0, 0, 0])  # more rows than the cache
    with pytest.raises(ValueError, match="slots"):
        graphs([1], [40])  # past the cache
    with pytest.raises(ValueError, match="bucket"):
        DecodeGraphs(model, cache, bucket=0)
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(model, cache, graphs=True)  # a CPU cache cannot be captured
    view = CacheView(cache, 1, 2, 24)
    assert (view.batch, view.max_seq, tuple(view.k0.shape[:3])) == (1, 24, (1, cache.k0.shape[1], 24))
    assert view.k0.data_ptr() == cache.k0[1].data_ptr()  # a view: writes land in the shared cache


def test_prefill_views_match_the_plain_prefill(model):
    """A prompt through its row's padded prefill (graphs=False: the shapes the graphs replay) gives the plain prefill's
    last logits and the same K / V in the prompt's slots, in any row, next to another row's prompt."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (70, 5)]  # 128- and 64-slot buckets
    with torch.inference_mode():
        plain, padded = model.new_cache(batch=3, max_seq=160), model.new_cache(batch=3, max_seq=160)
        prefill = PrefillGraphs(model, padded, graphs=False)
        for row, ids in zip((2, 0), prompts):
            t = len(ids)
            pos = torch.arange(t)
            want = model(torch.tensor([ids]), cache=CacheView(plain, row, row + 1), input_pos=pos,
                         position_ids=pos[None], kv_len=t, last_only=True)[:, -1].float()
            got = prefill(row, ids)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            for i in range(plain.num_layers):
                torch.testing.assert_close(padded.k[i][row, :, :t], plain.k[i][row, :, :t], rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(padded.v[i][row, :, :t], plain.v[i][row, :, :t], rtol=1e-6, atol=1e-6)
        assert not padded.k[0][1].any()  # the row nobody prefilled


def _run_engine(engine, prompts, max_tokens):
    done, outs = threading.Event(), {}

    def sink_for(i):
        def sink(ev):
            if ev.finish_reason is not None:
                outs[i] = ev
                if len(outs) == len(prompts):
                    done.set()
        return sink

    reqs = [Request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True), sink_for(i))
            for i, p in enumerate(prompts)]
    engine.start()
    try:
        for r in reqs:
            engine.submit(r)
        assert done.wait(120), "engine did not finish"
    finally:
        engine.stop()
    assert all(outs[i].finish_reason == "length" for i in range(len(prompts))), outs
    return [r.out_ids for r in reqs]


def test_engine_through_views_matches_generate(model):
    """The engine with its decode steps and prompts on the views (as on a GPU, here eagerly): each request's greedy
    tokens are generate()'s for that prompt alone, with requests joining and leaving the batch, slots crossing
    buckets and prompts padded past their length."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (3, 9, 1, 6, 12)]
    engine = Engine(model, max_batch=3, max_queue=8, max_seq=64)
    engine.cpp_layers = None  # the PyTorch layers, as the GPU runs them
    engine.decode_graphs = DecodeGraphs(model, engine.cache, bucket=8, graphs=False)
    engine.prefill_graphs = PrefillGraphs(model, engine.cache, graphs=False)
    outs = _run_engine(engine, prompts, max_tokens=10)
    for p, out in zip(prompts, outs):
        want = model.generate(input_ids=p, max_new_tokens=10, ignore_eos=True)
        assert out == want, (p, out, want)
