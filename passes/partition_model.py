"""The planner's CP-SAT models over the cost tables of passes/partition.py.

Two formulations share memory, quality and the pipeline objective (passes/costs.py,
``pipeline_seconds``); passes/partition_sat.py decides which to solve and how:

1. **Count model** (layers identical in cost and quality, the common case). Per device and
   bit-width choice, *how many* layers; per device whether it holds the embedding (first) or
   the LM head (last). Devices form an unordered set: the pipeline time is a sum and a max over
   stages and links, so the order matters only through which devices are first and last and
   how many hops cross nodes. Used devices of a node sit together, so a plan has
   ``nodes - 1`` network hops (one more when the first and last device share a node that is not
   the only one) and ``used - 1`` hops inside each node (one fewer for such a split node).
   Identical devices of a node are interchangeable: their layer counts are kept non-increasing.
2. **Per-layer model** (layers that differ, or a per-layer sensitivity). A choice per layer and
   device in a fixed device order, layers contiguous in that order.

Both choose a prefill and a decode micro-batch size from the instance's options. Times are
integer ticks; decode ticks are per token times the number of decode steps, so rounding stays
below 1e-8 of the reference latency however many tokens are generated.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from ortools.sat.python import cp_model

from llmc.passes.partition import Assignment, CostTables, PlanInstance, hop_decode_s, hop_prefill_s

TICKS = 10**8  # ticks in the reference latency (an upper bound of the optimum)
QUALITY_UNITS = 10**6  # units in the quality budget


@dataclass
class Scale:
    tick: float  # seconds per tick
    steps: int  # decode steps

    def prefill(self, seconds: float) -> int:
        return round(seconds / self.tick)

    def decode(self, seconds: float) -> int:
        return round(seconds * self.steps / self.tick)


@dataclass
class Frame:
    """What a formulation hands to the shared memory, quality and pipeline constraints."""

    model: cp_model.CpModel
    used: list  # per device: BoolVar
    first: list  # per device: literal or 0/1 expression, holds layer 0 (and the embedding)
    last: list  # per device: holds the last layer (and the LM head)
    layer_bytes: list  # per device: weights + KV cache of its layers (linear expression, bytes)
    quality: object  # linear expression in quality units, or None
    prefill: list  # [j][p]: one prefill micro-batch through device j's layers (ticks)
    decode: list  # [j][p]: one decode step (decode ticks)
    hop_prefill: list  # [p]: sum of the links' times (ticks)
    hop_decode: list  # [p]
    hop_units: list = field(default_factory=list)  # (literal, [p] prefill ticks, [p] decode ticks)
    decode_of: object = None  # (solver, prefill option, decode option) -> Assignment
    order: tuple[int, ...] | None = None  # per-layer model: device index at each position
    count_vars: list | None = None  # count model: [device][choice] layer counts
    layer_vars: list | None = None  # per-layer model: [layer][position][choice] booleans


# ---------------------------------------------------------------------------------- formulations


def count_frame(instance: PlanInstance, tables: CostTables, scale: Scale, quality_per_layer: bool) -> Frame:
    """Rule 1 of the module docstring. ``quality_per_layer``: the relaxation with a per-layer
    choice that only has to match the devices' counts (contiguity of bits dropped)."""
    model = cp_model.CpModel()
    devices, L = instance.devices, len(instance.layers)
    C, P = len(instance.bits), len(instance.micro_batch_sizes)
    count = [[model.new_int_var(0, L, f"dev{j}_bits{b}") for b in instance.bits] for j in range(len(devices))]
    total = [sum(row) for row in count]
    used = [model.new_bool_var(f"dev{j}_used") for j in range(len(devices))]
    first = [model.new_bool_var(f"dev{j}_first") for j in range(len(devices))]
    last = [model.new_bool_var(f"dev{j}_last") for j in range(len(devices))]
    model.add(sum(total) == L)
    model.add_exactly_one(first)
    model.add_exactly_one(last)
    for j in range(len(devices)):
        model.add(total[j] >= 1).only_enforce_if(used[j])
        model.add(total[j] == 0).only_enforce_if(~used[j])
        model.add_implication(first[j], used[j])
        model.add_implication(last[j], used[j])
        model.add(total[j] == L).only_enforce_if([first[j], last[j]])  # one stage holds everything
    # Identical devices of a node are interchangeable: order their layer counts.
    classes: dict[tuple, list[int]] = {}
    for j, d in enumerate(devices):
        classes.setdefault(d.figures, []).append(j)
    for members_of_class in classes.values():
        for a, b in itertools.pairwise(members_of_class):
            model.add(total[a] >= total[b])

    # Nodes and hops (rule 1).
    nodes = list(dict.fromkeys(d.node for d in devices))
    members = {n: [j for j, d in enumerate(devices) if d.node == n] for n in nodes}
    node_used = {n: model.new_bool_var(f"node_{n}_used") for n in nodes}
    for n in nodes:
        model.add_max_equality(node_used[n], [used[j] for j in members[n]])
    multi = model.new_bool_var("several_nodes")
    model.add(sum(node_used.values()) >= 2).only_enforce_if(multi)
    model.add(sum(node_used.values()) <= 1).only_enforce_if(~multi)
    split = {}
    for n in nodes:
        split[n] = model.new_bool_var(f"node_{n}_split")
        holds_first = sum(first[j] for j in members[n])
        holds_last = sum(last[j] for j in members[n])
        model.add(split[n] <= holds_first)
        model.add(split[n] <= holds_last)
        model.add(split[n] <= multi)
        model.add(split[n] >= holds_first + holds_last + multi - 2)
    network_hops = sum(node_used.values()) - 1 + sum(split.values())
    intra_hops = {n: sum(used[j] for j in members[n]) - node_used[n] - split[n] for n in nodes}
    hop_units = []
    hop_p = [0] * P
    hop_d = [0] * P
    if len(nodes) > 1:
        a, b = members[nodes[0]][0], members[nodes[1]][0]
        net_p = [scale.prefill(hop_prefill_s(instance, devices[a], devices[b], p)) for p in range(P)]
        net_d = [scale.decode(hop_decode_s(instance, devices[a], devices[b], p)) for p in range(P)]
        hop_units.append((multi, net_p, net_d))
        hop_p = [hop_p[p] + net_p[p] * network_hops for p in range(P)]
        hop_d = [hop_d[p] + net_d[p] * network_hops for p in range(P)]
    for n in nodes:
        if len(members[n]) < 2:
            continue
        a, b = members[n][:2]
        in_p = [scale.prefill(hop_prefill_s(instance, devices[a], devices[b], p)) for p in range(P)]
        in_d = [scale.decode(hop_decode_s(instance, devices[a], devices[b], p)) for p in range(P)]
        has = model.new_bool_var(f"node_{n}_has_hops")
        model.add(intra_hops[n] >= 1).only_enforce_if(has)
        model.add(intra_hops[n] == 0).only_enforce_if(~has)
        hop_units.append((has, in_p, in_d))
        hop_p = [hop_p[p] + in_p[p] * intra_hops[n] for p in range(P)]
        hop_d = [hop_d[p] + in_d[p] * intra_hops[n] for p in range(P)]

    kv = tables.kv_bytes[0]
    layer_bytes = [sum(count[j][c] * math.ceil(tables.weight_bytes[0][c] + kv) for c in range(C))
                   for j in range(len(devices))]
    prefill = [[sum(count[j][c] * scale.prefill(tables.prefill[j][0][c][p]) for c in range(C))
                + first[j] * scale.prefill(tables.embed_prefill[j][p]) + last[j] * scale.prefill(tables.head_prefill[j][p])
                for p in range(P)] for j in range(len(devices))]
    decode = [[sum(count[j][c] * scale.decode(tables.decode[j][0][c][p]) for c in range(C))
               + first[j] * scale.decode(tables.embed_decode[j][p]) + last[j] * scale.decode(tables.head_decode[j][p])
               for p in range(P)] for j in range(len(devices))]

    quality = None
    if instance.omega is not None:
        units = quality_units(instance)
        if quality_per_layer:
            # Layers of equal omega are interchangeable here: count them per class and bits.
            classes: dict[tuple, int] = {}
            for l in range(L):
                classes[tuple(units[l])] = classes.get(tuple(units[l]), 0) + 1
            per_class = [[model.new_int_var(0, size, f"class{g}_bits{b}") for b in instance.bits]
                         for g, size in enumerate(classes.values())]
            for row, size in zip(per_class, classes.values()):
                model.add(sum(row) == size)
            for c in range(C):
                model.add(sum(row[c] for row in per_class) == sum(count[j][c] for j in range(len(devices))))
            quality = sum(w[c] * row[c] for w, row in zip(classes, per_class) for c in range(C))
        else:
            quality = sum(units[0][c] * count[j][c] for j in range(len(devices)) for c in range(C))

    def decode_of(solver: cp_model.CpSolver, p: int, q: int) -> Assignment:
        counts = [[solver.value(v) for v in row] for row in count]
        order = count_model_order(instance, [sum(r) > 0 for r in counts],
                                  next(j for j in range(len(devices)) if solver.value(first[j])),
                                  next(j for j in range(len(devices)) if solver.value(last[j])))
        ends, choice, position = [], [], 0
        for j in order:
            for c in range(C):  # ascending bits inside a stage; layers are interchangeable
                choice += [c] * counts[j][c]
            position += sum(counts[j])
            ends.append(position)
        return Assignment(tuple(order), tuple(ends), tuple(choice), p, q)

    return Frame(model, used, first, last, layer_bytes, quality, prefill, decode, hop_p, hop_d, hop_units,
                  decode_of=decode_of, count_vars=count)


