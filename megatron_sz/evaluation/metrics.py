"""mean@k and pass@k, named and computed exactly as stated.

* **mean@k**: the average over the k samples of per-sample accuracy, i.e. for each
  problem the fraction of its samples that are correct, averaged over problems. This is
  what the Socratic-Zero paper reports (mean@32 at T=0.7, top-p 0.9).
* **pass@k**: the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k) for a
  problem with n samples of which c are correct, averaged over problems. It needs
  n >= k; with fewer samples there is no unbiased estimate, so ``pass_at_k`` raises and
  the aggregate reports ``None`` with the reason rather than a silently wrong number.
  (The upstream repository's "mean@k" is in fact pass@k; we report both, by name.)
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 - C(n-c, k)/C(n, k), computed stably."""
    if not (0 <= c <= n):
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    # prod_{i=n-c+1}^{n} (1 - k/i) == C(n-c, k) / C(n, k), without huge binomials
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_at_k(correct: Iterable[bool]) -> float:
    """Per-sample accuracy of one problem's samples."""
    values = [bool(c) for c in correct]
    if not values:
        raise ValueError("mean@k of zero samples is undefined")
    return sum(values) / len(values)


@dataclass
class BenchmarkScore:
    benchmark: str
    problems: int
    samples: int
    k: int
    mean_at_k: float
    pass_at_k: dict[int, float | None]
    pass_at_k_note: dict[int, str] = field(default_factory=dict)
    decided_by: dict[str, float] = field(default_factory=dict)  # share of samples decided by rule / judge / none
    unparseable_rate: float = 0.0


def score_samples(samples: list[dict], *, benchmark: str, ks: Iterable[int]) -> BenchmarkScore:
    """Score per-sample records ``{problem_id, correct, verifier, extracted_answer}`` of one benchmark."""
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        by_problem[s["problem_id"]].append(s)
    if not by_problem:
        raise ValueError(f"no samples for benchmark {benchmark!r}")
    ns = [len(v) for v in by_problem.values()]
    k = min(ns)
    means = [mean_at_k(bool(s.get("correct")) for s in v) for v in by_problem.values()]
    passes: dict[int, float | None] = {}
    notes: dict[int, str] = {}
    for kk in sorted(set(ks)):
        if kk > k:
            passes[kk] = None
            notes[kk] = f"only {k} samples for some problems; pass@{kk} needs n >= {kk}"
            continue
        vals = [pass_at_k(len(v), sum(bool(s.get("correct")) for s in v), kk) for v in by_problem.values()]
        passes[kk] = sum(vals) / len(vals)
    total = sum(ns)
    decided: dict[str, int] = defaultdict(int)
    for s in samples:
        decided[s.get("verifier") or "none"] += 1
    unparseable = sum(1 for s in samples if s.get("extracted_answer") in (None, ""))
    return BenchmarkScore(benchmark=benchmark, problems=len(by_problem), samples=total, k=k,
                          mean_at_k=sum(means) / len(means), pass_at_k=passes, pass_at_k_note=notes,
                          decided_by={key: v / total for key, v in sorted(decided.items())},
                          unparseable_rate=unparseable / total)


def macro_average(scores: list[BenchmarkScore]) -> dict[str, float | None]:
    """Unweighted average over benchmarks of mean@k and each pass@k (None if any benchmark lacks it)."""
    if not scores:
        return {}
    out: dict[str, float | None] = {"mean_at_k": sum(s.mean_at_k for s in scores) / len(scores)}
    for kk in scores[0].pass_at_k:
        vals = [s.pass_at_k.get(kk) for s in scores]
        out[f"pass_at_{kk}"] = None if any(v is None for v in vals) else sum(vals) / len(vals)  # type: ignore[arg-type]
    return out

