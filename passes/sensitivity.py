"""`sensitivity`: how much quality each decoder layer, and each output feature, loses when quantized.

Computed on the calibration windows with the unquantized model; the indicators are pure
functions on tensors, the pass glue is below them. The rules are referred to by number.

1. Per linear and candidate bit-width ``b``, ``δ_b = W - Q_b(W)`` with ``Q_b`` round-to-nearest
   (:func:`~llmc.passes.quantize_rtn.rtn_quantize`) at ``b`` bits on the grid the linear would be stored at
   (:func:`llmc.schemes.at_width`: its configured group size and symmetry, but 8 bits symmetric with one
   scale per output channel, as the planner and the mixed-precision pass store them). RTN, not GPTQ: the
   indicators rank layers, they do not predict GPTQ's error.
   A width of 6 is FP6 e3m2 (:func:`~llmc.passes.fpx.fpx_quantize`, float16 scales per group,
   what the ``fpx`` quantizer stores), the one 6-bit format llmc has.
2. LLM-PQ's variance indicator (Zhao et al., "LLM-PQ", PPoPP 2024): rounding adds to each
   weight an error of variance ``s²/12`` (``s`` its group's step at ``b`` bits), so the output
   error variance, summed over the outputs, is ``Σ_o Σ_i s(o, i)² / 12 · Var[x_i]``. FP6's
   steps are not uniform, so at 6 bits the measured ``δ(o, i)²`` stands in for ``s²/12``.
3. Hessian indicator: ``tr(δ_b H δ_bᵀ)`` with GPTQ's ``H = 2XᵀX/N`` of the linear's inputs
   (:class:`~llmc.passes.quantize_gptq.HessianAccumulator`): twice the mean squared output error
   the rounding causes, with the inputs' correlations (rule 2 assumes independent inputs).
4. A layer's omega at ``b`` is the sum over its linears; a width of 16 (float) costs 0.
5. MixLLM's output-feature salience (Zheng et al., "MixLLM", 2024): with ``g`` the gradient of
   the mean calibration loss with respect to the weight and ``δ`` the error at the low width
   (4 bits), feature ``o`` scores ``|Σ_i ½(g(o, i) δ(o, i))² + g(o, i) δ(o, i)|``, the
   second-order Taylor estimate of the loss change (Fisher approximation of the Hessian).
   Scores are comparable across linears, so one global ranking picks the features kept at
   8 bits (passes/mixed_precision.py). A feature whose weights lie on the grid scores 0.
6. The per-layer statistics come block by block, each block fed the float outputs of the one
   before (a layer's sensitivity is that of the layer alone in the float model).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from llmc.passes.quantize_gptq import HessianAccumulator, full_float32_matmul, output_error
from llmc.passes.quantize_rtn import rtn_quantize
from llmc.schemes import FP6_BITS

INDICATORS = ("hessian-trace", "llm-pq-variance")


class InputStatistics:
    """Per input column of a linear: ``H = 2XᵀX/N`` (rule 3) and the mean, for Var[x] (rule 2)."""

    def __init__(self, columns: int, device=None):
        self.hessian_sum = HessianAccumulator(columns, device=device)
        self.column_sum = torch.zeros(columns, dtype=torch.float64, device=device)

    def add(self, inputs: torch.Tensor) -> None:
        self.hessian_sum.add(inputs)
        self.column_sum += inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64).sum(dim=0)

    def hessian(self) -> torch.Tensor:
        return self.hessian_sum.hessian()

    def variance(self) -> torch.Tensor:
        """Var[x_i] = E[x_i²] - E[x_i]², E[x_i²] being half of H's diagonal."""
        mean = self.column_sum / self.hessian_sum.samples
        square = torch.diag(self.hessian()).to(torch.float64) / 2
        return (square - mean**2).clamp(min=0).to(torch.float32)


