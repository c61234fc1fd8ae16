"""The curriculum D_t: zones, replay, de-duplication, provenance, contamination filter.

What is unusual here:

* **The pool keeps everything.** D_{t+1} = D_t ∪ validated refinements. Problems are
  never deleted; a problem that fails the teacher's self-verification is *retired*
  (kept in the file with its reason, never rolled out again), so every refinement's
  ``parent_id`` chain stays resolvable.
* **Zones** by success rate s over the k samples of the round (thresholds in
  ``CurriculumSpec``): s >= mastered_threshold -> ``mastered`` (the teacher writes a
  harder variant from a success), s <= too_hard_threshold -> ``too_hard`` (deferred
  for ``recheck_every`` rounds, then rolled out again), otherwise ``learning``.
* **The active set** of a round = due re-checks + problems never attempted + replayed
  historical problems, sized so historical problems are ``replay_ratio`` of the set.
* **De-duplication**: exact (normalised text hash) and near-duplicate (Jaccard
  similarity of word 3-grams via an inverted index, exact Jaccard, no MinHash
  approximation) against the whole pool, including retired problems.
* **Contamination filter**: a new problem sharing any word n-gram (default 13, the
  GPT-3/Llama convention) with an evaluation problem is dropped; problems shorter than
  n words are compared by normalised full text.
* Everything is deterministic given the inputs and the seed (sorted iteration, seeded
  ``random.Random``), which is what lets a killed run resume to the same final curriculum.

Per-problem state lives in ``Problem.extra["curriculum"]``:
``{"status": "active"|"deferred"|"retired", "zone": str|None, "history": [[round, correct, k], ...],
"defer_until": int|None, "reason": str|None}``.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from megatron_sz.data import Problem, Refinement
# One text-similarity implementation for the whole tree (dedup, contamination, seeds);
# re-exported here for the curriculum's callers.
from megatron_sz.textsim import ShingleIndex, exact_key, jaccard, normalize_text, shingles  # noqa: F401

ZONES = ("mastered", "learning", "too_hard")


# --------------------------------------------------------------------------- duplicates

class DedupIndex:
    """Exact + near-duplicate index over problem statements (``textsim.ShingleIndex``):
    exact Jaccard of word 3-grams, candidates found through an inverted index."""

    def __init__(self, threshold: float = 0.9, n: int = 3):
        self.threshold = threshold
        self.n = n
        self._index = ShingleIndex(shingle_n=n)

    def add(self, pid: str, text: str) -> None:
        self._index.add(pid, text)

    def find(self, text: str) -> tuple[str, str, float] | None:
        """(kind, other_id, similarity) of the first duplicate, or None."""
        other = self._index.exact(text)
        if other is not None:
            return ("exact", other, 1.0)
        hit = self._index.similar(text, self.threshold)
        return None if hit is None else ("near", hit[0], hit[1])


# The curriculum's contamination hook is the run's held-out rule (``heldout.HeldoutFilter``):
# the same detector guards every role's training inputs.
from megatron_sz.heldout import HeldoutFilter as ContaminationFilter  # noqa: E402


# --------------------------------------------------------------------------- state


def state(p: Problem) -> dict:
    """The problem's curriculum state (created on first access)."""
    st = p.extra.setdefault("curriculum", {})
    st.setdefault("status", "active")
    st.setdefault("zone", None)
    st.setdefault("history", [])
    st.setdefault("defer_until", None)
    st.setdefault("reason", None)
    return st


def zone_of(success_rate: float, *, mastered_threshold: float = 1.0, too_hard_threshold: float = 0.0) -> str:
    if success_rate >= mastered_threshold:
        return "mastered"
    if success_rate <= too_hard_threshold:
        return "too_hard"
    return "learning"


def initial_pool(problems: list[Problem]) -> list[Problem]:
    """Round 0's pool: the seed problems, each with a fresh state."""
    for p in problems:
        state(p)
    return problems


