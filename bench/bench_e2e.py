"""End-to-end decode and prefill on one GPU: random-weight models at real shapes, bitengine ternary vs FP16.

Models (random weights, built on the meta device and filled on the GPU): BitNet-2B-4T, Llama-2-7B,
Llama-3-8B shapes through bitengine.model.CausalLM. Variants: ternary W1.58A8 (backend "cuda" when
its extension is built, else "triton"), ternary W1.58A16 ("triton"), and FP16 dense weights through
the same model code. Decode: one step (embedding -> logits -> greedy argmax -> next token and
position, all on the GPU) captured in a CUDA graph over a static KV cache of prompt + new tokens,
replayed once per token; the first tokens are checked against eager decoding. Prefill: one forward of T
tokens into the cache, replayed from its CUDA graph as generate() runs it (bitengine.prefill_graph; captured in
the untimed warm-up calls; '+eagerprefill' runs it eagerly, as before 2026-12-03's thirteenth part). Reports
ms/token, tokens/s, time to first token (prefill of the 64-token prompt + one step), peak GPU memory and weight bytes.

Variant "hf-fp16" is the outside baseline, measured in the same run: a random-weight transformers
LlamaForCausalLM at the same sizes in fp16 (the BitNet-2B-4T shape as a Llama config: same sizes and
relu2 MLP, no sub-norms), timed through `model.generate(do_sample=False)` as a user would call it
(eager, no CUDA graph). Decode ms/step = (time of NEW new tokens - time of 2) / (NEW - 2); TTFT = the
2-token call, as the bitengine rows (prefill + one step); prefill = one forward of T tokens with a cache.
Drop it with --variants when the run is short on time. Plot a result with bench/plot_e2e.py.

    python bench/bench_e2e.py --out bench/results [--models bitnet-2b-4t,llama-2-7b] [--batches 1,8,32]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bitengine import backends  # noqa: E402
from bitengine.backends import cuda as cuda_backend  # noqa: E402
from bitengine.config import ModelConfig  # noqa: E402
from bitengine.fuse import fuse_projections, fused_layers  # noqa: E402
from bitengine.generate import greedy  # noqa: E402
from bitengine.int4_head import quantize_head_int4  # noqa: E402
from bitengine.int8_head import quantize_head_int8  # noqa: E402
from bitengine.kernels import decode_attention, gemm_decoded  # noqa: E402
from bitengine.loader import checkpoint_layout_to_host  # noqa: E402
from bitengine.model import CausalLM, rope_inv_freq  # noqa: E402
from bitengine.nn import BitLinear, DenseLinear  # noqa: E402
from bitengine.prefill_graph import GraphPrefill  # noqa: E402
from bitengine.quant import pack_ternary  # noqa: E402

MODELS = {
    "bitnet-2b-4t": ModelConfig(arch="bitnet", vocab_size=128256, hidden_size=2560, intermediate_size=6912, num_layers=30,
                                num_heads=20, num_kv_heads=5, head_dim=128, rope_theta=500000.0,
                                tie_word_embeddings=True, hidden_act="relu2"),
    "llama-2-7b": ModelConfig(arch="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                              num_heads=32, num_kv_heads=32, head_dim=128),
    "llama-3-8b": ModelConfig(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                              num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0),
}
PROMPT, NEW = 64, 128
DEVICE = "cuda"  # tests/test_bench_e2e_cpu.py sets "cpu"
TORCH_ARGMAX = False  # '+torchargmax': the step's argmax by torch.argmax instead of the engine's (generate.greedy)
MAX_MMA_M = cuda_backend.MAX_MMA_M  # the backend's own setting ('+mmaN' changes it for one variant)
GEMV_VERSION = cuda_backend.GEMV_VERSION  # likewise ('+gemv2')


def next_token(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B, 1) greedy tokens, as generate() picks them (or by torch.argmax for the A/B)."""
    return (logits.argmax(-1) if TORCH_ARGMAX else greedy(logits))[:, None]


