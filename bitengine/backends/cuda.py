"""The "cuda" backend: the CUDA C++ kernels (csrc/cuda, bitengine._C_cuda) where they apply, the Triton
kernels everywhere else.

The C++ kernels cover W1.58A8 with per-tensor or per-channel scales (one fused launch: activation
quantization + matmul): the decode GEMV at M = 1 where it measured faster than Triton (N * K >= CUDA_MIN_NK), and
the tensor-core kernel for a few tokens (1 < M <= MAX_MMA_M: batched decode, short prompts) at every size.
Other calls (small layers at M = 1, larger M, A16, group scales) go to the Triton op; the split is by
shape, dtype and layer settings only. Both read the same i2w weight buffer. Layers carrying LoRA adapters
with float factors always take the Triton op, whose epilogue adds the side path (the C++ GEMV has none).
At decode, the C++ kernel also takes the layer's input RMSNorm (prologue) and the residual add (epilogue):
`linear_fused`, called by BitLinear.forward when the model passes them; and the MLP's gating (epilogue) on gate/up
layers fused with interleaved rows: `linear_gated`, called by fuse.FusedLinear.gated.
"""

from __future__ import annotations

import os

import torch

from ..nn import RMSNorm
from . import register
from .triton import TritonBackend, prepare_i2w, reference_linear

try:
    from .. import _C_cuda
    _IMPORT_ERROR = None
except ImportError as e:  # the package works without the extension
    _C_cuda = None
    _IMPORT_ERROR = e

MAX_CUDA_K = 200 * 1024  # shared-memory bound of the C++ kernel: 16 bytes per 16 inputs
# M > 1 (csrc/cuda/ternary_mma_kernels.cuh, the tensor-core kernel for a few tokens): the backend sends it up to
# MAX_MMA_M tokens (32 per launch, or 16 / 8 where that many tokens' int8 rows do not fit in shared memory; the op runs
# more as several launches, each reading the weights again), in_features up to MAX_MMA_K (8 tokens' rows in 227 KB;
# bindings.cpp mma_fits). Up to 16 until the tokens were quantized once in front instead of in every block:
# bench/results/gpu_e2e_mma_front_3e90439_NVIDIA_H200_2026-12-03 (A/B in one run, 32 tokens as two launches of 16
# against Triton's GEMM): batch 32 7B 3871 -> 5459 tok/s, BitNet-2B 6445 -> 9105. 64: in gpu_kernels_front1_1dd5224_
# NVIDIA_H200_2026-12-03 the kernel (cuda_a8_mma) beats Triton's (triton_a8) at M = 48 on all six 7B / BitNet-2B shapes
# (7B down 57 vs 131 us, gate/up 59 vs 77) and at M = 64 on five, level on 7B qkv (48.8 vs 48.7 us); end to end
# (gpu_e2e_mma64_0dfcd62_NVIDIA_H200_2026-12-03, A/B in one run) 7B batch 64 5580 -> 6304 tok/s against 32.
MAX_MMA_M = 64
MAX_MMA_K = 27904
# One token goes to the C++ GEMV from N * K >= CUDA_MIN_NK, to the Triton GEMV below. On 2026-11-28
# (gpu_kernels_NVIDIA_H200_2026-11-28) the C++ kernel lost at 640 x 2560 (3.40 vs 3.25 us); since the kernel work of
# 2026-12-02/03 it wins there in every run (gpu_kernels_v3_preload 2.75 vs 3.40 us, gpu_kernels_66d0dec 2.40 vs
# 3.25), so the bound sits just under that shape (1.6M). Smaller shapes (SmolLM2's 576-wide layers) are unmeasured.
CUDA_MIN_NK = 1_500_000


