"""End-to-end CPU bench: bitengine vs transformers fp32 vs llama.cpp on one random-weight model.

Model: Llama at TinyLlama-1.1B shapes (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV
heads, vocab 32000). Every linear weight in the layers is already ternary times one scale per
tensor (W = s * W_q, stored fp16), so bitengine's absmean conversion and llama.cpp's TQ2_0/TQ1_0
quantization hold the very same ternary weights; embeddings and head are random fp16.
Per engine (each in its own process, 2 threads): a 128-token prompt, then 64 decoded tokens
(greedy, one token per step), --reps times; medians of prompt and decode tokens/s. bitengine decode
steps run the C++ decoder layers (cpu_decode.py, generate()'s default on the CPU), the model's own
PyTorch forward ("PyTorch layers") or that forward compiled ("compiled", generate(compile=True)).

    python bench/bench_cpu.py --work /tmp/bench_cpu --threads 2 --reps 3 --out bench/results/cpu_e2e
Files: <work>/hf (HF folder), <work>/be_a8, be_a16 (bitengine), <work>/*.gguf (llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 2048, 5632, 22, 32, 4, 32000
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
# llama.cpp variants: (file stem, ftype, output/embedding type override or None for its default)
GGUF_VARIANTS = {"f16": (1, None), "q4_0": (2, None), "tq2_0_f16head": (37, 1), "tq2_0": (37, None),
                 "tq1_0_f16head": (36, 1), "tq1_0": (36, None)}


# ---- model files ------------------------------------------------------------------------------
def make_hf(path: Path, seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (path / "model.safetensors").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                      max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, torch_dtype="float16")
    cfg.save_pretrained(path)
    sd = {"model.embed_tokens.weight": (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).half(),
          "model.norm.weight": torch.ones(HIDDEN, dtype=torch.float16),
          "lm_head.weight": (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).half()}
    shapes = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (256, HIDDEN), "v_proj": (256, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
              "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.float16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.float16)
        for lin in LINEARS:
            n, k = shapes[lin.split(".")[1]]
            w_q = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
            scale = 1.0 / k ** 0.5  # keeps activations O(1) through the residual stream
            sd[p + lin + ".weight"] = (w_q.half() * scale).contiguous()
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


def _permute(w, n_head):  # HF q/k rows -> llama.cpp's rotary layout (convert_hf_to_gguf.py)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_gguf_f16(hf: Path, out: Path) -> None:
    """F16 GGUF of the same weights with a placeholder 32000-token SPM vocabulary (ids are fed directly)."""
    import gguf
    from safetensors.torch import load_file

    if out.exists():
        return
    sd = load_file(str(hf / "model.safetensors"))
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(2048)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)  # MOSTLY_F16
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [2, 3, 3] + [6] * 256
    tokens += [f"\u2581t{i}" for i in range(VOCAB - len(tokens))]
    types += [1] * (VOCAB - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"].float().numpy())
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"].float().numpy())
        for lin, name in names.items():
            t = sd[p + lin + ".weight"]
            if name == "attn_q":
                t = _permute(t, HEADS)
            elif name == "attn_k":
                t = _permute(t, KV_HEADS)
            w.add_tensor(f"blk.{i}.{name}.weight", t.contiguous().numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].float().numpy())
    w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_QUIET = None


def _quiet_log():
    import llama_cpp

    global _QUIET
    if _QUIET is None:
        _QUIET = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    return _QUIET


def make_gguf_variants(work: Path, threads: int) -> None:
    import ctypes

    import llama_cpp

    src = work / "f16.gguf"
    for stem, (ftype, head_type) in GGUF_VARIANTS.items():
        out = work / f"{stem}.gguf"
        if stem == "f16" or out.exists():
            continue
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = threads
        if head_type is not None:
            params.output_tensor_type = head_type
            params.token_embedding_type = head_type
        llama_cpp.llama_log_set(_quiet_log(), ctypes.c_void_p(0))
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize {stem} failed with {rc}")


def make_bitengine(work: Path) -> None:
    import bitengine

    for act_bits in (8, 16):
        dst = work / f"be_a{act_bits}"
        if not (dst / "config.json").exists():
            bitengine.convert(work / "hf", dst, weights="ternary", act_bits=act_bits, scale="tensor",
                              progress=False, log=lambda *a: None)


# ---- runners (one engine per process) ----------------------------------------------------------
def _prompt(n):
    import random

    rng = random.Random(1234)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def run_bitengine(work, act_bits, head, backend, n_prompt, n_gen, reps, decode="cpp"):
    """Prompt then decode, timed separately. decode: "cpp", the C++ decoder layers of cpu_decode (what
    generate() runs on the CPU by default); "eager", the model's PyTorch layers; "compiled", steps through
    generate.compiled_forward (what generate(compile=True) runs on the CPU), whose one-time compilation
    runs in an untimed first rep, and the result is then {"runs": [...], "compile_s": that rep's seconds}."""
    import torch

    import bitengine
    from bitengine import cpu_decode
    from bitengine.generate import compiled_forward
    from bitengine.int4_head import quantize_head_int4
    from bitengine.int8_head import quantize_head_int8, use_cpu_half_head

    model = bitengine.load(work / f"be_a{act_bits}", device="cpu", backend=backend)
    if head == "int8":
        quantize_head_int8(model)
    elif head == "int4":
        quantize_head_int4(model)
    elif head == "fp16":
        use_cpu_half_head(model)
    ids = torch.tensor([_prompt(n_prompt)])
    compile = decode == "compiled"
    step = compiled_forward(model) if compile else model
    layers = cpu_decode.plan(model) if decode == "cpp" else None
    if decode == "cpp" and layers is None:
        raise RuntimeError(f"C++ decoder layers unavailable: {model.__dict__.get('_fast_decode_reason')}")
    out = []
    with torch.no_grad():
        for rep in range(reps + compile):
            cache = model.new_cache(1, max_seq=n_prompt + n_gen + 1)
            cache.valid.fill_(True)
            t0 = time.perf_counter()
            logits = model(ids, cache=cache, input_pos=torch.arange(n_prompt), kv_len=n_prompt, last_only=True)
            tok = logits[:, -1].argmax(-1)
            t1 = time.perf_counter()
            fast = cpu_decode.FastCpuDecoder(model, cache, torch.zeros(1, dtype=torch.long), layers) if layers else None
            for i in range(n_gen):
                pos = n_prompt + i
                if fast is not None:
                    tok = fast(tok.view(1, 1), pos).argmax(-1)
                    continue
                logits = step(tok.view(1, 1), cache=cache, input_pos=torch.tensor([pos]), kv_len=pos + 1)
                tok = logits[:, -1].argmax(-1)
            t2 = time.perf_counter()
            if compile and rep == 0:  # the compiling rep
                compile_s = t2 - t0
                continue
            out.append((n_prompt / (t1 - t0), n_gen / (t2 - t1)))
    return {"runs": out, "compile_s": compile_s} if compile else out


def run_transformers(work, n_prompt, n_gen, reps):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([_prompt(n_prompt)])
    out = []
    with torch.no_grad():
        for _ in range(reps):
            t0 = time.perf_counter()
            o = model(ids, use_cache=True, logits_to_keep=1)
            past, tok = o.past_key_values, o.logits[:, -1].argmax(-1)
            t1 = time.perf_counter()
            for _ in range(n_gen):
                o = model(tok.view(1, 1), past_key_values=past, use_cache=True)
                past, tok = o.past_key_values, o.logits[:, -1].argmax(-1)
            t2 = time.perf_counter()
            out.append((n_prompt / (t1 - t0), n_gen / (t2 - t1)))
    return out


def run_llamacpp(work, stem, threads, n_prompt, n_gen, reps):
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(work / f"{stem}.gguf"), n_ctx=n_prompt + n_gen + 16, n_batch=n_prompt, n_ubatch=n_prompt,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = _prompt(n_prompt)
    out = []
    for _ in range(reps):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(VOCAB,))))
        t1 = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([tok])
            tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(VOCAB,))))
        t2 = time.perf_counter()
        out.append((n_prompt / (t1 - t0), n_gen / (t2 - t1)))
    return out


