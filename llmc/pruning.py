"""Which linears a prune pass prunes, and how much: the one resolution rule every prune pass uses.

``model.yaml``'s ``pruning`` section (see :class:`llmc.config.Pruning`) becomes a
:class:`PruningRules` inside the compiler; :func:`resolve_sparsity` applies it to the model's
linears. For one linear, in order (the same shape as :mod:`llmc.schemes`):

1. ignored (matches a pattern in ``ignore``) or not selected (matches no pattern in
   ``targets``): kept dense (``None``);
2. otherwise the first override whose ``match`` matches: its ``ratio`` or its ``pattern``,
   whichever it sets, replaces the top-level one (a ratio of 0 keeps the linear dense);
3. otherwise the top-level ``ratio`` or ``pattern``.

An N:M pattern keeps at most N nonzeros in every M consecutive input columns of an output row
(2:4 is what sparse tensor cores run); a ratio zeroes that fraction of every output row.
Patterns are shell-style ``fnmatch`` patterns on the full module name, case-sensitive.

Light on purpose (no torch): ``llmc validate`` and the config schema import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from llmc.errors import ConfigError

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: keep N of every M; raises ``ValueError`` unless ``0 < N < M <= 256``."""
    match = _PATTERN.match(text)
    if not match:
        raise ValueError(f"'{text}' is not an N:M pattern; write it like '2:4'")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m <= 256:
        raise ValueError(f"'{text}': N:M keeps N of every M inputs, so 0 < N < M <= 256 (e.g. '2:4', '4:8')")
    return n, m


@dataclass(frozen=True)
class Sparsity:
    """How one linear is pruned: ``ratio`` of every output row zeroed, or an N:M pattern."""

    ratio: float  # fraction of each row's weights set to zero; 1 - n/m for a pattern
    n: int | None = None  # nonzeros kept per group of m consecutive inputs
    m: int | None = None

    @classmethod
    def from_pattern(cls, pattern: str) -> Sparsity:
        n, m = parse_pattern(pattern)
        return cls(1 - n / m, n, m)

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.n is not None else f"{self.ratio:.0%}"


@dataclass(frozen=True)
class PruneOverride:
    """A ratio or a pattern (one of them) for the linears ``match`` selects."""

    match: str
    ratio: float | None = None
    pattern: str | None = None


@dataclass(frozen=True)
class PruningRules:
    """The ``pruning`` section's selection as plain data; also options of the prune passes."""

    ratio: float | None = None
    pattern: str | None = None
    targets: tuple[str, ...] = ("model.layers.*",)
    ignore: tuple[str, ...] = ("lm_head",)
    overrides: tuple[PruneOverride, ...] = ()


def pruning_rules_from_config(pruning) -> PruningRules:
    """A validated :class:`llmc.config.Pruning` as frozen rules."""
    return PruningRules(
        ratio=pruning.ratio,
        pattern=pruning.pattern,
        targets=tuple(pruning.targets),
        ignore=tuple(pruning.ignore),
        overrides=tuple(PruneOverride(o.match, o.ratio, o.pattern) for o in pruning.overrides),
    )


def selected(names, rules: PruningRules) -> list[str]:
    """The names rule 1 keeps (targeted, not ignored), in order; ``ConfigError`` (exit 2) for a
    ``targets`` pattern or an override's ``match`` that selects no linear: a typo there would
    otherwise silently prune nothing."""
    names = list(names)
    checks = [(f"targets[{i}]", p) for i, p in enumerate(rules.targets)]
    checks += [(f"overrides[{i}].match", o.match) for i, o in enumerate(rules.overrides)]
    for where, pattern in checks:
        if not any(fnmatchcase(name, pattern) for name in names):
            example = f" (e.g. '{names[-1]}')" if names else ""
            raise ConfigError("model.yaml", f"pruning.{where}",
                              f"'{pattern}' matches no linear of the model{example}; fix the pattern or remove it")
    return [
        name for name in names
        if any(fnmatchcase(name, p) for p in rules.targets) and not any(fnmatchcase(name, p) for p in rules.ignore)
    ]


def resolve_sparsity(in_features: dict[str, int], rules: PruningRules) -> dict[str, Sparsity | None]:
    """Each linear's sparsity (rules 1-3 of the module docstring), or ``None`` for dense.

    ``in_features`` maps linear names to their input sizes. ``ConfigError`` (exit 2) for a
    pattern that selects nothing and for an N:M group that does not divide an input size.
    """
    chosen = set(selected(in_features, rules))
    result: dict[str, Sparsity | None] = {}
    for name, columns in in_features.items():
        if name not in chosen:
            result[name] = None
            continue
        index, override = next(((i, o) for i, o in enumerate(rules.overrides) if fnmatchcase(name, o.match)),
                               (None, None))
        source = override if override is not None else rules
        where = f"overrides[{index}].pattern" if override is not None else "pattern"
        if source.pattern is not None:
            sparsity = Sparsity.from_pattern(source.pattern)
            if columns % sparsity.m:
                raise ConfigError(
                    "model.yaml", f"pruning.{where}", f"groups of {sparsity.m} do not divide the input size {columns} "
                    f"of {name}; use an M that divides it, or an override for these linears"
                )
        else:
            sparsity = Sparsity(source.ratio or 0.0)
        result[name] = sparsity if sparsity.ratio > 0 else None
    return result


def describe_sparsity(values) -> str:
    """Short text for logs: '2:4' or '50% x180, 30% x30'."""
    counts: dict[str, int] = {}
    for s in values:
        counts[s.describe()] = counts.get(s.describe(), 0) + 1
    if len(counts) <= 1:
        return next(iter(counts), "none")
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
