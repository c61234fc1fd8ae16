"""Preemption: turn SIGTERM / SIGUSR1 into "finish this step, checkpoint, exit 75".

SLURM sends ``--signal=B:USR1@120`` (forwarded by the batch script) before the time limit
and SIGTERM on preemption or ``scancel``. The handler only sets a flag; the training
loop reads it once per step (all-reduced with the step's metrics, so every rank of every
parallel group agrees on the same step), saves a checkpoint and exits with
``EXIT_PREEMPTED`` (75, EX_TEMPFAIL). A second signal during the save is ignored, so
SLURM's SIGTERM after USR1 does not kill a half-written checkpoint (the checkpoint is
atomic anyway: the ``latest`` pointer moves last).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

EXIT_PREEMPTED = 75
SIGNALS = ("SIGTERM", "SIGUSR1")


class PreemptionGuard:
    """Context manager that installs the handlers (main thread only) and restores them."""

    def __init__(self, signals: tuple[str, ...] = SIGNALS):
        self.signals = [getattr(signal, s) for s in signals if hasattr(signal, s)]
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            print(f"[train] received {name}: finishing the current step, then saving a checkpoint",
                  file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()


def fault_injection_step() -> int | None:
    """Test hook: ``MEGATRON_SZ_SIGNAL_AT_STEP=N`` makes rank 0 send itself a real SIGTERM
    while step N runs, exercising the same handler path as an external kill."""
    v = os.environ.get("MEGATRON_SZ_SIGNAL_AT_STEP")
    return int(v) if v else None
