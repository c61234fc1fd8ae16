"""Agent0 end to end on the micro scale: `evolve` completes, a rerun does nothing, a kill at a
random stage resumes with nothing lost or duplicated; `plan` accepts the cluster recipe; the
SLURM round on the single-node cluster."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MICRO_MODEL = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 32,
               "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
               "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 384, "max_position_embeddings": 512,
               "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
               "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}


def micro_agent0(tmp_path: Path, **top) -> Path:
    r = yaml.safe_load((ROOT / "recipes" / "agent0-tiny.yaml").read_text())
    r.update(name="micro-agent0", rounds=1)
    r["tokenizer"]["vocab_size"] = 384
    r["agent0"].update(prompts=2, group_size=2, samples=3, warmup_traces=24, warmup_proposals=8,
                       curriculum_sampling={"temperature": 1.0, "max_tokens": 12, "seed": 0},
                       tool_timeout_s=2.0, keep_low=0.0, keep_high=1.0)
    short = {"max_length": 96, "micro_batch_size": 4, "global_batch_size": 4, "max_steps": 1,
             "optim": {"lr": 1e-3}}
    r["agent0"]["curriculum_pg"] = {**short, "estimator": "grpo"}
    for role in ("solver", "generator"):
        r[role]["model"] = {"config": dict(MICRO_MODEL), "dtype": "fp32"}
    # enough warm-up for the micro model to write some valid proposals, so solve has work to resume
    r["solver"]["sft"] = {**short, "max_steps": 24, "micro_batch_size": 8, "global_batch_size": 8,
                          "optim": {"lr": 3e-3}}
    r["solver"]["pg"] = {**short, "estimator": "adpo"}
    r["solver"]["rollout"]["sampling"] = {"temperature": 1.0, "max_tokens": 16, "seed": 0}
    r["eval"] = {"enabled": True, "heldout_size": 4, "k": 1, "sampling": {"temperature": 0.0, "max_tokens": 16}}
    r["wandb"] = {"mode": "disabled"}
    r.update(top)
    path = tmp_path / "micro-agent0.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def evolve(recipe: Path, run: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_sz", "evolve", str(recipe), "--run-dir", str(run),
                           "--no-progress"], capture_output=True, text=True, timeout=timeout, env=env)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def check_round(run: Path) -> dict:
    rdir = run / "rounds" / "r000"
    done = {p.stem.split(".")[0] for p in (rdir / "_done").iterdir()}
    for stage in ("prepare", "warmup", "eval_warmup", "propose", "solve", "score", "train_curriculum",
                  "train_executor", "eval", "report"):
        assert stage in done, f"stage {stage} has no completion marker"
    props = lines(rdir / "proposals.jsonl")
    assert sorted(p["key"] for p in props) == sorted(f"r0-g{i}#{j}" for i in range(2) for j in range(2))
    valid = {p["key"] for p in props if p["question"]}
    trajs = [t for f in sorted((rdir / "solve").glob("shard-*.jsonl")) for t in lines(f)]
    keys = [(t["problem_id"], t["sample_index"]) for t in trajs]
    assert len(keys) == len(set(keys)) == 3 * len(valid), "trajectories lost or duplicated"
    assert {k for k, _ in keys} == valid
    sig = lines(rdir / "signals.jsonl")
    assert sorted(s["key"] for s in sig) == sorted(p["key"] for p in props)
    cur = lines(rdir / "curriculum_rollouts.jsonl")
    assert len(cur) == len(props) - sum(bool(s.get("heldout")) for s in sig)
    for s in sig:
        if not s["valid"]:
            assert s["reward"] == -1.0
        else:
            assert s["reward"] == pytest.approx(s["r_unc"] + s["r_tool"] - s["repetition"])
    for e in lines(rdir / "executor_rollouts.jsonl"):
        assert len(e["loss_mask"]) == len(e["completion_ids"]) and 0 <= e["consistency"] <= 1
    metrics = lines(run / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [0]
    m = metrics[0]
    for key in ("curriculum", "p", "executor", "clusters", "accuracy", "accuracy_warmup"):
        assert key in m
    assert isinstance(m["accuracy"], float)
    assert (m["executor"]["tool_calls_per_rollout"] is None) == (not trajs)
    assert (run / "plot.png").stat().st_size > 1000
    return {"props": sorted((p["key"], p["completion"]) for p in props),
            "trajs": sorted((t["problem_id"], t["sample_index"], json.dumps(t["segments"])) for t in trajs)}


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agent0")
    recipe = micro_agent0(tmp)
    run = tmp / "run"
    res = evolve(recipe, run)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return recipe, run, res


@pytest.mark.slow
def test_round_completes_and_rerun_is_a_noop(ref_run):
    recipe, run, res = ref_run
    check_round(run)
    res2 = evolve(recipe, run)
    assert res2.returncode == 0 and "already complete" in res2.stdout
    st = subprocess.run([sys.executable, "-m", "megatron_sz", "status", str(run), "--json"], capture_output=True,
                        text=True, timeout=120)
    info = json.loads(st.stdout)
    assert all(s["done"] for s in info["rounds"][0]["stages"])


@pytest.mark.slow
def test_kill_and_resume_loses_and_duplicates_nothing(ref_run, tmp_path, rng_seed):
    recipe, ref, _ = ref_run
    want = check_round(ref)
    rng = random.Random(rng_seed)
    target = rng.choice(["solve", "propose", "train_executor", "score", "eval"])
    run = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_sz", "evolve", str(recipe), "--run-dir", str(run),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    deadline = time.time() + 500
    for line in proc.stdout:
        if f"] {target:<10}" in line and line.rstrip().endswith("..."):
            time.sleep(rng.uniform(0.1, 2.0))
            break
        assert time.time() < deadline
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    print(f"killed during {target}")
    res = evolve(recipe, run)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = check_round(run)
    assert got == want, f"resumed run differs from the uninterrupted one after a kill during {target}"


def test_plan_accepts_the_cluster_recipe():
    res = subprocess.run([sys.executable, "-m", "megatron_sz", "plan", "recipes/agent0-qwen3-8b.yaml"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    from megatron_sz.recipe import load_recipe
    from megatron_sz.round import plan_round

    r = load_recipe(ROOT / "recipes" / "agent0-qwen3-8b.yaml")
    assert r.system == "agent0" and r.solver.pg.estimator == "adpo" and r.agent0.curriculum_pg.estimator == "grpo"
    plan = plan_round(r, 1)
    assert plan.names == ["propose", "solve", "score", "train_curriculum", "train_executor", "eval", "report"]
    assert plan.stage("train_curriculum").role == "generator" and plan.stage("solve").shards == r.solver.rollout.shards


_missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(b) is None]


@pytest.mark.slurm
def test_slurm_round(tmp_path):
    if _missing or os.geteuid() != 0:
        pytest.skip("needs slurm-wlm + munge, as root")
    sys.path.insert(0, str(Path(__file__).parent))
    import test_slurm as T

    state = tmp_path / "slurm-state"
    state.mkdir()
    env = dict(os.environ, MSZ_SLURMCTLD_PORT="16827", MSZ_SLURMD_PORT="16828")
    res = subprocess.run(["bash", str(ROOT / "slurm" / "local-cluster.sh"), "start", str(state)], env=env,
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        pytest.skip(f"local-cluster.sh start failed (another cluster running?): {res.stderr[-300:]}")
    env["SLURM_CONF"] = res.stdout.strip().split("=", 1)[1]
    try:
        recipe = micro_agent0(tmp_path, slurm={**T._PARTS, "signal_seconds": 30, "python": sys.executable})
        run = tmp_path / "run"
        res = T._cli(env, "submit", str(recipe), "--run-dir", str(run))
        assert res.returncode == 0, res.stderr
        jobs = T._jobs(run)
        parts = {j["stage"]: j["partition"] for j in jobs}
        assert parts["propose"] == "generator" and parts["solve"] == "solver" and parts["train_curriculum"] == "generator"
        T._wait_empty(env, run, 900)
        try:
            check_round(run)
        except AssertionError:
            print(T._logs(run))
            raise
        res = T._cli(env, "submit", str(recipe), "--run-dir", str(run))
        assert res.returncode == 0 and "nothing to submit" in res.stdout
    finally:
        subprocess.run(["bash", str(ROOT / "slurm" / "local-cluster.sh"), "stop", str(state)], env=env,
                       capture_output=True, text=True, timeout=120)
