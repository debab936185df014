"""`ingest-config`: the layer table from a Hugging Face ``config.json`` alone, no weights.

``llmc plan`` takes this path when ``model.path`` is a ``config.json`` file or a directory with a
config.json and no weights, so a deployment can be planned before the checkpoint is fetched.
Pure Python (no torch). Linear names and shapes follow the Hugging Face modules of each
architecture, so quantization patterns match as they will on the real model:

- llama, mistral, qwen2: ``model.layers.N.self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``;
- opt: ``model.decoder.layers.N.self_attn.{q,k,v,out}_proj``, ``fc1``, ``fc2``;
- bloom: ``transformer.h.N.self_attention.{query_key_value,dense}``,
  ``mlp.{dense_h_to_4h,dense_4h_to_h}``.

OPT and BLOOM are plannable this way only; ``llmc compile`` loads llama, mistral and qwen2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from llmc.errors import InputError
from llmc.ir import Layer, Linear, ModelInfo, Program
from llmc.pipeline import Pass, PassContext, PassResult, content_digest

PLANNABLE_ARCHITECTURES = ("llama", "mistral", "qwen2", "opt", "bloom")


def config_file(source: Path) -> Path:
    return source if source.suffix == ".json" else source / "config.json"


def is_config_only(source: Path) -> bool:
    """A config.json file, or a directory with one and no weights (safetensors or GGUF)."""
    if source.is_file():
        return source.suffix == ".json"
    return (source / "config.json").is_file() and not any(source.glob("*.safetensors")) and not any(source.glob("*.gguf"))


def _field(config: dict, file: Path, *names: str, default=None):
    for name in names:
        if config.get(name) is not None:
            value = config[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{file}: {name}: expected a positive integer, got {value!r}")
            return value
    if default is not None:
        return default
    raise InputError(f"{file}: {names[0]}: missing (needed to build the layer table)")


def model_from_config(config: dict, file: Path, dtype: str = "float16") -> tuple[ModelInfo, tuple[Layer, ...]]:
    """ModelInfo and the layer table of a Hugging Face config (see the module docstring)."""
    arch = config.get("model_type")
    if arch not in PLANNABLE_ARCHITECTURES:
        raise InputError(
            f"{file}: model_type '{arch}' cannot be planned from its config (plannable: {', '.join(PLANNABLE_ARCHITECTURES)})"
        )
    hidden = _field(config, file, "hidden_size", "n_embed", "d_model")
    layers_n = _field(config, file, "num_hidden_layers", "n_layer")
    heads = _field(config, file, "num_attention_heads", "n_head")
    vocab = _field(config, file, "vocab_size")
    if arch in ("opt", "bloom"):
        kv_heads, head_dim = heads, hidden // heads
        inter = _field(config, file, "ffn_dim") if arch == "opt" else 4 * hidden
        tied = bool(config.get("tie_word_embeddings", True))
    else:
        kv_heads = _field(config, file, "num_key_value_heads", default=heads)
        head_dim = _field(config, file, "head_dim", default=hidden // heads)
        inter = _field(config, file, "intermediate_size")
        tied = bool(config.get("tie_word_embeddings", False))
    q, kv = heads * head_dim, kv_heads * head_dim
    if arch == "opt":
        prefix = "model.decoder.layers.{}."
        shapes = [("self_attn.q_proj", hidden, q, True), ("self_attn.k_proj", hidden, kv, True),
                  ("self_attn.v_proj", hidden, kv, True), ("self_attn.out_proj", q, hidden, True),
                  ("fc1", hidden, inter, True), ("fc2", inter, hidden, True)]
    elif arch == "bloom":
        prefix = "transformer.h.{}."
        shapes = [("self_attention.query_key_value", hidden, 3 * hidden, True),
                  ("self_attention.dense", hidden, hidden, True),
                  ("mlp.dense_h_to_4h", hidden, inter, True), ("mlp.dense_4h_to_h", inter, hidden, True)]
    else:
        prefix = "model.layers.{}."
        bias = arch == "qwen2"
        shapes = [("self_attn.q_proj", hidden, q, bias), ("self_attn.k_proj", hidden, kv, bias),
                  ("self_attn.v_proj", hidden, kv, bias), ("self_attn.o_proj", q, hidden, False),
                  ("mlp.gate_proj", hidden, inter, False), ("mlp.up_proj", hidden, inter, False),
                  ("mlp.down_proj", inter, hidden, False)]
    table = tuple(
        Layer(index=i, linears=tuple(Linear(prefix.format(i) + name, n_in, n_out, bias) for name, n_in, n_out, bias in shapes))
        for i in range(layers_n)
    )
    info = ModelInfo(
        architecture=arch, hidden_size=hidden, intermediate_size=inter, num_layers=layers_n, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab, tie_word_embeddings=tied, dtype=dtype,
        source_sha256="", checkpoint="",
    )
    return info, table


@dataclass(frozen=True)
class IngestConfigPass(Pass):
    """The layer table from config.json alone: for planning, never for compiling."""

    name = "ingest-config"
    source: Path  # a config.json, or a directory holding one
    dtype: str = "float16"

    def ensures(self, program: Program) -> None:
        if program.model is None or not program.layers:
            raise ValueError("ingest-config produced no model or no layers")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        file = config_file(self.source)
        if not file.is_file():
            raise InputError(f"{self.source}: no config.json")
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(config, dict):
            raise InputError(f"{file}: expected a JSON object")
        info, layers = model_from_config(config, file, self.dtype)
        info = replace(info, source_sha256=content_digest(file))
        params = sum(layer.weight_params for layer in layers)
        return PassResult(
            replace(program, model=info, layers=layers),
            f"{info.architecture} from {file.name} (no weights), {info.num_layers} layers, hidden "
            f"{info.hidden_size}, {params / 1e9:.2f}B linear weights",
        )
