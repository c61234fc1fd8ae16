"""Data contracts of a co-evolution round, and their JSONL files.

Every file that crosses a stage boundary holds one of these record types (a stage's
``reads``/``writes`` contract names them; ``round.plan_round`` checks the contracts):

* ``Problem``          -- a curriculum entry (seed, teacher refinement, generator output, user).
* ``Trajectory``       -- one solver attempt at a problem (a rollout).
* ``Verdict``          -- a graded attempt: the teacher's (or a rule's) decision on a Trajectory.
* ``PreferencePair``   -- (prompt, chosen, rejected) for the solver's DPO.
* ``WeightedExample``  -- (prompt, target, weight) for weighted SFT (warm-up SFT is weight 1).
* ``ScoredRollout``    -- one scored sample (prompt, completion text or token ids, reward, group,
  task type, role) for policy-gradient training.
* ``Refinement``       -- the teacher's attempt to write a new problem from a parent problem.
* ``SelfVerification`` -- the teacher's re-solve of a problem every attempt failed: keep or retire.
* ``Concepts``, ``Rationale``, ``CandidateProblem``, ``JudgeScore``, ``SynthesizedProblem``
  -- PromptCoT's concept records, setter rationales, generated candidates, per-judge
  rubric scores, and the synthesized set with provenance.
* ``Checkpoint``       -- not a JSONL record: a training stage's output folder (Megatron
  checkpoint + ``hf/``), named in contracts so model hand-offs are checked like files.

Files holding several record types tag each line with ``kind`` (``Refinement.KIND``);
``read_jsonl(path, (Refinement, SelfVerification))`` dispatches on it.

JSONL rules, shared by every file the project reads or writes:

* A malformed line raises ``DataError`` naming ``file:line``, the field and the fix.
* Unknown fields are preserved in ``extra`` and written back unchanged.
* ``write_jsonl`` is atomic (temp file + fsync + rename): a killed writer leaves either
  the old file or the new one, never half a file.
* ``JsonlAppender`` is for resumable shards: each record is one line written with a
  flush+fsync. A killed run leaves at most one partial last line, which readers given
  ``allow_partial_tail=True`` drop (that record was in flight and is redone).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from megatron_sz.errors import DataError

PROVENANCES = ("seed", "teacher", "generator", "user")
VERIFIERS = ("rule", "judge", "reference", "none")
PAIR_ORIGINS = ("solver_pair", "reference_winner")

T = TypeVar("T")


@dataclass
class Problem:
    """One curriculum problem."""

    id: str
    problem: str
    answer: str
    solution: str | None = None
    subject: str | None = None
    level: int | None = None
    provenance: str = "seed"
    parent_id: str | None = None
    round: int = 0
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        _require_text(self, "id", "problem", "answer")
        _require_choice(self, "provenance", PROVENANCES)
        if self.level is not None and not (1 <= self.level <= 5):
            raise ValueError(f"field 'level': {self.level} is outside 1..5")
        if self.round < 0:
            raise ValueError(f"field 'round': {self.round} must be >= 0")


@dataclass
class Trajectory:
    """One sampled solver attempt, verified."""

    problem_id: str
    sample_index: int
    text: str
    extracted_answer: str | None = None
    correct: bool | None = None
    verifier: str = "none"
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        _require_text(self, "problem_id")
        if self.sample_index < 0:
            raise ValueError(f"field 'sample_index': {self.sample_index} must be >= 0")
        _require_choice(self, "verifier", VERIFIERS)


@dataclass
class Verdict(Trajectory):
    """A graded solver attempt (the verify stage's output): ``correct`` is True/False, or
    None when neither the rule verifier nor the judge could decide; ``verifier`` says who
    decided (``rule``, ``judge``, ``reference``; ``none`` for undecided)."""


@dataclass
class PreferencePair:
    """A DPO pair: the same prompt with a preferred and a dispreferred completion."""

    prompt: str
    chosen: str
    rejected: str
    problem_id: str
    origin: str = "solver_pair"
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        _require_text(self, "prompt", "chosen", "rejected", "problem_id")
        _require_choice(self, "origin", PAIR_ORIGINS)


@dataclass
class WeightedExample:
    """A weighted-SFT example for the generator.

    ``weight_source`` says where ``weight`` came from, e.g.
    ``{"kind": "gaussian", "success_rate": 0.375, "mu": 0.5, "sigma": 0.2, "k": 8}``.
    """

    prompt: str
    target: str
    weight: float
    weight_source: dict = field(default_factory=dict)
    problem_id: str | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        _require_text(self, "prompt", "target")
        w = float(self.weight)
        if not (w == w and w >= 0.0 and w != float("inf")):
            raise ValueError(f"field 'weight': {self.weight!r} must be a finite number >= 0")


@dataclass
class ScoredRollout:
    """One scored sample for policy-gradient training (``megatron-sz train policy-gradient``).

    The completion is either text (``completion``; the job tokenises it and appends EOS
    when ``finished``) or the sampled token ids (``completion_ids``, exact), optionally
    with ``prompt_ids``. Per completion token: ``loss_mask`` (0 = no loss, e.g. a tool
    observation) and ``old_logps`` (the sampler's log-probs, used with the recipe's
    ``old_logps: data``). ``group_id`` ties the k samples of one prompt (GRPO, ADPO);
    ``task_type`` and ``role`` key TRR++'s baselines (e.g. deduction/abduction/induction x
    propose/solve); ``consistency`` is the task's self-consistency p (ADPO).
    """

    prompt: str
    reward: float
    completion: str | None = None
    completion_ids: list | None = None
    prompt_ids: list | None = None
    loss_mask: list | None = None
    old_logps: list | None = None
    finished: bool = True
    group_id: str | None = None
    task_type: str = "default"
    role: str = "solve"
    consistency: float | None = None
    problem_id: str | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError("field 'prompt' must be a string")
        r = float(self.reward)
        if not (r == r and abs(r) != float("inf")):
            raise ValueError(f"field 'reward': {self.reward!r} must be a finite number")
        if (self.completion is None) == (self.completion_ids is None):
            raise ValueError("give exactly one of 'completion' (text) and 'completion_ids' (token ids)")
        if self.completion is not None and not self.completion:
            raise ValueError("field 'completion' is empty")
        for name in ("completion_ids", "prompt_ids"):
            ids = getattr(self, name)
            if ids is not None and (not ids and name == "completion_ids" or
                                    not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                            for x in ids)):
                raise ValueError(f"field {name!r} must be a non-empty list of token ids (ints >= 0)")
        n = len(self.completion_ids) if self.completion_ids is not None else None
        for name in ("loss_mask", "old_logps"):
            vals = getattr(self, name)
            if vals is None:
                continue
            if n is None:
                raise ValueError(f"field {name!r} is per completion token: it needs 'completion_ids'")
            if len(vals) != n:
                raise ValueError(f"field {name!r} has {len(vals)} values for {n} completion tokens")
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
                raise ValueError(f"field {name!r} must hold numbers")
        if self.old_logps is not None and any(x > 0 or x != x for x in self.old_logps):
            raise ValueError("field 'old_logps' holds log-probabilities: every value must be <= 0")
        if self.consistency is not None and not 0.0 <= float(self.consistency) <= 1.0:
            raise ValueError(f"field 'consistency' {self.consistency!r} must be in [0, 1]")


#: RefineOutcome statuses, plus "unverified" (self-verification rejected the new problem).
REFINE_STATUSES = ("ok", "parse_failed", "backend_failed", "rejected", "unverified")


@dataclass
class Refinement:
    """One teacher refinement of ``parent_id`` (the j-th of the round: ``key`` = ``parent:j``).

    ``status`` is ``ok`` when ``problem`` is a new, self-verified problem; otherwise it
    names why there is none (e.g. ``unverified``: the teacher could not re-solve its own
    problem). ``attempt`` is the solver text it was written from (a failure, or a success
    for a mastered parent): the generator's training prompt."""

    KIND = "refine"
    key: str
    parent_id: str
    zone: str
    status: str
    problem: Problem | None = None
    reason: str | None = None
    attempt: str | None = None
    kind: str = "refine"
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        _require_text(self, "key", "parent_id", "zone", "status")
        if self.kind != self.KIND:
            raise ValueError(f"field 'kind' is {self.kind!r}; expected {self.KIND!r}")
        _require_choice(self, "status", REFINE_STATUSES)
        if self.status == "ok" and self.problem is None:
            raise ValueError("field 'problem' is required when status is 'ok'")
        if self.problem is not None:
            self.problem.validate()


