"""Split-K for the low-bit GEMM kernels: how many programs share one output block, and where they
meet.

A decode-shape linear (1-16 rows of ``x``) has too few output blocks to fill a GPU, so the
kernels also split the input dimension: ``split`` programs each reduce a range of K into a
float32 partial, and the last one to finish (an atomic counter per output block) sums the
partials in split order and writes ``y``. One launch, no memset, and a deterministic sum. The
counter returns to 0 after every launch, so one zeroed counter buffer per device serves every call.

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

    @triton.jit
    def finish_split(part, y_ptr, part_ptr, count_ptr, offs_m, offs_n, M, N, stride_ym,
               pid_mn, pid_k, n_split):
        # Publish this split's partial; the last split of the block to arrive sums them in order.
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if n_split == 1:
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], part.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            block = offs_m[:, None] * N + offs_n[None, :]
            tl.store(part_ptr + pid_k * M * N + block, part, mask=mask)
            tl.debug_barrier()
            done = tl.atomic_add(count_ptr + pid_mn, 1, sem="acq_rel")
            if done == n_split - 1:
                total = tl.zeros_like(part)
                for s in range(0, n_split):
                    total += tl.load(part_ptr + s * M * N + block, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], total.to(y_ptr.dtype.element_ty), mask=mask)
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
