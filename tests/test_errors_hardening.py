"""What a user can get wrong gives one ``error:`` line and a non-zero exit, never a traceback
(issue 20). Every case runs the real command line in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "local-tiny.yaml"
QWEN_TP2 = ROOT / "recipes" / "qwen3-8b-solver-tp2-8gpu.yaml"

HF_CONFIG = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 64, "hidden_size": 32,
             "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
             "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32"}


def cli(*args: str, cwd: Path = ROOT, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_sz", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, input=stdin, timeout=300, env=dict(os.environ, WANDB_MODE="disabled"))


def one_line_error(res: subprocess.CompletedProcess) -> str:
    """The single error line of a failed command (asserting that is all it printed on stderr)."""
    err = res.stderr.strip()
    assert res.returncode != 0, (res.stdout, err)
    assert "Traceback" not in err and "Traceback" not in res.stdout, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_hf_config_with_a_string_size(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({**HF_CONFIG, "hidden_size": "big"}))
    line = one_line_error(cli("convert", "hf-to-mcore", hf, tmp_path / "out", "--no-progress"))
    assert "hidden_size" in line and "config.json" in line


def test_garbage_safetensors(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(HF_CONFIG))
    (hf / "model.safetensors").write_bytes(os.urandom(4096))
    for args in (("convert", "hf-to-mcore", hf, tmp_path / "out", "--no-progress"), ("convert", "check", hf)):
        line = one_line_error(cli(*args))
        assert "model.safetensors" in line and "safetensors file" in line, line


def _bench(tmp_path: Path, second_line: bytes) -> Path:
    p = tmp_path / "bench.jsonl"
    p.write_bytes(json.dumps({"id": "a", "problem": "What is 2+2?", "answer": "4"}).encode() + b"\n"
                  + second_line + b"\n")
    return p


def test_eval_bench_non_utf8_line_names_file_line_and_column(tmp_path):
    bench = _bench(tmp_path, b'{"id": "b", "problem": "What is 3+3?", "answer": "\xff6"}')
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(HF_CONFIG))
    line = one_line_error(cli("eval", "bench", "--model", hf, "--benchmarks", bench, "--k", "1",
                              "--out", tmp_path / "ev"))
    assert f"{bench}:2:" in line and "not UTF-8" in line and "column 51" in line, line


def test_json_error_reports_the_column_of_the_fault(tmp_path):
    bench = _bench(tmp_path, b'{"id": "b", "problem": "What is 3+3?" "answer": "6"}')
    line = one_line_error(cli("eval", "bench", "--model", tmp_path, "--benchmarks", bench, "--k", "1",
                              "--out", tmp_path / "ev"))
    assert f"{bench}:2:" in line and "column 39" in line, line


def test_non_utf8_seed_file_names_the_line(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    rows = [json.dumps({"id": f"s{i}", "problem": f"What is {i}+1?", "answer": str(i + 1)}).encode() for i in range(3)]
    rows[2] = rows[2].replace(b"What", b"Wh\xe9t")  # latin-1, not UTF-8
    seeds.write_bytes(b"\n".join(rows) + b"\n")
    line = one_line_error(cli("seeds", "validate", seeds))
    assert f"{seeds}:3:" in line and "byte 0xe9 at column" in line and "at byte" not in line, line


def test_plan_batch_error_names_the_dpo_field_in_pairs():
    line = one_line_error(cli("plan", QWEN_TP2, "--dp", "3", "--job", "solver-dpo"))
    assert "solver.dpo.global_batch_size" in line and "solver.parallel" not in line, line
    assert "64 pairs" in line and "1*3 = 3" in line, line  # the recipe's numbers, not DPO-doubled ones


def test_plan_that_does_not_fit_the_gpu_exits_non_zero():
    res = cli("plan", QWEN_TP2, "--gpu-mem", "10")
    assert res.returncode == 1 and "DOES NOT FIT" in res.stdout and "Traceback" not in res.stderr
    assert cli("plan", QWEN_TP2, "--gpu-mem", "1000").returncode == 0


def test_verify_huge_product_is_not_called_an_exponent():
    res = cli("verify", "--answer", r"\prod_{k=1}^{100000} k", "--reference", "5")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "exponent" not in res.stdout and "product of 100000 terms" in res.stdout, res.stdout
    # a small product is evaluated, not mistaken for an assignment "k = ..."
    assert cli("verify", "--answer", r"\prod_{k=1}^{5} k", "--reference", "120").returncode == 0


def test_empty_recipe_is_reported_as_empty(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    for cmd in ("evolve", "plan"):
        line = one_line_error(cli(cmd, empty))
        assert "empty" in line and "tokenizer" not in line, line
    assert not (tmp_path / "runs").exists()


def test_recipe_errors_name_the_yaml_line(tmp_path):
    text = TINY.read_text()
    lines = text.splitlines()
    dpo = next(i for i, x in enumerate(lines) if x.strip() == "dpo:")
    lines.insert(dpo + 1, "    betta: 0.1")
    bad = tmp_path / "bad.yaml"
    bad.write_text("\n".join(lines) + "\n")
    line = one_line_error(cli("plan", bad))
    assert f"{bad}:{dpo + 2}:" in line and "solver.dpo.betta" in line and "'beta'" in line, line
    rounds = next(i for i, x in enumerate(text.splitlines()) if x.startswith("rounds:"))
    bad.write_text(text.replace("rounds: 3", "rounds: three", 1))
    line = one_line_error(cli("plan", bad))
    assert f"{bad}:{rounds + 1}:" in line and "rounds" in line, line


def test_rounds_zero_is_refused_before_the_run_dir_exists(tmp_path):
    run = tmp_path / "run"
    line = one_line_error(cli("evolve", TINY, "--run-dir", run, "--rounds", "0"))
    assert "rounds" in line
    assert not run.exists()


@pytest.mark.parametrize("args", [("verify", "--answer", "1/2", "--reference", "0.5", "--json"), ("status", "RUN")])
def test_closed_pipe_is_not_a_traceback(tmp_path, args):
    from megatron_sz.rundir import RunDir

    run = tmp_path / "run"
    RunDir.create_or_open(run, recipe_text=TINY.read_text(), recipe_source=str(TINY), name="t", seed=0)
    args = [str(run) if a == "RUN" else a for a in args]
    # The reader is gone before the command writes anything: `... | head -0`.
    p = subprocess.Popen([sys.executable, "-m", "megatron_sz", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=ROOT)
    p.stdout.close()
    err = p.stderr.read().decode()
    code = p.wait(timeout=120)
    assert "BrokenPipeError" not in err and "Traceback" not in err, err
    assert code == 141
