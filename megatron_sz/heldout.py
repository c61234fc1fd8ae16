"""No role trains on held-out or benchmark problems: the one filter every training input passes.

What is unusual here: the rule is enforced where training inputs are *built* (warm-up
SFT data and D_0 in ``prepare``, the solver's preference pairs, the generator's WSFT
examples, and every sibling system's training records), not only in the curriculum. A
``local-tiny`` run once fed the generator 23 of 64 WSFT targets identical to held-out
problems: the curriculum kept those refinements out of the solver's pool but not out
of ``wsft.jsonl`` (issue 12).

A text is held out when it is an exact or near-exact copy (every word 3-gram shared)
of a held-out problem or of any benchmark file the recipe names
(``curriculum.contamination_files``), or shares a long word n-gram
(``curriculum.contamination_ngram``, default 13) with one. It is the same detector as
``megatron-sz eval contamination`` (``evaluation.contamination``). Every filter call
returns how many items it dropped, and the stages record the count in their markers
(``heldout_filtered``), so a run shows what the rule cost.
"""
from __future__ import annotations

from typing import Callable, Iterable, TypeVar

T = TypeVar("T")


class HeldoutFilter:
    """``hit(text)`` -> the shared n-gram / normalised text, or None; ``filter`` drops hits."""

    def __init__(self, texts: Iterable[str], *, ngram: int = 13):
        from megatron_sz.evaluation.contamination import ContaminationIndex

        self.index = ContaminationIndex([t for t in texts if t and t.strip()], ngram=ngram, near_dup_threshold=1.0)

    @classmethod
    def from_texts(cls, texts: Iterable[str], n: int = 13) -> "HeldoutFilter":
        return cls(texts, ngram=n)

    def __bool__(self) -> bool:
        return bool(self.index.references)

    def __len__(self) -> int:
        return len(self.index.references)

    def hit(self, text: str) -> str | None:
        if not self.index.references or not text:
            return None
        overlap = self.index.check(text)
        return None if overlap is None else overlap.shared

    def filter(self, items: Iterable[T], texts: Callable[[T], Iterable[str]]) -> tuple[list[T], int]:
        """(items none of whose texts is held out, number dropped)."""
        kept, dropped = [], 0
        for item in items:
            if any(self.hit(t) for t in texts(item) if t):
                dropped += 1
            else:
                kept.append(item)
        return kept, dropped


def heldout_texts(rd, recipe) -> list[str]:
    """The run's held-out problems plus every benchmark file the recipe names."""
    from megatron_sz.data import Problem, read_jsonl
    from megatron_sz.evaluation.contamination import load_problem_texts

    texts: list[str] = []
    held = rd.prepare_dir / "heldout.jsonl"
    if held.exists():
        texts += [p.problem for p in read_jsonl(held, Problem)]
    for f in recipe.curriculum.contamination_files:  # any benchmark layout: JSONL/JSON/Parquet
        texts += load_problem_texts(recipe.resolve_path(f))
    return texts


def for_run(rd, recipe) -> HeldoutFilter:
    """The filter of a run directory (built once per process and stage)."""
    return HeldoutFilter(heldout_texts(rd, recipe), ngram=recipe.curriculum.contamination_ngram)
