"""Seed-problem files: the paper's 100-problem protocol and a validator for any seed file.

A seed file is JSONL of ``megatron_sz.data.Problem`` records plus one extra field,
``answer_code``: a short Python/sympy snippet that recomputes the answer and assigns
it to a variable named ``answer``. ``validate_seed_file`` checks everything it can and
reports EVERY issue at once (``file:line: field: message``) instead of stopping at the
first, so a user fixes a whole file in one pass:

* schema (the same field/type rules as ``data.read_jsonl``, plus what a seed needs:
  a worked solution, a subject, a level, ``answer_code``), unique ids;
* subject x level counts against the paper's table (levels 2-4), when asked;
* the answer parses, and the solution's last ``\\boxed{}`` is equivalent to it;
* ``answer_code`` reproduces the answer;
* duplicate and near-duplicate problem statements (normalised exact match, then
  word n-gram Jaccard similarity).

What is unusual here:

* Snippets (and the math-verify parse of each answer) run in ``megatron_sz.sandbox``,
  the project's one place for code it did not write: a fresh process per snippet inside
  bubblewrap + seccomp, with sympy imported once in the pool's fork server and
  site-packages bound read-only. A snippet that hangs, crashes or tries to escape only
  costs that snippet. Imports are limited to sympy, math, fractions and itertools by a
  static policy check: that keeps honest snippets honest and names the mistake; the
  sandbox, not that check, is the security boundary (``sympy.sympify`` alone can reach
  ``os``).
* All answer equivalence goes through ``megatron_sz.verify`` (the same rules the
  solver is graded with), so a seed that the verifier cannot grade fails here first.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from megatron_sz.data import PROVENANCES, Problem, record_from_dict
from megatron_sz.errors import DataError

#: The paper's seed split (Socratic-Zero, arXiv 2509.24726): subject -> number of problems.
PAPER_COUNTS: dict[str, int] = {
    "Algebra": 15,
    "Number Theory": 15,
    "Geometry": 15,
    "Counting & Probability": 15,
    "Precalculus": 15,
    "Intermediate Algebra": 15,
    "Prealgebra": 10,
}
#: MATH-style difficulty levels the paper's seeds are drawn from.
PAPER_LEVELS: tuple[int, ...] = (2, 3, 4)
#: Modules a snippet may import (and their submodules).
ALLOWED_IMPORTS: tuple[str, ...] = ("sympy", "math", "fractions", "itertools")
#: Fields every seed record must carry (``Problem`` itself only requires the first three).
#: ``subject`` and ``level`` are also required when counts / levels are checked.
SEED_REQUIRED = ("id", "problem", "answer", "solution")

_SHIPPED = "socratic100.jsonl"


def shipped_seed_file() -> Path:
    """Path of the 100 shipped seed problems (checkout or installed package)."""
    from megatron_sz.paths import resource_dir

    return resource_dir("seeds") / _SHIPPED


# --------------------------------------------------------------------------- report


@dataclass
class SeedIssue:
    """One finding. ``line`` is None for file-level findings (e.g. counts)."""

    path: str
    line: int | None
    field: str
    message: str
    severity: str = "error"  # "error" fails validation, "warning" does not
    problem_id: str | None = None

    def __str__(self) -> str:
        loc = f"{self.path}:{self.line}" if self.line is not None else self.path
        tag = "" if self.severity == "error" else f"{self.severity}: "
        return f"{loc}: {self.field}: {tag}{self.message}"


@dataclass
class SeedReport:
    """Everything ``validate_seed_file`` found."""

    path: str
    n_lines: int = 0
    n_records: int = 0
    issues: list[SeedIssue] = field(default_factory=list)
    #: subject -> level -> count, over records whose subject and level could be read.
    table: dict[str, dict[int, int]] = field(default_factory=dict)
    expected_counts: dict[str, int] | None = None
    levels: tuple[int, ...] | None = None
    snippets_run: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list, repr=False)

    @property
    def errors(self) -> list[SeedIssue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[SeedIssue]:
        return [i for i in self.issues if i.severity != "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, line: int | None, field_: str, message: str, *, severity: str = "error",
            problem_id: str | None = None) -> None:
        self.issues.append(SeedIssue(self.path, line, field_, message, severity, problem_id))

    def format_table(self) -> str:
        """Subject x level table with row/column totals (and expected counts if any)."""
        levels = sorted({lv for row in self.table.values() for lv in row}
                        | set(self.levels or ()))
        subjects = list(self.expected_counts or {})
        subjects += sorted(s for s in self.table if s not in subjects)
        width = max([len("subject"), len("total")] + [len(s) for s in subjects])
        head = f"{'subject':<{width}} " + " ".join(f"L{lv:<3}" for lv in levels) + "  total"
        if self.expected_counts is not None:
            head += "  expected"
        out = [head, "-" * len(head)]
        col_tot = Counter()
        for s in subjects:
            row = self.table.get(s, {})
            col_tot.update(row)
            total = sum(row.values())
            line = f"{s:<{width}} " + " ".join(f"{row.get(lv, 0):<4}" for lv in levels)
            line += f"  {total:<5}"
            if self.expected_counts is not None:
                exp = self.expected_counts.get(s)
                mark = "" if exp == total else "  <-"
                line += f"  {exp if exp is not None else '-'}{mark}"
            out.append(line.rstrip())
        out.append("-" * len(head))
        grand = sum(col_tot.values())
        line = f"{'total':<{width}} " + " ".join(f"{col_tot.get(lv, 0):<4}" for lv in levels)
        line += f"  {grand:<5}"
        if self.expected_counts is not None:
            line += f"  {sum(self.expected_counts.values())}"
        out.append(line.rstrip())
        return "\n".join(out)

    def summary(self) -> str:
        n_err, n_warn = len(self.errors), len(self.warnings)
        if self.ok:
            extra = f", {n_warn} warning(s)" if n_warn else ""
            return (f"OK: {self.path}: {self.n_records} problems valid "
                    f"({self.snippets_run} answer snippets checked{extra}, {self.seconds:.1f}s)")
        bad = len({i.line for i in self.errors})
        return (f"INVALID: {self.path}: {n_err} error(s) on {bad} line(s)/section(s), "
                f"{n_warn} warning(s), {self.n_records} records read")

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "n_lines": self.n_lines,
            "n_records": self.n_records,
            "snippets_run": self.snippets_run,
            "seconds": round(self.seconds, 3),
            "expected_counts": self.expected_counts,
            "levels": list(self.levels) if self.levels else None,
            "table": {s: {str(k): v for k, v in sorted(row.items())}
                      for s, row in self.table.items()},
            "issues": [dataclasses.asdict(i) for i in self.issues],
        }


# --------------------------------------------------------------------------- validation


def validate_seed_file(path: str | Path, *, expected_counts: dict[str, int] | None = PAPER_COUNTS,
                       levels: Iterable[int] | None = PAPER_LEVELS, run_code: bool = True,
                       timeout_s: float = 10.0, near_dup_threshold: float = 0.7,
                       ngram: int = 3, verify_timeout_s: float = 5.0,
                       progress: bool = False) -> SeedReport:
    """Check a seed JSONL file and return a report of every issue found.

    ``expected_counts`` (subject -> count) also restricts subjects to its keys; None
    skips the count check and accepts any subject. ``levels`` restricts the level
    field (None: any 1..5). ``run_code=False`` skips executing ``answer_code`` (its
    absence is then only a warning). Pairs of problems whose word ``ngram`` Jaccard
    similarity reaches ``near_dup_threshold`` are reported as near-duplicates.

    Raises ``DataError`` only if the file itself cannot be read.
    """
    t0 = time.monotonic()
    path = Path(path)
    if not path.is_file():
        raise DataError(f"seed file not found: {path}",
                        fix="pass the path of a JSONL file (the shipped one is "
                            "seeds/socratic100.jsonl)")
    report = SeedReport(path=str(path), expected_counts=dict(expected_counts)
                        if expected_counts is not None else None,
                        levels=tuple(levels) if levels is not None else None)
    from megatron_sz.data import read_text_lines

    # file:line and column of a non-UTF-8 byte, not a byte offset into the file (issue 20)
    lines = [x.rstrip("\r\n") for x in read_text_lines(path, fix="save the seed file as UTF-8 JSONL")]
    report.n_lines = len(lines)

    # 1. per-line schema; keep (line, Problem, answer_code) for the later checks
    entries: list[tuple[int, Problem, str | None]] = []
    ids: dict[str, int] = {}
    for lineno, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        rec = _check_line(report, lineno, text, run_code=run_code)
        if rec is None:
            continue
        prob, code = rec
        report.n_records += 1
        if prob.id in ids:
            report.add(lineno, "id", f"duplicate id {prob.id!r} (first used on line "
                       f"{ids[prob.id]})", problem_id=prob.id)
        else:
            ids[prob.id] = lineno
        entries.append((lineno, prob, code))
        report.problems.append(prob)
    if report.n_records == 0:
        report.add(None, "file", "no seed records found (empty file?)")

    # 2. subjects, levels, counts
    _check_counts(report, entries)

    # 3. answers: parseable, equal to the boxed answer, reproduced by the snippet
    requests = [(("parse", ln), {"op": "parse", "text": p.answer}) for ln, p, _ in entries]
    if run_code:
        todo = [(("exec", ln), {"op": "exec", "code": code}) for ln, _, code in entries
                if isinstance(code, str) and code.strip()]
        requests += todo
        report.snippets_run = len(todo)
    child_results = _run_requests(requests, timeout_s=timeout_s, progress=progress)
    _check_answers(report, entries, child_results, verify_timeout_s=verify_timeout_s)

    # 4. duplicates / near-duplicates
    _check_duplicates(report, entries, threshold=near_dup_threshold, n=ngram)

    report.issues.sort(key=lambda i: (i.line is None, i.line or 0))
    report.seconds = time.monotonic() - t0
    return report


def _check_line(report: SeedReport, lineno: int, text: str, *,
                run_code: bool) -> tuple[Problem, str | None] | None:
    """Schema-check one line, recording every field problem. Returns the record if usable."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        report.add(lineno, "json", f"invalid JSON: {exc.msg} (column {exc.colno}); each "
                   "line must be one complete JSON object")
        return None
    if not isinstance(obj, dict):
        report.add(lineno, "json", f"expected a JSON object, got {type(obj).__name__}")
        return None
    pid = obj.get("id") if isinstance(obj.get("id"), str) else None
    n_before = len(report.errors)

    def err(field_: str, msg: str) -> None:
        report.add(lineno, field_, msg, problem_id=pid)

    required = list(SEED_REQUIRED)
    if report.expected_counts is not None:
        required.append("subject")
    if report.levels is not None:
        required.append("level")
    for name in required:
        if name not in obj or obj[name] is None:
            err(name, "missing required field")
    for name in ("id", "problem", "answer", "solution", "subject"):
        v = obj.get(name)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            err(name, f"must be a non-empty string, got {v!r:.60}")
    lv = obj.get("level")
    if lv is not None:
        if not isinstance(lv, int) or isinstance(lv, bool):
            err("level", f"must be an integer, got {lv!r:.30}")
        elif report.levels is not None and lv not in report.levels:
            err("level", f"{lv} is outside the allowed levels "
                         f"{', '.join(map(str, report.levels))}")
        elif not 1 <= lv <= 5:
            err("level", f"{lv} is outside 1..5")
    subj = obj.get("subject")
    if (isinstance(subj, str) and subj.strip() and report.expected_counts is not None
            and subj not in report.expected_counts):
        close = [s for s in report.expected_counts if s.lower() == subj.strip().lower()]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        err("subject", f"{subj!r} is not one of {', '.join(report.expected_counts)}{hint}")
    prov = obj.get("provenance", "seed")
    if prov not in PROVENANCES:
        err("provenance", f"{prov!r}; expected one of {', '.join(PROVENANCES)}")
    rnd = obj.get("round", 0)
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        err("round", f"must be an integer >= 0, got {rnd!r:.30}")
    sol = obj.get("solution")
    if isinstance(sol, str) and sol.strip() and "\\boxed" not in sol and "\\fbox" not in sol:
        err("solution", "has no \\boxed{...} final answer; end the worked solution "
                        "with \\boxed{answer}")
    code = obj.get("answer_code")
    if code is None:
        if run_code:
            err("answer_code", "missing: every seed needs a Python/sympy snippet that "
                               "computes its answer into a variable named `answer`")
        else:
            report.add(lineno, "answer_code", "missing (not required with --no-exec)",
                       severity="warning", problem_id=pid)
    elif not isinstance(code, str) or not code.strip():
        err("answer_code", f"must be a non-empty string of Python code, got {code!r:.40}")
        code = None
    elif run_code:
        try:
            compile(code, f"<answer_code line {lineno}>", "exec")
        except SyntaxError as exc:
            err("answer_code", f"syntax error: {exc.msg} (snippet line {exc.lineno})")
            code = None

    # Build the record the way data.read_jsonl would. If that works, the later checks
    # (answers, snippet, duplicates) still run, even when a field above was flagged.
    try:
        prob = record_from_dict(Problem, obj, where=f"{report.path}:{lineno}")
    except DataError as exc:
        if len(report.errors) == n_before:  # not already explained by a message above
            err("record", str(exc).split(f"{report.path}:{lineno}: ", 1)[-1])
        return None
    return prob, code


