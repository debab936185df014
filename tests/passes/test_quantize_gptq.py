"""GPTQ: the math on bare tensors with known Hessians, and the sequential pass on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llmc.checkpoint import load_packed
from llmc.errors import EXIT_USAGE, PassError
from llmc.passes import quantize_gptq
from llmc.passes.calibrate import CalibratePass
from llmc.passes.ingest import IngestPass
from llmc.passes.quantize_gptq import (
    GptqQuantizePass,
    HessianAccumulator,
    block_steps,
    fit_grid,
    gptq_quantize,
    output_error,
)
from llmc.passes.quantize_rtn import RtnQuantizePass, rtn_quantize
from llmc.pipeline import run_pipeline
from llmc.schemes import Override
from llmc.testing import TINY_TEXT


def correlated_inputs(columns=128, rows=1024, seed=0) -> torch.Tensor:
    """Inputs with correlated columns of unequal scale, as a transformer's activations have."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=generator) * 0.3
    scales = torch.linspace(0.2, 3.0, columns)
    return (torch.randn(rows, columns, generator=generator) @ mixing + torch.randn(rows, columns, generator=generator)) * scales


def hessian_of(inputs: torch.Tensor) -> torch.Tensor:
    accumulator = HessianAccumulator(inputs.shape[1])
    accumulator.add(inputs)
    return accumulator.hessian()


def weight(out_features=48, in_features=128, seed=1) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


