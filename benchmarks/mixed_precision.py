"""Benchmark mixed precision: how well the sensitivity indicators predict perplexity, and what the
per-layer (knapsack) and MixLLM 4/8 output-feature mixes buy against uniform widths.

    python examples/fetch_assets.py && python examples/fetch_assets.py --model qwen0.5b
    OMP_NUM_THREADS=1 python benchmarks/mixed_precision.py [--models smollm2,qwen0.5b] [--stages indicators,rtn,gptq]

Protocol: benchmarks/gptq.py's (same calibration and evaluation windows, seed 0, the same cache),
so the numbers compare with docs/benchmarks/gptq.md. Every decoder-layer linear is quantized;
embeddings and the LM head stay float. Grids: symmetric, groups of 64 (SmolLM2) or 128 (Qwen),
8 bits per output channel.

Stages (each row is stored as soon as it is measured; a rerun skips rows it has):

- ``indicators``: the `sensitivity` pass (its wall time, the load average), then one decoder layer
  at a time quantized with RTN at 3 and at 4 bits, the others float, and the perplexity measured;
  Spearman's rank correlation between each indicator and the measured increase.
- ``rtn``: uniform 3, 4, 8 bits and FP6 e3m2; per-layer mixes at several average widths (CP-SAT
  knapsack over {3, 4, 8} on each indicator, and over {4, 6} and {4, 8} with 6 = FP6 on the
  Hessian trace); MixLLM 4/8 at 10% and 20% 8-bit output features; integers with RTN.
- ``gptq``: the same mixes with the `quantize-gptq` pass (4-bit rows and layers with GPTQ, no
  act-order; MixLLM's 8-bit rows per channel with RTN); the uniform GPTQ rows are read from
  docs/benchmarks/gptq-<model>.json (same pass, same protocol).

Average bits count everything stored per quantized weight: the codes, one fp16 scale per group,
MixLLM's int32 index per 8-bit row (passes/mixed_precision.py, ``stored_bits``).

Results accumulate in ``docs/benchmarks/mixed_precision-<model>.json``; the tables are written to
``docs/benchmarks/mixed-precision.md``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gptq as gptq_bench  # noqa: E402  (the shared protocol: models, windows, cache)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks"
CANDIDATES = (3, 4, 8)
SENSITIVITY_WIDTHS = (3, 4, 6, 8)  # the sensitivity pass costs FP6 too (for the {4, 6} mixes)
FP6_MIXES = (((4, 6), 4.5), ((4, 6), 5.0), ((4, 8), 5.0))  # (widths, target), knapsack on the Hessian trace
PROBE_BITS = (3, 4)
MIX_TARGETS = (3.5, 4.5)  # average stored bits of the per-layer mixes (and the uniform int4's own width)
MIXLLM_FRACTIONS = (0.1, 0.2)


def load() -> float:
    return round(os.getloadavg()[0], 2)


class Results:
    """One JSON per model; every write re-reads the file under a lock, so runs can go side by side."""

    def __init__(self, model: str):
        self.path = DOCS / f"mixed_precision-{model}.json"

    def read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def put(self, section: str, key: str, row) -> None:
        with open(str(self.path) + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self.read()
            data.setdefault(section, {})[key] = row
            partial = self.path.with_suffix(".part")
            partial.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
            os.replace(partial, self.path)
        print(f"  {self.path.stem} {section}/{key}: {json.dumps(row)[:200]}", file=sys.stderr, flush=True)


def group_of(model: str) -> int:
    return gptq_bench.MODELS[model][1]


def sensitivity_pass(model: str):
    from llmc.passes.sensitivity import SensitivityPass

    return SensitivityPass(method="rtn", candidates=SENSITIVITY_WIDTHS, group_size=group_of(model), symmetric=True,
                           feature_bits=4, indicator="hessian-trace")


def sensitivity_program(model: str, cache: Path, results: Results):
    from llmc.pipeline import run_pipeline

    before = load()
    run = run_pipeline(gptq_bench.base_passes(model) + [sensitivity_pass(model)], cache_root=cache, seed=0,
                       show_progress=False)
    timing = run.timings[-1]
    if not timing.cached and "sensitivity" not in results.read().get("timings", {}):
        results.put("timings", "sensitivity", {"seconds": round(timing.seconds, 1), "load": [before, load()],
                                               "summary": timing.summary})
    return run.program


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        rank = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                rank[order[k]] = (i + j) / 2
            i = j + 1
        return rank

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


# --------------------------------------------------------------------------- stage: indicators


def layer_salience(program, cache: Path) -> list[float]:
    """MixLLM's salience summed over each layer's output features (4-bit errors)."""
    from llmc.passes.sensitivity import load_salience

    scores = load_salience(cache, program.sensitivity)
    totals = [0.0] * len(program.layers)
    for name, values in scores.items():
        totals[int(name.split(".")[2])] += float(values.sum())
    return totals


def stage_indicators(model: str, cache: Path, results: Results, probe_bits=PROBE_BITS) -> None:
    import torch

    from llmc.passes.quantize_rtn import rtn_quantize
    from llmc.passes.sensitivity import INDICATORS, layer_omega

    program = sensitivity_program(model, cache, results)
    paths = gptq_bench.prepare(model, cache)
    done = results.read().get("layer_ppl", {})
    wanted = [f"{bits}/{layer}" for bits in probe_bits for layer in range(len(program.layers))]
    if "float" not in results.read().get("rtn", {}) or any(k not in done for k in wanted):
        float_model = gptq_bench.load_float(paths)
        windows = gptq_bench.eval_windows(paths)
        if "float" not in results.read().get("rtn", {}):
            results.put("rtn", "float", {"perplexity": gptq_bench.perplexity_with(float_model, {}, windows),
                                         "bits": 16.0})
        modules = dict(float_model.named_modules())
        for key in wanted:
            if key in done:
                continue
            bits, layer = (int(v) for v in key.split("/"))
            start, before = time.perf_counter(), load()
            weights = {lin.name: rtn_quantize(modules[lin.name].weight, bits, group_of(model), True).dequantize()
                       for lin in program.layers[layer].linears}
            ppl = gptq_bench.perplexity_with(float_model, weights, windows)
            results.put("layer_ppl", key, {"perplexity": ppl, "seconds": round(time.perf_counter() - start, 1),
                                           "load": [before, load()]})
        del float_model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    s = program.sensitivity
    salience = layer_salience(program, cache)
    data = results.read()
    reference = data["rtn"]["float"]["perplexity"]
    correlations = dict(data.get("indicators", {}).get("spearman", {}))
    for bits in probe_bits:
        k = s.bits.index(bits)
        layers = [layer.index for layer in program.layers]
        measured = [data["layer_ppl"][f"{bits}/{l}"]["perplexity"] - reference for l in layers]
        for name in INDICATORS:
            omega = layer_omega(s.linears, layers, name, len(s.bits))
            correlations[f"{name} {bits}"] = spearman([row[k] for row in omega], measured)
        correlations[f"mixllm-salience(4-bit) {bits}"] = spearman(salience, measured)
    results.put("indicators", "spearman", correlations)


# --------------------------------------------------------------------------- stages: rtn, gptq


def uniform_bits(model: str, bits: int, program) -> float:
    from llmc.passes.mixed_precision import stored_bits

    group = -1 if bits == 8 else group_of(model)
    linears = [lin for layer in program.layers for lin in layer.linears]
    total = sum(stored_bits(l.out_features, l.in_features, bits, group, True) for l in linears)
    return total / sum(l.out_features * l.in_features for l in linears)


def equal_bits(model: str, program) -> float:
    """The uniform int4 setting's own average: the mix that must beat it at the same size."""
    return round(uniform_bits(model, 4, program), 4)


