"""`megatron-sz submit` against a REAL single-node SLURM cluster (slurm-wlm + munge, as root).

The session fixture starts the cluster with slurm/local-cluster.sh (partitions solver,
teacher, generator; state under a temp folder) and stops it afterwards. One round of
the micro recipe runs through job arrays and dependencies; a running stage is
scancel'ed mid-round, the run is re-submitted, and the finished run directory must hold
every record exactly once. A final re-submit must find nothing to do.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_round import check_round_outputs, micro_recipe

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slurm

_missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(b) is None]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    if _missing:
        pytest.skip(f"SLURM not installed ({', '.join(_missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster must be started as root")
    state = tmp_path_factory.mktemp("slurm-state")
    env = dict(os.environ, MSZ_SLURMCTLD_PORT="16817", MSZ_SLURMD_PORT="16818")
    res = subprocess.run(["bash", str(ROOT / "slurm" / "local-cluster.sh"), "start", str(state)], env=env,
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        pytest.fail(f"local-cluster.sh start failed: {res.stderr}")
    conf = res.stdout.strip().split("=", 1)[1]
    yield {**env, "SLURM_CONF": conf}
    subprocess.run(["bash", str(ROOT / "slurm" / "local-cluster.sh"), "stop", str(state)], env=env,
                   capture_output=True, text=True, timeout=120)


def _cli(env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "megatron_sz", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _jobs(run: Path) -> list[dict]:
    p = run / "slurm" / "jobs.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def _queue(env, run: Path) -> list[tuple[str, str]]:
    ids = {j["job_id"] for j in _jobs(run)}
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%F"], capture_output=True, text=True, env=env).stdout
    rows = []
    for line in out.splitlines():
        tid, state, arr = line.split("|")
        if tid.split("_")[0] in ids or arr in ids:
            rows.append((tid, state))
    return rows


def _wait_empty(env, run: Path, timeout: float) -> None:
    t0 = time.time()
    while _queue(env, run):
        assert time.time() - t0 < timeout, f"jobs still queued after {timeout} s: {_queue(env, run)}"
        time.sleep(2)


def _logs(run: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted((run / "slurm" / "logs").glob("*.out")))


def test_submit_round_scancel_resubmit(slurm_cluster, tmp_path):
    env = slurm_cluster
    recipe = micro_recipe(tmp_path, slurm={
        "solver": {"partition": "solver", "time": "00:20:00", "array_throttle": 2},
        "teacher": {"partition": "teacher", "time": "00:20:00", "array_throttle": 2},
        "generator": {"partition": "generator", "time": "00:20:00"},
        "signal_seconds": 30, "python": sys.executable})
    run = tmp_path / "run"
    res = _cli(env, "submit", str(recipe), "--run-dir", str(run))
    assert res.returncode == 0, res.stderr
    assert "aftercorr:" in res.stdout
    first = _jobs(run)
    assert [j["stage"] for j in first][:3] == ["prepare", "sft", "eval_sft"]
    assert {j["partition"] for j in first} == {"solver", "teacher", "generator"}
    # Cancel a stage while it runs: the DPO job (or, if it is missed, the verify array).
    victim = None
    t0 = time.time()
    while victim is None and time.time() - t0 < 400:
        for tid, state in _queue(env, run):
            stage = next(j["stage"] for j in first if j["job_id"] == tid.split("_")[0])
            if state == "RUNNING" and stage in ("rollout", "dpo", "verify", "refine"):
                victim = (tid, stage)
                break
        time.sleep(0.5)
    assert victim, "no stage seen running\n" + _logs(run)
    print(f"scancel {victim[0]} ({victim[1]}) while running")
    subprocess.run(["scancel", victim[0].split("_")[0]], env=env, check=True)
    # dependents of the cancelled job are removed (--kill-on-invalid-dep=yes)
    _wait_empty(env, run, 120)
    st = _cli(env, "status", str(run))
    assert st.returncode == 0 and "todo" in st.stdout
    res = _cli(env, "submit", str(recipe), "--run-dir", str(run))
    assert res.returncode == 0, res.stderr
    second = _jobs(run)[len(first):]
    assert second and "prepare" not in {j["stage"] for j in second}, "re-submit redid finished stages"
    _wait_empty(env, run, 600)
    try:
        check_round_outputs(run)
    except AssertionError:
        print(_logs(run))
        raise
    # nothing left: a third submit submits nothing
    res = _cli(env, "submit", str(recipe), "--run-dir", str(run))
    assert res.returncode == 0 and "nothing to submit" in res.stdout
    status = json.loads(_cli(env, "status", str(run), "--json").stdout)
    assert all(s["done"] for s in status["rounds"][0]["stages"])


# --------------------------------------------------------------------------- environments (issue 20)

_PARTS = {"solver": {"partition": "solver", "time": "00:20:00", "array_throttle": 2},
          "teacher": {"partition": "teacher", "time": "00:20:00", "array_throttle": 2},
          "generator": {"partition": "generator", "time": "00:20:00"}}


def _fake_python_path(tmp_path: Path) -> str:
    """A PATH whose first python3 is not the one that has megatron-sz (the venv not activated)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    for name in ("python3", "python"):
        p = shim / name
        p.write_text("#!/bin/sh\necho 'fake python: not the submitting interpreter' >&2\nexit 3\n")
        p.chmod(0o755)
    return f"{shim}:/usr/bin:/bin"


