"""Multi-turn, tool-integrated rollouts: the model writes Python, the sandbox runs it, generation goes on.

Every inference backend goes through this one loop (local CPU, OpenAI-compatible HTTP,
vLLM): it only sends text prompts through ``InferenceBackend.generate``, so a backend
needs nothing beyond the interface it already has. One turn of a trajectory:

1. the model continues ``prompt + transcript``; generation stops at the closing fence of
   a code block (stop string ``"```\\n"``, which the opening ```` ```python ```` line does
   not contain) or at EOS / ``max_tokens``;
2. if the new text opens a ```` ```python ```` block, the block is closed again (backends
   strip the stop string) and its code is queued;
3. the queued code of **every** live rollout runs in one ``sandbox.run_batch`` call
   (Jupyter-like: the value of a last expression is shown), so the pool's workers are
   busy with the whole batch at once, not one rollout at a time;
4. the result is appended as an observation ```` ```output\\n...\\n``` ````, capped at
   ``output_chars`` characters (a program printing 1 MB shows its head and a note);
5. repeat, up to ``max_turns`` tool calls; a code block written after the last allowed
   call ends the trajectory (``max_tool_calls``) without running. A turn without code
   ends it: ``answer`` when it holds a ``\\boxed{}`` answer, else ``no_answer``
   (``length`` when it ran out of tokens, ``error`` when the backend failed for good).

A trajectory is a list of segments tagged ``model`` or ``tool``. ``token_segments``
turns it into completion token ids plus a loss mask that is 0 on exactly the tokens of
the ``tool`` segments (observations; the prompt is never part of the completion), which
is what ``data.ScoredRollout`` carries into the policy-gradient job. Each segment is
tokenised on its own, so the mask boundary never falls inside a token.

Exactly-once and resumable: finished trajectories are appended to a keyed JSONL file
(``problem_id#sample_index``) as each one ends; a rerun skips the keys already there and
redoes the rest from the start. Request ids carry the sample and the turn, and backends
seed per request id, so a redone trajectory reproduces the one that was lost.
"""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from megatron_sz.data import JsonlAppender, ToolTrajectory, iter_jsonl

CODE_OPEN = "```python"
FENCE = "```"
STOP = "```\n"  # the closing fence; the opening "```python\n" does not contain it
FINISHES = ("answer", "no_answer", "max_tool_calls", "length", "error")

_OPEN_RE = re.compile(r"```python[ \t]*\n?")


@dataclass(frozen=True)
class ToolConfig:
    """How the loop runs tools (``recipe.agent0`` fills it)."""

    max_turns: int = 4  # tool calls per trajectory
    timeout_s: float = 5.0  # wall seconds per tool call
    output_chars: int = 1024  # observation cap (characters)
    memory_mb: int = 1024  # address space per tool call


def open_code(text: str) -> str | None:
    """The code of the last ```python block in ``text`` when nothing follows its closing
    fence but whitespace (or it is still open); None when the text has no such block."""
    starts = [m for m in _OPEN_RE.finditer(text)]
    if not starts:
        return None
    m = starts[-1]
    body = text[m.end():]
    close = body.find(FENCE)
    if close >= 0:
        if body[close + len(FENCE):].strip():
            return None  # text after the block: the model moved on (e.g. wrote its answer)
        body = body[:close]
    return body.strip("\n")


def observation(res: Any, output_chars: int) -> str:
    """The observation shown to the model for one sandbox ``Result``."""
    out = res.stdout or ""
    if res.value_repr not in (None, "None") and res.status == "ok":  # like Jupyter: a None value shows nothing
        out += res.value_repr + "\n"
    if res.status == "error":
        out += f"{res.error_type}: {res.error}\n"
    elif res.status == "timeout":
        out += "TimeoutError: the code ran past its time limit\n"
    elif res.status == "memory":
        out += "MemoryError: the code ran out of memory\n"
    elif res.status in ("blocked", "crashed"):
        out += f"Error: the code was stopped ({res.status})\n"
    truncated = res.status == "output_limit" or len(out) > output_chars
    if len(out) > output_chars:
        out = out[:output_chars]
    if truncated:
        out = out.rstrip("\n") + "\n[output truncated]\n"
    if not out.strip():
        out = "[no output]\n"
    if not out.endswith("\n"):
        out += "\n"
    return f"```output\n{out}```\n"


@dataclass
class _Live:
    key: str
    problem_id: str
    sample_index: int
    prompt: str
    segments: list = field(default_factory=list)
    tool_calls: int = 0
    turn: int = 0
    finish: str | None = None
    statuses: list = field(default_factory=list)

    def transcript(self) -> str:
        return "".join(s["text"] for s in self.segments)


def _key(obj: dict) -> str:
    return f"{obj['problem_id']}#{obj['sample_index']}"


