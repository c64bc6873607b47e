"""Kernel-level CPU bench: one decode step's / one prompt's linear layers at TinyLlama-1.1B shapes.

Every layer gets its own random ternary weights (22 x 7 linears, 242 MB packed: far beyond the
L3), so decode timings include the trip to DRAM like a real model. Checks each kernel against the
reference on the first layer before timing. Compared with torch fp32 F.linear on one layer's fp32
weights (the transformers fp32 path), with the reference backend (unpack + F.linear), and, as the
decode ceiling, with a streaming read of the same packed bytes (torch amax over each layer's
weights, one call per linear like the kernels).

    python bench/bench_cpu_kernels.py --threads 2 [--out bench/results/cpu_kernels.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from bitengine.backends import cpu
from bitengine.quant import pack_ternary
from bitengine.reference import ternary_linear_reference

HIDDEN, INTER, LAYERS, KV = 2048, 5632, 22, 256  # TinyLlama: 4 KV heads x 64
SHAPES = {"q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN),
          "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}  # (N, K)


def _median_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def build_layers(layers):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(layers):
        layer = {}
        for name, (n, k) in SHAPES.items():
            packed = pack_ternary(torch.randint(-1, 2, (n, k), generator=g))
            layer[name] = (packed, torch.ops.bitengine.ternary_repack_cpu(packed, k), torch.rand(1, generator=g) + 0.5)
        out.append(layer)
    return out


def step(layers, xs, act_bits, variant):
    for layer in layers:
        for name, (_, w, s) in layer.items():
            n, k = SHAPES[name]
            torch.ops.bitengine.ternary_linear_cpu(xs[k], w, s, None, k, n, act_bits, variant)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--ms", default="1,128")
    ap.add_argument("--isas", default="avx2", help="comma-separated ISAs to time (scalar: ~15 s per step)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-baselines", action="store_true", help="only bitengine and the streaming read")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu.set_num_threads(args.threads)
    layers = build_layers(args.layers)
    wbytes = sum(w.numel() for layer in layers for (_, w, _) in layer.values())
    macs_per_token = sum(n * k for n, k in SHAPES.values()) * args.layers
    rows = []
    for m in [int(v) for v in args.ms.split(",")]:
        xs = {k: torch.randn(m, k) for k in (HIDDEN, INTER)}
        for isa in [i for i in cpu.available_isas() if i in args.isas.split(",")]:
            cpu.set_isa(isa)
            for act_bits in (8, 16):
                for kname, variant in cpu.KERNELS.items():
                    if isa == "scalar" and (variant == 1 or m > 1):
                        continue  # the scalar path has one (add-only) kernel; too slow for prefill timing
                    packed, w, s = layers[0]["gate"]
                    x = xs[HIDDEN]
                    y = torch.ops.bitengine.ternary_linear_cpu(x, w, s, None, HIDDEN, INTER, act_bits, variant)
                    ref = ternary_linear_reference(x, packed, s, HIDDEN, act_bits)
                    err = ((y - ref).norm() / ref.norm()).item()
                    assert err < 1e-5, (isa, act_bits, kname, err)
                    t = _median_time(lambda xs=xs, a=act_bits, v=variant: step(layers, xs, a, v), args.reps if m == 1 else 3)
                    rows.append({"M": m, "engine": f"bitengine {isa} A{act_bits} {kname}", "ms_per_step": t * 1e3,
                                 "tokens_per_s": m / t, "weight_GBps": wbytes / t / 1e9,
                                 "GMACps": m * macs_per_token / t / 1e9, "rel_err_vs_reference": err})
                    print(rows[-1], flush=True)
        cpu.set_isa("auto")
        if m == 1:
            ws = [w for layer in layers for (_, w, _) in layer.values()]
            t = _median_time(lambda ws=ws: [w.amax() for w in ws], args.reps)
            rows.append({"M": m, "engine": "streaming read of the packed weights (torch amax)", "ms_per_step": t * 1e3,
                         "weight_GBps": wbytes / t / 1e9})
            print(rows[-1], flush=True)
        if args.no_baselines:
            continue
        # torch fp32 F.linear on one layer's fp32 weights (what transformers fp32 runs), x layers
        wf = {name: torch.randn(n, k) for name, (n, k) in SHAPES.items()}
        t = _median_time(lambda xs=xs, wf=wf: [F.linear(xs[k], wf[name]) for name, (n, k) in SHAPES.items()], 5) * args.layers
        rows.append({"M": m, "engine": "torch fp32 F.linear (1 layer x layers)", "ms_per_step": t * 1e3,
                     "tokens_per_s": m / t, "GMACps": m * macs_per_token / t / 1e9})
        print(rows[-1], flush=True)
        # reference backend: unpack + F.linear every call (2 layers, scaled)
        n_ref = min(2, args.layers)
        t = _median_time(lambda xs=xs, n_ref=n_ref: [ternary_linear_reference(xs[SHAPES[name][1]], p, s, SHAPES[name][1], 8)
                                  for layer in layers[:n_ref] for name, (p, _, s) in layer.items()], 2)
        t *= args.layers / n_ref
        rows.append({"M": m, "engine": "bitengine reference backend A8", "ms_per_step": t * 1e3,
                     "tokens_per_s": m / t, "GMACps": m * macs_per_token / t / 1e9})
        print(rows[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu": _cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "torch": torch.__version__, "git": _git_commit(), "kernels": cpu.describe(),
                       "threads": args.threads, "layers": args.layers, "weight_bytes": wbytes, "rows": rows}, f, indent=1)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def _git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
