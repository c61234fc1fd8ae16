"""Plain float64 references that DO materialise the [N, V] logits.

Tests and the benchmark import these; they are written independently of the fused code
(no shared helpers) so that a bug in one does not hide in the other. They take the FULL
weight [V_padded, H] (TP=1 view); ``vocab_size`` masks padding rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ref_linear_logprobs(hidden, weight, labels, *, ignore_index=-100, temperature=1.0,
                        vocab_size=None):
    """float64 log softmax(hidden @ W^T / T)[labels]; 0 where labels == ignore_index."""
    h = hidden.double().reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).long()
    logits = h @ weight.double().t() / temperature
    if vocab_size is not None and vocab_size < logits.shape[1]:
        logits[:, vocab_size:] = float("-inf")
    logp = torch.log_softmax(logits, dim=-1)
    valid = y != ignore_index
    out = logp.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
    return torch.where(valid, out, torch.zeros_like(out)).reshape(labels.shape)


def ref_dpo_pair_losses(pc, pr, rc, rr, *, beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
                        chosen_lengths=None, rejected_lengths=None, reference_free=False,
                        simpo_gamma=0.5):
    """Per-pair DPO-family losses and rewards in float64 (TRL's formulas)."""
    pc, pr = pc.double(), pr.double()
    if loss_type == "simpo" or reference_free or rc is None:
        rc = torch.zeros_like(pc)
        rr = torch.zeros_like(pr)
    else:
        rc, rr = rc.double(), rr.double()
    if loss_type in ("ipo", "simpo"):
        lc = torch.ones_like(pc) if chosen_lengths is None else chosen_lengths.double().clamp(min=1)
        lr = torch.ones_like(pr) if rejected_lengths is None else rejected_lengths.double().clamp(min=1)
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    delta = (pc - rc) - (pr - rr)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * delta) * (1 - eps) + F.logsigmoid(-beta * delta) * eps) \
            / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "simpo":
        z = beta * delta - simpo_gamma
        losses = -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps
    else:
        raise ValueError(loss_type)
    return losses, beta * (pc - rc), beta * (pr - rr)


def ref_dpo_loss(pc, pr, rc, rr, **kw):
    losses, cr, rj = ref_dpo_pair_losses(pc, pr, rc, rr, **kw)
    return losses.mean(), {"chosen_rewards": cr.mean(), "rejected_rewards": rj.mean(),
                           "reward_margins": (cr - rj).mean(),
                           "reward_accuracy": (cr > rj).double().mean()}


def ref_fused_linear_dpo_loss(hidden, weight, labels, *, ref_chosen_logps=None,
                              ref_rejected_logps=None, beta=0.1, loss_type="sigmoid",
                              label_smoothing=0.0, reference_free=False, nll_alpha=0.0,
                              ignore_index=-100, temperature=1.0, vocab_size=None,
                              simpo_gamma=0.5):
    """float64: hidden [2B, T, H] (chosen first), labels [2B, T] -> (loss, metrics)."""
    b = hidden.shape[0] // 2
    tok = ref_linear_logprobs(hidden, weight, labels, ignore_index=ignore_index,
                              temperature=temperature, vocab_size=vocab_size)
    valid = labels != ignore_index
    seq = tok.sum(-1)
    lens = valid.sum(-1)
    loss, metrics = ref_dpo_loss(seq[:b], seq[b:], ref_chosen_logps, ref_rejected_logps,
                                 beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                 chosen_lengths=lens[:b], rejected_lengths=lens[b:],
                                 reference_free=reference_free, simpo_gamma=simpo_gamma)
    nll = -tok[:b].sum() / valid[:b].sum().clamp(min=1)
    metrics["nll_loss"] = nll
    return loss + nll_alpha * nll, metrics


def ref_fused_linear_wsft_loss(hidden, weight, labels, sample_weights, *, normalization="sum",
                               ignore_index=-100, temperature=1.0, vocab_size=None):
    """float64 weighted SFT: hidden [B, T, H], labels [B, T], sample_weights [B]."""
    tok = ref_linear_logprobs(hidden, weight, labels, ignore_index=ignore_index,
                              temperature=temperature, vocab_size=vocab_size)
    nll = -tok.sum(-1)                                   # [B]
    n = (labels != ignore_index).sum(-1).double()        # [B]
    w = sample_weights.double()
    b = hidden.shape[0]
    if normalization == "sum":
        return (w * nll).sum() / b
    if normalization == "sequence":
        return (w * nll / n.clamp(min=1)).sum() / b
    if normalization == "token":
        return (w * nll).sum() / n.sum().clamp(min=1)
    raise ValueError(normalization)


