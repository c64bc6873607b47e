"""The reference backend: plain PyTorch on any device (unpack, then float matmul)."""

from __future__ import annotations

import torch

from ..reference import ternary_linear_reference
from . import register


class ReferenceBackend:
    name = "reference"

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    def prepare(self, layer) -> None:
        pass  # works straight from the on-disk layout

    def fuses_adapter(self, layer) -> bool:
        return False

    def linear(self, x: torch.Tensor, layer) -> torch.Tensor:
        return ternary_linear_reference(
            x, layer.weight_packed, layer.weight_scale, layer.in_features, layer.act_bits, layer.bias
        )


register(ReferenceBackend())
