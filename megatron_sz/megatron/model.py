"""Build Megatron-Core ``GPTModel`` chunks from an HF config and run them.

The rest of megatron-sz never touches Megatron: trainers call ``build_model``,
``forward_hidden`` (final-norm hidden states, pre-LM-head, so the fused vocab-parallel
kernels can take ``lm_head_weight``) and the checkpoint functions.

Layer specs: TransformerEngine on GPU when ``transformer_engine`` imports, Megatron's
local spec otherwise; without CUDA the local core attention is swapped for the SDPA
module from ``cpu_shim`` (the only CPU-specific piece of the model).
"""
from __future__ import annotations

from typing import Any, Optional

import math

import torch

from megatron_sz.errors import LayoutError, UserError
from megatron_sz.megatron.cpu_shim import ensure_cpu_shim
from megatron_sz.model_shape import ModelShape, check_layout, parse_hf_config

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


# ModelShape.activation -> the gated MLP's activation (model_shape.ACTIVATIONS lists what parses).
_ACTIVATIONS = {"silu": torch.nn.functional.silu}


def resolve_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32
    key = str(dtype).replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
    return _DTYPES[key]


def have_transformer_engine() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def initialize_parallel(tp: int = 1, pp: int = 1, *, vpp: int | None = None, seed: int = 1234) -> None:
    """Create Megatron's TP/PP/DP groups on an initialised ``torch.distributed`` world.

    DP is whatever is left: ``world_size / (tp * pp)``. Re-initialises if already set up
    with other sizes (tests and ``convert`` build several layouts in one process).
    """
    import torch.distributed as tdist
    from megatron.core import parallel_state, tensor_parallel

    ensure_cpu_shim()
    if not tdist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; use megatron_sz.dist.init_from_env() or spawn()")
    world = tdist.get_world_size()
    if world % (tp * pp):
        raise LayoutError(f"world size {world} is not divisible by tp*pp={tp * pp}",
                          fix="launch tp*pp*dp processes")
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() == tp
                and parallel_state.get_pipeline_model_parallel_world_size() == pp
                and parallel_state.get_virtual_pipeline_model_parallel_world_size() == vpp):
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def transformer_config(arch: ModelShape, *, tp: int, pp: int, vpp: int | None = None,
                       params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                       recompute: str | None = None, **overrides):
    """The ``TransformerConfig`` for ``arch`` (keyword overrides win)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available()
    kw = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=_ACTIVATIONS[arch.activation],
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.init_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # Pipeline stages exchange tensor shapes per micro-batch, so batches may differ
        # in length (DPO pairs). The dispatcher key only matters for MoE but is checked.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        attention_softmax_in_fp32=True,
    )
    if recompute:
        kw.update(recompute_granularity=recompute)
        if recompute == "full":
            kw.update(recompute_method="uniform", recompute_num_layers=1)
    kw.update(overrides)
    return TransformerConfig(**kw)


def layer_spec(arch: ModelShape):
    """TE spec on GPU with TransformerEngine; otherwise the local spec with fused SDPA core
    attention (``megatron/attention.py``) on CPU and GPU alike: Megatron's unfused
    ``DotProductAttention`` (``[b, heads, s, s]`` scores per layer) is never used."""
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_sz.megatron.attention import FusedCoreAttention

    if have_transformer_engine():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm)
    from megatron_sz.megatron.norm import replace_torch_norms, use_torch_norms

    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = FusedCoreAttention
    if use_torch_norms():  # benchmark A/B only: Megatron's fp32-weight norms, unfused in bf16
        return spec
    return replace_torch_norms(spec)  # norms in the model dtype, so bf16 norms run fused


def block_spec(arch: ModelShape, config: Any, vp_stage: int | None = None):
    """What ``GPTModel`` gets as its layer spec: TE's layer spec as it is, or, for the local
    spec, the whole block with megatron_sz's ``RMSNorm`` as the final norm too (Megatron
    would fill in its fp32-weight torch norm there)."""
    from megatron_sz.megatron.norm import RMSNorm, use_torch_norms

    spec = layer_spec(arch)
    if have_transformer_engine() or use_torch_norms():
        return spec
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=RMSNorm)


def build_model(hf_config: Any, *, tp: int | None = None, pp: int | None = None,
                params_dtype: Any = torch.float32, make_vocab_size_divisible_by: int = 128,
                sequence_parallel: bool = False, recompute: str | None = None,
                init_weights: bool = True, **config_overrides) -> list:
    """Build this rank's model chunks (one per virtual pipeline stage; usually one).

    ``hf_config``: a config dict, an HF folder, or a megatron-sz checkpoint folder.
    ``tp``/``pp`` default to the already-initialised parallel state and must match it.
    ``init_weights=False`` skips random init (faster when weights are loaded next).
    Built from a checkpoint folder, the vocab padding is the checkpoint's own.
    Each chunk gets ``chunk.hf_config`` (dict), ``chunk.arch`` (``model_shape.ModelShape``),
    ``chunk.true_vocab_size`` and ``chunk.padded_vocab_size``.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    ensure_cpu_shim()
    cfg, arch = parse_hf_config(hf_config)
    initialised = parallel_state.model_parallel_is_initialized()
    cur_tp = parallel_state.get_tensor_model_parallel_world_size() if initialised else None
    cur_pp = parallel_state.get_pipeline_model_parallel_world_size() if initialised else None
    tp = cur_tp if tp is None else tp
    pp = cur_pp if pp is None else pp
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size() if initialised else None
    # The model's own rules first (the same ones `plan` and pre-flight apply), then the world.
    if tp is not None and pp is not None:
        check_layout(arch, tp=tp, pp=pp, vpp=vpp, sequence_parallel=sequence_parallel,
                     vocab_divisible_by=make_vocab_size_divisible_by)
    if not initialised:
        raise RuntimeError("call initialize_parallel(tp, pp) before build_model")
    if (tp, pp) != (cur_tp, cur_pp):
        raise LayoutError(f"build_model(tp={tp}, pp={pp}) but the parallel state is tp={cur_tp}, pp={cur_pp}",
                          fix="call initialize_parallel with the same sizes")
    if sequence_parallel and tp > 1 and not have_transformer_engine():
        from megatron.core.models.gpt import gpt_layer_specs

        if not gpt_layer_specs.HAVE_APEX:
            raise UserError("sequence_parallel needs TransformerEngine (or NVIDIA Apex) norms; Megatron's "
                            "torch norms refuse it", where="sequence_parallel",
                            fix="install transformer-engine on the GPU cluster, or turn sequence_parallel off")
    dtype = resolve_dtype(params_dtype)
    config = transformer_config(arch, tp=tp, pp=pp, vpp=vpp, params_dtype=dtype,
                                sequence_parallel=sequence_parallel, recompute=recompute,
                                perform_initialization=init_weights, **config_overrides)
    padded = padded_vocab_size_for(hf_config, arch, tp=tp, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        spec = block_spec(arch, config, stage)
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        model = GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=padded,
            max_sequence_length=arch.max_position_embeddings, pre_process=pre, post_process=post,
            parallel_output=True, share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope", rotary_percent=1.0, rotary_base=int(arch.rope_theta)
            if float(arch.rope_theta).is_integer() else arch.rope_theta,
            vp_stage=stage)
        _set_rope(model, arch)
        if not init_weights:
            _mark_tensor_parallel_params(model)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        model.hf_config = cfg
        model.arch = arch
        model.true_vocab_size = arch.vocab_size
        model.padded_vocab_size = padded
        chunks.append(model)
    return chunks