def _check_counts(report: SeedReport, entries: list[tuple[int, Problem, str | None]]) -> None:
    for _, prob, _ in entries:
        if isinstance(prob.subject, str) and isinstance(prob.level, int):
            row = report.table.setdefault(prob.subject, {})
            row[prob.level] = row.get(prob.level, 0) + 1
    if report.expected_counts is None:
        return
    for subject, want in report.expected_counts.items():
        have = sum(report.table.get(subject, {}).values())
        if have != want:
            report.add(None, "counts", f"subject {subject!r} has {have} problem(s); the "
                       f"paper's split needs {want} (unreadable lines are not counted; "
                       "use --no-counts for other splits)")


def _check_answers(report: SeedReport, entries: list[tuple[int, Problem, str | None]],
                   child_results: dict[tuple[str, int], dict], *,
                   verify_timeout_s: float) -> None:
    """Parseability (math-verify), boxed == answer and snippet == answer (the verifier)."""
    from megatron_sz import verify

    pairs: list[tuple[str | None, str]] = []
    checks: list[tuple[int, str, Problem, str]] = []  # (line, field, problem, shown value)
    for lineno, prob, _ in entries:
        pid, answer = prob.id, prob.answer
        parsed = child_results.get(("parse", lineno))
        if parsed is not None and not (parsed.get("ok") and parsed.get("parsed")):
            why = parsed.get("error") or "math-verify cannot read it"
            report.add(lineno, "answer", f"{answer!r:.80} is not a parseable answer ({why}); "
                       "write LaTeX a grader can read, e.g. \\frac{3}{4}, 2\\sqrt{5}, (1, 3), "
                       "[2, 5), \\{1, 2\\}", problem_id=pid)
            continue
        boxed = verify.extract_answer(prob.solution or "", last_number_fallback=False)
        if prob.solution is None or not prob.solution.strip():
            pass  # already reported as a missing field
        elif boxed is None:
            report.add(lineno, "solution", "no final answer could be extracted "
                       "(end the solution with \\boxed{answer})", problem_id=pid)
        else:
            pairs.append((boxed, answer))
            checks.append((lineno, "solution", prob, f"last \\boxed{{{boxed:.60}}}"))
        res = child_results.get(("exec", lineno))
        if res is None:
            continue
        if not res.get("ok"):
            report.add(lineno, "answer_code", res.get("error", "failed"), problem_id=pid)
            continue
        pairs.append((res["latex"], answer))
        checks.append((lineno, "answer_code", prob,
                       f"computes {res['latex']!r:.60} (python: {res.get('repr', '')!r:.60})"))
    if not pairs:
        return
    verdicts = verify.verify_batch(pairs, workers=0, timeout_s=verify_timeout_s).results
    for (lineno, field_, prob, shown), v in zip(checks, verdicts):
        if v.equivalent is True:
            continue
        if v.decided_by == "undecided":
            msg = (f"{shown}: the verifier cannot decide whether it equals the answer "
                   f"{prob.answer!r:.60} ({v.reason})")
        else:
            msg = f"{shown} is not equivalent to the answer {prob.answer!r:.60}"
        report.add(lineno, field_, msg, problem_id=prob.id)


