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
import traceback
from pathlib import Path

import click

from llmc import __version__
from llmc.errors import EXIT_INTERNAL, LlmcError

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
    """Turn an LlmcError into one line on stderr (and JSON on stdout) with its exit code; for an
    internal error (exit 1, a bug) the traceback of its cause goes to stderr first."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        as_json = kwargs.get("as_json", False)
        try:
            return command(*args, **kwargs)
        except LlmcError as e:
            if e.exit_code == EXIT_INTERNAL:
                cause = getattr(e, "cause", None) or e
                click.echo("".join(traceback.format_exception(cause)).rstrip(), err=True)
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
    from llmc.errors import name_config_files

    name_config_files(model_yaml, cluster_yaml)
    model, base = load_model_config(model_yaml)
    _, cluster = load_cluster_config(cluster_yaml)
    return model, base, cluster


@cli.command(epilog=EPILOG)
@_model_arg
@_cluster_arg
@_json_option
@_handles_errors
def validate(model_yaml: Path, cluster_yaml: Path, as_json: bool):
    """Check MODEL_YAML and CLUSTER_YAML as compile does before its first pass (no model is loaded)."""
    from llmc.passes.plan import plan_pass_from_config

    model, base, cluster = _load(model_yaml, cluster_yaml)
    plan_pass_from_config(model, base, compiling=True)
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
    for engine in run.program.engines:
        if engine.status == "skipped":
            log.warning("stage %d (%s): no TensorRT engine built here: %s; on a host that can, run: %s",
                        engine.stage, engine.sku, engine.reason, engine.command.replace(" OUT ", f" {output} "))
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
    """Summarise a build directory, check its files against SHA256SUMS and preflight its engines.

    The preflight says which engine each stage's device would load and what it needs (compute
    capability, TensorRT flavour and version, plugins); an engine built for another compute
    capability or from another stage graph exits 6, a missing one prints the command that builds it.
    """
    from dataclasses import asdict

    from llmc.artifacts import SUMS, load_build
    from llmc.engines import format_checks, preflight
    from llmc.errors import VerificationError

    doc, receipt = load_build(build_dir)  # SHA256SUMS first (exit 6), then the fields it reads (exit 2)
    stages = [
        f"  stage {s['index']}: {s['device']} ({s['sku']}, sm{s['compute_capability'].replace('.', '')}) "
        f"layers {s['layer_start']}-{s['layer_end'] - 1}"
        for s in doc["stages"]
    ]
    measured = [f"  {m['name']}: {m['value']} {m['unit']}".rstrip() for m in doc["measured"]]
    checks = preflight(build_dir, doc)
    text = "\n".join(
        [
            f"{build_dir}: {doc['model']['architecture']} on {doc['cluster']}, "
            f"{doc['quantization']['summary']}, llmc {receipt['llmc']}",
            "stages:", *stages,
            f"predicted: {doc['predicted']['tokens_per_s']:.1f} tokens/s, "
            f"batch latency {doc['predicted']['batch_latency_s'] * 1e3:.1f} ms",
            "measured:", *measured,
            "TensorRT engines (preflight):", *format_checks(checks),
            f"files: all match {SUMS}",
        ]
    )
    fatal = [c for c in checks if c.fatal]
    if fatal:
        if not as_json:
            click.echo(text.replace(f"files: all match {SUMS}", "").rstrip())
        raise VerificationError(
            f"{build_dir}: " + "; ".join(f"stage {c.stage} on {c.device}: {c.engine} {c.status}: {c.detail}" for c in fatal)
        )
    _emit(as_json, {"status": "ok", "plan": doc, "receipt": receipt, "engines": [asdict(c) for c in checks]}, text)


@cli.command(name="build-engines", epilog=EPILOG)
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--device", required=True, metavar="SKU",
              help="Build the engines of the stages placed on this SKU (e.g. H100-80G) or device (box-b/gpu0).")
@_quiet_option
@_json_option
@_handles_errors
def build_engines(build_dir: Path, device: str, quiet: bool, as_json: bool):
    """Build the TensorRT engines a compile skipped, on a host that can (e.g. next to the GPU).

    Uses full TensorRT when a local GPU has the target's compute capability, TensorRT for RTX
    for its CPU-only targets; adds the engines to the build and to its SHA256SUMS.
    """
    from llmc.artifacts import SUMS, verify_sums
    from llmc.engines import build_missing
    from llmc.errors import InputError, VerificationError

    _setup_logging(quiet or as_json)
    if not (build_dir / "plan.json").is_file() or not (build_dir / SUMS).is_file():
        raise InputError(f"{build_dir}: not an llmc build directory (no plan.json or {SUMS})")
    bad = verify_sums(build_dir)
    if bad:
        raise VerificationError(f"{build_dir}: files differ from {SUMS}, refusing to build from them: {', '.join(bad)}")
    built = build_missing(build_dir, json.loads((build_dir / "plan.json").read_text()), device)
    lines = [f"built {e['path']} ({e['engine']['bytes'] / 2**20:.1f} MiB, {e['tensorrt']['flavor']} "
             f"{e['tensorrt']['version']})" for e in built]
    _emit(as_json, {"status": "ok", "engines": built}, "\n".join(lines))


def _gpu_product(value: str) -> tuple[str, tuple[str, ...]]:
    from llmc.errors import InputError

    sku, _, labels = value.partition("=")
    if not sku or not labels:
        raise InputError(f"--gpu-product {value!r}: expected SKU=LABEL[,LABEL...], e.g. L4=NVIDIA-L4")
    return sku, tuple(labels.split(","))


@cli.command(epilog=EPILOG)
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--target", "targets", multiple=True,
              type=click.Choice(["launch", "kubernetes", "kuberay", "slurm", "shell"]),
              help="Target to render (repeatable); default: all.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Write the files here instead of into BUILD_DIR (whose SHA256SUMS is updated).")
@click.option("--image", default="llmc:0.1.0", show_default=True, help="Container image with llmc and onnxruntime-gpu.")
@click.option("--namespace", default="default", show_default=True, help="Kubernetes namespace.")
@click.option("--build-claim", default="llmc-build", show_default=True,
              help="PersistentVolumeClaim that holds the build directory (Kubernetes, KubeRay).")
@click.option("--build-path", default="/build", show_default=True,
              help="Where the workers find the build (mount path; the path on Slurm nodes).")
@click.option("--master-port", type=click.IntRange(1, 65535), default=29500, show_default=True,
              help="Stage 0's rendezvous port.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cuda", show_default=True,
              help="What the stage workers run ONNX Runtime on.")
@click.option("--gpu-product", "gpu_products", multiple=True, metavar="SKU=LABEL[,LABEL]",
              help="nvidia.com/gpu.product values for a SKU (repeatable); default: from the catalog.")
@_json_option
@_handles_errors
def render(build_dir, targets, output, image, namespace, build_claim, build_path, master_port, device, gpu_products,
           as_json):
    """Re-render launch manifests of BUILD_DIR from its plan, without recompiling; each file is validated."""
    from llmc.passes.manifests import TARGETS, DeployOptions, render_build

    options = DeployOptions(image=image, namespace=namespace, build_claim=build_claim, build_path=build_path,
                            master_port=master_port, device=device,
                            gpu_products=tuple(_gpu_product(v) for v in gpu_products))
    files = render_build(build_dir, tuple(targets) or TARGETS, options, output)
    where = output or build_dir
    _emit(as_json, {"status": "ok", "output": str(where), "files": files},
          f"rendered and validated {len(files)} files under {where}/: {', '.join(files)}")


def _read_prompts(prompts: tuple[str, ...], prompts_file: Path | None, prompts_json: Path | None) -> list[str]:
    from llmc.errors import InputError

    found = list(prompts)
    for path in (prompts_file, prompts_json):
        if path is not None and not path.is_file():
            raise InputError(f"{path}: no such prompts file")
    if prompts_file is not None:
        found += [line for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if prompts_json is not None:
        found += json.loads(prompts_json.read_text(encoding="utf-8"))
    return found


_run_options = [
    click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable); default: the prompt the compile checked."),
    click.option("--prompts-file", type=click.Path(path_type=Path), help="A text file, one prompt per line."),
    click.option("--new-tokens", type=click.IntRange(1, 4096), help="Greedy tokens per prompt; default: as at compile."),
    click.option("--micro-batch-size", type=click.IntRange(1, 4096), default=1, show_default=True,
                 help="Most sequences in one micro-batch (prompts of equal token length share one)."),
    click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True,
                 help="ONNX Runtime threads per stage process."),
    click.option("--timeout", "timeout_s", type=click.IntRange(1, 86400), default=600, show_default=True,
                 help="Seconds a stage waits for its neighbours."),
    click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                 help="Where each stage runs ONNX Runtime (cuda: this process's GPU, needs onnxruntime-gpu)."),
]


def _with_run_options(command):
    for option in reversed(_run_options):
        command = option(command)
    return command


@cli.command(epilog=EPILOG)
@click.argument("build_dir", type=click.Path(path_type=Path))
@_with_run_options
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Place the stages as Ray actors on this Ray cluster ('auto' inside one, 'local' for a "
                   "Ray instance on this host) instead of local processes.")
@_json_option
@_handles_errors
def run(build_dir, prompts, prompts_file, new_tokens, micro_batch_size, threads, timeout_s, device, ray_address,
        as_json):
    """Run the build's stage graphs as a pipeline, one process per stage.

    The stages talk over torch.distributed (gloo); the greedy tokens are checked against the
    reference (exit 6 when they differ).
    """
    from dataclasses import asdict

    from llmc.run import format_result, read_build, run_local, run_on_ray, verify

    read_build(build_dir)
    prompt_list = _read_prompts(prompts, prompts_file, None) or None
    if ray_address:
        result = run_on_ray(build_dir.resolve(), ray_address, prompt_list, new_tokens, micro_batch_size, threads,
                            timeout_s, device)
    else:
        result = run_local(build_dir, prompt_list, new_tokens, micro_batch_size, threads, timeout_s, device)
    _emit(as_json, {"status": "ok" if result.all_match else "mismatch", **asdict(result)}, format_result(result))
    verify(result)


@cli.command(name="run-stage", epilog=EPILOG)
@click.argument("build_dir", type=click.Path(path_type=Path))
@_with_run_options
@click.option("--prompts-json", type=click.Path(path_type=Path), hidden=True)
@click.option("--result", "result_path", type=click.Path(path_type=Path), help="Stage 0 writes the result JSON here.")
@click.option("--rank-stages", metavar="LIST",
              help="Comma-separated stage of each rank (default: stage = RANK); the torchrun launcher sets it.")
@_handles_errors
def run_stage(build_dir, prompts, prompts_file, new_tokens, micro_batch_size, threads, timeout_s, device,
              prompts_json, result_path, rank_stages):
    """One pipeline stage of BUILD_DIR (what the launch manifests start).

    Reads the torchrun environment: RANK (the stage index), WORLD_SIZE (the number of stages),
    MASTER_ADDR and MASTER_PORT (stage 0's address). Stage 0 tokenises the prompts, prints the
    text and throughput, and exits 6 when the tokens differ from the reference.
    """
    from dataclasses import asdict

    from llmc.run import check_against_references, format_result, stage_worker, verify

    from llmc.errors import InputError

    stages = None
    if rank_stages:
        if not all(p.strip().isdigit() for p in rank_stages.split(",")):
            raise InputError(f"--rank-stages {rank_stages!r}: expected stage numbers, e.g. 0,2,1")
        stages = tuple(int(p) for p in rank_stages.split(","))
    result = stage_worker(build_dir, _read_prompts(prompts, prompts_file, prompts_json) or None, new_tokens,
                          micro_batch_size, threads, None, timeout_s, device, stages)
    if result is None:
        return
    check_against_references(build_dir, result, threads)
    if result_path is not None:
        result_path.write_text(json.dumps(asdict(result), indent=1))
    click.echo(format_result(result))
    verify(result)


def main() -> None:
    cli(prog_name="llmc")


if __name__ == "__main__":
    main()