def padded_vocab_size_for(source: Any, arch: ModelShape, *, tp: int, make_vocab_size_divisible_by: int = 128) -> int:
    """Padded vocab rows: a checkpoint's own padding when building from one (so e.g. a
    TP=3 checkpoint, padded to a multiple of 384, loads at TP=1), else the usual rule."""
    from pathlib import Path

    if not isinstance(source, dict):
        from megatron_sz.megatron.checkpoint import latest_checkpoint, read_meta

        p = Path(source)
        ckpt = latest_checkpoint(p) if p.is_dir() and not (p / "config.json").exists() else None
        saved = read_meta(ckpt).get("padded_vocab_size") if ckpt is not None else None
        if saved and int(saved) % tp == 0 and int(saved) >= arch.vocab_size:
            return int(saved)
    return arch.padded_vocab_size(tp=tp, make_vocab_size_divisible_by=make_vocab_size_divisible_by)


def _mark_tensor_parallel_params(model) -> None:
    """Set the TP attributes that Megatron only sets inside its weight initialisers.

    With ``perform_initialization=False`` (fast build before loading weights) Megatron's
    parallel layers skip ``set_tensor_model_parallel_attributes``; grad-norm, clipping
    and the optimizer would then treat TP shards as duplicates (measured: a different
    grad norm at TP=2 for identical weights). Column-parallel and vocab-parallel weights
    split dim 0, row-parallel weights dim 1.
    """
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    gated = model.config.gated_linear_unit
    for path, module in model.named_modules():
        name = type(module).__name__
        if "ColumnParallel" in name or "VocabParallelEmbedding" in name:
            dim = 0
        elif "RowParallel" in name:
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and not getattr(weight, "tensor_model_parallel", False):
            # SwiGLU fc1 holds [gate_r; up_r] per rank: Megatron marks it stride 2.
            stride = 2 if gated and path.endswith("linear_fc1") else 1
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=stride)


