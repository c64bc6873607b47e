"""The OpenAI-compatible server against a real client (`openai`) on 127.0.0.1.

A tiny random Llama is converted with bitengine.convert; uvicorn serves it from a thread on a free
loopback port. Greedy outputs are compared with bitengine's own generate() on a separately loaded
copy of the same checkpoint, alone and under 16 concurrent requests (continuous batching).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving_fixtures import bitengine_checkpoint

import bitengine
from bitengine.server import build, make_server
from bitengine.server.engine import Engine, QueueFull, Request, SamplingParams

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

NAME = "tiny"
PROMPTS = ["the cat", "hello world", "on it is", "we be up", "x", "an apple of the tree", "to be or", "in at by",
           "0123", "he said", "as is", "the the the", "zebra", "quick brown fox", "up up", "of it"]


class LiveServer:
    """uvicorn serving `app` from a thread on a free 127.0.0.1 port."""

    def __init__(self, app, drain: float = 5.0):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = make_server(app, app.state.engine, drain_timeout=drain, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60, **kw)

    def stop(self, wait: float = 30):
        self.server.should_exit = True
        self.thread.join(wait)
        assert not self.thread.is_alive(), "server thread did not exit"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return bitengine_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def ref(ckpt):
    return bitengine.load(ckpt)  # generate() oracle; the server has its own copy


@pytest.fixture(scope="module")
def live(ckpt):
    app, engine = build(ckpt, max_batch=8, max_queue=16, model_name=NAME)
    srv = LiveServer(app)
    yield srv
    srv.stop()
    assert not engine.thread.is_alive()


def test_models_and_health(live):
    client = live.client()
    assert [m.id for m in client.models.list().data] == [NAME]
    h = httpx.get(live.url + "/health").json()
    assert h["status"] == "ok" and h["max_batch"] == 8 and h["context"] == 256
    assert h["decode"] == ("C++ layers" if h["backend"] == "cpu" else "PyTorch layers")


def test_completion_greedy_matches_generate(live, ref):
    client = live.client()
    for prompt in PROMPTS[:3]:
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0)
        assert r.choices[0].text == ref.generate(prompt, max_new_tokens=20)
        assert r.usage.prompt_tokens == len(ref.tokenizer(prompt)["input_ids"])
        assert r.choices[0].finish_reason in ("length", "stop") and r.object == "text_completion"


def test_completion_token_ids_and_chat(live, ref):
    client = live.client()
    ids = ref.tokenizer("the cat")["input_ids"]
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == ref.tokenizer.decode(ref.generate(input_ids=ids, max_new_tokens=12),
                                                     skip_special_tokens=True)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    c = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=24, temperature=0)
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == ref.generate(messages=msgs, max_new_tokens=24)


def test_streaming_equals_non_streaming(live, ref):
    client = live.client()
    pieces, finish = [], None
    for ch in client.completions.create(model=NAME, prompt="on it is", max_tokens=20, temperature=0, stream=True):
        pieces.append(ch.choices[0].text)
        finish = ch.choices[0].finish_reason or finish
    assert "".join(pieces) == ref.generate("on it is", max_new_tokens=20) and finish in ("length", "stop")
    assert len([p for p in pieces if p]) > 1  # really streamed, not one blob
    msgs = [{"role": "user", "content": "hi"}]
    stream = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.generate(messages=msgs, max_new_tokens=16)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 16


def test_16_concurrent_requests_match_generate(live, ref):
    expected = {p: ref.generate(p, max_new_tokens=16) for p in PROMPTS}
    client = live.client()

    def ask(i_prompt):
        i, prompt = i_prompt
        if i % 2:  # half streamed, half not
            s = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stream=True)
            return prompt, "".join(c.choices[0].text for c in s)
        return prompt, client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, enumerate(PROMPTS)))
    assert len(got) == 16
    for prompt, text in got:
        assert text == expected[prompt], prompt
    h = httpx.get(live.url + "/health").json()
    assert h["max_active"] > 1, "requests never shared a decode batch"  # continuous batching happened
    assert h["active"] == 0 and h["queued"] == 0


def test_sampling_seed_and_stop(live, ref):
    client = live.client()
    kw = {"model": NAME, "prompt": "the cat", "max_tokens": 20, "temperature": 0.9, "top_p": 0.9, "seed": 123}
    a = client.completions.create(**kw).choices[0].text
    assert a == client.completions.create(**kw).choices[0].text  # seeded: reproducible
    assert a == ref.generate("the cat", max_new_tokens=20, temperature=0.9, top_p=0.9, seed=123)
    b = client.completions.create(**kw, extra_body={"top_k": 5}).choices[0].text
    assert b == ref.generate("the cat", max_new_tokens=20, temperature=0.9, top_p=0.9, top_k=5, seed=123)
    full = ref.generate("hello world", max_new_tokens=20)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    r = client.completions.create(model=NAME, prompt="hello world", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=NAME, prompt="hello world", max_tokens=20, temperature=0,
                                            stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text  # no stop-string prefix leaked
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kw,param", [
    ({"n": 2}, "n"), ({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 10_000}, "max_tokens"), ({"logprobs": 2}, "logprobs"),
    ({"prompt": "the " * 300}, "prompt"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"presence_penalty": 1.0}, "presence_penalty"), ({"prompt": [99999]}, "prompt"),
])
def test_invalid_requests_rejected(live, kw, param):
    body = {"model": NAME, "prompt": "the cat", "max_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        live.client().completions.create(**body)
    assert e.value.status_code == 400 and e.value.body["param"] == param and e.value.body["message"]


def test_malformed_bodies_and_unknown_model(live):
    r = httpx.post(live.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": NAME, "messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": NAME, "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400
    with pytest.raises(openai.NotFoundError):
        live.client().completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert httpx.get(live.url + "/health").json()["status"] == "ok"  # still healthy
    assert live.client().completions.create(model=NAME, prompt="x", max_tokens=2).choices[0].text is not None


def test_client_disconnect_frees_row(live):
    with httpx.stream("POST", live.url + "/v1/completions", json={"model": NAME, "prompt": "the", "max_tokens": 200,
                                                                  "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.time() + 10
    while httpx.get(live.url + "/health").json()["active"]:
        assert time.time() < deadline, "cancelled request still holds its row"
        time.sleep(0.05)


def test_queue_limit_429(ckpt):
    app, engine = build(ckpt, max_batch=1, max_queue=1, model_name=NAME, warmup=True)
    step = engine._decode_step  # >= 5 ms per step: a 60-token request holds the row for >= 0.3 s
    engine._decode_step = lambda: (time.sleep(0.005), step())
    srv = LiveServer(app)
    try:
        client = srv.client()
        deadline = time.time() + 60
        while (health := httpx.get(srv.url + "/health").json())["status"] == "starting":
            assert time.time() < deadline, "warm-up did not finish"
            time.sleep(0.05)
        assert health["status"] == "ok" and health["warmup_s"] >= 0  # the start-up's cost, reported once done

        def ask(_):
            try:
                client.completions.create(model=NAME, prompt="the", max_tokens=60, temperature=0,
                                          extra_body={"ignore_eos": True})
                return 200
            except openai.RateLimitError as e:
                return e.status_code

        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(ask, range(6)))
        assert codes.count(429) >= 3 and codes.count(200) >= 1 and set(codes) <= {200, 429}
        assert client.completions.create(model=NAME, prompt="x", max_tokens=2).choices  # answers again after
    finally:
        srv.stop()


def test_engine_queue_is_bounded_without_http(ref):
    engine = Engine(ref, max_batch=2, max_queue=1, max_seq=64)  # not started: nothing leaves the queue
    reqs = [Request([5, 6], SamplingParams(max_tokens=2), lambda ev: None) for _ in range(4)]
    for r in reqs[:3]:
        engine.submit(r)  # two free rows + one queue place
    with pytest.raises(QueueFull):
        engine.submit(reqs[3])


def test_warmup_reports_its_progress(ref):
    engine = Engine(ref, max_batch=2, max_seq=40, warmup=True)
    seen, model = [], engine.model
    engine.model = lambda *a, **kw: (seen.append(engine.stats.get("warmup_step")), model(*a, **kw))[1]
    engine.warmup()
    # 32 prompt lengths (1..32; 64 and up exceed max_seq 40), then each decode batch size (eager on the CPU)
    assert seen[0] == "prompt length 1 (1 of 32)" and seen[31] == "prompt length 32 (32 of 32)"
    assert seen[32:] == ["decode batch 1 of 2", "decode batch 2 of 2"]
    assert "warmup_step" not in engine.stats and engine.stats["warmup_s"] >= 0
    stats = engine.stats  # the start-up's split: prompt lengths, decode batch sizes, the slowest item
    assert 0 <= stats["warmup_prompts_s"] <= stats["warmup_s"] and 0 <= stats["warmup_decode_s"] <= stats["warmup_s"]
    assert stats["warmup_slowest"].startswith(("prompt length ", "decode batch ")) and stats["warmup_slowest"][-2:] == " s"


def test_warmup_with_prompt_graphs_runs_their_buckets_only(ref):
    """With the GPU's prompt path (PrefillGraphs: prompts padded to 64-token buckets) the warm-up runs only the
    lengths prompts can run at, not 1..32 (here eagerly on the CPU, graphs=False)."""
    from bitengine.server.graphs import PrefillGraphs

    engine = Engine(ref, max_batch=1, max_seq=200, warmup=True)
    engine.prefill_graphs = PrefillGraphs(ref, engine.cache, graphs=False)
    seen, model = [], engine.model
    engine.model = lambda *a, **kw: (seen.append((engine.stats.get("warmup_step"), a[0].shape[1])), model(*a, **kw))[1]
    engine.warmup()
    assert seen == [("prompt length 64 (1 of 2)", 64), ("prompt length 128 (2 of 2)", 128), ("decode batch 1 of 1", 1)]


def _sse_events(resp) -> list:
    return [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]


def test_graceful_shutdown_finishes_in_flight(ckpt):
    app, engine = build(ckpt, max_batch=2, max_queue=2, model_name=NAME, drain_timeout=30)
    srv = LiveServer(app, drain=30)
    body = {"model": NAME, "prompt": "the", "max_tokens": 40, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
        events = r.iter_lines()
        first = next(events)
        stopper = threading.Thread(target=srv.stop)
        stopper.start()  # shutdown while the request is running: it must still complete
        rest = [first] + list(events)
    stopper.join(30)
    data = [x[6:] for x in rest if x.startswith("data: ")]
    assert data[-1] == "[DONE]" and json.loads(data[-2])["choices"][0]["finish_reason"] == "length"
    assert not engine.thread.is_alive() and not srv.thread.is_alive()


def test_shutdown_past_drain_timeout_cancels_cleanly(ckpt):
    app, engine = build(ckpt, max_batch=2, max_queue=2, model_name=NAME, drain_timeout=0.3)
    # every decode step takes >= 5 ms, so the 250-token request outlasts the 0.3 s drain on any machine
    # (the tiny model's C++ step alone is well under a millisecond)
    step = engine._decode_step
    engine._decode_step = lambda: (time.sleep(0.005), step())
    srv = LiveServer(app, drain=0.3)
    body = {"model": NAME, "prompt": "the", "max_tokens": 250, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
        events = r.iter_lines()
        first = next(events)
        threading.Thread(target=srv.stop).start()
        rest = [first] + list(events)  # ends cleanly: an error event, then [DONE]
    srv.thread.join(30)
    assert not srv.thread.is_alive() and not engine.thread.is_alive()
    assert engine.active() == 0 and not engine.waiting
    data = [x[6:] for x in rest if x.startswith("data: ")]
    assert data[-1] == "[DONE]" and "shutting down" in json.loads(data[-2])["error"]["message"]
    assert len(data) < 200  # cancelled well before its 250 tokens