def count_model_order(instance: PlanInstance, used: list[bool], first: int, last: int) -> list[int]:
    """A pipeline order realising the count model's hop counts: the first device's node first,
    the last device's node last, other nodes between in declared order; a node holding both
    the first and the last device (with other nodes used) is split around them."""
    devices = instance.devices
    if first == last:
        return [first]
    chosen = [j for j in range(len(devices)) if used[j] and j not in (first, last)]
    nodes = list(dict.fromkeys(devices[j].node for j in range(len(devices)) if used[j]))
    head_node, tail_node = devices[first].node, devices[last].node
    middle = [n for n in nodes if n not in (head_node, tail_node)]
    order = [first] + [j for j in chosen if devices[j].node == head_node]
    for n in middle:
        order += [j for j in chosen if devices[j].node == n]
    if tail_node != head_node:
        order += [j for j in chosen if devices[j].node == tail_node]
    return order + [last]


def layer_frame(instance: PlanInstance, tables: CostTables, scale: Scale, order: tuple[int, ...]) -> Frame:
    """Rule 2 of the module docstring: a choice per layer and device in a fixed device order."""
    model = cp_model.CpModel()
    devices, L = instance.devices, len(instance.layers)
    C, P, D = len(instance.bits), len(instance.micro_batch_sizes), len(order)
    x = [[[model.new_bool_var(f"layer{l}_pos{k}_bits{b}") for b in instance.bits] for k in range(D)] for l in range(L)]
    on = [[sum(x[l][k]) for k in range(D)] for l in range(L)]
    for l in range(L):
        model.add_exactly_one(v for k in range(D) for v in x[l][k])
    for l in range(L - 1):
        # Layers follow the order: the owning position never decreases.
        model.add(sum(k * on[l][k] for k in range(D)) <= sum(k * on[l + 1][k] for k in range(D)))
    used_at = [model.new_bool_var(f"pos{k}_used") for k in range(D)]
    for k in range(D):
        model.add_max_equality(used_at[k], [v for l in range(L) for v in x[l][k]])
    for a, b in itertools.pairwise(range(D)):
        if devices[order[a]].figures == devices[order[b]].figures:
            model.add_implication(used_at[b], used_at[a])  # use the earlier of two identical devices

    hop_units, hop_p, hop_d = [], [0] * P, [0] * P
    for a in range(D):
        for b in range(a + 1, D):
            sends = model.new_bool_var(f"pos{a}_sends_to_pos{b}")
            between = [used_at[k] for k in range(a + 1, b)]
            model.add_bool_and([used_at[a], used_at[b], *[~k for k in between]]).only_enforce_if(sends)
            model.add_bool_or([~used_at[a], ~used_at[b], *between, sends])
            da, db = devices[order[a]], devices[order[b]]
            tp = [scale.prefill(hop_prefill_s(instance, da, db, p)) for p in range(P)]
            td = [scale.decode(hop_decode_s(instance, da, db, p)) for p in range(P)]
            hop_units.append((sends, tp, td))
            hop_p = [hop_p[p] + tp[p] * sends for p in range(P)]
            hop_d = [hop_d[p] + td[p] * sends for p in range(P)]

    kind = tables.kind
    layer_bytes, prefill, decode = [], [], []
    for k in range(D):
        j = order[k]
        layer_bytes.append(sum(x[l][k][c] * math.ceil(tables.weight_bytes[kind[l]][c] + tables.kv_bytes[kind[l]])
                               for l in range(L) for c in range(C)))
        prefill.append([sum(x[l][k][c] * scale.prefill(tables.prefill[j][kind[l]][c][p]) for l in range(L) for c in range(C))
                        + on[0][k] * scale.prefill(tables.embed_prefill[j][p])
                        + on[L - 1][k] * scale.prefill(tables.head_prefill[j][p]) for p in range(P)])
        decode.append([sum(x[l][k][c] * scale.decode(tables.decode[j][kind[l]][c][p]) for l in range(L) for c in range(C))
                       + on[0][k] * scale.decode(tables.embed_decode[j][p])
                       + on[L - 1][k] * scale.decode(tables.head_decode[j][p]) for p in range(P)])
    quality = None
    if instance.omega is not None:
        units = quality_units(instance)
        quality = sum(units[l][c] * x[l][k][c] for l in range(L) for k in range(D) for c in range(C))

    def decode_of(solver: cp_model.CpSolver, p: int, q: int) -> Assignment:
        owner = [next(k for k in range(D) if any(solver.value(v) for v in x[l][k])) for l in range(L)]
        choice = [next(c for c in range(C) if solver.value(x[l][owner[l]][c])) for l in range(L)]
        positions = sorted(set(owner))
        ends = [max(l for l in range(L) if owner[l] == k) + 1 for k in positions]
        return Assignment(tuple(order[k] for k in positions), tuple(ends), tuple(choice), p, q)

    return Frame(model, used_at, [on[0][k] for k in range(D)], [on[L - 1][k] for k in range(D)], layer_bytes,
                  quality, prefill, decode, hop_p, hop_d, hop_units, decode_of=decode_of, order=order, layer_vars=x)


