"""The transformer: Llama family and BitNet b1.58, over BitLinear / DenseLinear layers.

Module and parameter names follow transformers' LlamaForCausalLM / BitNetForCausalLM, so a
checkpoint's tensor names are the state-dict keys. The KV cache is static and preallocated, and
the decode step uses tensor positions only (no host syncs), so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .nn import DenseLinear, RMSNorm


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim/2,), with llama3 scaling when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = cfg.rope_scaling
    if not sc:
        return inv_freq
    factor = sc["factor"]
    low, high = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
    old_ctx = sc.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """transformers' `x * cos + rotate_half(x) * sin` (rotate_half(x) = cat(-x_hi, x_lo)), written as
    `x * cos + roll(x, hd/2) * sin_signed` with sin_signed = cat(-sin_lo, sin_hi): a sign moved from x to
    sin is exact, so the result is bit-identical, in four kernels instead of five."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class KVCache(nn.Module):
    """Static K/V buffers, one (B, n_kv, S, hd) pair per layer (lists `k`, `v`), plus which slots hold
    real tokens (B, S).

    `valid` masks the left padding of batched prompts; slots are written with index_copy_ at tensor
    positions, so one decode step has fixed shapes. One tensor per layer rather than one stacked
    (L, ...) tensor: a compiled step that wrote through `stacked[i]` (a view of a graph input) gets
    functionalized into a copy of the layer's whole cache per step; a separate tensor is written in place.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_seq: int, dtype, device):
        super().__init__()
        shape = (batch, cfg.num_kv_heads, max_seq, cfg.head_dim)
        for i in range(cfg.num_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("valid", torch.ones(batch, max_seq, dtype=torch.bool, device=device), persistent=False)
        self.num_layers, self.batch, self.max_seq = cfg.num_layers, batch, max_seq

    @property
    def k(self) -> list[torch.Tensor]:
        return [getattr(self, f"k{i}") for i in range(self.num_layers)]

    @property
    def v(self) -> list[torch.Tensor]:
        return [getattr(self, f"v{i}") for i in range(self.num_layers)]

    @property
    def device(self) -> torch.device:
        return self.valid.device

    def reset(self) -> None:
        self.valid.fill_(True)


class Attention(nn.Module):
    fused = None  # q/k/v as one layer (fuse.py), set after loading; a plain attribute, not a submodule

    def __init__(self, cfg: ModelConfig, make_linear, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        hd, h, kv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        bias = cfg.attention_bias
        self.q_proj = make_linear(cfg.hidden_size, h * hd, bias)
        self.k_proj = make_linear(cfg.hidden_size, kv * hd, bias)
        self.v_proj = make_linear(cfg.hidden_size, kv * hd, bias)
        self.o_proj = make_linear(h * hd, cfg.hidden_size, bias)  # transformers: o_proj too has attention_bias
        self.attn_sub_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if cfg.sub_norms else None

    def forward(self, x, cos, sin, mask, kv: tuple | None, input_pos, kv_len: int | None, norm=None, residual=None):
        """residual + attention(norm(x)) (norm and residual optional; the decoder layer passes its input norm and
        x itself, so that a backend may fuse them into the q/k/v and o projections).

        kv: this layer's (k, v) cache buffers (B, n_kv, S, hd), or None without a cache.
        The layer gets its buffers rather than an index into the cache, so every layer runs the
        same code on the same shapes and torch.compile makes one graph for all of them. `sin` is the
        signed table of CausalLM.rope (see apply_rope)."""
        b, t, _ = x.shape
        hd = self.cfg.head_dim
        h, n_kv = self.cfg.num_heads, self.cfg.num_kv_heads
        if self.fused is not None:  # q and k are adjacent in the fused output: one RoPE pass for both
            qk, v = self.fused.joint(x, norm).split([(h + n_kv) * hd, n_kv * hd], dim=-1)
            qk = apply_rope(qk.view(b, t, -1, hd).transpose(1, 2), cos, sin)  # (B, H + n_kv, T, hd)
            q, k = qk.split([h, n_kv], dim=1)
        else:
            if norm is not None:
                x = norm(x)
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = apply_rope(q.view(b, t, -1, hd).transpose(1, 2), cos, sin)  # (B, H, T, hd)
            k = apply_rope(k.view(b, t, -1, hd).transpose(1, 2), cos, sin)  # (B, n_kv, T, hd)
        v = v.view(b, t, -1, hd).transpose(1, 2)
        if kv is not None:
            kc, vc = kv  # (B, n_kv, S, hd)
            if input_pos.dim() == 1:  # every row writes the same slots
                kc.index_copy_(2, input_pos, k.to(kc.dtype))
                vc.index_copy_(2, input_pos, v.to(vc.dtype))
            else:  # (B, T): each row has its own slots (continuous batching)
                rows = torch.arange(b, device=x.device)[:, None]
                kc[rows, :, input_pos] = k.transpose(1, 2).to(kc.dtype)  # indexed view is (B, T, n_kv, hd)
                vc[rows, :, input_pos] = v.transpose(1, 2).to(vc.dtype)
            k, v = (kc, vc) if kv_len is None else (kc[:, :, :kv_len], vc[:, :, :kv_len])
        if t == 1 and kv is not None and q.is_cuda:  # decode: the Triton kernel where it pays (kernels/decode_attention.py)
            y = torch.ops.bitengine.decode_attention(q, k, v, mask, input_pos)
        else:
            k, v = k.to(q.dtype), v.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
        y = y.transpose(1, 2).reshape(b, t, -1)  # (B, T, H*hd)
        return self.o_proj(y, self.attn_sub_norm, residual)


class MLP(nn.Module):
    fused = None  # gate/up as one layer (fuse.py)

    def __init__(self, cfg: ModelConfig, make_linear):
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = make_linear(cfg.hidden_size, cfg.intermediate_size, bias)
        self.up_proj = make_linear(cfg.hidden_size, cfg.intermediate_size, bias)
        self.down_proj = make_linear(cfg.intermediate_size, cfg.hidden_size, bias)
        self.relu2 = cfg.hidden_act == "relu2"
        self.ffn_sub_norm = RMSNorm(cfg.intermediate_size, cfg.rms_norm_eps) if cfg.sub_norms else None

    def forward(self, x, norm=None, residual=None):
        """residual + mlp(norm(x)), norm and residual optional (as Attention.forward)."""
        # the CUDA decode GEMV may apply the gating in its epilogue (fuse.FusedLinear.gated); else act(g) * u here
        h = self.fused.gated(x, norm, "relu2" if self.relu2 else "silu") if self.fused is not None else None
        if h is None:
            if self.fused is not None:
                g, u = self.fused(x, norm)
            else:
                if norm is not None:
                    x = norm(x)
                g, u = self.gate_proj(x), self.up_proj(x)
            h = (F.relu(g).square() if self.relu2 else F.silu(g)) * u
        return self.down_proj(h, self.ffn_sub_norm, residual)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, make_linear, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, make_linear, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, make_linear)

    def forward(self, x, cos, sin, mask, kv, input_pos, kv_len):
        # x + attn(norm(x)), then h + mlp(norm(h)); the projections get the norms and residuals, so the CUDA decode
        # GEMV runs each norm in its prologue and each residual add in its epilogue (no glue kernels for them)
        h = self.self_attn(x, cos, sin, mask, kv, input_pos, kv_len, norm=self.input_layernorm, residual=x)
        return self.mlp(h, norm=self.post_attention_layernorm, residual=h)


class Backbone(nn.Module):
    """`model.*` in the checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig, make_linear):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, make_linear, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """forward(input_ids) -> logits (B, T, vocab), like a transformers causal LM.

    With a KVCache: `input_pos` (T,) or (B, T) int64 are the cache slots the tokens go to, `position_ids`
    (B, T) their rotary positions (they differ from the slots under left padding), and `kv_len`
    an optional host-side bound on the slots to attend over (eager decoding; None = all slots,
    for fixed-shape CUDA-graph decoding). `last_only` returns the last token's logits (B, 1, vocab);
    `last_index`, an int64 (1,) tensor, those of the token at that index instead (prefill_graph.py's padded prompts).
    """

    def __init__(self, cfg: ModelConfig, make_linear, max_seq: int | None = None):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, make_linear)
        self.lm_head = DenseLinear(cfg.hidden_size, cfg.vocab_size)
        self.max_seq = max_seq or cfg.max_position_embeddings
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and isinstance(self.lm_head, DenseLinear):
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        """Where the model runs (its rotary table lives there; embeddings may be an int8 module)."""
        return self.inv_freq.device

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype activations (and the KV cache) run in: the final norm's, which the loader sets to it."""
        return self.model.norm.weight.dtype

    def rope(self, position_ids: torch.Tensor):
        """cos, sin_signed (B, 1, T, hd) in float32 for integer positions (B, T); see apply_rope."""
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, hd/2)
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), dim=-1)[:, None], torch.cat((-sin, sin), dim=-1)[:, None]

    def forward(self, input_ids: torch.Tensor, *, cache: KVCache | None = None, input_pos: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_len: int | None = None,
                last_only: bool = False, last_index: torch.Tensor | None = None) -> torch.Tensor:
        b, t = input_ids.shape
        dev = input_ids.device
        if input_pos is None:
            input_pos = torch.arange(t, device=dev)
        if position_ids is None:
            position_ids = input_pos.expand(b, t)
        if dev.type == "cuda":
            _register_gpu_ops()
        front, norm = self._front, self.model.norm
        glue = self.__dict__.get("_compiled_glue")
        if glue is not None and t == 1 and cache is not None and kv_len is None:  # the fixed-shape decode step
            front, norm = glue
        x, cos, sin, mask = front(input_ids, input_pos, position_ids, None if cache is None else cache.valid,
                                  t if cache is None else (kv_len or cache.max_seq))
        for i, layer in enumerate(self.model.layers):
            kv = (getattr(cache, f"k{i}"), getattr(cache, f"v{i}")) if cache is not None else None
            x = layer(x, cos, sin, mask, kv, input_pos, kv_len)
        x = norm(x)
        if last_index is not None:  # one token per row at a device-side index (a prompt padded at its end)
            x = x.index_select(1, last_index)
        elif last_only:
            x = x[:, -1:]
        return self.lm_head(x)

    def _front(self, input_ids, input_pos, position_ids, valid, s):
        """What every layer takes: the embeddings (B, T, D), the rotary cos / sin (B, 1, T, hd) in their dtype (once
        for all layers) and the attention mask over s slots (valid: the cache's (B, S) slot mask, or None)."""
        x = self.model.embed_tokens(input_ids).to(self.activation_dtype)  # a float16 tied head's embedding on the CPU
        cos, sin = (c.to(x.dtype) for c in self.rope(position_ids))
        return x, cos, sin, self._mask_over(input_ids.shape[0], input_ids.shape[1], input_pos, valid, s)

    def _mask(self, b, t, input_pos, cache, kv_len, dev):
        """Boolean attention mask (B, 1, T, S): causal over slots, minus padding, minus outside the window.

        input_pos is (T,) shared by all rows, or (B, T) per row."""
        s = t if cache is None else (kv_len or cache.max_seq)
        return self._mask_over(b, t, input_pos.to(dev), None if cache is None else cache.valid, s)

    def _mask_over(self, b, t, input_pos, valid, s):
        """_mask with the cache given as its (B, S) slot mask (None: no cache) and the slot count s."""
        dev = input_pos.device
        slots = torch.arange(s, device=dev)
        pos = input_pos[..., None]  # (T, 1) or (B, T, 1)
        mask = slots <= pos
        window = self.config.sliding_window
        if window:
            mask = mask & (slots > pos - window)
        mask = mask.view(-1, 1, t, s).expand(b, 1, t, s)
        if valid is not None:
            mask = mask & valid[:, None, None, :s]
            # a padding token sees no valid slot; let it see itself so its (unused) row is not NaN
            mask = mask | (slots == pos).view(-1, 1, t, s)
        return mask

    def compile_layers(self, glue: bool = True, **kwargs) -> None:
        """torch.compile every decoder layer in place (norms, RoPE, cache writes, attention and the
        elementwise glue fuse; the ternary kernels are custom ops that compile sees through), and with `glue` the
        one-token step's embedding / rotary / mask and final norm (see below).

        All layers share one compiled graph (their parameters are graph inputs), so compiling costs
        about one layer's worth. Used for the CUDA-graph decode step, whose shapes are fixed for one cache.

        dynamic=None (torch's automatic dynamic shapes): the first shapes compile static; the first other cache
        length, batch or prompt length recompiles once with that size symbolic (a size of 1 stays specialized, so
        the one-token step keeps its own graph). dynamic=False, the default until 2026-12-03, compiled again for
        every new cache length (every generate() call of another prompt + max_new_tokens): an inductor compile
        each time, and after torch's recompile limit (8) the layers silently ran eager."""
        if getattr(self, "layers_compiled", False):
            return
        dynamic = kwargs.pop("dynamic", None)
        if self.device.type == "cuda":
            from .backends.cuda import inductor_options

            kwargs["options"] = {**inductor_options(self.device), **kwargs.get("options", {})}
        for layer in self.model.layers:
            layer.compile(dynamic=dynamic, **kwargs)
        # the one-token step's glue around the layers (embedding, rotary cos / sin, mask; the final norm): ~20 small
        # eager kernels per step, each a launch in the CUDA graph (the profile's "elementwise" and "copies"), fused
        # into a few. Used only at that step's fixed shape (forward), so prompts of any length stay eager.
        # glue=False leaves them eager (bench_e2e's "+noglue", for the A/B).
        if glue:
            self.__dict__["_compiled_glue"] = (torch.compile(self._front, dynamic=dynamic, **kwargs),
                                               torch.compile(self.model.norm, dynamic=dynamic, **kwargs))
        self.layers_compiled = True

    def new_cache(self, batch: int = 1, max_seq: int | None = None, dtype=None) -> KVCache:
        return KVCache(self.config, batch, max_seq or self.max_seq, dtype or self.activation_dtype, self.device)

    def set_adapters(self, adapters, mode: str | None = None, adapter_dtype: str | None = None):
        """Switch the LoRA adapters without reloading the base model (see bitengine.lora.set_adapters)."""
        from .lora import set_adapters

        return set_adapters(self, adapters, mode=mode, adapter_dtype=adapter_dtype)

    def remove_adapters(self) -> None:
        """Back to the base model, bit for bit."""
        from .lora import remove_adapters

        remove_adapters(self)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """See bitengine.generate.generate."""
        from .generate import generate

        return generate(self, *args, **kwargs)


def _register_gpu_ops() -> None:
    """Register torch.ops.bitengine.* (the decode-attention op; needs triton, as every CUDA run here does).
    Done in CausalLM.forward, outside the compiled layers, so the FP16 baseline gets the same attention."""
    from .kernels import ops  # noqa: F401


def dense_linear(in_features: int, out_features: int, bias: bool) -> DenseLinear:
    return DenseLinear(in_features, out_features, bias=bias)


def expected_shapes(cfg: ModelConfig) -> tuple[dict[str, tuple], list[str]]:
    """({parameter name: shape} of the 16-bit model, [names of the linear modules in the layers]).

    The head is a linear module too but is listed only in the shapes (absent when tied)."""
    with torch.device("meta"):
        model = CausalLM(cfg, dense_linear)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    linears = [n for n, m in model.named_modules() if isinstance(m, DenseLinear) and n != "lm_head"]
    if cfg.linear_input_norm:
        for n in linears:
            shapes[f"{n}.rms_norm.weight"] = (model.get_submodule(n).in_features,)
    return shapes, linears
