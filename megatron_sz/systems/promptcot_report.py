"""PromptCoT's per-round metrics, plot and the synthesized set's quality report.

Every number comes from the round's completion markers (select, synthesize, rs,
quality), so the report can be rebuilt at any time and a resumed run reports exactly
what an uninterrupted one would. ``metrics.jsonl`` is rewritten whole from the
per-round ``rounds/rNNN/metrics.json`` in the same form the local executor's final
check expects (one ``json.dumps(sort_keys=True)`` line per round), and ``plot.png``
beside it; ``RUN/synthesized.jsonl`` is the newest round's synthesized set.

The quality report (``promptcot.downstream``, last round) measures the set four ways:
the judges' pass rate, diversity (share of near-duplicate pairs at the recipe's
threshold), difficulty (a reference solver's success rate per requested level) and
the existing generator-validity evaluation (``evaluation.run.generator_validity``)
with the PromptCoT generator behind a prompt adapter.
"""
from __future__ import annotations

import json
import os
import shutil

from megatron_sz.data import Problem, atomic_write_json, atomic_write_text


def round_metrics(rd, t: int) -> dict:
    sel = rd.read_marker(t, "select") or {}
    syn = rd.read_marker(t, "synthesize") or {}
    rs = rd.read_marker(t, "rs") or {}
    m: dict = {"round": t}
    for k in ("candidates", "parsed", "kept", "pass_rate", "pass_rate_all", "concept_coverage",
              "concept_sets_requested", "concept_sets_covered", "difficulty_hist", "detected_level_hist",
              "malformed", "heldout_filtered", "heldout_filtered_kept", "weight1", "weight0"):
        if k in sel:
            m[k] = sel[k]
    m["synthesized"] = {k: syn.get(k) for k in ("added", "total", "duplicates_removed", "exact_duplicates",
                                                 "near_duplicates", "contaminated")}
    m["generator"] = {"loss": (rs.get("summary") or {}).get("loss"), "skipped": rs.get("skipped")}
    if t == 0:
        sft = rd.read_marker(0, "sft") or {}
        m["sft_loss"] = (sft.get("summary") or {}).get("loss")
    q = rd.read_marker(t, "quality")
    if q:
        m["quality"] = {k: v for k, v in q.items() if k not in ("seconds", "pid", "host", "finished")}
    return m


def _rows(rd) -> list[dict]:
    rows = []
    for t in rd.rounds_present():
        p = rd.round_dir(t) / "metrics.json"
        if p.exists():
            rows.append(json.loads(p.read_text(encoding="utf-8")))
    return rows


