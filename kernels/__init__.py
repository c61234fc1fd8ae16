"""Triton-fused, vocab-parallel LM-head losses (installed as ``megatron_sz.kernels``)."""
