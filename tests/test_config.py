"""Malformed configs: exit 2 and one line naming the file and the field."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llmc.cli import cli


def validate(model, cluster, *extra):
    result = CliRunner().invoke(cli, ["validate", str(model), str(cluster), *extra])
    return result


def test_valid_configs_pass(configs):
    result = validate(*configs)
    assert result.exit_code == 0, result.stderr
    assert "box-a/gpu0 (A100-40G)" in result.stdout and "box-a/gpu1 (L4)" in result.stdout


def test_json_result(configs):
    result = validate(*configs, "--json")
    assert json.loads(result.stdout)["devices"] == ["box-a/gpu0 (A100-40G)", "box-a/gpu1 (L4)"]


# (which file, text replaced, replacement, field path expected in the message, words expected)
CASES = [
    ("cluster", "sku: A100-40G", "sku: A1OO", "nodes[0].gpus[0].sku", "did you mean 'A100"),
    ("model", "quantization:", "quantisation:", "quantisation", "unknown field"),
    ("model", "  bits: 4", "  bits: 5", "quantization.bits", "6 or 8"),
    ("model", "  group_size: 32", "  group_size: 100", "quantization.group_size", "power of two"),
    ("model", "apiVersion: llmc/v1", "apiVersion: llmc/v2", "apiVersion", "llmc/v1"),
    ("cluster", "kind: Cluster", "kind: Model", "kind", "expected 'Cluster'"),
    ("cluster", "      - sku: L4", "      - sku: L4\n        count: 0", "nodes[0].gpus[1].count", "greater than or equal to 1"),
    ("cluster", "  - name: box-a", "  - name: Box_A", "nodes[0].name", "pattern"),
    ("model", "  batch: 2", "  batch: 0", "workload.batch", "greater than or equal to 1"),
    ("model", "  path: calib.txt", "  path: missing.txt", "calibration.path", "does not exist"),
    ("model", "  path: calib.txt", "  path: .", "calibration.path", "is not a file"),
    ("model", "  path: eval.txt", "  path: ''", "evaluation.path", "empty"),
    ("model", "  windows: 4\nevaluation", "  windows: many\nevaluation", "calibration.windows", "integer"),
    ("cluster", "      - sku: L4", "      - sku: L4\n        overrides: {memory_gib: -8}", "nodes[0].gpus[1].overrides.memory_gib", "greater than 0"),
    ("cluster", "name: test-lab", "name: test-lab\nskus:\n  - name: X9000\n    memory_gib: 10", "skus[0]", "needs fp16_tflops"),
    ("model", "kind: Model", "kind: Model\nkind: [", "line", "invalid YAML"),
    ("cluster", "name: test-lab\n", "", "name", "required field is missing"),
    # quantization: methods, GPTQ options and per-module overrides
    ("model", "  method: rtn", "  method: awq", "quantization.method", "'rtn', 'gptq' or 'fpx'"),
    ("model", "  symmetric: true\n", "  symmetric: true\n  targets: []\n", "quantization.targets", "at least 1 item"),
    ("model", "  symmetric: true\n", "  symmetric: true\n  gptq: {block_size: 100}\n", "quantization.gptq.block_size", "power of two"),
    ("model", "  symmetric: true\n", "  symmetric: true\n  gptq: {damp: 0}\n", "quantization.gptq.damp", "greater than 0"),
    ("model", "  symmetric: true\n", "  symmetric: true\n  gptq: {act_order: maybe}\n", "quantization.gptq.act_order", "boolean"),
    ("model", "  symmetric: true\n", "  symmetric: true\n  overrides:\n    - {match: '*.down_proj', bits: 5}\n",
     "quantization.overrides[0].bits", "2, 3, 4, 6 or 8"),
    ("model", "  symmetric: true\n", "  symmetric: true\n  overrides:\n    - {match: '*.down_proj'}\n",
     "quantization.overrides[0]", "sets nothing"),
    ("model", "  symmetric: true\n", "  symmetric: true\n  overrides:\n    - {match: '*.down_proj', group_size: 12}\n",
     "quantization.overrides[0].group_size", "power of two"),
    ("model", "  symmetric: true\n", "  symmetric: true\n  overrides:\n    - {match: '*.down_proj', bitz: 8}\n",
     "quantization.overrides[0].bitz", "unknown field"),
    ("model", "  symmetric: true\n", "  symmetric: true\n  overrides:\n    - {match: '*.o_proj', bits: 8}\n    - {match: '*.o_proj', bits: 3}\n",
     "quantization.overrides[1].match", "same pattern as overrides[0]"),
    ("model", "  symmetric: true\n", "  symmetric: false\n  overrides:\n    - {match: '*.o_proj', bits: 3}\n    - {match: '*.down_proj', bits: 8}\n",
     "quantization.overrides[1]", "resolves to 8-bit asymmetric"),
    ("model", "  symmetric: true\n", "  symmetric: true\n  overrides:\n    - {match: '', bits: 8}\n",
     "quantization.overrides[0].match", "at least 1 character"),
    ("model", "  bits: 4\n  group_size: 32\n  symmetric: true\n", "  bits: 8\n  group_size: 32\n  symmetric: false\n",
     "quantization", "8-bit asymmetric is not supported"),
    # infinite floats (YAML .inf) are refused in every float field, and so are figures whose unit
    # conversion overflows to infinity
    ("cluster", "      - sku: L4", "      - sku: L4\n        overrides: {memory_gib: .inf}",
     "nodes[0].gpus[1].overrides.memory_gib", "finite number"),
    ("cluster", "      - sku: L4", "      - sku: L4\n        overrides: {fp16_tflops: .inf}",
     "nodes[0].gpus[1].overrides.fp16_tflops", "finite number"),
    ("cluster", "      - sku: L4", "      - sku: L4\n        overrides: {memory_bandwidth_gbs: .inf}",
     "nodes[0].gpus[1].overrides.memory_bandwidth_gbs", "finite number"),
    ("cluster", "name: test-lab", "name: test-lab\nmemory_reserve_gib: .inf", "memory_reserve_gib", "finite number"),
    ("cluster", "name: test-lab", "name: test-lab\nnetwork: {bandwidth_gbs: .inf}", "network.bandwidth_gbs", "finite number"),
    ("model", "  max_perplexity_increase_pct: 50", "  max_perplexity_increase_pct: .inf",
     "quality.max_perplexity_increase_pct", "finite number"),
    ("cluster", "      - sku: L4", "      - sku: L4\n        overrides: {memory_gib: 1e300}",
     "nodes[0].gpus[1].overrides.memory_gib", "too large"),
    ("cluster", "name: test-lab", "name: test-lab\nnetwork: {bandwidth_gbs: 1e300}", "network.bandwidth_gbs", "too large"),
    # a custom SKU declared twice (names are case-insensitive, as in gpus[].sku)
    ("cluster", "name: test-lab", "name: test-lab\nskus:\n"
     "  - {name: X9000, memory_gib: 10, fp16_tflops: 100, memory_bandwidth_gbs: 500, compute_capability: '8.9'}\n"
     "  - {name: x9000, memory_gib: 20, fp16_tflops: 100, memory_bandwidth_gbs: 500, compute_capability: '8.9'}",
     "skus[1].name", "duplicate of skus[0]"),
    # a key given twice in one mapping (yaml.safe_load would keep the last silently)
    ("model", "quality:\n", "quantization: {bits: 8}\nquality:\n", "line 18",
     "duplicate key 'quantization' (first given at line 13)"),
    ("cluster", "  - name: box-a\n", "  - name: box-a\n    name: box-b\n", "line 6",
     "duplicate key 'name' (first given at line 5)"),
]


@pytest.mark.parametrize("which,old,new,field,words", CASES, ids=[c[3] for c in CASES])
def test_malformed_config_exits_2_with_one_line(configs, which, old, new, field, words):
    model, cluster = configs
    path = model if which == "model" else cluster
    text = path.read_text()
    assert old in text, "test case does not apply to the fixture"
    path.write_text(text.replace(old, new, 1))
    result = validate(model, cluster)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"llmc: error: {path}: {field}"), lines[0]
    assert words in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("which,bad", [("cluster", b"\xe9"), ("model", b"\xff")])
def test_non_utf8_config_exits_2_with_one_line(configs, which, bad):
    model, cluster = configs
    path = model if which == "model" else cluster
    raw = path.read_bytes()
    path.write_bytes(raw + b"# caf" + bad + b"\n")
    result = validate(model, cluster)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    line = raw.count(b"\n") + 1
    assert lines[0] == (f"llmc: error: {path}: line {line}: not valid UTF-8 "
                        f"(byte 0x{bad[0]:02X} at offset {len(raw) + 5}); save the file as UTF-8"), lines[0]
    assert "Traceback" not in result.output


def test_yaml_merge_keys_are_not_duplicates(configs):
    _, cluster = configs
    cluster.write_text(cluster.read_text().replace(
        "      - sku: L4", "      - sku: L4\n        overrides:\n          <<: {memory_gib: 8, pcie_gbs: 16}\n"
        "          memory_gib: 20"))
    from llmc.config import load_cluster_config

    devices = load_cluster_config(cluster)[1].devices
    assert devices[1].sku.memory_bytes == 20 * 2**30 and devices[1].sku.pcie_bytes_per_s == 16e9


def test_missing_file_is_a_usage_error(configs, tmp_path):
    result = validate(configs[0], tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert "nope.yaml: no such file" in result.stderr


def test_overrides_and_custom_skus_reach_the_devices(configs):
    from llmc.config import load_cluster_config

    _, cluster = configs
    cluster.write_text(
        cluster.read_text().replace("      - sku: L4", "      - sku: L4\n        overrides: {memory_gib: 20}")
        + "skus:\n  - {name: X9000, memory_gib: 10, fp16_tflops: 100, memory_bandwidth_gbs: 500, compute_capability: '8.9'}\n"
        + "  - {name: spare, memory_gib: 4, fp16_tflops: 10, memory_bandwidth_gbs: 100, compute_capability: '7.5'}\n"
    )
    text = cluster.read_text().replace(
        "overrides: {memory_gib: 20}\n", "overrides: {memory_gib: 20}\n      - sku: x9000\n        count: 2\n", 1
    )
    cluster.write_text(text)
    _, resolved = load_cluster_config(cluster)
    names = [(d.name, d.sku.name, d.sku.memory_bytes) for d in resolved.devices]
    assert names[1] == ("box-a/gpu1", "L4", 20 * 2**30)
    assert names[2:] == [("box-a/gpu2", "X9000", 10 * 2**30), ("box-a/gpu3", "X9000", 10 * 2**30)]
    assert resolved.devices[-1].link_to_next_bytes_s is None


def test_schema_lists_descriptions():
    result = CliRunner().invoke(cli, ["schema"])
    schemas = json.loads(result.stdout)
    props = schemas["cluster.yaml"]["$defs"]["GpuGroup"]["properties"]
    assert all("description" in p for p in props.values())


def test_validate_imports_no_heavy_packages(configs):
    import subprocess
    import sys

    code = (
        "import sys; from llmc.cli import cli; "
        f"cli(['validate', {str(configs[0])!r}, {str(configs[1])!r}], standalone_mode=False); "
        "heavy = [m for m in ('torch', 'transformers', 'onnx', 'onnxruntime') if m in sys.modules]; "
        "print('HEAVY', heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_quantization_rules_with_overrides_validate(configs):
    from llmc.config import load_model_config
    from llmc.schemes import Override, resolve_schemes, rules_from_config

    model, cluster = configs
    model.write_text(model.read_text().replace("  method: rtn\n", "  method: gptq\n").replace(
        "  symmetric: true\n",
        "  symmetric: true\n  gptq: {act_order: true, damp: 0.02}\n  ignore: [lm_head, '*.v_proj']\n"
        "  overrides:\n    - {match: 'model.layers.0.*', method: rtn, bits: 8, group_size: -1}\n"
        "    - {match: '*.down_proj', bits: 3, symmetric: false}\n",
    ))
    assert validate(model, cluster).exit_code == 0
    rules = rules_from_config(load_model_config(model)[0].quantization)
    assert rules.method == "gptq" and rules.overrides[1] == Override("*.down_proj", None, 3, None, False)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj",
             "model.layers.1.self_attn.q_proj"]
    schemes = resolve_schemes(names, rules)
    assert [(s.method, s.bits, s.group_size, s.symmetric) if s else None for s in schemes.values()] == [
        ("rtn", 8, -1, True), ("gptq", 3, 32, False), None, ("gptq", 4, 32, True)
    ]
