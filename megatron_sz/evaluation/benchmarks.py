"""Benchmark files from local copies: JSONL, JSON or Parquet, in the common public layouts.

Nothing is downloaded: users keep their own copies of AMC23, AIME24, AIME25,
OlympiadBench, MATH-500, Minerva-Math and GSM8K. Each public release names its fields
differently, so every item is read through a field mapping:

* the problem text: the first present of ``problem``, ``question``, ``Question``, ``prompt``, ``input``;
* the reference answer: ``answer``, ``final_answer`` (OlympiadBench: a list), ``Answer``,
  ``expected_answer``, ``target``; GSM8K's ``answer`` ends with ``#### 42`` and only the number
  after ``####`` is the reference; a layout with only a ``solution`` (Minerva, MATH) gives the
  solution's last ``\\boxed{}``;
* the id: ``id``, ``unique_id``, ``idx``, ``problem_id``, else ``<benchmark>-<row>``.

``field_map={"problem": "my_question", "answer": "my_answer"}`` overrides the guess (CLI:
``--field problem=my_question``). A missing field, an empty file or an unreadable format
raises ``DataError`` naming the file, the row and the fields that were present.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_sz.data import iter_jsonl_rows
from megatron_sz.errors import DataError

BENCHMARKS = ("amc23", "aime24", "aime25", "olympiadbench", "math500", "minerva", "gsm8k")

_ALIASES = {
    "amc23": ("amc23", "amc", "aimo-validation-amc", "amc_2023"),
    "aime24": ("aime24", "aime_2024", "aime2024", "aimo-validation-aime"),
    "aime25": ("aime25", "aime_2025", "aime2025"),
    "olympiadbench": ("olympiadbench", "olympiad_bench", "olympiad"),
    "math500": ("math500", "math-500", "math_500"),
    "minerva": ("minerva", "minervamath", "minerva_math", "minerva-math"),
    "gsm8k": ("gsm8k", "gsm-8k", "gsm_8k"),
}

PROBLEM_FIELDS = ("problem", "question", "Question", "prompt", "input", "Problem")
ANSWER_FIELDS = ("answer", "final_answer", "Answer", "expected_answer", "target", "gt_answer")
SOLUTION_FIELDS = ("solution", "Solution", "reasoning")
ID_FIELDS = ("id", "unique_id", "idx", "problem_id", "ID", "uid")


@dataclass
class BenchmarkItem:
    id: str
    problem: str
    answer: str
    benchmark: str
    extra: dict = field(default_factory=dict)


def infer_benchmark_name(path: str | Path) -> str:
    """Canonical benchmark name from a file name (``aime_2024.parquet`` -> ``aime24``)."""
    stem = Path(path).name.lower()
    for suffix in (".jsonl", ".json", ".parquet", ".gz"):
        stem = stem.replace(suffix, "")
    best = None
    for name, aliases in _ALIASES.items():
        for alias in aliases:
            if alias in stem and (best is None or len(alias) > best[1]):
                best = (name, len(alias))
    return best[0] if best else re.sub(r"[^a-z0-9_]+", "_", stem).strip("_") or "benchmark"


def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    """Rows of a JSONL / JSON / Parquet file as (location, dict), location = ``file:line`` or ``file:row N``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"benchmark file not found: {path}", fix="pass the path of a local copy")
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    rows: list[tuple[str, dict]] = []
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises many types for a bad file
            raise DataError(f"cannot read Parquet: {exc}", where=str(path),
                            fix="check the file is a Parquet table") from None
        rows = [(f"{path}:row {i + 1}", r) for i, r in enumerate(table.to_pylist())]
    elif suffix in (".jsonl", ".ndjson"):
        for where, obj in iter_jsonl_rows(path):
            if not isinstance(obj, dict):
                raise DataError("expected a JSON object", where=where)
            rows.append((where, obj))
    elif suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON ({exc.msg} at line {exc.lineno})", where=str(path),
                            fix="a .json benchmark must be a list of objects (or {'data': [...]}); "
                                "use .jsonl for one object per line") from None
        if isinstance(obj, dict):
            for key in ("data", "rows", "examples", "test", "problems"):
                if isinstance(obj.get(key), list):
                    obj = obj[key]
                    break
        if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
            raise DataError("expected a list of objects", where=str(path),
                            fix="a .json benchmark must be a list of objects or {'data': [...]}")
        rows = [(f"{path}:item {i + 1}", r) for i, r in enumerate(obj)]
    else:
        raise DataError(f"unsupported benchmark format {path.suffix!r}", where=str(path),
                        fix="use .jsonl, .json or .parquet")
    if not rows:
        raise DataError("benchmark file is empty", where=str(path), fix="check the file was fully copied")
    return rows


