"""Absolute Zero (arXiv 2505.03335): one round, as one function over the stages.

One model in two roles. The *proposer* writes deduction, abduction and induction tasks
conditioned on K references sampled from that type's buffer; the sandbox validates them
and computes their outputs (never the model); the *solver* solves every valid task n
times, which gives the proposer its learnability reward, and solves a batch drawn from
the buffers; the sandbox scores the answers; both roles train together with TRR++ (six
baselines: task type x role) through the ``policy-gradient`` job. Task logic (prompts,
parsing, checks, rewards, templates) is ``absolute_zero_tasks``; this module is the
stage graph and the stages' file I/O.

Stages SLURM can parallelise: validate and score are sandbox arrays (CPU only), solve is
an inference array, and score shard i waits only for solve shard i. Every sharded or
incremental output is a keyed append (``JsonlAppender``): a killed stage redoes only the
records it had not written, so no task or rollout is lost or duplicated.

Every training input passes the held-out rule (``heldout.HeldoutFilter`` over the run's
held-out triplets and the recipe's ``curriculum.contamination_files``): the warm-up corpus
and the rollouts of tasks that copy a held-out triplet are dropped and counted.
"""
from __future__ import annotations

import json
import random
from collections import Counter, defaultdict

from megatron_sz.data import (AzrProposal, AzrTask, AzrValidation, Checkpoint, JsonlAppender, ScoredRollout,
                              Trajectory, Verdict, WeightedExample, atomic_write_json, atomic_write_text,
                              iter_jsonl, read_jsonl, record_to_dict, write_jsonl)
from megatron_sz.round import Io, RoundContext, Stage, hf_folder, initial_model
from megatron_sz.systems import absolute_zero_tasks as T

NAME = "absolute-zero"
SUMMARY = "one model proposes and solves code tasks (deduction/abduction/induction) checked in the sandbox; TRR++"
DEFAULT_RECIPE = "recipes/azr-tiny.yaml"
ROLES = ("solver",)

HELDOUT = Io("azr-heldout.jsonl", AzrTask, scope="run")
SFT_DATA = Io("azr-sft.jsonl", WeightedExample, scope="run")
PROPOSALS = Io("propose.jsonl", AzrProposal)
VALIDATIONS = Io("validate", AzrValidation, sharded=True)
SOLVES = Io("solve", Trajectory, sharded=True)
SCORES = Io("score", Verdict, sharded=True)
ROLLOUTS = Io("rollouts.jsonl", ScoredRollout)


def buffers_io(scope: str = "round") -> tuple[Io, ...]:
    return tuple(Io(f"buffer-{tt}.jsonl", AzrTask, scope=scope) for tt in T.TASK_TYPES)


def self_play_round(t: int, run, recipe) -> None:
    """Round t of Absolute Zero: propose -> validate -> solve -> score -> rewards -> train."""
    A, S = recipe.azr, recipe.solver
    warm = t == 0 and A.warmup_programs > 0
    model_in = ((Io("sft", Checkpoint),) if warm else ()) if t == 0 else (Io("train", Checkpoint, scope="prev"),)
    if t == 0:
        run(Stage("prepare", prepare, "solver", writes=(HELDOUT, SFT_DATA, *buffers_io())))
        if warm:
            run(Stage("sft", warmup_sft, "solver", "training", world_size=S.parallel.world_size, job="solver-sft",
                      reads=(SFT_DATA,), writes=(Io("sft", Checkpoint),)))
        run(Stage("eval_sft", evaluate_warmup, "solver", "inference", reads=(HELDOUT, *model_in),
                  writes=(Io("eval_sft.jsonl", Verdict),)))
    start = ("sft",) if warm else ("prepare",) if t == 0 else ("prev:train", "prev:buffer")
    run(Stage("propose", propose, "solver", "inference", after=start, reads=(*buffers_io(), *model_in),
              writes=(PROPOSALS,)))
    run(Stage("validate", validate, "solver", "sandbox", shards=A.validate_shards, after=("propose",),
              reads=(PROPOSALS,), writes=(VALIDATIONS,)))
    run(Stage("solve", solve, "solver", "inference", shards=S.rollout.shards, after=("validate",),
              reads=(VALIDATIONS, *buffers_io(), *model_in), writes=(SOLVES,)))
    run(Stage("score", score, "solver", "sandbox", shards=S.rollout.shards, after=("solve",),
              reads=(VALIDATIONS, *buffers_io(), Io("solve", Trajectory, sharded=True, per_shard=True)),
              writes=(SCORES,)))
    run(Stage("rewards", rewards, "solver", after=("score",),
              reads=(PROPOSALS, VALIDATIONS, *buffers_io(), SCORES, HELDOUT), writes=(ROLLOUTS,)))
    run(Stage("train", train, "solver", "training", after=("rewards",), world_size=S.parallel.world_size,
              job="policy-gradient",
              reads=(ROLLOUTS, *model_in), writes=(Io("train", Checkpoint),)))
    run(Stage("buffer", update_buffers, "solver", after=("validate",),
              reads=(*buffers_io(), VALIDATIONS, HELDOUT), writes=buffers_io("next")))
    run(Stage("eval", evaluate, "solver", "inference", after=("train",),
              reads=(HELDOUT, Io("train", Checkpoint)), writes=(Io("eval.jsonl", Verdict),)))
    run(Stage("report", report, "solver", after=("rewards", "buffer", "eval", "prev:report")))


