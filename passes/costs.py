"""The planner's cost model: pure functions from shapes, devices and a workload to seconds and bytes.

No solver, no torch, no file I/O. The rules, referred to by number from the code and from
docs/planner.md:

1. Prefill of one micro-batch (``p`` prompts of ``s`` tokens) through one decoder layer is
   compute-bound: ``max(FLOPs / fp16 rate, bytes / bandwidth)`` plus the dequantization of the
   layer's quantized weights (materialising them in fp16 once per micro-batch: 2 bytes written
   per quantized weight, over the memory bandwidth). FLOPs are 2 per weight per token plus
   causal attention, ``2 s (s + 1) x width`` per sequence.
2. One decode step of a micro-batch of ``q`` sequences through one layer is memory-bound:
   ``max(FLOPs / fp16 rate, (weight bytes + K/V bytes read) / bandwidth)`` at the mean decode
   context. The step is costed at the mean context because the roofline is linear in it
   wherever the memory term wins; a fused weight-only kernel reads the packed weights.
3. Weight-only quantization computes at the fp16 rate: the int8 rate would need int8
   activations, which llmc does not emit. Weights are stored at the width the export gives
   their codes (:func:`stored_bits`).
4. The embedding (a gather, on the first stage) and the LM head (on the last stage, fp16, the
   last position only in prefill and every step in decode) are costed once per stage, not per
   layer.
5. A hand-off sends the fp16 hidden state of the micro-batch (every prompt token in prefill,
   one token per sequence in decode) over the link between the two devices.
6. Memory per stage: the layers' weights at their bit-widths with scales, the KV cache of the
   whole batch at full context (prompt + generated) for the stage's layers, the embedding and
   the LM head once (a tied matrix once when one device holds both), the activation workspace
   of one prefill micro-batch, and the runtime reserve (already taken off the capacity).
7. A measured profile replaces rules 1 and 2 for every (SKU, phase, bits) it covers.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

FP16_BYTES = 2


# ---------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class DeviceSpec:
    """One GPU of the inventory; ``memory_bytes`` is what is usable after the runtime reserve."""

    name: str  # "<node>/gpu<k>"
    sku: str
    node: str
    memory_bytes: int
    fp16_flops: float
    memory_bandwidth: float

    def __post_init__(self):
        if self.memory_bytes < 0:
            raise ValueError(f"device {self.name}: memory_bytes must be >= 0")
        if not (self.fp16_flops > 0 and self.memory_bandwidth > 0):
            raise ValueError(f"device {self.name}: fp16_flops and memory_bandwidth must be > 0")

    @property
    def figures(self) -> tuple:
        """What makes two devices interchangeable: everything but the name."""
        return (self.sku, self.node, self.memory_bytes, self.fp16_flops, self.memory_bandwidth)


@dataclass(frozen=True)
class Links:
    """Hand-off bandwidths, bytes/s one way: per node between its GPUs, and between nodes.

    Two devices of one node talk at the node's intra-node bandwidth (the slowest of its GPUs'
    links), devices of different nodes at the network bandwidth.
    """

    intra_node: tuple[tuple[str, float], ...]  # (node, bytes/s); nodes with one GPU may be absent
    network: float | None  # None for a single-node cluster

    def bandwidth(self, a: DeviceSpec, b: DeviceSpec) -> float:
        if a.node == b.node:
            return dict(self.intra_node)[a.node]
        if self.network is None:
            raise ValueError(f"no network bandwidth between {a.node} and {b.node}")
        return self.network


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer, as the cost model sees it."""

    weight_params: int  # weights of its linears
    hidden_size: int
    attention_width: int  # query heads x head dim
    kv_bytes_per_token: int  # fp16 K and V one token adds to this layer's cache
    workspace_values_per_token: int  # largest live activations per token in prefill

    @classmethod
    def from_dims(
        cls,
        hidden_size: int,
        intermediate_size: int,
        num_attention_heads: int,
        num_key_value_heads: int,
        head_dim: int | None = None,
        gated_mlp: bool = True,
    ) -> LayerShape:
        """q/k/v/o projections (GQA) and an MLP of three matrices (gated) or two (OPT, BLOOM)."""
        head_dim = head_dim or hidden_size // num_attention_heads
        q_width = num_attention_heads * head_dim
        kv_width = num_key_value_heads * head_dim
        mlp_matrices = 3 if gated_mlp else 2
        params = 2 * hidden_size * q_width + 2 * hidden_size * kv_width
        params += mlp_matrices * hidden_size * intermediate_size
        workspace = hidden_size + (mlp_matrices - 1) * intermediate_size
        return cls(params, hidden_size, q_width, 2 * kv_width * FP16_BYTES, workspace)


