"""One-token decode attention: the Triton kernels (bitengine/kernels/decode_attention.py) against
scaled_dot_product_attention with the model's boolean mask (cuDNN / flash / efficient, as torch picks), one run.

Head shapes of Llama-2-7B (32 / 32 heads), BitNet-2B-4T (20 / 5) and Llama-3-8B (32 / 8), head_dim 128, fp16;
cache of S slots with the token at slot `pos` (the kernel reads slots <= pos, SDPA all S under the mask);
batch 1 and 8. Median us per call of CUDA-graph replays (50 calls per replay, 15 replays); every output is
checked against a float64 reference first.

    python bench/bench_decode_attention.py --out bench/results
Writes gpu_decode_attention_<card>_<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_kernels import time_calls  # noqa: E402  (CUDA-graph timing shared with the kernel benchmark)

from bitengine.kernels.decode_attention import decode_attention, sm_count  # noqa: E402

HEADS = {"llama-2-7b": (32, 32), "bitnet-2b-4t": (20, 5), "llama-3-8b": (32, 8)}
CASES = [(192, 191), (4096, 200), (4096, 4095)]  # (cache slots S, token slot pos)
D = 128


def reference64(q, k, v, mask):
    g = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    scores = (q.double() @ kk.transpose(-1, -2)) / D ** 0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ vv


def time_variants(q, k, v, mask, pos, n_sm):
    """name -> us per call, every output first checked against the float64 reference."""
    ref = reference64(q, k, v, mask)
    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])}
    for bs in (64, 32):  # the split variant (one program per query head), named so since the first runs
        for nw in (4, 8):
            fns[f"triton_b{bs}_w{nw}"] = (lambda bs=bs, nw=nw: decode_attention(
                q, k, v, mask, pos, n_sm, block_s=bs, num_warps=nw, variant="split"))
    for bs in (64, 128, 32):  # the grouped variant (tl.dot per kv head; the default), 4 warps
        fns[f"grouped_b{bs}"] = lambda bs=bs: decode_attention(q, k, v, mask, pos, n_sm, block_s=bs, variant="grouped")
    # the grouped variant with one slice per kv head (no merge kernel; n_sm = 1 sizes the split to one slice) and with
    # twice the slices (more programs, shorter loops)
    fns["grouped_b64_1slice"] = lambda: decode_attention(q, k, v, mask, pos, 1, variant="grouped")
    fns["grouped_b64_2x"] = lambda: decode_attention(q, k, v, mask, pos, 2 * n_sm, variant="grouped")
    out = {}
    for name, fn in fns.items():
        err = ((fn().double() - ref).norm() / ref.norm()).item()
        assert err < 2e-3, f"{name}: rel.err {err:.2e} (q {tuple(q.shape)}, k {tuple(k.shape)})"
        out[name] = time_calls([fn] * 50)  # one graph of 50 calls, median of 15 replays
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    env = {"card": props.name, "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "git_commit": os.environ.get("BITENGINE_COMMIT", "")}
    n_sm = sm_count(torch.device("cuda"))
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for model, (h, hkv) in HEADS.items():
        for b in (1, 8):
            for s, pos in CASES:
                q = torch.randn(b, h, 1, D, device="cuda", dtype=torch.float16, generator=g)
                k = torch.randn(b, hkv, s, D, device="cuda", dtype=torch.float16, generator=g)
                v = torch.randn(b, hkv, s, D, device="cuda", dtype=torch.float16, generator=g)
                slots = torch.arange(s, device="cuda")
                mask = (slots <= pos).view(1, 1, 1, s).expand(b, 1, 1, s).contiguous()
                p = torch.full((1,), pos, dtype=torch.long, device="cuda")
                row = {"model": model, "heads": h, "kv_heads": hkv, "batch": b, "S": s, "pos": pos}
                row.update(time_variants(q, k, v, mask, p, n_sm))
                rows.append(row)
                print(json.dumps(row), flush=True)
    names = [k for k in rows[0] if k.startswith(("sdpa", "triton", "grouped"))]
    lines = [f"# One-token decode attention on {env['card']} ({env['date']})", "",
             f"torch {env['torch']}, commit `{env['git_commit'][:12]}`. fp16, head_dim {D}; median us per call "
             "(CUDA-graph replays). `triton_b{block}_w{warps}`: the split-key kernel (b64_w4 was the default, plus its merge "
             "kernel when the slots are split); `grouped_b{block}`: the grouped variant (one program per kv head and "
             "slice, tl.dot; the default, b64), `_1slice`: one slice per kv head (no merge), `_2x`: twice the "
             "slices; sdpa: scaled_dot_product_attention with the boolean mask over all S slots.",
             "", "| model | heads / kv | batch | S | pos | " + " | ".join(names) + " |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['heads']} / {r['kv_heads']} | {r['batch']} | {r['S']} | {r['pos']} | "
                     + " | ".join(f"{r[n]:.2f}" for n in names) + " |")
    tag = f"{env['card'].replace(' ', '_')}_{env['date'][:10]}"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"gpu_decode_attention_{tag}.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, f"gpu_decode_attention_{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
