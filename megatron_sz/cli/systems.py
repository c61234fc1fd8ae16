"""``megatron-sz systems``: the registered systems, one line each (name, roles, default recipe)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("systems", help="list the registered self-evolving systems, one line each",
                       description=__doc__)
    p.add_argument("--stages", action="store_true",
                   help="also list each system's stages of round 1 (resource class, shards, reads -> writes)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from megatron_sz.systems import all_systems

    for s in all_systems():
        print(f"{s.name:<15} {s.summary}  [roles: {', '.join(s.roles)}; CPU default: {s.default_recipe}]")
        if args.stages:
            from megatron_sz.recipe import load_recipe
            from megatron_sz.round import plan_round

            plan = plan_round(load_recipe(s.default_recipe), 1)
            for st in plan:
                shards = f" x{st.shards}" if st.shards else ""
                ins = ", ".join(io.label() for io in st.reads) or "-"
                outs = ", ".join(io.label() for io in st.writes) or "-"
                print(f"    {st.name:<11} {st.resource:<9}{shards:<4} {ins} -> {outs}")
    return 0
