"""`mixed-precision`: which width each linear, or each output feature, is stored at.

The policy runs between the `sensitivity` pass (its omega per layer and salience per output
feature) and the quantizers, which apply its choices over ``quantization``'s defaults. The rules
are referred to by number in the code.

1. Explicit overrides win: a linear that a ``quantization.overrides`` entry gives ``bits`` or
   ``method`` keeps what the override says and is left out of the search; its stored bits still
   count towards the average. A linear ``quantization`` keeps float is not a candidate.
2. Stored bits (what the average counts, per quantized weight): the codes at their own width (the
   export stores symmetric int2 in 4 bits; the plan counts that, ``costs.stored_bits``), one fp16 scale per
   group, an fp16 zero point per group when asymmetric (as the kernels store both), and for MixLLM one int32 index per
   high-precision row (:func:`stored_bits`). 8-bit choices are symmetric with one scale per output
   channel (TensorRT's int8 weight-only layout); 6 is FP6 e3m2 (method ``fpx``: sign-magnitude
   codes, float16 scales on the linear's groups, no zero point); 16 keeps the linear float.
3. Per layer (``granularity: layer``): a multiple-choice knapsack over the decoder layers, one
   width per layer for its free linears, solved with CP-SAT (:func:`solve_knapsack`): least
   sum of omega under the average-bits target; or, for a perplexity target, fewest bits under
   ``sum of predicted ΔNLL <= ln(1 + pct / 100)``. The prediction scales each width's omega by
   the calibration-loss increase measured with every free linear rounded (RTN; FP6 at 6) at that width,
   divided by the sum of omega at that width: an additive model, calibrated once per width.
4. Per output feature (``granularity: output-feature``, MixLLM): the features of all free
   linears ranked together by salience; the top fraction (or as many as the average-bits target
   pays for, in salience order) are stored at 8 bits per channel, the rest at ``quantization.bits``.
5. From the plan (``granularity: plan``): the planner's per-layer widths (``planner.bits`` with
   several values), applied to the free linears of each layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from llmc.passes.costs import stored_bits as code_width

INDEX_BITS = 32  # MixLLM: one int32 row index per high-precision output feature
HIGH_BITS = 8


def stored_bits(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool) -> int:
    """Bits stored for an [out, in] weight at ``bits`` in groups of ``group_size`` (-1: per channel), rule 2."""
    params = out_features * in_features
    if bits >= 16:
        return params * 16
    group = in_features if group_size == -1 else group_size
    groups = out_features * (in_features // group)
    # float16 scales, and zero points when asymmetric
    return params * code_width(bits, not symmetric) + groups * 16 * (1 if symmetric else 2)


def mixed_row_bits(out_features: int, in_features: int, low_bits: int, group_size: int, symmetric: bool,
                   high_rows: int, high_bits: int = HIGH_BITS) -> int:
    """Stored bits of a MixLLM linear: low rows, high rows per channel, their indices (rule 2)."""
    return (stored_bits(out_features - high_rows, in_features, low_bits, group_size, symmetric)
            + stored_bits(high_rows, in_features, high_bits, -1, True) + high_rows * INDEX_BITS)


class KnapsackInfeasible(ValueError):
    """No choice per group satisfies the limit; ``least`` is the smallest total the limit would need."""

    def __init__(self, message: str, least: float):
        self.least = least
        super().__init__(message)


def solve_knapsack(values: list[list[float]], costs: list[list[int]], *, max_cost: int | None = None,
                   max_value: float | None = None, time_limit_s: float = 10.0, seed: int = 0) -> list[int]:
    """One choice per group (rule 3). With ``max_cost``: least total value under it. With
    ``max_value``: least total cost under it. Returns the chosen index per group."""
    from ortools.sat.python import cp_model

    if (max_cost is None) == (max_value is None):
        raise ValueError("solve_knapsack: give exactly one of max_cost and max_value")
    top = max((v for row in values for v in row), default=0.0)
    scale = 1e7 / top if top > 0 else 1.0
    # Values become integers: rounded down in the objective, up in a value limit (never optimistic).
    as_int = [[int(math.ceil(v * scale)) for v in row] for row in values]
    model = cp_model.CpModel()
    pick = [[model.NewBoolVar(f"x{g}_{k}") for k in range(len(row))] for g, row in enumerate(values)]
    for row in pick:
        model.AddExactlyOne(row)
    total_cost = sum(c * x for row_c, row_x in zip(costs, pick) for c, x in zip(row_c, row_x))
    total_value = sum(v * x for row_v, row_x in zip(as_int, pick) for v, x in zip(row_v, row_x))
    if max_cost is not None:
        least = sum(min(row) for row in costs)
        if least > max_cost:
            raise KnapsackInfeasible(f"the cheapest choices need {least} bits, the limit is {max_cost}", least)
        model.Add(total_cost <= max_cost)
        model.Minimize(total_value)
    else:
        least_value = sum(min(row) for row in values)
        limit = int(math.floor(max_value * scale))
        if sum(min(row) for row in as_int) > limit:
            raise KnapsackInfeasible(f"the least total value is {least_value:.4g}, the limit is {max_value:.4g}",
                                     least_value)
        model.Add(total_value <= limit)
        model.Minimize(total_cost)
    solver = cp_model.CpSolver()
    # Deterministic time, as the planner's: a limit that is hit stops at the same point on any machine,
    # so the widths, and the build's bytes, do not depend on its speed. Wall time only as a backstop.
    solver.parameters.max_deterministic_time = time_limit_s
    solver.parameters.max_time_in_seconds = 10 * time_limit_s + 10
    solver.parameters.random_seed = seed
    solver.parameters.num_workers = 1
    status = solver.Solve(model)
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return [next(k for k, x in enumerate(row) if solver.Value(x)) for row in pick]
    if status == cp_model.INFEASIBLE:
        raise KnapsackInfeasible("no choice per group fits the limit", float("nan"))
    raise RuntimeError(f"CP-SAT stopped without a solution ({solver.StatusName(status)}) in {time_limit_s} s")


def select_high_rows(salience: dict[str, torch.Tensor], *, fraction: float | None = None,
                     row_extra_bits: dict[str, int] | None = None, extra_budget: int | None = None
                     ) -> dict[str, torch.Tensor]:
    """Rule 4: the output features kept at high bits, ranked globally by salience, as ascending
    int32 row indices per module (modules without any are left out). ``fraction`` of all
    features, or as many as ``extra_budget`` bits pay for in salience order (``row_extra_bits``:
    what moving one row of a module to high bits adds). Ties go to the earlier module and row."""
    names = list(salience)
    scores = torch.cat([salience[n].to(torch.float64).flatten() for n in names])
    owner = torch.cat([torch.full((salience[n].numel(),), i, dtype=torch.int64) for i, n in enumerate(names)])
    row = torch.cat([torch.arange(salience[n].numel()) for n in names])
    order = torch.argsort(-scores, stable=True)
    if fraction is not None:
        count = int(round(fraction * scores.numel()))
    else:
        extra = torch.tensor([row_extra_bits[n] for n in names], dtype=torch.int64)[owner[order]]
        count = int((torch.cumsum(extra, 0) <= extra_budget).sum())
    chosen = order[:count]
    picked = {}
    for i, name in enumerate(names):
        rows = row[chosen[owner[chosen] == i]]
        if rows.numel():
            picked[name] = torch.sort(rows).values.to(torch.int32)
    return picked


def apply_precision(schemes: dict, precision) -> dict:
    """``schemes`` (llmc.schemes.resolve_schemes) with the policy's widths, stored as
    :func:`llmc.schemes.at_width` says (16 float, 6 FP6 with method ``fpx``; rule 2)."""
    if precision is None:
        return schemes
    result = dict(schemes)
    for choice in precision.modules:
        scheme = result.get(choice.module)
        if scheme is None:
            continue
        stored = at_width(scheme, choice.bits)
        result[choice.module] = None if stored is None else replace(
            stored, group_size=choice.group_size, symmetric=choice.symmetric)
    return result


def high_rows_by_module(ctx, precision) -> dict[str, torch.Tensor]:
    """MixLLM's high rows per module, from the policy's file (empty without one)."""
    if precision is None or precision.rows is None:
        return {}
    from safetensors.torch import load_file

    return load_file(ctx.path(precision.rows))


def quantize_rows(weight: torch.Tensor, high_rows: torch.Tensor, quantize_low, high_bits: int = HIGH_BITS):
    """A :class:`~llmc.packed.MixedRowLinear`: ``quantize_low`` (rows -> PackedLinear) on the other
    rows, RTN per channel, symmetric, at ``high_bits`` on ``high_rows``."""
    from llmc.packed import MixedRowLinear, other_rows
    from llmc.passes.quantize_rtn import rtn_quantize

    w = weight.detach().to(torch.float32)
    high = rtn_quantize(w[high_rows.long()], high_bits, None, True)
    return MixedRowLinear(low=quantize_low(w[other_rows(w.shape[0], high_rows)]), high=high,
                          high_rows=high_rows.to(torch.int32))


# --------------------------------------------------------------------------- the pass

from fnmatch import fnmatchcase  # noqa: E402

from llmc.errors import ConfigError  # noqa: E402
from llmc.ir import MixedPrecision, PrecisionChoice, Program  # noqa: E402
from llmc.pipeline import Pass, PassContext, PassResult  # noqa: E402
from llmc.schemes import QuantizationRules, at_width, effective_group, resolve_schemes  # noqa: E402

GRANULARITIES = ("layer", "output-feature", "plan")


def pinned_by_override(name: str, rules: QuantizationRules) -> bool:
    """Rule 1: the first override matching ``name`` sets its width or method."""
    override = next((o for o in rules.overrides if fnmatchcase(name, o.match)), None)
    return override is not None and (override.bits is not None or override.method is not None)


def calibration_nll(model, batches) -> float:
    """Mean next-token NLL over ``batches`` of token ids."""
    from llmc.passes.evaluate import next_token_nll

    with torch.no_grad():
        total = sum(float(next_token_nll(model, ids)) for ids in batches)
    return total / sum(ids[:, 1:].numel() for ids in batches)


@dataclass(frozen=True)
class MixedPrecisionPass(Pass, QuantizationRules):
    """Choose per-layer widths (knapsack), MixLLM's 8-bit output features, or take the plan's widths."""

    name = "mixed-precision"
    granularity: str = "layer"
    candidates: tuple[int, ...] = (3, 4, 8)
    average_bits: float | None = None
    max_perplexity_increase_pct: float | None = None
    high_fraction: float | None = None
    indicator: str | None = None  # which per-layer indicator to spend the budget on; None: the table's omega
    time_limit_s: float = 10.0

    def requires(self, program: Program) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"mixed-precision: granularity must be one of {GRANULARITIES}")
        if self.granularity == "plan" and program.plan is None:
            raise ValueError("mixed-precision from the plan needs a plan; run 'plan' first")
        if self.granularity != "plan" and program.sensitivity is None:
            raise ValueError("mixed-precision needs the sensitivity table; run 'sensitivity' first")
        if self.granularity == "output-feature" and program.sensitivity.salience is None:
            raise ValueError("MixLLM mixes need output-feature salience; run 'sensitivity' with feature_bits")

    def ensures(self, program: Program) -> None:
        if program.precision is None:
            raise ValueError("mixed-precision chose nothing")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        linears = {lin.name: lin for layer in program.layers for lin in layer.linears}
        schemes = resolve_schemes(list(linears), self)
        quantized = {n: s for n, s in schemes.items() if s is not None}
        free = [n for n in quantized if not pinned_by_override(n, self)]
        groups = {n: effective_group(s, linears[n].in_features, n) for n, s in quantized.items()}
        params = sum(linears[n].in_features * linears[n].out_features for n in quantized)
        fixed = sum(stored_bits(linears[n].out_features, linears[n].in_features, s.bits, groups[n], s.symmetric)
                    for n, s in quantized.items() if n not in free)

        def choice(name: str, bits: int, high_rows: int = 0) -> PrecisionChoice:
            scheme = at_width(quantized[name], bits)
            if scheme is None:
                return PrecisionChoice(name, bits, -1, True, high_rows)
            return PrecisionChoice(name, bits, scheme.group_size, scheme.symmetric, high_rows)

        def bits_of(c: PrecisionChoice) -> int:
            lin = linears[c.module]
            group = groups[c.module] if c.group_size != -1 else -1
            if c.high_rows:
                return mixed_row_bits(lin.out_features, lin.in_features, c.bits, group, c.symmetric, c.high_rows)
            return stored_bits(lin.out_features, lin.in_features, c.bits, group, c.symmetric)

        rows_ref = None
        if self.granularity == "plan":
            bits_of_layer = {layer.index: program.plan.layer_bits[k] for k, layer in enumerate(program.layers)}
            choices = [choice(n, bits_of_layer[int(n.split(".")[2])]) for n in free]
            policy = f"the plan's per-layer widths ({program.plan.quality_indicator})"
        elif self.granularity == "layer":
            choices, policy = self._layers(program, ctx, linears, free, choice, bits_of, params, fixed)
        else:
            from llmc.passes.sensitivity import load_salience

            salience = {n: v for n, v in load_salience(ctx, program.sensitivity).items() if n in free}
            extra = {n: bits_of(choice(n, quantized[n].bits, 1)) - bits_of(choice(n, quantized[n].bits))
                     for n in salience}
            if self.high_fraction is not None:
                rows = select_high_rows(salience, fraction=self.high_fraction)
                target = f"{self.high_fraction:.0%} of the output features"
            else:
                base = fixed + sum(bits_of(choice(n, quantized[n].bits)) for n in free)
                budget = int(self.average_bits * params) - base
                if budget < 0:
                    raise ConfigError("model.yaml", "quantization.mixed_precision.average_bits",
                                      f"{self.average_bits} is below the {base / params:.3f} bits per weight that "
                                      f"quantization.bits alone stores; raise it or lower quantization.bits")
                rows = select_high_rows(salience, row_extra_bits=extra, extra_budget=budget)
                target = f"average {self.average_bits} bits"
            choices = [choice(n, quantized[n].bits, int(rows[n].numel()) if n in rows else 0) for n in free]
            if rows:
                from safetensors.torch import save_file

                save_file({n: r.contiguous() for n, r in rows.items()}, ctx.workdir / "high_rows.safetensors")
                rows_ref = ctx.ref("high_rows.safetensors")
            high = sum(int(r.numel()) for r in rows.values())
            total = sum(linears[n].out_features for n in salience)
            policy = (f"MixLLM: {high} of {total} output features ({high / max(total, 1):.1%}) at {HIGH_BITS} bits by "
                      f"global salience ({target})")
        average = (fixed + sum(bits_of(c) for c in choices)) / params if params else 0.0
        precision = MixedPrecision(policy=policy, modules=tuple(choices), average_bits=round(average, 4),
                                   high_bits=HIGH_BITS if rows_ref else None, rows=rows_ref)
        widths = {}
        for c in choices:
            widths[c.bits] = widths.get(c.bits, 0) + 1
        return PassResult(
            replace(program, precision=precision),
            f"{policy}; {average:.3f} bits per weight; linears per width "
            + ", ".join(f"{b}: {k}" for b, k in sorted(widths.items())),
        )

    def _layers(self, program, ctx, linears, free, choice, bits_of, params, fixed):
        from llmc.passes.sensitivity import layer_omega

        s = program.sensitivity
        indicator = self.indicator or s.indicator
        by_module = {entry.module: entry for entry in s.linears}
        missing = [b for b in self.candidates if b not in s.bits]
        if missing:
            raise ValueError(f"mixed-precision: the sensitivity pass costed {list(s.bits)} bits, not {missing}")
        layers: dict[int, list[str]] = {}
        for n in free:
            layers.setdefault(int(n.split(".")[2]), []).append(n)
        order = sorted(layers)
        widths = sorted(self.candidates)
        omega = layer_omega([by_module[n] for n in free], order, indicator, len(s.bits))  # free linears only
        values = [[row[s.bits.index(b)] for b in widths] for row in omega]
        costs = [[sum(bits_of(choice(n, b)) for n in layers[l]) for b in widths] for l in order]
        if self.average_bits is not None:
            limit = int(self.average_bits * params) - fixed
            try:
                picks = solve_knapsack(values, costs, max_cost=limit, time_limit_s=self.time_limit_s, seed=ctx.seed)
            except ValueError as e:
                least = (getattr(e, "least", 0) + fixed) / params
                raise ConfigError("model.yaml", "quantization.mixed_precision.average_bits",
                                  f"{self.average_bits} is below the {least:.3f} bits per weight that the narrowest "
                                  f"candidate ({widths[0]} bits) stores; raise it or add a narrower width to bits") from None
            target = f"average {self.average_bits} bits"
        else:
            predicted = self._predicted_nll(program, ctx, layers, order, widths, values)
            limit = math.log1p(self.max_perplexity_increase_pct / 100)
            try:
                picks = solve_knapsack(predicted, costs, max_value=limit, time_limit_s=self.time_limit_s, seed=ctx.seed)
            except ValueError:
                raise ConfigError("model.yaml", "quantization.mixed_precision.max_perplexity_increase_pct",
                                  f"{self.max_perplexity_increase_pct}% is below what the widest candidate "
                                  f"({widths[-1]} bits) is predicted to cost; raise it or add 16 to bits") from None
            values = predicted
            target = f"predicted perplexity increase <= {self.max_perplexity_increase_pct}%"
        chosen = {l: widths[k] for l, k in zip(order, picks)}
        used = sum(values[i][k] for i, k in enumerate(picks))
        policy = (f"per-layer knapsack on {indicator} over {widths} bits ({target}; sum of "
                  f"{'predicted ΔNLL' if self.average_bits is None else 'omega'} {used:.4g})")
        return [choice(n, chosen[int(n.split('.')[2])]) for n in free], policy

    def _predicted_nll(self, program, ctx, layers, order, widths, values):
        """Rule 3: omega scaled, per width, to the calibration-loss increase measured at that width."""
        from safetensors.torch import load_file

        from llmc.checkpoint import load_model
        from llmc.passes.sensitivity import rounded

        model = load_model(program, ctx, quantized=False)
        modules = dict(model.named_modules())
        tokens = load_file(ctx.path(program.calibration.tokens_ref))["tokens"]
        batches = list(tokens.split(8))
        reference = calibration_nll(model, batches)
        names = [n for l in order for n in layers[l]]
        saved = {n: modules[n].weight.detach().clone() for n in names}
        schemes = resolve_schemes(list(saved), self)
        scales = []
        for k, b in enumerate(widths):
            if b >= 16:  # float: no increase
                scales.append(0.0)
                continue
            try:
                with torch.no_grad():
                    for n in names:
                        stored = at_width(schemes[n], b)
                        modules[n].weight.copy_(rounded(saved[n], b, stored.group_size, stored.symmetric)
                                                .to(saved[n].dtype))
                increase = max(calibration_nll(model, batches) - reference, 0.0)
            finally:  # the model may be shared with later passes: put the float weights back
                with torch.no_grad():
                    for n in names:
                        modules[n].weight.copy_(saved[n])
            total = sum(row[k] for row in values)
            scales.append(increase / total if total > 0 else 0.0)
        return [[row[k] * scales[k] for k in range(len(widths))] for row in values]
