"""Programmatic dependent launch (Hopper and later) for the Triton kernels.

A kernel launched with `launch_pdl` may start while the kernel before it in the stream is still finishing: its
programs get scheduled and run their prologue during the other's tail, then wait (`gdc_wait`) for that grid's
completion and memory before their first load, and let the next kernel launch at once (`gdc_launch_dependents`).
The wait is at the very top because everything these kernels read, or the buffers they write (the caching
allocator hands a freed scratch to the next call), may belong to the kernel before. BITENGINE_PDL=0 turns it off.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# the Triton interpreter (no PDL there; read here, the module with no imports of its own, and re-exported by gemv)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ENABLED = os.environ.get("BITENGINE_PDL", "1") != "0"


@triton.jit
def wait_for_previous_grid(PDL: tl.constexpr):
    """The top of a kernel launched with pdl_launch's options (a no-op when PDL is False)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def pdl_launch(device: torch.device, enabled: bool = True) -> dict:
    """Launch options for programmatic dependent launch where it applies (enabled, BITENGINE_PDL not 0, a CUDA
    device of compute capability 9+, not the Triton interpreter), else none: {"PDL": True, "launch_pdl": True} or
    {}."""
    if not (enabled and ENABLED) or device.type != "cuda" or INTERPRET:
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"PDL": True, "launch_pdl": True} if _capability(index) >= 9 else {}


@functools.cache
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]
