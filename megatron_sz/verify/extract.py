"""Final-answer extraction from a model's full solution text.

Priority, highest first:

1. the LAST ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces allowed; ``\\boxed 5`` too);
2. the last "final answer: ..." / "the answer is ..." / "answer: ..." phrase, or a
   GSM8K-style ``#### 72`` line;
3. the last number in the text (switch off with ``last_number_fallback=False``).

Everything here is linear in the text length: matching braces are found with one
stack pass, so 10,000 nested braces or a 1 MB solution cost milliseconds, never a
regex backtracking blow-up. No regex here has nested quantifiers.
"""
from __future__ import annotations

import re

__all__ = ["extract_answer", "find_boxed"]

# Longest answer we return from a phrase match; past this it is a paragraph, not an answer.
_MAX_PHRASE_ANSWER = 400

_BOX_CMD = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_PHRASE = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*\**\s*(?:is\s*:?|:|=)"
    r"|the\s+final\s+answer\s+is"
    r"|^[ \t]*#{4}(?!#)",  # GSM8K's "#### 72" final-answer line
    re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# ``\boxed 5`` / ``\boxed -3.5``: the argument is one token up to a delimiter.
_BARE_TOKEN = re.compile(r"[^\s$\\,;]+")


def _match_braces(text: str) -> dict[int, int]:
    """Map each unescaped ``{`` index to its matching ``}`` index in one O(n) pass."""
    stack: list[int] = []
    match: dict[int, int] = {}
    backslashes = 0
    for i, ch in enumerate(text):
        if ch == "\\":
            backslashes += 1
            continue
        escaped = backslashes % 2 == 1
        backslashes = 0
        if escaped:
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            match[stack.pop()] = i
    return match


def find_boxed(text: str) -> str | None:
    """Content of the last well-formed ``\\boxed``/``\\fbox`` in ``text`` (or None)."""
    starts = [m.end() for m in _BOX_CMD.finditer(text)]
    if not starts:
        return None
    braces: dict[int, int] | None = None
    for pos in reversed(starts):
        j = pos
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            if braces is None:
                braces = _match_braces(text)  # built once, shared by every candidate
            end = braces.get(j)
            if end is None:
                continue  # unterminated box (e.g. truncated generation): try an earlier one
            content = text[j + 1:end].strip()
            if content:
                return content
            continue
        if j < len(text) and (j > pos or text[j].isalnum() or text[j] in "-."):
            # ``\boxed 5`` / ``\boxed5``: a bare token (models mean the whole token)
            m = _BARE_TOKEN.match(text, j)
            if m:
                return m.group(0).rstrip(".")
    return None


def _clean_phrase_answer(raw: str) -> str | None:
    line = raw.strip().split("\n", 1)[0].strip()
    line = line[:_MAX_PHRASE_ANSWER]
    # Markdown/LaTeX wrappers a model puts around the answer.
    for _ in range(3):
        before = line
        line = line.strip().strip("*").strip()
        if line.startswith("$$") and line.endswith("$$") and len(line) > 4:
            line = line[2:-2]
        elif line.startswith("$") and line.endswith("$") and len(line) > 2:
            line = line[1:-1]
        if line.startswith("\\(") and line.endswith("\\)"):
            line = line[2:-2]
        if line.startswith("\\[") and line.endswith("\\]"):
            line = line[2:-2]
        if line.endswith("."):
            line = line[:-1]
        if line == before:
            break
    # "The answer is $5$ because ..." -> take the math span when one is present.
    if "$" in line:
        parts = line.split("$")
        if len(parts) >= 3 and parts[1].strip():
            line = parts[1]
    else:
        # Cut a trailing explanation at a sentence end (". " not inside a decimal).
        m = re.search(r"\.\s+[A-Z]", line)
        if m:
            line = line[:m.start()]
    line = line.strip().rstrip(".").strip()
    return line or None


def extract_answer(text: str | None, *, last_number_fallback: bool = True) -> str | None:
    """The final answer in ``text``, or None when there is none.

    ``last_number_fallback=False`` returns None for texts with neither a box nor an
    answer phrase (use it when a missing final answer should count as no answer).
    """
    if not text:
        return None
    if not isinstance(text, str):
        text = str(text)
    if "\x00" in text:
        text = text.replace("\x00", "")
    boxed = find_boxed(text)
    if boxed is not None:
        return boxed
    phrases = list(_PHRASE.finditer(text))
    for m in reversed(phrases):
        ans = _clean_phrase_answer(text[m.end():m.end() + 4 * _MAX_PHRASE_ANSWER])
        if ans:
            return ans
    if last_number_fallback:
        last = None
        for last in _NUMBER.finditer(text):
            pass
        if last is not None:
            return last.group(0)
    return None
