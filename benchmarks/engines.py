"""Benchmark the example's TensorRT engines: build time, size, packing, and whether builds repeat.

    python benchmarks/engines.py [--cache-dir DIR] [--out docs/benchmarks/engines.md]

1. Compile examples/smollm2 (a subprocess, exactly as a user runs it; ``--cache-dir`` reuses an
   earlier compile's passes) and read the ``build-engines`` pass's wall time.
2. For every stage the build holds an engine of, build it again twice in this process with the
   same code (``build_stage_engine``): TensorRT's own build time, the engine's size against its
   ONNX, the bytes its constants hold by type, and whether the two builds are byte-identical.
3. The same stages exported with float32 weights (the unquantized checkpoint) and with FP6 e3m2
   weights (one float16 scale per output channel, llmc's ``Fp6Linear`` plugin), built the same
   way: the size an engine has when the weights are not packed, and at six bits per weight.

Needs `python examples/fetch_assets.py` and the `tensorrt` extra. Writes a Markdown table with
the machine, the date and the protocol.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "smollm2"


def compile_example(out: Path, cache: Path) -> tuple[float, dict]:
    command = [sys.executable, "-m", "llmc.cli", "compile", str(EXAMPLE / "model.yaml"),
               str(EXAMPLE / "cluster.yaml"), "-o", str(out), "--cache-dir", str(cache), "--json"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"compile failed: {result.stderr.strip().splitlines()[-1]}")
    return time.perf_counter() - start, json.loads(result.stdout)


def variant_stage(cache: Path, stage: dict, path: Path, fp6: bool) -> None:
    """The stage's graph from the checkpoint: float32 weights, or FP6 e3m2 ones (per-channel scales)."""
    import torch

    from llmc.checkpoint import load_hf_model
    from llmc.passes.export import build_stage_graph, decoder_spec_from_model
    from llmc.passes.fpx import FP6_E3M2, fpx_quantize

    model = load_hf_model(next(cache.glob("ingest-*/checkpoint")), "float32")
    layers = tuple(f"model.layers.{i}." for i in range(stage["layer_start"], stage["layer_end"]))
    quantized = {
        name: fpx_quantize(module.weight.detach(), FP6_E3M2, None, scale_dtype=torch.float16)
        for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and name.startswith(layers)
    } if fp6 else None
    graph = build_stage_graph(decoder_spec_from_model(model), model.state_dict(), stage["layer_start"],
                              stage["layer_end"], quantized)
    path.write_bytes(graph.SerializeToString())


