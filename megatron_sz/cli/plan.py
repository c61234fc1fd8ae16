"""``megatron-sz plan``: per-GPU memory of a parallel layout, and refusal of impossible ones.

Two ways in:

* ``megatron-sz plan RECIPE [--role ROLE]`` plans every training job of the recipe's system
  (the training stages of its round plan name their job and train section) from the role's
  ``model`` and ``parallel`` sections and the train section's ``max_length`` /
  ``micro_batch_size`` / ``global_batch_size``;
* ``megatron-sz plan --model CONFIG.json --tp 2 --pp 1 --dp 4 --seq 2048 --mbs 1`` plans
  any HF config. Flags given with a recipe override the recipe's values.

A solver DPO micro-batch of N pairs runs 2N sequences (chosen and rejected together),
so the solver's activations use ``2 * micro_batch_size`` sequences.

Pure arithmetic (megatron_sz.planner) over the model shape and layout rules of
megatron_sz.model_shape, the ones the Megatron adapter builds by: a layout that passes
here builds. No torch or Megatron import, so it runs anywhere.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from megatron_sz.errors import LayoutError, UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="per-GPU memory of a TP/PP/DP layout; refuses impossible layouts",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", default=None,
                   help="recipe YAML (path, or name in the packaged recipes/ folder)")
    p.add_argument("--role", default=None,
                   help="plan only this role's training jobs, e.g. solver or generator (default: every "
                        "training job of the recipe's system)")
    p.add_argument("--job", default=None,
                   help="plan only this training job kind, e.g. solver-dpo (see `megatron-sz train --help`)")
    p.add_argument("--model", default=None,
                   help="HF config.json, or a folder holding one (instead of a recipe)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=None, help="pipeline-parallel size")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank (interleaved 1F1B)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel size (or give --world-size)")
    p.add_argument("--world-size", type=int, default=None, help="total GPUs; dp = world / (tp * pp)")
    p.add_argument("--seq", type=int, default=None, help="sequence length in tokens")
    p.add_argument("--mbs", type=int, default=None, help="micro-batch size in sequences")
    p.add_argument("--gbs", type=int, default=None,
                   help="global batch size in sequences; sets the number of micro-batches")
    p.add_argument("--num-microbatches", type=int, default=None,
                   help="micro-batches per step per DP rank (default: from --gbs, else assume a full pipeline)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="training dtype (default bf16)")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default=None,
                   help="activation recomputation (default none)")
    sp = p.add_mutually_exclusive_group()
    sp.add_argument("--sequence-parallel", dest="sequence_parallel", action="store_true", default=None,
                    help="turn on Megatron sequence parallelism (needs tp >= 2)")
    sp.add_argument("--no-sequence-parallel", dest="sequence_parallel", action="store_false",
                    help="turn off sequence parallelism")
    do = p.add_mutually_exclusive_group()
    do.add_argument("--distributed-optimizer", dest="distributed_optimizer", action="store_true", default=None,
                    help="shard optimizer state over DP ranks (the default)")
    do.add_argument("--no-distributed-optimizer", dest="distributed_optimizer", action="store_false",
                    help="keep the whole optimizer state on every rank")
    p.add_argument("--materialised-logits", action="store_true",
                   help="count the loss as materialised logits instead of the fused linear loss")
    p.add_argument("--attention", choices=("flash", "unfused"), default="flash",
                   help="flash/fused attention (no s*s scores stored) or unfused (default flash)")
    p.add_argument("--vocab-divisible-by", type=int, default=None,
                   help="Megatron make_vocab_size_divisible_by (default 128, or the recipe's)")
    p.add_argument("--gpu-mem", type=float, default=None, help="GPU memory in GiB: report whether the plan fits")
    p.add_argument("--json", action="store_true", help="print a JSON document instead of the table")
    p.set_defaults(func=run)


def _pick(flag, value):
    return value if flag is None else flag


def _batch_error(job: dict, src: dict | None, err: LayoutError) -> LayoutError:
    if not src or not str(err.where or "").endswith(".global_batch_size"):
        return err
    dp = job["dp"] or job["world_size"] // (job["tp"] * job["pp"])
    per = src["micro_batch_size"] * dp
    up = -(-src["global_batch_size"] // per) * per
    return LayoutError(f"global_batch_size {src['global_batch_size']} {src['unit']} is not divisible by "
                       f"micro_batch_size*dp = {src['micro_batch_size']}*{dp} = {per}", where=src["where"],
                       fix=f"use a multiple of {per} (e.g. {up}), or another dp")


def training_jobs(recipe) -> list[tuple[str, Any, str, str, Any]]:
    """The distinct training jobs of a recipe's system, from its round plans (rounds 0 and 1):
    (role, job spec, kind, section name, train spec), in plan order. The system's stages say
    which job they run (``Stage.job``) and with which train section (``Stage.train_spec``)."""
    from megatron_sz.round import plan_round
    from megatron_sz.train.jobs import job_spec

    out, seen = [], set()
    for t in range(min(2, max(1, recipe.rounds))):
        for s in plan_round(recipe, t):
            if not s.train or not s.job:
                continue
            spec = job_spec(s.job)
            train = s.train_spec if s.train_spec is not None else getattr(getattr(recipe, s.role), spec.section)
            name = _section_name(recipe, train) or f"{s.role}.{spec.section}"
            if (s.role, s.job, name) in seen:
                continue
            seen.add((s.role, s.job, name))
            out.append((s.role, spec, s.job, name, train))
    return out


def _section_name(recipe, train) -> str | None:
    """The dotted recipe path of a train section object (for messages), e.g. solver.dpo."""
    import dataclasses

    for top in dataclasses.fields(recipe):
        sec = getattr(recipe, top.name)
        if not dataclasses.is_dataclass(sec):
            continue
        for f in dataclasses.fields(sec):
            if getattr(sec, f.name) is train:
                return f"{top.name}.{f.name}"
    return None


def _recipe_jobs(args) -> list[dict]:
    from megatron_sz.data import PreferencePair
    from megatron_sz.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    jobs = []
    for role, spec, kind, section_name, train in training_jobs(recipe):
        if (args.role and role != args.role) or (args.job and kind != args.job):
            continue
        section = getattr(recipe, role)
        where = f"{recipe.source}: {role}.parallel"
        cfg = section.model.hf_config(recipe, where=f"{where}.model")
        par = section.parallel
        seqs_per_mb = 2 if spec.record is PreferencePair else 1  # DPO: chosen + rejected
        mbs = _pick(args.mbs, train.micro_batch_size * seqs_per_mb)
        gbs = _pick(args.gbs, train.global_batch_size * seqs_per_mb)
        seq = train.max_length
        packed = getattr(train, "batching", None) == "packed"
        if packed:
            # one micro-batch = one packed row of pack_length tokens (THD, batch 1); how many
            # rows a step needs depends on the lengths, so the count here is an upper bound
            seq = train.pack_length or train.max_length * seqs_per_mb
            mbs = _pick(args.mbs, 1)
            gbs = _pick(args.gbs, train.global_batch_size)
        # The planner counts sequences; batch errors are reported in the recipe's own fields and
        # units (a DPO pair is two sequences), not as DPO-doubled numbers of solver.parallel.
        batch_source = None if (args.mbs or args.gbs) else dict(
            where=f"{recipe.source}: {section_name}.global_batch_size", unit=spec.unit,
            micro_batch_size=train.micro_batch_size, global_batch_size=train.global_batch_size)
        jobs.append(dict(
            batch_source=None if packed else batch_source, hf_config=cfg,
            label=f"{recipe.name} / {role} ({kind}, {section_name}"
                  + (f", packed rows of {seq} tokens" if packed else "") + ")",
            where=where,
            tp=_pick(args.tp, par.tp), pp=_pick(args.pp, par.pp),
            virtual_pp=_pick(args.vpp, par.virtual_pp),
            world_size=None if args.dp is not None else _pick(args.world_size, par.world_size),
            dp=args.dp, seq_len=_pick(args.seq, seq), micro_batch_size=mbs,
            global_batch_size=None if args.num_microbatches is not None else gbs,
            num_microbatches=args.num_microbatches,
            dtype=_pick(args.dtype, section.model.dtype),
            recompute=_pick(args.recompute, par.recompute),
            sequence_parallel=_pick(args.sequence_parallel, par.sequence_parallel),
            distributed_optimizer=_pick(args.distributed_optimizer, par.use_distributed_optimizer),
            vocab_divisible_by=_pick(args.vocab_divisible_by, section.model.make_vocab_size_divisible_by),
        ))
    return jobs


def run(args) -> int:
    from megatron_sz.planner import plan_layout

    if (args.recipe is None) == (args.model is None):
        raise UserError("give either a RECIPE or --model CONFIG.json",
                        fix="e.g. megatron-sz plan recipes/qwen3-8b-solver-tp2-8gpu.yaml, or "
                            "megatron-sz plan --model recipes/models/qwen3-8b.json --tp 2 --seq 2048")
    if args.recipe is not None:
        jobs = _recipe_jobs(args)
        if not jobs:
            raise UserError(f"{args.recipe}: no training job to plan"
                            + (f" for --role {args.role}" if args.role else "")
                            + (f" --job {args.job}" if args.job else ""),
                            fix="drop --role/--job, or check that the system's training stages name their job")
    else:
        from megatron_sz.model_shape import read_hf_config

        cfg = read_hf_config(args.model)
        jobs = [dict(hf_config=cfg, label=str(args.model), where="flags",
                     tp=args.tp or 1, pp=args.pp or 1, virtual_pp=args.vpp, dp=args.dp,
                     world_size=args.world_size, seq_len=args.seq or 2048, micro_batch_size=args.mbs or 1,
                     global_batch_size=args.gbs, num_microbatches=args.num_microbatches,
                     dtype=args.dtype or "bf16", recompute=args.recompute or "none",
                     sequence_parallel=bool(args.sequence_parallel),
                     distributed_optimizer=True if args.distributed_optimizer is None else args.distributed_optimizer,
                     vocab_divisible_by=args.vocab_divisible_by or 128)]
    plans = []
    for job in jobs:
        batch_source = job.pop("batch_source", None)
        try:
            plans.append(plan_layout(**job, fused_loss=not args.materialised_logits, attention=args.attention,
                                     gpu_memory_gib=args.gpu_mem))
        except LayoutError as err:
            err = _batch_error(job, batch_source, err)
            if len(jobs) > 1:
                raise LayoutError(f"{job['label']}: {err}") from None
            raise err from None
    if args.json:
        doc = plans[0].to_dict() if len(plans) == 1 else {"plans": [p.to_dict() for p in plans]}
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print("\n\n".join(p.format_text() for p in plans))
    if any(p.fits is False for p in plans):
        # A plan that does not fit the GPU the user named is a failed check, not a report (issue 20).
        print(f"error: the layout does not fit in --gpu-mem {args.gpu_mem:g} GiB (see the table above)",
              file=sys.stderr)
        return 1
    return 0
