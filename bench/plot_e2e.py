"""Plot a bench_e2e.py result: decode tokens/s per model, engine and batch, and peak GPU memory.

Reads the JSON bench_e2e.py writes ({"env": ..., "rows": [...]}) and draws one PNG: top row, decode
tokens/s (log scale) per batch size, one panel per model, one bar per variant (bitengine a8 / a16 / fp16,
transformers hf-fp16, ...); bottom row, per model and variant, the weight bytes one decode step reads
and the peak GPU memory of its largest batch. Rows with an error are listed on stderr, not drawn.
matplotlib is a bench-only dependency (`pip install matplotlib`), not one of the package's.

    python bench/plot_e2e.py bench/results/gpu_e2e_NVIDIA_H200_2026-11-28.json [--out plot.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def decode_table(rows: list[dict]) -> dict:
    """{model: {variant: {batch: tokens/s}}}, in the order the rows came."""
    table: dict = {}
    for r in rows:
        if "batch" in r and "decode_tokens_per_s" in r:
            table.setdefault(r["model"], {}).setdefault(r["variant"], {})[r["batch"]] = r["decode_tokens_per_s"]
    return table


def memory_table(rows: list[dict]) -> dict:
    """{model: {variant: (weight GiB, peak GiB of the largest batch or None)}}."""
    table: dict = {}
    for r in rows:
        if "batch" not in r:
            continue
        prev = table.setdefault(r["model"], {}).get(r["variant"])
        if prev is None or r["batch"] >= prev[0]:
            table[r["model"]][r["variant"]] = (r["batch"], r["weight_GiB"], r.get("peak_GiB"))
    return {m: {v: (w, p) for v, (_, w, p) in vs.items()} for m, vs in table.items()}


def label(variant: str, rows: list[dict]) -> str:
    backend = next((r.get("backend", "") for r in rows if r.get("variant") == variant and "backend" in r), "")
    if variant == "hf-fp16":
        return "transformers FP16 (generate)"
    return f"bitengine {variant} ({backend})" if backend else f"bitengine {variant}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="a bench_e2e.py result (gpu_e2e_<card>_<date>.json)")
    ap.add_argument("--out", help="PNG path (default: the JSON's path with .png)")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    if not os.path.exists(args.json):
        raise FileNotFoundError(f"no bench_e2e result at {args.json}")
    with open(args.json) as f:
        data = json.load(f)
    env, rows = data.get("env", {}), data.get("rows", [])
    for r in rows:
        if "error" in r:
            print(f"skipped {r.get('model')} {r.get('variant')}: {r['error']}", file=sys.stderr)
    decode, memory = decode_table(rows), memory_table(rows)
    if not decode:
        raise ValueError(f"{args.json}: no decode rows to plot")
    models = list(decode)
    variants = list(dict.fromkeys(v for m in models for v in decode[m]))
    colors = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}

    fig, axes = plt.subplots(2, len(models), figsize=(max(5.5 * len(models), 11), 8), squeeze=False)
    width = 0.8 / len(variants)
    for j, model in enumerate(models):
        ax = axes[0][j]
        batches = sorted({b for v in decode[model].values() for b in v})
        for i, v in enumerate(variants):
            xs = [k + (i - (len(variants) - 1) / 2) * width for k, b in enumerate(batches) if b in decode[model].get(v, {})]
            ys = [decode[model][v][b] for b in batches if b in decode[model].get(v, {})]
            ax.bar(xs, ys, width, color=colors[v], label=label(v, rows))
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_yscale("log")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(model)
        ax.grid(axis="y", alpha=0.3, which="both")

        ax = axes[1][j]
        vs = [v for v in variants if v in memory.get(model, {})]
        weight = [memory[model][v][0] for v in vs]
        peak = [memory[model][v][1] or 0.0 for v in vs]
        ax.bar([k - 0.2 for k in range(len(vs))], weight, 0.4, color=[colors[v] for v in vs], alpha=0.55,
               label="weights read per step")
        ax.bar([k + 0.2 for k in range(len(vs))], peak, 0.4, color=[colors[v] for v in vs], hatch="//",
               label="peak GPU memory (largest batch)")
        ax.set_xticks(range(len(vs)), vs, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("GiB")
        ax.grid(axis="y", alpha=0.3)
        if j == 0:
            ax.legend(fontsize=8)
    # one legend entry per variant in its own color (a variant missing from the first model, e.g. transformers in
    # a run that has it for one model only, drew an empty bar there whose legend patch took another color)
    from matplotlib.patches import Patch

    handles = [Patch(color=colors[v]) for v in variants]
    labels = [label(v, rows) for v in variants]
    fig.suptitle(f"{env.get('card', '?')} {env.get('date', '')}: random-weight models, greedy decode "
                 f"(bitengine: CUDA graph; transformers: generate)", y=0.99, fontsize=11)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=min(len(labels), 4),
               fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    out = args.out or os.path.splitext(args.json)[0] + ".png"
    fig.savefig(out, dpi=120)
    print(out)
    return out


if __name__ == "__main__":
    main()
