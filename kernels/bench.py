"""Benchmark the fused LM-head losses against eager PyTorch, torch.compile and Liger.

Run as ``megatron-sz bench-kernels`` or ``python -m megatron_sz.kernels.bench``.

* Times forward+backward (grads for hidden AND weight) with CUDA events on GPUs
  (``time.perf_counter`` on CPU): median and p20/p80 of ``--reps`` runs after ``--warmup``.
* Throughput is counted as **6·N·H·V FLOPs per forward+backward** for every provider
  (the minimum matmul work: logits, dX, dW), so a provider that recomputes logits
  (8·N·H·V) is not credited for the extra work.
* Peak memory is measured above the inputs (torch.cuda.max_memory_allocated after the
  inputs exist); it includes the gradients and every temporary. ``extra_beyond_grads``
  subtracts the gradients themselves (dX and dW in the input dtype), i.e. what the op
  needs on top of what any implementation must return. CPU runs do not measure memory
  (torch has no CPU allocator statistics).
* ``ours_main_grad`` is the Megatron-training path: the weight carries an fp32
  ``main_grad`` (allocated with the inputs, as DDP's grad buffer is) and dW goes straight
  into it (``main_grad=True``), so the weight gets no grad at all.
* ``mode=fwd`` rows time a no-grad forward (reference / old log-prob passes), counted
  as 2·N·H·V FLOPs.
* Rows are appended to a long-format CSV (op, provider, mode, shape, dtype, metric,
  unit, p20, p50, p80, device, date, commit) and a table is printed.
* On CPU (no flags) it runs tiny shapes through the torch backend: that keeps the script
  itself under test; the numbers mean nothing.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

OPS = ("dpo", "wsft", "logprobs", "pg")
PROVIDERS = ("ours", "ours_main_grad", "eager", "compile", "liger")
CSV_FIELDS = ("op", "provider", "mode", "shape", "dtype", "metric", "unit", "p20", "p50", "p80",
              "device", "date", "commit")
DEFAULT_CSV = Path(__file__).resolve().parent / "results" / "bench_kernels.csv"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ops", default="dpo,wsft,logprobs,pg",
                   help=f"comma-separated ops to time, from {', '.join(OPS)}")
    p.add_argument("--providers", default=None,
                   help="comma-separated providers from ours, ours_main_grad, eager, compile, "
                        "liger (default: all on GPU; ours,ours_main_grad,eager on CPU). Missing "
                        "Liger is skipped")
    p.add_argument("--tokens", default=None,
                   help="comma-separated token counts N (default 4096,8192,16384 on GPU, "
                        "64,128 on CPU)")
    p.add_argument("--hidden", type=int, default=None,
                   help="hidden size H (default 4096 on GPU, 64 on CPU)")
    p.add_argument("--vocab", type=int, default=None,
                   help="vocabulary size V (default 151936 on GPU, 1000 on CPU)")
    p.add_argument("--seq-len", type=int, default=1024,
                   help="sequence length T for the DPO/WSFT/PG ops; N/T sequences (T is "
                        "capped at N/2 so DPO has at least one pair)")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"),
                   help="input dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="where to run (auto: cuda when available)")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"),
                   help="backend for our kernels (auto: triton on GPU, torch on CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed iterations before timing (default 5 GPU, 1 CPU)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed iterations per case (default 20 GPU, 3 CPU)")
    p.add_argument("--csv", default=str(DEFAULT_CSV),
                   help="long-format CSV to append rows to (created with a header)")
    p.add_argument("--no-csv", action="store_true", help="print the table only")
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs")


# ----------------------------------------------------------------------------- helpers
def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]

    def q(f):
        pos = f * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return q(0.2), statistics.median(xs), q(0.8)


def _make_inputs(torch, op, n, h, v, t, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = max(1, min(t, n // 2 if op == "dpo" else n))
    seqs = max(2 if op == "dpo" else 1, n // t)
    if op == "dpo" and seqs % 2:
        seqs -= 1
    hidden = (torch.randn(seqs, t, h, generator=g)).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, v, (seqs, t), generator=g)
    labels[:, : max(1, t // 8)] = -100                   # a prompt segment
    labels = labels.to(device)
    extra = {}
    if op == "dpo":
        b = seqs // 2
        extra["ref_c"] = (-torch.rand(b, generator=g) * 100 * t / 64).to(device)
        extra["ref_r"] = (-torch.rand(b, generator=g) * 100 * t / 64).to(device)
    if op == "wsft":
        extra["sw"] = torch.rand(seqs, generator=g).to(device)
    if op == "pg":
        # behaviour log-probs near the policy's (ratios around 1, some clipped), one
        # advantage per sequence: a GRPO step
        extra["old"] = (-torch.rand(seqs, t, generator=g) * 8).to(device)
        extra["adv"] = torch.randn(seqs, generator=g).to(device)
    return hidden.requires_grad_(), weight.requires_grad_(), labels, extra


def _eager_fn(torch, op):
    """Materialised logits + log_softmax in fp32: what a plain PyTorch training loop does."""
    import torch.nn.functional as F

    def token_logp(hidden, weight, labels):
        logits = (hidden @ weight.t()).float()
        logp = torch.log_softmax(logits, dim=-1)
        valid = labels != -100
        tok = logp.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
        return tok * valid, valid

    def dpo(hidden, weight, labels, ref_c, ref_r):
        tok, _ = token_logp(hidden, weight, labels)
        seq = tok.sum(-1)
        b = seq.shape[0] // 2
        delta = (seq[:b] - ref_c) - (seq[b:] - ref_r)
        return -F.logsigmoid(0.1 * delta).mean()

    def wsft(hidden, weight, labels, sw):
        tok, _ = token_logp(hidden, weight, labels)
        return -(sw * tok.sum(-1)).sum() / hidden.shape[0]

    def logprobs(hidden, weight, labels):
        tok, _ = token_logp(hidden, weight, labels)
        return tok.sum()

    def pg(hidden, weight, labels, old, adv):
        # the same loss as our row: clipped ratio (0.2), entropy bonus 0.01, token-mean
        logits = (hidden @ weight.t()).float()
        logp_all = torch.log_softmax(logits, dim=-1)
        valid = labels != -100
        tok = logp_all.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
        ent = -(logp_all.exp() * logp_all).sum(-1)
        ratio = torch.exp(tok - old)
        a = adv[:, None]
        pg_tok = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2)) - 0.01 * ent
        return (pg_tok * valid).sum() / valid.sum().clamp(min=1)

    return {"dpo": dpo, "wsft": wsft, "logprobs": logprobs, "pg": pg}[op]


def _ours_fn(op, backend, *, main_grad: bool = False):
    from megatron_sz.kernels import (fused_linear_dpo_loss, fused_linear_pg_loss,
                                     fused_linear_wsft_loss, linear_logprobs)

    mg = dict(main_grad=True) if main_grad else {}
    if op == "dpo":
        return lambda h, w, y, ref_c, ref_r: fused_linear_dpo_loss(
            h, w, y, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, backend=backend, **mg)[0]
    if op == "wsft":
        return lambda h, w, y, sw: fused_linear_wsft_loss(h, w, y, sw, backend=backend, **mg)
    if op == "pg":
        return lambda h, w, y, old, adv: fused_linear_pg_loss(
            h, w, y, old_logps=old, advantages=adv, clip_low=0.2, clip_high=0.2,
            entropy_coef=0.01, backend=backend, **mg)[0]
    return lambda h, w, y: linear_logprobs(h, w, y, backend=backend, **mg).sum()


def _liger_fn(op):
    """Liger-Kernel's nearest op, or a string saying why it is skipped."""
    try:
        if op == "dpo":
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

            mod = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False)

            def f(h, w, y, ref_c, ref_r):
                out = mod(w, h, y)
                return out[0] if isinstance(out, tuple) else out

            return f
        if op == "pg":
            import torch
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            # token-mean ("bnpo"), no reference model; Liger has no entropy bonus, so its
            # row does slightly less work than ours
            grpo = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="bnpo",
                                            epsilon_low=0.2, epsilon_high=0.2)

            def p(h, w, y, old, adv):
                mask = (y != -100).to(h.dtype)
                out = grpo(h, w, torch.where(y == -100, 0, y), mask, adv,
                           old_per_token_logps=old)
                return out[0] if isinstance(out, tuple) else out

            return p
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        mod = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def g(h, w, y, *rest):
            return mod(w, h.reshape(-1, h.shape[-1]), y.reshape(-1))

        return g
    except Exception as exc:  # not installed / API drift
        return f"liger unavailable: {type(exc).__name__}: {exc}"


