"""Typed requests and results of one sandboxed execution.

What crosses the boundary is plain data: the host sends a JSON request (code, the name of a
function to call, its arguments as Python literal text), the sandbox answers with JSON
strings (stdout, the value's ``repr``). Nothing is ever unpickled from the sandbox;
``Result.value()`` turns the repr back into a Python value with ``ast.literal_eval`` only.
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from typing import Any

from megatron_sz.errors import UserError

#: Every status a Result can have.
STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "blocked", "crashed")

MIB = 1 << 20


@dataclass(frozen=True)
class Task:
    """One execution request. Exactly what ``run`` accepts as keyword arguments.

    * ``code``: the program; it runs as ``__main__`` in a fresh process.
    * ``call`` / ``args``: after the program ran, call the function ``call`` with ``args``,
      which is either the text of comma-separated Python literals (Absolute Zero's input
      format, e.g. ``"3, [1, 2]"``) or a tuple of literal-representable values; the
      result's ``value_repr`` is ``repr`` of what it returned.
    * ``expr``: instead of ``call``, evaluate this expression in the program's namespace.
    * ``cell``: Jupyter-like: if the program ends in an expression, its value is returned
      (Agent0's code-interpreter tool).
    * ``timeout`` (wall seconds), ``memory`` (bytes of address space), ``output_limit``
      (characters of stdout and of stderr), ``value_limit`` (characters of the repr).
    """

    code: str
    call: str | None = None
    args: str | tuple = ""
    expr: str | None = None
    cell: bool = False
    timeout: float = 5.0
    memory: int = 1024 * MIB
    output_limit: int = 64 * 1024
    value_limit: int = 64 * 1024
    file_size: int = 16 * MIB
    open_files: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.code, str):
            raise UserError(f"code must be a str, got {type(self.code).__name__}",
                            where="sandbox.run(code=...)", fix="pass the program's source text")
        if self.call is not None and self.expr is not None:
            raise UserError("pass either call= or expr=, not both", where="sandbox.run",
                            fix="use call='f', args='1, 2' or expr='f(1, 2)'")
        if self.call is not None and not self.call.isidentifier():
            raise UserError(f"call={self.call!r} is not a function name", where="sandbox.run",
                            fix="pass the bare name of a function the program defines")
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout)
                and self.timeout > 0):
            raise UserError(f"timeout must be a positive number of seconds, got "
                            f"{self.timeout!r}", where="sandbox.run(timeout=...)",
                            fix="pass e.g. timeout=5")
        if not isinstance(self.memory, int) or self.memory < 64 * MIB:
            raise UserError(f"memory must be an int >= 64 MiB in bytes, got {self.memory!r}",
                            where="sandbox.run(memory=...)",
                            fix="pass e.g. memory=1024 * 2**20 (a Python interpreter needs "
                                "tens of MiB of address space to start)")
        for name in ("output_limit", "value_limit", "file_size", "open_files"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise UserError(f"{name} must be a positive int, got {v!r}",
                                where=f"sandbox.run({name}=...)", fix="pass a positive int")

    def args_text(self) -> str:
        if isinstance(self.args, str):
            return self.args
        parts = []
        for a in self.args:
            text = repr(a)
            try:
                ok = ast.literal_eval(text) == a
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                ok = False
            if not ok:
                raise UserError(f"argument {text[:60]} is not a Python literal",
                                where="sandbox.run(args=...)",
                                fix="pass literals (numbers, strings, tuples, lists, dicts, "
                                    "sets, None, bools) or the literal text itself")
            parts.append(text)
        return ", ".join(parts)

    def request(self) -> dict:
        """The JSON request the sandbox child reads."""
        return {
            "code": self.code, "call": self.call, "args": self.args_text(),
            "expr": self.expr, "cell": bool(self.cell),
            "memory": self.memory, "cpu_limit": math.ceil(self.timeout) + 1,
            "output_limit": self.output_limit, "value_limit": self.value_limit,
            "file_size": self.file_size, "open_files": self.open_files,
        }


@dataclass(frozen=True)
class Result:
    """What one execution did.

    ``status`` is one of ``STATUSES``:

    * ``ok``: ran to the end; ``value_repr`` holds the repr of the requested value (if any);
    * ``error``: raised ``error_type: error`` (``traceback`` has the program's frames);
    * ``timeout``: ran past its wall-clock or CPU limit and was killed;
    * ``memory``: ran out of its address-space limit (``MemoryError``);
    * ``output_limit``: printed more than ``output_limit`` characters, or its value's repr
      was longer than ``value_limit`` (the first part is kept);
    * ``blocked``: stopped by the sandbox (a denied system call, a read-only file system,
      a permission error) and did not handle it;
    * ``crashed``: the process died without a result (a signal, ``os._exit``).
    """

    status: str
    stdout: str = ""
    stderr: str = ""
    value_repr: str | None = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    tier: str = ""
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def value(self) -> Any:
        """The returned value rebuilt from its repr (literals only; never unpickled)."""
        if self.value_repr is None:
            raise ValueError(f"no value (status {self.status})")
        return ast.literal_eval(self.value_repr)

    def outcome(self) -> tuple:
        """What two runs of a deterministic program must agree on."""
        return (self.status, self.value_repr, self.stdout, self.error_type, self.error)

    def describe(self) -> str:
        """One line for logs and CLI output."""
        what = {"ok": f"-> {self.value_repr!s:.80}" if self.value_repr is not None else ""}
        tail = what.get(self.status) or (f"{self.error_type}: {self.error}"
                                         if self.error_type else (self.error or ""))
        return f"{self.status} ({self.wall_s * 1e3:.1f} ms) {tail}".strip()