def rounded(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """``Q_b(W)`` in float32 (rule 1): RTN on the linear's grid, FP6 e3m2 at 6 bits, ``W`` at 16."""
    from llmc.passes.fpx import FP6_E3M2, fpx_quantize

    w = weight.detach().to(torch.float32)
    if bits >= 16:
        return w
    if bits == FP6_BITS:
        return fpx_quantize(w, FP6_E3M2, group_size, scale_dtype=torch.float16).dequantize()
    return rtn_quantize(w, bits, group_size, symmetric).dequantize()


def quantization_error(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """``δ = W - Q_b(W)`` (rule 1); zero at 16 bits."""
    return weight.detach().to(torch.float32) - rounded(weight, bits, group_size, symmetric)


def variance_indicator(weight: torch.Tensor, input_variance: torch.Tensor, bits: int, group_size: int,
                       symmetric: bool) -> float:
    """LLM-PQ: ``Σ_o Σ_i s(o, i)² / 12 · Var[x_i]`` (rule 2); 0 at 16 bits."""
    if bits >= 16:
        return 0.0
    if bits == FP6_BITS:
        error = quantization_error(weight, bits, group_size, symmetric)
        return float((error.pow(2) @ input_variance.to(torch.float32)).sum())
    packed = rtn_quantize(weight.detach().to(torch.float32), bits, group_size, symmetric)
    groups = packed.scale.shape[1]
    variance_per_group = input_variance.to(torch.float32).reshape(groups, -1).sum(dim=1)  # [groups]
    return float((packed.scale.pow(2) @ variance_per_group).sum() / 12)


def hessian_indicator(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                      symmetric: bool) -> float:
    """``tr(δ H δᵀ)`` (rule 3); 0 at 16 bits."""
    if bits >= 16:
        return 0.0
    w = weight.detach().to(torch.float32)
    return output_error(w, w - quantization_error(w, bits, group_size, symmetric), hessian)


def feature_salience(weight: torch.Tensor, gradient: torch.Tensor, bits: int, group_size: int,
                     symmetric: bool) -> torch.Tensor:
    """MixLLM's salience of each output feature (row), ``[out]`` (rule 5)."""
    product = gradient.to(torch.float32) * quantization_error(weight, bits, group_size, symmetric)
    return (0.5 * product.pow(2) + product).sum(dim=1).abs()


# --------------------------------------------------------------------------- the pass

import logging  # noqa: E402
from pathlib import Path  # noqa: E402

from llmc.ir import LinearSensitivity, Program, Sensitivity  # noqa: E402
from llmc.pipeline import Pass, PassContext, PassResult  # noqa: E402
from llmc.schemes import QuantizationRules, at_width, effective_group, resolve_schemes  # noqa: E402

log = logging.getLogger("llmc.sensitivity")
WINDOWS_PER_BATCH = 8
SALIENCE_FILE = "salience.safetensors"


def collect_statistics(model, blocks: list[list[str]], batches, progress=None) -> dict[str, InputStatistics]:
    """Input statistics of the named linears of each block (rule 6); ``blocks[k]``: names in
    block k (full module names). Linears that share an input share one accumulator."""
    from llmc.passes.quantize_gptq import first_block_inputs, run_block

    stats: dict[str, InputStatistics] = {}
    modules = dict(model.named_modules())
    with torch.no_grad():
        hidden, kwargs = first_block_inputs(model, batches)
        indices = range(len(blocks))
        for index in (progress(indices) if progress else indices):
            block = model.model.layers[index]
            shared: dict[int, tuple] = {}
            handles = []
            for name in blocks[index]:
                module = modules[name]

                def hook(mod, args, name=name):
                    # q/k/v (gate/up) receive the same tensor; holding it keeps its id unique.
                    key = id(args[0])
                    if key not in shared:
                        shared[key] = (args[0], stats.get(name) or InputStatistics(mod.in_features, mod.weight.device))
                        shared[key][1].add(args[0])
                    stats[name] = shared[key][1]

                handles.append(module.register_forward_pre_hook(hook))
            try:
                outputs = []
                for h, kw in zip(hidden, kwargs):
                    shared.clear()
                    outputs.append(run_block(block, h, kw))
            finally:
                for handle in handles:
                    handle.remove()
            hidden = outputs
    return stats


def weight_gradients(model, names: list[str], batches) -> dict[str, torch.Tensor]:
    """Gradient of the mean next-token loss over ``batches`` with respect to each named weight."""
    from llmc.passes.evaluate import next_token_nll

    modules = dict(model.named_modules())
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [modules[n].weight for n in names]
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    tokens = sum(ids.shape[0] * (ids.shape[1] - 1) for ids in batches)
    try:
        with torch.enable_grad():
            for ids in batches:
                (next_token_nll(model, ids) / tokens).backward()
        return {n: w.grad.detach().clone() for n, w in zip(names, weights)}
    finally:
        for w in weights:
            w.grad = None
        for p, flag in saved.items():
            p.requires_grad_(flag)


@dataclass(frozen=True)
class SensitivityPass(Pass, QuantizationRules):
    """omega(layer, bits) for the planner and the mixed-precision policy, and MixLLM's salience.

    Options: the quantization rules (which linears, their grids), the ``candidates`` widths, which
    indicator becomes omega, and whether (and at which low width) to score output features.
    """

    name = "sensitivity"
    candidates: tuple[int, ...] = (3, 4, 8)  # the widths costed (16: float); the rules' `bits` is the default
    indicator: str = "hessian-trace"
    feature_bits: int | None = None  # MixLLM salience at this low width; None: no salience
    gradient_windows: int = 32

    def requires(self, program: Program) -> None:
        if program.model is None:
            raise ValueError("sensitivity needs a model; run 'ingest' first")
        if program.calibration is None:
            raise ValueError("sensitivity needs calibration windows; run 'calibrate' first")
        if self.indicator not in INDICATORS:
            raise ValueError(f"sensitivity: indicator must be one of {INDICATORS}, got {self.indicator!r}")

    def ensures(self, program: Program) -> None:
        if program.sensitivity is None or len(program.sensitivity.omega) != len(program.layers):
            raise ValueError("sensitivity produced no omega per layer")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        from safetensors.torch import load_file, save_file

        from llmc.checkpoint import load_model

        candidates = tuple(sorted(set(self.candidates)))
        rules = replace(self, method="rtn") if self.method == "none" else self
        names = [lin.name for layer in program.layers for lin in layer.linears]
        schemes = resolve_schemes(names, rules)
        shapes = {lin.name: lin for layer in program.layers for lin in layer.linears}

        def grid(name: str, bits: int) -> tuple[int, bool]:
            """(group size, symmetric) of ``name`` stored at ``bits`` (rule 1; 16: the configured grid, unused)."""
            stored = at_width(schemes[name], bits) or schemes[name]
            return effective_group(stored, shapes[name].in_features, name), stored.symmetric

        blocks = [[lin.name for lin in layer.linears if schemes[lin.name]] for layer in program.layers]

        model = load_model(program, ctx, quantized=False)
        modules = dict(model.named_modules())
        tokens = load_file(ctx.path(program.calibration.tokens_ref))["tokens"]
        batches = list(tokens.split(WINDOWS_PER_BATCH))
        stats = collect_statistics(model, blocks, batches,
                                   lambda items: ctx.progress(items, "sensitivity blocks", total=len(blocks)))
        per_linear = []
        with full_float32_matmul():
            for layer_names in blocks:
                for name in layer_names:
                    weight = modules[name].weight
                    statistics = stats.pop(name)
                    hessian, variance = statistics.hessian(), statistics.variance()
                    per_linear.append(LinearSensitivity(
                        module=name,
                        params=weight.numel(),
                        hessian_trace=tuple(hessian_indicator(weight, hessian, b, *grid(name, b)) for b in candidates),
                        variance=tuple(variance_indicator(weight, variance, b, *grid(name, b)) for b in candidates),
                    ))
        omega = layer_omega(per_linear, [layer.index for layer in program.layers], self.indicator, len(candidates))

        salience_ref = None
        if self.feature_bits is not None:
            wanted = [n for layer_names in blocks for n in layer_names]
            window_batches = list(tokens[: self.gradient_windows].split(WINDOWS_PER_BATCH))
            gradients = weight_gradients(model, wanted, window_batches)
            scores = {n: feature_salience(modules[n].weight, gradients[n], self.feature_bits,
                                          *grid(n, self.feature_bits)).contiguous() for n in wanted}
            save_file(scores, ctx.workdir / SALIENCE_FILE)
            salience_ref = ctx.ref(SALIENCE_FILE)

        sensitivity = Sensitivity(indicator=self.indicator, bits=candidates, omega=omega, linears=tuple(per_linear),
                                  salience=salience_ref, salience_bits=self.feature_bits)
        lowest = candidates[0]
        ranked = sorted(range(len(omega)), key=lambda l: -omega[l][0])[:3]
        return PassResult(
            replace(program, sensitivity=sensitivity),
            f"{self.indicator} omega for {len(omega)} layers at {list(candidates)} bits; most sensitive at "
            f"{lowest} bits: layers {ranked}" + (f"; salience of output features at {self.feature_bits} bits"
                                                 if salience_ref else ""),
        )


def layer_omega(per_linear, layer_indices: list[int], indicator: str, widths: int) -> tuple[tuple[float, ...], ...]:
    """Rule 4: per layer, the sum of its linears' indicator at each candidate width."""
    field = "hessian_trace" if indicator == "hessian-trace" else "variance"
    totals = {index: [0.0] * widths for index in layer_indices}
    for entry in per_linear:
        index = int(entry.module.split(".")[2])
        for k, value in enumerate(getattr(entry, field)):
            totals[index][k] += value
    return tuple(tuple(totals[index]) for index in layer_indices)


def load_salience(ctx_or_root, sensitivity: Sensitivity) -> dict[str, torch.Tensor]:
    """The per-feature salience the pass wrote, by module name."""
    from safetensors.torch import load_file

    root = ctx_or_root.cache_root if hasattr(ctx_or_root, "cache_root") else Path(ctx_or_root)
    return load_file(root / sensitivity.salience)
