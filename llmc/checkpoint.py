"""Loading the ingested checkpoint, with a program's quantized weights applied.

Passes that need the torch model go through :func:`load_model`, which memoises on the
context so consecutive passes in one compile do not reload the same weights.
"""

from __future__ import annotations

from pathlib import Path

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def load_hf_model(path: Path, dtype: str):
    """A Hugging Face causal LM from a local safetensors directory: no hub, no pickle, no remote code."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()  # llmc shows its own progress
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=getattr(torch, _DTYPES[dtype]),
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=False,
    )
    return model.eval()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def load_packed(path: Path) -> dict:
    """Packed weights by module name, from a safetensors file written by a quantize pass."""
    from safetensors.torch import load_file

    from llmc.packed import PackedLinear

    tensors = load_file(path)
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".meta")})
    return {m: PackedLinear.from_tensors(tensors, m) for m in modules}


def load_model(program, ctx, quantized: bool = True):
    """The program's model; with ``quantized``, its linears carry the dequantized weights."""
    import torch

    key = (program.model.checkpoint, program.quantized_weights if quantized else None)
    if key not in ctx._models:
        ctx._models.clear()  # keep one model resident: these can be large
        model = load_hf_model(ctx.path(program.model.checkpoint), program.model.dtype)
        if key[1] is not None:
            modules = dict(model.named_modules())
            with torch.no_grad():
                for name, packed in load_packed(ctx.path(key[1])).items():
                    weight = modules[name].weight
                    weight.copy_(packed.dequantize().to(weight.dtype))
        ctx._models[key] = model
    return ctx._models[key]


def save_quantized(program, ctx, packed: dict, decisions: list):
    """``program`` with ``packed`` weights and ``decisions`` added to those of earlier quantize passes.

    Quantize passes compose (each claims the linears of its method), so a pass keeps what an
    earlier one decided and writes the union to ``weights.safetensors`` in its own workdir.
    """
    from dataclasses import replace

    from safetensors.torch import save_file

    tensors = {}
    if program.quantized_weights is not None:
        for name, earlier in load_packed(ctx.path(program.quantized_weights)).items():
            tensors.update(earlier.to_tensors(name))
    for name, linear in packed.items():
        tensors.update(linear.to_tensors(name))
    save_file(tensors, ctx.workdir / "weights.safetensors")
    order = {lin.name: i for i, lin in enumerate(lin for layer in program.layers for lin in layer.linears)}
    return replace(
        program,
        quantization=tuple(
            sorted(program.quantization + tuple(decisions), key=lambda d: (order.get(d.module, len(order)), d.module))
        ),
        quantized_weights=ctx.ref("weights.safetensors"),
    )
