"""Ablations: named variants of a recipe, several seeds each, equal compute, bootstrap intervals.

``megatron-sz ablate RECIPE`` (``cli/ablate.py``) drives this module. Layout of an ablation
folder (every variant x seed is an ordinary, resumable run directory)::

    OUT/
      ablation.yaml           what was asked: recipe, variants, seeds, k, step budget
      recipes/<v>-s<seed>.yaml  the variant recipes (the base recipe + overrides)
      runs/<v>-s<seed>/       one run directory each (megatron-sz evolve / submit)
      samples.jsonl           per variant / seed / problem / sample correctness (final round)
      accounting.jsonl        per variant / seed / training stage: optimizer steps, tokens
      ablation.json ablation.md ablation.png

**Variants** come from the recipe's system module: ``ABLATIONS`` (variant -> dotted recipe
overrides) and ``ABLATION_BUDGET`` (training sections whose per-round step count is fixed).
A system without ``ABLATIONS`` offers only ``full``.

**Equal compute** (the solver, the model whose accuracy is compared): every budget section
gets ``max_steps = --round-steps`` and enough epochs to reach it, so each round's solver
update runs exactly that many optimizer steps whatever its data; SFT round updates train
two sequences per step where DPO trains a pair. The report counts, from each training
stage's ``metrics.jsonl``, the optimizer steps and the tokens trained, per role,
and states for every variant whether they match ``full``.

**Intervals**: a two-level percentile bootstrap. Each resample draws the seeds with
replacement, then within each drawn seed the held-out problems with replacement; a
problem's score is its mean over the k samples. The difference to ``full`` is paired: the
same seeds and problem indices are drawn for both (a seed's held-out set is the same in
every variant). ``samples.jsonl`` holds every sample, so the intervals can be recomputed.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_sz.errors import UserError

BOOTSTRAP = 10000
CONFIDENCE = 0.95


# --------------------------------------------------------------------------- variants


def system_module(system: str):
    import importlib

    from megatron_sz.systems import get_system

    get_system(system)  # a clear error for an unknown system
    return importlib.import_module(f"megatron_sz.systems.{system.replace('-', '_')}")


def system_variants(system: str) -> dict[str, dict]:
    mod = system_module(system)
    return dict(getattr(mod, "ABLATIONS", None) or {"full": {}})


def budget_sections(system: str) -> tuple[str, ...]:
    return tuple(getattr(system_module(system), "ABLATION_BUDGET", ()))


@dataclass
class Run:
    variant: str
    seed: int
    recipe: Path
    run_dir: Path

    @property
    def tag(self) -> str:
        return f"{self.variant}-s{self.seed}"


@dataclass
class Ablation:
    out: Path
    source: str
    system: str
    variants: list[str]
    seeds: list[int]
    k: int
    temperature: float
    round_steps: int | None
    rounds: int
    runs: list[Run] = field(default_factory=list)


def _absolutize(node, base: Path):
    """Relative paths of the base recipe that exist next to it, made absolute (the variant
    recipes live in another folder)."""
    if isinstance(node, dict):
        return {k: _absolutize(v, base) for k, v in node.items()}
    if isinstance(node, list):
        return [_absolutize(v, base) for v in node]
    if isinstance(node, str) and node and "\n" not in node and not Path(node).is_absolute() and len(node) < 300:
        try:
            cand = base / node
            if cand.exists() and node not in (".", ".."):
                return str(cand.resolve())
        except OSError:
            pass
    return node


def _set(data: dict, dotted: str, value) -> None:
    node = data
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def variant_overrides(recipe, system: str, variant: str, *, seed: int, k: int, temperature: float,
                      round_steps: int | None) -> dict:
    """Every override a variant run gets: the shared protocol (seed, k-sample eval at the
    recipe's temperature, the fixed step budget), then the variant's own."""
    table = system_variants(system)
    if variant not in table:
        raise UserError(f"system {system} has no ablation variant {variant!r}", where="--variants",
                        fix=f"use some of: {', '.join(table)}")
    ov: dict = {"seed": seed, "name": f"{recipe.name}-{variant}-s{seed}", "run_dir": None,
                "eval.enabled": True, "eval.k": k, "eval.sampling.temperature": temperature}
    if round_steps is not None:
        for sec in budget_sections(system):
            ov[f"{sec}.max_steps"] = round_steps
            ov[f"{sec}.epochs"] = 1000  # enough passes to reach max_steps on any round's data
    ov.update(table[variant])
    return ov


def setup(recipe_path: str, out: str | Path, *, variants: list[str] | None, seeds: list[int], k: int,
          round_steps: int | None, rounds: int | None = None) -> Ablation:
    """Write (or re-check) OUT/ablation.yaml and the variant recipes; nothing runs."""
    import yaml

    from megatron_sz.paths import resolve_resource
    from megatron_sz.recipe import load_recipe

    src = resolve_resource(recipe_path, "recipes")
    recipe = load_recipe(src)
    system = recipe.system
    table = system_variants(system)
    variants = variants or list(table)
    for v in variants:
        if v not in table:
            raise UserError(f"system {system} has no ablation variant {v!r}", where="--variants",
                            fix=f"use some of: {', '.join(table)}")
    if "full" not in variants:
        variants = ["full"] + variants  # the reference every difference is taken to
    if k < 1 or not seeds:
        raise UserError("need k >= 1 and at least one seed", fix="pass --k 4 --seeds 3")
    if round_steps is None and budget_sections(system):
        secs = [_get(recipe, s) for s in budget_sections(system)]
        round_steps = next((s.max_steps for s in secs if s.max_steps), None)
        if round_steps is None:
            raise UserError("equal compute needs a fixed step budget per round", where="--round-steps",
                            fix="pass --round-steps N (every variant's round update then runs N optimizer steps)")
    temperature = recipe.solver.rollout.sampling.temperature
    n_rounds = recipe.rounds if rounds is None else rounds
    ab = Ablation(Path(out).resolve(), str(Path(src).resolve()), system, variants, list(seeds), k, temperature,
                  round_steps, n_rounds)
    spec = {"recipe": ab.source, "system": system, "variants": variants, "seeds": ab.seeds, "k": k,
            "temperature": temperature, "round_steps": round_steps, "rounds": n_rounds}
    ab.out.mkdir(parents=True, exist_ok=True)
    frozen = ab.out / "ablation.yaml"
    if frozen.exists():
        old = yaml.safe_load(frozen.read_text(encoding="utf-8")) or {}
        same = {key: old.get(key) for key in ("recipe", "k", "round_steps", "rounds")}
        if same != {key: spec[key] for key in same}:
            raise UserError(f"ablation folder {ab.out} was made with other settings ({same})", where=str(frozen),
                            fix="rerun with the same recipe, --k, --round-steps and --rounds, or pass a new --out")
        spec["variants"] = list(dict.fromkeys(list(old.get("variants") or []) + variants))
        spec["seeds"] = sorted(set(old.get("seeds") or []) | set(ab.seeds))
    frozen.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    base = yaml.safe_load(Path(src).read_text(encoding="utf-8"))
    base = _absolutize(base, Path(src).resolve().parent)
    (ab.out / "recipes").mkdir(exist_ok=True)
    for v in variants:
        for s in seeds:
            data = json.loads(json.dumps(base))
            for key, val in variant_overrides(recipe, system, v, seed=s, k=k, temperature=temperature,
                                              round_steps=round_steps).items():
                _set(data, key, val)
            data["rounds"] = n_rounds
            data.pop("run_dir", None)
            path = ab.out / "recipes" / f"{v}-s{s}.yaml"
            text = (f"# ablation variant {v}, seed {s} of {ab.source} (megatron-sz ablate)\n"
                    + yaml.safe_dump(data, sort_keys=False))
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                if (ab.out / "runs" / f"{v}-s{s}" / "recipe.yaml").exists():
                    raise UserError(f"variant recipe {path} changed under an existing run", where=str(path),
                                    fix="use a new --out for a changed base recipe")
                path.write_text(text, encoding="utf-8")
            load_recipe(path)  # validated before anything runs
            ab.runs.append(Run(v, s, path, ab.out / "runs" / f"{v}-s{s}"))
    return ab


def _get(recipe, dotted: str):
    obj = recipe
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------- running


def run_complete(run: Run) -> bool:
    """Every stage of every round has its completion marker."""
    from megatron_sz.executor import stage_done
    from megatron_sz.recipe import load_recipe
    from megatron_sz.round import plan_round
    from megatron_sz.rundir import RunDir

    if not (run.run_dir / "recipe.yaml").exists():
        return False
    recipe = load_recipe(run.recipe)
    rd = RunDir(run.run_dir)
    return all(stage_done(rd, t, s) for t in range(recipe.rounds) for s in plan_round(recipe, t))


def _fmt(s: float) -> str:
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def run_all(ab: Ablation, *, executor: str = "local", log=print) -> list[Run]:
    """Run (local) or submit (slurm) every unfinished variant x seed; returns those not complete."""
    import os

    # seed-major: every variant of the first seed before the next seed, so an interrupted
    # ablation already holds paired comparisons
    order = {v: i for i, v in enumerate(ab.variants)}
    todo = sorted((r for r in ab.runs if not run_complete(r)), key=lambda r: (ab.seeds.index(r.seed), order[r.variant]))
    done = len(ab.runs) - len(todo)
    log(f"ablate: {len(ab.runs)} runs ({len(ab.variants)} variants x {len(ab.seeds)} seeds), "
        f"{done} already complete, {len(todo)} to {'run' if executor == 'local' else 'submit'}")
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    times: list[float] = []
    left: list[Run] = []
    t0 = time.time()
    for i, run in enumerate(todo, 1):
        eta = f", ETA {_fmt(sum(times) / len(times) * (len(todo) - i + 1))}" if times else ""
        log(f"ablate [{i}/{len(todo)}] {run.tag} -> {run.run_dir} (elapsed {_fmt(time.time() - t0)}{eta})")
        cmd = "evolve" if executor == "local" else "submit"
        argv = [sys.executable, "-m", "megatron_sz", cmd, str(run.recipe), "--run-dir", str(run.run_dir)]
        if executor == "local":
            argv.append("--no-progress")
        s0 = time.time()
        log_path = ab.out / "logs" / f"{run.tag}.log"
        log_path.parent.mkdir(exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as fh:
            code = subprocess.call(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)
        if code != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise UserError(f"run {run.tag} failed (exit {code}); its log: {log_path}\n{tail}",
                            where=str(run.run_dir), fix="fix the cause and rerun the same ablate command (it resumes)")
        times.append(time.time() - s0)
        log(f"ablate [{i}/{len(todo)}] {run.tag} {'done' if executor == 'local' else 'submitted'} "
            f"in {_fmt(times[-1])}")
        if executor != "local":
            left.append(run)
    return left


# --------------------------------------------------------------------------- records


def _records(path: Path) -> list[dict]:
    """An eval file's records, one per (problem, sample): a partial line left by a kill (the
    keyed append resumed after it) is skipped, a sample written twice counts once."""
    out: dict = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            o = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(o, dict) and "problem_id" in o:
            out[(o["problem_id"], int(o.get("sample_index") or 0))] = o
    return list(out.values())


def final_samples(run: Run, rounds: int) -> list[dict]:
    """The final round's held-out samples of a run, one record per sample."""
    path = run.run_dir / "rounds" / f"r{rounds - 1:03d}" / "eval.jsonl"
    if not path.exists():
        return []
    out = []
    for o in _records(path):
        out.append({"variant": run.variant, "seed": run.seed, "round": rounds - 1, "problem_id": o["problem_id"],
                    "sample_index": int(o.get("sample_index") or 0), "correct": o.get("correct") is True})
    return out


