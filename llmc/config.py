"""The two input files, ``model.yaml`` and ``cluster.yaml``, as pydantic v2 schemas.

Validated once, at the edge: :func:`load_model_config` and :func:`load_cluster_config` turn any
problem into a one-line :class:`~llmc.errors.ConfigError` naming the file, the field path and the
fix. Past this module the compiler sees frozen objects only; the cluster is resolved into plain
frozen dataclasses (:class:`Device`, :class:`Cluster`) with the catalog's figures merged in.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmc.catalog import GpuSku, load_catalog, lookup, suggest
from llmc.errors import ConfigError, InputError
from llmc.schemes import fp6_group_problem

API_VERSION = "llmc/v1"


class _Strict(BaseModel):
    # allow_inf_nan=False: YAML's .inf / .nan are never a sensible figure, and an infinite memory
    # size or bandwidth would either crash the int conversion or plan with infinite figures.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- model.yaml


class ModelSource(_Strict):
    path: str = Field(
        description="A local Hugging Face model directory (config.json, *.safetensors, tokenizer) "
        "or a single .gguf file; relative paths are relative to model.yaml. Never fetched from a hub."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32",
        description="Dtype the weights are loaded in for calibration and evaluation. "
        "float32 on CPU hosts.",
    )


class TextData(_Strict):
    path: str = Field(description="A local UTF-8 text file; relative to model.yaml.")
    seq_len: int = Field(256, ge=16, le=8192, description="Tokens per window.")
    windows: int = Field(
        32,
        ge=1,
        le=100_000,
        description="Number of windows. Calibration draws them at seeded random offsets; "
        "evaluation takes the first N non-overlapping windows.",
    )


# Weight quantizers. "none" keeps float; every other method is a quantize pass that
# build_pipeline adds when the rules use it (extend both together).
QuantMethod = Literal["none", "rtn", "gptq", "fpx"]
QuantBits = Literal[2, 3, 4, 6, 8]


class FieldPathError(ValueError):
    """A validator's error about a nested field: ``path`` is appended to the validator's location."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(message)


def _check_group_size(value: int | None) -> int | None:
    if value is not None and value != -1 and (value < 8 or value & (value - 1)):
        raise ValueError("must be -1 or a power of two >= 8 (e.g. 32, 64, 128)")
    return value


_ASYMMETRIC_8BIT = "8-bit asymmetric is not supported; use symmetric: true (int8 is near-lossless)"


def _fp_scheme_problem(method: str, bits: int, symmetric: bool) -> str | None:
    """Why a resolved (method, bits, symmetric) is not a floating-point scheme llmc has, or None.

    'fpx' is low-bit floating point (llmc.passes.fpx): bits 6 is FP6 e3m2, 4 is FP4 e2m1, 8 is
    FP8 e4m3; 6 bits exist only as FP6.
    """
    if method == "fpx" and bits not in (4, 6, 8):
        return f"method fpx takes bits 4 (FP4 e2m1), 6 (FP6 e3m2) or 8 (FP8 e4m3), not {bits}"
    if method == "fpx" and not symmetric:
        return "FP formats are sign-magnitude, with no zero point; remove symmetric: false for method fpx"
    if method in ("rtn", "gptq") and bits == 6:
        return "6-bit weights are FP6 e3m2; use method: fpx for them"
    return None


class GptqOptions(_Strict):
    damp: float = Field(
        0.01,
        gt=0,
        le=1,
        description="Dampening added to the Hessian's diagonal, as a fraction of its mean diagonal. "
        "Raised tenfold (up to 10x the mean) while the Cholesky factorisation fails; the value used "
        "is logged per layer.",
    )
    act_order: bool = Field(
        True,
        description="Quantize columns in decreasing order of the Hessian's diagonal (activation "
        "order). Groups stay static (fitted on the original column order), so inference needs "
        "no g_idx and pays nothing for it; measured on SmolLM2-135M int4 g64: +12.4% perplexity "
        "with it, +21.6% without.",
    )
    block_size: int = Field(
        128,
        ge=8,
        le=4096,
        description="Columns per lazy batch: errors propagate inside the batch column by column and "
        "to all later columns once per batch. A power of two; affects speed only, up to rounding.",
    )

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("must be a power of two (e.g. 64, 128)")
        return value


