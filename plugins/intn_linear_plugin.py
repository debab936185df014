"""``llmc::IntNLinear`` and ``llmc::Int3Linear``: linear layers on group-wise integer codes, as TensorRT plugins.

TensorRT runs zero-point-free int4/int8 weights natively (``DequantizeLinear`` + ``MatMul``) but
rejects a non-zero int4 zero point, and has no 3-bit type; these plugins carry the asymmetric int2/int4
formats and int3 (symmetric or not) at their own width, computed by the Triton kernels of
:func:`llmc.plugins.intn_linear.intn_linear` (int3: :mod:`llmc.plugins.int3_linear`).

The operators, as the ONNX node and the TensorRT plugin see them (``y = x @ W``, ``W`` [K in, N out]):

- ``IntNLinear`` (asymmetric int2 and int4). Inputs: ``x`` float32 [..., K]; ``planes`` int32 [K / F, N],
  the unsigned codes as one bit plane of ``width`` bits (``F = 32 / width`` fields per word) in the kernels'
  layout (:mod:`llmc.passes.bitplanes` at its kernel tile: word-row ``j`` holds inputs ``F j .. F j + F - 1``);
  ``scale`` float16 [K / group_size, N] (llmc's quantizers make every scale a float16 value, what the kernels
  read); ``zero`` float16 [K / group_size, N] (integers, exact in float16).
  Attributes: ``bits`` (2 or 4: the codes' range), ``width`` (the plane holding them, equal to ``bits``),
  ``group_size``.
- ``Int3Linear`` (int3, three bits a weight). Inputs: ``x`` float32 [..., K]; ``low`` int32 [K / 16, N], the
  codes' two low bits as a 2-bit plane, and ``high`` int32 [K / 32, N], their high bit as a 1-bit plane, both
  at the int3 kernel tile of 32 inputs (``bitplanes`` rule 3: word-rows ``2 t`` and ``2 t + 1`` of ``low``
  hold the even and the odd inputs of tile ``t``, bit ``i`` of word-row ``t`` of ``high`` input ``32 t + i``);
  ``scale`` float16 [K / group_size, N] (as ``IntNLinear``'s); ``zero`` float16: the
  zero points [K / group_size, N] when asymmetric, [1, 1] holding 4 when ``symmetric`` (codes ``q + 4``, as
  the kernels store symmetric codes; broadcast over every group). Attributes: ``group_size``, ``symmetric``.
- output: float32 [..., N], ``W[k, n] = scale[k // group_size, n] * (code[k, n] - zero[k // group_size, n])``.

Three implementations of each operator:

1. :func:`onnx_function` / :func:`int3_onnx_function`: the ONNX function body (unpack the planes with
   integer ``Div``/``Mod``, subtract the zero point, scale, ``MatMul``) stored in the model. ONNX Runtime
   inlines it, so the file the engines are built from is the file ONNX Runtime checks.
2. the TensorRT ``IPluginV3`` (:data:`OP`, :data:`INT3`, through ``linear_plugin.make_creator``); its ``enqueue``
   (:func:`enqueue_buffers`, :func:`int3_enqueue_buffers`) wraps TensorRT's buffers and stream for torch and runs
   the Triton kernel (:func:`launch`, :func:`int3_launch`). The ONNX parser prefers a registered plugin over
   the function body.
3. :func:`reference` / :func:`int3_reference`: torch, for tests (the kernels' own yardstick is ``intn_reference``).
"""

from __future__ import annotations

import functools

import numpy as np

from llmc.passes.bitplanes import int_kernel_tile
from llmc.plugins.linear_plugin import FunctionBody, LinearOp, device_tensor, external_stream, function, rows_and_features

NAME = "IntNLinear"
VERSION = "3"  # 3: float16 scales (2: float32; from 2, word-row j holds inputs F j .. F j + F - 1; 1: tiles of a group)
NAMESPACE = "llmc"  # also the ONNX domain of the node
PLANE_WIDTH = {2: 2, 4: 4}  # code bits -> plane width (3-bit codes: Int3Linear)


def _dequantized_product(body: FunctionBody, codes: str, out_features: str) -> None:
    """``y = x @ (scale * (codes - zero))`` from the unsigned codes [K, N] (int64), groups of ``group_size``
    inputs; ``zero`` broadcasts over the groups (Int3Linear's symmetric [1, 1])."""
    from onnx import TensorProto

    group = body.attribute("group_size")
    grouped_shape = body.op("Concat", [body.int64s("minus_one", [-1]),
                                       body.op("Unsqueeze", [group, body.int64s("axis0", [0])], "group_1d"),
                                       out_features], "grouped_shape", axis=0)
    codes = body.op("Cast", [body.op("Reshape", [codes, grouped_shape], "codes_grouped")], "codes", to=TensorProto.FLOAT)
    zero = body.op("Unsqueeze", [body.op("Cast", ["zero"], "zero_f32", to=TensorProto.FLOAT),
                                 body.int64s("axis1", [1])], "zero_g")
    scale = body.op("Unsqueeze", [body.op("Cast", ["scale"], "scale_f32", to=TensorProto.FLOAT),
                                  body.int64s("axis1_s", [1])], "scale_g")
    weight = body.op("Reshape", [body.op("Mul", [body.op("Sub", [codes, zero], "centered"), scale], "weight_grouped"),
                                 body.op("Concat", [body.int64s("minus_one_w", [-1]), out_features], "weight_shape",
                                         axis=0)], "weight")
    body.op("MatMul", ["x", weight], "y")


