"""Symbolic equivalence: math-verify first, then a plain sympy fallback.

Runs inside the verifier worker subprocess (see ``sandbox.py``), never in the caller:
sympy can spend unbounded time in C code (big-integer powers, ``simplify``), where
neither signals nor threads can stop it, so the caller kills the whole process instead.
Inputs arrive already canonicalised and guarded by ``normalize.py``.

Returns ``(equivalent, how)``: ``equivalent`` is None when neither library could read
one of the answers, or when math-verify ran out of time (then a judge has to decide).

Two corrections to math-verify: numbers where one side is a written decimal are
compared here with a scale-aware tolerance (math-verify rounds to 6 decimal places,
whatever the magnitude), and a free ``i`` is retried as the imaginary unit.
"""
from __future__ import annotations

import math
import random
import re
import time

from megatron_sz.verify.normalize import ABS_TOL, REL_TOL

__all__ = ["symbolic_equal"]


def _mv_parse(s: str, timeout: int):
    from math_verify import parse
    return parse(f"${s}$", parsing_timeout=timeout)


def _mv_verify(gold, pred, timeout: int) -> bool:
    from math_verify import verify
    return bool(verify(gold, pred, timeout_seconds=timeout))


_FRAC = re.compile(r"\\frac\{([^{}]*)\}\{([^{}]*)\}")
_SQRT_N = re.compile(r"\\sqrt\[([^\[\]]*)\]\{([^{}]*)\}")
_SQRT = re.compile(r"\\sqrt\{([^{}]*)\}")


def _to_sympy_text(s: str) -> str:
    """LaTeX-ish to sympy's plain syntax, for what math-verify could not parse."""
    for _ in range(20):
        new = _FRAC.sub(r"((\1)/(\2))", s)
        new = _SQRT_N.sub(r"((\2)**(1/(\1)))", new)
        new = _SQRT.sub(r"sqrt(\1)", new)
        if new == s:
            break
        s = new
    rep = {"\\pi": " pi ", "\\cdot": "*", "\\times": "*", "\\infty": " oo ", "\\ln": " log ",
           "\\log": " log ", "\\sin": " sin ", "\\cos": " cos ", "\\tan": " tan ", "^": "**",
           "{": "(", "}": ")", "\\": " "}
    for k, v in rep.items():
        s = s.replace(k, v)
    return s


def _sympy_parse(s: str):
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application,
                                            parse_expr, standard_transformations)
    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    try:
        return parse_expr(_to_sympy_text(s), transformations=transformations, evaluate=True)
    except Exception:  # noqa: BLE001 -- any parse failure means "sympy cannot read it"
        return None


def _sympy_equal(ea, eb) -> bool:
    import sympy
    diff = ea - eb
    free = sorted(diff.free_symbols, key=str)
    rng = random.Random(0)
    # Numeric probes first: cheap, and a clear nonzero value settles "not equal".
    for _ in range(3):
        subs = {sym: sympy.Float(rng.uniform(0.5, 2.5)) for sym in free}
        try:
            val = complex(diff.evalf(30, subs=subs))
        except (TypeError, ValueError, ZeroDivisionError):
            break
        scale = max(1.0, abs(complex(ea.evalf(30, subs=subs))))
        if abs(val) > 1e-6 * scale:
            return False
    else:
        if not free:
            return True
    return sympy.simplify(diff) == 0


ROUNDING_TOL = 5e-7


def _numeric_close(gold, pred) -> bool | None:
    """Numbers where one side is a written decimal: the relative tolerance of the rule
    layer (``REL_TOL``), not math-verify's rounding to 6 decimal places (which calls
    ``\\frac{\\sqrt2}{10^6}`` equal to ``0.000001`` and ``1000\\sqrt2`` unequal to
    ``1414.2136``). None when not two numbers with a decimal among them."""
    import sympy
    a, b = gold[0], pred[0]
    if not (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr)):
        return None
    if a.free_symbols or b.free_symbols or not (a.atoms(sympy.Float) or b.atoms(sympy.Float)):
        return None
    try:
        va, vb = complex(a.evalf(30)), complex(b.evalf(30))
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        return None
    if not all(math.isfinite(v) for v in (va.real, va.imag, vb.real, vb.imag)):
        return None
    big = max(abs(va), abs(vb))
    diff = abs(va - vb)
    # Within REL_TOL, and a correct 6-significant-digit rounding at least (3.14159 is not
    # pi: 3.141593 is). Both bounds scale with the number, unlike a fixed 6 decimals.
    return diff <= max(REL_TOL * big, ABS_TOL) and diff <= max(ROUNDING_TOL * max(1.0, big), ABS_TOL)


