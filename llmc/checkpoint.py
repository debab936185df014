"""Loading the ingested checkpoint, with a program's quantized weights applied.

Passes that need the torch model go through :func:`load_model`, which memoises on the
context so consecutive passes in one compile do not reload the same weights.
"""

from __future__ import annotations

from pathlib import Path

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def load_hf_model(path: Path, dtype: str):
    """A Hugging Face causal LM from a local safetensors directory: no hub, no pickle, no remote code.

    A structurally pruned checkpoint (its config.json records :data:`PRUNED_LAYERS_KEY`) is
    rebuilt with each linear shaped as its stored weight: see :func:`_load_resized`.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()  # llmc shows its own progress
    if pruned_layers(path) is not None:
        return _load_resized(path, dtype)
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
    # MixLLM output-feature mixes (llmc.packed.MixedRowLinear) hold two PackedLinears under one name.
    mixed = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".high_rows")})
    parts = {f"{m}.{part}" for m in mixed for part in ("low", "high")}
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".meta")} - parts)
    packed = {m: PackedLinear.from_tensors(tensors, m) for m in modules}
    if mixed:
        from llmc.packed import MixedRowLinear

        packed.update({m: MixedRowLinear.from_tensors(tensors, m) for m in mixed})
    floating = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".fpx_meta")})
    if floating:  # low-bit floating point (quantize-fpx)
        from llmc.passes.fpx import FpxLinear

        packed.update({m: FpxLinear.from_tensors(tensors, m) for m in floating})
    return dict(sorted(packed.items()))


def load_model(program, ctx, quantized: bool = True):
    """The program's model (pruned, when a prune pass ran); with ``quantized``, its linears carry
    the dequantized weights."""
    return _memoised(ctx, program.model.checkpoint, program.quantized_weights if quantized else None,
                     program.model.dtype)


def load_reference_model(program, ctx):
    """The model as ingested, before pruning and quantization: what quality is measured against."""
    checkpoint = program.pruning.unpruned_checkpoint if program.pruning is not None else program.model.checkpoint
    return _memoised(ctx, checkpoint, None, program.model.dtype)


def _memoised(ctx, checkpoint: str, packed_ref: str | None, dtype: str):
    import torch

    key = (checkpoint, packed_ref)
    if key not in ctx._models:
        ctx._models.clear()  # keep one model resident: these can be large
        model = load_hf_model(ctx.path(checkpoint), dtype)
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


# --------------------------------------------------------------------------- pruned checkpoints

# config.json key of a structurally pruned checkpoint: per decoder layer, {"heads": .., "kv_heads":
# .., "intermediate_size": ..}. Hugging Face configs hold one count for all layers; the loader
# takes each linear's shape from its stored weight, and this record is what says so.
PRUNED_LAYERS_KEY = "llmc_pruned_layers"


def pruned_layers(path: Path) -> list[dict] | None:
    """The per-layer counts a structurally pruned checkpoint records, or ``None``."""
    import json

    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get(PRUNED_LAYERS_KEY)


def _load_resized(path: Path, dtype: str):
    """The config's architecture built without weights, each linear reshaped (and given a bias)
    as its stored weight is, then the stored tensors assigned. Pruning keeps the ratio of query to
    key/value heads, so the attention's grouping (config-wide) still holds per layer."""
    from itertools import chain

    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = getattr(torch, _DTYPES[dtype])
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(file))
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight")
        if not isinstance(module, torch.nn.Linear) or weight is None:
            continue
        bias = f"{name}.bias" in state
        if tuple(weight.shape) != (module.out_features, module.in_features) or bias != (module.bias is not None):
            parent, _, child = name.rpartition(".")
            with torch.device("meta"):
                resized = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias, dtype=torch_dtype)
            setattr(model.get_submodule(parent), child, resized)
    _, unexpected = model.load_state_dict({k: v.to(torch_dtype) for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    # Non-persistent buffers (RoPE frequencies) are not in the file: build them for real.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config)
    empty = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if unexpected or empty:
        raise ValueError(f"{path}: pruned checkpoint does not fit its config: unexpected {sorted(unexpected)[:3]}, "
                         f"missing {empty[:3]}")
    return model.eval()


def save_pruned(program, ctx, model, pruning, sparsity=(), layers: list[dict] | None = None):
    """``program`` with ``model`` (pruned in place by a prune pass) as its checkpoint.

    Writes ``checkpoint/`` (safetensors, config, tokenizer) in the pass's workdir; ``layers``
    (structured pruning) is recorded in its config.json under :data:`PRUNED_LAYERS_KEY`. The
    layer table is rebuilt from the model, so later passes (the planner first) see the new shapes.
    ``pruning`` is the :class:`llmc.ir.Pruning` record; ``sparsity`` the N:M decisions.
    """
    from dataclasses import replace

    from llmc.passes.ingest import layer_table

    directory = ctx.workdir / "checkpoint"
    if layers is not None:
        setattr(model.config, PRUNED_LAYERS_KEY, layers)
    model.save_pretrained(directory, safe_serialization=True)
    load_tokenizer(ctx.path(program.model.checkpoint)).save_pretrained(directory)
    return replace(
        program,
        model=replace(program.model, checkpoint=ctx.ref("checkpoint")),
        layers=layer_table(model),
        pruning=pruning,
        sparsity=tuple(sorted(program.sparsity + tuple(sparsity), key=lambda d: d.module)),
    )
