"""Pipeline partitioning for the ``plan`` pass: a roofline cost model and a CP-SAT split.

The pure core: no torch, no file I/O. Given GPUs in pipeline order and the model's decoder
layers, choose how many consecutive layers each GPU holds so that every GPU's memory holds its
share and the slowest pipeline stage is as fast as possible. The rules, referred to by number:

1. Layers go to the devices in the given order as contiguous ranges. A device may hold none
   (it is unused and the activations travel past it); at least one device is used.
2. The device holding layer 0 also holds the embedding; the device holding the last layer
   holds the LM head. With ``tied_embeddings`` and both on one device, the matrix is resident
   once; on two devices it is resident on both.
3. Every used device keeps one activation workspace.
4. A stage's time is its layers' prefill of the whole batch prompt, plus ``generated_tokens``
   times its per-token decode step, plus sending its activations to the next used device.
5. The objective is lexicographic: first the slowest stage's time, then the sum of stage times
   (so among equally slow plans the one with less total work wins).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

from ortools.sat.python import cp_model

from llmc.errors import (
    EXIT_INFEASIBLE,
    EXIT_OUT_OF_MEMORY,
    InfeasiblePlanError,
    LlmcError,
    PredictedOutOfMemoryError,
)

FP16_BYTES = 2
# CP-SAT needs integer times. Scaling so that the slowest conceivable stage spans 1e9 ticks
# keeps each layer's rounding below 1e-9 of the horizon whatever the model's size, where fixed
# microseconds would erase a small model's decode step and fixed nanoseconds overflow big ones.
_TICKS_PER_HORIZON = 10**9
_MAX_BATCH_SEARCHED = 1 << 24


# ---------------------------------------------------------------------------------- instance


@dataclass(frozen=True)
class DeviceSlot:
    """One GPU in pipeline order. Rates are dense peaks; ``memory_bytes`` is what is usable."""

    name: str
    sku: str
    memory_bytes: int
    fp16_flops: float
    int8_flops: float  # not used yet: weight-only quantization computes at the fp16 rate
    memory_bandwidth: float
    link_bandwidth_to_next: float | None = None  # bytes/s to the next slot; None for the last

    def __post_init__(self):
        if self.memory_bytes < 0:
            raise ValueError(f"device {self.name}: memory_bytes must be >= 0")
        for field in ("fp16_flops", "int8_flops", "memory_bandwidth"):
            if not getattr(self, field) > 0:
                raise ValueError(f"device {self.name}: {field} must be > 0")
        if self.link_bandwidth_to_next is not None and not self.link_bandwidth_to_next > 0:
            raise ValueError(f"device {self.name}: link_bandwidth_to_next must be > 0 or None")


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer: linear weights, FLOPs per token and fp16 K+V bytes per token."""

    weight_params: int
    flops_per_token: float
    kv_bytes_per_token: int

    @classmethod
    def from_dims(
        cls,
        hidden_size: int,
        intermediate_size: int,
        num_attention_heads: int,
        num_key_value_heads: int,
        head_dim: int | None = None,
    ) -> LayerShape:
        """A Llama-style layer: q/k/v/o projections (GQA) and a gated MLP of three matrices.

        FLOPs per token are 2 x params (one multiply-add per weight). The attention scores
        (QK^T and AV, 4 x context x heads x head_dim per token) are left out: below a few
        thousand tokens of context they are small next to the projections.
        """
        head_dim = head_dim or hidden_size // num_attention_heads
        q_width = num_attention_heads * head_dim
        kv_width = num_key_value_heads * head_dim
        params = 2 * hidden_size * q_width + 2 * hidden_size * kv_width
        params += 3 * hidden_size * intermediate_size
        return cls(params, 2.0 * params, 2 * kv_width * FP16_BYTES)


