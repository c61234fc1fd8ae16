"""Agent0 (arXiv 2511.16043): a curriculum agent and a tool-using executor co-evolve from one base model.

``agent0_round`` below is the whole algorithm (SYSTEMS.md §3), as stages:

    propose  -> solve (array) -> score -> train_curriculum (GRPO) | train_executor (ADPO) -> eval -> report

* **Roles.** The curriculum agent is the recipe role ``generator`` (its model, parallel
  layout, rollout backend and SLURM section); the executor is the role ``solver`` (its
  model, ``solver.pg`` for ADPO, ``solver.rollout`` for sampling and sharding). Mapping the
  two agents onto the existing roles is what lets the SLURM executor, ``plan``,
  pre-flight and ``status`` run this system unchanged. Round 0 first warms up one base
  model on generated tool-use traces (a problem, a code block, its **real** sandbox
  output, a boxed answer) plus examples of the proposal format, by the ``solver-sft`` job;
  both agents start from it.
* **Signals.** The executor answers each valid proposal ``agent0.samples`` (m) times through
  the tool loop (``megatron_sz/toolloop.py``: the sandbox runs its code); the majority
  answer is the pseudo-label and its share is the self-consistency p
  (``agent0_signals.py``). Tasks with ``keep_low <= p <= keep_high`` are kept.
* **Rewards.** A proposal's reward is R_unc = 1 - 2|p - 0.5| plus 0.05 per mean tool call
  (capped at 4) minus its repetition penalty (BLEU-distance cluster size / batch size);
  an invalid question gets -1. The executor's reward is 1 when a trajectory's answer
  matches the pseudo-label, with ADPO scaling the advantage by p and relaxing the upper
  clip bound; observations carry loss mask 0.
* **Training.** Both agents train through the ``policy-gradient`` job: the executor with the
  recipe as written (``solver.pg``, estimator ``adpo``), the curriculum agent with a view
  of the recipe whose solver section is the generator's model and layout and
  ``agent0.curriculum_pg`` (estimator ``grpo``): the job trains "the solver section".
* **Held out.** Proposals whose question is a held-out problem (``heldout.for_run``) are
  left out of both agents' training files, counted in the score marker.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from megatron_sz.data import (Checkpoint, JsonlAppender, Problem, Proposal, ScoredRollout, TaskSignal,
                              ToolTrajectory, WeightedExample, iter_jsonl, read_jsonl, write_jsonl)
from megatron_sz.round import Io, RoundContext, Stage, hf_folder, initial_model

NAME = "agent0"
SUMMARY = ("curriculum agent (GRPO: uncertainty + tool use - repetition) x tool-integrated executor "
           "(ADPO on majority-vote pseudo-labels), from one base model")
DEFAULT_RECIPE = "recipes/agent0-tiny.yaml"
ROLES = ("generator", "solver")  # curriculum agent -> generator, executor -> solver

HELDOUT = Io("heldout.jsonl", Problem, scope="run")
WARMUP = Io("warmup.jsonl", WeightedExample, scope="run")
PROPOSALS = Io("proposals.jsonl", Proposal)
SOLVE = Io("solve", ToolTrajectory, sharded=True)
SIGNALS = Io("signals.jsonl", TaskSignal)
CURRICULUM_DATA = Io("curriculum_rollouts.jsonl", ScoredRollout)
EXECUTOR_DATA = Io("executor_rollouts.jsonl", ScoredRollout)


def agent0_round(t: int, run, recipe) -> None:
    """Round t of Agent0: propose, solve with tools, score, train both agents."""
    S, G = recipe.solver, recipe.generator
    cur_in = Io("warmup", Checkpoint) if t == 0 else Io("train_curriculum", Checkpoint, scope="prev")
    exe_in = Io("warmup", Checkpoint) if t == 0 else Io("train_executor", Checkpoint, scope="prev")
    if t == 0:  # held-out set, tool-use traces run in the sandbox, tokenizer; one warmed-up base model
        run(Stage("prepare", prepare, "solver", "sandbox", writes=(HELDOUT, WARMUP)))
        run(Stage("warmup", warmup, "solver", "training", world_size=S.parallel.world_size, job="solver-sft",
                  reads=(WARMUP,), writes=(Io("warmup", Checkpoint),)))
        run(Stage("eval_warmup", evaluate_warmup, "solver", "inference",
                  reads=(HELDOUT, Io("warmup", Checkpoint)), writes=(Io("eval_warmup.jsonl", ToolTrajectory),)))
    run(Stage("propose", propose, "generator", "inference",
              after=("warmup",) if t == 0 else ("prev:train_curriculum",),
              reads=(cur_in,), writes=(PROPOSALS,)))
    run(Stage("solve", solve, "solver", "inference", shards=S.rollout.shards,
              after=("propose",) if t == 0 else ("propose", "prev:train_executor"),
              reads=(PROPOSALS, exe_in), writes=(SOLVE,)))
    run(Stage("score", score, "solver", after=("solve",),
              reads=(PROPOSALS, SOLVE, HELDOUT), writes=(SIGNALS, CURRICULUM_DATA, EXECUTOR_DATA)))
    run(Stage("train_curriculum", train_curriculum, "generator", "training", after=("score",),
              world_size=G.parallel.world_size, job="policy-gradient", train_spec=recipe.agent0.curriculum_pg,
              reads=(CURRICULUM_DATA, cur_in),
              writes=(Io("train_curriculum", Checkpoint),)))
    run(Stage("train_executor", train_executor, "solver", "training", after=("score",),
              world_size=S.parallel.world_size, job="policy-gradient", reads=(EXECUTOR_DATA, exe_in),
              writes=(Io("train_executor", Checkpoint),)))
    if recipe.eval.enabled:
        run(Stage("eval", evaluate, "solver", "inference", after=("train_executor",),
                  reads=(HELDOUT, Io("train_executor", Checkpoint)), writes=(Io("eval.jsonl", ToolTrajectory),)))
    run(Stage("report", report, "solver", after=("train_curriculum", "train_executor", "eval", "eval_warmup", "prev:report")))


# --------------------------------------------------------------------------- helpers

_TRAIN_STAGE = {"solver": "train_executor", "generator": "train_curriculum"}


def model_after(ctx: RoundContext, role: str, t: int) -> str | None:
    """Checkpoint folder of an agent after round t (t = -1: the warmed-up base model)."""
    return ctx.latest_model(t, _TRAIN_STAGE[role], first="warmup", role=role)


def _backend(ctx: RoundContext, role: str, model: str, name: str):
    from megatron_sz.inference import make_backend

    spec = getattr(ctx.recipe, role).rollout.backend
    return make_backend(spec, model_path=hf_folder(model), tokenizer_path=ctx.tokenizer_path, seed=ctx.seed(name))


def tools_of(recipe):
    from megatron_sz.toolloop import ToolConfig

    a = recipe.agent0
    return ToolConfig(max_turns=a.max_tool_turns, timeout_s=a.tool_timeout_s, output_chars=a.tool_output_chars)


def executor_prompt(recipe, question: str) -> str:
    from megatron_sz.rollout import resolve_template
    from megatron_sz.teacher.base import render

    return render(resolve_template(recipe.solver.rollout.prompt_template), problem=question)


def topics_of(recipe) -> list[str]:
    return list(recipe.agent0.topics or recipe.warmup.families or ["math"])


def curriculum_prompt(recipe, topic: str) -> str:
    from megatron_sz.teacher.base import render

    return render(recipe.agent0.curriculum_template, topic=topic)


def _tokenizer(ctx: RoundContext, model: str | None):
    from megatron_sz.tokenizer import load_tokenizer

    return load_tokenizer(ctx.tokenizer_path or hf_folder(model))


def curriculum_recipe(recipe):
    """The recipe the curriculum agent's policy-gradient job reads: its solver section is the
    generator's model and layout with ``agent0.curriculum_pg`` (the job trains "the solver")."""
    G = recipe.generator
    solver = dataclasses.replace(recipe.solver, model=G.model, parallel=G.parallel, pg=recipe.agent0.curriculum_pg)
    return dataclasses.replace(recipe, solver=solver)