def write_round_metrics(ctx) -> dict:
    rd, t = ctx.rd, ctx.t
    m = round_metrics(rd, t)
    atomic_write_json(rd.round_dir(t) / "metrics.json", m)
    rows = _rows(rd)
    atomic_write_text(rd.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    plot(rows, rd.plot_path)
    synth = rd.round_dir(t) / "synthesized.jsonl"
    if synth.exists():
        tmp = rd.root / ".synthesized.jsonl.tmp"
        shutil.copyfile(synth, tmp)
        os.replace(tmp, rd.root / "synthesized.jsonl")
    both = m.get("pass_rate_all")
    ctx.log(f"report: {m.get('kept', 0)}/{m.get('candidates', 0)} kept"
            + (f" ({both:.1%})" if isinstance(both, float) else "")
            + f", synthesized set {m['synthesized'].get('total')} problems -> {rd.metrics_path}")
    return {"metrics": str(rd.metrics_path), "pass_rate_all": both}


def plot(rows: list[dict], path) -> None:
    """Three panels: pass rate per judge and all judges; synthesized set; difficulty histogram."""
    from megatron_sz.evaluation.plots import _plt, _save

    plt = _plt()
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 3.8))
    rounds = [r["round"] for r in rows]
    judges = sorted({j for r in rows for j in (r.get("pass_rate") or {})})
    for j in judges:
        a1.plot(rounds, [(r.get("pass_rate") or {}).get(j) for r in rows], marker=".", label=j)
    a1.plot(rounds, [r.get("pass_rate_all") for r in rows], marker="o", color="black", label="all judges (kept)")
    a1.plot(rounds, [r.get("concept_coverage") for r in rows], marker="x", ls="--", label="concept sets covered")
    a1.set_xlabel("round")
    a1.set_ylabel("share")
    a1.set_ylim(-0.02, 1.02)
    a1.set_title("Judges: perfect share of candidates")
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    syn = [r.get("synthesized") or {} for r in rows]
    a2.plot(rounds, [s.get("total") or 0 for s in syn], marker="o", color="black", label="synthesized set")
    a2.bar(rounds, [s.get("duplicates_removed") or 0 for s in syn], width=0.35, alpha=0.6, label="duplicates removed")
    a2.bar([x + 0.35 for x in rounds], [s.get("contaminated") or 0 for s in syn], width=0.35, alpha=0.6,
           label="held-out / benchmark hits")
    a2.set_xlabel("round")
    a2.set_ylabel("problems")
    a2.set_title("Synthesized set")
    a2.legend(fontsize=7)
    a2.grid(alpha=0.3)
    levels = [str(d) for d in range(1, 6)]
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        h = r.get("difficulty_hist") or {}
        a3.bar([int(lv) + i * width for lv in levels], [h.get(lv, 0) for lv in levels], width=width,
               label=f"round {r['round']}")
    a3.set_xlabel("requested difficulty of kept problems")
    a3.set_ylabel("problems")
    a3.set_title("Difficulty histogram")
    a3.legend(fontsize=7)
    a3.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------- quality


def diversity(texts: list[str], threshold: float) -> dict:
    """Near-duplicate share: problems that have an exact or near duplicate (Jaccard of word
    3-grams >= threshold) elsewhere in the set."""
    from megatron_sz.textsim import near_duplicate_pairs

    pairs = near_duplicate_pairs(texts, threshold=threshold)
    involved = {i for p in pairs for i in p[:2]}
    return {"problems": len(texts), "near_duplicate_pairs": len(pairs),
            "near_duplicate_share": len(involved) / len(texts) if texts else 0.0, "threshold": threshold}


class _SymbolicSolverBackend:
    """An inference backend that answers solver prompts with the symbolic teacher's exact
    solutions (the tiny recipe's stand-in for the teacher LLM in generator validity)."""

    def __init__(self, template: str | None):
        self.template = template

    def generate(self, requests, *, progress: bool = True, on_result=None):
        from megatron_sz.inference.base import GenerationResult
        from megatron_sz.systems.promptcot_rubric import parse_symbolic, symbolic_solution

        out = []
        for req in requests:
            prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[-1]["content"]
            import re

            starts = [prompt[m.start():].split("\n")[0].strip() for m in re.finditer(r"Compute |Solve for x:", prompt)]
            problem = next((s for s in reversed(starts) if parse_symbolic(s)), None)
            got = symbolic_solution(problem) if problem else None
            text = got[1] if got else "I cannot solve this."
            out.append(GenerationResult(id=req.id, texts=[text] * req.n, finish_reasons=["stop"] * req.n))
        return out

    def close(self) -> None:
        pass


class _ConceptPromptBackend:
    """Generator validity asks the generator with Socratic-Zero's refinement prompt; this
    adapter replaces it by the PromptCoT prompt of the parent problem's concepts."""

    def __init__(self, inner, prompts: dict[str, str]):
        self.inner, self.prompts = inner, prompts

    def generate(self, requests, *, progress: bool = True, on_result=None):
        import dataclasses

        from megatron_sz.systems.promptcot import parse_generation

        reqs = [dataclasses.replace(r, prompt=self.prompts[r.meta["parent_id"]]) for r in requests]
        res = self.inner.generate(reqs, progress=progress)
        for r in res:  # the validity check reads the problem, not the rationale
            r.texts = [parse_generation(x)[1] or "" for x in r.texts]
        return res

    def close(self) -> None:
        self.inner.close()