@dataclass(frozen=True)
class Workload:
    """What the deployment must serve at once: ``batch`` sequences of prompt plus generation."""

    batch: int
    prompt_tokens: int
    generated_tokens: int

    def __post_init__(self):
        if self.batch < 1 or self.prompt_tokens < 1 or self.generated_tokens < 0:
            raise ValueError("workload needs batch >= 1, prompt_tokens >= 1, generated_tokens >= 0")

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens

    @property
    def mean_decode_context(self) -> float:
        # Decode step i (1..generated) attends to prompt + i tokens.
        return self.prompt_tokens + (self.generated_tokens + 1) / 2


@dataclass(frozen=True)
class PartitionInstance:
    """Everything the partitioner reads. Sizes in bytes, times in seconds, rates per second."""

    devices: tuple[DeviceSlot, ...]
    layers: tuple[LayerShape, ...]
    weight_bits: int  # uniform for now; 16 means fp16/bf16 without scales
    group_size: int
    embedding_bytes: int
    lm_head_bytes: int
    hidden_size: int
    workload: Workload
    activation_bytes: int | None = None  # per used stage; None: hidden x batch x prompt x 4
    asymmetric: bool = False
    tied_embeddings: bool = False

    def __post_init__(self):
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.devices or not self.layers:
            raise ValueError("a partition needs at least one device and one layer")
        if not 1 <= self.weight_bits <= 16 or self.group_size < 1 or self.hidden_size < 1:
            raise ValueError("weight_bits must be 1..16, group_size and hidden_size >= 1")
        for device in self.devices[:-1]:
            if device.link_bandwidth_to_next is None:
                raise ValueError(f"device {device.name}: only the last device may lack a link")

    @property
    def stage_activation_bytes(self) -> int:
        if self.activation_bytes is not None:
            return self.activation_bytes
        w = self.workload
        return self.hidden_size * w.batch * w.prompt_tokens * 4


def bytes_per_weight(weight_bits: int, group_size: int, asymmetric: bool = False) -> float:
    """Stored bytes per weight: the packed value, one fp16 scale per group and, for asymmetric
    schemes, one zero point per group packed at the weight's own width."""
    if weight_bits >= 16:
        return float(FP16_BYTES)
    per_group = FP16_BYTES + (weight_bits / 8 if asymmetric else 0.0)
    return weight_bits / 8 + per_group / group_size


# ---------------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class CostTable:
    """Float costs; ``[device][layer]`` for compute, ``[from][to]`` for transfers (from < to)."""

    prefill_s: tuple[tuple[float, ...], ...]
    decode_s_per_token: tuple[tuple[float, ...], ...]
    weight_bytes: tuple[float, ...]
    kv_bytes: tuple[float, ...]
    transfer_prefill_s: tuple[tuple[float, ...], ...]
    transfer_decode_s_per_token: tuple[tuple[float, ...], ...]


