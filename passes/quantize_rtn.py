"""Round-to-nearest (RTN) weight quantization: group-wise integer codes for one linear weight.

The math is a pure function on tensors, :func:`rtn_quantize`, so it can be tested on a bare
weight; its result is a :class:`~llmc.packed.PackedLinear`, whose ``dequantize()`` is the one
way to get the fake-quantized weight back.

Grid rules (the numbers refer to the code below):

1. Groups run along the input dimension: ``group_size`` consecutive input columns of one output
   row share a scale (and a zero point when asymmetric). ``None`` or ``-1`` means one group per
   output row (per channel).
2. Symmetric: ``scale = absmax / (2^(b-1) - 1)``, codes ``round(w / scale)``. The codes then lie
   in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, a subset of the signed range ``[-2^(b-1), 2^(b-1) - 1]``
   that TensorRT's int4/int8 weight-only kernels read with zero point 0. Dividing by
   ``2^(b-1)`` instead would use code ``-2^(b-1)`` but clip the group's largest positive value;
   we give up that one code so that no weight is ever clipped and the grid is symmetric.
3. Asymmetric: the group's range is widened to include 0, then ``scale = (max - min) / (2^b - 1)``
   and ``zero = round(-min / scale)``, codes ``round(w / scale) + zero`` in ``[0, 2^b - 1]``.
   Including 0 keeps ``zero`` inside ``[0, 2^b - 1]`` without clamping (an all-positive group
   would otherwise need a negative zero point) and dequantizes a zero weight to exactly 0.
4. A group whose scale is 0 (all zeros, or so small that the division underflows) gets scale 1:
   its codes are all the zero point and it dequantizes to exact zeros, with no division by 0.
5. Every error is at most ``scale / 2`` per element: codes are clamped to the range only to
   absorb float rounding at the group's extremes, never to clip.
6. Scales are float16 values (:func:`float16_scale`): the scale of rules 2-3 raised to the nearest
   float16 at or above it (and to at least float16's smallest normal number), because llmc's
   kernels and plugins read float16 scales: what the ``evaluate`` pass and the export's check
   measure is then what the deployment computes. Raising a scale keeps every code in its range.
"""

from __future__ import annotations

import torch

from llmc.packed import PackedLinear

SUPPORTED_BITS = (2, 3, 4, 8)


def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool
) -> PackedLinear:
    """Quantize ``weight`` [out, in] to ``bits``-bit codes by rounding to the nearest grid point.

    Computes in float32 whatever the weight's dtype. Raises ``ValueError`` for a weight that is
    not 2-D or not finite, for ``bits`` outside 2, 3, 4, 8, for a ``group_size`` that does not
    divide the input dimension, and for 8-bit asymmetric (see below).

    8-bit asymmetric codes run to 255, which does not fit the int8 ``q`` that
    :class:`PackedLinear` holds; use ``symmetric=True`` at 8 bits.
    """
    if weight.dim() != 2:
        raise ValueError(
            f"rtn_quantize: weight must be 2-D [out, in], got shape {tuple(weight.shape)}"
        )
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"rtn_quantize: bits must be one of {SUPPORTED_BITS}, got {bits}")
    if bits == 8 and not symmetric:
        raise ValueError(
            "rtn_quantize: 8-bit asymmetric codes (0..255) do not fit PackedLinear's int8 codes; "
            "use symmetric=True at 8 bits"
        )
    out_features, in_features = weight.shape
    group_size = _resolve_group_size(group_size, in_features)
    if not torch.isfinite(weight).all():
        raise ValueError(
            "rtn_quantize: weight holds inf or NaN; fix the checkpoint before quantizing"
        )

    # Rule 1: [out, groups, group_size], so each group reduces over the last dimension.
    groups = in_features // group_size
    w = weight.detach().to(torch.float32).reshape(out_features, groups, group_size)

    if symmetric:
        # Rule 2.
        qmax = 2 ** (bits - 1) - 1
        scale = float16_scale(_nonzero_scale(w.abs().amax(dim=-1) / qmax))
        q = torch.round(w / scale[..., None]).clamp(-qmax, qmax)
        zero = None
    else:
        # Rule 3.
        qmax = 2**bits - 1
        low = w.amin(dim=-1).clamp(max=0.0)
        high = w.amax(dim=-1).clamp(min=0.0)
        scale = float16_scale(_nonzero_scale((high - low) / qmax))
        zero = torch.round(-low / scale).clamp(0, qmax)
        q = (torch.round(w / scale[..., None]) + zero[..., None]).clamp(0, qmax)
        zero = zero.to(torch.int8)

    return PackedLinear(
        q=q.reshape(out_features, in_features).to(torch.int8),
        scale=scale,
        zero=zero,
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
    )