def engines():
    """name -> (kind, options), ordered so each llama.cpp format runs next to its bitengine peer.

    bitengine heads: fp16 (F16C kernel, use_cpu_half_head), int8 (Int8Linear, quantize_head_int8), int4 (Int4Linear,
    quantize_head_int4)."""
    be = lambda a, k, h, d="cpp": ("bitengine", dict(act_bits=a, kernel=k, head=h, decode=d))  # noqa: E731
    return {
        "llama.cpp tq2_0_f16head": ("llamacpp", dict(stem="tq2_0_f16head")),
        "bitengine A8 dot, fp16 head": be(8, "dot", "fp16"),
        "bitengine A8 dot, fp16 head, compiled": be(8, "dot", "fp16", "compiled"),
        "bitengine A8 dot, fp16 head, PyTorch layers": be(8, "dot", "fp16", "eager"),
        "llama.cpp tq2_0": ("llamacpp", dict(stem="tq2_0")),
        "bitengine A8 dot, int8 head": be(8, "dot", "int8"),
        "bitengine A8 dot, int8 head, compiled": be(8, "dot", "int8", "compiled"),
        "bitengine A8 dot, int4 head": be(8, "dot", "int4"),
        "bitengine A8 add, fp16 head": be(8, "add", "fp16"),
        "bitengine A8 add, int8 head": be(8, "add", "int8"),
        "llama.cpp tq1_0_f16head": ("llamacpp", dict(stem="tq1_0_f16head")),
        "llama.cpp tq1_0": ("llamacpp", dict(stem="tq1_0")),
        "bitengine A16 dot, fp16 head": be(16, "dot", "fp16"),
        "bitengine A16 dot, int8 head": be(16, "dot", "int8"),
        "llama.cpp q4_0": ("llamacpp", dict(stem="q4_0")),
        "llama.cpp f16": ("llamacpp", dict(stem="f16")),
        "transformers fp32": ("transformers", {}),
        "bitengine reference backend A8, fp16 head": ("reference", dict(act_bits=8, head="fp16")),
    }


