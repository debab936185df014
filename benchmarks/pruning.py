"""Benchmark the prune passes: perplexity and wall time of magnitude, Wanda, SparseGPT and FLaP.

    python examples/fetch_assets.py && python examples/fetch_assets.py --model qwen0.5b
    OMP_NUM_THREADS=1 python benchmarks/pruning.py [--models smollm2,qwen0.5b] [--rows wanda-2:4,...]

Protocol (the bundled example's): calibration = 32 windows of 256 tokens at seeded offsets
(seed 0) from the 1990-2008 State of the Union addresses; evaluation = perplexity over the first
16 non-overlapping 256-token windows of the held-out 2009-2021 addresses (4,080 tokens
predicted). Every decoder-layer linear is pruned; embeddings and the LM head stay dense.

Each row runs the real passes (``prune-*``, then ``quantize-gptq`` where the row says so) through
``run_pipeline`` on the cached ingest and calibrate entries, times them, and measures perplexity
in-process; the row's own cache entries are deleted afterwards (a pruned float32 checkpoint of
the 0.5B model is 2 GB). The host's load average (1 minute) is recorded before and after each
row. Results accumulate in ``docs/benchmarks/pruning-<model>.json`` (a rerun skips rows it has;
``--fresh`` starts over) and the tables are written to ``docs/benchmarks/pruning.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "examples" / "smollm2" / "assets"
MODELS = {
    "smollm2": "model/SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen0.5b": "model/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
}
CALIBRATION = ("data/sotu-1990-2008.txt", 256, 32)
EVALUATION = ("data/sotu-2009-2021.txt", 256, 16)
GPTQ = dict(bits=4, group_size=64, symmetric=True)  # g64: SmolLM2's 576 and pruned widths split into it
ALIGN = 64  # structured widths: multiples of 64, so FLaP + GPTQ g64 prunes exactly as FLaP alone

# name: (group, description)
ROWS = {
    "float": ("unstructured", "float (no pruning)"),
    **{f"{method}-{setting}": ("unstructured", f"{label} {setting}")
       for setting in ("50%", "2:4", "4:8")
       for method, label in (("magnitude", "magnitude"), ("wanda", "Wanda"), ("sparsegpt", "SparseGPT"))},
    "flap-20%": ("structured", "FLaP 20%"),
    "flap-50%": ("structured", "FLaP 50%"),
    "uniform-20%": ("structured", "uniform 20%"),
    "flap-20%-no-bias": ("structured", "FLaP 20%, no bias compensation"),
    "uniform-50%": ("structured", "uniform 50%"),
    "gptq": ("gptq", "GPTQ alone"),
    **{f"{method}-{setting}+gptq": ("gptq", f"{label} {setting} + GPTQ")
       for setting in ("50%", "2:4")
       for method, label in (("magnitude", "magnitude"), ("wanda", "Wanda"), ("sparsegpt", "SparseGPT"))},
    "flap-20%+gptq": ("gptq", "FLaP 20% + GPTQ"),
}


def row_passes(row: str) -> list:
    """The passes after ingest and calibrate that make the row's model."""
    from llmc.passes.prune_sparsegpt import SparseGptPrunePass
    from llmc.passes.prune_structured import StructuredPrunePass
    from llmc.passes.prune_wanda import MagnitudePrunePass, WandaPrunePass
    from llmc.passes.quantize_gptq import GptqQuantizePass
    from llmc.schemes import QuantizationRules

    gptq = QuantizationRules(method="gptq", **GPTQ)
    name, _, quantized = row.partition("+")
    if name == "float":
        return []
    if name == "gptq":
        return [GptqQuantizePass(**vars(gptq))]
    method, _, setting = name.partition("-")
    if method in ("flap", "uniform"):
        ratio = float(setting.split("%")[0]) / 100
        passes = [StructuredPrunePass(ratio=ratio, align=ALIGN, global_threshold=method == "flap",
                                      bias_compensation="no-bias" not in setting)]
        return passes + ([GptqQuantizePass(**vars(gptq))] if quantized else [])
    cls = {"magnitude": MagnitudePrunePass, "wanda": WandaPrunePass, "sparsegpt": SparseGptPrunePass}[method]
    sparsity = dict(ratio=float(setting[:-1]) / 100) if setting.endswith("%") else dict(pattern=setting)
    # Joint: the prune pass quantizes its linears with the mask held (llmc.passes.prune_blocks rule 3).
    return [cls(**sparsity, quantization=gptq if quantized else None)]


