"""`export`: one ONNX graph per pipeline stage of a Llama-family decoder, with a KV cache.

The graphs are written node by node with ``onnx.helper`` rather than traced, so that names are
ours and stable and quantized weights stay packed as integer initializers. Opset 21, float32
activations. A quantized linear is lowered by its format (:func:`linear_lowering`):

1. symmetric int8, int4, and int2 (whose codes fit int4 exactly): ``DequantizeLinear``
   (zero point 0, blocks along the input dimension) + ``MatMul``, which TensorRT runs natively
   with the weights packed;
2. asymmetric int2/4: an ``llmc.IntNLinear`` node, the TensorRT plugin of
   :mod:`llmc.plugins.intn_linear_plugin` (TensorRT rejects a non-zero int4 zero point), its
   weights in the Triton kernel's bit-plane layout. The model carries the op's ONNX function
   body, which ONNX Runtime inlines, so the file the engines are built from is the file the
   checker runs.
3. int3, symmetric or not: an ``llmc.Int3Linear`` node (same module; TensorRT has no 3-bit
   type), its codes in 3 bits a weight (a 2-bit and a 1-bit plane, the int3 kernels' layout),
   float16 scales, and its function body in the model as for rule 2.
4. FP6 (e3m2, e2m3) and FP4 (e2m1) weights (``method: fpx``): an ``llmc.Fp6Linear`` or
   ``llmc.Fp4Linear`` node, the plugins of :mod:`llmc.plugins.fpx_linear_plugin` (TensorRT has
   no 6-bit type), the codes at their own width in the kernels' bit planes, float16 scales, and
   the ops' function bodies in the model as for rule 2. FP8 e4m3 is not exported.
5. a MixLLM output-feature mix (:class:`llmc.packed.MixedRowLinear`): its low rows and its
   8-bit rows each lowered by rule 1, 2 or 3 into their own product, the two outputs concatenated
   along the features and put back in output order by one ``Gather`` with the inverse row order.

Stage interface (layers ``[layer_start, layer_end)``):

- inputs: ``input_ids`` int64 [batch, seq] on the first stage, ``hidden_states_in`` float32
  [batch, seq, hidden] on the others; ``position_ids`` int64 [batch, seq] on every stage; and
  per layer ``i`` of the stage ``past_key_<i>`` / ``past_value_<i>`` float32
  [batch, kv_heads, past_seq, head_dim] (``past_seq`` 0 for a prefill).
- outputs: ``logits`` float32 [batch, seq, vocab] on the last stage, ``hidden_states_out``
  on the others; per layer ``present_key_<i>`` / ``present_value_<i>``, the past with this
  call's keys and values appended.

``position_ids`` drive RoPE only. The causal mask is built from cache slots: query ``s`` of this
call sits in slot ``past_seq + s`` and sees slots ``<= past_seq + s``. That is the Hugging Face
mask whenever the cache holds the sequence in order without padding, which is what
:func:`run_stages_greedy` feeds.

The checker half (:func:`run_stages_greedy`, :func:`hf_greedy_reference`,
:func:`compare_with_reference`) runs the stages in ONNX Runtime on the CPU and compares greedy
tokens and first-step logits with the Hugging Face model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

OPSET = 21
# IR 10 is the version that introduced opset 21; pinning it keeps the files loadable by
# runtimes (TensorRT, older ORT) that reject newer IR versions they do not need.
IR_VERSION = 10
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# RoPE variants whose frequencies change with the sequence length at run time; a static
# inv_freq initializer cannot express them.
_RUNTIME_ROPE_TYPES = ("dynamic", "longrope")
_ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DecoderSpec:
    """The architecture numbers a Llama-family decoder graph is built from."""

    model_type: str
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    vocab_size: int
    num_hidden_layers: int
    tie_word_embeddings: bool
    # q/k/v (and for Llama's attention_bias also o) carry biases. The graph adds a bias
    # wherever the weights hold one; this records what the config promises.
    attention_bias: bool
    # RoPE as the model computes it: cos/sin = cos/sin(position * inv_freq) * attention_scaling.
    rope_inv_freq: tuple[float, ...]
    rope_attention_scaling: float


def decoder_spec_from_config(
    hf_config,
    rope_inv_freq: tuple[float, ...] | None = None,
    rope_attention_scaling: float = 1.0,
) -> DecoderSpec:
    """The spec of a Llama / Qwen2 / Mistral config.

    Without ``rope_inv_freq`` only unscaled RoPE (rope_type "default") can be derived from the
    config; scaled variants need :func:`decoder_spec_from_model`, which reads the frequencies
    the model itself uses.
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported by the ONNX export; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    _reject_sliding_window(hf_config)
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf_config.hidden_act!r} is not supported; the export emits SiLU")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported by the ONNX export")

    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in _RUNTIME_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} depends on the sequence length at run time; not supported")
    if rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial rotary embeddings are not supported; the export rotates the whole head")

    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    if rope_inv_freq is None:
        if rope_type != "default":
            raise ValueError(
                f"rope_type {rope_type!r}: the frequencies come from the model; use decoder_spec_from_model"
            )
        theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        rope_inv_freq = _default_inv_freq(theta, head_dim)
    if len(rope_inv_freq) != head_dim // 2:
        raise ValueError(f"RoPE has {len(rope_inv_freq)} frequencies; head_dim {head_dim} needs {head_dim // 2}")

    return DecoderSpec(
        model_type=model_type,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=heads,
        num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=hf_config.intermediate_size,
        rms_norm_eps=float(hf_config.rms_norm_eps),
        vocab_size=hf_config.vocab_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
        rope_inv_freq=tuple(float(f) for f in rope_inv_freq),
        rope_attention_scaling=float(rope_attention_scaling),
    )


