"""Fused linear log-probs: log softmax(hidden @ W_full^T / T)[labels] without [N, V] logits.

What is unusual here
--------------------
* **Vocab-parallel.** ``weight`` is this TP rank's Megatron vocab shard; softmax
  statistics are merged across ``tp_group`` (see ``_tp.py``), so the result is the
  full-vocabulary log-prob on every rank.
* **Design: cuBLAS GEMM chunks + Triton elementwise kernels.** Each chunk of token rows
  gets its fp32 logits from one tensor-core GEMM (cuBLAS reaches ~790 TFLOP/s on an H200
  for these shapes; a hand-written Triton matmul with a fused softmax epilogue tops out
  lower and has to be re-tuned per GPU generation). Everything that is NOT a matmul is
  fused in two Triton kernels that each stream the chunk once:
  ``_row_stats_kernel`` (online max / sum-exp / target gather, padding mask, temperature)
  and ``_dlogits_kernel`` (``coef * (onehot - softmax) / T``, written straight in the
  GEMM operand dtype). At N=8192, V=151936 that elementwise traffic is ~14 bytes per
  logit, ~4 ms at H200 bandwidth, against ~39 ms of unavoidable 6NHV matmul time.
* **Grad-in-forward engine.** ``_Engine`` exposes ``stats`` (logits -> lse, log-probs)
  and ``grads`` (dlogits -> dX chunk, dW accumulation). The fused DPO / WSFT ops know
  their per-token coefficients inside the forward chunk loop and call both on the SAME
  logits chunk (6NHV total). ``linear_logprobs`` serves an arbitrary upstream gradient:
  its forward keeps the 16-bit *unit* dlogits (onehot - softmax)/T when they fit a
  budget, and backward folds the upstream gradient into X's rows (6NHV, a quarter of
  eager's fp32 logits + log-softmax bytes); otherwise backward recomputes the logits
  (8NHV) and reuses the saved lse (no collective besides the dX all-reduce).
* **fp32 where it matters, no [V, H] fp32 buffer:** logits come out of the GEMM in fp32
  and statistics are fp32. dlogits are written in 16 bits IN PLACE over the fp32 logits
  chunk (GPU), so the chunk is the op's only [rows, V] buffer. dW goes to a buffer in the
  weight's dtype (each chunk's GEMM accumulates in fp32; ``dw_accumulation="float32"``
  keeps an fp32 accumulator instead) or, inside Megatron training, straight into the
  parameter's fp32 ``main_grad`` (``main_grad=True``, see ``GradSink``). dX is all-reduced
  over TP in fp32.
* Padding rows (global id >= ``vocab_size``) are masked to -inf inside the kernels.
  Labels must be < ``vocab_size``; a label pointing into padding is not checked (that
  would need a host sync) and yields a meaningless but finite value.
"""
from __future__ import annotations

import os

import torch

from . import _tp
from ._common import OpConfig, addmm_f32_, check_lm_head_inputs, make_config, mm_f32

SAVE_ENV = "MEGATRON_SZ_KERNEL_SAVE_MB"

try:  # Triton is optional: the torch backend works without it.
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # pragma: no cover
    _HAVE_TRITON = False


