"""Code policy: is a program a *valid task*? A filter on top of the sandbox, not a boundary.

Absolute Zero rejects proposed programs that do not parse, lack the expected function,
import modules from its banned list, or call something nondeterministic. That is a data
quality rule: the sandbox must (and does) contain code that passes it just as well as code
that does not, so nothing here needs to be complete against an adversary.

The checks read the AST, so ``"random"`` inside a string is fine while ``import random``,
``__import__("random")`` and ``importlib.import_module("random")`` are not.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field

#: Absolute Zero's banned modules / attribute paths (its ``banned_words`` config:
#: anything that makes a program's output depend on time, randomness, processes, or the
#: machine), plus the process/network modules no task needs.
AZR_BANNED: tuple[str, ...] = (
    "logging", "random", "multiprocessing", "pebble", "subprocess", "threading",
    "datetime", "time", "hashlib", "hmac", "bcrypt", "calendar", "os.sys", "os.path",
    "sys.exit", "os.environ", "socket", "secrets", "uuid", "asyncio", "concurrent",
    "ctypes", "signal", "shutil", "tempfile",
)

#: Calls whose result differs between runs (``module.attr`` or builtin name).
NONDETERMINISTIC_CALLS: tuple[str, ...] = (
    "id", "random.random", "random.randint", "random.choice", "random.shuffle",
    "random.sample", "random.uniform", "random.seed", "time.time", "time.time_ns",
    "time.perf_counter", "time.monotonic", "time.process_time", "datetime.now",
    "datetime.today", "datetime.utcnow", "date.today", "os.urandom", "os.getpid",
    "uuid.uuid1", "uuid.uuid4", "secrets.token_bytes", "secrets.token_hex",
    "secrets.randbelow",
)


@dataclass(frozen=True)
class PolicyReport:
    """``ok`` when ``reasons`` is empty; each reason is one sentence for a validity log."""

    reasons: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.reasons


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _banned_hit(name: str, banned: tuple[str, ...]) -> str | None:
    for b in banned:
        if name == b or name.startswith(b + "."):
            return b
    return None


def check_policy(code: str, *, function: str | None = None,
                 banned: tuple[str, ...] = AZR_BANNED,
                 allowed_imports: tuple[str, ...] | None = None,
                 nondeterministic: tuple[str, ...] = NONDETERMINISTIC_CALLS) -> PolicyReport:
    """Check ``code`` against the task policy; every reason found is reported at once.

    ``function``: the program must define this function at top level. ``allowed_imports``:
    if given, every import's top-level module must be one of these (seed snippets use
    ``("sympy", "math", "fractions", "itertools")``). Pass ``nondeterministic=()`` to skip
    the nondeterministic-call check.
    """
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        return PolicyReport((f"does not parse: {exc.msg} (line {exc.lineno})",))
    except (ValueError, MemoryError, RecursionError) as exc:
        return PolicyReport((f"does not parse: {type(exc).__name__}",))
    reasons: list[str] = []

    def add(msg: str) -> None:
        if msg not in reasons:
            reasons.append(msg)

    if function is not None and not any(
            isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == function
            for n in tree.body):
        add(f"does not define the function {function!r} at top level")

    def imported(name: str, line: int) -> None:
        hit = _banned_hit(name, banned)
        if hit:
            add(f"imports banned module {hit!r} (line {line})")
        if allowed_imports is not None and name.split(".")[0] not in allowed_imports:
            add(f"import of {name!r} is not allowed (line {line}; allowed: "
                f"{', '.join(allowed_imports)})")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                imported(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                add(f"relative import (line {node.lineno})")
            elif node.module:
                imported(node.module, node.lineno)
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if _banned_hit(full, banned) and not _banned_hit(node.module, banned):
                        add(f"uses banned name {full!r} (line {node.lineno})")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("__import__", "importlib.import_module", "import_module"):
                if node.args and isinstance(node.args[0], ast.Constant) \
                        and isinstance(node.args[0].value, str):
                    imported(node.args[0].value, node.lineno)
                else:
                    add(f"dynamic import (line {node.lineno})")
            elif name is not None and nondeterministic:
                for nd in nondeterministic:
                    if name == nd or name.endswith("." + nd):
                        add(f"calls nondeterministic {nd}() (line {node.lineno})")
        elif isinstance(node, ast.Attribute):
            name = _dotted(node)
            if name and "." in name:
                hit = _banned_hit(name, tuple(b for b in banned if "." in b))
                if hit:
                    add(f"uses banned name {hit!r} (line {node.lineno})")
    return PolicyReport(tuple(reasons))
