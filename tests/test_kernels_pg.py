"""``fused_linear_pg_loss`` vs its float64 reference (CPU; Triton under TRITON_INTERPRET=1).

Loss, hidden grad and weight grad on awkward shapes (B=3 x T=7 = 21 tokens, V=301 with
Megatron padding rows, chunks of 5 rows), every aggregation mode, clip active and
inactive, dual clip, per-sequence clip_high (ADPO), each KL estimator, entropy on/off,
fully masked rows; both backends; TP=2 over gloo equals TP=1.

Behaviour log-probs are set as ``old = logp_ref - delta`` with ``delta`` drawn from a grid
whose ratios e^delta stay >= 0.03 away from every clip boundary used here (0.8, 1.15,
1.2, 1.28, 3): the fused fp32 log-probs differ from float64 by ~1e-6, so a ratio sitting
ON a boundary would flip the clip branch (and the gradient) by chance.
"""
from __future__ import annotations

import pytest
import torch

from megatron_sz.dist import spawn
from megatron_sz.kernels import fused_linear_pg_loss
from megatron_sz.kernels.reference import ref_fused_linear_pg_loss, ref_linear_logprobs
from megatron_sz.kernels.testing import assert_close_verbose, describe_mismatch

BACKENDS = ["torch", "triton"]
WIDE = (-0.9, -0.4, -0.05, 0.0, 0.03, 0.08, 0.6, 1.5)      # clip (and dual clip) active
NARROW = (-0.1, -0.05, 0.0, 0.03, 0.08)                     # inside every clip range
B, T, H, V, PAD = 3, 7, 16, 301, 11


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _inputs(seed, *, grid=WIDE, temperature=1.0, b=B, t=T, v=V, pad=PAD, device="cpu",
            dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    vocab_size = v - pad
    hidden = torch.randn(b, t, H, generator=g)
    weight = torch.randn(v, H, generator=g) / H ** 0.5 * 3
    labels = torch.randint(0, vocab_size, (b, t), generator=g)
    labels[:, :2] = -100                                    # prompt
    labels[torch.rand(b, t, generator=g) < 0.1] = -100
    lp = ref_linear_logprobs(hidden, weight, labels, temperature=temperature,
                             vocab_size=vocab_size).float()
    gr = torch.tensor(grid)
    delta = gr[torch.randint(0, len(gr), (b, t), generator=g)]
    data = dict(
        old_logps=lp - delta,
        ref_logps=lp - torch.randn(b, t, generator=g) * 0.3,
        advantages=torch.randn(b, generator=g),
        tok_adv=torch.randn(b, t, generator=g),
        loss_mask=(torch.rand(b, t, generator=g) > 0.15).float(),
    )
    data = {k: x.to(device) for k, x in data.items()}
    h = hidden.to(device, dtype).requires_grad_()
    w = weight.to(device, dtype).requires_grad_()
    return h, w, labels.to(device), vocab_size, data


CASES = {
    "token-mean clip+dual+kl3+entropy": dict(aggregation="token-mean", clip_c=3.0, kl_coef=0.1,
                                             kl_estimator="k3", entropy_coef=0.05),
    "seq-sum kl1": dict(aggregation="seq-mean-token-sum", kl_coef=0.2, kl_estimator="k1"),
    "seq-mean kl2 adpo-clip": dict(aggregation="seq-mean-token-mean", kl_coef=0.3,
                                   kl_estimator="k2", clip_high="per_seq"),
    "dr-grpo entropy": dict(aggregation="seq-mean-token-sum-norm", norm_constant=9.0,
                            entropy_coef=0.1),
    "clip inactive": dict(aggregation="token-mean", grid=NARROW, clip_high=0.28),
    "per-token adv, T=0.8, masked row": dict(aggregation="seq-mean-token-mean",
                                             tok_adv=True, temperature=0.8, mask_row=1,
                                             entropy_coef=0.02, clip_c=3.0),
}


def _kwargs(case, data, b):
    kw = {k: v for k, v in case.items() if k not in ("grid", "tok_adv", "temperature",
                                                     "mask_row", "clip_high")}
    kw["old_logps"] = data["old_logps"]
    kw["advantages"] = data["tok_adv"] if case.get("tok_adv") else data["advantages"]
    mask = data["loss_mask"].clone()
    if "mask_row" in case:
        mask[case["mask_row"]] = 0                              # a fully masked sequence
    kw["loss_mask"] = mask
    if kw.get("kl_coef"):
        kw["ref_logps"] = data["ref_logps"]
    ch = case.get("clip_high", 0.2)
    if ch == "per_seq":                                          # ADPO: one bound per sequence
        ch = torch.tensor([0.15, 0.28, 0.2][:b], device=mask.device)
    kw["clip_high"] = ch
    return kw


def _run_pair(seed, backend, case, dtype=torch.float32):
    dev = _device(backend)
    temp = case.get("temperature", 1.0)
    h, w, y, vs, data = _inputs(seed, grid=case.get("grid", WIDE), temperature=temp,
                                device=dev, dtype=dtype)
    kw = _kwargs(case, data, B)
    loss, metrics = fused_linear_pg_loss(h, w, y, vocab_size=vs, temperature=temp,
                                         backend=backend, chunk_size=5, **kw)
    loss.backward()
    hr = h.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    kw_ref = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss_ref, m_ref = ref_fused_linear_pg_loss(hr.cpu(), wr.cpu(), y.cpu(), vocab_size=vs,
                                               temperature=temp, **kw_ref)
    loss_ref.backward()
    return h, w, hr, wr, loss, loss_ref, metrics, m_ref, vs


def _close(a, e, tol, name):
    """Scale-relative: |a - e| <= tol * (max|e| + 0.1) (0.1: results that are small by
    cancellation of O(0.1..1) fp32 terms)."""
    e = e.detach().double().cpu()
    assert_close_verbose(a.detach().double().cpu(), e, rtol=0.0,
                         atol=tol * (float(e.abs().max()) + 0.1), name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_pg_loss_matches_float64_reference(rng_seed, backend, name):
    case = CASES[name]
    h, w, hr, wr, loss, loss_ref, m, m_ref, vs = _run_pair(rng_seed, backend, case)
    _close(loss, loss_ref, 2e-5, f"{name} loss")
    _close(h.grad, hr.grad, 2e-5, f"{name} hidden.grad")
    _close(w.grad, wr.grad, 2e-5, f"{name} weight.grad")
    assert (w.grad[vs:] == 0).all(), "padding rows must get exactly zero grad"
    for k in ("entropy", "ratio", "approx_kl", "kl_ref", "clipfrac_low", "clipfrac_high",
              "masked_share", "tokens"):
        _close(m[k], m_ref[k], 2e-5, f"{name} metric {k}")
    if case.get("grid") is NARROW:
        assert float(m["clipfrac_low"]) == 0 and float(m["clipfrac_high"]) == 0
    if "mask_row" in case:
        assert (h.grad[case["mask_row"]] == 0).all(), "a fully masked row gets zero grad"


def test_clipping_and_dual_clip_are_active_in_the_wide_cases(rng_seed):
    """The wide grid really exercises the branches (else the tests above prove little)."""
    torch.manual_seed(rng_seed)
    h, w, y, vs, data = _inputs(rng_seed, b=6, t=9)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    # every ratio on the grid, in both advantage signs
    lp = ref_linear_logprobs(h.detach(), w.detach(), y, vocab_size=vs).float()
    delta = torch.tensor(WIDE).repeat(6, 2)[:, :9]
    _, m = fused_linear_pg_loss(h, w, y, old_logps=lp - delta, advantages=adv, vocab_size=vs,
                                clip_c=3.0, backend="torch")
    _, m_ref = ref_fused_linear_pg_loss(h.detach(), w.detach(), y, old_logps=lp - delta,
                                        advantages=adv, vocab_size=vs, clip_c=3.0)
    assert float(m["clipfrac_low"]) > 0 and float(m["clipfrac_high"]) > 0
    assert float(m["clipfrac_dual"]) > 0
    _close(m["clipfrac_low"], m_ref["clipfrac_low"], 1e-6, "clipfrac_low")


@pytest.mark.parametrize("backend", BACKENDS)
def test_pg_loss_bf16_inputs(rng_seed, backend):
    case = dict(aggregation="token-mean", entropy_coef=0.05, kl_coef=0.1, clip_c=3.0)
    h, w, hr, wr, loss, loss_ref, *_ = _run_pair(rng_seed, backend, case, dtype=torch.bfloat16)
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    _close(loss, loss_ref, 3e-2, "bf16 loss")
    _close(h.grad.float(), hr.grad, 3e-2, "bf16 hidden.grad")
    _close(w.grad.float(), wr.grad, 3e-2, "bf16 weight.grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_batch_gives_zero_loss_and_grads(rng_seed, backend):
    dev = _device(backend)
    h, w, y, vs, data = _inputs(rng_seed, device=dev)
    for agg in ("token-mean", "seq-mean-token-mean"):
        h.grad = w.grad = None
        loss, m = fused_linear_pg_loss(h, w, y, old_logps=data["old_logps"],
                                       advantages=data["advantages"],
                                       loss_mask=torch.zeros(B, T, device=dev), vocab_size=vs,
                                       aggregation=agg, entropy_coef=0.1, backend=backend)
        loss.backward()
        assert float(loss.detach()) == 0 and float(m["tokens"]) == 0 and float(m["masked_share"]) == 1
        assert (h.grad == 0).all() and (w.grad == 0).all()
        assert all(torch.isfinite(v) for v in m.values())


def test_no_grad_path_and_denominator_override(rng_seed):
    h, w, y, vs, data = _inputs(rng_seed)
    kw = dict(old_logps=data["old_logps"], advantages=data["advantages"], vocab_size=vs,
              backend="torch", chunk_size=4)
    with torch.no_grad():
        loss_ng, _ = fused_linear_pg_loss(h, w, y, **kw)
    loss, _ = fused_linear_pg_loss(h, w, y, **kw)
    assert not loss_ng.requires_grad and torch.allclose(loss_ng, loss.detach())
    # token-mean with an explicit denominator D is the same sum divided by D
    n_tok = float(((y != -100)).sum())
    loss_d, _ = fused_linear_pg_loss(h, w, y, denominator=2 * n_tok, **kw)
    torch.testing.assert_close(loss_d, loss / 2, rtol=1e-6, atol=1e-7)


def test_input_errors_are_clear(rng_seed):
    h, w, y, vs, data = _inputs(rng_seed)
    base = dict(old_logps=data["old_logps"], advantages=data["advantages"], backend="torch")
    bad = [
        (dict(aggregation="mean"), "aggregation must be one of"),
        (dict(kl_estimator="k4", ref_logps=data["ref_logps"]), "kl_estimator"),
        (dict(clip_low=1.5), "clip_low"),
        (dict(clip_c=0.5), "clip_c"),
        (dict(kl_coef=0.1), "needs ref_logps"),
        (dict(advantages=torch.zeros(B + 1)), "advantages must have shape"),
        (dict(clip_high=torch.zeros(2)), "clip_high must have shape"),
        (dict(clip_high=0.0), "clip_high must be > 0"),
    ]
    for extra, msg in bad:
        with pytest.raises((ValueError, TypeError), match=msg):
            fused_linear_pg_loss(h, w, y, **{**base, **extra})


def test_triton_kernels_with_gpu_block_config_match_torch_twins(rng_seed):
    """The GPU launch configuration (1-row stats programs, 4x1024 dlogits tiles) under the
    interpreter against the torch twins, with vocab padding and labels of other ranks."""
    if torch.cuda.is_available():
        pytest.skip("covered by the CUDA runs of the tests above")
    from megatron_sz.kernels import pg
    from megatron_sz.kernels._common import OpConfig

    g = torch.Generator().manual_seed(rng_seed)
    n, v = 7, 1100
    logits = torch.randn(n, v, generator=g) * 4
    labels = torch.randint(0, 2000, (n,), generator=g)
    labels[2] = -100
    cfg = OpConfig(backend="triton", vocab_start=1000, vocab_local=v, vocab_size=2050,
                   ignore_index=-100, inv_temp=1 / 0.8, tp_group=None, chunk_rows=n)
    got = pg._stats_triton(logits, labels, cfg, gpu_blocks=True)
    want = pg._stats_torch(logits, labels, cfg)
    for name, a, e in zip("msut", got, want):
        assert_close_verbose(a, e, rtol=1e-6, name=f"stats {name}")
    lse, mu, _, _ = pg.combine_entropy_stats(*want, None)
    coef, ecoef = torch.randn(n, generator=g), torch.randn(n, generator=g)
    for out_dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        d_got = pg._dlogits_triton(logits.clone(), labels, lse, mu, coef, ecoef, cfg, out_dtype,
                                   gpu_blocks=True)
        d_want = pg._dlogits_torch(logits.clone(), labels, lse, mu, coef, ecoef, cfg,
                                   torch.float32)
        assert d_got.dtype == out_dtype
        assert_close_verbose(d_got.float(), d_want, rtol=tol, name=f"dlogits {out_dtype}")
        assert (d_got[:, 2050 - 1000:] == 0).all(), "padding columns must get zero dlogits"


def test_entropy_statistic_is_the_softmax_entropy(rng_seed):
    """H = log s - u/s from the streamed statistics equals -Σ p log p (float64)."""
    from megatron_sz.kernels import pg
    from megatron_sz.kernels._common import OpConfig

    g = torch.Generator().manual_seed(rng_seed)
    logits = torch.randn(5, 300, generator=g) * 6
    cfg = OpConfig(backend="torch", vocab_start=0, vocab_local=300, vocab_size=290,
                   ignore_index=-100, inv_temp=1.0, tp_group=None, chunk_rows=5)
    _, mu, ent, _ = pg.combine_entropy_stats(*pg._stats_torch(logits, torch.zeros(5).long(),
                                                               cfg), None)
    p = torch.softmax(logits[:, :290].double(), -1)
    assert_close_verbose(ent, -(p * p.log()).sum(-1), rtol=1e-5, name="entropy")
    assert_close_verbose(mu, (p * logits[:, :290].double()).sum(-1), rtol=1e-5, name="Σpz")


# ----------------------------------------------------------------------------- TP=2
def pg_tp_worker(rank: int, world: int, seed: int, backends: tuple[str, ...]) -> list[str]:
    """TP=``world`` on a weight shard equals TP=1 on the full weight (loss, hidden grad,
    this shard's weight grad, entropy metric)."""
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    failures: list[str] = []
    for be in backends:
        for v_loc, vocab_size in ((151, 290), (16, 14)):      # (16, 14): rank 1 all padding
            v = v_loc * world
            h, w, y, vs, data = _inputs(seed, v=v, pad=v - vocab_size, temperature=0.9)
            kw = dict(old_logps=data["old_logps"], advantages=data["advantages"],
                      loss_mask=data["loss_mask"], ref_logps=data["ref_logps"], kl_coef=0.1,
                      entropy_coef=0.05, clip_c=3.0, clip_high=torch.tensor([0.15, 0.28, 0.2]),
                      aggregation="seq-mean-token-mean", vocab_size=vs, temperature=0.9,
                      backend=be, chunk_size=5)
            hf = h.detach().clone().requires_grad_()
            wf = w.detach().clone().requires_grad_()
            hs = h.detach().clone().requires_grad_()
            ws = w.detach()[rank * v_loc:(rank + 1) * v_loc].clone().requires_grad_()
            lf, mf = fused_linear_pg_loss(hf, wf, y, **kw)
            ls, ms = fused_linear_pg_loss(hs, ws, y, tp_group=group, **kw)
            lf.backward()
            ls.backward()
            tag = f"rank{rank} {be} v_loc={v_loc}"
            for name, a, e in (("loss", ls, lf), ("entropy", ms["entropy"], mf["entropy"]),
                               ("hidden.grad", hs.grad, hf.grad),
                               ("weight.grad", ws.grad, wf.grad[rank * v_loc:(rank + 1) * v_loc])):
                e = e.detach()
                rep = describe_mismatch(a.detach(), e, rtol=1e-5,
                                        atol=1e-5 * float(e.abs().max()) + 1e-7,
                                        name=f"{tag} {name}")
                if rep:
                    failures.append(rep)
    return failures


@pytest.mark.timeout(300)
def test_tp2_equals_tp1(rng_seed):
    backends = ("torch",) if torch.cuda.is_available() else ("torch", "triton")
    results = spawn(pg_tp_worker, 2, rng_seed, backends, backend="gloo")
    failures = [f for per_rank in results for f in per_rank]
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU for the bf16 "
                    "tensor-core path; the CPU tests check the same maths in fp32/bf16")
def test_gpu_bf16_triton_matches_reference(rng_seed):
    g = torch.Generator().manual_seed(rng_seed)
    b, t, h_dim, v = 4, 64, 256, 32000
    hidden = torch.randn(b, t, h_dim, generator=g)
    weight = torch.randn(v, h_dim, generator=g) / h_dim ** 0.5 * 3
    labels = torch.randint(0, v, (b, t), generator=g)
    lp = ref_linear_logprobs(hidden, weight, labels).float()
    old = lp - torch.tensor(WIDE)[torch.randint(0, len(WIDE), (b, t), generator=g)]
    adv = torch.randn(b, generator=g)
    h = hidden.cuda().bfloat16().requires_grad_()
    w = weight.cuda().bfloat16().requires_grad_()
    loss, _ = fused_linear_pg_loss(h, w, labels.cuda(), old_logps=old.cuda(),
                                   advantages=adv.cuda(), entropy_coef=0.05, backend="triton")
    loss.backward()
    hr = h.detach().double().cpu().requires_grad_()
    wr = w.detach().double().cpu().requires_grad_()
    loss_ref, _ = ref_fused_linear_pg_loss(hr, wr, labels, old_logps=old, advantages=adv,
                                           entropy_coef=0.05)
    loss_ref.backward()
    _close(loss, loss_ref, 3e-2, "gpu loss")
    _close(h.grad.float(), hr.grad, 3e-2, "gpu hidden.grad")
    _close(w.grad.float(), wr.grad, 3e-2, "gpu weight.grad")
