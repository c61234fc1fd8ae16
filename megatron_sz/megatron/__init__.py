"""The Megatron-Core adapter: the only package in megatron-sz that imports ``megatron.core``.

Public API (everything else in the package is an implementation detail):

* ``ensure_cpu_shim()``, ``initialize_parallel(tp, pp, *, vpp=None, seed=1234)``
* ``build_model(hf_config, *, tp, pp, params_dtype, ...) -> list[GPTModel]``
* ``load_hf_weights(chunks, hf_dir)``
* ``forward_hidden`` / ``forward_logits`` / ``lm_head_weight`` / ``true_vocab_size`` /
  ``padded_vocab_size`` / ``vocab_shard_range``
* ``save_checkpoint`` / ``load_checkpoint`` / ``latest_checkpoint``
* conversion: ``hf_to_mcore``, ``mcore_to_hf``, ``check`` (module ``convert``)

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
    "arch_from_hf_config": "megatron_sz.megatron.arch",
    "read_hf_config": "megatron_sz.megatron.arch",
    "ModelArch": "megatron_sz.megatron.arch",
    "check_layout": "megatron_sz.megatron.arch",
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
