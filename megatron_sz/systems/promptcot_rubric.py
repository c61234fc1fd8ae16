"""PromptCoT's judging: the rubric parser, the two-judge rule, and the symbolic judge.

What is unusual here: a judge's reply is data from a model, so ``parse_rubric`` never
raises. It reads the five criteria (``data.RUBRIC_CRITERIA``: format, correctness,
difficulty, concept coverage, solvability) from JSON (fenced, nested, truncated, with
prose around it, keys spelled loosely, scores as numbers, words, "5/5" or "8/10") or
from ``Criterion: score`` lines, after dropping HTML tags. Anything else is one of the
malformed classes of ``data.RUBRIC_STATUSES`` (empty, no_rubric, missing_fields,
bad_value, out_of_range, wrong_type), which the select stage counts and treats as "not
perfect": a malformed reply can reject a problem, never crash a round.

``all_perfect`` is the agreement rule: a candidate is kept only when *every* judge of
the recipe has a parsed reply rating every criterion at the top of the scale.

The symbolic judge (the tiny recipe's) recognises the symbolic teacher's problem
templates (``teacher/symbolic.py``), recovers the parameters, re-computes the answer and
checks the level ranges of the requested difficulty; it writes its verdict as a JSON
rubric reply that goes through the same parser as an LLM judge's.
"""
from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterable, Sequence

from megatron_sz.data import RUBRIC_CRITERIA, JudgeScore

PARSED = ("ok", "repaired")

_KEY_ALIASES = {
    "format": ("format", "formatting", "format_score", "well_formed", "presentation"),
    "correctness": ("correctness", "correct", "accuracy", "correctness_score", "mathematical_correctness",
                    "validity", "well_posedness"),
    "difficulty": ("difficulty", "difficulty_match", "difficulty_level", "difficulty_score", "level"),
    "concept_coverage": ("concept_coverage", "coverage", "concepts", "concept_usage", "concept", "concept_match",
                         "concepts_coverage", "conceptcoverage", "concept_coverage_score"),
    "solvability": ("solvability", "solvable", "solvability_score", "feasibility"),
}
_ALIAS_OF = {a: c for c, names in _KEY_ALIASES.items() for a in names}
_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
          "nine": 9, "ten": 10}
_TOP_WORDS = ("perfect", "excellent", "full", "flawless", "max", "maximum", "yes", "true", "pass", "passed")
_BOTTOM_WORDS = ("no", "false", "fail", "failed", "none", "poor", "bad", "wrong", "incorrect")
_TAG = re.compile(r"<\s*/?\s*[a-zA-Z][^<>]*>")
_LINE = re.compile(r"(?im)^[\s>*#\-|]*\**\s*(format(?:ting)?|correctness|difficulty|concept[\s_-]*coverage|"
                   r"coverage|solvability)\s*\**\s*(?:score)?\s*[:=|\-–]\s*\**\s*([^\n|,;]*)")


@dataclass
class RubricReply:
    """A parsed (or classified) judge reply; ``status`` as in ``JudgeScore``."""

    status: str
    scores: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    reason: str = ""

    @property
    def parsed(self) -> bool:
        return self.status in PARSED

    def perfect(self, scale: int) -> bool:
        return self.parsed and all(self.scores.get(c) is not None and self.scores[c] >= scale
                                   for c in RUBRIC_CRITERIA)


def _key(name: Any) -> str | None:
    k = re.sub(r"[\s\-]+", "_", str(name).strip().lower()).strip("_*")
    return _ALIAS_OF.get(k) or _ALIAS_OF.get(k.replace("_", ""))


def score_value(value: Any, scale: int) -> tuple[float | None, str | None]:
    """One criterion's score on 1..scale, or (None, why): bad_value / out_of_range."""
    if isinstance(value, dict):  # {"score": 5, "reason": ...}
        for k in ("score", "value", "rating", "points", "grade"):
            if k in value:
                return score_value(value[k], scale)
        return None, "bad_value"
    if isinstance(value, bool):
        return (float(scale) if value else 1.0), None
    if isinstance(value, (int, float)):
        v = float(value)
        if not math.isfinite(v):
            return None, "out_of_range"
        return (v, None) if 1 <= v <= scale else (None, "out_of_range")
    if not isinstance(value, str):
        return None, "bad_value"
    s = value.strip().strip("*`'\".").strip().lower()
    if not s:
        return None, "bad_value"
    if s in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity"):
        return None, "out_of_range"
    m = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*(?:/|out of|of)\s*(\d+(?:\.\d+)?)(?:\s*\S.*)?", s)
    if m:
        num, den = float(m.group(1)), float(m.group(2))
        if den <= 0 or num < 0 or num > den:
            return None, "out_of_range"
        v = num if den == scale else 1 + (scale - 1) * num / den if num > 0 else 0.0
        v = round(v, 3)
        return (v, None) if 1 <= v <= scale else (None, "out_of_range")
    m = re.match(r"(-?\d+(?:\.\d+)?)(?![\d/])", s)
    if m:
        return score_value(float(m.group(1)), scale)
    first = re.split(r"[\s(,:;.!]+", s)[0]
    if first in _WORDS:
        return score_value(_WORDS[first], scale)
    if first in _TOP_WORDS:
        return float(scale), None
    if first in _BOTTOM_WORDS:
        return 1.0, None
    return None, "bad_value"


