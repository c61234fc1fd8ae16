"""The LLM teacher: a frozen model behind any inference backend grades, refines, re-solves.

* ``verify``: the rule verifier first (``megatron_sz.verify``); the LLM judge (prompt
  ``judge.txt``, ``teacher.verify_sampling``) for what the rules cannot decide, for a
  random ``judge_spot_check`` share of rule-decided answers, or for everything with
  ``judge: always``. Each trajectory records who decided (``verifier`` = rule | judge);
  a spot-check disagreement is settled by the judge and recorded
  (``extra["rule_verdict"]``, ``extra["judge_disagreed"]``).
* ``refine_many``: one prompt per problem by zone (``refine_learning.txt`` targets the
  failed attempt, ``refine_mastered.txt`` writes a harder variant from a successful
  one, ``refine_too_hard.txt`` an easier one). The reply must be JSON
  ``{enhanced_question, solution, answer}``; replies that cannot be parsed or miss a
  field are asked again up to ``max_parse_retries`` times, then recorded as
  ``parse_failed`` with the raw text. A refinement whose answer disagrees with the
  ``\\boxed{}`` answer of its own solution, or that repeats the original, is ``rejected``.
* ``self_verify_many``: the teacher re-solves at low temperature (``self_verify.txt``,
  ``teacher.self_verify_sampling``); the problem is kept only if the reference answer
  is reproduced. ``\\boxed{INVALID}`` (ambiguous / missing information) discards it.

All calls for a batch go to the backend together, so an HTTP backend spreads them over
its endpoints and workers. Nothing here raises for a bad reply; ``stats`` counts outcomes.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import re

from megatron_sz.data import Problem, Trajectory
from megatron_sz.inference.base import GenerationRequest, GenerationResult, InferenceBackend, stable_seed
from megatron_sz.recipe import SamplingSpec, TeacherRole
from megatron_sz.teacher.base import (RefineJob, RefineOutcome, SelfVerifyOutcome, Teacher,
                                      check_zone, load_template, render)
from megatron_sz.teacher.parsing import parse_json_reply, parse_judge_reply

log = logging.getLogger("megatron_sz.teacher")

MAX_SOLUTION_CHARS = 8000  # keep the tail of very long solver attempts in judge prompts


def _tail(text: str | None, limit: int = MAX_SOLUTION_CHARS) -> str:
    text = text or ""
    return text if len(text) <= limit else "[...]" + text[-limit:]


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


class LLMTeacher(Teacher):
    kind = "llm"

    def __init__(self, backend: InferenceBackend, *, role: TeacherRole | None = None, seed: int = 0):
        super().__init__()
        self.backend = backend
        self.role = role or TeacherRole(kind="llm")
        self.seed = int(seed)
        self._rng = random.Random(stable_seed("spot-check", seed))
        tdir = self.role.templates_dir
        self.templates = {name: load_template(name, tdir) for name in
                          ("judge", "refine_learning", "refine_mastered", "refine_too_hard", "self_verify")}

    # ------------------------------------------------------------------ plumbing

    def _ask(self, items: list[tuple[str, str]], sampling: SamplingSpec, attempt: int) -> dict[str, GenerationResult]:
        """Send (id, prompt) pairs as chat requests; returns results by id (never raises)."""
        if not items:
            return {}
        s = sampling
        if attempt:
            # A retry must not replay the same sample: shift the seed (if one is set).
            s = dataclasses.replace(sampling, seed=None if sampling.seed is None else sampling.seed + 7919 * attempt)
        # The attempt is part of the request id: seeded backends derive the sample from
        # the id, so a retry gets a fresh sample instead of the same malformed reply.
        reqs = [GenerationRequest(id=f"{i}@{attempt}", prompt=[{"role": "user", "content": p}], n=1,
                                  sampling=s, meta={"key": i}) for i, p in items]
        try:
            results = self.backend.generate(reqs, progress=False)
        except Exception as exc:  # noqa: BLE001 - a backend crash must not end the round
            log.error("teacher backend failed for %d requests: %r", len(reqs), exc)
            results = [GenerationResult.failure(r, f"backend raised {exc!r}") for r in reqs]
        return {r.id.rsplit("@", 1)[0]: r for r in results}

    # ------------------------------------------------------------------ verify

    def verify(self, problems: dict[str, Problem], trajs: list[Trajectory]) -> list[Trajectory]:
        from megatron_sz.verify import extract_answer, verify_batch

        known = [t for t in trajs if t.problem_id in problems]
        self.stats["verify.unknown_problem"] += len(trajs) - len(known)
        for t in known:
            if t.extracted_answer is None:
                t.extracted_answer = extract_answer(t.text)
        verdicts = verify_batch([(t.extracted_answer, problems[t.problem_id].answer) for t in known]).results
        mode = self.role.judge
        to_judge: list[tuple[int, str]] = []  # (index into known, why)
        for i, (t, v) in enumerate(zip(known, verdicts)):
            t.extra["verify_reason"] = v.reason
            if v.decided_by == "rule" and v.equivalent is not None:
                t.correct, t.verifier = bool(v.equivalent), "rule"
                if mode == "always":
                    to_judge.append((i, "always"))
                elif mode == "undecided" and self.role.judge_spot_check > 0 \
                        and self._rng.random() < self.role.judge_spot_check:
                    to_judge.append((i, "spot_check"))
                else:
                    self._count("verify", "rule")
            else:
                t.correct, t.verifier = False, "rule"  # until a judge says otherwise
                if mode == "never":
                    self._count("verify", "undecided_as_incorrect")
                else:
                    to_judge.append((i, "undecided"))
        pending = {f"judge:{i}:{known[i].problem_id}:{known[i].sample_index}": (i, why) for i, why in to_judge}
        verdict_of: dict[str, bool] = {}
        for attempt in range(self.role.max_parse_retries + 1):
            ask = [k for k in pending if k not in verdict_of]
            if not ask:
                break
            items = []
            for k in ask:
                t = known[pending[k][0]]
                p = problems[t.problem_id]
                items.append((k, render(self.templates["judge"], problem=p.problem, reference=p.answer,
                                        solution=_tail(t.text))))
            got = self._ask(items, self.role.verify_sampling, attempt)
            for k in ask:
                res = got.get(k)
                if res is None or not res.ok or not res.texts:
                    continue
                jr = parse_judge_reply(res.texts[0])
                if jr.verdict is not None:
                    verdict_of[k] = jr.verdict
                else:
                    known[pending[k][0]].extra["judge_raw"] = _tail(res.texts[0], 2000)
        for k, (i, why) in pending.items():
            t = known[i]
            if k not in verdict_of:
                t.extra["judge_failed"] = True
                self._count("verify", f"judge_failed_{why}")
                if why == "undecided":
                    self._count("verify", "undecided_as_incorrect")
                continue
            j = verdict_of[k]
            if why in ("spot_check", "always") and j != t.correct:
                t.extra["rule_verdict"] = t.correct
                t.extra["judge_disagreed"] = True
                self._count("verify", "judge_disagreed")
            t.correct, t.verifier = j, "judge"
            self._count("verify", f"judge_{why}")
        return trajs

    # ------------------------------------------------------------------ refine

    def _refine_prompt(self, job: RefineJob) -> str:
        p = job.problem
        return render(self.templates[f"refine_{job.zone}"], problem=p.problem, answer=p.answer,
                      reference_solution=p.solution or "",
                      failed_solution=_tail(job.failed.text if job.failed else "(no attempt recorded)"),
                      successful_solution=_tail(job.succeeded.text if job.succeeded
                                                else (p.solution or "(no solution recorded)")))

    def refine_many(self, jobs: list[RefineJob]) -> list[RefineOutcome]:
        from megatron_sz.verify import extract_answer, is_equivalent

        for j in jobs:
            check_zone(j.zone)
        outcomes: list[RefineOutcome | None] = [None] * len(jobs)
        last_raw: dict[int, str | None] = {}
        last_err: dict[int, str] = {}
        attempts = {i: 0 for i in range(len(jobs))}
        ids = {i: f"refine:{i}:{j.problem.id}:r{j.round}:{j.zone}:v{j.variant}" for i, j in enumerate(jobs)}
        for attempt in range(self.role.max_parse_retries + 1):
            todo = [i for i in range(len(jobs)) if outcomes[i] is None]
            if not todo:
                break
            got = self._ask([(ids[i], self._refine_prompt(jobs[i])) for i in todo],
                            self.role.refine_sampling, attempt)
            for i in todo:
                attempts[i] += 1
                res = got.get(ids[i])
                if res is None or not res.ok or not res.texts:
                    err = res.meta.get("error") if res is not None else "no result"
                    outcomes[i] = RefineOutcome("backend_failed", None, raw=None, reason=str(err),
                                                attempts=attempts[i])
                    continue
                raw = res.texts[0]
                parsed = parse_json_reply(raw)
                self._count("refine.parse", parsed.status)
                if not parsed.ok:
                    last_raw[i], last_err[i] = raw, f"{parsed.status}: {parsed.error}"
                    continue
                outcomes[i] = self._accept(jobs[i], parsed, raw, attempts[i], extract_answer, is_equivalent)
        final: list[RefineOutcome] = []
        for i, o in enumerate(outcomes):
            if o is None:
                o = RefineOutcome("parse_failed", None, raw=last_raw.get(i),
                                  reason=f"no usable JSON after {attempts[i]} attempts ({last_err.get(i, '')})",
                                  attempts=attempts[i])
            self._count("refine", o.status)
            final.append(o)
        return final

    def _accept(self, job: RefineJob, parsed, raw: str, attempts: int, extract_answer, is_equivalent) -> RefineOutcome:
        d = parsed.data
        question = str(d["enhanced_question"]).strip()
        solution = str(d["solution"]).strip()
        answer = str(d["answer"]).strip()
        p = job.problem
        if _norm(question) == _norm(p.problem):
            return RefineOutcome("rejected", None, raw=raw, reason="the new problem repeats the original",
                                 attempts=attempts)
        boxed = extract_answer(solution, last_number_fallback=False)
        if boxed is not None and not is_equivalent(boxed, answer):
            return RefineOutcome("rejected", None, raw=raw, attempts=attempts,
                                 reason=f"its solution's final answer {boxed!r} disagrees with answer {answer!r}")
        if boxed is None:
            solution = f"{solution}\n\nThe final answer is \\boxed{{{answer}}}."
        level = p.level
        if level is not None:
            level = max(1, min(5, level + {"mastered": 1, "learning": 0, "too_hard": -1}[job.zone]))
        new = Problem(id=f"t{job.round}-{stable_seed(p.id, question, job.variant) % (1 << 40):010x}", problem=question,
                      answer=answer, solution=solution, subject=p.subject, level=level,
                      provenance="teacher", parent_id=p.id, round=job.round,
                      extra={"zone": job.zone, "parse_status": parsed.status, "parse_notes": parsed.notes})
        return RefineOutcome("ok", new, raw=raw, reason=parsed.status, attempts=attempts)

    # ------------------------------------------------------------------ self-verify

    def self_verify_many(self, problems: list[Problem]) -> list[SelfVerifyOutcome]:
        from megatron_sz.verify import extract_answer, is_equivalent

        out: list[SelfVerifyOutcome | None] = [None] * len(problems)
        last: dict[int, str] = {}
        ids = {i: f"selfverify:{i}:{p.id}" for i, p in enumerate(problems)}
        for attempt in range(self.role.max_parse_retries + 1):
            todo = [i for i in range(len(problems)) if out[i] is None]
            if not todo:
                break
            got = self._ask([(ids[i], render(self.templates["self_verify"], problem=problems[i].problem))
                             for i in todo], self.role.self_verify_sampling, attempt)
            for i in todo:
                res = got.get(ids[i])
                if res is None or not res.ok or not res.texts:
                    err = res.meta.get("error") if res is not None else "no result"
                    out[i] = SelfVerifyOutcome(True, f"not checked: teacher backend failed ({err})",
                                               status="backend_failed")
                    continue
                text = res.texts[0]
                ans = extract_answer(text, last_number_fallback=False)
                if ans is None:
                    last[i] = text
                    continue  # ask again
                p = problems[i]
                if re.fullmatch(r"\s*\\?(?:text\{)?\s*invalid\s*\}?\s*", ans, re.I):
                    out[i] = SelfVerifyOutcome(False, "teacher judged the problem ambiguous or incomplete: "
                                               + _tail(text, 400), raw=text, status="invalid", answer=ans)
                elif is_equivalent(ans, p.answer):
                    out[i] = SelfVerifyOutcome(True, "reference reproduced", raw=text, status="reproduced",
                                               answer=ans)
                else:
                    out[i] = SelfVerifyOutcome(False, f"teacher re-solved to {ans!r}, reference is {p.answer!r}",
                                               raw=text, status="not_reproduced", answer=ans)
        final = []
        for i, o in enumerate(out):
            if o is None:
                o = SelfVerifyOutcome(False, "teacher gave no final answer in \\boxed{} after "
                                      f"{self.role.max_parse_retries + 1} attempts", raw=last.get(i),
                                      status="no_answer")
            self._count("self_verify", o.status)
            final.append(o)
        return final

    def close(self) -> None:
        self.backend.close()
