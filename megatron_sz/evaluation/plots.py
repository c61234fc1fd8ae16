"""PNG plots of a run: accuracy by round, curriculum zones by round, growth by provenance.

All functions take plain lists/dicts (what the run directory's metrics files hold) and
write one PNG with matplotlib's Agg backend (no display needed). They return the path.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:  # rounds are whole numbers: no 0.5, 1.5 ticks on a short run (issue 20)
        if ax.get_xlabel().startswith("round"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    tmp.replace(path)  # atomic: a reader never sees half a PNG
    return path


def accuracy_by_round(rows: list[dict], path: str | Path, *, metric: str = "mean_at_k",
                      title: str = "Accuracy by round") -> Path:
    """``rows``: ``{"round": int, "benchmark": str, metric: float}``; one line per benchmark."""
    plt = _plt()
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r.get(metric) is not None:
            series[r["benchmark"]].append((int(r["round"]), float(r[metric])))
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel(f"{metric.replace('_at_', '@')} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return _save(fig, path)


def zones_by_round(success_rates: dict[int, list[float]], path: str | Path, *, bins: int = 9) -> Path:
    """Distribution of curriculum success rates per round (the paper's zones), as stacked shares."""
    plt = _plt()
    rounds = sorted(success_rates)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    zones = {"too hard (s=0)": [], "learning": [], "mastered (s=1)": []}
    for r in rounds:
        rates = success_rates[r]
        n = max(len(rates), 1)
        zones["too hard (s=0)"].append(sum(1 for s in rates if s <= 0.0) / n)
        zones["mastered (s=1)"].append(sum(1 for s in rates if s >= 1.0) / n)
        zones["learning"].append(sum(1 for s in rates if 0.0 < s < 1.0) / n)
    bottom = [0.0] * len(rounds)
    for name, vals in zones.items():
        ax1.bar(rounds, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax1.set_xlabel("round")
    ax1.set_ylabel("share of curriculum")
    ax1.set_title("Curriculum zones by round")
    ax1.legend(fontsize=8)
    for r in rounds:
        ax2.hist(success_rates[r], bins=bins, range=(0, 1), histtype="step", label=f"round {r}")
    ax2.set_xlabel("solver success rate s")
    ax2.set_ylabel("problems")
    ax2.set_title("Success-rate distribution")
    if rounds:
        ax2.legend(fontsize=8)
    return _save(fig, path)


def growth_by_provenance(counts: dict[int, dict[str, int]], path: str | Path) -> Path:
    """Curriculum size per round, stacked by provenance (seed / teacher / generator / user)."""
    plt = _plt()
    rounds = sorted(counts)
    kinds = sorted({k for c in counts.values() for k in c})
    fig, ax = plt.subplots(figsize=(6.4, 4))
    if rounds and kinds:
        ax.stackplot(rounds, [[counts[r].get(k, 0) for r in rounds] for k in kinds], labels=kinds)
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("round")
    ax.set_ylabel("problems in curriculum")
    ax.set_title("Curriculum growth by provenance")
    return _save(fig, path)