def run_one(name, args):
    kind, opt = engines()[name]
    if kind in ("bitengine", "reference"):
        return run_bitengine(Path(args.work), opt["act_bits"], opt["head"], "cpu" if kind == "bitengine" else "reference",
                             args.prompt, args.gen if kind == "bitengine" else args.ref_gen,
                             args.reps if kind == "bitengine" else 1, decode=opt.get("decode", "eager"))
    if kind == "transformers":
        return run_transformers(Path(args.work), args.prompt, args.gen, args.reps)
    return run_llamacpp(Path(args.work), opt["stem"], args.threads, args.prompt, args.gen, args.reps)


# ---- driver ---------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/bench_cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--ref-gen", type=int, default=4, help="decoded tokens for the (slow) reference backend")
    ap.add_argument("--only", default="", help="comma-separated substrings of engine names")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole engine list (interleaved runs)")
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)  # child process: one engine
    ap.add_argument("--out", default=None, help="write <out>.json")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.run:
        import torch

        torch.set_num_threads(args.threads)
        kind, opt = engines()[args.run]
        if kind == "bitengine":
            from bitengine.backends import cpu

            cpu.set_kernel(opt["kernel"])
            cpu.set_num_threads(args.threads)
        print("RESULT " + json.dumps(run_one(args.run, args)), flush=True)
        return
    work = Path(args.work)
    t0 = time.time()
    make_hf(work / "hf")
    make_bitengine(work)
    make_gguf_f16(work / "hf", work / "f16.gguf")
    make_gguf_variants(work, args.threads)
    print(f"model files ready in {time.time() - t0:.0f} s", flush=True)
    names = [n for n in engines() if not args.only or any(s in n for s in args.only.split(","))]
    raw = {n: [] for n in names}
    compile_s: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name in names:
            cmd = [sys.executable, __file__, "--run", name, "--work", args.work, "--threads", str(args.threads),
                   "--reps", str(args.reps), "--prompt", str(args.prompt), "--gen", str(args.gen),
                   "--ref-gen", str(args.ref_gen)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            if engines()[name][1].get("decode") == "compiled":  # a cold inductor cache: the compile time a first run pays
                env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_cpu_inductor_")
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not line:
                print(f"{name}: FAILED\n{p.stderr[-2000:]}", flush=True)
                continue
            got = json.loads(line[0][7:])
            if isinstance(got, dict):  # compiled rows also report their one-time compilation
                compile_s.setdefault(name, []).append(got["compile_s"])
                got = got["runs"]
            raw[name] += got
            print(name, raw[name], flush=True)
            _report(raw, work, args, compile_s)  # after every engine, so a cut-short run keeps what it measured


def _report(raw, work, args, compile_s=None):
    rows = []
    for name, runs in raw.items():
        if runs:
            rows.append({"engine": name, "prompt_tps": statistics.median(r[0] for r in runs),
                         "decode_tps": statistics.median(r[1] for r in runs), "runs": runs,
                         "file_MB": _size_mb(work, name)})
            if compile_s and name in compile_s:
                rows[-1]["compile_s"] = statistics.median(compile_s[name])
    result = {"meta": _meta(args), "rows": rows}
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=1))
        Path(args.out + ".md").write_text(markdown(result))


