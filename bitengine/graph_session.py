"""What generate() keeps between calls on a CUDA device: one KV cache, its captured decode step and its captured
prompt forwards (prefill_graph.py), so a second call of the same batch size and cache length captures nothing.

Before this, every generate() call made a new cache and captured its decode step again (two warm-up steps and a
capture) and ran the prompt eagerly (host-bound: see prefill_graph.py). A session is made for (batch size, cache
length, compiled or not) and replaced when a call needs another; the cache length is the call's prompt + new tokens
rounded up to CAPACITY_STEP, so calls of similar sizes share one and a call's shapes never depend on earlier calls (the
eager path, cuda_graph=False, uses the same length: eager and graph decoding run the same kernels on the same shapes).
One session per model: it holds its cache and graph memory until the model is freed or release_graphs(model) is
called (also done when adapters change: the graphs hold the old weights' addresses).
"""

from __future__ import annotations

import torch

from .cuda_graph import bucketed
from .prefill_graph import GraphPrefill

CAPACITY_STEP = 256


def cache_capacity(model, needed: int) -> int:
    """The cache length for a call that needs `needed` slots: rounded up to CAPACITY_STEP, at most the model's
    context (which generate() already keeps needed within)."""
    return bucketed(needed, CAPACITY_STEP, max(model.max_seq, needed))


def mask_padding(cache, offset: torch.Tensor) -> None:
    """Set the cache's slot mask for rows left-padded by `offset` (B,): each row's slots before its first token are
    hidden."""
    slots = torch.arange(cache.max_seq, device=offset.device)
    cache.valid.copy_(slots[None, :] >= offset[:, None])


class GraphSession:
    """One cache of `capacity` slots for `batch` rows, with its GraphPrefill and (made on first use) GraphDecoder."""

    def __init__(self, model, batch: int, capacity: int, compile: bool):
        self.model, self.batch, self.capacity, self.compile = model, batch, capacity, compile
        if compile:
            model.compile_layers()  # before any capture (GraphDecoder would do it too, after the prefill's)
        self.cache = model.new_cache(batch=batch, max_seq=capacity)
        self.offset = torch.zeros(batch, dtype=torch.long, device=self.cache.device)  # left padding per row
        self.prefill = GraphPrefill(model, self.cache)
        self._decoder = None
        self.busy = False  # a generate() call is running on it (set and cleared by generate)

    def start(self, pad: list[int]) -> None:
        """A new call: its rows' left padding; the cache's slot mask hides the padding (stale slots past the prompt
        are written by the call before they are read)."""
        self.offset.copy_(torch.tensor(pad, dtype=torch.long))
        mask_padding(self.cache, self.offset)

    def decoder(self):
        if self._decoder is None:
            from .cuda_graph import GraphDecoder

            self._decoder = GraphDecoder(self.model, self.cache, self.offset, compile=self.compile)
        return self._decoder


def session_for(model, batch: int, needed: int, compile: bool) -> GraphSession:
    """The model's session if it fits this call exactly (same batch, cache length and compile flag), else a new one
    (the old one released first, so two never hold memory at once). While a call runs on the kept session (a
    streaming generate() not yet finished), another call gets a session of its own that is not kept."""
    capacity = cache_capacity(model, needed)
    session = model.__dict__.get("_graph_session")
    if session is not None and session.busy:
        return GraphSession(model, batch, capacity, compile)
    if session is not None and (session.batch, session.capacity, session.compile) == (batch, capacity, compile):
        return session
    release_graphs(model)
    session = GraphSession(model, batch, capacity, compile)
    model.__dict__["_graph_session"] = session  # outside the module tree (state_dict unchanged)
    return session


def release_graphs(model) -> None:
    """Drop the model's session (its cache and captured graphs); their memory returns at the next collection."""
    model.__dict__.pop("_graph_session", None)
