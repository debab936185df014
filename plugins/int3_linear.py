"""Group-wise int3 weight-only linear, ``y = x @ W.T``: ``llmc.plugins.intn_linear``'s math on two bit planes.

Weights are an :class:`~llmc.plugins.intn_linear.IntNWeights` of 3 bits (:func:`intn_linear.pack_intn`), its
codes in ``llmc.passes.bitplanes``' int3 layout at the kernel tile of 32 inputs: a 2-bit plane [K / 16, N]
with the codes' two low bits, whose word-rows ``2 t`` and ``2 t + 1`` hold the even and the odd inputs of
tile ``t`` (field ``i``: input ``32 t + 2 i`` or ``32 t + 2 i + 1``), and a 1-bit plane [K / 32, N] with
the high bit (bit ``i`` of word-row ``t``: input ``32 t + i``). Three bits a weight in all, each plane
aligned to 4 bytes. The math and its reference are ``intn_linear``'s (``scale * (u - zero)``, groups along
K; :func:`intn_linear.intn_reference`). :func:`intn_linear.intn_linear` and :func:`intn_linear.intn_dequantize`
call this module for 3-bit weights.

Kernels (rules referred to in the code):

1. Decode rows (one row of x; a few, once per row on a third grid axis or four rows of x a program, each word
   decoded once for all of them, as ``intn_linear`` rule 5 does; :func:`rows_per_program`):
   CUDA cores, float32, ``intn_linear`` rule 1 on a 3-bit field. The high plane shifted left by 2
   (even inputs) or by 1 (odd inputs) puts input ``2 i``'s (or ``2 i + 1``'s) high bit at bit ``2 i + 2``,
   just above field ``i``'s two low bits in its 2-bit word. One bitwise select per word and parity of the
   field joins the two (the even fields' codes in one word, the odd fields' in another); then one AND gives
   field ``i``'s code at bits ``2 i .. 2 i + 2``, read as a float32 the subnormal ``u * 2^(2 i - 149)``, and one
   FFMA with the activation (scaled by ``2^(100 - 2 i)``) adds ``u * x * 2^-49``: one AND and one FFMA a weight,
   as int4's, and 46 integer operations per 32 weights in all, against 70 with an AND per plane. Fields that
   would end above bit 23 are read from words shifted right by 12 (the high plane by 10 and 11). The zero point's share,
   ``scale * zero * sum(x)``, is subtracted per block of rows inside the loop, or once per output channel.
   The 32 activations of a tile are four 16-byte vector loads (``intn_linear.x_words``).
2. 3-16 rows with bfloat16 x or float32 scales (and forced launches): tensor cores. Each field becomes the
   float16 ``1024 + u`` (0x6400 OR the 3-bit code); minus ``1024 + zero``, times the scale, it is an operand of
   ``tl.dot`` with float32 accumulation, as ``intn_linear`` rule 2, one product per field.
3. Split-K as in ``llmc.plugins.splitk``; more rows than rule 4 takes (and more than 16 without float16) dequantize
   (:func:`int3_dequantize`) and call cuBLAS.
4. 3-64 rows with float16 x and scales (:func:`_int3_prefill_kernel`): one PTX block decodes a 2-bit word's 16
   fields (:func:`_word_decode_asm`): rule 1's selects join the planes, fields ``i`` and ``i + 8`` sit in the two
   halves of a joined word, and a shift and one ``lop3`` give the float16 pair ``1024 + u``, then ``sub.f16x2``
   and ``mul.f16x2`` (rule 2's float16 bit for bit). A step's 32 inputs a tile row join in input order
   (``tl.join``, :func:`_tree16`) into the first operand of one product with K = 32 inputs a tile row,
   ``intn_linear`` rule 8's prefill step (on Hopper a wgmma reading that operand from registers, with rule 8's
   wait for the wgmmas in flight). One long product a step instead of 32 short ones in a chain: faster than
   rule 2 on every shape measured at 3-16 rows, and than dequantize-then-cuBLAS at 64
   (docs/benchmarks/kernels-int3.md).
"""

from __future__ import annotations

import functools

import torch

from llmc.passes.bitplanes import int_kernel_tile
from llmc.plugins import splitk
from llmc.plugins.splitk import (COMPILE_OPTIONS, LaunchConfig, decode_config, matmul_into, require_triton,
                                 tensor_core_config, triton)

if triton is not None:
    import triton.language as tl

TILE = int_kernel_tile(3)  # 32 inputs: two words of the 2-bit plane and one of the 1-bit plane