# --------------------------------------------------------------------------- helpers


def model_after(ctx: RoundContext, t: int) -> str | None:
    """The model after round t (t = -1: its start: the warm-up's, else the recipe's)."""
    return ctx.latest_model(t, "train", first="sft", role="solver")


def _backend(ctx: RoundContext, model: str | None, name: str):
    from megatron_sz.errors import UserError
    from megatron_sz.inference import make_backend

    spec = ctx.recipe.solver.rollout.backend
    if model is None and spec.kind == "local":
        raise UserError("absolute-zero: no model to sample from", where="solver.model",
                        fix="set solver.model.hf_path, or azr.warmup_programs > 0 to warm a random model up")
    return make_backend(spec, model_path=hf_folder(model) if model else None, tokenizer_path=ctx.tokenizer_path,
                        seed=ctx.seed(name))


def _shard_of(items: list, shard: int | None, n: int) -> list:
    from megatron_sz.rollout import shard_slice

    return items if shard is None else shard_slice(items, shard, n)


def _buffers(ctx: RoundContext) -> dict[str, list[AzrTask]]:
    return {tt: ctx.read(f"buffer-{tt}.jsonl") for tt in T.TASK_TYPES}


def _heldout(ctx: RoundContext):
    """The held-out rule of this run: its held-out triplets plus any benchmark files."""
    from megatron_sz.evaluation.contamination import load_problem_texts
    from megatron_sz.heldout import HeldoutFilter

    if "heldout" not in ctx.cache:
        held = read_jsonl(ctx.rd.prepare_dir / HELDOUT.path, AzrTask)
        texts = [T.task_text(h) for h in held]
        for f in ctx.recipe.curriculum.contamination_files:
            texts += load_problem_texts(ctx.recipe.resolve_path(f))
        ctx.cache["heldout"] = HeldoutFilter(texts, ngram=ctx.recipe.curriculum.contamination_ngram)
    return ctx.cache["heldout"]


def _generate(ctx: RoundContext, backend, requests: list, on_result) -> None:
    if requests:
        backend.generate(requests, progress=False, on_result=on_result)


def _request(rid: str, prompt: str, n: int, sampling):
    from megatron_sz.inference import GenerationRequest

    return GenerationRequest(id=rid, prompt=prompt, n=n, sampling=sampling)


# --------------------------------------------------------------------------- round 0


def prepare(ctx: RoundContext, shard: int | None) -> dict:
    """Held-out triplets, the warm-up corpus, a tokenizer, and the seed buffers (zero triplet
    or ``azr.seed_file``), every output computed in the sandbox. Each step is skipped when
    its file exists (resumable); the buffers are written last."""
    from megatron_sz.systems.absolute_zero_corpus import build_corpus, seed_buffers

    return {**build_corpus(ctx, _heldout), **seed_buffers(ctx)}


def warmup_sft(ctx: RoundContext, shard: int | None) -> dict:
    return ctx.train("solver-sft", ctx.rd.prepare_dir / SFT_DATA.path, initial_model(ctx.rd, ctx.recipe, "solver"),
                     ctx.path("sft"))


def evaluate_warmup(ctx: RoundContext, shard: int | None) -> dict:
    return _evaluate(ctx, model_after(ctx, -1), "eval_sft")


# --------------------------------------------------------------------------- propose -> validate


