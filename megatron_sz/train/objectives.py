"""The training objectives, on the fused vocab-parallel LM-head kernels.

An objective turns the last pipeline stage's final hidden states ``[B_rows, T, H]`` and
this rank's LM-head vocab shard into (a) the training loss of one micro-batch and (b)
*sums* of the statistics to log (divided by ``items`` after the step's reduction, so
micro-batches and data-parallel ranks of any size combine exactly).

* ``SFTObjective``   -- NLL on reference solutions (``fused_linear_wsft_loss`` with unit weights).
* ``WSFTObjective``  -- generator weighted SFT (per-example weights U(s), folded into the
  kernel's dlogits; a weight-0 example contributes exactly zero gradient).
* ``DPOObjective``   -- online DPO (``fused_linear_dpo_loss``); rows [0, B) chosen,
  [B, 2B) rejected; reference log-probs come from a table precomputed once per round.
* ``PGObjective``    -- PPO-clipped policy gradient (``fused_linear_pg_loss``) on scored
  rollouts; old (behaviour) log-probs per token from a table computed at stage start.

Every fused call passes ``**mb.fusion``: in training the step engine sets it to
``main_grad=True, grad_scale=...`` (gradient-accumulation fusion: dW goes straight into the
LM-head weight's fp32 ``main_grad``), elsewhere it is empty.

Which job uses which objective is ``jobs.JOBS``'s to say (``JobSpec.objective``); the job
builds it with ``Objective.for_job(train_spec, ref_logps=..., tp_group=..., vocab_size=...)``.

``gaussian_weight`` is the generator's weight U(s) = exp(-(s - mu)^2 / (2 sigma^2)).
"""
from __future__ import annotations

from typing import Any

import torch

from megatron_sz.pairs import gaussian_weight  # noqa: F401  (the one implementation)
from megatron_sz.train.data import IGNORE


def _kernels():
    from megatron_sz import kernels

    return kernels


def sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   tp_group: Any, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs per row ``[R]`` and target counts ``[R]``."""
    R, T, H = hidden.shape
    lp = _kernels().linear_logprobs(hidden.reshape(R * T, H), weight, labels.reshape(R * T),
                                    ignore_index=IGNORE, tp_group=tp_group, vocab_size=vocab_size)
    lp = lp.reshape(R, T)
    return lp.sum(dim=1), (labels != IGNORE).sum(dim=1)


class Objective:
    rows_per_item: int = 1
    train_keys: tuple[str, ...] = ("loss",)
    eval_keys: tuple[str, ...] = ()

    def __init__(self, *, tp_group: Any, vocab_size: int):
        self.tp_group = tp_group
        self.vocab_size = vocab_size

    @classmethod
    def for_job(cls, spec: Any, *, ref_logps: torch.Tensor | None, tp_group: Any, vocab_size: int) -> "Objective":
        """This objective for a job's recipe train section (``ref_logps``: the reference table, when
        the job's ``JobSpec.reference`` asked for one, else None)."""
        return cls(tp_group=tp_group, vocab_size=vocab_size)

    def train_loss(self, hidden: torch.Tensor, weight: torch.Tensor, mb: Any) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def loss_units(self, items: list) -> list[float]:
        """What ``train_loss`` averages over, per item: 1 per item (the loss is a mean over the
        micro-batch's items), or its target tokens for a token mean. Packed micro-batches hold
        different amounts of it; the step engine weights each micro-batch's loss by its share
        of the global batch's units, so the step's gradient is the global-batch mean."""
        return [1.0] * len(items)

    def eval_stats(self, hidden: torch.Tensor, weight: torch.Tensor, mb: Any) -> dict:
        """NLL per target token on held-out data (SFT and WSFT; unweighted)."""
        logp, n = sequence_logps(hidden, weight, mb.labels, tp_group=self.tp_group, vocab_size=self.vocab_size)
        return {"nll": -logp.sum(), "tokens": n.sum().float()}


