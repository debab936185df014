"""A plan's arithmetic: the instance, its cost tables, and what one assignment costs.

An *assignment* is a pipeline: the used devices in order, a contiguous range of layers on each,
a bit-width choice per layer, and the prefill and decode micro-batch sizes. Everything here is
plain arithmetic on the cost model (passes/costs.py), the two baseline splits included; the
search lives in passes/partition_model.py and passes/partition_sat.py, the explanation in
passes/plan.py. The brute-force check in the tests recomputes plans from these same tables.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from llmc.errors import InfeasiblePlanError, PredictedOutOfMemoryError
from llmc.passes.costs import (
    FP16_BYTES,
    DeviceSpec,
    LayerChoice,
    LayerShape,
    Links,
    MeasuredProfile,
    Workload,
    embedding_s,
    hand_off_s,
    kv_cache_bytes,
    layer_decode_s,
    layer_prefill_s,
    lm_head_s,
    micro_batches,
    pipeline_seconds,
    workspace_bytes,
)

# ---------------------------------------------------------------------------------- instance


@dataclass(frozen=True)
class PlanInstance:
    """Everything the planner reads. Sizes in bytes, times in seconds, rates per second.

    ``choices[l]`` lists the ways layer ``l`` may be stored, as many for every layer, in the
    same order (ascending bits; a layer stored as ``quantization.overrides`` say has one choice
    with its own label). ``omega[l][c]`` is the quality cost of storing layer ``l`` as choice
    ``c``; the plan keeps ``sum omega <= quality_budget``. Without ``omega`` there is no quality
    constraint.
    """

    devices: tuple[DeviceSpec, ...]  # the declared order, used by the baselines
    links: Links
    layers: tuple[LayerShape, ...]
    choices: tuple[tuple[LayerChoice, ...], ...]
    vocab_size: int
    hidden_size: int
    workload: Workload
    micro_batch_sizes: tuple[int, ...]
    tied_embeddings: bool = False
    omega: tuple[tuple[float, ...], ...] | None = None
    quality_budget: float | None = None
    profile: MeasuredProfile | None = None

    def __post_init__(self):
        for name in ("devices", "layers", "choices", "micro_batch_sizes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.devices or not self.layers:
            raise ValueError("a plan needs at least one device and one layer")
        if len(self.choices) != len(self.layers):
            raise ValueError("one tuple of choices per layer")
        if len({len(row) for row in self.choices}) != 1 or not self.choices[0]:
            raise ValueError("every layer needs as many bit-width choices, at least one")
        if not self.micro_batch_sizes or any(s < 1 for s in self.micro_batch_sizes):
            raise ValueError("micro_batch_sizes must be a non-empty list of sizes >= 1")
        if (self.omega is None) != (self.quality_budget is None):
            raise ValueError("omega and quality_budget go together")
        if self.omega is not None and (
            len(self.omega) != len(self.layers) or any(len(row) != len(self.bits) for row in self.omega)
        ):
            raise ValueError("omega needs one value per layer and choice")
        if len({d.name for d in self.devices}) != len(self.devices):
            raise ValueError("device names must be unique")

    @property
    def bits(self) -> tuple[int, ...]:
        """The choices' bit-widths (of layer 0; every layer's when none has overrides)."""
        return tuple(c.bits for c in self.choices[0])

    @property
    def table_bytes(self) -> int:
        """The fp16 embedding, and the LM head, each."""
        return self.vocab_size * self.hidden_size * FP16_BYTES

    @property
    def identical_layers(self) -> bool:
        """Layers interchangeable in cost and quality: the count formulation applies."""
        same_cost = len(set(zip(self.layers, self.choices))) == 1
        return same_cost and (self.omega is None or len(set(self.omega)) == 1)


# ---------------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class CostTables:
    """Per-unit costs, computed once per instance. ``kind[l]`` indexes layers of equal cost.

    ``prefill[j][k][c][p]``: one prefill micro-batch of size option ``p`` through one layer of
    kind ``k`` stored as choice ``c`` on device ``j``; ``decode[j][k][c][p]``: one decode step.
    """

    kind: tuple[int, ...]
    prefill: tuple
    decode: tuple
    embed_prefill: tuple  # [j][p]
    embed_decode: tuple
    head_prefill: tuple
    head_decode: tuple
    weight_bytes: tuple  # [k][c]
    kv_bytes: tuple  # [k]
    workspace: tuple  # [p]
    counts: tuple[int, ...]  # micro-batches per size option


def cost_tables(instance: PlanInstance) -> CostTables:
    w, sizes = instance.workload, instance.micro_batch_sizes
    kinds: dict[tuple, int] = {}
    kind = tuple(kinds.setdefault((shape, row), len(kinds)) for shape, row in zip(instance.layers, instance.choices))
    distinct = list(kinds)
    profile = instance.profile
    prefill = tuple(
        tuple(tuple(tuple(layer_prefill_s(d, shape, c, size, w, profile) for size in sizes) for c in row)
              for shape, row in distinct)
        for d in instance.devices
    )
    decode = tuple(
        tuple(tuple(tuple(layer_decode_s(d, shape, c, size, w, profile) for size in sizes) for c in row)
              for shape, row in distinct)
        for d in instance.devices
    )
    h, v, s = instance.hidden_size, instance.vocab_size, w.prompt_tokens
    return CostTables(
        kind=kind,
        prefill=prefill,
        decode=decode,
        embed_prefill=tuple(tuple(embedding_s(d, h, size * s) for size in sizes) for d in instance.devices),
        embed_decode=tuple(tuple(embedding_s(d, h, size) for size in sizes) for d in instance.devices),
        head_prefill=tuple(tuple(lm_head_s(d, h, v, size) for size in sizes) for d in instance.devices),
        head_decode=tuple(tuple(lm_head_s(d, h, v, size) for size in sizes) for d in instance.devices),
        weight_bytes=tuple(tuple(c.weight_bytes for c in row) for _, row in distinct),
        kv_bytes=tuple(kv_cache_bytes(shape, w) for shape, _ in distinct),
        workspace=tuple(workspace_bytes(instance.layers, size, w) for size in sizes),
        counts=tuple(micro_batches(w.batch, size) for size in sizes),
    )


def hop_prefill_s(instance: PlanInstance, a: DeviceSpec, b: DeviceSpec, option: int) -> float:
    tokens = instance.micro_batch_sizes[option] * instance.workload.prompt_tokens
    return hand_off_s(instance.links.bandwidth(a, b), instance.hidden_size, tokens)


def hop_decode_s(instance: PlanInstance, a: DeviceSpec, b: DeviceSpec, option: int) -> float:
    return hand_off_s(instance.links.bandwidth(a, b), instance.hidden_size, instance.micro_batch_sizes[option])


# ---------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Assignment:
    """A pipeline: used devices in order, where each stage's layers end, a choice per layer."""

    order: tuple[int, ...]  # device indices, pipeline order
    ends: tuple[int, ...]  # exclusive end layer of each stage; the last is the layer count
    choice: tuple[int, ...]  # per layer, an index into instance.choices[l]
    prefill_option: int  # index into instance.micro_batch_sizes
    decode_option: int

    def ranges(self) -> list[tuple[int, int, int]]:
        """(device, start, end) per stage."""
        starts = (0, *self.ends[:-1])
        return list(zip(self.order, starts, self.ends))