def mix_rows(model: str, program) -> dict[str, dict]:
    """Row key -> the mixed-precision pass's options (None: uniform; the key says the width)."""
    rows: dict[str, dict | None] = {f"uniform int{b}": None for b in CANDIDATES}
    rows["uniform fp6"] = None
    for target in sorted({*MIX_TARGETS, equal_bits(model, program)}):
        for indicator in ("hessian-trace", "llm-pq-variance"):
            rows[f"layer-mix {target} {indicator}"] = dict(granularity="layer", candidates=CANDIDATES,
                                                            average_bits=target, indicator=indicator)
    # Narrower candidate sets: below 4 bits only {3, 4}; above, only {4, 8} (no 3-bit layer pays for an 8-bit one).
    for target, candidates in ((MIX_TARGETS[0], (3, 4)), (MIX_TARGETS[1], (4, 8))):
        for indicator in ("hessian-trace", "llm-pq-variance"):
            rows[f"layer-mix-{''.join(map(str, candidates))} {target} {indicator}"] = dict(
                granularity="layer", candidates=candidates, average_bits=target, indicator=indicator)
    for candidates, target in FP6_MIXES:
        rows[f"layer-mix-{''.join(map(str, candidates))} {target} hessian-trace"] = dict(
            granularity="layer", candidates=candidates, average_bits=target, indicator="hessian-trace")
    for fraction in MIXLLM_FRACTIONS:
        rows[f"mixllm {fraction:.0%}"] = dict(granularity="output-feature", high_fraction=fraction)
    return rows


