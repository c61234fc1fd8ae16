"""The local executor: every stage of every round on this machine, in the round's order.

* Python stages (every resource class but ``training``) run in this
  process, shard by shard; each shard's marker is written as soon as it finishes.
* Training stages run as a fresh process (``python -m megatron_sz stage ...``, or
  ``torchrun`` when the layout needs several ranks), so Megatron's global state never
  leaks into the next stage. The child gets PDEATHSIG: killing this executor kills the
  trainer too, so a resume never races an orphan.
* One executor per run directory at a time (an ``flock`` on ``RUN_DIR/.lock``).
* Progress: a line per stage with its time, the round's elapsed time and an ETA from the
  rounds finished so far; the stage functions show their own bars.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time

from megatron_sz.errors import UserError
from megatron_sz.executor import EX_TEMPFAIL, execute_stage, stage_done
from megatron_sz.rundir import RunDir


def _fmt(s: float) -> str:
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _pdeathsig() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def lock_run_dir(rd: RunDir):
    fh = open(rd.root / ".lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"another executor is running on {rd.root}",
                        fix="wait for it, or stop it; two executors on one run directory would race") from None
    return fh


def train_command(rd: RunDir, t: int, stage) -> list[str]:
    base = ["-m", "megatron_sz", "stage", str(rd.root), "--round", str(t), "--stage", stage.name]
    if stage.world_size > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={stage.world_size}"] + base
    return [sys.executable] + base


def run_training_stage(rd: RunDir, t: int, stage) -> None:
    cmd = train_command(rd, t, stage)
    env = dict(os.environ)
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_pdeathsig)
    try:
        code = proc.wait()
    except BaseException:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if code == EX_TEMPFAIL:
        raise UserError(f"training stage r{t}.{stage.name} was preempted (exit 75)",
                        fix="re-run the same command to resume from its checkpoint")
    if code != 0:
        raise UserError(f"training stage r{t}.{stage.name} failed with exit code {code}",
                        where=str(rd.round_dir(t) / stage.name),
                        fix="see the trainer's output above; fix and re-run (finished stages are kept)")


def run_local(rd: RunDir, recipe, *, rounds: int, progress: bool = True) -> None:
    from megatron_sz.round import plan_round

    lock = lock_run_dir(rd)
    try:
        t_start = time.time()
        plans = [plan_round(recipe, t) for t in range(rounds)]  # every contract checked before anything runs
        prior = _seconds_so_far(rd, plans)
        round_times: list[float] = []
        last = rounds - 1
        for t, plan in enumerate(plans):
            if all(stage_done(rd, t, s) for s in plan):
                print(f"== round {t} of 0..{last}: already complete", flush=True)
                continue
            r0 = time.time()
            eta = ""
            if round_times:
                eta = f", ETA {_fmt(sum(round_times) / len(round_times) * (rounds - t))}"
            print(f"== round {t} of 0..{last} (elapsed {_fmt(r0 - t_start)} this run"
                  f"{f', {_fmt(prior + r0 - t_start)} in all' if prior else ''}{eta}) -> {rd.round_dir(t)}",
                  flush=True)
            for i, s in enumerate(plan.stages, 1):
                label = f"[r{t} {i}/{len(plan)}] {s.name:<10} ({s.role})"
                if stage_done(rd, t, s):
                    print(f"{label} already done", flush=True)
                    continue
                print(f"{label} ...", flush=True)
                s0 = time.time()
                if s.train:
                    run_training_stage(rd, t, s)
                else:
                    execute_stage(rd, recipe, t, s.name, None, progress=progress, plan=plan)
                print(f"{label} done in {_fmt(time.time() - s0)}", flush=True)
            round_times.append(time.time() - r0)
        total = time.time() - t_start
        from megatron_sz.systems import get_system

        finish = get_system(plans[0].system).finish if plans else None
        repaired = finish(rd) if finish else None  # complete means the summary is right too (issue 20)
        if repaired:
            print(f"repaired {repaired}", flush=True)
        print(f"== all {rounds} rounds complete in {_fmt(total)} this run"
              f"{f' ({_fmt(prior + total)} in all, counting earlier runs)' if prior else ''}; "
              f"metrics: {rd.metrics_path}, plot: {rd.plot_path}", flush=True)
    finally:
        lock.close()


def _seconds_so_far(rd: RunDir, plans) -> float:
    """Stage seconds already spent by earlier invocations (from the completion markers)."""
    total = 0.0
    for plan in plans:
        for s in plan:
            m = rd.read_marker(plan.round, s.name) or {}
            if "seconds" in m:
                total += float(m["seconds"])
            elif s.shards:
                for i in range(s.shards):
                    total += float((rd.read_marker(plan.round, s.name, (i, s.shards)) or {}).get("seconds", 0.0))
    return total
