"""Fused core attention for Megatron's local layer spec: ``FusedCoreAttention`` (SDPA).

What is unusual here
--------------------
* **It is the default wherever TransformerEngine is absent, on CPU and GPU alike.**
  Megatron's local ``DotProductAttention`` materialises ``[b, heads, s, s]`` scores in
  every layer (and needs CUDA). On an H200 without TE, solver-dpo at the Qwen3-1.7B
  shape ran at 18.8% MFU with it and ran out of memory at micro-batch 4; swapping in
  SDPA gave 32.5% at micro-batch 2 (issue 18). ``torch.nn.functional.
  scaled_dot_product_attention`` picks flash / cuDNN / memory-efficient kernels on GPU.
* **Padding never forces the math kernel.** The trainer right-pads every row and passes
  no mask: with causal attention a real token never attends to a pad on its right, and
  pad positions carry no loss, so ``is_causal=True`` without an explicit mask is exact
  for the tokens that count, and flash attention stays eligible.
* **GQA without copies.** Keys and values keep their ``num_query_groups`` heads and SDPA's
  ``enable_gqa`` broadcasts them; the ``repeat_interleave`` fallback is only used on
  torch builds without that argument.
* **Packed sequences** (several documents in one row, Megatron's ``PackedSeqParams`` with
  ``cu_seqlens``) attend within their own document only: a block-diagonal causal mask,
  which is what the CPU tests check against separate, unpacked sequences.

Inputs are ``[s, b, heads_per_rank, head_dim]`` (keys/values with this rank's KV groups);
the output is ``[s, b, heads_per_rank * head_dim]``. ``attention_mask`` follows Megatron's
convention (True = masked out); None means causal.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F

def _has_gqa() -> bool:
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: probe it
        q = torch.zeros(1, 2, 1, 1)
        try:
            F.scaled_dot_product_attention(q, q[:, :1], q[:, :1], enable_gqa=True)
            return True
        except TypeError:
            return False


_HAS_GQA = _has_gqa()


def packed_causal_mask(cu_seqlens: torch.Tensor, total: int, device=None) -> torch.Tensor:
    """Bool ``[total, total]`` mask, True = may attend: causal within each packed document."""
    bounds = cu_seqlens.to(device=device or cu_seqlens.device, dtype=torch.long)
    doc = torch.bucketize(torch.arange(total, device=bounds.device), bounds[1:], right=True)
    pos = torch.arange(total, device=bounds.device)
    return (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])


class FusedCoreAttention(torch.nn.Module):
    """Drop-in core attention for Megatron's local spec (same constructor and forward contract)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type=None, pg_collection=None):
        super().__init__()
        from megatron.core.parallel_state import get_tensor_model_parallel_world_size

        self.config = config
        if pg_collection is not None and getattr(pg_collection, "tp", None) is not None:
            tp = pg_collection.tp.size()
        else:
            tp = get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.groups = max(1, config.num_query_groups // tp) if config.num_query_groups else self.heads
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by FusedCoreAttention")
        q = query.permute(1, 2, 0, 3)  # [b, h, s, d]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        kwargs = {}
        if self.heads != k.shape[1]:
            if _HAS_GQA:
                kwargs["enable_gqa"] = True
            else:  # pragma: no cover - torch < 2.5
                rep = self.heads // k.shape[1]
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
        if packed_seq_params is not None:
            if q.shape[0] != 1:
                raise ValueError("packed sequences come as one row (Megatron's THD layout, batch 1); "
                                 f"got batch {q.shape[0]}")
            allowed = packed_causal_mask(packed_seq_params.cu_seqlens_q, q.shape[2], q.device)
            mask, causal = allowed, False
        elif attention_mask is None:
            mask, causal = None, True
        else:
            mask, causal = ~attention_mask.bool(), False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0, scale=self.softmax_scale, **kwargs)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)
