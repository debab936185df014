"""llmc's low-bit GEMM kernels: references, launch heuristics, and (where possible) the kernels.

On a CPU-only host (CI) the torch references and the heuristics are tested; with Triton the
kernels are compiled for sm_80 and sm_90 without a GPU; with a CUDA GPU they run against the
references. The full check and timing on every benchmarked shape is benchmarks/kernels.py.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from llmc.passes.fpx import FORMATS, fpx_quantize
from llmc.passes.quantize_rtn import rtn_quantize
from llmc.plugins import fp6_linear as fp
from llmc.plugins import intn_linear as intn
from llmc.plugins import mma_decode, splitk, wgmma_prefill
from llmc.plugins.splitk import choose_split

SMS = 132


def weight(out_features=96, in_features=256, seed=0):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 32), (4, False, 64), (8, True, -1), (2, False, 32),
                                                  (3, True, 64), (3, False, 32)])
def test_int_reference_is_the_packed_weight_with_float16_scales(bits, symmetric, group):
    packed = rtn_quantize(weight(), bits, group, symmetric)
    w = intn.pack_intn(packed)
    assert w.scale.dtype == torch.float16 and w.scale.shape == (256 // packed.group_size, 96)
    expected = packed.dequantize()
    restored = intn.intn_dequantize_reference(w)
    # Only the scales' rounding to float16 separates them (2^-11 relative).
    assert float((restored - expected).norm() / expected.norm()) < 1e-3
    x = torch.randn(3, 256, dtype=torch.float16, generator=torch.Generator().manual_seed(1))
    y = intn.intn_reference(x, w)
    assert y.dtype == torch.float16 and y.shape == (3, 96)


@pytest.mark.parametrize("name,group", [("e3m2", None), ("e3m2", 32), ("e2m3", 64), ("e2m1", None)])
def test_fp_reference_is_exactly_the_quantized_weight(name, group):
    q = fpx_quantize(weight(), FORMATS[name], group, scale_dtype=torch.float16)
    w = fp.pack_fpx(q)
    assert w.tile == (16 if FORMATS[name].bits == 6 else 8)
    assert torch.equal(fp.fpx_dequantize_reference(w), q.dequantize())
    assert w.nbytes == 96 * 256 * FORMATS[name].bits // 8 + w.scale.numel() * 2


def test_pack_fpx_declines_formats_without_a_kernel():
    with pytest.raises(ValueError, match="no kernel for e4m3"):
        fp.pack_fpx(fpx_quantize(weight(), FORMATS["e4m3"]))


@pytest.mark.parametrize("word_rows,block,blocks,wanted", [(72, 8, 3, 1056), (1024, 16, 28, 1056), (512, 4, 16, 264),
                                                           (9, 16, 1, 8), (130, 4, 1, 1)])
def test_splits_cover_every_row_in_whole_blocks(word_rows, block, blocks, wanted):
    split = choose_split(blocks, word_rows, block, wanted)
    assert split.rows_per_split % block == 0
    assert split.split * split.rows_per_split >= word_rows > (split.split - 1) * split.rows_per_split


def weights_of(in_features, out_features, bits=4):
    """int-N weights of a shape, zeros (for the launch heuristics)."""
    words = in_features * bits // 32
    groups = in_features // 128
    return intn.IntNWeights((torch.zeros(words, out_features, dtype=torch.int32),), torch.zeros(groups, out_features),
                            torch.zeros(groups, out_features), bits, 128, True, in_features, out_features)


def fp6_of(k, n):
    return fp.FpxWeights((torch.zeros(k // 8, n, dtype=torch.int32), torch.zeros(k // 16, n, dtype=torch.int32)),
                         torch.zeros(1, n), FORMATS["e3m2"], k, 16, k, n)


def test_launch_heuristics_by_rows_and_size():
    small = intn.pack_intn(rtn_quantize(weight(576, 576), 4, 64, True))
    config = intn.intn_config(1, small, SMS)
    assert (config.block_m, config.block_n, config.num_warps, config.prefetch, config.inline_zero) == (1, 16, 8, True, True)
    assert config.split.split == 1  # 72 rows of words: one step of 128 rows, no split-K
    # Without the zero point in the hot loop, decode splits hold whole groups (the pass after
    # the loop works per group).
    split = intn.intn_config(1, small, SMS, decode=(64, 4, 2, 8, True, False)).split
    assert split.rows_per_split % (64 // 8) == 0 and split.split > 1
    assert intn.intn_config(16, weights_of(4096, 4096), SMS).block_m == 16
    assert intn.intn_config(17, small, SMS).block_m == 64  # int4 prefill kernel (rule 8)
    assert intn.intn_config(65, small, SMS) is None  # dequantize, then cuBLAS
    fp6 = fp.pack_fpx(fpx_quantize(weight(576, 576), FORMATS["e3m2"], None, scale_dtype=torch.float16))
    assert fp.fpx_config(1, fp6, SMS).block_n == 16 and fp.fpx_config(100, fp6, SMS) is None
    # From 2^23 weights one row reads all of K per program, no split-K: 16 outputs x 512 rows of
    # words with at most 32 outputs per SM (7B down: 4096 outputs, 31 per SM), else 32 x 64.
    down = intn.IntNWeights((torch.zeros(1376, 4096, dtype=torch.int32),), torch.zeros(86, 4096),
                            torch.zeros(86, 4096), 4, 128, True, 11008, 4096)
    config = intn.intn_config(1, down, SMS)
    assert (config.block_n, config.block_w, config.num_warps, config.split.split) == (16, 512, 8, 1)
    assert intn.intn_config(1, down, 100).block_n == 32  # 41 outputs per SM on a 100-SM GPU
    up = intn.IntNWeights((torch.zeros(512, 11008, dtype=torch.int32),), torch.zeros(32, 11008),
                          torch.zeros(32, 11008), 4, 128, True, 4096, 11008)
    config = intn.intn_config(1, up, SMS)
    assert (config.block_n, config.block_w, config.num_warps, config.split.split) == (32, 64, 8, 1)
    shapes, wide, narrow = intn.DECODE_SHAPES, intn.DECODE_SHAPE_WIDE, intn.DECODE_SHAPE_NARROW
    assert intn.one_row_shape(8192, 28672, SMS, shapes, wide, narrow) == wide
    large = intn.DECODE_SHAPE_LARGE  # from 2^27 weights, split-K again
    assert intn.one_row_shape(8192, 28672, SMS, shapes, wide, narrow, large) == large[1]
    assert intn.one_row_shape(4096, 11008, SMS, shapes, wide, narrow, large) == wide
    assert intn.one_row_shape(4096, 4096, SMS, shapes, wide, narrow) == narrow
    assert intn.one_row_shape(8960, 1536, SMS, shapes, wide, narrow) == narrow
    assert intn.one_row_shape(5120, 5120, SMS, shapes, wide, narrow) == wide  # 39 outputs per SM
    assert intn.one_row_shape(1536, 1536, SMS, shapes, wide, narrow) == intn.decode_shape(1536 * 1536, shapes)
    # Below 2^23 weights, int4/int8 with K up to 3072: no split-K, 16 outputs per program (32 from
    # 2^21 weights); longer K, the size class's split-K launch.
    short = intn.DECODE_SHAPES_SHORT
    assert intn.one_row_shape(2048, 2048, SMS, shapes, wide, narrow, short=short) == short[1][1]
    assert intn.one_row_shape(2048, 512, SMS, shapes, wide, narrow, short=short) == short[0][1]
    assert intn.one_row_shape(3072, 3072, SMS, shapes, wide, narrow, short=short) == narrow  # 2^23.2 weights
    assert intn.one_row_shape(4864, 896, SMS, shapes, wide, narrow, short=short) == intn.decode_shape(4864 * 896, shapes)
    assert intn.intn_config(1, intn.IntNWeights((torch.zeros(608, 896, dtype=torch.int32),), torch.zeros(38, 896),
                                                torch.zeros(38, 896), 4, 128, True, 4864, 896), SMS).split.split > 1
    # FP6: the same from 2^23 weights, but split-K again from 2^26 (the large launch).
    config = fp.fpx_config(1, fp6_of(4096, 11008), SMS)
    assert (config.block_n, config.block_w, config.split.split) == fp.DECODE_SHAPE_WIDE_FP6[:2] + (1,)
    config = fp.fpx_config(1, fp6_of(4096, 4096), SMS)
    assert (config.block_n, config.block_w, config.split.split) == fp.DECODE_SHAPE_NARROW_FP6[:2] + (1,)
    config = fp.fpx_config(1, fp6_of(8192, 28672), SMS)
    assert (config.block_n, config.block_w) == fp.DECODE_SHAPE_LARGE_FP6[1][:2] and config.split.split > 1


def test_int3_launches_by_rows_and_size():
    """int3 (int3_linear): one row the decode kernel; two rows, and up to four below 2^21 weights, once per row;
    the rest up to 64 rows rule 4's joined-operand kernel (float16 x and scales), beyond dequantize-then-cuBLAS.
    Without float16, up to 16 rows: four rows of x per decode program below 2^23 weights where the outputs are
    at least the inputs (up to 8 rows; 16 below 2^21), else rule 2's tensor cores. Steps count tiles of 32
    inputs; decode splits hold whole steps, not whole groups (the zero point is in the loop)."""
    from llmc.plugins import int3_linear

    def int3_of(k, n):
        return intn.IntNWeights((torch.zeros(k // 16, n, dtype=torch.int32), torch.zeros(k // 32, n, dtype=torch.int32)),
                                torch.zeros(k // 128, n), torch.zeros(k // 128, n), 3, 128, True, k, n)

    def kernel(m, w, halves=True):
        config = int3_linear.int3_config(m, w, SMS, halves=halves)
        return None if config is None else f"joined{config.block_m}" if config.joined else \
            "tc" if config.block_m == 16 else config.rows

    small, narrow, wide, large = int3_of(576, 1536), int3_of(1536, 576), int3_of(896, 4864), int3_of(4096, 4096)
    assert [kernel(m, small) for m in (1, 2, 4, 5, 16, 17, 64, 65)] == [1, 1, 1, "joined16", "joined16", "joined64",
                                                                       "joined64", None]
    assert [kernel(m, large) for m in (1, 2, 3, 16)] == [1, 1, "joined16", "joined16"]
    assert [kernel(m, small, False) for m in (4, 5, 16, 17)] == [1, 4, 4, None]
    assert [kernel(m, narrow, False) for m in (5, 16)] == ["tc", "tc"]
    assert [kernel(m, wide, False) for m in (3, 8, 9)] == [4, 4, "tc"]
    assert intn.intn_config(16, large, SMS) == int3_linear.int3_config(16, large, SMS)
    joined = int3_linear.int3_config(16, large, SMS)
    assert joined.block_w == int3_linear.PREFILL_SHAPE[1] and joined.split.split * joined.split.rows_per_split >= 128
    config = intn.intn_config(1, large, SMS)
    assert config.inline_zero and config.split.split * config.split.rows_per_split >= 4096 // 32
    forced = intn.intn_config(1, small, SMS, decode=(16, 4, 2, 8, True, True, False))
    assert forced.split.split > 1 and forced.split.rows_per_split % 4 == 0
    assert intn.intn_config(5, small, SMS, decode=(16, 4, 2, 8, True, True, False, 8)).rows == 8


def test_prefill_rows_take_the_prefill_kernel_up_to_its_bounds():
    # Rule 8 from 17 rows: int2/int4 up to 128 rows from 2^25 weights and 64 below; int8 up to 64
    # rows from 2^24 weights only. Blocks of 64 rows of x up to 64 rows, 128 beyond, 64 inputs per
    # step; split-K to about two programs per SM. From 2^25 weights, int4 at 17-32 rows takes the
    # 2-16 row tensor-core kernel (blocks of 16 rows) instead.
    large, small = weights_of(11008, 4096), weights_of(4096, 4096)
    assert intn.intn_config(17, large, SMS) == intn.intn_config(intn.TENSOR_CORE_PREFILL_ROWS, large, SMS) \
        == intn.intn_config(16, large, SMS)
    for rows, block_m in ((intn.TENSOR_CORE_PREFILL_ROWS + 1, 64), (64, 64), (65, 128), (128, 128)):
        config = intn.intn_config(rows, large, SMS)
        assert (config.block_m, config.block_n, config.block_w) == (block_m, 64, 8), rows
        blocks = -(-rows // block_m) * (4096 // 64)
        assert blocks * config.split.split >= intn.PREFILL_PROGRAMS_PER_SM * SMS > blocks * (config.split.split - 1)
    assert intn.intn_config(129, large, SMS) is None
    assert intn.intn_config(17, small, SMS).block_m == intn.intn_config(64, small, SMS).block_m == 64
    assert intn.intn_config(65, small, SMS) is None
    assert intn.intn_config(64, weights_of(8192, 28672), SMS).split.split == 1  # 448 blocks
    # int2: no tensor-core detour; int8: 16 rows of words (64 inputs) per step, from 2^24 weights.
    assert intn.intn_config(17, weights_of(11008, 4096, bits=2), SMS).block_w == 4
    assert intn.intn_config(128, weights_of(11008, 4096, bits=2), SMS).block_m == 128
    assert intn.intn_config(17, weights_of(4096, 4096, bits=8), SMS).block_w == 16
    assert intn.intn_config(65, weights_of(11008, 4096, bits=8), SMS) is None
    assert intn.intn_config(17, weights_of(4096, 2048, bits=8), SMS) is None
    # FP6 (fp6_linear rule 7): 64 rows, 128 from 2^25 weights, 4 rows of the 2-bit plane per step.
    assert fp.fpx_config(17, fp6_of(4096, 4096), SMS).block_w == 4
    assert fp.fpx_config(64, fp6_of(4096, 4096), SMS).block_m == 64 and fp.fpx_config(65, fp6_of(4096, 4096), SMS) is None
    assert fp.fpx_config(128, fp6_of(11008, 4096), SMS).block_m == 128 and fp.fpx_config(129, fp6_of(11008, 4096), SMS) is None


def test_tensor_core_launch_options_round_3():
    # 2-16 rows: the optional fields (evict-first, swap, num_stages) reach the config; below 2^23
    # weights int-N and FP6 take 64 outputs x 16 rows, 2 stages (round 11; FP6 below 2^21 only with
    # at least half as many programs as SMs).
    config = fp.fpx_config(16, fp6_of(4096, 2048), SMS)
    assert (config.block_m, config.block_n, config.num_stages, config.evict_first, config.swap) == (16, 64, 2, False, False)
    config = fp.fpx_config(4, fp6_of(4096, 2048), SMS, tensor_cores=(128, 16, 4, 4, True, True, 2))
    assert (config.block_n, config.num_stages, config.evict_first, config.swap) == (128, 2, True, True)
    assert fp.fpx_config(16, fp6_of(4096, 2048), SMS, tensor_cores=(64, 16, 4, 4)).num_stages == 3
    config = intn.intn_config(8, weights_of(896, 4864), SMS)  # wide, 2^22 weights: no split-K (round 10)
    assert (config.block_n, config.split.split, config.num_stages) == (64, 1, 3)
    assert intn.intn_config(16, weights_of(2048, 2048), SMS).split.split > 1
    for k, n in ((1536, 768), (576, 1536), (4864, 896)):
        config = intn.intn_config(16, weights_of(k, n), SMS)
        assert (config.block_m, config.block_n, config.block_w, config.num_stages) == (16, 64, 16, 2)
    assert intn.intn_config(16, weights_of(4096, 4096), SMS).block_n == 128
    assert fp.fpx_config(16, fp6_of(4864, 896), SMS).block_n == 64
    assert fp.fpx_config(16, fp6_of(896, 896), SMS).block_n == 32  # below 2^21: 56 programs of 64 outputs
    assert fp.fpx_config(16, fp6_of(576, 1536), SMS).block_n == 64  # 72 programs, at least half the SMs


def test_a_few_rows_run_the_decode_kernel_one_or_several_per_program():
    # One row per program up to 4 rows below 2^21 weights, and below 2^23 for int-N at 3-4 rows with
    # the short launch per row (not on wide linears) and int8 at 2; elsewhere 4 rows per program (2
    # for two rows) up to 4 rows (FP6: 2 from 2^26 weights), and where the outputs are at least the
    # inputs 8 below 2^20 weights and 16 below 2^19 (round 11); the tensor cores from 3 rows on wider
    # linears from 2^23 weights, int-N on every linear from 2^27, and from 5 rows on wide ones from
    # 2^21 (round 10).
    def picks(config_of, weights):
        return [(c.block_m, c.rows) if c.block_m == 1 else "tc" for c in (config_of(m, weights, SMS) for m in (2, 3, 4, 8, 16))]

    assert picks(intn.intn_config, weights_of(576, 576)) == [(1, 1), (1, 1), (1, 1), (1, 4), (1, 4)]
    assert picks(intn.intn_config, weights_of(576, 1536)) == [(1, 1), (1, 1), (1, 1), (1, 4), "tc"]  # 2^19.8
    assert picks(intn.intn_config, weights_of(1536, 576)) == [(1, 1), (1, 1), (1, 1), "tc", "tc"]  # fewer outputs
    assert picks(intn.intn_config, weights_of(4864, 896)) == [(1, 2), (1, 1), (1, 1), "tc", "tc"]
    assert picks(intn.intn_config, weights_of(4864, 896, bits=8))[:3] == [(1, 1), (1, 4), (1, 4)]  # K x bits 38912
    assert picks(intn.intn_config, weights_of(896, 4864)) == [(1, 2), (1, 4), (1, 4), "tc", "tc"]  # 5.4 outputs per input
    assert picks(intn.intn_config, weights_of(4096, 4096)) == [(1, 2), (1, 4), (1, 4), "tc", "tc"]
    assert picks(intn.intn_config, weights_of(8192, 28672)) == [(1, 2), "tc", "tc", "tc", "tc"]
    assert picks(intn.intn_config, weights_of(28672, 8192)) == [(1, 2), "tc", "tc", "tc", "tc"]  # 2^27.8 weights
    assert picks(intn.intn_config, weights_of(14336, 4096)) == [(1, 2), (1, 4), (1, 4), "tc", "tc"]
    assert picks(intn.intn_config, weights_of(4096, 11008)) == [(1, 2), "tc", "tc", "tc", "tc"]  # wider
    asymmetric = dataclasses.replace(weights_of(4096, 11008), symmetric=False)
    assert picks(intn.intn_config, asymmetric) == [(1, 2), "tc", "tc", "tc", "tc"]
    assert picks(intn.intn_config, dataclasses.replace(weights_of(11008, 4096), symmetric=False))[:3] == [(1, 2), (1, 4), (1, 4)]
    assert picks(fp.fpx_config, fp6_of(576, 576)) == [(1, 1), (1, 1), (1, 1), (1, 4), (1, 4)]
    assert picks(fp.fpx_config, fp6_of(4096, 11008)) == [(1, 2), "tc", "tc", "tc", "tc"]
    assert picks(fp.fpx_config, fp6_of(11008, 4096)) == [(1, 2), (1, 4), (1, 4), "tc", "tc"]
    assert picks(fp.fpx_config, fp6_of(8192, 28672)) == [(1, 2), "tc", "tc", "tc", "tc"]
    fp4 = fp.pack_fpx(fpx_quantize(weight(576, 576), FORMATS["e2m1"], None, scale_dtype=torch.float16))
    assert fp.fpx_config(2, fp4, SMS).block_m == 16  # the FP4 decode kernel takes one row only

    # FP4 at 2-16 rows takes FP6's tensor-core table with K in its words of 8 inputs: 64 outputs, 2 stages from
    # 2^21 weights, and below where 64 outputs still give half as many programs as SMs (576x576: 45, 576->1536: 120)
    def fp4_of(k, n):
        return dataclasses.replace(fp6_of(k, n), planes=(torch.zeros(k // 8, n, dtype=torch.int32),),
                                   fmt=FORMATS["e2m1"])

    def tensor_cores(config):
        return config.block_m, config.block_n, config.block_w, config.num_warps, config.num_stages

    assert tensor_cores(fp.fpx_config(4, fp4_of(576, 576), SMS)) == (16, 32, 16, 4, 3)
    assert tensor_cores(fp.fpx_config(16, fp4_of(576, 1536), SMS)) == (16, 64, 16, 4, 2)
    assert tensor_cores(fp.fpx_config(2, fp4_of(896, 4864), SMS)) == (16, 64, 16, 4, 2)
    assert tensor_cores(fp.fpx_config(8, fp4_of(11008, 4096), SMS)) == (16, 128, 16, 4, 2)
    assert tensor_cores(fp.fpx_config(16, fp4_of(8192, 28672), SMS)) == (16, 64, 16, 4, 3)
    # Several rows per program: no split-K; 16 outputs x 128 rows of words (FP6: x 64 rows of the
    # 2-bit plane) where the outputs are at most the inputs and up to 8 rows, 32 x 64 on wider int
    # linears from 2^23 weights, else 16 x 32.
    def launch(config):
        return config.block_n, config.block_w, config.num_warps, config.split.split

    assert launch(intn.intn_config(4, weights_of(4096, 4096), SMS)) == (16, 128, 8, 1)
    assert launch(intn.intn_config(2, weights_of(4096, 11008), SMS)) == (32, 64, 8, 1)
    assert launch(intn.intn_config(4, weights_of(896, 4864), SMS)) == (16, 32, 4, 1)
    assert launch(intn.intn_config(16, weights_of(576, 576), SMS)) == (16, 32, 4, 1)
    assert launch(intn.intn_config(8, weights_of(896, 896), SMS)) == (16, 128, 8, 1)
    assert launch(fp.fpx_config(8, fp6_of(576, 1536), SMS)) == (16, 32, 4, 1)
    assert launch(fp.fpx_config(4, fp6_of(11008, 4096), SMS)) == (16, 64, 8, 1)
    assert launch(fp.fpx_config(4, fp6_of(896, 4864), SMS)) == (16, 32, 4, 1)
    # One row per program: each row takes 16 outputs x 128 rows of words (no split-K; asymmetric
    # weights the short launch of their weight count), also past SHORT_K, up to K x bits = 3072 x 8;
    # beyond, its size class's.
    small = intn.pack_intn(rtn_quantize(weight(576, 576), 4, 64, True))
    assert intn.intn_config(4, small, SMS) == intn.intn_config(1, small, SMS, decode=intn.DECODE_SHAPES_SHORT[0][1])
    assert launch(intn.intn_config(4, weights_of(4864, 896), SMS)) == (16, 128, 8, 1)  # 2^22 weights
    asymmetric = dataclasses.replace(weights_of(4864, 896), symmetric=False)
    assert launch(intn.intn_config(4, asymmetric, SMS)) == (32, 128, 8, 1)  # the short launch of 2^22 weights
    narrow8 = weights_of(8192, 128, bits=8)  # 2^20 weights, K x bits 65536
    assert intn.intn_config(2, narrow8, SMS) == intn.intn_config(1, narrow8, SMS, decode=intn.decode_shape(8192 * 128, intn.DECODE_SHAPES))
    # FP6 below 2^23 weights: the no-split launch at one row where the outputs are at least the
    # inputs, and for each row of a few with K up to 4096; otherwise the size class's.
    fp6 = fp.pack_fpx(fpx_quantize(weight(576, 576), FORMATS["e3m2"], None, scale_dtype=torch.float16))
    no_split = fp.DECODE_SHAPE_NO_SPLIT_FP6
    assert fp.fpx_config(4, fp6, SMS) == fp.fpx_config(1, fp6, SMS) == fp.fpx_config(1, fp6, SMS, decode=no_split)
    assert fp.fp6_one_row_shape(1, 1536, 576, SMS) == intn.decode_shape(1536 * 576, fp.DECODE_SHAPES_FP6)
    assert fp.fp6_one_row_shape(2, 1536, 576, SMS) == fp.fp6_one_row_shape(1, 576, 1536, SMS) == no_split
    assert fp.fp6_one_row_shape(2, 4864, 896, SMS) != no_split
    assert fp.fp6_one_row_shape(1, 4096, 4096, SMS) != no_split  # 2^24 weights


def _run_pair_ptx(asm: str, registers: dict) -> int:
    """$0 after :func:`_run_ptx`."""
    return _run_ptx(asm, registers)["$0"]


def _run_ptx(asm: str, registers: dict) -> dict:
    """Run a PTX block of intn_linear rules 7 and 8 or fp6_linear rule 6 on 32-bit ``registers`` ($1 ...): the
    instructions they use, float16 halves rounded to nearest (numpy's float16 arithmetic); returns
    every register."""
    import numpy as np

    def halves(v):
        return np.array([v & 0xFFFF, v >> 16], dtype=np.uint16).view(np.float16)

    def word(h):
        lo, hi = (int(b) for b in np.asarray(h, dtype=np.float16).view(np.uint16))
        return lo | hi << 16

    regs = dict(registers)
    value = lambda name: regs[name] if name in regs else int(name, 0)
    for statement in asm.strip()[1:-1].split(";"):
        op, _, args = statement.strip().partition(" ")
        if not op or op == ".reg":
            continue
        vector = re.fullmatch(r"\{(\S+), (\S+)\}, (\S+)|(\S+), \{(\S+), (\S+)\}", args.strip())
        if op == "mov.b32" and vector:  # a 32-bit register to or from two 16-bit halves, low first
            lo, hi, whole, dest, lo2, hi2 = vector.groups()
            if whole:
                regs[lo], regs[hi] = value(whole) & 0xFFFF, value(whole) >> 16
            else:
                regs[dest] = value(lo2) | value(hi2) << 16
            continue
        d, *a = [x.strip() for x in args.split(",")]
        a = [value(x) for x in a]
        if op == "prmt.b32":
            source = a[0] | a[1] << 32
            regs[d] = sum(((source >> (8 * ((a[2] >> 4 * k) & 7))) & 0xFF) << 8 * k for k in range(4))
        elif op == "shr.b32":
            regs[d] = a[0] >> a[1]
        elif op == "shl.b32":
            regs[d] = (a[0] << a[1]) & 0xFFFFFFFF
        elif op == "and.b32":
            regs[d] = a[0] & a[1]
        elif op == "lop3.b32":  # bit k of the result: bit (4 a + 2 b + c) of the lookup table
            regs[d] = sum(((a[3] >> (4 * (a[0] >> k & 1) + 2 * (a[1] >> k & 1) + (a[2] >> k & 1))) & 1) << k
                          for k in range(32))
        elif op == "shf.l.wrap.b32":  # the top word of {b, a} << (c mod 32): a rotation when a == b
            regs[d] = ((a[1] << 32 | a[0]) << (a[2] % 32) >> 32) & 0xFFFFFFFF
        elif op == "mov.b32":
            regs[d] = a[0]
        elif op == "fma.rn.f16x2":  # exact here: small integers and powers of 2
            regs[d] = word((halves(a[0]).astype(np.float32) * halves(a[1]) + halves(a[2])).astype(np.float16))
        else:
            fn = {"add.f16x2": np.add, "sub.f16x2": np.subtract, "mul.f16x2": np.multiply}[op]
            regs[d] = word(fn(halves(a[0]), halves(a[1])))
    return regs


@pytest.mark.parametrize("width", intn.KERNEL_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_float16_pair_decode_is_rule_2_bit_for_bit(width, symmetric):
    # Rule 7's PTX, run instruction by instruction: every code of every field of two words, with
    # their scales and zero points, gives float16((u - zero) * scale) in the halves, element 0 low.
    import numpy as np

    gen = np.random.default_rng(width)
    fields, codes = 32 // width, 1 << width
    for i in range(fields):
        asm = intn._PAIR_ASM[32 * width + 16 * symmetric + i]
        assert asm == intn._pair_decode_asm(width, i, symmetric)
        u = np.stack(np.meshgrid(np.arange(codes), np.arange(codes)), -1).reshape(-1, 2)[:64]
        for u0, u1 in u:
            noise = [int(v) & ~((codes - 1) << (width * i)) for v in gen.integers(0, 2**32, 2, dtype=np.uint64)]
            w0, w1 = noise[0] | int(u0) << (width * i), noise[1] | int(u1) << (width * i)
            scale = gen.uniform(1e-4, 0.05, 2).astype(np.float16)
            zero = (np.full(2, codes // 2) if symmetric else gen.integers(0, codes, 2)).astype(np.float16)
            registers = {"$1": w0, "$2": w1, "$3": int(scale.view(np.uint32)[0]), "$4": int(zero.view(np.uint32)[0])}
            out = _run_pair_ptx(asm, registers)
            expected = ((np.array([u0, u1], np.float32) - zero.astype(np.float32)) * scale.astype(np.float32)).astype(np.float16)
            assert [out & 0xFFFF, out >> 16] == [int(v) for v in expected.view(np.uint16)], (i, u0, u1)


@pytest.mark.parametrize("width", intn.KERNEL_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_word_decode_is_rule_2_bit_for_bit(width, symmetric):
    # Rule 8's PTX, run instruction by instruction: all F fields of a word, every code in every
    # field, give float16((u - zero) * scale) in $0 .. $(F-1).
    import numpy as np

    gen = np.random.default_rng(width + int(symmetric))
    fields, codes = 32 // width, 1 << width
    asm = intn._WORD_ASM[2 * width + int(symmetric)]
    assert asm == intn._word_decode_asm(width, symmetric)
    for trial in range(max(64, codes)):
        u = (np.arange(fields) + trial) % codes if trial < codes else gen.integers(0, codes, fields)
        word = sum(int(code) << (width * i) for i, code in enumerate(u))
        scale = np.float16(gen.uniform(1e-4, 0.05))
        zero = np.float16(codes // 2 if symmetric else gen.integers(0, codes))
        registers = {f"${fields}": word, f"${fields + 1}": int(scale.view(np.uint16)),
                     f"${fields + 2}": int(zero.view(np.uint16))}
        out = _run_ptx(asm, registers)
        expected = ((u.astype(np.float32) - np.float32(zero)) * np.float32(scale)).astype(np.float16)
        assert [out[f"${i}"] for i in range(fields)] == [int(v) for v in expected.view(np.uint16)], (trial, u)


@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int3_word_decode_is_the_reference_bit_for_bit(parity, symmetric):
    # int3_linear rule 4's PTX, run instruction by instruction: the 16 fields of a 2-bit plane word (the even or
    # odd inputs of a tile, bitplanes rule 3) with their high bits from the tile's 1-bit word give
    # float16((u - zero) * scale), field i (input 2 i + parity) in $i; every code in every field.
    import numpy as np

    from llmc.passes.bitplanes import pack_int_codes
    from llmc.plugins import int3_linear

    gen = np.random.default_rng(parity + 2 * int(symmetric))
    asm = int3_linear._WORD_ASM[2 * parity + int(symmetric)]
    assert asm == int3_linear._word_decode_asm(parity, symmetric)
    for trial in range(64):
        codes = (np.arange(32) + trial) % 8 if trial < 8 else gen.integers(0, 8, 32)
        low, high = (int(p[parity if p.shape[0] == 2 else 0, 0]) & 0xFFFFFFFF
                     for p in pack_int_codes(torch.as_tensor(codes)[None, :], 3, 32))
        scale = np.float16(gen.uniform(1e-4, 0.05))
        zero = np.float16(4 if symmetric else gen.integers(0, 8))
        out = _run_ptx(asm, {"$16": low, "$17": high, "$18": int(scale.view(np.uint16)), "$19": int(zero.view(np.uint16))})
        expected = ((codes[parity::2].astype(np.float32) - np.float32(zero)) * np.float32(scale)).astype(np.float16)
        assert [out[f"${i}"] for i in range(16)] == [int(v) for v in expected.view(np.uint16)], (trial, codes)


@pytest.mark.parametrize("name", ["e3m2", "e2m3"])
def test_fp6_float16_pair_decode_is_rule_3_bit_for_bit(name):
    # fp6_linear rule 6's PTX, run instruction by instruction on random plane words (every code
    # occurs in every field), against rule 1's float32 bits times 2^(127 - bias) times the scale,
    # rounded to float16 once: bit for bit in each half, element 0 low.
    import numpy as np

    fmt = FORMATS[name]
    m = fmt.mantissa_bits
    gen = np.random.default_rng(m)

    def rule_1(high, low, i, half):  # fp6_linear._fp6_bits on uint32 words
        top = ((high << (24 - m - 4 * i)) if 24 - m - 4 * i >= 0 else (high >> (4 * i + m - 24))) & (0xF << (24 - m))
        f = 2 * i + half
        p = 4 * (f // 2) + f % 2 if m == 2 else 2 * f
        r = (23 - m - p) % 32
        rotated = ((low << r) | (low >> (32 - r))) & 0xFFFFFFFF if r else low
        return np.uint32((top & 0xFFFFFFFF) | (rotated & (1 << 31 | 1 << (23 - m)))).view(np.float32)

    for i in range(8):
        for half in (0, 1):
            asm = fp._FP6_PAIR_ASM[32 * (m - 2) + 16 * half + i]
            assert asm == fp._fp6_pair_decode_asm(m, fmt.bias, i, half)
            for _ in range(256):
                high, low = gen.integers(0, 2**32, (2, 2), dtype=np.uint64).tolist()
                scale = gen.uniform(1e-4, 2.0, 2).astype(np.float16)
                out = _run_pair_ptx(asm, {"$1": high[0], "$2": high[1], "$3": low[0], "$4": low[1],
                                          "$5": int(scale.view(np.uint32)[0])})
                expected = np.array([rule_1(high[e], low[e], i, half) * np.float32(2.0 ** (127 - fmt.bias))
                                     * np.float32(scale[e]) for e in (0, 1)], np.float32).astype(np.float16)
                assert [out & 0xFFFF, out >> 16] == [int(v) for v in expected.view(np.uint16)], (i, half, high, low)


def test_hopper_prefill_rule_and_launch():
    """Rule 9 (wgmma_prefill): int4 and int2 from 2^24 weights up to 256 rows, 512 from 2^25; int8 and FP6
    up to 128 rows; blocks of 64 rows of x up to 64 rows, else 128; splits of K up to two programs per SM,
    rounded down."""
    assert wgmma_prefill.wgmma_config(100, 4, 4096, 2048, SMS) is None  # 2^23 weights
    assert wgmma_prefill.wgmma_config(256, 4, 4096, 4096, SMS) and not wgmma_prefill.wgmma_config(257, 4, 4096, 4096, SMS)
    assert wgmma_prefill.wgmma_config(512, 2, 4096, 11008, SMS) and not wgmma_prefill.wgmma_config(513, 4, 4096, 11008, SMS)
    assert wgmma_prefill.wgmma_config(128, 8, 4096, 4096, SMS) and not wgmma_prefill.wgmma_config(129, 8, 8192, 28672, SMS)
    fp6 = wgmma_prefill.wgmma_config(100, 6, 4096, 4096, SMS)  # FP6: rows of the 2-bit plane, 16 inputs each
    assert fp6.block_w == 4 and fp6.split.rows_per_split * fp6.split.split >= 4096 // 16
    assert wgmma_prefill.wgmma_config(129, 6, 8192, 28672, SMS) is None  # FP6 up to 128 rows
    assert wgmma_prefill.wgmma_config(100, 4, 4096, 4098, SMS) is None  # TMA needs rows of 16-byte multiples
    config = wgmma_prefill.wgmma_config(64, 4, 4096, 11008, SMS)
    assert (config.block_m, config.block_n, config.block_w, config.split.split) == (64, 128, 8, 3)  # 86 blocks
    assert wgmma_prefill.wgmma_config(256, 4, 4096, 11008, SMS).split.split == 1  # 172 blocks
    down = wgmma_prefill.wgmma_config(300, 4, 11008, 4096, SMS)  # 96 blocks: 2 splits of 86 steps
    assert (down.block_m, down.split.split, down.split.rows_per_split) == (128, 2, 86 * 8)


def test_mma_decode_rule_and_launch():
    """Rule 10 (mma_decode) on int4 with float16 scales in groups of 32, 64, a multiple of 128 or one per output:
    one row from 2^22 weights where the outputs are at least twice the inputs (symmetric: or the inputs twice the
    outputs), symmetric at 2 rows from 2^22 weights, 3-7 from 2^19 and 8-16 everywhere, asymmetric at 2 rows from 2^22,
    3 from 2^19, 4-8 everywhere and 9-16 below 2^24 or where the launch needs no masks, symmetric below 2^20
    weights with fewer outputs than inputs from 8 rows; K
    split for one iteration a warp as far as the warps stay resident (registers: 24 warps per SM with masked loads,
    28 in programs of up to 4 warps without, 16 with two B tiles or zero points), over warps up to 8, then over
    programs; a masked split grows to fill the resident warps where that shortens the loop, and a split that
    leaves SMs idle runs in programs of 4 warps."""
    def int4(k, n, group=128, bits=4, scale=torch.float16, symmetric=True):
        w = weights_of(k, n, bits)
        return dataclasses.replace(w, scale=w.scale.to(scale), group_size=group, symmetric=symmetric)

    big = int4(4096, 11008)
    assert mma_decode.mma_config(17, big, SMS) is None
    assert mma_decode.mma_config(1, big, SMS) == mma_decode.mma_config(8, big, SMS) == mma_decode.MmaLaunch(
        8, 1, 512, 64, 4)  # 32 iterations over 8 warps: 344 blocks x 16 would pass 24 warps per SM
    assert mma_decode.mma_config(16, big, SMS) == mma_decode.MmaLaunch(4, 1, 512, 128, 8)  # 16 warps per SM
    assert mma_decode.mma_config(2, int4(4096, 4096), SMS) == mma_decode.MmaLaunch(8, 2, 256, 32, 2)
    assert mma_decode.mma_config(1, int4(896, 4864), SMS) and mma_decode.mma_config(1, int4(2048, 4095), SMS) is None
    assert mma_decode.mma_config(1, int4(4096, 4096), SMS) is None and mma_decode.mma_config(1, int4(1024, 4096), SMS)
    assert mma_decode.mma_config(1, int4(960, 4096), SMS) is None  # one row from 2^22 weights
    assert mma_decode.mma_config(2, int4(576, 1536), SMS) is None and mma_decode.mma_config(3, int4(576, 1536), SMS)
    assert mma_decode.mma_config(7, int4(576, 576), SMS) is None and mma_decode.mma_config(8, int4(576, 576), SMS)
    # below 2^20 weights with fewer outputs than inputs: symmetric from 8 rows, asymmetric as its rule
    assert mma_decode.mma_config(7, int4(1536, 576), SMS) is None and mma_decode.mma_config(8, int4(1536, 576), SMS)
    assert mma_decode.mma_config(3, int4(1536, 576, 32, symmetric=False), SMS)
    # one row: symmetric where the inputs are at least twice the outputs too, asymmetric only the outputs
    assert mma_decode.mma_config(1, int4(4864, 896), SMS) and mma_decode.mma_config(1, int4(11008, 4096), SMS)
    assert mma_decode.mma_config(1, int4(11008, 4096, symmetric=False), SMS) is None
    assert mma_decode.mma_config(1, int4(8192, 4097), SMS) is None
    for group, taken in ((32, True), (64, True), (96, False), (256, True), (4096, True)):
        assert (mma_decode.mma_config(4, int4(4096, 4096, group), SMS) is not None) == taken, group
    assert not mma_decode.takes(int4(4096, 4096, 96))
    asym = int4(896, 4864, 32, symmetric=False)
    assert mma_decode.mma_config(17, asym, SMS) is None
    assert all(mma_decode.mma_config(m, asym, SMS) for m in (1, 2, 8, 9, 16))
    assert mma_decode.mma_config(1, int4(4864, 896, 32, symmetric=False), SMS) is None
    small = int4(576, 576, 32, symmetric=False)
    assert mma_decode.mma_config(3, small, SMS) is None and mma_decode.mma_config(4, small, SMS)
    # zero points in groups of 32 at 9-16 rows: with 168-176 registers a thread (Triton 3.6, as timed; 3.9 compiles
    # 239-244), 12 warps per SM in programs of 4, 8 in programs of 8: K split 3 ways in programs of 4 (8 x 2 would
    # take two waves)
    asym32 = mma_decode.kernel_of(int4(896, 4864, 32, symmetric=False))
    as_timed = (mma_decode._registers(asym32, 1, 8, False), mma_decode._registers(asym32, 2, 4, False)) == (126, 168)
    if as_timed:
        assert mma_decode.mma_config(9, int4(11008, 4096, 32, symmetric=False), SMS) == mma_decode.MmaLaunch(
            4, 3, 464, 128, 8)
    assert mma_decode.mma_config(9, int4(4096, 4096, symmetric=False), SMS)  # or without masks (8 x 2)
    assert mma_decode.mma_config(16, int4(4096, 11008, symmetric=False), SMS) == mma_decode.MmaLaunch(4, 1, 512, 128, 8)
    if as_timed:  # zero points at one B tile, 126 registers: 16 warps per SM, so 16 ways (32 would be 4096 warps)
        assert mma_decode.mma_config(4, int4(11008, 4096, 32, symmetric=False), SMS) == mma_decode.MmaLaunch(
            8, 2, 688, 96, 6)
    assert mma_decode.mma_config(4, int4(4096, 4096, bits=8), SMS) is None
    assert mma_decode.mma_config(4, int4(4096, 4096, scale=torch.float32), SMS) is None
    G128 = mma_decode.kernel_of(int4(4096, 4096))
    # 86 iterations, 128 blocks: 8 x 2 (masked) grows to 4 x 6 (24 warps per SM), 6 iterations a warp to 4
    assert mma_decode.mma_launch(1, 11008, 4096, SMS, G128) == mma_decode.MmaLaunch(4, 6, 240, 64, 4)
    assert mma_decode.mma_launch(1, 14336, 4096, SMS, G128) == mma_decode.MmaLaunch(8, 2, 896, 112, 7)  # unmasked: kept
    assert mma_decode.mma_launch(9, 11008, 4096, SMS, G128) == mma_decode.MmaLaunch(8, 2, 688, 96, 6)  # 4 x 4: no shorter
    assert mma_decode.mma_launch(4, 8192, 28672, SMS, G128) == mma_decode.MmaLaunch(4, 1, 1024, 256, 16)  # 896 x 4 <= 28 x 132
    assert mma_decode.mma_launch(9, 8192, 28672, SMS, G128) == mma_decode.MmaLaunch(2, 1, 1024, 512, 32)  # 16 warps per SM
    assert mma_decode.mma_launch(8, 896, 4864, SMS, G128) == mma_decode.MmaLaunch(8, 1, 112, 16, 1)  # 7 iterations
    assert mma_decode.mma_launch(16, 4864, 896, SMS, G128) == mma_decode.MmaLaunch(8, 8, 80, 16, 1)  # 38 iterations
    assert mma_decode.mma_launch(1, 1536, 576, SMS, G128) == mma_decode.MmaLaunch(4, 4, 48, 16, 1)  # 18 x 2 programs of 8
    assert mma_decode.mma_launch(4, 1536, 8960, SMS, G128) == mma_decode.MmaLaunch(8, 1, 192, 32, 2)  # 12 iterations
    assert mma_decode.mma_launch(16, 1536, 8960, SMS, G128) == mma_decode.MmaLaunch(4, 1, 192, 48, 3)  # 280 blocks
    # 108 iterations, 160 blocks, masked at 8 x 1 (14 iterations a warp): K split 3 ways in programs of 4 (9)
    assert mma_decode.mma_launch(16, 13824, 5120, SMS, G128) == mma_decode.MmaLaunch(4, 3, 576, 144, 9)
    # a split that saves one iteration a warp does not buy back its sum: 1536->8960 stays 8 x 1
    assert mma_decode.mma_launch(1, 1536, 8960, SMS, G128).split == 1
    # one iteration a warp without a split may take two waves (zero points in groups of 32: 8 warps per SM)
    assert mma_decode.mma_launch(16, 896, 4864, SMS, asym32) == mma_decode.MmaLaunch(8, 1, 112, 16, 1)
    # the halving leaves 4 x 1 without masks at 27 iterations a warp: K split 3 ways cuts it to 9 (4 x 2, 14, would not)
    if as_timed:
        assert mma_decode.mma_launch(16, 13824, 5120, SMS, asym32) == mma_decode.MmaLaunch(4, 3, 576, 144, 9)
    assert mma_decode.mma_launch(1, 5120, 13824, SMS, G128).split == 1  # 10 iterations to 5: kept
    # the resident warps come from the compiled kernel's registers: two B tiles with zero points take more
    launch = mma_decode.MmaLaunch(8, 2, 688, 96, 6)
    assert (mma_decode._resident(launch, 2, asym32, 11008, 4096) < mma_decode._resident(launch, 2, G128, 11008, 4096)
            <= mma_decode._resident(launch, 1, G128, 11008, 4096))
    for m, k, n in ((1, 576, 576), (16, 1056, 300), (4, 4864, 896), (1, 14336, 4096), (2, 256, 4096)):
        launch = mma_decode.mma_launch(m, k, n, SMS, G128)
        assert launch.split * launch.rows_per_split >= k // 8 > (launch.split - 1) * launch.rows_per_split
        assert launch.warps * launch.rows_per_warp >= launch.rows_per_split
        assert launch.rows_per_warp == 16 * launch.iterations and launch.rows_per_split % 16 == 0
        assert -(-n // 32) * launch.warps * launch.split <= max(2, 28 * SMS)


def test_mma_decode_fp6_rule():
    """Rule 10 for FP6 (fp6_linear rule 8): float16 scales per output or in groups of a multiple of 64, 1-16
    rows, at the int4 launch."""
    def fp6(k, n, group=None, scale=torch.float16, name="e3m2", tile=16):
        w = fp6_of(k, n)
        return dataclasses.replace(w, scale=torch.zeros(k // (group or k), n, dtype=scale), group_size=group or k,
                                   fmt=FORMATS[name], tile=tile)

    kernel = mma_decode.kernel_of(fp6(4096, 11008))
    assert mma_decode.mma_config(1, fp6(4096, 11008), SMS) == mma_decode.mma_launch(1, 4096, 11008, SMS, kernel)
    assert mma_decode.mma_config(16, fp6(4096, 11008), SMS) == mma_decode.mma_launch(16, 4096, 11008, SMS, kernel)
    assert mma_decode.mma_config(17, fp6(4096, 11008), SMS) is None
    assert mma_decode.mma_config(1, fp6(576, 576), SMS) and mma_decode.mma_config(16, fp6(576, 1536), SMS)
    assert mma_decode.mma_config(1, fp6(1536, 576), SMS) and mma_decode.mma_config(16, fp6(1536, 576), SMS)
    for group, taken in ((32, False), (64, True), (96, False), (128, True), (None, True)):
        assert (mma_decode.mma_config(4, fp6(4096, 4096, group), SMS) is not None) == taken, group
    assert mma_decode.mma_config(4, fp6(4096, 4096, name="e2m3"), SMS)
    assert mma_decode.mma_config(4, fp6(4096, 4096, name="e2m1"), SMS) is None
    assert mma_decode.mma_config(4, fp6(4096, 4096, scale=torch.float32), SMS) is None
    assert mma_decode.mma_config(4, fp6(4096, 4096, tile=64), SMS) is None
    # per channel at 1-8 rows, from three quarters of the SMs' worth of blocks of 32 outputs to one per SM and from
    # 32 iterations of 128 inputs: one program a block over all of K, 16 warps from 64 iterations (8 below), asking
    # L2 for each next iteration
    channel = mma_decode.kernel_of(fp6(11008, 4096))
    assert mma_decode.mma_launch(1, 11008, 4096, SMS, channel) == mma_decode.MmaLaunch(16, 1, 1376, 96, 6, True)
    assert mma_decode.mma_launch(8, 4096, 4096, SMS, channel) == mma_decode.MmaLaunch(8, 1, 512, 64, 4, True)
    assert mma_decode.mma_launch(1, 18944, 3584, SMS, channel).prefetch  # 112 blocks
    assert not mma_decode.mma_launch(9, 11008, 4096, SMS, channel).prefetch  # two B tiles
    assert not mma_decode.mma_launch(1, 8960, 1536, SMS, channel).prefetch  # 48 blocks
    assert not mma_decode.mma_launch(1, 3584, 3584, SMS, channel).prefetch  # 28 iterations
    assert not mma_decode.mma_launch(1, 5120, 5120, SMS, channel).prefetch  # 160 blocks
    assert not mma_decode.mma_launch(1, 11008, 4096, SMS, mma_decode.kernel_of(fp6(11008, 4096, 128))).prefetch


def test_mma_decode_ptx_pairs_the_fields_as_it_pairs_x():
    """Rule 10's PTX before its MMAs: each word's fields (i, i + 4) as the exact float16 pair u - zero,
    in the A operand's order, and x's 8 inputs paired the same way (symmetric and asymmetric)."""
    import numpy as np

    rng = np.random.default_rng(0)
    for nt, symmetric in ((1, True), (1, False), (2, True)):
        asm = mma_decode._step_asm(nt, symmetric)
        decode = "{" + ";".join(s for s in asm[1:-1].split(";") if "mma.sync" not in s) + "}"
        words = [int(v) for v in rng.integers(0, 2**32, 4, dtype=np.uint64)]
        xs = [int(v) for v in rng.integers(0, 2**32, 4 * nt, dtype=np.uint64)]
        zeros = [int(z) for z in rng.integers(0, 16, 4)]
        regs = {f"${8 * nt + i}": word for i, word in enumerate(words)}
        regs.update({f"${8 * nt + 4 + i}": x for i, x in enumerate(xs)})
        first_zero = 8 * nt + 4 + 4 * nt + 8 * nt
        if not symmetric:  # the zero pairs from _ZERO_ASM: 1024 + z and -(64 + z) for each of the 4 outputs
            pairs = _run_ptx(mma_decode._ZERO_ASM, {"$8": _half(zeros[0]) | _half(zeros[1]) << 16,
                                                    "$9": _half(zeros[2]) | _half(zeros[3]) << 16})
            for i, z in enumerate(zeros):
                assert pairs[f"${i}"] == _half(1024 + z) * 0x10001 and pairs[f"${4 + i}"] == _half(-64 - z) * 0x10001
                regs[f"${first_zero + i}"], regs[f"${first_zero + 4 + i}"] = pairs[f"${i}"], pairs[f"${4 + i}"]
        out = _run_ptx(decode, regs)
        for i, word in enumerate(words):
            zero = 8 if symmetric else zeros[i]
            for f in range(4):  # pair f: fields f and f + 4
                pair = out[f"p{i}{f}"]
                assert [pair & 0xFFFF, pair >> 16] == [_half((word >> 4 * (f + h)) % 16 - zero) for h in (0, 4)], (i, f)
        for j in range(nt):
            x = xs[4 * j:4 * j + 4]
            halves = [(x[e // 2] >> 16 * (e % 2)) & 0xFFFF for e in range(8)]  # inputs 0-7 of the row
            for f, name in enumerate("abcd"):  # (x_f, x_f+4), as the fields
                assert out[f"x{name}{j}"] == halves[f] | halves[f + 4] << 16


@pytest.mark.parametrize("name", ["e3m2", "e2m3"])
def test_mma_decode_fp6_ptx_pairs_inputs_i_and_i_plus_8_as_it_pairs_x(name):
    """Rule 10's FP6 PTX before its MMAs, on planes packed by bitplanes from random codes (every code in
    every field): output e's pair i is the float16 pair V * 2^(bias - 15) of inputs i and i + 8, bit for
    bit (subnormals included; each field takes every code), and x's 16 inputs are paired the same way, for one and two B tiles."""
    import numpy as np

    from llmc.passes.bitplanes import pack_fp_codes
    from llmc.passes.fpx import fpx_decode

    fmt = FORMATS[name]
    rng = np.random.default_rng(fmt.mantissa_bits)
    for nt in (1, 2):
        asm = mma_decode._fp6_step_asm(nt, fmt.mantissa_bits)
        decode = "{" + ";".join(s for s in asm[1:-1].split(";") if "mma.sync" not in s) + "}"
        for trial in range(64):
            codes = (trial + 17 * torch.arange(4)[:, None] + 5 * torch.arange(16)[None, :]) % 64  # [4 outputs, 16]
            high, low = (plane.view(torch.int32).numpy().astype(np.int64) % 2**32 for plane in
                         pack_fp_codes(codes, 6, fmt.mantissa_bits, 16))  # [2, 4] and [1, 4]
            xs = [int(v) for v in rng.integers(0, 2**32, 8 * nt, dtype=np.uint64)]
            regs = {f"${8 * nt + e}": int(high[0, e]) for e in range(4)}
            regs.update({f"${8 * nt + 4 + e}": int(high[1, e]) for e in range(4)})
            regs.update({f"${8 * nt + 8 + e}": int(low[0, e]) for e in range(4)})
            regs.update({f"${8 * nt + 12 + v}": x for v, x in enumerate(xs)})
            out = _run_ptx(decode, regs)
            value = (fpx_decode(codes, fmt) * 2.0 ** (fmt.bias - 15)).numpy()  # exact in float16
            for e in range(4):
                for i in range(8):
                    pair = out[f"p{e}{i}"]
                    assert [pair & 0xFFFF, pair >> 16] == [_half(value[e, i]), _half(value[e, i + 8])], (e, i, codes[e])
            for j in range(nt):
                x = xs[8 * j:8 * j + 8]
                halves = [(x[v // 2] >> 16 * (v % 2)) & 0xFFFF for v in range(16)]  # inputs 0-15 of the row
                for i in range(8):
                    assert out[f"q{j}{i}"] == halves[i] | halves[i + 8] << 16


def _half(v) -> int:
    import numpy as np

    return int(np.array(v, dtype=np.float16).view(np.uint16))


@pytest.mark.parametrize("programs", [0.5, 1, 66.0, 1056])
def test_fractional_programs_per_sm_never_split_below_one_per_block(programs):
    split = choose_split(128, 512, 16, programs)
    assert (split.split == 1) == (programs <= 128)


# --------------------------------------------------------------------------- with Triton


@pytest.mark.slow
@pytest.mark.parametrize("capability", [80, 90])
def test_kernels_compile_for_ampere_and_hopper_without_a_gpu(capability):
    pytest.importorskip("triton")
    from llmc.plugins.aot import compile_kernel, kernel_variants, loop_instruction_mix, sass

    variants = {v.name: v for v in kernel_variants()}
    for name in ("intn-gemv-int4-sym-g128-from-2^27", "fpx-gemv-e3m2-from-2^26", "fpx-gemm16-e3m2-large",
                 "intn-gemv-int4-sym-g128-narrow", "fpx-gemm16-e3m2-<2^26", "intn-gemm16-int4-sym-g128-<2^23",
                 "int3-gemv-int3-asym-g32-wide-large", "int3-gemm16-int3-sym-g128-large", "int3-dequantize-g128",
                 "int3-joined64-int3-asym-g32"):
        compiled = compile_kernel(variants[name], capability)
        assert compiled.cubin and compiled.spills == 0
        assert ".ftz" not in compiled.ptx  # the subnormal decodes need float32 subnormals kept
        if "gemv" in name:  # one fused multiply-add per weight, whatever Triton's default fusion
            mix = loop_instruction_mix(sass(compiled.cubin))
            assert mix["FFMA"] >= 64, mix


@pytest.mark.slow
def test_the_hopper_prefill_kernel_keeps_one_wgmma_in_flight():
    """Rule 9 compiles for sm_90 without spills, and its wgmmas wait for all but the last group
    (ptxas serializes them, DEPBAR 0 after each, when an empty loop is possible)."""
    pytest.importorskip("triton")
    from llmc.plugins.aot import compile_kernel, sass

    variants = wgmma_prefill.kernel_variants()
    if not variants:
        pytest.skip("this Triton has no Gluon")
    for variant in variants:
        compiled = compile_kernel(variant, 90)
        listing = sass(compiled.cubin)
        assert compiled.spills == 0 and "HGMMA" in listing
        assert re.search(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1", listing), variant.name


@pytest.mark.slow
@pytest.mark.parametrize("capability", [80, 90])
def test_the_mma_decode_kernel_compiles_to_register_operand_mmas(capability):
    """Rule 10 compiles for sm_80 and sm_90 without spills: 16 HMMA a 128-weight iteration (1-8 rows of x),
    and no shared memory in the loop (its operands come from registers)."""
    pytest.importorskip("triton")
    from llmc.plugins.aot import compile_kernel, loop_instruction_mix, sass

    variants = mma_decode.kernel_variants()
    if not variants:
        pytest.skip("this Triton has no Gluon")
    for variant in variants:
        compiled = compile_kernel(variant, capability)
        mix = loop_instruction_mix(sass(compiled.cubin))
        assert compiled.spills == 0, variant.name
        assert mix["HMMA"] == 16 * variant.constants["NT"] and not mix["LDS"] and not mix["STS"], (variant.name, mix)


@pytest.mark.slow
@pytest.mark.parametrize("capability", [80, 90])
def test_the_plugins_float32_outputs_compile_for_ampere_and_hopper(capability):
    """The TensorRT plugins pass their float32 output as ``out``: the kernels then store float32 (a variant of each
    epilogue: Triton's finish, rule 10's Gluon one, int3's), which must compile for every target without spills."""
    pytest.importorskip("triton")
    from llmc.plugins.aot import compile_kernel, kernel_variants

    variants = {v.name: v for v in kernel_variants()}
    names = ["intn-gemv-int4-sym-g128-narrow", "intn-gemm16-int4-sym-g128-<2^23", "int3-gemv-int3-asym-g32-wide-large",
             "fpx-gemv-e3m2-from-2^26"]
    names += [n for n in variants if n.startswith("intn-mma2-8-int4-sym-g128-w4")][:1]
    names += [n for n in variants if n.startswith("fpx-mma1-8-e3m2-channel-w8")][:1]
    assert len(names) == 6
    for name in names:
        variant = variants[name]
        wide = dataclasses.replace(variant, signature={**variant.signature, "y_ptr": "*fp32"})
        compiled = compile_kernel(wide, capability)
        assert compiled.cubin and compiled.spills == 0, name
        assert compiled.ptx != compile_kernel(variant, capability).ptx, name  # its own store, not float16's


@pytest.mark.slow
def test_the_separate_finish_compiles_to_a_dependent_launch_for_hopper():
    """With SEPARATE, a split launch lets the sum kernel start (griddepcontrol.launch_dependents) and
    has no atomic; the sum kernel waits for it (griddepcontrol.wait)."""
    pytest.importorskip("triton")
    from llmc.plugins.aot import KernelVariant, compile_kernel, kernel_variants

    gemm = next(v for v in kernel_variants() if v.name == "intn-gemm16-int4-sym-g128-<2^23")
    separate = compile_kernel(dataclasses.replace(gemm, constants={**gemm.constants, "SEPARATE": True}), 90)
    assert "griddepcontrol.launch_dependents" in separate.ptx and "atom." not in separate.ptx
    assert "atom." in compile_kernel(gemm, 90).ptx and "griddepcontrol" not in compile_kernel(gemm, 80).ptx
    sums = KernelVariant("sum-splits", splitk._sum_splits_kernel,
                         dict(part_ptr="*fp32", y_ptr="*fp16", M="i32", N="i32", stride_ym="i32", n_split="i32",
                              ROWS="i32"), dict(BLOCK=splitk.SUM_BLOCK))
    assert "griddepcontrol.wait" in compile_kernel(sums, 90).ptx


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the kernels are Triton)")


def launches_match_the_reference(linear, reference, packed, configs, rows):
    """Each forced launch of ``configs`` on ``rows`` rows of a fresh x against the reference, into a
    NaN-poisoned [rows, 320] output of a [320, 1024] weight."""
    for config in configs:
        for seed in range(2):  # twice: the split-K counters must be back at zero after a launch
            x = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(seed)).half().cuda()
            launch_matches_the_reference(linear, reference, packed, config, x)


def launch_matches_the_reference(linear, reference, packed, config, x):
    """``linear(x, packed, config)`` into a NaN-poisoned [rows, 320] output: every element written and
    within 2e-3 (relative, Frobenius) of the reference."""
    out = torch.full((x.shape[0], 320), float("nan"), dtype=torch.float16, device="cuda")
    linear(x, packed, config, out=out)
    expected = reference(x, packed).float()
    assert bool(torch.isfinite(out).all()), config
    assert float((out.float() - expected).norm() / expected.norm()) < 2e-3, config


@gpu
@pytest.mark.parametrize("rows", [1, 3, 4, 6, 16, 40])
@pytest.mark.parametrize("kind", ["int4-g64", "int4-asym-g32", "int8-channel", "fp6", "fp6-g32", "fp4"])
def test_kernels_match_their_references_on_fresh_inputs(kind, rows):
    generator = torch.Generator().manual_seed(rows)
    w = weight(200, 576, seed=3)
    if kind.startswith("int"):
        bits, group = (8, -1) if kind == "int8-channel" else (4, 32 if "g32" in kind else 64)
        packed = intn.pack_intn(rtn_quantize(w, bits, group, "asym" not in kind)).to("cuda")
        linear, reference = intn.intn_linear, intn.intn_reference
    else:
        fmt = FORMATS["e2m1" if kind == "fp4" else "e3m2"]
        packed = fp.pack_fpx(fpx_quantize(w, fmt, 32 if "g32" in kind else None, scale_dtype=torch.float16)).to("cuda")
        linear, reference = fp.fpx_linear, fp.fpx_reference
    x = torch.randn(rows, 576, generator=generator).half().cuda()
    out = torch.full((rows, 200), float("nan"), dtype=torch.float16, device="cuda")
    linear(x, packed, out=out)
    expected = reference(x, packed).float()
    assert bool(torch.isfinite(out).all())
    assert float((out.float() - expected).norm() / expected.norm()) < 2e-3


@gpu
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("kind", ["int4-g64", "int8-channel", "int2-g32", "fp6", "fp4"])
def test_bfloat16_and_unaligned_activations(kind, rows):
    """bfloat16 x (decoded from its bits in the vector-load path, intn_linear rule 6), and x whose
    rows are neither contiguous nor 16-byte aligned (a view one element in)."""
    generator = torch.Generator().manual_seed(10 + rows)
    w = weight(200, 576, seed=4)
    if kind.startswith("int"):
        bits, group = {"int4-g64": (4, 64), "int8-channel": (8, -1), "int2-g32": (2, 32)}[kind]
        packed = intn.pack_intn(rtn_quantize(w, bits, group, True)).to("cuda")
        linear, reference = intn.intn_linear, intn.intn_reference
    else:
        fmt = FORMATS["e2m1" if kind == "fp4" else "e3m2"]
        packed = fp.pack_fpx(fpx_quantize(w, fmt, None, scale_dtype=torch.float16)).to("cuda")
        linear, reference = fp.fpx_linear, fp.fpx_reference
    for dtype, unaligned in ((torch.bfloat16, False), (torch.float16, True), (torch.bfloat16, True)):
        base = torch.randn(rows, 577, generator=generator).to(dtype).cuda()
        x = base[:, 1:] if unaligned else base[:, :576].contiguous()
        out = torch.full((rows, 200), float("nan"), dtype=dtype, device="cuda")
        linear(x, packed, out=out)
        expected = reference(x, packed).float()
        assert bool(torch.isfinite(out).all())
        assert float((out.float() - expected).norm() / expected.norm()) < (8e-3 if dtype == torch.bfloat16 else 2e-3)


@gpu
@pytest.mark.parametrize("size", range(7))
@pytest.mark.parametrize("kind", ["int4-g128", "int4-asym-g32", "int8-channel", "fp6"])
def test_every_shipped_decode_launch_matches_its_reference(kind, size):
    """Each size class's one-row launch (block shape, split-K, prefetch, evict-first), forced onto
    a small weight so that every path of the decode kernels runs on the GPU tests."""
    w = weight(320, 1024, seed=5)
    if kind.startswith("int"):
        bits, group = (8, -1) if kind == "int8-channel" else (4, 32 if "g32" in kind else 128)
        packed = intn.pack_intn(rtn_quantize(w, bits, group, "asym" not in kind)).to("cuda")
        shape = intn.decode_classes(intn.DECODE_SHAPES, intn.DECODE_SHAPE_WIDE, intn.DECODE_SHAPE_NARROW,
                                    intn.DECODE_SHAPE_LARGE, intn.DECODE_SHAPES_SHORT)[size][1]
        config = intn.intn_config(1, packed, SMS, decode=shape)
        linear, reference = intn.intn_linear, intn.intn_reference
    else:
        packed = fp.pack_fpx(fpx_quantize(w, FORMATS["e3m2"], None, scale_dtype=torch.float16)).to("cuda")
        shapes = fp.fp6_decode_classes()
        if size >= len(shapes):
            pytest.skip("FP6 has fewer one-row launch shapes")
        shape = shapes[size][1]
        config = fp.fpx_config(1, packed, SMS, decode=shape)
        linear, reference = fp.fpx_linear, fp.fpx_reference
    launches_match_the_reference(linear, reference, packed, [config], 1)


@gpu
@pytest.mark.parametrize("rows", [2, 3, 7])
@pytest.mark.parametrize("kind", ["int4-g128", "int4-asym-g32", "int8-channel", "fp6", "fp6-g32"])
def test_several_rows_per_program_match_the_reference(kind, rows):
    """The decode kernel with 2 or 4 rows of x per program (intn_linear rule 5) at each of its
    shipped launches and with split-K, the last block of rows partly filled (3 and 7 rows)."""
    w = weight(320, 1024, seed=8)
    if kind.startswith("int"):
        bits, group = (8, -1) if kind == "int8-channel" else (4, 32 if "g32" in kind else 128)
        packed = intn.pack_intn(rtn_quantize(w, bits, group, "asym" not in kind)).to("cuda")
        shapes = [intn.MULTI_ROW_SHAPE_NARROW, intn.MULTI_ROW_SHAPE_WIDE, intn.MULTI_ROW_SHAPE_SMALL,
                  (16, 32, 4, 4, True, True, True), (64, 8, 2, 16, True, False, True)]
        configs = [intn.intn_config(rows, packed, SMS, decode=s) for s in shapes]
        linear, reference = intn.intn_linear, intn.intn_reference
    else:
        packed = fp.pack_fpx(fpx_quantize(w, FORMATS["e3m2"], 32 if "g32" in kind else None,
                                          scale_dtype=torch.float16)).to("cuda")
        shapes = [fp.MULTI_ROW_SHAPE_NARROW_FP6, fp.MULTI_ROW_SHAPE_SMALL_FP6, (64, 16, 4, 4, True)]
        configs = [fp.fpx_config(rows, packed, SMS, decode=s) for s in shapes]
        linear, reference = fp.fpx_linear, fp.fpx_reference
    configs = [dataclasses.replace(config, rows=intn.several_rows(rows)) for config in configs]
    launches_match_the_reference(linear, reference, packed, configs, rows)


@gpu
@pytest.mark.parametrize("rows", [4, 16, 30])
@pytest.mark.parametrize("kind", ["int4-g128", "int4-asym-g32", "fp6", "fp6-g32"])
def test_every_shipped_tensor_core_launch_matches_its_reference(kind, rows):
    """Each 2-16 row launch class (and the evict-first / swap options), forced onto a small weight;
    int4 also at 30 rows (two blocks of 16 rows, as 17-32 rows run on large linears)."""
    if rows > 16 and not kind.startswith("int"):
        pytest.skip("FP6 runs the tensor-core kernel up to 16 rows")
    w = weight(320, 1024, seed=7)
    if kind.startswith("int"):
        packed = intn.pack_intn(rtn_quantize(w, 4, 32 if "g32" in kind else 128, "asym" not in kind)).to("cuda")
        shapes = [s for _, s in intn.TENSOR_CORE_SHAPES] + [intn.TENSOR_CORE_SHAPE_WIDE, (32, 16, 4, 8, True, True, 2)]
        configs = [intn.intn_config(rows, packed, SMS, tensor_cores=s) for s in shapes]
        linear, reference = intn.intn_linear, intn.intn_reference
    else:
        packed = fp.pack_fpx(fpx_quantize(w, FORMATS["e3m2"], 32 if "g32" in kind else None,
                                          scale_dtype=torch.float16)).to("cuda")
        shapes = [s for _, s in fp.TENSOR_CORE_SHAPES_FPX] + [(64, 16, 4, 4, True, True, 2)]
        configs = [fp.fpx_config(rows, packed, SMS, tensor_cores=s) for s in shapes]
        linear, reference = fp.fpx_linear, fp.fpx_reference
    launches_match_the_reference(linear, reference, packed, configs, rows)


def prefill_launches_match_the_reference(linear, reference, packed, bits, rows):
    """The prefill kernel (intn_linear rule 8, fp6_linear rule 7) on a [320, 1056] weight at both
    blocks of rows, without split-K and with 2 and 5 splits (both finishes on sm_90), whose last step
    is partial, on x rows 1057 apart (not 16-byte aligned), against the reference."""
    word_rows = 1056 // 16 if bits == 6 else 1056 * bits // 32
    configs = []
    for block_m in (64, 128):
        base = dataclasses.replace(intn.prefill_launch(rows, bits, 1056, 320, SMS), block_m=block_m)
        blocks = -(-rows // block_m) * 5
        configs += [dataclasses.replace(base, split=splitk.choose_split(blocks, word_rows, base.block_w, splits * blocks))
                    for splits in (1, 2, 5)]
    assert sorted({c.split.split for c in configs}) == [1, 2, 5] and word_rows % configs[0].block_w
    for config in configs:
        x = torch.randn(rows, 1057, generator=torch.Generator().manual_seed(rows)).half().cuda()[:, 1:]
        launch_matches_the_reference(linear, reference, packed, config, x)


@gpu
@pytest.mark.parametrize("rows", [17, 64, 100])
@pytest.mark.parametrize("kind", ["int4-g128", "int4-asym-g32", "int8-channel", "int2-g32"])
def test_prefill_launches_match_the_reference(kind, rows):
    bits, group = (8, -1) if kind == "int8-channel" else (int(kind[3]), 32 if "g32" in kind else 96)
    packed = intn.pack_intn(rtn_quantize(weight(320, 1056, seed=11), bits, group, "asym" not in kind and bits != 2))
    prefill_launches_match_the_reference(intn.intn_linear, intn.intn_reference, packed.to("cuda"), bits, rows)


@gpu
@pytest.mark.parametrize("rows", [17, 64, 100])
@pytest.mark.parametrize("kind", ["e3m2", "e3m2-g32", "e2m3-g32"])
def test_fp6_prefill_launches_match_the_reference(kind, rows):
    packed = fp.pack_fpx(fpx_quantize(weight(320, 1056, seed=13), FORMATS[kind[:4]], 32 if "g32" in kind else None,
                                      scale_dtype=torch.float16))
    prefill_launches_match_the_reference(fp.fpx_linear, fp.fpx_reference, packed.to("cuda"), 6, rows)


hopper = pytest.mark.skipif(not (torch.cuda.is_available() and wgmma_prefill.available(torch.device("cuda"))),
                            reason="rules 9 and 10 need an sm_90 GPU and Triton's Gluon")


@hopper
@pytest.mark.parametrize("rows", [17, 64, 100, 300])
@pytest.mark.parametrize("kind", ["int4-g128", "int4-asym-g32", "int4-channel", "int8-channel", "int2-asym-g32",
                                  "fp6-e3m2", "fp6-e2m3-g32"])
def test_hopper_prefill_launches_match_the_reference(kind, rows):
    """Rule 9 (wgmma_prefill) on a [320, 1056] weight at both blocks of rows, without split-K and with
    2 and 5 splits (the last split runs past K), on x rows 1057 apart, against the reference."""
    w = weight(320, 1056, seed=17)
    if kind.startswith("fp6"):
        bits, word_rows, reference = 6, 1056 // 16, fp.fpx_reference
        packed = fp.pack_fpx(fpx_quantize(w, FORMATS[kind[4:8]], 32 if "g32" in kind else None, scale_dtype=torch.float16))
    else:
        bits, group, reference = int(kind[3]), 32 if "g32" in kind else (-1 if "channel" in kind else 96), intn.intn_reference
        word_rows = 1056 * bits // 32
        packed = intn.pack_intn(rtn_quantize(w, bits, group, "asym" not in kind))
    packed = packed.to("cuda")
    configs = []
    for block_m in (64, 128):
        base = dataclasses.replace(wgmma_prefill.wgmma_launch(rows, bits, 1056, 320, SMS), block_m=block_m)
        configs += [dataclasses.replace(base, split=splitk.choose_split(1, word_rows, base.block_w, splits))
                    for splits in (1, 2, 5)]
    assert sorted({c.split.split for c in configs}) == [1, 2, 5] and 5 * configs[-1].split.rows_per_split > word_rows
    for config in configs:
        x = torch.randn(rows, 1057, generator=torch.Generator().manual_seed(rows)).half().cuda()[:, 1:]
        launch_matches_the_reference(lambda x, w, c, out: wgmma_prefill.wgmma_linear(x, w, c, out), reference,
                                     packed, config, x)


@hopper
def test_intn_linear_takes_the_hopper_prefill_kernel_where_its_rule_says():
    """From 2^24 weights, float16 x runs rule 9 (the same output as forcing it): int4 through intn_linear
    at 200 rows, FP6 through fpx_linear at 100; bfloat16 x does not (it has no bfloat16 path)."""
    w = intn.pack_intn(rtn_quantize(torch.randn(4096, 4096, device="cuda") * 0.02, 4, 128, True))
    x = torch.randn(200, 4096, generator=torch.Generator().manual_seed(5)).half().cuda()
    config = wgmma_prefill.wgmma_config(200, 4, 4096, 4096, SMS)
    forced = wgmma_prefill.wgmma_linear(x, w, config, torch.empty(200, 4096, dtype=torch.float16, device="cuda"))
    assert torch.equal(intn.intn_linear(x, w), forced)
    expected = intn.intn_reference(x, w).float()
    assert float((forced.float() - expected).norm() / expected.norm()) < 2e-3
    assert intn.intn_linear(x.bfloat16(), w).dtype == torch.bfloat16
    fp6 = fp.pack_fpx(fpx_quantize(torch.randn(4096, 4096, device="cuda") * 0.02, FORMATS["e3m2"], None,
                                   scale_dtype=torch.float16))
    x = x[:100]  # FP6: up to 128 rows
    forced = wgmma_prefill.wgmma_linear(x, fp6, wgmma_prefill.wgmma_config(100, 6, 4096, 4096, SMS),
                                        torch.empty(100, 4096, dtype=torch.float16, device="cuda"))
    assert torch.equal(fp.fpx_linear(x, fp6), forced)
    expected = fp.fpx_reference(x, fp6).float()
    assert float((forced.float() - expected).norm() / expected.norm()) < 2e-3


@hopper
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 16])
@pytest.mark.parametrize("kind", ["g128", "asym-g32", "asym-g64", "channel", "asym-channel", "g256"])
def test_mma_decode_launches_match_the_reference(kind, rows):
    """Rule 10 (mma_decode) on a [300, K] weight (a partial block of outputs; K not a whole number of
    iterations) at 1, 2, 4 and 8 warps and 1, 2 and 3 splits (the last ones past K), on x rows K + 1
    apart, against the reference."""
    k = {"g128": 1152, "g256": 1280, "asym-g64": 1088}.get(kind, 1056)
    group = -1 if "channel" in kind else int(kind.split("g")[-1])
    packed = intn.pack_intn(rtn_quantize(weight(300, k, seed=19), 4, group, "asym" not in kind)).to("cuda")
    x = torch.randn(rows, k + 1, generator=torch.Generator().manual_seed(rows)).half().cuda()[:, 1:]
    for warps in (1, 2, 4, 8):
        for split in (1, 2, 3):
            launch = mma_decode._split_launch(k, warps, split)
            out = torch.full((rows, 300), float("nan"), dtype=torch.float16, device="cuda")
            mma_decode.mma_linear(x, packed, launch, out)
            expected = intn.intn_reference(x, packed).float()
            assert bool(torch.isfinite(out).all()), launch
            assert float((out.float() - expected).norm() / expected.norm()) < 2e-3, launch


@hopper
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 16])
@pytest.mark.parametrize("kind", ["e3m2-channel", "e3m2-g64", "e3m2-g128", "e2m3-channel", "e2m3-g256"])
def test_mma_decode_fp6_launches_match_the_reference(kind, rows):
    """Rule 10 on FP6 (fp6_linear rule 8) on a [300, K] weight (a partial block of outputs; K not a whole
    number of iterations) at 1, 2, 4 and 8 warps (the last ones past K) and 1, 2 and 3 splits, and with the L2
    prefetch in one program of 8 and (1-8 rows) 16 warps, on x rows K + 1 apart, against the reference."""
    name, group = kind.split("-")
    k = {"g64": 1088, "g128": 1152, "g256": 1280}.get(group, 1040)
    packed = fp.pack_fpx(fpx_quantize(weight(300, k, seed=23), FORMATS[name], None if group == "channel" else
                                      int(group[1:]), scale_dtype=torch.float16)).to("cuda")
    x = torch.randn(rows, k + 1, generator=torch.Generator().manual_seed(rows)).half().cuda()[:, 1:]
    expected = fp.fpx_reference(x, packed).float()
    launches = [mma_decode._split_launch(k, warps, split) for warps in (1, 2, 4, 8) for split in (1, 2, 3)]
    launches += [dataclasses.replace(mma_decode._split_launch(k, warps, 1), prefetch=True)
                 for warps in ((8, 16) if rows <= 8 else (8,))]
    for launch in launches:
        out = torch.full((rows, 300), float("nan"), dtype=torch.float16, device="cuda")
        mma_decode.mma_linear(x, packed, launch, out)
        assert bool(torch.isfinite(out).all()), launch
        assert float((out.float() - expected).norm() / expected.norm()) < 2e-3, launch