@dataclass
class SelfVerification:
    """The teacher's self-verification of a problem every attempt failed (``key`` = ``id:sv``):
    ``keep`` False retires the problem, with ``reason``."""

    KIND = "self_verify"
    key: str
    parent_id: str
    zone: str
    keep: bool
    reason: str | None = None
    kind: str = "self_verify"
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        _require_text(self, "key", "parent_id")
        if self.kind != self.KIND:
            raise ValueError(f"field 'kind' is {self.kind!r}; expected {self.KIND!r}")


@dataclass
class Checkpoint:
    """A training stage's output folder; named in stage contracts, never read as JSONL."""

    path: str
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- Absolute Zero

AZR_TASK_TYPES = ("deduction", "abduction", "induction")
AZR_PROVENANCES = ("zero", "seed", "proposed", "warmup", "heldout")
AZR_VALIDITY = ("valid", "malformed", "syntax", "banned", "nondeterministic", "timeout", "crash", "bad_output")


@dataclass
class AzrTask:
    """One Absolute Zero task: a program ``f`` with literal inputs and their outputs, all
    computed by the sandbox (``megatron_sz/systems/absolute_zero.py``).

    deduction / abduction: one (``input``, ``output``) pair (input = the text of the
    comma-separated literal arguments of ``f``, output = ``repr`` of its value).
    induction: ``inputs``/``outputs`` (pairs), ``message`` (the proposer's hint); the first
    ``shown`` pairs are shown to the solver, the rest are hidden and must all pass.
    Provenance: ``round`` it entered a buffer, ``parents`` (ids of the references the
    proposer was conditioned on), ``provenance`` (zero triplet, user seed, proposal, ...)."""

    id: str
    task_type: str
    program: str
    input: str | None = None
    output: str | None = None
    inputs: list | None = None
    outputs: list | None = None
    shown: int = 0
    message: str | None = None
    round: int = 0
    parents: list = field(default_factory=list)
    provenance: str = "proposed"
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        _require_text(self, "id", "program")
        _require_choice(self, "task_type", AZR_TASK_TYPES)
        _require_choice(self, "provenance", AZR_PROVENANCES)
        if self.task_type == "induction":
            if not self.inputs or not self.outputs or len(self.inputs) != len(self.outputs):
                raise ValueError("an induction task needs 'inputs' and 'outputs' of the same, non-zero length")
            if not 0 < self.shown < len(self.inputs):
                raise ValueError(f"field 'shown' {self.shown} must leave at least one pair shown and one hidden")
        elif not isinstance(self.input, str) or not isinstance(self.output, str):
            raise ValueError(f"a {self.task_type} task needs string 'input' and 'output' (literal text)")
        if self.round < 0:
            raise ValueError(f"field 'round': {self.round} must be >= 0")


