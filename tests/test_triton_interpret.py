"""The Triton ternary kernels on the CPU through the Triton interpreter (TRITON_INTERPRET=1), small shapes.

Runs in a child process: the interpreter must be switched on before triton is first imported, and
other tests may already have imported it. The child checks every kernel (GEMV A8 fused / unfused,
GEMV A16, GEMM A8 / A16 with in-register and scratch decode) against a float64 reference for the three scale layouts, with bias,
padding (K not a multiple of 16) and M across the GEMV/GEMM split; the inline-asm dp4a is replaced
by its plain-integer twin there (gemv.dp4a), so the GPU tests cover that one instruction.
A second child checks the LoRA side path fused into every kernel's epilogue (lora_A / lora_B) against
a float64 base + exact (x @ A^T) @ B^T, and BitLinear on the triton backend with an adapter. A third
checks the int8 head kernels (kernels/int8_linear.py: GEMV and tensor-core GEMM) and their op.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _run_child(part: str) -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.path.dirname(HERE) + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), part], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_triton_kernels_under_interpreter():
    _run_child("base")


def test_lora_epilogue_under_interpreter():
    _run_child("lora")


def test_int8_linear_under_interpreter():
    _run_child("int8")


def test_int4_linear_under_interpreter():
    _run_child("int4")


def _patch_interpreter_index():
    """numpy >= 2.4 refuses int() of a 1-element array, which the interpreter does for loop bounds."""
    import numpy as np
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interp._patch_lang_tensor = patched


def _reference64(x, packed, scale, k, act_bits, bias):
    import torch

    from bitengine.quant import expand_scale, quantize_activations, unpack_ternary

    w = unpack_ternary(packed, k, torch.float64) * expand_scale(scale, packed.shape[0], k).double()
    if act_bits == 8:
        xq, a = quantize_activations(x)
        y = xq.double() @ w.t() / a.double()
    else:
        y = x.double() @ w.t()
    return y if bias is None else y + bias.double()


def _main() -> int:
    import time

    import torch

    assert os.environ.get("TRITON_INTERPRET") == "1"
    _patch_interpreter_index()
    from bitengine.kernels.act_quant import quantize_activations_int8
    from bitengine.kernels.gemm import ternary_gemm
    from bitengine.kernels.gemm_decoded import ternary_gemm_decoded
    from bitengine.kernels.gemv import ternary_gemv_a8, ternary_gemv_a16
    from bitengine.kernels.layout import i2w_to_codes, k4_to_i2w
    from bitengine.quant import (
        absmean_quantize,
        pack_ternary,
        quantize_activations,
        unpack_codes,
    )

    torch.manual_seed(0)
    gemv_cfg = {"BLOCK_N": 16, "BLOCK_KW": 16, "num_warps": 4}
    gemm_cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_KW": 2, "GROUP_M": 2, "num_warps": 4}
    failures = []
    start = time.time()
    cases = [(40, 100, "tensor", 0, torch.float32, False), (33, 200, "channel", 0, torch.float16, True),
             (17, 256, "group", 64, torch.float32, True)]
    for n, k, gran, group, dtype, with_bias in cases:
        w_q, scale = absmean_quantize(torch.randn(n, k), gran, group)
        packed = pack_ternary(w_q)
        words = k4_to_i2w(packed, k)
        if not torch.equal(i2w_to_codes(words, k), unpack_codes(packed, k)):
            failures.append(f"i2w round trip {n}x{k}")
        bias = torch.randn(n).to(dtype) if with_bias else None
        tol = 1e-5 if dtype == torch.float32 else 1e-3
        for m in (1, 3, 17):
            x = torch.randn(m, k).to(dtype)
            q, a = quantize_activations_int8(x, words.shape[1])
            q_ref, a_ref = quantize_activations(x)
            if not (torch.equal(q[:, :k].float(), q_ref) and torch.equal(a, a_ref[:, 0]) and not q[:, k:].any()):
                failures.append(f"act quant m={m} k={k}")
            bm = max(1, 1 << (m - 1).bit_length())
            runs = [("gemm_a8", 8, ternary_gemm, {"act_bits": 8, "config": gemm_cfg})]
            if dtype != torch.float32:  # IEEE float32 tl.dot is not in the interpreter's numpy path
                runs.append(("gemm_a16", 16, ternary_gemm, {"act_bits": 16, "config": gemm_cfg}))
            if gran != "group" and m == 17:
                runs.append(("gemm_decoded_a8", 8, ternary_gemm_decoded, {"act_bits": 8}))
                if dtype != torch.float32:
                    runs.append(("gemm_decoded_a16", 16, ternary_gemm_decoded, {"act_bits": 16}))
            if m <= 16:
                runs += [("gemv_a8_fused", 8, ternary_gemv_a8, {"fused": True, "config": {**gemv_cfg, "BLOCK_M": bm}}),
                         ("gemv_a8", 8, ternary_gemv_a8, {"fused": False, "config": {**gemv_cfg, "BLOCK_M": bm}}),
                         ("gemv_a16", 16, ternary_gemv_a16, {"config": {**gemv_cfg, "BLOCK_M": bm, "BLOCK_KW": 8}})]
            for name, bits, kernel, kwargs in runs:
                ref = _reference64(x, packed, scale, k, bits, bias)
                y = kernel(x, words, scale, k, bias=bias, **kwargs)
                err = ((y.double() - ref).norm() / ref.norm()).item()
                ok = y.shape == (m, n) and y.dtype == dtype and err < tol
                print(f"{name:14s} {n}x{k} {gran:7s} m={m:2d} {str(dtype)[6:]:8s} rel.err {err:.2e} {'ok' if ok else 'FAIL'}")
                if not ok:
                    failures.append(f"{name} {n}x{k} {gran} m={m}: {err:.2e}")
    # the activation quantization's two kernels past the small shapes above: whole rows in registers, several per
    # program (K 2560: 2 rows of 4096 slots) or one with 16 warps (K 9000), and the two-pass loop beyond
    # act_quant.ROW_KERNEL_MAX (K 16400)
    for m, k, kw in ((5, 2560, 160), (3, 9000, 563), (2, 16400, 1025)):
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(m, k) * torch.rand(m, 1) * 10).to(dtype)
            q, a = quantize_activations_int8(x, kw)
            q_ref, a_ref = quantize_activations(x)
            if not (q.shape == (m, 16 * kw) and torch.equal(q[:, :k].float(), q_ref) and torch.equal(a, a_ref[:, 0])
                    and not q[:, k:].any()):
                failures.append(f"act quant m={m} k={k} {dtype}")
    print(f"{time.time() - start:.1f} s; failures: {failures}")
    return 1 if failures else 0


def _lora_main() -> int:
    """Every kernel with lora_A [r, K] / lora_B [N, r] against float64 base + (x @ A^T) @ B^T."""
    import time

    import torch

    assert os.environ.get("TRITON_INTERPRET") == "1"
    _patch_interpreter_index()
    from bitengine import backends
    from bitengine.kernels import ops  # noqa: F401  (registers torch.ops.bitengine.ternary_linear)
    from bitengine.kernels.gemm import ternary_gemm
    from bitengine.kernels.gemm_decoded import ternary_gemm_decoded
    from bitengine.kernels.gemv import ternary_gemv_a8, ternary_gemv_a16
    from bitengine.kernels.layout import k4_to_i2w
    from bitengine.nn import BitLinear
    from bitengine.quant import absmean_quantize, pack_ternary

    torch.manual_seed(1)
    gemv_cfg = {"BLOCK_N": 16, "BLOCK_KW": 16, "num_warps": 4}
    gemm_cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_KW": 2, "GROUP_M": 2, "num_warps": 4}
    failures = []
    start = time.time()
    cases = [(40, 100, "tensor", 0, torch.float32, False), (33, 200, "channel", 0, torch.float16, True),
             (17, 256, "group", 64, torch.float32, True)]
    for n, k, gran, group, dtype, with_bias in cases:
        w_q, scale = absmean_quantize(torch.randn(n, k), gran, group)
        packed = pack_ternary(w_q)
        words = k4_to_i2w(packed, k)
        bias = torch.randn(n).to(dtype) if with_bias else None
        tol = 1e-5 if dtype == torch.float32 else 1e-3
        for r in (1, 16):
            # factors in the compute dtype; B scaled so the side path is ~ the base output's size
            lora_a = (torch.randn(r, k) / k**0.5).to(dtype)
            lora_b = (torch.randn(n, r) * (3.0 / r**0.5)).to(dtype)
            lora = {"lora_A": lora_a, "lora_B": lora_b}
            for m in (1, 3, 17):
                x = torch.randn(m, k).to(dtype)
                delta = (x.double() @ lora_a.double().t()) @ lora_b.double().t()
                bm = max(1, 1 << (m - 1).bit_length())
                runs = [("gemm_a8", 8, ternary_gemm, {"act_bits": 8, "config": gemm_cfg})]
                if dtype != torch.float32:  # IEEE float32 tl.dot is not in the interpreter's numpy path
                    runs.append(("gemm_a16", 16, ternary_gemm, {"act_bits": 16, "config": gemm_cfg}))
                if gran != "group" and m == 17:
                    runs.append(("gemm_decoded_a8", 8, ternary_gemm_decoded, {"act_bits": 8}))
                    if dtype != torch.float32:
                        runs.append(("gemm_decoded_a16", 16, ternary_gemm_decoded, {"act_bits": 16}))
                if m <= 16:
                    runs += [("gemv_a8_fused", 8, ternary_gemv_a8,
                              {"fused": True, "config": {**gemv_cfg, "BLOCK_M": bm}}),
                             ("gemv_a8", 8, ternary_gemv_a8, {"fused": False, "config": {**gemv_cfg, "BLOCK_M": bm}}),
                             ("gemv_a16", 16, ternary_gemv_a16,
                              {"config": {**gemv_cfg, "BLOCK_M": bm, "BLOCK_KW": 8}})]
                for name, bits, kernel, kwargs in runs:
                    ref = _reference64(x, packed, scale, k, bits, bias) + delta
                    y = kernel(x, words, scale, k, bias=bias, **kwargs, **lora)
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    # the side path must matter: leaving it out would fail the tolerance 100-fold
                    weight = (delta.norm() / ref.norm()).item()
                    ok = y.shape == (m, n) and y.dtype == dtype and err < tol and weight > 100 * tol
                    print(f"lora {name:16s} {n}x{k} {gran:7s} r={r:2d} m={m:2d} {str(dtype)[6:]:8s} "
                          f"rel.err {err:.2e} (lora share {weight:.2f}) {'ok' if ok else 'FAIL'}")
                    if not ok:
                        failures.append(f"lora {name} {n}x{k} {gran} r={r} m={m}: {err:.2e}")
    # the op (3-D input, dispatch) and BitLinear on the triton backend: the side path is fused, not added twice
    n, k, r = 48, 160, 8
    w_q, scale = absmean_quantize(torch.randn(n, k), "channel", 0)
    packed = pack_ternary(w_q)
    lora_args = (torch.randn(2, 3, k).half(), k4_to_i2w(packed, k), scale, k, 8, None,
                 torch.randn(r, k).half(), torch.randn(n, r).half())
    torch.library.opcheck(torch.ops.bitengine.ternary_linear.default, lora_args,
                          test_utils=("test_schema", "test_faketensor"))
    for act_bits in (8, 16):
        layer = BitLinear(k, n, act_bits=act_bits, scale_shape=(n,), bias=True, dtype=torch.float16)
        layer.weight_packed.copy_(packed)
        layer.weight_scale.copy_(scale)
        layer.bias.copy_(torch.randn(n))
        layer.prepare(backends.get("triton"))  # the kernels run on CPU tensors under the interpreter
        layer.lora_A = (torch.randn(r, k) / k**0.5).half()
        layer.lora_B = (torch.randn(n, r) / r**0.5).half()
        fuses = layer.backend.fuses_adapter(layer)
        for m in (1, 5):
            x = torch.randn(1, m, k).half()
            ref = _reference64(x[0], packed, scale, k, act_bits, layer.bias) + (
                x[0].double() @ layer.lora_A.double().t()) @ layer.lora_B.double().t()
            y = layer(x)
            err = ((y[0].double() - ref).norm() / ref.norm()).item()
            ok = fuses and y.shape == (1, m, n) and err < 1e-3
            print(f"lora BitLinear A{act_bits} m={m} fused={fuses} rel.err {err:.2e} {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(f"lora BitLinear A{act_bits} m={m}: fused={fuses} {err:.2e}")
        layer.lora_A_scale = torch.ones(r)  # int8-style factors: not fused, BitLinear adds them eagerly
        if layer.backend.fuses_adapter(layer):
            failures.append("fuses_adapter True for int8 factors")
    print(f"{time.time() - start:.1f} s; failures: {failures}")
    return 1 if failures else 0


def _int8_main() -> int:
    """int8_gemv / int8_gemm / bitengine::int8_linear against float64 (x @ W_q^T) * scale + bias."""
    import time

    import torch

    assert os.environ.get("TRITON_INTERPRET") == "1"
    _patch_interpreter_index()
    from bitengine.int8_head import Int8Linear
    from bitengine.kernels.int8_linear import int8_gemm, int8_gemv, int8_linear_reference

    torch.manual_seed(2)
    gemm_cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4}
    failures = []
    start = time.time()
    for n, k, with_bias in [(37, 100, True), (64, 256, False), (130, 33, True)]:
        head = Int8Linear(torch.randn(n, k), torch.randn(n) if with_bias else None)  # K padded to 32 with zeros
        w, s, b = head.weight_int8, head.weight_scale, head.bias
        # the interpreter has no bfloat16 matmul (it multiplies the raw bits): bf16 GEMM is left to the GPU tests
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
            for m in (1, 3, 17):
                x = torch.randn(m, k).to(dtype)
                ref = (x.double() @ w[:, :k].double().t()) * s.double()
                ref = ref if b is None else ref + b.double()
                runs = [("gemv", int8_gemv, None)] if m <= 16 else []
                if dtype != torch.bfloat16:
                    runs.append(("gemm", int8_gemm, gemm_cfg))
                    runs.append(("op", lambda *a, config=None: torch.ops.bitengine.int8_linear(*a), None))
                runs.append(("reference", lambda *a, config=None: int8_linear_reference(*a), None))
                for name, fn, cfg in runs:
                    y = fn(x, w, s, b, k, config=cfg)
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    ok = y.shape == (m, n) and y.dtype == dtype and err < tol
                    print(f"int8 {name:9s} {n}x{k} m={m:2d} {str(dtype)[6:]:8s} rel.err {err:.2e} {'ok' if ok else 'FAIL'}")
                    if not ok:
                        failures.append(f"int8 {name} {n}x{k} m={m} {dtype}: {err:.2e}")
    print(f"{time.time() - start:.1f} s; failures: {failures}")
    return 1 if failures else 0


def _int4_main() -> int:
    """int4_gemm / bitengine::int4_linear (the int4 head's Triton GEMM, any M) against int4_head's float64
    reference."""
    import time

    import torch

    assert os.environ.get("TRITON_INTERPRET") == "1"
    _patch_interpreter_index()
    from bitengine.int4_head import Int4Linear, int4_linear_reference
    from bitengine.kernels.int4_linear import int4_gemm

    torch.manual_seed(3)
    failures = []
    start = time.time()
    for n, k, with_bias in [(37, 200, True), (64, 128, False), (130, 300, True)]:
        head = Int4Linear(torch.randn(n, k) * 0.05, torch.randn(n) if with_bias else None)  # K padded to 128
        w, s, b = head.weight_int4, head.weight_scale, head.bias
        for dtype in (torch.float32, torch.float16):  # no bf16: see the int8 part
            tol = {torch.float32: 1e-5, torch.float16: 1e-3}[dtype]
            for m in (1, 3, 17):
                x = torch.randn(m, k).to(dtype)
                ref = int4_linear_reference(x.double(), w, s, b, k)
                runs = [("gemm", int4_gemm), ("op", lambda *a: torch.ops.bitengine.int4_linear(*a))]
                for name, fn in runs:
                    y = fn(x, w, s, b, k)
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    ok = y.shape == (m, n) and y.dtype == dtype and err < tol
                    print(f"int4 {name:4s} {n}x{k} m={m:2d} {str(dtype)[6:]:8s} rel.err {err:.2e} {'ok' if ok else 'FAIL'}")
                    if not ok:
                        failures.append(f"int4 {name} {n}x{k} m={m} {dtype}: {err:.2e}")
    print(f"{time.time() - start:.1f} s; failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    part = sys.argv[1] if len(sys.argv) > 1 else "base"
    sys.exit({"base": _main, "lora": _lora_main, "int8": _int8_main, "int4": _int4_main}[part]())
