"""`plan`: the device order, layer ranges, per-layer bit-widths and micro-batch sizes.

The glue between the program and the planner core (docs/planner.md):

1. The instance: devices from the resolved cluster (capacity minus the runtime reserve), the
   hand-off links, one :class:`LayerShape` per decoder layer from the layer table, and per layer
   the bit-width choices with their stored bytes as ``quantization`` resolves each linear
   (``planner.bits`` replaces the width of every quantized linear; unset, the layer is stored as
   configured).
2. Quality: omega from ``planner.sensitivity``, else the program's sensitivity table, else
   every layer equally sensitive, ``omega(b) = ((2^b0 - 1) / (2^b - 1))^2`` with ``b0`` the
   configured width (LLM-PQ's indicator scales with the squared quantization step). The budget
   is ``planner.quality_budget``, else the omega of every layer at ``b0``. With one choice per
   layer and no table or budget there is no quality constraint.
3. Solve (passes/partition_sat.py), then the baselines, and the explanation: binding limits,
   bottlenecks, bubbles and, per SKU of the inventory, the plan with one more such GPU.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from llmc.errors import ConfigError
from llmc.ir import Baseline, Explanation, Plan, Program, Stage, StageMemory, WhatIf
from llmc.passes.costs import FP16_BYTES, DeviceSpec, LayerChoice, LayerShape, Links, MeasuredProfile, ProfilePoint
from llmc.passes.costs import Workload as CostWorkload
from llmc.passes.costs import bytes_per_weight
from llmc.passes.partition import CostTables, PartitionNotSolved, PlanInstance, cost_tables, size_text
from llmc.passes.partition import heuristic_plans
from llmc.passes.partition_sat import Solution, solve_partition
from llmc.pipeline import Pass, PassContext, PassResult
from llmc.schemes import (QuantizationRules, at_width, effective_group, fp6_group_problem, int3_group_problem,
                          resolve_schemes)

MAX_DEFAULT_MICRO_BATCH_SIZES = 8


# ---------------------------------------------------------------------------------- instance


def cluster_devices(cluster) -> tuple[tuple[DeviceSpec, ...], Links]:
    """Devices (capacity minus the reserve) and links of a resolved llmc.config.Cluster."""
    devices = tuple(
        DeviceSpec(
            name=d.name, sku=d.sku.name, node=d.node,
            memory_bytes=max(0, d.sku.memory_bytes - cluster.memory_reserve_bytes),
            fp16_flops=d.sku.fp16_flops_per_s, memory_bandwidth=d.sku.memory_bandwidth_bytes_per_s,
        )
        for d in cluster.devices
    )
    intra: dict[str, float] = {}
    network = None
    for a, b in zip(cluster.devices, cluster.devices[1:]):
        if a.node == b.node:
            intra[a.node] = min(intra.get(a.node, math.inf), a.link_to_next_bytes_s)
        else:
            network = a.link_to_next_bytes_s
    for d in cluster.devices:
        # A node with one GPU has no intra-node link yet (a what-if may add one): its PCIe.
        intra.setdefault(d.node, d.sku.pcie_bytes_per_s)
    return devices, Links(tuple(sorted(intra.items())), network)


def layer_shape(layer, model) -> LayerShape:
    """The cost model's view of one layer of the table (pruned layers keep their own widths)."""
    out = {lin.name.rsplit(".", 1)[-1]: lin.out_features for lin in layer.linears}
    attention = out.get("q_proj", model.num_heads * model.head_dim)
    kv_width = out.get("k_proj", model.num_kv_heads * model.head_dim)
    inter = out.get("up_proj") or out.get("fc1") or out.get("dense_h_to_4h") or model.intermediate_size
    mlp_live = 2 if "gate_proj" in out else 1
    return LayerShape(layer.weight_params, model.hidden_size, attention, 2 * kv_width * FP16_BYTES,
                      model.hidden_size + mlp_live * inter)


