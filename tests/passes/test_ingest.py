"""`ingest`: the layer table and model facts it builds, the checkpoint it caches, what it refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from llmc.errors import EXIT_USAGE, PassError
from llmc.passes.ingest import IngestPass
from llmc.pipeline import content_digest, run_pipeline
from llmc.testing import TINY_TEXT

# The seven linears of a Llama decoder layer, in execution order: (name, in, out) as functions
# of the config.
LLAMA_LINEARS = (
    ("self_attn.q_proj", lambda c: c["hidden_size"], lambda c: c["num_attention_heads"] * _head_dim(c)),
    ("self_attn.k_proj", lambda c: c["hidden_size"], lambda c: c["num_key_value_heads"] * _head_dim(c)),
    ("self_attn.v_proj", lambda c: c["hidden_size"], lambda c: c["num_key_value_heads"] * _head_dim(c)),
    ("self_attn.o_proj", lambda c: c["num_attention_heads"] * _head_dim(c), lambda c: c["hidden_size"]),
    ("mlp.gate_proj", lambda c: c["hidden_size"], lambda c: c["intermediate_size"]),
    ("mlp.up_proj", lambda c: c["hidden_size"], lambda c: c["intermediate_size"]),
    ("mlp.down_proj", lambda c: c["intermediate_size"], lambda c: c["hidden_size"]),
)


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def ingest(source, cache):
    return run_pipeline([IngestPass(source=source)], cache_root=cache, seed=0, verify=True, show_progress=False)


def weights_of(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.fixture(scope="module")
def ingested(tiny_model_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ingest-cache")
    return ingest(tiny_model_dir, cache).program, cache


@pytest.fixture(scope="module")
def hf_config(tiny_model_dir) -> dict:
    return json.loads((tiny_model_dir / "config.json").read_text())


def test_layer_table_lists_the_seven_llama_linears_per_layer_with_their_shapes(ingested, hf_config):
    program, _ = ingested
    assert [layer.index for layer in program.layers] == list(range(hf_config["num_hidden_layers"]))
    for layer in program.layers:
        got = [(lin.name, lin.in_features, lin.out_features, lin.bias) for lin in layer.linears]
        want = [
            (f"model.layers.{layer.index}.{name}", n_in(hf_config), n_out(hf_config), False)
            for name, n_in, n_out in LLAMA_LINEARS
        ]
        assert got == want


def test_layer_table_shapes_are_the_checkpoint_weight_shapes(ingested, tiny_model_dir):
    program, _ = ingested
    weights = weights_of(tiny_model_dir)
    for lin in (lin for layer in program.layers for lin in layer.linears):
        assert tuple(weights[f"{lin.name}.weight"].shape) == (lin.out_features, lin.in_features)


def test_model_info_matches_the_config(ingested, hf_config, tiny_model_dir):
    program, _ = ingested
    info = program.model
    assert info.architecture == hf_config["model_type"] == "llama"
    assert info.hidden_size == hf_config["hidden_size"]
    assert info.intermediate_size == hf_config["intermediate_size"]
    assert info.num_layers == hf_config["num_hidden_layers"] == len(program.layers)
    assert info.num_heads == hf_config["num_attention_heads"]
    assert info.num_kv_heads == hf_config["num_key_value_heads"]
    assert info.head_dim == _head_dim(hf_config)
    assert info.vocab_size == hf_config["vocab_size"]
    assert info.tie_word_embeddings == hf_config["tie_word_embeddings"]
    assert info.dtype == "float32"
    assert info.source_sha256 == content_digest(tiny_model_dir)


def test_cached_checkpoint_holds_safetensors_and_tokenizer_and_the_same_weights(ingested, tiny_model_dir):
    from transformers import AutoTokenizer

    program, cache = ingested
    checkpoint = cache / program.model.checkpoint
    assert checkpoint.is_dir() and (checkpoint / "config.json").is_file()
    assert list(checkpoint.glob("*.safetensors")) and not list(checkpoint.glob("*.bin"))
    assert (checkpoint / "tokenizer.json").is_file()

    original, cached = weights_of(tiny_model_dir), weights_of(checkpoint)
    assert sorted(cached) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(cached[name], tensor), name

    before = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    after = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    assert after(TINY_TEXT)["input_ids"] == before(TINY_TEXT)["input_ids"]


# --------------------------------------------------------------------------- refusals


def _no_config(path):
    save_file({"w": torch.zeros(2)}, path / "model.safetensors")
    return "no config.json"


def _unsupported_architecture(path):
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    save_file({"w": torch.zeros(2)}, path / "model.safetensors")
    return "model_type 'gpt2' is not supported"


def _pickled_weights_only(path):
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"w": torch.zeros(2)}, path / "pytorch_model.bin")
    return "pickled .bin weights are refused"


def _config_not_json(path):
    (path / "config.json").write_text("{oops")
    return "not a JSON object"


def _corrupt_safetensors(path):
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # a header cut short
    return "cannot be loaded"


@pytest.mark.parametrize("make", [_no_config, _unsupported_architecture, _pickled_weights_only, _config_not_json,
                                  _corrupt_safetensors])
def test_unusable_directories_are_refused_with_the_path_and_exit_2(tmp_path, make):
    source = tmp_path / "model"
    source.mkdir()
    reason = make(source)
    with pytest.raises(PassError) as info:
        ingest(source, tmp_path / "cache")
    assert info.value.exit_code == EXIT_USAGE
    assert info.value.pass_name == "ingest"
    assert str(source) in str(info.value)
    assert reason in str(info.value)


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00"], ids=["empty", "truncated"])
def test_a_corrupt_gguf_file_is_refused_with_the_path_and_exit_2(tmp_path, content):
    pytest.importorskip("gguf")
    source = tmp_path / "model.gguf"
    source.write_bytes(content)
    with pytest.raises(PassError) as info:
        ingest(source, tmp_path / "cache")
    assert info.value.exit_code == EXIT_USAGE
    assert f"model.path: {source}: cannot be loaded" in str(info.value)


def test_a_missing_source_is_refused_with_the_path_and_exit_2(tmp_path):
    source = tmp_path / "does-not-exist"
    with pytest.raises(PassError) as info:
        ingest(source, tmp_path / "cache")
    assert info.value.exit_code == EXIT_USAGE
    assert str(source) in str(info.value)


# --------------------------------------------------------------------------- GGUF


def _rope_interleaved(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q/k: per head, the two rotary halves interleaved row by row."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def write_tiny_gguf(path, model_dir) -> None:
    """The model in ``model_dir`` as an F32 llama GGUF with its byte-level BPE tokenizer."""
    import gguf

    config = json.loads((model_dir / "config.json").read_text())
    weights = {k: v.float().numpy() for k, v in weights_of(model_dir).items()}
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    special = {t["content"] for t in tokenizer["added_tokens"] if t["special"]}

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_vocab_size(config["vocab_size"])  # the embedding has more rows than the tokenizer has tokens
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_dimension_count(_head_dim(config))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    w.add_token_merges(merges)
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    w.add_pad_token_id(config["pad_token_id"])
    w.add_add_bos_token(False)
    w.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", weights["model.norm.weight"])
    w.add_tensor("output.weight", weights["lm_head.weight"])
    for i in range(config["num_hidden_layers"]):
        for hf_name, gguf_name in _GGUF_NAMES.items():
            tensor = weights[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                tensor = _rope_interleaved(tensor, config["num_attention_heads"])
            elif gguf_name == "attn_k":
                tensor = _rope_interleaved(tensor, config["num_key_value_heads"])
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(tensor))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_file_ingests_to_the_same_layer_table_weights_and_tokenizer(tmp_path, tiny_model_dir, ingested, capfd):
    from dataclasses import replace

    from transformers import AutoTokenizer

    pytest.importorskip("gguf")
    source = tmp_path / "gguf" / "tiny.gguf"
    source.parent.mkdir()
    write_tiny_gguf(source, tiny_model_dir)
    cache = tmp_path / "cache"
    capfd.readouterr()
    program = ingest(source, cache).program
    assert "de-quantizing GGUF tensors" not in capfd.readouterr().err  # transformers' own bar, turned off
    reference, reference_cache = ingested

    assert program.layers == reference.layers
    assert program.model.source_sha256 == content_digest(source)
    same_fields = dict(source_sha256="", checkpoint="")
    assert replace(program.model, **same_fields) == replace(reference.model, **same_fields)

    checkpoint = cache / program.model.checkpoint
    original, cached = weights_of(tiny_model_dir), weights_of(checkpoint)
    assert sorted(cached) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(cached[name], tensor), name  # q/k rows back in Hugging Face order
    before = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    after = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    assert after(TINY_TEXT)["input_ids"] == before(TINY_TEXT)["input_ids"]
