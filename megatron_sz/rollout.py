"""Solver rollouts: k samples per problem, verified by the rule verifier, sharded and resumable.

* ``shard_slice(items, i, n)`` is the contiguous slice SLURM array task ``i`` of ``n``
  works on: the same input list always gives the same slices, every item is in
  exactly one slice, and slice sizes differ by at most one.
* ``rollout`` asks the backend for ``k`` samples per problem (one request per problem,
  ``n = k``, request id = problem id) and appends each problem's ``k`` verified
  ``Trajectory`` records to ``out_path`` as soon as they arrive. A rerun skips problems
  whose ``k`` records are already there, so a killed array task redoes only what was
  in flight and never writes a trajectory twice (keyed by problem id + sample index).
* Verification here is the rule verifier only (``megatron_sz.verify``). An answer the
  rules cannot decide keeps ``correct=None`` and ``verifier="none"``; the teacher's
  ``verify`` settles it (the LLM judge, or "incorrect" for the symbolic teacher).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence, TypeVar

from megatron_sz.data import JsonlAppender, Problem, Trajectory, iter_jsonl
from megatron_sz.errors import UserError
from megatron_sz.inference.base import GenerationRequest, GenerationResult, InferenceBackend
from megatron_sz.recipe import SamplingSpec

log = logging.getLogger("megatron_sz.rollout")
T = TypeVar("T")


def resolve_template(template: str | None, default: str = "solver") -> str:
    """A template given inline (contains ``{problem}``), as a file path, or None (packaged)."""
    from megatron_sz.teacher.base import load_template

    if template is None:
        return load_template(default)
    if "{problem}" in template:
        return template
    p = Path(template).expanduser()
    if p.is_file():
        text = p.read_text(encoding="utf-8")
        if "{problem}" not in text:
            raise UserError(f"prompt template {p} has no {{problem}} placeholder", where=str(p),
                            fix="write {problem} where the problem text goes")
        return text
    raise UserError(f"prompt template {template!r} is neither a file nor text with {{problem}}",
                    where="rollout.prompt_template",
                    fix="give a path to a .txt template or inline text containing {problem}")


def solver_prompt(problem: Problem, template: str | None = None) -> str:
    """The solver's prompt for ``problem`` (packaged ``prompts/solver.txt`` by default)."""
    from megatron_sz.teacher.base import render

    return render(resolve_template(template), problem=problem.problem)


def shard_slice(items: Sequence[T], shard_index: int, num_shards: int) -> list[T]:
    """Contiguous slice ``shard_index`` of ``num_shards`` (sizes differ by at most one)."""
    if num_shards < 1 or not (0 <= shard_index < num_shards):
        raise UserError(f"shard {shard_index} of {num_shards} does not exist",
                        fix="use 0 <= shard index < number of shards (SLURM_ARRAY_TASK_ID)")
    n = len(items)
    return list(items[shard_index * n // num_shards:(shard_index + 1) * n // num_shards])


def _key(obj: dict) -> str:
    return f"{obj['problem_id']}\x1f{obj['sample_index']}"


def verify_texts(problem: Problem, texts: list[str], *, verify: bool = True) -> list[Trajectory]:
    """Trajectories for ``texts`` with the rule verifier's verdicts."""
    from megatron_sz.verify import extract_answer, verify_batch

    answers = [extract_answer(t) for t in texts]
    trajs = [Trajectory(problem_id=problem.id, sample_index=j, text=t, extracted_answer=a)
             for j, (t, a) in enumerate(zip(texts, answers))]
    if verify:
        verdicts = verify_batch([(a, problem.answer) for a in answers]).results
        for tr, v in zip(trajs, verdicts):
            if v.decided_by == "rule" and v.equivalent is not None:
                tr.correct = bool(v.equivalent)
                tr.verifier = "rule"
            tr.extra["verify_reason"] = v.reason
    return trajs


def rollout(problems: Sequence[Problem], backend: InferenceBackend, *, k: int,
            sampling: SamplingSpec, template: str | None = None,
            out_path: str | Path | None = None, shard: tuple[int, int] = (0, 1),
            verify: bool = True, chat: bool = False, progress: bool = True) -> list[Trajectory]:
    """Sample ``k`` solutions for each problem of shard ``shard=(i, n)``; see the module doc.

    Returns the shard's trajectories (including those found already written), ordered
    by problem then sample index. Problems whose generation failed for good are logged
    and left out (a rerun retries them).
    """
    if k < 1:
        raise UserError(f"k={k} must be >= 1", where="rollout.k", fix="sample at least one solution")
    mine = shard_slice(list(problems), *shard)
    ids = [p.id for p in mine]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:3]
        raise UserError(f"duplicate problem ids {dup}", fix="problem ids must be unique")
    tmpl = resolve_template(template)
    by_id = {p.id: p for p in mine}
    found: dict[tuple[str, int], Trajectory] = {}
    appender = None
    if out_path is not None:
        appender = JsonlAppender(out_path, key=_key)
        for tr in iter_jsonl(out_path, Trajectory, allow_partial_tail=True):
            if tr.problem_id in by_id:
                found[(tr.problem_id, tr.sample_index)] = tr
    todo = [p for p in mine if any((p.id, j) not in found for j in range(k))]
    if len(todo) < len(mine):
        log.info("rollout shard %d/%d: %d of %d problems already done", shard[0], shard[1],
                 len(mine) - len(todo), len(mine))

    from megatron_sz.teacher.base import render

    def prompt_of(p: Problem):
        text = render(tmpl, problem=p.problem)
        return [{"role": "user", "content": text}] if chat else text

    requests = [GenerationRequest(id=p.id, prompt=prompt_of(p), n=k, sampling=sampling,
                                  meta={"problem_id": p.id}) for p in todo]
    failed: list[str] = []

    def on_result(res: GenerationResult) -> None:
        if not res.ok or len(res.texts) != k:
            failed.append(res.id)
            return
        trajs = verify_texts(by_id[res.id], res.texts, verify=verify)
        for tr, reason in zip(trajs, res.finish_reasons):
            tr.extra["finish_reason"] = reason
            key = (tr.problem_id, tr.sample_index)
            if key in found:  # written by an earlier, interrupted run: keep that one
                continue
            found[key] = tr
            if appender is not None:
                appender.append(tr)

    try:
        if requests:
            backend.generate(requests, progress=progress, on_result=on_result)
    finally:
        if appender is not None:
            appender.close()
    if failed:
        log.warning("rollout shard %d/%d: %d problems failed to generate (rerun to retry): %s",
                    shard[0], shard[1], len(failed), failed[:5])
    out = []
    for p in mine:
        if all((p.id, j) in found for j in range(k)):
            out.extend(found[(p.id, j)] for j in range(k))
    return out
