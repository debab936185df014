"""``llmc::Fp6Linear`` and ``llmc::Fp4Linear``: linear layers on FP6 (e3m2, e2m3) and FP4 (e2m1)
weights, as TensorRT plugins around the Triton kernels of :mod:`llmc.plugins.fp6_linear`.

TensorRT has no 6-bit type, and its FP4 needs Blackwell; these plugins carry the codes at their
own width in the kernels' layout (``llmc.passes.bitplanes``: FP6 as a 4-bit and a 2-bit plane,
FP4 as one 4-bit plane).

The operators, as the ONNX node and the TensorRT plugin see them (``y = x @ W``, ``W`` [K in, N out]):

- inputs: ``x`` float32 [..., K]; the planes: ``Fp6Linear`` ``high`` int32 [K / 8, N] (the top
  four magnitude bits) and ``low`` int32 [K / 16, N] (the lowest magnitude bit and the sign,
  each field's two bits at ``low_positions``), ``Fp4Linear`` ``plane`` int32 [K / 8, N] (whole
  codes); ``scale`` float16 [K / group_size, N] (the pass rounds scales to float16, so this is
  exact).
- attributes: ``exponent_bits``, ``mantissa_bits`` (the format), ``group_size`` (K for one
  scale per output channel), ``tile`` (the planes' tile: 16 for FP6, 8 for FP4, the kernels' layout), and for FP6 ``low_positions``: the
  32 bit positions (lowest magnitude bit, sign) of the 2-bit plane's 16 fields, checked against
  the kernel's layout when TensorRT creates the plugin.
- output: float32 [..., N], ``W[k, n] = scale[k // group_size, n] * decode(code[k, n])``.

As for ``llmc::IntNLinear``, each has an ONNX function body that ONNX Runtime inlines (the
bits unpacked with integer ``Div``/``Mod``, decoded through a table computed from the
attributes: ``(m + 2^M min(e, 1)) 2^(max(e, 1) - bias - M)`` covers subnormals), a TensorRT
``IPluginV3`` whose ``enqueue`` runs :func:`llmc.plugins.fp6_linear.fpx_linear`, and a torch
:func:`reference`.
"""

from __future__ import annotations

from llmc.passes.bitplanes import fp6_low_positions, fp_kernel_tile
from llmc.passes.fpx import FpFormat, format_of
from llmc.plugins.linear_plugin import FunctionBody, LinearOp, device_tensor, external_stream, function, rows_and_features

VERSION = "2"  # 2: the kernels' tile (16 inputs per row of FP6's 2-bit plane, 8 per FP4 word); 1: any tile
NAMESPACE = "llmc"
FIELDS = ("exponent_bits", "mantissa_bits", "group_size", "tile")
FP6_FORMATS = ("e3m2", "e2m3")
FP4_FORMATS = ("e2m1",)


def low_positions(mantissa_bits: int) -> tuple[int, ...]:
    """The ``low_positions`` attribute: (lowest magnitude bit, sign) per field, flattened."""
    return tuple(p for pair in fp6_low_positions(mantissa_bits) for p in pair)


# --------------------------------------------------------------------------- ONNX

