"""Fused LM-head losses vs float64 references (CPU; Triton runs under TRITON_INTERPRET=1).

Every test draws fresh inputs from the ``rng_seed`` fixture and checks loss AND grads
(hidden, weight) for both backends. Shapes are deliberately awkward (N=37, V=1001, H=24;
V smaller than one block) and chunk sizes are forced small so the chunk loops, the pair
chunking of DPO and the cross-chunk dW accumulation are all exercised.
"""
from __future__ import annotations

import pytest
import torch

from megatron_sz.kernels import (dpo_loss, fused_linear_dpo_loss, fused_linear_wsft_loss,
                                 linear_logprobs, resolve_backend, sequence_logprobs)
from megatron_sz.kernels.reference import (ref_dpo_loss, ref_fused_linear_dpo_loss,
                                           ref_fused_linear_wsft_loss, ref_linear_logprobs)
from megatron_sz.kernels.testing import assert_close_verbose, describe_mismatch

BACKENDS = ["torch", "triton"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _device(backend):
    """Triton runs on the GPU when there is one, else on CPU under the interpreter."""
    if backend == "triton" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(seed, lead, h, v, dtype=torch.float32, scale=1.0, ignore_frac=0.2, device="cpu"):
    g = _gen(seed)
    hidden = (torch.randn(*lead, h, generator=g) * scale).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5 * 4).to(device, dtype).requires_grad_()
    labels = torch.randint(0, v, lead, generator=g)
    labels[torch.rand(lead, generator=g) < ignore_frac] = -100
    return hidden, weight, labels.to(device)


def _ref_leaves(hidden, weight):
    return (hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_())


def _check_grads(h, w, h_ref, w_ref, tol, what=""):
    assert_close_verbose(h.grad, h_ref.grad, rtol=tol, name=f"{what} hidden.grad")
    assert_close_verbose(w.grad, w_ref.grad, rtol=tol, name=f"{what} weight.grad")


# ----------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,v,temperature,vocab_pad,chunk", [
    (37, 1001, 1.0, 0, 16),      # awkward sizes, 3 chunks
    (37, 1001, 0.7, 13, None),   # temperature + Megatron padding rows, default chunking
    (5, 10, 1.3, 2, 2),          # V smaller than any block
])
def test_linear_logprobs_matches_reference(rng_seed, backend, dtype, n, v, temperature,
                                           vocab_pad, chunk):
    h, w, y = _inputs(rng_seed, (n,), 24, v, dtype, device=_device(backend))
    vocab_size = v - vocab_pad
    y = torch.where(y >= vocab_size, y % vocab_size, y)
    out = linear_logprobs(h, w, y, temperature=temperature, vocab_size=vocab_size,
                          backend=backend, chunk_size=chunk)
    assert out.dtype == torch.float32 and out.shape == (n,)
    upstream = torch.randn(n, generator=_gen(rng_seed + 1)).to(h.device)
    (out * upstream).sum().backward()
    hr, wr = _ref_leaves(h, w)
    ref = ref_linear_logprobs(hr, wr, y, temperature=temperature, vocab_size=vocab_size)
    (ref * upstream.double()).sum().backward()
    tol = TOL[dtype]
    assert_close_verbose(out, ref, rtol=tol, name="logp")
    _check_grads(h, w, hr, wr, tol)
    assert (out[y == -100] == 0).all()
    if vocab_pad:
        assert (w.grad[vocab_size:] == 0).all(), "padding rows must get exactly zero grad"


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_extreme_logits_and_all_ignored(rng_seed, backend):
    h, w, y = _inputs(rng_seed, (4, 9), 24, 301, device=_device(backend))
    with torch.no_grad():  # |z| ~ 1e4
        h.mul_(1e4 / (h @ w.t()).abs().max())
    y[1] = -100                                   # a fully ignored sequence
    out = linear_logprobs(h, w, y, backend=backend, chunk_size=7)
    assert out.shape == (4, 9) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert (h.grad[1] == 0).all()
    hr, wr = _ref_leaves(h, w)
    ref = ref_linear_logprobs(hr, wr, y)
    ref.sum().backward()
    assert_close_verbose(out, ref, rtol=1e-5, name="logp(|z|~1e4)")
    # fp32 logits of size 1e4 are only known to ~1 ulp = 1e-3 (the GEMM rounds them), so
    # probabilities of near-tied tokens - and hence the grads - carry ~1e-3 relative error
    # whatever the kernel does; the float64 reference sees exact logits.
    _check_grads(h, w, hr, wr, 5e-3, "extreme")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs_and_frozen_weight(rng_seed, backend):
    h, w, y = _inputs(rng_seed, (3, 11), 24, 257, device=_device(backend))
    w.requires_grad_(False)
    s = sequence_logprobs(h, w, y, backend=backend)
    s.sum().backward()
    hr, _ = _ref_leaves(h, w)
    ref = ref_linear_logprobs(hr, w, y).sum(-1)
    ref.sum().backward()
    assert_close_verbose(s, ref, rtol=1e-5, name="sequence logp")
    assert_close_verbose(h.grad, hr.grad, rtol=1e-5, name="hidden.grad")


