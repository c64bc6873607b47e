"""The decode step captured as a CUDA graph: one replay per token, no launch overhead, no host sync.

The captured step attends over every cache slot (fixed shapes); slots past the current position
are masked, so whatever the warm-up wrote there is overwritten before it is ever read.
"""

from __future__ import annotations

import torch


def bucketed(n: int, step: int, cap: int) -> int:
    """n rounded up to a multiple of step, at most cap: the fixed sizes graphs are captured at (one graph per bucket
    used, so a few buckets serve every length)."""
    return min(-(-n // step) * step, cap)


def capture(fn, device, warmup: int = 1, pool=None):
    """(graph, out): fn() run `warmup` times on a side stream (compiles, autotuning, lazy init and the allocator's
    first blocks happen outside the capture), then captured once into `pool` (None: a private pool). out is the
    captured call's output, rewritten by every graph.replay()."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class GraphDecoder:
    """(tokens (B, 1), slot int) -> logits (B, V) float32, replaying one captured forward."""

    def __init__(self, model, cache, position_offset: torch.Tensor, warmup: int = 2, compile: bool = False):
        b, dev = cache.batch, cache.valid.device
        if compile:
            model.compile_layers()  # fused norms/RoPE/attention glue inside the captured step
        self.offset = position_offset
        self.tokens = torch.zeros(b, 1, dtype=torch.long, device=dev)
        self.pos = torch.full((1,), cache.max_seq - 1, dtype=torch.long, device=dev)  # warm up on the last slot
        self.positions = torch.zeros(b, 1, dtype=torch.long, device=dev)

        def step():
            return model(self.tokens, cache=cache, input_pos=self.pos, position_ids=self.positions)[:, -1].float()

        self.graph, self.logits = capture(step, dev, warmup=warmup)

    def __call__(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.pos.fill_(slot)
        self.positions.copy_(self.offset[:, None]).neg_().add_(slot)  # rotary positions: slot minus padding
        self.graph.replay()
        return self.logits
