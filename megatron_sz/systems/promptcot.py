"""PromptCoT (arXiv 2503.02324): concepts -> rationale -> problem, then rejection sampling.

``promptcot_round`` below is the whole algorithm (SYSTEMS.md §4). Round 0 extracts the
concepts of a problem set (the seeds, or ``promptcot.problems_file``) with the teacher,
has the teacher write the setter's rationale for each (concepts, difficulty, problem),
and trains the problem generator by SFT on concepts -> rationale -> problem. Every
round then samples candidate problems for requested concept sets, has every judge score
them on a parsed rubric, keeps what *all* judges rate perfect, and retrains the
generator by WSFT with weight 1 on kept and 0 on the rest (rejection sampling is WSFT
with weights in {0, 1}: the generator-wsft kernel gives a weight-0 example exactly zero
gradient). The kept problems, deduplicated and checked against held-out and benchmark
problems, grow the synthesized set, with provenance. ``promptcot.downstream`` adds, in
the last round, teacher solutions, a solver SFT on them and a quality report.

What is unusual here: every teacher call (concepts, rationales, judges, solutions) and
every sample is one keyed append (``data.JsonlAppender``), so a killed shard redoes only
what was in flight; the symbolic teacher (the tiny recipe) answers the same calls
exactly, and its judge writes a JSON rubric reply that goes through the same parser as
an LLM judge's (``promptcot_rubric``). The concept and rationale files live in
``RUN/prepare`` (scope ``run``): every round's requests draw from them.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Callable

from megatron_sz.data import (CandidateProblem, Checkpoint, Concepts, JsonlAppender, JudgeScore, Problem, Rationale,
                              SynthesizedProblem, Verdict, WeightedExample, iter_jsonl, read_jsonl, write_jsonl)
from megatron_sz.errors import UserError
from megatron_sz.round import Io, RoundContext, Stage, hf_folder, initial_model

NAME = "promptcot"
SUMMARY = ("concepts -> rationale -> problem generator (SFT), improved by rejection sampling "
           "(two judges, WSFT with weights {0,1}); a synthesized problem set with provenance")
DEFAULT_RECIPE = "recipes/promptcot-tiny.yaml"
ROLES = ("teacher", "generator", "solver")

# The contracts (scope "run" = RUN_DIR/prepare: written in round 0, read by every round).
PROBLEMS = Io("problems.jsonl", Problem, scope="run")
HELDOUT = Io("heldout.jsonl", Problem, scope="run")
CONCEPTS = Io("concepts", Concepts, scope="run", sharded=True)
RATIONALES = Io("rationale", Rationale, scope="run", sharded=True)
SFT_DATA = Io("sft.jsonl", WeightedExample, scope="run")
CANDIDATES = Io("sample", CandidateProblem, sharded=True)
SCORES = Io("judge", JudgeScore, sharded=True)
KEPT = Io("kept.jsonl", SynthesizedProblem)
SYNTHESIZED = Io("synthesized.jsonl", SynthesizedProblem)


def promptcot_round(t: int, run, recipe) -> None:
    """Round t of PromptCoT: round 0 builds the generator; every round rejection-samples."""
    T, G, P = recipe.teacher, recipe.generator, recipe.promptcot
    if G.wsft.normalization == "token" or P.sft.normalization == "token":
        raise UserError("promptcot: WSFT normalization 'token' divides by every target token, so a weight-0 "
                        "problem would still scale the others", where="generator.wsft.normalization",
                        fix="use normalization: sum or sequence (weight-0 problems then contribute nothing)")
    generator_in = Io("sft", Checkpoint) if t == 0 else Io("rs", Checkpoint, scope="prev")
    if t == 0:
        run(Stage("prepare", prepare, "generator", writes=(PROBLEMS, HELDOUT)))
        run(Stage("concepts", extract_concepts, "teacher", "inference", shards=T.shards,
                  reads=(PROBLEMS,), writes=(CONCEPTS,)))
        run(Stage("rationale", write_rationales, "teacher", "inference", shards=T.shards, after=("concepts",),
                  reads=(Io("concepts", Concepts, scope="run", sharded=True, per_shard=True),), writes=(RATIONALES,)))
        run(Stage("sft_data", build_sft_data, "generator", after=("rationale",),
                  reads=(RATIONALES, HELDOUT), writes=(SFT_DATA,)))
        run(Stage("sft", generator_sft, "generator", "training", world_size=G.parallel.world_size,
                  job="generator-wsft", train_spec=P.sft, reads=(SFT_DATA,), writes=(Io("sft", Checkpoint),)))
    run(Stage("sample", sample_candidates, "generator", "inference", shards=G.rollout.shards,
              after=("sft",) if t == 0 else ("prev:rs", "prev:select"),
              reads=(CONCEPTS, generator_in), writes=(CANDIDATES,)))
    run(Stage("judge", judge_candidates, "teacher", "inference", shards=T.shards, after=("sample",),
              reads=(Io("sample", CandidateProblem, sharded=True, per_shard=True),), writes=(SCORES,)))
    run(Stage("select", select_kept, "generator", after=("judge",),
              reads=(CANDIDATES, SCORES, HELDOUT),
              writes=(Io("rs.jsonl", WeightedExample), KEPT)))
    run(Stage("rs", generator_rs, "generator", "training", after=("select",), world_size=G.parallel.world_size,
              job="generator-wsft", reads=(Io("rs.jsonl", WeightedExample), generator_in), writes=(Io("rs", Checkpoint),)))
    run(Stage("synthesize", synthesize, "teacher", after=("select", "prev:synthesize"),
              reads=(KEPT, HELDOUT, Io("synthesized.jsonl", SynthesizedProblem, scope="prev", optional=True)),
              writes=(SYNTHESIZED,)))
    last = ("synthesize", "rs", "prev:report")
    if P.downstream and t == recipe.rounds - 1:
        S = recipe.solver
        run(Stage("solutions", teacher_solutions, "teacher", "inference", after=("synthesize",),
                  reads=(SYNTHESIZED,), writes=(Io("solutions.jsonl", Problem),)))
        run(Stage("solver_sft", solver_sft, "solver", "training", after=("solutions",), world_size=S.parallel.world_size,
                  job="solver-sft", reads=(Io("solutions.jsonl", Problem), HELDOUT),
                  writes=(Io("solver_sft.jsonl", Problem), Io("solver_sft", Checkpoint))))
        run(Stage("quality", quality, "solver", "inference", after=("solver_sft", "rs"),
                  reads=(Io("solutions.jsonl", Problem), SYNTHESIZED, HELDOUT, CONCEPTS,
                         Io("solver_sft", Checkpoint), Io("rs", Checkpoint)),
                  writes=(Io("quality.jsonl", Verdict),)))
        last = last + ("quality",)
    run(Stage("report", report, "generator", after=last))


# --------------------------------------------------------------------------- helpers


def model_after(ctx: RoundContext, t: int) -> str | None:
    """The generator's checkpoint after round t's rejection sampling (t = -1: after the SFT)."""
    return ctx.latest_model(t, "rs", first="sft", role="generator")


def _shard_of(items: list, shard: int | None, n: int) -> list:
    from megatron_sz.rollout import shard_slice

    return items if shard is None else shard_slice(items, shard, n)


def _mine(ctx: RoundContext, path: str, shard: int | None) -> list:
    """Records of a sharded read that belong to this shard: the writer's shard i when the
    plan correlates the two stages, else this shard's slice of all of them (also when the
    writer has a single shard file: every shard of this stage reads that one file)."""
    recs = ctx.read(path, shard)
    src = ctx.plan.sources.get((ctx.stage.name, path)) if ctx.plan else None
    if shard is not None and not (src and ctx.plan.is_correlated(src[1].name, ctx.stage.name)):
        return _shard_of(recs, shard, ctx.stage.shards)
    return recs


def _symbolic(recipe) -> bool:
    return recipe.teacher.kind == "symbolic"


def generator_prompt(recipe, concepts: list[str], difficulty: int | None) -> str:
    from megatron_sz.teacher.base import render

    return render(recipe.promptcot.generator_template, concepts=", ".join(concepts),
                  difficulty="any" if difficulty is None else difficulty)


def generator_target(rationale: str, problem: str) -> str:
    """What the generator learns to write after its prompt: the rationale, then the problem."""
    return f" {rationale.strip()}\nProblem: {problem.strip()}"


def parse_generation(text: str) -> tuple[str | None, str | None]:
    """(rationale, problem) from a generated text ('... Problem: ...'); problem None if absent."""
    if not text or not text.strip():
        return None, None
    head, sep, tail = text.partition("Problem:")
    if not sep:
        return text.strip() or None, None
    problem = tail.strip().split("\nConcepts:")[0].strip()  # a model that runs on into a new prompt
    return head.strip().removeprefix("Rationale:").strip() or None, problem or None


def _teacher_backend(ctx: RoundContext, spec=None, *, name: str = "teacher"):
    from megatron_sz.inference import make_backend

    return make_backend(spec or ctx.recipe.teacher.backend, seed=ctx.seed(name))


def ask_teacher(backend, prompts: dict[str, str], sampling, parse: Callable[[str | None], tuple],
                retries: int, *, n: int = 1) -> dict[str, tuple[tuple, str | None]]:
    """Send chat prompts; key -> (parse(reply), raw reply). A reply whose parse status is
    ``parse_failed`` (or any malformed rubric class) is asked again up to ``retries`` times
    with a fresh request id; a backend failure gives parse(None) with status forced to
    ``backend_failed``. Never raises for a bad reply."""
    from megatron_sz.inference.base import GenerationRequest, GenerationResult

    out: dict[str, tuple[tuple, str | None]] = {}
    pending = dict(prompts)
    for attempt in range(retries + 1):
        if not pending:
            break
        s = sampling if not attempt or sampling.seed is None else dataclasses.replace(sampling,
                                                                                      seed=sampling.seed + 7919 * attempt)
        reqs = [GenerationRequest(id=f"{k}@{attempt}", prompt=[{"role": "user", "content": p}], n=n, sampling=s)
                for k, p in pending.items()]
        try:
            results = backend.generate(reqs, progress=False)
        except Exception as exc:  # noqa: BLE001 - a backend crash must not end the stage
            results = [GenerationResult.failure(r, f"backend raised {exc!r}") for r in reqs]
        for res in results:
            k = res.id.rsplit("@", 1)[0]
            if not res.ok or not res.texts:
                parsed = ("backend_failed",) + tuple(parse(None)[1:])
                out[k] = (parsed, None)
                continue
            raw = res.texts[0] if n == 1 else "\n\u241e\n".join(res.texts)
            parsed = parse(raw if n == 1 else list(res.texts))
            out[k] = (parsed, raw)
            if parsed[0] in ("ok", "repaired"):
                pending.pop(k, None)
    return out


# --------------------------------------------------------------------------- round 0


def prepare(ctx: RoundContext, shard: int | None) -> dict:
    """The problem set to extract concepts from, and the held-out set (neither is trained on
    unless it passes the held-out rule)."""
    from megatron_sz import heldout
    from megatron_sz.prepare import load_seed_problems
    from megatron_sz.teacher.symbolic import SymbolicTeacher

    r, pdir = ctx.recipe, ctx.rd.prepare_dir
    pdir.mkdir(parents=True, exist_ok=True)
    sym = SymbolicTeacher(seed=r.teacher.seed or r.seed, families=list(r.teacher.families) or None) \
        if _symbolic(r) else None
    held_path = pdir / "heldout.jsonl"
    if not held_path.exists():
        if r.eval.heldout_file:
            held = read_jsonl(r.resolve_path(r.eval.heldout_file), Problem)
        elif sym is not None:
            held = sym.sample_problems(r.eval.heldout_size, seed=r.seed + 7919, difficulty=tuple(r.warmup.difficulty),
                                       families=r.warmup.families)
        else:
            held = []
        write_jsonl(held_path, held)
    held_ids = {p.id for p in read_jsonl(held_path, Problem)}
    path = pdir / "problems.jsonl"
    info: dict = {}
    if not path.exists():
        if r.promptcot.problems_file:
            f = r.resolve_path(r.promptcot.problems_file)
            if f is None or not f.is_file():
                raise UserError(f"problem file not found: {r.promptcot.problems_file}",
                                where="promptcot.problems_file", fix="point it at a JSONL of Problem records")
            problems = read_jsonl(f, Problem)
        elif r.seeds_from_teacher:
            if sym is None:
                raise UserError("seeds_from_teacher needs the symbolic teacher", where="seeds_from_teacher",
                                fix="set teacher.kind: symbolic, or give promptcot.problems_file / seeds_file")
            problems = sym.sample_problems(r.seeds_from_teacher, seed=r.seed, families=r.warmup.families,
                                           difficulty=tuple(r.warmup.difficulty), exclude_ids=held_ids)
        else:
            problems = load_seed_problems(r)
        if not problems:
            raise UserError("the problem set is empty", where=r.promptcot.problems_file or r.seeds_file,
                            fix="give at least one problem to extract concepts from")
        problems, info["heldout_filtered"] = heldout.for_run(ctx.rd, r).filter(problems, lambda p: (p.problem,))
        write_jsonl(path, problems)
    info["problems"] = sum(1 for _ in iter_jsonl(path))
    info["heldout"] = len(held_ids)
    return info


def _count(path: Path, cls, field: str = "status") -> dict:
    counts: dict[str, int] = {}
    if path.exists():
        for rec in read_jsonl(path, cls, allow_partial_tail=True):
            v = str(getattr(rec, field))
            counts[v] = counts.get(v, 0) + 1
    return counts


def extract_concepts(ctx: RoundContext, shard: int | None) -> dict:
    """Concepts and difficulty of each problem of this shard (symbolic: family + level)."""
    from megatron_sz.systems.promptcot_rubric import CONCEPTS_PROMPT, parse_concepts_reply, symbolic_concepts
    from megatron_sz.teacher.base import render

    P = ctx.recipe.promptcot
    problems = _shard_of(ctx.read("problems.jsonl"), shard, ctx.stage.shards)
    out_path = ctx.output("concepts", shard)
    with JsonlAppender(out_path, key=lambda o: o["problem_id"]) as out:
        todo = [p for p in problems if p.id not in out.done]
        if _symbolic(ctx.recipe):
            for p in todo:
                concepts, level = symbolic_concepts(p)
                out.append(Concepts(problem_id=p.id, problem=p.problem, concepts=concepts, difficulty=level,
                                    source="symbolic", status="ok" if concepts else "parse_failed",
                                    reason=None if concepts else "not a symbolic family"))
        elif todo:
            backend = _teacher_backend(ctx, name="concepts")
            try:
                for i in range(0, len(todo), 256):
                    chunk = {p.id: p for p in todo[i:i + 256]}
                    prompts = {k: render(CONCEPTS_PROMPT, n=P.concepts_per_problem, problem=p.problem)
                               for k, p in chunk.items()}
                    got = ask_teacher(backend, prompts, P.concept_sampling,
                                      lambda x: parse_concepts_reply(x, P.concepts_per_problem),
                                      ctx.recipe.teacher.max_parse_retries)
                    for k, p in chunk.items():
                        (status, concepts, diff, why), raw = got[k]
                        diff = diff or p.level
                        out.append(Concepts(problem_id=k, problem=p.problem, concepts=concepts, difficulty=diff,
                                            source="llm", status=status, reason=why or None,
                                            extra={} if status in ("ok", "repaired") else {"raw": (raw or "")[:1000]}))
                    ctx.log(f"concepts shard {shard}: {min(i + 256, len(todo))}/{len(todo)}")
            finally:
                backend.close()
    return _count(out_path, Concepts)


def write_rationales(ctx: RoundContext, shard: int | None) -> dict:
    """The setter's rationale for each (concepts, difficulty, problem) of this shard."""
    from megatron_sz.systems.promptcot_rubric import RATIONALE_PROMPT, parse_rationale_reply, symbolic_rationale
    from megatron_sz.teacher.base import render

    P = ctx.recipe.promptcot
    concepts = [c for c in _mine(ctx, "concepts", shard) if c.status in ("ok", "repaired")]
    out_path = ctx.output("rationale", shard)
    with JsonlAppender(out_path, key=lambda o: o["problem_id"]) as out:
        todo = [c for c in concepts if c.problem_id not in out.done]
        if _symbolic(ctx.recipe):
            for c in todo:
                text = symbolic_rationale(c.concepts, c.difficulty)
                out.append(Rationale(problem_id=c.problem_id, problem=c.problem, concepts=c.concepts,
                                     difficulty=c.difficulty, rationale=text, source="symbolic",
                                     status="ok" if text else "parse_failed"))
        elif todo:
            backend = _teacher_backend(ctx, name="rationale")
            try:
                for i in range(0, len(todo), 256):
                    chunk = {c.problem_id: c for c in todo[i:i + 256]}
                    prompts = {k: render(RATIONALE_PROMPT, concepts="; ".join(c.concepts),
                                         difficulty=c.difficulty or "unknown", problem=c.problem)
                               for k, c in chunk.items()}
                    got = ask_teacher(backend, prompts, P.rationale_sampling, parse_rationale_reply,
                                      ctx.recipe.teacher.max_parse_retries)
                    for k, c in chunk.items():
                        (status, text, why), _ = got[k]
                        out.append(Rationale(problem_id=k, problem=c.problem, concepts=c.concepts,
                                             difficulty=c.difficulty, rationale=text, source="llm", status=status,
                                             reason=why or None))
                    ctx.log(f"rationale shard {shard}: {min(i + 256, len(todo))}/{len(todo)}")
            finally:
                backend.close()
    return _count(out_path, Rationale)