# ----------------------------------------------------------------------------- DPO
DPO_CASES = [
    dict(loss_type="sigmoid"),
    dict(loss_type="sigmoid", label_smoothing=0.1),
    dict(loss_type="sigmoid", label_smoothing=0.3, nll_alpha=0.5),
    dict(loss_type="robust", label_smoothing=0.2),
    dict(loss_type="ipo", beta=0.5),
    dict(loss_type="hinge", beta=0.3),
    dict(loss_type="simpo", beta=2.0, simpo_gamma=0.8),
    dict(loss_type="sigmoid", reference_free=True, nll_alpha=1.0),
]


def _dpo_inputs(seed, b=3, t=7, v=1001, dtype=torch.float32, device="cpu"):
    h, w, y = _inputs(seed, (2 * b, t), 24, v, dtype, device=device)
    y[:, :2] = -100                             # prompt tokens
    g = _gen(seed + 7)
    rc = -torch.rand(b, generator=g) * 40
    rr = -torch.rand(b, generator=g) * 40
    return h, w, y, rc.to(device), rr.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DPO_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_fused_dpo_matches_reference(rng_seed, backend, case):
    h, w, y, rc, rr = _dpo_inputs(rng_seed, device=_device(backend))
    y[4, 2:] = -100                             # a fully ignored rejected completion
    kw = dict(case)
    kw.setdefault("beta", 0.1)
    loss, m = fused_linear_dpo_loss(h, w, y, ref_chosen_logps=rc, ref_rejected_logps=rr,
                                    backend=backend, chunk_size=15, temperature=0.9, **kw)
    loss.backward()
    hr, wr = _ref_leaves(h, w)
    loss_ref, m_ref = ref_fused_linear_dpo_loss(hr, wr, y, ref_chosen_logps=rc,
                                                ref_rejected_logps=rr, temperature=0.9, **kw)
    loss_ref.backward()
    assert_close_verbose(loss, loss_ref, rtol=1e-5, atol=1e-6, name="dpo loss")
    for k in ("chosen_rewards", "rejected_rewards", "reward_margins", "reward_accuracy",
              "nll_loss"):
        assert_close_verbose(m[k], m_ref[k], rtol=1e-5, atol=1e-5, name=k)
    _check_grads(h, w, hr, wr, 1e-5, "dpo")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_dpo_bf16_and_no_grad_path(rng_seed, backend):
    h, w, y, rc, rr = _dpo_inputs(rng_seed, b=2, t=5, v=500, dtype=torch.bfloat16,
                                  device=_device(backend))
    loss, _ = fused_linear_dpo_loss(h, w, y, ref_chosen_logps=rc, ref_rejected_logps=rr,
                                    backend=backend, nll_alpha=0.2)
    loss.backward()
    hr, wr = _ref_leaves(h, w)
    loss_ref, _ = ref_fused_linear_dpo_loss(hr, wr, y, ref_chosen_logps=rc,
                                            ref_rejected_logps=rr, nll_alpha=0.2)
    loss_ref.backward()
    assert_close_verbose(loss, loss_ref, rtol=2e-2, name="bf16 dpo loss")
    _check_grads(h, w, hr, wr, 2e-2, "bf16 dpo")
    with torch.no_grad():                       # evaluation path: no grad work at all
        loss_ng, _ = fused_linear_dpo_loss(h, w, y, ref_chosen_logps=rc,
                                           ref_rejected_logps=rr, backend=backend,
                                           nll_alpha=0.2)
    assert not loss_ng.requires_grad
    assert_close_verbose(loss_ng, loss.detach(), rtol=1e-6, name="no-grad loss")