@dataclass
class AzrProposal:
    """One proposer sample (``key`` = ``type:j``): its prompt, raw completion, the
    references it was conditioned on, and what was parsed out of it (``None`` = missing)."""

    key: str
    task_type: str
    prompt: str
    completion: str
    references: list = field(default_factory=list)
    program: str | None = None
    input: str | None = None
    inputs: list | None = None
    message: str | None = None
    round: int = 0
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        _require_text(self, "key", "prompt")
        _require_choice(self, "task_type", AZR_TASK_TYPES)


@dataclass
class AzrValidation:
    """The sandbox's verdict on one proposal: ``status`` (``valid`` or the first failed
    check, ``AZR_VALIDITY``), ``reason``, and the new task when valid."""

    key: str
    task_type: str
    status: str
    reason: str | None = None
    task: AzrTask | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        _require_text(self, "key")
        _require_choice(self, "task_type", AZR_TASK_TYPES)
        _require_choice(self, "status", AZR_VALIDITY)
        if self.status == "valid" and self.task is None:
            raise ValueError("field 'task' is required when status is 'valid'")
        if self.task is not None:
            self.task.validate()


# --------------------------------------------------------------------------- PromptCoT

#: The judges' rubric (``megatron_sz/systems/promptcot_rubric.py``), in this order.
RUBRIC_CRITERIA = ("format", "correctness", "difficulty", "concept_coverage", "solvability")
#: A parsed judge reply is ``ok`` or ``repaired``; every other status is a malformed class.
RUBRIC_STATUSES = ("ok", "repaired", "empty", "no_rubric", "missing_fields", "bad_value", "out_of_range",
                   "wrong_type", "backend_failed")
