"""Per-round metrics a person can read: ``metrics.jsonl``, ``plot.png`` and (offline) wandb.

Every number comes from the stage completion markers of the run directory (each marker
stores its stage's counts), so the report can be rebuilt at any time and a resumed run
reports exactly what an uninterrupted one would. ``metrics.jsonl`` is rewritten whole
(atomically) from the per-round ``rounds/rNNN/metrics.json`` files, so re-running the
report stage never duplicates a line.
"""
from __future__ import annotations

import json
import os

from megatron_sz.data import atomic_write_json, atomic_write_text


def _sum_shards(rd, t: int, stage: str, keys_prefix: str = "") -> dict:
    out: dict = {}
    base = rd.round_dir(t) / "_done"
    if not base.is_dir():
        return out
    for p in sorted(base.glob(f"{stage}.*-of-*.json")):
        m = json.loads(p.read_text())
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("round", "pid"):
                out[keys_prefix + k] = out.get(keys_prefix + k, 0) + v
    return out


def _pick(summary: dict, *names: str):
    """First matching key in a trainer summary (nested one level), for loss/margin lines."""
    for n in names:
        if n in summary:
            return summary[n]
    for v in summary.values():
        if isinstance(v, dict):
            for n in names:
                if n in v:
                    return v[n]
    return None


def round_metrics(rd, t: int) -> dict:
    m: dict = {"round": t}
    if t == 0:
        e = rd.read_marker(0, "eval_sft")
        if e:
            m["accuracy_sft"] = e.get("accuracy")
    e = rd.read_marker(t, "eval")
    if e:
        m["accuracy"] = e.get("accuracy")
    verify = _sum_shards(rd, t, "verify")
    if verify:
        total = sum(verify.get(k, 0) for k in ("correct", "incorrect", "undecided"))
        m["train_success_rate"] = verify.get("correct", 0) / total if total else None
        m["verify"] = verify
    m["teacher"] = _sum_shards(rd, t, "refine")
    pairs = rd.read_marker(t, "pairs") or {}
    m["pairs"] = {k: pairs.get(k) for k in ("solver_pairs", "reference_pairs", "all_correct", "all_failed", "mixed")}
    cur = rd.read_marker(t, "curriculum") or {}
    m["curriculum"] = {k: cur.get(k) for k in ("pool_size", "active_next", "zones", "status", "added",
                                               "duplicate_exact", "duplicate_near", "contaminated",
                                               "retired", "by_provenance")}
    dpo = rd.read_marker(t, "dpo") or {}
    s = dpo.get("summary") or {}
    m["dpo"] = {"skipped": dpo.get("skipped"), "margin": _pick(s, "margin", "reward_margin", "final_margin"),
                "loss": _pick(s, "loss", "final_loss"),
                # the trainer's summary key is "accuracy" (preference accuracy of the last step's
                # batch); reading only other names left it null in every round (issue 20)
                "accuracy": _pick(s, "accuracy", "reward_accuracy", "pair_accuracy"),
                "steps": _pick(s, "steps", "step")}
    w = rd.read_marker(t, "wsft") or {}
    s = w.get("summary") or {}
    m["generator"] = {"skipped": w.get("skipped"), "loss": _pick(s, "loss", "final_loss"),
                      "examples": w.get("examples"), "weight_sum": w.get("weight_sum")}
    return m


def write_round_metrics(ctx) -> dict:
    rd = ctx.rd
    m = round_metrics(rd, ctx.t)
    atomic_write_json(ctx.path("metrics.json"), m)
    rows = _round_rows(rd)
    atomic_write_text(rd.metrics_path, _metrics_text(rows))
    plot(rows, rd.plot_path)
    try:
        _wandb(ctx, m)
    except Exception as exc:  # never fail a round over logging
        ctx.log(f"wandb logging skipped ({type(exc).__name__}: {exc})")
    acc = m.get("accuracy")
    ctx.log(f"round {ctx.t} done: held-out acc {acc if acc is None else round(acc, 3)}, "
            f"curriculum {m['curriculum'].get('pool_size')} problems, zones {m['curriculum'].get('zones')}")
    return {"accuracy": acc, "pool_size": m["curriculum"].get("pool_size")}


def _round_rows(rd) -> list[dict]:
    """Every round's ``rounds/rNNN/metrics.json``; one that is unreadable is rebuilt from the
    round's completion markers (they are what it was made of)."""
    rows = []
    for t in rd.rounds_present():
        p = rd.round_dir(t) / "metrics.json"
        if not p.exists():
            continue
        try:
            rows.append(json.loads(p.read_text(encoding="utf-8")))
        except (ValueError, UnicodeDecodeError):
            m = round_metrics(rd, t)
            atomic_write_json(p, m)
            rows.append(m)
    return rows


