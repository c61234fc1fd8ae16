"""The symbolic teacher: every family and difficulty yields problems whose answers verify,
refinements move difficulty the right way, and everything is deterministic from a seed."""
from __future__ import annotations

import math
import random

import pytest

from megatron_sz.data import Problem, Trajectory
from megatron_sz.teacher import RefineJob, make_teacher
from megatron_sz.teacher.symbolic import FAMILIES, MAX_DIFFICULTY, SymbolicTeacher, make_problem
from megatron_sz.verify import extract_answer, is_equivalent


def _python_answer(p: Problem) -> int:
    """An independent reference: plain Python integer arithmetic from the stored params."""
    fam, q = p.extra["family"], p.extra["params"]
    if fam in ("add", "sub", "mul"):
        t = q["terms"]
        if fam == "add":
            return sum(t)
        if fam == "sub":
            return t[0] - sum(t[1:])
        return math.prod(t)
    if fam == "linear":
        return q["x"]
    if fam == "mod":
        v = {"mod": q["a"], "mulmod": q.get("a", 0) * q.get("b", 0), "powmod": q["a"] ** q.get("e", 1)}[q["kind"]]
        return v % q["m"]
    if fam == "comb":
        n, k = q["n"], q.get("k")
        return {"fact": math.factorial(n), "choose": math.comb(n, k or 0), "perm": math.perm(n, k or 0),
                "pairs": math.comb(n, k or 0) * math.comb(q.get("m", 0) + 1, 2)}[q["kind"]]
    raise AssertionError(fam)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_and_difficulty_verifies(family, rng_seed):
    rng = random.Random(rng_seed)
    for d in range(1, MAX_DIFFICULTY + 1):
        for _ in range(12):
            p = make_problem(family, d, rng)
            p.validate()
            assert p.level == d and p.subject == family
            assert int(p.answer) == _python_answer(p), (p.problem, p.answer)
            assert is_equivalent(extract_answer(p.solution), p.answer), (p.solution, p.answer)
            assert p.solution.rstrip().endswith(f"\\boxed{{{p.answer}}}")
            assert len(p.problem) < 60  # short: the embedded default's solver is tiny


def test_easy_problems_are_short_and_templated():
    t = SymbolicTeacher(seed=0)
    easy = t.sample_problems(30, seed=1, difficulty=1)
    assert max(len(p.problem) for p in easy) <= 30
    assert max(len(p.solution) for p in easy) <= 60
    adds = [p for p in easy if p.extra["family"] == "add"]
    assert adds and all(p.problem.startswith("Compute ") and " + " in p.problem for p in adds)


def test_sample_problems_deterministic_distinct(rng_seed):
    t = SymbolicTeacher(seed=rng_seed % 100)
    a = t.sample_problems(40, seed=rng_seed, difficulty=(1, 3))
    b = SymbolicTeacher(seed=rng_seed % 100).sample_problems(40, seed=rng_seed, difficulty=(1, 3))
    assert [p.id for p in a] == [p.id for p in b] and [p.problem for p in a] == [p.problem for p in b]
    assert len({p.id for p in a}) == 40
    assert {p.extra["family"] for p in a} == set(FAMILIES)
    assert {p.level for p in a} <= {1, 2, 3}
    c = t.sample_problems(40, seed=rng_seed + 1, difficulty=(1, 3), exclude_ids={p.id for p in a})
    assert not ({p.id for p in c} & {p.id for p in a})
    with pytest.raises(ValueError):
        t.sample_problems(500, seed=0, difficulty=1, families=["comb"])  # only 5 factorials exist


def test_refine_moves_difficulty_by_zone(rng_seed):
    t = make_teacher(__import__("megatron_sz.recipe", fromlist=["TeacherRole"]).TeacherRole(kind="symbolic"),
                     seed=rng_seed % 1000)
    rng = random.Random(rng_seed)
    for family in FAMILIES:
        d = rng.randint(2, 4)
        p = make_problem(family, d, rng, provenance="seed")
        for zone, want in (("mastered", d + 1), ("learning", d), ("too_hard", d - 1)):
            out = t.refine(p, zone=zone, round=2)
            assert out.status == "ok", out.reason
            q = out.problem
            assert q.extra["family"] == family and q.level == want
            assert q.parent_id == p.id and q.provenance == "teacher" and q.round == 2
            assert q.problem != p.problem
            assert is_equivalent(extract_answer(q.solution), q.answer)
            again = t.refine(p, zone=zone, round=2)
            assert again.problem.id == q.id  # deterministic
            other = t.refine(p, zone=zone, round=2, variant=1)
            assert other.status == "ok" and other.problem.level == want
    top = make_problem("add", MAX_DIFFICULTY, rng)
    assert t.refine(top, zone="mastered").problem.level == MAX_DIFFICULTY
    # A non-symbolic seed problem gets a family from its subject.
    seed = Problem(id="s1", problem="How many primes are below 20?", answer="8", subject="Number Theory", level=3)
    out = t.refine(seed, zone="learning", round=1)
    assert out.status == "ok" and out.problem.extra["family"] == "mod" and out.problem.level == 3
    assert t.stats["refine.ok"] >= 37


def test_verify_and_self_verify(rng_seed):
    t = SymbolicTeacher(seed=1)
    probs = {p.id: p for p in t.sample_problems(6, seed=rng_seed, difficulty=2)}
    rng = random.Random(rng_seed)
    trajs, want = [], []
    for pid, p in probs.items():
        good = rng.random() < 0.5
        ans = p.answer if good else str(int(p.answer) + rng.randint(1, 5))
        trajs.append(Trajectory(problem_id=pid, sample_index=0, text=f"work... \\boxed{{{ans}}}"))
        want.append(good)
    trajs.append(Trajectory(problem_id=next(iter(probs)), sample_index=1, text="I do not know"))
    want.append(False)
    out = t.verify(probs, trajs)
    assert [tr.correct for tr in out] == want
    assert all(tr.verifier == "rule" for tr in out)
    kept = t.self_verify_many(list(probs.values()))
    assert all(o.keep and o.status == "reproduced" for o in kept)
    broken = list(probs.values())[0]
    broken = Problem(**{**broken.__dict__, "answer": str(int(broken.answer) + 1)})
    o = t.self_verify(broken)
    assert not o.keep and o.status == "not_reproduced" and "reference" in o.reason
    foreign = Problem(id="x", problem="Find the area of a unit circle.", answer="\\pi")
    assert t.self_verify(foreign).status == "not_checked"
    batch = t.refine_many([RefineJob(p, "learning", 1) for p in probs.values()])
    assert all(o.status == "ok" for o in batch)


def test_families_from_recipe():
    from megatron_sz.errors import RecipeError
    from megatron_sz.recipe import TeacherRole

    t = make_teacher(TeacherRole(kind="symbolic", families=["add", "sub"]), seed=0)
    assert {p.extra["family"] for p in t.sample_problems(20, seed=0, difficulty=1)} == {"add", "sub"}
    with pytest.raises(RecipeError, match="teacher.families"):
        make_teacher(TeacherRole(kind="symbolic", families=["calculus"]), seed=0)