def round_on_grid(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """Plain rounding on GPTQ's own grid (what GPTQ does with no error feedback)."""
    rows, columns = w.shape
    groups = w.reshape(rows * columns // group, group)
    scale, zero = fit_grid(groups, bits, symmetric)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    q = (torch.round(groups / scale[:, None]) + zero[:, None]).clamp(low, high)
    return ((q - zero[:, None]) * scale[:, None]).reshape(rows, columns)


# --------------------------------------------------------------------------- the math


def test_hessian_is_2xxt_over_n_whatever_the_batching():
    inputs = correlated_inputs(columns=16, rows=300)
    accumulator = HessianAccumulator(16)
    for chunk in inputs.to(torch.bfloat16).float().split(64):
        accumulator.add(chunk.reshape(2, -1, 16) if chunk.shape[0] % 2 == 0 else chunk)
    x = inputs.to(torch.bfloat16).double()
    expected = 2 * x.T @ x / x.shape[0]
    assert accumulator.samples == 300
    assert accumulator.hessian().dtype == torch.float32
    assert torch.allclose(accumulator.hessian().double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits,group_size,symmetric,act_order", [
    (3, 32, True, False), (3, -1, False, True), (4, 32, False, False), (4, -1, True, True),
    (4, 32, True, True), (8, -1, True, False),
])
def test_output_error_is_below_rtn(bits, group_size, symmetric, act_order):
    w, hessian = weight(), hessian_of(correlated_inputs())
    result = gptq_quantize(w, hessian, bits, group_size, symmetric, act_order=act_order)
    group = 128 if group_size == -1 else group_size

    gptq = output_error(w, result.packed.dequantize(), hessian)
    rtn = output_error(w, rtn_quantize(w, bits, group, symmetric).dequantize(), hessian)
    same_grid = output_error(w, round_on_grid(w, bits, group, symmetric), hessian)
    assert gptq < 0.8 * same_grid and gptq < 0.8 * rtn
    # The reported loss is the output error of the packed weights: export reads what GPTQ optimised.
    assert result.loss == pytest.approx(gptq, rel=1e-4)
    assert result.damp == 0.01 and result.dead_columns == 0


@pytest.mark.parametrize("bits,symmetric", [(2, True), (4, True), (8, True), (2, False), (4, False)])
def test_codes_lie_in_range_and_symmetric_uses_the_full_signed_range(bits, symmetric):
    w, hessian = weight(), hessian_of(correlated_inputs())
    packed = gptq_quantize(w, hessian, bits, 32, symmetric).packed
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert packed.q.dtype == torch.int8 and packed.q.shape == w.shape
    assert packed.scale.shape == (48, 4) and bool((packed.scale > 0).all())
    assert low <= int(packed.q.min()) and int(packed.q.max()) <= high
    assert (packed.zero is None) == symmetric
    if symmetric:  # int4 in [-8, 7] with zero point 0: TensorRT's layout; -8 is used
        assert int(packed.q.min()) == low


def test_act_order_static_groups_are_the_original_column_groups():
    # With a diagonal Hessian no error propagates, so GPTQ reduces to rounding each column on
    # its group's grid. The columns are visited in a shuffled order (unequal diagonal); static
    # groups must still be the original column order's, fitted before permuting.
    w = weight()
    diagonal = torch.rand(128, generator=torch.Generator().manual_seed(3)) + 0.5
    for symmetric in (True, False):
        result = gptq_quantize(w, torch.diag(diagonal), 4, 32, symmetric, act_order=True)
        assert torch.equal(result.packed.dequantize(), round_on_grid(w, 4, 32, symmetric))


@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order_groups_at_inference_are_those_used_at_quantization(symmetric):
    # dequantize() (what export reads, no g_idx) equals the loop's values: the reported loss is
    # computed from the loop's values, and matches the packed weights' error exactly.
    w, hessian = weight(), hessian_of(correlated_inputs())
    result = gptq_quantize(w, hessian, 3, 32, symmetric, act_order=True)
    assert result.packed.group_size == 32 and result.packed.scale.shape == (48, 4)
    assert result.loss == pytest.approx(output_error(w, result.packed.dequantize(), hessian), rel=1e-5)
    without = gptq_quantize(w, hessian, 3, 32, symmetric, act_order=False)
    assert not torch.equal(result.packed.q, without.packed.q)


@pytest.mark.parametrize("group_size,symmetric", [(16, True), (64, False), (-1, True)])
def test_lazy_batches_do_not_change_the_codes(group_size, symmetric):
    # Groups are fitted on the error-updated weights whatever the batch size: groups smaller
    # than, equal to and larger than a batch give the codes of column-by-column updates.
    w, hessian = weight(), hessian_of(correlated_inputs())
    codes = [gptq_quantize(w, hessian, 3, group_size, symmetric, block_size=b).packed.q for b in (8, 32, 128)]
    assert torch.equal(codes[0], codes[1]) and torch.equal(codes[0], codes[2])


def test_a_singular_hessian_is_damped_not_a_crash():
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(4))
    rank_one = 2 * x.T @ x
    result = gptq_quantize(weight(in_features=64), rank_one, 4, 32, True, damp=0.0)
    assert result.damp > 0.0  # raised from 0 until the Cholesky factorisation succeeded
    assert bool(torch.isfinite(result.packed.dequantize()).all())

    broken = rank_one.clone()
    broken[3, 3] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        gptq_quantize(weight(in_features=64), broken, 4, 32, True)


def test_dead_columns_are_zeroed_and_cost_nothing():
    inputs = correlated_inputs()
    dead = [0, 5, 77, 127]
    inputs[:, dead] = 0.0
    w, hessian = weight(), hessian_of(inputs)
    result = gptq_quantize(w, hessian, 4, 32, True, act_order=True)
    assert result.dead_columns == len(dead)
    assert bool((result.packed.dequantize()[:, dead] == 0).all())
    assert result.loss == pytest.approx(output_error(w, result.packed.dequantize(), hessian), rel=1e-5)


def test_declines_what_packed_weights_cannot_hold():
    w, hessian = weight(), hessian_of(correlated_inputs())
    with pytest.raises(ValueError, match="use symmetric=True at 8 bits"):
        gptq_quantize(w, hessian, 8, 32, False)
    with pytest.raises(ValueError, match="does not divide the input dimension 128"):
        gptq_quantize(w, hessian, 4, 48, True)
    with pytest.raises(ValueError, match="does not fit a weight with 128 inputs"):
        gptq_quantize(w, hessian[:64, :64], 4, 32, True)
    with pytest.raises(ValueError, match="bits must be one of"):
        gptq_quantize(w, hessian, 5, 32, True)


