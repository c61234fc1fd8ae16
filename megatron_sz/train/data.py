"""Tokenisation and batching for the three training jobs.

What is unusual here:

* **The data order is a pure function of (seed, step).** ``BatchPlan`` lays out every
  global batch of every epoch up front, from the seed alone, so a resumed job needs only
  its step counter to continue exactly where it stopped: nothing is trained twice and
  nothing is skipped. ``fingerprint`` (a hash of the tokenised items and the plan
  settings) is stored in each checkpoint; resuming on different data is an error.
* **Items, not sequences, are the batching unit.** An SFT or WSFT item is one sequence;
  a DPO item is a (chosen, rejected) pair, and both halves always land in the same
  micro-batch (the fused DPO loss needs them side by side: rows [0, B) chosen, [B, 2B)
  rejected).
* **Length-sorted batching**: items are shuffled, then sorted by length inside windows
  of ``sort_window`` global batches and cut into global batches whose order is shuffled
  again. Micro-batches are padded only to their own longest item (rounded up to
  ``pad_to_multiple_of``), or to the step's longest item under pipeline parallelism,
  whose point-to-point buffers need one shape per step.
* **Labels are pre-shifted**: ``labels[t]`` is the target of position ``t`` (the next
  token), ``IGNORE`` on prompt, padding and the last position. The fused losses and
  ``linear_logprobs`` consume hidden states and these labels as they are.
* **Packed batching** (``batching: packed``, ``train/packing.py``): a step holds the same
  items as the plan says, dealt to DP ranks by tokens and packed into rows of
  ``pack_length`` tokens; one row is one micro-batch (``BatchPlan.microbatches``).
* Overlong examples are truncated (the completion's tail first, then the prompt's head)
  or dropped, by policy, and every case is counted in ``TokenizeStats``.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from megatron_sz.errors import DataError, LayoutError

IGNORE = -100


@dataclass
class Tokens:
    """One tokenised sequence: ``input_ids`` and pre-shifted ``labels`` (same length)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class Item:
    """The unit of batching: one sequence (SFT/WSFT) or a (chosen, rejected) pair (DPO)."""

    index: int  # position among the kept items of the input file (stable id for ref log-probs)
    seqs: tuple[Tokens, ...]
    weight: float = 1.0
    line: int | None = None  # 1-based line of the source record
    # Per-item fields a job needs besides tokens (policy gradient: reward, clip bound,
    # per-position behaviour log-probs / loss mask). A number becomes a [B] tensor in
    # ``MicroBatch.extras``, a list (one value per position) a right-padded [B, T] tensor.
    extras: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return max(len(s) for s in self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.seqs)


