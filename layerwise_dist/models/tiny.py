"""Random decoder-only models small enough for unit tests (built in code, nothing to load).

One builder per architecture the package is tested on: Llama (SmolLM2's), Gemma 3 (interleaved
sliding-window and global attention, two rotary bases, q/k norms, four norms per layer, tied
embeddings scaled by sqrt(hidden)), Qwen2 (q/k/v biases, sliding window on the upper layers) and
Qwen3 (q/k norms). Each keeps per-layer config lists (``layer_types``) that differ between layers,
with a window shorter than the test sequences, so a student whose lists do not follow its chosen
layers computes something else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel

#: Window of the sliding-attention layers of the tiny models: shorter than any test sequence.
TINY_SLIDING_WINDOW = 4


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


def tiny_gemma3_config(
    vocab_size: int = 256, num_layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2
) -> PretrainedConfig:
    """Gemma3 text config; layers alternate sliding (even) and global (odd) attention (Gemma 3 uses 5:1)."""
    from transformers import Gemma3TextConfig

    head_dim = hidden // heads
    return Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        sliding_window=TINY_SLIDING_WINDOW,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0},
        },
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _qwen_layer_types(num_layers: int) -> list[str]:
    # Qwen2/3's own rule with use_sliding_window and max_window_layers = num_layers // 2: the upper half slides.
    return ["sliding_attention" if i >= num_layers // 2 else "full_attention" for i in range(num_layers)]


def tiny_qwen2_config(
    vocab_size: int = 256, num_layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2
) -> PretrainedConfig:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        use_sliding_window=True,
        sliding_window=TINY_SLIDING_WINDOW,
        max_window_layers=num_layers // 2,
        layer_types=_qwen_layer_types(num_layers),
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_qwen3_config(
    vocab_size: int = 256, num_layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2
) -> PretrainedConfig:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        use_sliding_window=True,
        sliding_window=TINY_SLIDING_WINDOW,
        max_window_layers=num_layers // 2,
        layer_types=_qwen_layer_types(num_layers),
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _model_class(arch: str) -> type[PreTrainedModel]:
    import transformers

    name = {"llama": "LlamaForCausalLM", "gemma3": "Gemma3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
        arch, "Qwen3ForCausalLM"
    )
    return getattr(transformers, name)


CONFIGS: dict[str, Callable[..., PretrainedConfig]] = {
    "llama": tiny_llama_config,
    "gemma3": tiny_gemma3_config,
    "qwen2": tiny_qwen2_config,
    "qwen3": tiny_qwen3_config,
}
ARCHITECTURES = tuple(CONFIGS)


def tiny_model(
    arch: str = "llama",
    vocab_size: int = 256,
    num_layers: int = 4,
    hidden: int = 64,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """A deterministic random causal LM of architecture ``arch`` (llama, gemma3, qwen2, qwen3) in fp32, eval mode.

    Norm weights are drawn around their identity value (not exactly it), so that a wrong norm
    (a Gemma ``1 + w`` read as ``w``, a q/k norm skipped) changes the logits.
    """
    if arch not in CONFIGS:
        raise ValueError(f"unknown tiny architecture {arch!r} (choose {', '.join(CONFIGS)})")
    config = CONFIGS[arch](vocab_size=vocab_size, num_layers=num_layers, hidden=hidden)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model_class(arch)(config)
        if arch != "llama":  # the Llama builder stays as it was (cached tiny teachers keep their weights)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.add_(0.1 * torch.randn_like(p))
    return model.eval()


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


def tiny_gemma3(vocab_size: int = 256, num_layers: int = 4, hidden: int = 64, seed: int = 0, **kw) -> PreTrainedModel:
    return tiny_model("gemma3", vocab_size, num_layers, hidden, seed, **kw)


def tiny_qwen2(vocab_size: int = 256, num_layers: int = 4, hidden: int = 64, seed: int = 0, **kw) -> PreTrainedModel:
    return tiny_model("qwen2", vocab_size, num_layers, hidden, seed, **kw)


def tiny_qwen3(vocab_size: int = 256, num_layers: int = 4, hidden: int = 64, seed: int = 0, **kw) -> PreTrainedModel:
    return tiny_model("qwen3", vocab_size, num_layers, hidden, seed, **kw)
