"""The "cpu" backend: C++ kernels from csrc/cpu (bitengine._C_cpu), AVX2 or portable scalar.

What it runs: W1.58A8 (per-token int8 activations quantized inside the kernel, integer sums) and
W1.58A16 (float activations, fp32 sums), scale per tensor / channel / group, optional bias,
x float32 / bfloat16 / float16 (output in x's dtype), and the layer's LoRA side path
y += (x @ A^T) @ B^T fused into the kernel's epilogue in fp32 (factors float32 / float16 /
bfloat16, or int8 with their scales). prepare() repacks the on-disk k4 layout
into the kernels' i256 layout (csrc/cpu/kernels.h) as a non-persistent buffer `weight_cpu`.

Settings (read at import; the functions below change them at run time):
  BITENGINE_CPU_ISA      auto | scalar | avx2   which SIMD path (auto: the best this CPU has)
  BITENGINE_CPU_KERNEL   dot | add   "dot" (default, fewer instructions per weight): integer dot
                         products on the codes (maddubs / FMA) with a sum(x) correction;
                         "add": multiplication-free (sign/select + byte sums; blends for A16)
  BITENGINE_NUM_THREADS  threads for the kernels (default: torch.get_num_threads())
  BITENGINE_CPU_FAST_DECODE  1 (default) | 0: generate() and the server run the decode step's layers
                         in C++ (cpu_decode.py, csrc/cpu/decode_layer.cpp) when the model qualifies
  OMP_WAIT_POLICY=passive  (libgomp, read at startup) on a machine where other processes keep cores
                         busy: with the default spin-waiting every kernel call can wait a time slice
                         for a descheduled thread (measured 20-30x slower decode steps); passive costs
                         a wake-up per call on a quiet machine. The C++ decode step does not depend on
                         it (its workers spin only within a step and are never waited for)

The ops are torch.library ops (`torch.ops.bitengine.*_cpu`, schemas in csrc/cpu/ternary_ops.cpp)
with fake implementations here, so torch.compile traces through them.
"""

from __future__ import annotations

import logging
import os

import torch

from . import register

log = logging.getLogger("bitengine")

try:
    from .. import _C_cpu as _C  # registers torch.ops.bitengine.*_cpu
    _IMPORT_ERROR = None
except ImportError as e:  # not built (no compiler) or built for another torch
    _C = None
    _IMPORT_ERROR = f"bitengine._C_cpu is not built ({e}); run `pip install --no-build-isolation -e .`"

KERNELS = {"add": 0, "dot": 1}
# LoRA factor dtypes the kernel epilogue takes (int8 with lora_A_scale / lora_B_scale)
_FACTOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)
_state = {"kernel": os.environ.get("BITENGINE_CPU_KERNEL", "dot"), "logged": False}
if _state["kernel"] not in KERNELS:
    raise ValueError(f"BITENGINE_CPU_KERNEL={_state['kernel']!r}: expected one of {sorted(KERNELS)}")


def set_isa(name: str) -> None:
    """Force the SIMD path: 'auto', 'scalar' or 'avx2' (ValueError if this CPU lacks it)."""
    try:
        _require().set_isa(name)
    except RuntimeError as e:
        raise ValueError(str(e)) from e


def isa() -> str:
    """The ISA the kernels use now."""
    return _require().isa()


def available_isas() -> list[str]:
    """ISAs this CPU can run, scalar first."""
    return list(_require().available_isas())


def set_kernel(name: str) -> None:
    """'add' (multiplication-free) or 'dot' (integer dot products on the codes)."""
    if name not in KERNELS:
        raise ValueError(f"CPU kernel {name!r}: expected one of {sorted(KERNELS)}")
    _state["kernel"] = name


def kernel() -> str:
    return _state["kernel"]


def set_num_threads(n: int) -> None:
    """Threads for the CPU kernels; 0 follows torch.get_num_threads()."""
    _require().set_num_threads(int(n))


