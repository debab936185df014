"""Shared fixtures: a tiny local model directory and config files pointing at it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from llmc.testing import TINY_TEXT, write_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


MODEL_YAML = """\
apiVersion: llmc/v1
kind: Model
model:
  path: {model}
calibration:
  path: calib.txt
  seq_len: 32
  windows: 4
evaluation:
  path: eval.txt
  seq_len: 32
  windows: 4
quantization:
  method: rtn
  bits: 4
  group_size: 32
  symmetric: true
quality:
  max_perplexity_increase_pct: 50
workload:
  batch: 2
  prompt_tokens: 64
  generated_tokens: 16
check:
  prompt: "the quick brown fox"
  new_tokens: 6
"""

CLUSTER_YAML = """\
apiVersion: llmc/v1
kind: Cluster
name: test-lab
nodes:
  - name: box-a
    gpus:
      - sku: A100-40G
      - sku: L4
"""


@pytest.fixture
def configs(tmp_path, tiny_model_dir):
    """(model.yaml, cluster.yaml) for the tiny model; tests may rewrite either file."""
    (tmp_path / "calib.txt").write_text(TINY_TEXT)
    (tmp_path / "eval.txt").write_text(TINY_TEXT[::-1])
    model = tmp_path / "model.yaml"
    model.write_text(MODEL_YAML.format(model=tiny_model_dir))
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER_YAML)
    return model, cluster


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true", default=False,
                     help="Rewrite golden files (and docs/report.png) from the current output.")


@pytest.fixture
def update_goldens(request) -> bool:
    return request.config.getoption("--update-goldens")


# Three stages on two nodes, two SKUs: devices too small for the tiny model's four layers on one.
PIPELINE_CLUSTER_YAML = """\
apiVersion: llmc/v1
kind: Cluster
name: tiny-lab
memory_reserve_gib: 0
nodes:
  - name: box-a
    gpus:
      - {sku: pico, count: 2}
  - name: box-b
    gpus:
      - {sku: nano}
skus:
  - {name: pico, memory_gib: 0.00012, fp16_tflops: 1, memory_bandwidth_gbs: 10, compute_capability: '8.0'}
  - {name: nano, memory_gib: 0.00012, fp16_tflops: 2, memory_bandwidth_gbs: 20, compute_capability: '8.9'}
"""


@pytest.fixture(scope="session")
def pipeline_build(tmp_path_factory, tiny_model_dir) -> Path:
    """A compiled build of the tiny model in three stages (compiled once per test session)."""
    from click.testing import CliRunner

    from llmc.cli import cli

    root = tmp_path_factory.mktemp("pipeline")
    (root / "calib.txt").write_text(TINY_TEXT)
    (root / "eval.txt").write_text(TINY_TEXT[::-1])
    (root / "model.yaml").write_text(MODEL_YAML.format(model=tiny_model_dir))
    (root / "cluster.yaml").write_text(PIPELINE_CLUSTER_YAML)
    result = CliRunner().invoke(cli, ["compile", str(root / "model.yaml"), str(root / "cluster.yaml"),
                                      "-o", str(root / "out"), "--cache-dir", str(root / "cache")])
    assert result.exit_code == 0, result.output
    return root / "out"


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "smollm2"


@pytest.fixture(scope="session")
def example_build(tmp_path_factory) -> Path:
    """The bundled example compiled once per session (slow tests only; needs fetch_assets.py)."""
    import subprocess
    import sys

    if not (EXAMPLE / "assets" / "model").is_dir():
        pytest.fail(f"{EXAMPLE / 'assets'} is missing: run `python examples/fetch_assets.py` first")
    root = tmp_path_factory.mktemp("example")
    command = [sys.executable, "-m", "llmc.cli", "compile", str(EXAMPLE / "model.yaml"), str(EXAMPLE / "cluster.yaml"),
               "-o", str(root / "out"), "--cache-dir", str(root / "cache"), "-q"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return root / "out"
