"""The server's decode step and prompts replayed from CUDA graphs (bitengine/server/graphs.py) on a CUDA device: the
engine with graphs gives the same greedy tokens as the engine running the same views eagerly (cuda_graph=False: the
same kernels on the same shapes), one decode graph per (busy rows, slot bucket) used, prompt graphs per (row,
bucket)."""

from __future__ import annotations

import os

import pytest
import torch
from serving_fixtures import bitengine_checkpoint
from test_server_graphs import _run_engine

import bitengine
from bitengine.server.engine import Engine

os.environ.setdefault("BITENGINE_TUNE", "0")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_engine_graphs_equal_eager_views(tmp_path, dtype):
    model = bitengine.load(bitengine_checkpoint(tmp_path), device="cuda", dtype=dtype)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (3, 9, 1, 6, 12, 4)]
    outs = {}
    for graphs in (False, True):
        # with graphs also the warm-up, which captures each batch size's first-bucket graph before serving
        engine = Engine(model, max_batch=4, max_queue=8, max_seq=128, cuda_graph=graphs, warmup=graphs)
        engine.decode_graphs.bucket = 16  # cross slot buckets within the test's lengths
        assert engine.decode_path == ("CUDA graphs" if graphs else "PyTorch layers")
        outs[graphs] = _run_engine(engine, prompts, max_tokens=12)
        if graphs:
            keys = set(engine.decode_graphs.captured)
            assert keys and all(s % 16 == 0 and 1 <= hi <= 4 for hi, s in keys), keys
            assert any(s > 16 for _, s in keys), keys  # some step ran past the first bucket
            assert {(hi, 16) for hi in range(1, 5)} <= keys, keys  # the warm-up's
            prompt_graphs = [set(p.captured) for p in engine.prefill_graphs.rows]
            assert set().union(*prompt_graphs) == {64}, prompt_graphs  # every prompt here fits one 64-token bucket
    assert outs[True] == outs[False]
