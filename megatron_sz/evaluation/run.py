"""`megatron-sz eval`: benchmarks scored as mean@k and pass@k, and generator validity.

Benchmark evaluation is a solver rollout over benchmark problems, so it reuses
``rollout.rollout`` (sharding, resumable keyed appends, rule verification) and the
teacher's judge for what the rules cannot decide. Layout of an eval directory::

    OUT/
      settings.json                       exactly what was computed (k, sampling, judge, files)
      samples/shard-0001-of-0004.jsonl    Trajectory per sample (rule verdicts), keyed appends
      judged/shard-0001-of-0004.jsonl     the same after the judge (atomic; only with a judge)
      _done/shard-0001-of-0004.json       shard completion markers
      results.json  results.md            per-benchmark and macro-average tables

Shard i of n (``--shard i --num-shards n``, e.g. a SLURM array) evaluates a
deterministic slice of all benchmark problems; ``--summarize`` (or a run with one
shard) scores whatever shards are complete and says which are missing.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_sz.data import Problem, Trajectory, atomic_write_json, atomic_write_text, read_jsonl, write_jsonl
from megatron_sz.errors import UserError
from megatron_sz.evaluation.benchmarks import BenchmarkItem, load_benchmark
from megatron_sz.evaluation.metrics import macro_average, score_samples
from megatron_sz.recipe import BackendSpec, SamplingSpec


@dataclass
class EvalSettings:
    k: int = 32
    pass_ks: list[int] = field(default_factory=lambda: [1])
    sampling: SamplingSpec = field(default_factory=lambda: SamplingSpec(temperature=0.7, top_p=0.9, max_tokens=4096))
    template: str | None = None  # solver prompt template (None: the packaged one)
    judge_model: str | None = None  # name recorded in settings; None when no judge ran
    backend: str = "local"
    model: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _shard_tag(i: int, n: int) -> str:
    return f"{i + 1:04d}-of-{n:04d}"


def load_benchmarks(paths: list[str], field_map: dict | None = None, limit: int | None = None
                    ) -> list[BenchmarkItem]:
    items: list[BenchmarkItem] = []
    names: dict[str, str] = {}
    for p in paths:
        bench = load_benchmark(p, field_map=field_map, limit=limit)
        if bench and bench[0].benchmark in names:
            raise UserError(f"two files map to benchmark {bench[0].benchmark!r}: {names[bench[0].benchmark]} and {p}",
                            fix="rename one of them so the benchmark names differ")
        if bench:
            names[bench[0].benchmark] = p
        items.extend(bench)
    return items


def round_model(run_dir: str, round_index: int, role: str = "solver") -> str:
    """The HF export of ``role``'s model after round t of any system: the last training
    stage of that role in the round's plan whose output has an ``hf/`` folder."""
    from megatron_sz.round import plan_round
    from megatron_sz.rundir import RunDir

    rd = RunDir.open(run_dir)
    plan = plan_round(rd.load_recipe(), round_index)
    trained = [s for s in plan.stages if s.train and s.role == role]
    for s in reversed(trained):
        cand = rd.stage_dir(round_index, s.name) / "hf"
        if (cand / "config.json").is_file():
            return str(cand)
    roles = sorted({s.role for s in plan.stages if s.train})
    raise UserError(f"no {role} HF checkpoint for round {round_index} under {rd.round_dir(round_index)}",
                    fix=f"check the round's {role} training stages ({', '.join(s.name for s in trained) or 'none'}) "
                        f"have finished (megatron-sz status RUN_DIR); trained roles: {', '.join(roles)}")


def resolve_model(model: str | None, run_dir: str | None, round_index: int | None, work: Path,
                  role: str = "solver") -> str:
    """An HF folder to serve: given directly, exported from a Megatron checkpoint, or a run's round."""
    if run_dir is not None:
        if round_index is None:
            raise UserError("--run-dir needs --round", fix="pass --round N (the round whose model to evaluate)")
        return round_model(run_dir, round_index, role)
    if model is None:
        raise UserError("no model given", fix="pass --model PATH (HF folder or Megatron checkpoint) or --run-dir/--round")
    path = Path(model)
    if (path / "config.json").is_file():
        return str(path)
    if path.is_dir() and ((path / "latest").exists() or (path / "hf_config.json").exists()):
        from megatron_sz.megatron import mcore_to_hf

        out = work / "hf-export"
        if not (out / "config.json").is_file():
            mcore_to_hf(str(path), str(out))
        return str(out)
    if "/" not in model or not path.exists():
        return model  # a served model name (OpenAI backend) or a path the backend resolves
    raise UserError(f"{model} is neither an HF folder (config.json) nor a Megatron checkpoint (latest)",
                    fix="point --model at a checkpoint folder")