def test_submit_refuses_an_interpreter_that_cannot_import_the_package(tmp_path):
    env = dict(os.environ, PATH=_fake_python_path(tmp_path))
    recipe = micro_recipe(tmp_path, slurm={**_PARTS, "python": "python3"})
    run = tmp_path / "run"
    res = _cli(env, "submit", str(recipe), "--run-dir", str(run))
    err = res.stderr.strip()
    assert res.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "partition 'solver'" in err and "slurm.python" in err and "fake python" in err, err
    assert not run.exists(), "a refused submit must not create (and freeze) the run directory"
    # The same recipe passes when the role names an interpreter that has the package.
    ok = micro_recipe(tmp_path, slurm={**_PARTS, "python": "python3",
                                       "solver": {**_PARTS["solver"], "python": sys.executable}})
    res = _cli(env, "submit", str(ok), "--run-dir", str(run), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "partition 'teacher'" in res.stderr  # still wrong for the teacher: a dry run warns
    script = (run / "slurm" / "scripts" / "r000-prepare.sbatch").read_text()
    assert f"{sys.executable} -m megatron_sz stage" in script


def _status(env, run: Path) -> dict:
    res = _cli(env, "status", str(run), "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_jobs_use_the_submitting_interpreter_and_status_shows_failed_logs(slurm_cluster, tmp_path):
    env = {**slurm_cluster, "PATH": _fake_python_path(tmp_path)}
    # 1. No interpreter in the recipe: the jobs run the one that ran submit, whatever is on PATH.
    (tmp_path / "a").mkdir()
    run = tmp_path / "a" / "run"
    res = _cli(env, "submit", str(micro_recipe(tmp_path / "a", slurm=dict(_PARTS))), "--run-dir", str(run))
    assert res.returncode == 0, res.stderr
    t0 = time.time()
    while not _status(env, run)["rounds"][0]["stages"][0]["done"]:
        assert time.time() - t0 < 300 and _queue(env, run), "prepare never finished\n" + _logs(run)
        time.sleep(2)
    subprocess.run(["scancel", *{j["job_id"] for j in _jobs(run)}], env=env, check=False)
    _wait_empty(env, run, 120)
    # 2. The recipe forces the wrong python3 and turns the check off: the first job fails, and
    # status shows where its log is and what it said.
    (tmp_path / "b").mkdir()
    run = tmp_path / "b" / "run"
    recipe = micro_recipe(tmp_path / "b", slurm={**_PARTS, "python": "python3", "preflight": "none"})
    res = _cli(env, "submit", str(recipe), "--run-dir", str(run))
    assert res.returncode == 0, res.stderr
    _wait_empty(env, run, 120)
    prepare = _status(env, run)["rounds"][0]["stages"][0]
    assert not prepare["done"] and prepare["log"]["path"].startswith(str(run / "slurm" / "logs"))
    assert any("fake python" in line for line in prepare["log"]["tail"]), prepare
    text = _cli(env, "status", str(run)).stdout
    assert f"log {prepare['log']['path']}" in text and "fake python: not the submitting interpreter" in text
