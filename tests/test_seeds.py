"""The 100 shipped seeds and `megatron-sz seeds validate`.

* Every shipped ``answer_code`` snippet is run and its result is checked against the
  stated answer AND the solution's last ``\\boxed{}`` through ``megatron_sz.verify``.
* The shipped file validates with the paper's exact subject counts and levels 2-4.
* A corrupted copy (broken JSON, missing field, wrong answer, duplicate, near-duplicate,
  forbidden import, hanging snippet), built from a random sample each run, fails with
  exit code 1 and every issue on its own line number, in one report.
"""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from fractions import Fraction

import pytest

from megatron_sz import verify
from megatron_sz.cli import main
from megatron_sz.seeds import (PAPER_COUNTS, PAPER_LEVELS, find_near_duplicates, render_answer,
                               run_snippets, shipped_seed_file, validate_seed_file)


@pytest.fixture(scope="module")
def shipped() -> list[dict]:
    path = shipped_seed_file()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _after_last_boxed(text: str) -> str | None:
    k = text.rfind("\\boxed{")
    if k < 0:
        return None
    i, depth = k + len("\\boxed{"), 1
    while depth and i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[i:] if depth == 0 else None


def test_every_shipped_snippet_reproduces_answer_and_boxed(shipped):
    results = run_snippets([(r["id"], r["answer_code"]) for r in shipped], timeout_s=20)
    bad = []
    for r in shipped:
        res = results[r["id"]]
        if not res["ok"]:
            bad.append(f"{r['id']}: snippet failed: {res['error']}")
            continue
        boxed = verify.extract_answer(r["solution"], last_number_fallback=False)
        if boxed is None:
            bad.append(f"{r['id']}: no \\boxed answer in the solution")
            continue
        for what, a, b in (("snippet vs answer", res["latex"], r["answer"]),
                           ("boxed vs answer", boxed, r["answer"]),
                           ("snippet vs boxed", res["latex"], boxed)):
            if not verify.is_equivalent(a, b):
                bad.append(f"{r['id']}: {what}: {a!r} != {b!r}")
    assert not bad, "\n".join(bad)
    # the verifier is not a string compare: a wrong answer must be rejected
    rng = random.Random(len(shipped))
    for r in rng.sample(shipped, 10):
        assert not verify.is_equivalent(results[r["id"]]["latex"], r["answer"] + "+1")


def test_shipped_seeds_follow_the_paper_protocol(shipped):
    assert len(shipped) == 100
    assert len({r["id"] for r in shipped}) == 100
    counts = Counter(r["subject"] for r in shipped)
    assert dict(counts) == PAPER_COUNTS
    assert {r["level"] for r in shipped} <= set(PAPER_LEVELS)
    assert all(r["provenance"] == "seed" and r["round"] == 0 for r in shipped)
    # every worked solution ends with its boxed answer (at most a few closing words after it)
    for r in shipped:
        tail = _after_last_boxed(r["solution"])
        assert tail is not None and len(tail) <= 40 and tail.count("$") <= 1, (r["id"], tail)
    # the answers are not all integers: the seeds exercise the verifier's answer kinds
    kinds = Counter()
    for r in shipped:
        a = r["answer"]
        kinds["frac"] += "\\frac" in a
        kinds["sqrt"] += "\\sqrt" in a
        kinds["pi"] += "\\pi" in a
        kinds["interval"] += a[:1] in "([" and a[-1:] in ")]" and "," in a
        kinds["set"] += a.startswith(("\\{", "\\left\\{"))
        kinds["complex"] += a.endswith("i")
    assert all(kinds[k] >= 1 for k in ("frac", "sqrt", "pi", "interval", "set", "complex")), kinds


def test_cli_validates_shipped_file_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # packaged resource lookup, not the cwd
    code = main(["seeds", "validate", "seeds/socratic100.jsonl", "--json"])
    out = capsys.readouterr().out
    report = json.loads(out)
    assert code == 0, [i["message"] for i in report["issues"]]
    assert report["ok"] and report["n_records"] == 100 and report["snippets_run"] == 100
    assert not report["issues"]
    table = report["table"]
    assert {s: sum(row.values()) for s, row in table.items()} == PAPER_COUNTS
    assert {int(lv) for row in table.values() for lv in row} <= set(PAPER_LEVELS)



