"""What llmc's quantized-linear plugins share: ONNX function bodies that unpack the kernels'
bit planes, and one TensorRT ``IPluginV3`` that hands TensorRT's buffers to a Triton kernel.

A plugin module (``intn_linear_plugin``, ``fpx_linear_plugin``) describes each operator with a
:class:`LinearOp`, from which :func:`make_creator` makes its TensorRT creator. Every such operator
computes ``y = x @ W`` with ``x`` float32 [..., K], its second input a plane of int32 words
[K / F, N] (the output width is that input's second dimension) and ``y`` float32 [..., N].
Its fields are the node's integer attributes (an attribute may be a list of integers).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# --------------------------------------------------------------------------- ONNX function bodies


class FunctionBody:
    """Nodes of an ONNX function body; every node is named after its single output."""

    def __init__(self):
        self.nodes = []

    def op(self, op_type: str, inputs: list[str], output: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def attribute(self, name: str, ints: bool = False) -> str:
        """A Constant holding the calling node's attribute ``name`` (an int, or a list of ints)."""
        from onnx import AttributeProto, helper

        node = helper.make_node("Constant", [], [name], name=name)
        kind, field = (AttributeProto.INTS, "value_ints") if ints else (AttributeProto.INT, "value_int")
        node.attribute.append(helper.make_attribute_ref(field, kind, ref_attr_name=name))
        self.nodes.append(node)
        return name

    def int64s(self, name: str, values) -> str:
        from onnx import TensorProto, helper

        values = list(values)
        return self.op("Constant", [], name, value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))

    def scalar(self, name: str, value: int) -> str:
        return self.op("Constant", [], name, value_int=value)

    def words_by_tile(self, words: str, width: str, tile: str, prefix: str) -> tuple[str, str]:
        """The int32 ``words`` [K / F, N] as unsigned values in int64, shaped [tiles, 1, rows per
        tile, N] (``llmc.passes.bitplanes`` rules 2-3), and N as a 1-D tensor."""
        from onnx import TensorProto

        unsigned = self.op("BitwiseAnd", [self.op("Cast", [words], f"{prefix}_i64", to=TensorProto.INT64),
                                          self.int64s(f"{prefix}_low32", [0xFFFFFFFF])], f"{prefix}_u32")
        rows_per_tile = self.op("Div", [self.op("Mul", [tile, width], f"{prefix}_tile_bits"),
                                        self.scalar(f"{prefix}_word_bits", 32)], f"{prefix}_rows_per_tile")
        out_features = self.op("Shape", [words], f"{prefix}_out_features", start=1, end=2)
        shape = self.op("Concat", [self.int64s(f"{prefix}_tiles", [-1, 1]),
                                   self.op("Unsqueeze", [rows_per_tile, self.int64s(f"{prefix}_axis0", [0])],
                                           f"{prefix}_rows_per_tile_1d"), out_features], f"{prefix}_by_tile_shape", axis=0)
        return self.op("Reshape", [unsigned, shape], f"{prefix}_by_tile"), out_features

    def fields(self, by_tile: str, divisors: str, modulus: str, out_features: str, prefix: str) -> str:
        """Field values [K, N] of words shaped by :meth:`words_by_tile`: ``word // divisor mod
        modulus`` with one divisor per field (shape [1, F, 1, 1]); field ``i`` of word-row ``j``
        of a tile is its input ``i * rows_per_tile + j``."""
        values = self.op("Mod", [self.op("Div", [by_tile, divisors], f"{prefix}_shifted"), modulus], f"{prefix}_fields")
        shape = self.op("Concat", [self.int64s(f"{prefix}_minus_one", [-1]), out_features], f"{prefix}_shape", axis=0)
        return self.op("Reshape", [values, shape], f"{prefix}_values")

    def contiguous_fields(self, words: str, width: str, tile: str, prefix: str) -> tuple[str, str]:
        """Codes [K, N] of a plane whose field ``i`` sits at bits ``[width i, width (i + 1))``, and N."""
        by_tile, out_features = self.words_by_tile(words, width, tile, prefix)
        two = self.int64s(f"{prefix}_two", [2])
        shifts = self.op("Range", [self.scalar(f"{prefix}_zero", 0), self.scalar(f"{prefix}_shift_end", 32), width],
                         f"{prefix}_shifts")
        divisors = self.op("Reshape", [self.op("Pow", [two, shifts], f"{prefix}_powers"),
                                       self.int64s(f"{prefix}_field_axis", [1, -1, 1, 1])], f"{prefix}_divisors")
        modulus = self.op("Pow", [two, width], f"{prefix}_range")
        return self.fields(by_tile, divisors, modulus, out_features, prefix), out_features


