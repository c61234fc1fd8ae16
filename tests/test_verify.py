"""Tests for megatron_sz.verify (answer extraction + equivalence) and `megatron-sz verify`.

Tables of equivalent / non-equivalent pairs are checked in BOTH directions. Randomised
tests render fresh random values in several notations and compare against the value
computed here with fractions. Adversarial inputs are checked against a wall clock.
"""
from __future__ import annotations

import os
import random
import time
from fractions import Fraction

import pytest

from megatron_sz.cli import main as cli_main
from megatron_sz.verify import (BatchVerdict, Verdict, extract_answer, is_equivalent, judge,
                                verify_batch)
from megatron_sz.verify.worker import Worker

# ----------------------------------------------------------------------------- extraction

EXTRACT_CASES = [
    (r"First $\boxed{3}$, then we correct: $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"So $x = \boxed{\sqrt{2}}$", r"\sqrt{2}"),
    (r"\boxed{\frac{\sqrt{3}}{\left(2+\sqrt{5}\right)}}", r"\frac{\sqrt{3}}{\left(2+\sqrt{5}\right)}"),
    (r"The set is \boxed{\{1, 2\}}.", r"\{1, 2\}"),
    (r"Thus the answer is \boxed 5.", "5"),
    (r"\fbox{42} is it", "42"),
    (r"so \boxed{7} ... and finally \boxed{8", "7"),  # truncated last box -> the earlier one
    ("The answer is $42$.", "42"),
    ("Therefore, the answer is 3.5. Next we check it.", "3.5"),
    ("**Final Answer:** 17", "17"),
    ("Final answer: \\frac{3}{4}", "\\frac{3}{4}"),
    ("We get 3 apples and then 12 oranges.", "12"),
    ("Total: 1,234,567 people", "1,234,567"),
    ("The ratio is 3/4 overall", "3/4"),
    ("it equals -2.5", "-2.5"),
    (r"hence \boxed12.", "12"),
    ("The answer is \\(x = 3\\).", "x = 3"),
    (r"The answer is: $\frac{1}{2}$ since we halve it", r"\frac{1}{2}"),
]


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_no_answer_and_fallback_switch():
    assert extract_answer("") is None
    assert extract_answer("no digits at all") is None
    assert extract_answer("we computed 12 things", last_number_fallback=False) is None
    assert extract_answer("we computed 12 things") == "12"
    assert extract_answer(r"\boxed{4} and then 5", last_number_fallback=False) == "4"


def test_extract_is_linear_time():
    deep = "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}"
    t0 = time.monotonic()
    got = extract_answer(deep)
    assert got == "{" * 10_000 + "1" + "}" * 10_000
    unbalanced = "\\boxed{" * 10_000 + "x"
    assert extract_answer(unbalanced, last_number_fallback=False) is None
    big = ("lorem ipsum 12, " * 70_000) + "\\boxed{"  # ~1 MB, last box unterminated
    assert extract_answer(big) == "12"
    assert extract_answer("a\x00b \\boxed{5\x00}") == "5"
    assert time.monotonic() - t0 < 3.0


# ----------------------------------------------------------------------------- equivalence

EQUIVALENT = [
    # fractions
    (r"\frac{1}{2}", "0.5"), (r"\dfrac{3}{4}", "3/4"), (r"\tfrac12", r"\frac{1}{2}"),
    (r"-\frac{1}{2}", r"\frac{-1}{2}"), (r"\frac{2}{4}", "0.5"), (r"\frac{6}{8}", r"\frac34"),
    ("-0.25", r"-\frac{1}{4}"), (r"\frac{10}{4}", "2.5"),
    # mixed numbers
    (r"2\frac{1}{2}", r"\frac{5}{2}"), ("2 1/2", "2.5"), (r"1\frac{3}{4}", "7/4"),
    # radicals
    (r"\sqrt{8}", r"2\sqrt{2}"), (r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}\sqrt3"),
    (r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}"), (r"3\sqrt{2}", r"\sqrt{18}"),
    (r"2\sqrt{3}+1", r"1+\sqrt{12}"), (r"\sqrt[3]{8}", "2"),
    # pi
    (r"\pi/2", r"\frac{\pi}{2}"), (r"2\pi", r"\pi \cdot 2"), (r"\frac{3\pi}{4}", r"0.75\pi"),
    # algebra
    ("x^2+2x+1", "(x+1)^2"), ("a^2+b^2", "b^2+a^2"), ("2^{10}", "1024"), ("5!", "120"),
    (r"\binom{5}{2}", "10"), ("1,000,000", "10^6"),
    # intervals
    (r"(-\infty, 3]", r"(-\infty,3]"), ("[0, 1]", "[0,1]"), (r"x \in [2, 5)", "[2,5)"),
    (r"(-\infty, 0) \cup (1, \infty)", r"(1,\infty)\cup(-\infty,0)"),
    (r"\left[ 1, 2 \right)", "[1,2)"),
    # sets (order-insensitive)
    (r"\{1,2\}", r"\{2,1\}"), (r"\{-1, 1\}", r"\{1,-1\}"), ("1, 2, 3", "3, 2, 1"),
    (r"\{\frac12, 3\}", r"\{3, 0.5\}"), ("x = 1 or x = 2", "1, 2"),
    # tuples (ordered)
    ("(3, -2)", "(3,-2)"), (r"(\frac{1}{2}, 3)", "(0.5, 3)"), ("x = 1, y = 2", "(1, 2)"),
    (r"(1, \sqrt{2})", r"(1,\sqrt2)"),
    # percentages
    (r"50\%", "0.5"), (r"50\%", "50"), ("12%", "0.12"), (r"12.5\%", r"\frac{1}{8}"),
    ("25 percent", "25"),
    # degrees
    (r"30^\circ", "30"), (r"45^{\circ}", "45"), ("60°", "60"), ("90 degrees", "90"),
    (r"45^\circ", r"\frac{\pi}{4}"),
    # text-wrapped
    (r"\text{Tuesday}", "tuesday"), (r"\textbf{5}", "5"), ("x = 5", "5"), ("y=2x+3", "2x+3"),
    (r"\text{(B)}", "B"), ("Yes", "yes"), ("  no  solution ", r"\text{No Solution}"),
    ("5 apples", "5"), (r"\text{8 apples}", "8"), (r"\infty", "infinity"),
    ("Alice and Bob", r"\text{bob, alice}"), (r"\text{ABC}", "abc"),
    # units
    (r"5\mbox{ cm}", "5"), ("5 meters", "5"), (r"12 \text{ cm}^2", "12"),
    (r"6\text{ square units}", "6"), (r"\$5", "5"), ("5 dollars", r"\$5"),
    (r"3\sqrt{2}\text{ cm}", r"\sqrt{18}"), ("10 m", "10"),
    # plain numbers, tolerance, commas
    ("1,000", "1000"), ("1{,}000", "1000"), (r"\$1,234.56", "1234.56"), ("1.50", "1.5"),
    ("10", "10.0000001"), ("0.3333333", r"\frac{1}{3}"), ("1e3", "1000"), ("007", "7"),
    (r"2.5\times10^{3}", "2500"), ("$\\boxed{\\frac{3}{4}}$", "0.75"), ("\\(7\\)", "7"),
    # repeating decimals, inequalities as intervals, plus-minus, aliases, matrices
    (r"0.\overline{3}", r"\frac{1}{3}"), (r"1.\overline{27}", r"\frac{14}{11}"),
    (r"x \ge 3", r"[3, \infty)"), (r"1 < x \le 2", "(1,2]"), ("x < -1", r"(-\infty,-1)"),
    (r"\pm 2", "2, -2"), (r"x = 1 \pm \sqrt{2}", r"1-\sqrt2, 1+\sqrt2"),
    (r"\mathbb{R}", r"(-\infty, \infty)"), ("2*pi", r"2\pi"), (r"\emptyset", r"\{\}"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
]

NOT_EQUIVALENT = [
    # fractions / numbers
    (r"\frac{1}{2}", r"\frac{1}{3}"), ("0.333", r"\frac13"), ("5", "-5"), ("100", "100.01"),
    (r"1\frac{1}{2}", r"\frac{1}{2}"), (r"\frac{3}{2}", "2/3"), ("0.5", "5"),
    # tuple vs number, commas
    ("1,2", "12"), ("(1,2)", "12"), ("1,000", "1"), ("(1,000)", "1000"),
    # tuples are ordered
    ("(1,2)", "(2,1)"), (r"(1, \sqrt{2})", r"(\sqrt2, 1)"), ("(1,2,3)", "(1,2)"),
    # intervals: open vs closed ends
    ("[1,2)", "(1,2)"), (r"(-\infty, 3]", r"(-\infty,3)"), ("[0,1]", "(0,1)"), ("(0,1]", "[0,1)"),
    ("[1,2]", "1, 2"), ("(1,2)", r"\{1, 2\}"),
    # sets
    (r"\{1,2,3\}", r"\{1,2\}"), (r"\{1,2\}", r"\{1,3\}"), ("1, 2", "1, 2, 3"),
    # radicals / pi / algebra
    (r"\sqrt{2}", "1.414"), ("3.14159", r"\pi"), (r"2\pi", r"\pi"), (r"\sqrt{8}", r"3\sqrt{2}"),
    ("x+1", "x+2"), ("x^2", "2x"), ("2", "2x"), (r"\frac{\pi}{3}", r"\frac{\pi}{6}"),
    # percent / degrees
    (r"50\%", "5"), (r"0.5\%", r"50\%"), (r"12\%", "0.012"), (r"45^\circ", r"\frac{\pi}{3}"),
    (r"30^\circ", "60"),
    # text / units
    ("5 apples", "6"), ("Tuesday", "Wednesday"), ("yes", "no"), (r"5\mbox{ cm}", "50"),
    (r"\text{odd}", "even"), ("12", "21"),
    # exactness of integers, approximations, inequalities, plus-minus, matrices
    ("895027838", "895028238"), (r"\sqrt{2}", "1.41421"), (r"0.\overline{3}", "0.3"),
    (r"x \ge 3", r"(3, \infty)"), (r"x > 3", r"[3, \infty)"), (r"\pm 2", "2"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}2\\1\end{pmatrix}"),
]


@pytest.mark.parametrize("a,b", EQUIVALENT + [(b, a) for a, b in EQUIVALENT])
def test_equivalent_pairs(a, b):
    v = judge(a, b)
    assert v.equivalent is True, v
    assert v.decided_by == "rule"
    assert is_equivalent(a, b)


@pytest.mark.parametrize("a,b", NOT_EQUIVALENT + [(b, a) for a, b in NOT_EQUIVALENT])
def test_not_equivalent_pairs(a, b):
    assert not is_equivalent(a, b), judge(a, b)


def test_table_is_broad():
    assert len(EQUIVALENT) + len(NOT_EQUIVALENT) >= 80


# ----------------------------------------------------------------------------- randomised

def _render_fraction(x: Fraction, rng: random.Random) -> list[str]:
    """Several notations for the same rational value."""
    p, q = x.numerator, x.denominator
    sign = "-" if p < 0 else ""
    ap = abs(p)
    forms = [f"{sign}\\frac{{{ap}}}{{{q}}}", f"{p}/{q}", f"{sign}\\dfrac{{{ap * 3}}}{{{q * 3}}}",
             f"\\frac{{{p * 2}}}{{{q * 2}}}"]
    if q in (1, 2, 4, 5, 8, 10, 20, 25):
        forms.append(f"{float(x):.6f}".rstrip("0").rstrip("."))
    if ap > q and q > 1:
        whole, rem = divmod(ap, q)
        forms.append(f"{sign}{whole}\\frac{{{rem}}}{{{q}}}")
    if q == 1:
        forms.append(f"{p:,}")
    return forms


def test_random_fraction_notations(rng_seed):
    rng = random.Random(rng_seed)
    for _ in range(40):
        x = Fraction(rng.randint(-5000, 5000), rng.choice([1, 2, 3, 4, 5, 7, 8, 12, 25]))
        forms = _render_fraction(x, rng)
        a, b = rng.sample(forms, 2) if len(forms) > 1 else (forms[0], forms[0])
        assert is_equivalent(a, b), (x, a, b, judge(a, b))
        y = x + Fraction(rng.randint(1, 9), rng.choice([1, 3, 7]))
        c = rng.choice(_render_fraction(y, rng))
        assert not is_equivalent(a, c), (x, y, a, c, judge(a, c))


def test_random_tuples_sets_intervals(rng_seed):
    rng = random.Random(rng_seed)
    for _ in range(30):
        items = rng.sample(range(-50, 50), rng.randint(2, 4))
        perm = items[:]
        while perm == items:
            rng.shuffle(perm)
        fmt = lambda xs: ", ".join(str(v) for v in xs)  # noqa: E731
        assert is_equivalent(f"\\{{{fmt(items)}\\}}", f"\\{{{fmt(perm)}\\}}")
        assert not is_equivalent(f"({fmt(items)})", f"({fmt(perm)})")
        assert is_equivalent(f"({fmt(items)})", f"( {fmt(items)} )")
        lo, hi = sorted(rng.sample(range(-100, 100), 2))
        ends = rng.sample(["()", "[]", "(]", "[)"], 2)
        assert is_equivalent(f"{ends[0][0]}{lo},{hi}{ends[0][1]}", f"{ends[0][0]}{lo}, {hi}{ends[0][1]}")
        assert not is_equivalent(f"{ends[0][0]}{lo},{hi}{ends[0][1]}", f"{ends[1][0]}{lo},{hi}{ends[1][1]}")


def test_random_percent_thousands_units(rng_seed):
    rng = random.Random(rng_seed)
    for _ in range(30):
        pct = rng.randint(1, 999)
        assert is_equivalent(f"{pct}\\%", f"{Fraction(pct, 100).numerator}/{Fraction(pct, 100).denominator}")
        assert is_equivalent(f"{pct}%", str(pct))
        assert not is_equivalent(f"{pct}\\%", str(pct + 1))
        n = rng.randint(1000, 10**9)
        assert is_equivalent(f"{n:,}", str(n))
        assert is_equivalent(f"{n} \\text{{ {rng.choice(['cm', 'meters', 'apples', 'units'])}}}", str(n))
        assert not is_equivalent(f"{n:,}", str(n + rng.randint(1, 999)))
        deg = rng.randint(1, 359)
        assert is_equivalent(f"{deg}^\\circ", str(deg))
        assert is_equivalent(f"{deg}^\\circ", f"\\frac{{{deg}\\pi}}{{180}}")


# ----------------------------------------------------------------------------- robustness

ADVERSARIAL = [
    "9^9^9^9", "10^10^10", "10^{10^{10}}", "2^{2^{2^{2^{2}}}}", "9**9**9**9", "10^{99999999}",
    "(10^{6})!", "100000!", "((5!)!)!", "{" * 10_000 + "}" * 10_000,
    "\\frac{" * 5000, "\\sqrt{" * 3000 + "2" + "}" * 3000, "\\frac{1}{", "\\left( \\right.",
    "}}}{{{", "\\begin{matrix}", "$$$$", "\\boxed{", "x" * 1_000_000, "1" * 1_000_000,
    "\x00\x00\x00", "5\x00" * 1000, "\\" * 10_000, "(" * 5000, "^" * 5000, "1/0", "0/0",
    "\\frac{1}{0}", "\\sqrt{-1}", "\\log(0)", "NaN", "nan", "\\infty - \\infty",
    "(9^9)^(9^9)", "\\binom{10^9}{10^8}", "\\Gamma(10^6)", "e^{e^{e^{79}}}",
    "(10^{9999}+1)^{9999}",  # passes the guards: the sandbox's timeout must catch it
]


@pytest.mark.parametrize("bad", ADVERSARIAL, ids=lambda s: repr(s[:20]) + f"..{len(s)}")
def test_adversarial_inputs_return_quickly(bad):
    for a, b in ((bad, "5"), ("5", bad)):
        t0 = time.monotonic()
        v = judge(a, b, timeout_s=5.0)
        took = time.monotonic() - t0
        assert isinstance(v, Verdict)
        assert v.equivalent is not True, v
        assert took < 5.0, (took, v)


def test_never_raises_on_odd_types():
    assert is_equivalent(None, "5") is False
    assert judge(None, "5").decided_by == "undecided"
    assert judge("", "5").decided_by == "undecided"
    assert judge("5", "").decided_by == "undecided"
    assert is_equivalent(5, "5") is True  # non-str answers are stringified, not rejected


def test_timeout_stops_a_c_level_hang(monkeypatch):
    """A request stuck in one C call (a huge int power) is killed at the deadline."""
    from megatron_sz.verify import _symbolic

    monkeypatch.setenv("MEGATRON_SZ_VERIFY_SELFTEST", "1")
    w = Worker()
    try:
        w.start()
        assert w.wait_ready(time.monotonic() + 60)
        t0 = time.monotonic()
        v = _symbolic({"a": "x+1", "b": "1+x", "selftest_hang": True}, w, 1.0, t0)
        took = time.monotonic() - t0
        assert v.decided_by == "undecided" and "timeout" in v.reason, v
        assert took < 2.5, took  # 1 s budget + kill; slack for a loaded CI machine
        assert w.restarts == 1
        # The replacement worker answers normally.
        v2 = _symbolic({"a": "x+1", "b": "1+x"}, w, 30.0, time.monotonic())
        assert v2.equivalent is True, v2
    finally:
        w.kill()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_its_own_worker():
    """A forked process must not talk to its parent's worker over inherited pipes."""
    assert is_equivalent("x+1", "1+x")  # the parent's worker is running now
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        ok = is_equivalent("x+2", "2+x") and not is_equivalent("x+2", "2x")
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.waitpid(pid, 0)
    assert got == b"1"
    assert is_equivalent("x+3", "3+x")


# ----------------------------------------------------------------------------- batch

def test_verify_batch_shares_and_pool_agree(rng_seed):
    rng = random.Random(rng_seed)
    pairs = [(r"\frac{1}{2}", "0.5"), ("x^2+2x+1", "(x+1)^2"), (None, "3"), ("Tuesday", "Monday"),
             ("9^9^9^9", "1"), (r"\sqrt{8}", r"2\sqrt2"), ("(1,2)", "(2,1)"), ("7", "8")]
    rng.shuffle(pairs)
    expected_undecided = {(None, "3"), ("Tuesday", "Monday"), ("9^9^9^9", "1")}
    # A generous per-answer timeout: this test is about agreement, not speed.
    serial = verify_batch(pairs, workers=0, timeout_s=30)
    pooled = verify_batch(pairs, workers=2, timeout_s=30)
    assert isinstance(serial, BatchVerdict)
    assert [r.equivalent for r in serial.results] == [r.equivalent for r in pooled.results]
    for (a, b), r in zip(pairs, serial.results):
        assert (r.decided_by == "undecided") == ((a, b) in expected_undecided), (a, b, r)
        if r.decided_by == "rule":
            assert r.equivalent == is_equivalent(a, b)
    assert serial.undecided_share == pytest.approx(len(expected_undecided) / len(pairs))
    assert serial.rule_share == pytest.approx(1 - len(expected_undecided) / len(pairs))
    assert serial.summary()["n"] == len(pairs)
    assert verify_batch([]).results == []


# ----------------------------------------------------------------------------- CLI

def test_cli_exit_codes(capsys):
    assert cli_main(["verify", "--answer", r"\frac{1}{2}", "--reference", "0.5"]) == 0
    assert "equivalent" in capsys.readouterr().out
    assert cli_main(["verify", "--answer", "3", "--reference", "4"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("not equivalent") and out.count("\n") == 1
    assert cli_main(["verify", "--text", "--answer", r"we get \boxed{\sqrt{8}} cm.",
                     "--reference", r"2\sqrt{2}"]) == 0
    assert r"'\\sqrt{8}'" in capsys.readouterr().out
    assert cli_main(["verify", "--text", "--no-last-number", "--answer", "maybe 3",
                     "--reference", "3"]) == 1
    assert "no answer extracted" in capsys.readouterr().out
    assert cli_main(["verify", "--text", "--answer", "maybe 3", "--reference", "3"]) == 0
    capsys.readouterr()
    assert cli_main(["verify", "--answer", "1", "--reference", "1", "--timeout", "0"]) == 2
    assert "--timeout" in capsys.readouterr().err


def test_cli_subprocess_json():
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "megatron_sz", "verify", "--answer", r"50\%",
                           "--reference", "0.5", "--json"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["equivalent"] is True and rec["decided_by"] == "rule"