def decoder_spec_from_model(hf_model) -> DecoderSpec:
    """The spec of a loaded causal LM, RoPE taken from its rotary module so scaled variants stay exact."""
    rotary = hf_model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().to("cpu").float().tolist()
    return decoder_spec_from_config(hf_model.config, tuple(inv_freq), float(rotary.attention_scaling))


def _reject_sliding_window(hf_config) -> None:
    layer_types = getattr(hf_config, "layer_types", None) or ()
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"layer types {sorted(set(layer_types))}: sliding-window attention is not supported")
    window = getattr(hf_config, "sliding_window", None)
    # Qwen2 configs carry a window that only applies with use_sliding_window.
    in_use = getattr(hf_config, "use_sliding_window", True)
    if window is not None and in_use and window < hf_config.max_position_embeddings:
        raise ValueError(
            f"sliding_window {window} < max_position_embeddings {hf_config.max_position_embeddings}: "
            "sliding-window attention is not supported"
        )


def _default_inv_freq(theta: float, head_dim: int) -> tuple[float, ...]:
    import torch

    # Same arithmetic as transformers' default RoPE init, so the float32 values match bit for bit.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return tuple((1.0 / (theta**exponents)).tolist())


# --- graph construction -------------------------------------------------------------------


class _GraphBuilder:
    """Nodes and initializers in insertion order, with names checked unique (order is the format)."""

    def __init__(self):
        self.nodes = []
        self.initializers = []
        self.custom_ops = set()  # (domain, op_type) of the plugin nodes
        self._initializer_values = {}
        self._names = set()

    def op(self, op_type: str, inputs: list[str], name: str, outputs: list[str] | None = None, **attrs):
        """Add a node; returns its output name (or names, when ``outputs`` lists several)."""
        from onnx import helper

        outputs = outputs or [name]
        if name in self._names:
            raise RuntimeError(f"duplicate node name {name}")
        self._names.add(name)
        if attrs.get("domain"):
            self.custom_ops.add((attrs["domain"], op_type))
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def initializer(self, name: str, array: np.ndarray) -> str:
        """Register a constant once; a second request under the same name must hold the same value."""
        from onnx import numpy_helper

        if name in self._initializer_values:
            if not np.array_equal(self._initializer_values[name], array):
                raise RuntimeError(f"initializer {name} registered twice with different values")
            return name
        self._initializer_values[name] = array
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def int64s(self, name: str, values) -> str:
        return self.initializer(f"const/{name}", np.asarray(values, dtype=np.int64))

    def float32(self, name: str, value: float) -> str:
        return self.initializer(f"const/{name}", np.asarray(value, dtype=np.float32))


