"""Training-side Megatron-Core wrappers: schedules, parallel groups, DDP and the optimizer.

The training jobs (``megatron_sz.train``) call only these functions, never Megatron.

Two optimizer paths behind one small interface (``TrainOptimizer``):

* **GPU**: Megatron's ``DistributedDataParallel`` (contiguous fp32 grad buffers) plus
  ``get_megatron_optimizer``: the DistributedOptimizer (optimizer state sharded over
  DP) when the recipe asks for it, bf16 params with fp32 master weights, Megatron's
  grad clipping and ``finalize_model_grads`` (DP reduce, tied-embedding reduce across
  the first/last pipeline stage, sequence-parallel norm grads), run by the schedule.
* **CPU** (gloo): Megatron's DDP, optimizer and grad-norm code allocate on ``"cuda"``
  and use CUDA streams, so the CPU path keeps plain fp32 modules and ``torch.optim.AdamW``
  and does the same three reductions itself (``_finalize_grads_cpu``) and the same
  TP/PP-aware grad norm (duplicates across TP and the shared embedding copy counted
  once). Same parameter groups as Megatron (no weight decay on biases and norms).

Neither path syncs the host inside the step: the grad norm and clip coefficient stay
tensors on CPU; Megatron's GPU optimizer syncs once in ``step()`` as it always does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


def get_forward_backward_func() -> Callable:
    """Megatron's schedule for the current layout (no pipelining / 1F1B / interleaved)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func as _get

    return _get()


def model_config(chunk: Any) -> Any:
    from megatron.core.utils import get_model_config

    return get_model_config(chunk)


@dataclass
class ParallelInfo:
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    is_first_stage: bool
    is_last_stage: bool
    tp_group: Any
    dp_group: Any
    world_rank: int
    world_size: int

    @property
    def reports(self) -> bool:
        """This rank contributes to reduced step metrics (last stage, TP rank 0)."""
        return self.is_last_stage and self.tp_rank == 0


def parallel_info() -> ParallelInfo:
    import torch.distributed as tdist
    from megatron.core import parallel_state as ps

    return ParallelInfo(
        tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
        is_first_stage=ps.is_pipeline_first_stage(ignore_virtual=True),
        is_last_stage=ps.is_pipeline_last_stage(ignore_virtual=True),
        tp_group=ps.get_tensor_model_parallel_group(), dp_group=ps.get_data_parallel_group(),
        world_rank=tdist.get_rank(), world_size=tdist.get_world_size())


def _no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    return name.endswith(".bias") or param.dim() == 1


def _unwrap(chunk: Any) -> Any:
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


class TrainOptimizer:
    """zero_grad -> (schedule) -> finalize_grads -> grad_norm -> step(lr)."""

    chunks: list
    uses_megatron_optimizer: bool = False

    def zero_grad(self) -> None: ...
    def finalize_grads(self) -> None: ...
    def clip_and_norm(self) -> torch.Tensor | None: ...
    def step(self, lr: float) -> float | None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...

    @property
    def checkpointable(self) -> Any:
        """What the adapter's save/load_checkpoint takes as ``optimizer`` (None: saved here)."""
        return None


