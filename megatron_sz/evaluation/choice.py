"""General-reasoning benchmarks scored as multiple choice: MMLU-Pro, SuperGPQA, BBEH, from local files.

Read in their public layouts (``read_rows``: JSONL, JSON or Parquet), detected per row:

* **MMLU-Pro** (TIGER-Lab/MMLU-Pro): ``question``, ``options`` (up to 10), ``answer`` (a
  letter) and/or ``answer_index``; ``category`` is the subject.
* **SuperGPQA** (m-a-p/SuperGPQA): ``question``, ``options``, ``answer_letter`` (and
  ``answer``, the correct option's text); ``discipline`` is the subject.
* **BBEH** (google-deepmind/bbeh): a task's ``task.json`` = ``{"examples": [{"input", "target"}]}``,
  or a folder of ``bbeh_*/task.json`` (the task name is the subject). The options are in
  the input; a target like ``(B)`` is a letter, other targets are compared as short
  answers after normalisation (case, spaces, surrounding punctuation).

A completion's choice is, in order: the content of its last ``\\boxed{}``, the X of a
final "answer is (X)" / "answer: X", else the last standalone ``(X)``. A letter is
correct when it is the answer letter; an option text equal to the correct option's text
counts too. Accuracy is per benchmark (and per subject), micro-averaged over items.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from megatron_sz.errors import DataError

LETTERS = string.ascii_uppercase


@dataclass
class ChoiceItem:
    id: str
    benchmark: str
    question: str
    answer: str  # a letter when options is not None, else the short target text
    options: list[str] | None = None
    subject: str | None = None
    extra: dict = field(default_factory=dict)


def _letter(value) -> str | None:
    s = str(value).strip().strip("().[] ").upper()
    return s if len(s) == 1 and s in LETTERS else None


def _row_item(row: dict, where: str, bench: str, i: int) -> ChoiceItem:
    if "input" in row and "target" in row:  # BBEH
        target = str(row["target"]).strip()
        letter = _letter(target) if re.fullmatch(r"\(?[A-Za-z]\)?", target) else None
        return ChoiceItem(id=f"{bench}-{i}", benchmark=bench, question=str(row["input"]),
                          answer=letter or target, options=None, subject=row.get("task") or bench,
                          extra={"letter_target": letter is not None})
    q, opts = row.get("question"), row.get("options")
    if not isinstance(q, str) or not isinstance(opts, (list, tuple)) or not opts:
        raise DataError("a multiple-choice row needs 'question' and a non-empty 'options' list "
                        "(MMLU-Pro / SuperGPQA) or 'input' and 'target' (BBEH)", where=where,
                        fix="pass the benchmark's public file unchanged")
    opts = [str(o) for o in opts]
    ans = None
    if row.get("answer_letter") is not None:
        ans = _letter(row["answer_letter"])
    if ans is None and row.get("answer_index") is not None and str(row["answer_index"]).lstrip("-").isdigit():
        k = int(row["answer_index"])
        ans = LETTERS[k] if 0 <= k < len(opts) else None
    if ans is None and row.get("answer") is not None:
        ans = _letter(row["answer"])
        if ans is None and str(row["answer"]) in opts:
            ans = LETTERS[opts.index(str(row["answer"]))]
    if ans is None or LETTERS.index(ans) >= len(opts):
        raise DataError(f"no usable answer (answer={row.get('answer')!r}, answer_index={row.get('answer_index')!r}, "
                        f"answer_letter={row.get('answer_letter')!r}) for {len(opts)} options", where=where,
                        fix="the answer must name one of the options")
    rid = row.get("question_id", row.get("uuid", row.get("id", i)))
    return ChoiceItem(id=f"{bench}-{rid}", benchmark=bench, question=q, answer=ans, options=opts,
                      subject=row.get("category") or row.get("discipline") or row.get("subject"))


def load_choice_benchmark(path: str | Path, *, name: str | None = None, limit: int | None = None) -> list[ChoiceItem]:
    """Items of one benchmark file (or a BBEH folder of ``*/task.json``)."""
    from megatron_sz.evaluation.benchmarks import read_rows

    path = Path(path)
    if path.is_dir():
        tasks = sorted(path.glob("*/task.json"))
        if not tasks:
            raise DataError(f"{path} is a folder without */task.json files", where=str(path),
                            fix="pass a benchmark file, or BBEH's benchmark_tasks folder")
        out: list[ChoiceItem] = []
        for t in tasks:
            task = t.parent.name
            items = load_choice_benchmark(t, name=name or "bbeh", limit=limit)
            for it in items:
                it.id, it.subject = f"{it.benchmark}-{task}-{it.id.rsplit('-', 1)[1]}", task
            out += items
        return out
    bench = name or _guess_name(path)
    rows = read_rows(path)
    if limit:
        rows = rows[:limit]
    return [_row_item(row, where, bench, i) for i, (where, row) in enumerate(rows)]


def _guess_name(path: Path) -> str:
    s = str(path).lower()
    for key, name in (("mmlu", "mmlu-pro"), ("supergpqa", "supergpqa"), ("bbeh", "bbeh")):
        if key in s:
            return name
    return path.stem


def choice_prompt(item: ChoiceItem) -> str:
    text = item.question.strip()
    if item.options:
        text += "\nOptions:\n" + "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(item.options))
        text += "\nAnswer with the letter of the correct option in \\boxed{}."
    else:
        text += "\nGive the final answer in \\boxed{}."
    return text


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().strip(".").strip().lower()).strip("()[]{} \"'")


def extract_choice(text: str) -> str | None:
    """The raw choice of a completion (see the module docstring), or None."""
    from megatron_sz.verify.extract import find_boxed

    boxed = find_boxed(text or "")
    if boxed is not None:
        inner = re.sub(r"^\\text\{(.*)\}$", r"\1", boxed.strip())
        return inner.strip()
    m = list(re.finditer(r"answer\s*(?:is|:)\s*\(?([^\n.]+?)\)?\s*(?:\.|$|\n)", text or "", re.IGNORECASE))
    if m:
        return m[-1].group(1).strip()
    m = list(re.finditer(r"\(([A-Z])\)", text or ""))
    return m[-1].group(1) if m else None


def is_correct(item: ChoiceItem, text: str) -> bool:
    got = extract_choice(text)
    if got is None:
        return False
    if item.options is not None or item.extra.get("letter_target"):
        letter = _letter(got)
        if letter is not None:
            return letter == item.answer
        if item.options:  # the option's text instead of its letter
            return _norm(got) == _norm(item.options[LETTERS.index(item.answer)])
        return False
    return _norm(got) == _norm(item.answer)


def score(items: list[ChoiceItem], completions: dict[str, list[str]]) -> dict:
    """{benchmark: {accuracy, n, samples, by_subject}} over the completions of each item id
    (mean over an item's samples, then over items); items without completions are missing."""
    out: dict[str, dict] = {}
    for it in items:
        texts = completions.get(it.id)
        if not texts:
            continue
        acc = sum(is_correct(it, t) for t in texts) / len(texts)
        b = out.setdefault(it.benchmark, {"sum": 0.0, "n": 0, "samples": 0, "subjects": {}})
        b["sum"] += acc
        b["n"] += 1
        b["samples"] += len(texts)
        s = b["subjects"].setdefault(it.subject or "-", [0.0, 0])
        s[0] += acc
        s[1] += 1
    return {k: {"accuracy": v["sum"] / v["n"], "n": v["n"], "samples": v["samples"],
                "by_subject": {s: a / n for s, (a, n) in sorted(v["subjects"].items())}}
            for k, v in sorted(out.items())}
