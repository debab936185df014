"""The plan report's plots as inline SVG, from ``plan.json`` alone.

Pure functions from the plan document to SVG text: no plotting library, no randomness, every
coordinate formatted with a fixed precision, so the same plan gives the same bytes and goldens
can be diffed. Each plot reads the fields it needs defensively (``.get``): fields the planner
adds later (micro-batches, per-layer bits, reserve) are used when present.
"""

from __future__ import annotations

import re
from html import escape

STAGE_COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
                "#9c755f", "#bab0ac")
MEMORY_PARTS = (  # (plan.json key(s), label, colour)
    (("weights",), "weights", "#4e79a7"),
    (("embedding", "lm_head"), "embedding / LM head", "#a0cbe8"),
    (("kv_cache",), "KV cache", "#f28e2b"),
    (("activations",), "activations", "#59a14f"),
)
RESERVE_COLOR = "#bab0ac"
BITS_COLORS = {2: "#b2182b", 3: "#ef8a62", 4: "#fddbc7", 6: "#d1e5f0", 8: "#67a9cf", 16: "#2166ac"}
FONT = 'font-family="DejaVu Sans, Arial, sans-serif" font-size="12"'


def _f(x: float) -> str:
    """Fixed-precision coordinates: deterministic text, no '-0.0'."""
    text = f"{x:.1f}"
    return "0.0" if text == "-0.0" else text


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 0.01 else f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


class _Svg:
    def __init__(self, width: int, height: int, title: str, plot: str):
        self.width, self.height, self.parts = width, height, []
        self.head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" data-plot="{plot}" '
                     f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" {FONT}>'
                     f"<title>{escape(title)}</title>")

    def rect(self, x, y, w, h, fill, title=None, **attrs):
        extra = "".join(f' {k.replace("_", "-")}="{escape(str(v))}"' for k, v in sorted(attrs.items()))
        body = f"<title>{escape(title)}</title>" if title else ""
        self.parts.append(f'<rect x="{_f(x)}" y="{_f(y)}" width="{_f(max(w, 0))}" height="{_f(h)}" fill="{fill}"{extra}>'
                          f"{body}</rect>")

    def text(self, x, y, content, anchor="start", **attrs):
        extra = "".join(f' {k.replace("_", "-")}="{escape(str(v))}"' for k, v in sorted(attrs.items()))
        self.parts.append(f'<text x="{_f(x)}" y="{_f(y)}" text-anchor="{anchor}"{extra}>{escape(content)}</text>')

    def line(self, x1, y1, x2, y2, stroke="#333", dash=None):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(f'<line x1="{_f(x1)}" y1="{_f(y1)}" x2="{_f(x2)}" y2="{_f(y2)}" stroke="{stroke}"{d}/>')

    def circle(self, x, y, r, fill, title=None):
        body = f"<title>{escape(title)}</title>" if title else ""
        self.parts.append(f'<circle cx="{_f(x)}" cy="{_f(y)}" r="{_f(r)}" fill="{fill}">{body}</circle>')

    def legend(self, x, y, items):
        for label, color in items:
            self.rect(x, y - 9, 10, 10, color)
            self.text(x + 14, y, label)
            x += 24 + 7 * len(label)

    def __str__(self) -> str:
        return self.head + "".join(self.parts) + "</svg>"


def stage_color(index: int) -> str:
    return STAGE_COLORS[index % len(STAGE_COLORS)]


# --------------------------------------------------------------------------- memory


def reserve_bytes(doc: dict, stage: dict) -> int | None:
    """The runtime reserve of a stage's device, where plan.json records it."""
    memory = stage.get("memory", {})
    if "reserve" in memory:
        return int(memory["reserve"])
    if "memory_reserve_bytes" in doc:
        return int(doc["memory_reserve_bytes"])
    return None


