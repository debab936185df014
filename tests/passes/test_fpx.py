"""FPx codecs and quantizer: exhaustive over every code, on bare tensors."""

from __future__ import annotations

import pytest
import torch

from llmc.passes.fpx import (
    FORMATS,
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    FpxLinear,
    fpx_decode,
    fpx_encode,
    fpx_quantize,
    magnitude_table,
)

ALL = list(FORMATS.values())


def finite_codes(fmt):
    codes = torch.arange(1 << fmt.bits)
    values = fpx_decode(codes, fmt)
    keep = ~torch.isnan(values)
    return codes[keep], values[keep]


@pytest.mark.parametrize("fmt,max_normal,min_subnormal", [
    (FP6_E3M2, 28.0, 0.0625), (FP6_E2M3, 7.5, 0.125), (FP4_E2M1, 6.0, 0.5), (FP8_E4M3, 448.0, 2.0**-9),
])
def test_range_of_each_format(fmt, max_normal, min_subnormal):
    assert fmt.max_normal == max_normal and fmt.min_subnormal == min_subnormal
    table = magnitude_table(fmt)
    assert table[1] == min_subnormal and float(table[~torch.isnan(table)].max()) == max_normal


def test_e3m2_table_by_hand():
    # Subnormals 0.0625 * m, then 2^(e-3) * (1 + m/4): bias 3, every code finite (no inf/NaN).
    expected = [0.0, 0.0625, 0.125, 0.1875, 0.25, 0.3125, 0.375, 0.4375, 0.5, 0.625, 0.75, 0.875]
    assert magnitude_table(FP6_E3M2)[:12].tolist() == expected
    assert magnitude_table(FP6_E3M2)[-4:].tolist() == [16.0, 20.0, 24.0, 28.0]
    assert not torch.isnan(fpx_decode(torch.arange(64), FP6_E3M2)).any()


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_every_code_decodes_and_reencodes_to_itself(fmt):
    codes, values = finite_codes(fmt)
    assert torch.equal(fpx_encode(values, fmt).long(), codes)
    # The sign bit alone is -0.0 and keeps its sign (rule 4).
    negative_zero = fpx_decode(torch.tensor([1 << (fmt.bits - 1)]), fmt)
    assert negative_zero.item() == 0.0 and torch.signbit(negative_zero).item()


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_ties_round_to_the_even_code_and_others_to_the_nearest(fmt):
    # Magnitude codes are monotonic in value, so neighbours on the grid are neighbouring codes.
    grid_codes = torch.arange(fmt.max_magnitude_code + 1)
    grid = magnitude_table(fmt)[grid_codes]
    low, high = grid[:-1], grid[1:]
    mid = (low + high) / 2
    even = torch.where(grid_codes[:-1] % 2 == 0, grid_codes[:-1], grid_codes[1:])
    assert torch.equal(fpx_encode(mid, fmt).long(), even)
    assert torch.equal(fpx_encode(-mid, fmt).long(), even | (1 << (fmt.bits - 1)))
    assert torch.equal(fpx_encode(torch.nextafter(mid, low), fmt).long(), grid_codes[:-1])
    assert torch.equal(fpx_encode(torch.nextafter(mid, high), fmt).long(), grid_codes[1:])


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_values_past_the_range_saturate(fmt):
    big = torch.tensor([fmt.max_normal * 1.0001, fmt.max_normal * 2, 1e30, float("inf")])
    decoded = fpx_decode(fpx_encode(torch.cat([big, -big]), fmt), fmt)
    assert decoded.tolist() == [fmt.max_normal] * 4 + [-fmt.max_normal] * 4


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_underflow_rounds_to_zero_or_the_smallest_subnormal(fmt):
    tiny = fmt.min_subnormal
    x = torch.tensor([tiny / 4, tiny / 2, tiny * 0.5001, tiny * 0.75, 1e-30])
    assert fpx_decode(fpx_encode(x, fmt), fmt).tolist() == [0.0, 0.0, tiny, tiny, 0.0]


def test_e4m3_matches_torch_float8_within_its_range():
    generator = torch.Generator().manual_seed(0)
    codes, values = finite_codes(FP8_E4M3)
    mids = (values[:-1] + values[1:]) / 2
    x = torch.cat([
        torch.randn(20000, generator=generator) * 40,
        torch.randn(20000, generator=generator) * 0.01,
        torch.linspace(-448, 448, 20001),
        values,
        mids[mids.abs() < 448],
    ])
    ours = fpx_encode(x, FP8_E4M3)
    theirs = x.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(ours, theirs)
    # Past the range ours saturates (rule 3), whatever the installed torch's cast does there.
    assert fpx_decode(fpx_encode(torch.tensor([500.0, -1e6]), FP8_E4M3), FP8_E4M3).tolist() == [448.0, -448.0]