def _answer_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        parts = [_answer_text(v) for v in value]
        parts = [p for p in parts if p]
        return ", ".join(parts) if parts else None
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    if len(text) >= 2 and text[0] == "$" and text[-1] == "$":
        text = text.strip("$").strip()
    return text or None


def _gsm8k_answer(text: str) -> str:
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    return text


def load_benchmark(path: str | Path, *, name: str | None = None, field_map: dict[str, str] | None = None,
                   limit: int | None = None) -> list[BenchmarkItem]:
    """Read one benchmark file into ``BenchmarkItem``s (see the module docstring for the layouts)."""
    from megatron_sz.verify import extract_answer

    name = name or infer_benchmark_name(path)
    field_map = dict(field_map or {})
    rows = read_rows(path)
    items: list[BenchmarkItem] = []
    seen: set[str] = set()
    for index, (where, row) in enumerate(rows):
        present = ", ".join(sorted(row)) or "none"

        def pick(kind: str, candidates: tuple[str, ...]) -> tuple[str | None, Any]:
            if kind in field_map:
                key = field_map[kind]
                if key not in row:
                    raise DataError(f"mapped field {key!r} for {kind} is missing (fields present: {present})",
                                    where=where, fix=f"correct --field {kind}=NAME")
                return key, row[key]
            for key in candidates:
                if key in row and row[key] not in (None, ""):
                    return key, row[key]
            return None, None

        _, problem = pick("problem", PROBLEM_FIELDS)
        if not isinstance(problem, str) or not problem.strip():
            raise DataError(f"no problem text (looked for {', '.join(PROBLEM_FIELDS)}; fields present: {present})",
                            where=where, fix="map it with --field problem=NAME")
        answer_key, raw_answer = pick("answer", ANSWER_FIELDS)
        answer = _answer_text(raw_answer)
        if answer is not None and name == "gsm8k":
            answer = _gsm8k_answer(answer)
        elif answer is not None and "\\boxed" in answer:
            answer = extract_answer(answer, last_number_fallback=False) or answer
        if answer is None:
            _, solution = pick("solution", SOLUTION_FIELDS)
            if isinstance(solution, str):
                answer = extract_answer(solution, last_number_fallback=False)
        if not answer:
            raise DataError(f"no reference answer (looked for {', '.join(ANSWER_FIELDS)}, or a \\boxed{{}} in the "
                            f"solution; fields present: {present})", where=where,
                            fix="map it with --field answer=NAME")
        _, raw_id = pick("id", ID_FIELDS)
        item_id = f"{name}-{raw_id}" if raw_id not in (None, "") else f"{name}-{index}"
        if item_id in seen:
            item_id = f"{item_id}#{index}"
        seen.add(item_id)
        used = {k for k in (answer_key,) if k}
        extra = {k: v for k, v in row.items() if k not in used and k not in PROBLEM_FIELDS and k not in ANSWER_FIELDS
                 and isinstance(v, (str, int, float, bool))}
        items.append(BenchmarkItem(id=item_id, problem=problem.strip(), answer=answer, benchmark=name, extra=extra))
        if limit is not None and len(items) >= limit:
            break
    return items


def parse_field_map(pairs: list[str] | None) -> dict[str, str]:
    """``["problem=question", "answer=final_answer"]`` -> dict, with a clear error for a bad pair."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or key not in ("problem", "answer", "solution", "id") or not value:
            raise DataError(f"bad field mapping {pair!r}", fix="use --field problem=NAME, answer=NAME, solution=NAME or id=NAME")
        out[key] = value
    return out
