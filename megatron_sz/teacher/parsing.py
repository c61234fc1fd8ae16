"""Robust parsing of teacher LLM replies: JSON objects and judge verdicts.

Teacher models wrap JSON in code fences, add prose before and after, use single
quotes or Python literals, write LaTeX with bare backslashes (``"\\frac"`` is a valid
JSON escape for a form feed followed by "rac"!), leave trailing commas, or stop
mid-object when they hit ``max_tokens``. ``parse_json_reply`` accepts all of these,
never raises, and classifies every reply:

* ``status``: ``ok`` (valid JSON, maybe fenced or surrounded by prose), ``repaired``
  (needed a repair listed in ``notes``), ``missing_fields`` (an object, but a required
  field is absent or empty: the caller retries), ``wrong_type`` (JSON, but not an
  object), ``not_json`` (no object found), ``empty`` (no text).
* ``notes``: what was found or fixed: fenced, unclosed_fence, leading_text,
  trailing_text, nested, aliased_keys, latex_escapes, invalid_escapes, single_quotes,
  python_literals, unquoted_keys, trailing_commas, truncated, answer_from_solution.

``parse_judge_reply`` does the same for the judge's ``{"correct": true|false}``, falling
back to a last CORRECT / INCORRECT keyword in prose.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

REFINE_FIELDS = ("enhanced_question", "solution", "answer")
ALIASES = {
    "enhanced_question": ("question", "new_question", "problem", "new_problem", "enhanced_problem",
                          "refined_question", "refined_problem"),
    "solution": ("reference_solution", "new_solution", "worked_solution", "reasoning"),
    "answer": ("final_answer", "reference_answer", "new_answer"),
}
STATUSES = ("ok", "repaired", "missing_fields", "wrong_type", "not_json", "empty")

# LaTeX commands whose backslash collides with a JSON escape (\b \f \n \r \t).
_LATEX_AFTER_ESCAPE = re.compile(
    r"(?:b(?:oxed|inom|eta|ar|egin|ig|f|m|ot)|f(?:rac|orall|box|lat|loor)|"
    r"n(?:eq|abla|ot|eg|u|ewline|e(?![a-z])|i(?![a-z])|mid|leq|geq|subseteq)|"
    r"r(?:ight|ho|angle|floor|ceil|m|vert)|t(?:imes|ext|heta|an|au|o(?![a-z])|riangle|frac|op|ilde|extbf))")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\r?\n?(.*?)(?:```|\Z)", re.S)


@dataclass
class ParsedReply:
    status: str
    data: dict | None = None
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: str | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "repaired")


# --------------------------------------------------------------------------- repairs


def _is_closing(s: str, i: int) -> bool:
    """Is the quote at ``s[i]`` the end of its string? Only if what follows is structure
    (``, } ] :``) or the end of the text; otherwise it is an unescaped quote in the text."""
    j = i + 1
    while j < len(s) and s[j] in " \t\r\n":
        j += 1
    return j >= len(s) or s[j] in ",}]:"


def _fix_escapes(s: str, notes: set[str]) -> str:
    """Double backslashes that are LaTeX or invalid JSON escapes (inside strings only)."""
    out = []
    i, n = 0, len(s)
    in_str: str | None = None
    while i < n:
        c = s[i]
        if in_str is None:
            if c in "\"'":
                in_str = c
            out.append(c)
            i += 1
            continue
        if c == "\\" and i + 1 < n:
            nxt = s[i + 1]
            if nxt in "\"\\/'":
                out.append(s[i:i + 2])
                i += 2
                continue
            if nxt == "u" and re.match(r"[0-9a-fA-F]{4}", s[i + 2:i + 6]):
                out.append(s[i:i + 6])
                i += 6
                continue
            if nxt in "bfnrt":
                if _LATEX_AFTER_ESCAPE.match(s, i + 1):
                    notes.add("latex_escapes")
                    out.append("\\\\")
                    i += 1
                    continue
                out.append(s[i:i + 2])
                i += 2
                continue
            notes.add("invalid_escapes")
            out.append("\\\\")
            i += 1
            continue
        if c == in_str:
            if _is_closing(s, i):
                in_str = None
            else:
                notes.add("unescaped_quotes")
                out.append("\\" + c)
                i += 1
                continue
        elif c == "\n":
            out.append("\\n")  # a raw newline inside a string is invalid JSON
            notes.add("invalid_escapes")
            i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _scan_object(s: str) -> tuple[str, bool]:
    """Return the first balanced {...} starting at s[0] ('{'), or the rest if unbalanced."""
    depth = 0
    in_str: str | None = None
    i = 0
    while i < len(s):
        c = s[i]
        if in_str:
            if c == "\\":
                i += 2
                continue
            if c == in_str and _is_closing(s, i):
                in_str = None
        elif c in "\"'":
            in_str = c
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return s[:i + 1], True
        i += 1
    return s, False


def _normalize(s: str, notes: set[str]) -> str:
    """Convert JSON-ish (single quotes, Python literals, bare keys, trailing commas,
    truncation) to JSON, walking the text once with a string/bracket state machine."""
    out: list[str] = []
    stack: list[str] = []
    i, n = 0, len(s)
    in_str: str | None = None
    while i < n:
        c = s[i]
        if in_str is not None:
            if c == "\\" and i + 1 < n:
                if s[i + 1] == "'":  # \' is not a JSON escape
                    out.append("'")
                else:
                    out.append(s[i:i + 2])
                i += 2
                continue
            if c == in_str:
                out.append('"')
                in_str = None
            elif c == '"' and in_str == "'":
                out.append('\\"')
            else:
                out.append(c)
            i += 1
            continue
        if c == '"':
            in_str = '"'
            out.append('"')
        elif c == "'":
            in_str = "'"
            notes.add("single_quotes")
            out.append('"')
        elif c in "{[":
            stack.append("}" if c == "{" else "]")
            out.append(c)
        elif c in "}]":
            while out and out[-1].isspace():
                out.pop()
            if out and out[-1] == ",":
                out.pop()
                notes.add("trailing_commas")
            if stack:
                stack.pop()
            out.append(c)
        elif c.isalpha() or c == "_":
            m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", s[i:])
            word = m.group(0)
            rest = s[i + len(word):].lstrip()
            if rest.startswith(":"):
                out.append(json.dumps(word))
                notes.add("unquoted_keys")
            elif word in ("True", "False", "None"):
                out.append({"True": "true", "False": "false", "None": "null"}[word])
                notes.add("python_literals")
            else:
                out.append(word)
            i += len(word)
            continue
        else:
            out.append(c)
        i += 1
    if in_str is not None or stack:
        notes.add("truncated")
    if in_str is not None:
        out.append('"')
    if stack:
        text = "".join(out).rstrip()
        # Drop a dangling separator, or a key without a value.
        text = re.sub(r',\s*$', "", text)
        if stack[-1] == "}":  # a key cut off before its colon
            text = re.sub(r'(?<=[,{])\s*"(?:[^"\\]|\\.)*"\s*$', "", text)
            text = re.sub(r',\s*$', "", text)
        text = re.sub(r',?\s*"[^"]*"\s*:\s*$', "", text)
        text = re.sub(r':\s*$', ": null", text)
        return text + "".join(reversed(stack))
    return "".join(out)


def _loads_object(segment: str, notes: set[str]) -> Any:
    """Parse one object candidate, repairing as needed; raises ValueError if hopeless."""
    fixed = _fix_escapes(segment, notes)
    try:
        return json.loads(fixed)
    except json.JSONDecodeError:
        pass
    normalized = _normalize(fixed, notes)
    try:
        return json.loads(normalized)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg} at column {exc.colno}") from None


def _candidates(text: str) -> list[tuple[str, list[str]]]:
    cands = []
    for m in _FENCE.finditer(text):
        body = m.group(2)
        note = ["fenced"] if text[m.end() - 3:m.end()] == "```" else ["fenced", "unclosed_fence"]
        if "{" in body or "[" in body:
            cands.append((body, note))
    cands.append((text, []))
    return cands


def _apply_aliases(obj: dict, required: tuple[str, ...], notes: set[str]) -> dict:
    out = dict(obj)
    lower = {str(k).lower().strip(): k for k in obj}
    for name in required:
        if name in out:
            continue
        for alias in (name,) + ALIASES.get(name, ()):
            if alias in lower:
                out[name] = obj[lower[alias]]
                notes.add("aliased_keys")
                break
    return out


def _find_nested(obj: dict, required: tuple[str, ...]) -> dict | None:
    for v in obj.values():
        if isinstance(v, dict) and all(k in v for k in required):
            return v
    return None


def _missing(obj: dict, required: tuple[str, ...]) -> list[str]:
    miss = []
    for name in required:
        v = obj.get(name)
        if v is None or (isinstance(v, str) and not v.strip()) or isinstance(v, (dict, list)):
            miss.append(name)
    return miss


def parse_json_reply(text: str | None, required: tuple[str, ...] = REFINE_FIELDS) -> ParsedReply:
    """Find, repair and check a JSON object in an LLM reply. Never raises."""
    try:
        return _parse_json_reply(text, tuple(required))
    except Exception as exc:  # noqa: BLE001 - a parser bug must not crash a round
        return ParsedReply("not_json", raw=text, error=f"parser error: {exc!r}")


def _parse_json_reply(text: str | None, required: tuple[str, ...]) -> ParsedReply:
    if text is None or not str(text).strip():
        return ParsedReply("empty", raw=text, error="empty reply")
    text = str(text)
    best: ParsedReply | None = None
    last_error = "no JSON object found"
    for cand, cand_notes in _candidates(text):
        start = cand.find("{")
        while start >= 0:
            notes = set(cand_notes)
            segment, closed = _scan_object(cand[start:])
            if cand[:start].strip() and not cand_notes:
                notes.add("leading_text")
            if closed and cand[start + len(segment):].strip() and not cand_notes:
                notes.add("trailing_text")
            try:
                obj = _loads_object(segment, notes)
            except ValueError as exc:
                last_error = str(exc)
                start = cand.find("{", start + 1)
                continue
            if not isinstance(obj, dict):
                best = best or ParsedReply("wrong_type", raw=text, error=f"JSON {type(obj).__name__}, not an object")
                break
            obj = _apply_aliases(obj, required, notes)
            if _missing(obj, required):
                nested = _find_nested(obj, required)
                if nested is not None:
                    obj = nested
                    notes.add("nested")
            if "answer" in required and _missing(obj, ("answer",)) and isinstance(obj.get("solution"), str):
                from megatron_sz.verify import extract_answer

                derived = extract_answer(obj["solution"], last_number_fallback=False)
                if derived:
                    obj["answer"] = derived
                    notes.add("answer_from_solution")
            for k in required:  # numbers are fine as answers; keep everything as text
                if isinstance(obj.get(k), (int, float)) and not isinstance(obj.get(k), bool):
                    obj[k] = str(obj[k])
            miss = _missing(obj, required)
            repaired = notes - {"fenced", "leading_text", "trailing_text", "unclosed_fence", "nested", "aliased_keys"}
            status = "missing_fields" if miss else ("repaired" if repaired else "ok")
            result = ParsedReply(status, data=obj, missing=miss, notes=sorted(notes), raw=text,
                                 error=f"missing or empty field(s): {', '.join(miss)}" if miss else "")
            if not miss:
                return result
            if best is None or best.status in ("wrong_type",) or len(miss) < len(best.missing):
                best = result
            start = cand.find("{", start + max(1, len(segment)))
    if best is not None:
        return best
    for cand, _ in _candidates(text):  # valid JSON, but an array / string / number
        try:
            value = json.loads(cand.strip())
        except (json.JSONDecodeError, ValueError):
            continue
        return ParsedReply("wrong_type", raw=text, error=f"JSON {type(value).__name__}, not an object")
    return ParsedReply("not_json", raw=text, error=last_error)


def parse_refine_reply(text: str | None) -> ParsedReply:
    """``parse_json_reply`` for the refine role's ``{enhanced_question, solution, answer}``."""
    return parse_json_reply(text, REFINE_FIELDS)