def markdown(result) -> str:
    m = result["meta"]
    lines = [f"CPU: {m.get('cpu')} ({', '.join(m.get('simd_flags', []))}), {m['threads']} threads, "
             f"{m['date']}; torch {m['torch']}, transformers {m.get('transformers')}, llama-cpp-python "
             f"{m.get('llama_cpp')}; git {m.get('git_commit', '')[:10]}; bitengine cpu: {m.get('bitengine_cpu')}.",
             f"{m['prompt_tokens']}-token prompt then {m['gen_tokens']} decoded tokens, median of "
             f"{m['reps']} x {m['rounds']} runs (reference backend: {m['ref_gen_tokens']} decoded tokens, 1 run).", "",
             "| engine / format | file MB | prompt tokens/s | decode tokens/s |", "| --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['engine']} | {r['file_MB'] or '-'} | {r['prompt_tps']:.1f} | {r['decode_tps']:.2f} |")
    lines += ["", "bitengine rows: decode steps run the C++ decoder layers (cpu_decode.py, what generate() runs on "
              "the CPU) unless marked \"PyTorch layers\" (the model's own forward, eager) or \"compiled\"; the prompt "
              "always runs the model's PyTorch forward."]
    compiled = [r for r in result["rows"] if "compile_s" in r]
    if compiled:
        lines += ["", "compiled: decode steps run through one torch.compile graph of the whole model "
                  "(generate(compile=True) on the CPU; the prompt runs eagerly). First run with a cold inductor cache, "
                  "compilation included (not in the medians): "
                  + ", ".join(f"{r['engine']} {r['compile_s']:.0f} s" for r in compiled) + "."]
    return "\n".join(lines) + "\n"


def _size_mb(work, name):
    kind, opt = engines()[name]
    if kind == "llamacpp":
        return round((work / f"{opt['stem']}.gguf").stat().st_size / 1e6)
    return None


def _meta(args):
    import platform

    import torch

    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads, "reps": args.reps,
            "rounds": args.rounds, "prompt_tokens": args.prompt, "gen_tokens": args.gen, "ref_gen_tokens": args.ref_gen,
            "python": platform.python_version(), "torch": torch.__version__}
    try:
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
        flags = next(ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags"))
        info["simd_flags"] = [f for f in flags if f.startswith(("avx", "fma", "f16c", "sse4", "ssse3"))]
    except (OSError, StopIteration):
        pass
    for mod in ("transformers", "llama_cpp"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    try:
        from bitengine.backends import cpu

        info["bitengine_cpu"] = cpu.describe()
    except ImportError:
        pass
    return info


if __name__ == "__main__":
    main()
