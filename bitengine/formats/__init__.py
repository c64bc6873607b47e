"""What bitengine reads and writes.

A *source* is any checkpoint `bitengine convert` reads. Every source module (hf.py, gguf.py)
returns an object with this interface, so convert.py never looks at file formats:

    config: dict                 HF-style config (architectures, model_type, sizes, rope, tie, ...)
    description: dict            {"format": ..., "path": ..., ...}: recorded in the output's config
    bytes_total: int             bytes of weights in the source (for the summary)
    tensor_names() -> list[str]  HF parameter names (model.layers.0.self_attn.q_proj.weight, ...)
    tensors() -> iterator of (name, value), streamed one at a time in a memory-bounded way, where
        value is a float torch.Tensor, or a TernaryWeight for weights that are already ternary
        (packed BitNet checkpoints: imported as they are, never re-quantized)
    save_tokenizer(dst_dir) -> None   write tokenizer files (tokenizer.json, tokenizer_config.json, ...)

Errors are SourceError (a ValueError) with one line naming the file and the tensor or field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch


class SourceError(ValueError):
    """A source checkpoint that cannot be converted; the message names the file and tensor."""


@dataclasses.dataclass
class TernaryWeight:
    """An already-ternary weight: w_q int8 [N, K] in {-1, 0, 1}; scale float32 (multiplies, W ~= scale * w_q)."""

    w_q: torch.Tensor
    scale: torch.Tensor


def open_source(src: str | Path):
    """Pick the reader for `src`: a .gguf file, or a Hugging Face folder (safetensors or .bin)."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    if src.is_file():
        if src.suffix == ".gguf":
            from .gguf import GGUFSource

            return GGUFSource(src)
        raise SourceError(f"{src}: unsupported file type (expected a .gguf file or a Hugging Face folder)")
    ggufs = sorted(src.glob("*.gguf"))
    if not (src / "config.json").exists() and len(ggufs) == 1:
        from .gguf import GGUFSource

        return GGUFSource(ggufs[0])
    from .hf import HFSource

    return HFSource(src)
