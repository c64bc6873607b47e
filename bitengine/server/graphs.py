"""The server's decode step (and each request's prompt) replayed from CUDA graphs over the engine's shared KV cache.

Why: on a GPU the engine's eager step is host-bound (a few hundred small launches per token, issued from Python), as
generate()'s was before it captured its step (README: the graph is what takes a 7B step from host speed to kernel
speed). How: the step's tokens and per-row cache slots go into static buffers; rows [0, hi) of the cache, cut to their
first S slots (S = the highest slot + 1, rounded up to BUCKET), are a view of fixed shape, so one graph serves every
step with that (hi, S). The step attends over all S slots of the view (kv_len None): each row's causal mask (its own
slot) hides the slots past its token, as the eager step's kv_len did. A graph is captured on the first step with its
(hi, S) (an eager warm-up forward, then the capture), all of them in one memory pool: steps replay one at a time and
their logits are copied out before the next replay.

With graphs=False (or off CUDA) the same views run eagerly: the engine's `cuda_graph=False`, and what the CPU tests
check against the plain eager step.
"""

from __future__ import annotations

import functools

import torch

from ..cuda_graph import bucketed, capture

BUCKET = 256  # slot counts round up to a multiple of this: at most max_seq / BUCKET graphs per batch size


class CacheView:
    """Rows [lo, hi) and slots [0, slots) of a KVCache, as views (writes land in the shared buffers)."""

    def __init__(self, cache, lo: int, hi: int, slots: int | None = None):
        s = cache.max_seq if slots is None else slots
        for i in range(cache.num_layers):  # (hi-lo, n_kv, s, hd) per layer
            setattr(self, f"k{i}", getattr(cache, f"k{i}")[lo:hi, :, :s])
            setattr(self, f"v{i}", getattr(cache, f"v{i}")[lo:hi, :, :s])
        self.valid = cache.valid[lo:hi, :s]
        self.num_layers, self.batch, self.max_seq, self.device = cache.num_layers, hi - lo, s, cache.device


class PrefillGraphs:
    """A request's prompt forward into its row of the shared cache, replayed from CUDA graphs: one GraphPrefill
    (prefill_graph.py: the prompt padded at its end to a multiple of 64 tokens, one graph per multiple) per row, over
    that row's view, all in one pool (`pool`: the decode graphs'). The padding's K / V land in the row's slots past
    the prompt, which its decode steps overwrite before any token of the row attends to them (each row's mask stops
    at its own token). A (row, bucket) graph is captured on its first prompt: the first request of each pays one
    eager forward and the capture on top."""

    def __init__(self, model, cache, graphs: bool | None = None, pool=None):
        from ..prefill_graph import GraphPrefill

        self.rows = [GraphPrefill(model, CacheView(cache, r, r + 1), graphs=graphs, pool=pool)
                     for r in range(cache.batch)]
        self.device = cache.device

    def __call__(self, row: int, prompt_ids: list[int]) -> torch.Tensor:
        """The prompt's K / V into row `row`'s slots [0, T); the logits (1, V) float32 of its last token."""
        t = len(prompt_ids)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        return self.rows[row](ids, torch.arange(t, device=self.device)[None])


class DecodeGraphs:
    """(tokens, slots) of the busy rows [0, hi) (free rows inside: any token at slot 0) -> logits (hi, V) float32."""

    def __init__(self, model, cache, bucket: int = BUCKET, graphs: bool | None = None):
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        dev = cache.device
        self.model, self.cache, self.bucket = model, cache, bucket
        self.graphs = dev.type == "cuda" if graphs is None else graphs
        if self.graphs and dev.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA cache, got one on {dev}")
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=dev)
        self.slots = torch.zeros(cache.batch, 1, dtype=torch.long, device=dev)  # = rotary positions (no padding)
        self.captured: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None

    def slot_count(self, needed: int) -> int:
        """The slots a step whose highest slot is needed - 1 attends over: rounded up to the bucket, at most the
        cache's."""
        return bucketed(needed, self.bucket, self.cache.max_seq)

    def __call__(self, tokens: list[int], slots: list[int]) -> torch.Tensor:
        hi = len(tokens)
        if not 1 <= hi <= self.cache.batch or len(slots) != hi:
            raise ValueError(f"DecodeGraphs: {len(tokens)} tokens and {len(slots)} slots for a cache of "
                             f"{self.cache.batch} rows")
        if max(slots) >= self.cache.max_seq or min(slots) < 0:
            raise ValueError(f"DecodeGraphs: slots {min(slots)}..{max(slots)} outside the cache's {self.cache.max_seq}")
        s = self.slot_count(max(slots) + 1)
        self.tokens[:hi, 0].copy_(torch.tensor(tokens, dtype=torch.long))
        self.slots[:hi, 0].copy_(torch.tensor(slots, dtype=torch.long))
        if not self.graphs:
            return self._forward(hi, s)
        if (hi, s) not in self.captured:
            self.captured[hi, s] = self._capture(hi, s)
        graph, out = self.captured[hi, s]
        graph.replay()
        return out.clone()  # the next replay (another (hi, S), same pool) may reuse this memory

    def _forward(self, hi: int, s: int) -> torch.Tensor:
        view = CacheView(self.cache, 0, hi, s)
        return self.model(self.tokens[:hi], cache=view, input_pos=self.slots[:hi],
                          position_ids=self.slots[:hi])[:, -1].float()

    def _capture(self, hi: int, s: int):
        # the warm-up call writes the same K / V the replay writes again
        return capture(functools.partial(self._forward, hi, s), self.cache.device, pool=self.pool)