TEACHER_CALL_STATUSES = ("ok", "repaired", "parse_failed", "backend_failed")
CANDIDATE_STATUSES = ("ok", "unparsed", "empty", "backend_failed")


def _check_concepts(rec: Any) -> None:
    if not isinstance(rec.concepts, list) or not all(isinstance(c, str) and c.strip() for c in rec.concepts):
        raise ValueError(f"field 'concepts' must be a list of non-empty strings, got {rec.concepts!r:.80}")
    if rec.difficulty is not None and not 1 <= rec.difficulty <= 5:
        raise ValueError(f"field 'difficulty': {rec.difficulty} is outside 1..5")


@dataclass
class Concepts:
    """PromptCoT: the concepts of one problem (``problem_id``), its difficulty (1..5, None:
    unknown) and who extracted them (``source``: symbolic, llm, user). ``status`` says
    whether extraction worked; on failure ``concepts`` is empty and ``reason`` says why."""

    problem_id: str
    problem: str
    concepts: list = field(default_factory=list)
    difficulty: int | None = None
    source: str = "symbolic"
    status: str = "ok"
    reason: str | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        _require_text(self, "problem_id", "problem", "source")
        _require_choice(self, "status", TEACHER_CALL_STATUSES)
        _check_concepts(self)
        if self.status in ("ok", "repaired") and not self.concepts:
            raise ValueError("field 'concepts' is empty but status is ok")


@dataclass
class Rationale:
    """PromptCoT: the setter's rationale for ``concepts`` at ``difficulty`` that leads to the
    problem ``problem`` (of ``problem_id``): one generator SFT example (concepts -> rationale
    -> problem). ``status`` other than ok/repaired: no rationale (``reason``)."""

    problem_id: str
    problem: str
    concepts: list = field(default_factory=list)
    difficulty: int | None = None
    rationale: str | None = None
    source: str = "symbolic"
    status: str = "ok"
    reason: str | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        _require_text(self, "problem_id", "problem")
        _require_choice(self, "status", TEACHER_CALL_STATUSES)
        _check_concepts(self)
        if self.status in ("ok", "repaired") and not (isinstance(self.rationale, str) and self.rationale.strip()):
            raise ValueError("field 'rationale' is required when status is ok")


@dataclass
class CandidateProblem:
    """PromptCoT: one problem the generator wrote for a requested concept set (``id`` =
    ``request_id-sJ``): the prompt, the raw text, and the rationale / problem parsed out of
    it (``status`` unparsed: no problem found in the text)."""

    id: str
    round: int
    request_id: str
    prompt: str
    text: str
    concepts: list = field(default_factory=list)
    difficulty: int | None = None
    rationale: str | None = None
    problem: str | None = None
    status: str = "ok"
    finish_reason: str | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        _require_text(self, "id", "request_id", "prompt")
        _require_choice(self, "status", CANDIDATE_STATUSES)
        _check_concepts(self)
        if self.status == "ok" and not (isinstance(self.problem, str) and self.problem.strip()):
            raise ValueError("field 'problem' is required when status is ok")


@dataclass
class JudgeScore:
    """PromptCoT: one judge's rubric for one candidate (key ``candidate_id#judge``).

    ``scores``: criterion (``RUBRIC_CRITERIA``) -> score on 1..``scale`` (None: missing or
    unreadable). ``status``: ``ok``/``repaired`` (parsed), else the malformed class, also in
    ``malformed``. ``perfect``: parsed, and every criterion at ``scale``. ``detected``: what
    a symbolic judge recognised (family, levels)."""

    candidate_id: str
    judge: str
    scores: dict = field(default_factory=dict)
    status: str = "ok"
    perfect: bool = False
    scale: int = 5
    malformed: str | None = None
    notes: list = field(default_factory=list)
    reason: str | None = None
    raw: str | None = None
    detected: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        _require_text(self, "candidate_id", "judge")
        _require_choice(self, "status", RUBRIC_STATUSES)
        if self.perfect and (self.malformed or self.status not in ("ok", "repaired")):
            raise ValueError("a malformed judge reply cannot be perfect")