# --------------------------------------------------------------------------- judge

_NEG = r"(?:incorrect|not\s+correct|wrong|false|not\s+equivalent|no)"
_POS = r"(?:correct|true|equivalent|yes|right)"
_VERDICT = re.compile(rf"\b({_NEG}|{_POS})\b", re.I)


@dataclass
class JudgeReply:
    verdict: bool | None
    status: str  # ok | repaired | keyword | undecided | empty
    raw: str | None = None
    reason: str = ""


def _as_bool(v: Any) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return bool(v)
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("true", "yes", "correct", "1", "equivalent", "right"):
            return True
        if s in ("false", "no", "incorrect", "0", "wrong", "not equivalent", "not correct"):
            return False
    return None


def parse_judge_reply(text: str | None) -> JudgeReply:
    """The judge's verdict: JSON ``correct`` first, else the last verdict keyword."""
    if text is None or not str(text).strip():
        return JudgeReply(None, "empty", text, "empty reply")
    text = str(text)
    p = parse_json_reply(text, required=("correct",))
    if p.data is not None:
        for key in ("correct", "is_correct", "equivalent", "verdict", "judgement", "judgment"):
            if key in p.data:
                b = _as_bool(p.data[key])
                if b is not None:
                    return JudgeReply(b, "ok" if p.status == "ok" else "repaired", text,
                                      str(p.data.get("reason", ""))[:300])
    boxed = re.findall(r"\\boxed\{\s*([A-Za-z ]+?)\s*\}", text)
    if boxed and _as_bool(boxed[-1]) is not None:
        return JudgeReply(_as_bool(boxed[-1]), "keyword", text, "boxed verdict")
    hits = _VERDICT.findall(text)
    if hits:
        last = re.sub(r"\s+", " ", hits[-1].lower())
        return JudgeReply(not re.fullmatch(_NEG, last), "keyword", text, f"keyword {last!r}")
    return JudgeReply(None, "undecided", text, "no verdict found")
