"""Policy-gradient loss fused with the (vocab-parallel) LM head: ``fused_linear_pg_loss``.

What is unusual here
--------------------
* **One pass, grads in forward.** Every token's loss depends only on that token's own
  log-prob and entropy (the advantages, behaviour log-probs, reference log-probs and the
  aggregation weights are inputs), so - like the fused WSFT op - the per-token
  coefficients are known inside the forward chunk loop: one logits GEMM per chunk gives
  the statistics, then dlogits, dX and dW come from the SAME logits chunk (6·N·H·V
  matmul work, no [N, V] tensor). Backward only rescales the stored grads.
* **Entropy from the same statistics.** Besides the running max ``m`` and sum-exp ``s``
  the stats kernel streams ``u = Σ_j e^(z_j - m)·(z_j - m)`` (the sum-exp-weighted,
  max-shifted logits). Across TP ranks ``(s, u, target logit)`` are rescaled to the global
  max and summed in ONE all-reduce, like the lse: then ``Σ p z = M + u/s`` and the
  full-softmax entropy ``H = lse - Σ p z = log s - u/s``, both known before the gradient
  pass of the chunk. With an entropy bonus the dlogits are not just
  ``coef·(onehot - softmax)``: ``dH/dz_j = -p_j (z_j - Σ p z)``, so the second Triton
  kernel writes ``(coef·(onehot - p) - ecoef·p·(z - Σpz)) / T``.
* **The per-token loss** (r = exp(logp - old_logps), A the advantage):

  ``pg = max(-A·r, -A·clip(r, 1 - clip_low, 1 + clip_high))``, and with dual clip
  (``clip_c`` > 1) ``pg = min(pg, -A·clip_c)`` where A < 0;
  ``+ kl_coef · k(logp - ref_logps)`` with k1 = d, k2 = d²/2, k3 = e^(-d) - 1 + d;
  ``- entropy_coef · H``.

  The log-ratios fed to ``exp`` are clamped to [-20, 20] (as veRL does) so a stale
  behaviour log-prob cannot overflow the ratio; the float64 reference does the same.
* **Aggregation** (m_i = loss_mask · [label != ignore_index], n_b = Σ_t m of sequence
  b, S = sequences with n_b > 0, B = all sequences, D = ``denominator`` when given):

  ``token-mean``              Σ_i m_i ℓ_i / (D or Σ_i m_i)
  ``seq-mean-token-sum``      Σ_b Σ_t m ℓ / (D or S)
  ``seq-mean-token-mean``     Σ_b (Σ_t m ℓ / n_b) / (D or S)
  ``seq-mean-token-sum-norm`` Σ_b Σ_t m ℓ / ((D or B) · C)   (Dr. GRPO; C = ``norm_constant``,
                              default the padded length T)

  ``denominator`` lets a trainer normalise by global-batch counts across micro-batches
  and data-parallel ranks.
* No host syncs: metrics are 0-dim detached tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _tp
from ._common import OpConfig, check_lm_head_inputs, make_config, mm_f32
from .logprobs import (GradSink, _Engine, _blocks, _scaled_masked, _target_index, chunk_slices,
                       dlogits_triton)

try:  # Triton is optional: the torch backend works without it.
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # pragma: no cover
    _HAVE_TRITON = False

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
METRIC_KEYS = ("pg_loss", "kl_ref", "entropy", "approx_kl", "ratio", "clipfrac_low",
               "clipfrac_high", "clipfrac_dual", "masked_share", "tokens")
LOG_RATIO_CLAMP = 20.0


# =======================================================================================
# Triton kernels
# =======================================================================================
if _HAVE_TRITON:

    @triton.jit
    def _pg_stats_kernel(logits_ptr, labels_ptr, m_ptr, s_ptr, u_ptr, t_ptr,
                         n_rows, n_cols, stride_row, vocab_start, vocab_size, ignore_index,
                         inv_temp, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        """Per row: running max m, s = Σ e^(z-m), u = Σ e^(z-m)(z-m), target logit t.
        z = logits * inv_temp; padding columns (global id >= vocab_size) are excluded."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        row_off = rows.to(tl.int64) * stride_row
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        u = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            col_ok = (cols < n_cols) & ((cols + vocab_start) < vocab_size)
            mask = row_ok[:, None] & col_ok[None, :]
            z = tl.load(logits_ptr + row_off[:, None] + cols[None, :], mask=mask,
                        other=float("-inf")) * inv_temp
            m_new = tl.maximum(m, tl.max(z, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)                       # 0 while m was -inf
            shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
            d = tl.where(mask, z - m_safe[:, None], 0.0)
            e = tl.where(mask, tl.exp(d), 0.0)
            # rebase u to the new max: Σ e^(z-m')(z-m') = α(u + (m - m')·s)
            u = alpha * (u + shift * s) + tl.sum(e * d, axis=1)
            s = s * alpha + tl.sum(e, axis=1)
            m = m_new
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
        local = labels - vocab_start
        own = row_ok & (labels != ignore_index) & (local >= 0) & (local < n_cols)
        t = tl.load(logits_ptr + row_off + local, mask=own, other=0.0) * inv_temp
        tl.store(m_ptr + rows, m, mask=row_ok)
        tl.store(s_ptr + rows, s, mask=row_ok)
        tl.store(u_ptr + rows, u, mask=row_ok)
        tl.store(t_ptr + rows, t, mask=row_ok)


def _stats_triton(logits, labels, cfg: OpConfig, *, gpu_blocks: bool | None = None):
    n, v = logits.shape
    m = torch.empty(n, dtype=torch.float32, device=logits.device)
    s, u, t = torch.empty_like(m), torch.empty_like(m), torch.empty_like(m)
    bn, bv, warps = _blocks("stats", v, logits.is_cuda if gpu_blocks is None else gpu_blocks)
    _pg_stats_kernel[(triton.cdiv(n, bn),)](
        logits, labels, m, s, u, t, n, v, logits.stride(0), cfg.vocab_start, cfg.vocab_size,
        cfg.ignore_index, cfg.inv_temp, BLOCK_N=bn, BLOCK_V=bv, num_warps=warps)
    return m, s, u, t


def _dlogits_triton(logits, labels, lse, mu, coef, ecoef, cfg: OpConfig, out_dtype, *,
                    gpu_blocks: bool | None = None):
    """The shared dlogits kernel of ``logprobs.py`` with its entropy term (in place)."""
    return dlogits_triton(logits, labels, lse, coef, cfg, out_dtype, mu=mu, ecoef=ecoef,
                          gpu_blocks=gpu_blocks)


# =======================================================================================
# chunked PyTorch twins
# =======================================================================================
def _stats_torch(logits, labels, cfg: OpConfig):
    z = _scaled_masked(logits, cfg)
    m = z.amax(dim=1)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    d = z - m_safe[:, None]
    e = torch.exp(d)
    s = e.sum(dim=1)
    u = torch.where(e > 0, e * d, torch.zeros_like(d)).sum(dim=1)   # -inf columns: 0, not NaN
    local, own = _target_index(labels, cfg)
    t = torch.where(own, logits.gather(1, local[:, None]).squeeze(1) * cfg.inv_temp,
                    torch.zeros_like(m))
    return m, s, u, t


def _dlogits_torch(logits, labels, lse, mu, coef, ecoef, cfg: OpConfig, out_dtype):
    z = _scaled_masked(logits, cfg)
    p = torch.exp(z - lse[:, None])
    local, own = _target_index(labels, cfg)
    dz = p.neg()
    dz.scatter_add_(1, local[:, None], own.to(dz.dtype)[:, None])
    dz.mul_(coef[:, None])
    if ecoef is not None:
        ent = torch.where(p > 0, p * (z - mu[:, None]), torch.zeros_like(p))
        dz.sub_(ecoef[:, None] * ent)
    dz.mul_(cfg.inv_temp)
    return dz.to(out_dtype)


# =======================================================================================
# TP merge of (m, s, u, t)
# =======================================================================================
def combine_entropy_stats(m, s, u, t, group):
    """Per-rank (max, sum-exp, shifted weighted sum, target logit) -> (lse, Σpz, H, target
    logit), identical on every rank. One MAX and one packed SUM all-reduce."""
    world = _tp.group_rank_world(group)[1]
    if world > 1:
        import torch.distributed as dist

        m_glob = m.clone()
        dist.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=group)
        m_glob = torch.where(torch.isinf(m_glob), torch.zeros_like(m_glob), m_glob)
        alpha = torch.exp(m - m_glob)                      # 0 for an all-padding shard
        shift = torch.where(torch.isinf(m), torch.zeros_like(m), m - m_glob)
        packed = torch.stack([s * alpha, alpha * (u + shift * s), t])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        m, (s, u, t) = m_glob, packed.unbind(0)
    else:
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    ubar = u / s
    lse = m + torch.log(s)
    return lse, m + ubar, torch.log(s) - ubar, t