# --------------------------------------------------------------------------- duplicates

def find_near_duplicates(texts: list[str], *, threshold: float = 0.7,
                         n: int = 3) -> list[tuple[int, int, float]]:
    """Index pairs (i < j) with word n-gram Jaccard >= threshold (1.0 for normalised-equal);
    ``textsim`` is the one similarity implementation (curriculum dedup, contamination)."""
    from megatron_sz.textsim import near_duplicate_pairs

    return near_duplicate_pairs(texts, threshold=threshold, n=n)


def _check_duplicates(report: SeedReport, entries: list[tuple[int, Problem, str | None]], *,
                      threshold: float, n: int) -> None:
    texts = [p.problem for _, p, _ in entries]
    for i, j, s in find_near_duplicates(texts, threshold=threshold, n=n):
        li, lj = entries[i][0], entries[j][0]
        pid = entries[j][1].id
        if s >= 1.0:
            report.add(lj, "problem", f"duplicate of line {li} ({entries[i][1].id}) after "
                       "normalising case, markup and punctuation", problem_id=pid)
        else:
            report.add(lj, "problem", f"near-duplicate of line {li} ({entries[i][1].id}): "
                       f"word {n}-gram Jaccard {s:.2f} >= {threshold:.2f}", problem_id=pid)


# --------------------------------------------------------------------------- snippets