def ref_fused_linear_pg_loss(hidden, weight, labels, *, old_logps, advantages, loss_mask=None,
                             clip_low=0.2, clip_high=0.2, clip_c=None, ref_logps=None,
                             kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0,
                             aggregation="token-mean", norm_constant=None, denominator=None,
                             ignore_index=-100, temperature=1.0, vocab_size=None):
    """float64 PPO-clipped policy-gradient loss: hidden [B, T, H], labels [B, T] -> (loss,
    metrics). Materialises logits; entropy = -Σ p log p; derivatives come from autograd.
    ``advantages`` / ``clip_high`` may be per sequence [B]; log-ratios are clamped to
    [-20, 20] before ``exp`` (as the fused op and veRL do)."""
    b, t = labels.shape
    h = hidden.double().reshape(b * t, -1)
    logits = h @ weight.double().t() / temperature
    if vocab_size is not None and vocab_size < logits.shape[1]:
        logits[:, vocab_size:] = float("-inf")
    logsm = torch.log_softmax(logits, dim=-1)
    real = logsm[:, :vocab_size] if vocab_size is not None else logsm   # padding: p = 0
    ent = -(real.exp() * real).sum(-1).view(b, t)
    y = labels.long()
    known = y != ignore_index
    logp = logsm.gather(1, torch.where(known, y, 0).reshape(-1, 1)).view(b, t)

    def per_tok(x):
        x = torch.as_tensor(x, dtype=torch.float64)
        if x.dim() == 1 and x.shape[0] == b and (b != t or x.numel() != b * t):
            x = x[:, None]
        return x.expand(b, t).double()

    old = per_tok(old_logps)
    adv = per_tok(advantages)
    lo = 1 - per_tok(clip_low)
    hi = 1 + per_tok(clip_high)
    mask = per_tok(1.0 if loss_mask is None else loss_mask)
    m = torch.where(known, mask, torch.zeros_like(mask))
    valid = m != 0

    ratio = torch.exp(torch.clamp(logp - old, -20, 20))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, min=lo, max=hi)
    pg = torch.maximum(unclipped, clipped)
    if clip_c is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * clip_c), pg)
    loss_tok = pg
    kl = None
    if ref_logps is not None:
        d = logp - per_tok(ref_logps)
        if kl_estimator == "k1":
            kl = d
        elif kl_estimator == "k2":
            kl = 0.5 * d ** 2
        else:
            dc = torch.clamp(d, -20, 20)
            kl = torch.exp(-dc) - 1 + dc
        loss_tok = loss_tok + kl_coef * kl
    loss_tok = loss_tok - entropy_coef * ent
    contrib = torch.where(valid, m * loss_tok, torch.zeros_like(loss_tok))
    n_b = m.sum(-1)
    seqs = (n_b > 0).sum().double()
    if aggregation == "token-mean":
        den = m.sum() if denominator is None else denominator
        loss = contrib.sum() / den if den > 0 else contrib.sum() * 0
    elif aggregation == "seq-mean-token-sum":
        den = seqs if denominator is None else denominator
        loss = contrib.sum() / den if den > 0 else contrib.sum() * 0
    elif aggregation == "seq-mean-token-mean":
        den = seqs if denominator is None else denominator
        per_seq = torch.where(n_b > 0, contrib.sum(-1) / n_b.clamp(min=1e-300),
                              torch.zeros_like(n_b))
        loss = per_seq.sum() / den if den > 0 else per_seq.sum() * 0
    elif aggregation == "seq-mean-token-sum-norm":
        c = t if norm_constant is None else norm_constant
        den = b if denominator is None else denominator
        loss = contrib.sum() / (den * c)
    else:
        raise ValueError(aggregation)
    cnt = valid.sum().double()

    def mean(x):
        return torch.where(valid, x, torch.zeros_like(x)).sum().detach() / max(float(cnt), 1.0)

    lr = torch.clamp(logp - old, -20, 20)
    metrics = {
        "entropy": mean(ent), "ratio": mean(ratio), "approx_kl": mean(torch.exp(lr) - 1 - lr),
        "kl_ref": mean(kl) if kl is not None else torch.zeros((), dtype=torch.float64),
        "clipfrac_low": mean(((ratio < lo) & (adv < 0)).double()),
        "clipfrac_high": mean(((ratio > hi) & (adv > 0)).double()),
        "masked_share": 1 - cnt / known.sum().clamp(min=1) if known.any()
        else torch.zeros((), dtype=torch.float64),
        "tokens": cnt,
    }
    return loss, metrics
