"""``megatron-sz submit RECIPE``: submit co-evolution rounds to SLURM as job arrays with dependencies.

Every input is validated before the first sbatch (recipe keys and ranges, model paths,
parallel layouts, the seed file). ``--dry-run`` writes the sbatch scripts into
RUN_DIR/slurm/scripts/ and prints the plan without submitting. Re-running the command on
an interrupted run submits only the stages and shards that have no completion marker.
"""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("submit", help="submit rounds to SLURM (job arrays + dependencies); resumable",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="?", default="recipes/local-tiny.yaml",
                   help="recipe YAML (default: the embedded recipes/local-tiny.yaml)")
    p.add_argument("--run-dir", default=None,
                   help="run directory (default: the recipe's run_dir, else runs/<name>); must be on a "
                        "file system the compute nodes share")
    p.add_argument("--rounds", type=int, default=None, help="number of rounds (default: the recipe's 'rounds')")
    p.add_argument("--dry-run", action="store_true", help="write the sbatch scripts and print the plan; submit nothing")
    p.add_argument("--chain", choices=("all", "round"), default=None,
                   help="submit every round at once with dependencies (all) or only the next round (round); "
                        "default: the recipe's slurm.chain")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from megatron_sz.cli.evolve import open_run
    from megatron_sz.errors import UserError
    from megatron_sz.executor import slurm as S

    rd, recipe = open_run(args.recipe, args.run_dir, dry_run=args.dry_run)
    if args.chain:
        recipe.slurm.chain = args.chain
    rounds = recipe.rounds if args.rounds is None else args.rounds
    if rounds < 1:
        raise UserError(f"--rounds {rounds} must be >= 1", where="--rounds", fix="pass --rounds 3")
    if not args.dry_run and not S.have_slurm():
        raise UserError("sbatch/squeue not found", fix="run on a SLURM login node, or pass --dry-run")
    live = S.live_tasks(rd) if S.have_slurm() else {}
    plan = S.build_plan(rd, recipe, rounds=rounds, live=live)
    if not plan:
        print(f"nothing to submit: all {rounds} round(s) of {rd.root} are complete")
        return 0
    S.submit_plan(rd, recipe, plan, dry_run=args.dry_run, live=live)
    stale = sorted({v["id"] for v in live.values() if v["state"] not in S.STARTED})
    print(f"run dir {rd.root}; scripts in {rd.slurm_dir / 'scripts'}")
    print(S.format_plan(plan, cancelled=[] if args.dry_run else stale, dry_run=args.dry_run))
    if not args.dry_run:
        print(f"follow with: megatron-sz status {rd.root}")
    return 0
