"""``train.jobs.JOBS`` is the one place that knows the training jobs.

Each entry must be complete on its own: a CLI subcommand, a recipe section that exists,
an objective whose statistics cover the metrics the job logs, and a loader that reads the
job's own record type. And no module outside the registry branches on a job's name.
"""
from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

import pytest

from megatron_sz.errors import UserError
from megatron_sz.train.jobs import JOBS, KINDS, job_spec, load_items, role_of, run_job

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_sz"
RECIPE = PACKAGE.parent / "recipes" / "local-tiny.yaml"


def _train_subcommands() -> dict[str, argparse.ArgumentParser]:
    from megatron_sz.cli import build_parser

    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    jobs = next(a for a in train._actions if isinstance(a, argparse._SubParsersAction))
    return dict(jobs.choices)


def test_every_job_has_a_cli_subcommand_with_its_help():
    cmds = _train_subcommands()
    assert set(cmds) == set(JOBS) and KINDS == tuple(JOBS)
    for kind, job in JOBS.items():
        flags = {s for a in cmds[kind]._actions for s in a.option_strings}
        assert {"--recipe", "--data", "--init", "--out"} <= flags
        assert ("--ref-logps" in flags) == (job.reference is not None), kind
        assert job.description in cmds[kind].description


def test_every_job_reads_a_recipe_section_that_exists():
    from megatron_sz.recipe import load_recipe

    recipe = load_recipe(RECIPE)
    for kind, job in JOBS.items():
        model, par, spec = role_of(kind, recipe)
        assert model is getattr(recipe, job.role).model and par is getattr(recipe, job.role).parallel
        assert spec is getattr(getattr(recipe, job.role), job.section)
        assert spec.max_length > 0 and par.tp >= 1, kind
        if job.reference is not None:
            assert isinstance(job.uses_reference(spec), bool)


def test_every_objective_produces_the_metrics_its_job_logs():
    from megatron_sz.train.objectives import Objective

    for kind, job in JOBS.items():
        cls = job.objective_class()
        assert isinstance(cls, type) and issubclass(cls, Objective), kind
        assert set(job.metrics) <= set(cls.train_keys) - {"loss"}, kind
        assert job.eval_metrics, f"{kind} logs no held-out metric"
        for num, den in job.eval_metrics.values():
            assert {num, den} <= set(cls.eval_keys) | {"items"}, kind


def test_unknown_job_is_a_user_error_listing_the_jobs(tmp_path):
    for call in (lambda: job_spec("solver-ppo"), lambda: role_of("solver-ppo", None),
                 lambda: load_items("solver-ppo", tmp_path / "x.jsonl", None, None, None),
                 lambda: run_job("solver-ppo", "no-such-recipe.yaml", tmp_path / "x.jsonl", None, tmp_path / "o")):
        with pytest.raises(UserError, match="unknown training job 'solver-ppo'") as err:
            call()
        assert all(kind in str(err.value) for kind in JOBS)


def test_every_loader_reads_its_own_synthetic_records(tmp_path):
    from megatron_sz.data import write_jsonl
    from megatron_sz.recipe import load_recipe
    from megatron_sz.train import testing as T

    tok = T.make_tokenizer(tmp_path / "tok")
    recipe = load_recipe(RECIPE)
    rng = random.Random(0)
    for kind, job in JOBS.items():
        assert job.synthetic is not None, kind
        recs = [job.synthetic(lambda: " ".join(str(rng.randint(0, 99)) for _ in range(4)), i) for i in range(5)]
        assert all(isinstance(r, job.record) or isinstance(r, dict) for r in recs), kind  # SFT: {prompt, completion}
        path = tmp_path / f"{kind}.jsonl"
        write_jsonl(path, recs)
        spec = role_of(kind, recipe)[2]
        items, stats, groups = load_items(kind, path, recipe, spec, tok)
        assert len(items) == stats.kept == 5, kind
        assert groups == [] or len(groups) == len(items), kind


def test_no_module_outside_the_registry_branches_on_a_job_name():
    registry = {PACKAGE / "train" / "jobs.py", PACKAGE / "train" / "registry.py"}
    names = "|".join(re.escape(k) for k in JOBS)
    branch = re.compile(rf"""(==|!=|\bin)\s*[\(\[{{]?\s*["']({names})["']""")
    hits = [f"{p.relative_to(PACKAGE)}:{n}: {line.strip()}"
            for p in PACKAGE.rglob("*.py") if p not in registry
            for n, line in enumerate(p.read_text().splitlines(), start=1) if branch.search(line)]
    assert not hits, "branch on a job name outside train/jobs.py; put it in the JobSpec:\n" + "\n".join(hits)