def estimate_costs(instance: PartitionInstance) -> CostTable:
    """Roofline costs: each step takes max(FLOPs / rate, bytes moved / bandwidth).

    - Prefill (whole batch prompt) moves the layer's weights once and writes its K and V.
    - Decode (one token for the whole batch) reads the weights and the KV cache at the mean
      decode context.
    - Weight-only quantization dequantizes to fp16 and runs an fp16 GEMM, so the rate is always
      ``fp16_flops``; the int8 rate would apply only to int8 activations, which we do not emit.
    - Memory per layer: weights at ``weight_bits`` with scales, plus the KV cache at full context
      (prompt + generated) for the batch.
    - A transfer between used stages d < e sends fp16 activations (batch x prompt x hidden for
      prefill, batch x hidden per decoded token) at the slowest link between them (rule 1).
    """
    w = instance.workload
    per_weight = bytes_per_weight(instance.weight_bits, instance.group_size, instance.asymmetric)
    weight_bytes = tuple(layer.weight_params * per_weight for layer in instance.layers)
    kv_bytes = tuple(
        float(layer.kv_bytes_per_token * w.batch * w.context_tokens) for layer in instance.layers
    )
    prefill, decode = [], []
    for device in instance.devices:
        rate, bandwidth = device.fp16_flops, device.memory_bandwidth
        prefill.append(tuple(
            max(
                layer.flops_per_token * w.batch * w.prompt_tokens / rate,
                (weights + layer.kv_bytes_per_token * w.batch * w.prompt_tokens) / bandwidth,
            )
            for layer, weights in zip(instance.layers, weight_bytes)
        ))
        decode.append(tuple(
            max(
                layer.flops_per_token * w.batch / rate,
                (weights + layer.kv_bytes_per_token * w.batch * w.mean_decode_context) / bandwidth,
            )
            for layer, weights in zip(instance.layers, weight_bytes)
        ))

    count = len(instance.devices)
    prefill_bytes = w.batch * w.prompt_tokens * instance.hidden_size * FP16_BYTES
    decode_bytes = w.batch * instance.hidden_size * FP16_BYTES
    transfer_prefill = [[0.0] * count for _ in range(count)]
    transfer_decode = [[0.0] * count for _ in range(count)]
    for start in range(count):
        for end in range(start + 1, count):
            slowest_link = min(d.link_bandwidth_to_next for d in instance.devices[start:end])
            transfer_prefill[start][end] = prefill_bytes / slowest_link
            transfer_decode[start][end] = decode_bytes / slowest_link
    return CostTable(
        prefill_s=tuple(prefill),
        decode_s_per_token=tuple(decode),
        weight_bytes=weight_bytes,
        kv_bytes=kv_bytes,
        transfer_prefill_s=tuple(map(tuple, transfer_prefill)),
        transfer_decode_s_per_token=tuple(map(tuple, transfer_decode)),
    )


# ---------------------------------------------------------------------------------- solution


@dataclass(frozen=True)
class StageMemory:
    """Bytes resident on one device, by kind, against its capacity."""

    weights: int
    kv: int
    embedding: int
    lm_head: int
    activations: int
    capacity: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.embedding + self.lm_head + self.activations


@dataclass(frozen=True)
class StagePlan:
    """One used device: layers ``[start_layer, end_layer)`` and their predicted costs."""

    device: str
    sku: str
    device_index: int
    start_layer: int
    end_layer: int
    prefill_s: float
    decode_s_per_token: float
    transfer_prefill_s: float  # to the next used stage; 0 for the last
    transfer_decode_s_per_token: float
    stage_s: float  # rule 4
    memory: StageMemory


@dataclass(frozen=True)
class PartitionSolution:
    """The chosen split. ``objective_s`` is the slowest stage's ``stage_s``."""

    stages: tuple[StagePlan, ...]
    unused_devices: tuple[str, ...]
    status: str  # "OPTIMAL" or "FEASIBLE"
    solve_seconds: float
    objective_s: float
    best_bound_s: float
    total_stage_s: float

    @property
    def gap(self) -> float:
        """Relative distance from the proven bound on the slowest stage (0 when optimal)."""
        if self.objective_s <= 0:
            return 0.0
        return max(0.0, 1.0 - self.best_bound_s / self.objective_s)

    @property
    def layer_ranges(self) -> tuple[tuple[str, int, int], ...]:
        return tuple((s.device, s.start_layer, s.end_layer) for s in self.stages)


class InfeasiblePartition(LlmcError):
    """No split fits the devices; carries the numbers behind the verdict."""

    exit_code = EXIT_INFEASIBLE

    def __init__(self, message: str, needed_bytes: int, capacity_bytes: int, reason: str):
        self.needed_bytes = needed_bytes
        self.capacity_bytes = capacity_bytes
        self.reason = reason
        super().__init__(message)


class ModelDoesNotFit(InfeasiblePartition, InfeasiblePlanError):
    """The weights, embedding and LM head alone fit no split: the cluster is too small."""

    exit_code = EXIT_INFEASIBLE