def build(cfg: ModelConfig, variant: str, max_seq: int, seed: int = 0) -> CausalLM:
    """Random-weight model; variant 'a8' / 'a16' (ternary) or 'fp16' (dense), with optional '+' modifiers:
    'unfused' (q/k/v and gate/up as separate matmuls), 'int8head' (per-row int8 head, bitengine.int8_head),
    'int4head' (group-wise int4 head, bitengine.int4_head),
    'compile', 'nopdl', 'sdpa', 'sepnorm' (norms and residual adds as separate kernels, not in the C++ GEMV),
    'split' (the split decode attention kernel instead of the grouped one), 'nocombo' (no inductor combo
    kernels in the compiled layers), 'torchargmax' (torch.argmax picks the token) and 'nogated' (the MLP's gating as
    its own kernel, not in the gate/up GEMV's epilogue), 'noattnpdl' (the decode attention kernels launched without
    programmatic dependent launch), 'mmaN' (the C++ tensor-core kernel for up to N tokens per call, Triton's kernels
    beyond: cuda_backend.MAX_MMA_M), 'gemv2' (the one-token C++ GEMV's version 2, the default before the lane-group
    kernel, version 3, took rows of K <= 2560), 'nooverlap' (the prefill linear's weight decode and token
    quantization one after the other, not on two streams); handled by set_variant_flags;
    'noglue' (with 'compile': the step's embedding / rotary / mask / final-norm glue left eager,
    CausalLM.compile_layers(glue=False); handled by bench_model); 'eagerprefill' (the prompt's forward eager in the
    prefill rows and the time to first token, not replayed from its CUDA graph, bitengine.prefill_graph, as generate()
    runs it; handled by bench_model).
    Ternary models are placed as bitengine.load places them: the kernel layout on the GPU, the checkpoint layout
    (k4) on the host, projections fused."""
    base, *mods = variant.split("+")

    def make_linear(i, o, bias):
        if base == "fp16":
            return DenseLinear(i, o, bias=bias)
        return BitLinear(i, o, act_bits=8 if base == "a8" else 16, scale_shape=(1,), bias=bias)

    with torch.device("meta"):
        model = CausalLM(cfg, make_linear, max_seq=max_seq)
    model.to_empty(device=DEVICE)
    model.model.embed_tokens.to(torch.float16)  # nn.Embedding is made in float32; activations run in fp16
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("weight_packed"):
                n, cols = t.shape
                codes = torch.randint(0, 3, (n, cols * 4), device=DEVICE, dtype=torch.int8, generator=g) - 1
                t.copy_(pack_ternary(codes))
            elif name.endswith("weight_scale"):
                t.fill_(model.get_submodule(name.rsplit(".", 1)[0]).in_features ** -0.5)
            elif name.endswith("norm.weight"):
                t.fill_(1.0)
            elif t.is_floating_point() and t.dim() == 2:
                t.copy_(torch.randn(t.shape, device=DEVICE, generator=g) / t.shape[1] ** 0.5)
    model.tie_weights()
    model.inv_freq = rope_inv_freq(cfg).to(DEVICE)
    model.eval()
    if base != "fp16":
        name = "reference" if DEVICE == "cpu" else ("cuda" if base == "a8" and _cuda_built() else "triton")
        backend = backends.select(DEVICE, name)
        for m in model.modules():
            if isinstance(m, BitLinear):
                m.prepare(backend)
        model.backend_name = backend.name
        if DEVICE != "cpu":
            checkpoint_layout_to_host(model)
        if "unfused" not in mods:
            fuse_projections(model)
    else:
        model.backend_name = "dense"
    if "int8head" in mods:
        quantize_head_int8(model)
    if "int4head" in mods:
        quantize_head_int4(model)
    return model


def _cuda_built() -> bool:
    return backends.availability("cuda").get("cuda") is None


