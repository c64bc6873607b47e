"""The end of a decode step at real vocabularies, one run, one card: the LM head and the greedy argmax.

    python bench/bench_head.py --out bench/results [--budget-s 120] [--sweep]

Head (M = 1 and 8): cuBLAS FP16 (F.linear) against the int8 head: the op the engine runs
(torch.ops.bitengine.int8_linear), the C++ GEMV (csrc/cuda/int8_gemv.cu, M = 1) and the Triton kernels
(kernels/int8_linear.py: the GEMV at M = 1, with --sweep a sweep of its configs, BLOCK_N x BLOCK_K x warps x stages;
the GEMM at M = 8), plus the C++ read probe on the int8 bytes (a plain streaming read: the ceiling).
The int4 head (bitengine.int4_head: group-wise int4 of the same fp16 weights): its op (torch.ops.bitengine.int4_linear:
the C++ GEMV csrc/cuda/int4_gemv.cu at M = 1, the Triton GEMM at M = 8), checked against its float64 reference, and
the read probe on its bytes.
Argmax over (B, V) logits: torch.argmax against kernels/argmax.py.
Median us of CUDA-graph replays (bench_kernels.time_calls); every head weight is larger than L2, so no rotation.
Results: bench_head_<card>_<date>.json and .md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import torch
import torch.nn.functional as F
from bench_kernels import cuda_ext, environment, rel_err, time_calls

from bitengine.int4_head import int4_groups, int4_linear_reference
from bitengine.kernels import argmax as argmax_kernel
from bitengine.kernels import int4_linear, int8_linear

HEADS = {"llama2_7b.head": (32000, 4096), "bitnet2b.head": (128256, 2560), "llama3_8b.head": (128256, 4096)}
SWEEP = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
         for bn in (4, 8, 16, 32) for bk in (256, 512, 1024) for nw in (4, 8) for ns in (1, 3)
         if bn * bk <= 16384]


def bench_head(name, n, k, ext, budget_end, sweep=False):
    row = {"shape": name, "N": n, "K": k}
    g = torch.Generator(device="cuda").manual_seed(n + k)
    w16 = torch.randn(n, k, device="cuda", generator=g).half()
    w8 = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=g)
    scale = torch.rand(n, device="cuda", generator=g) / 100
    w4, s4 = int4_groups(w16)
    for m in (1, 8):
        x = torch.randn(m, k, device="cuda", generator=g).half()
        ref = (x.double() @ w8.double().t() * scale.double()).float()
        r = {"cublas_fp16": time_calls([functools.partial(F.linear, x, w16)])}
        # the Triton kernel for this M (the GEMV up to GEMV_MAX_M rows, else the GEMM); int8_op: what the engine runs
        # (torch.ops.bitengine.int8_linear: at M = 1 the C++ GEMV where built, cuda_int8_gemv)
        kernel = int8_linear.int8_gemv if m <= int8_linear.GEMV_MAX_M else int8_linear.int8_gemm

        def run(cfg=None, x=x, kernel=kernel, w=w8):
            return kernel(x, w, scale, None, k, config=cfg)

        y = run()
        r["int8_engine_err"] = rel_err(y, ref)
        assert r["int8_engine_err"] < 2e-3, r["int8_engine_err"]
        r["int8_engine"] = time_calls([run])
        r["int8_engine_kernel"] = kernel.__name__
        r["int8_op"] = time_calls([lambda x=x, w=w8: torch.ops.bitengine.int8_linear(x, w, scale, None, k)])
        if m == 1 and ext is not None and int8_linear.cuda_gemv_ext(x, w8, None) is not None:
            y = ext._C_cuda.int8_gemv(x, w8, scale, k)
            r["cuda_int8_gemv_err"] = rel_err(y, ref)
            assert r["cuda_int8_gemv_err"] < 2e-3, r["cuda_int8_gemv_err"]
            r["cuda_int8_gemv"] = time_calls([lambda x=x, w=w8: ext._C_cuda.int8_gemv(x, w, scale, k)])
        best = None
        for cfg in SWEEP if sweep and kernel is int8_linear.int8_gemv else []:
            if time.time() > budget_end:
                break
            cfg = {**cfg, "BLOCK_M": max(1, m)}
            try:
                y = run(cfg)
                err = rel_err(y, ref)
                if not err < 2e-3:
                    raise AssertionError(f"rel. err {err:.2e}")
                us = time_calls([functools.partial(run, cfg)])
            except Exception as e:  # noqa: BLE001 - a config that does not compile or fit: note it, go on
                print("sweep error", name, m, cfg, str(e)[:160], flush=True)
                continue
            r.setdefault("sweep", []).append({"cfg": cfg, "us": us})
            if best is None or us < best["us"]:
                best = {"cfg": cfg, "us": us}
        r["int8_best"] = best
        y = int4_linear.int4_linear(x, w4, s4, None, k)
        r["int4_op_err"] = rel_err(y, int4_linear_reference(x.double(), w4, s4, None, k).float())
        assert r["int4_op_err"] < 2e-3, r["int4_op_err"]
        r["int4_op"] = time_calls([lambda x=x, w=w4, s=s4: torch.ops.bitengine.int4_linear(x, w, s, None, k)])
        if m == 1 and ext is not None:
            sink = torch.empty(1, dtype=torch.int32, device="cuda")
            r["read_probe_int8"] = time_calls([functools.partial(ext._C_cuda.read_probe, w8, sink)])
            r["read_probe_int4"] = time_calls([functools.partial(ext._C_cuda.read_probe, w4, sink)])
        row[f"M{m}"] = r
        print(json.dumps({"shape": name, "M": m, **{k2: v for k2, v in r.items() if k2 != "sweep"}}), flush=True)
    del w16, w8, w4, s4
    torch.cuda.empty_cache()
    return row


def bench_argmax(v):
    out = {"V": v}
    for b in (1, 8, 32):
        logits = torch.randn(b, v, device="cuda").half()
        assert torch.equal(argmax_kernel.argmax_rows(logits), logits.argmax(-1))
        out[f"B{b}"] = {"torch": time_calls([lambda lg=logits: lg.argmax(-1)]),
                        "kernel": time_calls([functools.partial(argmax_kernel.argmax_rows, logits)])}
    print(json.dumps(out), flush=True)
    return out


def markdown(env, heads, argmaxes):
    lines = [f"# LM head and greedy argmax on {env['card']} ({env['date']})", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, commit `{env['git_commit'][:12]}`; "
             "median us of CUDA-graph replays. int8 weights: half the bytes of fp16; int4 (groups of 128, fp16 scales): a "
             "quarter plus 1/64 for the scales.", "",
             ("| head | N x K | M | cuBLAS FP16 us | int8 op (engine) us | C++ int8 GEMV us | Triton kernel | us |"
             " Triton GEMV best of sweep us | its config | int8 read probe us | int4 op us | int4 read probe us |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for h in heads:
        for m in (1, 8):
            r = h.get(f"M{m}")
            if r is None:
                continue
            best = r.get("int8_best") or {}
            cfg = ", ".join(f"{a}={b}" for a, b in (best.get("cfg") or {}).items())
            probe = f"{r['read_probe_int8']:.2f}" if "read_probe_int8" in r else "-"
            cpp = f"{r['cuda_int8_gemv']:.2f}" if "cuda_int8_gemv" in r else "-"
            probe4 = f"{r['read_probe_int4']:.2f}" if "read_probe_int4" in r else "-"
            lines.append(f"| {h['shape']} | {h['N']}x{h['K']} | {m} | {r['cublas_fp16']:.2f} | {r['int8_op']:.2f} | {cpp} | "
                         f"{r['int8_engine_kernel']} | "
                         f"{r['int8_engine']:.2f} | "
                         f"{best.get('us', float('nan')):.2f} | {cfg} | {probe} | {r['int4_op']:.2f} | {probe4} |")
    lines += ["", "| vocabulary | batch | torch.argmax us | kernels/argmax.py us |", "| --- | --- | --- | --- |"]
    for a in argmaxes:
        for b in (1, 8, 32):
            lines.append(f"| {a['V']} | {b} | {a[f'B{b}']['torch']:.2f} | {a[f'B{b}']['kernel']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--budget-s", type=float, default=120)
    ap.add_argument("--sweep", action="store_true", help="also sweep the Triton int8 GEMV's configs at M = 1")
    args = ap.parse_args()
    budget_end = time.time() + args.budget_s
    env = environment()
    argmaxes = [bench_argmax(v) for v in (32000, 128256)]
    heads = [bench_head(name, n, k, cuda_ext(), budget_end, args.sweep) for name, (n, k) in HEADS.items()]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench_head_{env['card'].replace(' ', '_')}_{env['date'][:10]}")
    with open(stem + ".json", "w") as f:
        json.dump({"env": env, "heads": heads, "argmax": argmaxes}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(env, heads, argmaxes))
    print(markdown(env, heads, argmaxes))


if __name__ == "__main__":
    main()