def _decode_tail(body: FunctionBody, magnitude: str, sign: str, out_features: str) -> None:
    """``y = x @ W`` from each weight's magnitude code and sign bit [K, N] (both int64)."""
    from onnx import TensorProto

    e_bits, m_bits, group = body.attribute("exponent_bits"), body.attribute("mantissa_bits"), body.attribute("group_size")
    two, one = body.scalar("two_s", 2), body.scalar("one_s", 1)
    steps = body.op("Pow", [two, m_bits], "steps")
    codes = body.op("Range", [body.scalar("zero_s", 0), body.op("Pow", [two, body.op("Add", [e_bits, m_bits], "em")],
                                                                "magnitudes"), one], "magnitude_codes")
    exponent = body.op("Div", [codes, steps], "exponent_field")
    significand = body.op("Add", [body.op("Mod", [codes, steps], "mantissa_field"),
                                  body.op("Mul", [steps, body.op("Min", [exponent, one], "is_normal")], "implicit_one")],
                          "significand")
    bias = body.op("Sub", [body.op("Pow", [two, body.op("Sub", [e_bits, one], "e_minus_one")], "half_range"), one], "bias")
    power = body.op("Sub", [body.op("Sub", [body.op("Max", [exponent, one], "binade"), bias], "unbiased"), m_bits], "power")
    two_f = body.op("Constant", [], "two_f", value_float=2.0)
    table = body.op("Mul", [body.op("Cast", [significand], "significand_f", to=TensorProto.FLOAT),
                            body.op("Pow", [two_f, power], "quantum")], "magnitude_table")
    values = body.op("Gather", [table, magnitude], "magnitudes_f", axis=0)
    signs = body.op("Sub", [body.op("Constant", [], "one_f", value_float=1.0),
                            body.op("Mul", [two_f, body.op("Cast", [sign], "sign_f", to=TensorProto.FLOAT)], "twice_sign")],
                    "signs")
    decoded = body.op("Mul", [values, signs], "decoded")
    grouped_shape = body.op("Concat", [body.op("Constant", [], "minus_one", value_ints=[-1]),
                                       body.op("Unsqueeze", [group, body.op("Constant", [], "axis0", value_ints=[0])],
                                               "group_1d"), out_features], "grouped_shape", axis=0)
    scale = body.op("Unsqueeze", [body.op("Cast", ["scale"], "scale_f", to=TensorProto.FLOAT),
                                  body.op("Constant", [], "axis1", value_ints=[1])], "scale_g")
    weight = body.op("Reshape", [body.op("Mul", [body.op("Reshape", [decoded, grouped_shape], "decoded_grouped"), scale],
                                         "weight_grouped"),
                                 body.op("Concat", [body.op("Constant", [], "minus_one_w", value_ints=[-1]), out_features],
                                         "weight_shape", axis=0)], "weight")
    body.op("MatMul", ["x", weight], "y")


def _fp6_function():
    body = FunctionBody()
    tile = body.attribute("tile")
    nibbles, out_features = body.contiguous_fields("high", body.scalar("four", 4), tile, "high")
    by_tile, _ = body.words_by_tile("low", body.scalar("two", 2), tile, "low")
    pairs = body.op("Reshape", [body.attribute("low_positions", ints=True), body.int64s("pairs_shape", [-1, 2])], "pairs")
    two = body.int64s("two_1d", [2])
    bits = []
    for column, what in ((0, "low_bit"), (1, "sign")):
        positions = body.op("Gather", [pairs, body.scalar(f"{what}_column", column)], f"{what}_positions", axis=1)
        divisors = body.op("Pow", [two, body.op("Reshape", [positions, body.int64s(f"{what}_axis", [1, -1, 1, 1])],
                                                f"{what}_by_field")], f"{what}_divisors")
        bits.append(body.fields(by_tile, divisors, two, out_features, what))
    magnitude = body.op("Add", [body.op("Mul", [nibbles, two], "high_bits"), bits[0]], "magnitude")
    _decode_tail(body, magnitude, bits[1], out_features)
    return function(body, FP6, "y = x @ (scale * decode(code)); FP6 codes from a 4-bit and a 2-bit plane")


def _fp4_function():
    body = FunctionBody()
    nibbles, out_features = body.contiguous_fields("plane", body.scalar("four", 4), body.attribute("tile"), "plane")
    eight = body.int64s("eight", [8])
    _decode_tail(body, body.op("Mod", [nibbles, eight], "magnitude"), body.op("Div", [nibbles, eight], "sign"),
                 out_features)
    return function(body, FP4, "y = x @ (scale * decode(code)); FP4 codes from one 4-bit plane")


def op_for(fmt: FpFormat) -> LinearOp:
    """The operator that carries weights of ``fmt``."""
    if fmt.name in FP6_FORMATS:
        return FP6
    if fmt.name in FP4_FORMATS:
        return FP4
    raise ValueError(f"no plugin for {fmt.name} weights (plugins: FP6 {', '.join(FP6_FORMATS)}; FP4 e2m1)")


def node_attributes(weights) -> dict:
    """Attributes of the node for kernel-ready :class:`~llmc.plugins.fp6_linear.FpxWeights`."""
    fmt = weights.fmt
    attributes = {"exponent_bits": fmt.exponent_bits, "mantissa_bits": fmt.mantissa_bits,
                  "group_size": weights.group_size, "tile": weights.tile}
    if fmt.bits == 6:
        attributes["low_positions"] = list(low_positions(fmt.mantissa_bits))
    return {**attributes, "plugin_version": VERSION, "plugin_namespace": NAMESPACE}