def _tensors_on_device(model) -> list[torch.Tensor]:
    mods = list(model.modules()) + fused_layers(model)  # fused layers live outside the module tree
    ts = [t for m in mods for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))]
    return [t for t in ts if t is not None and t.device.type == DEVICE]


def resident_bytes(model) -> int:
    """Every parameter and buffer held on the GPU, each storage once (the host copy of k4 is not counted)."""
    seen, total = set(), 0
    for t in _tensors_on_device(model):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return total


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: kernel layouts and scales of the ternary layers, 16-bit or
    int8 dense layers, the embedding rows (counted whole when not tied to the head, as they are held)."""
    total = 0
    for m in list(model.modules()) + fused_layers(model):
        if isinstance(m, BitLinear):
            w = getattr(m, "weight_i2w", None)
            if w is None and m.weight_packed is not None and m.weight_packed.device.type == DEVICE:
                w = m.weight_packed  # reference path
            if w is not None:  # fused members hold no kernel layout: their fused layer is counted
                total += w.nbytes + m.weight_scale.nbytes
        elif isinstance(m, DenseLinear):
            total += m.weight.nbytes
        elif hasattr(m, "weight_int8"):
            total += m.weight_int8.nbytes + m.weight_scale.nbytes
    emb = model.model.embed_tokens.weight
    if getattr(model.lm_head, "weight", None) is not emb:
        total += emb.nbytes
    return total


class GraphDecoder:
    """Greedy decode step over a static cache, captured in a CUDA graph (no host sync inside)."""

    def __init__(self, model, batch: int, max_seq: int):
        self.model, self.batch = model, batch
        self.cache = model.new_cache(batch=batch, max_seq=max_seq)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=DEVICE)
        self.pos = torch.zeros(1, dtype=torch.long, device=DEVICE)
        self.graph = None
        self.prefiller = None  # a GraphPrefill over self.cache (bench_model sets it unless '+eagerprefill')

    def prefill(self, prompt):  # (B, T) -> first new token in self.tok, position after the prompt
        b, t = prompt.shape
        pos = torch.arange(t, device=DEVICE)
        if self.prefiller is not None:
            logits = self.prefiller(prompt, pos.expand(b, t))
        else:
            logits = self.model(prompt, cache=self.cache, input_pos=pos, last_only=True)[:, -1]
        self.tok.copy_(next_token(logits))
        self.pos.fill_(t)

    def step(self):
        logits = self.model(self.tok, cache=self.cache, input_pos=self.pos, position_ids=self.pos.expand(self.batch, 1))
        self.tok.copy_(next_token(logits[:, -1]))
        self.pos.add_(1)

    def capture(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step()  # compile / warm every kernel outside the capture
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()


def set_variant_flags(variant: str) -> None:
    """The engine's module-level switches a variant's modifiers set (read when the model is built, traced or
    captured); bench_model and profile_gpu_decode.py call this before building."""
    global TORCH_ARGMAX
    cuda_backend.PDL = "+nopdl" not in variant  # programmatic dependent launch (C++ GEMV and compiled layers)
    decode_attention.ENABLED = "+sdpa" not in variant  # one-token attention: Triton kernel, or cuDNN through SDPA
    decode_attention.VARIANT = "split" if "+split" in variant else "grouped"  # decode attention kernel (default grouped)
    cuda_backend.FUSE_NORM_RESIDUAL = "+sepnorm" not in variant  # norms / residual adds in the C++ GEMV or apart
    cuda_backend.COMBO_KERNELS = "+nocombo" not in variant  # inductor combo kernels in the compiled layers
    cuda_backend.FUSE_GATED = "+nogated" not in variant  # the MLP's gating in the gate/up GEMV's epilogue or apart
    # programmatic dependent launch of the decode attention kernels (off with +nopdl too)
    decode_attention.PDL = "+nopdl" not in variant and "+noattnpdl" not in variant
    # the prefill linear's weight decode on a side stream beside the tokens' quantization, or one after the other
    gemm_decoded.OVERLAP = "+nooverlap" not in variant
    TORCH_ARGMAX = "+torchargmax" in variant  # the step's argmax: torch's (one SM per row) or generate.greedy's
    # most tokens per call on the C++ tensor-core kernel (more go to Triton); '+mmaN': N (16 before 3e90439)
    mma = [int(mod[3:]) for mod in variant.split("+")[1:] if mod[:3] == "mma" and mod[3:].isdigit()]
    cuda_backend.MAX_MMA_M = mma[0] if mma else MAX_MMA_M
    # the one-token C++ GEMV's version: '+gemv2' the one before the lane-group kernel (version 3), else the default
    cuda_backend.GEMV_VERSION = 2 if "+gemv2" in variant else GEMV_VERSION


@torch.no_grad()
def bench_model(name, variant, batches, prefills, rows, budget_end):
    cfg = MODELS[name]
    _free_previous_models()
    compiled = "+compile" in variant
    graph_prefill = "+eagerprefill" not in variant
    set_variant_flags(variant)
    model = build(cfg, variant, max_seq=PROMPT + NEW)
    if compiled:  # torch.compile each decoder layer (one shared graph) before the CUDA graph is captured
        model.compile_layers(glue="+noglue" not in variant)
    _free_previous_models()  # again: the peak columns start from the built model, not the random init's transients
    wbytes = weight_bytes(model)
    base = {"model": name, "variant": variant, "backend": model.backend_name, "weight_GiB": wbytes / 2**30,
            "resident_GiB": resident_bytes(model) / 2**30}
    g = torch.Generator(device=DEVICE).manual_seed(1)
    for b in batches:
        if time.time() > budget_end:
            break
        prompt = torch.randint(0, cfg.vocab_size, (b, PROMPT), device=DEVICE, generator=g)
        dec = GraphDecoder(model, b, PROMPT + NEW)
        if graph_prefill:
            dec.prefiller = GraphPrefill(model, dec.cache)
        # eager reference tokens for the first steps
        dec.prefill(prompt)
        eager = []
        for _ in range(8):
            dec.step()
            eager.append(dec.tok.clone())
        dec.capture()  # advances one step; reset state below
        torch.cuda.synchronize()
        # time to first token: the prompt's forward, then the first graph step (each repetition starts over)
        # (GPU ms, host ms until the calls return): host close to GPU says the GPU waited for the host's launches
        ttft_both = [_cuda_and_host_timed(functools.partial(_first_token, dec, prompt)) for _ in range(PREFILL_REPS // 2)]
        ttfts = [gpu for gpu, _ in ttft_both]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph_tokens = [dec.tok.clone()]
        for i in range(NEW - 2):
            dec.graph.replay()
            if i < 7:
                graph_tokens.append(dec.tok.clone())
        end.record()
        end.synchronize()
        same = all(torch.equal(a, c) for a, c in zip(eager[:8], graph_tokens[:8]))
        ms = start.elapsed_time(end) / (NEW - 2)
        rows.append({**base, "batch": b, "decode_ms_per_step": ms, "decode_tokens_per_s": 1000 * b / ms,
                     "ttft_ms": statistics.median(ttfts), "ttft_ms_min": min(ttfts), "ttft_ms_max": max(ttfts),
                     "ttft_host_ms": statistics.median(host for _, host in ttft_both),
                     "graph_matches_eager": same,
                     "peak_GiB": torch.cuda.max_memory_allocated() / 2**30})
        print(json.dumps(rows[-1]), flush=True)
        del dec
    for t in prefills:
        if time.time() > budget_end:
            break
        cache = model.new_cache(batch=1, max_seq=t)
        prompt = torch.randint(0, cfg.vocab_size, (1, t), device=DEVICE, generator=g)
        pos = torch.arange(t, device=DEVICE)
        if graph_prefill:  # the first (warm-up) call captures the graph; the timed ones replay it
            forward = functools.partial(GraphPrefill(model, cache), prompt, pos.expand(1, t))
        else:
            forward = functools.partial(model, prompt, cache=cache, input_pos=pos, last_only=True)
        rows.append({**base, **_prefill_row(t, *_prefill_times(forward, _cuda_timed)),
                     "peak_GiB": torch.cuda.max_memory_allocated() / 2**30})
        print(json.dumps(rows[-1]), flush=True)
        del cache, forward  # the partial holds the model: it must go before the cleanup below
    del model
    torch._dynamo.reset()  # compiled layers hold the model (and count against the recompile limit) otherwise
    gc.collect()
    torch.cuda.empty_cache()


def _free_previous_models() -> None:
    """Collect what the previous row left before its peak memory is measured: a compiled CausalLM sits in a reference
    cycle (its compiled layers and glue hold their bound methods), so only the cyclic collector frees it; in the 935c090 run the
    previous variant's weights stayed allocated into the next variant's rows (+1.1 to +12.6 GiB of peak). Called again
    once the model is built: until 8ed9970 the peak also held build()'s transients (float32 random tensors of the
    embedding and head, the int8 head's conversion): every BitNet-2B-4T ternary row read the same 4.94 GiB, batch 1
    included, whatever its weights."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def hf_llama_config(cfg: ModelConfig):
    """A transformers LlamaConfig with cfg's sizes (a BitNet shape loses its sub-norms: say so in the output)."""
    from transformers import LlamaConfig
    from transformers.activations import ACT2FN

    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                       max_position_embeddings=8192, tie_word_embeddings=cfg.tie_word_embeddings,
                       hidden_act=cfg.hidden_act if cfg.hidden_act in ACT2FN else "silu",
                       bos_token_id=None, eos_token_id=None, pad_token_id=0)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None


