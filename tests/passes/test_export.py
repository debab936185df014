"""Stage graphs of the ONNX export against the Hugging Face model, run in ONNX Runtime."""

from __future__ import annotations

import types

import numpy as np
import onnx
import pytest
import torch

from llmc.packed import PackedLinear
from llmc.passes.export import (
    OPSET,
    build_stage_graph,
    compare_with_reference,
    decoder_spec_from_config,
    decoder_spec_from_model,
    empty_kv_cache,
    hf_greedy_reference,
    open_stage_sessions,
    run_stages_greedy,
    run_stages_once,
)
from llmc.testing import tiny_llama, tiny_llama_config, tiny_qwen2

NEW_TOKENS = 8
LOGITS_TOLERANCE = 1e-4
MAKERS = {"llama": tiny_llama, "qwen2": tiny_qwen2}
# Uneven splits on purpose: a one-layer first stage, a middle stage, a multi-layer last stage.
SPLITS = {"two_stages": [(0, 1), (1, 4)], "three_stages": [(0, 2), (2, 3), (3, 4)]}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def model(request):
    return MAKERS[request.param]()


def prompt(batch=2, length=5, seed=0):
    return np.random.default_rng(seed).integers(3, 128, (batch, length), dtype=np.int64)


def build_stages(model, splits, quantized=None):
    spec = decoder_spec_from_model(model)
    weights = model.state_dict()
    return [build_stage_graph(spec, weights, start, end, quantized) for start, end in splits]


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> PackedLinear:
    """Round-to-nearest group quantization, just enough to feed the exporter real codes (float16 scales, as llmc's
    quantizers make them)."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // group_size, group_size)
    if symmetric:
        high = 2 ** (bits - 1) - 1
        scale = (groups.abs().amax(dim=-1).clamp(min=1e-4) / high).half().float()
        q = torch.round(groups / scale[..., None]).clamp(-high - 1, high)
        zero = None
    else:
        high = 2**bits - 1
        low_value, high_value = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high_value - low_value).clamp(min=1e-4) / high).half().float()
        zero = torch.round(-low_value / scale).clamp(0, high)
        q = torch.round(groups / scale[..., None] + zero[..., None]).clamp(0, high)
        zero = zero.to(torch.int8)
    return PackedLinear(
        q=q.reshape(out_features, in_features).to(torch.int8),
        scale=scale.float(),
        zero=zero,
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
    )


def quantize_all_linears(model, bits=4, group_size=32, symmetric=True) -> dict[str, PackedLinear]:
    return {
        name: quantize_rtn(module.weight.detach(), bits, group_size, symmetric)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")
    }


def fpx_all_linears(model, name: str, group_size=None) -> dict:
    from llmc.passes.fpx import FORMATS, fpx_quantize

    return {
        n: fpx_quantize(m.weight.detach(), FORMATS[name], group_size, scale_dtype=torch.float16)
        for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")
    }


def with_dequantized_weights(maker, quantized):
    reference = maker()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, packed in quantized.items():
            modules[name].weight.copy_(packed.dequantize())
    return reference


# --- spec ---------------------------------------------------------------------------------


def test_spec_reads_architecture_and_rope_from_the_model():
    spec = decoder_spec_from_model(tiny_qwen2())
    assert (spec.model_type, spec.hidden_size, spec.num_attention_heads) == ("qwen2", 64, 4)
    assert spec.num_key_value_heads == 2
    assert spec.head_dim == 16 and spec.attention_bias and spec.tie_word_embeddings
    assert len(spec.rope_inv_freq) == spec.head_dim // 2


def test_spec_from_config_matches_the_model_rope_for_default_rope():
    model = tiny_llama()
    assert decoder_spec_from_config(model.config) == decoder_spec_from_model(model)


def test_spec_rejects_unsupported_model_type():
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        decoder_spec_from_config(types.SimpleNamespace(model_type="gpt2"))


def test_spec_rejects_sliding_window_attention():
    from transformers import MistralConfig

    config = MistralConfig(**tiny_llama_config().to_diff_dict() | {"sliding_window": 16})
    with pytest.raises(ValueError, match="sliding-window attention is not supported"):
        decoder_spec_from_config(config)


def test_spec_needs_the_model_for_scaled_rope():
    config = tiny_llama_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="decoder_spec_from_model"):
        decoder_spec_from_config(config)


# --- graph structure ----------------------------------------------------------------------


def test_stage_interfaces():
    first, last = build_stages(tiny_llama(), SPLITS["two_stages"])
    assert [i.name for i in first.graph.input] == ["input_ids", "position_ids", "past_key_0", "past_value_0"]
    assert [o.name for o in first.graph.output] == ["hidden_states_out", "present_key_0", "present_value_0"]
    assert [i.name for i in last.graph.input][:2] == ["hidden_states_in", "position_ids"]
    assert [o.name for o in last.graph.output][0] == "logits"
    presents = [f"present_{kind}_{i}" for i in (1, 2, 3) for kind in ("key", "value")]
    assert [o.name for o in last.graph.output][1:] == presents


def test_graph_uses_standard_ops_at_opset_21():
    stages = build_stages(tiny_qwen2(), SPLITS["two_stages"], quantize_all_linears(tiny_qwen2()))
    for stage in stages:
        onnx.checker.check_model(stage, full_check=True)
        assert [(o.domain, o.version) for o in stage.opset_import] == [("", OPSET)]
        assert {node.domain for node in stage.graph.node} == {""}


def test_build_is_deterministic():
    model = tiny_qwen2()
    quantized = quantize_all_linears(model, symmetric=False)
    first = build_stages(model, SPLITS["three_stages"], quantized)
    second = build_stages(model, SPLITS["three_stages"], quantized)
    assert [s.SerializeToString() for s in first] == [s.SerializeToString() for s in second]


def test_int4_weights_cost_half_a_byte_each():
    model = tiny_llama()
    quantized = quantize_all_linears(model)
    float_stage = build_stages(model, [(0, 4)])[0]
    int4_stage = build_stages(model, [(0, 4)], quantized)[0]
    packed = {t.name: t for t in int4_stage.graph.initializer if t.name.endswith(".qweight_T")}
    assert len(packed) == len(quantized)
    for tensor in packed.values():
        assert tensor.data_type == onnx.TensorProto.INT4
        assert len(tensor.raw_data) == np.prod(tensor.dims) // 2
    # The file shrinks by 3.5 bytes per weight, less the scales (one float per 32 weights)
    # and a few hundred bytes per DequantizeLinear node.
    weights = sum(p.q.numel() for p in quantized.values())
    saved = len(float_stage.SerializeToString()) - len(int4_stage.SerializeToString())
    assert saved >= weights * (3.5 - 4 / 32) - 512 * len(quantized)


def test_asymmetric_weights_export_as_intn_plugin_nodes_carrying_their_function():
    model = tiny_llama()
    quantized = quantize_all_linears(model, symmetric=False)
    stage = build_stages(model, [(0, 4)], quantized)[0]
    onnx.checker.check_model(stage, full_check=True)
    plugin_nodes = [n for n in stage.graph.node if n.domain == "llmc"]
    assert {n.op_type for n in plugin_nodes} == {"IntNLinear"} and len(plugin_nodes) == len(quantized)
    assert not any(n.op_type == "DequantizeLinear" for n in stage.graph.node)
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in plugin_nodes[0].attribute}
    assert attributes == {"bits": 4, "width": 4, "group_size": 32, "plugin_version": b"3", "plugin_namespace": b"llmc"}
    # The ONNX Runtime equivalent travels in the file: one function body per plugin op.
    assert [(f.domain, f.name) for f in stage.functions] == [("llmc", "IntNLinear")]
    assert ("llmc", 1) in [(o.domain, o.version) for o in stage.opset_import]
    # Codes stay packed: one int32 word holds eight 4-bit codes (the Triton kernel's bit plane).
    planes = {t.name: t for t in stage.graph.initializer if t.name.endswith(".planes")}
    assert len(planes) == len(quantized)
    for name, tensor in planes.items():
        out_features, in_features = quantized[name.removesuffix(".planes")].q.shape
        assert tensor.data_type == onnx.TensorProto.INT32 and list(tensor.dims) == [in_features // 8, out_features]


def test_a_stage_onnx_runtime_cannot_run_is_a_toolchain_failure():
    from llmc.errors import EXIT_TOOLCHAIN, ToolchainError
    from llmc.passes.export import ort_greedy

    model = tiny_llama()
    stage = build_stages(model, [(0, 4)], quantize_all_linears(model, symmetric=False))[0]
    del stage.functions[:]  # the plugin nodes without the bodies ONNX Runtime inlines
    with pytest.raises(ToolchainError, match="ONNX Runtime cannot run the exported stages: .*IntNLinear") as info:
        ort_greedy([stage], prompt(), 1)
    assert info.value.exit_code == EXIT_TOOLCHAIN


def test_fp6_weights_export_as_plugin_nodes_at_six_bits_per_weight():
    model = tiny_llama()
    quantized = fpx_all_linears(model, "e3m2")
    stage = build_stages(model, [(0, 4)], quantized)[0]
    onnx.checker.check_model(stage, full_check=True)
    nodes = [n for n in stage.graph.node if n.domain == "llmc"]
    assert {n.op_type for n in nodes} == {"Fp6Linear"} and len(nodes) == len(quantized)
    assert [(f.domain, f.name) for f in stage.functions] == [("llmc", "Fp6Linear")]
    weights = sum(q.codes.numel() for q in quantized.values())
    planes = [t for t in stage.graph.initializer if t.name.endswith((".high", ".low"))]
    assert {t.data_type for t in planes} == {onnx.TensorProto.INT32}
    assert sum(len(t.raw_data) for t in planes) == weights * 6 // 8
    scales = [t for t in stage.graph.initializer if t.name.endswith(".scale")]
    assert len(scales) == len(quantized) and {t.data_type for t in scales} == {onnx.TensorProto.FLOAT16}


@pytest.mark.parametrize(("name", "group_size"), [("e3m2", None), ("e2m3", 32), ("e2m1", 32)])
def test_fpx_stages_match_dequantized_hf(name, group_size):
    quantized = fpx_all_linears(tiny_llama(), name, group_size)
    reference = with_dequantized_weights(tiny_llama, quantized)
    ids = prompt()
    result = run_stages_greedy(build_stages(tiny_llama(), SPLITS["two_stages"], quantized), ids, NEW_TOKENS)
    comparison = compare_with_reference(result, hf_greedy_reference(reference, ids, NEW_TOKENS))
    assert comparison.tokens_equal and comparison.max_abs_logits_diff < LOGITS_TOLERANCE, comparison


def test_fp8_weights_are_refused_naming_the_module():
    model = tiny_llama()
    name = "model.layers.1.self_attn.q_proj"
    quantized = {name: fpx_all_linears(model, "e4m3")[name]}
    with pytest.raises(NotImplementedError, match=rf"{name}: no plugin for e4m3"):
        build_stages(model, [(0, 4)], quantized)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_int3_codes_export_exactly_to_the_int3_plugin(symmetric):
    model = tiny_llama()
    quantized = quantize_all_linears(model, bits=3, group_size=32, symmetric=symmetric)
    stage = build_stages(model, [(0, 4)], quantized)[0]
    ops = [n.op_type for n in stage.graph.node]
    assert ops.count("Int3Linear") == len(quantized) and not {"IntNLinear", "DequantizeLinear"} & set(ops)
    assert [f.name for f in stage.functions] == ["Int3Linear"]
    reference = with_dequantized_weights(tiny_llama, quantized)
    ids = prompt()
    result = run_stages_greedy([stage], ids, NEW_TOKENS)
    comparison = compare_with_reference(result, hf_greedy_reference(reference, ids, NEW_TOKENS))
    assert comparison.tokens_equal and comparison.max_abs_logits_diff < LOGITS_TOLERANCE, comparison


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_the_planner_costs_codes_at_the_width_the_export_stores(bits, symmetric):
    # The plan's bytes per weight (passes/costs.py) must be what the stage graph holds: symmetric
    # int2 takes 4 bits there, not its own width; int3 takes 3.
    from llmc.passes.costs import stored_bits

    model = tiny_llama()
    quantized = quantize_all_linears(model, bits=bits, group_size=32, symmetric=symmetric)
    stage = build_stages(model, [(0, 4)], quantized)[0]
    codes = [t for t in stage.graph.initializer if t.name.endswith((".qweight_T", ".planes", ".planes_low", ".planes_high"))]
    assert len(codes) == len(quantized) * (2 if bits == 3 else 1)
    weights = sum(p.q.numel() for p in quantized.values())
    assert sum(len(t.raw_data) for t in codes) * 8 == weights * stored_bits(bits, not symmetric)
    zeros = [t for t in stage.graph.initializer if t.name.endswith(".zero_T")]
    if not symmetric and bits < 8:  # the plugin's zero points: float16, as the plan counts them
        assert {t.data_type for t in zeros} == {onnx.TensorProto.FLOAT16} and len(zeros) == len(quantized)
    scales = [t for t in stage.graph.initializer if t.name.endswith(".scale_T")]
    plugin = bits == 3 or (not symmetric and bits < 8)  # the plugins' scales: float16, as the plan counts them
    assert {t.data_type for t in scales} == {onnx.TensorProto.FLOAT16 if plugin else onnx.TensorProto.FLOAT}


def test_unsupported_bits_raise_naming_the_module():
    model = tiny_llama()
    name = "model.layers.0.mlp.down_proj"
    packed = quantize_rtn(model.get_submodule(name).weight.detach(), bits=5, group_size=32, symmetric=True)
    with pytest.raises(NotImplementedError, match=rf"{name}: 5-bit"):
        build_stages(model, [(0, 4)], {name: packed})


def test_empty_stage_is_rejected():
    with pytest.raises(ValueError, match=r"\[2, 2\)"):
        build_stages(tiny_llama(), [(2, 2)])


# --- numerics in ONNX Runtime -------------------------------------------------------------


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_float_stages_reproduce_hf_greedy(model, split):
    ids = prompt()
    result = run_stages_greedy(build_stages(model, SPLITS[split]), ids, NEW_TOKENS)
    comparison = compare_with_reference(result, hf_greedy_reference(model, ids, NEW_TOKENS))
    assert comparison.tokens_equal, comparison
    assert comparison.max_abs_logits_diff < LOGITS_TOLERANCE


def test_chunk_after_a_cached_prefix_matches_a_full_forward(model):
    # seq > 1 with a non-empty past: the causal mask must offset queries by the past length.
    ids = prompt(length=7)
    sessions = open_stage_sessions(build_stages(model, SPLITS["three_stages"]))
    positions = np.broadcast_to(np.arange(7), ids.shape)
    cache = empty_kv_cache(sessions, batch=2)
    _, cache = run_stages_once(sessions, ids[:, :3], positions[:, :3], cache)
    chunk_logits, cache = run_stages_once(sessions, ids[:, 3:], positions[:, 3:], cache)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits[:, 3:].numpy()
    assert cache["past_key_3"].shape[2] == 7
    np.testing.assert_allclose(chunk_logits, expected, atol=LOGITS_TOLERANCE, rtol=0)


@pytest.mark.parametrize("symmetric", [True, False], ids=["int4_symmetric", "int4_asymmetric_plugin"])
@pytest.mark.parametrize("maker", sorted(MAKERS))
def test_quantized_stages_match_dequantized_hf(maker, symmetric):
    quantized = quantize_all_linears(MAKERS[maker](), bits=4, group_size=32, symmetric=symmetric)
    reference = with_dequantized_weights(MAKERS[maker], quantized)
    ids = prompt()
    # The float weights handed to the exporter are the originals: quantized linears must come
    # from the packed codes alone.
    result = run_stages_greedy(build_stages(MAKERS[maker](), SPLITS["two_stages"], quantized), ids, NEW_TOKENS)
    comparison = compare_with_reference(result, hf_greedy_reference(reference, ids, NEW_TOKENS))
    assert comparison.tokens_equal, comparison
    assert comparison.max_abs_logits_diff < LOGITS_TOLERANCE


def test_int8_stages_match_dequantized_hf():
    quantized = quantize_all_linears(tiny_llama(), bits=8, group_size=64, symmetric=True)
    reference = with_dequantized_weights(tiny_llama, quantized)
    ids = prompt()
    result = run_stages_greedy(build_stages(tiny_llama(), SPLITS["two_stages"], quantized), ids, NEW_TOKENS)
    comparison = compare_with_reference(result, hf_greedy_reference(reference, ids, NEW_TOKENS))
    assert comparison.tokens_equal and comparison.max_abs_logits_diff < LOGITS_TOLERANCE, comparison
