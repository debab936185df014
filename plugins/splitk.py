"""Split-K for the low-bit GEMM kernels: how many programs share one output block, and where they
meet.

A decode-shape linear (1-16 rows of ``x``) has too few output blocks to fill a GPU, so the
kernels also split the input dimension: ``split`` programs each reduce a range of K into a
float32 partial, and the last one to finish (an atomic counter per output block) sums the
partials in split order and writes ``y``. One launch, no memset, and a deterministic sum. The
counter returns to 0 after every launch, so one zeroed counter buffer per device serves every call.

On Hopper and later (compute capability 9.0+), from ``SEPARATE_MIN_SPLIT`` splits, the finish is a
second kernel instead (:func:`separate_finish`): the programs store their partials and nothing else,
and :func:`sum_splits` sums them in the same split order (the same float32 sum, bit for bit) and
writes ``y``. It is launched as a programmatic dependent launch: the first kernel lets it start at
once (``griddepcontrol.launch_dependents``), and it waits in ``griddepcontrol.wait`` until the first
kernel has finished and its stores are visible. The store fence, the atomic and the last program's
re-reads of the in-kernel finish cost 2.4-3.4 us at 16 rows on small linears (round 10); the second
kernel took 4096x4096 int4 at 16 rows from 12.3 to 10.0 us and 8192->28672 at one row from 52.1 to
46.4 (round 11, docs/benchmarks/kernels.md). Without programmatic launch (before sm_90) two plain
launches were slower than one, so the in-kernel finish stays there.

Triton is optional: without it (a CPU-only host, CI) ``triton`` is None here, the kernels are
not defined, and only the torch references run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only hosts
    triton = None

_COUNTERS: dict[torch.device, torch.Tensor] = {}

# Compile options of every kernel launch (``llmc.plugins.aot`` compiles with them too). The decode
# loops spend one fused multiply-add per weight: Triton 3.9 warns that its default, fusion on,
# becomes off in 3.10, and without fusion the one-row loops grow by 17% (FP6) and 28% (int4) in
# instructions (sm90 SASS, Triton 3.6, docs/benchmarks/kernels.md).
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def require_triton() -> None:
    if triton is None:
        raise RuntimeError("llmc's GPU kernels need Triton and a CUDA device; the *_reference functions run anywhere")


def counters(device: torch.device, size: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``size`` counters on ``device``, kept between calls."""
    buffer = _COUNTERS.get(device)
    if buffer is None or buffer.numel() < size:
        buffer = torch.zeros(max(size, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buffer
    return buffer


@dataclass(frozen=True)
class Split:
    """``split`` programs per output block, each reducing ``rows_per_split`` rows of words."""

    split: int
    rows_per_split: int


def choose_split(output_blocks: int, word_rows: int, block_rows: int, programs_wanted: float) -> Split:
    """Enough splits to launch about ``programs_wanted`` programs, each a whole number of blocks.

    ``programs_wanted`` may be fractional (fewer programs than SMs): at or below
    ``output_blocks`` there is no split, and no cross-program reduction.
    """
    steps = max(1, -(-word_rows // block_rows))  # the last block may be partial (masked)
    split = max(1, min(steps, math.ceil(programs_wanted / max(1, output_blocks))))
    steps_per_split = -(-steps // split)
    split = -(-steps // steps_per_split)  # no empty splits
    return Split(split, steps_per_split * block_rows)


def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


if triton is not None:

    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def start_sum(SEPARATE: tl.constexpr):
        """First thing in a kernel with a separate finish: let :func:`sum_splits`' launch start."""
        if SEPARATE:
            gdc_launch_dependents()

    @triton.jit
    def finish_split(part, y_ptr, part_ptr, count_ptr, offs_m, offs_n, M, N, stride_ym,
               pid_mn, pid_k, n_split, SEPARATE: tl.constexpr = False):
        # Publish this split's partial; the last split of the block to arrive sums them in order
        # (SEPARATE: sum_splits does, in a second kernel).
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if n_split == 1:
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], part.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            block = offs_m[:, None] * N + offs_n[None, :]
            tl.store(part_ptr + pid_k * M * N + block, part, mask=mask)
            if not SEPARATE:
                tl.debug_barrier()
                done = tl.atomic_add(count_ptr + pid_mn, 1, sem="acq_rel")
                if done == n_split - 1:
                    total = tl.zeros_like(part)
                    for s in range(0, n_split):
                        total += tl.load(part_ptr + s * M * N + block, mask=mask, other=0.0, cache_modifier=".cg")
                    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], total.to(y_ptr.dtype.element_ty),
                             mask=mask)
                    tl.atomic_xchg(count_ptr + pid_mn, 0)

    @triton.jit
    def grid_row(x_ptr, y_ptr, part_ptr, count_ptr, K, stride_ym, n_split, N, ROWS: tl.constexpr):
        """The pointers of grid row ``program_id(2)`` of a decode kernel taking ``ROWS`` rows of a
        contiguous ``x`` per program: its first row of x and y, its own split-K partials and
        counters."""
        block = tl.program_id(2)
        return (x_ptr + block * ROWS * K, y_ptr + block * ROWS * stride_ym, part_ptr + block * n_split * ROWS * N,
                count_ptr + block * tl.num_programs(0))

    @triton.jit
    def row_block(x_ptr, y_ptr, part_ptr, count_ptr, K, stride_ym, n_split, N, x_rows, ROWS: tl.constexpr,
                  ROW_BLOCKS: tl.constexpr):
        """For a decode kernel with ``ROWS`` >= 2 rows of a contiguous ``x`` (``x_rows`` in all) per
        program: the pointers of its block of rows (:func:`grid_row`, with ``ROW_BLOCKS``), how many
        rows it has, and the rows of x it reads [ROWS] (past the last row: a copy of it)."""
        if ROW_BLOCKS:
            x_ptr, y_ptr, part_ptr, count_ptr = grid_row(x_ptr, y_ptr, part_ptr, count_ptr, K, stride_ym, n_split, N, ROWS)
        rows_here = tl.minimum(ROWS, x_rows - tl.program_id(2) * ROWS)
        return x_ptr, y_ptr, part_ptr, count_ptr, rows_here, tl.minimum(tl.arange(0, ROWS), rows_here - 1)

    @triton.jit
    def _sum_splits_kernel(part_ptr, y_ptr, M, N, stride_ym, n_split, ROWS, BLOCK: tl.constexpr):
        """``y`` [M, N] from the partials of a launch with a separate finish, in split order. The
        partials of row m are in its block of ROWS rows (``grid_row``, ``row_block``; the whole of
        M for the tensor-core kernels): [block][split][rows of the block][N]."""
        gdc_wait()
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < M * N
        m = offs // N
        n = offs - m * N
        block = m // ROWS
        rows_here = tl.minimum(ROWS, M - block * ROWS)
        first = block * n_split * ROWS * N + (m - block * ROWS) * N + n
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(0, n_split):
            total += tl.load(part_ptr + first + s * rows_here * N, mask=ok, other=0.0, cache_modifier=".cg")
        tl.store(y_ptr + m * stride_ym + n, total.to(y_ptr.dtype.element_ty), mask=ok)


# The separate finish from this many splits: with 2 (FP6 at one row on 8192->28672, 448 blocks of 64
# outputs) it was slower, 69.4 -> 77.2 us; int4 at 2 splits was within 0.4 us either way (round 11).
SEPARATE_MIN_SPLIT = 3
# Outputs per program of the sum kernel (1024 lost to the in-kernel finish at 12-19 splits, round 11).
SUM_BLOCK = 256


def separate_finish(device: torch.device, split: int) -> bool:
    """Whether a launch of ``split`` splits per output block on ``device`` finishes in :func:`sum_splits`."""
    return split > 1 and split >= SEPARATE_MIN_SPLIT and torch.cuda.get_device_capability(device) >= (9, 0)


def workspace(device: torch.device, n_split: int, rows: int, n: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """What a launch of ``n_split`` splits per output block over ``rows`` rows of x (whole blocks of
    rows) and ``n`` outputs needs: its float32 partials (in :func:`sum_splits`' layout), the zeroed
    counters of its ``blocks`` output blocks, and whether it finishes in :func:`sum_splits`."""
    part = torch.empty(max(n_split, 1), rows, n, dtype=torch.float32, device=device)
    return part, counters(device, blocks), separate_finish(device, n_split)


def sum_splits(part: torch.Tensor, y: torch.Tensor, n_split: int, rows: int) -> None:
    """The separate finish: ``y`` [M, N] (row stride free) from ``part``, the partials of the launch
    just before it on the stream, whose blocks hold ``rows`` rows of x; a programmatic dependent
    launch (see the module docstring)."""
    require_triton()
    m, n = y.shape
    _sum_splits_kernel[(-(-m * n // SUM_BLOCK),)](part, y, m, n, y.stride(0), n_split, rows, BLOCK=SUM_BLOCK,
                                                  num_warps=4, launch_pdl=True)
