"""The planner's search: CP-SAT models over the cost tables of passes/partition.py.

Two formulations share one pipeline objective (passes/costs.py, ``pipeline_seconds``):

1. **Count model** (layers identical in cost and quality, the common case). Per device and
   bit-width choice, *how many* layers; per device whether it holds the embedding (first) or
   the LM head (last). Devices form an unordered set: the pipeline time is a sum and a max over
   stages and links, so the order matters only through which devices are first and last and
   how many hops cross nodes. Used devices of a node sit together, so a plan has
   ``nodes - 1`` network hops (one more when the first and last device share a node that is not
   the only one) and ``used - 1`` hops inside each node (one fewer for such a split node).
   Identical devices of a node are interchangeable: their layer counts are kept non-increasing.
2. **Per-layer model** (layers that differ, or a per-layer sensitivity). A choice per layer and
   device in a fixed device order, layers contiguous in that order. Device orders are enumerated
   over *classes* of identical devices (sequences, not permutations) when there are at most
   ``MAX_ORDERS``; otherwise the order comes from the count model relaxed to ignore which layer
   gets which bits (its optimum is also the reported lower bound), or, for layers of different
   shapes, is the declared one.

Both choose a prefill and a decode micro-batch size from the instance's options. Times are
integer ticks; decode ticks are per token times the number of decode steps, so rounding stays
below 1e-9 of the reference latency however many tokens are generated. The solver runs on a
deterministic-time limit with a fixed seed and worker count, so a plan is reproducible even when
the limit stops it; then the best incumbent is kept and the gap to the proven bound reported.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

from ortools.sat.python import cp_model

from llmc.passes.partition import (
    Assignment,
    CostTables,
    Evaluation,
    ModelDoesNotFit,
    PartitionNotSolved,
    PlanInstance,
    QualityBudgetTooSmall,
    WorkloadDoesNotFit,
    best_micro_batches,
    cost_tables,
    evaluate,
    hop_decode_s,
    hop_prefill_s,
    size_text,
)

_TICKS = 10**9  # ticks in the reference latency (an upper bound of the optimum)
_QUALITY_UNITS = 10**6  # units in the quality budget
MAX_ORDERS = 24


@dataclass(frozen=True)
class Solution:
    assignment: Assignment
    evaluation: Evaluation
    status: str  # "OPTIMAL" (proven) or "FEASIBLE" (limit reached; see gap)
    best_bound_s: float  # proven lower bound of the batch latency
    search: str  # which formulation, over which device orders
    solve_seconds: float  # wall time, for logs and benchmarks only (never in artifacts)

    @property
    def gap(self) -> float:
        latency = self.evaluation.latency_s
        return max(0.0, (latency - self.best_bound_s) / latency) if latency > 0 else 0.0


@dataclass
class _Scale:
    tick: float  # seconds per tick
    steps: int  # decode steps

    def prefill(self, seconds: float) -> int:
        return round(seconds / self.tick)

    def decode(self, seconds: float) -> int:
        return round(seconds * self.steps / self.tick)


@dataclass
class _Frame:
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


def _count_frame(instance: PlanInstance, tables: CostTables, scale: _Scale, quality_per_layer: bool) -> _Frame:
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
    for a, b in itertools.pairwise(range(len(devices))):
        if devices[a].figures == devices[b].figures:
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
    layer_choice = None
    if instance.omega is not None:
        units = _quality_units(instance)
        if quality_per_layer:
            layer_choice = [[model.new_bool_var(f"layer{l}_bits{b}") for b in instance.bits] for l in range(L)]
            for l in range(L):
                model.add_exactly_one(layer_choice[l])
            for c in range(C):
                model.add(sum(layer_choice[l][c] for l in range(L)) == sum(count[j][c] for j in range(len(devices))))
            quality = sum(units[l][c] * layer_choice[l][c] for l in range(L) for c in range(C))
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

    return _Frame(model, used, first, last, layer_bytes, quality, prefill, decode, hop_p, hop_d, hop_units,
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


def _layer_frame(instance: PlanInstance, tables: CostTables, scale: _Scale, order: tuple[int, ...]) -> _Frame:
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
        units = _quality_units(instance)
        quality = sum(units[l][c] * x[l][k][c] for l in range(L) for k in range(D) for c in range(C))

    def decode_of(solver: cp_model.CpSolver, p: int, q: int) -> Assignment:
        owner = [next(k for k in range(D) if any(solver.value(v) for v in x[l][k])) for l in range(L)]
        choice = [next(c for c in range(C) if solver.value(x[l][owner[l]][c])) for l in range(L)]
        positions = sorted(set(owner))
        ends = [max(l for l in range(L) if owner[l] == k) + 1 for k in positions]
        return Assignment(tuple(order[k] for k in positions), tuple(ends), tuple(choice), p, q)

    return _Frame(model, used_at, [on[0][k] for k in range(D)], [on[L - 1][k] for k in range(D)], layer_bytes,
                  quality, prefill, decode, hop_p, hop_d, hop_units, decode_of=decode_of, order=order, layer_vars=x)


def _quality_units(instance: PlanInstance) -> list[list[int]]:
    """omega in integer units of 1e-6 of the budget (values past the budget are capped)."""
    budget = instance.quality_budget
    scale = _QUALITY_UNITS / budget if budget > 0 else _QUALITY_UNITS / max(1e-30, max(map(max, instance.omega)))
    cap = _QUALITY_UNITS * 10
    return [[min(cap, round(w * scale)) for w in row] for row in instance.omega]


def _quality_limit(instance: PlanInstance) -> int:
    # One unit of slack per layer absorbs the rounding of each layer's omega.
    return (_QUALITY_UNITS if instance.quality_budget > 0 else 0) + len(instance.layers)


# ---------------------------------------------------------------------------------- shared constraints


@dataclass
class _Built:
    frame: _Frame
    pick_p: list
    pick_q: list
    objective: object
    shortfall: list | None = None
    parts: tuple = ()  # mode "time": (prefill ticks, decode ticks) variables


def _complete(instance: PlanInstance, tables: CostTables, frame: _Frame, mode: str, with_kv: bool = True,
              ceiling: int | None = None) -> _Built:
    """Memory, quality and the objective. ``mode``: "time" (the plan), "memory" (elastic
    capacities, least total shortfall), "quality" (least quality use that fits)."""
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
    if mode == "time" and frame.quality is not None:
        model.add(frame.quality <= _quality_limit(instance))
    parts = ()
    if mode == "memory":
        objective = sum(shortfall)
    elif mode == "quality":
        objective = frame.quality
    else:
        parts = _pipeline_objective(instance, tables, frame, pick_p, pick_q, ceiling)
        objective = sum(parts)
    model.minimize(objective)
    return _Built(frame, pick_p, pick_q, objective, shortfall, parts)


def _capacity(instance: PlanInstance, frame: _Frame, j: int) -> int:
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
    bound = ceiling if ceiling is not None else _TICKS * 4
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


def _solver(limit_s: float, seed: int, workers: int) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    # Deterministic time, so that a plan stopped by the limit is still reproducible; the wall
    # limit is only a safety net.
    solver.parameters.max_deterministic_time = max(limit_s, 0.005)
    solver.parameters.max_time_in_seconds = 10 * limit_s + 10
    # The pipeline objective is a sum and a max chosen by option literals; the stronger LP
    # relaxation proves these optima several times faster (docs/benchmarks/planner.md).
    solver.parameters.linearization_level = 2
    return solver


@dataclass
class _Outcome:
    found: Assignment | None
    value: int | None  # ticks of the best plan found
    bound: float  # proven lower bound (ticks) of this formulation and order
    infeasible: bool  # no plan at all (not merely none below the cutoff)
    spent: float  # deterministic seconds


def _search(instance, built: _Built, limit: float, seed: int, workers: int, cutoff: int | None,
            hint: Assignment | None) -> _Outcome:
    """Solve one formulation; with ``cutoff``, only plans strictly faster than it count."""
    model = built.frame.model
    if cutoff is not None:
        model.add(sum(built.parts) <= cutoff - 1)
    if hint is not None:
        _hint(built, instance, hint, model)
    solver = _solver(limit, seed, workers)
    status = solver.solve(model)
    spent = solver.response_proto.deterministic_time
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        found = built.frame.decode_of(solver, _picked(solver, built.pick_p), _picked(solver, built.pick_q))
        return _Outcome(found, round(solver.objective_value), solver.best_objective_bound, False, spent)
    if status == cp_model.INFEASIBLE:
        # Below a cutoff: nothing beats it (bound: the cutoff); without one: no plan at all.
        return _Outcome(None, None, math.inf if cutoff is None else cutoff, cutoff is None, spent)
    return _Outcome(None, None, solver.best_objective_bound, False, spent)


def _hint(built: _Built, instance: PlanInstance, assignment: Assignment, model: cp_model.CpModel) -> None:
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


def _picked(solver, picks) -> int:
    return next(k for k, v in enumerate(picks) if solver.value(v))


def _frame(instance, tables, scale, order, relaxed=False) -> _Frame:
    if order is None:
        return _count_frame(instance, tables, scale, quality_per_layer=relaxed)
    return _layer_frame(instance, tables, scale, order)


def heuristic_plans(instance: PlanInstance, tables: CostTables) -> list[tuple[str, int | None, tuple[Assignment, Evaluation] | None]]:
    """The baselines (passes/plan.py reports them), each at the fewest uniform bits that fit
    memory and the quality budget: (name, choice index, best assignment or None).

    - "even-split": every device in declared order, layers split as evenly as possible.
    - "memory-greedy": devices in declared order, each filled with as many layers as its memory
      holds before the next one is used.
    """
    L, D = len(instance.layers), len(instance.devices)
    order = tuple(range(D))
    found = []
    for name in ("even-split", "memory-greedy"):
        best = (name, None, None)
        for c in range(len(instance.bits)):
            choice = (c,) * L
            candidates = []
            if name == "even-split":
                used = min(D, L)
                sizes = [L // used + (1 if k < L % used else 0) for k in range(used)]
                candidates.append((order[:used], tuple(itertools.accumulate(sizes))))
            else:
                for p in range(len(instance.micro_batch_sizes)):
                    split = _greedy_ends(instance, tables, c, p)
                    if split is not None:
                        candidates.append(split)
            results = [r for o, e in dict.fromkeys(candidates) if (r := best_micro_batches(instance, tables, o, e, choice))]
            if results:
                best = (name, c, min(results, key=lambda r: r[1].latency_s))
                break  # the fewest bits that fit
        found.append(best)
    return found


def _greedy_ends(instance, tables, c, p):
    """Fill devices in declared order, each with as many layers as fit (choice c, prefill option p)."""
    L, kind, table = len(instance.layers), tables.kind, instance.table_bytes
    order, ends, start = [], [], 0
    for j, device in enumerate(instance.devices):
        if start == L:
            break
        resident = tables.workspace[p] + (table if start == 0 else 0)
        end = start
        while end < L:
            resident += tables.weight_bytes[kind[end]][c] + tables.kv_bytes[kind[end]]
            # The LM head counts only where it must be: with the last layer.
            head = table if end + 1 == L and not (start == 0 and instance.tied_embeddings) else 0
            if resident + head > device.memory_bytes:
                break
            end += 1
        if end > start:
            order.append(j)
            ends.append(end)
            start = end
    return (tuple(order), tuple(ends)) if start == L else None


def _crude_ceiling(instance: PlanInstance, tables: CostTables) -> float:
    """An upper bound of any pipeline's latency, for scaling when no heuristic plan fits."""
    L, D = len(instance.layers), len(instance.devices)
    worst = 0.0
    devices = instance.devices
    for p in range(len(instance.micro_batch_sizes)):
        stage_p = max(max(max(max(row[c][p] for c in range(len(row))) for row in dev) for dev in tables.prefill)) * L
        stage_p += max(r[p] for r in tables.embed_prefill) + max(r[p] for r in tables.head_prefill)
        stage_d = max(max(max(max(row[c][p] for c in range(len(row))) for row in dev) for dev in tables.decode)) * L
        stage_d += max(r[p] for r in tables.embed_decode) + max(r[p] for r in tables.head_decode)
        hop_p = max((hop_prefill_s(instance, a, b, p) for a in devices for b in devices if a is not b), default=0.0)
        hop_d = max((hop_decode_s(instance, a, b, p) for a in devices for b in devices if a is not b), default=0.0)
        units = 2 * D
        worst = max(worst, (units + tables.counts[p]) * max(stage_p, hop_p)
                    + instance.workload.decode_steps * (units + tables.counts[p]) * max(stage_d, hop_d))
    return worst


