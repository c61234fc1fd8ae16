"""Triton-fused, vocab-parallel LM-head losses (installed as ``megatron_sz.kernels``).

Public API (see each module for details):

* :func:`linear_logprobs` - per-token log-probs from hidden states and a Megatron vocab
  shard, never materialising [N, V] logits; :func:`sequence_logprobs` sums them per row.
* :func:`dpo_loss` - DPO family on sequence log-probs (sigmoid/cDPO, robust, ipo, hinge,
  simpo).
* :func:`fused_linear_dpo_loss` - the same straight from hidden states (grads in forward).
* :func:`fused_linear_wsft_loss` - weighted SFT straight from hidden states.
* :func:`fused_linear_pg_loss` - PPO-clipped policy gradient (GRPO / REINFORCE++ / ADPO
  objectives; KL, entropy bonus, aggregation modes) straight from hidden states.

Every op takes ``backend="auto"|"triton"|"torch"`` ($MEGATRON_SZ_KERNEL_BACKEND forces
one), ``tp_group`` (explicit; ``None`` = no tensor parallelism) and ``vocab_size`` (the
true vocabulary; rows beyond it are Megatron padding). float64 references live in
``megatron_sz.kernels.reference``.

Gradients: dW goes to a buffer in the weight's dtype (``dw_accumulation="float32"`` for
an fp32 accumulator), or with ``main_grad=True`` straight into ``weight.main_grad``
(Megatron DDP's fp32 buffer; the ops that compute grads in forward take the upstream
``grad_scale`` and count a mismatch in :func:`main_grad_mismatches`).
"""
from __future__ import annotations

import importlib

# Names resolve lazily (PEP 562) so that ``megatron-sz --help`` and the CLI's bench
# registration can import this package without importing torch/triton.
_EXPORTS = {
    "linear_logprobs": "logprobs", "sequence_logprobs": "logprobs",
    "dpo_loss": "dpo", "fused_linear_dpo_loss": "dpo", "DPOOptions": "dpo",
    "fused_linear_wsft_loss": "wsft",
    "fused_linear_pg_loss": "pg", "PGOptions": "pg",
    "main_grad_mismatches": "logprobs",
    "resolve_backend": "_common", "BACKEND_ENV": "_common", "CHUNK_ENV": "_common",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
