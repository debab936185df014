"""The program being compiled: what llmc knows and has decided about one model.

Plain frozen dataclasses, no I/O. Weights stay in files produced by passes; the program holds
*references* to them (paths relative to the compile cache, see ``llmc.pipeline``). Every pass
takes a ``Program`` and returns a new one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Linear:
    """A linear module of a transformer layer, named as in the Hugging Face model."""

    name: str  # e.g. "model.layers.3.self_attn.q_proj"
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class Layer:
    index: int
    linears: tuple[Linear, ...]

    @property
    def weight_params(self) -> int:
        return sum(lin.in_features * lin.out_features for lin in self.linears)


@dataclass(frozen=True)
class ModelInfo:
    architecture: str  # Hugging Face model_type: "llama", "qwen2", "mistral"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    dtype: str
    source_sha256: str  # of the model file(s) ingested
    checkpoint: str  # cache reference to a Hugging Face directory (safetensors, config, tokenizer)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def kv_values_per_token_per_layer(self) -> int:
        """K and V values one token adds to one layer's cache."""
        return 2 * self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class TextWindows:
    """Tokenised windows of a text file, stored as an int64 [windows, seq_len] tensor file."""

    source: str  # file name of the text, for the report
    source_sha256: str
    seq_len: int
    windows: int
    tokens_ref: str  # cache reference


@dataclass(frozen=True)
class QuantDecision:
    """How one linear module's weight is stored."""

    module: str
    method: str  # "rtn"
    bits: int
    group_size: int
    symmetric: bool
    high_rows: int = 0  # MixLLM: output features stored at 8 bits per channel beside the others


@dataclass(frozen=True)
class SparsityDecision:
    """A linear whose weight is N:M sparse along the input dimension: at most ``n`` nonzeros in
    every ``m`` consecutive input columns of an output row (2:4 is what sparse tensor cores run)."""

    module: str
    n: int
    m: int


@dataclass(frozen=True)
class Pruning:
    """What a prune pass did. ``Program.model.checkpoint`` then holds the pruned weights; after
    structured pruning its linears are smaller (the layer table has their shapes, the checkpoint's
    config.json the per-layer head and MLP counts, see ``llmc.checkpoint``)."""

    method: str  # "magnitude", "wanda", "sparsegpt", "structured"
    unpruned_checkpoint: str  # cache reference to the checkpoint before pruning: the quality reference
    modules: int  # linears pruned (unstructured) or resized (structured)
    removed_fraction: float  # of those linears' weights: zeroed, or removed with their rows/columns


@dataclass(frozen=True)
class Measurement:
    """A number that was measured (never predicted), with its protocol."""

    name: str  # e.g. "perplexity.reference"
    value: float
    unit: str
    protocol: str


@dataclass(frozen=True)
class StageMemory:
    weights: int
    kv_cache: int
    embedding: int
    lm_head: int
    activations: int
    capacity: int  # usable bytes after the runtime reserve
    reserve: int = 0  # the runtime reserve, outside capacity

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.embedding + self.lm_head + self.activations


@dataclass(frozen=True)
class Stage:
    """One pipeline stage. Predicted times are for the whole batch, split in micro-batches."""

    index: int
    device: str  # "node0/gpu1"
    sku: str
    compute_capability: str
    layer_start: int  # inclusive
    layer_end: int  # exclusive
    holds_embedding: bool
    holds_lm_head: bool
    memory: StageMemory
    layer_bits: tuple[int, ...]  # bit-width of each layer in the range (16: float)
    predicted_prefill_s: float  # busy time in the prefill: every prefill micro-batch, this stage's work
    predicted_decode_s: float  # busy time per generated token: every decode micro-batch
    predicted_transfer_s: float  # activations to the next stage, prefill + all decode steps
    cost_source: str  # "roofline" or "profile <file>"


@dataclass(frozen=True)
class Baseline:
    """A simple plan computed beside the real one, costed by the same model."""

    name: str  # "even-split" or "memory-greedy"
    description: str
    bits: int | None  # the uniform bit-width; None when no uniform width fits
    stages: tuple[str, ...]  # "box-a/gpu0: layers 0-9", in pipeline order
    prefill_micro_batch_size: int | None
    decode_micro_batch_size: int | None
    batch_latency_s: float | None  # None: it does not fit
    tokens_per_s: float | None
    plan_speedup: float | None  # the plan's throughput over this baseline's


@dataclass(frozen=True)
class WhatIf:
    """The plan re-solved with one more GPU of a SKU in the inventory."""

    sku: str
    node: str  # where it was added
    solver_status: str
    tokens_per_s: float
    speedup: float  # over the plan