def measure_quality(ctx) -> dict:
    """Pass rate, diversity, difficulty (reference solver), generator validity, held-out accuracy."""
    from pathlib import Path

    from megatron_sz.inference import make_backend
    from megatron_sz.round import hf_folder
    from megatron_sz.rollout import rollout
    from megatron_sz.systems.promptcot import generator_prompt, model_after

    r, rd, P = ctx.recipe, ctx.rd, ctx.recipe.promptcot
    synth = ctx.read("synthesized.jsonl")
    solved = ctx.read("solutions.jsonl")
    info: dict = {"synthesized": len(synth), "solved": len(solved)}
    cand = sum((rd.read_marker(t, "select") or {}).get("candidates", 0) for t in range(ctx.t + 1))
    kept = sum((rd.read_marker(t, "select") or {}).get("kept", 0) for t in range(ctx.t + 1))
    info["judge_pass_rate"] = kept / cand if cand else None
    info["diversity"] = diversity([p.problem for p in synth], P.near_dup_threshold)
    ro = r.solver.rollout
    sft = rd.read_marker(ctx.t, "solver_sft") or {}
    ref = str(r.resolve_path(P.reference_solver)) if P.reference_solver else (hf_folder(sft["model"])
                                                                              if sft.get("model") else None)
    if ref is None or not solved:
        info["difficulty"] = None
        info["skipped"] = "no reference solver (set promptcot.reference_solver) or nothing solved"
        return info
    info["reference_solver"] = ref
    backend = make_backend(ro.backend, model_path=ref, tokenizer_path=ctx.tokenizer_path, seed=ctx.t)
    try:
        trajs = rollout(solved, backend, k=P.reference_k, sampling=ro.sampling, template=ro.prompt_template,
                        out_path=ctx.output("quality.jsonl"), shard=(0, 1), verify=True, chat=ro.chat,
                        progress=ctx.progress)
        level = {p.id: p.level for p in solved}
        by_level: dict[str, list[int]] = {}
        for tr in trajs:
            by_level.setdefault(str(level.get(tr.problem_id)), []).append(tr.correct is True)
        info["difficulty"] = {"success_rate": sum(tr.correct is True for tr in trajs) / max(1, len(trajs)),
                              "by_level": {k: sum(v) / len(v) for k, v in sorted(by_level.items())},
                              "k": P.reference_k}
        held = ctx.read("heldout.jsonl")
        if held and sft.get("model"):
            ev = rollout(held, backend, k=1, sampling=r.eval.sampling, template=ro.prompt_template, shard=(0, 1),
                         verify=True, chat=ro.chat, progress=ctx.progress)
            info["solver_heldout_accuracy"] = sum(tr.correct is True for tr in ev) / max(1, len(ev))
    finally:
        backend.close()
    # Generator validity (the existing evaluation): the final generator, the seeds' concepts.
    concepts = {c.problem_id: c for c in ctx.read("concepts") if c.status in ("ok", "repaired")}
    seeds = [Problem(id=k, problem=c.problem, answer="?") for k, c in sorted(concepts.items())]
    model = model_after(ctx, ctx.t)
    if seeds and model:
        from megatron_sz.evaluation.run import generator_validity

        gen = make_backend(r.generator.rollout.backend, model_path=hf_folder(model),
                           tokenizer_path=ctx.tokenizer_path, seed=ctx.t + 1)
        prompts = {k: generator_prompt(r, c.concepts, c.difficulty) for k, c in concepts.items()}
        solver = _SymbolicSolverBackend(ro.prompt_template) if r.teacher.kind == "symbolic" else \
            make_backend(r.teacher.backend, seed=ctx.t + 2)
        try:
            v = generator_validity(seeds, _ConceptPromptBackend(gen, prompts), solver,
                                   Path(ctx.path("validity")), n=min(64, max(8, len(seeds))),
                                   sampling=r.generator.rollout.sampling, solve_sampling=P.solve_sampling,
                                   seed=r.seed, progress=ctx.progress)
            info["generator_validity"] = v.get("validity")
        finally:
            gen.close()
            solver.close()
    return info
