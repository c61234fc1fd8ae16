"""One Socratic-Zero co-evolution round, as one function over the roles.

``co_evolution_round`` below is the whole algorithm. It does not run anything itself:
it hands each ``Stage`` to a *runner*. The local executor's runner executes stages in
order on this machine; the SLURM executor's runner records them (with their
dependencies, partitions and shard counts) and submits a job or job array per stage;
``megatron-sz stage`` looks a stage up by name and runs one shard of it. So the order
written here is the order both executors follow, and there is no second copy of it.

Stage functions take a ``RoundContext`` and a shard index (``None`` for unsharded
stages) and read/write only the run directory. Training stages (``train=True``) call
the trainer in-process, so executors always start them as a fresh process (``python -m
megatron_sz stage ...``, torchrun, or srun): Megatron's global state never leaks from
one stage into the next.

Dependencies (``after``) are data dependencies, which is what SLURM needs to overlap
roles: teacher refinement only needs the verdicts, so it can run on the teacher
partition while the solver's DPO job trains. ``prev:NAME`` names a stage of the
previous round. A stage with no ``after`` depends on the stage written before it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megatron_sz.data import (JsonlAppender, Problem, Trajectory, iter_jsonl, read_jsonl, record_to_dict,
                              write_jsonl)
from megatron_sz.errors import UserError
from megatron_sz.rundir import RunDir

ROLES = ("solver", "teacher", "generator")


@dataclass
class Stage:
    name: str
    fn: Callable[["RoundContext", int | None], dict | None]
    role: str  # SLURM partition/resources: solver | teacher | generator
    shards: int = 0  # 0: not sharded; n >= 1: an array of n shards
    after: tuple[str, ...] | None = None  # None: the stage written before this one
    train: bool = False  # runs the Megatron trainer: always in a fresh process
    world_size: int = 1  # processes of a training stage (tp * pp * dp)


def co_evolution_round(t: int, run: Callable[[Stage], None], recipe) -> None:
    """Round t of Socratic-Zero: the roles in the paper's order."""
    S, T, G = recipe.solver, recipe.teacher, recipe.generator
    if t == 0:
        run(Stage("prepare", prepare, "solver"))  # seeds, held-out set, warm-up data, tokenizer, D_0
        run(Stage("sft", solver_sft, "solver", train=True, **_layout(S.parallel)))  # warm-up
        run(Stage("eval_sft", evaluate_warmup, "solver"))
    run(Stage("rollout", solver_rollouts, "solver", shards=S.rollout.shards,
              after=("sft",) if t == 0 else ("prev:curriculum", "prev:dpo")))
    run(Stage("verify", teacher_verify, "teacher", shards=T.shards, after=("rollout",)))
    run(Stage("pairs", build_preference_pairs, "solver", after=("verify",)))
    run(Stage("dpo", solver_dpo, "solver", train=True, after=("pairs",), **_layout(S.parallel)))
    run(Stage("refine", teacher_refine, "teacher", shards=T.shards, after=("verify",)))
    run(Stage("probe", probe_new_problems, "solver", shards=S.rollout.shards, after=("dpo", "refine")))
    if G.enabled:
        run(Stage("wsft", generator_wsft, "generator", train=True, after=("probe", "prev:wsft"),
                  **_layout(G.parallel)))
    run(Stage("curriculum", update_curriculum, "solver", after=("refine",)))
    if recipe.eval.enabled:
        run(Stage("eval", evaluate, "solver", after=("dpo",)))
    run(Stage("report", report, "solver", after=("curriculum", "eval", "wsft", "probe", "prev:report")))


def _layout(parallel) -> dict:
    return {"world_size": parallel.world_size}


def plan_round(recipe, t: int) -> list[Stage]:
    """The stages of round t with every ``after`` resolved to explicit names."""
    stages: list[Stage] = []
    co_evolution_round(t, stages.append, recipe)
    names = {s.name for s in stages}
    for i, s in enumerate(stages):
        if s.after is None:
            s.after = (stages[i - 1].name,) if i else ()
        s.after = tuple(a for a in s.after if a.startswith("prev:") and t > 0 or a in names)
        if s.shards == 0:
            continue
        s.shards = max(1, s.shards)
    return stages


def find_stage(recipe, t: int, name: str) -> Stage:
    for s in plan_round(recipe, t):
        if s.name == name:
            return s
    valid = ", ".join(s.name for s in plan_round(recipe, t))
    raise UserError(f"round {t} has no stage {name!r}", fix=f"use one of: {valid}")