class _PGEngine(_Engine):
    """The chunk engine with entropy statistics (see the module docstring)."""

    def __init__(self, weight, cfg):
        super().__init__(weight, cfg)
        triton_path = cfg.backend == "triton"
        self._pg_stats = _stats_triton if triton_path else _stats_torch
        self._pg_dlogits = _dlogits_triton if triton_path else _dlogits_torch

    def pg_stats(self, x_c, y_c):
        logits = mm_f32(x_c, self.w.t())
        m, s, u, t = self._pg_stats(logits, y_c, self.cfg)
        lse, mu, ent, t = combine_entropy_stats(m, s, u, t, self.cfg.tp_group)
        valid = y_c != self.cfg.ignore_index
        logp = torch.where(valid, t - lse, torch.zeros_like(lse))
        return logits, lse, mu, ent, logp

    def pg_grads(self, logits, lse, mu, y_c, coef, ecoef, x_c, *, dx_out, sink: GradSink):
        dz = self._pg_dlogits(logits, y_c, lse, mu, coef, ecoef, self.cfg, self.dz_dtype)
        self.apply_dz(dz, x_c, dx_out=dx_out, sink=sink)


# =======================================================================================
# per-token loss terms (closed-form derivatives; the float64 reference uses autograd)
# =======================================================================================
@dataclass(frozen=True)
class PGOptions:
    """Scalar options of :func:`fused_linear_pg_loss` (hashable; tensors go separately)."""

    clip_low: float = 0.2
    clip_c: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    aggregation: str = "token-mean"
    norm_constant: float | None = None

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, "
                             f"got {self.aggregation!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, "
                             f"got {self.kl_estimator!r}")
        if not isinstance(self.clip_low, (int, float)) or not 0 <= self.clip_low < 1:
            raise ValueError(f"clip_low must be a number in [0, 1), got {self.clip_low!r}")
        if self.clip_c is not None and (not isinstance(self.clip_c, (int, float))
                                        or not self.clip_c > 1):
            raise ValueError(f"clip_c (dual clip) must be a number > 1 or None, got "
                             f"{self.clip_c!r}")
        for name in ("kl_coef", "entropy_coef"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v != v:
                raise ValueError(f"{name} must be a number, got {v!r}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef!r}")
        if self.norm_constant is not None and (not isinstance(self.norm_constant, (int, float))
                                               or not self.norm_constant > 0):
            raise ValueError(f"norm_constant must be a positive number, got "
                             f"{self.norm_constant!r}")


def _token_terms(logp, ent, old, adv, c_low, c_high, ref, opts: PGOptions):
    """Per-token loss ℓ and its derivatives d ℓ/d logp, d ℓ/d H; plus clip flags."""
    lr = (logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(lr)
    in_lr = (logp - old).abs() < LOG_RATIO_CLAMP            # the clamp's gradient
    pg1 = -adv * ratio
    pg2 = -adv * torch.minimum(torch.maximum(ratio, 1 - c_low), 1 + c_high)
    clipped = pg2 > pg1
    pg = torch.where(clipped, pg2, pg1)
    g = torch.where(clipped | ~in_lr, torch.zeros_like(pg1), pg1)   # d(-A r)/d logp = -A r
    dual = torch.zeros_like(clipped)
    if opts.clip_c is not None:
        pg3 = -adv * opts.clip_c
        dual = (adv < 0) & (pg3 < pg)
        pg = torch.where(dual, pg3, pg)
        g = torch.where(dual, torch.zeros_like(g), g)
    loss = pg
    kl = None
    if ref is not None:
        dd = logp - ref
        d = dd.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        live = (dd.abs() < LOG_RATIO_CLAMP).to(d.dtype)
        if opts.kl_estimator == "k1":
            kl, gk = dd, torch.ones_like(dd)
        elif opts.kl_estimator == "k2":
            kl, gk = 0.5 * dd * dd, dd
        else:
            e = torch.exp(-d)
            kl, gk = e - 1 + d, (1 - e) * live
        if opts.kl_coef:
            loss = loss + opts.kl_coef * kl
            g = g + opts.kl_coef * gk
    if opts.entropy_coef:
        loss = loss - opts.entropy_coef * ent
    flags = {"low": clipped & (adv < 0), "high": clipped & (adv > 0), "dual": dual}
    return loss, g, ratio, kl, flags


def _aggregation_weights(mw, opts: PGOptions, denominator):
    """w [S, T] with loss = Σ w ℓ (see the module docstring)."""
    n_b = mw.sum(dim=1)                                                  # [S]
    zero = torch.zeros((), dtype=mw.dtype, device=mw.device)
    agg = opts.aggregation
    if agg == "token-mean":
        den = mw.sum() if denominator is None else denominator
        return torch.where(den > 0, mw / torch.where(den > 0, den, 1.0), zero)
    if agg == "seq-mean-token-sum-norm":
        c = float(opts.norm_constant) if opts.norm_constant is not None else float(mw.shape[1])
        den = float(mw.shape[0]) if denominator is None else denominator
        return mw / (den * c)
    den = (n_b > 0).sum().to(mw.dtype) if denominator is None else denominator
    den = torch.as_tensor(den, dtype=mw.dtype, device=mw.device)
    per_seq = torch.where(den > 0, 1.0 / torch.where(den > 0, den, 1.0), zero)
    if agg == "seq-mean-token-sum":
        return mw * per_seq
    inv_n = torch.where(n_b > 0, 1.0 / n_b.clamp(min=torch.finfo(mw.dtype).tiny), zero)
    return mw * (inv_n * per_seq)[:, None]


# =======================================================================================
# autograd + public API
# =======================================================================================
class FusedLinearPGFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, old, adv, c_low, c_high, ref, w_agg, valid,
                cfg: OpConfig, opts: PGOptions, want_dx: bool, want_dw: bool, n_known):
        # hidden [N, H]; every per-token tensor is [N] float32 (w_agg = aggregation weight)
        n, h = hidden.shape
        dev = hidden.device
        eng = _PGEngine(weight, cfg)
        loss_tok = torch.zeros(n, dtype=torch.float32, device=dev)
        ent = torch.zeros_like(loss_tok)
        logp = torch.zeros_like(loss_tok)
        ratio = torch.zeros_like(loss_tok)
        kl = torch.zeros_like(loss_tok) if ref is not None else None
        flags = torch.zeros(3, n, dtype=torch.bool, device=dev)
        sink = GradSink(hidden, weight, cfg, want_dx=want_dx, want_dw=want_dw, in_forward=True)
        use_ent = bool(opts.entropy_coef)
        for sl in chunk_slices(n, cfg.chunk_rows):
            x_c, y_c = hidden[sl], labels[sl]
            logits, lse, mu, ent_c, logp_c = eng.pg_stats(x_c, y_c)
            ok = valid[sl]
            l_c, g_c, r_c, k_c, f_c = _token_terms(
                logp_c, ent_c, old[sl], adv[sl], c_low[sl], c_high[sl],
                None if ref is None else ref[sl], opts)
            zero = torch.zeros_like(l_c)
            w_c = w_agg[sl]
            loss_tok[sl] = torch.where(ok, w_c * l_c, zero)      # masked garbage never leaks
            ent[sl], logp[sl], ratio[sl] = ent_c, logp_c, r_c
            if kl is not None:
                kl[sl] = torch.where(ok, k_c, zero)
            for i, k in enumerate(("low", "high", "dual")):
                flags[i, sl] = f_c[k] & ok
            if want_dx or want_dw:
                coef = torch.where(ok, w_c * g_c, zero)
                ecoef = torch.where(ok, -opts.entropy_coef * w_c, zero) if use_ent else None
                eng.pg_grads(logits, lse, mu, y_c, coef, ecoef, x_c,
                             dx_out=None if sink.dx is None else sink.dx[sl], sink=sink)
            del logits
        loss = loss_tok.sum()
        metrics = _metrics(loss, ent, logp, ratio, kl, flags, old, valid, n_known, opts)
        sink.finish()
        ctx.sink = sink
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        gx, gw = ctx.sink.upstream(grad_loss)
        return (gx, gw) + (None,) * 13


def _metrics(loss, ent, logp, ratio, kl, flags, old, valid, n_known, opts):
    vf = valid.float()
    cnt = vf.sum()
    den = cnt.clamp(min=1)

    def mean(x):
        return torch.where(valid, x, torch.zeros_like(x)).sum() / den

    zero = torch.zeros((), dtype=torch.float32, device=loss.device)
    d = (logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    approx_kl = mean(torch.exp(d) - 1 - d)                # KL(old || new) estimator (k3)
    nk = n_known.float()
    masked = torch.where(nk > 0, 1.0 - cnt / nk.clamp(min=1), zero)
    vals = [loss, mean(kl) if kl is not None else zero, mean(ent), approx_kl, mean(ratio),
            flags[0].float().sum() / den, flags[1].float().sum() / den,
            flags[2].float().sum() / den, masked, cnt]
    return torch.stack([torch.as_tensor(v, dtype=torch.float32, device=loss.device).reshape(())
                        for v in vals]).detach()


def _per_token(name, x, lead, *, allow_seq: bool, device, default=None):
    """Broadcast a float / per-sequence / per-token value to float32 ``lead``."""
    if x is None:
        if default is None:
            raise ValueError(f"{name} is required")
        x = default
    if isinstance(x, bool):
        raise TypeError(f"{name} must be a number or a tensor, got bool")
    if isinstance(x, (int, float)):
        return torch.full(lead, float(x), dtype=torch.float32, device=device)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a number or a tensor, got {type(x).__name__}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device}")
    shape = tuple(x.shape)
    if shape == tuple(lead):
        return x.detach().float()
    if allow_seq and shape == tuple(lead[:-1]):
        return x.detach().float()[..., None].expand(lead)
    seq = f" or per sequence {tuple(lead[:-1])}" if allow_seq else ""
    raise ValueError(f"{name} must have shape {tuple(lead)} (per token){seq}, got {shape}")


def fused_linear_pg_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         old_logps: torch.Tensor, advantages: torch.Tensor,
                         loss_mask: torch.Tensor | None = None,
                         clip_low: float = 0.2, clip_high: float | torch.Tensor = 0.2,
                         clip_c: float | None = None,
                         ref_logps: torch.Tensor | None = None, kl_coef: float = 0.0,
                         kl_estimator: str = "k3", entropy_coef: float = 0.0,
                         aggregation: str = "token-mean", norm_constant: float | None = None,
                         denominator: float | torch.Tensor | None = None,
                         ignore_index: int = -100, tp_group=None, temperature: float = 1.0,
                         vocab_size: int | None = None, backend: str = "auto",
                         chunk_size: int | None = None, main_grad: bool = False,
                         grad_scale: float = 1.0, dw_accumulation: str = "param"):
    """PPO-clipped policy-gradient loss from LM-head inputs -> (loss, metrics).

    hidden [B, T, H] (B sequences of T tokens; a 2-D [N, H] is one sequence of N tokens),
    weight: this rank's vocab shard [V/tp, H], labels [B, T] global ids (``ignore_index``
    on prompt and padding). Per token [B, T] (float32 recommended): ``old_logps``
    (behaviour policy's log-prob of the label), ``loss_mask`` (0 drops a token, e.g. tool
    observations; default 1), ``ref_logps`` (for the KL term; required when
    ``kl_coef > 0``). ``advantages``: [B, T] or per sequence [B]. ``clip_high``: a number,
    per sequence [B] (ADPO's dynamic upper bound) or per token. ``clip_c``: dual-clip
    bound (> 1) for negative advantages. ``kl_estimator``: k1 | k2 | k3. ``entropy_coef``:
    bonus weight (the loss subtracts coef · H). ``aggregation`` / ``norm_constant`` /
    ``denominator``: see the module docstring. ``main_grad`` / ``grad_scale`` /
    ``dw_accumulation``: as in :func:`fused_linear_wsft_loss`. Other keywords as in
    :func:`linear_logprobs`.

    ``metrics`` (0-dim float32, detached, no host sync; means over unmasked tokens):
    pg_loss (= the loss), kl_ref (mean KL estimate to the reference, 0 without
    ``ref_logps``), entropy, approx_kl (to the old policy, k3: r - 1 - log r), ratio,
    clipfrac_low (ratio clipped below with A < 0), clipfrac_high (above, A > 0),
    clipfrac_dual, masked_share (share of label tokens that ``loss_mask`` drops), tokens
    (count of unmasked tokens).
    """
    check_lm_head_inputs(hidden, weight, labels, lead_shape_name="hidden.shape[:-1]")
    if hidden.dim() not in (2, 3) or hidden.shape[0] == 0:
        raise ValueError(f"hidden must be [B, T, H] or [N, H], got shape {tuple(hidden.shape)}")
    opts = PGOptions(clip_low=clip_low, clip_c=clip_c, kl_coef=kl_coef,
                     kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                     aggregation=aggregation, norm_constant=norm_constant)
    cfg = make_config(hidden=hidden, weight=weight, backend=backend, ignore_index=ignore_index,
                      temperature=temperature, tp_group=tp_group, vocab_size=vocab_size,
                      chunk_size=chunk_size, main_grad=main_grad, grad_scale=grad_scale,
                      dw_accumulation=dw_accumulation)
    lead = tuple(labels.shape) if labels.dim() == 2 else (1,) + tuple(labels.shape)
    dev = hidden.device
    y = labels.to(torch.int64).reshape(lead).contiguous()

    def tok(name, x, allow_seq=False, default=None):
        if isinstance(x, torch.Tensor) and labels.dim() == 1 and x.dim() >= 1:
            x = x.reshape(lead) if x.numel() == y.numel() else x
        return _per_token(name, x, lead, allow_seq=allow_seq, device=dev, default=default)

    if not isinstance(old_logps, torch.Tensor):
        raise TypeError("old_logps must be a tensor of per-token log-probs")
    old = tok("old_logps", old_logps)
    adv = tok("advantages", advantages, allow_seq=labels.dim() == 2)
    if isinstance(clip_high, (int, float)) and not isinstance(clip_high, bool) \
            and not clip_high > 0:
        raise ValueError(f"clip_high must be > 0, got {clip_high!r}")
    c_high = tok("clip_high", clip_high, allow_seq=labels.dim() == 2)
    c_low = torch.full(lead, float(clip_low), dtype=torch.float32, device=dev)
    mask = tok("loss_mask", loss_mask, default=1.0)
    ref = None
    if ref_logps is not None:
        ref = tok("ref_logps", ref_logps)
    elif kl_coef:
        raise ValueError("kl_coef > 0 needs ref_logps (per-token reference log-probs)")
    known = y != ignore_index
    mw = torch.where(known, mask, torch.zeros_like(mask))
    valid = mw != 0
    if denominator is not None:
        denominator = torch.as_tensor(denominator, dtype=torch.float32, device=dev)
    w_agg = _aggregation_weights(mw, opts, denominator)
    # masked_share counts label tokens (a tensor: no host sync)
    n_known = known.sum()
    flat = lambda t: None if t is None else t.reshape(-1).contiguous()  # noqa: E731
    grad_on = torch.is_grad_enabled()
    loss, m = FusedLinearPGFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight, flat(y), flat(old), flat(adv),
        flat(c_low), flat(c_high), flat(ref), flat(w_agg), flat(valid), cfg, opts,
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad, n_known)
    return loss, dict(zip(METRIC_KEYS, m.unbind(0)))