def _criteria_in(obj: Any, depth: int = 0) -> dict[str, Any]:
    """criterion -> raw value, from an object (nested under any key), or a list of
    {criterion|name: ..., score: ...} items."""
    found: dict[str, Any] = {}
    if depth > 4:
        return found
    if isinstance(obj, list):
        for it in obj:
            if isinstance(it, dict):
                name = next((it[k] for k in ("criterion", "name", "aspect", "category") if k in it), None)
                c = _key(name) if name is not None else None
                if c is not None:
                    found.setdefault(c, it.get("score", it.get("value", it.get("rating"))))
                else:
                    for k, v in _criteria_in(it, depth + 1).items():
                        found.setdefault(k, v)
        return found
    if not isinstance(obj, dict):
        return found
    for k, v in obj.items():
        c = _key(k)
        if c is not None and not (c == "concept_coverage" and isinstance(v, list)):
            found.setdefault(c, v)
    for v in obj.values():
        if isinstance(v, (dict, list)):
            for k2, v2 in _criteria_in(v, depth + 1).items():
                found.setdefault(k2, v2)
    return found


def parse_rubric(text: str | None, scale: int = 5) -> RubricReply:
    """The judge's five scores; never raises (see the module docstring)."""
    try:
        return _parse_rubric(text, scale)
    except Exception as exc:  # noqa: BLE001 - a parser bug must not crash a round
        return RubricReply("no_rubric", reason=f"parser error: {exc!r}")


def _parse_rubric(text: str | None, scale: int) -> RubricReply:
    from megatron_sz.teacher.parsing import parse_json_reply

    if text is None or not str(text).strip():
        return RubricReply("empty", reason="empty reply")
    text = str(text)
    notes: set[str] = set()
    if _TAG.search(text):
        text = html.unescape(_TAG.sub("\n", text))
        notes.add("html")
    raw: dict[str, Any] = {}
    p = parse_json_reply(text, required=RUBRIC_CRITERIA)
    reason = ""
    if p.data is not None:
        raw = _criteria_in(p.data)
        notes.update(n for n in p.notes if n not in ("aliased_keys",))
        reason = str(p.data.get("reason") or p.data.get("explanation") or p.data.get("comment") or "")[:300]
    else:  # a bare JSON list of criteria
        try:
            raw = _criteria_in(json.loads(text.strip()))
        except (ValueError, TypeError):
            raw = {}
    if len(raw) < len(RUBRIC_CRITERIA):  # "Criterion: score" lines in prose or markdown
        lines = {}
        for m in _LINE.finditer(text):
            c = _key(m.group(1))
            if c is not None:
                lines[c] = m.group(2)  # the last mention wins (a reply that corrects itself)
        for c, v in lines.items():
            if c not in raw:
                raw[c] = v
                notes.add("key_value_lines")
    if not raw:
        if p.status == "wrong_type":
            return RubricReply("wrong_type", notes=sorted(notes), reason=p.error)
        return RubricReply("no_rubric", notes=sorted(notes), reason="no rubric scores found")
    scores: dict[str, float | None] = {}
    problems: list[str] = []
    for c in RUBRIC_CRITERIA:
        if c not in raw:
            scores[c] = None
            problems.append("missing_fields")
            continue
        v, why = score_value(raw[c], scale)
        scores[c] = v
        if why:
            problems.append(why)
    for cls in ("out_of_range", "bad_value", "missing_fields"):
        if cls in problems:
            missing = [c for c in RUBRIC_CRITERIA if scores[c] is None]
            return RubricReply(cls, scores, sorted(notes), f"{cls}: {', '.join(missing)}")
    repaired = notes - {"fenced", "leading_text", "trailing_text", "nested"}
    return RubricReply("repaired" if repaired else "ok", scores, sorted(notes), reason)


