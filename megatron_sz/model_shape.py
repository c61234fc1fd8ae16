"""The model shape: one parse of an HF ``config.json`` and one set of layout rules.

Everything that needs to know what network a config describes reads it here: recipe
validation, ``megatron-sz plan`` (memory arithmetic), pre-flight checks and the Megatron
adapter (``megatron_sz.megatron`` builds ``GPTModel`` from a :class:`ModelShape`). There
is no Megatron or torch import, so ``plan`` runs anywhere; the rule that holds is
**a config and layout that pass here build** (tests/test_model_shape.py checks it).

What is unusual here:

* Families are a registry (:data:`FAMILIES`), not string branches. Every supported
  family is a dense pre-norm RMSNorm decoder with a SiLU-gated MLP and full-attention
  RoPE; the entries differ only in QKV bias (Qwen2), per-head q/k RMSNorm (Qwen3) and
  which key turns sliding-window attention on. Mistral is Llama-shaped (same tensors,
  same attention) as long as ``sliding_window`` is null; with a window it is refused,
  because the Megatron model would attend over the full context and silently differ.
* Whatever would make the Megatron model differ from the HF one (MoE, sliding window,
  biases on o_proj/MLP, partial rotary, RoPE types other than default/llama3, non-SiLU
  activations, GLM-4's post-norms and partial rotary) is refused with a ``LayoutError``
  naming the config key.
* KV heads: Megatron-Core >= 0.16 can replicate KV heads when ``tp > num_key_value_heads``,
  but our HF weight mapping (``megatron/weights.build_shard``), checkpoint export and the
  planner's per-rank count all assume whole KV groups per TP rank, so ``tp`` must divide
  ``num_key_value_heads``.
* Vocab padding is ``lcm(make_vocab_size_divisible_by, tp)``, not Megatron-LM's
  ``divisible_by * tp``: for the usual power-of-two TP sizes it does not depend on TP, so
  a checkpoint saved at TP=2 loads at TP=1 with the same embedding shape.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_sz.errors import LayoutError


@dataclass(frozen=True)
class Family:
    """One supported HF decoder family."""

    model_type: str
    architecture: str  # the HF class name expected in ``architectures``
    qkv_bias: bool  # bias on q/k/v (none on o_proj): Qwen2/2.5
    qk_norm: bool  # per-head RMSNorm on q and k: Qwen3
    sliding_window_key: Optional[str]  # the key that turns sliding windows on (besides use_sliding_window)
    description: str


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("qwen3", "Qwen3ForCausalLM", qkv_bias=False, qk_norm=True, sliding_window_key="use_sliding_window",
           description="Qwen3 dense"),
    Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, qk_norm=False, sliding_window_key="use_sliding_window",
           description="Qwen2/2.5"),
    Family("llama", "LlamaForCausalLM", qkv_bias=False, qk_norm=False, sliding_window_key=None,
           description="Llama 2/3 (llama3 RoPE scaling)"),
    Family("mistral", "MistralForCausalLM", qkv_bias=False, qk_norm=False, sliding_window_key="sliding_window",
           description="Mistral without sliding window"),
)}

# Families people ask for that we refuse on purpose, with the reason.
REFUSED_FAMILIES = {
    "glm4": "GLM-4 is not supported yet (partial rotary embeddings, post-attention/post-MLP norms)",
    "glm": "GLM is not supported yet (partial rotary embeddings)",
    "chatglm": "ChatGLM is not supported (partial rotary embeddings, fused QKV layout)",
    "mixtral": "Mixtral is a mixture-of-experts model; only dense decoders are supported",
}
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
ACTIVATIONS = ("silu",)  # gated: SwiGLU
# The fields that define the tensors (two checkpoints that agree on these are interchangeable).
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
              "num_query_groups", "head_dim", "tie_word_embeddings", "qkv_bias", "qk_layernorm")
_FIX = "use a dense full-attention Qwen3/Qwen2/Llama/Mistral checkpoint, or extend megatron_sz/model_shape.py"


@dataclass(frozen=True)
class ModelShape:
    """Everything about the network that the planner and Megatron need, read from an HF config.

    Field names follow Megatron's ``TransformerConfig`` where it has one
    (``num_query_groups`` = HF ``num_key_value_heads``, ``ffn_hidden_size`` = HF
    ``intermediate_size``).
    """

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
    activation: str = "silu"
    init_std: float = 0.02
    torch_dtype: Optional[str] = None

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    def padded_vocab_size(self, *, tp: int = 1, make_vocab_size_divisible_by: int = 128) -> int:
        return padded_vocab(self.vocab_size, tp=tp, divisible_by=make_vocab_size_divisible_by)

    def to_dict(self) -> dict:
        return asdict(self)

    # Unsharded HF parameter counts.
    def layer_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        n = h * (q + 2 * kv) + q * h + 3 * h * self.ffn_hidden_size + 2 * h
        if self.qk_layernorm:
            n += 2 * d
        if self.qkv_bias:
            n += q + 2 * kv
        return n

    def total_params(self) -> int:
        """Parameters of the HF model (unpadded vocabulary; tied embedding counted once)."""
        emb = self.vocab_size * self.hidden_size
        return self.num_layers * self.layer_params() + emb * (1 if self.tie_word_embeddings else 2) + self.hidden_size


def padded_vocab(vocab: int, *, tp: int, divisible_by: int = 128) -> int:
    """Embedding / LM-head rows: ``vocab`` rounded up to a multiple of ``lcm(divisible_by, tp)``."""
    mult = math.lcm(int(divisible_by), int(tp))
    return int(math.ceil(vocab / mult) * mult)


# --------------------------------------------------------------------------- reading


def _at(where: Optional[str], key: str) -> str:
    return f"{where}: {key}" if where else key


def read_hf_config(path: str | Path) -> dict:
    """``config.json`` of an HF folder (or the file itself), or ``hf_config.json`` of a
    megatron-sz checkpoint (its root or one ``iter_*`` folder)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("config.json", "hf_config.json"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            # A checkpoint root: follow `latest`. The checkpoint layout is the adapter's;
            # this import is plain Python (no torch, no Megatron).
            from megatron_sz.megatron.checkpoint import latest_checkpoint

            ckpt = latest_checkpoint(p)
            if ckpt is None or not (ckpt / "hf_config.json").is_file():
                raise LayoutError(f"no config.json, hf_config.json or complete checkpoint in {path}", where=str(path),
                                  fix="point at a Hugging Face model folder or a megatron-sz checkpoint")
            p = ckpt / "hf_config.json"
    if not p.is_file():
        raise LayoutError(f"model config {p} does not exist", where=str(path),
                          fix="pass an HF config.json or a folder that holds one")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LayoutError(f"invalid JSON: {exc.msg}", where=f"{p}:{exc.lineno}") from None
    if not isinstance(cfg, dict):
        raise LayoutError(f"model config must be a JSON object, got {type(cfg).__name__}", where=str(p))
    return cfg


def parse_hf_config(source: Any, *, where: Optional[str] = None) -> tuple[dict, ModelShape]:
    """``(config dict, ModelShape)`` of a dict, an HF folder, a config.json or a checkpoint folder."""
    if isinstance(source, dict):
        return source, model_shape(source, where=where)
    cfg = read_hf_config(source)
    return cfg, model_shape(cfg, where=where or str(source))


def _model_type(cfg: dict, where: Optional[str]) -> str:
    model_type = str(cfg.get("model_type") or "").lower()
    if not model_type:  # an old config without model_type: take it from the architecture
        by_arch = {f.architecture: t for t, f in FAMILIES.items()}
        for arch in cfg.get("architectures") or []:
            if arch in by_arch:
                return by_arch[arch]
        raise LayoutError("model_type is missing", where=_at(where, "model_type"),
                          fix=f"set model_type to one of {', '.join(FAMILIES)}")
    if model_type in REFUSED_FAMILIES:
        raise LayoutError(f"model_type={model_type!r}: {REFUSED_FAMILIES[model_type]}",
                          where=_at(where, "model_type"), fix=_FIX)
    if "moe" in model_type:
        raise LayoutError(f"model_type={model_type!r} is a mixture-of-experts model; only dense decoders are "
                          "supported", where=_at(where, "model_type"), fix=_FIX)
    if model_type not in FAMILIES:
        raise LayoutError(f"unsupported model_type={model_type!r}", where=_at(where, "model_type"),
                          fix=f"use one of {', '.join(FAMILIES)} "
                              f"({', '.join(f.description for f in FAMILIES.values())})")
    return model_type


def _rope_params(cfg: dict) -> dict:
    """RoPE parameters from either spelling (``rope_parameters``, or ``rope_scaling`` + ``rope_theta``)."""
    params = cfg.get("rope_parameters")
    if params is None:
        params = dict(cfg.get("rope_scaling") or {})
        if "rope_theta" in cfg:
            params.setdefault("rope_theta", cfg["rope_theta"])
    params = dict(params)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return params


def _refuse_features(cfg: dict, family: Family, where: Optional[str]) -> None:
    def refuse(key: str, bad: bool, why: str, fix: str = _FIX) -> None:
        if bad:
            raise LayoutError(f"{key}={cfg.get(key)!r} is not supported: {why}", where=_at(where, key), fix=fix)

    archs = cfg.get("architectures")
    if archs and family.architecture not in archs:
        raise LayoutError(f"architectures={archs} does not match model_type={family.model_type!r}",
                          where=_at(where, "architectures"), fix=f"expected {family.architecture}")
    for key in MOE_KEYS:
        refuse(key, bool(cfg.get(key)), "mixture-of-experts models; only dense decoders are supported")
    refuse("hidden_act", cfg.get("hidden_act", "silu") not in ACTIVATIONS, "only SiLU-gated MLPs (SwiGLU)")
    for key in dict.fromkeys(("use_sliding_window", family.sliding_window_key or "use_sliding_window")):
        refuse(key, cfg.get(key) not in (None, False),
               "sliding-window attention (the Megatron model would attend over the whole context)",
               fix=f"set {key}: {'false' if key.startswith('use_') else 'null'} if no sequence is longer than "
                   "the window, or use a full-attention checkpoint")
    layer_types = cfg.get("layer_types")
    refuse("layer_types", bool(layer_types) and any(t != "full_attention" for t in layer_types),
           "only full attention layers")
    refuse("mlp_bias", bool(cfg.get("mlp_bias")), "biases in the MLP")
    refuse("attention_bias", bool(cfg.get("attention_bias")) and not family.qkv_bias,
           "bias on the q/k/v/o projections")
    refuse("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0),
           "partial rotary embeddings")
    refuse("qk_norm", "qk_norm" in cfg and bool(cfg["qk_norm"]) != family.qk_norm,
           f"{family.model_type} {'has' if family.qk_norm else 'has no'} q/k norms")


def model_shape(cfg: dict, *, where: Optional[str] = None) -> ModelShape:
    """Validate an HF config dict and map it to a :class:`ModelShape`.

    ``where`` names the config (a file, or a recipe field); errors name ``where: key``.
    Raises ``LayoutError`` for anything the Megatron adapter cannot build exactly.
    """
    if not isinstance(cfg, dict):
        raise LayoutError(f"model config must be a mapping, got {type(cfg).__name__}", where=where)
    family = FAMILIES[_model_type(cfg, where)]
    _refuse_features(cfg, family, where)
    rope = _rope_params(cfg)
    rope_key = "rope_parameters" if "rope_parameters" in cfg else "rope_scaling"
    if rope["rope_type"] not in ROPE_TYPES:
        raise LayoutError(f"{rope_key}.rope_type={rope['rope_type']!r} is not supported",
                          where=_at(where, rope_key), fix=f"supported: {', '.join(ROPE_TYPES)}")
    if rope["rope_type"] == "llama3":
        for k in LLAMA3_ROPE_KEYS:
            if k not in rope:
                raise LayoutError(f"llama3 RoPE scaling needs {k!r}", where=_at(where, f"{rope_key}.{k}"),
                                  fix=f"set all of {', '.join(LLAMA3_ROPE_KEYS)}")

    def need(key: str, default: Any = None) -> int:
        v = cfg.get(key)
        if v is None and default is not None:
            return default
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LayoutError(f"{key} must be a positive integer, got {v!r}", where=_at(where, key),
                              fix=f"set {key} in the HF config.json")
        return v

    hidden = need("hidden_size")
    heads = need("num_attention_heads")
    groups = need("num_key_value_heads", heads)
    if cfg.get("head_dim") is None and hidden % heads:
        raise LayoutError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}",
                          where=_at(where, "head_dim"), fix="set head_dim explicitly")
    head_dim = need("head_dim", hidden // heads)
    if heads % groups:
        raise LayoutError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}",
                          where=_at(where, "num_key_value_heads"), fix="each KV head serves a whole group of heads")
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    return ModelShape(
        model_type=family.model_type,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        ffn_hidden_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=need("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias,
        qk_layernorm=family.qk_norm,
        rope_theta=float(rope["rope_theta"]),
        rope={k: v for k, v in rope.items() if k != "rope_theta"},
        activation=str(cfg.get("hidden_act", "silu")),
        init_std=float(cfg.get("initializer_range", 0.02)),
        torch_dtype=str(dtype) if dtype else None,
    )


# --------------------------------------------------------------------------- layout rules


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_tp(m: ModelShape) -> list[int]:
    """Every TP size the model splits into."""
    return [d for d in _divisors(m.num_query_groups)
            if m.num_attention_heads % d == 0 and m.ffn_hidden_size % d == 0]


def check_layout(m: ModelShape, *, tp: int, pp: int, vpp: Optional[int] = None, sequence_parallel: bool = False,
                 seq_len: Optional[int] = None, vocab_divisible_by: int = 128, where: str = "layout") -> None:
    """THE layout rules: refuse a TP/PP/VPP/SP layout the model cannot be split into.

    ``where`` names the layout (``recipe.yaml: solver.parallel``); errors name
    ``where.field`` and a valid alternative. ``vpp`` None or 1 means no interleaving.
    """
    for name, v in (("tp", tp), ("pp", pp), ("vocab_divisible_by", vocab_divisible_by)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LayoutError(f"{name} must be a positive integer, got {v!r}", where=f"{where}.{name}",
                              fix="use 128 (Megatron's default)" if name == "vocab_divisible_by" else f"set {name}: 1")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise LayoutError(f"seq_len must be a positive integer, got {seq_len!r}", where=f"{where}.seq_len")
    ok_tp = valid_tp(m)
    if m.num_attention_heads % tp:
        raise LayoutError(f"num_attention_heads={m.num_attention_heads} is not divisible by tp={tp}",
                          where=f"{where}.tp", fix=f"use tp in {ok_tp}")
    if m.num_query_groups % tp:
        raise LayoutError(f"num_key_value_heads={m.num_query_groups} is not divisible by tp={tp}: each TP rank "
                          "holds whole KV groups", where=f"{where}.tp", fix=f"use tp in {ok_tp}")
    if m.ffn_hidden_size % tp:
        raise LayoutError(f"intermediate_size={m.ffn_hidden_size} is not divisible by tp={tp}", where=f"{where}.tp",
                          fix=f"use tp in {ok_tp}")
    if m.num_layers % pp:
        raise LayoutError(f"num_hidden_layers={m.num_layers} is not divisible by pp={pp}", where=f"{where}.pp",
                          fix=f"use pp in {_divisors(m.num_layers)}")
    if vpp is not None and vpp != 1:
        if isinstance(vpp, bool) or not isinstance(vpp, int) or vpp < 1:
            raise LayoutError(f"virtual_pp must be a positive integer, got {vpp!r}", where=f"{where}.virtual_pp",
                              fix="unset virtual_pp")
        if pp < 2:
            raise LayoutError("virtual pipeline stages need pp >= 2", where=f"{where}.virtual_pp",
                              fix="unset virtual_pp or raise pp")
        if m.num_layers % (pp * vpp):
            raise LayoutError(f"num_hidden_layers={m.num_layers} is not divisible by pp*virtual_pp = {pp * vpp}",
                              where=f"{where}.virtual_pp",
                              fix=f"use virtual_pp in {_divisors(m.num_layers // pp)}")
    if sequence_parallel and tp < 2:
        raise LayoutError("sequence_parallel needs tp >= 2 (it splits the TP-replicated activations)",
                          where=f"{where}.sequence_parallel", fix="set sequence_parallel: false or tp >= 2")
    if sequence_parallel and seq_len is not None and seq_len % tp:
        raise LayoutError(f"with sequence_parallel the sequence length {seq_len} must be divisible by tp={tp}",
                          where=f"{where}.seq_len", fix=f"use seq_len {seq_len + (-seq_len) % tp}")


def check_model_layout(hf_config: Any, *, tp: int, pp: int, virtual_pp: Optional[int] = None,
                       sequence_parallel: bool = False, vocab_divisible_by: int = 128,
                       where: str = "layout", config_where: Optional[str] = None) -> ModelShape:
    """Parse ``hf_config`` (dict or folder) and check the layout against it; returns the shape."""
    _, m = parse_hf_config(hf_config, where=config_where or f"{where}.model")
    check_layout(m, tp=tp, pp=pp, vpp=virtual_pp, sequence_parallel=sequence_parallel,
                 vocab_divisible_by=vocab_divisible_by, where=where)
    return m
