"""Fused (SDPA) core attention vs an unfused float64 computation: causal, GQA, explicit
masks, right padding without a mask, and packed sequences vs the same sequences unpacked,
as one 4-D row and in Megatron's 3-D THD layout ([t, heads, dim] -> [t, heads * dim])."""
import math
import types

import pytest
import torch

from megatron_sz.megatron.attention import FusedCoreAttention, packed_causal_mask


def _attn(heads=4, groups=2, d=8):
    cfg = types.SimpleNamespace(num_attention_heads=heads, num_query_groups=groups, kv_channels=d,
                                attention_dropout=0.0)
    pg = types.SimpleNamespace(tp=types.SimpleNamespace(size=lambda: 1))
    return FusedCoreAttention(cfg, 1, None, None, pg_collection=pg).eval()


def _unfused(q, k, v, allowed):
    """softmax(q k^T / sqrt(d) masked) v in float64, KV groups repeated: [s, b, h*d]."""
    s, b, h, d = q.shape
    rep = h // k.shape[2]
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, -1) @ v
    return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


def _qkv(s, b, h, g, d, gen):
    return (torch.randn(s, b, h, d, generator=gen), torch.randn(s, b, g, d, generator=gen),
            torch.randn(s, b, g, d, generator=gen))


@pytest.mark.parametrize("h,g", [(4, 4), (4, 2), (6, 1)])
def test_causal_and_gqa_match_unfused(rng_seed, h, g):
    gen = torch.Generator().manual_seed(rng_seed)
    q, k, v = _qkv(7, 3, h, g, 8, gen)
    got = _attn(h, g)(q, k, v, None)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    torch.testing.assert_close(got.double(), _unfused(q, k, v, causal), atol=2e-6, rtol=1e-5)


def test_explicit_mask_matches_unfused(rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    q, k, v = _qkv(5, 2, 4, 2, 8, gen)
    masked = torch.rand(2, 1, 5, 5, generator=gen) > 0.6        # Megatron: True = masked out
    masked[..., torch.arange(5), torch.arange(5)] = False        # every query sees itself
    got = _attn()(q, k, v, masked)
    ref = torch.stack([_unfused(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], ~masked[i, 0])[:, 0]
                       for i in range(2)], 1)
    torch.testing.assert_close(got.double(), ref, atol=2e-6, rtol=1e-5)


def test_right_padding_needs_no_mask(rng_seed):
    """The trainer right-pads and passes no mask: real tokens come out as if alone."""
    gen = torch.Generator().manual_seed(rng_seed)
    lens = [9, 4, 6]
    q, k, v = _qkv(9, 3, 4, 2, 8, gen)
    got = _attn()(q, k, v, None)
    for i, n in enumerate(lens):
        alone = _attn()(q[:n, i:i + 1], k[:n, i:i + 1], v[:n, i:i + 1], None)
        torch.testing.assert_close(got[:n, i:i + 1], alone, atol=1e-6, rtol=1e-5)


