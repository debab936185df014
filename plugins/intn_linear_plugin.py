"""``llmc::IntNLinear``: a linear layer on int2/3/4 codes with a zero point per group, as a TensorRT plugin.

TensorRT runs zero-point-free int4/int8 weights natively (``DequantizeLinear`` + ``MatMul``) but
rejects a non-zero int4 zero point; this plugin carries the asymmetric formats, computed by the
Triton kernel :func:`llmc.plugins.intn_linear.intn_linear`.

The operator, as the ONNX node and the TensorRT plugin see it (``y = x @ W``, ``W`` [K in, N out]):

- inputs: ``x`` float32 [..., K]; ``planes`` int32 [K / F, N], the unsigned codes as one bit
  plane of ``width`` bits (``F = 32 / width`` fields per word) in the kernels' layout
  (:mod:`llmc.passes.bitplanes` at its kernel tile: word-row ``j`` holds inputs ``F j .. F j + F - 1``);
  ``scale`` float32 [K / group_size, N];
  ``zero`` float16 [K / group_size, N] (integers, exact in float16).
- attributes: ``bits`` (2, 3 or 4: the codes' range), ``width`` (2 or 4: the plane holding them;
  3-bit codes ride in a 4-bit plane, exactly), ``group_size``.
- output: float32 [..., N], ``W[k, n] = scale[k // group_size, n] * (code[k, n] - zero[k // group_size, n])``.

Three implementations of the one operator:

1. :func:`onnx_function`: the ONNX function body (unpack the plane with integer ``Div``/``Mod``,
   subtract the zero point, scale, ``MatMul``) stored in the model. ONNX Runtime inlines it, so
   the file the engines are built from is the file ONNX Runtime checks.
2. the TensorRT ``IPluginV3`` (:data:`OP`, through ``linear_plugin.make_creator``); its ``enqueue`` is :func:`enqueue_buffers`,
   which wraps TensorRT's buffers and stream for torch and runs the Triton kernel (:func:`launch`).
   The ONNX parser prefers a registered plugin over the function body.
3. :func:`reference`: torch, for tests (the kernel's own yardstick is ``intn_reference``).
"""

from __future__ import annotations

import numpy as np

from llmc.plugins.linear_plugin import FunctionBody, LinearOp, device_tensor, external_stream, function, rows_and_features

NAME = "IntNLinear"
VERSION = "2"  # 2: word-row j holds inputs F j .. F j + F - 1 (1: tiles of a group)
NAMESPACE = "llmc"  # also the ONNX domain of the node
PLANE_WIDTH = {2: 2, 3: 4, 4: 4}  # code bits -> plane width (a kernel exists for these widths)


def onnx_function():
    """The ONNX FunctionProto ``llmc.IntNLinear``: what ONNX Runtime runs for the plugin node."""
    from onnx import TensorProto

    body = FunctionBody()
    width, group = body.attribute("width"), body.attribute("group_size")
    fields = body.op("Div", [body.scalar("word_bits", 32), width], "fields")  # the kernel tile
    codes, out_features = body.contiguous_fields("planes", width, fields, "plane")
    grouped_shape = body.op("Concat", [body.int64s("minus_one", [-1]),
                                       body.op("Unsqueeze", [group, body.int64s("axis0", [0])], "group_1d"),
                                       out_features], "grouped_shape", axis=0)
    codes = body.op("Cast", [body.op("Reshape", [codes, grouped_shape], "codes_grouped")], "codes", to=TensorProto.FLOAT)
    zero = body.op("Unsqueeze", [body.op("Cast", ["zero"], "zero_f32", to=TensorProto.FLOAT),
                                 body.int64s("axis1", [1])], "zero_g")
    scale = body.op("Unsqueeze", ["scale", body.int64s("axis1_s", [1])], "scale_g")
    weight = body.op("Reshape", [body.op("Mul", [body.op("Sub", [codes, zero], "centered"), scale], "weight_grouped"),
                                 body.op("Concat", [body.int64s("minus_one_w", [-1]), out_features], "weight_shape",
                                         axis=0)], "weight")
    body.op("MatMul", ["x", weight], "y")
    return function(body, OP, "y = x @ (scale * (code - zero)); codes unpacked from one bit plane, groups along the input")


