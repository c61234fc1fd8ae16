"""The tool loop (megatron_sz/toolloop.py) against a scripted model: real sandbox, exact masks.

The scripted model answers like a server that honours the stop string: a turn that
writes code ends right before the closing fence. Its next turn is chosen by how many
observations the transcript already holds, so the same script drives the in-process
backend and a loopback OpenAI-compatible server (tests/openai_server.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from megatron_sz.data import ScoredRollout, ToolTrajectory, read_jsonl
from megatron_sz.inference.base import GenerationResult, InferenceBackend
from megatron_sz.recipe import SamplingSpec
from megatron_sz.toolloop import ToolConfig, open_code, run_tool_loop, token_segments

sys.path.insert(0, str(Path(__file__).parent))

CODE = "Let me compute.\n```python\n{}\n"  # cut before the closing fence, as a stop string does
SCRIPT = {
    "multi": [CODE.format("print(2 + 3)"), CODE.format("x = 5\nx * 2"), "So the answer is \\boxed{10}."],
    "nocode": ["It is \\boxed{7}."],
    "noanswer": ["I do not know."],
    "timeout": [CODE.format("while True:\n    pass"), "Too slow. \\boxed{0}"],
    "crash": [CODE.format("1 / 0"), CODE.format("import os\nos._exit(3)"), "\\boxed{1}"],
    "big": [CODE.format("print('x' * (1 << 20))"), "Long. \\boxed{2}"],
    "forever": [CODE.format("print(1)")] * 50,
}
TOOLS = ToolConfig(max_turns=4, timeout_s=1.0, output_chars=200)


def scripted_reply(prompt: str) -> str:
    pid = prompt.split("\n", 1)[0].removeprefix("Problem: ").strip()
    turn = prompt.count("```output")
    replies = SCRIPT[pid]
    return replies[min(turn, len(replies) - 1)]


class ScriptedBackend(InferenceBackend):
    def __init__(self):
        super().__init__()
        self.requests = []

    def generate(self, requests, *, progress=True, on_result=None):
        out = []
        for r in requests:
            self.requests.append(r)
            assert "```\n" in r.sampling.stop
            res = GenerationResult(id=r.id, texts=[scripted_reply(r.prompt)] * r.n, finish_reasons=["stop"] * r.n)
            self._emit(on_result, res)
            out.append(res)
        return out


class CharTok:
    """One token per character: token i of the completion is character i of its text."""

    eos_id = 0

    def encode(self, text):
        return [ord(c) for c in text]


def items(*names):
    return [(n, f"Problem: {n}\n") for n in names]


def check_masks(tr: ToolTrajectory):
    ids, mask = token_segments(CharTok(), tr.segments, eos=False)
    text = "".join(s["text"] for s in tr.segments)
    assert "".join(map(chr, ids)) == text
    expect = []
    for s in tr.segments:
        expect += [0 if s["role"] == "tool" else 1] * len(s["text"])
    assert mask == expect
    # the zeros are exactly the observation blocks
    obs_chars = sum(len(s["text"]) for s in tr.segments if s["role"] == "tool")
    assert mask.count(0) == obs_chars
    for s in tr.segments:
        if s["role"] == "tool":
            assert s["text"].startswith("```output\n") and s["text"].endswith("```\n")
    ScoredRollout(prompt=tr.prompt, completion_ids=ids, loss_mask=mask, reward=1.0).validate()


def observations(tr):
    return [s["text"] for s in tr.segments if s["role"] == "tool"]


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("loop") / "traj.jsonl"
    be = ScriptedBackend()
    trajs = run_tool_loop(items(*SCRIPT), be, n=2, sampling=SamplingSpec(temperature=0.0, max_tokens=64),
                          tools=TOOLS, out_path=out)
    return {(t.problem_id, t.sample_index): t for t in trajs}, be, out


def test_each_case_ends_correctly(scripted_run):
    trajs, be, _ = scripted_run
    assert len(trajs) == 2 * len(SCRIPT)
    m = trajs[("multi", 0)]
    assert (m.finish, m.tool_calls, m.extracted_answer) == ("answer", 2, "10")
    assert observations(m) == ["```output\n5\n```\n", "```output\n10\n```\n"]
    assert m.segments[0]["text"].endswith("print(2 + 3)\n```\n")  # the fence the stop string cut is restored
    assert (trajs[("nocode", 0)].finish, trajs[("nocode", 0)].tool_calls, trajs[("nocode", 0)].extracted_answer) \
        == ("answer", 0, "7")
    assert (trajs[("noanswer", 1)].finish, trajs[("noanswer", 1)].extracted_answer) == ("no_answer", None)
    t = trajs[("timeout", 0)]
    assert t.tool_statuses == ["timeout"] and "TimeoutError" in observations(t)[0] and t.finish == "answer"
    c = trajs[("crash", 0)]
    assert c.tool_statuses[0] == "error" and "ZeroDivisionError: division by zero" in observations(c)[0]
    assert c.tool_statuses[1] in ("crashed", "error") and c.finish == "answer" and c.tool_calls == 2
    b = trajs[("big", 0)]
    assert b.tool_statuses == ["output_limit"]
    (obs,) = observations(b)
    assert "[output truncated]" in obs and len(obs) < TOOLS.output_chars + 64 and obs.count("x") == TOOLS.output_chars
    f = trajs[("forever", 0)]
    assert (f.finish, f.tool_calls) == ("max_tool_calls", TOOLS.max_turns)
    assert len(observations(f)) == TOOLS.max_turns
    assert f.segments[-1]["role"] == "model"  # the code after the last allowed call is kept, never run
    # one request per turn: the never-stopping model is asked max_turns + 1 times, no more
    asked = [r.id for r in be.requests if r.id.startswith("forever#0@")]
    assert len(asked) == TOOLS.max_turns + 1


def test_masks_cover_exactly_the_observations(scripted_run):
    trajs, _, _ = scripted_run
    for tr in trajs.values():
        check_masks(tr)
    ids, mask = token_segments(CharTok(), trajs[("multi", 0)].segments, eos=True)
    assert ids[-1] == 0 and mask[-1] == 1


def test_resume_after_kill_is_exactly_once(scripted_run, tmp_path):
    trajs, _, out = scripted_run
    lines = out.read_text().splitlines(keepends=True)
    assert len(lines) == len(trajs)
    killed = tmp_path / "traj.jsonl"
    killed.write_text("".join(lines[:5]) + lines[5][:17])  # 5 whole records and a partial line
    be = ScriptedBackend()
    again = run_tool_loop(items(*SCRIPT), be, n=2, sampling=SamplingSpec(temperature=0.0, max_tokens=64),
                          tools=TOOLS, out_path=killed)
    rows = read_jsonl(killed, ToolTrajectory)
    keys = [(r.problem_id, r.sample_index) for r in rows]
    assert len(keys) == len(set(keys)) == len(trajs)
    assert {k: r.segments for k, r in zip(keys, rows)} == {k: t.segments for k, t in trajs.items()}
    done_before = {(json.loads(x)["problem_id"], json.loads(x)["sample_index"]) for x in lines[:5]}
    redone = {tuple(r.meta["key"].split("#")) for r in be.requests}
    assert not {(p, int(j)) for p, j in redone} & done_before
    assert len(again) == len(trajs)
    # a third run has nothing to do
    be3 = ScriptedBackend()
    run_tool_loop(items(*SCRIPT), be3, n=2, sampling=SamplingSpec(), tools=TOOLS, out_path=killed)
    assert be3.requests == []


def test_open_code():
    assert open_code("a\n```python\nprint(1)\n") == "print(1)"
    assert open_code("```python\nprint(1)\n```\n") == "print(1)"
    assert open_code("```python\nprint(1)\n```\nso \\boxed{1}") is None
    assert open_code("no code") is None


def test_through_a_loopback_openai_server(monkeypatch, scripted_run):
    """The same script served over HTTP (completions API): same trajectories, same masks."""
    import openai_server

    from megatron_sz.inference.openai_http import OpenAIBackend

    monkeypatch.setattr(openai_server, "echo_text", lambda prompt, i: scripted_reply(prompt))
    server, url, cfg = openai_server.start_in_thread()
    try:
        be = OpenAIBackend([url], model="echo-model", api="completions", concurrency=4, max_retries=1)
        trajs = run_tool_loop(items("multi", "forever", "big", "nocode"), be, n=2,
                              sampling=SamplingSpec(temperature=0.0, max_tokens=64), tools=TOOLS)
        be.close()
    finally:
        server.shutdown()
    ref, _, _ = scripted_run
    assert len(trajs) == 8
    for tr in trajs:
        assert tr.segments == ref[(tr.problem_id, tr.sample_index)].segments
        check_masks(tr)
    assert cfg.counts["ok"] == 2 * (3 + 5 + 2 + 1)  # one HTTP call per turn, exactly