def test_dpo_loss_on_logps_matches_reference(rng_seed):
    g = _gen(rng_seed)
    b = 6
    pc, pr = (-torch.rand(b, generator=g) * 50).requires_grad_(), \
        (-torch.rand(b, generator=g) * 50).requires_grad_()
    rc, rr = -torch.rand(b, generator=g) * 50, -torch.rand(b, generator=g) * 50
    lc, lr = torch.randint(1, 30, (b,), generator=g), torch.randint(1, 30, (b,), generator=g)
    for case in DPO_CASES:
        kw = {k: v for k, v in case.items() if k != "nll_alpha"}
        kw.setdefault("beta", 0.1)
        pc.grad = pr.grad = None
        loss, m = dpo_loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, **kw)
        loss.backward()
        pcr, prr = pc.detach().double().requires_grad_(), pr.detach().double().requires_grad_()
        loss_ref, m_ref = ref_dpo_loss(pcr, prr, rc, rr, chosen_lengths=lc, rejected_lengths=lr,
                                       **kw)
        loss_ref.backward()
        assert_close_verbose(loss, loss_ref, rtol=1e-5, atol=1e-6, name=f"{case} loss")
        assert_close_verbose(pc.grad, pcr.grad, rtol=1e-5, name=f"{case} d/dchosen")
        assert_close_verbose(pr.grad, prr.grad, rtol=1e-5, name=f"{case} d/drejected")
        assert_close_verbose(m["reward_margins"], m_ref["reward_margins"], rtol=1e-5,
                             atol=1e-6, name="margins")
        assert_close_verbose(m["reward_accuracy"], m_ref["reward_accuracy"], rtol=0, atol=1e-6,
                             name="accuracy")


# ----------------------------------------------------------------------------- WSFT
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalization", ["sum", "sequence", "token"])
def test_fused_wsft_matches_reference(rng_seed, backend, normalization):
    h, w, y = _inputs(rng_seed, (4, 9), 24, 1001, device=_device(backend))
    y = torch.where(y >= 990, y % 990, y)        # labels never point into padding rows
    y[2] = -100                                  # fully ignored sample
    sw = (torch.rand(4, generator=_gen(rng_seed + 3)) * 3).to(h.device)
    sw[1] = 0.0                                  # zero-weight sample
    loss = fused_linear_wsft_loss(h, w, y, sw, normalization=normalization, backend=backend,
                                  chunk_size=10, vocab_size=990)
    loss.backward()
    hr, wr = _ref_leaves(h, w)
    loss_ref = ref_fused_linear_wsft_loss(hr, wr, y, sw, normalization=normalization,
                                          vocab_size=990)
    loss_ref.backward()
    assert_close_verbose(loss, loss_ref, rtol=1e-5, atol=1e-6, name="wsft loss")
    _check_grads(h, w, hr, wr, 1e-5, "wsft")
    assert (h.grad[1] == 0).all() and (h.grad[2] == 0).all(), \
        "weight-0 / fully ignored samples must contribute exactly zero gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_wsft_zero_weight_exact_and_doubling_is_linear(rng_seed, backend):
    h, w, y = _inputs(rng_seed, (3, 6), 24, 300, device=_device(backend))
    sw = (torch.rand(3, generator=_gen(rng_seed)) + 0.5).to(h.device)

    def grads(weights):
        hh, ww = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        fused_linear_wsft_loss(hh, ww, y, weights, normalization="sum",
                               backend=backend).backward()
        return hh.grad, ww.grad

    gh_base, gw_base = grads(sw)
    sw0 = sw.clone()
    sw0[0] = 0
    gh_zero, gw_zero = grads(sw0)
    assert (gh_zero[0] == 0).all()
    # dW without sample 0 == dW from a batch that only has samples 1, 2 (same 1/B)
    hh, ww = h.detach()[1:].clone().requires_grad_(), w.detach().clone().requires_grad_()
    (fused_linear_wsft_loss(hh, ww, y[1:], sw[1:], backend=backend) * 2 / 3).backward()
    assert_close_verbose(gw_zero, ww.grad, rtol=1e-5, name="dW without the weight-0 sample")
    sw2 = sw.clone()
    sw2[2] *= 2
    gh_dbl, _ = grads(sw2)
    assert_close_verbose(gh_dbl[2], 2 * gh_base[2], rtol=1e-6, name="doubled sample grad")
    assert_close_verbose(gh_dbl[:2], gh_base[:2], rtol=1e-6, name="other samples unchanged")