def build_stage_graph(
    spec: DecoderSpec,
    weights: dict,
    layer_start: int,
    layer_end: int,
    quantized: dict | None = None,
):
    """The ONNX model of decoder layers ``[layer_start, layer_end)``.

    The first stage (``layer_start == 0``) embeds ``input_ids``; the last stage
    (``layer_end == num_hidden_layers``) applies the final norm and the LM head. ``weights``
    maps Hugging Face state-dict names to tensors; ``quantized`` maps linear module names
    (``model.layers.3.mlp.down_proj``, or ``lm_head``) to :class:`llmc.packed.PackedLinear`,
    exported as packed integers behind ``DequantizeLinear``. Identical arguments give
    byte-identical ``SerializeToString()``.
    """
    from onnx import TensorProto, helper

    if not 0 <= layer_start < layer_end <= spec.num_hidden_layers:
        raise ValueError(
            f"stage layers [{layer_start}, {layer_end}) must be a non-empty range within "
            f"the model's {spec.num_hidden_layers} layers"
        )
    quantized = quantized or {}
    first, last = layer_start == 0, layer_end == spec.num_hidden_layers
    g = _GraphBuilder()

    inputs = []
    if first:
        inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]))
        embedding = g.initializer("model.embed_tokens.weight", _float32(weights["model.embed_tokens.weight"]))
        hidden = g.op("Gather", [embedding, "input_ids"], "embed_tokens", axis=0)
    else:
        hidden_dims = ["batch", "seq", spec.hidden_size]
        inputs.append(helper.make_tensor_value_info("hidden_states_in", TensorProto.FLOAT, hidden_dims))
        hidden = "hidden_states_in"
    inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]))
    outputs = []
    for i in range(layer_start, layer_end):
        kv_heads = layer_heads(spec, weights, i)[1]
        kv_dims = ["batch", kv_heads, "past_seq", spec.head_dim]
        present_dims = ["batch", kv_heads, "total_seq", spec.head_dim]
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", TensorProto.FLOAT, kv_dims))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", TensorProto.FLOAT, present_dims))

    cos, sin = _rope_tables(g, spec)
    allowed = _causal_mask(g, f"past_key_{layer_start}")
    for i in range(layer_start, layer_end):
        hidden = _decoder_layer(g, spec, weights, quantized, i, hidden, cos, sin, allowed)

    if last:
        normed = _rms_norm(g, hidden, "model.norm", weights, spec.rms_norm_eps)
        if spec.tie_word_embeddings and "lm_head" not in quantized:
            # Tied: reuse the embedding matrix [vocab, hidden] rather than store a transposed copy.
            embedding = g.initializer("model.embed_tokens.weight", _float32(weights["model.embed_tokens.weight"]))
            head = g.op("Transpose", [embedding], "lm_head/weight_T", perm=[1, 0])
            g.op("MatMul", [normed, head], "lm_head/MatMul", outputs=["logits"])
        else:
            _linear(g, normed, "lm_head", weights, quantized, output="logits")
        outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", spec.vocab_size]))
    else:
        g.op("Identity", [hidden], "hidden_states_out", outputs=["hidden_states_out"])
        outputs.insert(
            0, helper.make_tensor_value_info("hidden_states_out", TensorProto.FLOAT, ["batch", "seq", spec.hidden_size])
        )

    graph = helper.make_graph(
        g.nodes, f"{spec.model_type}_layers_{layer_start}_{layer_end}", inputs, outputs, g.initializers
    )
    from llmc.plugins.trt_plugins import onnx_functions

    opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in sorted({d for d, _ in g.custom_ops})]
    model = helper.make_model(
        graph, opset_imports=opsets, producer_name="llmc", functions=onnx_functions(g.custom_ops)
    )
    model.ir_version = IR_VERSION
    return model


def _rope_tables(g: _GraphBuilder, spec: DecoderSpec) -> tuple[str, str]:
    """cos and sin [batch, 1, seq, head_dim], computed once per stage and shared by its layers."""
    from onnx import TensorProto

    inv_freq = g.initializer("rope/inv_freq", np.asarray(spec.rope_inv_freq, dtype=np.float32))
    positions = g.op("Cast", ["position_ids"], "rope/positions", to=TensorProto.FLOAT)
    positions = g.op("Unsqueeze", [positions, g.int64s("axes_last", [-1])], "rope/positions_col")
    freqs = g.op("Mul", [positions, inv_freq], "rope/freqs")
    # HF duplicates the half-size frequencies to full head_dim (rotate-half convention).
    angles = g.op("Concat", [freqs, freqs], "rope/angles", axis=-1)
    scaling = g.float32("rope/attention_scaling", spec.rope_attention_scaling)
    tables = []
    for fn in ("Cos", "Sin"):
        table = g.op(fn, [angles], f"rope/{fn.lower()}")
        table = g.op("Mul", [table, scaling], f"rope/{fn.lower()}_scaled")
        tables.append(g.op("Unsqueeze", [table, g.int64s("axes_1", [1])], f"rope/{fn.lower()}_heads"))
    return tables[0], tables[1]


def _causal_mask(g: _GraphBuilder, past_key: str) -> str:
    """Boolean [seq, past_seq + seq]: query s (in cache slot past_seq + s) sees slots <= its own."""
    past_len = g.op("Shape", [past_key], "mask/past_len", start=2, end=3)
    seq_len = g.op("Shape", ["position_ids"], "mask/seq_len", start=1, end=2)
    total_len = g.op("Add", [past_len, seq_len], "mask/total_len")
    zero = g.initializer("const/scalar_0", np.asarray(0, np.int64))
    one = g.initializer("const/scalar_1", np.asarray(1, np.int64))
    seq_scalar = g.op("Squeeze", [seq_len], "mask/seq_scalar")
    total_scalar = g.op("Squeeze", [total_len], "mask/total_scalar")
    query_range = g.op("Range", [zero, seq_scalar, one], "mask/query_range")
    query_slots = g.op("Add", [query_range, past_len], "mask/query_slots")
    query_slots = g.op("Unsqueeze", [query_slots, g.int64s("axes_last", [-1])], "mask/query_col")
    key_slots = g.op("Range", [zero, total_scalar, one], "mask/key_slots")
    return g.op("LessOrEqual", [key_slots, query_slots], "mask/allowed")


