"""The packaged GPU catalog: contents, plausibility, lookup and suggestions."""

from __future__ import annotations

import pytest

from llmc.catalog import GpuSku, load_catalog, lookup, suggest

REQUIRED = [
    "A100-40G", "A100-80G", "H100-80G", "H200", "L4", "L40S", "A10", "T4",
    "V100-16G", "V100-32G", "P100-16G", "P100-12G", "RTX-3090", "RTX-4090",
]  # fmt: skip
RATES = [
    "fp16_flops_per_s",
    "bf16_flops_per_s",
    "int8_ops_per_s",
    "fp8_flops_per_s",
    "memory_bandwidth_bytes_per_s",
    "nvlink_bytes_per_s",
    "pcie_bytes_per_s",
]


@pytest.fixture(scope="module")
def catalog() -> dict[str, GpuSku]:
    return load_catalog()


def test_holds_every_required_sku(catalog):
    assert set(REQUIRED) <= set(catalog)
    assert all(name == sku.name for name, sku in catalog.items())


def test_figures_are_positive_and_in_si_units(catalog):
    for sku in catalog.values():
        assert 8 * 2**30 <= sku.memory_bytes <= 256 * 2**30, sku.name
        # Between a P100's 18.7 TFLOPS and a few PFLOPS; bandwidth between 100 GB/s and 10 TB/s.
        assert 1e13 <= sku.fp16_flops_per_s <= 5e15, sku.name
        assert 1e11 <= sku.memory_bandwidth_bytes_per_s <= 1e13, sku.name
        for rate in RATES:
            value = getattr(sku, rate)
            assert value is None or value > 0, (sku.name, rate)


def test_data_types_follow_the_architecture(catalog):
    for sku in catalog.values():
        major_minor = tuple(int(part) for part in sku.compute_capability.split("."))
        assert (sku.bf16_flops_per_s is None) == (major_minor < (8, 0)), sku.name
        assert (sku.fp8_flops_per_s is None) == (major_minor < (8, 9)), sku.name
        if sku.int8_ops_per_s is not None and major_minor >= (7, 5):
            # Int8 tensor cores run at least at the fp16 rate.
            assert sku.int8_ops_per_s >= sku.fp16_flops_per_s, sku.name


@pytest.mark.parametrize(
    "faster,slower",
    [("H100-80G", "A100-80G"), ("H100-80G", "A100-40G"), ("A100-80G", "T4"), ("A100-40G", "T4")],
)
def test_newer_generation_is_faster_on_every_figure_both_have(catalog, faster, slower):
    compared = 0
    for rate in RATES:
        fast, slow = getattr(catalog[faster], rate), getattr(catalog[slower], rate)
        if fast is not None and slow is not None:
            assert fast > slow, rate
            compared += 1
    assert compared >= 4


def test_memory_variants_differ_only_where_they_should(catalog):
    assert catalog["A100-80G"].memory_bytes == 2 * catalog["A100-40G"].memory_bytes
    assert catalog["A100-80G"].fp16_flops_per_s == catalog["A100-40G"].fp16_flops_per_s
    assert catalog["H200"].memory_bytes > catalog["H100-80G"].memory_bytes
    assert catalog["H200"].fp16_flops_per_s == catalog["H100-80G"].fp16_flops_per_s


def test_names_and_aliases_are_unique_across_skus(catalog):
    spellings = [
        spelling.casefold().replace(" ", "-").replace("_", "-")
        for sku in catalog.values()
        for spelling in (sku.name, *sku.aliases)
    ]
    assert len(spellings) == len(set(spellings))


@pytest.mark.parametrize(
    "typed,expected",
    [
        ("A100-80G", "A100-80G"),
        ("a100-sxm4-80gb", "A100-80G"),
        ("NVIDIA A100-SXM4-40GB", "A100-40G"),
        ("A100", "A100-40G"),  # a bare name is the smaller variant
        ("h100", "H100-80G"),
        ("NVIDIA H100 80GB HBM3", "H100-80G"),
        ("rtx 4090", "RTX-4090"),
        ("RTX_3090", "RTX-3090"),
        ("Tesla T4", "T4"),
        ("  l40s ", "L40S"),
    ],
)
def test_lookup_by_name_or_alias(catalog, typed, expected):
    assert lookup(typed, catalog).name == expected


def test_lookup_of_an_unknown_name_is_none(catalog):
    assert lookup("A10G", catalog) is None
    assert lookup("B200", catalog) is None


@pytest.mark.parametrize(
    "typed,expected",
    [("A1OO", "A100-40G"), ("A100-80", "A100-80G"), ("H10", "H100-80G"), ("L40", "L40S")],
)
def test_suggests_the_sku_a_typo_meant(catalog, typed, expected):
    assert lookup(typed, catalog) is None
    assert suggest(typed, catalog) == expected


def test_no_suggestion_for_something_unrelated(catalog):
    assert suggest("quantum-annealer", catalog) is None