@dataclass
class TokenizeStats:
    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_empty: int = 0  # nothing left to learn from (no completion token survives)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def encode_example(tok: Any, prompt: str, completion: str, *, max_length: int,
                   overlong: str) -> tuple[Tokens | None, str]:
    """Tokenise ``prompt + completion + eos`` with the loss on the completion and eos only.

    Returns ``(tokens, status)`` with status ``"ok"``, ``"truncated"``, ``"dropped"``
    (overlong under the ``drop`` policy) or ``"empty"`` (no completion token).
    Prompt and completion are encoded separately so the loss mask is exact.
    """
    bos = [tok.bos_id] if getattr(tok, "bos_id", None) is not None else []
    p_ids = bos + list(tok.encode(prompt))
    c_ids = list(tok.encode(completion)) + [tok.eos_id]
    status = "ok"
    if len(p_ids) + len(c_ids) > max_length:
        if overlong == "drop":
            return None, "dropped"
        status = "truncated"
        # Keep as much prompt as leaves room for at least a quarter of the budget of
        # completion (or the whole completion if shorter); cut the prompt's head, the
        # completion's tail.
        c_keep = min(len(c_ids), max(max_length - len(p_ids), max_length // 4))
        p_keep = max_length - c_keep
        if len(p_ids) > p_keep:
            body = p_ids[len(bos):]
            keep = max(0, p_keep - len(bos))
            p_ids = bos + body[len(body) - keep:] if keep else bos[:p_keep]
        c_ids = c_ids[:c_keep]
    if not c_ids:
        return None, "empty"
    ids = p_ids + c_ids
    # labels[t] = ids[t+1] where ids[t+1] is a completion token.
    labels = [IGNORE] * len(ids)
    for t in range(max(len(p_ids) - 1, 0), len(ids) - 1):
        labels[t] = ids[t + 1]
    return Tokens(ids, labels), status


def _note(stats: TokenizeStats, status: str) -> None:
    if status == "truncated":
        stats.truncated += 1
    elif status == "dropped":
        stats.dropped_overlong += 1
    elif status == "empty":
        stats.dropped_empty += 1


def tokenize_examples(examples: Iterable[tuple[str, str, float, int | None]], tok: Any, *,
                      max_length: int, overlong: str) -> tuple[list[Item], TokenizeStats]:
    """SFT/WSFT: (prompt, completion, weight, line) -> one-sequence items."""
    stats = TokenizeStats()
    items: list[Item] = []
    for prompt, completion, weight, line in examples:
        stats.records += 1
        t, status = encode_example(tok, prompt, completion, max_length=max_length, overlong=overlong)
        _note(stats, status)
        if t is None:
            continue
        items.append(Item(index=len(items), seqs=(t,), weight=float(weight), line=line))
    stats.kept = len(items)
    return items, stats


def tokenize_pairs(pairs: Iterable[tuple[str, str, str, int | None]], tok: Any, *,
                   max_length: int, overlong: str) -> tuple[list[Item], TokenizeStats]:
    """DPO: (prompt, chosen, rejected, line) -> pair items. A pair is overlong when either
    half is; under ``drop`` the whole pair goes (the two halves are never separated)."""
    stats = TokenizeStats()
    items: list[Item] = []
    for prompt, chosen, rejected, line in pairs:
        stats.records += 1
        c, s1 = encode_example(tok, prompt, chosen, max_length=max_length, overlong=overlong)
        r, s2 = encode_example(tok, prompt, rejected, max_length=max_length, overlong=overlong)
        if c is None or r is None:
            _note(stats, "dropped" if "dropped" in (s1, s2) else "empty")
            continue
        if "truncated" in (s1, s2):
            stats.truncated += 1
        items.append(Item(index=len(items), seqs=(c, r), line=line))
    stats.kept = len(items)
    return items, stats


def split_heldout(items: list[Item], *, fraction: float, seed: int,
                  groups: Sequence[str | None] | None = None) -> tuple[list[Item], list[Item]]:
    """Deterministic train/held-out split. Items sharing a group (problem id) stay together,
    so held-out accuracy is measured on unseen problems."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    keys = [g if g is not None else f"#{i}" for i, g in enumerate(groups)] if groups else \
        [f"#{i}" for i in range(len(items))]
    uniq = sorted(set(keys))
    random.Random(seed ^ 0x5EED).shuffle(uniq)
    n_groups = max(1, int(round(fraction * len(uniq))))
    if n_groups >= len(uniq):
        n_groups = len(uniq) - 1
    held = set(uniq[:n_groups])
    train = [it for it, k in zip(items, keys) if k not in held]
    heldout = [it for it, k in zip(items, keys) if k in held]
    return train, heldout


# --------------------------------------------------------------------------- the plan


@dataclass
class BatchPlan:
    """Every global batch of the run, as lists of item positions, fixed by the seed.

    ``steps[s]`` is the list of item positions (into ``items``) of step ``s``, already
    ordered by length. ``dropped_tail`` counts items left out at the end of each epoch
    because they do not fill a multiple of ``micro_batch_size * dp``.
    """

    steps: list[list[int]]
    global_batch_size: int
    micro_batch_size: int
    dp: int
    dropped_tail: int = 0
    fingerprint: str = ""
    pack_length: int | None = None  # packed batching: row capacity in tokens; None: not packed
    sizes: list[int] = field(default_factory=list)  # packed batching: Item.num_tokens of every item

    @property
    def total_steps(self) -> int:
        return len(self.steps)

    def microbatches(self, step: int, dp_rank: int) -> list[list[int]]:
        """This DP rank's micro-batches of ``step``: micro-batch j goes to rank j % dp.
        Packed: the step's items dealt to ranks by tokens, this rank's share cut into rows of
        ``pack_length`` tokens (``packing.rank_rows``), one row per micro-batch."""
        ids = self.steps[step]
        if self.pack_length is not None:
            from megatron_sz.train.packing import rank_rows

            rows = rank_rows([self.sizes[i] for i in ids], dp=self.dp, dp_rank=dp_rank, capacity=self.pack_length)
            return [[ids[j] for j in row] for row in rows]
        mbs = [ids[i:i + self.micro_batch_size] for i in range(0, len(ids), self.micro_batch_size)]
        return mbs[dp_rank::self.dp]


def make_plan(items: list[Item], *, global_batch_size: int, micro_batch_size: int, dp: int,
              epochs: int, max_steps: int | None, seed: int, batching: str,
              sort_window: int = 8, pack_length: int | None = None) -> BatchPlan:
    """``pack_length`` (packed batching only): the row capacity in tokens; every item must fit."""
    if batching == "packed":
        if pack_length is None:
            raise ValueError("batching 'packed' needs pack_length")
        from megatron_sz.train.packing import check_capacity

        check_capacity([it.num_tokens for it in items], pack_length)
    else:
        pack_length = None
    if global_batch_size % (micro_batch_size * dp):
        raise LayoutError(
            f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
            f"{micro_batch_size} x data-parallel size {dp}",
            fix=f"use a global_batch_size that is a multiple of {micro_batch_size * dp}")
    unit = micro_batch_size * dp
    if len(items) < unit:
        raise DataError(f"only {len(items)} training item(s) after filtering; one step needs at "
                        f"least micro_batch_size x dp = {unit}",
                        fix="add data, or lower micro_batch_size / the number of data-parallel ranks")
    steps: list[list[int]] = []
    dropped_tail = 0
    lengths = [it.length for it in items]
    for epoch in range(epochs):
        rng = random.Random(hash_int(seed, epoch))
        order = list(range(len(items)))
        rng.shuffle(order)
        n_full = len(order) // global_batch_size
        rest = len(order) - n_full * global_batch_size
        keep_rest = rest - rest % unit
        dropped_tail += rest - keep_rest
        order = order[:n_full * global_batch_size + keep_rest]
        batches: list[list[int]] = []
        if batching == "length_sorted":
            window = global_batch_size * max(1, sort_window)
            for w0 in range(0, n_full * global_batch_size, window):
                chunk = sorted(order[w0:min(w0 + window, n_full * global_batch_size)],
                               key=lambda i: (lengths[i], i))
                batches.extend(chunk[i:i + global_batch_size] for i in range(0, len(chunk), global_batch_size))
            rng.shuffle(batches)
        else:
            batches = [order[i:i + global_batch_size] for i in range(0, n_full * global_batch_size, global_batch_size)]
        if keep_rest:
            batches.append(order[n_full * global_batch_size:])
        for b in batches:
            # Within a step, sort by length so each micro-batch pads to similar lengths.
            steps.append(sorted(b, key=lambda i: (lengths[i], i)) if batching == "length_sorted" else list(b))
    if max_steps is not None:
        steps = steps[:max_steps]
    plan = BatchPlan(steps=steps, global_batch_size=global_batch_size,
                     micro_batch_size=micro_batch_size, dp=dp, dropped_tail=dropped_tail, pack_length=pack_length,
                     sizes=[it.num_tokens for it in items] if pack_length is not None else [])
    packed = f"/{pack_length}" if pack_length is not None else ""
    plan.fingerprint = fingerprint(items, extra=f"{global_batch_size}/{micro_batch_size}/{dp}/"
                                   f"{epochs}/{max_steps}/{seed}/{batching}/{sort_window}{packed}")
    return plan


def hash_int(*parts: Any) -> int:
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little")


def fingerprint(items: list[Item], *, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for it in items:
        for s in it.seqs:
            h.update(len(s).to_bytes(4, "little"))
            h.update(",".join(map(str, s.input_ids)).encode())
            h.update(",".join(map(str, s.labels)).encode())
        h.update(repr(it.weight).encode())
        if it.extras:
            h.update(repr(sorted(it.extras.items())).encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- collation


@dataclass
class MicroBatch:
    """Tensors of one micro-batch. For DPO, rows [0, B) are chosen and [B, 2B) rejected.

    Packed (``packing.collate_packed``): ``input_ids`` / ``position_ids`` are one row
    ``[1, T]`` (THD), ``cu_seqlens`` / ``max_seqlen`` its sequence boundaries, and
    ``unpack_index`` ``[R, T_row]`` maps the row-wise layout that ``labels``, ``extras``,
    ``weights`` and ``item_index`` are in (exactly ``collate``'s) to packed positions."""

    input_ids: Any  # LongTensor [rows, T] ([1, T] packed)
    position_ids: Any  # LongTensor [rows, T] ([1, T] packed, restarting at 0 per sequence)
    labels: Any  # LongTensor [rows, T], IGNORE where no loss (packed: row-wise [R, T_row])
    weights: Any  # FloatTensor [B] (items)
    item_index: Any  # LongTensor [B]: Item.index, to look up reference log-probs
    num_items: int
    num_tokens: int  # real (non-pad) tokens
    extras: dict = field(default_factory=dict)
    cu_seqlens: Any = None  # packed: int32 [S+1] on the host (the padding tail is its own segment(s))
    max_seqlen: int | None = None  # packed: longest segment
    unpack_index: Any = None  # packed: LongTensor [R, T_row], T (one past the row) at pads
    cu_seqlens_device: Any = None  # packed: cu_seqlens on the compute device (set by ``to``)
    loss_scale: float = 1.0  # the step engine's factor on this micro-batch's loss (packed batching)
    # the step engine's gradient-accumulation fusion keywords for the fused LM-head losses
    # (``main_grad=True, grad_scale=...``); empty: the loss returns dW as usual
    fusion: dict = field(default_factory=dict)

    @property
    def packed(self) -> bool:
        return self.unpack_index is not None

    def to(self, device: Any) -> "MicroBatch":
        for name in ("input_ids", "position_ids", "labels", "weights", "item_index"):
            setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        self.extras = {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in self.extras.items()}
        if self.unpack_index is not None:
            self.unpack_index = self.unpack_index.to(device, non_blocking=True)
            self.cu_seqlens_device = self.cu_seqlens.to(device, non_blocking=True)
        return self


def padded_length(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def collate(items: list[Item], *, pad_id: int, seq_len: int | None = None,
            pad_to_multiple_of: int = 8) -> MicroBatch:
    """Stack items into a right-padded micro-batch (seq k of every item, then seq k+1)."""
    import torch

    n_seq = len(items[0].seqs)
    longest = max(it.length for it in items)
    T = seq_len if seq_len is not None else padded_length(longest, pad_to_multiple_of)
    if T < longest:
        raise ValueError(f"seq_len {T} < longest item {longest}")
    rows = [it.seqs[k] for k in range(n_seq) for it in items]
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for r, s in enumerate(rows):
        ids[r, :len(s)] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[r, :len(s)] = torch.tensor(s.labels, dtype=torch.long)
    pos = torch.arange(T, dtype=torch.long).unsqueeze(0).expand(len(rows), T).contiguous()
    extras = {}
    for key in items[0].extras:
        vals = [it.extras[key] for it in items]
        if isinstance(vals[0], (list, tuple)):
            t = torch.zeros((len(items), T), dtype=torch.float32)
            for r, v in enumerate(vals):
                t[r, :len(v)] = torch.tensor(v, dtype=torch.float32)
            extras[key] = t
        else:
            extras[key] = torch.tensor(vals, dtype=torch.float32)
    return MicroBatch(input_ids=ids, position_ids=pos, labels=labels,
                      weights=torch.tensor([it.weight for it in items], dtype=torch.float32),
                      item_index=torch.tensor([it.index for it in items], dtype=torch.long),
                      num_items=len(items), num_tokens=sum(len(s) for s in rows), extras=extras)
