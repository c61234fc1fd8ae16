"""``megatron-sz bench-kernels``: time the fused LM-head losses (see kernels/bench.py)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    # kernels/bench.py imports torch only inside run(), so registering stays cheap
    from megatron_sz.kernels import bench

    p = subparsers.add_parser(
        "bench-kernels", help="benchmark the fused LM-head losses (ours vs eager, "
                              "torch.compile, Liger) and append rows to a CSV",
        description=bench.__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_arguments(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from megatron_sz.kernels import bench

    return bench.run(args)
