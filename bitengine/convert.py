"""Source checkpoint -> bitengine checkpoint, streamed and atomic.

Every linear layer of the transformer blocks is ternarized with absmean (quant.py) and packed
2 bits per weight, unless kept (`keep`) or `weights="fp16"` (the FP16 baseline on the same
engine). Embeddings, norms and the head stay 16-bit. Already-ternary weights (packed BitNet
checkpoints) are imported as they are. One tensor is in flight at a time and output shards are
flushed as they fill, so peak memory is about one shard plus one layer. Output goes to a hidden
temporary folder beside DST and is renamed into place only when complete.
"""

from __future__ import annotations

import datetime
import fnmatch
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import torch

from . import __version__
from .config import ModelConfig
from .formats import SourceError, TernaryWeight, open_source
from .formats.checkpoint import FORMAT_VERSION, ShardWriter, atomic_folder
from .model import expected_shapes
from .quant import PACK_LAYOUT, absmean_quantize, dequantize, pack_ternary, parse_scale_granularity

DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def layer_kind(name: str) -> str:
    """Short kind for summaries: q_proj, ..., embed_tokens, norm, lm_head."""
    if name.startswith("lm_head"):
        return "lm_head"
    if "embed_tokens" in name:
        return "embed_tokens"
    parts = name.split(".")
    for p in parts:
        if p.endswith("_proj"):
            return p
    return "norm" if "norm" in name else parts[-2]


def _is_kept(module: str, keep: list[str]) -> bool:
    return any(module == k or module.endswith("." + k) or fnmatch.fnmatch(module, k) for k in keep)


