"""Low-bit floating-point weights (FP6 e3m2 and its neighbours): codecs, quantizer and the pass.

The math is pure functions on tensors: :func:`fpx_encode` / :func:`fpx_decode` for the codes,
:func:`fpx_quantize` for a whole linear weight (scales plus codes, as a :class:`FpxLinear`).
The pass, :class:`FpxQuantizePass`, applies them to a model's linears.

Codec rules (the numbers are referred to below):

1. A code is ``sign | exponent | mantissa`` with ``E`` exponent and ``M`` mantissa bits, the
   sign in the top bit. Exponent field 0 is subnormal: ``(-1)^s * 2^(1 - bias) * m / 2^M``;
   otherwise ``(-1)^s * 2^(e - bias) * (1 + m / 2^M)``. FP6 and FP4 (the OCP MX element types)
   spend every code on a finite value: no infinities, no NaN. e4m3 is ``torch.float8_e4m3fn``:
   magnitude code 0x7F is NaN, everything else is finite.
2. Encoding rounds to the nearest representable value, ties to the even code (the one whose
   mantissa's last bit is 0), subnormals included: ``x / quantum`` is exact in float32 because
   the quantum is a power of two, and ``torch.round`` rounds half to even.
3. Magnitudes past the largest finite value saturate to it (no overflow to inf or NaN), which is
   what a weight quantizer wants. Within the range, e4m3 codes equal ``torch.float8_e4m3fn``'s
   (tested); past it, torch's cast has varied between versions (NaN, or saturation).
4. The sign of zero is kept (-0.0 encodes to the code with only the sign bit set); NaN input is
   refused, since no FP6/FP4 code can hold it.

Scales (rule 5): each output channel (or each group of ``group_size`` input columns of it) gets
``scale = absmax / max_normal``, so the largest weight maps to the largest code and nothing
saturates; an all-zero group gets scale 1 and codes 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FpFormat:
    """A sign-exponent-mantissa format of ``1 + exponent_bits + mantissa_bits`` bits (rule 1)."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    nan_magnitude: int | None = None  # the magnitude code that is NaN (e4m3fn: 0x7F)

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def max_magnitude_code(self) -> int:
        """The largest magnitude code that is a finite number."""
        top = (1 << (self.exponent_bits + self.mantissa_bits)) - 1
        return top - 1 if self.nan_magnitude == top else top

    @property
    def max_normal(self) -> float:
        return float(magnitude_table(self)[self.max_magnitude_code])

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (1 - self.bias - self.mantissa_bits)


FP6_E3M2 = FpFormat("e3m2", 3, 2, 3)
FP6_E2M3 = FpFormat("e2m3", 2, 3, 1)
FP4_E2M1 = FpFormat("e2m1", 2, 1, 1)
FP8_E4M3 = FpFormat("e4m3", 4, 3, 7, nan_magnitude=0x7F)
FORMATS = {f.name: f for f in (FP6_E3M2, FP6_E2M3, FP4_E2M1, FP8_E4M3)}


def format_of(exponent_bits: int, mantissa_bits: int) -> FpFormat | None:
    """The format with these field widths, None if llmc has none."""
    return next((f for f in FORMATS.values() if (f.exponent_bits, f.mantissa_bits) == (exponent_bits, mantissa_bits)),
                None)


def magnitude_table(fmt: FpFormat) -> torch.Tensor:
    """float32 value of every magnitude code (rule 1), NaN for a NaN code."""
    m_bits = fmt.mantissa_bits
    codes = torch.arange(1 << (fmt.exponent_bits + m_bits))
    exponent = codes >> m_bits
    mantissa = (codes & ((1 << m_bits) - 1)).double()
    normal = torch.exp2((exponent - fmt.bias).double()) * (1 + mantissa / (1 << m_bits))
    subnormal = 2.0 ** (1 - fmt.bias) * mantissa / (1 << m_bits)
    table = torch.where(exponent == 0, subnormal, normal).float()
    if fmt.nan_magnitude is not None:
        table[fmt.nan_magnitude] = float("nan")
    return table


def fpx_decode(codes: torch.Tensor, fmt: FpFormat) -> torch.Tensor:
    """float32 values of integer ``codes`` (any integer dtype, ``fmt.bits`` low bits used)."""
    codes = codes.long()
    magnitude_bits = fmt.bits - 1
    magnitude = magnitude_table(fmt).to(codes.device)[codes & ((1 << magnitude_bits) - 1)]
    negative = ((codes >> magnitude_bits) & 1).bool()
    return torch.where(negative, -magnitude, magnitude)


