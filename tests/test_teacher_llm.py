"""The LLM teacher with scripted replies: rule-first verification with a judge, refinement with
parse retries, self-verification; backend failures never raise."""
from __future__ import annotations

import dataclasses
import random
import socket

from inference_support import ScriptedBackend
from megatron_sz.data import Problem, Trajectory
from megatron_sz.recipe import BackendSpec, TeacherRole
from megatron_sz.teacher import RefineJob, make_teacher
from megatron_sz.teacher.llm import LLMTeacher
from megatron_sz.teacher.symbolic import SymbolicTeacher


def _role(**kw) -> TeacherRole:
    return dataclasses.replace(TeacherRole(kind="llm"), **kw)


def _problems(seed, n=4):
    return SymbolicTeacher(seed=seed).sample_problems(n, seed=seed, difficulty=2, families=["add", "mul"])


def test_verify_rules_first_then_judge(rng_seed):
    rng = random.Random(rng_seed)
    probs = _problems(rng_seed)
    by_id = {p.id: p for p in probs}
    trajs, truth = [], {}
    for p in probs:
        for j, kind in enumerate(rng.sample(["right", "wrong", "words", "words_wrong"], 4)):
            text = {"right": f"\\boxed{{{p.answer}}}", "wrong": f"\\boxed{{{int(p.answer) + 2}}}",
                    "words": "The result is forty-something, I believe.", "words_wrong": "No clue."}[kind]
            trajs.append(Trajectory(problem_id=p.id, sample_index=j, text=text))
            truth[(p.id, j)] = kind

    def judge(req, _j, _call):
        content = req.prompt[0]["content"]
        assert "Reference answer:" in content
        return '{"correct": true, "reason": "equal"}' if "forty" in content else "```json\n{\"correct\": false}\n```"

    be = ScriptedBackend(judge)
    t = LLMTeacher(be, role=_role(judge="undecided"), seed=rng_seed)
    out = t.verify(by_id, trajs)
    for tr in out:
        kind = truth[(tr.problem_id, tr.sample_index)]
        if kind in ("right", "wrong"):
            assert tr.verifier == "rule" and tr.correct is (kind == "right")
        else:
            assert tr.verifier == "judge" and tr.correct is (kind == "words")
    assert len(be.calls) == 2 * len(probs)  # only the undecided went to the judge
    assert t.stats["verify.judge_undecided"] == 2 * len(probs)

    # judge: never -> no calls; undecided counts as incorrect.
    be2 = ScriptedBackend(judge)
    fresh = [Trajectory(problem_id=x.problem_id, sample_index=x.sample_index, text=x.text) for x in trajs]
    out2 = LLMTeacher(be2, role=_role(judge="never")).verify(by_id, fresh)
    assert not be2.calls and all(x.verifier == "rule" for x in out2)
    assert sum(x.correct for x in out2) == len(probs)


def test_spot_check_disagreement_and_judge_failure(rng_seed):
    probs = _problems(rng_seed, 2)
    by_id = {p.id: p for p in probs}
    trajs = [Trajectory(problem_id=probs[0].id, sample_index=0, text=f"\\boxed{{{probs[0].answer}}}"),
             Trajectory(problem_id=probs[1].id, sample_index=0, text="no answer here")]
    # The judge claims the rule-correct answer is wrong, and babbles about the other one.
    be = ScriptedBackend(lambda req, j, c: "INCORRECT" if probs[0].problem in req.prompt[0]["content"]
                         else "let me think about it")
    t = LLMTeacher(be, role=_role(judge="undecided", judge_spot_check=1.0, max_parse_retries=2))
    a, b = t.verify(by_id, trajs)
    assert a.verifier == "judge" and a.correct is False
    assert a.extra["rule_verdict"] is True and a.extra["judge_disagreed"]
    assert b.correct is False and b.extra["judge_failed"] and b.verifier == "rule"
    assert t.stats["verify.judge_disagreed"] == 1 and t.stats["verify.judge_failed_undecided"] == 1
    assert len(be.calls) == 1 + 3  # one spot check, three tries at the unparseable one


