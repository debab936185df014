"""Group-wise int-N weight-only linear, ``y = x @ W.T``, dequantizing W on the fly (Triton).

Weights come from a :class:`~llmc.packed.PackedLinear` (RTN or GPTQ, symmetric or asymmetric)
through :func:`pack_intn`: codes as bit planes (``llmc.passes.bitplanes`` at its kernel tile: word-row
``j`` holds inputs ``F j .. F j + F - 1``, ``F = 32 / b`` fields per word), float16 scales and zero points ``[K / group, N]``. The math every path computes:

    W[n, k] = scale[g, n] * (u[n, k] - zero[g, n]),  g = k // group,

``u`` the unsigned code (a symmetric code ``q`` is stored as ``u = q + 2^(b-1)`` with zero
``2^(b-1)``). :func:`intn_reference` is that formula in float32 torch, the yardstick of the tests.
The kernels below read int2, int4 and int8 (one bit plane each); 3-bit weights (two planes) run
``llmc.plugins.int3_linear``'s, through :func:`intn_linear` and :func:`intn_dequantize` all the same.

Kernels (rules referred to in the code):

1. Decode rows (``M == 1``): CUDA cores, float32. A field at bit offset ``o`` of a word, masked
   in place and read as a float32, is the subnormal ``u * 2^(o - 149)``, exactly, while it ends
   below bit 23; later fields are read from the word shifted right by 12, once per word. One
   integer AND and one FFMA per weight: ``x`` (shared by every row of words) carries the
   ``2^(149 - o)``, split between ``2^(100 - o)`` on ``x`` and ``2^49`` on the result so that no
   product is subnormal. The zero point's share, ``scale * zero * sum(x)``, is added after the
   hot loop: per group (decode splits hold whole groups), or once per output channel. No int-to-float conversion
   (a quarter-rate instruction), and no FTZ: Triton's float32 arithmetic keeps subnormals (no
   ``.ftz`` in its PTX). On the 7B shapes, fewer instructions per weight did not make it faster
   (round 5); what it spends beyond a read-only stream of the same words is the split-K finish
   and the decode's arithmetic, about equally (round 6, docs/benchmarks/kernels-rounds.md).
2. 2 to 16 rows: tensor cores. A field becomes the float16 ``1024 + u`` by OR-ing 0x6400; minus
   ``1024 + zero``, times the scale, it is a float16 operand of ``tl.dot`` with float32
   accumulation (for float16 x and scales, in pairs: rule 7).
3. Both split K when the output alone gives too few programs (``llmc.plugins.splitk``); one row
   from 2^23 to 2^27 weights, or with a short K below, reads all of K per program
   (``one_row_shape``), and so does each row of a few (rule 5).
4. More rows: with float16 x and scales, on an sm_90 GPU from 2^24 weights, the Hopper kernel (rule 9)
   up to 128-512 rows (``wgmma_prefill.WGMMA_RULES``); elsewhere the fused prefill kernel (rule 8) up
   to 64 or 128 rows (:func:`prefill_config`, ``PREFILL_RULES``; from 2^25 weights, int4 at 17-32 rows
   takes the 2-16 row kernel in blocks of 16 rows); beyond, and for bfloat16 x, :func:`intn_dequantize`
   writes the float16 weight and cuBLAS multiplies.
5. A few rows of x run the decode kernel too (``rows_per_program``): on small linears once per row
   (a third grid dimension, each row with its own partials and counters; the rows' programs share
   the words through L2, round 5), elsewhere 2 or 4 rows per program (:func:`_gemv_rows_kernel`,
   round 9: each word decoded once for all of them; int4 4096x4096 at 4 rows 13.5 -> 10.0 us against
   the tensor cores). Measured faster than the tensor-core kernel where the rule takes them.
6. The decode kernel reads the ``F`` activations of a row of words with one vector load
   (``ld.global.nc.v2/v4``, inline PTX) into the registers of the threads that hold that row's
   words. A ``tl.load`` of a 1-D block of ``x`` is laid out for coalescing instead, and on large
   blocks Triton moved it through shared memory behind a barrier per field (16 per step at 32
   outputs x 512 rows). Round 8 (H100): int4 4096x4096 8.2 -> 5.8 us, 1536->576 3.4 -> 2.6
   (docs/benchmarks/kernels-rounds.md). The tensor-core kernel loads a contiguous tile of ``x`` and splits
   it into the fields' tiles in registers (:func:`x_tile_fields`). ``x`` must be 16-byte aligned (:func:`intn_linear` copies it if not).
7. The tensor-core kernel decodes two weights per instruction with float16 x and scales: one PTX
   block per field (:func:`_pair_decode_asm`) takes the field from two neighbouring words into the
   halves of one register (``prmt``, a shift, ``lop3`` with 0x6400: the pair ``1024 + u``), subtracts
   ``1024 + zero`` and multiplies by the scale pair (``sub.f16x2``, ``mul.f16x2``). The result is
   rule 2's float16 bit for bit (``u - zero`` is exact, one rounding in the product), in half the
   instructions: Triton does float16 arithmetic in float32, with a conversion each way (sm_90 SASS,
   64 x 16 rows: 499 -> 255 instructions a step). Round 10 (H100): int4 at 16 rows 4096->11008
   25.6 -> 19.7 us, 8192->28672 103.7 -> 68.7 (docs/benchmarks/kernels-rounds.md). bfloat16 x keeps rule 2.
8. The prefill kernel (:func:`_prefill_kernel`, 17 to 128 rows of x) decodes each word with one PTX
   block (:func:`_word_decode_asm`): fields i and i + F/2 sit in the two halves of the word, so one
   ``lop3`` (int4: with 0x000F000F and 0x64006400) gives both as the float16 pair ``1024 + u``, then
   ``sub.f16x2`` and ``mul.f16x2`` as in rule 7 (int4: four shifts, four ``lop3``, eight float16x2
   operations per word; Triton's own float16 arithmetic took about five times the instructions).
   The F fields join into the [BLOCK_N, K] operand in register order (``tl.join``), the first of
   ``tl.dot``: a Hopper wgmma reads it from registers. Triton 3.6 lets up to three such wgmmas run
   past the end of a loop step, while the next step's decode rewrites the registers they read
   (undefined in PTX): on an H100 that gave wrong outputs in 4 of 4 trials at some launch shapes. An
   empty asm block that reads the accumulator (:func:`_operands_read`) makes Triton wait for them
   first (docs/benchmarks/kernels.md, "Prefill").
9. On Hopper (compute capability 9.0), ``llmc.plugins.wgmma_prefill``: the same decode PTX in a Gluon
   kernel whose decoded tile goes through shared memory, so that the next step's decode overlaps the
   wgmma in flight (TMA-fed, double-buffered; see that module). 7B-70B shapes at 17-256 rows: 1.11-2.04x
   faster than rules 8/2 on an H100 (docs/benchmarks/kernels-prefill.md).
10. int4 on Hopper with float16 x and scales: one row from 2^22 weights where the outputs are at least twice
   the inputs (``mma_decode.ONE_ROW_WIDE``; symmetric: or the inputs twice the outputs), symmetric at 2 rows
   from 2^22 weights, 3-7 from 2^19 and 8-16 on every linear (``mma_decode.MMA_RULE``; below 2^20 weights with
   fewer outputs than inputs from 8 rows), asymmetric at 2 rows from 2^22, 3 from 2^19 and 4-16 everywhere
   (``ASYM_MMA_RULE``),
   ``llmc.plugins.mma_decode``: the words are loaded in the register layout of ``mma.sync``'s A operand
   (Gluon), so that rule 8's pair decode feeds the tensor cores with no shared memory, and x is the B
   operand (one to eight rows cost the same). Where it runs, 0.99-1.80x the speed of rules 5/7 on an
   H100 (symmetric; asymmetric in groups of 32 0.99-1.70x; docs/benchmarks/kernels-decode-rows.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from llmc.packed import PackedLinear
from llmc.passes.bitplanes import INT_PLANE_WIDTHS, fields_per_word, int_kernel_tile, pack_int_codes, unpack_int_codes
from llmc.plugins import splitk
from llmc.plugins.splitk import (COMPILE_OPTIONS, LaunchConfig, as_rows, choose_split, decode_config, matmul_into,
                                 pow2_at_least, require_triton, sm_count, tensor_core_config, triton)

if triton is not None:
    import triton.language as tl

KERNEL_BITS = (2, 4, 8)  # one bit plane each: this module's kernels; int3's two planes: llmc.plugins.int3_linear
INT3 = 3


@dataclass(frozen=True)
class IntNWeights:
    """Kernel-ready int-N weights of a [N, K] linear (see the module docstring)."""

    planes: tuple[torch.Tensor, ...]  # int32 [K / F, N] each
    scale: torch.Tensor  # float16 [K / group, N]
    zero: torch.Tensor  # float16 [K / group, N]: 2^(b-1) everywhere when symmetric
    bits: int
    group_size: int
    symmetric: bool
    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int:
        tensors = (*self.planes, self.scale) + (() if self.symmetric else (self.zero,))
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device) -> IntNWeights:
        return IntNWeights(
            tuple(p.to(device) for p in self.planes), self.scale.to(device), self.zero.to(device),
            self.bits, self.group_size, self.symmetric, self.in_features, self.out_features,
        )


def pack_intn(packed: PackedLinear, scale_dtype: torch.dtype = torch.float16) -> IntNWeights:
    """Bit planes, scales and zero points of ``packed`` in the kernels' layout."""
    if packed.bits not in INT_PLANE_WIDTHS:
        raise ValueError(f"pack_intn: {packed.bits}-bit codes are not packed (use 2, 3, 4 or 8)")
    out_features, in_features = packed.q.shape
    offset = 1 << (packed.bits - 1)
    if packed.symmetric:
        unsigned = packed.q.to(torch.int64) + offset
        zero = torch.full_like(packed.scale, float(offset))
    else:
        unsigned = packed.q.to(torch.int64)
        zero = packed.zero.to(torch.float32)
    planes = pack_int_codes(unsigned, packed.bits, int_kernel_tile(packed.bits))
    return IntNWeights(
        planes=planes,
        scale=packed.scale.t().contiguous().to(scale_dtype),
        zero=zero.t().contiguous().to(scale_dtype),
        bits=packed.bits,
        group_size=packed.group_size,
        symmetric=packed.symmetric,
        in_features=in_features,
        out_features=out_features,
    )