class WorkloadDoesNotFit(InfeasiblePartition, PredictedOutOfMemoryError):
    """The weights fit, but not with the workload's KV cache and activations."""

    exit_code = EXIT_OUT_OF_MEMORY

    def __init__(self, message, needed_bytes, capacity_bytes, reason, kv_bytes, max_feasible_batch):
        self.kv_bytes = kv_bytes
        self.max_feasible_batch = max_feasible_batch
        super().__init__(message, needed_bytes, capacity_bytes, reason)


class PartitionNotSolved(LlmcError):
    """CP-SAT stopped before finding any split (only a time limit can cause this)."""


# ---------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class _Memory:
    """Integer bytes as the solver sees them (each layer's float bytes rounded up)."""

    weights: tuple[int, ...]
    kv: tuple[int, ...]
    embedding: int
    lm_head: int
    activation: int
    tied: bool

    def stage(self, start: int, end: int, capacity: int) -> StageMemory:
        head_shared = self.tied and start == 0
        return StageMemory(
            weights=sum(self.weights[start:end]),
            kv=sum(self.kv[start:end]),
            embedding=self.embedding if start == 0 else 0,
            lm_head=self.lm_head if end == len(self.weights) and not head_shared else 0,
            activations=self.activation,
            capacity=capacity,
        )


def _memory(instance: PartitionInstance, costs: CostTable, with_workload: bool) -> _Memory:
    count = len(instance.layers)
    return _Memory(
        weights=tuple(math.ceil(b) for b in costs.weight_bytes),
        kv=tuple(math.ceil(b) for b in costs.kv_bytes) if with_workload else (0,) * count,
        embedding=instance.embedding_bytes,
        lm_head=instance.lm_head_bytes,
        activation=instance.stage_activation_bytes if with_workload else 0,
        tied=instance.tied_embeddings,
    )


def _greedy_split(capacities: list[int], memory: _Memory) -> tuple[int, tuple[int, ...]]:
    """Fill each device in order with as many layers as fit; returns (layers placed, counts).

    This reaches furthest of all splits: starting later never needs more memory for the same
    end (rule 2 adds the embedding only at layer 0), so if any split fits, this one does.
    """
    total, start, counts = len(memory.weights), 0, []
    for capacity in capacities:
        end = start
        while end < total and memory.stage(start, end + 1, capacity).total <= capacity:
            end += 1
        counts.append(end - start)
        start = end
    return start, tuple(counts)


def max_feasible_batch(instance: PartitionInstance) -> int:
    """The largest batch whose KV cache and activations fit with the weights (0: none does)."""
    capacities = [d.memory_bytes for d in instance.devices]

    def fits(batch: int) -> bool:
        at_batch = replace(instance, workload=replace(instance.workload, batch=batch))
        memory = _memory(at_batch, estimate_costs(at_batch), with_workload=True)
        return _greedy_split(capacities, memory)[0] == len(instance.layers)

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= _MAX_BATCH_SEARCHED and fits(high):
        low, high = high, high * 2
    if high > _MAX_BATCH_SEARCHED:
        return low
    while high - low > 1:  # fits(low) and not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _size(num_bytes: float) -> str:
    # Three significant digits, so "needs" and "holds" never print as the same number.
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.3g} {unit}"
    return f"{num_bytes:.0f} B"


