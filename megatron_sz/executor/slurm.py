"""The SLURM adapter: sbatch scripts from templates, job arrays, dependencies, job states.

The only module (with ``slurm/``) that runs SLURM commands. What it does:

* **One job per stage, one job array per sharded stage** (``--array=0-3%4``; only the
  shards without a completion marker are listed, so a re-submission never redoes one).
* **Dependencies are the RoundPlan's** (``round.plan_round``): ``aftercorr`` where the plan
  correlates two arrays (task i waits only for task i), ``afterok`` everywhere else,
  nothing for stages already done. So a teacher array can run on its partition while a
  training job of another role trains. Resources come from the stage's resource class:
  ``light`` and ``sandbox`` stages get no GPUs, ``training`` stages get the role's nodes.
* **The whole run is submitted as one chain** (``slurm.chain: all``, the default): every
  round's stages, with round t+1's first stages depending on round t's last ones as the
  plan says. That is possible because shard counts come from the recipe, not the data (an
  empty shard is a no-op), so the DAG is known at submit time; it gets every job into
  the queue early (queue age counts towards priority) and needs no process watching the
  run. ``--kill-on-invalid-dep=yes`` removes the dependents of a failed or cancelled job
  instead of leaving them pending forever. ``slurm.chain: round`` submits one round per
  ``submit`` instead, for sites that limit queued jobs per user.
* **Re-submission submits only what is not done.** Jobs of this run still PENDING from an
  earlier submission are cancelled first (their dependencies may point at a cancelled
  job); RUNNING ones are kept and the new jobs depend on them.
* Per-role partition, nodes, GPUs, CPUs, memory, time, account, QoS, container and
  environment lines come from the recipe's ``slurm`` section. ``--requeue`` and
  ``--signal=B:USR1@N``: the batch script traps USR1 and forwards it to the srun step;
  a stage that exits 75 (preempted after saving state) requeues itself.
* Submissions are recorded in ``RUN_DIR/slurm/jobs.jsonl``; ``job_states`` reads squeue
  (live jobs, one line per array task) and ``scontrol show job`` (recently finished).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_sz.errors import UserError
from megatron_sz.paths import resource_dir
from megatron_sz.rundir import RunDir

ALIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
         "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}
STARTED = ALIVE - {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}
# Resource classes (round.RESOURCES) that get no GPUs: bookkeeping and sandboxed code runs.
CPU_RESOURCES = {"light", "sandbox"}


# --------------------------------------------------------------------------- commands


def have_slurm() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("squeue") is not None


def _run(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UserError(f"{cmd[0]} not found", fix="run on a SLURM login node, or use --dry-run") from None
    if check and res.returncode != 0:
        raise UserError(f"{' '.join(shlex.quote(c) for c in cmd)} failed: {res.stderr.strip() or res.stdout.strip()}",
                        fix="check the partition/account/QoS names in the recipe's slurm section")
    return res


def sbatch(script: Path, extra: list[str]) -> str:
    """Submit; returns the job id (``sbatch --parsable`` prints ``id[;cluster]``)."""
    out = _run(["sbatch", "--parsable", *extra, str(script)]).stdout.strip()
    return out.split(";")[0]


def scancel(ids: list[str]) -> None:
    if ids:
        _run(["scancel", *ids], check=False)


def squeue_tasks(job_ids: set[str]) -> dict[str, tuple[str, str]]:
    """Live tasks of the given jobs: ``{"123" or "123_4": (state, reason)}``.

    Pending array tasks are listed one per line (``-r``)."""
    if not job_ids:
        return {}
    res = _run(["squeue", "-h", "-r", "-o", "%i|%T|%r|%F|%K"], check=False)
    out = {}
    for line in res.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 5:
            continue
        tid, state, reason, array_id, task = parts
        base = array_id if array_id not in ("", "N/A") else tid.split("_")[0]
        if base not in job_ids and tid not in job_ids:
            continue
        key = f"{base}_{task}" if task not in ("", "N/A") else tid
        out[key] = (state, reason)
    return out


def scontrol_state(job_id: str) -> str | None:
    """State of a (possibly finished) job from ``scontrol show job`` (kept MinJobAge seconds)."""
    res = _run(["scontrol", "-o", "show", "job", job_id], check=False)
    m = re.search(r"JobState=(\S+)", res.stdout)
    return m.group(1) if m else None


# --------------------------------------------------------------------------- records


def jobs_file(rd: RunDir) -> Path:
    return rd.slurm_dir / "jobs.jsonl"


def read_jobs(rd: RunDir) -> list[dict]:
    p = jobs_file(rd)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _append_jobs(rd: RunDir, records: list[dict]) -> None:
    from megatron_sz.data import atomic_write_text

    p = jobs_file(rd)
    old = p.read_text() if p.exists() else ""
    atomic_write_text(p, old + "".join(json.dumps(r) + "\n" for r in records))


def live_tasks(rd: RunDir) -> dict[tuple[int, str, int | None], dict]:
    """(round, stage, shard) -> {"id", "state", "reason"} for this run's live SLURM tasks."""
    records = read_jobs(rd)
    if not records or not have_slurm():
        return {}
    tasks = squeue_tasks({r["job_id"] for r in records})
    out = {}
    for r in records:
        for shard in (r["array"] if r.get("array") is not None else [None]):
            tid = r["job_id"] if shard is None else f"{r['job_id']}_{shard}"
            if tid in tasks:
                out[(r["round"], r["stage"], shard)] = {"id": tid, "state": tasks[tid][0],
                                                        "reason": tasks[tid][1]}
    return out


