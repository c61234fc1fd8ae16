"""Absolute Zero end to end on a micro recipe with the local executor: `megatron-sz evolve`
is killed once a random stage has started, the same command resumes it, and the finished
run must hold every proposal, validation, solve, score and rollout exactly once; a rerun
does nothing and `status` shows every stage done. Plus: `plan` accepts the cluster recipe.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_round import MICRO_MODEL, evolve

ROOT = Path(__file__).resolve().parents[1]


def azr_micro_recipe(tmp_path: Path, *, rounds: int = 1, **top) -> Path:
    """azr-tiny shrunk for tests: a 2-layer, 32-wide model, a few proposals and steps."""
    r = yaml.safe_load((ROOT / "recipes" / "azr-tiny.yaml").read_text())
    r.update(name="azr-micro", rounds=rounds)
    r["tokenizer"]["vocab_size"] = 384
    r["azr"].update(proposals=3, references=1, solves=2, solver_batch=1, induction_inputs=2, warmup_programs=24,
                    heldout_per_type=2, timeout_s=2.0,
                    propose_sampling={"temperature": 1.0, "max_tokens": 24},
                    solve_sampling={"temperature": 1.0, "max_tokens": 12},
                    eval_sampling={"temperature": 0.0, "max_tokens": 12})
    r["solver"]["model"] = {"config": dict(MICRO_MODEL), "dtype": "fp32"}
    r["solver"]["sft"] = {"max_length": 128, "micro_batch_size": 16, "global_batch_size": 16, "max_steps": 3,
                          "optim": {"lr": 3e-3}}
    r["solver"]["pg"] = {"estimator": "trr++", "max_length": 128, "micro_batch_size": 4, "global_batch_size": 4,
                         "max_steps": 2, "optim": {"lr": 1e-4}}
    r["wandb"] = {"mode": "disabled"}
    r.update(top)
    path = tmp_path / "azr-micro.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _shards(d: Path) -> list[dict]:
    return [row for f in sorted(d.glob("shard-*.jsonl")) for row in _rows(f)]


def check_azr_round(run: Path, t: int = 0, *, proposals: int = 3, solves: int = 2) -> None:
    """Every record of round t exactly once, and the run's report files."""
    rdir = run / "rounds" / f"r{t:03d}"
    done = {p.name for p in (rdir / "_done").iterdir()}
    for stage in ("propose", "validate", "solve", "score", "rewards", "train", "buffer", "eval", "report"):
        assert any(n == f"{stage}.json" or n.startswith(f"{stage}.") for n in done), f"no marker for {stage}"
    props = _rows(rdir / "propose.jsonl")
    keys = [p["key"] for p in props]
    assert sorted(keys) == sorted(f"{tt}:{j}" for tt in ("deduction", "abduction", "induction")
                                  for j in range(proposals)), "proposals lost or duplicated"
    vals = _shards(rdir / "validate")
    assert sorted(v["key"] for v in vals) == sorted(keys), "validations lost or duplicated"
    valid = [v for v in vals if v["status"] == "valid"]
    bufs = {tt: _rows(rdir / f"buffer-{tt}.jsonl") for tt in ("deduction", "abduction", "induction")}
    n_tasks = len(valid) + sum(min(1, len(b)) for b in bufs.values())  # solver_batch = 1 per type
    sol = _shards(rdir / "solve")
    skeys = [(s["problem_id"], s["sample_index"]) for s in sol]
    assert len(skeys) == len(set(skeys)) == n_tasks * solves, "solver samples lost or duplicated"
    sc = _shards(rdir / "score")
    assert sorted((s["problem_id"], s["sample_index"]) for s in sc) == sorted(skeys)
    assert all(s["format"] in ("ok", "wrong", "malformed") and s["reward"] in (1.0, -0.5, -1.0) for s in sc)
    rolls = _rows(rdir / "rollouts.jsonl")
    marker = json.loads((rdir / "_done" / "rewards.json").read_text())
    assert len(rolls) == len(props) + len(sol) - marker["heldout_filtered"]
    assert {(r["task_type"], r["role"]) for r in rolls} <= {(tt, ro) for tt in ("deduction", "abduction", "induction")
                                                             for ro in ("propose", "solve")}
    nxt = run / "rounds" / f"r{t + 1:03d}"
    for tt, b in bufs.items():
        new = _rows(nxt / f"buffer-{tt}.jsonl")
        ids = [x["id"] for x in new]
        assert len(ids) == len(set(ids)) and ids[:len(b)] == [x["id"] for x in b]
        assert all(x["provenance"] == "proposed" and x["round"] == t for x in new[len(b):])
    m = _rows(run / "metrics.jsonl")
    assert [x["round"] for x in m] == list(range(t + 1))
    for key in ("validity", "validity_rate", "learnability_hist", "accuracy", "buffer_sizes", "reward_mean"):
        assert key in m[t], key
    assert set(m[t]["accuracy"]) == {"deduction", "abduction", "induction"}
    assert (run / "plot.png").stat().st_size > 1000
    assert (run / "buffers" / "deduction.jsonl").exists()


@pytest.mark.slow
def test_evolve_killed_and_resumed_loses_and_duplicates_nothing(tmp_path, rng_seed):
    recipe = azr_micro_recipe(tmp_path)
    run = tmp_path / "run"
    rng = random.Random(rng_seed)
    target = rng.choice(["propose", "validate", "solve", "score", "train", "eval"])
    env = dict(os.environ, WANDB_MODE="disabled")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_sz", "evolve", str(recipe), "--run-dir", str(run),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    deadline = time.time() + 400
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if f"] {target:<10}" in line and line.rstrip().endswith("..."):
            time.sleep(rng.uniform(0.1, 2.0))
            break
        assert time.time() < deadline, "".join(seen[-30:])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    print(f"killed during {target}")
    res = evolve(recipe, run)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_azr_round(run)
    res2 = evolve(recipe, run)
    assert res2.returncode == 0 and "already complete" in res2.stdout
    st = subprocess.run([sys.executable, "-m", "megatron_sz", "status", str(run), "--json"], capture_output=True,
                        text=True, timeout=120)
    info = json.loads(st.stdout)
    assert all(s["done"] for s in info["rounds"][0]["stages"])
    names = [s["name"] if "name" in s else s.get("stage") for s in info["rounds"][0]["stages"]]
    assert "validate" in json.dumps(names) and "score" in json.dumps(names)


def test_plan_accepts_the_cluster_recipe():
    res = subprocess.run([sys.executable, "-m", "megatron_sz", "plan",
                          str(ROOT / "recipes" / "absolute-zero-qwen2.5-7b-coder.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