def onnx_function():
    """The ONNX FunctionProto ``llmc.IntNLinear``: what ONNX Runtime runs for the plugin node."""
    body = FunctionBody()
    width = body.attribute("width")
    fields = body.op("Div", [body.scalar("word_bits", 32), width], "fields")  # the kernel tile
    codes, out_features = body.contiguous_fields("planes", width, fields, "plane")
    _dequantized_product(body, codes, out_features)
    return function(body, OP, "y = x @ (scale * (code - zero)); codes unpacked from one bit plane, groups along the input")


def node_attributes(bits: int, group_size: int) -> dict:
    """Attributes of an ``llmc.IntNLinear`` node: the plugin fields plus the plugin's identity."""
    return {"bits": bits, "width": PLANE_WIDTH[bits], "group_size": group_size,
            "plugin_version": VERSION, "plugin_namespace": NAMESPACE}


def float16_scales(packed) -> np.ndarray:
    """``packed``'s scales transposed to [K / g, N] as float16, which they must hold exactly (llmc's RTN and GPTQ
    make them float16 values: the kernels read float16, and ONNX Runtime's check must compute what they do)."""
    import torch

    scale = packed.scale.t().contiguous()
    half = scale.to(torch.float16)
    if not torch.equal(half.to(scale.dtype), scale):
        raise ValueError("scales must be float16 values (llmc's rtn and gptq quantizers make them so)")
    return half.numpy()


def node_inputs(packed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(planes int32 [K / F, N], scale float16 [K / g, N], zero float16 [K / g, N]) of an asymmetric PackedLinear."""
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
    return planes.numpy(), float16_scales(packed), packed.zero.t().contiguous().to(torch.float16).numpy()


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

    ``x`` float32 [M, K], ``planes`` int32 [K / F, N], ``scale`` and ``zero`` float16
    [K / g, N], ``out`` float32 [M, N]. The kernel reads float16 activations, scales and zero
    points (its documented interface) and stores its float32 sums in ``out``.
    """
    import torch

    from llmc.plugins.intn_linear import IntNWeights, intn_linear

    weights = IntNWeights(
        planes=(planes,), scale=scale, zero=zero, bits=width, group_size=group_size,
        symmetric=False, in_features=x.shape[1], out_features=out.shape[1],
    )
    intn_linear(x.to(torch.float16), weights, out=out)


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
            device_tensor(inputs[2], group_dims, "<f2"),
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
              (("x", "float32"), ("planes", "int32"), ("scale", "float16"), ("zero", "float16")),
              ("bits", "width", "group_size"), check_fields, enqueue_buffers, onnx_function)


# --------------------------------------------------------------------------- llmc::Int3Linear

INT3_NAME = "Int3Linear"
INT3_VERSION = "1"
INT3_TILE = int_kernel_tile(3)  # 32 inputs per tile of both planes
SYMMETRIC_ZERO = 4  # symmetric codes q in [-4, 3] are stored as q + 4, zero point 4


def int3_onnx_function():
    """The ONNX FunctionProto ``llmc.Int3Linear``: what ONNX Runtime runs for the plugin node."""
    body = FunctionBody()
    tile = body.scalar("tile", INT3_TILE)
    low, out_features = body.contiguous_fields("low", body.scalar("low_width", 2), tile, "low")
    high, _ = body.contiguous_fields("high", body.scalar("high_width", 1), tile, "high")
    codes = body.op("Add", [low, body.op("Mul", [high, body.int64s("four", [4])], "high_bits")], "codes_u")
    _dequantized_product(body, codes, out_features)
    return function(body, INT3, "y = x @ (scale * (code - zero)); 3-bit codes from a 2-bit and a 1-bit plane, "
                                "groups along the input")


def int3_node_attributes(group_size: int, symmetric: bool) -> dict:
    """Attributes of an ``llmc.Int3Linear`` node: the plugin fields plus the plugin's identity."""
    return {"group_size": group_size, "symmetric": int(symmetric),
            "plugin_version": INT3_VERSION, "plugin_namespace": NAMESPACE}