@dataclass(frozen=True)
class LayerChoice:
    """One way to store a layer: its bit-width label, stored bytes and the weights to dequantize."""

    bits: int  # 16: float
    weight_bytes: float  # values, scales and zero points of the layer's linears
    quantized_params: int  # weights dequantized on the fly (0 in float)


def stored_bits(bits: int, asymmetric: bool = False) -> int:
    """The width a ``bits``-bit integer code is stored at in the exported graphs and engines
    (``passes/export.py``): symmetric int2 in the int4 container behind ``DequantizeLinear``; every
    other width as itself (int3 in the ``Int3Linear`` plugin's two planes, FP6 in 6 bits)."""
    if bits == 2 and not asymmetric:
        return 4
    return bits


def bytes_per_weight(bits: int, group_size: int, asymmetric: bool = False) -> float:
    """Stored bytes per weight: the packed value at its stored width (:func:`stored_bits`), one
    fp16 scale per group and, for asymmetric schemes, one fp16 zero point per group (the layout
    of llmc's int-N kernels and of the IntNLinear plugin's inputs)."""
    if bits >= 16:
        return float(FP16_BYTES)
    per_group = FP16_BYTES * (2 if asymmetric else 1)
    return stored_bits(bits, asymmetric) / 8 + per_group / group_size


def uniform_choice(shape: LayerShape, bits: int, group_size: int = 128, asymmetric: bool = False) -> LayerChoice:
    """Every linear of the layer at ``bits`` (group-wise, fp16 scales); 16 is float."""
    if bits >= 16:
        return LayerChoice(16, shape.weight_params * float(FP16_BYTES), 0)
    return LayerChoice(bits, shape.weight_params * bytes_per_weight(bits, group_size, asymmetric), shape.weight_params)


@dataclass(frozen=True)
class Workload:
    """What the plan serves at once: ``batch`` sequences of prompt plus generation."""

    batch: int
    prompt_tokens: int
    generated_tokens: int

    def __post_init__(self):
        if self.batch < 1 or self.prompt_tokens < 1 or self.generated_tokens < 1:
            raise ValueError("workload needs batch, prompt_tokens and generated_tokens >= 1")

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens

    @property
    def decode_steps(self) -> int:
        """The prefill's logits give the first token; every further token is one decode step."""
        return self.generated_tokens - 1

    @property
    def mean_decode_context(self) -> float:
        # Step k (1..n-1) attends to prompt + k tokens.
        return self.prompt_tokens + self.generated_tokens / 2


@dataclass(frozen=True)
class ProfilePoint:
    batch: int
    seq_len: int
    seconds: float


@dataclass(frozen=True)
class MeasuredProfile:
    """Measured decoder-layer latencies per (SKU, phase, bits) (rule 7; llmc/profiles.py reads
    the file). ``seq_len`` is the prompt length in prefill and the context length in decode."""

    source: str  # the file name, for the report
    entries: tuple[tuple[tuple[str, str, int], tuple[ProfilePoint, ...]], ...]

    def covers(self, sku: str, phase: str, bits: int) -> bool:
        return any(key == (sku, phase, bits) for key, _ in self.entries)

    def seconds(self, sku: str, phase: str, bits: int, batch: int, seq_len: float) -> float | None:
        """Interpolated latency, or None where the profile has no such (SKU, phase, bits).

        Linear between measured points, first along the batch at each measured length, then
        along the length; outside the measured range, proportional to the nearest point
        (time ~ batch, time ~ length).
        """
        points = next((p for key, p in self.entries if key == (sku, phase, bits)), None)
        if points is None:
            return None
        by_length: dict[int, list[tuple[float, float]]] = {}
        for point in points:
            by_length.setdefault(point.seq_len, []).append((point.batch, point.seconds))
        along_batch = [(length, _interpolate(sorted(rows), batch)) for length, rows in sorted(by_length.items())]
        return _interpolate(along_batch, seq_len)


def _interpolate(points: list[tuple[float, float]], x: float) -> float:
    xs = [p[0] for p in points]
    if x <= xs[0]:
        return points[0][1] * x / xs[0]
    if x >= xs[-1]:
        return points[-1][1] * x / xs[-1]
    k = bisect.bisect_right(xs, x)
    (x0, y0), (x1, y1) = points[k - 1], points[k]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


