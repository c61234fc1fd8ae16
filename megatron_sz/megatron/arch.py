"""HF ``config.json`` -> the model shape megatron-sz builds, with strict validation.

Supported: Qwen3 dense (``qwen3``: QK RMSNorm), Qwen2/2.5 (``qwen2``: QKV bias) and
Llama 3 (``llama``: optional ``llama3`` RoPE scaling). Anything that would make the
Megatron model silently differ from the HF one (sliding-window attention, MoE, biases
on o_proj/MLP, other RoPE types, non-SiLU activations) is refused with a ``UserError``
naming the config key. GLM-4 is not supported yet.

Vocab padding: the embedding/LM-head rows are padded to a multiple of
``lcm(make_vocab_size_divisible_by, tp)``. Unlike Megatron-LM's ``divisible_by * tp``
this does not depend on TP for the usual power-of-two TP sizes, so a checkpoint saved
at TP=2 loads at TP=1 with the same global embedding shape. Padded rows are zero on
import, stripped on export, and must be masked out of every softmax (``true_vocab_size``).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_sz.errors import CheckpointError, LayoutError, UserError

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass
class ModelArch:
    """Everything about the network that Megatron needs, read from an HF config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_layernorm: bool
    rope_theta: float
    rope: dict = field(default_factory=dict)  # rope_type + its parameters (llama3 scaling)
    init_std: float = 0.02
    torch_dtype: Optional[str] = None

    def padded_vocab_size(self, *, tp: int = 1, make_vocab_size_divisible_by: int = 128) -> int:
        mult = math.lcm(int(make_vocab_size_divisible_by), int(tp))
        return int(math.ceil(self.vocab_size / mult) * mult)

    def to_dict(self) -> dict:
        return asdict(self)


def _where(source: str | None, key: str) -> str:
    return f"{source}: {key}" if source else key


def _rope_params(cfg: dict) -> dict:
    params = cfg.get("rope_parameters")
    if params is None:
        params = cfg.get("rope_scaling") or {}
        params = dict(params)
        if "rope_theta" in cfg:
            params.setdefault("rope_theta", cfg["rope_theta"])
    params = dict(params)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return params


def read_hf_config(path: str | Path) -> dict:
    """Load ``config.json`` from an HF folder (or a file), or ``hf_config.json`` from one of our checkpoints."""
    p = Path(path)
    if p.is_dir():
        for name in ("config.json", "hf_config.json"):
            if (p / name).exists():
                p = p / name
                break
        else:
            from megatron_sz.megatron.checkpoint import latest_checkpoint

            ckpt = latest_checkpoint(p)
            if ckpt is None or not (ckpt / "hf_config.json").exists():
                raise CheckpointError(f"no config.json, hf_config.json or complete checkpoint in {path}",
                                      fix="point at a Hugging Face model folder or a megatron-sz checkpoint")
            p = ckpt / "hf_config.json"
    if not p.exists():
        raise CheckpointError(f"config file {p} does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{p} is not valid JSON: {exc}") from None


