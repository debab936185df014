"""`build-engines`: a TensorRT engine per pipeline stage and device type, from the exported ONNX.

Rules, referred to by number:

1. One engine per (stage, SKU) the plan places the stage on, built from the very file the export
   checked in ONNX Runtime (its sha256 is recorded beside the engine).
2. The builder is chosen per target compute capability (:func:`llmc.tensorrt.choose_flavor`):
   full ``tensorrt`` when a local GPU has that capability, else ``tensorrt_rtx`` when it is one of
   its AOT targets. A target neither can build is a recorded, non-fatal skip carrying the command
   that builds it on a host that can (``llmc build-engines OUT --device H100-80G``).
3. llmc's plugins are registered before parsing; every plugin node must become a plugin layer.
4. Two optimization profiles from the workload: ``prefill`` (up to the batch and the prompt, with
   an optional cached prefix) and ``decode`` (one token, a past of up to prompt + generated - 1).
5. A stage holding linears marked 2:4 sparse (``program.sparsity``, from the prune passes) gets
   TensorRT's sparse-weights flag when the exported weights still have the pattern (a warning
   and a dense build otherwise). TensorRT's sparse kernels take 2:4 only: other N:M patterns
   build dense.
6. Engines land under ``engines/<sku>-sm<cc>-<flavor><version>/stage_<k>.engine`` with a
   ``stage_<k>.json`` beside each (target, TensorRT flavour and version, plugins, profiles, IO,
   sha256 of the engine and of its ONNX). Engines are not byte-reproducible
   (see :mod:`llmc.tensorrt`), so nothing else in the build quotes their hashes or sizes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from llmc.ir import Artifact, EngineBuild, Program
from llmc.pipeline import Pass, PassContext, PassResult

log = logging.getLogger("llmc")
SPARSE_PATTERN = (2, 4)  # the N:M pattern TensorRT's sparse-weights flag accelerates


def rebuild_command(sku: str) -> str:
    return f"llmc build-engines OUT --device {sku}"


def engine_dir(sku: str, compute_capability: str, flavor) -> str:
    """``engines/A100-40G-sm80-trtrtx1.7.1.116`` (rule 6)."""
    from llmc.tensorrt import compute_capability_name

    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", sku)
    return f"engines/{safe}-{compute_capability_name(compute_capability)}-{flavor.tag}{flavor.version}"


def optimization_profiles(batch: int, prompt_tokens: int, generated_tokens: int) -> list:
    """Rule 4, as (min, opt, max) per dimension name of the stage graphs."""
    from llmc.tensorrt import Profile

    longest_past = max(prompt_tokens + generated_tokens - 1, 1)
    return [
        Profile("prefill", {"batch": (1, batch, batch), "seq": (1, prompt_tokens, prompt_tokens),
                            "past_seq": (0, 0, longest_past)}),
        Profile("decode", {"batch": (1, batch, batch), "seq": (1, 1, 1),
                           "past_seq": (1, min(prompt_tokens + generated_tokens // 2, longest_past), longest_past)}),
    ]


def plugin_nodes(model) -> dict[tuple[str, str], int]:
    """Custom-domain nodes of an ONNX model by (domain, op_type)."""
    counts: dict[tuple[str, str], int] = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            counts[(node.domain, node.op_type)] = counts.get((node.domain, node.op_type), 0) + 1
    return counts


def n_m_violations(nonzero: np.ndarray, n: int, m: int) -> int:
    """Groups of ``m`` consecutive inputs (axis 0 of a [in, out] mask) holding more than ``n`` nonzeros."""
    rows, cols = nonzero.shape
    if rows % m:
        raise ValueError(f"input dimension {rows} is not a multiple of {m}")
    return int((nonzero.reshape(rows // m, m, cols).sum(axis=1) > n).sum())


def weight_nonzeros(model, module: str) -> np.ndarray:
    """Which entries of ``module``'s exported weight [in, out] are nonzero, whatever its lowering."""
    from onnx import numpy_helper

    tensors = {t.name: t for t in model.graph.initializer}

    def array(name):
        return numpy_helper.to_array(tensors[name]).astype(np.float64)

    if f"{module}.weight_T" in tensors:
        return array(f"{module}.weight_T") != 0
    if f"{module}.qweight_T" not in tensors:
        raise ValueError(f"{module}: no exported weight in this stage")
    codes = array(f"{module}.qweight_T")
    if f"{module}.zero_T" not in tensors:
        return codes != 0
    zero = array(f"{module}.zero_T")
    group = codes.shape[0] // zero.shape[0]
    return codes != np.repeat(zero, group, axis=0)


def build_stage_engine(flavor, onnx_path: Path, meta: dict, profiles: list, sparse_weights: bool):
    """Build one engine (rules 3, 4): (engine bytes, its description, build seconds).

    ``meta`` holds the stage, layers, sku, compute_capability, devices and onnx path.
    """
    import onnx

    from llmc.artifacts import sha256_file
    from llmc.plugins.trt_plugins import plugin_infos, register_plugins
    from llmc.tensorrt import build_engine

    register_plugins(flavor.module)
    model = onnx.load(str(onnx_path), load_external_data=False)
    used = plugin_nodes(model)
    known = plugin_infos()
    unknown = sorted(f"{d}::{op}" for d, op in used if (d, op) not in known)
    if unknown:
        raise ValueError(f"{onnx_path.name}: custom nodes without a TensorRT plugin: {', '.join(unknown)}")
    input_dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }
    del model
    built = build_engine(
        flavor, onnx_path, meta["compute_capability"], input_dims, profiles,
        sparse_weights=sparse_weights, plugin_nodes=sum(used.values()),
    )
    plugins = [
        {"name": known[key].name, "namespace": known[key].namespace, "version": known[key].version, "layers": count}
        for key, count in sorted(used.items())
    ]
    description = {
        **meta,
        "tensorrt": {"flavor": flavor.name, "version": flavor.version},
        "onnx": {**meta["onnx"], "sha256": sha256_file(onnx_path)},
        "engine": {"bytes": len(built.data), "sha256": hashlib.sha256(built.data).hexdigest()},
        "plugins": plugins,
        "plugin_loader": "llmc.plugins.trt_plugins.register_plugins(trt) before deserialising",
        "optimization_profiles": [{"name": p.name, "dims": {k: list(v) for k, v in p.dims.items()}} for p in profiles],
        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in built.inputs],
        "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in built.outputs],
        "sparse_weights": sparse_weights,
        "network": {"layers": built.layers, "plugin_layers": built.plugin_layers,
                    "constant_bytes": built.constant_bytes},
    }
    return built.data, description, built.seconds