def propose(ctx: RoundContext, shard: int | None) -> dict:
    """``azr.proposals`` proposer samples per task type, each on K references from its buffer
    (induction: on one deduction/abduction program). Keyed appends: a rerun adds the rest."""
    A = ctx.recipe.azr
    buffers = _buffers(ctx)
    programs = buffers["deduction"] + buffers["abduction"]
    prompts: dict[str, tuple[str, str, list[str]]] = {}
    for tt in A.task_types:
        for j in range(A.proposals):
            rng = random.Random(ctx.seed("refs", tt, j))
            refs = T.sample_references(programs, 1, rng) if tt == "induction" else \
                T.sample_references(buffers[tt], A.references, rng)
            prompts[f"{tt}:{j}"] = (tt, T.propose_prompt(tt, refs), refs)
    out_path = ctx.output("propose.jsonl")
    with JsonlAppender(out_path, key=lambda o: o["key"]) as out:
        todo = [k for k in prompts if k not in out.done]
        if todo:
            backend = _backend(ctx, model_after(ctx, ctx.t - 1), "propose")

            def on_result(res) -> None:
                tt, prompt, refs = prompts[res.id]
                if not res.ok or not res.texts:
                    return  # failed for good: the rerun tries it again
                text = res.texts[0]
                parsed = T.parse_proposal(tt, text)
                if tt == "induction":
                    parsed["program"] = refs[0].program
                out.append(AzrProposal(key=res.id, task_type=tt, prompt=prompt, completion=text,
                                       references=[r.id for r in refs], round=ctx.t, **parsed))
            try:
                ctx.log(f"propose: {len(todo)} proposals ({len(prompts) - len(todo)} already written)")
                _generate(ctx, backend, [_request(k, prompts[k][1], 1, A.propose_sampling) for k in todo], on_result)
            finally:
                backend.close()
    n = sum(1 for _ in iter_jsonl(out_path))
    return {"proposals": n}


