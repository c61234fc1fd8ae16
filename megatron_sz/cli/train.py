"""``megatron-sz train JOB``: one training job; the jobs and their help come from ``train.jobs.JOBS``.

Run it as plain ``python -m megatron_sz train ...`` (one process), or under
``torchrun --nproc-per-node N`` / ``srun`` for tp * pp * dp ranks. Exit code 75 means
"preempted, checkpoint saved": run the same command again to resume.
"""
from __future__ import annotations

import argparse

from megatron_sz.errors import UserError
from megatron_sz.train.jobs import JOBS  # torch-free: the table only names its objectives


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help=f"run a training job ({', '.join(JOBS)})",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    jobs = p.add_subparsers(dest="job", metavar="JOB")
    for name, job in JOBS.items():
        text = f"{job.description}; reads recipe {job.role}.{job.section}, {job.role}.model, {job.role}.parallel"
        j = jobs.add_parser(name, help=job.description, description=text)
        j.add_argument("--recipe", required=True, help="recipe YAML (path or name from the packaged recipes/)")
        j.add_argument("--data", required=True, help=f"input JSONL of {job.record.__name__} records")
        j.add_argument("--init", default=None,
                       help="starting weights: an HF model folder or a megatron-sz checkpoint folder "
                            "(default: the recipe's model.mcore_checkpoint / hf_path / random from model.config)")
        j.add_argument("--out", required=True,
                       help="output dir: checkpoint/, metrics.jsonl, summary.json, hf/; re-running with the "
                            "same dir resumes from its checkpoint")
        j.add_argument("--tokenizer", default=None, help="tokenizer path (default: from the recipe or --init)")
        j.add_argument("--eval-data", default=None,
                       help="held-out JSONL of the same record type, evaluated at the start, every "
                            "eval_interval steps and at the end (NLL, or DPO preference accuracy and margin)")
        j.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (overrides the recipe)")
        j.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, e.g. --set solver.dpo.beta=0.2 (repeatable; YAML values)")
        if job.reference is not None:  # the job can use a reference policy's log-probs
            j.add_argument("--ref-logps", default=None,
                           help="precomputed reference log-probs (ref_logps.pt); default: compute once into --out")
        j.set_defaults(func=_main, job_kind=name)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for item in pairs:
        if "=" not in item:
            raise UserError(f"--set {item!r} is not KEY=VALUE", fix="e.g. --set solver.dpo.beta=0.2")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _main(args: argparse.Namespace) -> int:
    from megatron_sz.recipe import load_recipe
    from megatron_sz.train.jobs import run_job

    recipe = load_recipe(args.recipe, overrides=_overrides(args.set))
    result = run_job(args.job_kind, recipe, args.data, args.init, args.out,
                     ref_logps=getattr(args, "ref_logps", None), tokenizer=args.tokenizer, max_steps=args.max_steps,
                     eval_data=args.eval_data)
    return result.exit_code
