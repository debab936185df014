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
    ("model", "  bits: 4", "  bits: 5", "quantization.bits", "4 or 8"),
    ("model", "  group_size: 32", "  group_size: 100", "quantization.group_size", "power of two"),
    ("model", "apiVersion: llmc/v1", "apiVersion: llmc/v2", "apiVersion", "llmc/v1"),
    ("cluster", "kind: Cluster", "kind: Model", "kind", "expected 'Cluster'"),
    ("cluster", "      - sku: L4", "      - sku: L4\n        count: 0", "nodes[0].gpus[1].count", "greater than or equal to 1"),
    ("cluster", "  - name: box-a", "  - name: Box_A", "nodes[0].name", "pattern"),
    ("model", "  batch: 2", "  batch: 0", "workload.batch", "greater than or equal to 1"),
    ("model", "  path: calib.txt", "  path: missing.txt", "calibration.path", "does not exist"),
    ("model", "  windows: 4\nevaluation", "  windows: many\nevaluation", "calibration.windows", "integer"),
    ("cluster", "      - sku: L4", "      - sku: L4\n        overrides: {memory_gib: -8}", "nodes[0].gpus[1].overrides.memory_gib", "greater than 0"),
    ("cluster", "name: test-lab", "name: test-lab\nskus:\n  - name: X9000\n    memory_gib: 10", "skus[0]", "needs fp16_tflops"),
    ("model", "kind: Model", "kind: Model\nkind: [", "line", "invalid YAML"),
    ("cluster", "name: test-lab\n", "", "name", "required field is missing"),
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
