"""The stage graph of one round, for any system: ``Stage``, its typed contracts, ``RoundPlan``.

A system (``megatron_sz/systems/``) writes its round as one short function that hands
each ``Stage`` to a *runner*, in the algorithm's order. ``plan_round`` collects them and
resolves everything the executors need into a ``RoundPlan``:

* the upstream stages of each stage (``after``; ``prev:NAME`` is a stage of round t-1;
  a stage with no ``after`` depends on the stage written before it);
* per-shard correlation: shard i of a stage needs only shard i of an upstream array when
  it declares that read ``per_shard`` and both have the same shard count (SLURM
  ``aftercorr``);
* a resource class per stage (``light``, ``training``, ``inference``, ``sandbox``), which
  the SLURM executor maps to partitions and resources;
* **the contracts checked**: every file a stage ``reads`` must be ``writes``-declared by a
  stage it depends on, with the same record type (``data.py``). A missing or mistyped
  input is a ``UserError`` naming the system, the stage and the file when the plan is
  built, before anything runs or is submitted.

The local executor, the SLURM executor and ``status`` consume the ``RoundPlan`` and name
no stages themselves. Stage functions take a ``RoundContext`` and a shard index (None for
unsharded stages) and read and write only the run directory, through ``ctx.read`` /
``ctx.output`` where a contract names the file; training stages (resource ``training``)
are always started as a fresh process by the executors, so Megatron's global state never
leaks from one stage into the next.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from megatron_sz.errors import UserError
from megatron_sz.rundir import RunDir

RESOURCES = ("light", "training", "inference", "sandbox")
SCOPES = ("round", "prev", "next", "run")


@dataclass(frozen=True)
class Io:
    """One record file (or sharded folder, or checkpoint) a stage reads or writes.

    ``path`` is relative to the scope's folder: ``round`` = this round's folder,
    ``prev`` = the previous round's (reads), ``next`` = the next round's (writes: the
    curriculum writes D_{t+1}), ``run`` = ``RUN_DIR/prepare``. ``sharded``: one file per
    shard under ``path/`` (``shard-i-of-n.jsonl``). ``per_shard`` (reads of a sharded
    file): shard i of the reader needs only shard i of the writer. ``optional``: the
    reader copes with no writer (e.g. a previous round's model in round 0)."""

    path: str
    record: Any  # a data.py record type, or a tuple of them (lines tagged by 'kind')
    scope: str = "round"
    sharded: bool = False
    per_shard: bool = False
    optional: bool = False

    def label(self) -> str:
        names = self.record if isinstance(self.record, tuple) else (self.record,)
        where = self.path if self.scope == "round" else f"{self.scope}:{self.path}"
        return f"{where}{'/shard-*' if self.sharded else ''} ({' | '.join(n.__name__ for n in names)})"


@dataclass
class Stage:
    name: str
    fn: Callable[["RoundContext", int | None], dict | None]
    role: str  # whose model / partition: a recipe role (solver, teacher, generator, ...)
    resource: str = "light"  # light | training | inference | sandbox
    shards: int = 0  # 0: not sharded; n >= 1: an array of n shards
    after: tuple[str, ...] | None = None  # None: the stage written before this one
    world_size: int = 1  # processes of a training stage (tp * pp * dp)
    reads: tuple[Io, ...] = ()
    writes: tuple[Io, ...] = ()
    job: str | None = None  # training stages: the train.jobs.JOBS kind it runs (what `plan` sizes)
    train_spec: Any = None  # training stages: its train section, when not the job's default one

    def __post_init__(self) -> None:
        if self.resource not in RESOURCES:
            raise ValueError(f"stage {self.name}: resource {self.resource!r} is not one of {RESOURCES}")
        for io in self.reads + self.writes:
            if io.scope not in SCOPES:
                raise ValueError(f"stage {self.name}: {io.path}: scope {io.scope!r} is not one of {SCOPES}")

    @property
    def train(self) -> bool:
        """Runs the Megatron trainer: executors start it as a fresh process."""
        return self.resource == "training"

    def input(self, path: str) -> Io:
        for io in self.reads:
            if io.path == path:
                return io
        raise KeyError(f"stage {self.name} declares no read of {path!r}")

    def output(self, path: str) -> Io:
        for io in self.writes:
            if io.path == path:
                return io
        raise KeyError(f"stage {self.name} declares no write of {path!r}")


@dataclass
class RoundPlan:
    """Round t of a system, resolved: stages in order, their upstream, correlation, sources."""

    system: str
    round: int
    stages: list[Stage]
    upstream: dict[str, list[tuple[int, Stage]]]  # name -> [(round, upstream stage)]
    correlated: set[tuple[str, str]]  # (upstream, downstream) names of this round: shard i -> shard i
    sources: dict[tuple[str, str], tuple[int, Stage] | None]  # (stage, read path) -> (round, writer)

    def __iter__(self):
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise UserError(f"round {self.round} of {self.system} has no stage {name!r}",
                        fix=f"use one of: {', '.join(self.names)}")

    def upstream_of(self, name: str) -> list[tuple[int, Stage]]:
        return self.upstream[name]

    def is_correlated(self, up: str, down: str) -> bool:
        return (up, down) in self.correlated


def _collect(recipe, t: int) -> tuple[str, list[Stage]]:
    from megatron_sz.systems import get_system

    system = get_system(getattr(recipe, "system", "socratic-zero"))
    stages: list[Stage] = []
    system.round(t, stages.append, recipe)
    seen: set[str] = set()
    for s in stages:
        if s.name in seen:
            raise UserError(f"system {system.name}: round {t} has two stages named {s.name!r}",
                            fix="give every stage of a round a unique name")
        seen.add(s.name)
    return system.name, stages


def _resolve_after(stages: list[Stage], t: int, prev_names: set[str]) -> None:
    names = {s.name for s in stages}
    for i, s in enumerate(stages):
        after = s.after if s.after is not None else ((stages[i - 1].name,) if i else ())
        s.after = tuple(a for a in after if (a.startswith("prev:") and a[5:] in prev_names) or a in names)
        if s.shards:
            s.shards = max(1, s.shards)


def plan_round(recipe, t: int) -> RoundPlan:
    """Round t of the recipe's system as a resolved, contract-checked ``RoundPlan``."""
    system, stages = _collect(recipe, t)
    prev: RoundPlan | None = _plan_without_checks(recipe, t - 1) if t > 0 else None
    _resolve_after(stages, t, set(prev.names) if prev else set())
    by_name = {s.name: s for s in stages}
    upstream = {s.name: [(t - 1, prev.stage(a[5:])) if a.startswith("prev:") else (t, by_name[a])
                         for a in s.after] for s in stages}
    plan = RoundPlan(system, t, stages, upstream, set(), {})
    round0 = _plan_without_checks(recipe, 0) if t > 0 else plan
    for s in stages:
        for io in s.reads:
            plan.sources[(s.name, io.path)] = src = _source(plan, prev, round0, s, io)
            if src is None:
                continue
            r, w = src
            if r == t and io.per_shard and w.shards and w.shards == s.shards:
                plan.correlated.add((w.name, s.name))
    return plan


def _plan_without_checks(recipe, t: int) -> RoundPlan:
    system, stages = _collect(recipe, t)
    prev_names = {x.name for x in _collect(recipe, t - 1)[1]} if t > 0 else set()
    _resolve_after(stages, t, prev_names)
    by_name = {s.name: s for s in stages}
    upstream = {s.name: [(t, by_name[a]) for a in s.after if not a.startswith("prev:")] for s in stages}
    return RoundPlan(system, t, stages, upstream, set(), {})


def _closure(plan: RoundPlan, prev: RoundPlan | None, stage: Stage) -> set[tuple[int, str]]:
    """Every (round, stage) that ``stage`` waits for, directly or through others (this
    round, and the previous round through its own within-round dependencies)."""
    seen: set[tuple[int, str]] = set()
    todo = [(plan.round, stage.name)]
    while todo:
        r, name = todo.pop()
        src = plan if r == plan.round else prev
        if src is None:
            continue
        for ur, up in src.upstream.get(name, []):
            if (ur, up.name) not in seen:
                seen.add((ur, up.name))
                todo.append((ur, up.name))
    return seen


def _source(plan: RoundPlan, prev: RoundPlan | None, round0: RoundPlan, s: Stage, io: Io):
    """(round, writer) of a read, checked: it exists, has the record type, is upstream."""
    t = plan.round
    if io.scope == "run":
        cands = [(0, w, o) for w in round0.stages for o in w.writes if o.scope == "run" and o.path == io.path]
    elif io.scope == "round":
        cands = [(t, w, o) for w in plan.stages for o in w.writes if o.scope == "round" and o.path == io.path]
        if prev is not None:
            cands += [(t - 1, w, o) for w in prev.stages for o in w.writes if o.scope == "next" and o.path == io.path]
    elif io.scope == "prev":
        cands = ([(t - 1, w, o) for w in prev.stages for o in w.writes if o.scope == "round" and o.path == io.path]
                 if prev is not None else [])
    else:
        raise UserError(f"system {plan.system}: stage r{t}.{s.name} reads {io.label()} with scope 'next'",
                        fix="'next' is for writes only (a stage writing the next round's input)")
    cands = [c for c in cands if not (c[0] == t and c[1].name == s.name)]
    where = f"system {plan.system}, round {t}, stage {s.name}"
    if not cands:
        if io.optional:
            return None
        raise UserError(f"stage r{t}.{s.name} reads {io.label()}, but no stage of the plan writes it",
                        where=where, fix="declare it in the writing stage's writes=(...), or fix the path")
    r, w, o = cands[-1]
    if _types(o.record) != _types(io.record) or o.sharded != io.sharded:
        raise UserError(f"stage r{t}.{s.name} reads {io.label()}, but r{r}.{w.name} writes {o.label()}",
                        where=where, fix="read the record type (and sharding) the writer declares")
    if io.per_shard and not io.sharded:
        raise UserError(f"stage r{t}.{s.name}: per_shard read of unsharded {io.label()}", where=where,
                        fix="per_shard applies to sharded files only")
    if not (io.scope == "run" and t > 0) and (r, w.name) not in _closure(plan, prev, s):
        raise UserError(f"stage r{t}.{s.name} reads {io.label()} written by r{r}.{w.name}, but does not "
                        "wait for that stage", where=where,
                        fix=f"add {'prev:' if r < t else ''}{w.name} to the stage's after=(...)")
    return r, w


def _types(record) -> frozenset:
    return frozenset(record if isinstance(record, tuple) else (record,))


# --------------------------------------------------------------------------- context


@dataclass
class RoundContext:
    """What a stage function gets: the run directory, the recipe, the round, the plan."""

    rd: RunDir
    recipe: object
    t: int
    progress: bool = True
    cache: dict = field(default_factory=dict)
    plan: RoundPlan | None = None
    stage: Stage | None = None

    @property
    def dir(self) -> Path:
        return self.rd.round_dir(self.t)

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def log(self, msg: str) -> None:
        print(f"[r{self.t}] {msg}", flush=True)

    @property
    def tokenizer_path(self) -> str | None:
        """The run's trained tokenizer, else the recipe's, else None (the model folder's own)."""
        if (self.rd.prepare_dir / "tokenizer").exists():
            return str(self.rd.prepare_dir / "tokenizer")
        tok = self.recipe.solver.model.tokenizer or self.recipe.tokenizer.path
        return str(self.recipe.resolve_path(tok)) if tok else None

    # ---- plumbing every system's stages share
    def seed(self, *parts) -> int:
        """A deterministic seed for this round and purpose (same on every rerun)."""
        from megatron_sz.inference.base import stable_seed

        return stable_seed(self.recipe.seed, self.t, *parts)

    def heldout(self):
        """The run's held-out filter (``heldout.for_run``), built once per stage."""
        from megatron_sz import heldout

        if "heldout" not in self.cache:
            self.cache["heldout"] = heldout.for_run(self.rd, self.recipe)
        return self.cache["heldout"]

    def train(self, kind: str, data: Path, init: str | None, out: Path, *, recipe=None,
              max_steps: int | None = None) -> dict:
        """Run training job ``kind`` (``train.jobs.JOBS``) in this process (the executors start
        training stages fresh) and return the completion marker's info: the output folder,
        its HF export and a summary (the last step's numbers and the job's totals). A
        preempted job exits 75 after its checkpoint; the rerun resumes it."""
        from megatron_sz.data import iter_jsonl
        from megatron_sz.train.jobs import run_job

        res = run_job(kind, recipe or self.recipe, str(data), init, str(out), tokenizer=self.tokenizer_path,
                      max_steps=max_steps)
        if res.exit_code != 0:
            raise SystemExit(int(res.exit_code))
        last: dict = {}
        metrics = Path(out) / "metrics.jsonl"
        if metrics.exists():
            for obj in iter_jsonl(metrics, allow_partial_tail=True):
                if "loss" in obj and "step" in obj:
                    last = obj
        summary = {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        summary.update({k: res.summary.get(k) for k in ("total_steps", "wall_s", "eval_start", "eval_end",
                                                       "train_items")})
        return {"model": str(out), "hf": res.hf_dir, "summary": summary}

    def latest_model(self, t: int, stage: str, *, first: str | None, role: str) -> str | None:
        """``role``'s model after round t (t = -1: before round 0's training): the output of the
        newest ``stage`` marker of rounds t..0 that has a model, else round 0's ``first``
        stage (a warm-up), else the recipe's starting weights (None: random init)."""
        for r in range(t, -1, -1):
            m = self.rd.read_marker(r, stage)
            if m and m.get("model"):
                return m["model"]
        m = self.rd.read_marker(0, first) if first else None
        if m and m.get("model"):
            return m["model"]
        return initial_model(self.rd, self.recipe, role)

    # ---- typed I/O through the stage's contract
    def io_path(self, io: Io) -> Path:
        base = {"round": self.dir, "prev": self.rd.round_dir(self.t - 1), "next": self.rd.round_dir(self.t + 1),
                "run": self.rd.prepare_dir}[io.scope]
        return base / io.path

    def shard_files(self, io: Io, shard: int | None = None) -> list[Path]:
        """The files behind a read: one file, or the writer's shard files (only shard i when
        the plan correlates this stage with the writer)."""
        base = self.io_path(io)
        if not io.sharded:
            return [base]
        src = self.plan.sources.get((self.stage.name, io.path)) if self.plan else None
        if src is None:
            return []
        _, writer = src
        n = writer.shards
        if shard is not None and self.plan.is_correlated(writer.name, self.stage.name):
            return [base / f"shard-{_tag(shard, n)}.jsonl"]
        return [base / f"shard-{_tag(i, n)}.jsonl" for i in range(n)]

    def read(self, path: str, shard: int | None = None) -> list:
        """Records of a declared read (every shard file that exists; partial tails dropped)."""
        from megatron_sz.data import read_jsonl

        io = self.stage.input(path)
        key = ("read", path, shard)
        if key not in self.cache:
            out: list = []
            for f in self.shard_files(io, shard):
                if f.exists():
                    out.extend(read_jsonl(f, io.record, allow_partial_tail=True))
                elif not io.sharded and not io.optional:
                    raise UserError(f"stage r{self.t}.{self.stage.name}: input {f} is missing", where=str(f),
                                    fix="run the stage that writes it first (megatron-sz status shows it)")
            self.cache[key] = out
        return self.cache[key]

    def output(self, path: str, shard: int | None = None) -> Path:
        """The file a declared write goes to (this shard's file for sharded writes)."""
        io = self.stage.output(path)
        base = self.io_path(io)
        if io.sharded:
            return base / f"shard-{_tag(shard or 0, self.stage.shards)}.jsonl"
        return base


def _tag(i: int, n: int) -> str:
    from megatron_sz.rundir import shard_tag

    return shard_tag(i, n)


def hf_folder(model_dir: str) -> str:
    """The HF export of a training output (``<out>/hf``), or the folder itself if it is HF."""
    p = Path(model_dir)
    return str(p / "hf") if (p / "hf" / "config.json").exists() else str(p)


def initial_model(rd: RunDir, recipe, role: str) -> str | None:
    """Starting weights of a role: its Megatron checkpoint or HF folder; None = random
    init from the recipe's inline ``config`` (the trainer builds it)."""
    spec = getattr(recipe, role).model
    if spec.mcore_checkpoint:
        return str(recipe.resolve_path(spec.mcore_checkpoint))
    if spec.hf_path:
        return str(recipe.resolve_path(spec.hf_path))
    return None
