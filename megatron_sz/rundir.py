"""The run directory: the single source of truth of a co-evolution run.

Both executors (local and SLURM) only ever look here to decide what is left to do, so a
run can be killed at any point and resumed by either of them. Layout::

    RUN_DIR/
      recipe.yaml            frozen copy of the recipe the run was created with
      run.json               name, seed, creation time, the recipe's original location
      prepare/               tokenizer/, init/{solver,generator}/ (HF), heldout.jsonl
      rounds/r000/
        pool.jsonl           D_t: every live problem with its zone/history (in extra)
        active.jsonl         the problems rolled out this round (new + replay + rechecks)
        sft/ dpo/ wsft/      training outputs (Megatron checkpoint, hf/, metrics.jsonl)
        rollout/shard-0001-of-0004.jsonl   ... sharded stage outputs, keyed appends
        verify/ refine/ probe/             ... same
        pairs.jsonl wsft.jsonl metrics.json eval.json
        _done/<stage>.json                 stage completion marker
        _done/<stage>.0001-of-0004.json    shard completion marker
      metrics.jsonl          one line per finished round (written by the curriculum stage)
      plot.png               accuracy and curriculum size by round
      slurm/                 rendered sbatch scripts, logs/, jobs.jsonl (submission records)

Rules: every file is written atomically (temp + rename) or as a keyed append
(``JsonlAppender``); a marker is written only after its outputs are complete, so "marker
present" means "outputs valid". A sharded stage is done when all its shard markers exist.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_sz.data import atomic_write_json, atomic_write_text
from megatron_sz.errors import UserError

RECIPE_FILE = "recipe.yaml"
RUN_FILE = "run.json"


def shard_tag(index: int, count: int) -> str:
    """Zero-padded shard label used in file and marker names: ``0001-of-0004``."""
    return f"{index:04d}-of-{count:04d}"


@dataclass
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()

    # ------------------------------------------------------------------ creation
    @classmethod
    def create_or_open(cls, root: str | Path, *, recipe_text: str, recipe_source: str | None,
                       name: str, seed: int) -> "RunDir":
        """Create a run directory, or reopen one made from the same recipe text.

        Reopening with a different recipe would mix two experiments in one folder, so it
        is refused (the frozen copy is what every stage reads)."""
        rd = cls(Path(root))
        frozen = rd.root / RECIPE_FILE
        if frozen.exists():
            if frozen.read_text(encoding="utf-8") != recipe_text:
                raise UserError(f"run directory {rd.root} was created from a different recipe",
                                where=str(frozen),
                                fix="resume with the same recipe, or pass a new --run-dir")
            return rd
        rd.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(rd.root / RUN_FILE, {
            "name": name, "seed": seed, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "recipe_source": recipe_source, "host": socket.gethostname()})
        # The frozen copy is written last: its presence means the run dir is initialised.
        atomic_write_text(frozen, recipe_text)
        return rd

    @classmethod
    def open(cls, root: str | Path) -> "RunDir":
        rd = cls(Path(root))
        if not (rd.root / RECIPE_FILE).is_file():
            raise UserError(f"{rd.root} is not a megatron-sz run directory (no {RECIPE_FILE})",
                            fix="pass the folder that `megatron-sz evolve` or `submit` created")
        return rd

    def load_recipe(self):
        """The frozen recipe; relative paths still resolve against the original recipe's folder."""
        from megatron_sz.recipe import load_recipe

        frozen = self.root / RECIPE_FILE
        src = self.info().get("recipe_source")
        # Prefer the original file while it is unchanged: its relative paths (model configs,
        # seed files) resolve against its own folder at load time.
        if src and Path(src).is_file() and Path(src).read_text(encoding="utf-8") == frozen.read_text(encoding="utf-8"):
            return load_recipe(src)
        recipe = load_recipe(frozen)
        if src:
            recipe.source = src
        return recipe

    def info(self) -> dict:
        p = self.root / RUN_FILE
        return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}

    # ------------------------------------------------------------------ paths
    @property
    def prepare_dir(self) -> Path:
        return self.root / "prepare"

    def round_dir(self, t: int) -> Path:
        return self.root / "rounds" / f"r{t:03d}"

    def stage_dir(self, t: int, stage: str) -> Path:
        return self.round_dir(t) / stage

    def shard_path(self, t: int, stage: str, index: int, count: int, suffix: str = ".jsonl") -> Path:
        return self.stage_dir(t, stage) / f"shard-{shard_tag(index, count)}{suffix}"

    def shard_paths(self, t: int, stage: str, count: int) -> list[Path]:
        return [self.shard_path(t, stage, i, count) for i in range(count)]

    @property
    def slurm_dir(self) -> Path:
        return self.root / "slurm"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def plot_path(self) -> Path:
        return self.root / "plot.png"

    # ------------------------------------------------------------------ markers
    def marker_path(self, t: int, stage: str, shard: tuple[int, int] | None = None) -> Path:
        base = self.round_dir(t) / "_done"
        if shard is None:
            return base / f"{stage}.json"
        return base / f"{stage}.{shard_tag(*shard)}.json"

    def is_done(self, t: int, stage: str, shard: tuple[int, int] | None = None) -> bool:
        return self.marker_path(t, stage, shard).exists()

    def mark_done(self, t: int, stage: str, shard: tuple[int, int] | None = None, **info: Any) -> None:
        rec = {"round": t, "stage": stage, "shard": list(shard) if shard else None,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "host": socket.gethostname(), "pid": os.getpid(),
               "slurm_job": _slurm_job_label()}
        rec.update(info)
        atomic_write_json(self.marker_path(t, stage, shard), rec)

    def read_marker(self, t: int, stage: str, shard: tuple[int, int] | None = None) -> dict | None:
        p = self.marker_path(t, stage, shard)
        return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None

    # ------------------------------------------------------------------ running
    def running_path(self, t: int, stage: str, shard: tuple[int, int] | None = None) -> Path:
        return self.round_dir(t) / "_running" / self.marker_path(t, stage, shard).name

    def mark_running(self, t: int, stage: str, shard: tuple[int, int] | None = None) -> Path:
        p = self.running_path(t, stage, shard)
        atomic_write_json(p, {"pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "slurm_job": _slurm_job_label()})
        return p

    def clear_running(self, t: int, stage: str, shard: tuple[int, int] | None = None) -> None:
        try:
            self.running_path(t, stage, shard).unlink()
        except FileNotFoundError:
            pass

    def running(self, t: int, stage: str) -> list[dict]:
        """Live 'running' records of a stage (any shard): the process is alive, or it ran
        under SLURM on another host (squeue is the authority there)."""
        base = self.round_dir(t) / "_running"
        if not base.is_dir():
            return []
        out = []
        for p in sorted(base.glob(f"{stage}.*json")):
            if p.name != f"{stage}.json" and not p.name[len(stage) + 1:-5].replace("-of-", "").isdigit():
                continue
            try:
                rec = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if rec.get("host") == socket.gethostname() and not _pid_alive(int(rec.get("pid", 0))):
                continue  # killed: a stale record, not a running stage
            out.append(rec)
        return out

    def shards_done(self, t: int, stage: str, count: int) -> list[bool]:
        return [self.is_done(t, stage, (i, count)) for i in range(count)]

    def rounds_present(self) -> list[int]:
        base = self.root / "rounds"
        if not base.is_dir():
            return []
        out = []
        for p in base.iterdir():
            if p.is_dir() and p.name.startswith("r") and p.name[1:].isdigit():
                out.append(int(p.name[1:]))
        return sorted(out)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slurm_job_label() -> str | None:
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return None
    if "SLURM_ARRAY_JOB_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return env["SLURM_JOB_ID"]
