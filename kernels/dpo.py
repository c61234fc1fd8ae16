"""DPO-family losses: ``dpo_loss`` on sequence log-probs, and ``fused_linear_dpo_loss``
straight from LM-head hidden states on a vocab-parallel weight shard.

What is unusual here
--------------------
* The fused op computes its gradients **during the forward pass**. A pair's loss depends
  only on that pair's own chosen and rejected sequence log-probs, so the chunk loop takes
  whole pairs (chosen rows i..j together with rejected rows i..j): one logits GEMM per
  chunk gives the log-probs, the per-pair loss and its derivative d loss / d logp
  (autograd on a handful of scalars), and then dlogits, dX and dW from the SAME logits
  chunk. Total matmul work 6·N·H·V instead of 8 (no recompute); backward only scales the
  stored grads by the scalar upstream gradient. With nothing requiring grad (evaluation,
  reference passes) the grad work is skipped entirely (2·N·H·V).
* Reference log-probs are per-sequence constants (precomputed, e.g. with
  ``sequence_logprobs`` under ``no_grad``), or absent for ``reference_free`` / SimPO.
* Loss types follow TRL's ``DPOTrainer``/``CPOTrainer`` formulas: ``sigmoid`` (with
  ``label_smoothing`` = cDPO), ``robust``, ``ipo`` (log-probs divided by completion
  length), ``hinge``, ``simpo`` (length-normalised, reference-free, margin
  ``simpo_gamma``). ``nll_alpha`` adds RPO's NLL term: mean NLL over all chosen tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._common import OpConfig, check_lm_head_inputs, make_config
from .logprobs import GradSink, _Engine

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo")
METRIC_KEYS = ("chosen_rewards", "rejected_rewards", "reward_margins", "reward_accuracy",
               "policy_chosen_logps", "policy_rejected_logps", "dpo_loss", "nll_loss")


@dataclass(frozen=True)
class DPOOptions:
    """Loss options shared by ``dpo_loss`` and ``fused_linear_dpo_loss``."""

    beta: float = 0.1               # inverse temperature of the implicit reward
    loss_type: str = "sigmoid"      # one of LOSS_TYPES
    label_smoothing: float = 0.0    # cDPO / robust epsilon: assumed label-flip rate
    reference_free: bool = False    # reference log-probs taken as 0
    simpo_gamma: float = 0.5        # SimPO target margin (in reward units, i.e. after beta)

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, "
                             f"got {self.loss_type!r}")
        if not isinstance(self.beta, (int, float)) or not self.beta > 0:
            raise ValueError(f"beta must be a positive number, got {self.beta!r}")
        if not isinstance(self.label_smoothing, (int, float)) or \
                not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")

    @property
    def uses_reference(self) -> bool:
        return not (self.reference_free or self.loss_type == "simpo")


def _pair_losses(pc, pr, rc, rr, lc, lr, opts: DPOOptions):
    """Per-pair losses and implicit rewards, float32. All inputs [B] (rc/rr/lc/lr may be None)."""
    if not opts.uses_reference or rc is None:
        rc = torch.zeros_like(pc)
        rr = torch.zeros_like(pr)
    if opts.loss_type in ("ipo", "simpo"):
        # TRL divides the summed log-probs by the completion length for IPO / SimPO. With
        # no lengths given, the inputs are taken as already length-normalised.
        lc = torch.ones_like(pc) if lc is None else lc.float().clamp(min=1)
        lr = torch.ones_like(pr) if lr is None else lr.float().clamp(min=1)
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    delta = (pc - rc) - (pr - rr)
    beta, eps = float(opts.beta), float(opts.label_smoothing)
    if opts.loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
    elif opts.loss_type == "robust":
        losses = (-F.logsigmoid(beta * delta) * (1 - eps) + F.logsigmoid(-beta * delta) * eps) \
            / (1 - 2 * eps)
    elif opts.loss_type == "ipo":
        losses = (delta - 1.0 / (2 * beta)) ** 2
    elif opts.loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # simpo
        z = beta * delta - float(opts.simpo_gamma)
        losses = -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps
    return losses, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def _metrics_tensor(losses, cr, rj, pc, pr, nll):
    return torch.stack([cr.mean(), rj.mean(), (cr - rj).mean(), (cr > rj).float().mean(),
                        pc.mean(), pr.mean(), losses.mean(), nll]).detach().float()


def _check_vec(name, t, b, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape [{b}], got {type(t).__name__}")
    if tuple(t.shape) != (b,):
        raise ValueError(f"{name} must have shape [{b}] (one value per pair), got "
                         f"{tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor | None = None,
             ref_rejected_logps: torch.Tensor | None = None, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None, reference_free: bool = False,
             simpo_gamma: float = 0.5):
    """DPO-family loss on summed sequence log-probs [B] -> (mean loss, metrics).

    With Δ = (π_c - ref_c) - (π_r - ref_r) (refs = 0 when ``reference_free``), β = beta,
    ε = label_smoothing, per pair (then averaged over pairs), as in TRL:

    * ``sigmoid``: -(1-ε) logσ(βΔ) - ε logσ(-βΔ)  (ε > 0 is TRL's cDPO; no rescaling)
    * ``robust``:  [-(1-ε) logσ(βΔ) + ε logσ(-βΔ)] / (1-2ε)  (unbiased robust DPO)
    * ``ipo``:     (Δ - 1/(2β))², every log-prob (policy AND reference, summed ones are
      passed in) divided by its completion length first
    * ``hinge``:   relu(1 - βΔ)
    * ``simpo``:   sigmoid form on z = β(π_c/len_c - π_r/len_r) - simpo_gamma, no reference
      (CPOTrainer's ``loss_type="simpo"``)

    Rewards are β·(π - ref) on the same (length-normalised for ipo/simpo) log-probs.

    ``metrics`` (0-dim float32 tensors, detached; no host sync): chosen_rewards,
    rejected_rewards, reward_margins (means of beta * (policy - ref)), reward_accuracy
    (share of pairs with chosen reward > rejected), policy_chosen_logps,
    policy_rejected_logps (means), dpo_loss, nll_loss (0 here).
    ``chosen_lengths``/``rejected_lengths`` (completion token counts) are used by
    ``ipo`` and ``simpo``; without them the log-probs are taken as already averaged.
    """
    opts = DPOOptions(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                      reference_free=reference_free, simpo_gamma=simpo_gamma)
    pc, pr = policy_chosen_logps, policy_rejected_logps
    if not isinstance(pc, torch.Tensor) or pc.dim() != 1:
        raise ValueError("policy_chosen_logps must be a 1-D tensor [B]")
    b, dev = pc.shape[0], pc.device
    _check_vec("policy_rejected_logps", pr, b, dev)
    if opts.uses_reference:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type={loss_type!r} needs ref_chosen_logps and "
                             "ref_rejected_logps; pass them or set reference_free=True")
        _check_vec("ref_chosen_logps", ref_chosen_logps, b, dev)
        _check_vec("ref_rejected_logps", ref_rejected_logps, b, dev)
        rc, rr = ref_chosen_logps.detach().float(), ref_rejected_logps.detach().float()
    else:
        rc = rr = None
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    for name, t in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if t is not None:
            _check_vec(name, t, b, dev)
    losses, cr, rj = _pair_losses(pc.float(), pr.float(), rc, rr, chosen_lengths,
                                  rejected_lengths, opts)
    m = _metrics_tensor(losses, cr, rj, pc.float(), pr.float(), torch.zeros((), device=dev))
    return losses.mean(), dict(zip(METRIC_KEYS, m.unbind(0)))


class FusedLinearDPOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ref_c, ref_r, norm_lens, cfg: OpConfig,
                opts: DPOOptions, nll_alpha: float, want_dx: bool, want_dw: bool):
        two_b, t, h = hidden.shape
        b = two_b // 2
        dev = hidden.device
        eng = _Engine(weight, cfg)
        hf = hidden.reshape(two_b * t, h)
        yf = labels.reshape(two_b * t)
        lens = (labels != cfg.ignore_index).sum(dim=1).float()            # [2B]
        n_chosen = lens[:b].sum().clamp(min=1)
        if norm_lens is None:                     # lengths for ipo / simpo normalisation
            norm_lens = lens
        seq = torch.empty(two_b, dtype=torch.float32, device=dev)
        losses = torch.empty(b, dtype=torch.float32, device=dev)
        cr = torch.empty_like(losses)
        rj = torch.empty_like(losses)
        sink = GradSink(hf, weight, cfg, want_dx=want_dx, want_dw=want_dw, in_forward=True)
        dx = sink.dx
        pairs = max(1, cfg.chunk_rows // (2 * t))
        for i0 in range(0, b, pairs):
            i1 = min(b, i0 + pairs)
            k = i1 - i0
            ch, rjs = slice(i0 * t, i1 * t), slice((b + i0) * t, (b + i1) * t)
            whole = k == b                       # one chunk: rows already contiguous
            x_c = hf if whole else torch.cat([hf[ch], hf[rjs]])
            y_c = yf if whole else torch.cat([yf[ch], yf[rjs]])
            logits, lse, logp = eng.stats(x_c, y_c)
            s = logp.view(2, k, t).sum(dim=2)                            # [2, k]
            seq[i0:i1], seq[b + i0:b + i1] = s[0], s[1]
            lc, lr = norm_lens[i0:i1], norm_lens[b + i0:b + i1]
            rc = None if ref_c is None else ref_c[i0:i1]
            rr = None if ref_r is None else ref_r[i0:i1]
            if not (want_dx or want_dw):
                losses[i0:i1], cr[i0:i1], rj[i0:i1] = _pair_losses(s[0], s[1], rc, rr, lc, lr,
                                                                   opts)
                continue
            with torch.enable_grad():            # d loss_i / d logp for this chunk's pairs
                pc_ = s[0].detach().requires_grad_()
                pr_ = s[1].detach().requires_grad_()
                l_c, cr_c, rj_c = _pair_losses(pc_, pr_, rc, rr, lc, lr, opts)
                g_c, g_r = torch.autograd.grad(l_c.sum(), [pc_, pr_])
            losses[i0:i1], cr[i0:i1], rj[i0:i1] = l_c.detach(), cr_c, rj_c
            # loss = mean_i loss_i + alpha * (-sum chosen logp / n_chosen)
            coef = torch.cat([(g_c / b)[:, None].expand(k, t) - nll_alpha / n_chosen,
                              (g_r / b)[:, None].expand(k, t)]).reshape(-1)
            if whole:
                eng.grads(logits, lse, y_c, coef, x_c, dx_out=dx, sink=sink)
            else:
                tmp = torch.empty(2 * k * t, h, dtype=dx.dtype, device=dev) if want_dx \
                    else None
                eng.grads(logits, lse, y_c, coef, x_c, dx_out=tmp, sink=sink)
                if want_dx:
                    dx[ch], dx[rjs] = tmp[:k * t], tmp[k * t:]
            del logits
        nll = -seq[:b].sum() / n_chosen
        loss = losses.mean() + nll_alpha * nll
        metrics = _metrics_tensor(losses, cr, rj, seq[:b], seq[b:], nll)
        sink.finish()
        if sink.dx is not None:
            sink.dx = sink.dx.view(two_b, t, h)
        ctx.sink = sink
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        gx, gw = ctx.sink.upstream(grad_loss)
        return gx, gw, None, None, None, None, None, None, None, None, None


def fused_linear_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          ref_chosen_logps: torch.Tensor | None = None,
                          ref_rejected_logps: torch.Tensor | None = None, beta: float = 0.1,
                          loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                          reference_free: bool = False, simpo_gamma: float = 0.5,
                          chosen_lengths: torch.Tensor | None = None,
                          rejected_lengths: torch.Tensor | None = None,
                          nll_alpha: float = 0.0, ignore_index: int = -100, tp_group=None,
                          temperature: float = 1.0, vocab_size: int | None = None,
                          backend: str = "auto", chunk_size: int | None = None,
                          main_grad: bool = False, grad_scale: float = 1.0,
                          dw_accumulation: str = "param"):
    """DPO loss from LM-head inputs -> (loss, metrics) without materialising logits.

    hidden [2B, T, H]: rows 0..B-1 chosen, B..2B-1 rejected (same prompt order);
    labels [2B, T] with ``ignore_index`` on prompt and padding; weight: this rank's
    vocab shard [V/tp, H]. Sequence log-probs are summed over completion tokens.
    ``ref_*_logps`` [B]: precomputed reference sequence log-probs, SUMMED over completion
    tokens like the policy's (e.g. :func:`sequence_logprobs` under ``no_grad``); for
    ``ipo``/``simpo`` both are divided by the completion length taken from ``labels``.
    Omit them when ``reference_free`` or ``loss_type="simpo"``. ``chosen_lengths`` /
    ``rejected_lengths`` [B] optionally replace the label-derived lengths used by
    ``ipo``/``simpo`` (same keywords as :func:`dpo_loss`); the NLL term always counts
    labels. ``nll_alpha``: RPO NLL weight on chosen (mean NLL over all chosen tokens).
    Metrics: see :func:`dpo_loss`, with ``nll_loss`` filled in.
    ``main_grad`` / ``grad_scale`` / ``dw_accumulation``: as in
    :func:`fused_linear_wsft_loss`. Other keywords as in :func:`linear_logprobs`.
    """
    check_lm_head_inputs(hidden, weight, labels, lead_shape_name="hidden.shape[:2]")
    if hidden.dim() != 3 or hidden.shape[0] % 2 or hidden.shape[0] == 0:
        raise ValueError(f"hidden must be [2B, T, H] (B chosen rows then B rejected rows), "
                         f"got shape {tuple(hidden.shape)}")
    opts = DPOOptions(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                      reference_free=reference_free, simpo_gamma=simpo_gamma)
    if not isinstance(nll_alpha, (int, float)) or nll_alpha < 0:
        raise ValueError(f"nll_alpha must be a number >= 0, got {nll_alpha!r}")
    cfg = make_config(hidden=hidden, weight=weight, backend=backend, ignore_index=ignore_index,
                      temperature=temperature, tp_group=tp_group, vocab_size=vocab_size,
                      chunk_size=chunk_size, main_grad=main_grad, grad_scale=grad_scale,
                      dw_accumulation=dw_accumulation)
    b = hidden.shape[0] // 2
    if opts.uses_reference:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type={loss_type!r} needs ref_chosen_logps and "
                             "ref_rejected_logps [B]; pass them or set reference_free=True")
        _check_vec("ref_chosen_logps", ref_chosen_logps, b, hidden.device)
        _check_vec("ref_rejected_logps", ref_rejected_logps, b, hidden.device)
        ref_c = ref_chosen_logps.detach().float()
        ref_r = ref_rejected_logps.detach().float()
    else:
        ref_c = ref_r = None
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    norm_lens = None
    if chosen_lengths is not None:
        _check_vec("chosen_lengths", chosen_lengths, b, hidden.device)
        _check_vec("rejected_lengths", rejected_lengths, b, hidden.device)
        norm_lens = torch.cat([chosen_lengths, rejected_lengths]).detach().float()
    grad_on = torch.is_grad_enabled()
    want_dx = grad_on and hidden.requires_grad
    want_dw = grad_on and weight.requires_grad
    loss, m = FusedLinearDPOFunction.apply(hidden.contiguous(), weight,
                                           labels.to(torch.int64).contiguous(), ref_c, ref_r,
                                           norm_lens, cfg, opts, float(nll_alpha), want_dx,
                                           want_dw)
    return loss, dict(zip(METRIC_KEYS, m.unbind(0)))
