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
