"""`llmc run`: the stage graphs as a pipeline of processes over torch.distributed (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmc.cli import cli
from llmc.errors import VerificationError
from llmc.run import RunResult, check_against_references, make_job, read_reference, verify

MODEL = {"hidden_size": 64, "vocab_size": 128}


def test_micro_batches_group_prompts_of_equal_length_in_order():
    job = make_job([[1, 2], [3, 4, 5], [6, 7], [8, 9], [1]], new_tokens=4, micro_batch_size=2, model=MODEL)
    assert [mb.prompts for mb in job.micro_batches] == [(0, 2), (3,), (1,), (4,)]
    assert [mb.prompt_len for mb in job.micro_batches] == [2, 2, 3, 1]


@pytest.mark.slow  # subprocesses: tens of seconds
def test_run_reproduces_the_reference_across_stage_processes(pipeline_build):
    prompts = ["the quick brown fox", "a stitch in time", "all that glitters", "the early bird"]
    result = CliRunner().invoke(cli, ["run", str(pipeline_build), *sum((["--prompt", p] for p in prompts), []),
                                      "--new-tokens", "8", "--micro-batch-size", "2", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["status"] == "ok" and doc["stages"] == 3 and doc["prompts"] == prompts
    assert all(len(t) == 8 for t in doc["tokens"]) and doc["tokens_per_s"] > 0
    assert doc["micro_batches"] >= 2
    assert [c["match"] for c in doc["checks"]] == [True] * 4
    # The check prompt is compared with the torch tokens recorded at compile, the others with a
    # one-process run of the same graphs.
    recorded = read_reference(pipeline_build)["prompts"][0]
    assert doc["tokens"][0][:len(recorded["tokens"])] == recorded["tokens"][:8]
    assert "recorded at compile" in doc["checks"][0]["reference"]
    assert "in sequence in one process" in doc["checks"][1]["reference"]
    assert len(doc["stage_busy_s"]) == 3 and 0 <= doc["bubble_fraction"] < 1


def _result(tokens) -> RunResult:
    return RunResult(prompts=["the quick brown fox"], tokens=[tokens], texts=[""], stages=3, micro_batches=1,
                     micro_batch_size=1, new_tokens=len(tokens), wall_s=1.0, first_token_s=0.1, tokens_per_s=6.0,
                     stage_busy_s=[0.1, 0.1, 0.1], bubble_fraction=0.9)


def test_tokens_that_differ_from_the_reference_fail_verification(pipeline_build):
    expected = read_reference(pipeline_build)["prompts"][0]["tokens"]
    ok = check_against_references(pipeline_build, _result(list(expected)))
    verify(ok)
    wrong = check_against_references(pipeline_build, _result(expected[:2] + [(expected[2] + 1) % 128] + expected[3:]))
    with pytest.raises(VerificationError, match="differ from the reference for 1 of 1 prompts .* at token 2"):
        verify(wrong)


def test_a_stage_outside_the_launcher_needs_the_torchrun_environment(pipeline_build):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, "-m", "llmc.cli", "run-stage", str(pipeline_build)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "needs the torchrun environment: RANK" in result.stderr


def test_run_refuses_a_directory_that_is_not_a_build(tmp_path):
    result = CliRunner().invoke(cli, ["run", str(tmp_path)])
    assert result.exit_code == 2 and "not an llmc build directory" in result.stderr


@pytest.mark.slow
def test_the_emitted_shell_launcher_runs_the_pipeline_with_torchrun(pipeline_build, tmp_path):
    """manifests/shell/<cluster>.sh, as on bare metal, with both 'nodes' on this host."""
    script = pipeline_build / "manifests/shell/tiny-lab.sh"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29400 + os.getpid() % 500), GLOO_SOCKET_IFNAME="lo",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    nodes = {}
    for node in ("box-a", "box-b"):
        log = (tmp_path / f"{node}.log").open("w")
        nodes[node] = (subprocess.Popen(["bash", str(script), node, "--device", "cpu"], env=env, stdout=log,
                                        stderr=subprocess.STDOUT), log)
    deadline = time.monotonic() + 300
    try:
        for process, _ in nodes.values():
            process.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        for process, log in nodes.values():
            if process.poll() is None:
                process.kill()
            log.close()
    output = (tmp_path / "box-a.log").read_text()
    assert all(p.returncode == 0 for p, _ in nodes.values()), output + (tmp_path / "box-b.log").read_text()
    assert "[greedy tokens match the reference]" in output and "3 stage processes" in output


@pytest.mark.slow
def test_ray_places_one_actor_per_stage_by_sku(pipeline_build):
    pytest.importorskip("ray")
    result = CliRunner().invoke(cli, ["run", str(pipeline_build), "--ray", "local", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout[result.stdout.index("{"):])
    assert doc["stages"] == 3 and all(c["match"] for c in doc["checks"])


@pytest.mark.slow
def test_the_example_pipeline_reproduces_the_reference_tokens(example_build):
    command = [sys.executable, "-m", "llmc.cli", "run", str(example_build), "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    print(f"\nllmc run on the example: {doc['tokens_per_s']:.1f} tokens/s, {doc['texts'][0]!r}")
    stages = len(json.loads((example_build / "plan.json").read_text())["stages"])
    assert doc["stages"] == stages and doc["checks"][0]["match"] and "recorded at compile" in doc["checks"][0]["reference"]