class QuantOverride(_Strict):
    match: str = Field(
        min_length=1,
        description="fnmatch pattern of linear module names this override applies to, e.g. "
        "'model.layers.[0-3].mlp.down_proj' or '*.v_proj'. The first matching override wins.",
    )
    method: QuantMethod | None = Field(None, description="Replaces quantization.method ('none' keeps float).")
    bits: QuantBits | None = Field(None, description="Replaces quantization.bits.")
    group_size: int | None = Field(None, description="Replaces quantization.group_size.")
    symmetric: bool | None = Field(None, description="Replaces quantization.symmetric.")

    _group = field_validator("group_size")(_check_group_size)

    @model_validator(mode="after")
    def _sets_something(self):
        if all(getattr(self, f) is None for f in ("method", "bits", "group_size", "symmetric")):
            raise ValueError("sets nothing; give at least one of method, bits, group_size, symmetric")
        return self


class MixedPrecisionTarget(_Strict):
    """Mixed precision chosen by the compiler under a quality budget (passes/mixed_precision.py,
    docs/mixed-precision.md). Explicit ``quantization.overrides`` that set bits or method win: their
    linears are left out of the search."""

    granularity: Literal["layer", "output-feature"] = Field(
        "layer",
        description="'layer': one width per decoder layer from `bits`, chosen by a knapsack on the "
        "sensitivity indicator; 'output-feature': MixLLM, the most salient output features of all "
        "linears (one global ranking) at 8 bits per channel, the rest at quantization.bits.",
    )
    bits: list[Literal[2, 3, 4, 6, 8, 16]] = Field(
        default_factory=lambda: [3, 4, 8],
        min_length=2,
        description="granularity 'layer': the widths a layer may get (16: float). 8 bits is per output "
        "channel, the others use quantization.group_size; 6 is FP6 e3m2 (method fpx), the others "
        "quantization.method.",
    )
    average_bits: float | None = Field(
        None, gt=2, le=16,
        description="Target: average stored bits per quantized weight, codes plus one fp16 scale per group "
        "(int4 g128 = 4.125), zero points and MixLLM's row indices; the least sensitive mix under it.",
    )
    max_perplexity_increase_pct: float | None = Field(
        None, gt=0, le=1000,
        description="granularity 'layer', instead of average_bits: the fewest bits whose predicted perplexity "
        "increase stays under this (omega scaled per width to the measured calibration-loss increase).",
    )
    high_fraction: float | None = Field(
        None, gt=0, lt=1,
        description="granularity 'output-feature', instead of average_bits: the fraction of all output "
        "features kept at 8 bits (MixLLM uses 0.1-0.2).",
    )
    indicator: Literal["hessian-trace", "llm-pq-variance"] = Field(
        "hessian-trace",
        description="The per-layer sensitivity: tr(δ H δᵀ) with GPTQ's Hessian, or LLM-PQ's "
        "sum of s² / 12 · Var[x]. docs/benchmarks/mixed-precision.md compares both with measurements.",
    )
    gradient_windows: int = Field(
        32, ge=1, le=100_000,
        description="granularity 'output-feature': calibration windows whose loss gradient scores the features.",
    )

    @model_validator(mode="after")
    def _one_target(self):
        if len(set(self.bits)) != len(self.bits):
            raise FieldPathError("bits", "lists a width twice")
        if self.granularity == "layer":
            if self.high_fraction is not None:
                raise FieldPathError("high_fraction", "applies to granularity 'output-feature'; for 'layer' give "
                                                      "average_bits or max_perplexity_increase_pct")
            if (self.average_bits is None) == (self.max_perplexity_increase_pct is None):
                raise ValueError("granularity 'layer' needs exactly one target: average_bits (e.g. 4.5) or "
                                 "max_perplexity_increase_pct (e.g. 10)")
        else:
            if self.max_perplexity_increase_pct is not None:
                raise FieldPathError("max_perplexity_increase_pct", "applies to granularity 'layer'; for "
                                     "'output-feature' give average_bits or high_fraction")
            if "bits" in self.model_fields_set:
                raise FieldPathError("bits", "granularity 'output-feature' mixes quantization.bits with 8 bits; "
                                             "remove bits")
            if (self.average_bits is None) == (self.high_fraction is None):
                raise ValueError("granularity 'output-feature' needs exactly one target: average_bits (e.g. 4.5) "
                                 "or high_fraction (e.g. 0.1)")
        return self