def fpx_encode(values: torch.Tensor, fmt: FpFormat) -> torch.Tensor:
    """uint8 codes of ``values``: round to nearest even (rule 2), saturating (rule 3)."""
    x = values.detach().to(torch.float32)
    if torch.isnan(x).any():
        raise ValueError(f"fpx_encode: NaN has no {fmt.name} code (rule 4)")
    m_bits = fmt.mantissa_bits
    magnitude = x.abs().clamp(max=fmt.max_normal)
    # Rule 2: the binade's exponent (frexp is exact), floored at the subnormal binade, whose
    # quantum 2^(e - M) is shared with the first normal binade.
    _, frexp_exponent = torch.frexp(magnitude)
    exponent = torch.clamp(frexp_exponent - 1, min=1 - fmt.bias)
    exponent = torch.where(magnitude > 0, exponent, 1 - fmt.bias)  # frexp(0) has exponent 0
    steps = torch.round(torch.ldexp(magnitude, m_bits - exponent))
    # Codes are monotonic in magnitude: binade offset times 2^M plus the step within it. A value
    # that rounds up to 2^(M+1) steps lands on the next binade's first code, as it should.
    code = ((exponent - (1 - fmt.bias)) << m_bits) + steps.to(torch.int32)
    code = code.clamp(max=fmt.max_magnitude_code)
    sign = torch.signbit(x).to(torch.int32) << (fmt.bits - 1)
    return (code | sign).to(torch.uint8)


# --------------------------------------------------------------------------- a quantized weight