def intn_dequantize_reference(w: IntNWeights) -> torch.Tensor:
    """The float32 weight [N, K] the kernels compute with (module docstring formula)."""
    u = unpack_int_codes(w.planes, w.bits, int_kernel_tile(w.bits)).to(torch.float32)
    scale = w.scale.float().t().repeat_interleave(w.group_size, dim=1)
    zero = w.zero.float().t().repeat_interleave(w.group_size, dim=1)
    return scale * (u - zero)


def intn_reference(x: torch.Tensor, w: IntNWeights) -> torch.Tensor:
    """``x @ W.T`` in float32 (on the weights' device), returned in ``x``'s dtype and device."""
    weight = intn_dequantize_reference(w)
    y = x.detach().to(device=weight.device, dtype=torch.float32) @ weight.t()
    return y.to(device=x.device, dtype=x.dtype)


# --------------------------------------------------------------------------- Triton


def _pair_decode_asm(width: int, field: int, symmetric: bool) -> str:
    """PTX of rule 7: field ``field`` of two neighbouring words ($1, $2) as a float16 pair, times the
    scale pair $3, minus the zero point (2^(width-1), or the pair $4)."""
    low = width * field < 16
    shift = (width * field) % 16
    mask = (1 << width) - 1
    lines = [f"prmt.b32 t, $1, $2, {'0x5410' if low else '0x7632'};"]  # the half that holds the field, per word
    if shift:
        lines.append(f"shr.b32 t, t, {shift};")
    lines.append(f"lop3.b32 t, t, {mask | mask << 16:#010x}, 0x64006400, 0xea;")  # (t & mask) | 1024: 1024 + u
    if symmetric:
        offset = 0x6400 + (1 << (width - 1))  # the float16 1024 + 2^(width-1)
        lines.append(f"mov.b32 o, {offset | offset << 16:#010x};")
    else:
        lines += ["mov.b32 o, 0x64006400;", "add.f16x2 o, o, $4;"]  # 1024 + zero, exact (integer zero points)
    lines += ["sub.f16x2 t, t, o;", "mul.f16x2 $0, t, $3;"]
    return "{ .reg .b32 t, o; " + " ".join(lines) + " }"


# The PTX of field i of the kernels' widths at [32 * width + 16 * symmetric + i]
_PAIR_ASM = tuple(_pair_decode_asm(width, i, bool(sym)) if width in KERNEL_BITS and i < 32 // width else ""
                  for width in range(max(KERNEL_BITS) + 1) for sym in (0, 1) for i in range(16))


