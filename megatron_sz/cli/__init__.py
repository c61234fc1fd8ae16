"""The ``megatron-sz`` command line.

One entry point, one subcommand group per module in this package. To add a command,
drop a module here that defines ``register(subparsers)``; it is discovered
automatically (modules starting with ``_`` are skipped). Each ``register`` adds its
parser(s) with ``help=`` on every flag and sets ``func`` to a callable taking the parsed
``argparse.Namespace`` and returning an exit code.

Command modules must import heavy dependencies (torch, Megatron, Triton, vLLM) inside
their ``func``, never at module top level, so ``megatron-sz --help`` stays fast.

Any ``UserError`` (bad recipe, bad JSONL line, impossible layout, ...) is printed as a
single ``error:`` line and the process exits with code 2.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from megatron_sz import __version__
from megatron_sz.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-sz",
        description="Megatron-Core backend for Socratic-Zero-style co-evolution "
                    "(solver DPO, teacher refinement, generator weighted SFT).")
    parser.add_argument("--version", action="version", version=f"megatron-sz {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from megatron_sz import quiet

    quiet.install(verbose_flag=bool(getattr(args, "verbose", False)))
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `megatron-sz status RUN | head`: the reader has gone, which is not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush does not complain either,
        # and exit like a tool killed by SIGPIPE would (128 + 13).
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