def test_declines_nan():
    with pytest.raises(ValueError, match="NaN"):
        fpx_encode(torch.tensor([1.0, float("nan")]), FP6_E3M2)


# --------------------------------------------------------------------------- the quantizer


def gaussian_weight(out_features=32, in_features=256, seed=0):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", [FP6_E3M2, FP6_E2M3, FP4_E2M1], ids=lambda f: f.name)
@pytest.mark.parametrize("group_size", [None, 32])
def test_quantizer_maps_absmax_to_the_largest_code_and_stays_within_half_a_step(fmt, group_size):
    weight = gaussian_weight()
    q = fpx_quantize(weight, fmt, group_size)
    groups = 1 if group_size is None else weight.shape[1] // group_size
    assert q.codes.dtype == torch.uint8 and q.codes.shape == weight.shape
    assert q.scale.shape == (weight.shape[0], groups) and q.group_size == weight.shape[1] // groups
    grouped = weight.reshape(weight.shape[0], groups, -1)
    assert torch.allclose(q.scale, grouped.abs().amax(-1) / fmt.max_normal)
    restored = q.dequantize()
    # The absmax itself is exact; every error is at most half the local grid step.
    table = magnitude_table(fmt)
    step = (table[1:] - table[:-1]).max() * q.scale.repeat_interleave(q.group_size, dim=1)
    assert bool(((restored - weight).abs() <= step / 2 + 1e-6).all())
    peaks = grouped.abs().argmax(-1)
    for o in range(weight.shape[0]):
        for g in range(groups):
            i = g * q.group_size + int(peaks[o, g])
            assert abs(float(restored[o, i]) - float(weight[o, i])) < 1e-6 * abs(float(weight[o, i]))


def test_fp6_beats_fp4_and_groups_beat_channels():
    weight = gaussian_weight()

    def mse(fmt, group):
        return float((fpx_quantize(weight, fmt, group).dequantize() - weight).pow(2).mean())

    assert mse(FP6_E3M2, None) < mse(FP4_E2M1, None)
    assert mse(FP6_E3M2, 32) < mse(FP6_E3M2, None)
    assert mse(FP4_E2M1, 32) < mse(FP4_E2M1, None)


def test_float16_scales_are_representable_and_never_clip():
    weight = gaussian_weight() * 1e-3
    weight[0, 0] = 3.0e-5  # a row whose absmax / 28 is below float16's smallest normal
    weight[0, 1:] = 0.0
    q = fpx_quantize(weight, FP6_E3M2, None, scale_dtype=torch.float16)
    assert torch.equal(q.scale, q.scale.half().float())
    assert bool((q.scale * FP6_E3M2.max_normal >= weight.abs().amax(1, keepdim=True)).all())
    assert bool((q.scale >= torch.finfo(torch.float16).smallest_normal).all())


def test_zero_rows_and_groups_dequantize_to_zero():
    weight = gaussian_weight(4, 64)
    weight[1] = 0.0
    weight[2, :32] = 0.0
    q = fpx_quantize(weight, FP6_E3M2, 32)
    restored = q.dequantize()
    assert bool((restored[1] == 0).all()) and bool((restored[2, :32] == 0).all())
    assert bool(torch.isfinite(q.scale).all()) and bool((q.scale > 0).all())


def test_declines_bad_weights_and_groups():
    with pytest.raises(ValueError, match="does not divide the input dimension 64"):
        fpx_quantize(gaussian_weight(4, 64), FP6_E3M2, 48)
    with pytest.raises(ValueError, match="must be 2-D"):
        fpx_quantize(torch.zeros(8), FP6_E3M2)
    weight = gaussian_weight(4, 64)
    weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="inf or NaN"):
        fpx_quantize(weight, FP6_E3M2)


def test_fpx_linear_is_frozen_data():
    q = fpx_quantize(gaussian_weight(4, 64), FP4_E2M1)
    assert isinstance(q, FpxLinear)
    with pytest.raises(AttributeError):
        q.group_size = 3


@pytest.mark.parametrize("fmt", [FP6_E3M2, FP6_E2M3, FP4_E2M1, FP8_E4M3], ids=lambda f: f.name)
@pytest.mark.parametrize("group_size", [None, 32])
def test_round_trips_through_flat_tensors_at_its_own_width(fmt, group_size):
    q = fpx_quantize(gaussian_weight(), fmt, group_size, scale_dtype=torch.float16)
    tensors = q.to_tensors("model.layers.0.mlp.up_proj")
    restored = FpxLinear.from_tensors(tensors, "model.layers.0.mlp.up_proj")
    assert restored.fmt == fmt and restored.group_size == q.group_size
    assert torch.equal(restored.codes, q.codes) and torch.equal(restored.dequantize(), q.dequantize())
    code_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if ".fpx_plane" in k)
    assert code_bytes * 8 == q.codes.numel() * fmt.bits  # 6 bits per FP6 weight, nothing more