PREFILL_WARMUP, PREFILL_REPS = 2, 10  # single eager forwards vary: 3 repetitions left a 1.7x spread (GPU log, 11th part)


def _first_token(dec, prompt) -> None:
    dec.prefill(prompt)
    dec.graph.replay()


def _prefill_times(fn, timer) -> tuple[list[float], list[float], int]:
    """(ms of PREFILL_REPS calls of fn timed by timer, host ms of the same calls (until fn returns, before any sync),
    frames torch.compile compiled during them) after PREFILL_WARMUP untimed calls (autotuning, compiles, allocator).
    The last two say what a slow or spread-out prefill is: host time close to the timed one means the GPU waited for
    launches; a compile inside the timed calls is a bench problem, not a kernel's."""
    for _ in range(PREFILL_WARMUP):
        fn()
    host = []
    frames = _compiled_frames()
    times = [timer(_host_timed(fn, host)) for _ in range(PREFILL_REPS)]
    return times, host, _compiled_frames() - frames


def _host_timed(fn, host: list[float]):
    """fn, appending to host the ms until it returns (before any sync: with CUDA, the time to issue its work)."""
    def run():
        t0 = time.perf_counter()
        fn()
        host.append(1000 * (time.perf_counter() - t0))

    return run


def _compiled_frames() -> int:
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def _prefill_row(t: int, times: list[float], host: list[float] | None = None, compiles: int = 0) -> dict:
    """The median and the spread, so a table shows how far one forward is from the next."""
    ms = statistics.median(times)
    return {"prefill_tokens": t, "prefill_ms": ms, "prefill_ms_min": min(times), "prefill_ms_max": max(times),
            "prefill_reps": len(times), "prefill_tokens_per_s": 1000 * t / ms,
            "prefill_host_ms": statistics.median(host) if host else None, "prefill_compiles_timed": compiles}


