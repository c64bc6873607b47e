"""A float16 checkpoint (`convert --weights fp16`) on the CPU: its dense layers as float16 through the F16C kernel (the
loader's default since 2026-12-03) against float32 copies of the same values (the loader's default before; the head
float16 in both), greedy decode tokens/s and perplexity, the two models taking turns (order rotated every round;
median of --rounds). The two must give the same perplexity up to float32 summation order.

    python bench/bench_cpu_fp16_checkpoint.py ~/.cache/bitengine/demo/smollm2-135m-fp16 --out bench/results/cpu_fp16_layers
Writes OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import bitengine
from bitengine.evaluate import perplexity, zen_of_python
from bitengine.nn import DenseLinear


def float32_layers(model) -> int:
    """Every dense layer but the head back to a float32 copy (what load() kept before); returns how many."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, DenseLinear) and name != "lm_head" and m.weight.dtype == torch.float16:
            m.weight = torch.nn.Parameter(m.weight.float(), requires_grad=False)
            n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="output path without extension")
    args = ap.parse_args()
    models = {"float16 layers (F16C)": bitengine.load(args.checkpoint, device="cpu", backend="cpu"),
              "float32 layers": bitengine.load(args.checkpoint, device="cpu", backend="cpu")}
    converted = float32_layers(models["float32 layers"])
    rows = [{"float32_layers_converted": converted}]
    for name, model in models.items():
        with torch.no_grad():
            r = perplexity(model, model.tokenizer, zen_of_python(), max_len=1024)
        rows.append({"variant": name, "perplexity": r["perplexity"], "tokens": r["tokens"]})
        print(rows[-1], flush=True)
    prompt = zen_of_python().splitlines()[0]
    for model in models.values():
        model.generate(prompt, max_new_tokens=4, ignore_eos=True)  # warm-up
    times = {v: [] for v in models}
    names = list(models)
    for r in range(args.rounds):
        for v in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            models[v].generate(prompt, max_new_tokens=args.new_tokens, ignore_eos=True)
            times[v].append(time.perf_counter() - t0)
    for v in names:
        rows.append({"variant": v, "decode_tok_s": round(args.new_tokens / statistics.median(times[v]), 1),
                     "decode_tok_s_each": [round(args.new_tokens / t, 1) for t in times[v]]})
        print(rows[-1], flush=True)
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"checkpoint": str(args.checkpoint), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "python": sys.version.split()[0], "load_average_1m": round(os.getloadavg()[0], 2), "rows": rows},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
