"""Benchmark GPTQ against RTN and a reference GPTQ implementation: perplexity, wall time, memory.

    python examples/fetch_assets.py && python examples/fetch_assets.py --model qwen0.5b
    python benchmarks/gptq.py [--models smollm2,qwen0.5b] [--reference-python /tmp/ref-venv/bin/python]

Protocol (the bundled example's): calibration = 32 windows of 256 tokens at seeded offsets
(seed 0) from the 1990-2008 State of the Union addresses; evaluation = perplexity over the first
16 non-overlapping 256-token windows of the held-out 2009-2021 addresses (4,080 tokens
predicted). Every decoder-layer linear is quantized; embeddings and the LM head stay float.

Each GPTQ setting runs `quantize-gptq` in a fresh subprocess (its ingest and calibrate passes
are cache hits), which reports the pass's wall time and the process's peak RSS; RTN rows are
computed in-process. ``--reference-python`` names an interpreter with llm-compressor installed
(a separate venv: it pins other versions); ``benchmarks/gptq_reference.py`` then runs its GPTQ
on the same float checkpoint, calibration windows and evaluation windows.

Results accumulate in ``docs/benchmarks/gptq-<model>.json`` (a rerun skips rows it has;
``--fresh`` starts over) and the tables are written to ``docs/benchmarks/gptq.md``. The runs in
that file were made with ``OMP_NUM_THREADS=1`` for llmc and the reference alike (the host's two
cores were shared with other jobs; two threads then lose more to synchronisation than they gain).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that over from
    the parent through fork and exec, so a child of a large process would report the parent's."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "examples" / "smollm2" / "assets"
MODELS = {
    # name: (file under assets, group size for the grouped settings: g128 where the dims allow)
    "smollm2": ("model/SmolLM2-135M-Instruct.Q4_1.gguf", 64),  # hidden 576 = 4.5 x 128
    "qwen0.5b": ("model/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", 128),
}
REFERENCE_NOTE = (
    "Reference: llm-compressor 0.14.0.1 (compressed-tensors 0.19.0, transformers 5.17.0, torch "
    "2.13.0+cpu) in its own virtual environment, `benchmarks/gptq_reference.py`: `GPTQModifier` "
    "on every decoder linear (LM head ignored), damping 0.01, blocks of 128, static act-order or "
    "none, the same float checkpoint, the same 32 calibration windows (not shuffled) and the same "
    "evaluation windows and formula; its time is `oneshot` alone, its memory the peak RSS of its "
    "process. It runs on this CPU (it warns that no accelerator is present). Differences that "
    "remain: its symmetric grid is absmax / 7.5 with codes clamped to [-8, 7] (the group's largest "
    "positive weight is clipped by half a step), llmc's is max(max / 7, -min / 8) (nothing "
    "clipped); it computes all of a block's Hessians from one forward, llmc true-sequentially. "
    "Both ran with `OMP_NUM_THREADS=1`. The SmolLM2 runs shared the host's two cores with other jobs "
    "(load average 5-10), so their wall times compare runs made side by side, not absolute speed; "
    "its GPTQ int8 per-channel and int3 act-order rows ran later on an otherwise idle host. "
    "The Qwen2.5-0.5B GPTQ rows and its reference ran on 2026-11-23 with one other single-threaded "
    "job on the second core (load average about 2); the earlier, contended Qwen runs had taken "
    "2929 s (int4) and 2376 s (int3) for the same perplexities."
)
# The settings grid each model gets by default: the full one where a run fits a session here.
GRID = {"smollm2": "full", "qwen0.5b": "core"}
CALIBRATION = ("data/sotu-1990-2008.txt", 256, 32)
EVALUATION = ("data/sotu-2009-2021.txt", 256, 16)


def settings(group: int, grid: str) -> list[tuple[int, int, bool]]:
    """(bits, group_size, symmetric): 4-bit and 3-bit grouped, 8-bit per channel ('full'), or
    the symmetric 4- and 3-bit ones ('core', for models too slow for the full grid here)."""
    if grid == "core":
        return [(4, group, True), (3, group, True)]
    return [(4, group, True), (4, group, False), (3, group, True), (3, group, False), (8, -1, True)]


def gptq_runs(group: int, grid: str) -> list[tuple[int, int, bool, bool]]:
    """(bits, group_size, symmetric, act_order): every setting, then act-order for the
    symmetric 4- and 3-bit ones (the 2-core host cannot afford the full cross product)."""
    runs = [(bits, size, symmetric, False) for bits, size, symmetric in settings(group, grid)]
    return runs if grid == "core" else runs + [(4, group, True, True), (3, group, True, True)]


def reference_runs(group: int, grid: str) -> list[tuple[int, int, bool, bool]]:
    """(bits, group_size, symmetric, act_order) run with the reference implementation."""
    if grid == "core":
        return [(4, group, True, False)]
    return [(4, group, True, False), (3, group, True, False), (4, group, True, True)]


def label(bits: int, group: int, symmetric: bool) -> str:
    return f"int{bits} {'per-channel' if group == -1 else f'g{group}'} {'sym' if symmetric else 'asym'}"


# --------------------------------------------------------------------------- shared set-up


def prepare(model: str, cache: Path) -> dict:
    """Ingest and calibrate (cached), write the evaluation windows; paths for the runs."""
    from safetensors.torch import save_file

    from llmc.checkpoint import load_tokenizer
    from llmc.passes.calibrate import read_text, tokenize_text
    from llmc.passes.evaluate import consecutive_windows
    from llmc.pipeline import run_pipeline

    run = run_pipeline(base_passes(model), cache_root=cache, seed=0, show_progress=False)
    program = run.program
    checkpoint = cache / program.model.checkpoint
    evaluation = cache / f"eval-{model}.safetensors"
    if not evaluation.is_file():
        text, seq_len, windows = EVALUATION
        tokens = tokenize_text(load_tokenizer(checkpoint), read_text(ASSETS / text))
        save_file({"tokens": consecutive_windows(tokens, seq_len, windows).contiguous()}, evaluation)
    return {
        "checkpoint": str(checkpoint),
        "calibration": str(cache / program.calibration.tokens_ref),
        "evaluation": str(evaluation),
    }


def base_passes(model: str) -> list:
    from llmc.passes.calibrate import CalibratePass
    from llmc.passes.ingest import IngestPass

    text, seq_len, windows = CALIBRATION
    return [IngestPass(source=ASSETS / MODELS[model][0]),
            CalibratePass(text=ASSETS / text, seq_len=seq_len, windows=windows)]


def load_float(paths: dict):
    from llmc.checkpoint import load_hf_model

    return load_hf_model(Path(paths["checkpoint"]), "float32")


def eval_windows(paths: dict):
    from safetensors.torch import load_file

    return load_file(paths["evaluation"])["tokens"]


def perplexity_with(model, weights: dict, windows) -> float:
    """Perplexity with ``weights`` (name -> float tensor) in place of the model's, then restored."""
    import torch

    from llmc.passes.evaluate import perplexity

    modules = dict(model.named_modules())
    saved = {name: modules[name].weight.detach().clone() for name in weights}
    with torch.no_grad():
        for name, weight in weights.items():
            modules[name].weight.copy_(weight)
        try:
            return perplexity(model, windows)
        finally:
            for name, weight in saved.items():
                modules[name].weight.copy_(weight)