@dataclass(frozen=True)
class StageMemory:
    weights: int
    kv_cache: int
    embedding: int
    lm_head: int
    activations: int
    capacity: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.embedding + self.lm_head + self.activations


@dataclass(frozen=True)
class StageCost:
    device: int
    start: int
    end: int
    prefill_s: float  # one prefill micro-batch
    decode_s: float  # one decode step of one decode micro-batch
    hop_prefill_s: float  # one prefill micro-batch to the next stage; 0 for the last
    hop_decode_s: float
    memory: StageMemory


@dataclass(frozen=True)
class Evaluation:
    stages: tuple[StageCost, ...]
    prefill_s: float  # the whole batch's prefill
    decode_s: float  # every decode step of the whole batch
    quality_used: float | None
    fits: bool  # every stage within its capacity
    within_quality: bool

    @property
    def latency_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def feasible(self) -> bool:
        return self.fits and self.within_quality


def evaluate(instance: PlanInstance, tables: CostTables, assignment: Assignment) -> Evaluation:
    """The cost-model figures of one assignment, in floats."""
    p, q = assignment.prefill_option, assignment.decode_option
    ranges = assignment.ranges()
    last = len(instance.layers) - 1
    stages = []
    for position, (j, start, end) in enumerate(ranges):
        device = instance.devices[j]
        layers = range(start, end)
        prefill = sum(tables.prefill[j][tables.kind[l]][assignment.choice[l]][p] for l in layers)
        decode = sum(tables.decode[j][tables.kind[l]][assignment.choice[l]][q] for l in layers)
        holds_embedding, holds_head = start == 0, end == last + 1
        if holds_embedding:
            prefill += tables.embed_prefill[j][p]
            decode += tables.embed_decode[j][q]
        if holds_head:
            prefill += tables.head_prefill[j][p]
            decode += tables.head_decode[j][q]
        following = ranges[position + 1][0] if position + 1 < len(ranges) else None
        hop_p = hop_prefill_s(instance, device, instance.devices[following], p) if following is not None else 0.0
        hop_d = hop_decode_s(instance, device, instance.devices[following], q) if following is not None else 0.0
        memory = StageMemory(
            weights=round(sum(tables.weight_bytes[tables.kind[l]][assignment.choice[l]] for l in layers)),
            kv_cache=sum(tables.kv_bytes[tables.kind[l]] for l in layers),
            embedding=instance.table_bytes if holds_embedding else 0,
            lm_head=instance.table_bytes if holds_head and not (holds_embedding and instance.tied_embeddings) else 0,
            activations=tables.workspace[p],
            capacity=device.memory_bytes,
        )
        stages.append(StageCost(j, start, end, prefill, decode, hop_p, hop_d, memory))
    units_p = [s.prefill_s for s in stages] + [s.hop_prefill_s for s in stages[:-1]]
    units_d = [s.decode_s for s in stages] + [s.hop_decode_s for s in stages[:-1]]
    prefill_s, decode_s = pipeline_seconds(units_p, tables.counts[p], units_d, tables.counts[q],
                                           instance.workload.decode_steps)
    used = None
    if instance.omega is not None:
        used = sum(instance.omega[l][c] for l, c in enumerate(assignment.choice))
    return Evaluation(
        stages=tuple(stages),
        prefill_s=prefill_s,
        decode_s=decode_s,
        quality_used=used,
        fits=all(s.memory.total <= s.memory.capacity for s in stages),
        within_quality=used is None or used <= instance.quality_budget * (1 + 1e-9),
    )


