"""The RoundPlan: stage contracts checked when the plan is built, and executors that name no stages."""
import re
from pathlib import Path

import pytest

from megatron_sz import systems
from megatron_sz.data import Checkpoint, PreferencePair, Problem, Trajectory, Verdict
from megatron_sz.errors import UserError
from megatron_sz.recipe import load_recipe
from megatron_sz.round import Io, Stage, plan_round

ROOT = Path(__file__).resolve().parents[1]


def _noop(ctx, shard):
    return {}


def _toy(stages_fn):
    def loader():
        return systems.SystemSpec("toy", "a test system", lambda t, run, recipe: [run(s) for s in stages_fn(t)],
                                  "recipes/local-tiny.yaml", ("solver",))
    return loader


@pytest.fixture
def toy(monkeypatch):
    recipe = load_recipe(ROOT / "recipes" / "local-tiny.yaml")
    recipe.system = "toy"

    def use(stages_fn):
        monkeypatch.setitem(systems.SYSTEMS, "toy", _toy(stages_fn))
        return recipe
    return use


def test_good_contracts_resolve_sources_and_correlation(toy):
    recipe = toy(lambda t: [
        Stage("make", _noop, "solver", writes=(Io("items.jsonl", Problem),)),
        Stage("roll", _noop, "solver", "inference", shards=3, writes=(Io("roll", Trajectory, sharded=True),)),
        Stage("grade", _noop, "teacher", "inference", shards=3, after=("roll", "make"),
              reads=(Io("items.jsonl", Problem), Io("roll", Trajectory, sharded=True, per_shard=True)),
              writes=(Io("grade", Verdict, sharded=True),)),
        Stage("sum", _noop, "solver", after=("grade",), reads=(Io("grade", Verdict, sharded=True),)),
        Stage("train", _noop, "solver", "training", after=("sum", "prev:train"),
              reads=(Io("train", Checkpoint, scope="prev", optional=True),), writes=(Io("train", Checkpoint),)),
    ])
    p0, p1 = plan_round(recipe, 0), plan_round(recipe, 1)
    assert p1.is_correlated("roll", "grade") and not p1.is_correlated("grade", "sum")
    assert p0.sources[("train", "train")] is None                      # optional: nothing before round 0
    assert [(r, s.name) for r, s in p1.upstream_of("train")] == [(1, "sum"), (0, "train")]
    assert p1.sources[("train", "train")][0] == 0
    assert {s.name: s.train for s in p1} == {"make": False, "roll": False, "grade": False, "sum": False,
                                             "train": True}


@pytest.mark.parametrize("stages_fn,match", [
    (lambda t: [Stage("a", _noop, "solver", reads=(Io("missing.jsonl", Problem),))],
     r"stage r0\.a reads missing\.jsonl \(Problem\), but no stage of the plan writes it"),
    (lambda t: [Stage("w", _noop, "solver", writes=(Io("x.jsonl", PreferencePair),)),
                Stage("r", _noop, "solver", reads=(Io("x.jsonl", Problem),))],
     r"stage r0\.r reads x\.jsonl \(Problem\), but r0\.w writes x\.jsonl \(PreferencePair\)"),
    (lambda t: [Stage("w", _noop, "solver", writes=(Io("x.jsonl", Problem),)),
                Stage("other", _noop, "solver", after=()),
                Stage("r", _noop, "solver", after=("other",), reads=(Io("x.jsonl", Problem),))],
     r"stage r0\.r reads x\.jsonl \(Problem\) written by r0\.w, but does not wait for that stage"),
    (lambda t: [Stage("w", _noop, "solver", shards=2, writes=(Io("s", Problem, sharded=True),)),
                Stage("r", _noop, "solver", reads=(Io("s", Problem),))],
     r"r0\.w writes s/shard-\* \(Problem\)"),
])
def test_broken_contracts_fail_when_the_plan_is_built(toy, stages_fn, match):
    recipe = toy(stages_fn)
    with pytest.raises(UserError, match=match) as err:
        plan_round(recipe, 0)
    assert "system toy" in str(err.value)


def test_unknown_system_names_the_closest():
    recipe = load_recipe(ROOT / "recipes" / "local-tiny.yaml")
    recipe.system = "socratic-zer0"
    with pytest.raises(UserError, match="did you mean 'socratic-zero'"):
        plan_round(recipe, 0)


def test_executors_and_cli_name_no_stages():
    """Stage names live in the systems' round functions; executors and generic commands read the plan."""
    names = set()
    for spec in systems.all_systems():
        recipe = load_recipe(ROOT / spec.default_recipe)
        for t in (0, 1):
            names |= set(plan_round(recipe, t).names)
    files = sorted((ROOT / "megatron_sz" / "executor").glob("*.py")) + [
        ROOT / "megatron_sz" / "cli" / f for f in ("status.py", "stage.py", "evolve.py", "submit.py")]
    for f in files:
        text = f.read_text()
        for name in names:
            assert not re.search(rf"[\"']{re.escape(name)}[\"']", text), f"{f.name} names stage {name!r}"
