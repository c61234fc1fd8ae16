"""Tiny random Hugging Face checkpoints for tests, demos and ``convert check`` dry runs.

The defaults are deliberately awkward: vocab 301 (needs padding), GQA with 2 KV
groups, ``head_dim`` 24 != hidden/heads = 16, and weights large enough (std 0.2,
norm gains in [0.5, 1.5], non-zero biases) that logits spread over several units, so
a 1e-4 parity bound actually constrains the mapping.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def make_tiny_hf_model(out_dir: str | Path, kind: str = "qwen3", *, tied: bool = False, seed: int = 0,
                       vocab_size: int = 301, hidden_size: int = 64, intermediate_size: int = 96,
                       num_layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: Optional[int] = 24,
                       init_std: float = 0.2, rope_theta: float = 10000.0, rope_scaling: Optional[dict] = None,
                       max_position_embeddings: int = 256, **extra) -> Path:
    """Save a random ``kind`` in {"qwen3", "qwen2", "llama", "mistral"} model to ``out_dir``; return the path.

    Mistral is saved with ``sliding_window=None`` (the only Mistral megatron-sz builds)
    unless ``extra`` says otherwise.
    """
    import torch
    import transformers

    classes = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM")}
    cfg_cls, model_cls = (getattr(transformers, n) for n in classes[kind])
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope = dict(rope_scaling, rope_theta=rope_theta)
    kw = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
              num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
              tie_word_embeddings=tied, max_position_embeddings=max_position_embeddings,
              initializer_range=init_std, rope_parameters=rope)
    if head_dim is not None:
        kw["head_dim"] = head_dim
    if kind == "mistral":
        kw["sliding_window"] = None
    kw.update(extra)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * init_std)
    out = Path(out_dir)
    model.save_pretrained(out)
    return out