def _time_case(torch, fn, inputs, *, warmup, reps, device, forward_only: bool = False):
    hidden, weight, labels, extra = inputs
    args = [hidden, weight, labels, *extra.values()]

    def step():
        hidden.grad = None
        weight.grad = None
        if forward_only:
            with torch.no_grad():
                fn(*args)
        else:
            fn(*args).backward()

    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        peak_mib = None
    hidden.grad = weight.grad = None
    return times, peak_mib


def run(args: argparse.Namespace) -> int:
    import torch

    from megatron_sz.errors import UserError

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA/ROCm GPU is visible", where="--device",
                        fix="run on a GPU node (slurm/bench-kernels.sbatch) or use --device cpu")
    gpu = device.type == "cuda"
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    for o in ops:
        if o not in OPS:
            raise UserError(f"unknown op {o!r}", where="--ops", fix=f"choose from {', '.join(OPS)}")
    providers = [p.strip() for p in (args.providers or
                                     ("ours,ours_main_grad,eager,compile,liger" if gpu
                                      else "ours,ours_main_grad,eager")).split(",")
                 if p.strip()]
    for p in providers:
        if p not in PROVIDERS:
            raise UserError(f"unknown provider {p!r}", where="--providers",
                            fix=f"choose from {', '.join(PROVIDERS)}")
    try:
        tokens = [int(x) for x in (args.tokens or ("4096,8192,16384" if gpu else "64,128")).split(",")]
    except ValueError:
        raise UserError(f"--tokens must be comma-separated integers, got {args.tokens!r}",
                        where="--tokens", fix="e.g. --tokens 4096,8192") from None
    h = args.hidden or (4096 if gpu else 64)
    v = args.vocab or (151936 if gpu else 1000)
    dtype_name = args.dtype or ("bf16" if gpu else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    reps = args.reps if args.reps is not None else (20 if gpu else 3)
    backend = args.backend if args.backend != "auto" else ("triton" if gpu else "torch")
    dev_name = torch.cuda.get_device_name(device) if gpu else f"cpu ({os.cpu_count()} cores)"
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    commit = _git_commit()

    print(f"device: {dev_name}; dtype {dtype_name}; our backend: {backend}; "
          f"warmup {warmup}, reps {reps}")
    print("TFLOP/s are counted as 6*N*H*V per forward+backward for every provider "
          "(logits + dX + dW matmuls); peak memory is above the inputs, incl. grads.")
    rows, table = [], []
    # forward-only rows: our op and eager, for the reference / old log-prob passes
    cases = [(op, n, p, mode) for op in ops for n in tokens for p in providers
             for mode in (("fwd+bwd", "fwd") if p in ("ours", "eager") else ("fwd+bwd",))]
    t_start = time.time()
    for i, (op, n, prov, mode) in enumerate(cases, 1):
        inputs = _make_inputs(torch, op, n, h, v, args.seq_len, dtype, device, args.seed)
        n_eff = inputs[0].shape[0] * inputs[0].shape[1]
        shape = f"N={n_eff},H={h},V={v}"
        grad_mib = (inputs[0].numel() + inputs[1].numel()) * inputs[0].element_size() / 2**20
        if prov == "ours_main_grad":
            inputs[1].main_grad = torch.zeros(inputs[1].shape, dtype=torch.float32, device=device)
            grad_mib = inputs[0].numel() * inputs[0].element_size() / 2**20   # dW lands in main_grad
        if mode == "fwd":
            grad_mib = 0.0
        if prov in ("ours", "ours_main_grad"):
            fn = _ours_fn(op, backend, main_grad=prov == "ours_main_grad")
        elif prov == "eager":
            fn = _eager_fn(torch, op)
        elif prov == "compile":
            fn = torch.compile(_eager_fn(torch, op))
        else:
            fn = _liger_fn(op)
        note = ""
        if isinstance(fn, str):
            note = fn
        else:
            try:
                times, peak = _time_case(torch, fn, inputs, warmup=warmup, reps=reps,
                                         device=device, forward_only=mode == "fwd")
            except torch.cuda.OutOfMemoryError if gpu else MemoryError as exc:
                note = f"out of memory: {str(exc).splitlines()[0]}"
            except Exception as exc:  # a provider failing must not kill the sweep
                note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if gpu:
            torch.cuda.empty_cache()
        eta = (time.time() - t_start) / i * (len(cases) - i)
        label = prov if mode == "fwd+bwd" else f"{prov}/fwd"
        if note:
            print(f"[{i}/{len(cases)}] {op:8s} {label:14s} {shape}: skipped ({note}); ETA {eta:.0f}s")
            table.append((op, label, shape, None, None, None, None, note))
            continue
        p20, p50, p80 = _quantiles(times)
        per_nhv = 6.0 if mode == "fwd+bwd" else 2.0
        flops = per_nhv * n_eff * h * v
        tf = [flops / (t * 1e-3) / 1e12 for t in (p80, p50, p20)]   # slower time = lower TFLOP/s
        common = dict(op=op, provider=prov, mode=mode, shape=shape, dtype=dtype_name,
                      device=dev_name, date=date, commit=commit)
        rows.append({**common, "metric": "time", "unit": "ms", "p20": p20, "p50": p50, "p80": p80})
        rows.append({**common, "metric": f"throughput_{int(per_nhv)}NHV", "unit": "TFLOP/s",
                     "p20": tf[0], "p50": tf[1], "p80": tf[2]})
        extra_mib = None
        if peak is not None:
            extra_mib = peak - grad_mib
            rows.append({**common, "metric": "peak_memory_above_inputs", "unit": "MiB",
                         "p20": peak, "p50": peak, "p80": peak})
            rows.append({**common, "metric": "extra_beyond_grads", "unit": "MiB",
                         "p20": extra_mib, "p50": extra_mib, "p80": extra_mib})
        table.append((op, label, shape, p50, tf[1], peak, extra_mib, ""))
        print(f"[{i}/{len(cases)}] {op:8s} {label:14s} {shape}: {p50:.3f} ms, {tf[1]:.3g} TFLOP/s; "
              f"ETA {eta:.0f}s")

    print()
    print(f"{'op':9s} {'provider':19s} {'shape':28s} {'ms (p50)':>10s} {'TFLOP/s*':>9s} "
          f"{'peak MiB':>9s} {'extra MiB':>9s}")
    for op, prov, shape, ms, tf, peak, extra_mib, note in table:
        if ms is None:
            print(f"{op:9s} {prov:19s} {shape:28s} {'-':>10s} {'-':>9s} {'-':>9s} {'-':>9s}  "
                  f"{note[:60]}")
        else:
            print(f"{op:9s} {prov:19s} {shape:28s} {ms:10.3f} {tf:9.3g} "
                  f"{('%.0f' % peak) if peak is not None else 'n/a':>9s} "
                  f"{('%.0f' % extra_mib) if extra_mib is not None else 'n/a':>9s}")
    print("* 6*N*H*V FLOPs per forward+backward, 2*N*H*V per forward (/fwd rows); extra MiB = "
          "peak above the inputs minus the gradients themselves")
    if rows and not args.no_csv:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k])
                            for k in CSV_FIELDS})
            fh.flush()
            os.fsync(fh.fileno())
        print(f"appended {len(rows)} rows to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_sz.kernels.bench",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from megatron_sz.errors import UserError

    try:
        return run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
