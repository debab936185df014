"""``llmc::Fp6Linear`` / ``llmc::Fp4Linear``: the ONNX function in ONNX Runtime, the torch
reference and the plugin's enqueue running the Triton kernel (the last on a CUDA GPU only) agree."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from llmc.passes.export import IR_VERSION, OPSET, open_stage_sessions
from llmc.passes.fpx import FORMATS, FpxLinear, fpx_quantize
from llmc.plugins import fpx_linear_plugin as plugin
from llmc.plugins.linear_plugin import make_creator

CASES = [("e3m2", None), ("e3m2", 32), ("e2m3", 64), ("e2m1", None), ("e2m1", 32)]


def quantized(name: str, group, out_features=48, in_features=256, seed=0):
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[0, :4] = torch.tensor([1e-6, -1e-6, 0.0, -0.0])  # subnormal codes and both zeros
    return fpx_quantize(w, FORMATS[name], group, scale_dtype=torch.float16)


def one_node_model(q) -> onnx.ModelProto:
    weights, arrays = plugin.node_inputs(q)
    op = plugin.op_for(q.fmt)
    names = op.input_names[1:]
    node = helper.make_node(op.name, ["x", *names], ["y"], name="linear", domain=op.namespace,
                            **plugin.node_attributes(weights))
    graph = helper.make_graph(
        [node], "one_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", weights.in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", weights.out_features])],
        [numpy_helper.from_array(a, n) for a, n in zip(arrays, names)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("llmc", 1)],
                              functions=[op.onnx_function()])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize(("name", "group"), CASES)
def test_onnx_function_decodes_every_code_exactly(name, group):
    fmt = FORMATS[name]
    g = torch.Generator().manual_seed(5)
    codes = torch.randperm(48 * 256, generator=g).remainder(1 << fmt.bits).reshape(48, 256).to(torch.uint8)
    groups = 256 // (group or 256)
    scale = (torch.rand(48, groups, generator=g) * 0.1 + 1e-3).half().float()
    q = FpxLinear(codes, scale, fmt, group or 256)
    (session,) = open_stage_sessions([one_node_model(q)])
    # x = I gives W itself: the function's decode of every code, bit for bit, against the codec's.
    weight = session.run(["y"], {"x": np.eye(256, dtype=np.float32)})[0]
    assert np.array_equal(weight, q.dequantize().t().numpy())


@pytest.mark.parametrize(("name", "group"), CASES)
def test_onnx_function_and_reference_agree_on_activations(name, group):
    q = quantized(name, group, seed=1)
    weights, arrays = plugin.node_inputs(q)
    x = np.random.default_rng(2).standard_normal((5, 256)).astype(np.float32)
    (session,) = open_stage_sessions([one_node_model(q)])
    y = session.run(["y"], {"x": x})[0]
    reference = plugin.reference(x, arrays[:-1], arrays[-1], q.fmt, weights.group_size, weights.tile).numpy()
    np.testing.assert_allclose(y, reference, rtol=0, atol=1e-5)
    np.testing.assert_allclose(reference, x @ q.dequantize().t().numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("name", "group"), [("e3m2", None), ("e2m1", 32)])
def test_node_planes_are_the_weights_file_planes(name, group):
    q = quantized(name, group)
    _, arrays = plugin.node_inputs(q)
    stored = q.to_tensors("w")
    planes = [stored[f"w.fpx_plane{i}"].numpy() for i in range(len(arrays) - 1)]
    assert all(np.array_equal(a, b) for a, b in zip(arrays[:-1], planes, strict=True))
    assert arrays[-1].dtype == np.float16 and np.array_equal(arrays[-1].astype(np.float32), q.scale.t().numpy())


def test_fp8_has_no_plugin():
    with pytest.raises(ValueError, match="no plugin for e4m3"):
        plugin.node_inputs(fpx_quantize(torch.randn(16, 32), FORMATS["e4m3"]))


def test_creators_check_the_fields_and_serialise_them():
    trt = pytest.importorskip("tensorrt_rtx")

    def fields(**values):
        return trt.PluginFieldCollection([trt.PluginField(k, np.array(v, np.int32).reshape(-1), trt.PluginFieldType.INT32)
                                          for k, v in values.items()])

    good = dict(exponent_bits=3, mantissa_bits=2, group_size=256, tile=16, low_positions=plugin.low_positions(2))
    made = make_creator(trt, plugin.FP6).create_plugin("linear", fields(**good), trt.TensorRTPhase.BUILD)
    assert {f.name: tuple(int(v) for v in np.asarray(f.data)) for f in made.get_fields_to_serialize()} == {
        k: (v,) if isinstance(v, int) else tuple(v) for k, v in good.items()}
    with pytest.raises(ValueError, match="not the kernel's layout"):  # e2m3's layout under an e3m2 node
        make_creator(trt, plugin.FP6).create_plugin(
            "linear", fields(**{**good, "low_positions": plugin.low_positions(3)}), trt.TensorRTPhase.BUILD)
    with pytest.raises(ValueError, match="not one of e2m1"):
        make_creator(trt, plugin.FP4).create_plugin("linear", fields(exponent_bits=3, mantissa_bits=2, group_size=32,
                                                                     tile=32), trt.TensorRTPhase.BUILD)
    with pytest.raises(ValueError, match="e2m1 takes tile 8"):  # a group that is not a multiple of the tile
        make_creator(trt, plugin.FP4).create_plugin("linear", fields(exponent_bits=2, mantissa_bits=1, group_size=20,
                                                                     tile=8), trt.TensorRTPhase.BUILD)
    with pytest.raises(ValueError, match="e3m2 takes tile 16"):  # planes of another tile (plugin version 1)
        make_creator(trt, plugin.FP6).create_plugin("linear", fields(**{**good, "tile": 256}), trt.TensorRTPhase.BUILD)


# --- GPU: the enqueue path on raw device pointers and a raw stream, as TensorRT calls it ------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the kernels are Triton)")


@gpu
@pytest.mark.parametrize("x_shape", [(1, 256), (7, 256), (2, 33, 256), (300, 256)],
                         ids=["decode", "rows7", "batch_seq", "prefill"])
@pytest.mark.parametrize(("name", "group"), CASES)
def test_enqueue_runs_the_kernel_and_matches_the_references(name, group, x_shape):
    from llmc.plugins.fp6_linear import fpx_reference

    q = quantized(name, group, out_features=200, seed=3)
    weights, arrays = plugin.node_inputs(q)
    tensors = [torch.from_numpy(a).cuda() for a in arrays]
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(4)).cuda()
    out = torch.full((*x_shape[:-1], 200), float("nan"), device="cuda")
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    fields = {k: tuple(v) if isinstance(v, list) else (v,) for k, v in plugin.node_attributes(weights).items()
              if not k.startswith("plugin_")}
    plugin.op_for(q.fmt).enqueue([x.shape, *(t.shape for t in tensors)], [x.data_ptr(), *(t.data_ptr() for t in tensors)],
                       [out.data_ptr()], stream.cuda_stream, fields)
    stream.synchronize()
    got = out.cpu().reshape(-1, 200)
    x2 = x.cpu().reshape(-1, 256)
    exact = plugin.reference(x2, arrays[:-1], arrays[-1], q.fmt, weights.group_size, weights.tile)
    fp16 = fpx_reference(x2.half(), weights).float()  # the kernels' yardstick on the float16 x they read
    scale_of = exact.abs().max()
    assert torch.isfinite(got).all()
    assert (got - fp16).abs().max() / scale_of < 2e-3
    assert (got - exact).abs().max() / scale_of < 5e-3
