"""Packing low-bit weight codes into 32-bit words: the layout llmc's GPU kernels read.

Pure functions from codes ``[N, K]`` (one small unsigned integer per weight of a ``y = x @ W.T``
linear, ``W`` of shape [N out, K in]) to int32 *planes* and back. The layout (numbers referred
to by the kernels in ``llmc.plugins``):

1. Planes. A code of ``b`` bits is split into planes of power-of-two widths whose sum is ``b``:
   int8 is one 8-bit plane, int4 and FP4 one 4-bit plane, int2 one 2-bit plane, int3 a 2-bit
   plane (the low bits) and a 1-bit plane, FP6 a 4-bit and a 2-bit plane (rule 4). A plane of
   width ``w`` packs ``F = 32 / w`` fields into each int32 word, so every plane is aligned to 4
   bytes and the whole weight takes exactly ``b`` bits (FP6-LLM's "4+2" split, ZeroQuant(4+2)).
2. Words are stored input-major, ``[K / F, N]``: a row of words runs along the output dimension,
   so consecutive threads of a kernel read consecutive words (coalesced, 16-byte vectors) and
   every word in one row of words meets the same activations.
3. Slabs. K is cut into tiles of ``tile`` consecutive inputs. Within a tile, field ``i`` of
   word-row ``j`` holds input ``tile_start + i * (tile / F) + j``. The kernels' layout is the
   smallest tile, :func:`kernel_tile`: ``F`` inputs, so word-row ``j`` of a one-plane format
   holds inputs ``F j .. F j + F - 1`` and the ``F`` activations a word meets are one 8-32 byte
   vector load (FP6: row ``j`` of the 2-bit plane holds inputs ``16 j .. 16 j + 15``, rows ``2 j``
   and ``2 j + 1`` of the 4-bit plane the even and the odd ones). Round 8 measured it against
   tiles of a whole quantization group, whose field ``i`` of a run of word-rows is one contiguous
   slab of ``x`` (docs/benchmarks/kernels-rounds.md). Checkpoints may use larger tiles (``FpxLinear``).
4. FP6 (1 sign, 5 magnitude bits) keeps the top 4 magnitude bits in the 4-bit plane and the
   lowest magnitude bit with the sign in the 2-bit plane, where the two bits of a field sit
   ``8 + M`` bits apart (mod 32; M the mantissa width). One rotate then puts both where a
   float32 holds them (lowest magnitude bit at ``23 - M``, sign at 31), and one mask-and-or
   with the shifted nibble gives the float32's bits: a shift, a rotate and two logic operations
   per weight, where adjacent bits would need a second shift and mask for the sign.

``unpack_*`` inverts ``pack_*`` exactly; the tests round-trip every layout.
"""

from __future__ import annotations

import torch

WORD_BITS = 32


def fields_per_word(width: int) -> int:
    if width not in (1, 2, 4, 8):
        raise ValueError(f"plane width must be 1, 2, 4 or 8 bits, got {width}")
    return WORD_BITS // width


def contiguous_positions(width: int) -> tuple[tuple[int, ...], ...]:
    """Field ``i`` in bits ``[width * i, width * (i + 1))``, lowest bit first."""
    return tuple(tuple(width * i + b for b in range(width)) for i in range(fields_per_word(width)))


def rotation_pairs(distance: int) -> tuple[tuple[int, int], ...]:
    """16 fields of 2 bits covering a 32-bit word, the high bit ``distance`` above the low (mod 32).

    Walk each cycle of ``p -> p + distance`` and pair consecutive members (rule 4); the cycles
    have even length whenever ``distance`` is not a multiple of 16.
    """
    if distance % 16 == 0:
        raise ValueError(f"no pairing of 32 bits at distance {distance}")
    seen: set[int] = set()
    pairs = []
    for start in range(WORD_BITS):
        if start in seen:
            continue
        cycle = []
        p = start
        while p not in seen:
            seen.add(p)
            cycle.append(p)
            p = (p + distance) % WORD_BITS
        pairs += [(cycle[m], cycle[m + 1]) for m in range(0, len(cycle), 2)]
    return tuple(sorted(pairs))


def _is_run(bit_positions: tuple[int, ...]) -> bool:
    return list(bit_positions) == list(range(bit_positions[0], bit_positions[0] + len(bit_positions)))


def kernel_tile(widths: tuple[int, ...]) -> int:
    """The tile of the kernels' layout for planes of ``widths`` bits: the most fields per word
    (rule 3)."""
    return max(fields_per_word(width) for width in widths)