def _word_decode_asm(parity: int, symmetric: bool) -> str:
    """PTX of rule 4 (rule 2's decode in float16 pairs): the 16 fields of a 2-bit plane word ($16; ``parity`` 0: the
    even inputs of its tile, 1: the odd ones) with their high bits from the tile's 1-bit plane word ($17), as
    float16 ``scale * (u - zero)`` in $0 .. $15 (field i, input 2 i + parity, in $i), given the scale $18 and,
    when not ``symmetric``, the zero point $19. As in rule 1, two bitwise selects join the planes (the even
    fields' 3-bit codes in one word, the odd fields' in another); fields i and i + 8 then sit in the two halves
    of one of them, and a shift and one ``lop3`` give the float16 pair ``1024 + u``. Field 15's high bit falls
    off the top of the word, so fields 7 and 15 take the two planes one at a time."""
    lines = ["mov.b32 s, {$18, $18};"]
    if symmetric:
        lines.append("mov.b32 o, 0x64046404;")  # the float16 1024 + 4
    else:
        lines += ["mov.b32 o, {$19, $19};", "mov.b32 t, 0x64006400;", "add.f16x2 o, o, t;"]  # 1024 + zero
    lines += [f"shl.b32 h, $17, {2 - parity};",  # input 2 i + parity's high bit at bit 2 i + 2
              "lop3.b32 e, $16, h, 0x33333333, 0xe4;",  # even fields: (w & c) | (h & ~c)
              "lop3.b32 d, $16, h, 0x33333333, 0xd8;"]  # odd fields: (w & ~c) | (h & c)
    for i in range(8):
        if i < 7:
            source = "e" if i % 2 == 0 else "d"
            lines.append(f"shr.b32 t, {source}, {2 * i};" if i else f"mov.b32 t, {source};")
            lines.append("lop3.b32 t, t, 0x00070007, 0x64006400, 0xea;")  # (t & 7) | 1024, each half
        else:
            f = 2 * i + parity  # input f and its partner f + 16, from the planes one at a time
            lines += [f"shr.b32 t, $16, {2 * i};", f"shr.b32 h, $17, {f - 2};",
                      "lop3.b32 t, t, 0x00030003, 0x64006400, 0xea;",  # (t & 3) | 1024
                      "lop3.b32 t, h, 0x00040004, t, 0xea;"]  # | the high bit at bit 2
        lines += ["sub.f16x2 t, t, o;", "mul.f16x2 t, t, s;", f"mov.b32 {{${i}, ${i + 8}}}, t;"]
    return "{ .reg .b32 t, h, e, d, o, s; " + " ".join(lines) + " }"


# Rule 4's PTX at [2 * parity + symmetric]
_WORD_ASM = tuple(_word_decode_asm(parity, bool(symmetric)) for parity in (0, 1) for symmetric in (0, 1))
_WORD_CONSTRAINTS = ",".join(["=h"] * 16) + ",r,r,h,h"