def validate(ctx: RoundContext, shard: int | None) -> dict:
    """One shard of proposals through the sandbox: parse, policy, time limit, determinism."""
    props = sorted(ctx.read("propose.jsonl"), key=lambda p: p.key)
    mine = _shard_of(props, shard, ctx.stage.shards)
    out_path = ctx.output("validate", shard)
    with JsonlAppender(out_path, key=lambda o: o["key"]) as out:
        todo = [p for p in mine if p.key not in out.done]
        for i in range(0, len(todo), 32):
            for v in T.validate_proposals(todo[i:i + 32], ctx.recipe.azr, round=ctx.t):
                out.append(v)
    counts = Counter(v.status for v in read_jsonl(out_path, AzrValidation))
    ctx.log(f"validate shard {shard}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return {f"status.{k}": v for k, v in counts.items()}


# --------------------------------------------------------------------------- solve -> score


def _valid_tasks(ctx: RoundContext) -> list[AzrTask]:
    return sorted((v.task for v in ctx.read("validate") if v.status == "valid"), key=lambda x: x.id)


def solve_tasks(ctx: RoundContext) -> list[tuple[AzrTask, bool]]:
    """What the solver solves this round, in a fixed order: (task, is a new proposal).
    Every valid proposal (its n solves give the learnability), then ``azr.solver_batch``
    tasks per type from the buffers."""
    A = ctx.recipe.azr
    out = [(task, True) for task in _valid_tasks(ctx)]
    buffers = _buffers(ctx)
    for tt in A.task_types:
        rng = random.Random(ctx.seed("solver-batch", tt))
        out += [(task, False) for task in T.sample_references(buffers[tt], A.solver_batch, rng)]
    return out


def _solve_id(task: AzrTask, new: bool) -> str:
    return task.id if new else f"buf:{task.id}"


def solve(ctx: RoundContext, shard: int | None) -> dict:
    """n solver samples per task of this shard (keyed appends per sample)."""
    A = ctx.recipe.azr
    mine = _shard_of(solve_tasks(ctx), shard, ctx.stage.shards)
    out_path = ctx.output("solve", shard)
    key = lambda o: f"{o['problem_id']}#{o['sample_index']}"  # noqa: E731
    with JsonlAppender(out_path, key=key) as out:
        todo = [(task, new) for task, new in mine
                if any(f"{_solve_id(task, new)}#{j}" not in out.done for j in range(A.solves))]
        by_id = {_solve_id(task, new): task for task, new in todo}
        if todo:
            backend = _backend(ctx, model_after(ctx, ctx.t - 1), "solve")

            def on_result(res) -> None:
                if not res.ok:
                    return
                task = by_id[res.id]
                for j, text in enumerate(res.texts):
                    out.append(Trajectory(problem_id=res.id, sample_index=j, text=text,
                                          extracted_answer=T.answer_of(text),
                                          extra={"task_type": task.task_type, "finish": res.finish_reasons[j]}))
            try:
                ctx.log(f"solve shard {shard}: {len(todo)} tasks x {A.solves}")
                _generate(ctx, backend, [_request(i, T.solve_prompt(t), A.solves, A.solve_sampling)
                                         for i, t in by_id.items()], on_result)
            finally:
                backend.close()
    return {"samples": sum(1 for _ in iter_jsonl(out_path))}


def score(ctx: RoundContext, shard: int | None) -> dict:
    """The sandbox decides every answer of solve shard i: correct / wrong / malformed."""
    tasks = {_solve_id(task, new): task for task, new in solve_tasks(ctx)}
    trajs = sorted(ctx.read("solve", shard), key=lambda tr: (tr.problem_id, tr.sample_index))
    out_path = ctx.output("score", shard)
    key = lambda o: f"{o['problem_id']}#{o['sample_index']}"  # noqa: E731
    with JsonlAppender(out_path, key=key) as out:
        todo = [tr for tr in trajs if key(record_to_dict(tr)) not in out.done]
        for i in range(0, len(todo), 64):
            batch = todo[i:i + 64]
            for tr, (fmt, ok) in zip(batch, T.score_answers([(tasks[tr.problem_id], tr.text) for tr in batch],
                                                            ctx.recipe.azr)):
                out.append(Verdict(problem_id=tr.problem_id, sample_index=tr.sample_index, text=tr.text,
                                   extracted_answer=tr.extracted_answer, correct=ok, verifier="rule",
                                   extra={"task_type": tasks[tr.problem_id].task_type, "format": fmt,
                                          "reward": T.solver_reward(fmt)}))
    counts = Counter(v.extra.get("format") for v in read_jsonl(out_path, Verdict))
    return {f"format.{k}": v for k, v in counts.items()}


# --------------------------------------------------------------------------- rewards -> train


def rewards(ctx: RoundContext, shard: int | None) -> dict:
    """ScoredRollouts for TRR++: proposer samples (learnability or format penalty) and solver
    samples (1 / -0.5 / -1), keyed (task type, propose|solve); held-out tasks dropped."""
    tasks = {_solve_id(task, new): (task, new) for task, new in solve_tasks(ctx)}
    scores: dict[str, list[Verdict]] = defaultdict(list)
    for v in ctx.read("score"):
        scores[v.problem_id].append(v)
    vals = {v.key: v for v in ctx.read("validate")}
    guard = _heldout(ctx)
    rolls: list[ScoredRollout] = []
    hist: Counter = Counter()
    acc_by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    dropped = 0
    for p in sorted(ctx.read("propose.jsonl"), key=lambda p: p.key):
        v = vals.get(p.key)
        if v is None:
            continue
        acc = None
        if v.status == "valid":
            vs = scores.get(v.task.id, [])
            acc = sum(s.correct is True for s in vs) / len(vs) if vs else 0.0
            hist[T.learnability_bin(acc)] += 1
            if guard.hit(T.task_text(v.task)):
                dropped += 1
                continue
        rolls.append(ScoredRollout(prompt=p.prompt, completion=p.completion or " ", reward=T.proposer_reward(v.status, acc),
                                   task_type=p.task_type, role="propose", problem_id=p.key,
                                   extra={"status": v.status, "acc": acc}))
    for sid, (task, new) in sorted(tasks.items()):
        vs = sorted(scores.get(sid, []), key=lambda s: s.sample_index)
        c = acc_by_type[task.task_type]
        c[0] += sum(s.correct is True for s in vs)
        c[1] += len(vs)
        if guard.hit(T.task_text(task)):
            dropped += len(vs)
            continue
        prompt = T.solve_prompt(task)
        for s in vs:
            rolls.append(ScoredRollout(prompt=prompt, completion=s.text or " ", reward=float(s.extra["reward"]),
                                       task_type=task.task_type, role="solve", group_id=sid, problem_id=sid,
                                       extra={"format": s.extra.get("format"), "new": new}))
    write_jsonl(ctx.output("rollouts.jsonl"), rolls)
    means: dict[str, list[float]] = defaultdict(list)
    for r in rolls:
        means[f"{r.task_type}/{r.role}"].append(r.reward)
    info = {"rollouts": len(rolls), "heldout_filtered": dropped,
            "reward_mean": {k: sum(v) / len(v) for k, v in sorted(means.items())},
            "learnability_hist": dict(sorted(hist.items())),
            "train_accuracy": {k: (c[0] / c[1] if c[1] else None) for k, c in sorted(acc_by_type.items())}}
    ctx.log(f"rewards: {len(rolls)} rollouts; mean reward " +
            ", ".join(f"{k} {v:+.2f}" for k, v in info["reward_mean"].items()))
    return info


def train(ctx: RoundContext, shard: int | None) -> dict:
    data = ctx.path("rollouts.jsonl")
    if not any(True for _ in iter_jsonl(data)):
        return {"model": None, "skipped": "no rollouts"}
    return ctx.train("policy-gradient", data, model_after(ctx, ctx.t - 1), ctx.path("train"))


# --------------------------------------------------------------------------- buffers, eval, report


def update_buffers(ctx: RoundContext, shard: int | None) -> dict:
    """Buffers of round t+1 = round t's + this round's valid, new, not held-out tasks."""
    guard = _heldout(ctx)
    buffers = _buffers(ctx)
    added: Counter = Counter()
    dup = held = 0
    seen = {T.task_key(x) for b in buffers.values() for x in b}
    for v in sorted(ctx.read("validate"), key=lambda v: v.key):
        if v.status != "valid":
            continue
        k = T.task_key(v.task)
        if k in seen:
            dup += 1
            continue
        if guard.hit(T.task_text(v.task)):
            held += 1
            continue
        seen.add(k)
        buffers[v.task.task_type].append(v.task)
        added[v.task.task_type] += 1
    for tt, tasks in buffers.items():
        write_jsonl(ctx.output(f"buffer-{tt}.jsonl"), tasks)
    return {"added": dict(added), "duplicates": dup, "heldout_filtered": held,
            "sizes": {tt: len(b) for tt, b in buffers.items()}}


def evaluate(ctx: RoundContext, shard: int | None) -> dict:
    return _evaluate(ctx, model_after(ctx, ctx.t), "eval")


def _evaluate(ctx: RoundContext, model: str | None, name: str) -> dict:
    """Greedy held-out solver accuracy per task type, decided in the sandbox."""
    A = ctx.recipe.azr
    held = {h.id: h for h in ctx.read(HELDOUT.path)}
    out_path = ctx.output(f"{name}.jsonl")
    with JsonlAppender(out_path, key=lambda o: o["problem_id"]) as out:
        todo = [h for h in held.values() if h.id not in out.done]
        if todo:
            backend = _backend(ctx, model, name)
            texts: dict[str, str] = {}
            try:
                _generate(ctx, backend, [_request(h.id, T.solve_prompt(h), 1, A.eval_sampling) for h in todo],
                          lambda res: texts.__setitem__(res.id, res.texts[0]) if res.ok and res.texts else None)
            finally:
                backend.close()
            done = [h for h in todo if h.id in texts]
            for h, (fmt, ok) in zip(done, T.score_answers([(h, texts[h.id]) for h in done], A)):
                out.append(Verdict(problem_id=h.id, sample_index=0, text=texts[h.id], correct=ok, verifier="rule",
                                   extracted_answer=T.answer_of(texts[h.id]),
                                   extra={"task_type": h.task_type, "format": fmt}))
    acc: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for v in read_jsonl(out_path, Verdict):
        c = acc[v.extra.get("task_type")]
        c[0] += v.correct is True
        c[1] += 1
        c[2] += v.extra.get("format") != "malformed"
    res = {"accuracy": {k: c[0] / c[1] for k, c in sorted(acc.items())},
           "well_formed": {k: c[2] / c[1] for k, c in sorted(acc.items())}, "n": sum(c[1] for c in acc.values()),
           "model": model}
    ctx.log(f"{name}: held-out accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in res["accuracy"].items()))
    return res


def report(ctx: RoundContext, shard: int | None) -> dict:
    """rounds/rNNN/metrics.json, RUN/metrics.jsonl (rewritten whole), RUN/plot.png and the
    latest buffers as RUN/buffers/*.jsonl, all from the stage markers and files."""
    from megatron_sz.systems.absolute_zero_corpus import plot, round_metrics

    m = round_metrics(ctx.rd, ctx.t, ctx.recipe)
    atomic_write_json(ctx.path("metrics.json"), m)
    rows = []
    for r in ctx.rd.rounds_present():
        p = ctx.rd.round_dir(r) / "metrics.json"
        if p.exists():
            rows.append(json.loads(p.read_text()))
    atomic_write_text(ctx.rd.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    plot(rows, ctx.rd.plot_path)
    nxt = ctx.rd.round_dir(ctx.t + 1)
    for tt in T.TASK_TYPES:
        src = nxt / f"buffer-{tt}.jsonl"
        if src.exists():
            write_jsonl(ctx.rd.root / "buffers" / f"{tt}.jsonl", read_jsonl(src, AzrTask))
    ctx.log(f"round {ctx.t} done: validity {m['validity_rate']}, held-out accuracy {m['accuracy']}, "
            f"buffers {m['buffer_sizes']}")
    return {"validity_rate": m["validity_rate"], "accuracy": m["accuracy"]}
