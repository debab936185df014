"""Passes, the context they run in, the cached runner, and the one place the order is decided.

Caching: each pass's output (its new ``Program`` plus the files it wrote) lives in
``<cache>/<pass-name>-<key>/`` where the key hashes the pass's options (files by content), the
input program and the tool versions. A pass runs in a temporary directory renamed into place
only when it succeeds, so an interrupted compile resumes at the first pass without an entry.
Files are referred to by *references* (``"<entry>/<file>"``) relative to the cache root, which
keeps programs, and therefore keys, independent of where the cache lives.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, TypeVar

from pydantic import TypeAdapter

from llmc.errors import LlmcError, PassError, UsageError
from llmc.ir import Program

log = logging.getLogger("llmc")
T = TypeVar("T")

_PROGRAM = TypeAdapter(Program)


@dataclass(frozen=True)
class PassResult:
    program: Program
    summary: str = ""  # one line for the log: what the pass did, with its key number


class Pass:
    """A compiler pass: a frozen dataclass whose fields are its options.

    Subclasses set ``name`` (unique, kebab-case) and implement ``run``. ``requires`` and
    ``ensures`` raise ``ValueError`` with a sentence naming the missing state and the pass that
    provides it; the runner checks them when verifying (always in tests).
    """

    name: ClassVar[str]
    # Passes that read ``ctx.cluster`` (the resolved cluster.yaml): their cache key includes it.
    uses_cluster: ClassVar[bool] = False

    def requires(self, program: Program) -> None:
        """Raise if ``program`` lacks what ``run`` needs."""

    def ensures(self, program: Program) -> None:
        """Raise if ``program`` (this pass's output) lacks what it promises."""

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        raise NotImplementedError


@dataclass
class PassContext:
    """Everything a pass may use besides the program; nothing ambient."""

    cache_root: Path
    workdir: Path  # this pass's own directory (temporary until the pass succeeds)
    entry: str  # the name ``workdir`` will have under ``cache_root``
    seed: int
    cluster: object | None = None  # llmc.config.Cluster
    show_progress: bool = True
    _models: dict = field(default_factory=dict)

    def ref(self, filename: str) -> str:
        """Reference to a file this pass writes into ``workdir``."""
        return f"{self.entry}/{filename}"

    def path(self, ref: str) -> Path:
        """Resolve a reference made by an earlier pass."""
        return self.cache_root / ref

    def progress(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        """Iterate with a progress bar on stderr (quiet when not showing progress)."""
        if not self.show_progress:
            yield from items
            return
        from rich.console import Console
        from rich.progress import track

        yield from track(
            items, description=f"  {description}", total=total, console=Console(stderr=True),
            transient=True,
        )


# --------------------------------------------------------------------------- cache keys


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


_DIGESTS: dict[tuple[str, int, int], str] = {}


def content_digest(path: Path) -> str:
    """sha256 of a file (or a directory's files), memoised per (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _file_digest(path)
    return _DIGESTS[key]


def _option_value(value):
    if isinstance(value, Path):
        # A missing path keys by name so the pass itself runs and reports it as an input error.
        return {"sha256": content_digest(value)} if value.exists() else {"missing": str(value)}
    if isinstance(value, (tuple, list)):
        return [_option_value(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Structured options (e.g. llmc.schemes.Override) key by their fields.
        return {f.name: _option_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


SOURCE_PACKAGES = ("llmc", "llmc.passes", "llmc.plugins", "llmc.templates")


def source_digest(roots: tuple[Path, ...] | None = None) -> str:
    """sha256 over llmc's own files (by default the packages of :data:`SOURCE_PACKAGES` wherever they
    are installed: an editable install keeps them apart), so that a changed llmc under an unchanged
    version number recomputes the passes instead of serving the old code's outputs from the cache."""
    return _digest(roots) if roots else _installed_digest()


@functools.cache
def _installed_digest() -> str:
    import importlib

    return _digest(tuple(Path(importlib.import_module(name).__path__[0]).resolve() for name in SOURCE_PACKAGES))


def _digest(roots: tuple[Path, ...]) -> str:
    files = {}
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and path.suffix in (".py", ".j2", ".yaml", ".json") and "__pycache__" not in path.parts:
                files[f"{root.name}/{path.relative_to(root).as_posix()}"] = path
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].read_bytes() + b"\0")
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    """Versions of the tools whose behaviour shapes pass outputs (recorded in the receipt), and the
    digest of llmc's own source (:func:`source_digest`)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"llmc-source": source_digest()}
    for dist in ("llmc", "torch", "transformers", "onnx", "onnxruntime", "ortools", "gguf", "tensorrt-rtx-cu13",
                 "tensorrt", "tensorrt-cu13", "tensorrt-cu12"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return found


def cache_key(p: Pass, program: Program, seed: int, versions: dict[str, str], cluster=None) -> str:
    options = {f.name: _option_value(getattr(p, f.name)) for f in dataclasses.fields(p)}
    if p.uses_cluster:
        options["(cluster)"] = _option_value(cluster)
    payload = json.dumps(
        {
            "pass": p.name,
            "options": options,
            "program": _PROGRAM.dump_python(program, mode="json"),
            "seed": seed,
            "versions": versions,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- runner


@dataclass(frozen=True)
class PassTiming:
    name: str
    seconds: float
    cached: bool
    summary: str


@dataclass
class PipelineRun:
    program: Program
    timings: list[PassTiming]


def run_pipeline(
    passes: list[Pass],
    *,
    cache_root: Path,
    seed: int,
    cluster=None,
    verify: bool = True,
    show_progress: bool = True,
    print_after: str | None = None,
    program: Program | None = None,
) -> PipelineRun:
    """Run ``passes`` in order with caching; failures become ``PassError`` with the history.

    ``verify`` checks each pass's ``requires``/``ensures`` and the program's invariants between
    passes; they are cheap, so compiles keep it on.
    """
    from llmc.ir import dump_program

    names = [p.name for p in passes]
    if print_after is not None and print_after not in ("all", *names):
        raise UsageError(f"--print-after: '{print_after}' is not a pass of this run ({', '.join(names)}, or all)")

    def show(name: str, program: Program) -> None:
        if print_after in (name, "all"):
            print(f"# --- program after '{name}'\n{dump_program(program)}")

    cache_root.mkdir(parents=True, exist_ok=True)
    versions = tool_versions()
    program = program or Program()
    history: list[str] = []
    timings: list[PassTiming] = []
    models: dict = {}
    for p in passes:
        key = cache_key(p, program, seed, versions, cluster)
        entry = f"{p.name}-{key}"
        final = cache_root / entry
        start = time.perf_counter()
        if (final / "program.json").is_file():
            program = _PROGRAM.validate_json((final / "program.json").read_text())
            summary = json.loads((final / "summary.json").read_text())["summary"]
            timings.append(PassTiming(p.name, time.perf_counter() - start, True, summary))
            log.info("%-14s cached   %s", p.name, summary)
            history.append(p.name)
            show(p.name, program)
            continue
        work = cache_root / f".tmp-{entry}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        ctx = PassContext(
            cache_root=cache_root, workdir=work, entry=entry, seed=seed, cluster=cluster,
            show_progress=show_progress, _models=models,
        )
        try:
            if verify:
                p.requires(program)
            result = p.run(program, ctx)
            if verify:
                p.ensures(result.program)
                verify_program(result.program)
        except (LlmcError, Exception) as e:
            shutil.rmtree(work, ignore_errors=True)
            if isinstance(e, PassError):
                raise
            raise PassError(p.name, history, e) from e
        program = result.program
        (work / "program.json").write_text(_PROGRAM.dump_json(program, indent=1).decode())
        (work / "summary.json").write_text(json.dumps({"summary": result.summary}))
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
        seconds = time.perf_counter() - start
        timings.append(PassTiming(p.name, seconds, False, result.summary))
        log.info("%-14s %6.1fs  %s", p.name, seconds, result.summary)
        history.append(p.name)
        show(p.name, program)
    return PipelineRun(program, timings)


def verify_program(program: Program) -> None:
    """Invariants every program satisfies, whatever passes ran. Raises ``ValueError``."""
    if program.model is not None and len(program.layers) != program.model.num_layers:
        raise ValueError(f"layer table has {len(program.layers)} layers, model has {program.model.num_layers}")
    if program.plan is not None:
        stages = program.plan.stages
        if not stages or stages[0].layer_start != 0 or stages[-1].layer_end != len(program.layers):
            raise ValueError("plan stages do not cover all layers")
        for a, b in zip(stages, stages[1:]):
            if a.layer_end != b.layer_start:
                raise ValueError(f"stages {a.index} and {b.index} are not contiguous")
        for s in stages:
            if s.memory.total > s.memory.capacity:
                raise ValueError(f"stage {s.index} needs {s.memory.total} bytes > {s.memory.capacity}")
    names = [a.path for a in program.artifacts]
    if len(names) != len(set(names)):
        raise ValueError("two artifacts share an output path")
    modules = [q.module for q in program.quantization]
    if len(modules) != len(set(modules)):
        raise ValueError("a module has two quantization decisions")


# --------------------------------------------------------------------------- the pipeline


def _require_extras(modules: tuple[str, ...]) -> None:
    from importlib.util import find_spec

    from llmc.errors import ToolchainError

    missing = [m for m in modules if find_spec(m) is None]
    if missing:
        raise ToolchainError(
            f"this command needs {', '.join(missing)}: install llmc with its extras, "
            "e.g. pip install torch==2.13.0 -e \".[torch,onnx,deploy]\" (see README)"
        )


def build_pipeline(model, base: Path, *, through: str = "report") -> list[Pass]:
    """The passes for ``model`` (a validated ModelConfig), in order.

    ``through="plan"`` is ``llmc plan``: nothing that changes or exports weights.
    """
    from llmc.passes.ingest_config import IngestConfigPass, is_config_only

    # `llmc plan` of a config.json without weights needs no torch (plan before download).
    config_only = through == "plan" and is_config_only(base / model.model.path)
    _require_extras(() if config_only else ("torch", "transformers", "safetensors") if through == "plan"
                    else ("torch", "transformers", "safetensors", "onnx", "onnxruntime",
                          "kubernetes_validate", "jsonschema", "yamllint"))
    from llmc.passes.ingest import IngestPass
    from llmc.passes.plan import plan_pass_from_config
    from llmc.passes.report import ReportPass

    q = model.quantization
    w = model.workload
    workload = dict(batch=w.batch, prompt_tokens=w.prompt_tokens, generated_tokens=w.generated_tokens)
    plan = plan_pass_from_config(model, base, compiling=through != "plan")
    source = base / model.model.path
    passes: list[Pass] = [IngestConfigPass(source=source, dtype=model.model.dtype) if config_only
                          else IngestPass(source=source, dtype=model.model.dtype)]
    if through == "plan":
        return passes + [plan, ReportPass(**workload)]

    from llmc.passes.build_engines import BuildEnginesPass
    from llmc.passes.calibrate import CalibratePass
    from llmc.passes.evaluate import EvaluatePass
    from llmc.passes.export import ExportPass
    from llmc.passes.manifests import ManifestsPass
    from llmc.passes.fpx import FpxQuantizePass
    from llmc.passes.quantize_gptq import GptqQuantizePass
    from llmc.passes.quantize_rtn import RtnQuantizePass
    from llmc.schemes import FP6_BITS, methods_used, rules_from_config

    # Calibration data before anything data-aware (quantizers, sensitivity).
    passes.append(
        CalibratePass(text=base / model.calibration.path, seq_len=model.calibration.seq_len,
                      windows=model.calibration.windows)
    )
    rules = rules_from_config(q)
    # Pruning reads the calibration windows and changes the weights and shapes that the plan
    # and the quantizers see, so it runs between them. Unstructured methods quantize the pruned
    # linears whose scheme is GPTQ jointly (GPTQ's own pass would fill the zeros back in).
    if model.pruning.method != "none":
        passes.append(prune_pass(model.pruning, rules if "gptq" in methods_used(rules) else None, q))
    mixed = q.mixed_precision
    per_layer_plan = bool(plan.bits) and list(plan.bits) != [q.bits if q.method != "none" else 16]
    # Sensitivity reads the calibration windows and the (pruned) weights the quantizers will see;
    # the mixed-precision policy and the planner's quality budget consume its omega table.
    if mixed is not None or (per_layer_plan and plan.sensitivity is None):
        from llmc.passes.sensitivity import SensitivityPass

        layer_widths = mixed.bits if mixed is not None and mixed.granularity == "layer" else []
        passes.append(SensitivityPass(
            **vars(rules), candidates=tuple(sorted({q.bits, *layer_widths, *plan.bits})),
            indicator=mixed.indicator if mixed is not None else "hessian-trace",
            feature_bits=q.bits if mixed is not None and mixed.granularity == "output-feature" else None,
            gradient_windows=mixed.gradient_windows if mixed is not None else 32,
        ))
    from llmc.passes.mixed_precision import MixedPrecisionPass

    # A budgeted policy decides the widths before the plan, so the plan costs what is stored.
    if mixed is not None:
        passes.append(MixedPrecisionPass(
            **vars(rules), granularity=mixed.granularity, candidates=tuple(sorted(mixed.bits)),
            average_bits=mixed.average_bits, max_perplexity_increase_pct=mixed.max_perplexity_increase_pct,
            high_fraction=mixed.high_fraction,
        ))
    # The plan precedes quantization: it decides which bit-width each layer can afford.
    passes.append(plan)
    # planner.bits with several widths: the plan's per-layer choice becomes the quantizers'.
    if per_layer_plan:
        passes.append(MixedPrecisionPass(**vars(rules), granularity="plan"))
    # One pass per method the rules use; each quantizes the linears resolved to its method
    # (llmc.schemes) and keeps the earlier passes' decisions. RTN first: GPTQ then calibrates
    # each block on the already-rounded layers too.
    if "rtn" in methods_used(rules):
        passes.append(RtnQuantizePass(**vars(rules)))
    # FPx rounds without data, like RTN, so it also runs before GPTQ. A per-layer width of 6 is FP6.
    widths = {*(mixed.bits if mixed is not None and mixed.granularity == "layer" else ()),
              *(plan.bits if per_layer_plan else ())}
    if "fpx" in methods_used(rules) or FP6_BITS in widths:
        passes.append(FpxQuantizePass(**vars(rules)))
    if "gptq" in methods_used(rules):
        passes.append(GptqQuantizePass(**vars(rules), damp=q.gptq.damp, act_order=q.gptq.act_order,
                                       block_size=q.gptq.block_size))
    # After quantization, so the compressed model is measured against the reference.
    passes.append(
        EvaluatePass(text=base / model.evaluation.path, seq_len=model.evaluation.seq_len,
                     windows=model.evaluation.windows,
                     max_increase_pct=model.quality.max_perplexity_increase_pct)
    )
    # Export needs the plan's stages and the quantized weights.
    passes.append(ExportPass(prompt=model.check.prompt, new_tokens=model.check.new_tokens))
    # Engines are built from the graphs the export's ONNX Runtime check just passed; manifests
    # then name each device's engine (or the command that builds it on a host that can).
    passes.append(BuildEnginesPass(**workload))
    # Manifests carry the exported graphs' hashes; the report lists every artifact and measurement.
    passes.append(ManifestsPass(**workload, check_prompt=model.check.prompt, check_tokens=model.check.new_tokens))
    passes.append(ReportPass(**workload))
    return passes


def prune_pass(pruning, joint, quantization) -> Pass:
    """The prune pass of a validated ``pruning`` section (method not 'none'); ``joint``: the
    quantization rules when some linears are GPTQ-quantized, for joint quantization."""
    from llmc.passes.prune_sparsegpt import SparseGptPrunePass
    from llmc.passes.prune_structured import StructuredPrunePass
    from llmc.passes.prune_wanda import MagnitudePrunePass, WandaPrunePass
    from llmc.pruning import pruning_rules_from_config

    if pruning.method == "structured":
        # Pruned widths must still split into whole quantization groups.
        groups = [quantization.group_size] + [o.group_size for o in quantization.overrides if o.group_size]
        align = max([pruning.structured.align] + ([g for g in groups if g > 0] if quantization.method != "none" else []))
        return StructuredPrunePass(ratio=pruning.ratio, targets=tuple(pruning.targets), ignore=tuple(pruning.ignore),
                                   align=align, bias_compensation=pruning.structured.bias_compensation,
                                   global_threshold=pruning.structured.allocation == "global")
    cls = {"magnitude": MagnitudePrunePass, "wanda": WandaPrunePass, "sparsegpt": SparseGptPrunePass}[pruning.method]
    return cls(**vars(pruning_rules_from_config(pruning)), quantization=joint, damp=pruning.sparsegpt.damp,
               block_size=pruning.sparsegpt.block_size)
