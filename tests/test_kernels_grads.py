"""Where the fused ops put their gradients (issue 18): straight into Megatron's fp32
``main_grad`` (gradient-accumulation fusion), into a weight-dtype buffer, or into an fp32
accumulator; the in-place 16-bit dlogits; one-shot backward; the grad-scale check.

Every case is compared with the float64 references of ``kernels/reference.py`` on awkward
shapes with small chunks (several chunks accumulate into the same dW), on both backends
(Triton under its interpreter on CPU).
"""
from __future__ import annotations

import pytest
import torch

from megatron_sz.kernels import (fused_linear_dpo_loss, fused_linear_pg_loss, fused_linear_wsft_loss,
                                 linear_logprobs, main_grad_mismatches)
from megatron_sz.kernels.reference import (ref_fused_linear_dpo_loss, ref_fused_linear_pg_loss,
                                           ref_fused_linear_wsft_loss, ref_linear_logprobs)
from megatron_sz.kernels.testing import assert_close_verbose

BACKENDS = ["torch", "triton"]
B, T, H, V = 3, 7, 24, 301
CHUNK = 8  # token rows: 21 or 42 rows -> 3 to 6 chunks


def _device(backend):
    """Triton runs on the GPU when there is one, else on CPU under the interpreter."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _inputs(seed, rows, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, T, H, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5 * 4).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (rows, T), generator=g)
    labels[torch.rand(rows, T, generator=g) < 0.25] = -100
    labels[:, 0] = -100
    labels[:, 1] = torch.randint(0, V, (rows,), generator=g)   # every row has a target
    return hidden, weight, labels.to(device), g


def _pg_kwargs(labels, g):
    rows = labels.shape[0]  # CPU tensors; _op moves them
    return dict(old_logps=-torch.rand(rows, T, generator=g) * 3, advantages=torch.randn(rows, generator=g),
                clip_low=0.2, clip_high=0.28, entropy_coef=0.01)


def _op(name, backend, hidden, weight, labels, g, **kw):
    """(our loss, reference loss fn on float64 leaves)."""
    common = dict(backend=backend, chunk_size=CHUNK, **kw)
    dev = hidden.device

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev)

    def unif(*shape):
        return torch.rand(*shape, generator=g).to(dev)

    if name == "logprobs":
        up = rnd(*labels.shape)
        lp = linear_logprobs(hidden, weight, labels, **common)
        return (lp * up).sum(), lambda h, w: (ref_linear_logprobs(h, w, labels) * up.double()).sum()
    if name == "wsft":
        sw = unif(labels.shape[0]) + 0.25
        loss = fused_linear_wsft_loss(hidden, weight, labels, sw, normalization="token", **common)
        return loss, lambda h, w: ref_fused_linear_wsft_loss(h, w, labels, sw.double(), normalization="token")
    if name == "dpo":
        b = labels.shape[0] // 2
        rc, rr = -unif(b) * 20, -unif(b) * 20
        loss, _ = fused_linear_dpo_loss(hidden, weight, labels, ref_chosen_logps=rc, ref_rejected_logps=rr,
                                        beta=0.5, **common)
        return loss, lambda h, w: ref_fused_linear_dpo_loss(h, w, labels, ref_chosen_logps=rc.double(),
                                                            ref_rejected_logps=rr.double(), beta=0.5)[0]
    pk = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in _pg_kwargs(labels, g).items()}
    loss, _ = fused_linear_pg_loss(hidden, weight, labels, **pk, **common)
    return loss, lambda h, w: ref_fused_linear_pg_loss(h, w, labels, **pk)[0]


def _reference_grads(ref_fn, hidden, weight):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    ref_fn(h, w).backward()
    return h.grad, w.grad            # on the inputs' device (float64 works on CUDA too)


OPS = ["logprobs", "wsft", "dpo", "pg"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_main_grad_fusion_accumulates_scaled_dw_and_leaves_no_grad(rng_seed, backend, name):
    rows = 2 * B if name == "dpo" else B
    dev = _device(backend)
    hidden, weight, labels, g = _inputs(rng_seed, rows, device=dev)
    prior = (torch.randn(V, H, generator=g) * 1e-4).to(dev)  # earlier micro-batches, at gradient scale
    weight.main_grad = prior.clone()          # what Megatron DDP gives each parameter
    scale = 0.25                              # e.g. 1 / num_microbatches
    before = int(main_grad_mismatches(dev))
    kw = dict(main_grad=True) if name == "logprobs" else dict(main_grad=True, grad_scale=scale)
    loss, ref_fn = _op(name, backend, hidden, weight, labels, g, **kw)
    (loss * scale).backward()                 # the schedule's 1 / num_microbatches
    gh, gw = _reference_grads(ref_fn, hidden, weight)
    assert weight.grad is None, "with main_grad=True the weight must get no .grad"
    assert_close_verbose(hidden.grad, gh * scale, rtol=1e-5, name=f"{name} hidden.grad")
    assert_close_verbose(weight.main_grad - prior, gw * scale, rtol=1e-5, name=f"{name} main_grad increment")
    assert int(main_grad_mismatches(dev)) == before


@pytest.mark.parametrize("name", ["wsft", "dpo", "pg"])
def test_wrong_upstream_scale_is_counted(rng_seed, name):
    rows = 2 * B if name == "dpo" else B
    hidden, weight, labels, g = _inputs(rng_seed, rows)
    weight.main_grad = torch.zeros(V, H)
    counter = main_grad_mismatches("cpu")
    before = int(counter)
    loss, _ = _op(name, "torch", hidden, weight, labels, g, main_grad=True, grad_scale=0.5)
    loss.backward()                            # upstream 1.0, not the promised 0.5
    assert int(counter) == before + 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("acc", ["param", "float32"])
def test_dw_accumulation_modes_match_reference(rng_seed, backend, name, acc):
    rows = 2 * B if name == "dpo" else B
    hidden, weight, labels, g = _inputs(rng_seed, rows, device=_device(backend))
    loss, ref_fn = _op(name, backend, hidden, weight, labels, g, dw_accumulation=acc)
    loss.backward()
    gh, gw = _reference_grads(ref_fn, hidden, weight)
    assert weight.grad.dtype == weight.dtype
    assert_close_verbose(hidden.grad, gh, rtol=1e-5, name=f"{name} hidden.grad")
    assert_close_verbose(weight.grad, gw, rtol=1e-5, name=f"{name} weight.grad")


@pytest.mark.parametrize("name", OPS)
def test_bf16_weight_gets_bf16_grads_in_both_modes(rng_seed, name):
    rows = 2 * B if name == "dpo" else B
    for acc in ("param", "float32"):
        hidden, weight, labels, g = _inputs(rng_seed, rows, dtype=torch.bfloat16)
        loss, ref_fn = _op(name, "torch", hidden, weight, labels, g, dw_accumulation=acc)
        loss.backward()
        gh, gw = _reference_grads(ref_fn, hidden, weight)
        assert weight.grad.dtype == torch.bfloat16 and hidden.grad.dtype == torch.bfloat16
        assert_close_verbose(weight.grad, gw, rtol=3e-2, name=f"{name}/{acc} weight.grad")
        assert_close_verbose(hidden.grad, gh, rtol=3e-2, name=f"{name}/{acc} hidden.grad")


def test_grads_in_forward_backprop_once(rng_seed):
    hidden, weight, labels, g = _inputs(rng_seed, B)
    loss, _ = _op("wsft", "torch", hidden, weight, labels, g)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


def test_main_grad_without_buffer_is_a_clear_error(rng_seed):
    hidden, weight, labels, g = _inputs(rng_seed, B)
    with pytest.raises(ValueError, match="weight.main_grad"):
        linear_logprobs(hidden, weight, labels, main_grad=True)
    weight.main_grad = torch.zeros(V, H, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        linear_logprobs(hidden, weight, labels, main_grad=True)
    with pytest.raises(ValueError, match="dw_accumulation"):
        linear_logprobs(hidden, weight, labels, dw_accumulation="fp8")
    with pytest.raises(ValueError, match="grad_scale"):
        fused_linear_wsft_loss(hidden, weight, labels, torch.ones(B), grad_scale=0.0)


def test_inplace_half_dlogits_match_a_separate_buffer(rng_seed):
    """The GPU path writes bf16 dlogits over the fp32 logits' own bytes (row stride 2V).
    Run that exact kernel (on the GPU with its real block sizes when there is one, else
    under the interpreter) and compare with the torch twin."""
    pytest.importorskip("triton")
    from megatron_sz.kernels._common import make_config
    from megatron_sz.kernels.logprobs import _dlogits_torch, _stats_torch, dlogits_triton, inplace_half
    from megatron_sz.kernels.pg import _dlogits_torch as pg_dlogits_torch

    dev = _device("triton")
    g = torch.Generator().manual_seed(rng_seed)
    # several column blocks per row: 2048 wide under the interpreter, 4096 on a GPU
    n, v = (11, 5000) if dev == "cpu" else (37, 151936)
    logits = (torch.randn(n, v, generator=g) * 3).to(dev)
    labels = torch.randint(0, v, (n,), generator=g).to(dev)
    labels[3] = -100
    w = torch.zeros(v, 4, device=dev)
    cfg = make_config(hidden=torch.zeros(n, 4, device=dev), weight=w, backend="triton", ignore_index=-100,
                      temperature=0.8, tp_group=None, vocab_size=v - 7, chunk_size=None)
    m, s, t = _stats_torch(logits, labels, cfg)
    lse = m + torch.log(s)
    coef, mu = torch.randn(n, generator=g).to(dev), torch.randn(n, generator=g).to(dev)
    ecoef = (torch.randn(n, generator=g) * 0.1).to(dev)
    want = _dlogits_torch(logits.clone(), labels, lse, coef, cfg, torch.float32).to(torch.bfloat16)
    want_pg = pg_dlogits_torch(logits.clone(), labels, lse, mu, coef, ecoef, cfg, torch.float32).to(torch.bfloat16)
    gpu = dev == "cuda"
    buf = logits.clone()
    out = dlogits_triton(buf, labels, lse, coef, cfg, torch.bfloat16, gpu_blocks=gpu)
    assert out.data_ptr() == buf.data_ptr() and out.stride() == (2 * v, 1) and out.shape == (n, v)
    torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-2)
    buf = logits.clone()
    out = dlogits_triton(buf, labels, lse, coef, cfg, torch.bfloat16, mu=mu, ecoef=ecoef, gpu_blocks=gpu)
    torch.testing.assert_close(out.float(), want_pg.float(), atol=1e-2, rtol=1e-2)
    assert torch.count_nonzero(out[:, v - 7:]) == 0        # padding columns stay exactly 0
    with pytest.raises(ValueError, match="contiguous fp32"):
        inplace_half(logits.t(), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU: the bf16 tensor-core path "
                    "(in-place bf16 dlogits, bf16 dW buffer / fp32 main_grad) runs only there; the CPU tests "
                    "check the same maths in fp32")
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("mode", ["param", "float32", "main_grad"])
def test_bf16_tensor_core_path_matches_reference(rng_seed, name, mode):
    rows = 2 * B if name == "dpo" else B
    hidden, weight, labels, g = _inputs(rng_seed, rows, dtype=torch.bfloat16, device="cuda")
    kw = {"dw_accumulation": mode} if mode != "main_grad" else {"main_grad": True}
    if mode == "main_grad":
        weight.main_grad = torch.zeros(V, H, device="cuda")
    loss, ref_fn = _op(name, "triton", hidden, weight, labels, g, **kw)
    loss.backward()
    gh, gw = _reference_grads(ref_fn, hidden, weight)
    got_w = weight.main_grad if mode == "main_grad" else weight.grad
    assert_close_verbose(got_w.double(), gw, rtol=3e-2, name=f"{name}/{mode} dW")
    assert_close_verbose(hidden.grad.double(), gh, rtol=3e-2, name=f"{name}/{mode} dX")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("main_grad", [False, True])
def test_linear_logprobs_saved_and_recomputed_backward_match_reference(rng_seed, backend, recompute,
                                                                       main_grad):
    dev = _device(backend)
    hidden, weight, labels, g = _inputs(rng_seed, B, device=dev)
    if main_grad:
        weight.main_grad = torch.zeros(V, H, device=dev)
    labels[labels >= V - 5] = 7          # labels must be real tokens (< vocab_size), as documented
    up = torch.randn(labels.shape, generator=g).to(dev)
    lp = linear_logprobs(hidden, weight, labels, backend=backend, chunk_size=CHUNK, temperature=0.7,
                         vocab_size=V - 5, recompute=recompute, main_grad=main_grad)
    (lp * up).sum().backward()
    gh, gw = _reference_grads(
        lambda h, w: (ref_linear_logprobs(h, w, labels, temperature=0.7, vocab_size=V - 5) * up.double()).sum(),
        hidden, weight)
    assert_close_verbose(hidden.grad, gh, rtol=1e-5, name="hidden.grad")
    assert_close_verbose(weight.main_grad if main_grad else weight.grad, gw, rtol=1e-5, name="dW")


def test_linear_logprobs_default_saves_within_budget(rng_seed, monkeypatch):
    """The default keeps the [N, V] store only under $MEGATRON_SZ_KERNEL_SAVE_MB."""
    from megatron_sz.kernels import logprobs as lpm

    seen = []
    real = lpm.LinearLogprobsFunction.apply
    monkeypatch.setattr(lpm.LinearLogprobsFunction, "apply",
                        lambda *a: seen.append(a[-1]) or real(*a))
    hidden, weight, labels, g = _inputs(rng_seed, B)
    linear_logprobs(hidden, weight, labels).sum().backward()
    monkeypatch.setenv("MEGATRON_SZ_KERNEL_SAVE_MB", "0.001")
    linear_logprobs(hidden, weight, labels).sum().backward()
    assert seen == [True, False]
    monkeypatch.setenv("MEGATRON_SZ_KERNEL_SAVE_MB", "lots")
    with pytest.raises(ValueError, match="MEGATRON_SZ_KERNEL_SAVE_MB"):
        linear_logprobs(hidden, weight, labels)
