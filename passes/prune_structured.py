"""Structured pruning with FLaP (An et al., "Fluctuation-based Adaptive Structured Pruning for
Large Language Models", AAAI 2024): whole key/value groups of attention heads and whole MLP
channels go, so the layers get smaller, with the removed inputs' mean folded into a bias.

The math is pure functions on tensors; the rules, referred to by number:

1. Fluctuation score of input channel ``j`` of ``o_proj`` and of ``down_proj``:
   ``Var[x_j] * ||W_:,j||²`` over the calibration tokens, on the unpruned model (every layer's
   statistics come from one forward).
2. Scores are standardised per layer and module (zero mean, unit deviation over its channels), so
   one threshold can compare attention with MLP and layer with layer.
3. An attention unit is a key/value group: its query heads and their key and value head, so the
   query-to-key/value ratio of grouped-query attention holds in every layer. Its score is the mean
   of its ``o_proj`` channels' scores; an MLP unit is one channel (a row of gate_proj and up_proj,
   a column of down_proj).
4. One global threshold: units are taken in decreasing score until the kept units' weights
   reach ``(1 - ratio)`` of the total, each unit weighted by the weights it holds (a group of
   a 576-wide model's 3 heads of 64 holds 170x the weights of an MLP channel). The uniform
   baseline applies the same rule inside each layer instead.
5. Widths stay multiples of ``align`` (8, or 64) for tensor cores: each module's kept count is
   rounded to the nearest allowed one (MLP: multiples of ``align``; attention: group counts whose
   ``o_proj`` width is a multiple), at least one unit; within a module the best-scoring units stay.
6. Bias compensation: ``W[:, removed] @ mean(x[removed])`` (the calibration mean of the removed
   inputs times their removed weights) is added to ``o_proj`` / ``down_proj``'s bias, so the
   layer's output keeps its mean.
7. The pruned model is saved with its new shapes: the layer table (what the planner reads) and
   the checkpoint's config (``llmc.checkpoint.PRUNED_LAYERS_KEY``, per-layer heads, key/value
   heads and MLP width, what the loader rebuilds from) carry them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class ChannelMoments:
    """Mean and (unbiased) variance per input channel over every row added, summed in float64."""

    def __init__(self, columns: int, device=None):
        self.sum = torch.zeros(columns, dtype=torch.float64, device=device)
        self.squares = torch.zeros(columns, dtype=torch.float64, device=device)
        self.samples = 0

    def add(self, inputs: torch.Tensor) -> None:
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64)
        self.sum += rows.sum(dim=0)
        self.squares += rows.square().sum(dim=0)
        self.samples += rows.shape[0]

    def mean(self) -> torch.Tensor:
        if self.samples == 0:
            raise ValueError("ChannelMoments: no inputs were added")
        return (self.sum / self.samples).to(torch.float32)

    def variance(self) -> torch.Tensor:
        if self.samples < 2:
            raise ValueError("ChannelMoments: the variance needs at least two rows")
        mean = self.sum / self.samples
        return ((self.squares - self.samples * mean.square()) / (self.samples - 1)).clamp(min=0).to(torch.float32)


def fluctuation_scores(variance: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Rule 1: ``Var[x_j] * ||W_:,j||²`` for each input channel ``j`` of ``weight`` [out, in]."""
    if variance.shape != (weight.shape[1],):
        raise ValueError(f"fluctuation_scores: {tuple(variance.shape)} variances for {weight.shape[1]} inputs")
    return variance.to(torch.float32) * weight.detach().to(torch.float32).square().sum(dim=0)


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """Rule 2: zero mean and unit deviation (all zeros when the scores are all equal)."""
    centred = scores - scores.mean()
    deviation = scores.std() if scores.numel() > 1 else torch.zeros(())
    return centred / deviation if deviation > 0 else torch.zeros_like(scores)


@dataclass(frozen=True)
class PrunableModule:
    """The units of one layer's attention (key/value groups) or MLP (channels), as rules 3-5 see them."""

    layer: int
    kind: str  # "attention" or "mlp"
    scores: torch.Tensor  # [units], standardised
    unit_params: int  # weights one unit holds
    allowed: tuple[int, ...]  # kept counts rule 5 allows, ascending, the full count last

    @property
    def params(self) -> int:
        return self.unit_params * self.scores.numel()


def allowed_counts(units: int, unit_width: int, align: int) -> tuple[int, ...]:
    """Rule 5: kept counts whose width (``count x unit_width``) is a multiple of ``align``, at
    least one unit; the full count always (an unpruned width is what the model already has)."""
    counts = [c for c in range(1, units) if (c * unit_width) % align == 0]
    return tuple(counts) + (units,)