class CpuOptimizer(TrainOptimizer):
    def __init__(self, chunks: list, *, optim: Any):
        from megatron.core import parallel_state as ps

        self.chunks = chunks
        self.clip_grad = float(optim.clip_grad)
        decay, no_decay, seen = [], [], set()
        self.params: list[torch.nn.Parameter] = []
        # Replicated across TP but fed by rank-local activations, so their grads must be
        # summed over TP (Megatron's finalize_model_grads does the same): QK-norm weights
        # (applied per local head) and sequence-parallel norms; averaged when flagged.
        self.tp_sum: list[torch.nn.Parameter] = []
        self.tp_avg: list[torch.nn.Parameter] = []
        for chunk in chunks:
            cfg = model_config(chunk)
            for name, p in chunk.named_parameters():
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                self.params.append(p)
                (no_decay if _no_weight_decay(name, p) else decay).append(p)
                if getattr(p, "average_gradients_across_tp_domain", False):
                    self.tp_avg.append(p)
                elif (cfg.sequence_parallel and getattr(p, "sequence_parallel", False)) or (
                        cfg.qk_layernorm and ("q_layernorm" in name or "k_layernorm" in name)):
                    self.tp_sum.append(p)
        groups = [g for g in ({"params": decay, "weight_decay": optim.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        # foreach=False: one deterministic per-parameter update, identical across runs.
        self.opt = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.adam_beta1, optim.adam_beta2),
                                     eps=optim.adam_eps, foreach=False)
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.dp_group = ps.get_data_parallel_group()
        self.dp = ps.get_data_parallel_world_size()
        self.mp_group = ps.get_model_parallel_group()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.tp_group = ps.get_tensor_model_parallel_group()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _grads(self) -> list[torch.Tensor]:
        out = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            out.append(p.grad)
        return out

    def finalize_grads(self) -> None:
        import torch.distributed as tdist
        from megatron.core import parallel_state as ps
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = self._grads()
        if self.dp > 1:  # average over data-parallel replicas, one flat buffer
            flat = _flatten_dense_tensors(grads)
            tdist.all_reduce(flat, group=self.dp_group)
            flat.div_(self.dp)
            for g, new in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(new)
        if self.pp > 1 and ps.is_rank_in_embedding_group(ignore_virtual=True):
            # Tied embedding: the first stage's input embedding and the last stage's
            # output-layer copy are one parameter; sum their grads.
            for chunk in self.chunks:
                gpt = _unwrap(chunk)
                if not getattr(gpt, "share_embeddings_and_output_weights", False):
                    continue
                if not (gpt.pre_process or gpt.post_process):
                    continue
                w = gpt.shared_embedding_or_output_weight()
                if w is not None and w.grad is not None:
                    tdist.all_reduce(w.grad, group=ps.get_embedding_group())
        if ps.get_tensor_model_parallel_world_size() > 1:
            for params, scale in ((self.tp_sum, 1.0), (self.tp_avg, 1.0 / ps.get_tensor_model_parallel_world_size())):
                gs = [p.grad for p in params]
                if not gs:
                    continue
                flat = _flatten_dense_tensors(gs)
                tdist.all_reduce(flat, group=self.tp_group)
                flat.mul_(scale)
                for g, new in zip(gs, _unflatten_dense_tensors(flat, gs)):
                    g.copy_(new)

    def clip_and_norm(self) -> torch.Tensor:
        import torch.distributed as tdist

        sq = torch.zeros((), dtype=torch.float32)
        for p in self.params:
            if getattr(p, "shared", False):  # the last stage's copy of a tied embedding
                continue
            if not getattr(p, "tensor_model_parallel", False) and self.tp_rank != 0:
                continue  # replicated across TP: count once
            sq = sq + p.grad.detach().float().pow(2).sum()
        if tdist.get_world_size(self.mp_group) > 1:
            tdist.all_reduce(sq, group=self.mp_group)
        norm = sq.sqrt()
        if self.clip_grad > 0:
            coef = torch.clamp(self.clip_grad / (norm + 1e-6), max=1.0)
            for p in self.params:
                p.grad.mul_(coef)
        return norm

    def step(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        return None

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)


class MegatronOptimizer(TrainOptimizer):
    uses_megatron_optimizer = True

    def __init__(self, chunks: list, *, optim: Any, params_dtype: torch.dtype,
                 use_distributed_optimizer: bool):
        from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                               finalize_model_grads)
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False,
            use_distributed_optimizer=use_distributed_optimizer, check_for_nan_in_grad=False)
        self.chunks = [DistributedDataParallel(config=model_config(c), ddp_config=ddp_config, module=c)
                       for c in chunks]
        for wrapped, c in zip(self.chunks, chunks):
            for attr in ("hf_config", "arch", "true_vocab_size", "padded_vocab_size"):
                if hasattr(c, attr):
                    setattr(wrapped, attr, getattr(c, attr))
        opt_config = OptimizerConfig(
            optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad, bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16, params_dtype=params_dtype,
            use_distributed_optimizer=use_distributed_optimizer)
        self.opt = get_megatron_optimizer(opt_config, self.chunks)
        cfg = model_config(self.chunks[0])
        cfg.no_sync_func = self.chunks[0].no_sync if len(self.chunks) == 1 else [c.no_sync for c in self.chunks]
        cfg.finalize_model_grads_func = finalize_model_grads
        if params_dtype == torch.float16:
            cfg.grad_scale_func = self.opt.scale_loss

    def zero_grad(self) -> None:
        for c in self.chunks:
            c.zero_grad_buffer()
        self.opt.zero_grad()

    def finalize_grads(self) -> None:
        pass  # the schedule calls finalize_model_grads

    def clip_and_norm(self) -> None:
        return None  # inside Megatron's optimizer.step()

    def step(self, lr: float) -> float | None:
        for g in self.opt.param_groups:
            g["lr"] = lr
        ok, grad_norm, _ = self.opt.step()
        return grad_norm

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    @property
    def checkpointable(self) -> Any:
        return self.opt


def ensure_tp_attributes(chunks: list) -> int:
    """Mark tensor-parallel shards that lack ``tensor_model_parallel`` (returns how many).

    Megatron sets the attribute only inside its weight *initialisation*; a model built
    with ``perform_initialization=False`` (weights loaded from HF next) has none, and every
    TP-aware reduction (grad norm, duplicate detection) would then count a shard as a
    replicated tensor. Column-parallel weights/biases and vocab-parallel embeddings are
    split on dim 0, row-parallel weights on dim 1 (their bias is replicated).
    """
    from megatron.core import tensor_parallel as tpl

    n = 0
    for chunk in chunks:
        for mod in chunk.modules():
            if isinstance(mod, (tpl.ColumnParallelLinear, tpl.VocabParallelEmbedding)):
                targets = [(getattr(mod, "weight", None), 0), (getattr(mod, "bias", None), 0)]
            elif isinstance(mod, tpl.RowParallelLinear):
                targets = [(getattr(mod, "weight", None), 1)]
            else:
                continue
            for p, dim in targets:
                if isinstance(p, torch.nn.Parameter) and not hasattr(p, "tensor_model_parallel"):
                    tpl.set_tensor_model_parallel_attributes(p, is_parallel=True, dim=dim, stride=1)
                    n += 1
    return n


def make_optimizer(chunks: list, *, optim: Any, params_dtype: torch.dtype,
                   use_distributed_optimizer: bool = True) -> TrainOptimizer:
    """The optimizer for this host: Megatron's (DDP-wrapping ``chunks``) on GPU, AdamW on CPU.

    Use ``returned.chunks`` as the model from here on (they may be DDP-wrapped).
    """
    ensure_tp_attributes(chunks)
    if torch.cuda.is_available():
        return MegatronOptimizer(chunks, optim=optim, params_dtype=params_dtype,
                                 use_distributed_optimizer=use_distributed_optimizer)
    return CpuOptimizer(chunks, optim=optim)


def all_reduce_sum(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    import torch.distributed as tdist

    if tdist.is_initialized() and tdist.get_world_size(group) > 1:
        tdist.all_reduce(t, group=group)
    return t


def barrier() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()
