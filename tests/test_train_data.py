"""Training data pipeline, LR schedule, WSFT weights, preemption flag, metrics file (no Megatron)."""
from __future__ import annotations

import json
import math
import os
import random
import signal

import pytest

from megatron_sz.errors import DataError, LayoutError
from megatron_sz.train.data import (IGNORE, Item, Tokens, collate, encode_example, make_plan, split_heldout,
                                    tokenize_pairs)
from megatron_sz.train.metrics import MetricsLogger, format_line, model_flops_per_token
from megatron_sz.train.objectives import gaussian_weight
from megatron_sz.train.preempt import PreemptionGuard
from megatron_sz.train.schedule import lr_at


class CharTok:
    """A character-level tokenizer: ids are code points + 4 (0 pad, 2 bos, 3 eos)."""

    pad_id, bos_id, eos_id = 0, 2, 3
    vocab_size = 200

    def encode(self, text):
        return [ord(c) % 190 + 4 for c in text]


def test_encode_masks_prompt_and_shifts_labels(rng_seed):
    rng = random.Random(rng_seed)
    tok = CharTok()
    prompt = "".join(rng.choice("abc xyz") for _ in range(rng.randint(1, 9)))
    completion = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 9)))
    t, status = encode_example(tok, prompt, completion, max_length=64, overlong="truncate")
    assert status == "ok"
    ids = [tok.bos_id] + tok.encode(prompt) + tok.encode(completion) + [tok.eos_id]
    assert t.input_ids == ids
    n_p = 1 + len(prompt)
    # Targets: exactly the completion tokens and eos, each at the position before it.
    expect = [IGNORE] * (n_p - 1) + ids[n_p:] + [IGNORE]
    assert t.labels == expect
    assert t.num_targets == len(completion) + 1


def test_overlong_truncate_and_drop_are_counted(rng_seed):
    rng = random.Random(rng_seed)
    tok = CharTok()
    max_len = 24
    pairs, n_long = [], 0
    for i in range(30):
        long = rng.random() < 0.4
        n_long += long
        body = "x" * (rng.randint(30, 60) if long else rng.randint(1, 6))
        pairs.append(("p" * rng.randint(2, 8), "c" + body, "r" + "y" * rng.randint(1, 6), i + 1))
    items, stats = tokenize_pairs(pairs, tok, max_length=max_len, overlong="truncate")
    assert stats.truncated == n_long and stats.kept == 30
    assert all(len(s) <= max_len for it in items for s in it.seqs)
    # Truncation keeps the prompt and cuts the completion's tail (the eos goes).
    items_d, stats_d = tokenize_pairs(pairs, tok, max_length=max_len, overlong="drop")
    assert stats_d.dropped_overlong == n_long and stats_d.kept == 30 - n_long
    assert [it.line for it in items_d] == [p[3] for p in pairs if len(p[1]) + len(p[0]) + 2 <= max_len]


def test_truncate_very_long_prompt_keeps_some_completion():
    tok = CharTok()
    t, status = encode_example(tok, "p" * 100, "abcdefghij", max_length=16, overlong="truncate")
    assert status == "truncated" and len(t) == 16
    assert t.input_ids[0] == tok.bos_id and t.num_targets >= 4


def _items(n, rng):
    return [Item(index=i, seqs=(Tokens([1] * (L := rng.randint(3, 40)), [IGNORE] * L),)) for i in range(n)]


@pytest.mark.parametrize("batching", ["length_sorted", "none"])
def test_plan_is_deterministic_and_covers_each_item_once_per_epoch(rng_seed, batching):
    rng = random.Random(rng_seed)
    n, gbs, mbs, dp = rng.randint(20, 70), 8, 2, 2
    items = _items(n, rng)
    kw = dict(global_batch_size=gbs, micro_batch_size=mbs, dp=dp, epochs=2, max_steps=None, seed=rng_seed,
              batching=batching)
    a, b = make_plan(items, **kw), make_plan(items, **kw)
    assert a.steps == b.steps and a.fingerprint == b.fingerprint
    per_epoch = len(a.steps) // 2
    for e in range(2):
        seen = [i for s in a.steps[e * per_epoch:(e + 1) * per_epoch] for i in s]
        assert len(seen) == len(set(seen)) == n - a.dropped_tail // 2
    # Every step splits into equal micro-batch counts per DP rank, each micro-batch full.
    for s in range(len(a.steps)):
        parts = [a.microbatches(s, r) for r in range(dp)]
        assert len({len(p) for p in parts}) == 1
        assert all(len(mb) == mbs for p in parts for mb in p)
        assert sorted(i for p in parts for mb in p for i in mb) == sorted(a.steps[s])
    c = make_plan(items, **{**kw, "seed": rng_seed + 1})
    assert c.steps != a.steps and c.fingerprint != a.fingerprint


def test_length_sorted_batching_reduces_padding(rng_seed):
    rng = random.Random(rng_seed)
    items = _items(256, rng)
    cost = {}
    for batching in ("length_sorted", "none"):
        plan = make_plan(items, global_batch_size=16, micro_batch_size=4, dp=1, epochs=1, max_steps=None,
                         seed=rng_seed, batching=batching)
        cost[batching] = sum(len(mb) * max(items[i].length for i in mb)
                             for s in range(plan.total_steps) for mb in plan.microbatches(s, 0))
    real = sum(it.length for it in items)
    assert cost["length_sorted"] < cost["none"]
    assert cost["length_sorted"] < 1.25 * real


