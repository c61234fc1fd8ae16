"""Plots are written as real PNG files."""
from megatron_sz.evaluation.plots import accuracy_by_round, growth_by_provenance, zones_by_round

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path):
    rows = [{"round": r, "benchmark": b, "mean_at_k": 0.1 * r + (0.05 if b == "gsm8k" else 0)}
            for r in range(3) for b in ("gsm8k", "math500")]
    paths = [
        accuracy_by_round(rows, tmp_path / "acc.png"),
        zones_by_round({0: [0.0, 0.5, 1.0, 0.25], 1: [0.125, 1.0]}, tmp_path / "zones.png"),
        growth_by_provenance({0: {"seed": 100}, 1: {"seed": 100, "teacher": 40}}, tmp_path / "growth.png"),
    ]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 2000
    assert not list(tmp_path.glob(".*tmp*"))
