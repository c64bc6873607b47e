"""bench/bench_e2e.py on the CPU, at toy sizes: the variant modifiers set the engine's switches they name (the
GPU A/B rows depend on them: '+mma32' is the batch-64 A/B of the eighth part in bench/GPU_LOG.md), and a random-weight
model builds and runs a forward pass (DEVICE = "cpu": the reference backend)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_e2e  # noqa: E402

from bitengine.backends import cuda as cuda_backend  # noqa: E402
from bitengine.config import ModelConfig  # noqa: E402


@pytest.fixture
def restore_flags():
    """The switches set_variant_flags writes, put back as they were (their defaults may come from the environment)."""
    from bitengine.kernels import decode_attention

    saved = [(mod, name, getattr(mod, name)) for mod, names in (
        (cuda_backend, ("PDL", "FUSE_NORM_RESIDUAL", "COMBO_KERNELS", "FUSE_GATED", "MAX_MMA_M", "GEMV_VERSION")),
        (decode_attention, ("ENABLED", "VARIANT", "PDL")), (bench_e2e, ("TORCH_ARGMAX",))) for name in names]
    yield
    for mod, name, value in saved:
        setattr(mod, name, value)


def test_variant_flags(restore_flags):
    bench_e2e.set_variant_flags("a8+compile+mma32+nopdl")
    assert cuda_backend.MAX_MMA_M == 32 and cuda_backend.PDL is False
    bench_e2e.set_variant_flags("a8+mma16")
    assert cuda_backend.MAX_MMA_M == 16 and cuda_backend.PDL is True
    bench_e2e.set_variant_flags("a8+compile")  # the backend's own setting again
    assert cuda_backend.MAX_MMA_M == bench_e2e.MAX_MMA_M == 64
    bench_e2e.set_variant_flags("a8+compile+gemv2")  # the one-token GEMV's version 2, then the default again
    assert cuda_backend.GEMV_VERSION == 2
    bench_e2e.set_variant_flags("a8+compile")
    assert cuda_backend.GEMV_VERSION == bench_e2e.GEMV_VERSION


@pytest.mark.parametrize("variant", ["a8", "fp16"])
def test_build_and_forward_on_cpu(monkeypatch, variant):
    monkeypatch.setattr(bench_e2e, "DEVICE", "cpu")
    cfg = ModelConfig(arch="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    model = bench_e2e.build(cfg, variant, max_seq=16)
    assert model.backend_name == ("reference" if variant == "a8" else "dense")
    with torch.no_grad():
        logits = model(torch.randint(0, 96, (2, 5)))
    assert logits.shape == (2, 5, 96) and torch.isfinite(logits.float()).all()


def test_prefill_rows_report_the_spread():
    """A prefill row is the median of PREFILL_REPS timed calls after the warm-ups, with min and max beside it, the
    host time of the timed calls and the compiles among them, and the markdown table shows them (single eager
    forwards varied 1.7x between rows of one run)."""
    calls = []
    times = iter([5.0, 1.0, 3.0, 2.0, 4.0] * 4)
    got, host, compiles = bench_e2e._prefill_times(lambda: calls.append(1), lambda fn: (fn(), next(times))[1])
    assert len(calls) == bench_e2e.PREFILL_WARMUP + bench_e2e.PREFILL_REPS == len(got) + bench_e2e.PREFILL_WARMUP
    assert len(host) == len(got) and all(h >= 0 for h in host) and compiles == 0
    row = bench_e2e._prefill_row(512, [5.0, 1.0, 3.0], [2.0, 0.5, 1.0], 1)
    row = {"model": "m", "variant": "a8", "backend": "cpu", **row}
    assert (row["prefill_ms"], row["prefill_ms_min"], row["prefill_ms_max"], row["prefill_reps"]) == (3.0, 1.0, 5.0, 3)
    assert (row["prefill_host_ms"], row["prefill_compiles_timed"]) == (1.0, 1)
    assert row["prefill_tokens_per_s"] == pytest.approx(512 / 3.0 * 1000)
    md = bench_e2e.markdown({"card": "c", "date": "d", "torch": "t", "cuda": "x", "git_commit": "abc"}, [row])
    assert "| m | a8 | cpu | 512 | 3.0 | 1.0 - 5.0 (3) | 1.0 | 1 | 170667 |" in md


def test_prefill_times_count_compiles_inside_the_timed_calls():
    """A function torch.compile first sees during the timed calls (not the warm-ups) is counted."""
    seen = []

    def fn():
        seen.append(1)
        if len(seen) == bench_e2e.PREFILL_WARMUP + 1:  # the first timed call compiles a new function
            torch.compile(lambda x: x + 1, backend="eager")(torch.ones(2))

    _, _, compiles = bench_e2e._prefill_times(fn, lambda f: (f(), 1.0)[1])
    assert compiles == 1


def test_cuda_and_host_timed_reports_both(monkeypatch):
    """Time to first token keeps the host's time beside the GPU's (a host-bound first token shows as host ~ GPU)."""
    import time

    monkeypatch.setattr(bench_e2e, "_cuda_timed", lambda fn: (fn(), 7.0)[1])
    gpu, host = bench_e2e._cuda_and_host_timed(lambda: time.sleep(0.01))
    assert gpu == 7.0 and 9.0 <= host < 1000