def build_sft_data(ctx: RoundContext, shard: int | None) -> dict:
    """Generator SFT examples (concepts -> rationale -> problem, weight 1), minus held-out
    problems; trains the run's SentencePiece tokenizer when the recipe asks for one."""
    from megatron_sz.data import dumps_record

    r = ctx.recipe
    rats = sorted((x for x in ctx.read("rationale") if x.status in ("ok", "repaired")), key=lambda x: x.problem_id)
    rats, dropped = ctx.heldout().filter(rats, lambda x: (x.problem,))
    examples = [WeightedExample(prompt=generator_prompt(r, x.concepts, x.difficulty),
                                target=generator_target(x.rationale, x.problem), weight=1.0,
                                weight_source={"kind": "sft"}, problem_id=x.problem_id) for x in rats]
    if not examples:
        raise UserError("no rationale survived: the generator has nothing to learn from",
                        where=str(ctx.rd.prepare_dir / "rationale"),
                        fix="check the concepts/rationale records' status and reason fields (teacher replies)")
    if r.tokenizer.kind == "sentencepiece" and r.tokenizer.train:
        _train_tokenizer(ctx, examples)
    write_jsonl(ctx.output("sft.jsonl"), examples)
    digest = hashlib.sha1("".join(dumps_record(e) for e in examples).encode()).hexdigest()[:12]
    return {"examples": len(examples), "heldout_filtered": dropped, "digest": digest}


