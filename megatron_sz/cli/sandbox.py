"""``megatron-sz sandbox ...``: the code sandbox's tier report and its benchmark.

* ``sandbox doctor`` says which tier this node gets (``bwrap``: namespaces + seccomp +
  rlimits; ``process``: seccomp + rlimits + a separate process) and why, then runs a few
  containment checks in that tier. Exit code 0 when the full tier works, 1 when only the
  fallback does, 2 when neither (no sandbox: nothing model-written may run here).
* ``sandbox bench`` measures executions/s, per-execution overhead and timeout accuracy and
  appends CSV rows to ``megatron_sz/sandbox/results/bench.csv``.
"""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("sandbox", help="the sandbox for model-written code: tier "
                              "report and benchmark",
                              description="Tools for megatron_sz.sandbox (issue 14).")
    sub = p.add_subparsers(dest="sandbox_command", metavar="SUBCOMMAND")
    d = sub.add_parser("doctor", help="report which sandbox tier this node gets and why",
                       description="Probe bubblewrap, user namespaces and seccomp; print the "
                                   "tier and a few containment checks. Exit 0: bwrap tier; "
                                   "1: fallback tier only; 2: no sandbox.")
    d.add_argument("--tier", choices=("auto", "bwrap", "process"), default="auto",
                   help="check this tier instead of the one auto-selection picks "
                        "(default: auto)")
    d.add_argument("--json", action="store_true", help="print the report as one JSON object")
    d.set_defaults(func=_doctor)
    b = sub.add_parser("bench", help="measure executions/s, overhead and timeout accuracy",
                       description="Benchmark the sandbox pool on a trivial function and "
                                   "append rows to megatron_sz/sandbox/results/bench.csv.")
    b.add_argument("--workers", type=int, default=0,
                   help="pool size (default 0: one worker per CPU core)")
    b.add_argument("-n", type=int, default=2000, help="executions per throughput run "
                   "(default 2000)")
    b.add_argument("--repeats", type=int, default=3, help="runs to take best/median over "
                   "(default 3)")
    b.add_argument("--timeout", type=float, default=1.0, metavar="S",
                   help="wall-clock limit of the timeout-accuracy probe (default 1)")
    b.add_argument("--tier", choices=("auto", "bwrap", "process"), default="auto",
                   help="tier to benchmark (default: auto)")
    b.add_argument("--note", default="", help="free text stored with the rows (e.g. "
                   "'shared machine')")
    b.add_argument("--no-save", action="store_true", help="print the rows, do not append "
                   "them to the CSV")
    b.set_defaults(func=_bench)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


_CHECKS = [
    ("no network", "import socket\nsocket.socket()", ("blocked",)),
    ("no subprocess", "import os, sys\nos.execv(sys.executable, [sys.executable])",
     ("blocked", "error")),
    ("read-only outside tmp", "open('/usr/lib64/x', 'w')", ("blocked", "error")),
    ("memory limit", "x = bytearray(4 << 30)", ("memory",)),
    ("wall-clock limit", "while True:\n    pass", ("timeout",)),
]


def _doctor(args: argparse.Namespace) -> int:
    import warnings

    from megatron_sz.sandbox import Config, Sandbox, pool

    report: dict = {"tier": None, "why": "", "checks": {}}
    cfg = Config(workers=1, tier=args.tier)
    why_not_bwrap = pool.probe_bwrap(cfg) if cfg.tier in ("auto", "bwrap") else \
        "the process tier was asked for"
    report["bwrap"] = "works" if why_not_bwrap is None else why_not_bwrap
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sb = Sandbox(cfg)
        except Exception as exc:  # noqa: BLE001 - report, do not crash the doctor
            report["why"] = f"no sandbox: {exc}"
            _print(report, args)
            return 2
    try:
        report["tier"] = sb.tier
        report["why"] = ("bubblewrap with user namespaces, seccomp-bpf and rlimits"
                         if sb.tier == "bwrap" else
                         f"fallback (seccomp + rlimits + separate process): {why_not_bwrap}")
        for name, code, want in _CHECKS:
            r = sb.run(code, timeout=1.0, memory=512 << 20)
            report["checks"][name] = f"{'ok' if r.status in want else 'FAILED'} " \
                                     f"({r.status})"
    finally:
        sb.close()
    _print(report, args)
    if any(v.startswith("FAILED") for v in report["checks"].values()):
        return 2
    return 0 if report["tier"] == "bwrap" else 1


def _print(report: dict, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"sandbox tier: {report['tier'] or 'none'}: {report['why']}")
    print(f"  bubblewrap: {report.get('bwrap', '?')}")
    for name, verdict in report["checks"].items():
        print(f"  {name}: {verdict}")


def _bench(args: argparse.Namespace) -> int:
    from megatron_sz.errors import UserError
    from megatron_sz.sandbox.bench import RESULTS, run_bench

    if args.n < 1 or args.repeats < 1 or args.workers < 0 or args.timeout <= 0:
        raise UserError("-n and --repeats must be >= 1, --workers >= 0, --timeout > 0",
                        where="megatron-sz sandbox bench", fix="e.g. -n 2000 --repeats 3")
    rows = run_bench(workers=args.workers, n=args.n, repeats=args.repeats,
                     timeout_s=args.timeout, tier=args.tier, note=args.note,
                     out=None if args.no_save else RESULTS)
    for r in rows:
        print(f"{r['metric']}: best {r['best']} {r['unit']}, median {r['median']} "
              f"{r['unit']} ({r['tier']}, {r['workers']} workers, {r['machine']})")
    if not args.no_save:
        print(f"appended {len(rows)} rows to {RESULTS}")
    return 0
