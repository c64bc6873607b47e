"""Read PEFT LoRA adapters and resolve which linear module gets which factors.

An adapter is a folder with `adapter_config.json` and `adapter_model.safetensors` (or
`adapter_model.bin`, read with weights_only=True). Tensor names are
`base_model.model.<module>.lora_A[.<adapter name>].weight` (float [r, K]) and `...lora_B...` ([N, r]).

Matching follows PEFT's LoRA tuner (peft 0.21, tuners_utils.check_target_module_exists and
lora/model.py): target_modules as a list (exact name or a ".name" suffix), a string (re.fullmatch on
the module name) or "all-linear" (every linear layer but the head); exclude_modules the same way;
layers_to_transform / layers_pattern; rank_pattern / alpha_pattern keys match a suffix of the
name (`(.*\\.)?key$`); scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
fan_in_fan_out is accepted and ignored, as PEFT itself does for nn.Linear targets (every Llama
linear): the factors are stored [r, K] and [N, r] either way.

QLoRA adapters (trained on a bitsandbytes 4-bit base) have this same format; PEFT does not store
the base's quantization in adapter_config.json, so they are read like any LoRA and applied to
this engine's base (the NF4 rounding the adapter was trained against is not reproduced).

Refused with a one-line ValueError naming the file and the field: DoRA and the other LoRA
variants, bias training, modules_to_save, trainable tokens, embedding LoRA, and any unknown
config field with a non-empty value. This module never touches a model; apply.py does, after
every adapter has been validated here.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("bitengine")

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_LLAMA_DEFAULT_TARGETS = ["q_proj", "v_proj"]  # PEFT's mapping for llama/mistral when target_modules is None

# Fields PEFT may write that do not change inference (init schemes, training-time options, metadata).
_HARMLESS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout", "init_lora_weights", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "runtime_config", "megatron_core", "qalora_group_size", "ensure_weight_tying",
    "velora_config",  # VeLoRA only changes the backward pass
}
_HANDLED = {"r", "lora_alpha", "target_modules", "exclude_modules", "use_rslora", "fan_in_fan_out", "rank_pattern",
            "alpha_pattern", "layers_to_transform", "layers_pattern", "bias", "modules_to_save"}
# Fields that must be empty/false: each changes what the adapter computes in a way we do not reproduce.
_REFUSED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a trained bias on lora_B",
    "use_qalora": "QA-LoRA pooling",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters (not modules)",
    "trainable_token_indices": "trainable token embeddings",
    "megatron_config": "Megatron parallel layers",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}
_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.weight$")


class AdapterError(ValueError):
    """An adapter the engine cannot apply (one line naming the file and the field or tensor)."""


@dataclass
class LoraAdapter:
    """One adapter as read from disk (factors in float32, on the CPU)."""

    path: Path
    weight: float
    config: dict
    weights_file: Path
    factors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> {"A": [r,K], "B": [N,r]}
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> saved base weight (head/embeddings)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def qlora_hint(self) -> bool:
        """True when the base name looks 4-bit quantized (e.g. '...-bnb-4bit'): informational only."""
        name = (self.base_model or "").lower()
        return any(s in name for s in ("bnb", "4bit", "nf4"))


@dataclass
class ModuleFactors:
    """One adapter's factors for one module; the delta is weight * scaling * B @ A."""

    A: torch.Tensor  # float32 (r, K)
    B: torch.Tensor  # float32 (N, r)
    scaling: float
    weight: float
    source: Path

    @property
    def coef(self) -> float:
        return self.weight * self.scaling


def parse_adapter_arg(s: str) -> tuple[str, float]:
    """'DIR' or 'DIR:WEIGHT' -> (DIR, WEIGHT); an existing path containing ':' is taken whole."""
    if Path(s).exists() or ":" not in s:
        return s, 1.0
    path, _, w = s.rpartition(":")
    try:
        weight = float(w)
    except ValueError:
        raise AdapterError(f"--adapter {s!r}: expected DIR or DIR:WEIGHT with a number as WEIGHT") from None
    if not path or not math.isfinite(weight):
        raise AdapterError(f"--adapter {s!r}: expected DIR or DIR:WEIGHT with a finite WEIGHT")
    return path, weight


def normalize_adapters(adapters) -> list[tuple[Path, float]]:
    """[dir | 'dir:w' | (dir, w), ...] -> [(Path, float), ...]."""
    if isinstance(adapters, (str, Path)) or (isinstance(adapters, tuple) and len(adapters) == 2
                                              and isinstance(adapters[1], (int, float))):
        adapters = [adapters]
    out = []
    for a in adapters:
        if isinstance(a, (tuple, list)):
            if len(a) != 2:
                raise AdapterError(f"adapter {a!r}: expected a folder or (folder, weight)")
            path, weight = a
        elif isinstance(a, Path):
            path, weight = a, 1.0
        else:
            path, weight = parse_adapter_arg(str(a))
        out.append((Path(path), float(weight)))
    return out


