"""Tiny, local fixtures for training tests and smoke runs (no downloads).

* ``tiny_config``: a Qwen3-shaped HF config small enough to train on a 2-core CPU, and
  splittable as TP=2 (heads, KV groups, ffn) and PP=2 (layers).
* ``make_tokenizer``: a SentencePiece model trained on the fixture texts.
* ``arithmetic_*``: problems, SFT records and DPO pairs with a *systematic* preference:
  the chosen completion boxes the sum it just wrote down, the rejected one boxes a
  different number. A policy that learns to copy the computed sum into ``\\boxed{}``
  prefers chosen on unseen problems, so held-out preference accuracy is meaningful.
* ``write_recipe``: a recipe YAML around them, with any section overridden.
"""
from __future__ import annotations

from contextlib import contextmanager

import json
import random
from pathlib import Path
from typing import Any

from megatron_sz.data import PreferencePair, Problem, WeightedExample, write_jsonl


def tiny_config(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                head_dim: int = 16, ffn: int = 128, tie: bool = True, max_pos: int = 512) -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab_size,
            "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "hidden_act": "silu", "max_position_embeddings": max_pos, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "tie_word_embeddings": tie, "attention_bias": False,
            "initializer_range": 0.02, "torch_dtype": "float32"}


def _problem_text(a: int, b: int) -> str:
    return f"Compute {a} + {b}."


def arithmetic_problems(n: int, *, seed: int, lo: int = 0, hi: int = 9) -> list[Problem]:
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if (a, b) in seen and len(seen) < (hi - lo + 1) ** 2:
            continue
        seen.add((a, b))
        out.append(Problem(id=f"p{len(out)}-{a}-{b}", problem=_problem_text(a, b), answer=str(a + b),
                           solution=f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."))
    return out


def solution_text(a: int, b: int, boxed: int) -> str:
    return f"{a} + {b} = {a + b}. The answer is \\boxed{{{boxed}}}."


def arithmetic_pairs(n: int, *, seed: int, prompt_fn=None, wrong: str = "near") -> list[PreferencePair]:
    """``wrong="near"``: the rejected answer is the sum off by 1..5 (learning to prefer
    chosen means copying the computed sum; slow for a tiny random model);
    ``wrong="negative"``: the rejected answer is a negative number (a surface feature a
    tiny model picks up within a few dozen DPO steps)."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if wrong == "negative":
            wrong_v = -rng.randint(1, 18)
        else:
            wrong_v = a + b + rng.choice([d for d in range(-5, 6) if d and a + b + d >= 0])
        prompt = prompt_fn(_problem_text(a, b)) if prompt_fn else _problem_text(a, b) + "\n"
        pairs.append(PreferencePair(prompt=prompt, chosen=solution_text(a, b, a + b),
                                    rejected=solution_text(a, b, wrong_v), problem_id=f"q{i}-{a}-{b}"))
    return pairs


def arithmetic_weighted(n: int, *, seed: int) -> list[WeightedExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        s = rng.randint(0, 8) / 8
        from megatron_sz.train.objectives import gaussian_weight

        out.append(WeightedExample(prompt=f"Problem: {_problem_text(a, b)}\nFailed: {a + b + 1}\nNew problem:",
                                   target=_problem_text(a + 1, b), weight=gaussian_weight(s),
                                   weight_source={"kind": "gaussian", "success_rate": s, "mu": 0.5, "sigma": 0.2,
                                                  "k": 8}, problem_id=f"w{i}"))
    return out


def fixture_texts() -> list[str]:
    texts = []
    for a in range(10):
        for b in range(10):
            texts.append(_problem_text(a, b))
            texts.append(solution_text(a, b, a + b))
            texts.append(f"Problem: {_problem_text(a, b)}\nFailed: {a + b + 1}\nNew problem:")
    return texts


def make_tokenizer(out_dir: str | Path, *, vocab_size: int = 400) -> Any:
    from megatron_sz.tokenizer import train_sentencepiece

    tok = train_sentencepiece(fixture_texts(), out_dir, vocab_size=vocab_size, seed=0)
    return tok


def write_recipe(path: str | Path, *, config: dict, tokenizer: str, sections: dict | None = None,
                 name: str = "train-test") -> Path:
    """A recipe YAML for the tiny model; ``sections`` deep-merges over the defaults."""
    import yaml

    train = {"max_length": 64, "micro_batch_size": 2, "global_batch_size": 4, "epochs": 1,
             "export_hf": False, "optim": {"lr": 3e-3, "warmup_steps": 0, "decay": "constant", "clip_grad": 1.0}}
    data: dict = {"name": name, "seed": 1234, "device": "cpu", "tokenizer": {"kind": "sentencepiece", "path": tokenizer},
                  "wandb": {"mode": "disabled"},
                  "solver": {"model": {"config": config, "dtype": "fp32"}, "parallel": {"tp": 1, "pp": 1},
                             "sft": json.loads(json.dumps(train)), "dpo": json.loads(json.dumps(train))},
                  "generator": {"model": {"config": config, "dtype": "fp32"}, "parallel": {"tp": 1, "pp": 1},
                                "wsft": json.loads(json.dumps(train))}}
    _merge(data, sections or {})
    path = Path(path)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def save_hf_model(out_dir: str | Path, config: dict, *, seed: int = 0, tokenizer: Any = None) -> Path:
    """A randomly initialised HF Qwen3 checkpoint (transformers), e.g. a common starting
    point for runs at different TP/PP layouts (Megatron's random init depends on the layout)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in config.items() if k != "architectures"}))
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save(out_dir)
    return Path(out_dir)


_WORLD_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


class isolated_world:
    """Context manager for in-process jobs in a test session: on exit, destroy the
    process group and Megatron's parallel state that ``run_job`` created, and restore
    the rendezvous variables ``dist.init_from_env`` exported (a later subprocess would
    otherwise try to bind the same MASTER_PORT)."""

    def __enter__(self):
        import os

        import torch.distributed as tdist

        self._had_world = tdist.is_available() and tdist.is_initialized()
        self._env = {k: os.environ.get(k) for k in _WORLD_ENV}
        return self

    def __exit__(self, *exc):
        import os

        import torch.distributed as tdist

        if self._had_world:
            return
        try:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
        except ImportError:
            pass
        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()
        for k, v in self._env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def tiny_job_env(root: str | Path):
    """What every in-process job test needs: a tokenizer and a tiny Qwen3-shaped config
    under ``root``, single-threaded torch (a loaded 2-core box is ~20x slower with two
    intra-op threads fighting other processes) and an ``isolated_world``. Yields
    ``{"root", "tok" (its folder), "cfg", "tokenizer"}``; a module-scoped fixture wraps it."""
    import torch

    root = Path(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = make_tokenizer(root / "tok")
        with isolated_world():
            yield {"root": root, "tok": str(root / "tok"), "cfg": tiny_config(tok.vocab_size), "tokenizer": tok}
    finally:
        torch.set_num_threads(threads)


def write_records(path: str | Path, records: list) -> Path:
    write_jsonl(path, records)
    return Path(path)
