"""FLaP structured pruning: scores, the global threshold, alignment and bias compensation on bare
tensors; the pass on tiny models (smaller modules that load, export and run in ONNX Runtime)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmc.checkpoint import PRUNED_LAYERS_KEY, load_hf_model
from llmc.passes.calibrate import CalibratePass
from llmc.passes.ingest import IngestPass
from llmc.passes.prune_structured import (
    ChannelMoments,
    PrunableModule,
    StructuredPrunePass,
    allowed_counts,
    compensation_bias,
    fluctuation_scores,
    keep_counts,
    kept_units,
    standardize,
)
from llmc.pipeline import run_pipeline
from llmc.testing import TINY_TEXT, tiny_qwen2, tiny_tokenizer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "smollm2"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_moments_and_fluctuation_scores():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=generator) * torch.arange(1.0, 7.0) + 5.0
    moments = ChannelMoments(6)
    for chunk in x.split(64):
        moments.add(chunk[None])
    assert torch.allclose(moments.mean(), x.mean(dim=0), atol=1e-4)
    assert torch.allclose(moments.variance(), x.var(dim=0), rtol=1e-4)
    weight = torch.randn(4, 6, generator=generator)
    assert torch.allclose(fluctuation_scores(moments.variance(), weight), x.var(dim=0) * weight.square().sum(dim=0), rtol=1e-4)
    standard = standardize(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert abs(float(standard.mean())) < 1e-6 and abs(float(standard.std()) - 1) < 1e-6
    assert torch.equal(standardize(torch.full((3,), 2.0)), torch.zeros(3))


def test_alignment_keeps_widths_multiples_of_align():
    assert allowed_counts(20, 1, 8) == (8, 16, 20)
    assert allowed_counts(3, 192, 128) == (2, 3)  # SmolLM2's key/value groups under 128-wide quantization groups
    assert allowed_counts(2, 448, 64) == (1, 2)
    assert allowed_counts(4, 1, 64) == (4,)


def test_one_global_threshold_weighs_units_by_their_weights():
    strong = PrunableModule(0, "mlp", torch.full((10,), 2.0) + torch.arange(10) * 0.01, 1, allowed_counts(10, 1, 1))
    weak = PrunableModule(1, "mlp", torch.full((10,), -2.0) + torch.arange(10) * 0.01, 1, allowed_counts(10, 1, 1))
    assert keep_counts([strong, weak], 0.5) == [10, 1]  # every unit of the weak layer would go; one stays
    assert keep_counts([strong, weak], 0.5, global_threshold=False) == [5, 5]
    # A head group holding 10 weights outranks MLP channels of 1: after it, 5 more weights fit.
    heads = PrunableModule(0, "attention", torch.tensor([3.0, -3.0]), 10, allowed_counts(2, 1, 1))
    channels = PrunableModule(0, "mlp", torch.linspace(1.0, 0.0, 10), 1, allowed_counts(10, 1, 1))
    assert keep_counts([heads, channels], 0.5) == [1, 5]
    assert kept_units(torch.tensor([0.5, 3.0, -1.0, 2.0]), 2).tolist() == [1, 3]


def test_bias_compensation_removes_the_mean_of_the_error():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 32, generator=generator) + torch.linspace(-2.0, 3.0, 32)  # inputs with nonzero means
    weight = torch.randn(16, 32, generator=generator)
    removed = torch.zeros(32, dtype=torch.bool)
    removed[::3] = True
    moments = ChannelMoments(32)
    moments.add(x)
    bias = compensation_bias(weight, moments.mean(), removed)
    assert torch.allclose(bias, weight[:, removed] @ x[:, removed].mean(dim=0), rtol=1e-4, atol=1e-4)
    full = x @ weight.T
    kept = x[:, ~removed] @ weight[:, ~removed].T
    without = float((full - kept).square().mean())
    with_bias = float((full - kept - bias).square().mean())
    assert with_bias < 0.5 * without


# --------------------------------------------------------------------------- the pass


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A two-layer tiny Qwen2: grouped-query attention (4 heads, 2 key/value heads) with q/k/v biases."""
    path = tmp_path_factory.mktemp("qwen2") / "model"
    tokenizer = tiny_tokenizer()
    tiny_qwen2(seed=1, vocab_size=max(128, len(tokenizer)), num_hidden_layers=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, qwen_dir):
    """The tiny Qwen2 pruned by FLaP at 50% with and without bias compensation: {compensated: (program, cache)}."""
    root = tmp_path_factory.mktemp("flap")
    (root / "calib.txt").write_text(TINY_TEXT)
    base = [IngestPass(source=qwen_dir), CalibratePass(text=root / "calib.txt", seq_len=32, windows=8)]
    runs = {}
    for compensated in (True, False):
        p = StructuredPrunePass(ratio=0.5, align=8, bias_compensation=compensated)
        runs[compensated] = run_pipeline(base + [p], cache_root=root / "cache", seed=0, show_progress=False).program
    return runs, root / "cache"