def read_adapter(path, weight: float = 1.0) -> LoraAdapter:
    """Read and validate one adapter folder (config fields and tensor names; shapes come in resolve())."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: adapter folder not found")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: file not found (not a PEFT adapter folder?)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_file}: malformed JSON ({e})".replace("\n", " ")) from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_file}: expected a JSON object")
    _check_config(cfg, cfg_file)
    weights_file = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights_file is None:
        raise FileNotFoundError(f"{path}: no {' or '.join(WEIGHT_FILES)}")
    adapter = LoraAdapter(path, float(weight), cfg, weights_file)
    adapter.factors, adapter.base_weights = _read_factors(weights_file)
    if adapter.qlora_hint:
        log.info("bitengine: adapter %s was trained on a quantized base (%s); applied to this base as plain LoRA",
                 path, adapter.base_model)
    return adapter


def _check_config(cfg: dict, where: Path) -> None:
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"{where}: peft_type {peft_type!r} is not supported (only LORA)")
    for key, what in _REFUSED.items():
        if cfg.get(key):
            raise AdapterError(f"{where}: {key}={cfg[key]!r}: {what} is not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{where}: bias={cfg['bias']!r}: trained biases are not supported (need 'none')")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{where}: modules_to_save={cfg['modules_to_save']!r}: fully trained modules are not supported")
    unknown = sorted(k for k, v in cfg.items() if k not in _HARMLESS | _HANDLED | set(_REFUSED) and v not in
                     (None, False, "", [], {}))
    if unknown:
        raise AdapterError(f"{where}: unknown field {unknown[0]}={cfg[unknown[0]]!r} (a newer PEFT feature?)")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"{where}: r={r!r}: expected a positive integer")
    if not isinstance(cfg.get("lora_alpha", 8), (int, float)):
        raise AdapterError(f"{where}: lora_alpha={cfg['lora_alpha']!r}: expected a number")
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in pat.values()):
            raise AdapterError(f"{where}: {key}={pat!r}: expected {{pattern: positive number}}")
    for key in ("target_modules", "exclude_modules"):
        t = cfg.get(key)
        if t is not None and not isinstance(t, str) and not (isinstance(t, list) and all(isinstance(x, str) for x in t)):
            raise AdapterError(f"{where}: {key}={t!r}: expected a list of names or a regex string")
        if isinstance(t, str):
            try:
                re.compile(t)
            except re.error as e:
                raise AdapterError(f"{where}: {key}={t!r}: invalid regex ({e})") from None
    lt = cfg.get("layers_to_transform")
    if lt is not None and not isinstance(lt, int) and not (isinstance(lt, list) and all(isinstance(i, int) for i in lt)):
        raise AdapterError(f"{where}: layers_to_transform={lt!r}: expected an int or a list of ints")
    lp = cfg.get("layers_pattern")
    if lp is not None and not isinstance(lp, str) and not (isinstance(lp, list) and all(isinstance(p, str) for p in lp)):
        raise AdapterError(f"{where}: layers_pattern={lp!r}: expected a string or a list of strings")


def _read_factors(weights_file: Path) -> tuple[dict, dict]:
    """({module: {"A": [r, K], "B": [N, r]}}, {module: full base weight PEFT saved alongside})."""
    if weights_file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(weights_file), device="cpu")
        except (SafetensorError, OSError) as e:
            raise AdapterError(f"{weights_file}: cannot read ({e})".replace("\n", " ")) from None
    else:
        try:
            state = torch.load(weights_file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as e:
            raise AdapterError(f"{weights_file}: cannot read ({e})".replace("\n", " ")) from None
        if not isinstance(state, dict):
            raise AdapterError(f"{weights_file}: expected a state dict")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    base_weights: dict[str, torch.Tensor] = {}
    names = set()
    for key, t in state.items():
        name = key.removeprefix("base_model.model.")
        m = _KEY.match(name)
        if m is None and name.endswith(".base_layer.weight"):
            # PEFT saves the full head/embedding weight when they are targeted (save_embedding_layers)
            base_weights[name.removesuffix(".base_layer.weight")] = t
            continue
        if m is None:
            if "lora_magnitude_vector" in name:
                raise AdapterError(f"{weights_file}: tensor {key}: DoRA magnitude vectors are not supported")
            if "lora_embedding_" in name:
                raise AdapterError(f"{weights_file}: tensor {key}: LoRA on embeddings is not supported")
            raise AdapterError(f"{weights_file}: unexpected tensor {key}")
        names.add(m["name"])
        if len(names) > 1:
            raise AdapterError(f"{weights_file}: holds several adapters {sorted(map(str, names))}; save them separately")
        if not t.is_floating_point() or t.dim() != 2:
            raise AdapterError(f"{weights_file}: tensor {key} must be a 2-D float tensor, got {t.dtype} {list(t.shape)}")
        t = t.float()
        if not torch.isfinite(t).all():
            raise AdapterError(f"{weights_file}: tensor {key} contains NaN or Inf")
        factors.setdefault(m["module"], {})[m["kind"][-1]] = t
    if not factors:
        raise AdapterError(f"{weights_file}: no lora_A/lora_B tensors")
    for module, ab in factors.items():
        if len(ab) != 2:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise AdapterError(f"{weights_file}: {module} has no {missing} tensor")
    return factors, base_weights


def targets(cfg: dict, name: str) -> bool:
    """Whether PEFT's LoRA tuner would wrap the module `name` (see the module docstring)."""
    excl = cfg.get("exclude_modules")
    if excl:
        if isinstance(excl, str):
            if re.fullmatch(excl, name):
                return False
        elif name in excl or any(name.endswith("." + e) for e in excl):
            return False
    tm = cfg.get("target_modules")
    if tm is None:
        tm = PEFT_LLAMA_DEFAULT_TARGETS
    if isinstance(tm, str):
        if tm == "all-linear":
            return name != "lm_head" and not name.endswith("embed_tokens")
        return re.fullmatch(tm, name) is not None
    if name in tm:
        return True
    if not any(name.endswith("." + t) for t in tm):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = cfg.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if match:
                break
    if match is None:
        return False
    idx = int(match["idx"])
    return idx == layers if isinstance(layers, int) else idx in layers