def _binding_reason(
    instance: PartitionInstance, memory: _Memory, what: str
) -> tuple[int, int, str]:
    """(bytes needed, bytes held, the first constraint that no split can meet)."""
    capacities = [d.memory_bytes for d in instance.devices]
    count = len(memory.weights)
    largest = max(capacities)
    needed = memory.stage(0, count, 0).total
    held = sum(capacities)
    if needed > held:
        return needed, held, f"{what} need {_size(needed)}, the devices hold {_size(held)}"
    first, last = memory.stage(0, 1, 0).total, memory.stage(count - 1, count, 0).total
    if first > largest:
        extras = "the embedding and the LM head" if count == 1 else "the embedding"
        return needed, held, (
            f"layer 0 plus {extras} needs {_size(first)} but the largest device holds "
            f"{_size(largest)}"
        )
    if last > largest:
        return needed, held, (
            f"layer {count - 1} plus the LM head needs {_size(last)} but the largest device "
            f"holds {_size(largest)}"
        )
    for index in range(count):
        alone = memory.stage(index, index + 1, 0)
        alone_total = alone.weights + alone.kv + alone.activations
        if alone_total > largest:
            return needed, held, (
                f"layer {index} needs {_size(alone_total)} but the largest device holds "
                f"{_size(largest)}"
            )
    placed, _ = _greedy_split(capacities, memory)
    return needed, held, (
        f"{what} need {_size(needed)} of the {_size(held)} the devices hold, but no contiguous "
        f"split in device order fits: the devices fill up after {placed} of {count} layers"
    )


def _check_fits(instance: PartitionInstance, costs: CostTable) -> None:
    """Raise ModelDoesNotFit or WorkloadDoesNotFit when no split can hold the instance."""
    capacities = [d.memory_bytes for d in instance.devices]
    weights_only = _memory(instance, costs, with_workload=False)
    if _greedy_split(capacities, weights_only)[0] < len(instance.layers):
        needed, held, reason = _binding_reason(instance, weights_only, "the weights")
        raise ModelDoesNotFit(
            f"The model does not fit these devices: {reason}; add devices or lower quantization.bits in model.yaml.",
            needed, held, reason,
        )
    full = _memory(instance, costs, with_workload=True)
    if _greedy_split(capacities, full)[0] < len(instance.layers):
        w = instance.workload
        needed, held, reason = _binding_reason(
            instance, full, f"the weights with the KV cache for batch {w.batch}"
        )
        best = max_feasible_batch(instance)
        advice = (
            f"at most batch {best} fits at {w.context_tokens} tokens of context" if best
            else f"not even batch 1 fits at {w.context_tokens} tokens; shorten the context"
        )
        raise WorkloadDoesNotFit(
            f"The weights fit but the workload does not: {reason}; {advice}.",
            needed, held, reason, kv_bytes=sum(full.kv), max_feasible_batch=best,
        )


# ---------------------------------------------------------------------------------- solver