# Kernel version (csrc/cuda/ternary_gemv_kernels.cuh): 3 (default) = 8 lanes per row and 4 rows per warp tile where
# a row has at most 40 16-byte vectors (K <= 2560), else version 2; 2 = two weight tiles in flight per warp up to
# K = 4096 (a row per warp), version 1 beyond; 1 = version 1 everywhere (one row group of register loads in flight per
# warp). BITENGINE_CUDA_GEMV=2 or 1 forces those (for comparison); all give the same bits. Version 3 became the
# default on 2026-12-03: BitNet-2B-4T batch 1 1230 vs 1170 tok/s (int8 head, one run; bench_e2e '+gemv2' is the
# previous default); models with K > 2560 run as before.
GEMV_VERSION = int(os.environ.get("BITENGINE_CUDA_GEMV", "3"))


_CAPABILITY: dict[int, tuple[int, int]] = {}  # per device index (asked once: this runs per GEMV call)


def _capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


# Programmatic dependent launch on Hopper and newer (BITENGINE_PDL=0 turns it off): the C++ GEMV starts while
# the kernel before it finishes (its first weight loads overlap that kernel's tail and the launch gap) and
# compiled layers' Triton kernels do the same (inductor's triton.enable_pdl). Read at each call / compile.
PDL = os.environ.get("BITENGINE_PDL", "1") != "0"
# The decode step's input norms and residual adds in the C++ GEMV (linear_fused); BITENGINE_FUSE_NORM=0 (or setting
# this to False before a step is traced or captured) leaves them to separate kernels, for A/B runs.
FUSE_NORM_RESIDUAL = os.environ.get("BITENGINE_FUSE_NORM", "1") != "0"
# The MLP's gating (act(gate) * up) in the gate/up GEMV's epilogue, on gate/up layers fused with interleaved rows
# (fuse.py; linear_gated); BITENGINE_FUSE_GATED=0 (or False here before a model is loaded) keeps the plain layout and
# a separate gating kernel, for A/B runs.
FUSE_GATED = os.environ.get("BITENGINE_FUSE_GATED", "1") != "0"
ACTS = {"silu": 1, "relu2": 2}  # the C++ GEMV's act codes (store_gated in csrc/cuda/gemv_common.cuh)


def pdl_supported(device: torch.device) -> bool:
    if not PDL or device.type != "cuda":
        return False
    return _capability(device)[0] >= 9


# Inductor's combo kernels (one launch for independent kernels, e.g. a decode layer's K and V cache writes), on by
# default where inductor has them (BITENGINE_COMBO_KERNELS=0 or bench_e2e's "+nocombo" turns them off): with the
# grouped decode attention, 7B batch 1 681 -> 711 tok/s, batch 8 1069 -> 1076 (gpu_e2e_v3_fuseact_combo_ab_NVIDIA_H200_
# 2026-12-02, fee83a9). Inductor still calls them experimental; the GPU model tests run with them.
COMBO_KERNELS = os.environ.get("BITENGINE_COMBO_KERNELS", "1") != "0"


def inductor_options(device: torch.device) -> dict:
    """torch.compile options for compiled layers on `device`: inductor's PDL codegen where it exists, and combo
    kernels unless COMBO_KERNELS is off (both read at compile time)."""
    import torch._inductor.config as inductor_config

    options = {}
    if pdl_supported(device) and hasattr(inductor_config.triton, "enable_pdl"):
        options["triton.enable_pdl"] = True
    if COMBO_KERNELS and device.type == "cuda" and hasattr(inductor_config, "combo_kernels"):
        options["combo_kernels"] = True
    return options


def rows_per_warp(n: int) -> int:
    """Version 1's rows per warp: fewer for short outputs so every SM gets blocks (version 2 shapes its tiles
    itself)."""
    return 1 if n <= 8192 else 2


