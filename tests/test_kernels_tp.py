"""TP=2 (two processes, gloo) equals TP=1 on the full weight for all three fused ops.

One spawn runs every check (both backends; Triton under its interpreter) so the ~10 s of
process start-up is paid once. The worker lives in ``megatron_sz.kernels.testing``.
"""
import pytest
import torch

from megatron_sz.dist import spawn
from megatron_sz.kernels.testing import tp_consistency_worker


@pytest.mark.timeout(300)
def test_tp2_equals_tp1_for_all_fused_ops(rng_seed):
    # CPU tensors over gloo; the Triton backend can only take CPU tensors under the
    # interpreter, which conftest switches on exactly when there is no GPU.
    backends = ("torch",) if torch.cuda.is_available() else ("torch", "triton")
    results = spawn(tp_consistency_worker, 2, rng_seed, backends, backend="gloo")
    failures = [f for per_rank in results for f in per_rank]
    assert not failures, "\n".join(failures)