@dataclass(frozen=True)
class Explanation:
    """Why the plan is what it is."""

    binding: tuple[str, ...]  # the constraints at their limit, one sentence each
    prefill_bottleneck: str  # the slowest pipeline unit in prefill (a stage or a link)
    decode_bottleneck: str
    decode_bound: str  # "round trip" (one micro-batch's pass) or "slowest unit" (x micro-batches)
    bubble_prefill: float  # idle fraction of the stages' time in the prefill
    bubble_decode: float
    bubble: float  # over the whole batch
    what_if: tuple[WhatIf, ...]


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]  # pipeline order
    layer_bits: tuple[int, ...]  # per decoder layer
    weight_bits: int  # the most common of layer_bits
    prefill_micro_batch_size: int
    prefill_micro_batches: int
    decode_micro_batch_size: int
    decode_micro_batches: int
    solver_status: str  # "OPTIMAL" or "FEASIBLE" (search limit reached; see gap)
    search: str  # the formulation and the device orders it covered
    best_bound_s: float  # proven lower bound of the batch latency
    gap: float  # (latency - bound) / latency
    predicted_prefill_s: float  # the batch's prefill through the pipeline
    predicted_decode_s: float  # every decode step of the batch
    predicted_batch_latency_s: float  # the objective: prefill + decode
    predicted_tokens_per_s: float  # generated tokens of the batch over its latency
    quality_indicator: str  # where omega came from
    quality_used: float | None  # sum of omega over the layers; None without a quality constraint
    quality_budget: float | None
    cost_source: str  # "roofline" or "roofline; profile <file> for ..."
    unused_devices: tuple[str, ...]
    baselines: tuple[Baseline, ...] = ()
    explanation: Explanation | None = None


@dataclass(frozen=True)
class LinearSensitivity:
    """Both per-layer indicators of one linear at each of ``Sensitivity.bits`` (passes/sensitivity.py)."""

    module: str
    params: int
    hessian_trace: tuple[float, ...]  # tr(δ H δᵀ)
    variance: tuple[float, ...]  # LLM-PQ: sum of s² / 12 · Var[x]


@dataclass(frozen=True)
class Sensitivity:
    """omega(layer, bits): the quality cost of storing each decoder layer at each bit-width
    (larger: more quality lost), for the planner's budget sum omega <= Q."""

    indicator: str  # e.g. "llm-pq-variance", "hessian-trace"
    bits: tuple[int, ...]  # the bit-widths costed, ascending
    omega: tuple[tuple[float, ...], ...]  # [layer][k]: omega of the layer at bits[k]
    linears: tuple[LinearSensitivity, ...] = ()  # per linear, both indicators (the sensitivity pass)
    salience: str | None = None  # cache reference: MixLLM salience per output feature, by module
    salience_bits: int | None = None  # the low width the salience was computed at


@dataclass(frozen=True)
class PrecisionChoice:
    """A linear's width chosen by the mixed-precision policy (passes/mixed_precision.py)."""

    module: str
    bits: int  # 16: kept float
    group_size: int  # -1: one scale per output channel (the 8-bit choices)
    symmetric: bool
    high_rows: int = 0  # MixLLM: output features stored at ``MixedPrecision.high_bits``, per channel


@dataclass(frozen=True)
class MixedPrecision:
    """What the quantizers apply over ``quantization``'s defaults; explicit overrides are never in it."""

    policy: str  # one line: how the widths were chosen
    modules: tuple[PrecisionChoice, ...]
    average_bits: float  # stored bits per quantized weight: codes, scales, zero points, row indices
    high_bits: int | None = None  # MixLLM's width of the salient output features
    rows: str | None = None  # cache reference: int32 indices of the high rows, by module


@dataclass(frozen=True)
class EngineBuild:
    """The TensorRT engine of one stage for one device type: built here, or skipped with the
    command that builds it on a host that can (``OUT`` stands for the build directory)."""

    stage: int
    sku: str
    compute_capability: str  # the target, "8.0"
    status: str  # "built" or "skipped"
    path: str | None  # "engines/<sku>-sm<cc>-<flavor><version>/stage_<k>.engine"; None when skipped
    flavor: str | None  # "tensorrt_rtx 1.7.1.116"; None when skipped
    plugins: tuple[str, ...]  # "llmc::IntNLinear v1 x56", one per plugin type inside
    sparse_weights: bool  # TensorRT's sparse-weights flag (the stage holds N:M sparse linears)
    reason: str  # why it was skipped; "" when built
    command: str  # "llmc build-engines OUT --device H100-80G"


@dataclass(frozen=True)
class Artifact:
    """A file that goes into the output directory."""

    path: str  # relative to the output directory
    ref: str  # cache reference of its content
    kind: str  # "onnx", "manifest", "report", ...


@dataclass(frozen=True)
class Program:
    model: ModelInfo | None = None
    layers: tuple[Layer, ...] = ()
    calibration: TextWindows | None = None
    evaluation: TextWindows | None = None
    quantization: tuple[QuantDecision, ...] = ()
    quantized_weights: str | None = None  # cache reference to packed weights (safetensors)
    sparsity: tuple[SparsityDecision, ...] = ()
    pruning: Pruning | None = None
    sensitivity: Sensitivity | None = None
    plan: Plan | None = None
    precision: MixedPrecision | None = None
    measurements: tuple[Measurement, ...] = ()
    artifacts: tuple[Artifact, ...] = field(default_factory=tuple)
    engines: tuple[EngineBuild, ...] = ()

    def measurement(self, name: str) -> Measurement | None:
        return next((m for m in self.measurements if m.name == name), None)


def dump_program(program: Program) -> str:
    """A stable, sorted text dump for ``--print-after`` and golden files."""
    return json.dumps(asdict(program), indent=1, sort_keys=True)
