"""megatron-sz: Megatron-Core training backend for data-free self-evolving reasoning.

Importing this package is cheap: it does not import torch, Megatron or Triton.
Heavy modules are imported by the subpackages that need them.
"""
__version__ = "0.1.0"

from megatron_sz.errors import UserError  # noqa: F401  (re-exported for callers)