def memory_bars(doc: dict, reserve: int | None = None) -> str:
    """Per device: what the plan puts in memory, stacked, against the device's capacity.

    Two panels: to scale (bar = the device's memory: usable capacity plus the reserve), and the
    used part zoomed so small models stay readable.
    """
    stages = doc["stages"]
    label_w, bar_w, row_h = 250, 480, 26
    height = 60 + 2 * (len(stages) * row_h + 34)
    svg = _Svg(label_w + bar_w + 150, height, "Memory per device (predicted)", "memory")
    svg.legend(10, 16, [(label, color) for _, label, color in MEMORY_PARTS] + [("runtime reserve", RESERVE_COLOR)])
    used = {s["index"]: sum(int(s["memory"].get(k, 0)) for keys, _, _ in MEMORY_PARTS for k in keys) for s in stages}
    reserves = {s["index"]: reserve_bytes(doc, s) if reserve_bytes(doc, s) is not None else reserve for s in stages}
    device_total = {s["index"]: int(s["memory"]["capacity"]) + (reserves[s["index"]] or 0) for s in stages}
    panels = (
        ("to scale: bar = device memory", max(device_total.values()), True),
        ("zoomed: used memory", max(used.values()) * 1.15 or 1, False),
    )
    y = 40
    for title, scale, show_capacity in panels:
        svg.text(10, y, title, font_weight="bold")
        y += 10
        for s in stages:
            i, memory = s["index"], s["memory"]
            svg.text(10, y + 16, f"stage {i}: {s['device']} ({s['sku']})")
            x = label_w
            for keys, label, color in MEMORY_PARTS:
                size = sum(int(memory.get(k, 0)) for k in keys)
                w = bar_w * size / scale
                svg.rect(x, y + 4, w, row_h - 8, color, title=f"{label}: {_bytes(size)}", data_part=label,
                         data_bytes=size, data_stage=i)
                x += w
            if show_capacity:
                cap_x = label_w + bar_w * int(memory["capacity"]) / scale
                svg.rect(x, y + 4, cap_x - x, row_h - 8, "#ffffff", title="free", stroke="#999")
                if reserves[i]:
                    svg.rect(cap_x, y + 4, bar_w * reserves[i] / scale, row_h - 8, RESERVE_COLOR,
                             title=f"runtime reserve: {_bytes(reserves[i])}", data_part="reserve", data_bytes=reserves[i])
                svg.line(cap_x, y + 1, cap_x, y + row_h - 1, "#000")
                svg.text(label_w + bar_w + 8, y + 16,
                         f"{100 * used[i] / int(memory['capacity']):.2f}% of {_bytes(int(memory['capacity']))}")
            else:
                svg.text(x + 6, y + 16, _bytes(used[i]))
            y += row_h
        y += 24
    return str(svg)


# --------------------------------------------------------------------------- pipeline timeline


def micro_batches(doc: dict) -> tuple[int, int]:
    """(prefill, decode) micro-batch counts from the plan; 1 where it names none."""
    predicted = doc.get("predicted", {})
    both = int(predicted.get("micro_batches", doc.get("micro_batches", 1)) or 1)
    return (int(predicted.get("prefill_micro_batches", both) or both),
            int(predicted.get("decode_micro_batches", both) or both))


def pipeline_schedule(compute: list[float], transfer: list[float], micro: int) -> list[list[tuple[float, float]]]:
    """Start and end of each micro-batch on each stage, in order (a GPipe-style flush).

    Micro-batch m starts on stage s when it has left stage s - 1 (plus the hand-off) and stage s
    has finished micro-batch m - 1; every micro-batch is ready at stage 0 at time 0 (a decode
    step is drawn alone, its tokens already back from the last stage).
    """
    blocks: list[list[tuple[float, float]]] = [[] for _ in compute]
    for m in range(micro):
        ready = 0.0
        for s, duration in enumerate(compute):
            start = max(ready, blocks[s][-1][1] if blocks[s] else 0.0)
            blocks[s].append((start, start + duration))
            ready = start + duration + (transfer[s] if s + 1 < len(compute) else 0.0)
    return blocks


def bubble_fraction(blocks: list[list[tuple[float, float]]]) -> float:
    makespan = max(end for stage in blocks for _, end in stage)
    busy = sum(end - start for stage in blocks for start, end in stage)
    return 1.0 - busy / (len(blocks) * makespan) if makespan > 0 else 0.0


def timelines(doc: dict) -> tuple[str, dict[str, float]]:
    """Prefill and one decode step per device, per micro-batch; returns (svg, bubble fractions)."""
    stages = doc["stages"]
    workload = doc.get("workload", {})
    prompt, generated = int(workload.get("prompt_tokens", 1)), int(workload.get("generated_tokens", 0))
    tokens = max(prompt + generated, 1)
    prefill_mb, decode_mb = micro_batches(doc)
    # The cost model gives each stage's time for the whole batch and its hand-off bytes per token;
    # a micro-batch takes its share of both.
    phases = []
    for name, micro, key, share in (("prefill", prefill_mb, "predicted_prefill_s", prompt / tokens),
                                    ("decode (one token)", decode_mb, "predicted_decode_s", 1 / tokens)):
        compute = [float(s.get(key, 0.0)) / micro for s in stages]
        transfer = [float(s.get("predicted_transfer_s", 0.0)) * share / micro for s in stages]
        blocks = pipeline_schedule(compute, transfer, micro)
        phases.append((name, micro, blocks, bubble_fraction(blocks)))
    label_w, plot_w, row_h = 250, 540, 22
    height = 20 + sum(40 + len(stages) * row_h + 20 for _ in phases)
    svg = _Svg(label_w + plot_w + 40, height, "Pipeline timeline (predicted)", "timeline")
    y = 18
    bubbles = {}
    for name, micro, blocks, bubble in phases:
        makespan = max(end for stage in blocks for _, end in stage) or 1.0
        bubbles[name.split()[0]] = bubble
        svg.text(10, y, f"{name}: {micro} micro-batch{'es' if micro > 1 else ''}, {_ms(makespan)}, "
                        f"bubble {100 * bubble:.1f}%", font_weight="bold", data_bubble=f"{bubble:.4f}")
        y += 12
        for s, stage_blocks in zip(stages, blocks):
            svg.text(10, y + 15, f"stage {s['index']}: {s['device']}")
            svg.rect(label_w, y + 3, plot_w, row_h - 6, "#f3f3f3")
            for m, (start, end) in enumerate(stage_blocks):
                svg.rect(label_w + plot_w * start / makespan, y + 3, plot_w * (end - start) / makespan, row_h - 6,
                         stage_color(s["index"]), title=f"micro-batch {m}: {_ms(start)} to {_ms(end)}",
                         stroke="#fff", data_stage=s["index"])
            y += row_h
        svg.line(label_w, y + 2, label_w + plot_w, y + 2)
        svg.text(label_w, y + 16, "0")
        svg.text(label_w + plot_w, y + 16, _ms(makespan), anchor="end")
        y += 40
    return str(svg), bubbles


