"""Where a CPU decode step's time goes: ternary linears, head, and everything else (the eager glue).

Loads a bitengine checkpoint (default: the TinyLlama-shape A8 model bench_cpu.py writes), fp16 head
through the F16C kernel, and times batch-1 greedy decode steps (generate.Decoder, the step generate()
runs on the CPU) three ways in one process, interleaved round by round:
  full              as generate() runs them;
  no linears        the ternary linears replaced by a preallocated zero output (their time drops out);
  glue only         the head replaced as well: norms, RoPE, cache writes, attention, residuals, sampling.
Differences give the linears' and the head's share. Medians over rounds; the machine should be idle.

    python bench/bench_cpu_breakdown.py --model /tmp/bench_cpu/be_a8 --threads 2 --out bench/results/cpu_breakdown.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bitengine  # noqa: E402
from bitengine.backends import cpu as cpu_backend  # noqa: E402
from bitengine.generate import Decoder  # noqa: E402
from bitengine.int8_head import use_cpu_half_head  # noqa: E402

PROMPT = 128


def ms_per_step(model, ids, steps: int) -> float:
    cache = model.new_cache(1, max_seq=PROMPT + steps + 1)
    logits = model(ids, cache=cache, input_pos=torch.arange(PROMPT), kv_len=PROMPT, last_only=True)
    step = Decoder(model, cache, torch.zeros(1, dtype=torch.long))
    tok = logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for i in range(steps):
        tok = step(tok, PROMPT + i).argmax(-1, keepdim=True)
    return (time.perf_counter() - t0) / steps * 1e3


class _ZeroHead(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.vocab)


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/tmp/bench_cpu/be_a8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu_backend.set_num_threads(args.threads)
    model = bitengine.load(args.model, device="cpu", backend="cpu")
    use_cpu_half_head(model)
    ids = torch.randint(3, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    ms_per_step(model, ids, 4)  # warm-up
    res = {"full": [], "no_linears": [], "glue_only": []}
    real_linear, real_head = cpu_backend.CpuBackend.linear, model.lm_head
    zeros: dict = {}

    def zero_linear(self, x, layer):
        key = (tuple(x.shape), layer.out_features)
        if key not in zeros:
            zeros[key] = x.new_zeros(*x.shape[:-1], layer.out_features)
        return zeros[key]

    try:
        for _ in range(args.rounds):  # the three cases interleaved round by round
            cpu_backend.CpuBackend.linear, model.lm_head = real_linear, real_head
            res["full"].append(ms_per_step(model, ids, args.steps))
            cpu_backend.CpuBackend.linear = zero_linear
            res["no_linears"].append(ms_per_step(model, ids, args.steps))
            model.lm_head = _ZeroHead(model.config.vocab_size)
            res["glue_only"].append(ms_per_step(model, ids, args.steps))
    finally:
        cpu_backend.CpuBackend.linear, model.lm_head = real_linear, real_head
    med = {k: statistics.median(v) for k, v in res.items()}
    out = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "model": args.model, "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
           "kernels": cpu_backend.describe(), "load_average": os.getloadavg(),
           "git": os.popen("git rev-parse --short=10 HEAD 2>/dev/null").read().strip(),
           "ms_per_step": med, "all_rounds": res,
           "split_ms": {"ternary_linears": med["full"] - med["no_linears"],
                        "head": med["no_linears"] - med["glue_only"], "glue": med["glue_only"]}}
    print(json.dumps(out["split_ms"]), json.dumps(med))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
