"""Socratic-Zero (arXiv 2509.24726): one co-evolution round, as one function over the roles.

``co_evolution_round`` below is the whole algorithm (SYSTEMS.md §1). It runs nothing
itself: it hands each ``Stage`` to a runner, with the files the stage reads and writes
and their record types (``round.Io``). ``round.plan_round`` turns that into a checked
``RoundPlan``, which both executors and ``status`` follow, so the order written here is
the only copy of it. Dependencies are data dependencies, which is what lets SLURM
overlap roles: teacher refinement needs only the verdicts, so it runs on the teacher
partition while the solver's DPO job trains.

Every training input passes ``heldout.for_run`` (warm-up data and D_0 in ``prepare``,
the pairs, the WSFT examples): no role trains on a held-out or benchmark problem, and
each stage records how many it dropped (``heldout_filtered``).
"""
from __future__ import annotations


from megatron_sz.data import (Checkpoint, JsonlAppender, PreferencePair, Problem, Refinement, SelfVerification,
                              Trajectory, Verdict, WeightedExample, iter_jsonl, read_jsonl, record_to_dict,
                              write_jsonl)
from megatron_sz.round import Io, RoundContext, Stage, hf_folder, initial_model

NAME = "socratic-zero"
SUMMARY = "solver (online DPO) x frozen teacher (grade, refine) x generator (value-weighted SFT), from 100 seeds"
DEFAULT_RECIPE = "recipes/local-tiny.yaml"
ROLES = ("solver", "teacher", "generator")

# `megatron-sz ablate`: named variants as recipe overrides (dotted keys), and the training
# sections whose per-round step budget the ablation fixes so every variant trains the
# solver for the same optimizer steps (equal compute; megatron_sz/ablation.py).
ABLATIONS = {
    "full": {},
    "static": {"curriculum.mode": "static"},
    "sft-only-rounds": {"solver.round_objective": "sft"},
    "no-warmup": {"warmup.enabled": False},
    "linear-weights": {"generator.wsft.weighting": "linear"},
    "no-replay": {"curriculum.replay_ratio": 0.0},
}
ABLATION_BUDGET = ("solver.dpo",)  # static and sft-only rounds train with this section's budget too

# The contracts: record files between stages (scope "run" = RUN_DIR/prepare).
ACTIVE = Io("active.jsonl", Problem)
HELDOUT = Io("heldout.jsonl", Problem, scope="run")
ROLLOUTS = Io("rollout", Trajectory, sharded=True)
VERDICTS = Io("verify", Verdict, sharded=True)
REFINEMENTS = Io("refine", (Refinement, SelfVerification), sharded=True)
PROBES = Io("probe", Verdict, sharded=True)