def _metrics_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def check_and_repair(rd) -> str | None:
    """Make ``metrics.jsonl`` (and ``plot.png``) match the per-round records.

    A run whose markers say it is finished is not complete while its summary file is
    damaged (a truncated or corrupt line, a missing round): rewrite both from the rounds.
    Returns what was repaired, or None when the file was already right."""
    rows = _round_rows(rd)
    if not rows:
        return None
    want = _metrics_text(rows)
    path = rd.metrics_path
    try:
        have = path.read_text(encoding="utf-8") if path.exists() else None
    except UnicodeDecodeError:
        have = ""
    if have == want and rd.plot_path.exists():
        return None
    why = "missing" if have is None else "out of date"
    if have:
        for i, line in enumerate(have.splitlines(), 1):
            try:
                json.loads(line)
            except ValueError:
                why = f"line {i} is not valid JSON"
                break
    atomic_write_text(path, want)
    plot(rows, rd.plot_path)
    return f"{path}: {why}; rebuilt from the {len(rows)} per-round metrics.json records"


def plot(rows: list[dict], path) -> None:
    """Two panels: held-out accuracy by round (warm-up as round -1 point), curriculum by round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    xs, ys = [], []
    for r in rows:
        if r.get("accuracy_sft") is not None:
            xs.append(-0.5)
            ys.append(r["accuracy_sft"])
        if r.get("accuracy") is not None:
            xs.append(r["round"])
            ys.append(r["accuracy"])
    a1.plot(xs, ys, marker="o")
    if xs and xs[0] == -0.5:
        a1.annotate("SFT warm-up", (xs[0], ys[0]), textcoords="offset points", xytext=(4, 6), fontsize=8)
    # Ticks at whole rounds only (matplotlib's auto ticks put 0.5, 1.5, ... on a 3-round run);
    # the warm-up point sits between -1 and 0 with its own label.
    whole = sorted({r["round"] for r in rows})
    a1.set_xticks(([-0.5] if xs and xs[0] == -0.5 else []) + whole,
                  (["SFT"] if xs and xs[0] == -0.5 else []) + [str(r) for r in whole])
    a1.set_xlabel("round")
    a1.set_ylabel("held-out accuracy")
    a1.set_title("Solver accuracy")
    a1.grid(alpha=0.3)
    rounds = [r["round"] for r in rows]
    for zone in ("learning", "mastered", "too_hard"):
        a2.plot(rounds, [((r.get("curriculum") or {}).get("zones") or {}).get(zone, 0) for r in rows],
                marker=".", label=zone)
    a2.plot(rounds, [(r.get("curriculum") or {}).get("pool_size") or 0 for r in rows], marker="o",
            color="black", label="pool size")
    a2.set_xticks(whole)
    a2.set_xlabel("round (end of)")
    a2.set_ylabel("problems")
    a2.set_title("Curriculum")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _wandb(ctx, m: dict) -> None:
    w = ctx.recipe.wandb
    if w.mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return
    try:
        import wandb
    except ImportError:
        return
    flat = {"accuracy": m.get("accuracy"), "accuracy_sft": m.get("accuracy_sft"),
            "train_success_rate": m.get("train_success_rate"),
            **{f"curriculum/{k}": v for k, v in (m.get("curriculum") or {}).items() if isinstance(v, (int, float))},
            **{f"curriculum/zone_{k}": v for k, v in ((m.get("curriculum") or {}).get("zones") or {}).items()},
            **{f"teacher/{k}": v for k, v in (m.get("teacher") or {}).items()},
            **{f"dpo/{k}": v for k, v in (m.get("dpo") or {}).items() if isinstance(v, (int, float))},
            **{f"generator/{k}": v for k, v in (m.get("generator") or {}).items() if isinstance(v, (int, float))}}
    flat = {k: v for k, v in flat.items() if v is not None}
    run_id = "msz-" + ctx.rd.root.name
    mode = w.mode if w.project else "offline"
    run = wandb.init(project=w.project or "megatron-sz", entity=w.entity, id=run_id, resume="allow",
                     mode=mode, dir=str(ctx.rd.root), name=ctx.recipe.name, reinit=True,
                     settings=wandb.Settings(silent=True))
    run.log(flat, step=ctx.t)
    run.finish()
