"""Symbolic equivalence: math-verify first, then a plain sympy fallback.

Runs inside the verifier worker subprocess (see ``sandbox.py``), never in the caller:
sympy can spend unbounded time in C code (big-integer powers, ``simplify``), where
neither signals nor threads can stop it, so the caller kills the whole process instead.
Inputs arrive already canonicalised and guarded by ``normalize.py``.

Returns ``(equivalent, how)``: ``equivalent`` is None when neither library could read
one of the answers (then a judge has to decide).
"""
from __future__ import annotations

import random
import re

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
            for g in golds:
                for p in preds:
                    if g and p and _mv_verify(g, p, t):
                        return True, "math-verify"
            if _imaginary_equal(golds[0][0], preds[0][0]):
                return True, "sympy (i as the imaginary unit)"
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