def slab_inputs(in_features: int, tile: int, fields: int) -> torch.Tensor:
    """Input index held by each (word-row, field): int64 [in_features / fields, fields] (rule 3)."""
    if tile % fields or in_features % tile:
        raise ValueError(
            f"tile {tile} must be a multiple of {fields} fields and divide the input size {in_features}"
        )
    rows = torch.arange(in_features // fields)
    per_tile = tile // fields
    start = (rows // per_tile) * tile + rows % per_tile
    return start[:, None] + torch.arange(fields)[None, :] * per_tile


def pack_plane(
    values: torch.Tensor, width: int, tile: int, positions: tuple[tuple[int, ...], ...] | None = None
) -> torch.Tensor:
    """Pack ``values`` [N, K] (each below ``2^width``) into int32 words [K / F, N] (rules 2-3)."""
    fields = fields_per_word(width)
    positions = positions or contiguous_positions(width)
    out_features, in_features = values.shape
    v = values.to(torch.int64)
    if int(v.min()) < 0 or int(v.max()) >= 1 << width:
        raise ValueError(f"pack_plane: values must lie in [0, {(1 << width) - 1}]")
    gathered = v.t()[slab_inputs(in_features, tile, fields).to(v.device)]  # [K/F, F, N]
    words = torch.zeros(in_features // fields, out_features, dtype=torch.int64, device=v.device)
    for i, bit_positions in enumerate(positions):
        if _is_run(bit_positions):
            words |= gathered[:, i] << bit_positions[0]
            continue
        for b, position in enumerate(bit_positions):
            words |= ((gathered[:, i] >> b) & 1) << position
    # Reinterpret the unsigned 32-bit pattern as int32.
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_plane(
    words: torch.Tensor, width: int, tile: int, positions: tuple[tuple[int, ...], ...] | None = None
) -> torch.Tensor:
    """Inverse of :func:`pack_plane`: int64 values [N, K]."""
    fields = fields_per_word(width)
    positions = positions or contiguous_positions(width)
    rows, out_features = words.shape
    in_features = rows * fields
    w = words.to(torch.int64) & 0xFFFFFFFF
    values = torch.zeros(in_features, out_features, dtype=torch.int64, device=w.device)
    index = slab_inputs(in_features, tile, fields).to(w.device)
    for i, bit_positions in enumerate(positions):
        if _is_run(bit_positions):
            values[index[:, i]] = (w >> bit_positions[0]) & ((1 << width) - 1)
            continue
        field = torch.zeros_like(w)
        for b, position in enumerate(bit_positions):
            field |= ((w >> position) & 1) << b
        values[index[:, i]] = field
    return values.t().contiguous()


# --------------------------------------------------------------------------- integer codes

INT_PLANE_WIDTHS = {8: (8,), 4: (4,), 3: (2, 1), 2: (2,)}


def pack_int_codes(codes: torch.Tensor, bits: int, tile: int) -> tuple[torch.Tensor, ...]:
    """Unsigned ``bits``-bit codes [N, K] to planes, lowest bits first (rule 1)."""
    widths = _int_widths(bits)
    planes, shift = [], 0
    for width in widths:
        planes.append(pack_plane((codes.to(torch.int64) >> shift) & ((1 << width) - 1), width, tile))
        shift += width
    return tuple(planes)


def unpack_int_codes(planes: tuple[torch.Tensor, ...], bits: int, tile: int) -> torch.Tensor:
    widths = _int_widths(bits)
    codes, shift = None, 0
    for words, width in zip(planes, widths, strict=True):
        part = unpack_plane(words, width, tile) << shift
        codes = part if codes is None else codes | part
        shift += width
    return codes


def int_kernel_tile(bits: int) -> int:
    """The kernels' tile for integer codes of ``bits`` bits (rule 3)."""
    return kernel_tile(_int_widths(bits))


def _int_widths(bits: int) -> tuple[int, ...]:
    if bits not in INT_PLANE_WIDTHS:
        raise ValueError(f"integer codes of {bits} bits are not packed; use one of {sorted(INT_PLANE_WIDTHS)}")
    return INT_PLANE_WIDTHS[bits]


# --------------------------------------------------------------------------- floating-point codes


def fp6_low_positions(mantissa_bits: int) -> tuple[tuple[int, int], ...]:
    """Bit positions of the 16 (lowest magnitude bit, sign) fields of an FP6 2-bit plane (rule 4)."""
    return rotation_pairs(8 + mantissa_bits)


FP_PLANE_WIDTHS = {4: (4,), 6: (4, 2), 8: (8,)}


def fp_kernel_tile(bits: int) -> int:
    """The kernels' tile for FP codes of ``bits`` bits (rule 3): 16 for FP6, 8 for FP4, 4 for FP8."""
    return kernel_tile(FP_PLANE_WIDTHS[bits])


def pack_fp_codes(codes: torch.Tensor, bits: int, mantissa_bits: int, tile: int) -> tuple[torch.Tensor, ...]:
    """FP codes [N, K] (sign in bit ``bits - 1``) to planes: FP4/FP8 as is, FP6 by rule 4."""
    c = codes.to(torch.int64)
    if bits in (4, 8):
        return (pack_plane(c, bits, tile),)
    if bits != 6:
        raise ValueError(f"FP codes of {bits} bits are not packed; use 4, 6 or 8")
    high = (c >> 1) & 0xF  # magnitude bits 4..1
    low = (c & 1) | (((c >> 5) & 1) << 1)  # magnitude bit 0, then the sign
    return pack_plane(high, 4, tile), pack_plane(low, 2, tile, fp6_low_positions(mantissa_bits))


def unpack_fp_codes(planes: tuple[torch.Tensor, ...], bits: int, mantissa_bits: int, tile: int) -> torch.Tensor:
    if bits in (4, 8):
        (words,) = planes
        return unpack_plane(words, bits, tile)
    high_words, low_words = planes
    high = unpack_plane(high_words, 4, tile)
    low = unpack_plane(low_words, 2, tile, fp6_low_positions(mantissa_bits))
    return (high << 1) | (low & 1) | ((low >> 1) << 5)