def _train_tokenizer(ctx: RoundContext, examples: list[WeightedExample]) -> None:
    import os
    import shutil

    from megatron_sz.rollout import resolve_template
    from megatron_sz.tokenizer import train_sentencepiece

    tok_dir = ctx.rd.prepare_dir / "tokenizer"
    if (tok_dir / "tokenizer.model").exists():
        return
    r = ctx.recipe
    texts = [r.promptcot.generator_template, resolve_template(r.solver.rollout.prompt_template)]
    for e in examples:
        texts += [e.prompt, e.target]
    for p in ctx.rd.prepare_dir.joinpath("problems.jsonl").exists() and read_jsonl(
            ctx.rd.prepare_dir / "problems.jsonl", Problem) or []:
        texts += [p.solution or "", p.answer]  # the downstream solver's targets look like these
    tmp = ctx.rd.prepare_dir / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    train_sentencepiece(texts, tmp, vocab_size=r.tokenizer.vocab_size, seed=r.seed)
    shutil.rmtree(tok_dir, ignore_errors=True)
    os.replace(tmp, tok_dir)  # whole or absent: ctx.tokenizer_path looks for this folder


def _sft_recipe(recipe):
    """The recipe with ``promptcot.sft`` as the generator's WSFT section (the SFT job)."""
    return dataclasses.replace(recipe, generator=dataclasses.replace(recipe.generator, wsft=recipe.promptcot.sft))


