"""Contamination: n-gram and near-duplicate overlap between problem files and benchmarks.

Two detectors, both on normalised tokens (``curriculum.words`` after LaTeX commands are
dropped: NFKC lower case, words, numbers and single symbols such as ``+`` as tokens, so
"3 + 4" and "3 - 4" stay different):

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

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

_LATEX_CMD = re.compile(r"\\[a-zA-Z]+")


def normalise_tokens(text: str) -> list[str]:
    from megatron_sz.curriculum import words

    return words(_LATEX_CMD.sub(" ", text))


def _ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


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
        self._ngram_index: dict[tuple[str, ...], list[int]] = defaultdict(list)
        self._shingle_index: dict[tuple[str, ...], list[int]] = defaultdict(list)
        self._shingles: list[set[tuple[str, ...]]] = []
        for i, text in enumerate(self.references):
            toks = normalise_tokens(text)
            for g in _ngrams(toks, self.n):
                self._ngram_index[g].append(i)
            sh = _ngrams(toks, 3)
            self._shingles.append(sh)
            for g in sh:
                self._shingle_index[g].append(i)

    def check(self, text: str, candidate_index: int = 0) -> Overlap | None:
        """The strongest overlap of ``text`` with any reference, or None if clean."""
        toks = normalise_tokens(text)
        if not toks:
            return None
        shingles = _ngrams(toks, 3)
        counts: dict[int, int] = defaultdict(int)
        for g in shingles:
            for r in set(self._shingle_index.get(g, ())):
                counts[r] += 1
        best: Overlap | None = None
        for r, inter in counts.items():
            union = len(shingles) + len(self._shingles[r]) - inter
            jac = inter / union if union else 0.0
            if jac >= self.threshold and (best is None or jac > best.score):
                best = Overlap(candidate_index, r, "near_duplicate", jac, " ".join(next(iter(shingles & self._shingles[r]))))
        for g in _ngrams(toks, self.n):
            refs = self._ngram_index.get(g)
            if refs:
                r = refs[0]
                inter = counts.get(r, 0)
                union = len(shingles) + len(self._shingles[r]) - inter
                jac = inter / union if union else 0.0
                if best is None or best.kind != "near_duplicate":
                    best = Overlap(candidate_index, r, "ngram", jac, " ".join(g))
                break
        return best

    def report(self, texts: list[str]) -> list[Overlap]:
        out = []
        for i, t in enumerate(texts):
            hit = self.check(t, i)
            if hit is not None:
                out.append(hit)
        return out


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
