"""bitengine: an inference engine for ternary (BitNet b1.58) LLMs.

Public API: `load`, `convert`, `__version__`; `model.generate(...)` on a loaded model.
"""

__version__ = "0.1.0"


def load(path, device="cpu", backend=None, **kwargs):
    """Load a bitengine checkpoint folder; see bitengine.loader.load."""
    from .loader import load as _load

    return _load(path, device=device, backend=backend, **kwargs)


def convert(src, dst, **kwargs):
    """Convert a Llama-style / BitNet / GGUF checkpoint; see bitengine.convert.convert."""
    from .convert import convert as _convert

    return _convert(src, dst, **kwargs)
