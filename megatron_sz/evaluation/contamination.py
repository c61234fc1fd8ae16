"""Contamination: n-gram and near-duplicate overlap between problem files and benchmarks.

Two detectors, both on ``textsim.tokens`` (NFKC lower case, markup dropped; words,
numbers and single symbols such as ``+`` as tokens, so "3 + 4" and "3 - 4" stay
different), through ``textsim.ShingleIndex``:

* **n-gram**: the candidate shares a word n-gram (default 13, the GPT-3 / Llama convention)
  with a benchmark problem. A problem shorter than n words is compared whole instead, so
  short competition problems are not waved through.
* **near-duplicate**: Jaccard similarity of word 3-gram shingles at or above a threshold
  (default 0.8), which catches paraphrases with changed numbers or reordered clauses.

An inverted index over benchmark shingles makes a check cost proportional to the
candidate's length, not to the benchmark size. ``ContaminationIndex`` is what the
curriculum filter uses; ``report`` lists every offending pair for ``megatron-sz eval
contamination``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_sz.textsim import ShingleIndex, jaccard, ngrams, shingles, tokens


@dataclass
class Overlap:
    candidate_index: int
    reference_index: int
    kind: str  # "ngram" | "near_duplicate"
    score: float  # Jaccard similarity of 3-gram shingles
    shared: str  # one shared n-gram, for the report


class ContaminationIndex:
    def __init__(self, reference_texts: list[str], *, ngram: int = 13, near_dup_threshold: float = 0.8):
        if ngram < 3:
            raise ValueError("ngram must be >= 3")
        if not (0.0 < near_dup_threshold <= 1.0):
            raise ValueError("near_dup_threshold must be in (0, 1]")
        self.references = list(reference_texts)
        self.n = ngram
        self.threshold = near_dup_threshold
        self._index = ShingleIndex(shingle_n=3, long_n=ngram).add_all(enumerate(self.references))

    def check(self, text: str, candidate_index: int = 0) -> Overlap | None:
        """The strongest overlap of ``text`` with any reference, or None if clean:
        a near-duplicate (highest Jaccard) first, else the first shared long n-gram."""
        if not tokens(text):
            return None
        sh = shingles(text, 3)
        sims = self._index.similarities(text)
        near = self._index.similar(text, self.threshold)
        if near is not None:
            r, jac = near
            shared = sorted(sh & self._index.shingles_of(r))
            return Overlap(candidate_index, r, "near_duplicate", jac, " ".join(shared[0]) if shared else "")
        hit = self._index.shared_ngram(text)
        if hit is not None:
            r, g = hit
            return Overlap(candidate_index, r, "ngram", sims.get(r, 0.0), " ".join(g))
        return None

    def report(self, texts: list[str]) -> list[Overlap]:
        out = []
        for i, t in enumerate(texts):
            hit = self.check(t, i)
            if hit is not None:
                out.append(hit)
        return out


__all__ = ["ContaminationIndex", "Overlap", "load_problem_texts", "jaccard", "ngrams"]


def load_problem_texts(path: str | Path) -> list[str]:
    """Problem texts of any problem or benchmark file (JSONL/JSON/Parquet, common field names)."""
    from megatron_sz.evaluation.benchmarks import PROBLEM_FIELDS, read_rows
    from megatron_sz.errors import DataError

    texts = []
    for where, row in read_rows(path):
        for key in PROBLEM_FIELDS + ("enhanced_question",):
            if isinstance(row.get(key), str) and row[key].strip():
                texts.append(row[key])
                break
        else:
            raise DataError(f"no problem text (fields present: {', '.join(sorted(row))})", where=where,
                            fix=f"a problem file needs one of {', '.join(PROBLEM_FIELDS)}")
    return texts
