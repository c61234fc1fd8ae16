"""Benchmark files in the public layouts, bad-file errors, and a tiny end-to-end eval on CPU."""
import json
from pathlib import Path

import pytest

from megatron_sz.cli import main
from megatron_sz.errors import DataError
from megatron_sz.evaluation.benchmarks import infer_benchmark_name, load_benchmark

FIX = Path(__file__).parent / "fixtures" / "benchmarks"


@pytest.mark.parametrize("name,expected", [
    ("amc23.jsonl", ["7", "15", "15"]),
    ("aime24.jsonl", ["12", "42", "18"]),
    ("aime25.jsonl", ["5", "10", "0"]),
    ("olympiadbench.json", ["2", "\\frac{1}{2}", "5"]),
    ("math500.jsonl", ["3", "8", "9"]),
    ("minerva.jsonl", ["4", "6", "6"]),
    ("gsm8k.jsonl", ["7", "13", "1250"]),
])
def test_public_layouts_load(name, expected):
    items = load_benchmark(FIX / name)
    assert [it.answer for it in items] == expected
    assert all(it.problem and it.benchmark == infer_benchmark_name(name) for it in items)
    assert len({it.id for it in items}) == len(items)


def test_parquet_layout_and_field_map(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIX / "gsm8k.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gsm8k-test.parquet")
    assert [it.answer for it in load_benchmark(tmp_path / "gsm8k-test.parquet")] == ["7", "13", "1250"]
    custom = tmp_path / "mine.jsonl"
    custom.write_text(json.dumps({"q_text": "Compute 1 + 1.", "gold": "2"}) + "\n")
    items = load_benchmark(custom, field_map={"problem": "q_text", "answer": "gold"})
    assert items[0].problem == "Compute 1 + 1." and items[0].answer == "2"


