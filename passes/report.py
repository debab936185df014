"""`report`: ``plan.json`` (the source of truth) and the Markdown plan report.

Every figure sits under ``predicted`` (cost model) or ``measured`` (this compile) so nobody
mistakes one for the other.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, replace

from llmc.ir import Artifact, Program
from llmc.pipeline import Pass, PassContext, PassResult
from llmc.passes.manifests import template_environment


def plan_document(program: Program, cluster_name: str, workload: dict) -> dict:
    """The JSON-ready plan: model, compression, stages, predictions and measurements."""
    model = program.model
    plan = program.plan
    quantized = {q.module for q in program.quantization}
    linears = [lin.name for layer in program.layers for lin in layer.linears]
    if program.quantization:
        q = program.quantization[0]
        summary = (
            f"{q.method} int{q.bits}, "
            f"{'per-channel' if q.group_size == -1 else f'group {q.group_size}'}, "
            f"{'symmetric' if q.symmetric else 'asymmetric'}"
        )
    elif plan is not None and min(plan.layer_bits) < 16:
        widths = Counter(plan.layer_bits)
        planned = ", ".join(f"{'float' if b >= 16 else f'int{b}'} x{n}" for b, n in sorted(widths.items()))
        summary = (f"int{plan.weight_bits} planned" if len(widths) == 1 else f"planned per layer: {planned}")
        summary += " (not applied: `llmc plan` changes no weights)"
    else:
        summary = "none (float weights)"
    doc = {
        "apiVersion": "llmc/v1",
        "kind": "Plan",
        "cluster": cluster_name,
        "model": {k: v for k, v in asdict(model).items() if k != "checkpoint"},
        "workload": workload,
        "quantization": {
            "summary": summary,
            "modules": len(quantized),
            "linears": len(linears),
            "kept_float": sorted({"lm_head"} | {n for n in linears if n not in quantized})
            if program.quantization else [],
            "decisions": [asdict(q) for q in program.quantization],
        },
        "stages": [asdict(s) for s in plan.stages] if plan else [],
        "unused_devices": list(plan.unused_devices) if plan else [],
        "predicted": {
            "source": f"cost model (passes/costs.py): {plan.cost_source}",
            "solver_status": plan.solver_status,
            "search": plan.search,
            "best_bound_s": plan.best_bound_s,
            "gap": plan.gap,
            "prefill_s": plan.predicted_prefill_s,
            "decode_s": plan.predicted_decode_s,
            "batch_latency_s": plan.predicted_batch_latency_s,
            "tokens_per_s": plan.predicted_tokens_per_s,
            "weight_bits": plan.weight_bits,
            "layer_bits": list(plan.layer_bits),
            "prefill_micro_batch_size": plan.prefill_micro_batch_size,
            "prefill_micro_batches": plan.prefill_micro_batches,
            "decode_micro_batch_size": plan.decode_micro_batch_size,
            "decode_micro_batches": plan.decode_micro_batches,
            "quality": {
                "indicator": plan.quality_indicator,
                "used": plan.quality_used,
                "budget": plan.quality_budget,
            },
        } if plan else {},
        # Beside the plan, costed by the same model: what simple splits would predict.
        "baselines": [asdict(b) for b in plan.baselines] if plan else [],
        "explanation": asdict(plan.explanation) if plan and plan.explanation else None,
        "measured": [asdict(m) for m in program.measurements],
        # TensorRT engines per stage and device type: built, or skipped with the command that
        # builds them on a host that can (see passes/build_engines.py).
        "engines": [asdict(e) for e in program.engines],
    }
    return doc


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _bits(widths: list[int]) -> str:
    """'4' for a uniform range, else '3 x10, 8 x2' in ascending width (16: float)."""
    counts = Counter(widths)
    name = {16: "float"}
    if len(counts) == 1:
        return name.get(widths[0], str(widths[0]))
    return ", ".join(f"{name.get(b, b)} x{n}" for b, n in sorted(counts.items()))


def render_markdown(doc: dict) -> str:
    env = template_environment()
    env.filters.update(gib=_gib, ms=_ms, bits=_bits)

    class View(dict):
        __getattr__ = dict.__getitem__

    def view(value):
        if isinstance(value, dict):
            return View({k: view(v) for k, v in value.items()})
        if isinstance(value, list):
            return [view(v) for v in value]
        return value

    plan = view(doc)
    for stage in plan["stages"]:
        stage["memory"]["total"] = sum(v for k, v in stage["memory"].items() if k not in ("capacity", "reserve"))
    return env.get_template("report.md.j2").render(plan=plan)


@dataclass(frozen=True)
class ReportPass(Pass):
    name = "report"
    uses_cluster = True
    batch: int
    prompt_tokens: int
    generated_tokens: int

    def requires(self, program: Program) -> None:
        if program.plan is None:
            raise ValueError("report needs a plan; run 'plan' first")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        workload = dict(batch=self.batch, prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens)
        doc = plan_document(program, ctx.cluster.name, workload)
        (ctx.workdir / "plan.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        (ctx.workdir / "report.md").write_text(render_markdown(doc))
        from llmc.passes.report_html import render_html

        (ctx.workdir / "report.html").write_text(render_html(doc, reserve=ctx.cluster.memory_reserve_bytes))
        kept = tuple(a for a in program.artifacts if a.kind != "report")
        artifacts = (
            Artifact(path="plan.json", ref=ctx.ref("plan.json"), kind="report"),
            Artifact(path="report.md", ref=ctx.ref("report.md"), kind="report"),
            Artifact(path="report.html", ref=ctx.ref("report.html"), kind="report"),
        )
        return PassResult(replace(program, artifacts=kept + artifacts), "plan.json, report.md, report.html")
