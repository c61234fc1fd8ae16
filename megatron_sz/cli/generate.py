"""``megatron-sz generate``: run one request shard (JSONL) into a result shard (JSONL).

This is the step a teacher (or solver-rollout) SLURM array task runs, typically with
the vLLM backend on the teacher partition. The backend comes from a recipe role
(``--recipe R --role teacher``) and/or flags, flags winning. Resumable: results already
in the result shard are skipped, so a requeued or re-run task continues where it stopped.

Exit code 0 when every request has a result, 1 when some failed for good (rerun to retry).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="run a request shard (JSONL) through an inference backend into a result shard",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", required=True,
                   help="request shard JSONL (id, prompt, n, sampling, meta per line); may contain {shard}")
    p.add_argument("--results", required=True,
                   help="result shard JSONL, appended and resumable; may contain {shard}")
    p.add_argument("--recipe", help="recipe YAML (or packaged name) to take the backend from")
    p.add_argument("--role", choices=["teacher", "solver", "generator"], default="teacher",
                   help="which recipe role's backend to use (default: teacher)")
    p.add_argument("--backend", choices=["local", "openai", "vllm"], help="backend kind (overrides the recipe)")
    p.add_argument("--model", help="model folder (local/vllm) or served model name (openai)")
    p.add_argument("--tokenizer", help="tokenizer path if not in the model folder (local/vllm)")
    p.add_argument("--endpoint", action="append", default=None,
                   help="OpenAI-compatible base URL, e.g. http://host:8000/v1 (repeat for several)")
    p.add_argument("--api", choices=["chat", "completions"], help="OpenAI API flavour")
    p.add_argument("--concurrency", type=int, help="openai: requests in flight at once")
    p.add_argument("--timeout-s", type=float, help="openai: per-request timeout in seconds")
    p.add_argument("--max-retries", type=int, help="openai: retries per request before giving up")
    p.add_argument("--tp", type=int, help="vllm: tensor parallel size")
    p.add_argument("--batch-size", type=int, help="local: sequences per forward batch")
    p.add_argument("--seed", type=int, default=0, help="backend seed for requests without a sampling seed")
    p.add_argument("--num-shards", type=int, default=1,
                   help="split the request file into this many contiguous shards and run one")
    p.add_argument("--shard-index", type=int, default=None,
                   help="which shard to run (default: $SLURM_ARRAY_TASK_ID, else 0)")
    p.add_argument("--summary", help="write the counts and backend stats as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log retries and progress to stderr")
    p.set_defaults(func=run)


def _role_backend(recipe, role: str):
    if role == "teacher":
        return recipe.teacher.backend, None
    r = recipe.solver if role == "solver" else recipe.generator
    model_path = None
    if r.model.hf_path:
        model_path = str(recipe.resolve_path(r.model.hf_path))
    return r.rollout.backend, model_path


def run(args: argparse.Namespace) -> int:
    import logging

    from megatron_sz.data import atomic_write_json
    from megatron_sz.errors import UserError
    from megatron_sz.inference.base import make_backend, read_requests, run_request_shard
    from megatron_sz.recipe import BackendSpec, load_recipe
    from megatron_sz.rollout import shard_slice

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    spec, model_path = BackendSpec(), None
    if args.recipe:
        recipe = load_recipe(args.recipe)
        spec, model_path = _role_backend(recipe, args.role)
    overrides = {"kind": args.backend, "endpoints": args.endpoint, "api": args.api,
                 "concurrency": args.concurrency, "timeout_s": args.timeout_s,
                 "max_retries": args.max_retries, "tensor_parallel_size": args.tp,
                 "batch_size": args.batch_size}
    spec = dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    if args.model:
        if spec.kind == "openai":
            spec = dataclasses.replace(spec, model=args.model)
        else:
            model_path = args.model
    try:
        spec.check()
    except ValueError as exc:
        raise UserError(f"backend: {exc}", fix="set it in the recipe or with a flag") from None

    index = args.shard_index
    if index is None:
        index = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0")) if args.num_shards > 1 else 0
    req_path = args.requests.replace("{shard}", str(index))
    res_path = args.results.replace("{shard}", str(index))
    requests = read_requests(req_path)
    if args.num_shards > 1:
        requests = shard_slice(requests, index, args.num_shards)
    backend = make_backend(spec, model_path=model_path, tokenizer_path=args.tokenizer, seed=args.seed)
    try:
        counts = run_request_shard(backend, req_path, res_path, progress=not args.no_progress,
                                   requests=requests)
    finally:
        backend.close()
    counts.update({"requests_file": req_path, "results_file": res_path, "shard": [index, args.num_shards],
                   "backend": spec.kind})
    print(json.dumps({k: v for k, v in counts.items() if k != "stats"}))
    if args.summary:
        atomic_write_json(args.summary.replace("{shard}", str(index)), counts)
    return 1 if counts["failed"] else 0