def run_row(model: str, key: str, options: dict | None, quantizer: str, cache: Path, program) -> dict:
    """Quantize with the real passes (mixed-precision, then quantize-rtn or quantize-gptq), measure."""
    import shutil

    from llmc.checkpoint import load_packed
    from llmc.passes.fpx import FpxQuantizePass
    from llmc.passes.mixed_precision import MixedPrecisionPass
    from llmc.passes.quantize_gptq import GptqQuantizePass
    from llmc.passes.quantize_rtn import RtnQuantizePass
    from llmc.pipeline import run_pipeline

    group = group_of(model)
    if options is None:
        bits = 6 if key == "uniform fp6" else int(key.split("int")[1])
        rules = dict(bits=bits, group_size=-1 if bits == 8 else group, symmetric=True)
        policy = []
    else:
        rules = dict(bits=4, group_size=group, symmetric=True)
        policy = [MixedPrecisionPass(method=quantizer, **rules, **options)]
    if key == "uniform fp6":
        quantize = [FpxQuantizePass(method="fpx", **rules)]
    else:
        # FP6 layers of a mix (width 6) round first, as in a compile (llmc.pipeline).
        quantize = [FpxQuantizePass(method=quantizer, **rules)] if options and 6 in options.get("candidates", ()) else []
        quantize.append(RtnQuantizePass(**rules) if quantizer == "rtn"
                        else GptqQuantizePass(method="gptq", **rules, act_order=False))
    before, start = load(), time.perf_counter()
    run = run_pipeline(gptq_bench.base_passes(model) + [sensitivity_pass(model)] + policy + quantize,
                       cache_root=cache, seed=0, show_progress=False, program=None)
    seconds = time.perf_counter() - start
    after = load()
    out = run.program
    packed = load_packed(cache / out.quantized_weights)
    weights = {name: p.dequantize() for name, p in packed.items()}
    paths = gptq_bench.prepare(model, cache)
    ppl = gptq_bench.perplexity_with(gptq_bench.load_float(paths), weights, gptq_bench.eval_windows(paths))
    bits = out.precision.average_bits if out.precision else uniform_bits(model, rules["bits"], out)
    widths = {}
    for d in out.quantization:
        widths[str(d.bits)] = widths.get(str(d.bits), 0) + 1
    row = {"perplexity": ppl, "bits": round(bits, 4), "seconds": round(seconds, 1), "load": [before, after],
           "policy": out.precision.policy if out.precision else "uniform", "linears_per_width": widths,
           "high_rows": sum(d.high_rows for d in out.quantization),
           "quantize_seconds": round(run.timings[-1].seconds, 1)}
    # The row's packed weights (the whole model's): large and used once.
    shutil.rmtree(cache / out.quantized_weights.split("/")[0], ignore_errors=True)
    return row


def stage_quantized(model: str, quantizer: str, cache: Path, results: Results, only: list[str]) -> None:
    program = sensitivity_program(model, cache, results)
    if "float" not in results.read().get("rtn", {}):  # the reference every row is compared with
        paths = gptq_bench.prepare(model, cache)
        results.put("rtn", "float", {"perplexity": gptq_bench.perplexity_with(
            gptq_bench.load_float(paths), {}, gptq_bench.eval_windows(paths)), "bits": 16.0})
    rows = mix_rows(model, program)
    if quantizer == "gptq":
        rows = {k: v for k, v in rows.items() if v is not None and not k.endswith("llm-pq-variance")}
    for key, options in rows.items():
        if (only and key not in only) or key in results.read().get(quantizer, {}):
            continue
        results.put(quantizer, key, run_row(model, key, options, quantizer, cache, program))
        write_markdown(list(gptq_bench.MODELS))