def _nonempty(path: Path) -> bool:
    return path.exists() and any(True for _ in iter_jsonl(path))


# --------------------------------------------------------------------------- round 0


def prepare(ctx: RoundContext, shard: int | None) -> dict:
    """Held-out set; warm-up data (tool-use traces with real sandbox output, proposal examples); tokenizer."""
    from megatron_sz import heldout
    from megatron_sz.teacher.symbolic import SymbolicTeacher

    r, pdir = ctx.recipe, ctx.rd.prepare_dir
    pdir.mkdir(parents=True, exist_ok=True)
    teacher = SymbolicTeacher(seed=r.teacher.seed or r.seed)
    diff, fams = tuple(r.warmup.difficulty), r.warmup.families
    info: dict = {}
    held_path = pdir / "heldout.jsonl"
    if not held_path.exists():
        if r.eval.heldout_file:
            held = read_jsonl(r.resolve_path(r.eval.heldout_file), Problem)
        else:
            held = teacher.sample_problems(r.eval.heldout_size, seed=r.seed + 7919, difficulty=diff, families=fams)
        write_jsonl(held_path, held)
    held = read_jsonl(held_path, Problem)
    info["heldout"] = len(held)
    guard = heldout.for_run(ctx.rd, r)
    warm_path = pdir / "warmup.jsonl"
    if not warm_path.exists():
        exclude = {p.id for p in held}
        traces = teacher.sample_problems(r.agent0.warmup_traces, seed=r.seed + 104729, difficulty=diff,
                                         families=fams, exclude_ids=exclude)
        props = teacher.sample_problems(r.agent0.warmup_proposals, seed=r.seed + 15485863, difficulty=diff,
                                        families=fams, exclude_ids=exclude)
        traces, info["heldout_filtered_traces"] = guard.filter(traces, lambda p: (p.problem,))
        props, info["heldout_filtered_proposals"] = guard.filter(props, lambda p: (p.problem,))
        examples, info["trace_outcomes"] = tool_traces(r, traces, log=ctx.log)
        for p in props:
            examples.append(WeightedExample(prompt=curriculum_prompt(r, p.subject or "math"), target=" " + p.problem,
                                            weight=1.0, problem_id=p.id, weight_source={"kind": "proposal_format"}))
        write_jsonl(warm_path, examples)
    warm = read_jsonl(warm_path, WeightedExample)
    info["warmup_examples"] = len(warm)
    tok_dir = pdir / "tokenizer"
    if r.tokenizer.kind == "sentencepiece" and r.tokenizer.train and not (tok_dir / "tokenizer.model").exists():
        from megatron_sz.rollout import resolve_template
        from megatron_sz.tokenizer import train_sentencepiece

        texts = [resolve_template(r.solver.rollout.prompt_template), r.agent0.curriculum_template,
                 "```python\n```\n```output\n[output truncated]\n[no output]\nTimeoutError: Error: \\boxed{}"]
        texts += [t for e in warm for t in (e.prompt, e.target)] * 2
        train_sentencepiece(texts, tok_dir, vocab_size=r.tokenizer.vocab_size, seed=r.seed)
    if tok_dir.exists():
        info["tokenizer"] = str(tok_dir)
    return info