def quality_units(instance: PlanInstance) -> list[list[int]]:
    """omega in integer units of 1e-6 of the budget (values past the budget are capped)."""
    budget = instance.quality_budget
    scale = QUALITY_UNITS / budget if budget > 0 else QUALITY_UNITS / max(1e-30, max(map(max, instance.omega)))
    cap = QUALITY_UNITS * 10
    return [[min(cap, round(w * scale)) for w in row] for row in instance.omega]


def quality_limit(instance: PlanInstance) -> int:
    # One unit of slack per layer absorbs the rounding of each layer's omega.
    return (QUALITY_UNITS if instance.quality_budget > 0 else 0) + len(instance.layers)


# ---------------------------------------------------------------------------------- shared constraints


@dataclass
class Built:
    frame: Frame
    pick_p: list
    pick_q: list
    objective: object
    shortfall: list | None = None
    parts: tuple = ()  # mode "time": (prefill ticks, decode ticks) variables


def complete(instance: PlanInstance, tables: CostTables, frame: Frame, mode: str, with_kv: bool = True,
             ceiling: int | None = None, with_quality: bool = True) -> Built:
    """Memory, quality and the objective. ``mode``: "time" (the plan), "memory" (elastic
    capacities, least total shortfall; the quality budget only ``with_quality``), "quality"
    (least quality use that fits)."""
    model, devices, P = frame.model, frame.used, len(instance.micro_batch_sizes)
    pick_p = [model.new_bool_var(f"prefill_size{s}") for s in instance.micro_batch_sizes]
    pick_q = [model.new_bool_var(f"decode_size{s}") for s in instance.micro_batch_sizes]
    model.add_exactly_one(pick_p)
    model.add_exactly_one(pick_q)
    table = instance.table_bytes
    shortfall = [] if mode == "memory" else None
    for j, used in enumerate(devices):
        workspace = model.new_int_var(0, max(tables.workspace), f"dev{j}_workspace")
        for p in range(P):
            model.add(workspace >= tables.workspace[p]).only_enforce_if([pick_p[p], used])
        if instance.tied_embeddings:
            head = model.new_bool_var(f"dev{j}_untied_head")
            model.add(head >= frame.last[j] - frame.first[j])
        else:
            head = frame.last[j]
        resident = frame.layer_bytes[j] if with_kv else _without_kv(instance, tables, frame, j)
        demand = resident + table * frame.first[j] + table * head + workspace
        capacity = _capacity(instance, frame, j)
        if shortfall is not None:
            short = model.new_int_var(0, 1 << 50, f"dev{j}_short")
            shortfall.append(short)
            model.add(demand <= capacity + short)
        else:
            model.add(demand <= capacity)
    if mode != "quality" and with_quality and frame.quality is not None:
        model.add(frame.quality <= quality_limit(instance))
    parts = ()
    if mode == "memory":
        objective = sum(shortfall)
    elif mode == "quality":
        objective = frame.quality
    else:
        parts = _pipeline_objective(instance, tables, frame, pick_p, pick_q, ceiling)
        objective = sum(parts)
    model.minimize(objective)
    return Built(frame, pick_p, pick_q, objective, shortfall, parts)


