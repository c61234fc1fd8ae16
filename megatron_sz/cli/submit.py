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
    import sys

    from megatron_sz.cli.evolve import check_rounds, open_run
    from megatron_sz.errors import UserError
    from megatron_sz.executor import slurm as S

    notes: list[str] = []

    def validate(recipe) -> None:
        check_rounds(args.rounds, recipe)
        # Every job must import the package, or the first one fails, --kill-on-invalid-dep cancels
        # the rest, and submit reported success (issue 20): check each role's environment first.
        try:
            notes.extend(S.check_environments(recipe, ["solver", "teacher", "generator"],
                                              mode="local" if args.dry_run and recipe.slurm.preflight == "srun"
                                              else None))
        except UserError as err:
            if not args.dry_run:
                raise
            notes.append(f"{err} (a real submit refuses this)")

    rd, recipe = open_run(args.recipe, args.run_dir, dry_run=args.dry_run, validate=validate)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    if args.chain:
        recipe.slurm.chain = args.chain
    rounds = recipe.rounds if args.rounds is None else args.rounds
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