def keep_counts(modules: list[PrunableModule], ratio: float, global_threshold: bool = True) -> list[int]:
    """Rules 4 and 5: how many units each module keeps."""
    if not 0 <= ratio < 1:
        raise ValueError(f"keep_counts: ratio must be in [0, 1), got {ratio}")
    groups = [list(range(len(modules)))]
    if not global_threshold:
        layers = sorted({m.layer for m in modules})
        groups = [[k for k, m in enumerate(modules) if m.layer == layer] for layer in layers]
    counts = [0] * len(modules)
    for group in groups:
        scores = torch.cat([modules[k].scores for k in group])
        owner = torch.cat([torch.full((modules[k].scores.numel(),), k) for k in group])
        weights = torch.cat([torch.full((modules[k].scores.numel(),), float(modules[k].unit_params)) for k in group])
        order = torch.sort(scores, descending=True, stable=True).indices
        kept_weight = torch.cumsum(weights[order].double(), 0)
        target = (1 - ratio) * float(kept_weight[-1])
        # Rule 4: the prefix whose weights come closest to the target.
        keep = int(torch.argmin((kept_weight - target).abs())) + 1
        for k in owner[order[:keep]].tolist():
            counts[k] += 1
    # Rule 5: the nearest allowed count (ties keep more).
    return [min(m.allowed, key=lambda a: (abs(a - c), -a)) for m, c in zip(modules, counts)]


def kept_units(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (ascending) of the ``count`` best-scoring units."""
    return torch.sort(torch.sort(scores, descending=True, stable=True).indices[:count]).values


def compensation_bias(weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """Rule 6: ``W[:, removed] @ mean[removed]``, the output the removed inputs gave on average."""
    return weight.detach().to(torch.float32)[:, removed] @ mean.to(torch.float32)[removed]


def sliced_linear(linear: torch.nn.Linear, rows=None, columns=None, extra_bias=None) -> torch.nn.Linear:
    """A new linear holding ``linear``'s ``rows`` (outputs) and ``columns`` (inputs), ``extra_bias`` added."""
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight[rows]
    if columns is not None:
        weight = weight[:, columns]
    bias = linear.bias.detach() if linear.bias is not None else None
    if bias is not None and rows is not None:
        bias = bias[rows]
    if extra_bias is not None:
        bias = extra_bias.to(weight.dtype) if bias is None else bias + extra_bias.to(weight.dtype)
    result = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype,
                             device=weight.device)
    with torch.no_grad():
        result.weight.copy_(weight)
        if bias is not None:
            result.bias.copy_(bias)
    return result


# --------------------------------------------------------------------------- the pass

from llmc.errors import ConfigError  # noqa: E402
from llmc.ir import Program, Pruning  # noqa: E402
from llmc.pipeline import Pass, PassContext, PassResult  # noqa: E402
from llmc.pruning import PruningRules, selected  # noqa: E402

WINDOWS_PER_BATCH = 8