def _pattern_value(patterns: dict, name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def module_rank_alpha(cfg: dict, name: str) -> tuple[int, float]:
    """(r, lora_alpha) for one module after rank_pattern / alpha_pattern."""
    r = _pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"])
    alpha = _pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", 8))
    return int(r), float(alpha)


def scaling_of(cfg: dict, name: str) -> float:
    r, alpha = module_rank_alpha(cfg, name)
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def resolve(adapters: list[LoraAdapter], linear_shapes: dict[str, tuple[int, int]],
            other_modules: set[str] = frozenset({"model.embed_tokens"}), num_layers: int | None = None,
            base_weight=None) -> dict[str, list[ModuleFactors]]:
    """Check every adapter against a model's linear layers ({name: (N, K)}); return {module: [factors, ...]}.

    Raises AdapterError for targets that match nothing or a non-linear module, tensors for modules
    the config does not target or the model does not have, ranks that differ from r/rank_pattern,
    and factor shapes that do not fit the layer (an adapter for another base model). base_weight:
    fn(module) -> the model's 16-bit weight (or None), to check full weights PEFT saved with the adapter.
    """
    out: dict[str, list[ModuleFactors]] = {}
    for ad in adapters:
        wf, cf = ad.weights_file, ad.config_file
        base = f" (adapter for another base model? base_model_name_or_path={ad.base_model!r})"
        hit = sorted(n for n in other_modules if targets(ad.config, n))
        if hit:
            raise AdapterError(f"{cf}: target_modules selects {hit[0]}, which is not a linear layer (embedding LoRA "
                               "is not supported)")
        selected = {n for n in linear_shapes if targets(ad.config, n)}
        if not selected:
            raise AdapterError(f"{cf}: target_modules={ad.config.get('target_modules')!r} matches no linear layer "
                               f"of this model (e.g. {next(iter(linear_shapes), '-')})")
        for module in sorted(ad.factors):
            if module not in linear_shapes:
                layers = f"; this model has {num_layers} layers" if num_layers is not None else ""
                raise AdapterError(f"{wf}: tensors for {module}, which this model does not have{layers}{base}")
            if module not in selected:
                raise AdapterError(f"{wf}: tensors for {module}, which target_modules in {CONFIG_FILE} does not select")
        missing = sorted(selected - set(ad.factors))
        if missing:
            raise AdapterError(f"{wf}: no lora_A/lora_B for {missing[0]}, which {CONFIG_FILE} targets"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        for module in sorted(selected):
            a, b = ad.factors[module]["A"], ad.factors[module]["B"]
            n, k = linear_shapes[module]
            r, _ = module_rank_alpha(ad.config, module)
            field_name = "rank_pattern" if r != ad.config["r"] else "r"
            if a.shape[1] != k or b.shape[0] != n:
                raise AdapterError(f"{wf}: {module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the "
                                   f"layer's [out={n}, in={k}]{base}")
            if a.shape[0] != r or b.shape[1] != r:
                raise AdapterError(f"{wf}: {module}: rank {a.shape[0]} (lora_A) / {b.shape[1]} (lora_B) but "
                                   f"{CONFIG_FILE} says {field_name}={r}")
            out.setdefault(module, []).append(ModuleFactors(a, b, scaling_of(ad.config, module), ad.weight, ad.path))
        for module, saved in ad.base_weights.items():
            ours = base_weight(module) if base_weight is not None else None
            if ours is None:
                raise AdapterError(f"{wf}: holds the full weight of {module} (PEFT save_embedding_layers), which "
                                   "cannot be checked here; apply the adapter at load time")
            if tuple(saved.shape) != tuple(ours.shape) or (saved - ours.float().cpu()).norm() > 1e-2 * ours.float().norm():
                raise AdapterError(f"{wf}: its saved {module} weight {list(saved.shape)} differs from this model's "
                                   f"{list(ours.shape)} (resized vocabulary or another base){base}")
    return out
