"""The benchmark script runs on CPU (tiny shapes, torch backend) and writes valid CSV rows."""
import csv

from megatron_sz.cli import main as cli_main
from megatron_sz.kernels.bench import CSV_FIELDS


def test_bench_kernels_cli_appends_long_format_rows(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    argv = ["bench-kernels", "--tokens", "32", "--hidden", "16", "--vocab", "300", "--seq-len", "8",
            "--warmup", "0", "--reps", "2", "--csv", str(out)]
    assert cli_main(argv) == 0
    assert cli_main(argv[:-2] + ["--ops", "wsft", "--csv", str(out)]) == 0   # appends, one header
    printed = capsys.readouterr().out
    assert "6*N*H*V" in printed and "ms (p50)" in printed
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(CSV_FIELDS)
    combos = {(r["op"], r["provider"], r["metric"]) for r in rows}
    for op in ("dpo", "wsft", "logprobs", "pg"):
        for prov in ("ours", "eager"):
            assert (op, prov, "time") in combos and (op, prov, "throughput_6NHV") in combos
        assert (op, "ours_main_grad", "throughput_6NHV") in combos
        assert {(r["provider"], r["metric"]) for r in rows if r["op"] == op and r["mode"] == "fwd"} == \
            {("ours", "time"), ("ours", "throughput_2NHV"), ("eager", "time"), ("eager", "throughput_2NHV")}
    # (time, tflops) x ops x (ours fwd+bwd, ours fwd, ours_main_grad, eager fwd+bwd, eager fwd),
    # then wsft again
    assert len(rows) == 2 * 4 * 5 + 2 * 5
    for r in rows:
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]) and float(r["p50"]) > 0
        assert r["shape"].startswith("N=32,H=16,V=300") and r["date"] and r["commit"]


def test_bench_kernels_rejects_unknown_provider(capsys):
    assert cli_main(["bench-kernels", "--providers", "nope", "--no-csv"]) == 2
    assert "unknown provider" in capsys.readouterr().err
