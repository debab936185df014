"""Rule 10 of ``intn_linear`` and rule 8 of ``fp6_linear``: int4 and FP6 ``y = x @ W.T`` for 1-16 rows of x
on ``mma.sync`` tensor cores, the decoded weights handed to the MMA straight from registers (Gluon, Triton's
explicit layer).

Rule 7's tensor-core kernel (plain Triton) decodes a [rows of words, outputs] tile in one register
layout and ``tl.dot`` wants another, so every step goes through shared memory. Here the layout of the
loaded words *is* the MMA's operand layout, fixed with Gluon's explicit layouts:

- a warp reads a [4, 32] block of words per rep: lane ``q + 4 r`` holds word-row ``q`` (8 inputs) of
  outputs ``4 r .. 4 r + 3``, one 16-byte load;
- ``W`` is the A operand of ``mma.sync.m16n8k16`` (outputs are its rows, so one row of x costs no
  more than eight): tile 0's rows ``r`` / ``r + 8`` are outputs ``4 r`` / ``4 r + 1``, tile 1's
  ``4 r + 2`` / ``4 r + 3``. The k slots of lane ``q`` are the inputs of its own word-row, fields
  ``(i, i + 4)`` of a word as one float16 pair (one ``lop3`` makes ``1024 + u`` in both halves, rule 8's
  trick; one ``sub``/``fma.f16x2`` makes ``u - zero`` exactly), so no data moves between lanes;
- x is the B operand, column ``n`` = row ``n`` of x: lane ``q + 4 r`` loads 8 inputs of row ``r`` of x
  with one 16-byte load and pairs them the way the weights are paired (``prmt``). Rows 8-15 take a
  second B tile (``NT = 2``);
- products accumulate in float32 (the MMA's accumulator) per group of inputs, then times the
  group's scale; per-channel weights take the scale once at the end, loaded with the first words.

A program is 32 outputs and ``W_K`` warps, each warp a range of K in iterations of 16 word-rows
(4 reps), the next iteration's words, x, group scales and (asymmetric) zero points loaded while this
one's are decoded (a group's scale and zero point waited for inside the iteration made asymmetric int4
in groups of 32 up to 2.3x slower). At the end (:func:`_finish`) the four accumulators are joined and
permuted into [warp, row, output] and cross shared memory once, into a layout where each thread holds every
warp's part of 4 adjacent outputs of a row: it sums them and stores them with one 8-byte store (a reduction
per accumulator before, 480 of the 1064 sm_90 instructions of FP6 at 16 rows and 4 warps; now 672 in all).
Splits of K across programs meet in ``splitk.sum_splits`` (:func:`mma_launch`: one iteration a warp, as far as
the warps stay resident), which at 1-8 rows the kernel lets start first thing
(:func:`_launches_sum_early`). The sm_90 loop is 283
instructions for a lane's 128 weights (symmetric, groups of 128: 2.2 a weight, 16 HMMA; the decode itself
1.1), with no shared memory, against rule 2's 3.8 a weight for one row.

FP6 (``fp6_linear.FpxWeights``, e3m2 and e2m3, rule 8 of ``fp6_linear``) takes the same layouts: a lane
holds one tile of 16 inputs of its 4 outputs (the even and the odd word of the 4-bit plane and the word of
the 2-bit plane: three 16-byte loads) and x's 16 inputs (two), and pairs inputs ``i`` and ``i + 8``, whose
nibbles (fields ``f``, ``f + 4`` of one 4-bit word) and low bits (in the 2-bit word) both sit 16 bits apart.
The pair is the float16 ``V * 2^(bias - 15)`` (``fp6_linear`` rule 1 in float16, subnormals included): the
nibble just above the low bit and the sign ``5 + M`` above it, where the plane keeps it ``8 + M`` above
(``bitplanes`` rule 4), so the 2-bit word rotated right by 3 (``S``) holds every sign where float16 wants it
relative to its low bit. Per output and tile: ``S``; the two 4-bit words rotated so that each nibble sits
just above its low bit; ``X`` words (the low bits from the 2-bit word, the signs from ``S``) and ``Y`` words
(the nibbles from a rotated 4-bit word, the rest from an ``X``), one ``lop3`` each; then each pair is its
``Y`` rotated and masked. :func:`_fp6_plan` searches the groupings whose bits do not collide: e3m2 takes 24
instructions for 16 weights (1.5 a weight; e2m3 29). The scale and ``2^(15 - bias)`` multiply the float32
sums (a group's scale is loaded where it is used: loaded an iteration ahead, 16 rows ran up to 21% slower
on the 70B shape). An iteration is 2 reps of 4 tiles (128 inputs, as int4's); the sm_90 loop is 323 instructions for a
lane's 128 weights (16 HMMA). Where one program of 8-16 warps per block is all an SM runs (:func:`mma_launch`),
each iteration also asks L2 for the 24 lines the next one loads (``PREFETCH``: one ``prefetch.global.L2`` a lane,
which ptxas places among the MMAs), and that made those launches 2-11% faster than splitting K. Why is not
established: the same iteration loads those lines anyway. int4's loop with the same prefetch was not faster
(11008->4096 at one row, 16 warps: 11.96 against 11.88 us without, and 11.50 at its split launch).

Where every warp's range of K is whole iterations and the outputs whole blocks of 32 (:func:`_even`), the
loads carry no masks (``EVEN``: the word-row kept inside the warp's range, x's row below M): the sm_90 loop is
250 instructions for symmetric int4 and 273 for FP6, with 8-40 fewer registers.

Measured on an H100 (docs/benchmarks/kernels-decode-rows.md); it runs where it beat the other rules
(:data:`MMA_RULE`: symmetric int4 at 2 rows from 2^22 weights, 3-7 from 2^19 and 8-16 everywhere;
:data:`ASYM_MMA_RULE`: asymmetric int4 at 2 rows from 2^22, 3 from 2^19, 4-16 everywhere;
int4 at one row from 2^22 weights where the outputs are at least :data:`ONE_ROW_WIDE` times the inputs,
symmetric also where the inputs are that many times the outputs; :data:`FP6_MMA_RULE`: FP6 at 1-16 rows; below
:data:`NARROW_BELOW` weights, symmetric int4 with fewer outputs than inputs from 8 rows). sm_90 only: the kernel compiles for sm_80-sm_90 (``mma.sync`` is Ampere's), but its split-K finish
is a programmatic dependent launch (Hopper's) and it was timed on an H100 alone.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from llmc.plugins import splitk

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # no Triton (CPU-only hosts), or a Triton without Gluon
    gluon = None

# Where rule 10 runs int4 (float16 x and scales, groups of 32, 64 or a multiple of 128 inputs or one scale per
# output, sm_90): (up to rows, from weights), and below NARROW_BELOW weights
# symmetric int4 with fewer outputs than inputs from 8 rows. Set from benchmarks/kernels_decode_rows.py on an H100
# (rounds 15-18, docs/benchmarks/kernels-decode-rows.md). Symmetric: one row from 2^22 weights where the outputs, or
# the inputs, are at least ONE_ROW_WIDE times the others (rounds 16, 18), 2 rows from 2^22 weights, 3-7 from 2^19,
# 8-16 everywhere; 2 rows lost on
# 576x576 and 896x896 (2.6-2.7 against 2.2-2.3), 3-4 rows on 576x576 (2.6 against 2.2-2.5).
MMA_RULE = ((1, 1 << 22), (2, 1 << 22), (7, 1 << 19), (16, 0))
# Asymmetric (groups of 32 in the benchmark): one row as symmetric's, 2 rows from 2^22, 3 from 2^19, 4-16 everywhere,
# where it ran up to 1.70x faster than the other rules (round 16: 4096x4096 at 9-16 rows 8.8-9.6 against 9.8-10.0
# us, 4096->11008 16.8 against 18.1-18.9); 2-3 rows lost or tied on 576x576 (2.8 against 2.7-2.8). Masked launches
# from 2^24 weights at 9-16 rows lost until the launch counted the kernel's 168-176 registers (round 16: 11008->4096
# at 8 x 2 22.7-23.1 against 21.3-21.8); at 4 x 3 they run 17.7-17.9 (round 19).
ASYM_MMA_RULE = ((1, 1 << 22), (2, 1 << 22), (3, 1 << 19), (16, 0))
# Where rule 10 runs FP6 (float16 x and scales, e3m2 or e2m3, groups of a multiple of 64 or one scale per
# output, sm_90): 1-16 rows everywhere. Set from benchmarks/kernels_decode_rows.py --fp6 on
# an H100: 0.98-1.90x the other rules (4864->896 at one row: 5.6 against 5.5 us).
FP6_MMA_RULE = ((16, 0),)
# Below this many weights symmetric int4 with fewer outputs than inputs runs rule 10 from 8 rows: 1536->576 (18
# blocks of 32 outputs, 4 x 4 since round 18) lost at 1-3 rows (3.1-3.2 against 2.4-2.5 us) and tied at 4, and ran
# 1.15x faster at 8 and 16; FP6 and asymmetric int4 ran 1.07-1.38x faster at every row count their rules take.
NARROW_BELOW = 1 << 20
# One row of int4 runs rule 10 only where the outputs are at least this many times the inputs, or (symmetric) the
# inputs this many times the outputs (rounds 16 and 18; rule 2, the CUDA-core decode, elsewhere): symmetric
# 4096->11008 10.6 against 11.5 us, 896->4864 3.5 against 4.0, 4864->896 4.4 against 6.0, 11008->4096 11.5 against
# 11.8, 4096->1024 4.8 against 5.8, 18944->3584 15.8 against 17.0; lost on 4096x4096 (6.3 against 5.5), 8192->1024
# (5.4 against 5.2) and below 2^22 weights (576->1536 2.6 against 2.3). Asymmetric 11008->4096 lost (19.2 against
# 14.0).
ONE_ROW_WIDE = 2
# An SM's registers, allocated to a warp 8 a thread at a time, which bound the resident warps where the K parallelism
# stops (:func:`_resident`). A thread's own count is the compiled kernel's (:func:`_registers`): 67-80 at one B tile
# of symmetric int4 in groups of 128 or FP6 per channel, 94-176 in groups of 32 or 64 or with zero points at two.
REGISTER_FILE = 65536
ITERATION_ROWS = 16  # word-rows a warp decodes per iteration (4 reps of 4)


def _step_asm(nt: int, symmetric: bool) -> str:
    """PTX of one rep: the 4 words of a lane -> 16 float16 pairs -> 4 ``nt`` ``mma.sync``.

    Operands: the accumulators out (4 ``nt`` tensors of 4), the words (4), x (``nt`` tensors of 4
    int32: 8 float16 of one row of x), the accumulators in, and (asymmetric) the zero pairs of
    :func:`_zero_asm` (``1024 + z`` and ``-(64 + z)`` for each of the 4 outputs)."""
    words = 8 * nt
    xs = [words + 4 + 4 * j for j in range(nt)]
    acc = words + 4 + 4 * nt
    lines = ["mov.b32 s, 0x2C002C00;"]  # float16 1/16
    if symmetric:  # zero point 8: 1024 + 8 and -(64 + 8)
        lines += ["mov.b32 o, 0x64086408;", "mov.b32 c, 0xD480D480;"]
        offsets = [("o", "c")] * 4
    else:
        zero = acc + 8 * nt
        offsets = [(f"${zero + i}", f"${zero + 4 + i}") for i in range(4)]
    for j, x in enumerate(xs):  # x pairs (x_i, x_i+4), as the fields pair
        lines += [f"prmt.b32 xa{j}, ${x}, ${x + 2}, 0x5410;", f"prmt.b32 xb{j}, ${x}, ${x + 2}, 0x7632;",
                  f"prmt.b32 xc{j}, ${x + 1}, ${x + 3}, 0x5410;", f"prmt.b32 xd{j}, ${x + 1}, ${x + 3}, 0x7632;"]
    for i in range(4):
        w, (o, c) = f"${words + i}", offsets[i]
        for f, source in ((0, w), (2, "t")):
            if f == 2:
                lines.append(f"shr.b32 t, {w}, 8;")
            lines += [f"lop3.b32 p{i}{f}, {source}, 0x000F000F, 0x64006400, 0xea;",  # 1024 + u
                      f"sub.f16x2 p{i}{f}, p{i}{f}, {o};",
                      f"lop3.b32 p{i}{f + 1}, {source}, 0x00F000F0, 0x64006400, 0xea;",  # 1024 + 16 u
                      f"fma.rn.f16x2 p{i}{f + 1}, p{i}{f + 1}, s, {c};"]
    mma = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
    for j in range(nt):
        for tile, (a, b) in enumerate(((0, 1), (2, 3))):
            first = 4 * (tile + 2 * j)
            c_in = ", ".join(f"${acc + first + e}" for e in range(4))
            c_out = ", ".join(f"${first + e}" for e in range(4))
            lines.append(f"{mma} {{d0, d1, d2, d3}}, {{p{a}0, p{b}0, p{a}1, p{b}1}}, {{xa{j}, xb{j}}}, {{{c_in}}};")
            lines.append(f"{mma} {{{c_out}}}, {{p{a}2, p{b}2, p{a}3, p{b}3}}, {{xc{j}, xd{j}}}, {{d0, d1, d2, d3}};")
    regs = ["o", "c", "s", "t"] + [f"x{v}{j}" for j in range(nt) for v in "abcd"]
    regs += [f"p{i}{f}" for i in range(4) for f in range(4)]
    return "{ .reg .b32 " + ", ".join(regs) + "; .reg .f32 d0, d1, d2, d3; " + " ".join(lines) + " }"


def _step_constraints(nt: int, symmetric: bool) -> str:
    return ",".join(["=f"] * (8 * nt) + ["r"] * (4 + 4 * nt) + ["f"] * (8 * nt) + ([] if symmetric else ["r"] * 8))


# Outputs ``1024 + z`` and ``-(64 + z)`` as float16 pairs for the 4 outputs of a lane, from their 4
# float16 zero points (two registers): exact for integer zero points.
_ZERO_ASM = ("{ .reg .b16 h0, h1, h2, h3; .reg .b32 z, k, m, n; mov.b32 {h0, h1}, $8; mov.b32 {h2, h3}, $9; "
             "mov.b32 k, 0x64006400; mov.b32 m, 0xBC00BC00; mov.b32 n, 0xD400D400; "
             + " ".join(f"mov.b32 z, {{h{i}, h{i}}}; add.f16x2 ${i}, z, k; fma.rn.f16x2 ${4 + i}, z, m, n;"
                        for i in range(4)) + " }")
# A lane's 4 float16 scales (outputs 4r .. 4r+3) as float32 in the accumulators' order: tile 0's
# (s0, s0, s1, s1), tile 1's (s2, s2, s3, s3).
_EXPAND_ASM = ("{ .reg .b16 a, b, c, d; mov.b32 {a, b}, $8; mov.b32 {c, d}, $9; "
               "cvt.f32.f16 $0, a; mov.b32 $1, $0; cvt.f32.f16 $2, b; mov.b32 $3, $2; "
               "cvt.f32.f16 $4, c; mov.b32 $5, $4; cvt.f32.f16 $6, d; mov.b32 $7, $6; }")


# ----------------------------------------------------------------------------- FP6

FP6_ITERATION_TILES = 8  # tiles of 16 inputs a warp decodes per FP6 iteration (2 reps of 4)


def _bits(positions) -> int:
    return sum(1 << (b % 32) for b in positions)


@dataclass(frozen=True)
class _Fp6Pair:
    """Pair ``i`` of a tile: inputs ``i`` and ``i + 8`` as one float16 pair (module docstring, FP6)."""

    i: int
    low: int  # the 2-bit plane position of field i's lowest magnitude bit (field i + 8's is 16 above)
    rotate: int  # the rotation that puts it at float16's lowest magnitude bit (10 - M)
    nibble: frozenset  # positions of fields i // 2 and i // 2 + 4 of its 4-bit word, that word rotated
    bits: frozenset  # positions of the two low bits and, in the 2-bit word rotated right by 3, the two signs


def _fp6_pairs(mantissa: int) -> tuple[tuple[_Fp6Pair, ...], tuple[int, int]]:
    """The 8 pairs of an FP6 tile and the rotations of the even and odd 4-bit words that put every pair's
    nibble 1 above its low bit (checked: the 2-bit plane's distances make them one rotation per word)."""
    from llmc.passes.bitplanes import fp6_low_positions

    low = fp6_low_positions(mantissa)
    pairs, word_rotation = [], {}
    for i in range(8):
        p, sign = low[i]
        if low[i + 8] != ((p + 16) % 32, (sign + 16) % 32) or (sign - p) % 32 != 8 + mantissa:
            raise AssertionError(f"bitplanes rule 4 changed: field {i} of FP6 m{mantissa}")
        f = i // 2
        c = word_rotation.setdefault(i % 2, (1 + p - 4 * f) % 32)
        if c != (1 + p - 4 * f) % 32:
            raise AssertionError(f"no single rotation of the 4-bit word for FP6 m{mantissa}")
        nibble = frozenset((4 * f + 16 * h + c + b) % 32 for h in (0, 1) for b in range(4))
        bits = frozenset({p, p + 16, (p + 5 + mantissa) % 32, (p + 21 + mantissa) % 32})
        pairs.append(_Fp6Pair(i, p, (10 - mantissa - p) % 32, nibble, bits))
    return tuple(pairs), (word_rotation[0], word_rotation[1])


def _set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _set_partitions(rest):
        yield [[first]] + partition
        for k in range(len(partition)):
            yield partition[:k] + [[first] + partition[k]] + partition[k + 1:]


@functools.cache
def _fp6_plan(mantissa: int):
    """How a lane's 4-bit words (``we``, ``wo``) and 2-bit word ``L`` of one output become its 8 pairs.

    ``S`` = L rotated right by 3 (the sign is 8 + M above the low bit in the plane, 5 + M in float16);
    each ``X`` word takes the low bits of its pairs from L and the rest from S; each ``Y`` word the
    nibbles of its pairs from the rotated 4-bit word and the rest from an X; a pair is its Y rotated
    by ``rotate`` and masked. A group is valid where the bits it takes from each source are disjoint;
    the plan is the valid grouping with the fewest X and Y words. Returns (word rotations, [(X mask,
    [(parity, Y mask, pairs)])])."""
    pairs, rotation = _fp6_pairs(mantissa)
    best = None
    by_parity = [[q for q in pairs if q.i % 2 == par] for par in (0, 1)]
    for ys_even in _set_partitions(by_parity[0]):
        for ys_odd in _set_partitions(by_parity[1]):
            ys = [(0, y) for y in ys_even] + [(1, y) for y in ys_odd]
            if any(set().union(*(q.nibble for q in y)) & set().union(*(q.bits for q in y)) for _, y in ys):
                continue
            for xs in _set_partitions(list(range(len(ys)))):
                served = [[q for k in x for q in ys[k][1]] for x in xs]
                lows = [_bits(b for q in group for b in (q.low, q.low + 16)) for group in served]
                signs = [_bits(b for q in group for b in q.bits if b not in (q.low, q.low + 16)) for group in served]
                if any(low & sign for low, sign in zip(lows, signs)):
                    continue
                cost = len(xs) + len(ys)
                if best is None or cost < best[0]:
                    best = (cost, [(low, [(ys[k][0], _bits(set().union(*(q.nibble for q in ys[k][1]))),
                                           tuple(ys[k][1])) for k in x]) for low, x in zip(lows, xs)])
    return rotation, best[1]


def _fp6_step_asm(nt: int, mantissa: int) -> str:
    """PTX of one FP6 rep: a lane's 4 outputs' even and odd 4-bit words and 2-bit word (one tile of 16
    inputs each) -> 32 float16 pairs -> 8 ``nt`` ``mma.sync``.

    Operands: the accumulators out (4 ``nt`` tensors of 4), the even words, the odd words, the 2-bit
    words (4 each), x (``nt`` times two tensors of 4 int32: inputs 0-7 and 8-15 of a row of x), the
    accumulators in."""
    rotation, plan = _fp6_plan(mantissa)
    first = 8 * nt
    xs = [(first + 12 + 8 * j, first + 16 + 8 * j) for j in range(nt)]
    acc = first + 12 + 8 * nt
    mask = ((0xF << (11 - mantissa)) | (1 << (10 - mantissa)) | (1 << 15)) * 0x10001
    lines, regs = [], ["s", "t"]
    for e in range(4):  # the lane's outputs 4 r + e
        words = (f"${first + e}", f"${first + 4 + e}")
        low = f"${first + 8 + e}"
        lines.append(f"shf.l.wrap.b32 s, {low}, {low}, 29;")
        for par, word in enumerate(words):
            regs.append(f"w{e}{par}")
            lines.append(f"shf.l.wrap.b32 w{e}{par}, {word}, {word}, {rotation[par]};" if rotation[par]
                         else f"mov.b32 w{e}{par}, {word};")
        for k, (low_mask, ys) in enumerate(plan):
            regs.append(f"x{e}{k}")
            lines.append(f"lop3.b32 x{e}{k}, {low}, s, {low_mask:#010x}, 0xe4;")  # (L & c) | (S & ~c)
            for n, (par, nibble_mask, members) in enumerate(ys):
                y = f"y{e}{k}{n}"
                regs.append(y)
                lines.append(f"lop3.b32 {y}, w{e}{par}, x{e}{k}, {nibble_mask:#010x}, 0xe4;")
                for q in members:
                    regs.append(f"p{e}{q.i}")
                    if q.rotate:
                        lines += [f"shf.l.wrap.b32 t, {y}, {y}, {q.rotate};", f"and.b32 p{e}{q.i}, t, {mask:#010x};"]
                    else:
                        lines.append(f"and.b32 p{e}{q.i}, {y}, {mask:#010x};")
    for j, (xa, xb) in enumerate(xs):  # x pairs (x_i, x_i+8), as the weights pair
        for i in range(8):
            regs.append(f"q{j}{i}")
            lines.append(f"prmt.b32 q{j}{i}, ${xa + i // 2}, ${xb + i // 2}, {0x7632 if i % 2 else 0x5410:#06x};")
    mma = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
    for j in range(nt):
        for tile in range(2):
            a, b = 2 * tile, 2 * tile + 1
            base = 4 * (tile + 2 * j)
            c_in = ", ".join(f"${acc + base + v}" for v in range(4))
            for step in range(4):
                d = ", ".join(f"${base + v}" for v in range(4)) if step == 3 else "d0, d1, d2, d3"
                lines.append(f"{mma} {{{d}}}, {{p{a}{2 * step}, p{b}{2 * step}, p{a}{2 * step + 1}, p{b}{2 * step + 1}}}, "
                             f"{{q{j}{2 * step}, q{j}{2 * step + 1}}}, {{{c_in}}};")
                c_in = "d0, d1, d2, d3"
    return "{ .reg .b32 " + ", ".join(regs) + "; .reg .f32 d0, d1, d2, d3; " + " ".join(lines) + " }"


def _fp6_step_constraints(nt: int) -> str:
    return ",".join(["=f"] * (8 * nt) + ["r"] * (12 + 8 * nt) + ["f"] * (8 * nt))


if gluon is not None:
    from triton.language.extra.cuda import gdc_launch_dependents

    STEP_ASM = gl.constexpr(tuple(_step_asm(nt, bool(sym)) for nt in (1, 2) for sym in (0, 1)))
    STEP_CONSTRAINTS = gl.constexpr(tuple(_step_constraints(nt, bool(sym)) for nt in (1, 2) for sym in (0, 1)))
    FP6_STEP_ASM = gl.constexpr(tuple(_fp6_step_asm(nt, m) for nt in (1, 2) for m in (2, 3)))
    FP6_STEP_CONSTRAINTS = gl.constexpr(tuple(_fp6_step_constraints(nt) for nt in (1, 2)))
    ZERO_ASM = gl.constexpr(_ZERO_ASM)
    EXPAND_ASM = gl.constexpr(_EXPAND_ASM)

    @gluon.jit
    def _load_rep(w_ptr, x_ptr, wr, warp_end, offs_n, n_ok, N, xr, x_col, M, stride_xm, NT: gl.constexpr,
                  EVEN: gl.constexpr):
        """Rep at word-rows ``wr`` (one per row of the block): the words and the x of rows ``xr`` (and
        ``xr + 8``); past the warp's range x is 0, so the (unread) words there add nothing. ``EVEN`` (every
        warp's range whole iterations, N a multiple of 32): no masks; the word-row is kept in the warp's range
        (the prefetch after the last iteration reads its last rep again, unused) and x's row below M (columns
        of x past M are never stored)."""
        if EVEN:
            wr = gl.minimum(wr, warp_end - 1)
            words = gl.load(w_ptr + wr[:, None] * N + offs_n[None, :], eviction_policy="evict_first")
            inputs = (wr * 4)[:, None] + x_col
            x0 = gl.load(x_ptr + gl.minimum(xr, M - 1)[None, :] * stride_xm + inputs)
            if NT == 2:
                x1 = gl.load(x_ptr + gl.minimum(xr + 8, M - 1)[None, :] * stride_xm + inputs)
            else:
                x1 = x0
            return words, x0, x1
        ok = (wr < warp_end)[:, None]
        words = gl.load(w_ptr + wr[:, None] * N + offs_n[None, :], mask=ok & n_ok, other=0,
                        eviction_policy="evict_first")
        inputs = (wr * 4)[:, None] + x_col
        x0 = gl.load(x_ptr + xr[None, :] * stride_xm + inputs, mask=ok & (xr < M)[None, :], other=0)
        if NT == 2:
            x1 = gl.load(x_ptr + (xr + 8)[None, :] * stride_xm + inputs, mask=ok & (xr + 8 < M)[None, :], other=0)
        else:
            x1 = x0
        return words, x0, x1

    @gluon.jit
    def _rep(words, x0, x1, a0, a1, b0, b1, zo, zc, NT: gl.constexpr, SYMMETRIC: gl.constexpr):
        """One rep into the accumulators: tiles 0 and 1 of rows 0-7 (``a0``, ``a1``) and 8-15 (``b0``, ``b1``)."""
        asm: gl.constexpr = STEP_ASM[2 * (NT - 1) + SYMMETRIC]
        constraints: gl.constexpr = STEP_CONSTRAINTS[2 * (NT - 1) + SYMMETRIC]
        if NT == 1:
            if SYMMETRIC:
                a0, a1 = gl.inline_asm_elementwise(asm, constraints, [words, x0, a0, a1],
                                                   dtype=(gl.float32, gl.float32), is_pure=True, pack=4)
            else:
                a0, a1 = gl.inline_asm_elementwise(asm, constraints, [words, x0, a0, a1, zo, zc],
                                                   dtype=(gl.float32, gl.float32), is_pure=True, pack=4)
        else:
            if SYMMETRIC:
                a0, a1, b0, b1 = gl.inline_asm_elementwise(asm, constraints, [words, x0, x1, a0, a1, b0, b1],
                                                           dtype=(gl.float32, ) * 4, is_pure=True, pack=4)
            else:
                a0, a1, b0, b1 = gl.inline_asm_elementwise(asm, constraints, [words, x0, x1, a0, a1, b0, b1, zo, zc],
                                                           dtype=(gl.float32, ) * 4, is_pure=True, pack=4)
        return a0, a1, b0, b1

    @gluon.jit
    def _zero_pairs(z):
        return gl.inline_asm_elementwise(ZERO_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [z], dtype=(gl.int32, gl.int32),
                                         is_pure=True, pack=4)

    @gluon.jit
    def _prefetch_lanes(units_total, units_per_split, units_per_warp, W_K: gl.constexpr):
        """For :func:`_prefetch`: each lane's warp's range of K units, ``[begin, end)`` (:func:`_warp_range`), and
        its lane."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [W_K], [0])
        lanes = gl.arange(0, 32 * W_K, layout=layout)
        begin, end = _warp_range(lanes // 32, units_total, units_per_split, units_per_warp)
        return begin, end, lanes % 32

    @gluon.jit
    def _prefetch(hi_ptr, lo_ptr, tile, begin, end, lane, N, n0):
        """An L2 prefetch of the FP6 iteration whose rep 0 is at tile ``tile`` of the warp's range ``[begin, end)``:
        lanes 0-15 one line of its 16 rows of the 4-bit plane, lanes 16-31 one of its 8 rows of the 2-bit plane
        (twice); rows past the range are kept at its last one."""
        hi_row = gl.minimum(2 * (begin + tile) + lane % 16, gl.maximum(2 * end - 1, 0))
        lo_row = gl.minimum(begin + tile + lane % 8, gl.maximum(end - 1, 0))
        lines = gl.where(lane < 16, hi_ptr + hi_row * N, lo_ptr + lo_row * N) + n0
        gl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [lines], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _load_group(s_ptr, z_ptr, unit, warp_end, offs_n, n_ok, N, placeholder, STARTS: gl.constexpr,
                    GROUP_UNITS: gl.constexpr, SYMMETRIC: gl.constexpr, EVEN: gl.constexpr):
        """The scales (and zero points) of the group of ``unit`` (a word-row, or an FP6 tile; one per row of
        the block) where a group ``STARTS`` at that rep; else ``placeholder``. The int4 loop loads them an
        iteration ahead of their use, the FP6 loop where it uses them, and both kernels a per-channel scale
        with the first words. ``EVEN``: as :func:`_load_rep`'s."""
        if STARTS and EVEN:
            at = (gl.minimum(unit, warp_end - 1) // GROUP_UNITS)[:, None] * N + offs_n[None, :]
            scale = gl.load(s_ptr + at)
            if SYMMETRIC:
                zero = placeholder
            else:
                zero = gl.load(z_ptr + at)
        elif STARTS:
            mask = n_ok & (unit < warp_end)[:, None]
            at = (unit // GROUP_UNITS)[:, None] * N + offs_n[None, :]
            scale = gl.load(s_ptr + at, mask=mask, other=0.0)
            if SYMMETRIC:
                zero = placeholder
            else:
                zero = gl.load(z_ptr + at, mask=mask, other=0.0)
        else:
            scale = placeholder
            zero = placeholder
        return scale, zero

    @gluon.jit
    def _load_iteration(w_ptr, x_ptr, s_ptr, z_ptr, unit, warp_end, offs_n, n_ok, N, xr, x_col, M, stride_xm,
                        placeholder, STARTS: gl.constexpr, GROUP_ROWS: gl.constexpr, SYMMETRIC: gl.constexpr,
                        NT: gl.constexpr, EVEN: gl.constexpr):
        """The 4 reps of the iteration whose rep 0 is at word-rows ``unit``: per rep its words, x (two B tiles)
        and the scale and zero point of a group that ``STARTS`` there (:func:`_load_rep`, :func:`_load_group`)."""
        w0, x00, x10 = _load_rep(w_ptr, x_ptr, unit, warp_end, offs_n, n_ok, N, xr, x_col, M, stride_xm, NT, EVEN)
        w1, x01, x11 = _load_rep(w_ptr, x_ptr, unit + 4, warp_end, offs_n, n_ok, N, xr, x_col, M, stride_xm, NT, EVEN)
        w2, x02, x12 = _load_rep(w_ptr, x_ptr, unit + 8, warp_end, offs_n, n_ok, N, xr, x_col, M, stride_xm, NT, EVEN)
        w3, x03, x13 = _load_rep(w_ptr, x_ptr, unit + 12, warp_end, offs_n, n_ok, N, xr, x_col, M, stride_xm, NT,
                                 EVEN)
        s0, z0 = _load_group(s_ptr, z_ptr, unit, warp_end, offs_n, n_ok, N, placeholder, STARTS[0], GROUP_ROWS,
                             SYMMETRIC, EVEN)
        s1, z1 = _load_group(s_ptr, z_ptr, unit + 4, warp_end, offs_n, n_ok, N, placeholder, STARTS[1], GROUP_ROWS,
                             SYMMETRIC, EVEN)
        s2, z2 = _load_group(s_ptr, z_ptr, unit + 8, warp_end, offs_n, n_ok, N, placeholder, STARTS[2], GROUP_ROWS,
                             SYMMETRIC, EVEN)
        s3, z3 = _load_group(s_ptr, z_ptr, unit + 12, warp_end, offs_n, n_ok, N, placeholder, STARTS[3], GROUP_ROWS,
                             SYMMETRIC, EVEN)
        return w0, x00, x10, s0, z0, w1, x01, x11, s1, z1, w2, x02, x12, s2, z2, w3, x03, x13, s3, z3

    @gluon.jit
    def _add_group(acc0, acc1, acc2, acc3, a0, a1, b0, b1, scale, NT: gl.constexpr):
        """One group's sums (tiles 0 and 1 of rows 0-7, ``a0``, ``a1``, and 8-15, ``b0``, ``b1``) times its
        ``scale`` (the float16 scales of a lane's 4 outputs), added to the accumulators."""
        s0, s1 = gl.inline_asm_elementwise(EXPAND_ASM, "=f,=f,=f,=f,=f,=f,=f,=f,r,r", [scale],
                                           dtype=(gl.float32, gl.float32), is_pure=True, pack=4)
        acc0 += a0 * s0
        acc1 += a1 * s1
        if NT == 2:
            acc2 += b0 * s0
            acc3 += b1 * s1
        return acc0, acc1, acc2, acc3

    @gluon.jit
    def _iteration(w0, w1, w2, w3, x00, x01, x02, x03, x10, x11, x12, x13, acc0, acc1, acc2, acc3, zo, zc,
                   s0, s1, s2, s3, z0, z1, z2, z3, GROUP_ROWS: gl.constexpr, CHANNEL: gl.constexpr,
                   SYMMETRIC: gl.constexpr, NT: gl.constexpr):
        """The 4 reps of one iteration into the accumulators: chained per channel; per group (``GROUP_ROWS``
        word-rows, 4 or more) from zero, then times the scale; ``s0``-``s3`` and ``z0``-``z3`` are the scales
        and zero points of the groups that start at reps 0-3 (:func:`_load_group`)."""
        REPS_PER_GROUP: gl.constexpr = min(4, GROUP_ROWS // 4)
        zero = gl.zeros_like(acc0)
        a0 = acc0
        a1 = acc1
        b0 = acc2
        b1 = acc3
        for k in gl.static_range(4):
            if k == 0:
                words, x0, x1, z = w0, x00, x10, z0
            elif k == 1:
                words, x0, x1, z = w1, x01, x11, z1
            elif k == 2:
                words, x0, x1, z = w2, x02, x12, z2
            else:
                words, x0, x1, z = w3, x03, x13, z3
            if not CHANNEL and k % REPS_PER_GROUP == 0:
                a0 = zero
                a1 = zero
                b0 = zero
                b1 = zero
                if not SYMMETRIC:
                    zo, zc = _zero_pairs(z)
            a0, a1, b0, b1 = _rep(words, x0, x1, a0, a1, b0, b1, zo, zc, NT, SYMMETRIC)
            if not CHANNEL and k % REPS_PER_GROUP == REPS_PER_GROUP - 1:
                if k + 1 - REPS_PER_GROUP == 0:  # by the rep where this group started
                    scale = s0
                elif k + 1 - REPS_PER_GROUP == 1:
                    scale = s1
                elif k + 1 - REPS_PER_GROUP == 2:
                    scale = s2
                else:
                    scale = s3
                acc0, acc1, acc2, acc3 = _add_group(acc0, acc1, acc2, acc3, a0, a1, b0, b1, scale, NT)
        if CHANNEL:
            acc0 = a0
            acc1 = a1
            acc2 = b0
            acc3 = b1
        return acc0, acc1, acc2, acc3

    @gluon.jit
    def _warp_range(warp, units_total, units_per_split, units_per_warp):
        """Warp ``warp``'s range ``[begin, end)`` of K units (int4 word-rows or FP6 tiles) in this program's split."""
        split_begin = gl.program_id(1) * units_per_split
        begin = split_begin + warp * units_per_warp
        end = gl.minimum(gl.minimum(begin + units_per_warp, split_begin + units_per_split), units_total)
        return begin, end

    @gluon.jit
    def _lanes(units_total, units_per_split, units_per_warp, N, layout: gl.constexpr, W_K: gl.constexpr,
               BLOCK_N: gl.constexpr):
        """This program's block of ``BLOCK_N`` outputs and each lane's place in it: ``block`` (4 w + q) and
        the outputs (4 r + e), the end of its warp's range of K units (int4 word-rows or FP6 tiles), the
        row of x it feeds (``xr``, the B operand's column) and its column in x's 16-byte loads, and its unit
        in rep 0 of iteration 0 (``first``)."""
        n0 = gl.program_id(0) * BLOCK_N
        block = gl.arange(0, 4 * W_K, layout=gl.SliceLayout(1, layout))  # 4 w + q
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))  # 4 r + e
        offs_n = n0 + cols
        n_ok = (offs_n < N)[None, :]
        warp_begin, warp_end = _warp_range(block // 4, units_total, units_per_split, units_per_warp)
        xr = cols // 4
        x_col = (cols % 4)[None, :]
        first = warp_begin + block % 4
        return n0, block, offs_n, n_ok, warp_end, xr, x_col, first

    @gluon.jit
    def _finish(acc0, acc1, acc2, acc3, channel_scale, y_ptr, part_ptr, n0, M, N, stride_ym, W_K: gl.constexpr,
                BLOCK_N: gl.constexpr, CHANNEL: gl.constexpr, NT: gl.constexpr, POWER: gl.constexpr):
        """The per-channel scale (loaded with the first words), then the warps' sums stored. Element (4 w + q,
        c = 4 r + e) of tile ``T``'s accumulator of rows ``8 R ..`` (``acc0``: T 0, R 0; ``acc1``: 1, 0; ``acc2``:
        0, 1; ``acc3``: 1, 1) is warp ``w``'s part of y[8 R + 2 q + e % 2][n0 + 4 r + 2 T + e // 2]: the four
        are joined and permuted into [warp, row, output], moved once through shared memory into a layout where
        each thread holds every warp's part of 4 adjacent outputs of a row, and summed there."""
        if CHANNEL:
            zero = gl.zeros_like(acc0)
            acc0, acc1, acc2, acc3 = _add_group(zero, zero, zero, zero, acc0, acc1, acc2, acc3, channel_scale, NT)
        ROWS: gl.constexpr = 8 * NT
        if NT == 2:  # [4 W_K, BLOCK_N, T, R] -> [w, q, r, e // 2, e % 2, T, R] -> [w, R, q, e % 2, r, T, e // 2]
            both = gl.join(gl.join(acc0, acc1), gl.join(acc2, acc3))
            parts = gl.permute(gl.reshape(both, (W_K, 4, BLOCK_N // 4, 2, 2, 2, 2)), (0, 6, 1, 4, 2, 5, 3))
        else:  # [4 W_K, BLOCK_N, T] -> [w, q, r, e // 2, e % 2, T] -> [w, q, e % 2, r, T, e // 2]
            both = gl.join(acc0, acc1)
            parts = gl.permute(gl.reshape(both, (W_K, 4, BLOCK_N // 4, 2, 2, 2)), (0, 1, 4, 2, 5, 3))
        parts = gl.reshape(parts, (W_K, ROWS, BLOCK_N))
        if W_K > 1:
            parts = gl.convert_layout(parts, gl.BlockedLayout([W_K, 1, 4], [1, 4, 8], [1, W_K, 1], [2, 1, 0]))
        total = gl.sum(parts, axis=0)  # [row, output]
        if POWER != 1.0:  # FP6: the pairs are V * 2^(bias - 15)
            total = total * POWER
        layout: gl.constexpr = total.type.layout
        rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))[:, None]
        outputs = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))[None, :]
        mask = (rows < M) & (outputs < N)
        if gl.num_programs(1) == 1:
            gl.store(y_ptr + rows * stride_ym + outputs, total.to(y_ptr.dtype.element_ty), mask=mask)
        else:  # partials [split][M][N], summed by splitk.sum_splits
            gl.store(part_ptr + gl.program_id(1) * M * N + rows * N + outputs, total, mask=mask)

    @gluon.jit
    def _mma_decode_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, part_ptr, M, N, stride_xm, stride_ym, rows_total,
                           rows_per_split, rows_per_warp, iterations, GROUP_ROWS: gl.constexpr,
                           CHANNEL: gl.constexpr, SYMMETRIC: gl.constexpr, NT: gl.constexpr, W_K: gl.constexpr,
                           EVEN: gl.constexpr, DEPENDENTS: gl.constexpr = False):
        # x_ptr: x as int32 [M, K / 2] (row stride stride_xm); w_ptr: int4 words [K / 8, N].
        if DEPENDENTS:  # sum_splits may start now (_launches_sum_early)
            gdc_launch_dependents()
        layout: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [W_K, 1], [0, 1])
        BLOCK_N: gl.constexpr = 32
        n0, block, offs_n, n_ok, warp_end, xr, x_col, first = _lanes(rows_total, rows_per_split, rows_per_warp, N,
                                                                     layout, W_K, BLOCK_N)
        acc0 = gl.zeros([4 * W_K, BLOCK_N], gl.float32, layout)
        acc1 = acc0
        acc2 = acc0
        acc3 = acc0
        zo = gl.zeros([4 * W_K, BLOCK_N], gl.int32, layout)
        zc = zo
        none = gl.zeros([4 * W_K, BLOCK_N], gl.float16, layout)
        # Per channel, the scales (and zero points) are loaded with the first words, not after the loop.
        channel_scale, channel_zero = _load_group(s_ptr, z_ptr, block * 0, warp_end, offs_n, n_ok, N, none,
                                                  CHANNEL, 1, SYMMETRIC, EVEN)
        if CHANNEL and not SYMMETRIC:
            zo, zc = _zero_pairs(channel_zero)
        RPG: gl.constexpr = min(4, GROUP_ROWS // 4)  # reps per group
        START: gl.constexpr = (not CHANNEL, not CHANNEL and RPG == 1, not CHANNEL and RPG <= 2,
                               not CHANNEL and RPG == 1)  # whether a group starts at rep 0-3
        (w0, x00, x10, s0, z0, w1, x01, x11, s1, z1, w2, x02, x12, s2, z2, w3, x03, x13, s3, z3) = _load_iteration(
            w_ptr, x_ptr, s_ptr, z_ptr, first, warp_end, offs_n, n_ok, N, xr, x_col, M, stride_xm, none, START,
            GROUP_ROWS, SYMMETRIC, NT, EVEN)
        for it in range(iterations):
            base = first + it * 16
            # The next iteration's words, x, scales and zero points are in flight while this one's are decoded.
            (n0w, n0x0, n0x1, ns0, nz0, n1w, n1x0, n1x1, ns1, nz1, n2w, n2x0, n2x1, ns2, nz2, n3w, n3x0, n3x1, ns3,
             nz3) = _load_iteration(w_ptr, x_ptr, s_ptr, z_ptr, base + 16, warp_end, offs_n, n_ok, N, xr, x_col, M,
                                    stride_xm, none, START, GROUP_ROWS, SYMMETRIC, NT, EVEN)
            acc0, acc1, acc2, acc3 = _iteration(w0, w1, w2, w3, x00, x01, x02, x03, x10, x11, x12, x13, acc0, acc1,
                                                acc2, acc3, zo, zc, s0, s1, s2, s3, z0, z1, z2, z3, GROUP_ROWS,
                                                CHANNEL, SYMMETRIC, NT)
            w0, x00, x10, s0, z0 = n0w, n0x0, n0x1, ns0, nz0
            w1, x01, x11, s1, z1 = n1w, n1x0, n1x1, ns1, nz1
            w2, x02, x12, s2, z2 = n2w, n2x0, n2x1, ns2, nz2
            w3, x03, x13, s3, z3 = n3w, n3x0, n3x1, ns3, nz3
        _finish(acc0, acc1, acc2, acc3, channel_scale, y_ptr, part_ptr, n0, M, N, stride_ym, W_K, BLOCK_N, CHANNEL, NT,
                1.0)


    @gluon.jit
    def _load_fp6_rep(hi_ptr, lo_ptr, x_ptr, tile, warp_end, offs_n, n_ok, N, xr, x_col, M, stride_xm,
                      NT: gl.constexpr, EVEN: gl.constexpr):
        """FP6 rep at tiles ``tile`` (one per row of the block): the even and odd 4-bit words, the 2-bit
        words and x's 16 inputs (two tensors of 4 int32) of rows ``xr`` (and ``xr + 8``). ``EVEN``: as
        :func:`_load_rep`'s."""
        if EVEN:
            tile = gl.minimum(tile, warp_end - 1)
            at = tile[:, None] * N + offs_n[None, :]
            even = gl.load(hi_ptr + (2 * tile)[:, None] * N + offs_n[None, :], eviction_policy="evict_first")
            odd = gl.load(hi_ptr + (2 * tile + 1)[:, None] * N + offs_n[None, :], eviction_policy="evict_first")
            low = gl.load(lo_ptr + at, eviction_policy="evict_first")
            inputs = (tile * 8)[:, None] + x_col
            row0 = gl.minimum(xr, M - 1)[None, :] * stride_xm
            xa0 = gl.load(x_ptr + row0 + inputs)
            xb0 = gl.load(x_ptr + row0 + inputs + 4)
            if NT == 2:
                row1 = gl.minimum(xr + 8, M - 1)[None, :] * stride_xm
                xa1 = gl.load(x_ptr + row1 + inputs)
                xb1 = gl.load(x_ptr + row1 + inputs + 4)
            else:
                xa1 = xa0
                xb1 = xb0
            return even, odd, low, xa0, xb0, xa1, xb1
        ok = (tile < warp_end)[:, None]
        mask = ok & n_ok
        at = tile[:, None] * N + offs_n[None, :]
        even = gl.load(hi_ptr + (2 * tile)[:, None] * N + offs_n[None, :], mask=mask, other=0,
                       eviction_policy="evict_first")
        odd = gl.load(hi_ptr + (2 * tile + 1)[:, None] * N + offs_n[None, :], mask=mask, other=0,
                      eviction_policy="evict_first")
        low = gl.load(lo_ptr + at, mask=mask, other=0, eviction_policy="evict_first")
        inputs = (tile * 8)[:, None] + x_col
        x_ok = ok & (xr < M)[None, :]
        xa0 = gl.load(x_ptr + xr[None, :] * stride_xm + inputs, mask=x_ok, other=0)
        xb0 = gl.load(x_ptr + xr[None, :] * stride_xm + inputs + 4, mask=x_ok, other=0)
        if NT == 2:
            x_ok1 = ok & (xr + 8 < M)[None, :]
            xa1 = gl.load(x_ptr + (xr + 8)[None, :] * stride_xm + inputs, mask=x_ok1, other=0)
            xb1 = gl.load(x_ptr + (xr + 8)[None, :] * stride_xm + inputs + 4, mask=x_ok1, other=0)
        else:
            xa1 = xa0
            xb1 = xb0
        return even, odd, low, xa0, xb0, xa1, xb1

    @gluon.jit
    def _fp6_rep(even, odd, low, xa0, xb0, xa1, xb1, a0, a1, b0, b1, MANTISSA: gl.constexpr, NT: gl.constexpr):
        asm: gl.constexpr = FP6_STEP_ASM[2 * (NT - 1) + MANTISSA - 2]
        constraints: gl.constexpr = FP6_STEP_CONSTRAINTS[NT - 1]
        if NT == 1:
            a0, a1 = gl.inline_asm_elementwise(asm, constraints, [even, odd, low, xa0, xb0, a0, a1],
                                               dtype=(gl.float32, gl.float32), is_pure=True, pack=4)
        else:
            a0, a1, b0, b1 = gl.inline_asm_elementwise(asm, constraints, [even, odd, low, xa0, xb0, xa1, xb1,
                                                                          a0, a1, b0, b1],
                                                       dtype=(gl.float32, ) * 4, is_pure=True, pack=4)
        return a0, a1, b0, b1

    @gluon.jit
    def _mma_fp6_kernel(x_ptr, hi_ptr, lo_ptr, s_ptr, y_ptr, part_ptr, M, N, stride_xm, stride_ym, tiles_total,
                        tiles_per_split, tiles_per_warp, iterations, GROUP_TILES: gl.constexpr,
                        CHANNEL: gl.constexpr, MANTISSA: gl.constexpr, POWER: gl.constexpr, NT: gl.constexpr,
                        W_K: gl.constexpr, EVEN: gl.constexpr, DEPENDENTS: gl.constexpr = False,
                        PREFETCH: gl.constexpr = False):
        # x_ptr: x as int32 [M, K / 2]; hi_ptr: the 4-bit plane [K / 8, N]; lo_ptr: the 2-bit plane [K / 16, N].
        if DEPENDENTS:  # sum_splits may start now (_launches_sum_early)
            gdc_launch_dependents()
        layout: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [W_K, 1], [0, 1])
        BLOCK_N: gl.constexpr = 32
        REPS_PER_GROUP: gl.constexpr = 2 if CHANNEL else min(2, GROUP_TILES // 4)
        n0, block, offs_n, n_ok, warp_end, xr, x_col, first = _lanes(tiles_total, tiles_per_split, tiles_per_warp,
                                                                     N, layout, W_K, BLOCK_N)
        acc0 = gl.zeros([4 * W_K, BLOCK_N], gl.float32, layout)
        acc1 = acc0
        acc2 = acc0
        acc3 = acc0
        zero = acc0
        none = gl.zeros([4 * W_K, BLOCK_N], gl.float16, layout)
        # Per channel, the scales are loaded with the first words, not after the loop.
        channel_scale, _ = _load_group(s_ptr, s_ptr, block * 0, warp_end, offs_n, n_ok, N, none, CHANNEL, 1, True, EVEN)
        e0, o0, l0, xa00, xb00, xa10, xb10 = _load_fp6_rep(hi_ptr, lo_ptr, x_ptr, first, warp_end, offs_n, n_ok, N,
                                                           xr, x_col, M, stride_xm, NT, EVEN)
        e1, o1, l1, xa01, xb01, xa11, xb11 = _load_fp6_rep(hi_ptr, lo_ptr, x_ptr, first + 4, warp_end, offs_n, n_ok,
                                                           N, xr, x_col, M, stride_xm, NT, EVEN)
        if PREFETCH:
            begin, end, lane = _prefetch_lanes(tiles_total, tiles_per_split, tiles_per_warp, W_K)
        for it in range(iterations):
            base = first + it * 8
            if PREFETCH:  # the lines the loads below read, asked for before this iteration's MMAs (mma_launch)
                _prefetch(hi_ptr, lo_ptr, (it + 1) * 8, begin, end, lane, N, n0)
            # The next iteration's words and x are in flight while this one's are decoded (a group's scales
            # are loaded where they are used: loaded an iteration ahead, 16 rows of x ran up to 21% slower).
            ne0, no0, nl0, nxa00, nxb00, nxa10, nxb10 = _load_fp6_rep(hi_ptr, lo_ptr, x_ptr, base + 8, warp_end,
                                                                      offs_n, n_ok, N, xr, x_col, M, stride_xm, NT,
                                                                      EVEN)
            ne1, no1, nl1, nxa01, nxb01, nxa11, nxb11 = _load_fp6_rep(hi_ptr, lo_ptr, x_ptr, base + 12, warp_end,
                                                                      offs_n, n_ok, N, xr, x_col, M, stride_xm, NT,
                                                                      EVEN)
            a0 = acc0
            a1 = acc1
            b0 = acc2
            b1 = acc3
            for k in gl.static_range(2):
                if k == 0:
                    even, odd, low, xa0, xb0, xa1, xb1 = e0, o0, l0, xa00, xb00, xa10, xb10
                else:
                    even, odd, low, xa0, xb0, xa1, xb1 = e1, o1, l1, xa01, xb01, xa11, xb11
                if not CHANNEL and k % REPS_PER_GROUP == 0:
                    a0 = zero
                    a1 = zero
                    b0 = zero
                    b1 = zero
                a0, a1, b0, b1 = _fp6_rep(even, odd, low, xa0, xb0, xa1, xb1, a0, a1, b0, b1, MANTISSA, NT)
                if not CHANNEL and k % REPS_PER_GROUP == REPS_PER_GROUP - 1:
                    scale, _ = _load_group(s_ptr, s_ptr, base + 4 * k, warp_end, offs_n, n_ok, N, none, True,
                                           GROUP_TILES, True, EVEN)
                    acc0, acc1, acc2, acc3 = _add_group(acc0, acc1, acc2, acc3, a0, a1, b0, b1, scale, NT)
            if CHANNEL:
                acc0 = a0
                acc1 = a1
                acc2 = b0
                acc3 = b1
            e0, o0, l0, xa00, xb00, xa10, xb10 = ne0, no0, nl0, nxa00, nxb00, nxa10, nxb10
            e1, o1, l1, xa01, xb01, xa11, xb11 = ne1, no1, nl1, nxa01, nxb01, nxa11, nxb11
        _finish(acc0, acc1, acc2, acc3, channel_scale, y_ptr, part_ptr, n0, M, N, stride_ym, W_K, BLOCK_N, CHANNEL, NT,
                POWER)

    # The same kernels with ``iterations`` a runtime value even where it is 1, for launches of one iteration a
    # warp and at most one program per SM. Triton makes an argument of 1 a constant, and the loop straight-line
    # code (52-70 registers instead of 80-128): on the H100 that ran 6-19% slower at K = 576 and 896 with 18-28
    # programs (int4 576x576 at 16 rows: 3.44 against 2.90 us), and 9-18% faster on 896->4864's 152 programs.
    _mma_decode_loop = gluon.jit(_mma_decode_kernel.fn, do_not_specialize=["iterations"])
    _mma_fp6_loop = gluon.jit(_mma_fp6_kernel.fn, do_not_specialize=["iterations"])


@dataclass(frozen=True)
class MmaLaunch:
    """Rule 10's launch: ``warps`` warps per program, each ``iterations`` of 16 word-rows, and
    ``split`` programs per block of 32 outputs, each ``rows_per_split`` word-rows; ``prefetch`` (FP6 only):
    each iteration asks L2 for the lines of the next one first (``PREFETCH``)."""

    warps: int
    split: int
    rows_per_split: int
    rows_per_warp: int
    iterations: int
    prefetch: bool = False


@dataclass(frozen=True)
class MmaKernel:
    """Rule 10's kernel for one weight format: its compile-time constants other than the launch's
    (:func:`kernel_of`), as sorted pairs."""

    fp6: bool
    constants: tuple


def kernel_of(w) -> MmaKernel:
    """The kernel that runs ``w`` (int4 ``IntNWeights`` or FP6 ``FpxWeights`` that :func:`takes` accepts)."""
    k = w.in_features
    if _is_fp6(w):
        constants = dict(GROUP_TILES=FP6_ITERATION_TILES if w.group_size == k else w.group_size // 16,
                         CHANNEL=w.group_size == k, MANTISSA=w.fmt.mantissa_bits, POWER=2.0 ** (15 - w.fmt.bias))
    else:
        constants = dict(GROUP_ROWS=ITERATION_ROWS if w.group_size == k else w.group_size // 8,
                         CHANNEL=w.group_size == k, SYMMETRIC=w.symmetric)
    return MmaKernel(_is_fp6(w), tuple(sorted(constants.items())))


def available(device: torch.device) -> bool:
    """Whether rule 10 can run on ``device``: Gluon imported and a compute capability 9.0 GPU."""
    return gluon is not None and device.type == "cuda" and splitk._capability(device) == (9, 0)


def _is_fp6(w) -> bool:
    return hasattr(w, "fmt")  # fp6_linear.FpxWeights; intn_linear.IntNWeights has no format


def takes(w) -> bool:
    """Whether the kernel takes ``w``: ``IntNWeights`` int4 with float16 scales, groups of 32, 64 or a
    multiple of 128 inputs (an iteration never spans two groups), or one scale per output; or
    ``FpxWeights`` FP6 in the kernels' tile with float16 scales, groups of a multiple of 64 or one per
    output."""
    group = w.group_size
    if _is_fp6(w):
        return (w.fmt.bits == 6 and w.tile == 16 and w.scale.dtype == torch.float16
                and (group == w.in_features or group % 64 == 0))
    return (w.bits == 4 and w.scale.dtype == torch.float16
            and (group == w.in_features or group in (32, 64) or group % 128 == 0))


def mma_config(m: int, w, sms: int) -> MmaLaunch | None:
    """Rule 10's launch over ``m`` rows, or None where :data:`MMA_RULE` (symmetric int4), :data:`ASYM_MMA_RULE`
    (asymmetric int4) or :data:`FP6_MMA_RULE` (FP6) does not take the linear, at 1-7 rows of symmetric int4 with
    fewer outputs than inputs and fewer than :data:`NARROW_BELOW` weights, or at one row of int4 where it has
    fewer than :data:`ONE_ROW_WIDE` outputs per input (symmetric: nor that many inputs per output)."""
    rule = FP6_MMA_RULE if _is_fp6(w) else MMA_RULE if w.symmetric else ASYM_MMA_RULE
    least = next((least for rows, least in rule if m <= rows), None)
    count = w.in_features * w.out_features
    if least is None or count < least or not takes(w):
        return None
    if not _is_fp6(w):
        if count < NARROW_BELOW and w.symmetric and m < 8 and w.out_features < w.in_features:
            return None
        wide = w.out_features >= ONE_ROW_WIDE * w.in_features
        long = w.symmetric and w.in_features >= ONE_ROW_WIDE * w.out_features
        if m == 1 and not (wide or long):
            return None
    return mma_launch(m, w.in_features, w.out_features, sms, kernel_of(w))


@functools.lru_cache(maxsize=4096)
def mma_launch(m: int, in_features: int, out_features: int, sms: int, kernel: MmaKernel) -> MmaLaunch:
    """K split ``parallel`` ways, the power of 2 that gives each warp one iteration of 128 inputs, halved while
    the blocks of 32 outputs would take more warps per SM than stay resident (:func:`_resident`, from ``kernel``'s
    registers; two waves for one iteration a warp without a split); over the warps of one program up to 8, then
    over programs. Where that halving stopped, K splits (further) to the most programs of 4 warps that stay
    resident, if that shortens every warp's loop: by an iteration where the loads are masked (:func:`_even`; two
    where the split is new and must buy back its sum), to a third where it puts masks back. A split whose programs
    of 8 warps would leave SMs idle runs in twice the programs of 4 warps. H100 (docs/benchmarks/kernels-rounds.md,
    rounds 18-19), symmetric int4 in groups of 128: 4 x 1 on 8192->28672 (896 blocks, 28 warps per SM), 8 x 1 on
    4096->11008, 4 x 6 on 11008->4096 (8 x 2 on 14336->4096, unmasked), 4 x 4 on 1536->576, 8 x 8 on 4864->896,
    4 x 3 on 13824->5120 at 9-16 rows; zero points in groups of 32 at 9-16 rows (168-176 registers): 4 x 3 on
    11008->4096.

    FP6 per channel at 1-8 rows, where the blocks number from three quarters of the SMs to one per SM and K is at
    least 32 iterations, runs one program per block over all of K instead (16 warps from 64 iterations, else 8), each
    iteration first asking L2 for the lines the next one loads (``prefetch``): 2-11% faster on 4096x4096,
    11008->4096, 14336->4096, 18944->3584 and 8192->4096 (0.58, 0.76, 0.80, 0.81, 0.72 of the roofline at one row);
    on 3584x3584 (28 iterations) 7-11% and on 8960->1536 (48 blocks) 22% slower (round 20)."""
    iterations = -(-in_features // 8 // ITERATION_ROWS)
    blocks = -(-out_features // 32)
    nt = 1 if m <= 8 else 2

    def fits(launch: MmaLaunch, waves: int = 1) -> bool:
        resident = _resident(launch, nt, kernel, in_features, out_features)
        return blocks * launch.split * launch.warps <= waves * resident * sms

    if (kernel.fp6 and dict(kernel.constants)["CHANNEL"] and nt == 1 and 4 * blocks >= 3 * sms and blocks <= sms
            and iterations >= 32):  # one program per block and SM over all of K, asking L2 for its next lines first
        whole = dataclasses.replace(_split_launch(in_features, 16 if iterations >= 64 else 8, 1), prefetch=True)
        if fits(whole):
            return whole

    parallel = 1 << (iterations - 1).bit_length()  # the power of 2 >= iterations: one iteration a warp
    launch = _split_launch(in_features, min(8, parallel), max(1, parallel // 8))
    halved = False
    while parallel > 1 and not fits(launch, 2 if launch.iterations == 1 and launch.split == 1 else 1):
        parallel //= 2
        halved = True
        launch = _split_launch(in_features, min(8, parallel), max(1, parallel // 8))
    if halved:  # fill the resident warps
        masked = not _even(launch, in_features, out_features)
        # the most splits whose warps stay resident (past one iteration a split, _split_launch gives the same launch)
        for split in range(min(64 * sms // (blocks * 4), iterations), launch.split, -1):
            grown = _split_launch(in_features, 4, split)
            if fits(grown):
                # a new split must buy back its sum, and masks put back must cut the loop to a third
                if (grown.iterations < launch.iterations - (launch.split == 1) if masked
                        else 3 * grown.iterations <= launch.iterations):
                    launch = grown
                break
    if launch.split > 1 and launch.warps == 8 and blocks * launch.split < sms:  # SMs left idle
        halves = _split_launch(in_features, 4, 2 * launch.split)
        if halves.iterations <= launch.iterations and fits(halves):
            launch = halves
    return launch


def _resident(launch: MmaLaunch, nt: int, kernel: MmaKernel, in_features: int, out_features: int) -> int:
    """Warps per SM that stay resident at ``launch`` with ``nt`` B tiles, in whole programs, from the registers of
    ``kernel`` compiled for it (:func:`_registers`, with or without masks as :func:`_even` says)."""
    registers = _registers(kernel, nt, launch.warps, _even(launch, in_features, out_features), launch.prefetch)
    allocated = -(-registers // 8) * 8
    return min(REGISTER_FILE // (allocated * 32 * launch.warps), 64 // launch.warps) * launch.warps


@functools.cache
def _registers(kernel: MmaKernel, nt: int, warps: int, even: bool, prefetch: bool = False) -> int:
    """Registers a thread of ``kernel`` at ``nt`` B tiles and ``warps`` warps a program, with or without masks
    and (FP6) the L2 prefetch, compiled for sm_90 (``llmc.plugins.aot``; Triton's cache keeps the compile)."""
    from llmc.plugins.aot import compile_kernel

    return compile_kernel(_variant(kernel, nt, warps, even, "registers", prefetch), 90).registers


def _split_launch(in_features: int, warps: int, split: int) -> MmaLaunch:
    word_rows = in_features // 8
    rows_per_split = -(-word_rows // split)
    rows_per_split = -(-rows_per_split // ITERATION_ROWS) * ITERATION_ROWS
    split = -(-word_rows // rows_per_split)  # no split past K
    rows_per_warp = -(-rows_per_split // warps)
    rows_per_warp = -(-rows_per_warp // ITERATION_ROWS) * ITERATION_ROWS
    return MmaLaunch(warps, split, rows_per_split, rows_per_warp, rows_per_warp // ITERATION_ROWS)


def _even(launch: MmaLaunch, in_features: int, out_features: int) -> bool:
    """Whether every warp's range of K is whole iterations inside K and every block of 32 outputs is whole, so
    that the kernel's loads need no masks (``EVEN``: 12-22% fewer instructions in the loop, and 8-40 fewer
    registers)."""
    return (out_features % 32 == 0 and launch.split * launch.rows_per_split == in_features // 8
            and launch.warps * launch.rows_per_warp == launch.rows_per_split)


def _launches_sum_early(launch: MmaLaunch, m: int) -> bool:
    """Whether the kernel lets :func:`splitk.sum_splits`' launch start first thing (``DEPENDENTS``:
    ``griddepcontrol.launch_dependents``), so that its programs wait on the GPU for the partials instead of being
    launched after the kernel ends: with split K at 1-8 rows. At 9-16 rows (two B tiles, about 128 registers a
    thread) the waiting programs took room the kernel's own programs needed, and it ran up to 7% slower (H100,
    docs/benchmarks/kernels-rounds.md, round 17)."""
    return launch.split > 1 and m <= 8


def where_its_rule_runs(x2: torch.Tensor, w, out: torch.Tensor | None) -> torch.Tensor | None:
    """``x2`` [M, K] @ W.T by rule 10 into ``out`` (a new tensor if None) where :func:`mma_config` takes
    it on this GPU, with float16 x; else None, and the caller's rules run."""
    if x2.dtype != torch.float16 or not available(x2.device):
        return None
    launch = mma_config(x2.shape[0], w, splitk.sm_count(x2.device))
    if launch is None:
        return None
    y = torch.empty(x2.shape[0], w.out_features, dtype=x2.dtype, device=x2.device) if out is None else out
    return mma_linear(x2, w, launch, y)


def mma_linear(x2: torch.Tensor, w, launch: MmaLaunch, y: torch.Tensor) -> torch.Tensor:
    """``y`` [M, N] = ``x2`` [M, K] (float16, M up to 16) @ W.T by rule 10 at ``launch``; ``w`` int4
    ``IntNWeights`` that :func:`takes` accepts. Returns ``y``."""
    if not available(x2.device):
        raise RuntimeError("mma_linear: needs Triton's Gluon and a compute capability 9.0 GPU")
    m, k = x2.shape
    if x2.dtype != torch.float16 or not takes(w) or m > 16:
        raise ValueError("mma_linear: takes float16 x of at most 16 rows and int4 weights with float16 scales "
                         "(groups of 32, 64 or a multiple of 128, or one per output) or FP6 weights with float16 "
                         "scales (groups of a multiple of 64, or one per output)")
    if x2.stride(1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:  # 16-byte loads of x
        x2 = x2.clone(memory_format=torch.contiguous_format)
    n = w.out_features
    part = torch.empty(launch.split, m, n, dtype=torch.float32, device=x2.device) if launch.split > 1 else y
    grid = (-(-n // 32), launch.split)
    looped = launch.iterations == 1 and grid[0] * grid[1] <= splitk.sm_count(x2.device)
    even = m > 0 and _even(launch, k, n)  # x's row is clamped to M - 1 without masks
    constants = dict(kernel_of(w).constants, NT=1 if m <= 8 else 2, W_K=launch.warps, EVEN=even,
                     DEPENDENTS=_launches_sum_early(launch, m))
    if _is_fp6(w):  # the launch's word-rows of 8 inputs as tiles of 16
        kernel = _mma_fp6_loop if looped else _mma_fp6_kernel
        constants["PREFETCH"] = launch.prefetch
        args = (x2.view(torch.int32), w.planes[0], w.planes[1], w.scale, y, part, m, n, x2.stride(0) // 2,
                y.stride(0), k // 16, launch.rows_per_split // 2, launch.rows_per_warp // 2, launch.iterations)
    else:
        if launch.prefetch:
            raise ValueError("mma_linear: the L2 prefetch is FP6's")
        kernel = _mma_decode_loop if looped else _mma_decode_kernel
        args = (x2.view(torch.int32), w.planes[0], w.scale, w.zero, y, part, m, n, x2.stride(0) // 2, y.stride(0),
                k // 8, launch.rows_per_split, launch.rows_per_warp, launch.iterations)
    kernel[grid](*args, **constants, num_warps=launch.warps)
    if launch.split > 1:
        splitk.sum_splits(part, y, launch.split, m)
    return y


def kernel_variants() -> list:
    """Rule 10's kernels as its rules launch them, for ``llmc.plugins.aot``: symmetric int4 in groups of 128,
    asymmetric int4 in groups of 32 and FP6 e3m2 per channel at 1, 2, 4 and 8 warps, 1-8 rows (one B tile) and
    9-16 (two), with and without masks (``EVEN``), and FP6 per channel at 1-8 rows with the L2 prefetch at 8 and 16
    warps; for sm_80-sm_90 (``mma.sync`` is Ampere's; the rules run them on sm_90)."""
    if gluon is None:
        return []
    kernels = {"int4-sym-g128": MmaKernel(False, (("CHANNEL", False), ("GROUP_ROWS", 16), ("SYMMETRIC", True))),
               "int4-asym-g32": MmaKernel(False, (("CHANNEL", False), ("GROUP_ROWS", 4), ("SYMMETRIC", False))),
               "e3m2-channel": MmaKernel(True, (("CHANNEL", True), ("GROUP_TILES", FP6_ITERATION_TILES),
                                                ("MANTISSA", 2), ("POWER", 2.0 ** 12)))}
    return [_variant(kernel, nt, warps, even, f"{'fpx' if kernel.fp6 else 'intn'}-mma"
                     f"{('1-8' if kernel.fp6 else '2-8') if nt == 1 else '9-16'}-{name}-w{warps}{'-even' if even else ''}")
            for name, kernel in kernels.items() for nt in (1, 2) for warps in (1, 2, 4, 8) for even in (False, True)] + [
        _variant(kernels["e3m2-channel"], 1, warps, even, f"fpx-mma1-8-e3m2-channel-w{warps}-prefetch"
                 f"{'-even' if even else ''}", prefetch=True) for warps in (8, 16) for even in (False, True)]


def _variant(kernel: MmaKernel, nt: int, warps: int, even: bool, name: str, prefetch: bool = False):
    """``kernel`` at ``nt`` B tiles and ``warps`` warps a program, with or without masks and (FP6) the L2 prefetch, as
    ``aot`` compiles it."""
    from llmc.plugins.aot import KernelVariant

    constants = dict(kernel.constants, NT=nt, W_K=warps, EVEN=even, **({"PREFETCH": True} if prefetch else {}))
    # the weights' pointers and K's units (FP6 tiles of 16 inputs, int4 word-rows of 8) differ, the rest is shared
    weights = (dict(hi_ptr="*i32", lo_ptr="*i32", s_ptr="*fp16") if kernel.fp6
               else dict(w_ptr="*i32", s_ptr="*fp16", z_ptr="*fp16"))
    unit = "tiles" if kernel.fp6 else "rows"
    signature = dict(x_ptr="*i32", **weights, y_ptr="*fp16", part_ptr="*fp32", M="i32", N="i32", stride_xm="i32",
                     stride_ym="i32", **{f"{unit}_total": "i32", f"{unit}_per_split": "i32", f"{unit}_per_warp": "i32"},
                     iterations="i32")
    aligned = ("x_ptr", *weights, "y_ptr", "part_ptr", "N", "stride_xm", "stride_ym", f"{unit}_per_split",
               f"{unit}_per_warp")
    return KernelVariant(name, _mma_fp6_kernel if kernel.fp6 else _mma_decode_kernel, signature, constants, warps, 1,
                         aligned)