def evaluate_shard(items: list[BenchmarkItem], backend, out_dir: Path, settings: EvalSettings, *,
                   shard: tuple[int, int] = (0, 1), judge=None, progress: bool = True) -> Path:
    """Roll out and verify shard ``shard`` of ``items``; returns the shard's final sample file."""
    from megatron_sz.rollout import rollout, shard_slice

    out_dir = Path(out_dir)
    tag = _shard_tag(*shard)
    marker = out_dir / "_done" / f"shard-{tag}.json"
    final = out_dir / ("judged" if judge is not None else "samples") / f"shard-{tag}.jsonl"
    if marker.is_file() and final.is_file():
        return final
    problems = [Problem(id=it.id, problem=it.problem, answer=it.answer, provenance="user",
                        extra={"benchmark": it.benchmark}) for it in items]
    t0 = time.time()
    trajs = rollout(problems, backend, k=settings.k, sampling=settings.sampling, template=settings.template,
                    out_path=out_dir / "samples" / f"shard-{tag}.jsonl", shard=shard, progress=progress)
    expected = len(shard_slice(problems, *shard))
    if len(trajs) != expected * settings.k:
        raise UserError(f"shard {tag}: {len(trajs) // max(settings.k, 1)} of {expected} problems have all "
                        f"{settings.k} samples", fix="re-run the same command; finished problems are kept")
    if judge is not None:
        by_id = {p.id: p for p in problems}
        trajs = judge.verify(by_id, trajs)
        write_jsonl(final, trajs)
    atomic_write_json(marker, {"shard": tag, "problems": expected, "samples": len(trajs),
                               "seconds": round(time.time() - t0, 2)})
    return final


