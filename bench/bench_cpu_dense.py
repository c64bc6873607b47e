"""The CPU's float16 dense kernel (`bitengine::dense_linear_cpu`: F16C conversion, float32 FMA) against torch's float32
F.linear on the same values: the head of SmolLM2-135M (49152 x 576) and of TinyLlama-1.1B (32000 x 2048), and
TinyLlama's / SmolLM2's layer shapes, at M = 1, 2, 16, 64, 512 tokens. Why: the loader runs a float16 head through this
kernel by default on the CPU, so it must not lose to the float32 copy it replaced at any M (all-token logits, e.g.
perplexity, run M = the text's length). Each output is first checked against float64; medians of --reps calls.

    python bench/bench_cpu_dense.py --threads 2 --out bench/results/cpu_dense_f16c
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bitengine.backends import cpu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu_kernels import _median_time  # noqa: E402  (the CPU benches' median of timed calls)

SHAPES = {"smollm2 head": (49152, 576), "tinyllama head": (32000, 2048), "tinyllama q / o": (2048, 2048),
          "tinyllama gate / up": (5632, 2048), "tinyllama down": (2048, 5632), "smollm2 gate / up": (1536, 576)}
MS = (1, 2, 16, 64, 512)


def median_ms(fn, reps: int) -> float:
    return _median_time(fn, reps) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None, help="output path without extension")
    args = ap.parse_args()
    if cpu._C is None:
        raise SystemExit("the C++ CPU kernels are not built (python setup.py build_ext --inplace)")
    torch.set_num_threads(args.threads)
    cpu.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES.items():
        w16 = (torch.randn(n, k, generator=g) * 0.05).half().contiguous()
        w32 = w16.float()
        for m in MS:
            x = torch.randn(m, k, generator=g)
            ref = x.double() @ w32.double().T
            y = torch.ops.bitengine.dense_linear_cpu(x, w16, None, None, k)
            err = float((y.double() - ref).norm() / ref.norm())
            assert err < 1e-5, (name, m, err)
            f16c = median_ms(lambda x=x, w16=w16, k=k: torch.ops.bitengine.dense_linear_cpu(x, w16, None, None, k),
                             args.reps)
            fp32 = median_ms(lambda x=x, w32=w32: F.linear(x, w32), args.reps)
            rows.append({"shape": name, "N": n, "K": k, "M": m, "f16c_ms": round(f16c, 3), "fp32_ms": round(fp32, 3),
                         "ratio": round(f16c / fp32, 2), "rel_err": err})
            print(json.dumps(rows[-1]), flush=True)
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
           "threads": args.threads, "isa": cpu.isa(),
           "torch": torch.__version__, "load_average_1m": round(os.getloadavg()[0], 2)}
    lines = [f"# CPU float16 dense kernel vs float32 F.linear ({env['date']}, {args.threads} threads, load "
             f"{env['load_average_1m']})", "",
             f"ms per call, F16C kernel / float32 F.linear (ratio; < 1: the F16C kernel is faster), median of "
             f"{args.reps}. Same float16 values on both sides.", "",
             "| shape | N x K | " + " | ".join(f"M = {m}" for m in MS) + " |",
             "| --- | --- | " + " | ".join("---" for _ in MS) + " |"]
    for name, (n, k) in SHAPES.items():
        cells = [f"{r['f16c_ms']:.2f} / {r['fp32_ms']:.2f} ({r['ratio']:.2f})" for r in rows if r["shape"] == name]
        lines.append(f"| {name} | {n} x {k} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
        out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
