"""Round-to-nearest quantization math, on bare seeded tensors."""

from __future__ import annotations

import pytest
import torch

from llmc.packed import PackedLinear
from llmc.passes.quantize_rtn import rtn_quantize

# 8-bit asymmetric is declined (its codes do not fit int8); see test_declines_8_bit_asymmetric.
COMBINATIONS = [(2, True), (3, True), (4, True), (8, True), (2, False), (3, False), (4, False)]


def gaussian_weight(out_features=32, in_features=256, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=generator)


def mse(weight: torch.Tensor, packed: PackedLinear) -> float:
    return float(((packed.dequantize() - weight) ** 2).mean())


@pytest.mark.parametrize("bits,symmetric", COMBINATIONS)
@pytest.mark.parametrize("group_size", [32, None])
def test_codes_in_range_and_error_within_half_a_step(bits, symmetric, group_size):
    weight = gaussian_weight()
    packed = rtn_quantize(weight, bits, group_size, symmetric)

    expected_groups = 1 if group_size is None else weight.shape[1] // group_size
    assert packed.q.dtype == torch.int8 and packed.q.shape == weight.shape
    assert packed.scale.dtype == torch.float32
    assert packed.scale.shape == (weight.shape[0], expected_groups)
    if symmetric:
        assert packed.zero is None
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        low, high = 0, 2**bits - 1
        assert packed.zero.shape == packed.scale.shape
        assert low <= int(packed.zero.min()) and int(packed.zero.max()) <= high
    assert low <= int(packed.q.min()) and int(packed.q.max()) <= high

    step = packed.scale.repeat_interleave(packed.group_size, dim=1)
    error = (packed.dequantize() - weight).abs()
    assert bool((error <= step / 2 + 1e-6 * weight.abs() + 1e-7).all())


def test_symmetric_never_uses_the_most_negative_code():
    # The grid is absmax / (2^(b-1) - 1): symmetric, never clipping, code -8 unused at 4 bits.
    packed = rtn_quantize(gaussian_weight(), 4, 32, symmetric=True)
    assert int(packed.q.min()) == -7 and int(packed.q.max()) == 7


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_asymmetric_is_exact_on_its_own_grid(bits):
    qmax = 2**bits - 1
    generator = torch.Generator().manual_seed(1)
    out_features, groups, group_size = 8, 4, 16
    codes = torch.randint(0, qmax + 1, (out_features, groups, group_size), generator=generator)
    # Each group spans its whole code range, so min and max recover the grid exactly.
    codes[..., 0], codes[..., 1] = 0, qmax
    zero = torch.randint(0, qmax + 1, (out_features, groups), generator=generator)
    # Powers of two keep every product and quotient exact in float32.
    scale = 2.0 ** -torch.randint(2, 8, (out_features, groups), generator=generator).float()
    grid = scale[..., None] * (codes - zero[..., None])
    weight = grid.reshape(out_features, groups * group_size)

    packed = rtn_quantize(weight, bits, group_size, symmetric=False)

    assert torch.equal(packed.scale, scale)
    assert torch.equal(packed.zero.long(), zero)
    assert torch.equal(packed.q.long(), codes.reshape(out_features, -1))
    assert torch.equal(packed.dequantize(), weight)


@pytest.mark.parametrize("symmetric", [True, False])
def test_error_falls_as_bits_grow(symmetric):
    weight = gaussian_weight()
    all_bits = [2, 3, 4, 8] if symmetric else [2, 3, 4]
    errors = [mse(weight, rtn_quantize(weight, bits, 64, symmetric)) for bits in all_bits]
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == len(errors)


@pytest.mark.parametrize("symmetric", [True, False])
def test_error_falls_as_groups_shrink(symmetric):
    weight = gaussian_weight()
    sizes = [None, 128, 64, 32, 16]
    errors = [mse(weight, rtn_quantize(weight, 4, size, symmetric)) for size in sizes]
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == len(errors)


