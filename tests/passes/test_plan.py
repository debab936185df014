"""The planner: cost model, CP-SAT against brute force, infeasibility, profiles, the pass.

Instances are small on purpose (a few layers, a few MB of memory per device) so brute force can
enumerate every pipeline: device orders, contiguous splits, a bit-width per layer and the
micro-batch sizes.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from llmc.errors import EXIT_INFEASIBLE, EXIT_OUT_OF_MEMORY
from llmc.passes.costs import (
    DeviceSpec,
    LayerShape,
    Links,
    MeasuredProfile,
    ProfilePoint,
    Workload,
    bytes_per_weight,
    layer_decode_s,
    layer_prefill_s,
    pipeline_seconds,
    uniform_choice,
)
from llmc.passes.partition import (
    InfeasiblePartition,
    ModelDoesNotFit,
    PlanInstance,
    QualityBudgetTooSmall,
    WorkloadDoesNotFit,
    cost_tables,
)
from llmc.passes.partition import heuristic_plans
from llmc.passes.partition_sat import max_feasible_batch, solve_partition

MB = 10**6
# SmolLM2-135M's layer: hidden 576, intermediate 1536, 9 query heads and 3 KV heads of 64.
SMOL = LayerShape.from_dims(576, 1536, 9, 3)
VOCAB = 49152


def gpu(name, memory_mb, tflops, bandwidth_gbs):
    node = name.split("/")[0]
    return DeviceSpec(name, f"{tflops:g}TF", node, int(memory_mb * MB), tflops * 1e12, bandwidth_gbs * 1e9)


def instance(devices, layers=8, bits=(4,), batch=4, prompt=256, generated=32, sizes=(1,), intra=64e9,
             network=12.5e9, omega=None, budget=None, shapes=None, tied=True, profile=None):
    shapes = shapes or (SMOL,) * layers
    nodes = sorted({d.node for d in devices})
    return PlanInstance(
        devices=tuple(devices),
        links=Links(tuple((n, intra) for n in nodes), network if len(nodes) > 1 else None),
        layers=tuple(shapes),
        choices=tuple(tuple(uniform_choice(shape, b, 64) for b in bits) for shape in shapes),
        vocab_size=VOCAB, hidden_size=576, workload=Workload(batch, prompt, generated),
        micro_batch_sizes=sizes, tied_embeddings=tied, omega=omega, quality_budget=budget, profile=profile,
    )


# ---------------------------------------------------------------------------------- brute force


def brute_force(inst):
    """The least batch latency over every pipeline, or None; recomputed from the tables here."""
    t = cost_tables(inst)
    L, D, C = len(inst.layers), len(inst.devices), len(inst.bits)
    P, steps, table = len(inst.micro_batch_sizes), inst.workload.decode_steps, inst.table_bytes
    best = None
    for k in range(1, min(D, L) + 1):
        for order in itertools.permutations(range(D), k):
            for cuts in itertools.combinations(range(1, L), k - 1):
                bounds = list(zip((0, *cuts), (*cuts, L)))
                for choice in itertools.product(range(C), repeat=L):
                    if inst.omega is not None and sum(inst.omega[l][c] for l, c in enumerate(choice)) > inst.quality_budget * (1 + 1e-9):
                        continue
                    for p in range(P):
                        fits = True
                        for j, (start, end) in zip(order, bounds):
                            resident = sum(t.weight_bytes[t.kind[l]][choice[l]] + t.kv_bytes[t.kind[l]] for l in range(start, end))
                            resident += t.workspace[p] + (table if start == 0 else 0)
                            resident += table if end == L and not (start == 0 and inst.tied_embeddings) else 0
                            fits &= resident <= inst.devices[j].memory_bytes
                        if not fits:
                            continue
                        for q in range(P):
                            units = []
                            for option, phase in ((p, "prefill"), (q, "decode")):
                                stage_t = []
                                for j, (start, end) in zip(order, bounds):
                                    table_t = t.prefill if phase == "prefill" else t.decode
                                    total = sum(table_t[j][t.kind[l]][choice[l]][option] for l in range(start, end))
                                    if start == 0:
                                        total += (t.embed_prefill if phase == "prefill" else t.embed_decode)[j][option]
                                    if end == L:
                                        total += (t.head_prefill if phase == "prefill" else t.head_decode)[j][option]
                                    stage_t.append(total)
                                tokens = inst.micro_batch_sizes[option] * (inst.workload.prompt_tokens if phase == "prefill" else 1)
                                hops = [tokens * inst.hidden_size * 2 / inst.links.bandwidth(inst.devices[a], inst.devices[b])
                                        for a, b in zip(order, order[1:])]
                                units.append(stage_t + hops)
                            m_p, m_d = t.counts[p], t.counts[q]
                            latency = sum(units[0]) + (m_p - 1) * max(units[0])
                            latency += steps * max(sum(units[1]), m_d * max(units[1]))
                            best = latency if best is None else min(best, latency)
    return best


def assert_valid(solution, inst):
    """Contiguous ranges over every layer, distinct devices, memory within capacity."""
    a, ev = solution.assignment, solution.evaluation
    assert list(a.ends) == sorted(a.ends) and a.ends[-1] == len(inst.layers)
    assert len(set(a.order)) == len(a.order)
    assert all(s.end > s.start for s in ev.stages)
    for s in ev.stages:
        assert s.memory.total <= s.memory.capacity == inst.devices[s.device].memory_bytes
    assert ev.stages[0].memory.embedding == inst.table_bytes
    assert ev.feasible
    assert solution.best_bound_s <= ev.latency_s * (1 + 1e-9)


def random_instance(rng, trial):
    L = int(rng.integers(2, 6))
    bits = ((4,), (4, 8), (3, 4, 8))[trial % 3]
    if len(bits) == 3:
        L = min(L, 4)
    devices = []
    catalogue = [(65, 300), (125, 900), (312, 2039), (990, 3350)]
    for d in range(int(rng.integers(1, 4))):
        tflops, bandwidth = catalogue[int(rng.integers(len(catalogue)))]
        node = "n0" if d < 2 or trial % 2 else "n1"
        devices.append(gpu(f"{node}/gpu{d}", float(rng.uniform(25, 220)), tflops, bandwidth))
    if trial % 4 == 0 and len(devices) > 1:  # two identical devices
        devices[1] = DeviceSpec(devices[1].name, devices[0].sku, devices[0].node, devices[0].memory_bytes,
                                devices[0].fp16_flops, devices[0].memory_bandwidth)
    omega = budget = None
    if len(bits) > 1:
        per_layer = trial % 2 == 0
        base = rng.uniform(0.5, 2.0, L) if per_layer else np.ones(L)
        omega = tuple(tuple(float(base[l]) * ((15 / (2**b - 1)) ** 2) for b in bits) for l in range(L))
        budget = float(sum(row[bits.index(4)] for row in omega)) * float(rng.uniform(0.6, 1.4))
    sizes = ((1,), (1, 2), (2, 4))[trial % 3]
    return instance(devices, layers=L, bits=bits, batch=4, generated=int(rng.integers(1, 64)), sizes=sizes,
                    omega=omega, budget=budget, intra=float(rng.choice([16e9, 300e9])), network=12.5e9,
                    tied=bool(trial % 2))


def test_matches_brute_force_on_small_instances():
    rng = np.random.default_rng(0)
    solved = infeasible = per_layer = 0
    for trial in range(24):
        inst = random_instance(rng, trial)
        expected = brute_force(inst)
        try:
            solution = solve_partition(inst, time_limit_s=5)
        except InfeasiblePartition:
            assert expected is None, f"trial {trial}: brute force found a plan"
            infeasible += 1
            continue
        except WorkloadDoesNotFit:
            assert expected is None, f"trial {trial}: brute force found a plan"
            infeasible += 1
            continue
        assert expected is not None, f"trial {trial}: the solver returned a plan that cannot exist"
        assert_valid(solution, inst)
        assert solution.status == "OPTIMAL", (trial, solution.search)
        assert solution.evaluation.latency_s == pytest.approx(expected, rel=1e-5), trial
        per_layer += not inst.identical_layers
        solved += 1
    assert solved >= 12 and infeasible >= 2 and per_layer >= 3  # every branch exercised


def test_layers_of_different_shapes_match_brute_force():
    shapes = (SMOL, LayerShape.from_dims(576, 3072, 9, 3), SMOL, LayerShape.from_dims(576, 768, 9, 3), SMOL)
    devices = [gpu("n0/gpu0", 120, 65, 300), gpu("n0/gpu1", 120, 312, 2039)]
    inst = instance(devices, shapes=shapes, bits=(4, 8), sizes=(1, 2),
                    omega=tuple((1.0, 0.1) for _ in shapes), budget=3.5)
    solution = solve_partition(inst)
    assert solution.status == "OPTIMAL" and "per-layer" in solution.search
    assert solution.evaluation.latency_s == pytest.approx(brute_force(inst), rel=1e-5)


# ---------------------------------------------------------------------------------- cost model


def test_bytes_per_weight_counts_group_scales():
    assert bytes_per_weight(16, 128) == 2.0
    assert bytes_per_weight(4, 128) == pytest.approx(0.5 + 2 / 128)
    assert bytes_per_weight(4, 128, asymmetric=True) == pytest.approx(0.5 + 4 / 128)  # fp16 zero points
    assert bytes_per_weight(8, 64) == pytest.approx(1 + 2 / 64)
    # int3 codes are stored in 3 bits (the Int3Linear plugin), symmetric int2 in 4 (passes/export.py)
    assert bytes_per_weight(3, 128) == pytest.approx(3 / 8 + 2 / 128)
    assert bytes_per_weight(2, 64) == bytes_per_weight(4, 64)
    assert bytes_per_weight(2, 64, asymmetric=True) == pytest.approx(0.25 + 4 / 64)


def test_roofline_prefill_is_compute_bound_and_decode_memory_bound():
    h100 = gpu("n0/gpu0", 80_000, 990, 3350)
    w = Workload(batch=1, prompt_tokens=2048, generated_tokens=2)
    int4 = uniform_choice(SMOL, 4, 128)
    # Prefill: FLOPs (2 per weight per token, causal attention) at the fp16 rate, plus writing
    # the dequantized weights once.
    flops = 2 * SMOL.weight_params * 2048 + 2 * 2048 * 2049 * SMOL.attention_width
    assert layer_prefill_s(h100, SMOL, int4, 1, w) == pytest.approx(flops / 990e12 + SMOL.weight_params * 2 / 3350e9)
    # Decode: the packed weights and the K/V at the mean context over the bandwidth.
    context = 2048 + 1
    moved = int4.weight_bytes + SMOL.kv_bytes_per_token * context
    assert layer_decode_s(h100, SMOL, int4, 1, w) == pytest.approx(moved / 3350e9)
    assert int4.weight_bytes == pytest.approx(SMOL.weight_params * bytes_per_weight(4, 128))


def test_pipeline_time_counts_every_generated_token():
    # One GPU: the batch in 4 micro-batches runs them one after another, prefill and every token.
    prefill, decode = pipeline_seconds([1.0], 4, [0.1], 4, decode_steps=99)
    assert prefill == pytest.approx(4.0) and decode == pytest.approx(99 * 4 * 0.1)
    # LLM-PQ's (m - 1)(n - 1) x slowest would give 3 x 98 x 0.1 = 29.4 here, with one micro-batch
    # 0: the tokens drop out. Two stages, one micro-batch: each token crosses both.
    _, decode = pipeline_seconds([1.0, 1.0], 1, [0.1, 0.3], 1, decode_steps=10)
    assert decode == pytest.approx(10 * 0.4)
    # Many micro-batches: the slowest stage serves all of them each token.
    _, decode = pipeline_seconds([1.0, 1.0], 1, [0.1, 0.3], 8, decode_steps=10)
    assert decode == pytest.approx(10 * 8 * 0.3)


def test_profile_interpolates_and_replaces_the_roofline():
    points = (ProfilePoint(1, 256, 1e-3), ProfilePoint(4, 256, 2e-3), ProfilePoint(1, 512, 3e-3))
    profile = MeasuredProfile("p.yaml", ((("990TF", "prefill", 4), points),))
    assert profile.seconds("990TF", "prefill", 4, 2, 256) == pytest.approx(1e-3 + (2e-3 - 1e-3) / 3)
    assert profile.seconds("990TF", "prefill", 4, 8, 256) == pytest.approx(4e-3)  # proportional past the end
    assert profile.seconds("990TF", "prefill", 4, 1, 384) == pytest.approx(2e-3)
    assert profile.seconds("990TF", "decode", 4, 1, 256) is None
    device = gpu("n0/gpu0", 80_000, 990, 3350)
    w = Workload(2, 256, 8)
    assert layer_prefill_s(device, SMOL, uniform_choice(SMOL, 4), 2, w, profile) == pytest.approx(profile.seconds("990TF", "prefill", 4, 2, 256))
    assert layer_decode_s(device, SMOL, uniform_choice(SMOL, 4), 2, w, profile) == layer_decode_s(device, SMOL, uniform_choice(SMOL, 4), 2, w)


def test_a_profile_changes_the_plan():
    fast, slow = gpu("n0/gpu0", 400, 990, 3350), gpu("n0/gpu1", 400, 65, 300)
    roofline = solve_partition(instance([fast, slow], layers=8, generated=16))
    # Measured: the "slow" SKU runs a layer in half the fast one's roofline time, both phases.
    tables = cost_tables(instance([fast, slow], layers=8, generated=16))
    points = {}
    for phase, table, length in (("prefill", tables.prefill, 256), ("decode", tables.decode, 264)):
        per_sequence = table[0][0][0][0] / 2
        points[(slow.sku, phase, 4)] = tuple(ProfilePoint(size, length, per_sequence * size) for size in (1, 4))
    profile = MeasuredProfile("measured.yaml", tuple(sorted(points.items())))
    measured = solve_partition(instance([fast, slow], layers=8, generated=16, profile=profile))
    layers_on = lambda solution: sum(s.end - s.start for s in solution.evaluation.stages if s.device == 1)  # noqa: E731
    assert layers_on(measured) > layers_on(roofline)


# ---------------------------------------------------------------------------------- search


def test_reorders_devices_when_the_declared_order_does_not_fit():
    # The small first device cannot hold the embedding; the planner starts with the big one.
    small, big = gpu("n0/gpu0", 60, 312, 2039), gpu("n0/gpu1", 400, 312, 2039)
    inst = instance([small, big], layers=6)
    solution = solve_partition(inst)
    assert_valid(solution, inst)
    assert solution.assignment.order[0] == 1


def test_faster_device_gets_more_layers_and_beats_the_baselines():
    slow, fast = gpu("n0/gpu0", 400, 65, 300), gpu("n0/gpu1", 400, 990, 3350)
    inst = instance([slow, fast], layers=12, batch=8, sizes=(1, 2, 8))
    solution = solve_partition(inst)
    counts = {s.device: s.end - s.start for s in solution.evaluation.stages}
    assert counts[1] > counts.get(0, 0)
    for name, _, result in heuristic_plans(inst, cost_tables(inst)):
        assert result is not None and result[1].latency_s >= solution.evaluation.latency_s * (1 - 1e-9), name


def test_identical_devices_solve_fast_and_deterministically():
    devices = [gpu(f"n0/gpu{k}", 90, 125, 900) for k in range(4)] + [gpu(f"n1/gpu{k}", 120, 312, 2039) for k in range(4)]
    inst = instance(devices, layers=32, bits=(3, 4, 8, 16), batch=8, sizes=(1, 2, 4, 8),
                    omega=tuple(tuple((15 / (2**b - 1)) ** 2 for b in (3, 4, 8, 16)) for _ in range(32)), budget=32.0)
    first, second = solve_partition(inst), solve_partition(inst)
    assert first.assignment == second.assignment and first.status == "OPTIMAL"
    assert "count model" in first.search
    assert first.evaluation.quality_used <= 32.0 + 1e-6


def test_a_time_limit_keeps_the_incumbent_and_reports_the_gap():
    devices = [gpu(f"n0/gpu{k}", 300, (65, 125, 312)[k % 3], (300, 900, 2039)[k % 3]) for k in range(6)]
    omega = tuple(tuple(float(1 + l % 5) * (15 / (2**b - 1)) ** 2 for b in (3, 4, 8)) for l in range(24))
    inst = instance(devices, layers=24, bits=(3, 4, 8), batch=8, sizes=(1, 2, 4, 8), omega=omega,
                    budget=sum(row[1] for row in omega))
    solution = solve_partition(inst, time_limit_s=0.05)
    assert_valid(solution, inst)
    assert solution.status in ("OPTIMAL", "FEASIBLE")
    assert 0.0 <= solution.gap < 1.0
    assert solution.best_bound_s <= solution.evaluation.latency_s


# ---------------------------------------------------------------------------------- infeasible


def test_weights_that_do_not_fit_give_exit_3_with_the_shortfall():
    with pytest.raises(ModelDoesNotFit) as caught:
        solve_partition(instance([gpu("n0/gpu0", 40, 990, 3350), gpu("n0/gpu1", 20, 990, 3350)], layers=30))
    assert caught.value.exit_code == EXIT_INFEASIBLE
    assert caught.value.short_bytes > 0
    assert "short" in str(caught.value) and "MiB" in str(caught.value)


def test_a_quality_budget_too_small_gives_exit_3_with_the_budget_needed():
    # The weights fit with only a few layers above 4 bits; the budget allows two at 4 bits.
    omega = tuple((1.0, 0.1, 0.0) for _ in range(8))
    tight = instance([gpu("n0/gpu0", 78, 312, 2039)], layers=8, bits=(4, 8, 16), omega=omega, budget=2.0,
                     batch=1, prompt=16, generated=2)
    with pytest.raises(QualityBudgetTooSmall) as caught:
        solve_partition(tight)
    assert caught.value.exit_code == EXIT_INFEASIBLE
    assert caught.value.needed > 2.0 and "at least" in str(caught.value)
    # With room for the weights but not for the batch's KV cache within the budget: exit 4,
    # naming both ways out.
    with pytest.raises(WorkloadDoesNotFit) as caught:
        solve_partition(instance([gpu("n0/gpu0", 88, 312, 2039)], layers=8, bits=(4, 8, 16), omega=omega, budget=2.0))
    assert "at most batch" in str(caught.value) and "planner.quality_budget of at least" in str(caught.value)


def test_workload_that_does_not_fit_gives_exit_4_with_the_largest_batch():
    device = gpu("n0/gpu0", 200, 312, 2039)
    inst = instance([device], layers=8, batch=512, prompt=2048, generated=128)
    with pytest.raises(WorkloadDoesNotFit) as caught:
        solve_partition(inst)
    assert caught.value.exit_code == EXIT_OUT_OF_MEMORY
    best = caught.value.max_feasible_batch
    assert 1 <= best < 512 and f"at most batch {best}" in str(caught.value)
    assert best == max_feasible_batch(inst)
    solve_partition(instance([device], layers=8, batch=best, prompt=2048, generated=128))


def test_tied_embedding_is_stored_once_on_a_single_stage():
    inst = instance([gpu("n0/gpu0", 200, 312, 2039)], layers=4, tied=True)
    stage = solve_partition(inst).evaluation.stages[0]
    assert stage.memory.embedding == inst.table_bytes and stage.memory.lm_head == 0