def _decoder_layer(g, spec, weights, quantized, i, hidden, cos, sin, allowed) -> str:
    prefix = f"model.layers.{i}"
    normed = _rms_norm(g, hidden, f"{prefix}.input_layernorm", weights, spec.rms_norm_eps)
    attended = _attention(g, spec, weights, quantized, i, normed, cos, sin, allowed)
    hidden = g.op("Add", [hidden, attended], f"{prefix}/attn_residual")

    normed = _rms_norm(g, hidden, f"{prefix}.post_attention_layernorm", weights, spec.rms_norm_eps)
    mlp = f"{prefix}.mlp"
    gate = _linear(g, normed, f"{mlp}.gate_proj", weights, quantized)
    up = _linear(g, normed, f"{mlp}.up_proj", weights, quantized)
    # SiLU written as x * sigmoid(x): opset 21 has no SiLU op.
    activated = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{mlp}/gate_sigmoid")], f"{mlp}/gate_silu")
    down = _linear(g, g.op("Mul", [activated, up], f"{mlp}/gated"), f"{mlp}.down_proj", weights, quantized)
    return g.op("Add", [hidden, down], f"{prefix}/mlp_residual")


def _attention(g, spec, weights, quantized, i, normed, cos, sin, allowed) -> str:
    attn = f"model.layers.{i}.self_attn"
    heads, kv_heads = layer_heads(spec, weights, i)
    head_dim = spec.head_dim

    def split_heads(x, count, name):
        # [B, S, count * D] -> [B, count, S, D]; Reshape's 0 keeps batch and seq dynamic.
        x = g.op("Reshape", [x, g.int64s(f"heads_{count}", [0, 0, count, head_dim])], f"{attn}/{name}_split")
        return g.op("Transpose", [x], f"{attn}/{name}_heads", perm=[0, 2, 1, 3])

    q = split_heads(_linear(g, normed, f"{attn}.q_proj", weights, quantized), heads, "q")
    k = split_heads(_linear(g, normed, f"{attn}.k_proj", weights, quantized), kv_heads, "k")
    v = split_heads(_linear(g, normed, f"{attn}.v_proj", weights, quantized), kv_heads, "v")
    q = _apply_rope(g, q, cos, sin, f"{attn}/q_rope")
    k = _apply_rope(g, k, cos, sin, f"{attn}/k_rope")
    keys = g.op("Concat", [f"past_key_{i}", k], f"{attn}/present_key", outputs=[f"present_key_{i}"], axis=2)
    values = g.op("Concat", [f"past_value_{i}", v], f"{attn}/present_value", outputs=[f"present_value_{i}"], axis=2)

    repeats = heads // kv_heads
    if repeats > 1:
        # GQA as HF's repeat_kv: kv head j serves query heads j*repeats .. j*repeats + repeats - 1.
        def repeat_kv(x, name):
            x = g.op("Unsqueeze", [x, g.int64s("axes_2", [2])], f"{attn}/{name}_unsqueeze")
            x = g.op("Expand", [x, g.int64s(f"repeat_{repeats}", [1, 1, repeats, 1, 1])], f"{attn}/{name}_expand")
            shape = g.int64s(f"heads_{heads}_any_len", [0, heads, -1, head_dim])
            return g.op("Reshape", [x, shape], f"{attn}/{name}_repeat")

        keys, values = repeat_kv(keys, "keys"), repeat_kv(values, "values")

    keys_t = g.op("Transpose", [keys], f"{attn}/keys_t", perm=[0, 1, 3, 2])
    scores = g.op("MatMul", [q, keys_t], f"{attn}/scores")
    scores = g.op("Mul", [scores, g.float32(f"attn_scale_{head_dim}", head_dim**-0.5)], f"{attn}/scores_scaled")
    # Masked scores take the lowest finite float rather than -inf, which some runtimes turn into NaN.
    lowest = g.float32("lowest_float32", float(np.finfo(np.float32).min))
    scores = g.op("Where", [allowed, scores, lowest], f"{attn}/scores_masked")
    probs = g.op("Softmax", [scores], f"{attn}/probs", axis=-1)
    context = g.op("MatMul", [probs, values], f"{attn}/context")
    context = g.op("Transpose", [context], f"{attn}/context_t", perm=[0, 2, 1, 3])
    merged_shape = g.int64s(f"merge_{heads * head_dim}", [0, 0, heads * head_dim])
    context = g.op("Reshape", [context, merged_shape], f"{attn}/context_merged")
    return _linear(g, context, f"{attn}.o_proj", weights, quantized)


