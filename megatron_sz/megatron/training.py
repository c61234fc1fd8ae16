"""Training-side Megatron-Core wrappers: schedules, parallel groups, DDP and the optimizer.

The training jobs (``megatron_sz.train``) call only these functions, never Megatron.

One optimizer path on every host (``TrainOptimizer``): Megatron's
``DistributedDataParallel`` (contiguous fp32 grad buffers) plus ``get_megatron_optimizer``
(the DistributedOptimizer, state sharded over DP, when the recipe asks for it; bf16
params with fp32 master weights when the model is bf16), Megatron's grad clipping, and
``finalize_model_grads`` run by the schedule after backward. On CPU the same code runs
in fp32 over gloo through the adapter's CPU shim (``cpu_shim.py``), so the CPU tests
exercise exactly the GPU training path.

Host syncs: the step's metric vector is read once by the trainer; Megatron's
``optimizer.step()`` reads the grad norm once (``get_grad_norm_fp32``), as in Megatron's
own training loop.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

# Megatron's DistributedOptimizer reads ``.grad`` of its shard views in ``zero_grad`` and
# calls the c10d collectives torch 2.13 renamed: harmless, but printed every step, they
# would bury the per-step progress lines users read.
warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf")
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")


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


class TrainOptimizer:
    """Megatron's ``DistributedDataParallel`` + ``get_megatron_optimizer`` around the chunks.

    One object per job: ``zero_grad`` -> (schedule: forward/backward, then
    ``finalize_model_grads``) -> ``step(lr)`` (grad norm, clipping, Adam, param gather).
    ``chunks`` are the DDP-wrapped model chunks; ``opt`` is what the adapter's
    ``save_checkpoint/load_checkpoint`` take as ``optimizer`` (sharded, reshardable state).
    """

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
        self.weight_decay = float(optim.weight_decay)
        # What Megatron's pretrain() wires into the model config: the schedule then runs
        # finalize_model_grads (DP reduce(-scatter), tied-embedding reduce across the first/
        # last stage, TP reduce of QK-norm / sequence-parallel norm grads) after backward.
        cfg = model_config(self.chunks[0])
        cfg.no_sync_func = self.chunks[0].no_sync if len(self.chunks) == 1 else [c.no_sync for c in self.chunks]
        cfg.finalize_model_grads_func = finalize_model_grads
        if params_dtype == torch.float16:
            cfg.grad_scale_func = self.opt.scale_loss

    def zero_grad(self) -> None:
        for c in self.chunks:
            c.zero_grad_buffer()
        self.opt.zero_grad()

    def step(self, lr: float) -> float | None:
        """Megatron's optimizer step at ``lr``; returns its (pre-clipping) grad norm.

        Sets each group's lr and weight decay the way Megatron's ``OptimizerParamScheduler``
        does (``* lr_mult`` / ``* wd_mult``: biases and norms have ``wd_mult=0``).
        """
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
            g["weight_decay"] = self.weight_decay * g.get("wd_mult", 1.0)
        ok, grad_norm, _ = self.opt.step()
        return grad_norm

    @property
    def checkpointable(self) -> Any:
        """The Megatron optimizer, as the adapter's save/load_checkpoint take it."""
        return self.opt


def make_optimizer(chunks: list, *, optim: Any, params_dtype: torch.dtype,
                   use_distributed_optimizer: bool = True) -> TrainOptimizer:
    """Megatron's DDP + optimizer on every host (CPU via the adapter's CPU shim).

    Use ``returned.chunks`` as the model from here on (they are DDP-wrapped).
    """
    return TrainOptimizer(chunks, optim=optim, params_dtype=params_dtype,
                          use_distributed_optimizer=use_distributed_optimizer)


def all_reduce_sum(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    import torch.distributed as tdist

    if tdist.is_initialized() and tdist.get_world_size(group) > 1:
        tdist.all_reduce(t, group=group)
    return t


def barrier() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()