def function(body: FunctionBody, op: LinearOp, doc: str):
    """The FunctionProto of ``op`` from its body, taking the node's fields as attributes."""
    from onnx import helper

    from llmc.passes.export import OPSET

    return helper.make_function(
        op.namespace, op.name, inputs=list(op.input_names), outputs=["y"], nodes=body.nodes,
        opset_imports=[helper.make_opsetid("", OPSET)],
        attributes=[*op.fields, "plugin_version", "plugin_namespace"], doc_string=doc,
    )


# --------------------------------------------------------------------------- the TensorRT plugin


@dataclass(frozen=True)
class LinearOp:
    """One quantized-linear operator: its identity, its inputs' names and TensorRT types (``x``
    first, the output float32), its integer fields, a check of the fields a node brings (raises
    ``ValueError``), the enqueue body (``enqueue(input_dims, inputs, outputs, stream, fields)``
    with ``fields`` a dict of int tuples) and the maker of its ONNX FunctionProto."""

    name: str
    version: str
    namespace: str
    inputs: tuple[tuple[str, str], ...]  # (name, "float32" | "float16" | "int32"), x first
    fields: tuple[str, ...]
    check: Callable[[dict], None]
    enqueue: Callable
    onnx_function: Callable[[], object]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.inputs)


def make_creator(trt, op: LinearOp):
    """An ``IPluginCreatorV3One`` for ``op`` bound to ``trt`` (tensorrt or tensorrt_rtx)."""
    names = {"float32": trt.DataType.FLOAT, "float16": trt.DataType.HALF, "int32": trt.DataType.INT32}
    types = [names[t] for _, t in op.inputs] + [trt.DataType.FLOAT]

    class LinearPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, fields: dict[str, tuple[int, ...]]):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_version, self.plugin_namespace = op.name, op.version, op.namespace
            self.num_outputs = 1
            self.fields = fields

        def get_capability_interface(self, capability):
            return self

        def clone(self):
            return LinearPlugin(self.fields)

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([
                trt.PluginField(name, np.array(self.fields[name], np.int32), trt.PluginFieldType.INT32)
                for name in op.fields
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
            op.enqueue([d.dims for d in input_desc], inputs, outputs, stream, self.fields)
            return 0

    class LinearCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_version, self.plugin_namespace = op.name, op.version, op.namespace
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(name, np.array([], np.int32), trt.PluginFieldType.INT32) for name in op.fields]
            )

        def create_plugin(self, name, field_collection, phase):
            given = {f.name: tuple(int(v) for v in np.asarray(f.data).reshape(-1)) for f in field_collection}
            fields = {k: given.get(k, ()) for k in op.fields}
            try:
                op.check(fields)
            except ValueError as e:
                raise ValueError(f"{op.name} node {name}: {e}") from None
            return LinearPlugin(fields)

    return LinearCreator()


class _CudaArray:
    """A device pointer as ``__cuda_array_interface__``, so torch can wrap TensorRT's buffers."""

    def __init__(self, pointer: int, shape: tuple, typestr: str):
        self.__cuda_array_interface__ = {
            "shape": tuple(int(d) for d in shape), "typestr": typestr, "data": (int(pointer), False),
            "version": 3, "strides": None,
        }


def device_tensor(pointer: int, shape: tuple, typestr: str):
    """A torch CUDA tensor over TensorRT's buffer at ``pointer`` (``typestr``: "<f4", "<f2", "<i4")."""
    return _view(int(pointer), tuple(int(d) for d in shape), typestr)


@functools.lru_cache(maxsize=4096)
def _view(pointer: int, shape: tuple, typestr: str):
    # Kept: the view owns nothing, so the same pointer, shape and type always describe the same
    # tensor, and a plugin's buffers repeat from one enqueue to the next (the wrap costs about 6 us,
    # five per enqueue; docs/benchmarks/kernels.md, "Host time per call").
    import torch

    return torch.as_tensor(_CudaArray(pointer, shape, typestr), device="cuda")


@functools.lru_cache(maxsize=64)
def external_stream(handle: int):
    """TensorRT's ``cudaStream_t`` as a torch stream (kept per handle: a wrapper that owns nothing)."""
    import torch

    return torch.cuda.ExternalStream(handle)


def rows_and_features(x_dims) -> tuple[int, int]:
    """(rows, K) of an activation of dims [..., K]."""
    dims = tuple(int(d) for d in x_dims)
    return math.prod(dims[:-1]), dims[-1]