def run_snippets(snippets: list[tuple[Any, str]], *, timeout_s: float = 10.0,
                 progress: bool = False) -> dict[Any, dict]:
    """Run ``answer_code`` snippets in the sandbox; key -> result dict.

    A result is ``{"ok": True, "latex": str, "repr": str}`` or
    ``{"ok": False, "error": str}``. Each snippet gets ``timeout_s`` seconds.
    """
    return _run_requests([(k, {"op": "exec", "code": c}) for k, c in snippets],
                         timeout_s=timeout_s, progress=progress)


def parse_answers(answers: list[tuple[Any, str]], *, timeout_s: float = 5.0) -> dict[Any, dict]:
    """Can math-verify (the verifier's parser) read each answer? key -> result dict.

    A result is ``{"ok": True, "parsed": bool, "repr": str}`` or ``{"ok": False, ...}``.
    Parsing runs in the sandbox too, so a pathological answer only costs a timeout.
    """
    return _run_requests([(k, {"op": "parse", "text": a}) for k, a in answers],
                         timeout_s=timeout_s, progress=False)


#: Modules the sandbox pool for seeds imports once, in its fork server.
_PRELOAD = ("sympy", "math_verify")
#: Run once per sandbox worker: math-verify builds its LaTeX parser lazily (about 170 ms of
#: CPU that every fresh execution would otherwise pay again).
_WARMUP = "\n".join([
    "from math_verify import parse",
    "for t in ('2\\\\sqrt{5}+\\\\frac{1}{2}', '(1, 3)', '[2, 5)', '\\\\{1, 2\\\\}', "
    "'3\\\\pi', '(-\\\\infty, 2) \\\\cup (3, \\\\infty)', 'x^2-1', '\\\\dfrac{3}{4}', "
    "'2+3i', '45^\\\\circ', '\\\\text{(B)}'):",
    "    parse('$' + t + '$', parsing_timeout=None)",
    "import sympy",
    "sympy.latex(sympy.sqrt(8) / 3 + sympy.pi)"])
