"""Launches of the low-bit GEMM kernels: their configuration, their grid, and split-K (how many
programs share one output block, and where they meet).

A decode-shape linear (1-16 rows of ``x``) has too few output blocks to fill a GPU, so the
kernels also split the input dimension: ``split`` programs each reduce a range of K into a
float32 partial, and the last one to finish (an atomic counter per output block) sums the
partials in split order and writes ``y``. One launch, no memset, and a deterministic sum. The
counter returns to 0 after every launch, so one zeroed counter buffer per stream serves every call
on it (:func:`counters`).

On Hopper and later (compute capability 9.0+), from ``SEPARATE_MIN_SPLIT`` splits, the finish is a
second kernel instead (:func:`separate_finish`): the programs store their partials and nothing else,
and :func:`sum_splits` sums them in the same split order (the same float32 sum, bit for bit) and
writes ``y``. It is launched as a programmatic dependent launch: the first kernel lets it start at
once (``griddepcontrol.launch_dependents``), and it waits in ``griddepcontrol.wait`` until the first
kernel has finished and its stores are visible. The store fence, the atomic and the last program's
re-reads of the in-kernel finish cost 2.4-3.4 us at 16 rows on small linears (round 10); the second
kernel took 4096x4096 int4 at 16 rows from 12.3 to 10.0 us and 8192->28672 at one row from 52.1 to
46.4 (round 11, docs/benchmarks/kernels-rounds.md). Without programmatic launch (before sm_90) two plain
launches were slower than one, so the in-kernel finish stays there.

Triton is optional: without it (a CPU-only host, CI) ``triton`` is None here, the kernels are
not defined, and only the torch references run.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only hosts
    triton = None

_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}

# Compile options of every kernel launch (``llmc.plugins.aot`` compiles with them too). The decode
# loops spend one fused multiply-add per weight: Triton 3.9 warns that its default, fusion on,
# becomes off in 3.10, and without fusion the one-row loops grow by 17% (FP6) and 28% (int4) in
# instructions (sm90 SASS, Triton 3.6, docs/benchmarks/kernels.md).
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def require_triton() -> None:
    if triton is None:
        raise RuntimeError("llmc's GPU kernels need Triton and a CUDA device; the *_reference functions run anywhere")


def counters(device: torch.device, size: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``size`` counters for launches on ``device``'s current
    stream, kept between calls. One per stream: the launches of one stream run in order and leave
    their counters at zero, while launches on two streams may run at once (TensorRT runs each
    execution context on its own stream) and must not count into each other's blocks."""
    key = (device, torch.cuda.current_stream(device).cuda_stream)
    buffer = _COUNTERS.get(key)
    if buffer is None or buffer.numel() < size:
        buffer = torch.zeros(max(size, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buffer
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


def pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class LaunchConfig:
    """Block shape and split of one launch; ``intn_config`` and ``fpx_config`` pick it from the shape.

    ``block_m`` 1 is a decode kernel (CUDA cores) with ``rows`` rows of x per program, 16 a
    tensor-core kernel over up to 16 rows of x, more the int4 prefill kernel (``intn_linear`` rule 8).
    """

    block_m: int
    block_n: int
    block_w: int
    num_warps: int
    num_stages: int
    split: Split
    prefetch: bool = False
    inline_zero: bool = False  # int-N decode: the zero point inside the hot loop
    evict_first: bool = False  # weight words loaded with the evict-first L2 policy
    swap: bool = False  # tensor cores: the decoded weight is the first operand of tl.dot
    rows: int = 1
    joined: bool = False  # int3_linear rule 4: the decoded tile joined into one operand of the product


def decode_config(shape: tuple, out_features: int, word_rows: int, sms: int, rows: int,
                  group_rows: int = 0) -> LaunchConfig:
    """The decode launch of ``shape``, (block_n, block_w, num_warps, programs_per_sm,
    prefetch[, inline_zero[, evict_first]]), over ``word_rows`` rows of words: ``block_n`` at most
    the outputs rounded up to a power of two (at least 16), splits of whole blocks of ``block_w``
    rows and, given ``group_rows`` (rows of words per quantization group, whose zero point the
    kernel adds after its loop unless ``inline_zero``), of whole groups."""
    block_n, block_w, warps, per_sm, prefetch, *rest = shape
    inline_zero = bool(rest and rest[0])
    block_n = min(block_n, max(16, pow2_at_least(out_features)))
    split_rows = max(block_w, group_rows) if group_rows and not inline_zero else block_w
    split = choose_split(-(-out_features // block_n), word_rows, split_rows, per_sm * sms)
    return LaunchConfig(1, block_n, block_w, warps, 1, split, prefetch, inline_zero,
                        evict_first=bool(len(rest) > 1 and rest[1]), rows=rows)


def tensor_core_config(shape: tuple, out_features: int, word_rows: int, sms: int) -> LaunchConfig:
    """The 2-16 row launch of ``shape``, (block_n, block_w, num_warps, programs_per_sm[,
    evict_first[, swap[, num_stages]]]) (3 stages unless given), over ``word_rows`` rows of words."""
    block_n, block_w, warps, per_sm, *rest = shape
    split = choose_split(-(-out_features // block_n), word_rows, block_w, per_sm * sms)
    return LaunchConfig(16, block_n, block_w, warps, rest[2] if len(rest) > 2 else 3, split,
                        evict_first=bool(rest and rest[0]), swap=bool(len(rest) > 1 and rest[1]))


def as_rows(x: torch.Tensor, in_features: int, name: str) -> torch.Tensor:
    """``x`` [..., K] as [rows, K] with unit stride along K (a copy where it has not)."""
    if x.shape[-1] != in_features:
        raise ValueError(f"{name}: x has {x.shape[-1]} features, the weight takes {in_features}")
    x2 = x.reshape(-1, in_features)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def matmul_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``a @ b`` (cuBLAS) into ``out``, or a new tensor of ``a``'s dtype if None; an ``out`` of another dtype (the
    plugins' float32) takes a copy of the product in ``a``'s dtype, as the kernels store their output in ``out``'s."""
    if out is None or out.dtype == a.dtype:
        return torch.matmul(a, b, out=out)
    return out.copy_(torch.matmul(a, b))


@dataclass(frozen=True)
class Launch:
    """The grid and split-K workspace of one launch (:func:`launch`)."""

    grid_n: int  # blocks of outputs
    grid_m: int  # tensor cores: blocks of 16 rows of x
    row_blocks: int  # decode: blocks of ``config.rows`` rows of x
    part: torch.Tensor  # float32 partials in sum_splits' layout
    count: torch.Tensor  # zeroed counters of the output blocks
    separate: bool  # finished by sum_splits
    n_split: int
    sum_rows: int  # rows of x per block of partials

    def finish(self, y: torch.Tensor) -> None:
        """After the kernel: the separate finish, where there is one."""
        if self.separate:
            sum_splits(self.part, y, self.n_split, self.sum_rows)


def launch(config: LaunchConfig, m: int, n: int, device: torch.device) -> Launch:
    """Grid and workspace of ``config`` over ``m`` rows of x and ``n`` outputs (without split-K
    none: the kernels never touch the partials and counters of a launch of one split)."""
    decode = config.block_m == 1
    grid_n = -(-n // config.block_n)
    grid_m = -(-m // config.block_m)
    rows = config.rows if decode else 1
    row_blocks = -(-m // rows)
    n_split = config.split.split
    if n_split == 1:
        part, count = _no_workspace(device)
    else:
        part = torch.empty(n_split, row_blocks * rows, n, dtype=torch.float32, device=device)
        count = counters(device, grid_n * max(grid_m, row_blocks))
    return Launch(grid_n, grid_m, row_blocks, part, count, separate_finish(device, n_split), n_split,
                  rows if decode else m)


@functools.cache
def _no_workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # The partials and counters a launch without split-K is given (one float32, one int32).
    return torch.zeros(1, dtype=torch.float32, device=device), torch.zeros(1, dtype=torch.int32, device=device)


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


if triton is not None:

    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def start_sum(SEPARATE: tl.constexpr):
        """First thing in a kernel with a separate finish: let :func:`sum_splits`' launch start."""
        if SEPARATE:
            gdc_launch_dependents()

    @triton.jit
    def block_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """A tensor-core program's block on the grid (blocks of N, blocks of M, splits of K): its three
        program ids, its rows of x and outputs, and which of them exist."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        return pid_n, pid_m, pid_k, offs_m, offs_n, offs_m < M, offs_n < N

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
    return split > 1 and split >= SEPARATE_MIN_SPLIT and _capability(device) >= (9, 0)


def sum_splits(part: torch.Tensor, y: torch.Tensor, n_split: int, rows: int) -> None:
    """The separate finish: ``y`` [M, N] (row stride free) from ``part``, the partials of the launch
    just before it on the stream, whose blocks hold ``rows`` rows of x; a programmatic dependent
    launch (see the module docstring)."""
    require_triton()
    m, n = y.shape
    _sum_splits_kernel[(-(-m * n // SUM_BLOCK),)](part, y, m, n, y.stride(0), n_split, rows, BLOCK=SUM_BLOCK,
                                                  num_warps=4, launch_pdl=True)