_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_gemv_inputs(x, w, scale, in_features, bias=None, norm_weight=None, norm_eps=0.0, residual=None,
                      version=2, rows_per_warp=1, act=0) -> None:
    """Raise ValueError (one line: what is wrong) unless the C++ GEMV takes these inputs; the same rules as
    csrc/cuda/bindings.cpp, checked here first because on the GPU machine an exception thrown inside the extension
    (a failing TORCH_CHECK) crashed the process (bench/results/gpu_tests_NVIDIA_H200_2026-12-02.log). Shapes and
    dtypes first, the device last, so the rules can be tested on a machine without CUDA."""
    if not all(isinstance(t, torch.Tensor) for t in (x, w, scale)):
        raise ValueError("ternary_gemv_a8: x, w and scale must be tensors")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"ternary_gemv_a8: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] != in_features or not x.is_contiguous():
        raise ValueError(f"ternary_gemv_a8: x must be a contiguous [M, {in_features}] tensor, got {tuple(x.shape)}")
    m = x.shape[0]
    if m > 1 and not mma_takes(2, in_features, x.dtype):
        raise ValueError(f"ternary_gemv_a8: M > 1 needs in_features <= {MAX_MMA_K} and rows of x in whole 16-byte "
                         f"vectors, got in_features {in_features} in {x.dtype}")
    if (w.dtype != torch.int32 or w.dim() != 2 or w.stride(1) != 1 or w.shape[1] % 16 or
            w.shape[1] * 16 < in_features or w.stride(0) % 4):
        raise ValueError(f"ternary_gemv_a8: w must be i2w int32 [N, KW] with KW % 16 == 0 and KW * 16 >= "
                         f"in_features ({in_features}), got {w.dtype} {tuple(w.shape)}")
    if m > 1 and not _mma_fits(w.shape[1]):
        raise ValueError(f"ternary_gemv_a8: M > 1 needs w's rows in shared memory: KW {w.shape[1]} words is too wide")
    n = w.shape[0]
    if scale.dtype != torch.float32 or scale.numel() not in (1, n):
        raise ValueError(f"ternary_gemv_a8: scale must be float32 [1] or [N] (N = {n}), got {scale.dtype} "
                         f"{tuple(scale.shape)}")
    if (w.shape[1] + 127) // 128 * 128 * 16 > MAX_CUDA_K:
        raise ValueError(f"ternary_gemv_a8: in_features {in_features} too large for the CUDA GEMV (max {MAX_CUDA_K})")
    if version not in (1, 2, 3) or rows_per_warp not in (1, 2, 4):
        raise ValueError(f"ternary_gemv_a8: version must be 1, 2 or 3 and rows_per_warp 1, 2 or 4, got {version}, "
                         f"{rows_per_warp}")
    if not norm_eps >= 0:
        raise ValueError(f"ternary_gemv_a8: norm_eps must be >= 0, got {norm_eps}")
    if act not in (0, 1, 2) or (act and (w.shape[0] % 2 or residual is not None)):
        raise ValueError(f"ternary_gemv_a8: act must be 0, 1 (silu) or 2 (relu2), and a gating act needs an even N "
                         f"and no residual; got act {act!r}, N = {w.shape[0]}")
    vectors = (("bias", bias, n), ("norm_weight", norm_weight, in_features), ("residual", residual, m * n))
    for name, t, size in vectors:
        if t is not None and (t.numel() != size or t.dtype != x.dtype or not t.is_contiguous()):
            raise ValueError(f"ternary_gemv_a8: {name} must be a contiguous [{size}] tensor in x's dtype ({x.dtype}), "
                             f"got {t.dtype} {tuple(t.shape)}")
    tensors = [x, w, scale] + [t for _, t, _ in vectors if t is not None]
    if not all(t.is_cuda and t.device == x.device for t in tensors):
        raise ValueError(f"ternary_gemv_a8: every tensor must be on one CUDA device, got "
                         f"{sorted({str(t.device) for t in tensors})}")