def judge_score(candidate_id: str, judge: str, reply: RubricReply, scale: int, *, raw: str | None,
                detected: dict | None = None) -> JudgeScore:
    """The JudgeScore record of a parsed (or malformed) reply."""
    bad = None if reply.parsed else reply.status
    return JudgeScore(candidate_id=candidate_id, judge=judge, scores=dict(reply.scores), status=reply.status,
                      perfect=reply.perfect(scale), scale=scale, malformed=bad, notes=list(reply.notes),
                      reason=reply.reason or None, raw=None if raw is None else raw[:2000],
                      detected=dict(detected or {}))


def all_perfect(scores: Iterable[JudgeScore], judges: Sequence[str]) -> bool:
    """The agreement rule: every judge in ``judges`` scored the candidate, parsed, perfect."""
    by = {s.judge: s for s in scores}
    return bool(judges) and all(j in by and by[j].perfect and by[j].malformed is None for j in judges)


# --------------------------------------------------------------------------- LLM prompts

CONCEPTS_PROMPT = (
    "List the mathematical concepts a student must know to solve the problem below, at most {n} of them, "
    "each a short noun phrase, and rate the problem's difficulty from 1 (routine) to 5 (olympiad).\n"
    'Reply with JSON only: {{"concepts": ["...", "..."], "difficulty": 3}}\n\nProblem:\n{problem}\n')
RATIONALE_PROMPT = (
    "A problem setter wrote the problem below from these concepts at difficulty {difficulty} of 5: {concepts}.\n"
    "Write the setter's rationale: how one goes from the concepts to this exact problem (which concepts to "
    "combine, what makes it that difficult), step by step, without solving it.\n"
    'Reply with JSON only: {{"rationale": "..."}}\n\nProblem:\n{problem}\n')
JUDGE_PROMPT = (
    "You judge a generated math problem. Requested concepts: {concepts}. Requested difficulty: {difficulty} "
    "of 5.\n\nProblem:\n{problem}\n\n"
    "Score each criterion from 1 (bad) to {scale} (perfect): format (one clear, self-contained problem "
    "statement), correctness (well posed, no contradictions or errors), difficulty (matches the requested "
    "difficulty), concept_coverage (uses every requested concept), solvability (has a definite answer).\n"
    'Reply with JSON only: {{"format": s, "correctness": s, "difficulty": s, "concept_coverage": s, '
    '"solvability": s, "reason": "one sentence"}}\n')


def parse_concepts_reply(text: str | None, limit: int) -> tuple[str, list[str], int | None, str]:
    """(status, concepts, difficulty, reason) from a concept-extraction reply; never raises."""
    from megatron_sz.teacher.parsing import parse_json_reply

    if text is None or not str(text).strip():
        return "parse_failed", [], None, "empty reply"
    p = parse_json_reply(text, required=())
    data = p.data or {}
    raw = next((data[k] for k in ("concepts", "concept_list", "foundational_concepts", "key_concepts")
                if k in data), None)
    if isinstance(raw, str):
        raw = [c for c in re.split(r"[;,\n]", raw)]
    concepts = [re.sub(r"\s+", " ", str(c)).strip(" -*.") for c in (raw or []) if str(c).strip(" -*.")]
    if not concepts:  # a bulleted / numbered list in prose
        concepts = [m.strip(" .") for m in re.findall(r"(?m)^\s*(?:[-*•]|\d+[.)])\s+(.+)$", str(text))][:limit]
        p.notes.append("list_in_prose")
    d = data.get("difficulty", data.get("level"))
    v, why = score_value(d, 5) if d is not None else (None, None)
    diff = None if v is None else max(1, min(5, int(round(v))))
    if not concepts:
        return "parse_failed", [], diff, p.error or "no concepts found"
    return ("ok" if p.status == "ok" else "repaired"), concepts[:limit], diff, ""


def parse_rationale_reply(text: str | None) -> tuple[str, str | None, str]:
    from megatron_sz.teacher.parsing import parse_json_reply

    if text is None or not str(text).strip():
        return "parse_failed", None, "empty reply"
    p = parse_json_reply(text, required=("rationale",))
    if p.ok:
        return ("ok" if p.status == "ok" else "repaired"), str(p.data["rationale"]).strip(), ""
    body = re.sub(r"(?is)^\s*(?:rationale\s*:)?", "", str(text)).strip()
    if len(body) >= 20 and "{" not in body[:5]:
        return "repaired", body, "plain-text rationale"
    return "parse_failed", None, p.error or "no rationale"


