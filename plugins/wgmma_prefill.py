"""Rule 9 of ``intn_linear``: the int-N and FP6 prefill GEMM on Hopper (sm_90), written in Gluon.

Rule 8 (the Triton prefill kernel) gives the decoded weight to a wgmma from registers, and Triton
3.6 cannot keep that wgmma in flight while the next step decodes (it read registers being rewritten,
so rule 8 waits for every wgmma before decoding again). This kernel is written in Gluon, Triton's
lower-level language, where the pipeline is explicit:

- ``x`` [M, K] (float16) and the packed words [K / F, N] come into shared memory by TMA, ``STAGES``
  steps of 64 inputs deep, each stage with its own mbarrier;
- each step decodes its words with rule 8's PTX (:func:`~llmc.plugins.intn_linear._word_decode_asm`:
  fields i and i + F/2 of a word as one float16 pair) and stores the [64, BLOCK_N] tile of W^T into
  one of two shared buffers;
- the wgmma (``x`` tile and decoded tile, both from shared memory) is issued asynchronously and
  waited for one step later: the decode of step s + 1 runs while the tensor cores do step s. Before
  a buffer is written again, every warpgroup has waited for the wgmma that read it (its own wait,
  then a CTA barrier), and the TMA refills a stage only after the wgmma that read it.

The number of steps per program is a compile-time constant (``STEPS``): with a loop that may run no
step at all, ptxas serializes every wgmma (its warning C7515: the zeroed accumulator of the empty
path), which costs the overlap this kernel exists for. Splits of K (about two programs per SM, the
partials summed by :func:`llmc.plugins.splitk.sum_splits`) may run past K: TMA reads zeros there,
and the scales' group index is clamped.

Measured on an H100 (docs/benchmarks/kernels-prefill.md); it runs where it beat rule 8, the 2-16
row kernel and dequantize-then-cuBLAS (:data:`WGMMA_RULES`): int4, int2, int8 and FP6 (e3m2, e2m3;
``fp6_linear`` calls it) from 2^24 weights. Gluon is experimental in Triton 3.6: where it cannot be
imported, or on any GPU but sm_90 (wgmma is Hopper's), ``intn_linear`` keeps rules 8 and 2 (``fpx_linear`` rule 7).
"""

from __future__ import annotations

import functools

import torch

from llmc.plugins import splitk
from llmc.plugins.fp6_linear import _FP6_PAIR_ASM, FpxWeights
from llmc.plugins.intn_linear import _WORD_ASM, _WORD_CONSTRAINTS, FUSED_WEIGHTS, inputs_per_row
from llmc.plugins.splitk import LaunchConfig, choose_split

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # no Triton (CPU-only hosts), or a Triton whose Gluon differs
    gluon = None

# By bits, (from weights, up to rows below FUSED_WEIGHTS weights, up to rows from FUSED_WEIGHTS): where
# rule 9 runs, float16 x and scales on sm_90. Set from benchmarks/kernels_prefill.py on an H100
# (docs/benchmarks/kernels-prefill.md): from 2^24 weights int4 and int2 beat rule 8, the 2-16 row
# kernel and dequantize-then-cuBLAS at 17-256 rows (int4 1.11-2.04x), and at 512 from 2^25 weights
# (1.00-1.17x; 4096x4096 0.89x); int8 and FP6 at 17-128 rows (int8 1.16-2.95x, FP6 1.06-1.53x), mixed
# from 192 (FP6's decode costs more a weight). Below 2^24 weights rule 8 or dequantize-then-cuBLAS was
# faster.
WGMMA_RULES = {2: (1 << 24, 256, 512), 4: (1 << 24, 256, 512), 6: (1 << 24, 128, 128), 8: (1 << 24, 128, 128)}
# (block_n, inputs per step, num_warps, num_stages); blocks of 64 rows of x up to 64 rows, else 128.
WGMMA_SHAPE = (128, 64, 4, 4)
WGMMA_PROGRAMS_PER_SM = 2


def available(device: torch.device) -> bool:
    """Whether rule 9 can run on ``device``: Gluon imported and a compute capability 9.0 GPU."""
    return gluon is not None and device.type == "cuda" and splitk._capability(device) == (9, 0)


