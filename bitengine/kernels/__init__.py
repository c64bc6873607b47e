"""Triton kernels for ternary linear layers on CUDA GPUs (the "triton" backend; see backends/triton.py).

layout.py     i2w: the in-memory weight layout the kernels read (made from on-disk k4 at prepare time)
act_quant.py  per-token int8 activation quantization (the A8 front end)
gemv.py       decode GEMV, M <= 16: dp4a on 2-bit codes (A8) or exponent-trick FMA (A16)
gemm.py       prefill GEMM, M > 16: codes decoded in registers, int8 / fp16 tensor cores
gemm_decoded.py  large-M GEMM over a decoded int8 / fp16 scratch copy of the weight (autotuned)
int8_linear.py   the int8 head (per-row int8 weights x 16-bit activations): GEMV and tensor-core GEMM
tiling.py     how programs map to output tiles (the GEMVs share one order, the tensor-core GEMMs another)
decode_attention.py  one-token attention over the KV cache, split along the slots (the CUDA decode step)
argmax.py     greedy decoding's argmax over the vocabulary, split along the row (torch's uses one SM per row)
ops.py        torch.library custom ops (bitengine::ternary_linear, bitengine::decode_attention ...) with fake
              implementations
All ternary kernels take an optional LoRA side path (lora_A / lora_B) added in their epilogue.

Importing this package needs triton; nothing here is imported by bitengine unless a GPU backend is asked for or a
model runs on CUDA (CausalLM.forward registers the decode-attention op).
"""
