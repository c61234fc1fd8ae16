"""The local executor end to end on a micro recipe: one round, resumability, kill + resume.

The micro recipe is local-tiny shrunk (a 2-layer, 32-wide model, a dozen problems, a few
optimizer steps) so a whole round -- prepare, SFT warm-up, rollouts, verify, pairs, DPO,
refine, probe, WSFT, curriculum, eval, report -- runs in CI time. The full 3-round run
is the README's main job, not a test.
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

ROOT = Path(__file__).resolve().parents[1]

MICRO_MODEL = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
    "max_position_embeddings": 256, "vocab_size": 384, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False,
    "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0,
}


def micro_recipe(tmp_path: Path, *, seed: int = 1234, rounds: int = 1, **top) -> Path:
    """local-tiny shrunk for tests; returns the YAML path."""
    r = yaml.safe_load((ROOT / "recipes" / "local-tiny.yaml").read_text())
    r.update(name="micro", seed=seed, rounds=rounds, seeds_from_teacher=10)
    r["warmup"] = {"symbolic_problems": 48, "difficulty": [1, 1]}
    r["tokenizer"]["vocab_size"] = 384
    short = {"max_length": 96, "micro_batch_size": 8, "global_batch_size": 8, "max_steps": 2}
    for role in ("solver", "generator"):
        r[role]["model"] = {"config": dict(MICRO_MODEL), "dtype": "fp32"}
    r["solver"]["sft"] = {**short, "max_steps": 3, "optim": {"lr": 3e-3}}
    r["solver"]["dpo"] = {**short, "micro_batch_size": 4, "global_batch_size": 4, "beta": 0.1,
                          "optim": {"lr": 1e-3}}
    r["solver"]["rollout"] = {"k": 2, "shards": 2, "prompt_template": "Problem: {problem}\nSolution:",
                              "sampling": {"temperature": 1.0, "max_tokens": 12, "seed": 0},
                              "backend": {"kind": "local", "batch_size": 32}}
    r["generator"]["wsft"] = {**short, "optim": {"lr": 1e-3}}
    r["teacher"] = {"kind": "symbolic", "shards": 2}
    r["eval"] = {"enabled": True, "heldout_size": 6, "k": 1, "sampling": {"temperature": 0.0, "max_tokens": 12}}
    r["wandb"] = {"mode": "disabled"}
    r.update(top)
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def evolve(recipe: Path, run_dir: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "-m", "megatron_sz", "evolve", str(recipe), "--run-dir", str(run_dir),
                           "--no-progress", *extra], capture_output=True, text=True, timeout=timeout, env=env)


def curriculum_state(run_dir: Path, t: int) -> list[dict]:
    """The pool for round t, reduced to what must not depend on interruptions."""
    rows = [json.loads(line) for line in (run_dir / "rounds" / f"r{t:03d}" / "pool.jsonl").read_text().splitlines()]
    return [{k: r.get(k) for k in ("id", "problem", "answer", "provenance", "parent_id", "round")}
            | {"curriculum": r.get("curriculum")} for r in rows]


def check_round_outputs(run_dir: Path, t: int = 0) -> None:
    rdir = run_dir / "rounds" / f"r{t:03d}"
    done = {p.name for p in (rdir / "_done").iterdir()}
    for stage in ("rollout", "verify", "pairs", "dpo", "refine", "probe", "wsft", "curriculum", "eval", "report"):
        assert f"{stage}.json" in done, f"stage {stage} has no completion marker"
    active = [json.loads(x) for x in (rdir / "active.jsonl").read_text().splitlines()]
    rollouts = [json.loads(x) for f in sorted((rdir / "rollout").glob("shard-*.jsonl"))
                for x in f.read_text().splitlines()]
    keys = [(r["problem_id"], r["sample_index"]) for r in rollouts]
    assert len(keys) == len(set(keys)) == 2 * len(active), "rollout records lost or duplicated"
    verified = [json.loads(x) for f in sorted((rdir / "verify").glob("shard-*.jsonl")) for x in f.read_text().splitlines()]
    assert sorted((r["problem_id"], r["sample_index"]) for r in verified) == sorted(keys)
    assert all(r["correct"] in (True, False) for r in verified)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(t + 1))
    assert isinstance(metrics[t]["accuracy"], float)
    assert (run_dir / "plot.png").stat().st_size > 1000
    nxt = curriculum_state(run_dir, t + 1)
    assert len(nxt) >= len(active)


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory):
    """One uninterrupted micro round (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("ref")
    recipe = micro_recipe(tmp)
    run = tmp / "run"
    t0 = time.time()
    res = evolve(recipe, run)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    print(f"one micro round: {time.time() - t0:.1f} s")
    return recipe, run, res


@pytest.mark.slow
def test_one_round_then_noop_rerun(ref_run):
    recipe, run, res = ref_run
    assert "== round 0 of 0..0" in res.stdout and "done in" in res.stdout
    check_round_outputs(run)
    m = json.loads((run / "rounds" / "r000" / "metrics.json").read_text())
    assert m["accuracy_sft"] is not None and m["curriculum"]["pool_size"] >= 10
    assert m["dpo"]["loss"] is not None and m["generator"]["loss"] is not None
    # no role's training input holds a held-out problem (the filters' counts are in the markers)
    from megatron_sz.textsim import normalize_text

    held = [f" {normalize_text(json.loads(line)['problem'])} "
            for line in (run / "prepare" / "heldout.jsonl").read_text().splitlines() if line.strip()]
    for f in (run / "prepare" / "sft.jsonl", run / "rounds" / "r000" / "pairs.jsonl",
              run / "rounds" / "r000" / "wsft.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            for key in ("prompt", "target", "chosen"):
                if isinstance(rec.get(key), str):
                    text = f" {normalize_text(rec[key])} "
                    assert not any(h in text for h in held), (f.name, key, rec[key][:80])
    assert "heldout_filtered" in json.loads((run / "rounds" / "r000" / "_done" / "wsft.json").read_text())
    # a second run does nothing
    res2 = evolve(recipe, run)
    assert res2.returncode == 0 and "already complete" in res2.stdout
    # status shows every stage done
    st = subprocess.run([sys.executable, "-m", "megatron_sz", "status", str(run), "--json"], capture_output=True,
                        text=True, timeout=120)
    info = json.loads(st.stdout)
    assert all(s["done"] for s in info["rounds"][0]["stages"])


@pytest.mark.slow
def test_kill_and_resume_gives_same_curriculum(ref_run, tmp_path, rng_seed):
    """Kill the executor (and its trainer child) once a random stage has started; the
    resumed run must end with exactly the curriculum of the uninterrupted run."""
    recipe, ref, _ = ref_run
    ref_state = curriculum_state(ref, 1)
    rng = random.Random(rng_seed)
    run = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="disabled")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_sz", "evolve", str(recipe), "--run-dir", str(run),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    target = rng.choice(["rollout", "dpo", "verify", "probe", "wsft"])
    deadline = time.time() + 500
    for line in proc.stdout:
        if f"] {target:<10}" in line and line.rstrip().endswith("..."):
            time.sleep(rng.uniform(0.2, 3.0))
            break
        assert time.time() < deadline
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    print(f"killed during {target}")
    res = evolve(recipe, run)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_round_outputs(run)
    assert curriculum_state(run, 1) == ref_state, f"resumed curriculum differs after a kill during {target}"