def test_plan_errors():
    rng = random.Random(0)
    with pytest.raises(LayoutError, match="multiple of"):
        make_plan(_items(10, rng), global_batch_size=6, micro_batch_size=4, dp=1, epochs=1, max_steps=None,
                  seed=0, batching="none")
    with pytest.raises(DataError, match="only 1 training item"):
        make_plan(_items(1, rng), global_batch_size=4, micro_batch_size=2, dp=1, epochs=1, max_steps=None,
                  seed=0, batching="none")


def test_heldout_split_keeps_groups_together(rng_seed):
    rng = random.Random(rng_seed)
    items = _items(60, rng)
    groups = [f"g{rng.randint(0, 14)}" for _ in items]
    train, held = split_heldout(items, fraction=0.25, seed=rng_seed, groups=groups)
    assert len(train) + len(held) == 60 and held
    g_train = {groups[it.index] for it in train}
    assert not g_train & {groups[it.index] for it in held}


def test_collate_pairs_chosen_then_rejected():
    import torch

    a = Item(index=5, seqs=(Tokens([1, 2, 3], [2, 3, IGNORE]), Tokens([1, 2], [2, IGNORE])))
    b = Item(index=9, seqs=(Tokens([4, 5], [5, IGNORE]), Tokens([4, 6, 7, 8], [6, 7, 8, IGNORE])))
    mb = collate([a, b], pad_id=0, pad_to_multiple_of=8)
    assert mb.input_ids.shape == (4, 8)
    assert mb.input_ids[:, :4].tolist() == [[1, 2, 3, 0], [4, 5, 0, 0], [1, 2, 0, 0], [4, 6, 7, 8]]
    assert (mb.labels[:, 4:] == IGNORE).all() and mb.item_index.tolist() == [5, 9]
    assert mb.num_tokens == 11 and mb.position_ids[3].tolist() == list(range(8))
    assert torch.equal(mb.weights, torch.ones(2))


def test_lr_schedule():
    kw = dict(total_steps=20, lr=1.0, min_lr=0.1, warmup_steps=4)
    assert [lr_at(s, decay="cosine", **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, decay="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(19, decay="cosine", **kw) == pytest.approx(0.1)
    mid = lr_at(4 + 15 // 2, decay="cosine", **kw)
    assert 0.1 < mid < 1.0
    assert lr_at(19, decay="linear", **kw) == pytest.approx(0.1)
    assert lr_at(11, decay="linear", **kw) == pytest.approx(1.0 - 0.9 * 7 / 15)
    assert lr_at(17, decay="constant", **kw) == 1.0
    assert all(lr_at(s, decay="cosine", **kw) >= lr_at(s + 1, decay="cosine", **kw) for s in range(4, 19))


def test_gaussian_weight_matches_paper_table():
    got = [round(gaussian_weight(k / 8, 0.5, 0.2), 3) for k in range(9)]
    assert got == [0.044, 0.172, 0.458, 0.823, 1.0, 0.823, 0.458, 0.172, 0.044]
    assert gaussian_weight(0.3, mu=0.3, sigma=0.1) == 1.0
    assert gaussian_weight(0.5, mu=0.3, sigma=0.1) == pytest.approx(math.exp(-2.0))
    with pytest.raises(ValueError):
        gaussian_weight(1.5)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_preemption_guard_sets_flag_and_restores_handler(sig):
    before = signal.getsignal(getattr(signal, sig))
    with PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), getattr(signal, sig))
        assert guard.received == sig
        os.kill(os.getpid(), getattr(signal, sig))  # a second signal is ignored, not fatal
    assert signal.getsignal(getattr(signal, sig)) is before


def test_metrics_file_truncated_on_resume(tmp_path):
    off = type("W", (), {"mode": "disabled"})()
    m = MetricsLogger(tmp_path, kind="solver-dpo", total_steps=5, start_step=0, wandb_spec=off,
                      stream=open(os.devnull, "w"))
    for s in range(1, 5):
        m.log({"step": s, "loss": 1.0 / s, "lr": 1e-3, "tokens_per_s": 10.0, "mfu": None, "eta_s": 3})
    m.close()
    m2 = MetricsLogger(tmp_path, kind="solver-dpo", total_steps=5, start_step=2, enabled=True,
                       wandb_spec=off, stream=open(os.devnull, "w"))
    m2.close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    line = format_line({"kind": "solver-dpo", "step": 3, "loss": 0.5, "margin": 0.2, "accuracy": 0.75,
                        "grad_norm": 1.0, "lr": 1e-3, "tokens_per_s": 100.0, "mfu": 0.41, "eta_s": 75}, total=10)
    assert "step 3/10" in line and "acc 0.750" in line and "mfu 41.0%" in line and "eta 01:15" in line


def test_model_flops_per_token_counts_matmuls():
    cfg = {"hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
           "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936}
    f = model_flops_per_token(cfg, 0, backward=True)
    # Qwen3-8B: 6.95B non-embedding matmul params + 0.62B LM head -> ~45.4 GFLOP per token at seq 0.
    assert 6 * 7.5e9 < f < 6 * 7.65e9
    assert model_flops_per_token(cfg, 2048) - f == pytest.approx(3 * 2 * 2 * 36 * 32 * 128 * 2048)
