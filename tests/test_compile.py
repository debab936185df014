"""`llmc compile` / `plan` / `inspect` as a user runs them, on the tiny local model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from llmc.artifacts import reproducible_sums, verify_sums
from llmc.cli import cli


def llmc(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def compile_(configs, out, cache, *extra):
    return llmc("compile", *configs, "-o", out, "--cache-dir", cache, *extra)


EXPECTED_FILES = {
    "SHA256SUMS", "receipt.json", "plan.json", "report.md",
    "manifests/box-a-gpu0.yaml", "manifests/box-a-gpu1.yaml",
}


def test_compile_writes_the_documented_layout(configs, tmp_path):
    out = tmp_path / "out"
    result = compile_(configs, out, tmp_path / "cache", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert EXPECTED_FILES <= files
    assert set(doc["files"]) == files
    plan = json.loads((out / "plan.json").read_text())
    graphs = {f"stages/stage_{s['index']}.onnx" for s in plan["stages"]}
    assert graphs <= files
    measured = {m["name"]: m["value"] for m in plan["measured"]}
    assert measured["export.greedy_tokens_match"] == 1.0
    assert measured["perplexity.compressed"] > 0 and measured["perplexity.reference"] > 0
    assert [p["name"] for p in doc["passes"]] == [
        "ingest", "calibrate", "plan", "quantize-rtn", "evaluate", "export", "build-engines", "manifests", "report"
    ]
    receipt = json.loads((out / "receipt.json").read_text())
    assert receipt["command"][:2] == ["llmc", "compile"] and receipt["seed"] == 0
    assert verify_sums(out) == []
    inspected = llmc("inspect", out)
    assert inspected.exit_code == 0 and "all match SHA256SUMS" in inspected.stdout


def test_identical_inputs_give_identical_bytes(configs, tmp_path):
    import shutil

    out, cache = tmp_path / "out", tmp_path / "cache"
    assert compile_(configs, out, cache).exit_code == 0
    first = reproducible_sums(out)
    shutil.rmtree(cache)  # recompute everything, not a cache replay
    assert compile_(configs, out, cache).exit_code == 0
    # Everything but the TensorRT engines, which TensorRT does not build byte for byte twice.
    assert reproducible_sums(out) == first and "engines/" in (out / "SHA256SUMS").read_text()


def test_inspect_notices_a_changed_file(configs, tmp_path):
    out = tmp_path / "out"
    assert compile_(configs, out, tmp_path / "cache").exit_code == 0
    with (out / "report.md").open("a") as fh:
        fh.write("edited\n")
    result = llmc("inspect", out)
    assert result.exit_code == 6 and "report.md" in result.stderr


def test_a_failed_compile_leaves_the_previous_build_intact(configs, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert compile_(configs, out, cache).exit_code == 0
    before = (out / "SHA256SUMS").read_text()
    model, _ = configs
    model.write_text(model.read_text().replace("max_perplexity_increase_pct: 50", "max_perplexity_increase_pct: 0.0001")
                     .replace("bits: 4", "bits: 4\n  group_size: 64").replace("  group_size: 32\n", ""))
    result = compile_(configs, out, cache)
    assert result.exit_code == 6, result.output
    assert "quality target" in result.stderr and "(in 'evaluate' after [ingest, calibrate, plan, quantize-rtn])" in result.stderr
    assert (out / "SHA256SUMS").read_text() == before and verify_sums(out) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_refuses_to_replace_a_directory_that_is_not_a_build(configs, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    result = compile_(configs, precious, tmp_path / "cache")
    assert result.exit_code == 2 and "refusing to replace it" in result.stderr
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_infeasible_cluster_exits_3_with_the_numbers(configs):
    model, cluster = configs
    cluster.write_text(
        "apiVersion: llmc/v1\nkind: Cluster\nname: tiny\nmemory_reserve_gib: 0\n"
        "nodes:\n  - name: n0\n    gpus:\n      - {sku: pico, count: 2}\n"
        "skus:\n  - {name: pico, memory_gib: 0.00001, fp16_tflops: 1, memory_bandwidth_gbs: 10, compute_capability: '8.0'}\n"
    )
    result = llmc("plan", model, cluster, "--cache-dir", model.parent / "cache")
    assert result.exit_code == 3, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert "KiB" in line or "MiB" in line, line


def test_workload_that_does_not_fit_exits_4_with_the_largest_batch(configs):
    model, cluster = configs
    model.write_text(model.read_text().replace("batch: 2", "batch: 4096").replace("prompt_tokens: 64", "prompt_tokens: 100000"))
    result = llmc("plan", model, cluster, "--cache-dir", model.parent / "cache", "--json")
    assert result.exit_code == 4, result.output
    error = json.loads(result.stdout)
    assert error["exit_code"] == 4 and "at most batch" in error["message"]


def test_plan_prints_the_report_without_changing_weights(configs):
    model, cluster = configs
    result = llmc("plan", model, cluster, "--cache-dir", model.parent / "cache")
    assert result.exit_code == 0, result.output
    assert "| 0 | box-a/gpu0 |" in result.stdout and "Nothing measured" in result.stdout


@pytest.mark.parametrize("edit,field", [
    (("check:", "planner:\n  micro_batch_sizes: [8]\ncheck:"), "planner.micro_batch_sizes[0]"),  # plan options
    (("symmetric: true", "symmetric: true\n  targets: ['model.layer.*']"), "quantization.targets[0]"),  # in a pass
])
def test_config_errors_name_the_file_given_not_model_yaml(configs, edit, field):
    model, cluster = configs
    renamed = model.with_name("smol-int4.yaml")
    assert edit[0] in model.read_text()
    renamed.write_text(model.read_text().replace(*edit))
    result = llmc("plan", renamed, cluster, "-q", "--cache-dir", model.parent / "cache")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"llmc: error: {renamed}: {field}: ") and result.stderr.count("\n") == 1


@pytest.mark.slow  # subprocesses: tens of seconds
def test_a_killed_compile_keeps_the_old_build_and_the_next_run_resumes(configs, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert compile_(configs, out, cache).exit_code == 0
    before = (out / "SHA256SUMS").read_text()
    model, cluster = configs
    model.write_text(model.read_text().replace("bits: 4", "bits: 8"))
    command = [sys.executable, "-m", "llmc.cli", "compile", str(model), str(cluster), "-o", str(out),
               "--cache-dir", str(cache), "--json"]
    existing = {p.name for p in cache.iterdir()}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    # Kill as soon as the new quantization is cached: evaluate and export are still ahead.
    while not any(p.name.startswith("quantize-rtn-") and p.name not in existing for p in cache.iterdir()):
        assert process.poll() is None, "compile ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert (out / "SHA256SUMS").read_text() == before and verify_sums(out) == []

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    passes = {p["name"]: p["cached"] for p in json.loads(resumed.stdout)["passes"]}
    assert passes["ingest"] and passes["calibrate"] and passes["plan"] and passes["quantize-rtn"]
    assert not passes["evaluate"] and not passes["export"]
    assert (out / "SHA256SUMS").read_text() != before and verify_sums(out) == []


def test_an_internal_error_exits_1_keeping_its_traceback():
    import click

    from llmc.cli import _handles_errors
    from llmc.errors import PassError

    def broken_pass():
        return {}["missing"]

    @click.command()
    @_handles_errors
    def command():
        try:
            broken_pass()
        except KeyError as e:
            raise PassError("quantize-rtn", ["ingest"], e) from e

    result = CliRunner().invoke(command, [])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "in broken_pass" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == "llmc: error: 'missing' (in 'quantize-rtn' after [ingest])"


def test_print_after_prints_a_cached_pass_too_and_refuses_an_unknown_pass(configs, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    for run in ("fresh", "cached"):
        result = compile_(configs, out, cache, "--print-after", "plan", "-q")
        assert result.exit_code == 0, result.output
        assert result.stdout.count("# --- program after 'plan'") == 1, run
    result = compile_(configs, tmp_path / "other", cache, "--print-after", "plans")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "llmc: error: --print-after: 'plans' is not a pass of this run (ingest, calibrate, plan, quantize-rtn, "
        "evaluate, export, build-engines, manifests, report, or all)"]
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("edit,field", [
    (("method: rtn", "method: fpx"), "quantization.bits"),
    (("symmetric: true", "symmetric: true\n  overrides:\n    - {match: '*.down_proj', method: fpx}"),
     "quantization.overrides[0]"),
])
def test_a_compile_with_fp8_linears_is_refused_before_any_pass(configs, tmp_path, edit, field):
    model, _ = configs
    model.write_text(model.read_text().replace("bits: 4", "bits: 8").replace(*edit))
    result = compile_(configs, tmp_path / "out", tmp_path / "cache", "-q")
    assert result.exit_code == 2, result.output
    assert result.stderr == f"llmc: error: {model}: {field}: FP8 e4m3 (method fpx, bits 8) has no ONNX export, so " \
        "llmc compile cannot deploy it; use FP6 or FP4 (bits 6 or 4), or int8 (method rtn)\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("edit,field", [
    (("bits: 4\n  group_size: 32", "bits: 3\n  group_size: 16"), "quantization.group_size"),
    (("symmetric: true", "symmetric: true\n  overrides:\n    - {match: '*.down_proj', bits: 3, group_size: 8}"),
     "quantization.overrides[0].group_size"),
    (("group_size: 32", "group_size: 16"), "quantization.group_size"),  # with planner.bits [3, 4] below
])
def test_a_compile_with_int3_groups_that_split_a_tile_is_refused_before_any_pass(configs, tmp_path, edit, field):
    model, _ = configs
    text = model.read_text().replace(*edit)
    if field == "quantization.group_size" and "bits: 3" not in text:
        text = text.replace("check:", "planner:\n  bits: [3, 4]\ncheck:")
    model.write_text(text)
    result = compile_(configs, tmp_path / "out", tmp_path / "cache", "-q")
    assert result.exit_code == 2, result.output
    size = 8 if "overrides" in field else 16
    assert result.stderr == f"llmc: error: {model}: {field}: {size} does not fit int3, whose export packs codes in " \
        "tiles of 32 inputs; use a multiple of 32, or -1\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_validate_makes_the_checks_compile_makes_before_its_first_pass(configs):
    model, cluster = configs
    assert llmc("validate", model, cluster).exit_code == 0
    model.write_text(model.read_text().replace("check:", "planner:\n  micro_batch_sizes: [8]\ncheck:"))
    result = llmc("validate", model, cluster)
    assert result.exit_code == 2
    assert result.stderr == f"llmc: error: {model}: planner.micro_batch_sizes[0]: 8 is larger than workload.batch (2)\n"


def test_a_build_replaces_the_old_one_in_one_exchange(tmp_path):
    from llmc.artifacts import exchange

    old, new = tmp_path / "out", tmp_path / ".out.tmp"
    for d, name in ((old, "old.txt"), (new, "new.txt")):
        d.mkdir()
        (d / name).write_text(name)
    assert exchange(new, old)  # Linux: renameat2(RENAME_EXCHANGE); OUT never missing
    assert [p.name for p in old.iterdir()] == ["new.txt"] and [p.name for p in new.iterdir()] == ["old.txt"]
    assert not exchange(tmp_path / "missing", old) and [p.name for p in old.iterdir()] == ["new.txt"]
