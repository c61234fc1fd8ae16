"""The run report tells the truth (issue 20): the DPO accuracy the trainer logs reaches
metrics.jsonl, the plot's x axis has whole rounds only, and a damaged metrics.jsonl of a
finished run is found and rebuilt from the per-round records."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_sz import report
from megatron_sz.rundir import RunDir

TINY = Path(__file__).resolve().parents[1] / "recipes" / "local-tiny.yaml"


@pytest.fixture
def rd(tmp_path):
    rd = RunDir.create_or_open(tmp_path / "run", recipe_text=TINY.read_text(), recipe_source=str(TINY),
                               name="t", seed=0)
    for t in range(3):
        # what the dpo stage's marker holds: the trainer's last step line + summary fields
        rd.mark_done(t, "dpo", model="m", hf="h", summary={"loss": 0.6, "margin": 0.4, "accuracy": 0.75,
                                                           "step": 10, "total_steps": 10})
        rd.mark_done(t, "eval", accuracy=0.1 * t)
        rd.round_dir(t).mkdir(parents=True, exist_ok=True)
        (rd.round_dir(t) / "metrics.json").write_text(json.dumps(report.round_metrics(rd, t)))
    rd.mark_done(0, "eval_sft", accuracy=0.02)
    (rd.round_dir(0) / "metrics.json").write_text(json.dumps(report.round_metrics(rd, 0)))
    return rd


def test_dpo_accuracy_is_reported(rd):
    m = report.round_metrics(rd, 1)
    assert m["dpo"]["accuracy"] == 0.75 and m["dpo"]["margin"] == 0.4 and m["dpo"]["steps"] == 10


def test_plot_has_whole_round_ticks(rd, monkeypatch):
    import matplotlib.figure

    seen = []
    orig = matplotlib.figure.Figure.savefig

    def spy(self, *a, **k):
        seen.append([list(ax.get_xticks()) for ax in self.axes])
        return orig(self, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    rows = [json.loads((rd.round_dir(t) / "metrics.json").read_text()) for t in range(3)]
    report.plot(rows, rd.plot_path)
    (acc, cur), = seen
    assert acc == [-0.5, 0, 1, 2]  # the warm-up point, then whole rounds
    assert cur == [0, 1, 2]
    assert rd.plot_path.exists()


def test_corrupt_last_metrics_line_is_found_and_rebuilt(rd):
    assert report.check_and_repair(rd) is not None  # no metrics.jsonl / plot yet
    good = rd.metrics_path.read_text()
    assert len(good.splitlines()) == 3 and report.check_and_repair(rd) is None
    rd.metrics_path.write_text(good[: len(good) - 25])  # a last line cut short
    msg = report.check_and_repair(rd)
    assert msg and "line 3 is not valid JSON" in msg
    assert rd.metrics_path.read_text() == good
    # a damaged per-round record is rebuilt from that round's markers
    (rd.round_dir(1) / "metrics.json").write_text("{not json")
    rd.metrics_path.write_text(good.splitlines()[0] + "\n")
    assert report.check_and_repair(rd)
    assert rd.metrics_path.read_text() == good


def test_evaluation_plots_have_whole_round_ticks(tmp_path, monkeypatch):
    import matplotlib.figure

    from megatron_sz.evaluation import plots

    seen = []
    orig = matplotlib.figure.Figure.savefig

    def spy(self, *a, **k):
        self.canvas.draw()  # resolve the auto ticks
        seen.append([t for ax in self.axes if ax.get_xlabel().startswith("round") for t in ax.get_xticks()])
        return orig(self, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    rows = [{"round": r, "benchmark": "b", "mean_at_k": 0.1 * r} for r in range(3)]
    plots.accuracy_by_round(rows, tmp_path / "a.png")
    plots.growth_by_provenance({r: {"seed": 10, "teacher": 5 * r} for r in range(3)}, tmp_path / "g.png")
    assert len(seen) == 2 and all(seen)
    assert all(float(t).is_integer() for ticks in seen for t in ticks), seen
