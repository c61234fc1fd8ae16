"""Pure-Python answer normalisation and structural comparison (no sympy, never hangs).

This layer runs in the calling process, before anything symbolic, and decides the
bulk of real answers on its own (plain numbers, fractions, mixed numbers, percentages,
degrees, units, thousands separators, tuples/sets/intervals of those, text answers).
Everything it does is linear-ish in the input and bounded by the guard:

* ``unsafe_reason`` rejects inputs that could hang sympy in C code where no signal or
  timeout can interrupt it (power towers like ``9^9^9^9``, huge exponents and
  factorials, deep nesting, very long strings). Those never reach the symbolic worker.
* ``canonicalize`` strips presentation (``\\left``, ``\\text{}``, ``$``, units, ``x =``)
  and records what it removed that changes meaning (percent, degrees).
* ``compare_values`` returns True/False when it can decide and None when the answer
  needs the symbolic layer (radicals, pi, algebraic expressions).

Numbers are ``fractions.Fraction`` (exact) and compared with a relative tolerance of
``REL_TOL`` so that ``0.3333333`` matches ``1/3`` but ``0.333`` does not; integers, and
decimals whose value is an integer (``100000001.0``), are compared exactly.

Conventions decided here (see tests/test_verify_independent.py): named values
``a=2, b=3`` are matched by name; ``x<-1 or x>1`` and ``x \\neq 2`` become unions of
intervals; a one-element set equals its element; small number words ("five") are
numbers; unicode ``½ ± ² ≠`` and Python ``**`` / ``2.06e-9`` are rewritten to LaTeX.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction

REL_TOL = 1e-6
ABS_TOL = 1e-12
MAX_ANSWER_CHARS = 1000
MAX_NESTING = 40
MAX_EXPONENT = 10_000
MAX_FACTORIAL = 1_000

_CTRL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

# Guards: anything that can make sympy compute a gigantic integer in C.
_POWER_TOWER = re.compile(
    r"\^\s*\{?\s*[-+]?[\w.\\]+\s*\}?\s*\^"      # a^b^c, a^{b}^c
    r"|\^\s*\{[^{}]*\^"                            # a^{b^c}
    r"|\^\s*\([^()]*\^"                            # (a^b)^(c^d)
    r"|\*\*[^*]*\*\*")                             # a**b**c
_EXPONENT = re.compile(r"(?:\^|\*\*)\s*\{?\s*\(?\s*(\d+)")
_FACTORIAL = re.compile(r"(\d+)\s*\}?\s*\)?\s*!")
_COMBINATORIAL = re.compile(r"\\binom|\\choose|!|\\Gamma|\\sum|\\prod|factorial|gamma")
_DIGITS = re.compile(r"\d+")
_NUMERIC_POWER = re.compile(r"\d\s*\^\s*\{?\s*(\d+)")   # 10^{9}: base is a number
# \sum_{k=1}^{N} / \prod_{k=1}^{N}: the ^ is an upper bound, not an exponent (issue 20).
_BIG_OPERATOR = re.compile(r"\\(sum|prod)\s*(?:_\s*(?:\{[^{}]*\}|\S))?\s*\^\s*(\{[^{}]*\}|[^\s{}]+)")
MAX_TERMS = 1_000
_NESTED_FACTORIAL = re.compile(r"!\s*[)}]\s*!")

_UNICODE = {
    "\u2212": "-", "\u2013": "-", "\u00d7": r"\times ", "\u00b7": r"\cdot ", "\u03c0": r"\pi ",
    "\u221e": r"\infty ", "\u221a": r"\sqrt", "\u2264": r"\leq ", "\u2265": r"\geq ",
    "\u222a": r"\cup ", "\u2229": r"\cap ", "\u00b0": r"^\circ ", "\u2009": " ", "\u00a0": " ",
    "\u00b1": r"\pm ", "\u2213": r"\mp ", "\u2260": r"\neq ", "\u2205": r"\emptyset ", "\u00b2": "^{2}", "\u00b3": "^{3}",
    "\u00b9": "^{1}", "\u2070": "^{0}", "\u2074": "^{4}",
    # vulgar fractions: "½" and "1½" (a mixed number) as models and users write them
    "\u00bd": r"\frac{1}{2}", "\u2153": r"\frac{1}{3}", "\u2154": r"\frac{2}{3}", "\u00bc": r"\frac{1}{4}",
    "\u00be": r"\frac{3}{4}", "\u2155": r"\frac{1}{5}", "\u2156": r"\frac{2}{5}", "\u2157": r"\frac{3}{5}",
    "\u2158": r"\frac{4}{5}", "\u2159": r"\frac{1}{6}", "\u215a": r"\frac{5}{6}", "\u2150": r"\frac{1}{7}",
    "\u215b": r"\frac{1}{8}", "\u215c": r"\frac{3}{8}", "\u215d": r"\frac{5}{8}", "\u215e": r"\frac{7}{8}",
    "\u2151": r"\frac{1}{9}", "\u2152": r"\frac{1}{10}",
}
_SPACING = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])|\\displaystyle|\\limits"
                      r"|\\[!,;:>]|\\q?quad(?![A-Za-z])")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|textsf|texttt|mathrm|mathbf|"
                       r"mathit|mathsf|mathtt|mbox|hbox|operatorname|emph)\s*\{([^{}]*)\}")
_FRAC_VARIANT = re.compile(r"\\[dtc]frac(?![A-Za-z])")
_BINOM_VARIANT = re.compile(r"\\[dt]binom(?![A-Za-z])")
_RELATION_SHORT = [(re.compile(r"\\le(?![A-Za-z])"), r"\\leq"), (re.compile(r"\\ge(?![A-Za-z])"), r"\\geq"),
                   (re.compile(r"\\ne(?![A-Za-z])"), r"\\neq")]
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|(?<=\d)\s*\^\s*\{?o\}?(?![A-Za-z])|\s*\bdegrees?\b\.?|\s*\bdeg\b\.?")
_PERCENT = re.compile(r"\\%|%|\s*\bpercent\b")
_DOLLAR = re.compile(r"\\\$|\s*\bdollars?\b|[\u20ac\u00a3\u00a5]|\\(?:euro|pounds)(?![A-Za-z])")
_SHORT_ARG = re.compile(r"\\(sqrt|frac)\s*(\d|[A-Za-z](?![A-Za-z]))")      # \sqrt2 -> \sqrt{2}
_FRAC_SECOND = re.compile(r"\\frac\{([^{}]*)\}\s*(\d|[A-Za-z](?![A-Za-z]))")  # \frac{1}2 -> \frac{1}{2}
# A subscript is balanced: "x_{1} = 2" is an assignment, "\prod_{k=1}^{n} k" is not (issue 20).
_VAR_ASSIGN = re.compile(r"^\s*((?:[A-Za-z]|\\[A-Za-z]+)(?:_(?:\{\w+\}|\w+))?(?:\([A-Za-z]\))?)\s*=\s*(.+)$", re.S)
_VAR_IN = re.compile(r"^\s*[A-Za-z]\s*\\in\s*(.+)$", re.S)
_CONJUNCTION = re.compile(r"\s+(?:or|and)\s+|\\(?:text)?\s*(?:or|and)\b")
_THOUSANDS_LATEX = re.compile(r"(\d)\{,\}(?=\d{3})")
_THOUSANDS = re.compile(r"(?<![\d.,])(-?\d{1,3}(?:,\d{3})+)(?![\d,])(\.\d+)?")
_PY_POWER = re.compile(r"(?<=[\w)}])\s*\*\*\s*(?=[\w({.+-])")
_E_NOTATION = re.compile(r"(?<![A-Za-z\\\d.])(\d+\.?\d*|\.\d+)[eE]([-+]?\d+)(?![\d.A-Za-z])")
_MIXED_PLAIN = re.compile(r"^(-?)(\d+)\s+(\d+)\s*/\s*(\d+)$")

# Words that are mathematics, never units.
_MATH_WORDS = {
    "pi", "sqrt", "frac", "infty", "inf", "sin", "cos", "tan", "cot", "sec", "csc", "arcsin",
    "arccos", "arctan", "log", "ln", "exp", "cap", "circ", "cdot", "times", "and", "or",
    "i", "e", "sinh", "cosh", "tanh", "mod", "gcd", "lcm", "max", "det", "binom",
}
# ("cup" and "min" are units too -- "1/2 cup", "5 min"; the commands \cup and \min are
# never stripped anyway, because a unit never follows a backslash.)
# Single-letter units only stripped when separated from a plain number by a space.
_SINGLE_LETTER_UNITS = {"m", "g", "s", "l", "L", "h", "k"}
_UNIT_TAIL = re.compile(r"([A-Za-z]+)(?:\s*/\s*[A-Za-z]+)?\.?\s*(?:\^\s*\{?\s*[23]\s*\}?)?\s*$")
_ALIASES = {"infinity": "\\infty", "inf": "\\infty", "+\\infty": "\\infty", "-infinity": "-\\infty",
            "\\varnothing": "\\emptyset", "\\mathbb{r}": "(-\\infty,\\infty)",
            "\\mathbbr": "(-\\infty,\\infty)", "all real numbers": "(-\\infty,\\infty)", "\\{\\}": "\\emptyset", "\\o": "\\emptyset"}
_PLAIN_NUMBER_HEAD = re.compile(r"^[-+]?[\d.,\s]*\d[\d.]*$")


def unsafe_reason(s: str) -> str | None:
    """Why ``s`` must not reach sympy (None when it is safe to try)."""
    if len(s) > MAX_ANSWER_CHARS:
        return f"answer is {len(s)} characters (limit {MAX_ANSWER_CHARS})"
    depth = worst = 0
    for ch in s:
        if ch in "{([":
            depth += 1
            if depth > worst:
                worst = depth
        elif ch in "})]":
            depth -= 1
    if worst > MAX_NESTING:
        return f"nesting depth {worst} (limit {MAX_NESTING})"
    for m in _BIG_OPERATOR.finditer(s):
        bound = m.group(2).strip("{} ")
        what = "sum" if m.group(1) == "sum" else "product"
        if not bound.isdigit():
            if re.search(r"\d", bound) and not re.fullmatch(r"[\w+\-*/ ]{1,12}", bound):
                return f"{what} up to {bound[:12]} is not evaluated"
            continue
        if len(bound) > 6 or int(bound) > MAX_TERMS:
            return f"{what} of {bound[:12]} terms is not evaluated (limit {MAX_TERMS})"
    if _POWER_TOWER.search(s):
        return "power tower (a^b^c) is not evaluated"
    for m in _EXPONENT.finditer(s):
        if len(m.group(1)) > 6 or int(m.group(1)) > MAX_EXPONENT:
            return f"exponent {m.group(1)[:12]} too large"
    for m in _FACTORIAL.finditer(s):
        if len(m.group(1)) > 6 or int(m.group(1)) > MAX_FACTORIAL:
            return f"factorial of {m.group(1)[:12]} too large"
    if "!" in s and "^" in s and re.search(r"[)}]\s*!", s):
        return "factorial of a power is not evaluated"
    if _COMBINATORIAL.search(s):
        if any(len(d) > 6 for d in _DIGITS.findall(s)) or any(
                len(e) > 1 or int(e) > 5 for e in _NUMERIC_POWER.findall(s)):
            return "binomial/factorial/sum of a huge number is not evaluated"
    if _NESTED_FACTORIAL.search(s):

        return "nested factorial is not evaluated"
    return None


@dataclass
class Canon:
    """A canonicalised answer plus the meaning-bearing marks stripped from it."""

    text: str
    percent: bool = False
    degrees: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def is_text(self) -> bool:
        """A word answer ("Tuesday", "no solution"): compared case/space-insensitively."""
        t = self.text
        return (bool(re.fullmatch(r"[A-Za-z][A-Za-z '\-.]*", t)) and bool(re.search(r"[A-Za-z]{3}", t)))


def _unwrap_outer(s: str) -> str:
    for _ in range(8):
        before = s
        s = s.strip()
        if s.startswith("$$") and s.endswith("$$") and len(s) >= 4:
            s = s[2:-2]
        elif s.startswith("$") and s.endswith("$") and len(s) >= 2 and s.count("$") == 2:
            s = s[1:-1]
        if (s.startswith("\\(") and s.endswith("\\)")) or (s.startswith("\\[") and s.endswith("\\]")):
            s = s[2:-2]
        m = re.match(r"\\(?:boxed|fbox)\s*\{", s)
        if m and s.endswith("}") and _closing_brace(s, m.end() - 1) == len(s) - 1:
            s = s[m.end():-1]
        s = s.strip().strip("*").strip()
        if s.endswith(".") and not re.search(r"\d\.$", s):
            s = s[:-1]
        if s == before:
            break
    return s


def _closing_brace(s: str, open_idx: int) -> int | None:
    depth = 0
    for i in range(open_idx, len(s)):
        c = s[i]
        if c == "{" and (i == 0 or s[i - 1] != "\\"):
            depth += 1
        elif c == "}" and (i == 0 or s[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return i
    return None


def split_top(s: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside any (), [], {} (intervals like [1,2) count as balanced)."""
    parts, depth, start = [], 0, 0
    i, n, k = 0, len(s), len(sep)
    while i < n:
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i + k
            i += k
            continue
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _strip_units(s: str) -> tuple[str, bool]:
    stripped = False
    for _ in range(6):
        m = _UNIT_TAIL.search(s)
        if not m:
            break
        word = m.group(1)
        head = s[:m.start()]
        if not head.strip() or not re.search(r"\d", head) or head.endswith("\\"):
            break
        if word.lower() in _MATH_WORDS or word in ("x", "y", "z", "n", "k", "a", "b", "c", "t"):
            break
        if len(word) == 1:
            if word not in _SINGLE_LETTER_UNITS or not head.endswith(" ") or not _PLAIN_NUMBER_HEAD.match(head.strip()):
                break
        elif not (head.endswith((" ", "}", ")")) or head[-1].isdigit()):
            break
        s = head.rstrip()
        stripped = True
    return s, stripped