# ---------------------------------------------------------------------------------- rules 1-5


def layer_prefill_s(device: DeviceSpec, shape: LayerShape, choice: LayerChoice, micro_batch: int,
                    workload: Workload, profile: MeasuredProfile | None = None) -> float:
    """Rule 1 (rule 7 where profiled): one prefill micro-batch through one layer."""
    s = workload.prompt_tokens
    if profile is not None:
        measured = profile.seconds(device.sku, "prefill", choice.bits, micro_batch, s)
        if measured is not None:
            return measured
    tokens = micro_batch * s
    flops = 2.0 * shape.weight_params * tokens + micro_batch * 2.0 * s * (s + 1) * shape.attention_width
    moved = choice.weight_bytes + shape.kv_bytes_per_token * tokens
    dequantize = choice.quantized_params * FP16_BYTES / device.memory_bandwidth
    return max(flops / device.fp16_flops, moved / device.memory_bandwidth) + dequantize


def layer_decode_s(device: DeviceSpec, shape: LayerShape, choice: LayerChoice, micro_batch: int,
                   workload: Workload, profile: MeasuredProfile | None = None) -> float:
    """Rule 2 (rule 7 where profiled): one decode step of a micro-batch through one layer."""
    context = workload.mean_decode_context
    if profile is not None:
        measured = profile.seconds(device.sku, "decode", choice.bits, micro_batch, context)
        if measured is not None:
            return measured
    flops = micro_batch * (2.0 * shape.weight_params + 4.0 * context * shape.attention_width)
    moved = choice.weight_bytes + shape.kv_bytes_per_token * micro_batch * context
    return max(flops / device.fp16_flops, moved / device.memory_bandwidth)


def embedding_s(device: DeviceSpec, hidden_size: int, tokens: int) -> float:
    """Rule 4: gathering ``tokens`` rows of the fp16 embedding."""
    return tokens * hidden_size * FP16_BYTES / device.memory_bandwidth


def lm_head_s(device: DeviceSpec, hidden_size: int, vocab_size: int, rows: int) -> float:
    """Rule 4: logits for ``rows`` positions through the fp16 LM head."""
    flops = 2.0 * hidden_size * vocab_size * rows
    moved = hidden_size * vocab_size * FP16_BYTES + rows * vocab_size * 4
    return max(flops / device.fp16_flops, moved / device.memory_bandwidth)


def hand_off_s(bandwidth: float, hidden_size: int, tokens: int) -> float:
    """Rule 5: the fp16 hidden state of ``tokens`` tokens over one link."""
    return tokens * hidden_size * FP16_BYTES / bandwidth


def kv_cache_bytes(shape: LayerShape, workload: Workload) -> int:
    """Rule 6: one layer's K/V for the whole batch at full context."""
    return shape.kv_bytes_per_token * workload.batch * workload.context_tokens


def workspace_bytes(shapes: tuple[LayerShape, ...], micro_batch: int, workload: Workload) -> int:
    """Rule 6: the largest live activations of one prefill micro-batch, fp16."""
    widest = max(shape.workspace_values_per_token for shape in shapes)
    return widest * micro_batch * workload.prompt_tokens * FP16_BYTES


def micro_batches(batch: int, size: int) -> int:
    """How many micro-batches of at most ``size`` sequences the batch makes."""
    return math.ceil(batch / size)


# ---------------------------------------------------------------------------------- pipeline time


def pipeline_seconds(prefill_units: list[float], prefill_count: int, decode_units: list[float],
                     decode_count: int, decode_steps: int) -> tuple[float, float]:
    """(prefill, decode) seconds of one batch through a pipeline.

    ``*_units`` are the times of one micro-batch on each pipeline unit, stages and the links
    between them alike (a link is a resource of its own). Prefill: the first micro-batch
    crosses every unit, each later one leaves the slowest unit one slot later, so
    ``sum + (m - 1) x max``. Decode: a token of a micro-batch needs the previous token of the
    same micro-batch to have crossed the whole pipeline, and the slowest unit serves every
    micro-batch once per token, so each token takes ``max(sum, m x max)``.
    """
    prefill = sum(prefill_units) + (prefill_count - 1) * max(prefill_units)
    decode = decode_steps * max(sum(decode_units), decode_count * max(decode_units))
    return prefill, decode
