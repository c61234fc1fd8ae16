"""`megatron-sz eval`: benchmarks (mean@k, pass@k), generator validity, contamination, plots."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _backend_flags(p: argparse.ArgumentParser, prefix: str = "", who: str = "the model") -> None:
    p.add_argument(f"--{prefix}backend", choices=["local", "openai", "vllm"], default="local",
                   help=f"inference backend for {who}: local CPU (transformers), openai (HTTP endpoints), vllm (offline batch on GPUs)")
    p.add_argument(f"--{prefix}endpoint", action="append", default=[], metavar="URL",
                   help=f"OpenAI-compatible base URL for {who} (repeat for several; needs --{prefix}backend openai)")
    p.add_argument(f"--{prefix}served-model", default=None,
                   help=f"model name the endpoints serve for {who} (openai backend)")
    p.add_argument(f"--{prefix}api", choices=["chat", "completions"], default="completions",
                   help="OpenAI API flavour: chat or completions")
    p.add_argument(f"--{prefix}concurrency", type=int, default=32, help="concurrent HTTP requests (openai backend)")
    p.add_argument(f"--{prefix}timeout", type=float, default=600.0, help="per-request timeout in seconds (openai backend)")
    p.add_argument(f"--{prefix}tp", type=int, default=1, help="vLLM tensor-parallel size")


def _make_backend(args, prefix: str, model_path: str | None, tokenizer: str | None = None):
    from megatron_sz.evaluation.run import backend_spec_from_args
    from megatron_sz.inference import make_backend

    a = vars(args)
    key = prefix.replace("-", "_")
    spec = backend_spec_from_args(a[f"{key}backend"], endpoints=a[f"{key}endpoint"], model=a[f"{key}served_model"],
                                  api=a[f"{key}api"], concurrency=a[f"{key}concurrency"], timeout_s=a[f"{key}timeout"],
                                  tp=a[f"{key}tp"])
    return make_backend(spec, model_path=model_path, tokenizer_path=tokenizer, seed=args.seed)


def _sampling(args, *, temperature: float, top_p: float, max_tokens: int):
    from megatron_sz.errors import UserError
    from megatron_sz.recipe import SamplingSpec

    spec = SamplingSpec(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=args.seed)
    try:
        spec.check()
    except ValueError as exc:
        raise UserError(str(exc), where="sampling flags") from None
    return spec


def _run_bench(args) -> int:
    from megatron_sz.evaluation.benchmarks import parse_field_map
    from megatron_sz.evaluation.run import (EvalSettings, evaluate_shard, load_benchmarks, resolve_model,
                                            summarize, write_settings)

    if args.run_dir and args.out is None:
        args.out = str(Path(args.run_dir) / "rounds" / f"r{args.round:03d}" / "bench-eval")
    if args.out is None:
        from megatron_sz.errors import UserError
        raise UserError("no output folder", fix="pass --out DIR")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = load_benchmarks(args.benchmarks, parse_field_map(args.field), args.limit)
    settings = EvalSettings(k=args.k, pass_ks=args.pass_k or [1],
                            sampling=_sampling(args, temperature=args.temperature, top_p=args.top_p,
                                               max_tokens=args.max_tokens),
                            template=args.template, backend=args.backend,
                            judge_model=(args.judge_served_model or "judge") if args.judge_endpoint else None)
    if not args.summarize:
        model_path = resolve_model(args.model, args.run_dir, args.round, out, role=args.role)
        settings.model = args.served_model or model_path
        write_settings(out, settings, args.benchmarks)
        backend = _make_backend(args, "", model_path, args.tokenizer)
        judge = None
        if args.judge_endpoint:
            from megatron_sz.recipe import TeacherRole
            from megatron_sz.teacher.llm import LLMTeacher

            args.judge_backend = "openai"
            judge_backend = _make_backend(args, "judge-", None)
            judge = LLMTeacher(judge_backend, role=TeacherRole(kind="llm", judge="undecided"), seed=args.seed)
        try:
            evaluate_shard(items, backend, out, settings, shard=(args.shard, args.num_shards), judge=judge,
                           progress=not args.quiet)
        finally:
            backend.close()
            if judge is not None:
                judge.close()
        if args.num_shards > 1:
            print(f"shard {args.shard} of {args.num_shards} done; run with --summarize once all shards are done")
            return 0
    else:
        settings_path = out / "settings.json"
        if settings_path.is_file():
            saved = json.loads(settings_path.read_text())
            settings.model = saved.get("model")
            settings.judge_model = saved.get("judge_model")
    results = summarize(out, items, settings, num_shards=args.num_shards)
    print((out / "results.md").read_text())
    if args.wandb_project is not None or args.wandb:
        _log_wandb(args, results)
    return 0


def _log_wandb(args, results: dict) -> None:
    import os

    import wandb

    os.environ.setdefault("WANDB_MODE", "online" if args.wandb_project else "offline")
    run = wandb.init(project=args.wandb_project or "megatron-sz-eval", config=results["settings"], job_type="eval",
                     dir=args.out)
    for b in results["benchmarks"]:
        run.summary[f"{b['benchmark']}/mean_at_k"] = b["mean_at_k"]
    run.finish()


def _run_generator(args) -> int:
    from megatron_sz.data import Problem, read_jsonl
    from megatron_sz.evaluation.run import generator_validity

    seeds = read_jsonl(args.seeds, Problem)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = _make_backend(args, "", args.generator, args.tokenizer)
    teacher = _make_backend(args, "teacher-", args.teacher_model)
    try:
        summary = generator_validity(
            seeds, gen, teacher, out, n=args.n,
            sampling=_sampling(args, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens),
            solve_sampling=_sampling(args, temperature=0.1, top_p=1.0, max_tokens=args.solve_max_tokens),
            attempts=args.attempts, seed=args.seed, progress=not args.quiet)
    finally:
        gen.close()
        teacher.close()
    print(json.dumps(summary, indent=2))
    print(f"valid problems for solver-sft: {out / 'valid.jsonl'}")
    return 0


def _run_contamination(args) -> int:
    from megatron_sz.data import atomic_write_json
    from megatron_sz.evaluation.contamination import ContaminationIndex, load_problem_texts

    cands = load_problem_texts(args.problems)
    report = {"problems_file": args.problems, "ngram": args.ngram, "near_dup_threshold": args.threshold,
              "benchmarks": {}}
    total = 0
    for bench in args.benchmarks:
        refs = load_problem_texts(bench)
        hits = ContaminationIndex(refs, ngram=args.ngram, near_dup_threshold=args.threshold).report(cands)
        total += len(hits)
        report["benchmarks"][bench] = [
            {"problem_index": h.candidate_index, "benchmark_index": h.reference_index, "kind": h.kind,
             "jaccard": round(h.score, 4), "shared": h.shared, "problem": cands[h.candidate_index][:200],
             "benchmark_problem": refs[h.reference_index][:200]} for h in hits]
        print(f"{bench}: {len(hits)} of {len(cands)} problems overlap")
        for h in hits[:args.show]:
            print(f"  [{h.kind} j={h.score:.2f}] #{h.candidate_index} ~ benchmark #{h.reference_index}: '{h.shared}'")
    report["total_overlaps"] = total
    if args.out:
        atomic_write_json(args.out, report)
        print(f"report: {args.out}")
    return 1 if (total and args.fail_on_overlap) else 0


def _run_code(args) -> int:
    """Code benchmarks (HumanEval+, MBPP+, LiveCodeBench, CRUXEval-I/O) executed in the sandbox."""
    from megatron_sz.evaluation.code import evaluate_code, load_code_benchmark
    from megatron_sz.evaluation.run import resolve_model

    out = Path(args.out)
    items = [it for f in args.benchmarks for it in load_code_benchmark(f, args.kind, args.limit)]
    model_path = None
    if args.backend != "openai" or args.model or args.run_dir:
        model_path = resolve_model(args.model, args.run_dir, args.round, out, role=args.role)
    backend = _make_backend(args, "", model_path, args.tokenizer)
    try:
        res = evaluate_code(items, backend, out, k=args.k, pass_ks=args.pass_k or sorted({1, args.k}),
                            sampling=_sampling(args, temperature=args.temperature, top_p=args.top_p,
                                               max_tokens=args.max_tokens),
                            timeout=args.timeout_s, progress=not args.quiet)
    finally:
        backend.close()
    for b in res["benchmarks"]:
        passes = ", ".join(f"pass@{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in b["pass_at_k"].items())
        print(f"{b['benchmark']}: {b['problems']} problems x {b['k']}: mean@{b['k']} {b['mean_at_k']:.4f}, {passes}")
    print(f"results: {out / 'results.json'}")
    return 0


def _run_plots(args) -> int:
    from megatron_sz.data import Problem, read_jsonl
    from megatron_sz.evaluation.plots import accuracy_by_round, growth_by_provenance, zones_by_round

    run = Path(args.run_dir)
    rounds = sorted(p for p in (run / "rounds").glob("r[0-9][0-9][0-9]") if p.is_dir())
    if not rounds:
        from megatron_sz.errors import UserError
        raise UserError(f"no rounds under {run / 'rounds'}", fix="pass a run directory made by megatron-sz evolve/submit")
    acc_rows, rates, growth = [], {}, {}
    for rdir in rounds:
        r = int(rdir.name[1:])
        res = rdir / "bench-eval" / "results.json"
        if res.is_file():
            for b in json.loads(res.read_text())["benchmarks"]:
                acc_rows.append({"round": r, "benchmark": b["benchmark"], "mean_at_k": b["mean_at_k"]})
        pool = rdir / "pool.jsonl"
        if pool.is_file():
            probs = read_jsonl(pool, Problem)
            growth[r] = {}
            for p in probs:
                growth[r][p.provenance] = growth[r].get(p.provenance, 0) + 1
            rs = []
            for p in probs:
                hist = (p.extra.get("curriculum") or {}).get("history") or []
                if hist:
                    _, c, k = hist[-1]
                    if k:
                        rs.append(c / k)
            rates[r] = rs
    out = Path(args.out or run / "plots")
    made = [zones_by_round(rates, out / "zones_by_round.png"), growth_by_provenance(growth, out / "growth_by_provenance.png")]
    if acc_rows:
        made.append(accuracy_by_round(acc_rows, out / "benchmark_accuracy_by_round.png"))
    else:
        print("no benchmark results yet (run `megatron-sz eval bench --run-dir R --round N ...` per round)")
    for p in made:
        print(p)
    return 0


def _tool_completions(args, prompts: list[tuple[str, str]]) -> tuple[dict, dict]:
    """{id: [texts]} and {id: tool calls per sample} from the model: plain sampling, or the
    Agent0 tool loop (code runs in the sandbox) with --tools."""
    from megatron_sz.inference.base import GenerationRequest

    sampling = _sampling(args, temperature=args.temperature, top_p=1.0, max_tokens=args.max_tokens)
    backend = _make_backend(args, "", args.model, args.tokenizer)
    try:
        if args.tools:
            from megatron_sz.toolloop import ToolConfig, run_tool_loop

            trajs = run_tool_loop(prompts, backend, n=args.k, sampling=sampling,
                                  tools=ToolConfig(max_turns=args.tool_turns, timeout_s=args.tool_timeout),
                                  log=None if args.quiet else print)
            texts: dict = {}
            calls: dict = {}
            for t in trajs:
                texts.setdefault(t.problem_id, []).append(t.text)
                calls.setdefault(t.problem_id, []).append(t.tool_calls)
            return texts, calls
        res = backend.generate([GenerationRequest(id=i, prompt=p, n=args.k, sampling=sampling) for i, p in prompts],
                               progress=not args.quiet)
        return {r.id: r.texts for r in res if r.ok}, {}
    finally:
        backend.close()


def _run_choice(args) -> int:
    """Multiple-choice benchmarks (MMLU-Pro, SuperGPQA, BBEH) from local files."""
    from megatron_sz.evaluation import choice

    items = [it for b in args.benchmarks for it in choice.load_choice_benchmark(b, limit=args.limit)]
    if args.completions:
        from megatron_sz.data import iter_jsonl

        texts: dict = {}
        for obj in iter_jsonl(args.completions):
            texts.setdefault(str(obj["id"]), []).extend(obj.get("texts") or [obj.get("text", "")])
        calls: dict = {}
    else:
        from megatron_sz.errors import UserError

        if not args.model and args.backend != "openai":
            raise UserError("no model", fix="pass --model (or --completions FILE to score existing completions)")
        texts, calls = _tool_completions(args, [(it.id, choice.choice_prompt(it)) for it in items])
    results = choice.score(items, texts)
    for name, r in results.items():
        if calls:
            ids = [it.id for it in items if it.benchmark == name and it.id in calls]
            r["tool_calls_per_problem"] = sum(sum(calls[i]) / len(calls[i]) for i in ids) / max(1, len(ids))
        print(f"{name:<12} accuracy {r['accuracy']:.4f}  n={r['n']}"
              + (f"  tool calls/problem {r['tool_calls_per_problem']:.2f}" if calls else ""))
    if args.out:
        from megatron_sz.data import atomic_write_json

        atomic_write_json(args.out, results)
    return 0


def _run_bench_tools(args) -> int:
    """The math suite with tool use on: mean@k and tool calls per problem."""
    from megatron_sz.evaluation.run import load_benchmarks
    from megatron_sz.rollout import resolve_template
    from megatron_sz.teacher.base import render
    from megatron_sz.verify import verify_batch

    args.tools = True
    items = load_benchmarks(args.benchmarks, None, args.limit)
    tmpl = resolve_template(args.template)
    texts, calls = _tool_completions(args, [(it.id, render(tmpl, problem=it.problem)) for it in items])
    from megatron_sz.verify.extract import extract_answer

    results: dict = {}
    for it in items:
        ts = texts.get(it.id) or []
        if not ts:
            continue
        v = verify_batch([(extract_answer(t), it.answer) for t in ts])
        r = results.setdefault(it.benchmark, {"sum": 0.0, "n": 0, "calls": 0.0})
        r["sum"] += v.equivalent_share
        r["n"] += 1
        r["calls"] += sum(calls.get(it.id, [0])) / max(1, len(calls.get(it.id, [0])))
    out = {k: {"mean_at_k": v["sum"] / v["n"], "n": v["n"], "k": args.k, "tool_calls_per_problem": v["calls"] / v["n"]}
           for k, v in results.items()}
    for name, r in out.items():
        print(f"{name:<12} mean@{args.k} {r['mean_at_k']:.4f}  n={r['n']}  tool calls/problem "
              f"{r['tool_calls_per_problem']:.2f}")
    if args.out:
        from megatron_sz.data import atomic_write_json

        atomic_write_json(args.out, out)
    return 0


def _tool_eval_flags(p: argparse.ArgumentParser, *, tools_default: bool) -> None:
    p.add_argument("--model", help="HF checkpoint folder (local/vllm) or served model name (openai)")
    p.add_argument("--benchmarks", nargs="+", required=True, metavar="PATH", help="benchmark files (or a BBEH folder)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--k", type=int, default=1, help="samples per problem")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    p.add_argument("--max-tokens", type=int, default=2048, help="max new tokens per turn")
    p.add_argument("--tokenizer", help="tokenizer path for the local backend")
    p.add_argument("--limit", type=int, help="only the first N items of each file")
    p.add_argument("--tool-turns", type=int, default=4, help="tool calls per sample (Agent0: 4)")
    p.add_argument("--tool-timeout", type=float, default=10.0, help="seconds per tool call")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--quiet", action="store_true", help="no progress")
    if not tools_default:
        p.add_argument("--tools", action="store_true",
                       help="solve with the Python tool (the Agent0 tool loop; code runs in the sandbox)")
        p.add_argument("--completions", help="score these completions (JSONL of {id, text | texts}) instead of sampling")
    _backend_flags(p)


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate: benchmarks (mean@k, pass@k), generator validity, contamination, plots",
                       description=__doc__)
    esub = p.add_subparsers(dest="eval_command", metavar="WHAT", required=True)

    b = esub.add_parser("bench", help="score a solver on benchmark files as mean@k and pass@k")
    b.add_argument("--model", help="HF checkpoint folder, Megatron checkpoint folder, or served model name")
    b.add_argument("--run-dir", help="evaluate the solver of a round of this run directory (with --round)")
    b.add_argument("--round", type=int, help="round index within --run-dir")
    b.add_argument("--role", default="solver",
                   help="with --run-dir: whose model to evaluate (a role the system trains, e.g. solver)")
    b.add_argument("--benchmarks", nargs="+", required=True, metavar="FILE",
                   help="benchmark files (JSONL/JSON/Parquet) in a public layout; the name comes from the file name")
    b.add_argument("--field", action="append", metavar="KIND=NAME",
                   help="field mapping for non-standard files, e.g. --field problem=question --field answer=final_answer")
    b.add_argument("--out", help="output folder (default with --run-dir: RUN/rounds/rNNN/bench-eval)")
    b.add_argument("--k", type=int, default=32, help="samples per problem (the paper: 32)")
    b.add_argument("--pass-k", type=int, nargs="*", help="also report pass@k for these k (default: 1 and --k)")
    b.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (the paper: 0.7)")
    b.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling top-p (the paper: 0.9)")
    b.add_argument("--max-tokens", type=int, default=4096, help="max new tokens per sample")
    b.add_argument("--template", help="solver prompt template file or inline text with {problem}")
    b.add_argument("--tokenizer", help="tokenizer path for the local backend (default: the model folder's)")
    b.add_argument("--limit", type=int, help="only the first N problems of each file (smoke tests)")
    b.add_argument("--shard", type=int, default=0, help="this shard's index (e.g. $SLURM_ARRAY_TASK_ID)")
    b.add_argument("--num-shards", type=int, default=1, help="number of shards the problems are split into")
    b.add_argument("--summarize", action="store_true", help="only score the finished shards in --out")
    b.add_argument("--seed", type=int, default=0, help="sampling seed")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("--wandb", action="store_true", help="log the results to wandb (offline unless --wandb-project)")
    b.add_argument("--wandb-project", help="wandb project to log online")
    _backend_flags(b)
    _backend_flags(b, "judge-", who="the LLM judge of answers the rules cannot decide (enabled by --judge-endpoint)")
    b.set_defaults(func=_run_bench)

    g = esub.add_parser("generator", help="generator validity (paper §4.3) and a solver-sft training file")
    g.add_argument("--generator", required=True, help="generator HF checkpoint folder (or served model name)")
    g.add_argument("--seeds", required=True, help="seed problems (Problem JSONL) to generate from")
    g.add_argument("--teacher-model", help="teacher HF folder (local/vllm) or served name (openai)")
    g.add_argument("--n", type=int, default=100, help="number of problems to generate (the paper: 3000)")
    g.add_argument("--out", required=True, help="output folder: generated.jsonl, valid.jsonl, generator_validity.json")
    g.add_argument("--temperature", type=float, default=0.8, help="generator sampling temperature")
    g.add_argument("--top-p", type=float, default=0.95, help="generator top-p")
    g.add_argument("--max-tokens", type=int, default=512, help="max tokens of a generated problem")
    g.add_argument("--solve-max-tokens", type=int, default=4096, help="teacher token budget to solve a problem")
    g.add_argument("--attempts", type=int, default=2, help="teacher solutions that must agree for a problem to be valid")
    g.add_argument("--tokenizer", help="tokenizer for a local generator")
    g.add_argument("--seed", type=int, default=0, help="seed for picking parents and sampling")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    _backend_flags(g, who="the generator")
    _backend_flags(g, "teacher-", who="the teacher")
    g.set_defaults(func=_run_generator)

    c = esub.add_parser("contamination", help="n-gram and near-duplicate overlap of a problem file with benchmarks")
    c.add_argument("--problems", required=True, help="problem file (a run's pool.jsonl, seeds, any JSONL/Parquet)")
    c.add_argument("--benchmarks", nargs="+", required=True, help="benchmark files to check against")
    c.add_argument("--ngram", type=int, default=13, help="word n-gram length (default 13)")
    c.add_argument("--threshold", type=float, default=0.8, help="near-duplicate Jaccard threshold on word 3-grams")
    c.add_argument("--out", help="write the full report (every offending pair) as JSON here")
    c.add_argument("--show", type=int, default=10, help="print at most this many pairs per benchmark")
    c.add_argument("--fail-on-overlap", action="store_true", help="exit 1 if any overlap is found")
    c.set_defaults(func=_run_contamination)

    ch = esub.add_parser("choice", help="multiple-choice benchmarks (MMLU-Pro, SuperGPQA, BBEH) from local files")
    _tool_eval_flags(ch, tools_default=False)
    ch.set_defaults(func=_run_choice)

    bt = esub.add_parser("bench-tools", help="math benchmarks solved with the Python tool: mean@k, tool calls/problem")
    _tool_eval_flags(bt, tools_default=True)
    bt.add_argument("--template", help="prompt template with {problem} (default: the packaged solver template)")
    bt.set_defaults(func=_run_bench_tools)

    co = esub.add_parser("code", help="code benchmarks (HumanEval+, MBPP+, LiveCodeBench, CRUXEval-I/O) run in the "
                                      "sandbox: mean@k and pass@k")
    co.add_argument("--benchmarks", nargs="+", required=True, metavar="FILE",
                    help="local JSONL files in their public layouts; the kind comes from the file name")
    co.add_argument("--kind", choices=["humaneval", "mbpp", "livecodebench", "cruxeval"],
                    help="the layout of every file (default: from each file name)")
    co.add_argument("--model", help="HF checkpoint folder or Megatron checkpoint folder (or served model name)")
    co.add_argument("--run-dir", help="evaluate the model of a round of this run directory (with --round)")
    co.add_argument("--round", type=int, help="round index within --run-dir")
    co.add_argument("--role", default="solver", help="with --run-dir: whose model to evaluate")
    co.add_argument("--out", required=True, help="output folder: samples.jsonl (resumable), results.json")
    co.add_argument("--k", type=int, default=1, help="samples per problem")
    co.add_argument("--pass-k", type=int, nargs="*", help="report pass@k for these k (default: 1 and --k)")
    co.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    co.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling top-p")
    co.add_argument("--max-tokens", type=int, default=1024, help="max new tokens per sample")
    co.add_argument("--timeout-s", type=float, default=10.0, help="sandbox time limit of one problem's tests")
    co.add_argument("--tokenizer", help="tokenizer path for the local backend (default: the model folder's)")
    co.add_argument("--limit", type=int, help="only the first N problems of each file")
    co.add_argument("--seed", type=int, default=0, help="sampling seed")
    co.add_argument("--quiet", action="store_true", help="no progress lines")
    _backend_flags(co)
    co.set_defaults(func=_run_code)

    pl = esub.add_parser("plots", help="PNG plots of a run: benchmark accuracy, zones, growth by provenance")
    pl.add_argument("run_dir", help="run directory")
    pl.add_argument("--out", help="output folder (default RUN_DIR/plots)")
    pl.set_defaults(func=_run_plots)


if __name__ == "__main__":  # pragma: no cover
    from megatron_sz.cli import main

    sys.exit(main(["eval", *sys.argv[1:]]))
