"""The tiny recipe's solver-dpo, run on its own from a pair file (no run directory, no tokenizer given):
it trains a tokenizer on the job's text and raises held-out preference accuracy above 0.8."""
import json
import random
import subprocess
import sys


def test_tiny_recipe_solver_dpo_learns_a_systematic_preference(tmp_path, rng_seed, repo_root):
    rng = random.Random(rng_seed)
    rows = []
    for i in range(160):
        a, b = rng.randint(0, 60), rng.randint(0, 60)
        rows.append({"prompt": f"Problem: Compute {a} + {b}.\nSolution:",
                     "chosen": f" {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}.",
                     "rejected": f" Not sure, maybe \\boxed{{{a + b + rng.randint(1, 9)}}}",
                     "problem_id": f"p{i}"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:128]))
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[128:]))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "megatron_sz", "train", "solver-dpo",
                           "--recipe", str(repo_root / "recipes" / "local-tiny.yaml"),
                           "--data", str(tmp_path / "pairs.jsonl"), "--eval-data", str(tmp_path / "held.jsonl"),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "tokenizer" / "tokenizer.model").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_end"]["eval_accuracy"] > 0.8, summary["eval_end"]
    assert summary["eval_end"]["eval_margin"] > summary["eval_start"]["eval_margin"]
    assert (out / "hf" / "config.json").is_file() and (out / "metrics.jsonl").is_file()
