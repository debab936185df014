"""Tiny seeded Hugging Face models built in-process, for fast tests. No downloads."""

from __future__ import annotations


def tiny_llama_config(**overrides):
    """A Llama config small enough to run in milliseconds; overrides go to the config."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_llama(seed: int = 0, **overrides):
    """A randomly initialised LlamaForCausalLM in eval mode, float32, seeded."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    return model.eval()


def tiny_qwen2(seed: int = 0, **overrides):
    """A randomly initialised Qwen2ForCausalLM (q/k/v biases) in eval mode, float32, seeded."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**fields)).eval()


TINY_TEXT = (
    "the quick brown fox jumps over the lazy dog. a stitch in time saves nine. "
    "all that glitters is not gold. the early bird catches the worm. "
) * 40


def tiny_tokenizer(text: str = TINY_TEXT, vocab_size: int = 128):
    """A byte-level BPE tokenizer trained in-process on ``text``, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:0],
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def fit_to_text(model, tokenizer, text: str = TINY_TEXT, steps: int = 60, seq_len: int = 32):
    """Train ``model`` briefly on ``text`` (Adam, seeded windows), so that rounding its weights costs
    measurable loss, as it does on a real model, rather than nothing, as on random weights."""
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        batch = windows[(torch.arange(8) * 5 + step) % len(windows)]
        loss = model(batch, labels=batch).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def write_tiny_model_dir(path, seed: int = 0, fit_steps: int = 0, **overrides):
    """A complete local Hugging Face model directory (safetensors + tokenizer) at ``path``; with
    ``fit_steps``, the weights are first trained that many steps on ``TINY_TEXT``."""
    from pathlib import Path

    path = Path(path)
    tokenizer = tiny_tokenizer()
    model = tiny_llama(seed=seed, vocab_size=max(128, len(tokenizer)), **overrides)
    if fit_steps:
        fit_to_text(model, tokenizer, steps=fit_steps)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