@pytest.mark.parametrize("content,suffix,needle", [
    ('{"problem": "Compute 1 + 1."}\n', ".jsonl", "no reference answer"),
    ("", ".jsonl", "empty"),
    ("problem,answer\n1+1,2\n", ".csv", "unsupported benchmark format"),
    ('{"problem": "x", "answer": "1"}\n{"problem": "y", "answer": "2"}\n', ".json", "invalid JSON"),
    ('{"problem": "x", "answer": "1"}\n{"problem": "y"', ".jsonl", "invalid JSON"),
])
def test_bad_benchmark_files_give_clear_errors(tmp_path, capsys, content, suffix, needle):
    path = tmp_path / f"bench{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=needle) as exc:
        load_benchmark(path)
    assert str(path) in str(exc.value)
    # the CLI reports it as one line naming the file, exit code 2, before loading any model
    code = main(["eval", "bench", "--model", "unused", "--benchmarks", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err and str(path) in err


def test_contamination_cli_finds_planted_overlap(tmp_path, capsys):
    planted = tmp_path / "pool.jsonl"
    planted.write_text("\n".join(json.dumps({"id": str(i), "problem": t, "answer": "1"}) for i, t in enumerate([
        "Sam has 12 apples and buys 1 more. How many apples does he have?",  # gsm8k fixture item 2
        "A brand new problem about prime gaps and the number seven."])) + "\n")
    out = tmp_path / "report.json"
    code = main(["eval", "contamination", "--problems", str(planted), "--benchmarks", str(FIX / "gsm8k.jsonl"),
                 str(FIX / "amc23.jsonl"), "--out", str(out), "--fail-on-overlap"])
    assert code == 1
    report = json.loads(out.read_text())
    hits = report["benchmarks"][str(FIX / "gsm8k.jsonl")]
    assert [h["problem_index"] for h in hits] == [0] and hits[0]["benchmark_index"] == 1
    assert report["benchmarks"][str(FIX / "amc23.jsonl")] == []


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from inference_support import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "hf")


def _independent_scores(samples_paths, k):
    per = {}
    for p in samples_paths:
        for line in Path(p).read_text().splitlines():
            r = json.loads(line)
            per.setdefault(r["problem_id"], []).append(bool(r["correct"]))
    assert all(len(v) == k for v in per.values())
    return per


def test_end_to_end_eval_local_backend_sharded_and_resumable(tiny_model, tmp_path, capsys):
    out = tmp_path / "eval"
    benches = [str(FIX / "amc23.jsonl"), str(FIX / "math500.jsonl")]
    common = ["eval", "bench", "--model", str(tiny_model), "--benchmarks", *benches, "--out", str(out),
              "--k", "3", "--pass-k", "1", "2", "--max-tokens", "12", "--temperature", "1.0", "--quiet",
              "--num-shards", "2"]
    assert main(common + ["--shard", "0"]) == 0
    assert main(common + ["--summarize"]) == 2  # shard 1 missing: refused, named
    assert "not finished" in capsys.readouterr().err
    assert main(common + ["--shard", "1"]) == 0
    assert main(common + ["--summarize"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["k"] == 3 and results["settings"]["sampling"]["temperature"] == 1.0
    samples = sorted((out / "samples").glob("shard-*.jsonl"))
    assert len(samples) == 2
    per = _independent_scores(samples, 3)
    assert len(per) == 6
    for b in results["benchmarks"]:
        ids = [i for i in per if i.startswith(b["benchmark"] + "-")]
        mean = sum(sum(per[i]) / 3 for i in ids) / len(ids)
        assert b["mean_at_k"] == pytest.approx(mean)
        assert b["problems"] == 3 and b["samples"] == 9
    assert "mean@3" in (out / "results.md").read_text()
    # re-running a finished shard does no work and changes nothing
    before = [p.read_bytes() for p in samples]
    assert main(common + ["--shard", "0"]) == 0
    assert [p.read_bytes() for p in samples] == before


def test_generator_validity_counts_are_consistent(tiny_model, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"id": f"s{i}", "problem": f"Compute {i} + {i}.", "answer": str(2 * i),
                                         "solution": f"\\boxed{{{2 * i}}}"}) + "\n" for i in range(4)))
    out = tmp_path / "gen"
    code = main(["eval", "generator", "--generator", str(tiny_model), "--teacher-model", str(tiny_model),
                 "--seeds", str(seeds), "--n", "5", "--out", str(out), "--max-tokens", "10",
                 "--solve-max-tokens", "10", "--quiet"])
    assert code == 0
    summary = json.loads((out / "generator_validity.json").read_text())
    statuses = [json.loads(line)["status"] for line in (out / "generated.jsonl").read_text().splitlines()]
    assert len(statuses) == 5 == summary["generated"]
    for key in ("valid", "empty", "truncated", "no_answer", "disagree", "backend_failed"):
        assert summary[key] == statuses.count(key)
    valid = (out / "valid.jsonl").read_text().splitlines()
    assert len(valid) == summary["valid"]
    assert summary["validity"] == pytest.approx(summary["valid"] / 5)


def test_eval_sbatch_script_runs_shards_then_summarize(tiny_model, tmp_path, repo_root):
    """slurm/eval-bench.sbatch as array tasks 0 and 1, then the summarize job (run with bash, as sbatch would)."""
    import os
    import subprocess

    script = repo_root / "slurm" / "eval-bench.sbatch"
    out = tmp_path / "ev"
    flags = ["--model", str(tiny_model), "--out", str(out), "--benchmarks", str(FIX / "aime25.jsonl"),
             "--k", "2", "--max-tokens", "8"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for task in ("0", "1"):
        r = subprocess.run(["bash", str(script), "2", *flags], env={**env, "SLURM_ARRAY_TASK_ID": task},
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(["bash", str(script), "summarize", *flags], env=env, capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["benchmarks"][0]["problems"] == 3 and results["benchmarks"][0]["samples"] == 6
