"""Data contracts: JSONL round trips, clear errors with file:line, atomic writes, resumable appends."""
import json
import os
import subprocess
import sys

import pytest

from megatron_sz.data import (JsonlAppender, PreferencePair, Problem, Trajectory, WeightedExample,
                              atomic_write_text, read_jsonl, write_jsonl)
from megatron_sz.errors import DataError


def _problem(i: int, **kw) -> Problem:
    base = dict(id=f"p{i}", problem=f"What is {i} + {i}?", answer=str(2 * i), subject="Prealgebra", level=2)
    base.update(kw)
    return Problem(**base)


def test_round_trip_all_record_types(tmp_path):
    recs = {
        Problem: [_problem(i, extra={"answer_code": f"answer = {i}*2"}) for i in range(5)],
        Trajectory: [Trajectory(problem_id="p1", sample_index=j, text="x", extracted_answer="2",
                                correct=j % 2 == 0, verifier="rule") for j in range(4)],
        PreferencePair: [PreferencePair(prompt="q", chosen="a", rejected="b", problem_id="p1",
                                        origin="reference_winner")],
        WeightedExample: [WeightedExample(prompt="q", target="t", weight=0.823,
                                          weight_source={"kind": "gaussian", "success_rate": 0.375})],
    }
    for cls, items in recs.items():
        path = tmp_path / f"{cls.__name__}.jsonl"
        assert write_jsonl(path, items) == len(items)
        back = read_jsonl(path, cls)
        assert back == items


def test_unknown_fields_are_preserved(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "a", "problem": "q", "answer": "1", "my_tag": [1, 2],
                                "source_url": "local"}) + "\n")
    (rec,) = read_jsonl(path, Problem)
    assert rec.extra == {"my_tag": [1, 2], "source_url": "local"}
    out = tmp_path / "out.jsonl"
    write_jsonl(out, [rec])
    obj = json.loads(out.read_text())
    assert obj["my_tag"] == [1, 2] and obj["source_url"] == "local"


@pytest.mark.parametrize("line,needle", [
    ('{"id": "a", "problem": "q"', "invalid JSON"),
    ('{"id": "a", "problem": "q"}', "'answer'"),
    ('{"id": "a", "problem": "q", "answer": "1", "level": "two"}', "'level'"),
    ('{"id": "a", "problem": "q", "answer": "1", "provenance": "web"}', "'provenance'"),
    ('[1, 2, 3]', "JSON object"),
    ('{"id": "", "problem": "q", "answer": "1"}', "'id'"),
])
def test_malformed_line_names_file_line_and_field(tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"id": "ok", "problem": "q", "answer": "1"})
    path.write_text(good + "\n\n" + line + "\n" + good + "\n")
    with pytest.raises(DataError) as exc:
        read_jsonl(path, Problem)
    msg = str(exc.value)
    assert f"{path}:3" in msg, msg
    assert needle in msg, msg
    assert "\n" not in msg


def test_partial_tail_is_dropped_only_when_allowed(tmp_path):
    path = tmp_path / "shard.jsonl"
    good = json.dumps({"problem_id": "p", "sample_index": 0, "text": "t"})
    path.write_text(good + "\n" + good[:17])
    assert len(read_jsonl(path, Trajectory, allow_partial_tail=True)) == 1
    with pytest.raises(DataError):
        read_jsonl(path, Trajectory)


def test_appender_skips_done_keys_and_repairs_partial_tail(tmp_path):
    path = tmp_path / "res.jsonl"
    key = lambda o: o["id"]  # noqa: E731
    with JsonlAppender(path, key) as app:
        assert app.append({"id": "r1", "v": 1})
        assert app.append({"id": "r2", "v": 2})
    with path.open("a") as fh:  # a writer killed mid-line
        fh.write('{"id": "r3", "v"')
    with JsonlAppender(path, key) as app:
        assert app.done == {"r1", "r2"}
        assert not app.append({"id": "r1", "v": 99})
        assert app.append({"id": "r3", "v": 3})
    rows = read_jsonl(path)
    assert [r["id"] for r in rows] == ["r1", "r2", "r3"]
    assert rows[0]["v"] == 1


def test_appender_takes_retryable_records_back_out(tmp_path):
    """``retry``: records that are no result (a call that got no reply) leave the file on
    open, so the rerun redoes them and every key still appears once."""
    path = tmp_path / "judged.jsonl"
    key = lambda o: o["id"]  # noqa: E731
    with JsonlAppender(path, key) as app:
        for i, status in enumerate(["ok", "backend_failed", "ok", "backend_failed"]):
            app.append({"id": f"c{i}", "status": status})
    with path.open("a") as fh:  # and a writer killed mid-line
        fh.write('{"id": "c9"')
    with JsonlAppender(path, key, retry=lambda o: o["status"] == "backend_failed") as app:
        assert app.retried == 2 and app.done == {"c0", "c2"}
        assert app.append({"id": "c1", "status": "ok"}) and not app.append({"id": "c0", "status": "ok"})
    assert [(r["id"], r["status"]) for r in read_jsonl(path)] == [("c0", "ok"), ("c2", "ok"), ("c1", "ok")]
    with JsonlAppender(path, key, retry=lambda o: o["status"] == "backend_failed") as app:
        assert app.retried == 0 and app.done == {"c0", "c1", "c2"}


def test_atomic_write_never_leaves_half_a_file(tmp_path):
    """Kill a writer process while it rewrites a big file: the old or new content, never a mix."""
    path = tmp_path / "big.jsonl"
    atomic_write_text(path, "old\n")
    code = ("import sys; from megatron_sz.data import atomic_write_text\n"
            "while True: atomic_write_text(sys.argv[1], 'x' * 5_000_000 + '\\n')\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)])
    import time
    time.sleep(1.5)
    proc.kill()
    proc.wait()
    text = path.read_text()
    assert text == "old\n" or text == "x" * 5_000_000 + "\n"
    leftovers = [p for p in os.listdir(tmp_path) if p != "big.jsonl"]
    # a killed writer may leave its private temp file, never a partial target
    assert all(p.startswith(".big.jsonl.") for p in leftovers)


def test_weight_must_be_finite_non_negative(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps({"prompt": "p", "target": "t", "weight": -1}) + "\n")
    with pytest.raises(DataError, match=r"w.jsonl:1.*'weight'"):
        read_jsonl(path, WeightedExample)