def test_refine_retries_then_classifies(rng_seed):
    probs = _problems(rng_seed, 4)
    good = '{"enhanced_question": "Compute 17 * 23.", "solution": "17 * 23 = 391. \\\\boxed{391}", "answer": "391"}'
    state: dict[str, int] = {}

    def reply(req, j, call):
        key = req.meta["key"]
        state[key] = state.get(key, 0) + 1
        content = req.prompt[0]["content"]
        if probs[0].problem in content:  # fenced + prose on the second try
            return "Sure! " if state[key] == 1 else f"Here you go:\n```json\n{good}\n```\nEnjoy."
        if probs[1].problem in content:  # never parseable
            return '{"enhanced_question": "Compute 1 + 1.", "solution": "2"'
        if probs[2].problem in content:  # answer disagrees with its own solution
            return good.replace('"answer": "391"', '"answer": "392"')
        return RuntimeError("endpoint down")

    be = ScriptedBackend(reply)
    t = LLMTeacher(be, role=_role(max_parse_retries=2))
    fail = Trajectory(problem_id=probs[0].id, sample_index=0, text="I think \\boxed{1}")
    outs = t.refine_many([RefineJob(probs[0], "learning", 3, failed=fail),
                          RefineJob(probs[1], "mastered", 3, succeeded=fail),
                          RefineJob(probs[2], "too_hard", 3, failed=fail),
                          RefineJob(probs[3], "learning", 3)])
    ok, bad, rej, down = outs
    assert ok.status == "ok" and ok.attempts == 2
    q = ok.problem
    assert q.problem == "Compute 17 * 23." and q.answer == "391" and q.parent_id == probs[0].id
    assert q.provenance == "teacher" and q.round == 3 and q.level == probs[0].level
    assert bad.status == "parse_failed" and bad.attempts == 3 and bad.raw.startswith('{"enhanced_question"')
    assert rej.status == "rejected" and "disagrees" in rej.reason
    assert down.status == "backend_failed" and "endpoint down" in down.reason
    assert t.stats["refine.ok"] == 1 and t.stats["refine.parse_failed"] == 1
    assert t.stats["refine.rejected"] == 1 and t.stats["refine.backend_failed"] == 1
    prompts = {c.meta["key"].split(":")[1]: c.prompt[0]["content"] for c in be.calls}
    assert "I think \\boxed{1}" in prompts["0"] and "got it wrong" in prompts["0"]
    assert "harder" in prompts["1"] and "easier" in prompts["2"]


def test_self_verify_outcomes(rng_seed):
    probs = _problems(rng_seed, 5)
    calls: dict[str, int] = {}

    def reply(req, j, c):
        content = req.prompt[0]["content"]
        i = next(k for k, p in enumerate(probs) if p.problem in content)
        calls[i] = calls.get(i, 0) + 1
        return [f"... \\boxed{{{probs[0].answer}}}", f"\\boxed{{{int(probs[1].answer) + 1}}}",
                "Missing information. \\boxed{INVALID}",
                "thinking..." if calls[i] == 1 else f"so \\boxed{{{probs[3].answer}}}",
                RuntimeError("timeout")][i]

    t = LLMTeacher(ScriptedBackend(reply), role=_role(max_parse_retries=1))
    o = t.self_verify_many(probs)
    assert [x.status for x in o] == ["reproduced", "not_reproduced", "invalid", "reproduced", "backend_failed"]
    assert [x.keep for x in o] == [True, False, False, True, True]
    assert "reference" in o[1].reason and o[1].raw
    assert calls[3] == 2


def test_dead_endpoint_never_crashes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    role = _role(backend=BackendSpec(kind="openai", endpoints=[f"http://127.0.0.1:{port}/v1"], model="m",
                                     max_retries=1, backoff_base_s=0.01, timeout_s=2))
    t = make_teacher(role, seed=0)
    p = Problem(id="p", problem="Compute 2 + 3.", answer="5")
    assert t.refine(p, zone="learning").status == "backend_failed"
    assert t.self_verify(p).status == "backend_failed"
    tr = t.verify({"p": p}, [Trajectory(problem_id="p", sample_index=0, text="hmm")])[0]
    assert tr.correct is False and tr.extra["judge_failed"]
    t.close()
