"""The Megatron-Core adapter: the only package in megatron-sz that imports ``megatron.core``.

Public API (everything else in the package is an implementation detail):

* ``ensure_cpu_shim()`` (no-op with CUDA), ``initialize_parallel(tp, pp, *, vpp=None, seed=1234)``
* ``build_model(hf_config, *, tp, pp, params_dtype, make_vocab_size_divisible_by=128,
  sequence_parallel=False, recompute=None, init_weights=True) -> list[GPTModel]``;
  ``hf_config`` is a dict, an HF folder or a megatron-sz checkpoint folder
* ``load_hf_weights(chunks, hf_dir)``
* ``forward_hidden(model, input_ids, position_ids=None, attention_mask=None,
  packed_seq_params=None) -> [s, b, h]`` (packed: one THD row, ``[t, 1, h]``),
  ``lm_head_weight(model) -> [V_pad/tp, h]``, ``vocab_parallel_logits(model, hidden)``,
  ``forward_logits`` / ``pipeline_forward_logits`` (parity checks),
  ``true_vocab_size`` / ``padded_vocab_size`` / ``vocab_shard_range``, ``unwrap``
* ``save_checkpoint(root, chunks, optimizer=None, *, step, extra_state, keep_last=None)``,
  ``load_checkpoint(root, chunks, optimizer=None) -> {"step", "path", **extra_state} | None``,
  ``latest_checkpoint(root)``
* conversion: ``hf_to_mcore``, ``mcore_to_hf``, ``check`` (module ``convert``)

The model shape (HF config parsing, supported families, layout rules) is not here: it is
``megatron_sz.model_shape``, shared with ``plan`` and pre-flight, and has no Megatron import.
Supported: Qwen3 dense, Qwen2/2.5, Llama 3 (llama3 RoPE scaling), Mistral without sliding
window. Not yet: GLM-4, MoE.

Imports are lazy so ``import megatron_sz.megatron`` stays cheap.
"""
from __future__ import annotations

_EXPORTS = {
    "ensure_cpu_shim": "megatron_sz.megatron.cpu_shim",
    "initialize_parallel": "megatron_sz.megatron.model",
    "build_model": "megatron_sz.megatron.model",
    "forward_hidden": "megatron_sz.megatron.model",
    "forward_logits": "megatron_sz.megatron.model",
    "lm_head_weight": "megatron_sz.megatron.model",
    "true_vocab_size": "megatron_sz.megatron.model",
    "padded_vocab_size": "megatron_sz.megatron.model",
    "vocab_shard_range": "megatron_sz.megatron.model",
    "vocab_parallel_logits": "megatron_sz.megatron.model",
    "pipeline_forward_logits": "megatron_sz.megatron.model",
    "unwrap": "megatron_sz.megatron.model",
    "load_hf_weights": "megatron_sz.megatron.weights",
    "save_checkpoint": "megatron_sz.megatron.checkpoint",
    "load_checkpoint": "megatron_sz.megatron.checkpoint",
    "latest_checkpoint": "megatron_sz.megatron.checkpoint",
    "hf_to_mcore": "megatron_sz.megatron.convert",
    "mcore_to_hf": "megatron_sz.megatron.convert",
    "check": "megatron_sz.megatron.convert",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megatron_sz.megatron' has no attribute {name!r}")