# =======================================================================================
# Triton kernels
# =======================================================================================
if _HAVE_TRITON:

    @triton.jit
    def _row_stats_kernel(logits_ptr, labels_ptr, m_ptr, s_ptr, t_ptr,
                          n_rows, n_cols, stride_row, vocab_start, vocab_size, ignore_index,
                          inv_temp, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
        """Per row of a [n_rows, n_cols] fp32 logits chunk: running max m, sum exp(z-m),
        and the target logit t (0 when the target lives on another rank or is ignored).
        z = logits * inv_temp; columns whose global id >= vocab_size count as -inf."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        row_off = rows.to(tl.int64) * stride_row
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            col_ok = (cols < n_cols) & ((cols + vocab_start) < vocab_size)
            mask = row_ok[:, None] & col_ok[None, :]
            z = tl.load(logits_ptr + row_off[:, None] + cols[None, :], mask=mask,
                        other=float("-inf")) * inv_temp
            m_new = tl.maximum(m, tl.max(z, axis=1))
            # a block (or shard) that is all padding keeps m = -inf; shift by 0 then so
            # that exp(-inf - (-inf)) never produces NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
            m = m_new
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
        local = labels - vocab_start
        own = row_ok & (labels != ignore_index) & (local >= 0) & (local < n_cols)
        t = tl.load(logits_ptr + row_off + local, mask=own, other=0.0) * inv_temp
        tl.store(m_ptr + rows, m, mask=row_ok)
        tl.store(s_ptr + rows, s, mask=row_ok)
        tl.store(t_ptr + rows, t, mask=row_ok)

    @triton.jit
    def _dlogits_kernel(logits_ptr, out_ptr, labels_ptr, lse_ptr, mu_ptr, coef_ptr, ecoef_ptr,
                        n_rows, n_cols, stride_row, stride_out, vocab_start, vocab_size,
                        ignore_index, inv_temp, ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_V: tl.constexpr):
        """dlogits = (coef·(onehot(label) - p) - ecoef·p·(z - mu)) * inv_temp with
        p = softmax(z) and mu = Σ p z per row (the entropy term only when ENTROPY: the
        policy-gradient op's bonus), one row block per program, streaming the shard from
        left to right.

        ``coef`` is d loss / d logp per row (0 for ignored rows); padding columns get 0.
        ``out`` may be the fp32 logits themselves, or (GPU) a bf16/fp16 view of the SAME
        storage with row stride 2 x n_cols: the 16-bit dlogits of columns [c0, c1) land on
        the bytes of fp32 columns [c0/2, c1/2), which this program has already read, and
        no other program touches this row, so the in-place write is race-free. Software
        pipelining only moves loads earlier, and later blocks never read written bytes."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
        if ENTROPY:
            mu = tl.load(mu_ptr + rows, mask=row_ok, other=0.0)
            ecoef = tl.load(ecoef_ptr + rows, mask=row_ok, other=0.0)
        local = labels - vocab_start
        has_label = labels != ignore_index
        in_row = rows.to(tl.int64)[:, None] * stride_row
        out_row = rows.to(tl.int64)[:, None] * stride_out
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            col_in = cols < n_cols
            col_ok = col_in & ((cols + vocab_start) < vocab_size)
            mask = row_ok[:, None] & col_ok[None, :]
            z = tl.load(logits_ptr + in_row + cols[None, :], mask=mask,
                        other=float("-inf")) * inv_temp
            p = tl.exp(z - lse[:, None])
            hit = (cols[None, :] == local[:, None]) & has_label[:, None]
            dz = coef[:, None] * (tl.where(hit, 1.0, 0.0) - p)
            if ENTROPY:
                dz = dz - ecoef[:, None] * p * tl.where(mask, z - mu[:, None], 0.0)
            dz = tl.where(mask, dz * inv_temp, 0.0)
            tl.store(out_ptr + out_row + cols[None, :], dz.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_in[None, :])


def _blocks(kind: str, n_cols: int, gpu: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, num_warps) for ``kind`` in {"stats", "dlogits"}.

    GPU: both kernels give each program one row and stream the whole shard in 4096-wide
    blocks (one read of the fp32 chunk; dlogits also one 16-bit write, in place).
    These are untuned first guesses (no GPU was available when this was written).
    Interpreter: big 2-D blocks, so that few Python-level programs run.
    """
    if gpu:
        return 1, 4096, 8
    return 16, min(2048, triton.next_power_of_2(max(n_cols, 16))), 4


def _stats_triton(logits, labels, cfg: OpConfig, *, gpu_blocks: bool | None = None):
    n, v = logits.shape
    m = torch.empty(n, dtype=torch.float32, device=logits.device)
    s = torch.empty_like(m)
    t = torch.empty_like(m)
    bn, bv, warps = _blocks("stats", v, logits.is_cuda if gpu_blocks is None else gpu_blocks)
    _row_stats_kernel[(triton.cdiv(n, bn),)](
        logits, labels, m, s, t, n, v, logits.stride(0), cfg.vocab_start, cfg.vocab_size,
        cfg.ignore_index, cfg.inv_temp, BLOCK_N=bn, BLOCK_V=bv, num_warps=warps)
    return m, s, t


def inplace_half(logits: torch.Tensor, out_dtype) -> torch.Tensor:
    """The 16-bit dlogits buffer: a ``[n, v]`` view over the fp32 logits' own storage
    (row stride 2v), or the logits themselves for fp32. No second [rows, V] buffer."""
    if out_dtype == torch.float32:
        return logits
    if logits.dtype != torch.float32 or not logits.is_contiguous():
        raise ValueError("in-place 16-bit dlogits need contiguous fp32 logits")
    return logits.view(out_dtype)[:, :logits.shape[1]]


def dlogits_triton(logits, labels, lse, coef, cfg: OpConfig, out_dtype, *, mu=None, ecoef=None,
                   gpu_blocks: bool | None = None, out: torch.Tensor | None = None):
    """Launch ``_dlogits_kernel`` (the entropy term when ``ecoef`` is given); returns the
    dlogits, in place over ``logits`` unless ``out`` (a [n, v] buffer, unit column stride)
    is given."""
    n, v = logits.shape
    out = inplace_half(logits, out_dtype) if out is None else out
    entropy = ecoef is not None
    bn, bv, warps = _blocks("dlogits", v, logits.is_cuda if gpu_blocks is None else gpu_blocks)
    _dlogits_kernel[(triton.cdiv(n, bn),)](
        logits, out, labels, lse, mu if entropy else lse, coef, ecoef if entropy else coef,
        n, v, logits.stride(0), out.stride(0), cfg.vocab_start, cfg.vocab_size,
        cfg.ignore_index, cfg.inv_temp, ENTROPY=entropy, BLOCK_N=bn, BLOCK_V=bv,
        num_warps=warps)
    return out


def _dlogits_triton(logits, labels, lse, coef, cfg: OpConfig, out_dtype, *,
                    gpu_blocks: bool | None = None, out: torch.Tensor | None = None):
    return dlogits_triton(logits, labels, lse, coef, cfg, out_dtype, gpu_blocks=gpu_blocks, out=out)


# =======================================================================================
# chunked PyTorch implementation of the same two kernels
# =======================================================================================
def _scaled_masked(logits, cfg: OpConfig):
    z = logits * cfg.inv_temp if cfg.inv_temp != 1.0 else logits.clone()
    cut = cfg.vocab_size - cfg.vocab_start          # first local padding column
    if cut < z.shape[1]:
        z[:, max(cut, 0):] = float("-inf")
    return z


def _target_index(labels, cfg: OpConfig):
    local = labels - cfg.vocab_start
    own = (labels != cfg.ignore_index) & (local >= 0) & (local < cfg.vocab_local)
    return local.clamp(0, cfg.vocab_local - 1), own


def _stats_torch(logits, labels, cfg: OpConfig):
    z = _scaled_masked(logits, cfg)
    m = z.amax(dim=1)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    s = torch.exp(z - m_safe[:, None]).sum(dim=1)
    local, own = _target_index(labels, cfg)
    t = torch.where(own, (logits.gather(1, local[:, None]).squeeze(1) * cfg.inv_temp),
                    torch.zeros_like(m))
    return m, s, t


def _dlogits_torch(logits, labels, lse, coef, cfg: OpConfig, out_dtype, *, out=None):
    p = torch.exp(_scaled_masked(logits, cfg) - lse[:, None])
    local, own = _target_index(labels, cfg)
    dz = p.neg_()
    dz.scatter_add_(1, local[:, None], own.to(dz.dtype)[:, None])
    dz.mul_((coef * cfg.inv_temp)[:, None])
    if out is not None:
        return out.copy_(dz)
    return dz.to(out_dtype)


# =======================================================================================
# the chunk engine shared by all fused ops
# =======================================================================================
class _Engine:
    """Runs one chunk of token rows: logits GEMM, statistics (+ TP merge), dlogits, dX, dW."""

    def __init__(self, weight: torch.Tensor, cfg: OpConfig):
        self.cfg = cfg
        # GPU + bf16/fp16: keep the parameter dtype so the GEMMs run on tensor cores
        # (fp32 accumulate, fp32 logits out). Everything else (CPU tests, fp64): upcast
        # the weight once and run fp32 GEMMs.
        tensor_cores = weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)
        self.w = weight if tensor_cores or weight.dtype == torch.float32 else weight.float()
        self.dz_dtype = weight.dtype if tensor_cores else torch.float32
        triton_path = cfg.backend == "triton"
        self._stats = _stats_triton if triton_path else _stats_torch
        self._dlogits = _dlogits_triton if triton_path else _dlogits_torch

    def stats(self, x_c: torch.Tensor, y_c: torch.Tensor):
        """fp32 logits chunk, full-vocab lse and log-prob (0 at ignored rows) per row."""
        logits = mm_f32(x_c, self.w.t())
        m, s, t = self._stats(logits, y_c, self.cfg)
        lse, t = _tp.combine_stats(m, s, t, self.cfg.tp_group)
        logp = torch.where(y_c != self.cfg.ignore_index, t - lse, torch.zeros_like(lse))
        return logits, lse, logp

    def logits(self, x_c: torch.Tensor) -> torch.Tensor:
        return mm_f32(x_c, self.w.t())

    def grads(self, logits, lse, y_c, coef, x_c, *, dx_out: torch.Tensor | None,
              sink: "GradSink") -> None:
        """coef = d loss / d logp per row. Writes dX rows into ``dx_out`` and adds this
        chunk's dW to the sink. ``logits`` is overwritten (dlogits in place)."""
        coef = torch.where(y_c != self.cfg.ignore_index, coef.float(), torch.zeros_like(lse))
        dz = self._dlogits(logits, y_c, lse, coef, self.cfg, self.dz_dtype)
        self.apply_dz(dz, x_c, dx_out=dx_out, sink=sink)

    def apply_dz(self, dz, x_c, *, dx_out, sink: "GradSink") -> None:
        if dx_out is not None:
            dx_out.copy_(mm_f32(dz, self.w))
        sink.add_dw(dz, x_c)


def chunk_slices(n: int, rows: int):
    for r0 in range(0, n, rows):
        yield slice(r0, min(n, r0 + rows))


_MISMATCH: dict[str, torch.Tensor] = {}


def main_grad_mismatches(device) -> torch.Tensor:
    """Device counter (int32, 0-dim) of backward passes whose upstream gradient differed
    from the ``grad_scale`` a fused op had already applied to ``main_grad``. Read it with
    the step's other statistics (no extra host sync) and reset with ``.zero_()``; non-zero
    means that step's LM-head gradient is wrong and must not be applied."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:   # "cuda" and "cuda:0" are one counter
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    if key not in _MISMATCH:
        _MISMATCH[key] = torch.zeros((), dtype=torch.int32, device=device)
    return _MISMATCH[key]


class GradSink:
    """Where a fused op's dX and dW go; one implementation for all four ops.

    * dX: the op's rows, in the hidden dtype when bf16/fp16 and TP = 1 (each row is
      complete after one GEMM, nothing to accumulate), else fp32 (all-reduced over TP in
      fp32, then cast).
    * dW (``cfg.dw_mode``): ``param`` accumulates chunk by chunk in a weight-dtype buffer
      that becomes the weight's grad (no fp32 [V, H] buffer; the GEMM accumulates each
      chunk in fp32); ``float32`` in an fp32 buffer cast once at the end; ``main_grad``
      straight into ``weight.main_grad`` (Megatron DDP's fp32 grad buffer, i.e.
      gradient-accumulation fusion): the weight then gets no ``.grad`` at all.
    * ``in_forward`` ops (DPO/WSFT/PG compute grads in forward) keep dX/dW until backward,
      which scales them IN PLACE by the upstream gradient (no copies). With ``main_grad``
      the dW is already scaled by ``cfg.grad_scale``; backward checks the upstream
      gradient against it on the device (``main_grad_mismatches``), without a host sync.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, cfg: OpConfig, *, want_dx: bool,
                 want_dw: bool, in_forward: bool, rows: int | None = None):
        self.cfg = cfg
        self.hidden_dtype = hidden.dtype
        self.weight_dtype = weight.dtype
        self.in_forward = in_forward
        self.tp_world = _tp.group_rank_world(cfg.tp_group)[1]
        n = hidden.shape[0] if rows is None else rows
        dx_dtype = hidden.dtype if (hidden.dtype in (torch.bfloat16, torch.float16)
                                    and self.tp_world == 1) else torch.float32
        self.dx = torch.zeros(n, hidden.shape[-1], dtype=dx_dtype, device=hidden.device) \
            if want_dx else None
        self.alpha = 1.0
        self.dw = None
        self.to_main_grad = want_dw and cfg.dw_mode == "main_grad"
        if self.to_main_grad:
            self.dw = weight.main_grad
            self.alpha = cfg.grad_scale if in_forward else 1.0
        elif want_dw:
            dt = weight.dtype if cfg.dw_mode == "param" else torch.float32
            self.dw = torch.zeros(weight.shape, dtype=dt, device=weight.device)

    def add_dw(self, dz: torch.Tensor, x_c: torch.Tensor) -> None:
        if self.dw is not None:
            addmm_f32_(self.dw, dz.t(), x_c, alpha=self.alpha)

    def finish(self) -> None:
        """All-reduce dX over TP (hidden's grad is the full-vocab gradient) and cast."""
        if self.dx is not None:
            _tp.all_reduce_sum_(self.dx, self.cfg.tp_group)
            self.dx = self.dx.to(self.hidden_dtype)
        if self.dw is not None and not self.to_main_grad:
            self.dw = self.dw.to(self.weight_dtype)

    def upstream(self, grad: torch.Tensor):
        """Backward of an ``in_forward`` op: (dX, dW) scaled in place by the upstream scalar;
        dW is None when it went to main_grad. Runs once (the buffers are handed over)."""
        if getattr(self, "_spent", False):
            raise RuntimeError("a fused LM-head loss can be backpropagated once (its gradients "
                               "are computed in forward and handed over); do not retain_graph")
        self._spent = True
        g = grad.float()
        dx, dw = self.dx, self.dw
        self.dx = self.dw = None
        if dx is not None:
            dx.mul_(g)
        if self.to_main_grad:
            s = self.cfg.grad_scale
            bad = ((g - s).abs() > 1e-6 * s).to(torch.int32)
            main_grad_mismatches(g.device).add_(bad.reshape(()))
            return dx, None
        if dw is not None:
            dw.mul_(g)
        return dx, dw


