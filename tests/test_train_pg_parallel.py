"""policy-gradient at TP=2 and PP=2 (two gloo processes) reproduces the single-process run:
losses, grad norms, PPO metrics and the start-of-stage old log-prob table (PP=2 also pads
micro-batches to the step's longest item, past the table's width)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from megatron_sz.data import ScoredRollout, write_jsonl  # noqa: E402
from megatron_sz.train import testing as T  # noqa: E402

STEPS = 4


def _worker(rank: int, world: int, recipe: str, data: str, init: str, out: str) -> dict:
    import torch as _torch

    from megatron_sz.train.jobs import run_job

    _torch.set_num_threads(1)
    res = run_job("policy-gradient", recipe, data, init, out)
    return {"exit_code": res.exit_code, "step": res.step}


def _train_lines(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pg-par")
    tok = T.make_tokenizer(root / "tok")
    cfg = T.tiny_config(tok.vocab_size)
    rng = random.Random(5)
    recs = []
    for g in range(8):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        for j in range(4):
            c = rng.randint(0, 18)
            recs.append(ScoredRollout(prompt=f"Compute {a} + {b}.\n", completion=f"{a} + {b} = {c}." * (1 + j % 2),
                                      reward=float(c % 2 == 0), group_id=f"g{g}"))
    data = root / "rollouts.jsonl"
    write_jsonl(data, recs)
    init = str(T.save_hf_model(root / "init-hf", cfg, seed=3))
    pg = {"max_steps": STEPS, "micro_batch_size": 2, "global_batch_size": 4, "export_hf": False,
          "entropy_coef": 0.01, "kl_coef": 0.05, "aggregation": "seq-mean-token-mean",
          "optim": {"lr": 3e-3, "warmup_steps": 0, "decay": "constant"}}
    recipes = {}
    for name, par in (("tp1", {"tp": 1, "pp": 1}), ("tp2", {"tp": 2, "pp": 1, "gpus_per_node": 2}),
                      ("pp2", {"tp": 1, "pp": 2, "gpus_per_node": 2})):
        recipes[name] = str(T.write_recipe(root / f"{name}.yaml", config=cfg, tokenizer=str(root / "tok"),
                                           sections={"solver": {"parallel": par, "pg": pg}}))
    from megatron_sz.train.jobs import run_job

    with T.isolated_world():
        base = run_job("policy-gradient", recipes["tp1"], data, init, root / "tp1")
    assert base.exit_code == 0
    yield {"root": root, "data": str(data), "recipes": recipes, "init": init}
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_pg_parallel_layout_matches_single_process(setup, layout, monkeypatch):
    from megatron_sz import dist

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = setup["root"] / layout
    res = dist.spawn(_worker, 2, setup["recipes"][layout], setup["data"], setup["init"], str(out), backend="gloo")
    assert [r["exit_code"] for r in res] == [0, 0] and res[0]["step"] == STEPS
    bt, pt = _train_lines(setup["root"] / "tp1"), _train_lines(out)
    assert len(bt) == len(pt) == STEPS
    for a, b in zip(bt, pt):
        for k in ("loss", "entropy", "ratio", "approx_kl", "kl_ref"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (layout, a["step"], k)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), (layout, a["step"])
    ra = torch.load(setup["root"] / "tp1" / "ref_logps.pt", weights_only=False)["logps"]
    rb = torch.load(out / "ref_logps.pt", weights_only=False)["logps"]
    assert ra.shape == rb.shape and torch.allclose(ra, rb, rtol=1e-5, atol=1e-4)