def trace_code(p: Problem) -> str | None:
    """The Python a warm-up trace writes for a symbolic problem ("Compute 7 + 8." -> print(7 + 8))."""
    import re

    m = re.fullmatch(r"Compute (.+)\.", p.problem.strip())
    if m and re.fullmatch(r"[0-9+\-*/() ]+", m.group(1)):
        return f"print({m.group(1)})"
    return None


def tool_traces(recipe, problems: list[Problem], *, log=None) -> tuple[list[WeightedExample], dict]:
    """One SFT example per problem: the executor prompt, then a code block, the observation
    the sandbox really printed for it, and the boxed answer read off that output."""
    from megatron_sz import sandbox
    from megatron_sz.toolloop import STOP, observation

    tools = tools_of(recipe)
    todo = [(p, c) for p in problems if (c := trace_code(p)) is not None]
    results = sandbox.run_batch([{"code": c, "cell": True, "timeout": tools.timeout_s} for _, c in todo])
    out, counts = [], {"ok": 0, "skipped": len(problems) - len(todo), "failed": 0}
    for (p, code), res in zip(todo, results):
        value = (res.stdout or "").strip()
        if res.status != "ok" or not value:
            counts["failed"] += 1
            continue
        counts["ok"] += 1
        target = (f"```python\n{code}\n{STOP}" + observation(res, tools.output_chars)
                  + f"The answer is \\boxed{{{value}}}.")
        out.append(WeightedExample(prompt=executor_prompt(recipe, p.problem), target=target, weight=1.0,
                                   problem_id=p.id, weight_source={"kind": "tool_trace"}))
    if log:
        log(f"warm-up tool traces: {counts['ok']} run in the sandbox ({counts['failed']} failed, "
            f"{counts['skipped']} without code)")
    return out, counts