def plugin_labels(description: dict) -> tuple[str, ...]:
    return tuple(f"{p['namespace']}::{p['name']} v{p['version']} x{p['layers']}" for p in description["plugins"])


@dataclass(frozen=True)
class BuildEnginesPass(Pass):
    """Build a TensorRT engine per stage and device type, or record why not and how to."""

    name = "build-engines"
    batch: int
    prompt_tokens: int
    generated_tokens: int

    def requires(self, program: Program) -> None:
        if program.plan is None:
            raise ValueError("build-engines needs the plan's stages; run 'plan' first")
        if not any(a.kind == "onnx" for a in program.artifacts):
            raise ValueError("build-engines needs the stage graphs; run 'export' first")

    def ensures(self, program: Program) -> None:
        targets = {(s.index, s.sku) for s in program.plan.stages}
        if {(e.stage, e.sku) for e in program.engines} != targets:
            raise ValueError("build-engines did not account for every (stage, SKU)")

    @staticmethod
    def _pattern_holds(onnx_path: Path, decisions, stage: int) -> bool:
        """Rule 5: whether every linear marked 2:4 still is so in the exported graph (a later pass,
        such as a quantizer without the mask, may have filled it in: then the stage builds dense)."""
        import onnx

        model = onnx.load(str(onnx_path))
        broken = [(d.module, n_m_violations(weight_nonzeros(model, d.module), d.n, d.m)) for d in decisions]
        broken = [(module, bad) for module, bad in broken if bad]
        if broken:
            module, bad = broken[0]
            log.warning("stage %d: %d linears marked 2:4 are not 2:4 in the exported graph (%s: %d groups of 4 "
                        "inputs hold more than 2 nonzeros); building it without sparse weights",
                        stage, len(broken), module, bad)
        return not broken

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        from llmc.tensorrt import choose_flavor, installed_flavors

        flavors = installed_flavors()
        profiles = optimization_profiles(self.batch, self.prompt_tokens, self.generated_tokens)
        graphs = {a.path: a for a in program.artifacts if a.kind == "onnx"}
        layers_of = {lin.name: layer.index for layer in program.layers for lin in layer.linears}
        targets: dict[tuple[int, str], list] = {}
        for stage in program.plan.stages:  # rule 1: one engine per (stage, SKU)
            targets.setdefault((stage.index, stage.sku), []).append(stage)

        records, artifacts, built_bytes, seconds = [], [], 0, 0.0
        for (index, sku), stages in ctx.progress(sorted(targets.items()), "engines", total=len(targets)):
            stage = stages[0]
            cc = stage.compute_capability
            graph = graphs[f"stages/stage_{index}.onnx"]
            decisions = [d for d in program.sparsity if (d.n, d.m) == SPARSE_PATTERN
                         and stage.layer_start <= layers_of.get(d.module, -1) < stage.layer_end]
            sparse = bool(decisions) and self._pattern_holds(ctx.path(graph.ref), decisions, index)
            flavor, reason = choose_flavor(cc, flavors)  # rule 2
            if flavor is None:
                records.append(EngineBuild(index, sku, cc, "skipped", None, None, (), sparse, reason,
                                           rebuild_command(sku)))
                continue
            directory = engine_dir(sku, cc, flavor)
            meta = {
                "stage": index, "layers": [stage.layer_start, stage.layer_end], "sku": sku,
                "compute_capability": cc, "devices": [s.device for s in stages],
                "onnx": {"path": graph.path},
            }
            data, description, build_s = build_stage_engine(flavor, ctx.path(graph.ref), meta, profiles, sparse)
            built_bytes += len(data)
            seconds += build_s
            metadata = (json.dumps(description, indent=1, sort_keys=True) + "\n").encode()
            for suffix, content, kind in (("engine", data, "engine"), ("json", metadata, "engine-metadata")):
                name = f"{directory}/stage_{index}.{suffix}"
                target = ctx.workdir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
                artifacts.append(Artifact(path=name, ref=ctx.ref(name), kind=kind))
            records.append(EngineBuild(index, sku, cc, "built", f"{directory}/stage_{index}.engine", flavor.label,
                                       plugin_labels(description), sparse, "", rebuild_command(sku)))

        built = [r for r in records if r.status == "built"]
        skipped = [r for r in records if r.status == "skipped"]
        summary = f"{len(built)} engine{'s' if len(built) != 1 else ''} built ({built_bytes / 2**20:.1f} MiB in {seconds:.1f} s)"
        if skipped:
            summary += "; skipped: " + "; ".join(f"stage {r.stage} {r.sku}: {r.reason}" for r in skipped)
        kept = tuple(a for a in program.artifacts if a.kind not in ("engine", "engine-metadata"))
        return PassResult(replace(program, artifacts=kept + tuple(artifacts), engines=tuple(records)), summary)