# --------------------------------------------------------------------------- bits and layers


_LAYER_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def bit_widths(doc: dict) -> tuple[list[str], dict[tuple[int, str], int]]:
    """(module columns, {(layer, module): bits}) from the quantization decisions, else the plan."""
    cells: dict[tuple[int, str], int] = {}
    for d in doc.get("quantization", {}).get("decisions", []):
        match = _LAYER_MODULE.search(d["module"])
        if match:
            cells[(int(match.group(1)), match.group(2).rsplit(".", 1)[-1])] = int(d["bits"])
    if cells:
        kept = doc.get("quantization", {}).get("kept_float", [])
        for name in kept:
            match = _LAYER_MODULE.search(name)
            if match:
                cells.setdefault((int(match.group(1)), match.group(2).rsplit(".", 1)[-1]), 16)
        modules = sorted({m for _, m in cells}, key=_module_order)
        return modules, cells
    # No decisions (`llmc plan`): the planned bits per layer, as one column.
    bits_by_layer = doc.get("predicted", {}).get("layer_bits") or [None] * int(doc["model"]["num_layers"])
    default = int(doc.get("predicted", {}).get("weight_bits", 16))
    for layer, bits in enumerate(bits_by_layer):
        cells[(layer, "planned")] = int(bits if bits is not None else default)
    return ["planned"], cells


def _module_order(name: str) -> tuple[int, str]:
    order = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return (order.index(name) if name in order else len(order), name)