@hopper
@pytest.mark.parametrize("rows", [1, 5, 9, 16])
@pytest.mark.parametrize("kind", ["g128", "asym-g32", "channel", "e3m2-channel", "e3m2-g128"])
def test_mma_decode_launches_without_masks_match_the_reference(kind, rows):
    """Rule 10 on a [320, 1024] weight (whole blocks of outputs, K 8 iterations) at the 1-8 warp, 1-2 split
    launches: those whose warps all get whole iterations load without masks (the prefetch after the last
    iteration kept in the warp's range, x's rows kept below M), the others with; both against the reference,
    on x rows K + 1 apart."""
    k, n = 1024, 320
    if kind.startswith("e3m2"):
        group = None if kind.endswith("channel") else 128
        packed = fp.pack_fpx(fpx_quantize(weight(n, k, seed=29), FORMATS["e3m2"], group,
                                          scale_dtype=torch.float16)).to("cuda")
        reference = fp.fpx_reference
    else:
        group = -1 if kind == "channel" else int(kind.split("g")[-1])
        packed = intn.pack_intn(rtn_quantize(weight(n, k, seed=29), 4, group, "asym" not in kind)).to("cuda")
        reference = intn.intn_reference
    x = torch.randn(rows, k + 1, generator=torch.Generator().manual_seed(rows)).half().cuda()[:, 1:]
    even = []
    for warps in (1, 2, 4, 8):
        for split in (1, 2):
            launch = mma_decode._split_launch(k, warps, split)
            even.append(mma_decode._even(launch, k, n))
            launch_matches_the_reference(lambda x, w, c, out: mma_decode.mma_linear(x, w, c, out), reference, packed,
                                         launch, x)
    assert even == [True, True, True, True, True, True, True, False]
    if kind == "e3m2-channel":  # with the L2 prefetch (one iteration a warp, without masks)
        launch_matches_the_reference(lambda x, w, c, out: mma_decode.mma_linear(x, w, c, out), reference, packed,
                                     dataclasses.replace(mma_decode._split_launch(k, 8, 1), prefetch=True), x)


