"""A random Llama small enough for unit tests (built in code, nothing to load)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(
    vocab_size: int = 256, num_layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_llama(
    vocab_size: int = 256, num_layers: int = 4, hidden: int = 64, seed: int = 0, attn_implementation: str = "sdpa"
) -> LlamaForCausalLM:
    """A deterministic random LlamaForCausalLM in fp32, eval mode."""
    config = tiny_llama_config(vocab_size=vocab_size, num_layers=num_layers, hidden=hidden)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