# ----------------------------------------------------------------------------- API checks
def test_input_errors_are_clear():
    h = torch.randn(4, 8)
    w = torch.randn(10, 8)
    y = torch.randint(0, 10, (4,))
    with pytest.raises(TypeError, match="same dtype"):
        linear_logprobs(h, w.double(), y)
    with pytest.raises(TypeError, match="integer"):
        linear_logprobs(h, w, y.float())
    with pytest.raises(ValueError, match="H = weight.shape"):
        linear_logprobs(h, torch.randn(10, 9), y)
    with pytest.raises(ValueError, match="labels shape"):
        linear_logprobs(h, w, y[:3])
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(h, w, y, temperature=0)
    with pytest.raises(ValueError, match="vocab_size"):
        linear_logprobs(h, w, y, vocab_size=11)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        linear_logprobs(h, w, y, backend="cuda")
    h3 = torch.randn(3, 2, 8)
    y3 = torch.randint(0, 10, (3, 2))
    with pytest.raises(ValueError, match=r"\[2B, T, H\]"):
        fused_linear_dpo_loss(h3, w, y3, reference_free=True)
    h4, y4 = torch.randn(4, 2, 8), torch.randint(0, 10, (4, 2))
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        fused_linear_dpo_loss(h4, w, y4)
    with pytest.raises(ValueError, match="loss_type"):
        fused_linear_dpo_loss(h4, w, y4, reference_free=True, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(torch.zeros(2), torch.zeros(2), None, None, reference_free=True,
                 label_smoothing=0.5)
    with pytest.raises(ValueError, match="normalization"):
        fused_linear_wsft_loss(h4, w, y4, torch.ones(4), normalization="mean")
    with pytest.raises(ValueError, match="sample_weights"):
        fused_linear_wsft_loss(h4, w, y4, torch.ones(3))


def test_backend_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("MEGATRON_SZ_KERNEL_BACKEND", "torch")
    assert resolve_backend("triton", torch.device("cpu")) == "torch"
    monkeypatch.setenv("MEGATRON_SZ_KERNEL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MEGATRON_SZ_KERNEL_BACKEND"):
        resolve_backend("auto", torch.device("cpu"))
    monkeypatch.delenv("MEGATRON_SZ_KERNEL_BACKEND")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_verbose_allclose_reports_where():
    e = torch.arange(10.0)
    a = e.clone()
    a[3] = 100.0
    a[7] = float("nan")
    report = describe_mismatch(a, e, rtol=1e-5, atol=0, name="x")
    assert "2 of 10" in report and "(3,)" in report and "NaN disagreements: 1" in report
    assert describe_mismatch(e, e.clone(), rtol=0, atol=0) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU for the bf16 "
                    "tensor-core path; the CPU tests check the same maths in fp32/bf16")
