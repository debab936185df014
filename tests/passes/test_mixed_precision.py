"""The mixed-precision policy: the knapsack against brute force, MixLLM's global ranking and packed
4/8 layout, the pass with overrides on a tiny model, and model.yaml's errors."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from llmc.checkpoint import load_packed
from llmc.errors import EXIT_USAGE, ConfigError
from llmc.packed import MixedRowLinear, PackedLinear
from llmc.passes.calibrate import CalibratePass
from llmc.passes.ingest import IngestPass
from llmc.passes.mixed_precision import (
    KnapsackInfeasible,
    MixedPrecisionPass,
    quantize_rows,
    select_high_rows,
    solve_knapsack,
    stored_bits,
)
from llmc.passes.quantize_rtn import RtnQuantizePass, rtn_quantize
from llmc.passes.sensitivity import SensitivityPass
from llmc.pipeline import run_pipeline
from llmc.schemes import Override
from llmc.testing import TINY_TEXT, write_tiny_model_dir


def brute_force(values, costs, max_cost=None, max_value=None):
    best = None
    for picks in itertools.product(*[range(len(row)) for row in values]):
        value = sum(values[g][k] for g, k in enumerate(picks))
        cost = sum(costs[g][k] for g, k in enumerate(picks))
        if (max_cost is not None and cost > max_cost) or (max_value is not None and value > max_value):
            continue
        key = value if max_cost is not None else cost
        best = key if best is None else min(best, key)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_respects_the_budget_and_matches_brute_force(seed):
    rng = random.Random(seed)
    groups = 5
    costs = [sorted(rng.randint(10, 100) for _ in range(3)) for _ in range(groups)]
    values = [sorted((rng.uniform(0, 10) for _ in range(3)), reverse=True) for _ in range(groups)]  # more bits, less loss
    max_cost = sum(row[1] for row in costs) + rng.randint(-30, 30)
    picks = solve_knapsack(values, costs, max_cost=max_cost)
    assert sum(costs[g][k] for g, k in enumerate(picks)) <= max_cost
    assert sum(values[g][k] for g, k in enumerate(picks)) == pytest.approx(brute_force(values, costs, max_cost=max_cost),
                                                                          rel=1e-5)
    max_value = sum(row[1] for row in values)
    picks = solve_knapsack(values, costs, max_value=max_value)
    assert sum(values[g][k] for g, k in enumerate(picks)) <= max_value * (1 + 1e-6)
    assert sum(costs[g][k] for g, k in enumerate(picks)) == brute_force(values, costs, max_value=max_value)


def test_knapsack_says_how_much_an_impossible_budget_lacks():
    with pytest.raises(KnapsackInfeasible) as info:
        solve_knapsack([[1.0, 0.0], [1.0, 0.0]], [[3, 8], [3, 8]], max_cost=5)
    assert info.value.least == 6


def test_stored_bits_count_codes_scales_and_zero_points():
    assert stored_bits(10, 64, 4, 64, True) / 640 == 4.25
    assert stored_bits(10, 128, 4, 128, True) / 1280 == 4.125
    assert stored_bits(10, 64, 4, 32, False) / 640 == 4 + (16 + 16) / 32  # float16 scale and zero point
    assert stored_bits(10, 512, 8, -1, True) / 5120 == 8 + 16 / 512
    assert stored_bits(10, 64, 16, 64, True) / 640 == 16


def test_high_rows_are_ranked_globally_across_linears():
    salience = {"a": torch.tensor([0.1, 5.0, 0.2, 0.3]), "b": torch.tensor([4.0, 0.0, 3.0, 6.0, 0.05, 0.01])}
    rows = select_high_rows(salience, fraction=0.4)  # 4 of 10 features
    assert {k: v.tolist() for k, v in rows.items()} == {"a": [1], "b": [0, 2, 3]}
    assert all(v.dtype == torch.int32 for v in rows.values())
    # By budget: a's rows cost 10 extra bits each, b's 3: 6.0 (b) 3, 5.0 (a) 13, 4.0 (b) 16, 3.0 (b) 19 > 17.
    rows = select_high_rows(salience, row_extra_bits={"a": 10, "b": 3}, extra_budget=17)
    assert {k: v.tolist() for k, v in rows.items()} == {"a": [1], "b": [0, 3]}


def test_packed_4_8_layout_scatters_back_to_the_dequantized_weight_exactly(tmp_path):
    from safetensors.torch import save_file

    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))
    high = torch.tensor([1, 7, 11], dtype=torch.int32)
    mixed = quantize_rows(w, high, lambda rows: rtn_quantize(rows, 4, 32, True))
    assert isinstance(mixed, MixedRowLinear) and mixed.low.bits == 4 and mixed.high.bits == 8
    assert mixed.high.group_size == 64 and mixed.low.q.shape == (9, 64) and mixed.high.q.shape == (3, 64)
    dense = mixed.dequantize()
    low_rows = [r for r in range(12) if r not in high.tolist()]
    assert torch.equal(dense[high.long()], rtn_quantize(w[high.long()], 8, None, True).dequantize())
    assert torch.equal(dense[low_rows], rtn_quantize(w[low_rows], 4, 32, True).dequantize())
    # The 8-bit rows are closer to the float weights than they would be at 4 bits.
    assert (dense[high.long()] - w[high.long()]).abs().max() < (rtn_quantize(w, 4, 32, True).dequantize()[high.long()]
                                                               - w[high.long()]).abs().max()
    save_file({**mixed.to_tensors("m.x"), **rtn_quantize(w, 4, 32, True).to_tensors("m.y")}, tmp_path / "w.safetensors")
    loaded = load_packed(tmp_path / "w.safetensors")
    assert set(loaded) == {"m.x", "m.y"} and isinstance(loaded["m.y"], PackedLinear)
    assert torch.equal(loaded["m.x"].dequantize(), dense)


# --------------------------------------------------------------------------- the pass on a tiny model


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TINY_TEXT)
    return path


def run(passes, cache):
    return run_pipeline(passes, cache_root=cache, seed=0, show_progress=False)


def policy_passes(model_dir, calib, rules: dict, feature_bits=None, candidates=(3, 4, 8), **policy):
    return [IngestPass(source=model_dir), CalibratePass(text=calib, seq_len=32, windows=8),
            SensitivityPass(**rules, candidates=candidates, feature_bits=feature_bits),
            MixedPrecisionPass(**rules, candidates=candidates, **policy), RtnQuantizePass(**rules)]


def test_per_layer_mix_meets_its_average_and_explicit_overrides_win(tmp_path, tiny_model_dir, calib):
    pinned = Override("model.layers.0.*", bits=8, group_size=-1)
    rules = dict(bits=4, group_size=32, overrides=(pinned,))
    # Layer 0 pinned at 8 bits per channel, a quarter of the weights: every other layer at 4 bits
    # (4.5 with g32 scales) averages 5.43, one of them at 8 bits 6.36, two 7.3.
    program = run(policy_passes(tiny_model_dir, calib, rules, granularity="layer", average_bits=6.5), tmp_path).program
    p = program.precision
    assert 5.43 < p.average_bits <= 6.5  # spends the budget on an 8-bit layer, never beyond it
    assert 8 in {c.bits for c in p.modules}
    assert not any(c.module.startswith("model.layers.0.") for c in p.modules)  # the override is not searched
    decided = {d.module: d for d in program.quantization}
    assert {decided[n].bits for n in decided if n.startswith("model.layers.0.")} == {8}
    for c in p.modules:
        assert decided[c.module].bits == c.bits
        layer = c.module.split(".")[2]
        assert {x.bits for x in p.modules if x.module.split(".")[2] == layer} == {c.bits}  # one width per layer
    # The same search without room to spare: every free layer at the narrowest width.
    tight = run(policy_passes(tiny_model_dir, calib, rules, granularity="layer", average_bits=4.7), tmp_path).program
    assert {c.bits for c in tight.precision.modules} == {3} and tight.precision.average_bits <= 4.7


def test_six_bits_in_a_per_layer_mix_is_fp6(tmp_path, tiny_model_dir, calib):
    from llmc.checkpoint import load_packed
    from llmc.passes.fpx import FpxLinear, FpxQuantizePass

    rules = dict(bits=4, group_size=32)
    # Four equal layers at int4 g32 store 4.5 bits; one FP6 g32 layer instead raises that to 5.0,
    # one 8-bit layer to 5.4: a 5.1 average buys exactly one FP6 layer.
    passes = policy_passes(tiny_model_dir, calib, rules, candidates=(4, 6, 8), granularity="layer", average_bits=5.1)
    program = run(passes + [FpxQuantizePass(**rules)], tmp_path).program
    widths = {c.module: c.bits for c in program.precision.modules}
    assert sorted(widths.values()).count(6) == 7 and set(widths.values()) == {4, 6}
    assert program.precision.average_bits == pytest.approx(5.0, abs=0.01)
    decided = {d.module: d for d in program.quantization}
    packed = load_packed(tmp_path / program.quantized_weights)
    for name, bits in widths.items():
        assert (decided[name].method, decided[name].bits) == (("fpx", 6) if bits == 6 else ("rtn", 4))
        assert isinstance(packed[name], FpxLinear) == (bits == 6)
    fp6 = next(packed[n] for n, b in widths.items() if b == 6)
    assert fp6.fmt.name == "e3m2" and fp6.group_size == 32


@pytest.fixture(scope="module")
def fitted_model_dir(tmp_path_factory):
    """Random weights lose nothing measurable to rounding; a model fitted to the text does."""
    return write_tiny_model_dir(tmp_path_factory.mktemp("fitted") / "model", fit_steps=30)


def test_a_perplexity_target_buys_bits_where_the_predicted_loss_needs_them(tmp_path, fitted_model_dir, calib):
    rules = dict(bits=4, group_size=32)
    loose = run(policy_passes(fitted_model_dir, calib, rules, granularity="layer", max_perplexity_increase_pct=500),
                tmp_path).program.precision
    assert {c.bits for c in loose.modules} == {3} and "predicted" in loose.policy
    strict = run(policy_passes(fitted_model_dir, calib, rules, granularity="layer", max_perplexity_increase_pct=0.5),
                 tmp_path).program.precision
    # Every layer at 3 bits costs this model about 2% in calibration perplexity: 0.5% needs wider layers.
    assert strict.average_bits > loose.average_bits and {c.bits for c in strict.modules} - {3}


def test_an_average_below_the_narrowest_width_is_a_config_error(tmp_path, tiny_model_dir, calib):
    from llmc.errors import PassError

    with pytest.raises(PassError) as info:
        run(policy_passes(tiny_model_dir, calib, dict(bits=4, group_size=32), granularity="layer", average_bits=3.1),
            tmp_path)
    assert info.value.exit_code == EXIT_USAGE
    assert "quantization.mixed_precision.average_bits" in str(info.value)


def test_mixllm_keeps_the_most_salient_features_at_8_bits(tmp_path, tiny_model_dir, calib):
    rules = dict(bits=4, group_size=32)
    program = run(policy_passes(tiny_model_dir, calib, rules, feature_bits=4, granularity="output-feature",
                                high_fraction=0.1), tmp_path).program
    p = program.precision
    total = sum(lin.out_features for layer in program.layers for lin in layer.linears)
    assert sum(c.high_rows for c in p.modules) == round(0.1 * total)
    assert 4.75 < p.average_bits < 5.0  # int4 g32 is 4.5; a tenth of the rows at 8.2 bits, plus indices
    packed = load_packed(tmp_path / program.quantized_weights)
    mixed = {n: m for n, m in packed.items() if isinstance(m, MixedRowLinear)}
    assert mixed and {d.module for d in program.quantization if d.high_rows} == set(mixed)
    from safetensors.torch import load_file

    salience = load_file(tmp_path / program.sensitivity.salience)
    threshold = min(float(salience[n][m.high_rows.long()].min()) for n, m in mixed.items())
    for name, scores in salience.items():
        kept = set(mixed[name].high_rows.tolist()) if name in mixed else set()
        others = [float(scores[r]) for r in range(len(scores)) if r not in kept]
        assert not others or max(others) <= threshold  # a global ranking, not per linear


# --------------------------------------------------------------------------- model.yaml


def load_with(tmp_path, configs, quantization: str):
    from llmc.config import load_model_config

    model, _ = configs
    text = model.read_text().replace("quantization:\n  method: rtn\n", f"quantization:\n{quantization}  method: rtn\n")
    model.write_text(text)
    return load_model_config(model)


@pytest.mark.parametrize("block, field", [
    ("  mixed_precision: {average_bits: 4.5, high_fraction: 0.1}\n", "quantization.mixed_precision.high_fraction"),
    ("  mixed_precision: {granularity: layer}\n", "quantization.mixed_precision"),
    ("  mixed_precision: {average_bits: 1.5}\n", "quantization.mixed_precision.average_bits"),
    ("  mixed_precision: {average_bits: 4.5, bits: [3, 3, 8]}\n", "quantization.mixed_precision.bits"),
    ("  mixed_precision: {average_bits: 4.5, bits: [5, 8]}\n", "quantization.mixed_precision.bits[0]"),
    ("  mixed_precision: {granularity: output-feature, high_fraction: 1.5}\n",
     "quantization.mixed_precision.high_fraction"),
    ("  mixed_precision: {granularity: output-feature, average_bits: 4.5, bits: [4, 8]}\n",
     "quantization.mixed_precision.bits"),
    ("  mixed_precision: {granularity: output-feature, max_perplexity_increase_pct: 5}\n",
     "quantization.mixed_precision.max_perplexity_increase_pct"),
    ("  mixed_precision: {average_bits: 4.5, indicator: fisher}\n", "quantization.mixed_precision.indicator"),
    ("  mixed_precision: {average_bits: 4.5, budget: 3}\n", "quantization.mixed_precision.budget"),
])
def test_bad_mixed_precision_values_name_the_file_and_field(tmp_path, configs, block, field):
    with pytest.raises(ConfigError) as info:
        load_with(tmp_path, configs, block)
    assert info.value.exit_code == EXIT_USAGE
    assert str(info.value).startswith(f"{configs[0]}: {field}:"), str(info.value)
    assert "\n" not in str(info.value)


def test_fp6_in_the_widths_needs_groups_of_16_or_more(tmp_path, configs):
    model, _ = configs
    model.write_text(model.read_text().replace("group_size: 32", "group_size: 8"))
    with pytest.raises(ConfigError) as info:
        load_with(tmp_path, configs, "  mixed_precision: {bits: [4, 6], average_bits: 5}\n")
    assert str(info.value).startswith(f"{model}: quantization.group_size: 8 does not fit FP6"), str(info.value)


def test_a_valid_target_loads_and_the_compile_pipeline_runs_the_policy(tmp_path, configs):
    from llmc.pipeline import build_pipeline

    config, base = load_with(tmp_path, configs, "  mixed_precision: {granularity: output-feature, high_fraction: 0.1}\n")
    names = [p.name for p in build_pipeline(config, base)]
    assert names.index("calibrate") < names.index("sensitivity") < names.index("mixed-precision") < names.index("plan")
    assert names.index("plan") < names.index("quantize-rtn")


# --------------------------------------------------------------------------- llmc compile


def compile_with(configs, tmp_path, quantization: str = "", planner: str = ""):
    from click.testing import CliRunner

    from llmc.cli import cli

    model, cluster = configs
    text = model.read_text().replace("quantization:\n  method: rtn\n", f"quantization:\n{quantization}  method: rtn\n")
    model.write_text(text + planner)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["compile", str(model), str(cluster), "-o", str(out), "--cache-dir",
                                      str(tmp_path / "cache"), "--json"])
    return result, out


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (3, True)],
                         ids=["dq", "intn-plugin", "int3-plugin"])
def test_mixed_rows_export_as_two_matmuls_and_a_gather_that_onnx_runtime_runs(bits, symmetric):
    from llmc.passes.export import (build_stage_graph, compare_with_reference, decoder_spec_from_model,
                                    hf_greedy_reference, run_stages_greedy)
    from llmc.testing import tiny_llama

    model = tiny_llama()
    quantized = {}
    for k, (name, module) in enumerate(n for n in model.named_modules() if n[0].startswith("model.layers.")):
        if isinstance(module, torch.nn.Linear):
            rows = torch.arange(k % 3, module.out_features, 5, dtype=torch.int32)  # scattered rows
            quantized[name] = quantize_rows(module.weight, rows, lambda w: rtn_quantize(w, bits, 32, symmetric))
    reference = tiny_llama()
    with torch.no_grad():
        for name, packed in quantized.items():
            reference.get_submodule(name).weight.copy_(packed.dequantize())
    spec, weights = decoder_spec_from_model(model), model.state_dict()  # float weights: codes must be used
    stages = [build_stage_graph(spec, weights, a, b, quantized) for a, b in ((0, 1), (1, 4))]
    assert sum(n.op_type == "Gather" and n.name.endswith("/scatter_rows") for n in stages[0].graph.node) == 7
    low_ops = {"DequantizeLinear"} if bits == 4 and symmetric else {"IntNLinear" if bits == 4 else "Int3Linear"}
    assert low_ops <= {n.op_type for n in stages[0].graph.node}
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0)).numpy()
    comparison = compare_with_reference(run_stages_greedy(stages, ids, 6), hf_greedy_reference(reference, ids, 6))
    assert comparison.tokens_equal and comparison.max_abs_logits_diff < 1e-4, comparison


@pytest.mark.slow
def test_compile_exports_mixllm_rows_and_onnx_runtime_reproduces_the_tokens(configs, tmp_path):
    import json

    result, out = compile_with(configs, tmp_path, "  mixed_precision: {granularity: output-feature, high_fraction: 0.2}\n")
    assert result.exit_code == 0, result.output
    passes = [p["name"] for p in json.loads(result.stdout)["passes"]]
    assert passes[:5] == ["ingest", "calibrate", "sensitivity", "mixed-precision", "plan"]
    plan = json.loads((out / "plan.json").read_text())
    measured = {m["name"]: m["value"] for m in plan["measured"]}
    assert measured["export.greedy_tokens_match"] == 1.0  # two MatMuls, Concat and Gather per mixed linear
    import onnx

    graph = onnx.load(out / "stages" / "stage_0.onnx", load_external_data=False).graph
    assert any(n.op_type == "Gather" and n.name.endswith("/scatter_rows") for n in graph.node)


@pytest.mark.slow
def test_compile_applies_the_plans_per_layer_widths(configs, tmp_path):
    import json

    result, out = compile_with(configs, tmp_path, planner="planner:\n  bits: [3, 4, 8]\n  quality_budget: 1000\n")
    assert result.exit_code == 0, result.output
    passes = [p["name"] for p in json.loads(result.stdout)["passes"]]
    assert passes.index("sensitivity") < passes.index("plan") < passes.index("mixed-precision") < passes.index("quantize-rtn")
    plan = json.loads((out / "plan.json").read_text())
    layer_bits = [b for s in plan["stages"] for b in s["layer_bits"]]
    assert set(layer_bits) <= {3, 4, 8}
    assert "sensitivity pass (hessian-trace)" in json.dumps(plan)


@pytest.mark.slow
def test_compile_exports_a_mix_with_fp6_layers_through_the_fp6_plugin(configs, tmp_path):
    import json

    import onnx

    result, out = compile_with(configs, tmp_path, "  mixed_precision: {bits: [4, 6, 8], average_bits: 5.1}\n")
    assert result.exit_code == 0, result.output
    passes = [p["name"] for p in json.loads(result.stdout)["passes"]]
    assert passes.index("mixed-precision") < passes.index("quantize-rtn") < passes.index("quantize-fpx") < passes.index("export")
    plan = json.loads((out / "plan.json").read_text())
    assert {m["name"]: m["value"] for m in plan["measured"]}["export.greedy_tokens_match"] == 1.0
    nodes = [n for f in sorted((out / "stages").glob("*.onnx")) for n in onnx.load(f).graph.node if n.domain == "llmc"]
    assert {n.op_type for n in nodes} == {"Fp6Linear"}  # int4 symmetric is DequantizeLinear + MatMul
    assert sum(n.op_type == "Fp6Linear" for n in nodes) == 7


def test_compile_refuses_two_policies_for_the_per_layer_widths(configs, tmp_path):
    result, _ = compile_with(configs, tmp_path, "  mixed_precision: {average_bits: 4.5}\n",
                             planner="planner:\n  bits: [3, 4, 8]\n")
    assert result.exit_code == EXIT_USAGE
    assert "model.yaml: planner.bits" in result.output and "mixed_precision" in result.output


def test_fp6_in_the_plans_widths_needs_groups_of_16_or_more(configs, tmp_path):
    model, _ = configs
    model.write_text(model.read_text().replace("group_size: 32", "group_size: 8"))
    result, out = compile_with(configs, tmp_path, planner="planner:\n  bits: [4, 6]\n")
    assert result.exit_code == EXIT_USAGE
    assert "model.yaml: quantization.group_size: 8 does not fit FP6 (width 6 in planner.bits)" in result.output
    assert not out.exists()
