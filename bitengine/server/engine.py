"""Continuous-batching scheduler: one engine thread decodes up to `max_batch` sequences together.

One static KVCache of `max_batch` rows is shared by all requests; each request owns one row while
it runs. A new request is prefilled on its own into a free row (a (1, T) forward over a one-row
view of the cache), then joins the running decode batch: every step runs one token for the rows
[0, hi) (hi = highest busy row + 1) with per-row cache slots (`input_pos` (B, 1)), so the batched
(M > 1) linear kernels serve all requests at once. A finished or cancelled row leaves the batch at
once and its slot is reused; free rows inside [0, hi) compute a throw-away token at slot 0.
On a GPU the decode step replays a CUDA graph per (hi, slot bucket) and each prompt one per (row, 64-token
bucket) (graphs.py; `cuda_graph=False` runs the same shapes eagerly).

Rows never share positions, so batching changes no result beyond float rounding: the ternary
A8 sums are exact integers, and extra masked cache slots add exact zeros to attention. On the CPU
the decode step runs the C++ layers of cpu_decode (as generate() does) when the model qualifies.

Not here: HTTP (app.py), prefix caching, chunked prefill, speculative decoding.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import torch

from ..generate import eos_ids, greedy, sample
from .graphs import CacheView, DecodeGraphs, PrefillGraphs

log = logging.getLogger("bitengine.server")


class QueueFull(RuntimeError):
    """The wait queue is at its limit (HTTP 429)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down or has failed (HTTP 503)."""


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False


@dataclasses.dataclass
class Event:
    """What the engine reports for a request: a text delta, or the end (finish_reason set)."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    completion_tokens: int = 0
    error: str | None = None