def best_micro_batches(instance: PlanInstance, tables: CostTables, order, ends, choice) -> tuple[Assignment, Evaluation] | None:
    """The fastest feasible micro-batch sizes for a fixed split, or None when none fits."""
    best = None
    options = range(len(instance.micro_batch_sizes))
    for p in options:
        for q in options:
            assignment = Assignment(tuple(order), tuple(ends), tuple(choice), p, q)
            evaluation = evaluate(instance, tables, assignment)
            if evaluation.feasible and (best is None or evaluation.latency_s < best[1].latency_s):
                best = (assignment, evaluation)
    return best


# ---------------------------------------------------------------------------------- baselines


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


# ---------------------------------------------------------------------------------- errors


class InfeasiblePartition(InfeasiblePlanError):
    """No plan satisfies the limits; subclasses say which limit and carry the numbers."""


class ModelDoesNotFit(InfeasiblePartition):
    """Even at the fewest bits the weights (with embedding, LM head and workspace) do not fit."""

    def __init__(self, message: str, short_bytes: int):
        super().__init__(message)
        self.short_bytes = short_bytes


class QualityBudgetTooSmall(InfeasiblePartition):
    """Plans fit in memory, but none within the quality budget."""

    def __init__(self, message: str, needed: float, budget: float):
        super().__init__(message)
        self.needed = needed
        self.budget = budget


class WorkloadDoesNotFit(PredictedOutOfMemoryError):
    """The weights fit; the workload's KV cache does not (exit 4, with the largest batch)."""

    def __init__(self, message: str, short_bytes: int, max_feasible_batch: int):
        super().__init__(message)
        self.short_bytes = short_bytes
        self.max_feasible_batch = max_feasible_batch


class PartitionNotSolved(InfeasiblePlanError):
    """The solver found no plan within its time limit (and could not prove there is none)."""


def size_text(num_bytes: float) -> str:
    """Three significant digits, so "needs" and "holds" never print as the same number."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.3g} {unit}"
    return f"{num_bytes:.0f} B"