@dataclass(frozen=True)
class StructuredPrunePass(Pass):
    """Remove whole key/value groups and MLP channels (rules 1-7) down to ``ratio`` fewer weights
    in the targeted layers' linears. ``global_threshold=False`` is the uniform baseline: every
    layer loses the same share."""

    name = "prune-structured"
    ratio: float = 0.2
    targets: tuple[str, ...] = ("model.layers.*",)
    ignore: tuple[str, ...] = ("lm_head",)
    align: int = 8
    bias_compensation: bool = True
    global_threshold: bool = True
    square_attention: bool = False

    def requires(self, program: Program) -> None:
        if program.model is None:
            raise ValueError("prune-structured needs a model; run 'ingest' first")
        if program.calibration is None:
            raise ValueError("prune-structured needs calibration windows; run 'calibrate' first")
        if program.pruning is not None:
            raise ValueError(f"prune-structured: the model was already pruned by '{program.pruning.method}'")
        if program.quantized_weights is not None:
            raise ValueError("prune-structured prunes float weights; run it before the quantize passes")

    def ensures(self, program: Program) -> None:
        if program.pruning is None:
            raise ValueError("prune-structured recorded no pruning")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        from safetensors.torch import load_file

        from llmc.checkpoint import load_hf_model, save_pruned

        info = program.model
        chosen = set(selected([lin.name for layer in program.layers for lin in layer.linears],
                              PruningRules(targets=self.targets, ignore=self.ignore)))
        attention = [i for i in range(info.num_layers) if f"model.layers.{i}.self_attn.o_proj" in chosen]
        mlp = [i for i in range(info.num_layers) if f"model.layers.{i}.mlp.down_proj" in chosen]
        if not attention and not mlp:
            raise ConfigError("model.yaml", "pruning.targets", "structured pruning needs o_proj or down_proj "
                              "linears among the targets (e.g. 'model.layers.*')")
        ratio = info.num_heads // info.num_kv_heads
        group_width = ratio * info.head_dim  # o_proj inputs of one key/value group

        model = load_hf_model(ctx.path(info.checkpoint), info.dtype)
        layers = model.model.layers
        moments = {}
        hooks = []
        for i, kind in [(i, "attention") for i in attention] + [(i, "mlp") for i in mlp]:
            module = layers[i].self_attn.o_proj if kind == "attention" else layers[i].mlp.down_proj
            moments[i, kind] = ChannelMoments(module.in_features, device=module.weight.device)
            hooks.append(module.register_forward_pre_hook(lambda _, args, m=moments[i, kind]: m.add(args[0])))
        tokens = load_file(ctx.path(program.calibration.tokens_ref))["tokens"]
        try:
            with torch.no_grad():
                for ids in ctx.progress(list(tokens.split(WINDOWS_PER_BATCH)), "flap statistics"):
                    model.model(input_ids=ids, use_cache=False)  # rule 1: the unpruned model, no LM head
        finally:
            for hook in hooks:
                hook.remove()

        modules = []
        for (i, kind), stats in moments.items():
            attn, block = layers[i].self_attn, layers[i].mlp
            if kind == "attention":
                raw = fluctuation_scores(stats.variance(), attn.o_proj.weight)
                channels = standardize(raw.square() if self.square_attention else raw)
                scores = channels.reshape(-1, group_width).mean(dim=1)  # rule 3
                unit = (attn.q_proj.in_features * group_width + attn.o_proj.out_features * group_width
                        + 2 * attn.k_proj.in_features * info.head_dim)
                modules.append(PrunableModule(i, kind, scores, unit, allowed_counts(len(scores), group_width, self.align)))
            else:
                scores = standardize(fluctuation_scores(stats.variance(), block.down_proj.weight))
                unit = block.gate_proj.in_features + block.up_proj.in_features + block.down_proj.out_features
                modules.append(PrunableModule(i, kind, scores, unit, allowed_counts(len(scores), 1, self.align)))
        counts = keep_counts(modules, self.ratio, self.global_threshold)

        before = sum(m.params for m in modules)
        after = 0
        with torch.no_grad():
            for module, count in zip(modules, counts):
                keep = kept_units(module.scores, count)
                after += count * module.unit_params
                if count < module.scores.numel():
                    self._shrink(layers[module.layer], module.kind, keep, moments[module.layer, module.kind],
                                 ratio, info.head_dim, group_width)
        widths = [dict(heads=layer.self_attn.q_proj.out_features // info.head_dim,
                       kv_heads=layer.self_attn.k_proj.out_features // info.head_dim,
                       intermediate_size=layer.mlp.down_proj.in_features) for layer in layers]
        removed = 1 - after / before
        resized = sum(4 if m.kind == "attention" else 3 for m, c in zip(modules, counts) if c < m.scores.numel())
        record = Pruning("structured", info.checkpoint, resized, round(removed, 6))
        result = save_pruned(program, ctx, model, record, layers=widths)
        heads = sum(w["heads"] for w in widths)
        channels = sum(w["intermediate_size"] for w in widths)
        return PassResult(
            result,
            f"{'global' if self.global_threshold else 'uniform'} {self.ratio:.0%}: kept {heads} of "
            f"{info.num_heads * info.num_layers} heads, {channels} of {info.intermediate_size * info.num_layers} MLP "
            f"channels ({removed:.1%} of the targeted weights removed{', bias-compensated' if self.bias_compensation else ''})",
        )

    def _shrink(self, layer, kind, keep, moments, ratio, head_dim, group_width) -> None:
        """Rules 6 and 7 for one module: slice its linears to the kept units, fold in the bias."""
        if kind == "attention":
            attn = layer.self_attn
            kv_rows = (keep[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
            q_rows = (keep[:, None] * group_width + torch.arange(group_width)).reshape(-1)
            output, kept_inputs = attn.o_proj, q_rows
        else:
            block = layer.mlp
            output, kept_inputs = block.down_proj, keep
        removed = torch.ones(output.in_features, dtype=torch.bool)
        removed[kept_inputs] = False
        bias = compensation_bias(output.weight, moments.mean(), removed) if self.bias_compensation else None
        if kind == "attention":
            attn.q_proj = sliced_linear(attn.q_proj, rows=q_rows)
            attn.k_proj = sliced_linear(attn.k_proj, rows=kv_rows)
            attn.v_proj = sliced_linear(attn.v_proj, rows=kv_rows)
            attn.o_proj = sliced_linear(attn.o_proj, columns=q_rows, extra_bias=bias)
        else:
            block.gate_proj = sliced_linear(block.gate_proj, rows=keep)
            block.up_proj = sliced_linear(block.up_proj, rows=keep)
            block.down_proj = sliced_linear(block.down_proj, columns=keep, extra_bias=bias)
