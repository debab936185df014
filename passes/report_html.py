"""The self-contained HTML plan report: ``plan.json`` rendered with inline SVG plots.

No scripts, no external stylesheets, fonts or images: the page works offline and from a CI
artifact. Every figure is read from the plan document (the source of truth) and labelled
*predicted* (cost model) or *measured* (this compile), as in plan.json.
"""

from __future__ import annotations

from collections import Counter

from markupsafe import Markup

from llmc.passes import report_svg
from llmc.passes.manifests import template_environment


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 0.01 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def stage_rows(doc: dict, reserve: int | None) -> list[dict]:
    rows = []
    for s in doc["stages"]:
        memory = s["memory"]
        used = sum(int(v) for k, v in memory.items() if k not in ("capacity", "reserve"))
        stage_reserve = report_svg.reserve_bytes(doc, s)
        rows.append(dict(
            index=s["index"], device=s["device"], sku=s["sku"],
            sm=str(s.get("compute_capability", "")).replace(".", ""),
            layers=f"{s['layer_start']}–{int(s['layer_end']) - 1}", layer_count=int(s["layer_end"]) - int(s["layer_start"]),
            embedding=bool(s.get("holds_embedding")), lm_head=bool(s.get("holds_lm_head")),
            used=report_svg._bytes(used), capacity=report_svg._bytes(int(memory["capacity"])),
            reserve=report_svg._bytes(stage_reserve if stage_reserve is not None else reserve)
            if (stage_reserve is not None or reserve is not None) else "not recorded",
            prefill=_ms(float(s.get("predicted_prefill_s", 0.0))), decode=_ms(float(s.get("predicted_decode_s", 0.0))),
            transfer=_ms(float(s.get("predicted_transfer_s", 0.0))), color=report_svg.stage_color(s["index"]),
            bits=s.get("layer_bits"),
        ))
    return rows


def render_html(doc: dict, reserve: int | None = None) -> str:
    """The report page for a plan document. ``reserve``: the per-device runtime reserve in bytes,
    used when plan.json does not record it."""
    timeline_svg, drawn = report_svg.timelines(doc)
    # The plan's bubbles: decode tokens overlap across micro-batches, which the drawing of one
    # isolated step does not show (its idle tail is no bubble of the steady state).
    explanation = doc.get("explanation") or {}
    bubbles = {phase: explanation.get(f"bubble_{phase}", drawn[phase]) for phase in ("prefill", "decode")}
    predicted = doc.get("predicted", {})
    prefill_micro, decode_micro = report_svg.micro_batches(doc)
    view = dict(
        plan=doc,
        stages=stage_rows(doc, reserve),
        predicted=[
            ("solver", f"CP-SAT {predicted.get('solver_status', '?')}, lower bound "
                       f"{_ms(float(predicted.get('best_bound_s', 0.0)))}"),
            ("batch latency", f"{_ms(float(predicted.get('batch_latency_s', 0.0)))} (prefill "
                              f"{_ms(float(predicted.get('prefill_s', 0.0)))}, decode {_ms(float(predicted.get('decode_s', 0.0)))})"),
            ("throughput", f"{float(predicted.get('tokens_per_s', 0.0)):.1f} generated tokens/s"),
            ("micro-batches", f"prefill {prefill_micro} x {predicted.get('prefill_micro_batch_size', '?')} sequences, "
                              f"decode {decode_micro} x {predicted.get('decode_micro_batch_size', '?')}"),
            ("bit-widths", ", ".join(f"{b} x{n}" for b, n in sorted(Counter(predicted.get("layer_bits") or []).items()))
             or str(predicted.get("weight_bits", "?"))),
            ("quality", (predicted.get("quality") or {}).get("indicator", "not recorded")),
            ("pipeline bubble (prefill, decode)",
             f"{100 * bubbles['prefill']:.1f}%, {100 * bubbles['decode']:.1f}%"),
        ] if predicted else [],
        measured=doc.get("measured", []),
        explanation=doc.get("explanation"),
        baselines=[dict(b, latency=_ms(float(b["batch_latency_s"])) if b.get("batch_latency_s") is not None else None)
                   for b in doc.get("baselines", []) or []],
        memory_svg=report_svg.memory_bars(doc, reserve),
        timeline_svg=timeline_svg,
        bits_svg=report_svg.bits_heatmap(doc),
        layers_svg=report_svg.layer_strip(doc),
        quality_svg=report_svg.quality_plot(doc),
    )
    env = template_environment()
    env.autoescape = True  # plan text (prompts in protocols, names) is escaped; the plots are ours
    for key in ("memory_svg", "timeline_svg", "bits_svg", "layers_svg", "quality_svg"):
        if view[key] is not None:
            view[key] = Markup(view[key])
    return env.get_template("report.html.j2").render(**view)