def layer_choices(layer, schemes: dict, bits: tuple[int, ...]) -> tuple[LayerChoice, ...]:
    """The ways to store a layer: as configured (``bits`` empty; labelled with the width most of
    its weights get), or each quantized linear at each width in ``bits`` (rule 1)."""

    def stored(stored_as, label: int | None = None) -> LayerChoice:
        total, quantized, by_bits = 0.0, 0, Counter()
        for lin in layer.linears:
            scheme, params = schemes[lin.name], lin.in_features * lin.out_features
            scheme = None if scheme is None else stored_as(scheme)
            if scheme is None:
                total += params * FP16_BYTES
                by_bits[16] += params
                continue
            group = effective_group(scheme, lin.in_features, lin.name)
            total += params * bytes_per_weight(scheme.bits, group, not scheme.symmetric)
            quantized += params
            by_bits[scheme.bits] += params
        dominant = max(by_bits.items(), key=lambda kv: (kv[1], kv[0]))[0]
        return LayerChoice(dominant if label is None else label, total, quantized)

    if not bits:
        return (stored(lambda scheme: scheme),)
    return tuple(stored(lambda scheme, b=b: at_width(scheme, b), label=b) for b in bits)


def default_micro_batch_sizes(batch: int) -> tuple[int, ...]:
    """The divisors of the batch (equal micro-batches), at most 8 of them spread evenly."""
    divisors = [d for d in range(1, batch + 1) if batch % d == 0]
    if len(divisors) <= MAX_DEFAULT_MICRO_BATCH_SIZES:
        return tuple(divisors)
    picks = {round(k * (len(divisors) - 1) / (MAX_DEFAULT_MICRO_BATCH_SIZES - 1)) for k in range(MAX_DEFAULT_MICRO_BATCH_SIZES)}
    return tuple(divisors[k] for k in sorted(picks))


def measured_profile(path: Path, cluster) -> MeasuredProfile:
    """A profile file keyed by the cluster's SKU names (aliases resolved through the catalog)."""
    from llmc.catalog import load_catalog, lookup
    from llmc.profiles import read_profile

    data = read_profile(path)
    catalog = load_catalog()
    ours = {d.sku.name.casefold(): d.sku.name for d in cluster.devices}
    entries = []
    for i, device in enumerate(data.devices):
        known = lookup(device.sku, catalog)
        name = ours.get((known.name if known else device.sku).casefold())
        if name is None and known is None:
            raise ConfigError(str(path), f"devices[{i}].sku",
                              f"unknown SKU '{device.sku}': neither in the catalog nor in cluster.yaml")
        if name is None:
            continue  # a SKU this cluster does not have
        keys: dict[tuple, list[ProfilePoint]] = {}
        for t in device.layers:
            keys.setdefault((name, t.phase, t.bits), []).append(ProfilePoint(t.batch, t.seq_len, t.seconds))
        entries += [(key, tuple(points)) for key, points in keys.items()]
    return MeasuredProfile(path.name, tuple(sorted(entries)))


@dataclass(frozen=True)
class Quality:
    omega: tuple[tuple[float, ...], ...] | None
    budget: float | None
    indicator: str


def quality_constraint(program: Program, labels: list[tuple[int, ...]], base_bits: int, budget: float | None,
                       table_path: Path | None) -> Quality:
    """Rule 2 of the module docstring. ``labels[l]``: the bit-widths of layer l's choices;
    ``base_bits``: b0, the configured width."""
    from llmc.profiles import check_sensitivity, read_sensitivity

    layers = len(program.layers)
    several = any(len(row) > 1 for row in labels)
    needed = tuple(sorted({b for row in labels for b in row} | ({base_bits} if budget is None else set())))
    if table_path is not None:
        table = read_sensitivity(table_path)
        check_sensitivity(table, table_path, layers, needed)
        rows = [row.omega for row in table.layers]
        indicator = f"sensitivity table {table_path.name} ({table.indicator})"
    elif program.sensitivity is not None and (several or budget is not None):
        s = program.sensitivity
        missing = [b for b in needed if b not in s.bits]
        if missing:
            raise ConfigError("model.yaml", "planner.bits",
                              f"the sensitivity pass costed {list(s.bits)} bits, not {missing}; choose among those")
        rows = [dict(zip(s.bits, row)) for row in s.omega]
        indicator = f"sensitivity pass ({s.indicator})"
    elif several or budget is not None:
        step = 2**base_bits - 1
        rows = [{b: (step / (2**b - 1)) ** 2 for b in needed}] * layers
        indicator = f"every layer equally sensitive, omega = ((2^{base_bits} - 1) / (2^b - 1))^2"
    else:
        return Quality(None, None, "none (one bit-width per layer, no sensitivity table)")
    omega = tuple(tuple(float(row[b]) for b in bits) for row, bits in zip(rows, labels))
    if budget is None:
        budget = sum(float(row[base_bits]) for row in rows)
        indicator += f"; budget: every layer at {base_bits} bits"
    return Quality(omega, budget, indicator)


