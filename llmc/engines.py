"""TensorRT engines in a build directory: the preflight check and building missing ones on a target host.

:func:`preflight` answers, before anything is deployed, which engine each stage's device would
load and what it needs: the compute capability it was built for (an engine built for sm86 does
not run on an sm80 GPU), the TensorRT flavour and version whose runtime deserialises it, the
plugins to register, and whether it was built from the stage graph the build holds now.

:func:`build_missing` is ``llmc build-engines OUT --device SKU``: on a host whose TensorRT can
build for that SKU (full TensorRT next to the GPU), it builds the engines the compile had to skip
and adds them to the build's ``SHA256SUMS``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llmc.artifacts import sha256_file, update_sums, write_atomically
from llmc.errors import InputError, ToolchainError

STATUS_OK, STATUS_MISSING, STATUS_MISMATCH, STATUS_STALE = "ok", "missing", "wrong target", "stale"


@dataclass(frozen=True)
class EngineCheck:
    """What one stage's device would load."""

    stage: int
    device: str
    sku: str
    compute_capability: str
    status: str  # ok, missing, wrong target, stale
    engine: str | None  # path inside the build directory
    tensorrt: str | None  # the runtime the engine needs: "tensorrt_rtx 1.7.1.116"
    plugins: tuple[str, ...]
    detail: str  # what is wrong and what to do; for "ok", whether this host's TensorRT can load it

    @property
    def fatal(self) -> bool:
        return self.status in (STATUS_MISMATCH, STATUS_STALE)


def _engine_descriptions(build_dir: Path) -> list[tuple[str, dict]]:
    found = []
    for path in sorted(build_dir.glob("engines/*/stage_*.json")):
        engine = path.with_suffix(".engine")
        if engine.is_file():
            found.append((engine.relative_to(build_dir).as_posix(), json.loads(path.read_text())))
    return found


def _runtime_here(needed: str) -> str:
    from llmc.tensorrt import installed_flavors

    have = {f.name: f.version for f in installed_flavors()}
    flavor, version = needed.split(" ", 1)
    if have.get(flavor) == version:
        return f"this host has {needed}"
    return f"this host has {flavor} {have[flavor]}, not {version}" if flavor in have else f"this host has no {flavor}"


def preflight(build_dir: Path, plan: dict) -> list[EngineCheck]:
    """One check per stage of ``plan`` (plan.json), against the engines on disk."""
    from llmc.tensorrt import compute_capability_name as sm

    engines = _engine_descriptions(build_dir)
    checks = []
    for stage in plan["stages"]:
        index, cc = stage["index"], stage["compute_capability"]
        onnx = build_dir / "stages" / f"stage_{index}.onnx"
        onnx_sha = sha256_file(onnx) if onnx.is_file() else None
        mine = [(path, d) for path, d in engines if d["stage"] == index and d["sku"] == stage["sku"]]
        common = dict(stage=index, device=stage["device"], sku=stage["sku"], compute_capability=cc)
        if not mine:
            command = f"llmc build-engines {build_dir} --device {stage['sku']}"
            checks.append(EngineCheck(**common, status=STATUS_MISSING, engine=None, tensorrt=None, plugins=(),
                                      detail=f"no engine; on a host that can build {sm(cc)}, run: {command}"))
            continue
        for path, d in mine:
            needed = f"{d['tensorrt']['flavor']} {d['tensorrt']['version']}"
            plugins = tuple(f"{p['namespace']}::{p['name']} v{p['version']}" for p in d["plugins"])
            found = dict(engine=path, tensorrt=needed, plugins=plugins)
            if d["compute_capability"] != cc:
                checks.append(EngineCheck(**common, **found, status=STATUS_MISMATCH, detail=(
                    f"built for {sm(d['compute_capability'])}, the device is {sm(cc)}: it will not load; "
                    f"rebuild with: llmc build-engines {build_dir} --device {stage['sku']}")))
            elif d["onnx"]["sha256"] != onnx_sha:
                checks.append(EngineCheck(**common, **found, status=STATUS_STALE, detail=(
                    f"built from a different {d['onnx']['path']}; rebuild with: "
                    f"llmc build-engines {build_dir} --device {stage['sku']}")))
            else:
                checks.append(EngineCheck(**common, **found, status=STATUS_OK, detail=_runtime_here(needed)))
    return checks


def format_checks(checks: list[EngineCheck]) -> list[str]:
    from llmc.tensorrt import compute_capability_name as sm

    lines = []
    for c in checks:
        head = f"  stage {c.stage}: {c.device} ({c.sku}, {sm(c.compute_capability)}): {c.status}"
        if c.engine:
            plugins = f", plugins {', '.join(c.plugins)}" if c.plugins else ""
            head += f", {c.engine} needs {c.tensorrt}{plugins}"
        lines.append(f"{head}; {c.detail}")
    return lines


# --------------------------------------------------------------------------- build-engines


def build_missing(build_dir: Path, plan: dict, device: str) -> list[dict]:
    """Build the engines of every stage on ``device`` (a SKU or a device name) with this host's TensorRT.

    Returns the engines' descriptions. Raises :class:`InputError` when no stage runs on
    ``device`` and :class:`ToolchainError` when this host cannot build for it.
    """
    from llmc.passes.build_engines import build_stage_engine, engine_dir, optimization_profiles
    from llmc.tensorrt import choose_flavor, installed_flavors

    stages = [s for s in plan["stages"] if device in (s["sku"], s["device"])]
    if not stages:
        placed = ", ".join(f"{s['sku']} ({s['device']})" for s in plan["stages"])
        raise InputError(f"--device {device}: no stage of {build_dir} runs there; stages run on: {placed}")
    flavors = installed_flavors()
    workload = plan["workload"]
    profiles = optimization_profiles(workload["batch"], workload["prompt_tokens"], workload["generated_tokens"])
    sparse = {(e["stage"], e["sku"]): e["sparse_weights"] for e in plan.get("engines", [])}
    built, written = [], []
    for stage in stages:
        cc = stage["compute_capability"]
        flavor, reason = choose_flavor(cc, flavors)
        if flavor is None:
            raise ToolchainError(f"cannot build stage {stage['index']} for {stage['sku']}: {reason}")
        graph = f"stages/stage_{stage['index']}.onnx"
        meta = {
            "stage": stage["index"], "layers": [stage["layer_start"], stage["layer_end"]], "sku": stage["sku"],
            "compute_capability": cc, "devices": [s["device"] for s in plan["stages"] if s["index"] == stage["index"]],
            "onnx": {"path": graph},
        }
        data, description, _ = build_stage_engine(
            flavor, build_dir / graph, meta, profiles, sparse.get((stage["index"], stage["sku"]), False)
        )
        base = f"{engine_dir(stage['sku'], cc, flavor)}/stage_{stage['index']}"
        write_atomically(build_dir / f"{base}.engine", data)
        write_atomically(build_dir / f"{base}.json", (json.dumps(description, indent=1, sort_keys=True) + "\n").encode())
        written += [f"{base}.engine", f"{base}.json"]
        built.append({"path": f"{base}.engine", **description})
    update_sums(build_dir, written)
    return built
