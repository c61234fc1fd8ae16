"""Absolute Zero's task logic, free of stages: prompts, parsing, validation, scoring, rewards,
buffer sampling and the template programs of the tiny warm-up.

What is unusual here: nothing a model wrote ever runs in this process. The host only
*parses* text (``ast.parse``, never ``eval``); every execution -- a proposal's output, the
determinism check, an abduction input fed to ``f``, an induction program run on the hidden
pairs, even a predicted deduction output compared with ``==`` -- is a ``megatron_sz.sandbox``
task. A value comes back as a ``repr`` and is checked with ``ast.literal_eval`` only.

Formats (one model, two roles; tags keep the tiny model's job small)::

    proposer, deduction/abduction:  K references  ->  <code>def f(...)</code> <input>ARGS</input>
    proposer, induction:            a buffer program  ->  <input>ARGS</input> x N, <message>TEXT</message>
    solver, deduction:  <code> + <input>       ->  <answer>OUTPUT</answer>
    solver, abduction:  <code> + <output>      ->  <answer>ARGS</answer>   (correct iff f(ARGS) == OUTPUT)
    solver, induction:  <message> + shown pairs ->  <answer>def f(...)</answer> (every hidden pair passes)

Rewards (the paper): proposer r = 1 - acc if 0 < acc < 1 else 0 for a valid proposal
(acc over ``n`` solves); solver r = 1 if correct; format penalties -0.5 for a well-formed
but wrong (or invalid) answer, -1 for a malformed one.
"""
from __future__ import annotations

import ast
import random
import re
from typing import Any, Iterable

from megatron_sz.data import AzrProposal, AzrTask, AzrValidation

TASK_TYPES = ("deduction", "abduction", "induction")
ZERO_PROGRAM = "def f(a):\n    return a"
ZERO_INPUT = "'Hello World'"
ZERO_INDUCTION_INPUTS = ("'Hello World'", "1", "[1, 2]", "'abc'")
REWARD_WRONG = -0.5
REWARD_MALFORMED = -1.0

# --------------------------------------------------------------------------- rewards


def learnability(acc: float) -> float:
    """The proposer's reward for a valid task the solver gets right ``acc`` of the time."""
    return 1.0 - acc if 0.0 < acc < 1.0 else 0.0


def solver_reward(fmt: str) -> float:
    """``ok`` (correct) 1, ``wrong`` (well-formed) -0.5, ``malformed`` -1."""
    return {"ok": 1.0, "wrong": REWARD_WRONG, "malformed": REWARD_MALFORMED}[fmt]


def proposer_reward(status: str, acc: float | None) -> float:
    """Valid: learnability; malformed (missing tags): -1; any other invalid proposal: -0.5."""
    if status == "valid":
        return learnability(acc if acc is not None else 0.0)
    return REWARD_MALFORMED if status == "malformed" else REWARD_WRONG


def learnability_bin(acc: float) -> str:
    """Histogram bin of a valid proposal's solve rate: 0, (0, 0.25], ..., (0.75, 1), 1."""
    if acc <= 0.0:
        return "0"
    if acc >= 1.0:
        return "1"
    for hi in (0.25, 0.5, 0.75):
        if acc <= hi:
            return f"<={hi}"
    return "<1"


# --------------------------------------------------------------------------- buffers


def sample_references(buffer: list, k: int, rng: random.Random) -> list:
    """K references drawn uniformly without replacement (all of them, in buffer order, when
    the buffer holds at most K); the result keeps buffer order, so prompts are stable."""
    if len(buffer) <= k:
        return list(buffer)
    idx = sorted(rng.sample(range(len(buffer)), k))
    return [buffer[i] for i in idx]


def task_key(task: AzrTask) -> tuple:
    """What makes two tasks the same (dedup in the buffers)."""
    if task.task_type == "induction":
        return (task.task_type, task.program.strip(), tuple(task.inputs or ()))
    return (task.task_type, task.program.strip(), (task.input or "").strip())


def task_text(task: AzrTask) -> str:
    """The task as text, for the held-out rule (program plus its inputs)."""
    ins = task.inputs if task.task_type == "induction" else [task.input]
    return task.program + "\n" + "\n".join(str(i) for i in ins or [])


# --------------------------------------------------------------------------- prompts


def _ref_block(t: AzrTask) -> str:
    return f"<code>\n{t.program}\n</code>\n<input>{t.input}</input>\n"


def propose_prompt(task_type: str, references: list[AzrTask]) -> str:
    """Proposer prompt. deduction/abduction: the references; induction: references[0] is the
    program to write inputs and a message for."""
    if task_type == "induction":
        return f"## propose induction\n<code>\n{references[0].program}\n</code>\n## inputs\n"
    refs = "".join(_ref_block(t) for t in references)
    return f"## propose {task_type}\n{refs}## new\n"