class Quantization(_Strict):
    """Which linears are quantized, and how (resolution: llmc.schemes.resolve_schemes).

    A linear that matches ``ignore`` or no pattern of ``targets`` stays float; otherwise the
    first override whose ``match`` matches sets its fields over the defaults below; otherwise
    the defaults apply.
    """

    method: QuantMethod = Field(
        "rtn",
        description="Default weight quantizer. 'rtn': group-wise round-to-nearest; 'gptq': GPTQ, "
        "block by block on the calibration windows; 'fpx': low-bit floating point (bits 6: FP6 "
        "e3m2, 4: FP4 e2m1, 8: FP8 e4m3), round-to-nearest-even with a scale per group or channel; "
        "'none': keep float.",
    )
    bits: QuantBits = Field(
        4, description="Default weight bit-width: 2, 3, 4 or 8 for integer methods; 4, 6 or 8 for "
        "method fpx (FP8 has no ONNX export)."
    )
    group_size: int = Field(
        128,
        description="Default input columns sharing one scale; -1 for one scale per output channel. "
        "Must divide every quantized layer's input size.",
    )
    symmetric: bool = Field(
        True,
        description="Default: symmetric codes with zero point 0 (what TensorRT's int4/int8 "
        "weight-only path runs natively); false adds an integer zero point per group.",
    )
    targets: list[str] = Field(
        default_factory=lambda: ["*"],
        min_length=1,
        description="fnmatch patterns of the decoder-layer linears' names to quantize (default '*': "
        "every one, whatever the architecture calls them). A pattern that matches no linear fails the "
        "compile (exit 2).",
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="fnmatch patterns of linear module names kept in float, even when targeted "
        "(e.g. 'lm_head', 'model.layers.0.*').",
    )
    gptq: GptqOptions = Field(default_factory=GptqOptions, description="GPTQ options (method: gptq).")
    overrides: list[QuantOverride] = Field(
        default_factory=list,
        description="Per-module exceptions, first match wins, e.g. {match: 'model.layers.[0-3].mlp."
        "down_proj', bits: 8}. A match that selects no linear fails the compile (exit 2).",
    )

    mixed_precision: MixedPrecisionTarget | None = Field(
        None,
        description="Per-layer widths or MixLLM output-feature mixes chosen under a budget (docs/mixed-precision.md); "
        "unset: every linear as the fields above and overrides say.",
    )

    _group = field_validator("group_size")(_check_group_size)

    @model_validator(mode="after")
    def _schemes_exist(self):
        mixed = self.mixed_precision
        if mixed is not None and self.method not in ("rtn", "gptq"):
            raise FieldPathError("mixed_precision", f"applies to methods rtn and gptq, not '{self.method}'")
        problem = mixed and mixed.granularity == "layer" and fp6_group_problem(
            mixed.bits, self.group_size, "mixed_precision.bits")
        if problem:
            raise FieldPathError("group_size", problem)
        if mixed is not None and mixed.granularity == "output-feature" and self.bits >= 8:
            raise FieldPathError("mixed_precision.granularity",
                                 f"output-feature mixes keep the salient features at 8 bits and the rest at "
                                 f"quantization.bits, which must then be lower than 8 (got {self.bits})")
        if self.method != "none" and self.bits == 8 and not self.symmetric:
            raise ValueError(_ASYMMETRIC_8BIT)
        problem = _fp_scheme_problem(self.method, self.bits, self.symmetric)
        if problem:
            raise ValueError(problem)
        seen: dict[str, int] = {}
        for i, override in enumerate(self.overrides):
            if override.match in seen:
                raise FieldPathError(
                    f"overrides[{i}].match",
                    f"same pattern as overrides[{seen[override.match]}], which always wins; merge them",
                )
            seen[override.match] = i
            method = override.method or self.method
            bits = override.bits or self.bits
            symmetric = self.symmetric if override.symmetric is None else override.symmetric
            if method != "none" and bits == 8 and not symmetric:
                raise FieldPathError(
                    f"overrides[{i}]",
                    "resolves to 8-bit asymmetric, which is not supported; set symmetric: true in it",
                )
            problem = _fp_scheme_problem(method, bits, symmetric)
            if problem:
                raise FieldPathError(f"overrides[{i}]", f"resolves to {method} {bits}-bit: {problem}")
        return self


