"""``llmc::IntNLinear``: a linear layer on int2/3/4 codes with a zero point per group, as a TensorRT plugin.

TensorRT runs zero-point-free int4/int8 weights natively (``DequantizeLinear`` + ``MatMul``) but
rejects a non-zero int4 zero point; this plugin carries the asymmetric formats, computed by the
Triton kernel :func:`llmc.plugins.intn_linear.intn_linear`.

The operator, as the ONNX node and the TensorRT plugin see it (``y = x @ W``, ``W`` [K in, N out]):

- inputs: ``x`` float32 [..., K]; ``planes`` int32 [K / F, N], the unsigned codes as one bit
  plane of ``width`` bits (``F = 32 / width`` fields per word) in the kernels' layout
  (:mod:`llmc.passes.bitplanes`, tile = ``group_size``); ``scale`` float32 [K / group_size, N];
  ``zero`` float16 [K / group_size, N] (integers, exact in float16).
- attributes: ``bits`` (2, 3 or 4: the codes' range), ``width`` (2 or 4: the plane holding them;
  3-bit codes ride in a 4-bit plane, exactly), ``group_size``.
- output: float32 [..., N], ``W[k, n] = scale[k // group_size, n] * (code[k, n] - zero[k // group_size, n])``.

Three implementations of the one operator:

1. :func:`onnx_function`: the ONNX function body (unpack the plane with integer ``Div``/``Mod``,
   subtract the zero point, scale, ``MatMul``) stored in the model. ONNX Runtime inlines it, so
   the file the engines are built from is the file ONNX Runtime checks.
2. :func:`make_creator`: the TensorRT ``IPluginV3``; its ``enqueue`` is :func:`enqueue_buffers`,
   which wraps TensorRT's buffers and stream for torch and runs the Triton kernel (:func:`launch`).
   The ONNX parser prefers a registered plugin over the function body.
3. :func:`reference`: torch, for tests (the kernel's own yardstick is ``intn_reference``).
"""

from __future__ import annotations

import numpy as np

NAME = "IntNLinear"
VERSION = "1"
NAMESPACE = "llmc"  # also the ONNX domain of the node
PLANE_WIDTH = {2: 2, 3: 4, 4: 4}  # code bits -> plane width (a kernel exists for these widths)


def onnx_function():
    """The ONNX FunctionProto ``llmc.IntNLinear``: what ONNX Runtime runs for the plugin node."""
    from onnx import AttributeProto, TensorProto, helper

    from llmc.passes.export import OPSET

    nodes = []

    def op(op_type, inputs, output, **attrs):
        nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def from_attribute(name):
        node = helper.make_node("Constant", [], [name], name=name)
        node.attribute.append(helper.make_attribute_ref("value_int", AttributeProto.INT, ref_attr_name=name))
        nodes.append(node)
        return name

    def const(name, values):
        return op("Constant", [], name, value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))

    width, group = from_attribute("width"), from_attribute("group_size")
    two = const("two", [2])
    # Field i of a word sits at bits [width * i, width * (i + 1)): code = word // 2^(width i) mod 2^width,
    # on the word as an unsigned 32-bit value in int64.
    words = op("BitwiseAnd", [op("Cast", ["planes"], "words_i64", to=TensorProto.INT64),
                              const("low32", [0xFFFFFFFF])], "words_u32")
    shifts = op("Range", [op("Constant", [], "zero_i64", value_int=0), op("Constant", [], "word_bits", value_int=32), width],
                "shifts")
    divisors = op("Reshape", [op("Pow", [two, shifts], "powers"), const("field_axis", [1, -1, 1, 1])], "divisors")
    # Rows of words run [tile, rows per tile]; field i of row j of a tile is input i * rows_per_tile + j.
    rows_per_tile = op("Div", [op("Mul", [group, width], "tile_bits"), op("Constant", [], "thirty_two", value_int=32)],
                       "rows_per_tile")
    out_features = op("Shape", ["planes"], "out_features", start=1, end=2)
    by_tile = op("Concat", [const("minus_one", [-1]), const("one", [1]),
                            op("Unsqueeze", [rows_per_tile, const("axis0", [0])], "rows_per_tile_1d"), out_features],
                 "by_tile_shape", axis=0)
    fields = op("Mod", [op("Div", [op("Reshape", [words, by_tile], "words_by_tile"), divisors], "shifted"),
                        op("Pow", [two, width], "field_range")], "fields")
    grouped_shape = op("Concat", [const("minus_one_g", [-1]), op("Unsqueeze", [group, const("axis0_g", [0])], "group_1d"),
                                  out_features], "grouped_shape", axis=0)
    codes = op("Cast", [op("Reshape", [fields, grouped_shape], "codes_grouped")], "codes", to=TensorProto.FLOAT)
    zero = op("Unsqueeze", [op("Cast", ["zero"], "zero_f32", to=TensorProto.FLOAT), const("axis1", [1])], "zero_g")
    scale = op("Unsqueeze", ["scale", const("axis1_s", [1])], "scale_g")
    weight = op("Reshape", [op("Mul", [op("Sub", [codes, zero], "centered"), scale], "weight_grouped"),
                            op("Concat", [const("minus_one_w", [-1]), out_features], "weight_shape", axis=0)], "weight")
    nodes.append(helper.make_node("MatMul", ["x", weight], ["y"], name="matmul"))
    return helper.make_function(
        NAMESPACE,
        NAME,
        inputs=["x", "planes", "scale", "zero"],
        outputs=["y"],
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", OPSET)],
        attributes=["bits", "width", "group_size", "plugin_version", "plugin_namespace"],
        doc_string="y = x @ (scale * (code - zero)); codes unpacked from one bit plane, groups along the input",
    )


