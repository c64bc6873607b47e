"""The one-token decode step's glue around the layers, compiled with them (CausalLM.compile_layers: embedding, rotary
cos / sin and mask in CausalLM._front, and the final norm, as two torch.compile graphs used only at that step's
fixed shape), on the CPU: the compiled glue is taken at t = 1 over the whole cache and nowhere else, and gives the
eager glue's results (embeddings and mask exactly; cos / sin within one rounding of their dtype; the step's logits
and greedy tokens as the eager model's)."""

from __future__ import annotations

import pytest
import torch
from tinymodels import make_llama

import bitengine


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    make_llama(root / "hf", tokenizer=False, num_hidden_layers=1)
    bitengine.convert(root / "hf", root / "bit", progress=False)
    return root / "bit"


def _decode(model, steps=4):
    """Logits of a 6-token prompt (eager shapes: kv_len given) and `steps` one-token steps over the whole cache
    (the CUDA-graph step's shapes: kv_len None)."""
    ids = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        logits = model(ids, cache=cache, input_pos=torch.arange(6), kv_len=6)[:, -1:]
        out = [logits[:, -1]]
        for i in range(steps):
            pos = torch.tensor([6 + i])
            logits = model(logits.argmax(-1), cache=cache, input_pos=pos, position_ids=pos[None])
            out.append(logits[:, -1])
    return torch.cat(out)


def test_front_compiled_equals_eager(ckpt):
    torch._dynamo.reset()
    model = bitengine.load(ckpt, backend="reference", dtype=torch.bfloat16)
    cache = model.new_cache(2, 16)
    cache.valid[1, :3] = False  # a left-padded row
    ids, pos = torch.tensor([[7], [9]]), torch.tensor([5])
    positions = torch.tensor([[5], [2]])
    want = model._front(ids, pos, positions, cache.valid, cache.max_seq)
    got = torch.compile(model._front, dynamic=False)(ids, pos, positions, cache.valid, cache.max_seq)
    for name, w, g in zip(("x", "cos", "sin", "mask"), want, got):
        assert w.shape == g.shape and w.dtype == g.dtype, name
    assert torch.equal(want[0], got[0]) and torch.equal(want[3], got[3])
    for w, g in zip(want[1:3], got[1:3]):  # float32 cos / sin of inductor's code vs ATen's, then one rounding
        assert (w.float() - g.float()).abs().max() <= 2 ** -8


def test_decode_step_takes_the_compiled_glue(ckpt, monkeypatch):
    torch._dynamo.reset()
    eager = bitengine.load(ckpt, backend="reference", dtype=torch.float32)
    compiled = bitengine.load(ckpt, backend="reference", dtype=torch.float32)
    compiled.compile_layers()
    front, norm = compiled.__dict__["_compiled_glue"]
    taken = []
    compiled.__dict__["_compiled_glue"] = (lambda *a: taken.append("front") or front(*a),
                                           lambda x: taken.append("norm") or norm(x))
    want, got = _decode(eager), _decode(compiled)
    assert taken == ["front", "norm"] * 4  # the four one-token steps, not the prompt
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_new_cache_lengths_stop_recompiling(ckpt):
    """generate() sizes its cache to prompt + max_new_tokens, so every call of another length brings new shapes:
    compile_layers' layers and glue recompile once with the changed size symbolic, then not again (they compiled
    every new length before, an inductor compile each, and ran eager past torch's recompile limit), and the steps
    still give the eager model's logits. Dynamo's own backend: what is counted is dynamo's recompiles."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager = bitengine.load(ckpt, backend="reference", dtype=torch.float32)
    compiled = bitengine.load(ckpt, backend="reference", dtype=torch.float32)
    compiled.compile_layers(backend="eager")
    compiles = []
    # the first seven: each size changes once (prompt length, cache length, batch, for the prompt and the step)
    for b, t, s in [(1, 6, 16), (1, 1, 16), (1, 9, 24), (1, 1, 24), (1, 1, 32), (2, 1, 32), (2, 5, 32), (2, 1, 40),
                    (1, 1, 48), (2, 7, 48), (1, 13, 56), (1, 1, 64), (2, 1, 72)]:
        ids = torch.randint(3, compiled.config.vocab_size, (b, t), generator=torch.Generator().manual_seed(s + t))
        pos = torch.arange(t) if t > 1 else torch.tensor([s - 1])
        before = counters["frames"]["total"]
        with torch.no_grad():
            got = compiled(ids, cache=compiled.new_cache(b, s), input_pos=pos)
            want = eager(ids, cache=eager.new_cache(b, s), input_pos=pos)
        compiles.append(counters["frames"]["total"] - before)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sum(compiles[:7]) > 0 and compiles[7:] == [0] * 6, compiles
