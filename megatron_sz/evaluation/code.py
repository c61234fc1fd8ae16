"""Code benchmarks from local files in their public layouts, executed in the sandbox.

Nothing is downloaded. Supported layouts (JSONL; the kind comes from the file name or ``kind=``):

* **HumanEval+** (evalplus ``HumanEvalPlus.jsonl``; also plain HumanEval): ``task_id``,
  ``prompt``, ``entry_point``, ``test`` (a ``check(candidate)`` function). The program is
  the prompt + completion (or the completion alone when it defines ``entry_point``), then
  the test and ``check(entry_point)``.
* **MBPP+** (evalplus ``MbppPlus.jsonl``; also plain MBPP): ``task_id``, ``prompt`` or
  ``text``, and ``test`` (code with asserts / ``check``) or ``test_list`` (assert lines,
  with ``test_imports``).
* **LiveCodeBench** code generation (``test.jsonl`` of a release): ``question_id``,
  ``question_content``, ``starter_code``, ``public_test_cases`` and ``private_test_cases``
  (JSON text of ``[{input, output, testtype}]``), ``metadata`` (``func_name``). ``stdin``
  tests feed the input as stdin and compare stdout; ``functional`` tests call
  ``Solution().func_name`` on the JSON arguments. Private tests stored as compressed
  pickles are **not** unpickled (that would run code on the host); such problems use their
  public tests, and the results say how many did.
* **CRUXEval** (``cruxeval.jsonl``: ``id``, ``code``, ``input``, ``output``) gives two
  benchmarks: ``cruxeval-o`` (predict the output; correct iff ``pred == output``) and
  ``cruxeval-i`` (predict an input; correct iff ``f(pred) == output``).

Every check -- the model's program, the benchmark's tests, even ``==`` on a predicted value
-- runs in ``megatron_sz.sandbox``; the host only reads a ``True``/``False`` repr back.
Scores are ``metrics.score_samples``: mean@k and unbiased pass@k, named as for math.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_sz.data import JsonlAppender, atomic_write_json, iter_jsonl_rows, read_jsonl
from megatron_sz.errors import DataError

KINDS = ("humaneval", "mbpp", "livecodebench", "cruxeval-o", "cruxeval-i")


@dataclass
class CodeItem:
    id: str
    benchmark: str  # one of KINDS
    prompt: str
    data: dict = field(default_factory=dict)


def infer_kind(path: str | Path) -> str:
    name = Path(path).name.lower()
    for key, kind in (("humaneval", "humaneval"), ("mbpp", "mbpp"), ("livecodebench", "livecodebench"),
                      ("lcb", "livecodebench"), ("code_generation", "livecodebench"), ("cruxeval", "cruxeval")):
        if key in name:
            return kind
    raise DataError(f"cannot tell the benchmark of {path} from its name", where=str(path),
                    fix="name it after the benchmark (HumanEvalPlus.jsonl, MbppPlus.jsonl, livecodebench*.jsonl, "
                        "cruxeval.jsonl) or pass --kind")


def _need(row: dict, where: str, *names: str) -> None:
    missing = [n for n in names if n not in row]
    if missing:
        raise DataError(f"missing field(s) {', '.join(missing)} (present: {', '.join(sorted(row))})", where=where,
                        fix="use the benchmark's public JSONL layout (see megatron_sz/evaluation/code.py)")


def _lcb_tests(value: Any, where: str) -> list[dict] | None:
    """LiveCodeBench tests from JSON text (None: stored in another form, e.g. a pickle)."""
    if isinstance(value, list):
        return value
    if not isinstance(value, str) or not value.strip():
        return []
    try:
        tests = json.loads(value)
    except json.JSONDecodeError:
        return None  # base64/zlib/pickle: never unpickled here
    return tests if isinstance(tests, list) else None


def load_code_benchmark(path: str | Path, kind: str | None = None, limit: int | None = None) -> list[CodeItem]:
    """Items of one benchmark file (CRUXEval: both -o and -i items)."""
    kind = kind or infer_kind(path)
    items: list[CodeItem] = []
    for n, (where, row) in enumerate(iter_jsonl_rows(path)):
        if limit is not None and n >= limit:
            break
        if not isinstance(row, dict):
            raise DataError("expected a JSON object", where=where, fix="one benchmark item per line")
        if kind == "humaneval":
            _need(row, where, "task_id", "prompt", "entry_point", "test")
            prompt = f"Complete the Python function.\n```python\n{row['prompt']}```\n"
            items.append(CodeItem(str(row["task_id"]), kind, prompt, row))
        elif kind == "mbpp":
            _need(row, where, "task_id")
            text = row.get("prompt") or row.get("text")
            if not text or not (row.get("test") or row.get("test_list")):
                raise DataError("an MBPP item needs 'prompt' (or 'text') and 'test' (or 'test_list')", where=where,
                                fix="use the evalplus MbppPlus.jsonl or the original MBPP layout")
            shown = "\n".join((row.get("test_list") or [])[:1])
            prompt = f"{text}\n{shown}\nWrite the Python function.\n```python\n"
            items.append(CodeItem(str(row["task_id"]), kind, prompt, row))
        elif kind == "livecodebench":
            _need(row, where, "question_id", "question_content")
            pub = _lcb_tests(row.get("public_test_cases"), where) or []
            priv = _lcb_tests(row.get("private_test_cases"), where)
            meta = row.get("metadata") or {}
            if isinstance(meta, str):
                try:
                    meta = json.loads(meta)
                except json.JSONDecodeError:
                    meta = {}
            tests = pub + (priv or [])
            if not tests:
                raise DataError("a LiveCodeBench item has no readable tests", where=where,
                                fix="give public_test_cases / private_test_cases as JSON text")
            starter = row.get("starter_code") or ""
            prompt = (f"{row['question_content']}\n" + (f"```python\n{starter}\n```\n" if starter else
                                                          "Read from stdin and write to stdout.\n") + "```python\n")
            items.append(CodeItem(str(row["question_id"]), kind, prompt,
                                  {"tests": tests, "func_name": meta.get("func_name"), "public_only": priv is None}))
        elif kind == "cruxeval":
            _need(row, where, "code", "input", "output")
            rid = str(row.get("id", f"sample_{n}"))
            items.append(CodeItem(rid, "cruxeval-o", f"```python\n{row['code']}\n```\nassert f({row['input']}) == ??\n"
                                  "Give the output as a Python literal in [ANSWER][/ANSWER].\n", row))
            items.append(CodeItem(rid, "cruxeval-i", f"```python\n{row['code']}\n```\nassert f(??) == {row['output']}\n"
                                  "Give an input as Python arguments in [ANSWER][/ANSWER].\n", row))
        else:
            raise DataError(f"unknown code benchmark kind {kind!r}", fix=f"use one of {', '.join(KINDS)}")
    if not items:
        raise DataError(f"benchmark file {path} has no items", where=str(path), fix="check the file")
    return items


# --------------------------------------------------------------------------- checks (sandbox)


def extract_code(text: str) -> str:
    """The program in a completion: the first fenced block if any, else the text up to a closing fence."""
    m = re.search(r"```(?:python|py)?\n(.*?)```", text, re.S)
    if m:
        return m.group(1)
    return text.split("```")[0]


def extract_answer(text: str) -> str | None:
    m = re.search(r"\[ANSWER\](.*?)\[/ANSWER\]", text, re.S)
    if m:
        return m.group(1).strip()
    m = re.search(r"<answer>(.*?)</answer>", text, re.S)
    return m.group(1).strip() if m else (text.strip().splitlines()[0].strip() if text.strip() else None)


def check_program(item: CodeItem, completion: str) -> dict | None:
    """The sandbox task that decides a completion (value True = pass); None = no answer."""
    d = item.data
    if item.benchmark in ("cruxeval-o", "cruxeval-i"):
        ans = extract_answer(completion)
        if not ans:
            return None
        if item.benchmark == "cruxeval-o":
            return {"code": "", "expr": f"({ans}) == ({d['output']})"}
        return {"code": d["code"], "expr": f"f({ans}) == ({d['output']})"}
    code = extract_code(completion)
    if item.benchmark == "humaneval":
        ep = d["entry_point"]
        prog = code if re.search(rf"def\s+{re.escape(ep)}\s*\(", code) else d["prompt"] + code
        return {"code": f"{prog}\n\n{d['test']}\n\ncheck({ep})\n_passed = True\n", "expr": "_passed"}
    if item.benchmark == "mbpp":
        test = d.get("test") or "\n".join((d.get("test_imports") or []) + list(d.get("test_list") or []))
        tail = f"\ncheck({d['entry_point']})\n" if "def check(" in test and d.get("entry_point") else "\n"
        return {"code": f"{code}\n\n{test}{tail}_passed = True\n", "expr": "_passed"}
    # LiveCodeBench: all tests in one execution; the checker is ours, appended to the program.
    tests = [(t.get("input", ""), t.get("output", ""), t.get("testtype", "stdin")) for t in d["tests"]]
    checker = ("import io as _io, json as _json, sys as _sys, contextlib as _cl\n"
               f"_TESTS = {tests!r}\n_SRC = {code!r}\n_FN = {d.get('func_name')!r}\n"
               "def _run():\n"
               "    for _inp, _out, _kind in _TESTS:\n"
               "        if _kind == 'functional':\n"
               "            _g = {'__name__': '_sol'}\n"
               "            exec(_SRC, _g)\n"
               "            _args = [_json.loads(x) for x in _inp.splitlines() if x.strip()]\n"
               "            _obj = _g['Solution']() if 'Solution' in _g else None\n"
               "            _f = getattr(_obj, _FN) if _obj is not None else _g[_FN]\n"
               "            if _f(*_args) != _json.loads(_out):\n"
               "                return False\n"
               "        else:\n"
               "            _buf = _io.StringIO()\n"
               "            _sys.stdin = _io.StringIO(_inp)\n"
               "            with _cl.redirect_stdout(_buf):\n"
               "                exec(_SRC, {'__name__': '__main__'})\n"
               "            _got = [l.rstrip() for l in _buf.getvalue().strip().splitlines()]\n"
               "            if _got != [l.rstrip() for l in _out.strip().splitlines()]:\n"
               "                return False\n"
               "    return True\n")
    return {"code": checker, "expr": "_run()"}


def check_completions(items: list[tuple[CodeItem, str]], *, timeout: float = 10.0) -> list[bool]:
    from megatron_sz import sandbox
    from megatron_sz.sandbox import Task

    reqs = [check_program(it, c) for it, c in items]
    runs = [Task(r["code"], expr=r["expr"], timeout=timeout, value_limit=64, output_limit=1 << 20)
            for r in reqs if r is not None]
    results = iter(sandbox.run_batch(runs) if runs else [])
    out = []
    for r in reqs:
        if r is None:
            out.append(False)
            continue
        res = next(results)
        out.append(res.status == "ok" and res.value_repr == "True")
    return out


# --------------------------------------------------------------------------- evaluation


def evaluate_code(items: list[CodeItem], backend, out: Path, *, k: int, pass_ks: list[int], sampling,
                  timeout: float = 10.0, progress: bool = True) -> dict:
    """k completions per item -> sandbox checks -> OUT/samples.jsonl (keyed, resumable) ->
    OUT/results.json with mean@k and pass@k per benchmark."""
    from megatron_sz.evaluation.metrics import macro_average, score_samples
    from megatron_sz.inference import GenerationRequest

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "samples.jsonl"
    key = lambda o: f"{o['benchmark']}|{o['problem_id']}#{o['sample_index']}"  # noqa: E731
    by_rid = {f"{it.benchmark}|{it.id}": it for it in items}
    with JsonlAppender(path, key=key) as app:
        todo = [rid for rid in by_rid if any(f"{rid}#{j}" not in app.done for j in range(k))]
        if progress:
            print(f"[eval code] {len(todo)} of {len(by_rid)} problems to sample ({k} each)", flush=True)

        def on_result(res) -> None:
            if not res.ok:
                return
            it = by_rid[res.id]
            oks = check_completions([(it, t) for t in res.texts], timeout=timeout)
            for j, (text, ok) in enumerate(zip(res.texts, oks)):
                app.append({"benchmark": it.benchmark, "problem_id": it.id, "sample_index": j, "text": text,
                            "correct": ok, "verifier": "sandbox", "extracted_answer": text[:200] or None})
        if todo:
            backend.generate([GenerationRequest(id=rid, prompt=by_rid[rid].prompt, n=k, sampling=sampling)
                              for rid in todo], progress=progress, on_result=on_result)
    rows = read_jsonl(path, allow_partial_tail=True)
    benches = []
    for name in dict.fromkeys(it.benchmark for it in items):
        samples = [r for r in rows if r["benchmark"] == name and f"{name}|{r['problem_id']}" in by_rid]
        s = score_samples(samples, benchmark=name, ks=pass_ks)
        benches.append({"benchmark": s.benchmark, "problems": s.problems, "samples": s.samples, "k": s.k,
                        "mean_at_k": s.mean_at_k, "pass_at_k": {str(kk): v for kk, v in s.pass_at_k.items()},
                        "pass_at_k_note": {str(kk): v for kk, v in s.pass_at_k_note.items()}})
        if name == "livecodebench":
            benches[-1]["public_tests_only"] = sum(1 for it in items if it.benchmark == name and it.data["public_only"])
    from megatron_sz.evaluation.metrics import BenchmarkScore

    macro = macro_average([BenchmarkScore(b["benchmark"], b["problems"], b["samples"], b["k"], b["mean_at_k"],
                                          {int(kk): v for kk, v in b["pass_at_k"].items()}) for b in benches])
    results = {"benchmarks": benches, "macro": macro, "k": k, "pass_ks": pass_ks}
    atomic_write_json(out / "results.json", results)
    return results
