"""The local spec's RMSNorm (``megatron/norm.py``): weights in the model dtype (so bf16
norms dispatch to torch's fused kernel instead of warning and running unfused), the same
numbers as ``torch.nn.RMSNorm`` and a float64 formula, and every norm of a built bf16
model replaced, the final norm included."""
import types
import warnings

import pytest
import torch

from megatron_sz import dist
from megatron_sz.megatron.norm import RMSNorm


def _cfg(dtype=torch.float32, **kw):
    return types.SimpleNamespace(params_dtype=dtype, use_cpu_initialization=True, sequence_parallel=False,
                                 normalization="RMSNorm", layernorm_zero_centered_gamma=False, **kw)


def test_matches_torch_rmsnorm_and_float64(rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    x = torch.randn(5, 3, 24, generator=gen, requires_grad=True)
    ours = RMSNorm(_cfg(), 24, eps=1e-6)
    ref = torch.nn.RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        w = torch.rand(24, generator=gen) + 0.5
        ours.weight.copy_(w)
        ref.weight.copy_(w)
    got, want = ours(x), ref(x)
    torch.testing.assert_close(got, want)
    xd = x.detach().double()
    f64 = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(got.double(), f64, atol=1e-6, rtol=1e-5)
    g = torch.randn(got.shape, generator=gen)
    (gx_ours, gw_ours) = torch.autograd.grad(got, [x, ours.weight], g)
    (gx_ref, gw_ref) = torch.autograd.grad(want, [x, ref.weight], g)
    torch.testing.assert_close(gx_ours, gx_ref)
    torch.testing.assert_close(gw_ours, gw_ref)


def test_bf16_weight_stays_bf16_and_no_dtype_warning():
    norm = RMSNorm(_cfg(torch.bfloat16), 32)
    assert norm.weight.dtype == torch.bfloat16
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = norm(x)
    assert out.dtype == torch.bfloat16
    # the mismatch the issue saw: torch's own norm with an fp32 weight on bf16 input
    torch_norm = torch.nn.RMSNorm(32)
    assert torch_norm.weight.dtype == torch.float32
    with pytest.warns(UserWarning, match="Mismatch dtype"):
        torch_norm(x)


def test_rejects_layernorm_and_zero_centred_gamma():
    with pytest.raises(ValueError, match="only implements RMSNorm"):
        RMSNorm(_cfg(), 8, normalization="LayerNorm")
    with pytest.raises(ValueError, match="zero-centred"):
        RMSNorm(_cfg(), 8, zero_centered_gamma=True)


def _build_bf16(rank, world, hf_dir):
    from megatron_sz import megatron as mm
    from megatron_sz.megatron.model import unwrap

    mm.initialize_parallel(1, 1, seed=0)
    (chunk,) = mm.build_model(hf_dir, params_dtype="bf16", init_weights=True)
    gpt = unwrap(chunk)
    norms = [(n, type(m).__name__, str(m.weight.dtype)) for n, m in gpt.named_modules()
             if "norm" in n.split(".")[-1] and type(m).__name__ != "IdentityOp"]
    ids = torch.randint(0, 100, (2, 8)).to(next(chunk.parameters()).device)  # the GPU when there is one
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mm.forward_hidden(chunk, ids)
    return {"norms": norms, "warnings": [str(w.message) for w in caught if "Mismatch dtype" in str(w.message)]}


def test_built_bf16_model_has_only_model_dtype_norms(tmp_path):
    from megatron_sz.megatron.model import have_transformer_engine
    from megatron_sz.megatron.testing import make_tiny_hf_model

    if have_transformer_engine():  # pragma: no cover - GPU clusters use TE's norms
        pytest.skip("TransformerEngine installed: TE's fused norms are used instead")
    hf = make_tiny_hf_model(tmp_path / "qwen3", "qwen3")
    (res,) = dist.spawn(_build_bf16, 1, str(hf))
    kinds = {name.split(".")[-1] for name, _, _ in res["norms"]}
    # input, pre-MLP, q/k (Qwen3) and the final norm are all ours and all bf16
    assert {"input_layernorm", "pre_mlp_layernorm", "q_layernorm", "k_layernorm", "final_layernorm"} <= kinds
    assert all(cls == "RMSNorm" and dt == "torch.bfloat16" for _, cls, dt in res["norms"]), res["norms"]
    assert res["warnings"] == []
