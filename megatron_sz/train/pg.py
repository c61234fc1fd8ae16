"""The policy-gradient job's data and objective: scored rollouts -> items -> PPO-clipped loss.

What is unusual here:

* **Advantages are computed once, over the whole input file** (one stage's rollouts), by
  the estimator the recipe names (``train/advantages.py``): group statistics never depend
  on how the plan cuts mini-batches, and a resumed job sees the same numbers. The
  advantage is the item's ``weight``, so the data fingerprint (resume identity) covers it.
* **Old log-probs** (the behaviour policy's, per token) are by default recomputed with the
  stage's starting weights before the first update, like solver-dpo's reference
  log-probs, into ``OUT/ref_logps.pt``: one [items, positions] table, reused on resume.
  Every PPO epoch and mini-batch then clips against the same behaviour policy.
  ``old_logps: data`` takes them from the records instead (the sampler's log-probs of the
  same weights). The KL term (``kl_coef`` > 0) is taken to the same start-of-stage table.
* **Token-level completions**: a record may carry the sampled ``completion_ids`` (exact:
  no re-tokenisation) with a ``loss_mask`` (0 on tool observations) and ``old_logps``
  aligned to them, or a text ``completion`` that the job tokenises (EOS appended when
  the sample finished).
* The loss is ``objectives.PGObjective`` (this module stays torch-free: the CLI builds
  its subcommands from the job table without importing torch).
* Aggregation (``token-mean`` etc.) is per micro-batch, then averaged over micro-batches
  and data-parallel ranks like every job's loss (exact when a DP rank's share of the
  mini-batch is one micro-batch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_sz.data import ScoredRollout, iter_jsonl
from megatron_sz.errors import DataError
from megatron_sz.train.data import IGNORE, Item, Tokens, TokenizeStats

# Per-step metrics of the job (per-item means of ``objectives.PGObjective``'s statistics); the
# same tuple as objectives.PG_METRICS, kept here so the job table stays torch-free.
METRICS = ("reward", "advantage", "entropy", "approx_kl", "ratio", "clipfrac_low", "clipfrac_high",
           "clipfrac_dual", "kl_ref", "masked_share")


# --------------------------------------------------------------------------- tokenisation


def encode_rollout(tok: Any, rec: Any, *, max_length: int, overlong: str
                   ) -> tuple[Tokens | None, list[float] | None, list[float], str]:
    """One rollout -> (tokens, per-position old log-probs or None, per-position loss mask,
    status). Position t holds the values of the label ``labels[t]`` = completion token j
    at ``t = len(prompt) - 1 + j``. Status as in ``train.data.encode_example``."""
    bos = [tok.bos_id] if getattr(tok, "bos_id", None) is not None else []
    p_ids = bos + (list(rec.prompt_ids) if rec.prompt_ids is not None else list(tok.encode(rec.prompt)))
    if rec.completion_ids is not None:
        c_ids = list(rec.completion_ids)
    else:
        c_ids = list(tok.encode(rec.completion)) + ([tok.eos_id] if rec.finished else [])
    mask = [float(m) for m in rec.loss_mask] if rec.loss_mask is not None else [1.0] * len(c_ids)
    old = [float(x) for x in rec.old_logps] if rec.old_logps is not None else None
    status = "ok"
    if len(p_ids) + len(c_ids) > max_length:
        if overlong == "drop":
            return None, None, [], "dropped"
        status = "truncated"
        keep = max_length - len(p_ids)
        if keep < 1:                      # keep the prompt's tail and one completion token
            p_ids = p_ids[len(p_ids) - (max_length - 1):]
            keep = 1
        c_ids, mask = c_ids[:keep], mask[:keep]
        old = None if old is None else old[:keep]
    if not c_ids or not any(mask):
        return None, None, [], "empty"
    ids = p_ids + c_ids
    labels = [IGNORE] * len(ids)
    pos_mask = [0.0] * len(ids)
    pos_old = [0.0] * len(ids) if old is not None else None
    start = len(p_ids) - 1
    for j, cid in enumerate(c_ids):
        labels[start + j] = cid
        pos_mask[start + j] = mask[j]
        if pos_old is not None:
            pos_old[start + j] = old[j]
    return Tokens(ids, labels), pos_old, pos_mask, status


def _advantages(recs: list, spec: Any, path: Path) -> list[float]:
    from megatron_sz.train.advantages import compute_advantages

    rewards = [float(r.reward) for r in recs]
    groups = [r.group_id if r.group_id is not None else f"#{i}" for i, r in enumerate(recs)]
    consistency = None
    if spec.estimator == "adpo":
        missing = [i + 1 for i, r in enumerate(recs) if r.consistency is None]
        if missing:
            raise DataError(f"estimator 'adpo' needs the task's self-consistency 'consistency' on every "
                            f"rollout; line {missing[0]} has none", where=f"{path}:{missing[0]}",
                            fix="add 'consistency' (majority-vote agreement in [0, 1]) or use estimator grpo")
        consistency = [float(r.consistency) for r in recs]
    if spec.estimator in ("grpo", "grpo-no-std", "adpo") and all(r.group_id is None for r in recs):
        raise DataError(f"estimator {spec.estimator!r} normalises within prompt groups, but no rollout has a "
                        "'group_id'", where=str(path),
                        fix="give the k samples of one prompt the same group_id, or use estimator reinforce++")
    try:
        return compute_advantages(spec.estimator, rewards, group_ids=groups,
                                  task_types=[r.task_type for r in recs], roles=[r.role for r in recs],
                                  consistency=consistency, adpo_min_scale=spec.adpo_min_scale,
                                  eps=spec.advantage_eps).tolist()
    except ValueError as exc:
        raise DataError(str(exc), where=str(path), fix="correct the rollout file") from None


def load_rollouts(path: Path, recipe: Any, spec: Any, tok: Any, rank: int):
    """ScoredRollout records -> one-sequence items: weight = advantage, extras = reward, clip
    bound, per-position loss mask (and old log-probs with ``old_logps: data``); grouped by
    ``group_id`` so a prompt's samples stay on one side of the held-out split."""
    from megatron_sz.train.advantages import adpo_clip_high

    recs = list(iter_jsonl(path, ScoredRollout))
    if not recs:
        raise DataError("the rollout file has no scored rollouts", where=str(path),
                        fix="write ScoredRollout lines (prompt, completion or completion_ids, reward)")
    if spec.old_logps == "data":
        bad = next((i + 1 for i, r in enumerate(recs) if r.old_logps is None), None)
        if bad is not None:
            raise DataError("old_logps: data, but a rollout has no 'old_logps'", where=f"{path}:{bad}",
                            fix="add the sampler's per-token log-probs, or set old_logps: recompute")
    adv = _advantages(recs, spec, path)
    stats = TokenizeStats()
    items: list[Item] = []
    groups: list[str | None] = []
    for i, rec in enumerate(recs):
        stats.records += 1
        toks, old, mask, status = encode_rollout(tok, rec, max_length=spec.max_length, overlong=spec.overlong)
        if status == "truncated":
            stats.truncated += 1
        elif status == "dropped":
            stats.dropped_overlong += 1
        elif status == "empty":
            stats.dropped_empty += 1
        if toks is None:
            continue
        clip_high = spec.clip_high
        if spec.estimator == "adpo":
            clip_high = float(adpo_clip_high(float(rec.consistency), spec.clip_high))
        extras = {"reward": float(rec.reward), "clip_high": float(clip_high), "loss_mask": mask}
        if old is not None and spec.old_logps == "data":
            extras["old_logps"] = old
        items.append(Item(index=len(items), seqs=(toks,), weight=float(adv[i]), line=i + 1, extras=extras))
        groups.append(rec.group_id)
    stats.kept = len(items)
    return items, stats, (groups if any(g is not None for g in groups) else [])


def uses_table(spec: Any) -> bool:
    """The start-of-stage per-token log-prob table: the old policy (recompute) and/or the KL reference."""
    return spec.old_logps == "recompute" or spec.kl_coef > 0


def synthetic_rollout(text, i: int):
    return ScoredRollout(prompt=text(), completion=text(), reward=float(i % 3),
                                  group_id=f"g{i // 4}")