def layer_heads(spec: DecoderSpec, weights, i: int) -> tuple[int, int]:
    """Query and key/value heads of layer ``i``, from its projections' widths: structured pruning
    (passes/prune_structured.py) leaves layers with fewer heads than the config's."""
    attn = f"model.layers.{i}.self_attn"
    return (weights[f"{attn}.q_proj.weight"].shape[0] // spec.head_dim,
            weights[f"{attn}.k_proj.weight"].shape[0] // spec.head_dim)


def _apply_rope(g, x, cos, sin, scope) -> str:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x2, x1) over the head dim halves."""
    x1, x2 = g.op("Split", [x], f"{scope}/split", outputs=[f"{scope}/x1", f"{scope}/x2"], axis=-1, num_outputs=2)
    rotated = g.op("Concat", [g.op("Neg", [x2], f"{scope}/neg_x2"), x1], f"{scope}/rotate_half", axis=-1)
    return g.op(
        "Add",
        [g.op("Mul", [x, cos], f"{scope}/x_cos"), g.op("Mul", [rotated, sin], f"{scope}/rotated_sin")],
        f"{scope}/out",
    )


def _rms_norm(g, x, module: str, weights, eps: float) -> str:
    # Decomposed: RMSNormalization only exists from opset 23.
    squared = g.op("Mul", [x, x], f"{module}/squared")
    mean = g.op("ReduceMean", [squared, g.int64s("axes_last", [-1])], f"{module}/mean_square", keepdims=1)
    rms = g.op("Sqrt", [g.op("Add", [mean, g.float32(f"eps_{eps!r}", eps)], f"{module}/plus_eps")], f"{module}/rms")
    normalized = g.op("Div", [x, rms], f"{module}/normalized")
    weight = g.initializer(f"{module}.weight", _float32(weights[f"{module}.weight"]))
    return g.op("Mul", [normalized, weight], f"{module}/scaled")


def linear_lowering(packed) -> str:
    """How a quantized linear is exported (rules 1-4 of the module docstring): "dq", "plugin", "int3" or "fpx"."""
    if getattr(packed, "fmt", None) is not None:  # llmc.passes.fpx.FpxLinear
        from llmc.plugins.fpx_linear_plugin import op_for

        try:
            op_for(packed.fmt)
        except ValueError as e:
            raise NotImplementedError(f"{e}; quantize exported linears with fpx bits 6 or 4, rtn or gptq") from None
        return "fpx"
    if packed.bits not in (2, 3, 4, 8):
        raise NotImplementedError(
            f"{packed.bits}-bit weights cannot be exported to ONNX (2, 3, 4 and 8 bits are supported)"
        )
    if packed.bits == 3:
        return "int3"
    return "plugin" if not packed.symmetric and packed.bits <= 4 else "dq"


def _linear(g, x, module: str, weights, quantized, output: str | None = None) -> str:
    """x @ W.T (+ bias), W stored transposed [in, out] so the graph is a plain MatMul."""
    bias = weights.get(f"{module}.bias")
    outputs = [output] if output and bias is None else None
    packed = quantized.get(module)
    if packed is not None and hasattr(packed, "high_rows"):
        y = _mixed_row_linear(g, x, module, packed, outputs)
    elif packed is not None:
        y = _quantized_linear(g, x, module, packed, outputs)
    else:
        weight_t = g.initializer(f"{module}.weight_T", _float32(weights[f"{module}.weight"]).T)
        y = g.op("MatMul", [x, weight_t], f"{module}/MatMul", outputs=outputs)
    if bias is not None:
        bias_name = g.initializer(f"{module}.bias", _float32(bias))
        y = g.op("Add", [y, bias_name], f"{module}/bias", outputs=[output] if output else None)
    return y


def _quantized_linear(g, x, name: str, packed, outputs) -> str:
    """x @ W.T for packed weights, lowered by rules 1-4."""
    lowering = _lowering(name, packed)
    if lowering == "plugin":
        return _plugin_linear(g, x, name, packed, outputs)
    if lowering == "int3":
        return _int3_linear(g, x, name, packed, outputs)
    if lowering == "fpx":
        return _fpx_linear(g, x, name, packed, outputs)
    return g.op("MatMul", [x, _dequantized_weight(g, name, packed)], f"{name}/MatMul", outputs=outputs)


def _mixed_row_linear(g, x, module: str, packed, outputs) -> str:
    """Rule 5: both parts' products, concatenated, gathered back into output order."""
    import torch

    parts = [_quantized_linear(g, x, f"{module}.{part}", rows, None)
             for part, rows in (("low", packed.low), ("high", packed.high))]
    joined = g.op("Concat", parts, f"{module}/concat_rows", axis=-1)
    inverse = torch.argsort(torch.cat([packed.low_rows(), packed.high_rows.long()]))
    return g.op("Gather", [joined, g.int64s(f"{module}.row_order", inverse.tolist())], f"{module}/scatter_rows",
                outputs=outputs, axis=-1)


def _lowering(module: str, packed) -> str:
    try:
        return linear_lowering(packed)
    except NotImplementedError as e:
        raise NotImplementedError(f"{module}: {e}") from None