def summarize(out_dir: Path, items: list[BenchmarkItem], settings: EvalSettings, *, num_shards: int) -> dict:
    """Score all complete shards; write results.json and results.md; return the results."""
    out_dir = Path(out_dir)
    bench_of = {it.id: it.benchmark for it in items}
    samples: dict[str, list[dict]] = {}
    missing = []
    for i in range(num_shards):
        tag = _shard_tag(i, num_shards)
        if not (out_dir / "_done" / f"shard-{tag}.json").is_file():
            missing.append(tag)
            continue
        path = out_dir / "judged" / f"shard-{tag}.jsonl"
        if not path.is_file():
            path = out_dir / "samples" / f"shard-{tag}.jsonl"
        for tr in read_jsonl(path, Trajectory, allow_partial_tail=True):
            bench = bench_of.get(tr.problem_id)
            if bench is None:
                continue
            samples.setdefault(bench, []).append({
                "problem_id": tr.problem_id, "correct": bool(tr.correct), "verifier": tr.verifier,
                "extracted_answer": tr.extracted_answer})
    if missing:
        raise UserError(f"{len(missing)} of {num_shards} shards are not finished: {', '.join(missing[:5])}",
                        fix="run the missing shards (or the whole eval again) before --summarize")
    ks = sorted(set(settings.pass_ks) | {settings.k})
    scores = [score_samples(s, benchmark=b, ks=ks) for b, s in sorted(samples.items())]
    results = {
        "settings": settings.to_dict(),
        "metric_definitions": {
            "mean_at_k": "average over the k samples of per-sample accuracy (per problem, then over problems)",
            "pass_at_k": "unbiased estimator 1 - C(n-c,k)/C(n,k), averaged over problems",
        },
        "benchmarks": [dataclasses.asdict(s) for s in scores],
        "macro_average": macro_average(scores),
    }
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "results.md", results_markdown(results))
    return results


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def results_markdown(results: dict) -> str:
    s = results["settings"]
    k = s["k"]
    ks = sorted({int(x) for b in results["benchmarks"] for x in b["pass_at_k"]})
    head = ["benchmark", "problems", f"mean@{k}"] + [f"pass@{x}" for x in ks] + ["rule %", "judge %", "unparseable %"]
    lines = [f"# Evaluation of `{s.get('model')}`", "",
             f"k={k}, temperature={s['sampling']['temperature']}, top_p={s['sampling']['top_p']}, "
             f"max_tokens={s['sampling']['max_tokens']}, judge={s.get('judge_model') or 'none (rule verifier only)'}, "
             f"backend={s.get('backend')}", "",
             "mean@k = average over the k samples of per-sample accuracy; "
             "pass@k = unbiased 1 - C(n-c,k)/C(n,k).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in results["benchmarks"]:
        row = [b["benchmark"], str(b["problems"]), _pct(b["mean_at_k"])]
        row += [_pct(b["pass_at_k"].get(x, b["pass_at_k"].get(str(x)))) for x in ks]
        row += [_pct(b["decided_by"].get("rule", 0.0)), _pct(b["decided_by"].get("judge", 0.0)),
                _pct(b["unparseable_rate"])]
        lines.append("| " + " | ".join(row) + " |")
    macro = results["macro_average"]
    if macro:
        row = ["**macro average**", "", _pct(macro.get("mean_at_k"))]
        row += [_pct(macro.get(f"pass_at_{x}")) for x in ks] + ["", "", ""]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- generator validity


def generator_validity(seeds: list[Problem], generator_backend, solver_backend, out_dir: Path, *,
                       n: int, sampling: SamplingSpec, solve_sampling: SamplingSpec, attempts: int = 2,
                       seed: int = 0, progress: bool = True) -> dict:
    """Paper §4.3: generate ``n`` problems from seeds, keep those the teacher solves consistently.

    A generated problem is **valid** when the teacher's ``attempts`` solutions at low
    temperature all finish within the token budget (no truncation), all give an
    extractable answer, and all agree. Valid problems are written with the teacher's
    solution as ``valid.jsonl`` (``Problem`` records, provenance ``generator``), ready for
    ``megatron-sz train solver-sft``.
    """
    import random

    from megatron_sz.inference.base import GenerationRequest
    from megatron_sz.pairs import generator_prompt
    from megatron_sz.rollout import solver_prompt
    from megatron_sz.verify import extract_answer, is_equivalent

    if not seeds:
        raise UserError("no seed problems to generate from", fix="pass a non-empty --seeds file")
    rng = random.Random(seed)
    parents = [seeds[rng.randrange(len(seeds))] for _ in range(n)]
    gen_reqs = [GenerationRequest(id=f"gen-{i:05d}", prompt=generator_prompt(p, p.solution), n=1, sampling=sampling,
                                  meta={"parent_id": p.id}) for i, p in enumerate(parents)]
    generated = generator_backend.generate(gen_reqs, progress=progress)
    problems = []
    for req, res in zip(gen_reqs, generated):
        text = (res.texts[0] if res.ok and res.texts else "").strip()
        problems.append((req, text))
    solve_reqs = [GenerationRequest(id=req.id, prompt=solver_prompt(Problem(id=req.id, problem=text or "(empty)", answer="?")),
                                    n=attempts, sampling=solve_sampling) for req, text in problems if text]
    solved = {r.id: r for r in solver_backend.generate(solve_reqs, progress=progress)}
    records, valid = [], []
    counts = {"generated": n, "empty": 0, "truncated": 0, "no_answer": 0, "disagree": 0, "backend_failed": 0, "valid": 0}
    for req, text in problems:
        rec = {"id": req.id, "parent_id": req.meta["parent_id"], "problem": text}
        res = solved.get(req.id)
        if not text:
            status = "empty"
        elif res is None or not res.ok or len(res.texts) < attempts:
            status = "backend_failed"
        elif any(fr == "length" for fr in res.finish_reasons):
            status = "truncated"
        else:
            answers = [extract_answer(t, last_number_fallback=False) for t in res.texts]
            if any(a is None for a in answers):
                status = "no_answer"
            elif not all(is_equivalent(a, answers[0]) for a in answers[1:]):
                status = "disagree"
            else:
                status = "valid"
                valid.append(Problem(id=req.id, problem=text, answer=answers[0], solution=res.texts[0].strip(),
                                     provenance="generator", parent_id=req.meta["parent_id"]))
        counts[status] += 1
        rec["status"] = status
        records.append(rec)
    write_jsonl(Path(out_dir) / "generated.jsonl", records)
    write_jsonl(Path(out_dir) / "valid.jsonl", valid)
    summary = {**counts, "validity": counts["valid"] / n if n else 0.0,
               "definition": f"valid = {attempts} teacher solutions at T={solve_sampling.temperature}, "
                             f"max_tokens={solve_sampling.max_tokens}, all finish, all give an answer, all agree"}
    atomic_write_json(Path(out_dir) / "generator_validity.json", summary)
    return summary


def backend_spec_from_args(kind: str, *, endpoints: list[str] | None, model: str | None, api: str,
                           concurrency: int, timeout_s: float, tp: int) -> BackendSpec:
    spec = BackendSpec(kind=kind, endpoints=list(endpoints or []), model=model, api=api, concurrency=concurrency,
                       timeout_s=timeout_s, tensor_parallel_size=tp)
    try:
        spec.check()
    except ValueError as exc:
        raise UserError(str(exc), where="--backend", fix="pass --endpoint URL for the openai backend") from None
    return spec


def write_settings(out_dir: Path, settings: EvalSettings, benchmark_files: list[str]) -> None:
    atomic_write_json(Path(out_dir) / "settings.json", {**settings.to_dict(), "benchmark_files": benchmark_files})