def solve_partition(
    instance: PartitionInstance, time_limit_s: float = 10.0, workers: int = 1, seed: int = 0
) -> PartitionSolution:
    """Split the layers over the devices with CP-SAT (rules 1-5 in the module docstring).

    Solves twice for the lexicographic objective: first the slowest stage, then, with the
    slowest stage held at the value found, the sum of stage times. Both share ``time_limit_s``.
    Raises ModelDoesNotFit / WorkloadDoesNotFit before solving when no split fits.
    """
    started = time.perf_counter()

    # Data.
    costs = estimate_costs(instance)
    _check_fits(instance, costs)
    devices, layer_count = instance.devices, len(instance.layers)
    generated = instance.workload.generated_tokens
    memory = _memory(instance, costs, with_workload=True)
    layer_bytes = [w + k for w, k in zip(memory.weights, memory.kv)]
    layer_s = [
        [p + generated * d for p, d in zip(prefill, decode)]
        for prefill, decode in zip(costs.prefill_s, costs.decode_s_per_token)
    ]
    hop_s = [
        [p + generated * d for p, d in zip(prefill, decode)]
        for prefill, decode in zip(costs.transfer_prefill_s, costs.transfer_decode_s_per_token)
    ]
    horizon_s = max(map(sum, layer_s)) + max(map(max, hop_s))
    tick_s = horizon_s / _TICKS_PER_HORIZON if horizon_s > 0 else 1.0
    layer_ticks = [[round(s / tick_s) for s in row] for row in layer_s]
    hop_ticks = [[round(s / tick_s) for s in row] for row in hop_s]
    horizon_ticks = max(map(sum, layer_ticks)) + max(map(max, hop_ticks))
    _, greedy_counts = _greedy_split([d.memory_bytes for d in devices], memory)

    # Variables.
    model = cp_model.CpModel()
    on = [[model.new_bool_var(f"layer{l}_on_dev{d}") for l in range(layer_count)]
          for d in range(len(devices))]
    used = [model.new_bool_var(f"dev{d}_used") for d in range(len(devices))]
    hop = {
        (d, e): model.new_bool_var(f"dev{d}_sends_to_dev{e}")
        for d in range(len(devices)) for e in range(d + 1, len(devices))
    }
    stage = [model.new_int_var(0, horizon_ticks, f"dev{d}_ticks") for d in range(len(devices))]
    slowest = model.new_int_var(0, horizon_ticks, "slowest_ticks")

    # Constraints.
    for l in range(layer_count):
        model.add_exactly_one(on[d][l] for d in range(len(devices)))
    for l in range(layer_count - 1):
        # Rule 1: the owning device's index never decreases, so each device's layers are
        # contiguous and follow the device order.
        model.add(sum(d * on[d][l] for d in range(len(devices)))
                  <= sum(d * on[d][l + 1] for d in range(len(devices))))
    for d in range(len(devices)):
        model.add_max_equality(used[d], on[d])
    for (d, e), sends in hop.items():
        # Rule 4: d sends to e exactly when both are used and every device between is not.
        skipped = [used[k] for k in range(d + 1, e)]
        model.add_bool_and([used[d], used[e], *[~k for k in skipped]]).only_enforce_if(sends)
        model.add_bool_or([~used[d], ~used[e], *skipped, sends])
    for d, device in enumerate(devices):
        holds_embedding, holds_head = on[d][0], on[d][layer_count - 1]
        if instance.tied_embeddings:
            # Rule 2: a tied LM head costs memory only where the embedding is not.
            holds_head = model.new_bool_var(f"dev{d}_holds_untied_head")
            model.add(holds_head >= on[d][layer_count - 1] - on[d][0])
        model.add(
            sum(layer_bytes[l] * on[d][l] for l in range(layer_count))
            + memory.embedding * holds_embedding
            + memory.lm_head * holds_head
            + memory.activation * used[d]  # rule 3
            <= device.memory_bytes
        )
        model.add(stage[d] == sum(layer_ticks[d][l] * on[d][l] for l in range(layer_count))
                  + sum(hop_ticks[d][e] * hop[d, e] for e in range(d + 1, len(devices))))
        model.add(slowest >= stage[d])

    # Objective, first half of rule 5; the greedy split is a feasible start.
    model.minimize(slowest)
    owner = [d for d, n in enumerate(greedy_counts) for _ in range(n)]
    for d in range(len(devices)):
        for l in range(layer_count):
            model.add_hint(on[d][l], owner[l] == d)

    # Solve.
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    solver.parameters.max_time_in_seconds = time_limit_s
    status = solver.solve(model)
    if status == cp_model.OPTIMAL or status == cp_model.FEASIBLE:
        proven = status == cp_model.OPTIMAL
        best_bound_s = solver.best_objective_bound * tick_s
    elif status == cp_model.INFEASIBLE:
        # _check_fits found a split, so this is a bug in the model, not a user error.
        raise RuntimeError("CP-SAT proved infeasible a partition that the greedy split fits")
    else:
        raise PartitionNotSolved(
            f"CP-SAT found no split within {time_limit_s:g} s (status "
            f"{solver.status_name(status)}); raise time_limit_s."
        )
    owner = [next(d for d in range(len(devices)) if solver.value(on[d][l]))
             for l in range(layer_count)]

    # Second half of rule 5: hold the slowest stage, minimise the sum.
    remaining_s = time_limit_s - (time.perf_counter() - started)
    if remaining_s > 0:
        model.add(slowest <= solver.value(slowest))
        model.minimize(sum(stage))
        model.clear_hints()
        for d in range(len(devices)):
            for l in range(layer_count):
                model.add_hint(on[d][l], owner[l] == d)
        solver.parameters.max_time_in_seconds = remaining_s
        status = solver.solve(model)
        if status == cp_model.OPTIMAL or status == cp_model.FEASIBLE:
            proven = proven and status == cp_model.OPTIMAL
            owner = [next(d for d in range(len(devices)) if solver.value(on[d][l]))
                     for l in range(layer_count)]
        elif status == cp_model.INFEASIBLE:
            raise RuntimeError("CP-SAT lost the first phase's split in the second phase")
        else:
            proven = False  # out of time: keep the first phase's split
    else:
        proven = False

    return _describe(
        instance, costs, memory, owner,
        status="OPTIMAL" if proven else "FEASIBLE",
        solve_seconds=time.perf_counter() - started,
        best_bound_s=best_bound_s,
    )


