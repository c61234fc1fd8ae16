"""``megatron-sz status RUN_DIR``: where each round stands, stage by stage and shard by shard.

Reads only the run directory's completion markers, plus SLURM job states when the run
was submitted with ``megatron-sz submit`` (squeue for live jobs, scontrol for recently
finished ones). ``--json`` prints the same as one JSON object.
"""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("status", help="show each round/stage/shard of a run and its SLURM job states",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--rounds", type=int, default=None, help="rounds to show (default: the recipe's 'rounds')")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_main)


def collect(rd, recipe, rounds: int) -> dict:
    from megatron_sz.executor import slurm as S
    from megatron_sz.executor import stage_done
    from megatron_sz.round import plan_round

    records = S.read_jobs(rd)
    live = S.live_tasks(rd) if records else {}
    latest: dict[tuple[int, str], dict] = {}
    for r in records:
        latest[(r["round"], r["stage"])] = r
    finished_cache: dict[str, str | None] = {}
    out = {"run_dir": str(rd.root), "rounds": []}
    for t in range(rounds):
        stages = []
        for s in plan_round(recipe, t):
            st = {"stage": s.name, "role": s.role, "resource": s.resource, "done": stage_done(rd, t, s)}
            st["running"] = not st["done"] and bool(rd.running(t, s.name))
            m = rd.read_marker(t, s.name)
            if m and "seconds" in m:
                st["seconds"] = m["seconds"]
            if s.shards:
                st["shards"] = [{"shard": i, "done": d} for i, d in enumerate(rd.shards_done(t, s.name, s.shards))]
            rec = latest.get((t, s.name))
            if rec:
                st["job_id"] = rec["job_id"]
                if s.shards:
                    for sh in st["shards"]:
                        task = live.get((t, s.name, sh["shard"]))
                        if task:
                            sh["slurm"] = f"{task['state']}" + (f" ({task['reason']})" if task["reason"] not in ("None", "") else "")
                else:
                    task = live.get((t, s.name, None))
                    if task:
                        st["slurm"] = task["state"] + (f" ({task['reason']})" if task["reason"] not in ("None", "") else "")
                    elif not st["done"] and S.have_slurm():
                        jid = rec["job_id"]
                        if jid not in finished_cache:
                            finished_cache[jid] = S.scontrol_state(jid)
                        st["slurm"] = finished_cache[jid] or "gone"
                _attach_failed_log(rd, st, rec["job_id"], live, (t, s.name))
            stages.append(st)
        metrics = rd.round_dir(t) / "metrics.json"
        out["rounds"].append({"round": t, "stages": stages,
                              "metrics": json.loads(metrics.read_text()) if metrics.exists() else None})
    return out


def _attach_failed_log(rd, st: dict, job_id: str, live: dict, key: tuple) -> None:
    """A stage not done whose job (or an array task) is no longer alive: its log path and tail."""
    from megatron_sz.executor import slurm as S

    if st["done"]:
        return
    if "shards" in st:
        for sh in st["shards"]:
            if not sh["done"] and (*key, sh["shard"]) not in live:
                log = S.job_log(rd, job_id, sh["shard"])
                if log:
                    st["log"] = {"shard": sh["shard"], **log}
                    return
    elif st.get("slurm", "").split(" ")[0] in S.FAILED_STATES:
        log = S.job_log(rd, job_id)
        if log:
            st["log"] = log


def _main(args) -> int:
    from megatron_sz.rundir import RunDir

    rd = RunDir.open(args.run_dir)
    recipe = rd.load_recipe()
    rounds = args.rounds or recipe.rounds
    info = collect(rd, recipe, rounds)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"run {rd.root}")
    for r in info["rounds"]:
        n_done = sum(s["done"] for s in r["stages"])
        acc = (r["metrics"] or {}).get("accuracy")
        print(f"round {r['round']}: {n_done}/{len(r['stages'])} stages done"
              + (f", held-out accuracy {acc:.3f}" if isinstance(acc, float) else ""))
        for s in r["stages"]:
            running = s.get("running") or "RUNNING" in (s.get("slurm") or "") or any(
                "RUNNING" in (x.get("slurm") or "") for x in s.get("shards", []))
            mark = "done" if s["done"] else "run" if running else "todo"
            extra = []
            if "shards" in s:
                k = sum(x["done"] for x in s["shards"])
                extra.append(f"shards {k}/{len(s['shards'])}")
                states = [f"{x['shard']}:{x['slurm']}" for x in s["shards"] if x.get("slurm")]
                if states:
                    extra.append("slurm " + " ".join(states))
            if s.get("slurm"):
                extra.append(f"slurm {s['slurm']}")
            if s.get("job_id"):
                extra.append(f"job {s['job_id']}")
            if s.get("seconds") is not None:
                extra.append(f"{s['seconds']:.0f}s")
            print(f"  {s['stage']:<11} {s['role']:<10} {mark:<5} {'  '.join(extra)}")
            if s.get("log"):
                print(f"    log {s['log']['path']}:")
                for line in s["log"]["tail"]:
                    print(f"      {line}")
    return 0
