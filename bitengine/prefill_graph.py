"""Prompt forwards (prefill) replayed from CUDA graphs, one graph per prompt-length bucket, over one KV cache.

Why: a prompt's forward is host-bound on an H200. Profiled for BitNet-2B-4T at 512 tokens
(bench/results/gpu_prefill_host_8662f79_NVIDIA_H200_2026-12-03): 655 kernels with 5.9 ms of GPU time took 45.6 ms
of host time to issue (custom-op dispatch, Triton's Python launcher, the compiled layers' wrappers); at 2048 tokens
19.6 ms of kernels still waited on 38 ms of host. A graph replay issues them all in one call.

How: the prompt (B, T) is written into static buffers and padded at its end to L = T rounded up to a multiple of
`bucket` (at most the cache's length); the graph for L runs the forward over slots [0, L) and returns the logits of
token T - 1 (CausalLM.forward's last_index, a static tensor). The padding tokens come after every prompt token, so
under the causal mask no prompt token sees them; they write K / V into slots [T, L), which the decode steps overwrite
before any token attends to them (a decode token writes its own slot first and never sees later ones). Each bucket's
graph is captured on its first use (one eager warm-up forward, then the capture); all buckets share one memory pool,
so they cost about the largest bucket's activations. An output is consumed (cloned) before the next replay: a later
graph in the pool may reuse an earlier one's memory.

Off CUDA (or with graphs=False) the same padded forward runs eagerly: what the tests on the CPU check against the
unpadded forward.
"""

from __future__ import annotations

import functools

import torch

from .cuda_graph import bucketed, capture

BUCKET = 64  # prompt lengths round up to a multiple of this: one graph per multiple that a prompt has used


class GraphPrefill:
    """(ids (B, T) int64, positions (B, T) int64) -> logits (B, V) float32 of each row's last token, with the
    tokens' K / V written into `cache` slots [0, T) (and padding into [T, L))."""

    def __init__(self, model, cache, bucket: int = BUCKET, graphs: bool | None = None, pool=None):
        """pool: a torch.cuda.graph_pool_handle() to capture into (the server shares one among its rows' prefill
        graphs and its decode graphs; they never replay at once), else a pool of its own."""
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        b, s, dev = cache.batch, cache.max_seq, cache.device
        self.model, self.cache, self.bucket = model, cache, bucket
        self.graphs = dev.type == "cuda" if graphs is None else graphs
        if self.graphs and dev.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA cache, got one on {dev}")
        self.ids = torch.zeros(b, s, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, s, dtype=torch.long, device=dev)
        self.slots = torch.arange(s, device=dev)
        self.last = torch.zeros(1, dtype=torch.long, device=dev)
        self.captured: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = (pool if pool is not None else torch.cuda.graph_pool_handle()) if self.graphs else None

    def bucket_len(self, t: int) -> int:
        """The padded length a prompt of t tokens runs at: t rounded up to the bucket, at most the cache length."""
        return bucketed(t, self.bucket, self.cache.max_seq)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        if b != self.cache.batch or tuple(positions.shape) != (b, t):
            raise ValueError(f"GraphPrefill: ids {tuple(ids.shape)} and positions {tuple(positions.shape)} must be "
                             f"({self.cache.batch}, T) for this cache")
        if not 1 <= t <= self.cache.max_seq:
            raise ValueError(f"GraphPrefill: a prompt of {t} tokens does not fit the cache's {self.cache.max_seq} "
                             "slots")
        n = self.bucket_len(t)
        self.ids[:, :t].copy_(ids)
        self.ids[:, t:n].zero_()  # padding: token 0 at rotary position 0 (its outputs are never used)
        self.positions[:, :t].copy_(positions)
        self.positions[:, t:n].zero_()
        self.last.fill_(t - 1)
        if not self.graphs:
            return self._forward(n)
        if n not in self.captured:
            self.captured[n] = self._capture(n)
        graph, out = self.captured[n]
        graph.replay()
        return out.clone()  # another bucket's replay may reuse this memory (one pool)

    def _forward(self, n: int) -> torch.Tensor:
        return self.model(self.ids[:, :n], cache=self.cache, input_pos=self.slots[:n],
                          position_ids=self.positions[:, :n], kv_len=n, last_index=self.last)[:, -1].float()

    def _capture(self, n: int):
        return capture(functools.partial(self._forward, n), self.cache.device, pool=self.pool)
