"""The runtime loader: register llmc's TensorRT plugins before parsing ONNX or deserialising an engine.

An engine built from an llmc stage graph holds plugin layers whose implementation is Python
(``IPluginV3``); TensorRT stores only their fields. Any process that builds or runs such an
engine first calls :func:`register_plugins` with its TensorRT module::

    import tensorrt_rtx as trt                      # or: import tensorrt as trt
    from llmc.plugins.trt_plugins import register_plugins
    register_plugins(trt)
    engine = trt.Runtime(logger).deserialize_cuda_engine(data)

Each plugin module in :data:`PLUGINS` defines ``NAME``, ``VERSION``, ``NAMESPACE``,
``make_creator(trt)``, ``onnx_function()`` (the ONNX Runtime equivalent) and ``reference``.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmc.plugins import intn_linear_plugin

PLUGINS = (intn_linear_plugin,)

# TensorRT's registry keeps a raw pointer to each creator; the Python objects must outlive it.
_CREATORS: dict[tuple[str, str, str, str], object] = {}


@dataclass(frozen=True)
class PluginInfo:
    name: str
    version: str
    namespace: str


def plugin_infos() -> dict[tuple[str, str], PluginInfo]:
    """Plugins by their ONNX (domain, op_type)."""
    return {(m.NAMESPACE, m.NAME): PluginInfo(m.NAME, m.VERSION, m.NAMESPACE) for m in PLUGINS}


def onnx_functions(used: set[tuple[str, str]]) -> list:
    """The FunctionProtos of the plugins an ONNX graph uses, by (domain, op_type), in a stable order."""
    return [m.onnx_function() for m in PLUGINS if (m.NAMESPACE, m.NAME) in used]


def register_plugins(trt) -> list[PluginInfo]:
    """Register every llmc plugin creator with ``trt``'s plugin registry (idempotent)."""
    registry = trt.get_plugin_registry()
    registered = []
    for module in PLUGINS:
        key = (trt.__name__, module.NAME, module.VERSION, module.NAMESPACE)
        if key not in _CREATORS:
            creator = module.make_creator(trt)
            if not registry.register_creator(creator, module.NAMESPACE):
                raise RuntimeError(f"{trt.__name__} refused to register plugin {module.NAMESPACE}::{module.NAME}")
            _CREATORS[key] = creator
        registered.append(PluginInfo(module.NAME, module.VERSION, module.NAMESPACE))
    return registered