class Request:
    """One generation: prompt token ids, sampling parameters, and a thread-safe event sink."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Event], None]):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.cancelled = False  # set by the HTTP side (client gone); read by the engine thread
        self.out_ids: list[int] = []
        self.emitted = ""  # text already sent
        self.row = -1
        self.length = 0  # cache slots filled
        self.created = time.monotonic()
        self.generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled = True


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (so a warm-up item's time is its own, not the next one's)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Engine:
    """Owns the model and its KV cache; `submit()` from any thread, `run()` on the engine thread."""

    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, max_seq: int | None = None,
                 warmup: bool = False, cuda_graph: bool = True, compile: bool = False):
        """cuda_graph: on a GPU, replay the decode step from CUDA graphs (else the same shapes eagerly).
        compile: on a GPU, torch.compile the decoder layers first (as generate(compile=True))."""
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.model, self.tokenizer = model, getattr(model, "tokenizer", None)
        # the engine thread decodes with its own copy: a Rust tokenizer borrowed by two threads can raise
        self._detok = copy.deepcopy(self.tokenizer)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_seq = min(max_seq or model.max_seq, model.max_seq)
        self.device = model.device
        self.cache = model.new_cache(batch=max_batch, max_seq=self.max_seq)
        # on the CPU, decode steps run the C++ layers (cpu_decode) when the model qualifies
        self.cpp_layers = None
        if self.device.type == "cpu" and self.cache.k0.dtype == torch.float32:
            from .. import cpu_decode

            self.cpp_layers = cpu_decode.plan(model)
        # on a GPU, decode steps run through DecodeGraphs: captured per (rows, slot bucket), or eagerly on the same
        # views with cuda_graph=False
        self.decode_graphs = self.prefill_graphs = None
        if self.device.type == "cuda":
            if compile:
                model.compile_layers()
            self.decode_graphs = DecodeGraphs(model, self.cache, graphs=cuda_graph)
            # each request's prompt too: per row and 64-token bucket, in the decode graphs' pool
            self.prefill_graphs = PrefillGraphs(model, self.cache, graphs=cuda_graph, pool=self.decode_graphs.pool)
        self.decode_path = ("C++ layers" if self.cpp_layers is not None else
                            "CUDA graphs" if self.decode_graphs is not None and self.decode_graphs.graphs else
                            "PyTorch layers")
        self.eos = eos_ids(model)
        self.rows: list[Request | None] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.lock = threading.Condition()
        self.accepting, self.running, self.failed = True, False, None
        self.deadline: float | None = None  # drain deadline (monotonic), set by begin_drain
        self.thread: threading.Thread | None = None
        self.stats = {"requests": 0, "tokens": 0, "steps": 0, "max_active": 0, "slowest_prefill_s": 0.0,
                      "slowest_step_s": 0.0, "steps_over_1s": 0}  # the timings find stalls (e.g. a kernel compiling)
        self.warmup_pending = warmup  # /health answers 503 "starting" until the warm-up is done

    # ---- control (any thread) -------------------------------------------------------------------
    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self.run, name="bitengine-engine", daemon=True)
        self.thread.start()

    def submit(self, req: Request) -> None:
        with self.lock:
            if not self.accepting or self.failed:
                raise EngineStopped(self.failed or "server is shutting down")
            free = self.rows.count(None)
            if len(self.waiting) >= self.max_queue + free:  # free rows take new requests at once
                raise QueueFull(f"{self.active()} requests running and {len(self.waiting)} queued (limit {self.max_queue})")
            self.waiting.append(req)
            self.lock.notify()

    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    def begin_drain(self, timeout: float) -> None:
        """Refuse new requests; running and queued ones may finish for `timeout` s, then are cancelled."""
        with self.lock:
            self.accepting = False
            deadline = time.monotonic() + timeout
            self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)
            self.lock.notify()

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Drain (see begin_drain), cancel what is left, and join the engine thread."""
        self.begin_drain(drain_timeout)
        while time.monotonic() < self.deadline and (self.active() or self.waiting) and not self.failed:
            time.sleep(0.02)
        with self.lock:
            self.running = False
            self.lock.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)
        self._cancel_all("cancelled")

    def _cancel_all(self, reason: str, error: str | None = None) -> None:
        with self.lock:
            reqs = list(self.waiting) + [r for r in self.rows if r is not None]
            self.waiting.clear()
        for req in reqs:
            self._finish(req, reason, error)

    # ---- engine thread --------------------------------------------------------------------------
    def warmup(self) -> None:
        """Run every decode batch size 1..max_batch and prefill lengths 1..32, 64..1024 once (on a GPU, whose
        prompts run padded to 64-token buckets, those lengths' buckets: 64, 128, ..., 1024), so the kernels'
        compilation and autotuning (Triton: per M, or M bucket) and, on a GPU, the decode graphs' capture for the
        first slot bucket happen before the first request, not during it."""
        t0 = time.monotonic()
        limit = min(self.max_seq, 1025)  # small M: kernels specialize per M; larger: per power-of-two bucket
        dev, lens = self.device, sorted((set(range(1, 33)) | {1 << i for i in range(6, 11)}) & set(range(1, limit)))
        if self.prefill_graphs is not None:  # a GPU's prompts run padded to 64-token buckets (PrefillGraphs): only
            lens = sorted({self.prefill_graphs.rows[0].bucket_len(t) for t in lens})  # those lengths ever run
        slowest = (0.0, "")
        with torch.inference_mode():
            for i, t in enumerate(lens):
                # /health shows how far start-up got (a slow start and a stuck one look alike from outside)
                self.stats["warmup_step"] = f"prompt length {t} ({i + 1} of {len(lens)})"
                t1 = time.monotonic()
                pos = torch.arange(t, device=dev)
                self.model(torch.zeros(1, t, dtype=torch.long, device=dev), cache=CacheView(self.cache, 0, 1),
                           input_pos=pos, position_ids=pos[None], kv_len=t, last_only=True)
                _sync(dev)
                slowest = max(slowest, (time.monotonic() - t1, f"prompt length {t}"))
            t_prompts = time.monotonic()
            for hi in range(1, self.max_batch + 1):
                self.stats["warmup_step"] = f"decode batch {hi} of {self.max_batch}"
                t1 = time.monotonic()
                if self.decode_graphs is not None:  # also captures each batch size's graph for the first slot bucket
                    self.decode_graphs([0] * hi, [0] * hi)
                else:
                    zeros = torch.zeros(hi, 1, dtype=torch.long, device=dev)
                    self.model(zeros, cache=CacheView(self.cache, 0, hi), input_pos=zeros, position_ids=zeros,
                               kv_len=1)
                _sync(dev)
                slowest = max(slowest, (time.monotonic() - t1, f"decode batch {hi}"))
        del self.stats["warmup_step"]
        # where start-up time goes (/health): the prompt lengths (kernel compilation and autotuning per shape), the
        # decode batch sizes (graph captures on a GPU), and the slowest single item
        self.stats["warmup_prompts_s"] = round(t_prompts - t0, 2)
        self.stats["warmup_decode_s"] = round(time.monotonic() - t_prompts, 2)
        self.stats["warmup_slowest"] = f"{slowest[1]}: {slowest[0]:.2f} s"
        self.stats["warmup_s"] = round(time.monotonic() - t0, 2)  # /health reports it (start-up cost, graphs included)
        log.info("warm-up: %d prefill lengths and decode batches 1..%d in %.1f s", len(lens), self.max_batch,
                 self.stats["warmup_s"])

    def run(self) -> None:
        try:
            if self.warmup_pending:
                self.warmup()
                self.warmup_pending = False
            while True:
                with self.lock:
                    while self.running and not self.waiting and not self.active():
                        self.lock.wait(timeout=0.5)
                    if not self.running:
                        return
                if self.deadline is not None and time.monotonic() > self.deadline:
                    self._cancel_all("cancelled")
                    continue
                self._drop_cancelled()
                self._admit()
                if self.active():
                    self._decode_step()
        except Exception as e:
            log.exception("engine failed")
            self.failed = f"engine failed: {type(e).__name__}: {e}"
            self._cancel_all("error", self.failed)

    def _drop_cancelled(self) -> None:
        for req in self.rows:
            if req is not None and req.cancelled:
                self._finish(req, "cancelled")
        with self.lock:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                self._finish(req, "cancelled")

    def _admit(self) -> None:
        """Prefill one waiting request into the lowest free row (one per step keeps decode latency even)."""
        with self.lock:
            if not self.waiting or None not in self.rows:
                return
            req = self.waiting.popleft()
            row = self.rows.index(None)
            self.rows[row] = req
        req.row, t = row, len(req.prompt_ids)
        if req.params.seed is not None or req.params.temperature > 0:
            req.generator = torch.Generator(device=self.device)
            req.generator.manual_seed(req.params.seed) if req.params.seed is not None else req.generator.seed()
        t0 = time.perf_counter()
        with torch.inference_mode():
            if self.prefill_graphs is not None:
                logits = self.prefill_graphs(row, req.prompt_ids)  # (1, V)
            else:
                ids = torch.tensor([req.prompt_ids], device=self.device)  # (1, T)
                pos = torch.arange(t, device=self.device)
                logits = self.model(ids, cache=CacheView(self.cache, row, row + 1), input_pos=pos,
                                    position_ids=pos[None], kv_len=t, last_only=True)[:, -1].float()  # (1, V)
        req.length = t
        self.stats["requests"] += 1
        first = self._sample([req], logits)
        self.stats["slowest_prefill_s"] = max(self.stats["slowest_prefill_s"], round(time.perf_counter() - t0, 4))
        self._accept_tokens([req], first)

    def _decode_step(self) -> None:
        busy = [r for r in self.rows if r is not None]
        hi = max(r.row for r in busy) + 1
        self.stats["max_active"] = max(self.stats["max_active"], len(busy))
        t0 = time.perf_counter()
        tokens, slots = [0] * hi, [0] * hi  # free rows: token 0 at slot 0 (overwritten by their next prefill)
        for r in busy:
            tokens[r.row], slots[r.row] = r.out_ids[-1], r.length
        with torch.inference_mode():
            if self.decode_graphs is not None:
                logits = self.decode_graphs(tokens, slots)  # (hi, V)
            else:
                tok = torch.tensor(tokens, device=self.device)[:, None]  # (hi, 1)
                pos = torch.tensor(slots, device=self.device)[:, None]  # (hi, 1): per-row cache slot = rotary position
                view = CacheView(self.cache, 0, hi)
                if self.cpp_layers is not None:
                    from .. import cpu_decode

                    logits = cpu_decode.decode_rows(self.model, self.cpp_layers, view, tok, pos.view(-1))  # (hi, V)
                else:
                    logits = self.model(tok, cache=view, input_pos=pos, position_ids=pos,
                                        kv_len=max(slots) + 1)[:, -1].float()  # (hi, V)
        for r in busy:
            r.length += 1
        self.stats["steps"] += 1
        nxt = self._sample(busy, logits[[r.row for r in busy]])
        took = time.perf_counter() - t0
        self.stats["slowest_step_s"] = max(self.stats["slowest_step_s"], round(took, 4))
        self.stats["steps_over_1s"] += took > 1.0
        self._accept_tokens(busy, nxt)

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> list[int]:
        """One token per request from logits (len(reqs), V): argmax for greedy rows, else its own generator."""
        out = greedy(logits).tolist()
        for i, r in enumerate(reqs):
            p = r.params
            if p.temperature > 0:
                out[i] = int(sample(logits[i:i + 1], temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                    generator=r.generator)[0])
        return out

    def _accept_tokens(self, reqs: list[Request], tokens: list[int]) -> None:
        for req, token in zip(reqs, tokens):
            p = req.params
            if token in self.eos and not p.ignore_eos:
                self._finish(req, "stop")
                continue
            req.out_ids.append(token)
            self.stats["tokens"] += 1
            stopped = self._emit_text(req)
            if stopped:
                self._finish(req, "stop")
            elif len(req.out_ids) >= p.max_tokens or req.length + 1 >= self.max_seq:
                self._finish(req, "length")

    def _emit_text(self, req: Request, final: bool = False) -> bool:
        """Send the new text of req (holding back an incomplete character or a possible stop prefix); True on a stop."""
        text, hit = _cut(self._detok.decode(req.out_ids, skip_special_tokens=True), req.params.stop)
        if not (hit or final):
            if text.endswith("\ufffd"):
                return False
            hold = max((len(s) - 1 for s in req.params.stop), default=0)
            text = text[:len(text) - hold] if hold else text
        if len(text) > len(req.emitted) and text.startswith(req.emitted):
            req.sink(Event(text=text[len(req.emitted):]))
            req.emitted = text
        return hit

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req.row == -2:
            return
        if reason in ("stop", "length"):
            self._emit_text(req, final=True)
        with self.lock:
            if 0 <= req.row < len(self.rows) and self.rows[req.row] is req:
                self.rows[req.row] = None
        req.row = -2  # finished: never reported twice
        req.sink(Event(finish_reason=reason, completion_tokens=len(req.out_ids), error=error))


def async_sink(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Queue, Callable[[Event], None]]:
    """An asyncio.Queue on `loop` and a sink that the engine thread can call to fill it."""
    queue: asyncio.Queue = asyncio.Queue()

    def sink(ev: Event) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, ev)
        except RuntimeError:  # the loop is closed: the client is gone
            pass

    return queue, sink