def generator_sft(ctx: RoundContext, shard: int | None) -> dict:
    data = ctx.rd.prepare_dir / "sft.jsonl"
    return ctx.train("generator-wsft", data, initial_model(ctx.rd, ctx.recipe, "generator"), ctx.path("sft"),
                     recipe=_sft_recipe(ctx.recipe))


# --------------------------------------------------------------------------- every round


@dataclasses.dataclass(frozen=True)
class Request:
    id: str
    concepts: tuple[str, ...]
    difficulty: int | None


def requests_of(ctx: RoundContext) -> list[Request]:
    """Round t's concept-set requests: the distinct (concepts, difficulty) sets of the
    extracted concepts (x ``promptcot.difficulties`` when given), cycled to
    ``requests_per_round``. Deterministic, so every shard and every rerun agrees."""
    P = ctx.recipe.promptcot
    sets = sorted({(tuple(c.concepts), c.difficulty) for c in ctx.read("concepts") if c.status in ("ok", "repaired")},
                  key=lambda s: (s[0], s[1] or 0))
    if P.difficulties:
        sets = sorted({(cs, d) for cs, _ in sets for d in P.difficulties}, key=lambda s: (s[0], s[1]))
    if not sets:
        raise UserError("no concept sets: concept extraction failed for every problem",
                        where=str(ctx.rd.prepare_dir / "concepts"), fix="check the concept records' reason fields")
    return [Request(f"r{ctx.t:03d}-q{i:05d}", *sets[i % len(sets)]) for i in range(P.requests_per_round)]