# =======================================================================================
# autograd + public API
# =======================================================================================
class LinearLogprobsFunction(torch.autograd.Function):
    """hidden [N, H], weight [V_loc, H], labels [N] -> log-probs [N] float32.

    Two backward strategies. ``save`` (when the caller wants grads and the [N, V_loc]
    16-bit store fits the budget): forward also writes the unit dlogits
    u = (onehot - softmax) / T of every row (the dlogits kernel with coef = 1) into that
    store, and backward needs no logits at all: dX = diag(g) (u W), dW = u^T (diag(g) X),
    i.e. the upstream gradient scales X's rows, not the [N, V] store. 6NHV in all, like
    eager (which keeps fp32 logits AND log-softmax: ~8x this store's bytes). Otherwise
    backward recomputes the logits chunk by chunk (8NHV, no [N, V] memory).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, cfg: OpConfig, save: bool):
        eng = _Engine(weight, cfg)
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        store = None
        if save and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            store = torch.empty(n, weight.shape[0], dtype=eng.dz_dtype, device=hidden.device)
        unit = torch.ones(min(n, cfg.chunk_rows), dtype=torch.float32, device=hidden.device)
        for sl in chunk_slices(n, cfg.chunk_rows):
            logits, lse[sl], logp[sl] = eng.stats(hidden[sl], labels[sl])
            if store is not None:
                y_c = labels[sl]
                coef = torch.where(y_c != cfg.ignore_index, unit[:y_c.shape[0]], torch.zeros_like(lse[sl]))
                eng._dlogits(logits, y_c, lse[sl], coef, cfg, eng.dz_dtype, out=store[sl])
            del logits
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.store = store
        ctx.cfg = cfg
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, labels, lse = ctx.saved_tensors
        cfg: OpConfig = ctx.cfg
        eng = _Engine(weight, cfg)
        sink = GradSink(hidden, weight, cfg, want_dx=ctx.needs_input_grad[0],
                        want_dw=ctx.needs_input_grad[1], in_forward=False)
        g = grad_logp.float()
        store, ctx.store = ctx.store, None
        for sl in chunk_slices(hidden.shape[0], cfg.chunk_rows):
            x_c = hidden[sl]
            dx_c = None if sink.dx is None else sink.dx[sl]
            if store is None:
                eng.grads(eng.logits(x_c), lse[sl], labels[sl], g[sl], x_c, dx_out=dx_c, sink=sink)
                continue
            u = store[sl]
            if dx_c is not None:
                dx_c.copy_(mm_f32(u, eng.w) * g[sl, None])
            sink.add_dw(u, (x_c.float() * g[sl, None]).to(u.dtype))
        del store
        sink.finish()
        return sink.dx, None if sink.to_main_grad else sink.dw, None, None, None


def _save_budget_bytes(device: torch.device) -> float:
    default_mb = 4096 if device.type == "cuda" else 64
    try:
        mb = float(os.environ.get(SAVE_ENV, default_mb))
    except ValueError:
        raise ValueError(f"{SAVE_ENV} must be a number of MiB, got {os.environ.get(SAVE_ENV)!r}") from None
    return mb * 2**20


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                    ignore_index: int = -100, tp_group=None, temperature: float = 1.0,
                    vocab_size: int | None = None, backend: str = "auto",
                    chunk_size: int | None = None, main_grad: bool = False,
                    dw_accumulation: str = "param", recompute: bool | None = None) -> torch.Tensor:
    """Per-token log-probs of ``labels`` under the (vocab-parallel) LM head, float32.

    hidden: [..., H] (usually [N, H]); weight: this rank's shard [V/tp, H] (rank r holds
    global rows r*V/tp ... (r+1)*V/tp-1); labels: [...] global ids, ``ignore_index`` ->
    0 in the output. Differentiable w.r.t. hidden (all-reduced over ``tp_group`` in
    backward) and weight (this shard's grad). ``vocab_size``: true vocabulary size, rows
    at global index >= it are Megatron padding and excluded from the softmax.
    ``backend``: "auto" | "triton" | "torch" ($MEGATRON_SZ_KERNEL_BACKEND overrides).
    ``chunk_size``: token rows per chunk (default from $MEGATRON_SZ_KERNEL_CHUNK_MB).
    ``main_grad``: add dW straight into ``weight.main_grad`` (Megatron DDP's fp32 buffer)
    in backward instead of returning it (gradient-accumulation fusion: no [V, H] grad
    tensor at all). ``dw_accumulation``: "param" (default; dW accumulated in the weight's
    dtype, as Liger does) or "float32" (an fp32 accumulator cast once at the end).
    Without grad (reference / old log-prob passes) the cost is one logits GEMM, 2NHV.
    ``recompute``: False keeps the 16-bit unit dlogits [N, V/tp] from forward (6NHV in all,
    ahead of eager), True recomputes the logits in backward (8NHV, no [N, V] memory);
    None (default) keeps them when they fit $MEGATRON_SZ_KERNEL_SAVE_MB (default 4096 MiB
    on GPUs, 64 on CPU).
    """
    check_lm_head_inputs(hidden, weight, labels, lead_shape_name="hidden.shape[:-1]")
    cfg = make_config(hidden=hidden, weight=weight, backend=backend, ignore_index=ignore_index,
                      temperature=temperature, tp_group=tp_group, vocab_size=vocab_size,
                      chunk_size=chunk_size, main_grad=main_grad, dw_accumulation=dw_accumulation)
    lead = labels.shape
    h2 = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    y = labels.reshape(-1).to(torch.int64).contiguous()
    if recompute is None:
        elt = 2 if (weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)) else 4
        recompute = h2.shape[0] * weight.shape[0] * elt > _save_budget_bytes(hidden.device)
    out = LinearLogprobsFunction.apply(h2, weight, y, cfg, not recompute)
    return out.reshape(lead)


def sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      **kwargs) -> torch.Tensor:
    """Summed completion log-prob per sequence: hidden [B, T, H], labels [B, T] -> [B].

    Convenience for DPO reference passes (call under ``torch.no_grad()``); accepts the
    keyword options of :func:`linear_logprobs`.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    return linear_logprobs(hidden, weight, labels, **kwargs).sum(dim=-1)
