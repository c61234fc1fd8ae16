"""Known-harmless library chatter, silenced at its source (``--verbose`` / ``MSZ_VERBOSE=1`` shows it).

A 3-minute ``evolve`` of the tiny recipe printed about 200 lines on stderr besides its own
progress: Megatron's "Apex / Transformer Engine is not installed, falling back" notices
(once per process and module), a Megatron config deprecation it triggers itself, torch
distributed-checkpoint deprecations raised from inside Megatron, and wandb's banner and run
summary for every training job, transformers' weight-loading bar (issue 20). None of them is actionable for a user of this
package, so each is filtered here by its exact message, and nothing else: an unexpected
warning still shows. The setting travels to child processes (trainers, spawned ranks)
through the environment.
"""
from __future__ import annotations

import os
import warnings

ENV = "MSZ_VERBOSE"

# (category, regex matched against the start of the message)
HARMLESS = [
    (UserWarning, r"Apex is not installed"),
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (UserWarning, r"full scope is deprecated"),  # Megatron's own default cuda_graph_scope
    (UserWarning, r"torch\.distributed is disabled, unavailable or uninitialized"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
    (FutureWarning, r"`load_state_dict` is deprecated"),
]


def verbose() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def install(verbose_flag: bool = False) -> None:
    """Filter the known-harmless warnings in this process and (through the environment) its
    children; with ``verbose_flag`` or ``MSZ_VERBOSE=1`` leave everything as it is."""
    if verbose_flag:
        os.environ[ENV] = "1"
    if verbose():
        return
    for category, message in HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category)
    # wandb's banner, "Run history / Run summary" and sync hints for every job.
    os.environ.setdefault("WANDB_SILENT", "true")
    # transformers' "Loading weights" bar each time a backend loads a model (a tiny one in
    # milliseconds); our own progress bars are not affected.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