def _orders(instance: PlanInstance) -> list[tuple[int, ...]] | None:
    """Distinct device orders up to interchangeable devices, or None when there are too many."""
    classes: dict[tuple, list[int]] = {}
    for j, d in enumerate(instance.devices):
        classes.setdefault(d.figures, []).append(j)
    pools = list(classes.values())
    distinct = math.factorial(len(instance.devices)) // math.prod(math.factorial(len(v)) for v in pools)
    if distinct > MAX_ORDERS:
        return None
    found: list[tuple[int, ...]] = []

    def extend(prefix: tuple[int, ...], taken: list[int]) -> None:
        if len(prefix) == len(instance.devices):
            found.append(prefix)
            return
        for k, pool in enumerate(pools):
            if taken[k] < len(pool):
                taken[k] += 1
                extend(prefix + (pool[taken[k] - 1],), taken)
                taken[k] -= 1

    extend((), [0] * len(pools))
    return found


def solve_partition(instance: PlanInstance, time_limit_s: float = 10.0, seed: int = 0, workers: int = 1) -> Solution:
    """The fastest pipeline within memory and the quality budget (module docstring).

    Raises ModelDoesNotFit / QualityBudgetTooSmall (exit 3) or WorkloadDoesNotFit (exit 4)
    with the numbers when no plan exists, PartitionNotSolved when the limit passes with none.
    """
    started = time.perf_counter()
    tables = cost_tables(instance)
    heuristics = [h[2] for h in heuristic_plans(instance, tables) if h[2] is not None]
    incumbent = min(heuristics, key=lambda r: r[1].latency_s)[0] if heuristics else None
    reference = evaluate(instance, tables, incumbent).latency_s if incumbent else _crude_ceiling(instance, tables)
    scale = _Scale(tick=max(reference, 1e-12) / _TICKS, steps=instance.workload.decode_steps)
    ceiling = _TICKS + _TICKS // 1000 + 10_000  # the reference, plus room for tick rounding

    def run(order, limit, cutoff=None, relaxed=False, hint=None) -> _Outcome:
        built = _complete(instance, tables, _frame(instance, tables, scale, order, relaxed), "time", ceiling=ceiling)
        return _search(instance, built, limit, seed, workers, cutoff, hint)

    if instance.identical_layers:
        outcome = run(None, time_limit_s, hint=incumbent)
        if outcome.found is None:
            _no_solution(instance, tables, scale, outcome.infeasible, time_limit_s, seed, workers)
        return _solution(instance, tables, outcome.found, outcome.bound >= outcome.value, outcome.bound * scale.tick,
                         "count model over the devices as an unordered set (identical devices interchangeable)",
                         started)

    orders = _orders(instance)
    relaxation_bound = None
    remaining = time_limit_s
    if orders is not None:
        search = f"per-layer model over all {len(orders)} distinct device orders"
    elif len(set(zip(instance.layers, instance.choices))) == 1:
        # Layers equal in cost but not in quality: the relaxation gives a bound and an order.
        relaxed = run(None, time_limit_s / 3, relaxed=True)
        remaining -= relaxed.spent
        if relaxed.found is None:
            _no_solution(instance, tables, scale, relaxed.infeasible, time_limit_s, seed, workers)
        relaxation_bound = relaxed.bound
        order = relaxed.found.order
        orders = [order + tuple(j for j in range(len(instance.devices)) if j not in order)]
        search = ("per-layer model in the device order of the count relaxation (bits placed without "
                  "contiguity; its bound is the reported bound)")
    else:
        orders = [tuple(range(len(instance.devices)))]
        search = "per-layer model in the declared device order (the bound holds for that order only)"

    best, best_value, bounds, infeasible = None, None, [], True
    for k, order in enumerate(orders):
        share = max(remaining / (len(orders) - k), 0.01)
        hint = incumbent if best is None and incumbent and _follows(incumbent.order, order) else None
        outcome = run(order, share, cutoff=best_value, hint=hint)
        remaining -= outcome.spent
        infeasible = infeasible and outcome.infeasible
        bounds.append(outcome.bound)
        if outcome.found is not None:
            best, best_value = outcome.found, outcome.value
    if best is None:
        _no_solution(instance, tables, scale, infeasible, time_limit_s, seed, workers)
    lower = min(bounds) if relaxation_bound is None else relaxation_bound
    return _solution(instance, tables, best, lower >= best_value, lower * scale.tick, search, started)