def int3_node_inputs(packed) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(low int32 [K / 16, N], high int32 [K / 32, N], scale float16 [K / g, N], zero float16) of a 3-bit
    PackedLinear, in the int3 kernels' layout (``intn_linear.pack_intn``)."""
    import torch

    from llmc.plugins.intn_linear import pack_intn

    if packed.bits != 3:
        raise ValueError(f"{INT3_NAME} takes 3-bit codes, got {packed.bits}-bit")
    out_features, in_features = packed.q.shape
    if in_features % INT3_TILE or packed.group_size % INT3_TILE:
        raise ValueError(f"{INT3_NAME} needs inputs and groups in multiples of {INT3_TILE} "
                         f"(inputs {in_features}, group_size {packed.group_size})")
    low_code, high_code = (-4, 3) if packed.symmetric else (0, 7)
    codes = packed.q.to(torch.int64)
    zero_ok = packed.symmetric or (int(packed.zero.min()) >= 0 and int(packed.zero.max()) <= 7)
    if int(codes.min()) < low_code or int(codes.max()) > high_code or not zero_ok:
        raise ValueError(f"codes{'' if packed.symmetric else ' and zero points'} must lie in [{low_code}, {high_code}] "
                         f"for {'symmetric' if packed.symmetric else 'asymmetric'} 3-bit")
    scale = float16_scales(packed)
    weights = pack_intn(packed)
    zero = np.full((1, 1), SYMMETRIC_ZERO, np.float16) if packed.symmetric else weights.zero.numpy()
    low, high = (plane.numpy() for plane in weights.planes)
    return low, high, scale, zero


def int3_reference(x, low, high, scale, zero, group_size: int):
    """torch reference of ``Int3Linear`` in float32, from the node's own tensors."""
    import torch

    from llmc.passes.bitplanes import unpack_int_codes

    planes = tuple(torch.as_tensor(p).cpu() for p in (low, high))
    codes = unpack_int_codes(planes, 3, INT3_TILE).t().to(torch.float32)  # [K, N]
    groups = lambda t: torch.as_tensor(t).cpu().to(torch.float32).repeat_interleave(group_size, dim=0)  # noqa: E731
    zero = torch.as_tensor(zero).cpu().to(torch.float32)
    weight = groups(scale) * (codes - (zero if zero.numel() == 1 else groups(zero)))
    return torch.as_tensor(x).cpu().to(torch.float32) @ weight


@functools.lru_cache(maxsize=64)
def _symmetric_zero(shape: tuple[int, int], device):
    # IntNWeights carry a zero point per group, 4 when symmetric (the dequantize kernel of more than 64 rows and the
    # references read it; the node holds one): one tensor per shape for the process, not one allocation per call.
    import torch

    return torch.full(shape, float(SYMMETRIC_ZERO), dtype=torch.float16, device=device)


def int3_launch(x, low, high, scale, zero, group_size: int, symmetric: bool, out) -> None:
    """``out = x @ W`` on CUDA tensors, on the current stream: ``x`` float32 [M, K], the node's planes, float16
    scale and zero point, ``out`` float32 [M, N]. The kernels read float16 activations and scales and store
    their float32 sums in ``out``."""
    import torch

    from llmc.plugins.intn_linear import IntNWeights, intn_linear

    if symmetric:
        zero = _symmetric_zero(tuple(scale.shape), scale.device)
    weights = IntNWeights(
        planes=(low, high), scale=scale, zero=zero, bits=3, group_size=group_size, symmetric=symmetric,
        in_features=x.shape[1], out_features=out.shape[1],
    )
    intn_linear(x.to(torch.float16), weights, out=out)


def int3_enqueue_buffers(input_dims, inputs, outputs, stream: int, fields: dict) -> None:
    """``Int3Linear``'s ``enqueue``: TensorRT's dims of x, low, high, scale and zero, device pointers and stream
    -> :func:`int3_launch`."""
    import torch

    rows, in_features = rows_and_features(input_dims[0])
    low_dims, high_dims, scale_dims, zero_dims = (tuple(int(d) for d in dims) for dims in input_dims[1:5])
    with torch.cuda.stream(external_stream(stream)):
        int3_launch(
            device_tensor(inputs[0], (rows, in_features), "<f4"),
            device_tensor(inputs[1], low_dims, "<i4"),
            device_tensor(inputs[2], high_dims, "<i4"),
            device_tensor(inputs[3], scale_dims, "<f2"),
            device_tensor(inputs[4], zero_dims, "<f2"),
            fields["group_size"][0], bool(fields["symmetric"][0]),
            device_tensor(outputs[0], (rows, low_dims[1]), "<f4"),
        )


def int3_check_fields(fields: dict) -> None:
    group_size, symmetric = (fields[k][0] if fields[k] else -1 for k in ("group_size", "symmetric"))
    if group_size <= 0 or group_size % INT3_TILE or symmetric not in (0, 1):
        raise ValueError(f"group_size {group_size}, symmetric {symmetric} "
                         f"(want group_size a positive multiple of {INT3_TILE}, symmetric 0 or 1)")


INT3 = LinearOp(INT3_NAME, INT3_VERSION, NAMESPACE,
                (("x", "float32"), ("low", "int32"), ("high", "int32"), ("scale", "float16"), ("zero", "float16")),
                ("group_size", "symmetric"), int3_check_fields, int3_enqueue_buffers, int3_onnx_function)