def propose_target(task_type: str, program: str, inputs: list[str], message: str | None = None) -> str:
    """The completion a good proposer writes (used for the warm-up corpus)."""
    if task_type == "induction":
        return "".join(f"<input>{i}</input>\n" for i in inputs) + f"<message>{message}</message>"
    return f"<code>\n{program}\n</code>\n<input>{inputs[0]}</input>"


def solve_prompt(task: AzrTask) -> str:
    if task.task_type == "deduction":
        return f"## deduction\n<code>\n{task.program}\n</code>\n<input>{task.input}</input>\n## output\n"
    if task.task_type == "abduction":
        return f"## abduction\n<code>\n{task.program}\n</code>\n<output>{task.output}</output>\n## input\n"
    pairs = "".join(f"<pair>{i} -> {o}</pair>\n"
                    for i, o in zip(task.inputs[:task.shown], task.outputs[:task.shown]))
    return f"## induction\n<message>{task.message}</message>\n{pairs}## program\n"


def solve_target(task: AzrTask) -> str:
    """The reference answer (warm-up corpus): the output, the input, or the program."""
    ans = {"deduction": task.output, "abduction": task.input}.get(task.task_type, f"\n{task.program}\n")
    return f"<answer>{ans}</answer>"


# --------------------------------------------------------------------------- parsing (host: parse only)

_TAG = {name: re.compile(rf"<{name}>(.*?)</{name}>", re.S) for name in ("code", "input", "message", "answer")}


def _tags(text: str, name: str) -> list[str]:
    return [m.strip("\n") for m in _TAG[name].findall(text or "")]


def _strip_fence(code: str) -> str:
    code = code.strip("\n")
    m = re.fullmatch(r"\s*```(?:python)?\n(.*?)\n?```\s*", code, re.S)
    return m.group(1) if m else code


def parse_proposal(task_type: str, completion: str) -> dict:
    """The fields a proposer completion holds: program, input (deduction/abduction),
    inputs + message (induction). Missing parts are None."""
    if task_type == "induction":
        ins = [i.strip() for i in _tags(completion, "input") if i.strip()]
        msg = _tags(completion, "message")
        return {"inputs": ins or None, "message": (msg[0].strip() or None) if msg else None}
    code, inp = _tags(completion, "code"), _tags(completion, "input")
    return {"program": _strip_fence(code[0]) if code else None, "input": inp[0].strip() if inp else None}