def _describe(
    instance: PartitionInstance,
    costs: CostTable,
    memory: _Memory,
    owner: list[int],
    status: str,
    solve_seconds: float,
    best_bound_s: float,
) -> PartitionSolution:
    """The solution for a layer -> device assignment, with costs from the float table."""
    generated = instance.workload.generated_tokens
    used = sorted(set(owner))
    stages = []
    for position, d in enumerate(used):
        start, end = owner.index(d), len(owner) - owner[::-1].index(d)
        layers = range(start, end)
        prefill = sum(costs.prefill_s[d][l] for l in layers)
        decode = sum(costs.decode_s_per_token[d][l] for l in layers)
        following = used[position + 1] if position + 1 < len(used) else None
        send_prefill = costs.transfer_prefill_s[d][following] if following is not None else 0.0
        send_decode = (
            costs.transfer_decode_s_per_token[d][following] if following is not None else 0.0
        )
        device = instance.devices[d]
        stages.append(StagePlan(
            device=device.name,
            sku=device.sku,
            device_index=d,
            start_layer=start,
            end_layer=end,
            prefill_s=prefill,
            decode_s_per_token=decode,
            transfer_prefill_s=send_prefill,
            transfer_decode_s_per_token=send_decode,
            stage_s=prefill + send_prefill + generated * (decode + send_decode),
            memory=memory.stage(start, end, device.memory_bytes),
        ))
    return PartitionSolution(
        stages=tuple(stages),
        unused_devices=tuple(dev.name for d, dev in enumerate(instance.devices) if d not in used),
        status=status,
        solve_seconds=solve_seconds,
        objective_s=max(s.stage_s for s in stages),
        best_bound_s=best_bound_s,
        total_stage_s=sum(s.stage_s for s in stages),
    )


# ---------------------------------------------------------------------------------- the pass

from llmc.ir import Plan, Program, Stage  # noqa: E402
from llmc.ir import StageMemory as IrStageMemory  # noqa: E402
from llmc.pipeline import Pass, PassContext, PassResult  # noqa: E402


def partition_instance(program: Program, cluster, workload: Workload, weight_bits: int,
                       group_size: int, asymmetric: bool) -> PartitionInstance:
    """The planner's view of a program on a resolved cluster (llmc.config.Cluster)."""
    model = program.model
    devices = tuple(
        DeviceSlot(
            name=d.name,
            sku=d.sku.name,
            memory_bytes=max(0, d.sku.memory_bytes - cluster.memory_reserve_bytes),
            fp16_flops=d.sku.fp16_flops_per_s,
            int8_flops=d.sku.int8_ops_per_s or d.sku.fp16_flops_per_s,
            memory_bandwidth=d.sku.memory_bandwidth_bytes_per_s,
            link_bandwidth_to_next=d.link_to_next_bytes_s,
        )
        for d in cluster.devices
    )
    kv_bytes = model.kv_values_per_token_per_layer * FP16_BYTES
    layers = tuple(LayerShape(layer.weight_params, 2.0 * layer.weight_params, kv_bytes) for layer in program.layers)
    # The embedding and LM head stay in fp16 (the LM head is not quantized by default).
    table_bytes = model.embedding_params * FP16_BYTES
    return PartitionInstance(
        devices=devices,
        layers=layers,
        weight_bits=weight_bits,
        group_size=group_size if group_size > 0 else model.hidden_size,
        embedding_bytes=table_bytes,
        lm_head_bytes=table_bytes,
        hidden_size=model.hidden_size,
        workload=workload,
        asymmetric=asymmetric,
        tied_embeddings=model.tie_word_embeddings,
    )


