"""Where the long-prompt ternary linear (M = 2048) spends its time, and which GEMM tile is fastest per shape.

The A8 prefill linear (kernels/gemm_decoded.py) is three kernels: the weight's decode to an int8 scratch, per-token
int8 quantization of x, the int8 tensor-core GEMM (autotuned over a few tiles). This times each alone, the
whole call as the engine runs it, cuBLAS FP16 at the same shape, and the GEMM over a wider grid of tiles than the
autotuner's; every tile's output is checked bit-equal to the engine's (int32 accumulation, same epilogue).
GPU only:  python bench/sweep_prefill_gemm.py --out DIR  (writes prefill_sweep.json and .md)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_kernels import environment, random_ternary, time_calls  # noqa: E402

from bitengine.kernels import gemm_decoded  # noqa: E402
from bitengine.kernels.act_quant import quantize_activations_int8  # noqa: E402
from bitengine.kernels.gemm_decoded import _gemm_dense_kernel, decode_weight, ternary_gemm_decoded  # noqa: E402

SHAPES = [("bitnet2b.qkv_q", 2560, 2560), ("bitnet2b.kv", 640, 2560), ("bitnet2b.qkv", 3840, 2560),
          ("bitnet2b.up", 6912, 2560), ("bitnet2b.gate_up", 13824, 2560), ("bitnet2b.down", 2560, 6912),
          ("llama2_7b.o", 4096, 4096), ("llama2_7b.down", 4096, 11008)]

# calls per CUDA graph: a graph of one call also times the replay's own launch (the first run of this script
# read 10-15 us for a decode of 0.4 MB)
CALLS = 10

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); int8 operands: stages * (BM + BN) * BK bytes of shared memory
TILES = [(bm, bn, bk, w, s)
         for bm, bn in ((128, 256), (256, 128), (128, 128), (64, 256), (128, 64), (64, 128), (64, 64))
         for bk in (64, 128, 256)
         for w, s in ((4, 4), (8, 3), (8, 4), (8, 5))
         if s * (bm + bn) * bk <= 200 * 1024 and not (w == 4 and bm * bn > 128 * 128)
         and not (w == 8 and bm * bn < 64 * 128)]


def gemm_only(xin, a, w, scale, y, bm, bn, bk, warps, stages, group_m=8):
    m, n = xin.shape[0], w.shape[0]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _gemm_dense_kernel.fn[grid](xin, xin.stride(0), a, w, w.stride(0), scale, scale, y, y.stride(0),
                                y, 0, scale, 0, 0, m, n, xin.shape[1], w.shape[1], 2048,
                                A8=True, SCALE_MODE=0, HAS_BIAS=False, HAS_LORA=False,
                                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m,
                                num_warps=warps, num_stages=stages)
    return y


def time_tiles(fn, tiles, args, want, budget_end, row):
    """[{tile, us, bit_equal} | {tile, error}] of fn(*args, y, *tile) over the tiles, until the budget ends."""
    y = torch.empty_like(want)
    out = []
    for tile in tiles:
        if time.time() > budget_end:
            row["cut_by_budget"] = True
            break
        try:
            fn(*args, y, *tile)
            torch.cuda.synchronize()
            ok = torch.equal(y, want)
            us = time_calls([lambda tile=tile: fn(*args, y, *tile)] * CALLS)
        except Exception as e:  # out of resources for this tile: recorded, not fatal
            out.append({"tile": list(tile), "error": str(e).splitlines()[0][:120] if str(e) else type(e).__name__})
            continue
        out.append({"tile": list(tile), "us": us, "bit_equal": ok})
    return out


def best_of(tiles):
    good = [t for t in tiles if "us" in t and t["bit_equal"]]
    return min(good, key=lambda t: t["us"]) if good else None


def sweep_shape(name, n, k, m, budget_end, tiles):
    torch.manual_seed(0)
    (_, words), = random_ternary(n, k, 1, seed=n + k)
    scale = torch.full((1,), 0.02, dtype=torch.float32, device="cuda")
    x = torch.randn(m, k, dtype=torch.float16, device="cuda")
    w16 = torch.randn(n, k, dtype=torch.float16, device="cuda")
    row = {"shape": name, "N": n, "K": k, "M": m}
    row["engine_us"] = time_calls([lambda: ternary_gemm_decoded(x, words, scale, k, 8)] * CALLS)
    best = getattr(_gemm_dense_kernel, "best_config", None)
    overlap, gemm_decoded.OVERLAP = gemm_decoded.OVERLAP, False  # the same call with the decode not overlapped
    row["engine_sequential_us"] = time_calls([lambda: ternary_gemm_decoded(x, words, scale, k, 8)] * CALLS)
    gemm_decoded.OVERLAP = overlap
    row["engine_tile"] = str(best) if best is not None else None
    row["cublas_fp16_us"] = time_calls([lambda: x @ w16.t()] * CALLS)
    row["quantize_us"] = time_calls([lambda: quantize_activations_int8(x, words.shape[1])] * CALLS)
    row["decode_us"] = time_calls([lambda: decode_weight(words, torch.int8)] * CALLS)
    xin, a = quantize_activations_int8(x, words.shape[1])
    wd = decode_weight(words, torch.int8)
    want = ternary_gemm_decoded(x, words, scale, k, 8)
    if tiles:
        row["dense_tiles"] = time_tiles(gemm_only, TILES, (xin, a, wd, scale), want, budget_end, row)
        row["dense_wrong_tiles"] = [t["tile"] for t in row["dense_tiles"] if "us" in t and not t["bit_equal"]]
        best = best_of(row["dense_tiles"])
        if best is not None:
            row["dense_best_tile"], row["dense_best_us"] = best["tile"], best["us"]
    return row


def markdown(env, rows):
    lines = [f"# Prefill linear (A8, M = {rows[0]['M'] if rows else '-'}) breakdown and tile sweep on {env['card']} "
             f"({env['date']})", "",
             f"torch {env['torch']}, triton {env['triton']}, commit `{env['git_commit'][:12]}`. Median us of CUDA-graph "
             f"replays, {CALLS} calls per graph (inputs warm in L2, as after the op that wrote them). engine = decode + "
             "quantize + autotuned GEMM as ternary_gemm_decoded runs it (the decode on a side stream beside the quantization: "
             "gemm_decoded.OVERLAP; \"not overlapped\" one after the other); best GEMM = the fastest bit-equal tile "
             "(BM,BN,BK,warps,stages) of gemm_decoded's GEMM, the GEMM alone. Ratios are FP16 time / ternary time "
             "(above 1x: the ternary linear is faster).", "",
             "| shape | N x K | engine us | decode not overlapped us | cuBLAS FP16 us | engine vs FP16 | quantize us | "
             "decode us | best GEMM us (tile) | engine tile |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        best = (f"{r['dense_best_us']:.2f} ({','.join(map(str, r['dense_best_tile']))})"
                if "dense_best_us" in r else "-")
        lines.append(f"| {r['shape']} | {r['N']}x{r['K']} | {r['engine_us']:.2f} | {r['engine_sequential_us']:.2f} | "
                     f"{r['cublas_fp16_us']:.2f} | {r['cublas_fp16_us'] / r['engine_us']:.2f}x | {r['quantize_us']:.2f} | "
                     f"{r['decode_us']:.2f} | {best} | {r['engine_tile']} |")
    wrong = [f"{r['shape']} {r['dense_wrong_tiles']}" for r in rows if r.get("dense_wrong_tiles")]
    errors = [f"{r['shape']} {t['tile']}: {t['error']}" for r in rows for t in r.get("dense_tiles", []) if "error" in t]
    lines += ["", "Tiles off the bit-equal check: " + ("; ".join(wrong) or "none"),
              "Tiles that failed to run: " + ("; ".join(errors[:20]) or "none")]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--budget-s", type=float, default=240)
    p.add_argument("--no-tiles", action="store_true", help="only the engine, FP16 and per-kernel rows")
    p.add_argument("--shapes", default="", help="comma-separated shape names (default: all)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep_prefill_gemm: needs a CUDA GPU")
    env = environment()
    end = time.time() + args.budget_s
    rows = []
    for name, n, k in SHAPES:
        if args.shapes and name not in args.shapes.split(","):
            continue
        rows.append(sweep_shape(name, n, k, args.m, end, not args.no_tiles))
        r = rows[-1]
        print(f"{name} {n}x{k}: engine {r['engine_us']:.1f} us (not overlapped {r['engine_sequential_us']:.1f}; fp16 "
              f"{r['cublas_fp16_us']:.1f}), quantize {r['quantize_us']:.1f}, decode {r['decode_us']:.1f}, best GEMM "
              f"{r.get('dense_best_us')} {r.get('dense_best_tile')}, engine tile {r['engine_tile']}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prefill_sweep.json"), "w") as f:
        json.dump({"env": env, "tiles": TILES, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "prefill_sweep.md"), "w") as f:
        f.write(markdown(env, rows))
    print(markdown(env, rows))


if __name__ == "__main__":
    main()