# ---------------------------------------------------------------------------------- explanation


def _unit_names(instance: PlanInstance, solution: Solution) -> list[str]:
    stages = solution.evaluation.stages
    names = [f"stage {k} ({instance.devices[s.device].name})" for k, s in enumerate(stages)]
    names += [f"link {instance.devices[a.device].name} -> {instance.devices[b.device].name}"
              for a, b in zip(stages, stages[1:])]
    return names


def explain(instance: PlanInstance, tables: CostTables, solution: Solution, what_if: tuple[WhatIf, ...]) -> Explanation:
    """Which limits bind, the bottleneck of each phase, the pipeline bubbles (module docstring)."""
    ev, a = solution.evaluation, solution.assignment
    stages, names = ev.stages, _unit_names(instance, solution)
    m_p, m_d = tables.counts[a.prefill_option], tables.counts[a.decode_option]
    units_p = [s.prefill_s for s in stages] + [s.hop_prefill_s for s in stages[:-1]]
    units_d = [s.decode_s for s in stages] + [s.hop_decode_s for s in stages[:-1]]
    slow_p = max(range(len(units_p)), key=lambda k: units_p[k])
    slow_d = max(range(len(units_d)), key=lambda k: units_d[k])
    steps = instance.workload.decode_steps
    count = len(stages)
    busy_p = m_p * sum(s.prefill_s for s in stages)
    busy_d = steps * m_d * sum(s.decode_s for s in stages)
    bubble_p = 1 - busy_p / (count * ev.prefill_s) if ev.prefill_s > 0 else 0.0
    bubble_d = 1 - busy_d / (count * ev.decode_s) if ev.decode_s > 0 else 0.0
    bubble = 1 - (busy_p + busy_d) / (count * ev.latency_s) if ev.latency_s > 0 else 0.0

    binding = []
    smallest = min(w + tables.kv_bytes[k] for k, row in enumerate(tables.weight_bytes) for w in row)
    for s in stages:
        free = s.memory.capacity - s.memory.total
        if free < smallest:
            binding.append(f"memory on {instance.devices[s.device].name}: {size_text(free)} free of "
                           f"{size_text(s.memory.capacity)}, less than one more layer ({size_text(smallest)})")
    if instance.omega is not None:
        slack = instance.quality_budget - ev.quality_used
        steps_down = [instance.omega[l][c - 1] - instance.omega[l][c] for l, c in enumerate(a.choice) if c > 0]
        if steps_down and slack < min(steps_down):
            binding.append(f"quality budget: sum of omega {ev.quality_used:.4g} of {instance.quality_budget:.4g}; "
                           "one bit-width step down on any layer would exceed it")
    decode_bound = "round trip" if sum(units_d) >= m_d * max(units_d) else "slowest unit"
    binding.append(f"time: prefill is paced by {names[slow_p]}, decode by "
                   + ("the round trip of each micro-batch through every stage" if decode_bound == "round trip"
                      else f"{names[slow_d]} serving {m_d} micro-batches per token"))
    return Explanation(
        binding=tuple(binding),
        prefill_bottleneck=names[slow_p],
        decode_bottleneck=names[slow_d],
        decode_bound=decode_bound,
        bubble_prefill=bubble_p,
        bubble_decode=bubble_d,
        bubble=bubble,
        what_if=what_if,
    )


def what_if_plans(instance: PlanInstance, solution: Solution, limit_s: float, seed: int) -> tuple[WhatIf, ...]:
    """Per SKU of the inventory (declared order), the plan with one more such GPU in the first
    node that has one (declared right after its twins)."""
    results = []
    for sku in dict.fromkeys(d.sku for d in instance.devices):
        model_device = next(d for d in instance.devices if d.sku == sku)
        node = model_device.node
        index = sum(1 for d in instance.devices if d.node == node)
        added = replace(model_device, name=f"{node}/gpu{index}")
        last = max(k for k, d in enumerate(instance.devices) if d.node == node and d.sku == sku)
        devices = instance.devices[: last + 1] + (added,) + instance.devices[last + 1:]
        try:
            trial = solve_partition(replace(instance, devices=devices), time_limit_s=limit_s, seed=seed)
        except PartitionNotSolved:
            continue  # nothing found within the what-if's short limit: no figure rather than a wrong one
        results.append(WhatIf(sku=sku, node=node, solver_status=trial.status,
                              tokens_per_s=_tokens_per_s(instance, trial.evaluation.latency_s),
                              speedup=solution.evaluation.latency_s / trial.evaluation.latency_s))
    return tuple(results)


