"""The systems megatron-sz runs, one module each, and their registry.

A system is a round function (``round(t, run, recipe)``: the algorithm as stages handed
to a runner, see ``megatron_sz/round.py``) plus a name, a one-line summary, the roles it
trains or calls, and its embedded CPU default recipe. A recipe names its system with
``system: <name>`` (default ``socratic-zero``). The executors, ``status``, ``stage`` and
``eval`` work from the ``RoundPlan`` alone, so a new system needs no code outside its
module and this table (``docs/ARCHITECTURE.md``: "How to add a system").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from megatron_sz.errors import UserError


@dataclass(frozen=True)
class SystemSpec:
    name: str
    summary: str
    round: Callable[[int, Callable[[Any], None], Any], None]
    default_recipe: str
    roles: tuple[str, ...]


def _socratic_zero() -> SystemSpec:
    from megatron_sz.systems import socratic_zero as m

    return SystemSpec(m.NAME, m.SUMMARY, m.co_evolution_round, m.DEFAULT_RECIPE, m.ROLES)


def _agent0() -> SystemSpec:
    from megatron_sz.systems import agent0 as m

    return SystemSpec(m.NAME, m.SUMMARY, m.agent0_round, m.DEFAULT_RECIPE, m.ROLES)


def _absolute_zero() -> SystemSpec:
    from megatron_sz.systems import absolute_zero as m

    return SystemSpec(m.NAME, m.SUMMARY, m.self_play_round, m.DEFAULT_RECIPE, m.ROLES)


def _promptcot() -> SystemSpec:
    from megatron_sz.systems import promptcot as m

    return SystemSpec(m.NAME, m.SUMMARY, m.promptcot_round, m.DEFAULT_RECIPE, m.ROLES)


#: name -> loader of the system's spec (modules are imported only when used).
SYSTEMS: dict[str, Callable[[], SystemSpec]] = {
    "socratic-zero": _socratic_zero,
    "absolute-zero": _absolute_zero,
    "agent0": _agent0,
    "promptcot": _promptcot,
}

DEFAULT_SYSTEM = "socratic-zero"


def get_system(name: str) -> SystemSpec:
    if name not in SYSTEMS:
        import difflib

        close = difflib.get_close_matches(name, list(SYSTEMS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"unknown system {name!r}", where="system",
                        fix=f"{hint}registered systems: {', '.join(SYSTEMS)} (megatron-sz systems)")
    return SYSTEMS[name]()


def all_systems() -> list[SystemSpec]:
    return [get_system(n) for n in SYSTEMS]