def base_program(model: str, cache: Path):
    from llmc.passes.calibrate import CalibratePass
    from llmc.passes.ingest import IngestPass
    from llmc.pipeline import run_pipeline

    text, seq_len, windows = CALIBRATION
    passes = [IngestPass(source=ASSETS / MODELS[model]), CalibratePass(text=ASSETS / text, seq_len=seq_len,
                                                                        windows=windows)]
    return passes, run_pipeline(passes, cache_root=cache, seed=0, show_progress=False).program


def evaluation_windows(program, cache: Path):
    from llmc.checkpoint import load_tokenizer
    from llmc.passes.calibrate import read_text, tokenize_text
    from llmc.passes.evaluate import consecutive_windows

    text, seq_len, windows = EVALUATION
    tokenizer = load_tokenizer(cache / program.model.checkpoint)
    return consecutive_windows(tokenize_text(tokenizer, read_text(ASSETS / text)), seq_len, windows)


def measure(model: str, row: str, cache: Path) -> dict:
    from llmc.checkpoint import load_model
    from llmc.passes.evaluate import perplexity
    from llmc.pipeline import PassContext, run_pipeline

    base, program = base_program(model, cache)
    windows = evaluation_windows(program, cache)
    before = set(cache.iterdir())
    load = [round(os.getloadavg()[0], 2)]
    extra = row_passes(row)
    run = run_pipeline(base + extra, cache_root=cache, seed=0, show_progress=False)
    timings = {t.name: round(t.seconds, 1) for t in run.timings[len(base):]}
    if any(t.cached for t in run.timings[len(base):]):
        raise RuntimeError(f"{row}: a pass came from the cache, so its time is not a measurement; clear {cache}")
    work = cache / ".bench"
    work.mkdir(exist_ok=True)
    ctx = PassContext(cache_root=cache, workdir=work, entry=".bench", seed=0)
    started = time.perf_counter()
    value = perplexity(load_model(run.program, ctx), windows)
    result = dict(
        row=row, perplexity=round(value, 3), pass_seconds=timings,
        summaries={t.name: t.summary for t in run.timings[len(base):]},
        removed_fraction=run.program.pruning.removed_fraction if run.program.pruning else 0.0,
        decoder_linear_params=sum(layer.weight_params for layer in run.program.layers),
        eval_seconds=round(time.perf_counter() - started, 1),
    )
    load.append(round(os.getloadavg()[0], 2))
    result["load_1min"] = load
    for entry in set(cache.iterdir()) - before:
        shutil.rmtree(entry, ignore_errors=True)
    return result