# --------------------------------------------------------------------------- the table


def write_markdown(models: list[str]) -> None:
    lines = [
        "# Mixed precision: sensitivity indicators, per-layer mixes and MixLLM 4/8",
        "",
        f"Written by `benchmarks/mixed_precision.py` on {date.today().isoformat()}: {platform.machine()} CPU host "
        f"({os.cpu_count()} cores, shared with other jobs: wall times are indicative, the 1-minute load average "
        f"is given with each), torch on CPU, float32, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.",
        "",
        "Protocol: `benchmarks/gptq.py`'s, so the figures compare with docs/benchmarks/gptq.md: calibration = "
        "32 windows x 256 tokens at seeded offsets (seed 0) from `sotu-1990-2008.txt`; evaluation = the first 16 "
        "non-overlapping 256-token windows of the held-out `sotu-2009-2021.txt` (4,080 tokens predicted). Every "
        "decoder-layer linear quantized, symmetric grids, groups of 64 (SmolLM2) / 128 (Qwen), 8 bits per output "
        "channel; embeddings and LM head float.",
        "",
        "Average bits: everything stored per quantized weight: codes, one fp16 scale per group (int4 g64 = "
        "4.25, int4 g128 = 4.125, int8 per channel = 8 + 16/in), and for MixLLM one int32 index per 8-bit row.",
        "",
    ]
    for model in models:
        data = Results(model).read()
        if not data:
            continue
        lines += [f"## {model}", ""]
        lines += quantized_lines(model, data)
        lines += indicator_lines(model, data)
    (DOCS / "mixed-precision.md").write_text("\n".join(lines) + "\n")


def gptq_uniform(model: str) -> dict:
    """Uniform GPTQ rows of docs/benchmarks/gptq-<model>.json (same pass, protocol, no act-order)."""
    path = DOCS / f"gptq-{model}.json"
    stored = json.loads(path.read_text()) if path.is_file() else {}
    group = group_of(model)
    found = {}
    for bits in (3, 4):
        row = stored.get(f"gptq int{bits} g{group} sym")
        if row and "perplexity" in row:
            found[f"uniform int{bits}"] = {"perplexity": row["perplexity"], "bits": bits + 16 / group,
                                           "policy": "uniform (docs/benchmarks/gptq.md)"}
    return found


def describe_row(key: str) -> str:
    if key == "uniform fp6":
        return "uniform FP6 e3m2 (RTN to nearest even)"
    if key.startswith("uniform"):
        return key
    if key.startswith("layer-mix"):
        kind, target, indicator = key.split(" ")
        widths = ", ".join(kind.split("-")[2]) if kind.count("-") == 2 else "3, 4, 8"
        widths = widths.replace("6", "6 (FP6)")
        return f"per-layer mix {{{widths}}}, target {target} bits, knapsack on {indicator}"
    return f"MixLLM 4/8, {key.split(' ')[1]} of output features at 8 bits"


def quantized_lines(model: str, data: dict) -> list[str]:
    reference = data.get("rtn", {}).get("float", {}).get("perplexity")
    if reference is None:
        return []
    lines = []
    for quantizer in ("rtn", "gptq"):
        rows = {k: v for k, v in data.get(quantizer, {}).items() if k != "float"}
        if quantizer == "gptq":
            rows = {**gptq_uniform(model), **rows}
        if not rows:
            continue
        uniform = {k: v for k, v in rows.items() if k.startswith("uniform")}
        title = {"rtn": "RTN (every row)", "gptq": "GPTQ (`quantize-gptq`, no act-order; MixLLM's 8-bit rows RTN)"}
        lines += [f"### Perplexity against average bits: {title[quantizer]}", "",
                  "| setting | average bits | perplexity | vs float | best uniform at <= bits | mix better? | "
                  "wall time (load before / after) |", "|---|---|---|---|---|---|---|"]
        for key, row in sorted(rows.items(), key=lambda kv: (kv[1]["bits"], kv[0])):
            best = min((u for u in uniform.values() if u["bits"] <= row["bits"] + 1e-9 and u is not row),
                       key=lambda u: u["perplexity"], default=None)
            best_key = next((k for k, u in uniform.items() if u is best), None)
            verdict = "-" if key.startswith("uniform") or best is None else (
                "same" if abs(row["perplexity"] - best["perplexity"]) < 1e-9 else
                "yes" if row["perplexity"] < best["perplexity"] else "**no**")
            timing = (f"{row['seconds']} s ({row['load'][0]} / {row['load'][1]})" if "seconds" in row
                      else "see gptq.md")
            best_text = f"{best_key} ({best['perplexity']:.2f})" if best else "-"
            lines.append(f"| {describe_row(key)} | {row['bits']:.3f} | {row['perplexity']:.2f} | "
                         f"{100 * (row['perplexity'] / reference - 1):+.1f}% | {best_text} | {verdict} | {timing} |")
        lines.append("")
    lines += [f"Float perplexity {reference:.2f}.", ""]
    return lines