def baselines(instance: PlanInstance, tables: CostTables, solution: Solution) -> tuple[Baseline, ...]:
    described = {
        "even-split": "every device in declared order, layers split evenly, one uniform bit-width",
        "memory-greedy": "devices in declared order, each filled with as many layers as its memory holds, "
                         "one uniform bit-width",
    }
    found = []
    for name, choice, result in heuristic_plans(instance, tables):
        if result is None:
            found.append(Baseline(name, described[name] + " (no uniform width fits memory and quality)",
                                  None, (), None, None, None, None, None))
            continue
        a, ev = result
        found.append(Baseline(
            name=name,
            description=described[name] + (" (the fewest bits that fit memory and the quality budget)"
                                           if instance.quality_budget is not None else
                                           " (the fewest bits that fit memory)" if len(instance.choices[0]) > 1
                                           else ""),
            bits=Counter(row[choice].bits for row in instance.choices).most_common(1)[0][0],
            stages=tuple(f"{instance.devices[j].name}: layers {start}-{end - 1}" for j, start, end in a.ranges()),
            prefill_micro_batch_size=instance.micro_batch_sizes[a.prefill_option],
            decode_micro_batch_size=instance.micro_batch_sizes[a.decode_option],
            batch_latency_s=ev.latency_s,
            tokens_per_s=_tokens_per_s(instance, ev.latency_s),
            plan_speedup=ev.latency_s / solution.evaluation.latency_s,
        ))
    return tuple(found)


def _tokens_per_s(instance: PlanInstance, latency_s: float) -> float:
    w = instance.workload
    return w.batch * w.generated_tokens / latency_s


# ---------------------------------------------------------------------------------- the plan


def _cost_source(instance: PlanInstance, device: DeviceSpec, bits: set[int]) -> str:
    profile = instance.profile
    if profile is None:
        return "roofline"
    covered = [profile.covers(device.sku, phase, b) for phase in ("prefill", "decode") for b in sorted(bits)]
    if all(covered):
        return f"profile {profile.source}"
    return f"profile {profile.source} + roofline" if any(covered) else "roofline"


def plan_from_solution(instance: PlanInstance, tables: CostTables, solution: Solution, cluster, quality: Quality,
                       extra_baselines: tuple[Baseline, ...], explanation: Explanation) -> Plan:
    a, ev = solution.assignment, solution.evaluation
    by_name = {d.name: d for d in cluster.devices}
    m_p, m_d = tables.counts[a.prefill_option], tables.counts[a.decode_option]
    steps, L = instance.workload.decode_steps, len(instance.layers)
    layer_bits = tuple(instance.choices[l][c].bits for l, c in enumerate(a.choice))
    stages = []
    for k, s in enumerate(ev.stages):
        device = instance.devices[s.device]
        bits = layer_bits[s.start:s.end]
        stages.append(Stage(
            index=k, device=device.name, sku=device.sku,
            compute_capability=by_name[device.name].sku.compute_capability,
            layer_start=s.start, layer_end=s.end, holds_embedding=s.start == 0, holds_lm_head=s.end == L,
            memory=StageMemory(weights=s.memory.weights, kv_cache=s.memory.kv_cache, embedding=s.memory.embedding,
                               lm_head=s.memory.lm_head, activations=s.memory.activations,
                               capacity=s.memory.capacity, reserve=cluster.memory_reserve_bytes),
            layer_bits=bits,
            predicted_prefill_s=m_p * s.prefill_s,
            predicted_decode_s=m_d * s.decode_s,
            predicted_transfer_s=m_p * s.hop_prefill_s + steps * m_d * s.hop_decode_s,
            cost_source=_cost_source(instance, device, set(bits)),
        ))
    used = {s.device for s in ev.stages}
    sources = sorted({s.cost_source for s in stages})
    return Plan(
        stages=tuple(stages),
        layer_bits=layer_bits,
        weight_bits=max(Counter(layer_bits).items(), key=lambda kv: (kv[1], kv[0]))[0],
        prefill_micro_batch_size=instance.micro_batch_sizes[a.prefill_option],
        prefill_micro_batches=m_p,
        decode_micro_batch_size=instance.micro_batch_sizes[a.decode_option],
        decode_micro_batches=m_d,
        solver_status=solution.status,
        search=solution.search,
        best_bound_s=solution.best_bound_s,
        gap=solution.gap,
        predicted_prefill_s=ev.prefill_s,
        predicted_decode_s=ev.decode_s,
        predicted_batch_latency_s=ev.latency_s,
        predicted_tokens_per_s=_tokens_per_s(instance, ev.latency_s),
        quality_indicator=quality.indicator,
        quality_used=ev.quality_used,
        quality_budget=quality.budget,
        cost_source="; ".join(sources),
        unused_devices=tuple(d.name for j, d in enumerate(instance.devices) if j not in used),
        baselines=extra_baselines,
        explanation=explanation,
    )