def sample_candidates(ctx: RoundContext, shard: int | None) -> dict:
    """k candidate problems per request of this shard from the current generator."""
    from megatron_sz.inference import make_backend
    from megatron_sz.inference.base import GenerationRequest

    G, r = ctx.recipe.generator, ctx.recipe
    k = G.rollout.k
    mine = _shard_of(requests_of(ctx), shard, G.rollout.shards)
    out_path = ctx.output("sample", shard)
    with JsonlAppender(out_path, key=lambda o: o["id"]) as out:
        todo = [q for q in mine if any(f"{q.id}-s{j}" not in out.done for j in range(k))]
        prompts = {q.id: generator_prompt(r, list(q.concepts), q.difficulty) for q in todo}
        if todo:
            model = model_after(ctx, ctx.t - 1)
            backend = make_backend(G.rollout.backend, model_path=hf_folder(model) if model else None,
                                   tokenizer_path=ctx.tokenizer_path, seed=ctx.seed("sample"))
            by_id = {q.id: q for q in todo}

            def on_result(res) -> None:
                q = by_id[res.id]
                texts = list(res.texts) if res.ok else []
                for j in range(k):
                    text = texts[j] if j < len(texts) else ""
                    rationale, problem = parse_generation(text)
                    status = "backend_failed" if not res.ok else "empty" if not text.strip() else \
                        "ok" if problem else "unparsed"
                    out.append(CandidateProblem(
                        id=f"{q.id}-s{j}", round=ctx.t, request_id=q.id, prompt=prompts[q.id], text=text,
                        concepts=list(q.concepts), difficulty=q.difficulty, rationale=rationale, problem=problem,
                        status=status, finish_reason=(res.finish_reasons[j] if j < len(res.finish_reasons) else None)))

            reqs = [GenerationRequest(id=q.id, prompt=[{"role": "user", "content": prompts[q.id]}] if G.rollout.chat
                                      else prompts[q.id], n=k, sampling=G.rollout.sampling) for q in todo]
            try:
                backend.generate(reqs, progress=ctx.progress, on_result=on_result)
            finally:
                backend.close()
    return _count(out_path, CandidateProblem)