@hopper
@pytest.mark.parametrize("kind", ["int4", "int4-asym", "fp6"])
def test_the_linears_take_the_mma_decode_kernel_where_its_rules_say(kind):
    """On 4096->11008, float16 x runs rule 10 (the same output as forcing it) at 1-16 rows of int4 (symmetric and
    asymmetric) and FP6; 17 rows and bfloat16 x do not."""
    weight = torch.randn(11008, 4096, device="cuda") * 0.02
    if kind.startswith("int4"):
        w = intn.pack_intn(rtn_quantize(weight, 4, 32 if kind == "int4-asym" else 128, kind == "int4"))
        linear, reference = intn.intn_linear, intn.intn_reference
        taken, not_taken = ((1, 2, 9, 16), (17,)) if kind == "int4" else ((1, 3, 8, 9), (17,))
    else:
        w = fp.pack_fpx(fpx_quantize(weight, FORMATS["e3m2"], None, scale_dtype=torch.float16))
        linear, reference, taken, not_taken = fp.fpx_linear, fp.fpx_reference, (1, 4, 16), (17,)
    for rows in taken:
        x = torch.randn(rows, 4096, generator=torch.Generator().manual_seed(rows)).half().cuda()
        launch = mma_decode.mma_config(rows, w, SMS)
        forced = mma_decode.mma_linear(x, w, launch, torch.empty(rows, 11008, dtype=torch.float16, device="cuda"))
        assert torch.equal(linear(x, w), forced)
        expected = reference(x, w).float()
        assert float((forced.float() - expected).norm() / expected.norm()) < 2e-3
    assert all(mma_decode.mma_config(rows, w, SMS) is None for rows in not_taken)
    assert linear(x.bfloat16(), w).dtype == torch.bfloat16


