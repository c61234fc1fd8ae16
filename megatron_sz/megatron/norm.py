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
