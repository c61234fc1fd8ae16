"""Checkpoint, resume and the reference log-prob table of a training job.

Layout of a job's output dir::

    out/
      checkpoint/            Megatron dist checkpoint(s) via the adapter; ``latest`` moves last
                             (model + Megatron's sharded optimizer state, any host)
      ref_logps.pt           DPO reference log-probs, computed once per round
      metrics.jsonl, summary.json, hf/ (export)

Resume contract (checked, not assumed): the checkpoint's ``extra_state`` records the job
kind, the data fingerprint (tokenised items + plan settings, DP size included), the layout
and the step. A different kind, different data or another DP size is an error, never a
silent restart. TP and PP may change between runs: the adapter's checkpoint reshards the
model and Megatron's optimizer state (fp32 Adam moments per parameter).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from megatron_sz.errors import CheckpointError
from megatron_sz.megatron import training as mt


def ckpt_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoint"


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save(out_dir: Path, *, chunks: list, optimizer: mt.TrainOptimizer, step: int, extra: dict,
         world_rank: int, keep: str = "all", final: bool = False) -> str:
    """Save model (+ optimizer) at ``step`` (= number of completed steps).

    ``keep="last"`` (recipe ``keep_checkpoints``): older checkpoints of this job are deleted
    once this one is complete, and a ``final`` one (the job's last step) is saved without
    optimizer state: a finished job is never trained further, and its optimizer state was
    two thirds of the tiny recipe's 114 MB run directory."""
    from megatron_sz.megatron import save_checkpoint

    lean = keep == "last" and final
    path = save_checkpoint(str(ckpt_root(out_dir)), chunks, None if lean else optimizer.checkpointable, step=step,
                           extra_state={**extra, "step": step, "final": bool(final)},
                           keep_last=1 if keep == "last" else None)
    mt.barrier()
    return str(path)


def has_checkpoint(out_dir: Path) -> bool:
    from megatron_sz.megatron import latest_checkpoint

    root = ckpt_root(out_dir)
    return root.exists() and latest_checkpoint(str(root)) is not None


def resume(out_dir: Path, *, chunks: list, optimizer: mt.TrainOptimizer, expect: dict,
           world_rank: int) -> dict | None:
    """Load the latest checkpoint of this job, or return None when there is none."""
    from megatron_sz.megatron import load_checkpoint

    if not has_checkpoint(out_dir):
        return None
    from megatron_sz.megatron import latest_checkpoint
    from megatron_sz.megatron.checkpoint import read_meta

    meta = read_meta(latest_checkpoint(str(ckpt_root(out_dir))))
    # The final checkpoint of a finished job may hold the model only (keep_checkpoints: last):
    # re-running that job loads the weights, finds every step done and trains nothing.
    lean = not meta.get("has_optimizer", True) and (meta.get("extra_state") or {}).get("final")
    extra = load_checkpoint(str(ckpt_root(out_dir)), chunks, None if lean else optimizer.checkpointable)
    if extra is None:
        return None
    where = str(ckpt_root(out_dir))
    for key in ("kind", "fingerprint", "layout"):
        if key == "layout" and key in expect and _same_data_layout(extra.get(key), expect[key]):
            continue  # TP/PP may change: the adapter resharded model and optimizer state
        if key in expect and extra.get(key) != expect[key]:
            what = {"kind": "another job kind", "fingerprint": "other data or batch settings",
                    "layout": "another TP/PP/DP layout"}[key]
            raise CheckpointError(
                f"the checkpoint in the output dir was written by {what} "
                f"({key} {extra.get(key)!r}, this job {expect[key]!r})", where=where,
                fix="use a fresh --out directory, or re-run with the same recipe, data and layout")
    return extra


def _same_data_layout(saved: Any, now: Any) -> bool:
    """Layouts are ``[tp, pp, dp]``; only DP decides which items each rank's data cursor
    covers, so a checkpoint resumes at any TP/PP with the same DP."""
    return isinstance(saved, (list, tuple)) and len(saved) == 3 and list(saved)[2] == list(now)[2]


def load_ref_logps(path: Path, *, fingerprint: str, n_items: int, width: int = 2) -> torch.Tensor:
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(obj, dict) or "logps" not in obj:
        raise CheckpointError("not a reference log-prob file", where=str(path),
                              fix="pass a ref_logps.pt written by `megatron-sz train solver-dpo`")
    if obj.get("fingerprint") != fingerprint or obj["logps"].shape != (n_items, width):
        raise CheckpointError(
            f"reference log-probs were computed for other pairs ({tuple(obj['logps'].shape)[0]} pairs, "
            f"fingerprint {obj.get('fingerprint')}; this job has {n_items}, {fingerprint})", where=str(path),
            fix="delete the file to recompute it from the start-of-round policy, or pass the matching file")
    return obj["logps"].float()


def save_ref_logps(path: Path, logps: torch.Tensor, *, fingerprint: str, meta: dict) -> None:
    _atomic_torch_save({"fingerprint": fingerprint, "logps": logps.cpu(), **meta}, path)
