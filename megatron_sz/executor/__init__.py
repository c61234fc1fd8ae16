"""Executors: who runs a round's stages, and where.

* ``local.py`` runs every stage on this machine, in the round's order.
* ``slurm.py`` renders one sbatch script per stage (a job array for sharded stages) and
  submits them with dependencies.

Both consume the ``RoundPlan`` of ``round.plan_round`` and name no stages themselves:
what runs, in which order, after what, with which resources and shard correlation all
come from the plan. Both go through ``execute_stage`` here (``megatron-sz stage`` is its
command line), which checks the stage's inputs are complete, runs the stage function
for one shard (or the whole stage), and writes the completion marker only after the
outputs are written. A stage or shard whose marker exists is skipped, so re-running
anything is a no-op.
"""
from __future__ import annotations

import os
import signal
import time

from megatron_sz.errors import UserError
from megatron_sz.rundir import RunDir

EX_TEMPFAIL = 75  # preempted (SIGUSR1/SIGTERM before the time limit): requeue and resume


class Preempted(Exception):
    """Raised in a Python stage when SLURM signals the end of the time slot."""


def stage_done(rd: RunDir, t: int, stage) -> bool:
    if rd.is_done(t, stage.name):
        return True
    if stage.shards and all(rd.shards_done(t, stage.name, stage.shards)):
        return True
    return False


def missing_inputs(rd: RunDir, plan, stage, shard: int | None) -> list[str]:
    """Upstream stages (or, where the plan correlates them, upstream shards) not yet done."""
    missing = []
    for r, up in plan.upstream_of(stage.name):
        if r == plan.round and shard is not None and plan.is_correlated(up.name, stage.name):
            if not rd.is_done(r, up.name, (shard, up.shards)):
                missing.append(f"r{r}.{up.name}[{shard}]")
        elif not stage_done(rd, r, up):
            missing.append(f"r{r}.{up.name}")
    return missing


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def execute_stage(rd: RunDir, recipe, t: int, name: str, shard: int | None = None, *,
                  progress: bool = True, plan=None) -> dict:
    """Run one stage of round t (one shard of it when ``shard`` is given); idempotent.

    Returns {"status": "done"|"skipped", "seconds": ...}. Raises ``UserError`` if the
    stage's inputs are not complete (a dependency failed or was cancelled)."""
    from megatron_sz.round import RoundContext, plan_round

    plan = plan if plan is not None else plan_round(recipe, t)
    stage = plan.stage(name)
    if stage.shards and shard is None:
        results = [execute_stage(rd, recipe, t, name, i, progress=progress, plan=plan) for i in range(stage.shards)]
        return {"status": "done" if any(r["status"] == "done" for r in results) else "skipped",
                "seconds": sum(r["seconds"] for r in results)}
    if not stage.shards and shard is not None and shard != 0:
        raise UserError(f"stage {name!r} is not sharded; got --shard {shard}", fix="drop --shard")
    if stage.shards and not (0 <= shard < stage.shards):
        raise UserError(f"shard {shard} out of range: stage {name!r} has {stage.shards} shards",
                        fix=f"use 0..{stage.shards - 1}")
    key = (shard, stage.shards) if stage.shards else None
    if rd.is_done(t, name, key) or (key is None and stage_done(rd, t, stage)):
        return {"status": "skipped", "seconds": 0.0}
    missing = missing_inputs(rd, plan, stage, shard)
    if missing:
        raise UserError(f"stage r{t}.{name} cannot start: inputs not complete: {', '.join(missing)}",
                        where=str(rd.root), fix="run the missing stages first (megatron-sz status shows them)")
    t0 = time.time()
    ctx = RoundContext(rd=rd, recipe=recipe, t=t, progress=progress, plan=plan, stage=stage)
    if _rank() == 0:
        rd.mark_running(t, name, key)  # `status` shows it as running while this process lives
    try:
        info = stage.fn(ctx, shard if stage.shards else None) or {}
    finally:
        if _rank() == 0:
            rd.clear_running(t, name, key)
    if _rank() == 0:
        info = {k: v for k, v in info.items() if k not in ("round", "stage", "shard")}
        rd.mark_done(t, name, key, seconds=round(time.time() - t0, 2), **info)
        if stage.shards and all(rd.shards_done(t, name, stage.shards)):
            rd.mark_done(t, name, None, shards=stage.shards)
    return {"status": "done", "seconds": time.time() - t0}


def install_preemption_handler() -> None:
    """SIGUSR1/SIGTERM in a Python stage -> ``Preempted`` (the command exits 75)."""
    def handler(signum, frame):
        raise Preempted(signal.Signals(signum).name)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, handler)
