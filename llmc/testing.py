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