@dataclass
class SynthesizedProblem:
    """PromptCoT's output: a problem both judges rated perfect, with its provenance
    (concepts, target difficulty, rationale, every judge's scores, the round, the candidate)
    and, once the teacher has solved it (downstream), ``answer`` and ``solution``."""

    id: str
    problem: str
    round: int
    candidate_id: str
    concepts: list = field(default_factory=list)
    difficulty: int | None = None
    rationale: str | None = None
    judge_scores: list = field(default_factory=list)
    answer: str | None = None
    solution: str | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        _require_text(self, "id", "problem", "candidate_id")
        _check_concepts(self)
        if self.round < 0:
            raise ValueError(f"field 'round': {self.round} must be >= 0")


def _require_text(rec: Any, *names: str) -> None:
    for name in names:
        value = getattr(rec, name)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"field {name!r} must be a non-empty string, got {value!r}")


def _require_choice(rec: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(rec, name)
    if value not in choices:
        raise ValueError(f"field {name!r} is {value!r}; expected one of {', '.join(choices)}")


# --------------------------------------------------------------------------- conversion


def _type_ok(value: Any, hint: Any) -> bool:
    """Loose runtime check of a JSON value against a dataclass field annotation."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return isinstance(value, (dict, hint))
    if origin is not None:
        hint = origin
    try:
        return isinstance(value, hint)
    except TypeError:
        return True


def record_from_dict(cls: type[T], obj: Any, *, where: str = "") -> T:
    """Build a record of type ``cls`` from a decoded JSON object.

    Raises ``DataError`` naming ``where`` (usually ``file:line``) and the bad field.
    Keys that ``cls`` does not declare go into ``extra``.
    """
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", where=where,
                        fix=f"each line must be one JSON object with the fields of {cls.__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
    kwargs: dict[str, Any] = {}
    extra = dict(obj.get("extra") or {}) if isinstance(obj.get("extra"), dict) else {}
    for key, value in obj.items():
        if key == "extra":
            continue
        if key in fields:
            if not _type_ok(value, hints[key]):
                raise DataError(
                    f"field {key!r} has {type(value).__name__} value {value!r:.60}; "
                    f"expected {_hint_name(hints[key])}", where=where,
                    fix=f"correct the {key!r} value of this {cls.__name__} record")
            kwargs[key] = value
        else:
            extra[key] = value
    missing = [n for n, f in fields.items()
               if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
    if missing:
        raise DataError(f"missing required field(s) {', '.join(repr(m) for m in missing)}",
                        where=where, fix=f"add them; a {cls.__name__} has the fields "
                        f"{', '.join(fields)}")
    for key, value in list(kwargs.items()):  # nested records (Refinement.problem)
        sub = _record_type(hints[key])
        if sub is not None and isinstance(value, dict):
            kwargs[key] = record_from_dict(sub, value, where=f"{where} (field {key!r})" if where else key)
    rec = cls(**kwargs, extra=extra)  # type: ignore[call-arg]
    validate = getattr(rec, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as exc:
            raise DataError(str(exc), where=where,
                            fix=f"correct this {cls.__name__} record") from None
    return rec


def _record_type(hint: Any) -> type | None:
    """The dataclass record type inside a field annotation (``Problem | None`` -> Problem)."""
    for h in (typing.get_args(hint) or (hint,)):
        if dataclasses.is_dataclass(h) and isinstance(h, type):
            return h
    return None


def _hint_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if args:
        return " or ".join(_hint_name(a) for a in args)
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def record_to_dict(rec: Any) -> dict:
    """Flatten a record to a JSON object; ``extra`` keys are written at top level."""
    if isinstance(rec, dict):
        return rec
    out = {f.name: getattr(rec, f.name) for f in dataclasses.fields(rec) if f.name != "extra"}
    for k, v in out.items():
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out[k] = record_to_dict(v)
    extra = getattr(rec, "extra", None) or {}
    for key, value in extra.items():
        out.setdefault(key, value)
    return out


# --------------------------------------------------------------------------- JSONL files


def iter_jsonl_rows(path: str | Path, *, allow_partial_tail: bool = False,
                    what: str = "JSON object") -> Iterator[tuple[str, Any]]:
    """Yield ``(where, obj)`` for each non-blank line, ``where`` being ``file:line``.

    The one JSONL reader every file format of the project goes through, so every
    malformed line gets the same one-line ``file:line`` error. With
    ``allow_partial_tail`` a last line without a newline that does not parse (a writer
    killed mid-line) is dropped instead of raising.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"file not found: {path}", fix="check the path")
    lines = read_text_lines(path, allow_partial_tail=allow_partial_tail)
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if allow_partial_tail and lineno == len(lines) and not line.endswith("\n"):
                return
            # One line is parsed at a time, so the decoder's column is the column in this line.
            raise DataError(f"invalid JSON ({exc.msg} at column {exc.colno})", where=where,
                            fix=f"each line must be one complete {what}") from None
        yield where, obj


