"""`build-engines`: TensorRT engines per stage and device type from the exported stage graphs.

TensorRT for RTX (``tensorrt-rtx-cu13``, in the ``tensorrt`` extra) builds engines on this CPU-only
host for SM75/80/86/89/120/121; SM90 (H100) is its recorded skip. The engines cannot run here.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from llmc.artifacts import sha256_file
from llmc.ir import Artifact, Layer, Linear, Plan, Program, SparsityDecision, Stage, StageMemory
from llmc.passes.build_engines import BuildEnginesPass, n_m_violations
from llmc.passes.export import build_stage_graph, decoder_spec_from_model
from llmc.pipeline import PassContext
from llmc.testing import tiny_llama

sys.path.insert(0, str(Path(__file__).parent))
from test_export import fpx_all_linears, quantize_all_linears  # noqa: E402

trt = pytest.importorskip("tensorrt_rtx", reason="the tensorrt extra (tensorrt-rtx-cu13) builds the engines")

LAYERS = 2
WORKLOAD = dict(batch=2, prompt_tokens=16, generated_tokens=8)


def filled(cls, **known):
    """An IR dataclass with the fields this pass reads set, every other one zero-like (the plan's
    cost figures do not matter to building engines)."""
    zero = {"int": 0, "float": 0.0, "str": "", "bool": False}  # annotations are strings in llmc.ir
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in known:
            values[f.name] = known[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            values[f.name] = zero.get(f.type, () if f.type.startswith("tuple") else None)
    return cls(**values)


def stage(index, sku, cc, start, end, layers=LAYERS):
    return filled(Stage, index=index, device=f"node/gpu{index}", sku=sku, compute_capability=cc, layer_start=start,
                  layer_end=end, holds_embedding=start == 0, holds_lm_head=end == layers,
                  memory=StageMemory(0, 0, 0, 0, 0, 1 << 30))


def compiled_program(tmp_path, model, quantized, placement, sparsity=()) -> tuple[Program, PassContext]:
    """A program after 'export': the stage graphs in the cache, the plan placing them on ``placement``."""
    spec, weights = decoder_spec_from_model(model), model.state_dict()
    (tmp_path / "export").mkdir()
    stages, artifacts = [], []
    bounds = [(0, 1), (1, LAYERS)] if len(placement) == 2 else [(0, LAYERS)]
    for index, ((sku, cc), (start, end)) in enumerate(zip(placement, bounds)):
        graph = build_stage_graph(spec, weights, start, end, quantized)
        (tmp_path / "export" / f"stage_{index}.onnx").write_bytes(graph.SerializeToString())
        stages.append(stage(index, sku, cc, start, end))
        artifacts.append(Artifact(f"stages/stage_{index}.onnx", f"export/stage_{index}.onnx", "onnx"))
    layers = tuple(
        Layer(i, tuple(Linear(n, m.in_features, m.out_features, m.bias is not None)
                       for n, m in model.named_modules() if n.startswith(f"model.layers.{i}.") and isinstance(m, torch.nn.Linear)))
        for i in range(LAYERS)
    )
    plan = filled(Plan, stages=tuple(stages), weight_bits=4, solver_status="OPTIMAL")
    program = Program(layers=layers, plan=plan, artifacts=tuple(artifacts), sparsity=tuple(sparsity))
    ctx = PassContext(cache_root=tmp_path, workdir=tmp_path / "build", entry="build", seed=0, show_progress=False)
    ctx.workdir.mkdir()
    return program, ctx


def run_pass(program, ctx) -> Program:
    p = BuildEnginesPass(**WORKLOAD)
    p.requires(program)
    result = p.run(program, ctx).program
    p.ensures(result)
    return result


@pytest.fixture(scope="module")
def asymmetric():
    model = tiny_llama(num_hidden_layers=LAYERS)
    return model, quantize_all_linears(model, bits=4, group_size=32, symmetric=False)


def metadata(ctx, record) -> dict:
    return json.loads((ctx.workdir / record.path).with_suffix(".json").read_text())


def test_engines_for_sm80_and_sm86_hold_the_plugin_and_the_packed_weights(tmp_path, asymmetric):
    model, quantized = asymmetric
    program, ctx = compiled_program(tmp_path, model, quantized, [("A100-40G", "8.0"), ("A10", "8.6")])
    result = run_pass(program, ctx)

    built = {e.sku: e for e in result.engines}
    assert {e.status for e in built.values()} == {"built"}
    assert built["A100-40G"].path == f"engines/A100-40G-sm80-trtrtx{trt.__version__}/stage_0.engine"
    assert built["A10"].path == f"engines/A10-sm86-trtrtx{trt.__version__}/stage_1.engine"
    assert {a.path for a in result.artifacts if a.kind in ("engine", "engine-metadata")} == {
        e.path for e in built.values()} | {e.path.replace(".engine", ".json") for e in built.values()}
    for sku, record in built.items():
        meta = metadata(ctx, record)
        graph = onnx.load(str(tmp_path / "export" / f"stage_{record.stage}.onnx"))
        nodes = [n for n in graph.graph.node if n.domain == "llmc"]
        assert meta["compute_capability"] == record.compute_capability and meta["sku"] == sku
        assert meta["tensorrt"] == {"flavor": "tensorrt_rtx", "version": trt.__version__}
        # The engine holds one plugin layer per plugin node of the ONNX it was built from.
        assert meta["plugins"] == [{"name": "IntNLinear", "namespace": "llmc", "version": "3", "layers": len(nodes)}]
        assert meta["network"]["plugin_layers"] == len(nodes) > 0
        assert record.plugins == (f"llmc::IntNLinear v3 x{len(nodes)}",)
        assert meta["onnx"]["sha256"] == sha256_file(tmp_path / "export" / f"stage_{record.stage}.onnx")
        assert meta["engine"]["bytes"] == (ctx.workdir / record.path).stat().st_size
        assert [i["name"] for i in meta["inputs"]] == [i.name for i in graph.graph.input]
        assert [o["name"] for o in meta["outputs"]] == [o.name for o in graph.graph.output]
        assert [p["name"] for p in meta["optimization_profiles"]] == ["prefill", "decode"]
        # int4 codes stay packed inside the engine: half a byte per weight, in int32 words.
        weights = sum(quantized[n.name.rsplit("/", 1)[0]].q.numel() for n in nodes)
        assert abs(meta["network"]["constant_bytes"]["INT32"] - weights / 2) < 64


@pytest.mark.parametrize(("name", "op"), [("e3m2", "Fp6Linear"), ("e2m1", "Fp4Linear")])
def test_fpx_engines_hold_their_plugin_and_the_codes_at_their_own_width(tmp_path, name, op):
    model = tiny_llama(num_hidden_layers=LAYERS)
    quantized = fpx_all_linears(model, name, 32)
    program, ctx = compiled_program(tmp_path, model, quantized, [("A100-40G", "8.0")])
    (record,) = run_pass(program, ctx).engines
    assert record.status == "built" and record.plugins == (f"llmc::{op} v2 x{len(quantized)}",)
    meta = metadata(ctx, record)
    assert meta["network"]["plugin_layers"] == len(quantized)
    # FP6: 6 bits per weight in int32 words; FP4: 4. The float16 scales stay float16.
    weights = sum(q.codes.numel() for q in quantized.values())
    bits = 6 if name == "e3m2" else 4
    assert abs(meta["network"]["constant_bytes"]["INT32"] - weights * bits / 8) < 64
    assert meta["network"]["constant_bytes"]["HALF"] >= weights / 32 * 2


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_int3_engines_hold_the_int3_plugin_and_three_bits_a_weight(tmp_path, symmetric):
    model = tiny_llama(num_hidden_layers=LAYERS)
    quantized = quantize_all_linears(model, bits=3, group_size=32, symmetric=symmetric)
    program, ctx = compiled_program(tmp_path, model, quantized, [("L4", "8.9")])
    (record,) = run_pass(program, ctx).engines
    assert record.status == "built" and record.plugins == (f"llmc::Int3Linear v1 x{len(quantized)}",)
    meta = metadata(ctx, record)
    assert meta["network"]["plugin_layers"] == len(quantized)
    # The two planes: 3 bits per weight in int32 words (the int4 container took 4).
    weights = sum(q.q.numel() for q in quantized.values())
    assert abs(meta["network"]["constant_bytes"]["INT32"] - weights * 3 / 8) < 64


def test_h100_is_a_recorded_skip_with_the_command_that_builds_it(tmp_path, asymmetric):
    model, quantized = asymmetric
    program, ctx = compiled_program(tmp_path, model, quantized, [("L4", "8.9"), ("H100-80G", "9.0")])
    result = run_pass(program, ctx)
    l4, h100 = sorted(result.engines, key=lambda e: e.stage)
    assert l4.status == "built" and l4.path.startswith("engines/L4-sm89-")
    assert h100.status == "skipped" and h100.path is None and h100.flavor is None
    assert h100.command == "llmc build-engines OUT --device H100-80G"
    assert "no sm90 builder here" in h100.reason and "sm80" in h100.reason
    assert not any("H100" in a.path for a in result.artifacts)


def test_without_tensorrt_every_target_is_a_recorded_skip(tmp_path, asymmetric, monkeypatch):
    import llmc.tensorrt

    monkeypatch.setattr(llmc.tensorrt, "installed_flavors", lambda: [])
    model, quantized = asymmetric
    program, ctx = compiled_program(tmp_path, model, quantized, [("A100-40G", "8.0")])
    (record,) = run_pass(program, ctx).engines
    assert record.status == "skipped" and "no TensorRT is installed here" in record.reason
    assert record.command == "llmc build-engines OUT --device A100-40G"


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest of every 4 consecutive inputs of each output row."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // 4, 4)
    keep = groups.abs().argsort(dim=-1, descending=True)[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(out_features, in_features)


def test_2_4_sparse_weights_set_the_sparse_weights_flag(tmp_path):
    model = tiny_llama(num_hidden_layers=LAYERS)
    name = "model.layers.0.mlp.up_proj"
    with torch.no_grad():
        model.get_submodule(name).weight.copy_(prune_2_4(model.get_submodule(name).weight))
    program, ctx = compiled_program(tmp_path, model, {}, [("A100-40G", "8.0"), ("L4", "8.9")],
                                    sparsity=[SparsityDecision(name, 2, 4)])
    first, second = sorted(run_pass(program, ctx).engines, key=lambda e: e.stage)
    # Layer 0 is stage 0's: its engine gets the flag, stage 1's does not.
    assert first.sparse_weights and metadata(ctx, first)["sparse_weights"]
    assert not second.sparse_weights and not metadata(ctx, second)["sparse_weights"]


def test_a_weight_marked_2_4_that_is_dense_builds_dense_with_a_warning(tmp_path, caplog):
    model = tiny_llama(num_hidden_layers=LAYERS)
    name = "model.layers.0.mlp.up_proj"
    program, ctx = compiled_program(tmp_path, model, {}, [("A100-40G", "8.0")], sparsity=[SparsityDecision(name, 2, 4)])
    (record,) = run_pass(program, ctx).engines
    assert record.status == "built" and not record.sparse_weights
    assert f"{name}: " in caplog.text and "building it without sparse weights" in caplog.text


def test_n_m_violations_counts_groups_along_the_input_dimension():
    mask = np.zeros((8, 3), dtype=bool)  # [in, out]
    mask[0:2, 0] = True  # 2 of 4: fine
    mask[4:7, 1] = True  # 3 of 4: one violation
    mask[[0, 4], 2] = True  # 1 and 1
    assert n_m_violations(mask, 2, 4) == 1
    assert n_m_violations(mask, 3, 4) == 0


# --- the build directory: `llmc inspect` preflight and `llmc build-engines` ---------------------


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, tiny_model_dir):
    """One compile of the tiny model on the conftest cluster (its one stage lands on the A100)."""
    from conftest import CLUSTER_YAML, MODEL_YAML

    from llmc.testing import TINY_TEXT

    root = tmp_path_factory.mktemp("compiled")
    (root / "calib.txt").write_text(TINY_TEXT)
    (root / "eval.txt").write_text(TINY_TEXT[::-1])
    (root / "model.yaml").write_text(MODEL_YAML.format(model=tiny_model_dir))
    (root / "cluster.yaml").write_text(CLUSTER_YAML)
    result = run_cli("compile", root / "model.yaml", root / "cluster.yaml", "-o", root / "out", "--cache-dir", root / "cache")
    assert result.exit_code == 0, result.output
    return root / "out"


@pytest.fixture
def build(compiled, tmp_path):
    import shutil

    return Path(shutil.copytree(compiled, tmp_path / "out"))


def run_cli(*args):
    from click.testing import CliRunner

    from llmc.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_inspect_preflights_the_engines_and_build_engines_rebuilds_them(build):
    from llmc.artifacts import verify_sums

    inspected = run_cli("inspect", build, "--json")
    assert inspected.exit_code == 0, inspected.output
    (check,) = json.loads(inspected.stdout)["engines"]
    assert check["status"] == "ok" and check["sku"] == "A100-40G" and check["compute_capability"] == "8.0"
    assert check["tensorrt"] == f"tensorrt_rtx {trt.__version__}" and check["engine"].endswith("/stage_0.engine")
    before = (build / "SHA256SUMS").read_text()

    rebuilt = run_cli("build-engines", build, "--device", "A100-40G", "--json")
    assert rebuilt.exit_code == 0, rebuilt.output
    (engine,) = json.loads(rebuilt.stdout)["engines"]
    assert engine["path"] == check["engine"] and engine["sku"] == "A100-40G"
    assert verify_sums(build) == [] and (build / "SHA256SUMS").read_text() != before
    assert run_cli("inspect", build).exit_code == 0

    elsewhere = run_cli("build-engines", build, "--device", "H100-80G")
    assert elsewhere.exit_code == 2 and "no stage of" in elsewhere.stderr and "A100-40G (box-a/gpu0)" in elsewhere.stderr


def test_preflight_stops_an_engine_built_for_another_compute_capability(build):
    from llmc.artifacts import SUMS, sha256_file

    (metadata_path,) = build.glob("engines/*/stage_0.json")
    meta = json.loads(metadata_path.read_text())
    meta["compute_capability"] = "8.6"  # as if built for an A10 and copied next to an A100's
    metadata_path.write_text(json.dumps(meta))
    name = metadata_path.relative_to(build).as_posix()
    sums = [line if not line.endswith(f"  {name}") else f"{sha256_file(metadata_path)}  {name}"
            for line in (build / SUMS).read_text().splitlines()]
    (build / SUMS).write_text("\n".join(sums) + "\n")
    result = run_cli("inspect", build)
    assert result.exit_code == 6
    assert "built for sm86, the device is sm80" in result.stderr and "wrong target" in result.stdout


def test_build_engines_without_a_builder_for_the_target_exits_5(build, monkeypatch):
    import llmc.tensorrt

    monkeypatch.setattr(llmc.tensorrt, "installed_flavors", lambda: [])
    result = run_cli("build-engines", build, "--device", "A100-40G")
    assert result.exit_code == 5 and "no TensorRT is installed here" in result.stderr