def _capacity(instance: PlanInstance, frame: Frame, j: int) -> int:
    return instance.devices[frame.order[j] if frame.order else j].memory_bytes


def _without_kv(instance, tables, frame, j):
    # Diagnosis only: the weights alone, as if the workload needed no cache.
    x = frame.layer_vars
    if x is None:
        return sum(v * math.ceil(tables.weight_bytes[0][c]) for c, v in enumerate(frame.count_vars[j]))
    kind = tables.kind
    return sum(x[l][j][c] * math.ceil(tables.weight_bytes[kind[l]][c]) for l in range(len(x)) for c in range(len(x[l][j])))


def _pipeline_objective(instance, tables, frame, pick_p, pick_q, ceiling):
    """pipeline_seconds (passes/costs.py) in ticks: prefill + decode steps x per-token round."""
    model, P = frame.model, len(instance.micro_batch_sizes)
    bound = ceiling if ceiling is not None else TICKS * 4
    prefill_time = model.new_int_var(0, bound, "prefill_ticks")
    round_time = model.new_int_var(0, bound, "decode_ticks")
    for p in range(P):
        slowest = model.new_int_var(0, bound, f"prefill_slowest_size{p}")
        for stage in frame.prefill:
            model.add(slowest >= stage[p]).only_enforce_if(pick_p[p])
        for literal, ticks, _ in frame.hop_units:
            model.add(slowest >= ticks[p] * literal).only_enforce_if(pick_p[p])
        total = sum(stage[p] for stage in frame.prefill) + frame.hop_prefill[p]
        model.add(prefill_time >= total + (tables.counts[p] - 1) * slowest).only_enforce_if(pick_p[p])
    for q in range(P):
        slowest = model.new_int_var(0, bound, f"decode_slowest_size{q}")
        for stage in frame.decode:
            model.add(slowest >= stage[q]).only_enforce_if(pick_q[q])
        for literal, _, ticks in frame.hop_units:
            model.add(slowest >= ticks[q] * literal).only_enforce_if(pick_q[q])
        total = sum(stage[q] for stage in frame.decode) + frame.hop_decode[q]
        model.add(round_time >= total).only_enforce_if(pick_q[q])
        model.add(round_time >= tables.counts[q] * slowest).only_enforce_if(pick_q[q])
    # Redundant, but free of the option literals, so the LP relaxation has a bound before any
    # option is chosen: with U <= D stages, max >= sum / D, hence per option
    # prefill >= sum x (1 + (m - 1) / D) and decode round >= sum x max(1, m / D). The least
    # coefficient over the options bounds every option at once.
    D = len(frame.prefill)
    model.add(prefill_time >= _least_combination(
        [[stage[p] for stage in frame.prefill] for p in range(P)],
        [1 + (tables.counts[p] - 1) / D for p in range(P)]))
    model.add(round_time >= _least_combination(
        [[stage[q] for stage in frame.decode] for q in range(P)],
        [max(1.0, tables.counts[q] / D) for q in range(P)]))
    if ceiling is not None:
        model.add(prefill_time + round_time <= ceiling)
    return prefill_time, round_time