def ternary_gemv_a8(x, w, scale, in_features, bias=None, norm_weight=None, norm_eps=0.0, residual=None, *,
                    act=0, version=2, rows_per_warp=1, pdl=False) -> torch.Tensor:
    """The C++ GEMV (bitengine._C_cuda.ternary_gemv_a8) behind check_gemv_inputs: use this, not the extension.
    x [M, K]; y [M, N] = residual + W1.58A8 linear(RMSNorm(x) * norm_weight, or x) + bias (each optional; residual
    [M, N] or its M * N elements); act 1 (SiLU) or 2 (squared ReLU): w's rows are interleaved gate, up pairs and
    y [M, N / 2] = act(gate) * up (fuse.py). M = 1: the GEMV, version 1, 2 or 3 (2: version 2 up to K = 4096, version 1
    beyond; 3: the lane-group kernel up to K = 2560, else as 2), rows_per_warp for version 1; M > 1: the tensor-core
    kernel (mma_takes; rows_per_warp unused), its tokens quantized once in front (versions 2 and 3) or inside every
    block (version 1, for comparison). pdl: programmatic
    dependent launch (sm_90+). Every version and setting gives the same bits, but for M > 1 with a norm_weight (the
    two versions add the sum of squares in other orders: the last bits may differ)."""
    if _C_cuda is None:
        raise RuntimeError(f"bitengine._C_cuda is not built ({_IMPORT_ERROR})")
    check_gemv_inputs(x, w, scale, in_features, bias, norm_weight, norm_eps, residual, version, rows_per_warp, act)
    return _C_cuda.ternary_gemv_a8(x, w, scale, in_features, bias, norm_weight, norm_eps, residual, act=act,
                                   version=version, rows_per_warp=rows_per_warp, pdl=pdl)