def select_active(pool: list[Problem], round_index: int, spec, *, seed: int) -> list[Problem]:
    """The problems rolled out in ``round_index``: due re-checks, then new ones, then replay.

    Replay: historical (already attempted, not deferred) problems are sampled so they make
    up ``spec.replay_ratio`` of the active set. ``spec.max_active`` caps the set (re-checks
    and new problems keep priority)."""
    rechecks, new, hist = [], [], []
    for p in pool:
        st = state(p)
        if st["status"] == "retired":
            continue
        if st["status"] == "deferred":
            if st["defer_until"] is not None and st["defer_until"] <= round_index:
                rechecks.append(p)
            continue
        (hist if st["history"] else new).append(p)
    rng = random.Random(f"{seed}:{round_index}:replay")
    r = spec.replay_ratio
    fresh = len(rechecks) + len(new)
    if fresh == 0 or r >= 1.0:
        n_hist = len(hist)
    else:
        n_hist = min(len(hist), int(round(fresh * r / (1.0 - r))))
    replay = rng.sample(hist, n_hist) if n_hist < len(hist) else list(hist)
    replay.sort(key=lambda p: p.id)
    active = rechecks + new + replay
    if spec.max_active is not None:
        active = active[:spec.max_active]
    return active


@dataclass
class UpdateReport:
    round: int
    pool_size: int = 0
    active_next: int = 0
    zones: dict = field(default_factory=dict)
    status: dict = field(default_factory=dict)
    added: int = 0
    duplicate_exact: int = 0
    duplicate_near: int = 0
    contaminated: int = 0
    capped: int = 0
    retired: int = 0
    by_provenance: dict = field(default_factory=dict)


def update_curriculum(pool: list[Problem], round_index: int, spec, *,
                      outcomes: dict[str, tuple[int, int]],
                      refinements: list[Refinement],
                      retire: dict[str, str],
                      contamination: "ContaminationFilter | None" = None,
                      ) -> tuple[list[Problem], UpdateReport]:
    """D_{t+1} from D_t.

    outcomes: problem id -> (correct, k) for the problems rolled out this round.
    refinements: teacher outcomes; only ``status == "ok"`` ones with a problem are added.
    retire: problem id -> reason, for problems that failed the teacher's self-verification.
    Returns the new pool (old problems in their order, then the additions sorted by
    (parent, key)) and a report of counts."""
    rep = UpdateReport(round=round_index)
    by_id = {p.id: p for p in pool}
    for pid in sorted(outcomes):
        if pid not in by_id:
            continue
        correct, k = outcomes[pid]
        st = state(by_id[pid])
        rate = correct / k if k else 0.0
        st["history"].append([round_index, correct, k])
        st["zone"] = zone_of(rate, mastered_threshold=spec.mastered_threshold,
                             too_hard_threshold=spec.too_hard_threshold)
        if st["status"] != "retired":
            if st["zone"] == "too_hard":
                st["status"] = "deferred"
                st["defer_until"] = round_index + 1 + max(0, spec.recheck_every - 1)
            else:
                st["status"] = "active"
                st["defer_until"] = None
    for pid in sorted(retire):
        if pid in by_id:
            st = state(by_id[pid])
            st["status"] = "retired"
            st["reason"] = retire[pid]
            rep.retired += 1

    index = DedupIndex(spec.near_dup_threshold)
    for p in pool:
        index.add(p.id, p.problem)
    added: list[Problem] = []
    for rec in sorted(refinements, key=lambda r: (r.parent_id, r.key)):
        if rec.status != "ok" or rec.problem is None:
            continue
        if spec.max_refinements_per_round is not None and len(added) >= spec.max_refinements_per_round:
            rep.capped += 1
            continue
        q = rec.problem
        if q.id in by_id:
            rep.duplicate_exact += 1
            continue
        if contamination and contamination.hit(q.problem):
            rep.contaminated += 1
            continue
        dup = index.find(q.problem)
        if dup is not None:
            if dup[0] == "exact":
                rep.duplicate_exact += 1
            else:
                rep.duplicate_near += 1
            continue
        state(q)
        q.extra["curriculum"]["added_round"] = round_index
        index.add(q.id, q.problem)
        by_id[q.id] = q
        added.append(q)
    rep.added = len(added)
    new_pool = list(pool) + added
    rep.pool_size = len(new_pool)
    for p in new_pool:
        st = state(p)
        rep.status[st["status"]] = rep.status.get(st["status"], 0) + 1
        if st["zone"] and st["status"] != "retired":
            rep.zones[st["zone"]] = rep.zones.get(st["zone"], 0) + 1
        rep.by_provenance[p.provenance] = rep.by_provenance.get(p.provenance, 0) + 1
    return new_pool, rep


def refinement_id(parent_id: str, round_index: int, j: int) -> str:
    """Deterministic, short id for the j-th refinement of ``parent_id`` in a round."""
    h = hashlib.sha1(f"{parent_id}|{round_index}|{j}".encode()).hexdigest()[:10]
    return f"r{round_index}-{h}"