# --------------------------------------------------------------------------- planning


@dataclass
class PlannedJob:
    round: int
    stage: object  # round.Stage
    shards: list[int] | None  # array indices to submit; None: not sharded
    running: dict = field(default_factory=dict)  # shard (or None) -> live task id kept as is
    deps: list[tuple[str, str]] = field(default_factory=list)  # (kind, key or task id) before resolution
    script: Path | None = None
    job_id: str | None = None
    dependency: str = ""

    @property
    def key(self) -> str:
        return f"r{self.round}.{self.stage.name}"

    @property
    def submit(self) -> bool:
        return self.shards is None and not self.running or bool(self.shards)


def build_plan(rd: RunDir, recipe, *, rounds: int, live: dict) -> list[PlannedJob]:
    """What to submit: every stage/shard of rounds [0, rounds) without a completion marker."""
    from megatron_sz.executor import stage_done
    from megatron_sz.round import plan_round

    plan: list[PlannedJob] = []
    by_key: dict[str, PlannedJob] = {}
    first_open = None
    for t in range(rounds):
        stages = plan_round(recipe, t)
        if all(stage_done(rd, t, s) for s in stages):
            continue
        if first_open is None:
            first_open = t
        elif recipe.slurm.chain == "round":
            break
        for s in stages:
            if stage_done(rd, t, s):
                continue
            running = {}
            if s.shards:
                todo = [i for i, d in enumerate(rd.shards_done(t, s.name, s.shards)) if not d]
                for i in list(todo):
                    task = live.get((t, s.name, i))
                    if task and task["state"] in STARTED:
                        running[i] = task["id"]
                        todo.remove(i)
                job = PlannedJob(t, s, todo, running)
            else:
                task = live.get((t, s.name, None))
                if task and task["state"] in STARTED:
                    running[None] = task["id"]
                job = PlannedJob(t, s, None, running)
            for (r, up_stage) in stages.upstream_of(s.name):
                up = by_key.get(f"r{r}.{up_stage.name}")
                if up is None:
                    continue  # done already (or not in this submission): nothing to wait for
                for tid in up.running.values():
                    job.deps.append(("afterok", tid))
                if up.submit:
                    corr = (r == t and stages.is_correlated(up_stage.name, s.name) and up.shards == job.shards
                            and not up.running and not job.running)
                    job.deps.append(("aftercorr" if corr else "afterok", up.key))
            plan.append(job)
            by_key[job.key] = job
    return plan


