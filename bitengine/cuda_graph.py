"""The decode step captured as a CUDA graph: one replay per token, no launch overhead, no host sync.

The captured step attends over every cache slot (fixed shapes); slots past the current position
are masked, so whatever the warm-up wrote there is overwritten before it is ever read.
"""

from __future__ import annotations

import torch


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

        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up outside capture: autotuning, lazy init, allocator
            for _ in range(warmup):
                step()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step()

    def __call__(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.pos.fill_(slot)
        self.positions.copy_(self.offset[:, None]).neg_().add_(slot)  # rotary positions: slot minus padding
        self.graph.replay()
        return self.logits