def node_attributes(bits: int, group_size: int) -> dict:
    """Attributes of an ``llmc.IntNLinear`` node: the plugin fields plus the plugin's identity."""
    return {"bits": bits, "width": PLANE_WIDTH[bits], "group_size": group_size,
            "plugin_version": VERSION, "plugin_namespace": NAMESPACE}


def node_inputs(packed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(planes int32 [K / F, N], scale float32 [K / g, N], zero float16 [K / g, N]) of an asymmetric PackedLinear."""
    import torch

    from llmc.passes.bitplanes import kernel_tile, pack_plane

    if packed.symmetric or packed.bits not in PLANE_WIDTH:
        raise ValueError(f"{NAME} takes asymmetric {sorted(PLANE_WIDTH)}-bit codes, got "
                         f"{'symmetric' if packed.symmetric else 'asymmetric'} {packed.bits}-bit")
    codes = packed.q.to(torch.int64)
    high = 2**packed.bits - 1
    if int(codes.min()) < 0 or int(codes.max()) > high or int(packed.zero.min()) < 0 or int(packed.zero.max()) > high:
        raise ValueError(f"codes and zero points must lie in [0, {high}] for {packed.bits}-bit")
    width = PLANE_WIDTH[packed.bits]
    planes = pack_plane(codes, width, kernel_tile((width,)))
    return (planes.numpy(), packed.scale.t().contiguous().float().numpy(),
            packed.zero.t().contiguous().to(torch.float16).numpy())


def reference(x, planes, scale, zero, width: int, group_size: int):
    """torch reference of the operator in float32, from the node's own tensors."""
    import torch

    from llmc.passes.bitplanes import kernel_tile, unpack_plane

    codes = unpack_plane(torch.as_tensor(planes).cpu(), width, kernel_tile((width,))).t().to(torch.float32)  # [K, N]
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


def enqueue_buffers(input_dims, inputs, outputs, stream: int, fields: dict) -> None:
    """The body of the plugin's ``enqueue``: TensorRT's raw device pointers and stream -> :func:`launch`.

    ``input_dims``: the dims of x [..., K], planes [K / F, N] and scale [K / g, N], as TensorRT
    passes them; ``inputs``/``outputs``: device pointers; ``stream``: a ``cudaStream_t`` handle;
    ``fields``: the node's fields (``width``, ``group_size``) as tuples.
    """
    import torch

    rows, in_features = rows_and_features(input_dims[0])
    plane_dims, group_dims = (tuple(int(d) for d in dims) for dims in input_dims[1:3])
    with torch.cuda.stream(external_stream(stream)):
        launch(
            device_tensor(inputs[0], (rows, in_features), "<f4"),
            device_tensor(inputs[1], plane_dims, "<i4"),
            device_tensor(inputs[2], group_dims, "<f4"),
            device_tensor(inputs[3], group_dims, "<f2"),
            fields["width"][0], fields["group_size"][0],
            device_tensor(outputs[0], (rows, plane_dims[1]), "<f4"),
        )


# --------------------------------------------------------------------------- the TensorRT plugin


def check_fields(fields: dict) -> None:
    bits, width, group_size = (fields[k][0] if fields[k] else 0 for k in ("bits", "width", "group_size"))
    if PLANE_WIDTH.get(bits) != width or group_size <= 0:
        raise ValueError(f"bits {bits}, width {width}, group_size {group_size} "
                         f"(want bits -> width {PLANE_WIDTH}, group_size > 0)")


OP = LinearOp(NAME, VERSION, NAMESPACE,
              (("x", "float32"), ("planes", "int32"), ("scale", "float32"), ("zero", "float16")),
              ("bits", "width", "group_size"), check_fields, enqueue_buffers, onnx_function)