def args_parse(args: str) -> bool:
    """Does ``args`` read as the argument list of a call (``f(ARGS)``)?"""
    try:
        node = ast.parse(f"f({args})", mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return isinstance(node.body, ast.Call)


def expr_parses(text: str) -> bool:
    try:
        ast.parse(text, mode="eval")
        return True
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False


def defines_f(code: str) -> bool:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return any(isinstance(n, ast.FunctionDef) and n.name == "f" for n in tree.body)


def literal_ok(value_repr: str | None) -> bool:
    """The sandbox's repr reads back as a Python literal (host: ``ast.literal_eval`` only)."""
    if value_repr is None:
        return False
    try:
        ast.literal_eval(value_repr)
        return True
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False


# --------------------------------------------------------------------------- validation (sandbox)


def _policy_status(reasons: Iterable[str]) -> tuple[str, str] | None:
    for r in reasons:
        if r.startswith("does not parse") or r.startswith("does not define"):
            return "syntax", r
    for r in reasons:
        if r.startswith("calls nondeterministic"):
            return "nondeterministic", r
    for r in reasons:
        return "banned", r
    return None


def _run_status(results: list) -> tuple[str, str] | None:
    """Classify the determinism runs of one (program, input): None = ok and all agree."""
    for r in results:
        if r.status == "timeout":
            return "timeout", "ran past the time limit"
    for r in results:
        if r.status != "ok":
            return "crash", r.describe()[:200]
    first = results[0].outcome()
    if any(r.outcome() != first for r in results[1:]):
        return "nondeterministic", "two runs disagree"
    if not literal_ok(results[0].value_repr):
        return "bad_output", f"output {str(results[0].value_repr)[:60]} is not a Python literal"
    return None


def validate_proposals(props: list[AzrProposal], spec: Any, *, round: int, sandbox: Any = None) -> list[AzrValidation]:
    """Validate proposals: parse -> policy (no banned module or nondeterministic call) ->
    run ``spec.determinism_runs`` times in the sandbox within ``spec.timeout_s`` -> outputs
    agree and are literals. The output is the sandbox's, never the model's."""
    from megatron_sz import sandbox as sbx
    from megatron_sz.sandbox import Task

    sb = sandbox or sbx.shared()
    out: list[AzrValidation | None] = [None] * len(props)
    jobs: list[tuple[int, str, list[str]]] = []  # (proposal index, program, inputs)
    for n, p in enumerate(props):
        fail = _precheck(p, spec)
        if fail is not None:
            out[n] = AzrValidation(key=p.key, task_type=p.task_type, status=fail[0], reason=fail[1])
            continue
        jobs.append((n, p.program, [p.input] if p.task_type != "induction" else list(dict.fromkeys(p.inputs))))
    tasks = [Task(prog, call="f", args=i, timeout=spec.timeout_s, memory=512 << 20, value_limit=4096,
                  output_limit=4096)
             for _, prog, ins in jobs for i in ins for _ in range(spec.determinism_runs)]
    results = sb.run_batch(tasks) if tasks else []
    pos = 0
    R = spec.determinism_runs
    for n, prog, ins in jobs:
        p = props[n]
        per_input = []
        for i in ins:
            per_input.append((i, results[pos:pos + R]))
            pos += R
        out[n] = _verdict(p, prog, per_input, round=round)
    return out  # type: ignore[return-value]


def _precheck(p: AzrProposal, spec: Any) -> tuple[str, str] | None:
    from megatron_sz.sandbox import check_policy

    if p.task_type == "induction":
        if not p.inputs or p.message is None:
            return "malformed", "no <input> tags" if not p.inputs else "no <message> tag"
        if len(set(p.inputs)) < 2:
            return "malformed", "fewer than 2 distinct inputs"
        if not all(args_parse(i) for i in p.inputs):
            return "syntax", "an input is not an argument list"
    else:
        if p.program is None or p.input is None:
            return "malformed", "no <code> tag" if p.program is None else "no <input> tag"
        if len(p.program) > spec.max_program_chars:
            return "malformed", f"program longer than {spec.max_program_chars} characters"
        if not args_parse(p.input):
            return "syntax", f"input {p.input[:40]!r} is not an argument list"
    return _policy_status(check_policy(p.program or "", function="f").reasons)


def _verdict(p: AzrProposal, prog: str, per_input: list, *, round: int) -> AzrValidation:
    tid = f"r{round}-{p.key}"
    if p.task_type != "induction":
        (i, res), = per_input
        bad = _run_status(list(res))
        if bad:
            return AzrValidation(key=p.key, task_type=p.task_type, status=bad[0], reason=bad[1])
        task = AzrTask(id=tid, task_type=p.task_type, program=prog, input=i, output=res[0].value_repr,
                       round=round, parents=list(p.references), provenance="proposed")
        return AzrValidation(key=p.key, task_type=p.task_type, status="valid", task=task)
    ok, first_bad = [], None
    for i, res in per_input:
        bad = _run_status(list(res))
        if bad is None:
            ok.append((i, res[0].value_repr))
        elif first_bad is None or bad[0] in ("timeout", "nondeterministic"):
            first_bad = bad
    if len(ok) < 2:
        st, why = first_bad or ("crash", "fewer than 2 inputs ran")
        return AzrValidation(key=p.key, task_type=p.task_type, status=st, reason=f"{why} (induction: {len(ok)} inputs ran)")
    if first_bad is not None and first_bad[0] in ("timeout", "nondeterministic"):
        return AzrValidation(key=p.key, task_type=p.task_type, status=first_bad[0], reason=first_bad[1])
    task = AzrTask(id=tid, task_type="induction", program=prog, inputs=[i for i, _ in ok],
                   outputs=[o for _, o in ok], shown=len(ok) // 2, message=p.message, round=round,
                   parents=list(p.references), provenance="proposed")
    return AzrValidation(key=p.key, task_type=p.task_type, status="valid", task=task)


# --------------------------------------------------------------------------- scoring (sandbox)


def answer_of(text: str) -> str | None:
    a = _tags(text, "answer")
    return a[0] if a else None


def check_request(task: AzrTask, text: str) -> tuple[str, dict | None]:
    """(format, sandbox task or None): ``malformed`` when the answer is missing or does not
    parse; else the sandbox execution that decides correctness (value ``True`` = correct)."""
    ans = answer_of(text)
    if ans is None:
        return "malformed", None
    if task.task_type == "deduction":
        ans = ans.strip()
        if not ans or not expr_parses(ans):
            return "malformed", None
        return "check", {"code": "", "expr": f"({ans}) == ({task.output})"}
    if task.task_type == "abduction":
        ans = ans.strip()
        if not ans or not args_parse(ans):
            return "malformed", None
        return "check", {"code": task.program, "expr": f"f({ans}) == ({task.output})"}
    prog = _strip_fence(ans)
    if not defines_f(prog):
        return "malformed", None
    hidden = list(zip(task.inputs[task.shown:], task.outputs[task.shown:]))
    checks = ", ".join(f"f({i}) == ({o})" for i, o in hidden)
    return "check", {"code": prog, "expr": f"all([{checks}])"}


def score_answers(items: list[tuple[AzrTask, str]], spec: Any, sandbox: Any = None) -> list[tuple[str, bool]]:
    """(format, correct) per (task, solver text): ``ok`` / ``wrong`` / ``malformed``."""
    from megatron_sz import sandbox as sbx
    from megatron_sz.sandbox import Task

    sb = sandbox or sbx.shared()
    reqs = [check_request(t, text) for t, text in items]
    runs = [Task(r["code"], expr=r["expr"], timeout=spec.timeout_s, memory=512 << 20, value_limit=256,
                 output_limit=4096) for fmt, r in reqs if r is not None]
    results = iter(sb.run_batch(runs) if runs else [])
    out = []
    for fmt, r in reqs:
        if r is None:
            out.append(("malformed", False))
            continue
        res = next(results)
        correct = res.status == "ok" and res.value_repr == "True"
        out.append(("ok" if correct else "wrong", correct))
    return out


# --------------------------------------------------------------------------- template programs (warm-up)

# (body with {k}/{m}/{s}, argument kind, description). Small, valid, deterministic programs.
TEMPLATES: tuple[tuple[str, str, str], ...] = (
    ("def f(a):\n    return a + {k}", "int", "add {k}"),
    ("def f(a):\n    return a - {k}", "int", "subtract {k}"),
    ("def f(a):\n    return a * {m}", "int", "multiply by {m}"),
    ("def f(a):\n    return a % {m}", "int", "remainder mod {m}"),
    ("def f(a):\n    return a // {m}", "int", "floor divide by {m}"),
    ("def f(a):\n    return max(a, {k})", "int", "at least {k}"),
    ("def f(a):\n    return min(a, {k})", "int", "at most {k}"),
    ("def f(a):\n    return abs(a - {k})", "int", "distance to {k}"),
    ("def f(a):\n    return a * a + {k}", "int", "square plus {k}"),
    ("def f(a):\n    if a > {k}:\n        return a - {k}\n    return {k} - a", "int", "gap to {k}"),
    ("def f(a):\n    return sorted(a)", "list", "sort"),
    ("def f(a):\n    return a[::-1]", "list", "reverse"),
    ("def f(a):\n    return sum(a) + {k}", "list", "sum plus {k}"),
    ("def f(a):\n    return len(a) * {m}", "list", "length times {m}"),
    ("def f(a):\n    return [x + {k} for x in a]", "list", "add {k} to each"),
    ("def f(a):\n    return [x for x in a if x > {k}]", "list", "keep above {k}"),
    ("def f(a):\n    return max(a) - min(a)", "list", "range"),
    ("def f(a):\n    s = 0\n    for x in a:\n        s = s + x * {m}\n    return s", "list", "sum times {m}"),
    ("def f(a):\n    return a[::-1]", "str", "reverse"),
    ("def f(a):\n    return a.upper()", "str", "upper case"),
    ("def f(a):\n    return a + '{s}'", "str", "append {s}"),
    ("def f(a):\n    return a * {m}", "str", "repeat {m} times"),
    ("def f(a):\n    return a.count('{c}')", "str", "count {c}"),
    ("def f(a):\n    return len(a) + {k}", "str", "length plus {k}"),
    ("def f(a, b):\n    return a + b * {m}", "int2", "a plus {m} b"),
    ("def f(a, b):\n    return max(a, b) - min(a, b)", "int2", "difference"),
    ("def f(a, b):\n    return a * b - {k}", "int2", "product minus {k}"),
)


def _arg(kind: str, rng: random.Random) -> str:
    if kind == "int":
        return str(rng.randint(-5, 20))
    if kind == "list":
        return repr([rng.randint(0, 9) for _ in range(rng.randint(2, 5))])
    if kind == "str":
        return repr("".join(rng.choice("abcde") for _ in range(rng.randint(2, 5))))
    return f"{rng.randint(0, 9)}, {rng.randint(0, 9)}"


def template_program(rng: random.Random) -> tuple[str, str, str]:
    """(program, argument kind, description) of one random template instance."""
    body, kind, desc = rng.choice(TEMPLATES)
    vals = {"k": rng.randint(1, 30), "m": rng.randint(2, 9), "s": rng.choice(["x", "yz", "ab", "q", "cd"]),
            "c": rng.choice("abcde")}
    return body.format(**vals), kind, desc.format(**vals)


def template_inputs(kind: str, n: int, rng: random.Random) -> list[str]:
    seen: list[str] = []
    for _ in range(20 * n):
        a = _arg(kind, rng)
        if a not in seen:
            seen.append(a)
        if len(seen) == n:
            break
    return seen
