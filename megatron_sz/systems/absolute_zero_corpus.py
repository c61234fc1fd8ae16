"""Absolute Zero's round-0 inputs and its report: held-out triplets, the warm-up corpus,
the seed buffers, per-round metrics and the plot.

What is unusual here: the warm-up corpus is *generated*, not read. Small programs come from
templates (``absolute_zero_tasks.TEMPLATES``), their inputs are sampled, and every output
is computed by running the program in the sandbox; so the tiny model learns the formats of
both roles (it writes parseable programs) without any dataset. Held-out triplets come from
the same templates with a disjoint seed, and no program of the held-out set appears in the
warm-up corpus (the rounds must generalise to unseen instances). The seed buffers go
through the same validation as a proposal (``validate_proposals``), so a user's seed file
gets its outputs from the sandbox too.
"""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from megatron_sz.data import AzrProposal, AzrTask, AzrValidation, WeightedExample, read_jsonl, write_jsonl
from megatron_sz.errors import DataError
from megatron_sz.systems import absolute_zero_tasks as T


def _outputs(pairs: list[tuple[str, str]], spec) -> list[str | None]:
    """repr of f(input) for each (program, input), computed in the sandbox (None: it failed).
    One execution per program evaluates all of its inputs (template programs are ours)."""
    import ast

    from megatron_sz import sandbox
    from megatron_sz.sandbox import Task

    by_prog: dict[str, list[str]] = {}
    for p, i in pairs:
        by_prog.setdefault(p, []).append(i)
    progs = list(by_prog)
    res = sandbox.run_batch([Task(p, expr="[" + ", ".join(f"f({i})" for i in by_prog[p]) + "]",
                                  timeout=spec.timeout_s, memory=512 << 20) for p in progs])
    values: dict[tuple[str, str], str] = {}
    for p, r in zip(progs, res):
        if r.ok and T.literal_ok(r.value_repr):
            for i, v in zip(by_prog[p], ast.literal_eval(r.value_repr)):
                values[(p, i)] = repr(v)
    return [values.get(pair) for pair in pairs]


def _instances(n: int, seed: int, n_inputs: int, exclude_programs: set[str]) -> list[tuple[str, str, list[str]]]:
    """n distinct template programs (program, description, inputs)."""
    rng = random.Random(seed)
    out, seen = [], set(exclude_programs)
    for _ in range(50 * n):
        if len(out) == n:
            break
        prog, kind, desc = T.template_program(rng)
        if prog in seen:
            continue
        ins = T.template_inputs(kind, n_inputs, rng)
        if len(ins) < n_inputs:
            continue
        seen.add(prog)
        out.append((prog, desc, ins))
    return out