def round_accuracies(run: Run, rounds: int) -> list[float | None]:
    """Held-out mean@k after the warm-up (index 0) and after each round."""
    def acc(path: Path):
        if not path.exists():
            return None
        rows = _records(path)
        return sum(r.get("correct") is True for r in rows) / len(rows) if rows else None

    base = run.run_dir / "rounds"
    return [acc(base / "r000" / "eval_sft.jsonl")] + [acc(base / f"r{t:03d}" / "eval.jsonl") for t in range(rounds)]


def training_accounting(run_dir: Path) -> list[dict]:
    """Per training stage of a run: role, optimizer steps and tokens trained, read
    from the stage's metrics.jsonl (a step logged twice across a resume counts once)."""
    out = []
    rounds = run_dir / "rounds"
    if not rounds.exists():
        return out
    for metrics in sorted(rounds.glob("r*/*/metrics.jsonl")):
        stage, rnd = metrics.parent.name, metrics.parent.parent.name
        summary = metrics.parent / "summary.json"
        kind = json.loads(summary.read_text(encoding="utf-8")).get("kind") if summary.exists() else None
        steps: dict[int, dict] = {}
        for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                o = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(o, dict) and "step" in o and "loss" in o and "tokens" in o:
                steps[int(o["step"])] = o
        # A stage whose every step ran at lr 0 trained nothing (no-warmup's export of the initial
        # weights); otherwise every logged step is an optimizer step (a cosine schedule's last
        # step may itself run at min_lr = 0).
        trained = list(steps.values()) if any((o.get("lr") or 0) > 0 for o in steps.values()) else []
        role = "generator" if (kind or "").startswith("generator") else "solver"
        out.append({"round": int(rnd[1:]), "stage": stage, "kind": kind, "role": role,
                    "steps": len(trained), "tokens": int(sum(o["tokens"] for o in trained)),
                    "steps_logged": len(steps)})
    return out


