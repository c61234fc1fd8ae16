"""The teacher interface: verify solver attempts, refine problems, self-verify problems.

Two implementations share it: ``SymbolicTeacher`` (no LLM, deterministic, for the
embedded CPU default) and ``LLMTeacher`` (a frozen LLM behind any inference backend).
The round code calls only these methods, so it never knows which one it has.

Prompt templates are plain text files in ``megatron_sz/teacher/prompts/`` (or the
recipe's ``teacher.templates_dir``). Placeholders are ``{name}``; only the names a role
passes are substituted, so LaTeX braces such as ``\\boxed{}`` need no escaping.

A teacher never raises for a bad model reply: every call returns an outcome with a
``status`` and, on failure, the raw reply, and the teacher counts outcomes in ``stats``.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megatron_sz.data import Problem, Trajectory
from megatron_sz.errors import UserError

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
ZONES = ("learning", "mastered", "too_hard")
Zone = Literal["learning", "mastered", "too_hard"]


def load_template(name: str, templates_dir: str | Path | None = None) -> str:
    """Read prompt template ``name`` (without ``.txt``): the override folder first."""
    for folder in ([Path(templates_dir)] if templates_dir else []) + [PROMPTS_DIR]:
        p = folder / f"{name}.txt"
        if p.is_file():
            return p.read_text(encoding="utf-8")
    raise UserError(f"prompt template {name!r} not found", where=str(templates_dir or PROMPTS_DIR),
                    fix=f"add {name}.txt to the templates folder (see {PROMPTS_DIR})")


def render(template: str, **fields: object) -> str:
    """Substitute ``{name}`` for each given field; other braces are left alone.

    One pass, so a value that itself contains ``{answer}`` is not substituted again."""
    if not fields:
        return template
    pattern = re.compile(r"\{(" + "|".join(re.escape(k) for k in fields) + r")\}")
    return pattern.sub(lambda m: "" if fields[m.group(1)] is None else str(fields[m.group(1)]), template)


@dataclass
class RefineOutcome:
    """Result of one refinement. ``problem`` is set only when ``status == "ok"``."""

    status: Literal["ok", "parse_failed", "backend_failed", "rejected"]
    problem: Problem | None = None
    raw: str | None = None
    reason: str = ""
    attempts: int = 1


@dataclass
class SelfVerifyOutcome:
    """``keep`` is False only when the problem itself failed (not reproduced, invalid).

    ``status``: reproduced | not_reproduced | invalid | no_answer | backend_failed |
    not_checked. A backend failure keeps the problem (status says it was not checked).
    """

    keep: bool
    reason: str
    raw: str | None = None
    status: str = "reproduced"
    answer: str | None = None


@dataclass
class RefineJob:
    """One refinement to make (for the batched ``refine_many``)."""

    problem: Problem
    zone: Zone
    round: int = 0
    failed: Trajectory | None = None
    succeeded: Trajectory | None = None
    variant: int = 0  # the j-th refinement of the same problem in a round (distinct output)


class Teacher:
    """Base class. Subclasses implement ``verify``, ``refine_many`` and ``self_verify_many``;
    the single-item methods call the batched ones (an LLM teacher batches over endpoints)."""

    kind = "base"

    def __init__(self) -> None:
        self.stats: Counter = Counter()

    def verify(self, problems: dict[str, Problem], trajs: list[Trajectory]) -> list[Trajectory]:
        raise NotImplementedError

    def refine(self, problem: Problem, *, failed: Trajectory | None = None,
               succeeded: Trajectory | None = None, zone: Zone = "learning",
               round: int = 0, variant: int = 0) -> RefineOutcome:
        """One refinement. ``variant`` j asks for the j-th distinct refinement of the same
        problem in the same round (deterministic per j)."""
        return self.refine_many([RefineJob(problem, zone, round, failed, succeeded, variant)])[0]

    def refine_many(self, jobs: list[RefineJob]) -> list[RefineOutcome]:
        raise NotImplementedError

    def self_verify(self, problem: Problem) -> SelfVerifyOutcome:
        return self.self_verify_many([problem])[0]

    def self_verify_many(self, problems: list[Problem]) -> list[SelfVerifyOutcome]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _count(self, prefix: str, status: str) -> None:
        self.stats[f"{prefix}.{status}"] += 1


def check_zone(zone: str) -> None:
    if zone not in ZONES:
        raise ValueError(f"zone {zone!r} is not one of {', '.join(ZONES)}")


def make_teacher(role, *, seed: int = 0, backend=None, model_path: str | None = None) -> Teacher:
    """Build the teacher a recipe's ``TeacherRole`` describes.

    ``backend`` lets a caller pass an already-built inference backend (tests, or a round
    that shares one); otherwise it is built from ``role.backend``.
    """
    if role.kind == "symbolic":
        from megatron_sz.teacher.symbolic import SymbolicTeacher

        return SymbolicTeacher(seed=role.seed if role.seed else seed, families=list(role.families) or None)
    if role.kind == "llm":
        from megatron_sz.teacher.llm import LLMTeacher

        if backend is None:
            from megatron_sz.inference import make_backend

            backend = make_backend(role.backend, model_path=model_path, seed=seed)
        return LLMTeacher(backend, role=role, seed=seed)
    raise UserError(f"unknown teacher kind {role.kind!r}", where="teacher.kind",
                    fix="use 'symbolic' or 'llm'")