def indicator_lines(model: str, data: dict) -> list[str]:
    spearman_row = data.get("indicators", {}).get("spearman")
    timing = data.get("timings", {}).get("sensitivity")
    layer_ppl = data.get("layer_ppl", {})
    reference = data.get("rtn", {}).get("float", {}).get("perplexity")
    lines = ["### Indicators against reality", "",
             "One decoder layer at a time quantized with RTN (symmetric, the groups above) at 3 or at 4 bits, "
             "every other layer float; the perplexity increase measured, and Spearman's rank correlation over "
             "the layers between it and each indicator (1: same ranking). The indicators come from the "
             "`sensitivity` pass (passes/sensitivity.py): LLM-PQ's variance indicator (sum over the layer's "
             "linears of s² / 12 · Var[x]), the Hessian trace tr(δ H δᵀ) with GPTQ's H, both from RTN's "
             "error at that width, and MixLLM's salience summed over the layer's output features (4-bit "
             "error, gradient of the calibration loss) for comparison.", ""]
    if timing:
        lines += [f"`sensitivity` pass: {timing['seconds']} s (load {timing['load'][0]} / {timing['load'][1]}); "
                  f"{timing['summary']}.", ""]
    if spearman_row:
        lines += ["| indicator | Spearman at 3 bits | Spearman at 4 bits |", "|---|---|---|"]
        for name in ("hessian-trace", "llm-pq-variance", "mixllm-salience(4-bit)"):
            cells = [f"{spearman_row[f'{name} {b}']:.3f}" if f"{name} {b}" in spearman_row else "not measured"
                     for b in PROBE_BITS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    if layer_ppl and reference:
        layers = sorted({int(k.split("/")[1]) for k in layer_ppl})
        lines += ["| layer | " + " | ".join(f"int{b} alone: perplexity (increase)" for b in PROBE_BITS) + " |",
                  "|---|" + "---|" * len(PROBE_BITS)]
        for layer in layers:
            cells = []
            for bits in PROBE_BITS:
                row = layer_ppl.get(f"{bits}/{layer}")
                cells.append(f"{row['perplexity']:.3f} ({row['perplexity'] - reference:+.3f})" if row else "-")
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        seconds = [r["seconds"] for r in layer_ppl.values()]
        loads = [l for r in layer_ppl.values() for l in r["load"]]
        lines += ["", f"Float perplexity {reference:.3f}. Each probe (quantize one layer, evaluate): "
                  f"{min(seconds)}-{max(seconds)} s, load {min(loads)}-{max(loads)}.", ""]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,qwen0.5b")
    parser.add_argument("--stages", default="indicators,rtn,gptq")
    parser.add_argument("--rows", default="", help="gptq stage: only these row keys (comma-separated)")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "llmc-bench")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--probe-bits", default=",".join(map(str, PROBE_BITS)),
                        help="indicators stage: the widths of the one-layer-at-a-time probes")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    if not args.table_only:
        for model in models:
            results = Results(model)
            stages = args.stages.split(",")
            if "indicators" in stages:
                stage_indicators(model, args.cache_dir, results, tuple(int(b) for b in args.probe_bits.split(",")))
                write_markdown(list(gptq_bench.MODELS))
            for quantizer in ("rtn", "gptq"):
                if quantizer in stages:
                    stage_quantized(model, quantizer, args.cache_dir, results,
                                    [r for r in args.rows.split(",") if r])
    write_markdown(list(gptq_bench.MODELS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
