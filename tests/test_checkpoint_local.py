"""Checkpoint housekeeping and bf16 conversion, in this process (1-rank gloo world, TP=1).

The multi-rank behaviour (TP=2 save -> TP=1/PP=2 load, crash mid-save, optimizer
resume) is in test_megatron_parity.py; these are the cheap single-rank cases.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_sz.cli import main
from megatron_sz.errors import CheckpointError
from megatron_sz.megatron.testing import make_tiny_hf_model


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    seed = int.from_bytes(os.urandom(4), "little") % (2 ** 31)
    print(f"[seed] checkpoint local: {seed}")
    return make_tiny_hf_model(tmp_path_factory.mktemp("ckpt_local") / "qwen3", "qwen3", seed=seed, tied=True)


def test_keep_last_latest_and_stale_tmp(qwen3_dir, tmp_path):
    import megatron_sz.megatron as mm
    from megatron_sz.megatron.convert import _world

    root = tmp_path / "ckpts"
    (root / ".tmp_iter_0000099").mkdir(parents=True)  # left by a killed save
    with _world():
        mm.initialize_parallel(1, 1)
        chunks = mm.build_model(qwen3_dir, init_weights=False)
        mm.load_hf_weights(chunks, qwen3_dir)
        for step in (10, 20, 30):
            mm.save_checkpoint(root, chunks, step=step, extra_state={"step_seen": step}, keep_last=2)
        assert sorted(p.name for p in root.iterdir()) == ["iter_0000020", "iter_0000030", "latest"]
        assert (root / "latest").read_text().strip() == "iter_0000030"
        # a pointer to a deleted folder falls back to the newest complete checkpoint
        (root / "latest").write_text("iter_0000040\n")
        state = mm.load_checkpoint(root, chunks)
        assert state["step"] == 30 and state["step_seen"] == 30
        # an empty root is "no checkpoint yet", not an error
        assert mm.load_checkpoint(tmp_path / "empty", chunks) is None


def test_load_hf_weights_of_another_architecture_is_refused(qwen3_dir, tmp_path):
    import megatron_sz.megatron as mm
    from megatron_sz.megatron.convert import _world

    other = make_tiny_hf_model(tmp_path / "llama", "llama")
    with _world():
        mm.initialize_parallel(1, 1)
        chunks = mm.build_model(qwen3_dir, init_weights=False)
        with pytest.raises(CheckpointError, match="model_type"):
            mm.load_hf_weights(chunks, other)


def test_bf16_conversion_roundtrip_and_check(qwen3_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    ckpt, back = tmp_path / "mcore_bf16", tmp_path / "hf_bf16"
    assert main(["convert", "hf-to-mcore", str(qwen3_dir), str(ckpt), "--dtype", "bf16", "--no-progress"]) == 0
    assert main(["convert", "mcore-to-hf", str(ckpt), str(back), "--no-progress"]) == 0
    src, got = load_file(str(qwen3_dir / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert sorted(src) == sorted(got)
    for key in src:
        assert got[key].dtype == torch.bfloat16
        assert torch.equal(src[key].to(torch.bfloat16), got[key]), key
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    capsys.readouterr()
    # the check rounds the HF reference like the checkpoint, so it tests the mapping
    assert main(["convert", "check", str(qwen3_dir), "--ckpt", str(ckpt), "--seq-len", "32"]) == 0
    assert capsys.readouterr().out.startswith("OK")
