"""The plan pass's pure core: cost model, CP-SAT split against brute force, infeasibility."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest

from llmc.errors import EXIT_INFEASIBLE, EXIT_OUT_OF_MEMORY
from llmc.passes.plan import (
    DeviceSlot,
    InfeasiblePartition,
    LayerShape,
    ModelDoesNotFit,
    PartitionInstance,
    Workload,
    WorkloadDoesNotFit,
    bytes_per_weight,
    estimate_costs,
    max_feasible_batch,
    solve_partition,
)

MB = 10**6
# SmolLM2-135M: hidden 576, intermediate 1536, 9 query heads and 3 KV heads of 64, 30 layers,
# a 49152-token tied embedding.
SMOL_LAYER = LayerShape.from_dims(576, 1536, 9, 3)
SMOL_EMBEDDING = 49152 * 576 * 2


def gpu(name, memory_mb, tflops, bandwidth_gbs, link_gbs=None):
    """A GPU with real speeds; memory in MB is what is left for this model (small on purpose)."""
    return DeviceSlot(
        name=name,
        sku=f"{tflops:g}TF",
        memory_bytes=int(memory_mb * MB),
        fp16_flops=tflops * 1e12,
        int8_flops=2 * tflops * 1e12,
        memory_bandwidth=bandwidth_gbs * 1e9,
        link_bandwidth_to_next=None if link_gbs is None else link_gbs * 1e9,
    )


def smol(devices, layers=30, batch=8, prompt=512, generated=128, bits=4, **fields):
    shapes = layers if isinstance(layers, tuple) else (SMOL_LAYER,) * layers
    return PartitionInstance(
        devices=tuple(devices),
        layers=shapes,
        weight_bits=bits,
        group_size=128,
        embedding_bytes=SMOL_EMBEDDING,
        lm_head_bytes=SMOL_EMBEDDING,
        hidden_size=576,
        workload=Workload(batch, prompt, generated),
        **fields,
    )


def assert_valid(solution, instance):
    """Contiguous ranges in device order covering every layer; memory within capacity."""
    assert solution.status in ("OPTIMAL", "FEASIBLE")
    position = 0
    for stage in solution.stages:
        assert stage.start_layer == position < stage.end_layer
        position = stage.end_layer
        assert stage.memory.total <= instance.devices[stage.device_index].memory_bytes
        assert stage.memory.capacity == instance.devices[stage.device_index].memory_bytes
    assert position == len(instance.layers)
    indices = [s.device_index for s in solution.stages]
    assert indices == sorted(set(indices))
    assert solution.stages[0].memory.embedding == instance.embedding_bytes
    assert solution.stages[-1].transfer_prefill_s == 0.0


def brute_force(instance):
    """(slowest stage, sum of stages) of the lexicographically best contiguous split, or None."""
    costs = estimate_costs(instance)
    count, generated = len(instance.layers), instance.workload.generated_tokens
    layer_bytes = [math.ceil(w) + math.ceil(k) for w, k in zip(costs.weight_bytes, costs.kv_bytes)]
    best = None
    device_count = len(instance.devices)
    for cuts in itertools.combinations_with_replacement(range(count + 1), device_count - 1):
        bounds = (0, *cuts, count)
        ranges = [(d, bounds[d], bounds[d + 1]) for d in range(len(instance.devices))]
        ranges = [r for r in ranges if r[1] < r[2]]
        fits, times = True, []
        for position, (d, start, end) in enumerate(ranges):
            resident = sum(layer_bytes[start:end]) + instance.stage_activation_bytes
            resident += instance.embedding_bytes if start == 0 else 0
            shared = instance.tied_embeddings and start == 0
            resident += instance.lm_head_bytes if end == count and not shared else 0
            fits &= resident <= instance.devices[d].memory_bytes
            seconds = sum(costs.prefill_s[d][l] + generated * costs.decode_s_per_token[d][l]
                          for l in range(start, end))
            if position + 1 < len(ranges):
                e = ranges[position + 1][0]
                seconds += (costs.transfer_prefill_s[d][e]
                            + generated * costs.transfer_decode_s_per_token[d][e])
            times.append(seconds)
        if fits and (best is None or (max(times), sum(times)) < best):
            best = (max(times), sum(times))
    return best


def test_bytes_per_weight_counts_group_scales():
    assert bytes_per_weight(16, 128) == 2.0
    assert bytes_per_weight(4, 128) == pytest.approx(0.5 + 2 / 128)
    assert bytes_per_weight(4, 128, asymmetric=True) == pytest.approx(0.5 + 2.5 / 128)
    assert bytes_per_weight(8, 64) == pytest.approx(1 + 2 / 64)


def test_roofline_decode_is_bandwidth_bound_and_prefill_compute_bound():
    h100 = gpu("h100", 80_000, 990, 3350)
    instance = smol([h100], layers=1, batch=1, prompt=2048, generated=1)
    costs = estimate_costs(instance)
    weights = SMOL_LAYER.weight_params * bytes_per_weight(4, 128)
    assert costs.weight_bytes[0] == pytest.approx(weights)
    # Batch 1 decode reads every weight for 2 FLOPs each: the bandwidth term wins.
    kv_read = SMOL_LAYER.kv_bytes_per_token * (2048 + 1)
    assert costs.decode_s_per_token[0][0] == pytest.approx((weights + kv_read) / 3350e9)
    # A 2048-token prefill is compute-bound, at the fp16 rate even with int4 weights.
    assert costs.prefill_s[0][0] == pytest.approx(SMOL_LAYER.flops_per_token * 2048 / 990e12)
    assert costs.kv_bytes[0] == SMOL_LAYER.kv_bytes_per_token * 2049


def test_matches_brute_force_on_small_heterogeneous_instances():
    rng = np.random.default_rng(0)
    catalogue = [(65, 300), (125, 900), (312, 2039), (990, 3350)]  # (TFLOP/s, GB/s)
    solved = infeasible = 0
    for trial in range(30):
        layer_count = int(rng.integers(1, 9))
        layers = tuple(
            LayerShape.from_dims(576, int(rng.choice([768, 1536, 3072])), 9, 3)
            for _ in range(layer_count)
        )
        devices = []
        for d in range(int(rng.integers(1, 4))):
            tflops, bandwidth = catalogue[int(rng.integers(len(catalogue)))]
            devices.append(gpu(f"node0/gpu{d}", float(rng.uniform(20, 160)), tflops, bandwidth,
                               float(rng.choice([16, 64, 450]))))
        devices[-1] = gpu(devices[-1].name, devices[-1].memory_bytes / MB,
                          devices[-1].fp16_flops / 1e12, devices[-1].memory_bandwidth / 1e9)
        instance = smol(devices, layers=layers, batch=int(rng.integers(1, 9)),
                        generated=int(rng.integers(0, 256)), tied_embeddings=bool(trial % 2))
        expected = brute_force(instance)
        try:
            solution = solve_partition(instance)
        except InfeasiblePartition:
            assert expected is None, f"trial {trial}: brute force found a split"
            infeasible += 1
            continue
        assert expected is not None, f"trial {trial}: solver returned a split that cannot fit"
        assert_valid(solution, instance)
        assert solution.status == "OPTIMAL"
        assert solution.objective_s == pytest.approx(expected[0], rel=1e-6)
        assert solution.total_stage_s == pytest.approx(expected[1], rel=1e-6)
        solved += 1
    assert solved >= 10 and infeasible >= 3  # both branches really exercised


def test_faster_device_gets_more_layers():
    slow = gpu("node0/gpu0", 400, 65, 300, link_gbs=64)
    fast = gpu("node0/gpu1", 400, 990, 3350)
    solution = solve_partition(smol([slow, fast]))
    assert_valid(solution, smol([slow, fast]))
    counts = {s.device: s.end_layer - s.start_layer for s in solution.stages}
    assert counts["node0/gpu1"] > counts.get("node0/gpu0", 0)


def test_device_too_small_for_any_layer_is_left_unused():
    devices = [
        gpu("node0/gpu0", 200, 312, 2039, link_gbs=450),
        gpu("node0/gpu1", 5, 990, 3350, link_gbs=450),  # smaller than one layer's share
        gpu("node0/gpu2", 200, 312, 2039),
    ]
    instance = smol(devices)
    solution = solve_partition(instance)
    assert_valid(solution, instance)
    assert solution.unused_devices == ("node0/gpu1",)
    assert [s.device for s in solution.stages] == ["node0/gpu0", "node0/gpu2"]
    assert solution.stages[0].transfer_prefill_s > 0  # activations travel past gpu1


def test_lone_device_too_small_makes_the_model_infeasible():
    with pytest.raises(ModelDoesNotFit) as caught:
        solve_partition(smol([gpu("node0/gpu0", 40, 990, 3350)]))
    assert caught.value.capacity_bytes == 40 * MB < caught.value.needed_bytes


def test_devices_too_small_for_the_embedding_name_that_reason():
    # 320 MB in all holds the 168 MB of weights, but no 40 MB device holds layer 0 plus the
    # 57 MB embedding.
    devices = [gpu(f"node0/gpu{d}", 40, 990, 3350, 450) for d in range(7)]
    devices.append(gpu("node0/gpu7", 40, 990, 3350))
    with pytest.raises(ModelDoesNotFit) as caught:
        solve_partition(smol(devices))
    layer_zero = math.ceil(SMOL_LAYER.weight_params * bytes_per_weight(4, 128)) + SMOL_EMBEDDING
    assert caught.value.reason == (
        f"layer 0 plus the embedding needs {layer_zero / 2**20:.1f} MiB but the largest device "
        f"holds {40 * MB / 2**20:.1f} MiB"
    )
    assert caught.value.needed_bytes < caught.value.capacity_bytes


def test_model_does_not_fit_reports_totals():
    devices = [gpu(f"node0/gpu{d}", 30, 312, 2039, 450) for d in range(3)]
    devices[-1] = gpu("node0/gpu2", 60, 312, 2039)
    with pytest.raises(ModelDoesNotFit) as caught:
        solve_partition(smol(devices, bits=16))
    error = caught.value
    weights = 30 * SMOL_LAYER.weight_params * 2 + SMOL_EMBEDDING * 2
    assert error.needed_bytes == weights
    assert error.capacity_bytes == 120 * MB < error.needed_bytes
    assert error.exit_code == EXIT_INFEASIBLE
    assert "GiB" in str(error) or "MiB" in str(error)
    assert "\n" not in str(error)


def test_workload_does_not_fit_gives_the_largest_batch_that_does():
    devices = [gpu("node0/gpu0", 120, 312, 2039, 450), gpu("node0/gpu1", 120, 990, 3350)]
    instance = smol(devices, batch=64, prompt=2048, generated=512)
    with pytest.raises(WorkloadDoesNotFit) as caught:
        solve_partition(instance)
    error = caught.value
    assert isinstance(error, InfeasiblePartition)
    assert error.exit_code == EXIT_OUT_OF_MEMORY
    assert 0 < error.max_feasible_batch < 64
    assert error.kv_bytes == 30 * SMOL_LAYER.kv_bytes_per_token * 64 * 2560
    assert error.needed_bytes > error.capacity_bytes or "no contiguous split" in error.reason
    assert f"at most batch {error.max_feasible_batch} fits" in str(error)
    assert max_feasible_batch(instance) == error.max_feasible_batch

    def at(batch):
        return smol(devices, batch=batch, prompt=2048, generated=512)

    assert_valid(solve_partition(at(error.max_feasible_batch)), at(error.max_feasible_batch))
    with pytest.raises(WorkloadDoesNotFit):
        solve_partition(at(error.max_feasible_batch + 1))


def test_tied_embedding_is_resident_once_on_a_single_device():
    tight = 30 * math.ceil(SMOL_LAYER.weight_params * bytes_per_weight(4, 128))
    tight += 30 * SMOL_LAYER.kv_bytes_per_token * 640 + SMOL_EMBEDDING + 576 * 512 * 4
    device = DeviceSlot("node0/gpu0", "A10G", tight, 125e12, 250e12, 600e9, None)
    solution = solve_partition(smol([device], batch=1, tied_embeddings=True))
    assert solution.stages[0].memory.lm_head == 0
    assert solution.stages[0].memory.total == tight
    with pytest.raises(ModelDoesNotFit):
        solve_partition(smol([device], batch=1, tied_embeddings=False))


def heterogeneous_fleet():
    return [
        gpu("node0/gpu0", 90, 65, 300, link_gbs=32),      # T4-like
        gpu("node0/gpu1", 120, 312, 2039, link_gbs=600),  # A100-like
        gpu("node0/gpu2", 70, 990, 3350, link_gbs=25),    # H100-like
        gpu("node1/gpu0", 100, 125, 900),                 # L40S-like
    ]


def test_same_instance_gives_the_same_solution():
    instance = smol(heterogeneous_fleet())
    first, second = solve_partition(instance), solve_partition(instance)
    assert first.layer_ranges == second.layer_ranges
    assert first.stages == second.stages
    assert first.objective_s == second.objective_s


def test_thirty_layers_on_four_devices_solve_to_optimal_quickly():
    instance = smol(heterogeneous_fleet())
    started = time.perf_counter()
    solution = solve_partition(instance)
    elapsed = time.perf_counter() - started
    assert_valid(solution, instance)
    assert solution.status == "OPTIMAL"
    assert solution.gap == pytest.approx(0.0, abs=1e-6)
    assert len(solution.stages) >= 3  # memory forces a real split
    assert elapsed < 1.0
