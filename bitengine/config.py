"""Model architecture settings, read from a Hugging Face style config.json.

One dataclass covers the Llama family (Llama 2/3 with llama3 rope scaling, Mistral, SmolLM) and
BitNet b1.58 (sub-norms, relu2). It accepts both the transformers 4.x spelling (`rope_theta`,
`rope_scaling`) and the 5.x one (`rope_parameters`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

LLAMA_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM", "BitnetForCausalLM"}  # the last: 1bitLLM latent weights
BITNET_ARCHS = {"BitNetForCausalLM"}
SUPPORTED_ACTS = {"silu", "relu2"}


class ConfigError(ValueError):
    """A config.json the engine cannot run (message names the file and the field)."""


@dataclasses.dataclass
class ModelConfig:
    arch: str  # "llama" or "bitnet"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # llama3: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    linear_input_norm: bool = False  # transformers' bitnet `use_rms_norm`: an RMSNorm inside every BitLinear

    @property
    def sub_norms(self) -> bool:
        return self.arch == "bitnet"

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json") -> ModelConfig:
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        if model_type == "bitnet" or any(a in BITNET_ARCHS for a in archs):
            arch = "bitnet"
        elif model_type in ("llama", "mistral") or any(a in LLAMA_ARCHS for a in archs):
            arch = "llama"
        else:
            raise ConfigError(f"{where}: unsupported architecture {archs or model_type!r} "
                              f"(supported: {', '.join(sorted(LLAMA_ARCHS | BITNET_ARCHS))})")

        def need(key):
            if key not in cfg:
                raise ConfigError(f"{where}: missing required field {key!r}")
            return cfg[key]

        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        kv = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        if heads % kv:
            raise ConfigError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        act = cfg.get("hidden_act", "relu2" if arch == "bitnet" else "silu")
        if act not in SUPPORTED_ACTS:
            raise ConfigError(f"{where}: unsupported hidden_act {act!r} (supported: silu, relu2)")
        rope = cfg.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind in (None, "default"):
                scaling = None
            elif kind != "llama3":
                raise ConfigError(f"{where}: unsupported rope scaling {kind!r} (supported: llama3)")
        qc = cfg.get("quantization_config") or {}
        if cfg.get("mlp_bias") and arch == "bitnet":
            raise ConfigError(f"{where}: mlp_bias is not supported for BitNet models")
        return cls(
            arch=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=dict(scaling) if scaling else None,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            hidden_act=act,
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=cfg.get("sliding_window"),
            linear_input_norm=bool(qc.get("quant_method") == "bitnet" and qc.get("use_rms_norm", False)),
        )


def read_json(path: Path) -> dict:
    """Read a JSON file, turning a missing or malformed file into one clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data