def _require():
    if _C is None:
        raise RuntimeError(_IMPORT_ERROR)
    return _C


if _C is not None and os.environ.get("BITENGINE_NUM_THREADS"):
    set_num_threads(int(os.environ["BITENGINE_NUM_THREADS"]))


def describe() -> str:
    """One line: ISA, kernel variant and thread count (what `bitengine info` shows)."""
    if _C is None:
        return f"unavailable: {_IMPORT_ERROR}"
    return f"isa={_C.isa()} (available: {', '.join(_C.available_isas())}), kernel={kernel()}, threads={_C.num_threads()}"


# ---- fake (meta) implementations for torch.compile -------------------------------------------
if _C is not None:

    @torch.library.register_fake("bitengine::ternary_repack_cpu")
    def _(packed, in_features):
        return packed.new_empty((packed.shape[0] + 3) // 4 * 4, (in_features + 255) // 256 * 64)

    @torch.library.register_fake("bitengine::ternary_linear_cpu")
    def _(x, w, scale, bias, in_features, out_features, act_bits, variant, lora_A=None, lora_B=None,
          lora_A_scale=None, lora_B_scale=None):
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("bitengine::ternary_accumulate_cpu")
    def _(x_q, w, in_features, out_features, variant):
        return x_q.new_empty(x_q.shape[0], out_features, dtype=torch.int32)

    @torch.library.register_fake("bitengine::large_pages_copy_cpu")
    def _(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    @torch.library.register_fake("bitengine::dense_linear_cpu")
    def _(x, w, w_scale, bias, in_features):
        return x.new_empty(*x.shape[:-1], w.shape[0])

    @torch.library.register_fake("bitengine::int4_linear_cpu")
    def _(x, w, scale, bias, in_features):
        return x.new_empty(*x.shape[:-1], w.shape[0])


class CpuBackend:
    name = "cpu"

    def unavailable_reason(self, device: torch.device) -> str | None:
        if _C is None:
            return _IMPORT_ERROR
        if torch.device(device).type != "cpu":
            return f"the cpu backend runs on CPU tensors, not {device}"
        return None

    def prepare(self, layer) -> None:
        """Repack layer.weight_packed (k4) into `layer.weight_cpu` (i256, non-persistent)."""
        packed = layer.weight_packed
        if packed.device.type != "cpu":
            raise ValueError(f"cpu backend: weight_packed is on {packed.device}, expected cpu")
        layer.register_buffer("weight_cpu", torch.ops.bitengine.ternary_repack_cpu(packed, layer.in_features),
                              persistent=False)
        if layer.weight_scale.dtype != torch.float32 or not layer.weight_scale.is_contiguous():
            layer.weight_scale = layer.weight_scale.float().contiguous()
        if not _state["logged"]:
            _state["logged"] = True
            log.info("bitengine cpu kernels: %s", describe())

    def fuses_adapter(self, layer) -> bool:
        """True when the kernel takes the layer's LoRA factors (float32/16-bit, or int8 with both scales)."""
        a, b = layer.lora_A, layer.lora_B
        if a is None or b is None or a.dtype != b.dtype or a.dtype not in _FACTOR_DTYPES:
            return False
        if a.device.type != "cpu" or b.device.type != "cpu":
            return False
        return (layer.lora_A_scale is not None) == (a.dtype == torch.int8)

    def linear(self, x: torch.Tensor, layer) -> torch.Tensor:
        lora = (layer.lora_A, layer.lora_B, layer.lora_A_scale, layer.lora_B_scale) if self.fuses_adapter(layer) \
            else (None, None, None, None)
        return torch.ops.bitengine.ternary_linear_cpu(
            x, layer.weight_cpu, layer.weight_scale, layer.bias, layer.in_features, layer.out_features,
            layer.act_bits, KERNELS[_state["kernel"]], *lora)


register(CpuBackend())
