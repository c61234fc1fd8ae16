"""Packed sequences (``train.batching: packed``): several short items in one row of tokens.

What is unusual here:

* **The optimizer step sees the same items as without packing.** ``data.make_plan`` still
  fixes each step's ``global_batch_size`` items from the seed; packing only changes how a
  step's items are laid out: ``split_over_ranks`` deals them to the data-parallel ranks
  balanced by tokens (longest first, to the least-loaded rank), and ``pack_items`` cuts
  each rank's share into rows of at most ``capacity`` tokens (first-fit decreasing). One
  row is one micro-batch, so micro-batches hold different numbers of items; the step
  engine (``loop.py``) scales each micro-batch's loss so the gradient is still the
  global-batch mean.
* **An item never straddles rows.** A DPO pair's chosen and rejected sit next to each
  other in the same row (chosen first), so the pair is in one micro-batch, as the DPO
  loss needs.
* **One row, Megatron's THD layout** (``collate_packed``): ``input_ids`` ``[1, T]``,
  ``position_ids`` restarting at 0 in each sequence, ``cu_seqlens`` (int32 ``[S+1]``)
  with the padding tail cut into segments of its own (no longer than the longest real
  sequence, so pads attend only to pads and cost no more than a real sequence), and
  ``max_seqlen``. Attention and RoPE restart at every boundary.
* **The objectives see exactly what ``data.collate`` would give them.** ``labels``,
  ``extras``, ``weights`` and ``item_index`` are in ``collate``'s row-wise layout (seq k
  of every item, then seq k+1), and ``unpack_index`` ``[R, T_row]`` says where each
  row-wise position sits in the packed row (``T``, one past the row, at pads).
  ``unpack_rows`` gathers the last stage's hidden states ``[1, T, H]`` into ``[R, T_row,
  H]`` (zeros at pads; the gradient flows back through the gather), so the fused kernels
  and every objective run unchanged. The labels are pre-shifted per sequence (IGNORE at
  each sequence's last position), so no target crosses a boundary.

``python -m megatron_sz.train.packing --report`` measures the padding share (pad tokens /
tokens fed to the transformer) of length-sorted micro-batches vs packed rows on synthetic
length distributions (see ``synthetic_lengths``) and writes ``kernels/results/packing_padding.csv``.
"""
from __future__ import annotations

import argparse
import csv
import math
import random
import sys
from pathlib import Path
from typing import Any, Sequence

from megatron_sz.errors import DataError
from megatron_sz.train.data import IGNORE, Item, MicroBatch, collate, padded_length

# --------------------------------------------------------------------------- bin packing


def _ffd(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing over ``sizes``: bins of positions, each bin's total <= capacity.
    Ties keep the input order, so the result is a pure function of the sizes."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = sizes[i]
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] = r - n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def check_capacity(sizes: Sequence[int], capacity: int, *, what: str = "item") -> None:
    longest = max(sizes, default=0)
    if longest > capacity:
        raise DataError(
            f"a {what} of {longest} tokens does not fit a packed row of pack_length {capacity} tokens",
            fix="set train.pack_length >= max_length (x2 for DPO pairs: chosen and rejected share a row), "
                "or leave it unset")


def pack_items(items: Sequence[Item], capacity: int) -> list[list[int]]:
    """Rows of positions into ``items``: every item exactly once, each row's ``num_tokens``
    total <= ``capacity``, first-fit decreasing (deterministic). An item's sequences always
    go in the same row, adjacent (``collate_packed`` lays them out)."""
    sizes = [it.num_tokens for it in items]
    check_capacity(sizes, capacity)
    return _ffd(sizes, capacity)


def split_over_ranks(sizes: Sequence[int], dp: int) -> list[list[int]]:
    """Deal positions to ``dp`` ranks balanced by size: longest first to the least-loaded rank
    (lowest rank on ties). With at least ``dp`` items every rank gets one."""
    loads = [0] * dp
    shares: list[list[int]] = [[] for _ in range(dp)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(dp), key=lambda j: (loads[j], j))
        shares[r].append(i)
        loads[r] += sizes[i]
    return [sorted(s) for s in shares]


def rank_rows(sizes: Sequence[int], *, dp: int, dp_rank: int, capacity: int) -> list[list[int]]:
    """This DP rank's packed rows of one step (positions into ``sizes``)."""
    check_capacity(sizes, capacity)
    share = split_over_ranks(sizes, dp)[dp_rank]
    return [[share[j] for j in row] for row in _ffd([sizes[i] for i in share], capacity)]