def judge_candidates(ctx: RoundContext, shard: int | None) -> dict:
    """Every judge scores every candidate of this shard on the rubric (keyed appends)."""
    from megatron_sz.systems.promptcot_rubric import (JUDGE_PROMPT, judge_score, parse_rubric,
                                                      symbolic_judgement)
    from megatron_sz.teacher.base import render

    P = ctx.recipe.promptcot
    scale = P.perfect_score
    cands = sorted((c for c in _mine(ctx, "sample", shard) if c.status == "ok"), key=lambda c: c.id)
    out_path = ctx.output("judge", shard)
    # A call that got no reply (HTTP errors / timeouts after the client's retries) is not a
    # verdict: it is taken back out of the file on a rerun and asked again (see the end).
    with JsonlAppender(out_path, key=lambda o: f"{o['candidate_id']}#{o['judge']}",
                       retry=lambda o: o.get("status") == "backend_failed") as out:
        if out.retried:
            ctx.log(f"judge shard {shard}: asking {out.retried} call(s) again that got no reply last time")
        for judge in P.judges:
            todo = [c for c in cands if f"{c.id}#{judge.name}" not in out.done]
            if not todo:
                continue
            if _symbolic(ctx.recipe):  # the exact checker is every judge
                for c in todo:
                    reply, det = symbolic_judgement(c.problem, c.concepts, c.difficulty, scale)
                    out.append(judge_score(c.id, judge.name, parse_rubric(reply, scale), scale, raw=reply,
                                           detected=det))
                continue
            backend = _teacher_backend(ctx, judge.backend, name=f"judge:{judge.name}")
            try:
                for i in range(0, len(todo), 256):
                    chunk = {c.id: c for c in todo[i:i + 256]}
                    prompts = {cid: render(JUDGE_PROMPT, concepts="; ".join(c.concepts), problem=c.problem,
                                           difficulty=c.difficulty or "any", scale=scale)
                               for cid, c in chunk.items()}

                    def parse(text):
                        rr = parse_rubric(text, scale)
                        return (rr.status if rr.parsed else "parse_failed", rr)

                    got = ask_teacher(backend, prompts, judge.sampling, parse, ctx.recipe.teacher.max_parse_retries)
                    for cid in chunk:
                        (status, rr), raw = got[cid]
                        if status == "backend_failed":
                            from megatron_sz.systems.promptcot_rubric import RubricReply

                            rr = RubricReply("backend_failed", reason="the judge's backend gave no reply")
                        out.append(judge_score(cid, judge.name, rr, scale, raw=raw))
                    ctx.log(f"judge {judge.name} shard {shard}: {min(i + 256, len(todo))}/{len(todo)}")
            finally:
                backend.close()
    counts: dict[str, int] = {}
    if out_path.exists():
        for s in read_jsonl(out_path, JudgeScore, allow_partial_tail=True):
            key = f"{s.judge}.{'perfect' if s.perfect else s.malformed or 'imperfect'}"
            counts[key] = counts.get(key, 0) + 1
    failed = {k: v for k, v in counts.items() if k.endswith(".backend_failed")}
    if failed:
        # Rejecting these silently would bias the round's data toward whatever the judge
        # server happened to answer; the shard stays not-done and a rerun asks only these.
        per_judge = ", ".join(f"{k.rsplit('.', 1)[0]}: {v}" for k, v in sorted(failed.items()))
        raise UserError(
            f"judge shard {shard}: {sum(failed.values())} judge call(s) got no reply from the judge backend "
            f"({per_judge}); the other verdicts are kept, and a rerun asks only these again",
            where=str(out_path), fix="check the judge endpoints (promptcot.judges[].backend, or "
                                     "teacher.backend) and their timeouts, then rerun the stage")
    return counts


def select_kept(ctx: RoundContext, shard: int | None) -> dict:
    """The two-judge rule: weight 1 for candidates every judge rated perfect, 0 for the rest
    (the WSFT data of this round), and the kept problems with their provenance."""
    names = [j.name for j in ctx.recipe.promptcot.judges]
    examples, kept, stats = weigh_candidates(ctx.read("sample"), ctx.read("judge"), names, round=ctx.t)
    # The held-out rule: no candidate whose problem is held out (or a benchmark's) is trained on.
    examples, dropped = ctx.heldout().filter(examples, lambda e: (e.extra.get("problem") or "", e.target))
    for e in examples:
        e.extra.pop("problem", None)
    kept, kept_dropped = ctx.heldout().filter(kept, lambda p: (p.problem,))
    write_jsonl(ctx.output("rs.jsonl"), examples)
    write_jsonl(ctx.output("kept.jsonl"), kept)
    stats.update(weight1=sum(e.weight > 0 for e in examples), weight0=sum(e.weight == 0 for e in examples),
                 heldout_filtered=dropped, heldout_filtered_kept=kept_dropped)
    ctx.log(f"select: {stats['kept']}/{stats['candidates']} candidates kept by all of {', '.join(names)} "
            f"({stats['pass_rate_all']:.1%})")
    return stats


