"""FP6 (e3m2, e2m3) and FP4 (e2m1) weight-only linear, ``y = x @ W.T``, decoding W on the fly.

Weights come from :func:`llmc.passes.fpx.fpx_quantize` (an :class:`~llmc.passes.fpx.FpxLinear`)
through :func:`pack_fpx`: codes as bit planes (``llmc.passes.bitplanes``: FP6 as its 4+2 split,
FP4 as one 4-bit plane) and float16 scales ``[K / group, N]`` (a per-channel scale is one group of
K). The math every path computes:

    W[n, k] = scale[g, n] * decode(code[n, k]),  g = k // group,

and :func:`fpx_reference` is that formula in float32 torch, the yardstick of the tests.

Decoding (rules referred to in the code):

1. A code's bits are moved to where a float32 keeps them: exponent field at bit 23 upward,
   mantissa just below, sign at bit 31. Because both formats treat exponent field 0 as
   subnormal the same way, the float32 read from those bits is ``V * 2^(bias - 127)`` exactly,
   subnormal codes included, for every code ``V`` decodes to (e3m2: ``V * 2^-124``). No table,
   no conversion instruction; FP6 takes a shift of the 4-bit plane, a rotate of the 2-bit plane
   and two logic operations (see ``llmc.passes.bitplanes`` rule 4), FP4 two shifts and two.
2. Decode rows (``M == 1``): CUDA cores. The decoded weight may be a float32 subnormal, which
   FFMA multiplies exactly (Triton emits no FTZ); ``x`` carries ``2^64`` so that no product is
   subnormal, and the result ``2^(127 - bias - 64)`` and the scale. The activations of a row of
   words come in one or two vector loads, as in ``llmc.plugins.intn_linear`` rule 6.
3. 2 to 16 rows: tensor cores. The decoded float32 times ``2^(127 - bias)`` is ``V`` exactly;
   times the scale it becomes the float16 operand of ``tl.dot`` (float32 accumulation).
4. Split-K as in ``llmc.plugins.splitk``, except FP6 from 2^23 to 2^26 weights at one row
   (``intn_linear.one_row_shape``) and on small linears (``fp6_one_row_shape``); more rows run
   FP6's prefill kernel (rule 7) up to the rows ``intn_linear.PREFILL_RULES`` gives bits 6, and beyond (and FP4, and bfloat16 x)
   dequantize (:func:`fpx_dequantize`) and call cuBLAS, as in ``llmc.plugins.intn_linear``.
5. A few rows of x run the FP6 decode kernel, one or several rows per program, as
   ``llmc.plugins.intn_linear`` rule 5 (``rows_per_program``) says; FP4 keeps the tensor cores.
6. With float16 x and scales, FP6's tensor-core kernel decodes two weights at a time, as
   ``intn_linear`` rule 7 does for int-N (:func:`_fp6_pair_decode_asm`): ``prmt`` and a shift put
   the 4-bit field of two words at float16's magnitude bits, one more ``prmt`` and two shifts the
   2-bit plane's low bit and sign, two ``lop3`` join them into the float16 pair ``V * 2^(bias - 15)``
   (rule 1 in float16, subnormals included), and ``mul.f16x2`` by ``2^(15 - bias)`` and by the scale
   pair gives rule 3's operand bit for bit. sm_90 loop of 64 x 16 rows of the 2-bit plane: 925 -> 757
   instructions; round 10 (H100): 4096->11008 at 16 rows 35.2 -> 33.3 us, 8192->28672 119.5 -> 113.2
   (docs/benchmarks/kernels-rounds.md).
7. FP6 prefill (17 to 128 rows, float16 x and scales; :func:`_fp6_prefill_kernel`): ``intn_linear``
   rule 8's kernel with rule 6's PTX as its decode. The 16 inputs of a row of the 2-bit plane come
   from 16 float16 pairs, joined in register order into the wgmma's register operand, with the same
   wait for the wgmmas in flight before the next step's decode (``intn_linear._operands_read``).
8. On Hopper, FP6 with float16 x and scales at 1-16 rows (``mma_decode.FP6_MMA_RULE``) runs ``intn_linear`` rule 10's ``mma.sync`` kernel
   (``llmc.plugins.mma_decode``): inputs ``i`` and ``i + 8`` of a tile as one float16 pair built from
   the two planes in registers, 1.5 instructions a weight, handed to the MMA without shared memory;
   per channel at 1-8 rows where the blocks of 32 outputs fill most of the SMs, one program per block
   with an L2 prefetch of each next iteration (``mma_decode.mma_launch``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from llmc.passes.bitplanes import fp_kernel_tile, pack_fp_codes, unpack_fp_codes
from llmc.passes.fpx import FORMATS, FpFormat, FpxLinear, fpx_decode
from llmc.plugins.intn_linear import (NO_SPLIT_WEIGHTS, PREFILL_ROWS, PREFILL_SHAPE, ROWS_PER_PROGRAM, decode_classes,
                                     decode_rows, decode_shape, multi_row_shape, no_split_rows, one_row_shape,
                                     prefill_config, rows_per_program, several_rows, size_classes)
from llmc.plugins import splitk
from llmc.plugins.splitk import (COMPILE_OPTIONS, LaunchConfig, as_rows, decode_config, matmul_into, require_triton,
                                 sm_count, tensor_core_config, triton)


def _fp6_pair_decode_asm(mantissa: int, bias: int, field: int, second_half: int) -> str:
    """PTX of rule 6: field ``field`` of two neighbouring words of the 4-bit plane ($1, $2) with its
    partner ``2 field + second_half`` in their 2-bit plane words ($3, $4) as a float16 pair, times
    the scale pair $5. The magnitude bits land where float16 keeps them (``V * 2^(bias - 15)``,
    subnormals included, as in rule 1), times ``2^(15 - bias)`` is ``V`` exactly."""
    m = mantissa
    byte = field // 2
    shift = 3 - m - 4 * (field % 2)  # the nibble from bit 8 (+4) of each half to bit 11 - m
    f = 2 * field + second_half
    low = 4 * (f // 2) + f % 2 if m == 2 else 2 * f  # bitplanes.fp6_low_positions
    sign = (low + 8 + m) % 32
    lines = [f"prmt.b32 a, $1, $2, {(4 + byte) << 12 | (4 + byte) << 8 | byte << 4 | byte:#06x};"]
    if shift:
        lines.append(f"{'shl' if shift > 0 else 'shr'}.b32 a, a, {abs(shift)};")
    # the bytes holding the low bit and the sign: of $3 into bytes 0 and 1, of $4 into 2 and 3
    lines.append(f"prmt.b32 l, $3, $4, {(4 + sign // 8) << 12 | (4 + low // 8) << 8 | (sign // 8) << 4 | low // 8:#06x};")
    lines.append(f"shl.b32 m, l, {10 - m - low % 8};")  # low bit to bit 10 - m
    lines.append(f"shl.b32 s, l, {7 - sign % 8};" if sign % 8 != 7 else "mov.b32 s, l;")  # sign to bit 15
    lines.append("and.b32 s, s, 0x80008000;")
    lines.append(f"lop3.b32 m, m, {(1 << (10 - m)) * 0x10001:#010x}, s, 0xea;")
    lines.append(f"lop3.b32 a, a, {(0xF << (11 - m)) * 0x10001:#010x}, m, 0xea;")
    power = (30 - bias) << 10  # the float16 2^(15 - bias)
    lines += [f"mov.b32 c, {power | power << 16:#010x};", "mul.f16x2 a, a, c;", "mul.f16x2 $0, a, $5;"]
    return "{ .reg .b32 a, l, m, s, c; " + " ".join(lines) + " }"


# The PTX of rule 6 for FP6 (e3m2, e2m3) at [32 * (mantissa - 2) + 16 * second_half + field]
_FP6_PAIR_ASM = tuple(_fp6_pair_decode_asm(mantissa, FORMATS[name].bias, field, half) if field < 8 else ""
                      for mantissa, name in ((2, "e3m2"), (3, "e2m3")) for half in (0, 1) for field in range(16))

if triton is not None:
    import triton.language as tl

KERNEL_FORMATS = ("e3m2", "e2m3", "e2m1")


@dataclass(frozen=True)
class FpxWeights:
    """Kernel-ready FP6/FP4 weights of a [N, K] linear (see the module docstring)."""

    planes: tuple[torch.Tensor, ...]  # int32: FP6 [K / 8, N] and [K / 16, N]; FP4 [K / 8, N]
    scale: torch.Tensor  # float16 [K / group, N]: one row when there is one scale per output
    fmt: FpFormat
    group_size: int  # K for one scale per output channel
    tile: int  # the bit planes' tile (bitplanes rule 3): fp_kernel_tile, the only one the kernels read
    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.planes, self.scale))

    def to(self, device) -> FpxWeights:
        return FpxWeights(tuple(p.to(device) for p in self.planes), self.scale.to(device), self.fmt,
                          self.group_size, self.tile, self.in_features, self.out_features)


def pack_fpx(weights: FpxLinear, scale_dtype: torch.dtype = torch.float16) -> FpxWeights:
    """Bit planes and scales of ``weights`` in the kernels' layout.

    Quantize with ``fpx_quantize(..., scale_dtype=torch.float16)`` so the codes were chosen for
    the float16 scales the kernels read.
    """
    if weights.fmt.name not in KERNEL_FORMATS:
        raise ValueError(f"pack_fpx: no kernel for {weights.fmt.name} (kernels: {KERNEL_FORMATS})")
    out_features, in_features = weights.codes.shape
    tile = fp_kernel_tile(weights.fmt.bits)
    if weights.group_size % tile:
        raise ValueError(f"pack_fpx: group_size {weights.group_size} must be a multiple of {tile}")
    planes = pack_fp_codes(weights.codes, weights.fmt.bits, weights.fmt.mantissa_bits, tile)
    return FpxWeights(planes, weights.scale.t().contiguous().to(scale_dtype), weights.fmt,
                      weights.group_size, tile, in_features, out_features)


def fpx_dequantize_reference(w: FpxWeights) -> torch.Tensor:
    """The float32 weight [N, K] the kernels compute with (module docstring formula)."""
    codes = unpack_fp_codes(w.planes, w.fmt.bits, w.fmt.mantissa_bits, w.tile)
    scale = w.scale.float().t().repeat_interleave(w.group_size, dim=1)
    return fpx_decode(codes, w.fmt) * scale


def fpx_reference(x: torch.Tensor, w: FpxWeights) -> torch.Tensor:
    """``x @ W.T`` in float32 (on the weights' device), returned in ``x``'s dtype and device."""
    weight = fpx_dequantize_reference(w)
    y = x.detach().to(device=weight.device, dtype=torch.float32) @ weight.t()
    return y.to(device=x.device, dtype=x.dtype)


# --------------------------------------------------------------------------- Triton

if triton is not None:
    from llmc.plugins.intn_linear import lead_rows, prefill_step, prefill_x, x_field, x_offsets, x_tile_fields, x_words
    from llmc.plugins.splitk import block_offsets, finish_split, grid_row, row_block, start_sum

    _X_SCALE = tl.constexpr(2.0**64)
    FP6_PAIR_ASM = tl.constexpr(_FP6_PAIR_ASM)

    @triton.jit
    def _shift(v, amount: tl.constexpr):
        if amount >= 0:
            return v << amount
        else:
            return v >> (-amount)

    @triton.jit
    def _rotate(v, amount: tl.constexpr):
        # ptxas turns this into IMAD.SHL (FMA pipe) + SHF and folds the OR into the next LOP3:
        # fewer integer-pipe operations than one funnel shift (SHF.L.W), measured in SASS.
        if amount % 32 == 0:
            return v
        else:
            return (v << (amount % 32)) | (v >> (32 - amount % 32))

    @triton.jit
    def _fp6_bits(high, low, i: tl.constexpr, second_half: tl.constexpr, M: tl.constexpr):
        """float32 bits of field ``i`` of ``high`` (uint32) with its partner in ``low`` (rule 1)."""
        # The 4-bit field holds magnitude bits 4..1: they go to bits 24-M .. 27-M.
        top = _shift(high, 24 - M - 4 * i) & (0xF << (24 - M))
        # Field 2i (input 16 j + 2i, in ``high_a``) or 2i+1 (``high_b``) of the 2-bit plane: its low bit sits at
        # bitplanes.fp6_low_positions (4*(f//2) + f%2 for e3m2, 2f for e2m3) and the sign 8+M above.
        f: tl.constexpr = 2 * i + second_half
        if M == 2:
            p: tl.constexpr = 4 * (f // 2) + f % 2
        else:
            p: tl.constexpr = 2 * f
        rest = _rotate(low, 23 - M - p) & ((1 << 31) | (1 << (23 - M)))
        return (top | rest).to(tl.float32, bitcast=True)

    @triton.jit
    def _fp4_bits(words, i: tl.constexpr, M: tl.constexpr):
        """float32 bits of 4-bit field ``i`` of ``words`` (uint32), e2m1 (rule 1)."""
        magnitude = _shift(words, 23 - M - 4 * i) & (0x7 << (23 - M))
        sign = _shift(words, 28 - 4 * i) & (1 << 31)
        return (magnitude | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _scales(s_ptr, group, offs_n, ok, N, CHANNEL: tl.constexpr, ROWS: tl.constexpr = 1):
        """float32 scales [rows, BLOCK_N]: of each row's group, or the one row of per-channel scales."""
        if CHANNEL:
            return lead_rows(tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :], ROWS)
        else:
            return tl.load(lead_rows(s_ptr + group[:, None] * N + offs_n[None, :], ROWS), mask=ok, other=0.0).to(tl.float32)

    @triton.jit
    def _fp6_load(lo_ptr, hi_ptr, rows, offs_n, N, row_end, EVICT_FIRST: tl.constexpr = False,
                  ROWS: tl.constexpr = 1):
        """The 2-bit plane's rows (below ``row_end``) and their two rows of the 4-bit plane (``2 j``:
        the even inputs, ``2 j + 1``: the odd ones), as uint32 (shaped by ``intn_linear.lead_rows``)."""
        ok = lead_rows((rows < row_end)[:, None] & (offs_n < N)[None, :], ROWS)
        policy: tl.constexpr = "evict_first" if EVICT_FIRST else ""
        low = tl.load(lead_rows(lo_ptr + rows[:, None] * N + offs_n[None, :], ROWS), mask=ok, other=0, eviction_policy=policy)
        high_a = tl.load(lead_rows(hi_ptr + (2 * rows)[:, None] * N + offs_n[None, :], ROWS), mask=ok, other=0,
                         eviction_policy=policy)
        high_b = tl.load(lead_rows(hi_ptr + (2 * rows + 1)[:, None] * N + offs_n[None, :], ROWS), mask=ok, other=0,
                         eviction_policy=policy)
        return (low.to(tl.uint32, bitcast=True), high_a.to(tl.uint32, bitcast=True),
                high_b.to(tl.uint32, bitcast=True))

    @triton.jit
    def _fp6_fields(acc, dot, high_a, high_b, low, xw, x_ok, M: tl.constexpr, CHANNEL: tl.constexpr,
                    DTYPE: tl.constexpr):
        """One step of the FP6 decode kernels over the 16 inputs of each row of the 2-bit plane
        (``xw``: their activations, :func:`intn_linear.x_words`): the products into ``acc`` (per
        channel) or ``dot`` (per group)."""
        for i in tl.static_range(8):
            xa = x_field(xw, 2 * i, x_ok, DTYPE) * _X_SCALE
            xb = x_field(xw, 2 * i + 1, x_ok, DTYPE) * _X_SCALE
            if CHANNEL:
                acc += _fp6_bits(high_a, low, i, 0, M) * xa
                acc += _fp6_bits(high_b, low, i, 1, M) * xb
            else:
                dot += _fp6_bits(high_a, low, i, 0, M) * xa
                dot += _fp6_bits(high_b, low, i, 1, M) * xb
        return acc, dot

    @triton.jit
    def _fp6_gemv_kernel(x_ptr, hi_ptr, lo_ptr, s_ptr, y_ptr, part_ptr, count_ptr,
                         N, K, stride_ym, rows_per_split, n_split,
                         M: tl.constexpr, BIAS: tl.constexpr, GROUP: tl.constexpr, CHANNEL: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PREFETCH: tl.constexpr = False,
                         ROW_GRID: tl.constexpr = False, SEPARATE: tl.constexpr = False):
        start_sum(SEPARATE)
        # Row j of the 2-bit plane covers inputs 16 j .. 16 j + 15: rows 2 j (even inputs) and
        # 2 j + 1 (odd) of the 4-bit plane, 8 fields each.
        ROWS_PER_GROUP: tl.constexpr = GROUP // 16
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        # One row of (contiguous) x per grid row, as in intn_linear (rule 5 there).
        if ROW_GRID:
            x_ptr, y_ptr, part_ptr, count_ptr = grid_row(x_ptr, y_ptr, part_ptr, count_ptr, K, stride_ym, n_split, N, 1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        row_begin = pid_k * rows_per_split
        row_end = tl.minimum(row_begin + rows_per_split, K // 16)
        acc = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.float32)
        if PREFETCH:
            low_n, high_a_n, high_b_n = _fp6_load(lo_ptr, hi_ptr, row_begin + tl.arange(0, BLOCK_W), offs_n, N, row_end)
        for r0 in range(row_begin, row_begin + rows_per_split, BLOCK_W):
            rows = r0 + tl.arange(0, BLOCK_W)
            row_ok = rows < row_end
            ok = row_ok[:, None] & n_ok[None, :]
            if PREFETCH:
                # The next step's words are in flight while this step's are decoded.
                low, high_a, high_b = low_n, high_a_n, high_b_n
                low_n, high_a_n, high_b_n = _fp6_load(lo_ptr, hi_ptr, rows + BLOCK_W, offs_n, N, row_end)
            else:
                low, high_a, high_b = _fp6_load(lo_ptr, hi_ptr, rows, offs_n, N, row_end)
            xw = x_words(x_ptr, (tl.where(row_ok, rows, 0) * 16)[:, None], 16)
            dot = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.float32)
            acc, dot = _fp6_fields(acc, dot, high_a, high_b, low, xw, row_ok[:, None], M, CHANNEL, x_ptr.dtype.element_ty)
            if not CHANNEL:
                acc += dot * _scales(s_ptr, rows // ROWS_PER_GROUP, offs_n, ok, N, CHANNEL)
        total = tl.sum(acc, axis=0)
        if CHANNEL:
            total = total * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        # Rule 2: undo 2^(bias - 127) of the decode and 2^64 of x.
        part = (total * (2.0 ** (127 - BIAS - 64)))[None, :]
        finish_split(part, y_ptr, part_ptr, count_ptr, tl.arange(0, 1), offs_n, 1, N, stride_ym,
                     pid_n, pid_k, n_split, SEPARATE)

    @triton.jit
    def _fp6_gemv_rows_kernel(x_ptr, hi_ptr, lo_ptr, s_ptr, y_ptr, part_ptr, count_ptr,
                         N, K, stride_ym, rows_per_split, n_split, x_rows,
                         M: tl.constexpr, BIAS: tl.constexpr, GROUP: tl.constexpr, CHANNEL: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PREFETCH: tl.constexpr = False,
                         ROWS: tl.constexpr = 2, ROW_BLOCKS: tl.constexpr = False, SEPARATE: tl.constexpr = False):
        start_sum(SEPARATE)
        # _fp6_gemv_kernel with ROWS >= 2 rows of x per program: every tensor [ROWS, rows, outputs].
        ROWS_PER_GROUP: tl.constexpr = GROUP // 16
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        # A block of ROWS rows of (contiguous) x per grid row with ROW_BLOCKS, as in intn_linear (rule 5 there).
        x_ptr, y_ptr, part_ptr, count_ptr, rows_here, x_row = row_block(
            x_ptr, y_ptr, part_ptr, count_ptr, K, stride_ym, n_split, N, x_rows, ROWS, ROW_BLOCKS)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        row_begin = pid_k * rows_per_split
        row_end = tl.minimum(row_begin + rows_per_split, K // 16)
        acc = tl.zeros([ROWS, BLOCK_W, BLOCK_N], dtype=tl.float32)
        if PREFETCH:
            low_n, high_a_n, high_b_n = _fp6_load(lo_ptr, hi_ptr, row_begin + tl.arange(0, BLOCK_W), offs_n, N, row_end, ROWS=ROWS)
        for r0 in range(row_begin, row_begin + rows_per_split, BLOCK_W):
            rows = r0 + tl.arange(0, BLOCK_W)
            row_ok = rows < row_end
            ok = lead_rows(row_ok[:, None] & n_ok[None, :], ROWS)
            if PREFETCH:
                # The next step's words are in flight while this step's are decoded.
                low, high_a, high_b = low_n, high_a_n, high_b_n
                low_n, high_a_n, high_b_n = _fp6_load(lo_ptr, hi_ptr, rows + BLOCK_W, offs_n, N, row_end, ROWS=ROWS)
            else:
                low, high_a, high_b = _fp6_load(lo_ptr, hi_ptr, rows, offs_n, N, row_end, ROWS=ROWS)
            xw = x_words(x_ptr, x_offsets(x_row, rows, row_ok, K, 16), 16)
            x_ok = lead_rows(row_ok[:, None], ROWS)
            dot = tl.zeros([ROWS, BLOCK_W, BLOCK_N], dtype=tl.float32)
            acc, dot = _fp6_fields(acc, dot, high_a, high_b, low, xw, x_ok, M, CHANNEL, x_ptr.dtype.element_ty)
            if not CHANNEL:
                acc += dot * _scales(s_ptr, rows // ROWS_PER_GROUP, offs_n, ok, N, CHANNEL, ROWS=ROWS)
        total = tl.sum(acc, axis=1)
        if CHANNEL:
            total = total * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        # Rule 2: undo 2^(bias - 127) of the decode and 2^64 of x.
        part = total * (2.0 ** (127 - BIAS - 64))
        finish_split(part, y_ptr, part_ptr, count_ptr, tl.arange(0, ROWS), offs_n, rows_here, N, stride_ym,
                     pid_n, pid_k, n_split, SEPARATE)

    @triton.jit
    def _fp4_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, count_ptr,
                         N, K, stride_ym, rows_per_split, n_split,
                         M: tl.constexpr, BIAS: tl.constexpr, GROUP: tl.constexpr, CHANNEL: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, SEPARATE: tl.constexpr = False):
        start_sum(SEPARATE)
        ROWS_PER_GROUP: tl.constexpr = GROUP // 8
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        row_begin = pid_k * rows_per_split
        acc = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.float32)
        for r0 in range(row_begin, row_begin + rows_per_split, BLOCK_W):
            rows = r0 + tl.arange(0, BLOCK_W)
            row_ok = rows < K // 8
            ok = row_ok[:, None] & n_ok[None, :]
            words = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=ok, other=0).to(tl.uint32, bitcast=True)
            xw = x_words(x_ptr, (tl.where(row_ok, rows, 0) * 8)[:, None], 8)
            dot = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.float32)
            for i in tl.static_range(8):
                xv = x_field(xw, i, row_ok[:, None], x_ptr.dtype.element_ty) * _X_SCALE
                if CHANNEL:
                    acc += _fp4_bits(words, i, M) * xv
                else:
                    dot += _fp4_bits(words, i, M) * xv
            if not CHANNEL:
                acc += dot * _scales(s_ptr, rows // ROWS_PER_GROUP, offs_n, ok, N, CHANNEL)
        total = tl.sum(acc, axis=0)
        if CHANNEL:
            total = total * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        part = (total * (2.0 ** (127 - BIAS - 64)))[None, :]
        finish_split(part, y_ptr, part_ptr, count_ptr, tl.arange(0, 1), offs_n, 1, N, stride_ym,
                     pid_n, pid_k, n_split, SEPARATE)

    @triton.jit
    def _fp6_gemm_kernel(x_ptr, hi_ptr, lo_ptr, s_ptr, y_ptr, part_ptr, count_ptr,
                         M_ROWS, N, K, stride_xm, stride_ym, rows_per_split, n_split,
                         M: tl.constexpr, BIAS: tl.constexpr, GROUP: tl.constexpr, CHANNEL: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                         EVICT_FIRST: tl.constexpr = False, SWAP: tl.constexpr = False, SEPARATE: tl.constexpr = False):
        start_sum(SEPARATE)
        # Rows of the 2-bit plane, each with its two rows of the 4-bit plane, as in the GEMV.
        # EVICT_FIRST: the words are streamed (read once). SWAP: accumulate (W x^T) [BLOCK_N,
        # BLOCK_M], the decoded weight as the first operand of the product.
        ROWS_PER_GROUP: tl.constexpr = GROUP // 16
        PAIRS: tl.constexpr = x_ptr.dtype.element_ty == tl.float16 and s_ptr.dtype.element_ty == tl.float16  # rule 6
        pid_n, pid_m, pid_k, offs_m, offs_n, m_ok, n_ok = block_offsets(M_ROWS, N, BLOCK_M, BLOCK_N)
        row_begin = pid_k * rows_per_split
        if SWAP:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for r0 in range(row_begin, row_begin + rows_per_split, BLOCK_W):
            rows = r0 + tl.arange(0, BLOCK_W)
            row_ok = rows < K // 16
            ok = row_ok[:, None] & n_ok[None, :]
            low, high_a, high_b = _fp6_load(lo_ptr, hi_ptr, rows, offs_n, N, K // 16, EVICT_FIRST)
            if PAIRS:
                # Rule 6: the float16 scales as they are, two weights per instruction.
                if CHANNEL:
                    scale = tl.broadcast_to(tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[None, :], [BLOCK_W, BLOCK_N])
                else:
                    scale = tl.load(s_ptr + (rows // ROWS_PER_GROUP)[:, None] * N + offs_n[None, :], mask=ok, other=0.0)
            else:
                # Rule 3: V = decoded float32 * 2^(127 - bias), exact; the scale rides along.
                scale = _scales(s_ptr, rows // ROWS_PER_GROUP, offs_n, ok, N, CHANNEL)
                scale = scale * (2.0 ** (127 - BIAS))
            xs = x_tile_fields(x_ptr, offs_m, rows, m_ok[:, None] & row_ok[None, :], stride_xm, BLOCK_M, BLOCK_W, 16)
            for i in tl.static_range(8):
                if PAIRS:
                    wa = tl.inline_asm_elementwise(FP6_PAIR_ASM[32 * (M - 2) + i], "=r,r,r,r,r,r", [high_a, low, scale],
                                                   dtype=tl.float16, is_pure=True, pack=2)
                    wb = tl.inline_asm_elementwise(FP6_PAIR_ASM[32 * (M - 2) + 16 + i], "=r,r,r,r,r,r",
                                                   [high_b, low, scale], dtype=tl.float16, is_pure=True, pack=2)
                else:
                    wa = (_fp6_bits(high_a, low, i, 0, M) * scale).to(x_ptr.dtype.element_ty)
                    wb = (_fp6_bits(high_b, low, i, 1, M) * scale).to(x_ptr.dtype.element_ty)
                xa = xs[2 * i]
                xb = xs[2 * i + 1]
                if SWAP:
                    acc = tl.dot(tl.trans(wa), tl.trans(xa), acc)
                    acc = tl.dot(tl.trans(wb), tl.trans(xb), acc)
                else:
                    acc = tl.dot(xa, wa, acc)
                    acc = tl.dot(xb, wb, acc)
        if SWAP:
            acc = tl.trans(acc)
        n_blocks = tl.num_programs(0)
        finish_split(acc, y_ptr, part_ptr, count_ptr, offs_m, offs_n, M_ROWS, N, stride_ym,
                     pid_m * n_blocks + pid_n, pid_k, n_split, SEPARATE)

    @triton.jit
    def _fp6_pair(high, low, scale, M: tl.constexpr, FIELD: tl.constexpr, HALF: tl.constexpr):
        # Rule 6's PTX: input 2 FIELD + HALF of each row of the 2-bit plane, float16.
        return tl.inline_asm_elementwise(FP6_PAIR_ASM[32 * (M - 2) + 16 * HALF + FIELD], "=r,r,r,r,r,r",
                                         [high, low, scale], dtype=tl.float16, is_pure=True, pack=2)

    @triton.jit
    def _fp6_prefill_kernel(x_ptr, hi_ptr, lo_ptr, s_ptr, y_ptr, part_ptr, count_ptr,
                            M_ROWS, N, K, stride_xm, stride_ym, rows_per_split, n_split,
                            M: tl.constexpr, BIAS: tl.constexpr, GROUP: tl.constexpr, CHANNEL: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                            SEPARATE: tl.constexpr = False):
        # Rule 7: intn_linear rule 8 for FP6 (float16 x and scales). The 16 inputs of a row of the
        # 2-bit plane, decoded by rule 6's PTX (input 2 i + h: field i of the 4-bit plane's row 2 j + h),
        # joined in register order into the first operand of the product; K in steps of BLOCK_W rows.
        start_sum(SEPARATE)
        ROWS_PER_GROUP: tl.constexpr = GROUP // 16
        pid_n, pid_m, pid_k, offs_m, offs_n, m_ok, n_ok = block_offsets(M_ROWS, N, BLOCK_M, BLOCK_N)
        row_begin = pid_k * rows_per_split
        row_end = tl.minimum(row_begin + rows_per_split, K // 16)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for r0 in range(row_begin, row_end, BLOCK_W):
            rows = r0 + tl.arange(0, BLOCK_W)
            x = prefill_x(x_ptr, offs_m, m_ok, stride_xm, r0, row_end, BLOCK_W, 16)
            low, a, b = _fp6_load(lo_ptr, hi_ptr, rows, offs_n, N, row_end)
            if CHANNEL:
                scale = tl.broadcast_to(tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[None, :], [BLOCK_W, BLOCK_N])
            else:
                scale = tl.load(s_ptr + (rows // ROWS_PER_GROUP)[:, None] * N + offs_n[None, :],
                                mask=(rows < row_end)[:, None] & n_ok[None, :], other=0.0)
            # Input f = 2 i + h; tl.join adds its axis last, so the first join (f, f + 8) is the slowest.
            w = tl.join(
                tl.join(tl.join(tl.join(_fp6_pair(a, low, scale, M, 0, 0), _fp6_pair(a, low, scale, M, 4, 0)),
                                tl.join(_fp6_pair(a, low, scale, M, 2, 0), _fp6_pair(a, low, scale, M, 6, 0))),
                        tl.join(tl.join(_fp6_pair(a, low, scale, M, 1, 0), _fp6_pair(a, low, scale, M, 5, 0)),
                                tl.join(_fp6_pair(a, low, scale, M, 3, 0), _fp6_pair(a, low, scale, M, 7, 0)))),
                tl.join(tl.join(tl.join(_fp6_pair(b, low, scale, M, 0, 1), _fp6_pair(b, low, scale, M, 4, 1)),
                                tl.join(_fp6_pair(b, low, scale, M, 2, 1), _fp6_pair(b, low, scale, M, 6, 1))),
                        tl.join(tl.join(_fp6_pair(b, low, scale, M, 1, 1), _fp6_pair(b, low, scale, M, 5, 1)),
                                tl.join(_fp6_pair(b, low, scale, M, 3, 1), _fp6_pair(b, low, scale, M, 7, 1)))))
            acc = prefill_step(acc, tl.reshape(w, (BLOCK_W, BLOCK_N, 16)), x)
        finish_split(tl.trans(acc), y_ptr, part_ptr, count_ptr, offs_m, offs_n, M_ROWS, N, stride_ym,
                     pid_m * tl.num_programs(0) + pid_n, pid_k, n_split, SEPARATE)

    @triton.jit
    def _fp4_gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, part_ptr, count_ptr,
                         M_ROWS, N, K, stride_xm, stride_ym, rows_per_split, n_split,
                         M: tl.constexpr, BIAS: tl.constexpr, GROUP: tl.constexpr, CHANNEL: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                         SEPARATE: tl.constexpr = False):
        start_sum(SEPARATE)
        ROWS_PER_GROUP: tl.constexpr = GROUP // 8
        pid_n, pid_m, pid_k, offs_m, offs_n, m_ok, n_ok = block_offsets(M_ROWS, N, BLOCK_M, BLOCK_N)
        row_begin = pid_k * rows_per_split
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for r0 in range(row_begin, row_begin + rows_per_split, BLOCK_W):
            rows = r0 + tl.arange(0, BLOCK_W)
            row_ok = rows < K // 8
            ok = row_ok[:, None] & n_ok[None, :]
            words = tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=ok, other=0).to(tl.uint32, bitcast=True)
            scale = _scales(s_ptr, rows // ROWS_PER_GROUP, offs_n, ok, N, CHANNEL)
            scale = scale * (2.0 ** (127 - BIAS))
            xs = x_tile_fields(x_ptr, offs_m, rows, m_ok[:, None] & row_ok[None, :], stride_xm, BLOCK_M, BLOCK_W, 8)
            for i in tl.static_range(8):
                w = (_fp4_bits(words, i, M) * scale).to(x_ptr.dtype.element_ty)
                xk = xs[i]
                acc = tl.dot(xk, w, acc)
        n_blocks = tl.num_programs(0)
        finish_split(acc, y_ptr, part_ptr, count_ptr, offs_m, offs_n, M_ROWS, N, stride_ym,
                     pid_m * n_blocks + pid_n, pid_k, n_split, SEPARATE)

    @triton.jit
    def _fpx_dequantize_kernel(hi_ptr, lo_ptr, s_ptr, out_ptr, N, K,
                               BITS: tl.constexpr, M: tl.constexpr, BIAS: tl.constexpr, GROUP: tl.constexpr, CHANNEL: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
        # W.T as float16 [K, N] (coalesced stores along N) for dequantize-then-matmul. Rows are
        # rows of the 2-bit plane for FP6 (16 weights), of the 4-bit plane for FP4 (8 weights).
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        n_ok = offs_n[None, :] < N
        if BITS == 6:
            ok = (rows[:, None] < K // 16) & n_ok
            low, high_a, high_b = _fp6_load(lo_ptr, hi_ptr, rows, offs_n, N, K // 16)
            scale = _scales(s_ptr, rows // (GROUP // 16), offs_n, ok, N, CHANNEL)
            scale = scale * (2.0 ** (127 - BIAS))
            for i in tl.static_range(8):
                wa = (_fp6_bits(high_a, low, i, 0, M) * scale).to(tl.float16)
                tl.store(out_ptr + (16 * rows + 2 * i)[:, None] * N + offs_n[None, :], wa, mask=ok)
                wb = (_fp6_bits(high_b, low, i, 1, M) * scale).to(tl.float16)
                tl.store(out_ptr + (16 * rows + 2 * i + 1)[:, None] * N + offs_n[None, :], wb, mask=ok)
        else:
            ok = (rows[:, None] < K // 8) & n_ok
            words = tl.load(hi_ptr + rows[:, None] * N + offs_n[None, :], mask=ok, other=0).to(tl.uint32, bitcast=True)
            scale = _scales(s_ptr, rows // (GROUP // 8), offs_n, ok, N, CHANNEL)
            scale = scale * (2.0 ** (127 - BIAS))
            for i in tl.static_range(8):
                w = (_fp4_bits(words, i, M) * scale).to(tl.float16)
                tl.store(out_ptr + (8 * rows + i)[:, None] * N + offs_n[None, :], w, mask=ok)


def fpx_config(m: int, w: FpxWeights, sms: int, decode: tuple | None = None,
               tensor_cores: tuple | None = None) -> LaunchConfig | None:
    """Heuristic launch shape (tuned on an H100, see docs/benchmarks/kernels.md); above
    ``PREFILL_ROWS`` rows FP6's prefill launch (``intn_linear.prefill_config``), or None where
    dequantize-then-matmul runs (it also runs for FP4, and for x or scales that are not float16).

    ``decode`` overrides the decode kernel's launch (for FP6 also that of a few rows, as many per
    program as ``intn_linear.rows_per_program`` says, or ``ROWS_PER_PROGRAM`` where it picks the
    tensor cores):
    (block_n, block_w, num_warps, programs_per_sm, prefetch), block_w in rows of the 2-bit plane
    for FP6 (16 weights each), of words for FP4;
    ``tensor_cores`` the 2-16 row launch: (block_n, block_w, num_warps, programs_per_sm[, evict_first[,
    swap[, num_stages]]]) (``swap``: the decoded weight as the first operand of ``tl.dot``;
    ``num_stages`` 3 unless given).
    ``programs_per_sm`` may be a fraction: at or below one program per output block (0 included),
    no split-K. Memoized by value, as ``intn_config`` is.
    """
    return _fpx_config(m, w.fmt.bits, w.in_features, w.out_features, sms, decode, tensor_cores)


@functools.lru_cache(maxsize=4096)
def _fpx_config(m: int, bits: int, in_features: int, out_features: int, sms: int, decode: tuple | None,
                tensor_cores: tuple | None) -> LaunchConfig | None:
    # fpx_config by value, so that a launcher's call is a dictionary lookup
    rows = in_features // (16 if bits == 6 else 8)
    x_rows = 1 if m == 1 else 0  # rows of x per decode program; 0: tensor cores
    if bits == 6 and tensor_cores is None and m > 1:
        x_rows = rows_per_program(m, in_features, out_features, 6)
        if decode is not None and not x_rows and m <= PREFILL_ROWS:
            x_rows = several_rows(m)
    if x_rows:
        if decode is None and x_rows > 1:
            decode = multi_row_shape(m, in_features, out_features, MULTI_ROW_SHAPE_SMALL_FP6, None,
                                     MULTI_ROW_SHAPE_NARROW_FP6)
        elif decode is None and bits == 6:
            decode = fp6_one_row_shape(m, in_features, out_features, sms)
        if bits != 6:
            decode = (*(decode or DECODE_SHAPE_FP4)[:4], False)  # the FP4 kernel has no prefetch variant
        return decode_config(decode, out_features, rows, sms, x_rows)
    if m > PREFILL_ROWS:
        return prefill_config(m, 6, in_features, out_features, sms) if bits == 6 else None
    if tensor_cores is None:
        return fpx_tensor_core_config(in_features, out_features, rows, sms)
    return tensor_core_config(tensor_cores, out_features, rows, sms)


# Launch shapes by weight count as in intn_linear (picked by `benchmarks/kernels.py --explore`
# on an H100, docs/benchmarks/kernels-rounds.md), below 2^23 weights: 16 outputs x 64-128 rows, 8 warps
# (round 4: 576x576 4.1 -> 3.0 us, 4864x896 7.1 -> 6.4), split-K.
DECODE_SHAPES_FP6 = ((1 << 20, (16, 128, 8, 1, False)), (None, (16, 64, 8, 1, False)))
# From 2^23 weights as intn_linear.one_row_shape says, no split-K: at most 32 outputs per SM, 16
# outputs x 256 rows of the 2-bit plane, 8 warps (round 8, H100: 4096x4096 10.6 -> 8.6 us, 11008->2048
# 14.6 -> 12.2, 8192->3072 14.7 -> 12.7); more, 16 outputs x 64 rows, 4 warps, prefetch (round 6:
# 4096->14336 26.6 -> 24.0 us, 2048->11008 23.6 -> 11.9; round 8: 5120x5120 25.8 -> 12.9). From
# 2^26 weights, split-K: 64 outputs x 16 rows, 4 warps, 4 programs per SM (round 8: 8192->28672 84.6
# -> 70.8, 5120->27648 53.3 -> 47.3, 5120->13824 29.4 -> 26.8).
DECODE_SHAPE_WIDE_FP6 = (16, 64, 4, 0, True)
DECODE_SHAPE_NARROW_FP6 = (16, 256, 8, 0, False)
DECODE_SHAPE_LARGE_FP6 = (1 << 26, (64, 16, 4, 4, True))
# Below 2^23 weights, one row with at least as many outputs as inputs, and each row of a few rows
# of x with K up to 4096 (``intn_linear.no_split_rows``): one program per block of 16 outputs over
# all of K (64 rows of the 2-bit plane per step, 8 warps, prefetch), no split-K. Round 7 (H100): one
# row 576->1536 3.5 -> 3.0 us, 2048x2048 5.9 -> 5.2, but 1536->576 3.7 -> 4.0 and 4864->896 6.4 -> 7.2
# (too few programs); per row of x, 576x576 at 4 rows 3.9 -> 3.1, 2048x2048 at 2 rows 7.8 -> 6.0.
DECODE_SHAPE_NO_SPLIT_FP6 = (16, 64, 8, 0, True)
DECODE_SHAPE_FP4 = (512, 2, 2, 8, False)  # not swept: FP4 is not a speed target
# Several rows of x per program (intn_linear rule 5, ``multi_row_shape``), no split-K: 16 outputs x
# 64 rows of the 2-bit plane, 8 warps where the outputs are at most the inputs and up to 8 rows,
# otherwise 16 x 32, 4 warps (round 9, H100: 4096x4096 at 2 rows 15.0 -> 10.1 us against the tensor
# cores, 11008->4096 at 4 rows 36.1 -> 28.9; 4096->11008 at 4 rows 34.1 -> 31.6; 896->4864 at 4 rows
# 9.9 -> 6.7).
MULTI_ROW_SHAPE_NARROW_FP6 = (16, 64, 8, 0, True)
MULTI_ROW_SHAPE_SMALL_FP6 = (16, 32, 4, 0, True)
# (block_n, block_w, num_warps, programs per SM[, evict-first[, swap[, num_stages]]]) of the 2-16
# row tensor-core FP6 kernel (and FP4, below) by weight count. Round 3 (three probe processes,
# docs/benchmarks/kernels-rounds.md): num_stages 2 instead of 3 took 4096x4096 from 15.6 to 13.9 us at 4 rows
# and 16.6 to 15.0 at 16; on the 7B MLP shapes 128 outputs x 16 rows, 4 programs per SM,
# evict-first, 2 stages won (gate/up 32.5 -> 29.7 us at 4 rows). 8192x28672 keeps round 1's shape.
# From 2^21 to 2^23 weights 64 x 16 rows, 2 per SM, 2 stages (round 11, with the separate split-K
# finish, H100, at 16 rows against 32 x 16, 8 per SM: 896->4864 9.5 -> 7.4 us, 4864->896 10.4 -> 8.2,
# 2048x2048 8.3 -> 6.5, 3584->2048 13.6 -> 9.1); below 2^21 as well where that launch keeps enough
# programs (``fpx_tensor_core_config``).
TENSOR_CORE_SHAPES_FPX = ((1 << 21, (32, 16, 4, 8)), (1 << 23, (64, 16, 4, 2, False, False, 2)),
                          (1 << 25, (64, 16, 4, 4, False, False, 2)), (1 << 26, (128, 16, 4, 4, True, False, 2)),
                          (None, (64, 16, 4, 4)))
TENSOR_CORE_SHAPE_FPX = TENSOR_CORE_SHAPES_FPX[-1][1]
# Below 2^21 weights the 2^21-2^23 launch where it still has at least half as many programs as SMs
# (round 11, H100, at 16 rows: 576->1536 5.2 -> 4.6 us, 640->1792 5.5 -> 4.7, 896->1536 5.3 -> 4.6,
# 1024->1536 5.4 -> 4.6, 768->2304 5.7 -> 4.9, 2304->768 5.9 -> 5.1, with 72-108 programs; with 54-64
# it lost 2-4%: 1536->576 4.4 -> 4.6, 896x896 4.2 -> 4.3, 512->2048 5.2 -> 5.3).
SMALL_TENSOR_CORE_PROGRAMS_PER_SM = 0.5


def fpx_tensor_core_config(in_features: int, out_features: int, word_rows: int, sms: int) -> LaunchConfig:
    """The FP6 or FP4 2-16 row launch of a [out_features, in_features] linear of ``word_rows`` rows of K (FP6's
    rows of the 2-bit plane, FP4's words; see the table above)."""
    weights = in_features * out_features
    if weights < TENSOR_CORE_SHAPES_FPX[0][0]:
        wider = tensor_core_config(TENSOR_CORE_SHAPES_FPX[1][1], out_features, word_rows, sms)
        if -(-out_features // wider.block_n) * wider.split.split >= SMALL_TENSOR_CORE_PROGRAMS_PER_SM * sms:
            return wider
    return tensor_core_config(decode_shape(weights, TENSOR_CORE_SHAPES_FPX), out_features, word_rows, sms)
# FP4 takes the same table, K counted in its words of 8 inputs; its kernel has no evict-first or swap, so those
# fields do not apply to it (round 21, H100, against round 1's 32 x 16 rows, 8
# per SM, below 2^23 weights and 64 x 16, 4 per SM, above, at 2-16 rows: Triton 3.6 896->4864 10.0 -> 6.2 us,
# 4864->896 11.8 -> 6.9, 11008->4096 24.0 -> 21.9, 4096->11008 23.2 -> 23.8, geometric mean over the ten shapes of
# kernels.py 0.90; Triton 3.7.1 0.89, where round 1's table ran 14% slower than on 3.6).
DEQUANTIZE_SHAPE_FPX = (256, 4)


def fp6_one_row_shape(m: int, in_features: int, out_features: int, sms: int) -> tuple:
    """The FP6 decode launch of ``m`` rows (one row, or each row of a few): see the tables above."""
    if in_features * out_features < NO_SPLIT_WEIGHTS and (
            out_features >= in_features if m == 1 else no_split_rows(in_features, 6)):
        return DECODE_SHAPE_NO_SPLIT_FP6
    return one_row_shape(in_features, out_features, sms, DECODE_SHAPES_FP6, DECODE_SHAPE_WIDE_FP6,
                         DECODE_SHAPE_NARROW_FP6, DECODE_SHAPE_LARGE_FP6)


def fpx_linear(x: torch.Tensor, w: FpxWeights, config: LaunchConfig | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` for float16/bfloat16 ``x`` [..., K] on a CUDA device, in ``x``'s dtype.

    ``out``, if given, is a contiguous [rows, N] tensor of ``x``'s dtype or float32 to write into (see
    :func:`llmc.plugins.intn_linear.intn_linear`).
    """
    require_triton()
    _check_tile(w)
    x2 = as_rows(x, w.in_features, "fpx_linear")
    m, n, k = x2.shape[0], w.out_features, w.in_features
    halves = x.dtype == w.scale.dtype == torch.float16
    if config is None and m <= 16 and halves and w.fmt.bits == 6:
        from llmc.plugins import mma_decode

        y = mma_decode.where_its_rule_runs(x2, w, out)  # rule 8, the Hopper mma.sync kernel
        if y is not None:
            return y.reshape(*x.shape[:-1], n)
    if config is None and m > PREFILL_ROWS and w.fmt.bits == 6:
        from llmc.plugins import wgmma_prefill  # here: it imports this module (rule 6's PTX)

        y = wgmma_prefill.where_its_rule_runs(x2, w, 6, out)  # intn_linear rule 9, the Hopper kernel
        if y is not None:
            return y.reshape(*x.shape[:-1], n)
    if config is None and m > PREFILL_ROWS:
        config = fpx_config(m, w, sm_count(x.device)) if halves else None
        if config is None:  # dequantize, then cuBLAS
            y = matmul_into(x2, fpx_dequantize(w, x.dtype).t(), out)
            return y.reshape(*x.shape[:-1], n)
    config = config or fpx_config(m, w, sm_count(x.device))
    if config.block_m > 16 and not (halves and w.fmt.bits == 6):
        raise ValueError("fpx_linear: the prefill kernel takes FP6 weights, float16 x and float16 scales")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    split, fmt = config.split, w.fmt
    run = splitk.launch(config, m, n, x.device)
    part, count, grid_n = run.part, run.count, run.grid_n
    common = dict(M=fmt.mantissa_bits, BIAS=fmt.bias, GROUP=w.group_size, CHANNEL=w.group_size == k, BLOCK_N=config.block_n,
                  BLOCK_W=config.block_w, num_warps=config.num_warps, num_stages=config.num_stages, SEPARATE=run.separate,
                  **COMPILE_OPTIONS)
    low = w.planes[1] if fmt.bits == 6 else w.planes[0]
    if config.block_m == 1 and fmt.bits == 6 and config.rows == 1:
        _fp6_gemv_kernel[(grid_n, split.split, m)](
            decode_rows(x2), w.planes[0], low, w.scale, y, part, count, n, k, y.stride(0),
            split.rows_per_split, split.split, PREFETCH=config.prefetch, ROW_GRID=m > 1, **common)
    elif config.block_m == 1 and fmt.bits == 6:
        _fp6_gemv_rows_kernel[(grid_n, split.split, run.row_blocks)](
            decode_rows(x2), w.planes[0], low, w.scale, y, part, count, n, k, y.stride(0),
            split.rows_per_split, split.split, m, PREFETCH=config.prefetch, ROWS=config.rows, ROW_BLOCKS=run.row_blocks > 1,
            **common)
    elif config.block_m == 1:
        _fp4_gemv_kernel[(grid_n, split.split)](
            decode_rows(x2), w.planes[0], w.scale, y, part, count, n, k, y.stride(0),
            split.rows_per_split, split.split, **common)
    elif config.block_m > 16:
        _fp6_prefill_kernel[(grid_n, run.grid_m, split.split)](
            x2, w.planes[0], low, w.scale, y, part, count, m, n, k, x2.stride(0), y.stride(0),
            split.rows_per_split, split.split, BLOCK_M=config.block_m, **common)
    elif fmt.bits == 6:
        _fp6_gemm_kernel[(grid_n, run.grid_m, split.split)](
            x2, w.planes[0], low, w.scale, y, part, count, m, n, k, x2.stride(0), y.stride(0),
            split.rows_per_split, split.split, BLOCK_M=config.block_m, EVICT_FIRST=config.evict_first,
            SWAP=config.swap, **common)
    else:
        _fp4_gemm_kernel[(grid_n, run.grid_m, split.split)](
            x2, w.planes[0], w.scale, y, part, count, m, n, k, x2.stride(0), y.stride(0),
            split.rows_per_split, split.split, BLOCK_M=config.block_m, **common)
    run.finish(y)
    return y.reshape(*x.shape[:-1], n)


def fpx_dequantize(w: FpxWeights, dtype: torch.dtype = torch.float16,
                   block: tuple[int, int] | None = None) -> torch.Tensor:
    """The weight [N, K] in ``dtype`` on the GPU, by a Triton kernel (dequantize-then-matmul).

    Returned as the transposed view of a [K, N] tensor, which cuBLAS reads as it is.
    """
    require_triton()
    _check_tile(w)
    out = torch.empty(w.in_features, w.out_features, dtype=torch.float16, device=w.planes[0].device)
    block_n, block_w = block or DEQUANTIZE_SHAPE_FPX
    rows = w.in_features // (16 if w.fmt.bits == 6 else 8)
    grid = (-(-w.out_features // block_n), -(-rows // block_w))
    low = w.planes[1] if w.fmt.bits == 6 else w.planes[0]
    _fpx_dequantize_kernel[grid](w.planes[0], low, w.scale, out, w.out_features, w.in_features,
                                 BITS=w.fmt.bits, M=w.fmt.mantissa_bits, BIAS=w.fmt.bias, GROUP=w.group_size,
                                 CHANNEL=w.group_size == w.in_features,
                                 BLOCK_N=block_n, BLOCK_W=block_w, **COMPILE_OPTIONS)
    return (out if dtype == torch.float16 else out.to(dtype)).t()


def _check_tile(w: FpxWeights) -> None:
    if w.tile != fp_kernel_tile(w.fmt.bits):
        raise ValueError(f"fpx: planes of tile {w.tile}; the kernels read tile {fp_kernel_tile(w.fmt.bits)} (pack_fpx)")


def fp6_decode_classes() -> list:
    """(name, launch shape) of every FP6 decode launch the heuristics pick, for the compile table."""
    return [*decode_classes(DECODE_SHAPES_FP6, DECODE_SHAPE_WIDE_FP6, DECODE_SHAPE_NARROW_FP6, DECODE_SHAPE_LARGE_FP6),
            ("no-split", DECODE_SHAPE_NO_SPLIT_FP6)]


def kernel_variants() -> list:
    """The kernels :func:`fpx_linear` and :func:`fpx_dequantize` launch at their shipped launch
    shapes, for ``llmc.plugins.aot``."""
    from llmc.plugins.aot import KernelVariant

    out = dict(y_ptr="*fp16", part_ptr="*fp32", count_ptr="*i32")
    sizes = dict(N="i32", K="i32", stride_ym="i32", rows_per_split="i32", n_split="i32")
    gemm_sizes = dict(M_ROWS="i32", N="i32", K="i32", stride_xm="i32", stride_ym="i32",
                      rows_per_split="i32", n_split="i32")
    variants = []
    for name, group, channel in (("e3m2", 4096, True), ("e2m3", 128, False), ("e2m1", 4096, True)):
        fmt = FORMATS[name]
        common = dict(M=fmt.mantissa_bits, BIAS=fmt.bias, GROUP=group, CHANNEL=channel)
        if fmt.bits == 6:
            weights = dict(x_ptr="*fp16", hi_ptr="*i32", lo_ptr="*i32", s_ptr="*fp16")
            gemv, gemm = _fp6_gemv_kernel, _fp6_gemm_kernel
            shapes = [(f"gemv-{name}-{size}", shape, 1) for size, shape in fp6_decode_classes()] + [
                (f"gemv{ROWS_PER_PROGRAM}-{name}-narrow", MULTI_ROW_SHAPE_NARROW_FP6, ROWS_PER_PROGRAM),
                (f"gemv{ROWS_PER_PROGRAM}-{name}-small", MULTI_ROW_SHAPE_SMALL_FP6, ROWS_PER_PROGRAM)]
        else:
            weights = dict(x_ptr="*fp16", w_ptr="*i32", s_ptr="*fp16")
            gemv, gemm = _fp4_gemv_kernel, _fp4_gemm_kernel
            shapes = ((f"gemv-{name}-large", DECODE_SHAPE_FP4, 1),)
        pointers = {**weights, **out}
        aligned = (*pointers, "N", "K", "stride_ym", "rows_per_split")
        for variant, (block_n, block_w, warps, _, prefetch), x_rows in shapes:
            extra = ({} if fmt.bits != 6 else {"PREFETCH": prefetch, "ROW_GRID": False} if x_rows == 1
                     else {"PREFETCH": prefetch, "ROWS": x_rows, "ROW_BLOCKS": False})
            variants.append(KernelVariant(f"fpx-{variant}", gemv if x_rows == 1 else _fp6_gemv_rows_kernel,
                                          {**pointers, **sizes, **({"x_rows": "i32"} if x_rows > 1 else {})},
                                          {**common, "BLOCK_N": block_n, "BLOCK_W": block_w, **extra},
                                          warps, 1, aligned))
        for size, (block_n, block_w, warps, _, *rest) in size_classes(TENSOR_CORE_SHAPES_FPX):
            extra = ({"EVICT_FIRST": bool(rest and rest[0]), "SWAP": bool(len(rest) > 1 and rest[1])}
                     if fmt.bits == 6 else {})
            variants.append(KernelVariant(
                f"fpx-gemm16-{name}-{size}", gemm, {**pointers, **gemm_sizes},
                {**common, "BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_W": block_w, **extra}, warps,
                rest[2] if len(rest) > 2 else 3, (*aligned, "stride_xm")))
        if fmt.bits == 6:
            block_n, inputs, warps, stages = PREFILL_SHAPE
            for block_m in (64, 128):
                variants.append(KernelVariant(
                    f"fpx-prefill{block_m}-{name}", _fp6_prefill_kernel, {**pointers, **gemm_sizes},
                    {**common, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_W": inputs // 16}, warps, stages,
                    (*aligned, "stride_xm")))
        block_n, block_w = DEQUANTIZE_SHAPE_FPX
        variants.append(KernelVariant(
            f"fpx-dequantize-{name}", _fpx_dequantize_kernel,
            dict(hi_ptr="*i32", lo_ptr="*i32", s_ptr="*fp16", out_ptr="*fp16", N="i32", K="i32"),
            dict(BITS=fmt.bits, **common, BLOCK_N=block_n, BLOCK_W=block_w), 4, 1,
            ("hi_ptr", "lo_ptr", "s_ptr", "out_ptr", "N", "K")))
    return variants