# --------------------------------------------------------------------------- context


@dataclass
class RoundContext:
    rd: RunDir
    recipe: object
    t: int
    progress: bool = True
    cache: dict = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.rd.round_dir(self.t)

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def log(self, msg: str) -> None:
        print(f"[r{self.t}] {msg}", flush=True)

    # ---- where each role's current model lives (decided by completion markers)
    @property
    def tokenizer_path(self) -> str | None:
        """The run's trained tokenizer, else the recipe's, else None (the model folder's own)."""
        if (self.rd.prepare_dir / "tokenizer").exists():
            return str(self.rd.prepare_dir / "tokenizer")
        tok = self.recipe.solver.model.tokenizer or self.recipe.tokenizer.path
        return str(self.recipe.resolve_path(tok)) if tok else None

    def model_after(self, role: str, t: int) -> str | None:
        """Training output (checkpoint folder) of ``role`` after round t; t = -1: its start."""
        stage = "dpo" if role == "solver" else "wsft"
        for r in range(t, -1, -1):
            m = self.rd.read_marker(r, stage)
            if m and m.get("model"):
                return m["model"]
        if role == "solver":
            m = self.rd.read_marker(0, "sft")
            if m and m.get("model"):
                return m["model"]
        return initial_model(self.rd, self.recipe, role)

    def solver_hf(self, t: int) -> str:
        return hf_folder(self.model_after("solver", t))

    def problems(self, name: str = "active.jsonl") -> list[Problem]:
        key = f"problems:{name}"
        if key not in self.cache:
            self.cache[key] = read_jsonl(self.path(name), Problem)
        return self.cache[key]


def initial_model(rd: RunDir, recipe, role: str) -> str | None:
    """Starting weights of a role: its Megatron checkpoint or HF folder; None = random
    init from the recipe's inline ``config`` (the trainer builds it)."""
    spec = getattr(recipe, role).model
    if spec.mcore_checkpoint:
        return str(recipe.resolve_path(spec.mcore_checkpoint))
    if spec.hf_path:
        return str(recipe.resolve_path(spec.hf_path))
    return None


def hf_folder(model_dir: str) -> str:
    """The HF export of a training output (``<out>/hf``), or the folder itself if it is HF."""
    p = Path(model_dir)
    return str(p / "hf") if (p / "hf" / "config.json").exists() else str(p)


def _shard_of(items: list, shard: int | None, n: int) -> list:
    from megatron_sz.rollout import shard_slice

    return items if shard is None else shard_slice(items, shard, n)


def _read_shards(ctx: RoundContext, stage: str, n: int, cls=None) -> list:
    out = []
    for p in ctx.rd.shard_paths(ctx.t, stage, n):
        if p.exists():
            out.extend(read_jsonl(p, cls, allow_partial_tail=True))
    return out


def _seed(ctx: RoundContext, *parts) -> int:
    from megatron_sz.inference.base import stable_seed

    return stable_seed(ctx.recipe.seed, ctx.t, *parts)


# --------------------------------------------------------------------------- stages


def prepare(ctx: RoundContext, shard: int | None) -> dict:
    """Seeds, held-out set, warm-up data, tokenizer, initial tiny models, D_0."""
    from megatron_sz.prepare import prepare_run

    return prepare_run(ctx)


def _train(ctx: RoundContext, kind: str, data: Path, init: str | None, out: Path) -> dict:
    """Run one training job in this process (the executors start it fresh); returns marker info."""
    from megatron_sz.train.jobs import run_job

    res = run_job(kind, ctx.recipe, str(data), init, str(out), tokenizer=ctx.tokenizer_path)
    if res.exit_code != 0:
        raise SystemExit(int(res.exit_code))  # 75: preempted after a checkpoint; the rerun resumes
    last = {}
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        for obj in iter_jsonl(metrics, allow_partial_tail=True):
            if "loss" in obj and "step" in obj:
                last = obj
    keep = ("loss", "margin", "accuracy", "chosen_reward", "rejected_reward", "step")
    summary = {k: last[k] for k in keep if k in last}
    summary.update({k: res.summary.get(k) for k in ("total_steps", "wall_s", "eval_start", "eval_end", "train_items")})
    return {"model": str(out), "hf": res.hf_dir, "summary": summary}


def solver_sft(ctx: RoundContext, shard: int | None) -> dict:
    data = ctx.rd.prepare_dir / "sft.jsonl"
    return _train(ctx, "solver-sft", data, initial_model(ctx.rd, ctx.recipe, "solver"), ctx.path("sft"))


