"""``keep_checkpoints`` (issue 20): after a preempted job resumes and finishes, only its final
checkpoint is left, holding the model without optimizer state, and re-running the finished
job still works; ``keep_checkpoints: all`` keeps every checkpoint with its optimizer state."""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from megatron_sz.train import testing as T  # noqa: E402
from megatron_sz.train.jobs import run_job  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with T.tiny_job_env(tmp_path_factory.mktemp("keep")) as e:
        yield dict(e, data=T.write_records(e["root"] / "pairs.jsonl", T.arithmetic_pairs(40, seed=0)))


def _recipe(env, name, keep):
    return str(T.write_recipe(env["root"] / f"{name}.yaml", config=env["cfg"], tokenizer=env["tok"],
                              sections={"solver": {"dpo": {"keep_checkpoints": keep}}}))


def _ckpts(out) -> dict[str, bool]:
    """iter_* folder -> whether it holds optimizer state."""
    root = out / "checkpoint"
    return {p.name: json.loads((p / "megatron_sz.json").read_text())["has_optimizer"]
            for p in sorted(root.glob("iter_*"))}


def _preempt_then_resume(env, recipe, out, monkeypatch):
    monkeypatch.setenv("MEGATRON_SZ_SIGNAL_AT_STEP", "4")  # SIGTERM during step 5: checkpoint, exit 75
    first = run_job("solver-dpo", recipe, env["data"], None, out)
    assert first.exit_code == 75 and first.step == 5
    assert _ckpts(out) == {"iter_0000005": True}  # the preemption checkpoint can be resumed from
    monkeypatch.delenv("MEGATRON_SZ_SIGNAL_AT_STEP")
    second = run_job("solver-dpo", recipe, env["data"], None, out)
    assert second.exit_code == 0 and second.step == 10


def test_keep_last_prunes_the_preemption_checkpoint(env, monkeypatch):
    out = env["root"] / "last"
    recipe = _recipe(env, "last", "last")
    _preempt_then_resume(env, recipe, out, monkeypatch)
    assert _ckpts(out) == {"iter_0000010": False}
    assert (out / "checkpoint" / "latest").read_text().strip() == "iter_0000010"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    again = run_job("solver-dpo", recipe, env["data"], None, out)  # a finished job re-run: nothing to train
    assert again.exit_code == 0 and again.step == 10
    new = (out / "metrics.jsonl").read_text().splitlines()[len(lines):]
    assert not [x for x in map(json.loads, new) if x.get("type") == "train"]


def test_keep_all_keeps_every_checkpoint(env, monkeypatch):
    out = env["root"] / "all"
    _preempt_then_resume(env, _recipe(env, "all", "all"), out, monkeypatch)
    assert _ckpts(out) == {"iter_0000005": True, "iter_0000010": True}