@pytest.mark.parametrize("bits,symmetric", COMBINATIONS)
def test_zero_and_constant_groups_dequantize_to_their_grid(bits, symmetric):
    weight = gaussian_weight(out_features=4, in_features=64)
    weight[0, :16] = 0.0
    weight[1, 16:32] = 0.75
    weight[2, 32:48] = -0.5
    weight[3, :] = 0.0
    weight[3, 48] = 1e-44  # a denormal whose scale underflows to 0

    packed = rtn_quantize(weight, bits, 16, symmetric)
    restored = packed.dequantize()

    assert bool(torch.isfinite(packed.scale).all()) and bool((packed.scale > 0).all())
    assert bool(torch.isfinite(restored).all())
    assert bool((restored[0, :16] == 0).all())
    assert bool((restored[3, :48] == 0).all())
    # A constant group lands on its grid's last level, up to the float16 rounding of the scale (rule 6).
    assert torch.allclose(restored[1, 16:32], torch.full((16,), 0.75), rtol=2**-10, atol=0)
    assert torch.allclose(restored[2, 32:48], torch.full((16,), -0.5), rtol=2**-10, atol=0)


def test_keeps_float32_math_for_half_weights():
    weight = gaussian_weight().to(torch.bfloat16)
    packed = rtn_quantize(weight, 4, 32, symmetric=True)
    assert packed.scale.dtype == torch.float32
    reference = rtn_quantize(weight.float(), 4, 32, symmetric=True)
    assert torch.equal(packed.q, reference.q) and torch.equal(packed.scale, reference.scale)


@pytest.mark.parametrize("group_size", [48, 0, -2])
def test_declines_a_group_size_that_does_not_divide_the_input(group_size):
    with pytest.raises(ValueError, match="does not divide the input dimension 64"):
        rtn_quantize(gaussian_weight(in_features=64), 4, group_size, symmetric=True)


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_declines_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bits must be one of"):
        rtn_quantize(gaussian_weight(), bits, 32, symmetric=True)


def test_declines_8_bit_asymmetric():
    with pytest.raises(ValueError, match="use symmetric=True at 8 bits"):
        rtn_quantize(gaussian_weight(), 8, 32, symmetric=False)


def test_declines_non_finite_and_non_matrix_weights():
    weight = gaussian_weight()
    weight[3, 7] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        rtn_quantize(weight, 4, 32, symmetric=True)
    with pytest.raises(ValueError, match="must be 2-D"):
        rtn_quantize(torch.zeros(64), 4, 32, symmetric=True)


@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trips_through_flat_tensors(symmetric):
    weight = gaussian_weight()
    packed = rtn_quantize(weight, 4, 64, symmetric)

    prefix = "model.layers.0.mlp.up_proj"
    restored = PackedLinear.from_tensors(packed.to_tensors(prefix), prefix)

    assert (restored.bits, restored.group_size, restored.symmetric) == (4, 64, symmetric)
    assert torch.equal(restored.q, packed.q) and torch.equal(restored.scale, packed.scale)
    assert (restored.zero is None) == symmetric
    assert torch.equal(restored.dequantize(), packed.dequantize())


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_scales_are_float16_values_at_or_above_the_fit(symmetric):
    # Rule 6: the kernels and plugins read float16 scales, so the scales are float16 values; raised, never
    # lowered, so no code leaves its range, and at least float16's smallest normal number.
    from llmc.passes.quantize_rtn import float16_scale

    weight = gaussian_weight(out_features=32, in_features=256) * torch.logspace(-7, 1, 32)[:, None]
    packed = rtn_quantize(weight, 4, 32, symmetric)
    assert torch.equal(packed.scale.half().float(), packed.scale)
    assert float(packed.scale.min()) >= torch.finfo(torch.float16).smallest_normal
    fitted = torch.tensor([0.1, 1 / 7, 3.0e-6, 1.0])
    raised = float16_scale(fitted)
    assert bool((raised >= fitted).all()) and bool((raised.half().float() == raised).all())
    assert bool((raised[[0, 1, 3]] < fitted[[0, 1, 3]] * (1 + 2**-10)).all())  # at most one float16 step up
    with pytest.raises(ValueError, match="float16's range"):
        float16_scale(torch.tensor([1e6]))
