"""``megatron-sz evolve [RECIPE]``: run co-evolution rounds on this machine (the local executor).

With no RECIPE it runs the embedded default, ``recipes/local-tiny.yaml`` (a tiny Megatron
solver and generator, a locally trained SentencePiece tokenizer, the symbolic teacher,
CPU only). Re-running the same command resumes: finished stages and shards are skipped.
"""
from __future__ import annotations

DEFAULT_RECIPE = "recipes/local-tiny.yaml"


def register(sub) -> None:
    p = sub.add_parser("evolve", help="run Socratic-Zero co-evolution rounds locally (resumable)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE,
                   help=f"recipe YAML (default: the embedded {DEFAULT_RECIPE})")
    p.add_argument("--run-dir", default=None,
                   help="run directory (default: the recipe's run_dir, else runs/<recipe name>); "
                        "an existing one is resumed")
    p.add_argument("--rounds", type=int, default=None, help="number of rounds (default: the recipe's 'rounds')")
    p.add_argument("--no-progress", action="store_true", help="no progress bars, plain log lines only")
    p.add_argument("--verbose", action="store_true",
                   help="also show the library warnings and wandb summaries that are silenced as harmless "
                        "(Apex/Transformer Engine fallbacks, deprecations raised inside Megatron)")
    p.set_defaults(func=_main)


def open_run(recipe_path: str, run_dir: str | None, *, dry_run: bool = False, validate=None):
    """Load + validate the recipe (preflight, then ``validate(recipe)`` if given), then create
    or reopen the run directory. Everything is checked before the directory exists: a run
    dir frozen from a rejected invocation would refuse the corrected recipe."""
    from pathlib import Path

    from megatron_sz.executor.preflight import preflight
    from megatron_sz.paths import resolve_resource
    from megatron_sz.recipe import load_recipe
    from megatron_sz.rundir import RunDir

    recipe = load_recipe(recipe_path)
    for w in preflight(recipe, missing_paths_ok=dry_run):
        print(f"warning: {w} (a real submit will refuse this)")
    if validate is not None:
        validate(recipe)
    root = run_dir or recipe.run_dir or str(Path("runs") / recipe.name)
    text = Path(resolve_resource(recipe_path, "recipes")).read_text(encoding="utf-8")
    rd = RunDir.create_or_open(root, recipe_text=text, recipe_source=recipe.source,
                               name=recipe.name, seed=recipe.seed)
    return rd, rd.load_recipe()


def check_rounds(rounds: int | None, recipe) -> None:
    from megatron_sz.errors import UserError

    n = recipe.rounds if rounds is None else rounds
    if n < 1:
        where = "--rounds" if rounds is not None else f"{recipe.source}: rounds"
        raise UserError(f"the number of rounds must be >= 1, got {n}", where=where, fix="pass --rounds 3")


def _main(args) -> int:
    import os

    from megatron_sz.executor.local import run_local

    os.environ.setdefault("WANDB_MODE", "offline")
    rd, recipe = open_run(args.recipe, args.run_dir, validate=lambda r: check_rounds(args.rounds, r))
    rounds = recipe.rounds if args.rounds is None else args.rounds
    print(f"megatron-sz evolve: recipe {recipe.source}, run dir {rd.root}, {rounds} round(s)", flush=True)
    run_local(rd, recipe, rounds=rounds, progress=not args.no_progress)
    return 0
