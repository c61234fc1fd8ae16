"""Atomic, reshardable Megatron checkpoints (``dist_checkpointing``, torch_dist format).

Layout of a checkpoint root::

    ROOT/latest                 "iter_0000042"  (written last, atomically)
    ROOT/iter_0000042/          dist_checkpointing files (.metadata, *.distcp, common.pt)
                     hf_config.json     the HF config the model was built from
                     megatron_sz.json   step, extra_state, layout it was saved at, vocab sizes
                     COMPLETE           marker written just before the rename
    ROOT/.tmp_iter_0000043/     a save in progress (or a crashed one): always ignored

Saving writes everything into ``.tmp_<name>``, then renames it to ``<name>`` and only
then rewrites ``latest``. A crash at any point leaves ``latest`` on the previous
complete checkpoint. Tensors are stored with their global shapes, so a checkpoint saved
at TP=2 loads at TP=1 or PP=2 (vocab padding is TP-independent, see ``arch``).
Before loading, every tensor's global shape is compared with the model's, and a
mismatch raises ``CheckpointError`` naming the tensor (instead of a deep Megatron error).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from megatron_sz.data import atomic_write_json, atomic_write_text
from megatron_sz.errors import CheckpointError

LATEST = "latest"
MARKER = "COMPLETE"
META = "megatron_sz.json"
TMP_PREFIX = ".tmp_"
# The DistributedOptimizer's canonical (per-parameter) layout: reshardable over TP/PP/DP.
_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def iter_name(step: int) -> str:
    return f"iter_{int(step):07d}"


def is_complete(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MARKER).exists() and (p / ".metadata").exists()


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` (or ``root`` itself if it is one).

    Follows ``latest``; if the pointer is missing or names an incomplete folder, falls
    back to the highest-numbered complete ``iter_*`` folder. Partial saves are ignored.
    """
    root = Path(root)
    if is_complete(root):
        return root
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.exists():
        cand = root / pointer.read_text().strip()
        if is_complete(cand):
            return cand
    done = sorted((p for p in root.glob("iter_*") if is_complete(p)), key=lambda p: p.name)
    return done[-1] if done else None


def read_meta(ckpt: str | Path) -> dict:
    p = Path(ckpt) / META
    return json.loads(p.read_text()) if p.exists() else {}


def _barrier():
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.barrier()


def _rank() -> int:
    import torch.distributed as tdist

    return tdist.get_rank() if tdist.is_initialized() else 0


def _model_sharded_state_dict(chunks) -> dict:
    from megatron_sz.megatron.model import unwrap

    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def _chunks(model_chunks) -> list:
    return list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]