_SNIPPET_MEMORY = 4 << 30


@functools.lru_cache(maxsize=1)
def _sandbox_source() -> str:
    """Our helpers, appended to each snippet so that they run inside the sandbox too."""
    import inspect

    return "\n\n".join([
        "import re as _sz_re\nfrom typing import Any",
        f"_PLAIN_NUMBER = _sz_re.compile({_PLAIN_NUMBER.pattern!r})",
        inspect.getsource(render_answer), inspect.getsource(_parse_one)])


def _task(req: dict, timeout_s: float):
    """The sandbox task for one request, or an error dict when the policy rejects it."""
    from megatron_sz.sandbox import Task, check_policy

    helpers = _sandbox_source()
    if req["op"] == "parse":
        return Task(helpers, call="_parse_one", args=(req["text"],), timeout=timeout_s,
                    memory=_SNIPPET_MEMORY)
    policy = check_policy(req["code"], banned=(), allowed_imports=ALLOWED_IMPORTS,
                          nondeterministic=())
    if not policy.ok:
        return {"ok": False, "error": "; ".join(policy.reasons)}
    return Task(req["code"] + "\n\n" + helpers, expr="(render_answer(answer), repr(answer)[:200])",
                timeout=timeout_s, memory=_SNIPPET_MEMORY)