def totals(rows: list[dict], role: str) -> dict:
    r = [x for x in rows if x["role"] == role]
    return {"steps": sum(x["steps"] for x in r), "tokens": sum(x["tokens"] for x in r)}


# --------------------------------------------------------------------------- statistics


def score_table(samples: list[dict]) -> dict:
    """variant -> seed -> problem_id -> mean correctness over its samples."""
    acc: dict = {}
    for s in samples:
        cell = acc.setdefault(s["variant"], {}).setdefault(s["seed"], {}).setdefault(s["problem_id"], [0, 0])
        cell[0] += bool(s["correct"])
        cell[1] += 1
    return {v: {seed: {p: c / n for p, (c, n) in probs.items()} for seed, probs in seeds.items()}
            for v, seeds in acc.items()}


def bootstrap(per_seed: list, *, reference: list | None = None, n: int = BOOTSTRAP, seed: int = 0,
              confidence: float = CONFIDENCE) -> dict:
    """Two-level percentile bootstrap of the mean score (or of its difference to ``reference``).

    per_seed: one 1-D array of per-problem scores per seed. reference: the same shape,
    problem-aligned (paired); the statistic is then mean(per_seed) - mean(reference).
    Returns {"mean", "lo", "hi"}: the point estimate (mean over seeds of the per-seed
    means) and the percentile interval."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = [np.asarray(a, dtype=float) for a in per_seed]
    y = [np.asarray(a, dtype=float) for a in reference] if reference is not None else None
    if y is not None and [len(a) for a in x] != [len(b) for b in y]:
        raise ValueError("paired bootstrap needs the same problems per seed in both variants")
    d = [a - b for a, b in zip(x, y)] if y is not None else x
    point = float(np.mean([a.mean() for a in d]))
    s = len(d)
    seed_draws = rng.integers(0, s, size=(n, s))  # resample b draws seeds seed_draws[b, :]
    # means[j, b, i]: seed j's problems resampled independently for slot i of resample b (a
    # seed drawn twice in one resample gets two independent problem draws)
    means = np.stack([a[rng.integers(0, len(a), size=(n, s, len(a)))].mean(axis=2) for a in d])
    stats = means[seed_draws, np.arange(n)[:, None], np.arange(s)[None, :]].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return {"mean": point, "lo": float(lo), "hi": float(hi)}


def _aligned(table: dict, variant: str, ref: str = "full") -> tuple[list, list, list[int]]:
    """Per-seed score arrays of ``variant`` and ``ref`` over the problems both evaluated."""
    xs, ys, seeds = [], [], []
    for seed in sorted(table.get(variant, {})):
        if seed not in table.get(ref, {}):
            continue
        a, b = table[variant][seed], table[ref][seed]
        common = sorted(set(a) & set(b))
        if common:
            xs.append([a[p] for p in common])
            ys.append([b[p] for p in common])
            seeds.append(seed)
    return xs, ys, seeds


# --------------------------------------------------------------------------- report


def collect(ab: Ablation) -> dict:
    """samples.jsonl, accounting.jsonl, ablation.json/.md/.png from the finished runs."""
    from megatron_sz.data import atomic_write_json, atomic_write_text

    samples, acct, curves, missing = [], [], {}, []
    for run in ab.runs:
        if not run_complete(run):
            missing.append(run.tag)
            continue
        samples += final_samples(run, ab.rounds)
        for row in training_accounting(run.run_dir):
            acct.append({"variant": run.variant, "seed": run.seed, **row})
        curves.setdefault(run.variant, {})[run.seed] = round_accuracies(run, ab.rounds)
    atomic_write_text(ab.out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    atomic_write_text(ab.out / "accounting.jsonl", "".join(json.dumps(a) + "\n" for a in acct))
    table = score_table(samples)
    rows = []
    ref_compute = None
    for v in ab.variants:
        if v not in table:
            rows.append({"variant": v, "seeds": [], "status": "not run"})
            continue
        seeds = sorted(table[v])
        per_seed = [[table[v][s][p] for p in sorted(table[v][s])] for s in seeds]
        n_samples = sum(1 for s in samples if s["variant"] == v)
        n_problems = sum(len(a) for a in per_seed)
        row = {"variant": v, "seeds": seeds, "problems_per_seed": [len(a) for a in per_seed],
               "k": round(n_samples / max(1, n_problems)), "mean_at_k": bootstrap(per_seed)}
        pk = [[float(table[v][s][p] > 0) for p in sorted(table[v][s])] for s in seeds]  # pass@k: any correct
        row["pass_at_k"] = bootstrap(pk)
        if v != "full" and "full" in table:
            xs, ys, paired = _aligned(table, v)
            if xs:
                row["diff_to_full"] = {**bootstrap(xs, reference=ys), "paired_seeds": paired}
                d = row["diff_to_full"]
                row["verdict"] = ("full better" if d["hi"] < 0 else "variant better" if d["lo"] > 0
                                  else "no difference resolved")
        comp = {}
        for seed in seeds:
            rs = [a for a in acct if a["variant"] == v and a["seed"] == seed]
            comp[seed] = {"solver": totals(rs, "solver"), "generator": totals(rs, "generator")}
        row["compute"] = comp
        row["curve"] = {str(s): curves.get(v, {}).get(s) for s in seeds}
        if v == "full":
            ref_compute = comp
        rows.append(row)
    for row in rows:
        if "compute" not in row or ref_compute is None:
            continue
        steps_eq = all(row["compute"][s]["solver"]["steps"] == ref_compute[s]["solver"]["steps"]
                       for s in row["compute"] if s in ref_compute)
        ratios = [row["compute"][s]["solver"]["tokens"] / ref_compute[s]["solver"]["tokens"]
                  for s in row["compute"] if s in ref_compute and ref_compute[s]["solver"]["tokens"]]
        row["equal_steps"] = steps_eq
        row["token_ratio_to_full"] = [round(r, 3) for r in ratios]
    result = {"recipe": ab.source, "system": ab.system, "rounds": ab.rounds, "k": ab.k,
              "temperature": ab.temperature, "round_steps": ab.round_steps, "variants": ab.variants,
              "seeds": ab.seeds, "missing_runs": missing,
              "method": {"bootstrap": BOOTSTRAP, "confidence": CONFIDENCE, "rng_seed": 0,
                         "resampling": "seeds with replacement, then problems with replacement within each "
                                       "drawn seed; problem score = mean correctness over its k samples; "
                                       "difference to full paired on seed and problem; percentile interval",
                         "records": "samples.jsonl (variant, seed, round, problem_id, sample_index, correct)",
                         "compute": "accounting.jsonl: per training stage, the optimizer steps and their tokens "
                                    "from the stage's metrics.jsonl (a stage run entirely at lr 0 counts 0)"},
              "rows": rows}
    atomic_write_json(ab.out / "ablation.json", result)
    atomic_write_text(ab.out / "ablation.md", markdown(result))
    try:
        plot(result, ab.out / "ablation.png")
    except Exception as exc:  # the numbers matter more than the picture
        print(f"ablate: plot skipped ({type(exc).__name__}: {exc})")
    return result


def _ci(x: dict | None, pct: bool = True) -> str:
    if not x:
        return "-"
    f = (lambda v: f"{100 * v:+.1f}") if not pct else (lambda v: f"{100 * v:.1f}")
    return f"{f(x['mean'])} [{f(x['lo'])}, {f(x['hi'])}]"


def markdown(res: dict) -> str:
    lines = [f"# Ablation of {Path(res['recipe']).name} ({res['system']})", "",
             f"{res['rounds']} round(s); seeds {res['seeds']}; held-out mean@{res['k']} at temperature "
             f"{res['temperature']} after the last round; each round's solver update runs "
             f"{res['round_steps']} optimizer steps in every variant. Intervals: 95% percentile bootstrap "
             f"({res['method']['bootstrap']} resamples) over seeds and problems; differences paired on "
             "seed and problem. Accuracies in %.", "",
             f"| variant | seeds | problems/seed | mean@{res['k']} [95% CI] | pass@{res['k']} [95% CI] | "
             "Δ to full [95% CI] | verdict | solver steps | solver tokens (ratio to full) | generator steps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "mean_at_k" not in r:
            lines.append(f"| {r['variant']} | - | - | not run | | | | | | |")
            continue
        comp = r["compute"]
        steps = sorted({c["solver"]["steps"] for c in comp.values()})
        toks = [c["solver"]["tokens"] for c in comp.values()]
        gsteps = sorted({c["generator"]["steps"] for c in comp.values()})
        ratio = r.get("token_ratio_to_full") or []
        rtxt = f" ({min(ratio):.2f}-{max(ratio):.2f})" if ratio and r["variant"] != "full" else ""
        eq = "" if r["variant"] == "full" else (" (= full)" if r.get("equal_steps") else " (≠ full)")
        lines.append(f"| {r['variant']} | {len(r['seeds'])} | {'/'.join(map(str, sorted(set(r['problems_per_seed']))))} "
                     f"| {_ci(r['mean_at_k'])} | {_ci(r['pass_at_k'])} | {_ci(r.get('diff_to_full'), pct=False)} "
                     f"| {r.get('verdict', '-')} | {'/'.join(map(str, steps))}{eq} "
                     f"| {min(toks)}-{max(toks)}{rtxt} | {'/'.join(map(str, gsteps))} |")
    if res["missing_runs"]:
        lines += ["", f"Not finished (not in the table): {', '.join(res['missing_runs'])}."]
    lines += ["", "Per-sample records: `samples.jsonl`; per training stage steps and tokens: `accounting.jsonl`.",
              "A training stage run entirely at lr 0 (no-warmup's export of the initial weights) counts as "
              "0 steps and 0 tokens."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if "mean_at_k" in r]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = range(len(rows))
    m = [100 * r["mean_at_k"]["mean"] for r in rows]
    lo = [100 * (r["mean_at_k"]["mean"] - r["mean_at_k"]["lo"]) for r in rows]
    hi = [100 * (r["mean_at_k"]["hi"] - r["mean_at_k"]["mean"]) for r in rows]
    a1.bar(xs, m, yerr=[lo, hi], capsize=4, color=["tab:blue" if r["variant"] == "full" else "tab:gray" for r in rows])
    a1.set_xticks(list(xs), [r["variant"] for r in rows], rotation=30, ha="right")
    a1.set_ylabel(f"held-out mean@{res['k']} (%), 95% CI")
    a1.set_title("after the last round")
    for r in rows:
        curves = [c for c in r["curve"].values() if c and all(v is not None for v in c)]
        if curves:
            mean = [100 * sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))]
            a2.plot(range(len(mean)), mean, marker="o", label=r["variant"])
    a2.set_xticks(range(res["rounds"] + 1), ["warm-up"] + [f"r{t}" for t in range(res["rounds"])])
    a2.set_xlabel("after the warm-up, then after each round")
    a2.set_ylabel(f"mean@{res['k']} (%), mean over seeds")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