def int3_weights(kind: str, out_features: int, in_features: int, seed: int) -> intn.IntNWeights:
    """int3 RTN weights of a kind such as ``asym-g32`` or ``sym-channel``, on the GPU."""
    group = -1 if kind.endswith("channel") else int(kind.split("-g")[1])
    packed = rtn_quantize(weight(out_features, in_features, seed=seed), 3, group, kind.startswith("sym"))
    return intn.pack_intn(packed).to("cuda")


@gpu
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 16, 17, 100])
@pytest.mark.parametrize("kind", ["sym-g64", "asym-g32", "sym-channel", "asym-channel"])
def test_int3_kernels_match_the_reference(kind, rows):
    """llmc's own dispatch of 3-bit weights (int3_linear: the decode kernel, once per row up to 4 rows on a
    small linear, the tensor cores up to 16 rows, dequantize-then-cuBLAS beyond) on float16 x, and on
    bfloat16 x and x whose rows are neither contiguous nor 16-byte aligned."""
    w = int3_weights(kind, 200, 576, seed=21)
    generator = torch.Generator().manual_seed(rows)
    for dtype, unaligned in ((torch.float16, False), (torch.bfloat16, False), (torch.float16, True)):
        base = torch.randn(rows, 577, generator=generator).to(dtype).cuda()
        x = base[:, 1:] if unaligned else base[:, :576].contiguous()
        out = torch.full((rows, 200), float("nan"), dtype=dtype, device="cuda")
        intn.intn_linear(x, w, out=out)
        expected = intn.intn_reference(x, w).float()
        assert bool(torch.isfinite(out).all())
        assert float((out.float() - expected).norm() / expected.norm()) < (8e-3 if dtype == torch.bfloat16 else 2e-3)