def warmup(ctx: RoundContext, shard: int | None) -> dict:
    from megatron_sz.train.jobs import run_job

    out = ctx.path("warmup")
    if not _nonempty(ctx.rd.prepare_dir / "warmup.jsonl"):  # warmup_traces = warmup_proposals = 0
        return {"model": None, "skipped": "no warm-up examples: both agents start from the recipe's model"}
    res = run_job("solver-sft", ctx.recipe, str(ctx.rd.prepare_dir / "warmup.jsonl"),
                  initial_model(ctx.rd, ctx.recipe, "solver"), str(out), tokenizer=ctx.tokenizer_path)
    if res.exit_code != 0:
        raise SystemExit(int(res.exit_code))
    return {"model": str(out), "hf": res.hf_dir,
            "summary": {k: res.summary.get(k) for k in ("total_steps", "wall_s", "eval_end", "train_items")}}


def evaluate_warmup(ctx: RoundContext, shard: int | None) -> dict:
    return _evaluate(ctx, model_after(ctx, "solver", -1), "eval_warmup")


# --------------------------------------------------------------------------- the round


def propose(ctx: RoundContext, shard: int | None) -> dict:
    """The curriculum agent writes ``group_size`` proposals for each of ``prompts`` prompts."""
    from megatron_sz.inference.base import GenerationRequest
    from megatron_sz.systems.agent0_signals import parse_question

    a = ctx.recipe.agent0
    topics = topics_of(ctx.recipe)
    reqs = []
    for i in range(a.prompts):
        topic = topics[i % len(topics)]
        reqs.append(GenerationRequest(id=f"r{ctx.t}-g{i}", prompt=curriculum_prompt(ctx.recipe, topic),
                                      n=a.group_size, sampling=a.curriculum_sampling, meta={"topic": topic}))
    out_path = ctx.output("proposals.jsonl")
    counts = {"valid": 0, "invalid": 0}
    with JsonlAppender(out_path, key=lambda o: o["key"]) as out:  # exactly once per (prompt, sample)
        todo = [q for q in reqs if any(f"{q.id}#{j}" not in out.done for j in range(q.n))]
        if todo:
            backend = _backend(ctx, "generator", model_after(ctx, "generator", ctx.t - 1), "propose")

            def on_result(res):
                if not res.ok:
                    return
                for j, (text, why) in enumerate(zip(res.texts, res.finish_reasons)):
                    q, reason = parse_question(text, max_chars=a.max_question_chars)
                    out.append(Proposal(key=f"{res.id}#{j}", prompt=curriculum_prompt(ctx.recipe, res.meta["topic"]),
                                        completion=text, group_id=res.id, question=q, reason=reason,
                                        topic=res.meta["topic"], extra={"finish_reason": why}))
            try:
                backend.generate(todo, progress=ctx.progress, on_result=on_result)
            finally:
                backend.close()
    props = read_jsonl(out_path, Proposal)
    for p in props:
        counts["valid" if p.question else "invalid"] += 1
    if len({p.group_id for p in props}) < a.prompts:
        raise RuntimeError("some proposal requests failed for good; rerun the stage to retry them")
    ctx.log(f"propose: {counts['valid']} valid / {len(props)} proposals")
    return counts


def _valid(props: list[Proposal]) -> list[Proposal]:
    return sorted((p for p in props if p.question), key=lambda p: p.key)


