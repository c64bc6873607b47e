"""The bitengine checkpoint: a folder that `bitengine convert` writes and `bitengine.load` reads.

Layout (format version 1; full spec in docs/FORMAT.md):
    config.json            the architecture (Hugging Face keys) plus a "bitengine" block
    model.safetensors      or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer files        as the source had them
Tensors, for a linear module M (e.g. model.layers.0.mlp.down_proj):
    ternary: M.weight_packed  uint8   [N, ceil(K/4)]   layout k4 (quant.py): 4 weights per byte
             M.weight_scale   float32 [1] | [N] | [N, K/G]  multiplies: W ~= scale * (code - 1)
    16-bit:  M.weight         float16/bfloat16 [N, K]
    M.bias (16-bit [N]) when the architecture has one; everything else (embeddings, norms, the
    head unless converted) in 16-bit under its transformers name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ConfigError, read_json

FORMAT_VERSION = 1
SHARD_BYTES = 2 * 1024**3
ST_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class CheckpointError(ValueError):
    """A bitengine checkpoint that cannot be loaded (message names the file and tensor)."""


class ShardWriter:
    """Buffers tensors and writes safetensors shards of at most `shard_bytes` (plus one tensor)."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES):
        self.folder = Path(folder)
        self.shard_bytes = shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.shards: list[tuple[str, list[str]]] = []
        self.bytes_written = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.buffer[name] = tensor.contiguous()
        self.buffered += tensor.numel() * tensor.element_size()
        if self.buffered >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        fname = f"shard-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.buffer, str(self.folder / fname), metadata={"format": "pt"})
        self.shards.append((fname, list(self.buffer)))
        self.bytes_written += self.buffered
        self.buffer, self.buffered = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give shards their final names and the index; returns file names."""
        self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.folder / self.shards[0][0], self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (tmp, keys) in enumerate(self.shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / final)
            names.append(final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.bytes_written}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


class CheckpointReader:
    """Opens a bitengine checkpoint folder: config, the bitengine block, and lazily read tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: not a bitengine checkpoint folder")
        self.config = read_json(self.path / "config.json")
        block = self.config.get("bitengine")
        if not isinstance(block, dict):
            raise ConfigError(f"{self.path / 'config.json'}: no 'bitengine' block; convert the model first "
                              f"(bitengine convert SRC {self.path})")
        if block.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"{self.path / 'config.json'}: unsupported bitengine format_version "
                              f"{block.get('format_version')!r} (this build reads {FORMAT_VERSION})")
        self.block = block
        self.files = self._files()
        self.index: dict[str, Path] = {}
        self.meta: dict[str, tuple[str, tuple]] = {}
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        sl = h.get_slice(k)
                        self.index[k] = f
                        self.meta[k] = (sl.get_dtype(), tuple(sl.get_shape()))
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{f}: unreadable safetensors file ({str(e).splitlines()[0]})") from None

    def _files(self) -> list[Path]:
        idx = self.path / "model.safetensors.index.json"
        if idx.exists():
            files = sorted({self.path / v for v in read_json(idx).get("weight_map", {}).values()})
        else:
            files = [self.path / "model.safetensors"]
        for f in files:
            if not f.exists():
                raise FileNotFoundError(f"{f}: weight file missing from the checkpoint")
        return files

    def tensor(self, name: str, device="cpu") -> torch.Tensor:
        with safe_open(str(self.index[name]), framework="pt", device=str(device)) as h:
            return h.get_tensor(name)

    def weight_bytes(self) -> int:
        total = 0
        for dt, shape in self.meta.values():
            n = 1
            for d in shape:
                n *= d
            total += n * ST_DTYPES[dt].itemsize if dt in ST_DTYPES else 0
        return total


def atomic_folder(dst: Path) -> Path:
    """A fresh temporary folder beside `dst` (same filesystem, so the final rename is atomic)."""
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp
