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
    lines = [f"{name}: {int(bad.sum())} of {a.numel()} elements mismatch "
             f"(rtol={rtol:g}, atol={atol:g}); NaN disagreements: {int(nan_dis.sum())}, "
             f"inf disagreements: {int(inf_dis.sum())}; max |diff| over finite: "
             f"{float(diff.max()):.3e}, max |expected|: {float(e[finite].abs().max()) if bool(finite.any()) else float('nan'):.3e}"]
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
