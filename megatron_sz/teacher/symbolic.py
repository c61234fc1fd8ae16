"""A teacher with no LLM: templated problem families with answers computed by sympy.

For the embedded CPU default, where the solver is a ~1M-parameter model trained in
minutes, so the problems must be short and learnable: difficulty 1 of the ``add``
family is "Compute 3 + 4." with the solution "3 + 4 = 7. \\boxed{7}". Difficulty
(1..5, stored as ``Problem.level``) grows with operand size and number of steps.

Families: add, sub, mul (arithmetic), linear (one-variable equations), mod (modular
arithmetic), comb (factorials, binomials, permutations). Each family is a
parameter sampler, a text and a solution renderer, and a sympy evaluator; the
evaluator is run again by ``self_verify`` from the parameters stored in
``Problem.extra``.

Everything is deterministic: ``refine`` seeds from (teacher seed, parent id, round,
zone) and ``sample_problems`` from its seed, so a rerun of a round writes the same
problems. Problem ids are content hashes, so the same problem always has the same id.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from megatron_sz.data import Problem, Trajectory
from megatron_sz.inference.base import stable_seed
from megatron_sz.teacher.base import (RefineJob, RefineOutcome, SelfVerifyOutcome, Teacher,
                                      check_zone)

MAX_DIFFICULTY = 5


@dataclass(frozen=True)
class Family:
    name: str
    sample: Callable[[random.Random, int], dict]  # (rng, difficulty) -> params
    answer: Callable[[dict], object]  # params -> sympy value
    text: Callable[[dict], str]
    solution: Callable[[dict, str], str]  # (params, answer string) -> worked solution


def _s(value) -> str:
    """Render a sympy value as the canonical answer string."""
    import sympy

    value = sympy.nsimplify(value) if not isinstance(value, sympy.Basic) else value
    return str(value).replace("**", "^")


def _digits(rng: random.Random, ndigits: int, low_one: bool = False) -> int:
    lo = 10 ** (ndigits - 1) if ndigits > 1 else (1 if low_one else 0)
    return rng.randint(lo, 10 ** ndigits - 1)


# --------------------------------------------------------------------------- families


def _add_sample(rng, d):
    nd, count = {1: (1, 2), 2: (2, 2), 3: (3, 2), 4: (2, 3), 5: (3, 3)}[d]
    return {"terms": [_digits(rng, nd) for _ in range(count)]}


def _add_answer(p):
    import sympy
    return sympy.Add(*[sympy.Integer(t) for t in p["terms"]])


def _chain_solution(op: str, terms: list[int], step: Callable[[int, int], int], ans: str) -> str:
    acc, parts = terms[0], []
    for t in terms[1:]:
        new = step(acc, t)
        parts.append(f"{acc} {op} {t} = {new}")
        acc = new
    return ", ".join(parts) + f". \\boxed{{{ans}}}"


def _sub_sample(rng, d):
    if d == 1:
        a, b = sorted([_digits(rng, 1), _digits(rng, 1)], reverse=True)
        return {"terms": [a, b]}
    if d == 2:
        a, b = sorted([_digits(rng, 2), _digits(rng, 1 + rng.randint(0, 1))], reverse=True)
        return {"terms": [a, b]}
    if d == 3:
        return {"terms": [_digits(rng, 2), _digits(rng, 2)]}  # may be negative
    if d == 4:
        return {"terms": [_digits(rng, 3), _digits(rng, 3)]}
    return {"terms": [_digits(rng, 3), _digits(rng, 2), _digits(rng, 2)]}


def _sub_answer(p):
    import sympy
    t = [sympy.Integer(x) for x in p["terms"]]
    return t[0] - sympy.Add(*t[1:])


def _mul_sample(rng, d):
    shape = {1: [1, 1], 2: [2, 1], 3: [2, 2], 4: [3, 2], 5: [2, 1, 1]}[d]
    return {"terms": [_digits(rng, nd, low_one=True) for nd in shape]}


def _mul_answer(p):
    import sympy
    return sympy.Mul(*[sympy.Integer(t) for t in p["terms"]])


def _linear_sample(rng, d):
    x = rng.randint(-9, 9) if d >= 4 else rng.randint(0, 9)
    if d == 1:  # x + b = c
        return {"a": 1, "b": rng.randint(1, 9), "c": 0, "x": x}
    if d == 2:  # a x = c
        return {"a": rng.randint(2, 9), "b": 0, "c": 0, "x": x}
    if d == 3:  # a x + b = rhs
        return {"a": rng.randint(2, 9), "b": rng.randint(1, 19), "c": 0, "x": x}
    # a x + b = c x + e  (c != a)
    a = rng.randint(2, 12 if d == 5 else 9)
    c = rng.choice([v for v in range(1, a + 5) if v != a])
    return {"a": a, "b": rng.randint(-20, 20), "c": c, "x": x}


def _linear_rhs(p):
    # The right-hand side constant that makes p["x"] the solution.
    return p["a"] * p["x"] + p["b"] - p["c"] * p["x"]


def _linear_text(p):
    a, b, c = p["a"], p["b"], p["c"]
    lhs = _cx(a) + (f" + {b}" if b > 0 else f" - {-b}" if b < 0 else "")
    e = _linear_rhs(p)
    rhs = _cx(c) + (f" + {e}" if e > 0 else f" - {-e}" if e < 0 else "") if c else str(e)
    return f"Solve for x: {lhs} = {rhs}."


def _linear_answer(p):
    import sympy
    x = sympy.Symbol("x")
    sol = sympy.solve(sympy.Eq(p["a"] * x + p["b"], p["c"] * x + _linear_rhs(p)), x)
    return sol[0]


def _cx(k: int) -> str:
    return {1: "x", -1: "-x"}.get(k, f"{k}x")


def _linear_solution(p, ans):
    a, b, c, e = p["a"], p["b"], p["c"], _linear_rhs(p)
    k, r = a - c, e - b
    steps = []
    if c:
        steps.append(f"{_cx(a)} - {_cx(c)} = {_cx(k)}")
    if b:
        steps.append(f"{_cx(k)} = {e} - ({b}) = {r}" if b < 0 else f"{_cx(k)} = {e} - {b} = {r}")
    elif c:
        steps.append(f"{_cx(k)} = {r}")
    if k != 1:
        steps.append(f"x = {r} / {k} = {ans}" if k > 0 else f"x = {r} / ({k}) = {ans}")
    return ", ".join(steps) + f". \\boxed{{{ans}}}"


def _mod_sample(rng, d):
    if d == 1:
        return {"kind": "mod", "a": rng.randint(10, 49), "m": rng.randint(2, 9)}
    if d == 2:
        return {"kind": "mod", "a": rng.randint(100, 999), "m": rng.randint(3, 19)}
    if d == 3:
        return {"kind": "mulmod", "a": rng.randint(10, 99), "b": rng.randint(10, 99), "m": rng.randint(3, 19)}
    if d == 4:
        return {"kind": "powmod", "a": rng.randint(2, 9), "e": rng.randint(3, 6), "m": rng.randint(5, 19)}
    return {"kind": "powmod", "a": rng.randint(2, 19), "e": rng.randint(5, 12), "m": rng.randint(7, 29)}


def _mod_expr(p):
    return {"mod": "{a}", "mulmod": "{a} * {b}", "powmod": "{a}^{e}"}[p["kind"]].format(**p)


def _mod_value(p):
    import sympy
    a = sympy.Integer(p["a"])
    if p["kind"] == "mulmod":
        return a * p["b"]
    if p["kind"] == "powmod":
        return a ** p["e"]
    return a


def _mod_answer(p):
    import sympy
    return sympy.Mod(_mod_value(p), p["m"])


def _mod_text(p):
    expr = _mod_expr(p)
    return f"Compute {expr} mod {p['m']}." if p["kind"] == "mod" else f"Compute ({expr}) mod {p['m']}."


def _mod_solution(p, ans):
    v = _mod_value(p)
    q = int(v) // p["m"]
    pre = "" if p["kind"] == "mod" else f"{_mod_expr(p)} = {v}, "
    return f"{pre}{v} = {q} * {p['m']} + {ans}. \\boxed{{{ans}}}"


def _comb_sample(rng, d):
    if d == 1:
        return {"kind": "fact", "n": rng.randint(1, 5)}
    if d == 2:
        n = rng.randint(3, 7)
        return {"kind": "choose", "n": n, "k": rng.randint(1, n - 1)}
    if d == 3:
        n = rng.randint(5, 10)
        return {"kind": "perm", "n": n, "k": rng.randint(2, 3)}
    if d == 4:
        n = rng.randint(8, 14)
        return {"kind": "choose", "n": n, "k": rng.randint(2, n - 2)}
    n = rng.randint(6, 12)
    return {"kind": "pairs", "n": n, "k": rng.randint(2, 4), "m": rng.randint(2, 5)}


def _comb_answer(p):
    import sympy
    n, k = p["n"], p.get("k")
    if p["kind"] == "fact":
        return sympy.factorial(n)
    if p["kind"] == "choose":
        return sympy.binomial(n, k)
    if p["kind"] == "perm":
        return sympy.ff(n, k)
    return sympy.binomial(n, k) * sympy.binomial(p["m"] + 1, 2)  # two independent choices


def _comb_text(p):
    if p["kind"] == "fact":
        return f"Compute {p['n']}!."
    if p["kind"] == "choose":
        return f"Compute C({p['n']}, {p['k']})."
    if p["kind"] == "perm":
        return f"Compute P({p['n']}, {p['k']})."
    return f"Compute C({p['n']}, {p['k']}) * C({p['m'] + 1}, 2)."


def _comb_solution(p, ans):
    import sympy
    n, k = p["n"], p.get("k")
    if p["kind"] == "fact":
        body = " * ".join(str(i) for i in range(n, 0, -1)) + f" = {ans}"
    elif p["kind"] == "choose":
        body = f"{n}! / ({k}! * {n - k}!) = {ans}"
    elif p["kind"] == "perm":
        body = " * ".join(str(n - i) for i in range(k)) + f" = {ans}"
    else:
        c1, c2 = sympy.binomial(n, k), sympy.binomial(p["m"] + 1, 2)
        body = f"C({n}, {k}) = {c1}, C({p['m'] + 1}, 2) = {c2}, {c1} * {c2} = {ans}"
    return f"{body}. \\boxed{{{ans}}}"


FAMILIES: dict[str, Family] = {
    "add": Family("add", _add_sample, _add_answer,
                  lambda p: "Compute " + " + ".join(map(str, p["terms"])) + ".",
                  lambda p, a: _chain_solution("+", p["terms"], lambda x, y: x + y, a)),
    "sub": Family("sub", _sub_sample, _sub_answer,
                  lambda p: "Compute " + " - ".join(map(str, p["terms"])) + ".",
                  lambda p, a: _chain_solution("-", p["terms"], lambda x, y: x - y, a)),
    "mul": Family("mul", _mul_sample, _mul_answer,
                  lambda p: "Compute " + " * ".join(map(str, p["terms"])) + ".",
                  lambda p, a: _chain_solution("*", p["terms"], lambda x, y: x * y, a)),
    "linear": Family("linear", _linear_sample, _linear_answer, _linear_text, _linear_solution),
    "mod": Family("mod", _mod_sample, _mod_answer, _mod_text, _mod_solution),
    "comb": Family("comb", _comb_sample, _comb_answer, _comb_text, _comb_solution),
}

# Seed problems that are not symbolic get a family from their subject.
_SUBJECT_FAMILY = {"number theory": "mod", "counting & probability": "comb", "counting": "comb",
                   "algebra": "linear", "intermediate algebra": "linear", "prealgebra": "add",
                   "precalculus": "mul", "geometry": "mul"}


def make_problem(family: str, difficulty: int, rng: random.Random, *, provenance: str = "teacher",
                 parent_id: str | None = None, round: int = 0) -> Problem:
    """One problem of ``family`` at ``difficulty`` (1..5), answer computed by sympy."""
    fam = FAMILIES[family]
    d = max(1, min(MAX_DIFFICULTY, int(difficulty)))
    params = fam.sample(rng, d)
    ans = _s(fam.answer(params))
    digest = stable_seed(family, d, sorted(params.items()))
    return Problem(id=f"sym-{family}-d{d}-{digest % (1 << 40):010x}", problem=fam.text(params),
                   answer=ans, solution=fam.solution(params, ans), subject=family, level=d,
                   provenance=provenance, parent_id=parent_id, round=round,
                   extra={"family": family, "difficulty": d, "params": params})


class SymbolicTeacher(Teacher):
    """Deterministic teacher for the embedded default; see the module docstring."""

    kind = "symbolic"

    def __init__(self, *, seed: int = 0, families: list[str] | None = None):
        super().__init__()
        self.seed = int(seed)
        self.families = list(families or FAMILIES)
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            from megatron_sz.errors import RecipeError

            raise RecipeError(f"unknown symbolic problem families {unknown}", where="teacher.families",
                              fix=f"choose from {', '.join(FAMILIES)}")

    # ---------------------------------------------------------------- data

    def sample_problems(self, n: int, *, seed: int, difficulty: int | tuple[int, int] = 1,
                        families: list[str] | None = None,
                        exclude_ids: set[str] | frozenset = frozenset(),
                        provenance: str = "seed") -> list[Problem]:
        """``n`` distinct problems, families round-robin, difficulty fixed or a (lo, hi) range."""
        fams = list(families or self.families)
        lo, hi = (difficulty, difficulty) if isinstance(difficulty, int) else difficulty
        rng = random.Random(stable_seed("sample", self.seed, seed))
        out: list[Problem] = []
        seen = set(exclude_ids)
        tries = 0
        while len(out) < n and tries < 50 * n + 100:
            fam = fams[(len(out) + tries) % len(fams)]
            tries += 1
            p = make_problem(fam, rng.randint(lo, hi), rng, provenance=provenance)
            if p.id in seen:
                continue
            seen.add(p.id)
            out.append(p)
            tries -= 1
        if len(out) < n:
            raise ValueError(f"only {len(out)} distinct problems exist for families {fams} at "
                             f"difficulty {difficulty}; ask for fewer or widen the difficulty range")
        return out

    # ---------------------------------------------------------------- roles

    def verify(self, problems: dict[str, Problem], trajs: list[Trajectory]) -> list[Trajectory]:
        from megatron_sz.verify import extract_answer, verify_batch

        known = [t for t in trajs if t.problem_id in problems]
        for t in trajs:
            if t.problem_id not in problems:
                self.stats["verify.unknown_problem"] += 1
        for t in known:
            if t.extracted_answer is None:
                t.extracted_answer = extract_answer(t.text)
        verdicts = verify_batch([(t.extracted_answer, problems[t.problem_id].answer) for t in known]).results
        for t, v in zip(known, verdicts):
            t.correct = bool(v.equivalent) if v.equivalent is not None else False
            t.verifier = "rule"
            t.extra["verify_reason"] = v.reason
            self._count("verify", "rule" if v.decided_by == "rule" else "undecided_as_incorrect")
        return trajs

    def refine_many(self, jobs: list[RefineJob]) -> list[RefineOutcome]:
        return [self._refine_one(j) for j in jobs]

    def _refine_one(self, job: RefineJob) -> RefineOutcome:
        check_zone(job.zone)
        p = job.problem
        family = p.extra.get("family") or _SUBJECT_FAMILY.get((p.subject or "").lower())
        if family not in self.families:
            family = self.families[stable_seed(p.id) % len(self.families)]
        d = int(p.extra.get("difficulty") or p.level or 1)
        d = {"mastered": d + 1, "learning": d, "too_hard": d - 1}[job.zone]
        d = max(1, min(MAX_DIFFICULTY, d))
        rng = random.Random(stable_seed("refine", self.seed, p.id, job.round, job.zone, job.variant))
        for _ in range(20):
            new = make_problem(family, d, rng, provenance="teacher", parent_id=p.id, round=job.round)
            if new.id != p.id and new.problem != p.problem:
                new.extra["zone"] = job.zone
                self._count("refine", "ok")
                return RefineOutcome("ok", new, raw=None, reason=f"{family} difficulty {d} ({job.zone})")
        self._count("refine", "rejected")
        return RefineOutcome("rejected", None, reason=f"no new {family} problem at difficulty {d}")

    def self_verify_many(self, problems: list[Problem]) -> list[SelfVerifyOutcome]:
        from megatron_sz.verify import is_equivalent

        out = []
        for p in problems:
            fam = FAMILIES.get(p.extra.get("family", ""))
            params = p.extra.get("params")
            if fam is None or not isinstance(params, dict):
                out.append(SelfVerifyOutcome(True, "not a symbolic problem; kept unchecked",
                                             status="not_checked"))
                self._count("self_verify", "not_checked")
                continue
            try:
                ans = _s(fam.answer(params))
            except Exception as exc:  # corrupted params in a hand-edited file
                out.append(SelfVerifyOutcome(False, f"could not re-solve: {exc}", status="invalid"))
                self._count("self_verify", "invalid")
                continue
            if is_equivalent(ans, p.answer):
                out.append(SelfVerifyOutcome(True, "reference reproduced", status="reproduced", answer=ans))
                self._count("self_verify", "reproduced")
            else:
                out.append(SelfVerifyOutcome(False, f"re-solved answer {ans} != reference {p.answer}",
                                             status="not_reproduced", answer=ans))
                self._count("self_verify", "not_reproduced")
        return out
