"""Parallel-layout planner: per-GPU memory of a Megatron-Core training layout, by arithmetic.

No Megatron, no torch: it reads an HF ``config.json`` dict (parsed, and the layout
checked, by ``megatron_sz.model_shape``, the same rules the Megatron adapter builds by)
and counts. It runs in milliseconds, so users try layouts before asking SLURM for GPUs.

What it counts, per pipeline stage (the report shows the worst stage):

* **Parameters**, exactly as Megatron-Core shards them:
  - vocabulary padded to a multiple of ``lcm(vocab_divisible_by, tp)`` (our build's rule,
    see ``model_shape.padded_vocab``); the embedding is on the first stage, the LM head
    (``output_layer``) on the last; with tied embeddings and ``pp > 1`` the last stage
    holds its own copy of the embedding (Megatron keeps both in sync by an all-reduce);
  - attention: fused QKV (column-parallel, ``(heads + 2 * kv_heads) * head_dim`` rows,
    split by ``tp``), output projection (row-parallel, split by ``tp``); QKV bias
    (Qwen2) is split;
  - MLP: fused gate/up ``fc1`` (``2 * intermediate`` rows) and ``fc2``, split by ``tp``;
  - replicated on every TP rank: RMSNorm weights (2 per layer, final norm on the last
    stage), Qwen3's q/k RMSNorm (``head_dim`` each).
* **Gradients**: Megatron's DDP keeps fp32 ``main_grad`` buffers (4 bytes/param) when
  training in bf16/fp16 (``accumulate_allreduce_grads_in_fp32``); in fp32, also 4 bytes.
  Not sharded by the distributed optimizer (it reduce-scatters into a full buffer).
* **Optimizer** (Adam): fp32 m and v (8 bytes/param) plus an fp32 master copy of the
  params (4 bytes/param) in bf16/fp16 = 12 bytes/param; 8 bytes/param in fp32. The
  DistributedOptimizer shards all of it over the data-parallel ranks (ZeRO-1).
* **Activations**, bytes stored for the backward per token per layer (bf16, no dropout,
  flash/fused attention: no ``s x s`` score matrix). A Korthikanti et al. (2022,
  arXiv 2205.05198) style count, redone for GQA, QK-norm and SwiGLU:

      norm inputs/outputs + residuals  8h        (/tp with sequence parallel, else not)
      QKV output (q, k, v)             2(nq + 2 nkv) d / tp
      QK-norm inputs (Qwen3)           2(nq + nkv) d / tp
      attention output (o_proj input)  2 nq d / tp     (+ fp32 softmax stats, 4 nq / tp)
      fc1 output (gate, up)            4 I / tp
      SwiGLU output (fc2 input)        2 I / tp

  ``attention="unfused"`` adds the score and softmax matrices, ``4 nq s / tp`` per token.
  ``recompute="selective"`` recomputes core attention, which removes that term (with flash
  attention it saves nothing). ``recompute="full"`` keeps only each layer's input
  (``2h``, /tp with SP) plus one layer's full activations while it is recomputed.
  The first pipeline stage holds ``min(pp, num_microbatches)`` micro-batches in flight
  under 1F1B (times ``1 + (pp - 1) / (pp * vpp)`` with interleaving), so it is the
  worst stage for activations; the embedding output (``2h`` per token) is added there.
* **Loss**: materialised logits are ``[mbs * seq, V_pad / tp]`` as the bf16 GEMM output
  (2 bytes), its fp32 copy (4) and the fp32 softmax kept for the backward (4):
  10 bytes per element, on the last stage. The fused linear loss (megatron_sz.kernels)
  never forms that tensor: per token it keeps fp32 log-sum-exp and target logit (8 bytes),
  plus ONE fp32 logits chunk of ``FUSED_CHUNK_MIB`` (its default GPU chunk budget; the
  dlogits are written in place over it) and, in training, nothing for dW: it goes straight
  into the fp32 main_grad counted under grads.

Not counted: the CUDA context and NCCL buffers (~1-3 GiB per GPU), allocator
fragmentation, TransformerEngine workspaces, and the reference model of DPO (it is run
forward-only on precomputed reference log-probs, or holds bf16 params only).

``plan_layout`` raises ``LayoutError`` for impossible layouts (naming the field and a
valid alternative); ``megatron-sz plan`` prints it and exits with code 2.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from megatron_sz.errors import LayoutError
from megatron_sz.model_shape import ModelShape, check_layout, model_shape, padded_vocab

# The fused losses' default GPU chunk budget (kernels/_common.py:default_chunk_rows).
FUSED_CHUNK_MIB = 640

GiB = float(1 << 30)

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


# --------------------------------------------------------------------------- plan


@dataclass
class StageMemory:
    """Per-GPU figures of one pipeline stage (bytes unless named *_params)."""

    stage: int
    layers: int
    has_embedding: bool
    has_lm_head: bool
    params: int  # parameters held by one GPU of this stage
    param_bytes: int
    grad_bytes: int
    optim_bytes: int  # with the layout's optimizer choice
    optim_bytes_plain: int  # without DistributedOptimizer
    optim_bytes_distributed: int  # with DistributedOptimizer
    act_bytes: int  # with the layout's recompute choice
    act_bytes_by_recompute: dict = field(default_factory=dict)  # none / selective / full
    inflight_microbatches: int = 1
    loss_bytes: int = 0  # with the layout's loss choice (last stage only)
    loss_bytes_fused: int = 0
    loss_bytes_materialised: int = 0

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optim_bytes + self.act_bytes + self.loss_bytes


@dataclass
class Plan:
    """Result of ``plan_layout``: inputs, derived layout, per-stage memory, warnings."""

    model: ModelShape
    tp: int
    pp: int
    dp: int
    world_size: int
    virtual_pp: int | None
    seq_len: int
    micro_batch_size: int
    num_microbatches: int | None
    dtype: str
    distributed_optimizer: bool
    recompute: str
    sequence_parallel: bool
    fused_loss: bool
    attention: str
    vocab_divisible_by: int
    padded_vocab: int
    total_params: int
    stages: list[StageMemory]
    warnings: list[str] = field(default_factory=list)
    gpu_memory_gib: float | None = None
    label: str | None = None

    @property
    def worst_stage(self) -> StageMemory:
        return max(self.stages, key=lambda s: (s.total_bytes, -s.stage))

    @property
    def fits(self) -> bool | None:
        if self.gpu_memory_gib is None:
            return None
        return self.worst_stage.total_bytes <= self.gpu_memory_gib * GiB

    def to_dict(self) -> dict:
        worst = self.worst_stage

        def stage_dict(s: StageMemory) -> dict:
            d = dataclasses.asdict(s)
            d["total_bytes"] = s.total_bytes
            d["total_gib"] = s.total_bytes / GiB
            return d

        last = self.stages[-1]
        mem = {
            "parameters": worst.param_bytes, "gradients": worst.grad_bytes, "optimizer": worst.optim_bytes,
            "optimizer_distributed": worst.optim_bytes_distributed, "optimizer_plain": worst.optim_bytes_plain,
            "activations": worst.act_bytes,
            **{f"activations_{k}": v for k, v in worst.act_bytes_by_recompute.items()},
            "loss": worst.loss_bytes, "loss_fused_last_stage": last.loss_bytes_fused,
            "loss_materialised_last_stage": last.loss_bytes_materialised,
            "total": worst.total_bytes,
        }
        return {
            "label": self.label,
            "model": dataclasses.asdict(self.model),
            "layout": {"tp": self.tp, "pp": self.pp, "dp": self.dp, "world_size": self.world_size,
                       "virtual_pp": self.virtual_pp, "seq_len": self.seq_len,
                       "micro_batch_size": self.micro_batch_size, "num_microbatches": self.num_microbatches,
                       "dtype": self.dtype, "distributed_optimizer": self.distributed_optimizer,
                       "recompute": self.recompute, "sequence_parallel": self.sequence_parallel,
                       "fused_loss": self.fused_loss, "attention": self.attention,
                       "vocab_divisible_by": self.vocab_divisible_by},
            "total_params": self.total_params,
            "padded_vocab": self.padded_vocab,
            "worst_stage": worst.stage,
            "per_gpu": {
                "params": worst.params,
                "param_bytes": worst.param_bytes, "grad_bytes": worst.grad_bytes,
                "optim_bytes": worst.optim_bytes, "act_bytes": worst.act_bytes, "loss_bytes": worst.loss_bytes,
                "total_bytes": worst.total_bytes,
                "param_gib": worst.param_bytes / GiB, "grad_gib": worst.grad_bytes / GiB,
                "optim_gib": worst.optim_bytes / GiB, "act_gib": worst.act_bytes / GiB,
                "loss_gib": worst.loss_bytes / GiB, "total_gib": worst.total_bytes / GiB,
            },
            # The same worst-stage figures by plain names, in bytes and in GiB (2^30 bytes).
            "memory_bytes": mem,
            "memory_gib": {k: v / GiB for k, v in mem.items()},
            "stages": [stage_dict(s) for s in self.stages],
            "gpu_memory_gib": self.gpu_memory_gib,
            "fits": self.fits,
            "warnings": list(self.warnings),
        }

    def format_text(self) -> str:
        m = self.model
        w = self.worst_stage
        g = lambda b: f"{b / GiB:8.2f}"  # noqa: E731
        lines = []
        if self.label:
            lines.append(f"== {self.label}")
        lines.append(
            f"model     {m.model_type}: {self.total_params / 1e9:.3f}B params ({self.total_params:,}), "
            f"{m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_attention_heads}/{m.num_query_groups} "
            f"kv x {m.head_dim}, ffn {m.ffn_hidden_size}, vocab {m.vocab_size} -> padded {self.padded_vocab} "
            f"(+{self.padded_vocab - m.vocab_size} rows), "
            f"{'tied' if m.tie_word_embeddings else 'untied'} embeddings")
        vpp = f" vpp={self.virtual_pp}" if self.virtual_pp else ""
        nmb = self.num_microbatches if self.num_microbatches is not None else f">={self.pp} (assumed)"
        lines.append(
            f"layout    tp={self.tp} pp={self.pp}{vpp} dp={self.dp} world={self.world_size}  "
            f"seq={self.seq_len} mbs={self.micro_batch_size} microbatches={nmb}  {self.dtype}  "
            f"sp={'on' if self.sequence_parallel else 'off'} recompute={self.recompute} "
            f"dist-opt={'on' if self.distributed_optimizer else 'off'} "
            f"loss={'fused' if self.fused_loss else 'materialised'} attention={self.attention}")
        lines.append(f"per GPU, worst stage = stage {w.stage} of {self.pp} "
                     f"({w.layers} layers{', embedding' if w.has_embedding else ''}"
                     f"{', LM head' if w.has_lm_head else ''}; {w.params:,} params):   GiB (2^30 bytes)")
        rows = [
            (f"parameters ({self.dtype})", w.param_bytes, ""),
            ("gradients (fp32 main_grad)", w.grad_bytes, ""),
            (f"optimizer (Adam)  distributed, /dp={self.dp}", w.optim_bytes_distributed,
             "<- used" if self.distributed_optimizer else ""),
            ("                  plain", w.optim_bytes_plain, "" if self.distributed_optimizer else "<- used"),
        ]
        for mode in ("none", "selective", "full"):
            note = "<- used" if mode == self.recompute else ""
            if mode == "none":
                note += f"{'  ' if note else '       '}({w.inflight_microbatches} micro-batch(es) in flight)"
            rows.append((f"{'activations' if mode == 'none' else '':11s} recompute={mode}",
                         w.act_bytes_by_recompute[mode], note))
        last = self.stages[-1]
        rows.append((f"loss (stage {last.stage}): fused linear loss", last.loss_bytes_fused,
                     "<- used" if self.fused_loss else ""))
        rows.append((" " * len(f"loss (stage {last.stage}): ") + "materialised logits", last.loss_bytes_materialised,
                     ("       " if self.fused_loss else "<- used")
                     + f"  ([{self.micro_batch_size * self.seq_len}, {self.padded_vocab // self.tp}] x 10 B)"))
        rows.append(("total", w.total_bytes, ""))
        for lab, nbytes, note in rows:
            lines.append(f"  {lab:<40s}{g(nbytes)}  {note}".rstrip())
        if self.pp > 1:
            per = ", ".join(f"stage {s.stage}: {s.total_bytes / GiB:.2f}" for s in self.stages)
            lines.append(f"  by stage (GiB): {per}")
        if self.gpu_memory_gib is not None:
            head = self.gpu_memory_gib - w.total_bytes / GiB
            lines.append(f"  GPU memory {self.gpu_memory_gib:.0f} GiB: "
                         f"{'fits' if head >= 0 else 'DOES NOT FIT'} ({head:+.2f} GiB headroom, "
                         "before CUDA context and fragmentation)")
        for wmsg in self.warnings:
            lines.append(f"warning: {wmsg}")
        return "\n".join(lines)


def plan_layout(hf_config: dict, *, tp: int = 1, pp: int = 1, dp: int | None = None,
                world_size: int | None = None, seq_len: int, micro_batch_size: int = 1,
                num_microbatches: int | None = None, global_batch_size: int | None = None,
                dtype: Literal["bf16", "fp16", "fp32"] = "bf16", distributed_optimizer: bool = True,
                recompute: Literal["none", "selective", "full"] = "none", sequence_parallel: bool = False,
                vocab_divisible_by: int = 128, virtual_pp: int | None = None, fused_loss: bool = True,
                attention: Literal["flash", "unfused"] = "flash", gpu_memory_gib: float | None = None,
                label: str | None = None, where: str = "layout") -> Plan:
    """Check a layout against a model and count per-GPU memory (see the module docstring).

    ``dp`` defaults to ``world_size / (tp * pp)``, or 1 without ``world_size``.
    ``num_microbatches`` defaults to ``global_batch_size / (micro_batch_size * dp)`` when a
    global batch is given; otherwise the pipeline is assumed full (``>= pp`` in flight).
    Raises ``LayoutError`` naming the offending field and valid values.
    """
    m = model_shape(hf_config, where=f"{where}.model")
    if virtual_pp == 1:
        virtual_pp = None
    check_layout(m, tp=tp, pp=pp, vpp=virtual_pp, sequence_parallel=sequence_parallel, seq_len=seq_len,
                 vocab_divisible_by=vocab_divisible_by, where=where)
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise LayoutError(f"micro_batch_size must be a positive integer, got {micro_batch_size!r}",
                          where=f"{where}.micro_batch_size")
    if dtype not in DTYPE_BYTES:
        raise LayoutError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}", where=f"{where}.dtype")
    if recompute not in ("none", "selective", "full"):
        raise LayoutError(f"recompute {recompute!r} is not one of none, selective, full", where=f"{where}.recompute")
    if attention not in ("flash", "unfused"):
        raise LayoutError(f"attention {attention!r} is not one of flash, unfused", where=f"{where}.attention")

    model_par = tp * pp
    if world_size is not None:
        if world_size < 1 or world_size % model_par:
            ok = [model_par * k for k in range(1, 5)]
            raise LayoutError(f"world size {world_size} is not divisible by tp*pp = {tp}*{pp} = {model_par}",
                              where=f"{where}.world_size", fix=f"use a world size in {ok}, or change tp/pp")
        derived = world_size // model_par
        if dp is not None and dp != derived:
            raise LayoutError(f"dp={dp} disagrees with world_size/(tp*pp) = {world_size}/{model_par} = {derived}",
                              where=f"{where}.dp", fix="give only one of dp and world_size")
        dp = derived
    if dp is None:
        dp = 1
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise LayoutError(f"dp must be a positive integer, got {dp!r}", where=f"{where}.dp")
    world_size = dp * model_par

    if global_batch_size is not None:
        per_step = micro_batch_size * dp
        if global_batch_size % per_step:
            raise LayoutError(f"global batch {global_batch_size} is not divisible by micro_batch_size*dp = "
                              f"{micro_batch_size}*{dp} = {per_step}", where=f"{where}.global_batch_size",
                              fix=f"use a global batch that is a multiple of {per_step}")
        nmb = global_batch_size // per_step
        if num_microbatches is not None and num_microbatches != nmb:
            raise LayoutError(f"num_microbatches={num_microbatches} disagrees with global_batch_size/"
                              f"(micro_batch_size*dp) = {nmb}", where=f"{where}.num_microbatches")
        num_microbatches = nmb
    if num_microbatches is not None and num_microbatches < 1:
        raise LayoutError(f"num_microbatches must be >= 1, got {num_microbatches}", where=f"{where}.num_microbatches")
    if virtual_pp and num_microbatches is not None and num_microbatches % pp:
        raise LayoutError(f"interleaved pipelining needs num_microbatches ({num_microbatches}) divisible by "
                          f"pp={pp}", where=f"{where}.num_microbatches")

    warnings: list[str] = []
    if seq_len > m.max_position_embeddings:
        warnings.append(f"seq_len {seq_len} exceeds the model's max_position_embeddings "
                        f"{m.max_position_embeddings}")
    if num_microbatches is not None and pp > 1 and num_microbatches < pp:
        warnings.append(f"{num_microbatches} micro-batches for pp={pp}: the pipeline never fills "
                        f"(bubble {(pp - 1) / (num_microbatches + pp - 1):.0%}); use >= {4 * pp}")
    elif num_microbatches is not None and pp > 1:
        bubble = (pp - 1) / ((virtual_pp or 1) * num_microbatches + pp - 1)
        if bubble > 0.25:
            warnings.append(f"pipeline bubble {bubble:.0%} with {num_microbatches} micro-batches; "
                            "raise the global batch or lower pp")
    if distributed_optimizer and dp == 1:
        warnings.append("distributed optimizer with dp=1 shards nothing; the optimizer state is held whole")
    if tp > 8:
        warnings.append(f"tp={tp} spans more than one 8-GPU node: TP all-reduces would cross the network")

    vpad = padded_vocab(m.vocab_size, tp=tp, divisible_by=vocab_divisible_by)
    pbytes = DTYPE_BYTES[dtype]
    h, d, s, b = m.hidden_size, m.head_dim, seq_len, micro_batch_size
    nq, ffn = m.num_attention_heads, m.ffn_hidden_size
    q, kv = nq * d, m.num_query_groups * d
    t = tp
    # Parameters of one layer on one TP rank.
    layer_tp = (h * (q + 2 * kv) + q * h + 3 * h * ffn) // t + 2 * h
    if m.qk_layernorm:
        layer_tp += 2 * d
    if m.qkv_bias:
        layer_tp += (q + 2 * kv) // t
    emb_tp = vpad // t * h

    # Activation bytes per token per layer (see module docstring).
    rep = 8 * h / (t if sequence_parallel else 1)
    shard = (2 * (q + 2 * kv) + (2 * (q + kv) if m.qk_layernorm else 0) + 2 * q + 4 * nq
             + 4 * ffn + 2 * ffn) / t
    scores = 4 * nq * s / t if attention == "unfused" else 0.0
    per_tok = {"none": rep + shard + scores, "selective": rep + shard,
               "full_kept": 2 * h / (t if sequence_parallel else 1)}
    tokens = s * b
    layers_per_stage = m.num_layers // pp

    stages = []
    for st in range(pp):
        first, last = st == 0, st == pp - 1
        n = layers_per_stage * layer_tp
        if first:
            n += emb_tp
        if last:
            n += h  # final norm
            if not m.tie_word_embeddings or pp > 1:
                n += emb_tp  # output layer, or the tied embedding's copy on the last stage
        grads = 4 * n
        opt_per_param = 12 if pbytes == 2 else 8
        opt_plain = opt_per_param * n
        opt_dist = int(math.ceil(opt_plain / dp))
        # 1F1B: stage st keeps min(pp - st, M) micro-batches in flight.
        inflight = pp - st if num_microbatches is None else min(pp - st, num_microbatches)
        factor = 1.0
        if virtual_pp and pp > 1:
            factor = 1.0 + (pp - 1) / (pp * virtual_pp) if st == 0 else 1.0
        emb_out = 2 * h / (t if sequence_parallel else 1) if first else 0.0
        acts = {}
        for mode in ("none", "selective"):
            acts[mode] = int(tokens * (layers_per_stage * per_tok[mode] + emb_out) * inflight * factor)
        acts["full"] = int(tokens * (layers_per_stage * per_tok["full_kept"] + emb_out) * inflight * factor
                           + tokens * per_tok["selective"])  # one layer being recomputed
        loss_mat = tokens * (vpad // t) * 10 if last else 0
        chunk = min(tokens, max(1, FUSED_CHUNK_MIB * 2**20 // (4 * (vpad // t)))) * (vpad // t) * 4
        loss_fused = tokens * 8 + chunk if last else 0
        stages.append(StageMemory(
            stage=st, layers=layers_per_stage, has_embedding=first, has_lm_head=last, params=n,
            param_bytes=pbytes * n, grad_bytes=grads,
            optim_bytes=opt_dist if distributed_optimizer else opt_plain,
            optim_bytes_plain=opt_plain, optim_bytes_distributed=opt_dist,
            act_bytes=acts[recompute], act_bytes_by_recompute=acts, inflight_microbatches=inflight,
            loss_bytes=loss_fused if fused_loss else loss_mat,
            loss_bytes_fused=loss_fused, loss_bytes_materialised=loss_mat))

    plan = Plan(model=m, tp=tp, pp=pp, dp=dp, world_size=world_size, virtual_pp=virtual_pp, seq_len=seq_len,
                micro_batch_size=micro_batch_size, num_microbatches=num_microbatches, dtype=dtype,
                distributed_optimizer=distributed_optimizer, recompute=recompute,
                sequence_parallel=sequence_parallel, fused_loss=fused_loss, attention=attention,
                vocab_divisible_by=vocab_divisible_by, padded_vocab=vpad, total_params=m.total_params(),
                stages=stages, warnings=warnings, gpu_memory_gib=gpu_memory_gib, label=label)
    if gpu_memory_gib is not None and not plan.fits:
        warnings.append(f"stage {plan.worst_stage.stage} needs {plan.worst_stage.total_bytes / GiB:.1f} GiB, more "
                        f"than the {gpu_memory_gib:.0f} GiB GPU: try recompute=full, sequence_parallel, a larger "
                        "dp with the distributed optimizer, or a larger tp/pp")
    return plan
