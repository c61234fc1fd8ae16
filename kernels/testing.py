"""Verbose closeness checks for kernel tests and benchmarks.

``torch.testing.assert_close`` tells you THAT tensors differ; when a fused kernel is wrong
you want WHERE: how many elements, the first bad indices with both values, and whether
NaN/inf appear on one side only (the classic symptom of a bad masking or max-shift).
"""
from __future__ import annotations

import torch


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float,
                      name: str = "tensor", max_show: int = 5) -> str | None:
    """Return None when ``|a - e| <= atol + rtol * |e|`` everywhere (NaN/inf must agree
    in position and value), otherwise a multi-line report."""
    if tuple(actual.shape) != tuple(expected.shape):
        return f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    nan_dis = nan_a ^ nan_e
    inf_dis = (inf_a | inf_e) & ~((inf_a & inf_e) & (a == e))
    finite = ~(nan_a | nan_e | inf_a | inf_e)
    diff = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bad_val = finite & (diff > atol + rtol * e.abs())
    bad = bad_val | nan_dis | (inf_dis & ~(nan_a | nan_e))
    if not bool(bad.any()):
        return None
    idx = bad.nonzero()[:max_show]
    e_max = float(e[finite].abs().max()) if bool(finite.any()) else float("nan")
    lines = [f"{name}: {int(bad.sum())} of {a.numel()} elements mismatch "
             f"(rtol={rtol:g}, atol={atol:g}); NaN disagreements: {int(nan_dis.sum())}, "
             f"inf disagreements: {int(inf_dis.sum())}; max |diff| over finite: "
             f"{float(diff.max()):.3e}, max |expected|: {e_max:.3e}"]
    for i in idx.tolist():
        ti = tuple(i)
        lines.append(f"  at {ti}: actual {float(a[ti]):.9g}  expected {float(e[ti]):.9g}  "
                     f"|diff| {abs(float(a[ti]) - float(e[ti])):.3e}")
    return "\n".join(lines)


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float,
                         atol: float | None = None, name: str = "tensor") -> None:
    """Assert closeness; ``atol`` defaults to ``rtol * max|expected|`` (a relative-to-scale
    bound, so near-zero entries of a gradient are not held to a pure relative bound)."""
    if atol is None:
        e = expected.detach().double()
        e = e[torch.isfinite(e)]
        atol = rtol * (float(e.abs().max()) if e.numel() else 1.0)
    report = describe_mismatch(actual, expected, rtol=rtol, atol=atol, name=name)
    if report is not None:
        raise AssertionError(report)


def tp_consistency_worker(rank: int, world: int, seed: int, backends: tuple[str, ...]) -> list[str]:
    """Run under ``megatron_sz.dist.spawn``: every fused op at TP=``world`` on a weight
    shard must equal TP=1 on the full weight (loss, hidden grad, this shard's weight grad).

    Inputs come from ``seed`` so all ranks see the same tensors. Returns mismatch reports
    (empty list = pass); one spawn runs all checks to amortise process start-up.
    """
    import torch.distributed as dist

    from .dpo import fused_linear_dpo_loss
    from .logprobs import linear_logprobs
    from .wsft import fused_linear_wsft_loss

    group = dist.new_group(list(range(world)))
    gen = torch.Generator().manual_seed(seed)
    failures: list[str] = []

    def compare(tag, full_out, shard_out, hf, hs, wf, ws, v_loc):
        for name, a, e in ((f"{tag} out", shard_out, full_out), (f"{tag} hidden.grad", hs.grad, hf.grad),
                           (f"{tag} weight.grad", ws.grad, wf.grad[rank * v_loc:(rank + 1) * v_loc])):
            e = e.detach()
            atol = 1e-5 * float(e.abs().max()) + 1e-7
            rep = describe_mismatch(a, e, rtol=1e-5, atol=atol, name=f"rank{rank} {name}")
            if rep:
                failures.append(rep)

    def run(tag, fn, lead, h_dim, v_loc, vocab_size):
        v = v_loc * world
        hidden = torch.randn(*lead, h_dim, generator=gen)
        weight = torch.randn(v, h_dim, generator=gen) / h_dim ** 0.5 * 3
        labels = torch.randint(0, vocab_size, lead, generator=gen)
        labels[torch.rand(lead, generator=gen) < 0.2] = -100
        hf, wf = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        hs = hidden.clone().requires_grad_()
        ws = weight[rank * v_loc:(rank + 1) * v_loc].clone().requires_grad_()
        out_f = fn(hf, wf, labels, None, vocab_size)
        out_s = fn(hs, ws, labels, group, vocab_size)
        out_f.backward()
        out_s.backward()
        compare(tag, out_f.detach(), out_s.detach(), hf, hs, wf, ws, v_loc)

    for be in backends:
        up = torch.randn(37, generator=gen)

        def lp(h, w, y, g, vs, be=be, up=up):
            return (linear_logprobs(h, w, y, tp_group=g, vocab_size=vs, temperature=0.8,
                                    backend=be, chunk_size=16) * up).sum()

        run(f"{be} linear_logprobs", lp, (37,), 24, 501, 990)
        run(f"{be} linear_logprobs (rank-1 shard all padding)", lp, (37,), 24, 16, 14)
        rc, rr = -torch.rand(3, generator=gen) * 30, -torch.rand(3, generator=gen) * 30

        def dpo(h, w, y, g, vs, be=be, rc=rc, rr=rr):
            return fused_linear_dpo_loss(h, w, y, ref_chosen_logps=rc, ref_rejected_logps=rr,
                                         beta=0.2, label_smoothing=0.1, nll_alpha=0.3,
                                         tp_group=g, vocab_size=vs, backend=be,
                                         chunk_size=14)[0]

        run(f"{be} fused_linear_dpo_loss", dpo, (6, 7), 24, 250, 497)
        sw = torch.rand(4, generator=gen) * 2
        sw[1] = 0

        def wsft(h, w, y, g, vs, be=be, sw=sw):
            return fused_linear_wsft_loss(h, w, y, sw, normalization="token", tp_group=g,
                                          vocab_size=vs, backend=be, chunk_size=10)

        run(f"{be} fused_linear_wsft_loss", wsft, (4, 9), 24, 250, 500)
    return failures