def _strip_assignments(s: str) -> str:
    if "=" not in s and "\\in" not in s:
        return s
    parts = split_top(s)
    out, names = [], []
    for p in parts:
        m = _VAR_ASSIGN.match(p)
        if m and "=" not in m.group(2):
            names.append(m.group(1).replace(" ", ""))
            p = m.group(2).strip()
        else:
            m = _VAR_IN.match(p)
            if m and "=" not in m.group(1):
                p = m.group(1).strip()
        out.append(p)
    if len(out) > 1 and len(names) == len(out) and len(set(names)) == len(names):
        # "a=2, b=3": named values, matched by name whatever the order they are listed
        # in -> an ordered tuple sorted by name ("b=3, a=2" is the same answer,
        # "a=3, b=2" is not).
        return "(" + ", ".join(v for _, v in sorted(zip(names, out))) + ")"
    return ", ".join(out)


def canonicalize(raw: str) -> Canon:
    """Strip presentation from an answer; keep what changes its meaning."""
    s = _CTRL.sub("", raw)
    for k, v in _UNICODE.items():
        if k in s:
            s = s.replace(k, v)
    s = _unwrap_outer(s)
    s = _PY_POWER.sub("^", s)  # "2**3" (Python) is 2^3; math-verify misreads it
    c = Canon(text="")
    s = s.replace("\\\\", "\x03")  # protect LaTeX row breaks from the "\ " spacing rule
    s = _SPACING.sub(" ", s).replace("\\ ", " ").replace("~", " ")
    s = _FRAC_VARIANT.sub(r"\\frac", s)
    s = _BINOM_VARIANT.sub(r"\\binom", s)
    for pat, rep in _RELATION_SHORT:
        s = pat.sub(rep, s)
    for _ in range(6):
        new = _TEXT_CMD.sub(r" \1 ", s)
        if new == s:
            break
        s = new
    s = _PLAIN_PI.sub(r"\\pi ", s)
    s = s.replace("\\{", "\x01").replace("\\}", "\x02")  # protect set braces from unit/text logic
    new = _DEGREES.sub("", s)
    if new != s:
        c.degrees, s = True, new
    new = _PERCENT.sub("", s)
    if new != s:
        c.percent, s = True, new
    s = _DOLLAR.sub("", s)
    if s.count("$") >= 1:
        s = s.replace("$", "")
    # "x < -1 or x > 1" is a union of intervals; "and"/commas between inequalities are
    # not (an intersection, or a list), so only an explicit "or" joins them with \cup.
    union_ok = bool(re.search(r"\bor\b", s)) and not re.search(r"\band\b", s)
    s = _CONJUNCTION.sub(", ", s)
    s = _inequalities_to_intervals(s.strip(), union_ok=union_ok)
    s = _strip_assignments(s)
    s = _expand_plus_minus(s)
    s, had_units = _strip_units(s.strip())
    if had_units:
        c.notes.append("units stripped")
    s = _THOUSANDS_LATEX.sub(r"\1", s)
    # "2.06e-9" is scientific notation; math-verify would read it as 2.06*e - 9.
    s = _E_NOTATION.sub(r"\1\\times10^{\2}", s)
    s = _SHORT_ARG.sub(r"\\\1{\2}", s)
    s = _FRAC_SECOND.sub(r"\\frac{\1}{\2}", s)
    s = s.replace("\x01", "\\{").replace("\x02", "\\}").replace("\x03", "\\\\")
    # Thousands separators only at top level ("1,000"), never inside a tuple/set ("(1,000)").
    if "," in s:
        s = _top_level_thousands(s)
    s = re.sub(r"\s+", " ", s).strip()
    m = _MIXED_PLAIN.match(s)
    if m:
        sign, whole, num, den = m.groups()
        if int(den) and int(num) < int(den):
            s = f"{sign}\\frac{{{int(whole) * int(den) + int(num)}}}{{{den}}}"
    # Drop spaces that do not separate two words ("2 \pi" -> "2\pi", "x y" stays).
    s = re.sub(r"(?<![A-Za-z])\s+|\s+(?![A-Za-z])", "", s)
    s = s.strip().rstrip(".").strip()
    s = _ALIASES.get(s.casefold(), s)
    # Words are case-insensitive ("Alice, Bob" = "alice, bob"); single-letter variables
    # and LaTeX commands keep their case.
    s = _WORD.sub(lambda m: m.group(0).casefold(), s)
    c.text = s
    if c.is_text:
        c.text = re.sub(r"\s+", " ", s.casefold()).strip(" .")
        if c.text.startswith("the "):
            c.text = c.text[4:]
        n = number_from_words(c.text)
        if n is not None:  # "five" = 5, "twenty-four" = 24 (GSM8K answers in words)
            c.text = str(n)
            c.notes.append("number words")
    return c


