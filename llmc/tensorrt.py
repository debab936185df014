"""TensorRT, whichever flavour is installed: the one place that knows `tensorrt` from `tensorrt_rtx`.

Two flavours build engines from the same ONNX:

- ``tensorrt`` (full TensorRT, GPU build hosts): builds for the GPU it runs on, so it can build
  a target only when a local GPU has the target's compute capability.
- ``tensorrt_rtx`` (TensorRT for RTX, ``pip install tensorrt-rtx-cu13``): builds ahead of time
  on a CPU-only host for the compute capabilities its ``ComputeCapability`` enum lists
  (1.7: SM75/80/86/89/120/121). It has no SM90: its engines refuse to load on an H100.

Both are strongly typed (the graph's types are the engine's types; no precision flags). Full
TensorRT gets the ``STRONGLY_TYPED`` network flag; TensorRT for RTX is always so.

Engines are not byte-reproducible: two builds of the same network with the same config, in one
process, with one builder thread and address randomisation off, differ in about 1,600 of
3.2 million bytes (measured with tensorrt_rtx 1.7.1.116 on the tiny test model). Callers keep
engines out of byte-identity checks and record their sha256 beside them instead.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmc.errors import ToolchainError

log = logging.getLogger("llmc")

# Import name and the short tag engine directories carry, full TensorRT first.
_FLAVORS = (("tensorrt", "trt"), ("tensorrt_rtx", "trtrtx"))
PLUGIN_LAYER = "PLUGIN_V3"


@dataclass(frozen=True)
class Flavor:
    """An importable TensorRT flavour and the compute capabilities it can build for on this host."""

    name: str  # the module: "tensorrt" or "tensorrt_rtx"
    tag: str  # "trt" or "trtrtx", used in engine directory names
    version: str
    compute_capabilities: tuple[str, ...]  # "8.0", "8.6", ...
    module: object = field(compare=False, repr=False)

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


def compute_capability_name(cc: str) -> str:
    """Compute capability "8.0" -> "sm80"."""
    return "sm" + cc.replace(".", "")


def _rtx_capabilities(trt) -> tuple[str, ...]:
    names = [n for n in trt.ComputeCapability.__members__ if n.startswith("SM")]
    return tuple(f"{n[2:-1]}.{n[-1]}" for n in names)


def _local_gpu_capabilities() -> tuple[str, ...]:
    try:
        import torch
    except ImportError:
        return ()
    if not torch.cuda.is_available():
        return ()
    found = {"{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())}
    return tuple(sorted(found))


def installed_flavors() -> list[Flavor]:
    """The flavours that import here, full TensorRT first."""
    found = []
    for name, tag in _FLAVORS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        except Exception as e:  # a broken install (missing CUDA libraries) is not an install
            log.warning("%s is installed but does not import (%s); not using it", name, e)
            continue
        ccs = _rtx_capabilities(module) if name == "tensorrt_rtx" else _local_gpu_capabilities()
        found.append(Flavor(name, tag, module.__version__, ccs, module))
    return found


def choose_flavor(cc: str, flavors: list[Flavor]) -> tuple[Flavor | None, str]:
    """The flavour that builds for compute capability ``cc`` here, or None with the reason."""
    for flavor in flavors:
        if cc in flavor.compute_capabilities:
            return flavor, ""
    if not flavors:
        return None, "no TensorRT is installed here (pip install tensorrt-rtx-cu13, or full TensorRT on a GPU host)"
    reasons = []
    for flavor in flavors:
        if flavor.name == "tensorrt_rtx":
            have = ", ".join(compute_capability_name(c) for c in flavor.compute_capabilities)
            reasons.append(f"{flavor.label} builds only for {have}")
        else:
            gpus = ", ".join(compute_capability_name(c) for c in flavor.compute_capabilities) or "none"
            reasons.append(f"{flavor.label} builds for the local GPU only (here: {gpus})")
    return None, f"no {compute_capability_name(cc)} builder here: " + "; ".join(reasons)


def ensure_onnx_parser_can_load_plugins(flavor: Flavor) -> None:
    """Create ``libtensorrt_rtx.so -> libtensorrt_rtx.so.1`` where the wheel forgot it.

    The ONNX parser dlopens the unversioned library name when it meets a plugin node; the
    tensorrt-rtx wheels ship only the ``.so.1``, and the process then aborts (no exception).
    """
    if flavor.name != "tensorrt_rtx":
        return
    import tensorrt_rtx_libs

    directory = Path(tensorrt_rtx_libs.__file__).parent
    versioned = directory / "libtensorrt_rtx.so.1"
    link = directory / "libtensorrt_rtx.so"
    if not versioned.exists() or link.exists():
        return
    try:
        link.symlink_to(versioned.name)
    except FileExistsError:
        pass  # another process made it
    except OSError as e:
        raise ToolchainError(
            f"the TensorRT-RTX ONNX parser needs {link} to load plugin nodes and it cannot be created "
            f"({e.strerror}); run: ln -s {versioned.name} {link}"
        ) from e


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class Profile:
    """One optimization profile: (min, opt, max) per named dynamic dimension."""

    name: str
    dims: dict  # dimension name ("batch", "seq", "past_seq") -> (min, opt, max)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # TensorRT's DataType name: "FLOAT", "INT64", ...
    shape: tuple  # -1 for a dynamic dimension


@dataclass(frozen=True)
class BuiltEngine:
    data: bytes
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    plugin_layers: int
    layers: int
    constant_bytes: dict  # DataType name -> bytes held by constant layers (weights as stored)
    seconds: float


def _logger(trt, messages: list[str]):
    class _Collect(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                messages.append(msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.debug("tensorrt: %s", msg)

    return _Collect()


_DTYPE_BITS = {"FLOAT": 32, "HALF": 16, "BF16": 16, "INT8": 8, "UINT8": 8, "INT4": 4, "FP8": 8,
               "INT32": 32, "INT64": 64, "BOOL": 8, "FP4": 4}


def _dims_for(tensor_dims: list, profile: Profile, which: int, tensor: str) -> list[int]:
    out = []
    for d in tensor_dims:
        if isinstance(d, int):
            out.append(d)
        elif d in profile.dims:
            out.append(profile.dims[d][which])
        else:
            raise ValueError(f"input {tensor}: dimension {d!r} has no range in profile {profile.name!r}")
    return out


def build_engine(
    flavor: Flavor,
    onnx_path: Path,
    compute_capability: str,
    input_dims: dict,
    profiles: list[Profile],
    *,
    sparse_weights: bool = False,
    plugin_nodes: int = 0,
) -> BuiltEngine:
    """Parse ``onnx_path`` and build a serialized engine for ``compute_capability``.

    ``input_dims`` maps each graph input to its ONNX dims (ints and dimension names);
    ``profiles`` give the names' ranges. The caller registers plugins first; ``plugin_nodes``
    is how many plugin layers the network must hold, so a plugin that silently fell back to its
    ONNX function body fails the build instead of producing a different engine.
    Raises :class:`ToolchainError` with TensorRT's own messages.
    """
    trt = flavor.module
    messages: list[str] = []
    logger = _logger(trt, messages)
    ensure_onnx_parser_can_load_plugins(flavor)
    builder = trt.Builder(logger)
    flags = 0 if flavor.name == "tensorrt_rtx" else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ToolchainError(f"{flavor.label} cannot parse {onnx_path.name}: {errors or '; '.join(messages)}")

    layers = [network.get_layer(i) for i in range(network.num_layers)]
    plugin_layers = sum(layer.type.name == PLUGIN_LAYER for layer in layers)
    if plugin_layers != plugin_nodes:
        raise ToolchainError(
            f"{onnx_path.name}: {flavor.label} made {plugin_layers} plugin layers of {plugin_nodes} plugin nodes; "
            "register llmc's plugins (llmc.plugins.register_plugins) before parsing"
        )
    constant_bytes: dict[str, int] = {}
    for layer in layers:
        if layer.type.name == "CONSTANT":
            output = layer.get_output(0)
            dtype, count = output.dtype.name, 1
            for d in output.shape:
                count *= d
            constant_bytes[dtype] = constant_bytes.get(dtype, 0) + count * _DTYPE_BITS.get(dtype, 32) // 8

    config = builder.create_builder_config()
    if flavor.name == "tensorrt_rtx":
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, "SM" + compute_capability.replace(".", "")), 0)
    if sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    for profile in profiles:
        p = builder.create_optimization_profile()
        for name, dims in input_dims.items():
            p.set_shape(name, *(_dims_for(dims, profile, k, name) for k in range(3)))
        config.add_optimization_profile(p)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise ToolchainError(
            f"{flavor.label} failed to build {onnx_path.name} for {compute_capability_name(compute_capability)}: "
            + ("; ".join(messages) or "no message")
        )

    def info(tensor) -> TensorInfo:
        return TensorInfo(tensor.name, tensor.dtype.name, tuple(tensor.shape))

    return BuiltEngine(
        data=bytes(serialized),
        inputs=tuple(info(network.get_input(i)) for i in range(network.num_inputs)),
        outputs=tuple(info(network.get_output(i)) for i in range(network.num_outputs)),
        plugin_layers=plugin_layers,
        layers=len(layers),
        constant_bytes=dict(sorted(constant_bytes.items())),
        seconds=seconds,
    )