def _cuda_timed(fn) -> float:
    """GPU ms of fn() between two CUDA events (the eager forward's host launches included where the GPU waits)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _cuda_and_host_timed(fn) -> tuple[float, float]:
    """(_cuda_timed's GPU ms of fn(), host ms until fn() returned, before the sync)."""
    host = []
    return _cuda_timed(_host_timed(fn, host)), host[0]


def _timed(fn) -> float:
    """Wall-clock ms of fn() (host time: generate() syncs on its own every step)."""
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return 1000 * (time.perf_counter() - t0)


@torch.no_grad()
def bench_hf(name, batches, prefills, rows, budget_end, new_tokens=None):
    """transformers FP16 LlamaForCausalLM, random weights, `generate` (greedy) and one prefill forward."""
    import transformers

    cfg = MODELS[name]
    if DEVICE == "cuda":
        _free_previous_models()
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32  # CPU: smoke tests only
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = transformers.AutoModelForCausalLM.from_config(hf_llama_config(cfg), dtype=dtype).eval()
    if DEVICE == "cuda":
        _free_previous_models()  # the peak from the built model on, as bench_model
    try:
        _bench_hf_model(model, name, batches, prefills, rows, budget_end, new_tokens or NEW)
    finally:  # free the fp16 model before the next row, also after an error
        del model
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def _hf_generate(model, prompt, n):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)


