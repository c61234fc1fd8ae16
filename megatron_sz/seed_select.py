"""`megatron-sz seeds select`: the paper's seed protocol on a user's candidate pool.

Socratic-Zero picks its 100 seeds where the *current* solver succeeds on 10-70% of 8
attempts, balanced over subjects (Algebra 15, ..., Prealgebra 10), and diversified by
clustering. Here, in order:

1. **solve rates**: k samples per candidate from the solver (any inference backend of the
   recipe: local CPU, vLLM, OpenAI-compatible), graded by the rule verifier -- or read
   from a file of precomputed ``{"id", "correct", "k"}`` lines (e.g. from a SLURM rollout);
2. **band**: keep candidates with low <= rate <= high;
3. **subject quotas**: the paper's split scaled to ``n`` (largest remainder), or equal
   shares over the subjects present; a subject short of candidates gives its leftover
   quota to the others, so the result has ``n`` problems whenever the band holds them;
4. **diversity by clustering**: within a subject, greedy k-center clustering on word
   3-gram Jaccard distance (no embedding model needed offline): start from the
   candidate nearest the band's middle, then repeatedly take the candidate farthest from
   everything chosen. Each pick is the centre of one cluster, so near-duplicates are
   never both chosen. Ties break by id: the selection is deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_sz.curriculum import jaccard, shingles
from megatron_sz.data import Problem


@dataclass
class SelectReport:
    candidates: int = 0
    no_rate: int = 0
    in_band: int = 0
    selected: int = 0
    quotas: dict = field(default_factory=dict)
    by_subject: dict = field(default_factory=dict)
    min_pairwise_distance: float | None = None


def subject_quotas(n: int, subjects: list[str], weights: dict[str, int] | None) -> dict[str, int]:
    """``n`` split over ``subjects`` proportionally to ``weights`` (default equal), largest remainder."""
    w = {s: float((weights or {}).get(s, 0 if weights else 1)) for s in subjects}
    total = sum(w.values()) or 1.0
    raw = {s: n * w[s] / total for s in subjects}
    q = {s: int(raw[s]) for s in subjects}
    for s in sorted(subjects, key=lambda s: (-(raw[s] - q[s]), s))[: n - sum(q.values())]:
        q[s] += 1
    return q


def k_center(cands: list[Problem], k: int, *, rates: dict[str, float], target: float) -> list[Problem]:
    """Greedy k-center (farthest-point) selection on word 3-gram Jaccard distance."""
    if k <= 0 or not cands:
        return []
    cands = sorted(cands, key=lambda p: p.id)
    sh = {p.id: shingles(p.problem) for p in cands}
    first = min(cands, key=lambda p: (abs(rates[p.id] - target), p.id))
    chosen = [first]
    dist = {p.id: 1.0 - jaccard(sh[p.id], sh[first.id]) for p in cands}
    while len(chosen) < min(k, len(cands)):
        taken = {c.id for c in chosen}
        nxt = max((p for p in cands if p.id not in taken), key=lambda p: (dist[p.id], -abs(rates[p.id] - target), p.id))
        chosen.append(nxt)
        for p in cands:
            dist[p.id] = min(dist[p.id], 1.0 - jaccard(sh[p.id], sh[nxt.id]))
    return chosen


def select_seeds(candidates: list[Problem], rates: dict[str, float], *, n: int, low: float = 0.1,
                 high: float = 0.7, subject_weights: dict[str, int] | None = None) -> tuple[list[Problem], SelectReport]:
    rep = SelectReport(candidates=len(candidates))
    rep.no_rate = sum(p.id not in rates for p in candidates)
    band = [p for p in candidates if p.id in rates and low <= rates[p.id] <= high]
    rep.in_band = len(band)
    by_subj: dict[str, list[Problem]] = {}
    for p in band:
        by_subj.setdefault(p.subject or "unknown", []).append(p)
    subjects = sorted(by_subj)
    if subject_weights:
        subjects = sorted(set(subjects) | set(subject_weights))
    quotas = subject_quotas(n, subjects, subject_weights)
    # give quota a subject cannot fill to the subjects that still have candidates
    spare = sum(max(0, q - len(by_subj.get(s, []))) for s, q in quotas.items())
    quotas = {s: min(q, len(by_subj.get(s, []))) for s, q in quotas.items()}
    while spare:
        open_ = [s for s in sorted(quotas, key=lambda s: (quotas[s], s)) if quotas[s] < len(by_subj.get(s, []))]
        if not open_:
            break
        quotas[open_[0]] += 1
        spare -= 1
    rep.quotas = dict(quotas)
    target = (low + high) / 2
    out: list[Problem] = []
    for s in sorted(quotas):
        picked = k_center(by_subj.get(s, []), quotas[s], rates=rates, target=target)
        rep.by_subject[s] = len(picked)
        out.extend(picked)
    rep.selected = len(out)
    if len(out) > 1:
        sh = [shingles(p.problem) for p in out]
        rep.min_pairwise_distance = min(1.0 - jaccard(sh[i], sh[j]) for i in range(len(out)) for j in range(i))
    return out, rep


def solve_rates(problems: list[Problem], backend, *, k: int, sampling, template: str | None) -> dict[str, float]:
    """k samples per problem from ``backend``, rule-verified -> success rate per id."""
    from megatron_sz.rollout import rollout

    trajs = rollout(problems, backend, k=k, sampling=sampling, template=template, verify=True)
    out: dict[str, list[int]] = {}
    for t in trajs:
        c = out.setdefault(t.problem_id, [0, 0])
        c[0] += t.correct is True
        c[1] += 1
    return {pid: c / n for pid, (c, n) in out.items() if n}


def register_select(sub) -> None:
    """Add ``seeds select`` (wired by appending this to megatron_sz/cli/seeds.py SUBCOMMANDS)."""
    p = sub.add_parser("select", help="pick seeds the current solver solves 10-70%% of the time, "
                                      "balanced over subjects, diversified by clustering")
    p.add_argument("pool", help="candidate problems (JSONL of Problem records with reference answers)")
    p.add_argument("--out", required=True, help="where to write the selected seed JSONL")
    p.add_argument("-n", type=int, default=100, help="number of seeds (default: 100)")
    p.add_argument("--recipe", default=None, help="recipe whose solver model and rollout backend sample the rates")
    p.add_argument("--model", default=None, help="solver checkpoint (HF folder) for the rates; overrides the recipe's")
    p.add_argument("--rates", default=None, help="precomputed rates: JSONL of {id, correct, k}; skips sampling")
    p.add_argument("-k", type=int, default=8, help="samples per candidate (default: 8, as in the paper)")
    p.add_argument("--low", type=float, default=0.1, help="lowest solve rate kept (default: 0.1)")
    p.add_argument("--high", type=float, default=0.7, help="highest solve rate kept (default: 0.7)")
    p.add_argument("--paper-split", action="store_true",
                   help="subject quotas from the paper's split (Algebra 15, ..., Prealgebra 10) scaled to -n")
    p.set_defaults(func=_select_main)


def _select_main(args) -> int:
    import json

    from megatron_sz.data import read_jsonl, write_jsonl
    from megatron_sz.errors import UserError

    if not (0.0 <= args.low <= args.high <= 1.0):
        raise UserError(f"need 0 <= --low <= --high <= 1, got {args.low}, {args.high}", where="--low/--high",
                        fix="e.g. --low 0.1 --high 0.7")
    pool = read_jsonl(args.pool, Problem)
    if args.rates:
        rates = {}
        for o in read_jsonl(args.rates):
            rates[o["id"]] = o["correct"] / o["k"] if o.get("k") else 0.0
    else:
        if not (args.recipe or args.model):
            raise UserError("no way to measure solve rates", fix="pass --recipe, --model or --rates")
        from megatron_sz.inference import make_backend
        from megatron_sz.recipe import BackendSpec, SamplingSpec, load_recipe

        recipe = load_recipe(args.recipe) if args.recipe else None
        ro = recipe.solver.rollout if recipe else None
        spec = ro.backend if ro else BackendSpec(kind="local")
        model = args.model or (str(recipe.resolve_path(recipe.solver.model.hf_path)) if recipe else None)
        backend = make_backend(spec, model_path=model)
        try:
            rates = solve_rates(pool, backend, k=args.k, sampling=ro.sampling if ro else SamplingSpec(temperature=0.8),
                                template=ro.prompt_template if ro else None)
        finally:
            backend.close()
    weights = None
    if args.paper_split:
        from megatron_sz.seeds import PAPER_COUNTS

        weights = dict(PAPER_COUNTS)
    seeds, rep = select_seeds(pool, rates, n=args.n, low=args.low, high=args.high, subject_weights=weights)
    write_jsonl(args.out, seeds)
    print(json.dumps(rep.__dict__, indent=1))
    if rep.selected < args.n:
        print(f"warning: only {rep.selected} of {args.n} candidates are in the {args.low}-{args.high} band",
              flush=True)
    return 0
