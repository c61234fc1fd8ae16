"""``megatron-sz stage RUN_DIR --round T --stage NAME [--shard I]``: run ONE stage (or shard).

This is what both executors run: the local executor for training stages (a fresh
process, so Megatron's global state never leaks), and every SLURM job (under srun).
It is idempotent: a stage or shard with a completion marker exits 0 at once.

Exit codes: 0 done (or already done); 2 bad input / missing upstream outputs; 75
preempted (SIGUSR1/SIGTERM from SLURM before the time limit; a training stage has
saved a checkpoint) -- the sbatch script requeues the job and the rerun resumes.
"""
from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser("stage", help="run one stage (or one shard of it) of one round of a run directory",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="run directory created by `megatron-sz evolve` or `submit`")
    p.add_argument("--round", type=int, required=True, help="round index (0-based)")
    p.add_argument("--stage", required=True, help="stage name, e.g. rollout, verify, dpo (see `megatron-sz status`)")
    p.add_argument("--shard", default=None,
                   help="shard index of a sharded stage; 'env' reads SLURM_ARRAY_TASK_ID; omit to run every shard")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (plain log lines only)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from megatron_sz.executor import EX_TEMPFAIL, Preempted, execute_stage, install_preemption_handler
    from megatron_sz.rundir import RunDir
    from megatron_sz.round import plan_round

    rd = RunDir.open(args.run_dir)
    recipe = rd.load_recipe()
    shard = args.shard
    if shard == "env":
        shard = os.environ.get("SLURM_ARRAY_TASK_ID")
    shard = None if shard in (None, "") else int(shard)
    plan = plan_round(recipe, args.round)
    stage = plan.stage(args.stage)
    if not stage.train:  # the trainer installs its own checkpoint-then-exit handler
        install_preemption_handler()
    try:
        res = execute_stage(rd, recipe, args.round, args.stage, shard, progress=not args.no_progress, plan=plan)
    except Preempted as exc:
        print(f"stage r{args.round}.{args.stage} shard {shard}: preempted by {exc}; exit {EX_TEMPFAIL} "
              "(rerun resumes from the last complete record)", flush=True)
        return EX_TEMPFAIL
    label = f"r{args.round}.{args.stage}" + (f"[{shard}]" if shard is not None else "")
    print(f"stage {label}: {res['status']} ({res['seconds']:.1f} s)", flush=True)
    return 0
