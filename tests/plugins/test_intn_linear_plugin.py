"""``llmc::IntNLinear`` and ``llmc::Int3Linear``: their three implementations agree (ONNX function in ONNX
Runtime, torch reference, and the plugin's enqueue running the Triton kernel, the last on a CUDA GPU only)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from llmc.packed import PackedLinear
from llmc.passes.export import IR_VERSION, OPSET, open_stage_sessions
from llmc.plugins import intn_linear_plugin as plugin
from llmc.plugins.linear_plugin import make_creator


def asymmetric(out_features: int, in_features: int, bits: int, group_size: int, seed: int = 0) -> PackedLinear:
    g = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    return PackedLinear(
        q=torch.randint(0, 2**bits, (out_features, in_features), generator=g).to(torch.int8),
        scale=(torch.rand(out_features, groups, generator=g) * 0.02 + 1e-3).half().float(),  # as llmc's quantizers
        zero=torch.randint(0, 2**bits, (out_features, groups), generator=g).to(torch.int8),
        bits=bits, group_size=group_size, symmetric=False,
    )


def one_node_model(op, packed: PackedLinear, arrays, attributes: dict) -> onnx.ModelProto:
    """A model of one ``op`` node (a LinearOp) on ``packed``'s shape, its inputs after x as initializers."""
    names = list(op.input_names[1:])
    node = helper.make_node(op.name, ["x", *names], ["y"], name="linear", domain=op.namespace, **attributes)
    out_features, in_features = packed.q.shape
    graph = helper.make_graph(
        [node], "one_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", out_features])],
        [numpy_helper.from_array(a, n) for a, n in zip(arrays, names, strict=True)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(op.namespace, 1)],
        functions=[op.onnx_function()],
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


CASES = [(2, 32), (4, 32), (4, 128)]


@pytest.mark.parametrize(("bits", "group_size"), CASES)
def test_onnx_function_in_onnx_runtime_matches_the_reference_and_the_packed_weight(bits, group_size):
    packed = asymmetric(200, 256, bits, group_size)
    x = np.random.default_rng(1).standard_normal((5, 256)).astype(np.float32)
    model = one_node_model(plugin.OP, packed, plugin.node_inputs(packed),
                           plugin.node_attributes(bits, group_size))
    (session,) = open_stage_sessions([model])
    y = session.run(["y"], {"x": x})[0]
    planes, scale, zero = plugin.node_inputs(packed)
    reference = plugin.reference(x, planes, scale, zero, plugin.PLANE_WIDTH[bits], group_size).numpy()
    dequantized = torch.from_numpy(x) @ packed.dequantize().t()
    np.testing.assert_allclose(y, reference, rtol=0, atol=1e-5)
    np.testing.assert_allclose(reference, dequantized.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4])
def test_planes_are_the_kernels_own_layout(bits):
    from llmc.plugins.intn_linear import pack_intn

    packed = asymmetric(64, 128, bits, 32)
    planes, scale, zero = plugin.node_inputs(packed)
    theirs = pack_intn(packed)
    assert len(theirs.planes) == 1 and np.array_equal(planes, theirs.planes[0].numpy())
    assert np.array_equal(zero, theirs.zero.numpy()) and scale.dtype == np.float16
    assert np.array_equal(scale, theirs.scale.numpy())


def test_symmetric_or_8_bit_codes_are_not_this_plugins():
    with pytest.raises(ValueError, match="asymmetric"):
        plugin.node_inputs(PackedLinear(torch.zeros(4, 32, dtype=torch.int8), torch.ones(4, 1), None, 4, 32, True))
    with pytest.raises(ValueError, match=r"asymmetric \[2, 4\]-bit codes, got asymmetric 3-bit"):
        plugin.node_inputs(asymmetric(4, 32, 3, 32))


# --- llmc::Int3Linear -------------------------------------------------------------------------