class Quality(_Strict):
    max_perplexity_increase_pct: float = Field(
        10.0,
        gt=0,
        description="Largest allowed relative increase of held-out perplexity over the unmodified "
        "model, in percent; the compile fails with exit 6 past it.",
    )


class Workload(_Strict):
    batch: int = Field(1, ge=1, le=4096, description="Concurrent sequences served.")
    prompt_tokens: int = Field(512, ge=1, description="Prompt length per sequence.")
    generated_tokens: int = Field(128, ge=1, description="Tokens generated per sequence.")


class Planner(_Strict):
    """Options of the `plan` pass (docs/planner.md)."""

    bits: list[Literal[2, 3, 4, 6, 8, 16]] | None = Field(
        None,
        min_length=1,
        description="Bit-widths the planner may give each decoder layer (16: float; 6: FP6 e3m2), e.g. "
        "[3, 4, 8, 16]. Unset: every layer as `quantization` says. With several widths `llmc compile` "
        "quantizes each layer at the plan's width (quantization.method rtn or gptq).",
    )
    quality_budget: float | None = Field(
        None,
        ge=0,
        description="Q in sum over layers of omega(layer, bits) <= Q. Unset: the omega of every layer at "
        "quantization.bits (no worse than uniform quantization by the indicator).",
    )
    sensitivity: str | None = Field(
        None,
        description="A sensitivity table (kind: Sensitivity, YAML or JSON) giving omega per layer and "
        "bit-width; relative to model.yaml. Unset: the `sensitivity` pass's table, or every layer "
        "equally sensitive (omega = ((2^b0 - 1) / (2^b - 1))^2 with b0 = quantization.bits).",
    )
    profile: str | None = Field(
        None,
        description="Measured layer latencies (kind: Profile, YAML or JSON) used instead of the roofline "
        "where they cover a SKU, phase and bit-width; relative to model.yaml.",
    )
    micro_batch_sizes: list[int] | None = Field(
        None,
        min_length=1,
        description="Micro-batch sizes the planner may choose for prefill and for decode (each at most "
        "workload.batch). Unset: the divisors of workload.batch (at most 8 of them, spread evenly).",
    )
    time_limit_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Search limit in CP-SAT deterministic seconds (reproducible, unlike wall time); past it "
        "the best plan found is kept and its optimality gap reported.",
    )

    @field_validator("bits", "micro_batch_sizes")
    @classmethod
    def _distinct(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("lists a value twice")
        if value is not None and any(v < 1 for v in value):
            raise ValueError("values must be >= 1")
        return value


class ExportCheck(_Strict):
    prompt: str = Field(
        "The State of the Union is",
        description="Prompt whose greedy continuation ONNX Runtime must reproduce.",
    )
    new_tokens: int = Field(16, ge=1, le=256, description="Greedy tokens compared.")


# Pruning (resolution: llmc.pruning.resolve_sparsity). "none" keeps every weight; the others are
# prune passes that build_pipeline runs after calibrate and before plan.
PruneMethod = Literal["none", "magnitude", "wanda", "sparsegpt", "structured"]


def _check_pattern(value: str | None) -> str | None:
    if value is not None:
        from llmc.pruning import parse_pattern

        parse_pattern(value)
    return value


class PruneOverride(_Strict):
    match: str = Field(
        min_length=1,
        description="fnmatch pattern of linear module names this override applies to, e.g. "
        "'model.layers.[0-3].*' or '*.down_proj'. The first matching override wins.",
    )
    ratio: float | None = Field(
        None, ge=0, lt=1, description="Replaces pruning.ratio / pattern: fraction of each output row zeroed "
        "(0 keeps these linears dense).",
    )
    pattern: str | None = Field(None, description="Replaces pruning.ratio / pattern: an N:M pattern, e.g. '2:4'.")

    _pattern = field_validator("pattern")(_check_pattern)

    @model_validator(mode="after")
    def _one_of(self):
        if (self.ratio is None) == (self.pattern is None):
            raise ValueError("set exactly one of ratio (e.g. 0.3, or 0 to keep dense) and pattern (e.g. '2:4')")
        return self


class SparseGptOptions(_Strict):
    damp: float = Field(
        0.01, gt=0, le=1,
        description="Dampening added to the Hessian's diagonal, as a fraction of its mean diagonal "
        "(raised tenfold while the Cholesky factorisation fails, as in GPTQ).",
    )
    block_size: int = Field(
        128, ge=8, le=4096,
        description="Columns whose unstructured mask is chosen together, from the error-updated weights "
        "(SparseGPT's adaptive mask selection); a power of two.",
    )

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("must be a power of two (e.g. 64, 128)")
        return value


class StructuredPruning(_Strict):
    align: int = Field(
        8, ge=1, le=256,
        description="Kept MLP widths (and attention widths, in whole key/value groups) are multiples of "
        "this, for tensor cores: 8, or 64. Raised to the quantization group size when that is larger, "
        "so every pruned width still splits into whole groups.",
    )
    bias_compensation: bool = Field(
        True,
        description="FLaP's bias compensation: the calibration mean of each removed input times its "
        "removed weights becomes a bias of o_proj / down_proj.",
    )
    allocation: Literal["global", "uniform"] = Field(
        "global",
        description="'global': FLaP's one threshold over the standardised scores of every layer, so layers "
        "lose different shares; 'uniform': the same rule inside each layer, every layer loses the ratio "
        "(measured better on Qwen2.5-Coder-0.5B, worse on SmolLM2: docs/benchmarks/pruning.md).",
    )

    @field_validator("align")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("must be a power of two (e.g. 8, 64)")
        return value


class Pruning(_Strict):
    """Which decoder linears are pruned, and how (resolution: llmc.pruning.resolve_sparsity).

    Unstructured methods (magnitude, wanda, sparsegpt) zero weights at a ratio per output row or
    in an N:M pattern; 'structured' (FLaP) removes whole attention key/value groups and MLP
    channels, so the layers get smaller.
    """

    method: PruneMethod = Field(
        "none",
        description="'magnitude': smallest |W| per output row (a baseline, no calibration); 'wanda': "
        "|W| x input norm per output row; 'sparsegpt': OBS mask and weight update with the GPTQ "
        "Hessian, jointly with GPTQ where quantization.method is gptq; 'structured': FLaP, "
        "whole heads and MLP channels with bias compensation; 'none'.",
    )
    ratio: float | None = Field(
        None, gt=0, lt=1,
        description="Unstructured: fraction of each output row's weights zeroed (e.g. 0.5). Structured: "
        "fraction of the targeted layers' linear weights removed (e.g. 0.2), allocated as structured.allocation says.",
    )
    pattern: str | None = Field(
        None,
        description="Instead of ratio (unstructured methods only): N:M, at most N nonzeros in every M "
        "consecutive inputs, e.g. '2:4' (what TensorRT's sparse weights run) or '4:8'.",
    )
    targets: list[str] = Field(
        default_factory=lambda: ["model.layers.*"], min_length=1,
        description="fnmatch patterns of the linears to prune (default: every decoder-layer linear). "
        "Structured: a layer's heads are pruned when its o_proj is targeted, its MLP channels when its "
        "down_proj is. A pattern that matches no linear fails the compile (exit 2).",
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="fnmatch patterns of linears kept dense, even when targeted (e.g. 'model.layers.0.*').",
    )
    overrides: list[PruneOverride] = Field(
        default_factory=list,
        description="Unstructured methods: per-module exceptions, first match wins, e.g. {match: "
        "'model.layers.[0-3].*', ratio: 0.3}. A match that selects no linear fails the compile (exit 2).",
    )
    sparsegpt: SparseGptOptions = Field(default_factory=SparseGptOptions, description="SparseGPT options.")
    structured: StructuredPruning = Field(
        default_factory=StructuredPruning, description="Structured (FLaP) options."
    )

    _pattern = field_validator("pattern")(_check_pattern)

    @model_validator(mode="after")
    def _complete(self):
        if self.method == "none":
            return self
        if self.method == "structured":
            if self.pattern is not None:
                raise FieldPathError("pattern", "structured pruning removes whole heads and channels; give ratio")
            if self.overrides:
                raise FieldPathError("overrides", "structured pruning uses one global threshold; keep layers "
                                                  "whole with ignore instead")
            if self.ratio is None:
                raise FieldPathError("ratio", "structured pruning needs a ratio, e.g. 0.2")
            return self
        if (self.ratio is None) == (self.pattern is None):
            raise ValueError(f"method {self.method} needs exactly one of ratio (e.g. 0.5) and pattern (e.g. '2:4')")
        seen: dict[str, int] = {}
        for i, override in enumerate(self.overrides):
            if override.match in seen:
                raise FieldPathError(
                    f"overrides[{i}].match",
                    f"same pattern as overrides[{seen[override.match]}], which always wins; merge them",
                )
            seen[override.match] = i
        return self


class ModelConfig(_Strict):
    apiVersion: Literal["llmc/v1"] = Field(description="Schema version; 'llmc/v1'.")
    kind: Literal["Model"] = Field(description="Always 'Model'.")
    model: ModelSource = Field(description="Where the weights come from.")
    calibration: TextData = Field(description="Calibration text (seeded random windows).")
    evaluation: TextData = Field(
        description="Held-out text for perplexity (non-overlapping windows)."
    )
    quantization: Quantization = Field(
        default_factory=Quantization, description="Weight quantization."
    )
    pruning: Pruning = Field(default_factory=Pruning, description="Weight pruning (before quantization).")
    quality: Quality = Field(default_factory=Quality, description="Quality target.")
    workload: Workload = Field(default_factory=Workload, description="Serving workload to plan for.")
    planner: Planner = Field(default_factory=Planner, description="Options of the plan pass.")
    check: ExportCheck = Field(
        default_factory=ExportCheck, description="The exported pipeline's token check."
    )
    seed: int = Field(0, ge=0, description="Seed for calibration sampling and the solver.")


# --------------------------------------------------------------------------- cluster.yaml


class SkuFigures(_Strict):
    """Catalog figures; in an override every field is optional."""

    memory_gib: float | None = Field(None, gt=0, description="Device memory, GiB.")
    fp16_tflops: float | None = Field(None, gt=0, description="Dense FP16 tensor TFLOP/s.")
    bf16_tflops: float | None = Field(None, gt=0, description="Dense BF16 tensor TFLOP/s.")
    int8_tops: float | None = Field(None, gt=0, description="Dense INT8 tensor TOP/s.")
    fp8_tflops: float | None = Field(None, gt=0, description="Dense FP8 tensor TFLOP/s.")
    memory_bandwidth_gbs: float | None = Field(None, gt=0, description="Memory bandwidth, GB/s.")
    compute_capability: str | None = Field(
        None, pattern=r"^\d+\.\d+$", description="CUDA compute capability, e.g. '8.0'."
    )
    nvlink_gbs: float | None = Field(None, gt=0, description="Per-GPU NVLink bandwidth, GB/s.")
    pcie_gbs: float | None = Field(None, gt=0, description="Host link bandwidth, GB/s.")


class CustomSku(SkuFigures):
    name: str = Field(description="Name of a SKU the catalog lacks; used in gpus[].sku.")

    @model_validator(mode="after")
    def _complete(self):
        needed = ("memory_gib", "fp16_tflops", "memory_bandwidth_gbs", "compute_capability")
        missing = [f for f in needed if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a custom SKU needs {', '.join(missing)}")
        return self


class GpuGroup(_Strict):
    sku: str = Field(description="Catalog SKU name or alias (see `llmc schema --catalog`).")
    count: int = Field(1, ge=1, le=64, description="How many of this SKU in the node.")
    overrides: SkuFigures = Field(
        default_factory=SkuFigures,
        description="Figures that replace the catalog's for these devices (e.g. memory_gib after "
        "a MIG split, measured bandwidth).",
    )


class Node(_Strict):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", description="Node name (DNS label).")
    gpus: list[GpuGroup] = Field(min_length=1, description="GPU groups in this node.")
    link: Literal["nvlink", "pcie"] = Field(
        "pcie", description="Link between GPUs inside this node."
    )


class Network(_Strict):
    bandwidth_gbs: float = Field(
        12.5, gt=0, description="Inter-node bandwidth per link, GB/s (12.5 = 100 Gb/s Ethernet)."
    )


class ClusterConfig(_Strict):
    apiVersion: Literal["llmc/v1"] = Field(description="Schema version; 'llmc/v1'.")
    kind: Literal["Cluster"] = Field(description="Always 'Cluster'.")
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", description="Cluster name (DNS label).")
    nodes: list[Node] = Field(min_length=1, description="Nodes; the planner chooses their pipeline order.")
    network: Network = Field(default_factory=Network, description="Links between nodes.")
    skus: list[CustomSku] = Field(
        default_factory=list, description="SKUs the catalog lacks, declared in full."
    )
    memory_reserve_gib: float = Field(
        1.0, ge=0, description="Memory kept free per device for the runtime (CUDA context, workspace)."
    )


# --------------------------------------------------------------------------- resolved cluster


@dataclass(frozen=True)
class Device:
    """One GPU, with its figures resolved (catalog + overrides), in pipeline order."""

    name: str  # "<node>/gpu<k>"
    node: str
    sku: GpuSku
    link_to_next_bytes_s: float | None  # None for the last device


@dataclass(frozen=True)
class Cluster:
    name: str
    devices: tuple[Device, ...]
    memory_reserve_bytes: int


def _scaled(value: float, unit: float, file: str, field: str) -> float:
    """``value * unit``, refusing figures so large that the product overflows to infinity."""
    scaled = value * unit
    if not math.isfinite(scaled):
        raise ConfigError(file, field, f"{value!r} is too large to be a real figure")
    return scaled


def _apply(sku: GpuSku, figures: SkuFigures, file: str, where: str) -> GpuSku:
    """``sku`` with the figures set in ``figures`` (found at ``where`` in ``file``) replacing its own."""
    from dataclasses import replace

    changes = {}
    scale = {
        "memory_gib": ("memory_bytes", 2**30),
        "fp16_tflops": ("fp16_flops_per_s", 1e12),
        "bf16_tflops": ("bf16_flops_per_s", 1e12),
        "int8_tops": ("int8_ops_per_s", 1e12),
        "fp8_tflops": ("fp8_flops_per_s", 1e12),
        "memory_bandwidth_gbs": ("memory_bandwidth_bytes_per_s", 1e9),
        "nvlink_gbs": ("nvlink_bytes_per_s", 1e9),
        "pcie_gbs": ("pcie_bytes_per_s", 1e9),
    }
    for field, value in figures.model_dump(exclude_none=True, exclude={"name"}).items():
        if field == "compute_capability":
            changes["compute_capability"] = value
        else:
            target, unit = scale[field]
            scaled = _scaled(value, unit, file, f"{where}.{field}")
            changes[target] = int(scaled) if target == "memory_bytes" else scaled
    return replace(sku, **changes)


def resolve_cluster(config: ClusterConfig, file: str) -> Cluster:
    """Merge catalog figures, custom SKUs and overrides into devices in pipeline order."""
    catalog = load_catalog()
    custom = {}
    first: dict[str, int] = {}  # lower-cased custom SKU name -> its index in skus
    for i, entry in enumerate(config.skus):
        if lookup(entry.name, catalog) is not None:
            raise ConfigError(
                file, f"skus[{i}].name", f"'{entry.name}' is already in the catalog; use overrides instead"
            )
        if entry.name.lower() in first:
            raise ConfigError(
                file, f"skus[{i}].name", f"'{entry.name}' is a duplicate of skus[{first[entry.name.lower()]}] "
                "(SKU names are case-insensitive); declare each SKU once",
            )
        first[entry.name.lower()] = i
        base = GpuSku(
            name=entry.name, memory_bytes=0, fp16_flops_per_s=0.0, bf16_flops_per_s=None,
            int8_ops_per_s=None, fp8_flops_per_s=None, memory_bandwidth_bytes_per_s=0.0,
            compute_capability="0.0", interconnect="custom", nvlink_bytes_per_s=None,
            pcie_bytes_per_s=32e9, aliases=(),
        )
        custom[entry.name.lower()] = _apply(base, entry, file, f"skus[{i}]")

    devices: list[tuple[str, str, GpuSku, str]] = []
    for n, node in enumerate(config.nodes):
        for g, group in enumerate(node.gpus):
            sku = custom.get(group.sku.lower()) or lookup(group.sku, catalog)
            if sku is None:
                names = list(catalog) + [c.name for c in config.skus]
                hint = suggest(group.sku, catalog) or next(
                    iter(difflib.get_close_matches(group.sku, names, n=1)), None
                )
                fix = f"did you mean '{hint}'?" if hint else "declare it under 'skus:' with its figures"
                raise ConfigError(file, f"nodes[{n}].gpus[{g}].sku", f"unknown SKU '{group.sku}' ({fix})")
            sku = _apply(sku, group.overrides, file, f"nodes[{n}].gpus[{g}].overrides")
            for _ in range(group.count):
                k = sum(1 for d in devices if d[1] == node.name)
                devices.append((f"{node.name}/gpu{k}", node.name, sku, node.link))

    def one_way(sku: GpuSku, link: str) -> float:
        # The catalog quotes NVLink over both directions and PCIe per direction; a pipeline
        # hand-off uses one direction.
        if link == "nvlink" and sku.nvlink_bytes_per_s:
            return sku.nvlink_bytes_per_s / 2
        return sku.pcie_bytes_per_s

    network_bytes_s = _scaled(config.network.bandwidth_gbs, 1e9, file, "network.bandwidth_gbs")
    resolved = []
    for i, (name, node, sku, link) in enumerate(devices):
        if i + 1 == len(devices):
            bw = None
        elif devices[i + 1][1] != node:
            bw = network_bytes_s
        else:
            bw = min(one_way(sku, link), one_way(devices[i + 1][2], link))
        resolved.append(Device(name=name, node=node, sku=sku, link_to_next_bytes_s=bw))
    if len({n.name for n in config.nodes}) != len(config.nodes):
        seen = set()
        for n, node in enumerate(config.nodes):
            if node.name in seen:
                raise ConfigError(file, f"nodes[{n}].name", f"duplicate node name '{node.name}'")
            seen.add(node.name)
    return Cluster(
        name=config.name,
        devices=tuple(resolved),
        memory_reserve_bytes=int(_scaled(config.memory_reserve_gib, 2**30, file, "memory_reserve_gib")),
    )


# --------------------------------------------------------------------------- loading


def _field_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (safe_load keeps the last)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<: *anchor' merges; keys given beside it override merged ones, as YAML says
                key = self.construct_object(key_node, deep=deep)
                try:
                    line = seen.get(key)
                except TypeError:
                    continue  # unhashable key: SafeConstructor reports it
                if line is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given at line {line})", key_node.start_mark
                    )
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            str(path), f"line {line}",
            f"not valid UTF-8 (byte 0x{raw[e.start]:02X} at offset {e.start}); save the file as UTF-8",
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # safe: a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "YAML"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(str(path), where, f"invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "", "expected a mapping with apiVersion, kind, ...")
    return data


