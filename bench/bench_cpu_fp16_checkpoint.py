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
import sys
import time
from pathlib import Path

import torch

import bitengine
from bitengine.evaluate import perplexity, zen_of_python
from bitengine.nn import DenseLinear

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu_int8_head import decode_rounds  # noqa: E402  (the interleaved decode timing)


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
    rows += decode_rounds(models, args.rounds, args.new_tokens)
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"checkpoint": str(args.checkpoint), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "python": sys.version.split()[0], "load_average_1m": round(os.getloadavg()[0], 2), "rows": rows},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