@dataclass(frozen=True)
class FpxLinear:
    """FPx weights of a ``y = x @ W.T`` linear, ``W`` of shape [out, in].

    ``W[o, i] = scale[o, i // group_size] * decode(codes[o, i])``.

    - ``codes``: uint8 [out, in], one code per weight (packed to ``fmt.bits`` bits only in files
      and kernels, see :mod:`llmc.passes.bitplanes`).
    - ``scale``: float32 [out, in // group_size]; ``group_size == in`` is per output channel.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    fmt: FpFormat
    group_size: int

    symmetric = True  # sign-magnitude codes: no zero point (what export asks of every format)

    @property
    def bits(self) -> int:
        return self.fmt.bits

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] these codes stand for."""
        return fpx_decode(self.codes, self.fmt) * self.scale.repeat_interleave(self.group_size, dim=1)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat tensors for a safetensors file, the codes at ``fmt.bits`` bits per weight (the bit
        planes of :mod:`llmc.passes.bitplanes`); inverse of :meth:`from_tensors`."""
        from llmc.passes.bitplanes import fp_kernel_tile, pack_fp_codes

        tile = fp_kernel_tile(self.fmt.bits)  # the kernels' layout, so engines share the planes
        planes = pack_fp_codes(self.codes, self.fmt.bits, self.fmt.mantissa_bits, tile)
        tensors = {f"{prefix}.fpx_plane{i}": plane.contiguous() for i, plane in enumerate(planes)}
        tensors[f"{prefix}.fpx_scale"] = self.scale.contiguous()
        tensors[f"{prefix}.fpx_meta"] = torch.tensor(
            [self.fmt.exponent_bits, self.fmt.mantissa_bits, self.group_size, tile], dtype=torch.int32
        )
        return tensors

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], prefix: str) -> FpxLinear:
        from llmc.passes.bitplanes import unpack_fp_codes

        exponent_bits, mantissa_bits, group_size, tile = (int(v) for v in tensors[f"{prefix}.fpx_meta"].tolist())
        fmt = format_of(exponent_bits, mantissa_bits)
        planes = tuple(tensors[f"{prefix}.fpx_plane{i}"] for i in range(2 if fmt.bits == 6 else 1))
        codes = unpack_fp_codes(planes, fmt.bits, fmt.mantissa_bits, tile).to(torch.uint8)
        return FpxLinear(codes, tensors[f"{prefix}.fpx_scale"], fmt, group_size)


def fpx_quantize(
    weight: torch.Tensor,
    fmt: FpFormat,
    group_size: int | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> FpxLinear:
    """Quantize ``weight`` [out, in] to ``fmt`` codes with per-channel or per-group scales (rule 5).

    ``group_size`` None or -1 means one scale per output channel. ``scale_dtype`` is the dtype a
    kernel reads the scales in: each scale is rounded to it (and kept as float32) before the
    codes are chosen, so the codes fit the scale the kernel will use. float16 scales are kept at
    or above float16's smallest normal number, where they keep their full precision, and
    rounded up so that the largest weight still maps inside the range.
    Raises ``ValueError`` for a weight that is not 2-D or not finite, or a group size that does
    not divide the input dimension.
    """
    if weight.dim() != 2:
        raise ValueError(f"fpx_quantize: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if group_size is None or group_size == -1:
        group_size = in_features
    if group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"fpx_quantize: group_size {group_size} does not divide the input dimension "
            f"{in_features}; use a divisor of {in_features}, or -1 for one scale per output channel"
        )
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("fpx_quantize: weight holds inf or NaN; fix the checkpoint before quantizing")
    grouped = w.reshape(out_features, in_features // group_size, group_size)
    absmax = grouped.abs().amax(dim=-1)
    scale = absmax / fmt.max_normal
    if scale_dtype != torch.float32:
        info = torch.finfo(scale_dtype)
        rounded = scale.clamp(min=info.smallest_normal, max=info.max).to(scale_dtype)
        # Round up, never down, so the group's absmax still maps inside the range (rule 5).
        below = rounded.to(torch.float32) < scale
        rounded = torch.where(below, torch.nextafter(rounded, torch.full_like(rounded, info.max)), rounded)
        scale = rounded.to(torch.float32)
    scale = torch.where(absmax > 0, scale, torch.ones_like(scale))
    codes = fpx_encode(grouped / scale[..., None], fmt)
    return FpxLinear(codes.reshape(out_features, in_features), scale, fmt, group_size)


# --------------------------------------------------------------------------- the pass

from llmc.ir import Program, QuantDecision  # noqa: E402
from llmc.pipeline import Pass, PassContext, PassResult  # noqa: E402
from llmc.schemes import QuantizationRules, effective_group, resolve_schemes  # noqa: E402

# ``quantization.bits`` of method 'fpx' picks the format: FP6 e3m2 (FP6-LLM's choice), the OCP
# MX FP4, and FP8 e4m3 as torch.float8_e4m3fn.
FORMAT_BY_BITS = {6: FP6_E3M2, 4: FP4_E2M1, 8: FP8_E4M3}


@dataclass(frozen=True)
class FpxQuantizePass(Pass, QuantizationRules):
    """Quantize the linears whose scheme (:func:`llmc.schemes.resolve_schemes`, then the
    mixed-precision policy's widths, where a width of 6 is FP6) is 'fpx'.

    The options are the quantization rules, as for ``quantize-rtn``; linears resolved to another
    method are left to that method's pass, whose decisions this pass keeps. Scales are float16
    (rule 5, what llmc's kernels read), so the weights evaluated are the weights the kernels run;
    the file holds the codes at their own width (6 bits per FP6 weight).
    """

    name = "quantize-fpx"

    def requires(self, program: Program) -> None:
        if program.model is None:
            raise ValueError("quantize-fpx needs a model; run 'ingest' first")

    def ensures(self, program: Program) -> None:
        if program.quantized_weights is None:
            raise ValueError("quantize-fpx wrote no packed weights")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        from llmc.checkpoint import load_model, save_quantized
        from llmc.errors import ConfigError

        from llmc.passes.mixed_precision import apply_precision

        linears = [lin for layer in program.layers for lin in layer.linears]
        schemes = apply_precision(resolve_schemes([lin.name for lin in linears], self), program.precision)
        targets = [(lin, schemes[lin.name]) for lin in linears if schemes[lin.name] and schemes[lin.name].method == "fpx"]
        groups = {}
        for lin, scheme in targets:
            group = effective_group(scheme, lin.in_features, lin.name)
            if group % 16 or lin.in_features % 16:
                raise ConfigError(
                    "model.yaml", "quantization.group_size", f"{scheme.group_size} for {lin.name}: FP weights are "
                    "packed in tiles of a multiple of 16 inputs; use 16, 32, 64, 128 or -1"
                )
            groups[lin.name] = group
        model = load_model(program, ctx, quantized=False)
        modules = dict(model.named_modules())
        packed, decisions, formats = {}, [], {}
        error = norm = 0.0
        for lin, scheme in ctx.progress(targets, "fpx", total=len(targets)):
            fmt = FORMAT_BY_BITS[scheme.bits]
            weight = modules[lin.name].weight.detach().float()
            packed[lin.name] = fpx_quantize(weight, fmt, groups[lin.name], scale_dtype=torch.float16)
            error += (packed[lin.name].dequantize() - weight).pow(2).sum().item()
            norm += weight.pow(2).sum().item()
            decisions.append(QuantDecision(lin.name, "fpx", scheme.bits, groups[lin.name], True))
            layout = "per-channel" if groups[lin.name] == lin.in_features else f"g{groups[lin.name]}"
            key = f"{fmt.name} {layout}"
            formats[key] = formats.get(key, 0) + 1
        relative = (error / norm) ** 0.5 if norm else 0.0
        described = ", ".join(f"{k} x{n}" for k, n in sorted(formats.items(), key=lambda kv: -kv[1]))
        return PassResult(
            save_quantized(program, ctx, packed, decisions),
            f"{len(decisions)} linears {described or 'none'}, relative weight error {relative:.4f}",
        )
