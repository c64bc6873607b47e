"""Backend registry: which implementation runs a BitLinear's ternary matmul.

A backend is chosen per model at load time by device and an explicit setting (argument
`backend=` or the environment variable BITENGINE_BACKEND), never by tensor values:
  - "auto" (default): the first available of the device's preference list below;
  - "reference": plain PyTorch (unpack + F.linear), everywhere;
  - "cpu": the C++ kernels in csrc/cpu (bitengine._C_cpu);
  - "triton": Triton kernels on CUDA; "cuda": the CUDA C++ kernels (csrc/cuda).
The active backend and the reason for it are logged once.

Backend protocol (each module in this package registers one instance):
    name: str
    unavailable_reason(device) -> str | None   None when it can run on that device
    prepare(layer) -> None     repack layer.weight_packed (layout k4) into the kernel's layout, stored on
                               the layer as non-persistent buffers; the on-disk format is untouched
    linear(x, layer) -> Tensor the W1.58 linear, same numbers as reference.ternary_linear_reference;
                               plus the layer's LoRA side path (nn._AdapterPath) when fuses_adapter(layer)
    fuses_adapter(layer) -> bool  True when linear() computes the side path itself (in the kernel's
                               epilogue); otherwise BitLinear adds it with two eager matmuls
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

log = logging.getLogger("bitengine")

_REGISTRY: dict = {}
# Preference per device type; modules are imported lazily so a missing extension never breaks import.
_PREFERENCE = {"cuda": ["cuda", "triton", "reference"], "cpu": ["cpu", "reference"]}
_MODULES = {"reference": "reference", "cpu": "cpu", "triton": "triton", "cuda": "cuda"}
_LOGGED: set = set()


def register(backend) -> None:
    _REGISTRY[backend.name] = backend


def get(name: str):
    """The backend object called `name` (importing its module on first use)."""
    if name not in _REGISTRY:
        if name not in _MODULES:
            raise ValueError(f"unknown backend {name!r}; expected one of auto, {', '.join(_MODULES)}")
        try:
            importlib.import_module(f"{__name__}.{_MODULES[name]}")
        except ImportError as e:  # the module itself is optional; report why
            raise RuntimeError(f"backend {name!r} cannot be imported: {e}") from e
    return _REGISTRY[name]


def availability(device: torch.device | str) -> dict[str, str | None]:
    """{backend: None if usable on device else the reason it is not}."""
    device = torch.device(device)
    out = {}
    for name in _MODULES:
        try:
            out[name] = get(name).unavailable_reason(device)
        except RuntimeError as e:
            out[name] = str(e)
    return out


def select(device: torch.device | str, requested: str | None = None):
    """Pick the backend for a device. An explicit request that cannot run raises ValueError."""
    device = torch.device(device)
    requested = requested or os.environ.get("BITENGINE_BACKEND", "auto")
    if requested != "auto":
        backend = get(requested)
        reason = backend.unavailable_reason(device)
        if reason:
            raise ValueError(f"backend {requested!r} cannot run on {device}: {reason}")
        _log_once(device, backend.name, "requested")
        return backend
    skipped = []
    for name in _PREFERENCE.get(device.type, ["reference"]):
        try:
            backend = get(name)
            reason = backend.unavailable_reason(device)
        except RuntimeError as e:
            reason = str(e)
        if reason is None:
            why = "auto" + (f" (skipped {'; '.join(skipped)})" if skipped else "")
            _log_once(device, name, why)
            return backend
        skipped.append(f"{name}: {reason}")
    raise RuntimeError(f"no backend can run on {device}: {'; '.join(skipped)}")


def _log_once(device, name, why) -> None:
    key = (str(device), name)
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("bitengine backend on %s: %s (%s)", device, name, why)
