"""Pack b-bit integer codes (2..8 bits) into int32 words as a little-endian bit stream, and back.

Value ``k`` along the packed dimension occupies stream bits ``[k*b, k*b + b)``; stream bit ``j`` is bit
``j % 32`` of word ``j // 32``. A value whose bits cross a word boundary is split: its low bits end the
first word, its high bits start the next. ``n`` values take ``ceil(n*b/32)`` words, so any length packs
(172 included), and for b in {2, 4, 8} this is the classic GPTQ layout, for b = 3 the 32-values-in-3-words
one. Words are returned as int32 (bit 31 is the sign bit), as the GPTQ and compressed-tensors formats store them.
"""

from __future__ import annotations

import torch

from quantlm.quantized import check_bits

_WORD = 32


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` values of ``bits`` bits."""
    return (n * bits + _WORD - 1) // _WORD


def _positions(n: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(n, device=device, dtype=torch.int64) * bits
    return start // _WORD, start % _WORD  # word index, bit offset inside the word


def pack_bits(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack integer ``codes`` in ``[0, 2**bits)`` along ``dim`` into int32 words (``ceil(n*bits/32)`` of them)."""
    check_bits(bits)
    codes = codes.movedim(dim, -1).to(torch.int64)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(codes.min())}, {int(codes.max())}]")
    n = codes.shape[-1]
    nwords = packed_length(n, bits)
    word, offset = _positions(n, bits, codes.device)
    lead = codes.shape[:-1]
    low = (codes << offset) & 0xFFFFFFFF  # the part that lands in `word`
    high = codes >> (_WORD - offset)  # the part that spills into `word + 1` (0 when nothing spills)
    # One spare word takes the spill of the last value; bits never overlap, so adding is OR.
    words = torch.zeros(*lead, nwords + 1, dtype=torch.int64, device=codes.device)
    words.scatter_add_(-1, word.expand(*lead, n), low)
    words.scatter_add_(-1, (word + 1).expand(*lead, n), high)
    words = words[..., :nwords]
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # two's complement view as int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_bits(words: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` codes (uint8) along ``dim`` from int32 ``words``."""
    check_bits(bits)
    words = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    if words.shape[-1] != packed_length(n, bits):
        raise ValueError(f"{words.shape[-1]} words cannot hold exactly {n} values of {bits} bits "
                         f"(expected {packed_length(n, bits)})")
    word, offset = _positions(n, bits, words.device)
    lead = words.shape[:-1]
    padded = torch.cat([words, torch.zeros(*lead, 1, dtype=torch.int64, device=words.device)], dim=-1)
    low = padded.gather(-1, word.expand(*lead, n)) >> offset
    high = padded.gather(-1, (word + 1).expand(*lead, n)) << (_WORD - offset)
    codes = (low | high) & ((1 << bits) - 1)
    return codes.to(torch.uint8).movedim(-1, dim).contiguous()