# --------------------------------------------------------------------------- symbolic

# The symbolic families' level ranges, mirrored from teacher/symbolic.py's samplers.
_TERM_SHAPES = {  # family -> level -> digits per term
    "add": {1: (1, 1), 2: (2, 2), 3: (3, 3), 4: (2, 2, 2), 5: (3, 3, 3)},
    "mul": {1: (1, 1), 2: (2, 1), 3: (2, 2), 4: (3, 2), 5: (2, 1, 1)},
    "sub": {1: (1, 1), 2: (2, None), 3: (2, 2), 4: (3, 3), 5: (3, 2, 2)},  # None: 1 or 2 digits
}
RATIONALES = {
    "add": {1: "add two one-digit numbers", 2: "add two two-digit numbers", 3: "add two three-digit numbers",
            4: "add three two-digit numbers", 5: "add three three-digit numbers"},
    "sub": {1: "subtract a one-digit number from a larger one", 2: "subtract a smaller number from a two-digit one",
            3: "subtract two two-digit numbers", 4: "subtract two three-digit numbers",
            5: "subtract two two-digit numbers from a three-digit one"},
    "mul": {1: "multiply two one-digit numbers", 2: "multiply a two-digit number by a one-digit one",
            3: "multiply two two-digit numbers", 4: "multiply a three-digit number by a two-digit one",
            5: "multiply a two-digit number by two one-digit ones"},
    "linear": {1: "solve x plus a constant equals a value", 2: "solve a multiple of x equals a value",
               3: "solve a multiple of x plus a constant equals a value",
               4: "solve with x on both sides", 5: "solve with larger coefficients of x on both sides"},
    "mod": {1: "reduce a two-digit number mod a small modulus", 2: "reduce a three-digit number mod m",
            3: "reduce a product of two two-digit numbers mod m", 4: "reduce a small power mod m",
            5: "reduce a larger power mod m"},
    "comb": {1: "a small factorial", 2: "a small binomial coefficient", 3: "permutations of k from n",
             4: "a larger binomial coefficient", 5: "a product of two binomial choices"},
}
_MAX_DIGITS = 12  # a generated "Compute 10^99999 ..." is not solvable in this checker's budget
_MAX_N = 60


def _nd(v: int) -> int:
    return len(str(abs(v)))


def _cx_parse(s: str) -> int | None:
    m = re.fullmatch(r"(-?\d*)x", s)
    if not m:
        return None
    c = m.group(1)
    return 1 if c == "" else -1 if c == "-" else int(c)


def _side(s: str) -> tuple[int, int] | None:
    """'3x + 4' -> (3, 4); '-x - 2' -> (-1, -2); '7' -> (0, 7)."""
    s = s.strip()
    if re.fullmatch(r"-?\d+", s):
        return 0, int(s)
    m = re.fullmatch(r"(-?\d*x)(?: ([+-]) (\d+))?", s)
    if not m:
        return None
    k = _cx_parse(m.group(1))
    if k is None:
        return None
    b = 0 if m.group(2) is None else (int(m.group(3)) if m.group(2) == "+" else -int(m.group(3)))
    return k, b


def parse_symbolic(text: str) -> tuple[str, dict] | None:
    """(family, params) of a problem written in a symbolic template, else None."""
    s = (text or "").strip()
    for fam, op in (("add", r"\+"), ("sub", "-"), ("mul", r"\*")):
        m = re.fullmatch(rf"Compute (\d+(?: {op} \d+)+)\.", s)
        if m:
            return fam, {"terms": [int(x) for x in re.split(rf" {op} ", m.group(1))]}
    m = re.fullmatch(r"Compute (\d+) mod (\d+)\.", s)
    if m:
        return "mod", {"kind": "mod", "a": int(m.group(1)), "m": int(m.group(2))}
    m = re.fullmatch(r"Compute \((\d+) \* (\d+)\) mod (\d+)\.", s)
    if m:
        return "mod", {"kind": "mulmod", "a": int(m.group(1)), "b": int(m.group(2)), "m": int(m.group(3))}
    m = re.fullmatch(r"Compute \((\d+)\^(\d+)\) mod (\d+)\.", s)
    if m:
        return "mod", {"kind": "powmod", "a": int(m.group(1)), "e": int(m.group(2)), "m": int(m.group(3))}
    m = re.fullmatch(r"Compute (\d+)!\.", s)
    if m:
        return "comb", {"kind": "fact", "n": int(m.group(1))}
    m = re.fullmatch(r"Compute ([CP])\((\d+), (\d+)\)\.", s)
    if m:
        return "comb", {"kind": "choose" if m.group(1) == "C" else "perm", "n": int(m.group(2)), "k": int(m.group(3))}
    m = re.fullmatch(r"Compute C\((\d+), (\d+)\) \* C\((\d+), 2\)\.", s)
    if m:
        return "comb", {"kind": "pairs", "n": int(m.group(1)), "k": int(m.group(2)), "m": int(m.group(3)) - 1}
    m = re.fullmatch(r"Solve for x: (.+) = (.+)\.", s)
    if m:
        lhs, rhs = _side(m.group(1)), _side(m.group(2))
        if lhs is None or rhs is None or lhs[0] == 0:
            return None
        return "linear", {"a": lhs[0], "b": lhs[1], "c": rhs[0], "e": rhs[1]}
    return None