def _least_combination(per_option: list[list], factors: list[float]):
    """For each variable, the least over the options of ``factor x`` its summed coefficient in
    that option's expressions (0 where absent); a linear form below every option's."""
    options, variables = [], {}
    for expressions, factor in zip(per_option, factors):
        merged: dict[int, float] = {}
        for expression in expressions:
            if isinstance(expression, int):
                continue
            flat = cp_model.FlatIntExpr(expression)
            for v, c in zip(flat.vars, flat.coeffs):
                merged[v.index] = merged.get(v.index, 0) + c * factor
                variables[v.index] = v
        options.append(merged)
    least = {i: min(o.get(i, 0) for o in options) for i in variables}
    return sum(math.floor(c) * variables[i] for i, c in sorted(least.items()) if c >= 1)


# ---------------------------------------------------------------------------------- solving


def make_solver(limit_s: float, seed: int, workers: int) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    # Deterministic time, so that a plan stopped by the limit is still reproducible; the wall
    # limit is only a safety net.
    solver.parameters.max_deterministic_time = max(limit_s, 0.005)
    solver.parameters.max_time_in_seconds = 10 * limit_s + 10
    # The pipeline objective is a sum and a max chosen by option literals: the full LP
    # relaxation proves these optima ten times faster than the default one; its cuts cost more
    # than they prune here (measured on the benchmark cases, docs/planner.md).
    solver.parameters.linearization_level = 2
    solver.parameters.cut_level = 0
    return solver