def _check_groups(module: str, packed) -> None:
    out_features, in_features = packed.q.shape
    if in_features % packed.group_size or tuple(packed.scale.shape) != (out_features, in_features // packed.group_size):
        raise ValueError(
            f"{module}: scale {tuple(packed.scale.shape)} does not fit weight {tuple(packed.q.shape)} "
            f"in groups of {packed.group_size}"
        )


def _plugin_linear(g, x, module: str, packed, outputs) -> str:
    """Asymmetric int2/int4 codes -> ``llmc.IntNLinear`` (rule 2): the kernels' bit plane, scales and zero points."""
    from llmc.plugins import intn_linear_plugin as plugin

    _check_groups(module, packed)
    try:
        planes, scale, zero = plugin.node_inputs(packed)
    except ValueError as e:
        raise ValueError(f"{module}: {e}") from None
    inputs = [
        x,
        g.initializer(f"{module}.planes", planes),
        g.initializer(f"{module}.scale_T", scale),
        g.initializer(f"{module}.zero_T", zero),
    ]
    return g.op(plugin.NAME, inputs, f"{module}/{plugin.NAME}", outputs=outputs, domain=plugin.NAMESPACE,
                **plugin.node_attributes(packed.bits, packed.group_size))


def _int3_linear(g, x, module: str, packed, outputs) -> str:
    """3-bit codes -> ``llmc.Int3Linear`` (rule 3): the int3 kernels' two planes, float16 scales and zero points."""
    from llmc.plugins import intn_linear_plugin as plugin

    _check_groups(module, packed)
    try:
        arrays = plugin.int3_node_inputs(packed)
    except ValueError as e:
        raise ValueError(f"{module}: {e}") from None
    inputs = [x] + [g.initializer(f"{module}.{name}", array)
                    for name, array in zip(("planes_low", "planes_high", "scale_T", "zero_T"), arrays, strict=True)]
    return g.op(plugin.INT3_NAME, inputs, f"{module}/{plugin.INT3_NAME}", outputs=outputs, domain=plugin.NAMESPACE,
                **plugin.int3_node_attributes(packed.group_size, packed.symmetric))


def _fpx_linear(g, x, module: str, packed, outputs) -> str:
    """FP6/FP4 codes -> ``llmc.Fp6Linear`` / ``llmc.Fp4Linear`` (rule 4): the kernels' bit planes
    and float16 scales."""
    from llmc.plugins import fpx_linear_plugin as plugin

    try:
        weights, arrays = plugin.node_inputs(packed)
    except ValueError as e:
        raise ValueError(f"{module}: {e}") from None
    op = plugin.op_for(packed.fmt)
    inputs = [x] + [g.initializer(f"{module}.{name}", array) for name, array in zip(op.input_names[1:], arrays, strict=True)]
    return g.op(op.name, inputs, f"{module}/{op.name}", outputs=outputs, domain=op.namespace,
                **plugin.node_attributes(weights))


def _dequantized_weight(g, module: str, packed) -> str:
    """Packed integer weight [in, out] -> DequantizeLinear blocked along the input dimension (rule 1)."""
    import ml_dtypes

    _check_groups(module, packed)
    if packed.symmetric:
        # int2 codes lie inside int4's range: the int4 container keeps them exact.
        code_type = ml_dtypes.int4 if packed.bits <= 4 else np.int8
        low, high = -(2 ** (packed.bits - 1)), 2 ** (packed.bits - 1) - 1
    else:
        code_type = np.uint8
        low, high = 0, 2**packed.bits - 1

    def codes(tensor, what):
        values = tensor.detach().cpu().numpy().astype(np.int64)
        if packed.bits == 8 and not packed.symmetric:
            # 8-bit asymmetric codes 128..255 wrap to negatives in PackedLinear's int8 storage.
            values = values & 0xFF
        if values.min() < low or values.max() > high:
            raise ValueError(f"{module}: {what} codes outside [{low}, {high}] for {packed.bits}-bit")
        # Transposed to [in, out] like the float weights; ml_dtypes int4 arrays make
        # onnx pack two codes per byte.
        return np.ascontiguousarray(values.T).astype(code_type)

    inputs = [
        g.initializer(f"{module}.qweight_T", codes(packed.q, "weight")),
        g.initializer(f"{module}.scale_T", _float32(packed.scale).T),
    ]
    if not packed.symmetric:
        inputs.append(g.initializer(f"{module}.zero_T", codes(packed.zero, "zero-point")))
    return g.op("DequantizeLinear", inputs, f"{module}/DequantizeLinear", axis=0, block_size=packed.group_size)


def _float32(tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().to("cpu").float().numpy())


# --- ONNX Runtime checker -----------------------------------------------------------------


@dataclass(frozen=True)
class GreedyRun:
    """Greedy decoding result: new tokens [batch, new] and the prefill logits [batch, prompt, vocab]."""

    tokens: np.ndarray
    first_step_logits: np.ndarray


@dataclass(frozen=True)
class GreedyComparison:
    tokens_equal: bool
    # First decode step whose tokens differ in any batch row; None when all agree.
    first_divergence: int | None
    max_abs_logits_diff: float


def open_stage_sessions(stages, threads: int = 1) -> list:
    """ONNX Runtime CPU sessions for stage models (ModelProto or file path), deterministic settings."""
    import onnxruntime as ort

    sessions = []
    for stage in stages:
        options = ort.SessionOptions()
        # A fixed thread count fixes the reduction order, so reruns give identical logits.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # ORT fuses DequantizeLinear + MatMul into MatMulNBits, whose default accuracy level 4
        # quantizes activations to int8 (logit errors ~1e-2). Level 1 keeps fp32 compute, so the
        # checker measures the export, not ORT's activation quantization.
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        source = str(stage) if isinstance(stage, (str, Path)) else stage.SerializeToString()
        sessions.append(ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]))
    return sessions


