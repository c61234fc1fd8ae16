"""Sandbox benchmark: executions/s, overhead over an in-process call, timeout accuracy.

Rows are appended to ``megatron_sz/sandbox/results/bench.csv`` in long format (one metric
per row, like the kernel benchmarks): date, commit, machine, tier, workers, metric, unit,
best / median / p90 over ``repeats`` runs, and a note. It is a benchmark, not a test: the
numbers depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "bench.csv"
FIELDS = ["date", "commit", "machine", "tier", "workers", "metric", "unit", "best", "median",
          "p90", "repeats", "note"]
TRIVIAL = "def f(x):\n    return x + 1\n"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> str:
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    return f"{platform.machine()} {cores} cores {platform.release()} load1={load:.1f}"


def _q(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_bench(*, workers: int = 0, n: int = 2000, repeats: int = 3, timeout_s: float = 1.0,
              tier: str = "auto", note: str = "", out: Path | None = RESULTS,
              progress=print) -> list[dict]:
    from megatron_sz.sandbox import Config, Sandbox, Task

    sb = Sandbox(Config(workers=workers, tier=tier))
    try:
        for w in sb._all:
            w.wait_ready()
        task = Task(TRIVIAL, call="f", args="41", timeout=5)
        batch = [task] * n
        rates, lat, timeouts = [], [], []
        for i in range(repeats):
            t0 = time.perf_counter()
            res = sb.run_batch(batch)
            dt = time.perf_counter() - t0
            bad = [r for r in res if r.value_repr != "42"]
            if bad:
                raise RuntimeError(f"benchmark execution failed: {bad[0].describe()}")
            rates.append(n / dt)
            one = []
            for _ in range(200):
                t1 = time.perf_counter()
                sb.submit(task)
                one.append(time.perf_counter() - t1)
            lat.append(statistics.median(one))
            t1 = time.perf_counter()
            r = sb.run("while True:\n    pass", timeout=timeout_s)
            timeouts.append(time.perf_counter() - t1 - timeout_s)
            if r.status != "timeout":
                raise RuntimeError(f"the timeout probe ended {r.describe()}")
            progress(f"repeat {i + 1}/{repeats}: {rates[-1]:.0f} exec/s, "
                     f"{lat[-1] * 1e3:.2f} ms serial, timeout +{timeouts[-1] * 1e3:.0f} ms")
        ns = {}
        exec(compile(TRIVIAL, "<bare>", "exec"), ns)  # noqa: S102 - our own trivial function
        bare = []
        for _ in range(repeats):
            t1 = time.perf_counter()
            for _ in range(10000):
                ns["f"](41)
            bare.append((time.perf_counter() - t1) / 10000)
        overhead = [x - statistics.median(bare) for x in lat]
        tier_name, nw = sb.tier, sb.config.workers
    finally:
        sb.close()
    base = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), commit=_commit(),
                machine=machine(), tier=tier_name, workers=nw, repeats=repeats, note=note)
    rows = [
        dict(base, metric=f"throughput_trivial_n{n}", unit="exec/s", best=max(rates),
             median=statistics.median(rates), p90=_q(rates, 0.1)),
        dict(base, metric="overhead_per_exec_serial", unit="ms", best=min(overhead) * 1e3,
             median=statistics.median(overhead) * 1e3, p90=_q(overhead, 0.9) * 1e3),
        dict(base, metric=f"timeout_overshoot_{timeout_s:g}s", unit="ms",
             best=min(timeouts) * 1e3, median=statistics.median(timeouts) * 1e3,
             p90=_q(timeouts, 0.9) * 1e3),
    ]
    for r in rows:
        for k in ("best", "median", "p90"):
            r[k] = round(r[k], 3)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        new = not out.exists()
        with out.open("a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerows(rows)
    return rows
