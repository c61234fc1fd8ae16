"""Weighted SFT loss fused with the (vocab-parallel) LM head: ``fused_linear_wsft_loss``.

What is unusual here
--------------------
* Every token's coefficient d loss / d logp is known before the first GEMM (sample
  weight, normalisation, token counts from the labels), so - like the fused DPO op -
  gradients are computed inside the forward chunk loop from the same logits chunk
  (6·N·H·V, no recompute) and backward only rescales them by the upstream scalar.
* Sample weights are folded into dlogits BEFORE the dW GEMM (Liger PR #1298 fixed a wrong
  grad_W from doing it after). A sample with weight 0 thus has dlogits exactly 0 and
  contributes exactly zero to dX and dW.
* Normalisations (B = batch size, n_b = completion tokens of sample b, w_b its weight):
  ``sum``      (1/B) Σ_b w_b Σ_t nll_bt          (the Socratic-Zero objective)
  ``sequence`` (1/B) Σ_b w_b mean_t nll_bt
  ``token``    Σ_b w_b Σ_t nll_bt / Σ_b n_b
"""
from __future__ import annotations

import torch

from ._common import OpConfig, check_lm_head_inputs, make_config
from .logprobs import GradSink, _Engine, chunk_slices

NORMALIZATIONS = ("sum", "sequence", "token")


def _per_sample_norm(labels, normalization: str, ignore_index: int):
    """f_b with loss = Σ_b w_b f_b Σ_t nll_bt (float32 [B]); ignored tokens have nll 0."""
    b = labels.shape[0]
    n_b = (labels != ignore_index).sum(dim=1).float()
    if normalization == "sum":
        return torch.full((b,), 1.0 / b, dtype=torch.float32, device=labels.device)
    if normalization == "sequence":
        return 1.0 / (b * n_b.clamp(min=1))
    return (1.0 / n_b.sum().clamp(min=1)).expand(b).contiguous()   # token


class FusedLinearWSFTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, sample_weights, norm, cfg: OpConfig,
                want_dx: bool, want_dw: bool):
        # hidden [B*T, H], labels [B, T], sample_weights / norm [B]
        b, t = labels.shape
        n, h = hidden.shape
        y = labels.reshape(-1)
        valid = y != cfg.ignore_index
        per_sample = sample_weights.detach().float() * norm                     # [B]
        coef = torch.where(valid, per_sample.repeat_interleave(t),
                           torch.zeros((), device=hidden.device))
        eng = _Engine(weight, cfg)
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        sink = GradSink(hidden, weight, cfg, want_dx=want_dx, want_dw=want_dw, in_forward=True)
        for sl in chunk_slices(n, cfg.chunk_rows):
            x_c, y_c = hidden[sl], y[sl]
            logits, lse, logp[sl] = eng.stats(x_c, y_c)
            if want_dx or want_dw:
                # d loss / d logp = -c
                eng.grads(logits, lse, y_c, -coef[sl], x_c,
                          dx_out=None if sink.dx is None else sink.dx[sl], sink=sink)
            del logits
        seq_nll = -logp.view(b, t).sum(dim=1)                                    # [B]
        # a zero weight multiplies its sample's nll by exactly 0 (no inf*0: nll is finite)
        loss = (per_sample * seq_nll).sum()
        sink.finish()
        ctx.sink = sink
        ctx.save_for_backward(norm * seq_nll)               # d loss / d w_b = f_b Σ_t nll_bt
        ctx.sw_dtype = sample_weights.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (dsw,) = ctx.saved_tensors
        gx, gw = ctx.sink.upstream(grad_loss)
        gs = (dsw * grad_loss.float()).to(ctx.sw_dtype) if ctx.needs_input_grad[3] else None
        return gx, gw, None, gs, None, None, None, None


def fused_linear_wsft_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           sample_weights: torch.Tensor, *, normalization: str = "sum",
                           ignore_index: int = -100, tp_group=None, temperature: float = 1.0,
                           vocab_size: int | None = None, backend: str = "auto",
                           chunk_size: int | None = None, main_grad: bool = False,
                           grad_scale: float = 1.0, dw_accumulation: str = "param") -> torch.Tensor:
    """Weighted SFT loss (scalar float32) from hidden [B, T, H], labels [B, T] and
    ``sample_weights`` [B], on this rank's vocab
    shard ``weight`` [V/tp, H]. See the module docstring for the normalisations; other
    keywords as in :func:`linear_logprobs`. If ``sample_weights`` requires grad it gets
    d loss / d w_b (the sample's normalised NLL); the token grads never depend on it.
    ``main_grad`` / ``grad_scale``: add dW, already multiplied by ``grad_scale`` (the
    upstream gradient backward will bring: 1/num_microbatches in Megatron's schedule),
    straight into ``weight.main_grad`` during forward; backward checks the scale (see
    ``main_grad_mismatches``). ``dw_accumulation`` as in :func:`linear_logprobs`.
    """
    check_lm_head_inputs(hidden, weight, labels, lead_shape_name="hidden.shape[:2]")
    if hidden.dim() != 3 or hidden.shape[0] == 0:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, "
                         f"got {normalization!r}")
    if not isinstance(sample_weights, torch.Tensor) or not sample_weights.is_floating_point():
        raise TypeError("sample_weights must be a floating tensor [B]")
    if tuple(sample_weights.shape) != (hidden.shape[0],):
        raise ValueError(f"sample_weights must have shape [{hidden.shape[0]}] (one per "
                         f"sample), got {tuple(sample_weights.shape)}")
    if sample_weights.device != hidden.device:
        raise ValueError(f"sample_weights is on {sample_weights.device}, expected "
                         f"{hidden.device}")
    cfg = make_config(hidden=hidden, weight=weight, backend=backend, ignore_index=ignore_index,
                      temperature=temperature, tp_group=tp_group, vocab_size=vocab_size,
                      chunk_size=chunk_size, main_grad=main_grad, grad_scale=grad_scale,
                      dw_accumulation=dw_accumulation)
    y = labels.to(torch.int64).contiguous()
    norm = _per_sample_norm(y, normalization, ignore_index)
    grad_on = torch.is_grad_enabled()
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    return FusedLinearWSFTFunction.apply(h2, weight, y, sample_weights, norm, cfg,
                                         grad_on and hidden.requires_grad,
                                         grad_on and weight.requires_grad)