def _imaginary_equal(ea, eb) -> bool:
    """math-verify reads ``i`` as a plain symbol, so ``e^{i\\pi}`` is not ``-1`` and ``i^2``
    is not ``-1`` there. When an answer uses a free ``i``, compare once more with ``i``
    as the imaginary unit (answers with ``i`` are complex numbers in MATH-style sets)."""
    import sympy
    if not (isinstance(ea, sympy.Expr) and isinstance(eb, sympy.Expr)):
        return False
    # math-verify's symbols may carry assumptions, so match them by name.
    subs = {sym: sympy.I for sym in ea.free_symbols | eb.free_symbols if str(sym) == "i"}
    if not subs:
        return False
    try:
        return _sympy_equal(ea.subs(subs), eb.subs(subs))
    except Exception:  # noqa: BLE001 -- an odd expression: no extra equivalence
        return False


def _variants(s: str, *, percent: bool, other_percent: bool, degrees: bool, other_has_pi: bool) -> list[str]:
    out = [s]
    if percent and not other_percent:
        out.append(f"\\frac{{{s}}}{{100}}")
    if degrees and other_has_pi:
        out.append(f"\\frac{{({s})\\pi}}{{180}}")
    return out


def symbolic_equal(a: str, b: str, *, a_percent: bool = False, b_percent: bool = False,
                   a_degrees: bool = False, b_degrees: bool = False,
                   timeout_s: float = 5.0) -> tuple[bool | None, str]:
    """Is answer ``a`` equivalent to reference ``b``? (None: cannot be parsed)."""
    t = max(1, int(timeout_s * 0.4))
    a_vars = _variants(a, percent=a_percent, other_percent=b_percent, degrees=a_degrees,
                       other_has_pi="\\pi" in b)
    b_vars = _variants(b, percent=b_percent, other_percent=a_percent, degrees=b_degrees,
                       other_has_pi="\\pi" in a)
    parsed_any = False
    try:
        golds = [g for g in (_mv_parse(x, t) for x in b_vars)]
        preds = [p for p in (_mv_parse(x, t) for x in a_vars)]
        if golds[0] and preds[0]:
            parsed_any = True
            timed_out = False
            numeric_false = set()
            for gi, g in enumerate(golds):
                for pi, p in enumerate(preds):
                    close = _numeric_close(g, p) if g and p else None
                    if close:
                        return True, f"numbers within {REL_TOL:g} relative"
                    if close is False:
                        numeric_false.add((gi, pi))
            if len(numeric_false) == len(golds) * len(preds):
                return False, f"numbers differ by more than {REL_TOL:g} relative"
            for gi, g in enumerate(golds):
                for pi, p in enumerate(preds):
                    if g and p and (gi, pi) not in numeric_false:
                        started = time.monotonic()
                        if _mv_verify(g, p, t):
                            return True, "math-verify"
                        # math-verify answers False when its own timeout fires; a
                        # comparison that ran out of time has not shown "not equal".
                        timed_out = timed_out or time.monotonic() - started >= 0.95 * t
            if _imaginary_equal(golds[0][0], preds[0][0]):
                return True, "sympy (i as the imaginary unit)"
            if timed_out:
                return None, f"timeout: math-verify ran out of its {t}s"
            return False, "math-verify"
    except Exception:  # noqa: BLE001 -- math-verify bug on odd input: fall back to sympy
        pass
    ea, eb = _sympy_parse(a), _sympy_parse(b)
    if ea is None or eb is None:
        return (False, "math-verify") if parsed_any else (None, "unparseable")
    for x in a_vars:
        for y in b_vars:
            ex, ey = _sympy_parse(x), _sympy_parse(y)
            if ex is not None and ey is not None and _sympy_equal(ex, ey):
                return True, "sympy"
    return False, "sympy"
