"""The sensitivity indicators on synthetic layers whose right ranking is known, and the pass on a tiny model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from llmc.passes.calibrate import CalibratePass
from llmc.passes.ingest import IngestPass
from llmc.passes.quantize_gptq import HessianAccumulator
from llmc.passes.sensitivity import (
    InputStatistics,
    SensitivityPass,
    feature_salience,
    hessian_indicator,
    quantization_error,
    variance_indicator,
)
from llmc.pipeline import run_pipeline
from llmc.testing import TINY_TEXT


def inputs(rows=2048, columns=64, scale=1.0, seed=0) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)) * scale + 0.5


def weight(out=32, columns=64, seed=1) -> torch.Tensor:
    return torch.randn(out, columns, generator=torch.Generator().manual_seed(seed))


def statistics(x: torch.Tensor) -> InputStatistics:
    stats = InputStatistics(x.shape[1])
    stats.add(x[: len(x) // 2])
    stats.add(x[len(x) // 2:])
    return stats


def test_input_statistics_give_the_population_variance_and_gptqs_hessian():
    x = inputs()
    stats = statistics(x)
    torch.testing.assert_close(stats.variance(), x.var(dim=0, unbiased=False), rtol=1e-4, atol=1e-4)
    reference = HessianAccumulator(x.shape[1])
    reference.add(x)
    torch.testing.assert_close(stats.hessian(), reference.hessian())


def test_six_bits_is_fp6_between_int4_and_int8():
    from llmc.passes.fpx import FP6_E3M2, fpx_quantize

    w, stats = weight(), statistics(inputs())
    fp6 = fpx_quantize(w, FP6_E3M2, 32, scale_dtype=torch.float16).dequantize()
    assert torch.equal(quantization_error(w, 6, 32, False), w - fp6)  # sign-magnitude: symmetry does not apply
    # Rule 2 at 6 bits: the measured squared error stands in for LLM-PQ's uniform s^2 / 12.
    variance = stats.variance()
    assert variance_indicator(w, variance, 6, 32, True) == pytest.approx(float(((w - fp6) ** 2 @ variance).sum()))
    for indicator, statistic in ((variance_indicator, variance), (hessian_indicator, stats.hessian())):
        values = [indicator(w, statistic, b, 32, True) for b in (4, 6, 8)]
        assert values == sorted(values, reverse=True), (indicator.__name__, values)


def test_ten_times_the_activation_variance_ranks_ten_times_as_sensitive():
    w = weight()
    quiet, loud = statistics(inputs(scale=1.0)), statistics(inputs(scale=10**0.5))
    for bits in (3, 4, 8):
        low = variance_indicator(w, quiet.variance(), bits, 32, True)
        high = variance_indicator(w, loud.variance(), bits, 32, True)
        assert high == pytest.approx(10 * low, rel=0.05)
        low_h = hessian_indicator(w, quiet.hessian(), bits, 32, True)
        high_h = hessian_indicator(w, loud.hessian(), bits, 32, True)
        assert high_h > 5 * low_h  # the mean (0.5) does not scale, so somewhat below 10x
    # Fewer bits, more error; float costs nothing.
    values = [hessian_indicator(w, quiet.hessian(), b, 32, True) for b in (2, 3, 4, 8, 16)]
    assert values == sorted(values, reverse=True) and values[-1] == 0.0
    assert variance_indicator(w, quiet.variance(), 16, 32, True) == 0.0


def test_hessian_indicator_sees_correlated_inputs_the_variance_indicator_ignores():
    """Two linears, same weights and input variances: the one whose errors line up with
    correlated inputs has the larger output error, which only the Hessian trace sees."""
    base = torch.randn(4096, 1, generator=torch.Generator().manual_seed(3))
    correlated = base.repeat(1, 64) + 0.01 * inputs(rows=4096)
    independent = inputs(rows=4096) * correlated.std(dim=0, keepdim=True)
    w = torch.full((8, 64), 0.3) + 0.001 * weight(out=8)  # same-sign errors along each row
    c, i = statistics(correlated), statistics(independent)
    assert hessian_indicator(w, c.hessian(), 3, 64, True) > 3 * hessian_indicator(w, i.hessian(), 3, 64, True)


def test_a_row_on_the_grid_has_zero_salience():
    w = weight(out=6, columns=64)
    grid = torch.randint(-7, 8, (64,), generator=torch.Generator().manual_seed(5)).float()
    grid[::32] = 7.0  # every group's absmax is 7: RTN's symmetric int4 step is exactly 1
    w[2] = grid
    g = weight(out=6, columns=64, seed=9)
    salience = feature_salience(w, g, 4, 32, True)
    assert salience[2] == 0.0
    assert (salience[[0, 1, 3, 4, 5]] > 0).all()
    # MixLLM's formula, by hand, on one row.
    delta = quantization_error(w, 4, 32, True)
    by_hand = (0.5 * (g[0] * delta[0]) ** 2 + g[0] * delta[0]).sum().abs()
    torch.testing.assert_close(salience[0], by_hand)


def tiny_passes(model_dir, text, **options):
    return [IngestPass(source=model_dir), CalibratePass(text=text, seq_len=32, windows=8),
            SensitivityPass(group_size=32, **options)]


@pytest.fixture(scope="module")
def loud_layer_model(tmp_path_factory):
    """The tiny Llama with layer 2's norms scaled by sqrt(10): its linears see 10x the variance."""
    from llmc.testing import tiny_llama, tiny_tokenizer

    path = tmp_path_factory.mktemp("loud") / "model"
    tokenizer = tiny_tokenizer()
    model = tiny_llama(seed=0, vocab_size=max(128, len(tokenizer)))
    with torch.no_grad():
        model.model.layers[2].input_layernorm.weight.mul_(10**0.5)
        model.model.layers[2].post_attention_layernorm.weight.mul_(10**0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path.parent / "calib.txt").write_text(TINY_TEXT)
    return path


