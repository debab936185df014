"""The runtime loader: register llmc's TensorRT plugins before parsing ONNX or deserialising an engine.

An engine built from an llmc stage graph holds plugin layers whose implementation is Python
(``IPluginV3``); TensorRT stores only their fields. Any process that builds or runs such an
engine first calls :func:`register_plugins` with its TensorRT module::

    import tensorrt_rtx as trt                      # or: import tensorrt as trt
    from llmc.plugins.trt_plugins import register_plugins
    register_plugins(trt)
    engine = trt.Runtime(logger).deserialize_cuda_engine(data)

Each operator in :data:`PLUGINS` is a :class:`~llmc.plugins.linear_plugin.LinearOp`: its
identity, its TensorRT plugin and its ONNX Runtime equivalent (an ONNX function).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmc.plugins import fpx_linear_plugin, intn_linear_plugin
from llmc.plugins.linear_plugin import make_creator

PLUGINS = (intn_linear_plugin.OP, intn_linear_plugin.INT3, fpx_linear_plugin.FP6, fpx_linear_plugin.FP4)

# TensorRT's registry keeps a raw pointer to each creator; the Python objects must outlive it.
_CREATORS: dict[tuple[str, str, str, str], object] = {}


@dataclass(frozen=True)
class PluginInfo:
    name: str
    version: str
    namespace: str


def plugin_infos() -> dict[tuple[str, str], PluginInfo]:
    """Plugins by their ONNX (domain, op_type)."""
    return {(op.namespace, op.name): PluginInfo(op.name, op.version, op.namespace) for op in PLUGINS}


def onnx_functions(used: set[tuple[str, str]]) -> list:
    """The FunctionProtos of the plugins an ONNX graph uses, by (domain, op_type), in a stable order."""
    return [op.onnx_function() for op in PLUGINS if (op.namespace, op.name) in used]


def register_plugins(trt) -> list[PluginInfo]:
    """Register every llmc plugin creator with ``trt``'s plugin registry (idempotent)."""
    registry = trt.get_plugin_registry()
    registered = []
    for op in PLUGINS:
        key = (trt.__name__, op.name, op.version, op.namespace)
        if key not in _CREATORS:
            creator = make_creator(trt, op)
            if not registry.register_creator(creator, op.namespace):
                raise RuntimeError(f"{trt.__name__} refused to register plugin {op.namespace}::{op.name}")
            _CREATORS[key] = creator
        registered.append(PluginInfo(op.name, op.version, op.namespace))
    return registered
