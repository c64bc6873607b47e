"""The int4 head (bitengine.int4_head) on the CPU: its format bit for bit, its quantization, its float64 reference
against an independent dequantized computation, the loader and CLI option, and bad input. The Triton GEMM runs under
the interpreter in test_triton_interpret.py ("int4"), the C++ GEMV on the GPU in test_gpu_int4_head.py."""

from __future__ import annotations

import pytest
import torch

import bitengine
from bitengine import int4_head
from bitengine.int4_head import GROUP, Int4Linear, int4_groups, pack_int4, unpack_int4
from bitengine.quant import quantize_activations


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_pack_layout_bit_for_bit():
    q = torch.randint(-8, 8, (5, 96), generator=_gen(0), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 48)
    for n in range(5):  # byte b of chunk c: q[32c + b] low nibble, q[32c + 16 + b] high nibble, two's complement
        for c in range(3):
            for b in range(16):
                byte = int(packed[n, 16 * c + b])
                assert byte & 15 == int(q[n, 32 * c + b]) & 15
                assert byte >> 4 == int(q[n, 32 * c + 16 + b]) & 15
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize("n,k", [(7, 128), (33, 300), (4, 1)])
def test_quantization_groups_scales_and_padding(n, k):
    w = torch.randn(n, k, generator=_gen(n + k)) * 0.03
    w[0, : min(k, GROUP)] = 0.0  # an all-zero group: scale 0, codes 0
    packed, scale = int4_groups(w)
    kp = -(-k // GROUP) * GROUP
    assert packed.shape == (n, kp // 2) and scale.shape == (n, kp // GROUP) and scale.dtype == torch.float16
    q = unpack_int4(packed)
    assert int(q.abs().max()) <= 7 and not q[:, k:].any()  # symmetric codes; the padding is zeros
    wp = torch.nn.functional.pad(w, (0, kp - k)).reshape(n, -1, GROUP)
    assert torch.equal(scale, (wp.abs().amax(-1) / 7).to(torch.float16))
    assert scale[0, 0] == 0 and not q[0, :GROUP].any()
    deq = q.float().reshape(n, -1, GROUP) * scale.float()[..., None]
    err = (deq - wp).abs()
    assert bool((err <= scale.float()[..., None] * 0.5 + 1e-7).all())  # round to nearest: at most half a step


def test_reference_equals_dequantized_float64():
    n, k = 70, 333
    w, x = torch.randn(n, k, generator=_gen(1)), torch.randn(4, 2, k, generator=_gen(2))
    bias = torch.randn(n, generator=_gen(3))
    packed, scale = int4_groups(w)
    deq = (unpack_int4(packed).double().reshape(n, -1, GROUP) * scale.double()[..., None]).reshape(n, -1)[:, :k]
    x_q, a = quantize_activations(x)
    expect = (x_q.double() / a.double()) @ deq.t() + bias.double()
    y = int4_head.int4_linear_reference(x.double(), packed, scale, bias, k)
    assert y.shape == (4, 2, n) and y.dtype == torch.float64
    assert float((y - expect).norm() / expect.norm()) < 1e-12


def test_module_and_quantize_head_in_place():
    from bitengine.int8_head import quantize_head_int8
    from bitengine.nn import DenseLinear

    model = torch.nn.Module()
    model.lm_head = DenseLinear(256, 50, dtype=torch.float32)
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)
    x = torch.randn(3, 256, generator=_gen(4))
    before = model.lm_head(x).double()
    assert int4_head.quantize_head_int4(model) == ["lm_head"]
    assert isinstance(model.lm_head, Int4Linear)
    after = model.lm_head(x)
    assert after.dtype == x.dtype and float((after.double() - before).norm() / before.norm()) < 0.15
    assert int4_head.quantize_head_int4(model) == []  # already int4: nothing to do
    int8 = torch.nn.Module()
    int8.lm_head = DenseLinear(64, 10, dtype=torch.float32)
    quantize_head_int8(int8)
    with pytest.raises(ValueError, match="already int8"):
        int4_head.quantize_head_int4(int8)
    with pytest.raises(ValueError, match="no module named 'lm_head'"):
        int4_head.quantize_head_int4(torch.nn.Module())


def test_load_with_int4_head_generates(tmp_path):
    from tinymodels import make_llama

    make_llama(tmp_path / "hf", tokenizer=True, vocab_size=300, hidden_size=128, intermediate_size=256,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    bitengine.convert(tmp_path / "hf", tmp_path / "bit", progress=False)
    ids = torch.randint(3, 300, (1, 12), generator=_gen(5))
    fp = bitengine.load(tmp_path / "bit")
    model = bitengine.load(tmp_path / "bit", head="int4")
    assert isinstance(model.lm_head, Int4Linear)
    with torch.no_grad():
        ref, got = fp(ids).double(), model(ids).double()
    assert float((got - ref).norm() / ref.norm()) < 0.15  # int4 head: coarse by design (README: perplexity)
    out = model.generate(input_ids=ids[0].tolist(), max_new_tokens=4, ignore_eos=True)
    assert len(out) >= 4
    with pytest.raises(ValueError, match="head must be one of"):
        bitengine.load(tmp_path / "bit", head="int5")


@pytest.mark.parametrize("tied", [True, False])
def test_cpu_default_head_is_the_checkpoints_float16(tmp_path, tied):
    """On the CPU under the C++ backend the head stays float16 (a tied embedding too) and runs through the F16C kernel:
    the same weights as the reference backend's float32 head, so the same logits up to float32 summation order;
    head="fp16" does the same under the reference backend."""
    from tinymodels import make_llama

    from bitengine.nn import cpu_kernels_built

    make_llama(tmp_path / "hf", tokenizer=True, vocab_size=300, hidden_size=128, intermediate_size=256,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               tie_word_embeddings=tied)
    bitengine.convert(tmp_path / "hf", tmp_path / "bit", progress=False)
    ids = torch.randint(3, 300, (1, 12), generator=_gen(6))
    fast, ref = bitengine.load(tmp_path / "bit", backend="cpu"), bitengine.load(tmp_path / "bit", backend="reference")
    half_ref = bitengine.load(tmp_path / "bit", backend="reference", head="fp16")
    kept = torch.float16 if cpu_kernels_built() else torch.float32
    assert fast.lm_head.weight.dtype == half_ref.lm_head.weight.dtype == kept
    assert ref.lm_head.weight.dtype == torch.float32
    assert (fast.lm_head.weight is fast.model.embed_tokens.weight) == tied
    assert fast.model.embed_tokens.weight.dtype == (kept if tied else torch.float32)
    with torch.no_grad():
        want = ref(ids).double()
        for model in (fast, half_ref):
            got = model(ids)
            assert got.dtype == torch.float32
            assert float((got.double() - want).norm() / want.norm()) < 1e-5


def test_cli_accepts_int4_head():
    from bitengine.cli import build_parser

    args = build_parser().parse_args(["generate", "ckpt", "--prompt", "hi", "--head", "int4"])
    assert args.head == "int4"


def test_kernel_entry_rejects_bad_shapes():
    from bitengine.kernels.int4_linear import int4_gemm

    packed, scale = int4_groups(torch.randn(8, 200))
    x = torch.randn(1, 200)
    with pytest.raises(ValueError, match=r"activation"):
        int4_gemm(torch.randn(1, 199), packed, scale, None, 200)
    with pytest.raises(ValueError, match=r"packed weight must be contiguous uint8 \[N, 128\]"):
        int4_gemm(x, packed[:, :64], scale, None, 200)
    with pytest.raises(ValueError, match=r"scale must be contiguous float16 \[8, 2\]"):
        int4_gemm(x, packed, scale.float(), None, 200)
    with pytest.raises(ValueError, match=r"bias must be contiguous float32 \[8\]"):
        int4_gemm(x, packed, scale, torch.zeros(7), 200)