def _bench_hf_model(model, name, batches, prefills, rows, budget_end, new):
    import transformers

    cfg = MODELS[name]
    seen, wbytes = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            wbytes += p.nbytes
    note = ("BitNet-2B-4T sizes as a LlamaConfig (relu2 MLP, no sub-norms)" if cfg.arch == "bitnet"
            else "same config")
    base = {"model": name, "variant": "hf-fp16", "engine": "transformers",
            "backend": f"transformers {transformers.__version__} generate ({model.config._attn_implementation})",
            "weight_GiB": wbytes / 2**30, "resident_GiB": wbytes / 2**30, "note": note}
    g = torch.Generator(device=DEVICE).manual_seed(1)
    for b in batches:
        if time.time() > budget_end:
            break
        prompt = torch.randint(0, cfg.vocab_size, (b, PROMPT), device=DEVICE, generator=g)
        _hf_generate(model, prompt, 4)  # warm-up: kernels, allocator
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ttft = statistics.median(_timed(functools.partial(_hf_generate, model, prompt, 2)) for _ in range(3))
        total = _timed(functools.partial(_hf_generate, model, prompt, new))
        ms = (total - ttft) / (new - 2)
        rows.append({**base, "batch": b, "decode_ms_per_step": ms, "decode_tokens_per_s": 1000 * b / ms,
                     "ttft_ms": ttft, "graph_matches_eager": None, "peak_GiB": _peak_gib()})
        print(json.dumps(rows[-1]), flush=True)
    for t in prefills:
        if time.time() > budget_end:
            break
        prompt = torch.randint(0, cfg.vocab_size, (1, t), device=DEVICE, generator=g)
        forward = functools.partial(model, prompt, use_cache=True, logits_to_keep=1)
        rows.append({**base, **_prefill_row(t, *_prefill_times(forward, _timed)), "peak_GiB": _peak_gib()})
        print(json.dumps(rows[-1]), flush=True)


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown(env, rows):
    lines = [f"# End-to-end decode / prefill on {env['card']} ({env['date']})", "",
             (f"torch {env['torch']}, CUDA {env['cuda']}, commit `{env['git_commit'][:12]}`. Random weights; decode = "
              f"{PROMPT}-token prompt then CUDA-graph greedy steps over a static cache; prefill = one forward replayed "
              "from its CUDA graph (eager in '+eagerprefill' rows)."),
             "", ("| model | weights | backend | weight GiB (read / held) | batch | ms/step | tokens/s | TTFT ms | "
                  "graph == eager | peak GiB |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "batch" in r:
            lines.append(f"| {r['model']} | {r['variant']} | {r['backend']} | {r['weight_GiB']:.2f} / "
                         f"{r['resident_GiB']:.2f} | {r['batch']} | "
                         f"{r['decode_ms_per_step']:.3f} | {r['decode_tokens_per_s']:.0f} | {r['ttft_ms']:.1f} | "
                         f"{'-' if r['graph_matches_eager'] is None else r['graph_matches_eager']} | "
                         f"{'-' if r['peak_GiB'] is None else format(r['peak_GiB'], '.2f')} |")
    lines += ["", ("| model | weights | backend | prompt tokens | prefill ms (median) | min - max ms (reps) | host ms | "
                   "compiles while timed | tokens/s |"),
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "prefill_tokens" in r:
            spread = (f"{r['prefill_ms_min']:.1f} - {r['prefill_ms_max']:.1f} ({r['prefill_reps']})"
                      if "prefill_reps" in r else "-")
            lines.append(f"| {r['model']} | {r['variant']} | {r['backend']} | {r['prefill_tokens']} | {r['prefill_ms']:.1f} | "
                         f"{spread} | {_ms(r.get('prefill_host_ms'))} | {r.get('prefill_compiles_timed', '-')} | "
                         f"{r['prefill_tokens_per_s']:.0f} |")
    notes = sorted({f"{r['model']}: {r['note']}" for r in rows if r.get("note")})
    if notes:
        lines += ["", "hf-fp16 = transformers LlamaForCausalLM, fp16, random weights, `generate(do_sample=False)` "
                  "(eager, no CUDA graph; TTFT = 2 new tokens, decode = the rest). " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--models", default="bitnet-2b-4t,llama-2-7b,llama-3-8b")
    ap.add_argument("--plan", default="", help="per-model variants, overriding --models/--variants: "
                    "'llama-2-7b=a8+compile,fp16+compile;bitnet-2b-4t=a8+compile'")
    ap.add_argument("--variants", default="a8,fp16,a16,hf-fp16",
                    help="a8, a16, fp16 (bitengine; '+unfused', '+int8head', '+int4head', '+compile' modifiers) and hf-fp16 "
                         "(transformers generate baseline)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prefills", default="512,2048")
    ap.add_argument("--budget-s", type=float, default=240, help="stop starting new measurements after this long")
    args = ap.parse_args()
    plan = [(m, args.variants.split(",")) for m in args.models.split(",")]
    if args.plan:
        items = [item.partition("=") for item in args.plan.split(";")]
        bad = [m for m, eq, v in items if not eq or m not in MODELS or not v]
        if bad:
            ap.error(f"--plan: expected 'model=variant,...;...' with models from {', '.join(MODELS)}; bad: {bad[0]!r}")
        plan = [(m, v.split(",")) for m, _, v in items]
    props = torch.cuda.get_device_properties(0)
    env = {"card": props.name, "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "cuda": torch.version.cuda, "git_commit": os.environ.get("BITENGINE_COMMIT", "")}
    rows = []
    end = time.time() + args.budget_s
    tag = f"{env['card'].replace(' ', '_')}_{env['date'][:10]}"
    for name, variants in plan:
        for variant in variants:
            if time.time() > end:
                break
            try:
                run = bench_hf if variant == "hf-fp16" else functools.partial(bench_model, variant=variant)
                run(name, batches=[int(b) for b in args.batches.split(",") if b],
                    prefills=[int(t) for t in args.prefills.split(",") if t], rows=rows, budget_end=end)
            except Exception as e:  # noqa: BLE001 - record and continue with the next model
                rows.append({"model": name, "variant": variant, "error": f"{type(e).__name__}: {e}"[:400]})
                print(rows[-1], flush=True)
                gc.collect()
                torch.cuda.empty_cache()
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"gpu_e2e_{tag}.json"), "w") as f:
                json.dump({"env": env, "rows": rows}, f, indent=1)
            with open(os.path.join(args.out, f"gpu_e2e_{tag}.md"), "w") as f:
                f.write(markdown(env, rows))
    print(markdown(env, rows))


if __name__ == "__main__":
    main()
