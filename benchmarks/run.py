"""Benchmark `llmc run` on the bundled example: the stage pipeline across processes.

    python benchmarks/run.py [--build BUILD] [--out docs/benchmarks/run.md]

1. Compiles examples/smollm2 (unless --build names a compiled build).
2. `llmc run BUILD` on the prompt the compile checked (its torch tokens are the reference).
3. Eight prompts of equal token length (the first sentences of the held-out text cut to the
   same length) with 32 greedy tokens each, at micro-batch sizes 1, 2, 4 and 8, every run a
   subprocess exactly as a user runs it, one process per stage.
4. The same eight prompts through the same graphs in one process (ONNX Runtime, stages in
   sequence, one batch), the baseline the pipeline is compared with.

Needs `python examples/fetch_assets.py` first. Writes a Markdown table with the machine, the date
and the protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "smollm2"
PROMPT_TOKENS = 12
NEW_TOKENS = 32
MICRO_BATCH_SIZES = (1, 2, 4, 8)


def compile_example(out: Path, cache: Path) -> None:
    subprocess.run([sys.executable, "-m", "llmc.cli", "compile", str(EXAMPLE / "model.yaml"),
                    str(EXAMPLE / "cluster.yaml"), "-o", str(out), "--cache-dir", str(cache), "-q"], check=True)


def equal_length_prompts(build: Path, count: int = 8, length: int = PROMPT_TOKENS) -> list[str]:
    """The first ``count`` sentences of the held-out text whose first ``length`` tokens decode to a
    prompt that tokenises back to exactly ``length`` tokens."""
    from llmc.run import load_build_tokenizer

    tokenizer = load_build_tokenizer(build)
    text = (EXAMPLE / "assets" / "data" / "sotu-2009-2021.txt").read_text(encoding="utf-8")
    prompts = []
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        ids = tokenizer(sentence.strip())["input_ids"]
        if len(ids) <= length:
            continue
        prompt = tokenizer.decode(ids[:length])
        if len(tokenizer(prompt)["input_ids"]) == length and prompt not in prompts:
            prompts.append(prompt)
        if len(prompts) == count:
            return prompts
    raise SystemExit("not enough sentences in the held-out text")


def llmc_run(build: Path, *args: str) -> tuple[dict, float]:
    command = [sys.executable, "-m", "llmc.cli", "run", str(build), "--json", *args]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"llmc run failed ({result.returncode}): {result.stderr}")
    return json.loads(result.stdout), seconds


def sequential_baseline(build: Path, prompts: list[str]) -> tuple[float, float]:
    """(tokens/s, seconds) of the stages in sequence in this process, all prompts in one batch."""
    import numpy as np

    from llmc.passes.export import open_stage_sessions, run_stages_greedy
    from llmc.run import load_build_tokenizer, read_build, stage_graph

    doc = read_build(build)
    graphs = [build / stage_graph(s["index"]) for s in doc["stages"]]
    tokenizer = load_build_tokenizer(build)
    ids = np.asarray([tokenizer(p)["input_ids"] for p in prompts], dtype=np.int64)
    open_stage_sessions(graphs)  # warm the file cache, as the pipeline's barrier does
    start = time.perf_counter()
    run_stages_greedy(graphs, ids, NEW_TOKENS)  # includes opening the sessions (about 0.2 s here)
    seconds = time.perf_counter() - start
    return len(prompts) * NEW_TOKENS / seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, help="A compiled build of examples/smollm2 (default: compile one).")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "run.md")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        build = args.build
        if build is None:
            build = Path(tmp) / "out"
            compile_example(build, Path(tmp) / "cache")
        check, check_s = llmc_run(build)
        print(f"check prompt: {check['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
        prompts = equal_length_prompts(build)
        (Path(tmp) / "prompts.txt").write_text("\n".join(prompts) + "\n")
        rows = []
        for size in MICRO_BATCH_SIZES:
            doc, seconds = llmc_run(build, "--prompts-file", str(Path(tmp) / "prompts.txt"), "--new-tokens",
                                    str(NEW_TOKENS), "--micro-batch-size", str(size))
            rows.append((size, doc, seconds))
            print(f"micro-batch size {size}: {doc['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
        baseline_tps, baseline_s = sequential_baseline(build, prompts)
        plan = json.loads((build / "plan.json").read_text())
    load_after = os.getloadavg()[0]

    import onnxruntime
    import torch

    count = len(plan["stages"])
    stages = ", ".join(f"{s['device']} layers {s['layer_start']}-{s['layer_end'] - 1}" for s in plan["stages"])
    lines = [
        "# `llmc run`: the example's stage pipeline across processes",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()}-core CPU, {platform.system()}; onnxruntime "
        f"{onnxruntime.__version__} (CPU), torch {torch.__version__} (gloo). Date: {date.today()}.",
        f"Load average (1 min) {load_before:.1f} before the runs and {load_after:.1f} after: the cores were",
        f"shared with other jobs whenever it is above 0 plus the runs' own {count} processes.",
        f"Script: `python benchmarks/run.py` (examples/smollm2: SmolLM2-135M-Instruct, "
        f"{plan['quantization']['summary']}, on the",
        f"A100 + L4 + H100 example plan: {stages}).",
        "",
        "Protocol: every run is `llmc run BUILD --json` as a subprocess: one process per stage on this",
        "host, torch.distributed (gloo, loopback) between them, ONNX Runtime with 1 thread per stage on",
        "the CPU. Tokens/s counts generated tokens over the wall time from the first prefill to the",
        "last token back at stage 0 (sessions already open); the command's wall time includes starting",
        "the processes and imports. Bubble: 1 - mean stage busy time / wall time. The greedy tokens are",
        "checked against the reference on every run (the check prompt: the torch model's tokens",
        "recorded at compile; the others: the same graphs run in sequence in one process).",
        "",
        f"Eight prompts: the first sentences of the held-out text (sotu-2009-2021.txt) cut to",
        f"{PROMPT_TOKENS} tokens each, {NEW_TOKENS} greedy tokens each.",
        "",
        "| run | micro-batches | tokens | tokens/s | pipeline wall (s) | first token (ms) | bubble | tokens match | command wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| check prompt ({len(check['tokens'][0])} tokens) | {check['micro_batches']} x 1 | "
        f"{sum(map(len, check['tokens']))} | {check['tokens_per_s']:.1f} | {check['wall_s']:.2f} | "
        f"{check['first_token_s'] * 1e3:.0f} | {check['bubble_fraction']:.0%} | "
        f"{'yes' if all(c['match'] for c in check['checks']) else 'NO'} | {check_s:.1f} |",
    ]
    for size, doc, seconds in rows:
        lines.append(
            f"| 8 prompts, micro-batch size {size} | {doc['micro_batches']} x {size} | {sum(map(len, doc['tokens']))} | "
            f"{doc['tokens_per_s']:.1f} | {doc['wall_s']:.2f} | {doc['first_token_s'] * 1e3:.0f} | "
            f"{doc['bubble_fraction']:.0%} | {'yes' if all(c['match'] for c in doc['checks']) else 'NO'} | {seconds:.1f} |"
        )
    lines += [
        f"| 8 prompts, one process, stages in sequence (baseline) | 1 x 8 | {8 * NEW_TOKENS} | {baseline_tps:.1f} | "
        f"{baseline_s:.2f} | | | (reference) | |",
        "",
        f"{count} stage processes share {os.cpu_count()} cores here, so the pipeline cannot run its stages in",
        f"parallel as it would on {count} GPUs: the figures measure the runtime (hand-offs, scheduling,",
        "micro-batching), not the planned devices. The plan's own prediction for those devices is in",
        "the build's report.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