def test_the_pass_ranks_the_loud_layer_first_and_scores_every_output_feature(tmp_path, loud_layer_model):
    run = run_pipeline(tiny_passes(loud_layer_model, loud_layer_model.parent / "calib.txt",
                                   candidates=(3, 4, 8, 16), feature_bits=4),
                       cache_root=tmp_path / "cache", seed=0, show_progress=False)
    s = run.program.sensitivity
    assert s.bits == (3, 4, 8, 16) and len(s.omega) == 4 and s.indicator == "hessian-trace"
    for row in s.omega:
        assert row[0] > row[1] > row[2] > row[3] == 0.0
    for k in range(3):
        column = [row[k] for row in s.omega]
        assert max(range(4), key=column.__getitem__) == 2
        variance = [sum(e.variance[k] for e in s.linears if e.module.startswith(f"model.layers.{l}.")) for l in range(4)]
        assert max(range(4), key=variance.__getitem__) == 2
    assert len(s.linears) == 28 and all(e.params > 0 for e in s.linears)
    salience = load_file(tmp_path / "cache" / s.salience)
    assert len(salience) == 28 and s.salience_bits == 4
    assert salience["model.layers.0.mlp.down_proj"].shape == (64,)
    assert all(bool((v >= 0).all()) for v in salience.values())


def test_the_variance_indicator_can_be_omega_and_the_pass_declines_without_calibration(tmp_path, loud_layer_model):
    run = run_pipeline(tiny_passes(loud_layer_model, loud_layer_model.parent / "calib.txt",
                                   indicator="llm-pq-variance"),
                       cache_root=tmp_path / "cache", seed=0, show_progress=False)
    s = run.program.sensitivity
    assert s.indicator == "llm-pq-variance" and s.salience is None
    layer0 = sum(e.variance[0] for e in s.linears if e.module.startswith("model.layers.0."))
    assert s.omega[0][0] == pytest.approx(layer0)
    with pytest.raises(ValueError, match="calibrate"):
        SensitivityPass().requires(run.program.__class__(model=run.program.model, layers=run.program.layers))


def test_eight_bits_is_costed_per_channel_symmetric_as_it_is_stored_whatever_the_grid(tmp_path, loud_layer_model):
    # The planner and the mixed-precision pass store 8-bit choices symmetric with one scale per output channel
    # (llmc.schemes.at_width), so omega at 8 bits does not depend on the configured grid; an asymmetric 8-bit grid
    # does not exist (RTN refuses it), and the pass used to ask for one.
    text = loud_layer_model.parent / "calib.txt"
    by_grid = {}
    for symmetric in (False, True):
        run = run_pipeline(tiny_passes(loud_layer_model, text, symmetric=symmetric, candidates=(4, 8)),
                           cache_root=tmp_path / f"cache-{symmetric}", seed=0, show_progress=False)
        by_grid[symmetric] = {e.module: e for e in run.program.sensitivity.linears}
    asymmetric, symmetric = by_grid[False], by_grid[True]
    assert asymmetric.keys() == symmetric.keys() and len(asymmetric) == 28
    for name, entry in asymmetric.items():
        assert entry.hessian_trace[1] == symmetric[name].hessian_trace[1] > 0
        assert entry.variance[1] == symmetric[name].variance[1] > 0
        assert entry.hessian_trace[0] != symmetric[name].hessian_trace[0]  # 4 bits keeps the configured grid