def node_attributes(bits: int, group_size: int) -> dict:
    """Attributes of an ``llmc.IntNLinear`` node: the plugin fields plus the plugin's identity."""
    return {"bits": bits, "width": PLANE_WIDTH[bits], "group_size": group_size,
            "plugin_version": VERSION, "plugin_namespace": NAMESPACE}


def node_inputs(packed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(planes int32 [K / F, N], scale float32 [K / g, N], zero float16 [K / g, N]) of an asymmetric PackedLinear."""
    import torch

    from llmc.passes.bitplanes import pack_plane

    if packed.symmetric or packed.bits not in PLANE_WIDTH:
        raise ValueError(f"{NAME} takes asymmetric {sorted(PLANE_WIDTH)}-bit codes, got "
                         f"{'symmetric' if packed.symmetric else 'asymmetric'} {packed.bits}-bit")
    codes = packed.q.to(torch.int64)
    high = 2**packed.bits - 1
    if int(codes.min()) < 0 or int(codes.max()) > high or int(packed.zero.min()) < 0 or int(packed.zero.max()) > high:
        raise ValueError(f"codes and zero points must lie in [0, {high}] for {packed.bits}-bit")
    planes = pack_plane(codes, PLANE_WIDTH[packed.bits], packed.group_size)
    return (planes.numpy(), packed.scale.t().contiguous().float().numpy(),
            packed.zero.t().contiguous().to(torch.float16).numpy())


def reference(x, planes, scale, zero, width: int, group_size: int):
    """torch reference of the operator in float32, from the node's own tensors."""
    import torch

    from llmc.passes.bitplanes import unpack_plane

    codes = unpack_plane(torch.as_tensor(planes).cpu(), width, group_size).t().to(torch.float32)  # [K, N]
    groups = lambda t: torch.as_tensor(t).cpu().to(torch.float32).repeat_interleave(group_size, dim=0)  # noqa: E731
    weight = groups(scale) * (codes - groups(zero))
    return torch.as_tensor(x).cpu().to(torch.float32) @ weight


# --------------------------------------------------------------------------- the kernel call


def launch(x, planes, scale, zero, width: int, group_size: int, out) -> None:
    """``out = x @ W`` on CUDA tensors, on the current stream.

    ``x`` float32 [M, K], ``planes`` int32 [K / F, N], ``scale`` float32 and ``zero`` float16
    [K / g, N], ``out`` float32 [M, N]. The kernel reads float16 activations, scales and zero
    points (its documented interface) and writes float16; 3-bit codes run as 4-bit codes.
    """
    import torch

    from llmc.plugins.intn_linear import IntNWeights, intn_linear

    weights = IntNWeights(
        planes=(planes,), scale=scale.to(torch.float16), zero=zero, bits=width, group_size=group_size,
        symmetric=False, in_features=x.shape[1], out_features=out.shape[1],
    )
    out.copy_(intn_linear(x.to(torch.float16), weights))


class _CudaArray:
    """A device pointer as ``__cuda_array_interface__``, so torch can wrap TensorRT's buffers."""

    def __init__(self, pointer: int, shape: tuple, typestr: str):
        self.__cuda_array_interface__ = {
            "shape": tuple(int(d) for d in shape), "typestr": typestr, "data": (int(pointer), False),
            "version": 3, "strides": None,
        }


def enqueue_buffers(input_dims, inputs, outputs, stream: int, width: int, group_size: int) -> None:
    """The body of the plugin's ``enqueue``: TensorRT's raw device pointers and stream -> :func:`launch`.

    ``input_dims``: the dims of x [..., K], planes [K / F, N] and scale [K / g, N], as TensorRT
    passes them; ``inputs``/``outputs``: device pointers; ``stream``: a ``cudaStream_t`` handle.
    """
    import torch

    x_dims, plane_dims, group_dims = (tuple(int(d) for d in dims) for dims in input_dims[:3])
    rows, in_features, out_features = int(np.prod(x_dims[:-1])), x_dims[-1], plane_dims[1]

    def wrap(pointer, shape, typestr):
        return torch.as_tensor(_CudaArray(pointer, shape, typestr), device="cuda")

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        launch(
            wrap(inputs[0], (rows, in_features), "<f4"),
            wrap(inputs[1], plane_dims, "<i4"),
            wrap(inputs[2], group_dims, "<f4"),
            wrap(inputs[3], group_dims, "<f2"),
            width, group_size,
            wrap(outputs[0], (rows, out_features), "<f4"),
        )


# --------------------------------------------------------------------------- the TensorRT plugin


def make_creator(trt):
    """An ``IPluginCreatorV3One`` for ``llmc::IntNLinear`` bound to ``trt`` (tensorrt or tensorrt_rtx)."""

    types = {0: trt.DataType.FLOAT, 1: trt.DataType.INT32, 2: trt.DataType.FLOAT, 3: trt.DataType.HALF,
             4: trt.DataType.FLOAT}
    fields = ("bits", "width", "group_size")

    class IntNLinearPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, bits: int, width: int, group_size: int):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_version, self.plugin_namespace = NAME, VERSION, NAMESPACE
            self.num_outputs = 1
            self.bits, self.width, self.group_size = bits, width, group_size

        def get_capability_interface(self, capability):
            return self

        def clone(self):
            return IntNLinearPlugin(self.bits, self.width, self.group_size)

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([
                trt.PluginField(name, np.array([getattr(self, name)], np.int32), trt.PluginFieldType.INT32)
                for name in fields
            ])

        # build phase
        def get_output_data_types(self, input_types):
            return [trt.DataType.FLOAT]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            out = trt.DimsExprs(inputs[0])
            out[len(out) - 1] = inputs[1][1]
            return [out]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            return desc.format == trt.TensorFormat.LINEAR and desc.type == types[pos]

        def configure_plugin(self, inputs, outputs):
            pass

        def get_workspace_size(self, inputs, outputs):
            return 0

        def get_valid_tactics(self):
            return []

        # runtime phase
        def on_shape_change(self, inputs, outputs):
            pass

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            enqueue_buffers([d.dims for d in input_desc], inputs, outputs, stream, self.width, self.group_size)
            return 0

    class IntNLinearCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_version, self.plugin_namespace = NAME, VERSION, NAMESPACE
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(name, np.array([], np.int32), trt.PluginFieldType.INT32) for name in fields]
            )

        def create_plugin(self, name, field_collection, phase):
            values = {f.name: int(np.asarray(f.data).reshape(-1)[0]) for f in field_collection}
            bits, width, group_size = (values.get(k, 0) for k in fields)
            if PLANE_WIDTH.get(bits) != width or group_size <= 0:
                raise ValueError(f"{NAME} node {name}: bits {bits}, width {width}, group_size {group_size} "
                                 f"(want bits -> width {PLANE_WIDTH}, group_size > 0)")
            return IntNLinearPlugin(bits, width, group_size)

    return IntNLinearCreator()