def planner_instance(program: Program, cluster, p: PlanPass) -> tuple[PlanInstance, Quality]:
    """Rules 1 and 2 of the module docstring: the instance for a program on a cluster."""
    model = program.model
    rules = p.quantization
    if p.bits and rules.method == "none":
        rules = replace(rules, method="rtn")  # planner.bits decides the widths of the targeted linears
    names = [lin.name for layer in program.layers for lin in layer.linears]
    schemes = resolve_schemes(names, rules)
    if program.precision is not None:  # the mixed-precision policy ran first: cost its widths
        from llmc.passes.mixed_precision import apply_precision

        schemes = apply_precision(schemes, program.precision)
    devices, links = cluster_devices(cluster)
    choices = tuple(layer_choices(layer, schemes, tuple(sorted(p.bits))) for layer in program.layers)
    base_bits = p.quantization.bits if p.quantization.method != "none" else 16
    quality = quality_constraint(program, [tuple(c.bits for c in row) for row in choices], base_bits,
                                 p.quality_budget, p.sensitivity)
    profile = measured_profile(p.profile, cluster) if p.profile is not None else None
    sizes = tuple(sorted(p.micro_batch_sizes)) or default_micro_batch_sizes(p.batch)
    instance = PlanInstance(
        devices=devices, links=links,
        layers=tuple(layer_shape(layer, model) for layer in program.layers),
        choices=choices, vocab_size=model.vocab_size, hidden_size=model.hidden_size,
        workload=CostWorkload(p.batch, p.prompt_tokens, p.generated_tokens),
        micro_batch_sizes=sizes, tied_embeddings=model.tie_word_embeddings,
        omega=quality.omega, quality_budget=quality.budget, profile=profile,
    )
    return instance, quality


@dataclass(frozen=True)
class PlanPass(Pass):
    """Choose the pipeline: device order, layer ranges, bit-widths, micro-batches (CP-SAT)."""

    name = "plan"
    uses_cluster = True
    quantization: QuantizationRules
    batch: int
    prompt_tokens: int
    generated_tokens: int
    bits: tuple[int, ...] = ()  # planner.bits; empty: as quantization says
    quality_budget: float | None = None
    sensitivity: Path | None = None
    profile: Path | None = None
    micro_batch_sizes: tuple[int, ...] = ()
    time_limit_s: float = 10.0
    what_if: bool = True

    def requires(self, program: Program) -> None:
        if program.model is None or not program.layers:
            raise ValueError("plan needs the layer table; run 'ingest' first")

    def ensures(self, program: Program) -> None:
        if program.plan is None:
            raise ValueError("plan produced no plan")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        instance, quality = planner_instance(program, ctx.cluster, self)
        solution = solve_partition(instance, time_limit_s=self.time_limit_s, seed=ctx.seed, workers=1)
        tables = cost_tables(instance)
        what_if = what_if_plans(instance, solution, min(self.time_limit_s / 4, 2.0), ctx.seed) if self.what_if else ()
        plan = plan_from_solution(instance, tables, solution, ctx.cluster, quality,
                                  baselines(instance, tables, solution), explain(instance, tables, solution, what_if))
        ranges = ", ".join(f"{s.device} {s.layer_start}-{s.layer_end - 1}" for s in plan.stages)
        versus = ", ".join(f"{b.plan_speedup:.2f}x {b.name}" for b in plan.baselines if b.plan_speedup)
        return PassResult(
            replace(program, plan=plan),
            f"{len(plan.stages)} stages ({ranges}), {solution.status} (gap {solution.gap:.1%}) in "
            f"{solution.solve_seconds * 1e3:.0f} ms, predicted {plan.predicted_tokens_per_s:.0f} tokens/s"
            + (f" ({versus})" if versus else ""),
        )


