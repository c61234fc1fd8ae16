"""Shared plumbing for the fused LM-head ops: backend choice, input checks, chunk sizing,
fp32-output matmuls.

Nothing here synchronises with the device: every check looks at shapes, dtypes and
devices only (a ``.item()`` in a training forward stalls the GPU pipeline).
"""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import Any

import torch

BACKEND_ENV = "MEGATRON_SZ_KERNEL_BACKEND"
CHUNK_ENV = "MEGATRON_SZ_KERNEL_CHUNK_MB"
_BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - triton missing or broken
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Pick "triton" or "torch". ``MEGATRON_SZ_KERNEL_BACKEND`` overrides the argument.

    "auto" means Triton on CUDA/ROCm devices (ROCm tensors also report ``cuda``) and the
    chunked PyTorch path elsewhere. Triton on CPU tensors works only under the Triton
    interpreter (``TRITON_INTERPRET=1`` set before triton is imported) - that is how the
    CPU test-suite checks the kernels.
    """
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    choice = forced or backend
    if choice not in _BACKENDS:
        where = f"environment variable {BACKEND_ENV}" if forced else "argument backend="
        raise ValueError(f"unknown kernel backend {choice!r} (from {where}); "
                         f"expected one of {', '.join(_BACKENDS)}")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise ValueError("backend='triton' requested but triton cannot be imported; "
                             "install triton or use backend='torch'")
        if device.type != "cuda" and not interpreter_on():
            raise ValueError(f"backend='triton' needs a CUDA/ROCm tensor, got device {device}; "
                             "set TRITON_INTERPRET=1 before importing triton to run the "
                             "kernels on CPU (slow, for tests), or use backend='torch'")
    return choice


@dataclass(frozen=True)
class OpConfig:
    """Everything the chunk engine needs besides tensors (hashable, no tensors)."""

    backend: str
    vocab_start: int        # global id of this rank's first weight row
    vocab_local: int        # rows in this rank's shard (incl. padding rows)
    vocab_size: int         # true vocabulary; global ids >= this are padding
    ignore_index: int
    inv_temp: float
    tp_group: Any
    chunk_rows: int         # token rows per chunk
    # Where dW goes (``GradSink`` in logprobs.py): "param" = a buffer in the weight's dtype
    # (bf16 for bf16 weights, like Liger: no fp32 [V, H] buffer), "float32" = an fp32
    # accumulator cast at the end (tighter bf16 numerics; for bf16 weights 4 extra bytes
    # per weight element), "main_grad" = straight into ``weight.main_grad`` (Megatron's
    # fp32 DDP grad buffer: gradient-accumulation fusion, the weight gets no ``.grad``).
    dw_mode: str = "param"
    # For the ops that compute their grads in forward (DPO, WSFT, PG) with dw_mode
    # "main_grad": the upstream gradient backward will bring (Megatron's schedule:
    # 1 / num_microbatches); dW is added to main_grad already scaled by it.
    grad_scale: float = 1.0


def check_lm_head_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         lead_shape_name: str = "hidden[..., :-1]") -> None:
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor) \
            or not isinstance(labels, torch.Tensor):
        raise TypeError("hidden, weight and labels must be torch.Tensor")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating tensor, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the "
                        "same dtype; cast one of them (e.g. both bf16)")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must be an integer tensor of vocab ids, got {labels.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be this rank's vocab shard [V/tp, H], got shape "
                         f"{tuple(weight.shape)}")
    if hidden.dim() < 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must be [..., H] with H = weight.shape[1] = {weight.shape[1]}, "
                         f"got shape {tuple(hidden.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal {lead_shape_name} = "
                         f"{tuple(hidden.shape[:-1])}")
    if hidden.device != weight.device or labels.device != hidden.device:
        raise ValueError(f"hidden ({hidden.device}), weight ({weight.device}) and labels "
                         f"({labels.device}) must be on the same device")
    if weight.shape[0] == 0:
        raise ValueError("weight has no vocabulary rows")


DW_ACCUMULATIONS = ("param", "float32")


def _dw_mode(weight: torch.Tensor, main_grad: bool, dw_accumulation: str) -> str:
    if dw_accumulation not in DW_ACCUMULATIONS:
        raise ValueError(f"dw_accumulation must be one of {', '.join(DW_ACCUMULATIONS)}, "
                         f"got {dw_accumulation!r}")
    if not main_grad:
        return dw_accumulation
    mg = getattr(weight, "main_grad", None)
    if not isinstance(mg, torch.Tensor):
        raise ValueError("main_grad=True needs weight.main_grad (the fp32 gradient buffer "
                         "Megatron's DistributedDataParallel gives every parameter); this weight "
                         "has none: wrap the model in Megatron DDP, or pass main_grad=False")
    if tuple(mg.shape) != tuple(weight.shape) or mg.dtype != torch.float32 or \
            mg.device != weight.device:
        raise ValueError(f"weight.main_grad must be float32 {tuple(weight.shape)} on "
                         f"{weight.device}, got {mg.dtype} {tuple(mg.shape)} on {mg.device}")
    return "main_grad"


def make_config(*, hidden: torch.Tensor, weight: torch.Tensor, backend: str, ignore_index: int,
                temperature: float, tp_group, vocab_size: int | None,
                chunk_size: int | None, main_grad: bool = False, grad_scale: float = 1.0,
                dw_accumulation: str = "param") -> OpConfig:
    from . import _tp

    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    ignore_index = int(ignore_index)        # numpy / 0-dim-free ints are fine
    rank, world = _tp.group_rank_world(tp_group)
    v_local = int(weight.shape[0])
    v_total = v_local * world
    if vocab_size is None:
        vocab_size = v_total
    if not isinstance(vocab_size, int) or not 0 < vocab_size <= v_total:
        raise ValueError(f"vocab_size must be an int in [1, {v_total}] (the shards hold "
                         f"{world} x {v_local} rows incl. padding), got {vocab_size!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (token rows), got {chunk_size!r}")
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, numbers.Real) or \
            not float(grad_scale) > 0:
        raise ValueError(f"grad_scale must be a positive number, got {grad_scale!r}")
    return OpConfig(backend=resolve_backend(backend, hidden.device), vocab_start=rank * v_local,
                    vocab_local=v_local, vocab_size=vocab_size, ignore_index=ignore_index,
                    inv_temp=1.0 / float(temperature), tp_group=tp_group,
                    chunk_rows=chunk_size or default_chunk_rows(v_local, hidden.device),
                    dw_mode=_dw_mode(weight, bool(main_grad), dw_accumulation),
                    grad_scale=float(grad_scale))


def default_chunk_rows(v_local: int, device: torch.device) -> int:
    """Token rows per chunk so that the fp32 logits chunk stays near a byte budget.

    Budget: $MEGATRON_SZ_KERNEL_CHUNK_MB, default 640 MiB on GPUs and 64 MiB on CPU. On a
    GPU the fp32 logits chunk is the only [rows, V] buffer (dlogits are written in place
    over it in bf16), so the budget is the op's extra memory beyond its gradients: at
    V=151936 it gives 1024-row chunks, 594 MiB, under the 810 MiB target of issue 18, and
    N=8192 runs in 8 chunks (8 read-modify-writes of the bf16 dW, ~2.4 GB each).
    Rounded to a multiple of 128 rows on GPUs for tensor-core friendly GEMMs.
    """
    default_mb = 640 if device.type == "cuda" else 64
    try:
        mb = float(os.environ.get(CHUNK_ENV, default_mb))
    except ValueError:
        raise ValueError(f"{CHUNK_ENV} must be a number of MiB, got "
                         f"{os.environ.get(CHUNK_ENV)!r}") from None
    rows = max(1, int(mb * 2**20 // (4 * max(v_local, 1))))
    if device.type == "cuda" and rows > 128:
        rows -= rows % 128
    return rows


# ---------------------------------------------------------------------------------------
# matmuls with float32 results
#
# On CUDA the bf16/fp16 GEMMs run on tensor cores with fp32 accumulation and an fp32
# output (torch.mm(..., out_dtype=float32), cuBLASLt), so logits are never rounded to
# bf16 before the softmax statistics. On CPU (tests) we simply upcast the operands.
# ---------------------------------------------------------------------------------------
_LOW = (torch.bfloat16, torch.float16)
_OUT_DTYPE_OK: dict[str, bool] = {}


def _cuda_out_dtype_supported(device: torch.device) -> bool:
    key = str(device)
    if key not in _OUT_DTYPE_OK:
        try:
            a = torch.ones(32, 16, dtype=torch.bfloat16, device=device)
            c = torch.mm(a, a.t(), out_dtype=torch.float32)   # transposed operand, as used
            ok = c.dtype == torch.float32 and bool((c == 16).all())
        except (TypeError, RuntimeError):
            ok = False
        _OUT_DTYPE_OK[key] = ok
    return _OUT_DTYPE_OK[key]


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as float32 (fp32 accumulation whatever the operand dtype)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype and a.dtype in _LOW:
        if _cuda_out_dtype_supported(a.device):
            return torch.mm(a, b, out_dtype=torch.float32)
        return (a @ b).float()  # old torch: GEMM accumulates in fp32, output rounded once
    return a.float() @ b.float()


_ADDMM_INPLACE_OK: dict[str, bool] = {}


def _cuda_addmm_inplace_supported(device: torch.device) -> bool:
    """Does ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` (cuBLAS with an fp32 C
    operand and beta=1) work on this torch build? Probed once, numerically."""
    key = str(device)
    if key not in _ADDMM_INPLACE_OK:
        try:
            a = torch.ones(32, 16, dtype=torch.bfloat16, device=device)
            acc = torch.full((32, 32), 0.5, dtype=torch.float32, device=device)
            torch.addmm(acc, a, a.t(), alpha=0.5, out_dtype=torch.float32, out=acc)
            ok = bool((acc == 8.5).all())
        except (TypeError, RuntimeError):
            ok = False
        _ADDMM_INPLACE_OK[key] = ok
    return _ADDMM_INPLACE_OK[key]


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """acc += alpha * (a @ b): the dW accumulation, fp32 accumulation inside the GEMM.

    ``acc`` is float32 (an fp32 accumulator or Megatron's ``main_grad``) or the operands'
    own bf16/fp16 dtype (the weight-dtype grad buffer). On CUDA the accumulation happens
    in the GEMM epilogue (C = acc, beta = 1): no [V, H] temporary and one read+write of
    acc per chunk. Elsewhere (CPU tests, old torch) a temporary fp32 product is added.
    """
    if acc.dtype == a.dtype == b.dtype and (a.dtype == torch.float32 or a.is_cuda):
        acc.addmm_(a, b, alpha=alpha)          # fp32, or bf16/fp16 C on CUDA (fp32 accumulate)
    elif acc.dtype == torch.float32 and a.is_cuda and a.dtype == b.dtype and a.dtype in _LOW and \
            _cuda_addmm_inplace_supported(a.device):
        torch.addmm(acc, a, b, alpha=alpha, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(mm_f32(a, b), alpha=alpha)
