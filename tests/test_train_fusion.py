"""Gradient-accumulation fusion in the training jobs (issue 18): with
``train.gradient_accumulation_fusion`` (default on) the fused LM-head loss adds dW straight
into Megatron DDP's fp32 ``main_grad`` in forward, at the upstream scale the schedule will
apply. The optimizer must see exactly the same step as without fusion, for several
micro-batches per step (scale 1/num_microbatches) and for packed rows (per-row factors),
and a wrong scale must stop the job before the optimizer step."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from megatron_sz.train import testing as T  # noqa: E402
from megatron_sz.train.jobs import run_job  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with T.tiny_job_env(tmp_path_factory.mktemp("fusion")) as e:
        yield e


def _recipe(env, name, section, train):
    return str(T.write_recipe(env["root"] / f"{name}.yaml", config=env["cfg"], tokenizer=env["tok"],
                              sections={"solver": {section: train}}))


def _curve(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [v for r in rows if r["type"] == "train" for v in (r["loss"], r["grad_norm"])]


@pytest.fixture
def sink_modes(monkeypatch):
    """Record where each fused op put dW (proves the fused path ran, or did not)."""
    from megatron_sz.kernels import logprobs

    modes = []
    real = logprobs.GradSink.__init__

    def spy(self, hidden, weight, cfg, **kw):
        if kw.get("want_dw"):
            modes.append(cfg.dw_mode)
        real(self, hidden, weight, cfg, **kw)

    monkeypatch.setattr(logprobs.GradSink, "__init__", spy)
    return modes


@pytest.mark.parametrize("kind,batching", [("solver-dpo", "length_sorted"), ("solver-sft", "packed")])
def test_fused_and_unfused_steps_are_identical(env, tmp_path, sink_modes, kind, batching):
    if kind == "solver-dpo":
        data = T.write_records(tmp_path / "pairs.jsonl", T.arithmetic_pairs(16, seed=3))
        section, extra = "dpo", {"max_length": 160}
    else:
        data = T.write_records(tmp_path / "sft.jsonl", T.arithmetic_problems(16, seed=4))
        section, extra = "sft", {"max_length": 160, "normalization": "token"}
    base = dict(extra, micro_batch_size=2, global_batch_size=8, max_steps=2, batching=batching)
    curves = {}
    for fused in (True, False):
        r = _recipe(env, f"{kind}-{batching}-{fused}", section, dict(base, gradient_accumulation_fusion=fused))
        sink_modes.clear()
        run_job(kind, r, data, None, tmp_path / f"o-{fused}")
        curves[fused] = _curve(tmp_path / f"o-{fused}")
        trained = [m for m in sink_modes]
        if fused:
            assert trained and set(trained) == {"main_grad"}, trained
        else:
            assert trained and "main_grad" not in trained, trained
    assert len(curves[True]) == 4                       # (loss, grad norm) of 2 steps
    # the same step up to fp32 summation order (dW lands in main_grad pre-scaled)
    assert curves[True] == pytest.approx(curves[False], rel=2e-6)


def test_wrong_scale_stops_before_the_optimizer_step(env, tmp_path, monkeypatch):
    from megatron_sz.train import objectives
    from megatron_sz.train.loop import GradScaleMismatch

    data = T.write_records(tmp_path / "sft.jsonl", T.arithmetic_problems(16, seed=6))
    r = _recipe(env, "mismatch", "sft", {"max_length": 160, "micro_batch_size": 2, "global_batch_size": 4,
                                         "max_steps": 3})
    real = objectives.SFTObjective.train_loss
    calls = {"n": 0}

    def doubled(self, hidden, weight, mb):   # a loss the fused op's grad_scale does not know about
        calls["n"] += 1
        loss, stats = real(self, hidden, weight, mb)
        return (loss * 2.0 if calls["n"] == 3 else loss), stats

    monkeypatch.setattr(objectives.SFTObjective, "train_loss", doubled)
    with pytest.raises(GradScaleMismatch, match="step 2/3.*NOT applied"):
        run_job("solver-sft", r, data, None, tmp_path / "out")
    assert len(_curve(tmp_path / "out")) == 2           # step 1's (loss, grad norm) only