class SFTObjective(Objective):
    eval_keys = ("nll", "tokens")

    def __init__(self, *, normalization: str = "token", **kw):
        super().__init__(**kw)
        self.normalization = normalization

    @classmethod
    def for_job(cls, spec, *, ref_logps, tp_group, vocab_size):
        return cls(normalization=spec.normalization, tp_group=tp_group, vocab_size=vocab_size)

    def loss_units(self, items):
        if self.normalization == "token":  # Σ w·nll / (the micro-batch's target tokens)
            return [float(sum(s.num_targets for s in it.seqs)) for it in items]
        return [1.0] * len(items)

    def train_loss(self, hidden, weight, mb):
        loss = _kernels().fused_linear_wsft_loss(
            hidden, weight, mb.labels, torch.ones_like(mb.weights), normalization=self.normalization,
            ignore_index=IGNORE, tp_group=self.tp_group, vocab_size=self.vocab_size, **mb.fusion)
        return loss, {"loss": loss.detach() * mb.num_items}


class WSFTObjective(SFTObjective):

    def train_loss(self, hidden, weight, mb):
        loss = _kernels().fused_linear_wsft_loss(
            hidden, weight, mb.labels, mb.weights.to(hidden.device), normalization=self.normalization,
            ignore_index=IGNORE, tp_group=self.tp_group, vocab_size=self.vocab_size, **mb.fusion)
        return loss, {"loss": loss.detach() * mb.num_items, "weight": mb.weights.sum()}

    train_keys = ("loss", "weight")


def _metric_mean(metrics: dict, *names: str) -> torch.Tensor | None:
    for n in names:
        v = metrics.get(n)
        if v is not None:
            v = torch.as_tensor(v)
            return v.detach().float().mean()
    return None


class DPOObjective(Objective):
    rows_per_item = 2
    train_keys = ("loss", "margin", "accuracy", "chosen_reward", "rejected_reward")
    eval_keys = ("margin", "accuracy", "chosen_logp", "rejected_logp")

    def __init__(self, *, spec: Any, ref_logps: torch.Tensor | None, **kw):
        super().__init__(**kw)
        self.spec = spec
        self.ref = ref_logps  # [N_items, 2] (chosen, rejected), or None when reference-free

    @classmethod
    def for_job(cls, spec, *, ref_logps, tp_group, vocab_size):
        return cls(spec=spec, ref_logps=ref_logps, tp_group=tp_group, vocab_size=vocab_size)

    # The reference table (jobs._reference_logps): its width and one micro-batch's rows.
    @staticmethod
    def reference_width(items: list) -> int:
        return 2

    @staticmethod
    def reference_rows(hidden, weight, mb, *, spec: Any, tp_group: Any, vocab_size: int) -> torch.Tensor:
        return reference_rows(hidden, weight, mb, tp_group=tp_group, vocab_size=vocab_size)

    def _ref(self, mb) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.spec.reference_free or self.spec.loss_type == "simpo" or self.ref is None:
            return None, None
        r = self.ref.index_select(0, mb.item_index.to(self.ref.device))
        return r[:, 0], r[:, 1]

    def train_loss(self, hidden, weight, mb):
        rc, rr = self._ref(mb)
        s = self.spec
        loss, metrics = _kernels().fused_linear_dpo_loss(
            hidden, weight, mb.labels, ref_chosen_logps=rc, ref_rejected_logps=rr, beta=s.beta,
            loss_type=s.loss_type, label_smoothing=s.label_smoothing, nll_alpha=s.nll_alpha,
            reference_free=s.reference_free, simpo_gamma=s.simpo_gamma, ignore_index=IGNORE,
            tp_group=self.tp_group, vocab_size=self.vocab_size, **mb.fusion)
        B = mb.num_items
        stats = {"loss": loss.detach() * B}
        for key, names in (("margin", ("reward_margins", "margins", "margin", "reward_margin")),
                           ("accuracy", ("reward_accuracies", "accuracy", "accuracies", "reward_accuracy")),
                           ("chosen_reward", ("chosen_rewards", "chosen_reward", "rewards_chosen")),
                           ("rejected_reward", ("rejected_rewards", "rejected_reward", "rewards_rejected"))):
            v = _metric_mean(metrics or {}, *names)
            stats[key] = (v * B) if v is not None else torch.zeros((), device=loss.device)
        return loss, stats

    def eval_stats(self, hidden, weight, mb):
        logp, _ = sequence_logps(hidden, weight, mb.labels, tp_group=self.tp_group, vocab_size=self.vocab_size)
        B = mb.num_items
        pc, pr = logp[:B], logp[B:]
        rc, rr = self._ref(mb)
        if rc is None:
            rc = torch.zeros_like(pc)
            rr = torch.zeros_like(pr)
        margin = self.spec.beta * ((pc - rc) - (pr - rr))
        return {"margin": margin.sum(), "accuracy": (margin > 0).float().sum(),
                "chosen_logp": pc.sum(), "rejected_logp": pr.sum()}


