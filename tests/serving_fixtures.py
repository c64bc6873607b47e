"""Tiny offline models for the serving tests: a byte-level BPE tokenizer with a chat template, a
random transformers Llama saved as a Hugging Face folder, and its bitengine conversion.

Weights are drawn wider than transformers' default init (std 0.02 gives near-uniform logits and
greedy loops of one token), so greedy decoding is varied enough for comparisons to mean something.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["the", "is", "an", "of", "to", "in", "it", "on", "at", "he", "we", "be", "or", "as", "by", "up"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer():
    """A byte-level BPE PreTrainedTokenizerFast: 3 specials, 256 bytes, a few merged words (bos 1, eos 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = SPECIAL + list(bytes_to_unicode().values())
    merges = []
    for w in WORDS:
        for tok in (w, "Ġ" + w):
            parts = list(tok)
            cur = parts[0]
            for p in parts[1:]:
                merges.append((cur, p))
                cur = cur + p
                if cur not in vocab:
                    vocab.append(cur)
    merges = list(dict.fromkeys(merges))
    ids = {t: i for i, t in enumerate(vocab)}
    bpe = Tokenizer(models.BPE(ids, merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    tok.chat_template = CHAT_TEMPLATE
    return tok, merges


def random_llama(vocab_size: int, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, seed=0,
                 max_pos=256, std=0.4, tie=False):
    """A random LlamaForCausalLM (float32, eval) with wide weights and norms away from 1."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=max_pos, tie_word_embeddings=tie, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, initializer_range=std)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, std)
    return model


def hf_folder(root: Path, **kw) -> Path:
    """Save a random Llama plus the tiny tokenizer as a Hugging Face folder under root/hf."""
    tok, _ = make_tokenizer()
    model = random_llama(len(tok), **kw)
    out = Path(root) / "hf"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def bitengine_checkpoint(root: Path, **kw) -> Path:
    """hf_folder() converted with bitengine.convert (ternary, A8, per-tensor scale) to root/be."""
    from bitengine import convert

    src = hf_folder(root, **kw)
    dst = Path(root) / "be"
    convert(src, dst, progress=False, log=lambda *a: None)
    return dst
