"""``megatron-sz seeds ...``: work with seed-problem files.

Subcommands live in ``SUBCOMMANDS``: each entry is a ``register_<name>(sub)`` function
that adds one parser and sets ``func``. Adding a subcommand is one new function plus one
list entry; nothing else here changes.
"""
from __future__ import annotations

import argparse
import json
import sys


def register_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate", help="check a seed JSONL file and report every problem at once",
        description="Check a seed file: schema, subject x level counts (the paper's split "
                    "by default), answer parseability, that each solution's last \\boxed{} "
                    "equals the answer, that each answer_code snippet recomputes the answer, "
                    "and duplicate or near-duplicate problems. Prints one "
                    "'file:line: field: message' line per issue and the subject x level "
                    "table. Exit code 0 if valid, 1 if not, 2 if the file cannot be read.")
    p.add_argument("path", metavar="PATH",
                   help="seed JSONL file (seeds/socratic100.jsonl is found from any "
                        "working directory)")
    p.add_argument("--no-exec", action="store_true",
                   help="do not run the answer_code snippets (answer_code becomes optional)")
    p.add_argument("--no-counts", action="store_true",
                   help="skip the paper's subject counts (Algebra 15, ..., Prealgebra 10) "
                        "and level 2-4 restriction; accept any subject and levels 1-5")
    p.add_argument("--json", action="store_true",
                   help="print the whole report as one JSON object instead of text")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds each answer_code snippet may run (default: 10)")
    p.add_argument("--near-dup-threshold", type=float, default=0.7, metavar="J",
                   help="word-trigram Jaccard similarity at which two problems count as "
                        "near-duplicates (default: 0.7)")
    p.set_defaults(func=_validate)


def _validate(args: argparse.Namespace) -> int:
    from megatron_sz.paths import resolve_resource
    from megatron_sz.seeds import PAPER_COUNTS, PAPER_LEVELS, validate_seed_file

    if args.timeout <= 0:
        from megatron_sz.errors import UserError

        raise UserError(f"--timeout must be > 0, got {args.timeout}", where="--timeout",
                        fix="pass a number of seconds, e.g. --timeout 10")
    if not 0.0 < args.near_dup_threshold <= 1.0:
        from megatron_sz.errors import UserError

        raise UserError(f"--near-dup-threshold must be in (0, 1], got "
                        f"{args.near_dup_threshold}", where="--near-dup-threshold",
                        fix="pass e.g. 0.7")
    path = resolve_resource(args.path, "seeds")
    report = validate_seed_file(
        path,
        expected_counts=None if args.no_counts else PAPER_COUNTS,
        levels=None if args.no_counts else PAPER_LEVELS,
        run_code=not args.no_exec,
        timeout_s=args.timeout,
        near_dup_threshold=args.near_dup_threshold,
        progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        for issue in report.issues:
            print(issue)
        if report.issues:
            print()
        print(report.format_table())
        print()
        print(report.summary())
    return 0 if report.ok else 1


#: One register function per ``seeds`` subcommand.
def register_select(sub: argparse._SubParsersAction) -> None:
    from megatron_sz.seed_select import register_select as _register  # logic: megatron_sz/seed_select.py

    _register(sub)


SUBCOMMANDS = [register_validate, register_select]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("seeds", help="seed-problem files (validate, ...)",
                                   description="Work with seed-problem JSONL files.")
    sub = parser.add_subparsers(dest="seeds_command", metavar="SUBCOMMAND")
    for reg in SUBCOMMANDS:
        reg(sub)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
