"""One-token decode attention (bitengine/kernels/decode_attention.py) against a float64 reference.

On the CPU the Triton kernel runs in a child process under TRITON_INTERPRET=1 at small shapes (the
interpreter must be on before triton is imported); on a CUDA device (marker `gpu`) at real shapes, and
the model's CUDA decode with the kernel against the same model with scaled_dot_product_attention.
Cases: grouped-query and plain heads, head_dim not a power of two, S not a multiple of the key block,
one slice and many (slices past the token's position are empty), per-row and shared positions,
masked-out slots and slices, and cache slots after the position that hold NaN (never read).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def reference64(q, k, v, mask, pos):
    """softmax(q k^T / sqrt(D) over visible slots <= pos) v, in float64; q (B, H, 1, D), k/v (B, Hkv, S, D)."""
    b, h, _, d = q.shape
    s = k.shape[2]
    g = h // k.shape[1]
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)
    slots = torch.arange(s, device=q.device)
    visible = mask.expand(b, 1, 1, s)[:, 0, 0, :] & (slots[None, :] <= pos.reshape(-1, 1).to(q.device))
    kk = torch.where(visible[:, None, :, None], kk, 0.0)  # NaN past the position must not leak in
    vv = torch.where(visible[:, None, :, None], vv, 0.0)
    scores = (q.double() @ kk.transpose(-1, -2)) / d ** 0.5  # (B, H, 1, S)
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ vv


def make_case(b, h, hkv, s, d, dtype, device, seed, shared_pos=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    pos = torch.randint(0, s, (1,) if shared_pos else (b, 1), generator=g)
    mask = torch.rand(b, 1, 1, s, generator=g) < 0.8
    rows = pos.reshape(-1).expand(b)
    for i in range(b):
        mask[i, 0, 0, rows[i]] = True  # the token always sees itself (as CausalLM._mask makes sure)
        k[i, :, rows[i] + 1:] = float("nan")  # slots after the position: never written, never read
        v[i, :, rows[i] + 1:] = float("nan")
    return [t.to(device) for t in (q, k, v, mask, pos)]


CASES = [  # b, h, hkv, s, d, shared_pos
    (2, 4, 2, 100, 16, False), (1, 3, 3, 64, 24, True), (3, 8, 1, 130, 32, False), (1, 2, 2, 5, 8, True),
]


VARIANTS = ("split", "grouped")


def check_cases(device, dtypes, n_sms):
    """Both kernel variants (decode_attention.VARIANT): the grouped one rounds p to the cache dtype for its p.V
    product on the tensor cores (as flash attention does), within the same tolerances."""
    from bitengine.kernels.decode_attention import decode_attention

    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
    for variant in VARIANTS:
        for dtype in dtypes:
            for ci, (b, h, hkv, s, d, shared) in enumerate(CASES):
                for n_sm in n_sms:  # 1: one slice per head; large: many slices, some empty
                    q, k, v, mask, pos = make_case(b, h, hkv, s, d, dtype, device, seed=ci, shared_pos=shared)
                    y = decode_attention(q, k, v, mask, pos, n_sm=n_sm, variant=variant)
                    ref = reference64(q, k, v, mask, pos)
                    what = f"{variant} case {ci} {dtype} n_sm={n_sm}"
                    assert y.shape == (b, h, 1, d) and y.dtype == dtype, what
                    assert torch.isfinite(y).all(), f"{what}: non-finite output"
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    assert err < tol[dtype], f"{what}: rel.err {err:.2e}"
        # a whole slice masked out (slots 64..127 hidden) while others are visible
        q, k, v, mask, pos = make_case(1, 2, 1, 200, 16, torch.float32, device, seed=9, shared_pos=True)
        pos.fill_(190)
        k[:, :, :191] = k[:, :, :191].nan_to_num()
        v[:, :, :191] = v[:, :, :191].nan_to_num()
        mask[..., :] = True
        mask[..., 64:128] = False
        y = decode_attention(q, k, v, mask, pos, n_sm=64, variant=variant)
        ref = reference64(q, k, v, mask, pos)
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5, variant


def test_decode_attention_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.path.dirname(HERE) + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "decode attention ok" in proc.stdout


def test_decode_attention_op_falls_back_to_sdpa_off_gpu():
    """On the CPU the op is scaled_dot_product_attention on the same inputs (the model never calls it there)."""
    from bitengine.kernels import ops  # noqa: F401

    q, k, v, mask, pos = make_case(2, 4, 2, 40, 16, torch.float32, "cpu", seed=3)
    k, v = k.nan_to_num(), v.nan_to_num()
    slots = torch.arange(40)
    mask = mask & (slots <= pos.reshape(-1, 1))[:, None, None, :]
    y = torch.ops.bitengine.decode_attention(q, k, v, mask, pos)
    assert ((y.double() - reference64(q, k, v, mask, pos)).norm()).item() < 1e-5


def test_kernel_pays_where_measured_faster():
    """The model's dispatch rule (decode_attention.kernel_pays), on an H200's 132 SMs: the measured cases
    (bench/results/gpu_decode_attention_NVIDIA_H200_2026-12-02). Arguments: batch, heads, kv heads, slots."""
    from bitengine.kernels.decode_attention import kernel_pays, slicing

    def split(b, h, hkv, s):
        return kernel_pays(b, h, hkv, s, 132, variant="split")

    def grouped(b, h, hkv, s):
        return kernel_pays(b, h, hkv, s, 132, variant="grouped")

    # split: only where every program reads one block of slots
    assert slicing(32, 192, 132) == (64, 3) and split(1, 32, 32, 192)  # Llama-2-7B heads, batch 1
    assert split(1, 20, 5, 192)  # BitNet-2B-4T, batch 1
    assert not split(8, 32, 32, 192)  # batch 8: two blocks per program
    assert not split(1, 32, 32, 4096)  # a long cache: 8 blocks per program
    assert split(1, 32, 32, 576) and not split(1, 32, 32, 577)  # 9 slices of one block at most
    # grouped: up to 16 blocks per program (measured faster than SDPA with up to 13, slower with 32)
    for b, h, hkv, s in [(1, 32, 32, 192), (1, 32, 32, 4096), (8, 32, 32, 192), (1, 20, 5, 4096), (8, 20, 5, 4096),
                         (8, 32, 8, 4096)]:
        assert grouped(b, h, hkv, s), (b, h, hkv, s)
    assert slicing(8 * 32, 4096, 132)[0] == 32 * 64 and not grouped(8, 32, 32, 4096)  # 7B heads, batch 8


def test_decode_attention_bad_input():
    from bitengine.kernels.decode_attention import decode_attention

    q = torch.randn(1, 4, 2, 16)
    k = torch.randn(1, 2, 10, 16)
    with pytest.raises(ValueError, match="one query token"):
        decode_attention(q, k, k, torch.ones(1, 1, 1, 10, dtype=torch.bool), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="H % Hkv"):
        decode_attention(q[:, :3, :1], k, k, torch.ones(1, 1, 1, 10, dtype=torch.bool),
                         torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="variant must be 'split' or 'grouped'"):
        decode_attention(q[:, :, :1], k.repeat(1, 2, 1, 1), k.repeat(1, 2, 1, 1),
                         torch.ones(1, 1, 1, 10, dtype=torch.bool), torch.zeros(1, dtype=torch.long), variant="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decode_attention_gpu():
    check_cases("cuda", (torch.float16, torch.bfloat16, torch.float32), (1, 132))
    from bitengine.kernels.decode_attention import decode_attention

    for b, h, hkv, s, d in [(1, 32, 32, 192, 128), (1, 20, 5, 4096, 128), (8, 32, 8, 1000, 128)]:
        q, k, v, mask, pos = make_case(b, h, hkv, s, d, torch.float16, "cuda", seed=s)
        ref = reference64(q, k, v, mask, pos)
        for variant in VARIANTS:
            y = decode_attention(q, k, v, mask, pos, n_sm=132, variant=variant)
            assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-3, variant


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_decode_with_kernel_matches_sdpa(tmp_path):
    """A small random Llama (fp16 weights) on the GPU: decode steps through the kernel give the logits of the same
    steps through scaled_dot_product_attention, with a shared position and with per-row positions (the server)."""
    from tinymodels import make_llama

    import bitengine
    from bitengine.kernels import decode_attention as dec

    make_llama(tmp_path / "hf", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    bitengine.convert(tmp_path / "hf", tmp_path / "fp16", weights="fp16", progress=False)
    model = bitengine.load(tmp_path / "fp16", device="cuda")
    prompt = torch.randint(3, 512, (2, 11), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    nxt = torch.randint(3, 512, (2, 1), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    logits = {}
    saved = dec.ENABLED, dec.VARIANT
    for setting in ("split", "grouped", "sdpa"):
        dec.ENABLED, dec.VARIANT = setting != "sdpa", "grouped" if setting == "grouped" else "split"
        try:
            with torch.no_grad():
                cache = model.new_cache(batch=2, max_seq=64)
                model(prompt, cache=cache, input_pos=torch.arange(11, device="cuda"))
                shared = model(nxt, cache=cache, input_pos=torch.tensor([11], device="cuda"))
                rows = model(nxt, cache=cache, input_pos=torch.tensor([[12], [12]], device="cuda"))
            logits[setting] = (shared.float(), rows.float())
        finally:
            dec.ENABLED, dec.VARIANT = saved
    for setting in ("split", "grouped"):
        for a, b in zip(logits[setting], logits["sdpa"]):
            assert ((a - b).norm() / b.norm()).item() < 2e-3, setting


if __name__ == "__main__":  # the interpreter child of test_decode_attention_under_interpreter
    sys.path.insert(0, HERE)
    from test_triton_interpret import _patch_interpreter_index

    _patch_interpreter_index()
    check_cases("cpu", (torch.float32, torch.float16), (1, 64))
    print("decode attention ok")