def test_pruned_layers_are_smaller_aligned_and_keep_the_grouping(pruned):
    runs, cache = pruned
    program = runs[True]
    model = load_hf_model(cache / program.model.checkpoint, "float32")
    widths = json.loads((cache / program.model.checkpoint / "config.json").read_text())[PRUNED_LAYERS_KEY]
    assert len(widths) == 2
    assert sum(w["heads"] for w in widths) < 8 and sum(w["intermediate_size"] for w in widths) < 256
    for layer, width, table in zip(model.model.layers, widths, program.layers):
        attn, mlp = layer.self_attn, layer.mlp
        assert width["heads"] == 2 * width["kv_heads"] >= 2  # the 2:1 query-to-key/value ratio holds
        assert width["intermediate_size"] % 8 == 0
        assert attn.q_proj.out_features == 16 * width["heads"] == attn.o_proj.in_features
        assert attn.k_proj.out_features == attn.v_proj.out_features == 16 * width["kv_heads"]
        assert attn.q_proj.bias.shape == (attn.q_proj.out_features,)  # Qwen2's biases sliced with their rows
        assert mlp.down_proj.in_features == width["intermediate_size"] == mlp.up_proj.out_features
        assert mlp.down_proj.bias is not None  # the compensation
        # The layer table (what the planner reads) has the new shapes.
        shapes = {lin.name.rsplit(".", 1)[-1]: (lin.in_features, lin.out_features) for lin in table.linears}
        assert shapes["o_proj"] == (attn.o_proj.in_features, 64) and shapes["down_proj"] == (mlp.down_proj.in_features, 64)
    assert program.pruning.method == "structured" and 0.4 < program.pruning.removed_fraction < 0.6
    dense = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    assert sum(layer.weight_params for layer in program.layers) == pytest.approx(
        (1 - program.pruning.removed_fraction) * dense, rel=1e-3)


def test_planner_sees_the_smaller_layers(pruned, qwen_dir):
    from llmc.passes.ingest import layer_table
    from llmc.passes.plan import layer_shape

    runs, _ = pruned
    program = runs[True]
    dense = layer_table(load_hf_model(qwen_dir, "float32"))
    for before, after in zip(dense, program.layers):
        assert layer_shape(after, program.model).weight_params < layer_shape(before, program.model).weight_params
    assert any(layer_shape(a, program.model).kv_bytes_per_token < layer_shape(b, program.model).kv_bytes_per_token
               for a, b in zip(program.layers, dense))


def test_bias_compensation_lowers_the_error_of_the_pruned_model(pruned, qwen_dir):
    runs, cache = pruned
    ids = tiny_tokenizer()(TINY_TEXT, return_tensors="pt")["input_ids"][:, :128].reshape(4, 32)
    with torch.no_grad():
        reference = load_hf_model(qwen_dir, "float32")(ids).logits
        errors = {c: float((load_hf_model(cache / p.model.checkpoint, "float32")(ids).logits - reference).square().mean())
                  for c, p in runs.items()}
    assert errors[True] < errors[False]


