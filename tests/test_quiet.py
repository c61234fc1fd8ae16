"""Known-harmless library warnings are silenced at their source, and only those (issue 20)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("megatron.core")

CODE = ("from megatron_sz import quiet; quiet.install()\n"
        "import warnings, megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs\n"
        "warnings.warn('an unexpected warning', UserWarning)\n")


def _stderr(**env) -> str:
    e = {k: v for k, v in os.environ.items() if k not in ("MSZ_VERBOSE", "PYTHONWARNINGS")}
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300,
                          env={**e, **env}).stderr


def test_megatron_fallback_notices_are_silenced_and_others_are_not():
    quiet = _stderr()
    assert "Apex" not in quiet and "Transformer Engine" not in quiet, quiet
    assert "an unexpected warning" in quiet
    loud = _stderr(MSZ_VERBOSE="1")  # what `evolve --verbose` sets for every child process
    assert "Apex is not installed" in loud or "Transformer Engine and Apex are not installed" in loud, loud
