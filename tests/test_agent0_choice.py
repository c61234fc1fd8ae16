"""Multiple-choice benchmarks in their public layouts, scripted completions, accuracy vs an
independent count (megatron_sz/evaluation/choice.py and `megatron-sz eval choice`)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sz.evaluation import choice

ROOT = Path(__file__).resolve().parents[1]
L = "ABCDEFGHIJ"


def write_benchmarks(tmp: Path, rng: random.Random):
    """MMLU-Pro (JSON list, answer + answer_index), SuperGPQA (JSONL, answer_letter + answer text),
    BBEH (benchmark_tasks/bbeh_*/task.json with examples); returns (paths, truth)."""
    truth: dict[str, tuple[str, list[str] | None]] = {}
    mmlu = []
    for i in range(20):
        opts = [f"option {i}-{j}" for j in range(10)]
        k = rng.randrange(10)
        mmlu.append({"question_id": 100 + i, "question": f"MMLU question {i}?", "options": opts, "answer": L[k],
                     "answer_index": k, "cot_content": "", "category": rng.choice(["math", "law"]), "src": "x"})
        truth[f"mmlu-pro-{100 + i}"] = (L[k], opts)
    (tmp / "mmlu_pro_test.json").write_text(json.dumps(mmlu))
    sg = []
    for i in range(15):
        opts = [f"choice {i}/{j}" for j in range(rng.randrange(4, 10))]
        k = rng.randrange(len(opts))
        sg.append({"uuid": f"u{i}", "question": f"SuperGPQA {i}", "options": opts, "answer": opts[k],
                   "answer_letter": L[k], "discipline": "Science", "field": "f", "subfield": "s",
                   "difficulty": "easy", "is_calculation": False})
        truth[f"supergpqa-u{i}"] = (L[k], opts)
    (tmp / "SuperGPQA-all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sg))
    bb = tmp / "bbeh" / "benchmark_tasks"
    for task, targets in (("bbeh_boolean", ["True", "False", "unknown"]), ("bbeh_hyperbaton", ["(A)", "(B)", "(C)"])):
        (bb / task).mkdir(parents=True)
        ex = [{"input": f"{task} input {i}\nOptions:\n(A) x\n(B) y\n(C) z", "target": rng.choice(targets)}
              for i in range(8)]
        (bb / task / "task.json").write_text(json.dumps({"examples": ex, "canary": "c"}))
        for i, e in enumerate(ex):
            truth[f"bbeh-{task}-{i}"] = (e["target"], None)
    return [tmp / "mmlu_pro_test.json", tmp / "SuperGPQA-all.jsonl", bb], truth


def scripted(rng: random.Random, truth: dict) -> tuple[dict, dict]:
    """A completion per item in one of several styles, right or wrong at random; returns
    (completions, whether each one is right by construction)."""
    comps, right = {}, {}
    for iid, (ans, opts) in truth.items():
        ok = rng.random() < 0.6
        if opts is not None:
            k = L.index(ans)
            pick = k if ok else (k + 1 + rng.randrange(len(opts) - 1)) % len(opts)
            style = rng.randrange(4)
            text = [f"Thinking... \\boxed{{{L[pick]}}}", f"So the answer is ({L[pick]}).",
                    f"(A) looks wrong. The answer is {L[pick]}.", f"\\boxed{{{opts[pick]}}}"][style]
        else:
            letter = ans.startswith("(")
            if ok:
                got = ans.strip("()") if letter else ans.lower()
            else:
                got = "D" if letter else "maybe"
            text = rng.choice([f"\\boxed{{{got}}}", f"The answer is {got}."])
        comps[iid] = [text]
        right[iid] = ok
    return comps, right


def test_layouts_and_accuracy_match_an_independent_count(tmp_path, rng_seed):
    rng = random.Random(rng_seed)
    paths, truth = write_benchmarks(tmp_path, rng)
    items = [it for p in paths for it in choice.load_choice_benchmark(p)]
    assert {it.id for it in items} == set(truth)
    assert {it.benchmark for it in items} == {"mmlu-pro", "supergpqa", "bbeh"}
    for it in items:
        assert it.answer == (truth[it.id][0].strip("()") if it.benchmark == "bbeh" and truth[it.id][0].startswith("(")
                             else truth[it.id][0])
    comps, right = scripted(rng, truth)
    res = choice.score(items, comps)
    for bench in ("mmlu-pro", "supergpqa", "bbeh"):
        ids = [i for i in truth if i.startswith(bench)]
        assert res[bench]["n"] == len(ids)
        assert res[bench]["accuracy"] == pytest.approx(sum(right[i] for i in ids) / len(ids))
    assert set(res["bbeh"]["by_subject"]) == {"bbeh_boolean", "bbeh_hyperbaton"}
    prompt = choice.choice_prompt(next(it for it in items if it.benchmark == "mmlu-pro"))
    assert "(J) option" in prompt and "\\boxed{}" in prompt


def test_cli_scores_completions_file(tmp_path, rng_seed):
    rng = random.Random(rng_seed + 1)
    paths, truth = write_benchmarks(tmp_path, rng)
    comps, right = scripted(rng, truth)
    f = tmp_path / "completions.jsonl"
    f.write_text("".join(json.dumps({"id": i, "text": t[0]}) + "\n" for i, t in comps.items()))
    out = tmp_path / "res.json"
    res = subprocess.run([sys.executable, "-m", "megatron_sz", "eval", "choice", "--benchmarks", *map(str, paths),
                          "--completions", str(f), "--out", str(out)], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr
    got = json.loads(out.read_text())
    ids = [i for i in truth if i.startswith("supergpqa")]
    assert got["supergpqa"]["accuracy"] == pytest.approx(sum(right[i] for i in ids) / len(ids))
    assert "accuracy" in res.stdout


def test_bad_rows_are_one_line_errors(tmp_path):
    from megatron_sz.errors import DataError

    p = tmp_path / "mmlu.jsonl"
    p.write_text(json.dumps({"question": "q", "options": ["a", "b"], "answer": "E"}) + "\n")
    with pytest.raises(DataError, match="no usable answer"):
        choice.load_choice_benchmark(p)


def test_extract_choice():
    assert choice.extract_choice("blah \\boxed{C} more") == "C"
    assert choice.extract_choice("so the answer is (D).") == "D"
    assert choice.extract_choice("(A) no, (B) yes") == "B"
    assert choice.extract_choice("nothing") is None
