"""What a training job is: ``JobSpec``, and the record loaders the jobs in ``jobs.JOBS`` use.

What is unusual here: nothing in this file imports torch. ``megatron-sz --help`` builds
its ``train JOB`` subcommands from ``jobs.JOBS``, and the CLI rule is that heavy imports
happen only when a command runs. So a ``JobSpec`` names its objective (a class in
``train/objectives.py``) instead of holding it; ``JobSpec.objective_class()`` imports it.

A loader turns one JSONL file into tokenised items:
``load(path, recipe, spec, tok, rank) -> (items, TokenizeStats, groups)``, where
``groups[i]`` is the problem id of ``items[i]`` (items of one problem stay on one side of
the held-out split) or an empty list when records have no problem id. The checks shared
by every job (overlong counts, nothing left after tokenisation) are ``jobs.load_items``'s.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from megatron_sz.data import PreferencePair, Problem, WeightedExample, iter_jsonl, record_from_dict
from megatron_sz.errors import DataError

Loader = Callable[[Path, Any, Any, Any, int], tuple[list, Any, list]]


@dataclass(frozen=True)
class JobSpec:
    """One training job: its input, its loss, what it logs, and which recipe section it reads."""

    description: str  # one line: the CLI's help for ``megatron-sz train KIND``
    record: type  # the input JSONL's record type (megatron_sz/data.py)
    load: Loader  # records -> items (see module docstring)
    objective: str  # class name in train/objectives.py; built with ``Objective.for_job(spec, ...)``
    role: str  # recipe role section: "solver" | "generator" (model:, parallel: come from it)
    section: str  # the train section inside the role: recipe.<role>.<section>
    unit: str = "examples"  # what one item is called in messages ("pairs")
    # Per-step metrics beyond loss/lr/grad_norm/tokens/throughput: per-item means of the
    # objective's ``train_keys``, written to metrics.jsonl in this order.
    metrics: tuple[str, ...] = ()
    # Held-out metrics: name -> (sum, denominator), both from the objective's ``eval_keys``
    # or "items"; each is sum / max(1, denominator).
    eval_metrics: dict[str, tuple[str, str]] = field(default_factory=dict)
    # train spec -> whether the job needs the start-of-round policy's log-probs of every
    # item (computed once into OUT/ref_logps.pt, or given by --ref-logps). None: never,
    # and the CLI has no --ref-logps flag for the job.
    reference: Callable[[Any], bool] | None = None
    # (text, i) -> a synthetic record of type ``record``, ``text()`` giving a fresh string
    # per call: train/bench.py and the registry test write data with it.
    synthetic: Callable[[Callable[[], str], int], Any] | None = None

    def sections(self, recipe: Any) -> tuple[Any, Any, Any]:
        """(model spec, parallel spec, train spec) of the role this job trains."""
        role = getattr(recipe, self.role)
        return role.model, role.parallel, getattr(role, self.section)

    def uses_reference(self, spec: Any) -> bool:
        return self.reference is not None and bool(self.reference(spec))

    def objective_class(self) -> type:
        from megatron_sz.train import objectives

        return getattr(objectives, self.objective)


# --------------------------------------------------------------------------- loaders


def _records(path: Path, record: type, empty: str, fix: str) -> list:
    recs = list(iter_jsonl(path, record))
    if not recs:
        raise DataError(empty, where=str(path), fix=fix)
    return recs


def _groups_of_kept(recs: list, items: list) -> list[str | None]:
    kept_lines = {it.line for it in items}
    return [r.problem_id for i, r in enumerate(recs) if (i + 1) in kept_lines]


def _sft_examples(path: Path, recipe: Any):
    """solver-sft input: Problem records (prompt = the solver template, target = reference
    solution ending in \\boxed{answer}) or generic {prompt, completion} records."""
    from megatron_sz.rollout import solver_prompt

    template = recipe.solver.rollout.prompt_template
    for lineno, obj in enumerate(iter_jsonl(path), start=1):
        where = f"{path}:{lineno}"
        if isinstance(obj, dict) and "prompt" in obj:
            completion = obj.get("completion", obj.get("target"))
            if not isinstance(obj["prompt"], str) or not isinstance(completion, str) or not completion.strip():
                raise DataError("a generic SFT record needs string 'prompt' and 'completion' (or 'target')",
                                where=where, fix="add the missing field, or give Problem records")
            yield obj["prompt"], completion, 1.0, lineno
            continue
        prob = record_from_dict(Problem, obj, where=where)
        solution = (prob.solution or "").strip()
        if "\\boxed" not in solution:
            solution = (solution + "\n\n" if solution else "") + f"The answer is $\\boxed{{{prob.answer}}}$."
        yield solver_prompt(prob, template), solution, 1.0, lineno


def load_sft(path: Path, recipe: Any, spec: Any, tok: Any, rank: int):
    """Problem (or {prompt, completion}) records -> one-sequence items with unit weight."""
    from megatron_sz.train.data import tokenize_examples

    items, stats = tokenize_examples(_sft_examples(path, recipe), tok, max_length=spec.max_length,
                                     overlong=spec.overlong)
    if stats.records == 0:
        raise DataError("the SFT file has no records", where=str(path),
                        fix="give Problem records with reference solutions")
    return items, stats, []


def load_pairs(path: Path, recipe: Any, spec: Any, tok: Any, rank: int):
    """PreferencePair records -> (chosen, rejected) pair items, grouped by problem id."""
    from megatron_sz.train.data import tokenize_pairs

    recs = _records(path, PreferencePair, "the preference-pair file has no pairs",
                    "this round produced no (winner, loser) pairs: every problem was "
                    "solved k/k or never; skip solver-dpo for this round or add problems")
    items, stats = tokenize_pairs(((r.prompt, r.chosen, r.rejected, i + 1) for i, r in enumerate(recs)),
                                  tok, max_length=spec.max_length, overlong=spec.overlong)
    return items, stats, _groups_of_kept(recs, items)


def load_weighted(path: Path, recipe: Any, spec: Any, tok: Any, rank: int):
    """WeightedExample records -> one-sequence items carrying their weight U(s)."""
    from megatron_sz.train.data import tokenize_examples

    recs = _records(path, WeightedExample, "the weighted-example file has no examples",
                    "the round produced no generator examples; skip generator-wsft")
    items, stats = tokenize_examples(((r.prompt, r.target, r.weight, i + 1) for i, r in enumerate(recs)),
                                     tok, max_length=spec.max_length, overlong=spec.overlong)
    _check_weights(recs, spec, path, rank=rank)
    return items, stats, _groups_of_kept(recs, items)


def _check_weights(recs: list, spec: Any, path: Path, *, rank: int) -> None:
    """Weights are used as given; warn when a gaussian weight disagrees with the recipe's mu/sigma."""
    from megatron_sz.train.objectives import gaussian_weight

    bad = 0
    for r in recs:
        src = r.weight_source or {}
        s = src.get("success_rate")
        if src.get("kind") == "gaussian" and isinstance(s, (int, float)) and 0 <= s <= 1:
            if abs(gaussian_weight(float(s), spec.mu, spec.sigma) - float(r.weight)) > 1e-6:
                bad += 1
    if bad and rank == 0:
        print(f"[train] warning: {bad} weights in {path} differ from U(s) with the recipe's mu={spec.mu}, "
              f"sigma={spec.sigma}; using the weights in the file", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- per-job details


def dpo_uses_reference(spec: Any) -> bool:
    """DPO compares against the start-of-round policy, unless reference-free or SimPO."""
    return not (spec.reference_free or spec.loss_type == "simpo")


def synthetic_sft(text: Callable[[], str], i: int) -> dict:
    return {"prompt": text(), "completion": text()}


def synthetic_pair(text: Callable[[], str], i: int) -> PreferencePair:
    return PreferencePair(prompt=text(), chosen=text(), rejected=text(), problem_id=f"b{i}")


def synthetic_weighted(text: Callable[[], str], i: int) -> WeightedExample:
    return WeightedExample(prompt=text(), target=text(), weight=1.0)