def plan_pass_from_config(model, base: Path, *, compiling: bool) -> PlanPass:
    """The plan pass for a validated ModelConfig; ConfigError (exit 2) for planner options that
    cannot work, before any pass runs."""
    from llmc.profiles import read_profile, read_sensitivity
    from llmc.schemes import merged, rules_from_config

    q, w, planner = model.quantization, model.workload, model.planner
    rules = rules_from_config(q)
    for i, size in enumerate(planner.micro_batch_sizes or ()):
        if size > w.batch:
            raise ConfigError("model.yaml", f"planner.micro_batch_sizes[{i}]",
                              f"{size} is larger than workload.batch ({w.batch})")
    if compiling:  # FP8 quantizes and evaluates, but the export has no plugin for it
        schemes = [("quantization.bits", rules)] + [
            (f"quantization.overrides[{i}]", merged(rules, o)) for i, o in enumerate(rules.overrides)
            if o.method is not None or o.bits is not None]
        for field, scheme in schemes:
            if scheme.method == "fpx" and scheme.bits == 8:
                raise ConfigError("model.yaml", field, "FP8 e4m3 (method fpx, bits 8) has no ONNX export, so "
                                  "llmc compile cannot deploy it; use FP6 or FP4 (bits 6 or 4), or int8 (method rtn)")
        # int3 is exported in tiles of 32 inputs: the groups of every linear that may get 3 bits must hold whole tiles.
        mixed = q.mixed_precision
        per_layer = (planner.bits or []) + (mixed.bits if mixed and mixed.granularity == "layer" else [])
        for i, o in enumerate([None, *rules.overrides]):
            scheme = merged(rules, o) if o else rules
            free = o is None or (o.bits is None and o.method is None)  # a per-layer policy may give it 3 bits
            may_be_int3 = scheme.bits == 3 or (3 in per_layer and free)
            problem = scheme.method in ("rtn", "gptq") and may_be_int3 and int3_group_problem(scheme.group_size)
            if problem:
                field = ("quantization.group_size" if o is None or o.group_size is None
                         else f"quantization.overrides[{i - 1}].group_size")
                raise ConfigError("model.yaml", field, problem)
    configured = q.bits if q.method != "none" else 16
    if compiling and planner.bits is not None and planner.bits != [configured]:
        # `llmc compile` applies the plan's per-layer widths (the mixed-precision pass, granularity
        # 'plan'): only integer quantizers take per-layer widths, and one policy decides them.
        if q.method not in ("rtn", "gptq"):
            raise ConfigError(
                "model.yaml", "planner.bits",
                f"{planner.bits}: per-layer widths are applied by the rtn and gptq quantizers, not method "
                f"'{q.method}'; set quantization.method to rtn or gptq, or give planner.bits one value",
            )
        if q.mixed_precision is not None:
            raise ConfigError(
                "model.yaml", "planner.bits",
                f"{planner.bits} and quantization.mixed_precision both choose per-layer widths; keep one",
            )
        problem = fp6_group_problem(planner.bits, q.group_size, "planner.bits")
        if problem:
            raise ConfigError("model.yaml", "quantization.group_size", problem)
    paths = {}
    for field, reader in (("sensitivity", read_sensitivity), ("profile", read_profile)):
        value = getattr(planner, field)
        if value is None:
            continue
        path = base / value
        if not path.is_file():
            raise ConfigError("model.yaml", f"planner.{field}", f"'{value}' does not exist (relative to {base})")
        reader(path)  # schema errors now, naming the file and field
        paths[field] = path
    return PlanPass(
        quantization=rules,
        batch=w.batch, prompt_tokens=w.prompt_tokens, generated_tokens=w.generated_tokens,
        bits=tuple(sorted(planner.bits or ())),
        quality_budget=planner.quality_budget,
        sensitivity=paths.get("sensitivity"),
        profile=paths.get("profile"),
        micro_batch_sizes=tuple(sorted(planner.micro_batch_sizes or ())),
        time_limit_s=planner.time_limit_s,
    )