def convert(src, dst, *, weights: str = "ternary", act_bits: int = 8, scale: str = "tensor",
            keep: list[str] | tuple = (), dtype: str = "fp16", force: bool = False, progress: bool = True,
            adapters=None, log=print) -> dict:
    """Convert `src` (HF folder, BitNet checkpoint or .gguf) into a bitengine checkpoint at `dst`.

    Returns the summary dict (also stored as `conversion` in the output's config.json).
    Raises FileExistsError / FileNotFoundError / ValueError (one line naming the file or tensor)
    before or during conversion; a failed conversion leaves no `dst`.
    """
    src, dst = Path(src), Path(dst)
    if weights not in ("ternary", "fp16"):
        raise ValueError(f"--weights must be 'ternary' or 'fp16', got {weights!r}")
    if act_bits not in (8, 16):
        raise ValueError(f"--act-bits must be 8 or 16, got {act_bits}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be fp16 or bf16, got {dtype!r}")
    granularity, group_size = parse_scale_granularity(scale)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst}: already exists (use --force to overwrite)")
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: destination is the source")
    source = open_source(src)
    cfg = ModelConfig.from_hf(source.config, str(src))
    out_dtype = DTYPES[dtype]
    shapes, linears = expected_shapes(cfg)
    linear_set = set(linears)
    keep = list(keep)
    if granularity == "group" and weights == "ternary":
        for k in {cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim}:
            if k % group_size:
                raise ValueError(f"{src}: in_features {k} is not a multiple of the scale group size {group_size}")
    hook = None
    if adapters:
        from .lora import merge_hook, normalize_adapters

        hook = merge_hook(adapters, cfg)

    tmp = atomic_folder(dst)
    try:
        summary = _write(source, cfg, tmp, shapes, linear_set, weights, act_bits, granularity, group_size,
                         keep, out_dtype, progress, hook)
        out_cfg = {k: v for k, v in source.config.items() if k not in ("quantization_config", "bitengine")}
        out_cfg["torch_dtype"] = "float16" if out_dtype == torch.float16 else "bfloat16"
        out_cfg["bitengine"] = {
            "format_version": FORMAT_VERSION,
            "weights": weights,
            "packing": PACK_LAYOUT,
            "scale": scale if weights == "ternary" else None,
            "act_bits": act_bits if weights == "ternary" else 16,
            "dtype": out_cfg["torch_dtype"],
            "kept_modules": sorted(summary.pop("kept")),
            "source": source.description,
            "adapters_merged": [f"{p}:{w}" for p, w in normalize_adapters(adapters)] if adapters else [],
            "converted_by": f"bitengine {__version__}",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "conversion": summary,
        }
        import json

        (tmp / "config.json").write_text(json.dumps(out_cfg, indent=2))
        source.save_tokenizer(tmp)
        _replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _replace(tmp: Path, dst: Path) -> None:
    """Move the finished folder into place; an existing dst (with --force) is removed only after."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dst)


def _write(source, cfg, tmp, shapes, linear_set, weights, act_bits, granularity, group_size, keep, out_dtype,
           progress, hook) -> dict:
    writer = ShardWriter(tmp)
    before, after = defaultdict(int), defaultdict(int)
    err_num, err_den = defaultdict(float), defaultdict(float)
    seen, kept = set(), set()
    names = source.tensor_names()
    where = source.description.get("path", "source")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(names), desc="convert", unit="tensor", file=sys.stderr, leave=False)
    for name, value in source.tensors():
        if bar:
            bar.update(1)
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: identical to the embeddings
        if name not in shapes:
            raise SourceError(f"{where}: unexpected tensor {name} for this architecture")
        module = name.rsplit(".", 1)[0]
        kind = layer_kind(name)
        if isinstance(value, TernaryWeight):
            shape = tuple(value.w_q.shape)
        else:
            shape = tuple(value.shape)
        if shape != shapes[name]:
            raise SourceError(f"{where}: tensor {name} has shape {list(shape)}, config implies {list(shapes[name])}")
        seen.add(name)
        is_linear_weight = module in linear_set and name.endswith(".weight")
        if isinstance(value, TernaryWeight):
            before[kind] += value.w_q.numel() // 4 + 4  # the source's packed bytes
            if hook is not None:
                raise SourceError(f"{where}: cannot merge adapters into an already-packed ternary weight {name}")
            scale = value.scale.float().reshape(-1)
            if scale.numel() not in (1, value.w_q.shape[0]):
                raise SourceError(f"{where}: tensor {name} has {scale.numel()} scales; expected 1 or {value.w_q.shape[0]}")
            after[kind] += _emit_ternary(writer, module, value.w_q, scale)
            continue
        if not value.is_floating_point():
            raise SourceError(f"{where}: tensor {name} has non-float dtype {value.dtype}")
        before[kind] += value.numel() * value.element_size()
        # one float32 sum is ~20x cheaper than an elementwise isfinite pass; it is non-finite whenever
        # an element is (or, rarely, on overflow, which the exact check below then clears)
        if not torch.isfinite(value.sum(dtype=torch.float32)) and not torch.isfinite(value).all():
            raise SourceError(f"{where}: tensor {name} contains NaN or Inf")
        if hook is not None and is_linear_weight:
            value = hook(module, value)
        if is_linear_weight and weights == "ternary" and not _is_kept(module, keep):
            w = value.float()
            w_q, s = absmean_quantize(w, granularity, group_size)
            err_num[kind] += (w - dequantize(w_q, s)).pow(2).sum().item()
            err_den[kind] += w.pow(2).sum().item()
            after[kind] += _emit_ternary(writer, module, w_q, s)
        else:
            if is_linear_weight:
                kept.add(module)
            t = value.to(out_dtype)
            writer.add(name, t)
            after[kind] += t.numel() * t.element_size()
        del value
    if bar:
        bar.close()
    missing = sorted(set(shapes) - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SourceError(f"{where}: missing tensor {missing[0]}{more}")
    writer.close()
    rel_err = {k: (err_num[k] / err_den[k]) ** 0.5 for k in err_num if err_den[k] > 0}
    return {"source_file_bytes": getattr(source, "bytes_total", None),
            "bytes_before": dict(before), "bytes_after": dict(after),
            "total_bytes_before": sum(before.values()), "total_bytes_after": sum(after.values()),
            "relative_quantization_error": rel_err, "kept": kept}


def _emit_ternary(writer: ShardWriter, module: str, w_q: torch.Tensor, scale: torch.Tensor) -> int:
    packed = pack_ternary(w_q)
    writer.add(f"{module}.weight_packed", packed)
    writer.add(f"{module}.weight_scale", scale.float().contiguous())
    return packed.numel() + scale.numel() * 4


def format_summary(summary: dict) -> str:
    """A human-readable table of bytes before/after by kind and the quantization error."""
    lines = [f"{'kind':<14}{'before MB':>12}{'after MB':>12}{'rel. error':>12}"]  # error: ||W - s*W_q|| / ||W||
    kinds = sorted(set(summary["bytes_before"]) | set(summary["bytes_after"]))
    for k in kinds:
        err = summary["relative_quantization_error"].get(k)
        lines.append(f"{k:<14}{summary['bytes_before'].get(k, 0) / 1e6:>12.2f}{summary['bytes_after'].get(k, 0) / 1e6:>12.2f}"
                     f"{'' if err is None else f'{err:.4f}':>12}")
    b, a = summary["total_bytes_before"], summary["total_bytes_after"]
    lines.append(f"{'total':<14}{b / 1e6:>12.2f}{a / 1e6:>12.2f}   ({b / max(a, 1):.2f}x smaller)")
    src = summary.get("source_file_bytes")
    if src and abs(src - b) > 0.01 * b:  # e.g. a quantized GGUF: "before" counts the dequantized tensors
        lines.append(f"(the source stores these weights in {src / 1e6:.2f} MB; 'before' counts them dequantized)")
    return "\n".join(lines)
