"""Read Hugging Face checkpoint folders: Llama family, BitNet (latent or transformers-packed).

Weights: `model.safetensors`, sharded safetensors with `model.safetensors.index.json`, or
`pytorch_model*.bin` (loaded with weights_only=True and mmap). Tensors are streamed one at a time.

transformers' packed BitNet format (`quantization_config.quant_method == "bitnet"`, offline):
uint8 [N/4, K] where bits 2i..2i+1 of packed[r, :] hold output row i*(N/4) + r, code = w + 1, and
`weight_scale` [1] DIVIDES for linear_class "bitlinear" (y = acc / (a * ws)) but MULTIPLIES for
"autobitlinear". Both are imported exactly as TernaryWeight with bitengine's multiplying scale.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..config import ModelConfig, read_json
from . import SourceError, TernaryWeight

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I32": 4, "I64": 8}


def unpack_transformers_bitnet(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """transformers' pack_weights layout (uint8 [N/4, K], packed along rows) -> int8 [N, K] in {-1, 0, 1}."""
    parts = [((packed >> (2 * i)) & 3) for i in range(4)]  # part i holds rows i*R .. i*R+R-1
    codes = torch.cat(parts, dim=0)[:out_features]
    if (codes == 3).any():
        raise ValueError("packed BitNet weight holds the invalid code 3")
    return codes.to(torch.int8) - 1


class HFSource:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.config = read_json(self.folder / "config.json")
        self.model_config = ModelConfig.from_hf(self.config, str(self.folder / "config.json"))
        qc = self.config.get("quantization_config") or {}
        self.packed_bitnet = qc.get("quant_method") == "bitnet" and qc.get("quantization_mode", "offline") == "offline"
        if qc and qc.get("quant_method") != "bitnet":
            raise SourceError(f"{self.folder / 'config.json'}: unsupported quantization_config "
                              f"quant_method {qc.get('quant_method')!r} (only BitNet checkpoints are pre-quantized)")
        self.linear_class = qc.get("linear_class", "bitlinear")
        if self.packed_bitnet and self.linear_class not in ("bitlinear", "autobitlinear"):
            raise SourceError(f"{self.folder / 'config.json'}: unknown BitNet linear_class {self.linear_class!r}")
        self.files, self.kind = self._weight_files()
        self._index = self._build_index()  # name -> file
        self.description = {"format": f"hf-{self.kind}", "path": str(self.folder.resolve()),
                            "architectures": self.config.get("architectures"),
                            "torch_dtype": self.config.get("torch_dtype") or self.config.get("dtype"),
                            "quantization": qc or None}

    # -- discovery --------------------------------------------------------------------------
    def _weight_files(self):
        f = self.folder
        for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
            if (f / index_name).exists():
                index = read_json(f / index_name)
                shards = sorted(set((index.get("weight_map") or {}).values()))
                if not shards:
                    raise SourceError(f"{f / index_name}: empty weight_map")
                missing = [s for s in shards if not (f / s).exists()]
                if missing:
                    raise SourceError(f"{f / missing[0]}: shard listed in {index_name} is missing")
                return [f / s for s in shards], kind
        st = sorted(f.glob("*.safetensors"))
        if st:
            return st, "safetensors"
        bins = sorted(f.glob("pytorch_model*.bin"))
        if bins:
            return bins, "bin"
        raise SourceError(f"{f}: no weights found (expected *.safetensors or pytorch_model*.bin)")

    def _build_index(self) -> dict:
        index = {}
        self._bin_cache = {}
        self.bytes_total = 0
        for path in self.files:
            if self.kind == "safetensors":
                try:
                    from safetensors import safe_open

                    with safe_open(str(path), framework="pt") as h:
                        for k in h.keys():
                            index[k] = path
                            sl = h.get_slice(k)
                            n = 1
                            for d in sl.get_shape():
                                n *= d
                            self.bytes_total += n * _DTYPE_BYTES.get(sl.get_dtype(), 2)
                except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
                    raise SourceError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
                expected_end = _safetensors_data_end(path)
                if expected_end > path.stat().st_size:
                    raise SourceError(f"{path}: truncated safetensors file ({path.stat().st_size} bytes, "
                                      f"header describes {expected_end})")
            else:
                sd = self._load_bin(path)
                for k, v in sd.items():
                    index[k] = path
                    self.bytes_total += v.numel() * v.element_size()
        return index

    def _load_bin(self, path: Path) -> dict:
        if path not in self._bin_cache:
            try:
                sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001
                raise SourceError(f"{path}: unreadable PyTorch checkpoint ({str(e).splitlines()[0]})") from None
            if not isinstance(sd, dict):
                raise SourceError(f"{path}: expected a state dict")
            self._bin_cache = {path: sd}  # keep one file mapped at a time
        return self._bin_cache[path]

    def _get(self, name: str) -> torch.Tensor:
        path = self._index[name]
        if self.kind == "safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as h:
                    return h.get_tensor(name)
            except Exception as e:  # noqa: BLE001
                raise SourceError(f"{path}: cannot read tensor {name} ({str(e).splitlines()[0]})") from None
        return self._load_bin(path)[name]

    # -- interface --------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        names = [n for n in self._index if not IGNORED.match(n)]
        if self.packed_bitnet:
            names = [n for n in names if not n.endswith(".weight_scale")]
        return names

    def tensors(self):
        for name in self.tensor_names():
            t = self._get(name)
            if self.packed_bitnet and name.endswith(".weight") and t.dtype == torch.uint8:
                yield name, self._ternary(name, t)
            else:
                yield name, t

    def _ternary(self, name: str, packed: torch.Tensor) -> TernaryWeight:
        scale_name = name[: -len("weight")] + "weight_scale"
        if scale_name not in self._index:
            raise SourceError(f"{self.folder}: packed BitNet weight {name} has no {scale_name}")
        ws = self._get(scale_name).float().reshape(-1)
        if ws.numel() != 1 or not torch.isfinite(ws).all() or ws.item() == 0:
            raise SourceError(f"{self._index[scale_name]}: {scale_name} must be one finite non-zero value")
        out_features = packed.shape[0] * 4
        try:
            w_q = unpack_transformers_bitnet(packed, out_features)
        except ValueError as e:
            raise SourceError(f"{self._index[name]}: {name}: {e}") from None
        scale = 1.0 / ws if self.linear_class == "bitlinear" else ws
        return TernaryWeight(w_q, scale.float())

    def save_tokenizer(self, dst: Path) -> None:
        import shutil

        for fname in TOKENIZER_FILES:
            if (self.folder / fname).exists():
                shutil.copy2(self.folder / fname, Path(dst) / fname)


def _safetensors_data_end(path: Path) -> int:
    """Bytes a safetensors file must have according to its header (8-byte length + header + data)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)