def read_text_lines(path: str | Path, *, allow_partial_tail: bool = False, fix: str | None = None) -> list[str]:
    """The lines of a UTF-8 text file (with their newlines). A byte sequence that is not
    UTF-8 is a ``DataError`` naming ``file:line`` and the column, not a byte offset into
    the file. A leading byte-order mark is dropped. With ``allow_partial_tail`` a last line
    without a newline (a writer killed mid-character) may be undecodable and is dropped."""
    path = Path(path)
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    out = []
    chunks = raw.splitlines(keepends=True)
    for lineno, chunk in enumerate(chunks, start=1):
        try:
            out.append(chunk.decode("utf-8"))
        except UnicodeDecodeError as exc:
            if allow_partial_tail and lineno == len(chunks) and not chunk.endswith(b"\n"):
                break
            col = len(chunk[:exc.start].decode("utf-8", errors="replace")) + 1
            raise DataError(f"not UTF-8 text (byte 0x{chunk[exc.start]:02x} at column {col}: {exc.reason})",
                            where=f"{path}:{lineno}", fix=fix or "save the file as UTF-8") from None
    return out


def iter_jsonl(path: str | Path, cls: type[T] | tuple | None = None, *,
               allow_partial_tail: bool = False) -> Iterator[T]:
    """Yield records (or dicts if ``cls`` is None) from a JSONL file (see ``iter_jsonl_rows``)."""
    for where, obj in iter_jsonl_rows(path, allow_partial_tail=allow_partial_tail):
        if cls is None:
            yield obj
        elif isinstance(cls, tuple):
            yield record_from_dict(_dispatch(cls, obj, where), obj, where=where)
        else:
            yield record_from_dict(cls, obj, where=where)


def _dispatch(classes: tuple, obj: Any, where: str) -> type:
    """The record type of a line in a file of several types (by its ``kind`` tag)."""
    kinds = {c.KIND: c for c in classes}
    kind = obj.get("kind") if isinstance(obj, dict) else None
    if kind not in kinds:
        raise DataError(f"field 'kind' is {kind!r}; expected one of {', '.join(map(repr, kinds))}",
                        where=where, fix="each line of this file must be tagged with its record kind")
    return kinds[kind]


def read_jsonl(path: str | Path, cls: type[T] | tuple | None = None, *,
               allow_partial_tail: bool = False) -> list[T]:
    return list(iter_jsonl(path, cls, allow_partial_tail=allow_partial_tail))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def dumps_record(rec: Any) -> str:
    return json.dumps(record_to_dict(rec), ensure_ascii=False, sort_keys=False)


def write_jsonl(path: str | Path, records: Iterable[Any]) -> int:
    """Atomically write records (dataclasses or dicts) as JSONL; returns the count."""
    lines = [dumps_record(r) + "\n" for r in records]
    atomic_write_text(path, "".join(lines))
    return len(lines)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