def table(model: str, results: dict) -> str:
    float_ppl = results["float"]["perplexity"] if "float" in results else None
    full = results["float"]["decoder_linear_params"] if "float" in results else None
    lines = []
    for group, title in (("unstructured", "Unstructured and N:M (no weight quantization)"),
                         ("structured", "Structured (FLaP; widths multiples of 64)"),
                         ("gptq", f"Pruning followed by 4-bit GPTQ (int{GPTQ['bits']} g{GPTQ['group_size']} sym)")):
        rows = [r for r, (g, _) in ROWS.items() if g == group and r in results]
        if not rows:
            continue
        lines += [f"### {title}", "", "| setting | perplexity | vs float | weights removed | decoder linear weights "
                  "| pass wall time | load (1 min, before / after) |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            res = results[r]
            delta = f"{100 * (res['perplexity'] / float_ppl - 1):+.1f}%" if float_ppl and r != "float" else "-"
            seconds = ", ".join(f"{name} {s:.1f} s" for name, s in res["pass_seconds"].items()) or "-"
            params = f"{res['decoder_linear_params'] / 1e6:.1f}M" + (
                f" ({res['decoder_linear_params'] / full:.0%})" if full and group == "structured" else "")
            lines.append(f"| {ROWS[r][1]} | {res['perplexity']:.3f} | {delta} | {res['removed_fraction']:.1%} "
                         f"| {params} | {seconds} | {res['load_1min'][0]:.1f} / {res['load_1min'][1]:.1f} |")
        lines.append("")
    return "\n".join(lines)


def write_markdown(models: list[str]) -> None:
    out = ROOT / "docs" / "benchmarks" / "pruning.md"
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    parts = [
        "# Pruning: magnitude, Wanda, SparseGPT and FLaP",
        "",
        f"Written by `benchmarks/pruning.py` on {date.today().isoformat()}, {platform.machine()} CPU host "
        f"({os.cpu_count()} cores, shared with other jobs: wall times are indicative; the load average is "
        f"in each row), torch on CPU, float32, OMP_NUM_THREADS={threads}.",
        "",
        "Protocol: calibration = 32 windows x 256 tokens at seeded offsets (seed 0) from `sotu-1990-2008.txt`; "
        "evaluation = the first 16 non-overlapping 256-token windows of the held-out `sotu-2009-2021.txt` "
        "(4,080 tokens predicted, no context across windows). Every decoder-layer linear is pruned; embeddings "
        "and the LM head stay dense. Unstructured ratios: Wanda and magnitude per output row, SparseGPT per "
        "128-column block (rows competing); N:M keeps N of every M consecutive inputs. Blocks are calibrated "
        "sequentially on the pruned outputs, true-sequential inside a block. FLaP: one global threshold over "
        "standardised fluctuation scores, key/value groups weighted by their weights, bias compensation; "
        "'uniform' applies the same score and threshold inside each layer, so every layer loses the same "
        "share. 'weights removed' is the share of the pruned linears' weights; structured rows also give "
        "the decoder linears' weights left. '+ GPTQ': Wanda and magnitude masks held while GPTQ's error "
        "feedback quantizes the kept weights, SparseGPT pruning and quantizing in one loop (joint), FLaP "
        "followed by the `quantize-gptq` pass on the smaller model. Wall time: the passes alone (model "
        "load and checkpoint write included), not the perplexity evaluation.",
        "",
    ]
    for model in models:
        path = ROOT / "docs" / "benchmarks" / f"pruning-{model}.json"
        if path.is_file():
            parts += [f"## {model}", "", table(model, json.loads(path.read_text())), ""]
    out.write_text("\n".join(parts).rstrip() + "\n")
    print(f"wrote {out}", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,qwen0.5b")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (default: all)")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/llmc-bench-pruning"))
    parser.add_argument("--fresh", action="store_true", help="forget earlier results")
    parser.add_argument("--markdown-only", action="store_true", help="only rewrite pruning.md from the JSON files")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS] + [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        print(f"pruning: error: unknown model or row {', '.join(unknown)}", file=sys.stderr)
        return 2
    if not args.markdown_only:
        for model in models:
            if not (ASSETS / MODELS[model]).is_file():
                print(f"pruning: error: {ASSETS / MODELS[model]} is missing; run examples/fetch_assets.py", file=sys.stderr)
                return 2
            path = ROOT / "docs" / "benchmarks" / f"pruning-{model}.json"
            results = {} if args.fresh or not path.is_file() else json.loads(path.read_text())
            for row in args.rows.split(","):
                if row in results:
                    continue
                result = measure(model, row, args.cache_dir / model)
                results[row] = result
                print(f"{model} {row}: ppl {result['perplexity']:.3f}, {result['pass_seconds']}, "
                      f"load {result['load_1min']}", file=sys.stderr)
                path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    write_markdown([m for m in MODELS if (ROOT / "docs" / "benchmarks" / f"pruning-{m}.json").is_file()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