# --------------------------------------------------------------------------- collation


def collate_packed(items: list[Item], *, pad_id: int, capacity: int | None = None,
                   pad_to_multiple_of: int = 8) -> MicroBatch:
    """``items`` as ONE packed row (see the module docstring). The row is padded to
    ``capacity`` when given (pipeline parallelism: one shape per step), else to a multiple
    of ``pad_to_multiple_of``."""
    import torch

    if not items:
        raise ValueError("collate_packed needs at least one item")
    rowwise = collate(items, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
    n_seq = len(items[0].seqs)
    B = len(items)
    used = sum(it.num_tokens for it in items)
    if capacity is not None:
        if used > capacity:
            raise DataError(f"{used} tokens do not fit a packed row of {capacity}",
                            fix="set train.pack_length >= max_length (x2 for DPO pairs)")
        T = capacity
    else:
        T = padded_length(used, pad_to_multiple_of)
    ids = torch.full((T,), pad_id, dtype=torch.long)
    pos = torch.zeros((T,), dtype=torch.long)
    T_row = rowwise.labels.shape[1]
    unpack = torch.full((n_seq * B, T_row), T, dtype=torch.long)
    bounds = [0]
    off = 0
    for i, it in enumerate(items):
        for k, s in enumerate(it.seqs):  # chosen then rejected, adjacent
            n = len(s)
            ids[off:off + n] = torch.tensor(s.input_ids, dtype=torch.long)
            pos[off:off + n] = torch.arange(n)
            unpack[k * B + i, :n] = torch.arange(off, off + n)
            off += n
            bounds.append(off)
    longest = max(len(s) for it in items for s in it.seqs)
    # The padding tail: segments of its own, none longer than the longest real sequence.
    while off < T:
        n = min(longest, T - off)
        pos[off:off + n] = torch.arange(n)
        off += n
        bounds.append(off)
    mb = rowwise
    mb.input_ids = ids.unsqueeze(0)
    mb.position_ids = pos.unsqueeze(0)
    mb.cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    mb.max_seqlen = longest
    mb.unpack_index = unpack
    return mb


def unpack_rows(hidden: Any, unpack_index: Any) -> Any:
    """Packed hidden states ``[1, T, H]`` -> the row-wise layout ``[R, T_row, H]`` (zeros at
    pads, where ``unpack_index`` is ``T``). Differentiable: the gradient scatters back."""
    import torch

    h = hidden.reshape(hidden.shape[-2], hidden.shape[-1])
    h = torch.cat([h, h.new_zeros(1, h.shape[1])], dim=0)
    return h[unpack_index.to(h.device)]


# --------------------------------------------------------------------------- padding report

DISTRIBUTIONS = {
    # name: (prompt median, prompt sigma, completion median, completion sigma) of log-normals, tokens
    "math-sft": (90, 0.45, 320, 0.75),
    "math-dpo": (90, 0.45, 300, 0.8),
    "math-rl": (110, 0.4, 550, 0.9),
}


def synthetic_lengths(kind: str, n: int, *, seed: int, max_length: int, pairs: bool = False) -> list[tuple[int, ...]]:
    """Token lengths of ``n`` items like math SFT / DPO / RL data, without downloads.

    Each sequence is prompt + completion, both log-normal (median m, log-sd sigma):
    ``math-sft`` prompts m=90 s=0.45, completions m=320 s=0.75 (reference solutions);
    ``math-dpo`` the same prompt shared by a chosen and a rejected completion, each
    m=300 s=0.8 (drawn independently); ``math-rl`` prompts m=110 s=0.4, sampled
    completions m=550 s=0.9 (long-tailed reasoning). Every sequence is capped at
    ``max_length`` (the trainer truncates) and is at least 8 tokens. Seeded, so the CSV is
    reproducible.
    """
    pm, ps, cm, cs = DISTRIBUTIONS[kind]
    rng = random.Random(f"{kind}/{seed}")

    def draw(m: float, s: float) -> int:
        return max(1, int(round(math.exp(math.log(m) + s * rng.gauss(0.0, 1.0)))))

    out = []
    for _ in range(n):
        p = draw(pm, ps)
        seqs = [draw(cm, cs) for _ in range(2 if pairs else 1)]
        out.append(tuple(max(8, min(max_length, p + c)) for c in seqs))
    return out


def _items_of(lengths: Sequence[tuple[int, ...]]) -> list[Item]:
    from megatron_sz.train.data import Tokens

    items = []
    for i, ls in enumerate(lengths):
        seqs = tuple(Tokens([1] * n, [IGNORE] * (n - 1) + [IGNORE]) for n in ls)
        items.append(Item(index=i, seqs=seqs))
    return items


def padding_report(items: list[Item], *, global_batch_size: int, micro_batch_size: int, capacity: int,
                   dp: int = 1, steps: int | None = None, seed: int = 0, pad_to_multiple_of: int = 8,
                   pipeline: bool = False) -> dict:
    """Padding share (pad tokens / tokens fed to the transformer) over ``data.make_plan``'s
    steps: ``none`` (random micro-batches) and ``length_sorted`` micro-batches (each padded
    to its longest item, or to the step's longest under pipeline parallelism) vs ``packed``
    rows of ``capacity`` (each padded to a multiple of ``pad_to_multiple_of``, or to
    ``capacity`` under pipeline parallelism; packed steps hold the same items as ``none``).
    Returns ``{batching: {"pad_share", "rows", "tokens_fed", "real"}}``."""
    from megatron_sz.train.data import make_plan

    res = {}
    for batching in ("none", "length_sorted", "packed"):
        plan = make_plan(items, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, dp=dp,
                         epochs=1, max_steps=steps, seed=seed, batching=batching,
                         pack_length=capacity if batching == "packed" else None)
        fed = real = rows = 0
        for s in range(plan.total_steps):
            step_items = [items[i] for i in plan.steps[s]]
            real += sum(it.num_tokens for it in step_items)
            step_len = padded_length(max(it.length for it in step_items), pad_to_multiple_of)
            for r in range(dp):
                for mb in plan.microbatches(s, r):
                    its = [items[i] for i in mb]
                    if batching == "packed":
                        used = sum(it.num_tokens for it in its)
                        fed += capacity if pipeline else padded_length(used, pad_to_multiple_of)
                        rows += 1
                    else:
                        L = step_len if pipeline else padded_length(max(it.length for it in its), pad_to_multiple_of)
                        n_rows = len(its) * len(its[0].seqs)
                        fed += L * n_rows
                        rows += n_rows
        res[batching] = {"pad_share": 1.0 - real / max(fed, 1), "rows": rows, "tokens_fed": fed, "real": real}
    return res


_JOBS = (  # (job kind, distribution, pairs?, max_length, micro_batch_size, global_batch_size, pack_length)
    ("solver-sft", "math-sft", False, 2048, 4, 64, 4096),
    ("solver-sft", "math-sft", False, 2048, 8, 64, 8192),
    ("generator-wsft", "math-sft", False, 1024, 8, 64, 2048),
    ("solver-dpo", "math-dpo", True, 2048, 2, 32, 8192),
    ("policy-gradient", "math-rl", False, 4096, 8, 128, 8192),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_sz.train.packing",
                                 description="padding share of length-sorted vs packed batching")
    ap.add_argument("--report", action="store_true", help="run the padding report")
    ap.add_argument("--items", type=int, default=4096, help="items per distribution")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "kernels" / "results"
                                         / "packing_padding.csv"))
    args = ap.parse_args(argv)
    if not args.report:
        ap.print_help()
        return 2
    rows = []
    for kind, dist_name, pairs, max_len, mbs, gbs, cap in _JOBS:
        items = _items_of(synthetic_lengths(dist_name, args.items, seed=args.seed, max_length=max_len, pairs=pairs))
        for pipeline in (False, True):
            rep = padding_report(items, global_batch_size=gbs, micro_batch_size=mbs, capacity=cap,
                                 seed=args.seed, pipeline=pipeline)
            for batching, r in rep.items():
                rows.append({"distribution": dist_name, "job": kind, "max_length": max_len,
                             "pipeline_parallel": pipeline, "batching": batching,
                             "micro_batch_size_or_capacity": cap if batching == "packed" else mbs,
                             "global_batch_size": gbs, "pad_share": round(r["pad_share"], 4), "rows": r["rows"],
                             "tokens_fed": r["tokens_fed"], "real_tokens": r["real"]})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    head = f"{'job':16} {'dist':9} {'pp':3} {'batching':13} {'mbs/cap':>7} {'pad share':>9} {'rows':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['job']:16} {r['distribution']:9} {'y' if r['pipeline_parallel'] else 'n':3} {r['batching']:13} "
              f"{r['micro_batch_size_or_capacity']:>7} {r['pad_share']:>9.1%} {r['rows']:>6}")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
