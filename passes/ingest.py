"""`ingest`: load a local model (Hugging Face directory or GGUF file) and build the layer table.

The checkpoint is normalised into the cache as a safetensors Hugging Face directory, so later
passes (and later compiles) load it in a second instead of re-converting a GGUF file.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from llmc.checkpoint import SUPPORTED_ARCHITECTURES
from llmc.errors import InputError
from llmc.ir import Layer, Linear, ModelInfo, Program
from llmc.pipeline import Pass, PassContext, PassResult, content_digest


def layer_table(model) -> tuple[Layer, ...]:
    """Per decoder layer, its linear modules in execution order, with Hugging Face names."""
    import torch

    layers = []
    for i, block in enumerate(model.model.layers):
        linears = tuple(
            Linear(
                name=f"model.layers.{i}.{name}",
                in_features=module.in_features,
                out_features=module.out_features,
                bias=module.bias is not None,
            )
            for name, module in block.named_modules()
            if isinstance(module, torch.nn.Linear)
        )
        layers.append(Layer(index=i, linears=linears))
    return tuple(layers)


def model_info(model, dtype: str, source_sha256: str, checkpoint: str) -> ModelInfo:
    c = model.config
    return ModelInfo(
        architecture=c.model_type,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        vocab_size=c.vocab_size,
        tie_word_embeddings=bool(c.tie_word_embeddings),
        dtype=dtype,
        source_sha256=source_sha256,
        checkpoint=checkpoint,
    )


@contextlib.contextmanager
def _quiet_gguf_bar():
    """transformers' GGUF loader draws its own tqdm bar, which its progress-bar switch does not reach
    (it calls ``tqdm`` directly): turned off for the load, so ``-q`` and logs stay clean."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _load_source(source: Path, dtype: str):
    import json

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmc.checkpoint import load_hf_model, load_tokenizer

    transformers.utils.logging.disable_progress_bar()  # llmc shows its own progress

    if source.is_file() and source.suffix == ".gguf":
        kwargs = dict(gguf_file=source.name, local_files_only=True, trust_remote_code=False)
        with _quiet_gguf_bar():
            model = AutoModelForCausalLM.from_pretrained(source.parent, dtype=getattr(torch, dtype), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
        # The GGUF loader dequantized the weights; drop its quantizer so the model saves as
        # plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model.eval(), tokenizer
    if not source.is_dir():
        raise InputError(f"{source}: expected a Hugging Face model directory or a .gguf file")
    config_file = source / "config.json"
    if not config_file.is_file():
        raise InputError(f"{source}: no config.json (expected a Hugging Face model directory)")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise InputError(f"{config_file}: not a JSON object ({e})") from None
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise InputError(
            f"{config_file}: model_type '{model_type}' is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if not any(source.glob("*.safetensors")):
        raise InputError(f"{source}: no *.safetensors weights (pickled .bin weights are refused)")
    return load_hf_model(source, dtype), load_tokenizer(source)


@dataclass(frozen=True)
class IngestPass(Pass):
    """Load weights, config and tokenizer from a local path; build the layer table."""

    name = "ingest"
    source: Path
    dtype: str = "float32"

    def ensures(self, program: Program) -> None:
        if program.model is None or not program.layers:
            raise ValueError("ingest produced no model or no layers")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        try:
            model, tokenizer = _load_source(self.source, self.dtype)
        except InputError:
            raise
        except Exception as e:  # the loaders' own errors on a corrupt or truncated file: bad input, not a bug
            raise InputError(f"model.path: {self.source}: cannot be loaded ({type(e).__name__}: {e})") from e
        if model.config.model_type not in SUPPORTED_ARCHITECTURES:
            raise InputError(
                f"{self.source}: architecture '{model.config.model_type}' is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        checkpoint = ctx.workdir / "checkpoint"
        model.save_pretrained(checkpoint, safe_serialization=True)
        tokenizer.save_pretrained(checkpoint)
        info = model_info(model, self.dtype, content_digest(self.source), ctx.ref("checkpoint"))
        layers = layer_table(model)
        params = sum(layer.weight_params for layer in layers)
        from dataclasses import replace

        return PassResult(
            replace(program, model=info, layers=layers),
            f"{info.architecture}, {info.num_layers} layers, hidden {info.hidden_size}, "
            f"{params / 1e6:.1f}M linear weights",
        )