def solve(ctx: RoundContext, shard: int | None) -> dict:
    """The executor answers each valid proposal m times with the Python tool (one shard)."""
    from megatron_sz.rollout import shard_slice
    from megatron_sz.toolloop import run_tool_loop

    S, a = ctx.recipe.solver, ctx.recipe.agent0
    mine = shard_slice(_valid(ctx.read("proposals.jsonl")), shard or 0, S.rollout.shards)
    out_path = ctx.output("solve", shard)
    if not mine:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.touch()
        return {"trajectories": 0}
    backend = _backend(ctx, "solver", model_after(ctx, "solver", ctx.t - 1), "solve")
    try:
        trajs = run_tool_loop([(p.key, executor_prompt(ctx.recipe, p.question)) for p in mine], backend,
                              n=a.samples, sampling=S.rollout.sampling, tools=tools_of(ctx.recipe),
                              out_path=out_path, log=ctx.log if ctx.progress else None)
    finally:
        backend.close()
    return {"trajectories": len(trajs), "tool_calls": sum(t.tool_calls for t in trajs)}


def score(ctx: RoundContext, shard: int | None) -> dict:
    """Majority vote, p, the filter, the curriculum reward; both agents' training records."""
    from megatron_sz.systems import agent0_signals as A
    from megatron_sz.toolloop import token_segments

    a = ctx.recipe.agent0
    props = sorted(ctx.read("proposals.jsonl"), key=lambda p: p.key)
    by_task: dict[str, list[ToolTrajectory]] = {}
    for tr in ctx.read("solve"):
        by_task.setdefault(tr.problem_id, []).append(tr)
    valid = [p for p in props if p.question]
    clusters = A.bleu_clusters([p.question for p in valid], a.bleu_threshold) if valid else []
    penalties = A.repetition_penalties(clusters)
    cl = {p.key: (c, pen) for p, c, pen in zip(valid, clusters, penalties)}
    sizes: dict[int, int] = {}
    for c in clusters:
        sizes[c] = sizes.get(c, 0) + 1
    guard = ctx.heldout()
    signals: list[TaskSignal] = []
    held = 0
    for p in props:
        if not p.question:
            signals.append(TaskSignal(key=p.key, valid=False, reward=a.invalid_reward, extra={"reason": p.reason}))
            continue
        trajs = sorted(by_task.get(p.key, []), key=lambda t: t.sample_index)
        label, pc, votes = A.majority_vote([t.extracted_answer for t in trajs])
        calls = sum(t.tool_calls for t in trajs) / max(1, len(trajs))
        c, pen = cl[p.key]
        reward, r_unc, r_tool = A.curriculum_reward(valid=True, p=pc, tool_calls=calls, repetition=pen,
                                                    per_call=a.tool_reward, cap=a.tool_reward_cap,
                                                    invalid=a.invalid_reward)
        is_held = bool(guard.hit(p.question))
        held += is_held
        signals.append(TaskSignal(key=p.key, valid=True, reward=reward, question=p.question, p=pc, label=label,
                                  votes=votes, samples=len(trajs), tool_calls_mean=calls, r_unc=r_unc, r_tool=r_tool,
                                  repetition=pen, cluster=c, cluster_size=sizes[c],
                                  kept=label is not None and A.keep(pc, a.keep_low, a.keep_high) and not is_held,
                                  extra={"heldout": is_held} if is_held else {}))
    write_jsonl(ctx.output("signals.jsonl"), signals)
    tok = _tokenizer(ctx, model_after(ctx, "solver", ctx.t - 1))
    sig = {s.key: s for s in signals}
    cur = []
    for p in props:
        s = sig[p.key]
        if s.extra.get("heldout"):
            continue
        fields = dict(prompt=p.prompt, reward=float(s.reward), group_id=p.group_id, task_type="curriculum",
                      role="propose", problem_id=p.key, finished=p.extra.get("finish_reason") == "stop")
        if p.completion:
            cur.append(ScoredRollout(completion=p.completion, **fields))
        else:  # an empty proposal: the EOS token the agent chose is what gets the -1
            cur.append(ScoredRollout(completion_ids=[int(tok.eos_id)], **{**fields, "finished": False}))
    write_jsonl(ctx.output("curriculum_rollouts.jsonl"), cur)
    exe = []
    for s in signals:
        if not s.kept:
            continue
        for tr in sorted(by_task.get(s.key, []), key=lambda t: t.sample_index):
            if not any(seg["role"] == "model" for seg in tr.segments):
                continue
            ids, mask = token_segments(tok, tr.segments, eos=tr.finish == "answer")
            if not ids or not any(mask):
                continue
            right = A.normalize_answer(tr.extracted_answer) == s.label
            exe.append(ScoredRollout(prompt=tr.prompt, completion_ids=ids, loss_mask=mask, reward=float(right),
                                     group_id=s.key, task_type="executor", role="solve", consistency=float(s.p),
                                     problem_id=s.key, extra={"tool_calls": tr.tool_calls}))
    write_jsonl(ctx.output("executor_rollouts.jsonl"), exe)
    v = [s for s in signals if s.valid]
    info = {"proposals": len(signals), "valid": len(v), "kept": sum(s.kept for s in v),
            "curriculum_rollouts": len(cur), "executor_rollouts": len(exe), "heldout_filtered": held,
            "clusters": len(sizes), "largest_cluster": max(sizes.values(), default=0)}
    ctx.log(f"score: {info['valid']} valid, {info['kept']} kept (p in [{a.keep_low}, {a.keep_high}]), "
            f"{len(exe)} executor rollouts, {len(sizes)} clusters")
    return info