def _too_big(family: str, p: dict) -> bool:
    nums = p.get("terms") or [v for k, v in p.items() if isinstance(v, int)]
    if any(_nd(v) > _MAX_DIGITS for v in nums):
        return True
    return family == "comb" and p["n"] > _MAX_N


def symbolic_answer(family: str, p: dict) -> str | None:
    """The answer, computed exactly (no sympy: generated numbers can be huge); None: ill-posed."""
    if _too_big(family, p):
        return None
    if family == "add":
        return str(sum(p["terms"]))
    if family == "sub":
        return str(p["terms"][0] - sum(p["terms"][1:]))
    if family == "mul":
        return str(math.prod(p["terms"]))
    if family == "mod":
        if p["m"] < 2:
            return None
        v = {"mod": lambda: p["a"] % p["m"], "mulmod": lambda: p["a"] * p["b"] % p["m"],
             "powmod": lambda: pow(p["a"], p["e"], p["m"])}[p["kind"]]()
        return str(v)
    if family == "comb":
        n, k = p["n"], p.get("k", 0)
        if k > n or (p["kind"] != "fact" and k < 1):
            return None
        if p["kind"] == "fact":
            return str(math.factorial(n))
        if p["kind"] == "choose":
            return str(math.comb(n, k))
        if p["kind"] == "perm":
            return str(math.perm(n, k))
        return str(math.comb(n, k) * math.comb(p["m"] + 1, 2)) if p["m"] >= 1 else None
    if family == "linear":
        if p["a"] == p["c"]:
            return None
        x = Fraction(p["e"] - p["b"], p["a"] - p["c"])
        return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
    return None


def _digits_ok(v: int, nd: int | None) -> bool:
    if nd is None:
        return 0 <= v <= 99
    return (0 if nd == 1 else 10 ** (nd - 1)) <= v <= 10 ** nd - 1


def symbolic_levels(family: str, p: dict) -> set[int]:
    """The difficulty levels whose sampler could have written these parameters."""
    out = set()
    if family in _TERM_SHAPES:
        for d, shape in _TERM_SHAPES[family].items():
            t = p["terms"]
            if len(t) != len(shape) or not all(_digits_ok(v, nd) for v, nd in zip(t, shape)):
                continue
            if family == "mul" and 0 in t:
                continue
            if family == "sub" and d in (1, 2) and t[0] < t[1]:
                continue
            out.add(d)
        return out
    if family == "mod":
        a, m = p["a"], p["m"]
        if p["kind"] == "mod":
            out |= {1} if 10 <= a <= 49 and 2 <= m <= 9 else set()
            out |= {2} if 100 <= a <= 999 and 3 <= m <= 19 else set()
        elif p["kind"] == "mulmod":
            out |= {3} if 10 <= a <= 99 and 10 <= p["b"] <= 99 and 3 <= m <= 19 else set()
        else:
            out |= {4} if 2 <= a <= 9 and 3 <= p["e"] <= 6 and 5 <= m <= 19 else set()
            out |= {5} if 2 <= a <= 19 and 5 <= p["e"] <= 12 and 7 <= m <= 29 else set()
        return out
    if family == "comb":
        n, k = p["n"], p.get("k")
        kind = p["kind"]
        if kind == "fact" and 1 <= n <= 5:
            out.add(1)
        if kind == "choose" and 3 <= n <= 7 and 1 <= k <= n - 1:
            out.add(2)
        if kind == "perm" and 5 <= n <= 10 and 2 <= k <= 3:
            out.add(3)
        if kind == "choose" and 8 <= n <= 14 and 2 <= k <= n - 2:
            out.add(4)
        if kind == "pairs" and 6 <= n <= 12 and 2 <= k <= 4 and 2 <= p["m"] <= 5:
            out.add(5)
        return out
    if family == "linear":
        a, b, c = p["a"], p["b"], p["c"]
        ans = symbolic_answer(family, p)
        if ans is None or "/" in ans:
            return out
        x = int(ans)
        if a == 1 and c == 0 and 1 <= b <= 9 and 0 <= x <= 9:
            out.add(1)
        if 2 <= a <= 9 and b == 0 and c == 0 and 0 <= x <= 9:
            out.add(2)
        if 2 <= a <= 9 and 1 <= b <= 19 and c == 0 and 0 <= x <= 9:
            out.add(3)
        if c != 0 and c != a and 1 <= c <= a + 4 and -20 <= b <= 20 and -9 <= x <= 9:
            out |= {4} if 2 <= a <= 9 else set()
            out |= {5} if 2 <= a <= 12 else set()
        return out
    return out