def test_gpu_bf16_triton_matches_reference(rng_seed):
    h, w, y, rc, rr = _dpo_inputs(rng_seed, b=4, t=64, v=32000, dtype=torch.bfloat16)
    h, w = h.detach().cuda().requires_grad_(), w.detach().cuda().requires_grad_()
    y, rc, rr = y.cuda(), rc.cuda(), rr.cuda()
    loss, _ = fused_linear_dpo_loss(h, w, y, ref_chosen_logps=rc, ref_rejected_logps=rr,
                                    backend="triton", chunk_size=128)
    loss.backward()
    hr, wr = _ref_leaves(h, w)
    loss_ref, _ = ref_fused_linear_dpo_loss(hr, wr, y, ref_chosen_logps=rc, ref_rejected_logps=rr)
    loss_ref.backward()
    assert_close_verbose(loss, loss_ref, rtol=2e-2, name="gpu loss")
    _check_grads(h, w, hr, wr, 3e-2, "gpu")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_with_gpu_block_config_match_torch_twins(rng_seed, out_dtype):
    """The GPU launch configuration (1-row stats programs, 4x1024 dlogits tiles, bf16
    dlogits output) runs here under the interpreter against the torch twins, so the GPU
    path is checked for everything but speed."""
    if torch.cuda.is_available():
        pytest.skip("covered by the CUDA runs of the tests above")
    from megatron_sz.kernels import logprobs as lp
    from megatron_sz.kernels._common import OpConfig

    g = _gen(rng_seed)
    n, v = 9, 1100
    logits = torch.randn(n, v, generator=g) * 5
    labels = torch.randint(0, 2000, (n,), generator=g)      # some owned by "other ranks"
    labels[2] = -100
    cfg = OpConfig(backend="triton", vocab_start=1000, vocab_local=v, vocab_size=2050,
                   ignore_index=-100, inv_temp=1 / 0.8, tp_group=None, chunk_rows=n)
    got = lp._stats_triton(logits, labels, cfg, gpu_blocks=True)
    want = lp._stats_torch(logits, labels, cfg)
    for name, a, e in zip("mst", got, want):
        assert_close_verbose(a, e, rtol=1e-6, name=f"stats {name}")
    lse = want[0] + torch.log(want[1])
    coef = torch.randn(n, generator=g)
    d_got = lp._dlogits_triton(logits.clone(), labels, lse, coef, cfg, out_dtype,
                               gpu_blocks=True)
    d_want = lp._dlogits_torch(logits.clone(), labels, lse, coef, cfg, torch.float32)
    assert d_got.dtype == out_dtype
    assert_close_verbose(d_got.float(), d_want, rtol=1e-6 if out_dtype == torch.float32 else 1e-2,
                         name="dlogits")
    assert (d_got[:, 2050 - 1000:] == 0).all(), "padding columns must get zero dlogits"


def test_no_full_logits_are_kept_or_built(rng_seed, monkeypatch):
    """Memory contract: nothing of size N x V is saved for backward, and every logits
    GEMM covers at most ``chunk_size`` token rows (DPO: whole pairs, 2*T rows)."""
    from megatron_sz.kernels import logprobs as lp

    rows_seen = []
    real_mm = lp.mm_f32

    def spy(a, b):
        out = real_mm(a, b)
        if out.shape[1] == v:
            rows_seen.append(out.shape[0])
        return out

    monkeypatch.setattr(lp, "mm_f32", spy)
    b, t, h, v = 4, 6, 16, 700
    hid, w, y, rc, rr = _dpo_inputs(rng_seed, b=b, t=t, v=v)
    hid = hid.detach()[:, :, :h].clone().requires_grad_()
    w = w.detach()[:, :h].clone().requires_grad_()
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss, _ = fused_linear_dpo_loss(hid, w, y, ref_chosen_logps=rc, ref_rejected_logps=rr,
                                        chunk_size=2 * t, backend="torch")
        out = linear_logprobs(hid, w, y, chunk_size=5, backend="torch")
        wl = fused_linear_wsft_loss(hid, w, y, torch.ones(2 * b), chunk_size=7, backend="torch")
    (loss + out.sum() + wl).backward()
    n_tokens = 2 * b * t
    assert max(saved) <= max(hid.numel(), w.numel()) < n_tokens * v
    assert rows_seen and max(rows_seen) <= 2 * t, rows_seen
