"""One training step, one forward-only pass: Megatron schedules around an objective.

``StepEngine.train_step`` is the whole step of every job:

1. collate this DP rank's micro-batches of the step (all padded to the step's longest
   item under pipeline parallelism, whose p2p buffers need one shape per step);
2. Megatron's ``get_forward_backward_func()`` schedule: forward through this rank's
   stage, the objective's fused loss on the last stage, backward, gradient
   accumulation over micro-batches;
   after the last backward the schedule runs Megatron's ``finalize_model_grads`` (DP
   reduce, tied embeddings across stages, TP reduce of QK-norm grads);
3. ONE all-reduce of a small vector: the step's statistic sums, a non-finite count, the
   preemption flag and the main_grad scale-mismatch count, read on the host once (``tolist``). It comes before
   ``optimizer.step()``: a NaN/inf loss stops the job with a clear message and leaves the
   weights untouched;
4. Megatron's optimizer step at the step's learning rate (grad norm, clipping, Adam;
   the grad norm is its one host read, as in Megatron's own loop). A non-finite grad
   norm with a finite loss stops the job after it.

Loss scaling: the objective returns its micro-batch loss as a mean over the micro-batch's
items; the schedule divides by the number of micro-batches and DP averages, so the
gradient is that of the mean over the global batch (all micro-batches hold
``micro_batch_size`` items: ``data.make_plan`` guarantees it).

Packed batching (``packed=True``, ``train/packing.py``): one micro-batch is one packed
row ``[1, T]`` run in Megatron's THD layout (``PackedSeqParams`` from its ``cu_seqlens``),
and micro-batches hold different numbers of items. Megatron's schedule divides each
micro-batch's loss by ``num_microbatches`` (``calculate_per_token_loss`` is off) and DDP
scales gradients by ``1/dp`` before summing (``average_in_collective`` off: its
``gradient_scaling_factor``), so each micro-batch's loss is multiplied by
``units_mb * num_microbatches * dp / units_step`` where units are what the objective
averages over (``Objective.loss_units``: items, or target tokens for a token mean): the
gradient is then the mean over the step's global batch, whatever the packing. Statistic
sums are not scaled. On the last stage ``_loss_func`` gathers the packed hidden states
into the row-wise layout (``packing.unpack_rows``) so the objectives run unchanged.

Gradient-accumulation fusion (``grad_fusion=True``, ``train.gradient_accumulation_fusion``):
each micro-batch carries ``mb.fusion = {main_grad: True, grad_scale: loss_scale /
num_microbatches}``, the upstream gradient Megatron's schedule will give the fused loss.
The loss adds dW, already scaled, straight into the LM-head weight's fp32 ``main_grad``
during forward and returns no weight grad, so no ``[V, H]`` gradient tensor exists. Its
backward checks the scale on the device (``kernels.main_grad_mismatches``); the count
rides in step 3's vector, and a mismatch stops the job before the optimizer step.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch

from megatron_sz.errors import UserError
from megatron_sz.megatron import training as mt
from megatron_sz.train.data import Item, MicroBatch, collate, padded_length
from megatron_sz.train.packing import collate_packed, unpack_rows


class NonFiniteLoss(UserError):
    """The loss or gradient norm became NaN/inf; raised before the optimizer step."""


class GradScaleMismatch(UserError):
    """A fused loss's main_grad scale differed from the schedule's; raised before the step."""


@dataclass
class StepResult:
    stats: dict  # per-item means (and "items", "tokens")
    grad_norm: float | None
    preempt: bool
    seconds: float


class StepEngine:
    def __init__(self, *, chunks: list, objective: Any, optimizer: mt.TrainOptimizer | None,
                 info: mt.ParallelInfo, pad_id: int, pad_to_multiple_of: int, device: torch.device,
                 packed: bool = False, pack_length: int | None = None, grad_fusion: bool = False):
        from megatron_sz.megatron import forward_hidden, lm_head_weight

        self.chunks = chunks
        self.objective = objective
        self.optimizer = optimizer
        self.info = info
        self.pad_id = pad_id
        self.pad_mult = pad_to_multiple_of
        self.device = device
        self.packed = packed
        self.pack_length = pack_length
        self.grad_fusion = grad_fusion
        if packed and pack_length is None:
            raise ValueError("packed batching needs pack_length")
        self._forward_hidden = forward_hidden
        self._lm_head_weight = lm_head_weight
        self.fb = mt.get_forward_backward_func()

    # ------------------------------------------------------------------ batches
    def _collate(self, groups: list[list[Item]]) -> tuple[list[MicroBatch], int]:
        if not groups:
            return [], 0
        if self.packed:
            # Under pipeline parallelism every row is padded to the capacity (one p2p shape).
            cap = self.pack_length if self.info.pp > 1 else None
            mbs = [collate_packed(g, pad_id=self.pad_id, capacity=cap, pad_to_multiple_of=self.pad_mult).to(self.device)
                   for g in groups]
            return mbs, max(mb.input_ids.shape[1] for mb in mbs)
        seq_len = None
        if self.info.pp > 1:
            seq_len = padded_length(max(it.length for g in groups for it in g), self.pad_mult)
        mbs = [collate(g, pad_id=self.pad_id, seq_len=seq_len, pad_to_multiple_of=self.pad_mult).to(self.device)
               for g in groups]
        return mbs, max(mb.input_ids.shape[1] for mb in mbs)

    def _forward_step(self, fn: Callable, data_iterator, model):
        mb = next(data_iterator)
        ids = mb.input_ids if self.info.is_first_stage else None
        psp = None
        if mb.packed:
            from megatron_sz.megatron.attention import packed_seq_params

            psp = packed_seq_params(mb.cu_seqlens, mb.max_seqlen)
            psp.cu_seqlens_device = mb.cu_seqlens_device
        hidden = self._forward_hidden(model, ids, mb.position_ids, packed_seq_params=psp)
        if not self.info.is_last_stage:
            return hidden, None
        return hidden, partial(self._loss_func, fn, mb, model)

    def _loss_func(self, fn: Callable, mb: MicroBatch, model, output: torch.Tensor):
        hidden = output.transpose(0, 1)  # [s, b, h] -> [b, s, h]
        if mb.packed:  # [1, T, H] packed row -> [R, T_row, H] in collate's row-wise layout
            hidden = unpack_rows(hidden, mb.unpack_index)
        weight = self._lm_head_weight(model)
        return fn(hidden, weight, mb)

    def _run(self, fn: Callable, mbs: list[MicroBatch], seq_len: int, *, forward_only: bool) -> list[dict]:
        if not mbs:
            return []
        rows = mbs[0].input_ids.shape[0]
        return self.fb(forward_step_func=partial(self._forward_step, fn), data_iterator=iter(mbs),
                       model=self.chunks, num_microbatches=len(mbs), seq_length=seq_len,
                       micro_batch_size=rows, forward_only=forward_only)

    # ------------------------------------------------------------------ reductions
    def _reduce(self, per_mb: list[dict], keys: tuple[str, ...], extra: list[torch.Tensor]) -> list[float]:
        """Sum ``keys`` over micro-batches (reporting ranks only), append ``extra``, all-reduce
        over the world, and read it on the host: the one sync."""
        vals = [torch.zeros((), dtype=torch.float32, device=self.device) for _ in keys]
        if self.info.reports:
            for d in per_mb:
                for i, k in enumerate(keys):
                    v = d.get(k)
                    if v is not None:
                        vals[i] = vals[i] + torch.as_tensor(v, dtype=torch.float32, device=self.device).detach()
        vec = torch.stack(vals + [e.to(self.device, torch.float32).reshape(()) for e in extra])
        mt.all_reduce_sum(vec)
        return vec.tolist()

    # ------------------------------------------------------------------ public
    def _scale_packed(self, mbs: list[MicroBatch], groups: list[list[Item]], step_items: list[Item] | None) -> None:
        """Each packed micro-batch's loss factor (module docstring): its share of the step's
        loss units, times num_microbatches * dp (which the schedule and DDP divide by)."""
        if step_items is None:
            raise ValueError("packed train_step needs step_items (all items of the step, every DP rank's)")
        units = self.objective.loss_units
        total = sum(units(step_items))
        for mb, g in zip(mbs, groups):
            mb.loss_scale = (sum(units(g)) * len(mbs) * self.info.dp / total) if total > 0 else 0.0

    def train_step(self, groups: list[list[Item]], *, lr: float, preempt_requested: bool,
                   step_items: list[Item] | None = None) -> StepResult:
        """``step_items``: every item of the step (all DP ranks'), needed by packed batching."""
        t0 = time.perf_counter()
        opt = self.optimizer
        for c in self.chunks:
            c.train()
        opt.zero_grad()
        mbs, seq_len = self._collate(groups)
        n_items = sum(mb.num_items for mb in mbs)
        n_tokens = sum(mb.num_tokens for mb in mbs)
        if self.packed:
            self._scale_packed(mbs, groups, step_items)
        mismatches = None
        if self.grad_fusion:
            # Gradient-accumulation fusion: the fused loss adds dW to main_grad in forward,
            # already multiplied by the upstream gradient backward will bring: Megatron's
            # schedule divides each micro-batch's loss by num_microbatches (no context
            # parallelism here) and we multiply by the packing factor.
            from megatron_sz.kernels import main_grad_mismatches

            mismatches = main_grad_mismatches(self.device)
            mismatches.zero_()
            for mb in mbs:  # (a row with no loss units has factor 0: nothing to fuse there)
                mb.fusion = {"main_grad": True, "grad_scale": mb.loss_scale / len(mbs)} if mb.loss_scale > 0 else {}

        def fn(hidden, weight, mb):
            loss, stats = self.objective.train_loss(hidden, weight, mb)
            stats = dict(stats)
            stats["nonfinite"] = (~torch.isfinite(loss.detach())).float()
            if mb.loss_scale != 1.0:
                loss = loss * mb.loss_scale
            return loss, stats

        # The schedule ran Megatron's finalize_model_grads after the last backward.
        per_mb = self._run(fn, mbs, seq_len, forward_only=False)
        keys = tuple(self.objective.train_keys) + ("nonfinite",)
        items_t = torch.tensor(float(n_items if (self.info.tp_rank == 0 and self.info.is_last_stage) else 0))
        tokens_t = torch.tensor(float(n_tokens if (self.info.tp_rank == 0 and self.info.is_last_stage) else 0))
        flag = torch.tensor(1.0 if preempt_requested else 0.0)
        bad_scale = mismatches.float() if mismatches is not None else torch.zeros(())
        out = self._reduce(per_mb, keys, [items_t, tokens_t, flag, bad_scale])
        n = len(keys)
        sums = dict(zip(keys, out[:n]))
        items, tokens, flag_v, bad_scale_v = out[n:]
        bad_loss = sums.pop("nonfinite")
        if bad_loss > 0:
            raise NonFiniteLoss(
                "non-finite loss at this step; the optimizer "
                f"step was NOT applied (weights are those of the last good step)",
                fix="lower the learning rate, check the data for empty completions, or resume from "
                    "the last checkpoint with a smaller lr / stronger clip_grad")
        if bad_scale_v > 0:
            raise GradScaleMismatch(
                "the fused LM-head loss added its gradient to main_grad at a scale the schedule did "
                "not use, so this step's gradient is wrong; the optimizer step was NOT applied",
                fix="set train.gradient_accumulation_fusion: false in the recipe and report this "
                    "(Megatron schedule options such as calculate_per_token_loss change the scale)")
        stats = {k: v / max(items, 1.0) for k, v in sums.items()}
        stats.update(items=int(items), tokens=int(tokens))
        grad_norm = opt.step(lr)
        if grad_norm is not None and not math.isfinite(grad_norm):
            # Megatron computed the norm inside step(); a NaN/inf grad norm with a finite
            # loss means the update was skipped (fp16) or is garbage: stop either way.
            raise NonFiniteLoss(
                f"non-finite gradient norm ({grad_norm}) at this step with a finite loss",
                fix="lower the learning rate or resume from the last checkpoint with a smaller lr / "
                    "stronger clip_grad")
        grad_norm = None if grad_norm is None else float(grad_norm)
        return StepResult(stats=stats, grad_norm=grad_norm, preempt=flag_v > 0,
                          seconds=time.perf_counter() - t0)

    @torch.no_grad()
    def forward_only(self, groups: list[list[Item]], fn: Callable, keys: tuple[str, ...]) -> dict:
        """Run ``fn(hidden, weight, mb) -> dict of sums`` on every micro-batch; world-reduced sums."""
        for c in self.chunks:
            c.eval()
        mbs, seq_len = self._collate(groups)

        def wrapped(hidden, weight, mb):
            d = fn(hidden, weight, mb)
            return torch.zeros((), device=hidden.device), d

        per_mb = self._run(wrapped, mbs, seq_len, forward_only=True)
        out = self._reduce(per_mb, keys, [])
        return dict(zip(keys, out))

    @torch.no_grad()
    def forward_collect(self, groups: list[list[Item]], fn: Callable) -> list[tuple[MicroBatch, Any]]:
        """Run ``fn`` per micro-batch; return (micro-batch, fn output) on reporting ranks."""
        for c in self.chunks:
            c.eval()
        mbs, seq_len = self._collate(groups)
        order: list[MicroBatch] = []

        def wrapped(hidden, weight, mb):
            order.append(mb)
            return torch.zeros((), device=hidden.device), {"out": fn(hidden, weight, mb)}

        per_mb = self._run(wrapped, mbs, seq_len, forward_only=True)
        return [(mb, d["out"]) for mb, d in zip(order, per_mb)]
