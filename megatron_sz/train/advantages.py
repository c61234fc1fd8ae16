"""Advantage estimators for the policy-gradient job (plain PyTorch, per sequence).

Every estimator maps one batch of scored rollouts (one scalar reward per completion) to
one advantage per completion; the fused loss broadcasts it over the completion's tokens.
Statistics are over the batch given (the job passes a whole stage's rollouts, so they
do not depend on how mini-batches are cut). ``eps`` keeps a zero-variance group finite;
such a group (all rewards equal) gets advantage 0: it carries no relative signal.
Standard deviations are unbiased (torch.std), as in TRL and veRL; a key with a single
member has advantage 0 (no baseline can be estimated from itself).

* ``grpo``          A_i = (r_i - mean_g(r)) / (std_g(r) + eps), g = the prompt's group
* ``grpo-no-std``   A_i = r_i - mean_g(r)  (Dr. GRPO: no std normalisation)
* ``reinforce++``   A_i = (r_i - mean_B(r)) / (std_B(r) + eps) over the whole batch B
  (REINFORCE++'s global advantage normalisation for an outcome reward)
* ``trr++``         A_i = (r_i - mean_k(r)) / (std_k(r) + eps), k = (task type, role):
  Task-Relative REINFORCE++ of Absolute Zero, one baseline per key (3 task types x
  {propose, solve} = six)
* ``adpo``          A_i = s(p_i) · grpo_i with s(p) = m + (1 - m)·clip((p - 0.3)/0.5, 0, 1),
  p the task's self-consistency and m = ``adpo_min_scale`` (Agent0's ADPO); its upper
  clip bound is ε_high(p) = ε + 0.1·clip((0.8 - p)/0.5, 0, 1) (:func:`adpo_clip_high`)
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch

ESTIMATORS = ("grpo", "grpo-no-std", "reinforce++", "trr++", "adpo")


def _keys_to_index(keys: Sequence[Hashable]) -> tuple[torch.Tensor, list[Hashable]]:
    order: dict[Hashable, int] = {}
    idx = [order.setdefault(k, len(order)) for k in keys]
    return torch.tensor(idx, dtype=torch.long), list(order)


def _as_rewards(rewards) -> torch.Tensor:
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if r.dim() != 1:
        raise ValueError(f"rewards must be 1-D (one per completion), got shape {tuple(r.shape)}")
    if not torch.isfinite(r).all():
        raise ValueError("rewards must be finite")
    return r


def keyed_normalise(rewards, keys: Sequence[Hashable], *, normalize_std: bool = True,
                    eps: float = 1e-6) -> tuple[torch.Tensor, dict[Hashable, tuple[float, float]]]:
    """A_i = (r_i - mean_k) / (std_k + eps) per key k (std only if ``normalize_std``).

    Returns (advantages float32 [N], {key: (mean, std)}). Keys with one member get A = 0
    and std 0."""
    r = _as_rewards(rewards)
    if len(keys) != r.shape[0]:
        raise ValueError(f"got {r.shape[0]} rewards but {len(keys)} keys")
    idx, names = _keys_to_index(keys)
    k = len(names)
    count = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, torch.ones_like(r))
    mean = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, r) / count.clamp(min=1)
    dev = r - mean[idx]
    var = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, dev * dev) \
        / (count - 1).clamp(min=1)
    std = var.sqrt()
    adv = dev / (std[idx] + eps) if normalize_std else dev
    adv = torch.where(count[idx] > 1, adv, torch.zeros_like(adv))
    stats = {name: (float(mean[i]), float(std[i])) for i, name in enumerate(names)}
    return adv.float(), stats


def grpo_advantages(rewards, group_ids: Sequence[Hashable], *, normalize_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean_g) / (std_g + eps) within the prompt group g of i;
    ``normalize_std=False`` gives Dr. GRPO's A_i = r_i - mean_g."""
    return keyed_normalise(rewards, group_ids, normalize_std=normalize_std, eps=eps)[0]


def reinforce_pp_advantages(rewards, *, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++: A_i = (r_i - mean_B) / (std_B + eps) over the whole batch B."""
    r = _as_rewards(rewards)
    return keyed_normalise(r, [0] * r.shape[0], eps=eps)[0]


def trr_pp_advantages(rewards, task_types: Sequence[str], roles: Sequence[str], *,
                      eps: float = 1e-6) -> tuple[torch.Tensor, dict]:
    """Task-Relative REINFORCE++: A_i = (r_i - mean_k) / (std_k + eps) with k = (task type,
    role) of i; separate baselines per key. Returns (advantages, {(task, role): (mean, std)})."""
    if len(task_types) != len(roles):
        raise ValueError(f"got {len(task_types)} task types but {len(roles)} roles")
    return keyed_normalise(rewards, list(zip(task_types, roles)), eps=eps)


def _clip01(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 1.0)


def adpo_scale(p, min_scale: float) -> torch.Tensor:
    """ADPO's advantage scale s(p) = m + (1 - m)·clip((p - 0.3)/0.5, 0, 1)."""
    if not 0.0 <= min_scale <= 1.0:
        raise ValueError(f"adpo min_scale must be in [0, 1], got {min_scale!r}")
    p = torch.as_tensor(p, dtype=torch.float64)
    return (min_scale + (1.0 - min_scale) * _clip01((p - 0.3) / 0.5)).float()


def adpo_clip_high(p, eps: float) -> torch.Tensor:
    """ADPO's upper clip bound ε_high(p) = ε + 0.1·clip((0.8 - p)/0.5, 0, 1)."""
    p = torch.as_tensor(p, dtype=torch.float64)
    return (eps + 0.1 * _clip01((0.8 - p) / 0.5)).float()


def adpo_advantages(rewards, group_ids: Sequence[Hashable], consistency, *,
                    min_scale: float, normalize_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """ADPO: A_i = s(p_i) · grpo_i (see :func:`adpo_scale`); p = self-consistency [N]."""
    p = torch.as_tensor(consistency, dtype=torch.float64)
    if p.shape != (len(group_ids),):
        raise ValueError(f"consistency must have one value per completion ({len(group_ids)}), "
                         f"got shape {tuple(p.shape)}")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("self-consistency p must be in [0, 1]")
    base = grpo_advantages(rewards, group_ids, normalize_std=normalize_std, eps=eps)
    return base * adpo_scale(p, min_scale)


def compute_advantages(estimator: str, rewards, *, group_ids=None, task_types=None,
                       roles=None, consistency=None, adpo_min_scale: float = 0.5,
                       eps: float = 1e-6) -> torch.Tensor:
    """Dispatch by name (one of ``ESTIMATORS``); the needed per-completion fields must be given."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of "
                         f"{', '.join(ESTIMATORS)}")
    if estimator in ("grpo", "grpo-no-std", "adpo") and group_ids is None:
        raise ValueError(f"estimator {estimator!r} needs group ids (one per completion)")
    if estimator == "grpo":
        return grpo_advantages(rewards, group_ids, eps=eps)
    if estimator == "grpo-no-std":
        return grpo_advantages(rewards, group_ids, normalize_std=False, eps=eps)
    if estimator == "reinforce++":
        return reinforce_pp_advantages(rewards, eps=eps)
    if estimator == "trr++":
        if task_types is None or roles is None:
            raise ValueError("estimator 'trr++' needs a task type and a role per completion")
        return trr_pp_advantages(rewards, task_types, roles, eps=eps)[0]
    if consistency is None:
        raise ValueError("estimator 'adpo' needs the self-consistency p of each completion's task")
    return adpo_advantages(rewards, group_ids, consistency, min_scale=adpo_min_scale, eps=eps)
