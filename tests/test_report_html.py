"""The HTML plan report: deterministic inline SVG, self-contained, and what a browser shows of it
agrees with plan.json."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest

from headless import Browser, find_browser
from llmc.passes import report_svg
from llmc.passes.report_html import render_html

GOLDEN = Path(__file__).parent / "goldens" / "report" / "report.html"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "report.png"


def synthetic_plan() -> dict:
    """A four-layer plan on two devices, mixed bit-widths, two micro-batches, a baseline."""
    modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    decisions = [
        {"module": f"model.layers.{i}.{'self_attn' if m.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{m}",
         "method": "rtn", "bits": 8 if i == 0 else 4, "group_size": 32, "symmetric": True}
        for i in range(4) for m in modules if not (i == 3 and m == "down_proj")
    ]
    memory = {"weights": 50_000, "kv_cache": 80_000, "embedding": 16_384, "lm_head": 0, "activations": 32_768,
              "capacity": 24 * 2**30}
    return {
        "apiVersion": "llmc/v1", "kind": "Plan", "cluster": "two-gpus",
        "model": {"architecture": "llama", "hidden_size": 64, "intermediate_size": 128, "num_layers": 4, "num_heads": 4,
                  "num_kv_heads": 2, "head_dim": 16, "vocab_size": 128, "tie_word_embeddings": False,
                  "dtype": "float32", "source_sha256": "ab" * 32},
        "workload": {"batch": 4, "prompt_tokens": 64, "generated_tokens": 16},
        "quantization": {"summary": "rtn int4/int8, group 32, symmetric", "modules": len(decisions), "linears": 28,
                         "kept_float": ["lm_head", "model.layers.3.mlp.down_proj"], "decisions": decisions},
        "stages": [
            {"index": 0, "device": "box-a/gpu0", "sku": "A100-40G", "compute_capability": "8.0", "layer_start": 0,
             "layer_end": 1, "holds_embedding": True, "holds_lm_head": False, "memory": memory,
             "predicted_prefill_s": 0.004, "predicted_decode_s": 0.0002, "predicted_transfer_s": 0.001},
            {"index": 1, "device": "box-b/gpu0", "sku": "L4", "compute_capability": "8.9", "layer_start": 1,
             "layer_end": 4, "holds_embedding": False, "holds_lm_head": True,
             "memory": dict(memory, weights=120_000, embedding=0, lm_head=16_384, reserve=2**30),
             "predicted_prefill_s": 0.006, "predicted_decode_s": 0.0003, "predicted_transfer_s": 0.0},
        ],
        "unused_devices": [],
        "predicted": {"source": "roofline cost model over the device catalog", "solver_status": "OPTIMAL",
                      "best_bound_s": 0.0108, "prefill_s": 0.012, "decode_s": 0.008, "batch_latency_s": 0.02,
                      "tokens_per_s": 3200.0, "weight_bits": 4, "layer_bits": [4, 4, 4, 8],
                      "prefill_micro_batch_size": 2, "prefill_micro_batches": 2,
                      "decode_micro_batch_size": 4, "decode_micro_batches": 1,
                      "quality": {"indicator": "every layer equally sensitive", "used": None, "budget": None}},
        "measured": [
            {"name": "perplexity.reference", "value": 25.05, "unit": "", "protocol": "first 4 windows <of> 32 tokens"},
            {"name": "perplexity.compressed", "value": 27.5, "unit": "", "protocol": "(same)"},
        ],
        "baselines": [
            {"name": "even-split", "description": "layers split evenly <over> every device", "bits": 4,
             "stages": ["box-a/gpu0: layers 0-1", "box-b/gpu0: layers 2-3"], "prefill_micro_batch_size": 4,
             "decode_micro_batch_size": 4, "batch_latency_s": 0.03, "tokens_per_s": 2133.3, "plan_speedup": 1.5},
            {"name": "memory-greedy", "description": "fill each device in turn", "bits": None, "stages": [],
             "prefill_micro_batch_size": None, "decode_micro_batch_size": None, "batch_latency_s": None,
             "tokens_per_s": None, "plan_speedup": None},
        ],
        "explanation": {"binding": ["box-a/gpu0 is full <of> weights"], "prefill_bottleneck": "stage 1",
                        "decode_bottleneck": "stage 1", "decode_bound": "slowest unit", "bubble_prefill": 0.25,
                        "bubble_decode": 0.5, "bubble": 0.4,
                        "what_if": [{"sku": "L4", "node": "box-b", "solver_status": "OPTIMAL", "tokens_per_s": 4000.0,
                                     "speedup": 1.25}]},
        "memory_reserve_bytes": 2**30,
    }


def test_the_report_matches_its_golden_and_is_deterministic(update_goldens):
    html = render_html(synthetic_plan())
    assert html == render_html(synthetic_plan())
    if update_goldens:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(html)
    assert GOLDEN.is_file(), "no golden: run pytest --update-goldens and review the diff"
    assert html == GOLDEN.read_text(), f"the report differs from {GOLDEN} (pytest --update-goldens, then review)"


def test_the_report_is_self_contained_and_escapes_plan_text():
    html = render_html(synthetic_plan())
    assert "<script" not in html and "@import" not in html and "url(" not in html
    assert not re.search(r'(src|href)="', html), "the page loads nothing from elsewhere"
    assert "first 4 windows &lt;of&gt; 32 tokens" in html
    assert "box-a/gpu0 is full &lt;of&gt; weights" in html and "layers split evenly &lt;over&gt;" in html


def test_the_report_shows_the_planners_figures():
    html = render_html(synthetic_plan())
    assert "20.00 ms (prefill 12.00 ms, decode 8.000 ms)" in html
    assert "prefill 2 x 2 sequences, decode 1 x 4" in html and "4 x3, 8 x1" in html
    baselines = re.search(r'<table id="baselines">.*?</table>', html, re.S).group(0)
    assert "1.50x" in baselines and "does not fit" in baselines
    assert "1.25x" in re.search(r'<table id="what-if">.*?</table>', html, re.S).group(0)
    assert html.count('<svg xmlns="http://www.w3.org/2000/svg" class="plot"') == 5


def test_plots_follow_the_plan():
    doc = synthetic_plan()
    modules, cells = report_svg.bit_widths(doc)
    assert modules[0] == "q_proj" and modules[-1] == "down_proj"
    assert cells[(0, "q_proj")] == 8 and cells[(1, "q_proj")] == 4 and cells[(3, "down_proj")] == 16
    # Two micro-batches: stage 1 starts the first as soon as it arrives and runs them back to back.
    blocks = report_svg.pipeline_schedule([2.0, 3.0], [0.5, 0.0], micro=2)
    assert blocks == [[(0.0, 2.0), (2.0, 4.0)], [(2.5, 5.5), (5.5, 8.5)]]
    assert report_svg.bubble_fraction(blocks) == pytest.approx(1 - 10 / 17)
    assert [p["label"] for p in report_svg.quality_points(doc)] == [
        "unmodified (fp16 size)", "rtn int4/int8, group 32, symmetric"]


def test_a_plan_without_measurements_or_decisions_still_renders():
    doc = synthetic_plan()
    doc.update(measured=[], baselines=None)
    doc["quantization"].update(decisions=[], kept_float=[])
    doc["predicted"]["layer_bits"] = [8, 4, 4, 4]
    html = render_html(doc)
    assert "Nothing measured" in html and "Quality against size" not in html
    assert report_svg.bit_widths(doc) == (["planned"], {(0, "planned"): 8, (1, "planned"): 4, (2, "planned"): 4,
                                                        (3, "planned"): 4})


def _browser_or_skip():
    if find_browser() is None:
        message = "headless Chromium is missing (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def check_page_against_plan(page: Path, plan: dict, screenshot: Path) -> None:
    """What the browser renders of ``page`` says what ``plan`` says."""
    with Browser() as browser:
        browser.open(page)
        text = browser.evaluate("document.body.innerText")
        rows = browser.evaluate("[...document.querySelectorAll('#stages tr[data-stage]')].map(r => r.innerText)")
        strip = browser.evaluate(
            "[...document.querySelectorAll('svg[data-plot=layers] rect[data-column]')]"
            ".map(r => [r.dataset.column, r.dataset.stage, r.getBoundingClientRect().width])")
        bars = browser.evaluate(
            "[...document.querySelectorAll('svg[data-plot=memory] rect[data-part]')]"
            ".map(r => [r.dataset.stage, r.dataset.part, Number(r.dataset.bytes)])")
        engines = browser.evaluate(
            "[...document.querySelectorAll('#engines tr[data-stage]')].map(r => [Number(r.dataset.stage),"
            " r.dataset.status, r.innerText])")
        plots = browser.evaluate(
            "[...document.querySelectorAll('svg.plot')].map(s => [s.dataset.plot, s.getBoundingClientRect().width,"
            " s.getBoundingClientRect().height])")
        browser.screenshot(screenshot)
    assert f"llmc plan: {plan['model']['architecture']} on {plan['cluster']}" in text
    assert len(rows) == len(plan["stages"])
    for row, stage in zip(rows, plan["stages"]):
        assert stage["device"] in row and stage["sku"] in row
        assert f"{stage['layer_start']}–{stage['layer_end'] - 1} ({stage['layer_end'] - stage['layer_start']})" in row
    for m in plan["measured"]:
        assert m["name"] in text and str(m["value"]) in text
    assert f"{plan['predicted']['tokens_per_s']:.1f} generated tokens/s" in text
    # Every engine the build holds, or the skip with the command that builds it.
    assert [(s, status) for s, status, _ in engines] == [(e["stage"], e["status"]) for e in plan["engines"]]
    for (_, _, row), e in zip(engines, plan["engines"]):
        assert (e["path"] if e["status"] == "built" else e["command"]) in row
    # The layer strip: embedding, every layer, LM head, each on its planned stage, drawn.
    owner = {f"layer {i}": str(s["index"]) for s in plan["stages"] for i in range(s["layer_start"], s["layer_end"])}
    assert [c for c, _, _ in strip] == ["embedding", *[f"layer {i}" for i in range(plan["model"]["num_layers"])], "LM head"]
    assert all(stage == owner[column] for column, stage, _ in strip if column in owner)
    assert all(width > 0 for _, _, width in strip)
    # Memory bars carry the plan's bytes (each drawn twice: to scale and zoomed).
    for s in plan["stages"]:
        drawn = {part: b for stage, part, b in bars if stage == str(s["index"]) and part == "weights"}
        assert drawn == {"weights": s["memory"]["weights"]}
    assert {p for p, w, h in plots if w > 0 and h > 0} >= {"memory", "timeline", "bits", "layers"}
    _, bubbles = report_svg.timelines(plan)
    assert f"bubble {100 * bubbles['prefill']:.1f}%" in text
    width, height = _png_size(screenshot)
    assert width >= 1000 and height > 1500


def test_the_compiled_report_shows_the_plan_in_a_browser(pipeline_build, tmp_path):
    _browser_or_skip()
    plan = json.loads((pipeline_build / "plan.json").read_text())
    check_page_against_plan(pipeline_build / "report.html", plan, tmp_path / "report.png")


@pytest.mark.slow
def test_the_example_report_shows_the_plan_in_a_browser(example_build, tmp_path, update_goldens):
    """The example's report, checked the same way; its screenshot is docs/report.png."""
    _browser_or_skip()
    plan = json.loads((example_build / "plan.json").read_text())
    screenshot = SCREENSHOT if update_goldens else tmp_path / "report.png"
    check_page_against_plan(example_build / "report.html", plan, screenshot)
