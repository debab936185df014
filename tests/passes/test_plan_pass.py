"""`llmc plan` from a config.json alone: the plan pass with its files, baselines and explanation."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llmc.cli import cli

CONFIG = {
    "model_type": "llama", "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
    "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 32000, "tie_word_embeddings": False,
}

MODEL_YAML = """\
apiVersion: llmc/v1
kind: Model
model:
  path: weights-not-downloaded
calibration: {{path: text.txt}}
evaluation: {{path: text.txt}}
quantization: {{method: rtn, bits: 4, group_size: 128}}
workload: {{batch: 8, prompt_tokens: 256, generated_tokens: 32}}
{planner}
"""

CLUSTER_YAML = """\
apiVersion: llmc/v1
kind: Cluster
name: lab
memory_reserve_gib: 0.5
nodes:
  - name: box-a
    gpus: [{sku: T4}, {sku: L4}]
  - name: box-b
    gpus: [{sku: A100-40G}]
"""


@pytest.fixture
def plan_files(tmp_path):
    """(model.yaml, cluster.yaml) for a model directory that holds only config.json."""
    (tmp_path / "weights-not-downloaded").mkdir()
    (tmp_path / "weights-not-downloaded" / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "text.txt").write_text("unused by llmc plan\n")
    (tmp_path / "cluster.yaml").write_text(CLUSTER_YAML)

    def write(planner: str = "") -> tuple:
        (tmp_path / "model.yaml").write_text(MODEL_YAML.format(planner=planner))
        return tmp_path / "model.yaml", tmp_path / "cluster.yaml"

    return write


def plan(model, cluster, *extra):
    return CliRunner().invoke(cli, ["plan", str(model), str(cluster), "--cache-dir", str(model.parent / "cache"), *extra])


def test_plans_from_config_json_alone_with_baselines_and_explanation(plan_files):
    result = plan(*plan_files("planner: {bits: [3, 4, 8, 16]}"), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    stages = doc["stages"]
    assert stages[0]["layer_start"] == 0 and stages[-1]["layer_end"] == 8
    assert all(a["layer_end"] == b["layer_start"] for a, b in zip(stages, stages[1:]))
    assert all(s["memory"]["weights"] + s["memory"]["kv_cache"] <= s["memory"]["capacity"] for s in stages)
    assert doc["model"]["architecture"] == "llama" and doc["model"]["source_sha256"]
    predicted = doc["predicted"]
    assert predicted["solver_status"] == "OPTIMAL" and predicted["gap"] == 0
    assert len(predicted["layer_bits"]) == 8 and set(predicted["layer_bits"]) <= {3, 4, 8, 16}
    assert predicted["quality"]["used"] <= predicted["quality"]["budget"] * (1 + 1e-9)
    assert {b["name"] for b in doc["baselines"]} == {"even-split", "memory-greedy"}
    assert all(b["plan_speedup"] is None or b["plan_speedup"] >= 1 - 1e-9 for b in doc["baselines"])
    explanation = doc["explanation"]
    assert explanation["binding"] and 0 <= explanation["bubble"] < 1
    assert {w["sku"] for w in explanation["what_if"]} == {"T4", "L4", "A100-40G"}
    text = plan(*plan_files("planner: {bits: [3, 4, 8, 16]}")).stdout
    assert "### Baselines" in text and "### Why this plan" in text and "what if: one more" in text


def test_a_profile_file_replaces_the_roofline(plan_files, tmp_path):
    profile = {
        "apiVersion": "llmc/v1", "kind": "Profile", "model": "test llama",
        "devices": [{"sku": "NVIDIA A100-SXM4-40GB", "layers": [
            {"phase": "prefill", "bits": 4, "batch": 1, "seq_len": 256, "seconds": 2e-6},
            {"phase": "decode", "bits": 4, "batch": 1, "seq_len": 272, "seconds": 1e-6},
        ]}],
    }
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    roofline = json.loads(plan(*plan_files(), "--json").stdout)
    measured = json.loads(plan(*plan_files("planner: {profile: profile.json}"), "--json").stdout)
    sources = {s["sku"]: s["cost_source"] for s in measured["stages"]}
    assert sources.get("A100-40G") == "profile profile.json"
    assert all(s["cost_source"] == "roofline" for s in roofline["stages"])
    a100 = next(s for s in measured["stages"] if s["sku"] == "A100-40G")
    # The measured 2 us per layer and sequence (proportional in the micro-batch), every layer.
    layers = a100["layer_end"] - a100["layer_start"]
    assert a100["predicted_prefill_s"] >= 8 * 2e-6 * layers


@pytest.mark.parametrize("content, field", [
    ({"apiVersion": "llmc/v1", "kind": "Profile", "model": "m", "devices": [{"sku": "A100", "layers": [
        {"phase": "prefill", "bits": 5, "batch": 1, "seq_len": 8, "seconds": 1.0}]}]}, "devices[0].layers[0].bits"),
    ({"apiVersion": "llmc/v1", "kind": "Profile", "model": "m", "devices": [{"sku": "A1OO", "layers": [
        {"phase": "decode", "bits": 4, "batch": 1, "seq_len": 8, "seconds": 1.0}]}]}, "devices[0].sku"),
])
def test_a_bad_profile_names_the_file_and_field(plan_files, tmp_path, content, field):
    (tmp_path / "profile.yaml").write_text(json.dumps(content))
    result = plan(*plan_files("planner: {profile: profile.yaml}"))
    assert result.exit_code == 2, result.output
    assert "profile.yaml" in result.stderr and field in result.stderr


def test_a_sensitivity_table_sets_the_quality_budget(plan_files, tmp_path):
    rows = [{"layer": l, "omega": {3: 4.0 if l in (0, 7) else 1.0, 4: 0.25, 8: 0.001, 16: 0.0}} for l in range(8)]
    table = {"apiVersion": "llmc/v1", "kind": "Sensitivity", "indicator": "test", "layers": rows}
    (tmp_path / "omega.json").write_text(json.dumps(table))
    doc = json.loads(plan(*plan_files("planner: {bits: [3, 4, 8], sensitivity: omega.json}"), "--json").stdout)
    quality = doc["predicted"]["quality"]
    assert quality["budget"] == pytest.approx(8 * 0.25) and quality["used"] <= quality["budget"] + 1e-9
    assert "omega.json" in quality["indicator"]
    rows[3]["layer"] = 9
    (tmp_path / "omega.json").write_text(json.dumps(table))
    result = plan(*plan_files("planner: {bits: [3, 4, 8], sensitivity: omega.json}"))
    assert result.exit_code == 2 and "omega.json: layers[3].layer" in result.stderr


def test_infeasible_quality_budget_exits_3_with_the_budget_needed(plan_files):
    result = plan(*plan_files("planner: {bits: [16], quality_budget: 0}"))
    assert result.exit_code == 3, result.output
    assert "short" in result.stderr or "at least" in result.stderr


def test_compile_refuses_per_layer_bit_widths_it_cannot_apply(plan_files):
    # Compile applies the plan's per-layer widths with rtn and gptq (tests/passes/test_mixed_precision.py),
    # not with other methods.
    model, cluster = plan_files("planner: {bits: [3, 4]}")
    model.write_text(model.read_text().replace("method: rtn, bits: 4", "method: fpx, bits: 4"))
    result = CliRunner().invoke(cli, ["compile", str(model), str(cluster), "-o", str(model.parent / "out")])
    assert result.exit_code == 2
    assert "model.yaml: planner.bits" in result.stderr


def test_the_programs_sensitivity_table_feeds_the_budget(tmp_path):
    """What the `sensitivity` pass will leave in the program: omega per layer at each width."""
    from pathlib import Path

    from llmc.config import ClusterConfig, resolve_cluster
    from llmc.ir import Program, Sensitivity
    from llmc.passes.ingest_config import model_from_config
    from llmc.passes.plan import PlanPass, planner_instance
    from llmc.schemes import QuantizationRules

    info, layers = model_from_config(CONFIG, Path("config.json"))
    omega = tuple((2.0 if l == 0 else 1.0, 0.5, 0.01, 0.0) for l in range(8))
    program = Program(model=info, layers=layers, sensitivity=Sensitivity("test", (3, 4, 8, 16), omega))
    cluster = resolve_cluster(ClusterConfig.model_validate(
        {"apiVersion": "llmc/v1", "kind": "Cluster", "name": "one", "nodes": [{"name": "n", "gpus": [{"sku": "L4"}]}]}),
        "cluster.yaml")
    p = PlanPass(quantization=QuantizationRules(), batch=2, prompt_tokens=64, generated_tokens=8, bits=(4, 8))
    instance, quality = planner_instance(program, cluster, p)
    assert instance.omega == tuple((0.5, 0.01) for _ in range(8))
    assert quality.budget == pytest.approx(8 * 0.5) and "sensitivity pass (test)" in quality.indicator


def test_a_changed_cluster_is_planned_again_not_read_from_the_cache(plan_files, tmp_path):
    model, cluster = plan_files()
    first = json.loads(plan(model, cluster, "--json").stdout)
    assert {s["sku"] for s in first["stages"]} <= {"T4", "L4", "A100-40G"}
    cluster.write_text(CLUSTER_YAML.replace("T4", "H100-80G").replace("L4", "H100-80G").replace("A100-40G", "H100-80G"))
    second = json.loads(plan(model, cluster, "--json").stdout)
    assert {s["sku"] for s in second["stages"]} == {"H100-80G"}


def test_the_planner_stores_each_width_as_the_mixed_precision_policy_does():
    from llmc.ir import Layer, Linear
    from llmc.passes.mixed_precision import stored_bits
    from llmc.passes.plan import layer_choices
    from llmc.schemes import Scheme, at_width

    linears = (Linear("model.layers.0.mlp.up_proj", 576, 1536, False), Linear("model.layers.0.mlp.down_proj", 1536, 576, False))
    scheme = Scheme("gptq", 4, 32, False)  # asymmetric groups of 32
    choices = layer_choices(Layer(0, linears), {lin.name: scheme for lin in linears}, (4, 6, 8, 16))
    for choice in choices:
        stored = at_width(scheme, choice.bits)
        bits = sum(lin.in_features * lin.out_features * 16 if stored is None else
                   stored_bits(lin.out_features, lin.in_features, stored.bits, stored.group_size, stored.symmetric)
                   for lin in linears)
        assert choice.weight_bytes == pytest.approx(bits / 8), choice.bits
    # FP6 has no zero point; 8 bits is one scale per output channel, symmetric.
    assert (at_width(scheme, 6).method, at_width(scheme, 6).symmetric) == ("fpx", True)
    assert (at_width(scheme, 8).group_size, at_width(scheme, 8).symmetric) == (-1, True)


@pytest.mark.parametrize("config", [
    {"model_type": "opt", "hidden_size": 512, "ffn_dim": 2048, "num_hidden_layers": 8, "num_attention_heads": 8,
     "vocab_size": 32000, "word_embed_proj_dim": 512},  # linears model.decoder.layers.N...
    {"model_type": "bloom", "hidden_size": 512, "n_layer": 8, "n_head": 8, "vocab_size": 32000},  # transformer.h.N...
], ids=["opt", "bloom"])
def test_the_default_targets_quantize_every_decoder_linear_of_opt_and_bloom(plan_files, config):
    model, cluster = plan_files()
    (model.parent / "weights-not-downloaded" / "config.json").write_text(json.dumps(config))
    result = plan(model, cluster, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["model"]["architecture"] == config["model_type"]
    assert set(doc["predicted"]["layer_bits"]) == {4}  # every layer's linears quantized by the default targets
