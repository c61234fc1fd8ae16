"""The training jobs of a co-evolution round: the ``JOBS`` table and one entry point, ``run_job``.

``JOBS`` maps each job kind to a ``JobSpec`` (``registry.py``): the input record type and
its loader, the objective, the metrics it logs, the recipe section it reads. Nothing else
in the tree branches on a kind: adding a job is one ``JOBS`` entry plus one objective in
``objectives.py`` (see ``train/README.md``).

``run_job(kind, recipe, data_path, init, out_dir)`` runs one job in this process (world of
one) or as one rank of a ``torchrun`` / ``srun`` world (tp * pp * dp processes). ``_run``
reads as the dataflow of a job, one function per stage:

    _setting      recipe section, unsupported options refused, process groups
    _start        starting weights (HF folder, Megatron checkpoint, or random) + tokenizer
    _load_data    records -> items (tokenise, overlong policy) -> train / held-out split -> plan
    _build_model  model -> optimizer -> resume from out/checkpoint if present
    _engine       [reference log-probs: once per round, from the start-of-round policy] -> objective
    _steps        eval -> steps (checkpoint every save_interval; on SIGTERM/SIGUSR1: save, exit 75)
    _finish       final checkpoint -> eval -> HF export (recipe ``export_hf``); then summary.json

Exit codes (``JobResult.exit_code``): 0 done, 75 preempted after a checkpoint (re-run
the same command to resume). User errors raise ``UserError`` (the CLI prints one line).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_sz.data import PreferencePair, Problem, ScoredRollout, WeightedExample, atomic_write_json, iter_jsonl
from megatron_sz.errors import CheckpointError, DataError, RecipeError, UserError
from megatron_sz.train import pg
from megatron_sz.train.preempt import EXIT_PREEMPTED, PreemptionGuard, fault_injection_step
from megatron_sz.train.registry import (JobSpec, dpo_uses_reference, load_pairs, load_sft, load_weighted,
                                        synthetic_pair, synthetic_sft, synthetic_weighted)

_NLL = {"eval_nll": ("nll", "tokens")}  # held-out NLL per target token (SFT and WSFT)

JOBS: dict[str, JobSpec] = {
    "solver-sft": JobSpec(
        description="solver SFT warm-up: NLL on reference solutions (Problem JSONL)",
        record=Problem, load=load_sft, objective="SFTObjective", role="solver", section="sft",
        eval_metrics=_NLL, synthetic=synthetic_sft),
    "solver-dpo": JobSpec(
        description="solver online DPO on the round's PreferencePair JSONL",
        record=PreferencePair, load=load_pairs, objective="DPOObjective", role="solver", section="dpo",
        unit="pairs", metrics=("margin", "accuracy", "chosen_reward", "rejected_reward"),
        eval_metrics={"eval_margin": ("margin", "items"), "eval_accuracy": ("accuracy", "items"),
                      "eval_chosen_logp": ("chosen_logp", "items"),
                      "eval_rejected_logp": ("rejected_logp", "items")},
        reference=dpo_uses_reference, synthetic=synthetic_pair),
    "generator-wsft": JobSpec(
        description="generator weighted SFT on WeightedExample JSONL",
        record=WeightedExample, load=load_weighted, objective="WSFTObjective", role="generator", section="wsft",
        metrics=("weight",), eval_metrics=_NLL, synthetic=synthetic_weighted),
    "policy-gradient": JobSpec(
        description="policy-gradient RL (GRPO, REINFORCE++, TRR++, ADPO) on ScoredRollout JSONL",
        record=ScoredRollout, load=pg.load_rollouts, objective="PGObjective", role="solver", section="pg",
        unit="rollouts", metrics=pg.METRICS, eval_metrics=_NLL, reference=pg.uses_table,
        synthetic=pg.synthetic_rollout),
}
KINDS = tuple(JOBS)  # the job names, for callers that need only those


@dataclass
class JobResult:
    kind: str
    exit_code: int  # 0 done, 75 preempted (checkpoint saved; re-run resumes)
    step: int  # completed steps
    total_steps: int
    out_dir: str
    checkpoint: str | None = None
    hf_dir: str | None = None
    summary: dict = field(default_factory=dict)


def log(msg: str, *, rank: int = 0) -> None:
    if rank == 0:
        print(f"[train] {msg}", file=sys.stderr, flush=True)


def job_spec(kind: str) -> JobSpec:
    """The ``JOBS`` entry of ``kind``; an unknown kind is a UserError listing the jobs."""
    try:
        return JOBS[kind]
    except KeyError:
        raise RecipeError(f"unknown training job {kind!r}", fix=f"use one of {', '.join(JOBS)}") from None


def role_of(kind: str, recipe: Any) -> tuple[Any, Any, Any]:
    """(model spec, parallel spec, train spec) of the role a job trains."""
    return job_spec(kind).sections(recipe)


# --------------------------------------------------------------------------- data


def load_items(kind: str, path: Path, recipe: Any, spec: Any, tok: Any, *, rank: int = 0):
    """``kind``'s JSONL file -> (items, TokenizeStats, groups) through the job's loader, with the
    checks every job shares: the file exists, overlong items are counted, some items are left."""
    job = job_spec(kind)
    path = Path(path)
    if not path.exists():
        raise DataError(f"input file not found: {path}", fix="check --data")
    items, stats, groups = job.load(path, recipe, spec, tok, rank)
    what = job.unit
    if stats.truncated or stats.dropped_overlong:
        log(f"{stats.truncated + stats.dropped_overlong} of {stats.records} {what} exceed max_length "
            f"{spec.max_length} tokens: {stats.truncated} truncated, {stats.dropped_overlong} dropped "
            f"(overlong: {spec.overlong})", rank=rank)
    if not items:
        raise DataError(f"no {what} left after tokenisation: {stats.dropped_overlong} longer than max_length "
                        f"{spec.max_length} (dropped by overlong: drop), {stats.dropped_empty} empty",
                        where=str(path), fix="raise max_length, or set overlong: truncate")
    return items, stats, groups


# --------------------------------------------------------------------------- model source

_ARCH_IGNORE = ("init_std", "torch_dtype", "max_position_embeddings")


def _arch_diff(a: Any, b: Any) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k} {db.get(k)!r} (recipe: {da.get(k)!r})" for k in da
            if k not in _ARCH_IGNORE and da.get(k) != db.get(k)]


def model_source(model_spec: Any, init: str | None, recipe: Any) -> tuple[dict, str, str | None]:
    """(hf config dict, "hf" | "mcore" | "random", path) of the starting weights."""
    from megatron_sz.model_shape import parse_hf_config

    expected = None
    if model_spec.config is not None:
        expected = parse_hf_config(dict(model_spec.config), where="recipe model.config")
    elif model_spec.hf_path is not None:
        hf = recipe.resolve_path(model_spec.hf_path)
        expected = parse_hf_config(str(hf))
    if init is None:
        if model_spec.mcore_checkpoint:
            init = str(recipe.resolve_path(model_spec.mcore_checkpoint))
        elif model_spec.hf_path:
            init = str(recipe.resolve_path(model_spec.hf_path))
        elif expected is not None:
            return expected[0], "random", None
        else:
            raise RecipeError("no starting weights: pass --init, or set model.hf_path / model.config")
    from megatron_sz.megatron import latest_checkpoint

    p = Path(init)
    if not p.is_dir():
        raise CheckpointError(f"--init {init} is not a folder",
                              fix="pass an HF model folder or a megatron-sz checkpoint folder")
    if (p / "checkpoint").is_dir() and latest_checkpoint(p / "checkpoint") is not None:
        p = p / "checkpoint"  # a training job's output dir: its final Megatron checkpoint
    is_hf = (p / "config.json").exists() and any(p.glob("*.safetensors"))
    ckpt = None if is_hf else latest_checkpoint(p)
    if not is_hf and ckpt is None:
        raise CheckpointError(f"--init {init} is neither an HF model folder (config.json + *.safetensors) "
                              "nor a complete megatron-sz checkpoint (latest -> iter_*/ with hf_config.json)",
                              fix="point at the previous stage's out/hf or out/checkpoint folder")
    cfg, arch = parse_hf_config(str(p if is_hf else ckpt))
    if expected is not None:
        diff = _arch_diff(expected[1], arch)
        if diff:
            raise CheckpointError(
                f"--init holds another architecture than this role's recipe model: {'; '.join(diff)}",
                where=str(init), fix="pass the checkpoint of this role's model, or correct the recipe's model section")
    return cfg, ("hf" if is_hf else "mcore"), str(p)

# --------------------------------------------------------------------------- the job


def run_job(kind: str, recipe: Any, data_path: str | os.PathLike, init: str | None,
            out_dir: str | os.PathLike, *, ref_logps: str | None = None, tokenizer: str | None = None,
            max_steps: int | None = None, eval_data: str | os.PathLike | None = None) -> JobResult:
    """Run one training job (see module docstring). ``recipe``: a Recipe or a YAML path.

    ``eval_data``: an extra held-out file of the same record type (added to the
    ``eval_fraction`` split); evaluated at the start, every ``eval_interval`` steps and
    at the end (the job's ``eval_metrics``: held-out NLL, or DPO preference accuracy and margin).
    """
    from megatron_sz.recipe import Recipe, load_recipe

    job = job_spec(kind)
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    with PreemptionGuard() as guard:
        return _run(kind, job, recipe, Path(data_path), init, Path(out_dir), guard=guard, ref_path=ref_logps,
                    tokenizer_path=tokenizer, max_steps=max_steps, eval_path=eval_data)


def _tokenizer_path(recipe: Any, model_spec: Any, init_kind: str, init_path: str | None,
                    override: str | None) -> Path:
    for cand in (override, model_spec.tokenizer, recipe.tokenizer.path):
        if cand:
            return recipe.resolve_path(cand) if cand is not override else Path(cand)
    if init_kind == "hf" and init_path:
        return Path(init_path)
    if model_spec.hf_path:
        return recipe.resolve_path(model_spec.hf_path)
    raise RecipeError("no tokenizer: set model.tokenizer or tokenizer.path in the recipe, or pass --tokenizer")


def _train_tokenizer_on_data(recipe: Any, data_path: Path, eval_path: Any, out: Path, rank: int) -> Path:
    """A recipe with ``tokenizer: {kind: sentencepiece, train: true}`` and no tokenizer given
    (e.g. ``megatron-sz train solver-dpo --recipe recipes/local-tiny.yaml --data pairs.jsonl``
    on its own, outside a run directory): train one on the job's own text, deterministically,
    into ``OUT/tokenizer``. A rerun (resume) reuses it, so ids never change mid-job."""
    from megatron_sz.megatron import training as mt
    from megatron_sz.tokenizer import train_sentencepiece

    target = out / "tokenizer"
    if rank == 0 and not (target / "tokenizer.model").is_file():
        texts: list[str] = []
        for path in [data_path] + ([Path(eval_path)] if eval_path is not None else []):
            for obj in iter_jsonl(path):
                texts.extend(v for v in obj.values() if isinstance(v, str) and v.strip())
        if not texts:
            raise UserError(f"{data_path} has no text to train a tokenizer on", where=str(data_path),
                            fix="pass --tokenizer, or check the data file")
        tmp = out / ".tokenizer.tmp"
        train_sentencepiece(texts, tmp, vocab_size=recipe.tokenizer.vocab_size, seed=recipe.seed)
        tmp.replace(target)
        print(f"[train] no tokenizer given: trained a {recipe.tokenizer.vocab_size}-piece SentencePiece "
              f"tokenizer on {data_path.name} into {target}", flush=True)
    mt.barrier()
    return target



def _run(kind: str, job: JobSpec, recipe: Any, data_path: Path, init: str | None, out: Path, *,
         guard: PreemptionGuard, ref_path: str | None, tokenizer_path: str | None, max_steps: int | None,
         eval_path: str | os.PathLike | None = None) -> JobResult:
    from megatron_sz.train.metrics import MetricsLogger

    s = _setting(kind, job, recipe, out)
    t_start = time.time()
    start = _start(s, init, tokenizer_path, data_path, eval_path)
    data = _load_data(s, start.tok, data_path, eval_path, max_steps)
    model = _build_model(s, start, data.plan)
    engine = _engine(s, model, data, ref_path, pad_id=start.tok.pad_id if start.tok.pad_id is not None
                     else start.tok.eos_id)
    logger = MetricsLogger(out, kind=kind, total_steps=data.plan.total_steps, start_step=model.start,
                           enabled=s.rank == 0, wandb_spec=recipe.wandb, config={"kind": kind, "data": str(data_path)})
    summary = _summary_head(s, start, data, data_path, resumed=model.resumed)
    hf_dir = None
    try:
        if model.start == 0:
            summary["eval_start"] = _evaluate(s, engine, data.held, logger, step=0)
        progress = _steps(s, start, model, data, engine, logger, guard)
        if progress.exit_code == 0:
            summary["eval_end"], hf_dir = _finish(s, start, model, data, engine, logger, progress)
    finally:
        logger.close()
    rates = progress.tokens_per_s
    summary.update(step=progress.step, exit_code=progress.exit_code, checkpoint=progress.checkpoint, hf_dir=hf_dir,
                   tokens_per_s_mean=(sum(rates) / len(rates)) if rates else None,
                   wall_s=round(time.time() - t_start, 2))
    if s.rank == 0:
        atomic_write_json(out / "summary.json", summary)
    return JobResult(kind=kind, exit_code=progress.exit_code, step=progress.step, total_steps=data.plan.total_steps,
                     out_dir=str(out), checkpoint=progress.checkpoint, hf_dir=hf_dir, summary=summary)


@dataclass
class _Setting:
    """What the recipe and the launcher fix before any file is read."""

    kind: str
    job: JobSpec
    recipe: Any
    model_spec: Any  # recipe.<role>.model
    par: Any  # recipe.<role>.parallel
    spec: Any  # recipe.<role>.<section>: the job's train options
    seed: int
    on_gpu: bool
    rank: int
    info: Any  # megatron.training.ParallelInfo: this rank's tp/pp/dp coordinates and groups
    device: Any
    out: Path


def _setting(kind: str, job: JobSpec, recipe: Any, out: Path) -> _Setting:
    import torch

    from megatron_sz import dist
    from megatron_sz import megatron as adapter
    from megatron_sz.megatron import training as mt

    model_spec, par, spec = job.sections(recipe)
    if par.sequence_parallel:
        raise RecipeError("sequence_parallel is not supported by the training jobs yet",
                          where="parallel.sequence_parallel", fix="set it to false")
    if par.virtual_pp:
        raise RecipeError("virtual (interleaved) pipeline stages are not supported by the training jobs yet",
                          where="parallel.virtual_pp", fix="remove virtual_pp (1F1B without interleaving is used)")
    if spec.batching == "packed":
        per_item = job.objective_class().rows_per_item
        need = spec.max_length * per_item
        if spec.pack_length is not None and spec.pack_length < need:
            pairs = " (a DPO pair's chosen and rejected share a row: 2 x max_length)" if per_item > 1 else ""
            raise RecipeError(f"pack_length {spec.pack_length} is shorter than the longest item, {need} tokens{pairs}",
                              where=f"{job.role}.{job.section}.pack_length",
                              fix=f"set pack_length >= {need}, or leave it unset ({need})")
    seed = spec.seed if spec.seed is not None else recipe.seed
    on_gpu = torch.cuda.is_available() and recipe.device != "cpu"
    rank, world = dist.init_from_env()
    if world % (par.tp * par.pp):
        raise UserError(f"world size {world} is not a multiple of tp*pp = {par.tp * par.pp}",
                        where="parallel", fix="launch tp*pp*dp processes (torchrun --nproc-per-node / srun -n)")
    torch.manual_seed(seed)
    adapter.initialize_parallel(par.tp, par.pp, seed=seed)
    info = mt.parallel_info()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    out.mkdir(parents=True, exist_ok=True)
    return _Setting(kind=kind, job=job, recipe=recipe, model_spec=model_spec, par=par, spec=spec, seed=seed,
                    on_gpu=on_gpu, rank=rank, info=info, device=device, out=out)


@dataclass
class _Start:
    """The starting weights and the tokenizer."""

    cfg: dict  # the model's HF config
    init_kind: str  # "hf" | "mcore" | "random"
    init_path: str | None
    tok: Any


def _start(s: _Setting, init: str | None, tokenizer_path: str | None, data_path: Path, eval_path: Any) -> _Start:
    from megatron_sz.tokenizer import load_tokenizer

    cfg, init_kind, init_path = model_source(s.model_spec, init, s.recipe)
    try:
        tok_path = _tokenizer_path(s.recipe, s.model_spec, init_kind, init_path, tokenizer_path)
    except RecipeError:
        if not (s.recipe.tokenizer.kind == "sentencepiece" and s.recipe.tokenizer.train):
            raise
        tok_path = _train_tokenizer_on_data(s.recipe, data_path, eval_path, s.out, s.rank)
    tok = load_tokenizer(tok_path)
    if tok.vocab_size > cfg["vocab_size"]:
        raise CheckpointError(f"the tokenizer has {tok.vocab_size} ids but the model's vocab_size is "
                              f"{cfg['vocab_size']}", fix="use the tokenizer the model was trained with")
    return _Start(cfg=cfg, init_kind=init_kind, init_path=init_path, tok=tok)


@dataclass
class _Data:
    items: list  # all items: the training file's, then --eval-data's; Item.index is the id (one ref table)
    train: list
    held: list
    stats: Any  # TokenizeStats of the training file
    plan: Any  # BatchPlan: every step's micro-batches, fixed by the seed


def _load_data(s: _Setting, tok: Any, data_path: Path, eval_path: Any, max_steps: int | None) -> _Data:
    from megatron_sz.train.data import make_plan, split_heldout

    spec, info = s.spec, s.info
    items, stats, groups = load_items(s.kind, data_path, s.recipe, spec, tok, rank=s.rank)
    train, held = split_heldout(items, fraction=spec.eval_fraction, seed=s.seed, groups=groups)
    if eval_path is not None:  # a separate held-out file, tokenised the same way
        extra, _, _ = load_items(s.kind, Path(eval_path), s.recipe, spec, tok, rank=s.rank)
        for j, it in enumerate(extra):
            it.index = len(items) + j  # ids continue after the training file's (one ref table)
        held = held + extra
        items = items + extra
    # The plan holds positions into ``train``; Item.index stays the global id.
    plan = make_plan(train, global_batch_size=spec.global_batch_size, micro_batch_size=spec.micro_batch_size,
                     dp=info.dp, epochs=spec.epochs, max_steps=max_steps or spec.max_steps, seed=s.seed,
                     batching=spec.batching, sort_window=spec.sort_window, pack_length=pack_length(s))
    mb = (f"packed rows of {plan.pack_length} tokens" if plan.pack_length is not None
          else f"micro-batch {spec.micro_batch_size}")
    log(f"{s.kind}: {len(train)} train / {len(held)} held-out items, {plan.total_steps} steps of "
        f"{spec.global_batch_size} ({mb}, tp={info.tp} pp={info.pp} dp={info.dp})",
        rank=s.rank)
    return _Data(items=items, train=train, held=held, stats=stats, plan=plan)


def pack_length(s: _Setting) -> int | None:
    """The packed-row capacity in tokens (None unless ``batching: packed``): ``pack_length``, or
    by default ``max_length`` per sequence of an item (a DPO pair: 2 x max_length)."""
    spec = s.spec
    if spec.batching != "packed":
        return None
    if spec.pack_length is not None:
        return spec.pack_length
    return spec.max_length * s.job.objective_class().rows_per_item


@dataclass
class _Model:
    chunks: list  # this rank's model chunks, as wrapped by the optimizer (DDP)
    optimizer: Any
    vocab: int  # the true vocab size (the embedding is padded beyond it)
    start: int  # completed steps: from the checkpoint when resumed, else 0
    resumed: bool
    params_dtype: Any = None  # torch dtype of the model's parameters


def _checkpoint_identity(s: _Setting, plan: Any) -> dict:
    """What a checkpoint in OUT must match to be resumed: same job, data plan and layout."""
    return {"kind": s.kind, "fingerprint": plan.fingerprint, "layout": [s.info.tp, s.info.pp, s.info.dp]}


def _build_model(s: _Setting, start: _Start, plan: Any) -> _Model:
    import torch

    from megatron_sz import megatron as adapter
    from megatron_sz.megatron import training as mt
    from megatron_sz.train import state

    model_spec, par = s.model_spec, s.par
    params_dtype = torch.float32
    if s.on_gpu:
        params_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[model_spec.dtype]
    chunks = adapter.build_model(start.cfg, tp=par.tp, pp=par.pp, params_dtype=params_dtype,
                                 make_vocab_size_divisible_by=model_spec.make_vocab_size_divisible_by,
                                 recompute=None if par.recompute == "none" else par.recompute,
                                 init_weights=start.init_kind == "random")
    if start.init_kind == "hf":
        adapter.load_hf_weights(chunks, start.init_path)
    elif start.init_kind == "mcore":
        adapter.load_checkpoint(start.init_path, chunks, None)
    optimizer = mt.make_optimizer(chunks, optim=s.spec.optim, params_dtype=params_dtype,
                                  use_distributed_optimizer=par.use_distributed_optimizer)
    chunks = optimizer.chunks
    extra = state.resume(s.out, chunks=chunks, optimizer=optimizer, expect=_checkpoint_identity(s, plan),
                         world_rank=s.rank)
    begin = int(extra["step"]) if extra else 0
    if extra:
        log(f"resumed from {state.ckpt_root(s.out)} at step {begin}/{plan.total_steps}", rank=s.rank)
    return _Model(chunks=chunks, optimizer=optimizer, vocab=adapter.true_vocab_size(chunks[0]), start=begin,
                  resumed=bool(extra), params_dtype=params_dtype)


def _save(s: _Setting, model: _Model, plan: Any, step: int) -> str:
    from megatron_sz.train import state

    extra = {**_checkpoint_identity(s, plan), "total_steps": plan.total_steps, "seed": s.seed}
    return state.save(s.out, chunks=model.chunks, optimizer=model.optimizer, step=step, extra=extra,
                      world_rank=s.rank, keep=s.spec.keep_checkpoints, final=step >= plan.total_steps)


def _engine(s: _Setting, model: _Model, data: _Data, ref_path: str | None, *, pad_id: int) -> Any:
    """The step engine around the job's objective; first the reference log-probs, when the job
    uses them (once per round, from the start-of-round policy, into OUT/ref_logps.pt)."""
    from megatron_sz.train.loop import StepEngine

    engine_kw = dict(chunks=model.chunks, optimizer=model.optimizer, info=s.info, pad_id=pad_id,
                     pad_to_multiple_of=s.spec.pad_to_multiple_of, device=s.device,
                     packed=data.plan.pack_length is not None, pack_length=data.plan.pack_length)
    kw = dict(tp_group=s.info.tp_group, vocab_size=model.vocab)
    import torch

    # fp16 scales the loss by a dynamic factor the fused op cannot know in forward
    fusion = s.spec.gradient_accumulation_fusion and model.params_dtype != torch.float16
    ref_table = None
    if s.job.uses_reference(s.spec):
        ref_table = _reference_logps(data.items, out=s.out, ref_path=ref_path, start=model.start, spec=s.spec,
                                     engine=StepEngine(objective=None, **engine_kw), kw=kw, info=s.info,
                                     rank=s.rank, objective=s.job.objective_class()).to(s.device)
    objective = s.job.objective_class().for_job(s.spec, ref_logps=ref_table, **kw)
    return StepEngine(objective=objective, grad_fusion=fusion, **engine_kw)


def _evaluate(s: _Setting, engine: Any, held: list, logger: Any, *, step: int) -> dict | None:
    """The job's ``eval_metrics`` on the held-out items, logged as an eval line."""
    if not held:
        return None
    sums = _eval(engine, engine.objective, held, s.spec, s.info)
    res = {name: sums[num] / max(1.0, sums[den]) for name, (num, den) in s.job.eval_metrics.items()}
    logger.log({"type": "eval", "step": step, **res})
    return res


def _summary_head(s: _Setting, start: _Start, data: _Data, data_path: Path, *, resumed: bool) -> dict:
    """summary.json's fields known before the first step (a resumed run keeps its eval_start)."""
    summary: dict = {"kind": s.kind, "data": str(data_path), "init": start.init_path, "init_kind": start.init_kind,
                     "tokenize": data.stats.as_dict(), "dropped_tail": data.plan.dropped_tail,
                     "train_items": len(data.train), "heldout_items": len(data.held),
                     "total_steps": data.plan.total_steps,
                     "layout": {"tp": s.info.tp, "pp": s.info.pp, "dp": s.info.dp}}
    prev = _read_json(s.out / "summary.json")
    summary["eval_start"] = prev.get("eval_start") if (resumed and prev) else None
    return summary


@dataclass
class _Progress:
    step: int  # completed steps
    exit_code: int = 0
    checkpoint: str | None = None  # the last checkpoint saved by this process
    tokens_per_s: list[float] = field(default_factory=list)


def _steps(s: _Setting, start: _Start, model: _Model, data: _Data, engine: Any, logger: Any,
           guard: PreemptionGuard) -> _Progress:
    """The step loop: one line per log_interval, checkpoints, evals; on a preemption signal
    (seen by every rank at the same step) save and stop with exit code 75."""
    from megatron_sz.train.metrics import model_flops_per_token, peak_flops
    from megatron_sz.train.schedule import lr_for

    spec, info, plan, total = s.spec, s.info, data.plan, data.plan.total_steps
    lens = [it.length for it in data.train]
    flops_tok = model_flops_per_token(start.cfg, sum(lens) / max(1, len(lens)))
    peak = peak_flops()
    fault_at = fault_injection_step()
    p = _Progress(step=model.start)
    while p.step < total:
        if fault_at is not None and p.step == fault_at and s.rank == 0:
            import signal

            os.kill(os.getpid(), signal.SIGTERM)
        lr = lr_for(p.step, total_steps=total, optim=spec.optim)
        groups = [[data.train[i] for i in g] for g in plan.microbatches(p.step, info.dp_rank)]
        step_items = [data.train[i] for i in plan.steps[p.step]]
        try:
            res = engine.train_step(groups, lr=lr, preempt_requested=guard.requested, step_items=step_items)
        except UserError as err:
            raise type(err)(f"step {p.step + 1}/{total}: {err}") from None
        p.step += 1
        logger.step_time(res.seconds)
        tps = res.stats["tokens"] / max(res.seconds, 1e-9)
        p.tokens_per_s.append(tps)
        if p.step % max(1, spec.log_interval) == 0 or p.step == total or res.preempt:
            mfu = (flops_tok * tps / (peak * info.world_size)) if peak else None
            logger.log(_step_line(s.job, p.step, res, lr=lr, tps=tps, mfu=mfu, eta=logger.eta(p.step)))
        if res.preempt:
            p.checkpoint = _save(s, model, plan, p.step)
            log(f"preempted: checkpoint at step {p.step}/{total} saved to {p.checkpoint}; "
                f"re-run the same command to resume (exit {EXIT_PREEMPTED})", rank=s.rank)
            p.exit_code = EXIT_PREEMPTED
            break
        if spec.save_interval and p.step % spec.save_interval == 0 and p.step < total:
            p.checkpoint = _save(s, model, plan, p.step)
        if spec.eval_interval and p.step % spec.eval_interval == 0 and p.step < total:
            _evaluate(s, engine, data.held, logger, step=p.step)
    return p


def _step_line(job: JobSpec, step: int, res: Any, *, lr: float, tps: float, mfu: float | None, eta: Any) -> dict:
    """One metrics.jsonl train line: the common fields, then the job's own ``metrics``."""
    rec = {"step": step, "loss": res.stats["loss"], "lr": lr, "grad_norm": res.grad_norm,
           "tokens": res.stats["tokens"], "tokens_per_s": tps, "mfu": mfu,
           "step_time_s": res.seconds, "eta_s": eta}
    rec.update((k, res.stats[k]) for k in job.metrics)
    return rec


def _finish(s: _Setting, start: _Start, model: _Model, data: _Data, engine: Any, logger: Any,
            p: _Progress) -> tuple[dict | None, str | None]:
    """Final checkpoint (not again when a finished run is re-run), final eval, HF export.
    Returns (the final eval metrics, the HF folder or None without ``export_hf``)."""
    from megatron_sz.train import state

    if not (model.resumed and model.start == data.plan.total_steps and state.has_checkpoint(s.out)):
        p.checkpoint = _save(s, model, data.plan, p.step)
    eval_end = _evaluate(s, engine, data.held, logger, step=p.step)
    return eval_end, (_export_hf(s.out, start.tok, rank=s.rank) if s.spec.export_hf else None)


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except Exception:
        return {}


def _chunks_of(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def _my_groups(items: list, spec: Any, info: Any, capacity: int | None = None) -> list[list[list]]:
    """Forward-only passes: global-batch-sized chunks, micro-batches dealt round-robin to DP ranks.

    Every DP rank gets the same number of micro-batch slots per chunk (an empty slot
    is skipped); PP stages of one DP rank see the same micro-batches. Packed
    (``capacity``): each chunk's items dealt to DP ranks by tokens and packed into rows, as
    in training (``packing.rank_rows``)."""
    from megatron_sz.train.packing import rank_rows

    out = []
    for chunk in _chunks_of(items, spec.global_batch_size):
        if capacity is not None:
            rows = rank_rows([it.num_tokens for it in chunk], dp=info.dp, dp_rank=info.dp_rank, capacity=capacity)
            out.append([[chunk[j] for j in row] for row in rows])
            continue
        mbs = _chunks_of(sorted(chunk, key=lambda it: it.length), spec.micro_batch_size)
        out.append(mbs[info.dp_rank::info.dp])
    return out


def _eval(engine: Any, objective: Any, held: list, spec: Any, info: Any) -> dict:
    keys = tuple(objective.eval_keys) + ("items",)
    total = {k: 0.0 for k in keys}

    def fn(hidden, weight, mb):
        d = objective.eval_stats(hidden, weight, mb)
        d["items"] = float(mb.num_items)
        return d

    for groups in _my_groups(held, spec, info, engine.pack_length if engine.packed else None):
        sums = engine.forward_only(groups, fn, keys)
        for k in keys:
            total[k] += sums[k]
    return total


def _reference_logps(items: list, *, out: Path, ref_path: str | None, start: int, spec: Any, engine: Any,
                     kw: dict, info: Any, rank: int, objective: type):
    """The frozen start-of-round policy's log-probs of every item, [N, objective.reference_width(items)]
    (DPO: summed per pair, [N, 2]; policy gradient: per position); computed once."""
    import torch

    from megatron_sz.megatron import training as mt
    from megatron_sz.train import state
    from megatron_sz.train.data import fingerprint

    fp = fingerprint(items, extra="ref")
    path = Path(ref_path) if ref_path else out / "ref_logps.pt"
    if path.exists():
        table = state.load_ref_logps(path, fingerprint=fp, n_items=len(items),
                                     width=objective.reference_width(items))
        log(f"reference log-probs: reusing {path}", rank=rank)
        return table
    if ref_path:
        raise CheckpointError(f"--ref-logps {ref_path} does not exist", fix="drop the flag to compute them here")
    if start > 0:
        raise CheckpointError("resuming a job whose reference log-probs file is gone; the policy has "
                              "moved since the round started, so they cannot be recomputed", where=str(path),
                              fix="restore ref_logps.pt, or restart the job in a fresh --out directory")
    t0 = time.perf_counter()
    width = objective.reference_width(items)
    table = torch.zeros(len(items), width, dtype=torch.float32, device=engine.device)
    for groups in _my_groups(items, spec, info, engine.pack_length if engine.packed else None):
        for mb, rows in engine.forward_collect(
                groups, lambda h, w, mb: objective.reference_rows(h, w, mb, spec=spec, **kw)):
            if info.reports:
                rows = rows.float()[:, :width]   # per-position rows: the micro-batch may pad past width
                table.index_copy_(0, mb.item_index.to(table.device),
                                  torch.nn.functional.pad(rows, (0, width - rows.shape[1])))
    mt.all_reduce_sum(table)
    table = table.cpu()
    if rank == 0:
        state.save_ref_logps(path, table, fingerprint=fp, meta={"n_items": len(items)})
    mt.barrier()
    log(f"reference log-probs of {len(items)} items computed in {time.perf_counter() - t0:.1f}s -> {path}",
        rank=rank)
    return table


def _export_hf(out: Path, tok: Any, *, rank: int) -> str | None:
    """HF folder for the next stage's rollouts (vLLM / local backend), from the final checkpoint."""
    from megatron_sz.megatron import mcore_to_hf
    from megatron_sz.megatron import training as mt

    from megatron_sz.train import state

    hf = out / "hf"
    mcore_to_hf(str(state.ckpt_root(out)), str(hf), progress=False, overwrite=True)  # rank 0 writes
    if rank == 0:
        tok.save(hf)
        log(f"exported HF checkpoint to {hf}", rank=rank)
    mt.barrier()
    return str(hf)
