"""Which quantization scheme each linear gets: the one resolution rule every quantize pass uses.

``model.yaml``'s ``quantization`` section (see :class:`llmc.config.Quantization`) becomes a
:class:`QuantizationRules` inside the compiler; :func:`resolve_schemes` applies it to the
model's linear names. For one linear, in order:

1. ignored (matches a pattern in ``ignore``) or not selected (matches no pattern in
   ``targets``): kept in float (``None``);
2. otherwise the first override whose ``match`` matches: the fields it sets, over the
   top-level defaults;
3. otherwise the top-level defaults (the catch-all).

A resolved ``method`` of ``"none"`` also keeps the linear in float. Patterns are shell-style
``fnmatch`` patterns on the full module name (``model.layers.3.mlp.down_proj``), case-sensitive.

Light on purpose (no torch): ``llmc validate`` and the config schema import it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fnmatch import fnmatchcase

from llmc.errors import ConfigError

# The names rules resolve are the decoder layers' linears (the layer table), so '*' is every one of
# them, whatever the architecture names them (model.layers.N..., model.decoder.layers.N..., transformer.h.N...).
DECODER_LINEARS = ("*",)
# A width chosen per layer (mixed precision, the planner) of 6 bits is FP6 e3m2, method 'fpx':
# integers come in 2, 3, 4 and 8 bits, and 6 bits exist only as FP6.
FP6_BITS = 6


@dataclass(frozen=True)
class Scheme:
    """How one linear is quantized."""

    method: str  # llmc.config.QuantMethod, never "none" (that resolves to None)
    bits: int
    group_size: int  # -1: one group per output channel
    symmetric: bool


@dataclass(frozen=True)
class Override:
    """Fields that replace the top-level defaults for the linears ``match`` selects."""

    match: str
    method: str | None = None
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool | None = None


@dataclass(frozen=True)
class QuantizationRules:
    """The ``quantization`` section as plain data; also the options of the quantize passes."""

    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    targets: tuple[str, ...] = DECODER_LINEARS
    ignore: tuple[str, ...] = ("lm_head",)
    overrides: tuple[Override, ...] = ()


def rules_from_config(quantization) -> QuantizationRules:
    """A validated :class:`llmc.config.Quantization` as frozen rules."""
    return QuantizationRules(
        method=quantization.method,
        bits=quantization.bits,
        group_size=quantization.group_size,
        symmetric=quantization.symmetric,
        targets=tuple(quantization.targets),
        ignore=tuple(quantization.ignore),
        overrides=tuple(
            Override(o.match, o.method, o.bits, o.group_size, o.symmetric) for o in quantization.overrides
        ),
    )


def methods_used(rules: QuantizationRules) -> set[str]:
    """The methods the rules can resolve to, "none" excluded: which quantize passes to run."""
    return {m for m in [rules.method] + [o.method for o in rules.overrides] if m not in (None, "none")}


def merged(rules: QuantizationRules, override: Override) -> Scheme:
    """The scheme an override gives: its set fields over the top-level defaults (rule 2)."""
    fields = {k: getattr(override, k) for k in ("method", "bits", "group_size", "symmetric")}
    base = Scheme(rules.method, rules.bits, rules.group_size, rules.symmetric)
    return replace(base, **{k: v for k, v in fields.items() if v is not None})


def resolve_schemes(linear_names, rules: QuantizationRules) -> dict[str, Scheme | None]:
    """Each name's scheme, or ``None`` for float (rules 1-3 of the module docstring).

    ``rules`` may also be a :class:`llmc.config.Quantization` (the same attribute names).
    Raises :class:`~llmc.errors.ConfigError` (exit 2) for a ``targets`` pattern or an override's
    ``match`` that selects no linear: a typo there would otherwise silently change nothing.
    """
    names = list(linear_names)
    for field, patterns in (("targets", rules.targets), ("overrides", [o.match for o in rules.overrides])):
        for i, pattern in enumerate(patterns):
            if not any(fnmatchcase(name, pattern) for name in names):
                where = f"targets[{i}]" if field == "targets" else f"overrides[{i}].match"
                example = f" (e.g. '{names[-1]}')" if names else ""
                raise ConfigError("model.yaml", f"quantization.{where}",
                                  f"'{pattern}' matches no linear of the model{example}; fix the pattern or remove it")
    schemes: dict[str, Scheme | None] = {}
    for name in names:
        # Rule 1.
        if any(fnmatchcase(name, p) for p in rules.ignore) or not any(fnmatchcase(name, p) for p in rules.targets):
            schemes[name] = None
            continue
        # Rules 2 and 3.
        override = next((o for o in rules.overrides if fnmatchcase(name, o.match)), None)
        scheme = merged(rules, override) if override else Scheme(
            rules.method, rules.bits, rules.group_size, rules.symmetric
        )
        schemes[name] = None if scheme.method == "none" else scheme
    return schemes


def at_width(scheme: Scheme, bits: int) -> Scheme | None:
    """How a linear of ``scheme`` is stored when a per-layer policy (the mixed-precision pass, the
    planner) gives it ``bits``: 16 is float (None); 8 is symmetric with one scale per output
    channel (TensorRT's int8 weight-only layout); 6 is FP6 (:data:`FP6_BITS`, sign-magnitude, the
    linear's groups); the configured width, and other widths, keep the linear's method, groups and
    symmetry."""
    if bits >= 16:
        return None
    if bits == scheme.bits:
        return scheme
    if bits == 8:
        return replace(scheme, bits=8, group_size=-1, symmetric=True)
    if bits == FP6_BITS:
        return replace(scheme, method="fpx", bits=FP6_BITS, symmetric=True)
    return replace(scheme, bits=bits)


def fp6_group_problem(widths, group_size: int, field: str) -> str | None:
    """Why ``group_size`` cannot hold FP6 when a per-layer policy may pick width 6 (``field`` names
    the list of widths), or None. FP6 codes are packed in tiles of 16 weights."""
    if FP6_BITS in widths and group_size == 8:
        return (f"8 does not fit FP6 (width 6 in {field}), whose codes are packed in tiles of 16; "
                "use 16 or more, or -1")
    return None


def int3_group_problem(group_size: int) -> str | None:
    """Why ``group_size`` cannot be exported at 3 bits, or None: the ``Int3Linear`` plugin packs the codes in
    tiles of 32 inputs, and a group must hold whole tiles (-1, one group per channel, is checked per linear)."""
    from llmc.passes.bitplanes import int_kernel_tile

    tile = int_kernel_tile(3)
    if group_size != -1 and group_size % tile:
        return (f"{group_size} does not fit int3, whose export packs codes in tiles of {tile} inputs; "
                f"use a multiple of {tile}, or -1")
    return None


def effective_group(scheme: Scheme, in_features: int, name: str) -> int:
    """Columns per group for one linear; ``ConfigError`` (exit 2) when the size does not divide."""
    if scheme.group_size == -1:
        return in_features
    if in_features % scheme.group_size:
        raise ConfigError(
            "model.yaml", "quantization.group_size", f"{scheme.group_size} does not divide the input size "
            f"{in_features} of {name}; use a divisor of {in_features}, -1, or an override for these linears"
        )
    return scheme.group_size


def describe(schemes) -> str:
    """Short text for logs: 'int4 g64 sym' or 'int4 g64 sym x180, int8 per-channel sym x30'."""
    counts: dict[str, int] = {}
    for s in schemes:
        layout = "per-channel" if s.group_size == -1 else f"g{s.group_size}"
        key = f"int{s.bits} {layout} {'sym' if s.symmetric else 'asym'}"
        counts[key] = counts.get(key, 0) + 1
    if len(counts) <= 1:
        return next(iter(counts), "none")
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
