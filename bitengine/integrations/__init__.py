"""Bridges to other stacks: `integrations.transformers.to_bitengine` (transformers models on bitengine
kernels). The GGUF writer for llama.cpp lives in formats/gguf_export.py; the server in server/."""