# --------------------------------------------------------------------------- one GPTQ run (subprocess)


def run_gptq(model: str, cache: Path, bits: int, group: int, symmetric: bool, act_order: bool) -> dict:
    from llmc.checkpoint import load_packed
    from llmc.passes.quantize_gptq import GptqQuantizePass
    from llmc.pipeline import run_pipeline

    paths = prepare(model, cache)
    gptq = GptqQuantizePass(bits=bits, group_size=group, symmetric=symmetric, act_order=act_order)
    start = time.perf_counter()
    run = run_pipeline(base_passes(model) + [gptq], cache_root=cache, seed=0, show_progress=False)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    timing = run.timings[-1]
    packed = load_packed(cache / run.program.quantized_weights)
    weights = {name: p.dequantize() for name, p in packed.items()}
    ppl = perplexity_with(load_float(paths), weights, eval_windows(paths))
    return {"seconds": timing.seconds if not timing.cached else None, "wall_s": seconds,
            "peak_rss_bytes": peak, "perplexity": ppl, "summary": timing.summary}


# --------------------------------------------------------------------------- the table


def measure(models: list[str], cache: Path, results: dict, save, reference_python: str | None, grid: str) -> None:
    import torch

    from llmc.passes.quantize_gptq import fit_grid
    from llmc.passes.quantize_rtn import rtn_quantize

    for model in models:
        group = MODELS[model][1]
        paths = prepare(model, cache)
        rows = results.setdefault(model, {})

        def record(key: str, row: dict) -> None:
            rows[key] = row
            save()
            print(f"  {model} {key}: {json.dumps(row)}", file=sys.stderr, flush=True)

        if any(k not in rows for k in ["float"] + [f"rtn {label(*s)}" for s in settings(group, grid)]):
            float_model = load_float(paths)
            windows = eval_windows(paths)
            linears = {n: m for n, m in float_model.named_modules()
                       if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
            if "float" not in rows:
                record("float", {"perplexity": perplexity_with(float_model, {}, windows)})
            for bits, size, symmetric in settings(group, grid):
                key = f"rtn {label(bits, size, symmetric)}"
                if key not in rows:
                    weights = {n: rtn_quantize(m.weight, bits, size, symmetric).dequantize() for n, m in linears.items()}
                    record(key, {"perplexity": perplexity_with(float_model, weights, windows)})
                key = f"rtn-full-range {label(bits, size, symmetric)}"
                if symmetric and bits < 8 and grid == "full" and key not in rows:
                    # RTN on GPTQ's symmetric grid ([-8, 7] at 4 bits): separates grid from algorithm.
                    weights = {n: _round_on_grid(m.weight, bits, size, fit_grid) for n, m in linears.items()}
                    record(key, {"perplexity": perplexity_with(float_model, weights, windows)})
            del float_model

        for bits, size, symmetric, act_order in gptq_runs(group, grid):
            key = f"gptq {label(bits, size, symmetric)}{' act-order' if act_order else ''}"
            if key in rows:
                continue
            command = [sys.executable, __file__, "--one", json.dumps(
                [model, str(cache), bits, size, symmetric, act_order])]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{key} failed:\n{done.stderr[-3000:]}")
            record(key, json.loads(done.stdout.strip().splitlines()[-1]))

        if reference_python:
            for bits, size, symmetric, act_order in reference_runs(group, grid):
                key = f"reference {label(bits, size, symmetric)}{' act-order' if act_order else ''}"
                if key in rows:
                    continue
                command = [reference_python, str(ROOT / "benchmarks" / "gptq_reference.py"),
                           json.dumps(dict(paths, bits=bits, group_size=size, symmetric=symmetric,
                                           act_order=act_order))]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    record(key, {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"})
                else:
                    record(key, json.loads(done.stdout.strip().splitlines()[-1]))


def _round_on_grid(weight, bits, group, fit_grid):
    import torch

    rows, columns = weight.shape
    size = columns if group == -1 else group
    w = weight.detach().float().reshape(rows * columns // size, size)
    scale, zero = fit_grid(w, bits, True)
    q = torch.round(w / scale[:, None]).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q * scale[:, None]).reshape(rows, columns)


def write_table(results: dict, out: Path, reference_note: str) -> None:
    lines = [
        "# GPTQ vs RTN (and a reference GPTQ)",
        "",
        f"Written by `benchmarks/gptq.py` on {date.today().isoformat()}: {platform.machine()} CPU host "
        f"({_cpus()} cores, shared with other jobs: wall times are indicative), torch on CPU, float32.",
        "",
        "Protocol: calibration = 32 windows x 256 tokens at seeded offsets (seed 0) from "
        "`sotu-1990-2008.txt`; evaluation = the first 16 non-overlapping 256-token windows of the "
        "held-out `sotu-2009-2021.txt` (4,080 tokens predicted, no context across windows). Every "
        "decoder-layer linear quantized; embeddings and LM head float. GPTQ: damping 0.01, lazy "
        "batches of 128, true-sequential inside each block, each block calibrated on the quantized "
        "blocks before it. Time and memory: the `quantize-gptq` pass alone, in a fresh process "
        "(peak RSS of that process, model load included; '-' for the runs whose figure was read "
        "from ru_maxrss, which Linux carries over from the parent through fork and exec, so they "
        "reported the benchmark's own 2 GiB; the script now reads VmHWM).",
        "",
        "Symmetric grids: llmc's RTN uses codes in [-(2^(b-1) - 1), 2^(b-1) - 1] (int4: [-7, 7]); "
        "GPTQ the full signed range [-2^(b-1), 2^(b-1) - 1] (int4: [-8, 7]) with scale "
        "max(max / (2^(b-1) - 1), -min / 2^(b-1)). The 'RTN on GPTQ's symmetric grid' rows round "
        "to GPTQ's grid without error feedback, separating the grid's share of the gain from the "
        "algorithm's. 8-bit rows are per output channel (TensorRT's int8 weight-only layout). "
        "SmolLM2's hidden size 576 is not a multiple of 128, so its groups are 64.",
        "",
        "4-bit asymmetric groups of 32 reproduce SmolLM2's stored Q4_1 weights exactly; that "
        "setting is left out.",
        "",
    ]
    for model, rows in results.items():
        ref = rows.get("float", {}).get("perplexity")
        if ref is None:
            continue
        lines += [f"## {model}", "", "| method | setting | act-order | perplexity | vs float | pass wall time | peak RSS |",
                  "|---|---|---|---|---|---|---|",
                  f"| float | - | - | {ref:.2f} | - | - | - |"]
        rank = {"rtn": 0, "rtn-full-range": 1, "gptq": 2, "reference": 3}
        ordered = sorted((k for k in rows if k != "float"), key=lambda k: (rank.get(k.split(" ")[0], 4), k.endswith("act-order")))
        for key in ordered:
            row = rows[key]
            method, _, rest = key.partition(" ")
            act = "yes" if rest.endswith(" act-order") else "no"
            setting = rest.removesuffix(" act-order")
            if "error" in row:
                lines.append(f"| {method} | {setting} | {act} | did not run: {row['error']} | | | |")
                continue
            ppl = row["perplexity"]
            seconds = row.get("seconds")
            peak = row.get("peak_rss_bytes")
            shown_method = {"rtn": "RTN (llmc)", "rtn-full-range": "RTN on GPTQ's symmetric grid",
                            "gptq": "GPTQ (llmc)", "reference": "GPTQ (llm-compressor)"}.get(method, method)
            lines.append(
                f"| {shown_method} | {setting} | {act if method in ('gptq', 'reference') else '-'} | {ppl:.2f} | "
                f"{100 * (ppl / ref - 1):+.2f}% | {f'{seconds:.0f} s' if seconds else '-'} | "
                f"{f'{peak / 2**30:.2f} GiB' if peak else '-'} |"
            )
        lines.append("")
    lines += ["## llmc against the reference", "",
              "| model | setting | act-order | perplexity llmc / reference | pass time llmc / reference |",
              "|---|---|---|---|---|"]
    for model, rows in results.items():
        for key, theirs in rows.items():
            ours = rows.get("gptq" + key.removeprefix("reference"))
            if not key.startswith("reference ") or ours is None or "error" in theirs:
                continue
            setting = key.removeprefix("reference ").removesuffix(" act-order")
            time_ratio = f"{ours['seconds'] / theirs['seconds']:.2f}" if ours.get("seconds") else "-"
            lines.append(f"| {model} | {setting} | {'yes' if key.endswith('act-order') else 'no'} | "
                         f"{ours['perplexity']:.2f} / {theirs['perplexity']:.2f} = "
                         f"{ours['perplexity'] / theirs['perplexity']:.3f} | {time_ratio} |")
    missing = []
    for model, rows in results.items():
        group, grid = MODELS[model][1], GRID[model]
        wanted = [f"gptq {label(b, g, s)}{' act-order' if a else ''}" for b, g, s, a in gptq_runs(group, grid)]
        wanted += [f"reference {label(b, g, s)}{' act-order' if a else ''}" for b, g, s, a in reference_runs(group, grid)]
        missing += [f"{model} {key}" for key in wanted if key not in rows]
    if missing:
        lines += ["", "Not measured yet (the script resumes them; a GPTQ run interrupted midway resumes at "
                  "its block): " + "; ".join(missing) + "."]
    lines += ["", reference_note, ""]
    out.write_text("\n".join(lines))


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,qwen0.5b")
    parser.add_argument("--grid", choices=["full", "core"],
                        help="settings measured (core: symmetric int4 and int3 only, for a slow model); "
                        "default per model: " + ", ".join(f"{m} {g}" for m, g in GRID.items()))
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "llmc-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "gptq.md")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "benchmarks",
                        help="folder of the per-model results, gptq-<model>.json")
    parser.add_argument("--reference-python", help="interpreter with llm-compressor (see gptq_reference.py)")
    parser.add_argument("--reference-note", default=REFERENCE_NOTE, help="text placed under the tables")
    parser.add_argument("--fresh", action="store_true", help="ignore stored results")
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from stored results")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        model, cache, bits, group, symmetric, act_order = json.loads(args.one)
        print(json.dumps(run_gptq(model, Path(cache), bits, group, symmetric, act_order)))
        return
    models = args.models.split(",")
    results = {}
    for model in MODELS:
        path = args.results / f"gptq-{model}.json"
        if path.is_file() and not (args.fresh and model in models):
            results[model] = json.loads(path.read_text())

    def save() -> None:
        # One file per model, so runs for different models can go side by side.
        args.results.mkdir(parents=True, exist_ok=True)
        for model in models:
            if model in results:
                (args.results / f"gptq-{model}.json").write_text(json.dumps(results[model], indent=1) + "\n")
        write_table({m: results[m] for m in MODELS if m in results}, args.out, args.reference_note)

    if not args.table_only:
        for model in models:
            measure([model], args.cache_dir, results, save, args.reference_python, args.grid or GRID[model])
    save()


if __name__ == "__main__":
    main()
