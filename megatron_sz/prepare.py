"""Round 0's ``prepare`` stage: everything a run needs before the solver's SFT warm-up.

In order, each step skipped when its output already exists (the stage is resumable):

1. seed problems -> ``prepare/seeds.jsonl`` (the recipe's seed file, validated, or
   ``seeds_from_teacher`` problems sampled from the symbolic teacher);
2. held-out problems -> ``prepare/heldout.jsonl`` (``eval.heldout_file`` or sampled from
   the symbolic teacher with a seed disjoint from the seeds);
3. warm-up SFT examples -> ``prepare/sft.jsonl`` (prompt = the solver prompt, target = the
   reference solution) from ``warmup.data_file``, sampled symbolic problems, or the seeds;
4. a SentencePiece tokenizer -> ``prepare/tokenizer/`` when ``tokenizer.train`` (trained on
   seed + warm-up text and the prompt template only, never on held-out problems);
5. D_0 -> ``rounds/r000/pool.jsonl`` and ``active.jsonl``.

Seeds (D_0) and warm-up examples that are held-out or benchmark problems
(``heldout.for_run``) are dropped and counted (``heldout_filtered_seeds`` /
``heldout_filtered_warmup`` in the stage marker): no role trains on them.
"""
from __future__ import annotations

from megatron_sz.data import Problem, WeightedExample, read_jsonl, write_jsonl
from megatron_sz.errors import UserError


def _symbolic(ctx):
    from megatron_sz.teacher.symbolic import SymbolicTeacher

    return SymbolicTeacher(seed=ctx.recipe.teacher.seed or ctx.recipe.seed)


def load_seed_problems(recipe) -> list[Problem]:
    """The seed problems a recipe names (validated); raises UserError naming file:line."""
    if recipe.seeds_from_teacher:
        if recipe.teacher.kind != "symbolic":
            raise UserError("seeds_from_teacher needs the symbolic teacher", where="seeds_from_teacher",
                            fix="set teacher.kind: symbolic, or use seeds_file")
        return []  # sampled in prepare (deterministic), nothing to validate
    path = recipe.resolve_path(recipe.seeds_file)
    if path is None or not path.is_file():
        raise UserError(f"seed file not found: {recipe.seeds_file}", where="seeds_file",
                        fix="point seeds_file at a JSONL of problems (see seeds/README.md)")
    problems = read_jsonl(path, Problem)
    if not problems:
        raise UserError(f"seed file {path} has no problems", where=str(path), fix="add problems")
    ids = [p.id for p in problems]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise UserError(f"duplicate problem ids {dup[:3]}", where=str(path), fix="make ids unique")
    return problems


def prepare_run(ctx) -> dict:
    from megatron_sz import curriculum as C

    r, pdir = ctx.recipe, ctx.rd.prepare_dir
    pdir.mkdir(parents=True, exist_ok=True)
    info: dict = {}

    seeds_path = pdir / "seeds.jsonl"
    if not seeds_path.exists():
        if r.seeds_from_teacher:
            seeds = _symbolic(ctx).sample_problems(r.seeds_from_teacher, seed=r.seed, families=r.warmup.families,
                                                    difficulty=tuple(r.warmup.difficulty), provenance="seed")
        else:
            seeds = load_seed_problems(r)
        write_jsonl(seeds_path, seeds)
    seeds = read_jsonl(seeds_path, Problem)
    info["seeds"] = len(seeds)

    held_path = pdir / "heldout.jsonl"
    if not held_path.exists():
        if r.eval.heldout_file:
            held = read_jsonl(r.resolve_path(r.eval.heldout_file), Problem)
        elif r.teacher.kind == "symbolic":
            held = _symbolic(ctx).sample_problems(r.eval.heldout_size, seed=r.seed + 7919,
                                                  difficulty=tuple(r.warmup.difficulty), families=r.warmup.families,
                                                  exclude_ids={p.id for p in seeds})
        else:
            held = []
        write_jsonl(held_path, held)
    held = read_jsonl(held_path, Problem)
    info["heldout"] = len(held)

    # No role trains on held-out or benchmark problems: D_0 and the warm-up data are filtered.
    from megatron_sz import heldout

    guard = heldout.for_run(ctx.rd, r)
    seeds, info["heldout_filtered_seeds"] = guard.filter(seeds, lambda p: (p.problem,))

    sft_path = pdir / "sft.jsonl"
    if not sft_path.exists():
        from megatron_sz.pairs import reference_text
        from megatron_sz.rollout import solver_prompt

        w = r.warmup
        if w.data_file:
            warm = read_jsonl(r.resolve_path(w.data_file), Problem)
        elif w.symbolic_problems:
            warm = _symbolic(ctx).sample_problems(
                w.symbolic_problems, seed=r.seed + 104729, difficulty=tuple(w.difficulty), families=w.families,
                exclude_ids={p.id for p in seeds} | {p.id for p in held})
        else:
            warm = list(seeds)
        warm, info["heldout_filtered_warmup"] = guard.filter(warm, lambda p: (p.problem,))
        tmpl = r.solver.rollout.prompt_template
        write_jsonl(sft_path, [WeightedExample(prompt=solver_prompt(p, tmpl), target=reference_text(p),
                                               weight=1.0, problem_id=p.id) for p in warm])
    info["sft_examples"] = sum(1 for _ in open(sft_path, encoding="utf-8"))

    tok_dir = pdir / "tokenizer"
    if r.tokenizer.kind == "sentencepiece" and r.tokenizer.train and not (tok_dir / "tokenizer.model").exists():
        from megatron_sz.pairs import GENERATOR_TEMPLATE
        from megatron_sz.rollout import resolve_template
        from megatron_sz.tokenizer import train_sentencepiece

        texts = [resolve_template(r.solver.rollout.prompt_template), GENERATOR_TEMPLATE]
        for p in seeds:
            texts += [p.problem, p.solution or "", p.answer]
        for o in read_jsonl(sft_path):
            texts += [o["prompt"], o["target"]]
        train_sentencepiece(texts, tok_dir, vocab_size=r.tokenizer.vocab_size, seed=r.seed)
    if tok_dir.exists():
        info["tokenizer"] = str(tok_dir)

    pool_path = ctx.rd.round_dir(0) / "pool.jsonl"
    if not pool_path.exists():
        pool = C.initial_pool(seeds)
        active = C.select_active(pool, 0, r.curriculum, seed=r.seed)
        write_jsonl(ctx.rd.round_dir(0) / "active.jsonl", active)
        write_jsonl(pool_path, pool)  # written last: the stage's real output
    return info
