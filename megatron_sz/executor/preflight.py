"""Checks that run before anything is trained or submitted.

``preflight(recipe)`` raises ``UserError`` (one line: where + fix) for every input a user
can get wrong that would otherwise fail hours later inside a job: missing model or
tokenizer paths, a parallel layout the model cannot be split into, a seed file that
fails validation, missing held-out/contamination files, an LLM teacher without a model,
an unknown prompt template. The recipe's own schema checks ran already in load_recipe.
"""
from __future__ import annotations

import json
from pathlib import Path

from megatron_sz.errors import DataError, LayoutError, RecipeError


_LENIENT: list[str] | None = None  # --dry-run: missing paths become warnings collected here


def _exists(recipe, value: str | None, field: str, *, kind: str = "path") -> Path | None:
    if value is None:
        return None
    p = recipe.resolve_path(value)
    if not p.exists():
        if _LENIENT is not None:
            _LENIENT.append(f"{field}: {kind} not found: {value}")
            return None
        raise RecipeError(f"{field}: {kind} not found: {value}", where=recipe.source or "recipe",
                          fix=f"correct '{field}' (relative paths resolve against the recipe's folder)")
    return p


def _model_config(recipe, role: str) -> dict | None:
    spec = getattr(recipe, role).model
    for path, field in ((spec.hf_path, "hf_path"), (spec.mcore_checkpoint, "mcore_checkpoint")):
        _exists(recipe, path, f"{role}.model.{field}", kind="model folder")
    if isinstance(spec.config, dict):
        return dict(spec.config)
    for path, field in ((spec.hf_path, "hf_path"), (spec.mcore_checkpoint, "mcore_checkpoint")):
        if path is None:
            continue
        p = _exists(recipe, path, f"{role}.model.{field}", kind="model folder")
        if p is None:
            continue
        for name in ("config.json", "hf_config.json"):
            if (p / name).is_file():
                return json.loads((p / name).read_text())
        if field == "hf_path":
            raise RecipeError(f"{role}.model.hf_path: {p} has no config.json", where=recipe.source or "recipe",
                              fix="point hf_path at a Hugging Face checkpoint folder")
    return None


def check_layout(recipe, role: str) -> None:
    """The model's layout rules (megatron_sz.model_shape, the ones the build uses) on the
    model found on disk now, and the SLURM resources against the layout."""
    from megatron_sz.model_shape import check_model_layout

    section = getattr(recipe, role)
    par = section.parallel
    cfg = _model_config(recipe, role)
    if cfg:
        check_model_layout(cfg, tp=par.tp, pp=par.pp, virtual_pp=par.virtual_pp,
                           sequence_parallel=par.sequence_parallel,
                           vocab_divisible_by=section.model.make_vocab_size_divisible_by,
                           where=f"{role}.parallel", config_where=f"{role}.model")
    s = getattr(recipe.slurm, role)
    if s.gpus_per_node and par.gpus_per_node != s.gpus_per_node:
        raise LayoutError(f"{role}: parallel.gpus_per_node={par.gpus_per_node} but slurm.{role}.gpus_per_node="
                          f"{s.gpus_per_node}", where=f"slurm.{role}",
                          fix="make them equal (one training rank per GPU)")
    if s.gpus_per_node and par.nodes != s.nodes:
        raise LayoutError(f"{role}: parallel.nodes={par.nodes} but slurm.{role}.nodes={s.nodes}",
                          where=f"slurm.{role}", fix="make them equal")


def check_seeds(recipe) -> None:
    if recipe.seeds_from_teacher:
        if recipe.teacher.kind != "symbolic":
            raise RecipeError("seeds_from_teacher needs teacher.kind: symbolic", where="seeds_from_teacher",
                              fix="use seeds_file for an LLM teacher")
        return
    path = _exists(recipe, recipe.seeds_file, "seeds_file", kind="seed file")
    if path is None:
        return
    from megatron_sz.seeds import validate_seed_file

    rep = validate_seed_file(path, expected_counts=None, levels=None, run_code=False)
    errors = rep.errors
    if errors:
        first = "; ".join(str(e) for e in errors[:3])
        raise DataError(f"seed file fails validation ({len(errors)} issue(s)): {first}", where=str(path),
                        fix=f"run `megatron-sz seeds validate {path}` and fix every line it lists")


def preflight(recipe, *, missing_paths_ok: bool = False) -> list[str]:
    """Raise on the first invalid input. With ``missing_paths_ok`` (dry runs), missing
    model/data paths are returned as warnings instead, so a plan can be inspected before
    the checkpoints are on disk."""
    global _LENIENT
    _LENIENT = [] if missing_paths_ok else None
    try:
        _preflight(recipe)
        return list(_LENIENT or [])
    finally:
        _LENIENT = None


def _preflight(recipe) -> None:
    for role in ("solver", "generator"):
        if role == "generator" and not recipe.generator.enabled:
            continue
        spec = getattr(recipe, role).model
        _exists(recipe, spec.tokenizer, f"{role}.model.tokenizer", kind="tokenizer")
        check_layout(recipe, role)
    tok = recipe.tokenizer
    if tok.kind == "sentencepiece" and not tok.train:
        if not tok.path:
            raise RecipeError("tokenizer.kind sentencepiece needs 'path' or 'train: true'", where="tokenizer",
                              fix="set tokenizer.path to a .model file, or train: true")
        _exists(recipe, tok.path, "tokenizer.path", kind="tokenizer")
    sm = recipe.solver.model
    if sm.hf_path is None and sm.mcore_checkpoint is None and not (tok.train or tok.path or sm.tokenizer):
        raise RecipeError("solver.model.config (a random tiny model) needs a tokenizer", where="tokenizer",
                          fix="set tokenizer: {kind: sentencepiece, train: true}")
    check_seeds(recipe)
    if recipe.warmup.families:
        from megatron_sz.teacher.symbolic import FAMILIES

        bad = [f for f in recipe.warmup.families if f not in FAMILIES]
        if bad:
            raise RecipeError(f"warmup.families: unknown symbolic families {bad}", where="warmup.families",
                              fix=f"choose from {', '.join(FAMILIES)}")
    _exists(recipe, recipe.eval.heldout_file, "eval.heldout_file", kind="held-out file")
    _exists(recipe, recipe.warmup.data_file, "warmup.data_file", kind="warm-up data file")
    for i, f in enumerate(recipe.curriculum.contamination_files):
        _exists(recipe, f, f"curriculum.contamination_files[{i}]", kind="benchmark file")
    if recipe.eval.enabled and not recipe.eval.heldout_file and recipe.teacher.kind != "symbolic":
        raise RecipeError("eval.enabled needs eval.heldout_file unless the teacher is symbolic",
                          where="eval.heldout_file", fix="set eval.heldout_file to a JSONL of problems")
    if recipe.teacher.kind == "llm":
        b = recipe.teacher.backend
        if b.kind in ("vllm", "local") and not b.model:
            raise RecipeError("teacher.backend.model is not set", where="teacher.backend",
                              fix="set it to the teacher checkpoint (vllm/local) or served model name")
        if b.kind in ("vllm", "local"):
            _exists(recipe, b.model, "teacher.backend.model", kind="teacher checkpoint")
    if recipe.rounds < 1:
        raise RecipeError("rounds must be >= 1 to run anything", where="rounds", fix="set rounds: 3")
    from megatron_sz.rollout import resolve_template

    resolve_template(recipe.solver.rollout.prompt_template)
