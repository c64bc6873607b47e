"""Perplexity cost of the int8 head (and int8 embeddings) and of the int4 head on a real model, on CPU, and each
head's greedy decode speed (64 tokens after the Zen of Python's first line; the heads take turns, median of 5 rounds).

Loads a bitengine checkpoint (e.g. SmolLM2-135M converted with --weights fp16), measures perplexity with a float32
copy of the head (the CPU loader's head before 2026-12-03), with the loader's head (the checkpoint's float16 values
through the F16C kernel: load()'s default on the CPU since then), then after quantize_head_int8 (head
only, then head + embeddings), then after quantize_head_int4 (head only; the C++ op int4_linear_cpu where the CPU
kernels are built, else the float64 reference: the same numbers as the GPU kernels up to float32 sums). Texts: the
Zen of Python and the start of CPython's LICENSE.txt (both ship with every Python install).

    python bench/bench_cpu_int8_head.py /tmp/smol_fp16 --out bench/results/cpu_int8_head_ppl.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

import bitengine
from bitengine.evaluate import perplexity, zen_of_python
from bitengine.int4_head import quantize_head_int4
from bitengine.int8_head import quantize_head_int8


def texts() -> dict[str, str]:
    out = {"zen_of_python": zen_of_python()}
    lic = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if lic.exists():
        out["cpython_license"] = lic.read_text()[:6000]
    return out


def decode_seconds(model, prompt: str, new_tokens: int) -> float:
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True)
    return time.perf_counter() - t0


def decode_rounds(models: dict, rounds: int, new: int = 64) -> list[dict]:
    """Greedy decode speed of each model ({name: model}): `new` tokens after the Zen's first line, the models taking
    turns with the order rotated every round, so a machine that speeds up or slows down over the run moves every model
    alike; median over the rounds. One row per model (printed as it comes)."""
    prompt = zen_of_python().splitlines()[0]
    for model in models.values():
        model.generate(prompt, max_new_tokens=4, ignore_eos=True)  # warm-up
    times = {v: [] for v in models}
    names = list(models)
    for r in range(rounds):
        for v in names[r % len(names):] + names[:r % len(names)]:
            times[v].append(decode_seconds(models[v], prompt, new))
    rows = []
    for v in names:
        rows.append({"variant": v, "decode_tok_s": round(new / statistics.median(times[v]), 1),
                     "decode_tok_s_each": [round(new / t, 1) for t in times[v]]})
        print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--rounds", type=int, default=5, help="decode timing rounds (every head once per round)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows, models = [], {}
    for variant in ("float32 head", "fp16 head", "int8 head", "int8 head + int8 embeddings", "int4 head"):
        # "fp16 head": the loader's (F16C kernel on the checkpoint's fp16 head, where the C++ kernels are built)
        model = bitengine.load(args.checkpoint, device="cpu", backend=args.backend)
        if variant == "float32 head":  # a float32 copy run by PyTorch's matmul (untied from the embedding)
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.float(), requires_grad=False)
        elif variant == "int4 head":
            quantize_head_int4(model)
        elif variant.startswith("int8"):
            quantize_head_int8(model, embeddings="embeddings" in variant)
        for name, text in texts().items():
            with torch.no_grad():
                r = perplexity(model, model.tokenizer, text, max_len=1024)
            rows.append({"variant": variant, "text": name, "perplexity": r["perplexity"], "tokens": r["tokens"]})
            print(rows[-1], flush=True)
        models[variant] = model
    rows += decode_rounds(models, args.rounds)
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": str(args.checkpoint), "date": time.strftime(
            "%Y-%m-%d %H:%M UTC", time.gmtime()), "python": sys.version.split()[0], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