# --------------------------------------------------------------------------- rendering


def _template(role: str) -> str:
    base = resource_dir("slurm")
    for name in (f"{role}.sbatch.tmpl", "stage.sbatch.tmpl"):
        if (base / name).is_file():
            return (base / name).read_text(encoding="utf-8")
    raise UserError(f"no sbatch template in {base}", fix="reinstall megatron-sz (slurm/stage.sbatch.tmpl)")


def render(text: str, values: dict) -> str:
    def sub(m):
        k = m.group(1)
        if k not in values:
            raise UserError(f"sbatch template uses unknown placeholder {{{{{k}}}}}",
                            fix=f"known placeholders: {', '.join(sorted(values))}")
        return str(values[k])

    return re.sub(r"\{\{(\w+)\}\}", sub, text)


def _array_spec(indices: list[int], throttle: int) -> str:
    runs, start = [], None
    for i, x in enumerate(indices):
        if start is None:
            start = x
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            runs.append(f"{start}-{x}" if x != start else f"{x}")
            start = None
    return ",".join(runs) + f"%{throttle}"


def interpreter(recipe, role: str) -> tuple[str, str]:
    """The Python a role's jobs run, and where that choice comes from (for messages).

    ``slurm.<role>.python``, else ``slurm.python``, else ``python3`` when the role names its
    own environment (``env_setup`` or ``container``: it decides which python3 is on PATH),
    else the absolute path of the interpreter running ``submit``: a job must not depend on
    what happens to be first on the compute node's PATH (issue 20)."""
    rs = getattr(recipe.slurm, role)
    if rs.python:
        return rs.python, f"slurm.{role}.python"
    if recipe.slurm.python:
        return recipe.slurm.python, "slurm.python"
    if rs.env_setup or rs.container:
        return "python3", f"python3 of slurm.{role}.{'container' if rs.container else 'env_setup'}"
    return sys.executable, "the interpreter that ran submit"


def launcher(recipe, role: str) -> str:
    python, source = interpreter(recipe, role)
    # A recipe's value is a shell word list on purpose (e.g. "apptainer exec img python3");
    # our own default is one path, quoted in case it has spaces.
    return shlex.quote(python) if source == "the interpreter that ran submit" else python


