"""The planner's search: which CP-SAT model to solve, in which device orders, and what to do
when none answers (passes/partition_model.py holds the models).

1. Layers identical in cost and quality: the count model, devices as an unordered set. Exact.
2. Layers equal in cost but not in quality (a per-layer sensitivity): the count model relaxed to
   place bit-widths over layers without contiguity gives a bound for every order; when its
   plan, widths re-placed inside each stage, meets the budget it is optimal. Otherwise the
   per-layer model runs over every distinct device order (at most ``MAX_ORDERS``, orders of
   classes of identical devices, not permutations) or in the relaxation's order.
3. Layers of different shapes: the per-layer model over every distinct order, or the declared
   order when there are too many.

The solver runs on a deterministic-time limit with a fixed seed and one worker, so a plan is
reproducible even when the limit stops it; then the best incumbent is kept (at worst the best
baseline) and the gap to the proven bound reported. When no plan exists, elastic models say
which limit binds and by how much.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

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
    cost_tables,
    evaluate,
    heuristic_plans,
    hop_decode_s,
    hop_prefill_s,
    size_text,
)
from llmc.passes.partition_model import (
    QUALITY_UNITS,
    TICKS,
    Built,
    Scale,
    add_hint,
    build_frame,
    complete,
    make_solver,
    picked,
    quality_limit,
)

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
class _Outcome:
    found: Assignment | None
    value: int | None  # ticks of the best plan found
    bound: float  # proven lower bound (ticks) of this formulation and order
    infeasible: bool  # no plan at all (not merely none below the cutoff)
    spent: float  # deterministic seconds


def _search(instance, built: Built, limit: float, seed: int, workers: int, cutoff: int | None,
            hint: Assignment | None) -> _Outcome:
    """Solve one formulation; with ``cutoff``, only plans strictly faster than it count."""
    model = built.frame.model
    if cutoff is not None:
        model.add(sum(built.parts) <= cutoff - 1)
    if hint is not None:
        add_hint(built, instance, hint, model)
    solver = make_solver(limit, seed, workers)
    status = solver.solve(model)
    spent = solver.response_proto.deterministic_time
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        found = built.frame.decode_of(solver, picked(solver, built.pick_p), picked(solver, built.pick_q))
        return _Outcome(found, round(solver.objective_value), solver.best_objective_bound, False, spent)
    if status == cp_model.INFEASIBLE:
        # Below a cutoff: nothing beats it (bound: the cutoff); without one: no plan at all.
        return _Outcome(None, None, math.inf if cutoff is None else cutoff, cutoff is None, spent)
    return _Outcome(None, None, solver.best_objective_bound, False, spent)


def _crude_ceiling(instance: PlanInstance, tables: CostTables) -> float:
    """An upper bound of any pipeline's latency, for scaling when no heuristic plan fits:
    at most 2D - 1 units, each no slower than every layer on the slowest device plus the
    embedding, the LM head or the slowest link."""
    L, D, devices = len(instance.layers), len(instance.devices), instance.devices
    worst = 0.0
    for p in range(len(instance.micro_batch_sizes)):
        units = []
        for table, embed, head, hop in ((tables.prefill, tables.embed_prefill, tables.head_prefill, hop_prefill_s),
                                        (tables.decode, tables.embed_decode, tables.head_decode, hop_decode_s)):
            layer = max(c[p] for dev in table for kind in dev for c in kind)
            stage = L * layer + max(r[p] for r in embed) + max(r[p] for r in head)
            link = max((hop(instance, a, b, p) for a in devices for b in devices if a is not b), default=0.0)
            units.append(max(stage, link))
        span = 2 * D + tables.counts[p]
        worst = max(worst, span * units[0] + instance.workload.decode_steps * span * units[1])
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
    scale = Scale(tick=max(reference, 1e-12) / TICKS, steps=instance.workload.decode_steps)
    ceiling = TICKS + TICKS // 1000 + 10_000  # the reference, plus room for tick rounding

    def run(order, limit, cutoff=None, relaxed=False, hint=None) -> _Outcome:
        built = complete(instance, tables, build_frame(instance, tables, scale, order, relaxed), "time", ceiling=ceiling)
        return _search(instance, built, limit, seed, workers, cutoff, hint)

    def finish(found, value, bound, proven_infeasible, search):
        # The limit may stop the search before it finds anything: keep the heuristic incumbent.
        if found is None and incumbent is not None:
            return _solution(instance, tables, incumbent, False, bound * scale.tick, search, started)
        if found is None:
            _no_solution(instance, tables, scale, proven_infeasible, time_limit_s, seed, workers)
        return _solution(instance, tables, found, bound >= value, bound * scale.tick, search, started)

    if instance.identical_layers:
        outcome = run(None, time_limit_s, hint=incumbent)
        return finish(outcome.found, outcome.value, outcome.bound, outcome.infeasible,
                      "count model over the devices as an unordered set (identical devices interchangeable)")

    orders = _orders(instance)
    relaxation_bound = None
    remaining = time_limit_s
    same_cost = len(set(zip(instance.layers, instance.choices))) == 1
    if same_cost:
        # Layers equal in cost, not in quality: the count model with bits placed freely over the
        # layers (contiguity dropped) is a relaxation; its bound holds for every order.
        relaxed = run(None, time_limit_s / 3, relaxed=True)
        remaining -= relaxed.spent
        if relaxed.found is None and (relaxed.infeasible or incumbent is None):
            _no_solution(instance, tables, scale, relaxed.infeasible, time_limit_s, seed, workers)
        relaxation_bound = relaxed.bound
        repaired = _repair(instance, tables, relaxed.found) if relaxed.found is not None else None
        if repaired is not None:
            latency = evaluate(instance, tables, repaired).latency_s
            if latency <= (relaxation_bound + 2 * len(instance.layers)) * scale.tick:
                # The relaxation's plan, its bits re-placed within each stage, meets the budget:
                # it is optimal for the unrelaxed problem too.
                return _solution(instance, tables, repaired, True, latency,
                                 "count model relaxed over per-layer bits; its optimum, bits re-placed within "
                                 "each stage, meets the quality budget", started)
            if incumbent is None or latency < evaluate(instance, tables, incumbent).latency_s:
                incumbent = repaired
        if orders is None:
            order = (relaxed.found or incumbent).order
            orders = [order + tuple(j for j in range(len(instance.devices)) if j not in order)]
            search = ("per-layer model in the device order of the count relaxation (bits placed without "
                      "contiguity; its bound is the reported bound)")
        else:
            search = f"per-layer model over all {len(orders)} distinct device orders"
    elif orders is not None:
        search = f"per-layer model over all {len(orders)} distinct device orders"
    else:
        orders = [tuple(range(len(instance.devices)))]
        search = "per-layer model in the declared device order (the bound holds for that order only)"
    enumerated = search.startswith("per-layer model over all")

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
    if best is not None and incumbent is not None:
        if evaluate(instance, tables, incumbent).latency_s < evaluate(instance, tables, best).latency_s:
            best, best_value = incumbent, round(evaluate(instance, tables, incumbent).latency_s / scale.tick)
    lower = [relaxation_bound] if relaxation_bound is not None else []
    if enumerated:
        lower.append(min(bounds))
    return finish(best, best_value, max(lower) if lower else 0.0, infeasible, search)


def _repair(instance: PlanInstance, tables: CostTables, relaxed: Assignment) -> Assignment | None:
    """The relaxed plan with each stage's bit-widths given to its layers so as to spend the
    least quality: layers that lose most from the fewest bits get the most bits. Exact when
    omega(layer, bits) is a layer factor times a bits factor; None when over the budget."""
    choice = list(relaxed.choice)
    for _, start, end in relaxed.ranges():
        widths = sorted(choice[start:end], reverse=True)
        layers = sorted(range(start, end), key=lambda l: (instance.omega[l][0] - instance.omega[l][-1], -l), reverse=True)
        for l, c in zip(layers, widths):
            choice[l] = c
    repaired = replace(relaxed, choice=tuple(choice))
    return repaired if evaluate(instance, tables, repaired).feasible else None


def _follows(used: tuple[int, ...], order: tuple[int, ...]) -> bool:
    """Whether the devices ``used`` appear in ``order`` in the same sequence."""
    positions = [order.index(j) for j in used]
    return positions == sorted(positions)


def _solution(instance, tables, assignment, proven, bound_s, search, started) -> Solution:
    evaluation = evaluate(instance, tables, assignment)
    # Proven optimal up to the tick rounding (1e-8 of the reference latency).
    bound = evaluation.latency_s if proven else min(bound_s, evaluation.latency_s)
    return Solution(assignment, evaluation, "OPTIMAL" if proven else "FEASIBLE", bound, search,
                    time.perf_counter() - started)


# ---------------------------------------------------------------------------------- diagnosis


def _least(instance, tables, scale, mode, with_kv, limit, seed, workers, with_quality=False):
    """The least total memory shortfall (mode "memory") or quality use (mode "quality") over the
    orders the search covers, or None when there is none. With per-layer omega the count model
    relaxes where bits go (contiguity dropped): the value is then a lower bound."""
    same_cost = len(set(zip(instance.layers, instance.choices))) == 1
    orders = [None] if same_cost else (_orders(instance) or [tuple(range(len(instance.devices)))])
    relaxed = mode == "quality" or with_quality
    best = None
    for order in orders:
        built = complete(instance, tables, build_frame(instance, tables, scale, order, relaxed=relaxed), mode,
                         with_kv=with_kv, with_quality=with_quality)
        solver = make_solver(limit / len(orders), seed, workers)
        if solver.solve(built.frame.model) in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            best = min(best, round(solver.objective_value)) if best is not None else round(solver.objective_value)
    return best


def _no_solution(instance, tables, scale, proven_infeasible: bool, limit, seed, workers):
    """Raise the error that says which limit binds, with the numbers: the weights alone (exit 3),
    the quality budget for the weights alone (exit 3), the workload's KV cache within the
    quality budget (exit 4, with the largest batch), the quality budget (exit 3)."""
    budget = max(limit, 1.0)
    held = sum(d.memory_bytes for d in instance.devices)
    short = _least(instance, tables, scale, "memory", False, budget, seed, workers)
    if short:
        raise ModelDoesNotFit(
            f"The model does not fit these devices: even at {instance.bits[0]} bits its weights, embedding, LM head "
            f"and workspace are {size_text(short)} short at best (the devices hold {size_text(held)}); add devices "
            f"or allow fewer bits (planner.bits or quantization.bits in model.yaml).",
            short,
        )
    quality = instance.omega is not None

    def needed(mode_kv: bool) -> float | None:
        least = _least(instance, tables, scale, "quality", mode_kv, budget, seed, workers)
        return None if least is None else least * instance.quality_budget / QUALITY_UNITS

    if quality:
        bare = _least(instance, tables, scale, "quality", False, budget, seed, workers)
        if bare is not None and bare > quality_limit(instance):
            value = bare * instance.quality_budget / QUALITY_UNITS
            raise QualityBudgetTooSmall(
                f"No plan within the quality budget fits in memory, even without the KV cache: it needs a sum of "
                f"omega of at least {value:.4g}, the budget is {instance.quality_budget:.4g}; raise "
                f"planner.quality_budget in model.yaml, add devices, or allow fewer bits (planner.bits).",
                value, instance.quality_budget,
            )
    short = _least(instance, tables, scale, "memory", True, budget, seed, workers, with_quality=quality)
    if short:
        largest = max_feasible_batch(instance, budget, seed, workers)
        w = instance.workload
        advice = (f"at most batch {largest} fits at {w.context_tokens} tokens of context" if largest
                  else f"not even batch 1 fits at {w.context_tokens} tokens; shorten the context")
        if quality and (value := needed(True)) is not None:
            advice += f", or batch {w.batch} with planner.quality_budget of at least {value:.4g}"
        raise WorkloadDoesNotFit(
            f"The weights fit but the workload does not: the KV cache for batch {w.batch} leaves the devices "
            f"{size_text(short)} short at best{' within the quality budget' if quality else ''}; {advice} "
            f"(workload in model.yaml).",
            short, largest,
        )
    if proven_infeasible:
        raise RuntimeError("CP-SAT proved the plan infeasible, but memory and quality each allow a plan")
    raise PartitionNotSolved(
        f"CP-SAT found no plan within {limit:g} s although one exists; raise planner.time_limit_s in model.yaml."
    )


def max_feasible_batch(instance: PlanInstance, limit: float = 2.0, seed: int = 0, workers: int = 1) -> int:
    """The largest batch whose KV cache fits (within the quality budget), 0 when not even batch 1."""

    def fits(batch: int) -> bool:
        trial = replace(instance, workload=replace(instance.workload, batch=batch),
                        micro_batch_sizes=tuple(sorted({min(s, batch) for s in instance.micro_batch_sizes})))
        found = _least(trial, cost_tables(trial), Scale(1.0, 1), "memory", True, limit / 8, seed, workers,
                       with_quality=instance.omega is not None)
        return found == 0

    if not fits(1):
        return 0
    low, high = 1, 2
    while high < (1 << 20) and fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
