"""The only place where code we did not write runs (model-written programs, seed snippets,
tool calls, code-benchmark tests). See ``README.md`` here for the threat model and tiers.

Pure-Python surface::

    from megatron_sz import sandbox

    r = sandbox.run("def f(x):\\n    return x[::-1]", call="f", args="'abc'")
    r.status, r.value_repr, r.value()          # 'ok', "'cba'", 'cba'
    sandbox.run("print(2 + 2)").stdout         # '4\\n'
    sandbox.run_batch([{"code": c, "call": "f", "args": a} for c, a in items])
    sandbox.check_deterministic(code, call="f", args="3")   # runs twice, compares
    sandbox.check_policy(code, function="f")   # parse / function / banned modules / RNG

Callers never see bubblewrap flags. ``run``/``run_batch`` use a shared pool per
``(preload, site_packages)``, started on first use and closed at exit; hold a
``Sandbox(...)`` yourself to control its size and lifetime.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from megatron_sz.sandbox.policy import AZR_BANNED, PolicyReport, check_policy
from megatron_sz.sandbox.pool import TIER_ENV, TIERS, Config, Sandbox, TierReport
from megatron_sz.sandbox.result import STATUSES, Result, Task

__all__ = ["run", "run_batch", "check_deterministic", "check_policy", "Determinism",
           "Sandbox", "Config", "Task", "Result", "PolicyReport", "STATUSES", "TIERS",
           "TIER_ENV", "AZR_BANNED", "TierReport", "shared", "shutdown"]

_POOLS: dict[tuple, Sandbox] = {}
_POOLS_LOCK = threading.Lock()


def shared(preload: tuple[str, ...] = (), site_packages: bool = False,
           tier: str = "auto", warmup: str = "") -> Sandbox:
    """The process-wide pool for this configuration (started on first use)."""
    key = (tuple(preload), bool(site_packages), tier, warmup)
    with _POOLS_LOCK:
        sb = _POOLS.get(key)
        if sb is None or sb._closed:
            sb = Sandbox(Config(preload=tuple(preload), site_packages=site_packages, tier=tier,
                                warmup=warmup))
            _POOLS[key] = sb
        return sb


def shutdown() -> None:
    """Close every shared pool (they are also closed at interpreter exit)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for sb in pools:
        sb.close()


def run(code: str, *, preload: tuple[str, ...] = (), site_packages: bool = False,
        **task) -> Result:
    """Run ``code`` in a fresh sandboxed process; ``task`` keywords are ``Task``'s fields
    (``call``, ``args``, ``expr``, ``cell``, ``timeout``, ``memory``, ``output_limit``...)."""
    return shared(preload, site_packages).submit(Task(code, **task))


def run_batch(tasks: list, *, preload: tuple[str, ...] = (), site_packages: bool = False,
              **defaults) -> list[Result]:
    """Run many programs over the shared pool, in order (see ``Sandbox.run_batch``)."""
    return shared(preload, site_packages).run_batch(tasks, **defaults)


@dataclass(frozen=True)
class Determinism:
    """``deterministic`` is True when every run agreed on status, value, stdout and error."""

    deterministic: bool
    results: tuple[Result, ...]
    reason: str = ""


def check_deterministic(code: str, *, runs: int = 2, sandbox: Sandbox | None = None,
                        **task) -> Determinism:
    """Run the same program ``runs`` times (as separate executions) and compare outcomes.

    Absolute Zero keeps a proposed program only if it is deterministic. A timeout, crash or
    output overflow in any run counts as not deterministic (nothing to compare).
    """
    sb = sandbox or shared()
    t = Task(code, **task)
    results = tuple(sb.run_batch([t] * max(2, runs)))
    bad = [r for r in results if r.status in ("timeout", "crashed", "output_limit", "memory")]
    if bad:
        return Determinism(False, results, f"a run ended with status {bad[0].status}")
    first = results[0].outcome()
    for r in results[1:]:
        if r.outcome() != first:
            return Determinism(False, results, f"runs disagree: {results[0].describe()} vs "
                                               f"{r.describe()}")
    return Determinism(True, results)