def test_pruned_model_exports_and_runs_in_onnx_runtime(pruned):
    from llmc.passes.export import (
        build_stage_graph,
        compare_with_reference,
        decoder_spec_from_model,
        hf_greedy_reference,
        run_stages_greedy,
    )

    runs, cache = pruned
    model = load_hf_model(cache / runs[True].model.checkpoint, "float32")
    spec, weights = decoder_spec_from_model(model), model.state_dict()
    assert "model.layers.0.self_attn.o_proj.bias" in weights  # the compensation the graph must add
    stages = [build_stage_graph(spec, weights, 0, 1), build_stage_graph(spec, weights, 1, 2)]
    past = [i for i in stages[1].graph.input if i.name == "past_key_1"][0]
    assert past.type.tensor_type.shape.dim[1].dim_value == model.model.layers[1].self_attn.k_proj.out_features // 16
    ids = np.random.default_rng(0).integers(3, 128, (2, 5), dtype=np.int64)
    comparison = compare_with_reference(run_stages_greedy(stages, ids, 6), hf_greedy_reference(model, ids, 6))
    assert comparison.tokens_equal and comparison.max_abs_logits_diff < 1e-4


def test_targets_without_o_proj_or_down_proj_are_a_config_error(tmp_path, qwen_dir):
    from llmc.errors import EXIT_USAGE, PassError

    (tmp_path / "calib.txt").write_text(TINY_TEXT)
    passes = [IngestPass(source=qwen_dir), CalibratePass(text=tmp_path / "calib.txt", seq_len=32, windows=4),
              StructuredPrunePass(ratio=0.2, targets=("*.q_proj",))]
    with pytest.raises(PassError) as info:
        run_pipeline(passes, cache_root=tmp_path / "cache", seed=0, show_progress=False)
    assert info.value.exit_code == EXIT_USAGE and "needs o_proj or down_proj" in str(info.value)


@pytest.mark.slow
def test_smollm2_pruned_by_flap_compiles_through_export(tmp_path):
    """The example, FLaP 20% before its RTN int4 g32: compiles end to end, the ORT check passes."""
    import subprocess
    import sys

    if not (EXAMPLE / "assets" / "model").is_dir():
        pytest.fail(f"{EXAMPLE / 'assets'} is missing: run `python examples/fetch_assets.py` first")
    text = (EXAMPLE / "model.yaml").read_text()
    text = text.replace("path: assets/", f"path: {EXAMPLE}/assets/")
    text = text.replace("max_perplexity_increase_pct: 30", "max_perplexity_increase_pct: 1000")
    # Fewer calibration and evaluation windows than the example's 32 and 16: CI time, same path.
    text = text.replace("windows: 32", "windows: 8").replace("windows: 16", "windows: 4")
    (tmp_path / "model.yaml").write_text(text + "pruning:\n  method: structured\n  ratio: 0.2\n")
    command = [sys.executable, "-m", "llmc.cli", "compile", str(tmp_path / "model.yaml"), str(EXAMPLE / "cluster.yaml"),
               "-o", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "-q", "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    measured = {m["name"]: m["value"] for m in plan["measured"]}
    assert measured["export.greedy_tokens_match"] == 1.0
    assert measured["perplexity.compressed"] > measured["perplexity.reference"] > 1


@pytest.mark.parametrize("allocation, global_threshold", [("global", True), ("uniform", False)])
def test_model_yaml_chooses_the_allocation(configs, allocation, global_threshold):
    from llmc.config import load_model_config
    from llmc.pipeline import build_pipeline

    model_yaml, _ = configs
    model_yaml.write_text(model_yaml.read_text() + f"pruning:\n  method: structured\n  ratio: 0.2\n"
                          f"  structured: {{allocation: {allocation}}}\n")
    config, base = load_model_config(model_yaml)
    prune = next(p for p in build_pipeline(config, base) if p.name == "prune-structured")
    assert prune.global_threshold is global_threshold
