"""Triton-fused, vocab-parallel LM-head losses (installed as ``megatron_sz.kernels``).

Public API (see each module for details):

* :func:`linear_logprobs` - per-token log-probs from hidden states and a Megatron vocab
  shard, never materialising [N, V] logits; :func:`sequence_logprobs` sums them per row.
* :func:`dpo_loss` - DPO family on sequence log-probs (sigmoid/cDPO, robust, ipo, hinge,
  simpo).
* :func:`fused_linear_dpo_loss` - the same straight from hidden states (grads in forward).
* :func:`fused_linear_wsft_loss` - weighted SFT straight from hidden states.

Every op takes ``backend="auto"|"triton"|"torch"`` ($MEGATRON_SZ_KERNEL_BACKEND forces
one), ``tp_group`` (explicit; ``None`` = no tensor parallelism) and ``vocab_size`` (the
true vocabulary; rows beyond it are Megatron padding). float64 references live in
``megatron_sz.kernels.reference``.
"""
from ._common import BACKEND_ENV, CHUNK_ENV, resolve_backend
from .dpo import DPOOptions, dpo_loss, fused_linear_dpo_loss
from .logprobs import linear_logprobs, sequence_logprobs
from .wsft import fused_linear_wsft_loss

__all__ = ["linear_logprobs", "sequence_logprobs", "dpo_loss", "fused_linear_dpo_loss",
           "fused_linear_wsft_loss", "DPOOptions", "resolve_backend", "BACKEND_ENV",
           "CHUNK_ENV"]