def evaluate_warmup(ctx: RoundContext, shard: int | None) -> dict:
    return _evaluate(ctx, ctx.model_after("solver", -1), "eval_sft")


def solver_rollouts(ctx: RoundContext, shard: int | None) -> dict:
    """k samples per active problem from the current solver (one shard)."""
    from megatron_sz.rollout import rollout

    ro = ctx.recipe.solver.rollout
    n = ro.shards
    problems = ctx.problems()
    backend = _solver_backend(ctx, ctx.solver_hf(ctx.t - 1), ro.backend, seed=_seed(ctx, "rollout"))
    try:
        trajs = rollout(problems, backend, k=ro.k, sampling=ro.sampling, template=ro.prompt_template,
                        out_path=ctx.rd.shard_path(ctx.t, "rollout", shard, n), shard=(shard, n),
                        verify=False)
    finally:
        backend.close()
    return {"trajectories": len(trajs)}


def _solver_backend(ctx, model_path: str, spec, *, seed: int):
    from megatron_sz.inference import make_backend

    return make_backend(spec, model_path=model_path, tokenizer_path=ctx.tokenizer_path, seed=seed)


def teacher_verify(ctx: RoundContext, shard: int | None) -> dict:
    """The teacher grades one shard of trajectories (keyed appends: resumable)."""
    from megatron_sz.teacher import make_teacher

    n = ctx.recipe.teacher.shards
    problems = _shard_of(ctx.problems(), shard, n)
    pids = {p.id for p in problems}
    n_roll = ctx.recipe.solver.rollout.shards
    source = ([ctx.rd.shard_path(ctx.t, "rollout", shard, n_roll)] if n_roll == n
              else ctx.rd.shard_paths(ctx.t, "rollout", n_roll))  # aftercorr needs only shard i
    trajs = [tr for p in source for tr in read_jsonl(p, Trajectory, allow_partial_tail=True)
             if tr.problem_id in pids]
    trajs.sort(key=lambda tr: (tr.problem_id, tr.sample_index))
    teacher = make_teacher(ctx.recipe.teacher, seed=_seed(ctx, "verify"))
    key = lambda o: f"{o['problem_id']}#{o['sample_index']}"  # noqa: E731
    by_id = {p.id: p for p in problems}
    counts = {"correct": 0, "incorrect": 0, "undecided": 0}
    with JsonlAppender(ctx.rd.shard_path(ctx.t, "verify", shard, n), key=key) as out:
        todo = [tr for tr in trajs if key(record_to_dict(tr)) not in out.done]
        for i in range(0, len(todo), 64):
            for tr in teacher.verify(by_id, todo[i:i + 64]):
                out.append(tr)
    for tr in read_jsonl(ctx.rd.shard_path(ctx.t, "verify", shard, n), Trajectory):
        counts["undecided" if tr.correct is None else "correct" if tr.correct else "incorrect"] += 1
    teacher.close()
    return counts


def _verdicts(ctx: RoundContext) -> list[Trajectory]:
    return _read_shards(ctx, "verify", ctx.recipe.teacher.shards, Trajectory)