def _resolve_group_size(group_size: int | None, in_features: int) -> int:
    if group_size is None or group_size == -1:
        return in_features
    if group_size <= 0 or in_features % group_size != 0:
        raise ValueError(
            f"rtn_quantize: group_size {group_size} does not divide the input dimension "
            f"{in_features}; use a divisor of {in_features}, or -1 for one group per output channel"
        )
    return group_size


def _nonzero_scale(scale: torch.Tensor) -> torch.Tensor:
    # Rule 4.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


# --------------------------------------------------------------------------- the pass

from dataclasses import dataclass  # noqa: E402

from llmc.ir import Program, QuantDecision  # noqa: E402
from llmc.pipeline import Pass, PassContext, PassResult  # noqa: E402
from llmc.schemes import QuantizationRules, describe, effective_group, resolve_schemes  # noqa: E402


@dataclass(frozen=True)
class RtnQuantizePass(Pass, QuantizationRules):
    """Quantize the linears whose scheme (:func:`llmc.schemes.resolve_schemes`) is 'rtn'.

    The options are the quantization rules; linears resolved to another method are left to
    that method's pass (see ``build_pipeline``), whose decisions this pass keeps.
    """

    name = "quantize-rtn"

    def requires(self, program: Program) -> None:
        if program.model is None:
            raise ValueError("quantize-rtn needs a model; run 'ingest' first")

    def ensures(self, program: Program) -> None:
        if program.quantized_weights is None:
            raise ValueError("quantize-rtn wrote no packed weights")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        from llmc.checkpoint import load_model, save_quantized
        from llmc.passes.mixed_precision import apply_precision, high_rows_by_module, quantize_rows

        linears = [lin for layer in program.layers for lin in layer.linears]
        # The mixed-precision policy's widths (and MixLLM's 8-bit rows) over the rules' defaults.
        schemes = apply_precision(resolve_schemes([lin.name for lin in linears], self), program.precision)
        high_rows = high_rows_by_module(ctx, program.precision)
        targets = [(lin, schemes[lin.name]) for lin in linears if schemes[lin.name] and schemes[lin.name].method == "rtn"]
        groups = {lin.name: effective_group(scheme, lin.in_features, lin.name) for lin, scheme in targets}
        model = load_model(program, ctx, quantized=False)
        modules = dict(model.named_modules())
        packed, decisions = {}, []
        error = norm = 0.0
        for lin, scheme in ctx.progress(targets, "rtn", total=len(targets)):
            weight = modules[lin.name].weight.detach().float()

            def quantize(w, scheme=scheme, group=groups[lin.name]):
                return rtn_quantize(w, scheme.bits, group, scheme.symmetric)

            rows = high_rows.get(lin.name)
            packed[lin.name] = quantize(weight) if rows is None else quantize_rows(weight, rows, quantize)
            error += (packed[lin.name].dequantize() - weight).pow(2).sum().item()
            norm += weight.pow(2).sum().item()
            decisions.append(QuantDecision(lin.name, "rtn", scheme.bits, groups[lin.name], scheme.symmetric,
                                           0 if rows is None else int(rows.numel())))
        relative = (error / norm) ** 0.5 if norm else 0.0
        return PassResult(
            save_quantized(program, ctx, packed, decisions),
            f"{len(decisions)} linears {describe(s for _, s in targets)}, relative weight error {relative:.4f}",
        )


def float16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Rule 6: positive float32 ``scale`` raised to the nearest float16 at or above it, and to at least
    float16's smallest normal number, returned as float32. Raises ``ValueError`` past float16's range."""
    info = torch.finfo(torch.float16)
    if bool((scale > info.max).any()):
        raise ValueError(f"a group's scale {float(scale.max()):.3g} exceeds float16's range (the kernels' scale type); "
                         "the weight is too large to quantize")
    wanted = scale.clamp(min=info.smallest_normal)
    half = wanted.to(torch.float16)
    raised = (half.view(torch.int16) + 1).view(torch.float16)  # the next float16 up (positive values)
    return torch.where(half.float() < wanted, raised, half).float()
