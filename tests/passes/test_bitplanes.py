"""The bit-plane layout the kernels read: exact round trips, sizes, and the FP6 bit pairing."""

from __future__ import annotations

import pytest
import torch

from llmc.passes.bitplanes import (
    contiguous_positions,
    fields_per_word,
    fp6_low_positions,
    kernel_tile,
    pack_fp_codes,
    pack_int_codes,
    pack_plane,
    rotation_pairs,
    slab_inputs,
    unpack_fp_codes,
    unpack_int_codes,
    unpack_plane,
)


def codes(bits, out_features=12, in_features=256, seed=0):
    return torch.randint(0, 1 << bits, (out_features, in_features), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("tile", [32, 64, 256])
def test_integer_codes_round_trip_at_their_width(bits, tile):
    values = codes(bits)
    planes = pack_int_codes(values, bits, tile)
    assert torch.equal(unpack_int_codes(planes, bits, tile), values)
    assert all(p.dtype == torch.int32 for p in planes)
    assert sum(p.numel() for p in planes) * 32 == values.numel() * bits


@pytest.mark.parametrize("bits,mantissa", [(6, 2), (6, 3), (4, 1), (8, 3)])
@pytest.mark.parametrize("tile", [16 * 2, 64, 256])
def test_fp_codes_round_trip_at_their_width(bits, mantissa, tile):
    values = codes(bits, seed=bits + mantissa)
    planes = pack_fp_codes(values, bits, mantissa, tile)
    assert torch.equal(unpack_fp_codes(planes, bits, mantissa, tile), values)
    assert sum(p.numel() for p in planes) * 32 == values.numel() * bits


def test_words_are_input_major_and_slabs_contiguous():
    # Rule 3: field i of word-row j of a tile holds input tile_start + i * (tile / F) + j.
    index = slab_inputs(in_features=128, tile=64, fields=8)
    assert index.shape == (16, 8)
    assert index[0].tolist() == [0, 8, 16, 24, 32, 40, 48, 56]
    assert index[9].tolist() == [65, 73, 81, 89, 97, 105, 113, 121]
    assert sorted(index.flatten().tolist()) == list(range(128))
    words = pack_plane(torch.arange(16).repeat(3, 8) % 16, 4, 128)  # [3, 128]
    assert words.shape == (16, 3)  # [K / F, N]


@pytest.mark.parametrize("widths", [(4,), (8,), (2,), (4, 2)])
def test_at_the_kernel_tile_each_word_holds_consecutive_inputs(widths):
    # Rule 3 at kernel_tile: word-row j of a one-plane format holds inputs F j .. F j + F - 1, so
    # the activations a word meets are one vector load; FP6's 2-bit row j holds 16 j .. 16 j + 15
    # and rows 2 j, 2 j + 1 of its 4-bit plane the even and the odd ones.
    tile = kernel_tile(widths)
    for width in widths:
        index = slab_inputs(in_features=256, tile=tile, fields=fields_per_word(width))
        if tile == fields_per_word(width):
            assert index.tolist() == torch.arange(256).reshape(-1, tile).tolist()
        else:
            assert index[4].tolist() == list(range(32, 48, 2)) and index[5].tolist() == list(range(33, 48, 2))
    values = codes(6, seed=3)
    assert torch.equal(unpack_fp_codes(pack_fp_codes(values, 6, 2, 16), 6, 2, 16), values)
    values = codes(4, seed=4)
    assert torch.equal(unpack_int_codes(pack_int_codes(values, 4, 8), 4, 8), values)


@pytest.mark.parametrize("mantissa", [2, 3])
def test_fp6_pairs_put_magnitude_bit_and_sign_one_rotation_apart(mantissa):
    # Rule 4: the low magnitude bit and the sign sit 8 + M apart, so one rotation by
    # 23 - M - low puts them at float32's bits 23 - M and 31 together; all 32 bits are used.
    pairs = fp6_low_positions(mantissa)
    assert len(pairs) == 16 and sorted(b for pair in pairs for b in pair) == list(range(32))
    for low, sign in pairs:
        assert (sign - low) % 32 == 8 + mantissa
        rotation = (23 - mantissa - low) % 32
        assert (low + rotation) % 32 == 23 - mantissa and (sign + rotation) % 32 == 31
    # The kernels compute the low position from the field index (fp6_linear._fp6_bits).
    formula = [4 * (f // 2) + f % 2 for f in range(16)] if mantissa == 2 else [2 * f for f in range(16)]
    assert [low for low, _ in pairs] == formula


def test_rotation_pairs_need_a_distance_that_pairs_all_bits():
    with pytest.raises(ValueError, match="no pairing"):
        rotation_pairs(16)


def test_custom_positions_round_trip():
    positions = rotation_pairs(10)
    values = codes(2, seed=5)
    assert torch.equal(unpack_plane(pack_plane(values, 2, 64, positions), 2, 64, positions), values)
    assert contiguous_positions(4)[1] == (4, 5, 6, 7) and fields_per_word(2) == 16


def test_declines_what_it_cannot_pack():
    with pytest.raises(ValueError, match="must lie in"):
        pack_plane(torch.full((2, 32), 16), 4, 32)
    with pytest.raises(ValueError, match="multiple of 8 fields"):
        pack_plane(torch.zeros(2, 64, dtype=torch.int64), 4, 12)
    with pytest.raises(ValueError, match="not packed"):
        pack_int_codes(codes(5), 5, 64)
    with pytest.raises(ValueError, match="width"):
        fields_per_word(3)
    assert kernel_tile((4,)) == 8 and kernel_tile((4, 2)) == 16 and kernel_tile((8,)) == 4
