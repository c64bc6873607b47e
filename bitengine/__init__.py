"""bitengine: an inference engine for ternary (BitNet b1.58) LLMs.

Public API: `load`, `convert`, `__version__`; `model.generate(...)` on a loaded model.
"""

__version__ = "0.1.0"

from .convert import convert  # noqa: E402  (after __version__, which convert records)
from .loader import load  # noqa: E402

__all__ = ["convert", "load", "__version__"]
