"""Every Triton kernel in bitengine.kernels reads only globals the GPU compiler accepts.

The interpreter (the CPU tests' TRITON_INTERPRET=1) runs kernels as Python and lets them read any module global, but
the compiler refuses a plain int or float global ("Cannot access global variable ... from within @jit'ed function"):
the int4 head's GEMM read `GROUP` that way and passed every CPU test, then failed on the GPU. This test walks each
@triton.jit function's code and checks the globals it names: modules, functions (jit or not), tl.constexpr values."""

from __future__ import annotations

import importlib
import pkgutil
import types

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


def _jit_functions():
    import bitengine.kernels as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"bitengine.kernels.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, triton.runtime.jit.JITFunction) and obj.fn.__module__ == mod.__name__:
                yield f"{mod.__name__}.{name}", obj


def _code_names(code: types.CodeType):
    yield from code.co_names
    for const in code.co_consts:  # nested code (comprehensions, inner functions)
        if isinstance(const, types.CodeType):
            yield from _code_names(const)


def test_kernels_read_only_compilable_globals():
    kernels = list(_jit_functions())
    assert len(kernels) > 10  # the walk found the package's kernels
    bad = []
    for qualname, jit in kernels:
        env = jit.fn.__globals__
        for name in set(_code_names(jit.fn.__code__)):
            if name not in env:
                continue  # an attribute (tl.arange) or a builtin
            value = env[name]
            if isinstance(value, (types.ModuleType, tl.constexpr)) or callable(value):
                continue
            bad.append(f"{qualname} reads global {name} = {value!r}")
    assert not bad, "; ".join(bad)
