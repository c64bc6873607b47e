"""Perplexity cost of the int8 head (and int8 embeddings) and of the int4 head on a real model, on CPU, and each
head's greedy decode speed (64 tokens after the Zen of Python's first line, median of 3 generate() calls).

Loads a bitengine checkpoint (e.g. SmolLM2-135M converted with --weights fp16), measures perplexity with the loader's
head, then after quantize_head_int8 (head only, then head + embeddings), then after quantize_head_int4 (head only;
the C++ op int4_linear_cpu where the CPU kernels are built, else the float64 reference: the same numbers as the GPU
kernels up to float32 sums). Texts: the Zen of Python and the start of CPython's LICENSE.txt (both ship with every
Python install).

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


def decode_speed(model, new_tokens: int = 64, reps: int = 3) -> float:
    prompt = zen_of_python().splitlines()[0]
    model.generate(prompt, max_new_tokens=4, ignore_eos=True)  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True)
        times.append(time.perf_counter() - t0)
    return round(new_tokens / statistics.median(times), 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for variant in ("loader head", "int8 head", "int8 head + int8 embeddings", "int4 head"):
        model = bitengine.load(args.checkpoint, device="cpu", backend=args.backend)
        if variant == "int4 head":
            quantize_head_int4(model)
        elif variant != "loader head":
            quantize_head_int8(model, embeddings="embeddings" in variant)
        for name, text in texts().items():
            with torch.no_grad():
                r = perplexity(model, model.tokenizer, text, max_len=1024)
            rows.append({"variant": variant, "text": name, "perplexity": r["perplexity"], "tokens": r["tokens"]})
            print(rows[-1], flush=True)
        rows.append({"variant": variant, "decode_tok_s": decode_speed(model)})
        print(rows[-1], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": str(args.checkpoint), "date": time.strftime(
            "%Y-%m-%d %H:%M UTC", time.gmtime()), "python": sys.version.split()[0], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
