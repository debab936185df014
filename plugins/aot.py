"""Ahead-of-time compilation of the low-bit kernels for named GPUs, with no GPU present.

Triton compiles to PTX and a cubin for any target given as ``GPUTarget("cuda", 80, 32)`` (its
bundled ptxas does the last step), so a CPU-only build host can produce the cubins a TensorRT
plugin embeds for sm_80, sm_86, sm_89 and sm_90. :func:`compile_kernel` does one, and
:func:`kernel_variants` lists the variants the plugins launch (one per format and path, at the
block shapes their heuristics pick); ``benchmarks/kernels.py --compile-only`` compiles them all.

Pointer and size arguments are declared 16-aligned, as the Triton launcher specializes them at
run time for the shapes llmc emits (sizes that are multiples of 16), so the code compiled here
is the code that runs.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

from llmc.plugins.splitk import COMPILE_OPTIONS, require_triton

TARGETS = (80, 86, 89, 90)


@dataclass(frozen=True)
class KernelVariant:
    """One kernel at one set of compile-time constants."""

    name: str
    kernel: object  # a triton JITFunction
    signature: dict[str, str]  # runtime arguments: Triton type strings ("*fp16", "i32")
    constants: dict[str, object]
    num_warps: int = 4
    num_stages: int = 1
    aligned: tuple[str, ...] = field(default=())  # arguments declared divisible by 16
    targets: tuple[int, ...] = TARGETS  # the compute capabilities it is built for


@dataclass(frozen=True)
class CompiledVariant:
    name: str
    capability: int
    cubin: bytes
    ptx: str
    registers: int
    spills: int  # bytes of local memory per thread
    shared: int


def compile_kernel(variant: KernelVariant, capability: int) -> CompiledVariant:
    """Compile ``variant`` for ``sm_<capability>`` to PTX and a cubin."""
    require_triton()
    import triton
    from triton.backends.compiler import GPUTarget

    signature = dict(variant.signature)
    # Compile-time constants the variant leaves out take their defaults, as a launch does.
    constants = {p.name: p.default for p in variant.kernel.params if p.is_constexpr and p.has_default}
    constants.update(variant.constants)
    for name in constants:
        signature[name] = "constexpr"
    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in variant.aligned}
    if getattr(variant.kernel, "is_gluon", lambda: False)():  # wgmma_prefill's kernel
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    else:
        from triton.compiler import ASTSource
    source = ASTSource(fn=variant.kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": variant.num_warps, "num_stages": variant.num_stages, **COMPILE_OPTIONS})
    cubin = compiled.asm["cubin"]
    registers, spills = _resource_usage(cubin)
    return CompiledVariant(variant.name, capability, cubin, compiled.asm["ptx"], registers, spills,
                           compiled.metadata.shared)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    registers = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return int(registers.group(1)) if registers else -1, int(local.group(1)) if local else -1


def sass(cubin: bytes) -> str:
    """The machine code of a cubin, as nvdisasm prints it."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout


def loop_instruction_mix(listing: str) -> collections.Counter:
    """Instruction counts in the longest loop body (between a label and a branch back to it)."""
    lines = listing.splitlines()
    labels = {}
    best: list[str] = []
    for number, line in enumerate(lines):
        label = re.match(r"^\.(L_x_\d+):", line.strip())
        if label:
            labels[label.group(1)] = number
        back = re.search(r"BRA\s+`\(\.(L_x_\d+)\)", line)
        if back and labels.get(back.group(1), number) < number:
            body = lines[labels[back.group(1)]:number + 1]
            if len(body) > len(best):
                best = body
    mix = collections.Counter()
    for line in best:
        op = re.match(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if op:
            mix[op.group(1)] += 1
    return mix


def kernel_variants() -> list[KernelVariant]:
    """Every kernel the plugins launch, at their shipped launch shapes."""
    require_triton()
    from llmc.plugins import fp6_linear, int3_linear, intn_linear, mma_decode, wgmma_prefill

    return (intn_linear.kernel_variants() + int3_linear.kernel_variants() + fp6_linear.kernel_variants()
            + wgmma_prefill.kernel_variants() + mma_decode.kernel_variants())
