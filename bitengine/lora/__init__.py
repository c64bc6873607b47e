"""LoRA / QLoRA adapters (PEFT format) for bitengine models: read, apply (fused or merged), stack, switch, remove.

    model = bitengine.load(ckpt, adapters=["my-lora", ("other-lora", 0.5)], adapter_mode="fused")
    set_adapters(model, ["third-lora"]); remove_adapters(model)
    convert(src, dst, adapters=["my-lora"])   # merged into the 16-bit weights before quantizing

peft_format.py reads and validates adapters, apply.py changes a loaded model, merge.py holds the
merge arithmetic and the convert hook. Not here: training, and PEFT methods other than LoRA.
"""

from .apply import (
           AdapterState,
           apply_adapters,
           int8_rows,
           linear_layers,
           remove_adapters,
           set_adapters,
)
from .merge import delta_weight, merge_hook, merge_ternary
from .peft_format import (
           AdapterError,
           LoraAdapter,
           normalize_adapters,
           parse_adapter_arg,
           read_adapter,
           resolve,
)

__all__ = ["AdapterError", "AdapterState", "LoraAdapter", "apply_adapters", "delta_weight", "int8_rows",
           "linear_layers", "merge_hook", "merge_ternary", "normalize_adapters", "parse_adapter_arg",
           "read_adapter", "remove_adapters", "resolve", "set_adapters"]