def _decode(req: dict, res, timeout_s: float) -> dict:
    """A sandbox ``Result`` as the result dict the seed checks read."""
    if res.status == "ok":
        try:
            value = res.value()
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return {"ok": False, "error": "returned something that is not a literal"}
        if req["op"] == "parse":
            return value if isinstance(value, dict) else {"ok": False, "error": "bad parse"}
        latex, rep = value
        return {"ok": True, "latex": latex, "repr": rep}
    if res.status == "timeout":
        return {"ok": False, "error": f"timed out after {timeout_s:g}s"}
    if res.status == "memory":
        return {"ok": False, "error": f"ran out of memory ({_SNIPPET_MEMORY >> 30} GiB limit)"}
    if res.error_type == "NameError" and "'answer'" in (res.error or ""):
        return {"ok": False, "error": "the snippet did not assign a variable named `answer`"}
    if res.error_type:
        return {"ok": False, "error": f"raised {res.error_type}: {res.error}"[:300]}
    return {"ok": False, "error": f"{res.status}: {res.error or 'no result'}"[:300]}


def _run_requests(requests: list[tuple[Any, dict]], *, timeout_s: float,
                  progress: bool) -> dict[Any, dict]:
    results: dict[Any, dict] = {}
    if not requests:
        return results
    from megatron_sz import sandbox

    pool = sandbox.shared(preload=_PRELOAD, site_packages=True, warmup=_WARMUP)
    todo: list[tuple[Any, dict, Any]] = []
    for key, req in requests:
        task = _task(req, timeout_s)
        if isinstance(task, dict):
            results[key] = task
        else:
            todo.append((key, req, task))
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(requests), desc="seed checks", unit="check",
                       file=sys.stderr, leave=False, initial=len(results))
        except ImportError:  # pragma: no cover
            bar = None
    step = 4 * pool.config.workers
    try:
        for i in range(0, len(todo), step):
            chunk = todo[i:i + step]
            for (key, req, _), res in zip(chunk, pool.run_batch([t for _, _, t in chunk])):
                results[key] = _decode(req, res, timeout_s)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return results


def render_answer(value: Any) -> str:
    """LaTeX-ish text of a snippet's ``answer`` value, for the verifier."""
    import fractions

    import sympy

    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise TypeError("answer is a bool; use a number, expression or string")
    if isinstance(value, fractions.Fraction):
        value = sympy.Rational(value.numerator, value.denominator)
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(render_answer(v) for v in value) + ")"
    if isinstance(value, (set, frozenset)):
        value = sympy.FiniteSet(*value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, sympy.Interval):
        lo = "(" if value.left_open else "["
        hi = ")" if value.right_open else "]"
        return f"{lo}{render_answer(value.start)}, {render_answer(value.end)}{hi}"
    if isinstance(value, sympy.Union):
        return " \\cup ".join(render_answer(a) for a in value.args)
    if isinstance(value, sympy.FiniteSet):
        elems = sorted(value.args, key=sympy.default_sort_key)
        return "\\{" + ", ".join(render_answer(e) for e in elems) + "\\}"
    if value is sympy.oo:
        return "\\infty"
    if value is -sympy.oo:
        return "-\\infty"
    if isinstance(value, sympy.Basic):
        return sympy.latex(value)
    raise TypeError(f"answer has unsupported type {type(value).__name__}; use a number, "
                    "sympy expression, tuple, Interval, FiniteSet or string")


_PLAIN_NUMBER = re.compile(r"-?\d+(\.\d+)?|-?\\frac\{\d+\}\{\d+\}")


def _parse_one(text: str) -> dict:
    """math-verify's reading of an answer (its parser backs ``megatron_sz.verify``)."""
    if _PLAIN_NUMBER.fullmatch(text.strip()):
        return {"ok": True, "parsed": True, "repr": text.strip()}  # skip the LaTeX parser
    from math_verify import parse

    got = parse(f"${text}$", parsing_timeout=None)
    parsed = bool(got) and not isinstance(got[0], str)
    return {"ok": True, "parsed": parsed, "repr": repr(got[0])[:200] if got else ""}
