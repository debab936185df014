"""Benchmark the planner: solve time and proven optimality gap on LLM-PQ's cluster shapes.

    python benchmarks/planner.py [--out docs/benchmarks/planner.md] [--repeat 3]

Every case goes through the code path of `llmc plan`: the layer table from a config.json under
benchmarks/models/ (OPT-30B, OPT-66B, BLOOM-176B, and Llama-2-70B / Llama-3.1-405B shapes for
the 80- and 126-layer scale cases), a cluster.yaml resolved against the catalog, and
passes/plan.py's instance. Roofline costs, no weights. Planner options: bit-widths
{3, 4, 8, 16}, quality budget of uniform 4 bits with every layer equally sensitive (the
default), micro-batch sizes from the divisors of the batch. The timed search is
`solve_partition` (cost tables, heuristic incumbent, CP-SAT, solution); baselines and what-if
re-solves are not in it. Each case runs `--repeat` times in this process; the table gives the
least wall time and its CPU time (the machine is shared: CPU time is what the search itself
used). A second table plans three cases with a per-layer sensitivity table (synthetic: the
first and last layers 4x as sensitive), which needs the per-layer formulation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "benchmarks" / "models"
WORKLOAD = dict(batch=32, prompt_tokens=512, generated_tokens=100)
BITS = (3, 4, 8, 16)
TARGETS = {"opt": "model.decoder.layers.*", "bloom": "transformer.h.*", "llama": "model.layers.*"}

# LLM-PQ's cluster shapes: one node per SKU group (NVLink inside V100 and A100 nodes, PCIe inside
# T4 and P100 nodes, 100 Gb/s Ethernet between nodes).
CLUSTERS = {
    "1xV100-32G": [("V100-32G", 1)],
    "3xT4+1xV100": [("T4", 3), ("V100-32G", 1)],
    "3xP100-12G+1xV100": [("P100-12G", 3), ("V100-32G", 1)],
    "4xT4+2xV100": [("T4", 4), ("V100-32G", 2)],
    "2xV100+2xA100-40G": [("V100-32G", 2), ("A100-40G", 2)],
    "4xV100+4xA100-40G": [("V100-32G", 4), ("A100-40G", 4)],
    "4xV100+2xA100-80G": [("V100-32G", 4), ("A100-80G", 2)],
    "4xT4": [("T4", 4)],
    "4xV100": [("V100-32G", 4)],
    "4xA100-80G": [("A100-80G", 4)],
}
SCALE = [
    ("llama-2-70b", "80 layers x 16 GPUs", [("T4", 4), ("V100-32G", 4), ("A100-40G", 4), ("A100-80G", 4)]),
    ("llama-3.1-405b", "126 layers x 32 GPUs",
     [("V100-32G", 8), ("A100-40G", 8), ("A100-80G", 8), ("H100-80G", 8)]),
]
SENSITIVE = [("opt-30b", "4xV100+4xA100-40G"), ("opt-66b", "4xT4+2xV100"), ("opt-30b", "3xT4+1xV100")]


def cluster(groups):
    from llmc.config import ClusterConfig, resolve_cluster

    nodes = [
        {"name": f"n{k}-{sku.lower()}", "link": "pcie" if sku in ("T4", "P100-12G") else "nvlink",
         "gpus": [{"sku": sku, "count": count}]}
        for k, (sku, count) in enumerate(groups)
    ]
    config = ClusterConfig.model_validate(dict(apiVersion="llmc/v1", kind="Cluster", name="bench", nodes=nodes))
    return resolve_cluster(config, "bench")


def program(model: str):
    from llmc.ir import Program
    from llmc.passes.ingest_config import model_from_config

    file = MODELS / model / "config.json"
    info, layers = model_from_config(json.loads(file.read_text()), file)
    return Program(model=info, layers=layers)


def plan_pass(arch: str, sensitivity: Path | None = None, batch: int = WORKLOAD["batch"]):
    from llmc.passes.plan import PlanPass
    from llmc.schemes import QuantizationRules

    rules = QuantizationRules(method="rtn", bits=4, group_size=128, targets=(TARGETS[arch],), ignore=("lm_head",))
    workload = dict(WORKLOAD, batch=batch)
    return PlanPass(quantization=rules, bits=BITS, sensitivity=sensitivity, **workload)


def synthetic_sensitivity(layers: int, path: Path) -> Path:
    rows = []
    for layer in range(layers):
        weight = 4.0 if layer in (0, layers - 1) else 1.0 + 0.5 * (layer % 3)
        rows.append({"layer": layer, "omega": {b: weight * ((15 / (2**b - 1)) ** 2) for b in BITS}})
    path.write_text(json.dumps({"apiVersion": "llmc/v1", "kind": "Sensitivity", "indicator": "synthetic",
                                "layers": rows}))
    return path


def run_case(model: str, groups, repeat: int, sensitivity: Path | None = None, batch: int = WORKLOAD["batch"]) -> dict:
    from llmc.errors import LlmcError
    from llmc.passes.partition import WorkloadDoesNotFit, cost_tables
    from llmc.passes.partition_sat import solve_partition
    from llmc.passes.plan import baselines, planner_instance

    prog = program(model)
    res = cluster(groups)
    instance, _ = planner_instance(prog, res, plan_pass(prog.model.architecture, sensitivity, batch))
    row = dict(model=model, layers=len(prog.layers), gpus=len(res.devices), note="" if batch == WORKLOAD["batch"]
               else f"batch {batch}: the largest that fits")
    best = None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            solution = solve_partition(instance, time_limit_s=10.0, seed=0)
        except WorkloadDoesNotFit as e:
            if e.max_feasible_batch:
                # Plan the largest batch that fits instead; the row says so.
                return run_case(model, groups, repeat, sensitivity, e.max_feasible_batch)
            row.update(status=f"exit {e.exit_code}", wall=time.perf_counter() - wall, cpu=time.process_time() - cpu,
                       note="not even batch 1 fits")
            return row
        except LlmcError as e:
            row.update(status=f"exit {e.exit_code}", wall=time.perf_counter() - wall, cpu=time.process_time() - cpu,
                       note=str(e).split("; ")[0].split(": ", 1)[-1])
            return row
        timing = (time.perf_counter() - wall, time.process_time() - cpu)
        if best is None or timing[0] < best[0]:
            best = timing
    tables = cost_tables(instance)
    found = {b.name: b for b in baselines(instance, tables, solution)}
    a = solution.assignment
    bits = [instance.choices[l][c].bits for l, c in enumerate(a.choice)]
    row.update(
        status=solution.status, gap=solution.gap, wall=best[0], cpu=best[1],
        stages=len(a.order), tokens_per_s=batch * WORKLOAD["generated_tokens"] / solution.evaluation.latency_s,
        micro=f"{tables.counts[a.prefill_option]}, {tables.counts[a.decode_option]}",
        bits=", ".join(f"{b}x{bits.count(b)}" for b in sorted(set(bits))),
        even=found["even-split"].plan_speedup, greedy=found["memory-greedy"].plan_speedup,
        search=solution.search.split(" (")[0].split(";")[0],
    )
    return row


def fmt(row: dict) -> str:
    if not row["status"].startswith(("OPTIMAL", "FEASIBLE")):
        return (f"| {row['model']} | {row['layers']} | {row['gpus']} | {row['status']} | | {row['wall']:.2f} | "
                f"{row['cpu']:.2f} | | | | | | {row['note']} |")
    ratio = lambda v: f"{v:.2f}x" if v else "does not fit"  # noqa: E731
    return (f"| {row['model']} | {row['layers']} | {row['gpus']} | {row['status']} | {100 * row['gap']:.2f}% | "
            f"{row['wall']:.2f} | {row['cpu']:.2f} | {row['stages']} | {row['micro']} | {row['bits']} | "
            f"{row['tokens_per_s']:.0f} | {ratio(row['even'])} / {ratio(row['greedy'])} | {row['note']} |")


HEADER = ("| model | layers | GPUs | status | gap | wall s | CPU s | stages | micro-batches (prefill, decode) | "
          "bits x layers | tokens/s | speed-up vs even / greedy | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "planner.md")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--date", default=date.today().isoformat())
    args = parser.parse_args()
    import tempfile

    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = ["# Planner benchmark\n",
             f"Machine: {cpu}, {os.cpu_count()} cores shared with other jobs (load average {load:.1f} at the start), "
             "no GPU; "
             f"Python {platform.python_version()}, OR-Tools {version('ortools')}; date {args.date}. "
             f"Command: `python benchmarks/planner.py --repeat {args.repeat}`.\n",
             "Protocol: " + " ".join(__doc__.split("\n\n")[2].split()) + "\n",
             f"Workload: batch {WORKLOAD['batch']}, {WORKLOAD['prompt_tokens']} prompt + "
             f"{WORKLOAD['generated_tokens']} generated tokens. Status OPTIMAL: proven optimal (gap 0). "
             "\"exit 3\": no plan fits; the note is the planner's error message with its numbers. \"batch N\": "
             "batch 32 does not fit (exit 4), and the row plans the largest batch that fits within the quality "
             "budget, as the exit-4 message advises (its time excludes the first attempt's diagnosis).\n"]
    all_rows = []
    for name, groups in CLUSTERS.items():
        lines.append(f"\n## {name}\n\n{HEADER}")
        for model in ("opt-30b", "opt-66b", "bloom-176b"):
            row = run_case(model, groups, args.repeat)
            all_rows.append((name, row))
            lines.append(fmt(row))
            print(name, model, row["status"], f"{row['wall']:.2f}s", file=sys.stderr)
    lines.append(f"\n## Scale\n\n{HEADER}")
    for model, label, groups in SCALE:
        row = run_case(model, groups, args.repeat)
        all_rows.append((label, row))
        lines.append(fmt(row))
        print(label, row["status"], f"{row['wall']:.2f}s", file=sys.stderr)
    lines.append(f"\n## Per-layer sensitivity\n\n{HEADER.replace('| note |', '| cluster; search |')}")
    sensitivity_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, name in SENSITIVE:
            table = synthetic_sensitivity(len(program(model).layers), Path(tmp) / f"{model}.json")
            row = run_case(model, CLUSTERS[name], args.repeat, table)
            row["note"] = f"{name}; {row.get('search', '')}" + (f"; {row['note']}" if row["note"] else "")
            sensitivity_rows.append(row)
            lines.append(fmt(row))
            print("sensitivity", name, model, row["status"], f"{row['wall']:.2f}s", file=sys.stderr)
    solved = [r for _, r in all_rows if r["status"] in ("OPTIMAL", "FEASIBLE")]
    small = [r for r in solved if r["gpus"] <= 8 and r["layers"] <= 64]
    lines.append(
        f"\nSummary: {sum(r['status'] == 'OPTIMAL' for r in solved)} of {len(solved)} solvable cases proven optimal; "
        f"slowest search with <= 8 GPUs and <= 64 layers: {max(r['wall'] for r in small):.2f} s wall "
        f"({max(r['cpu'] for r in small):.2f} s CPU); 80 x 16: "
        + ", ".join(f"{r['wall']:.2f} s wall" for l, r in all_rows if l.startswith("80")) + "; 126 x 32: "
        + ", ".join(f"{r['wall']:.2f} s wall" for l, r in all_rows if l.startswith("126")) + ".\n"
    )
    lines.append(
        "Notes. Every roofline case is solved by the count model (layers identical in cost and quality) "
        "and proven optimal; the slowest is the 80-layer case, whose 16 GPUs in four SKUs leave the most "
        "distinct layer counts to rule out. Wall times are on a shared 2-core host (see the load average "
        "above): CPU time is the better measure of the search itself. For reference, issue 5 "
        "cites 3 to 126 s per LLM-PQ search with Gurobi. A per-layer sensitivity is settled in under a "
        "second when the count model's relaxation, its bits re-placed inside each stage, meets the budget "
        "(first two rows of the last table); otherwise the per-layer model searches every device order, "
        "which is exact but slow (last row: "
        + ("proven optimal" if sensitivity_rows[-1]["status"] == "OPTIMAL" else
           f"{sensitivity_rows[-1]['status']}, not proven optimal (gap {sensitivity_rows[-1]['gap']:.1%})")
        + " within the default limit of 10 deterministic seconds).\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