# --------------------------------------------------------------------------- the pass

from llmc.errors import EXIT_USAGE, PassError  # noqa: E402
from llmc.passes.fpx import FpxQuantizePass  # noqa: E402
from llmc.passes.ingest import IngestPass  # noqa: E402
from llmc.passes.quantize_rtn import RtnQuantizePass  # noqa: E402
from llmc.pipeline import run_pipeline  # noqa: E402
from llmc.schemes import Override  # noqa: E402


def run(passes, cache):
    return run_pipeline(passes, cache_root=cache, seed=0, verify=True, show_progress=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One compile cache for the module: the tiny model is ingested once."""
    return tmp_path_factory.mktemp("fpx-cache")


def test_pass_quantizes_its_linears_and_composes_with_rtn(cache, tiny_model_dir):
    from llmc.checkpoint import load_packed

    # FP6 per channel everywhere but block 0 (RTN int4) and the v projections (float).
    rules = dict(method="fpx", bits=6, group_size=-1, ignore=("lm_head", "*.v_proj"),
                 overrides=(Override("model.layers.0.*", method="rtn", bits=4, group_size=32),))
    result = run([IngestPass(source=tiny_model_dir), RtnQuantizePass(**rules), FpxQuantizePass(**rules)], cache)
    decisions = {d.module: d for d in result.program.quantization}
    assert len(decisions) == 24 and "model.layers.2.self_attn.v_proj" not in decisions
    assert {d.method for m, d in decisions.items() if m.startswith("model.layers.0.")} == {"rtn"}
    fpx = [d for d in decisions.values() if d.method == "fpx"]
    assert len(fpx) == 18 and {(d.bits, d.symmetric) for d in fpx} == {(6, True)}
    assert decisions["model.layers.1.mlp.down_proj"].group_size == 128  # per channel: all of K
    packed = load_packed(cache / result.program.quantized_weights)
    assert packed["model.layers.1.mlp.down_proj"].fmt == FP6_E3M2
    assert packed["model.layers.0.mlp.down_proj"].bits == 4 and not hasattr(packed["model.layers.0.mlp.down_proj"], "fmt")
    assert "quantize-fpx" in [t.name for t in result.timings] and "e3m2 per-channel x18" in result.timings[-1].summary


def test_pass_declines_a_group_that_is_not_whole_tiles(cache, tiny_model_dir):
    with pytest.raises(PassError) as info:
        run([IngestPass(source=tiny_model_dir), FpxQuantizePass(method="fpx", bits=6, group_size=8)], cache)
    assert info.value.exit_code == EXIT_USAGE and "multiple of 16 inputs" in str(info.value)


def test_config_takes_fpx_with_its_widths_and_declines_the_rest():
    from llmc.config import Quantization

    assert Quantization(method="fpx", bits=6, group_size=-1).bits == 6
    Quantization(method="rtn", bits=4, overrides=[{"match": "*.down_proj", "method": "fpx", "bits": 8}])
    for fields, message in [
        (dict(method="fpx", bits=3), "method fpx takes bits 4"),
        (dict(method="rtn", bits=6), "use method: fpx"),
        (dict(method="fpx", bits=4, symmetric=False), "sign-magnitude"),
        (dict(method="rtn", overrides=[{"match": "x", "method": "fpx", "bits": 2}]), "resolves to fpx 2-bit"),
    ]:
        with pytest.raises(ValueError, match=message):
            Quantization(**fields)


def test_export_lowers_fp6_and_fp4_to_their_plugins_and_declines_fp8():
    from llmc.passes.export import linear_lowering

    for fmt in (FP6_E3M2, FORMATS["e2m3"], FORMATS["e2m1"]):
        assert linear_lowering(fpx_quantize(gaussian_weight(4, 64), fmt)) == "fpx"
    with pytest.raises(NotImplementedError, match="no plugin for e4m3"):
        linear_lowering(fpx_quantize(gaussian_weight(4, 64), FORMATS["e4m3"]))


def test_model_yaml_method_fpx_adds_the_pass_before_evaluate(configs):
    from llmc.config import load_model_config
    from llmc.pipeline import build_pipeline

    model_yaml, _ = configs
    text = model_yaml.read_text().replace("method: rtn", "method: fpx").replace("bits: 4", "bits: 6")
    model_yaml.write_text(text.replace("group_size: 32", "group_size: -1"))
    config, base = load_model_config(model_yaml)
    names = [p.name for p in build_pipeline(config, base)]
    assert "quantize-rtn" not in names and names.index("quantize-fpx") < names.index("evaluate")
    fpx = next(p for p in build_pipeline(config, base) if p.name == "quantize-fpx")
    assert (fpx.method, fpx.bits, fpx.group_size) == ("fpx", 6, -1)