@gpu
@pytest.mark.parametrize("kind", ["sym-g128", "asym-g32", "asym-channel"])
def test_every_shipped_int3_launch_matches_the_reference(kind):
    """Each int3 launch shape, forced onto a [320, 1024] weight: the one-row classes, a split-K launch with
    prefetch, the decode kernel once per row at 3 rows and with 4 or 8 rows per program at 3, 7 and 16 rows, rule
    2's tensor-core classes at 4 and 16 rows, rule 4 at 3-100 rows
    (with evict-first and swap); the dequantize kernel equals the reference weight rounded to float16."""
    from llmc.plugins import int3_linear

    w = int3_weights(kind, 320, 1024, seed=22)
    decode = list(int3_linear.DECODE_SHAPES) + [(64, 4, 2, 16, True, True, True)]
    launches_match_the_reference(intn.intn_linear, intn.intn_reference, w,
                                 [intn.intn_config(1, w, SMS, decode=s) for s in decode], 1)
    launches_match_the_reference(intn.intn_linear, intn.intn_reference, w,
                                 [intn.intn_config(3, w, SMS, decode=s) for s in decode[:2]], 3)
    several = [(*int3_linear.MULTI_ROW_SHAPE, 4), (16, 4, 2, 8, True, True, False, 4), (16, 8, 4, 0, False, True, True, 8)]
    for rows in (3, 7, 16):  # blocks of rows on the grid, the last partly filled; split-K
        launches_match_the_reference(intn.intn_linear, intn.intn_reference, w,
                                     [intn.intn_config(rows, w, SMS, decode=s) for s in several], rows)
    tensor_cores = [s for _, s in int3_linear.TENSOR_CORE_SHAPES] + [(32, 16, 4, 8, True, True, 2)]
    for rows in (4, 16):
        launches_match_the_reference(intn.intn_linear, intn.intn_reference, w,
                                     [intn.intn_config(rows, w, SMS, tensor_cores=s) for s in tensor_cores], rows)
    # Rule 4 at its three blocks of rows, with split-K (both finishes on sm_90) and without, partial last blocks.
    for rows in (3, 16, 40, 64, 100):
        configs = [int3_linear.prefill_launch(rows, 1024, 320, SMS, s) for s in
                   (int3_linear.PREFILL_SHAPE, (64, 2, 4, 4, 8), (128, 4, 8, 3, 0), (64, 1, 4, 4, 32))]
        assert any(c.split.split > 2 for c in configs) and any(c.split.split == 1 for c in configs)
        launches_match_the_reference(intn.intn_linear, intn.intn_reference, w, configs, rows)
    expected = intn.intn_dequantize_reference(w).half()
    for block in (int3_linear.DEQUANTIZE_SHAPE, (64, 16)):
        assert torch.equal(intn.intn_dequantize(w, block=block), expected)