def _follows(used: tuple[int, ...], order: tuple[int, ...]) -> bool:
    """Whether the devices ``used`` appear in ``order`` in the same sequence."""
    positions = [order.index(j) for j in used]
    return positions == sorted(positions)


def _solution(instance, tables, assignment, proven, bound_s, search, started) -> Solution:
    evaluation = evaluate(instance, tables, assignment)
    # Proven optimal up to the tick rounding (1e-9 of the reference latency).
    bound = evaluation.latency_s if proven else min(bound_s, evaluation.latency_s)
    return Solution(assignment, evaluation, "OPTIMAL" if proven else "FEASIBLE", bound, search,
                    time.perf_counter() - started)


# ---------------------------------------------------------------------------------- diagnosis


def _least(instance, tables, scale, mode, with_kv, limit, seed, workers):
    """The least total memory shortfall (mode "memory") or quality use (mode "quality") over the
    orders the search covers: (value, per-position shortfalls, devices in position order)."""
    same_cost = len(set(zip(instance.layers, instance.choices))) == 1
    orders = [None] if same_cost else (_orders(instance) or [tuple(range(len(instance.devices)))])
    best = None
    for order in orders:
        # For quality, layers equal in cost get the relaxation: a lower bound of what is needed.
        built = _complete(instance, tables, _frame(instance, tables, scale, order, relaxed=mode == "quality"),
                          mode, with_kv=with_kv)
        solver = _solver(limit / len(orders), seed, workers)
        status = solver.solve(built.frame.model)
        if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            value = round(solver.objective_value)
            if best is None or value < best[0]:
                shorts = [solver.value(s) for s in built.shortfall] if built.shortfall else []
                devices = instance.devices if order is None else tuple(instance.devices[j] for j in order)
                best = (value, shorts, devices)
    return best