def test_cli_text_mode_prints_the_table(shipped, tmp_path, capsys, rng_seed):
    picks = random.Random(rng_seed).sample(shipped, 4)
    path = tmp_path / "four.jsonl"
    _write(path, [json.dumps(r) for r in picks])
    code = main(["seeds", "validate", str(path), "--no-counts"])
    out = capsys.readouterr().out
    assert code == 0, out
    for r in picks:
        assert r["subject"] in out
    assert "L" + str(picks[0]["level"]) in out
    assert out.strip().splitlines()[-1].startswith("OK:")
    # with the paper's counts the same file fails, and the table marks the short rows
    assert main(["seeds", "validate", str(path), "--no-exec"]) == 1
    out = capsys.readouterr().out
    assert "counts:" in out and "<-" in out and "expected" in out


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_bad_file_reports_every_problem_with_line_numbers(shipped, tmp_path, capsys, rng_seed):
    rng = random.Random(rng_seed)
    picks = rng.sample(shipped, 8)
    recs = [dict(r) for r in picks]
    lines = [json.dumps(r) for r in recs]
    expect: list[tuple[int, str]] = []  # (1-based line, field)

    # broken JSON
    i = 0
    lines[i] = lines[i][: rng.randrange(10, len(lines[i]) - 5)]
    expect.append((i + 1, "json"))
    # missing field
    i = 1
    field = rng.choice(["id", "problem", "answer", "solution", "subject", "level",
                        "answer_code"])
    r = dict(recs[i])
    del r[field]
    lines[i] = json.dumps(r)
    expect.append((i + 1, field))
    # wrong answer: a different value of the same kind -> boxed and snippet both disagree
    i = 2
    r = dict(recs[i])
    r["answer"] = f"{r['answer']} + {rng.randint(1, 9)}" if "," not in r["answer"] else "0"
    lines[i] = json.dumps(r)
    expect += [(i + 1, "solution"), (i + 1, "answer_code")]
    # forbidden import
    i = 3
    r = dict(recs[i])
    r["answer_code"] = "import os\nanswer = len(os.listdir('.'))"
    lines[i] = json.dumps(r)
    expect.append((i + 1, "answer_code"))
    # a snippet that never ends
    i = 4
    r = dict(recs[i])
    r["answer_code"] = "while True:\n    pass"
    lines[i] = json.dumps(r)
    expect.append((i + 1, "answer_code"))
    # exact duplicate (new id, same statement modulo case/whitespace) of a valid line
    dup = dict(recs[5], id="copy-1", problem="  " + recs[5]["problem"].upper() + " ")
    lines.append(json.dumps(dup))
    expect.append((len(lines), "problem"))
    # near-duplicate: one word appended, which adds exactly one word trigram, so the copy stays
    # above the 0.5 threshold even for the shortest seed (a word inserted mid-sentence breaks
    # up to three trigrams and can fall below it for an 8-word statement)
    words = recs[6]["problem"].split(" ")
    words.append(rng.choice(["really", "please", "exactly"]))
    near = dict(recs[6], id="copy-2", problem=" ".join(words))
    lines.append(json.dumps(near))
    expect.append((len(lines), "problem"))
    # duplicate id
    lines.append(json.dumps(dict(recs[7], problem="A brand new statement: what is 2 + 3?",
                                 answer="5", solution="$2 + 3 = \\boxed{5}$",
                                 answer_code="answer = 2 + 3")))
    expect.append((len(lines), "id"))

    path = tmp_path / "bad.jsonl"
    _write(path, lines)
    t0 = time.monotonic()
    code = main(["seeds", "validate", str(path), "--timeout", "2", "--near-dup-threshold", "0.5"])
    elapsed = time.monotonic() - t0
    out = capsys.readouterr().out
    assert code == 1
    for line, field in expect:
        assert f"{path}:{line}: {field}:" in out, (line, field, out)
    assert "counts:" in out  # 9 problems is not the paper's split
    assert elapsed < 40

    # the same findings as JSON, parseable, with line numbers
    code = main(["seeds", "validate", str(path), "--timeout", "2", "--json", "--no-counts",
                 "--near-dup-threshold", "0.5"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["ok"] is False
    found = {(i["line"], i["field"]) for i in report["issues"]}
    relaxed = {(ln, f) for ln, f in expect if f not in ("subject", "level")}  # optional now
    assert relaxed <= found, relaxed - found
    assert not any(i["field"] == "counts" for i in report["issues"])


def test_no_counts_and_no_exec_relax_the_protocol(shipped, tmp_path):
    r = dict(shipped[0], subject="Combinatorics", level=5)
    del r["answer_code"]
    path = tmp_path / "mine.jsonl"
    _write(path, [json.dumps(r)])
    strict = validate_seed_file(path)
    fields = {i.field for i in strict.errors}
    assert {"subject", "level", "answer_code", "counts"} <= fields
    relaxed = validate_seed_file(path, expected_counts=None, levels=None, run_code=False)
    assert relaxed.ok, [str(i) for i in relaxed.issues]
    assert [i.field for i in relaxed.warnings] == ["answer_code"]
    assert relaxed.table == {"Combinatorics": {5: 1}}


def test_unparseable_answer_is_reported(shipped, tmp_path):
    r = dict(shipped[0], answer="\\frac{3}{", answer_code="answer = '\\\\frac{3}{'")
    path = tmp_path / "x.jsonl"
    _write(path, [json.dumps(r)])
    rep = validate_seed_file(path, expected_counts=None)
    assert [(i.line, i.field) for i in rep.errors] == [(1, "answer")]


def test_missing_file_is_a_user_error(tmp_path, capsys):
    assert main(["seeds", "validate", str(tmp_path / "nope.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err


def test_snippet_runner_isolation(tmp_path):
    t0 = time.monotonic()
    marker = tmp_path / "pwned"  # a host folder the sandbox cannot see
    res = run_snippets([
        ("import", "import subprocess\nanswer = 1"),
        ("open", "answer = open('/etc/hostname').read()"),
        ("c_hang", "answer = 7 ** (7 ** 9)"),  # big-int power in C: signals wait, a kill does not
        ("after_kill", "from sympy import Rational\nanswer = Rational(6, 4)"),
        ("no_answer", "x = 1"),
        ("print", "print('noise')\nanswer = (1, 2)"),
        # the three escapes of the old runner (issue 14): contained by the sandbox
        ("sympify", f"import sympy\nanswer = sympy.sympify(\"__import__('os').system("
                    f"'touch {marker}')\")"),
        ("subclasses", "import sympy\nfor c in ().__class__.__base__.__subclasses__():\n"
                       "    if c.__name__ == '_wrap_close':\n"
                       f"        c.__init__.__globals__['system']('touch {marker}')\nanswer = 1"),
        ("globals", "import sympy\nimp = sympy.sympify.__globals__['__builtins__']['__import__']\n"
                    f"answer = imp('os').listdir('{tmp_path}')"),
    ], timeout_s=1)
    assert "not allowed" in res["import"]["error"]
    assert "No such file" in res["open"]["error"]  # no /etc inside the sandbox
    assert not res["c_hang"]["ok"] and "timed out" in res["c_hang"]["error"]
    assert res["after_kill"] == {"ok": True, "latex": "\\frac{3}{2}", "repr": "3/2"}
    assert "answer" in res["no_answer"]["error"]
    assert res["print"]["latex"] == "(1, 2)"
    assert not marker.exists()
    assert not res["globals"]["ok"]  # the host folder does not exist in there
    assert time.monotonic() - t0 < 25


def test_render_answer_kinds_are_verifiable(rng_seed):
    import sympy

    rng = random.Random(rng_seed)
    p, q = rng.randint(1, 50), rng.randint(2, 50)
    a, b = sorted(rng.sample(range(-20, 20), 2))
    cases = [
        (Fraction(p, q), f"\\frac{{{p}}}{{{q}}}"),
        (sympy.Rational(p, q) * sympy.sqrt(2), f"\\frac{{{p}\\sqrt{{2}}}}{{{q}}}"),
        (p * sympy.pi, f"{p}\\pi"),
        ((a, b), f"({a}, {b})"),
        (sympy.Interval.Ropen(a, b), f"[{a}, {b})"),
        (sympy.Interval(a, sympy.oo, left_open=True), f"({a}, \\infty)"),
        (sympy.FiniteSet(b, a), f"\\{{{a}, {b}\\}}"),
        (sympy.Union(sympy.Interval.open(-sympy.oo, a), sympy.Interval(b, sympy.oo)),
         f"(-\\infty, {a}) \\cup [{b}, \\infty)"),
        (p + q * sympy.I, f"{p}+{q}i"),
    ]
    for value, ref in cases:
        got = render_answer(value)
        assert verify.is_equivalent(got, ref), (value, got, ref)
    with pytest.raises(TypeError):
        render_answer(True)


def test_near_duplicates(rng_seed):
    rng = random.Random(rng_seed)
    vocab = [f"w{i}" for i in range(400)]
    texts = [" ".join(rng.choice(vocab) for _ in range(30)) for _ in range(20)]
    base = texts[3].split()
    base[rng.randrange(len(base))] = "CHANGED"
    texts.append(" ".join(base))                 # near-duplicate of 3
    texts.append("$" + texts[7].upper() + "$.")  # exact duplicate of 7 after normalising
    pairs = {(i, j) for i, j, _ in find_near_duplicates(texts, threshold=0.7)}
    assert pairs == {(3, 20), (7, 21)}
