"""Where a prefill forward's host time goes (one GPU call; writes gpu_prefill_host_<card>_<date>.md / .json).

Why: in the 935c090 run (bench/results/gpu_e2e_935c090_...) the ternary A8 prefill took the same time for 512 and for
2048 tokens (BitNet-2B-4T ~40 ms, Llama-2-7B ~51 ms) and its host time (until the forward returns, no sync) was the
whole of it, so the GPU waited for launches; the FP16 path at 2048 tokens was GPU-bound (7B: 51.6 ms, 26.7 on the
host). This times one eager prefill forward per variant and shape (CUDA events and host clock, medians), then
profiles one more with cProfile (the Python functions) and torch.profiler (the launches: how many kernels, and the
host time of the launch calls), so the next change knows what to cut.

    python bench/profile_prefill_host.py --out $OUT [--model bitnet-2b-4t] [--variants a8+compile,a8,fp16+compile]
        [--tokens 512,2048]

Random weights at the model's real shape (bench_e2e.build). Without the C++ extension the A8 variant runs the
"triton" backend: the same prefill path as "cuda" (the C++ kernels take one to MAX_MMA_M tokens, prefill more).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import functools
import gc
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_e2e  # noqa: E402

LAUNCH_APIS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def time_forward(forward, reps: int = 5) -> tuple[float, float]:
    """(median GPU ms between CUDA events, median host ms until forward returns) over reps calls."""
    gpu, host = [], []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        forward()
        host.append(1000 * (time.perf_counter() - t0))
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end))
    return statistics.median(gpu), statistics.median(host)


def python_profile(forward, top: int = 25) -> str:
    """cProfile of one call: the top functions by own time and by cumulative time."""
    prof = cProfile.Profile()
    prof.enable()
    forward()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def launch_profile(forward) -> dict:
    """Kernels launched by one call and the host time of the launch API calls (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        forward()
        torch.cuda.synchronize()
    launches = [e for e in prof.events() if e.name in LAUNCH_APIS]
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, int] = {}
    for e in kernels:
        by_name[e.name[:80]] = by_name.get(e.name[:80], 0) + 1
    return {"launch_calls": len(launches), "launch_host_ms": sum(e.cpu_time_total for e in launches) / 1000,
            "gpu_kernels": len(kernels), "gpu_kernel_ms": sum(e.device_time_total for e in kernels) / 1000,
            "top_kernels": sorted(by_name.items(), key=lambda kv: -kv[1])[:15]}


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--model", default="bitnet-2b-4t", choices=sorted(bench_e2e.MODELS))
    ap.add_argument("--variants", default="a8+compile,a8,fp16+compile")
    ap.add_argument("--tokens", default="512,2048")
    args = ap.parse_args()
    cfg = bench_e2e.MODELS[args.model]
    env = {"card": torch.cuda.get_device_properties(0).name, "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "git_commit": os.environ.get("BITENGINE_COMMIT", ""), "model": args.model}
    rows, text = [], [f"# Prefill host time, {args.model}, {env['card']} ({env['date']}, commit {env['git_commit']})", ""]
    os.makedirs(args.out, exist_ok=True)
    tag = f"{env['card'].replace(' ', '_')}_{env['date'][:10]}"
    for variant in args.variants.split(","):
        bench_e2e.set_variant_flags(variant)
        model = bench_e2e.build(cfg, variant, max_seq=max(int(t) for t in args.tokens.split(",")))
        if "+compile" in variant:
            model.compile_layers()
        for t in (int(t) for t in args.tokens.split(",")):
            cache = model.new_cache(batch=1, max_seq=t)
            prompt = torch.randint(0, cfg.vocab_size, (1, t), device="cuda")
            pos = torch.arange(t, device="cuda")

            forward = functools.partial(model, prompt, cache=cache, input_pos=pos, last_only=True)
            for _ in range(2):  # compiles, autotuning, allocator
                forward()
            torch.cuda.synchronize()
            gpu_ms, host_ms = time_forward(forward)
            launches = launch_profile(forward)
            row = {"variant": variant, "backend": model.backend_name, "tokens": t, "gpu_ms": gpu_ms,
                   "host_ms": host_ms, **launches}
            rows.append(row)
            print(json.dumps(row), flush=True)
            text += [f"## {variant} ({model.backend_name}), {t} tokens: {gpu_ms:.1f} ms (GPU events), host {host_ms:.1f} "
                     f"ms; {launches['gpu_kernels']} kernels ({launches['gpu_kernel_ms']:.1f} ms of kernel time), "
                     f"{launches['launch_calls']} launch calls ({launches['launch_host_ms']:.1f} ms on the host)", "",
                     "Kernels by count: " + ", ".join(f"{n} x{c}" for n, c in launches["top_kernels"]), "",
                     "```", python_profile(forward), "```", ""]
            with open(os.path.join(args.out, f"gpu_prefill_host_{tag}.md"), "w") as f:
                f.write("\n".join(text))
            with open(os.path.join(args.out, f"gpu_prefill_host_{tag}.json"), "w") as f:
                json.dump({"env": env, "rows": rows}, f, indent=1)
            del forward, cache  # the partial holds the model
        del model
        torch._dynamo.reset()
        gc.collect()  # a compiled model is in a reference cycle
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
