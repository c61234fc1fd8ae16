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
    #: Optional ``finish(rd) -> str | None``: run when every round is complete (e.g. check and
    #: rebuild the run's summary files from the per-round records); returns what it repaired.
    finish: Callable[[Any], str | None] | None = None


#: name -> (module in megatron_sz.systems, its round function). A module also defines NAME,
#: SUMMARY, DEFAULT_RECIPE, ROLES and optionally finish(rd). Modules are imported only when used.
SYSTEMS: dict[str, tuple[str, str] | Callable[[], SystemSpec]] = {
    "socratic-zero": ("socratic_zero", "co_evolution_round"),
    "absolute-zero": ("absolute_zero", "self_play_round"),
    "agent0": ("agent0", "agent0_round"),
    "promptcot": ("promptcot", "promptcot_round"),
}


def _load(module: str, round_fn: str) -> SystemSpec:
    import importlib

    m = importlib.import_module(f"megatron_sz.systems.{module}")
    return SystemSpec(m.NAME, m.SUMMARY, getattr(m, round_fn), m.DEFAULT_RECIPE, tuple(m.ROLES),
                      getattr(m, "finish", None))


DEFAULT_SYSTEM = "socratic-zero"


def get_system(name: str) -> SystemSpec:
    if name not in SYSTEMS:
        import difflib

        close = difflib.get_close_matches(name, list(SYSTEMS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"unknown system {name!r}", where="system",
                        fix=f"{hint}registered systems: {', '.join(SYSTEMS)} (megatron-sz systems)")
    entry = SYSTEMS[name]
    return entry() if callable(entry) else _load(*entry)  # a callable: a plug-in's own loader


def all_systems() -> list[SystemSpec]:
    return [get_system(n) for n in SYSTEMS]