def co_evolution_round(t: int, run, recipe) -> None:
    """Round t of Socratic-Zero: the roles in the paper's order."""
    S, T, G = recipe.solver, recipe.teacher, recipe.generator
    solver_in = Io("sft", Checkpoint) if t == 0 else Io("dpo", Checkpoint, scope="prev")
    if t == 0:  # seeds, held-out set, warm-up data, tokenizer, D_0; SFT warm-up; its accuracy
        run(Stage("prepare", prepare, "solver", writes=(
            Io("seeds.jsonl", Problem, scope="run"), HELDOUT, Io("sft.jsonl", WeightedExample, scope="run"),
            Io("pool.jsonl", Problem), ACTIVE)))
        run(Stage("sft", solver_sft, "solver", "training", world_size=S.parallel.world_size, job="solver-sft",
                  reads=(Io("sft.jsonl", WeightedExample, scope="run"),), writes=(Io("sft", Checkpoint),)))
        run(Stage("eval_sft", evaluate_warmup, "solver", "inference",
                  reads=(HELDOUT, Io("sft", Checkpoint)), writes=(Io("eval_sft.jsonl", Verdict),)))
    if recipe.curriculum.mode == "static":
        return static_round(t, run, recipe, solver_in)
    run(Stage("rollout", solver_rollouts, "solver", "inference", shards=S.rollout.shards,
              after=("sft",) if t == 0 else ("prev:curriculum", "prev:dpo"),
              reads=(ACTIVE, solver_in), writes=(ROLLOUTS,)))
    run(Stage("verify", teacher_verify, "teacher", "inference", shards=T.shards, after=("rollout",),
              reads=(ACTIVE, Io("rollout", Trajectory, sharded=True, per_shard=True)), writes=(VERDICTS,)))
    run(Stage("pairs", build_preference_pairs, "solver", after=("verify",),
              reads=(ACTIVE, VERDICTS, HELDOUT), writes=(Io("pairs.jsonl", PreferencePair),)))
    run(Stage("dpo", solver_dpo, "solver", "training", after=("pairs",), world_size=S.parallel.world_size,
              job="solver-dpo",
              reads=(Io("pairs.jsonl", PreferencePair), solver_in), writes=(Io("dpo", Checkpoint),)))
    run(Stage("refine", teacher_refine, "teacher", "inference", shards=T.shards, after=("verify",),
              reads=(ACTIVE, VERDICTS), writes=(REFINEMENTS,)))
    run(Stage("probe", probe_new_problems, "solver", "inference", shards=S.rollout.shards, after=("dpo", "refine"),
              reads=(REFINEMENTS, Io("dpo", Checkpoint)), writes=(PROBES,)))
    if G.enabled:
        run(Stage("wsft", generator_wsft, "generator", "training", after=("probe", "prev:wsft"), job="generator-wsft",
                  world_size=G.parallel.world_size,
                  reads=(ACTIVE, REFINEMENTS, PROBES, HELDOUT, Io("wsft", Checkpoint, scope="prev", optional=True)),
                  writes=(Io("wsft.jsonl", WeightedExample), Io("wsft", Checkpoint))))
    run(Stage("curriculum", update_curriculum, "solver", after=("refine",),
              reads=(Io("pool.jsonl", Problem), VERDICTS, REFINEMENTS, HELDOUT),
              writes=(Io("pool.jsonl", Problem, scope="next"), Io("active.jsonl", Problem, scope="next"))))
    if recipe.eval.enabled:
        run(Stage("eval", evaluate, "solver", "inference", after=("dpo",),
                  reads=(HELDOUT, Io("dpo", Checkpoint)), writes=(Io("eval.jsonl", Verdict),)))
    run(Stage("report", report, "solver", after=("curriculum", "eval", "wsft", "probe", "prev:report")))


def static_round(t: int, run, recipe, solver_in: Io) -> None:
    """``curriculum.mode: static``, the paper's static-augmentation control: round 0's teacher
    writes every problem up front from the seeds alone (no solver feedback), and each round's
    solver update (stage ``dpo``, so the chain of models is the same) is SFT on their
    reference solutions with the round's step budget (``round_sft_recipe``)."""
    STATIC = Io("static.jsonl", Problem, scope="run")
    if t == 0:
        run(Stage("static", static_problems, "teacher", "inference", after=("prepare",),
                  reads=(Io("seeds.jsonl", Problem, scope="run"), HELDOUT), writes=(STATIC,)))
    run(Stage("dpo", static_sft, "solver", "training", world_size=recipe.solver.parallel.world_size,
              after=("static", "sft") if t == 0 else ("prev:dpo",), reads=(STATIC, solver_in),
              writes=(Io("dpo", Checkpoint),)))
    if recipe.eval.enabled:
        run(Stage("eval", evaluate, "solver", "inference", after=("dpo",),
                  reads=(HELDOUT, Io("dpo", Checkpoint)), writes=(Io("eval.jsonl", Verdict),)))
    run(Stage("report", report, "solver", after=("eval", "dpo", "prev:report")))


# --------------------------------------------------------------------------- models


def model_after(ctx: RoundContext, role: str, t: int) -> str | None:
    """Training output (checkpoint folder) of ``role`` after round t; t = -1: its start."""
    if role == "solver":
        return ctx.latest_model(t, "dpo", first="sft", role="solver")
    return ctx.latest_model(t, "wsft", first=None, role=role)


