"""The ``llmc`` command line.

Exit codes: 0 ok, 1 internal error (a bug: traceback kept), 2 usage or config error,
3 infeasible plan, 4 predicted out-of-memory, 5 toolchain or build failure,
6 verification failed. With ``--json`` the result (or the error) is one JSON document on
stdout; logs and progress always go to stderr.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from llmc import __version__
from llmc.errors import LlmcError

EPILOG = (
    "Exit codes: 0 ok, 1 internal error, 2 usage/config error, 3 infeasible plan, "
    "4 predicted out-of-memory, 5 toolchain/build failure, 6 verification failed."
)

log = logging.getLogger("llmc")


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("llmc: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    # Never reach for a model hub: every input is local (a safety net; loaders pass
    # local_files_only as well).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _emit(as_json: bool, payload: dict, text: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(payload, indent=2, sort_keys=True))
    elif text:
        click.echo(text)


def _handles_errors(command):
    """Turn an LlmcError into one line on stderr (and JSON on stdout) with its exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        as_json = kwargs.get("as_json", False)
        try:
            return command(*args, **kwargs)
        except LlmcError as e:
            if as_json:
                click.echo(json.dumps({"status": "error", "exit_code": e.exit_code, "message": str(e)}))
            click.echo(f"llmc: error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper


_json_option = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable result on stdout.")
_quiet_option = click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
_cache_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=lambda: Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmc",
    show_default="~/.cache/llmc",
    help="Where pass outputs are cached; a repeated or interrupted compile resumes from here.",
)
_model_arg = click.argument("model_yaml", type=click.Path(path_type=Path))
_cluster_arg = click.argument("cluster_yaml", type=click.Path(path_type=Path))


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmc")
def cli():
    """llmc: compile a Hugging Face causal LM for a heterogeneous GPU cluster."""


def _load(model_yaml: Path, cluster_yaml: Path):
    from llmc.config import load_cluster_config, load_model_config

    model, base = load_model_config(model_yaml)
    _, cluster = load_cluster_config(cluster_yaml)
    return model, base, cluster


@cli.command(epilog=EPILOG)
@_model_arg
@_cluster_arg
@_json_option
@_handles_errors
def validate(model_yaml: Path, cluster_yaml: Path, as_json: bool):
    """Check MODEL_YAML and CLUSTER_YAML (fast: configs and catalog only)."""
    model, _, cluster = _load(model_yaml, cluster_yaml)
    devices = [f"{d.name} ({d.sku.name})" for d in cluster.devices]
    _emit(
        as_json,
        {"status": "ok", "model": str(model_yaml), "cluster": str(cluster_yaml), "devices": devices},
        f"ok: {model_yaml} and {cluster_yaml} are valid; {len(devices)} devices: {', '.join(devices)}",
    )


@cli.command(epilog=EPILOG)
@click.option("--catalog", is_flag=True, help="Print the GPU catalog instead of the schemas.")
def schema(catalog: bool):
    """Print the JSON Schema of model.yaml and cluster.yaml (for editors)."""
    if catalog:
        from dataclasses import asdict

        from llmc.catalog import load_catalog

        click.echo(json.dumps({k: asdict(v) for k, v in load_catalog().items()}, indent=2))
        return
    from llmc.config import json_schemas

    click.echo(json.dumps(json_schemas(), indent=2, sort_keys=True))


def _run(model_yaml, cluster_yaml, cache_dir, through, quiet, as_json, print_after=None):
    from llmc.pipeline import build_pipeline, run_pipeline

    _setup_logging(quiet or as_json)
    model, base, cluster = _load(model_yaml, cluster_yaml)
    passes = build_pipeline(model, base, through=through)
    return model, cluster, run_pipeline(
        passes, cache_root=cache_dir, seed=model.seed, cluster=cluster,
        show_progress=not (quiet or as_json) and sys.stderr.isatty(), print_after=print_after,
    )