def run_tool_loop(items: Sequence[tuple[str, str]], backend: Any, *, n: int, sampling: Any,
                  tools: ToolConfig = ToolConfig(), out_path: str | Path | None = None,
                  run_code: Callable[[list[dict]], list] | None = None, log: Callable[[str], None] | None = None,
                  meta: dict | None = None) -> list[ToolTrajectory]:
    """``n`` tool-integrated trajectories for each ``(problem_id, prompt)``; see the module doc.

    ``sampling`` is a ``recipe.SamplingSpec``; ``max_tokens`` applies per turn and the
    loop adds its stop string to ``stop``. ``run_code`` (tests) replaces the sandbox:
    it gets the batch of task dicts and returns ``sandbox.Result``s in order. Returns every
    trajectory of ``items`` (those already in ``out_path`` included), by item then sample.
    """
    from megatron_sz.inference.base import GenerationRequest
    from megatron_sz.verify.extract import find_boxed

    if run_code is None:
        from megatron_sz import sandbox

        run_code = sandbox.run_batch
    found: dict[str, ToolTrajectory] = {}
    appender = None
    if out_path is not None:
        appender = JsonlAppender(out_path, key=_key)
        for tr in iter_jsonl(out_path, ToolTrajectory, allow_partial_tail=True):
            found[_key(dataclasses.asdict(tr))] = tr
    live = [_Live(f"{pid}#{j}", pid, j, prompt) for pid, prompt in items for j in range(n)
            if f"{pid}#{j}" not in found]
    stop = list(dict.fromkeys([*sampling.stop, STOP]))
    t0 = time.time()
    total = len(live)
    try:
        while live:
            reqs = [GenerationRequest(id=f"{s.key}@{s.turn}", prompt=s.prompt + s.transcript(), n=1,
                                      sampling=dataclasses.replace(sampling, stop=stop),
                                      meta={"key": s.key}) for s in live]
            results = backend.generate(reqs, progress=False)
            queued: list[_Live] = []
            for s, res in zip(live, results):
                s.turn += 1
                if not res.ok or not res.texts:
                    s.finish = "error"
                    continue
                text, reason = res.texts[0], (res.finish_reasons or ["stop"])[0]
                code = open_code(text)
                if code is not None and not text.rstrip().endswith(FENCE):
                    text = text.rstrip("\n") + "\n" + STOP  # the stop string the backend cut off
                if text:
                    s.segments.append({"role": "model", "text": text})
                if code is not None:
                    if s.tool_calls >= tools.max_turns:
                        s.finish = "max_tool_calls"
                    else:
                        queued.append((s, code))
                    continue
                s.finish = ("answer" if find_boxed(s.transcript()) is not None
                            else "length" if reason == "length" else "no_answer")
            if queued:
                outs = run_code([{"code": code, "cell": True, "timeout": tools.timeout_s,
                                  "memory": tools.memory_mb << 20,
                                  "output_limit": max(tools.output_chars, 256)} for _, code in queued])
                for (s, _), res in zip(queued, outs):
                    s.tool_calls += 1
                    s.statuses.append(res.status)
                    s.segments.append({"role": "tool", "text": observation(res, tools.output_chars)})
            still = []
            for s in live:
                if s.finish is None:
                    still.append(s)
                    continue
                tr = _finish(s, find_boxed, meta)
                found[s.key] = tr
                if appender is not None:
                    appender.append(tr)
            live = still
            if log is not None and total:
                log(f"tool loop: {total - len(live)}/{total} trajectories done, {len(queued)} tool calls this "
                    f"turn ({time.time() - t0:.1f}s)")
    finally:
        if appender is not None:
            appender.close()
    return [found[f"{pid}#{j}"] for pid, _ in items for j in range(n) if f"{pid}#{j}" in found]


def _finish(s: _Live, find_boxed, meta: dict | None) -> ToolTrajectory:
    from megatron_sz.verify.extract import extract_answer

    final = next((x["text"] for x in reversed(s.segments) if x["role"] == "model"), "")
    answer = extract_answer(final, last_number_fallback=False) if s.finish == "answer" else None
    return ToolTrajectory(problem_id=s.problem_id, sample_index=s.sample_index, prompt=s.prompt,
                          segments=s.segments, tool_calls=s.tool_calls, finish=s.finish,
                          extracted_answer=answer, tool_statuses=s.statuses, extra=dict(meta or {}))


def token_segments(tok: Any, segments: list[dict], *, eos: bool) -> tuple[list[int], list[int]]:
    """(completion token ids, loss mask): each segment tokenised alone, mask 0 on ``tool``
    segments and 1 on ``model`` ones; ``eos`` appends the tokenizer's EOS (mask 1)."""
    ids: list[int] = []
    mask: list[int] = []
    for seg in segments:
        piece = list(tok.encode(seg["text"]))
        ids += piece
        mask += [0 if seg["role"] == "tool" else 1] * len(piece)
    if eos and getattr(tok, "eos_id", None) is not None:
        ids.append(int(tok.eos_id))
        mask.append(1)
    return ids, mask
