"""Agent0's per-round record: ``rounds/rNNN/metrics.json``, ``RUN/metrics.jsonl`` (rewritten), ``plot.png``.

One row per round, from the round's files and markers only (so a resumed run writes the
same row): the curriculum reward and its components (R_unc, tool reward, repetition
penalty) over valid proposals, the share of invalid ones; the distribution of the
self-consistency p (10 bins) and the share the filter kept; tool calls per executor
rollout and how the trajectories ended; the repetition clusters (count, largest, share
of questions in a cluster of two or more); the executor's held-out accuracy with tools
(after the warm-up, and after each round); the two policy-gradient jobs' last losses.
"""
from __future__ import annotations

import json

from megatron_sz.data import atomic_write_json, atomic_write_text, read_jsonl


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def round_metrics(ctx) -> dict:
    from megatron_sz.data import TaskSignal, ToolTrajectory

    d, rd, t = ctx.dir, ctx.rd, ctx.t
    sig = read_jsonl(d / "signals.jsonl", TaskSignal) if (d / "signals.jsonl").exists() else []
    valid = [s for s in sig if s.valid]
    trajs = [tr for f in sorted((d / "solve").glob("shard-*.jsonl")) for tr in read_jsonl(f, ToolTrajectory,
                                                                                          allow_partial_tail=True)]
    ps = [s.p for s in valid if s.p is not None]
    hist = [0] * 10
    for p in ps:
        hist[min(9, int(p * 10))] += 1
    sizes: dict[int, int] = {}
    for s in valid:
        sizes[s.cluster] = s.cluster_size
    finishes: dict[str, int] = {}
    for tr in trajs:
        finishes[tr.finish] = finishes.get(tr.finish, 0) + 1

    def marker(name: str, r: int = t) -> dict:
        return rd.read_marker(r, name) or {}

    def loss(name: str):
        return (marker(name).get("summary") or {}).get("loss")

    return {
        "round": t,
        "curriculum": {"proposals": len(sig), "valid_share": len(valid) / max(1, len(sig)),
                       "reward_mean": _mean(s.reward for s in sig), "r_unc_mean": _mean(s.r_unc for s in valid),
                       "r_tool_mean": _mean(s.r_tool for s in valid),
                       "repetition_mean": _mean(s.repetition for s in valid),
                       "loss": loss("train_curriculum")},
        "p": {"mean": _mean(ps), "hist10": hist, "kept": sum(s.kept for s in valid),
              "kept_share": sum(s.kept for s in valid) / max(1, len(valid))},
        "executor": {"rollouts": len(trajs), "tool_calls_per_rollout": _mean(tr.tool_calls for tr in trajs),
                     "answered_share": finishes.get("answer", 0) / max(1, len(trajs)), "finish": finishes,
                     "trained_on": marker("score").get("executor_rollouts"), "loss": loss("train_executor")},
        "clusters": {"count": len(sizes), "largest": max(sizes.values(), default=0),
                     "share_repeated": sum(1 for s in valid if s.cluster_size > 1) / max(1, len(valid))},
        "accuracy": marker("eval").get("accuracy"),
        "tool_calls_eval": marker("eval").get("tool_calls_mean"),
        "accuracy_warmup": marker("eval_warmup", 0).get("accuracy"),
        "heldout_filtered": marker("score").get("heldout_filtered"),
    }


def write_round_metrics(ctx) -> dict:
    m = round_metrics(ctx)
    atomic_write_json(ctx.dir / "metrics.json", m)
    rows = []
    for r in range(ctx.t + 1):
        f = ctx.rd.round_dir(r) / "metrics.json"
        if f.exists():
            rows.append(json.loads(f.read_text()))
    atomic_write_text(ctx.rd.root / "metrics.jsonl", "".join(json.dumps(x) + "\n" for x in rows))
    plot(rows, ctx.rd.root / "plot.png")
    ctx.log(f"report: accuracy {m['accuracy']}, p mean {m['p']['mean']}, kept {m['p']['kept']}, "
            f"tool calls/rollout {m['executor']['tool_calls_per_rollout']}, reward {m['curriculum']['reward_mean']}")
    return {"accuracy": m["accuracy"], "kept": m["p"]["kept"]}


def plot(rows: list[dict], path) -> None:
    from megatron_sz.evaluation.plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(2, 3, figsize=(13, 7))
    r = [x["round"] for x in rows]

    def line(a, key_fn, label):
        ys = [key_fn(x) for x in rows]
        a.plot(r, [y if y is not None else float("nan") for y in ys], marker="o", label=label)

    a = ax[0][0]
    for k, lab in (("reward_mean", "reward"), ("r_unc_mean", "R_unc"), ("r_tool_mean", "tool"),
                   ("repetition_mean", "repetition")):
        line(a, lambda x, k=k: x["curriculum"][k], lab)
    a.set_title("curriculum reward components"), a.legend(fontsize=7)
    a = ax[0][1]
    for x in rows:
        a.plot([i / 10 + 0.05 for i in range(10)], x["p"]["hist10"], marker=".", label=f"r{x['round']}")
    a.set_title("self-consistency p (valid proposals)"), a.legend(fontsize=7)
    a = ax[0][2]
    line(a, lambda x: x["p"]["kept_share"], "kept share")
    line(a, lambda x: x["curriculum"]["valid_share"], "valid share")
    a.set_title("filter: kept / valid"), a.legend(fontsize=7)
    a = ax[1][0]
    line(a, lambda x: x["executor"]["tool_calls_per_rollout"], "solve")
    line(a, lambda x: x["tool_calls_eval"], "eval")
    a.set_title("tool calls per rollout"), a.legend(fontsize=7)
    a = ax[1][1]
    line(a, lambda x: x["accuracy"], "after round")
    if rows and rows[0].get("accuracy_warmup") is not None:
        a.axhline(rows[0]["accuracy_warmup"], ls="--", c="gray", label="warm-up")
    a.set_title("executor held-out accuracy (tools on)"), a.legend(fontsize=7)
    a = ax[1][2]
    line(a, lambda x: x["clusters"]["count"], "clusters")
    line(a, lambda x: x["clusters"]["largest"], "largest")
    a.set_title("repetition clusters"), a.legend(fontsize=7)
    for row in ax:
        for a in row:
            a.set_xlabel("round")
    ax[0][1].set_xlabel("p")
    fig.tight_layout()
    _save(fig, path)


def finish(rd) -> str | None:
    """When every round is done: rebuild ``metrics.jsonl`` and ``plot.png`` from the per-round
    records if either is missing or out of date; returns what was repaired."""
    rows = [json.loads((rd.round_dir(t) / "metrics.json").read_text()) for t in rd.rounds_present()
            if (rd.round_dir(t) / "metrics.json").exists()]
    if not rows:
        return None
    want = "".join(json.dumps(x) + "\n" for x in rows)
    path = rd.root / "metrics.jsonl"
    have = path.read_text(encoding="utf-8", errors="replace") if path.exists() else None
    if have == want and (rd.root / "plot.png").exists():
        return None
    atomic_write_text(path, want)
    plot(rows, rd.root / "plot.png")
    return f"{path}: {'missing' if have is None else 'out of date'}; rebuilt from {len(rows)} rounds"