def bits_heatmap(doc: dict) -> str:
    modules, cells = bit_widths(doc)
    layers = int(doc["model"]["num_layers"])
    cell_w = max(10, min(28, 700 // max(layers, 1)))
    cell_h, label_w = 20, 90
    svg = _Svg(label_w + layers * cell_w + 20, 60 + len(modules) * cell_h + 30, "Bit-width per layer and module",
               "bits")
    present = sorted(set(cells.values()))
    svg.legend(10, 16, [(f"{b}-bit" if b < 16 else "float", BITS_COLORS.get(b, "#999")) for b in present])
    top = 34
    for row, module in enumerate(modules):
        svg.text(label_w - 6, top + row * cell_h + 14, module, anchor="end")
        for layer in range(layers):
            bits = cells.get((layer, module))
            color = BITS_COLORS.get(bits, "#999") if bits is not None else "#ffffff"
            svg.rect(label_w + layer * cell_w, top + row * cell_h, cell_w - 1, cell_h - 1, color,
                     title=f"layer {layer} {module}: {bits if bits is not None else '-'} bits",
                     data_layer=layer, data_module=module, data_bits=bits if bits is not None else "")
    y = top + len(modules) * cell_h + 14
    step = max(1, layers // 10)
    for layer in range(0, layers, step):
        svg.text(label_w + layer * cell_w + cell_w / 2, y, str(layer), anchor="middle")
    svg.text(label_w, y + 16, "layer")
    return str(svg)


def layer_strip(doc: dict) -> str:
    """Which device holds each layer, with the embedding before and the LM head after."""
    stages = doc["stages"]
    layers = int(doc["model"]["num_layers"])
    label_w, strip_w = 90, 700
    cell_w = strip_w / (layers + 2)
    svg = _Svg(label_w + strip_w + 20, 70 + 18 * len(stages), "Layers per device", "layers")
    owner = {}
    for s in stages:
        for layer in range(int(s["layer_start"]), int(s["layer_end"])):
            owner[layer] = s
    first = next((s for s in stages if s.get("holds_embedding")), stages[0])
    last = next((s for s in stages if s.get("holds_lm_head")), stages[-1])
    columns = [("embedding", first)] + [(f"layer {i}", owner.get(i)) for i in range(layers)] + [("LM head", last)]
    for k, (label, s) in enumerate(columns):
        color = stage_color(s["index"]) if s else "#ffffff"
        svg.rect(label_w + k * cell_w, 20, cell_w - 1, 30, color,
                 title=f"{label}: {s['device'] if s else 'unplaced'}", data_column=label,
                 data_stage=s["index"] if s else "")
    svg.text(label_w - 6, 40, "device", anchor="end")
    svg.text(label_w, 64, "embedding")
    svg.text(label_w + strip_w, 64, "LM head", anchor="end")
    for k, s in enumerate(stages):
        y = 80 + 18 * k
        svg.rect(label_w, y - 9, 10, 10, stage_color(s["index"]))
        svg.text(label_w + 14, y, f"stage {s['index']}: {s['device']} ({s['sku']}), "
                                  f"layers {s['layer_start']}-{int(s['layer_end']) - 1}")
    return str(svg)


# --------------------------------------------------------------------------- quality


def float_model_bytes(model: dict, bits: int = 16) -> int:
    """The model's weights at ``bits`` per value: decoder linears, embedding, untied LM head."""
    hidden, inter = int(model["hidden_size"]), int(model["intermediate_size"])
    q_width = int(model["num_heads"]) * int(model["head_dim"])
    kv_width = int(model["num_kv_heads"]) * int(model["head_dim"])
    per_layer = 2 * hidden * q_width + 2 * hidden * kv_width + 3 * hidden * inter
    params = int(model["num_layers"]) * per_layer + int(model["vocab_size"]) * hidden
    if not model.get("tie_word_embeddings", False):
        params += int(model["vocab_size"]) * hidden
    return params * bits // 8


def compressed_model_bytes(doc: dict) -> int:
    """Weights as the plan stores them (per stage), a tied embedding counted once."""
    stages = doc["stages"]
    total = sum(int(s["memory"].get("weights", 0)) for s in stages)
    total += max(int(s["memory"].get("embedding", 0)) for s in stages)
    if not doc["model"].get("tie_word_embeddings", False):
        total += max(int(s["memory"].get("lm_head", 0)) for s in stages)
    return total


def quality_points(doc: dict) -> list[dict]:
    """(label, size, perplexity, source) for each measured setting in plan.json."""
    measured = {m["name"]: m for m in doc.get("measured", [])}
    points = []
    if "perplexity.reference" in measured:
        points.append(dict(label="unmodified (fp16 size)", bytes=float_model_bytes(doc["model"]),
                           perplexity=float(measured["perplexity.reference"]["value"])))
    if "perplexity.compressed" in measured:
        points.append(dict(label=doc.get("quantization", {}).get("summary", "compressed"),
                           bytes=compressed_model_bytes(doc), perplexity=float(measured["perplexity.compressed"]["value"])))
    return points


def quality_plot(doc: dict) -> str | None:
    points = quality_points(doc)
    if not points:
        return None
    left, width, top, height = 70, 560, 30, 220
    svg = _Svg(left + width + 40, top + height + 60 + 20 * len(points), "Perplexity against model size (measured)",
               "quality")
    sizes = [p["bytes"] for p in points]
    ppls = [p["perplexity"] for p in points]
    x_max = max(sizes) * 1.1
    y_min, y_max = min(ppls) * 0.9, max(ppls) * 1.1
    svg.rect(left, top, width, height, "#fafafa", stroke="#999")
    for k in range(5):
        value = y_min + (y_max - y_min) * k / 4
        y = top + height - height * (value - y_min) / (y_max - y_min)
        svg.line(left, y, left + width, y, "#ddd")
        svg.text(left - 6, y + 4, f"{value:.1f}", anchor="end")
        size = x_max * k / 4
        x = left + width * size / x_max
        svg.text(x, top + height + 16, _bytes(size) if size else "0", anchor="middle")
    svg.text(left + width / 2, top + height + 36, "weights (bytes)", anchor="middle")
    svg.text(14, top - 12, "perplexity (held-out)")
    for k, p in enumerate(points):
        x = left + width * p["bytes"] / x_max
        y = top + height - height * (p["perplexity"] - y_min) / (y_max - y_min)
        color = STAGE_COLORS[k % len(STAGE_COLORS)]
        svg.circle(x, y, 6, color, title=f"{p['label']}: {_bytes(p['bytes'])}, perplexity {p['perplexity']:.3f}")
        y_legend = top + height + 56 + 20 * k
        svg.rect(left, y_legend - 9, 10, 10, color)
        svg.text(left + 14, y_legend, f"{p['label']}: perplexity {p['perplexity']:.2f}, {_bytes(p['bytes'])}",
                 data_point=p["label"])
    return str(svg)
