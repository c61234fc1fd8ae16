"""Agent0's signals and rewards as plain functions (no model, no files): what the tests pin down.

* ``majority_vote(answers)`` -> (label, p, votes): answers are compared after a light
  normalisation (``normalize_answer``); p = votes of the label / number of samples, where
  samples with no answer count in the denominator but never win. **Ties** go to the
  answer that reached the tied count first in sample order (deterministic, and
  independent of dict ordering).
* ``uncertainty_reward(p)`` = 1 - 2|p - 0.5| (1 at p = 0.5, 0 at p in {0, 1}).
* ``tool_reward(calls)`` = ``per_call`` x min(calls, ``cap``) (0.05 per call, at most 4).
* ``bleu_clusters(questions, threshold)``: BLEU distance d(i, j) = 1 - BLEU(i, j)/100 with
  sacrebleu's sentence BLEU (effective order), symmetrised as the mean of both
  directions; i and j are in one cluster when a chain of pairs with d < threshold joins
  them (single linkage). ``repetition_penalty`` of a question = its cluster's size /
  the batch size.
* ``keep(p, low, high)``: the executor trains only on tasks with low <= p <= high.
"""
from __future__ import annotations

import re
from typing import Sequence


def normalize_answer(ans: str | None) -> str | None:
    if ans is None:
        return None
    s = re.sub(r"\s+", "", str(ans)).strip("$. ")
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
    return s or None


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, float, dict[str, int]]:
    """(pseudo-label, self-consistency p, votes) over the samples' answers (None = no answer)."""
    votes: dict[str, int] = {}
    best, best_n = None, 0
    for a in answers:
        k = normalize_answer(a)
        if k is None:
            continue
        votes[k] = votes.get(k, 0) + 1
        if votes[k] > best_n:  # strictly more: the first to reach a tied count keeps the lead
            best, best_n = k, votes[k]
    p = best_n / len(answers) if answers else 0.0
    return best, p, votes


def uncertainty_reward(p: float) -> float:
    return 1.0 - 2.0 * abs(float(p) - 0.5)


def tool_reward(calls: float, *, per_call: float = 0.05, cap: int = 4) -> float:
    return per_call * min(float(calls), float(cap))


def keep(p: float | None, low: float, high: float) -> bool:
    return p is not None and low <= p <= high


def bleu_distance_matrix(questions: Sequence[str]) -> list[list[float]]:
    from sacrebleu.metrics import BLEU

    bleu = BLEU(effective_order=True)
    n = len(questions)
    d = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            s = (bleu.sentence_score(questions[i], [questions[j]]).score
                 + bleu.sentence_score(questions[j], [questions[i]]).score) / 2.0
            d[i][j] = d[j][i] = 1.0 - s / 100.0
    return d


def bleu_clusters(questions: Sequence[str], threshold: float) -> list[int]:
    """Cluster id per question (ids numbered by first member), single linkage on d < threshold."""
    n = len(questions)
    d = bleu_distance_matrix(questions)
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i in range(n):
        for j in range(i + 1, n):
            if d[i][j] < threshold:
                parent[find(j)] = find(i)
    ids: dict[int, int] = {}
    return [ids.setdefault(find(i), len(ids)) for i in range(n)]


def repetition_penalties(clusters: Sequence[int]) -> list[float]:
    n = len(clusters)
    size: dict[int, int] = {}
    for c in clusters:
        size[c] = size.get(c, 0) + 1
    return [size[c] / n for c in clusters] if n else []


def curriculum_reward(*, valid: bool, p: float | None, tool_calls: float, repetition: float,
                      per_call: float = 0.05, cap: int = 4, invalid: float = -1.0) -> tuple[float, float, float]:
    """(reward, r_unc, r_tool) of one proposal."""
    if not valid:
        return invalid, 0.0, 0.0
    r_unc = uncertainty_reward(p if p is not None else 0.0)
    r_tool = tool_reward(tool_calls, per_call=per_call, cap=cap)
    return r_unc + r_tool - repetition, r_unc, r_tool


def parse_question(text: str, *, max_chars: int = 400, min_words: int = 2) -> tuple[str | None, str | None]:
    """(question, None) for a well-formed proposal, else (None, reason). The question is the
    completion's first paragraph; it must have words, digits or symbols to compute with,
    and neither a code block nor a boxed answer."""
    q = (text or "").strip().split("\n\n")[0].strip()
    q = q.split("\n")[0].strip()
    if not q:
        return None, "empty"
    if len(q) > max_chars:
        return None, "too_long"
    if "```" in q or "\\boxed" in q:
        return None, "holds_code_or_answer"
    if len(q.split()) < min_words:
        return None, "too_short"
    if not re.search(r"[0-9]", q):
        return None, "nothing_to_compute"
    return q, None
