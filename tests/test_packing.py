"""Bit packing: round trips at every bitwidth and odd length, and the exact bit positions of the layout."""

from __future__ import annotations

import pytest
import torch

from quantlm.formats.packing import pack_bits, packed_length, unpack_bits


def reference_words(values: list[int], bits: int) -> list[int]:
    """Independent reference: the values as one little-endian Python integer, cut into 32-bit words."""
    stream = sum(v << (k * bits) for k, v in enumerate(values))
    nwords = -(-len(values) * bits // 32)
    words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(nwords)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]  # as int32


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 172, 257])
def test_round_trip_and_reference(bits, n):
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (3, n), generator=gen)
    words = pack_bits(codes, bits, dim=1)
    assert words.dtype == torch.int32 and words.shape == (3, packed_length(n, bits))
    assert packed_length(n, bits) == -(-n * bits // 32)
    for r in range(3):
        assert words[r].tolist() == reference_words(codes[r].tolist(), bits)
    back = unpack_bits(words, bits, n, dim=1)
    assert back.dtype == torch.uint8 and torch.equal(back.long(), codes)
    # packing along dim 0 of the transpose gives the transposed words (the gptq qweight orientation)
    assert torch.equal(pack_bits(codes.T, bits, dim=0), words.T)
    assert torch.equal(unpack_bits(words.T.contiguous(), bits, n, dim=0).long(), codes.T)


def test_three_bit_straddling_words_match_the_documented_layout():
    values = [(k * 5 + 3) % 8 for k in range(32)]
    w = [x & 0xFFFFFFFF for x in pack_bits(torch.tensor(values), 3).tolist()]
    assert len(w) == 3

    def bits_of(word, lo, n):
        return (word >> lo) & ((1 << n) - 1)

    for k in range(10):  # word0: values 0-9 at bits 0-29
        assert bits_of(w[0], 3 * k, 3) == values[k]
    assert bits_of(w[0], 30, 2) == values[10] & 0b11  # low 2 bits of value 10 at bits 30-31
    assert bits_of(w[1], 0, 1) == values[10] >> 2  # its top bit at word1 bit 0
    for k in range(11, 21):  # word1: values 11-20 at bits 1-30
        assert bits_of(w[1], 1 + 3 * (k - 11), 3) == values[k]
    assert bits_of(w[1], 31, 1) == values[21] & 1  # low bit of value 21 at bit 31
    assert bits_of(w[2], 0, 2) == values[21] >> 1  # its top 2 bits at word2 bits 0-1
    for k in range(22, 32):  # word2: values 22-31 at bits 2-31
        assert bits_of(w[2], 2 + 3 * (k - 22), 3) == values[k]


def test_four_bit_is_the_classic_nibble_layout():
    values = torch.arange(16) % 16
    w = pack_bits(values, 4).tolist()
    assert [x & 0xFFFFFFFF for x in w] == [0x76543210, 0xFEDCBA98]


def test_bad_inputs():
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.tensor([-1]), 4)
    with pytest.raises(ValueError, match="2..8"):
        pack_bits(torch.tensor([0]), 9)
    with pytest.raises(ValueError, match="expected 2"):
        unpack_bits(torch.zeros(3, dtype=torch.int32), 4, 16)
