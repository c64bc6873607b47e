"""Small random checkpoints for tests, built offline (no hub): Llama, BitNet, a byte-level tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = ("the quick brown fox jumps over the lazy dog. ternary weights are minus one, zero or plus one. "
          "a language model predicts the next token. hello world! bitengine runs ternary models fast. ") * 20


def make_tokenizer(folder: Path, vocab_size: int = 256):
    """A byte-level BPE tokenizer (trained on a tiny corpus) with <s>, </s> and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return fast


def make_llama(folder: Path, *, dtype=torch.bfloat16, seed: int = 0, shard: str | None = None, tokenizer: bool = True,
               safetensors: bool = True, **overrides):
    """Save a random LlamaForCausalLM (GQA, untied by default) and return it in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=256, bos_token_id=0,
               eos_token_id=1, pad_token_id=2)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(folder), **kw)
    if not safetensors:  # transformers 5 always writes safetensors; write the legacy format ourselves
        for f in Path(folder).glob("*.safetensors"):
            f.unlink()
        torch.save(model.state_dict(), str(Path(folder) / "pytorch_model.bin"))
    if tokenizer:
        make_tokenizer(folder, cfg["vocab_size"])
    return model.float().eval()


def make_packed_bitnet(folder: Path, linear_class: str, *, seed: int = 0, **overrides):
    """A BitNetForCausalLM checkpoint in transformers' packed format (quant_method "bitnet", offline)."""
    from safetensors.torch import save_file
    from transformers import BitNetConfig, BitNetForCausalLM
    from transformers.integrations.bitnet import pack_weights

    from bitengine.quant import absmean_quantize

    torch.manual_seed(seed)
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    cfg.update(overrides)
    config = BitNetConfig(**cfg)
    model = BitNetForCausalLM(config).to(torch.bfloat16)
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("_proj.weight"):
            w_q, s = absmean_quantize(v.float())
            state[k] = pack_weights(w_q.clone())
            # BitLinear divides by weight_scale, AutoBitLinear multiplies by it
            state[k[: -len("weight")] + "weight_scale"] = (1 / s if linear_class == "bitlinear" else s).to(torch.bfloat16)
        else:
            state[k] = v.contiguous()
    os.makedirs(folder, exist_ok=True)
    save_file(state, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
    c = config.to_dict()
    c["architectures"] = ["BitNetForCausalLM"]
    c["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class,
                                "quantization_mode": "offline", "modules_to_not_convert": ["lm_head"]}
    (Path(folder) / "config.json").write_text(json.dumps(c))
    return model