@gpu
def test_the_linears_take_x_with_no_rows():
    """An x of no rows gives an output of no rows (on sm_90 through rule 10's dispatch, whose unmasked loads keep
    x's row below M and so are not taken with M = 0)."""
    weight = torch.randn(11008, 4096, device="cuda") * 0.02
    for linear, w in ((intn.intn_linear, intn.pack_intn(rtn_quantize(weight, 4, 128, True))),
                      (intn.intn_linear, intn.pack_intn(rtn_quantize(weight, 3, 128, True))),
                      (fp.fpx_linear, fp.pack_fpx(fpx_quantize(weight, FORMATS["e3m2"], None,
                                                                scale_dtype=torch.float16)))):
        y = linear(torch.empty(0, 4096, dtype=torch.float16, device="cuda"), w)
        torch.cuda.synchronize()
        assert y.shape == (0, 11008) and y.dtype == torch.float16


FLOAT32_OUT_KINDS = ["int4-sym-g128", "int4-asym-g32", "int3-sym-g128", "int3-asym-g32", "fp6", "fp4"]


@gpu
@pytest.mark.parametrize("kind", FLOAT32_OUT_KINDS)
def test_a_float32_out_holds_the_float16_result_before_its_rounding(kind):
    """The TensorRT plugins pass their float32 output as ``out``: every rule stores its float32 sums there (cuBLAS's
    float16 product is copied), so rounded to float16 they are the float16 call's output bit for bit. 4096x4096 takes
    on sm_90 the Hopper rules too (rule 10 at 2-16 rows, rule 9 at 17-256), 300 rows dequantize-then-cuBLAS."""
    weight = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(5)).cuda() * 0.02
    if kind.startswith("int"):
        bits, group = int(kind[3]), 32 if "g32" in kind else 128
        w, linear = intn.pack_intn(rtn_quantize(weight, bits, group, "asym" not in kind)), intn.intn_linear
    else:
        fmt = FORMATS["e2m1" if kind == "fp4" else "e3m2"]
        w, linear = fp.pack_fpx(fpx_quantize(weight, fmt, None, scale_dtype=torch.float16)), fp.fpx_linear
    for rows in (1, 2, 4, 16, 40, 100, 300):
        x = torch.randn(rows, 4096, generator=torch.Generator().manual_seed(rows)).half().cuda()
        half = linear(x, w)
        wide = torch.full((rows, 4096), float("nan"), device="cuda")
        assert linear(x, w, out=wide) is not None
        assert torch.equal(wide.half(), half), (kind, rows)


