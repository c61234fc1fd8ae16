"""Adversarial, independent checks of the four public kernel functions (issue 4).

The float64 references here are written from the issue's formulas and TRL's conventions,
NOT imported from ``megatron_sz.kernels.reference``, so a shared misreading cannot hide.
Shapes, dtypes and loss options are drawn from the ``rng_seed`` fixture; all TP=2 checks
run in ONE gloo spawn. Triton runs under TRITON_INTERPRET=1 on CPU (set by conftest).
"""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from megatron_sz.kernels import (dpo_loss, fused_linear_dpo_loss, fused_linear_wsft_loss,
                                 linear_logprobs)

BACKENDS = ("torch", "triton")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _dev(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


# ===================================================================== float64 references
def ref_token_logps(h, w, y, *, ignore_index=-100, temperature=1.0, vocab_size=None):
    """log softmax(h @ w^T / T)[y] in float64; columns >= vocab_size are padding."""
    z = (h.double() @ w.double().t()) / temperature
    if vocab_size is not None:
        z = z[..., :vocab_size]
    lsm = z - torch.logsumexp(z, dim=-1, keepdim=True)
    valid = y != ignore_index
    picked = lsm.gather(-1, torch.where(valid, y, torch.zeros_like(y)).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def ref_dpo(pc, pr, rc, rr, lc, lr, *, beta, loss_type, eps, ref_free, gamma=0.5):
    """Per-pair losses + (chosen, rejected) rewards, TRL DPOTrainer / CPOTrainer formulas."""
    pc, pr = pc.double(), pr.double()
    if ref_free or loss_type == "simpo" or rc is None:
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    rc, rr = rc.double(), rr.double()
    if loss_type in ("ipo", "simpo") and lc is not None:
        lc, lr = lc.double().clamp(min=1), lr.double().clamp(min=1)
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    d = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":      # TRL: cDPO without the 1/(1-2eps)
        losses = -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
    elif loss_type == "robust":     # ANCHORS.md / TRL "robust"
        losses = (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) \
            / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (d - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.clamp(1 - beta * d, min=0)
    elif loss_type == "simpo":      # CPOTrainer: beta * (pi_logratios - gamma / beta)
        zz = beta * (d - gamma / beta)
        losses = -(1 - eps) * F.logsigmoid(zz) - eps * F.logsigmoid(-zz)
    else:
        raise AssertionError(loss_type)
    return losses, beta * (pc - rc), beta * (pr - rr)


def ref_fused_dpo(h, w, y, rc, rr, *, beta, loss_type, eps, ref_free, nll_alpha, ignore_index,
                  temperature=1.0, vocab_size=None, gamma=0.5, lengths=None):
    b = h.shape[0] // 2
    tok = ref_token_logps(h, w, y, ignore_index=ignore_index, temperature=temperature,
                          vocab_size=vocab_size)
    seq = tok.sum(-1)
    lens = (y != ignore_index).sum(-1).double()
    nl = lens if lengths is None else lengths.double()      # ipo/simpo normaliser
    losses, cr, rj = ref_dpo(seq[:b], seq[b:], rc, rr, nl[:b], nl[b:], beta=beta,
                             loss_type=loss_type, eps=eps, ref_free=ref_free, gamma=gamma)
    nll = -seq[:b].sum() / lens[:b].sum().clamp(min=1)
    return losses.mean() + nll_alpha * nll, cr.detach(), rj.detach(), nll.detach()


def ref_wsft(h, w, y, sw, *, normalization, ignore_index, temperature=1.0, vocab_size=None):
    tok = ref_token_logps(h, w, y, ignore_index=ignore_index, temperature=temperature,
                          vocab_size=vocab_size)
    nll = -tok
    n_b = (y != ignore_index).sum(-1).double()
    sw = sw.double()
    b = h.shape[0]
    if normalization == "sum":
        return (sw * nll.sum(-1)).sum() / b
    if normalization == "sequence":
        return (sw * torch.where(n_b > 0, nll.sum(-1) / n_b.clamp(min=1), 0 * n_b)).sum() / b
    total = n_b.sum()
    return (sw * nll.sum(-1)).sum() / total if total > 0 else (sw * nll.sum(-1)).sum() * 0


# ===================================================================== helpers
def close(actual, expected, tol, name, floor=0.1):
    """max|a-e| <= tol * (max|e| + floor): a scale-relative bound; NaN/inf never pass.
    ``floor`` covers results that are small by cancellation or saturation of O(1) fp32
    terms (e.g. log-probs ~1e-4 at V=2, T=0.5 are exact to ~1e-7 absolute, not 1e-9)."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values {a[~torch.isfinite(a)][:5]}"
    if e.numel() == 0:
        return
    bound = tol * (float(e.abs().max()) + floor)
    err = (a - e).abs()
    if float(err.max()) > bound:
        i = int(err.flatten().argmax())
        raise AssertionError(f"{name}: {int((err > bound).sum())}/{e.numel()} bad, max err "
                             f"{float(err.max()):.3e} > {bound:.3e} at flat {i}: "
                             f"{float(a.flatten()[i]):.8g} vs {float(e.flatten()[i]):.8g}")


def make(rng, lead, h, v, dtype, device, *, ignore_index=-100, ignore_frac=0.25, scale=3.0,
         v_real=None):
    v_real = v if v_real is None else v_real
    hidden = torch.randn(*lead, h, dtype=torch.float64)
    weight = torch.randn(v, h, dtype=torch.float64) * scale / math.sqrt(h)
    y = torch.randint(0, v_real, lead)
    flat = y.view(-1)
    # shard/block boundary ids and the extremes of the vocabulary
    specials = [0, v_real - 1, v_real // 2, max(0, v_real // 2 - 1)]
    for k, sid in enumerate(specials[: flat.numel()]):
        flat[rng.randrange(flat.numel())] = sid
    drop = torch.rand(lead) < ignore_frac
    y[drop] = ignore_index
    hidden = hidden.to(device, dtype).requires_grad_()
    weight = weight.to(device, dtype).requires_grad_()
    return hidden, weight, y.to(device)


def leaves64(*ts):
    return [t.detach().double().cpu().requires_grad_() for t in ts]


# ===================================================================== linear_logprobs
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_logprobs_random(rng_seed, backend, dtype):
    rng = random.Random(rng_seed)
    torch.manual_seed(rng_seed)
    dev = _dev(backend)
    tol = TOL[dtype]
    for case in range(3):
        n = rng.choice([1, 2, 7, 19, 33])
        hd = rng.choice([1, 3, 8, 13])
        v = rng.choice([1, 2, 5, 31, 97, 257, 1031])
        pad = rng.choice([0, 0, 1, 3]) if v > 1 else 0
        temp = rng.choice([1.0, 0.5, 2.0])
        ign = rng.choice([-100, -1, 0])
        three_d = rng.random() < 0.5 and n > 1
        lead = (1, n) if three_d and n % 2 else ((2, n // 2) if three_d else (n,))
        lead = tuple(d for d in lead) if all(lead) else (n,)
        chunk = rng.choice([None, 1, 3, 8])
        h, w, y = make(rng, lead, hd, v + pad, dtype, dev, ignore_index=ign, v_real=v)
        tag = f"case{case} lead={lead} H={hd} V={v}+{pad} T={temp} ign={ign} chunk={chunk}"
        out = linear_logprobs(h, w, y, ignore_index=ign, temperature=temp,
                              vocab_size=v if pad else None, backend=backend, chunk_size=chunk)
        assert out.dtype == torch.float32 and out.shape == y.shape, tag
        h64, w64 = leaves64(h, w)
        ref = ref_token_logps(h64, w64, y.cpu(), ignore_index=ign, temperature=temp,
                              vocab_size=v)
        close(out, ref, tol, f"{tag} logp")
        assert bool((out[y == ign] == 0).all()), f"{tag}: ignored positions not 0"
        assert bool((out <= 1e-6).all()), f"{tag}: log-prob > 0"
        up = torch.randn(y.shape, dtype=torch.float64)
        (out * up.to(dev, torch.float32)).sum().backward()
        (ref * up).sum().backward()
        close(h.grad, h64.grad, tol, f"{tag} hidden.grad")
        close(w.grad, w64.grad, tol, f"{tag} weight.grad")
        if pad:
            assert bool((w.grad[v:] == 0).all()), f"{tag}: padding rows got gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_extreme_and_all_ignored(rng_seed, backend):
    rng = random.Random(rng_seed)
    dev = _dev(backend)
    h, w, y = make(rng, (9,), 6, 23, torch.float32, dev, scale=1.0)
    with torch.no_grad():
        h.mul_(3e3)                           # |z| ~ 1e4
    out = linear_logprobs(h, w, y, backend=backend)
    h64, w64 = leaves64(h, w)
    ref = ref_token_logps(h64, w64, y.cpu())
    close(out, ref, 1e-5, "extreme logp")
    out.sum().backward()
    ref.sum().backward()
    # fp32 logits near 1e4 carry ~1e-3 absolute rounding, so softmax (and the grads) can
    # only be ~1e-3 relative; the point here is finiteness and no max-shift bug
    close(h.grad, h64.grad, 3e-3, "extreme hidden.grad")
    close(w.grad, w64.grad, 3e-3, "extreme weight.grad")
    # every position ignored: zeros out, zero grads
    h2, w2, _ = make(rng, (2, 4), 5, 11, torch.float32, dev)
    y2 = torch.full((2, 4), -100, device=dev)
    out2 = linear_logprobs(h2, w2, y2, backend=backend)
    assert bool((out2 == 0).all())
    out2.sum().backward()
    assert bool((h2.grad == 0).all()) and bool((w2.grad == 0).all())


def test_backend_env_var_forces(rng_seed, monkeypatch):
    from megatron_sz.kernels import logprobs as lp_mod

    calls = []
    real = lp_mod._stats_triton
    monkeypatch.setattr(lp_mod, "_stats_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = random.Random(rng_seed)
    h, w, y = make(rng, (5,), 4, 9, torch.float32, _dev("triton"))
    monkeypatch.setenv("MEGATRON_SZ_KERNEL_BACKEND", "torch")
    a = linear_logprobs(h, w, y, backend="triton")
    assert not calls, "env var torch did not override backend='triton'"
    monkeypatch.setenv("MEGATRON_SZ_KERNEL_BACKEND", "triton")
    b = linear_logprobs(h, w, y, backend="torch")
    assert calls, "env var triton did not override backend='torch'"
    close(a, b, 1e-6, "torch vs triton")
    monkeypatch.setenv("MEGATRON_SZ_KERNEL_BACKEND", "cuda-magic")
    with pytest.raises(ValueError):
        linear_logprobs(h, w, y)


# ===================================================================== dpo_loss
LOSS_CASES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.3), ("robust", 0.1),
              ("robust", 0.3), ("robust", 0.0), ("ipo", 0.0), ("hinge", 0.0),
              ("simpo", 0.0), ("simpo", 0.1)]


def test_dpo_loss_all_types_vs_trl_formulas(rng_seed):
    rng = random.Random(rng_seed)
    torch.manual_seed(rng_seed)
    for loss_type, eps in LOSS_CASES:
        for ref_free in (False, True):
            for with_len in (False, True):
                b = rng.choice([1, 2, 5])
                beta = rng.choice([0.05, 0.1, 0.5, 2.0])
                # float32 values, so the float64 reference sees exactly the same inputs
                pc, pr, rc, rr = (-torch.rand(b) * 40).double(), (-torch.rand(b) * 40).double(), \
                    (-torch.rand(b) * 40).double(), (-torch.rand(b) * 40).double()
                lc = torch.randint(1, 30, (b,)) if with_len else None
                lr = torch.randint(1, 30, (b,)) if with_len else None
                tag = f"{loss_type} eps={eps} ref_free={ref_free} len={with_len} B={b} beta={beta}"
                a_c = pc.float().requires_grad_()
                a_r = pr.float().requires_grad_()
                loss, m = dpo_loss(a_c, a_r, rc.float(), rr.float(), beta=beta,
                                   loss_type=loss_type, label_smoothing=eps,
                                   chosen_lengths=lc, rejected_lengths=lr,
                                   reference_free=ref_free)
                e_c, e_r = pc.clone().requires_grad_(), pr.clone().requires_grad_()
                losses, cr, rj = ref_dpo(e_c, e_r, rc, rr, lc, lr, beta=beta,
                                         loss_type=loss_type, eps=eps, ref_free=ref_free)
                close(loss, losses.mean(), 1e-5, f"{tag} loss", floor=0.1)
                loss.backward()
                losses.mean().backward()
                close(a_c.grad, e_c.grad, 1e-5, f"{tag} d/dchosen", floor=0.1)
                close(a_r.grad, e_r.grad, 1e-5, f"{tag} d/drejected", floor=0.1)
                # rewards = beta * (policy - ref) cancel O(10) fp32 log-probs: floor at 0.1
                close(m["chosen_rewards"], cr.mean(), 1e-5, f"{tag} chosen_rewards", floor=0.1)
                close(m["rejected_rewards"], rj.mean(), 1e-5, f"{tag} rejected_rewards", floor=0.1)
                close(m["reward_margins"], (cr - rj).mean(), 1e-5, f"{tag} margins", floor=0.1)
                if bool(((cr - rj).abs() > 1e-4).all()):
                    close(m["reward_accuracy"], (cr > rj).double().mean(), 1e-6, f"{tag} acc")


def test_dpo_loss_reference_free_needs_no_refs_and_simpo_gamma():
    pc, pr = torch.tensor([-3.0, -7.0]), torch.tensor([-5.0, -2.0])
    loss, _ = dpo_loss(pc, pr, beta=0.3, reference_free=True)
    exp, _, _ = ref_dpo(pc, pr, None, None, None, None, beta=0.3, loss_type="sigmoid",
                        eps=0.0, ref_free=True)
    close(loss, exp.mean(), 1e-6, "ref-free sigmoid")
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, beta=0.3)            # refs required unless reference_free
    loss, _ = dpo_loss(pc, pr, beta=2.0, loss_type="simpo", simpo_gamma=1.3)
    exp, _, _ = ref_dpo(pc, pr, None, None, None, None, beta=2.0, loss_type="simpo", eps=0.0,
                        ref_free=True, gamma=1.3)
    close(loss, exp.mean(), 1e-6, "simpo gamma")


# ===================================================================== fused DPO
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_dpo_random(rng_seed, backend):
    rng = random.Random(rng_seed)
    torch.manual_seed(rng_seed)
    dev = _dev(backend)
    cases = list(LOSS_CASES)
    rng.shuffle(cases)
    for i, (loss_type, eps) in enumerate(cases[:6]):
        dtype = torch.bfloat16 if i == 5 else torch.float32
        tol = TOL[dtype]
        b = rng.choice([1, 2, 3])
        t = rng.choice([1, 3, 5])
        hd = rng.choice([3, 8, 12])
        v = rng.choice([2, 7, 61, 203])
        ign = rng.choice([-100, -1])
        ref_free = rng.random() < 0.4
        alpha = rng.choice([0.0, 0.0, 0.5])
        beta = rng.choice([0.1, 0.5, 2.0])
        temp = rng.choice([1.0, 0.5, 2.0])
        chunk = rng.choice([None, 1, t, 2 * t + 1])
        h, w, y = make(rng, (2 * b, t), hd, v, dtype, dev, ignore_index=ign, ignore_frac=0.3)
        if rng.random() < 0.5:
            y[rng.randrange(2 * b)] = ign     # a fully ignored sequence
        rc = (-torch.rand(b) * 5 * t).to(dev)
        rr = (-torch.rand(b) * 5 * t).to(dev)
        lengths = torch.randint(1, 9, (2 * b,)) if rng.random() < 0.3 else None
        tag = (f"lengths={lengths} {loss_type} eps={eps} ref_free={ref_free} B={b} T={t} "
               f"H={hd} V={v} "
               f"alpha={alpha} beta={beta} temp={temp} ign={ign} chunk={chunk} {dtype}")
        loss, m = fused_linear_dpo_loss(
            h, w, y, ref_chosen_logps=None if ref_free else rc,
            ref_rejected_logps=None if ref_free else rr, beta=beta, loss_type=loss_type,
            label_smoothing=eps, reference_free=ref_free, nll_alpha=alpha, ignore_index=ign,
            temperature=temp, backend=backend, chunk_size=chunk,
            chosen_lengths=None if lengths is None else lengths[:b].to(dev),
            rejected_lengths=None if lengths is None else lengths[b:].to(dev))
        h64, w64 = leaves64(h, w)
        eloss, cr, rj, nll = ref_fused_dpo(h64, w64, y.cpu(), rc.cpu(), rr.cpu(), beta=beta,
                                           loss_type=loss_type, eps=eps, ref_free=ref_free,
                                           nll_alpha=alpha, ignore_index=ign, temperature=temp,
                                           lengths=lengths)
        close(loss, eloss, tol, f"{tag} loss", floor=0.1)
        (loss * 1.7).backward()
        (eloss * 1.7).backward()
        close(h.grad, h64.grad, tol, f"{tag} hidden.grad")
        close(w.grad, w64.grad, tol, f"{tag} weight.grad")
        # rewards are differences of fp32 sums: judge them on the scale of their terms
        fl = beta * (float(m["policy_chosen_logps"].abs()) + float(m["policy_rejected_logps"]
                                                                    .abs()) + 5 * t + 1)
        close(m["chosen_rewards"], cr.mean(), tol, f"{tag} chosen_rewards", floor=fl)
        close(m["rejected_rewards"], rj.mean(), tol, f"{tag} rejected_rewards", floor=fl)
        close(m["reward_margins"], (cr - rj).mean(), tol, f"{tag} margins", floor=fl)
        # the NLL can be ~1e-5 (log-probs near 0, e.g. V=2 at T=0.5): fp32 log-sum-exp of O(1)
        # logits is only exact to ~1e-7 absolute, so judge it on the scale of the loss (0.1)
        close(m["nll_loss"], nll, tol, f"{tag} nll", floor=0.1)
        if bool(((cr - rj).abs() > 1e-2).all()):
            close(m["reward_accuracy"], (cr > rj).double().mean(), 1e-6, f"{tag} accuracy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_dpo_completely_ignored_batch(rng_seed, backend):
    rng = random.Random(rng_seed)
    dev = _dev(backend)
    h, w, _ = make(rng, (4, 3), 5, 13, torch.float32, dev)
    y = torch.full((4, 3), -100, device=dev)
    loss, m = fused_linear_dpo_loss(h, w, y, reference_free=True, nll_alpha=1.0,
                                    backend=backend)
    assert torch.isfinite(loss)
    close(loss, torch.tensor(math.log(2.0)), 1e-6, "all-ignored loss = -log sigmoid(0)")
    loss.backward()
    assert bool((h.grad == 0).all()) and bool((w.grad == 0).all())
    for norm in ("sum", "sequence", "token"):   # WSFT on an all-ignored batch: 0, no grads
        h.grad = w.grad = None
        loss = fused_linear_wsft_loss(h, w, y, torch.rand(4, device=dev) + 0.1,
                                      normalization=norm, backend=backend)
        assert float(loss.detach()) == 0.0, f"{norm}: {float(loss.detach())}"
        loss.backward()
        assert bool((h.grad == 0).all()) and bool((w.grad == 0).all()), norm


# ===================================================================== fused WSFT
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_wsft_random(rng_seed, backend):
    rng = random.Random(rng_seed)
    torch.manual_seed(rng_seed)
    dev = _dev(backend)
    for i, norm in enumerate(["sum", "sequence", "token", rng.choice(["sum", "token"])]):
        dtype = torch.bfloat16 if i == 3 else torch.float32
        tol = TOL[dtype]
        b = rng.choice([1, 2, 4])
        t = rng.choice([1, 2, 5])
        hd = rng.choice([2, 7, 16])
        v = rng.choice([3, 29, 130])
        ign = rng.choice([-100, -1, 0]) if v > 3 else -100
        temp = rng.choice([1.0, 0.5, 2.0])
        chunk = rng.choice([None, 1, 4])
        h, w, y = make(rng, (b, t), hd, v, dtype, dev, ignore_index=ign)
        sw = torch.rand(b) * 3
        if b > 1:
            sw[rng.randrange(b)] = 0.0
            y[rng.randrange(b)] = ign
        sw = sw.to(dev)
        tag = f"{norm} B={b} T={t} H={hd} V={v} ign={ign} temp={temp} chunk={chunk} {dtype}"
        loss = fused_linear_wsft_loss(h, w, y, sw, normalization=norm, ignore_index=ign,
                                      temperature=temp, backend=backend, chunk_size=chunk)
        h64, w64 = leaves64(h, w)
        eloss = ref_wsft(h64, w64, y.cpu(), sw.cpu(), normalization=norm, ignore_index=ign,
                         temperature=temp)
        close(loss, eloss, tol, f"{tag} loss")
        loss.backward()
        eloss.backward()
        close(h.grad, h64.grad, tol, f"{tag} hidden.grad")
        close(w.grad, w64.grad, tol, f"{tag} weight.grad")
        for k in range(b):
            if float(sw[k]) == 0.0:
                assert bool((h.grad[k] == 0).all()), f"{tag}: zero-weight sample has dX"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["sum", "sequence", "token"])
def test_wsft_weight_semantics(rng_seed, backend, norm):
    """weight 0 => exactly no gradient from that sample (dW bitwise unchanged when its
    hidden states change); the gradient is linear in the weights (doubling w_k adds
    exactly sample k's own contribution once more)."""
    rng = random.Random(rng_seed)
    dev = _dev(backend)
    b, t = 3, 4
    h, w, y = make(rng, (b, t), 6, 17, torch.float32, dev, ignore_frac=0.2)
    y[:, 0] = 5                                # every sample has >= 1 token
    sw = (torch.rand(b) + 0.5).to(dev)

    def grads(hh, weights):
        hh = hh.detach().clone().requires_grad_()
        ww = w.detach().clone().requires_grad_()
        fused_linear_wsft_loss(hh, ww, y, weights, normalization=norm, backend=backend,
                               chunk_size=3).backward()
        return hh.grad, ww.grad

    k = rng.randrange(b)
    zero = sw.clone()
    zero[k] = 0
    gh0, gw0 = grads(h, zero)
    assert bool((gh0[k] == 0).all())
    h_other = h.detach().clone()
    h_other[k] = torch.randn_like(h_other[k]) * 5
    gh1, gw1 = grads(h_other, zero)
    assert torch.equal(gw0, gw1), "a zero-weight sample changed dW"
    only_k = torch.zeros_like(sw)
    only_k[k] = sw[k]
    dbl = sw.clone()
    dbl[k] = 2 * sw[k]
    gh, gw = grads(h, sw)
    ghk, gwk = grads(h, only_k)
    ghd, gwd = grads(h, dbl)
    close(ghd, gh + ghk, 1e-5, "doubled w_k hidden.grad")
    close(gwd, gw + gwk, 1e-5, "doubled w_k weight.grad")
    close(ghd[k], 2 * gh[k], 1e-5, "doubled w_k own rows")


@pytest.mark.parametrize("backend", BACKENDS)
def test_wsft_sample_weight_grad(rng_seed, backend):
    """sample_weights that require grad get d loss / d w (the loss is linear in w)."""
    rng = random.Random(rng_seed)
    dev = _dev(backend)
    for norm in ("sum", "sequence", "token"):
        h, w, y = make(rng, (3, 4), 5, 19, torch.float32, dev)
        y[1] = -100
        sw = (torch.rand(3) * 2).to(dev).requires_grad_()
        loss = fused_linear_wsft_loss(h, w, y, sw, normalization=norm, backend=backend)
        loss.backward()
        h64, w64 = leaves64(h, w)
        sw64 = sw.detach().double().cpu().requires_grad_()
        ref_wsft(h64, w64, y.cpu(), sw64, normalization=norm, ignore_index=-100).backward()
        close(sw.grad, sw64.grad, 1e-5, f"{norm} sample_weights.grad")


def test_api_edges():
    import numpy as np

    h, w = torch.randn(3, 4), torch.randn(7, 4)
    y = torch.tensor([1, -1, 6])
    close(linear_logprobs(h, w, y, ignore_index=np.int64(-1)),
          ref_token_logps(h, w, y, ignore_index=-1), 1e-5, "numpy ignore_index")
    with pytest.raises(ValueError):           # one length without the other is ambiguous
        dpo_loss(torch.randn(2), torch.randn(2), torch.randn(2), torch.randn(2),
                 loss_type="ipo", chosen_lengths=torch.tensor([3, 4]))


# ===================================================================== TP = 2
def _tp_worker(rank, world, seed):
    """All four ops at TP=2 on vocab shards vs float64 reference on the full weight and vs
    TP=1. Returns (failures, per-op hidden-grad fingerprints for cross-rank identity)."""
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    rng = random.Random(seed)
    torch.manual_seed(seed)
    fails, prints = [], []

    def chk(a, e, tol, name):
        try:
            close(a, e, tol, f"rank{rank} {name}")
        except AssertionError as exc:
            fails.append(str(exc))

    def one(tag, backend, v, lead, hd, run, ref):
        v_loc = -(-v // world)                  # Megatron pads V to a multiple of tp
        vp = v_loc * world
        h, w, y = make(rng, lead, hd, vp, torch.float32, "cpu", v_real=v, ignore_frac=0.2)
        # labels on shard boundaries
        flat = y.view(-1)
        for j, sid in enumerate([v_loc - 1, min(v_loc, v - 1), 0, v - 1]):
            if j < flat.numel():
                flat[j] = sid
        ws = w.detach()[rank * v_loc:(rank + 1) * v_loc].clone().requires_grad_()
        hs = h.detach().clone().requires_grad_()
        out_s = run(hs, ws, y, group, v, backend)
        out_1 = run(h, w, y, None, v, backend)
        h64, w64 = leaves64(h, w)
        out_r = ref(h64, w64, y, v)
        chk(out_s, out_r, 1e-5, f"{tag} out vs f64")
        chk(out_s, out_1, 1e-5, f"{tag} out vs tp1")
        out_s.backward()
        out_1.backward()
        out_r.backward()
        sl = slice(rank * v_loc, (rank + 1) * v_loc)
        chk(hs.grad, h64.grad, 1e-5, f"{tag} hidden.grad vs f64")
        chk(hs.grad, h.grad, 1e-5, f"{tag} hidden.grad vs tp1")
        chk(ws.grad, w64.grad[sl], 1e-5, f"{tag} weight.grad shard vs f64")
        chk(ws.grad, w.grad[sl], 1e-5, f"{tag} weight.grad shard vs tp1")
        prints.append(hs.grad.detach().clone())

    for backend in BACKENDS:
        temp = rng.choice([0.5, 2.0])
        up = None

        def lp_run(h, w, y, g, v, be, temp=temp):
            nonlocal up
            out = linear_logprobs(h, w, y, tp_group=g, vocab_size=v, temperature=temp,
                                  backend=be, chunk_size=rng_chunk)
            if up is None:
                up = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator()
                                 .manual_seed(seed))
            return (out * up.float()).sum()

        def lp_ref(h, w, y, v, temp=temp):
            return (ref_token_logps(h, w, y, temperature=temp, vocab_size=v) * up).sum()

        rng_chunk = rng.choice([None, 2, 5])
        n = rng.choice([1, 6, 13])
        one(f"{backend} linear_logprobs V=odd", backend, rng.choice([3, 37, 101]), (n,),
            rng.choice([3, 8]), lp_run, lp_ref)
        up = None
        one(f"{backend} linear_logprobs V=1<tp", backend, 1, (2, 3), 4, lp_run, lp_ref)
        up = None

        b, t = rng.choice([1, 2]), rng.choice([2, 3])
        lt, eps = rng.choice(LOSS_CASES)
        ref_free = lt != "simpo" and rng.random() < 0.3
        rc, rr = -torch.rand(b) * 6, -torch.rand(b) * 6

        def dpo_run(h, w, y, g, v, be, lt=lt, eps=eps, ref_free=ref_free, rc=rc, rr=rr):
            return fused_linear_dpo_loss(h, w, y, ref_chosen_logps=rc, ref_rejected_logps=rr,
                                         beta=0.3, loss_type=lt, label_smoothing=eps,
                                         reference_free=ref_free, nll_alpha=0.2, tp_group=g,
                                         vocab_size=v, backend=be, chunk_size=t)[0]

        def dpo_ref(h, w, y, v, lt=lt, eps=eps, ref_free=ref_free, rc=rc, rr=rr):
            return ref_fused_dpo(h, w, y, rc, rr, beta=0.3, loss_type=lt, eps=eps,
                                 ref_free=ref_free, nll_alpha=0.2, ignore_index=-100,
                                 vocab_size=v)[0]

        one(f"{backend} dpo {lt} eps={eps} ref_free={ref_free}", backend,
            rng.choice([5, 33, 77]), (2 * b, t), 6, dpo_run, dpo_ref)

        norm = rng.choice(["sum", "sequence", "token"])
        sw = torch.rand(3) * 2
        sw[rng.randrange(3)] = 0

        def wsft_run(h, w, y, g, v, be, norm=norm, sw=sw):
            return fused_linear_wsft_loss(h, w, y, sw, normalization=norm, tp_group=g,
                                          vocab_size=v, backend=be, chunk_size=4)

        def wsft_ref(h, w, y, v, norm=norm, sw=sw):
            return ref_wsft(h, w, y, sw, normalization=norm, ignore_index=-100, vocab_size=v)

        one(f"{backend} wsft {norm}", backend, rng.choice([9, 41]), (3, 3), 5, wsft_run,
            wsft_ref)
    return fails, prints


@pytest.mark.timeout(300)
def test_tp2_independent(rng_seed):
    from megatron_sz.dist import spawn

    if torch.cuda.is_available():
        pytest.skip("TP=2 check here runs CPU tensors over gloo with the Triton interpreter")
    res = spawn(_tp_worker, 2, rng_seed, backend="gloo")
    fails = [f for r in res for f in r[0]]
    assert not fails, "\n".join(fails)
    for a, b in zip(res[0][1], res[1][1]):
        assert torch.equal(a, b), "hidden.grad differs between TP ranks"
