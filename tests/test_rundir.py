"""Run directory: markers, idempotent stages, refusal of a different recipe, plan structure, dry-run plans."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sz.errors import UserError
from megatron_sz.recipe import load_recipe
from megatron_sz.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


def test_markers_and_shards(tmp_path, rng_seed):
    rd = RunDir.create_or_open(tmp_path / "run", recipe_text="name: x\n", recipe_source=None, name="x", seed=rng_seed)
    n = 2 + rng_seed % 4
    assert rd.shards_done(0, "rollout", n) == [False] * n
    for i in range(n - 1):
        rd.mark_done(0, "rollout", (i, n), trajectories=i)
    assert rd.shards_done(0, "rollout", n) == [True] * (n - 1) + [False]
    assert rd.read_marker(0, "rollout", (0, n))["trajectories"] == 0
    assert not rd.is_done(0, "rollout")
    # reopening with the same text is fine, with another one is refused
    RunDir.create_or_open(tmp_path / "run", recipe_text="name: x\n", recipe_source=None, name="x", seed=1)
    with pytest.raises(UserError, match="different recipe"):
        RunDir.create_or_open(tmp_path / "run", recipe_text="name: y\n", recipe_source=None, name="y", seed=1)
    with pytest.raises(UserError, match="not a megatron-sz run directory"):
        RunDir.open(tmp_path / "nothing")


def test_round_plan_order_and_dependencies():
    from megatron_sz.round import plan_round

    r = load_recipe("recipes/local-tiny.yaml")
    p0, p1 = plan_round(r, 0), plan_round(r, 1)
    names0, names1 = p0.names, p1.names
    # the issue's order: rollouts, verify, pairs, DPO, refine, probe (s_q'), WSFT, curriculum, eval
    order = ["rollout", "verify", "pairs", "dpo", "refine", "probe", "wsft", "curriculum", "eval"]
    assert [n for n in names1 if n in order] == order
    assert names0[:3] == ["prepare", "sft", "eval_sft"] and names0[3:] == names1

    def up(plan, name):
        return [(t, s.name) for t, s in plan.upstream_of(name)]

    assert p1.is_correlated("rollout", "verify") and not p1.is_correlated("verify", "refine")
    assert up(p1, "rollout") == [(0, "curriculum"), (0, "dpo")]
    assert (0, "wsft") in up(p1, "wsft")
    # refinement waits only for the verdicts, so it can overlap DPO on another partition
    assert up(p1, "refine") == [(1, "verify")]
    # resource classes come from the plan, not from stage names in the executors
    assert {s.name: s.resource for s in p1}["dpo"] == "training"
    assert {s.name: s.resource for s in p1}["curriculum"] == "light"
    assert {s.name: s.resource for s in p1}["rollout"] == "inference"


def _cli(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "megatron_sz", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_submit_dry_run_writes_scripts_and_plan(tmp_path):
    res = _cli("submit", "recipes/local-tiny.yaml", "--run-dir", str(tmp_path / "run"), "--dry-run")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "dry run" in out and "r0.verify" in out and "aftercorr:<r0.rollout>" in out
    scripts = sorted((tmp_path / "run" / "slurm" / "scripts").glob("*.sbatch"))
    assert len(scripts) == 3 * 10 + 3  # 10 stages per round + prepare, sft, eval_sft
    text = (tmp_path / "run" / "slurm" / "scripts" / "r000-rollout.sbatch").read_text()
    assert "#SBATCH --array=0-1%2" in text and "#SBATCH --partition=solver" in text
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@60" in text
    assert "trap 'forward USR1' USR1" in text and "srun " in text
    teacher = (tmp_path / "run" / "slurm" / "scripts" / "r001-verify.sbatch").read_text()
    assert "#SBATCH --partition=teacher" in teacher
    assert "--partition=generator" in (tmp_path / "run" / "slurm" / "scripts" / "r002-wsft.sbatch").read_text()
    # nothing recorded as submitted
    assert not (tmp_path / "run" / "slurm" / "jobs.jsonl").exists()
    bash = subprocess.run(["bash", "-n", str(tmp_path / "run" / "slurm" / "scripts" / "r000-dpo.sbatch")])
    assert bash.returncode == 0


@pytest.mark.parametrize("edit, needle", [
    ("s/replay_ratio: 0.25/replay_ratio: 1.5/", "replay_ratio"),
    ("s/  replay_ratio:/  replay_ration:/", "did you mean 'replay_ratio'"),
    ("s/parallel: {tp: 1, pp: 1, nodes: 1, gpus_per_node: 1}/parallel: {tp: 3, pp: 1, nodes: 1, gpus_per_node: 3}/",
     "num_attention_heads"),
    ("s|config: models/tiny-cpu.json|hf_path: /nonexistent/model|", "not found"),
    ("s/seeds_from_teacher: 64/seeds_file: bad-seeds.jsonl/", "seed file"),
])
def test_invalid_input_fails_before_submission(tmp_path, edit, needle):
    src = (ROOT / "recipes" / "local-tiny.yaml").read_text()
    recipe = tmp_path / "r.yaml"
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-cpu.json").write_text((ROOT / "recipes" / "models" / "tiny-cpu.json").read_text())
    (tmp_path / "bad-seeds.jsonl").write_text('{"id": "a", "problem": "", "answer": "1"}\n')
    recipe.write_text(src)
    subprocess.run(["sed", "-i", edit, str(recipe)], check=True)
    assert recipe.read_text() != src
    # a real submit (no --dry-run): validation must stop it before any sbatch call
    env = dict(os.environ, PATH="/usr/bin:/bin", SLURM_CONF="/nonexistent/slurm.conf")
    env["PATH"] = os.path.dirname(sys.executable) + ":" + env["PATH"]
    res = _cli("submit", str(recipe), "--run-dir", str(tmp_path / "run"), env=env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert needle in res.stderr and res.stderr.startswith("error:")
    assert not (tmp_path / "run").exists()


def test_status_shows_a_running_stage(tmp_path):
    """A stage whose process is alive shows as running; a killed one's stale record does not."""
    import json as _json

    from megatron_sz.cli.status import collect

    text = (ROOT / "recipes" / "local-tiny.yaml").read_text()
    rd = RunDir.create_or_open(tmp_path / "run", recipe_text=text, recipe_source=str(ROOT / "recipes" / "local-tiny.yaml"),
                               name="x", seed=1)
    recipe = rd.load_recipe()

    def state(name):
        info = collect(rd, recipe, 1)
        return next(s for s in info["rounds"][0]["stages"] if s["stage"] == name)

    assert state("prepare")["running"] is False
    rd.mark_running(0, "prepare")
    assert state("prepare")["running"] is True
    rd.clear_running(0, "prepare")
    assert state("prepare")["running"] is False
    # a record left by a killed process (pid gone) is not "running"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    p = rd.mark_running(0, "rollout", (1, 2))
    rec = _json.loads(p.read_text())
    rec["pid"] = int(dead.stdout)
    p.write_text(_json.dumps(rec))
    assert state("rollout")["running"] is False
    out = _cli("status", str(rd.root))
    assert out.returncode == 0 and "todo" in out.stdout