if _C_cuda is not None:
    @torch.library.custom_op("bitengine::ternary_gemv_cuda", mutates_args=())
    def ternary_gemv_cuda(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, in_features: int,
                          bias: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                          norm_eps: float = 0.0, residual: torch.Tensor | None = None, act: int = 0) -> torch.Tensor:
        """x: [M, K] fp16/bf16/fp32 (M = 1, or mma_takes); words: int32 [N, KW] (i2w); scale: float32 [1] | [N];
        bias: [N], residual: [M, N] and norm_weight: [K] in x's dtype, or None. Returns [M, N]: residual +
        linear(RMSNorm(x) * norm_weight) (the norm only with a norm_weight); with act 1 / 2 (ACTS) and interleaved
        gate/up rows, [M, N / 2] = act(gate) * up."""
        return ternary_gemv_a8(x.contiguous(), words, scale, in_features, bias, norm_weight, norm_eps,
                               None if residual is None else residual.reshape(-1).contiguous(), act=act,
                               version=GEMV_VERSION, rows_per_warp=rows_per_warp(words.shape[0]),
                               pdl=pdl_supported(x.device))

    @ternary_gemv_cuda.register_fake
    def _(x, words, scale, in_features, bias=None, norm_weight=None, norm_eps=0.0, residual=None, act=0):
        return x.new_empty(x.shape[0], words.shape[0] // 2 if act else words.shape[0])


def mma_takes(m: int, in_features: int, dtype: torch.dtype) -> bool:
    """Whether the C++ tensor-core kernel takes m > 1 tokens of in_features inputs: m <= MAX_MMA_M, in_features <=
    MAX_MMA_K, and each token's row of x in whole 16-byte vectors (the kernel's loads)."""
    return (1 < m <= MAX_MMA_M and in_features <= MAX_MMA_K and dtype in _X_DTYPES
            and in_features * dtype.itemsize % 16 == 0)


def _mma_fits(kw: int) -> bool:
    """Whether 8 tokens' int8 rows of a KW-word weight fit the tensor-core kernel's shared memory: bindings.cpp's
    mma_fits (the row size of ternary_mma_kernels.cuh's mma_row_bytes), checked here first on w itself, which may be
    wider than in_features needs."""
    return 8 * (((kw // 4 + 3) // 4 * 4 + 1) * 64) + 8192 <= 227 * 1024


def cuda_gemv_applies(x: torch.Tensor, layer) -> bool:
    """Shape/settings rule for the C++ kernels (never looks at tensor values): one token on the GEMV from N * K >=
    CUDA_MIN_NK, a few tokens (mma_takes) on the tensor-core kernel at every size."""
    m = x.numel() // x.shape[-1]
    k = layer.in_features
    return ((m == 1 and k * layer.out_features >= CUDA_MIN_NK and k <= MAX_CUDA_K) or mma_takes(m, k, x.dtype)) and (
        layer.act_bits == 8 and layer.weight_scale.dim() <= 1 and x.dtype in _X_DTYPES
        and (layer.bias is None or layer.bias.dtype == x.dtype))


class CudaBackend(TritonBackend):
    name = "cuda"

    @property
    def gates_interleaved(self) -> bool:
        """Whether fuse.py should interleave gate/up rows for linear_gated (read when layers are fused)."""
        return FUSE_GATED

    def unavailable_reason(self, device: torch.device) -> str | None:
        if _C_cuda is None:
            return f"extension bitengine._C_cuda not built ({_IMPORT_ERROR})"
        return super().unavailable_reason(device)

    def prepare(self, layer) -> None:
        prepare_i2w(layer)

    def linear(self, x: torch.Tensor, layer) -> torch.Tensor:
        if not layer._kernel_ok:
            return reference_linear(x, layer)
        # The C++ GEMV has no epilogue for the LoRA side path: a layer whose adapter the Triton op fuses
        # goes to the Triton op (int8 factors: fuses_adapter is False, BitLinear adds them eagerly).
        if cuda_gemv_applies(x, layer) and not self.fuses_adapter(layer):
            y = torch.ops.bitengine.ternary_gemv_cuda(x.reshape(-1, x.shape[-1]), layer.weight_i2w,
                                                      layer.weight_scale, layer.in_features, layer.bias)
            return y.reshape(*x.shape[:-1], -1)
        return super().linear(x, layer)

    def linear_fused(self, x: torch.Tensor, layer, norm, residual: torch.Tensor | None) -> torch.Tensor | None:
        """residual + linear(norm(x)) in one C++ GEMV (norm: an nn.RMSNorm or None; residual: x's shape with
        out_features last, or None), or None where that kernel does not take this call (see BitLinear.forward).
        Decided from shapes and dtypes only, so a traced or captured step takes one path."""
        if not (FUSE_NORM_RESIDUAL and layer._kernel_ok and cuda_gemv_applies(x, layer)
                and not self.fuses_adapter(layer)):
            return None
        if norm is not None and not _norm_fusable(norm, x, layer):
            return None
        if residual is not None and not (residual.dtype == x.dtype and residual.shape[:-1] == x.shape[:-1]
                                         and residual.shape[-1] == layer.out_features):
            return None
        return _gemv(x, layer, norm, residual)

    def linear_gated(self, x: torch.Tensor, layer, norm, act: str) -> torch.Tensor | None:
        """act(gate) * up of norm(x) (norm: an nn.RMSNorm or None) for a gate/up layer fused with interleaved rows
        (fuse.FusedLinear.gated), in one C++ GEMV: the gating in its epilogue, the norm in its prologue. None where
        that kernel does not take this call; decided from shapes, dtypes and settings only, as linear_fused."""
        if not (FUSE_GATED and act in ACTS and getattr(layer, "interleaved", False) and layer._kernel_ok
                and layer.lora_A is None and cuda_gemv_applies(x, layer)):
            return None
        if norm is not None and not (FUSE_NORM_RESIDUAL and _norm_fusable(norm, x, layer)):
            x, norm = norm(x), None  # the norm as its own kernel, the gating still fused
        return _gemv(x, layer, norm, None, ACTS[act])


def _norm_fusable(norm, x: torch.Tensor, layer) -> bool:
    """Whether the C++ GEMV's prologue can apply `norm` to x: an nn.RMSNorm over the layer's inputs in x's dtype."""
    return isinstance(norm, RMSNorm) and norm.weight.dtype == x.dtype and norm.weight.numel() == layer.in_features


def _gemv(x: torch.Tensor, layer, norm, residual: torch.Tensor | None, act: int = 0) -> torch.Tensor:
    """The C++ op on x (M tokens, any leading shape) with the layer's weights, norm (or None), residual and act (see
    ternary_gemv_cuda); the output in x's leading shape."""
    y = torch.ops.bitengine.ternary_gemv_cuda(
        x.reshape(-1, x.shape[-1]), layer.weight_i2w, layer.weight_scale, layer.in_features, layer.bias,
        None if norm is None else norm.weight, 0.0 if norm is None else float(norm.eps), residual, act)
    return y.reshape(*x.shape[:-1], -1)

register(CudaBackend())
