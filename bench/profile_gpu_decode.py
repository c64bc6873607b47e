"""Where a batch-1 GPU decode step's time goes: kernels by name, per step, from torch.profiler.

Builds the models of bench_e2e.py (random weights, the same placement, compiled layers, programmatic
dependent launch), captures the decode step in a CUDA graph as generate() does, replays it `--steps`
times under torch.profiler (CUDA activity) and sums the GPU time of every kernel name per step.
Also reports the step's wall time without the profiler, so the sum of kernel time can be compared
with it. With programmatic dependent launch a kernel starts while the one before it drains and waits
inside (griddepcontrol.wait), so kernel durations overlap and their sum can exceed the wall time;
the "+nopdl" variants give durations that do not overlap.

    python bench/profile_gpu_decode.py --out bench/results/gpu_decode_profile
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_e2e  # noqa: E402  (the models, their placement and the graph-captured decode step)


def kind(name: str) -> str:
    """A coarse class for a kernel name (which part of the step it is). Inductor names its kernels after
    the ops of the graph around them (an RMSNorm kernel can be called "..._ternary_gemv_cuda_..."), so
    every Triton kernel of the compiled layers counts as glue, whatever its name says."""
    n = name.lower()
    if n.startswith("triton_"):
        return "fused glue (inductor: norms, rotary, cache writes, gating, residuals)"
    for key, label in (("_argmax_", "argmax (Triton)"), ("ternary_gemv", "ternary GEMV (CUDA C++)"),
                       ("gemv", "ternary GEMV (Triton)"),
                       ("int8_linear", "int8 head (Triton)"), ("decode_attn", "attention (Triton decode)"),
                       ("_merge_kernel", "attention (Triton decode)"), ("sdpa", "attention (cuDNN)"), ("flash", "attention"),
                       ("nvjet", "head (cuBLAS)"), ("gemm", "dense matmul (cuBLAS)"), ("reduce_kernel", "argmax"),
                       ("copy", "copies"), ("elementwise", "elementwise (eager)")):
        if key in n:
            return label
    return "other"


@torch.no_grad()
def profile(name: str, variant: str, steps: int) -> dict:
    cfg = bench_e2e.MODELS[name]
    bench_e2e.set_variant_flags(variant)
    model = bench_e2e.build(cfg, variant, max_seq=bench_e2e.PROMPT + steps + 16)
    if "+compile" in variant:
        model.compile_layers(glue="+noglue" not in variant)
    g = torch.Generator(device="cuda").manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (1, bench_e2e.PROMPT), device="cuda", generator=g)
    dec = bench_e2e.GraphDecoder(model, 1, bench_e2e.PROMPT + steps + 16)
    dec.prefill(prompt)
    for _ in range(3):
        dec.step()
    dec.capture()
    for _ in range(5):
        dec.graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        dec.graph.replay()
    torch.cuda.synchronize()
    wall_us = (time.perf_counter() - t0) / steps * 1e6
    dec.prefill(prompt)
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec.graph.replay()
        torch.cuda.synchronize()
    per_name: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            per_name[ev.name][0] += ev.device_time
            per_name[ev.name][1] += 1
    kernels = sorted(({"name": k[:120], "kind": kind(k), "us_per_step": v[0] / steps, "calls_per_step": v[1] / steps}
                      for k, v in per_name.items()), key=lambda r: -r["us_per_step"])
    by_kind: dict[str, list] = collections.defaultdict(lambda: [0.0, 0.0])
    for r in kernels:
        by_kind[r["kind"]][0] += r["us_per_step"]
        by_kind[r["kind"]][1] += r["calls_per_step"]
    busy = sum(r["us_per_step"] for r in kernels)
    del dec, model
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return {"model": name, "variant": variant, "steps": steps, "step_wall_us": wall_us, "kernel_busy_us": busy,
            "kernels_per_step": sum(r["calls_per_step"] for r in kernels),
            "by_kind": {k: {"us_per_step": v[0], "calls_per_step": v[1]} for k, v in
                        sorted(by_kind.items(), key=lambda kv: -kv[1][0])},
            "kernels": kernels}


def markdown(env: dict, runs: list[dict]) -> str:
    lines = [f"{env['gpu']}, torch {env['torch']}, {env['date']}, git {env.get('git', '')[:10]}. Batch 1, CUDA graph "
             "replays; GPU time per step summed by kernel from torch.profiler; wall = replays without the profiler.", ""]
    for r in runs:
        lines += [f"### {r['model']} {r['variant']}: step {r['step_wall_us']:.0f} us wall, "
                  f"{r['kernel_busy_us']:.0f} us of kernels, {r['kernels_per_step']:.0f} kernels per step", "",
                  "| part | us per step | kernels per step |", "| --- | --- | --- |"]
        lines += [f"| {k} | {v['us_per_step']:.1f} | {v['calls_per_step']:.0f} |" for k, v in r["by_kind"].items()]
        lines += ["", "| kernel | part | us per step | calls per step |", "| --- | --- | --- | --- |"]
        lines += [f"| `{k['name'][:80]}` | {k['kind']} | {k['us_per_step']:.1f} | {k['calls_per_step']:.0f} |"
                  for k in r["kernels"][:12]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", default="bitnet-2b-4t=a8+compile,a8+compile+nopdl;llama-2-7b=a8+compile,a8+compile+nopdl",
                    help="model=variant[,variant];... (variants as in bench_e2e.py)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default="bench/results/gpu_decode_profile")
    args = ap.parse_args()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git": os.environ.get("BITENGINE_COMMIT", "")}
    runs = []
    for item in args.plan.split(";"):
        name, variants = item.split("=")
        for v in variants.split(","):
            runs.append(profile(name, v, args.steps))
            print(json.dumps({k: runs[-1][k] for k in ("model", "variant", "step_wall_us", "kernel_busy_us",
                                                        "kernels_per_step")}), flush=True)
            Path(args.out + ".json").write_text(json.dumps({"env": env, "runs": runs}, indent=1))
            Path(args.out + ".md").write_text(markdown(env, runs))
    print(markdown(env, runs))


if __name__ == "__main__":
    main()
