"""The catalog of known GPU SKUs: capacities and peak rates, read from the packaged catalog.yaml.

The yaml holds the vendors' figures in the units they publish (GiB, TFLOPS, GB/s) with a source
per SKU; :class:`GpuSku` holds them in SI units (bytes, FLOP/s, bytes/s) for the planner.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from importlib import resources

import yaml

_FIELDS = (
    "name",
    "memory_gib",
    "fp16_tflops",
    "bf16_tflops",
    "int8_tops",
    "fp8_tflops",
    "memory_bandwidth_gbs",
    "compute_capability",
    "interconnect",
    "nvlink_gbs",
    "pcie_gbs",
    "aliases",
)
_OPTIONAL = {"bf16_tflops", "int8_tops", "fp8_tflops", "nvlink_gbs"}


@dataclass(frozen=True)
class GpuSku:
    """One GPU model. Rates are dense peaks; ``None`` means the SKU lacks that data type or link.

    ``nvlink_bytes_per_s`` counts all links in both directions, as NVIDIA quotes it;
    ``pcie_bytes_per_s`` is the x16 host link in one direction.
    """

    name: str
    memory_bytes: int
    fp16_flops_per_s: float
    bf16_flops_per_s: float | None
    int8_ops_per_s: float | None
    fp8_flops_per_s: float | None
    memory_bandwidth_bytes_per_s: float
    compute_capability: str
    interconnect: str
    nvlink_bytes_per_s: float | None
    pcie_bytes_per_s: float
    aliases: tuple[str, ...]


def load_catalog() -> dict[str, GpuSku]:
    """Every SKU in the packaged catalog.yaml, keyed by canonical name."""
    text = resources.files("llmc").joinpath("catalog.yaml").read_text(encoding="utf-8")
    catalog: dict[str, GpuSku] = {}
    owner_of: dict[str, str] = {}
    for entry in yaml.safe_load(text)["skus"]:
        sku = _sku_from_entry(entry)
        # The catalog ships with llmc, so a bad entry is a bug in llmc, not a user error.
        for spelling in (sku.name, *sku.aliases):
            key = _normalize(spelling)
            if key in owner_of:
                raise ValueError(
                    f"catalog.yaml: '{spelling}' of {sku.name} is already a name of {owner_of[key]}"
                )
            owner_of[key] = sku.name
        catalog[sku.name] = sku
    return catalog


def lookup(name: str, catalog: dict[str, GpuSku]) -> GpuSku | None:
    """The SKU whose canonical name or alias is ``name``, ignoring case and separators."""
    key = _normalize(name)
    for sku in catalog.values():
        if any(_normalize(spelling) == key for spelling in (sku.name, *sku.aliases)):
            return sku
    return None


def suggest(name: str, catalog: dict[str, GpuSku]) -> str | None:
    """The canonical name of the SKU ``name`` most likely misspells, for a "did you mean".

    Compares against every name and alias; letter O is read as digit 0, the commonest slip in
    SKU names ("A1OO"). Ties go to the greater spelling, as ``difflib.get_close_matches`` breaks
    them, so the answer is deterministic.
    """
    owner_of = {
        _typo_key(spelling): sku.name
        for sku in catalog.values()
        for spelling in (sku.name, *sku.aliases)
    }
    matches = difflib.get_close_matches(_typo_key(name), list(owner_of), n=1, cutoff=0.6)
    return owner_of[matches[0]] if matches else None


def _normalize(spelling: str) -> str:
    return re.sub(r"[\s_\-]+", "-", spelling.strip().casefold())


def _typo_key(spelling: str) -> str:
    return _normalize(spelling).replace("o", "0")


def _sku_from_entry(entry: dict) -> GpuSku:
    name = entry.get("name", "<unnamed>")
    missing = [field for field in _FIELDS if field not in entry]
    unknown = [field for field in entry if field not in _FIELDS]
    if missing or unknown:
        raise ValueError(f"catalog.yaml: {name}: missing fields {missing}, unknown fields {unknown}")
    for field in _FIELDS:
        value = entry[field]
        if value is None and field in _OPTIONAL:
            continue
        if field.endswith(("_gib", "_tflops", "_tops", "_gbs")):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"catalog.yaml: {name}: {field} must be a positive number")
    if not isinstance(entry["compute_capability"], str):
        raise ValueError(f"catalog.yaml: {name}: compute_capability must be a quoted string")

    def rate(value: float | None, unit: float) -> float | None:
        return None if value is None else value * unit

    return GpuSku(
        name=name,
        memory_bytes=int(entry["memory_gib"] * 2**30),
        fp16_flops_per_s=entry["fp16_tflops"] * 1e12,
        bf16_flops_per_s=rate(entry["bf16_tflops"], 1e12),
        int8_ops_per_s=rate(entry["int8_tops"], 1e12),
        fp8_flops_per_s=rate(entry["fp8_tflops"], 1e12),
        memory_bandwidth_bytes_per_s=entry["memory_bandwidth_gbs"] * 1e9,
        compute_capability=entry["compute_capability"],
        interconnect=entry["interconnect"],
        nvlink_bytes_per_s=rate(entry["nvlink_gbs"], 1e9),
        pcie_bytes_per_s=entry["pcie_gbs"] * 1e9,
        aliases=tuple(str(alias) for alias in entry["aliases"]),
    )
