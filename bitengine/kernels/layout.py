"""The GPU kernel layout of a ternary weight ("i2w"), made from the on-disk layout k4 at prepare time.

i2w: int32 [N, KW_pad], 16 weights per 32-bit word, 2 bits each (code = w + 1, as in k4):
    weight k = 16*w + 4*j + b of a row sits in word w at bits 8*b + 2*j   (j, b in 0..3).
So `(word >> 2*j) & 0x03030303` yields four bytes holding the codes of weights 16w + 4j .. 16w + 4j + 3,
in order: one shift and one mask give the four int8 lanes of a `dp4a` against four consecutive
int8 activations (the interleave of Microsoft's BitNet GPU kernel). Decoding weight 16w + i on
its own is `(word >> (8*(i % 4) + 2*(i // 4))) & 3` (see `natural_shifts`).
Padding: K is padded up to a multiple of 16 * WORD_ALIGN with code 1 (weight 0), so rows are
64-byte aligned and a kernel may read whole words; KW_pad = ceil(K / 16) rounded up to WORD_ALIGN.
2 bits per weight plus at most 63 padding weights per row.

On disk the weight stays k4 (quant.py); this layout lives only in memory.
"""

from __future__ import annotations

import torch

from ..quant import unpack_codes

WEIGHTS_PER_WORD = 16
WORD_ALIGN = 16  # words; keeps every row 64-byte aligned for wide loads


def padded_words(in_features: int) -> int:
    """Words per i2w row: ceil(K / 16) rounded up to WORD_ALIGN."""
    words = -(-in_features // WEIGHTS_PER_WORD)
    return -(-words // WORD_ALIGN) * WORD_ALIGN


def natural_shifts() -> list[int]:
    """Bit offset of weight 16w + i inside word w, for i = 0..15."""
    return [8 * (i % 4) + 2 * (i // 4) for i in range(WEIGHTS_PER_WORD)]


def k4_to_i2w(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [N, ceil(K/4)] (k4) -> int32 [N, padded_words(K)] (i2w), on packed's device."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"expected a uint8 [N, ceil(K/4)] k4 tensor, got {packed.dtype} {tuple(packed.shape)}")
    n = packed.shape[0]
    kw = padded_words(in_features)
    codes = torch.ones(n, kw * WEIGHTS_PER_WORD, dtype=torch.int32, device=packed.device)
    codes[:, :in_features] = unpack_codes(packed, in_features).to(torch.int32)
    codes = codes.reshape(n, kw, 4, 4)  # (N, KW, j, b): weight 16w + 4j + b
    shift = torch.tensor([[8 * b + 2 * j for b in range(4)] for j in range(4)], dtype=torch.int32,
                         device=packed.device)
    # Bits never overlap, so a sum is an OR; int64 avoids overflow in bit 31 before the int32 view.
    words = (codes.to(torch.int64) << shift.to(torch.int64)).sum(dim=(2, 3))
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).contiguous()


def i2w_to_codes(words: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 [N, KW] (i2w) -> uint8 codes [N, K]; the inverse of k4_to_i2w, for tests."""
    n = words.shape[0]
    shifts = torch.tensor(natural_shifts(), dtype=torch.int64, device=words.device)
    codes = (words.to(torch.int64)[:, :, None] >> shifts) & 3  # (N, KW, 16)
    return codes.reshape(n, -1)[:, :in_features].to(torch.uint8)