def plan_from_solution(solution: PartitionSolution, cluster, workload: Workload, weight_bits: int) -> Plan:
    by_name = {d.name: d for d in cluster.devices}
    g = workload.generated_tokens
    stages = tuple(
        Stage(
            index=k,
            device=s.device,
            sku=s.sku,
            compute_capability=by_name[s.device].sku.compute_capability,
            layer_start=s.start_layer,
            layer_end=s.end_layer,
            holds_embedding=k == 0,  # rule 2
            holds_lm_head=k == len(solution.stages) - 1,
            memory=IrStageMemory(
                weights=s.memory.weights, kv_cache=s.memory.kv, embedding=s.memory.embedding,
                lm_head=s.memory.lm_head, activations=s.memory.activations, capacity=s.memory.capacity,
            ),
            predicted_prefill_s=s.prefill_s,
            predicted_decode_s=s.decode_s_per_token,
            predicted_transfer_s=s.transfer_prefill_s + g * s.transfer_decode_s_per_token,
        )
        for k, s in enumerate(solution.stages)
    )
    # One micro-batch: the batch passes every stage in turn for the prefill and for each token.
    latency = sum(s.prefill_s + s.transfer_prefill_s for s in solution.stages) + g * sum(
        s.decode_s_per_token + s.transfer_decode_s_per_token for s in solution.stages
    )
    return Plan(
        stages=stages,
        weight_bits=weight_bits,
        solver_status=solution.status,
        objective_s=solution.objective_s,
        best_bound_s=solution.best_bound_s,
        predicted_batch_latency_s=latency,
        predicted_tokens_per_s=workload.batch * g / latency,
        unused_devices=solution.unused_devices,
    )


@dataclass(frozen=True)
class PlanPass(Pass):
    """Place contiguous layer ranges on the cluster's devices (CP-SAT, roofline costs)."""

    name = "plan"
    weight_bits: int
    group_size: int
    symmetric: bool
    batch: int
    prompt_tokens: int
    generated_tokens: int
    time_limit_s: float = 10.0

    def requires(self, program: Program) -> None:
        if program.model is None or not program.layers:
            raise ValueError("plan needs the layer table; run 'ingest' first")

    def ensures(self, program: Program) -> None:
        if program.plan is None:
            raise ValueError("plan produced no plan")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        workload = Workload(self.batch, self.prompt_tokens, self.generated_tokens)
        instance = partition_instance(
            program, ctx.cluster, workload, self.weight_bits, self.group_size, not self.symmetric
        )
        solution = solve_partition(instance, time_limit_s=self.time_limit_s, workers=1, seed=ctx.seed)
        plan = plan_from_solution(solution, ctx.cluster, workload, self.weight_bits)
        ranges = ", ".join(f"{s.device} {s.layer_start}-{s.layer_end - 1}" for s in plan.stages)
        return PassResult(
            replace(program, plan=plan),
            f"{len(plan.stages)} stages ({ranges}), {solution.status} in {solution.solve_seconds * 1e3:.0f} ms, "
            f"predicted {plan.predicted_tokens_per_s:.0f} tokens/s",
        )
