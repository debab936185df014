"""``llmc::IntNLinear``: its three implementations agree (ONNX function in ONNX Runtime, torch
reference, and the plugin's enqueue running the Triton kernel, the last on a CUDA GPU only)."""

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
        scale=torch.rand(out_features, groups, generator=g) * 0.02 + 1e-3,
        zero=torch.randint(0, 2**bits, (out_features, groups), generator=g).to(torch.int8),
        bits=bits, group_size=group_size, symmetric=False,
    )


def one_node_model(packed: PackedLinear) -> onnx.ModelProto:
    planes, scale, zero = plugin.node_inputs(packed)
    node = helper.make_node(plugin.NAME, ["x", "planes", "scale", "zero"], ["y"], name="linear",
                            domain=plugin.NAMESPACE, **plugin.node_attributes(packed.bits, packed.group_size))
    out_features, in_features = packed.q.shape
    graph = helper.make_graph(
        [node], "one_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", out_features])],
        [numpy_helper.from_array(a, n) for a, n in ((planes, "planes"), (scale, "scale"), (zero, "zero"))],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(plugin.NAMESPACE, 1)],
        functions=[plugin.onnx_function()],
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


CASES = [(2, 32), (3, 32), (4, 32), (4, 128)]


@pytest.mark.parametrize(("bits", "group_size"), CASES)
def test_onnx_function_in_onnx_runtime_matches_the_reference_and_the_packed_weight(bits, group_size):
    packed = asymmetric(200, 256, bits, group_size)
    x = np.random.default_rng(1).standard_normal((5, 256)).astype(np.float32)
    (session,) = open_stage_sessions([one_node_model(packed)])
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
    assert np.array_equal(zero, theirs.zero.numpy()) and np.array_equal(scale.astype(np.float16), theirs.scale.numpy())


def test_symmetric_or_8_bit_codes_are_not_this_plugins():
    with pytest.raises(ValueError, match="asymmetric"):
        plugin.node_inputs(PackedLinear(torch.zeros(4, 32, dtype=torch.int8), torch.ones(4, 1), None, 4, 32, True))


def test_creator_checks_the_fields_and_serialises_them():
    trt = pytest.importorskip("tensorrt_rtx")
    creator = make_creator(trt, plugin.OP)
    fields = lambda **v: trt.PluginFieldCollection(  # noqa: E731
        [trt.PluginField(k, np.array([n], np.int32), trt.PluginFieldType.INT32) for k, n in v.items()])
    made = creator.create_plugin("linear", fields(bits=3, width=4, group_size=64), trt.TensorRTPhase.BUILD)
    assert {f.name: int(np.asarray(f.data)[0]) for f in made.get_fields_to_serialize()} == {
        "bits": 3, "width": 4, "group_size": 64}
    with pytest.raises(ValueError, match="bits 3, width 2"):
        creator.create_plugin("linear", fields(bits=3, width=2, group_size=64), trt.TensorRTPhase.BUILD)


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
    # The float32 operator on the float32 scales (what ONNX Runtime computes) ...
    exact = plugin.reference(x.cpu().reshape(-1, 256), planes.cpu(), scale.cpu(), zero.cpu(), width, group_size)
    # ... and the kernels' own yardstick on the float16 inputs the kernel reads.
    weights = IntNWeights((planes.cpu(),), scale.cpu().half(), zero.cpu(), width, group_size, False, 256, 200)
    fp16 = intn_reference(x.cpu().reshape(-1, 256).half(), weights).float()
    scale_of = exact.abs().max()
    assert torch.isfinite(got).all()
    assert (got - fp16).abs().max() / scale_of < 2e-3
    assert (got - exact).abs().max() / scale_of < 5e-3
