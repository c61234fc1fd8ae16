"""The CPU shim: what Megatron-Core 0.16 needs to run on a host without CUDA.

Used ONLY when ``torch.cuda.is_available()`` is False (CI boxes, laptops). On a GPU
host ``ensure_cpu_shim()`` is a no-op and nothing here is imported into a model.

Megatron assumes CUDA in a few places that matter for us:

* ``torch.cuda.current_device()`` (about 175 call sites: RoPE ``inv_freq``, the
  global memory buffer, p2p shape exchange, ...). Redirected to return ``"cpu"``.
* ``Tensor.cuda()`` (tied-embedding sync across pipeline stages): returns the tensor.
* ``torch.cuda.synchronize()`` in ``pipeline_parallel.p2p_communication``. A no-op
  without CUDA (there is nothing to wait for).
* The pipeline schedules build ``total_num_tokens`` with a hard-coded
  ``device="cuda"`` (three places in ``schedules.py``), and so do the optimizer, grad
  clipping and grad scaler. Those modules (``_CUDA_FACTORY_MODULES``) get a view of
  ``torch`` whose tensor factories map ``"cuda"`` to ``"cpu"``; every other module keeps
  the real ``torch``.
* The optimizer compares ``tensor.type()`` with ``"torch.cuda.FloatTensor"``; inside
  those few functions (grad clipping, the fp16/bf16 and distributed optimizers'
  constructors) a CPU tensor reports the CUDA type name of its dtype.
* The local ``DotProductAttention`` allocates from a CUDA buffer and uses fused softmax
  kernels; no model of ours uses it (``megatron/attention.py``'s SDPA core attention is
  the local spec's attention on CPU and GPU alike).
* The CUDA RNG tracker (``model_parallel_cuda_manual_seed``, dropout forks,
  activation recompute) reads and writes CUDA generator states; without CUDA it
  forks the CPU generator instead.

Every patch is idempotent: calling ``ensure_cpu_shim()`` twice changes nothing.
"""
from __future__ import annotations

import contextlib
import types

import torch

_APPLIED = False
_CUDA_LIKE = ("cuda",)
# Modules that build tensors with a literal device="cuda" (Megatron-Core 0.16).
_CUDA_FACTORY_MODULES = (
    "megatron.core.pipeline_parallel.schedules",     # total_num_tokens
    "megatron.core.optimizer.optimizer",             # found_inf, overflow buffers
    "megatron.core.optimizer.clip_grads",            # grad-norm reductions
    "megatron.core.optimizer.grad_scaler",           # loss-scale tensors
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.utils",                           # local multi-tensor l2 norm
    "megatron.core.transformer.utils",               # causal/padding attention masks
    "megatron.core.tensor_parallel.data",            # broadcast_data
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.split(":")[0] in _CUDA_LIKE


class _CpuTorchView(types.ModuleType):
    """``torch`` as seen by ``megatron.core.pipeline_parallel.schedules`` on CPU.

    Attribute reads fall through to the real ``torch``; tensor factories rewrite a
    ``device="cuda"`` argument to ``"cpu"``.
    """

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "empty_like", "zeros_like", "ones_like")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        real = getattr(torch, name)
        if name in self._FACTORIES:
            def factory(*args, _real=real, **kwargs):
                if _is_cuda_device(kwargs.get("device")):
                    kwargs["device"] = "cpu"
                    kwargs.pop("pin_memory", None)
                return _real(*args, **kwargs)
            return factory
        return real


class _CpuRngTracker:
    """Stand-in for Megatron's CUDA RNG tracker: named forks of the CPU generator."""

    def __init__(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self):
        return bool(self.states_)

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self.states_ = dict(states)

    def add(self, name, seed):
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG state {name} / seed {seed} already exists in the CPU RNG tracker")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG state {name} is not added to the CPU RNG tracker")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


_REAL_TENSOR_TYPE = torch.Tensor.type


def _cpu_type_as_cuda(self, dtype=None, non_blocking=False, **kwargs):
    out = _REAL_TENSOR_TYPE(self, dtype, non_blocking, **kwargs) if dtype is not None else _REAL_TENSOR_TYPE(self)
    if dtype is None and isinstance(out, str) and out.startswith("torch.") and not out.startswith("torch.cuda."):
        return "torch.cuda." + out[len("torch."):]
    return out


def _with_cuda_type_names(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        torch.Tensor.type = _cpu_type_as_cuda  # type: ignore[assignment]
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = _REAL_TENSOR_TYPE  # type: ignore[assignment]
    return wrapper


def ensure_cpu_shim() -> bool:
    """Apply the CPU patches when CUDA is absent. Returns True if the shim is active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    # ``tensor.cuda()`` raises on a CPU-only build; Megatron calls it e.g. when it syncs
    # the tied embedding copy on the last pipeline stage. Keep the tensor where it is.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[assignment]

    import importlib

    view = _CpuTorchView()
    for name in _CUDA_FACTORY_MODULES:
        importlib.import_module(name).torch = view

    from megatron.core.tensor_parallel import random as mrandom

    # The CUDA RNG tracker and the recompute path read/write CUDA generator states.
    # Route both to the CPU generator; Megatron's own getters then hand out our tracker.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    tracker = _CpuRngTracker()

    def initialize_rng_tracker(*args, force_reset=False, **kwargs):
        if force_reset:
            tracker.reset()
        mrandom._CUDA_RNG_STATE_TRACKER = tracker
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mrandom.initialize_rng_tracker = initialize_rng_tracker
    initialize_rng_tracker()

    # The optimizer checks ``tensor.type() == "torch.cuda.FloatTensor"``; inside those
    # functions only, a CPU tensor reports the CUDA type name of its dtype.
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.optimizer import optimizer as mopt

    wrapped = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = wrapped
    mopt.clip_grad_by_total_norm_fp32 = wrapped
    for cls in (distrib_optimizer.DistributedOptimizer, mopt.Float16OptimizerWithFloat16Params):
        cls.__init__ = _with_cuda_type_names(cls.__init__)
    _APPLIED = True
    return True