def _validate(schema: type[BaseModel], data: dict, file: str, kind: str):
    if data.get("apiVersion") not in (None, API_VERSION):
        raise ConfigError(file, "apiVersion", f"unsupported '{data['apiVersion']}' (use '{API_VERSION}')")
    if "kind" in data and data["kind"] != kind:
        raise ConfigError(file, "kind", f"expected '{kind}', got '{data['kind']}' (swapped files?)")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        # One line, first error only: follow-on errors are usually consequences of the first.
        err = e.errors()[0]
        field = _field_path(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            parent = schema
            msg = "unknown field (check the spelling; `llmc schema` lists the fields)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, FieldPathError):
            field = f"{field}.{cause.path}" if field else cause.path
        if "input" in err and err["type"] not in ("missing", "extra_forbidden") and not isinstance(err["input"], (dict, list)):
            msg += f" (got {err['input']!r})"
        raise ConfigError(file, field, msg) from None


def load_model_config(path: str | Path) -> tuple[ModelConfig, Path]:
    """Parse and validate model.yaml; returns the config and the directory paths resolve against."""
    path = Path(path)
    config = _validate(ModelConfig, _read_yaml(path), str(path), "Model")
    base = path.resolve().parent
    for field, rel in (
        ("model.path", config.model.path),
        ("calibration.path", config.calibration.path),
        ("evaluation.path", config.evaluation.path),
    ):
        if not rel.strip():
            raise ConfigError(str(path), field, "empty; give a path relative to model.yaml")
        if not (base / rel).exists():
            raise ConfigError(str(path), field, f"'{rel}' does not exist (relative to {base})")
        if field != "model.path" and not (base / rel).is_file():
            raise ConfigError(str(path), field, f"'{rel}' is not a file (expected a UTF-8 text file)")
    return config, base


def load_cluster_config(path: str | Path) -> tuple[ClusterConfig, Cluster]:
    path = Path(path)
    config = _validate(ClusterConfig, _read_yaml(path), str(path), "Cluster")
    return config, resolve_cluster(config, str(path))


def json_schemas() -> dict:
    """JSON Schema of both files, for editors (`llmc schema`)."""
    return {
        "model.yaml": ModelConfig.model_json_schema(),
        "cluster.yaml": ClusterConfig.model_json_schema(),
    }