def render_job(rd: RunDir, recipe, job: PlannedJob) -> str:
    s = job.stage
    rs = getattr(recipe.slurm, s.role)
    light = s.resource in CPU_RESOURCES
    nodes = 1 if not s.train else rs.nodes
    ntasks_per_node = max(1, s.world_size // max(1, rs.nodes)) if s.train else 1
    opts = []
    if job.shards is not None:
        opts.append(f"--array={_array_spec(job.shards, rs.array_throttle)}")
    if rs.gpus_per_node and not light:
        opts.append(f"--gpus-per-node={rs.gpus_per_node}")
    if rs.mem:
        opts.append(f"--mem={rs.mem}")
    if rs.account:
        opts.append(f"--account={rs.account}")
    if rs.qos:
        opts.append(f"--qos={rs.qos}")
    if recipe.slurm.requeue:
        opts.append("--requeue")
    if recipe.slurm.signal_seconds:
        opts.append(f"--signal=B:USR1@{recipe.slurm.signal_seconds}")
    opts.append("--kill-on-invalid-dep=yes")
    opts += [o if o.startswith("-") else f"--{o}" for o in rs.extra_sbatch]
    exports = []
    if s.train:
        # torch.distributed rendezvous for srun-launched ranks (dist.init_from_env reads SLURM_PROCID).
        exports += ['export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
                    'export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))']
    srun = [f"--nodes={nodes}", f"--ntasks-per-node={ntasks_per_node}", "--kill-on-bad-exit=1"]
    container = ""
    if rs.container:
        mounts = ",".join(f"{d}:{d}" for d in dict.fromkeys([str(rd.root), os.getcwd()]))
        container = f"--container-image={shlex.quote(rs.container)} --container-mounts={shlex.quote(mounts)}"
    label = f"round {job.round} stage {s.name} ({s.role})" + (f", shards {job.shards}" if job.shards is not None else "")
    values = {
        "description": label,
        "job_name": f"msz-{rd.root.name[:24]}-r{job.round}-{s.name}",
        "partition": rs.partition,
        "nodes": nodes,
        "ntasks_per_node": ntasks_per_node,
        "cpus_per_task": rs.cpus_per_task,
        "time": rs.time,
        "log_dir": str(rd.slurm_dir / "logs"),
        "log_name": "%x-%A_%a.out" if job.shards is not None else "%x-%j.out",
        "sbatch_options": "\n".join(f"#SBATCH {o}" for o in opts),
        "workdir": shlex.quote(os.getcwd()),  # relative recipe paths resolve as at submit time
        "env_setup": "\n".join(rs.env_setup),
        "env_exports": "\n".join(exports),
        "run_dir": shlex.quote(str(rd.root)),
        "signal_seconds": recipe.slurm.signal_seconds,
        "srun_options": " ".join(srun),
        "container_options": container,
        "launcher": launcher(recipe, s.role),
        "round": job.round,
        "stage": s.name,
        "requeue": "yes" if recipe.slurm.requeue else "no",
    }
    return render(_template(s.role), values)


# --------------------------------------------------------------------------- environments

IMPORT_CHECK = "import megatron_sz, megatron_sz.kernels"


def _env_check_script(recipe, role: str, workdir: str) -> str:
    rs = getattr(recipe.slurm, role)
    lines = [f"cd {shlex.quote(workdir)}", *rs.env_setup, f"exec {launcher(recipe, role)} -c {shlex.quote(IMPORT_CHECK)}"]
    return "\n".join(lines)


def _last_line(text: str) -> str:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else "no output"


def check_environments(recipe, roles: list[str], *, mode: str | None = None) -> list[str]:
    """Refuse (``UserError``) when a role's job environment cannot import megatron_sz.

    ``local`` (default) runs each role's ``env_setup`` lines and interpreter here, in the
    submit directory, the way the job script will (sbatch exports this shell's environment
    to the job); roles in a container are listed as unchecked. ``srun`` runs the same check
    as a one-task job on each role's partition (container included). Returns notes."""
    mode = mode or recipe.slurm.preflight
    notes: list[str] = []
    if mode == "none":
        return notes
    workdir = os.getcwd()
    seen: dict[tuple, str] = {}
    for role in dict.fromkeys(roles):
        rs = getattr(recipe.slurm, role)
        python, source = interpreter(recipe, role)
        key = (mode, python, tuple(rs.env_setup), rs.container, rs.partition if mode == "srun" else "")
        if key in seen:
            continue
        script = _env_check_script(recipe, role, workdir)
        if mode == "srun":
            cmd = ["srun", f"--partition={rs.partition}", "--nodes=1", "--ntasks=1", "--time=5",
                   f"--job-name=msz-env-check-{role}"]
            cmd += [f"--account={rs.account}"] if rs.account else []
            cmd += [f"--qos={rs.qos}"] if rs.qos else []
            if rs.container:
                cmd += [f"--container-image={rs.container}", f"--container-mounts={workdir}:{workdir}"]
            cmd += ["bash", "-c", script]
        elif rs.container:
            notes.append(f"slurm.{role}: container {rs.container} not checked here "
                         "(set slurm.preflight: srun to check it on its partition)")
            seen[key] = role
            continue
        else:
            cmd = ["bash", "-c", script]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600 if mode == "srun" else 180)
            ok, why = res.returncode == 0, _last_line(res.stderr or res.stdout)
        except FileNotFoundError:
            ok, why = False, f"{cmd[0]} not found"
        except subprocess.TimeoutExpired:
            ok, why = False, "the check did not finish in time"
        if not ok:
            setup = f" after slurm.{role}.env_setup" if rs.env_setup else ""
            raise UserError(
                f"jobs on partition {rs.partition!r} ({role} stages) would run {python} ({source}){setup}, "
                f"which cannot import megatron_sz ({mode} check: {why})", where=f"slurm.{role}",
                fix=f"install megatron-sz into that interpreter, or set slurm.{role}.python (or slurm.python) "
                    f"to one that has it, or name the environment in slurm.{role}.env_setup "
                    f"(e.g. 'source VENV/bin/activate') or slurm.{role}.container; "
                    f"slurm.preflight: none skips this check")
        seen[key] = role
    return notes


FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                 "PREEMPTED", "gone"}


def job_log(rd: RunDir, job_id: str, shard: int | None = None, *, lines: int = 5) -> dict | None:
    """``{"path", "tail"}`` of a job's (or array task's) log in RUN/slurm/logs, or None if it
    never wrote one (e.g. cancelled before it started). ``tail``: the last non-empty lines."""
    logs = rd.slurm_dir / "logs"
    pattern = f"*-{job_id}_{shard}.out" if shard is not None else f"*-{job_id}.out"
    found = sorted(logs.glob(pattern)) if logs.is_dir() else []
    if not found:
        return None
    path = found[-1]
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 16384))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    tail = [x for x in text.splitlines() if x.strip()][-lines:]
    return {"path": str(path), "tail": tail}


# --------------------------------------------------------------------------- submission


def submit_plan(rd: RunDir, recipe, plan: list[PlannedJob], *, dry_run: bool, live: dict) -> list[dict]:
    """Write every script; unless ``dry_run``, cancel stale pending jobs and sbatch in order."""
    from megatron_sz.data import atomic_write_text

    scripts = rd.slurm_dir / "scripts"
    (rd.slurm_dir / "logs").mkdir(parents=True, exist_ok=True)
    stale = sorted({v["id"] for v in live.values() if v["state"] not in STARTED})
    if stale and not dry_run:
        scancel(stale)
    ids: dict[str, str] = {}
    records = []
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for job in plan:
        if not job.submit:
            continue
        job.script = scripts / f"r{job.round:03d}-{job.stage.name}.sbatch"
        atomic_write_text(job.script, render_job(rd, recipe, job))
        os.chmod(job.script, 0o755)
        parts = []
        for kind, ref in job.deps:
            target = ids.get(ref, f"<{ref}>" if dry_run and ref.startswith("r") and "." in ref else ref)
            parts.append(f"{kind}:{target}")
        job.dependency = ",".join(parts)
        extra = [f"--dependency={job.dependency}"] if job.dependency else []
        if dry_run:
            job.job_id = f"<{job.key}>"
        else:
            job.job_id = sbatch(job.script, extra)
        ids[job.key] = job.job_id
        records.append({"key": job.key, "round": job.round, "stage": job.stage.name, "job_id": job.job_id,
                        "array": job.shards, "dependency": job.dependency, "script": str(job.script),
                        "partition": getattr(recipe.slurm, job.stage.role).partition, "submitted": stamp})
    if not dry_run and records:
        _append_jobs(rd, records)
    return records


def format_plan(plan: list[PlannedJob], *, cancelled: list[str], dry_run: bool) -> str:
    lines = [f"{'job':<18} {'partition/role':<20} {'array':<14} {'job id':<16} dependency"]
    for j in plan:
        arr = "-" if j.shards is None else (_array_spec(j.shards, 0)[:-2] if j.shards else "(running)")
        role = j.stage.role
        if not j.submit:
            lines.append(f"{j.key:<18} {role:<20} {arr:<14} {'kept running':<16} {','.join(j.running.values())}")
            continue
        kept = f" (+ running {','.join(str(v) for v in j.running.values())})" if j.running else ""
        lines.append(f"{j.key:<18} {role:<20} {arr:<14} {str(j.job_id):<16} {j.dependency or '-'}{kept}")
    if cancelled:
        lines.append(f"cancelled stale pending jobs: {', '.join(cancelled)}")
    if dry_run:
        lines.append("dry run: scripts written, nothing submitted")
    return "\n".join(lines)
