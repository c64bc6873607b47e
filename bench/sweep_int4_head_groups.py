"""Why the int4 head uses groups of 128 with an absmax scale: perplexity of a real model (CPU) with the int4 head at
group sizes 128 / 64 / 32, each with the absmax scale (bitengine.int4_head) and with a per-group search of the scale
(the fraction of absmax / 7 in 0.70 .. 1.00 with the least squared weight error, as some GGUF quantizers do).

    python bench/sweep_int4_head_groups.py /tmp/smol_fp16 --out bench/results/cpu_int4_head_groups_<date>.json

Only the quantization and the float64 reference run here (patching int4_head.GROUP); the GPU kernels support
GROUP = 128 only. The checkpoint: SmolLM2-135M converted with --weights fp16 (bench_cpu_int8_head.py has the loader,
int8 and int4 heads at the shipped settings).
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

import torch

import bitengine
import bitengine.int4_head as ih
from bitengine.evaluate import perplexity, zen_of_python

ABSMAX_GROUPS = ih.int4_groups


def mse_groups(w, grid=(1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)):
    """int4_groups with each group's scale chosen from `grid` x absmax / 7 by least squared error."""
    n, k = w.shape
    kp = ih.padded_k(k)
    wf = torch.nn.functional.pad(w.float(), (0, kp - k)).reshape(n, -1, ih.GROUP)
    amax = wf.abs().amax(-1)
    best_err = torch.full_like(amax, float("inf"))
    best_s = torch.zeros_like(amax, dtype=torch.float16)
    for f in grid:
        s = (amax * f / 7).to(torch.float16)
        sf = s.float()[..., None]
        q = torch.where(sf > 0, (wf / sf).round(), torch.zeros_like(wf)).clamp(-7, 7)
        err = ((q * sf - wf) ** 2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    sf = best_s.float()[..., None]
    q = torch.where(sf > 0, (wf / sf).round(), torch.zeros_like(wf)).clamp(-7, 7).to(torch.int8)
    return ih.pack_int4(q.reshape(n, kp)), best_s


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    texts = {"zen": zen_of_python(),
             "license": (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()[:6000]}
    res = {}
    for group in (128, 64, 32):
        for method in ("absmax", "mse"):
            ih.GROUP = group
            ih.int4_groups = ABSMAX_GROUPS if method == "absmax" else mse_groups
            model = bitengine.load(args.checkpoint, device="cpu", backend="cpu")
            ih.quantize_head_int4(model)
            for name, text in texts.items():
                with torch.no_grad():
                    r = perplexity(model, model.tokenizer, text, max_len=1024)
                res[f"g{group} {method} {name}"] = r["perplexity"]
                print(group, method, name, r["perplexity"], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