def _no_solution(instance, tables, scale, proven_infeasible: bool, limit, seed, workers):
    """Raise the error that says which limit binds, with the numbers."""
    budget = max(limit, 1.0)
    weights = _least(instance, tables, scale, "memory", False, budget, seed, workers)
    if weights is not None and weights[0] > 0:
        value, shorts, devices = weights
        worst = [f"{d.name} by {size_text(s)}" for d, s in zip(devices, shorts) if s > 0]
        raise ModelDoesNotFit(
            f"The model does not fit these devices: even at {instance.bits[0]} bits the weights, embedding, "
            f"LM head and workspace are {size_text(value)} short at best ({', '.join(worst)}); add devices or "
            f"allow fewer bits (planner.bits or quantization.bits in model.yaml).",
            value,
        )
    full = _least(instance, tables, scale, "memory", True, budget, seed, workers)
    if full is not None and full[0] > 0:
        largest = max_feasible_batch(instance, budget, seed, workers)
        w = instance.workload
        advice = (f"at most batch {largest} fits at {w.context_tokens} tokens of context" if largest
                  else f"not even batch 1 fits at {w.context_tokens} tokens; shorten the context")
        raise WorkloadDoesNotFit(
            f"The weights fit but the workload does not: the KV cache for batch {w.batch} leaves the devices "
            f"{size_text(full[0])} short at best; {advice} (workload in model.yaml).",
            full[0], largest,
        )
    if instance.omega is not None:
        least = _least(instance, tables, scale, "quality", True, budget, seed, workers)
        if least is not None and least[0] > _quality_limit(instance):
            needed = least[0] * instance.quality_budget / _QUALITY_UNITS
            raise QualityBudgetTooSmall(
                f"No plan within the quality budget fits in memory: it needs a sum of omega of at least "
                f"{needed:.4g}, the budget is {instance.quality_budget:.4g}; raise planner.quality_budget in "
                f"model.yaml to at least {needed:.4g}, add devices, or allow more bit-widths (planner.bits).",
                needed, instance.quality_budget,
            )
    if proven_infeasible:
        raise RuntimeError("CP-SAT proved the plan infeasible, but memory and quality each allow a plan")
    raise PartitionNotSolved(
        f"CP-SAT found no plan within {limit:g} s although one exists; raise planner.time_limit_s in model.yaml."
    )


def max_feasible_batch(instance: PlanInstance, limit: float = 2.0, seed: int = 0, workers: int = 1) -> int:
    """The largest batch whose KV cache fits (memory only), 0 when not even batch 1 does."""
    from dataclasses import replace

    def fits(batch: int) -> bool:
        trial = replace(instance, workload=replace(instance.workload, batch=batch),
                        micro_batch_sizes=tuple(sorted({min(s, batch) for s in instance.micro_batch_sizes})))
        found = _least(trial, cost_tables(trial), _Scale(1.0, 1), "memory", True, limit / 8, seed, workers)
        return found is not None and found[0] == 0

    if not fits(1):
        return 0
    low, high = 1, 2
    while high < (1 << 20) and fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