def _set_rope(model, arch: ModelShape) -> None:
    """Use exactly HF's inverse frequencies (fp32), including llama3 scaling."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None:
        return
    dim = arch.head_dim
    device = rope.inv_freq.device
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(
        device=device, dtype=torch.float) / dim))
    if arch.rope.get("rope_type") == "llama3":
        inv = llama3_inv_freq(inv, arch.rope)
    rope.inv_freq = inv


def llama3_inv_freq(inv_freq, rope: dict):
    """HF's ``llama3`` RoPE frequency transform, with all four parameters honoured
    (Megatron's built-in version hard-codes low=1, high=4, original=8192)."""
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


def unwrap(model):
    """The GPTModel under DDP/Float16 wrappers."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def _chunk(model_or_chunks):
    if isinstance(model_or_chunks, (list, tuple)):
        if len(model_or_chunks) != 1:
            raise ValueError("pass one model chunk (this call does not handle virtual pipeline stages)")
        model_or_chunks = model_or_chunks[0]
    return model_or_chunks


def forward_hidden(model, input_ids: Optional[torch.Tensor], position_ids: Optional[torch.Tensor] = None,
                   attention_mask: Optional[torch.Tensor] = None, packed_seq_params: Any = None) -> torch.Tensor:
    """Run embedding + decoder; return ``[s, b, h]``.

    On the last pipeline stage this is after the final RMSNorm (the LM-head input); on
    earlier stages it is the stage output to send on. On non-first stages the input
    comes from ``model.set_input_tensor`` (the schedule does this), and ``input_ids``
    may be None. With sequence parallelism the result is gathered to the full sequence.
    The result is replicated over TP ranks: a loss computed from this rank's vocab shard
    must all-reduce dX over TP in backward (``vocab_parallel_logits`` does).
    ``attention_mask``: None = causal; else bool ``[b, 1, s, s]`` with True = masked out.
    ``packed_seq_params``: Megatron ``PackedSeqParams`` (THD) for one packed row ``[1, t]``
    (``attention.packed_seq_params``): attention and RoPE restart at each ``cu_seqlens``
    boundary; the result is ``[t, 1, h]``.
    """
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    wrapper = _chunk(model)
    gpt = unwrap(wrapper)
    if position_ids is None and input_ids is not None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    pre = gpt._preprocess(input_ids=input_ids, position_ids=position_ids, decoder_input=None,
                          inference_context=None, packed_seq_params=packed_seq_params)
    decoder_input, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, sequence_len_offset = pre[:5]
    hidden = gpt.decoder(hidden_states=decoder_input, attention_mask=attention_mask,
                         rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos,
                         rotary_pos_sin=rotary_pos_sin, sequence_len_offset=sequence_len_offset,
                         packed_seq_params=packed_seq_params)
    if gpt.post_process and gpt.config.sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    return hidden


def lm_head_weight(model) -> torch.Tensor:
    """This rank's LM-head vocab shard ``[V_padded / tp, H]`` (tied: the embedding weight).

    Rows with global index >= ``true_vocab_size(model)`` are padding.
    """
    gpt = unwrap(_chunk(model))
    if not gpt.post_process:
        raise ValueError("lm_head_weight is only defined on the last pipeline stage")
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def true_vocab_size(model) -> int:
    return unwrap(_chunk(model)).true_vocab_size


def padded_vocab_size(model) -> int:
    return unwrap(_chunk(model)).padded_vocab_size


def vocab_shard_range(model) -> tuple[int, int]:
    """``[start, end)`` of the global vocab rows this TP rank holds."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    per = padded_vocab_size(model) // tp
    return rank * per, (rank + 1) * per


def vocab_parallel_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """This rank's logits shard ``[s, b, V_padded/tp]`` = hidden @ lm_head_shard^T.

    The hidden states enter through ``copy_to_tensor_model_parallel_region`` (identity
    forward, all-reduce of dX over TP in backward): every rank's vocab shard contributes
    to the gradient of the replicated hidden states. A custom LM-head loss (the fused
    kernels) must do the same all-reduce of dX.
    """
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    return torch.matmul(copy_to_tensor_model_parallel_region(hidden), lm_head_weight(model).t())


def forward_logits(model, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                   attention_mask: Optional[torch.Tensor] = None, *, gather: bool = True,
                   strip_padding: bool = True) -> torch.Tensor:
    """Plain logits ``[b, s, V]`` for parity checks (last PP stage only; gathered over TP).

    Materialises the full logits: use the fused kernels with ``forward_hidden`` in training.
    """
    hidden = forward_hidden(model, input_ids, position_ids, attention_mask)
    logits = vocab_parallel_logits(model, hidden)  # [s, b, V/tp]
    if gather:
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        logits = gather_from_tensor_model_parallel_region(logits)
        if strip_padding:
            logits = logits[..., :true_vocab_size(model)]
    return logits.transpose(0, 1).contiguous()


def pipeline_forward_logits(model_chunks, input_ids: torch.Tensor,
                            attention_mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Forward-only logits through Megatron's pipeline schedule (any PP, one micro-batch).

    Every rank calls it with the same ``input_ids``; returns ``[b, s, V_true]`` on the
    last stage and None elsewhere. With PP=1 it is ``forward_logits``.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        with torch.no_grad():
            return forward_logits(chunks[0], input_ids, attention_mask=attention_mask)
    collected: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        ids = next(data_iterator)
        hidden = forward_hidden(model, ids, attention_mask=attention_mask)

        def loss_func(output):
            gpt = unwrap(model)
            if gpt.post_process:
                logits = gather_from_tensor_model_parallel_region(vocab_parallel_logits(model, output))
                collected.append(logits[..., :gpt.true_vocab_size].transpose(0, 1).contiguous())
            return output.new_zeros(()), {}
        return hidden, loss_func

    fb = get_forward_backward_func()
    with torch.no_grad():
        fb(forward_step_func=forward_step, data_iterator=iter([input_ids]) if len(chunks) == 1 else [iter([input_ids]) for _ in chunks],
           model=chunks,
           num_microbatches=1, seq_length=input_ids.shape[1], micro_batch_size=input_ids.shape[0],
           forward_only=True)
    return collected[0] if collected else None
