"""``megatron-sz ablate RECIPE``: named variants of a recipe over several seeds, equal compute,
with bootstrap intervals (``megatron_sz/ablation.py``).

Each variant x seed is its own run directory under ``--out``; rerunning the command skips
the finished ones and resumes the others. ``--executor slurm`` submits one run per variant
and seed (``megatron-sz submit``); rerun with ``--report-only`` once they have finished.
"""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("ablate", help="run ablation variants x seeds (equal compute) and report intervals",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="?", default="recipes/local-tiny.yaml",
                   help="base recipe YAML (default: the embedded recipes/local-tiny.yaml)")
    p.add_argument("--out", default=None, help="ablation folder (default: runs/ablate-<recipe name>)")
    p.add_argument("--variants", default=None,
                   help="comma-separated variants (default: all the system declares; 'full' is always added)")
    p.add_argument("--seeds", default="3",
                   help="a count N (seeds 1..N) or a comma-separated list of recipe seeds (default: 3)")
    p.add_argument("--k", type=int, default=4, help="held-out samples per problem at the recipe's rollout "
                                                    "temperature (default: 4)")
    p.add_argument("--round-steps", type=int, default=None,
                   help="optimizer steps of every round's solver update, in every variant (default: the "
                        "recipe's solver.dpo.max_steps; required when that is unset)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per run (default: the recipe's)")
    p.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="local: run each variant x seed here in turn; slurm: submit each (megatron-sz submit)")
    p.add_argument("--report-only", action="store_true", help="run nothing; report the runs that are complete")
    p.add_argument("--list", action="store_true", help="print the system's variants and their overrides, and exit")
    p.set_defaults(func=_main)


def _seeds(text: str) -> list[int]:
    from megatron_sz.errors import UserError

    try:
        if "," not in text and int(text) > 0 and len(text) < 4:
            return list(range(1, int(text) + 1))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: give a count (3) or a list (1,2,3)", where="--seeds") from None


def _main(args) -> int:
    from pathlib import Path

    from megatron_sz import ablation as A
    from megatron_sz.recipe import load_recipe

    if args.list:
        system = load_recipe(args.recipe).system
        for name, ov in A.system_variants(system).items():
            print(f"{name:<16} {ov or '(the recipe as written)'}")
        print(f"step budget fixed per round for: {', '.join(A.budget_sections(system)) or '(none)'}")
        return 0
    out = args.out or str(Path("runs") / f"ablate-{load_recipe(args.recipe).name}")
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    ab = A.setup(args.recipe, out, variants=variants, seeds=_seeds(args.seeds), k=args.k,
                 round_steps=args.round_steps, rounds=args.rounds)
    print(f"megatron-sz ablate: {ab.source} ({ab.system}), variants {', '.join(ab.variants)}, seeds {ab.seeds}, "
          f"mean@{ab.k} at temperature {ab.temperature}, {ab.round_steps} solver steps per round -> {ab.out}",
          flush=True)
    if not args.report_only:
        pending = A.run_all(ab, executor=args.executor, log=lambda m: print(m, flush=True))
        if pending:
            print(f"submitted {len(pending)} run(s); when they finish: megatron-sz ablate {args.recipe} "
                  f"--out {ab.out} --report-only (same --variants/--seeds/--k/--round-steps)")
            return 0
    res = A.collect(ab)
    print((ab.out / "ablation.md").read_text(encoding="utf-8"))
    if res["missing_runs"]:
        print(f"not complete yet: {', '.join(res['missing_runs'])}")
    print(f"report: {ab.out / 'ablation.md'}, {ab.out / 'ablation.json'}, {ab.out / 'ablation.png'}")
    return 0