def int3(out_features: int, in_features: int, group_size: int, symmetric: bool, seed: int = 0) -> PackedLinear:
    if not symmetric:
        return asymmetric(out_features, in_features, 3, group_size, seed)
    g = torch.Generator().manual_seed(seed)
    return PackedLinear(
        q=torch.randint(-4, 4, (out_features, in_features), generator=g).to(torch.int8),
        scale=(torch.rand(out_features, in_features // group_size, generator=g) * 0.02 + 1e-3).half().float(),
        zero=None, bits=3, group_size=group_size, symmetric=True,
    )


INT3_CASES = [(32, True), (128, True), (32, False), (64, False)]


@pytest.mark.parametrize(("group_size", "symmetric"), INT3_CASES)
def test_int3_function_in_onnx_runtime_matches_the_reference_and_the_packed_weight(group_size, symmetric):
    packed = int3(200, 256, group_size, symmetric)
    x = np.random.default_rng(1).standard_normal((5, 256)).astype(np.float32)
    arrays = plugin.int3_node_inputs(packed)
    model = one_node_model(plugin.INT3, packed, arrays, plugin.int3_node_attributes(group_size, symmetric))
    (session,) = open_stage_sessions([model])
    y = session.run(["y"], {"x": x})[0]
    reference = plugin.int3_reference(x, *arrays, group_size).numpy()
    dequantized = torch.from_numpy(x) @ packed.dequantize().t()
    np.testing.assert_allclose(y, reference, rtol=0, atol=1e-5)
    np.testing.assert_allclose(reference, dequantized.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_int3_planes_are_the_kernels_own_layout_at_three_bits_a_weight(symmetric):
    from llmc.plugins.intn_linear import pack_intn

    packed = int3(64, 128, 32, symmetric)
    low, high, scale, zero = plugin.int3_node_inputs(packed)
    theirs = pack_intn(packed)
    assert np.array_equal(low, theirs.planes[0].numpy()) and np.array_equal(high, theirs.planes[1].numpy())
    assert low.nbytes + high.nbytes == 64 * 128 * 3 // 8
    assert scale.dtype == np.float16 and np.array_equal(scale, theirs.scale.numpy())
    if symmetric:  # one zero point for every group, not one per group
        assert zero.shape == (1, 1) and zero[0, 0] == plugin.SYMMETRIC_ZERO
    else:
        assert np.array_equal(zero, theirs.zero.numpy())


def test_int3_inputs_refuse_other_widths_codes_out_of_range_and_odd_groups():
    with pytest.raises(ValueError, match="3-bit codes, got 4-bit"):
        plugin.int3_node_inputs(asymmetric(4, 32, 4, 32))
    wrong = int3(4, 64, 32, True)
    wrong.q[0, 0] = 5
    with pytest.raises(ValueError, match=r"codes must lie in \[-4, 3\] for symmetric 3-bit"):
        plugin.int3_node_inputs(wrong)
    with pytest.raises(ValueError, match="multiples of 32"):
        plugin.int3_node_inputs(int3(4, 64, 16, False))
    wide = int3(4, 64, 32, True)
    wide.scale[0, 0] = 1 / 3  # not a float16 value: the kernels would compute with another scale than ONNX Runtime
    with pytest.raises(ValueError, match="scales must be float16 values"):
        plugin.int3_node_inputs(wide)


def test_int3_creator_checks_the_fields_and_serialises_them():
    trt = pytest.importorskip("tensorrt_rtx")
    creator = make_creator(trt, plugin.INT3)
    fields = lambda **v: trt.PluginFieldCollection(  # noqa: E731
        [trt.PluginField(k, np.array([n], np.int32), trt.PluginFieldType.INT32) for k, n in v.items()])
    made = creator.create_plugin("linear", fields(group_size=64, symmetric=1), trt.TensorRTPhase.BUILD)
    assert {f.name: int(np.asarray(f.data)[0]) for f in made.get_fields_to_serialize()} == {
        "group_size": 64, "symmetric": 1}
    with pytest.raises(ValueError, match="group_size 48"):
        creator.create_plugin("linear", fields(group_size=48, symmetric=0), trt.TensorRTPhase.BUILD)


def test_creator_checks_the_fields_and_serialises_them():
    trt = pytest.importorskip("tensorrt_rtx")
    creator = make_creator(trt, plugin.OP)
    fields = lambda **v: trt.PluginFieldCollection(  # noqa: E731
        [trt.PluginField(k, np.array([n], np.int32), trt.PluginFieldType.INT32) for k, n in v.items()])
    made = creator.create_plugin("linear", fields(bits=2, width=2, group_size=64), trt.TensorRTPhase.BUILD)
    assert {f.name: int(np.asarray(f.data)[0]) for f in made.get_fields_to_serialize()} == {
        "bits": 2, "width": 2, "group_size": 64}
    with pytest.raises(ValueError, match="bits 3, width 4"):  # 3-bit codes are Int3Linear's
        creator.create_plugin("linear", fields(bits=3, width=4, group_size=64), trt.TensorRTPhase.BUILD)


# --- GPU: the enqueue path on raw device pointers and a raw stream, as TensorRT calls it ------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the kernels are Triton)")


@gpu
@pytest.mark.parametrize("x_shape", [(1, 256), (7, 256), (2, 33, 256)], ids=["decode", "rows7", "batch_seq"])
@pytest.mark.parametrize(("bits", "group_size"), CASES)
def test_enqueue_runs_the_kernel_and_matches_the_references(bits, group_size, x_shape):
    from llmc.plugins.intn_linear import IntNWeights, intn_reference

    packed = asymmetric(200, 256, bits, group_size, seed=bits)
    planes, scale, zero = (torch.from_numpy(a).cuda() for a in plugin.node_inputs(packed))
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(2)).cuda()
    out = torch.full((*x_shape[:-1], 200), float("nan"), device="cuda")
    width = plugin.PLANE_WIDTH[bits]
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    plugin.enqueue_buffers(
        [x.shape, planes.shape, scale.shape, zero.shape],
        [x.data_ptr(), planes.data_ptr(), scale.data_ptr(), zero.data_ptr()], [out.data_ptr()],
        stream.cuda_stream, {"width": (width,), "group_size": (group_size,)},
    )
    stream.synchronize()
    got = out.cpu().reshape(-1, 200)
    # The float32 operator (what ONNX Runtime computes) ...
    exact = plugin.reference(x.cpu().reshape(-1, 256), planes.cpu(), scale.cpu(), zero.cpu(), width, group_size)
    # ... and the kernels' own yardstick on the float16 x the kernel reads.
    weights = IntNWeights((planes.cpu(),), scale.cpu(), zero.cpu(), width, group_size, False, 256, 200)
    fp16 = intn_reference(x.cpu().reshape(-1, 256).half(), weights).float()
    scale_of = exact.abs().max()
    assert torch.isfinite(got).all()
    assert (got - fp16).abs().max() / scale_of < 2e-3
    assert (got - exact).abs().max() / scale_of < 5e-3


@gpu
@pytest.mark.parametrize("x_shape", [(1, 256), (7, 256), (2, 33, 256), (130, 256)],
                         ids=["decode", "rows7", "batch_seq", "prefill"])
@pytest.mark.parametrize(("group_size", "symmetric"), INT3_CASES)
def test_int3_enqueue_runs_the_kernel_and_matches_the_references(group_size, symmetric, x_shape):
    from llmc.plugins.intn_linear import intn_reference, pack_intn

    packed = int3(200, 256, group_size, symmetric, seed=group_size)
    arrays = [torch.from_numpy(a).cuda() for a in plugin.int3_node_inputs(packed)]
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(2)).cuda()
    out = torch.full((*x_shape[:-1], 200), float("nan"), device="cuda")
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    plugin.int3_enqueue_buffers(
        [x.shape, *(a.shape for a in arrays)], [x.data_ptr(), *(a.data_ptr() for a in arrays)], [out.data_ptr()],
        stream.cuda_stream, {"group_size": (group_size,), "symmetric": (int(symmetric),)},
    )
    stream.synchronize()
    got = out.cpu().reshape(-1, 200)
    # The float32 operator (what ONNX Runtime computes) and the kernels' yardstick on float16 x.
    exact = plugin.int3_reference(x.cpu().reshape(-1, 256), *(a.cpu() for a in arrays), group_size)
    fp16 = intn_reference(x.cpu().reshape(-1, 256).half(), pack_intn(packed)).float()
    scale_of = exact.abs().max()
    assert torch.isfinite(got).all()
    assert (got - fp16).abs().max() / scale_of < 2e-3
    assert (got - exact).abs().max() / scale_of < 5e-3