def add_hint(built: Built, instance: PlanInstance, assignment: Assignment, model: cp_model.CpModel) -> None:
    """Hint ``assignment`` to ``model`` (``built``'s model or a clone of it)."""
    frame = built.frame
    model.clear_hints()
    count = frame.count_vars
    if count is not None:
        for j in range(len(instance.devices)):
            placed = [0] * len(instance.bits)
            for k, (d, start, end) in enumerate(assignment.ranges()):
                if d == j:
                    for l in range(start, end):
                        placed[assignment.choice[l]] += 1
            for c, v in enumerate(count[j]):
                model.add_hint(v, placed[c])
    else:
        x, order = frame.layer_vars, frame.order
        owner = {}
        for d, start, end in assignment.ranges():
            for l in range(start, end):
                owner[l] = order.index(d) if d in order else -1
        for l in range(len(x)):
            for k in range(len(x[l])):
                for c in range(len(x[l][k])):
                    model.add_hint(x[l][k][c], owner[l] == k and assignment.choice[l] == c)
    for p, v in enumerate(built.pick_p):
        model.add_hint(v, p == assignment.prefill_option)
    for q, v in enumerate(built.pick_q):
        model.add_hint(v, q == assignment.decode_option)


def picked(solver, picks) -> int:
    return next(k for k, v in enumerate(picks) if solver.value(v))


def build_frame(instance, tables, scale, order, relaxed=False) -> Frame:
    if order is None:
        return count_frame(instance, tables, scale, quality_per_layer=relaxed)
    return layer_frame(instance, tables, scale, order)
