"""RMSNorm for Megatron's local layer spec, with its weight in the model's dtype.

What is unusual here
--------------------
Without TransformerEngine or Apex, Megatron's local spec builds its norms with
``WrappedTorchNorm``, which returns ``torch.nn.RMSNorm(hidden_size, eps)``: a float32
weight whatever ``params_dtype`` is. In a bf16 model the activations are bf16, so every
norm call (two per layer, plus q/k norms and the final norm) hits
``F.rms_norm(bf16 input, fp32 weight)``; torch then warns "Mismatch dtype between input
and weight ... Cannot dispatch to fused implementation" and runs the unfused
composite (upcast, pow, mean, rsqrt, mul, mul, downcast: several passes over the
activations instead of one fused kernel).

``RMSNorm`` keeps the weight in ``config.params_dtype`` (the optimizer still holds an fp32
master copy of it, like every other bf16 parameter) and calls ``F.rms_norm`` with matching
dtypes, which dispatches to the fused kernel (fp32 accumulation inside). On fp32 models
(the CPU tests) it is numerically the same module as before; the parity test compares
it with ``torch.nn.RMSNorm`` and with a float64 formula. The saved parameter is still
``<norm>.weight``, so checkpoints and HF conversion are unchanged.

The weight carries ``sequence_parallel`` like Megatron's own norms, so that
``finalize_model_grads`` all-reduces its gradient over TP when sequence parallelism is on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    """Drop-in for the local spec's norm (same constructor as ``WrappedTorchNorm``)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm"):
        super().__init__()
        if normalization != "RMSNorm" or getattr(config, "normalization", "RMSNorm") != "RMSNorm":
            raise ValueError(f"megatron_sz RMSNorm only implements RMSNorm, got {normalization!r}")
        if zero_centered_gamma or getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("zero-centred gamma is not supported by megatron_sz RMSNorm")
        device = None if getattr(config, "use_cpu_initialization", True) else torch.cuda.current_device()
        self.hidden_size = int(hidden_size)
        self.eps = float(eps)
        self.weight = torch.nn.Parameter(torch.ones(self.hidden_size, dtype=config.params_dtype, device=device))
        self.weight.sequence_parallel = bool(getattr(config, "sequence_parallel", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.rms_norm(x, (self.hidden_size,), w, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, dtype={self.weight.dtype}"


def replace_torch_norms(spec):
    """Swap ``WrappedTorchNorm`` for :class:`RMSNorm` everywhere in a local layer spec
    (input / pre-MLP norms and the q/k norms). Returns the spec."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    def walk(node):
        if isinstance(node, ModuleSpec):
            if node.module is WrappedTorchNorm:
                node.module = RMSNorm
            walk(node.submodules)
            return
        if node is None or isinstance(node, (int, float, str, bool, type)):
            return
        for name in list(getattr(node, "__dataclass_fields__", {})):
            child = getattr(node, name)
            if child is WrappedTorchNorm:
                setattr(node, name, RMSNorm)
            else:
                walk(child)

    walk(spec)
    return spec


def use_torch_norms() -> bool:
    """``MEGATRON_SZ_TORCH_NORMS=1`` keeps Megatron's fp32-weight torch norms (the state
    before issue 18), so a benchmark can measure what the fused bf16 norms are worth."""
    import os

    return os.environ.get("MEGATRON_SZ_TORCH_NORMS", "0") not in ("", "0")


def bench(argv: list[str] | None = None) -> int:
    """Time ``F.rms_norm`` forward+backward with an fp32 weight (Megatron's torch norm in a
    bf16 model: unfused) against a weight in the activations' dtype (ours: fused), and
    append CSV rows (shape, dtype, weight dtype, median ms, device, date, commit)."""
    import argparse
    import csv
    import datetime as dt
    import statistics
    import subprocess
    import time
    import warnings
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="python -m megatron_sz.megatron.norm",
                                 description=bench.__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=None, help="rows (default 16384 GPU, 256 CPU)")
    ap.add_argument("--hidden", type=int, default=None, help="width (default 2048 GPU, 64 CPU)")
    ap.add_argument("--reps", type=int, default=None, help="timed reps (default 50 GPU, 3 CPU)")
    ap.add_argument("--csv", default=None, help="CSV to append to (default: print only)")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    n, h = args.tokens or (16384 if gpu else 256), args.hidden or (2048 if gpu else 64)
    reps = args.reps or (50 if gpu else 3)
    act = torch.bfloat16
    x = torch.randn(n, h, device=dev, dtype=act, requires_grad=True)
    g = torch.randn(n, h, device=dev, dtype=act)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    rows = []
    for wdt in (torch.float32, act):
        w = torch.ones(h, device=dev, dtype=wdt, requires_grad=True)
        times = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(reps + 5):
                x.grad = w.grad = None
                if gpu:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                F.rms_norm(x, (h,), w, 1e-6).backward(g)
                if gpu:
                    torch.cuda.synchronize()
                if i >= 5:
                    times.append((time.perf_counter() - t0) * 1e3)
        rows.append({"op": "rms_norm", "shape": f"N={n},H={h}", "activations": "bf16",
                     "weight": str(wdt).replace("torch.", ""), "ms_p50": round(statistics.median(times), 4),
                     "device": torch.cuda.get_device_name() if gpu else "cpu",
                     "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": commit})
        print(rows[-1])
    if args.csv:
        p = Path(args.csv)
        new = not p.exists()
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a", newline="") as fh:
            wr = csv.DictWriter(fh, fieldnames=list(rows[0]))
            if new:
                wr.writeheader()
            wr.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(bench())