@gpu
def test_the_prefill_kernel_waits_for_its_register_operands():
    """Rule 8 on a 4096->11008 linear at 2048 rows, four fresh inputs. Without the wait for the wgmmas
    in flight (_operands_read), Triton 3.6's code for 128 x 128 blocks of 8 warps gave wrong outputs
    in 4 of 4 trials on an H100; the shipped blocks, forced to 128 x 128, must not."""
    w = intn.pack_intn(rtn_quantize(torch.randn(11008, 4096, device="cuda") * 0.02, 4, 128, True))
    config = dataclasses.replace(intn.prefill_launch(2048, 4, 4096, 11008, SMS), block_m=128, block_n=128, num_warps=8,
                                 num_stages=3)
    assert config.split.split == 1
    for seed in range(4):
        x = torch.randn(2048, 4096, generator=torch.Generator().manual_seed(seed)).half().cuda()
        out = torch.full((2048, 11008), float("nan"), dtype=torch.float16, device="cuda")
        intn.intn_linear(x, w, config, out=out)
        expected = intn.intn_reference(x, w).float()
        assert bool(torch.isfinite(out).all()), seed
        assert float((out.float() - expected).norm() / expected.norm()) < 2e-3, seed


@gpu
@pytest.mark.parametrize("kind", ["int4-g128", "int4-asym-g32", "int8-channel", "fp6", "fp6-g32", "fp4"])
def test_the_separate_split_k_finish_is_the_in_kernel_sum_bit_for_bit(kind, monkeypatch):
    """Split-K launches of every decode kernel (one row, a row of x per program, several rows per
    program) and of the tensor-core kernels, finished by the last program (``SEPARATE_MIN_SPLIT``
    out of reach) and by ``splitk.sum_splits`` (from 2 splits): the same float32 sum in the same
    order, so the same output bit for bit, and both match the reference."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the separate finish is a programmatic dependent launch (sm_90+)")
    w = weight(320, 1024, seed=9)
    if kind.startswith("int"):
        bits, group = (8, -1) if kind == "int8-channel" else (4, 32 if "g32" in kind else 128)
        packed = intn.pack_intn(rtn_quantize(w, bits, group, "asym" not in kind)).to("cuda")
        config_of, linear = intn.intn_config, intn.intn_linear
        reference = intn.intn_reference
        decode, tensor_cores = (64, 8, 2, 16, True, False, True), (32, 16, 4, 8)
    else:
        fmt = FORMATS["e2m1" if kind == "fp4" else "e3m2"]
        packed = fp.pack_fpx(fpx_quantize(w, fmt, 32 if "g32" in kind else None, scale_dtype=torch.float16)).to("cuda")
        config_of, linear = fp.fpx_config, fp.fpx_linear
        reference = fp.fpx_reference
        decode, tensor_cores = (64, 4, 2, 16, True), (32, 16, 4, 8)
    launches = [(1, config_of(1, packed, SMS, decode=decode)), (16, config_of(16, packed, SMS, tensor_cores=tensor_cores))]
    if kind != "fp4":  # the FP4 decode kernel takes one row only
        launches += [(3, config_of(3, packed, SMS, decode=decode)),  # a row of x per program (below 2^21 weights)
                     (7, dataclasses.replace(config_of(7, packed, SMS, decode=decode), rows=4))]
    for rows, config in launches:
        assert config.split.split > 2, (rows, config)
        x = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(rows)).half().cuda()
        outs = []
        for least in (10**9, 2):
            monkeypatch.setattr(splitk, "SEPARATE_MIN_SPLIT", least)
            out = torch.full((rows, 320), float("nan"), dtype=torch.float16, device="cuda")
            linear(x, packed, config, out=out)
            outs.append(out)
        expected = reference(x, packed).float()
        assert bool(torch.isfinite(outs[1]).all()) and torch.equal(outs[0], outs[1]), (rows, config)
        assert float((outs[1].float() - expected).norm() / expected.norm()) < 2e-3, (rows, config)


@gpu
@pytest.mark.parametrize("kind", ["int4-g128", "fp6"])
def test_launches_on_two_streams_at_once_keep_their_own_split_k_counters(kind, monkeypatch):
    """TensorRT runs each execution context on its own stream, so two plugin launches may run at
    once. Split-K launches finished by their last program (in-kernel, as before sm_90 and at two
    splits) count arrivals per output block: 16 launches on each of two streams, queued behind a
    wait so that the streams drain together and never synchronised with each other, must each
    match the reference. Each launch has more programs than the GPU holds at once, so the arrivals
    of two launches interleave."""
    monkeypatch.setattr(splitk, "SEPARATE_MIN_SPLIT", 10**9)
    w = weight(4096, 4096, seed=11)
    if kind.startswith("int"):
        packed = intn.pack_intn(rtn_quantize(w, 4, 128, True)).to("cuda")
        linear, reference = intn.intn_linear, intn.intn_reference
        config = intn.intn_config(1, packed, SMS, decode=(64, 8, 2, 16, True, False, True))
    else:
        packed = fp.pack_fpx(fpx_quantize(w, FORMATS["e3m2"], None, scale_dtype=torch.float16)).to("cuda")
        linear, reference = fp.fpx_linear, fp.fpx_reference
        config = fp.fpx_config(1, packed, SMS, decode=(64, 4, 2, 16, True))
    assert config.split.split > 2 and -(-4096 // config.block_n) * config.split.split > 4 * SMS
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    xs = [torch.randn(1, 4096, generator=torch.Generator().manual_seed(i)).half().cuda() for i in range(32)]
    outs = [torch.full((1, 4096), float("nan"), dtype=torch.float16, device="cuda") for _ in xs]
    for stream in streams:  # compiled, and each stream's counters made, before the timed part
        with torch.cuda.stream(stream):
            linear(xs[0], packed, config, out=outs[0])
    torch.cuda.synchronize()
    outs[0].fill_(float("nan"))
    for stream in streams:  # the launches below queue behind this wait (the host enqueues them in about 5 ms)
        with torch.cuda.stream(stream):
            torch.cuda._sleep(100_000_000)
    for i, (x, out) in enumerate(zip(xs, outs)):
        with torch.cuda.stream(streams[i % 2]):
            linear(x, packed, config, out=out)
    torch.cuda.synchronize()
    expected = [reference(x, packed).float() for x in xs]
    wrong = [i for i, (out, e) in enumerate(zip(outs, expected))
             if not (bool(torch.isfinite(out).all()) and float((out.float() - e).norm() / e.norm()) < 2e-3)]
    assert not wrong, f"{len(wrong)} of {len(xs)} launches wrong"
