"""Solver preference pairs and generator weighted-SFT examples (Socratic-Zero, §1 of SYSTEMS.md).

Pairs: for every problem, every (winner, loser) combination of its verified samples. When
all samples fail, the problem's reference solution is the single winner (``origin:
reference_winner``). A problem solved k/k gives no pairs. Samples whose verdict is
undecided (``correct is None``) are neither winners nor losers. Identical
(chosen, rejected) texts are emitted once, so a degenerate sampler cannot inflate a
problem's weight in the DPO loss.

WSFT: each validated refinement q' of a parent q (written from the failed attempt
y_fail) becomes the example (prompt = generator_prompt(q, y_fail), target = q') with
weight U(s_q') = exp(-(s_q' - mu)^2 / (2 sigma^2)), s_q' being the updated solver's
success rate on q'. The weight's provenance is recorded in ``weight_source``.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable

from megatron_sz.data import PreferencePair, Problem, Refinement, Trajectory, WeightedExample

GENERATOR_TEMPLATE = (
    "Original problem:\n{problem}\n\n"
    "A student's attempt:\n{attempt}\n\n"
    "Write one new problem that targets the student's mistake. New problem:\n"
)


def reference_text(problem: Problem) -> str:
    """The reference solution used as the winner when all samples fail."""
    if problem.solution and problem.solution.strip():
        sol = problem.solution.strip()
        if "\\boxed" not in sol:
            sol += f"\nThe answer is \\boxed{{{problem.answer}}}."
        return sol
    return f"The answer is \\boxed{{{problem.answer}}}."


def build_pairs(problems: dict[str, Problem], trajectories: list[Trajectory], *,
                prompt_fn: Callable[[Problem], str],
                max_pairs_per_problem: int | None = None) -> tuple[list[PreferencePair], dict]:
    """Preference pairs from verified trajectories. Returns (pairs, stats)."""
    by_pid: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajectories:
        by_pid[t.problem_id].append(t)
    pairs: list[PreferencePair] = []
    stats = {"problems": 0, "all_correct": 0, "all_failed": 0, "mixed": 0, "undecided_samples": 0,
             "solver_pairs": 0, "reference_pairs": 0, "duplicates_skipped": 0, "unknown_problem": 0,
             "empty_samples": 0}
    for pid in sorted(by_pid):
        if pid not in problems:
            stats["unknown_problem"] += 1
            continue
        stats["problems"] += 1
        samples = sorted(by_pid[pid], key=lambda t: t.sample_index)
        # An empty completion (EOS at once) cannot be a DPO sequence: it is counted, not paired.
        stats["empty_samples"] += sum(not t.text.strip() for t in samples)
        winners = [t.text for t in samples if t.correct is True and t.text.strip()]
        losers = [t.text for t in samples if t.correct is False and t.text.strip()]
        stats["undecided_samples"] += sum(t.correct is None for t in samples)
        problem = problems[pid]
        prompt = prompt_fn(problem)
        origin = "solver_pair"
        if not losers:
            if winners:
                stats["all_correct"] += 1
            continue
        if not winners:
            winners = [reference_text(problem)]
            origin = "reference_winner"
            stats["all_failed"] += 1
        else:
            stats["mixed"] += 1
        seen: set[tuple[str, str]] = set()
        n = 0
        for w in winners:
            for l in losers:
                if (w, l) in seen or w == l:
                    stats["duplicates_skipped"] += 1
                    continue
                if max_pairs_per_problem is not None and n >= max_pairs_per_problem:
                    break
                seen.add((w, l))
                pairs.append(PreferencePair(prompt=prompt, chosen=w, rejected=l, problem_id=pid,
                                            origin=origin))
                n += 1
        stats["solver_pairs" if origin == "solver_pair" else "reference_pairs"] += n
    return pairs, stats


def gaussian_weight(success_rate: float, mu: float = 0.5, sigma: float = 0.2) -> float:
    """U(s) = exp(-(s - mu)^2 / (2 sigma^2)); the paper's generator weight, s being the
    updated solver's success rate on the new problem. The one implementation (the
    trainer's weight check imports it from here).

    >>> [round(gaussian_weight(k / 8), 3) for k in range(5)]
    [0.044, 0.172, 0.458, 0.823, 1.0]
    """
    if not (0.0 <= success_rate <= 1.0):
        raise ValueError(f"success rate {success_rate!r} must be in [0, 1]")
    if sigma <= 0:
        raise ValueError("sigma must be > 0")
    return math.exp(-((success_rate - mu) ** 2) / (2.0 * sigma * sigma))


def linear_weight(success_rate: float, mu: float = 0.5) -> float:
    """The ablation's linear U(s) = max(0, 1 - |s - mu| / max(mu, 1 - mu)): the triangle
    with the Gaussian's peak at mu, zero at the far end of [0, 1].

    >>> [round(linear_weight(k / 8), 3) for k in range(5)]
    [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    if not (0.0 <= success_rate <= 1.0):
        raise ValueError(f"success rate {success_rate!r} must be in [0, 1]")
    if not (0.0 < mu < 1.0):
        raise ValueError("mu must be in (0, 1)")
    return max(0.0, 1.0 - abs(success_rate - mu) / max(mu, 1.0 - mu))


def generator_prompt(parent: Problem, attempt: str | None, *, max_attempt_chars: int = 1500) -> str:
    text = (attempt or "(no attempt)").strip()
    if len(text) > max_attempt_chars:
        text = text[:max_attempt_chars] + " ..."
    return GENERATOR_TEMPLATE.format(problem=parent.problem.strip(), attempt=text)


def build_wsft_examples(refinements: list[Refinement], parents: dict[str, Problem],
                        rates: dict[str, tuple[int, int]], *, mu: float, sigma: float,
                        weighting: str = "gaussian") -> tuple[list[WeightedExample], dict]:
    """Generator examples from validated refinements (``status == "ok"``).

    rates: new problem id -> (correct, k) of the updated solver (s_q')."""
    out: list[WeightedExample] = []
    stats = {"examples": 0, "no_rate": 0, "weight_sum": 0.0}
    ok = [r for r in refinements if r.status == "ok" and r.problem is not None]
    for rec in sorted(ok, key=lambda r: r.problem.id):
        q = rec.problem
        parent = parents.get(rec.parent_id)
        if parent is None:
            continue
        if q.id not in rates:
            stats["no_rate"] += 1
            continue
        c, k = rates[q.id]
        s = c / k if k else 0.0
        w = linear_weight(s, mu=mu) if weighting == "linear" else gaussian_weight(s, mu=mu, sigma=sigma)
        out.append(WeightedExample(
            prompt=generator_prompt(parent, rec.attempt), target=q.problem.strip(),
            weight=w, problem_id=q.id,
            weight_source={"kind": weighting, "success_rate": s, "correct": c, "k": k,
                           "mu": mu, "sigma": sigma}))
        stats["weight_sum"] += w
    stats["examples"] = len(out)
    return out, stats