_UNITS_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
_TENS_WORDS = {w: 10 * i for i, w in enumerate(
    "twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_SCALE_WORDS = {"hundred": 100, "thousand": 1000, "million": 10**6}


def number_from_words(text: str) -> int | None:
    """The whole number a short English phrase names ("twenty-four", "one hundred and
    five"), or None. Only a phrase made entirely of number words counts."""
    words = [w for w in re.split(r"[\s\-]+", text.strip().casefold()) if w and w != "and"]
    if not words or len(words) > 8:
        return None
    negative = words[0] in ("minus", "negative")
    if negative:
        words = words[1:]
    total = current = 0
    seen = False
    for w in words:
        if w in _UNITS_WORDS:
            current += _UNITS_WORDS[w]
        elif w in _TENS_WORDS:
            current += _TENS_WORDS[w]
        elif w == "hundred":
            current = max(current, 1) * 100
        elif w in _SCALE_WORDS:
            total += max(current, 1) * _SCALE_WORDS[w]
            current = 0
        else:
            return None
        seen = True
    if not seen:
        return None
    value = total + current
    return -value if negative else value


_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_PLAIN_PI = re.compile(r"(?<![\\A-Za-z])pi(?![A-Za-z])")
_VAR = r"(?:[A-Za-z]|\\[A-Za-z]+)"
_LESS = {"<": False, "\\lt": False, "\\leq": True, "<=": True, "\\leqslant": True}
_MORE = {">": False, "\\gt": False, "\\geq": True, ">=": True, "\\geqslant": True}
_OPS = "|".join(re.escape(o) for o in sorted({**_LESS, **_MORE}, key=len, reverse=True))
_RELATION = re.compile(rf"{_OPS}|\\neq")
_INEQ_ONE = re.compile(rf"^\s*({_VAR})\s*({_OPS})\s*([^<>=]+?)\s*$")
_INEQ_ONE_FLIPPED = re.compile(rf"^\s*([^<>=]+?)\s*({_OPS})\s*({_VAR})\s*$")
_INEQ_TWO = re.compile(rf"^\s*([^<>=]+?)\s*({_OPS})\s*({_VAR})\s*({_OPS})\s*([^<>=]+?)\s*$")


def _inequality_to_interval(s: str) -> str:
    """"x \\geq 3" -> "[3,\\infty)", "1 < x \\leq 2" -> "(1,2]" (one variable, no other relations)."""
    if not any(op in s for op in ("<", ">", "\\le", "\\ge", "\\lt", "\\gt")):
        return s
    if len(_RELATION.findall(s)) > 2 or len(split_top(s)) > 1:
        return s  # "x \\le -2, x \\ge 2": several inequalities, not one interval
    m = _INEQ_TWO.match(s)
    if m:
        lo, op1, _, op2, hi = m.groups()
        if op1 in _LESS and op2 in _LESS:
            return f"{'[' if _LESS[op1] else '('}{lo},{hi}{']' if _LESS[op2] else ')'}"
        if op1 in _MORE and op2 in _MORE:
            return f"{'[' if _MORE[op2] else '('}{hi},{lo}{']' if _MORE[op1] else ')'}"
        return s
    m = _INEQ_ONE.match(s)
    if m:
        _, op, bound = m.groups()
        if op in _MORE:
            return f"{'[' if _MORE[op] else '('}{bound},\\infty)"
        return f"(-\\infty,{bound}{']' if _LESS[op] else ')'}"
    m = _INEQ_ONE_FLIPPED.match(s)
    if m and re.fullmatch(_VAR, m.group(3)) and not re.fullmatch(_VAR, m.group(1).strip()):
        bound, op, _ = m.groups()
        if op in _LESS:  # 3 < x
            return f"{'[' if _LESS[op] else '('}{bound},\\infty)"
        return f"(-\\infty,{bound}{']' if _MORE[op] else ')'}"
    return s


_NOT_EQUAL = re.compile(rf"^\s*({_VAR})\s*(?:\\neq|!=)\s*([^<>=]+?)\s*$")


def _inequalities_to_intervals(s: str, *, union_ok: bool) -> str:
    """One inequality -> an interval; ``x \\neq 2`` -> two open rays; with ``union_ok``
    a list of inequalities ("x<-1, x>1" after "or" became a comma) -> their union."""
    one = _inequality_to_interval(s)
    if one != s:
        return one
    m = _NOT_EQUAL.match(s)
    if m:
        b = m.group(2)
        return f"(-\\infty,{b})\\cup({b},\\infty)"
    if union_ok and "," in s:
        parts = split_top(s)
        conv = [_inequality_to_interval(p) for p in parts]
        if len(parts) > 1 and all(c != p for c, p in zip(conv, parts)):
            return "\\cup".join(conv)
    return s


def _expand_plus_minus(s: str) -> str:
    """"1 \\pm \\sqrt{2}" -> "1+\\sqrt{2}, 1-\\sqrt{2}" (a single top-level \\pm)."""
    if "\\pm" not in s and "\\mp" not in s:
        return s
    if len(split_top(s)) != 1:
        return s
    for op in ("\\pm", "\\mp"):
        parts = split_top(s, op)
        if len(parts) == 2 and not re.match(r"[A-Za-z]", parts[1]):
            left, right = parts
            return f"{left}+{right}, {left}-{right}" if left else f"{right}, -{right}"
    return s


def _top_level_thousands(s: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(s):
        ch = s[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if depth == 0 and ch.isdigit():
            m = _THOUSANDS.match(s, i)
            if m and (i == 0 or not (s[i - 1].isdigit() or s[i - 1] in ".,")):
                out.append(m.group(1).replace(",", "") + (m.group(2) or ""))
                i = m.end()
                continue
        out.append(ch)
        i += 1
    return "".join(out)


# --------------------------------------------------------------------- values

_INT = re.compile(r"\d+")
_DEC = re.compile(r"\d*\.\d+|\d+\.")
_SCI = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:[eE]|\\times10\^|\\cdot10\^|\*10\^|\*\*)\{?([-+]?\d{1,3})\}?")
_FRAC = re.compile(r"\\frac\{([^{}]+)\}\{([^{}]+)\}")
_REPEATING = re.compile(r"(\d*)\.(\d*)\\overline\{(\d{1,50})\}")
_MIXED = re.compile(r"(\d+)\\frac\{(\d+)\}\{(\d+)\}")


def parse_number(s: str) -> Fraction | None:
    """Exact value of a plain numeric answer, or None (then it is symbolic or not a number)."""
    s = s.replace(" ", "")
    if not s or len(s) > 200:
        return None
    sign = 1
    while s and s[0] in "+-":
        if s[0] == "-":
            sign = -sign
        s = s[1:]
    if s.startswith("(") and s.endswith(")") and split_top(s[1:-1]) == [s[1:-1]]:
        inner = parse_number(s[1:-1])
        return None if inner is None else type(inner)(sign * inner)
    try:
        if _INT.fullmatch(s):
            if len(s) > 4000:
                return None
            return sign * Fraction(int(s))
        if _DEC.fullmatch(s):
            return Approx(sign * Fraction(Decimal(s if not s.endswith(".") else s[:-1])))
        m = _SCI.fullmatch(s)
        if m:
            if s[len(m.group(1))] == "*" and s[len(m.group(1)):].startswith("**"):
                return None  # a**b is a power, not scientific notation
            return Approx(sign * Fraction(Decimal(m.group(1))) * Fraction(10) ** int(m.group(2)))
        m = _REPEATING.fullmatch(s)
        if m:  # 0.1\overline{6} = 1/6
            whole, fixed, rep = m.group(1) or "0", m.group(2) or "", m.group(3)
            base = Fraction(int(whole + fixed), 10 ** len(fixed))
            return sign * (base + Fraction(int(rep), (10 ** len(rep) - 1) * 10 ** len(fixed)))
        m = _MIXED.fullmatch(s)
        if m:
            whole, num, den = (int(g) for g in m.groups())
            if den == 0 or num >= den:
                return None
            return sign * (whole + Fraction(num, den))
        m = _FRAC.fullmatch(s)
        if m:
            num, den = parse_number(m.group(1)), parse_number(m.group(2))
            if num is None or den is None or den == 0:
                return None
            kind = Approx if isinstance(num, Approx) or isinstance(den, Approx) else Fraction
            return kind(sign * num / den)
        if s.count("/") == 1:
            a, b = s.split("/")
            num, den = parse_number(a), parse_number(b)
            if num is None or den is None or den == 0 or a.startswith(("+", "-")) and b.startswith(("+", "-")):
                return None
            kind = Approx if isinstance(num, Approx) or isinstance(den, Approx) else Fraction
            return kind(sign * num / den)
    except (InvalidOperation, ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


@dataclass
class Seq:
    """A compound answer. kind: set | list (bare, unordered) | bracket (tuple/interval) | union."""

    kind: str
    items: list
    left: str = ""
    right: str = ""


def parse_value(s: str, depth: int = 0):
    """A Fraction, a Seq, or the string itself when only the symbolic layer can read it."""
    s = s.strip()
    if depth > 8 or not s:
        return s
    if "\\cup" in s:
        parts = split_top(s, "\\cup")
        if len(parts) > 1:
            return Seq("union", [parse_value(p, depth + 1) for p in parts])
    if s.startswith("\\{") and s.endswith("\\}") and _outer_matches(s, 2, len(s) - 2):
        inner = s[2:-2].strip()
        return Seq("set", [parse_value(p, depth + 1) for p in split_top(inner)] if inner else [])
    if s[0] in "([" and s[-1] in ")]" and _outer_matches(s, 1, len(s) - 1):
        items = split_top(s[1:-1])
        if len(items) >= 2:
            return Seq("bracket", [parse_value(p, depth + 1) for p in items], s[0], s[-1])
        if s[0] == "(" and s[-1] == ")":
            return parse_value(s[1:-1], depth + 1)
    items = split_top(s)
    if len(items) > 1:
        return Seq("list", [parse_value(p, depth + 1) for p in items])
    num = parse_number(s)
    return num if num is not None else s


def _outer_matches(s: str, inner_start: int, inner_end: int) -> bool:
    """True when the outer brackets of ``s`` enclose everything (not "(1)+(2)")."""
    depth = 0
    for ch in s[inner_start:inner_end]:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


class Approx(Fraction):
    """A number written as a decimal ("0.3333333"): compared with a relative tolerance.
    Integers and fractions are exact: 895027838 must not equal 895028238."""


def numbers_close(a: Fraction, b: Fraction, *, approx: bool | None = None) -> bool:
    if a == b:
        return True
    if approx is None:
        approx = isinstance(a, Approx) or isinstance(b, Approx)
    if not approx:
        return False
    if a.denominator == 1 and b.denominator == 1:
        return False  # "100000001.0" is the integer 100000001, never 100000000
    diff = abs(a - b)
    return float(diff) <= max(REL_TOL * max(abs(float(a)), abs(float(b))), ABS_TOL)


def _is_infinity(v) -> int:
    if isinstance(v, str):
        t = v.replace(" ", "")
        if t in ("\\infty", "+\\infty", "oo", "inf", "infty"):
            return 1
        if t in ("-\\infty", "-oo", "-inf", "-infty"):
            return -1
    return 0


def compare_values(a, b) -> bool | None:
    """True/False when decidable here, None when the symbolic layer must decide."""
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return numbers_close(a, b)
    if isinstance(a, Seq) != isinstance(b, Seq):
        seq, other = (a, b) if isinstance(a, Seq) else (b, a)
        if seq.kind == "set" and len(seq.items) == 1:
            # "\{-3\}" vs "-3": the solution set of one element is that element.
            return compare_values(seq.items[0], other)
        # A compound answer never equals a scalar one ("1,2" vs "12").
        return False
    if isinstance(a, Seq):
        return _compare_seqs(a, b)
    ia, ib = _is_infinity(a), _is_infinity(b)
    if ia or ib:
        if ia and ib:
            return ia == ib
        if isinstance(a, Fraction) or isinstance(b, Fraction):
            return False
        return None
    if isinstance(a, str) and isinstance(b, str) and a == b:
        return True
    return None


def _compare_ordered(xs: list, ys: list) -> bool | None:
    if len(xs) != len(ys):
        return False
    unknown = False
    for x, y in zip(xs, ys):
        r = compare_values(x, y)
        if r is False:
            return False
        if r is None:
            unknown = True
    return None if unknown else True


def _compare_unordered(xs: list, ys: list, *, multiset: bool) -> bool | None:
    if multiset and len(xs) != len(ys):
        return False
    unknown = False

    def covered(src, dst) -> bool:
        nonlocal unknown
        for x in src:
            results = [compare_values(x, y) for y in dst]
            if True in results:
                continue
            if None in results:
                unknown = True
                continue
            return False
        return True

    if not covered(xs, ys) or not covered(ys, xs):
        return False
    return None if unknown else True


def _compare_seqs(a: Seq, b: Seq) -> bool | None:
    kinds = {a.kind, b.kind}
    if kinds == {"bracket"}:
        if (a.left, a.right) != (b.left, b.right):
            return False  # [1,2) vs (1,2): open/closed ends differ; (1,2) vs [1,2] too
        return _compare_ordered(a.items, b.items)
    if kinds == {"bracket", "list"}:
        br = a if a.kind == "bracket" else b
        if (br.left, br.right) != ("(", ")"):
            return False  # a bare list is not an interval with a closed end
        return _compare_ordered(a.items, b.items)  # "x=1, y=2" vs "(1, 2)"
    if kinds <= {"set", "list"}:
        return _compare_unordered(a.items, b.items, multiset=kinds == {"list"})
    if kinds == {"union"}:
        return _compare_unordered(a.items, b.items, multiset=False)
    return False