def reference_rows(hidden, weight, mb, *, tp_group: Any, vocab_size: int) -> torch.Tensor:
    """Summed log-probs of each pair's (chosen, rejected): ``[B, 2]``."""
    logp, _ = sequence_logps(hidden, weight, mb.labels, tp_group=tp_group, vocab_size=vocab_size)
    B = mb.num_items
    return torch.stack([logp[:B], logp[B:]], dim=1)


# --------------------------------------------------------------------------- policy gradient

PG_METRICS = ("reward", "advantage", "entropy", "approx_kl", "ratio", "clipfrac_low", "clipfrac_high",
              "clipfrac_dual", "kl_ref", "masked_share")


def _fit_positions(t: torch.Tensor, T: int) -> torch.Tensor:
    """[B, W] -> [B, T]: cut or zero-pad positions (positions past an item are IGNORE)."""
    W = t.shape[1]
    return t[:, :T] if W >= T else torch.nn.functional.pad(t, (0, T - W))


class PGObjective(Objective):
    """PPO-clipped policy gradient (``fused_linear_pg_loss``) on scored rollouts (``train/pg.py``):
    advantage = ``mb.weights``; ``mb.extras``: reward, clip_high, loss_mask (and old_logps with
    ``old_logps: data``). The table is the start-of-stage per-position log-probs [N_items, W]:
    the behaviour policy (``old_logps: recompute``) and the KL reference."""

    train_keys = ("loss",) + PG_METRICS
    eval_keys = ("nll", "tokens")

    def __init__(self, *, spec: Any, table: torch.Tensor | None, **kw):
        super().__init__(**kw)
        self.spec = spec
        self.table = table

    @classmethod
    def for_job(cls, spec, *, ref_logps, tp_group, vocab_size):
        return cls(spec=spec, table=ref_logps, tp_group=tp_group, vocab_size=vocab_size)

    @staticmethod
    def reference_width(items: list) -> int:
        return max(it.length for it in items)

    def loss_units(self, items):
        if self.spec.aggregation == "token-mean":  # Σ mask·ℓ / (the micro-batch's masked targets)
            return [float(sum(m for m, y in zip(it.extras["loss_mask"], it.seqs[0].labels) if y != IGNORE))
                    for it in items]
        return [1.0] * len(items)

    @staticmethod
    def reference_rows(hidden, weight, mb, *, spec: Any, tp_group: Any, vocab_size: int) -> torch.Tensor:
        """Per-position log-probs [R, T] of the labels (0 where ignored), at the rollouts'
        sampling temperature."""
        R, T, H = hidden.shape
        lp = _kernels().linear_logprobs(hidden.reshape(R * T, H), weight, mb.labels.reshape(R * T),
                                        ignore_index=IGNORE, tp_group=tp_group, vocab_size=vocab_size,
                                        temperature=spec.temperature)
        return lp.reshape(R, T)

    def train_loss(self, hidden, weight, mb):
        s = self.spec
        dev = hidden.device
        start = None
        if self.table is not None:
            rows = self.table.index_select(0, mb.item_index.to(self.table.device))
            start = _fit_positions(rows, mb.labels.shape[1]).to(dev)
        old = mb.extras["old_logps"].to(dev) if s.old_logps == "data" else start
        loss, m = _kernels().fused_linear_pg_loss(
            hidden, weight, mb.labels, old_logps=old, advantages=mb.weights.to(dev),
            loss_mask=mb.extras["loss_mask"].to(dev), clip_low=s.clip_low,
            clip_high=mb.extras["clip_high"].to(dev), clip_c=s.clip_c,
            ref_logps=start if s.kl_coef > 0 else None, kl_coef=s.kl_coef, kl_estimator=s.kl_estimator,
            entropy_coef=s.entropy_coef, aggregation=s.aggregation, norm_constant=s.norm_constant,
            temperature=s.temperature, ignore_index=IGNORE, tp_group=self.tp_group, vocab_size=self.vocab_size,
            **mb.fusion)
        B = mb.num_items
        stats = {"loss": loss.detach() * B, "reward": mb.extras["reward"].sum(), "advantage": mb.weights.sum()}
        for k in PG_METRICS[2:]:
            stats[k] = m[k] * B
        return loss, stats