def _solver_backend(ctx: RoundContext, model_path: str, spec, *, seed: int):
    from megatron_sz.inference import make_backend

    return make_backend(spec, model_path=model_path, tokenizer_path=ctx.tokenizer_path, seed=seed)


def _shard_of(items: list, shard: int | None, n: int) -> list:
    from megatron_sz.rollout import shard_slice

    return items if shard is None else shard_slice(items, shard, n)


def _outcomes(trajs: list[Trajectory]) -> dict[str, tuple[int, int]]:
    out: dict[str, list[int]] = {}
    for tr in trajs:
        c = out.setdefault(tr.problem_id, [0, 0])
        c[0] += tr.correct is True
        c[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


# --------------------------------------------------------------------------- stages


def prepare(ctx: RoundContext, shard: int | None) -> dict:
    """Seeds, held-out set, warm-up data, tokenizer, initial tiny models, D_0."""
    from megatron_sz.prepare import prepare_run

    return prepare_run(ctx)


def solver_sft(ctx: RoundContext, shard: int | None) -> dict:
    data = ctx.rd.prepare_dir / "sft.jsonl"
    init = initial_model(ctx.rd, ctx.recipe, "solver")
    if ctx.recipe.warmup.enabled:
        return ctx.train("solver-sft", data, init, ctx.path("sft"))
    # No warm-up: the initial weights, exported through the trainer by one step at lr 0
    # (AdamW with lr 0 changes nothing; the accounting counts only steps with lr > 0).
    import copy

    r = copy.deepcopy(ctx.recipe)
    r.solver.sft.optim.lr = r.solver.sft.optim.min_lr = 0.0
    r.solver.sft.optim.warmup_steps = 0
    info = ctx.train("solver-sft", data, init, ctx.path("sft"), recipe=r, max_steps=1)
    return {**info, "warmup": "disabled (initial weights, one step at lr 0)"}


def evaluate_warmup(ctx: RoundContext, shard: int | None) -> dict:
    return _evaluate(ctx, model_after(ctx, "solver", -1), "eval_sft")


def solver_rollouts(ctx: RoundContext, shard: int | None) -> dict:
    """k samples per active problem from the current solver (one shard)."""
    from megatron_sz.rollout import rollout

    ro = ctx.recipe.solver.rollout
    backend = _solver_backend(ctx, hf_folder(model_after(ctx, "solver", ctx.t - 1)), ro.backend,
                              seed=ctx.seed("rollout"))
    try:
        trajs = rollout(ctx.read("active.jsonl"), backend, k=ro.k, sampling=ro.sampling,
                        template=ro.prompt_template, out_path=ctx.output("rollout", shard),
                        shard=(shard, ro.shards), verify=False)
    finally:
        backend.close()
    return {"trajectories": len(trajs)}


def teacher_verify(ctx: RoundContext, shard: int | None) -> dict:
    """The teacher grades one shard of trajectories (keyed appends: resumable)."""
    from megatron_sz.teacher import make_teacher

    problems = _shard_of(ctx.read("active.jsonl"), shard, ctx.stage.shards)
    by_id = {p.id: p for p in problems}
    trajs = [tr for tr in ctx.read("rollout", shard) if tr.problem_id in by_id]  # aftercorr: shard i only
    trajs.sort(key=lambda tr: (tr.problem_id, tr.sample_index))
    teacher = make_teacher(ctx.recipe.teacher, seed=ctx.seed("verify"))
    key = lambda o: f"{o['problem_id']}#{o['sample_index']}"  # noqa: E731
    out_path = ctx.output("verify", shard)
    with JsonlAppender(out_path, key=key) as out:
        todo = [tr for tr in trajs if key(record_to_dict(tr)) not in out.done]
        for i in range(0, len(todo), 64):
            for tr in teacher.verify(by_id, todo[i:i + 64]):
                out.append(tr)
    teacher.close()
    counts = {"correct": 0, "incorrect": 0, "undecided": 0}
    for tr in read_jsonl(out_path, Verdict):
        counts["undecided" if tr.correct is None else "correct" if tr.correct else "incorrect"] += 1
    return counts


def build_preference_pairs(ctx: RoundContext, shard: int | None) -> dict:
    from megatron_sz.pairs import build_pairs
    from megatron_sz.rollout import solver_prompt

    template = ctx.recipe.solver.rollout.prompt_template
    problems, dropped = ctx.heldout().filter(ctx.read("active.jsonl"), lambda p: (p.problem,))
    pairs, stats = build_pairs({p.id: p for p in problems}, ctx.read("verify"),
                               prompt_fn=lambda p: solver_prompt(p, template))
    write_jsonl(ctx.output("pairs.jsonl"), pairs)
    return {**stats, "heldout_filtered": dropped}


def solver_dpo(ctx: RoundContext, shard: int | None) -> dict:
    data = ctx.path("pairs.jsonl")
    init = model_after(ctx, "solver", ctx.t - 1)
    if not any(True for _ in iter_jsonl(data)):
        return {"model": None, "skipped": "no preference pairs (every problem solved k/k)"}
    if ctx.recipe.solver.round_objective == "sft":  # ablation: SFT on the winners, same budget
        seen: set[tuple[str, str]] = set()
        winners = []
        for o in iter_jsonl(data):
            if (o["prompt"], o["chosen"]) not in seen:
                seen.add((o["prompt"], o["chosen"]))
                winners.append(WeightedExample(prompt=o["prompt"], target=o["chosen"], weight=1.0,
                                               problem_id=o.get("problem_id")))
        sft_data = ctx.path("dpo_sft.jsonl")
        write_jsonl(sft_data, winners)
        info = ctx.train("solver-sft", sft_data, init, ctx.path("dpo"), recipe=round_sft_recipe(ctx.recipe))
        return {**info, "objective": "sft", "winners": len(winners)}
    return ctx.train("solver-dpo", data, init, ctx.path("dpo"))


def round_sft_recipe(recipe):
    """The recipe with ``solver.sft`` replaced by the round's SFT update: the dpo section's
    batching, steps and optimizer, with twice the batch (a pair is two sequences), so an SFT
    round trains as many sequences per optimizer step as a DPO round."""
    import copy
    import dataclasses

    from megatron_sz.recipe import SFTSpec, TrainSpec

    r = copy.deepcopy(recipe)
    d = r.solver.dpo
    fields = {f.name: getattr(d, f.name) for f in dataclasses.fields(TrainSpec)}
    fields.update(micro_batch_size=2 * d.micro_batch_size, global_batch_size=2 * d.global_batch_size)
    r.solver.sft = SFTSpec(**fields)
    return r


def static_problems(ctx: RoundContext, shard: int | None) -> dict:
    """Static augmentation: for every round and seed, ``refinements_per_failure`` teacher
    rewrites of the seed in the learning zone (what co-evolution's teacher writes per round,
    without the solver's attempts), self-verified, de-duplicated, held-out ones dropped."""
    from megatron_sz.curriculum import refinement_id
    from megatron_sz.teacher import make_teacher

    rec = ctx.recipe.teacher
    seeds = ctx.read("seeds.jsonl")
    teacher = make_teacher(rec, seed=ctx.seed("static"))
    out, texts, counts = [], {p.problem.strip() for p in seeds}, {"ok": 0, "duplicate": 0, "unverified": 0,
                                                                  "failed": 0}
    for r in range(max(1, ctx.recipe.rounds)):
        for p in seeds:
            for j in range(rec.refinements_per_failure):
                o = teacher.refine(p, zone="learning", round=r, variant=j)
                if o.status != "ok" or o.problem is None:
                    counts["failed"] += 1
                    continue
                q = o.problem
                q.id = refinement_id(p.id, r, j)
                q.provenance, q.parent_id, q.round = "teacher", p.id, r
                if q.problem.strip() in texts:
                    counts["duplicate"] += 1
                    continue
                if not teacher.self_verify(q).keep:
                    counts["unverified"] += 1
                    continue
                texts.add(q.problem.strip())
                out.append(q)
                counts["ok"] += 1
    teacher.close()
    problems, dropped = ctx.heldout().filter(list(seeds) + out, lambda q: (q.problem,))
    write_jsonl(ctx.output("static.jsonl"), problems)
    return {**counts, "problems": len(problems), "seeds": len(seeds), "heldout_filtered": dropped}


def static_sft(ctx: RoundContext, shard: int | None) -> dict:
    """Round t's solver update in static mode: SFT on the static problems' reference solutions."""
    from megatron_sz.pairs import reference_text
    from megatron_sz.rollout import solver_prompt

    tmpl = ctx.recipe.solver.rollout.prompt_template
    examples = [WeightedExample(prompt=solver_prompt(p, tmpl), target=reference_text(p), weight=1.0, problem_id=p.id)
                for p in ctx.read("static.jsonl")]
    data = ctx.path("static_sft.jsonl")
    write_jsonl(data, examples)
    init = model_after(ctx, "solver", ctx.t - 1)
    info = ctx.train("solver-sft", data, init, ctx.path("dpo"), recipe=round_sft_recipe(ctx.recipe))
    return {**info, "objective": "sft", "examples": len(examples)}


def teacher_refine(ctx: RoundContext, shard: int | None) -> dict:
    """Refine failures (learning/too hard) and successes (mastered); self-verify the results."""
    from megatron_sz.curriculum import refinement_id, zone_of
    from megatron_sz.teacher import make_teacher

    rec, cur = ctx.recipe.teacher, ctx.recipe.curriculum
    problems = _shard_of(ctx.read("active.jsonl"), shard, ctx.stage.shards)
    pids = {p.id for p in problems}
    by_pid: dict[str, list[Verdict]] = {}
    for tr in ctx.read("verify"):
        if tr.problem_id in pids:
            by_pid.setdefault(tr.problem_id, []).append(tr)
    teacher = make_teacher(rec, seed=ctx.seed("refine"))
    counts: dict[str, int] = {}

    def count(name: str) -> None:
        counts[name] = counts.get(name, 0) + 1

    with JsonlAppender(ctx.output("refine", shard), key=lambda o: o["key"]) as out:
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
                out.append(SelfVerification(key=f"{p.id}:sv", parent_id=p.id, zone=zone, keep=sv.keep,
                                            reason=sv.reason))
                count(f"self_verify.{'keep' if sv.keep else 'retire'}")
                if not sv.keep:
                    continue
            for j in range(rec.refinements_per_failure):
                k = f"{p.id}:{j}"
                if k in out.done:
                    continue
                o = teacher.refine(p, failed=failed if zone != "mastered" else None,
                                   succeeded=succeeded if zone == "mastered" else None, zone=zone, round=ctx.t)
                status, reason, q = o.status, o.reason, None
                if o.status == "ok" and o.problem is not None:
                    q = o.problem
                    q.id = refinement_id(p.id, ctx.t, j)
                    q.provenance, q.parent_id, q.round = "teacher", p.id, ctx.t
                    sv = teacher.self_verify(q)
                    if not sv.keep:
                        status, reason = "unverified", sv.reason  # kept in the record for inspection
                src = failed or succeeded
                out.append(Refinement(key=k, parent_id=p.id, zone=zone, status=status, reason=reason, problem=q,
                                      attempt=src.text if src else None))
                count(f"refine.{status}")
    teacher.close()
    return counts


def _validated(ctx: RoundContext) -> list[Refinement]:
    return sorted((r for r in ctx.read("refine") if isinstance(r, Refinement) and r.status == "ok"),
                  key=lambda r: r.problem.id)


def probe_new_problems(ctx: RoundContext, shard: int | None) -> dict:
    """s_q': the updated solver's success rate on each validated refinement (rule-verified)."""
    from megatron_sz.rollout import rollout

    ro = ctx.recipe.solver.rollout
    problems = [r.problem for r in _validated(ctx)]
    out_path = ctx.output("probe", shard)
    if not _shard_of(problems, shard, ro.shards):
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.touch()
        return {"trajectories": 0}
    backend = _solver_backend(ctx, hf_folder(model_after(ctx, "solver", ctx.t)), ro.backend, seed=ctx.seed("probe"))
    try:
        trajs = rollout(problems, backend, k=ro.k, sampling=ro.sampling, template=ro.prompt_template,
                        out_path=out_path, shard=(shard, ro.shards), verify=True)
    finally:
        backend.close()
    return {"trajectories": len(trajs)}


def generator_wsft(ctx: RoundContext, shard: int | None) -> dict:
    examples, stats = wsft_examples(ctx)
    data = ctx.output("wsft.jsonl")
    write_jsonl(data, examples)
    init = model_after(ctx, "generator", ctx.t - 1)
    if not examples:
        return {"model": None, "skipped": "no validated refinements", **stats}
    info = ctx.train("generator-wsft", data, init, ctx.path("wsft"))
    info.update(stats)
    return info


def wsft_examples(ctx: RoundContext) -> tuple[list[WeightedExample], dict]:
    """The generator's examples: validated refinements weighted by U(s_q'), minus held-out ones."""
    from megatron_sz.pairs import build_wsft_examples

    g = ctx.recipe.generator.wsft
    parents = {p.id: p for p in ctx.read("active.jsonl")}
    rates = _outcomes(ctx.read("probe"))
    # The held-out rule: neither the new problem (the target) nor its parent may be held out.
    recs, dropped = ctx.heldout().filter(
        _validated(ctx), lambda r: (r.problem.problem, parents[r.parent_id].problem if r.parent_id in parents else ""))
    examples, stats = build_wsft_examples(recs, parents, rates, mu=g.mu, sigma=g.sigma, weighting=g.weighting)
    stats["heldout_filtered"] = dropped
    return examples, stats


def update_curriculum(ctx: RoundContext, shard: int | None) -> dict:
    """D_{t+1} = D_t ∪ validated refinements; zones, retirements, replay selection for t+1."""
    from megatron_sz import curriculum as C

    spec = ctx.recipe.curriculum
    refs = ctx.read("refine")
    retire = {r.parent_id: r.reason for r in refs if isinstance(r, SelfVerification) and not r.keep}
    new_pool, rep = C.update_curriculum(ctx.read("pool.jsonl"), ctx.t, spec, outcomes=_outcomes(ctx.read("verify")),
                                        refinements=[r for r in refs if isinstance(r, Refinement)], retire=retire,
                                        contamination=ctx.heldout() or None)
    active = C.select_active(new_pool, ctx.t + 1, spec, seed=ctx.recipe.seed)
    write_jsonl(ctx.output("active.jsonl"), active)
    write_jsonl(ctx.output("pool.jsonl"), new_pool)
    rep.active_next = len(active)
    return dict(rep.__dict__)


def evaluate(ctx: RoundContext, shard: int | None) -> dict:
    return _evaluate(ctx, model_after(ctx, "solver", ctx.t), "eval")


def _evaluate(ctx: RoundContext, model: str, name: str) -> dict:
    """Held-out accuracy (mean over eval.k samples, rule-verified)."""
    from megatron_sz.rollout import rollout

    ev = ctx.recipe.eval
    held = ctx.read("heldout.jsonl")
    backend = _solver_backend(ctx, hf_folder(model), ctx.recipe.solver.rollout.backend, seed=ctx.seed(name))
    try:
        trajs = rollout(held, backend, k=ev.k, sampling=ev.sampling, template=ctx.recipe.solver.rollout.prompt_template,
                        out_path=ctx.output(f"{name}.jsonl"), shard=(0, 1), verify=True)
    finally:
        backend.close()
    acc = sum(tr.correct is True for tr in trajs) / max(1, len(trajs))
    ctx.log(f"{name}: held-out accuracy {acc:.3f} on {len(held)} problems x {ev.k}")
    return {"accuracy": acc, "n": len(trajs), "model": model}


def finish(rd) -> str | None:
    """A finished run's summary (metrics.jsonl, plot.png) must match its per-round records."""
    from megatron_sz.report import check_and_repair

    return check_and_repair(rd)


def report(ctx: RoundContext, shard: int | None) -> dict:
    """Per-round metrics -> rounds/rNNN/metrics.json, RUN/metrics.jsonl (rewritten), plot.png."""
    from megatron_sz.report import write_round_metrics

    return write_round_metrics(ctx)