def weigh_candidates(cands: list[CandidateProblem], scores: list[JudgeScore], judges: list[str], *,
                     round: int) -> tuple[list[WeightedExample], list[SynthesizedProblem], dict]:
    """Rejection sampling as data: one WeightedExample per candidate with text (prompt ->
    the generated text), weight 1 when ``all_perfect`` (every judge, parsed, perfect) and
    0 otherwise; the kept candidates as SynthesizedProblems; per-judge counts."""
    from megatron_sz.systems.promptcot_rubric import all_perfect

    cands = sorted(cands, key=lambda c: c.id)
    by_c: dict[str, list[JudgeScore]] = {}
    for s in scores:
        by_c.setdefault(s.candidate_id, []).append(s)
    stats: dict = {"candidates": len(cands), "parsed": sum(c.status == "ok" for c in cands),
                   "pass": {n: 0 for n in judges}, "malformed": {}, "kept": 0}
    examples, kept, level_hist, detected_hist, covered = [], [], {}, {}, set()
    for c in cands:
        sc = sorted(by_c.get(c.id, []), key=lambda s: s.judge)
        for s in sc:
            if s.perfect and s.judge in stats["pass"]:
                stats["pass"][s.judge] += 1
            if s.malformed:
                key = f"{s.judge}.{s.malformed}"
                stats["malformed"][key] = stats["malformed"].get(key, 0) + 1
        keep = c.status == "ok" and all_perfect(sc, judges)
        if c.text.strip():
            examples.append(WeightedExample(prompt=c.prompt, target=c.text, weight=1.0 if keep else 0.0,
                                            weight_source={"kind": "rejection_sampling", "kept": keep,
                                                           "judges": {s.judge: s.perfect for s in sc}},
                                            problem_id=c.id, extra={"problem": c.problem}))
        if not keep:
            continue
        stats["kept"] += 1
        covered.add((tuple(c.concepts), c.difficulty))
        level_hist[str(c.difficulty)] = level_hist.get(str(c.difficulty), 0) + 1
        for lv in sc[0].detected.get("levels") or []:
            detected_hist[str(lv)] = detected_hist.get(str(lv), 0) + 1
        kept.append(SynthesizedProblem(
            id="pc-" + hashlib.sha1(c.problem.strip().encode()).hexdigest()[:12], problem=c.problem.strip(),
            round=round, candidate_id=c.id, concepts=c.concepts, difficulty=c.difficulty, rationale=c.rationale,
            judge_scores=[{"judge": s.judge, "scores": s.scores, "status": s.status} for s in sc]))
    requested = {(tuple(c.concepts), c.difficulty) for c in cands}
    n = max(1, len(cands))
    stats.update(pass_rate={j: stats["pass"][j] / n for j in judges}, pass_rate_all=stats["kept"] / n,
                 concept_sets_requested=len(requested), concept_sets_covered=len(covered & requested),
                 concept_coverage=len(covered & requested) / max(1, len(requested)),
                 difficulty_hist=level_hist, detected_level_hist=detected_hist)
    return examples, kept, stats


def generator_rs(ctx: RoundContext, shard: int | None) -> dict:
    """Rejection sampling as WSFT: weight 1 on kept candidates, weight 0 on the rest."""
    data = ctx.path("rs.jsonl")
    recs = read_jsonl(data, WeightedExample)
    if not any(e.weight > 0 for e in recs):
        return {"model": None, "skipped": "no candidate was kept by every judge", "examples": len(recs)}
    info = ctx.train("generator-wsft", data, model_after(ctx, ctx.t - 1), ctx.path("rs"))
    info.update(examples=len(recs), weight1=sum(e.weight > 0 for e in recs))
    return info


