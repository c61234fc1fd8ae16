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
  ``cu_seqlens``) attend within their own document only. With ``qkv_format="thd"``
  Megatron squeezes the batch dimension away before core attention, so the inputs are
  3-D ``[t, heads, head_dim]`` and the output must be ``[t, heads * head_dim]`` (the
  caller reshapes it to ``[t, 1, h]``). On CUDA in bf16/fp16 this runs
  ``torch.nn.attention.varlen.varlen_attn`` (flash attention over ``cu_seqlens``, no
  mask); elsewhere (CPU, fp32, older torch) SDPA with a block-diagonal causal mask,
  which is what the CPU tests check against separate, unpacked sequences.
* **No host sync for RoPE.** ``packed_seq_params()`` keeps ``cu_seqlens_q/kv`` on the host:
  Megatron's THD RoPE calls ``.tolist()`` on them in every layer, which on a GPU tensor
  would stall the stream twice per layer. The device copy the kernel needs rides along
  as ``cu_seqlens_device``.

Inputs are ``[s, b, heads_per_rank, head_dim]`` (keys/values with this rank's KV groups),
or ``[t, heads_per_rank, head_dim]`` for THD; the output is ``[s, b, heads_per_rank *
head_dim]`` (``[t, heads_per_rank * head_dim]`` for THD). ``attention_mask`` follows
Megatron's convention (True = masked out); None means causal.
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


def _varlen_fn():
    """``varlen_attn`` and how it is told "causal" on this torch build, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    try:
        params = inspect.signature(varlen_attn).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return None
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:  # pragma: no cover - torch 2.9/2.10 spelling
        causal = {"is_causal": True}
    else:  # pragma: no cover
        return None
    return varlen_attn, causal, "enable_gqa" in params, "scale" in params


_VARLEN = _varlen_fn()


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int, device=None):
    """Megatron ``PackedSeqParams`` (THD) for one packed row: ``cu_seqlens`` (int32 ``[S+1]``,
    its last entry the row length) stays on the host for Megatron's RoPE split; the copy
    on ``device`` that the attention kernel reads is ``.cu_seqlens_device``."""
    from megatron.core.packed_seq_params import PackedSeqParams

    host = cu_seqlens.to(device="cpu", dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=host, cu_seqlens_kv=host,
                          max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen))
    psp.cu_seqlens_device = host.to(device) if device is not None else host
    return psp


def _device_cu(psp, device) -> torch.Tensor:
    cu = getattr(psp, "cu_seqlens_device", None)
    if cu is None or cu.device != device:
        cu = psp.cu_seqlens_q.to(device)
    return cu.to(torch.int32)


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
        if query.dim() == 3:  # THD: Megatron squeezed the batch dimension of a packed row
            if packed_seq_params is None:
                raise ValueError("3-D [t, heads, head_dim] attention inputs need packed_seq_params (THD)")
            return self._thd(query, key, value, packed_seq_params)
        q = query.permute(1, 2, 0, 3)  # [b, h, s, d]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        k, v, kwargs = self._gqa(k, v, dim=1)
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

    def _gqa(self, k, v, *, dim: int, sdpa: bool = True):
        """Keys/values with fewer heads than queries: SDPA's ``enable_gqa`` when it has it,
        else repeated KV heads."""
        if self.heads == k.shape[dim]:
            return k, v, {}
        if sdpa and _HAS_GQA:
            return k, v, {"enable_gqa": True}
        rep = self.heads // k.shape[dim]  # pragma: no cover - torch < 2.5
        return k.repeat_interleave(rep, dim=dim), v.repeat_interleave(rep, dim=dim), {}

    def _thd(self, query, key, value, psp):
        """Packed row in THD: q ``[t, h, d]``, k/v ``[t, g, d]`` -> ``[t, h * d]``."""
        t = query.shape[0]
        cu = _device_cu(psp, query.device)
        if int(psp.cu_seqlens_q[-1]) != t:
            raise ValueError(f"cu_seqlens ends at {int(psp.cu_seqlens_q[-1])} but the packed row has {t} "
                             "tokens; the padding tail must be a segment of its own")
        dropout = self.dropout if self.training else 0.0
        if (_VARLEN is not None and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)
                and dropout == 0.0):
            fn, causal, has_gqa, has_scale = _VARLEN
            kw = dict(causal)
            k, v = key, value
            if self.heads != key.shape[1]:
                if has_gqa:
                    kw["enable_gqa"] = True
                else:  # pragma: no cover
                    k, v, _ = self._gqa(key, value, dim=1, sdpa=False)
            if has_scale:
                kw["scale"] = self.softmax_scale
            m = int(psp.max_seqlen_q)
            out = fn(query, k, v, cu, cu, m, m, **kw)
            if isinstance(out, tuple):  # pragma: no cover - return_aux builds
                out = out[0]
            return out.reshape(t, self.heads * self.head_dim)
        q = query.permute(1, 0, 2).unsqueeze(0)  # [1, h, t, d]
        k = key.permute(1, 0, 2).unsqueeze(0)
        v = value.permute(1, 0, 2).unsqueeze(0)
        k, v, kwargs = self._gqa(k, v, dim=1)
        allowed = packed_causal_mask(cu, t, query.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=False, dropout_p=dropout,
                                             scale=self.softmax_scale, **kwargs)
        return out[0].permute(1, 0, 2).reshape(t, self.heads * self.head_dim)