def arch_from_hf_config(cfg: dict, *, source: str | None = None) -> ModelArch:
    """Validate an HF config dict and map it to a :class:`ModelArch`.

    Raises ``UserError`` naming the offending key for anything unsupported.
    """
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"model_type={model_type!r} is not supported",
                        where=_where(source, "model_type"),
                        fix=f"use one of {', '.join(SUPPORTED_MODEL_TYPES)} (dense Qwen3, Qwen2/2.5, Llama 3)")
    archs = cfg.get("architectures")
    if archs and ARCHITECTURES[model_type] not in archs:
        raise UserError(f"architectures={archs} does not match model_type={model_type!r}",
                        where=_where(source, "architectures"),
                        fix=f"expected {ARCHITECTURES[model_type]}")

    def need(key: str):
        if key not in cfg or cfg[key] is None:
            raise UserError(f"required key {key!r} is missing", where=_where(source, key))
        return cfg[key]

    def refuse(key: str, bad: bool, why: str):
        if bad:
            raise UserError(f"{key}={cfg.get(key)!r} is not supported: {why}", where=_where(source, key),
                            fix="use a dense full-attention checkpoint or extend megatron_sz/megatron/arch.py")

    for moe_key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size"):
        refuse(moe_key, bool(cfg.get(moe_key)), "mixture-of-experts models are not supported")
    refuse("hidden_act", cfg.get("hidden_act", "silu") != "silu", "only SiLU-gated MLPs (SwiGLU)")
    refuse("use_sliding_window", bool(cfg.get("use_sliding_window")), "sliding-window attention")
    layer_types = cfg.get("layer_types")
    refuse("layer_types", bool(layer_types) and any(t != "full_attention" for t in layer_types),
           "only full attention layers")
    refuse("mlp_bias", bool(cfg.get("mlp_bias")), "biases in the MLP")
    if model_type in ("qwen3", "llama"):
        refuse("attention_bias", bool(cfg.get("attention_bias")), "bias on q/k/v/o projections")
    pf = cfg.get("partial_rotary_factor", 1.0)
    refuse("partial_rotary_factor", pf not in (None, 1, 1.0), "partial rotary embeddings")
    rope = _rope_params(cfg)
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        key = "rope_parameters" if "rope_parameters" in cfg else "rope_scaling"
        raise UserError(f"{key}.rope_type={rope['rope_type']!r} is not supported",
                        where=_where(source, key), fix=f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope["rope_type"] == "llama3":
        for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if k not in rope:
                raise UserError(f"llama3 RoPE scaling needs {k!r}", where=_where(source, f"rope_parameters.{k}"))

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    groups = int(cfg.get("num_key_value_heads") or heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    if heads % groups:
        raise UserError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}",
                        where=_where(source, "num_key_value_heads"))
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    return ModelArch(
        model_type=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        ffn_hidden_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=int(head_dim),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        qk_layernorm=model_type == "qwen3",
        rope_theta=float(rope["rope_theta"]),
        rope={k: v for k, v in rope.items() if k != "rope_theta"},
        init_std=float(cfg.get("initializer_range", 0.02)),
        torch_dtype=str(dtype) if dtype else None,
    )


def check_layout(arch: ModelArch, *, tp: int, pp: int, vpp: int = 1) -> None:
    """Refuse a TP/PP layout the model cannot be split into (LayoutError with the reason)."""
    if tp < 1 or pp < 1:
        raise LayoutError(f"tp={tp}, pp={pp}: both must be >= 1")
    if arch.num_attention_heads % tp:
        raise LayoutError(f"num_attention_heads={arch.num_attention_heads} is not divisible by tp={tp}",
                          fix="choose a TP size that divides the number of attention heads")
    if arch.num_query_groups % tp:
        raise LayoutError(f"num_key_value_heads={arch.num_query_groups} is not divisible by tp={tp}",
                          fix="choose a TP size that divides the number of KV heads")
    if arch.ffn_hidden_size % tp:
        raise LayoutError(f"intermediate_size={arch.ffn_hidden_size} is not divisible by tp={tp}")
    if arch.num_layers % (pp * vpp):
        raise LayoutError(f"num_hidden_layers={arch.num_layers} is not divisible by pp={pp}"
                          + (f" x vpp={vpp}" if vpp > 1 else ""),
                          fix="choose a PP size that divides the number of layers")


def llama3_inv_freq(inv_freq, rope: dict):
    """HF's ``llama3`` RoPE frequency transform, with all four parameters honoured
    (Megatron's built-in version hard-codes low=1, high=4, original=8192)."""
    import torch

    factor = float(rope["factor"])
    low = float(rope["low_freq_factor"])
    high = float(rope["high_freq_factor"])
    old_len = float(rope["original_max_position_embeddings"])
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def parse_hf_config(obj: Any, *, source: str | None = None) -> tuple[dict, ModelArch]:
    """Accept a dict, an HF folder, a config.json path, or a checkpoint folder."""
    if isinstance(obj, dict):
        return obj, arch_from_hf_config(obj, source=source)
    cfg = read_hf_config(obj)
    return cfg, arch_from_hf_config(cfg, source=source or str(obj))