def empty_kv_cache(sessions, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past tensors for every ``past_*`` input of every stage (a prefill)."""
    cache = {}
    for session in sessions:
        for graph_input in session.get_inputs():
            if graph_input.name.startswith("past_"):
                _, kv_heads, _, head_dim = graph_input.shape
                cache[graph_input.name] = np.zeros((batch, kv_heads, 0, head_dim), dtype=np.float32)
    return cache


def run_stages_once(sessions, input_ids: np.ndarray, position_ids: np.ndarray, cache: dict) -> tuple[np.ndarray, dict]:
    """One forward through all stages in order: (logits, the cache with this call's keys/values appended)."""
    carried = {"input_ids": input_ids.astype(np.int64), "position_ids": position_ids.astype(np.int64)}
    new_cache = dict(cache)
    logits = None
    for session in sessions:
        feeds = {i.name: carried[i.name] if i.name in carried else cache[i.name] for i in session.get_inputs()}
        names = [o.name for o in session.get_outputs()]
        for name, value in zip(names, session.run(names, feeds)):
            if name.startswith("present_"):
                new_cache["past_" + name.removeprefix("present_")] = value
            elif name == "hidden_states_out":
                carried["hidden_states_in"] = value
            elif name == "logits":
                logits = value
    if logits is None:
        raise ValueError("no stage produced logits: the last stage must end at the model's last layer")
    return logits, new_cache


def run_stages_greedy(stages, input_ids: np.ndarray, max_new_tokens: int, threads: int = 1) -> GreedyRun:
    """Greedy decoding through the stage graphs in ONNX Runtime: prefill, then one token per step.

    Runs exactly ``max_new_tokens`` steps (no stop on EOS) so it lines up with
    :func:`hf_greedy_reference`.
    """
    sessions = open_stage_sessions(stages, threads)
    batch, prompt_len = input_ids.shape
    cache = empty_kv_cache(sessions, batch)
    ids = input_ids
    positions = np.broadcast_to(np.arange(prompt_len, dtype=np.int64), (batch, prompt_len))
    tokens, first_step_logits = [], None
    for step in range(max_new_tokens):
        logits, cache = run_stages_once(sessions, ids, positions, cache)
        if first_step_logits is None:
            first_step_logits = logits
        next_ids = logits[:, -1].argmax(axis=-1).astype(np.int64)
        tokens.append(next_ids)
        ids = next_ids[:, None]
        positions = np.full((batch, 1), prompt_len + step, dtype=np.int64)
    return GreedyRun(tokens=np.stack(tokens, axis=1), first_step_logits=first_step_logits)


def ort_greedy(stages, input_ids: np.ndarray, max_new_tokens: int) -> GreedyRun:
    """:func:`run_stages_greedy`, with ONNX Runtime's own failures (a graph it cannot load or run)
    raised as the toolchain failures they are (exit 5)."""
    try:
        return run_stages_greedy(stages, input_ids, max_new_tokens)
    except Exception as e:
        if not type(e).__module__.startswith("onnxruntime"):
            raise
        from llmc.errors import ToolchainError

        raise ToolchainError(f"ONNX Runtime cannot run the exported stages: {str(e).strip()}") from e


def hf_greedy_reference(model, input_ids: np.ndarray, max_new_tokens: int) -> GreedyRun:
    """The same greedy loop on the Hugging Face model with its KV cache (no generation config applied)."""
    import torch

    ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
    tokens, first_step_logits, past = [], None, None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(input_ids=ids, past_key_values=past, use_cache=True)
            logits = out.logits.float()
            if first_step_logits is None:
                first_step_logits = logits.numpy()
            past = out.past_key_values
            ids = logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens.append(ids[:, 0].numpy())
    return GreedyRun(tokens=np.stack(tokens, axis=1), first_step_logits=first_step_logits)


def compare_with_reference(candidate: GreedyRun, reference: GreedyRun) -> GreedyComparison:
    """Token agreement and the largest first-step logit difference between two greedy runs."""
    differs = (candidate.tokens != reference.tokens).any(axis=0)
    first_divergence = int(differs.argmax()) if differs.any() else None
    diff = np.abs(candidate.first_step_logits.astype(np.float64) - reference.first_step_logits).max()
    return GreedyComparison(
        tokens_equal=first_divergence is None,
        first_divergence=first_divergence,
        max_abs_logits_diff=float(diff),
    )


# --- the pass -----------------------------------------------------------------------------

from dataclasses import replace  # noqa: E402

from llmc.errors import ToolchainError, VerificationError  # noqa: E402
from llmc.ir import Artifact, Measurement, Program  # noqa: E402
from llmc.pipeline import Pass, PassContext, PassResult  # noqa: E402

# First-step logits of ORT and torch on the same weights differ by float32 rounding only;
# anything above this is an export bug.
LOGITS_ATOL = 1e-3


def stage_interface(model) -> dict:
    """Input and output names and shapes of a stage graph, for manifests and runners."""

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return {
        "inputs": {v.name: dims(v) for v in model.graph.input},
        "outputs": {v.name: dims(v) for v in model.graph.output},
    }


@dataclass(frozen=True)
class ExportPass(Pass):
    """Write one ONNX graph per plan stage and check them in ONNX Runtime against torch."""

    name = "export"
    prompt: str = "The State of the Union is"
    new_tokens: int = 16

    def requires(self, program: Program) -> None:
        if program.plan is None:
            raise ValueError("export needs the plan's stages; run 'plan' first")

    def ensures(self, program: Program) -> None:
        if program.measurement("export.greedy_tokens_match") is None:
            raise ValueError("export did not record its ONNX Runtime check")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        import json

        import onnx

        from llmc.checkpoint import load_model, load_packed, load_tokenizer

        model = load_model(program, ctx)  # dequantized weights: what the graphs must compute
        spec = decoder_spec_from_model(model)
        weights = model.state_dict()
        quantized = load_packed(ctx.path(program.quantized_weights)) if program.quantized_weights else {}
        paths, artifacts = [], []
        stages = program.plan.stages
        for stage in ctx.progress(stages, "export stages", total=len(stages)):
            graph = build_stage_graph(spec, weights, stage.layer_start, stage.layer_end, quantized)
            filename = f"stage_{stage.index}.onnx"
            path = ctx.workdir / filename
            path.write_bytes(graph.SerializeToString())
            (ctx.workdir / f"stage_{stage.index}.json").write_text(
                json.dumps(stage_interface(graph), indent=1, sort_keys=True)
            )
            try:
                onnx.checker.check_model(str(path))
            except onnx.checker.ValidationError as e:
                raise ToolchainError(f"stage {stage.index}: the ONNX checker rejects the graph: {e}") from e
            paths.append(path)
            artifacts.append(Artifact(path=f"stages/{filename}", ref=ctx.ref(filename), kind="onnx"))

        tokenizer = load_tokenizer(ctx.path(program.model.checkpoint))
        ids = np.asarray([tokenizer(self.prompt)["input_ids"]], dtype=np.int64)
        ort_run = ort_greedy(paths, ids, self.new_tokens)
        same_weights = compare_with_reference(ort_run, hf_greedy_reference(model, ids, self.new_tokens))
        protocol = (
            f"prompt {self.prompt!r} ({ids.shape[1]} tokens), {self.new_tokens} greedy tokens, "
            f"{len(paths)} stages in ONNX Runtime (CPU) vs the torch model with the same weights"
        )
        if not same_weights.tokens_equal or same_weights.max_abs_logits_diff > LOGITS_ATOL:
            raise VerificationError(
                f"the exported stages disagree with the torch model: greedy tokens "
                f"{'match' if same_weights.tokens_equal else f'diverge at step {same_weights.first_divergence}'}, "
                f"max |logit diff| {same_weights.max_abs_logits_diff:.2e} (tolerance {LOGITS_ATOL:g})"
            )
        measurements = [
            Measurement("export.greedy_tokens_match", 1.0, "", protocol),
            Measurement("export.max_abs_logits_diff", float(f"{same_weights.max_abs_logits_diff:.2e}"), "",
                        f"first-step logits, tolerance {LOGITS_ATOL:g}"),
        ]
        summary = f"{len(paths)} stage graphs; ORT greedy tokens match torch, max |logit diff| {same_weights.max_abs_logits_diff:.1e}"
        if quantized:
            # How far quantization moved the greedy continuation (information, not a check).
            float_model = load_model(program, ctx, quantized=False)
            agree = (hf_greedy_reference(float_model, ids, self.new_tokens).tokens == ort_run.tokens).mean()
            measurements.append(
                Measurement("export.tokens_equal_to_float_model", round(float(agree), 4), "fraction",
                            "same prompt; greedy tokens of the quantized stages vs the unquantized model")
            )
            summary += f"; {agree:.0%} of tokens equal to the float model's"
        kept_artifacts = tuple(a for a in program.artifacts if a.kind != "onnx")
        kept = tuple(m for m in program.measurements if not m.name.startswith("export."))
        return PassResult(
            replace(program, artifacts=kept_artifacts + tuple(artifacts), measurements=kept + tuple(measurements)),
            summary,
        )
