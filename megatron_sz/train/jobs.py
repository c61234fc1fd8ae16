"""The three training jobs of a co-evolution round, as one function: ``run_job``.

``run_job(kind, recipe, data_path, init, out_dir)`` runs ``solver-sft``, ``solver-dpo``
or ``generator-wsft`` in this process (world of one) or as one rank of a ``torchrun`` /
``srun`` world (tp * pp * dp processes). It reads as the dataflow of a job:

    records -> items (tokenise, overlong policy) -> train / held-out split -> plan
    model (HF folder, Megatron checkpoint, or random from the recipe) -> optimizer
    resume from out/checkpoint if present
    [dpo] reference log-probs: once per round, from the start-of-round policy, to a file
    eval -> steps (checkpoint every save_interval; on SIGTERM/SIGUSR1: save, exit 75)
    final checkpoint -> eval -> HF export (recipe ``export_hf``) -> summary.json

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

from megatron_sz.data import PreferencePair, Problem, WeightedExample, atomic_write_json, iter_jsonl
from megatron_sz.errors import CheckpointError, DataError, RecipeError, UserError
from megatron_sz.train.preempt import EXIT_PREEMPTED, PreemptionGuard, fault_injection_step

KINDS = ("solver-sft", "solver-dpo", "generator-wsft")


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


# --------------------------------------------------------------------------- recipe


def role_of(kind: str, recipe: Any) -> tuple[Any, Any, Any]:
    """(model spec, parallel spec, train spec) of the role a job trains."""
    if kind == "solver-sft":
        return recipe.solver.model, recipe.solver.parallel, recipe.solver.sft
    if kind == "solver-dpo":
        return recipe.solver.model, recipe.solver.parallel, recipe.solver.dpo
    if kind == "generator-wsft":
        return recipe.generator.model, recipe.generator.parallel, recipe.generator.wsft
    raise RecipeError(f"unknown training job {kind!r}", fix=f"use one of {', '.join(KINDS)}")


# --------------------------------------------------------------------------- data


def _sft_examples(path: Path, recipe: Any):
    """solver-sft input: Problem records (prompt = the solver template, target = reference
    solution ending in \\boxed{answer}) or generic {prompt, completion} records."""
    from megatron_sz.rollout import solver_prompt

    template = recipe.solver.rollout.prompt_template
    for lineno, obj in enumerate(iter_jsonl(path), start=1):
        where = f"{path}:{lineno}"
        if isinstance(obj, dict) and "prompt" in obj:
            completion = obj.get("completion", obj.get("target"))
            if not isinstance(obj["prompt"], str) or not isinstance(completion, str) or not completion.strip():
                raise DataError("a generic SFT record needs string 'prompt' and 'completion' (or 'target')",
                                where=where, fix="add the missing field, or give Problem records")
            yield obj["prompt"], completion, 1.0, lineno
            continue
        from megatron_sz.data import record_from_dict

        prob = record_from_dict(Problem, obj, where=where)
        solution = (prob.solution or "").strip()
        if "\\boxed" not in solution:
            solution = (solution + "\n\n" if solution else "") + f"The answer is $\\boxed{{{prob.answer}}}$."
        yield solver_prompt(prob, template), solution, 1.0, lineno


def load_items(kind: str, path: Path, recipe: Any, spec: Any, tok: Any, *, rank: int = 0):
    from megatron_sz.train.data import tokenize_examples, tokenize_pairs

    path = Path(path)
    if not path.exists():
        raise DataError(f"input file not found: {path}", fix="check --data")
    groups: list[str | None] = []
    if kind == "solver-dpo":
        recs = list(iter_jsonl(path, PreferencePair))
        if not recs:
            raise DataError("the preference-pair file has no pairs", where=str(path),
                            fix="this round produced no (winner, loser) pairs: every problem was "
                                "solved k/k or never; skip solver-dpo for this round or add problems")
        items, stats = tokenize_pairs(((r.prompt, r.chosen, r.rejected, i + 1) for i, r in enumerate(recs)),
                                      tok, max_length=spec.max_length, overlong=spec.overlong)
        kept_lines = {it.line for it in items}
        groups = [r.problem_id for i, r in enumerate(recs) if (i + 1) in kept_lines]
        what = "pairs"
    elif kind == "generator-wsft":
        recs = list(iter_jsonl(path, WeightedExample))
        if not recs:
            raise DataError("the weighted-example file has no examples", where=str(path),
                            fix="the round produced no generator examples; skip generator-wsft")
        items, stats = tokenize_examples(((r.prompt, r.target, r.weight, i + 1) for i, r in enumerate(recs)),
                                         tok, max_length=spec.max_length, overlong=spec.overlong)
        kept_lines = {it.line for it in items}
        groups = [r.problem_id for i, r in enumerate(recs) if (i + 1) in kept_lines]
        _check_weights(recs, spec, path, rank=rank)
        what = "examples"
    else:
        items, stats = tokenize_examples(_sft_examples(path, recipe), tok, max_length=spec.max_length,
                                         overlong=spec.overlong)
        if stats.records == 0:
            raise DataError("the SFT file has no records", where=str(path),
                            fix="give Problem records with reference solutions")
        what = "examples"
    if stats.truncated or stats.dropped_overlong:
        log(f"{stats.truncated + stats.dropped_overlong} of {stats.records} {what} exceed max_length "
            f"{spec.max_length} tokens: {stats.truncated} truncated, {stats.dropped_overlong} dropped "
            f"(overlong: {spec.overlong})", rank=rank)
    if not items:
        raise DataError(f"no {what} left after tokenisation: {stats.dropped_overlong} longer than max_length "
                        f"{spec.max_length} (dropped by overlong: drop), {stats.dropped_empty} empty",
                        where=str(path), fix="raise max_length, or set overlong: truncate")
    return items, stats, groups


def _check_weights(recs: list, spec: Any, path: Path, *, rank: int) -> None:
    """Weights are used as given; warn when a gaussian weight disagrees with the recipe's mu/sigma."""
    from megatron_sz.train.objectives import gaussian_weight

    bad = 0
    for r in recs:
        src = r.weight_source or {}
        s = src.get("success_rate")
        if src.get("kind") == "gaussian" and isinstance(s, (int, float)) and 0 <= s <= 1:
            if abs(gaussian_weight(float(s), spec.mu, spec.sigma) - float(r.weight)) > 1e-6:
                bad += 1
    if bad:
        log(f"warning: {bad} weights in {path} differ from U(s) with the recipe's mu={spec.mu}, "
            f"sigma={spec.sigma}; using the weights in the file", rank=rank)


