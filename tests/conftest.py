"""Test set-up shared by the whole suite.

* Without a GPU, Triton kernels run under its interpreter (TRITON_INTERPRET=1). The
  variable must be set before triton is imported, hence here.
* wandb never goes online from tests; Hugging Face never tries the network.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny CPU models run up to ~40x faster on one intra-op thread than on two competing ones
# (measured on the 2-core CI machine: 19.0 s -> 0.43 s for a 64x32 decode); the two-process
# TP/PP tests then get one core each. Must be set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def rng_seed(request) -> int:
    """A fresh seed per test (reported on failure), so inputs differ run to run."""
    import random

    seed = random.SystemRandom().randrange(2**31)
    request.node.user_properties.append(("seed", seed))
    print(f"[seed] {request.node.name}: {seed}")
    return seed