def node_inputs(packed):
    """(the packed weights ready for the kernels, the node's weight inputs as numpy arrays) of an
    :class:`~llmc.passes.fpx.FpxLinear`: its planes, then its float16 scales [K / group_size, N]."""
    from llmc.plugins.fp6_linear import pack_fpx

    op_for(packed.fmt)
    weights = pack_fpx(packed)
    return weights, [p.numpy() for p in weights.planes] + [weights.scale.numpy()]


def reference(x, planes, scale, fmt: FpFormat, group_size: int, tile: int):
    """torch reference of the operator in float32, from the node's own tensors."""
    import torch

    from llmc.plugins.fp6_linear import FpxWeights, fpx_dequantize_reference

    planes = tuple(torch.as_tensor(p).cpu() for p in planes)
    scale = torch.as_tensor(scale).cpu()
    in_features = planes[0].shape[0] * 8
    weights = FpxWeights(planes, scale, fmt, group_size, tile, in_features, scale.shape[1])
    return torch.as_tensor(x).cpu().to(torch.float32) @ fpx_dequantize_reference(weights).t()


# --------------------------------------------------------------------------- TensorRT


def launch(x, planes, scale, fmt: FpFormat, group_size: int, tile: int, out) -> None:
    """``out = x @ W`` on CUDA tensors, on the current stream: ``x`` float32 [M, K], the planes
    int32, ``scale`` float16 [K / group_size, N], ``out`` float32 [M, N]. The kernel reads
    float16 activations and stores its float32 sums in ``out``."""
    from llmc.plugins.fp6_linear import FpxWeights, fpx_linear

    weights = FpxWeights(tuple(planes), scale, fmt, group_size, tile, x.shape[1], out.shape[1])
    fpx_linear(x.half(), weights, out=out)


def _enqueue(input_dims, inputs, outputs, stream: int, fields: dict) -> None:
    """The plugins' ``enqueue``: TensorRT's raw device pointers and stream -> :func:`launch`."""
    import torch

    rows, in_features = rows_and_features(input_dims[0])
    fmt = format_of(fields["exponent_bits"][0], fields["mantissa_bits"][0])
    *plane_dims, scale_dims = (tuple(int(d) for d in dims) for dims in input_dims[1:])
    planes = [device_tensor(pointer, dims, "<i4") for pointer, dims in zip(inputs[1:-1], plane_dims)]
    with torch.cuda.stream(external_stream(stream)):
        launch(device_tensor(inputs[0], (rows, in_features), "<f4"), planes,
               device_tensor(inputs[-1], scale_dims, "<f2"), fmt, fields["group_size"][0], fields["tile"][0],
               device_tensor(outputs[0], (rows, scale_dims[1]), "<f4"))


def _checker(formats: tuple[str, ...]):
    def check(fields: dict) -> None:
        values = {k: (v[0] if len(v) == 1 else 0) for k, v in fields.items() if k in FIELDS}
        fmt = format_of(values["exponent_bits"], values["mantissa_bits"])
        if fmt is None or fmt.name not in formats:
            raise ValueError(f"exponent_bits {values['exponent_bits']}, mantissa_bits {values['mantissa_bits']} "
                             f"is not one of {', '.join(formats)}")
        tile = fp_kernel_tile(fmt.bits)
        if values["tile"] != tile or values["group_size"] <= 0 or values["group_size"] % tile:
            raise ValueError(f"tile {values['tile']} and group_size {values['group_size']}: {fmt.name} takes "
                             f"tile {tile} and a positive group_size that is a multiple of it")
        if fmt.bits == 6 and fields["low_positions"] != low_positions(fmt.mantissa_bits):
            raise ValueError(f"low_positions {list(fields['low_positions'])} are not the kernel's layout "
                             f"{list(low_positions(fmt.mantissa_bits))}")
    return check


FP6 = LinearOp("Fp6Linear", VERSION, NAMESPACE,
               (("x", "float32"), ("high", "int32"), ("low", "int32"), ("scale", "float16")),
               (*FIELDS, "low_positions"), _checker(FP6_FORMATS), _enqueue, _fp6_function)
FP4 = LinearOp("Fp4Linear", VERSION, NAMESPACE, (("x", "float32"), ("plane", "int32"), ("scale", "float16")),
               FIELDS, _checker(FP4_FORMATS), _enqueue, _fp4_function)
