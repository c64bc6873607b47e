"""Text generation: prefill, decode step, sampling, stop conditions, streaming.

`generate(model, ...)` takes a prompt, token ids, chat messages or a batch of prompts. Batches are
left-padded; the KV cache's `valid` mask hides the padding and each row gets its own rotary
positions. Sampling runs on the device (temperature, top-k, top-p, repetition penalty) with a
seeded generator. The decode step is a separate callable (`Decoder`) so a CUDA-graph version
can replace the eager one without touching the loop.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary, (B, V) -> (B,). On CUDA the split-row Triton kernel (kernels/argmax.py: torch's
    argmax reduces a row on one SM, 34 us for a 128k vocabulary on an H200); same indices, ties to the first."""
    if logits.is_cuda and logits.dim() == 2 and logits.stride(-1) == 1:
        try:
            from .kernels.argmax import argmax_rows
        except ImportError:  # no triton: torch's argmax gives the same index
            return logits.argmax(dim=-1)
        return argmax_rows(logits)
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V). temperature 0 means greedy (argmax)."""
    if temperature <= 0:
        return greedy(logits)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule: for tokens already present, divide positive logits by penalty, multiply negative ones.

    seen: bool (B, V) of tokens in the prompt or generated so far."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


class Decoder:
    """Eager one-token decode step: (tokens (B,1), slot int) -> logits (B, V) float32.

    full_cache: attend over every cache slot (masked past the position) like the CUDA-graph step
    does, so eager and graph decoding run the same kernels on the same shapes and give identical
    tokens; otherwise only over the slots written so far (faster eagerly; the default on CPU).
    compile: run the step through `compiled_forward(model)` (the whole model as one torch.compile
    graph: one guard check and fused glue per step instead of ~30 eager ops per layer)."""

    def __init__(self, model, cache, position_offset: torch.Tensor, full_cache: bool = False,
                 compile: bool = False):
        self.model, self.cache, self.offset = model, cache, position_offset  # offset (B,): left padding
        self.full_cache = full_cache
        self.forward = compiled_forward(model) if compile else model

    def __call__(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        pos = torch.tensor([slot], device=tokens.device)
        positions = (pos[None] - self.offset[:, None])  # (B, 1)
        logits = self.forward(tokens, cache=self.cache, input_pos=pos, position_ids=positions,
                              kv_len=None if self.full_cache else slot + 1)
        return logits[:, -1].float()


def compiled_forward(model):
    """The model's forward as one torch.compile graph with dynamic shapes (batch, cache length and
    kv_len symbolic, so one compilation serves every step and prompt), made once per model.

    The first call compiles (one to two minutes on 2 cores; inductor's on-disk cache makes later
    processes faster); guards are kept (no unsafe skipping), so changing adapters or modules
    recompiles instead of running a stale graph. Kept outside the module tree (state_dict and
    named_modules unchanged)."""
    fn = model.__dict__.get("_compiled_forward")
    if fn is None:
        fn = torch.compile(model, dynamic=True)
        model.__dict__["_compiled_forward"] = fn
    return fn


def _encode(model, prompt, input_ids, messages, prompts):
    tok = model.tokenizer
    given = sum(x is not None for x in (prompt, input_ids, messages, prompts))
    if given != 1:
        raise ValueError("generate() takes exactly one of: prompt, input_ids, messages, prompts")
    if input_ids is not None:
        if isinstance(input_ids, torch.Tensor):
            batch = input_ids.dim() == 2 and input_ids.shape[0] > 1
            rows = input_ids.tolist() if input_ids.dim() == 2 else [input_ids.tolist()]
        else:
            batch = bool(input_ids) and not isinstance(input_ids[0], int)
            rows = [list(r) for r in input_ids] if batch else [list(input_ids)]
        return rows, batch
    if tok is None:
        raise ValueError("this checkpoint has no tokenizer files; pass input_ids instead of text")
    if messages is not None:
        batch = isinstance(messages[0], (list, tuple))
        convs = messages if batch else [messages]
        texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in convs]
        return [tok(t, add_special_tokens=False)["input_ids"] for t in texts], batch
    if prompts is not None:
        return [tok(p)["input_ids"] for p in prompts], True
    if isinstance(prompt, (list, tuple)):
        return [tok(p)["input_ids"] for p in prompt], True
    return [tok(prompt)["input_ids"]], False


def eos_ids(model) -> set[int]:
    ids = set()
    tok = getattr(model, "tokenizer", None)
    if tok is not None and tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    gen = getattr(model, "generation_eos", None)
    if gen is None:
        path = getattr(model, "checkpoint_path", None)
        gen = []
        if path is not None and (path / "generation_config.json").exists():
            import json

            e = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
            gen = e if isinstance(e, list) else ([e] if e is not None else [])
        model.generation_eos = gen
    ids.update(int(e) for e in gen)
    return ids


def generate(model, prompt=None, *, input_ids=None, messages=None, prompts=None, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             stop: list[str] | str | None = None, seed: int | None = None, stream: bool = False,
             ignore_eos: bool = False, cuda_graph: bool | None = None, compile: bool = False):
    """Generate continuations.

    Exactly one input: `prompt` (str, or a list of str for a batch), `input_ids` (list of ints,
    list of lists, or a LongTensor (B, T)), `messages` (chat messages, formatted with the
    tokenizer's chat template; or a list of conversations), or `prompts` (a list of str).
    Returns the generated text (str, or list[str] for a batch); with `input_ids`, the generated
    token ids (list[int], or list of lists). With stream=True (single sequence only) returns an
    iterator of text pieces (or token ids when given `input_ids`) as they are decoded.
    temperature 0 is greedy; `stop` strings end a sequence (not included in the output).
    On CUDA the prompt's forward and the decode step run as captured CUDA graphs (cuda_graph=False for eager),
    kept with their KV cache for the next call of the same batch size and length (graph_session.py; release them
    with `release_graphs(model)` from bitengine.graph_session); compile=True also torch.compiles the decoder layers
    first (a one-time cost, then faster steps). On the CPU
    each decode step runs the decoder layers in C++ (cpu_decode.py) when the model qualifies;
    compile=True instead runs it through one compiled graph of the whole model (`compiled_forward`);
    bench/results/cpu_e2e.md has both measured.
    """
    rows, batched = _encode(model, prompt, input_ids, messages, prompts)
    text_mode = input_ids is None
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if stream and len(rows) != 1:
        raise ValueError("stream=True supports a single sequence")
    if any(len(r) == 0 for r in rows):
        raise ValueError("empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sync_every = 1 if (stream or stops) else 16
    gen = _generate_rows(model, rows, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stops,
                         seed, text_mode, ignore_eos, sync_every, cuda_graph, compile)
    if stream:
        return _stream(gen, model, text_mode, stops)
    outs = None
    for outs in gen:  # noqa: B007 - run to completion; the last yield holds every row's ids
        pass
    results = [(_text(model, o, stops) if text_mode else o) for o in outs]
    return results if batched else results[0]


def _text(model, ids: list[int], stops: list[str]) -> str:
    text = model.tokenizer.decode(ids, skip_special_tokens=True)
    return _cut(text, stops)[0]


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _stream(gen, model, text_mode: bool, stops: list[str]) -> Iterator:
    emitted_text, emitted_ids = "", 0
    for outs in gen:
        ids = outs[0]
        if not text_mode:
            yield from ids[emitted_ids:]
            emitted_ids = len(ids)
            continue
        text, _ = _cut(model.tokenizer.decode(ids, skip_special_tokens=True), stops)
        if text.endswith("\ufffd"):
            continue  # an incomplete UTF-8 sequence: wait for the next token
        # hold back a tail that could still become a stop string
        hold = max((len(s) - 1 for s in stops), default=0)
        safe = len(text) - hold if hold else len(text)
        if safe > len(emitted_text):
            yield text[len(emitted_text):safe]
            emitted_text = text[:safe]
    if text_mode:
        text, _ = _cut(model.tokenizer.decode(outs[0], skip_special_tokens=True), stops)
        if len(text) > len(emitted_text):
            yield text[len(emitted_text):]


@torch.no_grad()
def _generate_rows(model, rows, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stops, seed,
                   text_mode, ignore_eos, sync_every=16, cuda_graph=None, compile=False):
    """Yields, every `sync_every` steps, the generated ids so far for every row (list of lists)."""
    device = model.device
    b = len(rows)
    t = max(len(r) for r in rows)
    context = model.max_seq
    if t >= context:
        raise ValueError(f"prompt of {t} tokens does not fit the context of {context} tokens")
    max_new_tokens = min(max_new_tokens, context - t)
    pad = [t - len(r) for r in rows]
    ids = torch.tensor([[0] * p + r for p, r in zip(pad, rows)], device=device)  # (B, T) left-padded
    on_cuda = device.type == "cuda"
    session = None
    if _keeps_session(device, cuda_graph):
        # the cache and captured graphs kept between calls (graph_session.py)
        from .graph_session import session_for

        session = session_for(model, b, t + max_new_tokens, compile)
        session.busy = True  # a second generate() while this one streams gets a session of its own
        session.start(pad)
        cache, offset = session.cache, session.offset
    else:
        from .graph_session import cache_capacity, mask_padding

        # on CUDA the eager path runs the graphs' shapes (cache length, padded prompt): the same kernels and tokens
        cache = model.new_cache(batch=b, max_seq=cache_capacity(model, t + max_new_tokens) if on_cuda
                                else t + max_new_tokens)
        offset = torch.tensor(pad, device=device)
        mask_padding(cache, offset)
    try:
        gen = torch.Generator(device=device)
        if seed is not None:
            gen.manual_seed(seed)
        else:
            gen.seed()
        vocab = model.config.vocab_size
        seen = torch.zeros(b, vocab, dtype=torch.bool, device=device)
        if repetition_penalty != 1.0:
            for r, row in enumerate(rows):  # the prompt's own tokens (not the padding)
                seen[r, torch.tensor(row, device=device)] = True
        eos = torch.tensor(sorted(eos_ids(model)) if not ignore_eos else [], device=device, dtype=torch.long)

        input_pos = torch.arange(t, device=device)
        positions = (input_pos[None] - offset[:, None]).clamp(min=0)
        if session is not None:
            logits = session.prefill(ids, positions)  # replayed from the prompt length's captured graph
            step = session.decoder()
        else:
            if on_cuda:  # the graph path's padded prompt, eagerly
                from .prefill_graph import GraphPrefill

                logits = GraphPrefill(model, cache, graphs=False)(ids, positions)
            else:
                logits = model(ids, cache=cache, input_pos=input_pos, position_ids=positions, kv_len=t,
                               last_only=True)[:, -1].float()
            step = make_decoder(model, cache, offset, False, compile)
        tokens = torch.zeros(b, max_new_tokens, dtype=torch.long, device=device)
        out = [[] for _ in range(b)]
        stopped = [False] * b  # finished by EOS or a stop string (host side)
        synced = 0
        for i in range(max_new_tokens):
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            nxt = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
            tokens[:, i] = nxt
            last = i == max_new_tokens - 1
            # Host syncs only every `sync_every` steps (every step when streaming or matching stop strings):
            # the decode loop itself never waits for the device.
            if last or (i + 1) % sync_every == 0:
                host_tokens = tokens[:, synced:i + 1].tolist()
                host_is_eos = (tokens[:, synced:i + 1, None] == eos).any(-1).tolist() if eos.numel() else None
                for r in range(b):
                    for j, tok in enumerate(host_tokens[r]):
                        if stopped[r] or (host_is_eos is not None and host_is_eos[r][j]):
                            stopped[r] = True  # EOS: this row is finished
                            break
                        out[r].append(tok)
                    if stops and text_mode and not stopped[r]:
                        tail = model.tokenizer.decode(out[r][-16 - max(map(len, stops)):], skip_special_tokens=True)
                        stopped[r] = _cut(tail, stops)[1]
                synced = i + 1
                yield out
                if all(stopped):
                    return
            if last:
                return
            if repetition_penalty != 1.0:
                seen[torch.arange(b, device=device), nxt] = True
            logits = step(nxt[:, None], t + i)
    finally:
        if session is not None:
            session.busy = False  # the next call may use it (this one finished, failed or was dropped)


def _keeps_session(device: torch.device, cuda_graph: bool | None) -> bool:
    """Whether a call runs on the model's kept CUDA-graph session (graph_session.py): on CUDA unless cuda_graph=False."""
    return device.type == "cuda" and cuda_graph is not False


def make_decoder(model, cache, offset, cuda_graph, compile=False):
    """The decode step: its CUDA-graph twin on CUDA devices (cuda_graph None = auto); on the CPU the
    C++ layers of cpu_decode when the model qualifies (not with compile=True, which asks for the
    compiled PyTorch step); else the eager step."""
    on_cuda = cache.valid.device.type == "cuda"
    if cuda_graph is None:
        cuda_graph = on_cuda
    if cuda_graph and on_cuda:
        from .cuda_graph import GraphDecoder

        return GraphDecoder(model, cache, offset, compile=compile)
    if not on_cuda and not compile and cache.k0.dtype == torch.float32:
        from . import cpu_decode

        layers = cpu_decode.plan(model)
        if layers is not None:
            return cpu_decode.FastCpuDecoder(model, cache, offset, layers)
    return Decoder(model, cache, offset, full_cache=on_cuda, compile=compile)