def wgmma_config(m: int, bits: int, in_features: int, out_features: int, sms: int) -> LaunchConfig | None:
    """Rule 9's launch over ``m`` rows of x, or None where its rule does not take the linear."""
    least, small, large = WGMMA_RULES.get(bits, (None, 0, 0))
    weights = in_features * out_features
    if least is None or weights < least or m > (large if weights >= FUSED_WEIGHTS else small):
        return None
    if in_features % 16 or out_features % 4:  # TMA: rows of x and of the words 16-byte aligned
        return None
    return wgmma_launch(m, bits, in_features, out_features, sms)


def wgmma_launch(m: int, bits: int, in_features: int, out_features: int, sms: int) -> LaunchConfig:
    """Rule 9's launch over ``m`` rows whatever its rule (tests and benchmarks force it)."""
    block_m = 64 if m <= 64 else 128
    block_n, inputs, warps, stages = WGMMA_SHAPE
    fields = inputs_per_row(bits)
    blocks = -(-m // block_m) * -(-out_features // block_n)
    # Splits of K up to WGMMA_PROGRAMS_PER_SM programs per SM, never over (rounded down): on an H100,
    # 4096->11008 at 256 rows ran 61 us in 172 programs, 67 in 344.
    splits = max(1, WGMMA_PROGRAMS_PER_SM * sms // blocks)
    split = choose_split(blocks, in_features // fields, inputs // fields, splits * blocks)
    return LaunchConfig(block_m, block_n, inputs // fields, warps, stages, split)


if gluon is not None:
    # Gluon's names changed between Triton 3.6 (the device's) and 3.9 (CI's): the TMA load (global to
    # shared memory) is async_copy_global_to_shared in 3.6, async_load later (the old name raises).
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    # The CTA barrier: thread_barrier in 3.6, barrier later.
    _cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier
    FP6_PAIR_ASM = gl.constexpr(_FP6_PAIR_ASM)
    WORD_ASM = gl.constexpr(_WORD_ASM)
    WORD_CONSTRAINTS = gl.constexpr(_WORD_CONSTRAINTS)

    @gluon.jit
    def _decoded_tile(words, scale, zero, WIDTH: gl.constexpr, SYMMETRIC: gl.constexpr):
        """Words [R, C] -> W^T [R * F, C] float16, input r * F + i at row r * F + i (rule 8's PTX; the
        join tree puts field i last, as intn_linear._int_words does)."""
        asm: gl.constexpr = WORD_ASM[2 * WIDTH + SYMMETRIC]
        constraints: gl.constexpr = WORD_CONSTRAINTS[WIDTH]
        if WIDTH == 8:
            f0, f1, f2, f3 = gl.inline_asm_elementwise(asm, constraints, [words, scale, zero],
                                                       dtype=(gl.float16, ) * 4, is_pure=True, pack=1)
            w = gl.join(gl.join(f0, f2), gl.join(f1, f3))
        elif WIDTH == 4:
            f0, f1, f2, f3, f4, f5, f6, f7 = gl.inline_asm_elementwise(asm, constraints, [words, scale, zero],
                                                                       dtype=(gl.float16, ) * 8, is_pure=True, pack=1)
            w = gl.join(gl.join(gl.join(f0, f4), gl.join(f2, f6)), gl.join(gl.join(f1, f5), gl.join(f3, f7)))
        else:
            f0, f1, f2, f3, f4, f5, f6, f7, f8, f9, f10, f11, f12, f13, f14, f15 = gl.inline_asm_elementwise(
                asm, constraints, [words, scale, zero], dtype=(gl.float16, ) * 16, is_pure=True, pack=1)
            w = gl.join(gl.join(gl.join(gl.join(f0, f8), gl.join(f4, f12)), gl.join(gl.join(f2, f10), gl.join(f6, f14))),
                        gl.join(gl.join(gl.join(f1, f9), gl.join(f5, f13)), gl.join(gl.join(f3, f11), gl.join(f7, f15))))
        return _rows_of_inputs(w, words, 32 // WIDTH)

    @gluon.jit
    def _fp6_pair(high, low, scale, MANTISSA: gl.constexpr, FIELD: gl.constexpr, HALF: gl.constexpr):
        # fp6_linear rule 6's PTX: input 2 FIELD + HALF of each row of the 2-bit plane, float16.
        return gl.inline_asm_elementwise(FP6_PAIR_ASM[32 * (MANTISSA - 2) + 16 * HALF + FIELD], "=r,r,r,r,r,r",
                                         [high, low, scale], dtype=gl.float16, is_pure=True, pack=2)

    @gluon.jit
    def _fp6_tile(a, b, low, scale, MANTISSA: gl.constexpr):
        """Rows [R, C] of the 2-bit plane and their even (a) and odd (b) rows of the 4-bit plane -> W^T
        [R * 16, C] float16 (the join tree of fp6_linear rule 7: input f = 2 i + h last)."""
        w = gl.join(
            gl.join(gl.join(gl.join(_fp6_pair(a, low, scale, MANTISSA, 0, 0), _fp6_pair(a, low, scale, MANTISSA, 4, 0)),
                            gl.join(_fp6_pair(a, low, scale, MANTISSA, 2, 0), _fp6_pair(a, low, scale, MANTISSA, 6, 0))),
                    gl.join(gl.join(_fp6_pair(a, low, scale, MANTISSA, 1, 0), _fp6_pair(a, low, scale, MANTISSA, 5, 0)),
                            gl.join(_fp6_pair(a, low, scale, MANTISSA, 3, 0), _fp6_pair(a, low, scale, MANTISSA, 7, 0)))),
            gl.join(gl.join(gl.join(_fp6_pair(b, low, scale, MANTISSA, 0, 1), _fp6_pair(b, low, scale, MANTISSA, 4, 1)),
                            gl.join(_fp6_pair(b, low, scale, MANTISSA, 2, 1), _fp6_pair(b, low, scale, MANTISSA, 6, 1))),
                    gl.join(gl.join(_fp6_pair(b, low, scale, MANTISSA, 1, 1), _fp6_pair(b, low, scale, MANTISSA, 5, 1)),
                            gl.join(_fp6_pair(b, low, scale, MANTISSA, 3, 1), _fp6_pair(b, low, scale, MANTISSA, 7, 1)))))
        return _rows_of_inputs(w, low, 16)

    @gluon.jit
    def _rows_of_inputs(w, rows, FIELDS: gl.constexpr):
        # [R, C, F] (field last) -> [R * F, C], input r * F + i at row r * F + i.
        w = gl.permute(gl.reshape(w, (rows.shape[0], rows.shape[1], FIELDS)), (0, 2, 1))
        return gl.reshape(w, (rows.shape[0] * FIELDS, rows.shape[1]))

    @gluon.constexpr_function
    def _words_layout(block_n, num_warps):
        # Four neighbouring outputs of one row of words per thread, a warp across the block's outputs.
        across = min(32, block_n // 4)
        return gl.BlockedLayout([1, 4], [32 // across, across], [num_warps, 1], [1, 0])

    @gluon.jit
    def _load_step(x_desc, w_desc, v_desc, bar, x_s, w_s, a_s, b_s, off_m, off_n, N, step,
                   FP6: gl.constexpr, pred):
        """TMA loads of one step into one stage: x, the words (FP6: the 2-bit plane's rows and, from
        the 4-bit plane seen as [K / 16, 2 N], their even and odd rows)."""
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        ROWS: gl.constexpr = w_desc.block_type.shape[0]
        nbytes: gl.constexpr = x_desc.block_type.nbytes + w_desc.block_type.nbytes * (3 if FP6 else 1)
        mbarrier.expect(bar, nbytes, pred=pred)
        _tma_load(x_desc, [off_m, step * BLOCK_K], bar, x_s, pred=pred)
        _tma_load(w_desc, [step * ROWS, off_n], bar, w_s, pred=pred)
        if FP6:
            _tma_load(v_desc, [step * ROWS, off_n], bar, a_s, pred=pred)
            _tma_load(v_desc, [step * ROWS, N + off_n], bar, b_s, pred=pred)

    @gluon.jit
    def _wgmma_prefill_kernel(x_desc, w_desc, v_desc, s_ptr, z_ptr, y_ptr, part_ptr, M, N, K, stride_ym,
                              WIDTH: gl.constexpr, GROUP: gl.constexpr, SYMMETRIC: gl.constexpr,
                              MANTISSA: gl.constexpr, STEPS: gl.constexpr, STAGES: gl.constexpr,
                              num_warps: gl.constexpr):
        # int-N (MANTISSA 0): w_desc the words [K / F, N], v_desc unread. FP6 (MANTISSA 2 or 3, WIDTH
        # 16 inputs per row): w_desc the 2-bit plane [K / 16, N], v_desc the 4-bit plane as [K / 16, 2 N].
        FP6: gl.constexpr = MANTISSA > 0
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        ROWS: gl.constexpr = w_desc.block_type.shape[0]  # rows of words per step
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[1]
        FIELDS: gl.constexpr = BLOCK_K // ROWS  # inputs per row of words
        off_n = gl.program_id(0) * BLOCK_N
        off_m = gl.program_id(1) * BLOCK_M
        first = gl.program_id(2) * STEPS  # this split's first step

        x_s = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        w_s = gl.allocate_shared_memory(w_desc.dtype, [STAGES, ROWS, BLOCK_N], w_desc.layout)
        if FP6:
            a_s = gl.allocate_shared_memory(v_desc.dtype, [STAGES, ROWS, BLOCK_N], v_desc.layout)
            b_s = gl.allocate_shared_memory(v_desc.dtype, [STAGES, ROWS, BLOCK_N], v_desc.layout)
        else:
            a_s = w_s
            b_s = w_s
        d_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, BLOCK_N], gl.float16)
        d_s = gl.allocate_shared_memory(gl.float16, [2, BLOCK_K, BLOCK_N], d_layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
        # The stage of step s is s % STAGES; it is refilled two steps on (after the wgmma that read it).
        for s in gl.static_range(STAGES - 2):
            _load_step(x_desc, w_desc, v_desc, ready.index(s), x_s.index(s), w_s.index(s), a_s.index(s), b_s.index(s),
                       off_m, off_n, N, first + s, FP6, s < STEPS)

        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_N, 16])
        acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=mma_layout)
        w_layout: gl.constexpr = _words_layout(BLOCK_N, num_warps)
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, w_layout))
        n_ok = (offs_n < N)[None, :]
        rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, w_layout))
        for step in range(STEPS):
            stage = step % STAGES
            mbarrier.wait(ready.index(stage), (step // STAGES) & 1)
            words = w_s.index(stage).load(w_layout)
            # Past K (the last split), TMA gave zero words and x; the group index stays in range.
            group = (gl.minimum((first + step) * ROWS + rows, K // FIELDS - 1) // (GROUP // FIELDS))[:, None]
            scale = gl.load(s_ptr + group * N + offs_n[None, :], mask=n_ok, other=0.0)
            if FP6:
                w = _fp6_tile(a_s.index(stage).load(w_layout), b_s.index(stage).load(w_layout), words, scale, MANTISSA)
            else:
                if SYMMETRIC:
                    zero = scale  # unread
                else:
                    zero = gl.load(z_ptr + group * N + offs_n[None, :], mask=n_ok, other=0.0)
                w = _decoded_tile(words, scale, zero, WIDTH, SYMMETRIC)
            # Every warpgroup has waited for its wgmma of step - 2 (the wait at the end of the last
            # step): the decoded buffer and the stage that wgmma read are free.
            _cta_barrier()
            ahead = step + STAGES - 2
            refill = ahead % STAGES
            _load_step(x_desc, w_desc, v_desc, ready.index(refill), x_s.index(refill), w_s.index(refill),
                       a_s.index(refill), b_s.index(refill), off_m, off_n, N, first + ahead, FP6, ahead < STEPS)
            decoded = d_s.index(step % 2)
            decoded.store(w)
            fence_async_shared()
            _cta_barrier()
            acc = warpgroup_mma(x_s.index(stage), decoded, acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))
        om = off_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_layout))
        on = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))
        mask = (om < M)[:, None] & (on < N)[None, :]
        if gl.num_programs(2) == 1:
            gl.store(y_ptr + om[:, None] * stride_ym + on[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:  # partials [split][M][N], summed by splitk.sum_splits
            gl.store(part_ptr + gl.program_id(2) * M * N + om[:, None] * N + on[None, :], acc, mask=mask)


@functools.cache
def _shared_layout(shape: tuple[int, int], dtype: str):
    return gl.NVMMASharedLayout.get_default_for(list(shape), getattr(gl, dtype))


def where_its_rule_runs(x2: torch.Tensor, w, bits: int, out: torch.Tensor | None) -> torch.Tensor | None:
    """``x2`` [M, K] @ W.T by rule 9 into ``out`` (a new tensor if None) where :func:`wgmma_config` takes
    it on this GPU (``bits`` 6: FP6), with float16 x and scales; else None, and the caller's rules run."""
    if not (x2.dtype == w.scale.dtype == torch.float16 and available(x2.device)):
        return None
    m, n = x2.shape[0], w.out_features
    config = wgmma_config(m, bits, w.in_features, n, splitk.sm_count(x2.device))
    if config is None:
        return None
    return wgmma_linear(x2, w, config, torch.empty(m, n, dtype=x2.dtype, device=x2.device) if out is None else out)


def wgmma_linear(x2: torch.Tensor, w, config: LaunchConfig, y: torch.Tensor) -> torch.Tensor:
    """``y`` [M, N] = ``x2`` [M, K] (float16) @ W.T by rule 9 at ``config`` (:func:`wgmma_launch`); ``w``
    ``IntNWeights`` or FP6 ``FpxWeights``, with float16 scales. Returns ``y``."""
    if not available(x2.device):
        raise RuntimeError("wgmma_linear: needs Triton's Gluon and a compute capability 9.0 GPU")
    if not x2.dtype == w.scale.dtype == torch.float16:
        raise ValueError("wgmma_linear: takes float16 x and float16 scales")
    m, k = x2.shape
    n = w.out_features
    fp6 = isinstance(w, FpxWeights)
    if x2.stride(0) % 8 or x2.data_ptr() % 16:  # TMA: 16-byte aligned rows
        x2 = x2.clone(memory_format=torch.contiguous_format)
    block_k = config.block_w * inputs_per_row(6 if fp6 else w.bits)
    x_desc = TensorDescriptor(x2, [m, k], [x2.stride(0), 1], [config.block_m, block_k],
                              _shared_layout((config.block_m, block_k), "float16"))
    layout = _shared_layout((config.block_w, config.block_n), "int32")
    words = w.planes[1] if fp6 else w.planes[0]  # FP6: the 2-bit plane, one row per 16 inputs
    w_desc = TensorDescriptor(words, list(words.shape), [words.stride(0), 1], [config.block_w, config.block_n], layout)
    v_desc = w_desc
    if fp6:  # the 4-bit plane as [K / 16, 2 N]: a row of the 2-bit plane's even and odd rows side by side
        v_desc = TensorDescriptor(w.planes[0], [k // 16, 2 * n], [2 * n, 1], [config.block_w, config.block_n], layout)
    split = config.split.split
    part = torch.empty(split, m, n, dtype=torch.float32, device=x2.device) if split > 1 else y
    grid = (-(-n // config.block_n), -(-m // config.block_m), split)
    _wgmma_prefill_kernel[grid](x_desc, w_desc, v_desc, w.scale, w.scale if fp6 else w.zero, y, part, m, n, k,
                                y.stride(0), WIDTH=0 if fp6 else w.bits, GROUP=w.group_size,
                                SYMMETRIC=fp6 or w.symmetric, MANTISSA=w.fmt.mantissa_bits if fp6 else 0,
                                STEPS=config.split.rows_per_split // config.block_w, STAGES=config.num_stages,
                                num_warps=config.num_warps)
    if split > 1:
        splitk.sum_splits(part, y, split, m)
    return y


def kernel_variants() -> list:
    """Rule 9's kernel at its launch (both blocks of rows; int4 symmetric g128 and asymmetric g32, FP6
    e3m2 per channel), for ``llmc.plugins.aot``: sm_90 only. ``STEPS`` as 4096 inputs in one split."""
    from llmc.plugins.aot import KernelVariant

    if gluon is None:
        return []
    block_n, inputs, warps, stages = WGMMA_SHAPE
    variants = []
    for bits, symmetric, group in ((4, True, 128), (4, False, 32), (6, True, 4096)):
        rows = inputs // inputs_per_row(bits)
        words = f"tensordesc<i32[{rows}, {block_n}],{_shared_layout((rows, block_n), 'int32')!r}>"
        tag = "fp6-e3m2-channel" if bits == 6 else f"int{bits}-{'sym' if symmetric else 'asym'}-g{group}"
        for block_m in (64, 128):
            signature = dict(
                x_desc=f"tensordesc<fp16[{block_m}, {inputs}],{_shared_layout((block_m, inputs), 'float16')!r}>",
                w_desc=words, v_desc=words, s_ptr="*fp16", z_ptr="*fp16", y_ptr="*fp16", part_ptr="*fp32", M="i32",
                N="i32", K="i32", stride_ym="i32")
            variants.append(KernelVariant(
                f"intn-wgmma{block_m}-{tag}", _wgmma_prefill_kernel, signature,
                dict(WIDTH=0 if bits == 6 else bits, GROUP=group, SYMMETRIC=symmetric, MANTISSA=2 if bits == 6 else 0,
                     STEPS=4096 // inputs, STAGES=stages, num_warps=warps),
                warps, 1, ("s_ptr", "z_ptr", "y_ptr", "part_ptr", "N", "K", "stride_ym"), targets=(90,)))
    return variants