if triton is not None:
    from llmc.plugins.intn_linear import (add_group_block, lead_rows, prefill_step, prefill_x, x_field, x_offsets,
                                          x_tile_fields, x_words)
    from llmc.plugins.splitk import block_offsets, finish_split, grid_row, row_block, start_sum

    # Rule 1 as intn_linear rule 1: x is scaled by 2^(100 - o), the product is u * x * 2^-49.
    _X_SCALE = tl.constexpr(2.0**100)
    WORD_ASM = tl.constexpr(_WORD_ASM)
    WORD_CONSTRAINTS = tl.constexpr(_WORD_CONSTRAINTS)
    _PRODUCT_SCALE = tl.constexpr(2.0**-49)

    @triton.jit
    def _int3_load(lo_ptr, hi_ptr, rows, offs_n, N, row_end, EVICT_FIRST: tl.constexpr = False, ROWS: tl.constexpr = 1):
        """Tile rows ``rows`` (below ``row_end``): their even and odd words of the 2-bit plane and their
        word of the 1-bit plane, [rows, outputs] as uint32 (shaped by ``intn_linear.lead_rows``)."""
        ok = lead_rows((rows < row_end)[:, None] & (offs_n < N)[None, :], ROWS)
        policy: tl.constexpr = "evict_first" if EVICT_FIRST else ""
        even = tl.load(lead_rows(lo_ptr + (2 * rows)[:, None] * N + offs_n[None, :], ROWS), mask=ok, other=0,
                       eviction_policy=policy)
        odd = tl.load(lead_rows(lo_ptr + (2 * rows + 1)[:, None] * N + offs_n[None, :], ROWS), mask=ok, other=0,
                      eviction_policy=policy)
        high = tl.load(lead_rows(hi_ptr + rows[:, None] * N + offs_n[None, :], ROWS), mask=ok, other=0,
                       eviction_policy=policy)
        return even.to(tl.uint32, bitcast=True), odd.to(tl.uint32, bitcast=True), high.to(tl.uint32, bitcast=True)

    @triton.jit
    def _int3_fields(acc, dot, x_sum, even, odd, high, xw_low, xw_high, x_ok, CHANNEL: tl.constexpr,
                     DTYPE: tl.constexpr):
        """One step of the decode kernel over the 32 inputs of each tile row: the products into ``acc``
        (per channel) or ``dot`` (per group), the activations into ``x_sum``."""
        # Field i's code at bits 2 i .. 2 i + 2 of one word per parity of i: the 2-bit word's field i next to its high
        # bit (the 1-bit word shifted left by 2 for the even inputs, 1 for the odd) at bit 2 i + 2. Even fields take
        # the 2-bit word's nibbles' low halves and the rest from the shifted 1-bit word, odd fields the reverse: one
        # bitwise select (LOP3) per word and parity, after which each field is one AND. Bits 2 i + 3 and up carry
        # other fields, and the AND drops them. Fields that would end above bit 23 come from the words shifted right
        # by 12 (the 1-bit word by 10 and 11), nibble-aligned the same way.
        top_even = high << 2
        top_odd = high << 1
        top_even_s = high >> 10
        top_odd_s = high >> 11
        even_s = even >> 12
        odd_s = odd >> 12
        LOW: tl.constexpr = 0x33333333
        HIGH: tl.constexpr = 0xCCCCCCCC
        even_lo = (even & LOW) | (top_even & HIGH)  # even inputs, even fields
        even_hi = (even & HIGH) | (top_even & LOW)  # even inputs, odd fields
        odd_lo = (odd & LOW) | (top_odd & HIGH)
        odd_hi = (odd & HIGH) | (top_odd & LOW)
        even_lo_s = (even_s & LOW) | (top_even_s & HIGH)
        even_hi_s = (even_s & HIGH) | (top_even_s & LOW)
        odd_lo_s = (odd_s & LOW) | (top_odd_s & HIGH)
        odd_hi_s = (odd_s & HIGH) | (top_odd_s & LOW)
        joined = (even_lo, odd_lo, even_hi, odd_hi)  # input j's word: joined[j % 4]
        joined_s = (even_lo_s, odd_lo_s, even_hi_s, odd_hi_s)
        for j in tl.static_range(32):
            if j < 16:
                xv = x_field(xw_low, j, x_ok, DTYPE)
            else:
                xv = x_field(xw_high, j - 16, x_ok, DTYPE)
            x_sum += xv
            # Input j: field j // 2 of the even (j even) or odd word, in the joined word of its parities.
            if 2 * (j // 2) + 3 <= 23:
                o = 2 * (j // 2)
                word = joined[j % 4]
            else:
                o = 2 * (j // 2) - 12
                word = joined_s[j % 4]
            bits = word & (7 << o)
            v = bits.to(tl.float32, bitcast=True)
            if CHANNEL:
                acc += v * (xv * (_X_SCALE / (1 << o)))
            else:
                dot += v * (xv * (_X_SCALE / (1 << o)))
        return acc, dot, x_sum

    @triton.jit
    def _int3_gemv_kernel(x_ptr, lo_ptr, hi_ptr, s_ptr, z_ptr, y_ptr, part_ptr, count_ptr,
                          N, K, stride_ym, rows_per_split, n_split,
                          GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, ZERO: tl.constexpr, CHANNEL: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PREFETCH: tl.constexpr = False,
                          EVICT_FIRST: tl.constexpr = False, ROW_GRID: tl.constexpr = False,
                          SEPARATE: tl.constexpr = False):
        # Rule 1 over BLOCK_W tile rows (32 inputs each) a step; rows_per_split counts tile rows.
        start_sum(SEPARATE)
        ROWS_PER_GROUP: tl.constexpr = GROUP // 32
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        if ROW_GRID:  # one row of (contiguous) x per grid row, with its own partials and counters
            x_ptr, y_ptr, part_ptr, count_ptr = grid_row(x_ptr, y_ptr, part_ptr, count_ptr, K, stride_ym, n_split, N, 1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        row_begin = pid_k * rows_per_split
        row_end = tl.minimum(row_begin + rows_per_split, K // 32)
        acc = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.float32)
        x_total = tl.zeros([BLOCK_W, 1], dtype=tl.float32)
        if PREFETCH:
            even_n, odd_n, high_n = _int3_load(lo_ptr, hi_ptr, row_begin + tl.arange(0, BLOCK_W), offs_n, N, row_end,
                                               EVICT_FIRST)
        for r0 in range(row_begin, row_begin + rows_per_split, BLOCK_W):
            rows = r0 + tl.arange(0, BLOCK_W)
            row_ok = rows < row_end
            if PREFETCH:  # the next step's words are in flight while this step's are decoded
                even, odd, high = even_n, odd_n, high_n
                even_n, odd_n, high_n = _int3_load(lo_ptr, hi_ptr, rows + BLOCK_W, offs_n, N, row_end, EVICT_FIRST)
            else:
                even, odd, high = _int3_load(lo_ptr, hi_ptr, rows, offs_n, N, row_end, EVICT_FIRST)
            inputs = (tl.where(row_ok, rows, 0) * 32)[:, None]
            xw_low = x_words(x_ptr, inputs, 16)
            xw_high = x_words(x_ptr, inputs + 16, 16)
            dot = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.float32)
            x_rows = tl.zeros([BLOCK_W, 1], dtype=tl.float32)
            acc, dot, x_rows = _int3_fields(acc, dot, x_rows, even, odd, high, xw_low, xw_high, row_ok[:, None], CHANNEL,
                                            x_ptr.dtype.element_ty)
            if CHANNEL:
                x_total += x_rows
            else:
                ok = row_ok[:, None] & n_ok[None, :]
                group = rows // ROWS_PER_GROUP
                acc = add_group_block(acc, dot, x_rows, s_ptr, z_ptr, group, offs_n, N, ok, 1, SYMMETRIC, ZERO)
        total = tl.sum(acc, axis=0) * (1.0 / _PRODUCT_SCALE)  # undo the 2^-49
        if CHANNEL:
            scale = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            if SYMMETRIC:
                zero = ZERO
            else:
                zero = tl.load(z_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            total = (total - zero * tl.sum(x_total, axis=0)) * scale
        finish_split(total[None, :], y_ptr, part_ptr, count_ptr, tl.arange(0, 1), offs_n, 1, N, stride_ym,
                     pid_n, pid_k, n_split, SEPARATE)

    @triton.jit
    def _int3_gemv_rows_kernel(x_ptr, lo_ptr, hi_ptr, s_ptr, z_ptr, y_ptr, part_ptr, count_ptr,
                               N, K, stride_ym, rows_per_split, n_split, x_rows,
                               GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, ZERO: tl.constexpr, CHANNEL: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PREFETCH: tl.constexpr = False,
                               EVICT_FIRST: tl.constexpr = False, ROWS: tl.constexpr = 4, ROW_BLOCKS: tl.constexpr = False,
                               SEPARATE: tl.constexpr = False):
        # Rule 1 with ROWS >= 2 rows of (contiguous) x per program, each word decoded once for all of them:
        # _int3_gemv_kernel with a leading axis of ROWS on every tensor (a block of rows per grid row with
        # ROW_BLOCKS, each with its own partials and counters).
        start_sum(SEPARATE)
        ROWS_PER_GROUP: tl.constexpr = GROUP // 32
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        x_ptr, y_ptr, part_ptr, count_ptr, rows_here, x_row = row_block(
            x_ptr, y_ptr, part_ptr, count_ptr, K, stride_ym, n_split, N, x_rows, ROWS, ROW_BLOCKS)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        row_begin = pid_k * rows_per_split
        row_end = tl.minimum(row_begin + rows_per_split, K // 32)
        acc = tl.zeros([ROWS, BLOCK_W, BLOCK_N], dtype=tl.float32)
        x_total = tl.zeros([ROWS, BLOCK_W, 1], dtype=tl.float32)
        if PREFETCH:
            even_n, odd_n, high_n = _int3_load(lo_ptr, hi_ptr, row_begin + tl.arange(0, BLOCK_W), offs_n, N, row_end,
                                               EVICT_FIRST, ROWS)
        for r0 in range(row_begin, row_begin + rows_per_split, BLOCK_W):
            rows = r0 + tl.arange(0, BLOCK_W)
            row_ok = rows < row_end
            if PREFETCH:
                even, odd, high = even_n, odd_n, high_n
                even_n, odd_n, high_n = _int3_load(lo_ptr, hi_ptr, rows + BLOCK_W, offs_n, N, row_end, EVICT_FIRST, ROWS)
            else:
                even, odd, high = _int3_load(lo_ptr, hi_ptr, rows, offs_n, N, row_end, EVICT_FIRST, ROWS)
            inputs = x_offsets(x_row, rows, row_ok, K, 32)
            xw_low = x_words(x_ptr, inputs, 16)
            xw_high = x_words(x_ptr, inputs + 16, 16)
            dot = tl.zeros([ROWS, BLOCK_W, BLOCK_N], dtype=tl.float32)
            x_sums = tl.zeros([ROWS, BLOCK_W, 1], dtype=tl.float32)
            acc, dot, x_sums = _int3_fields(acc, dot, x_sums, even, odd, high, xw_low, xw_high,
                                            lead_rows(row_ok[:, None], ROWS), CHANNEL, x_ptr.dtype.element_ty)
            if CHANNEL:
                x_total += x_sums
            else:
                ok = lead_rows(row_ok[:, None] & n_ok[None, :], ROWS)
                group = rows // ROWS_PER_GROUP
                acc = add_group_block(acc, dot, x_sums, s_ptr, z_ptr, group, offs_n, N, ok, ROWS, SYMMETRIC, ZERO)
        total = tl.sum(acc, axis=1) * (1.0 / _PRODUCT_SCALE)
        if CHANNEL:
            scale = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            if SYMMETRIC:
                zero = ZERO
            else:
                zero = tl.load(z_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            total = (total - zero * tl.sum(x_total, axis=1)) * scale[None, :]
        finish_split(total, y_ptr, part_ptr, count_ptr, tl.arange(0, ROWS), offs_n, rows_here, N, stride_ym,
                     pid_n, pid_k, n_split, SEPARATE)

    @triton.jit
    def _int3_half(low, high, f: tl.constexpr, offset, scale, DTYPE: tl.constexpr):
        """Rule 2: input ``f`` of a tile (field f // 2 of ``low``, its even or odd word of the 2-bit plane, and
        bit f of ``high``) as ``scale * (u - zero)``; ``offset`` is 1024 + zero."""
        if f <= 2:
            top = (high << (2 - f)) & 4
        else:
            top = (high >> (f - 2)) & 4
        bits16 = (((low >> (2 * (f // 2))) & 3) | top | 0x6400).to(tl.int16)
        return ((bits16.to(tl.float16, bitcast=True) - offset) * scale).to(DTYPE)

    @triton.jit
    def _int3_gemm_kernel(x_ptr, lo_ptr, hi_ptr, s_ptr, z_ptr, y_ptr, part_ptr, count_ptr,
                          M, N, K, stride_xm, stride_ym, rows_per_split, n_split,
                          GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, ZERO: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                          EVICT_FIRST: tl.constexpr = False, SWAP: tl.constexpr = False, SEPARATE: tl.constexpr = False):
        # Rule 2 over BLOCK_W tile rows a step. SWAP: accumulate (W x^T) [BLOCK_N, BLOCK_M], the decoded
        # weight as the first operand of the product.
        start_sum(SEPARATE)
        ROWS_PER_GROUP: tl.constexpr = GROUP // 32
        pid_n, pid_m, pid_k, offs_m, offs_n, m_ok, n_ok = block_offsets(M, N, BLOCK_M, BLOCK_N)
        row_begin = pid_k * rows_per_split
        row_end = K // 32
        if SWAP:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for r0 in range(row_begin, row_begin + rows_per_split, BLOCK_W):
            rows = r0 + tl.arange(0, BLOCK_W)
            row_ok = rows < row_end
            ok = row_ok[:, None] & n_ok[None, :]
            even, odd, high = _int3_load(lo_ptr, hi_ptr, rows, offs_n, N, row_end, EVICT_FIRST)
            group = rows // ROWS_PER_GROUP
            scale = tl.load(s_ptr + group[:, None] * N + offs_n[None, :], mask=ok, other=0.0)
            if SYMMETRIC:
                offset = 1024.0 + ZERO
            else:
                offset = 1024.0 + tl.load(z_ptr + group[:, None] * N + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
            # Inputs 32 t + f: f < 16 from the tile's first 16 activations, the rest from the next 16.
            x_ok = m_ok[:, None] & row_ok[None, :]
            xs_low = x_tile_fields(x_ptr, offs_m, 2 * rows, x_ok, stride_xm, BLOCK_M, BLOCK_W, 16)
            xs_high = x_tile_fields(x_ptr, offs_m, 2 * rows + 1, x_ok, stride_xm, BLOCK_M, BLOCK_W, 16)
            for f in tl.static_range(32):
                if f % 2 == 0:
                    w = _int3_half(even, high, f, offset, scale, x_ptr.dtype.element_ty)
                else:
                    w = _int3_half(odd, high, f, offset, scale, x_ptr.dtype.element_ty)
                if f < 16:
                    xk = xs_low[f]
                else:
                    xk = xs_high[f - 16]
                if SWAP:
                    acc = tl.dot(tl.trans(w), tl.trans(xk), acc)
                else:
                    acc = tl.dot(xk, w, acc)
        if SWAP:
            acc = tl.trans(acc)
        finish_split(acc, y_ptr, part_ptr, count_ptr, offs_m, offs_n, M, N, stride_ym,
                     pid_m * tl.num_programs(0) + pid_n, pid_k, n_split, SEPARATE)

    @triton.jit
    def _tree16(t):
        """Rule 4: 16 tensors [rows, outputs] as one [rows, outputs, 16] in index order. tl.join adds its axis
        last, so the first join (i and i + 8) is the slowest axis of the result."""
        return tl.join(tl.join(tl.join(tl.join(t[0], t[8]), tl.join(t[4], t[12])),
                               tl.join(tl.join(t[2], t[10]), tl.join(t[6], t[14]))),
                       tl.join(tl.join(tl.join(t[1], t[9]), tl.join(t[5], t[13])),
                               tl.join(tl.join(t[3], t[11]), tl.join(t[7], t[15]))))

    @triton.jit
    def _int3_prefill_kernel(x_ptr, lo_ptr, hi_ptr, s_ptr, z_ptr, y_ptr, part_ptr, count_ptr,
                             M, N, K, stride_xm, stride_ym, rows_per_split, n_split,
                             GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SEPARATE: tl.constexpr = False):
        # Rule 4 (float16 x and scales): the PTX (_word_decode_asm) decodes a step's BLOCK_W tile rows, whose 32 inputs join
        # in input order into the first operand of one product with K = 32 BLOCK_W (intn_linear rule 8's
        # prefill step, with its wait for the wgmmas in flight); accumulates (W x^T) [BLOCK_N, BLOCK_M].
        start_sum(SEPARATE)
        ROWS_PER_GROUP: tl.constexpr = GROUP // 32
        pid_n, pid_m, pid_k, offs_m, offs_n, m_ok, n_ok = block_offsets(M, N, BLOCK_M, BLOCK_N)
        row_begin = pid_k * rows_per_split
        row_end = tl.minimum(row_begin + rows_per_split, K // 32)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for r0 in range(row_begin, row_end, BLOCK_W):
            rows = r0 + tl.arange(0, BLOCK_W)
            x = prefill_x(x_ptr, offs_m, m_ok, stride_xm, r0, row_end, BLOCK_W, 32)
            even, odd, high = _int3_load(lo_ptr, hi_ptr, rows, offs_n, N, row_end)
            ok = (rows < row_end)[:, None] & n_ok[None, :]
            group = rows // ROWS_PER_GROUP
            scale = tl.load(s_ptr + group[:, None] * N + offs_n[None, :], mask=ok, other=0.0)
            if SYMMETRIC:
                zero = scale  # unread
            else:
                zero = tl.load(z_ptr + group[:, None] * N + offs_n[None, :], mask=ok, other=0.0)
            ws_even = tl.inline_asm_elementwise(WORD_ASM[SYMMETRIC], WORD_CONSTRAINTS, [even, high, scale, zero],
                                                dtype=(tl.float16,) * 16, is_pure=True, pack=1)
            ws_odd = tl.inline_asm_elementwise(WORD_ASM[2 + SYMMETRIC], WORD_CONSTRAINTS, [odd, high, scale, zero],
                                               dtype=(tl.float16,) * 16, is_pure=True, pack=1)
            # Input 2 i + p is field i of parity p: the last join makes p the fastest axis.
            w = tl.reshape(tl.join(_tree16(ws_even), _tree16(ws_odd)), (BLOCK_W, BLOCK_N, 32))
            acc = prefill_step(acc, w, x)
        finish_split(tl.trans(acc), y_ptr, part_ptr, count_ptr, offs_m, offs_n, M, N, stride_ym,
                     pid_m * tl.num_programs(0) + pid_n, pid_k, n_split, SEPARATE)

    @triton.jit
    def _int3_dequantize_kernel(lo_ptr, hi_ptr, s_ptr, z_ptr, out_ptr, N, K, GROUP: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
        # W.T as float16 [K, N] (coalesced stores along N) for dequantize-then-matmul; BLOCK_W tile rows.
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        ok = (rows[:, None] < K // 32) & (offs_n[None, :] < N)
        even, odd, high = _int3_load(lo_ptr, hi_ptr, rows, offs_n, N, K // 32)
        group = rows // (GROUP // 32)
        scale = tl.load(s_ptr + group[:, None] * N + offs_n[None, :], mask=ok, other=0.0)
        offset = 1024.0 + tl.load(z_ptr + group[:, None] * N + offs_n[None, :], mask=ok, other=0.0)
        for i in tl.static_range(16):
            w = _int3_half(even, high, 2 * i, offset, scale, tl.float16)
            tl.store(out_ptr + (32 * rows + 2 * i)[:, None] * N + offs_n[None, :], w, mask=ok)
            w = _int3_half(odd, high, 2 * i + 1, offset, scale, tl.float16)
            tl.store(out_ptr + (32 * rows + 2 * i + 1)[:, None] * N + offs_n[None, :], w, mask=ok)


# One row (and a few, once per row): (block_n, block_w tile rows, num_warps, programs per SM, prefetch, inline zero
# (always), evict-first), by shape (:func:`one_row_shape`). Picked from `benchmarks/kernels_int3.py --explore` on an
# H100 (docs/benchmarks/kernels-int3.md): no split-K except on wide linears from 2^23 weights and on those below it
# with fewer outputs than inputs and K past 2048.
WIDE_SMALL = (16, 32, 4, 0, False, True, True)  # below 2^23 weights, at least as many outputs as inputs
NARROW = (16, 64, 8, 0, False, True, True)  # fewer outputs than inputs with K up to 2048, or from 2^23 weights
NARROW_LONG = (16, 128, 8, 0, False, True, True)  # from 2^23 weights, no more outputs than inputs, K past 8192
NARROW_SPLIT = (32, 16, 4, 2, False, True, True)  # below 2^23 weights, fewer outputs than inputs, K past 2048
WIDE_LARGE = (32, 32, 4, 1, False, True, True)  # from 2^23 weights, more outputs than inputs
DECODE_SHAPES = (WIDE_SMALL, NARROW, NARROW_LONG, NARROW_SPLIT, WIDE_LARGE)
LARGE = 1 << 23


def one_row_shape(in_features: int, out_features: int) -> tuple:
    """The one-row launch shape of a [out_features, in_features] linear (see above)."""
    if in_features * out_features < LARGE:
        if out_features >= in_features:
            return WIDE_SMALL
        return NARROW if in_features <= 2048 else NARROW_SPLIT
    if out_features > in_features:
        return WIDE_LARGE
    return NARROW_LONG if in_features > 8192 else NARROW


# 2-64 rows (:func:`rows_per_program`): two rows, and up to four below SMALL weights, the one-row launch once per row.
# The rest with float16 x and scales: up to FUSED_ROWS rows rule 4's kernel, PREFILL_SHAPE (block_n, block_w tile rows,
# num_warps, num_stages, programs per SM; blocks of 16, 64 or 128 rows of x), which beat the tensor-core kernel of
# rule 2 on every shape from 3 to 16 rows (H100; 4096→11008 at 16 rows 22.4 against 28.7 us, 896→4864 5.4 against
# 8.6) and dequantize-then-cuBLAS at 64 rows; beyond, dequantize-then-cuBLAS. With bfloat16 x or float32 scales, up
# to 16 rows: below 2^23 weights with at least as many outputs as inputs up to 8 rows (16 below SMALL) the decode
# kernel with ROWS_PER_PROGRAM rows of x per program (each word decoded once for all of them), MULTI_ROW_SHAPE, else
# rule 2's kernel, TENSOR_CORE_SHAPES by weight count: (block_n, block_w tile rows, num_warps, programs per SM,
# evict-first, swap, num_stages). From the H100 sweeps in docs/benchmarks/kernels-int3.md.
SMALL = 1 << 21
FUSED_ROWS = 64
PREFILL_SHAPE = (64, 4, 4, 3, 2)
ROWS_PER_PROGRAM = 4
MULTI_ROW_SHAPE = (16, 32, 4, 0, False, True, True)
TENSOR_CORE_SHAPES = ((SMALL, (32, 16, 4, 4, False, False, 2)), (1 << 25, (64, 16, 4, 2, False, False, 2)),
                      (None, (64, 16, 4, 4, True, False, 2)))


def rows_per_program(m: int, in_features: int, out_features: int, halves: bool = True) -> int:
    """Rows of x per program of the decode kernel for ``m`` rows, 0 where a tensor-core kernel runs (see above);
    ``halves``: float16 x and scales."""
    weights = in_features * out_features
    if m <= 2 or m <= 4 and weights < SMALL:
        return 1
    if not halves and m <= TENSOR_CORE_ROWS and weights < LARGE and out_features >= in_features and (m <= 8 or weights < SMALL):
        return ROWS_PER_PROGRAM
    return 0


TENSOR_CORE_ROWS = 16  # without float16 x and scales, the most rows rules 1-2 take
# (block_n, block_w tile rows) of the dequantize kernel.
DEQUANTIZE_SHAPE = (256, 4)


def _check(w) -> None:
    if w.bits != 3 or len(w.planes) != 2 or w.group_size % TILE or w.in_features % TILE:
        raise ValueError(f"int3_linear: 3-bit weights in two planes, groups and K multiples of {TILE} "
                         f"(got {w.bits} bits, {len(w.planes)} planes, group {w.group_size}, K {w.in_features})")


def int3_config(m: int, w, sms: int, decode: tuple | None = None,
                tensor_cores: tuple | None = None, halves: bool = True) -> LaunchConfig | None:
    """The launch of ``m`` rows of x (see above), None where dequantize-then-matmul runs; ``halves``: float16 x and
    scales. ``decode`` and ``tensor_cores`` (rule 2's kernel) override the launch shape, as in
    :func:`intn_linear.intn_config`; ``decode`` may carry an eighth field, the rows of x per program (one: once per
    row)."""
    return _int3_config(m, w.in_features, w.out_features, sms, decode, tensor_cores, halves)


@functools.lru_cache(maxsize=4096)
def _int3_config(m: int, in_features: int, out_features: int, sms: int, decode: tuple | None,
                 tensor_cores: tuple | None, halves: bool) -> LaunchConfig | None:
    weights, tile_rows = in_features * out_features, in_features // TILE
    rows = rows_per_program(m, in_features, out_features, halves)
    if tensor_cores is None and (decode is not None or rows):
        if decode is not None:
            rows = decode[7] if len(decode) > 7 else 1
            shape = decode[:7]
        else:
            shape = one_row_shape(in_features, out_features) if rows == 1 else MULTI_ROW_SHAPE
        return decode_config(shape, out_features, tile_rows, sms, rows)
    if tensor_cores is None and halves:
        return prefill_launch(m, in_features, out_features, sms) if m <= FUSED_ROWS else None
    if tensor_cores is None and m > TENSOR_CORE_ROWS:
        return None
    shape = tensor_cores or next(s for limit, s in TENSOR_CORE_SHAPES if limit is None or weights < limit)
    return tensor_core_config(shape, out_features, tile_rows, sms)


def prefill_launch(m: int, in_features: int, out_features: int, sms: int, shape: tuple = PREFILL_SHAPE) -> LaunchConfig:
    """Rule 4's launch over ``m`` rows of x at ``shape`` (block_n, block_w tile rows, num_warps, num_stages, programs
    per SM): blocks of 16 rows of x up to 16, 64 up to 64, else 128; split-K to about the programs per SM."""
    block_n, block_w, warps, stages, per_sm = shape
    block_m = 16 if m <= 16 else 64 if m <= 64 else 128
    blocks = -(-m // block_m) * -(-out_features // block_n)
    split = splitk.choose_split(blocks, in_features // TILE, block_w, per_sm * sms)
    return LaunchConfig(block_m, block_n, block_w, warps, stages, split, joined=True)


def int3_linear(x2: torch.Tensor, w, config: LaunchConfig | None, out: torch.Tensor | None) -> torch.Tensor:
    """``x2 @ W.T`` for ``x2`` [rows, K] (float16 or bfloat16, unit stride along K) on a CUDA device."""
    from llmc.plugins.intn_linear import decode_rows

    require_triton()
    _check(w)
    m, n, k = x2.shape[0], w.out_features, w.in_features
    if m == 0:
        return torch.empty(0, n, dtype=x2.dtype, device=x2.device) if out is None else out
    halves = x2.dtype == w.scale.dtype == torch.float16
    config = config or int3_config(m, w, splitk.sm_count(x2.device), halves=halves)
    if config is None:  # rule 3: dequantize, then cuBLAS
        return matmul_into(x2, int3_dequantize(w, x2.dtype).t(), out)
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device) if out is None else out
    run = splitk.launch(config, m, n, x2.device)
    split = config.split
    common = dict(GROUP=w.group_size, SYMMETRIC=w.symmetric, ZERO=4.0, BLOCK_N=config.block_n, BLOCK_W=config.block_w,
                  EVICT_FIRST=config.evict_first, num_warps=config.num_warps, num_stages=config.num_stages,
                  SEPARATE=run.separate, **COMPILE_OPTIONS)
    lo, hi = w.planes
    if config.joined:
        if not halves:
            raise ValueError("int3_linear: rule 4's kernel takes float16 x and float16 scales")
        _int3_prefill_kernel[(run.grid_n, run.grid_m, split.split)](
            x2, lo, hi, w.scale, w.zero, y, run.part, run.count, m, n, k, x2.stride(0), y.stride(0),
            split.rows_per_split, split.split, GROUP=w.group_size, SYMMETRIC=w.symmetric, BLOCK_M=config.block_m,
            BLOCK_N=config.block_n, BLOCK_W=config.block_w, num_warps=config.num_warps, num_stages=config.num_stages,
            SEPARATE=run.separate, **COMPILE_OPTIONS)
    elif config.block_m == 1 and config.rows == 1:
        _int3_gemv_kernel[(run.grid_n, split.split, m)](
            decode_rows(x2), lo, hi, w.scale, w.zero, y, run.part, run.count, n, k, y.stride(0),
            split.rows_per_split, split.split, CHANNEL=w.group_size == k, PREFETCH=config.prefetch, ROW_GRID=m > 1,
            **common)
    elif config.block_m == 1:
        _int3_gemv_rows_kernel[(run.grid_n, split.split, run.row_blocks)](
            decode_rows(x2), lo, hi, w.scale, w.zero, y, run.part, run.count, n, k, y.stride(0),
            split.rows_per_split, split.split, m, CHANNEL=w.group_size == k, PREFETCH=config.prefetch,
            ROWS=config.rows, ROW_BLOCKS=run.row_blocks > 1, **common)
    else:
        _int3_gemm_kernel[(run.grid_n, run.grid_m, split.split)](
            x2, lo, hi, w.scale, w.zero, y, run.part, run.count, m, n, k, x2.stride(0), y.stride(0),
            split.rows_per_split, split.split, BLOCK_M=config.block_m, SWAP=config.swap, **common)
    run.finish(y)
    return y


def int3_dequantize(w, dtype: torch.dtype = torch.float16, block: tuple[int, int] | None = None) -> torch.Tensor:
    """The weight [N, K] in ``dtype`` on the GPU (the transposed view of a [K, N] tensor)."""
    require_triton()
    _check(w)
    out = torch.empty(w.in_features, w.out_features, dtype=torch.float16, device=w.planes[0].device)
    block_n, block_w = block or DEQUANTIZE_SHAPE
    grid = (-(-w.out_features // block_n), -(-(w.in_features // TILE) // block_w))
    _int3_dequantize_kernel[grid](*w.planes, w.scale, w.zero, out, w.out_features, w.in_features,
                                  GROUP=w.group_size, BLOCK_N=block_n, BLOCK_W=block_w, **COMPILE_OPTIONS)
    return (out if dtype == torch.float16 else out.to(dtype)).t()


def kernel_variants() -> list:
    """The int3 kernels at their shipped launch shapes, for ``llmc.plugins.aot``."""
    from llmc.plugins.aot import KernelVariant

    pointers = dict(x_ptr="*fp16", lo_ptr="*i32", hi_ptr="*i32", s_ptr="*fp16", z_ptr="*fp16", y_ptr="*fp16",
                    part_ptr="*fp32", count_ptr="*i32")
    aligned = (*pointers, "N", "K", "stride_ym", "rows_per_split")
    gemv_args = {**pointers, "N": "i32", "K": "i32", "stride_ym": "i32", "rows_per_split": "i32", "n_split": "i32"}
    gemm_args = {**pointers, "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32",
                 "rows_per_split": "i32", "n_split": "i32"}
    variants = []
    for symmetric, group in ((True, 128), (False, 32)):
        tag = f"int3-{'sym' if symmetric else 'asym'}-g{group}"
        common = dict(GROUP=group, SYMMETRIC=symmetric, ZERO=4.0)
        for size, (block_n, block_w, warps, _, prefetch, _, evict) in zip(
                ("wide-small", "narrow", "narrow-long", "narrow-split", "wide-large"), DECODE_SHAPES, strict=True):
            variants.append(KernelVariant(
                f"int3-gemv-{tag}-{size}", _int3_gemv_kernel, gemv_args,
                {**common, "CHANNEL": False, "BLOCK_N": block_n, "BLOCK_W": block_w, "PREFETCH": prefetch,
                 "EVICT_FIRST": evict, "ROW_GRID": False}, warps, 1, aligned))
        block_n, block_w, warps, _, prefetch, _, evict = MULTI_ROW_SHAPE
        variants.append(KernelVariant(
            f"int3-gemv{ROWS_PER_PROGRAM}-{tag}", _int3_gemv_rows_kernel, {**gemv_args, "x_rows": "i32"},
            {**common, "CHANNEL": False, "BLOCK_N": block_n, "BLOCK_W": block_w, "PREFETCH": prefetch,
             "EVICT_FIRST": evict, "ROWS": ROWS_PER_PROGRAM, "ROW_BLOCKS": True}, warps, 1, aligned))
        for limit, (block_n, block_w, warps, _, evict, swap, stages) in TENSOR_CORE_SHAPES:
            size = f"<2^{limit.bit_length() - 1}" if limit else "large"
            variants.append(KernelVariant(
                f"int3-gemm16-{tag}-{size}", _int3_gemm_kernel, gemm_args,
                {**common, "BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_W": block_w, "EVICT_FIRST": evict, "SWAP": swap},
                warps, stages, (*aligned, "stride_xm")))
        block_n, block_w, warps, stages, _ = PREFILL_SHAPE
        for block_m in (16, 64):
            variants.append(KernelVariant(
                f"int3-joined{block_m}-{tag}", _int3_prefill_kernel, gemm_args,
                dict(GROUP=group, SYMMETRIC=symmetric, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_W=block_w), warps,
                stages, (*aligned, "stride_xm")))
    block_n, block_w = DEQUANTIZE_SHAPE
    variants.append(KernelVariant(
        "int3-dequantize-g128", _int3_dequantize_kernel,
        dict(lo_ptr="*i32", hi_ptr="*i32", s_ptr="*fp16", z_ptr="*fp16", out_ptr="*fp16", N="i32", K="i32"),
        dict(GROUP=128, BLOCK_N=block_n, BLOCK_W=block_w), 4, 1, ("lo_ptr", "hi_ptr", "s_ptr", "z_ptr", "out_ptr", "N", "K")))
    return variants