@cli.command(name="compile", epilog=EPILOG)
@_model_arg
@_cluster_arg
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Build directory to (re)place.")
@_cache_option
@click.option("--print-after", metavar="PASS", help="Print the program after PASS ('all' for every pass).")
@_quiet_option
@_json_option
@_handles_errors
def compile_(model_yaml, cluster_yaml, output, cache_dir, print_after, quiet, as_json):
    """Compile MODEL_YAML for CLUSTER_YAML into the build directory OUTPUT."""
    from llmc.artifacts import check_output_dir, write_output
    from llmc.pipeline import content_digest, tool_versions

    check_output_dir(output)
    model, cluster, run = _run(model_yaml, cluster_yaml, cache_dir, "report", quiet, as_json, print_after)
    receipt = {
        "llmc": __version__,
        "command": ["llmc", "compile", str(model_yaml), str(cluster_yaml), "-o", str(output),
                    "--cache-dir", str(cache_dir)],
        "inputs": {
            str(model_yaml): content_digest(model_yaml),
            str(cluster_yaml): content_digest(cluster_yaml),
            "model": run.program.model.source_sha256,
            "calibration": run.program.calibration.source_sha256 if run.program.calibration else None,
            "evaluation": run.program.evaluation.source_sha256 if run.program.evaluation else None,
        },
        "seed": model.seed,
        "versions": tool_versions(),
    }
    files = write_output(run.program, output, cache_dir, receipt)
    timings = [dict(name=t.name, seconds=round(t.seconds, 3), cached=t.cached, summary=t.summary) for t in run.timings]
    _emit(
        as_json,
        {"status": "ok", "output": str(output), "files": files, "passes": timings},
        f"wrote {output}/ ({len(files)} files); see {output}/report.md",
    )


@cli.command(epilog=EPILOG)
@_model_arg
@_cluster_arg
@_cache_option
@_quiet_option
@_json_option
@_handles_errors
def plan(model_yaml, cluster_yaml, cache_dir, quiet, as_json):
    """Plan only: load, estimate memory, solve the partition and print the report."""
    from llmc.passes.report import plan_document, render_markdown

    model, cluster, run = _run(model_yaml, cluster_yaml, cache_dir, "plan", quiet, as_json)
    doc = plan_document(run.program, cluster.name, model.workload.model_dump())
    _emit(as_json, doc, render_markdown(doc))


@cli.command(epilog=EPILOG)
@click.argument("build_dir", type=click.Path(path_type=Path))
@_json_option
@_handles_errors
def inspect(build_dir: Path, as_json: bool):
    """Summarise a build directory and check its files against SHA256SUMS."""
    from llmc.artifacts import SUMS, verify_sums
    from llmc.errors import InputError, VerificationError

    if not (build_dir / "plan.json").is_file() or not (build_dir / SUMS).is_file():
        raise InputError(f"{build_dir}: not an llmc build directory (no plan.json or {SUMS})")
    doc = json.loads((build_dir / "plan.json").read_text())
    receipt = json.loads((build_dir / "receipt.json").read_text())
    bad = verify_sums(build_dir)
    stages = [
        f"  stage {s['index']}: {s['device']} ({s['sku']}, sm{s['compute_capability'].replace('.', '')}) "
        f"layers {s['layer_start']}-{s['layer_end'] - 1}"
        for s in doc["stages"]
    ]
    measured = [f"  {m['name']}: {m['value']} {m['unit']}".rstrip() for m in doc["measured"]]
    text = "\n".join(
        [
            f"{build_dir}: {doc['model']['architecture']} on {doc['cluster']}, "
            f"{doc['quantization']['summary']}, llmc {receipt['llmc']}",
            "stages:", *stages,
            f"predicted: {doc['predicted']['tokens_per_s']:.1f} tokens/s, "
            f"batch latency {doc['predicted']['batch_latency_s'] * 1e3:.1f} ms",
            "measured:", *measured,
            f"files: all match {SUMS}",
        ]
    )
    if bad:
        raise VerificationError(f"{build_dir}: files differ from {SUMS}: {', '.join(bad)}")
    _emit(as_json, {"status": "ok", "plan": doc, "receipt": receipt}, text)


def main() -> None:
    cli(prog_name="llmc")


if __name__ == "__main__":
    main()