def test_packed_sequences_attend_within_their_document(rng_seed):
    from megatron.core.packed_seq_params import PackedSeqParams

    gen = torch.Generator().manual_seed(rng_seed)
    lens = [3, 1, 5, 2]
    total = sum(lens)
    q, k, v = _qkv(total, 1, 4, 2, 8, gen)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          max_seqlen_q=max(lens), max_seqlen_kv=max(lens))
    got = _attn()(q, k, v, None, packed_seq_params=psp)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        alone = _unfused(q[sl], k[sl], v[sl], torch.ones(n, n, dtype=torch.bool).tril())
        torch.testing.assert_close(got[sl].double(), alone, atol=2e-6, rtol=1e-5)
        start += n
    m = packed_causal_mask(cu, total)
    assert m.sum() == sum(n * (n + 1) // 2 for n in lens)
    with pytest.raises(ValueError, match="one row"):
        _attn()(q.expand(total, 2, 4, 8), k.expand(total, 2, 2, 8), v.expand(total, 2, 2, 8), None,
                packed_seq_params=psp)


@pytest.mark.parametrize("h,g", [(4, 2), (4, 4), (6, 1)])
def test_thd_packed_3d_matches_unpacked(rng_seed, h, g):
    """Megatron's THD path squeezes the batch dim: 3-D inputs, [t, h*d] out; a padding tail of
    its own segments stays finite and leaves the real documents alone; gradients flow."""
    from megatron_sz.megatron.attention import packed_seq_params

    gen = torch.Generator().manual_seed(rng_seed)
    lens = [4, 1, 6, 3, 2, 2]  # the last two: padding segments
    total = sum(lens)
    q, k, v = (x[:, 0].requires_grad_() for x in _qkv(total, 1, h, g, 8, gen))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    psp = packed_seq_params(cu, max(lens))
    assert psp.cu_seqlens_q.device.type == "cpu" and psp.qkv_format == "thd"
    got = _attn(h, g)(q, k, v, None, packed_seq_params=psp)
    assert got.shape == (total, h * 8) and torch.isfinite(got).all()
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        alone = _unfused(q[sl, None], k[sl, None], v[sl, None], torch.ones(n, n, dtype=torch.bool).tril())[:, 0]
        torch.testing.assert_close(got[sl].double(), alone, atol=2e-6, rtol=1e-5)
        start += n
    got[:4].sum().backward()  # the first document's output depends on its own keys only
    assert k.grad[4:].abs().max() == 0 and k.grad[:4].abs().max() > 0
    with pytest.raises(ValueError, match="packed_seq_params"):
        _attn(h, g)(q, k, v, None)
    short = packed_seq_params(cu[:-1], max(lens))
    with pytest.raises(ValueError, match="padding tail"):
        _attn(h, g)(q, k, v, None, packed_seq_params=short)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU: varlen_attn (flash over "
                    "cu_seqlens) runs only there; the CPU tests check the block-diagonal SDPA path")
@pytest.mark.parametrize("h,g", [(16, 8), (8, 8)])
def test_varlen_gpu_path_matches_per_document_attention(rng_seed, h, g):
    """bf16 on CUDA takes varlen_attn; forward and gradients must equal each document's own
    causal attention (float64 on the same bf16 inputs)."""
    from megatron_sz.megatron import attention as A

    if A._VARLEN is None:
        pytest.skip("this torch build has no torch.nn.attention.varlen")
    gen = torch.Generator().manual_seed(rng_seed)
    lens = [300, 17, 1, 640, 90]
    total, d = sum(lens), 128
    q, k, v = (x[:, 0].to("cuda", torch.bfloat16).requires_grad_() for x in _qkv(total, 1, h, g, d, gen))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    psp = A.packed_seq_params(cu, max(lens), device="cuda")
    attn = _attn(h, g, d).cuda()
    got = attn(q, k, v, None, packed_seq_params=psp)
    up = torch.randn(got.shape, generator=gen).to("cuda", torch.bfloat16)
    (got.float() * up.float()).sum().backward()
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        qd, kd, vd = (x.detach()[sl, None].double().requires_grad_() for x in (q, k, v))
        alone = _unfused(qd, kd, vd, torch.ones(n, n, dtype=torch.bool, device="cuda").tril())[:, 0]
        torch.testing.assert_close(got[sl].double(), alone, atol=2e-2, rtol=2e-2)
        (alone * up[sl].double()).sum().backward()
        for name, x, xd in (("q", q, qd), ("k", k, kd), ("v", v, vd)):
            torch.testing.assert_close(x.grad[sl].double(), xd.grad[:, 0], atol=5e-2, rtol=5e-2,
                                       msg=lambda m, name=name: f"d{name}: {m}")
        start += n


def test_local_spec_never_uses_unfused_attention():
    from megatron_sz.megatron.model import have_transformer_engine, layer_spec
    from megatron_sz.model_shape import model_shape

    cfg = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 32,
           "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 8, "vocab_size": 64, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
           "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu"}
    spec = layer_spec(model_shape(cfg))
    core = spec.submodules.self_attention.submodules.core_attention
    if have_transformer_engine():  # pragma: no cover - GPU clusters
        assert "TE" in getattr(core, "__name__", str(core))
    else:
        assert core is FusedCoreAttention