def _canonical(family: str, p: dict) -> str | None:
    """The text the symbolic teacher writes for these parameters (format check)."""
    from megatron_sz.teacher.symbolic import FAMILIES

    if family == "linear":
        ans = symbolic_answer(family, p)
        if ans is None or "/" in ans:
            return None
        return FAMILIES["linear"].text({"a": p["a"], "b": p["b"], "c": p["c"], "x": int(ans)})
    return FAMILIES[family].text(p)


def symbolic_judgement(problem: str | None, concepts: list[str], difficulty: int | None,
                       scale: int = 5) -> tuple[str, dict]:
    """The symbolic judge: (JSON rubric reply, what it detected). Exact and deterministic."""
    top, low = scale, 1
    parsed = parse_symbolic(problem or "")
    det: dict = {}
    if parsed is None:
        scores = {c: low for c in RUBRIC_CRITERIA}
        reason = "not a problem of any symbolic family"
    else:
        family, params = parsed
        ans = symbolic_answer(family, params)
        levels = sorted(symbolic_levels(family, params)) if ans is not None else []
        det = {"family": family, "params": params, "levels": levels, "answer": ans}
        fmt = top if _canonical(family, params) == (problem or "").strip() else low
        wanted = {c.strip().lower() for c in concepts}
        cover = top if family in wanted else low
        if difficulty is None:
            diff = top if levels else low
        elif difficulty in levels:
            diff = top
        elif any(abs(difficulty - d) == 1 for d in levels):
            diff = (top + low) // 2
        else:
            diff = low
        ok = top if ans is not None else low
        scores = {"format": fmt, "correctness": ok, "difficulty": diff, "concept_coverage": cover,
                  "solvability": ok}
        reason = f"{family} at levels {levels or 'none'}; answer {ans}"
    return json.dumps({**scores, "reason": reason}), det


def symbolic_concepts(problem) -> tuple[list[str], int | None]:
    """The symbolic teacher's concepts of a problem: its family; difficulty: its level."""
    from megatron_sz.teacher.symbolic import _SUBJECT_FAMILY, FAMILIES

    fam = problem.extra.get("family") or _SUBJECT_FAMILY.get((problem.subject or "").lower())
    if fam not in FAMILIES:
        parsed = parse_symbolic(problem.problem)
        fam = parsed[0] if parsed else None
    level = problem.extra.get("difficulty") or problem.level
    return ([fam] if fam else []), (int(level) if level else None)


def symbolic_rationale(concepts: list[str], difficulty: int | None) -> str | None:
    fam = concepts[0] if concepts else None
    if fam not in RATIONALES:
        return None
    d = difficulty or 1
    return f"{RATIONALES[fam][max(1, min(5, d))]}."


def symbolic_solution(problem: str) -> tuple[str, str] | None:
    """(answer, worked solution) of a problem in a symbolic template, else None."""
    from megatron_sz.teacher.symbolic import FAMILIES

    parsed = parse_symbolic(problem)
    if parsed is None:
        return None
    family, p = parsed
    ans = symbolic_answer(family, p)
    if ans is None:
        return None
    if family == "linear":
        if "/" in ans:
            return ans, f"x = {ans}. \\boxed{{{ans}}}"
        p = {"a": p["a"], "b": p["b"], "c": p["c"], "x": int(ans)}
    return ans, FAMILIES[family].solution(p, ans)