def synthesize(ctx: RoundContext, shard: int | None) -> dict:
    """The synthesized set after round t: the previous set plus this round's kept problems,
    minus exact / near duplicates and anything close to a held-out or benchmark problem."""
    from megatron_sz import heldout
    from megatron_sz.curriculum import DedupIndex
    from megatron_sz.evaluation.contamination import ContaminationIndex, load_problem_texts

    P, C = ctx.recipe.promptcot, ctx.recipe.curriculum
    prev = ctx.read("synthesized.jsonl") if ctx.t > 0 else []
    texts = heldout.heldout_texts(ctx.rd, ctx.recipe)
    for f in ctx.recipe.eval.benchmarks:  # the benchmarks `megatron-sz eval` scores on, too
        texts += load_problem_texts(ctx.recipe.resolve_path(f))
    guard = ContaminationIndex(texts, ngram=C.contamination_ngram, near_dup_threshold=P.contamination_threshold) \
        if texts else None
    dedup = DedupIndex(threshold=P.near_dup_threshold)
    for p in prev:
        dedup.add(p.id, p.problem)
    added: list[SynthesizedProblem] = []
    counts = {"exact_duplicates": 0, "near_duplicates": 0, "contaminated": 0}
    for p in sorted(ctx.read("kept.jsonl"), key=lambda p: p.candidate_id):
        if guard is not None and guard.check(p.problem) is not None:
            counts["contaminated"] += 1
            continue
        dup = dedup.find(p.problem)
        if dup is not None:
            counts["exact_duplicates" if dup[0] == "exact" else "near_duplicates"] += 1
            continue
        dedup.add(p.id, p.problem)
        added.append(p)
    out = prev + added
    write_jsonl(ctx.output("synthesized.jsonl"), out)
    return {**counts, "added": len(added), "total": len(out),
            "duplicates_removed": counts["exact_duplicates"] + counts["near_duplicates"]}


# --------------------------------------------------------------------------- downstream (last round)


def teacher_solutions(ctx: RoundContext, shard: int | None) -> dict:
    """The teacher solves the synthesized set (symbolic: exactly; LLM: two low-temperature
    attempts that must agree on the boxed answer)."""
    from megatron_sz.rollout import solver_prompt
    from megatron_sz.systems.promptcot_rubric import symbolic_solution
    from megatron_sz.verify import extract_answer, is_equivalent

    P = ctx.recipe.promptcot
    synth = ctx.read("synthesized.jsonl")
    out_path = ctx.output("solutions.jsonl")
    counts = {"solved": 0, "unsolved": 0}
    with JsonlAppender(out_path, key=lambda o: o["id"]) as out:
        todo = [p for p in synth if p.id not in out.done]

        def problem_of(p: SynthesizedProblem, answer: str, solution: str) -> Problem:
            return Problem(id=p.id, problem=p.problem, answer=answer, solution=solution,
                           subject=p.concepts[0] if p.concepts else None, level=p.difficulty,
                           provenance="generator", round=p.round, extra={"concepts": p.concepts})

        if _symbolic(ctx.recipe):
            for p in todo:
                got = symbolic_solution(p.problem)
                if got is None:
                    counts["unsolved"] += 1
                    continue
                out.append(problem_of(p, *got))
                counts["solved"] += 1
        elif todo:
            def parse(texts):
                if not texts:
                    return ("parse_failed", None)
                answers = [extract_answer(x, last_number_fallback=False) for x in texts]
                if any(a is None for a in answers) or not all(is_equivalent(a, answers[0]) for a in answers[1:]):
                    return ("parse_failed", None)
                return ("ok", answers[0])

            backend = _teacher_backend(ctx, name="solutions")
            try:
                by_id = {p.id: p for p in todo}
                got = ask_teacher(backend, {k: solver_prompt(Problem(id=k, problem=p.problem, answer="?"))
                                            for k, p in by_id.items()},
                                  P.solve_sampling, parse, 0, n=2)
                for k, p in by_id.items():
                    (status, answer), raw = got[k]
                    if status != "ok":
                        counts["unsolved"] += 1
                        continue
                    out.append(problem_of(p, answer, raw.split("\n\u241e\n")[0].strip()))
                    counts["solved"] += 1
            finally:
                backend.close()
    counts["total"] = sum(1 for _ in iter_jsonl(out_path, allow_partial_tail=True))
    return counts


def solver_sft(ctx: RoundContext, shard: int | None) -> dict:
    """A solver trained by SFT on the synthesized set (teacher solutions), held-out rule applied."""
    probs, dropped = ctx.heldout().filter(ctx.read("solutions.jsonl"), lambda p: (p.problem,))
    data = ctx.output("solver_sft.jsonl")
    write_jsonl(data, probs)
    if not probs:
        return {"model": None, "skipped": "no solved synthesized problems", "heldout_filtered": dropped}
    info = ctx.train("solver-sft", data, initial_model(ctx.rd, ctx.recipe, "solver"), ctx.path("solver_sft"))
    info.update(heldout_filtered=dropped, examples=len(probs))
    return info


def quality(ctx: RoundContext, shard: int | None) -> dict:
    from megatron_sz.systems.promptcot_report import measure_quality

    return measure_quality(ctx)


def report(ctx: RoundContext, shard: int | None) -> dict:
    from megatron_sz.systems.promptcot_report import write_round_metrics

    return write_round_metrics(ctx)
