"""Bad build directories and bad `-o` paths through the real CLI: one `llmc: error:` line naming the
file (and field) with the documented exit code, never a traceback.

Every test edits a copy of the session's compiled tiny build (``pipeline_build``, compiled once).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmc.cli import cli

def llmc(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(result, code: int) -> str:
    """The one-line error of a command that exited ``code`` without a traceback."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # an LlmcError, not a crash
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("llmc: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[-1]


@pytest.fixture
def build(pipeline_build, tmp_path) -> Path:
    copy = tmp_path / "build"
    shutil.copytree(pipeline_build, copy)
    return copy


def rewrite_sums(build: Path) -> None:
    """SHA256SUMS as if the build had been written with its current files (the sums verify)."""
    names = [line.split("  ", 1)[1] for line in (build / "SHA256SUMS").read_text().splitlines()]
    (build / "SHA256SUMS").write_text(
        "".join(f"{hashlib.sha256((build / n).read_bytes()).hexdigest()}  {n}\n" for n in names)
    )


# --------------------------------------------------------------------------- 1. plan.json changed


def truncate_plan(build: Path) -> None:
    plan = build / "plan.json"
    plan.write_text(plan.read_text()[:100])  # no longer JSON, no longer its sum


def test_inspect_reports_a_truncated_plan_as_a_changed_file(build):
    truncate_plan(build)
    line = error_line(llmc("inspect", build), 6)
    assert line == f"llmc: error: {build}: files differ from SHA256SUMS: plan.json"


def test_run_reports_a_truncated_plan_as_a_changed_file(build):
    truncate_plan(build)
    line = error_line(llmc("run", build), 6)
    assert line == f"llmc: error: {build}: files differ from SHA256SUMS: plan.json"


# --------------------------------------------------------------------------- 2. a listed file missing


def test_inspect_names_a_missing_receipt(build):
    (build / "receipt.json").unlink()
    line = error_line(llmc("inspect", build), 6)
    assert line == f"llmc: error: {build}: files differ from SHA256SUMS: receipt.json (missing)"


# --------------------------------------------------------------------------- 3. SHA256SUMS malformed


@pytest.mark.parametrize("bad_line", ["garbage-line", f"{'0' * 64}  ../outside.txt", f"{'0' * 63}  plan.json"])
@pytest.mark.parametrize("command", [["inspect"], ["build-engines", "--device", "pico"]])
def test_a_malformed_sums_line_is_named_with_its_number(build, command, bad_line):
    sums = build / "SHA256SUMS"
    lines = sums.read_text().splitlines()
    lines.insert(2, bad_line)
    sums.write_text("\n".join(lines) + "\n")
    line = error_line(llmc(command[0], build, *command[1:]), 6)
    assert line.startswith(f"llmc: error: {sums}: line 3: expected '<sha256>  <file in the build>', got {bad_line!r}")


# --------------------------------------------------------------------------- 4. plan.json lacks fields


@pytest.mark.parametrize("edit, expected", [
    (lambda doc: {}, "model: field required"),
    (lambda doc: {**doc, "stages": [{k: v for k, v in doc["stages"][0].items() if k != "index"}]},
     "stages[0].index: field required"),
    (lambda doc: {**doc, "stages": []}, "stages: list should have at least 1 item after validation, not 0"),
    (lambda doc: {**doc, "model": {**doc["model"], "hidden_size": "64"}},
     "model.hidden_size: input should be a valid integer"),
], ids=["empty", "stage-index", "no-stages", "hidden-size-type"])
@pytest.mark.parametrize("command", ["inspect", "run"])
def test_a_plan_without_the_fields_read_is_named_with_the_field(build, command, edit, expected):
    plan = build / "plan.json"
    plan.write_text(json.dumps(edit(json.loads(plan.read_text()))))
    rewrite_sums(build)  # the sums verify: the build was written like this, nothing changed since
    line = error_line(llmc(command, build), 2)
    assert line == f"llmc: error: {plan}: {expected}; not a build of this llmc: recompile it"


# --------------------------------------------------------------------------- 5. -o under a regular file


def test_compile_refuses_an_output_under_a_regular_file_before_any_pass(configs, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = llmc("compile", *configs, "-o", afile / "out", "--cache-dir", tmp_path / "cache")
    line = error_line(result, 2)
    assert line == (f"llmc: error: {afile / 'out'}: {afile} is not a directory, "
                    "so the build directory cannot be made there")
    assert "ingest" not in result.stderr  # no pass ran
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no cache, no staging directory
    assert afile.read_text() == "not a directory"