def _outcomes(trajs: list[Trajectory]) -> dict[str, tuple[int, int]]:
    out: dict[str, list[int]] = {}
    for tr in trajs:
        c = out.setdefault(tr.problem_id, [0, 0])
        c[0] += tr.correct is True
        c[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def build_preference_pairs(ctx: RoundContext, shard: int | None) -> dict:
    from megatron_sz.pairs import build_pairs
    from megatron_sz.rollout import solver_prompt

    template = ctx.recipe.solver.rollout.prompt_template
    problems = {p.id: p for p in ctx.problems()}
    pairs, stats = build_pairs(problems, _verdicts(ctx), prompt_fn=lambda p: solver_prompt(p, template))
    write_jsonl(ctx.path("pairs.jsonl"), pairs)
    return stats


def solver_dpo(ctx: RoundContext, shard: int | None) -> dict:
    data = ctx.path("pairs.jsonl")
    init = ctx.model_after("solver", ctx.t - 1)
    if not any(True for _ in iter_jsonl(data)):
        return {"model": None, "skipped": "no preference pairs (every problem solved k/k)"}
    return _train(ctx, "solver-dpo", data, init, ctx.path("dpo"))


def teacher_refine(ctx: RoundContext, shard: int | None) -> dict:
    """Refine failures (learning/too hard) and successes (mastered); self-verify the results."""
    from megatron_sz.curriculum import refinement_id, zone_of
    from megatron_sz.teacher import make_teacher

    rec, cur = ctx.recipe.teacher, ctx.recipe.curriculum
    n = rec.shards
    problems = _shard_of(ctx.problems(), shard, n)
    pids = {p.id for p in problems}
    by_pid: dict[str, list[Trajectory]] = {}
    for tr in _verdicts(ctx):
        if tr.problem_id in pids:
            by_pid.setdefault(tr.problem_id, []).append(tr)
    teacher = make_teacher(rec, seed=_seed(ctx, "refine"))
    counts: dict[str, int] = {}
    key = lambda o: o["key"]  # noqa: E731
    with JsonlAppender(ctx.rd.shard_path(ctx.t, "refine", shard, n), key=key) as out:
        for p in problems:
            samples = sorted(by_pid.get(p.id, []), key=lambda tr: tr.sample_index)
            if not samples:
                continue
            rate = sum(tr.correct is True for tr in samples) / len(samples)
            zone = zone_of(rate, mastered_threshold=cur.mastered_threshold,
                           too_hard_threshold=cur.too_hard_threshold)
            failed = next((tr for tr in samples if tr.correct is False), None)
            succeeded = next((tr for tr in samples if tr.correct is True), None)
            if zone == "too_hard" and f"{p.id}:sv" not in out.done:
                sv = teacher.self_verify(p)
                out.append({"key": f"{p.id}:sv", "kind": "self_verify", "parent_id": p.id, "zone": zone,
                            "keep": sv.keep, "reason": sv.reason})
                counts[f"self_verify.{'keep' if sv.keep else 'retire'}"] = \
                    counts.get(f"self_verify.{'keep' if sv.keep else 'retire'}", 0) + 1
                if not sv.keep:
                    continue
            for j in range(rec.refinements_per_failure):
                k = f"{p.id}:{j}"
                if k in out.done:
                    continue
                o = teacher.refine(p, failed=failed if zone != "mastered" else None,
                                   succeeded=succeeded if zone == "mastered" else None,
                                   zone=zone, round=ctx.t)
                status, reason, q = o.status, o.reason, None
                if o.status == "ok" and o.problem is not None:
                    q = o.problem
                    q.id = refinement_id(p.id, ctx.t, j)
                    q.provenance, q.parent_id, q.round = "teacher", p.id, ctx.t
                    sv = teacher.self_verify(q)
                    if not sv.keep:
                        status, reason = "unverified", sv.reason
                attempt = (failed or succeeded).text if (failed or succeeded) else None
                out.append({"key": k, "kind": "refine", "parent_id": p.id, "zone": zone, "status": status,
                            "reason": reason, "problem": record_to_dict(q) if q else None,
                            "attempt": attempt})
                counts[f"refine.{status}"] = counts.get(f"refine.{status}", 0) + 1
    teacher.close()
    return counts


def _refinements(ctx: RoundContext) -> list[dict]:
    return _read_shards(ctx, "refine", ctx.recipe.teacher.shards)


def _validated(ctx: RoundContext) -> list[Problem]:
    from megatron_sz.data import record_from_dict

    recs = [r for r in _refinements(ctx) if r.get("kind") == "refine" and r.get("status") == "ok"]
    return sorted((record_from_dict(Problem, r["problem"]) for r in recs), key=lambda p: p.id)


def probe_new_problems(ctx: RoundContext, shard: int | None) -> dict:
    """s_q': the updated solver's success rate on each validated refinement (rule-verified)."""
    from megatron_sz.rollout import rollout

    ro = ctx.recipe.solver.rollout
    n = ro.shards
    problems = _validated(ctx)
    if not _shard_of(problems, shard, n):
        ctx.rd.shard_path(ctx.t, "probe", shard, n).parent.mkdir(parents=True, exist_ok=True)
        ctx.rd.shard_path(ctx.t, "probe", shard, n).touch()
        return {"trajectories": 0}
    backend = _solver_backend(ctx, ctx.solver_hf(ctx.t), ro.backend, seed=_seed(ctx, "probe"))
    try:
        trajs = rollout(problems, backend, k=ro.k, sampling=ro.sampling, template=ro.prompt_template,
                        out_path=ctx.rd.shard_path(ctx.t, "probe", shard, n), shard=(shard, n), verify=True)
    finally:
        backend.close()
    return {"trajectories": len(trajs)}


def generator_wsft(ctx: RoundContext, shard: int | None) -> dict:
    from megatron_sz.pairs import build_wsft_examples

    g = ctx.recipe.generator.wsft
    parents = {p.id: p for p in ctx.problems()}
    rates = _outcomes(_read_shards(ctx, "probe", ctx.recipe.solver.rollout.shards, Trajectory))
    recs = [r for r in _refinements(ctx) if r.get("kind") == "refine" and r.get("status") == "ok"]
    examples, stats = build_wsft_examples(recs, parents, rates, mu=g.mu, sigma=g.sigma)
    data = ctx.path("wsft.jsonl")
    write_jsonl(data, examples)
    init = ctx.model_after("generator", ctx.t - 1)
    if not examples:
        return {"model": None, "skipped": "no validated refinements", **stats}
    info = _train(ctx, "generator-wsft", data, init, ctx.path("wsft"))
    info.update(stats)
    return info


def update_curriculum(ctx: RoundContext, shard: int | None) -> dict:
    """D_{t+1} = D_t ∪ validated refinements; zones, retirements, replay selection for t+1."""
    from megatron_sz import curriculum as C

    spec = ctx.recipe.curriculum
    pool = read_jsonl(ctx.path("pool.jsonl"), Problem)
    refs = _refinements(ctx)
    records = [C.RefinementRecord(key=r["key"], parent_id=r["parent_id"], zone=r["zone"], status=r["status"],
                                  problem=Problem(**{k: v for k, v in r["problem"].items()
                                                     if k in Problem.__dataclass_fields__},
                                                  extra={k: v for k, v in r["problem"].items()
                                                         if k not in Problem.__dataclass_fields__})
                                  if r.get("problem") else None, reason=r.get("reason", ""))
               for r in refs if r.get("kind") == "refine"]
    retire = {r["parent_id"]: r["reason"] for r in refs if r.get("kind") == "self_verify" and not r["keep"]}
    new_pool, rep = C.update_curriculum(pool, ctx.t, spec, outcomes=_outcomes(_verdicts(ctx)),
                                        refinements=records, retire=retire,
                                        contamination=contamination_filter(ctx))
    nxt = ctx.rd.round_dir(ctx.t + 1)
    active = C.select_active(new_pool, ctx.t + 1, spec, seed=ctx.recipe.seed)
    write_jsonl(nxt / "pool.jsonl", new_pool)
    write_jsonl(nxt / "active.jsonl", active)
    rep.active_next = len(active)
    return dict(rep.__dict__)


def contamination_filter(ctx: RoundContext):
    from megatron_sz.curriculum import ContaminationFilter

    texts = []
    held = ctx.rd.prepare_dir / "heldout.jsonl"
    if held.exists():
        texts += [p.problem for p in read_jsonl(held, Problem)]
    from megatron_sz.evaluation.contamination import load_problem_texts

    for f in ctx.recipe.curriculum.contamination_files:  # any benchmark layout: JSONL/JSON/Parquet
        texts += load_problem_texts(ctx.recipe.resolve_path(f))
    return ContaminationFilter.from_texts(texts, ctx.recipe.curriculum.contamination_ngram) if texts else None


def evaluate(ctx: RoundContext, shard: int | None) -> dict:
    return _evaluate(ctx, ctx.model_after("solver", ctx.t), "eval")


def _evaluate(ctx: RoundContext, model: str, name: str) -> dict:
    """Held-out accuracy (mean over eval.k samples, rule-verified)."""
    from megatron_sz.rollout import rollout

    ev = ctx.recipe.eval
    held = read_jsonl(ctx.rd.prepare_dir / "heldout.jsonl", Problem)
    backend = _solver_backend(ctx, hf_folder(model), ctx.recipe.solver.rollout.backend,
                              seed=_seed(ctx, name))
    try:
        trajs = rollout(held, backend, k=ev.k, sampling=ev.sampling, template=ctx.recipe.solver.rollout.prompt_template,
                        out_path=ctx.path(f"{name}.jsonl"), shard=(0, 1), verify=True)
    finally:
        backend.close()
    acc = sum(tr.correct is True for tr in trajs) / max(1, len(trajs))
    ctx.log(f"{name}: held-out accuracy {acc:.3f} on {len(held)} problems x {ev.k}")
    return {"accuracy": acc, "n": len(trajs), "model": model}


def report(ctx: RoundContext, shard: int | None) -> dict:
    """Per-round metrics -> rounds/rNNN/metrics.json, RUN/metrics.jsonl (rewritten), plot.png."""
    from megatron_sz.report import write_round_metrics

    return write_round_metrics(ctx)
