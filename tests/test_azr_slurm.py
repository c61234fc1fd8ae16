"""One Absolute Zero round on the REAL single-node SLURM cluster (slurm-wlm + munge, as root).

The micro AZR recipe is submitted: validate and score run as sandbox job arrays, solve as an
inference array, score shard i after solve shard i (aftercorr), training as its own job. The
finished run directory must hold every proposal, validation, solve, score and rollout exactly
once, and a second submit must find nothing to do.
"""
import json
import os
import subprocess
import sys

import pytest

from test_azr_round import azr_micro_recipe, check_azr_round
from test_slurm import ROOT, _cli, _jobs, _logs, _missing, _wait_empty

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def azr_cluster(tmp_path_factory):
    """The single-node cluster of slurm/local-cluster.sh, on its own ports (test_slurm may run too)."""
    if _missing:
        pytest.skip(f"SLURM not installed ({', '.join(_missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster must be started as root")
    state = tmp_path_factory.mktemp("azr-slurm-state")
    env = dict(os.environ, MSZ_SLURMCTLD_PORT="16827", MSZ_SLURMD_PORT="16828")
    res = subprocess.run(["bash", str(ROOT / "slurm" / "local-cluster.sh"), "start", str(state)], env=env,
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        pytest.fail(f"local-cluster.sh start failed: {res.stderr}")
    yield {**env, "SLURM_CONF": res.stdout.strip().split("=", 1)[1]}
    subprocess.run(["bash", str(ROOT / "slurm" / "local-cluster.sh"), "stop", str(state)], env=env,
                   capture_output=True, text=True, timeout=120)


def test_azr_round_on_slurm(azr_cluster, tmp_path):
    env = azr_cluster
    recipe = azr_micro_recipe(tmp_path, slurm={"solver": {"partition": "solver", "time": "00:20:00",
                                                          "array_throttle": 2},
                                               "signal_seconds": 30, "python": sys.executable})
    run = tmp_path / "run"
    res = _cli(env, "submit", str(recipe), "--run-dir", str(run))
    assert res.returncode == 0, res.stderr
    jobs = _jobs(run)
    stages = [j["stage"] for j in jobs]
    assert stages[:3] == ["prepare", "sft", "eval_sft"] and {"validate", "solve", "score", "train"} <= set(stages)
    assert "aftercorr:" in res.stdout  # score shard i waits only for solve shard i
    _wait_empty(env, run, 900)
    try:
        check_azr_round(run)
    except AssertionError:
        print(_logs(run))
        raise
    res = _cli(env, "submit", str(recipe), "--run-dir", str(run))
    assert res.returncode == 0 and "nothing to submit" in res.stdout
    status = json.loads(_cli(env, "status", str(run), "--json").stdout)
    assert all(s["done"] for s in status["rounds"][0]["stages"])