def _write_sharded(state: dict, path: Path) -> None:
    """The dist_checkpointing write (a separate function so tests can interrupt it)."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(state, str(path))


def save_checkpoint(ckpt_root: str | Path, model_chunks, optimizer=None, *, step: int,
                    extra_state: dict | None = None, opt_param_scheduler=None,
                    keep_last: Optional[int] = None) -> Path:
    """Save model (+ Megatron optimizer) state at ``step``; return the final folder.

    Collective: every rank calls it. ``extra_state`` must be JSON-serialisable (the
    trainer's data cursor, metrics, ...); ``load_checkpoint`` returns it.
    ``optimizer`` must be a Megatron optimizer (it provides ``sharded_state_dict``).
    ``keep_last=N`` deletes older complete checkpoints after ``latest`` moved (one writer
    per root is assumed: leftover ``.tmp_*`` folders of crashed saves are removed too).
    """
    from megatron.core import parallel_state

    from megatron_sz.megatron.model import unwrap

    chunks = _chunks(model_chunks)
    root = Path(ckpt_root)
    name = iter_name(step)
    final = root / name
    tmp = root / f"{TMP_PREFIX}{name}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):  # crashed earlier saves
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    state = _model_sharded_state_dict(chunks)
    if optimizer is not None:
        if not hasattr(optimizer, "sharded_state_dict"):
            raise TypeError("save_checkpoint needs a Megatron optimizer (get_megatron_optimizer), "
                            f"got {type(optimizer).__name__}")
        state["optimizer"] = optimizer.sharded_state_dict(state["model"] if "model" in state else state,
                                                          metadata=dict(_OPT_METADATA))
    if opt_param_scheduler is not None:
        state["opt_param_scheduler"] = opt_param_scheduler.state_dict()
    _write_sharded(state, tmp)
    _barrier()
    if _rank() == 0:
        gpt = unwrap(chunks[0])
        atomic_write_json(tmp / "hf_config.json", gpt.hf_config)
        atomic_write_json(tmp / META, {
            "step": int(step),
            "extra_state": extra_state or {},
            "saved_tp": parallel_state.get_tensor_model_parallel_world_size(),
            "saved_pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "true_vocab_size": gpt.true_vocab_size,
            "padded_vocab_size": gpt.padded_vocab_size,
            "params_dtype": str(gpt.config.params_dtype).replace("torch.", ""),
            "has_optimizer": optimizer is not None,
        })
        atomic_write_text(tmp / MARKER, "ok\n")
        if final.exists():  # re-saving a step: move the old one aside, then drop it
            old = root / f"{TMP_PREFIX}old_{name}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        atomic_write_text(root / LATEST, name + "\n")
        if keep_last:
            done = sorted((p for p in root.glob("iter_*") if is_complete(p)), key=lambda p: p.name)
            for old_ckpt in done[:-int(keep_last)]:
                if old_ckpt != final:
                    shutil.rmtree(old_ckpt, ignore_errors=True)
    _barrier()
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_tensors(state: dict, ckpt: Path) -> None:
    """Compare every ShardedTensor's global shape with the checkpoint's metadata."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    saved = dist_checkpointing.load_tensors_metadata(str(ckpt))
    for v in nested_values(state):
        if isinstance(v, ShardedTensorFactory):  # fused gate/up: stored as two halves of one key
            if v.key not in saved:
                raise CheckpointError(f"tensor {v.key!r} is missing from the checkpoint", where=str(ckpt),
                                      fix="the checkpoint is of another architecture or incomplete")
            got, want = tuple(saved[v.key].global_shape)[-1], tuple(v.data.shape)[-1]
            if got != want:
                raise CheckpointError(f"tensor {v.key!r} has input dim {got} in the checkpoint but the model "
                                      f"expects {want}", where=str(ckpt), fix="another architecture?")
            continue
        if not isinstance(v, ShardedTensor):
            continue
        if v.key not in saved:
            raise CheckpointError(f"tensor {v.key!r} is missing from the checkpoint", where=str(ckpt),
                                  fix="the checkpoint is of another architecture or incomplete")
        got = tuple(saved[v.key].global_shape)
        want = tuple(v.global_shape)
        if got != want:
            raise CheckpointError(f"tensor {v.key!r} has global shape {list(got)} in the checkpoint but the "
                                  f"model expects {list(want)}", where=str(ckpt),
                                  fix="build the model from the checkpoint's hf_config.json (another architecture?)")


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh DistributedOptimizer real (dummy) Adam states before loading into it.

    Without Apex/TE, Megatron wraps ``torch.optim.AdamW``, whose per-parameter ``step``
    only exists after a first step; ``DistributedOptimizer.state_dict()`` asserts on it
    (the CPU case). The dummy values are overwritten by the load.
    """
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not distrib_optimizer.HAVE_APEX_OR_TE and not getattr(DistributedOptimizer, "_msz_step_fix", False):
        # Same cause: the fully-reshardable load copies every key of the live Adam state,
        # including torch's per-parameter ``step``, which the saved per-parameter tensors do
        # not carry (Megatron restores it from the param groups). Keep the live one.
        original = DistributedOptimizer._set_main_param_and_optimizer_states

        def set_states(self, model_param, tensors):
            if "step" not in tensors:
                live = self._get_main_param_and_optimizer_states(model_param)
                if "step" in live:
                    tensors = {**tensors, "step": live["step"]}
            return original(self, model_param, tensors)

        DistributedOptimizer._set_main_param_and_optimizer_states = set_states
        DistributedOptimizer._msz_step_fix = True
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(opt, DistributedOptimizer) and inner is not None and len(inner.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


def _unshare_adam_steps(optimizer) -> None:
    """Without Apex/TE, Megatron's DistributedOptimizer.load_state_dict gives every
    parameter the SAME ``step`` tensor; torch's AdamW increments it in place once per
    parameter, so the bias correction after a resume would be wrong (measured: logits
    off by ~1 after one step). Give each parameter its own copy."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None or not hasattr(inner, "state"):
            continue
        for st in inner.state.values():
            if isinstance(st, dict) and "step" in st and hasattr(st["step"], "clone"):
                st["step"] = st["step"].clone()


def check_checkpoint_arch(model, ckpt: Path) -> None:
    """Refuse a checkpoint whose hf_config.json describes another network."""
    from megatron_sz.model_shape import SHAPE_KEYS, model_shape

    cfg_path = ckpt / "hf_config.json"
    if not cfg_path.exists():
        return
    other = model_shape(json.loads(cfg_path.read_text()), where=str(cfg_path))
    for k in SHAPE_KEYS:
        a, b = getattr(model.arch, k), getattr(other, k)
        if a != b:
            raise CheckpointError(f"architecture mismatch: the model has {k}={a!r}, the checkpoint has {k}={b!r}",
                                  where=str(cfg_path), fix="build the model from this checkpoint (build_model(ckpt_dir))")


def load_checkpoint(ckpt_root: str | Path, model_chunks, optimizer=None, *, opt_param_scheduler=None,
                    strict: bool = True) -> Optional[dict]:
    """Load the newest complete checkpoint under ``ckpt_root`` into the model (any TP/PP).

    Returns ``{"step": int, **extra_state}`` (None when there is no checkpoint yet).
    ``optimizer`` state is loaded when given and present.
    """
    from megatron.core import dist_checkpointing

    from megatron_sz.megatron.model import unwrap

    chunks = _chunks(model_chunks)
    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is None:
        return None
    meta = read_meta(ckpt)
    state = _model_sharded_state_dict(chunks)
    _check_tensors(state, ckpt)
    for c in chunks:
        check_checkpoint_arch(unwrap(c), ckpt)
    if optimizer is not None:
        if not meta.get("has_optimizer", False):
            raise CheckpointError("the checkpoint has no optimizer state", where=str(ckpt),
                                  fix="load without an optimizer (e.g. init from a converted checkpoint)")
        _materialize_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state["model"] if "model" in state else state,
                                                          is_loading=True, metadata=dict(_OPT_METADATA))
    loaded = dist_checkpointing.load(state, str(ckpt))
    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(loaded["model"], strict=strict)
    else:
        for i, c in enumerate(chunks):
            unwrap(c).load_state_dict(loaded[f"model{i}"], strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
    if opt_param_scheduler is not None and "opt_param_scheduler" in loaded:
        opt_param_scheduler.load_state_dict(loaded["opt_param_scheduler"])
    out = {"step": int(meta.get("step", 0)), "path": str(ckpt)}
    out.update(meta.get("extra_state", {}))
    return out
