"""Text similarity: the one implementation behind de-duplication, contamination and seed checks.

What is unusual here: it is deliberately small and has no project imports, so the
curriculum, ``evaluation.contamination``, ``seeds`` and ``seed_select`` can all use it
without importing each other (they used to form an import loop, each normalising text
its own way).

* ``tokens(text)``: NFKC, lower case, LaTeX command markers dropped (``\\frac`` ->
  ``frac``, so ``\\dfrac`` and ``\\frac`` differ but markup does not hide words), ``$``
  and braces dropped; words and numbers are tokens, every other non-space character is a
  token of its own (so "3 + 4" and "3 - 4" stay different).
* ``exact_key(text)``: a hash of the token sequence, the key for exact duplicates
  (case, whitespace and markup do not matter).
* ``ngrams(toks, n)``: the set of word n-grams; a text shorter than n words is one
  n-gram of its whole token sequence, so short problems are compared whole.
* ``ShingleIndex``: exact Jaccard similarity of word 3-gram shingles against every
  indexed text, with candidates found through an inverted index (shingle -> ids), so
  adding N texts costs about N x shingles x posting length, not N^2 full comparisons;
  plus a long n-gram index (default 13 words, the GPT-3 / Llama contamination convention).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict
from typing import Hashable, Iterable

_LATEX_CMD = re.compile(r"\\([a-zA-Z]+)")
_MARKUP = re.compile(r"[${}\\]")
_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def normalize_text(text: str) -> str:
    """NFKC, lower case, markup dropped, tokens joined by single spaces."""
    return " ".join(tokens(text))


def tokens(text: str) -> list[str]:
    t = unicodedata.normalize("NFKC", text or "").lower()
    t = _LATEX_CMD.sub(lambda m: f" {m.group(1)} ", t)
    t = _MARKUP.sub(" ", t)
    return _TOKEN.findall(t)


def exact_key(text: str) -> str:
    return hashlib.sha1(normalize_text(text).encode("utf-8")).hexdigest()


def ngrams(toks: list[str], n: int) -> set[tuple[str, ...]]:
    if len(toks) < n:
        return {tuple(toks)} if toks else set()
    return {tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)}


def shingles(text: str, n: int = 3) -> set[tuple[str, ...]]:
    return ngrams(tokens(text), n)


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


class ShingleIndex:
    """Exact + near-duplicate (+ optional long n-gram) index over texts keyed by any id.

    ``add(key, text)``; ``exact(text)`` -> key of an exact duplicate or None;
    ``similar(text, threshold)`` -> ``(key, jaccard)`` of the most similar text at or above
    the threshold (ties: smallest key in sort order) or None; ``shared_ngram(text)`` ->
    ``(key, ngram)`` of the first indexed text sharing a long n-gram, or None.
    """

    def __init__(self, *, shingle_n: int = 3, long_n: int | None = None):
        if long_n is not None and long_n < 3:
            raise ValueError("long_n must be >= 3")
        self.shingle_n = shingle_n
        self.long_n = long_n
        self._exact: dict[str, Hashable] = {}
        self._shingles: dict[Hashable, set] = {}
        self._postings: dict[tuple, list] = defaultdict(list)
        self._long: dict[tuple, list] = defaultdict(list)

    def __len__(self) -> int:
        return len(self._shingles)

    def add(self, key: Hashable, text: str) -> None:
        toks = tokens(text)
        self._exact.setdefault(hashlib.sha1(" ".join(toks).encode("utf-8")).hexdigest(), key)
        sh = ngrams(toks, self.shingle_n)
        self._shingles[key] = sh
        for g in sh:
            self._postings[g].append(key)
        if self.long_n is not None:
            for g in ngrams(toks, self.long_n):
                self._long[g].append(key)

    def add_all(self, items: Iterable[tuple[Hashable, str]]) -> "ShingleIndex":
        for key, text in items:
            self.add(key, text)
        return self

    def exact(self, text: str) -> Hashable | None:
        return self._exact.get(exact_key(text))

    def similarities(self, text: str) -> dict[Hashable, float]:
        """Jaccard similarity to every indexed text sharing at least one shingle."""
        sh = shingles(text, self.shingle_n)
        counts: dict[Hashable, int] = defaultdict(int)
        for g in sh:
            for key in set(self._postings.get(g, ())):
                counts[key] += 1
        return {k: c / (len(sh) + len(self._shingles[k]) - c) for k, c in counts.items()}

    def similar(self, text: str, threshold: float) -> tuple[Hashable, float] | None:
        best = None
        for key, sim in sorted(self.similarities(text).items(), key=lambda kv: str(kv[0])):
            if sim >= threshold and (best is None or sim > best[1]):
                best = (key, sim)
        return best

    def shared_ngram(self, text: str) -> tuple[Hashable, tuple[str, ...]] | None:
        if self.long_n is None:
            raise ValueError("this index was built without long_n")
        for g in sorted(ngrams(tokens(text), self.long_n)):
            keys = self._long.get(g)
            if keys:
                return keys[0], g
        return None

    def shingles_of(self, key: Hashable) -> set:
        return self._shingles[key]


def near_duplicate_pairs(texts: list[str], *, threshold: float, n: int = 3) -> list[tuple[int, int, float]]:
    """Index pairs (i < j) whose texts are exact (1.0) or near duplicates (Jaccard >= threshold)."""
    index = ShingleIndex(shingle_n=n)
    out = []
    for j, text in enumerate(texts):
        exact = index.exact(text)
        sims = index.similarities(text)
        if exact is not None:
            sims = {**sims, exact: 1.0}
        for i in sorted(sims):
            if sims[i] >= threshold or i == exact:
                out.append((i, j, 1.0 if i == exact else sims[i]))
        index.add(j, text)
    return out
