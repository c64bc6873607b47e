"""generate(): text, chat, batches, streaming, stop strings, sampling options, seeds."""

import pytest
import torch
from tinymodels import make_llama

import bitengine
from bitengine.generate import apply_repetition_penalty, sample


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    make_llama(d / "src")
    bitengine.convert(d / "src", d / "tern", progress=False)
    return bitengine.load(d / "tern", backend="reference")


def test_text_prompt_and_ids_agree(model):
    text = model.generate("the quick brown", max_new_tokens=12, ignore_eos=True)
    ids = model.tokenizer("the quick brown")["input_ids"]
    out_ids = model.generate(input_ids=ids, max_new_tokens=12, ignore_eos=True)
    assert isinstance(text, str) and len(out_ids) == 12
    assert text == model.tokenizer.decode(out_ids, skip_special_tokens=True)


def test_batch_equals_single(model):
    prompts = ["hello", "ternary weights are minus one", "a"]
    batch = model.generate(prompts, max_new_tokens=10, ignore_eos=True)
    singles = [model.generate(p, max_new_tokens=10, ignore_eos=True) for p in prompts]
    assert batch == singles


def test_chat_messages_use_template(model):
    msgs = [{"role": "user", "content": "hello world"}]
    out = model.generate(messages=msgs, max_new_tokens=8, ignore_eos=True)
    ids = model.tokenizer(model.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False)["input_ids"]
    assert out == model.tokenizer.decode(model.generate(input_ids=ids, max_new_tokens=8, ignore_eos=True),
                                         skip_special_tokens=True)


def test_stream_pieces_join_to_text(model):
    full = model.generate("the lazy", max_new_tokens=16, ignore_eos=True)
    pieces = list(model.generate("the lazy", max_new_tokens=16, ignore_eos=True, stream=True))
    assert len(pieces) > 1 and "".join(pieces) == full


def test_stop_strings(model):
    full = model.generate("the", max_new_tokens=24, ignore_eos=True)
    assert len(full) > 6
    stop = full[3:6]
    cut = model.generate("the", max_new_tokens=24, ignore_eos=True, stop=[stop])
    assert cut == full[: full.find(stop)]
    assert "".join(model.generate("the", max_new_tokens=24, ignore_eos=True, stop=[stop], stream=True)) == cut


def test_seeded_sampling_reproducible(model):
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, ignore_eos=True)
    a = model.generate(input_ids=[0, 5, 6], seed=3, **kw)
    b = model.generate(input_ids=[0, 5, 6], seed=3, **kw)
    c = model.generate(input_ids=[0, 5, 6], seed=4, **kw)
    assert a == b and a != c


def test_top_k_1_is_greedy(model):
    greedy = model.generate(input_ids=[0, 9], max_new_tokens=10, ignore_eos=True)
    assert model.generate(input_ids=[0, 9], max_new_tokens=10, ignore_eos=True, temperature=0.7, top_k=1, seed=0) == greedy


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}
    # top_p 0.5: token 0 alone has p = 0.64 >= 0.5, so only it survives
    draws = {sample(logits, temperature=1.0, top_p=0.5, generator=g).item() for _ in range(100)}
    assert draws == {0}


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(2, 50)
    ids = torch.randint(0, 50, (2, 7))
    seen = torch.zeros(2, 50, dtype=torch.bool).scatter_(1, ids, True)
    want = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), want)


def test_eos_stops(model):
    eos = model.tokenizer.eos_token_id
    # find a prompt whose greedy continuation emits a token, then declare that token EOS
    out = model.generate(input_ids=[0, 7], max_new_tokens=6, ignore_eos=True)
    model.generation_eos = [out[2]]
    try:
        stopped = model.generate(input_ids=[0, 7], max_new_tokens=6)
    finally:
        model.generation_eos = None
    assert stopped == out[: out.index(out[2])] and eos is not None


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="exactly one"):
        model.generate("a", input_ids=[1])
    with pytest.raises(ValueError, match="single sequence"):
        model.generate(["a", "b"], stream=True)
    with pytest.raises(ValueError, match="does not fit"):
        model.generate(input_ids=[1] * 300)


def test_compiled_decode_on_cpu(tmp_path):
    """generate(compile=True) on the CPU: every decode step through one compiled graph of the whole model
    (generate.compiled_forward). A16 weights, so the only difference from eager is float summation order:
    step logits within 1e-4 of the eager ones, the same greedy tokens, and the KV cache written in place
    (compiled and eager caches equal after the steps). Through generate() with a batch of two left-padded
    prompts, then step by step for a single one."""
    from bitengine import backends
    from bitengine.generate import Decoder

    make_llama(tmp_path / "src")
    bitengine.convert(tmp_path / "src", tmp_path / "a16", act_bits=16, progress=False)
    backend = "cpu" if not backends.availability("cpu")["cpu"] else "reference"
    m = bitengine.load(tmp_path / "a16", backend=backend)
    torch._dynamo.reset()
    prompts = [[5, 60, 7, 80, 9], [3, 4, 200]]
    assert m.generate(input_ids=prompts, max_new_tokens=6, ignore_eos=True, compile=True) == \
        m.generate(input_ids=prompts, max_new_tokens=6, ignore_eos=True)
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        caches, logits = [], []
        for compile in (False, True):
            cache = m.new_cache(1, max_seq=12)
            first = m(ids, cache=cache, input_pos=torch.arange(5), kv_len=5, last_only=True)[:, -1]
            step = Decoder(m, cache, torch.zeros(1, dtype=torch.long), compile=compile)
            tok, out = first.argmax(-1, keepdim=True), []
            for i in range(6):
                out.append(step(tok, 5 + i))
                tok = out[-1].argmax(-1, keepdim=True)
            caches.append(cache)
            logits.append(torch.cat(out))
    assert ((logits[1] - logits[0]).norm() / logits[0].norm()).item() < 1e-4
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(caches[1].k + caches[1].v, caches[0].k + caches[0].v))