# --------------------------------------------------------------------------- model source

_ARCH_IGNORE = ("init_std", "torch_dtype", "max_position_embeddings")


def _arch_diff(a: Any, b: Any) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k} {db.get(k)!r} (recipe: {da.get(k)!r})" for k in da
            if k not in _ARCH_IGNORE and da.get(k) != db.get(k)]


def model_source(model_spec: Any, init: str | None, recipe: Any) -> tuple[dict, str, str | None]:
    """(hf config dict, "hf" | "mcore" | "random", path) of the starting weights."""
    from megatron_sz.megatron.arch import parse_hf_config

    expected = None
    if model_spec.config is not None:
        expected = parse_hf_config(dict(model_spec.config), source="recipe model.config")
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
    at the end (held-out NLL, or DPO preference accuracy and reward margin).
    """
    from megatron_sz.recipe import Recipe, load_recipe

    if kind not in KINDS:
        raise RecipeError(f"unknown training job {kind!r}", fix=f"use one of {', '.join(KINDS)}")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    with PreemptionGuard() as guard:
        return _run(kind, recipe, Path(data_path), init, Path(out_dir), guard=guard, ref_path=ref_logps,
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


def _run(kind: str, recipe: Any, data_path: Path, init: str | None, out: Path, *, guard: PreemptionGuard,
         ref_path: str | None, tokenizer_path: str | None, max_steps: int | None,
         eval_path: str | os.PathLike | None = None) -> JobResult:
    import torch

    from megatron_sz import dist
    from megatron_sz import megatron as adapter
    from megatron_sz.megatron import training as mt
    from megatron_sz.tokenizer import load_tokenizer
    from megatron_sz.train import objectives as obj
    from megatron_sz.train import state
    from megatron_sz.train.data import make_plan, split_heldout
    from megatron_sz.train.loop import StepEngine
    from megatron_sz.train.metrics import MetricsLogger, model_flops_per_token, peak_flops
    from megatron_sz.train.schedule import lr_for

    model_spec, par, spec = role_of(kind, recipe)
    if par.sequence_parallel:
        raise RecipeError("sequence_parallel is not supported by the training jobs yet",
                          where="parallel.sequence_parallel", fix="set it to false")
    if par.virtual_pp:
        raise RecipeError("virtual (interleaved) pipeline stages are not supported by the training jobs yet",
                          where="parallel.virtual_pp", fix="remove virtual_pp (1F1B without interleaving is used)")
    if spec.batching == "packed":
        raise RecipeError("batching: packed is not implemented for the training jobs yet",
                          where="train.batching", fix="use length_sorted (pads each micro-batch only to its longest item)")
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
    t_start = time.time()

    # ---- data
    cfg, init_kind, init_path = model_source(model_spec, init, recipe)
    try:
        tok_path = _tokenizer_path(recipe, model_spec, init_kind, init_path, tokenizer_path)
    except RecipeError:
        if not (recipe.tokenizer.kind == "sentencepiece" and recipe.tokenizer.train):
            raise
        tok_path = _train_tokenizer_on_data(recipe, data_path, eval_path, out, rank)
    tok = load_tokenizer(tok_path)
    if tok.vocab_size > cfg["vocab_size"]:
        raise CheckpointError(f"the tokenizer has {tok.vocab_size} ids but the model's vocab_size is "
                              f"{cfg['vocab_size']}", fix="use the tokenizer the model was trained with")
    items, tstats, groups = load_items(kind, data_path, recipe, spec, tok, rank=rank)
    train_items, held = split_heldout(items, fraction=spec.eval_fraction, seed=seed, groups=groups)
    if eval_path is not None:  # a separate held-out file, tokenised the same way
        extra_items, _, _ = load_items(kind, Path(eval_path), recipe, spec, tok, rank=rank)
        for j, it in enumerate(extra_items):
            it.index = len(items) + j  # ids continue after the training file's (one ref table)
        held = held + extra_items
        items = items + extra_items
    all_items = items
    # Re-index the training items' positions for the plan; Item.index stays the global id.
    plan = make_plan(train_items, global_batch_size=spec.global_batch_size, micro_batch_size=spec.micro_batch_size,
                     dp=info.dp, epochs=spec.epochs, max_steps=max_steps or spec.max_steps, seed=seed,
                     batching=spec.batching, sort_window=spec.sort_window)
    total = plan.total_steps
    layout = [info.tp, info.pp, info.dp]
    log(f"{kind}: {len(train_items)} train / {len(held)} held-out items, {total} steps of "
        f"{spec.global_batch_size} (micro-batch {spec.micro_batch_size}, tp={info.tp} pp={info.pp} dp={info.dp})",
        rank=rank)

    # ---- model + optimizer
    params_dtype = torch.float32
    if on_gpu:
        params_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[model_spec.dtype]
    chunks = adapter.build_model(cfg, tp=par.tp, pp=par.pp, params_dtype=params_dtype,
                                 make_vocab_size_divisible_by=model_spec.make_vocab_size_divisible_by,
                                 recompute=None if par.recompute == "none" else par.recompute,
                                 init_weights=init_kind == "random")
    if init_kind == "hf":
        adapter.load_hf_weights(chunks, init_path)
    elif init_kind == "mcore":
        adapter.load_checkpoint(init_path, chunks, None)
    optimizer = mt.make_optimizer(chunks, optim=spec.optim, params_dtype=params_dtype,
                                  use_distributed_optimizer=par.use_distributed_optimizer)
    chunks = optimizer.chunks
    vocab = adapter.true_vocab_size(chunks[0])
    expect = {"kind": kind, "fingerprint": plan.fingerprint, "layout": layout}
    extra = state.resume(out, chunks=chunks, optimizer=optimizer, expect=expect, world_rank=rank)
    start = int(extra["step"]) if extra else 0
    if extra:
        log(f"resumed from {state.ckpt_root(out)} at step {start}/{total}", rank=rank)

    # ---- objective (+ DPO reference log-probs, once per round)
    engine_kw = dict(chunks=chunks, optimizer=optimizer, info=info, pad_id=tok.pad_id if tok.pad_id is not None
                     else tok.eos_id, pad_to_multiple_of=spec.pad_to_multiple_of, device=device)
    kw = dict(tp_group=info.tp_group, vocab_size=vocab)
    ref_table = None
    if kind == "solver-dpo":
        if not (spec.reference_free or spec.loss_type == "simpo"):  # simpo has no reference model
            ref_table = _reference_logps(all_items, out=out, ref_path=ref_path, start=start, spec=spec,
                                         engine=StepEngine(objective=None, **engine_kw), kw=kw, info=info,
                                         rank=rank).to(device)
        objective = obj.DPOObjective(spec=spec, ref_logps=ref_table, **kw)
    elif kind == "generator-wsft":
        objective = obj.WSFTObjective(normalization=spec.normalization, **kw)
    else:
        objective = obj.SFTObjective(normalization=spec.normalization, **kw)
    engine = StepEngine(objective=objective, **engine_kw)

    # ---- logging
    logger = MetricsLogger(out, kind=kind, total_steps=total, start_step=start, enabled=rank == 0,
                           wandb_spec=recipe.wandb, config={"kind": kind, "data": str(data_path)})
    lens = [it.length for it in train_items]
    flops_tok = model_flops_per_token(cfg, sum(lens) / max(1, len(lens)))
    peak = peak_flops()

    def evaluate(step: int) -> dict | None:
        if not held:
            return None
        sums = _eval(engine, objective, held, spec, info)
        if kind == "solver-dpo":
            n = max(1.0, sums["items"])
            res = {"eval_margin": sums["margin"] / n, "eval_accuracy": sums["accuracy"] / n,
                   "eval_chosen_logp": sums["chosen_logp"] / n, "eval_rejected_logp": sums["rejected_logp"] / n}
        else:
            res = {"eval_nll": sums["nll"] / max(1.0, sums["tokens"])}
        logger.log({"type": "eval", "step": step, **res})
        return res

    summary: dict = {"kind": kind, "data": str(data_path), "init": init_path, "init_kind": init_kind,
                     "tokenize": tstats.as_dict(), "dropped_tail": plan.dropped_tail, "train_items": len(train_items),
                     "heldout_items": len(held), "total_steps": total, "layout": {"tp": info.tp, "pp": info.pp,
                                                                                   "dp": info.dp}}
    prev = _read_json(out / "summary.json")
    summary["eval_start"] = prev.get("eval_start") if (extra and prev) else None
    if start == 0:
        summary["eval_start"] = evaluate(0)

    # ---- steps
    fault_at = fault_injection_step()
    step = start
    exit_code = 0
    tok_rates: list[float] = []
    ckpt_path = None
    extra_state = {"kind": kind, "fingerprint": plan.fingerprint, "layout": layout, "total_steps": total,
                   "seed": seed}
    try:
        while step < total:
            if fault_at is not None and step == fault_at and rank == 0:
                import signal

                os.kill(os.getpid(), signal.SIGTERM)
            lr = lr_for(step, total_steps=total, optim=spec.optim)
            groups_ = [[train_items[i] for i in g] for g in plan.microbatches(step, info.dp_rank)]
            try:
                res = engine.train_step(groups_, lr=lr, preempt_requested=guard.requested)
            except UserError as err:
                raise type(err)(f"step {step + 1}/{total}: {err}") from None
            step += 1
            logger.step_time(res.seconds)
            tps = res.stats["tokens"] / max(res.seconds, 1e-9)
            tok_rates.append(tps)
            mfu = (flops_tok * tps / (peak * info.world_size)) if peak else None
            if step % max(1, spec.log_interval) == 0 or step == total or res.preempt:
                rec = {"step": step, "loss": res.stats["loss"], "lr": lr, "grad_norm": res.grad_norm,
                       "tokens": res.stats["tokens"], "tokens_per_s": tps, "mfu": mfu,
                       "step_time_s": res.seconds, "eta_s": logger.eta(step)}
                for k in ("margin", "accuracy", "chosen_reward", "rejected_reward", "weight"):
                    if k in res.stats:
                        rec[k] = res.stats[k]
                logger.log(rec)
            if res.preempt:
                ckpt_path = state.save(out, chunks=chunks, optimizer=optimizer, step=step, extra=extra_state,
                                       world_rank=rank)
                log(f"preempted: checkpoint at step {step}/{total} saved to {ckpt_path}; "
                    f"re-run the same command to resume (exit {EXIT_PREEMPTED})", rank=rank)
                exit_code = EXIT_PREEMPTED
                break
            if spec.save_interval and step % spec.save_interval == 0 and step < total:
                ckpt_path = state.save(out, chunks=chunks, optimizer=optimizer, step=step, extra=extra_state,
                                       world_rank=rank)
            if spec.eval_interval and step % spec.eval_interval == 0 and step < total:
                evaluate(step)
        hf_dir = None
        if exit_code == 0:
            if not (extra and start == total and state.has_checkpoint(out)):
                ckpt_path = state.save(out, chunks=chunks, optimizer=optimizer, step=step, extra=extra_state,
                                       world_rank=rank)
            summary["eval_end"] = evaluate(step)
            if spec.export_hf:
                hf_dir = _export_hf(out, tok, rank=rank)
    finally:
        logger.close()
    summary.update(step=step, exit_code=exit_code, checkpoint=ckpt_path, hf_dir=hf_dir if exit_code == 0 else None,
                   tokens_per_s_mean=(sum(tok_rates) / len(tok_rates)) if tok_rates else None,
                   wall_s=round(time.time() - t_start, 2))
    if rank == 0:
        atomic_write_json(out / "summary.json", summary)
    return JobResult(kind=kind, exit_code=exit_code, step=step, total_steps=total, out_dir=str(out),
                     checkpoint=ckpt_path, hf_dir=summary.get("hf_dir"), summary=summary)


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except Exception:
        return {}


def _chunks_of(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def _my_groups(items: list, spec: Any, info: Any) -> list[list[list]]:
    """Forward-only passes: global-batch-sized chunks, micro-batches dealt round-robin to DP ranks.

    Every DP rank gets the same number of micro-batch slots per chunk (an empty slot
    is skipped); PP stages of one DP rank see the same micro-batches."""
    out = []
    for chunk in _chunks_of(items, spec.global_batch_size):
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

    for groups in _my_groups(held, spec, info):
        sums = engine.forward_only(groups, fn, keys)
        for k in keys:
            total[k] += sums[k]
    return total


def _reference_logps(items: list, *, out: Path, ref_path: str | None, start: int, spec: Any, engine: Any,
                     kw: dict, info: Any, rank: int):
    """The frozen start-of-round policy's summed log-probs of every pair, [N, 2]; computed once."""
    import torch

    from megatron_sz.megatron import training as mt
    from megatron_sz.train import state
    from megatron_sz.train.data import fingerprint
    from megatron_sz.train.objectives import reference_rows

    fp = fingerprint(items, extra="ref")
    path = Path(ref_path) if ref_path else out / "ref_logps.pt"
    if path.exists():
        table = state.load_ref_logps(path, fingerprint=fp, n_items=len(items))
        log(f"reference log-probs: reusing {path}", rank=rank)
        return table
    if ref_path:
        raise CheckpointError(f"--ref-logps {ref_path} does not exist", fix="drop the flag to compute them here")
    if start > 0:
        raise CheckpointError("resuming solver-dpo but the reference log-probs file is gone; the policy has "
                              "moved since the round started, so they cannot be recomputed", where=str(path),
                              fix="restore ref_logps.pt, or restart the job in a fresh --out directory")
    t0 = time.perf_counter()
    table = torch.zeros(len(items), 2, dtype=torch.float32, device=engine.device)
    for groups in _my_groups(items, spec, info):
        for mb, rows in engine.forward_collect(groups, lambda h, w, mb: reference_rows(h, w, mb, **kw)):
            if info.reports:
                table.index_copy_(0, mb.item_index.to(table.device), rows.float())
    mt.all_reduce_sum(table)
    table = table.cpu()
    if rank == 0:
        state.save_ref_logps(path, table, fingerprint=fp, meta={"n_pairs": len(items)})
    mt.barrier()
    log(f"reference log-probs of {len(items)} pairs computed in {time.perf_counter() - t0:.1f}s -> {path}",
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