def test_true_sequential_steps():
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.extra_proj"]
    assert block_steps(names) == [names[:3], names[3:4], names[4:6], names[6:7], names[7:8]]


# --------------------------------------------------------------------------- the pass


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    (folder / "calib.txt").write_text(TINY_TEXT)
    return folder / "calib.txt"


def compile_passes(model_dir, text, quantize) -> list:
    return [IngestPass(source=model_dir), CalibratePass(text=text, seq_len=32, windows=8), *quantize]


def run(passes, cache):
    return run_pipeline(passes, cache_root=cache, seed=0, verify=True, show_progress=False)


def logits_error(model_dir, cache, program, windows) -> float:
    """Mean squared logit difference between the float model and the program's weights."""
    from llmc.checkpoint import load_hf_model

    model = load_hf_model(model_dir, "float32")
    with torch.no_grad():
        reference = model(windows).logits
        for name, packed in load_packed(cache / program.quantized_weights).items():
            model.get_submodule(name).weight.copy_(packed.dequantize())
        return float((model(windows).logits - reference).pow(2).mean())


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory):
    from llmc.testing import tiny_qwen2, tiny_tokenizer

    path = tmp_path_factory.mktemp("qwen2") / "model"
    tokenizer = tiny_tokenizer()
    tiny_qwen2(seed=1, vocab_size=max(128, len(tokenizer)), num_hidden_layers=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_sequential_gptq_beats_rtn_at_3_bits_on_tiny_llama(tmp_path, tiny_model_dir, texts):
    cache = tmp_path / "cache"
    gptq = run(compile_passes(tiny_model_dir, texts, [GptqQuantizePass(method="gptq", bits=3, group_size=32)]), cache)
    rtn = run(compile_passes(tiny_model_dir, texts, [RtnQuantizePass(bits=3, group_size=32)]), cache)

    decisions = gptq.program.quantization
    assert len(decisions) == 28 and {d.method for d in decisions} == {"gptq"}
    assert {(d.bits, d.group_size, d.symmetric) for d in decisions} == {(3, 32, True)}
    windows = load_file(cache / gptq.program.calibration.tokens_ref)["tokens"]
    assert logits_error(tiny_model_dir, cache, gptq.program, windows) < 0.8 * logits_error(
        tiny_model_dir, cache, rtn.program, windows
    )
    layers = json.loads(next(cache.glob("quantize-gptq-*/gptq_layers.json")).read_text())
    assert set(layers) == {d.module for d in decisions}
    assert {"bits", "group_size", "damp", "loss", "seconds"} <= set(layers["model.layers.0.mlp.down_proj"])
    assert not list(cache.glob(".resume-*"))  # the per-block checkpoint goes once the pass succeeds


def test_qwen2_blocks_quantize_and_keep_their_biases(tmp_path, tiny_qwen2_dir, texts):
    from llmc.checkpoint import load_hf_model

    cache = tmp_path / "cache"
    result = run(compile_passes(tiny_qwen2_dir, texts, [GptqQuantizePass(bits=4, group_size=32, act_order=True)]), cache)
    packed = load_packed(cache / result.program.quantized_weights)
    assert len(packed) == 14 and all(p.bits == 4 for p in packed.values())
    model = load_hf_model(tiny_qwen2_dir, "float32")
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases stay float
    assert packed["model.layers.1.self_attn.q_proj"].q.shape == model.model.layers[1].self_attn.q_proj.weight.shape


def test_overrides_and_methods_compose(tmp_path, tiny_model_dir, texts):
    # RTN for block 0, 8-bit for every down_proj, GPTQ int4 for the rest; v_proj kept float.
    rules = dict(
        method="gptq", bits=4, group_size=32, ignore=("lm_head", "*.v_proj"),
        overrides=(Override("model.layers.0.*", method="rtn"), Override("*.down_proj", bits=8, group_size=-1)),
    )
    passes = compile_passes(tiny_model_dir, texts, [RtnQuantizePass(**rules), GptqQuantizePass(**rules)])
    decisions = {d.module: d for d in run(passes, tmp_path / "cache").program.quantization}
    assert len(decisions) == 24
    assert "model.layers.1.self_attn.v_proj" not in decisions
    assert decisions["model.layers.0.mlp.down_proj"].method == "rtn"
    assert decisions["model.layers.0.self_attn.q_proj"].method == "rtn"
    assert (decisions["model.layers.2.mlp.down_proj"].method, decisions["model.layers.2.mlp.down_proj"].bits) == ("gptq", 8)
    assert decisions["model.layers.2.mlp.down_proj"].group_size == 128
    assert (decisions["model.layers.3.mlp.up_proj"].method, decisions["model.layers.3.mlp.up_proj"].bits) == ("gptq", 4)


def test_a_pattern_that_matches_nothing_is_a_config_error(tmp_path, tiny_model_dir, texts):
    passes = compile_passes(tiny_model_dir, texts, [GptqQuantizePass(overrides=(Override("*.down_prj", bits=8),))])
    with pytest.raises(PassError) as info:
        run(passes, tmp_path / "cache")
    assert info.value.exit_code == EXIT_USAGE
    assert "quantization.overrides[0].match: '*.down_prj' matches no linear" in str(info.value)


def test_a_group_size_that_does_not_divide_is_a_config_error(tmp_path, tiny_model_dir, texts):
    with pytest.raises(PassError) as info:
        run(compile_passes(tiny_model_dir, texts, [GptqQuantizePass(group_size=256)]), tmp_path / "cache")
    assert info.value.exit_code == EXIT_USAGE
    assert "quantization.group_size: 256 does not divide the input size 64" in str(info.value)


def test_an_interrupted_run_resumes_at_the_block_it_was_in(tmp_path, tiny_model_dir, texts, monkeypatch):
    passes = compile_passes(tiny_model_dir, texts, [GptqQuantizePass(bits=3, group_size=32)])
    uninterrupted = run(passes, tmp_path / "whole")

    real = quantize_gptq.gptq_quantize
    calls = []

    def failing_in_block_2(weight, *args, **kwargs):
        calls.append(weight.shape)
        if len(calls) == 7 * 2 + 3:  # block 2's o_proj
            raise KeyboardInterrupt("simulated interruption")
        return real(weight, *args, **kwargs)

    cache = tmp_path / "cache"
    monkeypatch.setattr(quantize_gptq, "gptq_quantize", failing_in_block_2)
    with pytest.raises(KeyboardInterrupt):
        run(passes, cache)
    state = json.loads(next(cache.glob(".resume-quantize-gptq-*/state.json")).read_text())
    assert state["next_block"] == 2

    calls.clear()
    monkeypatch.setattr(quantize_gptq, "gptq_quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = run(passes, cache)
    assert len(calls) == 7 * 2  # blocks 2 and 3 only
    assert resumed.program.quantization == uninterrupted.program.quantization
    ours = load_packed(cache / resumed.program.quantized_weights)
    theirs = load_packed(tmp_path / "whole" / uninterrupted.program.quantized_weights)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n].q, theirs[n].q) and torch.equal(ours[n].scale, theirs[n].scale) for n in ours)
    assert not list(cache.glob(".resume-*"))


def test_declines_models_mixing_sliding_window_blocks(tmp_path, texts):
    from llmc.testing import tiny_qwen2, tiny_tokenizer

    path = tmp_path / "model"
    tokenizer = tiny_tokenizer()
    tiny_qwen2(vocab_size=max(128, len(tokenizer)), num_hidden_layers=2, use_sliding_window=True,
               sliding_window=16, max_window_layers=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    with pytest.raises(PassError) as info:
        run(compile_passes(path, texts, [GptqQuantizePass(group_size=32)]), tmp_path / "cache")
    assert info.value.exit_code == EXIT_USAGE
    assert "sliding-window attention" in str(info.value)
