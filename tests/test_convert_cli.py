"""``megatron-sz convert`` end to end, plus the errors users hit first.

hf-to-mcore at TP=2 spawns two real ranks; mcore-to-hf and check at TP=1 run in this
process (a temporary 1-rank gloo group). The error tests never start a rank: config and
tensor validation happens before any spawn.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_sz.cli import main
from megatron_sz.megatron.testing import LLAMA3_ROPE, make_tiny_hf_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    seed = int.from_bytes(__import__("os").urandom(4), "little") % (2 ** 31)
    print(f"[seed] convert cli: {seed}")
    # other awkward sizes than the parity test: vocab 517, 3 KV groups x 2 heads, 4 layers
    return make_tiny_hf_model(tmp_path_factory.mktemp("cli") / "llama", "llama", seed=seed, vocab_size=517,
                              hidden_size=48, intermediate_size=72, num_layers=4, heads=6, kv_heads=3,
                              head_dim=20, rope_scaling=LLAMA3_ROPE)


def test_cli_roundtrip_and_check(llama_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    ckpt, back = tmp_path / "mcore", tmp_path / "hf_back"
    assert main(["convert", "hf-to-mcore", str(llama_dir), str(ckpt), "--tp", "3", "--no-progress"]) == 0
    assert (ckpt / "latest").read_text().strip() == "iter_0000000"
    assert json.loads((ckpt / "iter_0000000" / "hf_config.json").read_text())["model_type"] == "llama"
    assert main(["convert", "mcore-to-hf", str(ckpt), str(back), "--no-progress"]) == 0
    src, got = load_file(str(llama_dir / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert sorted(src) == sorted(got)
    for key in src:
        assert torch.equal(src[key], got[key]), key
    record = tmp_path / "check.jsonl"
    capsys.readouterr()
    assert main(["convert", "check", str(llama_dir), "--ckpt", str(ckpt), "--seq-len", "48",
                 "--record", str(record)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("OK: max abs logits diff")
    res = json.loads(record.read_text().splitlines()[-1])
    assert res["ok"] and res["max_abs_diff"] <= 1e-4 and res["seq_len"] == 48

    # a corrupted weight must fail the check with exit code 1
    bad = tmp_path / "hf_bad"
    shutil.copytree(back, bad)
    from safetensors.torch import save_file

    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.2.mlp.down_proj.weight"] = tensors["model.layers.2.mlp.down_proj.weight"] * 1.05
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert main(["convert", "check", str(bad), "--ckpt", str(ckpt), "--seq-len", "48"]) == 1
    assert capsys.readouterr().out.startswith("FAIL")


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes,key", [
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"model_type": "qwen3_moe"}, "model_type"),
    ({"num_experts": 8}, "num_experts"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_parameters"),
    ({"architectures": ["Qwen3ForCausalLM"]}, "architectures"),
])
def test_unsupported_config_names_the_key(llama_dir, tmp_path, capsys, changes, key):
    d = _edit_config(llama_dir, tmp_path / "bad", **changes)
    assert main(["convert", "hf-to-mcore", str(d), str(tmp_path / "out"), "--tp", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and key in err


def test_missing_tensor_is_named(llama_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "missing"
    shutil.copytree(llama_dir, d)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert main(["convert", "hf-to-mcore", str(d), str(tmp_path / "out")]) == 2
    assert "model.layers.1.self_attn.k_proj.weight" in capsys.readouterr().err


def test_shape_mismatch_is_named(llama_dir, tmp_path, capsys):
    d = _edit_config(llama_dir, tmp_path / "wider", intermediate_size=96)
    assert main(["convert", "hf-to-mcore", str(d), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "mlp.gate_proj.weight" in err and "[72, 48]" in err


def test_impossible_layout_is_refused(llama_dir, tmp_path, capsys):
    assert main(["convert", "hf-to-mcore", str(llama_dir), str(tmp_path / "out"), "--tp", "2"]) == 2
    assert "num_key_value_heads=3 is not divisible by tp=2" in capsys.readouterr().err
    assert main(["convert", "hf-to-mcore", str(llama_dir), str(tmp_path / "out"), "--pp", "3"]) == 2
    assert "num_hidden_layers=4 is not divisible by pp=3" in capsys.readouterr().err


def test_mcore_to_hf_refuses_partial_checkpoint(tmp_path, capsys):
    (tmp_path / "ckpt" / ".tmp_iter_0000004").mkdir(parents=True)
    assert main(["convert", "mcore-to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