def _word_decode_asm(width: int, symmetric: bool) -> str:
    """PTX of rule 8: the ``F = 32 / width`` fields of one word ($F) as float16 ``scale * (u - zero)``
    in $0 .. $(F-1) (field i in $i), given the scale $(F+1) and, when not ``symmetric``, the zero
    point $(F+2). Fields i and i + F/2 sit in the two halves of the word: one ``lop3`` makes both."""
    fields = 32 // width
    word, scale, zero = f"${fields}", f"${fields + 1}", f"${fields + 2}"
    mask = (1 << width) - 1
    lines = [f"mov.b32 s, {{{scale}, {scale}}};"]
    if symmetric:
        offset = 0x6400 + (1 << (width - 1))  # the float16 1024 + 2^(width-1)
        lines.append(f"mov.b32 o, {offset | offset << 16:#010x};")
    else:
        lines += [f"mov.b32 o, {{{zero}, {zero}}};", "mov.b32 t, 0x64006400;", "add.f16x2 o, o, t;"]  # 1024 + zero
    for i in range(fields // 2):
        if i:
            lines.append(f"shr.b32 t, {word}, {width * i};")
        lines += [f"lop3.b32 p, {'t' if i else word}, {mask | mask << 16:#010x}, 0x64006400, 0xea;",  # 1024 + u
                  "sub.f16x2 p, p, o;", "mul.f16x2 p, p, s;", f"mov.b32 {{${i}, ${i + fields // 2}}}, p;"]
    return "{ .reg .b32 t, o, s, p; " + " ".join(lines) + " }"


# Rule 8's PTX at [2 * width + symmetric], and its operands: F float16 outputs, the word, the scale
# and the zero point (passed, unread, when symmetric)
_WORD_ASM = tuple(_word_decode_asm(width, bool(sym)) if width in KERNEL_BITS else ""
                  for width in range(max(KERNEL_BITS) + 1) for sym in (0, 1))
_WORD_CONSTRAINTS = tuple(",".join(["=h"] * (32 // width)) + ",r,h,h" if width in KERNEL_BITS else ""
                          for width in range(max(KERNEL_BITS) + 1))


if triton is not None:
    from llmc.plugins.splitk import block_offsets, finish_split, grid_row, row_block, start_sum

    # Rule 1: x is scaled by 2^(100 - o), so u * 2^(o - 149) times it is u * x * 2^-49, normal.
    _X_SCALE = tl.constexpr(2.0**100)
    PAIR_ASM = tl.constexpr(_PAIR_ASM)
    WORD_ASM = tl.constexpr(_WORD_ASM)
    WORD_CONSTRAINTS = tl.constexpr(_WORD_CONSTRAINTS)
    _PRODUCT_SCALE = tl.constexpr(2.0**-49)

    @triton.jit
    def lead_rows(t, ROWS: tl.constexpr):
        """``t`` [rows, outputs] as [1, rows, outputs] for a decode kernel with ROWS > 1 rows of x per
        program (its tensors are [ROWS, rows, outputs]); as it is for one row. Pointers made in
        this shape before a load need no layout conversion after it (round 9: expanding loaded
        words moved them through shared memory)."""
        if ROWS > 1:
            return t[None, :, :]
        else:
            return t

    @triton.jit
    def add_group_block(acc, dot, x_sums, s_ptr, z_ptr, group, offs_n, N, ok, ROWS: tl.constexpr,
                        SYMMETRIC: tl.constexpr, ZERO: tl.constexpr, INLINE_ZERO: tl.constexpr = True):
        """``acc`` plus a block's products ``dot`` (``u * x * 2^-49`` per row of words) times the scales of its rows'
        ``group`` (see lead_rows), less, with ``INLINE_ZERO``, the zero point's share: its rows' x sums ``x_sums``,
        scaled like the products (no pass over the groups after the loop)."""
        scale = tl.load(lead_rows(s_ptr + group[:, None] * N + offs_n[None, :], ROWS), mask=ok,
                        other=0.0).to(tl.float32)
        if INLINE_ZERO:
            if SYMMETRIC:
                dot -= x_sums * (ZERO * _PRODUCT_SCALE)
            else:
                zero = tl.load(lead_rows(z_ptr + group[:, None] * N + offs_n[None, :], ROWS), mask=ok,
                               other=0.0).to(tl.float32)
                dot -= zero * (x_sums * _PRODUCT_SCALE)
        return acc + dot * scale

    @triton.jit
    def _load_words(w_ptr, rows, offs_n, row_end, n_ok, N, EVICT_FIRST: tl.constexpr, ROWS: tl.constexpr = 1):
        # A [rows, outputs] block of words (see lead_rows); EVICT_FIRST marks the lines as streamed (read once).
        ptrs = lead_rows(w_ptr + rows[:, None] * N + offs_n[None, :], ROWS)
        ok = lead_rows((rows < row_end)[:, None] & n_ok[None, :], ROWS)
        if EVICT_FIRST:
            words = tl.load(ptrs, mask=ok, other=0, eviction_policy="evict_first")
        else:
            words = tl.load(ptrs, mask=ok, other=0)
        return words

    @triton.jit
    def x_words(x_ptr, offsets, FIELDS: tl.constexpr):
        """The ``FIELDS`` activations from ``x_ptr + offsets`` on (one word-row's inputs,
        bitplanes rule 3) as ``FIELDS / 2`` int32 tensors of ``offsets``' shape, two 16-bit values
        each: one vector load per element, in the words' own register layout (rule 6). Every
        offset must be inside x; :func:`x_field` masks."""
        ptr = x_ptr + offsets
        if FIELDS == 4:
            words = tl.inline_asm_elementwise("ld.global.nc.v2.b32 {$0, $1}, [$2];", "=r,=r,l", [ptr],
                                              dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        elif FIELDS == 8:
            words = tl.inline_asm_elementwise("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l",
                                              [ptr], dtype=(tl.int32,) * 4, is_pure=True, pack=1)
        else:
            words = tl.inline_asm_elementwise(
                "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$8]; ld.global.nc.v4.b32 {$4, $5, $6, $7}, [$8 + 16];",
                "=r,=r,=r,=r,=r,=r,=r,=r,l", [ptr], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
        return words

    @triton.jit
    def x_offsets(x_rows, rows, row_ok, K, FIELDS: tl.constexpr):
        """Offsets [ROWS, rows, 1] of word-row ``rows``' activations in rows ``x_rows`` of x (rows K
        apart) for :func:`x_words`; word-rows not ``row_ok`` read word-row 0."""
        return (x_rows * K)[:, None, None] + (tl.where(row_ok, rows, 0) * FIELDS)[None, :, None]

    @triton.jit
    def x_field(words, i: tl.constexpr, ok, DTYPE: tl.constexpr):
        """Activation ``i`` of :func:`x_words` as float32; 0 where not ``ok``."""
        word = words[i // 2]
        if DTYPE == tl.bfloat16:
            if i % 2 == 1:
                value = (word & -65536).to(tl.float32, bitcast=True)
            else:
                value = (word << 16).to(tl.float32, bitcast=True)
        else:
            if i % 2 == 1:
                word = word >> 16
            value = word.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return tl.where(ok, value, 0.0)

    @triton.jit
    def _halves(t, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, HALF: tl.constexpr):
        """[BLOCK_M, BLOCK_W, 2 HALF] -> its even and its odd elements along the last axis."""
        if HALF == 1:
            return tl.split(t)
        else:
            return tl.split(tl.reshape(t, [BLOCK_M, BLOCK_W, HALF, 2]))

    @triton.jit
    def x_tile_fields(x_ptr, offs_m, rows, ok, stride_xm, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
                      FIELDS: tl.constexpr):
        """The [BLOCK_M, BLOCK_W] tiles of x that fields 0 .. FIELDS - 1 of word-rows ``rows`` meet
        (inputs ``FIELDS * rows + i``; ``ok`` [BLOCK_M, BLOCK_W] masks), as a tuple: one contiguous
        load of [BLOCK_M, BLOCK_W * FIELDS], then split in registers (a load per field would
        read x ``FIELDS`` elements apart)."""
        inputs = (rows * FIELDS)[None, :, None] + tl.arange(0, FIELDS)[None, None, :]
        t = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + inputs, mask=ok[:, :, None], other=0.0)
        if FIELDS == 4:
            e, o = _halves(t, BLOCK_M, BLOCK_W, 2)
            f0, f2 = _halves(e, BLOCK_M, BLOCK_W, 1)
            f1, f3 = _halves(o, BLOCK_M, BLOCK_W, 1)
            fields = (f0, f1, f2, f3)
        elif FIELDS == 8:
            e, o = _halves(t, BLOCK_M, BLOCK_W, 4)
            ee, eo = _halves(e, BLOCK_M, BLOCK_W, 2)
            oe, oo = _halves(o, BLOCK_M, BLOCK_W, 2)
            f0, f4 = _halves(ee, BLOCK_M, BLOCK_W, 1)
            f2, f6 = _halves(eo, BLOCK_M, BLOCK_W, 1)
            f1, f5 = _halves(oe, BLOCK_M, BLOCK_W, 1)
            f3, f7 = _halves(oo, BLOCK_M, BLOCK_W, 1)
            fields = (f0, f1, f2, f3, f4, f5, f6, f7)
        else:
            e, o = _halves(t, BLOCK_M, BLOCK_W, 8)
            ee, eo = _halves(e, BLOCK_M, BLOCK_W, 4)
            oe, oo = _halves(o, BLOCK_M, BLOCK_W, 4)
            eee, eeo = _halves(ee, BLOCK_M, BLOCK_W, 2)
            eoe, eoo = _halves(eo, BLOCK_M, BLOCK_W, 2)
            oee, oeo = _halves(oe, BLOCK_M, BLOCK_W, 2)
            ooe, ooo = _halves(oo, BLOCK_M, BLOCK_W, 2)
            f0, f8 = _halves(eee, BLOCK_M, BLOCK_W, 1)
            f4, f12 = _halves(eeo, BLOCK_M, BLOCK_W, 1)
            f2, f10 = _halves(eoe, BLOCK_M, BLOCK_W, 1)
            f6, f14 = _halves(eoo, BLOCK_M, BLOCK_W, 1)
            f1, f9 = _halves(oee, BLOCK_M, BLOCK_W, 1)
            f5, f13 = _halves(oeo, BLOCK_M, BLOCK_W, 1)
            f3, f11 = _halves(ooe, BLOCK_M, BLOCK_W, 1)
            f7, f15 = _halves(ooo, BLOCK_M, BLOCK_W, 1)
            fields = (f0, f1, f2, f3, f4, f5, f6, f7, f8, f9, f10, f11, f12, f13, f14, f15)
        return fields

    @triton.jit
    def _int_fields(acc, dot, x_sum, words, high, xw, x_ok, WIDTH: tl.constexpr, CHANNEL: tl.constexpr,
                    INLINE_ZERO: tl.constexpr, DTYPE: tl.constexpr):
        """One step of the decode kernels over every field of ``words`` (``high``: the words shifted
        right by 12) and the activations ``xw`` (:func:`x_words`): the products into ``acc`` (per
        channel) or ``dot`` (per group), the activations into ``x_sum`` (``INLINE_ZERO``)."""
        FIELDS: tl.constexpr = 32 // WIDTH
        MASK: tl.constexpr = (1 << WIDTH) - 1
        for i in tl.static_range(FIELDS):
            # Rule 1: the masked field, read as float32, is u * 2^(o - 149); it must end
            # below bit 23, so later fields are read from the word shifted right by 12.
            if WIDTH * i + WIDTH <= 23:
                o = WIDTH * i
                v = (words & (MASK << o)).to(tl.float32, bitcast=True)
            else:
                o = WIDTH * i - 12
                v = (high & (MASK << o)).to(tl.float32, bitcast=True)
            xv = x_field(xw, i, x_ok, DTYPE)
            if INLINE_ZERO:
                x_sum += xv
            if CHANNEL:
                acc += v * (xv * (_X_SCALE / (1 << o)))
            else:
                dot += v * (xv * (_X_SCALE / (1 << o)))
        return acc, dot, x_sum

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, part_ptr, count_ptr,
                     N, K, stride_ym, rows_per_split, n_split,
                     WIDTH: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, ZERO: tl.constexpr,
                     CHANNEL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                     PREFETCH: tl.constexpr = False, INLINE_ZERO: tl.constexpr = False,
                     EVICT_FIRST: tl.constexpr = False, ROW_GRID: tl.constexpr = False, SEPARATE: tl.constexpr = False):
        start_sum(SEPARATE)
        FIELDS: tl.constexpr = 32 // WIDTH
        ROWS_PER_GROUP: tl.constexpr = GROUP // FIELDS
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        # Rule 5: one row of (contiguous) x per grid row; its own partials and counters.
        if ROW_GRID:
            x_ptr, y_ptr, part_ptr, count_ptr = grid_row(x_ptr, y_ptr, part_ptr, count_ptr, K, stride_ym, n_split, N, 1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        row_begin = pid_k * rows_per_split
        row_end = tl.minimum(row_begin + rows_per_split, K // FIELDS)
        acc = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.float32)
        if PREFETCH:
            rows = row_begin + tl.arange(0, BLOCK_W)
            ahead = _load_words(w_ptr, rows, offs_n, row_end, n_ok, N, EVICT_FIRST)
        for r0 in range(row_begin, row_begin + rows_per_split, BLOCK_W):
            rows = r0 + tl.arange(0, BLOCK_W)
            row_ok = rows < row_end
            ok = row_ok[:, None] & n_ok[None, :]
            if PREFETCH:
                # The next step's words are in flight while this step's are decoded.
                words = ahead.to(tl.uint32, bitcast=True)
                ahead = _load_words(w_ptr, rows + BLOCK_W, offs_n, row_end, n_ok, N, EVICT_FIRST)
            else:
                words = _load_words(w_ptr, rows, offs_n, row_end, n_ok, N, EVICT_FIRST).to(tl.uint32, bitcast=True)
            high = words >> 12
            group = rows // ROWS_PER_GROUP
            xw = x_words(x_ptr, (tl.where(row_ok, rows, 0) * FIELDS)[:, None], FIELDS)
            dot = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.float32)
            x_rows = tl.zeros([BLOCK_W, 1], dtype=tl.float32)
            acc, dot, x_rows = _int_fields(acc, dot, x_rows, words, high, xw, row_ok[:, None], WIDTH, CHANNEL, INLINE_ZERO,
                                           x_ptr.dtype.element_ty)
            if not CHANNEL:
                acc = add_group_block(acc, dot, x_rows, s_ptr, z_ptr, group, offs_n, N, ok, 1, SYMMETRIC, ZERO,
                                      INLINE_ZERO)
        # sum over k of u * x * 2^-49 (times the scale per group): undo the 2^-49.
        total = tl.sum(acc, axis=0) * (1.0 / _PRODUCT_SCALE)
        # The zero point's share, scale * zero * sum(x), off the hot loop: per group of the
        # program's range (whole groups; decode_config aligns splits to groups), or once per channel.
        correction = tl.zeros([BLOCK_N], dtype=tl.float32)
        if CHANNEL:
            x_sum = tl.zeros([BLOCK_W * FIELDS], dtype=tl.float32)
            for r0 in range(row_begin * FIELDS, (row_begin + rows_per_split) * FIELDS, BLOCK_W * FIELDS):
                inputs = r0 + tl.arange(0, BLOCK_W * FIELDS)
                x_sum += tl.load(x_ptr + inputs, mask=inputs < row_end * FIELDS, other=0.0).to(tl.float32)
            scale = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            if SYMMETRIC:
                zero = ZERO
            else:
                zero = tl.load(z_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            total = (total - zero * tl.sum(x_sum, axis=0)) * scale
        elif not INLINE_ZERO:
            for g in range(row_begin // ROWS_PER_GROUP, tl.cdiv(row_end, ROWS_PER_GROUP)):
                x_sum = tl.sum(tl.load(x_ptr + g * GROUP + tl.arange(0, GROUP)).to(tl.float32), axis=0)
                scale = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                if SYMMETRIC:
                    correction += scale * (ZERO * x_sum)
                else:
                    zero = tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                    correction += scale * zero * x_sum
            total = total - correction
        finish_split(total[None, :], y_ptr, part_ptr, count_ptr, tl.arange(0, 1), offs_n, 1, N, stride_ym,
                     pid_n, pid_k, n_split, SEPARATE)

    @triton.jit
    def _gemv_rows_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, part_ptr, count_ptr,
                     N, K, stride_ym, rows_per_split, n_split, x_rows,
                     WIDTH: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, ZERO: tl.constexpr,
                     CHANNEL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                     PREFETCH: tl.constexpr = False, INLINE_ZERO: tl.constexpr = False,
                     EVICT_FIRST: tl.constexpr = False, ROWS: tl.constexpr = 2, ROW_BLOCKS: tl.constexpr = False,
                     SEPARATE: tl.constexpr = False):
        start_sum(SEPARATE)
        FIELDS: tl.constexpr = 32 // WIDTH
        ROWS_PER_GROUP: tl.constexpr = GROUP // FIELDS
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        # Rule 5: ROWS >= 2 rows of (contiguous) x per program, each word decoded once for all of
        # them; with ROW_BLOCKS, a block of rows per grid row, each with its own partials and
        # counters. _gemv_kernel's loop with a leading axis of ROWS on every tensor.
        x_ptr, y_ptr, part_ptr, count_ptr, rows_here, x_row = row_block(
            x_ptr, y_ptr, part_ptr, count_ptr, K, stride_ym, n_split, N, x_rows, ROWS, ROW_BLOCKS)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        row_begin = pid_k * rows_per_split
        row_end = tl.minimum(row_begin + rows_per_split, K // FIELDS)
        acc = tl.zeros([ROWS, BLOCK_W, BLOCK_N], dtype=tl.float32)
        if PREFETCH:
            rows = row_begin + tl.arange(0, BLOCK_W)
            ahead = _load_words(w_ptr, rows, offs_n, row_end, n_ok, N, EVICT_FIRST, ROWS)
        for r0 in range(row_begin, row_begin + rows_per_split, BLOCK_W):
            rows = r0 + tl.arange(0, BLOCK_W)
            row_ok = rows < row_end
            ok = lead_rows(row_ok[:, None] & n_ok[None, :], ROWS)
            if PREFETCH:
                # The next step's words are in flight while this step's are decoded.
                words = ahead.to(tl.uint32, bitcast=True)
                ahead = _load_words(w_ptr, rows + BLOCK_W, offs_n, row_end, n_ok, N, EVICT_FIRST, ROWS)
            else:
                words = _load_words(w_ptr, rows, offs_n, row_end, n_ok, N, EVICT_FIRST, ROWS).to(tl.uint32, bitcast=True)
            high = words >> 12
            group = rows // ROWS_PER_GROUP
            xw = x_words(x_ptr, x_offsets(x_row, rows, row_ok, K, FIELDS), FIELDS)
            dot = tl.zeros([ROWS, BLOCK_W, BLOCK_N], dtype=tl.float32)
            x_sums = tl.zeros([ROWS, BLOCK_W, 1], dtype=tl.float32)
            acc, dot, x_sums = _int_fields(acc, dot, x_sums, words, high, xw, lead_rows(row_ok[:, None], ROWS), WIDTH,
                                           CHANNEL, INLINE_ZERO, x_ptr.dtype.element_ty)
            if not CHANNEL:
                acc = add_group_block(acc, dot, x_sums, s_ptr, z_ptr, group, offs_n, N, ok, ROWS, SYMMETRIC, ZERO,
                                      INLINE_ZERO)
        # sum over k of u * x * 2^-49 (times the scale per group): undo the 2^-49.
        total = tl.sum(acc, axis=1) * (1.0 / _PRODUCT_SCALE)
        # The zero point's share, scale * zero * sum(x), off the hot loop: per group of the
        # program's range (whole groups; decode_config aligns splits to groups), or once per channel.
        x_base = x_ptr + (x_row * K)[:, None]
        correction = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        if CHANNEL:
            x_sum = tl.zeros([ROWS, BLOCK_W * FIELDS], dtype=tl.float32)
            for r0 in range(row_begin * FIELDS, (row_begin + rows_per_split) * FIELDS, BLOCK_W * FIELDS):
                inputs = r0 + tl.arange(0, BLOCK_W * FIELDS)
                x_sum += tl.load(x_base + inputs[None, :], mask=(inputs < row_end * FIELDS)[None, :],
                                 other=0.0).to(tl.float32)
            scale = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            if SYMMETRIC:
                zero = ZERO
            else:
                zero = tl.load(z_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            total = (total - zero * tl.sum(x_sum, axis=1)[:, None]) * scale[None, :]
        elif not INLINE_ZERO:
            for g in range(row_begin // ROWS_PER_GROUP, tl.cdiv(row_end, ROWS_PER_GROUP)):
                x_sum = tl.sum(tl.load(x_base + g * GROUP + tl.arange(0, GROUP)[None, :]).to(tl.float32), axis=1)
                scale = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                if SYMMETRIC:
                    correction += scale[None, :] * (ZERO * x_sum)[:, None]
                else:
                    zero = tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                    correction += (scale * zero)[None, :] * x_sum[:, None]
            total = total - correction
        finish_split(total, y_ptr, part_ptr, count_ptr, tl.arange(0, ROWS), offs_n, rows_here, N, stride_ym,
                     pid_n, pid_k, n_split, SEPARATE)

    @triton.jit
    def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, part_ptr, count_ptr,
             M, N, K, stride_xm, stride_ym, rows_per_split, n_split,
             WIDTH: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, ZERO: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
             EVICT_FIRST: tl.constexpr = False, SWAP: tl.constexpr = False, SEPARATE: tl.constexpr = False):
        start_sum(SEPARATE)
        # EVICT_FIRST: the words are streamed (read once). SWAP: accumulate (W x^T) [BLOCK_N,
        # BLOCK_M], the decoded weight as the first operand of the product.
        FIELDS: tl.constexpr = 32 // WIDTH
        ROWS_PER_GROUP: tl.constexpr = GROUP // FIELDS
        MASK: tl.constexpr = (1 << WIDTH) - 1
        # Rule 7: two weights per instruction, in float16 pairs, for float16 x and scales.
        PAIRS: tl.constexpr = x_ptr.dtype.element_ty == tl.float16 and s_ptr.dtype.element_ty == tl.float16
        pid_n, pid_m, pid_k, offs_m, offs_n, m_ok, n_ok = block_offsets(M, N, BLOCK_M, BLOCK_N)
        row_begin = pid_k * rows_per_split
        row_end = K // FIELDS
        if SWAP:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for r0 in range(row_begin, row_begin + rows_per_split, BLOCK_W):
            rows = r0 + tl.arange(0, BLOCK_W)
            row_ok = rows < row_end
            words = _load_words(w_ptr, rows, offs_n, row_end, n_ok, N, EVICT_FIRST)
            ok = row_ok[:, None] & n_ok[None, :]
            group = rows // ROWS_PER_GROUP
            scale = tl.load(s_ptr + group[:, None] * N + offs_n[None, :], mask=ok, other=0.0)
            if SYMMETRIC:
                offset = 1024.0 + ZERO
            else:
                zero = tl.load(z_ptr + group[:, None] * N + offs_n[None, :], mask=ok, other=0.0)
                offset = 1024.0 + zero
            xs = x_tile_fields(x_ptr, offs_m, rows, m_ok[:, None] & row_ok[None, :], stride_xm, BLOCK_M, BLOCK_W, FIELDS)
            for i in tl.static_range(FIELDS):
                if PAIRS:
                    if SYMMETRIC:
                        w = tl.inline_asm_elementwise(PAIR_ASM[32 * WIDTH + 16 + i], "=r,r,r,r", [words, scale],
                                                      dtype=tl.float16, is_pure=True, pack=2)
                    else:
                        w = tl.inline_asm_elementwise(PAIR_ASM[32 * WIDTH + i], "=r,r,r,r,r", [words, scale, zero],
                                                      dtype=tl.float16, is_pure=True, pack=2)
                else:
                    # Rule 2: float16 1024 + u from one mask-and-or.
                    bits16 = (((words >> (WIDTH * i)) & MASK) | 0x6400).to(tl.int16)
                    w = ((bits16.to(tl.float16, bitcast=True) - offset) * scale).to(x_ptr.dtype.element_ty)
                xk = xs[i]
                if SWAP:
                    acc = tl.dot(tl.trans(w), tl.trans(xk), acc)
                else:
                    acc = tl.dot(xk, w, acc)
        if SWAP:
            acc = tl.trans(acc)
        n_blocks = tl.num_programs(0)
        finish_split(acc, y_ptr, part_ptr, count_ptr, offs_m, offs_n, M, N, stride_ym,
               pid_m * n_blocks + pid_n, pid_k, n_split, SEPARATE)

    @triton.jit
    def _int_words(words, scale, zero, WIDTH: tl.constexpr, SYMMETRIC: tl.constexpr):
        """Rule 8: words [R, C] -> their weights [R, C, F] as float16, field i at [.., i]. tl.join adds
        its axis last, so the first join (fields i and i + F/2) is the slowest axis of the result."""
        asm: tl.constexpr = WORD_ASM[2 * WIDTH + SYMMETRIC]
        constraints: tl.constexpr = WORD_CONSTRAINTS[WIDTH]
        if WIDTH == 8:
            f0, f1, f2, f3 = tl.inline_asm_elementwise(
                asm, constraints, [words, scale, zero], dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                is_pure=True, pack=1)
            w = tl.join(tl.join(f0, f2), tl.join(f1, f3))
        elif WIDTH == 4:
            f0, f1, f2, f3, f4, f5, f6, f7 = tl.inline_asm_elementwise(
                asm, constraints, [words, scale, zero], dtype=(tl.float16, ) * 8, is_pure=True, pack=1)
            w = tl.join(tl.join(tl.join(f0, f4), tl.join(f2, f6)), tl.join(tl.join(f1, f5), tl.join(f3, f7)))
        else:
            f0, f1, f2, f3, f4, f5, f6, f7, f8, f9, f10, f11, f12, f13, f14, f15 = tl.inline_asm_elementwise(
                asm, constraints, [words, scale, zero], dtype=(tl.float16, ) * 16, is_pure=True, pack=1)
            w = tl.join(tl.join(tl.join(tl.join(f0, f8), tl.join(f4, f12)), tl.join(tl.join(f2, f10), tl.join(f6, f14))),
                        tl.join(tl.join(tl.join(f1, f9), tl.join(f5, f13)), tl.join(tl.join(f3, f11), tl.join(f7, f15))))
        return tl.reshape(w, (words.shape[0], words.shape[1], 32 // WIDTH))

    @triton.jit
    def _operands_read(acc):
        """Rule 8: an empty asm block reading ``acc``; Triton waits for the wgmmas in flight first."""
        return tl.inline_asm_elementwise("", "=r,0", [acc], dtype=tl.float32, is_pure=False, pack=1)

    @triton.jit
    def prefill_x(x_ptr, offs_m, m_ok, stride_xm, r0, row_end, BLOCK_W: tl.constexpr, INPUTS: tl.constexpr):
        """Rule 8: the tile of x [BLOCK_M, BLOCK_W * INPUTS] that BLOCK_W rows of words from ``r0`` meet
        (INPUTS inputs per row; zeros from ``row_end`` on)."""
        inputs = r0 * INPUTS + tl.arange(0, BLOCK_W * INPUTS)
        return tl.load(x_ptr + offs_m[:, None] * stride_xm + inputs[None, :],
                       mask=m_ok[:, None] & (inputs < row_end * INPUTS)[None, :], other=0.0)

    @triton.jit
    def prefill_step(acc, w, x):
        """Rule 8: ``acc`` [BLOCK_N, BLOCK_M] plus the product of the decoded weights ``w`` [rows, BLOCK_N,
        inputs per row] (in register order: the wgmma's register operand) and x^T, after which Triton
        waits for the wgmmas (:func:`_operands_read`)."""
        w = tl.reshape(tl.permute(w, (1, 0, 2)), (w.shape[1], w.shape[0] * w.shape[2]))
        return _operands_read(tl.dot(w, tl.trans(x), acc))

    @triton.jit
    def _prefill_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, part_ptr, count_ptr,
                        M, N, K, stride_xm, stride_ym, rows_per_split, n_split,
                        WIDTH: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SEPARATE: tl.constexpr = False):
        # Rule 8: float16 x and scales. Accumulates (W x^T) [BLOCK_N, BLOCK_M], the decoded weight the
        # first operand; K in steps of BLOCK_W rows of words (FIELDS inputs each).
        start_sum(SEPARATE)
        FIELDS: tl.constexpr = 32 // WIDTH
        ROWS_PER_GROUP: tl.constexpr = GROUP // FIELDS
        pid_n, pid_m, pid_k, offs_m, offs_n, m_ok, n_ok = block_offsets(M, N, BLOCK_M, BLOCK_N)
        row_begin = pid_k * rows_per_split
        row_end = tl.minimum(row_begin + rows_per_split, K // FIELDS)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for r0 in range(row_begin, row_end, BLOCK_W):
            rows = r0 + tl.arange(0, BLOCK_W)
            x = prefill_x(x_ptr, offs_m, m_ok, stride_xm, r0, row_end, BLOCK_W, FIELDS)
            ok = (rows < row_end)[:, None] & n_ok[None, :]
            words = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=ok, other=0)
            group = rows // ROWS_PER_GROUP
            scale = tl.load(s_ptr + group[:, None] * N + offs_n[None, :], mask=ok, other=0.0)
            if SYMMETRIC:
                zero = scale  # unused
            else:
                zero = tl.load(z_ptr + group[:, None] * N + offs_n[None, :], mask=ok, other=0.0)
            acc = prefill_step(acc, _int_words(words, scale, zero, WIDTH, SYMMETRIC), x)
        finish_split(tl.trans(acc), y_ptr, part_ptr, count_ptr, offs_m, offs_n, M, N, stride_ym,
                     pid_m * tl.num_programs(0) + pid_n, pid_k, n_split, SEPARATE)

    @triton.jit
    def _dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K,
                   WIDTH: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
        # W.T as float16 [K, N] (coalesced stores along N) for dequantize-then-matmul.
        FIELDS: tl.constexpr = 32 // WIDTH
        ROWS_PER_GROUP: tl.constexpr = GROUP // FIELDS
        MASK: tl.constexpr = (1 << WIDTH) - 1
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        ok = (rows[:, None] < K // FIELDS) & (offs_n[None, :] < N)
        words = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=ok, other=0)
        group = rows // ROWS_PER_GROUP
        scale = tl.load(s_ptr + group[:, None] * N + offs_n[None, :], mask=ok, other=0.0)
        offset = 1024.0 + tl.load(z_ptr + group[:, None] * N + offs_n[None, :], mask=ok, other=0.0)
        for i in tl.static_range(FIELDS):
            bits16 = (((words >> (WIDTH * i)) & MASK) | 0x6400).to(tl.int16)
            w = ((bits16.to(tl.float16, bitcast=True) - offset) * scale).to(tl.float16)
            tl.store(out_ptr + (rows * FIELDS + i)[:, None] * N + offs_n[None, :], w, mask=ok)




def intn_config(m: int, w: IntNWeights, sms: int, decode: tuple | None = None,
                tensor_cores: tuple | None = None) -> LaunchConfig | None:
    """Heuristic launch shape (tuned on an H100, see docs/benchmarks/kernels.md); above
    ``PREFILL_ROWS`` rows the prefill kernel's (:func:`prefill_config`), or None where
    dequantize-then-matmul is faster (it also runs for x or scales that are not float16).

    ``decode`` overrides the decode kernel's launch, of one row and of a few (rule 5; rows per
    program as :func:`rows_per_program` says, or ``ROWS_PER_PROGRAM`` where it picks the tensor cores):
    (block_n, block_w, num_warps, programs_per_sm, prefetch[, inline_zero[, evict_first]]);
    ``tensor_cores`` the 2-16 row launch: (block_n, block_w, num_warps,
    programs_per_sm[, evict_first[, swap[, num_stages]]]) (``swap``: the decoded weight as the first
    operand of ``tl.dot``; ``num_stages`` 3 unless given). ``programs_per_sm`` may be a fraction: at
    or below one program per output block (0 included) there is no split-K (no reduction across
    programs). Memoized by value (the rules are this module's constants), as the launchers call it
    on every call.
    """
    if w.bits == INT3:
        from llmc.plugins.int3_linear import int3_config

        return int3_config(m, w, sms, decode, tensor_cores)
    return _intn_config(m, w.bits, w.group_size, w.symmetric, w.in_features, w.out_features, sms, decode, tensor_cores)


@functools.lru_cache(maxsize=4096)
def _intn_config(m: int, bits: int, group_size: int, symmetric: bool, in_features: int, out_features: int, sms: int,
                 decode: tuple | None, tensor_cores: tuple | None) -> LaunchConfig | None:
    # intn_config by value, so that a launcher's call is a dictionary lookup
    word_rows = in_features // fields_per_word(_width(bits))
    rows = 0 if tensor_cores is not None else rows_per_program(m, in_features, out_features, bits)
    if decode is not None and tensor_cores is None and not rows and m <= PREFILL_ROWS:
        rows = several_rows(m)
    if rows:
        if decode is None and rows > 1:
            decode = multi_row_shape(m, in_features, out_features, MULTI_ROW_SHAPE_SMALL, MULTI_ROW_SHAPE_WIDE,
                                     MULTI_ROW_SHAPE_NARROW)
        elif decode is None and m > 1 and no_split_rows(in_features, bits):  # per row, no split-K
            decode = ROW_GRID_SHAPE if symmetric else decode_shape(in_features * out_features, DECODE_SHAPES_SHORT)
        elif decode is None:
            decode = one_row_shape(in_features, out_features, sms, DECODE_SHAPES, DECODE_SHAPE_WIDE,
                                   DECODE_SHAPE_NARROW, DECODE_SHAPE_LARGE, DECODE_SHAPES_SHORT if m == 1 else None)
        group_rows = 0 if group_size == in_features else group_size // fields_per_word(_width(bits))
        return decode_config(decode, out_features, word_rows, sms, rows, group_rows)
    if m > PREFILL_ROWS and tensor_cores is None and not (
            bits == 4 and m <= TENSOR_CORE_PREFILL_ROWS and in_features * out_features >= FUSED_WEIGHTS):
        return prefill_config(m, bits, in_features, out_features, sms)
    if tensor_cores is None and wide_small(in_features, out_features):
        tensor_cores = TENSOR_CORE_SHAPE_WIDE
    if tensor_cores is None:
        tensor_cores = decode_shape(in_features * out_features, TENSOR_CORE_SHAPES)
    return tensor_core_config(tensor_cores, out_features, word_rows, sms)


# (block_n, block_w, num_warps, programs per SM, prefetch, inline zero point, evict-first) of the
# one-row kernel below 2^23 weights where K is longer than SHORT_K, by weight count (below 2^20,
# above). Picked by `benchmarks/kernels.py --explore` and repeated A/B runs on an H100
# (docs/benchmarks/kernels-rounds.md): narrow blocks of outputs with 128-256 rows of words, split-K.
DECODE_SHAPES = ((1 << 20, (16, 256, 4, 1, False, True)), (None, (64, 128, 8, 0.5, False, True)))


# One row from NO_SPLIT_WEIGHTS weights: one program per block of outputs reads all of K, no split-K
# (no partials, no last-program sum). Round 8 (H100, with x in the words' layout, rule 6,
# docs/benchmarks/kernels-rounds.md), int4 us against round 7's launches:
# - at most NARROW_OUTPUTS_PER_SM outputs per SM (q/k/v/o and down projections): 16 outputs x 512
#   rows of words per step, 8 warps (4096x4096 6.5 -> 5.6, 8960->1536 9.5 -> 7.3, 11008->2048 10.8 ->
#   8.0, 14336->4096 16.5 -> 15.2);
# - more (gate/up projections, 5120x5120): 32 outputs x 64 rows of words per step, 8 warps, prefetch,
#   evict-first (4096->11008 14.5 -> 11.8, 2048->8192 7.9 -> 5.9, 5120x5120 17.3 -> 9.9; 3584->18944
#   17.0 -> 18.0 is the one loss measured);
# - from 2^27 weights, the split-K launch of round 2 (64 outputs x 8 rows, 2 warps, 16 programs per
#   SM): without split-K, asymmetric int4 g32 and int8 lost 8-27 us on 8192->28672 and 28672->8192
#   (int4 g32 28672->8192 59.5 -> 86.2), where symmetric int4 g128 gained at most 2 us.
# Below that, int4/int8 with K up to SHORT_K: one program per block of 16 outputs (32 from 2^21
# weights) reads all of K in steps of 128 rows of words, 8 warps, no split-K (round 6: 896x896 3.8
# -> 2.5 us, 2048x2048 6.2 -> 4.2); otherwise the size class's split-K launch (4864->896, 8192->512).
DECODE_SHAPE_WIDE = (32, 64, 8, 0, True, True, True)
DECODE_SHAPE_NARROW = (16, 512, 8, 0, False, True, True)
DECODE_SHAPE_LARGE = (1 << 27, (64, 8, 2, 16, True, True, True))
DECODE_SHAPES_SHORT = ((1 << 21, (16, 128, 8, 0, True, True, True)), (None, (32, 128, 8, 0, True, True, True)))
NO_SPLIT_WEIGHTS = 1 << 23  # also FP6's bound for its small no-split launch (fp6_linear)
NARROW_OUTPUTS_PER_SM = 32
SHORT_K = 3072


def one_row_shape(in_features: int, out_features: int, sms: int, table, wide: tuple, narrow: tuple,
                  large: tuple | None = None, short=None) -> tuple:
    """The one-row launch shape (see above): from NO_SPLIT_WEIGHTS weights ``narrow`` or ``wide``,
    or ``large`` = (weights, shape) from that many weights; below, a size class of ``short`` (K up
    to SHORT_K) or of ``table``."""
    weights = in_features * out_features
    if weights >= NO_SPLIT_WEIGHTS:
        if large is not None and weights >= large[0]:
            return large[1]
        return narrow if out_features <= NARROW_OUTPUTS_PER_SM * sms else wide
    if short is not None and in_features <= SHORT_K:
        return decode_shape(weights, short)
    return decode_shape(weights, table)


def decode_shape(weights: int, table) -> tuple:
    """The launch shape of the first size class of ``table`` that ``weights`` falls under."""
    return next(shape for limit, shape in table if limit is None or weights < limit)


# (block_n, block_w, num_warps, programs per SM) of the 2-16 row tensor-core kernel by weight count.
# Optional fields as in ``intn_config``: evict-first, swap, num_stages. Below 2^23 weights 64 x 16
# rows, 4 warps, 2 stages: round 10 took it for 2^21-2^23 (int4 at 16 rows against round 3's 64 x 32
# rows, 8 warps: 896->4864 10.2 -> 7.8 us, 4864->896 10.9 -> 8.6), and with the separate split-K
# finish (round 11, H100, ``splitk``) it also beat round 1's 32 x 16 rows, 8 per SM, and round 3's
# 32 x 32 rows (int4 with K >= 768) below 2^21 (at 16 rows: 576->1536 4.2 -> 3.9 us, 1536->576 4.3
# -> 4.1, 896x896 4.1 -> 4.0; 576x576 3.65 both). From 2^23, 128 x 16 rows (4096x4096 at 16 rows
# 9.9 against 13.0 us for 64 x 16). TENSOR_CORE_SHAPE_WIDE: from 2^21 to 2^23 weights with at least
# WIDE_OUTPUTS_PER_INPUT outputs per input (``wide_small``), 64 outputs a program over all of K, no
# split-K, 3 stages (round 10, int4 896->4864: 7.7 -> 6.1 us at 16 rows, 7.4 -> 6.0 at 8; round 11:
# 5.7 against 6.4 for the split launch with the separate finish).
TENSOR_CORE_SHAPES = ((1 << 23, (64, 16, 4, 2, False, False, 2)), (None, (128, 16, 4, 2)))
TENSOR_CORE_SHAPE = TENSOR_CORE_SHAPES[-1][1]
TENSOR_CORE_SHAPE_WIDE = (64, 16, 4, 0, False, False, 3)
# A few rows of x run the decode kernel too (rule 5), not the tensor-core kernel:
# - below ROW_GRID_WEIGHTS weights, up to ROW_GRID_ROWS rows, one row per program (round 5: the
#   rows' programs run together and share the words through L2; 576x576 at 4 rows 4.4 -> 3.6 us
#   against the tensor cores). Each row takes ROW_GRID_SHAPE (16 outputs x 128 rows of words, no
#   split-K) where K x bits is at most NO_SPLIT_ROW_BITS (round 7: 576x576 at 4 rows 3.6 -> 2.8 us;
#   round 11: 16 outputs, not 32, from 2^21 weights too, int4 at 4 rows 4864->896 7.6 -> 5.4 us,
#   1536x1536 5.1 -> 4.3, int8 5.5 -> 5.0; asymmetric weights keep the short launch of their weight
#   count, which was faster for them: int4 g32 at 4 rows 4864->896 7.8 against 8.9, 2048x2048 5.7
#   against 6.4), else its size class's;
# - elsewhere up to the rows of MULTI_ROW (FP6: MULTI_ROW_FP6) below their weight counts, and
#   beyond ROW_GRID_ROWS rows only where the outputs are at least the inputs, ROWS_PER_PROGRAM rows
#   per program (2 for two rows), each word decoded once for all of them (round 9, H100, int4 us
#   against the tensor cores: 4096x4096 at 2 rows 13.2 -> 7.5, at 4 rows 13.4 -> 9.8; 11008->4096
#   30.7 -> 20.1 at 4 rows; 896->4864 10.0 -> 5.7 at 4 rows; docs/benchmarks/kernels-rounds.md). More rows
#   or weights: tensor cores. Round 11's separate split-K finish made the tensor cores cheaper at 5-16
#   rows, and the limits moved down (H100, int4 / FP6 us, several rows per program against the tensor
#   cores): at 8 rows 1536x1536 6.3 / 7.1 against 5.3 / 5.8, 2048x2048 6.7 / 7.4 against 5.7 / 6.5,
#   4864->896 7.6 / 9.0 against 6.8 / 7.9, 1536->576 4.1 / 4.6 against 4.0 / 4.3; at 16 rows
#   576->1536 4.3 / 5.7 against 3.9 / 4.6, 896x896 4.2 / 4.3 against 4.0 / 4.2; several rows per
#   program stayed faster at 8 rows on 576x576, 576->1536 and 896x896 (int4 3.2, 3.7, 3.3 against
#   3.6, 3.8, 3.9) and at 16 on 576x576 (3.5 against 3.7).
#   Round 7's rows of int-N weights keep one row per program below NO_SPLIT_WEIGHTS: 3-4 rows where
#   each row takes the short launch (K x bits up to NO_SPLIT_ROW_BITS) on linears with fewer than
#   WIDE_OUTPUTS_PER_INPUT outputs per input (round 9, int4 4864->896 at 4 rows: 7.6 us against 8.0
#   with 4 rows per program), and int8 at 2 rows (4864->896: 8.7 against 10.5).
#   Since rule 7's decode (round 10), int-N takes the tensor cores from 3 rows on linears with more
#   outputs than inputs from NO_SPLIT_WEIGHTS and on every linear from TENSOR_CORE_ROWS_WEIGHTS (int4
#   at 4 rows: 4096->11008 24.8 -> 19.5 us, 8192->28672 92.0 -> 71.8, 28672->8192 91.6 -> 78.4; 4096x4096,
#   11008->4096 and 14336->4096 stay faster with 4 rows per program: 10.0, 19.9, 24.4 against 11.9,
#   23.6, 28.8), and from 5 rows on ``wide_small`` linears (896->4864 at 8 rows: 7.2 -> 6.0); FP6 takes
#   them from 3 rows on the wider linears too (round 11, 4096->11008 at 4 rows 32.2 -> 29.2 us).
#   Launch (``multi_row_shape``): no split-K; 16 outputs x 128 rows of words, 8 warps where the
#   outputs are at most the inputs and up to 8 rows; 32 x 64, 8 warps on wider linears (int-N: at 2 rows) from
#   NO_SPLIT_WEIGHTS; otherwise 16 x 32, 4 warps (its registers hold 4 rows x 4 words per thread).
#   8 or 16 rows of x per program were slower than 4 on all seven small shapes measured (round 10).
ROW_GRID_WEIGHTS = 1 << 21
ROW_GRID_ROWS = 4
ROW_GRID_SHAPE = DECODE_SHAPES_SHORT[0][1]
NO_SPLIT_ROW_BITS = 3072 * 8
WIDE_OUTPUTS_PER_INPUT = 4
TENSOR_CORE_ROWS_WEIGHTS = 1 << 27
MULTI_ROW = ((4, None), (8, 1 << 20), (16, 1 << 19))
MULTI_ROW_FP6 = ((2, None), (4, 1 << 26), (8, 1 << 20), (16, 1 << 19))
ROWS_PER_PROGRAM = 4
MULTI_ROW_SHAPE_NARROW = (16, 128, 8, 0, True, True, True)
MULTI_ROW_SHAPE_WIDE = (32, 64, 8, 0, True, True, True)
MULTI_ROW_SHAPE_SMALL = (16, 32, 4, 0, True, True, True)
MULTI_ROW_NARROW_ROWS = 8


def no_split_rows(in_features: int, bits: int) -> bool:
    """Whether each row of a few rows of x, one row per program, takes the no-split launch."""
    return in_features * bits <= NO_SPLIT_ROW_BITS


def rows_per_program(m: int, in_features: int, out_features: int, bits: int) -> int:
    """Rows of x per program of the decode kernel for ``m`` rows on a [out_features, in_features]
    linear of ``bits``-bit weights (6: FP6); 0 where the tensor-core kernel runs (see above)."""
    weights = in_features * out_features
    if m == 1 or m <= ROW_GRID_ROWS and weights < ROW_GRID_WEIGHTS:
        return 1
    if bits != 6 and weights < NO_SPLIT_WEIGHTS and (
            m <= 2 and bits == 8
            or 2 < m <= ROW_GRID_ROWS and no_split_rows(in_features, bits) and out_features < WIDE_OUTPUTS_PER_INPUT * in_features):
        return 1
    if m > 2 and out_features > in_features and weights >= NO_SPLIT_WEIGHTS or bits != 6 and (
            m > 2 and weights >= TENSOR_CORE_ROWS_WEIGHTS or m > ROW_GRID_ROWS and wide_small(in_features, out_features)):
        return 0
    if m > ROW_GRID_ROWS and out_features < in_features:
        return 0
    if any(m <= rows and (limit is None or weights < limit) for rows, limit in (MULTI_ROW_FP6 if bits == 6 else MULTI_ROW)):
        return several_rows(m)
    return 0


def wide_small(in_features: int, out_features: int) -> bool:
    """From ROW_GRID_WEIGHTS to NO_SPLIT_WEIGHTS weights with at least WIDE_OUTPUTS_PER_INPUT outputs per
    input: int-N's tensor cores run without split-K (TENSOR_CORE_SHAPE_WIDE), from 5 rows."""
    weights = in_features * out_features
    return ROW_GRID_WEIGHTS <= weights < NO_SPLIT_WEIGHTS and out_features >= WIDE_OUTPUTS_PER_INPUT * in_features


def several_rows(m: int) -> int:
    """Rows of x per program where ``m`` rows take several per program: 2 for two, else 4."""
    return min(ROWS_PER_PROGRAM, pow2_at_least(m))


def multi_row_shape(m: int, in_features: int, out_features: int, small: tuple, wide: tuple, narrow: tuple) -> tuple:
    """The decode launch of ``m`` rows taken several per program (see above); ``wide`` None: ``small``
    on every linear with more outputs than inputs."""
    if m <= MULTI_ROW_NARROW_ROWS and out_features <= in_features:
        return narrow
    if wide is not None and m <= MULTI_ROW_NARROW_ROWS and in_features * out_features >= NO_SPLIT_WEIGHTS:
        return wide
    return small


# Above this many rows, the 2-16 row kernels give way to rule 8's prefill kernel, or to
# dequantize-then-cuBLAS.
PREFILL_ROWS = 16
# Rule 8 (float16 x and scales; 6: FP6, fp6_linear rule 7): where it runs, by bits, (from weights,
# up to rows below FUSED_WEIGHTS weights, up to rows from FUSED_WEIGHTS); more rows dequantize and
# call cuBLAS. Set from benchmarks/kernels_prefill.py on an H100 (docs/benchmarks/kernels-prefill.md):
# int2/int4/FP6 beat dequantize-then-cuBLAS on every shape up to 64 rows and on the large ones up to
# 128; int8 only from 2^24 weights, up to 64 rows (below 2^24, 0.83-1.14x: mixed). Launch: (block_n, inputs per step, num_warps,
# num_stages), blocks of 64 rows of x up to 64 rows, of 128 beyond, and split-K to about
# PREFILL_PROGRAMS_PER_SM programs per SM.
FUSED_WEIGHTS = 1 << 25
PREFILL_RULES = {2: (0, 64, 128), 4: (0, 64, 128), 6: (0, 64, 128), 8: (1 << 24, 64, 64)}
# From FUSED_WEIGHTS weights, int4 at 17 to 32 rows runs the 2-16 row tensor-core kernel (in blocks of
# 16 rows of x) instead: 8192->28672 at 32 rows 116 against 164 us, 4096->11008 31.6 against 35.4 (H100).
TENSOR_CORE_PREFILL_ROWS = 32
PREFILL_SHAPE = (64, 64, 4, 4)
PREFILL_PROGRAMS_PER_SM = 2


def prefill_config(m: int, bits: int, in_features: int, out_features: int, sms: int) -> LaunchConfig | None:
    """Rule 8's launch over ``m`` rows of x (more than ``PREFILL_ROWS``), or None where
    dequantize-then-matmul runs."""
    least, small, large = PREFILL_RULES[bits]
    weights = in_features * out_features
    if weights < least or m > (large if weights >= FUSED_WEIGHTS else small):
        return None
    return prefill_launch(m, bits, in_features, out_features, sms)


def inputs_per_row(bits: int) -> int:
    """Inputs per row of the plane a prefill step walks (rules 8 and 9): the fields of an int-N word,
    and for FP6 (bits 6) its 2-bit plane's 16."""
    return 16 if bits == 6 else fields_per_word(_width(bits))


def prefill_launch(m: int, bits: int, in_features: int, out_features: int, sms: int) -> LaunchConfig:
    """Rule 8's launch over ``m`` rows of x, whatever ``m`` (the benchmark times it beyond the bounds):
    64 inputs per step (``block_w`` rows of words of ``32 / bits`` inputs)."""
    block_m = 64 if m <= 64 else 128
    block_n, inputs, warps, stages = PREFILL_SHAPE
    fields = inputs_per_row(bits)
    blocks = -(-m // block_m) * -(-out_features // block_n)
    split = choose_split(blocks, in_features // fields, inputs // fields, PREFILL_PROGRAMS_PER_SM * sms)
    return LaunchConfig(block_m, block_n, inputs // fields, warps, stages, split)


# (block_n, block_w) of the dequantize kernel.
DEQUANTIZE_SHAPE = (256, 8)


def _width(bits: int) -> int:
    if bits not in KERNEL_BITS:
        raise ValueError(f"intn_linear: no kernel for {bits}-bit weights (kernels: {KERNEL_BITS})")
    return INT_PLANE_WIDTHS[bits][0]


def intn_linear(x: torch.Tensor, w: IntNWeights, config: LaunchConfig | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` for float16/bfloat16 ``x`` [..., K] on a CUDA device, in ``x``'s dtype.

    ``out``, if given, is a contiguous [rows, N] tensor of ``x``'s dtype or float32 to write into (the kernels
    store their float32 sums in ``out``'s dtype; the TensorRT plugins' float32 outputs). 3-bit weights run
    ``llmc.plugins.int3_linear``'s kernels.
    """
    x2 = as_rows(x, w.in_features, "intn_linear")
    m, n, k = x2.shape[0], w.out_features, w.in_features
    if w.bits == INT3:
        from llmc.plugins.int3_linear import int3_linear

        return int3_linear(x2, w, config, out).reshape(*x.shape[:-1], n)
    width = _width(w.bits)
    halves = x.dtype == w.scale.dtype == torch.float16
    require_triton()
    if config is None and m > PREFILL_ROWS:
        from llmc.plugins import wgmma_prefill  # here: it imports this module (rule 8's PTX)

        y = wgmma_prefill.where_its_rule_runs(x2, w, w.bits, out)  # rule 9
        if y is not None:
            return y.reshape(*x.shape[:-1], n)
        config = intn_config(m, w, sm_count(x.device))
        if config is None or config.block_m > 16 and not halves:  # dequantize, then cuBLAS
            y = matmul_into(x2, intn_dequantize(w, x.dtype).t(), out)
            return y.reshape(*x.shape[:-1], n)
    if config is None and 0 < m <= PREFILL_ROWS and halves:
        from llmc.plugins import mma_decode

        y = mma_decode.where_its_rule_runs(x2, w, out)  # rule 10
        if y is not None:
            return y.reshape(*x.shape[:-1], n)
    config = config or intn_config(m, w, sm_count(x.device))
    if config.block_m > 16 and not halves:
        raise ValueError("intn_linear: the prefill kernel takes float16 x and float16 scales")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    split, rows = config.split, config.rows
    run = splitk.launch(config, m, n, x.device)
    part, count, grid_n = run.part, run.count, run.grid_n
    common = dict(WIDTH=width, GROUP=w.group_size, SYMMETRIC=w.symmetric, ZERO=float(1 << (w.bits - 1)),
                  BLOCK_N=config.block_n, BLOCK_W=config.block_w, num_warps=config.num_warps,
                  num_stages=config.num_stages, SEPARATE=run.separate, **COMPILE_OPTIONS)
    if config.block_m == 1:
        x2 = decode_rows(x2)
        decode = dict(CHANNEL=w.group_size == k, PREFETCH=config.prefetch, INLINE_ZERO=config.inline_zero and w.group_size != k,
                      EVICT_FIRST=config.evict_first, **common)
        if rows == 1:
            _gemv_kernel[(grid_n, split.split, m)](
                x2, w.planes[0], w.scale, w.zero, y, part, count, n, k, y.stride(0),
                split.rows_per_split, split.split, ROW_GRID=m > 1, **decode)
        else:
            _gemv_rows_kernel[(grid_n, split.split, run.row_blocks)](
                x2, w.planes[0], w.scale, w.zero, y, part, count, n, k, y.stride(0),
                split.rows_per_split, split.split, m, ROWS=rows, ROW_BLOCKS=run.row_blocks > 1, **decode)
    elif config.block_m == 16:
        _gemm_kernel[(grid_n, run.grid_m, split.split)](
            x2, w.planes[0], w.scale, w.zero, y, part, count, m, n, k, x2.stride(0), y.stride(0),
            split.rows_per_split, split.split, BLOCK_M=config.block_m, EVICT_FIRST=config.evict_first,
            SWAP=config.swap, **common)
    else:
        _prefill_kernel[(grid_n, run.grid_m, split.split)](
            x2, w.planes[0], w.scale, w.zero, y, part, count, m, n, k, x2.stride(0), y.stride(0),
            split.rows_per_split, split.split, WIDTH=width, GROUP=w.group_size, SYMMETRIC=w.symmetric, BLOCK_M=config.block_m,
            BLOCK_N=config.block_n, BLOCK_W=config.block_w, num_warps=config.num_warps,
            num_stages=config.num_stages, SEPARATE=run.separate, **COMPILE_OPTIONS)
    run.finish(y)
    return y.reshape(*x.shape[:-1], n)


def decode_rows(x2: torch.Tensor) -> torch.Tensor:
    """``x2`` [rows, K] as the decode kernels read it: rows K apart (rule 5), and 16-byte aligned
    for the vector loads of rule 6 (a copy if it is not)."""
    if (x2.shape[0] > 1 and x2.stride(0) != x2.shape[1]) or x2.data_ptr() % 16:
        return x2.clone(memory_format=torch.contiguous_format)
    return x2


def intn_dequantize(w: IntNWeights, dtype: torch.dtype = torch.float16,
                    block: tuple[int, int] | None = None) -> torch.Tensor:
    """The weight [N, K] in ``dtype`` on the GPU, by a Triton kernel (dequantize-then-matmul).

    Returned as the transposed view of a [K, N] tensor, which cuBLAS reads as it is.
    """
    require_triton()
    if w.bits == INT3:
        from llmc.plugins.int3_linear import int3_dequantize

        return int3_dequantize(w, dtype, block)
    width = _width(w.bits)
    out = torch.empty(w.in_features, w.out_features, dtype=torch.float16, device=w.planes[0].device)
    block_n, block_w = block or DEQUANTIZE_SHAPE
    word_rows = w.in_features // fields_per_word(width)
    grid = (-(-w.out_features // block_n), -(-word_rows // block_w))
    _dequantize_kernel[grid](w.planes[0], w.scale, w.zero, out, w.out_features, w.in_features,
                                   WIDTH=width, GROUP=w.group_size, BLOCK_N=block_n, BLOCK_W=block_w,
                                   **COMPILE_OPTIONS)
    return (out if dtype == torch.float16 else out.to(dtype)).t()


def size_classes(table) -> list:
    """(name, launch shape) of each size class of ``table``: ``<2^20`` ... ``large``."""
    return [(f"<2^{limit.bit_length() - 1}" if limit else "large", shape) for limit, shape in table]


def decode_classes(table, wide: tuple, narrow: tuple, large: tuple, short=()) -> list:
    """(name, launch shape) of every one-row launch the heuristics pick from ``table``, the wide,
    narrow and large shapes and ``short``'s, for the compile table."""
    return [*size_classes(table), ("wide", wide), ("narrow", narrow), (f"from-2^{large[0].bit_length() - 1}", large[1]),
            *((f"short-{size}", shape) for size, shape in size_classes(short))]


def kernel_variants() -> list:
    """The kernels :func:`intn_linear` and :func:`intn_dequantize` launch at their shipped launch
    shapes, for ``llmc.plugins.aot``."""
    from llmc.plugins.aot import KernelVariant

    pointers = dict(x_ptr="*fp16", w_ptr="*i32", s_ptr="*fp16", z_ptr="*fp16", y_ptr="*fp16",
                    part_ptr="*fp32", count_ptr="*i32")
    aligned = (*pointers, "N", "K", "stride_ym", "rows_per_split")
    gemv_args = {**pointers, "N": "i32", "K": "i32", "stride_ym": "i32", "rows_per_split": "i32", "n_split": "i32"}
    gemm_args = {**pointers, "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32",
                 "rows_per_split": "i32", "n_split": "i32"}
    variants = []
    for bits, symmetric, group in ((4, True, 128), (4, False, 32), (8, True, -1)):
        tag = f"int{bits}-{'sym' if symmetric else 'asym'}-{'channel' if group == -1 else f'g{group}'}"
        common = dict(WIDTH=INT_PLANE_WIDTHS[bits][0], GROUP=4096 if group == -1 else group,
                      SYMMETRIC=symmetric, ZERO=float(1 << (bits - 1)))
        one_row = [(f"gemv-{tag}-{size}", shape, 1) for size, shape in decode_classes(
            DECODE_SHAPES, DECODE_SHAPE_WIDE, DECODE_SHAPE_NARROW, DECODE_SHAPE_LARGE, DECODE_SHAPES_SHORT)]
        several = [(f"gemv{ROWS_PER_PROGRAM}-{tag}-{size}", shape, ROWS_PER_PROGRAM) for size, shape in
                   (("narrow", MULTI_ROW_SHAPE_NARROW), ("wide", MULTI_ROW_SHAPE_WIDE), ("small", MULTI_ROW_SHAPE_SMALL))]
        for name, (block_n, block_w, warps, _, prefetch, inline_zero, *evict), rows in one_row + several:
            variants.append(KernelVariant(
                f"intn-{name}", _gemv_kernel if rows == 1 else _gemv_rows_kernel,
                gemv_args if rows == 1 else {**gemv_args, "x_rows": "i32"},
                {**common, "CHANNEL": group == -1, "BLOCK_N": block_n, "BLOCK_W": block_w, "PREFETCH": prefetch,
                 "INLINE_ZERO": inline_zero and group != -1, "EVICT_FIRST": bool(evict and evict[0]),
                 **({"ROW_GRID": False} if rows == 1 else {"ROWS": rows, "ROW_BLOCKS": False})},
                warps, 1, aligned))
        tensor_core_shapes = [*size_classes(TENSOR_CORE_SHAPES), ("<2^23-wide", TENSOR_CORE_SHAPE_WIDE)]
        for size, (block_n, block_w, warps, _, *rest) in tensor_core_shapes:
            variants.append(KernelVariant(
                f"intn-gemm16-{tag}-{size}", _gemm_kernel, gemm_args,
                {**common, "BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_W": block_w,
                 "EVICT_FIRST": bool(rest and rest[0]), "SWAP": bool(len(rest) > 1 and rest[1])}, warps,
                rest[2] if len(rest) > 2 else 3, (*aligned, "stride_xm")))
    block_n, inputs, warps, stages = PREFILL_SHAPE
    for bits, symmetric, group in ((4, True, 128), (4, False, 32), (8, True, 4096), (2, False, 32)):
        for block_m in (64, 128):
            width = INT_PLANE_WIDTHS[bits][0]
            variants.append(KernelVariant(
                f"intn-prefill{block_m}-int{bits}-{'sym' if symmetric else 'asym'}-g{group}", _prefill_kernel, gemm_args,
                dict(WIDTH=width, GROUP=group, SYMMETRIC=symmetric, BLOCK_M=block_m, BLOCK_N=block_n,
                     BLOCK_W=inputs // fields_per_word(width)), warps, stages, (*aligned, "stride_xm")))
    block_n, block_w = DEQUANTIZE_SHAPE
    variants.append(KernelVariant(
        "intn-dequantize-int4-g128", _dequantize_kernel,
        dict(w_ptr="*i32", s_ptr="*fp16", z_ptr="*fp16", out_ptr="*fp16", N="i32", K="i32"),
        dict(WIDTH=4, GROUP=128, BLOCK_N=block_n, BLOCK_W=block_w), 4, 1,
        ("w_ptr", "s_ptr", "z_ptr", "out_ptr", "N", "K")))
    return variants
