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


@dataclass(frozen=True)
class SparsityDecision:
    """A linear whose weight is N:M sparse along the input dimension: at most ``n`` nonzeros in
    every ``m`` consecutive input columns of an output row (2:4 is what sparse tensor cores run)."""

    module: str
    n: int
    m: int


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

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.embedding + self.lm_head + self.activations


@dataclass(frozen=True)
class Stage:
    index: int
    device: str  # "node0/gpu1"
    sku: str
    compute_capability: str
    layer_start: int  # inclusive
    layer_end: int  # exclusive
    holds_embedding: bool
    holds_lm_head: bool
    memory: StageMemory
    predicted_prefill_s: float  # whole batch prompt, this stage's layers
    predicted_decode_s: float  # one generated token for the whole batch
    predicted_transfer_s: float  # activations to the next stage, prefill + all decode steps


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]
    weight_bits: int
    solver_status: str  # "OPTIMAL" or "FEASIBLE"
    objective_s: float  # slowest stage's time for one batch (prefill + decode + transfer)
    best_bound_s: float
    predicted_batch_latency_s: float  # one batch through all stages, one micro-batch
    predicted_tokens_per_s: float
    unused_devices: tuple[str, ...]


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
    plan: Plan | None = None
    measurements: tuple[Measurement, ...] = ()
    artifacts: tuple[Artifact, ...] = field(default_factory=tuple)
    engines: tuple[EngineBuild, ...] = ()

    def measurement(self, name: str) -> Measurement | None:
        return next((m for m in self.measurements if m.name == name), None)


def dump_program(program: Program) -> str:
    """A stable, sorted text dump for ``--print-after`` and golden files."""
    return json.dumps(asdict(program), indent=1, sort_keys=True)