def train_curriculum(ctx: RoundContext, shard: int | None) -> dict:
    data = ctx.path("curriculum_rollouts.jsonl")
    if not _nonempty(data):
        return {"model": None, "skipped": "no proposals to train on"}
    return ctx.train("policy-gradient", data, model_after(ctx, "generator", ctx.t - 1),
                     ctx.path("train_curriculum"), recipe=curriculum_recipe(ctx.recipe))


def train_executor(ctx: RoundContext, shard: int | None) -> dict:
    data = ctx.path("executor_rollouts.jsonl")
    if not _nonempty(data):
        return {"model": None, "skipped": "no task with self-consistency in the kept band"}
    return ctx.train("policy-gradient", data, model_after(ctx, "solver", ctx.t - 1), ctx.path("train_executor"))


def evaluate(ctx: RoundContext, shard: int | None) -> dict:
    return _evaluate(ctx, model_after(ctx, "solver", ctx.t), "eval")


def _evaluate(ctx: RoundContext, model: str, name: str) -> dict:
    """Executor accuracy on the held-out set, with tools (mean over eval.k samples)."""
    from megatron_sz.toolloop import run_tool_loop
    from megatron_sz.verify import verify_batch

    ev = ctx.recipe.eval
    held = ctx.read("heldout.jsonl")
    out_path = ctx.output(f"{name}.jsonl")
    backend = _backend(ctx, "solver", model, name)
    try:
        trajs = run_tool_loop([(p.id, executor_prompt(ctx.recipe, p.problem)) for p in held], backend, n=ev.k,
                              sampling=ev.sampling, tools=tools_of(ctx.recipe))
    finally:
        backend.close()
    ref = {p.id: p.answer for p in held}
    verdicts = verify_batch([(t.extracted_answer, ref[t.problem_id]) for t in trajs])
    for t, v in zip(trajs, verdicts.results):
        t.correct = v.equivalent is True
    write_jsonl(out_path, trajs)
    acc = sum(t.correct for t in trajs) / max(1, len(trajs))
    calls = sum(t.tool_calls for t in trajs) / max(1, len(trajs))
    ctx.log(f"{name}: held-out accuracy {acc:.3f} on {len(held)} problems x {ev.k}, {calls:.2f} tool calls each")
    return {"accuracy": acc, "n": len(trajs), "tool_calls_mean": calls, "model": model}


def finish(rd) -> str | None:
    """The systems registry's end-of-run hook: metrics.jsonl and plot.png match the rounds."""
    from megatron_sz.systems.agent0_report import finish as rebuild

    return rebuild(rd)


def report(ctx: RoundContext, shard: int | None) -> dict:
    from megatron_sz.systems.agent0_report import write_round_metrics

    return write_round_metrics(ctx)