def _tasks_from(insts, spec, *, task_type: str, prefix: str, provenance: str) -> list[AzrTask]:
    """AzrTasks of one type from template instances, outputs from the sandbox."""
    if task_type == "induction":
        pairs = [(p, i) for p, _, ins in insts for i in ins]
    else:
        pairs = [(p, ins[0]) for p, _, ins in insts]
    outs = iter(_outputs(pairs, spec))
    tasks = []
    for j, (p, desc, ins) in enumerate(insts):
        if task_type == "induction":
            os_ = [next(outs) for _ in ins]
            if any(o is None for o in os_):
                continue
            tasks.append(AzrTask(id=f"{prefix}-{task_type}-{j}", task_type=task_type, program=p, inputs=list(ins),
                                 outputs=os_, shown=len(ins) // 2, message=desc, provenance=provenance))
        else:
            o = next(outs)
            if o is not None:
                tasks.append(AzrTask(id=f"{prefix}-{task_type}-{j}", task_type=task_type, program=p, input=ins[0],
                                     output=o, provenance=provenance))
    return tasks


def build_corpus(ctx, heldout_of) -> dict:
    """prepare/azr-heldout.jsonl, prepare/azr-sft.jsonl and the tokenizer (each once)."""
    r, A, pdir = ctx.recipe, ctx.recipe.azr, ctx.rd.prepare_dir
    pdir.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    held_path = pdir / "azr-heldout.jsonl"
    if not held_path.exists():
        held: list[AzrTask] = []
        insts = _instances(A.heldout_per_type * len(A.task_types), r.seed + 7919, max(2, A.induction_inputs),
                           {T.ZERO_PROGRAM})
        for n, tt in enumerate(A.task_types):
            part = insts[n::len(A.task_types)]
            held += _tasks_from(part, A, task_type=tt, prefix="held", provenance="heldout")
        write_jsonl(held_path, held)
        ctx.log(f"prepare: {len(held)} held-out triplets")
    held = read_jsonl(held_path, AzrTask)
    info["heldout"] = len(held)

    sft_path = pdir / "azr-sft.jsonl"
    if not sft_path.exists():
        examples = warmup_examples(ctx, {h.program for h in held}) if A.warmup_programs else []
        examples, info["heldout_filtered_warmup"] = heldout_of(ctx).filter(examples, lambda e: (e.prompt, e.target))
        write_jsonl(sft_path, examples)
    info["sft_examples"] = sum(1 for _ in open(sft_path, encoding="utf-8"))

    tok_dir = pdir / "tokenizer"
    if r.tokenizer.kind == "sentencepiece" and r.tokenizer.train and not (tok_dir / "tokenizer.model").exists():
        from megatron_sz.tokenizer import train_sentencepiece

        texts = [T.propose_prompt(tt, [_zero(tt)]) for tt in T.TASK_TYPES]
        texts += [T.solve_prompt(_zero(tt)) + T.solve_target(_zero(tt)) for tt in T.TASK_TYPES]
        for o in read_jsonl(sft_path):
            texts += [o["prompt"], o["target"]]
        train_sentencepiece(texts, tok_dir, vocab_size=r.tokenizer.vocab_size, seed=r.seed)
    if tok_dir.exists():
        info["tokenizer"] = str(tok_dir)
    return info


def _zero(tt: str) -> AzrTask:
    if tt == "induction":
        return AzrTask(id="zero-induction", task_type=tt, program=T.ZERO_PROGRAM, inputs=list(T.ZERO_INDUCTION_INPUTS),
                       outputs=list(T.ZERO_INDUCTION_INPUTS), shown=2, message="identity", provenance="zero")
    return AzrTask(id=f"zero-{tt}", task_type=tt, program=T.ZERO_PROGRAM, input=T.ZERO_INPUT, output=T.ZERO_INPUT,
                   provenance="zero")


def warmup_examples(ctx, held_programs: set[str]) -> list[WeightedExample]:
    """Solver and proposer examples of every task type from ``azr.warmup_programs`` templates."""
    r, A = ctx.recipe, ctx.recipe.azr
    n_in = max(2, A.induction_inputs)
    insts = _instances(A.warmup_programs, r.seed + 104729, n_in + 2, held_programs | {T.ZERO_PROGRAM})
    ded = _tasks_from([(p, d, [ins[0]]) for p, d, ins in insts], A, task_type="deduction", prefix="warm",
                      provenance="warmup")
    abd = _tasks_from([(p, d, [ins[1]]) for p, d, ins in insts], A, task_type="abduction", prefix="warm",
                      provenance="warmup")
    ind = _tasks_from([(p, d, ins[2:]) for p, d, ins in insts], A, task_type="induction", prefix="warm",
                      provenance="warmup")
    rng = random.Random(r.seed + 15)
    ex: list[WeightedExample] = []
    pools = {"deduction": [_zero("deduction")] + ded, "abduction": [_zero("abduction")] + abd}
    for tt, tasks in (("deduction", ded), ("abduction", abd), ("induction", ind)):
        if tt not in A.task_types:
            continue
        for task in tasks:
            ex.append(WeightedExample(prompt=T.solve_prompt(task), target=T.solve_target(task), weight=1.0,
                                      problem_id=task.id))
            if tt == "induction":
                prompt = T.propose_prompt(tt, [task])
                target = T.propose_target(tt, task.program, task.inputs, task.message)
            else:
                refs = T.sample_references([x for x in pools[tt] if x.id != task.id], A.references, rng)
                prompt = T.propose_prompt(tt, refs)
                target = T.propose_target(tt, task.program, [task.input])
            ex.append(WeightedExample(prompt=prompt, target=target, weight=1.0, problem_id=f"{task.id}:propose"))
    rng.shuffle(ex)
    ctx.log(f"prepare: warm-up corpus of {len(ex)} examples from {len(insts)} template programs")
    return ex


def seed_buffers(ctx) -> dict:
    """rounds/r000/buffer-*.jsonl: the zero triplet, or ``azr.seed_file``, validated in the sandbox."""
    A = ctx.recipe.azr
    paths = {tt: ctx.rd.round_dir(0) / f"buffer-{tt}.jsonl" for tt in T.TASK_TYPES}
    if all(p.exists() for p in paths.values()):
        return {"buffer_sizes": {tt: sum(1 for _ in open(p)) for tt, p in paths.items()}}
    if A.seed_file:
        src = ctx.recipe.resolve_path(A.seed_file)
        if src is None or not src.is_file():
            raise DataError(f"azr.seed_file not found: {A.seed_file}", where="azr.seed_file",
                            fix="point it at a JSONL of AzrTask records (id, task_type, program, input or inputs)")
        seeds = read_jsonl(src, AzrTask)
    else:
        seeds = [_zero(tt) for tt in T.TASK_TYPES]
    props = [AzrProposal(key=s.id, task_type=s.task_type, prompt="seed", completion="", program=s.program,
                         input=s.input, inputs=s.inputs, message=s.message or "seed") for s in seeds]
    vals = T.validate_proposals(props, A, round=0)
    bufs: dict[str, list[AzrTask]] = {tt: [] for tt in T.TASK_TYPES}
    bad = Counter()
    for s, v in zip(seeds, vals):
        if v.status != "valid":
            bad[v.status] += 1
            ctx.log(f"prepare: seed {s.id} rejected ({v.status}: {v.reason})")
            continue
        task = v.task
        task.id, task.provenance, task.parents = s.id, ("zero" if s.id.startswith("zero-") else "seed"), []
        bufs[s.task_type].append(task)
    for tt in T.TASK_TYPES:
        if not bufs[tt]:  # a type with no valid seed starts from the zero triplet
            bufs[tt] = [_zero(tt)]
    for tt in T.TASK_TYPES:  # written last: the stage's real output
        write_jsonl(paths[tt], bufs[tt])
    return {"buffer_sizes": {tt: len(b) for tt, b in bufs.items()}, "seeds_rejected": dict(bad)}


# --------------------------------------------------------------------------- report


def _files(d: Path) -> list[Path]:
    return sorted(d.glob("shard-*.jsonl")) if d.is_dir() else []


def round_metrics(rd, t: int, recipe) -> dict:
    rdir = rd.round_dir(t)
    m: dict = {"round": t}
    if t == 0:
        e = rd.read_marker(0, "eval_sft")
        m["accuracy_sft"] = e.get("accuracy") if e else None
        m["well_formed_sft"] = e.get("well_formed") if e else None
    vals = [v for f in _files(rdir / "validate") for v in read_jsonl(f, AzrValidation, allow_partial_tail=True)]
    by = Counter(v.status for v in vals)
    m["validity"] = dict(sorted(by.items()))
    m["validity_rate"] = round(by["valid"] / len(vals), 4) if vals else None
    per_type: dict[str, dict] = {}
    for tt in T.TASK_TYPES:
        vt = [v for v in vals if v.task_type == tt]
        if vt:
            per_type[tt] = round(sum(v.status == "valid" for v in vt) / len(vt), 4)
    m["validity_by_type"] = per_type
    rw = rd.read_marker(t, "rewards") or {}
    m["learnability_hist"] = rw.get("learnability_hist")
    m["reward_mean"] = rw.get("reward_mean")
    m["train_accuracy"] = rw.get("train_accuracy")
    m["heldout_filtered"] = rw.get("heldout_filtered")
    b = rd.read_marker(t, "buffer") or {}
    m["buffer_sizes"] = b.get("sizes")
    m["buffer_added"] = b.get("added")
    e = rd.read_marker(t, "eval") or {}
    m["accuracy"] = e.get("accuracy")
    m["well_formed"] = e.get("well_formed")
    tr = rd.read_marker(t, "train") or {}
    m["train"] = {"skipped": tr.get("skipped"), **(tr.get("summary") or {})}
    return m


def plot(rows: list[dict], path: Path) -> None:
    """Four panels: proposal validity, held-out accuracy per type (warm-up at -0.5),
    buffer sizes, mean reward per (task, role) baseline."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    rounds = [r["round"] for r in rows]
    a = ax[0][0]
    a.plot(rounds, [r.get("validity_rate") or 0 for r in rows], marker="o", color="black", label="all")
    for tt in T.TASK_TYPES:
        a.plot(rounds, [(r.get("validity_by_type") or {}).get(tt, 0) for r in rows], marker=".", label=tt)
    a.set_title("Proposal validity")
    a.set_xlabel("round")
    a.legend(fontsize=8)
    a = ax[0][1]
    for tt in T.TASK_TYPES:
        xs, ys = [], []
        for r in rows:
            if r.get("accuracy_sft") and tt in r["accuracy_sft"]:
                xs.append(-0.5)
                ys.append(r["accuracy_sft"][tt])
            if r.get("accuracy") and tt in r["accuracy"]:
                xs.append(r["round"])
                ys.append(r["accuracy"][tt])
        a.plot(xs, ys, marker="o", label=tt)
    a.set_title("Held-out solver accuracy (-0.5: after warm-up)")
    a.set_xlabel("round")
    a.legend(fontsize=8)
    a = ax[1][0]
    for tt in T.TASK_TYPES:
        a.plot(rounds, [(r.get("buffer_sizes") or {}).get(tt, 0) for r in rows], marker="o", label=tt)
    a.set_title("Buffer sizes (end of round)")
    a.set_xlabel("round")
    a.legend(fontsize=8)
    a = ax[1][1]
    keys = sorted({k for r in rows for k in (r.get("reward_mean") or {})})
    for k in keys:
        a.plot(rounds, [(r.get("reward_mean") or {}).get(k) for r in rows], marker=".", label=k)
    a.set_title("Mean reward per (task, role)")
    a.set_xlabel("round")
    a.legend(fontsize=7)
    for row in ax:
        for a in row:
            a.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