def differing_bytes(a: bytes, b: bytes) -> int:
    if len(a) != len(b):
        return -1
    import numpy as np

    return int((np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8)).sum())


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, help="Compile cache to reuse (default: a fresh one).")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "engines.md")
    args = parser.parse_args()

    from llmc.passes.build_engines import build_stage_engine, optimization_profiles
    from llmc.tensorrt import choose_flavor, installed_flavors

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = args.cache_dir or tmp / "cache"
        compile_s, result = compile_example(tmp / "out", cache)
        passes = {p["name"]: p for p in result["passes"]}
        plan = json.loads((tmp / "out" / "plan.json").read_text())
        workload = plan["workload"]
        profiles = optimization_profiles(workload["batch"], workload["prompt_tokens"], workload["generated_tokens"])
        flavors = installed_flavors()
        rows, skipped = [], []
        for record in plan["engines"]:
            stage = next(s for s in plan["stages"] if s["index"] == record["stage"])
            if record["status"] != "built":
                skipped.append((record, stage))
                continue
            flavor, _ = choose_flavor(record["compute_capability"], flavors)
            meta = {"stage": stage["index"], "layers": [stage["layer_start"], stage["layer_end"]], "sku": record["sku"],
                    "compute_capability": record["compute_capability"], "devices": [stage["device"]],
                    "onnx": {"path": f"stages/stage_{stage['index']}.onnx"}}
            onnx_path = tmp / "out" / meta["onnx"]["path"]
            builds = [build_stage_engine(flavor, onnx_path, meta, profiles, False) for _ in range(2)]
            (data, description, seconds), (data2, _, seconds2) = builds
            float_path, fp6_path = tmp / f"float_stage_{stage['index']}.onnx", tmp / f"fp6_stage_{stage['index']}.onnx"
            variant_stage(cache, stage, float_path, fp6=False)
            variant_stage(cache, stage, fp6_path, fp6=True)
            float_data, float_description, float_seconds = build_stage_engine(flavor, float_path, meta, profiles, False)
            fp6_data, fp6_description, fp6_seconds = build_stage_engine(flavor, fp6_path, meta, profiles, False)
            rows.append(dict(
                record=record, stage=stage, flavor=flavor, description=description,
                seconds=(seconds, seconds2), engine=len(data), onnx=onnx_path.stat().st_size,
                identical=hashlib.sha256(data).digest() == hashlib.sha256(data2).digest(),
                differing=differing_bytes(data, data2),
                float_engine=len(float_data), float_onnx=float_path.stat().st_size, float_seconds=float_seconds,
                float_constants=float_description["network"]["constant_bytes"],
                fp6_engine=len(fp6_data), fp6_seconds=fp6_seconds, fp6_network=fp6_description["network"],
            ))
            print(f"  stage {stage['index']} {record['sku']}: {mib(len(data))} MiB in {seconds:.1f}/{seconds2:.1f} s, "
                  f"float {mib(len(float_data))} MiB, FP6 {mib(len(fp6_data))} MiB", file=sys.stderr)

    if not rows:
        sys.exit("the example's plan puts no stage on a device this host can build for "
                 f"({', '.join(r['sku'] + ': ' + r['reason'] for r, _ in skipped)}); nothing to measure")

    import tensorrt_rtx

    build_pass = passes["build-engines"]
    cached = sum(p["cached"] for p in passes.values())

    lines = [
        "# TensorRT engines of the bundled example",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, no GPU, {platform.system()}; "
        f"tensorrt_rtx {tensorrt_rtx.__version__} (CPU-only ahead-of-time builds). Date: {date.today()}.",
        "Script: `python benchmarks/engines.py` (examples/smollm2: SmolLM2-135M-Instruct, RTN int4 g32",
        "asymmetric, on the A100 + L4 + H100 example cluster). No engine ran: this host has no GPU, and",
        "TensorRT for RTX cannot target the H100 (sm90) that the device tool lends.",
        "",
        f"`llmc compile` of the example took {compile_s:.0f} s ({cached} of {len(passes)} passes cached); its "
        f"`build-engines` pass {build_pass['seconds']:.1f} s{' (cached)' if build_pass['cached'] else ''}: "
        f"{build_pass['summary'].split(';')[0]}.",
        "",
        "## Per engine",
        "",
        "Build time is TensorRT's `build_serialized_network`, twice in one process; the profiles are",
        f"`prefill` (batch 1-{workload['batch']}, seq 1-{workload['prompt_tokens']}) and `decode` (seq 1, past up to "
        f"{workload['prompt_tokens'] + workload['generated_tokens'] - 1}).",
        "",
        "| stage | target | layers | plugin layers | ONNX (MiB) | engine (MiB) | int4 codes in engine (MiB) | float32 constants (MiB) | build (s) | float32-weight engine (MiB) | its build (s) | FP6 engine (MiB) | FP6 codes in it (MiB) | its build (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, d, network = r["stage"], r["description"], r["description"]["network"]
        lines.append(
            f"| {s['index']} | {r['record']['sku']} sm{r['record']['compute_capability'].replace('.', '')} | "
            f"{s['layer_start']}–{s['layer_end'] - 1}{' + embedding' if s['holds_embedding'] else ''} | "
            f"{network['plugin_layers']} | {mib(r['onnx'])} | **{mib(r['engine'])}** | "
            f"{mib(network['constant_bytes'].get('INT32', 0))} | {mib(network['constant_bytes'].get('FLOAT', 0))} | "
            f"{r['seconds'][0]:.1f}, {r['seconds'][1]:.1f} | {mib(r['float_engine'])} | {r['float_seconds']:.1f} | "
            f"{mib(r['fp6_engine'])} | {mib(r['fp6_network']['constant_bytes'].get('INT32', 0))} | {r['fp6_seconds']:.1f} |"
        )
    for record, stage in skipped:
        lines.append(f"| {stage['index']} | {record['sku']} sm{record['compute_capability'].replace('.', '')} | "
                     f"{stage['layer_start']}–{stage['layer_end'] - 1} | skipped: {record['reason']} "
                     f"(`{record['command']}` on the target host) | | | | | | | | | | |")
    lines += [
        "",
        "\"int4 codes in engine\" are the int32 bit-plane constants feeding the `llmc::IntNLinear` plugin",
        "layers (eight 4-bit codes per word); \"float32 constants\" are the embedding, norms and the",
        "per-group scales (zero points are float16 constants). The float32-weight engine is the same",
        "stage exported without quantization: the difference is what keeping the weights packed saves.",
        "The FP6 engine is the same stage with every decoder linear in FP6 e3m2 (float16 scale per output",
        "channel), its codes in `llmc::Fp6Linear` plugin layers at six bits per weight (a 4-bit and a",
        "2-bit plane of int32 words).",
        "",
        "## Reproducibility",
        "",
        "| stage | byte-identical rebuild | bytes that differ |",
        "|---|---|---|",
    ]
    for r in rows:
        differing = "size differs" if r["differing"] < 0 else f"{r['differing']:,} of {r['engine']:,}"
        lines.append(f"| {r['stage']['index']} | {'yes' if r['identical'] else 'no'} | {differing} |")
    lines += [
        "",
        "TensorRT does not build the same engine byte for byte twice (also with one builder thread and",
        "address randomisation off, measured on the test model), so llmc keeps `engines/` out of its",
        "byte-identical-output promise: each engine's sha256 sits in the `stage_<k>.json` beside it,",
        "and `reproducible_sums` (llmc.artifacts) is SHA256SUMS without `engines/`.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