class JsonlAppender:
    """Append records one durable line at a time (for resumable, keyed shards).

    ``key`` extracts the record id; ``done`` holds the ids already in the file, so a
    rerun can skip them. A partial last line left by a killed writer is cut off first,
    so the file stays valid JSONL.
    """

    def __init__(self, path: str | Path, key: Callable[[dict], str], cls: type | None = None,
                 retry: Callable[[dict], bool] | None = None):
        self.path = Path(path)
        self.key = key
        self.cls = cls
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()
        self.retried = 0  # records ``retry`` took back out of the file on open
        if self.path.exists():
            self._truncate_partial_tail()
            if retry is not None:
                self._drop_retryable(retry)
            for obj in iter_jsonl(self.path):
                self.done.add(key(obj))
        self._fh = self.path.open("a", encoding="utf-8")

    def _drop_retryable(self, retry: Callable[[dict], bool]) -> None:
        """Rewrite the file (atomically) without the records ``retry`` says must be redone,
        e.g. calls that got no reply during a backend outage, so a rerun asks them again
        and every key still appears once."""
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = [ln for ln in lines if not (ln.strip() and retry(json.loads(ln)))]
        self.retried = len(lines) - len(keep)
        if self.retried:
            atomic_write_text(self.path, "".join(keep))

    def _truncate_partial_tail(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with self.path.open("r+b") as fh:
                fh.truncate(cut)

    def append(self, rec: Any) -> bool:
        """Write ``rec`` unless its key is already present. Returns True if written."""
        obj = record_to_dict(rec)
        k = self.key(obj)
        if k in self.done:
            return False
        self._fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.done.add(k)
        return True

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- Agent0 records


TOOL_FINISHES = ("answer", "no_answer", "max_tool_calls", "length", "error")


@dataclass
class ToolTrajectory:
    """One multi-turn, tool-integrated attempt (``megatron_sz/toolloop.py``).

    ``segments`` is the completion in order: ``{"role": "model" | "tool", "text": ...}``;
    ``tool`` segments are sandbox observations (no loss on them). ``finish`` says how it
    ended; ``tool_statuses`` holds the sandbox status of each call."""

    problem_id: str
    sample_index: int
    prompt: str
    segments: list = field(default_factory=list)
    tool_calls: int = 0
    finish: str = "no_answer"
    extracted_answer: str | None = None
    tool_statuses: list = field(default_factory=list)
    correct: bool | None = None  # against a reference answer, when there is one (evaluation)
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        _require_text(self, "problem_id")
        if self.sample_index < 0 or self.tool_calls < 0:
            raise ValueError("fields 'sample_index' and 'tool_calls' must be >= 0")
        _require_choice(self, "finish", TOOL_FINISHES)
        for seg in self.segments:
            if not isinstance(seg, dict) or seg.get("role") not in ("model", "tool") \
                    or not isinstance(seg.get("text"), str):
                raise ValueError("each segment must be {'role': 'model' | 'tool', 'text': str}")

    @property
    def text(self) -> str:
        return "".join(s["text"] for s in self.segments)


@dataclass
class Proposal:
    """One curriculum-agent sample: the prompt it saw, what it wrote, and the question parsed
    from it (``question`` None: invalid, ``reason`` says why). ``group_id`` ties the
    samples of one prompt (GRPO)."""

    key: str
    prompt: str
    completion: str
    group_id: str
    question: str | None = None
    reason: str | None = None
    topic: str | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        _require_text(self, "key", "group_id")


@dataclass
class TaskSignal:
    """The executor's signals on one proposal and the curriculum reward they give.

    ``p`` is the majority-vote self-consistency over ``samples`` trajectories, ``label``
    the pseudo-label (None: no answers), ``kept`` whether ``p`` is in the filter's band.
    ``reward`` = ``r_unc + r_tool - repetition`` for a valid question, the invalid reward
    (-1) otherwise."""

    key: str
    valid: bool
    reward: float
    question: str | None = None
    p: float | None = None
    label: str | None = None
    votes: dict = field(default_factory=dict)
    samples: int = 0
    tool_calls_mean: float = 0.0
    r_unc: float = 0.0
    r_tool: float = 0.0
    repetition: float = 0.0
    cluster: int | None = None
    cluster_size: int = 0
    kept: bool = False
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        _require_text(self, "key")
        if self.p is not None and not 0.0 <= float(self.p) <= 1.0:
            raise ValueError(f"field 'p' {self.p!r} must be in [0, 1]")
