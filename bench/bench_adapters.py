"""End-to-end decode speed with LoRA adapters: 0, 1 and 4 adapters (r=16 on every linear layer).

A random-weight Llama with TinyLlama-1.1B shapes (hidden 2048, intermediate 5632, 32 heads,
4 KV heads, vocab 32000) is written as a 16-bit HF folder, converted to ternary (per-tensor
absmean, W1.58A8) and loaded with backend "auto"; random PEFT-format adapters (r=16, all seven
linears of every layer) are written beside it. Default layers: 22 on CUDA (the full model), 4 on
the CPU (a 2-core machine; the head then weighs more than on the full model: the table says so).

Measured: batch-1 greedy decode steps as `generate()` runs them (`generate.make_decoder`: the eager step on
the CPU, the CUDA-graph step on CUDA)
after a 16-token prefill; median over repeats of `--steps` steps. Cases: base; fused with 1 and
4 adapters (the 4 stacked into one r=64 side path); fused 4 with int8 factors; merge with 1
adapter (re-ternarized: base speed by construction).

    python bench/bench_adapters.py --device cpu  --out bench/results/adapters_cpu.json
    python bench/bench_adapters.py --device cuda --out bench/results/adapters_gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bitengine  # noqa: E402
from bitengine.generate import make_decoder  # noqa: E402
from bitengine.lora import apply_adapters, remove_adapters  # noqa: E402

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                 tie_word_embeddings=False, architectures=["LlamaForCausalLM"], model_type="llama")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = 16


def write_random_llama(folder: Path, layers: int) -> dict:
    """A 16-bit HF Llama folder with random weights (normal, std 0.02; norms 1), one tensor at a time."""
    from safetensors.torch import save_file

    from bitengine.config import ModelConfig
    from bitengine.model import expected_shapes

    cfg = dict(TINYLLAMA, num_hidden_layers=layers, torch_dtype="float16")
    shapes, _ = expected_shapes(ModelConfig.from_hf(cfg))
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in shapes.items():
        state[name] = (torch.ones(shape) if "norm" in name else torch.randn(shape, generator=g) * 0.02).half()
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    return cfg


def write_random_adapter(folder: Path, cfg: dict, seed: int, r: int = 16) -> None:
    """A PEFT-format LoRA (adapter_config.json + adapter_model.safetensors) on every linear layer."""
    from safetensors.torch import save_file

    from bitengine.config import ModelConfig
    from bitengine.model import expected_shapes

    shapes, linears = expected_shapes(ModelConfig.from_hf(cfg))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m in linears:
        n, k = shapes[f"{m}.weight"]
        state[f"base_model.model.{m}.lora_A.weight"] = (torch.randn(r, k, generator=g) / k**0.5).half()
        state[f"base_model.model.{m}.lora_B.weight"] = (torch.randn(n, r, generator=g) * 1e-3).half()
    folder.mkdir(parents=True)
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": TARGETS, "bias": "none",
        "base_model_name_or_path": "random-tinyllama", "task_type": "CAUSAL_LM"}))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode_tokens_per_s(model, device, steps: int) -> float:
    """One timed round: prefill PROMPT tokens, then `steps` greedy decode steps (tokens per second)."""
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1)).to(device)
    cache = model.new_cache(batch=1, max_seq=PROMPT + steps + 1)
    pos = torch.arange(PROMPT, device=device)
    logits = model(ids, cache=cache, input_pos=pos, kv_len=PROMPT, last_only=True)[:, -1]
    step = make_decoder(model, cache, torch.zeros(1, dtype=torch.long, device=device), cuda_graph=None)
    tok = step(logits.argmax(-1, keepdim=True), PROMPT).argmax(-1, keepdim=True)  # one untimed step
    _sync(device)
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        tok = step(tok, PROMPT + i).argmax(-1, keepdim=True)
    _sync(device)
    return steps / (time.perf_counter() - t0)


def environment(device, model) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "bitengine": bitengine.__version__,
           "platform": platform.platform(), "torch_threads": torch.get_num_threads(), "backend": model.backend_name,
           "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        env["git_dirty"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        env["git_commit"] = None
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else None
    env["cpu"] = cpu
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    if model.backend_name == "cpu":
        from bitengine.backends import cpu as cpu_backend

        env["cpu_backend"] = cpu_backend.describe()
    return env


def markdown(result: dict) -> str:
    e, s = result["environment"], result["setup"]
    lines = [f"# Decode speed with LoRA adapters ({e['gpu'] if 'gpu' in e else e['cpu']})", "",
             f"{s['description']}", "",
             f"date {e['date']}, commit {e.get('git_commit')}{' (dirty tree)' if e.get('git_dirty') else ''}, "
             f"torch {e['torch']}, backend `{e['backend']}`" + (f" ({e['cpu_backend']})" if "cpu_backend" in e else "")
             + f", {e['torch_threads']} torch threads, load average {e.get('load_average')}", "",
             "| case | adapters | side-path rank | adapter MiB | decode tok/s | vs base |",
             "| --- | --- | --- | --- | --- | --- |"]
    base = result["cases"][0]["tokens_per_s"]
    for c in result["cases"]:
        lines.append(f"| {c['case']} | {c['adapters']} | {c['rank']} | {c['adapter_mib']:.1f} | "
                     f"{c['tokens_per_s']:.2f} | {c['tokens_per_s'] / base:.3f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=None, help="default: 22 on cuda, 4 on cpu")
    ap.add_argument("--steps", type=int, default=None, help="decode steps per repeat (default 128 cuda, 32 cpu)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--out", default=None, help="JSON path (a .md beside it); default bench/results/adapters_<dev>.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = args.layers or (22 if device.type == "cuda" else 4)
    steps = args.steps or (128 if device.type == "cuda" else 32)
    out = Path(args.out or ROOT / "bench/results" / f"adapters_{'gpu' if device.type == 'cuda' else 'cpu'}.json")

    with tempfile.TemporaryDirectory(prefix="bitengine_bench_adapters_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        cfg = write_random_llama(tmp / "hf", layers)
        bitengine.convert(tmp / "hf", tmp / "tern", progress=False)
        adapters = []
        for i in range(4):
            write_random_adapter(tmp / f"lora{i}", cfg, seed=10 + i)
            adapters.append(str(tmp / f"lora{i}"))
        model = bitengine.load(tmp / "tern", device=device, backend="auto")
        print(f"built in {time.perf_counter() - t0:.0f} s; backend {model.backend_name}; dtype {model.compute_dtype}",
              flush=True)
        cases = [("base", [], "fused", None), ("fused", adapters[:1], "fused", None),
                 ("fused", adapters, "fused", None), ("fused int8", adapters, "fused", "int8"),
                 ("merge", adapters[:1], "merge", None)]
        # rounds go through every case in turn, so a machine whose load drifts affects all cases alike
        rates = {i: [] for i in range(len(cases))}
        reports = {}
        for rnd in range(args.repeats + 1):  # round 0 warms up
            for i, (name, ads, mode, adt) in enumerate(cases):
                reports[i] = apply_adapters(model, ads, mode=mode, adapter_dtype=adt) if ads else {}
                rate = decode_tokens_per_s(model, device, steps)
                remove_adapters(model)
                if rnd:
                    rates[i].append(rate)
                    print(f"round {rnd} {name:<11} adapters={len(ads)}  {rate:8.2f} tok/s", flush=True)
        results = []
        for i, (name, ads, mode, adt) in enumerate(cases):
            rep = reports[i]
            results.append({"case": name, "adapters": len(ads), "mode": mode, "adapter_dtype": adt or "compute",
                            "rank": rep.get("max_rank_total", 0) if mode == "fused" else 0,
                            "adapter_mib": rep.get("adapter_bytes", 0) / 2**20,
                            "tokens_per_s": statistics.median(rates[i]), "tokens_per_s_rounds": rates[i],
                            "report": rep})
    result = {
        "setup": {"description": (f"Random-weight Llama, TinyLlama-1.1B shapes with {layers} layers (hidden 2048, "
                                  f"intermediate 5632, 32/4 heads, vocab 32000), ternary per-tensor W1.58A8, compute "
                                  f"{str(model.compute_dtype).removeprefix('torch.')}; adapters r=16 on all 7 linears "
                                  f"of every layer; batch 1, {PROMPT}-token prompt, median of {args.repeats} x "
                                  f"{steps} decode steps ({'CUDA-graph' if device.type == 'cuda' else 'eager'}, as "
                                  "generate() runs them), "
                                  "cases interleaved round by round."),
                  "layers": layers, "steps": steps, "repeats": args.repeats, "device": str(device), "shape": TINYLLAMA},
        "environment": environment(device, model),
        "cases": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
